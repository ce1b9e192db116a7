//! `hospital`: federated chest X-ray training across simulated hospitals,
//! with the dashboard served while it trains.
//!
//! ```text
//! hospital simulate                       # 3 hospitals, DenseNet-121, HE head, DP body, GM
//! hospital simulate --aggregator krum --clients 5 --byzantine 2
//! hospital simulate --data-dir ../shared/data/chestxray14 --image-size 224
//!
//! hospital provision --out project --hospitals 3 --host aggregator.example.org
//! hospital server --kit project/server --rounds 20            # the aggregator
//! hospital client --kit project/hospital-1 --data-dir /data   # each hospital
//!
//! hospital provision --out project --keys multiparty          # no shared secret:
//! hospital keygen --kit project/hospital-1                    # each hospital its share
//! hospital provision --out project --keys multiparty --threshold 2   # any 2 switch
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use fedcore_hospital::infer::Predictor;
use fedcore_hospital::jobs::{JobOptions, JobQueue};
use fedcore_hospital::live::Shared;
use fedcore_hospital::sim::SimConfig;
use fedcore_hospital::web::{self, WebConfig};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Federated chest X-ray training across simulated hospitals"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the federated simulation and serve the dashboard while it trains.
    Simulate(SimulateArgs),
    /// Create startup kits (project CA, certificates, CKKS keys) for a deployment.
    Provision(fedcore_hospital::deploy::ProvisionArgs),
    /// Run the aggregation server of a deployment (gRPC over mutual TLS).
    Server(fedcore_hospital::deploy::ServerArgs),
    /// Run one hospital of a deployment: it dials the server and trains on its own data.
    Client(fedcore_hospital::deploy::ClientArgs),
    /// Make a hospital's share of multiparty CKKS keys (kits provisioned
    /// with `--keys multiparty`) and write its key share for the server.
    Keygen(fedcore_hospital::deploy::KeygenArgs),
}

#[derive(clap::Args, Debug)]
struct SimulateArgs {
    #[command(flatten)]
    sim: SimConfig,
    /// Where the dashboard listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The dashboard sits behind a proxy that terminates TLS: allow a
    /// non-loopback `--listen` without `TLS_CERT`/`TLS_KEY`.
    #[arg(long)]
    behind_tls_proxy: bool,
    /// Train without serving the dashboard.
    #[arg(long)]
    no_dashboard: bool,
    /// Exit when training ends instead of serving the dashboard (and
    /// running the jobs queued on it) until Ctrl-C.
    #[arg(long)]
    exit_when_done: bool,
    /// The MNIST IDX files that MNIST jobs started from the dashboard train
    /// on (default: ../shared/data/mnist when it is there; without them the
    /// form offers no MNIST).
    #[arg(long)]
    mnist_dir: Option<PathBuf>,
    /// A ChestX-ray14 folder that jobs started from the dashboard may
    /// train on (the form offers it only when given).
    #[arg(long)]
    chestxray14_dir: Option<PathBuf>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,fedcore::server=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = match Cli::parse().command {
        Command::Simulate(a) => a,
        Command::Provision(a) => return fedcore_hospital::deploy::provision_cmd(&a),
        Command::Server(a) => return fedcore_hospital::deploy::server_cmd(&a),
        Command::Client(a) => return fedcore_hospital::deploy::client_cmd(&a),
        Command::Keygen(a) => return fedcore_hospital::deploy::keygen_cmd(&a),
    };
    let run_dir = args.sim.run_dir.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "runs/hospital-{}",
            fedcore_hospital::store::now_ms() / 1000
        ))
    });
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    args.sim.run_dir = Some(run_dir.clone());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(simulate(args, run_dir))
}

