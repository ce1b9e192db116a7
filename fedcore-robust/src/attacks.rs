//! Byzantine clients for experiments and tests.
//!
//! [`Byzantine`] wraps any [`Model`]: it trains honestly, then replaces the
//! honest delta (new parameters minus the global ones it started from) with
//! an attack's, so [`fedcore::ModelClient`] sends the attack as its update.
//! Everything is seeded by the round's [`TrainConfig::seed`].
//!
//! ALIE and IPM need the honest updates' statistics. Here the attacker
//! estimates them itself (the non-omniscient setting of Baruch et al., 2019):
//! it trains `samples` times from the same global model with different
//! shuffling seeds and takes the coordinate-wise mean and standard deviation
//! of those deltas. That costs `samples` local trainings and needs no
//! coordination between clients. Label flipping happens at the data level:
//! `fedcore::data::LabelFlip` (feature `data`).

use fedcore::{Error, FitOutput, Model, Parameters, Result, TrainConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// What a Byzantine client sends instead of its honest delta `g`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    /// `-scale * g` (sign flipping; `scale = 1` is the plain flip).
    SignFlip {
        /// Multiplier of the flipped delta.
        scale: f32,
    },
    /// `N(0, std²)` in every coordinate, ignoring the data.
    Gaussian {
        /// Standard deviation of the noise.
        std: f32,
    },
    /// `factor * g` (boosting, as in model replacement).
    Scaling {
        /// Multiplier.
        factor: f32,
    },
    /// A Little Is Enough: `mean - z * std`, coordinate-wise, over `samples`
    /// honest deltas (Baruch et al., 2019); small `z` (~1) stays inside the
    /// honest spread and so passes distance-based defences.
    Alie {
        /// How many standard deviations to shift.
        z: f32,
        /// Local honest trainings used to estimate mean and std (>= 2).
        samples: usize,
    },
    /// Inner Product Manipulation: `-epsilon * mean` over `samples` honest
    /// deltas (Xie et al., 2020); small `epsilon` makes the aggregate's
    /// inner product with the true gradient negative under some defences.
    Ipm {
        /// Multiplier of the negated mean.
        epsilon: f32,
        /// Local honest trainings used to estimate the mean (>= 1).
        samples: usize,
    },
}

impl Attack {
    /// Checks the settings.
    pub fn check(&self) -> Result<()> {
        let finite = |v: f32, what: &str| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(Error::InvalidConfig(format!(
                    "attack {what} must be finite"
                )))
            }
        };
        match *self {
            Attack::SignFlip { scale } => finite(scale, "scale"),
            Attack::Gaussian { std } if !(std.is_finite() && std > 0.0) => Err(
                Error::InvalidConfig("Gaussian attack std must be positive".into()),
            ),
            Attack::Gaussian { .. } => Ok(()),
            Attack::Scaling { factor } => finite(factor, "factor"),
            Attack::Alie { z, samples } => {
                finite(z, "z")?;
                if samples < 2 {
                    return Err(Error::InvalidConfig(
                        "ALIE needs at least 2 samples to estimate a standard deviation".into(),
                    ));
                }
                Ok(())
            }
            Attack::Ipm { epsilon, samples } => {
                finite(epsilon, "epsilon")?;
                if samples == 0 {
                    return Err(Error::InvalidConfig("IPM needs at least 1 sample".into()));
                }
                Ok(())
            }
        }
    }

    /// A short name for tables (`sign-flip`, `alie`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Attack::SignFlip { .. } => "sign-flip",
            Attack::Gaussian { .. } => "gaussian",
            Attack::Scaling { .. } => "scaling",
            Attack::Alie { .. } => "alie",
            Attack::Ipm { .. } => "ipm",
        }
    }

    fn samples(&self) -> usize {
        match *self {
            Attack::Alie { samples, .. } | Attack::Ipm { samples, .. } => samples,
            _ => 1,
        }
    }
}

