//! Federated optimization on non-IID MNIST.
//!
//! `--clients` hospitals split the first `--train-images` MNIST training
//! images by a Dirichlet(`--alpha`) draw over digits (each seed its own
//! split). For every strategy and seed the server trains the compact CNN
//! (26,010 parameters) with the same local SGD; the test accuracy after each
//! round gives the rounds to each of `--targets` and the final accuracy, as mean and
//! spread over the seeds, in a markdown table and a plot of the mean curves.
//!
//! ```text
//! cargo run --release -p fedopt -- --clients 10 --alpha 0.1 --seeds 0,1,2 --out docs/fedopt
//! ```
//!
//! Strategies: `fedavg`; `fedavgm` (server momentum 0.9); `fedadam`,
//! `fedyogi` (Reddi et al. 2021, server rate `--adaptive-lr`); `fedprox`
//! (proximal term `--mu`); `scaffold` (control variates, FedAvg inside).
//!
//! With `--aggregator` a robust rule replaces the mean inside every
//! strategy (the server optimizers step by its aggregate), and with
//! `--byzantine` the first clients attack (`--attack`, as in the
//! `byzantine` example): a robust rule under attack with and without
//! server momentum is
//!
//! ```text
//! cargo run --release -p fedopt -- --aggregator geometric-median --byzantine 0.2 \
//!     --attack sign-flip --strategies fedavg,fedavgm
//! ```

#[path = "../../common/report.rs"]
mod report;
#[path = "../../common/robust.rs"]
mod robust;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use fedcore::data::LabelFlip;
use fedcore::data::mnist::MnistSplit;
use fedcore::data::{DataSplit, ImageDataset, Mnist, PartitionConfig, dirichlet_partition};
use fedcore::memory::InMemoryTransport;
use fedcore::models::{Device, SmallCnn, TchModel};
use fedcore::{
    Aggregator, ControlVariate, Model, ModelClient, Optimizer, Scaffold, Server, ServerConfig,
    ServerOpt, Strategy, TrainConfig,
};
use fedcore_robust::attacks::Byzantine;

#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Folder with the MNIST IDX files (gz or raw).
    #[arg(long, default_value = "../shared/data/mnist")]
    data: PathBuf,
    /// Where fedopt-<clients>-<alpha>.{md,json,png} go.
    #[arg(long, default_value = "docs/fedopt")]
    out: PathBuf,
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Share of the clients sampled each round.
    #[arg(long, default_value_t = 1.0)]
    fraction: f64,
    /// Dirichlet concentration of the digit split (0.1: most clients see
    /// one or two digits).
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    #[arg(long, default_value_t = 20)]
    rounds: u64,
    /// Seeds (each one: the split, the initial model, the sampling).
    #[arg(long, value_delimiter = ',', default_value = "0,1,2")]
    seeds: Vec<u64>,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fedavg,fedavgm,fedadam,fedyogi,fedprox,scaffold"
    )]
    strategies: Vec<String>,
    /// Test accuracies whose first round the table reports.
    #[arg(long, value_delimiter = ',', default_value = "0.95,0.97")]
    targets: Vec<f64>,
    /// Training images used (the first N of the 60 000).
    #[arg(long, default_value_t = 60_000)]
    train_images: usize,
    /// Test images evaluated after every round (the first N of the 10 000).
    #[arg(long, default_value_t = 10_000)]
    test_images: usize,
    /// Local SGD (no momentum, as SCAFFOLD's analysis assumes).
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// FedProx's mu.
    #[arg(long, default_value_t = 0.01)]
    mu: f64,
    /// FedAvgM's server learning rate (momentum 0.9).
    #[arg(long, default_value_t = 0.5)]
    momentum_lr: f32,
    /// FedAdam's and FedYogi's server learning rate.
    #[arg(long, default_value_t = 0.01)]
    adaptive_lr: f32,
    /// Also evaluate, at the end of each strategy's first seed, the global
    /// model and every client's local model on every client's held-out
    /// data (cross-site evaluation; in those runs each client holds out the
    /// last tenth of its share from training); the matrices go into the
    /// markdown.
    #[arg(long)]
    cross_site: bool,
    /// The rule inside every strategy: fedavg, or a robust one (median,
    /// trimmed-mean, krum, bulyan, centered-clipping, geometric-median);
    /// the server optimizers step by its aggregate.
    #[arg(long, default_value = "fedavg")]
    aggregator: String,
    /// Share of the clients that attack (the first ones: h000, h001, ...).
    #[arg(long, default_value_t = 0.0)]
    byzantine: f64,
    /// What they do: sign-flip (x4), gaussian, scaling, alie, ipm (on the
    /// update) or label-flip (on the data), as in the byzantine example.
    #[arg(long, default_value = "sign-flip")]
    attack: String,
    /// How the clients encode their updates for the upload: f32 (as they
    /// are), f16, bf16, int8 or top-k:F (a fraction F of each tensor), the
    /// lossy ones with error feedback; the table then reports the bytes.
    #[arg(long, default_value = "f32")]
    upload: fedcore::Encoding,
    /// Redraw the PNG (in --out, named as the JSON) from a JSON written by an earlier run.
    #[arg(long)]
    plot_only: Option<PathBuf>,
}

