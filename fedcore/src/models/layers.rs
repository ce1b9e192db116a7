//! The layers a [`Network`] is written with: a [`Builder`] creates each
//! variable under torchvision's name, in `state_dict` order, seeded; the layer
//! types hold the variables and run the forward pass (traced for per-sample
//! gradients where the layer supports it).

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use tch::{Tensor, nn};

use super::persample::LayerKind;
use super::{Device, Normalization, Trace};
use crate::params::TensorSpec;

#[cfg(doc)]
use super::Network;

/// How a variable starts.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// All equal to this value.
    Const(f32),
    /// He/Kaiming normal for ReLU: `N(0, 2 / fan_in)`.
    KaimingNormal {
        /// Inputs per output.
        fan_in: usize,
    },
    /// PyTorch's default for `Linear`/`Conv`: `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
    TorchUniform {
        /// Inputs per output.
        fan_in: usize,
    },
}

/// Creates a network's variables in order, under torchvision's names.
pub struct Builder {
    pub(super) vs: nn::VarStore,
    pub(super) specs: Vec<TensorSpec>,
    pub(super) tensors: Vec<Tensor>,
    pub(super) buffers: Vec<bool>,
    rng: ChaCha8Rng,
}

impl Builder {
    pub(super) fn new(device: Device, seed: u64) -> Self {
        Self {
            vs: nn::VarStore::new(device.into()),
            specs: Vec::new(),
            tensors: Vec::new(),
            buffers: Vec::new(),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    fn add(&mut self, name: &str, shape: &[usize], init: Init, trainable: bool) -> Tensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match init {
            Init::Const(c) => vec![c; n],
            Init::KaimingNormal { fan_in } => {
                let std = (2.0 / fan_in.max(1) as f64).sqrt() as f32;
                let d = Normal::new(0.0, std).unwrap_or_else(|_| unreachable!("std > 0"));
                (0..n).map(|_| d.sample(&mut self.rng)).collect()
            }
            Init::TorchUniform { fan_in } => {
                let b = (1.0 / fan_in.max(1) as f64).sqrt() as f32;
                let d = Uniform::new_inclusive(-b, b).unwrap_or_else(|_| unreachable!("b > 0"));
                (0..n).map(|_| d.sample(&mut self.rng)).collect()
            }
        };
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        let t = Tensor::from_slice(&values)
            .reshape(dims.as_slice())
            .to_device(self.vs.device());
        let mut parts: Vec<&str> = name.split('.').collect();
        let last = parts.pop().unwrap_or(name);
        let mut path = self.vs.root();
        for p in parts {
            path = &path / p;
        }
        let t = path.add(last, t, trainable);
        self.specs.push(TensorSpec::new(name, shape.to_vec()));
        self.tensors.push(t.shallow_clone());
        self.buffers.push(!trainable);
        t
    }

    /// A trainable parameter.
    pub fn param(&mut self, name: &str, shape: &[usize], init: Init) -> Tensor {
        self.add(name, shape, init, true)
    }

    /// A buffer (not trained by the optimizer, e.g. BatchNorm running statistics).
    pub fn buffer(&mut self, name: &str, shape: &[usize], value: f32) -> Tensor {
        self.add(name, shape, Init::Const(value), false)
    }

    /// A 2-d convolution's weight (`[out, in, k, k]`, He init) and optional bias.
    pub fn conv(&mut self, name: &str, cin: usize, cout: usize, k: usize, bias: bool) -> Conv {
        let fan_in = cin * k * k;
        let weight = self.param(
            &format!("{name}.weight"),
            &[cout, cin, k, k],
            Init::KaimingNormal { fan_in },
        );
        let bias = bias.then(|| {
            self.param(
                &format!("{name}.bias"),
                &[cout],
                Init::TorchUniform { fan_in },
            )
        });
        let index = self.tensors.len() - 1 - usize::from(bias.is_some());
        Conv {
            weight,
            bias,
            index,
        }
    }

    /// A BatchNorm2d: weight 1, bias 0, running mean 0, running variance 1.
    pub fn batch_norm(&mut self, name: &str, c: usize) -> BatchNorm {
        BatchNorm {
            weight: self.param(&format!("{name}.weight"), &[c], Init::Const(1.0)),
            bias: self.param(&format!("{name}.bias"), &[c], Init::Const(0.0)),
            running_mean: self.buffer(&format!("{name}.running_mean"), &[c], 0.0),
            running_var: self.buffer(&format!("{name}.running_var"), &[c], 1.0),
        }
    }

    /// A GroupNorm over `c` channels in `groups` groups (which must divide
    /// `c`): weight 1, bias 0, under BatchNorm's names (`.weight`, `.bias`).
    pub fn group_norm(&mut self, name: &str, c: usize, groups: usize) -> GroupNorm {
        let weight = self.param(&format!("{name}.weight"), &[c], Init::Const(1.0));
        let bias = self.param(&format!("{name}.bias"), &[c], Init::Const(0.0));
        GroupNorm {
            weight,
            bias,
            groups: groups as i64,
            index: self.tensors.len() - 2,
        }
    }

    /// The normalization `kind` asks for over `c` channels; GroupNorm uses
    /// the largest group count that divides `c` and is at most the one asked
    /// (at least 1: `groups: 0` is taken as 1 here, and refused by
    /// `DenseNetConfig`).
    pub fn norm(&mut self, name: &str, c: usize, kind: Normalization) -> Norm {
        match kind {
            Normalization::Batch => Norm::Batch(self.batch_norm(name, c)),
            Normalization::Group { groups } => {
                let g = (1..=groups.clamp(1, c))
                    .rev()
                    .find(|g| c.is_multiple_of(*g))
                    .unwrap_or(1);
                Norm::Group(self.group_norm(name, c, g))
            }
        }
    }

    /// A linear layer, PyTorch's default init; `zero_bias` as torchvision's DenseNet does.
    pub fn linear(&mut self, name: &str, fin: usize, fout: usize, zero_bias: bool) -> Linear {
        let weight = self.param(
            &format!("{name}.weight"),
            &[fout, fin],
            Init::TorchUniform { fan_in: fin },
        );
        let init = if zero_bias {
            Init::Const(0.0)
        } else {
            Init::TorchUniform { fan_in: fin }
        };
        let bias = self.param(&format!("{name}.bias"), &[fout], init);
        Linear {
            weight,
            bias,
            index: self.tensors.len() - 2,
        }
    }
}

/// Convolution variables.
#[derive(Debug)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    /// Position of the weight among the model's tensors (the bias follows).
    index: usize,
}

