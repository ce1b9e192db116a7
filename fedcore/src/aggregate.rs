//! The `Aggregator` trait, what it returns, and FedAvg.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::params::Parameters;
use crate::update::{ClientId, ClientUpdate, Metrics};

/// How one client's update entered an aggregate, so that the server and the
/// dashboard can explain each round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientDiagnostics {
    /// The client.
    pub client: ClientId,
    /// The weight its update received in the aggregate (weights sum to 1 for
    /// averaging aggregators; 0 means it was left out).
    pub weight: f64,
    /// Its L2 distance to the aggregate, where the aggregator computed it.
    pub distance: Option<f64>,
    /// A trust score in `[0, 1]`, where the aggregator computes one.
    pub trust: Option<f64>,
}

/// The result of aggregating one round of updates.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// The aggregated update, in the updates' layout.
    pub parameters: Parameters,
    /// One entry per input update, in input order.
    pub clients: Vec<ClientDiagnostics>,
    /// Aggregator-specific numbers (iterations, objective, ...).
    pub metrics: Metrics,
}

/// Combines client updates into one.
///
/// Implementations receive only validated updates (same layout, finite values,
/// positive example counts) from the server, but must still return a typed
/// error, never panic, on empty input or mismatched layouts: they are also
/// called directly by users. Every aggregator of the workspace runs the
/// contract suite in `fedcore::contract` (feature `testkit`).
pub trait Aggregator: Send {
    /// A short name for logs and the dashboard, e.g. `fedavg`.
    fn name(&self) -> String;

    /// Aggregates `updates` (deltas, all in one layout).
    fn aggregate(&mut self, updates: &[ClientUpdate]) -> Result<Aggregate>;

    /// [`Self::aggregate`], writing the aggregate into `buffer` where the
    /// rule can: an earlier aggregate the caller no longer needs (the
    /// server passes the last round's). A fresh 7M-value output costs more
    /// in first-touch page faults than FedAvg's whole pass over three
    /// updates; a reused one costs none. Must return what `aggregate`
    /// returns; a buffer of another layout is ignored. The default ignores
    /// it.
    fn aggregate_into(
        &mut self,
        updates: &[ClientUpdate],
        buffer: Parameters,
    ) -> Result<Aggregate> {
        drop(buffer);
        self.aggregate(updates)
    }

    /// The fewest updates this aggregator can work with (Krum: `2f + 3`).
    /// The server refuses a quorum below it.
    fn min_updates(&self) -> usize {
        1
    }

    /// What it carries from round to round (centered clipping's center),
    /// saved with every checkpoint so that a resumed run continues bit for
    /// bit; `None` (the default) for a rule without state.
    fn state(&self) -> Option<Vec<f32>> {
        None
    }

    /// Whether its aggregate is differentially private (central DP, e.g.
    /// `fedcore_dp::Dp`): strategies that would release other functions of
    /// the raw updates next to it (SCAFFOLD's control variate) refuse it.
    /// False by default; wrappers pass their inner rule's answer on.
    fn privatizes(&self) -> bool {
        false
    }

    /// Takes back what [`Self::state`] returned, on resume. The default
    /// refuses: a rule without state has nothing to restore.
    fn restore(&mut self, state: Vec<f32>) -> Result<()> {
        Err(crate::Error::InvalidConfig(format!(
            "`{}` keeps no state, but the checkpoint holds {} values for it",
            self.name(),
            state.len()
        )))
    }
}

