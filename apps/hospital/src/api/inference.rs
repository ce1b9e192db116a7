//! Predictions on uploaded X-rays and their history (`/api/inference`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Multipart, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::atrest::is_sealed;
use crate::auth::{Permission, allows};
use crate::infer::{Finding, Saliency, UploadError, decode};
use crate::store::{AuditAction, InferenceRow};

use super::{ApiError, ApiResult, AppState, ErrorBody, Session};

/// The findings for an uploaded X-ray.
#[derive(Serialize, ToSchema)]
pub struct Prediction {
    /// Its log entry.
    pub id: i64,
    /// The round of the model that answered.
    pub model_round: u64,
    /// The 14 findings, most likely first.
    pub findings: Vec<Finding>,
    /// How the model was protected while it trained (`None` when its
    /// runner did not say).
    pub protections: Option<crate::infer::Protections>,
    /// Where the model looked for the three most likely findings
    /// (Grad-CAM heatmaps; shown, never stored).
    pub saliency: Vec<Saliency>,
    /// SHA-256 of the upload.
    pub image_sha256: String,
    /// Decoded size.
    pub width: u32,
    /// Decoded size.
    pub height: u32,
}

/// An inference as shown in the history.
#[derive(Serialize, ToSchema)]
pub struct InferenceView {
    /// The log row (its `findings` field holds the JSON text).
    #[serde(flatten)]
    pub row: InferenceRow,
    /// The findings, parsed (and opened when sealed at rest).
    pub parsed: Vec<Finding>,
    /// Why this row's findings could not be opened (a key that is not
    /// configured, or a value that fails authentication); the other rows
    /// are unaffected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where an inference's findings are stored: what their sealed value is
/// bound to, so that it cannot be moved to another row.
pub(super) fn findings_place(user_id: i64, model_round: Option<i64>, image_sha256: &str) -> String {
    format!(
        "inference_logs.findings user={user_id} round={} image={image_sha256}",
        model_round.map_or("-".into(), |r| r.to_string())
    )
}

pub(super) fn view(state: &AppState, mut row: InferenceRow) -> InferenceView {
    let mut error = None;
    if is_sealed(&row.findings) {
        let place = findings_place(row.user_id, row.model_round, &row.image_sha256);
        match &state.at_rest {
            Some(k) => match k.open_for(&row.findings, &place) {
                Ok(plain) => row.findings = plain,
                Err(e) => error = Some(format!("{e:#}")),
            },
            None => {
                error = Some("stored findings are encrypted and no data key is configured".into())
            }
        }
    }
    let parsed = match error {
        None => serde_json::from_str(&row.findings).unwrap_or_default(),
        Some(_) => Vec::new(),
    };
    InferenceView { row, parsed, error }
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Upload {
    /// A PNG or JPEG chest X-ray.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    image: String,
}

#[utoipa::path(post, path = "/api/inference/predict", tag = "inference",
    request_body(content = Upload, content_type = "multipart/form-data"),
    responses((status = 200, body = Prediction), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 413, description = "over the size limit", body = ErrorBody),
              (status = 415, description = "not an image", body = ErrorBody),
              (status = 422, description = "dimensions over the limit or undecodable", body = ErrorBody),
              (status = 503, description = "no model yet", body = ErrorBody)))]
pub(super) async fn predict(
    State(state): State<AppState>,
    session: Session,
    mut multipart: Multipart,
) -> ApiResult<Json<Prediction>> {
    session
        .require(&state, Permission::RunInference, "run inference")
        .await?;
    let mut bytes: Option<Bytes> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e)),
        };
        match field.name() {
            Some("image") if bytes.is_none() => {
                bytes = Some(field.bytes().await.map_err(multipart_error)?);
            }
            Some("image") => return Err(ApiError::bad_request("send one `image` field")),
            // The form has one field (the schema says so): anything else is
            // a client's mistake, said rather than ignored.
            other => {
                let name: String = other.unwrap_or("").chars().take(64).collect();
                return Err(ApiError::bad_request(format!(
                    "unexpected form field `{name}`: send only `image`"
                )));
            }
        }
    }
    let bytes = bytes
        .ok_or_else(|| ApiError::bad_request("send the X-ray in a form field named `image`"))?;
    let limits = state.uploads;
    let predictor = state.predictor.clone();
    // At most `max_concurrent_decodes` decodes at once; the others wait here.
    let permit = state
        .decodes
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| anyhow::anyhow!("decode permits: {e}"))?;
    let (xray, answer) = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let x = decode(
            &bytes,
            limits.max_side,
            limits.max_decoded_bytes,
            predictor.size(),
        )?;
        let answer = predictor.predict(&x).map(|a| {
            a.map(|(findings, round)| {
                let top: Vec<Finding> = findings.iter().take(3).cloned().collect();
                // The findings stand without their heatmaps.
                let saliency = match predictor.explain(&x, &top, round) {
                    Ok(s) => s.unwrap_or_default(),
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "no Grad-CAM heatmaps");
                        Vec::new()
                    }
                };
                (findings, round, saliency)
            })
        });
        Ok::<_, UploadError>((x, answer))
    })
    .await
    .map_err(|e| anyhow::anyhow!("inference task: {e}"))?
    .map_err(|e| {
        let status = match e {
            UploadError::NotAnImage => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, e.to_string())
    })?;
    let (findings, round, saliency) = answer?.ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no model has been trained yet",
        )
    })?;
    let json = serde_json::to_string(&findings).map_err(anyhow::Error::from)?;
    let stored = match &state.at_rest {
        Some(k) => k.seal_for(
            &json,
            &findings_place(session.user.id, Some(round as i64), &xray.sha256),
        )?,
        None => json,
    };
    let id = state
        .store
        .log_inference(
            session.user.id,
            Some(round as i64),
            &xray.sha256,
            i64::from(xray.width),
            i64::from(xray.height),
            &stored,
        )
        .await?;
    session
        .audit(
            &state,
            AuditAction::Inference,
            Some(&xray.sha256[..16]),
            Some(&format!("model round {round}")),
        )
        .await?;
    Ok(Json(Prediction {
        id,
        model_round: round,
        findings,
        saliency,
        protections: state.predictor.protections(),
        image_sha256: xray.sha256,
        width: xray.width,
        height: xray.height,
    }))
}

pub(super) fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    let status = e.status();
    let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "the upload is over the size limit".to_owned()
    } else {
        format!("malformed upload: {}", e.body_text())
    };
    ApiError::new(status, message)
}

/// Paging of the inference history.
#[derive(Deserialize, utoipa::IntoParams)]
pub struct HistoryQuery {
    /// At most this many entries (default 50, at most 500).
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/inference/history", tag = "inference", params(HistoryQuery),
    responses((status = 200, body = [InferenceView]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn inference_history(
    State(state): State<AppState>,
    session: Session,
    Query(q): Query<HistoryQuery>,
) -> ApiResult<Json<Vec<InferenceView>>> {
    session
        .require(
            &state,
            Permission::RunInference,
            "view the inference history",
        )
        .await?;
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    // Doctors see their own; admins everyone's.
    let who =
        (!allows(session.user.role, Permission::ViewAllInferences)).then_some(session.user.id);
    let rows = state.store.inferences(who, limit).await?;
    Ok(Json(rows.into_iter().map(|r| view(&state, r)).collect()))
}
