//! A deployed server's hospitals on the wire (`/api/connections`): each
//! one's session (connected, last heartbeat, certificate fingerprint and
//! expiry), its certificates on the roster, the connections the roster
//! refused; revoking a hospital's certificates and listing its new one.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Permission;
use crate::federation::RosterError;
use crate::store::{AuditAction, ClientStatus, ConnectionRow, RefusalRow};

use super::{ApiError, ApiResult, AppState, ErrorBody, Session};

/// Refused connections listed by `GET /api/connections`.
const REFUSALS_LISTED: i64 = 50;

/// A certificate on the server's roster.
#[derive(Serialize, ToSchema)]
pub struct CertificateView {
    /// SHA-256 fingerprint.
    pub fingerprint: String,
    /// Serial number (hex).
    pub serial: String,
    /// Refused from now on.
    pub revoked: bool,
}

/// A model moving to or from a hospital now (live, not stored).
#[derive(Serialize, ToSchema)]
pub struct TransferView {
    /// `download` (a task to the hospital) or `upload` (its reply).
    pub direction: String,
    /// Payload bytes moved so far.
    pub bytes: u64,
    /// The payload's size in bytes.
    pub total: u64,
    /// Bytes per second since it (re)started.
    pub rate_bytes_per_s: f64,
    /// Seconds left at that rate (`None` before any byte moved).
    pub eta_s: Option<f64>,
    /// It resumed after a dropped connection.
    pub resumed: bool,
}

/// A hospital of the deployment.
#[derive(Serialize, ToSchema)]
pub struct SiteView {
    /// The hospital.
    pub site: String,
    /// It holds an open session now.
    pub connected: bool,
    /// Its latest session (`None`: it never connected to this server).
    pub connection: Option<ConnectionRow>,
    /// Its certificates on the roster, oldest first (empty when the
    /// roster does not know it).
    pub certificates: Vec<CertificateView>,
    /// Suspended on the dashboard: no work from the next round on.
    pub suspended: bool,
    /// Its transfers in progress (the server also logs them every 5 s).
    pub transfers: Vec<TransferView>,
}

/// The deployment's hospitals and the refused connections.
#[derive(Serialize, ToSchema)]
pub struct ConnectionsView {
    /// Whether this process is a deployed server (the simulation has no
    /// connections and no roster).
    pub deployed: bool,
    /// The hospitals on the roster or ever connected, by name.
    pub sites: Vec<SiteView>,
    /// The newest refused connections, newest first (at most 50).
    pub refused: Vec<RefusalRow>,
}

async fn site_views(state: &AppState, only: Option<&str>) -> ApiResult<Vec<SiteView>> {
    let roster = match &state.federation {
        Some(link) => link.roster()?.certificates,
        None => Vec::new(),
    };
    let connections = state.store.connections().await?;
    let transfers = state
        .federation
        .as_ref()
        .map(|link| link.monitor().transfers())
        .unwrap_or_default();
    let suspended: Vec<String> = state
        .store
        .clients()
        .await?
        .into_iter()
        .filter(|c| c.status == ClientStatus::Suspended)
        .map(|c| c.id)
        .collect();
    let mut names: Vec<String> = roster
        .iter()
        .map(|c| c.identity.clone())
        .chain(connections.iter().map(|c| c.site.clone()))
        .filter(|n| only.is_none_or(|o| o == n))
        .collect();
    names.sort();
    names.dedup();
    Ok(names
        .into_iter()
        .map(|site| {
            let connection = connections.iter().find(|c| c.site == site).cloned();
            SiteView {
                connected: connection.as_ref().is_some_and(|c| c.closed_at.is_none()),
                connection,
                certificates: roster
                    .iter()
                    .filter(|c| c.identity == site)
                    .map(|c| CertificateView {
                        fingerprint: c.fingerprint.clone(),
                        serial: c.serial.clone(),
                        revoked: c.revoked,
                    })
                    .collect(),
                suspended: suspended.contains(&site),
                transfers: transfers
                    .iter()
                    .filter(|t| t.identity == site)
                    .map(|t| TransferView {
                        direction: t.direction.clone(),
                        bytes: t.bytes,
                        total: t.total,
                        rate_bytes_per_s: t.rate_bytes_per_s,
                        eta_s: t.eta_s,
                        resumed: t.resumed,
                    })
                    .collect(),
                site,
            }
        })
        .collect())
}