impl Args {
    /// How many clients attack (none with `--attack none`).
    fn attackers(&self) -> usize {
        if self.attack == "none" {
            return 0;
        }
        (self.clients as f64 * self.byzantine).round() as usize
    }

    /// The files' name: `fedopt-<clients>-<alpha>`, then the rule when it
    /// is not FedAvg and the attack when there is one.
    fn stem(&self) -> String {
        let mut stem = format!("fedopt-{}-{}", self.clients, self.alpha);
        if self.aggregator != "fedavg" {
            stem += &format!("-{}", self.aggregator);
        }
        if self.attackers() > 0 {
            stem += &format!("-{}-{}", self.attack, self.byzantine);
        }
        if !self.upload.is_lossless() {
            stem += &format!("-{}", self.upload.to_string().replace(':', "-"));
        }
        stem
    }

    /// A strategy's name in the table: with a robust rule inside, the rule
    /// and what the server does with its aggregate.
    fn label(&self, strategy: &str) -> String {
        if self.aggregator == "fedavg" {
            return strategy.to_owned();
        }
        let server = match strategy {
            "fedavg" => return self.aggregator.clone(),
            "fedavgm" => "server momentum",
            "fedadam" => "server Adam",
            "fedyogi" => "server Yogi",
            "fedprox" => "FedProx",
            "scaffold" => "SCAFFOLD",
            other => other,
        };
        format!("{} + {server}", self.aggregator)
    }
}

/// Per strategy, per seed, the test accuracy after each round (round 0:
/// the initial model).
#[derive(serde::Serialize, serde::Deserialize)]
struct Results {
    title: String,
    targets: Vec<f64>,
    strategies: Vec<String>,
    seeds: Vec<u64>,
    accuracy: Vec<Vec<Vec<f64>>>,
    /// Per strategy, the cross-site matrix of its first seed (`--cross-site`).
    #[serde(default)]
    cross_site: Vec<Option<fedcore::CrossSiteEvaluation>>,
    /// Per strategy, the mean bytes of an accepted update's upload over its
    /// seeds' rounds (values in the upload encoding plus SCAFFOLD's variate).
    #[serde(default)]
    upload_bytes: Vec<f64>,
}

/// One run: the accuracy before and after each round, the cross-site
/// matrix, the mean upload bytes of an accepted update.
type Run = (Vec<f64>, Option<fedcore::CrossSiteEvaluation>, f64);

fn model(seed: u64) -> Result<TchModel<SmallCnn>> {
    Ok(TchModel::build(Device::Cpu, seed, |b| {
        SmallCnn::compact(b, 1, 28, 10)
    })?)
}

