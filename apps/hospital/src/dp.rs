//! A hospital's differential-privacy ledger that survives restarts and
//! resumes: the simulation keeps one per hospital in its run folder, a
//! deployed hospital in its work folder.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use fedcore::checkpoint::write_atomic;
use fedcore::{Parameters, PrivacyCost, PrivacyMechanism, Spent};
use fedcore_dp::LocalDp;
use serde::{Deserialize, Serialize};

use crate::recipe::DpArgs;

/// The DP settings a hospital's ledger was started with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpSettings {
    /// The flags.
    pub dp: DpArgs,
    /// Releases the budget is spread over (the noise is calibrated for them).
    pub rounds: u64,
}

/// What the ledger file holds.
#[derive(Debug, Serialize, Deserialize)]
struct DpRecord {
    settings: DpSettings,
    releases: u64,
    epsilon_spent: f64,
}

/// Local DP whose releases survive a restart of the hospital's process: the
/// count is written (atomically) before each update leaves, and charged
/// again at start, so a restarted hospital cannot spend its budget twice.
pub struct PersistedDp {
    inner: LocalDp,
    settings: DpSettings,
    path: PathBuf,
}

impl PersistedDp {
    /// Hospital `name`'s mechanism on `tensors`, its ledger kept at `path`.
    /// A ledger already there was started with some settings: other DP
    /// flags are refused (a budget cannot be restarted), and the noise stays
    /// calibrated for the rounds it was started with (a run extended past
    /// them is refused by the budget, not given a fresh one).
    pub fn open(
        name: &str,
        tensors: &[String],
        settings: DpSettings,
        path: PathBuf,
    ) -> Result<Self> {
        let mut settings = settings;
        let mut releases = 0;
        if path.exists() {
            let record: DpRecord = serde_json::from_slice(&std::fs::read(&path)?)
                .with_context(|| format!("{} is not a DP ledger", path.display()))?;
            if record.settings.dp != settings.dp {
                bail!(
                    "{} was written with other DP settings ({:?}); this hospital's budget cannot be restarted with {:?}",
                    path.display(),
                    record.settings.dp,
                    settings.dp
                );
            }
            if record.settings.rounds != settings.rounds {
                println!(
                    "{name}: the DP noise stays calibrated for the {} rounds the ledger was started with (asked: {})",
                    record.settings.rounds, settings.rounds
                );
            }
            settings = record.settings;
            releases = record.releases;
        } else if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut inner = settings.dp.mechanism(name, tensors, settings.rounds)?;
        if releases > 0 {
            inner = inner.resumed(releases)?;
            println!(
                "{name}: DP ledger resumed: {releases} releases, epsilon {:.3} of {} spent",
                inner.ledger().epsilon(),
                settings.dp.epsilon
            );
        }
        Ok(Self {
            inner,
            settings,
            path,
        })
    }

    /// The mechanism's ledger.
    pub fn ledger(&self) -> &fedcore_dp::Ledger {
        self.inner.ledger()
    }
}

impl PrivacyMechanism for PersistedDp {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn privatize(&mut self, update: &mut Parameters) -> fedcore::Result<PrivacyCost> {
        let cost = self.inner.privatize(update)?;
        let record = DpRecord {
            settings: self.settings,
            releases: self.inner.ledger().releases(),
            epsilon_spent: self.inner.ledger().epsilon(),
        };
        // If the release cannot be recorded, the update does not leave.
        write_atomic(&self.path, &serde_json::to_vec_pretty(&record)?)?;
        Ok(cost)
    }

    fn spent(&self) -> Option<Spent> {
        self.inner.spent()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update() -> Parameters {
        Parameters::from_tensors([("w", vec![3], vec![0.3f32, -0.2, 0.1])]).expect("params")
    }

    fn tensors() -> Vec<String> {
        vec!["w".to_owned()]
    }

    fn settings(epsilon: f64, rounds: u64) -> DpSettings {
        DpSettings {
            dp: DpArgs {
                enabled: true,
                clip: 1.0,
                epsilon,
                delta: 1e-5,
            },
            rounds,
        }
    }

    /// A hospital's first process: a new ledger at `path`, two releases,
    /// then the process ends. Returns the epsilon it spent.
    fn two_releases_then_exit(path: &std::path::Path, settings: DpSettings) -> f64 {
        let mut first =
            PersistedDp::open("h", &tensors(), settings, path.to_owned()).expect("open");
        first.privatize(&mut update()).expect("release 1");
        first.privatize(&mut update()).expect("release 2");
        first.spent().expect("spent").epsilon
    }

    #[test]
    fn a_restarted_hospital_keeps_counting_its_dp_releases() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("h-dp-ledger.json");
        let tensors = tensors();
        let settings = settings(8.0, 3);
        let spent = two_releases_then_exit(&path, settings);

        // The process restarts: the two releases are charged again.
        let mut again = PersistedDp::open("h", &tensors, settings, path.clone()).expect("reopen");
        assert_eq!(again.ledger().releases(), 2);
        assert!((again.spent().expect("spent").epsilon - spent).abs() < 1e-9);
        again.privatize(&mut update()).expect("release 3");
        // A fourth release would exceed the budget calibrated for 3 rounds.
        assert!(again.privatize(&mut update()).is_err());

        // Other settings cannot restart the budget.
        let other = DpSettings {
            dp: DpArgs {
                epsilon: 16.0,
                ..settings.dp
            },
            ..settings
        };
        let e = PersistedDp::open("h", &tensors, other, path)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("other DP settings"), "{e}");
    }

    #[test]
    fn a_longer_run_keeps_the_noise_and_is_refused_by_the_budget() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("h.json");
        let tensors = tensors();
        let settings = settings(4.0, 2);
        let spent = two_releases_then_exit(&path, settings);
        // Resumed with more rounds: the budget is not spread again (that
        // would lower the noise of releases already made), so the third
        // release is refused and the update is left as it was.
        let longer = DpSettings {
            rounds: 5,
            ..settings
        };
        let mut again = PersistedDp::open("h", &tensors, longer, path).expect("reopen");
        assert_eq!(again.ledger().releases(), 2);
        assert!((again.spent().expect("spent").epsilon - spent).abs() < 1e-9);
        let mut u = update();
        let e = again.privatize(&mut u).expect_err("over budget");
        assert!(e.to_string().contains("privacy budget of h"), "{e}");
        assert_eq!(u, update(), "nothing released");
    }
}
