//! The round orchestrator.
//!
//! [`Server`] owns the loop: sample clients, send the global model, collect
//! replies until the deadline, validate each update, aggregate the valid ones,
//! apply the step, evaluate, checkpoint and report. Aggregators, privacy
//! mechanisms and transports only do their one job.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::aggregate::{Aggregate, Aggregator};
use crate::checkpoint::{CheckpointStore, RunState};
use crate::client::{EvaluateIns, FitIns};
use crate::error::{Error, Result};
use crate::events::{
    AcceptedUpdate, ClientFailure, EventSubscriber, RoundOutcome, RoundRecord, ServerEvent,
};
use crate::model::{Evaluation, TrainConfig};
use crate::params::{Layout, Parameters, Selection};
use crate::sealed::{SealedAggregator, SealedTensors};
use crate::transport::{Failure, Rejection, Reply, Task, Transport};
use crate::trust::{TrustPolicy, TrustTracker};
use crate::update::{ClientId, ClientUpdate, Metrics, UpdateKind};

/// Settings of a federated run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerConfig {
    /// Rounds that [`Server::run`] runs in total (a resumed run counts the rounds already done).
    pub rounds: u64,
    /// Fraction of connected clients sampled for training each round.
    pub fraction_fit: f64,
    /// The quorum: a round needs at least this many valid updates, and at
    /// least this many clients are sampled.
    pub min_fit_clients: usize,
    /// A round starts only when this many clients are connected.
    pub min_available_clients: usize,
    /// Fraction of connected clients asked to evaluate after each round (0 = none).
    pub fraction_evaluate: f64,
    /// How long the server waits for replies in one round.
    pub round_timeout: Duration,
    /// Seeds client sampling and each client's training seed.
    pub seed: u64,
    /// Step size applied to the aggregated delta (1.0 = plain FedAvg).
    pub server_learning_rate: f32,
    /// Local training settings sent to the clients (the seed is replaced per client and round).
    pub train: TrainConfig,
    /// Where checkpoints go; `None` disables them.
    pub checkpoint_dir: Option<PathBuf>,
    /// Model files kept in the checkpoint directory.
    pub keep_checkpoints: usize,
    /// Track per-client trust over rounds (needs an aggregator that scores
    /// trust, e.g. those of `fedcore-robust`); `None` disables it.
    #[serde(default)]
    pub trust: Option<TrustPolicy>,
}

impl Default for ServerConfig {
    /// 10 rounds, every client sampled, quorum 1, a 60 s deadline, seed 0, no checkpoints.
    fn default() -> Self {
        Self {
            rounds: 10,
            fraction_fit: 1.0,
            min_fit_clients: 1,
            min_available_clients: 1,
            fraction_evaluate: 0.0,
            round_timeout: Duration::from_secs(60),
            seed: 0,
            server_learning_rate: 1.0,
            train: TrainConfig::default(),
            checkpoint_dir: None,
            keep_checkpoints: 3,
            trust: None,
        }
    }
}

impl ServerConfig {
    /// Checks that the settings can work.
    pub fn check(&self) -> Result<()> {
        if let Some(t) = &self.trust {
            t.check()?;
        }
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if !(self.fraction_fit > 0.0 && self.fraction_fit <= 1.0) {
            return bad(format!(
                "fraction_fit {} is not in (0, 1]",
                self.fraction_fit
            ));
        }
        if !(0.0..=1.0).contains(&self.fraction_evaluate) {
            return bad(format!(
                "fraction_evaluate {} is not in [0, 1]",
                self.fraction_evaluate
            ));
        }
        if self.min_fit_clients == 0 {
            return bad("min_fit_clients must be at least 1".into());
        }
        if self.round_timeout.is_zero() {
            return bad("round_timeout must be positive".into());
        }
        if !(self.server_learning_rate.is_finite() && self.server_learning_rate > 0.0) {
            return bad("server_learning_rate must be positive and finite".into());
        }
        self.train.check()
    }
}

