//! The recipe: what a hospital federation trains and how, shared by the
//! simulation ([`crate::sim`]) and the deployment ([`crate::deploy`]): the
//! model, the body's aggregator, local DP on the body, the local training
//! and the image preprocessing, and what is encrypted: by default the
//! model's [`TchModel::head`], with `--encrypt all` the whole update, under
//! `fedcore_he`'s default CKKS parameters.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use fedcore::SealedAggregator;
use fedcore::data::chestxray::FINDINGS;
use fedcore::data::{
    ChestXray14, ChestXrayConfig, DataSplit, SyntheticXrays, write_synthetic_chestxray,
};
use fedcore::models::{Activation, DenseNet, DenseNetConfig, Network, TchModel};
use fedcore::{
    Aggregate, Aggregator, ClientUpdate, FedAvg, Model, Optimizer, RoundSteps, ServerOpt, Strategy,
    StrategyInfo, TrainConfig,
};
use fedcore_dp::{Accounting, Budget, Clip, DpSgd, DpSgdConfig, LocalDp, LocalDpParams, Noise};
use fedcore_he::keyswitch::{KeySwitchRound, KeySwitchSum};
use fedcore_he::{CkksContext, CkksSum, EncryptedMedian, Public};
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

/// Whose CKKS keys seal what a hospital encrypts.
#[derive(
    ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum HeKeys {
    /// One key pair from the key authority: every hospital holds the same
    /// secret key, so one hospital with the server could read another's
    /// upload.
    #[default]
    Single,
    /// Multiparty keys (docs/he.md "Multiparty keys"): hospitals upload
    /// under a collective key made from a share of each, so no hospital,
    /// nor the server, nor both together, can decrypt another's upload; a
    /// second step of each round switches the server's sum to the
    /// hospitals' output key. Every hospital must answer it (N-of-N), or
    /// `--threshold` of them.
    Multiparty,
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
    /// An aggregator under multiparty keys: its round forms the sealed sum
    /// and has the hospitals switch it to their output key, which the
    /// paired sealed aggregator adds to the sealed global
    /// (`fedcore_he::key_switch_round`).
    KeySwitch(Box<KeySwitchRound<Box<dyn Aggregator>>>, KeySwitchSum),
    /// The encrypted geometric median under multiparty keys: its distances
    /// decrypted together by the hospitals, its sum switched to their
    /// output key (`fedcore_he::EncryptedMedian::multiparty`).
    KeySwitchMedian(Box<KeySwitchRound<EncryptedMedian>>, KeySwitchSum),
}

impl Rule {
    /// The server's sealed sum for this rule: two values per CKKS slot
    /// (half the bytes), except for the encrypted median, whose inner
    /// products need one (its own `sealed_sum`, over the keys it was built
    /// with: `public` is not used then), and the key switch's own (under
    /// the output key it was built with).
    pub fn sealed_sum(&self, public: CkksContext<Public>) -> Box<dyn SealedAggregator> {
        match self {
            Self::Plain(_) => Box::new(CkksSum::new(public)),
            Self::EncryptedMedian(m) => Box::new(m.sealed_sum()),
            Self::KeySwitch(_, sum) | Self::KeySwitchMedian(_, sum) => Box::new(sum.clone()),
        }
    }
}

impl Strategy for Rule {
    fn describe(&self) -> StrategyInfo {
        match self {
            Self::Plain(a) => a.describe(),
            Self::EncryptedMedian(m) => m.describe(),
            Self::KeySwitch(k, _) => k.describe(),
            Self::KeySwitchMedian(k, _) => k.describe(),
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
            Self::KeySwitch(k, _) => k.aggregate_round(updates, steps),
            Self::KeySwitchMedian(k, _) => k.aggregate_round(updates, steps),
        }
    }

    fn saved_state(&self) -> Option<Vec<f32>> {
        match self {
            Self::Plain(a) => a.saved_state(),
            Self::EncryptedMedian(m) => m.saved_state(),
            Self::KeySwitch(k, _) => k.saved_state(),
            Self::KeySwitchMedian(k, _) => k.saved_state(),
        }
    }

    fn restore_state(&mut self, state: Vec<f32>) -> fedcore::Result<()> {
        match self {
            Self::Plain(a) => a.restore_state(state),
            Self::EncryptedMedian(m) => m.restore_state(state),
            Self::KeySwitch(k, _) => k.restore_state(state),
            Self::KeySwitchMedian(k, _) => k.restore_state(state),
        }
    }
}

