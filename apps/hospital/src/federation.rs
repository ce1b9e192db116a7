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
    /// on. Returns how many certificates were active. Blocking (the
    /// roster's file lock, [`Roster::update`]).
    pub fn revoke(&self, site: &str) -> std::result::Result<usize, RosterError> {
        let mut refused = None;
        let revoked = Roster::update(&self.roster_path, |roster| {
            let n = roster.revoke(site);
            if n == 0 {
                refused = Some(if roster.certificates.iter().any(|c| c.identity == site) {
                    RosterError::AlreadyRevoked
                } else {
                    RosterError::UnknownSite
                });
                // Nothing changed: fail, so that nothing is written.
                return Err(fedcore::Error::InvalidInput("unchanged".into()));
            }
            Ok(n)
        });
        match (refused, revoked) {
            (Some(r), _) => Err(r),
            (None, Ok(n)) => Ok(n),
            (None, Err(e)) => Err(RosterError::Failed(e.into())),
        }
    }

    /// Lists `site`'s new certificate (PEM, issued by the project CA where
    /// its key is kept, e.g. `fedcore-deploy rotate`) and revokes its
    /// others: the site connects with the new kit from now on. Blocking.
    pub fn rotate(
        &self,
        site: &str,
        cert_pem: &str,
    ) -> std::result::Result<RosterEntry, RosterError> {
        let mut refused = None;
        let entry = Roster::update(&self.roster_path, |roster| {
            if !roster.certificates.iter().any(|c| c.identity == site) {
                refused = Some(RosterError::UnknownSite);
                return Err(fedcore::Error::InvalidInput("unknown site".into()));
            }
            // Checked on a copy: a certificate for another site changes nothing.
            let mut changed = roster.clone();
            let entry = match changed.add_certificate(cert_pem, &self.ca_pem, false) {
                Ok(e) if e.identity == site => e,
                Ok(e) => {
                    let m = format!("the certificate is `{}`'s, not `{site}`'s", e.identity);
                    refused = Some(RosterError::Invalid(m.clone()));
                    return Err(fedcore::Error::InvalidInput(m));
                }
                Err(e) => {
                    refused = Some(RosterError::Invalid(e.to_string()));
                    return Err(e);
                }
            };
            roster.revoke(site);
            roster.certificates.push(entry.clone());
            Ok(entry)
        });
        match (refused, entry) {
            (Some(r), _) => Err(r),
            (None, Ok(e)) => Ok(e),
            (None, Err(e)) => Err(RosterError::Failed(e.into())),
        }
    }
}

/// Every second: each hospital's session into `site_connections` (when it
/// changed), new refused connections into `connection_refusals`, and each
/// connected hospital into `clients` (so that it can be suspended before
/// its first update). Runs until its task is dropped; a row the store
/// refuses is logged and tried again at the next tick, without holding up
/// the others (no refusal is skipped: they are written in order).
pub async fn record_connections(store: Store, monitor: NetMonitor) {
    let mut written: HashMap<String, ConnectionRow> = HashMap::new();
    let mut seq = 0u64;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for e in record_once(&store, &monitor, &mut written, &mut seq).await {
            tracing::warn!(error = %format!("{e:#}"), "connection not recorded; retrying");
        }
    }
}

/// One pass of [`record_connections`]; returns what the store refused.
pub async fn record_once(
    store: &Store,
    monitor: &NetMonitor,
    written: &mut HashMap<String, ConnectionRow>,
    seq: &mut u64,
) -> Vec<anyhow::Error> {
    let mut errors = Vec::new();
    for site in monitor.sites() {
        let row = ConnectionRow::from(&site);
        if written.get(&row.site) == Some(&row) {
            continue;
        }
        let stored = async {
            if !written.contains_key(&row.site) {
                store.ensure_client(&row.site).await?;
            }
            store.record_connection(&row).await
        };
        match stored.await {
            Ok(()) => {
                written.insert(row.site.clone(), row);
            }
            Err(e) => errors.push(e.context(format!("the session of `{}`", row.site))),
        }
    }
    let refused = monitor.refused_since(*seq);
    if let Some(first) = refused.first()
        && first.seq > *seq + 1
    {
        tracing::warn!(
            missed = first.seq - *seq - 1,
            "refused connections came faster than they were recorded; some are not in the store"
        );
    }
    for r in refused {
        if let Err(e) = store.record_refusal(&RefusalRow::from(&r)).await {
            errors.push(e.context("a refused connection"));
            break; // in order: the rest next time
        }
        *seq = r.seq;
    }
    errors
}
