//! Byzantine-robust federated MNIST.
//!
//! Ten hospitals (clients) split MNIST by Dirichlet(0.5) over digits; 30 % of
//! them are Byzantine. For every attack (and a clean baseline) and every
//! aggregator, the server trains the small CNN for a few rounds; the final
//! test accuracy goes into a markdown table and a grouped bar chart.
//!
//! ```text
//! cargo run --release -p byzantine -- --data ../shared/data/mnist --out docs
//! ```
//!
//! With `--encrypt all` every hospital uploads its whole update encrypted
//! with CKKS (`fedcore-he`): FedAvg becomes the encrypted weighted sum and
//! the geometric median the encrypted geometric median
//! (`fedcore_he::EncryptedMedian`); the server holds no secret key, and the
//! final global model is decrypted by a key holder for the test set. The
//! results go to `byzantine-encrypted.{md,json,png}`.
//!
//! ```text
//! cargo run --release -p byzantine -- --encrypt all --attacks none,sign-flip,scaling \
//!     --aggregators fedavg,geometric-median --out docs
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
use clap::{Parser, ValueEnum};
use fedcore::data::mnist::MnistSplit;
use fedcore::data::{
    DataSplit, ImageDataset, LabelFlip, Mnist, PartitionConfig, dirichlet_partition,
};
use fedcore::memory::InMemoryTransport;
use fedcore::models::{Device, SmallCnn, TchModel};
use fedcore::{
    Aggregator, FedAvg, Model, ModelClient, Optimizer, Parameters, Sealer, Server, ServerConfig,
    Strategy, TrainConfig,
};
use fedcore_he::{
    CkksContext, CkksParams, CkksSealer, CkksSum, DistanceDecryptor, EncryptedMedian, Public,
    Secret,
};
use fedcore_robust::attacks::Byzantine;
use robust::{aggregator, attack};

#[derive(Parser, Debug, Clone)]
#[command(version, about)]
struct Args {
    /// Folder with the MNIST IDX files (gz or raw).
    #[arg(long, default_value = "../shared/data/mnist")]
    data: PathBuf,
    /// What the server makes of the robust aggregate: sgd, momentum
    /// (FedAvgM), adagrad, adam, yogi (the adaptive ones want a
    /// --server-lr around 0.01-0.1).
    #[arg(long, default_value = "sgd")]
    server_opt: fedcore::ServerOpt,
    /// The server's learning rate.
    #[arg(long, default_value_t = 1.0)]
    server_lr: f32,
    /// Where byzantine.md and byzantine.png go.
    #[arg(long, default_value = "docs")]
    out: PathBuf,
    #[arg(long, default_value_t = 10)]
    clients: usize,
    /// Share of Byzantine clients.
    #[arg(long, default_value_t = 0.3)]
    byzantine: f64,
    /// Dirichlet concentration of the digit split.
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// Training images used (the first N of the 60 000), split among clients.
    #[arg(long, default_value_t = 12_000)]
    train_images: usize,
    /// Test images evaluated at the end (the first N of the 10 000).
    #[arg(long, default_value_t = 10_000)]
    test_images: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Attacks to run (none = clean baseline).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "none,sign-flip,gaussian,scaling,alie,ipm,label-flip"
    )]
    attacks: Vec<String>,
    /// Redraw the PNG (in --out, named as the JSON) from a JSON written by an earlier run, without training.
    #[arg(long)]
    plot_only: Option<PathBuf>,
    /// Aggregators to compare.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "fedavg,median,trimmed-mean,krum,geometric-median"
    )]
    aggregators: Vec<String>,
    /// What the hospitals encrypt: nothing, or their whole update (then
    /// only fedavg and geometric-median can run).
    #[arg(long, value_enum, default_value_t = Encrypt::None)]
    encrypt: Encrypt,
}

/// What the hospitals encrypt.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Encrypt {
    /// Updates travel in the clear.
    None,
    /// Whole updates are encrypted with CKKS.
    All,
}

