//! What a run shows the dashboard while it trains, and what the store
//! keeps of each round: shared by the simulation and the deployed server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, RwLock};

use fedcore::{Evaluation, RoundRecord, ServerEvent, StopSignal};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::store::{NewRound, RoundRow, TrustRow, UpdateRow};

/// What the dashboard hears while a run (simulated or deployed) trains.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveEvent {
    /// A round began.
    RoundStarted {
        /// The round.
        round: u64,
        /// Rounds in the run.
        total: u64,
        /// Hospitals training.
        sampled: Vec<String>,
    },
    /// A hospital's update did not count.
    UpdateRejected {
        /// The round.
        round: u64,
        /// The hospital.
        client: String,
        /// Why.
        reason: String,
    },
    /// A hospital's trust fell below the threshold.
    ClientFlagged {
        /// The round.
        round: u64,
        /// The hospital.
        client: String,
        /// Its moving-average trust.
        trust_ema: f64,
    },
    /// A round ended and is recorded.
    RoundFinished {
        /// The round.
        round: u64,
        /// Rounds in the run.
        total: u64,
        /// Held-out loss.
        loss: Option<f64>,
        /// Held-out macro AUROC (X-ray runs).
        auroc_macro: Option<f64>,
        /// Test accuracy (MNIST runs).
        #[serde(skip_serializing_if = "Option::is_none")]
        accuracy: Option<f64>,
        /// How it ended.
        outcome: String,
    },
    /// The run ended.
    Finished {
        /// Rounds recorded.
        rounds: u64,
    },
    /// The run stopped with an error.
    Failed {
        /// The error.
        error: String,
    },
}

/// What a run is doing, for the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// No simulation in this process.
    Idle,
    /// Writing data, building the model and the keys.
    Preparing,
    /// Rounds are running.
    Training,
    /// The run ended (all rounds, stopped, or gave up after failed rounds).
    Finished,
    /// The run stopped on an error.
    Failed,
}

/// Where a run is, for the dashboard.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Progress {
    /// What the run is doing.
    pub status: RunStatus,
    /// The round being trained (0 before the first).
    pub current_round: u64,
    /// Rounds in the run.
    pub total_rounds: u64,
    /// The body aggregator.
    pub aggregator: String,
    /// Whether anything is encrypted (the head, or the whole update).
    pub he: bool,
    /// What leaves a hospital encrypted: `none`, `head` or `all`.
    pub encrypt: crate::recipe::Encrypt,
    /// Whose keys encrypt it: `single` (one key pair at every hospital) or
    /// `multiparty` (no hospital, nor the server, can decrypt another's
    /// upload).
    pub keys: crate::recipe::HeKeys,
    /// Under multiparty keys with a threshold: how many hospitals must
    /// answer each round's key switch (`None`: every one, or no multiparty
    /// keys).
    pub threshold: Option<usize>,
    /// Whether the hospitals apply differential privacy (known in a
    /// simulation; a deployed server does not set it, see `dp_mode`).
    pub dp: bool,
    /// The simulation's DP at every hospital; `None` in a deployment, where
    /// each hospital chooses its own and reports what it spent.
    pub dp_mode: Option<crate::recipe::DpMode>,
    /// Each hospital's (epsilon, delta) budget when DP is on.
    pub budget: Option<(f64, f64)>,
    /// The last error, when failed.
    pub error: Option<String>,
    /// The job training (`None` when none is).
    pub job: Option<i64>,
}

impl Progress {
    /// No simulation in this process.
    pub fn idle() -> Self {
        Self {
            status: RunStatus::Idle,
            current_round: 0,
            total_rounds: 0,
            aggregator: String::new(),
            he: false,
            encrypt: crate::recipe::Encrypt::None,
            keys: crate::recipe::HeKeys::Single,
            threshold: None,
            dp: false,
            dp_mode: None,
            budget: None,
            error: None,
            job: None,
        }
    }
}

/// State shared by a run (the simulation or a deployed server) and the
/// dashboard.
#[derive(Debug)]
pub struct Shared {
    /// Live events (server-sent to the browser).
    pub events: broadcast::Sender<LiveEvent>,
    /// Where the run is.
    pub progress: RwLock<Progress>,
    /// Hospitals an admin suspended: they get no tasks from the next round.
    pub suspended: Mutex<BTreeSet<String>>,
    /// Raised to stop after the current round.
    pub stop: StopSignal,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            events: broadcast::channel(256).0,
            progress: RwLock::new(Progress::idle()),
            suspended: Mutex::new(BTreeSet::new()),
            stop: StopSignal::new(),
        }
    }
}

impl Shared {
    /// Tells the dashboard.
    pub fn send(&self, e: LiveEvent) {
        // No subscriber is fine.
        let _ = self.events.send(e);
    }

    /// Updates where the run is.
    pub fn set_progress(&self, f: impl FnOnce(&mut Progress)) {
        if let Ok(mut p) = self.progress.write() {
            f(&mut p);
        }
    }

    /// The run ended, with the rounds it recorded or its error: the status
    /// and the last live event, the same for the simulation and a deployed
    /// server.
    pub fn end(&self, outcome: std::result::Result<u64, String>) {
        match outcome {
            Ok(rounds) => {
                self.set_progress(|p| p.status = RunStatus::Finished);
                self.send(LiveEvent::Finished { rounds });
            }
            Err(error) => {
                self.set_progress(|p| {
                    p.status = RunStatus::Failed;
                    p.error = Some(error.clone());
                });
                self.send(LiveEvent::Failed { error });
            }
        }
    }

