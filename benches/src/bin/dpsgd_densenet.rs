//! One DP-SGD step of the GroupNorm DenseNet-121 against one plain SGD step
//! of the same network: time per step and the process's peak memory.
//!
//! Run each mode in its own process, so that each peak is its own:
//!
//! ```text
//! source scripts/env.sh
//! cargo run --release -p fedcore-benches --features tch --bin dpsgd_densenet -- sgd
//! cargo run --release -p fedcore-benches --features tch --bin dpsgd_densenet -- dp
//! ```
//!
//! Input: 32 seeded 1 x 64 x 64 images with 14 labels, batch 32 (DP-SGD's
//! sampling rate 1, so every step sees all 32), SGD with momentum. `sgd` is
//! `TchModel::fit`: forward, BCE loss, backward, step. `dp` is `DpSgd::fit`:
//! traced forward, one backward to the layer outputs, per-sample norms
//! (mixed ghost clipping), clipped sum, secure Gaussian noise, step. A
//! criterion bench would take minutes per sample on two cores, hence this
//! recorded measurement (docs/benchmarks.md).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use fedcore::data::{DataSplit, InMemoryImages, Targets};
use fedcore::models::{Activation, DenseNet, DenseNetConfig, Device, TchModel};
use fedcore::{Model, Optimizer, TrainConfig};
use fedcore_dp::{Budget, DpSgd, DpSgdConfig, Noise};

const BATCH: usize = 32;
const SIDE: usize = 64;
const STEPS: usize = 9;

/// Peak resident memory of this process (`VmHWM`), in MiB.
fn peak_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    let per = SIDE * SIDE;
    let images: Vec<f32> = (0..BATCH * per)
        .map(|i| ((i as u64 * 7919) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let values: Vec<f32> = (0..BATCH * 14).map(|i| f32::from(i % 5 == 0)).collect();
    let targets = Targets::MultiLabel { values, labels: 14 };
    let data = DataSplit::all(Arc::new(
        InMemoryImages::new(images, [1, SIDE, SIDE], targets).unwrap(),
    ));
    let config = TrainConfig {
        epochs: 1,
        batch_size: BATCH,
        learning_rate: 0.01,
        optimizer: Optimizer::Sgd { momentum: 0.9 },
        seed: 1,
        ..TrainConfig::default()
    };
    let net = || {
        TchModel::build(Device::Cpu, 0, |b| {
            DenseNet::build(
                b,
                DenseNetConfig::densenet121_group_norm(1, Activation::Relu),
            )
        })
        .unwrap()
    };
    let mut step: Box<dyn FnMut()> = match mode.as_str() {
        "sgd" => {
            let mut model = net();
            Box::new(move || {
                model.fit(&data, &config).unwrap();
            })
        }
        "dp" => {
            let budget = Budget::new(f64::INFINITY, 1e-5).unwrap();
            let config_dp = DpSgdConfig::new(1.0, 1.0).with_budget(budget);
            let mut model =
                DpSgd::new("bench", net(), config_dp, Noise::secure().unwrap()).unwrap();
            Box::new(move || {
                model.fit(&data, &config).unwrap();
            })
        }
        other => {
            eprintln!("usage: dpsgd_densenet sgd|dp (got `{other}`)");
            std::process::exit(2);
        }
    };
    step(); // warm-up
    let mut times: Vec<f64> = (0..STEPS)
        .map(|_| {
            let t = Instant::now();
            step();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!(
        "{mode}: GroupNorm DenseNet-121, 1x{SIDE}x{SIDE}, batch {BATCH}, {} cores: median step {:.3} s (min {:.3}, max {:.3}) over {STEPS}; peak memory {:.0} MiB",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        times[STEPS / 2],
        times[0],
        times[STEPS - 1],
        peak_mib()
    );
}
