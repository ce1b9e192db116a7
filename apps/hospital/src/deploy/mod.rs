//! The deployment: the same federation as the simulation, with each hospital
//! in its own process (on its own machine) and the aggregation server in
//! another, over gRPC with mutual TLS (`fedcore::net`).
//!
//! `hospital provision` creates the startup kits and has the HE key
//! authority write its keys into them (the public and evaluation keys into
//! the server's kit, the secret key into each hospital's); `hospital server
//! --kit` runs the round orchestrator with the robust aggregator on the
//! body and the encrypted sum on the head (with `--encrypt all`, the
//! encrypted geometric median of whole encrypted updates); `hospital client
//! --kit` trains on the
//! hospital's own data and evaluates the global model on its own held-out
//! patients each round (the server holds no data and no key).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use fedcore::data::{
    ChestXray14, DataSplit, ImageDataset, SyntheticXrays, write_synthetic_chestxray,
};
use fedcore::net::provision::{Kit, Project, ProjectSpec, Roster};
use fedcore::net::{self, ClientOptions, GrpcTransport, Limits, ServerOptions};
use fedcore::trust::TrustPolicy;
use fedcore::{Model, ModelClient, Server, ServerConfig, ServerEvent, Strategy};
use fedcore_he::{
    CkksContext, CkksParams, CkksSealer, DistanceDecryptor, KeyAuthority, Public, Secret,
};

use crate::dp::{DpSettings, PersistedDp, PersistedDpSgd};
use crate::federation::FederationLink;
use crate::infer::Predictor;
use crate::live::{LiveEvent, RunStatus, Shared, round_row, to_new_round};
use crate::recipe::{
    AggregatorChoice, DpArgs, DpMode, Encrypt, HeKeys, PretrainArgs, Trainable, TrainingArgs,
    check_client_dp, densenet, dp_tensors, hospital, image_config,
};
use crate::web::{self, WebConfig};

mod dashboard;
use dashboard::{Dashboard, FeedsInference, HospitalDashboard, serve_until_ctrl_c};

/// `hospital provision`.
#[derive(Args, Debug, Clone)]
pub struct ProvisionArgs {
    /// The project folder to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of hospitals (`hospital-1` ...).
    #[arg(long, default_value_t = 3)]
    pub hospitals: usize,
    /// The server's host names / IP addresses (the first is what hospitals dial).
    #[arg(long = "host", default_values = ["localhost", "127.0.0.1"])]
    pub hosts: Vec<String>,
    /// The server's port.
    #[arg(long, default_value_t = 50051)]
    pub port: u16,
    /// Write CKKS keys into the kits (the head is then encrypted).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub he: bool,
    /// One key pair, its secret in every hospital's kit (single), or
    /// multiparty keys: each hospital then makes its own share with
    /// `hospital keygen` (docs/he.md "In the hospital app").
    #[arg(long, value_enum, default_value_t = HeKeys::Single)]
    pub keys: HeKeys,
    /// With multiparty keys: any this many hospitals (at least 2) switch a
    /// round's sum, so a round completes when the others drop out
    /// (default: every hospital, N-of-N).
    #[arg(long)]
    pub threshold: Option<usize>,
    /// With multiparty keys: what they seal, the head (default) or whole
    /// updates (`all`: the encrypted geometric median's parameters, and two
    /// more `keygen` rounds for its collective relinearization key).
    /// Single keys serve both.
    #[arg(long, value_enum, default_value_t = Encrypt::Head)]
    pub encrypt: Encrypt,
}

/// `hospital keygen`.
#[derive(Args, Debug, Clone)]
pub struct KeygenArgs {
    /// The hospital's startup kit (provisioned with `--keys multiparty`).
    #[arg(long)]
    pub kit: PathBuf,
    /// Under a threshold: deal (once every hospital's signed statement is
    /// in the kit and agrees with this kit's keys).
    #[arg(long)]
    pub deal: bool,
}

