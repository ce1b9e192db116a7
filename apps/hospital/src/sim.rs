//! The simulation: N hospitals in one process over the in-memory transport,
//! each with its own patients, a DenseNet-121 (square activation), local DP
//! on the body and a CKKS sealer for the classifier head; the server runs
//! the fedcore round orchestrator with a robust aggregator on the body and
//! the trust-weighted encrypted sum on the head. With `--encrypt all` the
//! whole update is sealed and the server runs the encrypted geometric median
//! (`fedcore_he::EncryptedMedian`): the hospitals decrypt only the pairwise
//! distances of the updates for it.
//!
//! The held-out evaluation runs at an evaluation site that holds the HE key
//! (in a deployment: one of the hospitals), never at the aggregation server,
//! which only ever holds the sealed tensors encrypted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use fedcore::data::{
    ChestXray14, DataSplit, ImageDataset, PartitionConfig, SyntheticXrays, dirichlet_partition,
    write_synthetic_chestxray,
};
use fedcore::memory::{Fault, InMemoryTransport};
use fedcore::trust::TrustPolicy;
use fedcore::{
    ClientId, Evaluation, Model, ModelClient, Parameters, RunEnd, RunPolicy, Server, ServerConfig,
    ServerEvent, Strategy,
};
use fedcore_he::{CkksContext, CkksSealer, DistanceDecryptor, Secret};
use fedcore_robust::attacks::{Attack, Byzantine};

use crate::dp::{DpSettings, PersistedDp, PersistedDpSgd};
use crate::he_keys::SimKeys;
use crate::infer::Predictor;
use crate::live::{LiveEvent, Progress, RunStatus, Shared, round_row, to_new_round};
use crate::recipe::{
    AggregatorChoice, DpArgs, DpMode, Encrypt, HeKeys, PretrainArgs, Trainable, TrainingArgs,
    check_client_dp, densenet, dp_tensors, hospital, image_config,
};
use crate::store::Store;

/// Every choice of a simulation.
#[derive(Args, Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SimConfig {
    /// How the server combines the body updates.
    #[arg(long, value_enum, default_value = "geometric-median")]
    pub aggregator: AggregatorChoice,
    /// Number of hospitals.
    #[arg(long, default_value_t = 3)]
    pub clients: usize,
    /// Rounds in total (a resumed run counts the rounds already done).
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// Seed for data, partition, sampling and model initialization.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// A ChestX-ray14 folder (Data_Entry_2017*.csv, images/, train_val_list.txt,
    /// test_list.txt); default: a synthetic set written into the run folder.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Patients of the synthetic set (about 2 images each; 80 % split
    /// across the hospitals, 20 % held out). DP-SGD needs hundreds of
    /// images per hospital: its noise shrinks with the batch.
    #[arg(long, default_value_t = 1200)]
    pub patients: usize,
    /// Side of the images fed to DenseNet-121 (224 for real runs).
    #[arg(long, default_value_t = 64)]
    pub image_size: u32,
    /// Dirichlet concentration of the patient split (smaller: more skewed).
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f64,
    /// Differential privacy at each hospital.
    #[command(flatten)]
    pub dp: DpArgs,
    /// Public pretraining of the initial model.
    #[command(flatten)]
    pub pretrain: PretrainArgs,
    /// What the hospitals train (the rest stays as public pretraining left it).
    #[arg(long, value_enum, default_value_t = Trainable::default())]
    pub trainable: Trainable,
    /// Rounds each hospital's DP budget is spread over (default: --rounds).
    /// A hospital's ledger is kept in `<run-dir>/dp-ledgers/` and a resumed
    /// run keeps counting it: a run extended past these rounds is refused
    /// by the budget once a release would exceed it.
    #[arg(long)]
    pub dp_rounds: Option<u64>,
    /// What leaves a hospital encrypted with CKKS: none, the classifier
    /// head, or the whole update (then the aggregator must be
    /// geometric-median, run as the encrypted geometric median, or fedavg).
    #[arg(long, value_enum, default_value_t = Encrypt::Head)]
    pub encrypt: Encrypt,
    /// Whose keys encrypt: one key pair at every hospital (single), or
    /// multiparty keys (a collective key from a share of each hospital: no
    /// hospital, nor the server, can decrypt another's upload; each round
    /// has the hospitals switch the server's sum to their output key).
    /// Multiparty keys seal the head (--encrypt head).
    #[arg(long, value_enum, default_value_t = HeKeys::Single)]
    #[serde(default)]
    pub keys: HeKeys,
    /// With --keys multiparty: how many hospitals' shares complete a key
    /// switch (default: every hospital's, N-of-N; then one hospital
    /// missing fails the round).
    #[arg(long)]
    #[serde(default)]
    pub threshold: Option<usize>,
    /// Each hospital's local training.
    #[command(flatten)]
    pub training: TrainingArgs,
    /// Quorum: valid updates a round needs (default: all but one, at least 1).
    #[arg(long)]
    pub min_clients: Option<usize>,
    /// Seconds the server waits for updates each round.
    #[arg(long, default_value_t = 600)]
    pub round_timeout: u64,
    /// Run folder: checkpoints, HE keys, the synthetic set (default: runs/<time>).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run saved in --run-dir.
    #[arg(long, requires = "run_dir")]
    pub resume: bool,
    /// Make this hospital (1-based) a Byzantine one that sends sign-flipped,
    /// scaled updates (to watch the robust aggregator and trust scores).
    #[arg(long)]
    pub byzantine: Option<usize>,
    /// Make this hospital (1-based) drop out of every round.
    #[arg(long)]
    pub drop_client: Option<usize>,
}

