//! The server side: [`GrpcTransport`], a [`Transport`] whose clients are
//! remote processes holding a gRPC session over mutual TLS.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use super::caps::{Connections, Progress, SiteSessions, SiteSlot};
use super::monitor::{ConnectionLog, NetMonitor, Peer};
use super::proto::federation_server::{Federation, FederationServer};
use super::proto::{self, client_message, server_message};
use super::provision::{Kit, Refusal, Role, Roster, common_name, fingerprint, not_after_ms};
use super::wire::{self, Assembler, Outgoing, PROTOCOL, Plan};
use super::{Limits, now_ms};
use crate::error::{Error, Result};
use crate::transport::{Envelope, Failure, ReplySender, Task, Transport};
use crate::update::ClientId;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Settings of the server's side of the network.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Where to listen; `None` takes the port of the kit's server address on
    /// all interfaces. Port 0 picks a free port ([`GrpcTransport::local_addr`]).
    pub listen: Option<SocketAddr>,
    /// Message and payload limits.
    pub limits: Limits,
    /// How often the server sends a heartbeat and checks each session.
    pub heartbeat: Duration,
    /// A session whose connection moved no byte from the client for this
    /// long is closed (progress, not whole messages: a slow link that
    /// takes minutes per chunk stays open while its bytes flow).
    pub liveness: Duration,
    /// How long the tasks of a site whose connection dropped wait for it to
    /// reconnect: a site back in time resumes them where they stopped (the
    /// rest of a download from the bytes it holds, the rest of its reply
    /// from the bytes the server holds); otherwise they fail as
    /// disconnected. Zero fails them at once. A session closed for a
    /// protocol error or a revocation never resumes.
    pub resume_window: Duration,
    /// How long a new connection has to say hello.
    pub hello_timeout: Duration,
    /// How long a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// After the last round, how long [`super::run_server`] waits for sites
    /// that are away to come back and hear that the run is finished.
    pub finish_grace: Duration,
    /// Open connections (TLS handshakes included); more are closed as they
    /// arrive.
    pub max_connections: usize,
    /// Open connections from one address.
    pub max_connections_per_address: usize,
    /// Session calls of one site open at once, saying hello or live: two
    /// let a reconnecting site replace its old session; more are refused
    /// (`resource_exhausted`).
    pub max_sessions_per_site: usize,
    /// HTTP/2 streams one connection may open at once.
    pub max_streams_per_connection: u32,
}

impl Default for ServerOptions {
    /// The kit's port, default limits, a heartbeat every 2 s, 10 s liveness,
    /// 60 s to resume after a dropped connection; 256 connections, 16 per
    /// address, 2 session calls per site, 4 streams per connection.
    fn default() -> Self {
        Self {
            listen: None,
            limits: Limits::default(),
            heartbeat: Duration::from_secs(2),
            liveness: Duration::from_secs(10),
            resume_window: Duration::from_secs(60),
            hello_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            finish_grace: Duration::from_secs(20),
            max_connections: 256,
            max_connections_per_address: 16,
            max_sessions_per_site: 2,
            max_streams_per_connection: 4,
        }
    }
}

enum Out {
    /// A task: its header and payload (`None`), or its payload from a byte
    /// on (a download resumed after a reconnect).
    Task(Arc<Outgoing<proto::TaskHeader>>, Option<u64>),
    Shutdown(proto::Shutdown),
}

/// How often a transfer's progress is logged.
const METER_EVERY: Duration = Duration::from_secs(5);

/// A transfer in progress to or from a site, as the server's log and
/// [`NetMonitor::transfers`] show it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Transfer {
    /// The site.
    pub identity: String,
    /// `"download"` (a task to the site) or `"upload"` (its reply).
    pub direction: String,
    /// The task.
    pub task_id: u64,
    /// Payload bytes moved so far (counting those moved before a resume).
    pub bytes: u64,
    /// The payload's size.
    pub total: u64,
    /// Bytes per second since the transfer (or its resumption) started.
    pub rate_bytes_per_s: f64,
    /// Seconds left at that rate (`None` before any byte moved).
    pub eta_s: Option<f64>,
    /// It resumed after a dropped connection (bytes and rate count from
    /// where it resumed).
    pub resumed: bool,
}

/// Which way a transfer goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Download = 0,
    Upload = 1,
}

/// Measures one transfer. An upload's bytes are counted on the connection
/// as they arrive (framing included, so slightly ahead, and capped at the
/// payload), which follows a slow link within a chunk, and by whole chunks
/// where the session does not know its connection. A download's are what
/// the client's heartbeats report: the server's own writes land in socket
/// buffers long before they cross a slow link.
struct Meter {
    way: Way,
    task_id: u64,
    total: u64,
    /// Where it (re)started, in payload bytes.
    from: u64,
    /// Payload bytes known to have moved: an upload's whole chunks, or
    /// what the client's heartbeats report of a download.
    known: u64,
    /// The connection's counter when it started.
    counter_at_start: Option<u64>,
    started: Instant,
    logged: Instant,
}

impl Meter {
    fn new(way: Way, task_id: u64, total: u64, from: u64, counter: Option<u64>) -> Self {
        let now = Instant::now();
        Self {
            way,
            task_id,
            total,
            from,
            known: from,
            counter_at_start: counter,
            started: now,
            logged: now,
        }
    }

    fn snapshot(&self, identity: &ClientId, counter: Option<u64>) -> Transfer {
        let counted = match (self.counter_at_start, counter) {
            (Some(a), Some(b)) => self.from.saturating_add(b.saturating_sub(a)),
            _ => 0,
        };
        let bytes = self.known.max(counted).min(self.total);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = bytes.saturating_sub(self.from) as f64 / secs;
        Transfer {
            identity: identity.to_string(),
            direction: match self.way {
                Way::Download => "download",
                Way::Upload => "upload",
            }
            .to_owned(),
            task_id: self.task_id,
            bytes,
            total: self.total,
            rate_bytes_per_s: rate,
            eta_s: (rate > 0.0).then(|| self.total.saturating_sub(bytes) as f64 / rate),
            resumed: self.from > 0,
        }
    }
}

