//! Jobs: what a run is and its lifecycle. A job is a simulated run (X-rays
//! with DenseNet-121, or MNIST with the small CNN) with its settings, or
//! the rounds of a deployed server. Jobs started from the web wait in a
//! queue and run one at a time (a 2-core machine trains one model well):
//!
//! ```text
//! queued --start--> running --stop--> stopping --round ends--> stopped --resume--> queued
//!                      |                                           ^
//!                      +--all rounds--> finished      error --> failed --resume--> queued
//! ```
//!
//! A stopped or failed job resumes from its last checkpoint (and its
//! hospitals' DP ledgers keep counting); a job that is not training can be
//! deleted with everything recorded for it and its folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use utoipa::ToSchema;

use crate::infer::Predictor;
use crate::live::Shared;
use crate::mnist::MnistConfig;
use crate::recipe::{AggregatorChoice, DpMode, Encrypt, HeKeys, ServerOptimizerChoice};
use crate::sim::SimConfig;
use crate::store::{JobKind, JobRow, JobStatus, NewJob, Store};

/// The data a job trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DataChoice {
    /// Synthetic chest X-rays written into the job's folder (the demo's).
    SyntheticXrays,
    /// The ChestX-ray14 folder the server was started with
    /// (`--chestxray14-dir`).
    Chestxray14,
    /// MNIST from the folder the server was started with (`--mnist-dir`).
    Mnist,
}

/// The model a job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelChoice {
    /// DenseNet-121 (X-rays), at `image_size`.
    Densenet121,
    /// The compact CNN (MNIST).
    SmallCnn,
}

/// What an administrator asks for on the form.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// A name for the runs page (default: from the settings), at most 80
    /// characters, no control characters.
    #[serde(default)]
    #[schema(max_length = 80)]
    pub name: Option<String>,
    /// The data.
    pub data: DataChoice,
    /// The model (default: DenseNet-121 for X-rays, the small CNN for MNIST).
    #[serde(default)]
    pub model: Option<ModelChoice>,
    /// DenseNet-121's input side, 32 to 224 (default 64; X-rays only).
    #[serde(default, deserialize_with = "whole_opt")]
    #[schema(minimum = 32, maximum = 224)]
    pub image_size: Option<u32>,
    /// How the server combines the updates (default: geometric median).
    #[serde(default)]
    pub aggregator: Option<AggregatorChoice>,
    /// Rounds, 1 to 100.
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 1, maximum = 100)]
    pub rounds: u64,
    /// Hospitals, 1 to 10.
    #[serde(deserialize_with = "whole")]
    #[schema(minimum = 1, maximum = 10)]
    pub hospitals: usize,
    /// DP-SGD at every hospital (default: on).
    #[serde(default = "yes")]
    pub dp: bool,
    /// Each hospital's epsilon for the whole job when DP is on (at delta
    /// 1e-5), above 0 and at most 100 (default 8).
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 100.0)]
    pub epsilon: Option<f64>,
    /// What leaves a hospital encrypted (X-rays only; default: the head).
    #[serde(default)]
    pub encrypt: Option<Encrypt>,
    /// Whose keys encrypt the head (X-rays only; default `single`: one key
    /// pair at every hospital). `multiparty`: a collective key from a
    /// share of each hospital, so that no hospital, nor the server, can
    /// decrypt another's upload; each round then needs every hospital's
    /// key switch, or `threshold` of them.
    #[serde(default)]
    pub keys: Option<HeKeys>,
    /// With `keys: multiparty`: how many hospitals complete a key switch,
    /// 2 to `hospitals` (default: all of them).
    #[serde(default, deserialize_with = "whole_opt")]
    #[schema(minimum = 2, maximum = 10)]
    pub threshold: Option<usize>,
    /// This hospital (1-based, at most `hospitals`) sends sign-flipped,
    /// scaled updates.
    #[serde(default, deserialize_with = "whole_opt")]
    #[schema(minimum = 1, maximum = 10)]
    pub byzantine: Option<usize>,
    /// This hospital (1-based, at most `hospitals`, not the Byzantine
    /// one) drops out of every round.
    #[serde(default, deserialize_with = "whole_opt")]
    #[schema(minimum = 1, maximum = 10)]
    pub drop_hospital: Option<usize>,
    /// Seed (default 42).
    #[serde(default, deserialize_with = "whole_opt")]
    pub seed: Option<u64>,
    /// What the server makes of the aggregate (MNIST only; default sgd,
    /// the aggregate as it is).
    #[serde(default)]
    pub server_optimizer: Option<ServerOptimizerChoice>,
    /// FedProx's mu, 0 to 10 (MNIST only; default 0: off).
    #[serde(default)]
    #[schema(minimum = 0.0, maximum = 10.0)]
    pub proximal_mu: Option<f64>,
    /// Evaluate the global model and every hospital's local model on every
    /// hospital's held-out tenth at the end (MNIST only; default off).
    #[serde(default)]
    pub cross_site: Option<bool>,
    /// How the hospitals encode their updates for the upload (MNIST only):
    /// `f32` (the default: as they are), `f16`, `bf16`, `int8` or `top-k:F`
    /// (the fraction F of each tensor's values of largest magnitude); the
    /// lossy ones keep what they drop for the next round.
    #[serde(default)]
    #[schema(example = "int8")]
    pub upload: Option<String>,
}

