//! Robust aggregators against FedAvg on the same input.
//!
//! Run: `cargo bench -p fedcore-benches --bench robust`
//! (one size: `cargo bench -p fedcore-benches --bench robust -- 'n10/d7000000'`).
//!
//! Input: `n` updates of `d` f32 values, 30% of them Byzantine (scaled by
//! -100). Each aggregator is timed on the same input as FedAvg, so
//! docs/benchmarks.md can state its cost as a multiple of FedAvg. Before
//! timing, the bench prints the Weiszfeld iterations the geometric median
//! needs at tolerance 1e-6 for each size.
//!
//! What bounds the geometric median at n <= 16 (2.3-2.4x FedAvg at n = 10,
//! 1.6-1.9x at n = 3, 2.7-3.05x at n = 16 in `gm_methods`; the target is
//! 3x): one read of the data for the Gram matrix and one for the final
//! weighted sum. On the Gram pass, the FP units: a `vcvtps2pd` per 8 f32
//! values loaded and a multiply-add per product, at n = 16 64 and 136 per
//! 8 coordinates. At n = 100 (8.6-9.3x on 2026-12-05; the target is 8x):
//! 5 passes over the data (4 Weiszfeld iterations), each reading it from
//! memory and each block again from L2 for the distances. Profile: `perf
//! record` then `perf annotate` of `gm_methods -- 10 auto` (docs/benchmarks.md,
//! "Tiles by blocks of four and five inputs").
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use fedcore::{Aggregator, FedAvg};
use fedcore_benches::updates;
use fedcore_robust::{
    CoordinateMedian, GeometricMedian, GeometricMedianParams, KrumParams, TrimmedMeanParams,
};

const SIZES: [(usize, usize); 9] = [
    (3, 10_000),
    (10, 10_000),
    (100, 10_000),
    (3, 1_000_000),
    (10, 1_000_000),
    (100, 1_000_000),
    (3, 7_000_000),
    (10, 7_000_000),
    (100, 7_000_000),
];

fn robust(c: &mut Criterion) {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wanted = |id: &str| filter.is_empty() || filter.iter().any(|f| id.contains(f.as_str()));
    let mut group = c.benchmark_group("robust");
    group.sample_size(10);
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(3));
    for (n, d) in SIZES {
        let id = format!("n{n}/d{d}");
        if !wanted(&id) {
            continue;
        }
        let ups = updates(n, d, n * 3 / 10, 7);
        let points: Vec<&[f32]> = ups.iter().map(|u| u.values.as_slice()).collect();
        let w = GeometricMedian::default().compute(&points, &vec![1.0; n]);
        eprintln!(
            "weiszfeld {id}: {} iterations to tolerance 1e-6 (converged: {}, residual {:.2e})",
            w.iterations, w.converged, w.residual
        );
        let f = (n.saturating_sub(3)) / 2;
        let mut aggregators: Vec<(String, Box<dyn Aggregator>)> = vec![
            ("fedavg".into(), Box::new(FedAvg)),
            (
                "geometric_median".into(),
                Box::new(GeometricMedianParams::new().check().unwrap()),
            ),
            ("median".into(), Box::new(CoordinateMedian)),
            (
                "trimmed_mean".into(),
                Box::new(TrimmedMeanParams::new(0.3).check().unwrap()),
            ),
            (
                "krum".into(),
                Box::new(KrumParams::new(n, f).check().unwrap()),
            ),
        ];
        for (name, agg) in &mut aggregators {
            group.bench_function(BenchmarkId::new(name.as_str(), &id), |b| {
                b.iter(|| agg.aggregate(black_box(&ups)).unwrap())
            });
        }
    }
    group.finish();
}

criterion_group!(benches, robust);
criterion_main!(benches);
