//! The recipe: what a hospital federation trains and how, shared by the
//! simulation ([`crate::sim`]) and the deployment ([`crate::deploy`]): the
//! model, the body's aggregator, local DP on the body, the local training
//! and the image preprocessing, and what is encrypted: by default the
//! model's [`TchModel::head`], with `--encrypt all` the whole update, under
//! `fedcore_he`'s default CKKS parameters.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use fedcore::data::ChestXrayConfig;
use fedcore::data::chestxray::FINDINGS;
use fedcore::models::{Activation, DenseNet, DenseNetConfig, TchModel};
use fedcore::{
    Aggregate, Aggregator, ClientUpdate, FedAvg, Optimizer, RoundSteps, Strategy, StrategyInfo,
    TrainConfig,
};
use fedcore_dp::{Budget, Clip, LocalDp, LocalDpParams, Noise};
use fedcore_he::{CkksContext, EncryptedMedian, Public};
use fedcore_robust::{CoordinateMedian, GeometricMedianParams, KrumParams, TrimmedMeanParams};
use serde::{Deserialize, Serialize};

/// What leaves a hospital encrypted with CKKS.
#[derive(
    ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Encrypt {
    /// Nothing: the server sees every update in the clear.
    None,
    /// The classifier head; the body travels in the clear (after local DP
    /// when it is on) and its aggregator's weights carry over to the head.
    #[default]
    Head,
    /// The whole update: the server aggregates ciphertexts only (fedavg as
    /// the encrypted weighted sum, geometric-median as the encrypted
    /// geometric median) and sees nothing in the clear but the pairwise
    /// distances between updates (docs/he.md).
    All,
}

impl Encrypt {
    /// The tensors to seal of `model`: none, its head, or all of them.
    pub fn patterns(self, model: &TchModel<DenseNet>) -> Result<Vec<String>> {
        Ok(match self {
            Self::None => Vec::new(),
            Self::Head => model
                .head()
                .names(model.layout())?
                .map(str::to_owned)
                .collect(),
            Self::All => vec!["*".to_owned()],
        })
    }
}

/// How the server aggregates a round: a plain aggregator (on the body, its
/// weights carried over to a sealed head), or the encrypted geometric
/// median of whole encrypted updates.
pub enum Rule {
    /// An aggregator of `fedcore` / `fedcore-robust`.
    Plain(Box<dyn Aggregator>),
    /// `fedcore_he::EncryptedMedian`.
    EncryptedMedian(EncryptedMedian),
}

impl Strategy for Rule {
    fn describe(&self) -> StrategyInfo {
        match self {
            Self::Plain(a) => a.describe(),
            Self::EncryptedMedian(m) => m.describe(),
        }
    }

    fn aggregate_round(
        &mut self,
        updates: &[ClientUpdate],
        steps: &mut RoundSteps<'_>,
    ) -> fedcore::Result<Aggregate> {
        match self {
            Self::Plain(a) => a.aggregate_round(updates, steps),
            Self::EncryptedMedian(m) => m.aggregate_round(updates, steps),
        }
    }
}

/// The aggregation rule for the body, swappable with one flag.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AggregatorChoice {
    /// Example-weighted mean (not robust).
    Fedavg,
    /// Geometric median by smoothed Weiszfeld.
    GeometricMedian,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise trimmed mean, beta = 0.2.
    TrimmedMean,
    /// Krum tolerating f = (n - 3) / 2 Byzantine hospitals.
    Krum,
}

impl AggregatorChoice {
    /// The aggregator, for `clients` hospitals (Krum's f depends on it).
    pub fn build(self, clients: usize) -> Result<Box<dyn Aggregator>> {
        Ok(match self {
            Self::Fedavg => Box::new(FedAvg),
            Self::GeometricMedian => Box::new(GeometricMedianParams::new().check()?),
            Self::Median => Box::new(CoordinateMedian),
            Self::TrimmedMean => Box::new(TrimmedMeanParams::new(0.2).check()?),
            Self::Krum => {
                Box::new(KrumParams::new(clients, clients.saturating_sub(3) / 2).check()?)
            }
        })
    }

    /// The rule's name for the dashboard and logs.
    pub fn label(self, encrypt: Encrypt) -> String {
        match (self, encrypt) {
            (Self::GeometricMedian, Encrypt::All) => "EncryptedGeometricMedian".into(),
            (Self::Fedavg, Encrypt::All) => "EncryptedFedavg".into(),
            (other, _) => format!("{other:?}"),
        }
    }