fn yes() -> bool {
    true
}

/// Whole numbers as JSON writes them: `8` or `8.0` (JSON Schema's
/// `integer` allows both; serde's integers only the first).
struct WholeVisitor;

impl serde::de::Visitor<'_> for WholeVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a whole number of at least 0")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<u64, E> {
        Ok(v)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<u64, E> {
        u64::try_from(v).map_err(|_| E::custom(format!("{v} is below 0")))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<u64, E> {
        if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
            Ok(v as u64)
        } else {
            Err(E::custom(format!(
                "{v} is not a whole number of at least 0"
            )))
        }
    }
}

fn whole<'de, D, T>(d: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    let v = d.deserialize_any(WholeVisitor)?;
    T::try_from(v).map_err(|_| serde::de::Error::custom(format!("{v} is too large")))
}

fn whole_opt<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    #[derive(Deserialize)]
    struct Wrap(#[serde(deserialize_with = "whole")] u64);
    match Option::<Wrap>::deserialize(d)? {
        None => Ok(None),
        Some(Wrap(v)) => T::try_from(v)
            .map(Some)
            .map_err(|_| serde::de::Error::custom(format!("{v} is too large"))),
    }
}

/// A job's settings, as stored: what its runner needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobSettings {
    /// A simulated X-ray federation (the command line's settings).
    Xray(Box<SimConfig>),
    /// A simulated MNIST federation.
    Mnist(MnistConfig),
}

/// Where the queue finds data and keeps job folders.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Job `N` keeps its files in `<root>/jobs/N`.
    pub root: PathBuf,
    /// The MNIST IDX files, when this server has them.
    pub mnist_dir: Option<PathBuf>,
    /// A ChestX-ray14 folder, when this server has one.
    pub chestxray14_dir: Option<PathBuf>,
}

/// What the form can offer on this server.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobChoices {
    /// The data this server has.
    pub data: Vec<DataChoice>,
    /// The aggregators.
    pub aggregators: Vec<AggregatorChoice>,
    /// The server optimizers (MNIST jobs).
    pub server_optimizers: Vec<ServerOptimizerChoice>,
    /// Upload encodings the form offers (MNIST jobs; any `top-k:F` with F
    /// in (0, 1] is accepted).
    pub uploads: Vec<String>,
    /// Whether jobs can be started here (not on a deployed server).
    pub enabled: bool,
}

/// A refused request, with the reason for the form.
#[derive(Debug)]
pub struct Invalid(pub String);

fn invalid<T>(m: impl Into<String>) -> std::result::Result<T, Invalid> {
    Err(Invalid(m.into()))
}