/// Task ids remembered per session after they were dropped from `pending`.
const FORGOTTEN: usize = 16;

/// Room for a chunk's own fields under the message limit.
const CHUNK_FRAMING: usize = 4096;
/// The smallest chunk worth a session.
const MIN_CHUNK: usize = 4096;

/// At most this many unanswered tasks per session; more are refused, so a
/// client that stops answering cannot make the server queue models.
const MAX_PENDING: usize = 4;

/// A task sent and not yet answered.
struct Pending {
    reply_to: ReplySender,
    round: u64,
    kind: proto::TaskKind,
    /// The largest reply payload accepted for it.
    max_reply_bytes: u64,
    /// Its header and payload, to resume its download after a reconnect.
    task: Arc<Outgoing<proto::TaskHeader>>,
}

/// The tasks of a site whose connection dropped, kept for
/// [`ServerOptions::resume_window`].
struct Parked {
    /// The session they belonged to.
    session: u64,
    pending: HashMap<u64, Pending>,
    /// The reply it was sending, as far as it arrived.
    incoming: Option<Incoming>,
    reason: String,
}

struct Session {
    id: ClientId,
    number: u64,
    fingerprint: String,
    /// When its certificate expires (ms since the Unix epoch).
    not_after_ms: Option<i64>,
    /// The address it connected from.
    peer: Option<String>,
    /// Payload bytes per chunk sent to this client (fits its message limit).
    chunk_bytes: usize,
    /// The update encodings it can send (its hello's), besides float32.
    encodings: Vec<String>,
    queue: mpsc::UnboundedSender<Out>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// Tasks dropped from `pending` to make room: not sent if still queued;
    /// a reply to one that was sent is read and thrown away.
    forgotten: Mutex<VecDeque<u64>>,
    last_seen: Mutex<Instant>,
    /// The connection's bytes (`None` where the server could not tell
    /// which connection carries the session: then whole messages count).
    progress: Option<Arc<Progress>>,
    /// The reply being received.
    incoming: Mutex<Option<Incoming>>,
    /// The download and the upload in progress.
    transfers: Mutex<[Option<Meter>; 2]>,
    cancel: CancellationToken,
    /// The site's place among its session calls, freed with the session.
    _slot: SiteSlot,
}

/// The roster file, re-read when it changes.
struct RosterWatch {
    path: PathBuf,
    stamp: Option<(i64, i64, u64, u64)>,
    roster: Roster,
}

impl RosterWatch {
    fn load(path: PathBuf) -> Result<Self> {
        let mut w = Self {
            roster: Roster::load(&path)?,
            stamp: None,
            path,
        };
        w.stamp = w.current_stamp();
        Ok(w)
    }

    fn current_stamp(&self) -> Option<(i64, i64, u64, u64)> {
        std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.mtime(), m.mtime_nsec(), m.len(), m.ino()))
    }

    /// The roster, reloaded if the file changed. A file that no longer
    /// parses keeps the last good roster (and says so).
    fn get(&mut self) -> &Roster {
        let stamp = self.current_stamp();
        if stamp != self.stamp {
            match Roster::load(&self.path) {
                Ok(r) => {
                    info!(path = %self.path.display(), active = r.active().len(), "roster reloaded");
                    self.roster = r;
                    self.stamp = stamp;
                }
                Err(e) => {
                    warn!(error = %e, "roster file changed but cannot be read; keeping the previous roster");
                    self.stamp = stamp;
                }
            }
        }
        &self.roster
    }
}

pub(super) struct Shared {
    options: ServerOptions,
    /// Sessions opened and closed, connections refused: for [`NetMonitor`].
    pub(super) log: ConnectionLog,
    roster: Mutex<RosterWatch>,
    sessions: Mutex<BTreeMap<ClientId, Arc<Session>>>,
    changed: Condvar,
    next_task: AtomicU64,
    next_session: AtomicU64,
    /// Set by [`GrpcTransport::shutdown`]: sessions opened later get it at once.
    closing: Mutex<Option<proto::Shutdown>>,
    /// Every site that held a session during this run.
    seen: Mutex<BTreeSet<ClientId>>,
    /// The sites that were sent the final `Shutdown`.
    told: Mutex<BTreeSet<ClientId>>,
    /// Session calls per site.
    site_sessions: SiteSessions,
    /// Set when the server stops listening: no session registers after.
    stopped: Mutex<bool>,
    /// Tasks waiting for their site to reconnect.
    parked: Mutex<HashMap<ClientId, Parked>>,
    /// The open connections and their progress.
    connections: Connections,
}

impl Session {
    /// How long the client has been silent: no message and no byte.
    fn silent(&self) -> Duration {
        let message = lock(&self.last_seen).elapsed();
        self.progress
            .as_ref()
            .map_or(message, |p| message.min(p.since_read()))
    }

    /// The connection's counter for an upload (bytes read); none for a
    /// download (the client reports it).
    fn counter(&self, way: Way) -> Option<u64> {
        match way {
            Way::Download => None,
            Way::Upload => self.progress.as_ref().map(|p| p.bytes_read()),
        }
    }

    /// A transfer starts (or resumes at `from`). An upload's start ends
    /// the download of its task.
    fn start_transfer(&self, way: Way, task_id: u64, total: u64, from: u64) {
        let meter = Meter::new(way, task_id, total, from, self.counter(way));
        let mut transfers = lock(&self.transfers);
        transfers[way as usize] = Some(meter);
        if way == Way::Upload {
            transfers[Way::Download as usize] = None;
        }
    }

