//! FedAvg throughput against a plain streaming read of the same bytes.
//!
//! Run: `cargo bench -p fedcore-benches --bench fedavg`
//! (one size: `cargo bench -p fedcore-benches --bench fedavg -- 'n10/d7000000'`).
//!
//! Both functions read the same `n * d` f32 values once, in the same chunked,
//! parallel order; the streaming read only sums them. Criterion reports both
//! as bytes/s, so FedAvg's throughput divided by the read's is the fraction of
//! usable memory bandwidth that FedAvg reaches (docs/benchmarks.md).
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fedcore::aggregate::streaming_sum;
use fedcore::{Aggregator, ClientUpdate, FedAvg, Parameters};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` updates of `d` values in one tensor, seeded; counts 50..150.
fn updates(n: usize, d: usize, seed: u64) -> Vec<ClientUpdate> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            // One random u32 per 8 values keeps set-up fast for 100 x 7M values.
            let mut values = Vec::with_capacity(d);
            while values.len() < d {
                let r = rng.next_u32();
                values.extend((0..8).map(|k| ((r >> (4 * k)) & 0xf) as f32 / 8.0 - 1.0));
            }
            values.truncate(d);
            let p = Parameters::from_tensors([("w", vec![d], values)]).unwrap();
            ClientUpdate::new(format!("c{i}").into(), 1, 50 + (i as u64 * 37) % 100, p)
        })
        .collect()
}

fn fedavg_vs_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("fedavg");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for d in [10_000usize, 1_000_000, 7_000_000] {
        for n in [3usize, 10, 100] {
            let ups = updates(n, d, 42);
            let id = format!("n{n}/d{d}");
            group.throughput(Throughput::Bytes((n * d * 4) as u64));
            group.bench_function(BenchmarkId::new("aggregate", &id), |b| {
                b.iter(|| FedAvg.aggregate(black_box(&ups)).unwrap())
            });
            let slices: Vec<&[f32]> = ups.iter().map(|u| u.values.as_slice()).collect();
            group.bench_function(BenchmarkId::new("stream_read", &id), |b| {
                b.iter(|| streaming_sum(black_box(&slices)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, fedavg_vs_read);
criterion_main!(benches);
