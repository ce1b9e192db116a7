//! The dashboard's REST API (JSON), its OpenAPI document and the live event
//! stream.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Multipart, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use utoipa::{OpenApi, ToSchema};

use crate::atrest::{AtRest, is_sealed};
use crate::auth::{self, COOKIE, ClientAddress, LoginLimiter, Permission, Tokens, allows};
use crate::infer::{Finding, Predictor, UploadError, decode};
use crate::live::{LiveEvent, Progress, RunStatus, Shared};
use crate::store::{
    AuditAction, AuditOutcome, AuditRow, ClientRow, ClientStatus, InferenceRow, Role, RoundRow,
    Store, TrustRow, UpdateRow, User,
};

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

// ---------------------------------------------------------------- auth

/// Credentials.
#[derive(Deserialize, ToSchema)]
pub struct LoginRequest {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// What the audit log and the limiter record for a sign-in with a name no
/// account can have.
const INVALID_NAME: &str = "(invalid user name)";

/// Throttled sign-ins from one address within this window share one audit
/// row.
const THROTTLE_AUDIT_WINDOW_MS: i64 = 60_000;

/// A successful login.
#[derive(Serialize, ToSchema)]
pub struct LoginResponse {
    /// The access token (also set as an HttpOnly cookie).
    pub token: String,
    /// Seconds until it expires.
    pub expires_in: u64,
    /// Who signed in.
    pub user: User,
}

#[utoipa::path(post, path = "/api/auth/login", tag = "auth", request_body = LoginRequest, security(()),
    responses((status = 200, body = LoginResponse), (status = 401, body = ErrorBody),
              (status = 429, description = "too many attempts", body = ErrorBody)))]
async fn login(
    State(state): State<AppState>,
    Peer(ip): Peer,
    Json(req): Json<LoginRequest>,
) -> ApiResult<Response> {
    let ip_s = ip.to_string();
    // A name no account can have is not looked up, and never written to the
    // audit log or the limiter's map as given (it could be 60 KB of text).
    let given = req.username.trim();
    let valid = auth::check_username(given).is_ok();
    // Names are one account in any case: fold before the limiter and lookup.
    let name = if valid {
        given.to_ascii_lowercase()
    } else {
        INVALID_NAME.to_owned()
    };
    if let Err(wait) = state.limiter.check(ip, &name) {
        state
            .store
            .audit_throttled(&name, &ip_s, THROTTLE_AUDIT_WINDOW_MS)
            .await?;
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many sign-in attempts; try again in {wait} s"),
        );
        e.retry_after = Some(wait);
        return Err(e);
    }
    let found = if valid {
        state.store.user_by_name(&name).await?
    } else {
        None
    };
    let password = req.password.clone();
    // Verify against a dummy hash when the user is unknown, so both cases
    // take the same time.
    let (user, hash) = match found {
        Some((u, h, version)) => (Some((u, version)), h),
        None => (None, dummy_hash()),
    };
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
        .await
        .map_err(|e| anyhow::anyhow!("verify task: {e}"))?;
    let Some((user, version)) = user.filter(|_| ok) else {
        state.limiter.failed(ip, &name);
        state
            .store
            .audit(crate::store::Audit {
                actor_id: None,
                actor: &name,
                action: AuditAction::Login,
                target: None,
                outcome: AuditOutcome::Failure,
                detail: Some("wrong user name or password"),
                ip: Some(&ip_s),
            })
            .await?;
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "wrong user name or password",
        ));
    };
    state.limiter.succeeded(ip, &name);
    state
        .store
        .audit(crate::store::Audit {
            actor_id: Some(user.id),
            actor: &user.username,
            action: AuditAction::Login,
            target: None,
            outcome: AuditOutcome::Success,
            detail: None,
            ip: Some(&ip_s),
        })
        .await?;
    signed_in(&state, user, version, None)
}

