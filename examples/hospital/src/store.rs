//! The dashboard's store: sqlx over SQLite (default) or PostgreSQL, chosen by
//! the scheme of `DATABASE_URL`, with the same queries for both.
//!
//! Every value comes in as a bound parameter (`$1`, ...), never formatted
//! into SQL. Times are milliseconds since the Unix epoch; flags are 0/1
//! integers, so one set of queries reads both databases through
//! `sqlx::Any`.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Row};
use utoipa::ToSchema;

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

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

/// A hospital as the dashboard lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ClientRow {
    /// Its identity (e.g. `hospital-1`).
    pub id: String,
    /// `active` or `suspended` (left out of training).
    pub status: ClientStatus,
    /// Training images.
    pub examples: i64,
    /// Patients behind them.
    pub patients: i64,
}

/// One round as listed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RoundRow {
    /// Round number, from 1.
    pub id: i64,
    /// `completed`, `quorum_not_reached`, `aggregation_failed`.
    pub outcome: String,
    /// Aggregator name.
    pub aggregator: String,
    /// Start (ms since the epoch).
    pub started_at: i64,
    /// Duration.
    pub duration_ms: i64,
    /// Updates that counted.
    pub accepted: i64,
    /// Sampled hospitals whose update did not count.
    pub rejected: i64,
    /// Held-out loss after the round.
    pub loss: Option<f64>,
    /// Mean training loss of the accepted hospitals.
    pub train_loss: Option<f64>,
    /// Held-out macro AUROC after the round.
    pub auroc_macro: Option<f64>,
    /// L2 norm of the aggregated step.
    pub update_norm: Option<f64>,
}

/// One hospital's part in one round.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UpdateRow {
    /// The round.
    pub round_id: i64,
    /// The hospital.
    pub client_id: String,
    /// Whether it counted.
    pub accepted: bool,
    /// Why not, when it did not.
    pub reason: Option<String>,
    /// Its weight in the aggregate.
    pub weight: Option<f64>,
    /// The aggregator's trust score this round.
    pub trust: Option<f64>,
    /// L2 norm of its (privatized) update.
    pub update_norm: Option<f64>,
    /// Its training images.
    pub num_examples: Option<i64>,
    /// Its differential-privacy epsilon spent so far.
    pub epsilon: Option<f64>,
    /// The delta of that epsilon.
    pub delta: Option<f64>,
}

/// One point of a hospital's trust timeline.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TrustRow {
    /// The round.
    pub round_id: i64,
    /// The aggregator's score this round (1 = agrees with the others).
    pub trust: f64,
    /// Its moving average.
    pub trust_ema: Option<f64>,
    /// Whether the average is below the threshold.
    pub suspicious: bool,
}

/// A round with everything recorded about it, as the simulation writes it.
#[derive(Debug, Clone)]
pub struct NewRound {
    /// The summary row.
    pub round: RoundRow,
    /// Each sampled hospital's part.
    pub updates: Vec<UpdateRow>,
    /// Trust scores of the accepted hospitals.
    pub trust: Vec<(String, TrustRow)>,
    /// Named metrics.
    pub metrics: Vec<(String, f64)>,
}

/// An inference as logged (the image itself is never stored, only its hash).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InferenceRow {
    /// Its id.
    pub id: i64,
    /// Who ran it.
    pub user_id: i64,
    /// When.
    pub created_at: i64,
    /// The round of the model that answered.
    pub model_round: Option<i64>,
    /// SHA-256 of the uploaded file.
    pub image_sha256: String,
    /// Decoded width.
    pub width: i64,
    /// Decoded height.
    pub height: i64,
    /// The findings as JSON text (`[{"label":..,"probability":..}]`); sealed
    /// at rest when a key is configured, opened by the caller.
    pub findings: String,
}

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
    /// A hospital suspended or reactivated.
    ClientStatusChange,
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
            AuditAction::ClientStatusChange => "client_status_change",
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

/// A hospital's status on the dashboard (the `status` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientStatus {
    /// Takes part in training.
    Active,
    /// Kept out of training by an administrator.
    Suspended,
}

impl ClientStatus {
    /// The column's value.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientStatus::Active => "active",
            ClientStatus::Suspended => "suspended",
        }
    }
}

impl std::str::FromStr for ClientStatus {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "active" => Ok(ClientStatus::Active),
            "suspended" => Ok(ClientStatus::Suspended),
            other => Err(format!("unknown client status `{other}`")),
        }
    }
}

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    postgres: bool,
}

impl Store {
    /// Connects to `url` (`sqlite://path?mode=rwc`, `sqlite::memory:` or
    /// `postgres://...`) and runs the migrations of its database.
    pub async fn connect(url: &str) -> Result<Self> {
        install_default_drivers();
        let postgres = url.starts_with("postgres://") || url.starts_with("postgresql://");
        if !postgres && !url.starts_with("sqlite:") {
            bail!("DATABASE_URL must start with sqlite: or postgres://");
        }
        // One connection for an in-memory SQLite database (each connection
        // would be a database of its own).
        let max = if url.contains(":memory:") { 1 } else { 8 };
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .connect(url)
            .await
            .with_context(|| format!("cannot open the database {}", redact(url)))?;
        let migrator = if postgres { &POSTGRES } else { &SQLITE };
        migrator.run(&pool).await.context("database migrations")?;
        if !postgres {
            sqlx::query("PRAGMA foreign_keys = ON")
                .execute(&pool)
                .await?;
        }
        Ok(Self { pool, postgres })
    }

