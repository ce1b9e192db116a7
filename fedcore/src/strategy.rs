use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::aggregate::{Aggregate, Aggregator};
use crate::client::{StepIns, StepReply};
use crate::error::{Error, Result};
use crate::events::ClientFailure;
use crate::params::Parameters;
use crate::round::dispatch;
use crate::sealed::SealedTensors;
use crate::transport::{Failure, Rejection, Reply, Task, Transport};
use crate::update::{ClientId, ClientUpdate, Metrics};

/// What the server needs to know about a strategy before a round.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StrategyInfo {
    /// A short name for logs and the dashboard.
    pub name: String,
    /// The fewest updates it can work with; the server refuses a quorum below it.
    pub min_updates: usize,
}

impl StrategyInfo {
    /// A strategy named `name` that works from one update.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            min_updates: 1,
        }
    }

    /// Sets the fewest updates it needs.
    pub fn with_min_updates(mut self, n: usize) -> Self {
        self.min_updates = n;
        self
    }
}

/// How the server turns a round's updates into an aggregate, with as many
/// exchanges with the clients as it needs: rounds of more than one exchange.
///
/// A plain [`Aggregator`] turns the round's validated updates into one
/// aggregate. Some protocols need more: an encrypted geometric median asks
/// the clients for distances to the current estimate, multiparty decryption
/// collects shares, SCAFFOLD returns control variates. A [`Strategy`] is
/// handed the updates *and* a [`RoundSteps`], through which it can ask the
/// clients still in the round for further messages — through the same
/// [`crate::Transport`] as the fit exchange (in memory or gRPC), each step
/// waiting up to the round's `round_timeout` (a round of k extra steps can
/// last k + 1 timeouts), with each reply validated and each failure recorded
/// in the round's record with the step it happened in.
///
/// Every [`Aggregator`] is a one-step strategy, so [`crate::Server`] takes
/// either. The quorum holds for every step: a client that fails a step is
/// out of the round, and when fewer than `min_fit_clients` remain the round
/// ends as [`crate::RoundOutcome::QuorumNotReached`] with every failure
/// recorded.
///
/// ```
/// use std::sync::Arc;
/// use fedcore::{
///     Aggregate, Aggregator, ClientUpdate, FedAvg, Result, RoundSteps, StepRequest, Strategy,
///     StrategyInfo,
/// };
///
/// /// Averages the updates, then asks each client for its own update minus
/// /// that average and averages again over those that answered.
/// struct Residuals;
///
/// impl Strategy for Residuals {
///     fn describe(&self) -> StrategyInfo {
///         StrategyInfo::new("residuals")
///     }
///
///     fn aggregate_round(&mut self, updates: &[ClientUpdate], steps: &mut RoundSteps<'_>) -> Result<Aggregate> {
///         let mean = Arc::new(FedAvg.aggregate(updates)?.parameters);
///         let answers = steps.ask(|_| StepRequest::new(mean.clone()))?;
///         let kept: Vec<ClientUpdate> = updates
///             .iter()
///             .filter(|u| steps.clients().contains(&u.client))
///             .zip(&answers)
///             .map(|(u, (_, reply))| {
///                 let mut back = mean.as_ref().clone();
///                 back.axpy(1.0, &reply.values)?;
///                 Ok(ClientUpdate::new(u.client.clone(), u.round, u.num_examples, back))
///             })
///             .collect::<Result<_>>()?;
///         FedAvg.aggregate(&kept)
///     }
/// }
/// ```
pub trait Strategy: Send {
    /// Its name and minimum number of updates.
    fn describe(&self) -> StrategyInfo;

    /// Aggregates `updates` (validated deltas, sorted by client), asking the
    /// clients for more through `steps` where needed.
    ///
    /// The returned [`Aggregate::clients`] lists every client still in the
    /// round ([`RoundSteps::clients`]) once, in any order, and no other; the
    /// aggregate must not hold the contribution of a client that left.
    /// Returning the error of [`RoundSteps::ask`] (quorum lost) ends the
    /// round as `QuorumNotReached`; any other error as `AggregationFailed`.
    fn aggregate_round(
        &mut self,
        updates: &[ClientUpdate],
        steps: &mut RoundSteps<'_>,
    ) -> Result<Aggregate>;

