//! A deployed server's federation as the dashboard reaches it: the
//! transport's view of the hospitals' sessions ([`fedcore::net::NetMonitor`]),
//! recorded into the store every second by [`record_connections`], and the
//! admin actions that reach the federation ([`FederationLink`]): suspend a
//! hospital from the next round, revoke its certificates, list its new
//! certificate. The simulation has no link (its hospitals are threads).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use fedcore::net::NetMonitor;
use fedcore::net::provision::{Roster, RosterEntry};
use fedcore::{ClientId, Exclusions};

use crate::store::{ConnectionRow, RefusalRow, Store};

/// Why a roster change was refused, for the API's answer.
#[derive(Debug)]
pub enum RosterError {
    /// No such site on the roster.
    UnknownSite,
    /// The request cannot be done (a certificate that does not verify,
    /// one for another site, one already listed).
    Invalid(String),
    /// Every certificate of the site is revoked already.
    AlreadyRevoked,
    /// The roster file could not be read or written.
    Failed(anyhow::Error),
}

/// What the API can do to a deployed server's federation.
pub struct FederationLink {
    monitor: NetMonitor,
    exclusions: Exclusions,
    roster_path: PathBuf,
    ca_pem: String,
    /// One roster edit at a time (each is a read, a change and a write).
    edits: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for FederationLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FederationLink")
            .field("roster", &self.roster_path)
            .finish_non_exhaustive()
    }
}

impl FederationLink {
    /// The link of a server whose kit holds `roster_path` and `ca_pem`.
    pub fn new(
        monitor: NetMonitor,
        exclusions: Exclusions,
        roster_path: PathBuf,
        ca_pem: String,
    ) -> Self {
        Self {
            monitor,
            exclusions,
            roster_path,
            ca_pem,
            edits: tokio::sync::Mutex::new(()),
        }
    }

    /// The transport's view of the sessions.
    pub fn monitor(&self) -> &NetMonitor {
        &self.monitor
    }

    /// Keeps `site` out of every round that starts from now on (`true`),
    /// or lets it back in.
    pub fn suspend(&self, site: &str, suspended: bool) {
        let id = ClientId::new(site);
        if suspended {
            self.exclusions.exclude(id, "suspended by an administrator");
        } else {
            self.exclusions.include(&id);
        }
    }

    /// The roster as the file has it now.
    pub fn roster(&self) -> Result<Roster> {
        Roster::load(&self.roster_path).context("the server's roster")
    }

    /// Revokes every certificate of `site`: the transport closes its open
    /// session at its next heartbeat check (2 s) and refuses it from then
    /// on. Returns how many certificates were active.
    pub async fn revoke(&self, site: &str) -> std::result::Result<usize, RosterError> {
        let _edit = self.edits.lock().await;
        let mut roster = self.roster().map_err(RosterError::Failed)?;
        if !roster.certificates.iter().any(|c| c.identity == site) {
            return Err(RosterError::UnknownSite);
        }
        let n = roster.revoke(site);
        if n == 0 {
            return Err(RosterError::AlreadyRevoked);
        }
        roster
            .save(&self.roster_path)
            .map_err(|e| RosterError::Failed(e.into()))?;
        Ok(n)
    }

    /// Lists `site`'s new certificate (PEM, issued by the project CA where
    /// its key is kept, e.g. `fedcore-deploy rotate`) and revokes its
    /// others: the site connects with the new kit from now on.
    pub async fn rotate(
        &self,
        site: &str,
        cert_pem: &str,
    ) -> std::result::Result<RosterEntry, RosterError> {
        let _edit = self.edits.lock().await;
        let mut roster = self.roster().map_err(RosterError::Failed)?;
        if !roster.certificates.iter().any(|c| c.identity == site) {
            return Err(RosterError::UnknownSite);
        }
        // Checked on a copy: a certificate for another site changes nothing.
        let mut changed = roster.clone();
        let entry = changed
            .add_certificate(cert_pem, &self.ca_pem, false)
            .map_err(|e| RosterError::Invalid(e.to_string()))?;
        if entry.identity != site {
            return Err(RosterError::Invalid(format!(
                "the certificate is `{}`'s, not `{site}`'s",
                entry.identity
            )));
        }
        roster.revoke(site);
        roster.certificates.push(entry.clone());
        roster
            .save(&self.roster_path)
            .map_err(|e| RosterError::Failed(e.into()))?;
        Ok(entry)
    }
}

/// Every second: each hospital's session into `site_connections` (when it
/// changed), new refused connections into `connection_refusals`, and each
/// connected hospital into `clients` (so that it can be suspended before
/// its first update). Runs until its task is dropped; a store error is
/// logged and retried at the next tick (nothing is skipped).
pub async fn record_connections(store: Store, monitor: NetMonitor) {
    let mut written: HashMap<String, ConnectionRow> = HashMap::new();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = record_once(&store, &monitor, &mut written, &mut seq).await {
            tracing::warn!(error = %format!("{e:#}"), "connections not recorded; retrying");
        }
    }
}

/// One pass of [`record_connections`].
pub async fn record_once(
    store: &Store,
    monitor: &NetMonitor,
    written: &mut HashMap<String, ConnectionRow>,
    seq: &mut u64,
) -> Result<()> {
    for site in monitor.sites() {
        let row = ConnectionRow::from(&site);
        if written.get(&row.site) == Some(&row) {
            continue;
        }
        if !written.contains_key(&row.site) {
            store.ensure_client(&row.site).await?;
        }
        store.record_connection(&row).await?;
        written.insert(row.site.clone(), row);
    }
    for refused in monitor.refused_since(*seq) {
        store.record_refusal(&RefusalRow::from(&refused)).await?;
        *seq = refused.seq;
    }
    Ok(())
}