/// `hospital server`.
#[derive(Args, Debug, Clone)]
pub struct ServerArgs {
    /// The server's startup kit.
    #[arg(long)]
    pub kit: PathBuf,
    /// Listen here instead of on the kit's port.
    #[arg(long)]
    pub listen: Option<std::net::SocketAddr>,
    /// How the server combines the body updates.
    #[arg(long, value_enum, default_value = "geometric-median")]
    pub aggregator: AggregatorChoice,
    /// What the hospitals send encrypted, when the kit holds CKKS keys: the
    /// classifier head, or the whole update (then the aggregator must be
    /// geometric-median, run as the encrypted geometric median, or fedavg).
    #[arg(long, value_enum, default_value_t = Encrypt::Head)]
    pub encrypt: Encrypt,
    /// Rounds in total (a resumed run counts those already done).
    #[arg(long, default_value_t = 10)]
    pub rounds: u64,
    /// The quorum: valid updates a round needs.
    #[arg(long, default_value_t = 2)]
    pub min_clients: usize,
    /// Hospitals connected before round 1 starts (default: the quorum);
    /// later rounds start with the quorum.
    #[arg(long)]
    pub start_with: Option<usize>,
    /// Seconds a round waits for updates.
    #[arg(long, default_value_t = 1800)]
    pub round_timeout: u64,
    /// Seconds added to the round's wait per megabyte of the model, for
    /// the slowest link to wait for (2 for a 1 MB/s link: down and up).
    #[arg(long, default_value_t = 0.0)]
    pub round_timeout_per_mb: f64,
    /// Seconds a hospital whose connection dropped has to come back and
    /// resume its transfer where it stopped (0: its task fails at once).
    #[arg(long, default_value_t = 60)]
    pub resume_window: u64,
    /// Seconds to wait for enough hospitals before a round.
    #[arg(long, default_value_t = 3600)]
    pub wait: u64,
    /// Checkpoints go to <run-dir>/checkpoints; an existing one is resumed.
    #[arg(long, default_value = "runs/server")]
    pub run_dir: PathBuf,
    /// Seed of the initial model and of client sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Each hospital's local training (without DP; a hospital on DP-SGD
    /// trains on its own schedule).
    #[command(flatten)]
    pub training: TrainingArgs,
    /// Public pretraining of the initial model, before the server listens.
    #[command(flatten)]
    pub pretrain: PretrainArgs,
    /// Side of the images public pretraining uses (the hospitals' size).
    #[arg(long, default_value_t = 64)]
    pub image_size: u32,
    /// The largest gRPC message accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_message_bytes: usize,
    /// Serve the dashboard here while the federation trains, and after the
    /// run until Ctrl-C (its store: `DATABASE_URL`, default
    /// `<run-dir>/dashboard.sqlite`; users, TLS and keys as for `simulate`).
    #[arg(long)]
    pub dashboard: Option<std::net::SocketAddr>,
    /// A proxy in front of the dashboard terminates TLS: allow a
    /// non-loopback `--dashboard` without `TLS_CERT`/`TLS_KEY`.
    #[arg(long)]
    pub behind_tls_proxy: bool,
}

/// `hospital client`.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The hospital's startup kit.
    #[arg(long)]
    pub kit: PathBuf,
    /// Dial this `host:port` instead of the kit's server address.
    #[arg(long)]
    pub server: Option<String>,
    /// This hospital's ChestX-ray14-layout folder (train_val_list.txt is
    /// trained on, test_list.txt evaluated on); default: a synthetic set.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Where the synthetic set goes.
    #[arg(long, default_value = "runs/site")]
    pub work_dir: PathBuf,
    /// Patients of the synthetic set.
    #[arg(long, default_value_t = 100)]
    pub patients: usize,
    /// Side of the images (must match across the federation).
    #[arg(long, default_value_t = 64)]
    pub image_size: u32,
    /// Seed of the model template (must match the server's).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Give up after this many seconds without a session (default: never).
    #[arg(long)]
    pub give_up_after: Option<u64>,
    /// The largest gRPC message accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_message_bytes: usize,
    /// Differential privacy before anything trained leaves the hospital,
    /// as in the simulation.
    #[command(flatten)]
    pub dp: DpArgs,
    /// What this hospital trains (the rest stays as the server's initial
    /// model has it; train everything when the server did not pretrain).
    #[arg(long, value_enum, default_value_t = Trainable::default())]
    pub trainable: Trainable,
    /// What this hospital agrees to: `head` (it seals what the server
    /// seals) or `all` (it also decrypts the pairwise distances of the
    /// updates for the server's encrypted geometric median; needs the
    /// server's `--encrypt all`).
    #[arg(long, value_enum, default_value_t = Encrypt::Head)]
    pub encrypt: Encrypt,
    /// Rounds the budget is spread over (the server's `--rounds`, plus some
    /// slack: a round the server re-runs after a restart costs a release
    /// again); the accountant refuses to release more. The releases are
    /// counted in `<work-dir>/<hospital>-dp-ledger.json` across restarts.
    #[arg(long, default_value_t = 10)]
    pub dp_rounds: u64,
    /// Serve the hospital's own dashboard here: its staff sign in and read
    /// X-rays with the latest global model, whose encrypted head this
    /// hospital opens with its key (the server cannot). Its store:
    /// `DATABASE_URL`, default `<work-dir>/<hospital>-dashboard.sqlite`;
    /// users, TLS and keys as for `simulate`. It keeps serving after the
    /// run, until Ctrl-C.
    #[arg(long)]
    pub dashboard: Option<std::net::SocketAddr>,
    /// A proxy in front of the dashboard terminates TLS: allow a
    /// non-loopback `--dashboard` without `TLS_CERT`/`TLS_KEY`.
    #[arg(long)]
    pub behind_tls_proxy: bool,
}

