//! The pieces of one round that the orchestrator and multi-step strategies
//! share: sampling, seeds, sending tasks and collecting replies under a
//! deadline, validating updates, averaging metrics.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tracing::warn;

use crate::events::ClientFailure;
use crate::params::Parameters;
use crate::transport::{Failure, Rejection, Reply, Task, Transport};
use crate::update::{ClientId, ClientUpdate, Metrics, UpdateKind};

/// Sends one task to each client and waits for the replies until the
/// round deadline. Returns the replies (one per client at most, from
/// clients that were asked) and the failures.
pub(crate) fn dispatch(
    transport: &mut dyn Transport,
    timeout: Duration,
    clients: &[ClientId],
    mut task: impl FnMut(&ClientId) -> Task,
) -> (Vec<(ClientId, Reply)>, Vec<ClientFailure>) {
    let (tx, rx) = mpsc::channel();
    let mut pending: BTreeSet<ClientId> = BTreeSet::new();
    let mut failures = Vec::new();
    for client in clients {
        match transport.send(client, task(client), tx.clone()) {
            Ok(()) => {
                pending.insert(client.clone());
            }
            Err(e) => failures.push(ClientFailure::new(
                client.clone(),
                Failure::Disconnected(e.to_string()),
            )),
        }
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut replies = Vec::new();
    let mut answered: BTreeSet<ClientId> = BTreeSet::new();
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let envelope = match rx.recv_timeout(left) {
            Ok(e) => e,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        };
        let client = envelope.client;
        if !pending.remove(&client) {
            let reason = if answered.contains(&client) {
                Rejection::Duplicate
            } else {
                Rejection::NotSampled
            };
            // Not sampled: never part of this round's record, but logged.
            if reason == Rejection::NotSampled {
                warn!(client = %client, "reply from a client that was not asked");
            } else {
                failures.push(ClientFailure::new(client, Failure::Rejected(reason)));
            }
            continue;
        }
        answered.insert(client.clone());
        match envelope.reply {
            Ok(r) => replies.push((client, r)),
            Err(reason) => failures.push(ClientFailure::new(client, reason)),
        }
    }
    let waited = timeout.as_millis() as u64;
    failures.extend(
        pending
            .into_iter()
            .map(|client| ClientFailure::new(client, Failure::Timeout(waited))),
    );
    (replies, failures)
}

/// Checks one update against the round; returns it as a delta with its norm.
pub(crate) fn validate(
    global: &Parameters,
    round: u64,
    from: &ClientId,
    mut update: ClientUpdate,
) -> std::result::Result<(ClientUpdate, f64), Rejection> {
    if &update.client != from {
        return Err(Rejection::IdentityMismatch {
            claimed: update.client,
        });
    }
    if update.round != round {
        return Err(Rejection::StaleRound {
            expected: round,
            got: update.round,
        });
    }
    if update.num_examples == 0 {
        return Err(Rejection::NoExamples);
    }
    global
        .ensure_compatible(&update.values)
        .map_err(|e| Rejection::Layout {
            detail: e.to_string(),
        })?;
    // Squares of f32 values cannot overflow f64, so a non-finite sum means a
    // non-finite value: one pass in the common case.
    let sq: f64 = update
        .values
        .as_slice()
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum();
    if !sq.is_finite()
        && let Some(nf) = update.values.first_non_finite()
    {
        return Err(Rejection::NonFinite(nf));
    }
    let norm = if update.kind == UpdateKind::Weights {
        update.values = update.values.sub(global).map_err(|e| Rejection::Layout {
            detail: e.to_string(),
        })?;
        update.kind = UpdateKind::Delta;
        update.values.l2_norm()
    } else {
        sq.sqrt()
    };
    Ok((update, norm))
}

/// Checks an update's extra tensors against what the strategy sent with the
/// fit request: the same layout and finite, or none when none was sent.
pub(crate) fn validate_extra(
    sent: Option<&Parameters>,
    (update, norm): (ClientUpdate, f64),
) -> std::result::Result<(ClientUpdate, f64), Rejection> {
    let refuse = |detail: String| Err(Rejection::Strategy { detail });
    match (sent, &update.extra) {
        (None, None) => {}
        (None, Some(_)) => return refuse("extra tensors that the strategy did not ask for".into()),
        (Some(_), None) => return refuse("no extra tensors, which the strategy asked for".into()),
        (Some(sent), Some(got)) => {
            if let Err(e) = sent.ensure_compatible(got) {
                return refuse(format!("extra tensors: {e}"));
            }
            if let Some(nf) = got.first_non_finite() {
                return Err(Rejection::NonFinite(nf));
            }
        }
    }
    Ok((update, norm))
}