impl JobOptions {
    /// What the form can offer.
    pub fn choices(&self) -> JobChoices {
        let mut data = vec![DataChoice::SyntheticXrays];
        if self.chestxray14_dir.is_some() {
            data.push(DataChoice::Chestxray14);
        }
        if self.mnist_dir.is_some() {
            data.push(DataChoice::Mnist);
        }
        JobChoices {
            data,
            aggregators: vec![
                AggregatorChoice::GeometricMedian,
                AggregatorChoice::Fedavg,
                AggregatorChoice::Median,
                AggregatorChoice::TrimmedMean,
                AggregatorChoice::Krum,
            ],
            server_optimizers: vec![
                ServerOptimizerChoice::Sgd,
                ServerOptimizerChoice::Momentum,
                ServerOptimizerChoice::Adam,
                ServerOptimizerChoice::Yogi,
            ],
            uploads: ["f32", "f16", "bf16", "int8", "top-k:0.1", "top-k:0.01"]
                .map(String::from)
                .to_vec(),
            enabled: true,
        }
    }

    /// Checks a request and turns it into settings and a name.
    pub fn settings(
        &self,
        r: &JobRequest,
    ) -> std::result::Result<(JobKind, JobSettings, String), Invalid> {
        if !(1..=100).contains(&r.rounds) {
            return invalid("rounds must be between 1 and 100");
        }
        if !(1..=10).contains(&r.hospitals) {
            return invalid("hospitals must be between 1 and 10");
        }
        for (what, h) in [
            ("byzantine", r.byzantine),
            ("drop_hospital", r.drop_hospital),
        ] {
            if let Some(h) = h
                && !(1..=r.hospitals).contains(&h)
            {
                return invalid(format!(
                    "{what} must name one of the hospitals, 1 to {}",
                    r.hospitals
                ));
            }
        }
        if r.byzantine.is_some() && r.byzantine == r.drop_hospital {
            return invalid("the Byzantine hospital and the dropping one must differ");
        }
        let epsilon = if r.dp {
            let e = r.epsilon.unwrap_or(8.0);
            if !(e > 0.0 && e <= 100.0) {
                return invalid("epsilon must be above 0 and at most 100");
            }
            Some(e)
        } else {
            None
        };
        let aggregator = r.aggregator.unwrap_or(AggregatorChoice::GeometricMedian);
        if let Err(e) = aggregator.build(r.hospitals) {
            return invalid(format!(
                "{aggregator:?} cannot run with {} hospitals: {e:#}",
                r.hospitals
            ));
        }
        let seed = r.seed.unwrap_or(42);
        let name = r.name.as_deref().map(str::trim).unwrap_or_default();
        if name.chars().count() > 80 || name.chars().any(char::is_control) {
            return invalid("the name must be at most 80 characters, without control characters");
        }
        let dp_label = epsilon.map_or("no DP".to_owned(), |e| format!("epsilon {e}"));
        let mu = r.proximal_mu.unwrap_or(0.0);
        if !(0.0..=10.0).contains(&mu) {
            return invalid("proximal_mu must be between 0 and 10");
        }
        let upload: fedcore::Encoding = match r.upload.as_deref() {
            None => fedcore::Encoding::F32,
            Some(u) => match u.parse() {
                Ok(e) => e,
                Err(e) => return invalid(format!("upload: {e}")),
            },
        };
        match r.data {
            DataChoice::Mnist => {
                if r.model.is_some_and(|m| m != ModelChoice::SmallCnn) {
                    return invalid("MNIST trains the small CNN");
                }
                if r.encrypt.is_some_and(|e| e != Encrypt::None)
                    || r.keys.is_some_and(|k| k != HeKeys::Single)
                    || r.threshold.is_some()
                {
                    return invalid("encryption is offered for the X-ray model only");
                }
                if r.image_size.is_some() {
                    return invalid("MNIST images are 28 x 28; leave image_size out");
                }
                if self.mnist_dir.is_none() {
                    return invalid(
                        "this server has no MNIST (start it with --mnist-dir pointing at the IDX files)",
                    );
                }
                let cfg = MnistConfig {
                    hospitals: r.hospitals,
                    rounds: r.rounds,
                    aggregator,
                    epsilon,
                    train_images: 60_000,
                    test_images: 10_000,
                    byzantine: r.byzantine,
                    drop_hospital: r.drop_hospital,
                    seed,
                    server_optimizer: r.server_optimizer.unwrap_or_default(),
                    proximal_mu: mu,
                    cross_site: r.cross_site.unwrap_or(false),
                    upload,
                };
                let name = if name.is_empty() {
                    format!("MNIST, {} hospitals, {dp_label}", r.hospitals)
                } else {
                    name.to_owned()
                };
                Ok((JobKind::Mnist, JobSettings::Mnist(cfg), name))
            }
            DataChoice::SyntheticXrays | DataChoice::Chestxray14 => {
                if r.model.is_some_and(|m| m != ModelChoice::Densenet121) {
                    return invalid("X-rays train DenseNet-121");
                }
                if r.server_optimizer
                    .is_some_and(|o| o != ServerOptimizerChoice::Sgd)
                    || mu > 0.0
                    || r.cross_site == Some(true)
                    || !upload.is_lossless()
                {
                    return invalid(
                        "server optimizers, FedProx, cross-site evaluation and compressed uploads are offered for MNIST jobs; \
                         X-ray runs train with the recipe's settings (and cross-site evaluation cannot \
                         score an encrypted head)",
                    );
                }
                let size = r.image_size.unwrap_or(64);
                if !(32..=224).contains(&size) {
                    return invalid("image_size must be between 32 and 224");
                }
                let encrypt = r.encrypt.unwrap_or(Encrypt::Head);
                if encrypt == Encrypt::All
                    && !matches!(
                        aggregator,
                        AggregatorChoice::GeometricMedian | AggregatorChoice::Fedavg
                    )
                {
                    return invalid(
                        "encrypting whole updates needs the geometric median or fedavg",
                    );
                }
                let keys = r.keys.unwrap_or_default();
                if keys == HeKeys::Multiparty {
                    if encrypt != Encrypt::Head {
                        return invalid(
                            "multiparty keys seal the head here (encrypt: head); whole updates under multiparty keys run from the command line (hospital simulate --keys multiparty --encrypt all): three hospitals in one process need about 18 GB",
                        );
                    }
                    if r.threshold.is_none() && r.drop_hospital.is_some() {
                        return invalid(
                            "multiparty keys without a threshold need every hospital in every round; set threshold to run with a dropping hospital",
                        );
                    }
                }
                match r.threshold {
                    Some(_) if keys != HeKeys::Multiparty => {
                        return invalid("threshold applies to multiparty keys");
                    }
                    Some(t) if !(2..=r.hospitals).contains(&t) => {
                        return invalid(format!(
                            "threshold must be between 2 and the {} hospitals",
                            r.hospitals
                        ));
                    }
                    Some(t) if r.drop_hospital.is_some() && t >= r.hospitals => {
                        return invalid(format!(
                            "with a dropping hospital only {} can answer the key switch: lower the threshold",
                            r.hospitals - 1
                        ));
                    }
                    _ => {}
                }
                let data_dir = match r.data {
                    DataChoice::Chestxray14 => match &self.chestxray14_dir {
                        Some(d) => Some(d.clone()),
                        None => {
                            return invalid(
                                "this server has no ChestX-ray14 folder (start it with --chestxray14-dir)",
                            );
                        }
                    },
                    _ => None,
                };
                let mut cfg = SimConfig::defaults();
                cfg.clients = r.hospitals;
                cfg.rounds = r.rounds;
                cfg.aggregator = aggregator;
                cfg.image_size = size;
                cfg.encrypt = encrypt;
                cfg.keys = keys;
                cfg.threshold = r.threshold;
                cfg.dp.mode = if r.dp { DpMode::Sample } else { DpMode::Off };
                cfg.dp.epsilon = epsilon.unwrap_or(cfg.dp.epsilon);
                cfg.byzantine = r.byzantine;
                cfg.drop_client = r.drop_hospital;
                cfg.seed = seed;
                cfg.data_dir = data_dir;
                let name = if name.is_empty() {
                    format!(
                        "X-rays {size} px, {} hospitals, {aggregator:?}, {dp_label}",
                        r.hospitals
                    )
                } else {
                    name.to_owned()
                };
                Ok((JobKind::Xray, JobSettings::Xray(Box::new(cfg)), name))
            }
        }
    }
}