fn limits(max_message_bytes: usize) -> Limits {
    Limits {
        max_message_bytes,
        chunk_bytes: (max_message_bytes / 4).max(4096),
        ..Limits::default()
    }
}

/// Creates the kits and writes the HE keys into them.
pub fn provision_cmd(a: &ProvisionArgs) -> Result<()> {
    if a.hospitals == 0 {
        bail!("--hospitals must be at least 1");
    }
    if a.threshold.is_some() && (a.keys != HeKeys::Multiparty || !a.he) {
        bail!("--threshold applies to --keys multiparty");
    }
    if a.encrypt != Encrypt::Head && (a.keys != HeKeys::Multiparty || !a.he) {
        bail!(
            "--encrypt applies to --keys multiparty with --he true (single keys serve the head and whole updates)"
        );
    }
    if a.encrypt == Encrypt::None {
        bail!("--keys multiparty --encrypt none: nothing to make keys for");
    }
    if let Some(t) = a.threshold {
        crate::he_keys::check_threshold(t, a.hospitals)?;
    }
    let sites: Vec<String> = (0..a.hospitals).map(hospital).collect();
    let spec = ProjectSpec {
        server_hosts: a.hosts.clone(),
        ..ProjectSpec::new("fedcore-hospital", sites.clone(), a.port)
    };
    let project = Project::create(&a.out, &spec)?;
    println!(
        "startup kits in {}: server/ and {}",
        a.out.display(),
        sites.join("/, ")
    );
    match (a.he, a.keys) {
        (false, HeKeys::Multiparty) => bail!("--keys multiparty needs --he true"),
        (false, HeKeys::Single) => {}
        (true, HeKeys::Single) => {
            let kits: Vec<PathBuf> = sites.iter().map(|s| project.site_kit(s)).collect();
            KeyAuthority::write_kits(CkksParams::default(), &project.server_kit(), &kits)?;
            println!("CKKS keys: the public key in server/, the secret key in each hospital's kit");
        }
        (true, HeKeys::Multiparty) => {
            let kits: Vec<(String, PathBuf)> = sites
                .iter()
                .map(|s| (s.clone(), project.site_kit(s)))
                .collect();
            let whole = a.encrypt == Encrypt::All;
            crate::he_keys::kit::provision(&project.server_kit(), &kits, a.threshold, whole)?;
            println!(
                "CKKS multiparty keys: each hospital runs `hospital keygen --kit <its kit>` and sends its {}; \
                 put them in server/{}/<site>.bin, then copy those files into the same folder of every \
                 hospital's kit; each runs keygen again and its signed he-attestation.json goes the same way, \
                 into he-attestations/<site>.json (docs/deployment.md)",
                crate::he_keys::kit::KEYSHARE_FILE,
                crate::he_keys::kit::KEYSHARES_DIR
            );
            if let Some(t) = a.threshold {
                println!(
                    "threshold {t} of {}: each hospital's {} goes with its key share, into {}/<site>.bin, \
                     before keygen's second run; once every statement is in, each deals with \
                     `hospital keygen --deal`, and each {}/<site>.bin goes to <site's kit>/{}/<dealer>.bin",
                    a.hospitals,
                    crate::he_keys::kit::TRANSPORT_FILE,
                    crate::he_keys::kit::TRANSPORT_DIR,
                    crate::he_keys::kit::DEALS_OUT_DIR,
                    crate::he_keys::kit::DEALS_DIR
                );
            }
            if whole {
                println!(
                    "whole updates: keygen also writes {} (from its second run) and then {} (once every \
                     statement agrees and every {} is in {}/): each goes, like the key shares, into {}/ \
                     and {}/<site>.bin of every kit",
                    crate::he_keys::kit::RELIN1_FILE,
                    crate::he_keys::kit::RELIN2_FILE,
                    crate::he_keys::kit::RELIN1_FILE,
                    crate::he_keys::kit::RELIN1_DIR,
                    crate::he_keys::kit::RELIN1_DIR,
                    crate::he_keys::kit::RELIN2_DIR
                );
            }
        }
    }
    println!("keep ca/ offline; give each participant its own folder only");
    Ok(())
}

