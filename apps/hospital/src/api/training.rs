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
use crate::store::{AuditAction, RoundRow, TrustRow, UpdateRow};

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
    /// Why a hospital counted less than the others, or not at all.
    pub notes: Vec<RoundNote>,
}

/// Why one hospital counted less in a round, or not at all.
#[derive(Debug, Serialize, ToSchema, PartialEq)]
pub struct RoundNote {
    /// The hospital.
    pub client: String,
    /// What happened to its update, in words.
    pub note: String,
}

/// The notes of a round: every update not counted (with its reason), every
/// counted one whose weight is under half the counted ones' mean (with
/// what the aggregator weighs by), every hospital flagged suspicious.
pub fn round_notes(
    round: &RoundRow,
    updates: &[UpdateRow],
    trust: &BTreeMap<String, TrustRow>,
) -> Vec<RoundNote> {
    let weights: Vec<f64> = updates
        .iter()
        .filter(|u| u.accepted)
        .filter_map(|u| u.weight)
        .collect();
    let mean = weights.iter().sum::<f64>() / weights.len().max(1) as f64;
    // The store holds the aggregator's own name (`fedavg`,
    // `geometric-median`, `clip(median)+geometric-median`, `krum(f=1)`, ...).
    let agg = round.aggregator.to_lowercase();
    let by = if agg.contains("geometric-median") || agg.contains("geometricmedian") {
        "the geometric median gives an update far from the others less weight"
    } else if agg.contains("fedavg") {
        "FedAvg weighs each hospital by its images"
    } else if agg.contains("krum") {
        "Krum keeps the update closest to its neighbours"
    } else {
        "the aggregator's weight"
    };
    let mut notes = Vec::new();
    for u in updates {
        let mut say = |note: String| {
            notes.push(RoundNote {
                client: u.client_id.clone(),
                note,
            })
        };
        if !u.accepted {
            say(format!(
                "not counted: {}",
                u.reason.as_deref().unwrap_or("no reason recorded")
            ));
            continue;
        }
        if let Some(w) = u.weight
            && weights.len() > 1
            && mean > 0.0
            && w < 0.5 * mean
        {
            say(if w == 0.0 {
                format!("left out of the aggregate (weight 0): {by}")
            } else {
                format!(
                    "down-weighted: weight {w:.3}, {:.2} times the mean of the counted hospitals; {by}",
                    w / mean
                )
            });
        }
        if let Some(t) = trust.get(&u.client_id)
            && t.suspicious
        {
            say(format!(
                "flagged suspicious: trust {:.2} this round, moving average {} below the threshold",
                t.trust,
                t.trust_ema.map_or("-".into(), |e| format!("{e:.2}"))
            ));
        }
    }
    notes
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
    let updates = state.store.updates(job, Some(id), None).await?;
    let mut trust = BTreeMap::new();
    for u in updates.iter().filter(|u| u.accepted) {
        if let Some(t) = state
            .store
            .trust(job, &u.client_id)
            .await?
            .into_iter()
            .find(|t| t.round_id == id)
        {
            trust.insert(u.client_id.clone(), t);
        }
    }
    Ok(Json(RoundDetail {
        notes: round_notes(&round, &updates, &trust),
        round,
        updates,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn update(client: &str, weight: Option<f64>, reason: Option<&str>) -> UpdateRow {
        UpdateRow {
            round_id: 3,
            client_id: client.into(),
            accepted: reason.is_none(),
            reason: reason.map(Into::into),
            weight,
            trust: None,
            update_norm: None,
            num_examples: None,
            epsilon: None,
            delta: None,
            upload_bytes: None,
        }
    }

    #[test]
    fn a_round_says_who_counted_less_and_why() {
        let round = RoundRow {
            id: 3,
            outcome: "completed".into(),
            aggregator: "clip(median)+geometric-median".into(),
            started_at: 0,
            duration_ms: 0,
            accepted: 3,
            rejected: 1,
            loss: None,
            train_loss: None,
            auroc_macro: None,
            update_norm: None,
        };
        let updates = [
            update("hospital-1", Some(0.45), None),
            update("hospital-2", Some(0.45), None),
            update("hospital-3", Some(0.10), None),
            update("hospital-4", None, Some("invalid update: NaN")),
        ];
        let trust = BTreeMap::from([(
            "hospital-3".to_owned(),
            TrustRow {
                round_id: 3,
                trust: 0.2,
                trust_ema: Some(0.3),
                suspicious: true,
            },
        )]);
        let notes = round_notes(&round, &updates, &trust);
        let of = |c: &str| -> Vec<&str> {
            notes
                .iter()
                .filter(|n| n.client == c)
                .map(|n| n.note.as_str())
                .collect()
        };
        assert!(of("hospital-1").is_empty() && of("hospital-2").is_empty());
        let h3 = of("hospital-3");
        assert_eq!(h3.len(), 2, "{h3:?}");
        assert!(
            h3[0].starts_with("down-weighted: weight 0.100, 0.30 times the mean"),
            "{}",
            h3[0]
        );
        assert!(h3[0].contains("geometric median"), "{}", h3[0]);
        assert!(
            h3[1].contains("flagged suspicious") && h3[1].contains("0.30"),
            "{}",
            h3[1]
        );
        assert_eq!(of("hospital-4"), vec!["not counted: invalid update: NaN"]);
        // One counted hospital has nobody to be compared with.
        assert!(round_notes(&round, &updates[..1], &BTreeMap::new()).is_empty());
    }
}