    /// Passes the core's events on to the dashboard: a round starting (and
    /// where the run is), an update not counted or a hospital kept out (both
    /// shown as not counted), a hospital flagged. Rounds that end are the
    /// caller's to store first.
    pub fn observe(&self, event: &ServerEvent, total: u64) {
        match event {
            ServerEvent::RoundStarted { round, sampled } => {
                self.set_progress(|p| {
                    p.status = RunStatus::Training;
                    p.current_round = *round;
                });
                self.send(LiveEvent::RoundStarted {
                    round: *round,
                    total,
                    sampled: sampled.iter().map(ToString::to_string).collect(),
                });
            }
            ServerEvent::UpdateRejected {
                round,
                client,
                reason,
            } => self.send(LiveEvent::UpdateRejected {
                round: *round,
                client: client.to_string(),
                reason: reason.to_string(),
            }),
            ServerEvent::ClientWithheld {
                round,
                client,
                reason,
            } => self.send(LiveEvent::UpdateRejected {
                round: *round,
                client: client.to_string(),
                reason: reason.clone(),
            }),
            ServerEvent::ClientFlagged {
                round,
                client,
                trust_ema,
            } => self.send(LiveEvent::ClientFlagged {
                round: *round,
                client: client.to_string(),
                trust_ema: *trust_ema,
            }),
            _ => {}
        }
    }
}

/// A round's row for the store. The held-out numbers are the server's
/// evaluation (the simulation's evaluation site) or, in a deployment, the
/// hospitals' own evaluations combined.
pub fn round_row(r: &RoundRecord) -> RoundRow {
    let outcome = r.outcome.name().to_owned();
    RoundRow {
        id: r.round as i64,
        outcome,
        aggregator: r.aggregator.clone(),
        started_at: r.started_at_ms as i64,
        duration_ms: r.duration_ms as i64,
        accepted: r.accepted.len() as i64,
        rejected: (r.failures.len() + r.withheld.len()) as i64,
        loss: held_out(r).map(|e| e.loss),
        train_loss: r.train_metrics.get("loss").copied(),
        auroc_macro: held_out(r).and_then(|e| e.metrics.get("auroc_macro").copied()),
        update_norm: r.update_norm,
    }
}

/// Everything the store keeps of a round.
pub fn to_new_round(r: &RoundRecord, row: &RoundRow) -> NewRound {
    let mut updates: Vec<UpdateRow> = r
        .accepted
        .iter()
        .map(|u| {
            let spent = u.provenance.iter().rev().find_map(|p| p.spent);
            UpdateRow {
                round_id: row.id,
                client_id: u.client.to_string(),
                accepted: true,
                reason: None,
                weight: Some(u.weight),
                trust: u.trust,
                update_norm: Some(u.update_norm),
                num_examples: Some(u.num_examples as i64),
                epsilon: spent.map(|s| s.epsilon),
                delta: spent.map(|s| s.delta),
                upload_bytes: (u.upload_bytes > 0)
                    .then(|| i64::try_from(u.upload_bytes).unwrap_or(i64::MAX)),
            }
        })
        .collect();
    let not_counted = r
        .failures
        .iter()
        .map(|f| (f.client.to_string(), f.reason.to_string()))
        .chain(
            r.withheld
                .iter()
                .map(|w| (w.client.to_string(), w.reason.clone())),
        );
    updates.extend(not_counted.map(|(client_id, reason)| UpdateRow {
        round_id: row.id,
        client_id,
        accepted: false,
        reason: Some(reason),
        weight: None,
        trust: None,
        update_norm: None,
        num_examples: None,
        epsilon: None,
        delta: None,
        upload_bytes: None,
    }));
    let trust = r
        .accepted
        .iter()
        .filter_map(|u| {
            u.trust.map(|t| {
                (
                    u.client.to_string(),
                    TrustRow {
                        round_id: row.id,
                        trust: t,
                        trust_ema: u.trust_ema,
                        suspicious: u.suspicious,
                    },
                )
            })
        })
        .collect();
    let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
    if let Some(e) = held_out(r) {
        metrics.insert("eval.loss".into(), e.loss);
        for (k, v) in &e.metrics {
            metrics.insert(format!("eval.{k}"), *v);
        }
    }
    for (k, v) in &r.train_metrics {
        metrics.insert(format!("train.{k}"), *v);
    }
    for (k, v) in &r.aggregate_metrics {
        metrics.insert(format!("agg.{k}"), *v);
    }
    NewRound {
        round: row.clone(),
        updates,
        trust,
        metrics: metrics.into_iter().collect(),
    }
}

fn held_out(r: &RoundRecord) -> Option<&Evaluation> {
    r.evaluation.as_ref().or(r.federated_evaluation.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_run_sets_its_status_and_tells_the_pages() {
        let shared = Shared::default();
        let mut events = shared.events.subscribe();
        shared.end(Ok(4));
        assert_eq!(
            shared.progress.read().map(|p| p.status).ok(),
            Some(RunStatus::Finished)
        );
        assert!(matches!(
            events.try_recv(),
            Ok(LiveEvent::Finished { rounds: 4 })
        ));
        shared.end(Err("quorum lost".into()));
        let p = shared
            .progress
            .read()
            .map(|p| (p.status, p.error.clone()))
            .ok();
        assert_eq!(p, Some((RunStatus::Failed, Some("quorum lost".into()))));
        assert!(
            matches!(events.try_recv(), Ok(LiveEvent::Failed { error }) if error == "quorum lost")
        );
    }
}
