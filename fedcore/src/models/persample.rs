//! Per-sample gradients, for sample-level DP-SGD (`fedcore-dp`).
//!
//! A network that implements [`Network::forward_traced`] records every
//! convolution, GroupNorm and linear layer's input and output; one backward pass to
//! the outputs then gives each layer's per-sample gradient in closed form
//! (the technique of Opacus' grad samplers):
//!
//! - linear `y = x W^T + b`: `dW_i = g_i^T x_i`, `db_i = g_i`;
//! - convolution: `dW_i = g_i unfold(x_i)^T` over the output positions
//!   (`im2col`), `db_i = sum over positions of g_i`;
//! - GroupNorm's per-channel scale and shift `y = x̂ w + b` (`x̂` the
//!   normalized input): `dw_i = sum over positions of g_i x̂_i`,
//!   `db_i = sum over positions of g_i`.
//!
//! Other networks take one backward pass per sample: correct for any
//! network without BatchNorm, and slower.

use tch::{Kind, Tensor};

use super::{Network, TchModel, guarded, to_vec};
use crate::data::Targets;
use crate::error::{Error, Result};

/// Layers recorded by [`Network::forward_traced`].
#[derive(Debug, Default)]
pub struct Trace {
    layers: Vec<TracedLayer>,
    /// Tensors not trained (frozen, or buffers): a layer whose weight is one
    /// is not recorded, so that its activations are freed as the forward
    /// pass goes on.
    untrained: Vec<bool>,
}

impl Trace {
    /// Records a layer whose weight is tensor `weight` of the model (its
    /// bias, if it has one, the next tensor), with its input and output.
    pub(super) fn record(
        &mut self,
        weight: usize,
        has_bias: bool,
        input: &Tensor,
        output: &Tensor,
        kind: LayerKind,
    ) {
        if self.untrained.get(weight).copied().unwrap_or(false) {
            return;
        }
        self.layers.push(TracedLayer {
            weight,
            bias: has_bias.then_some(weight + 1),
            input: input.shallow_clone(),
            output: output.shallow_clone(),
            kind,
        });
    }
}

#[derive(Debug)]
struct TracedLayer {
    /// Index of the weight among the model's tensors.
    weight: usize,
    /// Index of the bias, if any.
    bias: Option<usize>,
    input: Tensor,
    output: Tensor,
    kind: LayerKind,
}

/// How a traced layer maps its input to its output, which decides the
/// closed form of its per-sample gradients.
#[derive(Debug, Clone, Copy)]
pub(super) enum LayerKind {
    /// `y = x W^T + b` on `[N, in]`.
    Linear,
    /// A square 2-d convolution.
    Conv {
        kernel: i64,
        stride: i64,
        padding: i64,
    },
    /// GroupNorm: `y[n, c, ..] = x̂[n, c, ..] * w[c] + b[c]`, `x̂` the input
    /// normalized per sample and group.
    GroupNorm { groups: i64 },
}

impl TracedLayer {
    /// The input unfolded for a square convolution of `[kernel, stride,
    /// padding]`: `[N, in k k, positions]` (`im2col`).
    fn unfold(&self, [kernel, stride, padding]: [i64; 3]) -> Tensor {
        if (kernel, stride, padding) == (1, 1, 0) {
            // A 1x1 convolution (most of DenseNet's) reads its input as is.
            return self.input.flatten(2, -1);
        }
        self.input.im2col(
            [kernel, kernel],
            [1, 1],
            [padding, padding],
            [stride, stride],
        )
    }

    /// Per-sample gradients of the weight and bias as `[N, ...]`, from the
    /// gradient `g` at the layer's output.
    fn stored(&self, g: &Tensor) -> (Tensor, Tensor) {
        match self.kind {
            LayerKind::Linear => (
                g.unsqueeze(2).matmul(&self.input.unsqueeze(1)),
                g.shallow_clone(),
            ),
            LayerKind::Conv {
                kernel,
                stride,
                padding,
            } => {
                let cols = self.unfold([kernel, stride, padding]);
                let g = g.flatten(2, -1);
                (
                    g.matmul(&cols.transpose(1, 2)),
                    g.sum_dim_intlist(2, false, Kind::Float),
                )
            }
            LayerKind::GroupNorm { groups } => {
                let positions = [2i64, 3].as_slice();
                let normalized = tch::no_grad(|| {
                    self.input
                        .group_norm(groups, None::<Tensor>, None::<Tensor>, 1e-5, false)
                });
                (
                    (g * normalized).sum_dim_intlist(positions, false, Kind::Float),
                    g.sum_dim_intlist(positions, false, Kind::Float),
                )
            }
        }
    }
}