/// What the server makes of the aggregate (Reddi et al. 2021): a step by
/// it, or a server optimizer fed with it as a pseudo-gradient, at the
/// rates of the fedopt experiments (docs/strategies.md).
#[derive(
    ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum ServerOptimizerChoice {
    /// The aggregate as it is (FedAvg).
    #[default]
    Sgd,
    /// FedAvgM: momentum 0.9, server learning rate 0.5.
    Momentum,
    /// FedAdam: server learning rate 0.01, tau 1e-3.
    Adam,
    /// FedYogi: server learning rate 0.01, tau 1e-3.
    Yogi,
}

impl ServerOptimizerChoice {
    /// The optimizer and its learning rate.
    pub fn build(self) -> (ServerOpt, f32) {
        match self {
            Self::Sgd => (ServerOpt::Sgd, 1.0),
            Self::Momentum => (ServerOpt::momentum(), 0.5),
            Self::Adam => (ServerOpt::adam(), 0.01),
            Self::Yogi => (ServerOpt::yogi(), 0.01),
        }
    }
}

/// The aggregation rule for the body, swappable with one flag.
#[derive(
    ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
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

/// The differential privacy a hospital applies before anything it trained
/// leaves it.
#[derive(
    ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DpMode {
    /// None: the updates carry what the hospital's images taught the model.
    Off,
    /// Sample-level DP-SGD (the default): every step clips each image's
    /// gradient and adds Gaussian noise, over Poisson-sampled batches, so
    /// that each image's influence on everything the hospital releases is
    /// bounded by its (epsilon, delta), counted by the PLD accountant
    /// (`--accounting`).
    #[default]
    Sample,
    /// Client-level: the hospital's whole body update is clipped and noised
    /// once per round (protects the hospital's data set as a whole; with a
    /// handful of hospitals the noise it needs on 7M values stops learning).
    Client,
}

/// A hospital's differential privacy: the flags of the simulation and of a
/// deployed hospital (`hospital client`). The hospital sets its DP-SGD
/// schedule itself (batch, epochs, learning rate), not the server: its
/// guarantee depends on them.
#[derive(Args, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DpArgs {
    /// Differential privacy at each hospital: sample (DP-SGD on each
    /// image), client (noise on the body update), or off.
    #[arg(long = "dp", value_name = "DP", value_enum, default_value_t = DpMode::Sample)]
    pub mode: DpMode,
    /// Each hospital's epsilon for the whole run.
    #[arg(long, default_value_t = 8.0)]
    pub epsilon: f64,
    /// Each hospital's delta.
    #[arg(long, default_value_t = 1e-5)]
    pub delta: f64,
    /// The accountant that calibrates the noise and counts each hospital's
    /// epsilon: `pld` (the privacy loss distribution: less noise for the
    /// same epsilon) or `rdp` (Rényi DP, what Opacus reports). Settings
    /// saved before this flag existed were accounted by RDP.
    #[arg(long, default_value = "pld")]
    #[serde(default)]
    pub accounting: Accounting,
    /// L2 clipping norm: of each image's gradient (--dp sample), or of a
    /// hospital's body update (--dp client).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    /// DP-SGD: images per step on average (each image is in a step's batch
    /// with probability this / the hospital's images).
    #[arg(long, default_value_t = 128)]
    pub dp_batch_size: usize,
    /// DP-SGD: epochs over the hospital's images per round.
    #[arg(long, default_value_t = 1)]
    pub dp_epochs: usize,
    /// DP-SGD: learning rate (SGD with momentum 0.9).
    #[arg(long, default_value_t = 0.05)]
    pub dp_lr: f64,
}

impl Default for DpArgs {
    /// The flags' defaults.
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            dp: DpArgs,
        }
        <Flags as clap::Parser>::parse_from(["hospital"]).dp
    }
}

impl DpArgs {
    /// Whether any DP is on.
    pub fn enabled(&self) -> bool {
        self.mode != DpMode::Off
    }

    /// The budget of each hospital.
    pub fn budget(&self) -> Result<Budget> {
        Ok(Budget::new(self.epsilon, self.delta)?.with_accounting(self.accounting))
    }

    /// Hospital `name`'s client-level mechanism on `tensors`: clip to
    /// `clip`, Gaussian noise calibrated by the budget's accountant so that
    /// `rounds` releases spend (epsilon, delta).
    pub fn mechanism(&self, name: &str, tensors: &[String], rounds: u64) -> Result<LocalDp> {
        let clip = Clip::new(self.clip)?.only(tensors);
        let params = LocalDpParams::calibrated(clip, self.budget()?, rounds)?;
        Ok(LocalDp::new(name, params, Noise::secure()?)?)
    }

