//! The client side: a site's process dials the server, keeps its session,
//! trains when asked and reconnects when the connection drops.

use std::collections::BTreeSet;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status, Streaming};
use tracing::{info, warn};

use super::caps::{Progress, Tracked};
use super::proto::federation_client::FederationClient;
use super::proto::{self, client_message, server_message};
use super::provision::{Kit, Role};
use super::wire::{self, Assembler, Outgoing, PROTOCOL, Plan};
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
    /// With no byte from the server for this long, reconnect (progress,
    /// not whole messages: a download that takes minutes per chunk on a
    /// slow link is alive while its bytes flow).
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A mutually authenticated gRPC channel to the server of `kit`.
#[cfg(feature = "testkit")]
pub async fn connect(kit: &Kit, options: &ClientOptions) -> Result<FederationClient<Channel>> {
    Ok(connect_tracked(kit, options).await?.0)
}

/// [`connect`], with the connection's byte counts.
async fn connect_tracked(
    kit: &Kit,
    options: &ClientOptions,
) -> Result<(FederationClient<Channel>, Arc<Progress>)> {
    let address = options
        .address
        .clone()
        .unwrap_or_else(|| kit.info.server_address.clone());
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&kit.ca_pem))
        .identity(Identity::from_pem(&kit.cert_pem, &kit.key_pem))
        .domain_name(kit.info.server_name.clone());
    let limits = &options.limits;
    // Also for the testkit's `connect`: an HTTP/2 setting out of range
    // would panic in h2 instead of being a clear error.
    limits.check()?;
    // Our own TCP connector (tonic puts TLS over it) so that the session
    // sees the connection's bytes. No HTTP/2 keepalive: on a slow link its
    // ping waits behind megabytes of data in the socket buffers and would
    // time out a link that is moving; the session's liveness is progress.
    let progress = Arc::new(Progress::default());
    let connector = {
        let progress = progress.clone();
        tower::service_fn(move |uri: http::Uri| {
            let progress = progress.clone();
            async move {
                let host = uri
                    .host()
                    .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_owned())
                    .ok_or_else(|| std::io::Error::other(format!("no host in `{uri}`")))?;
                let port = uri.port_u16().unwrap_or(443);
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(Tracked::new(tcp, progress)))
            }
        })
    };
    let channel = Endpoint::from_shared(format!("https://{address}"))
        .map_err(|e| Error::InvalidConfig(format!("server address `{address}`: {e}")))?
        .tls_config(tls)
        .map_err(|e| Error::Transport(format!("TLS configuration: {e}")))?
        .connect_timeout(options.connect_timeout)
        .initial_stream_window_size(Some(limits.window_bytes))
        .initial_connection_window_size(Some(limits.window_bytes))
        .max_frame_size(Some(limits.frame_bytes))
        .connect_with_connector(connector)
        .await
        .map_err(|e| {
            Error::Transport(format!("cannot connect to {address}: {}", error_chain(&e)))
        })?;
    let client = FederationClient::new(channel)
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    Ok((client, progress))
}

/// Opens a session with the server of `kit`: connects with mutual TLS and
/// says hello. Returns where to send the client's messages and the server's
/// stream, whose first message is the `Welcome`. [`run_client`] is built on
/// it; use it directly for a client of your own (or a test that speaks the
/// protocol by hand). A connection that fails is `Unavailable`; a refusal
/// keeps the server's code (`PermissionDenied` for a revoked or unknown site).
///
/// Public only through `net::testkit` (feature `testkit`).
#[cfg(feature = "testkit")]
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
    let (out, inbound, _) = open_session_holding(kit, options, Vec::new()).await?;
    Ok((out, inbound))
}

type Opened = (
    mpsc::Sender<proto::ClientMessage>,
    Streaming<proto::ServerMessage>,
    Arc<Progress>,
);

/// [`open_session`] for a client that holds tasks of an earlier session.
async fn open_session_holding(
    kit: &Kit,
    options: &ClientOptions,
    holding: Vec<proto::Holding>,
) -> std::result::Result<Opened, Status> {
    let (mut grpc, progress) = connect_tracked(kit, options)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let (out, out_rx) = mpsc::channel(16);
    let hello = client_msg(client_message::Kind::Hello(proto::Hello {
        identity: kit.info.identity.clone(),
        protocol: PROTOCOL,
        max_message_bytes: options.limits.max_message_bytes as u64,
        holding,
        encodings: crate::Encoding::KINDS.map(str::to_owned).to_vec(),
    }));
    out.send(hello)
        .await
        .map_err(|_| Status::unavailable("session closed"))?;
    let inbound = grpc
        .session(ReceiverStream::new(out_rx))
        .await?
        .into_inner();
    Ok((out, inbound, progress))
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
    task_id: u64,
    task: Task,
}