/// Example-weighted mean of each metric over the entries that report it.
pub(crate) fn weighted_metrics<'a>(entries: impl Iterator<Item = (u64, &'a Metrics)>) -> Metrics {
    let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for (n, metrics) in entries {
        for (k, v) in metrics {
            if v.is_finite() {
                let e = sums.entry(k.clone()).or_default();
                e.0 += *v * n as f64;
                e.1 += n as f64;
            }
        }
    }
    sums.into_iter()
        .filter(|(_, (_, w))| *w > 0.0)
        .map(|(k, (s, w))| (k, s / w))
        .collect()
}

/// Samples `max(ceil(fraction * n), min)` clients (at most n), sorted.
pub(crate) fn sample(
    available: &[ClientId],
    fraction: f64,
    min: usize,
    seed: u64,
) -> Vec<ClientId> {
    let n = available.len();
    let k = ((fraction * n as f64).ceil() as usize).max(min).min(n);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx = rand::seq::index::sample(&mut rng, n, k).into_vec();
    idx.sort_unstable();
    idx.into_iter().map(|i| available[i].clone()).collect()
}

/// SplitMix64 finalizer: a well-mixed 64-bit hash of `a` and `b`.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The training seed of `client` in `round`: stable across processes and
/// Rust versions (FNV-1a of the id, not `std`'s randomized hasher).
pub(crate) fn client_seed(seed: u64, round: u64, client: &ClientId) -> u64 {
    let fnv = client
        .as_str()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    mix(mix(seed, round), fnv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<ClientId> {
        (0..n).map(|i| ClientId::new(format!("c{i:02}"))).collect()
    }

    #[test]
    fn sampling_is_seeded_and_respects_bounds() {
        let all = ids(10);
        let a = sample(&all, 0.3, 1, 42);
        assert_eq!(a.len(), 3);
        assert_eq!(a, sample(&all, 0.3, 1, 42));
        assert_eq!(sample(&all, 0.1, 5, 1).len(), 5);
        assert_eq!(sample(&all, 1.0, 20, 1).len(), 10);
        let differs = (0..20).any(|s| sample(&all, 0.3, 1, s) != a);
        assert!(differs, "different seeds should give different samples");
    }

    #[test]
    fn client_seeds_differ_by_client_and_round() {
        let a = ClientId::new("a");
        let b = ClientId::new("b");
        assert_ne!(client_seed(1, 1, &a), client_seed(1, 1, &b));
        assert_ne!(client_seed(1, 1, &a), client_seed(1, 2, &a));
        assert_eq!(client_seed(1, 1, &a), client_seed(1, 1, &a));
    }

    #[test]
    fn validation_reasons() {
        let g = Parameters::from_tensors([("w", vec![2], vec![1.0, 1.0])]).unwrap();
        let a = ClientId::new("a");
        let ok = ClientUpdate::new(a.clone(), 3, 5, g.zeros_like());
        assert!(validate(&g, 3, &a, ok.clone()).is_ok());
        assert!(matches!(
            validate(&g, 3, &ClientId::new("b"), ok.clone()),
            Err(Rejection::IdentityMismatch { .. })
        ));
        assert!(matches!(
            validate(&g, 4, &a, ok.clone()),
            Err(Rejection::StaleRound {
                expected: 4,
                got: 3
            })
        ));
        let mut none = ok.clone();
        none.num_examples = 0;
        assert_eq!(validate(&g, 3, &a, none), Err(Rejection::NoExamples));
        let mut inf = ok.clone();
        inf.values.as_mut_slice()[1] = f32::INFINITY;
        match validate(&g, 3, &a, inf) {
            Err(Rejection::NonFinite(nf)) => assert_eq!((nf.tensor.as_str(), nf.index), ("w", 1)),
            other => panic!("{other:?}"),
        }
        let wrong = Parameters::from_tensors([("w", vec![3], vec![0.0; 3])]).unwrap();
        assert!(matches!(
            validate(&g, 3, &a, ClientUpdate::new(a.clone(), 3, 5, wrong)),
            Err(Rejection::Layout { .. })
        ));
        let weights = ClientUpdate::new(a.clone(), 3, 5, g.with_values(vec![3.0, 0.0]).unwrap())
            .with_kind(UpdateKind::Weights);
        let (delta, norm) = validate(&g, 3, &a, weights).unwrap();
        assert_eq!(delta.values.as_slice(), &[2.0, -1.0]);
        assert!((norm - 5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn metrics_are_example_weighted() {
        let m1: Metrics = [("loss".to_owned(), 1.0)].into();
        let m2: Metrics = [("loss".to_owned(), 4.0), ("acc".to_owned(), 0.5)].into();
        let w = weighted_metrics([(3, &m1), (1, &m2)].into_iter());
        assert_eq!(w["loss"], 1.75);
        assert_eq!(w["acc"], 0.5);
    }
}