/// Why a job could not be created, stopped, resumed or deleted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The request's settings do not hold (the message says why).
    Invalid(String),
    /// No such job.
    NotFound,
    /// Not in a state that allows it, or the queue is full (the message
    /// says why).
    Conflict(String),
}

/// Runs that may wait in the queue at once: more are refused until one
/// starts, is stopped or deleted (each queued run is a folder on disk
/// and, once it starts, hours of the machine).
pub const MAX_QUEUED: usize = 10;

/// The queue: runs one job at a time on a blocking thread, the oldest
/// queued first.
#[derive(Debug)]
pub struct JobQueue {
    store: Store,
    shared: Arc<Shared>,
    predictor: Arc<Predictor>,
    options: JobOptions,
    wake: Notify,
    closing: AtomicBool,
    accepting: AtomicBool,
}

impl JobQueue {
    /// A queue over `store` that tells the dashboard through `shared` and
    /// gives X-ray models to `predictor`.
    pub fn new(
        store: Store,
        shared: Arc<Shared>,
        predictor: Arc<Predictor>,
        options: JobOptions,
    ) -> Self {
        Self {
            store,
            shared,
            predictor,
            options,
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            accepting: AtomicBool::new(true),
        }
    }

    /// What the form can offer here (nothing when this process takes no
    /// more runs).
    pub fn choices(&self) -> JobChoices {
        let mut c = self.options.choices();
        c.enabled = self.accepts();
        c
    }