impl<A: Aggregator + ?Sized> Aggregator for Box<A> {
    fn name(&self) -> String {
        (**self).name()
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> Result<Aggregate> {
        (**self).aggregate(updates)
    }

    fn aggregate_into(
        &mut self,
        updates: &[ClientUpdate],
        buffer: Parameters,
    ) -> Result<Aggregate> {
        (**self).aggregate_into(updates, buffer)
    }

    fn min_updates(&self) -> usize {
        (**self).min_updates()
    }

    fn state(&self) -> Option<Vec<f32>> {
        (**self).state()
    }

    fn privatizes(&self) -> bool {
        (**self).privatizes()
    }

    fn restore(&mut self, state: Vec<f32>) -> Result<()> {
        (**self).restore(state)
    }
}

/// Checks what every aggregator needs: at least one update, one layout for
/// all. Returns the first update for convenience.
///
/// Aggregators with a larger minimum check it with [`ensure_at_least`].
pub fn ensure_aggregatable(updates: &[ClientUpdate]) -> Result<&ClientUpdate> {
    let first = updates.first().ok_or(Error::EmptyUpdates)?;
    for u in &updates[1..] {
        first.values.ensure_compatible(&u.values)?;
    }
    Ok(first)
}

/// [`ensure_aggregatable`] plus a minimum count, reported as
/// [`Error::TooFewUpdates`] naming `aggregator`.
pub fn ensure_at_least<'a>(
    aggregator: &dyn Aggregator,
    updates: &'a [ClientUpdate],
) -> Result<&'a ClientUpdate> {
    let first = ensure_aggregatable(updates)?;
    let needed = aggregator.min_updates();
    if updates.len() < needed {
        return Err(Error::TooFewUpdates {
            aggregator: aggregator.name(),
            needed,
            got: updates.len(),
        });
    }
    Ok(first)
}

/// How an aggregator weighs clients: what it promises about
/// [`ClientUpdate::num_examples`] (the contract suite checks the promise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Weighting {
    /// By their example counts, the FedAvg weighting (FedAvg, weighted
    /// median, weighted geometric median).
    #[default]
    ExampleCounts,
    /// Every client alike: example counts are ignored (Krum, the
    /// coordinate median, the trimmed mean).
    Uniform,
}

impl Weighting {
    /// Each update's weight under this weighting; the weights sum to 1.
    /// Under [`Weighting::ExampleCounts`] updates that all report zero
    /// examples are [`Error::InvalidWeights`].
    pub fn weights(self, updates: &[ClientUpdate]) -> Result<Vec<f64>> {
        match self {
            Weighting::Uniform => Ok(vec![1.0 / updates.len() as f64; updates.len()]),
            Weighting::ExampleCounts => {
                let total: f64 = updates.iter().map(|u| u.num_examples as f64).sum();
                if total <= 0.0 {
                    return Err(Error::InvalidWeights {
                        reason: "every update reports zero examples".into(),
                    });
                }
                Ok(updates
                    .iter()
                    .map(|u| u.num_examples as f64 / total)
                    .collect())
            }
        }
    }
}

/// Elements per parallel work item: 64 KiB of f32, small enough that the
/// output chunk stays in L2 while every input streams through once.
pub const CHUNK: usize = 16 * 1024;

/// `out = sum_i weights[i] * inputs[i]`, split across threads by chunks of the
/// output. Every input must have `out.len()` elements.
pub fn weighted_sum_into(inputs: &[&[f32]], weights: &[f32], out: &mut [f32]) -> Result<()> {
    if inputs.len() != weights.len() {
        return Err(Error::DimensionMismatch {
            expected: inputs.len(),
            got: weights.len(),
        });
    }
    if let Some(bad) = inputs.iter().find(|x| x.len() != out.len()) {
        return Err(Error::DimensionMismatch {
            expected: out.len(),
            got: bad.len(),
        });
    }
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let range = c * CHUNK..c * CHUNK + o.len();
        // Up to four inputs per pass over the chunk: fewer loads and stores
        // of `o` than one pass per input. Each value still adds its terms
        // one at a time, in input order, from 0: the result is the same, bit
        // for bit, as `o = 0; for each input, o += w x`.
        let mut first = true;
        for (xs, ws) in inputs.chunks(4).zip(weights.chunks(4)) {
            let x = |k: usize| &xs[k][range.clone()];
            match xs.len() {
                4 => add_terms(
                    o,
                    [x(0), x(1), x(2), x(3)],
                    [ws[0], ws[1], ws[2], ws[3]],
                    first,
                ),
                3 => add_terms(o, [x(0), x(1), x(2)], [ws[0], ws[1], ws[2]], first),
                2 => add_terms(o, [x(0), x(1)], [ws[0], ws[1]], first),
                _ => add_terms(o, [x(0)], [ws[0]], first),
            }
            first = false;
        }
        if first {
            o.fill(0.0);
        }
    });
    Ok(())
}