/// The sum of a batch's per-sample gradients, each clipped to an L2 norm.
#[derive(Debug, Clone)]
pub struct ClippedGradientSum {
    /// `sum_i g_i * min(1, C / ||g_i||)` over the trainable tensors, in the
    /// order of [`TchModel::trainable_tensors`].
    pub sum: Vec<f32>,
    /// `||g_i||` before clipping, per sample.
    pub norms: Vec<f32>,
    /// Mean loss over the batch.
    pub loss: f64,
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

/// Where each trainable tensor sits in a flat vector over the trainable
/// tensors (layout order, buffers left out), and which ones a traced pass
/// has filled.
struct Columns {
    offsets: Vec<Option<usize>>,
    total: usize,
    filled: Vec<bool>,
}

impl Columns {
    /// The columns of tensor `idx`, marked filled; an error for a buffer.
    fn slot(&mut self, idx: usize, len: usize) -> Result<std::ops::Range<usize>> {
        let off = self.offsets[idx]
            .ok_or_else(|| Error::Model(format!("traced layer writes buffer #{idx}")))?;
        self.filled[idx] = true;
        Ok(off..off + len)
    }
}

/// Whether a convolution's per-sample gradient norm is cheaper by ghost norm
/// than by forming the gradient, layer by layer as in Bu et al. 2022's mixed
/// ghost clipping. With `T` output positions and `d = in k k`, the ghost
/// norm's two `T x T` Gram matrices cost `T^2 (out + d)` per sample and
/// forming `G^T X` costs `T out d`; we choose by that time, `T (out + d) <
/// out d`. (Bu et al. choose by space, `2 T^2 < out d`; on DenseNet-121 at
/// 64 x 64 the time rule stores block 2's gradients too, which measured
/// faster and, since they are small, no larger at peak: docs/benchmarks.md.)
fn ghost_is_cheaper(g: &Tensor, input: &Tensor, kernel: i64) -> bool {
    let (gs, is) = (g.size(), input.size());
    let positions = gs[2..].iter().product::<i64>();
    let (out, d) = (gs[1], is[1] * kernel * kernel);
    positions * (out + d) < out * d
}

impl<N: Network> TchModel<N> {
    fn columns(&self) -> Columns {
        let mut offsets = vec![None; self.tensors.len()];
        let mut total = 0;
        for i in self.trainable_tensors() {
            offsets[i] = Some(total);
            total += self.layout.range_at(i).len();
        }
        Columns {
            offsets,
            total,
            filled: vec![false; self.tensors.len()],
        }
    }

    /// Every trainable tensor must have been recorded by `forward_traced`.
    fn ensure_filled(&self, cols: &Columns) -> Result<()> {
        match (0..self.tensors.len()).find(|&i| cols.offsets[i].is_some() && !cols.filled[i]) {
            Some(missing) => Err(Error::Model(format!(
                "forward_traced did not record trainable tensor `{}`",
                self.layout.tensors()[missing].name
            ))),
            None => Ok(()),
        }
    }

    /// The traced layers whose weight is trainable, each with its bias if
    /// that is trainable too: a frozen layer has no gradient to compute
    /// (and, below every trainable layer, no graph to run backward through).
    fn trainable_layers<'t>(
        trace: &'t Trace,
        cols: &Columns,
    ) -> Vec<(&'t TracedLayer, Option<usize>)> {
        trace
            .layers
            .iter()
            .filter(|l| cols.offsets[l.weight].is_some())
            .map(|l| (l, l.bias.filter(|&b| cols.offsets[b].is_some())))
            .collect()
    }