    /// Whether this process runs jobs queued now: not when it exits after
    /// its command-line run, nor once it shuts down.
    pub fn accepts(&self) -> bool {
        self.accepting.load(Ordering::SeqCst) && !self.closing.load(Ordering::SeqCst)
    }

    /// This process takes no runs from the page (`--exit-when-done`).
    pub fn refuse_new_jobs(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    /// Queues a job for `user`.
    pub async fn submit(
        &self,
        request: &JobRequest,
        user: i64,
    ) -> Result<std::result::Result<JobRow, Refusal>> {
        if !self.accepts() {
            return Ok(Err(Refusal::Conflict(
                "this server runs no more jobs (it exits when its own run ends, or is shutting down)"
                    .into(),
            )));
        }
        let (kind, settings, name) = match self.options.settings(request) {
            Ok(s) => s,
            Err(e) => return Ok(Err(Refusal::Invalid(e.0))),
        };
        let waiting = self
            .store
            .jobs()
            .await?
            .iter()
            .filter(|j| j.status == JobStatus::Queued)
            .count();
        if waiting >= MAX_QUEUED {
            return Ok(Err(Refusal::Conflict(format!(
                "{waiting} runs are waiting already; stop or delete one first"
            ))));
        }
        let id = self
            .store
            .create_job(&NewJob {
                kind,
                name: &name,
                settings: &serde_json::to_value(&settings)?,
                created_by: Some(user),
                run_dir: None,
                status: JobStatus::Queued,
            })
            .await?;
        let dir = self.options.root.join("jobs").join(id.to_string());
        self.store
            .set_job_run_dir(id, &dir.to_string_lossy())
            .await?;
        self.wake.notify_one();
        let row = self.store.job(id).await?.context("the job just created")?;
        Ok(Ok(row))
    }

    /// Queues a stopped or failed job again, to continue from its
    /// checkpoint (or start over when it never wrote one).
    pub async fn resume(&self, id: i64) -> Result<std::result::Result<JobRow, Refusal>> {
        let Some(job) = self.store.job(id).await? else {
            return Ok(Err(Refusal::NotFound));
        };
        if !self.accepts() {
            return Ok(Err(Refusal::Conflict(
                "this server runs no more jobs (it exits when its own run ends, or is shutting down)"
                    .into(),
            )));
        }
        if job.kind == JobKind::Deployment {
            return Ok(Err(Refusal::Conflict(
                "a deployment resumes by restarting `hospital server`".into(),
            )));
        }
        let Some(dir) = job.run_dir.as_deref().map(PathBuf::from) else {
            return Ok(Err(Refusal::Conflict(
                "this run's folder was taken over by a later run in it; start a new run".into(),
            )));
        };
        let checkpoint = has_checkpoint(&dir);
        // Budget spent shows in the ledgers, or in what the hospitals
        // reported (should the folder be gone).
        if !checkpoint && (has_ledgers(&dir) || job.epsilon.is_some_and(|e| e > 0.0)) {
            return Ok(Err(Refusal::Conflict(
                "this run spent privacy budget before its first checkpoint: it cannot continue, \
                 and starting it over would start its hospitals' budgets over; start a new run"
                    .into(),
            )));
        }
        if !self.store.requeue_job(id, checkpoint).await? {
            return Ok(Err(Refusal::Conflict(format!(
                "the job is {}; only a stopped or failed job resumes",
                job.status.as_str()
            ))));
        }
        self.wake.notify_one();
        Ok(Ok(self.store.job(id).await?.context("the job")?))
    }

    /// Deletes a job that is not training, its records and its folder (a
    /// folder of a job started from the web; the command line's run
    /// folder stays).
    pub async fn delete(&self, id: i64) -> Result<std::result::Result<(), Refusal>> {
        let Some(job) = self.store.job(id).await? else {
            return Ok(Err(Refusal::NotFound));
        };
        if !self.store.delete_job(id).await? {
            return Ok(Err(Refusal::Conflict(format!(
                "the job is {}; stop it first",
                job.status.as_str()
            ))));
        }
        let jobs = self.options.root.join("jobs");
        if let Some(dir) = job.run_dir.map(PathBuf::from)
            && dir.parent() == Some(jobs.as_path())
            && dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            // The job is gone from the store; its folder stays, said in the log.
            tracing::warn!(job = id, folder = %dir.display(), error = %e, "the deleted job's folder was not removed");
        }
        Ok(Ok(()))
    }

