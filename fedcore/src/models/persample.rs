//! Per-sample gradients, for sample-level DP-SGD (`fedcore-dp`).
//!
//! A network that implements [`Network::forward_traced`] records every
//! convolution and linear layer's input and output; one backward pass to
//! the outputs then gives each layer's per-sample gradient in closed form
//! (the technique of Opacus' grad samplers):
//!
//! - linear `y = x W^T + b`: `dW_i = g_i^T x_i`, `db_i = g_i`;
//! - convolution: `dW_i = g_i unfold(x_i)^T` over the output positions
//!   (`im2col`), `db_i = sum over positions of g_i`.
//!
//! Other networks take one backward pass per sample: correct for any
//! network without BatchNorm, and slower.

use tch::{Kind, Tensor};

use super::{Network, TchModel, guarded};
use crate::data::Targets;
use crate::error::{Error, Result};

/// Layers recorded by [`Network::forward_traced`].
#[derive(Debug, Default)]
pub struct Trace {
    pub(super) layers: Vec<TracedLayer>,
}

#[derive(Debug)]
pub(super) struct TracedLayer {
    /// Index of the weight among the model's tensors.
    pub(super) weight: usize,
    /// Index of the bias, if any.
    pub(super) bias: Option<usize>,
    pub(super) input: Tensor,
    pub(super) output: Tensor,
    /// `(kernel, stride, padding)` of a square convolution; `None` for linear.
    pub(super) conv: Option<(i64, i64, i64)>,
}

/// Per-sample gradients of a batch.
#[derive(Debug)]
pub struct PerSampleGradients {
    /// `[batch, trainable values]`: row `i` is the gradient of sample `i`'s
    /// loss, over the trainable tensors in layout order (buffers left out).
    pub grads: Tensor,
    /// Mean loss over the batch.
    pub loss: f64,
}

impl<N: Network> TchModel<N> {
    /// Layout indices of the trainable tensors (buffers left out), in order.
    pub fn trainable_tensors(&self) -> Vec<usize> {
        (0..self.tensors.len())
            .filter(|&i| !self.buffers[i])
            .collect()
    }

    /// Per-sample gradients of the loss for a batch of `images`
    /// (`shape = [N, C, H, W]`). Refuses networks with BatchNorm, whose
    /// training-mode output mixes the samples of a batch.
    pub fn per_sample_gradients(
        &self,
        images: &[f32],
        shape: [usize; 4],
        targets: &Targets,
    ) -> Result<PerSampleGradients> {
        if self.net.has_batch_norm() {
            return Err(Error::InvalidConfig(
                "per-sample gradients need a network without BatchNorm: batch statistics mix the samples of a batch, so no sample has a gradient of its own (use GroupNorm or no normalization)".into(),
            ));
        }
        if images.len() != shape.iter().product::<usize>() || shape[0] == 0 {
            return Err(Error::InvalidInput(format!(
                "{} values for a batch of shape {shape:?}",
                images.len()
            )));
        }
        self.net.check_input([shape[1], shape[2], shape[3]])?;
        let ys = self.targets(targets)?;
        guarded(|| {
            let xs = self.input(images, shape);
            let mut trace = Trace::default();
            match self.net.forward_traced(&xs, &mut trace) {
                Some(logits) => self.traced_gradients(&logits, &ys, &trace, shape[0]),
                None => self.looped_gradients(&xs, &ys, shape[0]),
            }
        })
    }

    /// Loss summed over the batch: its gradient at a sample's output is that
    /// sample's own gradient.
    fn loss_sum(&self, logits: &Tensor, ys: &Tensor) -> Tensor {
        self.loss(logits, ys) * logits.size()[0] as f64
    }

