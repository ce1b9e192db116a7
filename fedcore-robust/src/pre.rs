//! Pre-aggregation steps that compose in front of any aggregator.

use fedcore::aggregate::{aggregate_maybe_into, ensure_aggregatable};
use fedcore::{Aggregate, Aggregator, ClientUpdate};

use crate::error::ParamsError;
use crate::kernels::pairwise_sq_dists;
use crate::points;

/// A transformation of a round's updates before aggregation.
pub trait PreAggregation: Send {
    /// A short name, e.g. `clip(median)`.
    fn name(&self) -> String;

    /// The transformed updates, one per input, in input order.
    fn apply(&self, updates: &[ClientUpdate]) -> fedcore::Result<Vec<ClientUpdate>>;

    /// The fewest updates this step can work with.
    fn min_updates(&self) -> usize {
        1
    }
}

/// An aggregator preceded by pre-aggregation steps, itself an [`Aggregator`].
///
/// ```
/// use fedcore_robust::{CoordinateMedian, NormClip, Nnm, PreAggregated};
/// let agg = PreAggregated::new(CoordinateMedian)
///     .with(NormClip::median())
///     .with(Nnm::new(1));
/// assert_eq!(fedcore::Aggregator::name(&agg), "clip(median)+nnm(f=1)+median");
/// ```
pub struct PreAggregated<A> {
    steps: Vec<Box<dyn PreAggregation>>,
    inner: A,
}

impl<A: Aggregator> PreAggregated<A> {
    /// `inner` with no steps yet.
    pub fn new(inner: A) -> Self {
        Self {
            steps: Vec::new(),
            inner,
        }
    }

    /// Appends a step; steps run in the order they were added.
    pub fn with(mut self, step: impl PreAggregation + 'static) -> Self {
        self.steps.push(Box::new(step));
        self
    }
}

impl<A: Aggregator> Aggregator for PreAggregated<A> {
    fn name(&self) -> String {
        let mut parts: Vec<String> = self.steps.iter().map(|s| s.name()).collect();
        parts.push(self.inner.name());
        parts.join("+")
    }

    fn min_updates(&self) -> usize {
        self.steps
            .iter()
            .map(|s| s.min_updates())
            .fold(self.inner.min_updates(), usize::max)
    }

    fn state(&self) -> Option<Vec<f32>> {
        self.inner.state()
    }

    fn privatizes(&self) -> bool {
        self.inner.privatizes()
    }

    fn restore(&mut self, state: Vec<f32>) -> fedcore::Result<()> {
        self.inner.restore(state)
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> fedcore::Result<Aggregate> {
        self.aggregate_with(updates, None)
    }

    fn aggregate_into(
        &mut self,
        updates: &[ClientUpdate],
        buffer: fedcore::Parameters,
    ) -> fedcore::Result<Aggregate> {
        self.aggregate_with(updates, Some(buffer))
    }
}

impl<A: Aggregator> PreAggregated<A> {
    /// The steps, then the inner rule (into `buffer` where it can).
    fn aggregate_with(
        &mut self,
        updates: &[ClientUpdate],
        buffer: Option<fedcore::Parameters>,
    ) -> fedcore::Result<Aggregate> {
        ensure_aggregatable(updates)?;
        let mut current: Option<Vec<ClientUpdate>> = None;
        for step in &self.steps {
            current = Some(step.apply(current.as_deref().unwrap_or(updates))?);
        }
        let inputs = current.as_deref().unwrap_or(updates);
        let mut agg = aggregate_maybe_into(&mut self.inner, inputs, buffer)?;
        if !self.steps.is_empty() {
            // Distances to the original updates are what the dashboard should
            // show, and trust follows the same distances (the inner
            // aggregator only saw the clipped or mixed updates, in which an
            // outlier looks closer than it was).
            let xs = points(updates);
            let dist: Vec<f64> = crate::kernels::sq_dists_to(&xs, agg.parameters.as_slice())
                .into_iter()
                .map(f64::sqrt)
                .collect();
            let trust = crate::trust_from_distances(&dist);
            for ((d, dist), t) in agg.clients.iter_mut().zip(dist).zip(trust) {
                d.distance = Some(dist);
                if d.trust.is_some() {
                    d.trust = Some(t);
                }
            }
        }
        Ok(agg)
    }
}

/// How [`NormClip`] picks its threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Threshold {
    Fixed(f64),
    Median,
}

