//! Coordinate-wise median and trimmed mean.

use fedcore::aggregate::ensure_aggregatable;
use fedcore::{Aggregate, Aggregator, ClientUpdate, Metrics};

use crate::error::ParamsError;
use crate::kernels::mean_of_order_statistics;
use crate::{diagnostics_by_distance, points};

/// The median of each coordinate over the updates (the mean of the two
/// middle values for an even count). Example counts are ignored. Tolerates
/// up to half of the updates being arbitrary in each coordinate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CoordinateMedian;

impl Aggregator for CoordinateMedian {
    fn name(&self) -> String {
        "median".into()
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> fedcore::Result<Aggregate> {
        let first = ensure_aggregatable(updates)?;
        let xs = points(updates);
        let mut out = first.values.zeros_like();
        let n = xs.len();
        // The middle value, or the mean of the two middle values.
        let (lo, hi) = if n % 2 == 1 {
            (n / 2, n / 2 + 1)
        } else {
            (n / 2 - 1, n / 2 + 1)
        };
        mean_of_order_statistics(&xs, out.as_mut_slice(), lo, hi);
        let clients = diagnostics_by_distance(updates, &xs, out.as_slice(), None);
        Ok(Aggregate {
            parameters: out,
            clients,
            metrics: Metrics::new(),
        })
    }
}

/// Settings of [`TrimmedMean`]: the fraction `beta` in `[0, 0.5)` of values
/// dropped at each end of every coordinate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrimmedMeanParams {
    beta: f64,
}

impl TrimmedMeanParams {
    /// `beta` = fraction trimmed at each end (default 0.1 via `Default`).
    pub fn new(beta: f64) -> Self {
        Self { beta }
    }

    /// Checks `0 <= beta < 0.5`.
    pub fn check(self) -> Result<TrimmedMean, ParamsError> {
        if !(0.0..0.5).contains(&self.beta) {
            return Err(ParamsError::new(
                "trimmed mean",
                format!("beta must be in [0, 0.5), got {}", self.beta),
            ));
        }
        Ok(TrimmedMean { beta: self.beta })
    }
}

impl Default for TrimmedMeanParams {
    fn default() -> Self {
        Self::new(0.1)
    }
}

/// For each coordinate, drops the `floor(beta * n)` smallest and largest
/// values and averages the rest (Yin et al., 2018). Example counts are ignored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrimmedMean {
    beta: f64,
}

impl TrimmedMean {
    /// Values trimmed at each end for `n` updates.
    pub fn trimmed(&self, n: usize) -> usize {
        (self.beta * n as f64).floor() as usize
    }
}

impl Aggregator for TrimmedMean {
    fn name(&self) -> String {
        format!("trimmed-mean(beta={})", self.beta)
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> fedcore::Result<Aggregate> {
        let first = ensure_aggregatable(updates)?;
        let xs = points(updates);
        let k = self.trimmed(xs.len());
        let mut out = first.values.zeros_like();
        mean_of_order_statistics(&xs, out.as_mut_slice(), k, xs.len() - k);
        let clients = diagnostics_by_distance(updates, &xs, out.as_slice(), None);
        Ok(Aggregate {
            parameters: out,
            clients,
            metrics: [("trimmed_per_side".to_owned(), k as f64)].into(),
        })
    }
}