/// The answer to a sign-in, a refresh or a password change: a new token
/// for session version `version`, signed in at `auth` (`None`: now), in
/// the body and as the session cookie.
fn signed_in(state: &AppState, user: User, version: i64, auth: Option<u64>) -> ApiResult<Response> {
    let token = state.tokens.issue(&user, version, auth)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the session is over; sign in again",
        )
    })?;
    let claims = state.tokens.verify(&token)?;
    let ttl = claims.exp.saturating_sub(claims.iat);
    let cookie = format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={ttl}{}",
        if state.tls { "; Secure" } else { "" }
    );
    let mut r = Json(LoginResponse {
        token,
        expires_in: ttl,
        user,
    })
    .into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| anyhow::anyhow!("cookie: {e}"))?,
    );
    Ok(r)
}

/// An argon2id hash of a random password, verified against when a user
/// name is unknown (made once per process).
fn dummy_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| auth::hash_password(&auth::generate_password()).unwrap_or_default())
        .clone()
}

#[utoipa::path(post, path = "/api/auth/logout", tag = "auth", security((), ("bearer" = []), ("cookie" = [])),
    responses((status = 204, description = "the session cookie is cleared and, when the request carried a valid token, every session of the user ends")))]
async fn logout(State(state): State<AppState>, session: Option<Session>) -> ApiResult<Response> {
    if let Some(session) = session {
        end_sessions(&state, session.user.id).await?;
        session
            .audit(&state, AuditAction::Logout, None, None)
            .await?;
    }
    let cookie = format!(
        "{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        if state.tls { "; Secure" } else { "" }
    );
    let mut r = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(r)
}

/// Ends every session of a user: tokens issued before stop working, and
/// their open event streams close.
async fn end_sessions(state: &AppState, user: i64) -> ApiResult<()> {
    state.store.revoke_sessions(user).await?;
    after_revocation(state, user);
    Ok(())
}

/// Closes the open event streams of a user whose session version moved.
fn after_revocation(state: &AppState, user: i64) {
    // No receiver (no stream open) is not an error.
    let _ = state.revocations.send(user);
}

#[utoipa::path(post, path = "/api/auth/refresh", tag = "auth",
    responses((status = 200, description = "a new token for the same session (the session cookie is renewed); a session ends 8 h after sign-in", body = LoginResponse),
              (status = 401, body = ErrorBody)))]
async fn refresh(State(state): State<AppState>, session: Session) -> ApiResult<Response> {
    signed_in(&state, session.user, session.version, Some(session.auth))
}

/// A user's own password change.
#[derive(Deserialize, ToSchema)]
pub struct PasswordChange {
    /// The password now.
    pub current_password: String,
    /// The new one: 12 to 256 characters, not easy to guess (as for new
    /// users).
    #[schema(min_length = 12, max_length = 256)]
    pub new_password: String,
}

#[utoipa::path(post, path = "/api/auth/password", tag = "auth", request_body = PasswordChange,
    responses((status = 200, description = "changed: every other session ends, this one gets a new token", body = LoginResponse),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 429, description = "too many attempts", body = ErrorBody)))]
async fn change_password(
    State(state): State<AppState>,
    session: Session,
    Json(req): Json<PasswordChange>,
) -> ApiResult<Response> {
    let name = session.user.username.to_lowercase();
    // A stolen token must not become a way to guess the password.
    if let Err(wait) = state.limiter.check(session.ip, &name) {
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many attempts; try again in {wait} s"),
        );
        e.retry_after = Some(wait);
        return Err(e);
    }
    let hash = state
        .store
        .password_hash(session.user.id)
        .await?
        .unwrap_or_default();
    let current = req.current_password;
    let ok = tokio::task::spawn_blocking(move || auth::verify_password(&current, &hash))
        .await
        .map_err(|e| anyhow::anyhow!("verify task: {e}"))?;
    if !ok {
        state.limiter.failed(session.ip, &name);
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "the current password is wrong",
        ));
    }
    auth::check_password(&req.new_password, &[&name]).map_err(ApiError::bad_request)?;
    let version = set_password(&state, session.user.id, req.new_password)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::UNAUTHORIZED, "the account no longer exists"))?;
    session
        .audit(&state, AuditAction::PasswordChange, None, None)
        .await?;
    signed_in(&state, session.user, version, Some(session.auth))
}