/// A model that trains honestly and then lies about its update.
#[derive(Debug)]
pub struct Byzantine<M> {
    inner: M,
    attack: Attack,
}

impl<M: Model> Byzantine<M> {
    /// Wraps `inner`; the attack's settings are checked.
    pub fn new(inner: M, attack: Attack) -> Result<Self> {
        attack.check()?;
        Ok(Self { inner, attack })
    }

    /// The attack.
    pub fn attack(&self) -> Attack {
        self.attack
    }

    /// The wrapped model.
    pub fn inner(&self) -> &M {
        &self.inner
    }
}

impl<M: Model> Model for Byzantine<M> {
    type Data = M::Data;

    fn parameters(&self) -> Parameters {
        self.inner.parameters()
    }

    fn set_parameters(&mut self, parameters: &Parameters) -> Result<()> {
        self.inner.set_parameters(parameters)
    }

    fn fit(&mut self, data: &M::Data, config: &TrainConfig) -> Result<FitOutput> {
        let start = self.inner.parameters();
        let mut deltas = Vec::with_capacity(self.attack.samples());
        let mut first = None;
        for k in 0..self.attack.samples() {
            if k > 0 {
                self.inner.set_parameters(&start)?;
            }
            let seed = config
                .seed
                .wrapping_add((k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let out = self.inner.fit(
                data,
                &TrainConfig {
                    seed,
                    ..config.clone()
                },
            )?;
            first.get_or_insert(out);
            deltas.push(self.inner.parameters().sub(&start)?);
        }
        let honest = &deltas[0];
        let values: Vec<f32> = match self.attack {
            Attack::SignFlip { scale } => honest.as_slice().iter().map(|g| -scale * g).collect(),
            Attack::Scaling { factor } => honest.as_slice().iter().map(|g| factor * g).collect(),
            Attack::Gaussian { std } => {
                let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x6761_7573_7369_616e);
                let normal = Normal::new(0.0, std)
                    .map_err(|e| Error::InvalidConfig(format!("Gaussian attack: {e}")))?;
                (0..honest.len()).map(|_| normal.sample(&mut rng)).collect()
            }
            Attack::Alie { z, .. } => {
                let (mean, std) = mean_std(&deltas);
                mean.iter().zip(&std).map(|(m, s)| m - z * s).collect()
            }
            Attack::Ipm { epsilon, .. } => {
                let (mean, _) = mean_std(&deltas);
                mean.iter().map(|m| -epsilon * m).collect()
            }
        };
        let mut sent = start.clone();
        sent.axpy(1.0, &start.with_values(values)?)?;
        self.inner.set_parameters(&sent)?;
        first.ok_or_else(|| Error::Model("no training ran".into()))
    }

    fn evaluate(&mut self, data: &M::Data) -> Result<fedcore::Evaluation> {
        self.inner.evaluate(data)
    }
}

/// Coordinate-wise mean and (population) standard deviation, in f64.
fn mean_std(deltas: &[Parameters]) -> (Vec<f32>, Vec<f32>) {
    let n = deltas.len() as f64;
    let d = deltas.first().map_or(0, Parameters::len);
    let mut mean = vec![0.0f32; d];
    let mut std = vec![0.0f32; d];
    for i in 0..d {
        let m = deltas
            .iter()
            .map(|p| f64::from(p.as_slice()[i]))
            .sum::<f64>()
            / n;
        let v = deltas
            .iter()
            .map(|p| (f64::from(p.as_slice()[i]) - m).powi(2))
            .sum::<f64>()
            / n;
        mean[i] = m as f32;
        std[i] = v.sqrt() as f32;
    }
    (mean, std)
}

#[cfg(test)]
mod tests {
    use fedcore::linear::{SoftmaxRegression, synthetic_blobs};

    use super::*;