fn run_one(
    args: &Args,
    strategy: &str,
    seed: u64,
    (train, labels): (&Arc<dyn ImageDataset>, &[usize]),
    test: &DataSplit,
    cross_site: bool,
) -> Result<Run> {
    let n = args.train_images.min(train.len());
    let profiles = &labels[..n];
    let groups: Vec<u64> = (0..n as u64).collect();
    let partition = dirichlet_partition(
        &groups,
        profiles,
        &PartitionConfig {
            hospitals: args.clients,
            alpha: args.alpha,
            seed,
            min_items: 16,
        },
    )?;
    let scaffold = strategy == "scaffold";
    let attackers = args.attackers();
    let attack = robust::attack(&args.attack)?;
    if attackers > 0 && scaffold && attack.is_some() {
        bail!("scaffold with an attack on the update: the attack wrapper has no control variate");
    }
    let flipped: Arc<dyn ImageDataset> = Arc::new(LabelFlip::new(train.clone(), 10));
    let mut transport = InMemoryTransport::new();
    for (i, part) in partition.hospitals.iter().enumerate() {
        let id = format!("h{i:03}");
        let attacker = i < attackers;
        let source = if attacker && args.attack == "label-flip" {
            &flipped
        } else {
            train
        };
        // Cross-site runs hold out the last tenth of each share.
        let (own, held) = if cross_site {
            let held_out = (part.len() / 10).max(1);
            let (own, held) = part.split_at(part.len() - held_out);
            (own, Some(DataSplit::subset(train.clone(), held.to_vec())?))
        } else {
            (&part[..], None)
        };
        let data = DataSplit::subset(source.clone(), own.to_vec())?;
        match (attacker, &attack) {
            (true, Some(a)) => {
                let model = Byzantine::new(model(seed)?, *a)?;
                add(
                    &mut transport,
                    ModelClient::new(id, model, data),
                    held,
                    scaffold,
                )?
            }
            _ => add(
                &mut transport,
                ModelClient::new(id, model(seed)?, data),
                held,
                scaffold,
            )?,
        }
    }
    let sampled = ((args.clients as f64 * args.fraction).ceil() as usize).clamp(1, args.clients);
    let mut config = ServerConfig {
        rounds: args.rounds,
        fraction_fit: args.fraction,
        min_fit_clients: sampled,
        min_available_clients: args.clients,
        seed,
        train: TrainConfig {
            epochs: args.epochs,
            batch_size: args.batch_size,
            learning_rate: args.lr,
            optimizer: Optimizer::Sgd { momentum: 0.0 },
            upload: args.upload,
            ..TrainConfig::default()
        },
        cross_site_evaluation: cross_site,
        ..ServerConfig::default()
    };
    configure(args, strategy, &mut config)?;
    let initial = model(seed)?.parameters();
    let rule = robust::aggregator(&args.aggregator, args.clients, attackers)?;
    if rule.min_updates() > sampled {
        bail!(
            "`{}` needs {} updates a round and --fraction samples {sampled}",
            args.aggregator,
            rule.min_updates()
        );
    }
    if scaffold {
        let strategy = Scaffold::new(rule, initial.layout().clone(), args.clients)?;
        curve(
            Server::new(config, initial, transport, strategy)?,
            seed,
            test,
        )
    } else {
        curve(Server::new(config, initial, transport, rule)?, seed, test)
    }
}

/// Adds a client, with its held-out data (cross-site runs) and a control
/// variate (SCAFFOLD).
fn add<M: Model + 'static>(
    transport: &mut InMemoryTransport,
    client: ModelClient<M>,
    held: Option<M::Data>,
    scaffold: bool,
) -> Result<()>
where
    M::Data: Sized + Send,
{
    let client = match held {
        Some(held) => client.with_test_data(held),
        None => client,
    };
    let client = if scaffold {
        client.with_control_variate(ControlVariate::new())
    } else {
        client
    };
    Ok(transport.add_client(client)?)
}

/// The server and training settings of `strategy`.
fn configure(args: &Args, strategy: &str, config: &mut ServerConfig) -> Result<()> {
    match strategy {
        "fedavg" | "scaffold" => {}
        "fedavgm" => {
            config.server_opt = ServerOpt::momentum();
            config.server_learning_rate = args.momentum_lr;
        }
        "fedadam" => {
            config.server_opt = ServerOpt::adam();
            config.server_learning_rate = args.adaptive_lr;
        }
        "fedyogi" => {
            config.server_opt = ServerOpt::yogi();
            config.server_learning_rate = args.adaptive_lr;
        }
        "fedprox" => config.train.proximal_mu = args.mu,
        other => bail!("unknown strategy `{other}`"),
    }
    Ok(())
}