#[utoipa::path(get, path = "/api/connections", tag = "clients",
    responses((status = 200, body = ConnectionsView), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody)))]
pub(super) async fn list_connections(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Json<ConnectionsView>> {
    session
        .require(&state, Permission::ViewMetrics, "view connections")
        .await?;
    Ok(Json(ConnectionsView {
        deployed: state.federation.is_some(),
        sites: site_views(&state, None).await?,
        refused: state.store.refusals(REFUSALS_LISTED).await?,
    }))
}

fn roster_error(e: RosterError) -> ApiError {
    match e {
        RosterError::UnknownSite => ApiError::not_found("hospital on the roster"),
        RosterError::AlreadyRevoked => ApiError::new(
            StatusCode::CONFLICT,
            "every certificate of this hospital is revoked already",
        ),
        RosterError::Invalid(m) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, m),
        RosterError::Failed(e) => e.into(),
    }
}

fn link(state: &AppState) -> ApiResult<&std::sync::Arc<crate::federation::FederationLink>> {
    state.federation.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "this process is not a deployed server: it has no roster",
        )
    })
}

async fn one_site(state: &AppState, site: &str) -> ApiResult<SiteView> {
    site_views(state, Some(site))
        .await?
        .pop()
        .ok_or_else(|| ApiError::not_found("hospital on the roster"))
}

#[utoipa::path(post, path = "/api/connections/{site}/revoke", tag = "clients",
    params(("site" = String, Path, description = "hospital id")),
    responses((status = 200, body = SiteView), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
pub(super) async fn revoke(
    State(state): State<AppState>,
    session: Session,
    Path(site): Path<String>,
) -> ApiResult<Json<SiteView>> {
    session
        .require(&state, Permission::ManageClients, "revoke a certificate")
        .await?;
    let link = link(&state)?.clone();
    let name = site.clone();
    let n = tokio::task::spawn_blocking(move || link.revoke(&name))
        .await
        .map_err(|e| anyhow::anyhow!("roster task: {e}"))?
        .map_err(roster_error)?;
    let detail = format!("{n} certificate(s) revoked");
    session
        .audit(
            &state,
            AuditAction::CertificateRevoked,
            Some(&site),
            Some(&detail),
        )
        .await?;
    Ok(Json(one_site(&state, &site).await?))
}

/// A hospital's new certificate.
#[derive(Deserialize, ToSchema)]
pub struct NewCertificate {
    /// The certificate in PEM (`cert.pem` of the new kit), issued by the
    /// project CA.
    pub certificate: String,
}

#[utoipa::path(post, path = "/api/connections/{site}/certificate", tag = "clients",
    request_body = NewCertificate,
    params(("site" = String, Path, description = "hospital id")),
    responses((status = 200, body = SiteView), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub(super) async fn rotate(
    State(state): State<AppState>,
    session: Session,
    Path(site): Path<String>,
    Json(req): Json<NewCertificate>,
) -> ApiResult<Json<SiteView>> {
    session
        .require(&state, Permission::ManageClients, "rotate a certificate")
        .await?;
    let link = link(&state)?.clone();
    let name = site.clone();
    let entry = tokio::task::spawn_blocking(move || link.rotate(&name, &req.certificate))
        .await
        .map_err(|e| anyhow::anyhow!("roster task: {e}"))?
        .map_err(roster_error)?;
    let detail = format!("new certificate {}", entry.fingerprint);
    session
        .audit(
            &state,
            AuditAction::CertificateRotated,
            Some(&site),
            Some(&detail),
        )
        .await?;
    Ok(Json(one_site(&state, &site).await?))
}