    /// `bytes` of the payload moved: whole chunks of an upload, or what
    /// the client reports of a download. A transfer that moved all its
    /// bytes ends.
    fn moved(&self, way: Way, task_id: u64, bytes: u64) {
        let mut transfers = lock(&self.transfers);
        let slot = &mut transfers[way as usize];
        if let Some(m) = slot.as_mut().filter(|m| m.task_id == task_id) {
            m.known = m.known.max(bytes);
            if bytes >= m.total {
                self.log_transfer(m, true);
                *slot = None;
            }
        }
    }

    /// The transfers in progress; logs each every [`METER_EVERY`].
    fn transfers(&self) -> Vec<Transfer> {
        let mut transfers = lock(&self.transfers);
        let mut out = Vec::new();
        for slot in transfers.iter_mut() {
            let Some(m) = slot.as_mut() else { continue };
            let t = m.snapshot(&self.id, self.counter(m.way));
            if m.logged.elapsed() >= METER_EVERY {
                self.log_transfer(m, false);
            }
            out.push(t);
        }
        out
    }

    fn log_transfer(&self, m: &mut Meter, done: bool) {
        // Small transfers finish in one go: only slow ones are logged.
        if done && m.started.elapsed() < METER_EVERY {
            return;
        }
        m.logged = Instant::now();
        let t = m.snapshot(&self.id, self.counter(m.way));
        info!(
            client = %t.identity,
            direction = %t.direction,
            task = t.task_id,
            bytes = t.bytes,
            total = t.total,
            rate_kb_s = (t.rate_bytes_per_s / 1e3).round(),
            eta_s = t.eta_s.map_or(-1.0, f64::round),
            resumed = t.resumed,
            "transfer progress"
        );
    }
}

impl Shared {
    fn admit(&self, identity: &str, fingerprint: &str) -> std::result::Result<(), Refusal> {
        lock(&self.roster).get().admit(identity, fingerprint)
    }

    /// Each open session's site and how long it has been silent.
    pub(super) fn open_sessions(&self) -> Vec<(String, Duration)> {
        lock(&self.sessions)
            .values()
            .map(|s| (s.id.to_string(), s.silent()))
            .collect()
    }

    /// The transfers in progress.
    pub(super) fn transfers(&self) -> Vec<Transfer> {
        lock(&self.sessions)
            .values()
            .flat_map(|s| s.transfers())
            .collect()
    }

    /// Registers a session; a newer connection of the same site replaces
    /// an older one, never the other way round. The new session takes over
    /// the tasks of the one it replaces and those parked for the site:
    /// those the client still holds resume (the rest of a download is
    /// queued from the client's offset), the others fail. Returns what
    /// resumed, for the welcome; `None` if it may not register.
    fn register(
        &self,
        session: Arc<Session>,
        holding: &[proto::Holding],
    ) -> Option<Vec<proto::Resumed>> {
        let (old, resumed) = {
            let mut sessions = lock(&self.sessions);
            if *lock(&self.stopped)
                || sessions
                    .get(&session.id)
                    .is_some_and(|s| s.number > session.number)
            {
                return None;
            }
            // Logged under the sessions lock, as `end_session` logs a
            // close: the log's order is the sessions' order.
            self.log.opened(Peer {
                identity: session.id.as_str(),
                fingerprint: &session.fingerprint,
                not_after_ms: session.not_after_ms,
                peer: session.peer.clone(),
            });
            let old = sessions.insert(session.id.clone(), session.clone());
            // Before the new session can be sent anything: a resumed
            // download goes out before any new task.
            let resumed = self.adopt(&session, old.as_deref(), holding);
            (old, resumed)
        };
        lock(&self.seen).insert(session.id.clone());
        if let Some(old) = old {
            // Its tasks moved to the new session; this stops its streams.
            self.fail(
                &old,
                "replaced by a new connection from the same site".into(),
            );
        }
        info!(client = %session.id, session = session.number, resumed = resumed.len(), "client connected");
        self.changed.notify_all();
        Some(resumed)
    }

    /// Moves the tasks of `old` (a session being replaced) and of the
    /// site's parked session to `session`, as far as the client holds them.
    fn adopt(
        &self,
        session: &Session,
        old: Option<&Session>,
        holding: &[proto::Holding],
    ) -> Vec<proto::Resumed> {
        let mut pending = HashMap::new();
        let mut incoming = None;
        if let Some(p) = lock(&self.parked).remove(&session.id) {
            pending.extend(p.pending);
            incoming = p.incoming;
        }
        if let Some(old) = old {
            old.cancel.cancel();
            // `incoming` before `pending`, as the reader takes them: a reply
            // the reader completes meanwhile is delivered, not lost.
            let mut old_incoming = lock(&old.incoming);
            pending.extend(lock(&old.pending).drain());
            if let Some(i) = old_incoming.take() {
                incoming = Some(i);
            }
        }
        let mut ids: Vec<u64> = pending.keys().copied().collect();
        ids.sort_unstable();
        let mut resumed = Vec::new();
        for id in ids {
            let Some(p) = pending.remove(&id) else {
                continue;
            };
            let Some(h) = holding.iter().find(|h| h.task_id == id) else {
                // The client restarted, or never got the task's header.
                let _ = p.reply_to.send(Envelope {
                    client: session.id.clone(),
                    reply: Err(Failure::Disconnected(
                        "the connection dropped and the client no longer holds the task".into(),
                    )),
                });
                continue;
            };
            let reply_received = match incoming.take() {
                Some(i) if i.header.task_id == id && h.complete => {
                    let received = i.assembler.received();
                    session.start_transfer(Way::Upload, id, i.assembler.total(), received);
                    *lock(&session.incoming) = Some(i);
                    Some(received)
                }
                other => {
                    incoming = other;
                    None
                }
            };
            if !h.complete {
                let _ = session
                    .queue
                    .send(Out::Task(p.task.clone(), Some(h.received)));
            }
            info!(client = %session.id, task = id, download_from = h.received, complete = h.complete,
                  reply_from = ?reply_received, "resuming a task after a reconnect");
            lock(&session.pending).insert(id, p);
            resumed.push(proto::Resumed {
                task_id: id,
                reply_received,
            });
        }
        resumed
    }

