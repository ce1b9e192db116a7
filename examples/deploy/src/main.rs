//! `fedcore-deploy`: provision a project, run its server and its sites as
//! separate processes over gRPC with mutual TLS, on a tiny softmax model.
//!
//! ```text
//! fedcore-deploy provision --out project --sites hospital-1,hospital-2,hospital-3
//! fedcore-deploy server --kit project/server --rounds 5 --checkpoint-dir run
//! fedcore-deploy client --kit project/hospital-1      # on each site
//! fedcore-deploy rotate --project project hospital-2  # new certificate, old one revoked
//! fedcore-deploy revoke --project project hospital-3  # refused from its next check
//! ```
//!
//! The server prints one line per event on stdout (`listening on ...`,
//! `round 3 started ...`, `round 3 finished ...`); logs go to stderr.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
use fedcore::net::provision::{Kit, Project, ProjectSpec};
use fedcore::net::{self, ClientOptions, GrpcTransport, Limits, ServerOptions};
use fedcore::{
    Client, ClientUpdate, EvaluateIns, Evaluation, FedAvg, FitIns, Model, ModelClient,
    RoundOutcome, Server, ServerConfig, ServerEvent,
};

const DIM: usize = 8;
const CLASSES: usize = 4;

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the project CA and one startup kit for the server and per site.
    Provision {
        /// The project folder to create.
        #[arg(long)]
        out: PathBuf,
        /// The sites' identities, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        sites: Vec<String>,
        /// The server's host names / IP addresses (the first is what sites dial).
        #[arg(long = "host", default_values = ["localhost", "127.0.0.1"])]
        hosts: Vec<String>,
        /// The server's port.
        #[arg(long, default_value_t = 50051)]
        port: u16,
        /// The project's name.
        #[arg(long, default_value = "fedcore")]
        project: String,
    },
    /// Issue a certificate and kit for a new site.
    AddSite {
        /// The project folder.
        #[arg(long)]
        project: PathBuf,
        /// The site's identity.
        site: String,
    },
    /// Issue a new certificate for a site and revoke its previous ones.
    Rotate {
        /// The project folder.
        #[arg(long)]
        project: PathBuf,
        /// The site's identity.
        site: String,
    },
    /// Revoke every certificate of a site (the running server picks it up).
    Revoke {
        /// The project folder.
        #[arg(long)]
        project: PathBuf,
        /// The site's identity.
        site: String,
    },
    /// Run the aggregation server.
    Server(ServerArgs),
    /// Run a site.
    Client(ClientArgs),
}

#[derive(Args)]
struct Wire {
    /// The largest gRPC message accepted, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    max_message_bytes: usize,
    /// Payload bytes per chunk.
    #[arg(long, default_value_t = 1 << 20)]
    chunk_bytes: usize,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 2000)]
    heartbeat_ms: u64,
}

/// How long the server waits for a site that dropped (seconds; 0: its
/// task fails at once) and how the round's deadline grows with the model.
#[derive(Args)]
struct Patience {
    /// Seconds a site whose connection dropped has to come back and resume.
    #[arg(long, default_value_t = 60)]
    resume_window: u64,
    /// Seconds added to the round's wait per megabyte of the model.
    #[arg(long, default_value_t = 0)]
    round_timeout_per_mb: u64,
}

impl Wire {
    fn limits(&self) -> Limits {
        Limits {
            max_message_bytes: self.max_message_bytes,
            chunk_bytes: self.chunk_bytes,
            ..Limits::default()
        }
    }

    fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}

#[derive(Args)]
struct ServerArgs {
    /// The server's startup kit.
    #[arg(long)]
    kit: PathBuf,
    /// Listen here instead of on the kit's port (port 0: any free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Rounds in total (a resumed run counts those already done).
    #[arg(long, default_value_t = 5)]
    rounds: u64,
    /// The quorum: valid updates a round needs.
    #[arg(long, default_value_t = 2)]
    min_clients: usize,
    /// Clients that must be connected for a round to start.
    #[arg(long, default_value_t = 2)]
    min_available: usize,
    /// Seconds a round waits for replies.
    #[arg(long, default_value_t = 30)]
    round_timeout: u64,
    /// Seconds to wait for enough clients before a round.
    #[arg(long, default_value_t = 600)]
    wait: u64,
    /// Checkpoints; when it holds one, the run resumes from it.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Seconds to wait after the last round for sites that are away to
    /// come back and hear that the run is finished.
    #[arg(long, default_value_t = 20)]
    finish_grace: u64,
    #[command(flatten)]
    wire: Wire,
    #[command(flatten)]
    patience: Patience,
}

#[derive(Args)]
struct ClientArgs {
    /// The site's startup kit.
    #[arg(long)]
    kit: PathBuf,
    /// Dial this `host:port` instead of the kit's server address.
    #[arg(long)]
    server: Option<String>,
    /// Training examples at this site.
    #[arg(long, default_value_t = 200)]
    examples: usize,
    /// Extra milliseconds each local training takes (to simulate a slow site).
    #[arg(long, default_value_t = 0)]
    fit_delay_ms: u64,
    /// Give up after this many seconds without a session (default: never).
    #[arg(long)]
    give_up_after: Option<u64>,
    #[command(flatten)]
    wire: Wire,
}

/// A site's model client, optionally slowed down.
struct Site {
    inner: ModelClient<SoftmaxRegression>,
    delay: Duration,
}

impl Client for Site {
    fn id(&self) -> &fedcore::ClientId {
        self.inner.id()
    }