impl SimConfig {
    /// The command line's defaults (the demo's run).
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            sim: SimConfig,
        }
        <Flags as clap::Parser>::parse_from(["hospital"]).sim
    }
}

/// What a finished simulation reports.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Rounds recorded.
    pub rounds: u64,
    /// Held-out evaluation before training.
    pub initial: Evaluation,
    /// After the last round that evaluated.
    pub last: Evaluation,
    /// Updates that did not count, over all rounds.
    pub rejected: usize,
    /// The run folder.
    pub run_dir: PathBuf,
}

/// Runs a simulation to the end (blocking; call it from a blocking thread).
/// Rounds go to `store` through `rt`, live events and progress to `shared`,
/// every new global model (head opened at the evaluation site) to `predictor`.
pub fn run(
    cfg: &SimConfig,
    job: i64,
    store: &Store,
    rt: &tokio::runtime::Handle,
    shared: &Arc<Shared>,
    predictor: &Arc<Predictor>,
) -> Result<Summary> {
    let result = run_inner(cfg, job, store, rt, shared, predictor);
    shared.end(
        result
            .as_ref()
            .map(|s| s.rounds)
            .map_err(|e| format!("{e:#}")),
    );
    result
}

fn run_inner(
    cfg: &SimConfig,
    job: i64,
    store: &Store,
    rt: &tokio::runtime::Handle,
    shared: &Arc<Shared>,
    predictor: &Arc<Predictor>,
) -> Result<Summary> {
    if cfg.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if cfg.keys == HeKeys::Multiparty {
        if cfg.encrypt == Encrypt::None {
            bail!("--keys multiparty needs something encrypted (--encrypt head or all)");
        }
        match (cfg.threshold, cfg.drop_client) {
            (None, Some(_)) => bail!(
                "--keys multiparty without --threshold needs every hospital's share in every round; \
                 with --drop-client no round could complete (set --threshold)"
            ),
            (Some(t), Some(_)) if t >= cfg.clients => bail!(
                "--threshold {t} with --drop-client: only {} hospitals can answer the key switch",
                cfg.clients - 1
            ),
            _ => {}
        }
    } else if cfg.threshold.is_some() {
        bail!("--threshold applies to --keys multiparty");
    }
    if cfg.encrypt == Encrypt::All && cfg.dp.mode == DpMode::Client {
        bail!(
            "--dp client with --encrypt all is not supported: client-level DP runs on the part of \
             the update that travels in the clear, and with --encrypt all nothing does (--dp sample works)"
        );
    }
    let run_dir = cfg.run_dir.clone().unwrap_or_else(|| {
        PathBuf::from(format!("runs/hospital-{}", crate::store::now_ms() / 1000))
    });
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    shared.set_progress(|p| {
        *p = Progress {
            status: RunStatus::Preparing,
            current_round: 0,
            total_rounds: cfg.rounds,
            aggregator: cfg.aggregator.label(cfg.encrypt),
            he: cfg.encrypt != Encrypt::None,
            encrypt: cfg.encrypt,
            keys: cfg.keys,
            threshold: cfg.threshold,
            dp: cfg.dp.enabled(),
            dp_mode: Some(cfg.dp.mode),
            budget: cfg.dp.enabled().then_some((cfg.dp.epsilon, cfg.dp.delta)),
            error: None,
            job: Some(job),
        }
    });

    // ---- data: patient-level Dirichlet split of train_val, test = held-out patients
    let root = match &cfg.data_dir {
        Some(d) => d.clone(),
        None => synthetic(cfg, &run_dir)?,
    };
    let mut ds = ChestXray14::open(&root, image_config(cfg.image_size))
        .with_context(|| format!("ChestX-ray14 layout in {}", root.display()))?;
    let missing = ds.retain_present();
    if missing > 0 {
        tracing::warn!(missing, "rows without an image are left out");
    }
    let train = ds.official_split("train_val_list.txt")?;
    let test = ds.official_split("test_list.txt")?;
    if train.is_empty() || test.is_empty() {
        bail!("the data needs images in both train_val_list.txt and test_list.txt");
    }
    let entries = ds.entries().to_vec();
    let groups: Vec<u64> = train
        .iter()
        .map(|&i| u64::from(entries[i].patient))
        .collect();
    let profiles: Vec<usize> = train
        .iter()
        .map(|&i| (0..14).find(|&l| entries[i].has(l)).unwrap_or(14))
        .collect();
    let split = dirichlet_partition(
        &groups,
        &profiles,
        &PartitionConfig {
            hospitals: cfg.clients,
            alpha: cfg.alpha,
            seed: cfg.seed,
            min_items: cfg.training.batch_size.min(8),
        },
    )?;
    let ds: Arc<dyn ImageDataset> = Arc::new(ds);
    let holdout = DataSplit::subset(ds.clone(), test)?;

    // ---- HE keys (written into the run folder once, read back on resume)
    let keys: Option<SimKeys> = if cfg.encrypt == Encrypt::None {
        None
    } else {
        Some(SimKeys::load_or_create(
            &run_dir.join("he-keys"),
            cfg.keys,
            cfg.clients,
            cfg.threshold,
            cfg.resume,
            cfg.encrypt == Encrypt::All,
        )?)
    };
    let secret: Option<CkksContext<Secret>> = keys.as_ref().map(|k| k.opener().clone());

    // ---- public pretraining of the initial model (a resumed run has it)
    let mut template = densenet(cfg.seed)?;
    if !cfg.resume {
        let public = run_dir.join("public");
        cfg.pretrain
            .pretrain(&mut template, cfg.image_size, cfg.seed, &public)?;
    }

    // ---- hospitals
    let layout = template.layout().clone();
    let sealed_patterns = cfg.encrypt.patterns(&template)?;
    let sealed_selection = layout.select(&sealed_patterns)?;
    // What the hospitals train (the template is frozen after pretraining,
    // so that client-level DP covers what changes).
    cfg.trainable.apply(&mut template)?;
    let dp_names = dp_tensors(&template);
    check_client_dp(&cfg.dp, &dp_names)?;
    // Each hospital's DP ledger: a resumed run keeps counting it, a new run
    // in the same folder starts with the checkpoint and the ledgers gone.
    let ledgers = run_dir.join("dp-ledgers");
    if !cfg.resume && ledgers.exists() {
        println!(
            "a new run: the DP ledgers of the previous run in {} start over (use --resume to keep counting)",
            run_dir.display()
        );
        std::fs::remove_dir_all(&ledgers)
            .with_context(|| format!("cannot clear {}", ledgers.display()))?;
    }
    let mut transport = InMemoryTransport::new();
    for (i, items) in split.hospitals.iter().enumerate() {
        let name = hospital(i);
        let indices: Vec<usize> = items.iter().map(|&j| train[j]).collect();
        let patients: BTreeSet<u32> = indices.iter().map(|&j| entries[j].patient).collect();
        rt.block_on(store.upsert_client(&name, indices.len() as i64, patients.len() as i64))?;
        let images = indices.len();
        let data = DataSplit::subset(ds.clone(), indices)?;
        let mut model = densenet(cfg.seed)?;
        cfg.trainable.apply(&mut model)?;
        let dp_sgd = |model| {
            let settings = DpSettings {
                dp: cfg.dp,
                rounds: cfg.dp_rounds.unwrap_or(cfg.rounds),
            };
            let path = ledgers.join(format!("{name}.json"));
            PersistedDpSgd::open(&name, model, images, settings, path)
        };
        let attack = Attack::SignFlip { scale: 4.0 };
        let byzantine = cfg.byzantine == Some(i + 1);
        let (names, ledgers) = (dp_names.as_slice(), ledgers.as_path());
        let keys = keys.as_ref().map(|k| (k, i));
        let client: Box<dyn fedcore::Client> = match (cfg.dp.mode == DpMode::Sample, byzantine) {
            (true, true) => {
                let model = Byzantine::new(dp_sgd(model)?, attack)?;
                build_client(cfg, &name, model, data, names, keys, ledgers)?
            }
            (true, false) => build_client(cfg, &name, dp_sgd(model)?, data, names, keys, ledgers)?,
            (false, true) => {
                let model = Byzantine::new(model, attack)?;
                build_client(cfg, &name, model, data, names, keys, ledgers)?
            }
            (false, false) => build_client(cfg, &name, model, data, names, keys, ledgers)?,
        };
        transport.add_client(client)?;
    }
    if let Some(i) = cfg.drop_client {
        transport
            .inject(
                &ClientId::new(hospital(i.saturating_sub(1))),
                Some(Fault::Drop),
            )
            .with_context(|| format!("no hospital {i}"))?;
    }

    // ---- server
    // The server's context: the public key, and the evaluation keys that
    // the encrypted geometric median computes distances with.
    // Under multiparty keys the distances are computed with the collective
    // relinearization key instead, and decrypted by the hospitals together.
    let multiparty = cfg.keys == HeKeys::Multiparty;
    let public = match (&secret, cfg.encrypt) {
        (Some(s), Encrypt::All) if !multiparty => {
            Some(s.public().with_evaluation_keys(&s.evaluation_keys()?)?)
        }
        (Some(s), _) => Some(s.public()),
        (None, _) => None,
    };
    // Under multiparty keys the round switches the sealed sum, weighted as
    // the server will weigh it (its learning rate, the default's).
    let server_learning_rate = ServerConfig::default().server_learning_rate;
    let aggregator = match &keys {
        Some(k)
            if multiparty
                && cfg.encrypt == Encrypt::All
                && cfg.aggregator == AggregatorChoice::GeometricMedian =>
        {
            k.median_rule(server_learning_rate)?
        }
        Some(k) => k.server_rule(
            cfg.aggregator
                .rule(cfg.clients, cfg.encrypt, public.as_ref())?,
            server_learning_rate,
        )?,
        None => cfg
            .aggregator
            .rule(cfg.clients, cfg.encrypt, public.as_ref())?,
    };
    let faulty = usize::from(cfg.drop_client.is_some());
    // Never below what the rule needs (the key switch: every hospital, or
    // its threshold).
    let needs = aggregator.describe().min_updates;
    let quorum = cfg
        .min_clients
        .unwrap_or_else(|| (cfg.clients - faulty).saturating_sub(1).max(1))
        .max(needs);
    let config = ServerConfig {
        rounds: cfg.rounds,
        min_fit_clients: quorum,
        min_available_clients: quorum,
        fraction_evaluate: 0.0,
        round_timeout: Duration::from_secs(cfg.round_timeout),
        seed: cfg.seed,
        train: cfg.training.config(),
        checkpoint_dir: Some(run_dir.join("checkpoints")),
        trust: Some(TrustPolicy::default()),
        server_learning_rate,
        ..ServerConfig::default()
    };
    let initial_params = template.parameters();
    let sealed_sum = public.clone().map(|p| aggregator.sealed_sum(p));
    let mut server = if cfg.resume {
        Server::resume(config, initial_params, transport, aggregator)?
    } else {
        Server::new(config, initial_params, transport, aggregator)?
    };
    if let Some(sum) = sealed_sum {
        server = server.with_sealing(&sealed_patterns, sum)?;
    }

    // ---- the evaluation site: opens the head, evaluates on held-out patients
    let opener = secret.clone().map(CkksSealer::new);
    let mut evaluator = densenet(cfg.seed)?;
    let open_head = {
        let head = sealed_selection.clone();
        let layout = layout.clone();
        move |p: &Parameters,
              sealed: Option<&fedcore::SealedTensors>|
              -> fedcore::Result<Parameters> {
            let mut full = p.clone();
            if let (Some(o), Some(s)) = (&opener, sealed) {
                use fedcore::Sealer;
                let values = o.open(s)?;
                head.scatter(&layout, &values, full.as_mut_slice())?;
            }
            Ok(full)
        }
    };
    let full = open_head(server.global(), server.sealed_global())?;
    evaluator.set_parameters(&full)?;
    let initial = evaluator.evaluate(&holdout)?;
    predictor.set_protections(crate::infer::Protections {
        dp_mode: cfg.dp.mode,
        budget: cfg.dp.enabled().then_some((cfg.dp.epsilon, cfg.dp.delta)),
        encrypt: cfg.encrypt,
    });
    if !cfg.resume {
        rt.block_on(store.record_initial(job, initial.loss, &initial.metrics))?;
    }
    predictor.update(&full, server.next_round() - 1)?;
    // The opened global model of the last completed round, for inference;
    // the loop below installs it under the round's number.
    let latest: Arc<Mutex<Option<Parameters>>> = Arc::new(Mutex::new(None));
    {
        let holdout = holdout.clone();
        let latest = latest.clone();
        server.set_sealed_evaluator(move |p, sealed| {
            let full = open_head(p, sealed)?;
            if let Ok(mut l) = latest.lock() {
                *l = Some(full.clone());
            }
            evaluator.set_parameters(&full)?;
            evaluator.evaluate(&holdout)
        });
    }

    // ---- events: terminal progress bar, live events, the store
    let todo = cfg.rounds.saturating_sub(server.next_round() - 1);
    let bar = crate::progress_bar(todo)?;
    {
        let shared = shared.clone();
        let bar = bar.clone();
        let total = cfg.rounds;
        server.subscribe(move |event: &ServerEvent| {
            shared.observe(event, total);
            match event {
                ServerEvent::RoundStarted { round, sampled } => bar.set_message(format!(
                    "round {round}: {} hospitals training",
                    sampled.len()
                )),
                // A rejected update and a hospital kept out by an
                // administrator both show as "not counted".
                ServerEvent::UpdateRejected { client, reason, .. } => {
                    bar.suspend(|| println!("  {client} not counted: {reason}"));
                }
                ServerEvent::ClientWithheld { client, reason, .. } => {
                    bar.suspend(|| println!("  {client} not counted: {reason}"));
                }
                ServerEvent::ClientFlagged {
                    client, trust_ema, ..
                } => {
                    bar.suspend(|| println!("  {client} is suspicious (trust {trust_ema:.2})"));
                }
                _ => {}
            }
        });
    }

    apply_suspensions(&server, shared, cfg.clients, cfg.drop_client)?;
    // The core's run loop: a failed round (no quorum, aggregation refused)
    // is recorded and the run goes on, as many as there are (suspended
    // hospitals rejoin when reactivated); Ctrl-C or the stop flag ends it.
    let policy = RunPolicy::default()
        .with_max_failed_in_a_row(None)
        .with_stop(shared.stop.clone());
    // Hospitals that refused a release because their budget is spent: they
    // never come back, so once too few are left for the quorum the run ends.
    let mut exhausted = BTreeSet::new();
    // The hook gets each round's record: store it, print it, tell the dashboard.
    let report = server.run_with(&policy, |server, record| -> Result<()> {
        if !record.outcome.is_completed() {
            bar.suspend(|| println!("round {} failed: {}", record.round, record.outcome));
        }
        for f in &record.failures {
            if f.reason.is_budget_exhausted() {
                exhausted.insert(f.client.clone());
            }
        }
        let opened = latest.lock().ok().and_then(|mut l| l.take());
        if let Some(full) = opened
            && let Err(e) = predictor.update(&full, record.round)
        {
            tracing::warn!(error = %e, "inference model not updated");
        }
        let row = round_row(record);
        rt.block_on(store.record_round(job, &to_new_round(record, &row)))?;
        let line = format!(
            "round {:>3}: {} updates, held-out loss {}, macro AUROC {}",
            record.round,
            record.accepted.len(),
            row.loss.map_or("-".into(), |v| format!("{v:.4}")),
            row.auroc_macro.map_or("-".into(), |v| format!("{v:.3}")),
        );
        bar.suspend(|| println!("{line}"));
        bar.inc(1);
        shared.send(LiveEvent::RoundFinished {
            round: record.round,
            total: cfg.rounds,
            loss: row.loss,
            auroc_macro: row.auroc_macro,
            accuracy: None,
            outcome: row.outcome.clone(),
        });
        // Hospitals that can still answer: not out of budget, not the one
        // --drop-client drops every round.
        let able = cfg.clients.saturating_sub(faulty + exhausted.len());
        if !record.outcome.is_completed() && !exhausted.is_empty() && able < record.quorum {
            let names: Vec<&str> = exhausted.iter().map(|c| c.as_str()).collect();
            bail!(
                "the run cannot go on: the privacy budgets of {} are spent, and the {able} hospital(s) left are fewer than the quorum of {} (ledgers in {})",
                names.join(", "),
                record.quorum,
                ledgers.display()
            );
        }
        // Suspensions made on the dashboard take effect from the next round.
        apply_suspensions(server, shared, cfg.clients, cfg.drop_client)
    })?;
    // The policy never gives up, so a run ends complete or stopped.
    if report.end == RunEnd::Stopped {
        bar.suspend(|| println!("stopped by request after round {}", server.next_round() - 1));
    }
    bar.finish_and_clear();
    let last = server
        .history()
        .iter()
        .rev()
        .find_map(|r| r.evaluation.clone())
        .unwrap_or_else(|| initial.clone());
    Ok(Summary {
        rounds: server.history().len() as u64,
        initial,
        last,
        rejected: server
            .history()
            .iter()
            .map(|r| r.failures.len() + r.withheld.len())
            .sum(),
        run_dir,
    })
}

