//! FedAvg throughput against a plain streaming read of the same bytes.
//!
//! Run: `cargo bench -p fedcore-benches --bench fedavg`
//! (one size: `cargo bench -p fedcore-benches --bench fedavg -- 'n10/d7000000'`).
//!
//! Both functions read the same `n * d` f32 values once, in the same chunked,
//! parallel order; the streaming read only sums them. `aggregate` writes a
//! fresh output, `aggregate_into` the previous one's memory (what the server
//! does from its second round on). Criterion reports both
//! as bytes/s, so FedAvg's throughput divided by the read's is the fraction of
//! usable memory bandwidth that FedAvg reaches (docs/benchmarks.md).
#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use fedcore::{Aggregator, FedAvg};
use fedcore_benches::{streaming_sum, streaming_sum4, updates};

fn fedavg_vs_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("fedavg");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for d in [10_000usize, 1_000_000, 7_000_000] {
        for n in [3usize, 10, 100] {
            let ups = updates(n, d, 0, 42);
            let id = format!("n{n}/d{d}");
            group.throughput(Throughput::Bytes((n * d * 4) as u64));
            group.bench_function(BenchmarkId::new("aggregate", &id), |b| {
                b.iter(|| FedAvg.aggregate(black_box(&ups)).unwrap())
            });
            // Into the last aggregate's memory, as the server does from
            // round 2 on: no first-touch page faults.
            let mut spare = Some(FedAvg.aggregate(&ups).unwrap().parameters);
            group.bench_function(BenchmarkId::new("aggregate_into", &id), |b| {
                b.iter(|| {
                    let buffer = spare.take().expect("put back after every call");
                    let agg = FedAvg.aggregate_into(black_box(&ups), buffer).unwrap();
                    spare = Some(agg.parameters);
                })
            });
            let slices: Vec<&[f32]> = ups.iter().map(|u| u.values.as_slice()).collect();
            group.bench_function(BenchmarkId::new("stream_read", &id), |b| {
                b.iter(|| streaming_sum(black_box(&slices)))
            });
            group.bench_function(BenchmarkId::new("stream_read4", &id), |b| {
                b.iter(|| streaming_sum4(black_box(&slices)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, fedavg_vs_read);
criterion_main!(benches);
