//! DenseNet (Huang et al., 2017) as torchvision builds it, with average
//! pooling in the transitions, adaptive average pooling at the end, any input
//! size from 29 x 29 up, and a choice of activation.

use tch::{Kind, Tensor};

use super::layers::{Builder, Conv, Linear, Norm};
use super::{Network, Normalization, Task, Trace};
use crate::error::{Error, Result};

/// The non-linearity after a normalization layer (BatchNorm or GroupNorm).
///
/// `Square` (x²) and `Poly` (a x² + b x + c; `0.234, 0.5, 0.1875` is the
/// least-squares fit of ReLU on [-2, 2]) are the polynomials CKKS can
/// evaluate. What we measured on DenseNet-121 (docs/models.md):
///
/// - In training mode they train: every activation follows a BatchNorm that
///   uses the batch's own statistics, so the input to each square has unit
///   variance and the loss stays finite and falls (tested).
/// - With [`Placement::Everywhere`], inference with running statistics is
///   not stable: a small mismatch between running and batch statistics is
///   squared at each of the ~60 activations on the deepest path (a
///   polynomial of degree 2^60), and the square makes the features
///   heavy-tailed (running variances reach 10^3..10^13), so some images
///   overflow to NaN even after recalibrating the statistics. `evaluate`
///   reports that as an error instead of a NaN AUROC.
/// - [`Placement::Final`] keeps ReLU in the body and uses the polynomial only
///   on the last activation, the one whose output feeds the pooled linear
///   classifier (the head that `fedcore-he` encrypts). That trains and
///   evaluates as stably as ReLU, and it is the default for `Square`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    /// max(x, 0), as torchvision.
    Relu,
    /// x².
    Square,
    /// tanh(x): the tempered sigmoid Papernot et al. (2021) found to suit
    /// DP-SGD (bounded activations keep clipped gradients informative).
    Tanh,
    /// a x² + b x + c.
    Poly {
        /// Quadratic coefficient.
        a: f64,
        /// Linear coefficient.
        b: f64,
        /// Constant.
        c: f64,
    },
}

impl Activation {
    /// Applies the activation.
    pub fn apply(&self, xs: &Tensor) -> Tensor {
        match *self {
            Activation::Relu => xs.relu(),
            Activation::Square => xs.square(),
            Activation::Tanh => xs.tanh(),
            Activation::Poly { a, b, c } => xs.square() * a + xs * b + c,
        }
    }

    /// `relu`, `square`, `tanh` or `poly:a,b,c`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "relu" => Ok(Activation::Relu),
            "square" => Ok(Activation::Square),
            "tanh" => Ok(Activation::Tanh),
            other => {
                let coeffs: Option<Vec<f64>> = other
                    .strip_prefix("poly:")
                    .map(|c| c.split(',').map(|v| v.trim().parse().ok()).collect())
                    .and_then(|v: Option<Vec<f64>>| v);
                match coeffs.as_deref() {
                    Some(&[a, b, c]) if a.is_finite() && b.is_finite() && c.is_finite() => {
                        Ok(Activation::Poly { a, b, c })
                    }
                    _ => Err(Error::InvalidConfig(format!(
                        "unknown activation `{other}` (relu, square, tanh, poly:a,b,c)"
                    ))),
                }
            }
        }
    }
}

/// Where the configured activation is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// After every normalization (as torchvision uses ReLU).
    Everywhere,
    /// Only after the last normalization (`features.norm5`), ReLU elsewhere.
    #[default]
    Final,
}

/// The shape of a DenseNet.
#[derive(Debug, Clone, PartialEq)]
pub struct DenseNetConfig {
    /// Channels each layer adds (32 for DenseNet-121).
    pub growth_rate: usize,
    /// Layers per dense block (`[6, 12, 24, 16]` for DenseNet-121).
    pub block_config: Vec<usize>,
    /// Channels of the stem convolution (64).
    pub num_init_features: usize,
    /// Bottleneck width as a multiple of `growth_rate` (4).
    pub bn_size: usize,
    /// Input channels: 1 for X-rays, 3 for ImageNet weights.
    pub in_channels: usize,
    /// Outputs (14 for ChestX-ray14, 1000 for ImageNet).
    pub num_classes: usize,
    /// Multi-label (BCE with logits, AUROC) or multi-class (cross-entropy).
    pub multi_label: bool,
    /// The non-linearity.
    pub activation: Activation,
    /// Where it is used (ReLU elsewhere).
    pub placement: Placement,
    /// BatchNorm (torchvision's) or GroupNorm (for DP-SGD). The GroupNorm
    /// variant keeps torchvision's names: `norm*.weight` and `norm*.bias`
    /// (shape `[C]` either way) and every convolution and the classifier
    /// load from a torchvision file; its `running_mean`, `running_var` and
    /// `num_batches_tracked` have no counterpart and are skipped
    /// (`LoadOptions::allow_unexpected`).
    pub norm: Normalization,
}

