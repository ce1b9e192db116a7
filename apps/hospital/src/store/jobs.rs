//! Jobs: every run the store records, queued from the web or started on
//! the command line (the `jobs` table), with what each one's rounds add up
//! to. The rounds, updates, trust scores and metrics of a run carry its job.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use super::{Store, now_ms};

/// What a job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Chest X-rays (synthetic or ChestX-ray14) with DenseNet-121 in a
    /// simulated federation.
    Xray,
    /// MNIST with the small CNN in a simulated federation.
    Mnist,
    /// The rounds of a deployed server (`hospital server`).
    Deployment,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for the run before it to end.
    Queued,
    /// Training.
    Running,
    /// Asked to stop: it ends after the current round.
    Stopping,
    /// Stopped by an administrator (or by a restart of the server): it can
    /// be resumed from its last checkpoint.
    Stopped,
    /// Ran all its rounds.
    Finished,
    /// Ended on an error (see `error`); it can be resumed.
    Failed,
}

impl JobKind {
    /// The column's value.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Xray => "xray",
            JobKind::Mnist => "mnist",
            JobKind::Deployment => "deployment",
        }
    }
}

impl JobStatus {
    /// The column's value.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Stopping => "stopping",
            JobStatus::Stopped => "stopped",
            JobStatus::Finished => "finished",
            JobStatus::Failed => "failed",
        }
    }

    /// Whether a run is (still) training for it.
    pub fn is_active(self) -> bool {
        matches!(self, JobStatus::Running | JobStatus::Stopping)
    }
}

fn parse<T: for<'de> Deserialize<'de>>(s: &str) -> Result<T> {
    Ok(serde_json::from_value(serde_json::Value::String(
        s.to_owned(),
    ))?)
}

/// A job as the runs page lists it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobRow {
    /// Its number.
    pub id: i64,
    /// What it trains.
    pub kind: JobKind,
    /// Its name.
    pub name: String,
    /// Its settings (the form's, or the command line's).
    #[schema(value_type = Object)]
    pub settings: serde_json::Value,
    /// Where it is.
    pub status: JobStatus,
    /// Who started it (`None`: the command line).
    pub created_by: Option<String>,
    /// When it was created (ms since the epoch).
    pub created_at: i64,
    /// When it last started training.
    pub started_at: Option<i64>,
    /// When it last ended.
    pub finished_at: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
    /// Whether its next start continues from its checkpoint.
    pub resume: bool,
    /// Rounds recorded.
    pub rounds: i64,
    /// The last held-out macro AUROC (X-ray runs).
    pub auroc_macro: Option<f64>,
    /// The last test accuracy (MNIST runs).
    pub accuracy: Option<f64>,
    /// The largest epsilon a hospital reported spending.
    pub epsilon: Option<f64>,
    /// Its folder on the server (checkpoints, keys, data it wrote).
    #[serde(skip)]
    pub run_dir: Option<String>,
}

/// A job to create.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    /// What it trains.
    pub kind: JobKind,
    /// Its name.
    pub name: &'a str,
    /// Its settings.
    pub settings: &'a serde_json::Value,
    /// Who asked (a user id; `None`: the command line).
    pub created_by: Option<i64>,
    /// Its folder.
    pub run_dir: Option<&'a str>,
    /// Its first status: `Queued`, or `Running` for a run that starts at
    /// once (a deployed server).
    pub status: JobStatus,
}

const JOB_COLUMNS: &str = "SELECT j.id, j.kind, j.name, j.settings, j.status, u.username, \
     j.created_at, j.started_at, j.finished_at, j.error, j.resume, j.run_dir, \
     (SELECT COUNT(*) FROM rounds r WHERE r.job_id = j.id), \
     (SELECT r.auroc_macro FROM rounds r WHERE r.job_id = j.id AND r.auroc_macro IS NOT NULL \
      ORDER BY r.id DESC LIMIT 1), \
     (SELECT m.value FROM round_metrics m WHERE m.job_id = j.id AND m.name = 'eval.accuracy' \
      AND m.round_id > 0 \
      ORDER BY m.round_id DESC LIMIT 1), \
     (SELECT MAX(c.epsilon) FROM client_updates c WHERE c.job_id = j.id) \
     FROM jobs j LEFT JOIN users u ON u.id = j.created_by";