    /// Tensors sent to every client with the round's fit request (next to
    /// the global model), e.g. SCAFFOLD's server control variate; `None`
    /// (the default) sends none. When it sends some, every update must carry
    /// [`ClientUpdate::extra`] of the same layout (the server refuses an
    /// update without, and one with extra tensors nobody asked for).
    fn fit_extra(&self) -> Option<Arc<Parameters>> {
        None
    }

    /// What it carries from round to round, saved with every checkpoint
    /// ([`Aggregator::state`] for a rule); `None` by default. (Named apart
    /// from the aggregator's methods: every aggregator is a strategy.)
    fn saved_state(&self) -> Option<Vec<f32>> {
        None
    }

    /// Takes back what [`Self::saved_state`] returned, on resume; the
    /// default refuses.
    fn restore_state(&mut self, state: Vec<f32>) -> Result<()> {
        Err(crate::Error::InvalidConfig(format!(
            "`{}` keeps no state, but the checkpoint holds {} values for it",
            self.describe().name,
            state.len()
        )))
    }
}

/// Every aggregator is a strategy of one step.
impl<A: Aggregator> Strategy for A {
    fn describe(&self) -> StrategyInfo {
        StrategyInfo::new(self.name()).with_min_updates(self.min_updates())
    }

    fn aggregate_round(
        &mut self,
        updates: &[ClientUpdate],
        steps: &mut RoundSteps<'_>,
    ) -> Result<Aggregate> {
        match steps.take_spare() {
            Some(buffer) => self.aggregate_into(updates, buffer),
            None => self.aggregate(updates),
        }
    }

    fn saved_state(&self) -> Option<Vec<f32>> {
        self.state()
    }

    fn restore_state(&mut self, state: Vec<f32>) -> Result<()> {
        self.restore(state)
    }
}

/// What a strategy sends to one client in a step.
#[derive(Debug, Clone)]
pub struct StepRequest {
    /// Tensors for the client (may be empty).
    pub values: Arc<Parameters>,
    /// Sealed tensors for the client.
    pub sealed: Option<Arc<SealedTensors>>,
    /// Scalars for the client.
    pub metrics: Metrics,
    /// The largest reply accepted; [`StepRequest::new`] sets twice the
    /// request's size plus 1 MiB.
    pub max_reply_bytes: u64,
}

impl StepRequest {
    /// A request carrying `values`.
    pub fn new(values: Arc<Parameters>) -> Self {
        let bytes = values.len() as u64 * 4;
        Self {
            values,
            sealed: None,
            metrics: Metrics::new(),
            max_reply_bytes: bytes.saturating_mul(2).saturating_add(1 << 20),
        }
    }

    /// Adds sealed tensors (the reply limit grows by twice their size).
    pub fn with_sealed(mut self, sealed: Arc<SealedTensors>) -> Self {
        let extra = (sealed.bytes().len() as u64).saturating_mul(2);
        self.max_reply_bytes = self.max_reply_bytes.saturating_add(extra);
        self.sealed = Some(sealed);
        self
    }

    /// Adds scalars.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Sets the largest reply accepted.
    pub fn with_max_reply_bytes(mut self, bytes: u64) -> Self {
        self.max_reply_bytes = bytes;
        self
    }
}

/// The extra steps of one round, as a strategy sees them: which clients are
/// still in, and a way to ask them for more.
pub struct RoundSteps<'a> {
    transport: &'a mut dyn Transport,
    round: u64,
    timeout: Duration,
    quorum: usize,
    step: u32,
    clients: Vec<ClientId>,
    failures: Vec<ClientFailure>,
    spare: Option<Parameters>,
}

impl<'a> RoundSteps<'a> {
    /// The steps of `round` with `clients` (those whose updates passed
    /// validation); each step waits up to `timeout`.
    pub(crate) fn new(
        transport: &'a mut dyn Transport,
        round: u64,
        timeout: Duration,
        quorum: usize,
        mut clients: Vec<ClientId>,
    ) -> Self {
        clients.sort();
        Self {
            transport,
            round,
            timeout,
            quorum,
            step: 0,
            clients,
            failures: Vec::new(),
            spare: None,
        }
    }

    /// Offers `buffer` (memory the server no longer needs, such as the last
    /// round's aggregate) for the aggregate ([`RoundSteps::take_spare`]).
    pub(crate) fn with_spare(mut self, buffer: Option<Parameters>) -> Self {
        self.spare = buffer;
        self
    }

    /// A buffer the strategy may write its aggregate into and return as
    /// [`Aggregate::parameters`] (see [`Aggregator::aggregate_into`]): the
    /// last round's aggregate, when the server has it. Old values, any
    /// layout: check it and overwrite every value.
    pub fn take_spare(&mut self) -> Option<Parameters> {
        self.spare.take()
    }

