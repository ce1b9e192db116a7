//! A hospital's differential-privacy ledger that survives restarts and
//! resumes: the simulation keeps one per hospital in its run folder, a
//! deployed hospital in its work folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use fedcore::checkpoint::write_atomic;
use fedcore::data::DataSplit;
use fedcore::models::{DenseNet, Network, TchModel};
use fedcore::{
    Evaluation, FitOutput, Model, Parameters, PrivacyCost, PrivacyMechanism, Spent, TrainConfig,
};
use fedcore_dp::{DpSgd, LocalDp};
use serde::{Deserialize, Serialize};

use crate::recipe::DpArgs;
#[cfg(test)]
use crate::recipe::DpMode;

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
    /// What one DP-SGD release cost (absent for client-level DP, whose
    /// cost follows from the settings).
    #[serde(default)]
    fit_cost: Option<PrivacyCost>,
}

/// The ledger at `path`: the settings it was started with (other DP flags
/// are refused: a budget cannot be restarted; other rounds keep the noise
/// calibrated for the first ones) and what it recorded, or `settings` and
/// nothing when there is none yet.
fn load(name: &str, settings: DpSettings, path: &Path) -> Result<(DpSettings, Option<DpRecord>)> {
    if !path.exists() {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        return Ok((settings, None));
    }
    let record: DpRecord = serde_json::from_slice(&std::fs::read(path)?)
        .with_context(|| format!("{} is not a DP ledger", path.display()))?;
    let other_accountant = DpArgs {
        accounting: settings.dp.accounting,
        ..record.settings.dp
    };
    if record.settings.dp != settings.dp && other_accountant == settings.dp {
        bail!(
            "{} was counted with the {} accountant and this hospital asks for {}: a budget cannot be recounted; restart with --accounting {}",
            path.display(),
            record.settings.dp.accounting,
            settings.dp.accounting,
            record.settings.dp.accounting
        );
    }
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
    Ok((record.settings, Some(record)))
}

/// Writes the ledger (atomically); a release that cannot be recorded must
/// not leave the hospital.
fn record(
    path: &Path,
    settings: DpSettings,
    ledger: &fedcore_dp::Ledger,
    fit_cost: Option<PrivacyCost>,
) -> Result<()> {
    let record = DpRecord {
        settings,
        releases: ledger.releases(),
        epsilon_spent: ledger.epsilon(),
        fit_cost,
    };
    write_atomic(path, &serde_json::to_vec_pretty(&record)?)?;
    Ok(())
}

