//! Users and their sessions (the `users` table).

use std::str::FromStr;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use super::audit::TARGETS_USER;
use super::{Store, now_ms};

/// How an erased user's name starts (`deleted-<id>`); no new name may.
pub const ERASED_PREFIX: &str = "deleted-";

/// A role and what it may do (see [`Permission`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Manages users and clients; everything a doctor may do.
    Admin,
    /// Runs inference and views metrics.
    Doctor,
    /// Views metrics only.
    Viewer,
}

impl Role {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Doctor => "doctor",
            Self::Viewer => "viewer",
        }
    }
}

impl FromStr for Role {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "admin" => Self::Admin,
            "doctor" => Self::Doctor,
            "viewer" => Self::Viewer,
            other => bail!("unknown role `{other}` (admin, doctor, viewer)"),
        })
    }
}

/// A dashboard user (never with its password hash).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct User {
    /// Its id.
    pub id: i64,
    /// Login name.
    pub username: String,
    /// Its role.
    pub role: Role,
    /// When it was created (ms since the epoch).
    pub created_at: i64,
}

impl Store {
    /// Creates a user, its name in lower case; `Ok(None)` when the name is
    /// taken (in any case).
    pub async fn create_user(
        &self,
        username: &str,
        hash: &str,
        role: Role,
    ) -> Result<Option<User>> {
        let now = now_ms();
        let username = username.to_lowercase();
        let row = sqlx::query(
            "INSERT INTO users (username, password_hash, role, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(&username)
        .bind(hash)
        .bind(role.as_str())
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| User {
            id: r.get::<i64, _>(0),
            username,
            role,
            created_at: now,
        }))
    }

    /// A user, its password hash and its session version, by name in any
    /// case (deleted users are not found).
    pub async fn user_by_name(&self, username: &str) -> Result<Option<(User, String, i64)>> {
        let row = sqlx::query(
            "SELECT id, username, role, created_at, password_hash, session_version FROM users \
             WHERE lower(username) = $1 AND deleted = 0",
        )
        .bind(username.to_lowercase())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok((
                user(&r)?,
                r.try_get::<String, _>(4)?,
                r.try_get::<i64, _>(5)?,
            ))
        })
        .transpose()
    }

    /// A user by id (deleted users are not found).
    pub async fn user(&self, id: i64) -> Result<Option<User>> {
        let row = sqlx::query(
            "SELECT id, username, role, created_at FROM users WHERE id = $1 AND deleted = 0",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| user(&r)).transpose()
    }

    /// A user by id with its session version (deleted users are not found):
    /// what every authenticated request checks its token against.
    pub async fn session(&self, id: i64) -> Result<Option<(User, i64)>> {
        let row = sqlx::query(
            "SELECT id, username, role, created_at, session_version FROM users \
             WHERE id = $1 AND deleted = 0",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok((user(&r)?, r.try_get::<i64, _>(4)?)))
            .transpose()
    }

    /// Ends every session of a user (raises its session version); the new
    /// version, or `None` when there is no such user.
    pub async fn revoke_sessions(&self, id: i64) -> Result<Option<i64>> {
        let row = sqlx::query(
            "UPDATE users SET session_version = session_version + 1 \
             WHERE id = $1 AND deleted = 0 RETURNING session_version",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok(r.try_get::<i64, _>(0)?)).transpose()
    }

    /// A user's password hash (deleted users have none).
    pub async fn password_hash(&self, id: i64) -> Result<Option<String>> {
        let row = sqlx::query("SELECT password_hash FROM users WHERE id = $1 AND deleted = 0")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok(r.try_get::<String, _>(0)?)).transpose()
    }

    /// Sets a new password hash and ends every session of the user; the new
    /// session version, or `None` when there is no such user.
    pub async fn set_password(&self, id: i64, hash: &str) -> Result<Option<i64>> {
        let row = sqlx::query(
            "UPDATE users SET password_hash = $1, session_version = session_version + 1 \
             WHERE id = $2 AND deleted = 0 RETURNING session_version",
        )
        .bind(hash)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| Ok(r.try_get::<i64, _>(0)?)).transpose()
    }

    /// Every user that is not deleted.
    pub async fn users(&self) -> Result<Vec<User>> {
        sqlx::query(
            "SELECT id, username, role, created_at FROM users WHERE deleted = 0 ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(user)
        .collect()
    }

    /// Changes a role and, when it is another role, ends the user's
    /// sessions (a token issued under the old role stops working); false
    /// when there is no such user.
    pub async fn set_role(&self, id: i64, role: Role) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE users SET role = $1, \
             session_version = session_version + CASE WHEN role = $1 THEN 0 ELSE 1 END \
             WHERE id = $2 AND deleted = 0",
        )
        .bind(role.as_str())
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// How many admins are left (the last one cannot be removed).
    pub async fn admin_count(&self) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) FROM users WHERE role = 'admin' AND deleted = 0")
                .fetch_one(&self.pool)
                .await?
                .try_get::<i64, _>(0)?,
        )
    }

    /// Erases a user's personal data: the name becomes `deleted-<id>`, the
    /// password hash is cleared (no login) and every session ends. In the
    /// audit log, the entries by the user keep only the id (no name, no
    /// address), and entries that name the user (a sign-in tried with the
    /// name, the account's creation, a role change, a data export) show
    /// the alias instead. The inference log keeps the (non-personal) rows
    /// under the id.
    pub async fn anonymize_user(&self, id: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        // A write first, so that SQLite takes its write lock (waiting out
        // another writer) at the start. A transaction that read first would
        // have to upgrade, which SQLite refuses at once (SQLITE_BUSY, no
        // busy wait) while another connection writes: a round being
        // recorded made the erasure fail.
        let n = sqlx::query(
            "UPDATE users SET password_hash = '', deleted = 1, \
             session_version = session_version + 1 WHERE id = $1 AND deleted = 0",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != 1 {
            return Ok(false);
        }
        let name: String = sqlx::query("SELECT username FROM users WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        // New names cannot start with `deleted-` (auth::check_new_username); a
        // name from before that rule could, so the alias is checked.
        let mut alias = format!("{ERASED_PREFIX}{id}");
        for k in 2.. {
            let taken = sqlx::query("SELECT 1 FROM users WHERE lower(username) = $1 AND id <> $2")
                .bind(&alias)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some();
            if !taken {
                break;
            }
            alias = format!("{ERASED_PREFIX}{id}-{k}");
        }
        sqlx::query("UPDATE users SET username = $1 WHERE id = $2")
            .bind(&alias)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let name = name.to_lowercase();
        sqlx::query(
            "UPDATE audit_log SET actor = $1, ip = NULL \
             WHERE actor_id = $2 OR (actor_id IS NULL AND lower(actor) = $3)",
        )
        .bind(&alias)
        .bind(id)
        .bind(&name)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!(
            "UPDATE audit_log SET target = $1 WHERE lower(target) = $2 AND action IN ({})",
            TARGETS_USER
        ))
        .bind(&alias)
        .bind(&name)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}

fn user(r: &sqlx::any::AnyRow) -> Result<User> {
    Ok(User {
        id: r.try_get(0)?,
        username: r.try_get(1)?,
        role: r.try_get::<String, _>(2)?.parse()?,
        created_at: r.try_get(3)?,
    })
}
