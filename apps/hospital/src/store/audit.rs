//! The audit log (the `audit_log` table).

use anyhow::Result;
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use super::{Store, now_ms};

/// An audit entry.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditRow {
    /// Its id.
    pub id: i64,
    /// When (ms since the epoch).
    pub at: i64,
    /// The user's id, when known.
    pub actor_id: Option<i64>,
    /// Who (user name, or the name tried at a failed login).
    pub actor: String,
    /// What (`login`, `permission_denied`, `role_change`, ...).
    pub action: String,
    /// On what.
    pub target: Option<String>,
    /// `success`, `failure` or `denied`.
    pub outcome: String,
    /// More.
    pub detail: Option<String>,
    /// The peer address.
    pub ip: Option<String>,
}

/// A new audit entry.
#[derive(Debug, Clone)]
pub struct Audit<'a> {
    /// The user's id, when known.
    pub actor_id: Option<i64>,
    /// Who.
    pub actor: &'a str,
    /// What.
    pub action: AuditAction,
    /// On what.
    pub target: Option<&'a str>,
    /// How it ended.
    pub outcome: AuditOutcome,
    /// More.
    pub detail: Option<&'a str>,
    /// The peer address.
    pub ip: Option<&'a str>,
}

/// What an audit entry records (the `action` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditAction {
    /// A sign-in attempt.
    Login,
    /// A request the user's role does not allow.
    PermissionDenied,
    /// An admin created a user.
    UserCreated,
    /// An admin changed a user's role.
    RoleChange,
    /// A data-subject export.
    UserDataExport,
    /// A data-subject erasure.
    UserErased,
    /// A user signed out (every session of theirs ended).
    Logout,
    /// A user changed their own password.
    PasswordChange,
    /// An admin set a new password for a user.
    PasswordReset,
    /// An admin asked the run to stop after its current round.
    TrainingStopped,
    /// An admin queued a job.
    JobCreated,
    /// An admin stopped a job.
    JobStopped,
    /// An admin queued a stopped job again.
    JobResumed,
    /// An admin deleted a job.
    JobDeleted,
    /// A hospital suspended or reactivated.
    ClientStatusChange,
    /// An admin revoked a hospital's certificates on the server's roster.
    CertificateRevoked,
    /// An admin listed a hospital's new certificate (rotation).
    CertificateRotated,
    /// An X-ray read by the model.
    Inference,
    /// The model downloaded.
    ModelExport,
}

impl AuditAction {
    /// The column's value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Login => "login",
            AuditAction::PermissionDenied => "permission_denied",
            AuditAction::UserCreated => "user_created",
            AuditAction::RoleChange => "role_change",
            AuditAction::UserDataExport => "user_data_export",
            AuditAction::UserErased => "user_erased",
            AuditAction::Logout => "logout",
            AuditAction::PasswordChange => "password_change",
            AuditAction::PasswordReset => "password_reset",
            AuditAction::TrainingStopped => "training_stopped",
            AuditAction::JobCreated => "job_created",
            AuditAction::JobStopped => "job_stopped",
            AuditAction::JobResumed => "job_resumed",
            AuditAction::JobDeleted => "job_deleted",
            AuditAction::ClientStatusChange => "client_status_change",
            AuditAction::CertificateRevoked => "certificate_revoked",
            AuditAction::CertificateRotated => "certificate_rotated",
            AuditAction::Inference => "inference",
            AuditAction::ModelExport => "model_export",
        }
    }
}

/// How an audited action ended (the `outcome` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    /// It was done.
    Success,
    /// It failed (a wrong password, a rate limit).
    Failure,
    /// The role does not allow it.
    Denied,
}

impl AuditOutcome {
    /// The column's value.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Success => "success",
            AuditOutcome::Failure => "failure",
            AuditOutcome::Denied => "denied",
        }
    }
}

