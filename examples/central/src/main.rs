//! Central training of the fedcore `tch` models, to check that they learn
//! before they are federated, and to measure their speed.
//!
//! ```text
//! central xray  --seconds 60 --size 64            # DenseNet on synthetic X-rays, per-label AUROC
//! central xray  --data ../shared/data/chestxray14 # the real sample (145 images)
//! central mnist --data ../shared/data/mnist       # small CNN, test accuracy
//! central bench                                   # images/s, for docs/benchmarks.md
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use fedcore::data::chestxray::FINDINGS;
use fedcore::data::mnist::MnistSplit;
use fedcore::data::{
    ChestXray14, ChestXrayConfig, DataSplit, ImageDataset, InMemoryImages, Mnist, Partition,
    PartitionConfig, SyntheticXrays, Targets, dirichlet_partition, write_synthetic_chestxray,
};
use fedcore::metrics::multilabel_auroc;
use fedcore::models::{
    Activation, DenseNet, DenseNetConfig, Device, LoadOptions, Placement, SmallCnn, TchModel,
};
use fedcore::{Model, Optimizer, TrainConfig};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// DenseNet on chest X-rays (synthetic unless --data), per-label AUROC.
    Xray(XrayArgs),
    /// The small CNN on MNIST, test accuracy.
    Mnist(MnistArgs),
    /// Training throughput (images/s) of DenseNet-121 and the small CNN.
    Bench(BenchArgs),
    /// Split a data set into hospitals (by patient, Dirichlet over label
    /// profiles) and print the per-hospital label histograms.
    Partition(PartitionArgs),
}

#[derive(clap::Args)]
struct PartitionArgs {
    /// chestxray14 (a folder with Data_Entry_2017*.csv; images not needed) or mnist.
    #[arg(long, default_value = "chestxray14")]
    dataset: String,
    #[arg(long, default_value = "../shared/data/chestxray14")]
    data: PathBuf,
    #[arg(long, default_value_t = 5)]
    hospitals: usize,
    #[arg(long, default_value_t = 0.5)]
    alpha: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
struct XrayArgs {
    /// A ChestX-ray14 folder (CSV, images/, split lists); default: synthesize one.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Patients in the synthetic set.
    #[arg(long, default_value_t = 400)]
    patients: usize,
    /// Image side fed to the network.
    #[arg(long, default_value_t = 64)]
    size: u32,
    /// 1 (gray) or 3 (gray repeated; the layout of torchvision's densenet121).
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// relu, square or poly:a,b,c.
    #[arg(long, default_value = "relu")]
    activation: String,
    /// final (polynomial only before the classifier) or everywhere.
    #[arg(long, default_value = "final")]
    placement: String,
    /// Stop starting new epochs after this many seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// adam or sgd (momentum 0.9).
    #[arg(long, default_value = "adam")]
    optimizer: String,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// torchvision weights (safetensors) to start from; the classifier is skipped
    /// and RGB weights are summed to gray.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Write the trained model as a torchvision state dict (safetensors).
    #[arg(long)]
    export: Option<PathBuf>,
}

#[derive(clap::Args)]
struct MnistArgs {
    /// Folder with the four IDX files (gz or raw).
    #[arg(long, default_value = "../shared/data/mnist")]
    data: PathBuf,
    #[arg(long, default_value_t = 2)]
    epochs: usize,
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Training steps timed per configuration (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Image sides for DenseNet-121.
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 224])]
    sizes: Vec<usize>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Xray(a) => xray(a),
        Command::Mnist(a) => mnist(a),
        Command::Bench(a) => bench(a),
        Command::Partition(a) => partition(a),
    }
}

fn optimizer(name: &str) -> Result<Optimizer> {
    match name {
        "adam" => Ok(Optimizer::adam()),
        "sgd" => Ok(Optimizer::Sgd { momentum: 0.9 }),
        other => bail!("unknown optimizer `{other}` (adam, sgd)"),
    }
}

