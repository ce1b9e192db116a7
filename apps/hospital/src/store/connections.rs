//! A deployed server's connections (the `site_connections` and
//! `connection_refusals` tables): each hospital's latest session as the
//! server's transport saw it, and the connections its roster refused.

use anyhow::Result;
use fedcore::net::{Refused, RefusedKind, SiteConnection};
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use super::Store;

/// Refused connections kept; older ones are deleted as new ones come (a
/// site retrying with a revoked certificate cannot fill the disk).
pub const REFUSALS_KEPT: i64 = 1000;

/// A hospital's latest session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct ConnectionRow {
    /// The hospital (its certificate's name).
    pub site: String,
    /// SHA-256 fingerprint of the certificate it connected with.
    pub fingerprint: String,
    /// When that certificate expires (ms since the Unix epoch).
    pub not_after: Option<i64>,
    /// The address it connected from.
    pub peer: Option<String>,
    /// When the session opened.
    pub connected_at: i64,
    /// Its last message (a heartbeat every 2 s while connected).
    pub last_seen: i64,
    /// When the session closed; `None` while it is open.
    pub closed_at: Option<i64>,
    /// Why it closed.
    pub close_reason: Option<String>,
}

impl From<&SiteConnection> for ConnectionRow {
    fn from(c: &SiteConnection) -> Self {
        Self {
            site: c.identity.clone(),
            fingerprint: c.fingerprint.clone(),
            not_after: c.not_after_ms,
            peer: c.peer.clone(),
            connected_at: c.connected_at_ms,
            last_seen: c.last_seen_ms,
            closed_at: c.closed.as_ref().map(|c| c.at_ms),
            close_reason: c.closed.as_ref().map(|c| c.reason.clone()),
        }
    }
}

/// A connection the roster refused, or a session it closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct RefusalRow {
    /// Its id (0 before it is stored).
    pub id: i64,
    /// When.
    pub at: i64,
    /// The certificate's name.
    pub site: String,
    /// Its fingerprint.
    pub fingerprint: String,
    /// When it expires.
    pub not_after: Option<i64>,
    /// The address it came from.
    pub peer: Option<String>,
    /// `not_on_roster`, `revoked` or `identity_mismatch`.
    pub kind: String,
    /// The roster's reason.
    pub reason: String,
    /// An open session closed by a revocation, not a new connection.
    pub closed_session: bool,
}

impl From<&Refused> for RefusalRow {
    fn from(r: &Refused) -> Self {
        let kind = match r.kind {
            RefusedKind::Revoked => "revoked",
            RefusedKind::IdentityMismatch => "identity_mismatch",
            _ => "not_on_roster",
        };
        Self {
            id: 0,
            at: r.at_ms,
            site: r.identity.clone(),
            fingerprint: r.fingerprint.clone(),
            not_after: r.not_after_ms,
            peer: r.peer.clone(),
            kind: kind.to_owned(),
            reason: r.reason.clone(),
            closed_session: r.closed_session,
        }
    }
}

impl Store {
    /// Records a hospital's latest session (replacing the one before).
    pub async fn record_connection(&self, c: &ConnectionRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO site_connections (site, fingerprint, not_after, peer, connected_at, \
             last_seen, closed_at, close_reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (site) DO UPDATE SET fingerprint = excluded.fingerprint, \
             not_after = excluded.not_after, peer = excluded.peer, \
             connected_at = excluded.connected_at, last_seen = excluded.last_seen, \
             closed_at = excluded.closed_at, close_reason = excluded.close_reason",
        )
        .bind(&c.site)
        .bind(&c.fingerprint)
        .bind(c.not_after)
        .bind(&c.peer)
        .bind(c.connected_at)
        .bind(c.last_seen)
        .bind(c.closed_at)
        .bind(&c.close_reason)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks every session the store still has open as closed at `at`
    /// with `reason` (a server that starts has no session yet: those rows
    /// were left by a process that ended); returns how many.
    pub async fn close_open_connections(&self, at: i64, reason: &str) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE site_connections SET closed_at = $1, close_reason = $2 WHERE closed_at IS NULL",
        )
        .bind(at)
        .bind(reason)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Every hospital's latest session, by name.
    pub async fn connections(&self) -> Result<Vec<ConnectionRow>> {
        sqlx::query(
            "SELECT site, fingerprint, not_after, peer, connected_at, last_seen, closed_at, \
             close_reason FROM site_connections ORDER BY site",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(ConnectionRow {
                site: r.try_get(0)?,
                fingerprint: r.try_get(1)?,
                not_after: r.try_get(2)?,
                peer: r.try_get(3)?,
                connected_at: r.try_get(4)?,
                last_seen: r.try_get(5)?,
                closed_at: r.try_get(6)?,
                close_reason: r.try_get(7)?,
            })
        })
        .collect()
    }

    /// Records a refused connection (its `id` is ignored) and deletes the
    /// oldest beyond [`REFUSALS_KEPT`]; returns its id.
    pub async fn record_refusal(&self, r: &RefusalRow) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let id: i64 = sqlx::query(
            "INSERT INTO connection_refusals (at, site, fingerprint, not_after, peer, kind, \
             reason, closed_session) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(r.at)
        .bind(&r.site)
        .bind(&r.fingerprint)
        .bind(r.not_after)
        .bind(&r.peer)
        .bind(&r.kind)
        .bind(&r.reason)
        .bind(i64::from(r.closed_session))
        .fetch_one(&mut *tx)
        .await?
        .try_get(0)?;
        sqlx::query("DELETE FROM connection_refusals WHERE id <= $1")
            .bind(id - REFUSALS_KEPT)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(id)
    }

    /// The `limit` newest refused connections, newest first.
    pub async fn refusals(&self, limit: i64) -> Result<Vec<RefusalRow>> {
        sqlx::query(
            "SELECT id, at, site, fingerprint, not_after, peer, kind, reason, closed_session \
             FROM connection_refusals ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(RefusalRow {
                id: r.try_get(0)?,
                at: r.try_get(1)?,
                site: r.try_get(2)?,
                fingerprint: r.try_get(3)?,
                not_after: r.try_get(4)?,
                peer: r.try_get(5)?,
                kind: r.try_get(6)?,
                reason: r.try_get(7)?,
                closed_session: r.try_get::<i64, _>(8)? != 0,
            })
        })
        .collect()
    }
}
