//! What the server knows of its sites' connections, for an operator's
//! page: [`NetMonitor`], from [`super::GrpcTransport::monitor`]. Each site's
//! session (certificate fingerprint and expiry, address, when it connected,
//! its last message) and the connections the roster refused, revoked and
//! off-roster certificates alike, numbered so that a reader can take only
//! the new ones.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use super::now_ms;
use super::provision::Refusal;
use super::server::Shared;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Refused connections kept for [`NetMonitor::refused_since`]; older ones
/// are dropped (the sequence numbers show the gap).
pub const REFUSALS_KEPT: usize = 256;

/// A site's latest session: open, or how it closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteConnection {
    /// The site (its certificate's common name).
    pub identity: String,
    /// SHA-256 fingerprint of the certificate it connected with.
    pub fingerprint: String,
    /// When that certificate expires (ms since the Unix epoch).
    pub not_after_ms: Option<i64>,
    /// The address it connected from.
    pub peer: Option<String>,
    /// When the session opened (ms since the Unix epoch).
    pub connected_at_ms: i64,
    /// Its last message, heartbeats included (ms since the Unix epoch).
    pub last_seen_ms: i64,
    /// `None` while the session is open.
    pub closed: Option<Closed>,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    /// When (ms since the Unix epoch).
    pub at_ms: i64,
    /// Why ("connection lost: ...", "no message for 10000 ms", a revocation).
    pub reason: String,
}

/// Why the roster refused a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RefusedKind {
    /// Signed by the project CA but not on the roster.
    NotOnRoster,
    /// On the roster, revoked.
    Revoked,
    /// The roster lists the certificate under another name than its own.
    IdentityMismatch,
}

impl From<&Refusal> for RefusedKind {
    fn from(r: &Refusal) -> Self {
        match r {
            Refusal::Revoked { .. } => RefusedKind::Revoked,
            Refusal::Mismatch { .. } => RefusedKind::IdentityMismatch,
            _ => RefusedKind::NotOnRoster,
        }
    }
}

/// A connection refused after the TLS handshake (a certificate from
/// another CA never gets this far: the handshake fails).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// Numbered from 1 in the order they happened.
    pub seq: u64,
    /// When (ms since the Unix epoch).
    pub at_ms: i64,
    /// The certificate's common name.
    pub identity: String,
    /// Its SHA-256 fingerprint.
    pub fingerprint: String,
    /// When it expires (ms since the Unix epoch).
    pub not_after_ms: Option<i64>,
    /// The address it came from.
    pub peer: Option<String>,
    /// Why, in the roster's words.
    pub kind: RefusedKind,
    /// The full reason.
    pub reason: String,
    /// An open session closed because its certificate left the roster (a
    /// revocation while connected), rather than a new connection refused.
    pub closed_session: bool,
}

/// The record behind [`NetMonitor`], kept by the server's sessions.
#[derive(Debug, Default)]
pub(super) struct ConnectionLog {
    sites: Mutex<BTreeMap<String, SiteConnection>>,
    /// The refusals kept and the last number given, under one lock: they
    /// are listed in the order of their numbers.
    refused: Mutex<(VecDeque<Refused>, u64)>,
}

/// What a session is, for the log.
pub(super) struct Peer<'a> {
    pub(super) identity: &'a str,
    pub(super) fingerprint: &'a str,
    pub(super) not_after_ms: Option<i64>,
    pub(super) peer: Option<String>,
}

impl ConnectionLog {
    pub(super) fn opened(&self, p: Peer<'_>) {
        let now = now_ms() as i64;
        lock(&self.sites).insert(
            p.identity.to_owned(),
            SiteConnection {
                identity: p.identity.to_owned(),
                fingerprint: p.fingerprint.to_owned(),
                not_after_ms: p.not_after_ms,
                peer: p.peer,
                connected_at_ms: now,
                last_seen_ms: now,
                closed: None,
            },
        );
    }

    /// The site's current session ended (a replaced session is not the
    /// current one and does not come here).
    pub(super) fn closed(&self, identity: &str, last_seen_ms: i64, reason: &str) {
        if let Some(s) = lock(&self.sites).get_mut(identity) {
            s.last_seen_ms = last_seen_ms;
            s.closed = Some(Closed {
                at_ms: now_ms() as i64,
                reason: reason.to_owned(),
            });
        }
    }

    pub(super) fn refused(&self, p: Peer<'_>, refusal: &Refusal, closed_session: bool) {
        let mut guard = lock(&self.refused);
        let (refused, last) = &mut *guard;
        *last += 1;
        let r = Refused {
            seq: *last,
            at_ms: now_ms() as i64,
            identity: p.identity.to_owned(),
            fingerprint: p.fingerprint.to_owned(),
            not_after_ms: p.not_after_ms,
            peer: p.peer,
            kind: refusal.into(),
            reason: refusal.to_string(),
            closed_session,
        };
        if refused.len() == REFUSALS_KEPT {
            refused.pop_front();
        }
        refused.push_back(r);
    }
}

/// A handle on the server's view of its sites, cheap to clone and to keep
/// on another thread (a dashboard's). It reads; it changes nothing.
#[derive(Clone)]
pub struct NetMonitor {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for NetMonitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetMonitor").finish_non_exhaustive()
    }
}

impl NetMonitor {
    /// Every site that held a session since the server started: its open
    /// session (with the time of its last message), or its last one and
    /// how it closed. By identity.
    pub fn sites(&self) -> Vec<SiteConnection> {
        let mut sites = lock(&self.shared.log.sites).clone();
        let now = now_ms() as i64;
        for (identity, silent) in self.shared.open_sessions() {
            if let Some(s) = sites.get_mut(&identity)
                && s.closed.is_none()
            {
                s.last_seen_ms = now - silent.as_millis() as i64;
            }
        }
        sites.into_values().collect()
    }

    /// The transfers in progress (a task's download, a reply's upload):
    /// bytes so far, rate and time left, per site. Also logged every 5 s.
    pub fn transfers(&self) -> Vec<super::Transfer> {
        self.shared.transfers()
    }

    /// The refused connections numbered after `seq` (0: all kept), oldest
    /// first; at most [`REFUSALS_KEPT`] (a reader that falls further behind
    /// sees a gap in the numbers).
    pub fn refused_since(&self, seq: u64) -> Vec<Refused> {
        lock(&self.shared.log.refused)
            .0
            .iter()
            .filter(|r| r.seq > seq)
            .cloned()
            .collect()
    }
}