fn placement(name: &str) -> Result<Placement> {
    match name {
        "final" => Ok(Placement::Final),
        "everywhere" => Ok(Placement::Everywhere),
        other => bail!("unknown placement `{other}` (final, everywhere)"),
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(what.to_owned());
    bar
}

fn xray(a: XrayArgs) -> Result<()> {
    let device = Device::parse(&a.device)?;
    let _tmp;
    let root = match &a.data {
        Some(dir) => dir.clone(),
        None => {
            let dir = tempfile::tempdir()?;
            let config = SyntheticXrays {
                patients: a.patients,
                size: 128,
                seed: a.seed,
                ..SyntheticXrays::default()
            };
            let summary = write_synthetic_chestxray(dir.path(), &config)?;
            println!(
                "synthetic set: {} images of {} patients, {} in test_list.txt",
                summary.images, a.patients, summary.test_images
            );
            let root = dir.path().to_path_buf();
            _tmp = dir;
            root
        }
    };
    let config = ChestXrayConfig {
        size: a.size,
        channels: a.channels,
        ..ChestXrayConfig::default()
    };
    let mut ds = ChestXray14::open(&root, config)?;
    let dropped = ds.retain_present();
    if dropped > 0 {
        println!("{dropped} rows have no image here and are left out");
    }
    let train = ds.official_split("train_val_list.txt")?;
    let test = ds.official_split("test_list.txt")?;
    println!(
        "train {} images, test {} images, {}x{}",
        train.len(),
        test.len(),
        a.size,
        a.size
    );
    let ds: Arc<dyn ImageDataset> = Arc::new(ds);
    let train = DataSplit::subset(ds.clone(), train)?;
    let test = DataSplit::subset(ds, test)?;

    let net = DenseNetConfig {
        placement: placement(&a.placement)?,
        ..DenseNetConfig::densenet121(a.channels, Activation::parse(&a.activation)?)
    };
    let mut model = TchModel::build(device, a.seed, |b| DenseNet::build(b, net))?
        .with_label_names(&FINDINGS)?;
    if let Some(w) = &a.weights {
        let opts = LoadOptions {
            skip: vec!["classifier.*".into()],
            rgb_to_gray: a.channels == 1,
            allow_unexpected: false,
        };
        model.load_torchvision(w, &opts)?;
        println!("started from {}", w.display());
    }
    let budget = Duration::from_secs(a.seconds);
    let start = Instant::now();
    let mut epoch = 0u64;
    while start.elapsed() < budget {
        let config = TrainConfig {
            epochs: 1,
            batch_size: a.batch_size,
            learning_rate: a.lr,
            optimizer: optimizer(&a.optimizer)?,
            seed: a.seed.wrapping_add(epoch),
            ..TrainConfig::default()
        };
        let fit = model.fit(&train, &config)?;
        epoch += 1;
        let p = model.predict(&test, 64)?;
        let auroc = match &p.targets {
            Targets::MultiLabel { values, labels } => multilabel_auroc(&p.logits, values, *labels)?,
            Targets::Classes(_) => bail!("expected multi-label targets"),
        };
        println!(
            "epoch {epoch:>3}  {:>6.1}s  train loss {:.4}  test loss {:.4}  macro AUROC {}",
            start.elapsed().as_secs_f64(),
            fit.metrics["loss"],
            p.loss,
            auroc
                .macro_mean
                .map_or("undefined".into(), |m| format!("{m:.3}"))
        );
        if start.elapsed() >= budget {
            println!("\nper-label AUROC on {} test images:", test.len());
            for (name, v) in FINDINGS.iter().zip(&auroc.per_label) {
                let v = v.map_or("undefined (one class only)".into(), |v| format!("{v:.3}"));
                println!("  {name:<20} {v}");
            }
        }
    }
    if let Some(out) = &a.export {
        model.save_torchvision(out)?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

fn mnist(a: MnistArgs) -> Result<()> {
    let device = Device::parse(&a.device)?;
    let train = Mnist::load(&a.data, MnistSplit::Train)
        .with_context(|| format!("MNIST in {}", a.data.display()))?;
    let test = Mnist::load(&a.data, MnistSplit::Test)?;
    println!("MNIST: {} train, {} test images", train.len(), test.len());
    let train = DataSplit::all(Arc::new(train));
    let test = DataSplit::all(Arc::new(test));
    let mut model = TchModel::build(device, a.seed, |b| SmallCnn::build(b, 1, 28, 10))?;
    println!("small CNN: {} parameters", model.trainable_values());
    let progress = bar(a.epochs as u64, "epochs");
    let start = Instant::now();
    for epoch in 0..a.epochs {
        let config = TrainConfig {
            epochs: 1,
            batch_size: a.batch_size,
            learning_rate: a.lr,
            optimizer: Optimizer::adam(),
            seed: a.seed.wrapping_add(epoch as u64),
            ..TrainConfig::default()
        };
        let fit = model.fit(&train, &config)?;
        let eval = model.evaluate(&test)?;
        progress.inc(1);
        // suspend(): the line is printed even when stderr is not a terminal.
        progress.suspend(|| {
            println!(
                "epoch {} {:>6.1}s train loss {:.4} test loss {:.4} test accuracy {:.2}%",
                epoch + 1,
                start.elapsed().as_secs_f64(),
                fit.metrics["loss"],
                eval.loss,
                eval.metrics["accuracy"] * 100.0
            )
        });
    }
    progress.finish_and_clear();
    Ok(())
}

/// Random images and targets of the right shape (throughput does not depend on content).
fn noise(n: usize, shape: [usize; 3], targets: Targets) -> Result<DataSplit> {
    let per: usize = shape.iter().product();
    let images = (0..n * per)
        .map(|i| ((i * 7919) % 255) as f32 / 255.0 - 0.5)
        .collect();
    Ok(DataSplit::all(Arc::new(InMemoryImages::new(
        images, shape, targets,
    )?)))
}

fn images_per_second<N: fedcore::models::Network>(
    model: &mut TchModel<N>,
    data: &DataSplit,
    batch_size: usize,
) -> Result<f64> {
    let config = |seed| TrainConfig {
        epochs: 1,
        batch_size,
        learning_rate: 1e-4,
        optimizer: Optimizer::Sgd { momentum: 0.9 },
        seed,
        ..TrainConfig::default()
    };
    // Warm-up: one step (allocator, kernels).
    let warm = DataSplit::subset(data.source().clone(), (0..batch_size).collect())?;
    model.fit(&warm, &config(0))?;
    let start = Instant::now();
    let fit = model.fit(data, &config(1))?;
    let secs = start.elapsed().as_secs_f64();
    Ok(fit.num_examples as f64 / secs)
}

fn bench(a: BenchArgs) -> Result<()> {
    let device = Device::parse(&a.device)?;
    println!(
        "device {device:?}, libtorch threads {}, batch {}",
        tch::get_num_threads(),
        a.batch_size
    );
    println!("| model | input | activation | images/s |");
    println!("|---|---|---|---|");
    for &size in &a.sizes {
        for (name, act, placement) in [
            ("relu", Activation::Relu, Placement::Everywhere),
            (
                "square (everywhere)",
                Activation::Square,
                Placement::Everywhere,
            ),
            ("square (final)", Activation::Square, Placement::Final),
        ] {
            let n = a.batch_size * a.steps;
            let labels = Targets::MultiLabel {
                values: (0..n * 14)
                    .map(|i| f32::from(u8::from(i % 5 == 0)))
                    .collect(),
                labels: 14,
            };
            let data = noise(n, [1, size, size], labels)?;
            let config = DenseNetConfig {
                placement,
                ..DenseNetConfig::densenet121(1, act)
            };
            let mut model = TchModel::build(device, 0, |b| DenseNet::build(b, config))?;
            let ips = images_per_second(&mut model, &data, a.batch_size)?;
            println!("| DenseNet-121 | 1x{size}x{size} | {name} | {ips:.1} |");
        }
    }
    let n = 64 * 20;
    let data = noise(
        n,
        [1, 28, 28],
        Targets::Classes((0..n as i64).map(|i| i % 10).collect()),
    )?;
    let mut cnn = TchModel::build(device, 0, |b| SmallCnn::build(b, 1, 28, 10))?;
    let ips = images_per_second(&mut cnn, &data, 64)?;
    println!("| small CNN (batch 64) | 1x28x28 | relu | {ips:.0} |");
    Ok(())
}

fn partition(a: PartitionArgs) -> Result<()> {
    let config = PartitionConfig {
        hospitals: a.hospitals,
        alpha: a.alpha,
        seed: a.seed,
        min_items: 1,
    };
    match a.dataset.as_str() {
        "chestxray14" => {
            let ds = ChestXray14::open(&a.data, ChestXrayConfig::default())?;
            let entries = ds.entries();
            let groups: Vec<u64> = entries.iter().map(|e| u64::from(e.patient)).collect();
            // Profile: the first finding present (NIH order), 14 = No Finding.
            let profile = |e: &fedcore::data::Entry| (0..14).find(|&i| e.has(i)).unwrap_or(14);
            let profiles: Vec<usize> = entries.iter().map(profile).collect();
            let p = dirichlet_partition(&groups, &profiles, &config)?;
            let h = p.histograms(15, |i| {
                let e = &entries[i];
                let mut l: Vec<usize> = (0..14).filter(|&f| e.has(f)).collect();
                if l.is_empty() {
                    l.push(14);
                }
                l
            });
            for (i, items) in p.hospitals.iter().enumerate() {
                let patients: std::collections::BTreeSet<u32> =
                    items.iter().map(|&j| entries[j].patient).collect();
                println!("h{i}: {} images, {} patients", items.len(), patients.len());
            }
            let mut names: Vec<&str> = FINDINGS.to_vec();
            names.push("No Finding");
            print!("{}", Partition::format_histograms(&h, &names));
        }
        "mnist" => {
            let m = Mnist::load(&a.data, MnistSplit::Train)?;
            let groups: Vec<u64> = (0..m.len() as u64).collect();
            let profiles: Vec<usize> = m.labels().iter().map(|&l| usize::from(l)).collect();
            let p = dirichlet_partition(&groups, &profiles, &config)?;
            let h = p.histograms(10, |i| [profiles[i]]);
            let names: Vec<String> = (0..10).map(|d| d.to_string()).collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            print!("{}", Partition::format_histograms(&h, &names));
        }
        other => bail!("unknown dataset `{other}` (chestxray14, mnist)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert!(optimizer("adam").is_ok() && optimizer("sgd").is_ok() && optimizer("x").is_err());
        assert_eq!(placement("final").ok(), Some(Placement::Final));
        assert!(placement("nowhere").is_err());
        assert!(matches!(Device::parse("cpu"), Ok(Device::Cpu)));
        assert!(Device::parse("tpu").is_err());
        Cli::try_parse_from(["central", "xray", "--seconds", "1", "--size", "32"])
            .map(|_| ())
            .unwrap_or_else(|e| panic!("{e}"));
    }
}
