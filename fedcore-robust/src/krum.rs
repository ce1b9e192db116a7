//! Krum and Multi-Krum (Blanchard et al., 2017).

use fedcore::aggregate::{ensure_at_least, weighted_sum_into};
use fedcore::{Aggregate, Aggregator, ClientUpdate};

use crate::error::ParamsError;
use crate::kernels::pairwise_sq_dists;
use crate::{diagnostics_by_distance, points};

/// Settings of [`Krum`]: the expected number of clients `n`, the number of
/// Byzantine clients tolerated `f`, and how many best-scored updates to
/// average `m` (1 = Krum, more = Multi-Krum).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KrumParams {
    n: usize,
    f: usize,
    m: usize,
}

impl KrumParams {
    /// Krum for `n` clients of which up to `f` are Byzantine (`m = 1`).
    pub fn new(n: usize, f: usize) -> Self {
        Self { n, f, m: 1 }
    }

    /// Multi-Krum: average the `m` updates with the best scores.
    pub fn multi(mut self, m: usize) -> Self {
        self.m = m;
        self
    }

    /// Checks `n > 2f + 2` and `1 <= m <= n - f`.
    pub fn check(self) -> Result<Krum, ParamsError> {
        if self.n <= 2 * self.f + 2 {
            return Err(ParamsError::new(
                "krum",
                format!(
                    "needs n > 2f + 2: n = {} cannot tolerate f = {} Byzantine clients",
                    self.n, self.f
                ),
            ));
        }
        if self.m == 0 || self.m > self.n - self.f {
            return Err(ParamsError::new(
                "krum",
                format!(
                    "m must be in 1..={} (n - f), got {}",
                    self.n - self.f,
                    self.m
                ),
            ));
        }
        Ok(Krum {
            f: self.f,
            m: self.m,
        })
    }
}

/// Scores each update by the sum of squared distances to its `n - f - 2`
/// nearest neighbours and returns the best one (or the mean of the `m` best).
/// Example counts are ignored. Needs at least `2f + 3` updates in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Krum {
    f: usize,
    m: usize,
}

impl Krum {
    /// Krum scores of the updates (lower is more central).
    pub fn scores(&self, xs: &[&[f32]]) -> Vec<f64> {
        let n = xs.len();
        let d2 = pairwise_sq_dists(xs);
        let k = n.saturating_sub(self.f + 2);
        (0..n)
            .map(|i| {
                let mut row: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| d2[i * n + j]).collect();
                row.sort_unstable_by(f64::total_cmp);
                row[..k.min(row.len())].iter().sum()
            })
            .collect()
    }
}

impl Aggregator for Krum {
    fn name(&self) -> String {
        if self.m == 1 {
            format!("krum(f={})", self.f)
        } else {
            format!("multi-krum(f={},m={})", self.f, self.m)
        }
    }

    fn min_updates(&self) -> usize {
        2 * self.f + 3
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> fedcore::Result<Aggregate> {
        let first = ensure_at_least(self, updates)?;
        let xs = points(updates);
        let scores = self.scores(&xs);
        let mut order: Vec<usize> = (0..xs.len()).collect();
        // Ties broken by client id so that input order never matters.
        order.sort_by(|&a, &b| {
            scores[a]
                .total_cmp(&scores[b])
                .then_with(|| updates[a].client.cmp(&updates[b].client))
        });
        let m = self.m.min(xs.len() - self.f);
        let mut weights = vec![0.0f64; xs.len()];
        for &i in &order[..m] {
            weights[i] = 1.0 / m as f64;
        }
        let w32: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
        let mut out = first.values.zeros_like();
        weighted_sum_into(&xs, &w32, out.as_mut_slice())?;
        let clients = diagnostics_by_distance(updates, &xs, out.as_slice(), Some(weights));
        Ok(Aggregate {
            parameters: out,
            clients,
            metrics: [("selected".to_owned(), m as f64)].into(),
        })
    }
}
