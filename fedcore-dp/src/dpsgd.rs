use fedcore::data::{Batch, DataSplit};
use fedcore::models::{Network, TchModel};
use fedcore::{
    Error, Evaluation, FitOutput, Metrics, Model, Optimizer, Parameters, PrivacyCost, Protection,
    Result, TrainConfig,
};

use crate::budget::{Budget, Ledger};
use crate::error::DpError;
use crate::noise::Noise;

/// Settings of [`DpSgd`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpSgdConfig {
    /// Per-sample clipping norm `C`.
    pub clip_norm: f64,
    /// Noise standard deviation divided by `C`.
    pub noise_multiplier: f64,
    /// The client's budget over all its fits.
    pub budget: Budget,
}

impl DpSgdConfig {
    /// Clipping norm `clip_norm`, noise multiplier `sigma`, default budget
    /// (epsilon 1, delta 1e-5).
    pub fn new(clip_norm: f64, noise_multiplier: f64) -> Self {
        Self {
            clip_norm,
            noise_multiplier,
            budget: Budget::default(),
        }
    }

    /// The noise multiplier that lets `fits` fits of `epochs` epochs over
    /// `n` examples at `batch_size` stay within `budget`.
    pub fn calibrated(
        clip_norm: f64,
        budget: Budget,
        n: usize,
        batch_size: usize,
        epochs: usize,
        fits: u64,
    ) -> crate::Result<Self> {
        let (q, steps) = schedule(n, batch_size, epochs)?;
        let sigma =
            budget
                .accounting
                .calibrate_noise(budget.epsilon, budget.delta, q, steps * fits)?;
        Ok(Self {
            clip_norm,
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

/// Sampling rate and steps of one fit.
pub(crate) fn schedule(n: usize, batch_size: usize, epochs: usize) -> crate::Result<(f64, u64)> {
    if n == 0 || batch_size == 0 || epochs == 0 {
        return Err(DpError::InvalidParams(format!(
            "DP-SGD needs data, a batch size and epochs, got n = {n}, batch {batch_size}, epochs {epochs}"
        )));
    }
    let q = (batch_size as f64 / n as f64).min(1.0);
    Ok((q, (epochs * n.div_ceil(batch_size)) as u64))
}

/// A [`TchModel`] trained by DP-SGD, as a federated [`Model`]: sample-level
/// DP-SGD (Abadi et al., "Deep Learning with Differential
/// Privacy", 2016) for fedcore's libtorch models.
///
/// Every step draws a Poisson sample of the client's data (each example
/// with probability `q = batch_size / n`), clips each example's gradient to
/// L2 norm `C` and sums them ([`TchModel::clipped_gradient_sum`]: one
/// backward pass for networks that trace their layers, such as
/// [`fedcore::models::SmallCnn`] and the GroupNorm DenseNet, with each
/// layer's per-sample norm by ghost norm or stored gradients, whichever is
/// cheaper), adds N(0, (sigma C)^2) noise to the sum, divides by
/// the expected batch size `q n` and takes an SGD (momentum) step. A fit of
/// `epochs * ceil(n / batch_size)` steps is accounted as that many
/// sampled-Gaussian steps, charged to the client's ledger before training
/// starts; a fit that would exceed the budget is refused.
///
/// Networks with BatchNorm are refused unless every BatchNorm layer is
/// frozen ([`TchModel::set_frozen`]; it then runs on its running
/// statistics, which mix no samples): batch statistics mix samples. DenseNet
/// trains whole with GroupNorm instead
/// ([`DenseNetConfig::densenet121_group_norm`](fedcore::models::DenseNetConfig::densenet121_group_norm)).
pub struct DpSgd<N: Network> {
    model: TchModel<N>,
    config: DpSgdConfig,
    noise: Noise,
    ledger: Ledger,
}

impl<N: Network> std::fmt::Debug for DpSgd<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpSgd")
            .field("model", &self.model)
            .field("config", &self.config)
            .field("ledger", &self.ledger)
            .finish()
    }
}

impl<N: Network> DpSgd<N> {
    /// DP-SGD for client `who`'s `model`. Refuses networks with BatchNorm
    /// that is not frozen ([`TchModel::check_per_sample`]).
    pub fn new(
        who: impl Into<String>,
        model: TchModel<N>,
        config: DpSgdConfig,
        noise: Noise,
    ) -> crate::Result<Self> {
        if let Err(e) = model.check_per_sample() {
            return Err(DpError::InvalidParams(format!(
                "DP-SGD cannot train this network: clipping one sample's gradient must bound its influence. {e}"
            )));
        }
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !ok(config.clip_norm) || !ok(config.noise_multiplier) {
            return Err(DpError::InvalidParams(format!(
                "DP-SGD needs a positive clipping norm and noise multiplier, got {} and {}",
                config.clip_norm, config.noise_multiplier
            )));
        }
        Ok(Self {
            model,
            config,
            noise,
            ledger: Ledger::new(who, config.budget)?,
        })
    }

    /// The model.
    pub fn model(&self) -> &TchModel<N> {
        &self.model
    }

    /// The client's ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// The settings.
    pub fn config(&self) -> DpSgdConfig {
        self.config
    }

    /// What one [`Model::fit`] over `n` examples in Poisson batches of
    /// `batch_size` (expected) for `epochs` costs: the sampled Gaussian at
    /// this noise multiplier, `epochs * ceil(n / batch_size)` steps.
    pub fn fit_cost(
        &self,
        n: usize,
        batch_size: usize,
        epochs: usize,
    ) -> crate::Result<PrivacyCost> {
        let (q, steps) = schedule(n, batch_size, epochs)?;
        Ok(PrivacyCost::SampledGaussian {
            noise_multiplier: self.config.noise_multiplier,
            sampling_rate: q,
            steps,
        })
    }

    /// The same client after the fits that cost `earlier` (a hospital that
    /// restarts must not spend its budget twice): each is charged to the
    /// ledger first. More than the budget allows is
    /// [`Error::PrivacyBudgetExhausted`](fedcore::Error::PrivacyBudgetExhausted).
    pub fn resumed<'a>(
        mut self,
        earlier: impl IntoIterator<Item = &'a PrivacyCost>,
    ) -> crate::Result<Self> {
        for cost in earlier {
            self.ledger.charge(cost)?;
        }
        Ok(self)
    }

    /// One DP-SGD step on `batch` (already sampled), normalized by
    /// `expected_batch`; returns the batch's mean loss (0 for an empty batch).
    /// Not accounted: [`Model::fit`] charges the ledger for its steps.
    ///
    /// `terms` adds what does not depend on the batch to the noised
    /// gradient: FedProx's `mu * (w - w_start)` (the drift so far, kept up
    /// to date here) and SCAFFOLD's correction. Both are post-processing of
    /// the privatized gradients and cost no privacy.
    fn step(
        &mut self,
        batch: Option<&Batch>,
        expected_batch: f64,
        lr: f64,
        velocity: &mut [f32],
        momentum: f64,
        terms: &mut Terms,
    ) -> Result<f64> {
        let c = self.config.clip_norm;
        let (mut grad, loss) = match batch {
            Some(b) => {
                let g = self
                    .model
                    .clipped_gradient_sum(&b.images, b.shape, &b.targets, c)?;
                (g.sum, g.loss)
            }
            None => (vec![0.0; velocity.len()], 0.0),
        };
        self.noise
            .add_gaussian(&mut grad, self.config.noise_multiplier * c);
        let scale = (1.0 / expected_batch) as f32;
        let (lr, mu) = (lr as f32, momentum as f32);
        if terms.is_empty() {
            for (v, g) in velocity.iter_mut().zip(&mut grad) {
                *v = mu * *v + *g * scale;
                *g = lr * *v;
            }
        } else {
            let prox = terms.prox_mu;
            for (k, (v, g)) in velocity.iter_mut().zip(&mut grad).enumerate() {
                let mut ge = *g * scale;
                if let Some(d) = &terms.drift {
                    ge += prox * d[k];
                }
                if let Some(c) = &terms.correction {
                    ge += c[k];
                }
                *v = mu * *v + ge;
                *g = lr * *v;
            }
            if let Some(d) = &mut terms.drift {
                for (d, s) in d.iter_mut().zip(&grad) {
                    *d -= s;
                }
            }
        }
        self.model.sub_trainable(&grad)?;
        Ok(loss)
    }

    /// The trainable values of `p` (SCAFFOLD's correction), in the order of
    /// [`TchModel::sub_trainable`].
    fn trainable_part(&self, p: &Parameters) -> Result<Vec<f32>> {
        let layout = self.model.layout();
        layout.ensure_same(p.layout())?;
        let mut out = Vec::with_capacity(self.model.trainable_values());
        for i in self.model.trainable_tensors() {
            out.extend_from_slice(&p.as_slice()[layout.range_at(i)]);
        }
        Ok(out)
    }
}

/// What [`DpSgd`] adds to each noised gradient besides the data's part.
struct Terms {
    prox_mu: f32,
    /// `w - w_start` over the trainable values, when `prox_mu > 0`.
    drift: Option<Vec<f32>>,
    correction: Option<Vec<f32>>,
}

impl Terms {
    fn is_empty(&self) -> bool {
        self.drift.is_none() && self.correction.is_none()
    }
}

impl<N: Network> Model for DpSgd<N> {
    type Data = DataSplit;