    /// Runs queued jobs, one at a time, until [`JobQueue::close`].
    pub async fn work(self: Arc<Self>) -> Result<()> {
        loop {
            if self.closing.load(Ordering::SeqCst) {
                return Ok(());
            }
            // A store that fails now and then does not end the queue: the
            // error goes to the log and the queue tries again.
            match self.store.start_next_job().await {
                Ok(Some(job)) => {
                    let id = job.id;
                    if let Err(e) = self.run(job).await {
                        tracing::error!(job = id, error = %format!("{e:#}"), "the job's end was not recorded");
                    }
                }
                Ok(None) => self.wake.notified().await,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "the queue cannot read the store");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        }
    }

    /// Starts no more jobs (the one training goes on until it ends; raise
    /// the stop signal to end it after its round).
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Runs `job` (already marked running) to its end and records how it
    /// ended; an error is the store's (a job's own failure is its status).
    pub async fn run(&self, job: JobRow) -> Result<JobOutcome> {
        self.shared.stop.reset();
        // A shutdown that began while the job was taken from the queue:
        // it stops before its first round (and stays resumable).
        if self.closing.load(Ordering::SeqCst) {
            self.shared.stop.stop();
        }
        let id = job.id;
        let total = job
            .settings
            .get("rounds")
            .and_then(serde_json::Value::as_i64);
        let trained = self.train(&job).await;
        self.shared.set_progress(|p| p.job = None);
        // Stopped means rounds are left: a stop during the last round still
        // finished the job.
        // A store that cannot say counts as none recorded: the job's end
        // is still recorded below.
        let recorded = self.store.rounds(id).await.map_or(0, |r| r.len() as i64);
        let stopped = self.shared.stop.is_stopped() && total.is_none_or(|t| recorded < t);
        let (status, error, summary) = match trained {
            Err(e) => (JobStatus::Failed, Some(format!("{e:#}")), None),
            Ok(s) if stopped => (JobStatus::Stopped, None, s),
            Ok(s) => (JobStatus::Finished, None, s),
        };
        self.store
            .move_job(
                id,
                &[JobStatus::Running, JobStatus::Stopping],
                status,
                error.as_deref(),
            )
            .await?;
        match &error {
            None => println!("job {id} {}", status.as_str()),
            Some(e) => eprintln!("job {id} failed: {e}"),
        }
        Ok(JobOutcome {
            status,
            error,
            summary,
        })
    }