/// `o[i] = (start + w[0] x[0][i]) + w[1] x[1][i] + ...`, left to right,
/// where `start` is 0 when `fresh` and `o[i]` otherwise. Every `x[k]` has
/// `o.len()` values.
#[inline(always)]
fn add_terms<const K: usize>(o: &mut [f32], x: [&[f32]; K], w: [f32; K], fresh: bool) {
    let n = o.len();
    let x = x.map(|v| &v[..n]);
    if fresh {
        for (i, out) in o.iter_mut().enumerate() {
            let mut v = 0.0f32;
            for k in 0..K {
                v += w[k] * x[k][i];
            }
            *out = v;
        }
    } else {
        for (i, out) in o.iter_mut().enumerate() {
            let mut v = *out;
            for k in 0..K {
                v += w[k] * x[k][i];
            }
            *out = v;
        }
    }
}

/// Federated averaging (McMahan et al., 2017): the mean of the updates weighted
/// by their example counts. The reference aggregator.
///
/// ```
/// use fedcore::{Aggregator, ClientUpdate, FedAvg, Parameters};
/// let p = |v: f32| Parameters::from_tensors([("w", vec![2], vec![v, -v])]).unwrap();
/// let updates = [
///     ClientUpdate::new("a".into(), 1, 30, p(1.0)),
///     ClientUpdate::new("b".into(), 1, 10, p(5.0)),
/// ];
/// let agg = FedAvg.aggregate(&updates)?;
/// assert_eq!(agg.parameters.as_slice(), &[2.0, -2.0]);
/// assert_eq!(agg.clients[0].weight, 0.75);
/// # Ok::<(), fedcore::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct FedAvg;

