//! Trust over rounds: an exponential moving average of each client's
//! per-round trust score, a threshold that marks it suspicious, and
//! (optionally) sitting out the next round.
//!
//! Per-round scores come from the aggregator ([`crate::ClientDiagnostics::trust`],
//! e.g. from distances to a robust aggregate in `fedcore-robust`); an
//! aggregator that computes none (FedAvg) leaves the averages unchanged. The
//! state is a pure function of the round history, so a resumed server
//! rebuilds it exactly ([`TrustTracker::replay`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::events::RoundRecord;
use crate::update::ClientId;

/// How per-round trust becomes a verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrustPolicy {
    /// Weight of the newest round in the average, in `(0, 1]`
    /// (`ema = smoothing * trust + (1 - smoothing) * ema`; 1 = no memory).
    pub smoothing: f64,
    /// A client whose average is below this is suspicious.
    pub threshold: f64,
    /// Leave a client that is suspicious after round `r` out of round `r + 1`
    /// (when enough other clients remain for the quorum). It is sampled
    /// again in round `r + 2`, so its average can recover; while it stays
    /// suspicious it sits out every other round.
    pub exclude_next_round: bool,
}

impl Default for TrustPolicy {
    /// Smoothing 0.3, threshold 0.3, no exclusion.
    fn default() -> Self {
        Self {
            smoothing: 0.3,
            threshold: 0.3,
            exclude_next_round: false,
        }
    }
}

impl TrustPolicy {
    /// Checks that the settings can work.
    pub fn check(&self) -> Result<()> {
        if !(self.smoothing > 0.0 && self.smoothing <= 1.0) {
            return Err(Error::InvalidConfig(format!(
                "trust smoothing must be in (0, 1], got {}",
                self.smoothing
            )));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(Error::InvalidConfig(format!(
                "trust threshold must be in [0, 1], got {}",
                self.threshold
            )));
        }
        Ok(())
    }
}

/// One client's standing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ClientTrust {
    /// The moving average (the first observation starts it).
    pub ema: f64,
    /// Rounds observed.
    pub rounds: u64,
    /// `ema < threshold`.
    pub suspicious: bool,
}

/// The moving averages of every client seen so far.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustTracker {
    policy: TrustPolicy,
    clients: BTreeMap<ClientId, ClientTrust>,
}

impl TrustTracker {
    /// An empty tracker.
    pub fn new(policy: TrustPolicy) -> Self {
        Self {
            policy,
            clients: BTreeMap::new(),
        }
    }

    /// Rebuilds the state from a run's history (accepted updates with a trust score).
    pub fn replay(policy: TrustPolicy, history: &[RoundRecord]) -> Self {
        let mut t = Self::new(policy);
        for record in history {
            for a in &record.accepted {
                if let Some(score) = a.trust {
                    t.observe(&a.client, score);
                }
            }
        }
        t
    }

    /// The policy.
    pub fn policy(&self) -> &TrustPolicy {
        &self.policy
    }

    /// Folds one round's score (clamped to `[0, 1]`; NaN counts as 0) into
    /// `client`'s average and returns its new standing.
    pub fn observe(&mut self, client: &ClientId, score: f64) -> ClientTrust {
        let score = if score.is_nan() {
            0.0
        } else {
            score.clamp(0.0, 1.0)
        };
        let s = self.policy.smoothing;
        let entry = self
            .clients
            .entry(client.clone())
            .and_modify(|c| {
                c.ema = s * score + (1.0 - s) * c.ema;
                c.rounds += 1;
            })
            .or_insert(ClientTrust {
                ema: score,
                rounds: 1,
                suspicious: false,
            });
        entry.suspicious = entry.ema < self.policy.threshold;
        *entry
    }

    /// A client's standing, if it has been observed.
    pub fn get(&self, client: &ClientId) -> Option<&ClientTrust> {
        self.clients.get(client)
    }

    /// Every observed client, by id.
    pub fn clients(&self) -> &BTreeMap<ClientId, ClientTrust> {
        &self.clients
    }

    /// The clients that are suspicious now.
    pub fn suspicious(&self) -> Vec<ClientId> {
        self.clients
            .iter()
            .filter(|(_, c)| c.suspicious)
            .map(|(id, _)| id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_threshold_and_recovery() {
        let policy = TrustPolicy {
            smoothing: 0.5,
            threshold: 0.4,
            exclude_next_round: true,
        };
        let mut t = TrustTracker::new(policy);
        let bad: ClientId = "bad".into();
        let good: ClientId = "good".into();
        assert_eq!(t.observe(&good, 0.9).ema, 0.9);
        let first = t.observe(&bad, 0.6);
        assert!(!first.suspicious);
        // 0.5 * 0.0 + 0.5 * 0.6 = 0.3 < 0.4.
        let second = t.observe(&bad, 0.0);
        assert!((second.ema - 0.3).abs() < 1e-12 && second.suspicious);
        assert_eq!(t.suspicious(), vec![bad.clone()]);
        // Two good rounds bring it back: 0.65, then 0.825.
        t.observe(&bad, 1.0);
        assert!(!t.get(&bad).unwrap().suspicious);
        assert_eq!(t.get(&bad).unwrap().rounds, 3);
        // Out-of-range and NaN scores are clamped.
        assert_eq!(t.observe(&"x".into(), 7.0).ema, 1.0);
        assert_eq!(t.observe(&"y".into(), f64::NAN).ema, 0.0);
    }

    #[test]
    fn bad_policies_are_refused() {
        let bad = |smoothing, threshold| {
            TrustPolicy {
                smoothing,
                threshold,
                exclude_next_round: false,
            }
            .check()
            .is_err()
        };
        assert!(bad(0.0, 0.5) && bad(1.5, 0.5) && bad(f64::NAN, 0.5) && bad(0.5, -0.1));
        assert!(!bad(1.0, 0.0));
    }
}