    /// Keeps `session`'s tasks for the resume window instead of failing
    /// them; fails them when the window passes without the site.
    fn park(self: &Arc<Self>, session: &Session, reason: String) {
        session.cancel.cancel();
        // `incoming` before `pending`, as the reader takes them: a reply
        // the reader completes meanwhile is delivered, not lost.
        let (pending, incoming) = {
            let mut incoming = lock(&session.incoming);
            let pending: HashMap<u64, Pending> = lock(&session.pending).drain().collect();
            (pending, incoming.take())
        };
        if pending.is_empty() {
            return;
        }
        let window = self.options.resume_window;
        info!(client = %session.id, tasks = pending.len(), window_s = window.as_secs(), "keeping the tasks of a dropped connection");
        lock(&self.parked).insert(
            session.id.clone(),
            Parked {
                session: session.number,
                pending,
                incoming,
                reason,
            },
        );
        let shared = self.clone();
        let (id, number) = (session.id.clone(), session.number);
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            shared.expire(&id, number);
        });
    }

    /// Fails the tasks parked for `id` by session `number`, if still there.
    fn expire(&self, id: &ClientId, number: u64) {
        let parked = {
            let mut parked = lock(&self.parked);
            if parked.get(id).is_none_or(|p| p.session != number) {
                return;
            }
            parked.remove(id)
        };
        if let Some(p) = parked {
            let reason = format!(
                "{} (not back within {} s)",
                p.reason,
                self.options.resume_window.as_secs()
            );
            for (_, pending) in p.pending {
                let _ = pending.reply_to.send(Envelope {
                    client: id.clone(),
                    reply: Err(Failure::Disconnected(reason.clone())),
                });
            }
        }
    }

    /// Waits until `done` holds for the open sessions (checked under their
    /// lock, woken by `changed`) or `deadline` passes; returns how many
    /// sessions are open then.
    fn wait_until(
        &self,
        deadline: Instant,
        done: impl Fn(&BTreeMap<ClientId, Arc<Session>>) -> bool,
    ) -> usize {
        let mut sessions = lock(&self.sessions);
        while !done(&sessions) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sessions = self
                .changed
                .wait_timeout(sessions, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        sessions.len()
    }

    /// Ends a session: stops its tasks; parks them for the resume window
    /// when `resumable` (the connection dropped), fails them otherwise.
    fn end_session(self: &Arc<Self>, session: &Arc<Session>, reason: String, resumable: bool) {
        {
            let mut sessions = lock(&self.sessions);
            if sessions
                .get(&session.id)
                .is_some_and(|s| s.number == session.number)
            {
                sessions.remove(&session.id);
                info!(client = %session.id, session = session.number, reason = %reason, "client disconnected");
                let silent = session.silent().as_millis() as i64;
                self.log
                    .closed(session.id.as_str(), now_ms() as i64 - silent, &reason);
                if resumable
                    && !self.options.resume_window.is_zero()
                    && !*lock(&self.stopped)
                    && self
                        .admit(session.id.as_str(), &session.fingerprint)
                        .is_ok()
                {
                    // Under the sessions lock: a reconnect registering next
                    // finds the parked tasks.
                    self.park(session, reason.clone());
                }
            }
        }
        self.changed.notify_all();
        self.fail(session, reason);
    }

    fn fail(&self, session: &Session, reason: String) {
        session.cancel.cancel();
        let pending: Vec<ReplySender> = lock(&session.pending)
            .drain()
            .map(|(_, p)| p.reply_to)
            .collect();
        for reply_to in pending {
            // The server may have stopped listening (deadline passed).
            let _ = reply_to.send(Envelope {
                client: session.id.clone(),
                reply: Err(Failure::Disconnected(reason.clone())),
            });
        }
    }
}

/// The gRPC service; one instance shared by every connection.
struct Service {
    shared: Arc<Shared>,
}

type SessionStream =
    Pin<Box<dyn Stream<Item = std::result::Result<proto::ServerMessage, Status>> + Send>>;

fn server_msg(kind: server_message::Kind) -> proto::ServerMessage {
    proto::ServerMessage { kind: Some(kind) }
}