    async fn train(&self, job: &JobRow) -> Result<Option<crate::sim::Summary>> {
        let settings: JobSettings = serde_json::from_value(job.settings.clone())
            .with_context(|| format!("job {} has settings this version cannot read", job.id))?;
        let dir = PathBuf::from(
            job.run_dir
                .clone()
                .context("the job has no folder to run in")?,
        );
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let resume = job.resume && has_checkpoint(&dir);
        let (store, shared, predictor) = (
            self.store.clone(),
            self.shared.clone(),
            self.predictor.clone(),
        );
        let rt = tokio::runtime::Handle::current();
        let id = job.id;
        let mnist = self.options.mnist_dir.clone();
        println!(
            "job {id}: {} ({})",
            job.name,
            if resume { "resumed" } else { "started" }
        );
        tokio::task::spawn_blocking(move || -> Result<Option<crate::sim::Summary>> {
            match settings {
                JobSettings::Xray(mut cfg) => {
                    cfg.run_dir = Some(dir);
                    cfg.resume = resume;
                    crate::sim::run(&cfg, id, &store, &rt, &shared, &predictor).map(Some)
                }
                JobSettings::Mnist(cfg) => {
                    let data = mnist.context("this server has no MNIST (--mnist-dir)")?;
                    let r = crate::mnist::run(&cfg, &data, &dir, resume, id, &store, &rt, &shared);
                    shared.end(r.as_ref().map(|n| *n).map_err(|e| format!("{e:#}")));
                    r.map(|_| None)
                }
            }
        })
        .await
        .context("the job's thread")?
    }

    /// The job of a command-line run in `dir`: the newest X-ray job kept
    /// there (or a job recorded before jobs had folders) when `resume`,
    /// now running with `settings`; else a new one, running.
    pub async fn command_line_job(
        &self,
        settings: &SimConfig,
        dir: &Path,
        resume: bool,
    ) -> Result<JobRow> {
        let value = serde_json::to_value(JobSettings::Xray(Box::new(settings.clone())))?;
        let dir_s = dir.to_string_lossy().into_owned();
        if resume {
            let found = self.store.jobs().await?.into_iter().find(|j| {
                // Its own folder, or the rounds recorded before jobs had
                // folders (job 1 of a migrated store, with no settings); a
                // job whose folder a later run took over is neither.
                j.kind == JobKind::Xray
                    && (j.run_dir.as_deref() == Some(dir_s.as_str())
                        || (j.run_dir.is_none()
                            && j.settings.as_object().is_some_and(|m| m.is_empty())))
            });
            if let Some(j) = found {
                if j.status.is_active() {
                    bail!("job {} is training in another process", j.id);
                }
                self.store.set_job_settings(j.id, &value).await?;
                self.store.set_job_run_dir(j.id, &dir_s).await?;
                self.store
                    .move_job(
                        j.id,
                        &[
                            JobStatus::Queued,
                            JobStatus::Stopped,
                            JobStatus::Finished,
                            JobStatus::Failed,
                        ],
                        JobStatus::Running,
                        None,
                    )
                    .await?;
                return self.store.job(j.id).await?.context("the job");
            }
        }
        // A new run in the folder replaces what was there (its checkpoint
        // and ledgers start over): earlier jobs lose the folder, and with it
        // their resume.
        for j in self.store.jobs().await? {
            if j.run_dir.as_deref() == Some(dir_s.as_str()) {
                self.store.clear_job_run_dir(j.id).await?;
            }
        }
        let name = format!(
            "command line: X-rays {} px, {} hospitals, {:?}",
            settings.image_size, settings.clients, settings.aggregator
        );
        let id = self
            .store
            .create_job(&NewJob {
                kind: JobKind::Xray,
                name: &name,
                settings: &value,
                created_by: None,
                run_dir: Some(&dir_s),
                status: JobStatus::Running,
            })
            .await?;
        self.store.job(id).await?.context("the job just created")
    }
}