    /// The server's rule for `clients` hospitals when `encrypt` is what they
    /// encrypt; `public` (the server's CKKS context, with the evaluation keys
    /// for `--encrypt all`) is needed whenever something is encrypted.
    pub fn rule(
        self,
        clients: usize,
        encrypt: Encrypt,
        public: Option<&CkksContext<Public>>,
    ) -> Result<Rule> {
        if encrypt != Encrypt::All {
            return Ok(Rule::Plain(self.build(clients)?));
        }
        let Some(public) = public else {
            bail!("--encrypt all needs the CKKS keys");
        };
        Ok(match self {
            Self::Fedavg => Rule::Plain(Box::new(FedAvg)),
            Self::GeometricMedian => Rule::EncryptedMedian(EncryptedMedian::new(public.clone())?),
            other => bail!(
                "--aggregator {} needs the updates in the clear; with --encrypt all use geometric-median or fedavg",
                other
                    .to_possible_value()
                    .map_or_else(|| format!("{other:?}"), |v| v.get_name().to_owned())
            ),
        })
    }
}

/// Local differential privacy on a hospital's body update: the flags of the
/// simulation and of a deployed hospital (`hospital client`).
#[derive(Args, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpArgs {
    /// Local differential privacy on the body (clip + Gaussian noise, RDP
    /// accountant). Off by default: with a handful of hospitals the noise
    /// that client-level DP needs on 7M parameters stops learning
    /// (docs/dashboard.md, "Differential privacy").
    #[arg(long = "dp", value_name = "DP", default_value_t = false, action = clap::ArgAction::Set)]
    pub enabled: bool,
    /// Each hospital's epsilon for the whole run.
    #[arg(long, default_value_t = 8.0)]
    pub epsilon: f64,
    /// Each hospital's delta.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// L2 clipping norm of a hospital's body update.
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
}

impl DpArgs {
    /// Hospital `name`'s mechanism on `tensors`: clip to `clip`, Gaussian
    /// noise calibrated by the RDP accountant so that `rounds` releases
    /// spend (epsilon, delta).
    pub fn mechanism(&self, name: &str, tensors: &[String], rounds: u64) -> Result<LocalDp> {
        let clip = Clip::new(self.clip)?.only(tensors);
        let budget = Budget::new(self.epsilon, self.delta)?;
        let params = LocalDpParams::calibrated(clip, budget, rounds)?;
        Ok(LocalDp::new(name, params, Noise::secure()?)?)
    }
}

/// The name of hospital `i` (0-based).
pub fn hospital(i: usize) -> String {
    format!("hospital-{}", i + 1)
}

/// The DenseNet-121 of the hospital app.
pub fn densenet(seed: u64) -> Result<TchModel<DenseNet>> {
    let config = DenseNetConfig::densenet121(1, Activation::Square);
    Ok(TchModel::build(fedcore::models::Device::Cpu, seed, |b| {
        DenseNet::build(b, config)
    })?
    .with_label_names(&FINDINGS)?)
}

/// The image preprocessing of the app (the data set's and inference's).
pub fn image_config(size: u32) -> ChestXrayConfig {
    ChestXrayConfig {
        size,
        channels: 1,
        ..ChestXrayConfig::default()
    }
}

/// A hospital's local training each round: the flags of the simulation and
/// of the aggregation server (which sends them with every task).
#[derive(Args, Debug, Clone, Copy, PartialEq)]
pub struct TrainingArgs {
    /// Local epochs per round.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Local batch size.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Local learning rate (Adam).
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
}

impl TrainingArgs {
    /// `epochs` over the hospital's data with Adam at `lr` in batches of
    /// `batch_size`.
    pub fn config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.lr,
            optimizer: Optimizer::adam(),
            seed: 0,
        }
    }
}

/// The tensors local DP covers: the trained tensors of the body. BatchNorm
/// running statistics are averaged without noise (docs/dashboard.md,
/// "Limits"); the head is encrypted.
pub fn dp_tensors(model: &TchModel<DenseNet>) -> Vec<String> {
    let layout = model.layout();
    let (buffers, head) = (model.buffers(), model.head());
    layout
        .tensors()
        .iter()
        .enumerate()
        .filter(|(i, _)| !buffers.contains(*i) && !head.contains(*i))
        .map(|(_, s)| s.name.clone())
        .collect()
}
