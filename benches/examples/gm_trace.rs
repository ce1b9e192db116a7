//! Where the geometric median's iterations start, and what it saves:
//! `Method::Gram`, `Method::Passes` and `Method::Auto` on the bench's
//! updates (`benches/robust.rs`), with the
//! iterations each needed, the objective, the residual and the mean time
//! of 5 `compute` calls (fresh buffers each, so slower than the
//! aggregator, which reuses them):
//!
//! ```text
//! cargo run --release -p fedcore-benches --example gm_trace -- 100 7000000 30
//! cargo run --release -p fedcore-benches --example gm_trace -- 100 7000000 30 hide
//! ```
//!
//! Arguments: the number of updates, their length, how many are attackers
//! (scaled by -100; default 30 %) and, optionally, `hide`: the attackers
//! are honest on the coordinates the direct passes sample for their start
//! (the first 2,048 of every 131,072) and scaled elsewhere, the case
//! where the sample misleads.
#![allow(clippy::unwrap_used)]

use fedcore_robust::{GeometricMedianParams, Method};

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = a.first().map_or(100, |a| a.parse().unwrap());
    let d: usize = a.get(1).map_or(7_000_000, |a| a.parse().unwrap());
    let byzantine: usize = a.get(2).map_or(n * 3 / 10, |a| a.parse().unwrap());
    let hide = a.get(3).is_some_and(|s| s == "hide");
    let mut ups = fedcore_benches::updates(n, d, 0, 7);
    for u in ups.iter_mut().take(byzantine) {
        for (k, x) in u.values.as_mut_slice().iter_mut().enumerate() {
            let sampled = k % (2048 * 64) < 2048;
            if !(hide && sampled) {
                *x *= -100.0;
            }
        }
    }
    let points: Vec<&[f32]> = ups.iter().map(|u| u.values.as_slice()).collect();
    let alpha: Vec<f64> = ups.iter().map(|u| u.num_examples as f64).collect();
    for method in [Method::Gram, Method::Passes, Method::Auto] {
        let gm = GeometricMedianParams::new().method(method).check().unwrap();
        let mut w = gm.compute(&points, &alpha);
        let t = std::time::Instant::now();
        for _ in 0..5 {
            w = gm.compute(&points, &alpha);
        }
        println!(
            "{method:?}: {} iterations, objective {:.9e}, residual {:.3e}, converged {}, {:.1} ms",
            w.iterations,
            w.objective,
            w.residual,
            w.converged,
            t.elapsed().as_secs_f64() * 1e3 / 5.0
        );
    }
}
