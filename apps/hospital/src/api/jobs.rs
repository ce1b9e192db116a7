//! Jobs: the runs page, the form that queues a run, stop, resume, delete
//! and the curves the comparison view overlays (`/api/jobs`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Permission;
use crate::jobs::{JobChoices, JobRequest, Refusal};
use crate::store::{AuditAction, JobKind, JobRow};

use super::{ApiError, ApiResult, AppState, ErrorBody, Session};

fn refused(r: Refusal) -> ApiError {
    match r {
        Refusal::Invalid(m) => ApiError::bad_request(m),
        Refusal::NotFound => ApiError::not_found("job"),
        Refusal::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
    }
}

fn no_queue() -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "this server runs a deployment and starts no jobs (jobs run under `hospital simulate`)",
    )
}

#[utoipa::path(get, path = "/api/jobs", tag = "jobs",
    responses((status = 200, description = "every job, the newest first", body = [JobRow]), (status = 401, body = ErrorBody)))]
pub(super) async fn list_jobs(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Json<Vec<JobRow>>> {
    session
        .require(&state, Permission::ViewMetrics, "view jobs")
        .await?;
    Ok(Json(
        state
            .store
            .jobs()
            .await?
            .into_iter()
            .map(JobRow::public)
            .collect(),
    ))
}

#[utoipa::path(get, path = "/api/jobs/choices", tag = "jobs",
    responses((status = 200, description = "what the form can offer on this server", body = JobChoices), (status = 401, body = ErrorBody)))]
pub(super) async fn job_choices(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Json<JobChoices>> {
    session
        .require(&state, Permission::ViewMetrics, "view jobs")
        .await?;
    Ok(Json(match &state.jobs {
        Some(q) => q.choices(),
        None => JobChoices {
            data: Vec::new(),
            aggregators: Vec::new(),
            server_optimizers: Vec::new(),
            uploads: Vec::new(),
            enabled: false,
        },
    }))
}

#[utoipa::path(post, path = "/api/jobs", tag = "jobs", request_body = JobRequest,
    responses((status = 201, description = "queued; it starts when the runs before it end", body = JobRow),
              (status = 400, description = "settings that do not hold together (an aggregator that cannot run with that many hospitals, encryption on MNIST, a hospital number out of range, data this server does not have)", body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 409, description = "the queue is full (10 runs wait), or this is a deployed server, which starts no jobs", body = ErrorBody)))]
pub(super) async fn create_job(
    State(state): State<AppState>,
    session: Session,
    Json(req): Json<JobRequest>,
) -> ApiResult<(StatusCode, Json<JobRow>)> {
    session
        .require(&state, Permission::ControlTraining, "start jobs")
        .await?;
    let queue = state.jobs.as_ref().ok_or_else(no_queue)?;
    let job = queue
        .submit(&req, session.user.id)
        .await?
        .map_err(refused)?;
    let id = job.id.to_string();
    session
        .audit(&state, AuditAction::JobCreated, Some(&id), Some(&job.name))
        .await?;
    Ok((StatusCode::CREATED, Json(job.public())))
}

#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path, description = "job number")),
    responses((status = 200, body = JobRow), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn get_job(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
) -> ApiResult<Json<JobRow>> {
    session
        .require(&state, Permission::ViewMetrics, "view jobs")
        .await?;
    Ok(Json(
        state
            .store
            .job(id)
            .await?
            .ok_or_else(|| ApiError::not_found("job"))?
            .public(),
    ))
}

#[utoipa::path(post, path = "/api/jobs/{id}/stop", tag = "jobs",
    params(("id" = i64, Path, description = "job number")),
    responses((status = 202, description = "a running job stops after its current round (its checkpoint is written); a queued one at once", body = JobRow),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "the job is not queued or training here", body = ErrorBody)))]
pub(super) async fn stop_job(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
) -> ApiResult<(StatusCode, Json<JobRow>)> {
    session
        .require(&state, Permission::ControlTraining, "stop jobs")
        .await?;
    let job = crate::jobs::stop_job(&state.store, &state.shared, id)
        .await?
        .map_err(refused)?;
    session
        .audit(&state, AuditAction::JobStopped, Some(&id.to_string()), None)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(job.public())))
}

#[utoipa::path(post, path = "/api/jobs/{id}/resume", tag = "jobs",
    params(("id" = i64, Path, description = "job number")),
    responses((status = 202, description = "queued again; it continues from its last checkpoint (or starts over when it wrote none and spent no privacy budget)", body = JobRow),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "the job is not stopped or failed, its folder was taken over by a later run, it spent privacy budget before its first checkpoint, or this server starts no jobs", body = ErrorBody)))]
pub(super) async fn resume_job(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
) -> ApiResult<(StatusCode, Json<JobRow>)> {
    session
        .require(&state, Permission::ControlTraining, "resume jobs")
        .await?;
    let queue = state.jobs.as_ref().ok_or_else(no_queue)?;
    let job = queue.resume(id).await?.map_err(refused)?;
    session
        .audit(&state, AuditAction::JobResumed, Some(&id.to_string()), None)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(job.public())))
}

