//! Cross-site evaluation (as NVIDIA FLARE has): at the end of a run, the
//! global model and every site's local model evaluated on every site's
//! held-out data, through the same evaluate exchange as federated
//! evaluation.
//!
//! A site's local model is what its last accepted update says it trained
//! to: the global model that round started from plus the update as it left
//! the site (after its privacy mechanisms, so under client-level DP it
//! holds the noise; nothing the server did not already see). The server
//! keeps one per site while [`crate::ServerConfig::cross_site_evaluation`]
//! is on; a resumed run has those of the sites that trained since it
//! resumed.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::model::Evaluation;
use crate::transport::Failure;
use crate::update::ClientId;

/// A model of the cross-site matrix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CrossSiteModel {
    /// The global model at the end of the run.
    Global,
    /// A site's local model, from its update in `round`.
    Local {
        /// The site.
        site: ClientId,
        /// The round of its last accepted update.
        round: u64,
    },
}

impl std::fmt::Display for CrossSiteModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CrossSiteModel::Global => f.write_str("global"),
            CrossSiteModel::Local { site, round } => write!(f, "{site} (round {round})"),
        }
    }
}

/// A cell that has no evaluation, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrossSiteFailure {
    /// Index into [`CrossSiteEvaluation::models`].
    pub model: usize,
    /// The site that did not evaluate it.
    pub site: ClientId,
    /// Why.
    pub reason: Failure,
}

/// The matrix: `cells[m][s]` is model `m` evaluated on site `s`'s held-out
/// data (`None` where that failed; see `failures`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrossSiteEvaluation {
    /// The last round of the run.
    pub round: u64,
    /// The global model, then the sites' local models (sorted by site).
    pub models: Vec<CrossSiteModel>,
    /// The sites that were asked (those connected at the end), sorted.
    pub sites: Vec<ClientId>,
    /// One row per model, one column per site.
    pub cells: Vec<Vec<Option<Evaluation>>>,
    /// The cells that have no evaluation.
    pub failures: Vec<CrossSiteFailure>,
}

impl CrossSiteEvaluation {
    /// `metric` (`loss`, or a name in the evaluations' metrics, e.g.
    /// `accuracy`) of model `model` on site `site`.
    pub fn value(&self, model: usize, site: usize, metric: &str) -> Option<f64> {
        let e = self.cells.get(model)?.get(site)?.as_ref()?;
        if metric == "loss" {
            Some(e.loss)
        } else {
            e.metrics.get(metric).copied()
        }
    }

    /// The matrix of `metric` as a markdown table (a row per model, a
    /// column per site; `–` where a cell failed or lacks the metric),
    /// values times `scale` with `decimals` decimals.
    pub fn to_markdown(&self, metric: &str, scale: f64, decimals: usize) -> String {
        let mut s = String::from("| model \\ data of |");
        for site in &self.sites {
            let _ = write!(s, " {site} |");
        }
        s.push_str("\n|---|");
        for _ in &self.sites {
            s.push_str("---:|");
        }
        s.push('\n');
        for (m, model) in self.models.iter().enumerate() {
            let _ = write!(s, "| {model} |");
            for k in 0..self.sites.len() {
                match self.value(m, k, metric) {
                    Some(v) => {
                        let _ = write!(s, " {:.*} |", decimals, v * scale);
                    }
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_markdown_has_a_row_per_model_and_marks_missing_cells() {
        let e = |acc| Evaluation {
            loss: 1.0,
            num_examples: 3,
            metrics: [("accuracy".to_owned(), acc)].into(),
        };
        let m = CrossSiteEvaluation {
            round: 4,
            models: vec![
                CrossSiteModel::Global,
                CrossSiteModel::Local {
                    site: "a".into(),
                    round: 3,
                },
            ],
            sites: vec!["a".into(), "b".into()],
            cells: vec![vec![Some(e(0.5)), Some(e(0.25))], vec![Some(e(1.0)), None]],
            failures: vec![CrossSiteFailure {
                model: 1,
                site: "b".into(),
                reason: Failure::Timeout(60_000),
            }],
        };
        let md = m.to_markdown("accuracy", 100.0, 1);
        assert!(md.contains("| global | 50.0 | 25.0 |"), "{md}");
        assert!(md.contains("| a (round 3) | 100.0 | – |"), "{md}");
        assert_eq!(m.value(0, 1, "loss"), Some(1.0));
        assert_eq!(m.value(1, 1, "accuracy"), None);
        let back: CrossSiteEvaluation =
            serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}
