//! Models on libtorch (feature `tch`): DenseNet-121 with a choice of
//! activation, and a small CNN for MNIST.
//!
//! A [`TchModel`] owns a network and its variables and implements
//! [`Model`]: its [`Parameters`] are every variable in
//! torchvision's `state_dict` order and names, BatchNorm running statistics
//! included (see "BatchNorm statistics" below); `fit` trains on a
//! [`DataSplit`] with SGD or Adam, seeded; `evaluate` reports loss and
//! accuracy or per-label AUROC. The same code runs on the CPU and on CUDA.
//!
//! # BatchNorm statistics
//!
//! `running_mean` and `running_var` travel with the parameters: they are part
//! of the layout, so a client's update carries how its statistics moved and
//! the server averages them like weights. The global model then evaluates
//! (and exports to PyTorch) with statistics of all hospitals' data, which is
//! what a model deployed anywhere needs; keeping them local (FedBN) would
//! leave the global model without usable statistics. `num_batches_tracked`,
//! an integer PyTorch only reads when `momentum=None`, stays local and is
//! written on export. Privacy mechanisms and robust aggregators see the
//! statistics as ordinary coordinates; [`TchModel::buffers`] names them for
//! mechanisms that should treat them differently.
//!
//! # Seeds and threads
//!
//! Initial weights come from a ChaCha RNG seeded by the caller (not from
//! libtorch's global generator), and batches are shuffled by
//! [`crate::TrainConfig::seed`], so two models built with the same seed and
//! trained with the same config match, even when several train at once on
//! different threads. On the CPU libtorch's kernels are deterministic; on
//! CUDA some (cuDNN convolutions) are not bit-for-bit.

mod cnn;
mod densenet;
pub mod layers;
mod persample;
mod scatter;

use std::path::Path;
use std::sync::Arc;

use safetensors::SafeTensors;
use tch::nn::OptimizerConfig;
use tch::{Kind, Reduction, Tensor, nn};

pub use cnn::SmallCnn;
pub use densenet::{Activation, DenseNet, DenseNetConfig, Placement};
pub use persample::{ClippedGradientSum, PerSampleGradients, Trace};
pub use scatter::{ScatterLinear, Scattering};

use layers::Builder;

/// Where a model's variables live. fedcore's own type, so that no libtorch
/// type appears in the public API; it converts into `tch::Device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The CPU.
    Cpu,
    /// The CUDA device with this index.
    Cuda(usize),
}

impl Device {
    /// CUDA device 0 when libtorch sees one, else the CPU.
    pub fn cuda_if_available() -> Self {
        if tch::Cuda::is_available() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }

    /// Parses `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when available).
    pub fn parse(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::cuda_if_available()),
            "cuda" => cuda(0),
            other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(n) => cuda(n),
                None => Err(Error::InvalidConfig(format!(
                    "unknown device `{other}` (cpu, cuda, cuda:N, auto)"
                ))),
            },
        }
    }
}

impl From<Device> for tch::Device {
    fn from(d: Device) -> Self {
        match d {
            Device::Cpu => tch::Device::Cpu,
            Device::Cuda(n) => tch::Device::Cuda(n),
        }
    }
}

use crate::data::{Batch, DataSplit, Targets};
use crate::error::{Error, Result};
use crate::metrics;
use crate::model::{Evaluation, FitOutput, Model, Optimizer, TrainConfig};
use crate::params::{Layout, Parameters, Selection};
use crate::update::Metrics;

/// What a network predicts, which decides its loss and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    /// One of `classes` classes: cross-entropy, accuracy.
    MultiClass {
        /// Number of classes.
        classes: usize,
    },
    /// `labels` independent yes/no labels: BCE with logits, per-label AUROC.
    MultiLabel {
        /// Number of labels.
        labels: usize,
    },
}

impl Task {
    /// Number of logits per image.
    pub fn outputs(&self) -> usize {
        match self {
            Task::MultiClass { classes } => *classes,
            Task::MultiLabel { labels } => *labels,
        }
    }
}

/// The normalization layer a network uses after its convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Normalization {
    /// BatchNorm2d, as torchvision. Its training-mode output mixes the
    /// samples of a batch, so DP-SGD refuses it.
    #[default]
    Batch,
    /// GroupNorm with at most `groups` groups per layer (the largest count
    /// that divides the layer's channels): no sample mixing, no running
    /// statistics. Opacus' validator substitutes `GroupNorm(min(32, C), C)`
    /// for BatchNorm; `groups: 32` is the same on DenseNet-121, whose
    /// channel counts are all multiples of 32.
    Group {
        /// Upper bound on the groups of each layer (at least 1).
        groups: usize,
    },
}

