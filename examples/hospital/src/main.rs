//! `hospital`: federated training across simulated hospitals.
//!
//! `hospital simulate` runs N hospitals in one process over the in-memory
//! transport with the fedcore round orchestrator, FedAvg, checkpoints and a
//! progress bar per round.
//!
//! Today it trains fedcore's pure-Rust softmax-regression model on seeded
//! synthetic data: the DenseNet-121 chest X-ray model, CKKS, DP and the
//! dashboard arrive with their own issues and will plug into this same loop.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use fedcore::linear::{Dataset, SoftmaxRegression, synthetic_blobs};
use fedcore::memory::{Fault, InMemoryTransport};
use fedcore::{
    Aggregator, ClientId, Evaluation, FedAvg, Model, ModelClient, Optimizer, Server, ServerConfig,
    ServerEvent, TrainConfig,
};
use fedcore_robust::{CoordinateMedian, GeometricMedianParams, KrumParams, TrimmedMeanParams};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser, Debug)]
#[command(version, about = "Federated training across simulated hospitals")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a federated simulation in this process.
    Simulate(SimulateArgs),
}

/// The aggregation rule, swappable with one flag.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum AggregatorChoice {
    /// Example-weighted mean (not robust).
    Fedavg,
    /// Geometric median by smoothed Weiszfeld.
    GeometricMedian,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean, beta = 0.2.
    TrimmedMean,
    /// Krum tolerating f = (n - 3) / 2 Byzantine hospitals.
    Krum,
}

impl AggregatorChoice {
    fn build(self, clients: usize) -> Result<Box<dyn Aggregator>> {
        Ok(match self {
            Self::Fedavg => Box::new(FedAvg),
            Self::GeometricMedian => Box::new(GeometricMedianParams::new().check()?),
            Self::Median => Box::new(CoordinateMedian),
            Self::TrimmedMean => Box::new(TrimmedMeanParams::new(0.2).check()?),
            Self::Krum => {
                Box::new(KrumParams::new(clients, clients.saturating_sub(3) / 2).check()?)
            }
        })
    }
}

#[derive(Args, Debug, Clone)]
struct SimulateArgs {
    /// How the server combines updates.
    #[arg(long, value_enum, default_value = "fedavg")]
    aggregator: AggregatorChoice,
    /// Number of hospitals.
    #[arg(long, default_value_t = 3)]
    clients: u64,
    /// Rounds in total (a resumed run counts the rounds already done).
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Seed for data, sampling and training.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Fraction of hospitals sampled each round.
    #[arg(long, default_value_t = 1.0)]
    fraction: f64,
    /// Quorum: valid updates a round needs (default: all but one, at least 1).
    #[arg(long)]
    min_clients: Option<usize>,
    /// Examples per hospital.
    #[arg(long, default_value_t = 400)]
    examples: usize,
    /// Feature dimension of the synthetic data.
    #[arg(long, default_value_t = 32)]
    dim: usize,
    /// Classes of the synthetic data.
    #[arg(long, default_value_t = 5)]
    classes: usize,
    /// Spread of the class centres (smaller is harder).
    #[arg(long, default_value_t = 0.3)]
    separation: f32,
    /// Local epochs per round.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Local batch size.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Local learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Seconds the server waits for updates each round.
    #[arg(long, default_value_t = 60)]
    round_timeout: u64,
    /// Checkpoint directory (default: a new folder under runs/).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Continue the run saved in --checkpoint-dir.
    #[arg(long, requires = "checkpoint_dir")]
    resume: bool,
    /// Make this hospital (0-based index) drop out of every round.
    #[arg(long)]
    drop_client: Option<u64>,
    /// Make this hospital (0-based index) send NaN updates.
    #[arg(long)]
    nan_client: Option<u64>,
    /// No progress bar (logs only).
    #[arg(long)]
    quiet: bool,
}

