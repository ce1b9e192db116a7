//! A small CNN for MNIST-sized images: two 5x5 convolutions (16 and 32
//! channels, each followed by the activation, ReLU unless chosen otherwise,
//! and 2x2 max pooling) and two linear layers (128 hidden units). For 28 x
//! 28 inputs and 10 classes: 215 370 parameters.

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
    activation: Activation,
}

impl SmallCnn {
    /// For square images of `side` pixels (a multiple of 4, e.g. 28) with
    /// `in_channels` channels and `classes` classes.
    pub fn build(b: &mut Builder, in_channels: usize, side: usize, classes: usize) -> Result<Self> {
        if in_channels == 0 || classes == 0 || side < 4 || !side.is_multiple_of(4) {
            return Err(Error::InvalidConfig(format!(
                "SmallCnn needs channels and classes > 0 and a side that is a multiple of 4, got {in_channels}, {classes}, {side}"
            )));
        }
        let flat = 32 * (side / 4) * (side / 4);
        Ok(Self {
            in_channels,
            side,
            classes,
            conv1: b.conv("conv1", in_channels, 16, 5, true),
            conv2: b.conv("conv2", 16, 32, 5, true),
            fc1: b.linear("fc1", flat, 128, false),
            fc2: b.linear("fc2", 128, classes, false),
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

impl Network for SmallCnn {
    fn forward(&self, xs: &Tensor, _train: bool) -> Tensor {
        let act = |t: Tensor| self.activation.apply(&t);
        let x = act(self.conv1.forward(xs, 1, 2)).max_pool2d_default(2);
        let x = act(self.conv2.forward(&x, 1, 2)).max_pool2d_default(2);
        let x = act(self.fc1.forward(&x.flatten(1, -1)));
        self.fc2.forward(&x)
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
        let act = |t: Tensor| self.activation.apply(&t);
        let x = act(self.conv1.forward_traced(xs, 1, 2, trace)).max_pool2d_default(2);
        let x = act(self.conv2.forward_traced(&x, 1, 2, trace)).max_pool2d_default(2);
        let x = act(self.fc1.forward_traced(&x.flatten(1, -1), trace));
        Some(self.fc2.forward_traced(&x, trace))
    }
}
