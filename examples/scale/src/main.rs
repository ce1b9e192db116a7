//! Thousands of virtual MNIST clients on one machine.
//!
//! `--clients` clients share the 60,000 MNIST training images equally
//! (6 each for 10,000 clients), each with its own digit mix drawn from a
//! Dirichlet(`--alpha`) ([`dirichlet_label_split`]); each round the server samples
//! `--per-round` of them and each trains the compact CNN (26,010
//! parameters) on its share. With `--transport pool` (the default) only the
//! sampled clients exist: a [`ClientPool`] of `--workers` threads builds
//! each from its id when its task comes and drops it when the next round
//! starts; `--transport threads` keeps every client alive on its own thread
//! (the [`InMemoryTransport`]), for comparison. Prints each round's time,
//! the test accuracy every `--eval-every` rounds, the peak resident memory
//! and a digest of the final model (equal digests: equal models).
//!
//! ```text
//! /usr/bin/time -v cargo run --release -p scale -- --clients 10000 --per-round 100 --rounds 20
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use fedcore::data::mnist::MnistSplit;
use fedcore::data::{DataSplit, ImageDataset, Mnist, dirichlet_label_split};
use fedcore::memory::InMemoryTransport;
use fedcore::models::{Device, SmallCnn, TchModel};
use fedcore::pool::{ClientPool, ModelClients};
use fedcore::{
    ClientId, FedAvg, Model, ModelClient, Optimizer, Server, ServerConfig, TrainConfig, Transport,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    /// Virtual clients: only the sampled ones exist (fedcore::pool).
    Pool,
    /// One thread and one live client per id (fedcore::memory).
    Threads,
}

#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Folder with the MNIST IDX files (gz or raw).
    #[arg(long, default_value = "../shared/data/mnist")]
    data: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Clients sampled (and trained) per round.
    #[arg(long, default_value_t = 100)]
    per_round: usize,
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Dirichlet concentration of the digit split.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    /// The split, the initial model and the sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = Kind::Pool)]
    transport: Kind,
    /// Clients that train at once (the pool's threads; default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Local SGD.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Evaluate the global model on the 10,000 test images every N rounds
    /// (and after the last), outside the rounds' time.
    #[arg(long, default_value_t = 5)]
    eval_every: u64,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Report {
    transport: Kind,
    clients: usize,
    per_round: usize,
    workers: usize,
    rounds: u64,
    /// Seconds per round (sampling, training, aggregation).
    round_seconds: Vec<f64>,
    /// Of those, seconds spent building clients (summed over the workers,
    /// which build at once: an upper bound on the wall time it took).
    build_seconds: Vec<f64>,
    /// (round, test accuracy).
    accuracy: Vec<(u64, f64)>,
    /// Peak resident memory of the process (VmHWM), bytes.
    peak_rss_bytes: u64,
    /// Seconds to set up (load MNIST, split, build the transport).
    setup_seconds: f64,
    /// FNV-1a over the final model's f32 bits.
    digest: String,
}

fn model(seed: u64) -> fedcore::Result<TchModel<SmallCnn>> {
    TchModel::build(Device::Cpu, seed, |b| SmallCnn::compact(b, 1, 28, 10))
}

/// The process's peak resident memory (VmHWM), in bytes.
fn peak_rss() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

