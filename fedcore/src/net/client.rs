//! The client side: a site's process dials the server, keeps its session,
//! trains when asked and reconnects when the connection drops.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};
use tracing::{info, warn};

use super::proto::federation_client::FederationClient;
use super::proto::{self, client_message, server_message};
use super::provision::{Kit, Role};
use super::wire::{self, Assembler, PROTOCOL, Plan};
use super::{Limits, now_ms};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::transport::{Failure, Reply, Task};

/// Settings of a client's connection.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Dial this `host:port` instead of the kit's server address (the
    /// server's certificate is still checked against the kit's server name).
    pub address: Option<String>,
    /// Message and payload limits.
    pub limits: Limits,
    /// How often to send a heartbeat.
    pub heartbeat: Duration,
    /// With no message from the server for this long, reconnect.
    pub liveness: Duration,
    /// The first wait before reconnecting; doubled after each failure.
    pub backoff_initial: Duration,
    /// The longest wait between attempts.
    pub backoff_max: Duration,
    /// Give up when no session could be held for this long (`None`: never).
    pub give_up_after: Option<Duration>,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            address: None,
            limits: Limits::default(),
            heartbeat: Duration::from_secs(2),
            liveness: Duration::from_secs(10),
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(15),
            give_up_after: None,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// A mutually authenticated gRPC channel to the server of `kit`.
pub async fn connect(kit: &Kit, options: &ClientOptions) -> Result<FederationClient<Channel>> {
    let address = options
        .address
        .clone()
        .unwrap_or_else(|| kit.info.server_address.clone());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&kit.ca_pem))
        .identity(Identity::from_pem(&kit.cert_pem, &kit.key_pem))
        .domain_name(kit.info.server_name.clone());
    let limits = &options.limits;
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| Error::InvalidConfig(format!("server address `{address}`: {e}")))?
        .tls_config(tls)
        .map_err(|e| Error::Transport(format!("TLS configuration: {e}")))?
        .connect_timeout(options.connect_timeout)
        .initial_stream_window_size(Some(limits.window_bytes))
        .initial_connection_window_size(Some(limits.window_bytes))
        .http2_keep_alive_interval(options.heartbeat)
        .keep_alive_timeout(options.liveness)
        .connect()
        .await
        .map_err(|e| {
            Error::Transport(format!("cannot connect to {address}: {}", error_chain(&e)))
        })?;
    Ok(FederationClient::new(channel)
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes))
}

/// Opens a session with the server of `kit`: connects with mutual TLS and
/// says hello. Returns where to send the client's messages and the server's
/// stream, whose first message is the `Welcome`. [`run_client`] is built on
/// it; use it directly for a client of your own (or a test that speaks the
/// protocol by hand). A connection that fails is `Unavailable`; a refusal
/// keeps the server's code (`PermissionDenied` for a revoked or unknown site).
///
/// Public only through `net::testkit` (feature `testkit`).
pub async fn open_session(
    kit: &Kit,
    options: &ClientOptions,
) -> std::result::Result<
    (
        mpsc::Sender<proto::ClientMessage>,
        Streaming<proto::ServerMessage>,
    ),
    Status,
> {
    let mut grpc = connect(kit, options)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (out, out_rx) = mpsc::channel(16);
    let hello = client_msg(client_message::Kind::Hello(proto::Hello {
        identity: kit.info.identity.clone(),
        protocol: PROTOCOL,
        max_message_bytes: options.limits.max_message_bytes as u64,
    }));
    out.send(hello)
        .await
        .map_err(|_| Status::unavailable("session closed"))?;
    let inbound = grpc
        .session(ReceiverStream::new(out_rx))
        .await?
        .into_inner();
    Ok((out, inbound))
}

/// An error with its sources (TLS alerts hide two levels down).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

struct Job {
    session: u64,
    task_id: u64,
    task: Task,
}

struct Done {
    session: u64,
    task_id: u64,
    reply: std::result::Result<Reply, Failure>,
}

enum End {
    /// The server finished the run.
    Finished,
    /// The server refused this client: do not retry.
    Refused(String),
    /// The connection failed or dropped; `held` when a session was established.
    Lost {
        reason: String,
        held: Option<Duration>,
    },
}

