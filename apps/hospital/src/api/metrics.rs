//! What the charts read (`/api/metrics`).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Permission;
use crate::live::Progress;
use crate::store::ClientStatus;

use super::training::progress;
use super::{ApiResult, AppState, ErrorBody, JobQuery, JobSel, Session};

/// The run at a glance.
#[derive(Serialize, ToSchema)]
pub struct Overview {
    /// Where the run is.
    pub progress: Progress,
    /// Rounds recorded.
    pub rounds_recorded: usize,
    /// Hospitals.
    pub clients: usize,
    /// Hospitals not suspended.
    pub active_clients: usize,
    /// Hospitals flagged suspicious in their latest round.
    pub suspicious_clients: Vec<String>,
    /// Held-out loss after the last round.
    pub last_loss: Option<f64>,
    /// Held-out macro AUROC after the last round.
    pub last_auroc: Option<f64>,
    /// The best macro AUROC so far.
    pub best_auroc: Option<f64>,
    /// The round of the model that answers inference.
    pub model_round: Option<u64>,
    /// The job shown (`None` before any job started).
    pub job: Option<crate::store::JobRow>,
}

#[utoipa::path(get, path = "/api/metrics/overview", tag = "metrics", params(JobQuery),
    responses((status = 200, body = Overview), (status = 401, body = ErrorBody)))]
pub(super) async fn overview(
    State(state): State<AppState>,
    session: Session,
    JobSel(job): JobSel,
) -> ApiResult<Json<Overview>> {
    session
        .require(&state, Permission::ViewMetrics, "view metrics")
        .await?;
    let rounds = state.store.rounds(job).await?;
    let clients = state.store.clients().await?;
    let mut suspicious = Vec::new();
    for c in &clients {
        if state
            .store
            .trust(job, &c.id)
            .await?
            .last()
            .is_some_and(|t| t.suspicious)
        {
            suspicious.push(c.id.clone());
        }
    }
    let last = rounds.iter().rev().find(|r| r.loss.is_some());
    Ok(Json(Overview {
        progress: progress(&state),
        rounds_recorded: rounds.len(),
        active_clients: clients
            .iter()
            .filter(|c| c.status == ClientStatus::Active)
            .count(),
        clients: clients.len(),
        suspicious_clients: suspicious,
        last_loss: last.and_then(|r| r.loss),
        last_auroc: last.and_then(|r| r.auroc_macro),
        best_auroc: rounds
            .iter()
            .filter_map(|r| r.auroc_macro)
            .max_by(f64::total_cmp),
        model_round: state.predictor.round(),
        job: state
            .store
            .job(job)
            .await?
            .map(crate::store::JobRow::public),
    }))
}

/// AUROC after one round.
#[derive(Serialize, ToSchema)]
pub struct AucPoint {
    /// The round.
    pub round: i64,
    /// Macro mean over the labels where it is defined.
    pub macro_auroc: Option<f64>,
    /// Per label.
    pub per_label: BTreeMap<String, f64>,
}

#[utoipa::path(get, path = "/api/metrics/auc-history", tag = "metrics", params(JobQuery),
    responses((status = 200, body = [AucPoint]), (status = 401, body = ErrorBody)))]
pub(super) async fn auc_history(
    State(state): State<AppState>,
    session: Session,
    JobSel(job): JobSel,
) -> ApiResult<Json<Vec<AucPoint>>> {
    session
        .require(&state, Permission::ViewMetrics, "view metrics")
        .await?;
    let mut per = state.store.metrics(job, "eval.auroc.", None).await?;
    // Round 0: the model before any hospital trained, when it was recorded.
    let initial = state.store.metrics(job, "eval.", Some(0)).await?.remove(&0);
    let start = initial.and_then(|m| {
        let per_label = per.remove(&0).unwrap_or_default();
        let macro_auroc = m.get("auroc_macro").copied();
        (macro_auroc.is_some() || !per_label.is_empty()).then_some(AucPoint {
            round: 0,
            macro_auroc,
            per_label,
        })
    });
    Ok(Json(
        start
            .into_iter()
            .chain(state.store.rounds(job).await?.into_iter().filter_map(|r| {
                let per_label = per.remove(&r.id);
                (r.auroc_macro.is_some() || per_label.is_some()).then(|| AucPoint {
                    round: r.id,
                    macro_auroc: r.auroc_macro,
                    per_label: per_label.unwrap_or_default(),
                })
            }))
            .collect(),
    ))
}

