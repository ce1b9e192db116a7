//! Rounds, each hospital's part in them and the held-out metrics (the
//! `rounds`, `updates` and `metrics` tables).

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

use super::Store;

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
    /// The bytes its update took on the network (values in their upload
    /// encoding, plus any variate and sealed bytes).
    #[serde(default)]
    pub upload_bytes: Option<i64>,
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

impl Store {
    /// Records a round of `job` (replacing an earlier record of the same
    /// number, as after a resumed run re-ran it), in one transaction.
    pub async fn record_round(&self, job: i64, r: &NewRound) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let id = r.round.id;
        for table in ["client_updates", "trust_scores", "round_metrics"] {
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE job_id = $1 AND round_id = $2"
            ))
            .bind(job)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DELETE FROM rounds WHERE job_id = $1 AND id = $2")
            .bind(job)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let x = &r.round;
        sqlx::query(
            "INSERT INTO rounds (job_id, id, outcome, aggregator, started_at, duration_ms, accepted, \
             rejected, loss, train_loss, auroc_macro, update_norm) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(job)
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
                "INSERT INTO client_updates (job_id, round_id, client_id, accepted, reason, weight, \
                 trust, update_norm, num_examples, epsilon, delta, upload_bytes) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            )
            .bind(job)
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
            .bind(u.upload_bytes)
            .execute(&mut *tx)
            .await?;
        }
        for (client, t) in &r.trust {
            sqlx::query(
                "INSERT INTO trust_scores (job_id, round_id, client_id, trust, trust_ema, suspicious) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(job)
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
            sqlx::query(
                "INSERT INTO round_metrics (job_id, round_id, name, value) VALUES ($1, $2, $3, $4)",
            )
            .bind(job)
            .bind(id)
            .bind(name)
            .bind(*value)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The held-out evaluation of `job`'s model before its first round
    /// (round 0 of its charts): its loss and metrics as `eval.*` metrics
    /// of round 0, replacing an earlier record.
    pub async fn record_initial(
        &self,
        job: i64,
        loss: f64,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM round_metrics WHERE job_id = $1 AND round_id = 0")
            .bind(job)
            .execute(&mut *tx)
            .await?;
        let all =
            std::iter::once(("loss", loss)).chain(metrics.iter().map(|(k, v)| (k.as_str(), *v)));
        for (name, value) in all {
            if !value.is_finite() {
                continue;
            }
            sqlx::query(
                "INSERT INTO round_metrics (job_id, round_id, name, value) VALUES ($1, 0, $2, $3)",
            )
            .bind(job)
            .bind(format!("eval.{name}"))
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every round of `job`, in order.
    pub async fn rounds(&self, job: i64) -> Result<Vec<RoundRow>> {
        sqlx::query(&format!("{ROUND_COLUMNS} WHERE job_id = $1 ORDER BY id"))
            .bind(job)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(round)
            .collect()
    }

    /// One round of `job`.
    pub async fn round(&self, job: i64, id: i64) -> Result<Option<RoundRow>> {
        sqlx::query(&format!("{ROUND_COLUMNS} WHERE job_id = $1 AND id = $2"))
            .bind(job)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(round)
            .transpose()
    }

    /// The hospitals' parts in a round of `job`, or in every round of one
    /// hospital.
    pub async fn updates(
        &self,
        job: i64,
        round: Option<i64>,
        client: Option<&str>,
    ) -> Result<Vec<UpdateRow>> {
        sqlx::query(
            "SELECT round_id, client_id, accepted, reason, weight, trust, update_norm, \
             num_examples, epsilon, delta, upload_bytes FROM client_updates \
             WHERE job_id = $1 AND ($2 IS NULL OR round_id = $2) AND ($3 IS NULL OR client_id = $3) \
             ORDER BY round_id, client_id",
        )
        .bind(job)
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
                upload_bytes: r.try_get(10)?,
            })
        })
        .collect()
    }

    /// A hospital's trust timeline in `job`.
    pub async fn trust(&self, job: i64, client: &str) -> Result<Vec<TrustRow>> {
        sqlx::query(
            "SELECT round_id, trust, trust_ema, suspicious FROM trust_scores \
             WHERE job_id = $1 AND client_id = $2 ORDER BY round_id",
        )
        .bind(job)
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

    /// Per round of `job`, the metrics whose names start with `prefix`, keyed by the
    /// rest of the name; one round or every round. The prefix is matched
    /// here: a `LIKE` pattern would treat `_` in metric names as a wildcard.
    pub async fn metrics(
        &self,
        job: i64,
        prefix: &str,
        round: Option<i64>,
    ) -> Result<BTreeMap<i64, BTreeMap<String, f64>>> {
        let rows = sqlx::query(
            "SELECT round_id, name, value FROM round_metrics \
             WHERE job_id = $1 AND ($2 IS NULL OR round_id = $2) ORDER BY round_id, name",
        )
        .bind(job)
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
}

const ROUND_COLUMNS: &str = "SELECT id, outcome, aggregator, started_at, duration_ms, accepted, \
     rejected, loss, train_loss, auroc_macro, update_norm FROM rounds";

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
