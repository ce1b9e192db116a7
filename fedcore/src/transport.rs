use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::client::{EvaluateIns, FitIns, StepIns, StepReply};
use crate::error::Result;
use crate::model::Evaluation;
use crate::params::NonFinite;
use crate::update::{ClientId, ClientUpdate};

/// Work for one client.
#[derive(Debug, Clone)]
pub enum Task {
    /// Train and send an update.
    Fit(FitIns),
    /// Evaluate and send metrics.
    Evaluate(EvaluateIns),
    /// An extra step of a multi-step round (see [`Strategy`](crate::Strategy)).
    Step(StepIns),
}

impl Task {
    /// The round the task belongs to.
    pub fn round(&self) -> u64 {
        match self {
            Task::Fit(f) => f.round,
            Task::Evaluate(e) => e.round,
            Task::Step(s) => s.round,
        }
    }
}

/// A client's successful answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// The answer to [`Task::Fit`].
    Fit(ClientUpdate),
    /// The answer to [`Task::Evaluate`].
    Evaluate(Evaluation),
    /// The answer to [`Task::Step`].
    Step(StepReply),
}

/// One answer, addressed by the transport with the identity it authenticated
/// (not the one the client claims inside its update).
#[derive(Debug)]
pub struct Envelope {
    /// The client the transport received this from.
    pub client: ClientId,
    /// The reply, or why there is none.
    pub reply: std::result::Result<Reply, Failure>,
}

/// Where transports send replies.
pub type ReplySender = mpsc::Sender<Envelope>;

/// Why an update was refused by the server's validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Rejection {
    /// The update holds NaN or infinity.
    #[error("non-finite value {} in `{}`[{}]", .0.value, .0.tensor, .0.index)]
    NonFinite(NonFinite),
    /// The update's tensors differ from the global model's.
    #[error("wrong layout: {detail}")]
    Layout {
        /// The first difference.
        detail: String,
    },
    /// The update answers another round.
    #[error("stale round: update is for round {got}, current round is {expected}")]
    StaleRound {
        /// The current round.
        expected: u64,
        /// The round in the update.
        got: u64,
    },
    /// The sender was not sampled for this round (or is not known at all).
    #[error("client was not sampled for this round")]
    NotSampled,
    /// The update names a different client than the connection it came from.
    #[error("update claims to come from `{claimed}`")]
    IdentityMismatch {
        /// The id inside the update.
        claimed: ClientId,
    },
    /// A second reply from the same client in one round.
    #[error("duplicate reply")]
    Duplicate,
    /// An update that reports no training examples.
    #[error("update reports zero examples")]
    NoExamples,
    /// The reply does not answer the task that was sent.
    #[error("reply does not match the task")]
    WrongReply,
    /// A multi-step round's reply answers another step.
    #[error("reply answers step {got}, the round is at step {expected}")]
    WrongStep {
        /// The step asked.
        expected: u32,
        /// The step the reply names.
        got: u32,
    },
    /// A multi-step strategy refused the client's answer.
    #[error("refused by the strategy: {detail}")]
    Strategy {
        /// Why.
        detail: String,
    },
    /// The sealed (encrypted) part is missing, unexpected or malformed.
    #[error("sealed part: {detail}")]
    Sealed {
        /// What is wrong with it.
        detail: String,
    },
}

/// Why a sampled client did not contribute to a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "type", content = "detail", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Failure {
    /// The client reported an error (training failed, ...).
    #[error("client error: {0}")]
    ClientError(String),
    /// The connection to the client was lost.
    #[error("disconnected: {0}")]
    Disconnected(String),
    /// No reply arrived before the round deadline.
    #[error("no reply within {0} ms")]
    Timeout(u64),
    /// The reply arrived but failed validation.
    #[error("rejected: {0}")]
    Rejected(Rejection),
}

impl Failure {
    /// Whether the client refused because its privacy budget is spent
    /// ([`crate::Error::PrivacyBudgetExhausted`], reported as a client
    /// error): it will refuse every later round too.
    pub fn is_budget_exhausted(&self) -> bool {
        matches!(self, Failure::ClientError(reason) if reason.starts_with(crate::error::BUDGET_EXHAUSTED))
    }
}

/// How the server reaches clients.
///
/// The server hands a [`Task`] for a client to the transport together with a
/// [`ReplySender`]; the transport delivers it however it can (a worker
/// thread, a gRPC stream) and sends back one [`Envelope`]. The server alone
/// owns the round deadline: it waits on the reply channel until every sampled
/// client answered or the deadline passed, so transports stay simple.
pub trait Transport: Send {
    /// The clients connected now, in any order.
    fn clients(&self) -> Vec<ClientId>;

    /// Delivers `task` to `client`; its answer goes to `reply_to`, once.
    ///
    /// An error means the task could not be handed over at all (the server
    /// records the client as disconnected for this round).
    fn send(&mut self, client: &ClientId, task: Task, reply_to: ReplySender) -> Result<()>;

    /// Waits until at least `n` clients are connected or `timeout` passed;
    /// returns how many are connected. The default polls [`Transport::clients`]
    /// every 20 ms; a transport that knows when clients arrive overrides it.
    fn wait_for_clients(&mut self, n: usize, timeout: std::time::Duration) -> usize {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let connected = self.clients().len();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if connected >= n || left.is_zero() {
                return connected;
            }
            std::thread::sleep(left.min(std::time::Duration::from_millis(20)));
        }
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn clients(&self) -> Vec<ClientId> {
        (**self).clients()
    }

    fn wait_for_clients(&mut self, n: usize, timeout: std::time::Duration) -> usize {
        (**self).wait_for_clients(n, timeout)
    }

    fn send(&mut self, client: &ClientId, task: Task, reply_to: ReplySender) -> Result<()> {
        (**self).send(client, task, reply_to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn a_spent_budget_is_recognised_from_the_client_error_text() {
        // What a client's fit error becomes on its way to the server.
        let refused = Error::PrivacyBudgetExhausted {
            who: "hospital-1".into(),
            spent: 0.9,
            next: 1.2,
            budget: 1.0,
            delta: 1e-5,
        };
        assert!(Failure::ClientError(refused.to_string()).is_budget_exhausted());
        assert!(!Failure::ClientError("training diverged".into()).is_budget_exhausted());
        assert!(!Failure::Timeout(5).is_budget_exhausted());
    }
}
