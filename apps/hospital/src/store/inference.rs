//! The inference history (the `inferences` table).

use anyhow::Result;
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

use super::{Store, now_ms};

/// An inference as logged (the image itself is never stored, only its hash).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InferenceRow {
    /// Its id.
    pub id: i64,
    /// Who ran it.
    pub user_id: i64,
    /// Their user name (`None` once the account is gone).
    pub username: Option<String>,
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

impl Store {
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
            "SELECT l.id, l.user_id, l.created_at, l.model_round, l.image_sha256, l.width, l.height, \
             l.findings, u.username FROM inference_logs l LEFT JOIN users u ON u.id = l.user_id \
             WHERE ($1 IS NULL OR l.user_id = $1) ORDER BY l.id DESC LIMIT $2",
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
                username: r.try_get(8)?,
            })
        })
        .collect()
    }
}