async fn simulate(args: SimulateArgs, run_dir: PathBuf) -> Result<()> {
    let s = &args.sim;
    println!(
        "fedcore hospital simulation: {} hospitals, {} rounds, DenseNet-121 (x^2 activation) at {}x{}, \
         {:?} on the body, encryption {}, DP {}, seed {}",
        s.clients,
        s.rounds,
        s.image_size,
        s.image_size,
        s.aggregator,
        match s.encrypt {
            fedcore_hospital::recipe::Encrypt::None => "off",
            fedcore_hospital::recipe::Encrypt::Head => "on the head (CKKS)",
            fedcore_hospital::recipe::Encrypt::All => "on the whole update (CKKS)",
        },
        match s.dp.mode {
            fedcore_hospital::recipe::DpMode::Off => "off".into(),
            fedcore_hospital::recipe::DpMode::Sample => format!(
                "DP-SGD on each image (epsilon {} per hospital, delta {})",
                s.dp.epsilon, s.dp.delta
            ),
            fedcore_hospital::recipe::DpMode::Client => format!(
                "client-level on the body update (epsilon {} per hospital, delta {})",
                s.dp.epsilon, s.dp.delta
            ),
        },
        s.seed
    );
    let config = WebConfig::from_env(&run_dir.join("dashboard.sqlite"))?;
    if !args.no_dashboard {
        // Before anything starts: no dashboard in the clear beyond loopback.
        web::check_exposure(args.listen, config.tls.is_some(), args.behind_tls_proxy)?;
    }
    let shared = Arc::new(Shared::default());
    let predictor = Arc::new(Predictor::new(s.image_size, s.seed));
    let mut state = web::state(&config, shared.clone(), predictor.clone()).await?;
    for (name, role, password) in web::bootstrap_users(&state.store).await? {
        println!(
            "created user {name:<7} ({}) with password {password}",
            role.as_str()
        );
    }
    let store = state.store.clone();
    let stale = store.recover_jobs().await?;
    if stale > 0 {
        println!(
            "{stale} job(s) left training by an earlier process are stopped (resume them on the runs page)"
        );
    }
    let mnist_dir = args.mnist_dir.clone().or_else(|| {
        let d = PathBuf::from("../shared/data/mnist");
        d.is_dir().then_some(d)
    });
    let queue = Arc::new(JobQueue::new(
        store.clone(),
        shared.clone(),
        predictor.clone(),
        JobOptions {
            root: run_dir.clone(),
            mnist_dir,
            chestxray14_dir: args.chestxray14_dir.clone(),
        },
    ));
    if args.exit_when_done || args.no_dashboard {
        // Nothing would run what the page queued.
        queue.refuse_new_jobs();
    }
    state.jobs = Some(queue.clone());
    let server = if args.no_dashboard {
        None
    } else {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let app = web::app(state);
        let tls = config.tls.clone();
        let listen = args.listen;
        let limits = config.server;
        let proxies = config.client_address.trusted_proxies.clone();
        let handle = tokio::spawn(async move {
            web::serve(app, listen, tls.as_ref(), limits, &proxies, tx).await
        });
        let addr = rx.await.context("the dashboard did not start")?;
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        println!("dashboard: {scheme}://{addr}/ (API docs at /docs)");
        Some(handle)
    };

    // Ctrl-C while training: finish the round (its checkpoint is written),
    // then stop; `--resume` (or resume on the runs page) continues it.
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let shared = shared.clone();
        let queue = queue.clone();
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("stopping after the current round (Ctrl-C)");
                interrupted.store(true, std::sync::atomic::Ordering::SeqCst);
                queue.close();
                shared.stop.stop();
            }
        });
    }
    // The command line's run is a job like the ones started on the page;
    // they wait in the queue until it ends.
    let job = queue
        .command_line_job(&args.sim, &run_dir, args.sim.resume)
        .await?;
    let outcome = queue.run(job).await?;
    match (&outcome.summary, &outcome.error) {
        (Some(s), None) => println!(
            "done: {} rounds; held-out loss {:.4} -> {:.4}, macro AUROC {} -> {}; {} update(s) not counted; run folder {}",
            s.rounds,
            s.initial.loss,
            s.last.loss,
            fmt_auroc(&s.initial),
            fmt_auroc(&s.last),
            s.rejected,
            s.run_dir.display()
        ),
        (_, Some(e)) => eprintln!("simulation failed: {e}"),
        (None, None) => {}
    }
    let interrupted = interrupted.load(std::sync::atomic::Ordering::SeqCst);
    if let Some(server) = server
        && !args.exit_when_done
        && !interrupted
    {
        println!(
            "training finished; the dashboard keeps serving and runs the jobs started on it (Ctrl-C to stop)"
        );
        let worker = tokio::spawn(queue.clone().work());
        tokio::select! {
            r = server => { r.context("dashboard task")??; }
            _ = tokio::signal::ctrl_c() => {
                eprintln!("stopping: the job training ends after its current round (Ctrl-C)");
                queue.close();
                shared.stop.stop();
                worker.await.context("job queue")??;
            }
        }
    }
    match outcome.error {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(()),
    }
}

fn fmt_auroc(e: &fedcore::Evaluation) -> String {
    e.metrics
        .get("auroc_macro")
        .map_or("-".into(), |v| format!("{v:.3}"))
}
