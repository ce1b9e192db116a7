//! Centered clipping (Karimireddy, He, Jaggi, "Learning from History for
//! Byzantine Robust Optimization", ICML 2021).

use fedcore::aggregate::{ensure_aggregatable, weighted_sum_into};
use fedcore::{Aggregate, Aggregator, ClientUpdate, Error};

use crate::error::ParamsError;
use crate::kernels::sq_dists_to;
use crate::{diagnostics_by_distance, points};

/// Settings of [`CenteredClipping`]: the clipping radius `tau` and the
/// iterations per round (the paper uses 1 to 3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CenteredClippingParams {
    tau: f64,
    iterations: usize,
}

impl CenteredClippingParams {
    /// Radius `tau`, 3 iterations per round.
    pub fn new(tau: f64) -> Self {
        Self { tau, iterations: 3 }
    }

    /// Iterations per round.
    pub fn iterations(mut self, n: usize) -> Self {
        self.iterations = n;
        self
    }

    /// Checks `tau > 0` (finite) and at least one iteration.
    pub fn check(self) -> Result<CenteredClipping, ParamsError> {
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return Err(ParamsError::new(
                "centered clipping",
                format!("tau must be positive and finite, got {}", self.tau),
            ));
        }
        if self.iterations == 0 {
            return Err(ParamsError::new(
                "centered clipping",
                "needs at least one iteration",
            ));
        }
        Ok(CenteredClipping {
            tau: self.tau,
            iterations: self.iterations,
            center: Vec::new(),
        })
    }
}

/// Starting from the previous round's aggregate `v` (zero in the first
/// round), each iteration moves `v` by the mean of the updates' offsets
/// from it, each offset clipped to norm `tau`:
/// `v <- v + (1/n) Σ (x_i - v) min(1, tau / ||x_i - v||)`. An update
/// moves the result by at most `tau / n` per iteration however far it is
/// (f attackers by `f·tau/n`, which the center carries on to later
/// rounds), and the result moves by at most `tau` per iteration in all.
/// The paper pairs it with momentum at the workers (their local
/// optimizer), which reduces the honest updates' variance; server
/// momentum (`ServerOpt::Momentum`) smooths the server's steps instead. The center is the aggregator's state, saved in every
/// checkpoint ([`Aggregator::state`]). Example counts are ignored;
/// iterations stop early once `v` no longer moves.
#[derive(Debug, Clone, PartialEq)]
pub struct CenteredClipping {
    tau: f64,
    iterations: usize,
    center: Vec<f32>,
}

impl Aggregator for CenteredClipping {
    fn name(&self) -> String {
        format!("centered-clipping(tau={},L={})", self.tau, self.iterations)
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> fedcore::Result<Aggregate> {
        let first = ensure_aggregatable(updates)?;
        let xs = points(updates);
        let n = xs.len();
        let d = first.values.len();
        let mut v = if self.center.is_empty() {
            vec![0.0f32; d]
        } else if self.center.len() == d {
            self.center.clone()
        } else {
            return Err(Error::InvalidInput(format!(
                "centered clipping: its center has {} values, the updates {d}",
                self.center.len()
            )));
        };
        let mut weights = vec![1.0 / n as f64; n];
        let mut sum = vec![0.0f32; d];
        for _ in 0..self.iterations {
            let dists: Vec<f64> = sq_dists_to(&xs, &v).into_iter().map(f64::sqrt).collect();
            let scale: Vec<f64> = dists
                .iter()
                .map(|&r| if r <= self.tau { 1.0 } else { self.tau / r })
                .collect();
            weights = scale.iter().map(|s| s / n as f64).collect();
            // v + Σ w_i (x_i - v) = (1 - Σ w_i) v + Σ w_i x_i.
            let w32: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
            let keep = (1.0 - weights.iter().sum::<f64>()) as f32;
            weighted_sum_into(&xs, &w32, &mut sum)?;
            let mut moved = false;
            for (vj, sj) in v.iter_mut().zip(&sum) {
                let next = keep * *vj + sj;
                moved |= next != *vj;
                *vj = next;
            }
            if !moved {
                break;
            }
        }
        let mut out = first.values.zeros_like();
        out.as_mut_slice().copy_from_slice(&v);
        self.center = v;
        let clients = diagnostics_by_distance(updates, &xs, out.as_slice(), Some(weights));
        Ok(Aggregate {
            parameters: out,
            clients,
            metrics: [("tau".to_owned(), self.tau)].into(),
        })
    }

    fn state(&self) -> Option<Vec<f32>> {
        Some(self.center.clone())
    }

    fn restore(&mut self, state: Vec<f32>) -> fedcore::Result<()> {
        if let Some(i) = state.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "centered clipping: the saved center holds {} at {i}",
                state[i]
            )));
        }
        self.center = state;
        Ok(())
    }
}
