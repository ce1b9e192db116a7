use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::aggregate::Aggregate;
use crate::checkpoint::{CheckpointStore, Snapshot};
use crate::client::{EvaluateIns, FitIns};
use crate::cross_site::{CrossSiteEvaluation, CrossSiteFailure, CrossSiteModel};
use crate::error::{Error, Result};
use crate::events::{
    AcceptedUpdate, AggregationFailure, ClientFailure, EventSubscriber, RoundOutcome, RoundRecord,
    ServerEvent, Withheld,
};
use crate::model::{Evaluation, LrSchedule, TrainConfig};
use crate::params::{Layout, Parameters, Selection};
use crate::round::{
    client_seed, dispatch, mix, sample, validate, validate_extra, weighted_metrics,
};
use crate::run::{RunEnd, RunPolicy, RunReport};
use crate::sealed::{SealedAggregator, SealedTensors};
use crate::server_opt::{OptState, ServerOpt};
use crate::strategy::{RoundSteps, Strategy};
use crate::transport::{Failure, Rejection, Reply, Task, Transport};
use crate::trust::{TrustPolicy, TrustTracker};
use crate::update::{ClientId, ClientUpdate, Metrics};

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
    /// How long the server waits for replies in one round (plus
    /// `round_timeout_per_mb` for the model's size).
    pub round_timeout: Duration,
    /// Added to `round_timeout` per megabyte (10^6 bytes) of the model
    /// and its sealed tensors sent with each task: the time the slowest
    /// link the run must wait for takes to move one megabyte down and one
    /// up (2 s for a 1 MB/s link). Zero by default: the deadline is then
    /// `round_timeout` whatever the model's size.
    #[serde(default)]
    pub round_timeout_per_mb: Duration,
    /// Seeds client sampling and each client's training seed.
    pub seed: u64,
    /// Step size applied to the aggregated delta (1.0 = plain FedAvg).
    pub server_learning_rate: f32,
    /// What the server makes of the aggregate before stepping along it
    /// (FedAvgM, FedAdam, ...; default: nothing, plain SGD).
    #[serde(default)]
    pub server_opt: ServerOpt,
    /// Local training settings sent to the clients (the seed is replaced per client and round).
    pub train: TrainConfig,
    /// How the learning rate sent with `train` changes over the rounds.
    #[serde(default)]
    pub lr_schedule: LrSchedule,
    /// Where checkpoints go; `None` disables them.
    pub checkpoint_dir: Option<PathBuf>,
    /// Model files kept in the checkpoint directory.
    pub keep_checkpoints: usize,
    /// Track per-client trust over rounds (needs an aggregator that scores
    /// trust, e.g. those of `fedcore-robust`); `None` disables it.
    #[serde(default)]
    pub trust: Option<TrustPolicy>,
    /// At the end of a completed run, evaluate the global model and every
    /// site's local model on every site's held-out data
    /// ([`Server::cross_site_evaluation`], in [`RunReport::cross_site`]).
    /// The server then keeps one local model per site. Not with sealed
    /// tensors.
    #[serde(default)]
    pub cross_site_evaluation: bool,
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
            round_timeout_per_mb: Duration::ZERO,
            seed: 0,
            server_learning_rate: 1.0,
            server_opt: ServerOpt::Sgd,
            train: TrainConfig::default(),
            lr_schedule: LrSchedule::Constant,
            checkpoint_dir: None,
            keep_checkpoints: 3,
            trust: None,
            cross_site_evaluation: false,
        }
    }
}