/// Hashes and stores a new password, ending the user's sessions; the new
/// session version.
async fn set_password(state: &AppState, user: i64, password: String) -> ApiResult<Option<i64>> {
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| anyhow::anyhow!("hash task: {e}"))??;
    let version = state.store.set_password(user, &hash).await?;
    after_revocation(state, user);
    Ok(version)
}

/// An admin's reset of a user's password.
#[derive(Deserialize, ToSchema)]
pub struct PasswordReset {
    /// The new password: 12 to 256 characters, not easy to guess (as for
    /// new users); tell it to the user out of band.
    #[schema(min_length = 12, max_length = 256)]
    pub new_password: String,
}

#[utoipa::path(put, path = "/api/users/{id}/password", tag = "users", request_body = PasswordReset,
    params(("id" = i64, Path, description = "user id")),
    responses((status = 204, description = "set: every session of the user ends"),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
              (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "one's own password (use POST /api/auth/password)", body = ErrorBody)))]
async fn reset_password(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
    Json(req): Json<PasswordReset>,
) -> ApiResult<StatusCode> {
    session
        .require(&state, Permission::ManageUsers, "reset passwords")
        .await?;
    if id == session.user.id {
        // Changing one's own password asks for the current one: a stolen
        // admin token must not be enough to take the account.
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "change your own password with POST /api/auth/password",
        ));
    }
    let user = state
        .store
        .user(id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    auth::check_password(&req.new_password, &[&user.username]).map_err(ApiError::bad_request)?;
    set_password(&state, id, req.new_password)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    session
        .audit(
            &state,
            AuditAction::PasswordReset,
            Some(&user.username),
            None,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The signed-in user and what they may do.
#[derive(Serialize, ToSchema)]
pub struct Me {
    /// The user.
    pub user: User,
    /// Their permissions.
    pub permissions: Vec<String>,
}

#[utoipa::path(get, path = "/api/auth/me", tag = "auth",
    responses((status = 200, body = Me), (status = 401, body = ErrorBody)))]
async fn me(session: Session) -> Json<Me> {
    use Permission::*;
    let all = [
        (ViewMetrics, "view_metrics"),
        (RunInference, "run_inference"),
        (ViewAllInferences, "view_all_inferences"),
        (ManageUsers, "manage_users"),
        (ManageClients, "manage_clients"),
        (ViewAudit, "view_audit"),
        (ExportModel, "export_model"),
        (ControlTraining, "control_training"),
    ];
    Json(Me {
        permissions: all
            .iter()
            .filter(|(p, _)| allows(session.user.role, *p))
            .map(|(_, n)| (*n).to_owned())
            .collect(),
        user: session.user,
    })
}

/// A new user.
#[derive(Deserialize, ToSchema)]
pub struct RegisterRequest {
    /// User name: 3 to 64 of letters, digits, `. _ - @` (stored in lower
    /// case; names that differ only in case are one account).
    #[schema(min_length = 3, max_length = 64, pattern = "^[A-Za-z0-9._@-]{3,64}$")]
    pub username: String,
    /// 12 to 256 characters, and not easy to guess (zxcvbn score 3 of 4,
    /// counting the user name as known; refused with 400 otherwise).
    #[schema(min_length = 12, max_length = 256)]
    pub password: String,
    /// Its role.
    pub role: Role,
}

#[utoipa::path(post, path = "/api/auth/register", tag = "auth", request_body = RegisterRequest,
    responses((status = 201, body = User), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 409, body = ErrorBody)))]