impl JobRow {
    /// The row as the API shows it: its settings without the server's
    /// folders (`run_dir`; `data_dir` becomes `"chestxray14": true`).
    pub fn public(mut self) -> Self {
        if let Some(m) = self.settings.as_object_mut() {
            m.remove("run_dir");
            if let Some(d) = m.remove("data_dir") {
                m.insert("chestxray14".into(), serde_json::Value::Bool(!d.is_null()));
            }
        }
        self
    }
}

fn job(r: &sqlx::any::AnyRow) -> Result<JobRow> {
    let settings: String = r.try_get(3)?;
    Ok(JobRow {
        id: r.try_get(0)?,
        kind: parse(&r.try_get::<String, _>(1)?)?,
        name: r.try_get(2)?,
        settings: serde_json::from_str(&settings)?,
        status: parse(&r.try_get::<String, _>(4)?)?,
        created_by: r.try_get(5)?,
        created_at: r.try_get(6)?,
        started_at: r.try_get(7)?,
        finished_at: r.try_get(8)?,
        error: r.try_get(9)?,
        resume: r.try_get::<i64, _>(10)? != 0,
        run_dir: r.try_get(11)?,
        rounds: r.try_get(12)?,
        auroc_macro: r.try_get(13)?,
        accuracy: r.try_get(14)?,
        epsilon: r.try_get(15)?,
    })
}

impl Store {
    /// Creates a job; its number.
    pub async fn create_job(&self, j: &NewJob<'_>) -> Result<i64> {
        let now = now_ms();
        let started = (j.status == JobStatus::Running).then_some(now);
        let row = sqlx::query(
            "INSERT INTO jobs (kind, name, settings, status, created_by, created_at, started_at, \
             run_dir) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(j.kind.as_str())
        .bind(j.name)
        .bind(serde_json::to_string(j.settings)?)
        .bind(j.status.as_str())
        .bind(j.created_by)
        .bind(now)
        .bind(started)
        .bind(j.run_dir)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get(0)?)
    }

    /// Every job, the newest first.
    pub async fn jobs(&self) -> Result<Vec<JobRow>> {
        sqlx::query(&format!("{JOB_COLUMNS} ORDER BY j.id DESC"))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(job)
            .collect()
    }