/// Stops a job: a running one (it must be the one training in this
/// process, whose stop signal `shared` holds) after its current round, a
/// queued one at once.
pub async fn stop_job(
    store: &Store,
    shared: &Shared,
    id: i64,
) -> Result<std::result::Result<JobRow, Refusal>> {
    // A queued job may start, and a running one end, while this looks: a
    // transition that did not happen is looked at again.
    for _ in 0..5 {
        let Some(job) = store.job(id).await? else {
            return Ok(Err(Refusal::NotFound));
        };
        let moved = match job.status {
            JobStatus::Queued => {
                store
                    .move_job(id, &[JobStatus::Queued], JobStatus::Stopped, None)
                    .await?
            }
            JobStatus::Running => {
                let training = shared.progress.read().ok().and_then(|p| p.job);
                if training != Some(id) {
                    // Taken from the queue a moment ago, or training in
                    // another process (which this one cannot stop).
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
                shared.stop.stop();
                store
                    .move_job(id, &[JobStatus::Running], JobStatus::Stopping, None)
                    .await?
            }
            JobStatus::Stopping => true,
            other => {
                return Ok(Err(Refusal::Conflict(format!(
                    "the job is {}; only a queued or running job stops",
                    other.as_str()
                ))));
            }
        };
        if moved {
            return Ok(Ok(store.job(id).await?.context("the job")?));
        }
    }
    Ok(Err(Refusal::Conflict(
        "this job is not training in this process".into(),
    )))
}

/// The (epsilon, delta) budget of each hospital of a job, when it runs
/// with DP and its settings say so.
pub fn budget_of(job: &JobRow) -> Option<(f64, f64)> {
    match serde_json::from_value::<JobSettings>(job.settings.clone()).ok()? {
        JobSettings::Xray(cfg) => cfg.dp.enabled().then_some((cfg.dp.epsilon, cfg.dp.delta)),
        JobSettings::Mnist(cfg) => cfg.epsilon.map(|e| (e, crate::mnist::DELTA)),
    }
}

/// How a job ended.
#[derive(Debug)]
pub struct JobOutcome {
    /// `Finished`, `Stopped` or `Failed`.
    pub status: JobStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// What an X-ray run reports.
    pub summary: Option<crate::sim::Summary>,
}

/// Whether `dir/sub` exists and holds anything.
fn holds(dir: &Path, sub: &str) -> bool {
    std::fs::read_dir(dir.join(sub))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Whether a run folder holds DP ledgers.
fn has_ledgers(dir: &Path) -> bool {
    holds(dir, "dp-ledgers")
}

/// Whether a run folder holds a checkpoint to resume from.
pub fn has_checkpoint(dir: &Path) -> bool {
    holds(dir, "checkpoints")
}

/// The job of a deployed server in `dir`: when it resumes a run, the
/// newest deployment job kept there (running again); else a new one.
pub async fn deployment_job(
    store: &Store,
    dir: &Path,
    settings: &serde_json::Value,
    resuming: bool,
) -> Result<i64> {
    store.recover_jobs().await?;
    let dir_s = dir.to_string_lossy().into_owned();
    if resuming
        && let Some(j) =
            store.jobs().await?.into_iter().find(|j| {
                j.kind == JobKind::Deployment && j.run_dir.as_deref() == Some(dir_s.as_str())
            })
    {
        store
            .move_job(
                j.id,
                &[JobStatus::Stopped, JobStatus::Finished, JobStatus::Failed],
                JobStatus::Running,
                None,
            )
            .await?;
        return Ok(j.id);
    }
    store
        .create_job(&NewJob {
            kind: JobKind::Deployment,
            name: "deployment",
            settings,
            created_by: None,
            run_dir: Some(&dir_s),
            status: JobStatus::Running,
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_numbers_come_as_json_writes_them_and_nothing_else_passes() {
        let r: JobRequest = serde_json::from_value(serde_json::json!({
            "data": "mnist", "rounds": 3.0, "hospitals": 2, "byzantine": 1.0, "seed": 18446744073709551615u64
        }))
        .unwrap();
        assert_eq!(
            (r.rounds, r.hospitals, r.byzantine, r.seed),
            (3, 2, Some(1), Some(u64::MAX))
        );
        for bad in [
            serde_json::json!({"data": "mnist", "rounds": 2.5, "hospitals": 2}),
            serde_json::json!({"data": "mnist", "rounds": -1, "hospitals": 2}),
            serde_json::json!({"data": "mnist", "rounds": 2, "hospitals": 1e30}),
            serde_json::json!({"data": "mnist", "rounds": "2", "hospitals": 2}),
            serde_json::json!({"data": "mnist", "rounds": 2, "hospitals": 2, "unknown": 1}),
        ] {
            assert!(
                serde_json::from_value::<JobRequest>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}