async fn register(
    State(state): State<AppState>,
    session: Session,
    Json(req): Json<RegisterRequest>,
) -> ApiResult<(StatusCode, Json<User>)> {
    session
        .require(&state, Permission::ManageUsers, "create users")
        .await?;
    auth::check_username(&req.username).map_err(ApiError::bad_request)?;
    auth::check_password(&req.password, &[&req.username]).map_err(ApiError::bad_request)?;
    let password = req.password;
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| anyhow::anyhow!("hash task: {e}"))??;
    let user = state
        .store
        .create_user(&req.username, &hash, req.role)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::CONFLICT, "that user name is taken"))?;
    session
        .audit(
            &state,
            AuditAction::UserCreated,
            Some(&user.username),
            Some(req.role.as_str()),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(user)))
}

// ---------------------------------------------------------------- users (admin)

#[utoipa::path(get, path = "/api/users", tag = "users",
    responses((status = 200, body = [User]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn list_users(State(state): State<AppState>, session: Session) -> ApiResult<Json<Vec<User>>> {
    session
        .require(&state, Permission::ManageUsers, "list users")
        .await?;
    Ok(Json(state.store.users().await?))
}

/// A role change.
#[derive(Deserialize, ToSchema)]
pub struct RoleChange {
    /// The new role.
    pub role: Role,
}

#[utoipa::path(patch, path = "/api/users/{id}/role", tag = "users", request_body = RoleChange,
    params(("id" = i64, Path, description = "user id")),
    responses((status = 200, body = User), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
              (status = 409, description = "the last admin", body = ErrorBody)))]
async fn change_role(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
    Json(req): Json<RoleChange>,
) -> ApiResult<Json<User>> {
    session
        .require(&state, Permission::ManageUsers, "change roles")
        .await?;
    let user = state
        .store
        .user(id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    if user.role == Role::Admin && req.role != Role::Admin && state.store.admin_count().await? <= 1
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the last admin keeps the admin role",
        ));
    }
    state.store.set_role(id, req.role).await?;
    after_revocation(&state, id);
    let detail = format!("{} -> {}", user.role.as_str(), req.role.as_str());
    session
        .audit(
            &state,
            AuditAction::RoleChange,
            Some(&user.username),
            Some(&detail),
        )
        .await?;
    Ok(Json(User {
        role: req.role,
        ..user
    }))
}

/// Everything stored about a user (data-subject access request).
#[derive(Serialize, ToSchema)]
pub struct UserExport {
    /// The account.
    pub user: User,
    /// Their inferences (findings opened).
    pub inferences: Vec<InferenceView>,
    /// Audit entries about them: their actions, sign-ins tried with their
    /// name, and entries naming them as the target.
    pub audit: Vec<AuditRow>,
}

#[utoipa::path(get, path = "/api/users/{id}/export", tag = "users",
    params(("id" = i64, Path, description = "user id")),
    responses((status = 200, body = UserExport), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn export_user(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
) -> ApiResult<Json<UserExport>> {
    session
        .require(&state, Permission::ManageUsers, "export user data")
        .await?;
    let user = state
        .store
        .user(id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    let inferences = state
        .store
        .inferences(Some(id), i64::MAX)
        .await?
        .into_iter()
        .map(|r| view(&state, r))
        .collect();
    let audit = state.store.audit_of_user(id).await?;
    session
        .audit(
            &state,
            AuditAction::UserDataExport,
            Some(&user.username),
            None,
        )
        .await?;
    Ok(Json(UserExport {
        user,
        inferences,
        audit,
    }))
}

#[utoipa::path(delete, path = "/api/users/{id}", tag = "users",
    params(("id" = i64, Path, description = "user id")),
    responses((status = 204, description = "anonymized"), (status = 403, body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_user(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
) -> ApiResult<StatusCode> {
    session
        .require(&state, Permission::ManageUsers, "delete users")
        .await?;
    let user = state
        .store
        .user(id)
        .await?
        .ok_or_else(|| ApiError::not_found("user"))?;
    if user.id == session.user.id {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "an admin cannot delete their own account",
        ));
    }
    if user.role == Role::Admin && state.store.admin_count().await? <= 1 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "the last admin cannot be deleted",
        ));
    }
    state.store.anonymize_user(id).await?;
    after_revocation(&state, id);
    session
        .audit(
            &state,
            AuditAction::UserErased,
            Some(&format!("user {id}")),
            None,
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------- clients

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

async fn client_view(state: &AppState, c: ClientRow) -> ApiResult<ClientView> {
    let trust = state.store.trust(&c.id).await?;
    let updates = state.store.updates(None, Some(&c.id)).await?;
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

#[utoipa::path(get, path = "/api/clients", tag = "clients",
    responses((status = 200, body = [ClientView]), (status = 401, body = ErrorBody)))]
