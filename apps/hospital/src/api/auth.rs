//! Signing in and out, sessions and one's own password (`/api/auth`).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{self, COOKIE, Permission, allows};
use crate::store::{AuditAction, AuditOutcome, Role, User};

use super::{ApiError, ApiResult, AppState, ErrorBody, Peer, Session};

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
pub(super) async fn login(
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
pub(super) fn signed_in(
    state: &AppState,
    user: User,
    version: i64,
    auth: Option<u64>,
) -> ApiResult<Response> {
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
pub(super) fn dummy_hash() -> String {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| auth::hash_password(&auth::generate_password()).unwrap_or_default())
        .clone()
}

#[utoipa::path(post, path = "/api/auth/logout", tag = "auth", security((), ("bearer" = []), ("cookie" = [])),
    responses((status = 204, description = "the session cookie is cleared and, when the request carried a valid token, every session of the user ends")))]
pub(super) async fn logout(
    State(state): State<AppState>,
    session: Option<Session>,
) -> ApiResult<Response> {
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
pub(super) async fn end_sessions(state: &AppState, user: i64) -> ApiResult<()> {
    state.store.revoke_sessions(user).await?;
    after_revocation(state, user);
    Ok(())
}

/// Closes the open event streams of a user whose session version moved.
pub(super) fn after_revocation(state: &AppState, user: i64) {
    // No receiver (no stream open) is not an error.
    let _ = state.revocations.send(user);
}

#[utoipa::path(post, path = "/api/auth/refresh", tag = "auth",
    responses((status = 200, description = "a new token for the same session (the session cookie is renewed); a session ends 8 h after sign-in", body = LoginResponse),
              (status = 401, body = ErrorBody)))]
pub(super) async fn refresh(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Response> {
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
pub(super) async fn change_password(
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
pub(super) async fn set_password(
    state: &AppState,
    user: i64,
    password: String,
) -> ApiResult<Option<i64>> {
    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(|e| anyhow::anyhow!("hash task: {e}"))??;
    let version = state.store.set_password(user, &hash).await?;
    after_revocation(state, user);
    Ok(version)
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
pub(super) async fn me(session: Session) -> Json<Me> {
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
pub(super) async fn register(
    State(state): State<AppState>,
    session: Session,
    Json(req): Json<RegisterRequest>,
) -> ApiResult<(StatusCode, Json<User>)> {
    session
        .require(&state, Permission::ManageUsers, "create users")
        .await?;
    auth::check_new_username(&req.username).map_err(ApiError::bad_request)?;
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