/// Serves `client` to the server of `kit` until the server says the run is
/// finished. Reconnects with exponential backoff when the connection drops
/// (a task in progress is then abandoned: the server counted it as a
/// dropout). Returns an error when the server refuses this site (revoked,
/// not on the roster) or when `give_up_after` passes without a session.
pub fn run_client<C: Client + 'static>(
    kit: &Kit,
    client: C,
    options: &ClientOptions,
) -> Result<()> {
    if kit.info.role != Role::Client {
        return Err(Error::InvalidConfig(format!(
            "{} is not a site kit",
            kit.dir.display()
        )));
    }
    if client.id().as_str() != kit.info.identity {
        return Err(Error::InvalidConfig(format!(
            "the client is `{}` but the kit belongs to `{}`",
            client.id(),
            kit.info.identity
        )));
    }
    options.limits.check()?;
    super::check_timing(options.heartbeat, options.liveness)?;
    // The model works on its own thread; results come back tagged with the
    // session they belong to, so that a reconnect drops stale ones.
    let (jobs_tx, jobs_rx) = std_mpsc::channel::<Job>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    // The session whose jobs are worth running; jobs of a session that has
    // ended are skipped (the server already counted them as dropouts).
    let current = Arc::new(AtomicU64::new(0));
    let worker_current = current.clone();
    let worker = std::thread::Builder::new()
        .name(format!("fedcore-client-{}", kit.info.identity))
        .spawn(move || {
            let mut client = client;
            for job in jobs_rx {
                if job.session != worker_current.load(Ordering::SeqCst) {
                    continue;
                }
                let reply = crate::memory::run(&mut client, &job.task);
                if done_tx
                    .send(Done {
                        session: job.session,
                        task_id: job.task_id,
                        reply,
                    })
                    .is_err()
                {
                    break;
                }
            }
        })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fedcore-net-client")
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let mut delay = options.backoff_initial;
        let mut last_held = Instant::now();
        let mut session = 0u64;
        loop {
            session += 1;
            current.store(session, Ordering::SeqCst);
            let end = run_session(kit, options, session, &jobs_tx, &mut done_rx).await;
            current.store(0, Ordering::SeqCst);
            match end {
                End::Finished => return Ok(()),
                End::Refused(r) => return Err(Error::Transport(format!("refused by the server: {r}"))),
                End::Lost { reason, held } => {
                    if let Some(lasted) = held {
                        last_held = Instant::now();
                        // Only a session that lasted resets the backoff, so
                        // that two processes sharing one kit (each replacing
                        // the other's session) slow down.
                        if lasted >= options.liveness {
                            delay = options.backoff_initial;
                        }
                    }
                    if let Some(limit) = options.give_up_after
                        && last_held.elapsed() > limit
                    {
                        return Err(Error::Transport(format!(
                            "gave up after {} s without a session: {reason}",
                            limit.as_secs()
                        )));
                    }
                    // Up to 25 % jitter so that sites do not reconnect in lockstep.
                    let jitter = delay.mul_f64(rand::random::<f64>() * 0.25);
                    warn!(reason = %reason, retry_in_ms = (delay + jitter).as_millis() as u64, "connection lost");
                    tokio::time::sleep(delay + jitter).await;
                    delay = (delay * 2).min(options.backoff_max);
                }
            }
        }
    });
    drop(jobs_tx);
    drop(done_rx);
    drop(runtime);
    // The worker skips what is queued and ends once its current job (if
    // any) is done.
    let _ = worker.join();
    result
}

fn client_msg(kind: client_message::Kind) -> proto::ClientMessage {
    proto::ClientMessage { kind: Some(kind) }
}

type OutTx = mpsc::Sender<proto::ClientMessage>;

async fn run_session(
    kit: &Kit,
    options: &ClientOptions,
    session: u64,
    jobs: &std_mpsc::Sender<Job>,
    done: &mut mpsc::UnboundedReceiver<Done>,
) -> End {
    let lost = |reason: String| End::Lost { reason, held: None };
    let (out, mut inbound) = match open_session(kit, options).await {
        Ok(s) => s,
        Err(s)
            if matches!(
                s.code(),
                Code::PermissionDenied | Code::Unauthenticated | Code::FailedPrecondition
            ) =>
        {
            return End::Refused(s.message().to_owned());
        }
        Err(s) => return lost(format!("{}: {}", s.code(), error_chain(&s))),
    };
    let mut liveness = options.liveness;
    let mut heartbeat = options.heartbeat;
    let mut chunk_bytes = options.limits.chunk_bytes;
    match tokio::time::timeout(options.connect_timeout, inbound.message()).await {
        Ok(Ok(Some(proto::ServerMessage {
            kind: Some(server_message::Kind::Welcome(w)),
        }))) if w.identity == kit.info.identity => {
            info!(server = %kit.info.server_address, identity = %w.identity, "session established");
            // Follow the server's pace and chunk size: a server that sends
            // heartbeats every 15 s must not look dead after 10.
            liveness = liveness.max(Duration::from_millis(w.heartbeat_ms.saturating_mul(3)));
            if w.chunk_bytes > 0 {
                chunk_bytes = chunk_bytes.min(w.chunk_bytes as usize);
            }
            // And heartbeats often enough for the server's liveness.
            if w.liveness_ms > 0 {
                heartbeat = heartbeat
                    .min(Duration::from_millis(w.liveness_ms / 3).max(Duration::from_millis(10)));
            }
        }
        Ok(Ok(other)) => {
            return lost(format!(
                "unexpected first message from the server: {other:?}"
            ));
        }
        Ok(Err(s)) if s.code() == Code::PermissionDenied => {
            return End::Refused(s.message().to_owned());
        }
        Ok(Err(s)) => return lost(format!("{}: {}", s.code(), s.message())),
        Err(_) => return lost("no welcome from the server".into()),
    }
    let established = Instant::now();
    let lost_held = |reason: String| End::Lost {
        reason,
        held: Some(established.elapsed()),
    };
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    let mut receiving: Option<(proto::TaskHeader, Plan, Assembler)> = None;
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return lost_held("the server closed the session".into()),
                    Err(s) if s.code() == Code::PermissionDenied => return End::Refused(s.message().to_owned()),
                    Err(s) => return lost_held(format!("{}: {}", s.code(), s.message())),
                };
                last_seen = Instant::now();
                match on_message(msg, options, &mut receiving) {
                    Ok(Some(Event::Task(task_id, task))) => {
                        if jobs.send(Job { session, task_id, task }).is_err() {
                            return lost_held("the model's worker stopped".into());
                        }
                    }
                    Ok(Some(Event::Shutdown(s))) if s.finished => {
                        info!(reason = %s.reason, "the server finished the run");
                        return End::Finished;
                    }
                    Ok(Some(Event::Shutdown(s))) => return lost_held(format!("server going away: {}", s.reason)),
                    Ok(None) => {}
                    Err(e) => return lost_held(format!("protocol error: {e}")),
                }
            }
            d = done.recv() => {
                let Some(d) = d else { return lost_held("the model's worker stopped".into()) };
                if d.session != session {
                    continue; // a task of an earlier session: the server gave up on it
                }
                if let Err(e) = send_reply(&out, d, chunk_bytes).await {
                    return lost_held(e);
                }
                // The server took the whole reply, so it is alive, even if its
                // heartbeats wait unread while a large reply was going out.
                last_seen = Instant::now();
            }
            _ = tick.tick() => {
                if last_seen.elapsed() > liveness {
                    return lost_held(format!("no message from the server for {} ms", last_seen.elapsed().as_millis()));
                }
                let _ = out.try_send(client_msg(client_message::Kind::Heartbeat(proto::Heartbeat { sent_at_ms: now_ms() })));
            }
        }
    }
}

