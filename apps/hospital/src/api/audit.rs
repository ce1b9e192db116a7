//! The audit log (`/api/audit`).

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;

use crate::auth::Permission;
use crate::store::AuditRow;

use super::{ApiResult, AppState, ErrorBody, Session};

/// Paging of the audit log: newest first; pass the smallest id of a page as
/// `before` to get the next (older) page.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct AuditQuery {
    /// At most this many entries (default 200, at most 1000).
    pub limit: Option<i64>,
    /// Only entries with an id below this one.
    pub before: Option<i64>,
}

#[utoipa::path(get, path = "/api/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = [AuditRow]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn audit_log(
    State(state): State<AppState>,
    session: Session,
    Query(q): Query<AuditQuery>,
) -> ApiResult<Json<Vec<AuditRow>>> {
    session
        .require(&state, Permission::ViewAudit, "read the audit log")
        .await?;
    Ok(Json(
        state
            .store
            .audit_page(None, q.before, q.limit.unwrap_or(200).clamp(1, 1000))
            .await?,
    ))
}