/// A network: variables made by a [`Builder`], a forward
/// pass. Its layers come from [`layers`].
pub trait Network: Send {
    /// Logits `[N, outputs]` for images `[N, C, H, W]`; `train` selects
    /// batch statistics in BatchNorm (and updates the running ones).
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor;

    /// What the logits mean.
    fn task(&self) -> Task;

    /// Checks that images of `[channels, height, width]` fit this network.
    fn check_input(&self, shape: [usize; 3]) -> Result<()>;

    /// Whether the network has BatchNorm (then training skips batches of one image).
    fn has_batch_norm(&self) -> bool;

    /// The default "head": patterns for [`Layout::select`].
    fn head_patterns(&self) -> Vec<String>;

    /// The forward pass in training mode, recording every convolution,
    /// GroupNorm and linear layer in `trace` (their `forward_traced`) so that per-sample gradients come from one
    /// backward pass ([`TchModel::per_sample_gradients`]). `None` (the
    /// default) when the network cannot: per-sample gradients then take one
    /// backward pass per sample. BatchNorm runs on its running statistics
    /// here (per-sample gradients need it frozen,
    /// [`TchModel::check_per_sample`]).
    fn forward_traced(&self, xs: &Tensor, trace: &mut Trace) -> Option<Tensor> {
        let _ = (xs, trace);
        None
    }
}

/// How [`TchModel::load_torchvision`] maps a PyTorch state dict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Tensors to leave as they are (patterns as in [`Layout::select`]),
    /// e.g. `classifier.*` when fine-tuning 1000-class weights to 14 labels.
    pub skip: Vec<String>,
    /// Sum a 3-channel first convolution over its input channels to fit a
    /// 1-channel model (gray X-rays from RGB-pretrained weights).
    pub rgb_to_gray: bool,
    /// Ignore tensors in the file that the model does not have (by default
    /// they are an error, as `load_state_dict(strict=True)`).
    pub allow_unexpected: bool,
}

/// Logits and targets of a whole data split, from [`TchModel::predict`].
#[derive(Debug, Clone, PartialEq)]
pub struct Predictions {
    /// `images x outputs` logits, row-major.
    pub logits: Vec<f32>,
    /// The targets, in the same order.
    pub targets: Targets,
    /// Mean loss.
    pub loss: f64,
}

/// A network with its variables, as a federated [`Model`].
pub struct TchModel<N: Network> {
    net: N,
    vs: nn::VarStore,
    layout: Arc<Layout>,
    tensors: Vec<Tensor>,
    buffers: Vec<bool>,
    frozen: Vec<bool>,
    head: Vec<String>,
    label_names: Option<Vec<String>>,
    batches_tracked: i64,
}

impl<N: Network> std::fmt::Debug for TchModel<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TchModel")
            .field("task", &self.net.task())
            .field("device", &self.vs.device())
            .field("tensors", &self.layout.tensors().len())
            .field("values", &self.layout.len())
            .finish()
    }
}

impl<N: Network> TchModel<N> {
    /// Builds a network with `build` on `device`, initial weights from `seed`.
    pub fn build(
        device: Device,
        seed: u64,
        build: impl FnOnce(&mut Builder) -> Result<N>,
    ) -> Result<Self> {
        let mut b = Builder::new(device, seed);
        let net = build(&mut b)?;
        let layout = Arc::new(Layout::new(b.specs)?);
        let head = net.head_patterns();
        layout.select(&head)?;
        let frozen = vec![false; b.buffers.len()];
        Ok(Self {
            net,
            vs: b.vs,
            layout,
            tensors: b.tensors,
            buffers: b.buffers,
            frozen,
            head,
            label_names: None,
            batches_tracked: 0,
        })
    }

    /// The network.
    pub fn network(&self) -> &N {
        &self.net
    }

    /// Where the variables live.
    pub fn device(&self) -> Device {
        match self.vs.device() {
            tch::Device::Cuda(n) => Device::Cuda(n),
            // Models are only built on the CPU or CUDA.
            _ => Device::Cpu,
        }
    }