impl ServerConfig {
    /// Clients that must be connected for a round to start: the larger of
    /// `min_available_clients` and the quorum.
    pub fn required_clients(&self) -> usize {
        self.min_available_clients.max(self.min_fit_clients)
    }

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
        self.lr_schedule.check()?;
        self.server_opt.check()?;
        self.train.check()
    }

    /// How long a round with a model of `model_bytes` (values and sealed
    /// bytes) waits for replies: `round_timeout`, plus
    /// `round_timeout_per_mb` per megabyte.
    pub fn deadline_for(&self, model_bytes: u64) -> Duration {
        self.round_timeout
            .saturating_add(self.round_timeout_per_mb.mul_f64(model_bytes as f64 / 1e6))
    }

    /// The training settings for round `round` (before the per-client
    /// seed): `train` with the schedule's learning rate.
    pub fn train_for(&self, round: u64) -> TrainConfig {
        let mut train = self.train.clone();
        train.learning_rate *= self.lr_schedule.factor(round, self.rounds);
        train
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
/// [`Server`] owns the loop: sample clients, send the global model, collect
/// replies until the deadline, validate each update, aggregate the valid ones,
/// apply the step, evaluate, checkpoint and report. Aggregators, privacy
/// mechanisms and transports only do their one job.
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
pub struct Server<T: Transport, A: Strategy> {
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
    exclusions: Exclusions,
    /// The server optimizer's state (empty for plain SGD).
    opt_state: OptState,
    /// Each site's local model from its last accepted update, kept while
    /// `config.cross_site_evaluation` is on.
    local_models: BTreeMap<ClientId, (u64, Arc<Parameters>)>,
    /// The last round's aggregate, offered to the next round's strategy
    /// to write into ([`RoundSteps::take_spare`]).
    spare: Option<Parameters>,
    /// The previous global model's memory, when nothing else held it: the
    /// next global is written into it.
    spare_global: Option<Parameters>,
}

/// Clients an operator keeps out of training (e.g. a hospital an
/// administrator suspended on the dashboard), each with a reason. Cheap to
/// clone; every clone is the same list, so a dashboard thread can change it
/// while the server runs. Changes take effect from the next round.
#[derive(Debug, Clone, Default)]
pub struct Exclusions(Arc<Mutex<BTreeMap<ClientId, String>>>);

impl Exclusions {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ClientId, String>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `client` out of the rounds from the next one on.
    pub fn exclude(&self, client: ClientId, reason: impl Into<String>) {
        self.lock().insert(client, reason.into());
    }

    /// Lets `client` take part again; false if it was not excluded.
    pub fn include(&self, client: &ClientId) -> bool {
        self.lock().remove(client).is_some()
    }

    /// Whether `client` is excluded.
    pub fn contains(&self, client: &ClientId) -> bool {
        self.lock().contains_key(client)
    }

    /// The excluded clients and why.
    pub fn list(&self) -> BTreeMap<ClientId, String> {
        self.lock().clone()
    }
}

/// The server's side of sealed tensors (see [`SealedTensors`](crate::SealedTensors)).
struct Sealing {
    aggregator: Box<dyn SealedAggregator>,
    /// Everything but the sealed tensors: what updates carry in the clear.
    body: Selection,
    /// The sealed tensors' own layout.
    head_layout: Arc<Layout>,
    /// The sealed global values.
    global: Arc<SealedTensors>,
}

impl<T: Transport, A: Strategy> Server<T, A> {
    /// How long this round waits for replies ([`ServerConfig::deadline_for`]
    /// the global model and its sealed tensors).
    fn round_deadline(&self) -> Duration {
        let sealed = self.sealing.as_ref().map_or(0, |s| s.global.bytes().len());
        let bytes = self.global.len() as u64 * 4 + sealed as u64;
        self.config.deadline_for(bytes)
    }

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
        let info = aggregator.describe();
        if config.min_fit_clients < info.min_updates {
            return Err(Error::InvalidConfig(format!(
                "aggregator `{}` needs at least {} updates per round; min_fit_clients is {}",
                info.name, info.min_updates, config.min_fit_clients
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
            exclusions: Exclusions::default(),
            opt_state: OptState::default(),
            local_models: BTreeMap::new(),
            spare: None,
            spare_global: None,
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
        // A stateful server optimizer continues from its saved state, or
        // the resumed run would not be the uninterrupted one.
        let opt_state = match (&state.optimizer, config.server_opt.is_stateful()) {
            (None, false) => OptState::default(),
            (None, true) if state.next_round <= 1 => OptState::default(),
            (saved, _) => {
                let saved_kind = saved
                    .as_ref()
                    .map_or_else(|| ServerOpt::Sgd.kind(), |o| o.kind.clone());
                if saved_kind != config.server_opt.kind() {
                    return Err(Error::InvalidConfig(format!(
                        "the checkpoint was written with server optimizer {saved_kind}, not {}",
                        config.server_opt.kind()
                    )));
                }
                match saved {
                    Some(o) => store.load_optimizer(o)?,
                    None => OptState::default(),
                }
            }
        };
        // So does a strategy that keeps state (centered clipping's center).
        let mut aggregator = aggregator;
        let name = aggregator.describe().name;
        match (&state.strategy, aggregator.saved_state().is_some()) {
            (None, false) => {}
            (None, true) => {
                return Err(Error::InvalidConfig(format!(
                    "`{name}` keeps state across rounds, but the checkpoint holds none for it"
                )));
            }
            (Some(saved), _) => {
                if saved.kind != name {
                    return Err(Error::InvalidConfig(format!(
                        "the checkpoint was written with strategy `{}`, not `{name}`",
                        saved.kind
                    )));
                }
                let values = store.load_state_tensor(saved, "state")?;
                aggregator.restore_state(values)?;
            }
        }
        Ok(Self {
            opt_state,
            local_models: BTreeMap::new(),
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
            exclusions: Exclusions::default(),
            spare: None,
            spare_global: None,
        })
    }

    /// Seals the tensors matching `patterns` (e.g. `["classifier.*"]`): from
    /// now on the server holds them only encrypted, combines the clients'
    /// encrypted deltas with `aggregator` using the per-client weights of the
    /// plain aggregator, and keeps its plain copy of them at zero. See
    /// [`SealedTensors`](crate::SealedTensors).
    ///
    /// A new run encrypts the initial values with `aggregator`'s public key; a
    /// resumed run (after [`Server::resume`]) loads the sealed values saved
    /// with its checkpoint.
    pub fn with_sealing<S: AsRef<str>>(
        mut self,
        patterns: &[S],
        aggregator: impl SealedAggregator + 'static,
    ) -> Result<Self> {
        if self.config.cross_site_evaluation {
            return Err(Error::InvalidConfig(
                "cross-site evaluation needs plain models, and sealed tensors are encrypted".into(),
            ));
        }
        if self.aggregator.fit_extra().is_some() {
            return Err(Error::InvalidConfig(format!(
                "`{}` sends tensors with the fit request, which sealed tensors cannot have (they would travel in the clear)",
                self.aggregator.describe().name
            )));
        }
        let layout = self.global.layout().clone();
        let head = layout.select(patterns)?;
        let sealed_values = head.len();
        if sealed_values == 0 {
            return Err(Error::InvalidConfig(
                "the sealed tensors hold no values".into(),
            ));
        }
        let body = head.complement(&layout)?;
        let head_layout = Arc::new(head.layout(&layout)?);
        let global = match self.saved_sealed(&head_layout)? {
            Some(saved) => {
                aggregator.check_global(&saved)?;
                saved
            }
            None => aggregator
                .seal_initial(&head_layout, &head.gather(&layout, self.global.as_slice())?)?,
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
        let bytes = store.load_sealed(self.next_round)?;
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

    /// The transport (e.g. to inject faults into an in-memory one, whose
    /// `inject` takes `&self`).
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport, for the crate's own network loop (shutdown).
    #[cfg(feature = "net")]
    pub(crate) fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// The aggregator (or multi-step strategy).
    pub fn aggregator(&self) -> &A {
        &self.aggregator
    }

    /// The clients an operator keeps out of training: a handle to change
    /// from anywhere (see [`Exclusions`]).
    pub fn exclusions(&self) -> Exclusions {
        self.exclusions.clone()
    }

    /// Runs rounds until `config.rounds` rounds exist under the default
    /// [`RunPolicy`]: a failed round is recorded and the next one runs; three
    /// failed rounds in a row end the run ([`RunEnd::TooManyFailedRounds`]).
    /// Errors only for what is not a round's failure (too few clients, a
    /// checkpoint that cannot be written).
    pub fn run(&mut self) -> Result<RunReport> {
        self.run_with(&RunPolicy::default(), |_, _| Ok::<(), Error>(()))
    }

    /// The run loop: until `config.rounds` rounds exist, waits for enough
    /// clients ([`RunPolicy::wait_for_clients`]), runs a round and calls
    /// `after_round` with the server and the round's record (to store it,
    /// steer the next round, ...; its error ends the run). A failed round is
    /// recorded and the run goes on, until [`RunPolicy::max_failed_in_a_row`]
    /// failed in a row; the stop signal ends the run between rounds.
    ///
    /// Errors: not enough clients within the wait, a checkpoint that cannot
    /// be written, or an error of `after_round` (of the caller's own error
    /// type `E`, e.g. `anyhow::Error`, into which fedcore's errors convert).
    pub fn run_with<E: From<Error>>(
        &mut self,
        policy: &RunPolicy,
        mut after_round: impl FnMut(&mut Self, &RoundRecord) -> std::result::Result<(), E>,
    ) -> std::result::Result<RunReport, E> {
        let mut report = RunReport {
            end: RunEnd::Completed,
            completed: 0,
            failed: 0,
            cross_site: None,
        };
        let mut in_a_row = 0u32;
        let required = self.config.required_clients();
        while self.next_round <= self.config.rounds {
            if policy.stop.is_stopped() {
                report.end = RunEnd::Stopped;
                break;
            }
            let connected = self
                .transport
                .wait_for_clients(required, policy.wait_for_clients);
            if connected < required {
                return Err(Error::NotEnoughClients {
                    available: connected,
                    required,
                }
                .into());
            }
            let record = match self.run_round() {
                Ok(record) => record.clone(),
                // A client left between the wait and the round's start:
                // nothing was recorded, wait again.
                Err(Error::NotEnoughClients { .. }) if !policy.wait_for_clients.is_zero() => {
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if record.outcome.is_completed() {
                report.completed += 1;
                in_a_row = 0;
            } else {
                report.failed += 1;
                in_a_row += 1;
            }
            after_round(self, &record)?;
            if let Some(max) = policy.max_failed_in_a_row
                && in_a_row >= max
            {
                warn!(in_a_row, "too many failed rounds in a row; the run ends");
                report.end = RunEnd::TooManyFailedRounds { in_a_row };
                break;
            }
            if !policy.pause_between_rounds.is_zero()
                && self.next_round <= self.config.rounds
                && !policy.stop.is_stopped()
            {
                std::thread::sleep(policy.pause_between_rounds);
            }
        }
        if self.config.cross_site_evaluation && report.end == RunEnd::Completed {
            report.cross_site = Some(self.cross_site_evaluation()?);
        }
        Ok(report)
    }

    /// Evaluates the global model and every kept local model (see
    /// [`ServerConfig::cross_site_evaluation`]) on every connected site's
    /// held-out data, each model one evaluate exchange with every site (up
    /// to `round_timeout` each). A site that fails, or answers with a
    /// non-finite loss or no examples, leaves its cell empty with the
    /// reason in [`CrossSiteEvaluation::failures`]. Errors only when the
    /// run seals tensors (the server holds no plain head).
    pub fn cross_site_evaluation(&mut self) -> Result<CrossSiteEvaluation> {
        if self.sealing.is_some() {
            return Err(Error::Unsupported(
                "cross-site evaluation of a run with sealed tensors: the server holds no plain head"
                    .into(),
            ));
        }
        let round = self.next_round.saturating_sub(1);
        let mut sites = self.transport.clients();
        sites.sort();
        sites.dedup();
        let mut models = vec![(CrossSiteModel::Global, self.global.clone())];
        models.extend(self.local_models.iter().map(|(site, (r, p))| {
            (
                CrossSiteModel::Local {
                    site: site.clone(),
                    round: *r,
                },
                p.clone(),
            )
        }));
        let mut cells = Vec::with_capacity(models.len());
        let mut failures = Vec::new();
        let deadline = self.round_deadline();
        for (m, (_, params)) in models.iter().enumerate() {
            let (replies, failed) = dispatch(&mut self.transport, deadline, &sites, |_| {
                Task::Evaluate(EvaluateIns {
                    round,
                    parameters: params.clone(),
                    sealed: None,
                })
            });
            let mut row = vec![None; sites.len()];
            for (site, reply) in replies {
                let Some(k) = sites.iter().position(|s| s == &site) else {
                    continue;
                };
                match reply {
                    Reply::Evaluate(e) if e.loss.is_finite() && e.num_examples > 0 => {
                        row[k] = Some(e)
                    }
                    _ => failures.push(CrossSiteFailure {
                        model: m,
                        site,
                        reason: Failure::Rejected(Rejection::WrongReply),
                    }),
                }
            }
            failures.extend(failed.into_iter().map(|f| CrossSiteFailure {
                model: m,
                site: f.client,
                reason: f.reason,
            }));
            cells.push(row);
        }
        for f in &failures {
            warn!(site = %f.site, model = %models[f.model].0, reason = %f.reason, "cross-site evaluation failed");
        }
        Ok(CrossSiteEvaluation {
            round,
            models: models.into_iter().map(|(m, _)| m).collect(),
            sites,
            cells,
            failures,
        })
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

    /// Runs one round and returns its record; `record.outcome` says how it
    /// ended. A round with fewer valid updates than the quorum (in the fit
    /// exchange or in any later step of a multi-step strategy), or whose
    /// aggregation fails, is recorded with that outcome and the global model
    /// is unchanged; the next call runs the next round.
    ///
    /// Errors only when no round could be recorded: fewer connected clients
    /// than required ([`Error::NotEnoughClients`], nothing recorded), a
    /// resumed checkpoint that sealed tensors in a run that seals none
    /// ([`Error::InvalidConfig`]), or a checkpoint that cannot be written
    /// (the round is in the history).
    pub fn run_round(&mut self) -> Result<&RoundRecord> {
        let round = self.next_round;
        // A resumed run whose checkpoint sealed tensors holds zeros in
        // their place: going on without sealing would train from them.
        if self.sealing.is_none()
            && let Some(store) = &self.store
            && store.has_sealed(round)
        {
            return Err(Error::InvalidConfig(format!(
                "the checkpoint in {} holds sealed tensors: resume it with the same sealing (Server::with_sealing)",
                store.dir().display()
            )));
        }
        let started = Instant::now();
        let started_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);

        let mut available = self.transport.clients();
        available.sort();
        available.dedup();
        let quorum = self.config.min_fit_clients;
        let required = self.config.required_clients();
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
        let operator = self.exclusions.list();
        let withheld: Vec<Withheld> = available
            .iter()
            .filter_map(|c| {
                operator.get(c).map(|reason| Withheld {
                    client: c.clone(),
                    reason: reason.clone(),
                })
            })
            .collect();
        if !withheld.is_empty() {
            available.retain(|c| !operator.contains_key(c));
            info!(
                round,
                withheld = withheld.len(),
                "clients kept out by the operator"
            );
        }
        // With too few clients left after the exclusions the round cannot
        // reach its quorum: no task is sent (nobody trains, or spends
        // privacy budget, for nothing) and the round is recorded as failed.
        let sampled = if available.len() >= quorum {
            sample(
                &available,
                self.config.fraction_fit,
                quorum,
                mix(self.config.seed, round),
            )
        } else {
            warn!(
                round,
                left = available.len(),
                quorum,
                "too few clients left after exclusions; no task is sent"
            );
            Vec::new()
        };
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
        for w in &withheld {
            self.emit(ServerEvent::ClientWithheld {
                round,
                client: w.client.clone(),
                reason: w.reason.clone(),
            });
        }

        let global = self.global.clone();
        let sealed_global = self.sealing.as_ref().map(|s| s.global.clone());
        let extra = self.aggregator.fit_extra();
        // `with_sealing` refused a strategy that sent tensors then; one may
        // start sending them later, and sealed tensors cannot have them.
        if extra.is_some() && self.sealing.is_some() {
            return Err(Error::InvalidConfig(format!(
                "`{}` sends tensors with the fit request, which sealed tensors cannot have (they would travel in the clear)",
                self.aggregator.describe().name
            )));
        }
        let (train, seed) = (self.config.train_for(round), self.config.seed);
        let deadline = self.round_deadline();
        let (replies, mut failures) = dispatch(&mut self.transport, deadline, &sampled, |client| {
            let mut config = train.clone();
            config.seed = client_seed(seed, round, client);
            Task::Fit(FitIns {
                round,
                parameters: global.clone(),
                config,
                sealed: sealed_global.clone(),
                extra: extra.clone(),
            })
        });
        // What updates carry in the clear: the whole model, or the body.
        let reference = match &self.sealing {
            // The body selection was made for this layout (checked in
            // `with_sealing`), so this cannot fail.
            Some(s) => Arc::new(s.body.subset(&global)?),
            None => global.clone(),
        };
        let mut accepted: Vec<(ClientUpdate, f64)> = Vec::new();
        // Updates are kept by value and handed to the aggregator as one slice:
        // for a 7M-parameter model each one is 28 MB, so nothing here copies them.
        for (client, reply) in replies {
            let checked = match reply {
                Reply::Fit(update) => validate(&reference, round, &client, update)
                    .and_then(|v| validate_extra(extra.as_deref(), v))
                    .and_then(|v| self.validate_sealed(v)),
                _ => Err(Rejection::WrongReply),
            };
            match checked {
                Ok(pair) => accepted.push(pair),
                Err(r) => failures.push(ClientFailure::new(client, Failure::Rejected(r))),
            }
        }
        accepted.sort_by(|a, b| a.0.client.cmp(&b.0.client));
        let (mut updates, mut norms): (Vec<ClientUpdate>, Vec<f64>) = accepted.into_iter().unzip();
        failures.sort_by(|a, b| a.client.cmp(&b.client));
        for (u, norm) in updates.iter().zip(&norms) {
            let event = ServerEvent::UpdateAccepted {
                round,
                client: u.client.clone(),
                num_examples: u.num_examples,
                update_norm: *norm,
            };
            self.emit(event);
        }
        self.report_failures(round, &failures);

        let info = self.aggregator.describe();
        let mut record = RoundRecord {
            round,
            outcome: RoundOutcome::Completed,
            aggregator: info.name.clone(),
            sampled,
            quorum,
            excluded,
            withheld,
            accepted: Vec::new(),
            failures,
            train_metrics: Metrics::new(),
            aggregate_metrics: Metrics::new(),
            update_norm: None,
            evaluation: None,
            federated_evaluation: None,
            started_at_ms,
            duration_ms: 0,
        };

        let mut state_before = None;
        let spare_global = self.spare_global.take();
        let aggregated = if updates.len() < quorum {
            Err(RoundOutcome::QuorumNotReached)
        } else {
            let clients = updates.iter().map(|u| u.client.clone()).collect();
            let deadline = self.round_deadline();
            let mut steps = RoundSteps::new(&mut self.transport, round, deadline, quorum, clients)
                .with_spare(self.spare.take());
            // A strategy's state moves only with a round that completes.
            state_before = self.aggregator.saved_state();
            let result = self.aggregator.aggregate_round(&updates, &mut steps);
            let (still_in, step_failures) = steps.finish();
            self.report_failures(round, &step_failures);
            record.failures.extend(step_failures);
            // Clients that left in a step do not count.
            let mut kept = updates.iter().map(|u| still_in.contains(&u.client));
            norms.retain(|_| kept.next().unwrap_or(false));
            updates.retain(|u| still_in.contains(&u.client));
            if updates.len() < quorum {
                Err(RoundOutcome::QuorumNotReached)
            } else {
                result
                    .and_then(|agg| self.check_aggregate(agg, &updates, &reference))
                    .and_then(|mut agg| {
                        let sealed = self.aggregate_sealed(&updates, &agg)?;
                        let norm = agg.parameters.l2_norm();
                        // `apply` turns the aggregate into the optimizer's
                        // direction in place.
                        let (next, opt) = self.apply(&mut agg.parameters, spare_global)?;
                        Ok((agg, norm, sealed, (next, opt)))
                    })
                    .map_err(|e| {
                        RoundOutcome::AggregationFailed(AggregationFailure::from_error(
                            info.name.clone(),
                            &e,
                        ))
                    })
            }
        };
        record.train_metrics =
            weighted_metrics(updates.iter().map(|u| (u.num_examples, &u.metrics)));

        let mut flagged = Vec::new();
        match aggregated {
            Ok((mut agg, norm, sealed, (next, opt))) => {
                self.opt_state = opt;
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
                        upload_bytes: u.upload_bytes(),
                    })
                    .collect();
                flagged = self.track_trust(&mut record.accepted);
                if self.config.cross_site_evaluation {
                    for u in &updates {
                        let mut local = (*self.global).clone();
                        local.axpy(1.0, &u.values)?;
                        self.local_models
                            .insert(u.client.clone(), (round, Arc::new(local)));
                    }
                }
                record.update_norm = Some(norm);
                record.aggregate_metrics = agg.metrics;
                // The old global and the aggregate are next round's
                // buffers: a 7M-value model then costs no fresh pages per
                // round (the old global only if nothing else holds it).
                self.spare = Some(agg.parameters);
                // This round's own handles on the old global go first, or
                // it is never the only holder.
                drop(reference);
                drop(global);
                self.spare_global =
                    Arc::try_unwrap(std::mem::replace(&mut self.global, Arc::new(next))).ok();
                if let Some(eval) = self.evaluator.as_mut() {
                    let sealed = self.sealing.as_ref().map(|s| &*s.global);
                    match eval(&self.global, sealed) {
                        Ok(e) => record.evaluation = Some(e),
                        Err(e) => warn!(round, error = %e, "server-side evaluation failed"),
                    }
                }
                record.federated_evaluation = self.federated_evaluation(round, &available);
            }
            Err(outcome) => {
                record.outcome = outcome;
                if let Some(state) = state_before {
                    self.aggregator.restore_state(state)?;
                }
            }
        }

        record.duration_ms = started.elapsed().as_millis() as u64;
        self.history.push(record);
        self.next_round += 1;
        self.checkpoint(round)?;
        let record = self.history.last().expect("just pushed").clone();
        if record.outcome.is_completed() {
            for (client, trust_ema) in flagged {
                warn!(round, client = %client, trust_ema, "client flagged as suspicious");
                self.emit(ServerEvent::ClientFlagged {
                    round,
                    client,
                    trust_ema,
                });
            }
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
        } else {
            warn!(round, outcome = %record.outcome, failures = record.failures.len(), "round failed; model unchanged");
            self.emit(ServerEvent::RoundFailed {
                record: Box::new(record),
            });
        }
        Ok(self.history.last().expect("just pushed"))
    }

    /// The next global model: the current one plus the server's step
    /// along what its optimizer makes of the aggregate (on the body only
    /// when the run seals tensors), and the optimizer's next state (kept
    /// only if the round completes).
    ///
    /// `direction` holds the aggregate and is left holding the optimizer's
    /// direction; `buffer` (the previous global, if the server has it) is
    /// overwritten with the current global and becomes the next one.
    fn apply(
        &self,
        direction: &mut Parameters,
        buffer: Option<Parameters>,
    ) -> Result<(Parameters, OptState)> {
        let lr = self.config.server_learning_rate;
        let mut state = self.opt_state.clone();
        self.config
            .server_opt
            .direction(&mut state, direction.as_mut_slice())?;
        if let Some(nf) = direction.first_non_finite() {
            return Err(Error::AggregateNotFinite {
                aggregator: format!("server optimizer {}", self.config.server_opt.name()),
                tensor: nf.tensor,
            });
        }
        let mut next = match buffer {
            Some(mut b) if b.ensure_compatible(&self.global).is_ok() => {
                b.as_mut_slice().copy_from_slice(self.global.as_slice());
                b
            }
            _ => (*self.global).clone(),
        };
        let direction = &*direction;
        match &self.sealing {
            None => next.axpy(lr, direction)?,
            Some(s) => {
                let layout = next.layout().clone();
                s.body
                    .axpy(&layout, lr, direction.as_slice(), next.as_mut_slice())?
            }
        }
        Ok((next, state))
    }

    fn report_failures(&mut self, round: u64, failures: &[ClientFailure]) {
        for f in failures {
            warn!(round, client = %f.client, step = f.step, reason = %f.reason, "update not counted");
            self.emit(ServerEvent::UpdateRejected {
                round,
                client: f.client.clone(),
                reason: f.reason.clone(),
            });
        }
    }

    /// Checks a strategy's aggregate against the updates still in the round
    /// and puts its per-client entries in the updates' order.
    fn check_aggregate(
        &self,
        mut agg: Aggregate,
        updates: &[ClientUpdate],
        reference: &Parameters,
    ) -> Result<Aggregate> {
        reference.ensure_compatible(&agg.parameters)?;
        if let Some(nf) = agg.parameters.first_non_finite() {
            return Err(Error::AggregateNotFinite {
                aggregator: self.aggregator.describe().name,
                tensor: nf.tensor,
            });
        }
        if agg.clients.len() != updates.len() {
            return Err(Error::DimensionMismatch {
                expected: updates.len(),
                got: agg.clients.len(),
            });
        }
        let mut ordered = Vec::with_capacity(updates.len());
        for u in updates {
            let i = agg
                .clients
                .iter()
                .position(|d| d.client == u.client)
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "the aggregate reports no weight for `{}`, which is in the round",
                        u.client
                    ))
                })?;
            ordered.push(agg.clients.swap_remove(i));
        }
        agg.clients = ordered;
        Ok(agg)
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
                    .check(&s.global, part)
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
                    self.aggregator.describe().name
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
        let deadline = self.round_deadline();
        let (replies, failures) = dispatch(&mut self.transport, deadline, &chosen, |_| {
            Task::Evaluate(EvaluateIns {
                round,
                parameters: global.clone(),
                sealed: sealed.clone(),
            })
        });
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
        let strategy_state = self.aggregator.saved_state();
        let opt_kind = self.config.server_opt.kind();
        let name = self.aggregator.describe().name;
        let path = store.save(Snapshot {
            global: &self.global,
            sealed: self.sealing.as_ref().map(|s| s.global.bytes()),
            optimizer: self
                .config
                .server_opt
                .is_stateful()
                .then_some((opt_kind.as_str(), &self.opt_state)),
            strategy: strategy_state.as_deref().map(|s| (name.as_str(), s)),
            seed: self.config.seed,
            next_round: self.next_round,
            history: &self.history,
        })?;
        self.emit(ServerEvent::CheckpointWritten { round, path });
        Ok(())
    }
}
