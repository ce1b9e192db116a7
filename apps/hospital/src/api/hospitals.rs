//! The hospitals: their view, trust timeline and status (`/api/clients`).

use axum::Json;
use axum::extract::{Path, State};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Permission;
use crate::store::{AuditAction, ClientRow, ClientStatus, TrustRow};

use super::{ApiError, ApiResult, AppState, ErrorBody, JobQuery, JobSel, Session};

/// A hospital with its latest numbers.
#[derive(Serialize, ToSchema)]
pub struct ClientView {
    /// The hospital.
    #[serde(flatten)]
    pub client: ClientRow,
    /// Its latest trust score.
    pub trust: Option<f64>,
    /// Its latest moving-average trust.
    pub trust_ema: Option<f64>,
    /// Whether it is flagged as suspicious.
    pub suspicious: bool,
    /// Epsilon spent so far.
    pub epsilon: Option<f64>,
    /// Rounds where its update counted.
    pub rounds_accepted: i64,
    /// Rounds where it did not.
    pub rounds_rejected: i64,
}

pub(super) async fn client_view(state: &AppState, job: i64, c: ClientRow) -> ApiResult<ClientView> {
    let trust = state.store.trust(job, &c.id).await?;
    let updates = state.store.updates(job, None, Some(&c.id)).await?;
    let last = trust.last();
    Ok(ClientView {
        trust: last.map(|t| t.trust),
        trust_ema: last.and_then(|t| t.trust_ema),
        suspicious: last.is_some_and(|t| t.suspicious),
        epsilon: updates.iter().rev().find_map(|u| u.epsilon),
        rounds_accepted: updates.iter().filter(|u| u.accepted).count() as i64,
        rounds_rejected: updates.iter().filter(|u| !u.accepted).count() as i64,
        client: c,
    })
}

#[utoipa::path(get, path = "/api/clients", tag = "clients", params(JobQuery),
    responses((status = 200, body = [ClientView]), (status = 401, body = ErrorBody)))]
pub(super) async fn list_clients(
    State(state): State<AppState>,
    session: Session,
    JobSel(job): JobSel,
) -> ApiResult<Json<Vec<ClientView>>> {
    session
        .require(&state, Permission::ViewMetrics, "view clients")
        .await?;
    let mut out = Vec::new();
    for c in state.store.clients().await? {
        out.push(client_view(&state, job, c).await?);
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/clients/{id}", tag = "clients",
    params(("id" = String, Path, description = "hospital id"), JobQuery),
    responses((status = 200, body = ClientView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_client(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    JobSel(job): JobSel,
) -> ApiResult<Json<ClientView>> {
    session
        .require(&state, Permission::ViewMetrics, "view clients")
        .await?;
    let c = state
        .store
        .client(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("client"))?;
    Ok(Json(client_view(&state, job, c).await?))
}

#[utoipa::path(get, path = "/api/clients/{id}/trust", tag = "clients",
    params(("id" = String, Path, description = "hospital id"), JobQuery),
    responses((status = 200, body = [TrustRow]), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn client_trust(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    JobSel(job): JobSel,
) -> ApiResult<Json<Vec<TrustRow>>> {
    session
        .require(&state, Permission::ViewMetrics, "view clients")
        .await?;
    state
        .store
        .client(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("client"))?;
    Ok(Json(state.store.trust(job, &id).await?))
}

/// A status change.
#[derive(Deserialize, ToSchema)]
pub struct StatusChange {
    /// The new status.
    pub status: ClientStatus,
}

#[utoipa::path(patch, path = "/api/clients/{id}/status", tag = "clients", request_body = StatusChange,
    params(("id" = String, Path, description = "hospital id")),
    responses((status = 200, body = ClientView), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn set_client_status(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
    Json(req): Json<StatusChange>,
) -> ApiResult<Json<ClientView>> {
    session
        .require(
            &state,
            Permission::ManageClients,
            "change a client's status",
        )
        .await?;
    let status = req.status;
    let before = state
        .store
        .client(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("client"))?;
    state.store.set_client_status(&id, status).await?;
    if let Ok(mut s) = state.shared.suspended.lock() {
        match status {
            ClientStatus::Suspended => s.insert(id.clone()),
            ClientStatus::Active => s.remove(&id),
        };
    }
    // A deployed server leaves it out of the next round to start.
    if let Some(link) = &state.federation {
        link.suspend(&id, status == ClientStatus::Suspended);
    }
    let detail = format!("{} -> {}", before.status.as_str(), status.as_str());
    session
        .audit(
            &state,
            AuditAction::ClientStatusChange,
            Some(&id),
            Some(&detail),
        )
        .await?;
    let c = state
        .store
        .client(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("client"))?;
    let job = state.store.current_job().await?.unwrap_or(0);
    Ok(Json(client_view(&state, job, c).await?))
}
