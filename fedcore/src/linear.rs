//! A tiny pure-Rust model: multinomial logistic (softmax) regression on
//! ndarray, with seeded synthetic data. It lets the whole federated loop run
//! and be tested without libtorch.

use std::sync::Arc;

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, StandardNormal};

use crate::error::{Error, Result};
use crate::model::{Evaluation, FitOutput, Model, Optimizer, TrainConfig};
use crate::params::{Layout, Parameters, TensorSpec};
use crate::update::Metrics;

/// Features and integer class labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// One row per example.
    pub x: Array2<f32>,
    /// Class of each row, in `0..classes`.
    pub y: Vec<usize>,
}

impl Dataset {
    /// A dataset; rows and labels must agree.
    pub fn new(x: Array2<f32>, y: Vec<usize>) -> Result<Self> {
        if x.nrows() != y.len() {
            return Err(Error::DimensionMismatch {
                expected: x.nrows(),
                got: y.len(),
            });
        }
        Ok(Self { x, y })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// True when there are no examples.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// The examples at `rows`, in that order.
    pub fn select(&self, rows: &[usize]) -> Dataset {
        Dataset {
            x: self.x.select(Axis(0), rows),
            y: rows.iter().map(|&r| self.y[r]).collect(),
        }
    }

    /// Splits into `parts` shuffled, near-equal, disjoint parts (IID).
    pub fn split_iid(&self, parts: usize, seed: u64) -> Vec<Dataset> {
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let parts = parts.max(1);
        (0..parts)
            .map(|p| {
                let rows: Vec<usize> = idx.iter().copied().skip(p).step_by(parts).collect();
                self.select(&rows)
            })
            .collect()
    }
}

/// Gaussian blobs: `classes` centres drawn from N(0, separation^2) per
/// dimension, each example its class centre plus N(0, 1) noise. Deterministic
/// in `seed`; larger `separation` makes the task easier.
pub fn synthetic_blobs(
    seed: u64,
    n: usize,
    dim: usize,
    classes: usize,
    separation: f32,
) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // The centres depend on the seed's high bits only, so that datasets drawn
    // with seeds that differ in the low 16 bits share one task.
    let mut centre_rng = ChaCha8Rng::seed_from_u64(seed >> 16);
    let centres = Array2::from_shape_fn((classes, dim), |_| {
        let z: f32 = StandardNormal.sample(&mut centre_rng);
        z * separation
    });
    let noise = Normal::new(0.0f32, 1.0).expect("unit normal");
    let y: Vec<usize> = (0..n).map(|i| i % classes.max(1)).collect();
    let x = Array2::from_shape_fn((n, dim), |(i, j)| {
        centres[[y[i], j]] + noise.sample(&mut rng)
    });
    Dataset { x, y }
}

/// Softmax regression: `logits = x W^T + b`, cross-entropy loss.
///
/// Its parameters are `linear.weight` `[classes, dim]` and `linear.bias`
/// `[classes]` (PyTorch's `nn.Linear` names).
#[derive(Debug, Clone)]
pub struct SoftmaxRegression {
    layout: Arc<Layout>,
    w: Array2<f32>,
    b: Array1<f32>,
}

impl SoftmaxRegression {
    /// Zero-initialised (the loss is convex, so zeros are a fine start).
    pub fn new(dim: usize, classes: usize) -> Self {
        let layout = Layout::new([
            TensorSpec::new("linear.weight", [classes, dim]),
            TensorSpec::new("linear.bias", [classes]),
        ])
        .expect("two distinct names");
        Self {
            layout: Arc::new(layout),
            w: Array2::zeros((classes, dim)),
            b: Array1::zeros(classes),
        }
    }

    fn classes(&self) -> usize {
        self.b.len()
    }

    fn check_data(&self, data: &Dataset) -> Result<()> {
        if data.x.ncols() != self.w.ncols() {
            return Err(Error::DimensionMismatch {
                expected: self.w.ncols(),
                got: data.x.ncols(),
            });
        }
        if let Some(&bad) = data.y.iter().find(|&&c| c >= self.classes()) {
            return Err(Error::Model(format!(
                "label {bad} is out of range for {} classes",
                self.classes()
            )));
        }
        Ok(())
    }

    /// Class probabilities for each row.
    pub fn predict_proba(&self, x: ArrayView2<'_, f32>) -> Array2<f32> {
        let mut p = x.dot(&self.w.t()) + &self.b;
        for mut row in p.rows_mut() {
            let m = row.fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            row.mapv_inplace(|v| (v - m).exp());
            let z = row.sum();
            row.mapv_inplace(|v| v / z);
        }
        p
    }