impl Store {
    /// Appends to the audit log. Failing to audit is an error for the caller.
    pub async fn audit(&self, a: Audit<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor_id, actor, action, target, outcome, detail, ip) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(now_ms())
        .bind(a.actor_id)
        .bind(a.actor)
        .bind(a.action.as_str())
        .bind(a.target)
        .bind(a.outcome.as_str())
        .bind(a.detail)
        .bind(a.ip)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a throttled sign-in attempt from `ip`: the first of a burst
    /// gets a row, later ones within `window_ms` only raise its count
    /// (`rate limited (N attempts)`), so throttled attempts cannot flood the
    /// log and push real entries out of view.
    pub async fn audit_throttled(&self, actor: &str, ip: &str, window_ms: i64) -> Result<()> {
        let since = now_ms() - window_ms;
        let last = sqlx::query(
            "SELECT id, detail FROM audit_log WHERE action = $1 AND outcome = $2 AND ip = $3 \
             AND at >= $4 AND detail LIKE 'rate limited%' ORDER BY id DESC LIMIT 1",
        )
        .bind(AuditAction::Login.as_str())
        .bind(AuditOutcome::Failure.as_str())
        .bind(ip)
        .bind(since)
        .fetch_optional(&self.pool)
        .await?;
        match last {
            Some(row) => {
                let id: i64 = row.try_get(0)?;
                let detail: Option<String> = row.try_get(1)?;
                let n = detail
                    .as_deref()
                    .and_then(|d| d.strip_prefix("rate limited ("))
                    .and_then(|d| d.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(1);
                sqlx::query("UPDATE audit_log SET detail = $1 WHERE id = $2")
                    .bind(format!("rate limited ({} attempts)", n + 1))
                    .bind(id)
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }
            None => {
                self.audit(Audit {
                    actor_id: None,
                    actor,
                    action: AuditAction::Login,
                    target: None,
                    outcome: AuditOutcome::Failure,
                    detail: Some("rate limited (1 attempts)"),
                    ip: Some(ip),
                })
                .await
            }
        }
    }

    /// Every audit entry about a user, newest first: what they did (by id),
    /// sign-ins tried with their name, and the entries that name them as
    /// the target (creation, role changes, data exports, password resets).
    /// What a data-subject export returns; the address is left out of the
    /// entries the user did not make (it is someone else's).
    pub async fn audit_of_user(&self, id: i64) -> Result<Vec<AuditRow>> {
        let Some(u) = self.user(id).await? else {
            return Ok(Vec::new());
        };
        sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log WHERE actor_id = $1 \
             OR (actor_id IS NULL AND lower(actor) = $2) \
             OR (lower(target) = $2 AND action IN ({TARGETS_USER})) ORDER BY id DESC"
        ))
        .bind(id)
        .bind(u.username.to_lowercase())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            // Someone else's address is theirs, not the subject's: an
            // admin's on the entries naming the user, an attacker's on a
            // sign-in tried with the name.
            let mut row = audit_row(r)?;
            if row.actor_id != Some(id) {
                row.ip = None;
            }
            Ok(row)
        })
        .collect()
    }

    /// The audit log, newest first; optionally one user's entries.
    pub async fn audit_log(&self, actor_id: Option<i64>, limit: i64) -> Result<Vec<AuditRow>> {
        self.audit_page(actor_id, None, limit).await
    }

    /// A page of the audit log, newest first: entries with an id below
    /// `before` (all when `None`), at most `limit`.
    pub async fn audit_page(
        &self,
        actor_id: Option<i64>,
        before: Option<i64>,
        limit: i64,
    ) -> Result<Vec<AuditRow>> {
        sqlx::query(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log \
             WHERE ($1 IS NULL OR actor_id = $1) AND ($2 IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(actor_id)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(audit_row)
        .collect()
    }
}

/// The audit actions whose target is a user name.
pub(super) const TARGETS_USER: &str =
    "'user_created', 'role_change', 'user_data_export', 'password_reset'";

const AUDIT_COLUMNS: &str = "id, at, actor_id, actor, action, target, outcome, detail, ip";

fn audit_row(r: &sqlx::any::AnyRow) -> Result<AuditRow> {
    Ok(AuditRow {
        id: r.try_get(0)?,
        at: r.try_get(1)?,
        actor_id: r.try_get(2)?,
        actor: r.try_get(3)?,
        action: r.try_get(4)?,
        target: r.try_get(5)?,
        outcome: r.try_get(6)?,
        detail: r.try_get(7)?,
        ip: r.try_get(8)?,
    })
}