    /// The layout of [`Model::parameters`].
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// Number of trainable values (buffers and frozen tensors excluded).
    pub fn trainable_values(&self) -> usize {
        self.trainable_tensors()
            .into_iter()
            .map(|i| self.layout.tensors()[i].numel())
            .sum()
    }

    /// Freezes exactly the tensors that `patterns` select (as in
    /// [`Layout::select`]; an empty list unfreezes everything). Training
    /// leaves a frozen tensor as it is: [`Model::fit`], the per-sample
    /// gradients and clipped sums of DP-SGD (whose columns and
    /// [`TchModel::sub_trainable`] skip it) and their backward passes, which
    /// stop where nothing below is trainable. Frozen tensors still travel in
    /// [`Model::parameters`] and are set by [`Model::set_parameters`].
    /// Freeze a layer whole (weight and bias): a layer whose weight is frozen
    /// and bias is not has no per-sample gradient path and is refused there.
    /// BatchNorm's running statistics in a frozen part still update in
    /// training mode; freeze GroupNorm networks (or none) for fixed features.
    pub fn set_frozen<S: AsRef<str>>(&mut self, patterns: &[S]) -> Result<()> {
        let selection = self.layout.select(patterns)?;
        for (i, t) in self.tensors.iter().enumerate() {
            self.frozen[i] = selection.contains(i);
            if !self.buffers[i] {
                let _ = t.set_requires_grad(!self.frozen[i]);
            }
        }
        Ok(())
    }

    /// The tensors [`TchModel::set_frozen`] froze.
    pub fn frozen(&self) -> Selection {
        self.layout.select_by(|i, _| self.frozen[i])
    }

    /// The BatchNorm layers (by name prefix, `features.norm0`) whose weight
    /// or bias is not frozen.
    fn unfrozen_batch_norms(&self) -> Vec<String> {
        let specs = self.layout.tensors();
        (0..specs.len())
            .filter(|&i| self.buffers[i])
            .filter_map(|i| specs[i].name.strip_suffix(".running_mean"))
            .filter(|prefix| {
                ["weight", "bias"].iter().any(|p| {
                    self.layout
                        .position(&format!("{prefix}.{p}"))
                        .is_some_and(|j| !self.frozen[j])
                })
            })
            .map(str::to_owned)
            .collect()
    }

    /// Whether the network has BatchNorm and every BatchNorm layer is
    /// frozen: then training runs them on their running statistics
    /// (evaluation mode, as detectron2's `FrozenBatchNorm2d`), which mixes
    /// no samples and leaves the statistics as they are.
    pub fn frozen_statistics(&self) -> bool {
        self.net.has_batch_norm() && self.unfrozen_batch_norms().is_empty()
    }

    /// Whether each sample's gradient is its own, as DP-SGD needs: true
    /// without BatchNorm, or with every BatchNorm layer frozen
    /// ([`TchModel::frozen_statistics`]); an error that names a BatchNorm
    /// layer still trained otherwise (its batch statistics mix the samples).
    pub fn check_per_sample(&self) -> Result<()> {
        if !self.net.has_batch_norm() {
            return Ok(());
        }
        match self.unfrozen_batch_norms().first() {
            None => Ok(()),
            Some(layer) => Err(Error::InvalidConfig(format!(
                "per-sample gradients need a network without BatchNorm, or with every BatchNorm layer frozen (then it runs on its running statistics and mixes no samples); `{layer}` is trained: its batch statistics mix the samples of a batch, so no sample has a gradient of its own (use GroupNorm, or freeze the BatchNorm layers)"
            ))),
        }
    }

    /// The BatchNorm running statistics (not trained by gradient descent).
    pub fn buffers(&self) -> Selection {
        self.layout.select_by(|i, _| self.buffers[i])
    }

    /// The "head" (default: the last layer, `classifier.*` for DenseNet).
    pub fn head(&self) -> Selection {
        self.layout
            .select(&self.head)
            .unwrap_or_else(|_| unreachable!("checked when set"))
    }

    /// L2 norm of the gradient libtorch holds for variable `name` (0 when
    /// none has been computed yet); for diagnostics and tests.
    pub fn grad_norm(&self, name: &str) -> Result<f64> {
        let t = &self.tensors[self.layout.index_of(name)?];
        let g = t.grad();
        Ok(if g.defined() {
            g.norm().double_value(&[])
        } else {
            0.0
        })
    }

