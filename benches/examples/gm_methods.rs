//! The geometric median's two ways of holding the iterate against FedAvg
//! on the same updates, at sizes the criterion bench does not cover (the
//! choice of `GRAM_MAX_POINTS`):
//!
//! ```text
//! cargo run --release -p fedcore-benches --example gm_methods -- 32 gram
//! cargo run --release -p fedcore-benches --example gm_methods -- 32 passes
//! ```
//!
//! Arguments: the number of updates (7M values each, 30 % Byzantine, as in
//! `benches/robust.rs`), the method (`gram`, `passes`, or `auto`, the
//! default) and, optionally, `into`: both aggregators write into the last
//! round's output (`Aggregator::aggregate_into`, as the server calls them)
//! instead of a fresh one. Prints the mean of 20 aggregations after 3
//! warm-up rounds.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Instant;

use fedcore::{Aggregator, FedAvg};
use fedcore_robust::{GeometricMedianParams, Method};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(10, |a| a.parse().unwrap());
    let method = match args.next().as_deref() {
        Some("gram") => Method::Gram,
        Some("passes") => Method::Passes,
        None | Some("auto") => Method::Auto,
        Some(other) => panic!("method `{other}`: gram, passes or auto"),
    };
    let into = args.next().as_deref() == Some("into");
    let ups = fedcore_benches::updates(n, 7_000_000, n * 3 / 10, 7);
    let mut gm = GeometricMedianParams::new().method(method).check().unwrap();
    let mut fedavg = FedAvg;
    for _ in 0..3 {
        gm.aggregate(&ups).unwrap();
        fedavg.aggregate(&ups).unwrap();
    }
    let reps = 20;
    let time = |agg: &mut dyn Aggregator| {
        let mut last = Some(agg.aggregate(&ups).unwrap().parameters);
        let t = Instant::now();
        for _ in 0..reps {
            // Without `into` the last output is dropped first, as criterion
            // and the default `aggregate_into` do.
            let a = match last.take().filter(|_| into) {
                Some(buffer) => agg.aggregate_into(black_box(&ups), buffer).unwrap(),
                None => agg.aggregate(black_box(&ups)).unwrap(),
            };
            last = Some(black_box(a).parameters);
        }
        t.elapsed().as_secs_f64() * 1e3 / f64::from(reps)
    };
    let f = time(&mut fedavg);
    let g = time(&mut gm);
    println!(
        "n {n}, {method:?}{}: fedavg {f:.2} ms, geometric median {g:.2} ms ({:.2}x)",
        if into { ", into the last output" } else { "" },
        g / f
    );
}