/// The hospitals' key and the server's public context with evaluation keys.
struct Keys {
    secret: CkksContext<Secret>,
    public: CkksContext<Public>,
}

impl Keys {
    fn generate() -> Result<Self> {
        let secret = CkksContext::generate(CkksParams::default())?;
        let public = secret
            .public()
            .with_evaluation_keys(&secret.evaluation_keys()?)?;
        Ok(Self { secret, public })
    }
}

/// Runs `server` and returns the global model, decrypted by a key holder
/// when the run seals it.
fn run_to_end<S: Strategy>(
    mut server: Server<InMemoryTransport, S>,
    keys: Option<&Keys>,
) -> Result<Parameters> {
    server.run()?;
    let global = server.global().clone();
    match (server.sealed_global(), keys) {
        (Some(sealed), Some(k)) => {
            // Everything is sealed, in the layout's order.
            let values = CkksSealer::new(k.secret.clone()).open(sealed)?;
            Ok(global.with_values(values)?)
        }
        _ => Ok(global),
    }
}

/// One run: the final global model's test accuracy.
fn run_one(
    args: &Args,
    keys: Option<&Keys>,
    train: &Arc<dyn ImageDataset>,
    parts: &[Vec<usize>],
    test: &DataSplit,
    attack_name: &str,
    aggregator_name: &str,
) -> Result<f64> {
    let byzantine = (args.clients as f64 * args.byzantine).round() as usize;
    let classes = 10;
    let model = |seed| TchModel::build(Device::Cpu, seed, |b| SmallCnn::build(b, 1, 28, classes));
    let mut transport = InMemoryTransport::new();
    // With encryption every hospital (Byzantine ones too) seals its whole
    // update and answers the distance step.
    fn keyed<M: Model>(c: ModelClient<M>, keys: Option<&Keys>) -> Result<ModelClient<M>>
    where
        M::Data: Sized + Send,
    {
        Ok(match keys {
            Some(k) => c
                .with_sealer(CkksSealer::new(k.secret.clone()))
                .with_responder(DistanceDecryptor::new(k.secret.clone())?),
            None => c,
        })
    }
    for (i, part) in parts.iter().enumerate() {
        let id = format!("h{i:02}");
        let is_byzantine = i < byzantine && attack_name != "none";
        if is_byzantine && attack_name == "label-flip" {
            let flipped: Arc<dyn ImageDataset> = Arc::new(LabelFlip::new(train.clone(), classes));
            let data = DataSplit::subset(flipped, part.clone())?;
            transport.add_client(keyed(ModelClient::new(id, model(args.seed)?, data), keys)?)?;
        } else if let (true, Some(a)) = (is_byzantine, attack(attack_name)?) {
            let data = DataSplit::subset(train.clone(), part.clone())?;
            let model = Byzantine::new(model(args.seed)?, a)?;
            transport.add_client(keyed(ModelClient::new(id, model, data), keys)?)?;
        } else {
            let data = DataSplit::subset(train.clone(), part.clone())?;
            transport.add_client(keyed(ModelClient::new(id, model(args.seed)?, data), keys)?)?;
        }
    }
    let agg = aggregator(aggregator_name, args.clients, byzantine)?;
    let config = ServerConfig {
        rounds: args.rounds,
        min_fit_clients: agg.min_updates().max(args.clients - 1),
        min_available_clients: args.clients,
        seed: args.seed,
        train: TrainConfig {
            epochs: 1,
            batch_size: args.batch_size,
            learning_rate: args.lr,
            optimizer: Optimizer::adam(),
            seed: 0,
            ..TrainConfig::default()
        },
        server_opt: args.server_opt,
        server_learning_rate: args.server_lr,
        ..ServerConfig::default()
    };
    let initial = model(args.seed)?.parameters();
    let global = match keys {
        None => run_to_end(Server::new(config, initial, transport, agg)?, None)?,
        Some(k) => {
            let sum = CkksSum::new(k.public.clone());
            match aggregator_name {
                "fedavg" => run_to_end(
                    Server::new(config, initial, transport, FedAvg)?.with_sealing(&["*"], sum)?,
                    keys,
                )?,
                "geometric-median" => {
                    let strategy = EncryptedMedian::new(k.public.clone())?;
                    let sum = strategy.sealed_sum();
                    run_to_end(
                        Server::new(config, initial, transport, strategy)?
                            .with_sealing(&["*"], sum)?,
                        keys,
                    )?
                }
                other => bail!(
                    "`{other}` cannot run on encrypted updates (fedavg or geometric-median can)"
                ),
            }
        }
    };
    let mut eval = model(args.seed)?;
    eval.set_parameters(&global)?;
    let e = eval.evaluate(test)?;
    e.metrics
        .get("accuracy")
        .copied()
        .context("evaluation without accuracy")
}