    /// One job.
    pub async fn job(&self, id: i64) -> Result<Option<JobRow>> {
        sqlx::query(&format!("{JOB_COLUMNS} WHERE j.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(job)
            .transpose()
    }

    /// The job the pages show by default: the one training, or else the
    /// one that started last.
    pub async fn current_job(&self) -> Result<Option<i64>> {
        let row = sqlx::query(
            "SELECT id FROM jobs WHERE started_at IS NOT NULL \
             ORDER BY CASE WHEN status IN ('running', 'stopping') THEN 1 ELSE 0 END DESC, \
             started_at DESC, id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.try_get(0)).transpose()?)
    }

    /// Moves job `id` from one of `from` to `to` (recording an error, and
    /// the time when it starts or ends); false when it is not in any of
    /// `from` (or does not exist).
    pub async fn move_job(
        &self,
        id: i64,
        from: &[JobStatus],
        to: JobStatus,
        error: Option<&str>,
    ) -> Result<bool> {
        if from.is_empty() {
            bail!("a job moves from at least one status");
        }
        let list: Vec<String> = (0..from.len()).map(|k| format!("${}", k + 5)).collect();
        let sql = format!(
            "UPDATE jobs SET status = $1, error = $2, \
             started_at = CASE WHEN $1 = 'running' THEN $3 ELSE started_at END, \
             finished_at = CASE WHEN $1 IN ('stopped', 'finished', 'failed') THEN $3 ELSE finished_at END \
             WHERE id = $4 AND status IN ({})",
            list.join(", ")
        );
        let mut q = sqlx::query(&sql)
            .bind(to.as_str())
            .bind(error)
            .bind(now_ms())
            .bind(id);
        for s in from {
            q = q.bind(s.as_str());
        }
        Ok(q.execute(&self.pool).await?.rows_affected() == 1)
    }

    /// Puts a stopped or failed job back in the queue; `resume`: it
    /// continues from its checkpoint. False when it is not stopped or
    /// failed.
    pub async fn requeue_job(&self, id: i64, resume: bool) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE jobs SET status = 'queued', resume = $1, error = NULL \
             WHERE id = $2 AND status IN ('stopped', 'failed')",
        )
        .bind(i64::from(resume))
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// The oldest queued job that has its folder, now running; `None` when
    /// none waits.
    pub async fn start_next_job(&self) -> Result<Option<JobRow>> {
        loop {
            let Some(row) = sqlx::query(
                "SELECT id FROM jobs WHERE status = 'queued' AND run_dir IS NOT NULL \
                     ORDER BY id LIMIT 1",
            )
            .fetch_optional(&self.pool)
            .await?
            else {
                return Ok(None);
            };
            let id: i64 = row.try_get(0)?;
            // Someone may have stopped or deleted it in between.
            if self
                .move_job(id, &[JobStatus::Queued], JobStatus::Running, None)
                .await?
            {
                return self.job(id).await;
            }
        }
    }

    /// Sets where a job keeps its files.
    pub async fn set_job_run_dir(&self, id: i64, dir: &str) -> Result<()> {
        sqlx::query("UPDATE jobs SET run_dir = $1 WHERE id = $2")
            .bind(dir)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Takes a job's folder away (a later run took it over): it can no
    /// longer be resumed.
    pub async fn clear_job_run_dir(&self, id: i64) -> Result<()> {
        sqlx::query("UPDATE jobs SET run_dir = NULL WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Keeps a job's cross-site evaluation (JSON).
    pub async fn set_job_cross_site(&self, id: i64, matrix: &serde_json::Value) -> Result<()> {
        sqlx::query("UPDATE jobs SET cross_site = $1 WHERE id = $2")
            .bind(serde_json::to_string(matrix)?)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A job's cross-site evaluation: `None` when the job does not exist,
    /// `Some(None)` when it has none.
    pub async fn job_cross_site(&self, id: i64) -> Result<Option<Option<serde_json::Value>>> {
        let Some(row) = sqlx::query("SELECT cross_site FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let text: Option<String> = row.try_get(0)?;
        Ok(Some(text.map(|t| serde_json::from_str(&t)).transpose()?))
    }

    /// Replaces a job's settings (a resumed command-line run may extend its
    /// rounds).
    pub async fn set_job_settings(&self, id: i64, settings: &serde_json::Value) -> Result<()> {
        sqlx::query("UPDATE jobs SET settings = $1 WHERE id = $2")
            .bind(serde_json::to_string(settings)?)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Jobs left running by a server that ended without finishing them
    /// become stopped (resumable); how many.
    pub async fn recover_jobs(&self) -> Result<u64> {
        Ok(sqlx::query(
            "UPDATE jobs SET status = 'stopped', resume = 1 \
             WHERE status IN ('running', 'stopping')",
        )
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    /// Deletes a job that is not training and everything recorded for it,
    /// in one transaction; false when it is training or does not exist.
    pub async fn delete_job(&self, id: i64) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let n =
            sqlx::query("DELETE FROM jobs WHERE id = $1 AND status NOT IN ('running', 'stopping')")
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if n != 1 {
            return Ok(false);
        }
        for table in ["client_updates", "trust_scores", "round_metrics", "rounds"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE job_id = $1"))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Per round of `job`, the largest epsilon a hospital reported.
    pub async fn epsilons(&self, job: i64) -> Result<Vec<(i64, f64)>> {
        sqlx::query(
            "SELECT round_id, MAX(epsilon) FROM client_updates \
             WHERE job_id = $1 AND epsilon IS NOT NULL GROUP BY round_id ORDER BY round_id",
        )
        .bind(job)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
    }
}