    fn traced_gradients(
        &self,
        logits: &Tensor,
        ys: &Tensor,
        trace: &Trace,
        b: usize,
    ) -> Result<PerSampleGradients> {
        let loss = self.loss_sum(logits, ys);
        let outputs: Vec<&Tensor> = trace.layers.iter().map(|l| &l.output).collect();
        let g_out = Tensor::run_backward(&[&loss], &outputs, false, false);
        let trainable = self.trainable_tensors();
        let mut offsets = vec![None; self.tensors.len()];
        let mut total = 0i64;
        for &i in &trainable {
            offsets[i] = Some(total);
            total += self.layout.range_at(i).len() as i64;
        }
        let bi = b as i64;
        let grads = Tensor::zeros([bi, total], (Kind::Float, self.vs.device()));
        let mut covered = vec![false; self.tensors.len()];
        for (layer, g) in trace.layers.iter().zip(&g_out) {
            let (dw, db) = match layer.conv {
                None => (
                    g.unsqueeze(2).matmul(&layer.input.unsqueeze(1)),
                    g.shallow_clone(),
                ),
                Some((k, stride, padding)) => {
                    let cols =
                        layer
                            .input
                            .im2col([k, k], [1, 1], [padding, padding], [stride, stride]);
                    let g = g.flatten(2, -1);
                    (
                        g.matmul(&cols.transpose(1, 2)),
                        g.sum_dim_intlist(2, false, Kind::Float),
                    )
                }
            };
            for (idx, part) in [(Some(layer.weight), dw), (layer.bias, db)] {
                let Some(idx) = idx else { continue };
                let off = offsets[idx]
                    .ok_or_else(|| Error::Model(format!("traced layer writes buffer #{idx}")))?;
                let len = self.layout.range_at(idx).len() as i64;
                grads.narrow(1, off, len).copy_(&part.reshape([bi, len]));
                covered[idx] = true;
            }
        }
        if let Some(&missing) = trainable.iter().find(|&&i| !covered[i]) {
            return Err(Error::Model(format!(
                "forward_traced did not record trainable tensor `{}`",
                self.layout.tensors()[missing].name
            )));
        }
        Ok(PerSampleGradients {
            grads,
            loss: loss.double_value(&[]) / b as f64,
        })
    }

    fn looped_gradients(&self, xs: &Tensor, ys: &Tensor, b: usize) -> Result<PerSampleGradients> {
        let params: Vec<&Tensor> = self
            .trainable_tensors()
            .into_iter()
            .map(|i| &self.tensors[i])
            .collect();
        let mut rows = Vec::with_capacity(b);
        let mut loss_sum = 0.0;
        for i in 0..b as i64 {
            let logits = self.net.forward(&xs.narrow(0, i, 1), true);
            let loss = self.loss_sum(&logits, &ys.narrow(0, i, 1));
            loss_sum += loss.double_value(&[]);
            let g = Tensor::run_backward(&[&loss], &params, false, false);
            let flat: Vec<Tensor> = g.iter().map(|t| t.reshape([-1])).collect();
            rows.push(Tensor::cat(&flat, 0));
        }
        Ok(PerSampleGradients {
            grads: Tensor::stack(&rows, 0),
            loss: loss_sum / b as f64,
        })
    }

    /// Per-sample gradients by one backward pass per sample, whatever the
    /// network: the reference the traced path is tested against.
    pub fn per_sample_gradients_looped(
        &self,
        images: &[f32],
        shape: [usize; 4],
        targets: &Targets,
    ) -> Result<PerSampleGradients> {
        if self.net.has_batch_norm() {
            return self.per_sample_gradients(images, shape, targets);
        }
        let ys = self.targets(targets)?;
        guarded(|| {
            let xs = self.input(images, shape);
            self.looped_gradients(&xs, &ys, shape[0])
        })
    }

    /// Subtracts `step` (over the trainable tensors, in the order of
    /// [`TchModel::per_sample_gradients`]'s columns) from the parameters.
    pub fn sub_trainable(&mut self, step: &[f32]) -> Result<()> {
        let trainable = self.trainable_tensors();
        let total: usize = trainable
            .iter()
            .map(|&i| self.layout.range_at(i).len())
            .sum();
        if step.len() != total {
            return Err(Error::DimensionMismatch {
                expected: total,
                got: step.len(),
            });
        }
        let device = self.vs.device();
        let _guard = tch::no_grad_guard();
        let mut off = 0;
        for i in trainable {
            let len = self.layout.range_at(i).len();
            let t = &mut self.tensors[i];
            let s = Tensor::from_slice(&step[off..off + len])
                .reshape(t.size())
                .to_device(device);
            let _ = t.f_sub_(&s).map_err(|e| Error::Model(e.to_string()))?;
            off += len;
        }
        Ok(())
    }
}