    /// A DP-SGD fit's schedule: SGD with momentum 0.9 at `dp_lr`, Poisson
    /// batches of `dp_batch_size` on average, `dp_epochs` epochs.
    pub fn sgd_config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.dp_epochs,
            batch_size: self.dp_batch_size,
            learning_rate: self.dp_lr,
            optimizer: Optimizer::Sgd { momentum: 0.9 },
            seed: 0,
            ..TrainConfig::default()
        }
    }

    /// Hospital `name`'s DP-SGD on `model` for `rounds` fits over `images`
    /// images: the noise multiplier that keeps them within the budget.
    pub fn dp_sgd<N: Network>(
        &self,
        name: &str,
        model: TchModel<N>,
        images: usize,
        rounds: u64,
    ) -> Result<DpSgd<N>> {
        let config = DpSgdConfig::calibrated(
            self.clip,
            self.budget()?,
            images,
            self.dp_batch_size,
            self.dp_epochs,
            rounds,
        )?;
        DpSgd::new(name, model, config, Noise::secure()?)
            .map_err(|e| anyhow::anyhow!("{e} (--dp sample needs --trainable head or last-block)"))
    }
}

/// What the hospitals train; the rest of the network stays as the initial
/// global model has it (public pretraining, [`PretrainArgs`]).
#[derive(
    ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Trainable {
    /// Every layer (BatchNorm on batch statistics: not with `--dp sample`).
    All,
    /// The convolutions of the last dense block and the classifier
    /// (2,129,920 + 14,350 values); everything else, every BatchNorm layer
    /// included, is frozen (BatchNorm then runs on its running statistics).
    LastBlock,
    /// The classifier (14,350 values): a linear model on the features
    /// public pretraining learned, everything else frozen.
    #[default]
    Head,
}

impl Trainable {
    /// Whether the hospitals train tensor `name`.
    pub fn trains(self, name: &str) -> bool {
        let head = name.starts_with("classifier.");
        match self {
            Self::All => true,
            Self::LastBlock => {
                head || (name.starts_with("features.denseblock4.") && name.contains(".conv"))
            }
            Self::Head => head,
        }
    }

    /// Freezes what this leaves out of `model`'s training.
    pub fn apply(self, model: &mut TchModel<DenseNet>) -> Result<()> {
        let buffers = model.buffers();
        let frozen: Vec<String> = model
            .layout()
            .tensors()
            .iter()
            .enumerate()
            .filter(|(i, t)| !buffers.contains(*i) && !self.trains(&t.name))
            .map(|(_, t)| t.name.clone())
            .collect();
        Ok(model.set_frozen(&frozen)?)
    }
}

/// Public pretraining: the initial global model is trained, without DP, on
/// a public set before any hospital trains (as a real deployment starts
/// from weights trained on a public chest X-ray collection).
#[derive(Args, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PretrainArgs {
    /// Patients of the public synthetic set the initial model is trained on
    /// (other patients than any hospital's: the generator's seed differs);
    /// 0 starts from the random initialization.
    #[arg(long, default_value_t = 400)]
    pub public_patients: usize,
    /// Epochs of public pretraining.
    #[arg(long, default_value_t = 4)]
    pub public_epochs: usize,
}

/// Added to the run's seed for the public set's patients.
const PUBLIC_SEED: u64 = 0x5055_424c_4943; // "PUBLIC"

impl PretrainArgs {
    /// Trains `model` (all of it, Adam at 1e-3, batches of 32) on the public
    /// synthetic set written into `dir` (once) at `image_size`, and says so
    /// on standard output; returns the images it trained on (0 when
    /// pretraining is off).
    pub fn pretrain(
        &self,
        model: &mut TchModel<DenseNet>,
        image_size: u32,
        seed: u64,
        dir: &Path,
    ) -> Result<usize> {
        if self.public_patients == 0 || self.public_epochs == 0 {
            return Ok(0);
        }
        if !dir.join("test_list.txt").exists() {
            write_synthetic_chestxray(
                dir,
                &SyntheticXrays {
                    patients: self.public_patients,
                    size: image_size.max(64),
                    seed: seed.wrapping_add(PUBLIC_SEED),
                    ..SyntheticXrays::default()
                },
            )?;
        }
        let ds = ChestXray14::open(dir, image_config(image_size))?;
        let mut all = ds.official_split("train_val_list.txt")?;
        all.extend(ds.official_split("test_list.txt")?);
        let images = all.len();
        let data = DataSplit::subset(Arc::new(ds), all)?;
        let config = TrainConfig {
            epochs: self.public_epochs,
            batch_size: 32,
            learning_rate: 1e-3,
            optimizer: Optimizer::adam(),
            seed,
            ..TrainConfig::default()
        };
        let started = std::time::Instant::now();
        model.fit(&data, &config)?;
        println!(
            "public pretraining: {} epochs over {images} images of {} other patients in {:.0} s",
            self.public_epochs,
            self.public_patients,
            started.elapsed().as_secs_f64()
        );
        Ok(images)
    }
}