#[utoipa::path(delete, path = "/api/jobs/{id}", tag = "jobs",
    params(("id" = i64, Path, description = "job number")),
    responses((status = 204, description = "deleted, with its rounds and its folder"),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "the job is training: stop it first", body = ErrorBody)))]
pub(super) async fn delete_job(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
) -> ApiResult<StatusCode> {
    session
        .require(&state, Permission::ControlTraining, "delete jobs")
        .await?;
    match &state.jobs {
        Some(q) => q.delete(id).await?.map_err(refused)?,
        None => {
            let job = state
                .store
                .job(id)
                .await?
                .ok_or_else(|| ApiError::not_found("job"))?;
            if !state.store.delete_job(id).await? {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("the job is {}; stop it first", job.status.as_str()),
                ));
            }
        }
    }
    session
        .audit(&state, AuditAction::JobDeleted, Some(&id.to_string()), None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A job's cross-site evaluation.
#[derive(Serialize, ToSchema)]
pub struct CrossSite {
    /// The job.
    pub job: i64,
    /// fedcore's `CrossSiteEvaluation`: `round`, `models` (the global
    /// model, then each hospital's last local model), `sites` (the
    /// hospitals whose held-out data scored them), `cells` (one row per
    /// model, one column per site: `{loss, num_examples, metrics}` or null)
    /// and `failures`.
    #[schema(value_type = Object)]
    pub matrix: serde_json::Value,
}

#[utoipa::path(get, path = "/api/jobs/{id}/cross-site", tag = "jobs",
    params(("id" = i64, Path, description = "job number")),
    responses((status = 200, body = CrossSite), (status = 401, body = ErrorBody),
              (status = 404, description = "no such job, or it has no cross-site evaluation (it was not asked for, or the job has not completed)", body = ErrorBody)))]
pub(super) async fn job_cross_site(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
) -> ApiResult<Json<CrossSite>> {
    session
        .require(&state, Permission::ViewMetrics, "view jobs")
        .await?;
    let matrix = state
        .store
        .job_cross_site(id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?
        .ok_or_else(|| ApiError::not_found("cross-site evaluation of this job"))?;
    Ok(Json(CrossSite { job: id, matrix }))
}

/// One round of a job's curve.
#[derive(Serialize, ToSchema)]
pub struct CurvePoint {
    /// The round.
    pub round: i64,
    /// The job's quality metric after it (macro AUROC or accuracy).
    pub value: Option<f64>,
    /// Held-out loss.
    pub loss: Option<f64>,
    /// The largest epsilon a hospital had spent.
    pub epsilon: Option<f64>,
}

/// What the comparison view overlays for one job.
#[derive(Serialize, ToSchema)]
pub struct JobCurve {
    /// The job.
    pub job: JobRow,
    /// `auroc_macro` (X-rays) or `accuracy` (MNIST).
    pub metric: String,
    /// Its (epsilon, delta) budget per hospital, when it runs with DP.
    pub budget: Option<(f64, f64)>,
    /// Round by round.
    pub points: Vec<CurvePoint>,
}

#[utoipa::path(get, path = "/api/jobs/{id}/curve", tag = "jobs",
    params(("id" = i64, Path, description = "job number")),
    responses((status = 200, body = JobCurve), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn job_curve(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
) -> ApiResult<Json<JobCurve>> {
    session
        .require(&state, Permission::ViewMetrics, "view jobs")
        .await?;
    let job = state
        .store
        .job(id)
        .await?
        .ok_or_else(|| ApiError::not_found("job"))?;
    let accuracy = job.kind == JobKind::Mnist;
    let mut acc = if accuracy {
        state.store.metrics(id, "eval.accuracy", None).await?
    } else {
        Default::default()
    };
    let eps: std::collections::BTreeMap<i64, f64> =
        state.store.epsilons(id).await?.into_iter().collect();
    // Round 0: the model before any hospital trained (nothing spent yet).
    let initial = state
        .store
        .metrics(id, "eval.", Some(0))
        .await?
        .remove(&0)
        .map(|m| CurvePoint {
            round: 0,
            value: m
                .get(if accuracy { "accuracy" } else { "auroc_macro" })
                .copied(),
            loss: m.get("loss").copied(),
            epsilon: None,
        });
    let points = initial
        .into_iter()
        .chain(
            state
                .store
                .rounds(id)
                .await?
                .into_iter()
                .map(|r| CurvePoint {
                    value: if accuracy {
                        acc.remove(&r.id).and_then(|m| m.get("").copied())
                    } else {
                        r.auroc_macro
                    },
                    loss: r.loss,
                    epsilon: eps.get(&r.id).copied(),
                    round: r.id,
                }),
        )
        .collect();
    Ok(Json(JobCurve {
        metric: if accuracy { "accuracy" } else { "auroc_macro" }.into(),
        budget: crate::jobs::budget_of(&job),
        job: job.public(),
        points,
    }))
}
