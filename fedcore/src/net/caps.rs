//! Bounds on what remote peers can hold open on a server: connections in
//! all and per address (counted from accept until the socket closes, TLS
//! handshakes included), and session calls per site. [`Connections`] and
//! [`Counted`] are public for other servers over the same machine's
//! sockets (the hospital dashboard caps its connections with them).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts of open things by key, with a cap in all and per key.
#[derive(Debug)]
struct Counts<K> {
    total: usize,
    by_key: HashMap<K, usize>,
}

#[derive(Debug)]
struct Counter<K> {
    counts: Mutex<Counts<K>>,
    max: usize,
    max_per_key: usize,
    /// Keys the per-key cap does not apply to.
    exempt: Vec<K>,
}

impl<K: std::hash::Hash + Eq + Clone> Counter<K> {
    fn new(max: usize, max_per_key: usize, exempt: Vec<K>) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::new(Counts {
                total: 0,
                by_key: HashMap::new(),
            }),
            max,
            max_per_key,
            exempt,
        })
    }

    /// Takes a place for `key`, or says which cap is reached.
    fn take(self: &Arc<Self>, key: K) -> Result<Slot<K>, Full> {
        let mut c = lock(&self.counts);
        if c.total >= self.max {
            return Err(Full::Total(self.max));
        }
        let n = c.by_key.get(&key).copied().unwrap_or(0);
        if n >= self.max_per_key && !self.exempt.contains(&key) {
            return Err(Full::PerKey(self.max_per_key));
        }
        *c.by_key.entry(key.clone()).or_insert(0) += 1;
        c.total += 1;
        Ok(Slot {
            counter: Arc::clone(self),
            key,
        })
    }

    fn total(&self) -> usize {
        lock(&self.counts).total
    }
}

/// Which cap refused a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The cap on everything.
    Total(usize),
    /// The cap per address or per site.
    PerKey(usize),
}

/// A place held until dropped.
#[derive(Debug)]
pub struct Slot<K: std::hash::Hash + Eq + Clone> {
    counter: Arc<Counter<K>>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Slot<K> {
    fn drop(&mut self) {
        let mut c = lock(&self.counter.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.by_key.remove(&self.key);
            }
        }
    }
}

/// Milliseconds on a monotonic clock that starts with the first reading.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The bytes a connection has moved each way and when each way last moved
/// any: a link's liveness measured by progress rather than by whole
/// messages. A 1 MiB chunk on a 50 KB/s link arrives as one message after
/// 20 s, but its bytes arrive all the time; a stalled link moves none.
#[derive(Debug)]
pub struct Progress {
    read: AtomicU64,
    written: AtomicU64,
    last_read_ms: AtomicU64,
    last_written_ms: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        let now = clock_ms();
        Self {
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            last_read_ms: AtomicU64::new(now),
            last_written_ms: AtomicU64::new(now),
        }
    }
}

impl Progress {
    /// Bytes read from the peer so far (TLS records included).
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Bytes written to the socket so far.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// How long since a byte came from the peer. Everything the peer sends
    /// counts: data, its heartbeats, and the HTTP/2 window updates it sends
    /// as it takes in what we send, so this stays short while a transfer
    /// in either direction moves, however slowly.
    pub fn since_read(&self) -> Duration {
        Duration::from_millis(clock_ms().saturating_sub(self.last_read_ms.load(Ordering::Relaxed)))
    }

    /// How long since a byte left for the peer. HTTP/2 flow control stops
    /// our writes when the peer stops taking in data, so this grows when
    /// the peer (or the link) stops reading.
    pub fn since_written(&self) -> Duration {
        Duration::from_millis(
            clock_ms().saturating_sub(self.last_written_ms.load(Ordering::Relaxed)),
        )
    }

    fn on_read(&self, n: usize) {
        if n > 0 {
            self.read.fetch_add(n as u64, Ordering::Relaxed);
            self.last_read_ms.store(clock_ms(), Ordering::Relaxed);
        }
    }

    fn on_write(&self, n: usize) {
        if n > 0 {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
            self.last_written_ms.store(clock_ms(), Ordering::Relaxed);
        }
    }
}

/// An I/O stream whose bytes are counted into a [`Progress`].
#[derive(Debug)]
pub(crate) struct Tracked<IO> {
    io: IO,
    progress: Arc<Progress>,
}

