//! The MNIST job: federated MNIST with sample-level DP, the system of
//! `examples/mnist-dp` as a job of the dashboard. Hospitals `hospital-1`,
//! ... each hold an equal IID share of MNIST's training images and train
//! the compact CNN of Papernot et al. (26,010 parameters, tanh) with
//! DP-SGD, their budgets kept in ledgers that a resumed job keeps
//! counting; the server aggregates with the chosen rule and evaluates the
//! global model on MNIST's test images after every round (accuracy).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use fedcore::data::mnist::MnistSplit;
use fedcore::data::{DataSplit, ImageDataset, Mnist};
use fedcore::memory::InMemoryTransport;
use fedcore::models::{Device, SmallCnn, TchModel};
use fedcore::{
    Model, ModelClient, Optimizer, RunPolicy, Server, ServerConfig, ServerEvent, Strategy,
    TrainConfig,
};
use fedcore_dp::Accounting;
use fedcore_robust::attacks::{Attack, Byzantine};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::dp::{DpSettings, PersistedDpSgd};
use crate::live::{LiveEvent, Progress, RunStatus, Shared, round_row, to_new_round};
use crate::recipe::{
    AggregatorChoice, DpArgs, DpMode, Encrypt, Rule, ServerOptimizerChoice, hospital,
};
use crate::sim::apply_suspensions;
use crate::store::Store;

/// The settings of an MNIST job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct MnistConfig {
    /// Hospitals.
    pub hospitals: usize,
    /// Rounds (one local epoch each).
    pub rounds: u64,
    /// How the server combines the updates.
    pub aggregator: AggregatorChoice,
    /// DP-SGD at each hospital with this epsilon for the whole job (at
    /// delta 1e-5, PLD accounting); `None`: no DP.
    pub epsilon: Option<f64>,
    /// Training images used (the first N of MNIST's, split equally).
    pub train_images: usize,
    /// Test images the global model is scored on.
    pub test_images: usize,
    /// This hospital (1-based) sends sign-flipped, scaled updates.
    pub byzantine: Option<usize>,
    /// This hospital (1-based) drops out of every round.
    pub drop_hospital: Option<usize>,
    /// Seed of the split, the sampling and the initial model.
    pub seed: u64,
    /// What the server makes of the aggregate (default: a plain step).
    #[serde(default)]
    pub server_optimizer: ServerOptimizerChoice,
    /// FedProx's mu: local training is pulled towards the round's global
    /// model by `mu / 2 * ||w - w_global||^2` (0: off, the default).
    #[serde(default)]
    pub proximal_mu: f64,
    /// At the end, the global model and every hospital's last local model
    /// are evaluated on every hospital's held-out tenth of its share (which
    /// it then does not train on); the matrix is kept with the job.
    #[serde(default)]
    pub cross_site: bool,
    /// How the hospitals encode their updates for the upload (default
    /// `f32`); the bytes each sent are on the round page.
    #[serde(default)]
    #[schema(value_type = String, example = "int8")]
    pub upload: fedcore::Encoding,
}

/// Each hospital's delta.
pub const DELTA: f64 = 1e-5;

impl MnistConfig {
    /// The DP flags of each hospital holding `images` images: Poisson
    /// batches of a tenth of them (16 to 512), SGD at 0.2 with momentum 0.9,
    /// per-sample clipping at 1, PLD accounting.
    pub fn dp_args(&self, images: usize) -> Option<DpArgs> {
        let epsilon = self.epsilon?;
        Some(DpArgs {
            mode: DpMode::Sample,
            epsilon,
            delta: DELTA,
            accounting: Accounting::Pld,
            clip: 1.0,
            dp_batch_size: (images / 10).clamp(16, 512),
            dp_epochs: 1,
            dp_lr: 0.2,
        })
    }
}

fn cnn(seed: u64) -> Result<TchModel<SmallCnn>> {
    Ok(TchModel::build(Device::Cpu, seed, |b| {
        SmallCnn::compact(b, 1, 28, 10)
    })?)
}