fn resumed_line(name: &str, ledger: &fedcore_dp::Ledger, budget: f64) {
    println!(
        "{name}: DP ledger resumed: {} releases, epsilon {:.3} of {budget} spent",
        ledger.releases(),
        ledger.epsilon(),
    );
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
    /// Hospital `name`'s mechanism on `tensors`, its ledger kept at `path`
    /// (a ledger already there: see [`PersistedDpSgd::open`]).
    pub fn open(
        name: &str,
        tensors: &[String],
        settings: DpSettings,
        path: PathBuf,
    ) -> Result<Self> {
        let (settings, earlier) = load(name, settings, &path)?;
        let releases = earlier.map_or(0, |r| r.releases);
        let mut inner = settings.dp.mechanism(name, tensors, settings.rounds)?;
        if releases > 0 {
            inner = inner.resumed(releases)?;
            resumed_line(name, inner.ledger(), settings.dp.epsilon);
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

/// Sample-level DP-SGD whose fits survive a restart of the hospital's
/// process, as [`PersistedDp`]'s releases do: each fit is charged before it
/// trains, written to the ledger before its update leaves, and charged
/// again when the hospital starts. It trains on the hospital's own schedule
/// ([`DpArgs::sgd_config`]), not the server's: the guarantee depends on it.
/// From the server it takes only FedProx's `proximal_mu`, which DP-SGD adds
/// after the noise (it reads no example, so it costs no privacy).
pub struct PersistedDpSgd<N: Network = DenseNet> {
    inner: DpSgd<N>,
    settings: DpSettings,
    images: usize,
    fit_cost: PrivacyCost,
    path: PathBuf,
}

impl<N: Network> PersistedDpSgd<N> {
    /// Hospital `name`'s DP-SGD on `model` over its `images` images, the
    /// noise calibrated for `settings.rounds` fits, its ledger kept at
    /// `path`. A ledger already there was started with some settings: other
    /// DP flags are refused (a budget cannot be restarted), and the noise
    /// stays calibrated for the rounds it was started with (a run extended
    /// past them is refused by the budget, not given a fresh one).
    pub fn open(
        name: &str,
        model: TchModel<N>,
        images: usize,
        settings: DpSettings,
        path: PathBuf,
    ) -> Result<Self> {
        let (settings, earlier) = load(name, settings, &path)?;
        let dp = settings.dp;
        let mut inner = dp.dp_sgd(name, model, images, settings.rounds)?;
        let fit_cost = inner.fit_cost(images, dp.dp_batch_size, dp.dp_epochs)?;
        if let Some(r) = earlier.filter(|r| r.releases > 0) {
            // Charged at what they cost then (the data may have changed since).
            let cost = r.fit_cost.unwrap_or_else(|| fit_cost.clone());
            inner = inner.resumed(std::iter::repeat_n(&cost, r.releases as usize))?;
            resumed_line(name, inner.ledger(), dp.epsilon);
        }
        Ok(Self {
            inner,
            settings,
            images,
            fit_cost,
            path,
        })
    }

    /// The hospital's ledger.
    pub fn ledger(&self) -> &fedcore_dp::Ledger {
        self.inner.ledger()
    }
}

impl<N: Network> Model for PersistedDpSgd<N> {
    type Data = DataSplit;

    fn parameters(&self) -> Parameters {
        self.inner.parameters()
    }

    fn set_parameters(&mut self, parameters: &Parameters) -> fedcore::Result<()> {
        self.inner.set_parameters(parameters)
    }

    /// Trains on the hospital's own DP-SGD schedule (the guarantee depends
    /// on it), taking from the server only FedProx's `proximal_mu`, which
    /// DP-SGD adds after the noise (it reads no example).
    fn fit(&mut self, data: &DataSplit, server: &TrainConfig) -> fedcore::Result<FitOutput> {
        if data.len() != self.images {
            return Err(fedcore::Error::InvalidInput(format!(
                "DP-SGD was calibrated for {} images, the data has {}",
                self.images,
                data.len()
            )));
        }
        let config = TrainConfig {
            proximal_mu: server.proximal_mu,
            ..self.settings.dp.sgd_config()
        };
        let out = self.inner.fit(data, &config)?;
        record(
            &self.path,
            self.settings,
            self.inner.ledger(),
            Some(self.fit_cost.clone()),
        )
        .map_err(|e| fedcore::Error::Model(format!("the DP ledger cannot be written: {e:#}")))?;
        Ok(out)
    }

    fn evaluate(&mut self, data: &DataSplit) -> fedcore::Result<Evaluation> {
        self.inner.evaluate(data)
    }
}

impl PrivacyMechanism for PersistedDp {
    fn name(&self) -> String {
        self.inner.name()
    }

    fn privatize(&mut self, update: &mut Parameters) -> fedcore::Result<PrivacyCost> {
        let cost = self.inner.privatize(update)?;
        // If the release cannot be recorded, the update does not leave.
        record(&self.path, self.settings, self.inner.ledger(), None).map_err(|e| {
            fedcore::Error::Model(format!("the DP ledger cannot be written: {e:#}"))
        })?;
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
                mode: DpMode::Client,
                epsilon,
                ..DpArgs::default()
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
        let e = PersistedDp::open("h", &tensors, other, path.clone())
            .err()
            .expect("refused");
        assert!(e.to_string().contains("other DP settings"), "{e}");
        // Another accountant alone: refused, with the flag that resumes it.
        let other = DpSettings {
            dp: DpArgs {
                accounting: match settings.dp.accounting {
                    fedcore_dp::Accounting::Pld => fedcore_dp::Accounting::Rdp,
                    _ => fedcore_dp::Accounting::Pld,
                },
                ..settings.dp
            },
            ..settings
        };
        let e = PersistedDp::open("h", &tensors, other, path)
            .err()
            .expect("refused");
        let flag = format!("restart with --accounting {}", settings.dp.accounting);
        assert!(e.to_string().contains(&flag), "{e}");
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