impl Conv {
    /// `conv2d` with the given stride and padding.
    pub fn forward(&self, xs: &Tensor, stride: i64, padding: i64) -> Tensor {
        xs.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [stride],
            [padding],
            [1],
            1,
        )
    }

    /// [`Conv::forward`], recorded in `trace`.
    pub fn forward_traced(
        &self,
        xs: &Tensor,
        stride: i64,
        padding: i64,
        trace: &mut Trace,
    ) -> Tensor {
        let out = self.forward(xs, stride, padding);
        let kind = LayerKind::Conv {
            kernel: self.weight.size()[2],
            stride,
            padding,
        };
        trace.record(self.index, self.bias.is_some(), xs, &out, kind);
        out
    }

    /// [`Conv::forward`], recorded when there is a trace.
    pub(super) fn run(
        &self,
        xs: &Tensor,
        stride: i64,
        padding: i64,
        trace: Option<&mut Trace>,
    ) -> Tensor {
        match trace {
            Some(t) => self.forward_traced(xs, stride, padding, t),
            None => self.forward(xs, stride, padding),
        }
    }
}

/// BatchNorm2d variables (momentum 0.1, eps 1e-5, as PyTorch).
#[derive(Debug)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl BatchNorm {
    /// Normalizes with batch statistics (and updates the running ones) when
    /// `train`, with the running statistics otherwise.
    pub fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        xs.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            0.1,
            1e-5,
            true,
        )
    }
}

/// Linear layer variables.
#[derive(Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
    /// Position of the weight among the model's tensors (the bias follows).
    index: usize,
}

impl Linear {
    /// `xs W^T + b`.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.linear(&self.weight, Some(&self.bias))
    }

    /// [`Linear::forward`] on `[N, in]`, recorded in `trace`.
    pub fn forward_traced(&self, xs: &Tensor, trace: &mut Trace) -> Tensor {
        let out = self.forward(xs);
        trace.record(self.index, true, xs, &out, LayerKind::Linear);
        out
    }

    /// [`Linear::forward`], recorded when there is a trace.
    pub(super) fn run(&self, xs: &Tensor, trace: Option<&mut Trace>) -> Tensor {
        match trace {
            Some(t) => self.forward_traced(xs, t),
            None => self.forward(xs),
        }
    }
}

/// GroupNorm variables (eps 1e-5, as PyTorch's `nn.GroupNorm`): each
/// sample's channels are split into `groups` groups, each normalized by its
/// own mean and variance, then scaled and shifted per channel. Unlike
/// BatchNorm it never mixes the samples of a batch, so every sample keeps a
/// gradient of its own (what DP-SGD needs); it has no running statistics.
#[derive(Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    /// Position of the weight among the model's tensors (the bias follows).
    index: usize,
}

impl GroupNorm {
    /// The number of groups.
    pub fn groups(&self) -> usize {
        self.groups as usize
    }

    /// `group_norm` with the layer's weight and bias.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            1e-5,
            true,
        )
    }

    /// [`GroupNorm::forward`], recorded in `trace`: a sample's gradient of
    /// the weight is the sum over positions of its output gradient times its
    /// normalized input (recomputed from the input when needed, so the trace
    /// holds no tensor the forward graph does not already hold).
    pub fn forward_traced(&self, xs: &Tensor, trace: &mut Trace) -> Tensor {
        let out = self.forward(xs);
        let kind = LayerKind::GroupNorm {
            groups: self.groups,
        };
        trace.record(self.index, true, xs, &out, kind);
        out
    }
}

/// A normalization layer: what [`Normalization`] chose.
#[derive(Debug)]
pub enum Norm {
    /// BatchNorm2d.
    Batch(BatchNorm),
    /// GroupNorm.
    Group(GroupNorm),
}

impl Norm {
    /// The layer's forward pass (`train` selects BatchNorm's batch statistics).
    pub fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Norm::Batch(n) => n.forward(xs, train),
            Norm::Group(n) => n.forward(xs),
        }
    }

    /// The forward pass in training mode, recorded when there is a trace
    /// (GroupNorm; BatchNorm is never traced: it has no per-sample gradient).
    pub(super) fn run(&self, xs: &Tensor, train: bool, trace: Option<&mut Trace>) -> Tensor {
        match (self, trace) {
            (Norm::Group(n), Some(t)) => n.forward_traced(xs, t),
            _ => self.forward(xs, train),
        }
    }
}
