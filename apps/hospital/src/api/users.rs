//! User administration: roles, password resets, data-subject export and
//! erasure (`/api/users`).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{self, Permission};
use crate::store::{AuditAction, AuditRow, Role, User};

use super::auth::{after_revocation, set_password};
use super::inference::{InferenceView, view};
use super::{ApiError, ApiResult, AppState, ErrorBody, Session};

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
pub(super) async fn reset_password(
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

#[utoipa::path(get, path = "/api/users", tag = "users",
    responses((status = 200, body = [User]), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub(super) async fn list_users(
    State(state): State<AppState>,
    session: Session,
) -> ApiResult<Json<Vec<User>>> {
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
pub(super) async fn change_role(
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
pub(super) async fn export_user(
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
pub(super) async fn delete_user(
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