/// A server-side evaluation of the global model (e.g. on a held-out set).
///
/// It receives the plain global model and, when the run seals tensors, the
/// sealed global: an evaluator that holds the key (an evaluation site
/// trusted with it, never the aggregation server itself) opens it.
pub type Evaluator =
    Box<dyn FnMut(&Parameters, Option<&SealedTensors>) -> Result<Evaluation> + Send>;

/// The round orchestrator.
///
/// ```
/// use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
/// use fedcore::memory::InMemoryTransport;
/// use fedcore::{FedAvg, Model, ModelClient, Server, ServerConfig};
///
/// let mut transport = InMemoryTransport::new();
/// for (i, seed) in [1u64, 2, 3].into_iter().enumerate() {
///     let data = synthetic_blobs(seed, 200, 5, 3, 3.0);
///     transport.add_client(ModelClient::new(format!("site-{i}"), SoftmaxRegression::new(5, 3), data))?;
/// }
/// let config = ServerConfig { rounds: 3, min_fit_clients: 2, ..ServerConfig::default() };
/// let initial = SoftmaxRegression::new(5, 3).parameters();
/// let mut server = Server::new(config, initial, transport, FedAvg)?;
/// server.run()?;
/// assert_eq!(server.history().len(), 3);
/// # Ok::<(), fedcore::Error>(())
/// ```
pub struct Server<T: Transport, A: Aggregator> {
    config: ServerConfig,
    transport: T,
    aggregator: A,
    global: Arc<Parameters>,
    next_round: u64,
    history: Vec<RoundRecord>,
    trust: Option<TrustTracker>,
    subscribers: Vec<Box<dyn EventSubscriber>>,
    evaluator: Option<Evaluator>,
    store: Option<CheckpointStore>,
    sealing: Option<Sealing>,
}

/// The server's side of sealed tensors (see [`crate::sealed`]).
struct Sealing {
    aggregator: Box<dyn SealedAggregator>,
    /// Everything but the sealed tensors: what updates carry in the clear.
    body: Selection,
    /// The sealed tensors' own layout.
    head_layout: Arc<Layout>,
    /// The sealed global values.
    global: Arc<SealedTensors>,
}

impl<T: Transport, A: Aggregator> Server<T, A> {
    /// A new run from `initial`. If `config.checkpoint_dir` already holds a
    /// checkpoint this is an error (nothing is overwritten): use
    /// [`Server::resume`] or another directory.
    pub fn new(
        config: ServerConfig,
        initial: Parameters,
        transport: T,
        aggregator: A,
    ) -> Result<Self> {
        config.check()?;
        let store = config
            .checkpoint_dir
            .as_ref()
            .map(|d| CheckpointStore::new(d, config.keep_checkpoints));
        if let Some(s) = &store
            && s.exists()
        {
            return Err(Error::InvalidConfig(format!(
                "{} already holds a checkpoint; resume it or choose another directory",
                s.dir().display()
            )));
        }
        if config.min_fit_clients < aggregator.min_updates() {
            return Err(Error::InvalidConfig(format!(
                "aggregator `{}` needs at least {} updates per round; min_fit_clients is {}",
                aggregator.name(),
                aggregator.min_updates(),
                config.min_fit_clients
            )));
        }
        if let Some(nf) = initial.first_non_finite() {
            return Err(Error::InvalidConfig(format!(
                "initial parameters hold {} in `{}`",
                nf.value, nf.tensor
            )));
        }
        Ok(Self {
            trust: config.trust.clone().map(TrustTracker::new),
            config,
            transport,
            aggregator,
            global: Arc::new(initial),
            next_round: 1,
            history: Vec::new(),
            subscribers: Vec::new(),
            evaluator: None,
            store,
            sealing: None,
        })
    }