    /// Checks the batch, then runs the traced forward pass and `traced` on
    /// its logits, or `looped` on the inputs when the network does not trace.
    fn with_trace<T>(
        &self,
        images: &[f32],
        shape: [usize; 4],
        targets: &Targets,
        traced: impl FnOnce(&Tensor, &Tensor, &Trace) -> Result<T>,
        looped: impl FnOnce(&Tensor, &Tensor) -> Result<T>,
    ) -> Result<T> {
        self.per_sample_checks(images, shape)?;
        let ys = self.targets(targets)?;
        guarded(|| {
            let xs = self.input(images, shape);
            let mut trace = Trace {
                layers: Vec::new(),
                untrained: (0..self.tensors.len())
                    .map(|i| self.buffers[i] || self.frozen[i])
                    .collect(),
            };
            match self.net.forward_traced(&xs, &mut trace) {
                Some(logits) => traced(&logits, &ys, &trace),
                None => looped(&xs, &ys),
            }
        })
    }

    /// Layout indices of the trainable tensors (buffers and frozen tensors
    /// left out), in order.
    pub fn trainable_tensors(&self) -> Vec<usize> {
        (0..self.tensors.len())
            .filter(|&i| !self.buffers[i] && !self.frozen[i])
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
        let b = shape[0];
        self.with_trace(
            images,
            shape,
            targets,
            |logits, ys, trace| self.traced_gradients(logits, ys, trace, b),
            |xs, ys| self.looped_gradients(xs, ys, b),
        )
    }