/// The name of hospital `i` (0-based).
pub fn hospital(i: usize) -> String {
    format!("hospital-{}", i + 1)
}

/// The DenseNet-121 of the hospital app: torchvision's, with BatchNorm,
/// which DP-SGD trains frozen ([`Trainable`]): on its running statistics
/// from public pretraining it mixes no samples. (The GroupNorm variant,
/// which DP-SGD trains whole, learned far less here: docs/privacy.md.)
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
#[derive(Args, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
            ..TrainConfig::default()
        }
    }
}

/// The tensors client-level DP covers: the trained tensors of the body that
/// travel in the clear. BatchNorm running statistics are averaged without
/// noise (docs/dashboard.md, "Limits"); the head is encrypted; frozen
/// tensors do not change.
pub fn dp_tensors(model: &TchModel<DenseNet>) -> Vec<String> {
    let layout = model.layout();
    let (buffers, head, frozen) = (model.buffers(), model.head(), model.frozen());
    layout
        .tensors()
        .iter()
        .enumerate()
        .filter(|(i, _)| !buffers.contains(*i) && !head.contains(*i) && !frozen.contains(*i))
        .map(|(_, s)| s.name.clone())
        .collect()
}

/// Refuses client-level DP when it would cover nothing: with `--trainable
/// head` the only trained values are the encrypted classifier's.
pub fn check_client_dp(dp: &DpArgs, dp_tensors: &[String]) -> Result<()> {
    if dp.mode == DpMode::Client && dp_tensors.is_empty() {
        bail!(
            "--dp client protects the trained values that travel in the clear, and with this \
             --trainable there are none (the classifier is encrypted): use --dp sample, or \
             --trainable last-block or all"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hospitals_account_by_pld_and_settings_saved_before_it_by_rdp() {
        let pld = DpArgs::default();
        assert_eq!(pld.accounting, Accounting::Pld);
        assert_eq!(pld.budget().expect("budget").accounting, Accounting::Pld);
        // The same budget costs less noise under PLD than under RDP.
        let rdp = DpArgs {
            accounting: Accounting::Rdp,
            ..pld
        };
        let sigma = |dp: &DpArgs| {
            DpSgdConfig::calibrated(dp.clip, dp.budget().expect("budget"), 1_000, 128, 1, 10)
                .expect("calibrated")
                .noise_multiplier
        };
        let (s_pld, s_rdp) = (sigma(&pld), sigma(&rdp));
        assert!(s_pld < 0.97 * s_rdp, "PLD {s_pld} vs RDP {s_rdp}");
        // A ledger or run saved before the flag existed was accounted by
        // RDP and keeps being so.
        let mut saved = serde_json::to_value(pld).expect("json");
        saved.as_object_mut().expect("object").remove("accounting");
        let old: DpArgs = serde_json::from_value(saved).expect("old settings");
        assert_eq!(old.accounting, Accounting::Rdp);
        assert_eq!(
            DpArgs {
                accounting: Accounting::Pld,
                ..old
            },
            pld
        );
    }

    #[test]
    fn what_hospitals_train_decides_what_client_level_dp_covers() {
        let mut model = densenet(1).expect("model");
        let client = DpArgs {
            mode: DpMode::Client,
            ..DpArgs::default()
        };
        // The classifier alone: encrypted, so client-level DP has nothing
        // in the clear to cover and is refused; DP-SGD is not.
        Trainable::Head.apply(&mut model).expect("freeze");
        assert_eq!(model.trainable_values(), 14_350);
        assert!(model.frozen_statistics(), "BatchNorm frozen");
        assert!(dp_tensors(&model).is_empty());
        assert!(check_client_dp(&client, &dp_tensors(&model)).is_err());
        assert!(check_client_dp(&DpArgs::default(), &[]).is_ok());
        // The last block's convolutions travel in the clear: covered.
        Trainable::LastBlock.apply(&mut model).expect("freeze");
        assert_eq!(model.trainable_values(), 2_129_920 + 14_350);
        let covered = dp_tensors(&model);
        assert!(
            !covered.is_empty()
                && covered
                    .iter()
                    .all(|n| n.starts_with("features.denseblock4.") && n.contains(".conv")),
            "{covered:?}"
        );
        check_client_dp(&client, &covered).expect("covered");
        // Everything: BatchNorm trains on batch statistics, so DP-SGD refuses.
        Trainable::All.apply(&mut model).expect("unfreeze");
        assert!(model.frozen().is_empty());
        let e = DpArgs::default()
            .dp_sgd("h", model, 100, 10)
            .expect_err("BatchNorm trained");
        assert!(e.to_string().contains("--trainable head"), "{e}");
    }
}