    /// Mean cross-entropy, accuracy and the gradient of the mean loss.
    fn loss_and_grad(
        &self,
        x: ArrayView2<'_, f32>,
        y: &[usize],
    ) -> (f64, f64, Array2<f32>, Array1<f32>) {
        let mut p = self.predict_proba(x);
        let n = y.len().max(1) as f32;
        let mut loss = 0.0f64;
        let mut correct = 0usize;
        for (i, &c) in y.iter().enumerate() {
            let row = p.row(i);
            let argmax = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |a, (j, &v)| if v > a.1 { (j, v) } else { a },
                )
                .0;
            correct += usize::from(argmax == c);
            loss -= f64::from(row[c].max(1e-12)).ln();
            p[[i, c]] -= 1.0;
        }
        p.mapv_inplace(|v| v / n);
        let gw = p.t().dot(&x);
        let gb = p.sum_axis(Axis(0));
        (loss / n as f64, correct as f64 / n as f64, gw, gb)
    }
}

impl Model for SoftmaxRegression {
    type Data = Dataset;

    fn parameters(&self) -> Parameters {
        let mut values = Vec::with_capacity(self.layout.len());
        values.extend(self.w.iter());
        values.extend(self.b.iter());
        Parameters::new(self.layout.clone(), values).expect("layout matches the arrays")
    }

    fn set_parameters(&mut self, parameters: &Parameters) -> Result<()> {
        self.layout.ensure_same(parameters.layout())?;
        let w = parameters.tensor("linear.weight")?;
        self.w
            .as_slice_mut()
            .expect("owned standard layout")
            .copy_from_slice(w);
        self.b
            .as_slice_mut()
            .expect("owned standard layout")
            .copy_from_slice(parameters.tensor("linear.bias")?);
        Ok(())
    }

    fn fit(&mut self, data: &Dataset, config: &TrainConfig) -> Result<FitOutput> {
        self.train(data, config, None)
    }

    fn fit_corrected(
        &mut self,
        data: &Dataset,
        config: &TrainConfig,
        correction: &Parameters,
    ) -> Result<FitOutput> {
        self.layout.ensure_same(correction.layout())?;
        self.train(data, config, Some(correction))
    }

    fn evaluate(&mut self, data: &Dataset) -> Result<Evaluation> {
        self.check_data(data)?;
        if data.is_empty() {
            return Err(Error::Model("no evaluation examples".into()));
        }
        let (loss, acc, _, _) = self.loss_and_grad(data.x.view(), &data.y);
        Ok(Evaluation {
            loss,
            num_examples: data.len() as u64,
            metrics: [("accuracy".to_owned(), acc)].into(),
        })
    }
}