async fn list_clients(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Json<Vec<ClientView>>> {
    session
        .require(&state, Permission::ViewMetrics, "view clients")
        .await?;
    let mut out = Vec::new();
    for c in state.store.clients().await? {
        out.push(client_view(&state, c).await?);
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/clients/{id}", tag = "clients",
    params(("id" = String, Path, description = "hospital id")),
    responses((status = 200, body = ClientView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn get_client(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
) -> ApiResult<Json<ClientView>> {
    session
        .require(&state, Permission::ViewMetrics, "view clients")
        .await?;
    let c = state
        .store
        .client(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("client"))?;
    Ok(Json(client_view(&state, c).await?))
}

#[utoipa::path(get, path = "/api/clients/{id}/trust", tag = "clients",
    params(("id" = String, Path, description = "hospital id")),
    responses((status = 200, body = [TrustRow]), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn client_trust(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<TrustRow>>> {
    session
        .require(&state, Permission::ViewMetrics, "view clients")
        .await?;
    state
        .store
        .client(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("client"))?;
    Ok(Json(state.store.trust(&id).await?))
}

/// A status change.
#[derive(Deserialize, ToSchema)]
pub struct StatusChange {
    /// `active` or `suspended`.
    pub status: String,
}

#[utoipa::path(patch, path = "/api/clients/{id}/status", tag = "clients", request_body = StatusChange,
    params(("id" = String, Path, description = "hospital id")),
    responses((status = 200, body = ClientView), (status = 400, body = ErrorBody),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn set_client_status(
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
    let status: ClientStatus = req
        .status
        .parse()
        .map_err(|_| ApiError::bad_request("status is `active` or `suspended`"))?;
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
    Ok(Json(client_view(&state, c).await?))
}

// ---------------------------------------------------------------- training

#[utoipa::path(get, path = "/api/training/rounds", tag = "training",
    responses((status = 200, body = [RoundRow]), (status = 401, body = ErrorBody)))]
async fn rounds(State(state): State<AppState>, session: Session) -> ApiResult<Json<Vec<RoundRow>>> {
    session
        .require(&state, Permission::ViewMetrics, "view training")
        .await?;
    Ok(Json(state.store.rounds().await?))
}

/// The round in progress.
#[derive(Serialize, ToSchema)]
pub struct CurrentRound {
    /// Where the run is.
    pub progress: Progress,
    /// The last recorded round.
    pub last: Option<RoundRow>,
}

#[utoipa::path(get, path = "/api/training/rounds/current", tag = "training",
    responses((status = 200, body = CurrentRound), (status = 401, body = ErrorBody)))]
async fn current_round(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Json<CurrentRound>> {
    session
        .require(&state, Permission::ViewMetrics, "view training")
        .await?;
    Ok(Json(CurrentRound {
        progress: progress(&state),
        last: state.store.rounds().await?.pop(),
    }))
}

#[utoipa::path(post, path = "/api/training/stop", tag = "training",
    responses((status = 202, description = "the run stops after its current round (its checkpoint is written; `--resume` continues it)", body = Progress),
              (status = 403, body = ErrorBody),
              (status = 409, description = "no run is training in this process", body = ErrorBody)))]
async fn stop_training(
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
    session
        .audit(&state, AuditAction::TrainingStopped, None, None)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(now)))
}

fn progress(state: &AppState) -> Progress {
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
    params(("id" = i64, Path, description = "round number")),
    responses((status = 200, body = RoundDetail), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn round_detail(
    State(state): State<AppState>,
    session: Session,
    Path(id): Path<i64>,
) -> ApiResult<Json<RoundDetail>> {
    session
        .require(&state, Permission::ViewMetrics, "view training")
        .await?;
    let round = state
        .store
        .round(id)
        .await?
        .ok_or_else(|| ApiError::not_found("round"))?;
    let metrics = state
        .store
        .metrics("", Some(id))
        .await?
        .remove(&id)
        .unwrap_or_default();
    Ok(Json(RoundDetail {
        round,
        updates: state.store.updates(Some(id), None).await?,
        metrics,
    }))
}

// ---------------------------------------------------------------- metrics

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
}

#[utoipa::path(get, path = "/api/metrics/overview", tag = "metrics",
    responses((status = 200, body = Overview), (status = 401, body = ErrorBody)))]
