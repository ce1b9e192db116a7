//! The dashboard's store: sqlx over SQLite (default) or PostgreSQL, chosen by
//! the scheme of `DATABASE_URL`, with the same queries for both.
//!
//! Every value comes in as a bound parameter (`$1`, ...), never formatted
//! into SQL. Times are milliseconds since the Unix epoch; flags are 0/1
//! integers, so one set of queries reads both databases through
//! `sqlx::Any`.

mod audit;
mod connections;
mod hospitals;
mod inference;
mod jobs;
mod rounds;
mod users;

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use sqlx::AnyPool;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::migrate::Migrator;

pub use audit::{Audit, AuditAction, AuditOutcome, AuditRow};
pub use connections::{ConnectionRow, REFUSALS_KEPT, RefusalRow};
pub use hospitals::{ClientRow, ClientStatus};
pub use inference::InferenceRow;
pub use jobs::{JobKind, JobRow, JobStatus, NewJob};
pub use rounds::{NewRound, RoundRow, TrustRow, UpdateRow};
pub use users::{ERASED_PREFIX, Role, User};

static SQLITE: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES: Migrator = sqlx::migrate!("./migrations/postgres");

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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
        // SQLite: sqlx opens every connection with foreign keys on and a
        // busy timeout of 5 s (a pragma run here would reach one connection
        // of the pool only). A transaction that writes must write first
        // (see `anonymize_user`).
        Ok(Self { pool, postgres })
    }

    /// Whether this is PostgreSQL.
    pub fn is_postgres(&self) -> bool {
        self.postgres
    }
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}