    fn parameters(&self) -> Parameters {
        self.model.parameters()
    }

    fn set_parameters(&mut self, parameters: &Parameters) -> Result<()> {
        self.model.set_parameters(parameters)
    }

    fn fit(&mut self, data: &DataSplit, config: &TrainConfig) -> Result<FitOutput> {
        self.train(data, config, None)
    }

    fn fit_corrected(
        &mut self,
        data: &DataSplit,
        config: &TrainConfig,
        correction: &Parameters,
    ) -> Result<FitOutput> {
        let correction = self.trainable_part(correction)?;
        self.train(data, config, Some(correction))
    }

    fn evaluate(&mut self, data: &DataSplit) -> Result<Evaluation> {
        self.model.evaluate(data)
    }
}

impl<N: Network> DpSgd<N> {
    fn train(
        &mut self,
        data: &DataSplit,
        config: &TrainConfig,
        correction: Option<Vec<f32>>,
    ) -> Result<FitOutput> {
        config.check()?;
        let momentum = match config.optimizer {
            Optimizer::Sgd { momentum } => momentum,
            other => {
                return Err(Error::InvalidConfig(format!(
                    "DP-SGD runs SGD (with momentum); {other:?} is not supported"
                )));
            }
        };
        let n = data.len();
        let (q, steps) = schedule(n, config.batch_size, config.epochs)?;
        let cost = self.fit_cost(n, config.batch_size, config.epochs)?;
        // Charged up front: a fit that would exceed the budget never starts,
        // and one that fails halfway has still spent what it ran.
        let spent = self.ledger.charge(&cost)?;
        let mut velocity = vec![0.0f32; self.model.trainable_values()];
        let mut terms = Terms {
            prox_mu: config.proximal_mu as f32,
            drift: (config.proximal_mu > 0.0).then(|| vec![0.0f32; velocity.len()]),
            correction,
        };
        let (mut loss_sum, mut seen) = (0.0, 0usize);
        for step in 0..steps {
            let picked: Vec<usize> = self
                .noise
                .poisson_sample(n, q)
                .into_iter()
                .map(|k| data.indices()[k])
                .collect();
            let batch =
                if picked.is_empty() {
                    None
                } else {
                    let len = picked.len();
                    let split = DataSplit::subset(data.source().clone(), picked)?;
                    Some(split.batches(len, None).next().ok_or_else(|| {
                        Error::Model("a non-empty sample produced no batch".into())
                    })??)
                };
            let loss = self.step(
                batch.as_ref(),
                q * n as f64,
                config.learning_rate,
                &mut velocity,
                momentum,
                &mut terms,
            )?;
            if !loss.is_finite() {
                return Err(Error::Model(format!(
                    "DP-SGD loss became {loss} at step {step}; lower the learning rate"
                )));
            }
            if let Some(b) = &batch {
                loss_sum += loss * b.shape[0] as f64;
                seen += b.shape[0];
            }
        }
        let mut metrics = Metrics::new();
        metrics.insert("loss".into(), loss_sum / seen.max(1) as f64);
        metrics.insert("steps".into(), steps as f64);
        metrics.insert("dp_epsilon".into(), spent.epsilon);
        Ok(FitOutput {
            num_examples: n as u64,
            metrics,
            privacy: vec![Protection {
                kind: fedcore::ProtectionKind::DifferentialPrivacy,
                mechanism: format!(
                    "dp-sgd(C={},sigma={:.4},q={:.5}{})",
                    self.config.clip_norm,
                    self.config.noise_multiplier,
                    q,
                    if self.noise.is_seeded() {
                        ",seeded"
                    } else {
                        ""
                    }
                ),
                cost,
                spent: Some(spent),
            }],
            steps,
        })
    }
}