impl DenseNetConfig {
    /// DenseNet-121: growth 32, blocks 6-12-24-16, 64 initial features,
    /// bottleneck 4x, compression 0.5; 14 labels, multi-label; `activation`
    /// everywhere for ReLU, only at the end ([`Placement::Final`]) otherwise.
    pub fn densenet121(in_channels: usize, activation: Activation) -> Self {
        Self {
            growth_rate: 32,
            block_config: vec![6, 12, 24, 16],
            num_init_features: 64,
            bn_size: 4,
            in_channels,
            num_classes: 14,
            multi_label: true,
            activation,
            placement: if activation == Activation::Relu {
                Placement::Everywhere
            } else {
                Placement::Final
            },
            norm: Normalization::Batch,
        }
    }

    /// [`DenseNetConfig::densenet121`] with GroupNorm (32 groups) in place
    /// of every BatchNorm: the variant sample-level DP-SGD trains.
    pub fn densenet121_group_norm(in_channels: usize, activation: Activation) -> Self {
        Self {
            norm: Normalization::Group { groups: 32 },
            ..Self::densenet121(in_channels, activation)
        }
    }

    /// Smallest input side this network accepts: every transition halves the
    /// feature map, which must stay at least 1 x 1.
    pub fn min_input_size(&self) -> usize {
        (1..4096)
            .find(|&s| spatial(s, self.block_config.len()).is_some())
            .unwrap_or(usize::MAX)
    }

    fn check(&self) -> Result<()> {
        let ok = self.growth_rate > 0
            && !self.block_config.is_empty()
            && self.block_config.iter().all(|&l| l > 0)
            && self.num_init_features > 0
            && self.bn_size > 0
            && self.in_channels > 0
            && self.num_classes > 0
            && self.norm != Normalization::Group { groups: 0 };
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidConfig(format!(
                "impossible DenseNet: {self:?}"
            )))
        }
    }
}

/// Side of the last feature map for an input side, `None` if it vanishes.
fn spatial(side: usize, blocks: usize) -> Option<usize> {
    // conv0: k7 s2 p3; pool0: k3 s2 p1; each transition: k2 s2.
    let s = (side + 6).checked_sub(7)? / 2 + 1;
    let mut s = (s + 2).checked_sub(3)? / 2 + 1;
    for _ in 1..blocks {
        s /= 2;
        if s == 0 {
            return None;
        }
    }
    Some(s)
}

#[derive(Debug)]
struct DenseLayer {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
}

#[derive(Debug)]
struct Transition {
    norm: Norm,
    conv: Conv,
}

/// DenseNet with torchvision's variable names (`features.conv0.weight`,
/// `features.denseblock1.denselayer1.norm1.weight`, ..., `classifier.bias`).
#[derive(Debug)]
pub struct DenseNet {
    config: DenseNetConfig,
    conv0: Conv,
    norm0: Norm,
    blocks: Vec<Vec<DenseLayer>>,
    transitions: Vec<Transition>,
    norm5: Norm,
    classifier: Linear,
}