#[tonic::async_trait]
impl Federation for Service {
    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<proto::ClientMessage>>,
    ) -> std::result::Result<Response<SessionStream>, Status> {
        let shared = self.shared.clone();
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let identity =
            common_name(leaf.as_ref()).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let fp = fingerprint(leaf.as_ref());
        let not_after = not_after_ms(leaf.as_ref());
        let remote = request.remote_addr();
        let peer = remote.map(|a| a.to_string());
        let progress = remote.and_then(|a| shared.connections.progress(a));
        if let Err(refusal) = shared.admit(&identity, &fp) {
            warn!(identity = %identity, reason = %refusal, "connection refused");
            shared.log.refused(
                Peer {
                    identity: &identity,
                    fingerprint: &fp,
                    not_after_ms: not_after,
                    peer,
                },
                &refusal,
                false,
            );
            return Err(Status::permission_denied(refusal.to_string()));
        }
        // Before waiting for hello: a site that opens session after session
        // without finishing them holds at most this many.
        let slot = shared.site_sessions.take(&identity).map_err(|_| {
            warn!(identity = %identity, "session refused: too many open session calls");
            Status::resource_exhausted(format!(
                "`{identity}` has {} session calls open already",
                shared.options.max_sessions_per_site
            ))
        })?;
        let mut inbound = request.into_inner();
        let hello = tokio::time::timeout(shared.options.hello_timeout, inbound.message()).await;
        let hello = match hello {
            Ok(Ok(Some(proto::ClientMessage {
                kind: Some(client_message::Kind::Hello(h)),
            }))) => h,
            Ok(Ok(_)) => return Err(Status::invalid_argument("the first message must be hello")),
            Ok(Err(s)) => return Err(s),
            Err(_) => return Err(Status::deadline_exceeded("no hello in time")),
        };
        if hello.identity != identity {
            warn!(identity = %identity, claimed = %hello.identity, "connection refused: identity mismatch");
            return Err(Status::permission_denied(format!(
                "hello names `{}` but the certificate is `{identity}`",
                hello.identity
            )));
        }
        if hello.protocol != PROTOCOL {
            return Err(Status::failed_precondition(format!(
                "protocol {} is not supported (this server speaks {PROTOCOL})",
                hello.protocol
            )));
        }
        // Chunks that fit the client's message limit as well as ours.
        let client_max = match hello.max_message_bytes {
            0 => 4 << 20,
            n => usize::try_from(n).unwrap_or(usize::MAX),
        };
        let chunk_bytes = shared
            .options
            .limits
            .chunk_bytes
            .min(client_max.saturating_sub(CHUNK_FRAMING));
        if chunk_bytes < MIN_CHUNK {
            return Err(Status::failed_precondition(format!(
                "a message limit of {client_max} bytes leaves no room for chunks"
            )));
        }
        let (out_tx, out_rx) = mpsc::channel(16);
        let (queue_tx, queue_rx) = mpsc::unbounded_channel();
        let session = Arc::new(Session {
            id: ClientId::new(identity.clone()),
            number: shared.next_session.fetch_add(1, Ordering::Relaxed),
            fingerprint: fp,
            not_after_ms: not_after,
            peer,
            chunk_bytes,
            encodings: hello.encodings.clone(),
            queue: queue_tx,
            pending: Mutex::new(HashMap::new()),
            forgotten: Mutex::new(VecDeque::new()),
            last_seen: Mutex::new(Instant::now()),
            progress,
            incoming: Mutex::new(None),
            transfers: Mutex::new([None, None]),
            cancel: CancellationToken::new(),
            _slot: slot,
        });
        if hello.encodings.len() > 16 || hello.encodings.iter().any(|e| e.len() > 32) {
            return Err(Status::invalid_argument(
                "hello lists too many or too long encodings",
            ));
        }
        // A site has at most MAX_PENDING tasks: more holdings are ignored.
        let holding = &hello.holding[..hello.holding.len().min(MAX_PENDING * 2)];
        let Some(resumed) = shared.register(session.clone(), holding) else {
            if *lock(&shared.stopped) {
                return Err(Status::unavailable("the server is stopping"));
            }
            return Err(Status::aborted("a newer connection of this site is open"));
        };
        let welcome = server_msg(server_message::Kind::Welcome(proto::Welcome {
            identity,
            protocol: PROTOCOL,
            heartbeat_ms: shared.options.heartbeat.as_millis() as u64,
            chunk_bytes: chunk_bytes as u64,
            liveness_ms: shared.options.liveness.as_millis() as u64,
            resumed,
        }));
        // The welcome goes first: the writer, which sends everything
        // queued (a resumed download first), starts after it.
        if out_tx.send(Ok(welcome)).await.is_err() {
            shared.end_session(
                &session,
                "the session closed before its welcome".into(),
                true,
            );
            return Err(Status::unavailable("session closed"));
        }
        if let Some(s) = lock(&shared.closing).clone() {
            let _ = session.queue.send(Out::Shutdown(s));
        }
        tokio::spawn(writer(shared.clone(), session.clone(), queue_rx, out_tx));
        tokio::spawn(reader(shared, session, inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

type OutTx = mpsc::Sender<std::result::Result<proto::ServerMessage, Status>>;

/// Sends one message unless the session is cancelled first or the client
/// takes in nothing for `patience` (a client that stops reading must not
/// hold the session, and the models queued for it, forever). Taking in is
/// progress in bytes: while the connection writes any, however slowly, the
/// client is reading.
async fn push(
    session: &Session,
    out: &OutTx,
    msg: proto::ServerMessage,
    patience: Duration,
) -> std::result::Result<(), String> {
    let started = Instant::now();
    let stalled = || {
        let waited = started.elapsed();
        session
            .progress
            .as_ref()
            .map_or(waited, |p| waited.min(p.since_written()))
    };
    loop {
        tokio::select! {
            _ = session.cancel.cancelled() => return Err("session closed".into()),
            permit = out.reserve() => {
                let permit = permit.map_err(|_| "the client stopped reading".to_owned())?;
                permit.send(Ok(msg));
                return Ok(());
            }
            _ = tokio::time::sleep(patience / 4) => {
                if stalled() > patience {
                    return Err(format!("the client took in nothing for {} ms", stalled().as_millis()));
                }
            }
        }
    }
}

/// Streams queued tasks, heartbeats; checks liveness and the roster.
async fn writer(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut queue: mpsc::UnboundedReceiver<Out>,
    out: OutTx,
) {
    let opts = &shared.options;
    let mut tick = tokio::time::interval(opts.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Why the session ends, and whether its tasks may resume (the link
    // failed, not the protocol).
    let (reason, resumable) = loop {
        tokio::select! {
            _ = session.cancel.cancelled() => return,
            item = queue.recv() => match item {
                None => return,
                Some(Out::Shutdown(s)) => {
                    if push(&session, &out, server_msg(server_message::Kind::Shutdown(s.clone())), opts.liveness).await.is_ok() {
                        lock(&shared.told).insert(session.id.clone());
                        // Through the sessions lock, which `shutdown` holds
                        // between its check and its wait: no lost wake-up.
                        drop(lock(&shared.sessions));
                        shared.changed.notify_all();
                    }
                    // Keep the stream open until the client has read the
                    // message and hung up (the reader then ends the session).
                    tokio::select! {
                        _ = session.cancel.cancelled() => return,
                        _ = tokio::time::sleep(opts.liveness) => break (s.reason, false),
                    }
                }
                Some(Out::Task(task, from)) => {
                    let id = task.header.task_id;
                    // Forgotten before it left: nobody waits for it. A resumed
                    // download goes out regardless (the client expects its rest).
                    if from.is_none() && !lock(&session.pending).contains_key(&id) {
                        continue;
                    }
                    if from.is_none()
                        && let Err(r) = push(&session, &out, server_msg(server_message::Kind::Task(task.header.clone())), opts.liveness).await
                    {
                        break (r, true);
                    }
                    let total = task.payload_len();
                    session.start_transfer(Way::Download, id, total, from.unwrap_or(0));
                    let mut failed = None;
                    for chunk in wire::transfer_chunks(id, &task.payload, session.chunk_bytes, from) {
                        if let Err(r) = push(&session, &out, server_msg(server_message::Kind::Chunk(chunk)), opts.liveness).await {
                            failed = Some(r);
                            break;
                        }
                    }
                    if let Some(r) = failed {
                        break (r, true);
                    }
                }
            },
            _ = tick.tick() => {
                // Logs the transfers in progress every few seconds.
                let _ = session.transfers();
                let silent = session.silent();
                if silent > opts.liveness {
                    break (format!("no byte from the client for {} ms", silent.as_millis()), true);
                }
                if let Err(refusal) = shared.admit(session.id.as_str(), &session.fingerprint) {
                    warn!(client = %session.id, reason = %refusal, "closing the session");
                    shared.log.refused(
                        Peer {
                            identity: session.id.as_str(),
                            fingerprint: &session.fingerprint,
                            not_after_ms: session.not_after_ms,
                            peer: session.peer.clone(),
                        },
                        &refusal,
                        true,
                    );
                    let r = refusal.to_string();
                    let _ = out.try_send(Err(Status::permission_denied(r.clone())));
                    break (r, false);
                }
                // A full queue means data is flowing; no heartbeat needed.
                let _ = out.try_send(Ok(server_msg(server_message::Kind::Heartbeat(proto::Heartbeat {
                    sent_at_ms: now_ms(),
                    ..proto::Heartbeat::default()
                }))));
            }
        }
    };
    shared.end_session(&session, reason, resumable);
}

/// The reply being received.
struct Incoming {
    header: proto::ReplyHeader,
    plan: Plan,
    assembler: Assembler,
}

/// Reads the client's messages until the session ends.
async fn reader(
    shared: Arc<Shared>,
    session: Arc<Session>,
    mut inbound: Streaming<proto::ClientMessage>,
) {
    let (reason, resumable) = loop {
        let msg = tokio::select! {
            _ = session.cancel.cancelled() => return,
            m = inbound.message() => m,
        };
        match msg {
            Ok(Some(m)) => {
                *lock(&session.last_seen) = Instant::now();
                let mut current = lock(&session.incoming);
                if let Err(e) = handle(&shared, &session, m, &mut current) {
                    warn!(client = %session.id, error = %e, "protocol error; closing the session");
                    break (e, false);
                }
            }
            Ok(None) => break ("the client closed the session".to_owned(), true),
            // The link failed (resumable), or the stream broke a rule: a
            // message over the limit (`OutOfRange`), one that does not
            // decode (`Internal`), which a reconnect would only repeat.
            Err(status) => {
                let resumable = matches!(
                    status.code(),
                    tonic::Code::Unknown
                        | tonic::Code::Unavailable
                        | tonic::Code::Cancelled
                        | tonic::Code::Aborted
                        | tonic::Code::DeadlineExceeded
                );
                break (format!("connection lost: {}", status.message()), resumable);
            }
        }
    };
    shared.end_session(&session, reason, resumable);
}

fn handle(
    shared: &Shared,
    session: &Session,
    msg: proto::ClientMessage,
    current: &mut Option<Incoming>,
) -> std::result::Result<(), String> {
    use client_message::Kind;
    match msg.kind {
        None | Some(Kind::Hello(_)) => Err("unexpected message".into()),
        Some(Kind::Heartbeat(h)) => {
            if h.task_id != 0 {
                session.moved(Way::Download, h.task_id, h.received);
            }
            Ok(())
        }
        Some(Kind::Error(e)) => {
            if let Some(p) = lock(&session.pending).remove(&e.task_id) {
                let _ = p.reply_to.send(Envelope {
                    client: session.id.clone(),
                    reply: Err(Failure::ClientError(e.message)),
                });
            }
            Ok(())
        }
        Some(Kind::Reply(header)) => {
            if current.is_some() {
                return Err("a reply started before the previous one finished".into());
            }
            let expected = lock(&session.pending)
                .get(&header.task_id)
                .map(|p| (p.kind, p.max_reply_bytes));
            let plan = Plan::of_reply(&header).map_err(|e| e.to_string())?;
            let max_payload = shared.options.limits.max_payload_bytes;
            let assembler = match expected {
                Some((kind, max_bytes)) => {
                    if header.kind != kind as i32 {
                        return Err(format!(
                            "reply of kind {} to a task of kind {}",
                            header.kind, kind as i32
                        ));
                    }
                    plan.assembler(header.task_id, max_bytes.min(max_payload))
                }
                // A late reply to a task the server gave up on: read past it.
                None if lock(&session.forgotten).contains(&header.task_id) => {
                    Assembler::discarding(header.task_id, plan.total_bytes(), max_payload)
                }
                None => return Err(format!("reply to unknown task {}", header.task_id)),
            }
            .map_err(|e| e.to_string())?;
            session.start_transfer(Way::Upload, header.task_id, assembler.total(), 0);
            *current = Some(Incoming {
                header,
                plan,
                assembler,
            });
            deliver_if_complete(session, current);
            Ok(())
        }
        Some(Kind::Chunk(chunk)) => {
            let incoming = current
                .as_mut()
                .ok_or_else(|| "a chunk outside a reply".to_owned())?;
            incoming.assembler.push(&chunk).map_err(|e| e.to_string())?;
            session.moved(Way::Upload, chunk.task_id, incoming.assembler.received());
            deliver_if_complete(session, current);
            Ok(())
        }
    }
}

fn deliver_if_complete(session: &Session, current: &mut Option<Incoming>) {
    if !current.as_ref().is_some_and(|c| c.assembler.is_complete()) {
        return;
    }
    let Some(Incoming {
        header,
        plan,
        assembler,
    }) = current.take()
    else {
        return;
    };
    if assembler.is_discarding() {
        return;
    }
    let Some(pending) = lock(&session.pending).remove(&header.task_id) else {
        return;
    };
    let reply = wire::decode_reply(&header, plan, assembler)
        .map_err(|e| Failure::ClientError(format!("malformed reply: {e}")));
    let _ = pending.reply_to.send(Envelope {
        client: session.id.clone(),
        reply,
    });
}

/// The network transport's server side: listens with mutual TLS, admits
/// clients on the roster, and streams tasks and replies in chunks.
///
/// Use it as the [`crate::Server`]'s transport, then drive the rounds with
/// [`super::run_server`] (which waits for clients and goes on after a
/// failed round).
pub struct GrpcTransport {
    shared: Arc<Shared>,
    local_addr: SocketAddr,
    connections: Connections,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl GrpcTransport {
    /// Starts listening with the server kit `kit` (its certificate, the
    /// project CA, its roster).
    pub fn start(kit: &Kit, options: ServerOptions) -> Result<Self> {
        if kit.info.role != Role::Server {
            return Err(Error::InvalidConfig(format!(
                "{} is not a server kit",
                kit.dir.display()
            )));
        }
        options.limits.check()?;
        super::check_timing(options.heartbeat, options.liveness)?;
        let listen = match options.listen {
            Some(a) => a,
            None => {
                let port = kit
                    .info
                    .server_address
                    .rsplit_once(':')
                    .and_then(|(_, p)| p.parse::<u16>().ok())
                    .ok_or_else(|| {
                        Error::InvalidConfig(format!(
                            "server address `{}` has no port",
                            kit.info.server_address
                        ))
                    })?;
                SocketAddr::from(([0, 0, 0, 0], port))
            }
        };
        if options.max_connections == 0
            || options.max_connections_per_address == 0
            || options.max_sessions_per_site == 0
            || options.max_streams_per_connection == 0
        {
            return Err(Error::InvalidConfig(
                "the connection, session and stream caps must be positive".into(),
            ));
        }
        let options_sessions_per_site = options.max_sessions_per_site;
        let connections =
            Connections::new(options.max_connections, options.max_connections_per_address);
        let shared = Arc::new(Shared {
            roster: Mutex::new(RosterWatch::load(kit.roster_path())?),
            log: ConnectionLog::default(),
            options,
            sessions: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            next_task: AtomicU64::new(1),
            next_session: AtomicU64::new(1),
            closing: Mutex::new(None),
            seen: Mutex::new(BTreeSet::new()),
            told: Mutex::new(BTreeSet::new()),
            site_sessions: SiteSessions::new(options_sessions_per_site),
            stopped: Mutex::new(false),
            parked: Mutex::new(HashMap::new()),
            connections: connections.clone(),
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fedcore-net")
            .enable_all()
            .build()?;
        let limits = shared.options.limits.clone();
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(&kit.cert_pem, &kit.key_pem))
            .client_ca_root(Certificate::from_pem(&kit.ca_pem))
            .timeout(shared.options.handshake_timeout);
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(listen))
            .map_err(|e| Error::Transport(format!("cannot listen on {listen}: {e}")))?;
        let local_addr = listener.local_addr()?;
        let service = FederationServer::new(Service {
            shared: shared.clone(),
        })
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
        let router = tonic::transport::Server::builder()
            .tls_config(tls)
            .map_err(|e| Error::Transport(format!("TLS configuration: {e}")))?
            .initial_stream_window_size(Some(limits.window_bytes))
            .initial_connection_window_size(Some(limits.window_bytes))
            .max_frame_size(Some(limits.frame_bytes))
            // No HTTP/2 keepalive: on a slow link its ping waits behind
            // megabytes of data in the socket buffers and would time out a
            // link that is moving. Sessions' liveness is their progress.
            .http2_keepalive_interval(None)
            .max_concurrent_streams(Some(shared.options.max_streams_per_connection))
            .add_service(service);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Every accepted socket is counted until it closes; over a cap it is
        // closed at once. An accept error (out of file descriptors) is
        // logged and the server goes on after a pause: retrying at once
        // would spin, since the error repeats until descriptors are freed.
        let counted = connections.clone();
        let incoming = TcpListenerStream::new(listener)
            .then(move |conn| {
                let counted = counted.clone();
                async move {
                    match conn {
                        Ok(io) => counted.admit(io).map(Ok::<_, std::io::Error>),
                        Err(e) => {
                            warn!(error = %e, "accepting a connection failed; pausing 100 ms");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            None
                        }
                    }
                }
            })
            .filter_map(|admitted| admitted);
        runtime.spawn(async move {
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
            {
                warn!(error = %e, "the gRPC server stopped");
            }
        });
        info!(address = %local_addr, "listening (mutual TLS)");
        Ok(Self {
            shared,
            local_addr,
            connections,
            stop: Some(stop),
            runtime: Some(runtime),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle on the sites' sessions and the refused connections, to
    /// read from another thread while the server runs (an operator's page).
    pub fn monitor(&self) -> NetMonitor {
        NetMonitor {
            shared: self.shared.clone(),
        }
    }

    /// How many connections are open now (TLS handshakes included).
    pub fn open_connections(&self) -> usize {
        self.connections.open()
    }

    /// The settings it runs with.
    pub fn options(&self) -> &ServerOptions {
        &self.shared.options
    }

    /// Tells every client the run is over (`finished`) or that the server is
    /// going away, then stops listening. It waits up to `grace` until every
    /// connected client hung up and every site that held a session during
    /// the run and is still on the roster has heard it: a site that is
    /// reconnecting at that moment (its backoff reaches 15 s by default)
    /// is told when it comes back instead of retrying forever.
    pub fn shutdown(&mut self, reason: &str, kind: ShutdownKind, grace: Duration) {
        let message = proto::Shutdown {
            reason: reason.to_owned(),
            finished: kind == ShutdownKind::Finished,
        };
        *lock(&self.shared.closing) = Some(message.clone());
        let sessions: Vec<Arc<Session>> = lock(&self.shared.sessions).values().cloned().collect();
        for s in &sessions {
            let _ = s.queue.send(Out::Shutdown(message.clone()));
        }
        let active: BTreeSet<ClientId> = lock(&self.shared.roster)
            .get()
            .active()
            .into_iter()
            .map(ClientId::new)
            .collect();
        let waiting = |shared: &Shared| {
            let told = lock(&shared.told);
            lock(&shared.seen)
                .iter()
                .any(|c| active.contains(c) && !told.contains(c))
        };
        self.shared.wait_until(Instant::now() + grace, |open| {
            open.is_empty() && !waiting(&self.shared)
        });
        self.stop_listening();
    }

    fn stop_listening(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let open: Vec<Arc<Session>> = {
            let mut sessions = lock(&self.shared.sessions);
            *lock(&self.shared.stopped) = true;
            let open: Vec<Arc<Session>> = std::mem::take(&mut *sessions).into_values().collect();
            for s in &open {
                let silent = lock(&s.last_seen).elapsed().as_millis() as i64;
                self.shared.log.closed(
                    s.id.as_str(),
                    now_ms() as i64 - silent,
                    "the server stopped",
                );
            }
            open
        };
        for s in &open {
            self.shared.fail(s, "the server stopped".into());
        }
        let parked: Vec<(ClientId, Parked)> = lock(&self.shared.parked).drain().collect();
        for (id, p) in parked {
            for (_, pending) in p.pending {
                let _ = pending.reply_to.send(Envelope {
                    client: id.clone(),
                    reply: Err(Failure::Disconnected("the server stopped".into())),
                });
            }
        }
        self.shared.changed.notify_all();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// What [`GrpcTransport::shutdown`] tells the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownKind {
    /// The run is over: [`super::run_client`] returns `Ok`.
    Finished,
    /// The server is going away but the run is not over: clients keep
    /// reconnecting (with backoff) until a server is back.
    GoingAway,
}

impl Drop for GrpcTransport {
    fn drop(&mut self) {
        self.stop_listening();
    }
}

impl Transport for GrpcTransport {
    fn clients(&self) -> Vec<ClientId> {
        lock(&self.shared.sessions).keys().cloned().collect()
    }

    /// Wakes as soon as a session opens (no polling).
    fn wait_for_clients(&mut self, n: usize, timeout: Duration) -> usize {
        self.shared
            .wait_until(Instant::now() + timeout, |sessions| sessions.len() >= n)
    }

    fn send(&mut self, client: &ClientId, task: Task, reply_to: ReplySender) -> Result<()> {
        let session = lock(&self.shared.sessions)
            .get(client)
            .cloned()
            .ok_or_else(|| Error::Transport(format!("`{client}` is not connected")))?;
        // Ask only for an encoding the client said it can send.
        let task = match task {
            Task::Fit(mut f)
                if !f.config.upload.is_lossless()
                    && !session
                        .encodings
                        .iter()
                        .any(|e| e == f.config.upload.kind()) =>
            {
                info!(client = %client, asked = %f.config.upload, "the client cannot send this encoding; asking for float32");
                f.config.upload = crate::Encoding::F32;
                Task::Fit(f)
            }
            t => t,
        };
        let task_id = self.shared.next_task.fetch_add(1, Ordering::Relaxed);
        let out = Arc::new(wire::encode_task(task_id, &task)?);
        let limit = self.shared.options.limits.max_payload_bytes;
        if out.payload_len() > limit {
            return Err(Error::Transport(format!(
                "task of {} bytes exceeds the payload limit of {limit} bytes",
                out.payload_len()
            )));
        }
        let (round, kind) = match &task {
            Task::Fit(f) => (f.round, proto::TaskKind::Fit),
            Task::Evaluate(e) => (e.round, proto::TaskKind::Evaluate),
            Task::Step(s) => (s.round, proto::TaskKind::Step),
        };
        {
            let mut pending = lock(&session.pending);
            // Make room by forgetting tasks of earlier rounds (the server
            // stopped waiting for them), oldest first. A late reply to a
            // task still listed is read and dropped; one to a forgotten task
            // is a protocol error that closes the session (the client
            // reconnects). Every queued task is pending, so this also
            // bounds the session's queue.
            while pending.len() >= MAX_PENDING {
                let Some(oldest) = pending
                    .iter()
                    .filter(|(_, p)| p.round < round)
                    .map(|(id, _)| *id)
                    .min()
                else {
                    break;
                };
                pending.remove(&oldest);
                let mut forgotten = lock(&session.forgotten);
                if forgotten.len() == FORGOTTEN {
                    forgotten.pop_front();
                }
                forgotten.push_back(oldest);
            }
            if pending.len() >= MAX_PENDING {
                return Err(Error::Transport(format!(
                    "`{client}` has {} unanswered tasks",
                    pending.len()
                )));
            }
            // An update is at most the model's size in the clear plus its
            // sealed part; twice the task's payload leaves room for a sealed
            // encoding that differs between a global and an update.
            let max_reply_bytes = match &task {
                Task::Fit(_) => out.payload_len().saturating_mul(2).saturating_add(1 << 20),
                Task::Step(s) => s.max_reply_bytes.min(limit),
                Task::Evaluate(_) => 0,
            };
            pending.insert(
                task_id,
                Pending {
                    reply_to,
                    round,
                    kind,
                    max_reply_bytes,
                    task: out.clone(),
                },
            );
        }
        if (session.cancel.is_cancelled() || session.queue.send(Out::Task(out, None)).is_err())
            && lock(&session.pending).remove(&task_id).is_some()
        {
            return Err(Error::Transport(format!("`{client}` disconnected")));
        }
        Ok(())
    }
}