fn build_client<M>(
    cfg: &SimConfig,
    name: &str,
    model: M,
    data: DataSplit,
    dp_names: &[String],
    keys: Option<(&SimKeys, usize)>,
    ledgers: &Path,
) -> Result<Box<dyn fedcore::Client>>
where
    M: Model<Data = DataSplit> + 'static,
{
    let mut client = ModelClient::new(name, model, data);
    if cfg.dp.mode == DpMode::Client {
        let settings = DpSettings {
            dp: cfg.dp,
            rounds: cfg.dp_rounds.unwrap_or(cfg.rounds),
        };
        let path = ledgers.join(format!("{name}.json"));
        client = client.with_mechanism(PersistedDp::open(name, dp_names, settings, path)?);
    }
    if let Some((keys, i)) = keys {
        let (sealer, switcher) = keys.hospital(i)?;
        client = client.with_sealer(sealer);
        // Under multiparty keys the hospital answers the key switch (and
        // its share of the distances' decryption); under one key, only a
        // hospital that agreed to the encrypted geometric median decrypts
        // distances for the server.
        if let Some(s) = switcher {
            client = client.with_responder(s);
        } else if cfg.encrypt == Encrypt::All {
            client = client.with_responder(DistanceDecryptor::new(keys.opener().clone())?);
        }
    }
    Ok(Box::new(client))
}

