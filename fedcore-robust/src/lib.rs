//! # fedcore-robust
//!
//! Byzantine-robust aggregation for `fedcore`: aggregators that bound the
//! influence of clients that send arbitrary updates, and pre-aggregation
//! steps that compose in front of any of them.
//!
//! | aggregator | tolerates | weights |
//! |---|---|---|
//! | [`GeometricMedian`] (smoothed Weiszfeld) | < 1/2 of the weight | example counts or uniform |
//! | [`CoordinateMedian`] | < 1/2 per coordinate | ignored |
//! | [`TrimmedMean`] (beta) | beta per coordinate | ignored |
//! | [`Krum`] / Multi-Krum (f, m) | f with n > 2f + 2 | ignored |
//! | [`Bulyan`] (f): Krum selection, then the mean around each coordinate's median | f with n >= 4f + 3 | ignored |
//! | [`CenteredClipping`] (tau, L): offsets from the last aggregate clipped to tau | a minority (the paper, with worker momentum): f attackers move the result by at most f·tau/n per iteration | ignored |
//! | [`Mean`] | nothing (the baseline) | example counts or uniform |
//!
//! Pre-aggregation: [`NormClip`] (fixed or median threshold) and [`Nnm`]
//! (nearest-neighbour mixing), composed with [`PreAggregated`].
//!
//! Every aggregator works on the flat parameter vectors in cache-sized
//! blocks spread over all cores (rayon) and passes the core contract suite
//! (`fedcore::contract`). Each reports per-client diagnostics: the weight it
//! gave the update, the update's distance to the aggregate, and a trust score
//! in `[0, 1]` ([`trust_from_distances`]).
//!
//! ## Getting started
//!
//! ```
//! use fedcore::{Aggregator, ClientUpdate, Parameters};
//! use fedcore_robust::{GeometricMedianParams, KrumParams, TrimmedMeanParams};
//!
//! let update = |i: usize, v: f32| {
//!     let p = Parameters::from_tensors([("w", vec![3], vec![v, v, v])]).unwrap();
//!     ClientUpdate::new(format!("hospital-{i}").into(), 1, 100, p)
//! };
//! // Four honest hospitals near 1.0, one sending a huge update.
//! let updates: Vec<_> = [1.0, 1.1, 0.9, 1.05, 1e9].iter().enumerate().map(|(i, &v)| update(i, v)).collect();
//!
//! let mut aggregators: Vec<Box<dyn Aggregator>> = vec![
//!     Box::new(GeometricMedianParams::new().check()?),
//!     Box::new(TrimmedMeanParams::new(0.2).check()?),
//!     Box::new(KrumParams::new(5, 1).check()?),
//! ];
//! for agg in &mut aggregators {
//!     let out = agg.aggregate(&updates)?;
//!     assert!((out.parameters.as_slice()[0] - 1.0).abs() < 0.1, "{}", agg.name());
//!     assert!(out.clients[4].trust.unwrap() < 0.01, "the outlier is not trusted");
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

pub mod attacks;
mod bulyan;
mod clipping;
mod error;
mod geomed;
mod kernels;
mod krum;
mod median;
mod pre;

use fedcore::{ClientDiagnostics, ClientUpdate, Error, FedAvg};

pub use bulyan::{Bulyan, BulyanParams};
pub use clipping::{CenteredClipping, CenteredClippingParams};
pub use error::ParamsError;
pub use geomed::{
    GRAM_MAX_POINTS, GeometricMedian, GeometricMedianParams, GramError, GramSlack, GramWeiszfeld,
    Method, Weiszfeld, check_gram,
};
pub use krum::{Krum, KrumParams};
pub use median::{CoordinateMedian, TrimmedMean, TrimmedMeanParams};
pub use pre::{Nnm, NormClip, PreAggregated, PreAggregation};

/// How an aggregator weighs clients (fedcore's, shared with the contract suite).
pub use fedcore::aggregate::Weighting;

/// Per-client weights `alpha_i` for a weighting, positive and finite.
pub(crate) fn alphas(updates: &[ClientUpdate], weighting: Weighting) -> fedcore::Result<Vec<f64>> {
    match weighting {
        Weighting::Uniform => Ok(vec![1.0; updates.len()]),
        Weighting::ExampleCounts => weighting.weights(updates),
    }
}

pub(crate) fn points(updates: &[ClientUpdate]) -> Vec<&[f32]> {
    updates.iter().map(|u| u.values.as_slice()).collect()
}

/// Trust in `[0, 1]` from each client's distance to the robust aggregate:
/// 1 at or below the median distance, `median / distance` beyond it, so an
/// update ten times farther than the typical one gets 0.1.
pub fn trust_from_distances(distances: &[f64]) -> Vec<f64> {
    let mut sorted: Vec<f64> = distances.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let median = sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(0.0);
    distances
        .iter()
        .map(|&d| {
            if d <= median || d <= 0.0 {
                1.0
            } else {
                (median / d).clamp(0.0, 1.0)
            }
        })
        .collect()
}

/// Diagnostics with distances to `aggregate`, trust from them, and the given
/// weights (uniform when `None`).
pub(crate) fn diagnostics_by_distance(
    updates: &[ClientUpdate],
    xs: &[&[f32]],
    aggregate: &[f32],
    weights: Option<Vec<f64>>,
) -> Vec<ClientDiagnostics> {
    let distances: Vec<f64> = kernels::sq_dists_to(xs, aggregate)
        .into_iter()
        .map(f64::sqrt)
        .collect();
    let trust = trust_from_distances(&distances);
    let weights = weights.unwrap_or_else(|| vec![1.0 / updates.len() as f64; updates.len()]);
    updates
        .iter()
        .zip(distances.into_iter().zip(trust).zip(weights))
        .map(|(u, ((distance, trust), weight))| ClientDiagnostics {
            client: u.client.clone(),
            weight,
            distance: Some(distance),
            trust: Some(trust),
        })
        .collect()
}

/// The (weighted) mean: [`FedAvg`] with example counts, or the plain mean.
/// Not robust; the baseline the others are compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mean {
    /// How clients are weighted.
    pub weighting: Weighting,
}

impl fedcore::Aggregator for Mean {
    fn name(&self) -> String {
        match self.weighting {
            Weighting::ExampleCounts => "mean(examples)".into(),
            Weighting::Uniform => "mean(uniform)".into(),
        }
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> fedcore::Result<fedcore::Aggregate> {
        match self.weighting {
            Weighting::ExampleCounts => FedAvg.aggregate(updates),
            Weighting::Uniform => {
                let first = fedcore::aggregate::ensure_aggregatable(updates)?;
                let xs = points(updates);
                let n = xs.len();
                let mut out = first.values.zeros_like();
                fedcore::aggregate::weighted_sum_into(
                    &xs,
                    &vec![1.0 / n as f32; n],
                    out.as_mut_slice(),
                )?;
                let clients = updates
                    .iter()
                    .map(|u| ClientDiagnostics {
                        client: u.client.clone(),
                        weight: 1.0 / n as f64,
                        distance: None,
                        trust: None,
                    })
                    .collect();
                Ok(fedcore::Aggregate {
                    parameters: out,
                    clients,
                    metrics: fedcore::Metrics::new(),
                })
            }
        }
    }
}

/// Turns a `ParamsError` into the core error, for `?` in code that returns
/// `fedcore::Result`.
impl From<ParamsError> for Error {
    fn from(e: ParamsError) -> Self {
        Error::InvalidParams(Box::new(e))
    }
}