fn digest(p: &fedcore::Parameters) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in p.as_slice() {
        for b in v.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.clients == 0 || args.per_round == 0 || args.per_round > args.clients {
        bail!("need 1 <= --per-round <= --clients");
    }
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    // The clients train at once on the workers: one libtorch thread each.
    tch::set_num_threads(1);
    let setup = Instant::now();
    let train = Mnist::load(&args.data, MnistSplit::Train)
        .with_context(|| format!("MNIST in {}", args.data.display()))?;
    let labels: Vec<usize> = train.labels().iter().map(|&l| usize::from(l)).collect();
    let train: Arc<dyn ImageDataset> = Arc::new(train);
    let test = Mnist::load(&args.data, MnistSplit::Test)?;
    let test = DataSplit::subset(Arc::new(test), (0..10_000).collect())?;
    let per_client = labels.len() / args.clients;
    let shares = Arc::new(
        dirichlet_label_split(&labels, args.clients, per_client, args.alpha, args.seed)?.hospitals,
    );
    let ids: Vec<ClientId> = (0..args.clients)
        .map(|i| ClientId::from(format!("c{i:05}")))
        .collect();
    let seed = args.seed;
    let building = Arc::new(AtomicU64::new(0));
    // Builds client `c01234` from its id: its share of the images and a
    // model (whose weights the global model overwrites in every task).
    let build = {
        let (train, shares, building) = (train.clone(), shares.clone(), building.clone());
        move |id: &ClientId| -> fedcore::Result<ModelClient<TchModel<SmallCnn>>> {
            let started = Instant::now();
            let _time = Defer(|| {
                building.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            });
            let i: usize = id.as_str()[1..]
                .parse()
                .map_err(|_| fedcore::Error::InvalidInput(format!("no client `{id}`")))?;
            let share = shares
                .get(i)
                .ok_or_else(|| fedcore::Error::InvalidInput(format!("no client `{id}`")))?;
            let data = DataSplit::subset(train.clone(), share.clone())?;
            Ok(ModelClient::new(id.clone(), model(seed)?, data))
        }
    };
    let config = ServerConfig {
        rounds: args.rounds,
        fraction_fit: args.per_round as f64 / args.clients as f64,
        min_fit_clients: args.per_round,
        min_available_clients: args.clients,
        fraction_evaluate: 0.0,
        seed,
        train: TrainConfig {
            epochs: args.epochs,
            batch_size: args.batch_size,
            learning_rate: args.lr,
            optimizer: Optimizer::Sgd { momentum: 0.0 },
            ..TrainConfig::default()
        },
        ..ServerConfig::default()
    };
    let initial = model(seed)?.parameters();
    let report = match args.transport {
        Kind::Pool => {
            let pool = ClientPool::new(ModelClients::new(build), ids, workers)?;
            run(
                &args, workers, config, initial, pool, &test, setup, &building,
            )?
        }
        Kind::Threads => {
            let mut t = InMemoryTransport::new();
            for id in &ids {
                t.add_client(build(id)?)?;
            }
            building.store(0, Ordering::Relaxed);
            run(
                &args,
                args.clients,
                config,
                initial,
                t,
                &test,
                setup,
                &building,
            )?
        }
    };
    let mean = report.round_seconds.iter().sum::<f64>() / report.round_seconds.len() as f64;
    let building = report.build_seconds.iter().sum::<f64>() / report.build_seconds.len() as f64;
    println!(
        "{:?}: {} clients, {} per round, {} workers: {:.3} s per round (mean of {}; building clients {:.3} s of \
         worker time), peak RSS {:.0} MiB, set-up {:.1} s, final accuracy {:.2} %, digest {}",
        report.transport,
        report.clients,
        report.per_round,
        report.workers,
        mean,
        report.round_seconds.len(),
        building,
        report.peak_rss_bytes as f64 / (1 << 20) as f64,
        report.setup_seconds,
        report.accuracy.last().map_or(f64::NAN, |a| a.1 * 100.0),
        report.digest
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Runs its closure when dropped.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

#[allow(clippy::too_many_arguments)]
fn run<T: Transport>(
    args: &Args,
    workers: usize,
    config: ServerConfig,
    initial: fedcore::Parameters,
    transport: T,
    test: &DataSplit,
    setup: Instant,
    building: &AtomicU64,
) -> Result<Report> {
    let mut server = Server::new(config, initial, transport, FedAvg)?;
    let setup_seconds = setup.elapsed().as_secs_f64();
    let mut eval = model(args.seed)?;
    let mut accuracy = Vec::new();
    let mut round_seconds = Vec::new();
    let mut build_seconds = Vec::new();
    for round in 1..=args.rounds {
        let t = Instant::now();
        let built = building.load(Ordering::Relaxed);
        let record = server.run_round()?;
        build_seconds.push((building.load(Ordering::Relaxed) - built) as f64 * 1e-9);
        if !record.outcome.is_completed() {
            bail!("round {round} failed: {:?}", record.outcome);
        }
        let accepted = record.accepted.len();
        round_seconds.push(t.elapsed().as_secs_f64());
        let evaluated = if round % args.eval_every.max(1) == 0 || round == args.rounds {
            eval.set_parameters(server.global())?;
            let acc = eval
                .evaluate(test)?
                .metrics
                .get("accuracy")
                .copied()
                .context("no accuracy")?;
            accuracy.push((round, acc));
            format!(", test accuracy {:.2} %", acc * 100.0)
        } else {
            String::new()
        };
        println!(
            "round {round:>3}: {accepted} updates in {:.3} s (building clients {:.3} s), peak RSS {:.0} MiB{evaluated}",
            round_seconds.last().copied().unwrap_or_default(),
            build_seconds.last().copied().unwrap_or_default(),
            peak_rss()? as f64 / (1 << 20) as f64
        );
    }
    Ok(Report {
        transport: args.transport,
        clients: args.clients,
        per_round: args.per_round,
        workers,
        rounds: args.rounds,
        round_seconds,
        build_seconds,
        accuracy,
        peak_rss_bytes: peak_rss()?,
        setup_seconds,
        digest: digest(server.global()),
    })
}