/// Loss after one round.
#[derive(Serialize, ToSchema)]
pub struct LossPoint {
    /// The round.
    pub round: i64,
    /// Held-out loss.
    pub loss: Option<f64>,
    /// Mean training loss of the accepted hospitals.
    pub train_loss: Option<f64>,
}

#[utoipa::path(get, path = "/api/metrics/loss-history", tag = "metrics", params(JobQuery),
    responses((status = 200, body = [LossPoint]), (status = 401, body = ErrorBody)))]
pub(super) async fn loss_history(
    State(state): State<AppState>,
    session: Session,
    JobSel(job): JobSel,
) -> ApiResult<Json<Vec<LossPoint>>> {
    session
        .require(&state, Permission::ViewMetrics, "view metrics")
        .await?;
    let initial = state
        .store
        .metrics(job, "eval.loss", Some(0))
        .await?
        .remove(&0)
        .and_then(|m| m.get("").copied())
        .map(|loss| LossPoint {
            round: 0,
            loss: Some(loss),
            train_loss: None,
        });
    Ok(Json(
        initial
            .into_iter()
            .chain(
                state
                    .store
                    .rounds(job)
                    .await?
                    .into_iter()
                    .map(|r| LossPoint {
                        round: r.id,
                        loss: r.loss,
                        train_loss: r.train_loss,
                    }),
            )
            .collect(),
    ))
}

/// How one round was aggregated.
#[derive(Serialize, ToSchema)]
pub struct AggregationPoint {
    /// The round.
    pub round: i64,
    /// The aggregator.
    pub aggregator: String,
    /// Updates that counted.
    pub accepted: i64,
    /// Updates that did not.
    pub rejected: i64,
    /// Norm of the aggregated step.
    pub update_norm: Option<f64>,
    /// The aggregator's numbers (iterations, objective, sealed_sum_ms, ...).
    pub metrics: BTreeMap<String, f64>,
}

#[utoipa::path(get, path = "/api/metrics/aggregation", tag = "metrics", params(JobQuery),
    responses((status = 200, body = [AggregationPoint]), (status = 401, body = ErrorBody)))]
pub(super) async fn aggregation(
    State(state): State<AppState>,
    session: Session,
    JobSel(job): JobSel,
) -> ApiResult<Json<Vec<AggregationPoint>>> {
    session
        .require(&state, Permission::ViewMetrics, "view metrics")
        .await?;
    let mut per = state.store.metrics(job, "agg.", None).await?;
    Ok(Json(
        state
            .store
            .rounds(job)
            .await?
            .into_iter()
            .map(|r| AggregationPoint {
                metrics: per.remove(&r.id).unwrap_or_default(),
                round: r.id,
                aggregator: r.aggregator,
                accepted: r.accepted,
                rejected: r.rejected,
                update_norm: r.update_norm,
            })
            .collect(),
    ))
}

/// A hospital's privacy spending.
#[derive(Serialize, ToSchema)]
pub struct PrivacyView {
    /// The hospital.
    pub client: String,
    /// Epsilon spent so far.
    pub epsilon: Option<f64>,
    /// Its delta.
    pub delta: Option<f64>,
    /// The run's budget (epsilon, delta), when DP is on.
    pub budget: Option<(f64, f64)>,
    /// Epsilon after each round it took part in.
    pub history: Vec<(i64, f64)>,
}

#[utoipa::path(get, path = "/api/metrics/privacy", tag = "metrics", params(JobQuery),
    responses((status = 200, body = [PrivacyView]), (status = 401, body = ErrorBody)))]
pub(super) async fn privacy(
    State(state): State<AppState>,
    session: Session,
    JobSel(job): JobSel,
) -> ApiResult<Json<Vec<PrivacyView>>> {
    session
        .require(&state, Permission::ViewMetrics, "view metrics")
        .await?;
    let live = progress(&state);
    let budget = match state.store.job(job).await? {
        Some(j) if live.job != Some(job) => crate::jobs::budget_of(&j),
        _ => live.budget,
    };
    let mut out = Vec::new();
    for c in state.store.clients().await? {
        let ups = state.store.updates(job, None, Some(&c.id)).await?;
        let history: Vec<(i64, f64)> = ups
            .iter()
            .filter_map(|u| u.epsilon.map(|e| (u.round_id, e)))
            .collect();
        let last = ups.iter().rev().find(|u| u.epsilon.is_some());
        out.push(PrivacyView {
            client: c.id,
            epsilon: last.and_then(|u| u.epsilon),
            delta: last.and_then(|u| u.delta),
            budget,
            history,
        });
    }
    Ok(Json(out))
}