/// Runs `server`, evaluating the global model on `test` before and after
/// every round.
fn curve<S: Strategy>(
    mut server: Server<InMemoryTransport, S>,
    seed: u64,
    test: &DataSplit,
) -> Result<Run> {
    let mut eval = model(seed)?;
    eval.set_parameters(server.global())?;
    let accuracy = |e: fedcore::Evaluation| e.metrics.get("accuracy").copied();
    let mut out = vec![accuracy(eval.evaluate(test)?).context("no accuracy")?];
    let test = test.clone();
    server.set_evaluator(move |p| {
        eval.set_parameters(p)?;
        eval.evaluate(&test)
    });
    let report = server.run()?;
    let sent: Vec<f64> = server
        .history()
        .iter()
        .flat_map(|r| &r.accepted)
        .map(|a| a.upload_bytes as f64)
        .collect();
    let bytes = sent.iter().sum::<f64>() / sent.len().max(1) as f64;
    for r in server.history() {
        // A failed round leaves the model (and its accuracy) as it was.
        let last = *out.last().expect("round 0 is there");
        out.push(r.evaluation.clone().and_then(accuracy).unwrap_or(last));
    }
    Ok((out, report.cross_site, bytes))
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// What the header says about a robust rule and the attackers.
fn rule_and_attack(args: &Args) -> String {
    let mut s = String::new();
    if args.aggregator != "fedavg" {
        let _ = write!(
            s,
            " Every strategy aggregates by the {} of the updates instead of their mean \
             (`{}`: the server steps by it with lr 1; `+ server momentum`: FedAvgM's step).",
            args.aggregator, args.aggregator
        );
    }
    let k = args.attackers();
    if k > 0 {
        let what = match args.attack.as_str() {
            "sign-flip" => "send their honest update flipped and scaled by 4",
            "label-flip" => "train on labels d -> 9 - d",
            _ => "attack as in the byzantine example",
        };
        let _ = write!(
            s,
            " {k} of {} clients (h000..h{:03}) are Byzantine and {what} (`{}`) every round.",
            args.clients,
            k - 1,
            args.attack
        );
    }
    if !args.upload.is_lossless() {
        let _ = write!(
            s,
            " Clients upload their updates in `{}` with error feedback (the last column: \
             the mean bytes of an accepted update, float32 being 4 per value).",
            args.upload
        );
    }
    s
}

fn markdown(args: &Args, r: &Results, seconds: f64) -> String {
    let rounds = r.accuracy[0][0].len() - 1;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## {}\n\nRounds to each target test accuracy and test accuracy after {rounds} rounds, mean ± \
         sample standard deviation over seeds {:?} (each seed draws its own split, initial model \
         and sampling); a run that never reached the target counts as `>{rounds}` and the mean \
         is over the runs that did (their number in brackets). Local training: {} epoch of SGD \
         (lr {}, batch {}, no momentum) on the compact CNN; FedAvgM: momentum 0.9, server lr {}; \
         FedAdam/FedYogi: server lr {}, tau 1e-3; FedProx: mu = {}; SCAFFOLD: option II control \
         variates, {} inside.{} {:.0} s on the 2-core VM.\n\n```sh\ncargo run --release -p fedopt -- {}\n```\n",
        r.title,
        r.seeds,
        args.epochs,
        args.lr,
        args.batch_size,
        args.momentum_lr,
        args.adaptive_lr,
        args.mu,
        args.aggregator,
        rule_and_attack(args),
        seconds,
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let _ = write!(s, "| strategy |");
    for t in &r.targets {
        let _ = write!(s, " rounds to {} % |", (t * 1000.0).round() / 10.0);
    }
    let bytes = !args.upload.is_lossless();
    let _ = write!(s, " accuracy after {rounds} rounds (%) |");
    let _ = writeln!(s, "{}", if bytes { " upload bytes |" } else { "" });
    let _ = writeln!(
        s,
        "|---|{}---:|",
        "---:|".repeat(r.targets.len() + usize::from(bytes))
    );
    for (i, (name, runs)) in r.strategies.iter().zip(&r.accuracy).enumerate() {
        let _ = write!(s, "| {name} |");
        for &target in &r.targets {
            let reached: Vec<f64> = runs
                .iter()
                .filter_map(|c| c.iter().position(|&a| a >= target).map(|p| p as f64))
                .collect();
            let to_target = if reached.is_empty() {
                format!(">{rounds}")
            } else {
                let (m, sd) = mean_std(&reached);
                format!("{m:.1} ± {sd:.1} [{}/{}]", reached.len(), runs.len())
            };
            let _ = write!(s, " {to_target} |");
        }
        let finals: Vec<f64> = runs.iter().map(|c| c[rounds] * 100.0).collect();
        let (m, sd) = mean_std(&finals);
        let _ = write!(s, " {m:.2} ± {sd:.2} |");
        match r.upload_bytes.get(i) {
            Some(b) if bytes => {
                let _ = writeln!(s, " {b:.0} |");
            }
            _ => {
                let _ = writeln!(s);
            }
        }
    }
    for (name, matrix) in r.strategies.iter().zip(&r.cross_site) {
        if let Some(m) = matrix {
            let _ = writeln!(
                s,
                "\n### Cross-site accuracy (%) after round {}: `{name}`, seed {}\n\nRows: the global \
                 model and each client's local model (the global model its last update started \
                 from plus that update); columns: each client's held-out tenth of its share.\n\n{}",
                m.round,
                r.seeds[0],
                m.to_markdown("accuracy", 100.0, 1)
            );
        }
    }
    s
}

fn plot(path: &Path, r: &Results) -> Result<()> {
    use plotters::prelude::*;
    report::register_font()?;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let rounds = r.accuracy[0][0].len() - 1;
    let mean_curve = |runs: &Vec<Vec<f64>>| -> Vec<(f64, f64)> {
        (0..=rounds)
            .map(|k| {
                let v: Vec<f64> = runs.iter().map(|c| c[k] * 100.0).collect();
                (k as f64, mean_std(&v).0)
            })
            .collect()
    };
    let lowest = r
        .accuracy
        .iter()
        .flat_map(|runs| mean_curve(runs).into_iter().skip(1).map(|p| p.1))
        .fold(100.0f64, f64::min);
    let bottom = (lowest - 5.0).clamp(0.0, 90.0).floor();
    let mut chart = ChartBuilder::on(&root)
        .caption(&r.title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..rounds as f64, bottom..100f64)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("test accuracy (%), mean over seeds")
        .draw()?;
    for t in &r.targets {
        let target = t * 100.0;
        chart.draw_series(LineSeries::new(
            [(0.0, target), (rounds as f64, target)],
            BLACK.mix(0.3).stroke_width(1),
        ))?;
    }
    for (i, (name, runs)) in r.strategies.iter().zip(&r.accuracy).enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(mean_curve(runs), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let stem = args.stem();
    if let Some(json) = &args.plot_only {
        return report::redraw(&args.out, json, plot);
    }
    if args.seeds.is_empty() || args.rounds == 0 {
        bail!("need at least one seed and one round");
    }
    // The clients train at once on the worker threads: one libtorch thread each.
    tch::set_num_threads(1);
    let train = Mnist::load(&args.data, MnistSplit::Train)
        .with_context(|| format!("MNIST in {}", args.data.display()))?;
    let labels: Vec<usize> = train.labels().iter().map(|&l| usize::from(l)).collect();
    let train: Arc<dyn ImageDataset> = Arc::new(train);
    let test = Mnist::load(&args.data, MnistSplit::Test)?;
    let test = DataSplit::subset(Arc::new(test), (0..args.test_images.min(10_000)).collect())?;
    let start = Instant::now();
    let mut results = Results {
        title: format!(
            "MNIST, {} clients ({} sampled per round), Dirichlet({}){}",
            args.clients,
            ((args.clients as f64 * args.fraction).ceil() as usize).clamp(1, args.clients),
            args.alpha,
            match args.attackers() {
                0 => String::new(),
                k => format!(", {k} Byzantine ({})", args.attack),
            }
        ),
        targets: args.targets.clone(),
        strategies: args.strategies.iter().map(|s| args.label(s)).collect(),
        seeds: args.seeds.clone(),
        accuracy: Vec::new(),
        cross_site: Vec::new(),
        upload_bytes: Vec::new(),
    };
    for strategy in &args.strategies {
        let mut runs = Vec::new();
        let mut matrix = None;
        let mut bytes = Vec::new();
        for &seed in &args.seeds {
            let t = Instant::now();
            let first = seed == args.seeds[0];
            let (c, m, b) = run_one(
                &args,
                strategy,
                seed,
                (&train, &labels),
                &test,
                args.cross_site && first,
            )?;
            if first {
                matrix = m;
            }
            bytes.push(b);
            println!(
                "{strategy:>9} seed {seed}: {:5.2} % after {} rounds ({:.0} s)",
                c.last().copied().unwrap_or_default() * 100.0,
                c.len() - 1,
                t.elapsed().as_secs_f64()
            );
            runs.push(c);
        }
        results.accuracy.push(runs);
        results.cross_site.push(matrix);
        results.upload_bytes.push(mean_std(&bytes).0);
    }
    let md = markdown(&args, &results, start.elapsed().as_secs_f64());
    report::write(&args.out, &stem, &md, &results, plot)?;
    print!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_counts_rounds_to_target_and_spread_over_seeds() {
        let args = Args::parse_from(["fedopt", "--rounds", "3"]);
        let r = Results {
            title: "t".into(),
            targets: vec![0.9, 0.99],
            strategies: vec!["fedavg".into(), "scaffold".into()],
            seeds: vec![0, 1],
            accuracy: vec![
                vec![vec![0.1, 0.5, 0.92, 0.95], vec![0.1, 0.91, 0.93, 0.97]],
                vec![vec![0.1, 0.2, 0.3, 0.4], vec![0.1, 0.2, 0.3, 0.6]],
            ],
            cross_site: Vec::new(),
            upload_bytes: vec![104040.0, 208080.0],
        };
        let md = markdown(&args, &r, 1.0);
        assert!(
            md.contains("| fedavg | 1.5 ± 0.7 [2/2] | >3 | 96.00 ± 1.41 |"),
            "{md}"
        );
        assert!(
            md.contains("| scaffold | >3 | >3 | 50.00 ± 14.14 |"),
            "{md}"
        );
        assert!(
            md.contains("| strategy | rounds to 90 % | rounds to 99 % |"),
            "{md}"
        );
        // With a lossy upload the table gains the bytes.
        let args = Args::parse_from(["fedopt", "--rounds", "3", "--upload", "top-k:0.1"]);
        assert_eq!(args.stem(), "fedopt-10-0.5-top-k-0.1");
        let md = markdown(&args, &r, 1.0);
        assert!(
            md.contains("| scaffold | >3 | >3 | 50.00 ± 14.14 | 208080 |"),
            "{md}"
        );
        assert!(md.contains("`top-k:0.1` with error feedback"), "{md}");
        assert!(Args::try_parse_from(["fedopt", "--upload", "top-k:2"]).is_err());
    }

    #[test]
    fn every_strategy_configures_and_an_unknown_one_is_refused() {
        let args = Args::parse_from(["fedopt", "--mu", "0.5"]);
        for s in &args.strategies {
            let mut c = ServerConfig::default();
            configure(&args, s, &mut c).unwrap();
            assert_eq!(c.train.proximal_mu > 0.0, s == "fedprox", "{s}");
            assert_eq!(
                c.server_opt != ServerOpt::Sgd,
                s.starts_with("fed") && !["fedavg", "fedprox"].contains(&s.as_str()),
                "{s}"
            );
        }
        let err = configure(&args, "fedsgd", &mut ServerConfig::default()).unwrap_err();
        assert!(err.to_string().contains("unknown strategy"), "{err}");
    }

    #[test]
    fn a_robust_rule_under_attack_names_its_files_rows_and_attackers() {
        let plain = Args::parse_from(["fedopt", "--clients", "10", "--alpha", "0.5"]);
        assert_eq!(plain.stem(), "fedopt-10-0.5");
        assert_eq!(plain.label("fedavgm"), "fedavgm");
        assert_eq!(rule_and_attack(&plain), "");
        let args = Args::parse_from([
            "fedopt",
            "--aggregator",
            "geometric-median",
            "--byzantine",
            "0.2",
            "--attack",
            "sign-flip",
        ]);
        assert_eq!(args.attackers(), 2);
        assert_eq!(args.stem(), "fedopt-10-0.5-geometric-median-sign-flip-0.2");
        assert_eq!(args.label("fedavg"), "geometric-median");
        assert_eq!(args.label("fedavgm"), "geometric-median + server momentum");
        let text = rule_and_attack(&args);
        assert!(text.contains("2 of 10 clients (h000..h001)"), "{text}");
        assert!(text.contains("geometric-median of the updates"), "{text}");
        assert!(robust::aggregator(&args.aggregator, 10, 2).is_ok());
        assert!(robust::attack("sign-flip").unwrap().is_some());
        assert!(robust::attack("nope").is_err());
        let none = Args::parse_from(["fedopt", "--byzantine", "0.2", "--attack", "none"]);
        assert_eq!(
            (none.attackers(), none.stem().as_str()),
            (0, "fedopt-10-0.5")
        );
    }
}
