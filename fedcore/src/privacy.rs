use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::params::Parameters;

/// The privacy cost of one application of a mechanism.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum PrivacyCost {
    /// No privacy was spent or gained in the DP sense (e.g. clipping alone).
    None,
    /// `steps` compositions of the Gaussian mechanism with Poisson sampling.
    SampledGaussian {
        /// Noise standard deviation divided by the clipping norm.
        noise_multiplier: f64,
        /// Probability that a record (or client) takes part in a step.
        sampling_rate: f64,
        /// How many times the mechanism ran.
        steps: u64,
    },
}

/// Privacy spent so far, as an (epsilon, delta) guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spent {
    /// Epsilon spent.
    pub epsilon: f64,
    /// The delta it holds at.
    pub delta: f64,
    /// The budget's epsilon, if there is a budget.
    pub budget: Option<f64>,
}

/// Privatizes an update before it leaves a client (or an aggregate before it
/// leaves the server): the privacy plug-in point.
///
/// A mechanism changes an outgoing update in place (clip, add noise) and
/// reports what it cost. `fedcore-dp` provides the mechanisms and the
/// accountant that turns costs into (epsilon, delta).
pub trait PrivacyMechanism: Send {
    /// A short description, recorded in the update's provenance.
    fn name(&self) -> String;

    /// Changes `update` in place and returns the cost spent.
    ///
    /// A mechanism with a budget returns
    /// [`Error::PrivacyBudgetExhausted`](crate::Error::PrivacyBudgetExhausted)
    /// *before* it changes anything when this release would exceed it.
    fn privatize(&mut self, update: &mut Parameters) -> Result<PrivacyCost>;

    /// What its owner has spent in total so far, if the mechanism keeps an
    /// accountant.
    fn spent(&self) -> Option<Spent> {
        None
    }
}

impl<P: PrivacyMechanism + ?Sized> PrivacyMechanism for Box<P> {
    fn name(&self) -> String {
        (**self).name()
    }

    fn privatize(&mut self, update: &mut Parameters) -> Result<PrivacyCost> {
        (**self).privatize(update)
    }

    fn spent(&self) -> Option<Spent> {
        (**self).spent()
    }
}