    /// Whether this is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.postgres
    }

    // ---- users

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
        let alias = format!("deleted-{id}");
        let name = sqlx::query("SELECT username FROM users WHERE id = $1 AND deleted = 0")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get::<String, _>(0))
            .transpose()?;
        let Some(name) = name else {
            return Ok(false);
        };
        sqlx::query(
            "UPDATE users SET username = $1, password_hash = '', deleted = 1, \
             session_version = session_version + 1 WHERE id = $2",
        )
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

    // ---- clients

    /// Registers (or refreshes the data size of) a hospital; its status is kept.
    pub async fn upsert_client(&self, id: &str, examples: i64, patients: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO clients (id, status, examples, patients, created_at) \
             VALUES ($1, 'active', $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET examples = excluded.examples, patients = excluded.patients",
        )
        .bind(id)
        .bind(examples)
        .bind(patients)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every hospital.
    pub async fn clients(&self) -> Result<Vec<ClientRow>> {
        sqlx::query("SELECT id, status, examples, patients FROM clients ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(client)
            .collect()
    }

    /// One hospital.
    pub async fn client(&self, id: &str) -> Result<Option<ClientRow>> {
        sqlx::query("SELECT id, status, examples, patients FROM clients WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(client)
            .transpose()
    }

    /// Sets a hospital's status; false when there is no such hospital.
    pub async fn set_client_status(&self, id: &str, status: ClientStatus) -> Result<bool> {
        let n = sqlx::query("UPDATE clients SET status = $1 WHERE id = $2")
            .bind(status.as_str())
            .bind(id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    // ---- rounds

    /// Records a round (replacing an earlier record of the same number, as
    /// after a resumed run re-ran it), in one transaction.
    pub async fn record_round(&self, r: &NewRound) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let id = r.round.id;
        for table in ["client_updates", "trust_scores", "round_metrics"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE round_id = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM rounds WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let x = &r.round;
        sqlx::query(
            "INSERT INTO rounds (id, outcome, aggregator, started_at, duration_ms, accepted, \
             rejected, loss, train_loss, auroc_macro, update_norm) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(id)
        .bind(&x.outcome)
        .bind(&x.aggregator)
        .bind(x.started_at)
        .bind(x.duration_ms)
        .bind(x.accepted)
        .bind(x.rejected)
        .bind(x.loss)
        .bind(x.train_loss)
        .bind(x.auroc_macro)
        .bind(x.update_norm)
        .execute(&mut *tx)
        .await?;
        for u in &r.updates {
            sqlx::query(
                "INSERT INTO client_updates (round_id, client_id, accepted, reason, weight, trust, \
                 update_norm, num_examples, epsilon, delta) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(id)
            .bind(&u.client_id)
            .bind(i64::from(u.accepted))
            .bind(&u.reason)
            .bind(u.weight)
            .bind(u.trust)
            .bind(u.update_norm)
            .bind(u.num_examples)
            .bind(u.epsilon)
            .bind(u.delta)
            .execute(&mut *tx)
            .await?;
        }
        for (client, t) in &r.trust {
            sqlx::query(
                "INSERT INTO trust_scores (round_id, client_id, trust, trust_ema, suspicious) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(id)
            .bind(client)
            .bind(t.trust)
            .bind(t.trust_ema)
            .bind(i64::from(t.suspicious))
            .execute(&mut *tx)
            .await?;
        }
        for (name, value) in &r.metrics {
            if !value.is_finite() {
                continue;
            }
            sqlx::query("INSERT INTO round_metrics (round_id, name, value) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(name)
                .bind(*value)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every round, in order.
    pub async fn rounds(&self) -> Result<Vec<RoundRow>> {
        sqlx::query(&format!("{ROUND_COLUMNS} ORDER BY id"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(round)
            .collect()
    }

    /// One round.
    pub async fn round(&self, id: i64) -> Result<Option<RoundRow>> {
        sqlx::query(&format!("{ROUND_COLUMNS} WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(round)
            .transpose()
    }

    /// The hospitals' parts in a round, or in every round of one hospital.
    pub async fn updates(
        &self,
        round: Option<i64>,
        client: Option<&str>,
    ) -> Result<Vec<UpdateRow>> {
        sqlx::query(
            "SELECT round_id, client_id, accepted, reason, weight, trust, update_norm, \
             num_examples, epsilon, delta FROM client_updates \
             WHERE ($1 IS NULL OR round_id = $1) AND ($2 IS NULL OR client_id = $2) \
             ORDER BY round_id, client_id",
        )
        .bind(round)
        .bind(client)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(UpdateRow {
                round_id: r.try_get(0)?,
                client_id: r.try_get(1)?,
                accepted: r.try_get::<i64, _>(2)? != 0,
                reason: r.try_get(3)?,
                weight: r.try_get(4)?,
                trust: r.try_get(5)?,
                update_norm: r.try_get(6)?,
                num_examples: r.try_get(7)?,
                epsilon: r.try_get(8)?,
                delta: r.try_get(9)?,
            })
        })
        .collect()
    }

    /// A hospital's trust timeline.
    pub async fn trust(&self, client: &str) -> Result<Vec<TrustRow>> {
        sqlx::query(
            "SELECT round_id, trust, trust_ema, suspicious FROM trust_scores \
             WHERE client_id = $1 ORDER BY round_id",
        )
        .bind(client)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(TrustRow {
                round_id: r.try_get(0)?,
                trust: r.try_get(1)?,
                trust_ema: r.try_get(2)?,
                suspicious: r.try_get::<i64, _>(3)? != 0,
            })
        })
        .collect()
    }

    /// Per round, the metrics whose names start with `prefix`, keyed by the
    /// rest of the name; one round or every round. The prefix is matched
    /// here: a `LIKE` pattern would treat `_` in metric names as a wildcard.
    pub async fn metrics(
        &self,
        prefix: &str,
        round: Option<i64>,
    ) -> Result<BTreeMap<i64, BTreeMap<String, f64>>> {
        let rows = sqlx::query(
            "SELECT round_id, name, value FROM round_metrics \
             WHERE ($1 IS NULL OR round_id = $1) ORDER BY round_id, name",
        )
        .bind(round)
        .fetch_all(&self.pool)
        .await?;
        let mut out: BTreeMap<i64, BTreeMap<String, f64>> = BTreeMap::new();
        for r in &rows {
            let name: String = r.try_get(1)?;
            if let Some(rest) = name.strip_prefix(prefix) {
                out.entry(r.try_get(0)?)
                    .or_default()
                    .insert(rest.to_owned(), r.try_get(2)?);
            }
        }
        Ok(out)
    }

    // ---- inference

    /// Logs an inference; returns its id.
    #[allow(clippy::too_many_arguments)]
    pub async fn log_inference(
        &self,
        user_id: i64,
        model_round: Option<i64>,
        sha256: &str,
        width: i64,
        height: i64,
        findings: &str,
    ) -> Result<i64> {
        let row = sqlx::query(
            "INSERT INTO inference_logs (user_id, created_at, model_round, image_sha256, width, \
             height, findings) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        )
        .bind(user_id)
        .bind(now_ms())
        .bind(model_round)
        .bind(sha256)
        .bind(width)
        .bind(height)
        .bind(findings)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get(0)?)
    }

    /// The inference log, newest first: everyone's, or one user's.
    pub async fn inferences(&self, user: Option<i64>, limit: i64) -> Result<Vec<InferenceRow>> {
        sqlx::query(
            "SELECT id, user_id, created_at, model_round, image_sha256, width, height, findings \
             FROM inference_logs WHERE ($1 IS NULL OR user_id = $1) ORDER BY id DESC LIMIT $2",
        )
        .bind(user)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(InferenceRow {
                id: r.try_get(0)?,
                user_id: r.try_get(1)?,
                created_at: r.try_get(2)?,
                model_round: r.try_get(3)?,
                image_sha256: r.try_get(4)?,
                width: r.try_get(5)?,
                height: r.try_get(6)?,
                findings: r.try_get(7)?,
            })
        })
        .collect()
    }

    // ---- audit

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

const ROUND_COLUMNS: &str = "SELECT id, outcome, aggregator, started_at, duration_ms, accepted, \
     rejected, loss, train_loss, auroc_macro, update_norm FROM rounds";

/// The audit actions whose target is a user name.
const TARGETS_USER: &str = "'user_created', 'role_change', 'user_data_export', 'password_reset'";

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

fn user(r: &sqlx::any::AnyRow) -> Result<User> {
    Ok(User {
        id: r.try_get(0)?,
        username: r.try_get(1)?,
        role: r.try_get::<String, _>(2)?.parse()?,
        created_at: r.try_get(3)?,
    })
}

fn client(r: &sqlx::any::AnyRow) -> Result<ClientRow> {
    let status: String = r.try_get(1)?;
    Ok(ClientRow {
        id: r.try_get(0)?,
        status: status.parse().map_err(anyhow::Error::msg)?,
        examples: r.try_get(2)?,
        patients: r.try_get(3)?,
    })
}

fn round(r: &sqlx::any::AnyRow) -> Result<RoundRow> {
    Ok(RoundRow {
        id: r.try_get(0)?,
        outcome: r.try_get(1)?,
        aggregator: r.try_get(2)?,
        started_at: r.try_get(3)?,
        duration_ms: r.try_get(4)?,
        accepted: r.try_get(5)?,
        rejected: r.try_get(6)?,
        loss: r.try_get(7)?,
        train_loss: r.try_get(8)?,
        auroc_macro: r.try_get(9)?,
        update_norm: r.try_get(10)?,
    })
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}