/// Runs an MNIST job of `job` on the IDX files in `data`, its checkpoints
/// and ledgers in `run_dir`; `resume`: continue from its checkpoint. Each
/// round is recorded under `job` and told to the dashboard; `shared`'s stop
/// signal ends the job after the current round. Returns the rounds done.
#[allow(clippy::too_many_arguments)]
pub fn run(
    cfg: &MnistConfig,
    data: &Path,
    run_dir: &Path,
    resume: bool,
    job: i64,
    store: &Store,
    rt: &tokio::runtime::Handle,
    shared: &Arc<Shared>,
) -> Result<u64> {
    if cfg.hospitals == 0 {
        bail!("an MNIST job needs at least one hospital");
    }
    shared.set_progress(|p| {
        *p = Progress {
            status: RunStatus::Preparing,
            current_round: 0,
            total_rounds: cfg.rounds,
            aggregator: cfg.aggregator.label(Encrypt::None),
            he: false,
            encrypt: Encrypt::None,
            keys: crate::recipe::HeKeys::Single,
            threshold: None,
            dp: cfg.epsilon.is_some(),
            dp_mode: Some(if cfg.epsilon.is_some() {
                DpMode::Sample
            } else {
                DpMode::Off
            }),
            budget: cfg.epsilon.map(|e| (e, DELTA)),
            error: None,
            job: Some(job),
        }
    });
    let train = Mnist::load(data, MnistSplit::Train)
        .with_context(|| format!("MNIST in {}", data.display()))?;
    let test = Mnist::load(data, MnistSplit::Test)
        .with_context(|| format!("MNIST in {}", data.display()))?;
    let total = cfg.train_images.min(train.len());
    if total < cfg.hospitals * 16 {
        bail!(
            "{total} training images are too few for {} hospitals",
            cfg.hospitals
        );
    }
    let test_n = cfg.test_images.min(test.len()).max(1);
    let train: Arc<dyn ImageDataset> = Arc::new(train);
    let test = DataSplit::subset(Arc::new(test), (0..test_n).collect())?;
    let mut order: Vec<usize> = (0..total).collect();
    order.shuffle(&mut StdRng::seed_from_u64(cfg.seed));
    let share = total / cfg.hospitals;
    // With cross-site evaluation each hospital holds out the last tenth of
    // its share: it trains on (and DP-SGD is calibrated for) the rest.
    let held_out = if cfg.cross_site { share / 10 } else { 0 };
    if cfg.cross_site && held_out == 0 {
        bail!("cross-site evaluation needs at least 10 images per hospital");
    }
    let trained = share - held_out;

    let ledgers = run_dir.join("dp-ledgers");
    if !resume && ledgers.exists() {
        std::fs::remove_dir_all(&ledgers)
            .with_context(|| format!("cannot clear {}", ledgers.display()))?;
    }
    let mut transport = InMemoryTransport::new();
    for k in 0..cfg.hospitals {
        let name = hospital(k);
        let indices = &order[k * share..(k + 1) * share];
        rt.block_on(store.upsert_client(&name, trained as i64, trained as i64))?;
        let data = DataSplit::subset(train.clone(), indices[..trained].to_vec())?;
        let held = (held_out > 0)
            .then(|| DataSplit::subset(train.clone(), indices[trained..].to_vec()))
            .transpose()?;
        let model = cnn(cfg.seed)?;
        let byzantine = cfg.byzantine == Some(k + 1);
        let attack = Attack::SignFlip { scale: 4.0 };
        let client: Box<dyn fedcore::Client> = match (cfg.dp_args(trained), byzantine) {
            (Some(dp), b) => {
                let settings = DpSettings {
                    dp,
                    rounds: cfg.rounds,
                };
                let path = ledgers.join(format!("{name}.json"));
                let model = PersistedDpSgd::open(&name, model, trained, settings, path)?;
                if b {
                    client(&name, Byzantine::new(model, attack)?, data, held)
                } else {
                    client(&name, model, data, held)
                }
            }
            (None, true) => client(&name, Byzantine::new(model, attack)?, data, held),
            (None, false) => client(&name, model, data, held),
        };
        transport.add_client(client)?;
    }

    let aggregator = Rule::Plain(cfg.aggregator.build(cfg.hospitals)?);
    let faulty = usize::from(cfg.drop_hospital.is_some());
    let quorum = cfg
        .hospitals
        .saturating_sub(faulty)
        .max(1)
        .max(aggregator.describe().min_updates);
    let (server_opt, server_learning_rate) = cfg.server_optimizer.build();
    let config = ServerConfig {
        rounds: cfg.rounds,
        min_fit_clients: quorum,
        min_available_clients: quorum,
        fraction_evaluate: 0.0,
        seed: cfg.seed,
        // Without DP the hospitals train with this; with DP each trains on
        // its own schedule (the guarantee depends on it).
        train: TrainConfig {
            epochs: 1,
            batch_size: 64,
            learning_rate: 0.05,
            optimizer: Optimizer::Sgd { momentum: 0.9 },
            seed: 0,
            proximal_mu: cfg.proximal_mu,
            upload: cfg.upload,
        },
        server_opt,
        server_learning_rate,
        cross_site_evaluation: cfg.cross_site,
        checkpoint_dir: Some(run_dir.join("checkpoints")),
        ..ServerConfig::default()
    };
    let initial = cnn(cfg.seed)?.parameters();
    let mut server = if resume {
        Server::resume(config, initial, transport, aggregator)?
    } else {
        Server::new(config, initial, transport, aggregator)?
    };
    let mut evaluator = cnn(cfg.seed)?;
    if !resume {
        evaluator.set_parameters(server.global())?;
        let e = evaluator.evaluate(&test)?;
        rt.block_on(store.record_initial(job, e.loss, &e.metrics))?;
    }
    server.set_evaluator(move |p| {
        evaluator.set_parameters(p)?;
        evaluator.evaluate(&test)
    });
    {
        let shared = shared.clone();
        let total = cfg.rounds;
        server.subscribe(move |event: &ServerEvent| shared.observe(event, total));
    }
    let clients = cfg.hospitals;
    let dropped = cfg.drop_hospital;
    apply_suspensions(&server, shared, clients, dropped)?;
    let policy = RunPolicy::default()
        .with_max_failed_in_a_row(Some(3))
        .with_stop(shared.stop.clone());
    let mut exhausted = BTreeSet::new();
    let report = server.run_with(&policy, |server, record| -> Result<()> {
        for f in &record.failures {
            if f.reason.is_budget_exhausted() {
                exhausted.insert(f.client.clone());
            }
        }
        let row = round_row(record);
        rt.block_on(store.record_round(job, &to_new_round(record, &row)))?;
        let accuracy = record
            .evaluation
            .as_ref()
            .and_then(|e| e.metrics.get("accuracy").copied());
        shared.send(LiveEvent::RoundFinished {
            round: record.round,
            total: cfg.rounds,
            loss: row.loss,
            auroc_macro: None,
            accuracy,
            outcome: row.outcome.clone(),
        });
        if !exhausted.is_empty() && clients.saturating_sub(faulty + exhausted.len()) < quorum {
            bail!("the privacy budgets of the hospitals are spent");
        }
        apply_suspensions(server, shared, clients, dropped)
    })?;
    if let Some(matrix) = &report.cross_site {
        rt.block_on(store.set_job_cross_site(job, &serde_json::to_value(matrix)?))?;
    }
    Ok(server.history().len() as u64)
}

/// A hospital of the job, with its held-out data for cross-site evaluation.
fn client<M: Model<Data = DataSplit> + 'static>(
    name: &str,
    model: M,
    data: DataSplit,
    held: Option<DataSplit>,
) -> Box<dyn fedcore::Client> {
    let c = ModelClient::new(name, model, data);
    match held {
        Some(held) => Box::new(c.with_test_data(held)),
        None => Box::new(c),
    }
}
