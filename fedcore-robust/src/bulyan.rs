//! Bulyan (El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of
//! Distributed Learning in Byzantium", ICML 2018).

use fedcore::aggregate::ensure_at_least;
use fedcore::{Aggregate, Aggregator, ClientUpdate};
use rayon::prelude::*;

use crate::error::ParamsError;
use crate::kernels::pairwise_sq_dists;
use crate::{diagnostics_by_distance, points};

/// Settings of [`Bulyan`]: the expected number of clients `n` and the
/// number of Byzantine clients tolerated `f`, with `n >= 4f + 3`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulyanParams {
    n: usize,
    f: usize,
}

impl BulyanParams {
    /// Bulyan for `n` clients of which up to `f` are Byzantine.
    pub fn new(n: usize, f: usize) -> Self {
        Self { n, f }
    }

    /// Checks `n >= 4f + 3`.
    pub fn check(self) -> Result<Bulyan, ParamsError> {
        if self
            .f
            .checked_mul(4)
            .and_then(|x| x.checked_add(3))
            .is_none_or(|min| self.n < min)
        {
            return Err(ParamsError::new(
                "bulyan",
                format!(
                    "needs n >= 4f + 3: n = {} cannot tolerate f = {} Byzantine clients",
                    self.n, self.f
                ),
            ));
        }
        Ok(Bulyan { f: self.f })
    }
}

/// Krum, applied again and again, selects `θ = n - 2f` updates (each time
/// the best-scored of those left, scored among those left); then, in every
/// coordinate, the `β = θ - 2f` selected values closest to their median are
/// averaged. Both a whole update far from the others (Krum) and a single
/// coordinate pushed far within the selection (the median window) are
/// kept out, which Krum or a coordinate-wise rule alone do not both do.
/// Example counts are ignored. Needs at least `4f + 3` updates in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bulyan {
    f: usize,
}

impl Bulyan {
    /// The indices of the `n - 2f` updates Krum selects one after another,
    /// in the order selected (ties broken by `rank`, e.g. client order).
    pub fn select(&self, xs: &[&[f32]], rank: &[usize]) -> Vec<usize> {
        let n = xs.len();
        let d2 = pairwise_sq_dists(xs);
        let theta = n.saturating_sub(2 * self.f);
        let mut left: Vec<usize> = (0..n).collect();
        let mut chosen = Vec::with_capacity(theta);
        while chosen.len() < theta {
            // At least one neighbour: near the end fewer than 2f + 3 are
            // left, where Krum's own count would score every update 0.
            let k = left.len().saturating_sub(self.f + 2).max(1);
            let score = |i: usize| -> f64 {
                let mut row: Vec<f64> = left
                    .iter()
                    .filter(|&&j| j != i)
                    .map(|&j| d2[i * n + j])
                    .collect();
                row.sort_unstable_by(f64::total_cmp);
                row[..k.min(row.len())].iter().sum()
            };
            let (pos, _) = left
                .iter()
                .enumerate()
                .map(|(p, &i)| (p, (score(i), rank[i])))
                .min_by(|a, b| a.1.0.total_cmp(&b.1.0).then(a.1.1.cmp(&b.1.1)))
                .expect("theta <= n leaves one");
            chosen.push(left.remove(pos));
        }
        chosen
    }
}

/// The mean of the `beta` values of `v` (sorted) closest to their median.
fn mean_around_median(v: &mut [f32], beta: usize) -> f32 {
    v.sort_unstable_by(f32::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        f64::from(v[n / 2])
    } else {
        0.5 * (f64::from(v[n / 2 - 1]) + f64::from(v[n / 2]))
    };
    // The closest values form a window of the sorted values: grow it from
    // the middle toward the nearer side (the lower one on a tie).
    let (mut lo, mut hi) = ((n - 1) / 2, (n - 1) / 2 + 1); // [lo, hi)
    while hi - lo < beta {
        let take_low =
            lo > 0 && (hi == n || (median - f64::from(v[lo - 1])) <= (f64::from(v[hi]) - median));
        if take_low {
            lo -= 1;
        } else {
            hi += 1;
        }
    }
    let sum: f64 = v[lo..hi].iter().map(|&x| f64::from(x)).sum();
    (sum / beta as f64) as f32
}

impl Aggregator for Bulyan {
    fn name(&self) -> String {
        format!("bulyan(f={})", self.f)
    }

    fn min_updates(&self) -> usize {
        4 * self.f + 3
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> fedcore::Result<Aggregate> {
        let first = ensure_at_least(self, updates)?;
        let xs = points(updates);
        // Ties go to the smaller client id: input order never matters.
        let mut by_id: Vec<usize> = (0..xs.len()).collect();
        by_id.sort_by(|&a, &b| updates[a].client.cmp(&updates[b].client));
        let mut rank = vec![0; xs.len()];
        for (r, &i) in by_id.iter().enumerate() {
            rank[i] = r;
        }
        let chosen = self.select(&xs, &rank);
        let theta = chosen.len();
        let beta = theta - 2 * self.f;
        let mut out = first.values.zeros_like();
        let selected: Vec<&[f32]> = chosen.iter().map(|&i| xs[i]).collect();
        out.as_mut_slice()
            .par_chunks_mut(4096)
            .enumerate()
            .for_each(|(c, block)| {
                let mut column = vec![0.0f32; theta];
                for (k, o) in block.iter_mut().enumerate() {
                    let j = c * 4096 + k;
                    for (v, x) in column.iter_mut().zip(&selected) {
                        *v = x[j];
                    }
                    *o = mean_around_median(&mut column, beta);
                }
            });
        let mut weights = vec![0.0f64; xs.len()];
        for &i in &chosen {
            weights[i] = 1.0 / theta as f64;
        }
        let clients = diagnostics_by_distance(updates, &xs, out.as_slice(), Some(weights));
        Ok(Aggregate {
            parameters: out,
            clients,
            metrics: [
                ("selected".to_owned(), theta as f64),
                ("averaged_per_coordinate".to_owned(), beta as f64),
            ]
            .into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_the_values_closest_to_the_median() {
        // Median 3; the three closest are 2, 3, 4 (not 3, 4, 5 or 1, 2, 3).
        assert_eq!(
            mean_around_median(&mut [5.0, 1.0, 3.0, 2.0, 4.0, 100.0, -50.0], 3),
            3.0
        );
        // Median 10; 9 and 11 are as close: the lower side wins the tie.
        assert_eq!(mean_around_median(&mut [9.0, 10.0, 11.0], 2), 9.5);
        // Even count: median 2.5 of [1, 2, 3, 40]; closest two: 2, 3.
        assert_eq!(mean_around_median(&mut [40.0, 3.0, 1.0, 2.0], 2), 2.5);
        assert_eq!(mean_around_median(&mut [7.0], 1), 7.0);
    }
}