impl Aggregator for FedAvg {
    fn name(&self) -> String {
        "fedavg".into()
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> Result<Aggregate> {
        fedavg(updates, None)
    }

    fn aggregate_into(
        &mut self,
        updates: &[ClientUpdate],
        buffer: Parameters,
    ) -> Result<Aggregate> {
        fedavg(updates, Some(buffer))
    }
}

/// Where an aggregate of updates shaped like `like` goes: `buffer` (a
/// caller's earlier output, see [`Aggregator::aggregate_into`]) when it
/// has `like`'s layout, else new zeros. The rule must overwrite every value.
pub fn output_buffer(like: &Parameters, buffer: Option<Parameters>) -> Parameters {
    match buffer {
        Some(b) if like.ensure_compatible(&b).is_ok() => b,
        _ => like.zeros_like(),
    }
}

/// `agg`'s aggregate of `updates`, into `buffer` if there is one: how a
/// rule that wraps another passes the server's buffer on.
pub fn aggregate_maybe_into<A: Aggregator + ?Sized>(
    agg: &mut A,
    updates: &[ClientUpdate],
    buffer: Option<Parameters>,
) -> Result<Aggregate> {
    match buffer {
        Some(b) => agg.aggregate_into(updates, b),
        None => agg.aggregate(updates),
    }
}

/// FedAvg into `buffer` when it has the updates' layout, else into a new
/// one ([`weighted_sum_into`] overwrites every value).
fn fedavg(updates: &[ClientUpdate], buffer: Option<Parameters>) -> Result<Aggregate> {
    let first = ensure_aggregatable(updates)?;
    let weights = Weighting::ExampleCounts.weights(updates)?;
    let inputs: Vec<&[f32]> = updates.iter().map(|u| u.values.as_slice()).collect();
    let w32: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let mut out = output_buffer(&first.values, buffer);
    weighted_sum_into(&inputs, &w32, out.as_mut_slice())?;
    Ok(Aggregate {
        parameters: out,
        clients: updates
            .iter()
            .zip(weights)
            .map(|(u, weight)| ClientDiagnostics {
                client: u.client.clone(),
                weight,
                distance: None,
                trust: None,
            })
            .collect(),
        metrics: Metrics::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavg_into_a_used_buffer_equals_fedavg_and_ignores_another_layout() {
        let p = |v: Vec<f32>| Parameters::from_tensors([("w", vec![v.len()], v)]).unwrap();
        let updates = [
            ClientUpdate::new("a".into(), 1, 30, p(vec![1.0, -1.0, 3.0])),
            ClientUpdate::new("b".into(), 1, 10, p(vec![5.0, 2.0, -7.0])),
        ];
        let fresh = FedAvg.aggregate(&updates).unwrap();
        // A buffer full of old values: every one is overwritten.
        let used = p(vec![f32::NAN, 1e30, -4.0]);
        let into = FedAvg.aggregate_into(&updates, used).unwrap();
        assert_eq!(into.parameters, fresh.parameters);
        assert_eq!(into.clients, fresh.clients);
        // Another layout is not written into: the result is FedAvg's.
        let other = FedAvg.aggregate_into(&updates, p(vec![0.0; 4])).unwrap();
        assert_eq!(other.parameters, fresh.parameters);
        // Errors are aggregate's.
        assert!(FedAvg.aggregate_into(&[], p(vec![0.0; 3])).is_err());
    }

    #[test]
    fn weighted_sum_matches_naive_across_chunk_edges() {
        let d = 3 * CHUNK + 17;
        let xs: Vec<Vec<f32>> = (0..4)
            .map(|k| {
                (0..d)
                    .map(|i| ((i * 7 + k * 13) % 101) as f32 - 50.0)
                    .collect()
            })
            .collect();
        let w = [0.1f32, 0.2, 0.3, 0.4];
        let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let mut out = vec![f32::NAN; d];
        weighted_sum_into(&refs, &w, &mut out).unwrap();
        for i in 0..d {
            let expect: f64 = (0..4).map(|k| f64::from(w[k]) * f64::from(xs[k][i])).sum();
            assert!((f64::from(out[i]) - expect).abs() < 1e-4, "index {i}");
        }
    }

    #[test]
    fn weighted_sum_adds_each_term_in_input_order_bit_for_bit() {
        // Passes of up to four inputs must give what one input at a time
        // gives, to the bit, for every count of inputs (groups of 4, 4 + 1,
        // 4 + 4 + 3, ...), with values whose sums round differently in
        // another order, and -0.0 (0 + -0 is +0).
        let d = CHUNK + 5;
        for n in 0..=9usize {
            let xs: Vec<Vec<f32>> = (0..n)
                .map(|k| {
                    (0..d)
                        .map(|i| match (i + k) % 5 {
                            0 => -0.0,
                            1 => 1e8,
                            2 => -1e8,
                            _ => ((i * 31 + k * 17) % 97) as f32 * 0.013 - 0.6,
                        })
                        .collect()
                })
                .collect();
            let w: Vec<f32> = (0..n).map(|k| 0.3 + k as f32 * 0.11).collect();
            let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let mut out = vec![f32::NAN; d];
            weighted_sum_into(&refs, &w, &mut out).unwrap();
            for i in 0..d {
                let mut expect = 0.0f32;
                for k in 0..n {
                    expect += w[k] * xs[k][i];
                }
                assert_eq!(out[i].to_bits(), expect.to_bits(), "n {n}, index {i}");
            }
        }
    }

    #[test]
    fn weighted_sum_rejects_wrong_lengths() {
        let a = [1.0f32; 3];
        let b = [1.0f32; 2];
        let mut out = [0.0f32; 3];
        assert!(weighted_sum_into(&[&a, &b], &[0.5, 0.5], &mut out).is_err());
        assert!(weighted_sum_into(&[&a], &[0.5, 0.5], &mut out).is_err());
    }

    #[test]
    fn zero_examples_everywhere_is_an_error() {
        let p = Parameters::from_tensors([("w", vec![1], vec![1.0])]).unwrap();
        let u = ClientUpdate::new("a".into(), 1, 0, p);
        assert!(matches!(
            FedAvg.aggregate(&[u]),
            Err(Error::InvalidWeights { .. })
        ));
    }
}