impl<IO> Tracked<IO> {
    pub(crate) fn new(io: IO, progress: Arc<Progress>) -> Self {
        Self { io, progress }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.progress.on_read(buf.filled().len() - before);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.progress.on_write(n);
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.progress.on_write(n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

type Links = Arc<Mutex<HashMap<SocketAddr, Arc<Progress>>>>;

/// Open connections, in all and per peer address (IPv4-mapped IPv6 counted
/// as IPv4), each with its [`Progress`].
#[derive(Debug, Clone)]
pub struct Connections {
    counter: Arc<Counter<IpAddr>>,
    links: Links,
}

impl Connections {
    /// At most `max` connections, `max_per_address` from one address.
    pub fn new(max: usize, max_per_address: usize) -> Self {
        Self::with_exempt(max, max_per_address, &[])
    }

    /// The same caps, except that `exempt` addresses (a reverse proxy that
    /// carries many clients) have no cap of their own.
    pub fn with_exempt(max: usize, max_per_address: usize, exempt: &[IpAddr]) -> Self {
        let exempt = exempt.iter().map(IpAddr::to_canonical).collect();
        Self {
            counter: Counter::new(max, max_per_address, exempt),
            links: Arc::default(),
        }
    }

    /// The accepted socket, counted until it closes; `None` (the socket is
    /// dropped, which closes it) over a cap.
    pub fn admit(&self, io: TcpStream) -> Option<Counted> {
        let peer = io.peer_addr().ok()?;
        // As the client does: small messages (a welcome, a step's answer)
        // go out at once instead of waiting for Nagle's timer.
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(peer = %peer, error = %e, "TCP_NODELAY not set");
        }
        let ip = peer.ip().to_canonical();
        match self.counter.take(ip) {
            Ok(slot) => {
                let progress = Arc::new(Progress::default());
                lock(&self.links).insert(peer, progress.clone());
                Some(Counted {
                    io: Tracked::new(io, progress),
                    peer,
                    links: self.links.clone(),
                    _slot: slot,
                })
            }
            Err(full) => {
                tracing::warn!(peer = %ip, ?full, "connection refused: too many open connections");
                None
            }
        }
    }

    /// How many are open.
    pub fn open(&self) -> usize {
        self.counter.total()
    }

    /// The progress of the open connection from `peer`.
    pub fn progress(&self, peer: SocketAddr) -> Option<Arc<Progress>> {
        lock(&self.links).get(&peer).cloned()
    }
}

/// Session calls (saying hello, or live) per site.
#[derive(Debug, Clone)]
pub(crate) struct SiteSessions(Arc<Counter<String>>);

/// A site's place for one session call.
pub(crate) type SiteSlot = Slot<String>;

impl SiteSessions {
    pub(crate) fn new(max_per_site: usize) -> Self {
        Self(Counter::new(usize::MAX, max_per_site, Vec::new()))
    }

    pub(crate) fn take(&self, site: &str) -> Result<SiteSlot, Full> {
        self.0.take(site.to_owned())
    }
}

/// A TCP connection holding its place among the open connections, its
/// bytes counted into its [`Progress`].
#[derive(Debug)]
pub struct Counted {
    io: Tracked<TcpStream>,
    peer: SocketAddr,
    links: Links,
    _slot: Slot<IpAddr>,
}

impl Counted {
    /// The socket.
    pub fn get_ref(&self) -> &TcpStream {
        &self.io.io
    }

    /// Its bytes each way and when they last moved.
    pub fn progress(&self) -> &Arc<Progress> {
        &self.io.progress
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut links = lock(&self.links);
        // A new connection from the same address and port replaced it.
        if links
            .get(&self.peer)
            .is_some_and(|p| Arc::ptr_eq(p, &self.io.progress))
        {
            links.remove(&self.peer);
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_capped_in_all_and_per_key_and_freed_on_drop() {
        let c = Counter::new(3, 2, vec!["x"]);
        let a1 = c.take("a").unwrap();
        let _a2 = c.take("a").unwrap();
        assert_eq!(c.take("a").unwrap_err(), Full::PerKey(2));
        let _b = c.take("b").unwrap();
        assert_eq!(c.take("c").unwrap_err(), Full::Total(3));
        drop(a1);
        assert_eq!(c.total(), 2);
        let _c = c.take("c").unwrap();
        assert_eq!(c.take("a").unwrap_err(), Full::Total(3));
        // An exempt key has no cap of its own, only the total.
        let c = Counter::new(5, 1, vec!["x"]);
        let held: Vec<_> = (0..4).map(|_| c.take("x").unwrap()).collect();
        assert_eq!(held.len(), 4);
        let _y = c.take("y").unwrap();
        assert_eq!(c.take("x").unwrap_err(), Full::Total(5));
    }
}