/// Scales every update whose L2 norm exceeds a threshold down to it: a
/// fixed value, or the round's median norm (adaptive; needs no tuning).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormClip {
    threshold: Threshold,
}

impl NormClip {
    /// Clip to `tau`, which must be positive and finite.
    pub fn fixed(tau: f64) -> Result<Self, ParamsError> {
        if !(tau.is_finite() && tau > 0.0) {
            return Err(ParamsError::new(
                "norm clip",
                format!("tau must be positive, got {tau}"),
            ));
        }
        Ok(Self {
            threshold: Threshold::Fixed(tau),
        })
    }

    /// Clip to the median norm of the round's updates.
    pub fn median() -> Self {
        Self {
            threshold: Threshold::Median,
        }
    }
}

impl PreAggregation for NormClip {
    fn name(&self) -> String {
        match self.threshold {
            Threshold::Fixed(t) => format!("clip({t})"),
            Threshold::Median => "clip(median)".into(),
        }
    }

    fn apply(&self, updates: &[ClientUpdate]) -> fedcore::Result<Vec<ClientUpdate>> {
        let norms: Vec<f64> = updates.iter().map(|u| u.values.l2_norm()).collect();
        let tau = match self.threshold {
            Threshold::Fixed(t) => t,
            Threshold::Median => {
                let mut sorted = norms.clone();
                sorted.sort_unstable_by(f64::total_cmp);
                let n = sorted.len();
                if n % 2 == 1 {
                    sorted[n / 2]
                } else {
                    0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
                }
            }
        };
        Ok(updates
            .iter()
            .zip(norms)
            .map(|(u, norm)| {
                let mut values = u.values.clone();
                if norm > tau {
                    values.scale((tau / norm) as f32);
                }
                u.with_values(values)
            })
            .collect())
    }
}

/// Nearest-neighbour mixing (Allouah et al., 2023): each update is replaced
/// by the mean of its `n - f` nearest updates (itself included), which makes
/// the following aggregator robust under heterogeneous (non-IID) data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nnm {
    f: usize,
}

impl Nnm {
    /// Mixing that tolerates `f` Byzantine updates.
    pub fn new(f: usize) -> Self {
        Self { f }
    }
}

impl PreAggregation for Nnm {
    fn name(&self) -> String {
        format!("nnm(f={})", self.f)
    }

    fn min_updates(&self) -> usize {
        self.f + 1
    }

    fn apply(&self, updates: &[ClientUpdate]) -> fedcore::Result<Vec<ClientUpdate>> {
        let first = ensure_aggregatable(updates)?;
        let n = updates.len();
        if self.f >= n {
            return Err(fedcore::Error::TooFewUpdates {
                aggregator: self.name(),
                needed: self.f + 1,
                got: n,
            });
        }
        let xs = points(updates);
        let d2 = pairwise_sq_dists(&xs);
        let k = n - self.f;
        (0..n)
            .map(|i| {
                let mut near: Vec<usize> = (0..n).collect();
                near.sort_by(|&a, &b| {
                    d2[i * n + a]
                        .total_cmp(&d2[i * n + b])
                        .then_with(|| updates[a].client.cmp(&updates[b].client))
                });
                let chosen: Vec<&[f32]> = near[..k].iter().map(|&j| xs[j]).collect();
                let mut mixed = first.values.zeros_like();
                fedcore::aggregate::weighted_sum_into(
                    &chosen,
                    &vec![1.0 / k as f32; k],
                    mixed.as_mut_slice(),
                )?;
                Ok(updates[i].with_values(mixed))
            })
            .collect()
    }
}