    /// Continues the run saved in `config.checkpoint_dir`. `template` gives the
    /// model's layout (its values are replaced by the checkpoint's). The seed
    /// must be the one the run started with.
    pub fn resume(
        config: ServerConfig,
        template: Parameters,
        transport: T,
        aggregator: A,
    ) -> Result<Self> {
        config.check()?;
        let dir = config
            .checkpoint_dir
            .clone()
            .ok_or_else(|| Error::InvalidConfig("resume needs a checkpoint_dir".into()))?;
        let store = CheckpointStore::new(&dir, config.keep_checkpoints);
        let (global, state) = store
            .load(template.layout())?
            .ok_or_else(|| Error::Checkpoint {
                path: dir.clone(),
                reason: "no checkpoint to resume from".into(),
            })?;
        if state.seed != config.seed {
            return Err(Error::InvalidConfig(format!(
                "the checkpoint was written by a run with seed {}, not {}",
                state.seed, config.seed
            )));
        }
        info!(round = state.next_round, dir = %dir.display(), "resuming");
        Ok(Self {
            trust: config
                .trust
                .clone()
                .map(|p| TrustTracker::replay(p, &state.history)),
            config,
            transport,
            aggregator,
            global: Arc::new(global),
            next_round: state.next_round,
            history: state.history,
            subscribers: Vec::new(),
            evaluator: None,
            store: Some(store),
            sealing: None,
        })
    }

    /// Seals the tensors matching `patterns` (e.g. `["classifier.*"]`): from
    /// now on the server holds them only encrypted, combines the clients'
    /// encrypted deltas with `aggregator` using the per-client weights of the
    /// plain aggregator, and keeps its plain copy of them at zero. See
    /// [`crate::sealed`].
    ///
    /// A new run encrypts the initial values with `aggregator`'s public key; a
    /// resumed run (after [`Server::resume`]) loads the sealed values saved
    /// with its checkpoint.
    pub fn with_sealing<S: AsRef<str>>(
        mut self,
        patterns: &[S],
        aggregator: impl SealedAggregator + 'static,
    ) -> Result<Self> {
        let layout = self.global.layout().clone();
        let head = layout.select(patterns)?;
        let sealed_values = head.len();
        if sealed_values == 0 {
            return Err(Error::InvalidConfig(
                "the sealed tensors hold no values".into(),
            ));
        }
        let body = head.complement(&layout);
        let head_layout = Arc::new(head.layout(&layout));
        let global = match self.saved_sealed(&head_layout)? {
            Some(saved) => {
                aggregator.check_global(&saved)?;
                saved
            }
            None => aggregator
                .seal_initial(&head_layout, &head.gather(&layout, self.global.as_slice()))?,
        };
        if global.layout() != &head_layout {
            return Err(Error::Sealing(format!(
                "`{}` sealed another layout than asked",
                aggregator.name()
            )));
        }
        let mut plain = (*self.global).clone();
        head.scatter(&layout, &vec![0.0; head.len()], plain.as_mut_slice())?;
        self.global = Arc::new(plain);
        info!(
            tensors = head.tensors().len(),
            values = head.len(),
            sealer = %aggregator.name(),
            "sealing tensors"
        );
        self.sealing = Some(Sealing {
            aggregator: Box::new(aggregator),
            body,
            head_layout,
            global: Arc::new(global),
        });
        Ok(self)
    }

    /// The sealed global tensors, when the run seals some.
    pub fn sealed_global(&self) -> Option<&SealedTensors> {
        self.sealing.as_ref().map(|s| &*s.global)
    }