    /// The round.
    pub fn round(&self) -> u64 {
        self.round
    }

    /// The quorum every step must keep.
    pub fn quorum(&self) -> usize {
        self.quorum
    }

    /// The clients still in the round, sorted.
    pub fn clients(&self) -> &[ClientId] {
        &self.clients
    }

    /// Steps asked so far.
    pub fn steps_run(&self) -> u32 {
        self.step
    }

    /// The failures of the steps so far.
    pub fn failures(&self) -> &[ClientFailure] {
        &self.failures
    }

    /// Sends the next step to every client still in the round (`request`
    /// builds each one's message) and waits for the answers until the round
    /// deadline. Returns the valid answers sorted by client. A client that
    /// cannot be reached, times out, reports an error or sends an answer for
    /// another round or step, or with NaN or infinity, is out of the round
    /// and its failure recorded with this step.
    ///
    /// Errors with [`Error::QuorumNotReached`] when fewer clients than the
    /// quorum are left.
    pub fn ask(
        &mut self,
        mut request: impl FnMut(&ClientId) -> StepRequest,
    ) -> Result<Vec<(ClientId, StepReply)>> {
        self.step += 1;
        let (round, step) = (self.round, self.step);
        let asked = self.clients.clone();
        let (replies, failures) = dispatch(&mut *self.transport, self.timeout, &asked, |c| {
            let r = request(c);
            Task::Step(StepIns {
                round,
                step,
                values: r.values,
                sealed: r.sealed,
                metrics: r.metrics,
                max_reply_bytes: r.max_reply_bytes,
            })
        });
        for f in failures {
            self.leave(f.client, f.reason);
        }
        let mut answers = Vec::new();
        for (client, reply) in replies {
            let checked = match reply {
                Reply::Step(r) => check_reply(round, step, r),
                _ => Err(Rejection::WrongReply),
            };
            match checked {
                Ok(r) => answers.push((client, r)),
                Err(rejection) => self.leave(client, Failure::Rejected(rejection)),
            }
        }
        answers.retain(|(c, _)| self.clients.contains(c));
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        self.ensure_quorum()?;
        Ok(answers)
    }

    /// Takes `client` out of the round because the strategy refuses what it
    /// sent (recorded with the current step; with no step asked yet, as a
    /// rejection of its update). Errors when the quorum is lost.
    pub fn reject(&mut self, client: &ClientId, detail: impl Into<String>) -> Result<()> {
        if self.clients.contains(client) {
            self.leave(
                client.clone(),
                Failure::Rejected(Rejection::Strategy {
                    detail: detail.into(),
                }),
            );
        }
        self.ensure_quorum()
    }

    fn leave(&mut self, client: ClientId, reason: Failure) {
        warn!(round = self.round, step = self.step, client = %client, reason = %reason, "client left the round");
        self.clients.retain(|c| c != &client);
        self.failures.push(ClientFailure {
            client,
            reason,
            step: (self.step > 0).then_some(self.step),
        });
    }

    fn ensure_quorum(&self) -> Result<()> {
        if self.clients.len() < self.quorum {
            return Err(Error::QuorumNotReached {
                round: self.round,
                required: self.quorum,
                accepted: self.clients.len(),
                failures: self.failures.clone(),
            });
        }
        Ok(())
    }

    /// The clients still in and the steps' failures.
    pub(crate) fn finish(mut self) -> (Vec<ClientId>, Vec<ClientFailure>) {
        self.failures
            .sort_by(|a, b| (a.step, &a.client).cmp(&(b.step, &b.client)));
        (self.clients, self.failures)
    }
}

fn check_reply(round: u64, step: u32, reply: StepReply) -> Result<StepReply, Rejection> {
    if reply.round != round {
        return Err(Rejection::StaleRound {
            expected: round,
            got: reply.round,
        });
    }
    if reply.step != step {
        return Err(Rejection::WrongStep {
            expected: step,
            got: reply.step,
        });
    }
    if let Some(nf) = reply.values.first_non_finite() {
        return Err(Rejection::NonFinite(nf));
    }
    if let Some((k, _)) = reply.metrics.iter().find(|(_, v)| !v.is_finite()) {
        return Err(Rejection::Strategy {
            detail: format!("metric `{k}` is not finite"),
        });
    }
    Ok(reply)
}
