//! Bounds on what remote peers can hold open on a server: connections in
//! all and per address (counted from accept until the socket closes, TLS
//! handshakes included), and session calls per site. [`Connections`] and
//! [`Counted`] are public for other servers over the same machine's
//! sockets (the hospital dashboard caps its connections with them).

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

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

/// Open connections, in all and per peer address (IPv4-mapped IPv6 counted
/// as IPv4).
#[derive(Debug, Clone)]
pub struct Connections(Arc<Counter<IpAddr>>);

impl Connections {
    /// At most `max` connections, `max_per_address` from one address.
    pub fn new(max: usize, max_per_address: usize) -> Self {
        Self(Counter::new(max, max_per_address, Vec::new()))
    }

    /// The same caps, except that `exempt` addresses (a reverse proxy that
    /// carries many clients) have no cap of their own.
    pub fn with_exempt(max: usize, max_per_address: usize, exempt: &[IpAddr]) -> Self {
        let exempt = exempt.iter().map(IpAddr::to_canonical).collect();
        Self(Counter::new(max, max_per_address, exempt))
    }

    /// The accepted socket, counted until it closes; `None` (the socket is
    /// dropped, which closes it) over a cap.
    pub fn admit(&self, io: TcpStream) -> Option<Counted> {
        let ip = io.peer_addr().ok()?.ip().to_canonical();
        match self.0.take(ip) {
            Ok(slot) => Some(Counted { io, _slot: slot }),
            Err(full) => {
                tracing::warn!(peer = %ip, ?full, "connection refused: too many open connections");
                None
            }
        }
    }

    /// How many are open.
    pub fn open(&self) -> usize {
        self.0.total()
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

/// A TCP connection holding its place among the open connections.
#[derive(Debug)]
pub struct Counted {
    io: TcpStream,
    _slot: Slot<IpAddr>,
}

impl Counted {
    /// The socket.
    pub fn get_ref(&self) -> &TcpStream {
        &self.io
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
        self.io.connect_info()
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
