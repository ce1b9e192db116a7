//! Small CNNs for MNIST-sized images, in two layouts.
//!
//! - [`SmallCnn::build`]: two 5x5 convolutions (16 and 32 channels, each
//!   followed by the activation, ReLU unless chosen otherwise, and 2x2 max
//!   pooling) and two linear layers (128 hidden units). For 28 x 28 inputs
//!   and 10 classes: 215 370 parameters.
//! - [`SmallCnn::compact`]: the network of Papernot et al. (2021, "Tempered
//!   sigmoid activations for deep learning with differential privacy") and
//!   of Opacus' MNIST example: an 8x8 convolution with stride 2 (16
//!   channels), 2x2 max pooling with stride 1, a 4x4 convolution with
//!   stride 2 (32 channels), the same pooling, and two linear layers (32
//!   hidden units). For 28 x 28 inputs and 10 classes: 26 010 parameters.
//!   DP-SGD's noise grows with the number of trained coordinates, so the
//!   smaller network learns more at the same epsilon.

use tch::Tensor;

use super::Activation;
use super::layers::{Builder, Conv, Linear};
use super::{Network, Task, Trace};
use crate::error::{Error, Result};

/// The small CNN (`conv1`, `conv2`, `fc1`, `fc2`).
#[derive(Debug)]
pub struct SmallCnn {
    in_channels: usize,
    side: usize,
    classes: usize,
    conv1: Conv,
    conv2: Conv,
    fc1: Linear,
    fc2: Linear,
    layout: Layout,
    activation: Activation,
}

/// Strides, paddings and pooling of the two layouts.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Stride and padding of each convolution.
    conv: [(i64, i64); 2],
    /// Max pooling's stride (its window is 2x2).
    pool_stride: i64,
}

impl Layout {
    const WIDE: Layout = Layout {
        conv: [(1, 2), (1, 2)],
        pool_stride: 2,
    };
    const COMPACT: Layout = Layout {
        conv: [(2, 3), (2, 0)],
        pool_stride: 1,
    };

    /// The side of the second pooling's output, if the input is big enough.
    fn side_after(self, side: usize, kernels: [usize; 2]) -> Option<usize> {
        let mut n = side as i64;
        for ((stride, pad), k) in self.conv.into_iter().zip(kernels) {
            let k = k as i64;
            if n + 2 * pad < k {
                return None;
            }
            n = (n + 2 * pad - k) / stride + 1;
            if n < 2 {
                return None;
            }
            n = (n - 2) / self.pool_stride + 1;
        }
        usize::try_from(n).ok()
    }
}

impl SmallCnn {
    /// The wide layout for square images of `side` pixels (a multiple of 4,
    /// e.g. 28) with `in_channels` channels and `classes` classes.
    pub fn build(b: &mut Builder, in_channels: usize, side: usize, classes: usize) -> Result<Self> {
        if side < 4 || !side.is_multiple_of(4) {
            return Err(Error::InvalidConfig(format!(
                "SmallCnn needs a side that is a multiple of 4, got {side}"
            )));
        }
        Self::with_layout(b, Layout::WIDE, [5, 5], 128, (in_channels, side, classes))
    }

    /// The compact layout of Papernot et al. and Opacus' MNIST example (see
    /// the module's documentation) for square images of at least 10 pixels a
    /// side, with `in_channels` channels and `classes` classes. Its
    /// activation is tanh, the tempered sigmoid those authors chose for
    /// DP-SGD ([`SmallCnn::with_activation`] changes it).
    pub fn compact(
        b: &mut Builder,
        in_channels: usize,
        side: usize,
        classes: usize,
    ) -> Result<Self> {
        Ok(
            Self::with_layout(b, Layout::COMPACT, [8, 4], 32, (in_channels, side, classes))?
                .with_activation(Activation::Tanh),
        )
    }

    fn with_layout(
        b: &mut Builder,
        layout: Layout,
        kernels: [usize; 2],
        hidden: usize,
        (in_channels, side, classes): (usize, usize, usize),
    ) -> Result<Self> {
        let out = layout.side_after(side, kernels).filter(|n| *n > 0);
        let (Some(out), true) = (out, in_channels > 0 && classes > 0) else {
            return Err(Error::InvalidConfig(format!(
                "SmallCnn needs channels and classes > 0 and images large enough for its layout, got {in_channels} channels, {classes} classes, side {side}"
            )));
        };
        let flat = 32 * out * out;
        Ok(Self {
            in_channels,
            side,
            classes,
            conv1: b.conv("conv1", in_channels, 16, kernels[0], true),
            conv2: b.conv("conv2", 16, 32, kernels[1], true),
            fc1: b.linear("fc1", flat, hidden, false),
            fc2: b.linear("fc2", hidden, classes, false),
            layout,
            activation: Activation::Relu,
        })
    }

    /// The same network with another activation after each hidden layer
    /// (e.g. [`Activation::Tanh`] for DP-SGD).
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }
}

impl SmallCnn {
    /// The forward pass, recorded in `trace` when there is one.
    fn run(&self, xs: &Tensor, mut trace: Option<&mut Trace>) -> Tensor {
        let act = |t: Tensor| self.activation.apply(&t);
        let s = self.layout.pool_stride;
        let pool = |t: Tensor| t.max_pool2d([2, 2], [s, s], [0, 0], [1, 1], false);
        let [(s1, p1), (s2, p2)] = self.layout.conv;
        let x = pool(act(self.conv1.run(xs, s1, p1, trace.as_deref_mut())));
        let x = pool(act(self.conv2.run(&x, s2, p2, trace.as_deref_mut())));
        let x = act(self.fc1.run(&x.flatten(1, -1), trace.as_deref_mut()));
        self.fc2.run(&x, trace)
    }
}

impl Network for SmallCnn {
    fn forward(&self, xs: &Tensor, _train: bool) -> Tensor {
        self.run(xs, None)
    }

    fn task(&self) -> Task {
        Task::MultiClass {
            classes: self.classes,
        }
    }

    fn check_input(&self, shape: [usize; 3]) -> Result<()> {
        let want = [self.in_channels, self.side, self.side];
        if shape == want {
            Ok(())
        } else {
            Err(Error::InvalidInput(format!(
                "images of shape {shape:?}, the CNN takes {want:?}"
            )))
        }
    }

    fn has_batch_norm(&self) -> bool {
        false
    }

    fn head_patterns(&self) -> Vec<String> {
        vec!["fc2.*".into()]
    }

    fn forward_traced(&self, xs: &Tensor, trace: &mut Trace) -> Option<Tensor> {
        Some(self.run(xs, Some(trace)))
    }
}
