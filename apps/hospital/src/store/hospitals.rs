//! The hospitals the dashboard knows (the `clients` table).

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use super::{Store, now_ms};

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

impl Store {
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

    /// Registers a hospital that is not known yet (a deployed hospital
    /// that connected); one that is keeps its numbers and status.
    pub async fn ensure_client(&self, id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO clients (id, status, examples, patients, created_at) \
             VALUES ($1, 'active', 0, 0, $2) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
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
