//! The dashboard's REST API (JSON), its OpenAPI document and the live event
//! stream.
mod audit;
mod auth;
mod connections;
mod hospitals;
mod inference;
mod jobs;
mod metrics;
mod training;
mod users;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::atrest::AtRest;
use crate::auth::{COOKIE, ClientAddress, LoginLimiter, Permission, Tokens, allows};
use crate::infer::Predictor;
use crate::live::Shared;
use crate::store::{AuditAction, AuditOutcome, Store, User};

/// Limits on uploads.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    /// Bytes of one request body to the inference endpoint.
    pub max_bytes: usize,
    /// Pixels on the longer side of a decoded image.
    pub max_side: u32,
    /// Bytes an image may take decoded in its own pixel format (read from
    /// its header before any pixel is decoded).
    pub max_decoded_bytes: u64,
    /// Uploads decoded at the same time; more wait their turn. Together
    /// with `max_decoded_bytes` this bounds the memory decoding takes.
    pub max_concurrent_decodes: usize,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_bytes: 8 * 1024 * 1024,
            max_side: 4096,
            // A 4096 x 4096 X-ray with 16-bit gray values is 32 MiB.
            max_decoded_bytes: 48 << 20,
            max_concurrent_decodes: 2,
        }
    }
}

/// Everything the handlers share.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The store.
    pub store: Store,
    /// Token signing.
    pub tokens: Tokens,
    /// Login rate limiting.
    pub limiter: LoginLimiter,
    /// The simulation's live state (idle when none runs in this process).
    pub shared: Arc<Shared>,
    /// The inference model.
    pub predictor: Arc<Predictor>,
    /// Encryption at rest, when a key is configured.
    pub at_rest: Option<AtRest>,
    /// Upload limits.
    pub uploads: UploadLimits,
    /// Permits for decoding uploads (`UploadLimits::max_concurrent_decodes`).
    pub decodes: Arc<tokio::sync::Semaphore>,
    /// Whether the server speaks TLS (cookies get `Secure`, HSTS is sent).
    pub tls: bool,
    /// Where a request's client address comes from.
    pub client_address: Arc<ClientAddress>,
    /// User ids whose sessions just ended: open event streams of theirs
    /// close at once.
    pub revocations: tokio::sync::broadcast::Sender<i64>,
    /// Open event streams, bounded in all and per user.
    pub streams: EventStreams,
    /// A response must start within this.
    pub request_timeout: Duration,
    /// The job queue (`None` on a deployed server, which runs no jobs).
    pub jobs: Option<Arc<crate::jobs::JobQueue>>,
    /// The deployed server's federation (`None` in the simulation).
    pub federation: Option<Arc<crate::federation::FederationLink>>,
}

/// Bounds on open event streams (server-sent events hold a connection for
/// as long as the page is open).
#[derive(Debug, Clone)]
pub struct EventStreams {
    total: Arc<tokio::sync::Semaphore>,
    per_user: Arc<std::sync::Mutex<std::collections::HashMap<i64, usize>>>,
    max_per_user: usize,
}

/// One open event stream; dropping it frees its place.
#[derive(Debug)]
pub struct StreamPermit {
    _total: tokio::sync::OwnedSemaphorePermit,
    per_user: Arc<std::sync::Mutex<std::collections::HashMap<i64, usize>>>,
    user: i64,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut m = self
            .per_user
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

impl EventStreams {
    /// At most `max` streams open at once, `max_per_user` of one user.
    pub fn new(max: usize, max_per_user: usize) -> Self {
        Self {
            total: Arc::new(tokio::sync::Semaphore::new(max)),
            per_user: Arc::default(),
            max_per_user,
        }
    }

    /// A place for one more stream of `user`, if there is one.
    fn open(&self, user: i64) -> Result<StreamPermit, &'static str> {
        let mut m = self
            .per_user
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if m.get(&user).copied().unwrap_or(0) >= self.max_per_user {
            return Err("too many open event streams for this user; close another tab");
        }
        let total = Arc::clone(&self.total)
            .try_acquire_owned()
            .map_err(|_| "too many open event streams on this server; try again later")?;
        *m.entry(user).or_insert(0) += 1;
        Ok(StreamPermit {
            _total: total,
            per_user: Arc::clone(&self.per_user),
            user,
        })
    }
}

// ---------------------------------------------------------------- errors

/// An error answer: `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

/// The body of an error answer.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            retry_after: None,
        }
    }
    fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, format!("{what} not found"))
    }
    fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "sign in first")
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        // The detail goes to the log, not to the client.
        tracing::error!(error = %format!("{e:#}"), "request failed");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(ErrorBody {
                error: self.message,
            }),
        )
            .into_response();
        if let Some(s) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&s.to_string())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

// ---------------------------------------------------------------- extractors

/// The client's address: the connection's peer, or the address a trusted
/// reverse proxy forwarded (`AppState::client_address`); unspecified in
/// in-process tests without connection info.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub IpAddr);

