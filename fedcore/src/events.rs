//! Round records and the events a server emits while it runs.

use std::path::PathBuf;
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::model::Evaluation;
use crate::transport::Failure;
use crate::update::{ClientId, Metrics, Protection};

/// An update that counted in a round, with how the aggregator used it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AcceptedUpdate {
    /// The client.
    pub client: ClientId,
    /// Its example count.
    pub num_examples: u64,
    /// L2 norm of its delta as received.
    pub update_norm: f64,
    /// Its training metrics.
    pub metrics: Metrics,
    /// The protections it reports.
    pub provenance: Vec<Protection>,
    /// Its weight in the aggregate.
    pub weight: f64,
    /// Its distance to the aggregate, where the aggregator computed it.
    pub distance: Option<f64>,
    /// Its trust score, where the aggregator computed one.
    pub trust: Option<f64>,
    /// Its moving-average trust after this round, when the server tracks
    /// trust ([`crate::trust::TrustPolicy`]) and the client has a score.
    #[serde(default)]
    pub trust_ema: Option<f64>,
    /// Whether that average is below the policy's threshold.
    #[serde(default)]
    pub suspicious: bool,
}

/// A sampled client that did not count, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFailure {
    /// The client.
    pub client: ClientId,
    /// Why.
    pub reason: Failure,
}

/// How a round ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", content = "detail", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RoundOutcome {
    /// The global model was updated.
    Completed,
    /// Fewer valid updates than the quorum; the model is unchanged.
    QuorumNotReached,
    /// The aggregator failed; the model is unchanged.
    AggregationFailed(String),
}

/// Everything recorded about one round; stored with each checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number, from 1.
    pub round: u64,
    /// How it ended.
    pub outcome: RoundOutcome,
    /// The aggregator's name.
    pub aggregator: String,
    /// The clients asked to train.
    pub sampled: Vec<ClientId>,
    /// Connected clients left out because they were suspicious after the
    /// previous round (see [`crate::trust::TrustPolicy::exclude_next_round`]).
    #[serde(default)]
    pub excluded: Vec<ClientId>,
    /// The updates that counted, sorted by client.
    pub accepted: Vec<AcceptedUpdate>,
    /// The sampled clients that did not count.
    pub failures: Vec<ClientFailure>,
    /// Example-weighted mean of the accepted clients' training metrics.
    pub train_metrics: Metrics,
    /// Aggregator-specific numbers (iterations, objective, ...).
    pub aggregate_metrics: Metrics,
    /// L2 norm of the step applied to the global model.
    pub update_norm: Option<f64>,
    /// Server-side evaluation of the new global model, if an evaluator is set.
    pub evaluation: Option<Evaluation>,
    /// Example-weighted federated evaluation, if `fraction_evaluate > 0`.
    pub federated_evaluation: Option<Evaluation>,
    /// When the round started, in milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// How long it took.
    pub duration_ms: u64,
}

/// What a server reports while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerEvent {
    /// Tasks are about to be sent.
    RoundStarted {
        /// The round.
        round: u64,
        /// The clients sampled for it.
        sampled: Vec<ClientId>,
    },
    /// An update passed validation.
    UpdateAccepted {
        /// The round.
        round: u64,
        /// The client.
        client: ClientId,
        /// Its example count.
        num_examples: u64,
        /// Its L2 norm.
        update_norm: f64,
    },
    /// A sampled client's update did not count (invalid, late, error, gone).
    UpdateRejected {
        /// The round.
        round: u64,
        /// The client.
        client: ClientId,
        /// Why.
        reason: Failure,
    },
    /// The round ended with a new global model.
    RoundFinished {
        /// The full record.
        record: Box<RoundRecord>,
    },
    /// The round ended without changing the model.
    RoundFailed {
        /// The full record.
        record: Box<RoundRecord>,
        /// The error, as text.
        error: String,
    },
    /// A client's moving-average trust fell below the threshold this round.
    ClientFlagged {
        /// The round.
        round: u64,
        /// The client.
        client: ClientId,
        /// Its moving-average trust.
        trust_ema: f64,
    },
    /// The global model and the run's state were saved.
    CheckpointWritten {
        /// The round just saved.
        round: u64,
        /// The model file.
        path: PathBuf,
    },
}

/// Receives server events (the dashboard, logs, tests).
///
/// Implemented for closures and for `std::sync::mpsc::Sender<ServerEvent>`.
pub trait EventSubscriber: Send {
    /// Called synchronously for each event; keep it quick.
    fn on_event(&mut self, event: &ServerEvent);
}

impl<F: FnMut(&ServerEvent) + Send> EventSubscriber for F {
    fn on_event(&mut self, event: &ServerEvent) {
        self(event)
    }
}

impl EventSubscriber for mpsc::Sender<ServerEvent> {
    fn on_event(&mut self, event: &ServerEvent) {
        // A receiver that went away only means nobody listens any more.
        let _ = self.send(event.clone());
    }
}