    fn fit(&mut self, ins: &FitIns) -> fedcore::Result<ClientUpdate> {
        std::thread::sleep(self.delay);
        self.inner.fit(ins)
    }

    fn evaluate(&mut self, ins: &EvaluateIns) -> fedcore::Result<Evaluation> {
        self.inner.evaluate(ins)
    }
}

/// A stable per-site data seed sharing the task's centres (see `synthetic_blobs`).
fn site_seed(identity: &str) -> u64 {
    let h = identity.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    (1 << 16) | (h & 0xffff)
}

fn print_event(event: &ServerEvent) {
    match event {
        ServerEvent::RoundStarted { round, sampled } => {
            let sampled: Vec<&str> = sampled.iter().map(|c| c.as_str()).collect();
            println!("round {round} started sampled={}", sampled.join(","));
        }
        ServerEvent::RoundFinished { record } | ServerEvent::RoundFailed { record, .. } => {
            let accepted: Vec<&str> = record.accepted.iter().map(|a| a.client.as_str()).collect();
            let failed: Vec<String> = record
                .failures
                .iter()
                .map(|f| format!("{}({})", f.client, f.reason))
                .collect();
            let status = if record.outcome == RoundOutcome::Completed {
                "finished"
            } else {
                "failed"
            };
            let accuracy = record
                .evaluation
                .as_ref()
                .and_then(|e| e.metrics.get("accuracy"))
                .map_or(String::new(), |a| format!(" accuracy={a:.3}"));
            println!(
                "round {} {status} accepted={} failed={}{accuracy}",
                record.round,
                accepted.join(","),
                failed.join(";")
            );
        }
        _ => {}
    }
}

fn server(args: ServerArgs) -> Result<()> {
    let kit = Kit::load(&args.kit)?;
    let options = ServerOptions {
        listen: args.listen,
        limits: args.wire.limits(),
        heartbeat: args.wire.heartbeat(),
        liveness: args.wire.heartbeat() * 5,
        resume_window: Duration::from_secs(args.patience.resume_window),
        finish_grace: Duration::from_secs(args.finish_grace),
        ..ServerOptions::default()
    };
    let transport = GrpcTransport::start(&kit, options)?;
    println!("listening on {}", transport.local_addr());
    let config = ServerConfig {
        rounds: args.rounds,
        min_fit_clients: args.min_clients,
        min_available_clients: args.min_available,
        round_timeout: Duration::from_secs(args.round_timeout),
        round_timeout_per_mb: Duration::from_secs(args.patience.round_timeout_per_mb),
        seed: 7,
        checkpoint_dir: args.checkpoint_dir.clone(),
        ..ServerConfig::default()
    };
    let template = SoftmaxRegression::new(DIM, CLASSES).parameters();
    let resume = args
        .checkpoint_dir
        .as_ref()
        .is_some_and(|d| d.join("state.json").exists());
    let mut server = if resume {
        let s = Server::resume(config, template, transport, FedAvg)?;
        println!("resumed at round {}", s.next_round());
        s
    } else {
        Server::new(config, template, transport, FedAvg)?
    };
    let test = synthetic_blobs((1 << 16) | 0xfffe, 400, DIM, CLASSES, 2.0);
    let mut model = SoftmaxRegression::new(DIM, CLASSES);
    server.set_evaluator(move |p| {
        model.set_parameters(p)?;
        model.evaluate(&test)
    });
    server.subscribe(print_event);
    let report = net::run_server(
        &mut server,
        &fedcore::RunPolicy::deployment(Duration::from_secs(args.wait)),
    )?;
    println!(
        "run complete: {} rounds ({} completed, {} failed in this process)",
        server.history().len(),
        report.completed,
        report.failed
    );
    Ok(())
}

fn client(args: ClientArgs) -> Result<()> {
    let kit = Kit::load(&args.kit)?;
    let identity = kit.info.identity.clone();
    let data = synthetic_blobs(site_seed(&identity), args.examples, DIM, CLASSES, 2.0);
    let site = Site {
        inner: ModelClient::new(identity.clone(), SoftmaxRegression::new(DIM, CLASSES), data),
        delay: Duration::from_millis(args.fit_delay_ms),
    };
    let options = ClientOptions {
        address: args.server,
        limits: args.wire.limits(),
        heartbeat: args.wire.heartbeat(),
        liveness: args.wire.heartbeat() * 5,
        give_up_after: args.give_up_after.map(Duration::from_secs),
        ..ClientOptions::default()
    };
    net::run_client(&kit, site, &options).with_context(|| format!("site `{identity}`"))?;
    println!("{identity}: the run is complete");
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Provision {
            out,
            sites,
            hosts,
            port,
            project,
        } => {
            let spec = ProjectSpec {
                server_hosts: hosts,
                ..ProjectSpec::new(project, sites, port)
            };
            let p = Project::create(&out, &spec)?;
            println!(
                "project in {}: server kit {}",
                out.display(),
                p.server_kit().display()
            );
        }
        Command::AddSite { project, site } => {
            let dir = Project::open(project).issue_site(&site, false)?;
            println!("kit for `{site}` in {}", dir.display());
        }
        Command::Rotate { project, site } => {
            let dir = Project::open(project).issue_site(&site, true)?;
            println!(
                "new kit for `{site}` in {}; its previous certificates are revoked",
                dir.display()
            );
        }
        Command::Revoke { project, site } => {
            let n = Project::open(project).revoke_site(&site)?;
            println!("revoked {n} certificate(s) of `{site}`");
        }
        Command::Server(a) => server(a)?,
        Command::Client(a) => client(a)?,
    }
    Ok(())
}