impl FromRequestParts<AppState> for Peer {
    type Rejection = Infallible;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Infallible> {
        let peer = ConnectInfo::<SocketAddr>::from_request_parts(parts, state)
            .await
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip());
        Ok(Peer(state.client_address.of(peer, &parts.headers)))
    }
}

/// The signed-in user, from the `Authorization: Bearer` header or the
/// session cookie; the user and their session version are read from the
/// store on every request, so signing out, an erasure, a password or a
/// role change takes effect at once.
#[derive(Debug, Clone)]
pub struct Session {
    /// The user.
    pub user: User,
    /// Their address.
    pub ip: IpAddr,
    /// The session version the token carries (the store's, or it would
    /// have been refused).
    pub version: i64,
    /// When the user signed in (seconds since the epoch).
    pub auth: u64,
    /// When the token expires (seconds since the epoch).
    pub exp: u64,
}

fn token_of(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return v.strip_prefix("Bearer ").map(|t| t.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE).then(|| v.to_owned())
        })
}

impl FromRequestParts<AppState> for Session {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let Peer(ip) = Peer::from_request_parts(parts, state)
            .await
            .unwrap_or(Peer(IpAddr::V4(Ipv4Addr::UNSPECIFIED)));
        let token = token_of(&parts.headers).ok_or_else(ApiError::unauthorized)?;
        let claims = state
            .tokens
            .verify(&token)
            .map_err(|_| ApiError::new(StatusCode::UNAUTHORIZED, "invalid or expired token"))?;
        let id: i64 = claims
            .sub
            .parse()
            .map_err(|_| ApiError::new(StatusCode::UNAUTHORIZED, "invalid token"))?;
        let (user, version) = state.store.session(id).await?.ok_or_else(|| {
            ApiError::new(StatusCode::UNAUTHORIZED, "the account no longer exists")
        })?;
        if version != claims.ver {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this session has ended (signed out, or the password or role changed); sign in again",
            ));
        }
        Ok(Session {
            user,
            ip,
            version,
            auth: claims.auth,
            exp: claims.exp,
        })
    }
}

/// Which job a read is about.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobQuery {
    /// The job (default: the one training, or else the one that started
    /// last).
    pub job: Option<i64>,
}

/// The job a read is about: `?job=N`, or else the one training, or else
/// the one that started last (0, which has no rounds, before any did).
#[derive(Debug, Clone, Copy)]
pub struct JobSel(pub i64);

impl FromRequestParts<AppState> for JobSel {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let q = axum::extract::Query::<JobQuery>::try_from_uri(&parts.uri)
            .map_err(|_| ApiError::bad_request("`job` must be a job number"))?;
        Ok(JobSel(match q.0.job {
            Some(j) if state.store.job(j).await?.is_some() => j,
            Some(_) => return Err(ApiError::not_found("job")),
            None => state.store.current_job().await?.unwrap_or(0),
        }))
    }
}

/// A request that may carry a session (sign-out): no token or a token that
/// no longer holds is `None`; a failing store is still an error.
impl axum::extract::OptionalFromRequestParts<AppState> for Session {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Option<Self>> {
        match <Session as FromRequestParts<AppState>>::from_request_parts(parts, state).await {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.status == StatusCode::UNAUTHORIZED => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl Session {
    /// Checks a permission; a denial is audited and answered 403.
    async fn require(&self, state: &AppState, p: Permission, what: &str) -> ApiResult<()> {
        if allows(self.user.role, p) {
            return Ok(());
        }
        let ip = self.ip.to_string();
        state
            .store
            .audit(crate::store::Audit {
                actor_id: Some(self.user.id),
                actor: &self.user.username,
                action: AuditAction::PermissionDenied,
                target: Some(what),
                outcome: AuditOutcome::Denied,
                detail: Some(self.user.role.as_str()),
                ip: Some(&ip),
            })
            .await?;
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("the {} role may not {what}", self.user.role.as_str()),
        ))
    }

    async fn audit(
        &self,
        state: &AppState,
        action: AuditAction,
        target: Option<&str>,
        detail: Option<&str>,
    ) -> ApiResult<()> {
        let ip = self.ip.to_string();
        state
            .store
            .audit(crate::store::Audit {
                actor_id: Some(self.user.id),
                actor: &self.user.username,
                action,
                target,
                outcome: AuditOutcome::Success,
                detail,
                ip: Some(&ip),
            })
            .await?;
        Ok(())
    }
}

// ---------------------------------------------------------------- router

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "fedcore hospital dashboard", description = "Federated chest X-ray training: monitoring, hospitals, privacy, inference."),
    paths(auth::login, auth::logout, auth::refresh, auth::change_password, auth::me, auth::register,
          users::list_users, users::change_role, users::reset_password, users::export_user, users::delete_user,
          hospitals::list_clients, hospitals::get_client, hospitals::client_trust, hospitals::set_client_status,
          training::rounds, training::current_round, training::round_detail, training::stop_training, training::events,
          metrics::overview, metrics::auc_history, metrics::loss_history, metrics::aggregation, metrics::privacy,
          inference::predict, inference::inference_history, audit::audit_log, training::export_model,
          jobs::list_jobs, jobs::job_choices, jobs::create_job, jobs::get_job, jobs::stop_job, jobs::resume_job,
          jobs::delete_job, jobs::job_curve, jobs::job_cross_site,
          connections::list_connections, connections::revoke, connections::rotate),
    modifiers(&BearerAuth, &ErrorResponses),
    security(("bearer" = []), ("cookie" = []))
)]
pub struct ApiDoc;