    /// Names a different head; a pattern matching nothing is an error.
    pub fn set_head<S: AsRef<str>>(&mut self, patterns: &[S]) -> Result<()> {
        self.layout.select(patterns)?;
        self.head = patterns.iter().map(|p| p.as_ref().to_owned()).collect();
        Ok(())
    }

    /// Names for the outputs, used in metric keys (`auroc.Cardiomegaly`).
    pub fn with_label_names<S: AsRef<str>>(mut self, names: &[S]) -> Result<Self> {
        if names.len() != self.net.task().outputs() {
            return Err(Error::InvalidConfig(format!(
                "{} label names for {} outputs",
                names.len(),
                self.net.task().outputs()
            )));
        }
        self.label_names = Some(names.iter().map(|n| n.as_ref().to_owned()).collect());
        Ok(self)
    }

    fn label_name(&self, i: usize) -> String {
        self.label_names
            .as_ref()
            .map_or_else(|| i.to_string(), |n| n[i].clone())
    }

    /// Logits for a batch of images (`[N, C, H, W]`, row-major), evaluation mode.
    pub fn forward(&self, images: &[f32], shape: [usize; 4]) -> Result<Vec<f32>> {
        let [_, c, h, w] = shape;
        self.net.check_input([c, h, w])?;
        if images.len() != shape.iter().product::<usize>() {
            return Err(Error::DimensionMismatch {
                expected: shape.iter().product(),
                got: images.len(),
            });
        }
        guarded(|| {
            let _guard = tch::no_grad_guard();
            let xs = self.input(images, shape);
            to_vec(&self.net.forward(&xs, false))
        })
    }

    fn input(&self, images: &[f32], shape: [usize; 4]) -> Tensor {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        Tensor::from_slice(images)
            .reshape(dims.as_slice())
            .to_device(self.vs.device())
    }

    fn targets(&self, targets: &Targets) -> Result<Tensor> {
        let device = self.vs.device();
        match (self.net.task(), targets) {
            (Task::MultiClass { classes }, Targets::Classes(c)) => {
                if let Some(bad) = c.iter().find(|&&t| t < 0 || t as usize >= classes) {
                    return Err(Error::InvalidInput(format!(
                        "class {bad} out of range for {classes} classes"
                    )));
                }
                Ok(Tensor::from_slice(c).to_device(device))
            }
            (Task::MultiLabel { labels }, Targets::MultiLabel { values, labels: l })
                if labels == *l =>
            {
                Ok(Tensor::from_slice(values)
                    .reshape([-1, labels as i64])
                    .to_device(device))
            }
            (task, _) => Err(Error::InvalidInput(format!(
                "targets do not fit the network's task {task:?}"
            ))),
        }
    }

    fn loss(&self, logits: &Tensor, targets: &Tensor) -> Tensor {
        match self.net.task() {
            Task::MultiClass { .. } => logits.cross_entropy_for_logits(targets),
            Task::MultiLabel { .. } => logits.binary_cross_entropy_with_logits::<Tensor>(
                targets,
                None,
                None,
                Reduction::Mean,
            ),
        }
    }

    /// Logits, targets and mean loss over a whole split (evaluation mode).
    pub fn predict(&mut self, data: &DataSplit, batch_size: usize) -> Result<Predictions> {
        self.net.check_input(data.image_shape())?;
        let mut logits = Vec::new();
        let mut all: Option<Targets> = None;
        let mut loss_sum = 0.0;
        let mut n = 0usize;
        for batch in data.batches(batch_size.max(1), None) {
            let Batch {
                images,
                shape,
                targets,
            } = batch?;
            let ys = self.targets(&targets)?;
            let (out, loss) = guarded(|| {
                let _guard = tch::no_grad_guard();
                let xs = self.input(&images, shape);
                let out = self.net.forward(&xs, false);
                let loss = self.loss(&out, &ys).double_value(&[]);
                Ok((to_vec(&out)?, loss))
            })?;
            loss_sum += loss * shape[0] as f64;
            n += shape[0];
            logits.extend(out);
            all = Some(match (all, targets) {
                (None, t) => t,
                (Some(Targets::Classes(mut a)), Targets::Classes(b)) => {
                    a.extend(b);
                    Targets::Classes(a)
                }
                (
                    Some(Targets::MultiLabel { mut values, labels }),
                    Targets::MultiLabel { values: v, .. },
                ) => {
                    values.extend(v);
                    Targets::MultiLabel { values, labels }
                }
                _ => {
                    return Err(Error::InvalidInput(
                        "batches with mixed target kinds".into(),
                    ));
                }
            });
        }
        let targets = all.ok_or_else(|| Error::InvalidInput("no images to evaluate".into()))?;
        let outputs = self.net.task().outputs();
        let bad = logits
            .chunks(outputs)
            .filter(|row| row.iter().any(|v| !v.is_finite()))
            .count();
        if bad > 0 {
            return Err(Error::Model(format!(
                "non-finite logits for {bad} of {n} images in evaluation mode (polynomial activations everywhere overflow with running statistics; see `Placement`)"
            )));
        }
        Ok(Predictions {
            logits,
            targets,
            loss: loss_sum / n as f64,
        })
    }