/// `hospital keygen`: the hospital's next step in the multiparty key
/// ceremony ([`crate::he_keys::kit::keygen`]), and what the operator
/// carries next.
pub fn keygen_cmd(a: &KeygenArgs) -> Result<()> {
    use crate::he_keys::kit;
    let made = kit::keygen(&a.kit, a.deal)?;
    println!(
        "secret share in {} (keep it); key share in {}: send it to the server's operator",
        a.kit.join(kit::PARTY_KEY_FILE).display(),
        made.share.display()
    );
    if let Some(transport) = &made.transport {
        println!(
            "transport key in {}: send it to the server's operator too",
            transport.display()
        );
    }
    let Some((view, statement)) = &made.attested else {
        println!(
            "once every hospital's key share is in {}/{}, run keygen again",
            a.kit.join(kit::KEYSHARES_DIR).display(),
            if made.transport.is_some() {
                format!(" and its transport key in {}/", kit::TRANSPORT_DIR)
            } else {
                String::new()
            }
        );
        return Ok(());
    };
    println!("collective key {}", key_id_hex(view.key_id));
    if let Some(r) = &view.roster {
        println!("{r}");
    }
    println!(
        "signed statement of these keys in {}: send it to the server's operator",
        statement.display()
    );
    if let Some(r1) = &made.relin1 {
        println!(
            "first relinearization share in {}: send it to the server's operator",
            r1.display()
        );
        match &made.relin2 {
            Some(r2) => println!(
                "second relinearization share in {}: send it to the server's operator",
                r2.display()
            ),
            None => println!(
                "once every hospital's statement and {} are in this kit ({}/, {}/{}), run keygen again",
                kit::RELIN1_FILE,
                kit::ATTESTATIONS_DIR,
                kit::RELIN1_DIR,
                if made.relin_missing.is_empty() {
                    String::new()
                } else {
                    format!(": missing {}", made.relin_missing.join(", "))
                }
            ),
        }
    }
    if !made.agreed {
        println!(
            "once every hospital's statement is in {}/ (missing: {}), run keygen again{}",
            a.kit.join(kit::ATTESTATIONS_DIR).display(),
            made.missing.join(", "),
            if view.roster.is_some() {
                " with --deal"
            } else {
                ""
            }
        );
        return Ok(());
    }
    println!("every hospital states the same keys");
    match made.dealt {
        Some(now) => println!(
            "deals {} in {}: each <site>.bin goes to that site's kit as {}/<this site>.bin",
            if now { "made" } else { "made before, kept" },
            a.kit.join(kit::DEALS_OUT_DIR).display(),
            kit::DEALS_DIR
        ),
        None if view.roster.is_some() => {
            println!("deal: hospital keygen --kit {} --deal", a.kit.display())
        }
        None => println!("ready: start the client"),
    }
    Ok(())
}