    /// The sealed values a resumed run saved with its checkpoint.
    fn saved_sealed(&self, layout: &Arc<Layout>) -> Result<Option<SealedTensors>> {
        let Some(store) = &self.store else {
            return Ok(None);
        };
        if self.next_round == 1 {
            return Ok(None);
        }
        let path = sealed_path(store.dir(), self.next_round);
        let bytes = std::fs::read(&path).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            reason: format!("the run seals tensors but their saved values cannot be read: {e}"),
        })?;
        Ok(Some(SealedTensors::new(layout.clone(), bytes)))
    }

    /// Adds an event subscriber.
    pub fn subscribe(&mut self, subscriber: impl EventSubscriber + 'static) {
        self.subscribers.push(Box::new(subscriber));
    }

    /// Evaluates the global model on the server after every round.
    ///
    /// In a run that seals tensors the parameters passed hold zeros there;
    /// use [`Server::set_sealed_evaluator`] to evaluate the whole model.
    pub fn set_evaluator(
        &mut self,
        mut evaluator: impl FnMut(&Parameters) -> Result<Evaluation> + Send + 'static,
    ) {
        self.evaluator = Some(Box::new(move |p, _| evaluator(p)));
    }

    /// Evaluates the global model after every round with access to the
    /// sealed global (`None` when the run seals nothing), for an evaluator
    /// that holds the key to open it.
    pub fn set_sealed_evaluator(
        &mut self,
        evaluator: impl FnMut(&Parameters, Option<&SealedTensors>) -> Result<Evaluation>
        + Send
        + 'static,
    ) {
        self.evaluator = Some(Box::new(evaluator));
    }

    /// The current global model.
    pub fn global(&self) -> &Parameters {
        &self.global
    }

    /// Every round so far.
    pub fn history(&self) -> &[RoundRecord] {
        &self.history
    }

    /// The round that [`Server::run_round`] runs next.
    pub fn next_round(&self) -> u64 {
        self.next_round
    }

    /// The settings.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// The transport (e.g. to inject faults in a simulation).
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// The aggregator.
    pub fn aggregator_mut(&mut self) -> &mut A {
        &mut self.aggregator
    }

    /// Runs rounds until `config.rounds` rounds exist, stopping at the first
    /// round that fails (its error is returned; the model stays as it was).
    pub fn run(&mut self) -> Result<()> {
        while self.next_round <= self.config.rounds {
            self.run_round()?;
        }
        Ok(())
    }

    fn emit(&mut self, event: ServerEvent) {
        for s in &mut self.subscribers {
            s.on_event(&event);
        }
    }

    /// The moving-average trust of every client seen, when trust is tracked.
    pub fn trust(&self) -> Option<&TrustTracker> {
        self.trust.as_ref()
    }

    /// Suspicious clients to leave out of this round, if the policy says so
    /// and enough others remain for `required`.
    fn excluded(&self, available: &[ClientId], required: usize) -> Vec<ClientId> {
        let Some(t) = &self.trust else {
            return Vec::new();
        };
        if !t.policy().exclude_next_round {
            return Vec::new();
        }
        // A client sits out one round, then is sampled again so that its
        // trust can recover (an unobserved average never would).
        let sat_out_last = self
            .history
            .last()
            .map_or(&[][..], |r| r.excluded.as_slice());
        let out: Vec<ClientId> = t
            .suspicious()
            .into_iter()
            .filter(|c| available.contains(c) && !sat_out_last.contains(c))
            .collect();
        if available.len() - out.len() < required {
            warn!(
                suspicious = out.len(),
                available = available.len(),
                required,
                "not excluding suspicious clients: too few would remain"
            );
            return Vec::new();
        }
        out
    }

    /// Folds the round's trust scores into the averages; returns the clients
    /// that became suspicious.
    fn track_trust(&mut self, accepted: &mut [AcceptedUpdate]) -> Vec<(ClientId, f64)> {
        let Some(t) = self.trust.as_mut() else {
            return Vec::new();
        };
        let mut flagged = Vec::new();
        for a in accepted {
            let Some(score) = a.trust else { continue };
            let was = t.get(&a.client).is_some_and(|c| c.suspicious);
            let now = t.observe(&a.client, score);
            a.trust_ema = Some(now.ema);
            a.suspicious = now.suspicious;
            if now.suspicious && !was {
                flagged.push((a.client.clone(), now.ema));
            }
        }
        flagged
    }

    /// Runs one round. A round with fewer valid updates than the quorum, or
    /// whose aggregation fails, is recorded and returned as an error; the
    /// global model is unchanged and the next call runs the next round.
    pub fn run_round(&mut self) -> Result<&RoundRecord> {
        let round = self.next_round;
        let started = Instant::now();
        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);

        let mut available = self.transport.clients();
        available.sort();
        available.dedup();
        let required = self
            .config
            .min_available_clients
            .max(self.config.min_fit_clients);
        if available.len() < required {
            return Err(Error::NotEnoughClients {
                available: available.len(),
                required,
            });
        }
        let excluded = self.excluded(&available, required);
        if !excluded.is_empty() {
            available.retain(|c| !excluded.contains(c));
            info!(round, excluded = ?excluded, "suspicious clients sit this round out");
        }
        let sampled = sample(
            &available,
            self.config.fraction_fit,
            self.config.min_fit_clients,
            mix(self.config.seed, round),
        );
        info!(
            round,
            sampled = sampled.len(),
            available = available.len(),
            "round started"
        );
        self.emit(ServerEvent::RoundStarted {
            round,
            sampled: sampled.clone(),
        });

        let global = self.global.clone();
        let sealed_global = self.sealing.as_ref().map(|s| s.global.clone());
        let (train, seed) = (&self.config.train, self.config.seed);
        let (replies, mut failures) = dispatch(
            &mut self.transport,
            self.config.round_timeout,
            &sampled,
            |client| {
                let mut config = train.clone();
                config.seed = client_seed(seed, round, client);
                Task::Fit(FitIns {
                    round,
                    parameters: global.clone(),
                    config,
                    sealed: sealed_global.clone(),
                })
            },
        );
        // What updates carry in the clear: the whole model, or the body.
        let reference = match &self.sealing {
            Some(s) => Arc::new(s.body.subset(&global)),
            None => global.clone(),
        };
        let mut accepted: Vec<(ClientUpdate, f64)> = Vec::new();
        // Updates are kept by value and handed to the aggregator as one slice:
        // for a 7M-parameter model each one is 28 MB, so nothing here copies them.
        for (client, reply) in replies {
            match reply {
                Reply::Fit(update) => match validate(&reference, round, &client, update)
                    .and_then(|v| self.validate_sealed(v))
                {
                    Ok((update, norm)) => accepted.push((update, norm)),
                    Err(r) => failures.push(ClientFailure {
                        client,
                        reason: Failure::Rejected(r),
                    }),
                },
                Reply::Evaluate(_) => failures.push(ClientFailure {
                    client,
                    reason: Failure::Rejected(Rejection::WrongReply),
                }),
            }
        }
        accepted.sort_by(|a, b| a.0.client.cmp(&b.0.client));
        let (updates, norms): (Vec<ClientUpdate>, Vec<f64>) = accepted.into_iter().unzip();
        failures.sort_by(|a, b| a.client.cmp(&b.client));
        for f in &failures {
            warn!(round, client = %f.client, reason = %f.reason, "update rejected");
        }
        for (u, norm) in updates.iter().zip(&norms) {
            let event = ServerEvent::UpdateAccepted {
                round,
                client: u.client.clone(),
                num_examples: u.num_examples,
                update_norm: *norm,
            };
            self.emit(event);
        }
        for f in failures.clone() {
            self.emit(ServerEvent::UpdateRejected {
                round,
                client: f.client,
                reason: f.reason,
            });
        }

        let mut record = RoundRecord {
            round,
            outcome: RoundOutcome::Completed,
            aggregator: self.aggregator.name(),
            sampled,
            excluded,
            accepted: Vec::new(),
            failures,
            train_metrics: weighted_metrics(updates.iter().map(|u| (u.num_examples, &u.metrics))),
            aggregate_metrics: Metrics::new(),
            update_norm: None,
            evaluation: None,
            federated_evaluation: None,
            started_at_ms,
            duration_ms: 0,
        };

        let step = if updates.len() < self.config.min_fit_clients {
            record.outcome = RoundOutcome::QuorumNotReached;
            Err(Error::QuorumNotReached {
                round,
                required: self.config.min_fit_clients,
                accepted: updates.len(),
                failures: record
                    .failures
                    .iter()
                    .map(|f| (f.client.clone(), f.reason.to_string()))
                    .collect(),
            })
        } else {
            self.aggregate(&updates, &reference)
                .and_then(|agg| {
                    let sealed = self.aggregate_sealed(&updates, &agg)?;
                    Ok((agg, sealed))
                })
                .inspect_err(|e| {
                    record.outcome = RoundOutcome::AggregationFailed(e.to_string());
                })
        };

        let result = match step {
            Ok((mut agg, sealed)) => {
                if let (Some(s), Some((global, ms))) = (self.sealing.as_mut(), sealed) {
                    s.global = Arc::new(global);
                    agg.metrics.insert("sealed_sum_ms".into(), ms);
                }
                record.accepted = updates
                    .iter()
                    .zip(&norms)
                    .zip(&agg.clients)
                    .map(|((u, norm), d)| AcceptedUpdate {
                        client: u.client.clone(),
                        num_examples: u.num_examples,
                        update_norm: *norm,
                        metrics: u.metrics.clone(),
                        provenance: u.provenance.clone(),
                        weight: d.weight,
                        distance: d.distance,
                        trust: d.trust,
                        trust_ema: None,
                        suspicious: false,
                    })
                    .collect();
                let flagged = self.track_trust(&mut record.accepted);
                record.aggregate_metrics = agg.metrics;
                let mut next = (*self.global).clone();
                let lr = self.config.server_learning_rate;
                match &self.sealing {
                    None => next.axpy(lr, &agg.parameters)?,
                    Some(s) => {
                        let layout = next.layout().clone();
                        s.body
                            .axpy(&layout, lr, agg.parameters.as_slice(), next.as_mut_slice())?
                    }
                }
                record.update_norm = Some(agg.parameters.l2_norm());
                self.global = Arc::new(next);
                if let Some(eval) = self.evaluator.as_mut() {
                    let sealed = self.sealing.as_ref().map(|s| &*s.global);
                    match eval(&self.global, sealed) {
                        Ok(e) => record.evaluation = Some(e),
                        Err(e) => warn!(round, error = %e, "server-side evaluation failed"),
                    }
                }
                record.federated_evaluation = self.federated_evaluation(round, &available);
                for (client, trust_ema) in flagged {
                    warn!(round, client = %client, trust_ema, "client flagged as suspicious");
                    self.emit(ServerEvent::ClientFlagged {
                        round,
                        client,
                        trust_ema,
                    });
                }
                Ok(())
            }
            Err(e) => Err(e),
        };

        record.duration_ms = started.elapsed().as_millis() as u64;
        self.history.push(record.clone());
        self.next_round += 1;
        self.checkpoint(round)?;
        match result {
            Ok(()) => {
                info!(
                    round,
                    accepted = record.accepted.len(),
                    failed = record.failures.len(),
                    loss = record.evaluation.as_ref().map(|e| e.loss),
                    "round finished"
                );
                self.emit(ServerEvent::RoundFinished {
                    record: Box::new(record),
                });
                Ok(self.history.last().expect("just pushed"))
            }
            Err(e) => {
                warn!(round, error = %e, "round failed; model unchanged");
                self.emit(ServerEvent::RoundFailed {
                    record: Box::new(record),
                    error: e.to_string(),
                });
                Err(e)
            }
        }
    }

    /// Checks the sealed part of an update that passed [`validate`].
    fn validate_sealed(
        &self,
        (update, norm): (ClientUpdate, f64),
    ) -> std::result::Result<(ClientUpdate, f64), Rejection> {
        let detail = |d: String| Rejection::Sealed { detail: d };
        match (&self.sealing, &update.sealed) {
            (None, None) => {}
            (None, Some(_)) => return Err(detail("this run seals no tensors".into())),
            (Some(_), None) => return Err(detail("missing: this run seals tensors".into())),
            (Some(s), Some(part)) => {
                if part.layout() != &s.head_layout {
                    return Err(detail(format!(
                        "covers {} values in {} tensors, this run seals {} values in {}",
                        part.len(),
                        part.layout().tensors().len(),
                        s.head_layout.len(),
                        s.head_layout.tensors().len()
                    )));
                }
                s.aggregator
                    .check(part)
                    .map_err(|e| detail(e.to_string()))?;
            }
        }
        Ok((update, norm))
    }

    /// The new sealed global: `global + lr * sum_i w_i * sealed_i` with the
    /// aggregator's per-client weights normalized to sum to 1, and the time
    /// it took in milliseconds. `None` when the run seals nothing.
    fn aggregate_sealed(
        &self,
        updates: &[ClientUpdate],
        agg: &Aggregate,
    ) -> Result<Option<(SealedTensors, f64)>> {
        let Some(s) = &self.sealing else {
            return Ok(None);
        };
        let started = Instant::now();
        let total: f64 = agg.clients.iter().map(|d| d.weight).sum();
        if !(total.is_finite() && total > 0.0) || agg.clients.iter().any(|d| d.weight < 0.0) {
            return Err(Error::InvalidWeights {
                reason: format!(
                    "aggregator `{}` reported weights summing to {total}; the sealed sum needs non-negative weights with a positive sum",
                    self.aggregator.name()
                ),
            });
        }
        let lr = f64::from(self.config.server_learning_rate);
        let weights: Vec<f64> = agg.clients.iter().map(|d| lr * d.weight / total).collect();
        let parts = updates
            .iter()
            .map(|u| {
                u.sealed.as_ref().ok_or_else(|| {
                    Error::Sealing(format!("update of {} has no sealed part", u.client))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let global = s.aggregator.accumulate(&s.global, &parts, &weights)?;
        Ok(Some((global, started.elapsed().as_secs_f64() * 1e3)))
    }

    fn aggregate(&mut self, updates: &[ClientUpdate], reference: &Parameters) -> Result<Aggregate> {
        let agg = self.aggregator.aggregate(updates)?;
        reference.ensure_compatible(&agg.parameters)?;
        if let Some(nf) = agg.parameters.first_non_finite() {
            return Err(Error::AggregateNotFinite {
                aggregator: self.aggregator.name(),
                tensor: nf.tensor,
            });
        }
        if agg.clients.len() != updates.len() {
            return Err(Error::DimensionMismatch {
                expected: updates.len(),
                got: agg.clients.len(),
            });
        }
        Ok(agg)
    }

    fn federated_evaluation(&mut self, round: u64, available: &[ClientId]) -> Option<Evaluation> {
        if self.config.fraction_evaluate <= 0.0 {
            return None;
        }
        let chosen = sample(
            available,
            self.config.fraction_evaluate,
            1,
            mix(self.config.seed ^ 0xe7a1_0a7e, round),
        );
        let global = self.global.clone();
        let sealed = self.sealing.as_ref().map(|s| s.global.clone());
        let (replies, failures) = dispatch(
            &mut self.transport,
            self.config.round_timeout,
            &chosen,
            |_| {
                Task::Evaluate(EvaluateIns {
                    round,
                    parameters: global.clone(),
                    sealed: sealed.clone(),
                })
            },
        );
        for f in failures {
            warn!(round, client = %f.client, reason = %f.reason, "evaluation failed");
        }
        let evals: Vec<Evaluation> = replies
            .into_iter()
            .filter_map(|(_, r)| match r {
                Reply::Evaluate(e) if e.loss.is_finite() && e.num_examples > 0 => Some(e),
                _ => None,
            })
            .collect();
        let total: u64 = evals.iter().map(|e| e.num_examples).sum();
        (total > 0).then(|| Evaluation {
            loss: evals
                .iter()
                .map(|e| e.loss * e.num_examples as f64)
                .sum::<f64>()
                / total as f64,
            num_examples: total,
            metrics: weighted_metrics(evals.iter().map(|e| (e.num_examples, &e.metrics))),
        })
    }

    fn checkpoint(&mut self, round: u64) -> Result<()> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let state = RunState {
            version: 0,
            seed: self.config.seed,
            next_round: self.next_round,
            model_file: String::new(),
            model_sha256: String::new(),
            history: self.history.clone(),
        };
        if let Some(s) = &self.sealing {
            // Written before the state that points at it, under the round it
            // starts, so a crash in between leaves the previous pair intact.
            let path = sealed_path(store.dir(), self.next_round);
            std::fs::create_dir_all(store.dir()).map_err(|e| Error::Checkpoint {
                path: store.dir().to_owned(),
                reason: format!("cannot create the checkpoint folder: {e}"),
            })?;
            crate::checkpoint::write_atomic(&path, s.global.bytes())?;
        }
        let path = store.save(&self.global, state)?;
        if self.sealing.is_some() {
            let keep = self.config.keep_checkpoints.max(1) as u64;
            let stale = self.next_round.saturating_sub(keep);
            for r in 1..=stale {
                let _ = std::fs::remove_file(sealed_path(store.dir(), r));
            }
        }
        self.emit(ServerEvent::CheckpointWritten { round, path });
        Ok(())
    }
}

/// Where the sealed global that round `next_round` starts from is saved.
fn sealed_path(dir: &std::path::Path, next_round: u64) -> PathBuf {
    dir.join(format!("sealed-{next_round:06}.bin"))
}

/// Sends one task to each client and waits for the replies until the
/// round deadline. Returns the replies (one per client at most, from
/// clients that were asked) and the failures.
fn dispatch<T: Transport>(
    transport: &mut T,
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
            Err(e) => failures.push(ClientFailure {
                client: client.clone(),
                reason: Failure::Disconnected(e.to_string()),
            }),
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
                failures.push(ClientFailure {
                    client,
                    reason: Failure::Rejected(reason),
                });
            }
            continue;
        }
        answered.insert(client.clone());
        match envelope.reply {
            Ok(r) => replies.push((client, r)),
            Err(reason) => failures.push(ClientFailure { client, reason }),
        }
    }
    let waited = timeout.as_millis() as u64;
    failures.extend(pending.into_iter().map(|client| ClientFailure {
        client,
        reason: Failure::Timeout(waited),
    }));
    (replies, failures)
}

/// Checks one update against the round; returns it as a delta with its norm.
fn validate(
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

/// Example-weighted mean of each metric over the entries that report it.
fn weighted_metrics<'a>(entries: impl Iterator<Item = (u64, &'a Metrics)>) -> Metrics {
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
fn sample(available: &[ClientId], fraction: f64, min: usize, seed: u64) -> Vec<ClientId> {
    let n = available.len();
    let k = ((fraction * n as f64).ceil() as usize).max(min).min(n);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut idx = rand::seq::index::sample(&mut rng, n, k).into_vec();
    idx.sort_unstable();
    idx.into_iter().map(|i| available[i].clone()).collect()
}

/// SplitMix64 finalizer: a well-mixed 64-bit hash of `a` and `b`.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The training seed of `client` in `round`: stable across processes and
/// Rust versions (FNV-1a of the id, not `std`'s randomized hasher).
fn client_seed(seed: u64, round: u64, client: &ClientId) -> u64 {
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