    /// Loads a PyTorch `state_dict` saved as safetensors (e.g. torchvision's
    /// `densenet121` weights). Every tensor of the model must be in the file
    /// with the same shape and F32, unless skipped; a missing or mismatched
    /// tensor is an error naming it, and the model is unchanged then.
    pub fn load_torchvision(&mut self, path: &Path, options: &LoadOptions) -> Result<()> {
        let bytes = std::fs::read(path)?;
        let fail = |reason: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let st = SafeTensors::deserialize(&bytes).map_err(|e| fail(e.to_string()))?;
        let skip = if options.skip.is_empty() {
            None
        } else {
            Some(self.layout.select(&options.skip)?)
        };
        let mut params = self.parameters();
        for (i, spec) in self.layout.tensors().iter().enumerate() {
            if skip.as_ref().is_some_and(|s| s.contains(i)) {
                continue;
            }
            let view = st
                .tensor(&spec.name)
                .map_err(|_| fail(format!("tensor `{}` is missing", spec.name)))?;
            let mut values = crate::checkpoint::decode_f32(&spec.name, &view)
                .map_err(|e| fail(e.to_string()))?;
            let got = view.shape();
            if got != spec.shape.as_slice() {
                let gray = options.rgb_to_gray
                    && i == 0
                    && got.len() == 4
                    && got[1] == 3
                    && spec.shape.len() == 4
                    && spec.shape[1] == 1
                    && got[0] == spec.shape[0]
                    && got[2..] == spec.shape[2..];
                if !gray {
                    return Err(fail(format!(
                        "tensor `{}` has shape {got:?}, the model needs {:?}",
                        spec.name, spec.shape
                    )));
                }
                // [out, 3, k, k] -> [out, 1, k, k]: sum the three input channels.
                let plane = got[2] * got[3];
                values = (0..got[0])
                    .flat_map(|o| {
                        let v = &values;
                        (0..plane).map(move |p| (0..3).map(|c| v[(o * 3 + c) * plane + p]).sum())
                    })
                    .collect();
            }
            params.tensor_mut(&spec.name)?.copy_from_slice(&values);
        }
        if !options.allow_unexpected
            && let Some(extra) = st
                .names()
                .into_iter()
                .find(|n| self.layout.position(n).is_none() && !n.ends_with(".num_batches_tracked"))
        {
            return Err(fail(format!(
                "tensor `{extra}` is not in the model (allow_unexpected to ignore it)"
            )));
        }
        if let Some(bad) = params.first_non_finite() {
            return Err(fail(format!(
                "non-finite value {} in `{}` at {}",
                bad.value, bad.tensor, bad.index
            )));
        }
        self.set_parameters(&params)
    }

    /// Writes the model as a PyTorch `state_dict` in safetensors, with a
    /// `num_batches_tracked` for every BatchNorm: torchvision's
    /// `densenet121(num_classes=...)` loads it with `load_state_dict(strict=True)`.
    pub fn save_torchvision(&self, path: &Path) -> Result<()> {
        let params = self.parameters();
        let scalars: Vec<(String, i64)> = self
            .layout
            .tensors()
            .iter()
            .filter_map(|s| s.name.strip_suffix(".running_mean"))
            .map(|prefix| {
                (
                    format!("{prefix}.num_batches_tracked"),
                    self.batches_tracked,
                )
            })
            .collect();
        let meta = [("format".to_owned(), "pt".to_owned())];
        let bytes = crate::checkpoint::to_safetensors_with_scalars(&params, meta, &scalars)?;
        crate::checkpoint::write_atomic(path, &bytes)
    }