/// The first 8 bytes of a key id, in hex, for operators to compare.
fn key_id_hex(id: [u8; 16]) -> String {
    id[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the aggregation server until the run is complete.
pub fn server_cmd(a: &ServerArgs) -> Result<()> {
    let kit = Kit::load(&a.kit)?;
    if !(a.round_timeout_per_mb.is_finite() && a.round_timeout_per_mb >= 0.0) {
        bail!("--round-timeout-per-mb must be a number of seconds >= 0");
    }
    // Multiparty keys are checked before pretraining: the head is sealed,
    // and every party of the collective key is a hospital on the roster.
    let multiparty = if crate::he_keys::kit::is_multiparty(&kit.dir) {
        if !kit.dir.join(KeyAuthority::PUBLIC_FILE).exists() {
            bail!(
                "a kit with multiparty keys needs {} in it",
                KeyAuthority::PUBLIC_FILE
            );
        }
        let sealed = if crate::he_keys::kit::is_whole(&kit.dir)? {
            Encrypt::All
        } else {
            Encrypt::Head
        };
        if a.encrypt != sealed {
            bail!(
                "a kit with these multiparty keys seals {} (--encrypt {}): anything else would send it \
                 in the clear or is not what the keys were made for (provision --encrypt)",
                if sealed == Encrypt::All {
                    "whole updates"
                } else {
                    "the head"
                },
                if sealed == Encrypt::All {
                    "all"
                } else {
                    "head"
                }
            );
        }
        let (collective, parties, view) = crate::he_keys::kit::server_view(&kit.dir)?;
        let certificates = Roster::load(&kit.roster_path())?;
        let roster = certificates.active();
        let gone: Vec<String> = parties
            .keys()
            .filter(|p| !roster.contains(&p.to_string()))
            .map(ToString::to_string)
            .collect();
        let needed = collective
            .roster()
            .map_or(parties.len(), fedcore_he::multiparty::Roster::threshold);
        if parties.len() - gone.len() < needed {
            bail!(
                "{} of the collective key's parties have no valid certificate on the roster (revoked?): \
                 {} must answer every round; make new keys without them",
                gone.join(", "),
                if needed == parties.len() {
                    "every party".to_owned()
                } else {
                    format!("at least {needed} parties")
                }
            );
        }
        if !gone.is_empty() {
            println!(
                "multiparty keys: no valid certificate for {}; the other {} switch the rounds \
                 (a revoked hospital keeps its threshold key: make new keys without it)",
                gone.join(", "),
                parties.len() - gone.len()
            );
        }
        // The hospitals' signed statements: every one combined these keys
        // (each signed with a certificate the roster admits).
        use crate::he_keys::kit::{Checker, Statements, check_attestations};
        if let Statements::Missing(sites) =
            check_attestations(&kit.dir, &view, Checker::Server(&certificates, &gone))?
        {
            bail!(
                "{} has no signed statement of {}: each hospital's he-attestation.json goes there as \
                 <site>.json (docs/deployment.md)",
                kit.dir
                    .join(crate::he_keys::kit::ATTESTATIONS_DIR)
                    .display(),
                sites.join(", ")
            );
        }
        // The relinearization key once the statements check (a share error
        // must not hide a certificate or statement error).
        let collective = if a.encrypt == Encrypt::All {
            crate::he_keys::kit::relinearized(&kit.dir, collective)?
        } else {
            collective
        };
        println!(
            "multiparty keys: collective key {} of {} hospitals{}",
            key_id_hex(collective.context().key_id()),
            parties.len(),
            if a.encrypt == Encrypt::All {
                ", with its relinearization key (whole updates)"
            } else {
                ""
            }
        );
        if let Some(r) = &view.roster {
            println!("multiparty keys: {r}");
        }
        Some((collective, parties))
    } else {
        None
    };
    let options = ServerOptions {
        listen: a.listen,
        limits: limits(a.max_message_bytes),
        resume_window: Duration::from_secs(a.resume_window),
        ..ServerOptions::default()
    };
    let checkpoints = a.run_dir.join("checkpoints");
    let resuming = checkpoints.join("state.json").exists();
    let mut template = densenet(a.seed)?;
    if !resuming {
        let public = a.run_dir.join("public");
        a.pretrain
            .pretrain(&mut template, a.image_size, a.seed, &public)?;
    }
    let transport = GrpcTransport::start(&kit, options)?;
    println!("listening on {}", transport.local_addr());
    // What is sealed: nothing without keys in the kit.
    let public_key = kit.dir.join(KeyAuthority::PUBLIC_FILE);
    let encrypt = if public_key.exists() {
        a.encrypt
    } else {
        if a.encrypt == Encrypt::All {
            bail!(
                "--encrypt all needs the CKKS keys in the kit ({} is missing)",
                public_key.display()
            );
        }
        Encrypt::None
    };
    let public = match encrypt {
        Encrypt::None => None,
        Encrypt::Head => Some(CkksContext::<Public>::from_file(&public_key)?),
        // Under multiparty keys the distances need the collective key's
        // relinearization key, not the output key's evaluation keys.
        Encrypt::All if multiparty.is_some() => {
            Some(CkksContext::<Public>::from_file(&public_key)?)
        }
        Encrypt::All => {
            let eval = kit.dir.join(KeyAuthority::EVALUATION_FILE);
            if !eval.exists() {
                bail!(
                    "--encrypt all needs the evaluation keys in the kit ({} is missing: kits provisioned \
                     before they were written need new keys)",
                    eval.display()
                );
            }
            Some(CkksContext::<Public>::from_file(&public_key)?.with_evaluation_key_file(&eval)?)
        }
    };
    let sealed = encrypt.patterns(&template)?;
    // Krum's f follows the number of hospitals, as in the simulation.
    let hospitals = Roster::load(&kit.roster_path())?.active().len();
    // Under multiparty keys each round has the hospitals switch the sealed
    // sum, weighted as the server will weigh it; the encrypted geometric
    // median's distances are decrypted by them together.
    let server_learning_rate = ServerConfig::default().server_learning_rate;
    let aggregator = match (multiparty, &public) {
        (Some((collective, parties)), Some(output))
            if encrypt == Encrypt::All && a.aggregator == AggregatorChoice::GeometricMedian =>
        {
            crate::he_keys::median_rule(collective, output.clone(), parties, server_learning_rate)?
        }
        (Some((collective, parties)), Some(output)) => crate::he_keys::switch_rule(
            a.aggregator
                .rule(hospitals.max(a.min_clients), encrypt, public.as_ref())?,
            collective,
            output.clone(),
            parties,
            server_learning_rate,
        )?,
        (Some(_), None) => bail!("multiparty keys without the output key's public key"),
        (None, _) => a
            .aggregator
            .rule(hospitals.max(a.min_clients), encrypt, public.as_ref())?,
    };
    let config = ServerConfig {
        rounds: a.rounds,
        min_fit_clients: a.min_clients.max(aggregator.describe().min_updates),
        min_available_clients: a.min_clients,
        // Evaluation happens at the hospitals, on their own held-out patients.
        fraction_evaluate: 1.0,
        round_timeout: Duration::from_secs(a.round_timeout),
        round_timeout_per_mb: Duration::from_secs_f64(a.round_timeout_per_mb),
        seed: a.seed,
        train: a.training.config(),
        checkpoint_dir: Some(checkpoints.clone()),
        trust: Some(TrustPolicy::default()),
        server_learning_rate,
        ..ServerConfig::default()
    };
    let initial = template.parameters();
    let sealed_sum = public.map(|p| aggregator.sealed_sum(p));
    let mut server = if resuming {
        let s = Server::resume(config, initial, transport, aggregator)?;
        println!("resumed at round {}", s.next_round());
        s
    } else {
        Server::new(config, initial, transport, aggregator)?
    };
    if let Some(sum) = sealed_sum {
        server = server.with_sealing(&sealed, sum)?;
        match encrypt {
            Encrypt::All => println!(
                "whole updates sealed with CKKS; {}",
                server.aggregator().describe().name
            ),
            _ => println!(
                "classifier head sealed with CKKS ({} tensors)",
                sealed.len()
            ),
        }
    }
    let dashboard = match a.dashboard {
        Some(at) => Some(Dashboard::start(a, at, &kit, &mut server)?),
        None => None,
    };
    server.subscribe(|event: &ServerEvent| match event {
        ServerEvent::RoundStarted { round, sampled } => {
            println!("round {round} started with {} hospitals", sampled.len());
        }
        ServerEvent::UpdateRejected {
            round,
            client,
            reason,
        } => {
            println!("round {round}: {client} not counted: {reason}");
        }
        ServerEvent::RoundFinished { record } | ServerEvent::RoundFailed { record, .. } => {
            let eval = record.federated_evaluation.as_ref();
            println!(
                "round {} {}: {} updates; hospitals' held-out loss {}, macro AUROC {}",
                record.round,
                record.outcome,
                record.accepted.len(),
                eval.map_or("-".into(), |e| format!("{:.4}", e.loss)),
                eval.and_then(|e| e.metrics.get("auroc_macro"))
                    .map_or("-".into(), |v| format!("{v:.3}")),
            );
        }
        _ => {}
    });
    let mut policy = fedcore::RunPolicy::deployment(Duration::from_secs(a.wait));
    if let Some(d) = &dashboard {
        // An admin's "stop" on the page ends the run after its round.
        policy = policy.with_stop(d.shared.stop.clone());
    }
    if let Some(n) = a.start_with.filter(|_| server.next_round() == 1) {
        use fedcore::Transport;
        let deadline = std::time::Instant::now() + Duration::from_secs(a.wait);
        while server.transport().clients().len() < n {
            if std::time::Instant::now() > deadline {
                bail!(
                    "{} of the {n} hospitals of --start-with connected within --wait",
                    server.transport().clients().len()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let report = net::run_server(&mut server, &policy);
    if let Some(d) = &dashboard {
        let rounds = server.history().len() as u64;
        d.shared.end(
            report
                .as_ref()
                .map(|_| rounds)
                .map_err(|e| format!("{e:#}")),
        );
        d.finish(report.as_ref().map(|r| r.end).map_err(|e| format!("{e:#}")));
    }
    let report = report?;
    println!(
        "run {}: {} rounds; checkpoints in {}",
        if report.end == fedcore::RunEnd::Completed {
            "complete"
        } else {
            "stopped"
        },
        server.history().len(),
        checkpoints.display()
    );
    if let Some(d) = dashboard {
        d.serve_until_ctrl_c()?;
    }
    Ok(())
}

/// Serves one hospital until the server says the run is complete.
pub fn client_cmd(a: &ClientArgs) -> Result<()> {
    if a.encrypt == Encrypt::All && a.dp.mode == DpMode::Client {
        bail!(
            "--dp client with --encrypt all is not supported: client-level DP runs on the part of \
             the update that travels in the clear, and with --encrypt all nothing does (--dp sample works)"
        );
    }
    let kit = Kit::load(&a.kit)?;
    let identity = kit.info.identity.clone();
    // Multiparty keys are checked before any data is touched.
    let multiparty = if crate::he_keys::kit::is_multiparty(&kit.dir) {
        let whole = crate::he_keys::kit::is_whole(&kit.dir)?;
        if (a.encrypt == Encrypt::All) != whole {
            bail!(
                "this kit's multiparty keys seal {}: run with --encrypt {} (provision --encrypt decides)",
                if whole { "whole updates" } else { "the head" },
                if whole { "all" } else { "head" }
            );
        }
        Some(crate::he_keys::kit::hospital(&kit.dir, &identity)?)
    } else {
        None
    };
    let root = match &a.data_dir {
        Some(d) => d.clone(),
        None => {
            let dir = a.work_dir.join(format!("{identity}-data"));
            if !dir.join("test_list.txt").exists() {
                // Each hospital its own patients: the seed follows the identity.
                let seed = identity
                    .bytes()
                    .fold(a.seed, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
                let config = SyntheticXrays {
                    patients: a.patients,
                    size: a.image_size.max(64),
                    seed,
                    ..SyntheticXrays::default()
                };
                let s = write_synthetic_chestxray(&dir, &config)?;
                println!(
                    "{identity}: synthetic set of {} images in {}",
                    s.images,
                    dir.display()
                );
            }
            dir
        }
    };
    let mut ds = ChestXray14::open(&root, image_config(a.image_size))
        .with_context(|| format!("ChestX-ray14 layout in {}", root.display()))?;
    ds.retain_present();
    let train = ds.official_split("train_val_list.txt")?;
    let test = ds.official_split("test_list.txt")?;
    if train.is_empty() || test.is_empty() {
        bail!(
            "{}: needs images in both train_val_list.txt and test_list.txt",
            root.display()
        );
    }
    println!(
        "{identity}: {} training and {} held-out images",
        train.len(),
        test.len()
    );
    let ds: std::sync::Arc<dyn ImageDataset> = std::sync::Arc::new(ds);
    let mut model = densenet(a.seed)?;
    a.trainable.apply(&mut model)?;
    let dp_tensors = dp_tensors(&model);
    check_client_dp(&a.dp, &dp_tensors)?;
    let (train, test) = (
        DataSplit::subset(ds.clone(), train)?,
        DataSplit::subset(ds, test)?,
    );
    let settings = DpSettings {
        dp: a.dp,
        rounds: a.dp_rounds,
    };
    let ledger = a.work_dir.join(format!("{identity}-dp-ledger.json"));
    let (epsilon, delta, rounds) = (a.dp.epsilon, a.dp.delta, a.dp_rounds);
    match a.dp.mode {
        DpMode::Sample => {
            let images = train.len();
            let model = PersistedDpSgd::open(&identity, model, images, settings, ledger)?;
            println!(
                "{identity}: DP-SGD on each image, epsilon {epsilon} over {rounds} rounds (delta {delta})"
            );
            serve(
                a,
                &kit,
                ModelClient::new(identity.clone(), model, train).with_test_data(test),
                multiparty,
            )
        }
        DpMode::Client => {
            let dp = PersistedDp::open(&identity, &dp_tensors, settings, ledger)?;
            println!(
                "{identity}: client-level DP on the body, epsilon {epsilon} over {rounds} rounds (delta {delta})"
            );
            let client = ModelClient::new(identity.clone(), model, train)
                .with_test_data(test)
                .with_mechanism(dp);
            serve(a, &kit, client, multiparty)
        }
        DpMode::Off => serve(
            a,
            &kit,
            ModelClient::new(identity.clone(), model, train).with_test_data(test),
            multiparty,
        ),
    }
}

/// Seals what the server asks sealed, then serves the run to its end.
fn serve<M>(
    a: &ClientArgs,
    kit: &Kit,
    client: ModelClient<M>,
    multiparty: Option<crate::he_keys::kit::HospitalKeys>,
) -> Result<()>
where
    M: Model<Data = DataSplit> + 'static,
{
    let identity = kit.info.identity.clone();
    let mut client = client;
    let secret_key = kit.dir.join(KeyAuthority::SECRET_FILE);
    if let Some(keys) = multiparty {
        // It uploads under the collective key, answers the key switch with
        // its share, and opens the global with the output key.
        println!(
            "{identity}: multiparty keys, collective key {}",
            key_id_hex(keys.view.key_id)
        );
        if let Some(r) = &keys.view.roster {
            println!("{identity}: {r}");
        }
        client = client
            .with_sealer(keys.sealer)
            .with_responder(keys.switcher);
    } else if secret_key.exists() {
        // It seals what the server sends sealed (the head, or everything)
        // and, when it agreed to the encrypted geometric median, decrypts
        // the distances.
        let secret = CkksContext::<Secret>::from_file(&secret_key)?;
        client = client.with_sealer(CkksSealer::new(secret.clone()));
        if a.encrypt == Encrypt::All {
            client = client.with_responder(DistanceDecryptor::new(secret)?);
        }
    } else if a.encrypt == Encrypt::All {
        bail!(
            "--encrypt all needs the CKKS secret key in the kit ({} is missing)",
            secret_key.display()
        );
    }
    let options = ClientOptions {
        address: a.server.clone(),
        limits: limits(a.max_message_bytes),
        give_up_after: a.give_up_after.map(Duration::from_secs),
        ..ClientOptions::default()
    };
    let dashboard = match a.dashboard {
        Some(at) => Some(HospitalDashboard::start(
            a,
            at,
            &identity,
            secret_key.exists(),
        )?),
        None => None,
    };
    match &dashboard {
        Some(d) => net::run_client(
            kit,
            FeedsInference {
                client,
                predictor: d.predictor.clone(),
            },
            &options,
        ),
        None => net::run_client(kit, client, &options),
    }
    .with_context(|| format!("hospital `{identity}`"))?;
    println!("{identity}: the run is complete");
    if let Some(d) = dashboard {
        serve_until_ctrl_c(&d.rt, d.task)?;
    }
    Ok(())
}
