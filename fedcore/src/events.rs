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
    /// The bytes of its values (in their upload encoding), extra tensors
    /// and sealed tensors as the network transport carries them (0 in
    /// records written before 0.2).
    #[serde(default)]
    pub upload_bytes: u64,
}

/// A client an operator kept out of a round, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Withheld {
    /// The client.
    pub client: ClientId,
    /// The operator's reason.
    pub reason: String,
}

/// A sampled client that did not count, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientFailure {
    /// The client.
    pub client: ClientId,
    /// Why.
    pub reason: Failure,
    /// The extra step of a multi-step round (see [`Strategy`](crate::Strategy)) in
    /// which it failed, from 1; `None` for the fit exchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
}

impl ClientFailure {
    /// A failure in the fit exchange.
    pub fn new(client: ClientId, reason: Failure) -> Self {
        Self {
            client,
            reason,
            step: None,
        }
    }
}

impl std::fmt::Display for ClientFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.step {
            Some(step) => write!(f, "{} (step {step}): {}", self.client, self.reason),
            None => write!(f, "{}: {}", self.client, self.reason),
        }
    }
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
    AggregationFailed(AggregationFailure),
}

impl RoundOutcome {
    /// True for [`RoundOutcome::Completed`].
    pub fn is_completed(&self) -> bool {
        matches!(self, RoundOutcome::Completed)
    }

    /// The outcome's name as serialized (`completed`, `quorum_not_reached`,
    /// `aggregation_failed`), e.g. for a database column.
    pub fn name(&self) -> &'static str {
        match self {
            RoundOutcome::Completed => "completed",
            RoundOutcome::QuorumNotReached => "quorum_not_reached",
            RoundOutcome::AggregationFailed(_) => "aggregation_failed",
        }
    }
}

impl std::fmt::Display for RoundOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundOutcome::Completed => f.write_str("completed"),
            RoundOutcome::QuorumNotReached => f.write_str("quorum not reached"),
            RoundOutcome::AggregationFailed(a) => write!(f, "aggregation failed: {a}"),
        }
    }
}

/// Why an aggregation failed, as recorded in a round's outcome: the kind of
/// failure (what a program matches on), the aggregator, and the error's text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "AggregationFailureRepr")]
#[non_exhaustive]
pub struct AggregationFailure {
    /// What went wrong.
    #[serde(flatten)]
    pub kind: AggregationFailureKind,
    /// The aggregator (or multi-step strategy) that ran.
    pub aggregator: String,
    /// The error, as text.
    pub detail: String,
}

/// The kinds of [`AggregationFailure`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AggregationFailureKind {
    /// The aggregator needs more updates than it got.
    TooFewUpdates {
        /// Updates it needs.
        needed: usize,
        /// Updates it got.
        got: usize,
    },
    /// The aggregator's weights cannot be used (all zero, negative, NaN).
    InvalidWeights,
    /// The aggregate holds NaN or infinity.
    NotFinite {
        /// The first tensor holding such a value.
        tensor: String,
    },
    /// The aggregate's layout or length does not match the updates'.
    Shape,
    /// Combining the sealed (encrypted) tensors failed.
    Sealing,
    /// A privacy mechanism on the server refused or failed.
    Privacy,
    /// Anything else the aggregator reported.
    Other,
}

impl AggregationFailure {
    /// Classifies an aggregator's error.
    pub fn from_error(aggregator: impl Into<String>, error: &crate::Error) -> Self {
        use crate::Error as E;
        let kind = match error {
            E::TooFewUpdates { needed, got, .. } => AggregationFailureKind::TooFewUpdates {
                needed: *needed,
                got: *got,
            },
            E::InvalidWeights { .. } => AggregationFailureKind::InvalidWeights,
            E::AggregateNotFinite { tensor, .. } => AggregationFailureKind::NotFinite {
                tensor: tensor.clone(),
            },
            E::DimensionMismatch { .. }
            | E::LayoutMismatch { .. }
            | E::ShapeMismatch { .. }
            | E::UnknownTensor { .. } => AggregationFailureKind::Shape,
            E::Sealing(_) | E::SealingScheme(_) => AggregationFailureKind::Sealing,
            E::Privacy(_) | E::PrivacyMechanism(_) | E::PrivacyBudgetExhausted { .. } => {
                AggregationFailureKind::Privacy
            }
            _ => AggregationFailureKind::Other,
        };
        Self {
            kind,
            aggregator: aggregator.into(),
            detail: error.to_string(),
        }
    }
}

impl std::fmt::Display for AggregationFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.detail, self.aggregator)
    }
}