/// Final accuracy per attack (rows) and aggregator (columns).
#[derive(serde::Serialize, serde::Deserialize)]
struct Results {
    attacks: Vec<String>,
    aggregators: Vec<String>,
    accuracy: Vec<Vec<f64>>,
}

fn markdown(args: &Args, r: &Results, seconds: f64) -> String {
    let byz = (args.clients as f64 * args.byzantine).round() as usize;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# Byzantine-robust federated MNIST\n\nFinal test accuracy (%) of the global small CNN after {} rounds: {} clients, \
         Dirichlet({}) split of the first {} training images by digit, {byz} Byzantine clients (h00..h{:02}), \
         1 local epoch of Adam (lr {}, batch {}) per round, {} test images, seed {}. Attacks: sign flip x4, \
         Gaussian N(0, 0.3²), scaling x50, ALIE z = 1 (3 local runs), IPM epsilon = 0.5 (2 local runs), label flip \
         (digit d -> 9 - d). Trimmed mean trims beta = {:.1} per side, Krum assumes f = {byz}. {:.0} s in all on the \
         2-core VM.{}\n\n```sh\ncargo run --release -p byzantine -- {}\n```\n",
        args.rounds,
        args.clients,
        args.alpha,
        args.train_images,
        byz.saturating_sub(1),
        args.lr,
        args.batch_size,
        args.test_images,
        args.seed,
        (byz as f64 / args.clients as f64).max(0.1),
        seconds,
        if args.encrypt == Encrypt::All {
            " Every update is encrypted whole with CKKS (degree 8192): fedavg is the encrypted \
             weighted sum, geometric-median the encrypted geometric median (fedcore_he::EncryptedMedian)."
        } else {
            ""
        },
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    );
    let _ = write!(s, "| attack |");
    for a in &r.aggregators {
        let _ = write!(s, " {a} |");
    }
    let _ = write!(s, "\n|---|");
    for _ in &r.aggregators {
        let _ = write!(s, "---:|");
    }
    s.push('\n');
    for (attack, row) in r.attacks.iter().zip(&r.accuracy) {
        let _ = write!(s, "| {attack} |");
        for v in row {
            let _ = write!(s, " {:.1} |", v * 100.0);
        }
        s.push('\n');
    }
    let _ = write!(
        s,
        "\n![final accuracy per attack and aggregator]({}.png)\n",
        stem(args)
    );
    s
}

/// The output files' name: `byzantine`, or `byzantine-encrypted`.
fn stem(args: &Args) -> &'static str {
    match args.encrypt {
        Encrypt::None => "byzantine",
        Encrypt::All => "byzantine-encrypted",
    }
}