impl DenseNet {
    /// Creates the variables (torchvision's initialization: He-normal
    /// convolutions, BatchNorm 1/0, zero classifier bias).
    pub fn build(b: &mut Builder, config: DenseNetConfig) -> Result<Self> {
        config.check()?;
        let conv0 = b.conv(
            "features.conv0",
            config.in_channels,
            config.num_init_features,
            7,
            false,
        );
        let kind = config.norm;
        let norm0 = b.norm("features.norm0", config.num_init_features, kind);
        let mut features = config.num_init_features;
        let mut blocks = Vec::new();
        let mut transitions = Vec::new();
        let width = config.bn_size * config.growth_rate;
        for (bi, &layers) in config.block_config.iter().enumerate() {
            let mut block = Vec::with_capacity(layers);
            for li in 0..layers {
                let p = format!("features.denseblock{}.denselayer{}", bi + 1, li + 1);
                let cin = features + li * config.growth_rate;
                block.push(DenseLayer {
                    norm1: b.norm(&format!("{p}.norm1"), cin, kind),
                    conv1: b.conv(&format!("{p}.conv1"), cin, width, 1, false),
                    norm2: b.norm(&format!("{p}.norm2"), width, kind),
                    conv2: b.conv(&format!("{p}.conv2"), width, config.growth_rate, 3, false),
                });
            }
            blocks.push(block);
            features += layers * config.growth_rate;
            if bi + 1 != config.block_config.len() {
                let p = format!("features.transition{}", bi + 1);
                transitions.push(Transition {
                    norm: b.norm(&format!("{p}.norm"), features, kind),
                    conv: b.conv(&format!("{p}.conv"), features, features / 2, 1, false),
                });
                features /= 2;
            }
        }
        let norm5 = b.norm("features.norm5", features, kind);
        let classifier = b.linear("classifier", features, config.num_classes, true);
        Ok(Self {
            config,
            conv0,
            norm0,
            blocks,
            transitions,
            norm5,
            classifier,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DenseNetConfig {
        &self.config
    }
}

impl DenseNet {
    /// The forward pass, every layer recorded when there is a trace.
    fn pass(&self, xs: &Tensor, train: bool, mut trace: Option<&mut Trace>) -> Tensor {
        let x = self.features_pass(xs, train, trace.as_deref_mut());
        self.head_pass(&x, train, trace)
    }

    /// The feature maps of the last dense block (before the final norm).
    fn features_pass(&self, xs: &Tensor, train: bool, mut trace: Option<&mut Trace>) -> Tensor {
        let act = |t: &Tensor| match self.config.placement {
            Placement::Everywhere => self.config.activation.apply(t),
            Placement::Final => t.relu(),
        };
        let mut x = self.conv0.run(xs, 2, 3, trace.as_deref_mut());
        x = act(&self.norm0.run(&x, train, trace.as_deref_mut()));
        x = x.max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for (bi, block) in self.blocks.iter().enumerate() {
            let mut features = vec![x];
            for layer in block {
                let input = Tensor::cat(&features, 1);
                let h = act(&layer.norm1.run(&input, train, trace.as_deref_mut()));
                let h = layer.conv1.run(&h, 1, 0, trace.as_deref_mut());
                let h = act(&layer.norm2.run(&h, train, trace.as_deref_mut()));
                features.push(layer.conv2.run(&h, 1, 1, trace.as_deref_mut()));
            }
            x = Tensor::cat(&features, 1);
            if let Some(t) = self.transitions.get(bi) {
                let h = act(&t.norm.run(&x, train, trace.as_deref_mut()));
                // Average pooling (not torchvision-in-tch's sum pooling).
                x = t.conv.run(&h, 1, 0, trace.as_deref_mut()).avg_pool2d(
                    [2, 2],
                    [2, 2],
                    [0, 0],
                    false,
                    true,
                    None,
                );
            }
        }
        x
    }

    /// From the last dense block's feature maps to the logits.
    fn head_pass(&self, x: &Tensor, train: bool, mut trace: Option<&mut Trace>) -> Tensor {
        let maps = self.final_maps(x, train, trace.as_deref_mut());
        self.classify(&maps, trace)
    }

    /// The last block's maps after the final norm and the activation: what
    /// the classifier sees, averaged (and what Grad-CAM weighs).
    fn final_maps(&self, x: &Tensor, train: bool, trace: Option<&mut Trace>) -> Tensor {
        self.config
            .activation
            .apply(&self.norm5.run(x, train, trace))
    }

    /// Global average pooling and the classifier.
    fn classify(&self, maps: &Tensor, trace: Option<&mut Trace>) -> Tensor {
        let x = maps.adaptive_avg_pool2d([1, 1]).flatten(1, -1);
        self.classifier.run(&x, trace)
    }
}

impl super::TchModel<DenseNet> {
    /// Grad-CAM (Selvaraju et al., ICCV 2017) on the last dense block's
    /// maps as the classifier sees them (after the final norm and
    /// activation), for one image (`[1, C, H, W]`, row-major) and each of `classes`: the
    /// block's feature maps weighted by the mean gradient of the class's
    /// logit over each map, summed, rectified, upsampled bilinearly to
    /// `H x W` and scaled to a maximum of 1 (all zeros when nothing
    /// speaks for the class). Evaluation mode; the parameters are not
    /// changed and no gradient is left on them.
    pub fn grad_cam(
        &self,
        image: &[f32],
        shape: [usize; 4],
        classes: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let [n, c, h, w] = shape;
        if n != 1 {
            return Err(Error::InvalidInput(format!(
                "Grad-CAM explains one image at a time, not {n}"
            )));
        }
        self.net.check_input([c, h, w])?;
        if image.len() != c * h * w {
            return Err(Error::DimensionMismatch {
                expected: c * h * w,
                got: image.len(),
            });
        }
        let outputs = self.net.task().outputs();
        if let Some(bad) = classes.iter().find(|&&k| k >= outputs) {
            return Err(Error::InvalidInput(format!(
                "class {bad} of a network with {outputs} outputs"
            )));
        }
        super::guarded(|| {
            let xs = self.input(image, shape);
            // The maps the classifier averages (after the final norm and
            // activation): with a linear classifier over their mean,
            // Grad-CAM on them is exactly CAM. Gradients flow from the
            // logits to these maps only.
            let features = tch::no_grad(|| {
                let x = self.net.features_pass(&xs, false, None);
                self.net.final_maps(&x, false, None)
            })
            .detach()
            .set_requires_grad(true);
            let logits = self.net.classify(&features, None);
            let mut maps = Vec::with_capacity(classes.len());
            for &k in classes {
                let score = logits.get(0).get(k as i64);
                let grads = Tensor::run_backward(&[&score], &[&features], true, false);
                let weights = grads[0].mean_dim(&[2i64, 3][..], true, Kind::Float);
                let cam = (&weights * &features)
                    .sum_dim_intlist(&[1i64][..], true, Kind::Float)
                    .relu()
                    .detach()
                    .upsample_bilinear2d([h as i64, w as i64], false, None, None);
                let max = cam.max().double_value(&[]);
                let cam = if max > 0.0 { cam / max } else { cam };
                maps.push(super::to_vec(&cam)?);
            }
            Ok(maps)
        })
    }
}

impl Network for DenseNet {
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        self.pass(xs, train, None)
    }

    /// Traced: every convolution, GroupNorm and the classifier. BatchNorm
    /// is not traced and runs on its running statistics (it must be frozen
    /// for per-sample gradients: [`TchModel::check_per_sample`]).
    ///
    /// [`TchModel::check_per_sample`]: super::TchModel::check_per_sample
    fn forward_traced(&self, xs: &Tensor, trace: &mut Trace) -> Option<Tensor> {
        let train = self.config.norm != Normalization::Batch;
        Some(self.pass(xs, train, Some(trace)))
    }

    fn task(&self) -> Task {
        if self.config.multi_label {
            Task::MultiLabel {
                labels: self.config.num_classes,
            }
        } else {
            Task::MultiClass {
                classes: self.config.num_classes,
            }
        }
    }

    fn check_input(&self, [c, h, w]: [usize; 3]) -> Result<()> {
        if c != self.config.in_channels {
            return Err(Error::InvalidInput(format!(
                "images have {c} channel(s), the DenseNet takes {}",
                self.config.in_channels
            )));
        }
        let min = self.config.min_input_size();
        if h < min || w < min {
            return Err(Error::InvalidInput(format!(
                "images of {h} x {w} are too small for this DenseNet (at least {min} x {min})"
            )));
        }
        Ok(())
    }

    fn has_batch_norm(&self) -> bool {
        self.config.norm == Normalization::Batch
    }

    fn head_patterns(&self) -> Vec<String> {
        vec!["classifier.*".into()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_sizes() {
        let c = DenseNetConfig::densenet121(1, Activation::Relu);
        assert_eq!(c.min_input_size(), 29);
        assert_eq!(spatial(224, 4), Some(7));
        assert_eq!(spatial(64, 4), Some(2));
        assert_eq!(spatial(28, 4), None);
    }

    #[test]
    fn activation_parsing() {
        assert_eq!(Activation::parse("square").unwrap(), Activation::Square);
        assert_eq!(
            Activation::parse("poly:0.25,0.5,0").unwrap(),
            Activation::Poly {
                a: 0.25,
                b: 0.5,
                c: 0.0
            }
        );
        assert!(Activation::parse("poly:1,2").is_err());
        assert_eq!(Activation::parse("tanh").unwrap(), Activation::Tanh);
        assert!(Activation::parse("sigmoid").is_err());
    }
}