/// Reads both the structured form and the plain text that checkpoints
/// written before 0.2 hold (kind `other`, aggregator unknown).
#[derive(Deserialize)]
#[serde(untagged)]
enum AggregationFailureRepr {
    Structured {
        #[serde(flatten)]
        kind: AggregationFailureKind,
        aggregator: String,
        detail: String,
    },
    Text(String),
}

impl From<AggregationFailureRepr> for AggregationFailure {
    fn from(r: AggregationFailureRepr) -> Self {
        match r {
            AggregationFailureRepr::Structured {
                kind,
                aggregator,
                detail,
            } => Self {
                kind,
                aggregator,
                detail,
            },
            AggregationFailureRepr::Text(detail) => Self {
                kind: AggregationFailureKind::Other,
                aggregator: String::new(),
                detail,
            },
        }
    }
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
    /// The quorum the round needed (`min_fit_clients`; 0 in records written
    /// before 0.2).
    #[serde(default)]
    pub quorum: usize,
    /// Connected clients left out because they were suspicious after the
    /// previous round (see [`crate::trust::TrustPolicy::exclude_next_round`]).
    #[serde(default)]
    pub excluded: Vec<ClientId>,
    /// Connected clients an operator kept out of the round
    /// ([`crate::Server::exclusions`]), with the operator's reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub withheld: Vec<Withheld>,
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

impl RoundRecord {
    /// Sampled clients whose update was valid and that stayed in the round
    /// through every step: the number the quorum was checked against
    /// (`accepted` lists only the updates of a completed round).
    pub fn valid_updates(&self) -> usize {
        let out: std::collections::BTreeSet<&ClientId> = self
            .failures
            .iter()
            .filter(|f| f.reason != Failure::Rejected(crate::Rejection::Duplicate))
            .map(|f| &f.client)
            .collect();
        self.sampled.iter().filter(|c| !out.contains(c)).count()
    }

    /// `Ok` for a completed round; otherwise the round's failure as an
    /// [`crate::Error`] ([`crate::Error::QuorumNotReached`] with every
    /// failure, or [`crate::Error::AggregationFailed`]), for callers that
    /// want `?` to stop at a failed round.
    pub fn ensure_completed(&self) -> crate::Result<()> {
        match &self.outcome {
            RoundOutcome::Completed => Ok(()),
            RoundOutcome::QuorumNotReached => Err(crate::Error::QuorumNotReached {
                round: self.round,
                required: self.quorum,
                accepted: self.valid_updates(),
                failures: self.failures.clone(),
            }),
            RoundOutcome::AggregationFailed(failure) => Err(crate::Error::AggregationFailed {
                round: self.round,
                failure: failure.clone(),
            }),
        }
    }
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
    /// A connected client the operator keeps out of training was left out
    /// of this round ([`crate::Server::exclusions`]).
    ClientWithheld {
        /// The round.
        round: u64,
        /// The client.
        client: ClientId,
        /// The operator's reason.
        reason: String,
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
    /// The round ended without changing the model; `record.outcome` says why.
    RoundFailed {
        /// The full record.
        record: Box<RoundRecord>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_names_are_the_serialized_tags() {
        let failed = RoundOutcome::AggregationFailed(AggregationFailure {
            kind: AggregationFailureKind::NotFinite { tensor: "w".into() },
            aggregator: "fedavg".into(),
            detail: "NaN".into(),
        });
        for o in [
            RoundOutcome::Completed,
            RoundOutcome::QuorumNotReached,
            failed.clone(),
        ] {
            let v = serde_json::to_value(&o).unwrap();
            assert_eq!(v["status"], o.name());
            let back: RoundOutcome = serde_json::from_value(v).unwrap();
            assert_eq!(back, o);
        }
        let v = serde_json::to_value(&failed).unwrap();
        assert_eq!(v["detail"]["kind"], "not_finite");
        assert_eq!(v["detail"]["tensor"], "w");
    }

    #[test]
    fn checkpoints_written_before_structured_failures_still_load() {
        let old = r#"{"status":"aggregation_failed","detail":"invalid aggregation weights: zero"}"#;
        let RoundOutcome::AggregationFailed(f) = serde_json::from_str(old).unwrap() else {
            panic!("not a failure")
        };
        assert_eq!(f.kind, AggregationFailureKind::Other);
        assert_eq!(f.detail, "invalid aggregation weights: zero");
        // A failure record without a step still reads.
        let c: ClientFailure =
            serde_json::from_str(r#"{"client":"a","reason":{"type":"timeout","detail":5}}"#)
                .unwrap();
        assert_eq!(c.step, None);
    }
}
