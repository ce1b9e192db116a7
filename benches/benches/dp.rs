//! DP-SGD against plain SGD on the small CNN, and the RDP accountant.
//!
//! Run: `source scripts/env.sh && cargo bench -p fedcore-benches --features tch --bench dp`
//!
//! `sgd_step`: one `TchModel::fit` step on 64 MNIST-shaped images (forward,
//! cross-entropy, backward, SGD momentum). `dp_sgd_step`: one `DpSgd::fit`
//! step on the same 64 images (sampling rate 1: all 64; per-sample
//! gradients, clipping, noise from the secure generator, SGD momentum).
//! Their ratio is DP-SGD's overhead. `rdp_10000_steps`: composing 10,000
//! sampled-Gaussian steps and converting to epsilon over the default orders.
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fedcore::data::{DataSplit, synthetic_digits};
use fedcore::models::{Device, SmallCnn, TchModel};
use fedcore::{Model, Optimizer, TrainConfig};
use fedcore_dp::{Budget, DpSgd, DpSgdConfig, Noise, RdpAccountant};

fn dp(c: &mut Criterion) {
    let data = DataSplit::all(Arc::new(synthetic_digits(64, 1)));
    let config = TrainConfig {
        epochs: 1,
        batch_size: 64,
        learning_rate: 0.05,
        optimizer: Optimizer::Sgd { momentum: 0.5 },
        seed: 1,
        ..TrainConfig::default()
    };
    let cnn = || TchModel::build(Device::Cpu, 0, |b| SmallCnn::build(b, 1, 28, 10)).unwrap();
    let mut group = c.benchmark_group("dp");
    group.sample_size(30);
    group.warm_up_time(Duration::from_secs(2));
    group.measurement_time(Duration::from_secs(8));

    let mut plain = cnn();
    group.bench_function("sgd_step/cnn/b64", |b| {
        b.iter(|| plain.fit(black_box(&data), &config).unwrap())
    });
    let unlimited = Budget::new(f64::INFINITY, 1e-5).unwrap();
    let mut private = DpSgd::new(
        "bench",
        cnn(),
        DpSgdConfig::new(1.0, 1.0).with_budget(unlimited),
        Noise::secure().unwrap(),
    )
    .unwrap();
    group.bench_function("dp_sgd_step/cnn/b64", |b| {
        b.iter(|| private.fit(black_box(&data), &config).unwrap())
    });
    group.bench_function("rdp_10000_steps", |b| {
        b.iter(|| {
            let mut acc = RdpAccountant::new();
            acc.compose_sampled_gaussian(black_box(4.0), 0.01, 10_000)
                .unwrap();
            acc.epsilon(1e-5)
        })
    });
    group.finish();
}

criterion_group!(benches, dp);
criterion_main!(benches);