fn plot(path: &Path, r: &Results) -> Result<()> {
    use plotters::prelude::*;
    report::register_font()?;
    let root = BitMapBackend::new(path, (1100, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let groups = r.attacks.len();
    let bars = r.aggregators.len();
    let mut chart = ChartBuilder::on(&root)
        .caption("Final MNIST test accuracy under attack", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(-0.5f64..groups as f64 - 0.5, 0f64..140f64)?;
    let names = r.attacks.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups + 1)
        // Group g is centred on x = g: label the integer ticks.
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 1e-6 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            if *y <= 100.0 {
                format!("{y:.0}")
            } else {
                String::new()
            }
        })
        .y_desc("accuracy (%)")
        .draw()?;
    let width = 0.8 / bars as f64;
    for (b, name) in r.aggregators.iter().enumerate() {
        let color = Palette99::pick(b).to_rgba();
        let rects = r.accuracy.iter().enumerate().map(|(g, row)| {
            let x0 = g as f64 - 0.4 + b as f64 * width;
            Rectangle::new(
                [(x0, 0.0), (x0 + width * 0.9, row[b] * 100.0)],
                color.filled(),
            )
        });
        chart
            .draw_series(rects)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(json) = &args.plot_only {
        return report::redraw(&args.out, json, plot);
    }
    // Ten clients train at once on the worker threads: one libtorch thread each.
    tch::set_num_threads(1);
    let train = Mnist::load(&args.data, MnistSplit::Train)
        .with_context(|| format!("MNIST in {}", args.data.display()))?;
    let test = Mnist::load(&args.data, MnistSplit::Test)?;
    let n = args.train_images.min(train.len());
    let profiles: Vec<usize> = train.labels()[..n]
        .iter()
        .map(|&l| usize::from(l))
        .collect();
    let groups: Vec<u64> = (0..n as u64).collect();
    let partition = dirichlet_partition(
        &groups,
        &profiles,
        &PartitionConfig {
            hospitals: args.clients,
            alpha: args.alpha,
            seed: args.seed,
            min_items: 32,
        },
    )?;
    let train: Arc<dyn ImageDataset> = Arc::new(train);
    let test = DataSplit::subset(Arc::new(test), (0..args.test_images.min(10_000)).collect())?;
    let keys = match args.encrypt {
        Encrypt::All => Some(Keys::generate()?),
        Encrypt::None => None,
    };
    let start = Instant::now();
    let mut results = Results {
        attacks: args.attacks.clone(),
        aggregators: args.aggregators.clone(),
        accuracy: Vec::new(),
    };
    for a in &args.attacks {
        let mut row = Vec::new();
        for g in &args.aggregators {
            let t = Instant::now();
            let acc = run_one(
                &args,
                keys.as_ref(),
                &train,
                &partition.hospitals,
                &test,
                a,
                g,
            )?;
            println!(
                "{a:>12} {g:>18}: {:5.1} %  ({:.0} s)",
                acc * 100.0,
                t.elapsed().as_secs_f64()
            );
            row.push(acc);
        }
        results.accuracy.push(row);
    }
    let md = markdown(&args, &results, start.elapsed().as_secs_f64());
    let stem = stem(&args);
    report::write(&args.out, stem, &md, &results, plot)?;
    print!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_attack_and_aggregator_name_builds() {
        for a in [
            "none",
            "sign-flip",
            "gaussian",
            "scaling",
            "alie",
            "ipm",
            "label-flip",
        ] {
            assert!(attack(a).is_ok(), "{a}");
        }
        for g in [
            "fedavg",
            "median",
            "trimmed-mean",
            "krum",
            "geometric-median",
        ] {
            assert!(aggregator(g, 10, 3).is_ok(), "{g}");
        }
        assert!(attack("nope").is_err() && aggregator("nope", 10, 3).is_err());
        assert!(aggregator("bulyan", 15, 3).is_ok() && aggregator("bulyan", 10, 3).is_err());
        assert!(aggregator("centered-clipping", 10, 3).is_ok());
    }

    #[test]
    fn report_has_a_row_per_attack() {
        let args = Args::parse_from(["byzantine"]);
        let r = Results {
            attacks: vec!["none".into(), "alie".into()],
            aggregators: vec!["fedavg".into()],
            accuracy: vec![vec![0.98], vec![0.5]],
        };
        let md = markdown(&args, &r, 1.0);
        assert!(
            md.contains("| none | 98.0 |") && md.contains("| alie | 50.0 |"),
            "{md}"
        );
    }
}