struct Done {
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

/// Tasks whose results are still wanted: received whole, being worked on,
/// or answered with a reply the server may not hold in full yet. A
/// reconnect keeps those the server resumes; the worker skips the others.
type Live = Arc<Mutex<BTreeSet<u64>>>;

/// Replies kept until a welcome settles them: a reply handed to the
/// connection may still sit in its buffers when the link drops, and on one
/// stream only the newest few can be incomplete at the server.
const REPLIES_KEPT: usize = 2;

/// Live tasks a hello lists (the server keeps at most 4 per site): the
/// newest; the older ones are given up.
const HOLDING_LISTED: usize = 4;

/// What a client keeps across sessions so that a dropped connection
/// resumes where it stopped instead of starting over.
#[derive(Default)]
struct Held {
    /// The task being downloaded, as far as it arrived.
    receiving: Option<(proto::TaskHeader, Plan, Assembler)>,
    /// The last replies sent (or being sent), oldest first, until a welcome
    /// says the server has them (the task is not resumed) or wants the rest.
    replies: Vec<Outgoing<proto::ReplyHeader>>,
}

impl Held {
    /// The hello's list: the partial download, then the newest live tasks
    /// (older ones leave `live`: the server has given up on them).
    fn holding(&self, live: &Live) -> Vec<proto::Holding> {
        let mut holding: Vec<proto::Holding> = self
            .receiving
            .iter()
            .map(|(h, _, a)| proto::Holding {
                task_id: h.task_id,
                received: a.received(),
                complete: false,
            })
            .collect();
        let mut live = lock(live);
        while live.len() > HOLDING_LISTED {
            live.pop_first();
        }
        holding.extend(live.iter().map(|&task_id| proto::Holding {
            task_id,
            received: 0,
            complete: true,
        }));
        holding
    }
}

/// Serves `client` to the server of `kit` until the server says the run is
/// finished. Reconnects with exponential backoff when the connection drops
/// and resumes what was in flight: the rest of a task's download from the
/// bytes that arrived, the task being worked on, the rest of a reply from
/// the bytes the server holds (as long as the server kept the task, see
/// [`super::ServerOptions::resume_window`]). Returns an error when the
/// server refuses this site (revoked, not on the roster) or when
/// `give_up_after` passes without a session.
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
    // The model works on its own thread; it skips tasks that are no longer
    // live (the server gave up on them while the client was away).
    let (jobs_tx, jobs_rx) = std_mpsc::channel::<Job>();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let live: Live = Arc::default();
    let worker_live = live.clone();
    let worker = std::thread::Builder::new()
        .name(format!("fedcore-client-{}", kit.info.identity))
        .spawn(move || {
            let mut client = client;
            for job in jobs_rx {
                if !lock(&worker_live).contains(&job.task_id) {
                    continue;
                }
                let reply = crate::memory::run(&mut client, &job.task);
                if done_tx
                    .send(Done {
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
        let mut held = Held::default();
        loop {
            let end = run_session(kit, options, &jobs_tx, &mut done_rx, &live, &mut held).await;
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
    lock(&live).clear();
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

/// The connection's side of a session: where to send, how the link moves.
struct Link<'a> {
    out: &'a OutTx,
    progress: &'a Progress,
    liveness: Duration,
    chunk_bytes: usize,
}

impl Link<'_> {
    /// Sends one message, waiting while the link moves (however slowly)
    /// and failing when no byte came from the server for `liveness` (the
    /// server's window updates are its reading of what we send).
    async fn send(&self, msg: proto::ClientMessage) -> std::result::Result<(), String> {
        loop {
            tokio::select! {
                permit = self.out.reserve() => {
                    let permit = permit.map_err(|_| "the session closed while sending".to_owned())?;
                    permit.send(msg);
                    return Ok(());
                }
                _ = tokio::time::sleep(self.liveness / 4) => {
                    let silent = self.progress.since_read();
                    if silent > self.liveness {
                        return Err(format!("the server took in nothing for {} ms", silent.as_millis()));
                    }
                }
            }
        }
    }

    /// Sends a reply: with its header from the start (`None`), or the rest
    /// of its payload from byte `from` (the server holds the header).
    async fn send_reply(
        &self,
        reply: &Outgoing<proto::ReplyHeader>,
        from: Option<u64>,
    ) -> std::result::Result<(), String> {
        let id = reply.header.task_id;
        if from.is_none() {
            self.send(client_msg(client_message::Kind::Reply(
                reply.header.clone(),
            )))
            .await?;
        }
        for chunk in wire::transfer_chunks(id, &reply.payload, self.chunk_bytes, from) {
            self.send(client_msg(client_message::Kind::Chunk(chunk)))
                .await?;
        }
        Ok(())
    }
}

async fn run_session(
    kit: &Kit,
    options: &ClientOptions,
    jobs: &std_mpsc::Sender<Job>,
    done: &mut mpsc::UnboundedReceiver<Done>,
    live: &Live,
    held: &mut Held,
) -> End {
    let lost = |reason: String| End::Lost { reason, held: None };
    let (out, mut inbound, progress) =
        match open_session_holding(kit, options, held.holding(live)).await {
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
    let resumed = match tokio::time::timeout(options.connect_timeout, inbound.message()).await {
        Ok(Ok(Some(proto::ServerMessage {
            kind: Some(server_message::Kind::Welcome(w)),
        }))) if w.identity == kit.info.identity => {
            info!(server = %kit.info.server_address, identity = %w.identity, resumed = w.resumed.len(), "session established");
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
            w.resumed
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
    };
    let established = Instant::now();
    let lost_held = |reason: String| End::Lost {
        reason,
        held: Some(established.elapsed()),
    };
    let link = Link {
        out: &out,
        progress: &progress,
        liveness,
        chunk_bytes,
    };
    // Keep what the server resumed, drop the rest (it gave up on it).
    let resumed_ids: BTreeSet<u64> = resumed.iter().map(|r| r.task_id).collect();
    lock(live).retain(|id| resumed_ids.contains(id));
    if held
        .receiving
        .as_ref()
        .is_some_and(|(h, _, _)| !resumed_ids.contains(&h.task_id))
    {
        held.receiving = None;
    }
    // Replies the server still waits for go out again (the rest, where it
    // holds the start), oldest first; it has the others.
    held.replies
        .retain(|r| resumed_ids.contains(&r.header.task_id));
    for reply in &held.replies {
        let from = resumed
            .iter()
            .find(|r| r.task_id == reply.header.task_id)
            .and_then(|r| r.reply_received);
        info!(task = reply.header.task_id, from = ?from, "resuming a reply");
        if let Err(e) = link.send_reply(reply, from).await {
            return lost_held(e);
        }
    }
    let mut tick = tokio::time::interval(heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_seen = Instant::now();
    // The connection's bytes read when the last message arrived: a
    // download's progress within a chunk, for the heartbeats.
    let mut read_at_message = progress.bytes_read();
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
                read_at_message = progress.bytes_read();
                match on_message(msg, options, &mut held.receiving) {
                    Ok(Some(Event::Task(task_id, task))) => {
                        // Ends the server's report of this download.
                        let _ = out.try_send(client_msg(client_message::Kind::Heartbeat(proto::Heartbeat {
                            sent_at_ms: now_ms(),
                            task_id,
                            received: u64::MAX,
                        })));
                        lock(live).insert(task_id);
                        if jobs.send(Job { task_id, task }).is_err() {
                            return lost_held("the model's worker stopped".into());
                        }
                    }
                    Ok(Some(Event::Shutdown(s))) if s.finished => {
                        info!(reason = %s.reason, "the server finished the run");
                        return End::Finished;
                    }
                    Ok(Some(Event::Shutdown(s))) => return lost_held(format!("server going away: {}", s.reason)),
                    Ok(None) => {}
                    Err(e) => {
                        // A task this client refuses (over its limits) is
                        // not held: the server fails it when it is back.
                        held.receiving = None;
                        return lost_held(format!("protocol error: {e}"));
                    }
                }
            }
            d = done.recv() => {
                let Some(d) = d else { return lost_held("the model's worker stopped".into()) };
                if !lock(live).contains(&d.task_id) {
                    continue; // the server gave up on it while we were away
                }
                let message = match d.reply {
                    Ok(reply) => wire::encode_reply(d.task_id, reply),
                    Err(Failure::ClientError(m)) => Err(Error::Transport(m)),
                    Err(f) => Err(Error::Transport(f.to_string())),
                };
                match message {
                    Ok(reply) => {
                        // Kept until a welcome settles it. The oldest of
                        // three is dropped (and given up if a welcome still
                        // asks for it): two newer replies were handed to the
                        // same stream after it.
                        held.replies.push(reply);
                        if held.replies.len() > REPLIES_KEPT {
                            let old = held.replies.remove(0);
                            lock(live).remove(&old.header.task_id);
                        }
                        if let Some(reply) = held.replies.last()
                            && let Err(e) = link.send_reply(reply, None).await
                        {
                            return lost_held(e);
                        }
                    }
                    Err(e) => {
                        lock(live).remove(&d.task_id);
                        let error = client_msg(client_message::Kind::Error(proto::TaskError {
                            task_id: d.task_id,
                            message: match e {
                                Error::Transport(m) => m,
                                e => e.to_string(),
                            },
                        }));
                        if let Err(e) = link.send(error).await {
                            return lost_held(e);
                        }
                    }
                }
                // The server took the whole reply, so it is alive, even if its
                // heartbeats wait unread while a large reply was going out.
                last_seen = Instant::now();
            }
            _ = tick.tick() => {
                let silent = last_seen.elapsed().min(progress.since_read());
                if silent > liveness {
                    return lost_held(format!("no byte from the server for {} ms", silent.as_millis()));
                }
                let (task_id, received) = held.receiving.as_ref().map_or((0, 0), |(h, _, a)| {
                    let within = progress.bytes_read().saturating_sub(read_at_message);
                    (h.task_id, a.received().saturating_add(within).min(a.total()))
                });
                let _ = out.try_send(client_msg(client_message::Kind::Heartbeat(proto::Heartbeat {
                    sent_at_ms: now_ms(),
                    task_id,
                    received,
                })));
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