/// Writes the synthetic set once into the run folder.
fn synthetic(cfg: &SimConfig, run_dir: &Path) -> Result<PathBuf> {
    let dir = run_dir.join("synthetic");
    if dir.join("test_list.txt").exists() {
        return Ok(dir);
    }
    let config = SyntheticXrays {
        patients: cfg.patients,
        size: cfg.image_size.max(64),
        seed: cfg.seed,
        ..SyntheticXrays::default()
    };
    let s = write_synthetic_chestxray(&dir, &config)?;
    println!(
        "synthetic chest X-rays: {} images of {} patients ({} held out) in {}",
        s.images,
        cfg.patients,
        s.test_images,
        dir.display()
    );
    Ok(dir)
}

/// Suspended hospitals are kept out of training by the server's exclusion
/// list (recorded as withheld); reactivated ones train again. `--drop-client`
/// makes one hospital's connection drop (a simulated outage).
pub(crate) fn apply_suspensions<A: Strategy>(
    server: &Server<InMemoryTransport, A>,
    shared: &Shared,
    clients: usize,
    dropped: Option<usize>,
) -> Result<()> {
    let suspended = shared
        .suspended
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    let exclusions = server.exclusions();
    for i in 0..clients {
        let id = ClientId::new(hospital(i));
        if suspended.contains(id.as_str()) {
            exclusions.exclude(id.clone(), "suspended by an administrator");
        } else {
            exclusions.include(&id);
        }
        let fault = (dropped == Some(i + 1)).then_some(Fault::Drop);
        server.transport().inject(&id, fault)?;
    }
    Ok(())
}