/// What a finished simulation reports.
#[derive(Debug)]
struct Summary {
    rounds: u64,
    initial: Evaluation,
    last: Evaluation,
    rejected: usize,
    checkpoint_dir: PathBuf,
}

fn hospital(i: u64) -> String {
    format!("hospital-{}", i + 1)
}

/// All hospitals share one task (the seed's high bits) and draw their own samples.
fn data(args: &SimulateArgs, index: u64, n: usize) -> Dataset {
    synthetic_blobs(
        (args.seed << 16) + index,
        n,
        args.dim,
        args.classes,
        args.separation,
    )
}

fn simulate(args: &SimulateArgs) -> Result<Summary> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    let mut transport = InMemoryTransport::new();
    for i in 0..args.clients {
        let model = SoftmaxRegression::new(args.dim, args.classes);
        let client = ModelClient::new(hospital(i), model, data(args, i, args.examples))
            .with_test_data(data(args, 1000 + i, args.examples / 4 + 1));
        transport.add_client(client)?;
    }
    for (which, fault) in [
        (args.drop_client, Fault::Drop),
        (args.nan_client, Fault::CorruptNan),
    ] {
        if let Some(i) = which {
            transport
                .inject(&ClientId::new(hospital(i)), Some(fault))
                .with_context(|| format!("no hospital with index {i}"))?;
        }
    }
    let faulty = u64::from(args.drop_client.is_some()) + u64::from(args.nan_client.is_some());
    let aggregator = args.aggregator.build(args.clients as usize)?;
    // Default quorum: every healthy hospital but one, and never below what the
    // aggregator needs (Krum: 2f + 3). An explicit --min-clients is checked by the server.
    let quorum = args.min_clients.unwrap_or_else(|| {
        ((args.clients - faulty).saturating_sub(1).max(1) as usize).max(aggregator.min_updates())
    });
    let checkpoint_dir = args.checkpoint_dir.clone().unwrap_or_else(|| {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        PathBuf::from(format!("runs/sim-{t}"))
    });
    let config = ServerConfig {
        rounds: args.rounds,
        fraction_fit: args.fraction,
        min_fit_clients: quorum,
        min_available_clients: quorum,
        fraction_evaluate: 1.0,
        round_timeout: Duration::from_secs(args.round_timeout),
        seed: args.seed,
        train: TrainConfig {
            epochs: args.epochs,
            batch_size: args.batch_size,
            learning_rate: args.lr,
            optimizer: Optimizer::Sgd { momentum: 0.9 },
            seed: 0,
        },
        checkpoint_dir: Some(checkpoint_dir.clone()),
        // Robust aggregators score trust; FedAvg scores none (no effect).
        trust: Some(fedcore::trust::TrustPolicy::default()),
        ..ServerConfig::default()
    };

    let holdout = data(args, 9999, 1000);
    let mut evaluator_model = SoftmaxRegression::new(args.dim, args.classes);
    let template = evaluator_model.parameters();
    let mut server = if args.resume {
        Server::resume(config, template, transport, aggregator)?
    } else {
        Server::new(config, template, transport, aggregator)?
    };
    evaluator_model.set_parameters(server.global())?;
    let initial = evaluator_model.evaluate(&holdout)?;
    server.set_evaluator(move |p| {
        evaluator_model.set_parameters(p)?;
        evaluator_model.evaluate(&holdout)
    });

    let todo = args.rounds.saturating_sub(server.next_round() - 1);
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(todo)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} round {pos}/{len} [{bar:30}] {elapsed} {msg}")
            .context("progress template")?
            .progress_chars("=> "),
    );
    let events_bar = bar.clone();
    server.subscribe(move |event: &ServerEvent| match event {
        ServerEvent::RoundStarted { round, sampled } => {
            events_bar.set_message(format!(
                "round {round}: {} hospitals training",
                sampled.len()
            ));
        }
        ServerEvent::UpdateRejected { client, reason, .. } => {
            events_bar.suspend(|| println!("  {client} not counted: {reason}"));
        }
        ServerEvent::ClientFlagged {
            client, trust_ema, ..
        } => {
            events_bar.suspend(|| println!("  {client} is suspicious (trust {trust_ema:.2})"));
        }
        ServerEvent::RoundFinished { record } => {
            let e = record.evaluation.as_ref();
            let line = format!(
                "round {:>3}: {} updates, held-out loss {:.4}, accuracy {:.3}",
                record.round,
                record.accepted.len(),
                e.map_or(f64::NAN, |e| e.loss),
                e.and_then(|e| e.metrics.get("accuracy").copied())
                    .unwrap_or(f64::NAN),
            );
            // `suspend` prints even when the bar is hidden (no terminal, --quiet).
            events_bar.suspend(|| println!("{line}"));
            events_bar.inc(1);
        }
        _ => {}
    });

    server.run()?;
    bar.finish_and_clear();
    let last = server
        .history()
        .iter()
        .rev()
        .find_map(|r| r.evaluation.clone())
        .context("no round finished")?;
    Ok(Summary {
        rounds: server.history().len() as u64,
        initial,
        last,
        rejected: server.history().iter().map(|r| r.failures.len()).sum(),
        checkpoint_dir,
    })
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            // Rejections are printed by the event subscriber below; RUST_LOG=info shows more.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,fedcore::server=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate(args) => {
            println!(
                "fedcore hospital simulation: {} hospitals, {} rounds, {:?} aggregation, seed {}.\n\
                 Model: softmax regression on seeded synthetic data (the DenseNet-121 chest \
                 X-ray model, HE, DP and the dashboard are not part of this build yet).",
                args.clients, args.rounds, args.aggregator, args.seed
            );
            let s = simulate(&args)?;
            println!(
                "done: {} rounds; held-out loss {:.4} -> {:.4}, accuracy {:.3} -> {:.3}; \
                 {} rejected update(s); checkpoints in {}",
                s.rounds,
                s.initial.loss,
                s.last.loss,
                s.initial
                    .metrics
                    .get("accuracy")
                    .copied()
                    .unwrap_or(f64::NAN),
                s.last.metrics.get("accuracy").copied().unwrap_or(f64::NAN),
                s.rejected,
                s.checkpoint_dir.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &std::path::Path) -> SimulateArgs {
        let cli = Cli::parse_from([
            "hospital",
            "simulate",
            "--rounds",
            "4",
            "--clients",
            "4",
            "--examples",
            "150",
            "--quiet",
            "--checkpoint-dir",
            dir.to_str().unwrap(),
        ]);
        match cli.command {
            Command::Simulate(a) => a,
        }
    }

    #[test]
    fn simulation_learns_survives_faults_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.nan_client = Some(0);
        a.drop_client = Some(1);
        let s = simulate(&a).unwrap();
        assert_eq!(s.rounds, 4);
        assert_eq!(s.rejected, 8, "two faulty hospitals, four rounds");
        assert!(s.last.loss < 0.7 * s.initial.loss, "{s:?}");

        // Two more rounds on top of the checkpoint.
        a.resume = true;
        a.rounds = 6;
        let s = simulate(&a).unwrap();
        assert_eq!(s.rounds, 6);
        // Starting over in the same directory is refused rather than overwriting.
        a.resume = false;
        assert!(simulate(&a).is_err());
    }

    #[test]
    fn every_aggregator_choice_runs() {
        for choice in AggregatorChoice::value_variants() {
            let dir = tempfile::tempdir().unwrap();
            let mut a = args(dir.path());
            a.aggregator = *choice;
            a.clients = 5;
            a.rounds = 3;
            let s = simulate(&a).unwrap();
            assert!(s.last.loss < s.initial.loss, "{choice:?}: {s:?}");
        }
    }
}