enum Event {
    Task(u64, Task),
    Shutdown(proto::Shutdown),
}

fn on_message(
    msg: proto::ServerMessage,
    options: &ClientOptions,
    receiving: &mut Option<(proto::TaskHeader, Plan, Assembler)>,
) -> Result<Option<Event>> {
    match msg.kind {
        None | Some(server_message::Kind::Welcome(_)) => {
            Err(Error::Transport("unexpected message".into()))
        }
        Some(server_message::Kind::Heartbeat(_)) => Ok(None),
        Some(server_message::Kind::Shutdown(s)) => Ok(Some(Event::Shutdown(s))),
        Some(server_message::Kind::Task(h)) => {
            if receiving.is_some() {
                return Err(Error::Transport(
                    "a task started before the previous one finished".into(),
                ));
            }
            let plan = Plan::of_task(&h)?;
            let assembler = plan.assembler(h.task_id, options.limits.max_payload_bytes)?;
            *receiving = Some((h, plan, assembler));
            Ok(complete(receiving)?.map(|(id, t)| Event::Task(id, t)))
        }
        Some(server_message::Kind::Chunk(c)) => {
            let (_, _, assembler) = receiving
                .as_mut()
                .ok_or_else(|| Error::Transport("a chunk outside a task".into()))?;
            assembler.push(&c)?;
            Ok(complete(receiving)?.map(|(id, t)| Event::Task(id, t)))
        }
    }
}

fn complete(
    receiving: &mut Option<(proto::TaskHeader, Plan, Assembler)>,
) -> Result<Option<(u64, Task)>> {
    if !receiving.as_ref().is_some_and(|r| r.2.is_complete()) {
        return Ok(None);
    }
    let Some((header, plan, assembler)) = receiving.take() else {
        return Ok(None);
    };
    let task = wire::decode_task(&header, plan, assembler)?;
    Ok(Some((header.task_id, task)))
}

async fn send_reply(
    out: &OutTx,
    done: Done,
    chunk_bytes: usize,
) -> std::result::Result<(), String> {
    let closed = |_| "the session closed while sending a reply".to_owned();
    let message = match done.reply {
        Ok(reply) => wire::encode_reply(done.task_id, reply),
        Err(Failure::ClientError(m)) => Err(Error::Transport(m)),
        Err(f) => Err(Error::Transport(f.to_string())),
    };
    match message {
        Ok(o) => {
            out.send(client_msg(client_message::Kind::Reply(o.header)))
                .await
                .map_err(closed)?;
            for chunk in wire::chunks(done.task_id, &o.payload, chunk_bytes) {
                out.send(client_msg(client_message::Kind::Chunk(chunk)))
                    .await
                    .map_err(closed)?;
            }
        }
        Err(e) => {
            out.send(client_msg(client_message::Kind::Error(proto::TaskError {
                task_id: done.task_id,
                message: match e {
                    Error::Transport(m) => m,
                    e => e.to_string(),
                },
            })))
            .await
            .map_err(closed)?;
        }
    }
    Ok(())
}
