//! The `Model` trait: what a client trains.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::params::Parameters;
use crate::update::{Metrics, Protection};

/// The optimizer a client uses for local training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Optimizer {
    /// Stochastic gradient descent with (heavy-ball) momentum; `momentum = 0` is plain SGD.
    Sgd {
        /// Momentum factor in `[0, 1)`.
        momentum: f64,
    },
    /// Adam (Kingma & Ba, 2015).
    Adam {
        /// First-moment decay.
        beta1: f64,
        /// Second-moment decay.
        beta2: f64,
        /// Denominator offset.
        eps: f64,
    },
}

impl Optimizer {
    /// Adam with the usual defaults (0.9, 0.999, 1e-8).
    pub fn adam() -> Self {
        Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// Local training settings sent by the server with every fit request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the local data.
    pub epochs: usize,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Step size.
    pub learning_rate: f64,
    /// The optimizer (its state starts fresh each round).
    pub optimizer: Optimizer,
    /// Seed for shuffling and any other randomness in training. The server
    /// derives a distinct one per round and client, so runs are reproducible.
    pub seed: u64,
    /// FedProx (Li et al. 2020): the weight `mu` of the proximal term
    /// `mu / 2 * ||w - w_global||^2` added to the local loss, which keeps a
    /// client's model near the global one it started from on non-IID data.
    /// `0` (the default) is plain local training, bit for bit.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub proximal_mu: f64,
    /// How the client encodes its update for the upload
    /// ([`Encoding`](crate::Encoding)): `f32`, the default, sends the values
    /// as they are; the lossy encodings cut the bytes and keep what they
    /// drop at the client for its next update (error feedback).
    #[serde(default, skip_serializing_if = "crate::Encoding::is_lossless")]
    pub upload: crate::Encoding,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl Default for TrainConfig {
    /// One epoch, batch 32, SGD with learning rate 0.1 and no momentum, seed 0.
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.1,
            optimizer: Optimizer::Sgd { momentum: 0.0 },
            seed: 0,
            proximal_mu: 0.0,
            upload: crate::Encoding::F32,
        }
    }
}

impl TrainConfig {
    /// Checks that the settings can work.
    pub fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(crate::Error::InvalidConfig(m.to_owned()));
        if self.epochs == 0 {
            return bad("epochs must be at least 1");
        }
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1");
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad("learning_rate must be positive and finite");
        }
        if !(self.proximal_mu.is_finite() && self.proximal_mu >= 0.0) {
            return bad("proximal_mu must be finite and not negative");
        }
        self.upload.check()?;
        match self.optimizer {
            Optimizer::Sgd { momentum } if !(0.0..1.0).contains(&momentum) => {
                bad("SGD momentum must be in [0, 1)")
            }
            Optimizer::Adam { beta1, beta2, eps }
                if !((0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2) && eps > 0.0) =>
            {
                bad("Adam betas must be in [0, 1) and eps positive")
            }
            _ => Ok(()),
        }
    }
}

/// How the server varies the clients' learning rate over a run's rounds:
/// round `r` of `R` trains at [`TrainConfig::learning_rate`] times
/// [`LrSchedule::factor`]. Decaying the step size lets noisy training
/// (DP-SGD above all, whose noise does not shrink as the model converges)
/// settle instead of wandering around the optimum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// The same learning rate every round.
    #[default]
    Constant,
    /// Cosine decay from the full rate in round 1 to `floor` times it in the
    /// last round (Loshchilov and Hutter 2017, one cycle, per round).
    Cosine {
        /// The last round's fraction of the full rate, in [0, 1].
        floor: f64,
    },
}

impl LrSchedule {
    /// The factor for round `round` (1-based) of `rounds`; rounds past the
    /// end keep the last round's factor.
    pub fn factor(&self, round: u64, rounds: u64) -> f64 {
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine { floor } => {
                if rounds <= 1 {
                    return 1.0;
                }
                let t = (round.clamp(1, rounds) - 1) as f64 / (rounds - 1) as f64;
                floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }

    /// Checks that the settings can work.
    pub fn check(&self) -> Result<()> {
        match *self {
            LrSchedule::Cosine { floor } if !(0.0..=1.0).contains(&floor) => Err(
                crate::Error::InvalidConfig(format!("cosine floor {floor} is not in [0, 1]")),
            ),
            _ => Ok(()),
        }
    }

    /// `constant` or `cosine:FLOOR` (e.g. `cosine:0.1`).
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            crate::Error::InvalidConfig(format!(
                "learning-rate schedule `{s}`: expected `constant` or `cosine:FLOOR`"
            ))
        };
        let schedule = match s {
            "constant" => LrSchedule::Constant,
            other => {
                let floor = other.strip_prefix("cosine:").ok_or_else(bad)?;
                LrSchedule::Cosine {
                    floor: floor.trim().parse().map_err(|_| bad())?,
                }
            }
        };
        schedule.check()?;
        Ok(schedule)
    }
}

/// What local training reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitOutput {
    /// Examples trained on (the FedAvg weight).
    pub num_examples: u64,
    /// Training metrics, e.g. `loss`.
    pub metrics: Metrics,
    /// Privacy spent inside training (sample-level DP-SGD); recorded first
    /// in the update's provenance.
    #[serde(default)]
    pub privacy: Vec<Protection>,
    /// Optimizer steps taken (SCAFFOLD divides the model's change by them);
    /// 0 where a model does not count them.
    #[serde(default)]
    pub steps: u64,
}

/// The result of evaluating a model on some data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Mean loss.
    pub loss: f64,
    /// Examples evaluated.
    pub num_examples: u64,
    /// Other metrics (`accuracy`, per-label AUROC, ...).
    pub metrics: Metrics,
}

/// A trainable model whose state is a [`Parameters`] value.
///
/// `Data` is whatever the model trains on (an in-memory dataset, a streaming
/// loader); the model does not own it, so one model type serves every client.
pub trait Model: Send {
    /// The local data this model trains and evaluates on.
    type Data: ?Sized;

    /// The current parameters (a copy).
    fn parameters(&self) -> Parameters;

    /// Replaces the parameters; a different layout is an error.
    fn set_parameters(&mut self, parameters: &Parameters) -> Result<()>;

    /// Trains on `data` from the current parameters.
    fn fit(&mut self, data: &Self::Data, config: &TrainConfig) -> Result<FitOutput>;

    /// Trains like [`Self::fit`], adding `correction` (in the model's
    /// layout) to the gradient of every optimizer step: SCAFFOLD's
    /// `c - c_i` (Karimireddy et al. 2020). Must report
    /// [`FitOutput::steps`]. The default refuses, so a model that cannot
    /// take part in SCAFFOLD says so instead of training uncorrected.
    fn fit_corrected(
        &mut self,
        data: &Self::Data,
        config: &TrainConfig,
        correction: &Parameters,
    ) -> Result<FitOutput> {
        let _ = (data, config, correction);
        Err(crate::Error::Unsupported(
            "this model does not support gradient corrections (SCAFFOLD)".into(),
        ))
    }

    /// Evaluates the current parameters on `data`.
    fn evaluate(&mut self, data: &Self::Data) -> Result<Evaluation>;
}