    /// The sum of the batch's per-sample gradients, each first clipped to L2
    /// norm `max_norm` (the core of a DP-SGD step).
    ///
    /// For traced networks the per-sample gradients are never stored whole:
    /// a linear layer's per-sample norm is `||g_i|| ||x_i||` (its gradient is
    /// the outer product), and its clipped sum one matrix product
    /// `(c * g)^T x`; a convolution with few output positions takes the ghost
    /// norm (two Gram matrices over positions) and its clipped sum is one
    /// product over every sample's positions; other convolutions and
    /// GroupNorm store their per-sample gradients (the choice per layer is
    /// by cost, see `ghost_is_cheaper`). Other networks go through
    /// [`TchModel::per_sample_gradients`].
    pub fn clipped_gradient_sum(
        &self,
        images: &[f32],
        shape: [usize; 4],
        targets: &Targets,
        max_norm: f64,
    ) -> Result<ClippedGradientSum> {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(Error::InvalidConfig(format!(
                "clipping norm must be positive and finite, got {max_norm}"
            )));
        }
        let b = shape[0];
        self.with_trace(
            images,
            shape,
            targets,
            |logits, ys, trace| self.traced_clipped_sum(logits, ys, trace, b, max_norm),
            |xs, ys| {
                let ps = self.looped_gradients(xs, ys, b)?;
                let norms = ps.grads.norm_scalaropt_dim(2, [1], false);
                let factor = (max_norm / (&norms + 1e-6)).clamp_max(1.0);
                let sum = (&ps.grads * factor.unsqueeze(1)).sum_dim_intlist(0, false, Kind::Float);
                Ok(ClippedGradientSum {
                    sum: to_vec(&sum)?,
                    norms: to_vec(&norms)?,
                    loss: ps.loss,
                })
            },
        )
    }

    fn per_sample_checks(&self, images: &[f32], shape: [usize; 4]) -> Result<()> {
        self.check_per_sample()?;
        if self.trainable_values() == 0 {
            return Err(Error::InvalidConfig(
                "every tensor is frozen: there is no gradient to compute".into(),
            ));
        }
        if images.len() != shape.iter().product::<usize>() || shape[0] == 0 {
            return Err(Error::InvalidInput(format!(
                "{} values for a batch of shape {shape:?}",
                images.len()
            )));
        }
        self.net.check_input([shape[1], shape[2], shape[3]])
    }

    fn traced_clipped_sum(
        &self,
        logits: &Tensor,
        ys: &Tensor,
        trace: &Trace,
        b: usize,
        max_norm: f64,
    ) -> Result<ClippedGradientSum> {
        enum Part {
            /// A linear layer: its per-sample gradient is an outer product.
            Outer { g: Tensor, x: Tensor },
            /// A convolution by ghost norm: output gradients `[N, out, T]`
            /// (its unfolded input is recomputed rather than kept).
            Ghost { g: Tensor, conv: [i64; 3] },
            /// Per-sample gradients stored whole, `[N, ..]`.
            Stored { dw: Tensor, db: Tensor },
        }
        let loss = self.loss_sum(logits, ys);
        let mut cols = self.columns();
        let layers = Self::trainable_layers(trace, &cols);
        let outputs: Vec<&Tensor> = layers.iter().map(|(l, _)| &l.output).collect();
        let g_out = Tensor::run_backward(&[&loss], &outputs, false, false);
        let bi = b as i64;
        let mut sq = Tensor::zeros([bi], (Kind::Float, self.vs.device()));
        let mut parts = Vec::with_capacity(layers.len());
        let sum12 = [1i64, 2].as_slice();
        for (&(layer, bias), g) in layers.iter().zip(g_out) {
            // A layer without a (trainable) bias, such as DenseNet's
            // convolutions, has no bias gradient to count in the norm.
            let has_bias = f64::from(u8::from(bias.is_some()));
            match layer.kind {
                LayerKind::Linear => {
                    let gg = g.square().sum_dim_intlist(1, false, Kind::Float);
                    let xx = layer.input.square().sum_dim_intlist(1, false, Kind::Float);
                    sq += &gg * (xx + has_bias); // weight ||g||^2 ||x||^2, bias ||g||^2
                    parts.push(Part::Outer {
                        g,
                        x: layer.input.shallow_clone(),
                    });
                }
                LayerKind::Conv {
                    kernel,
                    stride,
                    padding,
                } if ghost_is_cheaper(&g, &layer.input, kernel) => {
                    // ||G^T X||_F^2 = <G G^T, X X^T> over positions: the
                    // per-sample gradient is never formed.
                    let g = g.flatten(2, -1);
                    let cols = layer.unfold([kernel, stride, padding]);
                    let gram_g = g.transpose(1, 2).bmm(&g);
                    let gram_x = cols.transpose(1, 2).bmm(&cols);
                    sq += (gram_g * gram_x).sum_dim_intlist(sum12, false, Kind::Float);
                    sq += g
                        .sum_dim_intlist(2, false, Kind::Float)
                        .square()
                        .sum_dim_intlist(1, false, Kind::Float)
                        * has_bias;
                    parts.push(Part::Ghost {
                        g,
                        conv: [kernel, stride, padding],
                    });
                }
                LayerKind::Conv { .. } | LayerKind::GroupNorm { .. } => {
                    let (dw, db) = layer.stored(&g);
                    let (dw, db) = (dw.reshape([bi, -1]), db.reshape([bi, -1]));
                    sq += dw.square().sum_dim_intlist(1, false, Kind::Float);
                    sq += db.square().sum_dim_intlist(1, false, Kind::Float) * has_bias;
                    parts.push(Part::Stored { dw, db });
                }
            }
        }
        let norms = sq.sqrt();
        let c = (max_norm / (&norms + 1e-6)).clamp_max(1.0);
        let mut sum = vec![0.0f32; cols.total];
        for (&(layer, bias_index), part) in layers.iter().zip(parts) {
            let (w, bias) = match part {
                Part::Outer { g, x } => {
                    let gc = g * c.unsqueeze(1);
                    (
                        gc.transpose(0, 1).matmul(&x),
                        gc.sum_dim_intlist(0, false, Kind::Float),
                    )
                }
                Part::Ghost { g, conv } => {
                    // sum_i c_i G_i^T X_i as one product over every sample's
                    // positions.
                    let cols = layer.unfold(conv);
                    let gc = g * c.view([bi, 1, 1]);
                    let (out, d) = (gc.size()[1], cols.size()[1]);
                    let w = gc
                        .permute([1, 0, 2])
                        .reshape([out, -1])
                        .matmul(&cols.permute([0, 2, 1]).reshape([-1, d]));
                    (
                        w,
                        gc.sum_dim_intlist([0i64, 2].as_slice(), false, Kind::Float),
                    )
                }
                Part::Stored { dw, db } => (
                    (dw * c.unsqueeze(1)).sum_dim_intlist(0, false, Kind::Float),
                    (db * c.unsqueeze(1)).sum_dim_intlist(0, false, Kind::Float),
                ),
            };
            for (idx, t) in [(Some(layer.weight), w), (bias_index, bias)] {
                let Some(idx) = idx else { continue };
                let len = self.layout.range_at(idx).len();
                let v = to_vec(&t)?;
                if v.len() != len {
                    return Err(Error::Model(format!(
                        "per-sample gradient of `{}` has {} values, expected {len}",
                        self.layout.tensors()[idx].name,
                        v.len()
                    )));
                }
                sum[cols.slot(idx, len)?].copy_from_slice(&v);
            }
        }
        self.ensure_filled(&cols)?;
        Ok(ClippedGradientSum {
            sum,
            norms: to_vec(&norms)?,
            loss: loss.double_value(&[]) / b as f64,
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
        let mut cols = self.columns();
        let layers = Self::trainable_layers(trace, &cols);
        let outputs: Vec<&Tensor> = layers.iter().map(|(l, _)| &l.output).collect();
        let g_out = Tensor::run_backward(&[&loss], &outputs, false, false);
        let bi = b as i64;
        let grads = Tensor::zeros([bi, cols.total as i64], (Kind::Float, self.vs.device()));
        for (&(layer, bias), g) in layers.iter().zip(&g_out) {
            let (dw, db) = layer.stored(g);
            for (idx, part) in [(Some(layer.weight), dw), (bias, db)] {
                let Some(idx) = idx else { continue };
                let r = cols.slot(idx, self.layout.range_at(idx).len())?;
                let len = r.len() as i64;
                grads
                    .narrow(1, r.start as i64, len)
                    .copy_(&part.reshape([bi, len]));
            }
        }
        self.ensure_filled(&cols)?;
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
        // Frozen BatchNorm (the only BatchNorm allowed here) on its running
        // statistics, as in the traced pass.
        let train = !self.net.has_batch_norm();
        for i in 0..b as i64 {
            let logits = self.net.forward(&xs.narrow(0, i, 1), train);
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
        self.per_sample_checks(images, shape)?;
        let ys = self.targets(targets)?;
        guarded(|| {
            let xs = self.input(images, shape);
            self.looped_gradients(&xs, &ys, shape[0])
        })
    }

    /// Subtracts `step` (over the trainable tensors, in the order of
    /// [`TchModel::per_sample_gradients`]'s columns) from the parameters.
    pub fn sub_trainable(&mut self, step: &[f32]) -> Result<()> {
        let total = self.trainable_values();
        if step.len() != total {
            return Err(Error::DimensionMismatch {
                expected: total,
                got: step.len(),
            });
        }
        let device = self.vs.device();
        let _guard = tch::no_grad_guard();
        let mut off = 0;
        for i in self.trainable_tensors() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn zeros(shape: &[i64]) -> Tensor {
        Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu))
    }

    #[test]
    fn ghost_norm_is_chosen_where_positions_are_few_and_weights_large() {
        // DenseNet-121 at 64 x 64, batch 2. The stem: 32 x 32 positions,
        // 64 x 3 x 7 x 7 weights: store.
        assert!(!ghost_is_cheaper(
            &zeros(&[2, 64, 32, 32]),
            &zeros(&[2, 3, 64, 64]),
            7
        ));
        // Block 1's 3x3 convolution: 16 x 16 positions, 32 x 1152: store.
        assert!(!ghost_is_cheaper(
            &zeros(&[2, 32, 16, 16]),
            &zeros(&[2, 128, 16, 16]),
            3
        ));
        // Block 2's: 8 x 8 positions, 64 x (32 + 1152) > 32 x 1152: store.
        assert!(!ghost_is_cheaper(
            &zeros(&[2, 32, 8, 8]),
            &zeros(&[2, 128, 8, 8]),
            3
        ));
        // Block 3's: 4 x 4 positions: ghost.
        assert!(ghost_is_cheaper(
            &zeros(&[2, 32, 4, 4]),
            &zeros(&[2, 128, 4, 4]),
            3
        ));
        // Block 4's 1x1 bottleneck, 2 x 2 positions: ghost.
        assert!(ghost_is_cheaper(
            &zeros(&[2, 128, 2, 2]),
            &zeros(&[2, 512, 2, 2]),
            1
        ));
    }
}