    /// The delta one `fit` makes, from a fresh start, on fixed blobs.
    fn delta<M: Model<Data = fedcore::linear::Dataset>>(mut m: M, seed: u64) -> Parameters {
        let data = synthetic_blobs(1 << 16, 60, 4, 3, 1.0);
        let start = m.parameters();
        m.fit(
            &data,
            &TrainConfig {
                seed,
                ..TrainConfig::default()
            },
        )
        .unwrap();
        m.parameters().sub(&start).unwrap()
    }

    fn honest_delta(seed: u64) -> Parameters {
        delta(SoftmaxRegression::new(4, 3), seed)
    }

    fn attacked(attack: Attack, seed: u64) -> Parameters {
        delta(
            Byzantine::new(SoftmaxRegression::new(4, 3), attack).unwrap(),
            seed,
        )
    }

    #[test]
    fn sign_flip_and_scaling_transform_the_honest_delta() {
        let g = honest_delta(3);
        let flipped = attacked(Attack::SignFlip { scale: 2.0 }, 3);
        let boosted = attacked(Attack::Scaling { factor: 10.0 }, 3);
        for ((g, f), b) in g
            .as_slice()
            .iter()
            .zip(flipped.as_slice())
            .zip(boosted.as_slice())
        {
            assert!((f + 2.0 * g).abs() < 1e-5, "{f} vs {g}");
            assert!((b - 10.0 * g).abs() < 1e-4, "{b} vs {g}");
        }
    }

    #[test]
    fn gaussian_is_seeded_noise_and_ipm_opposes_the_mean() {
        let a = attacked(Attack::Gaussian { std: 0.5 }, 1);
        assert_eq!(a, attacked(Attack::Gaussian { std: 0.5 }, 1));
        assert_ne!(a, attacked(Attack::Gaussian { std: 0.5 }, 2));
        let rms = (a.as_slice().iter().map(|v| v * v).sum::<f32>() / a.len() as f32).sqrt();
        assert!((rms - 0.5).abs() < 0.2, "{rms}");
        let g = honest_delta(5);
        let ipm = attacked(
            Attack::Ipm {
                epsilon: 0.5,
                samples: 1,
            },
            5,
        );
        let dot: f32 = g
            .as_slice()
            .iter()
            .zip(ipm.as_slice())
            .map(|(x, y)| x * y)
            .sum();
        assert!(dot < 0.0, "IPM must point against the honest update");
    }

    #[test]
    fn alie_shifts_by_z_standard_deviations_of_local_runs() {
        let z0 = attacked(Attack::Alie { z: 0.0, samples: 4 }, 9);
        let z1 = attacked(Attack::Alie { z: 1.5, samples: 4 }, 9);
        // With z = 0 it is the mean of the runs: close to an honest delta.
        let g = honest_delta(9);
        let dist = |a: &Parameters, b: &Parameters| a.sub(b).unwrap().l2_norm();
        assert!(
            dist(&z0, &g) < g.l2_norm(),
            "the mean of honest runs is near an honest run"
        );
        // Every coordinate moved down (or stayed, where the runs agree).
        assert!(z1.as_slice().iter().zip(z0.as_slice()).all(|(a, b)| a <= b));
        assert!(dist(&z1, &z0) > 0.0);
    }

    #[test]
    fn impossible_settings_are_refused() {
        let m = || SoftmaxRegression::new(2, 2);
        assert!(Byzantine::new(m(), Attack::Gaussian { std: 0.0 }).is_err());
        assert!(Byzantine::new(m(), Attack::Alie { z: 1.0, samples: 1 }).is_err());
        assert!(
            Byzantine::new(
                m(),
                Attack::Ipm {
                    epsilon: f32::NAN,
                    samples: 1
                }
            )
            .is_err()
        );
        assert!(
            Byzantine::new(
                m(),
                Attack::SignFlip {
                    scale: f32::INFINITY
                }
            )
            .is_err()
        );
        assert_eq!(Attack::Scaling { factor: 3.0 }.name(), "scaling");
    }
}