impl SoftmaxRegression {
    /// Local training; each step's gradient gets FedProx's
    /// `mu * (w - w_start)` when `config.proximal_mu > 0` and `correction`
    /// (SCAFFOLD's) when given.
    fn train(
        &mut self,
        data: &Dataset,
        config: &TrainConfig,
        correction: Option<&Parameters>,
    ) -> Result<FitOutput> {
        config.check()?;
        self.check_data(data)?;
        if data.is_empty() {
            return Err(Error::Model("no training examples".into()));
        }
        let mu = config.proximal_mu as f32;
        let anchor = (mu > 0.0).then(|| (self.w.clone(), self.b.clone()));
        let correction = match correction {
            Some(c) => Some((
                ArrayView2::from_shape(self.w.raw_dim(), c.tensor("linear.weight")?)
                    .map_err(|e| Error::Model(e.to_string()))?,
                ArrayView1::from(c.tensor("linear.bias")?),
            )),
            None => None,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut order: Vec<usize> = (0..data.len()).collect();
        let lr = config.learning_rate as f32;
        // Optimizer state: first and second moments (or velocity for SGD).
        let (mut mw, mut mb) = (
            Array2::<f32>::zeros(self.w.raw_dim()),
            Array1::<f32>::zeros(self.b.len()),
        );
        let (mut vw, mut vb) = (mw.clone(), mb.clone());
        let mut t = 0i32;
        let (mut loss_sum, mut acc_sum, mut seen) = (0.0, 0.0, 0usize);
        for epoch in 0..config.epochs {
            order.shuffle(&mut rng);
            let last = epoch + 1 == config.epochs;
            for batch in order.chunks(config.batch_size) {
                let xb = data.x.select(Axis(0), batch);
                let yb: Vec<usize> = batch.iter().map(|&i| data.y[i]).collect();
                let (loss, acc, mut gw, mut gb) = self.loss_and_grad(xb.view(), &yb);
                if let Some((w0, b0)) = &anchor {
                    gw.zip_mut_with(&self.w, |g, &w| *g += mu * w);
                    gw.scaled_add(-mu, w0);
                    gb.zip_mut_with(&self.b, |g, &b| *g += mu * b);
                    gb.scaled_add(-mu, b0);
                }
                if let Some((cw, cb)) = &correction {
                    gw += cw;
                    gb += cb;
                }
                if last {
                    loss_sum += loss * batch.len() as f64;
                    acc_sum += acc * batch.len() as f64;
                    seen += batch.len();
                }
                t += 1;
                match config.optimizer {
                    Optimizer::Sgd { momentum } => {
                        let m = momentum as f32;
                        mw = mw * m + &gw;
                        mb = mb * m + &gb;
                        self.w.scaled_add(-lr, &mw);
                        self.b.scaled_add(-lr, &mb);
                    }
                    Optimizer::Adam { beta1, beta2, eps } => {
                        let (b1, b2, eps) = (beta1 as f32, beta2 as f32, eps as f32);
                        mw = mw * b1 + &(gw.clone() * (1.0 - b1));
                        mb = mb * b1 + &(gb.clone() * (1.0 - b1));
                        vw = vw * b2 + &(gw.mapv(|g| g * g) * (1.0 - b2));
                        vb = vb * b2 + &(gb.mapv(|g| g * g) * (1.0 - b2));
                        let c1 = 1.0 - b1.powi(t);
                        let c2 = 1.0 - b2.powi(t);
                        ndarray::Zip::from(&mut self.w)
                            .and(&mw)
                            .and(&vw)
                            .for_each(|w, &m, &v| *w -= lr * (m / c1) / ((v / c2).sqrt() + eps));
                        ndarray::Zip::from(&mut self.b)
                            .and(&mb)
                            .and(&vb)
                            .for_each(|w, &m, &v| *w -= lr * (m / c1) / ((v / c2).sqrt() + eps));
                    }
                }
            }
        }
        let metrics: Metrics = [
            ("loss".to_owned(), loss_sum / seen.max(1) as f64),
            ("accuracy".to_owned(), acc_sum / seen.max(1) as f64),
        ]
        .into();
        Ok(FitOutput {
            privacy: Vec::new(),
            num_examples: data.len() as u64,
            metrics,
            steps: t as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradient_matches_finite_differences() {
        let data = synthetic_blobs(3, 20, 4, 3, 1.0);
        let mut m = SoftmaxRegression::new(4, 3);
        let mut p = m.parameters();
        for (i, v) in p.as_mut_slice().iter_mut().enumerate() {
            *v = ((i * 37 % 11) as f32 - 5.0) * 0.05;
        }
        m.set_parameters(&p).unwrap();
        let (_, _, gw, gb) = m.loss_and_grad(data.x.view(), &data.y);
        let analytic: Vec<f32> = gw.iter().chain(gb.iter()).copied().collect();
        let h = 1e-2f32;
        for (i, &expected) in analytic.iter().enumerate() {
            let mut plus = p.clone();
            plus.as_mut_slice()[i] += h;
            let mut minus = p.clone();
            minus.as_mut_slice()[i] -= h;
            m.set_parameters(&plus).unwrap();
            let lp = m.loss_and_grad(data.x.view(), &data.y).0;
            m.set_parameters(&minus).unwrap();
            let lm = m.loss_and_grad(data.x.view(), &data.y).0;
            let numeric = (lp - lm) / (2.0 * f64::from(h));
            assert!(
                (numeric - f64::from(expected)).abs() < 1e-3,
                "param {i}: numeric {numeric} analytic {expected}"
            );
        }
    }

    #[test]
    fn both_optimizers_learn_and_are_seeded() {
        let train = synthetic_blobs(1 << 16, 300, 6, 3, 2.0);
        let test = synthetic_blobs((1 << 16) + 1, 300, 6, 3, 2.0);
        for optimizer in [Optimizer::Sgd { momentum: 0.9 }, Optimizer::adam()] {
            let config = TrainConfig {
                epochs: 5,
                batch_size: 16,
                learning_rate: 0.05,
                optimizer,
                seed: 9,
                ..TrainConfig::default()
            };
            let mut a = SoftmaxRegression::new(6, 3);
            let before = a.evaluate(&test).unwrap();
            a.fit(&train, &config).unwrap();
            let after = a.evaluate(&test).unwrap();
            assert!(
                after.loss < before.loss * 0.5,
                "{optimizer:?}: {before:?} -> {after:?}"
            );
            assert!(after.metrics["accuracy"] > 0.9, "{optimizer:?}: {after:?}");
            let mut b = SoftmaxRegression::new(6, 3);
            b.fit(&train, &config).unwrap();
            assert_eq!(a.parameters(), b.parameters(), "same seed, same result");
        }
    }

    #[test]
    fn bad_data_is_an_error() {
        let mut m = SoftmaxRegression::new(4, 3);
        let wrong_dim = synthetic_blobs(1, 10, 5, 3, 1.0);
        assert!(m.fit(&wrong_dim, &TrainConfig::default()).is_err());
        let mut bad_label = synthetic_blobs(1, 10, 4, 3, 1.0);
        bad_label.y[0] = 7;
        assert!(m.evaluate(&bad_label).is_err());
        assert!(Dataset::new(Array2::zeros((3, 2)), vec![0, 1]).is_err());
        let other = SoftmaxRegression::new(5, 3).parameters();
        assert!(m.set_parameters(&other).is_err());
    }

    #[test]
    fn iid_split_is_a_partition() {
        let d = synthetic_blobs(5, 101, 2, 3, 1.0);
        let parts = d.split_iid(4, 1);
        assert_eq!(parts.iter().map(Dataset::len).sum::<usize>(), 101);
        assert!(parts.iter().all(|p| p.len() >= 25));
    }
}
