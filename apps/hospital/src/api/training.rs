//! The run: rounds, the current round, stopping, the live event stream
//! (`/api/training`, `/api/events`) and the model export (`/api/model`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Serialize;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use utoipa::ToSchema;

use crate::auth::{self, Permission};
use crate::live::{LiveEvent, Progress, RunStatus};
use crate::store::{AuditAction, RoundRow, UpdateRow};

use super::{ApiError, ApiResult, AppState, ErrorBody, JobQuery, JobSel, Session};

#[utoipa::path(get, path = "/api/training/rounds", tag = "training", params(JobQuery),
    responses((status = 200, body = [RoundRow]), (status = 401, body = ErrorBody)))]
pub(super) async fn rounds(
    State(state): State<AppState>,
    session: Session,
    JobSel(job): JobSel,
) -> ApiResult<Json<Vec<RoundRow>>> {
    session
        .require(&state, Permission::ViewMetrics, "view training")
        .await?;
    Ok(Json(state.store.rounds(job).await?))
}

/// The round in progress.
#[derive(Serialize, ToSchema)]
pub struct CurrentRound {
    /// Where the run is.
    pub progress: Progress,
    /// The last recorded round.
    pub last: Option<RoundRow>,
}

#[utoipa::path(get, path = "/api/training/rounds/current", tag = "training", params(JobQuery),
    responses((status = 200, body = CurrentRound), (status = 401, body = ErrorBody)))]
pub(super) async fn current_round(
    State(state): State<AppState>,
    session: Session,
    JobSel(job): JobSel,
) -> ApiResult<Json<CurrentRound>> {
    session
        .require(&state, Permission::ViewMetrics, "view training")
        .await?;
    Ok(Json(CurrentRound {
        progress: progress(&state),
        last: state.store.rounds(job).await?.pop(),
    }))
}

#[utoipa::path(post, path = "/api/training/stop", tag = "training",
    responses((status = 202, description = "the run stops after its current round (its checkpoint is written; `--resume` continues it)", body = Progress),
              (status = 403, body = ErrorBody),
              (status = 409, description = "no run is training in this process", body = ErrorBody)))]
pub(super) async fn stop_training(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<(StatusCode, Json<Progress>)> {
    session
        .require(&state, Permission::ControlTraining, "stop training")
        .await?;
    let now = progress(&state);
    if !matches!(now.status, RunStatus::Preparing | RunStatus::Training) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no run is training in this process",
        ));
    }
    state.shared.stop.stop();
    if let Some(job) = now.job {
        state
            .store
            .move_job(
                job,
                &[crate::store::JobStatus::Running],
                crate::store::JobStatus::Stopping,
                None,
            )
            .await?;
    }
    session
        .audit(&state, AuditAction::TrainingStopped, None, None)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(now)))
}

pub(super) fn progress(state: &AppState) -> Progress {
    state
        .shared
        .progress
        .read()
        .map(|p| p.clone())
        .unwrap_or_else(|_| Progress::idle())
}

/// A round with each hospital's part.
#[derive(Serialize, ToSchema)]
pub struct RoundDetail {
    /// The round.
    pub round: RoundRow,
    /// Each sampled hospital: accepted (weight, trust, norm) or rejected (reason).
    pub updates: Vec<UpdateRow>,
    /// The held-out evaluation and aggregator numbers.
    pub metrics: BTreeMap<String, f64>,
}

#[utoipa::path(get, path = "/api/training/rounds/{id}", tag = "training",
    params(("id" = i64, Path, description = "round number"), JobQuery),
    responses((status = 200, body = RoundDetail), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn round_detail(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
    JobSel(job): JobSel,
) -> ApiResult<Json<RoundDetail>> {
    session
        .require(&state, Permission::ViewMetrics, "view training")
        .await?;
    let round = state
        .store
        .round(job, id)
        .await?
        .ok_or_else(|| ApiError::not_found("round"))?;
    let metrics = state
        .store
        .metrics(job, "", Some(id))
        .await?
        .remove(&id)
        .unwrap_or_default();
    Ok(Json(RoundDetail {
        round,
        updates: state.store.updates(job, Some(id), None).await?,
        metrics,
    }))
}

#[utoipa::path(get, path = "/api/model/export", tag = "model",
    responses((status = 200, description = "safetensors of the global model (AES-GCM sealed when a data key is configured)"),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(super) async fn export_model(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Response> {
    session
        .require(&state, Permission::ExportModel, "export the model")
        .await?;
    let (params, round) = state
        .predictor
        .parameters()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no model yet"))?;
    let bytes = params
        .to_safetensors([("round".to_owned(), round.to_string())])
        .map_err(anyhow::Error::from)?;
    let (body, name, ctype) = match &state.at_rest {
        Some(k) => (
            k.seal_bytes(&bytes)?.into_bytes(),
            format!("global-round-{round}.safetensors.enc"),
            "text/plain",
        ),
        None => (
            bytes,
            format!("global-round-{round}.safetensors"),
            "application/octet-stream",
        ),
    };
    session
        .audit(&state, AuditAction::ModelExport, Some(&name), None)
        .await?;
    Ok((
        [
            (header::CONTENT_TYPE, ctype.to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response())
}

#[utoipa::path(get, path = "/api/events", tag = "training",
    responses((status = 200, description = "server-sent events: round_started, round_finished, update_rejected, client_flagged, finished, failed", content_type = "text/event-stream"),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 429, description = "too many open event streams, for the user or the server", body = ErrorBody)))]
pub(super) async fn events(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    session
        .require(&state, Permission::ViewMetrics, "view training")
        .await?;
    let permit = state
        .streams
        .open(session.user.id)
        .map_err(|m| ApiError::new(StatusCode::TOO_MANY_REQUESTS, m))?;
    // The stream ends when the user's sessions end (signed out, erased,
    // password or role changed) and when the token expires; the browser
    // reconnects with its refreshed cookie, or gets a 401.
    let user = session.user.id;
    let mut revoked = state.revocations.subscribe();
    // A revocation between reading the session and subscribing would be
    // missed: read the version again now that nothing can be.
    if state.store.session(user).await?.map(|(_, v)| v) != Some(session.version) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this session has ended; sign in again",
        ));
    }
    let left = Duration::from_secs(session.exp.saturating_sub(auth::now_s()));
    let end = async move {
        let until_revoked = async {
            loop {
                match revoked.recv().await {
                    Ok(id) if id == user => break,
                    Ok(_) => {}
                    // It may have been this user's: the browser reconnects
                    // and is checked again.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await;
                    }
                }
            }
        };
        tokio::select! {
            () = until_revoked => {}
            () = tokio::time::sleep(left) => {}
        }
    };
    let stream = BroadcastStream::new(state.shared.events.subscribe()).filter_map(move |e| {
        // The stream holds its place until it is dropped.
        let _held = &permit;
        // A lagging browser skips events; it re-reads the REST endpoints.
        let e: LiveEvent = e.ok()?;
        let name = serde_json::to_value(&e)
            .ok()?
            .get("type")?
            .as_str()?
            .to_owned();
        Some(Ok(Event::default().event(name).json_data(&e).ok()?))
    });
    let stream = futures_util::StreamExt::take_until(stream, Box::pin(end));
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