    /// For each trainable tensor: its index, its value when training
    /// started (FedProx's anchor, when `mu > 0`) and its SCAFFOLD
    /// correction on the model's device (when given).
    fn gradient_terms(
        &self,
        mu: f64,
        correction: Option<&Parameters>,
    ) -> Result<Vec<GradientTerm>> {
        if let Some(c) = correction {
            self.layout.ensure_same(c.layout())?;
        }
        let device = self.vs.device();
        Ok(self
            .trainable_tensors()
            .into_iter()
            .map(|i| {
                let t = &self.tensors[i];
                let anchor = (mu > 0.0).then(|| t.detach().copy());
                let corr = correction.map(|c| {
                    Tensor::from_slice(&c.as_slice()[self.layout.range_at(i)])
                        .reshape(t.size())
                        .to_device(device)
                });
                (i, anchor, corr)
            })
            .collect())
    }

    fn train_epochs(
        &mut self,
        data: &DataSplit,
        config: &TrainConfig,
        correction: Option<&Parameters>,
    ) -> Result<(u64, f64, usize)> {
        let lr = config.learning_rate;
        let mu = config.proximal_mu;
        // FedProx adds mu * (w - w_start) and SCAFFOLD its correction to
        // each step's gradient; without either the step is libtorch's own.
        let terms = if mu > 0.0 || correction.is_some() {
            self.gradient_terms(mu, correction)?
        } else {
            Vec::new()
        };
        let mut opt = match config.optimizer {
            Optimizer::Sgd { momentum } => nn::Sgd {
                momentum,
                ..nn::Sgd::default()
            }
            .build(&self.vs, lr),
            Optimizer::Adam { beta1, beta2, eps } => nn::Adam {
                beta1,
                beta2,
                eps,
                wd: 0.0,
                amsgrad: false,
            }
            .build(&self.vs, lr),
        }
        .map_err(|e| Error::Model(e.to_string()))?;
        // Frozen BatchNorm runs on its running statistics: evaluation mode.
        let train = !self.frozen_statistics();
        let skip_single = train && self.net.has_batch_norm();
        let (mut seen, mut steps) = (0u64, 0usize);
        let mut last_epoch_loss = (0.0f64, 0u64);
        for epoch in 0..config.epochs {
            let seed = config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            last_epoch_loss = (0.0, 0);
            for batch in data.batches(config.batch_size, Some(seed)) {
                let Batch {
                    images,
                    shape,
                    targets,
                } = batch?;
                if skip_single && shape[0] < 2 {
                    continue;
                }
                let ys = self.targets(&targets)?;
                let loss = guarded(|| {
                    let xs = self.input(&images, shape);
                    let logits = self.net.forward(&xs, train);
                    let loss = self.loss(&logits, &ys);
                    if terms.is_empty() {
                        opt.backward_step(&loss);
                    } else {
                        opt.zero_grad();
                        loss.backward();
                        let _guard = tch::no_grad_guard();
                        for (i, anchor, corr) in &terms {
                            let w = &self.tensors[*i];
                            let mut g = w.grad();
                            if !g.defined() {
                                continue;
                            }
                            if let Some(w0) = anchor {
                                let _ = g
                                    .f_add_(&((w - w0) * mu))
                                    .map_err(|e| Error::Model(e.to_string()))?;
                            }
                            if let Some(c) = corr {
                                let _ = g.f_add_(c).map_err(|e| Error::Model(e.to_string()))?;
                            }
                        }
                        opt.step();
                    }
                    Ok(loss.double_value(&[]))
                })?;
                if !loss.is_finite() {
                    return Err(Error::Model(format!(
                        "training loss became {loss} at epoch {epoch}, step {steps}; lower the learning rate"
                    )));
                }
                self.batches_tracked += 1;
                steps += 1;
                seen += shape[0] as u64;
                last_epoch_loss.0 += loss * shape[0] as f64;
                last_epoch_loss.1 += shape[0] as u64;
            }
        }
        if steps == 0 {
            return Err(Error::InvalidInput(
                "no batch of at least two images to train on".into(),
            ));
        }
        Ok((
            seen,
            last_epoch_loss.0 / last_epoch_loss.1.max(1) as f64,
            steps,
        ))
    }
}