struct BearerAuth;

/// The error answers any operation can give, by its shape, added where the
/// operation does not document them itself: what the framework and the
/// server's layers answer before a handler runs.
struct ErrorResponses;

impl utoipa::Modify for ErrorResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let error = |description: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(description)
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(Ref::from_schema_name("ErrorBody")))
                            .build(),
                    )
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for op in ops.into_iter().flatten() {
                let body = op.request_body.is_some();
                let params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
                let r = &mut op.responses.responses;
                let mut add = |code: &str, description: &str| {
                    r.entry(code.to_owned())
                        .or_insert_with(|| error(description));
                };
                if body {
                    add("400", "the body is not well-formed JSON");
                    add("413", "the body is over the size limit");
                    add("415", "the body is not of the documented content type");
                    add("422", "a field is missing or of the wrong type");
                }
                if params {
                    add("400", "a path or query parameter does not parse");
                    add("404", "what a path or query parameter names does not exist");
                }
                let open = op
                    .security
                    .as_ref()
                    .is_some_and(|s| s.iter().any(|r| r == &Default::default()));
                if !open {
                    add("401", "no valid token: sign in (again)");
                }
                add("408", "the request did not complete in time");
                add("500", "internal error (the detail is in the server's log)");
            }
        }
    }
}

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let c = openapi.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        c.add_security_scheme(
            "cookie",
            SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(COOKIE))),
        );
    }
}

/// The API routes.
pub fn routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/api/auth/login", post(auth::login))
        .route("/api/auth/logout", post(auth::logout))
        .route("/api/auth/me", get(auth::me))
        .route("/api/auth/register", post(auth::register))
        .route("/api/auth/refresh", post(auth::refresh))
        .route("/api/auth/password", post(auth::change_password))
        .route(
            "/api/users/{id}/password",
            axum::routing::put(users::reset_password),
        )
        .route("/api/users", get(users::list_users))
        .route("/api/users/{id}/role", patch(users::change_role))
        .route("/api/users/{id}/export", get(users::export_user))
        .route("/api/users/{id}", axum::routing::delete(users::delete_user))
        .route("/api/clients", get(hospitals::list_clients))
        .route("/api/clients/{id}", get(hospitals::get_client))
        .route("/api/clients/{id}/trust", get(hospitals::client_trust))
        .route(
            "/api/clients/{id}/status",
            patch(hospitals::set_client_status),
        )
        .route("/api/connections", get(connections::list_connections))
        .route("/api/connections/{site}/revoke", post(connections::revoke))
        .route(
            "/api/connections/{site}/certificate",
            post(connections::rotate),
        )
        .route("/api/training/rounds", get(training::rounds))
        .route("/api/training/rounds/current", get(training::current_round))
        .route("/api/training/rounds/{id}", get(training::round_detail))
        .route("/api/training/stop", post(training::stop_training))
        .route("/api/metrics/overview", get(metrics::overview))
        .route("/api/metrics/auc-history", get(metrics::auc_history))
        .route("/api/metrics/loss-history", get(metrics::loss_history))
        .route("/api/metrics/aggregation", get(metrics::aggregation))
        .route("/api/metrics/privacy", get(metrics::privacy))
        .route(
            "/api/inference/predict",
            post(inference::predict).layer(DefaultBodyLimit::max(state.uploads.max_bytes)),
        )
        .route("/api/inference/history", get(inference::inference_history))
        .route("/api/audit", get(audit::audit_log))
        .route("/api/model/export", get(training::export_model))
        .route("/api/events", get(training::events))
        .route("/api/jobs", get(jobs::list_jobs).post(jobs::create_job))
        .route("/api/jobs/choices", get(jobs::job_choices))
        .route(
            "/api/jobs/{id}",
            get(jobs::get_job).delete(jobs::delete_job),
        )
        .route("/api/jobs/{id}/stop", post(jobs::stop_job))
        .route("/api/jobs/{id}/resume", post(jobs::resume_job))
        .route("/api/jobs/{id}/curve", get(jobs::job_curve))
        .route("/api/jobs/{id}/cross-site", get(jobs::job_cross_site))
        // JSON bodies of the other endpoints are small.
        .layer(DefaultBodyLimit::max(64 * 1024))
}