async fn overview(State(state): State<AppState>, session: Session) -> ApiResult<Json<Overview>> {
    session
        .require(&state, Permission::ViewMetrics, "view metrics")
        .await?;
    let rounds = state.store.rounds().await?;
    let clients = state.store.clients().await?;
    let mut suspicious = Vec::new();
    for c in &clients {
        if state
            .store
            .trust(&c.id)
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

#[utoipa::path(get, path = "/api/metrics/auc-history", tag = "metrics",
    responses((status = 200, body = [AucPoint]), (status = 401, body = ErrorBody)))]
async fn auc_history(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Json<Vec<AucPoint>>> {
    session
        .require(&state, Permission::ViewMetrics, "view metrics")
        .await?;
    let mut per = state.store.metrics("eval.auroc.", None).await?;
    Ok(Json(
        state
            .store
            .rounds()
            .await?
            .into_iter()
            .filter_map(|r| {
                let per_label = per.remove(&r.id);
                (r.auroc_macro.is_some() || per_label.is_some()).then(|| AucPoint {
                    round: r.id,
                    macro_auroc: r.auroc_macro,
                    per_label: per_label.unwrap_or_default(),
                })
            })
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

#[utoipa::path(get, path = "/api/metrics/loss-history", tag = "metrics",
    responses((status = 200, body = [LossPoint]), (status = 401, body = ErrorBody)))]
async fn loss_history(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Json<Vec<LossPoint>>> {
    session
        .require(&state, Permission::ViewMetrics, "view metrics")
        .await?;
    Ok(Json(
        state
            .store
            .rounds()
            .await?
            .into_iter()
            .map(|r| LossPoint {
                round: r.id,
                loss: r.loss,
                train_loss: r.train_loss,
            })
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

#[utoipa::path(get, path = "/api/metrics/aggregation", tag = "metrics",
    responses((status = 200, body = [AggregationPoint]), (status = 401, body = ErrorBody)))]
async fn aggregation(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Json<Vec<AggregationPoint>>> {
    session
        .require(&state, Permission::ViewMetrics, "view metrics")
        .await?;
    let mut per = state.store.metrics("agg.", None).await?;
    Ok(Json(
        state
            .store
            .rounds()
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

#[utoipa::path(get, path = "/api/metrics/privacy", tag = "metrics",
    responses((status = 200, body = [PrivacyView]), (status = 401, body = ErrorBody)))]
async fn privacy(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Json<Vec<PrivacyView>>> {
    session
        .require(&state, Permission::ViewMetrics, "view metrics")
        .await?;
    let budget = progress(&state).budget;
    let mut out = Vec::new();
    for c in state.store.clients().await? {
        let ups = state.store.updates(None, Some(&c.id)).await?;
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

// ---------------------------------------------------------------- inference

/// The findings for an uploaded X-ray.
#[derive(Serialize, ToSchema)]
pub struct Prediction {
    /// Its log entry.
    pub id: i64,
    /// The round of the model that answered.
    pub model_round: u64,
    /// The 14 findings, most likely first.
    pub findings: Vec<Finding>,
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
fn findings_place(user_id: i64, model_round: Option<i64>, image_sha256: &str) -> String {
    format!(
        "inference_logs.findings user={user_id} round={} image={image_sha256}",
        model_round.map_or("-".into(), |r| r.to_string())
    )
}

fn view(state: &AppState, mut row: InferenceRow) -> InferenceView {
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
async fn predict(
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
        let answer = predictor.predict(&x);
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
    let (findings, round) = answer?.ok_or_else(|| {
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
        image_sha256: xray.sha256,
        width: xray.width,
        height: xray.height,
    }))
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
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
async fn inference_history(
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

// ---------------------------------------------------------------- audit, export

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
async fn audit_log(
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

#[utoipa::path(get, path = "/api/model/export", tag = "model",
    responses((status = 200, description = "safetensors of the global model (AES-GCM sealed when a data key is configured)"),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 503, body = ErrorBody)))]
async fn export_model(State(state): State<AppState>, session: Session) -> ApiResult<Response> {
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

// ---------------------------------------------------------------- live events

#[utoipa::path(get, path = "/api/events", tag = "training",
    responses((status = 200, description = "server-sent events: round_started, round_finished, update_rejected, client_flagged, finished, failed", content_type = "text/event-stream"),
              (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
              (status = 429, description = "too many open event streams, for the user or the server", body = ErrorBody)))]
async fn events(
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

// ---------------------------------------------------------------- router

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "fedcore hospital dashboard", description = "Federated chest X-ray training: monitoring, hospitals, privacy, inference."),
    paths(login, logout, refresh, change_password, me, register,
          list_users, change_role, reset_password, export_user, delete_user,
          list_clients, get_client, client_trust, set_client_status,
          rounds, current_round, round_detail, stop_training, events,
          overview, auc_history, loss_history, aggregation, privacy,
          predict, inference_history, audit_log, export_model),
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
        .route("/api/auth/login", post(login))
        .route("/api/auth/logout", post(logout))
        .route("/api/auth/me", get(me))
        .route("/api/auth/register", post(register))
        .route("/api/auth/refresh", post(refresh))
        .route("/api/auth/password", post(change_password))
        .route(
            "/api/users/{id}/password",
            axum::routing::put(reset_password),
        )
        .route("/api/users", get(list_users))
        .route("/api/users/{id}/role", patch(change_role))
        .route("/api/users/{id}/export", get(export_user))
        .route("/api/users/{id}", axum::routing::delete(delete_user))
        .route("/api/clients", get(list_clients))
        .route("/api/clients/{id}", get(get_client))
        .route("/api/clients/{id}/trust", get(client_trust))
        .route("/api/clients/{id}/status", patch(set_client_status))
        .route("/api/training/rounds", get(rounds))
        .route("/api/training/rounds/current", get(current_round))
        .route("/api/training/rounds/{id}", get(round_detail))
        .route("/api/training/stop", post(stop_training))
        .route("/api/metrics/overview", get(overview))
        .route("/api/metrics/auc-history", get(auc_history))
        .route("/api/metrics/loss-history", get(loss_history))
        .route("/api/metrics/aggregation", get(aggregation))
        .route("/api/metrics/privacy", get(privacy))
        .route(
            "/api/inference/predict",
            post(predict).layer(DefaultBodyLimit::max(state.uploads.max_bytes)),
        )
        .route("/api/inference/history", get(inference_history))
        .route("/api/audit", get(audit_log))
        .route("/api/model/export", get(export_model))
        .route("/api/events", get(events))
        // JSON bodies of the other endpoints are small.
        .layer(DefaultBodyLimit::max(64 * 1024))
}
