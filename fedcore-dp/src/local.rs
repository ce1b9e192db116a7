use fedcore::{Parameters, PrivacyCost, PrivacyMechanism, Spent};

use crate::error::{DpError, Result};

use crate::budget::{Budget, Ledger};
use crate::clip::Clip;
use crate::noise::Noise;

/// Settings of [`LocalDp`].
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDpParams {
    /// The clipping (norm and which tensors); noise covers the same tensors.
    pub clip: Clip,
    /// Noise standard deviation divided by the clipping norm.
    pub noise_multiplier: f64,
    /// The budget; a release that would exceed it is refused.
    pub budget: Budget,
}

impl LocalDpParams {
    /// `clip` and noise multiplier `sigma`, with the default budget
    /// (epsilon 1, delta 1e-5).
    pub fn new(clip: Clip, noise_multiplier: f64) -> Self {
        Self {
            clip,
            noise_multiplier,
            budget: Budget::default(),
        }
    }

    /// The noise multiplier that lets `rounds` releases fit `budget`.
    pub fn calibrated(clip: Clip, budget: Budget, rounds: u64) -> Result<Self> {
        budget.check()?;
        let sigma = budget
            .accounting
            .calibrate_noise(budget.epsilon, budget.delta, 1.0, rounds)?;
        Ok(Self {
            clip,
            noise_multiplier: sigma,
            budget,
        })
    }

    /// Replaces the budget.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }
}

/// Clip + Gaussian noise on every outgoing update, with a per-client ledger:
/// local (client-side) DP-FedAvg, so the server never sees an unprotected
/// update.
///
/// Each release is one Gaussian mechanism with sensitivity `C` (the
/// clipping norm) and noise `sigma * C`, accounted at sampling rate 1: the
/// server knows which clients it sampled, so client sampling gives no
/// amplification against it.
#[derive(Debug)]
pub struct LocalDp {
    clip: Clip,
    sigma: f64,
    noise: Noise,
    ledger: Ledger,
}

impl LocalDp {
    /// The mechanism of client `who` (its name appears in budget errors).
    pub fn new(who: impl Into<String>, params: LocalDpParams, noise: Noise) -> Result<Self> {
        if !(params.noise_multiplier > 0.0 && params.noise_multiplier.is_finite()) {
            return Err(DpError::InvalidParams(format!(
                "local DP needs a positive noise multiplier, got {}",
                params.noise_multiplier
            )));
        }
        Ok(Self {
            clip: params.clip,
            sigma: params.noise_multiplier,
            noise,
            ledger: Ledger::new(who, params.budget)?,
        })
    }

    /// The ledger (epsilon spent so far).
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The same mechanism after `releases` earlier releases with these
    /// parameters (a client that restarts and must not spend its budget
    /// twice): they are charged to the ledger first. More releases than the
    /// budget allows is [`Error::PrivacyBudgetExhausted`](fedcore::Error::PrivacyBudgetExhausted).
    pub fn resumed(mut self, releases: u64) -> Result<Self> {
        let cost = self.cost();
        for _ in 0..releases {
            self.ledger.charge(&cost)?;
        }
        Ok(self)
    }

    fn cost(&self) -> PrivacyCost {
        PrivacyCost::SampledGaussian {
            noise_multiplier: self.sigma,
            sampling_rate: 1.0,
            steps: 1,
        }
    }
}

impl PrivacyMechanism for LocalDp {
    fn name(&self) -> String {
        format!(
            "{}+gaussian(sigma={}{})",
            self.clip.describe(),
            self.sigma,
            if self.noise.is_seeded() {
                ",seeded"
            } else {
                ""
            }
        )
    }

    fn privatize(&mut self, update: &mut Parameters) -> fedcore::Result<PrivacyCost> {
        let cost = self.cost();
        // Refuse before touching the update or drawing noise.
        self.ledger.check(&cost)?;
        self.clip.apply(update)?;
        let std = self.sigma * self.clip.max_norm();
        let ranges = self.clip.ranges(update)?;
        let values = update.as_mut_slice();
        for r in ranges {
            self.noise.add_gaussian(&mut values[r], std);
        }
        self.ledger.charge(&cost)?;
        Ok(cost)
    }

    fn spent(&self) -> Option<Spent> {
        Some(self.ledger.spent())
    }
}