impl<N: Network> TchModel<N> {
    fn fit_with(
        &mut self,
        data: &DataSplit,
        config: &TrainConfig,
        correction: Option<&Parameters>,
    ) -> Result<FitOutput> {
        config.check()?;
        self.net.check_input(data.image_shape())?;
        let (seen, loss, steps) = self.train_epochs(data, config, correction)?;
        let mut metrics = Metrics::new();
        metrics.insert("loss".into(), loss);
        metrics.insert("steps".into(), steps as f64);
        Ok(FitOutput {
            privacy: Vec::new(),
            num_examples: seen / config.epochs as u64,
            metrics,
            steps: steps as u64,
        })
    }
}

/// A trainable tensor's index, FedProx anchor and SCAFFOLD correction.
type GradientTerm = (usize, Option<Tensor>, Option<Tensor>);

impl<N: Network> Model for TchModel<N> {
    type Data = DataSplit;

    fn parameters(&self) -> Parameters {
        let mut values = Vec::with_capacity(self.layout.len());
        for t in &self.tensors {
            match to_vec(t) {
                Ok(v) => values.extend(v),
                Err(e) => unreachable!("a float tensor converts to Vec<f32>: {e}"),
            }
        }
        Parameters::new(self.layout.clone(), values)
            .unwrap_or_else(|_| unreachable!("the layout was built from these tensors"))
    }

    fn set_parameters(&mut self, parameters: &Parameters) -> Result<()> {
        self.layout.ensure_same(parameters.layout())?;
        if let Some(bad) = parameters.first_non_finite() {
            return Err(Error::InvalidInput(format!(
                "non-finite parameter {} in `{}` at {}",
                bad.value, bad.tensor, bad.index
            )));
        }
        let device = self.vs.device();
        let _guard = tch::no_grad_guard();
        for (i, t) in self.tensors.iter_mut().enumerate() {
            let range = self.layout.range_at(i);
            let src = Tensor::from_slice(&parameters.as_slice()[range])
                .reshape(t.size())
                .to_device(device);
            t.copy_(&src);
        }
        Ok(())
    }

    fn fit(&mut self, data: &DataSplit, config: &TrainConfig) -> Result<FitOutput> {
        self.fit_with(data, config, None)
    }

    fn fit_corrected(
        &mut self,
        data: &DataSplit,
        config: &TrainConfig,
        correction: &Parameters,
    ) -> Result<FitOutput> {
        self.fit_with(data, config, Some(correction))
    }

    fn evaluate(&mut self, data: &DataSplit) -> Result<Evaluation> {
        let p = self.predict(data, 64)?;
        let mut m = Metrics::new();
        let n = p.targets.len();
        match &p.targets {
            Targets::Classes(c) => {
                let classes = self.net.task().outputs();
                if let Some(acc) = metrics::accuracy(&p.logits, c, classes)? {
                    m.insert("accuracy".into(), acc);
                }
            }
            Targets::MultiLabel { values, labels } => {
                let a = metrics::multilabel_auroc(&p.logits, values, *labels)?;
                for (i, v) in a.per_label.iter().enumerate() {
                    if let Some(v) = v {
                        m.insert(format!("auroc.{}", self.label_name(i)), *v);
                    }
                }
                if let Some(mean) = a.macro_mean {
                    m.insert("auroc_macro".into(), mean);
                }
                m.insert("auroc_defined".into(), a.defined() as f64);
            }
        }
        Ok(Evaluation {
            loss: p.loss,
            num_examples: n as u64,
            metrics: m,
        })
    }
}

/// Runs libtorch code, turning a panic (a shape libtorch rejects, an
/// out-of-memory) into [`Error::Model`] so that one bad batch does not bring
/// down a server running many clients.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "libtorch failed".into());
            let first = msg.lines().next().unwrap_or_default().to_owned();
            Err(Error::Model(first))
        }
    }
}

fn to_vec(t: &Tensor) -> Result<Vec<f32>> {
    let flat = t
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .reshape([-1]);
    Vec::<f32>::try_from(&flat).map_err(|e| Error::Model(e.to_string()))
}

fn cuda(n: usize) -> Result<Device> {
    if tch::Cuda::is_available() && n < tch::Cuda::device_count().max(0) as usize {
        Ok(Device::Cuda(n))
    } else {
        Err(Error::InvalidConfig(format!(
            "CUDA device {n} is not available (libtorch sees {} GPU(s))",
            tch::Cuda::device_count()
        )))
    }
}
