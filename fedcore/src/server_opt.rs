//! Server optimizers (Reddi, Charles, Zaheer, Garrett, Rush, Konečný,
//! Kumar, McMahan, "Adaptive Federated Optimization", ICLR 2021): the
//! round's aggregate Δ (the clients' combined step, whatever aggregator
//! or privacy mechanism made it) is a pseudo-gradient, and the server
//! moves the global model along what an optimizer makes of it:
//!
//! ```text
//! sgd       x <- x + η Δ                                   (FedAvg; η = 1)
//! momentum  m <- β m + Δ;                    x <- x + η m  (FedAvgM)
//! adagrad   m <- β1 m + (1-β1) Δ;  v <- v + Δ²;                     x <- x + η m / (√v + τ)
//! adam      m <- β1 m + (1-β1) Δ;  v <- β2 v + (1-β2) Δ²;           x <- x + η m / (√v + τ)
//! yogi      m <- β1 m + (1-β1) Δ;  v <- v - (1-β2) Δ² sign(v - Δ²); x <- x + η m / (√v + τ)
//! ```
//!
//! η is [`crate::ServerConfig::server_learning_rate`]; m starts at 0 and v
//! at τ² (the paper's Algorithm 2; no bias correction). The state (m, v)
//! has one value per plain coordinate of the model and is saved with every
//! checkpoint, so a resumed run continues bit for bit. When a run seals
//! tensors, the optimizer steps the plain part only; the sealed part is
//! summed under encryption and moved by η alone (an encrypted sum cannot be
//! divided by √v).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Which optimizer the server applies to the round's aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServerOpt {
    /// The aggregate times the server learning rate (FedAvg and every
    /// robust rule as they are).
    #[default]
    Sgd,
    /// FedAvgM (Hsu, Qi, Brown 2019): heavy-ball momentum `beta`.
    Momentum {
        /// Momentum, in [0, 1).
        beta: f32,
    },
    /// FedAdagrad.
    Adagrad {
        /// First-moment decay, in [0, 1).
        beta1: f32,
        /// Adaptivity: larger is closer to momentum SGD.
        tau: f32,
    },
    /// FedAdam.
    Adam {
        /// First-moment decay, in [0, 1).
        beta1: f32,
        /// Second-moment decay, in [0, 1).
        beta2: f32,
        /// Adaptivity.
        tau: f32,
    },
    /// FedYogi: Adam whose second moment moves additively.
    Yogi {
        /// First-moment decay, in [0, 1).
        beta1: f32,
        /// Second-moment decay, in [0, 1).
        beta2: f32,
        /// Adaptivity.
        tau: f32,
    },
}

impl ServerOpt {
    /// FedAvgM with the paper's momentum 0.9.
    pub fn momentum() -> Self {
        ServerOpt::Momentum { beta: 0.9 }
    }

    /// FedAdagrad with β1 = 0.9 and τ = 1e-3 (Reddi et al.'s grid).
    pub fn adagrad() -> Self {
        ServerOpt::Adagrad {
            beta1: 0.9,
            tau: 1e-3,
        }
    }

    /// FedAdam with β1 = 0.9, β2 = 0.99, τ = 1e-3.
    pub fn adam() -> Self {
        ServerOpt::Adam {
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }

    /// FedYogi with β1 = 0.9, β2 = 0.99, τ = 1e-3.
    pub fn yogi() -> Self {
        ServerOpt::Yogi {
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
        }
    }

    /// Its name in logs and checkpoints: `sgd`, `momentum`, `adagrad`,
    /// `adam`, `yogi`.
    pub fn name(&self) -> &'static str {
        match self {
            ServerOpt::Sgd => "sgd",
            ServerOpt::Momentum { .. } => "momentum",
            ServerOpt::Adagrad { .. } => "adagrad",
            ServerOpt::Adam { .. } => "adam",
            ServerOpt::Yogi { .. } => "yogi",
        }
    }

    /// The optimizer with its settings, as a checkpoint records it (JSON):
    /// a run resumes only with the same.
    pub fn kind(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| self.name().to_owned())
    }

    /// Checks the hyperparameters.
    pub fn check(&self) -> Result<()> {
        let unit = |n: &str, v: f32| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::InvalidConfig(format!(
                    "server optimizer {}: {n} = {v} is not in [0, 1)",
                    self.name()
                )))
            }
        };
        let positive = |v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(Error::InvalidConfig(format!(
                    "server optimizer {}: tau = {v} must be positive and finite",
                    self.name()
                )))
            }
        };
        match *self {
            ServerOpt::Sgd => Ok(()),
            ServerOpt::Momentum { beta } => unit("beta", beta),
            ServerOpt::Adagrad { beta1, tau } => {
                unit("beta1", beta1)?;
                positive(tau)
            }
            ServerOpt::Adam { beta1, beta2, tau } | ServerOpt::Yogi { beta1, beta2, tau } => {
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                positive(tau)
            }
        }
    }

    /// Whether it keeps state across rounds.
    pub fn is_stateful(&self) -> bool {
        !matches!(self, ServerOpt::Sgd)
    }

    /// Turns the aggregate `delta` into the direction the server moves
    /// along (the model then gets `x + η · delta`), updating `state`.
    /// The state is created on the first step with `delta`'s length.
    pub fn direction(&self, state: &mut OptState, delta: &mut [f32]) -> Result<()> {
        let n = delta.len();
        let tau = match *self {
            ServerOpt::Sgd => return Ok(()),
            ServerOpt::Momentum { .. } => 0.0,
            ServerOpt::Adagrad { tau, .. }
            | ServerOpt::Adam { tau, .. }
            | ServerOpt::Yogi { tau, .. } => tau,
        };
        if state.m.is_empty() && state.v.is_empty() {
            state.m = vec![0.0; n];
            if !matches!(self, ServerOpt::Momentum { .. }) {
                state.v = vec![tau * tau; n];
            }
        }
        let expected_v = if matches!(self, ServerOpt::Momentum { .. }) {
            0
        } else {
            n
        };
        if state.m.len() != n || state.v.len() != expected_v {
            return Err(Error::InvalidInput(format!(
                "server optimizer {}: its state holds {} and {} values, the aggregate {n}",
                self.name(),
                state.m.len(),
                state.v.len()
            )));
        }
        let m = &mut state.m;
        let v = &mut state.v;
        match *self {
            ServerOpt::Sgd => {}
            ServerOpt::Momentum { beta } => {
                for (d, m) in delta.iter_mut().zip(m.iter_mut()) {
                    *m = beta * *m + *d;
                    *d = *m;
                }
            }
            ServerOpt::Adagrad { beta1, tau } => {
                for ((d, m), v) in delta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = beta1 * *m + (1.0 - beta1) * *d;
                    *v += *d * *d;
                    *d = *m / (v.sqrt() + tau);
                }
            }
            ServerOpt::Adam { beta1, beta2, tau } => {
                for ((d, m), v) in delta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = beta1 * *m + (1.0 - beta1) * *d;
                    *v = beta2 * *v + (1.0 - beta2) * *d * *d;
                    *d = *m / (v.sqrt() + tau);
                }
            }
            ServerOpt::Yogi { beta1, beta2, tau } => {
                for ((d, m), v) in delta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()) {
                    *m = beta1 * *m + (1.0 - beta1) * *d;
                    let g2 = *d * *d;
                    // sign(0) = 0: v stays where it equals Δ².
                    let sign = (*v - g2).signum() * f32::from(*v != g2);
                    *v -= (1.0 - beta2) * g2 * sign;
                    *d = *m / (v.sqrt() + tau);
                }
            }
        }
        Ok(())
    }
}

/// By name, with the defaults above: `sgd`, `momentum` (FedAvgM),
/// `adagrad`, `adam`, `yogi` (the `--server-opt` of the examples).
impl std::str::FromStr for ServerOpt {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sgd" | "fedavg" => Ok(ServerOpt::Sgd),
            "momentum" | "fedavgm" => Ok(ServerOpt::momentum()),
            "adagrad" | "fedadagrad" => Ok(ServerOpt::adagrad()),
            "adam" | "fedadam" => Ok(ServerOpt::adam()),
            "yogi" | "fedyogi" => Ok(ServerOpt::yogi()),
            other => Err(format!(
                "unknown server optimizer `{other}`: sgd, momentum, adagrad, adam or yogi"
            )),
        }
    }
}

/// A server optimizer's state: the first moment `m` and the second `v`
/// (empty until the first step; `v` stays empty for momentum).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptState {
    /// First moment (momentum buffer).
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two steps of each optimizer against the formulas worked by hand.
    #[test]
    fn each_optimizer_takes_the_hand_computed_steps() {
        let steps = [[0.5_f32, -2.0], [0.1, 0.0]];
        let run = |opt: ServerOpt| {
            let mut state = OptState::default();
            steps
                .iter()
                .map(|s| {
                    let mut d = s.to_vec();
                    opt.direction(&mut state, &mut d).unwrap();
                    d
                })
                .collect::<Vec<_>>()
        };
        let close = |got: &[Vec<f32>], want: [[f64; 2]; 2]| {
            for (g, w) in got.iter().zip(want) {
                for (g, w) in g.iter().zip(w) {
                    assert!(
                        (f64::from(*g) - w).abs() < 1e-5 * w.abs().max(1.0),
                        "{got:?} vs {want:?}"
                    );
                }
            }
        };
        close(&run(ServerOpt::Sgd), [[0.5, -2.0], [0.1, 0.0]]);
        // m1 = Δ1; m2 = 0.9 m1 + Δ2.
        close(
            &run(ServerOpt::Momentum { beta: 0.9 }),
            [[0.5, -2.0], [0.55, -1.8]],
        );
        // β1 = 0.5, τ = 0.1: v0 = 0.01.
        // Adagrad step 1: m = 0.25, -1; v = 0.26, 4.01.
        // step 2: m = 0.175, -0.5; v = 0.27, 4.01.
        let (s1, s2) = (0.26_f64.sqrt(), 4.01_f64.sqrt());
        let (t1, t2) = (0.27_f64.sqrt(), 4.01_f64.sqrt());
        close(
            &run(ServerOpt::Adagrad {
                beta1: 0.5,
                tau: 0.1,
            }),
            [
                [0.25 / (s1 + 0.1), -1.0 / (s2 + 0.1)],
                [0.175 / (t1 + 0.1), -0.5 / (t2 + 0.1)],
            ],
        );
        // Adam, β1 = 0.5, β2 = 0.8, τ = 0.1:
        // step 1: v = 0.8·0.01 + 0.2·0.25 = 0.058, 0.8·0.01 + 0.2·4 = 0.808.
        // step 2: v = 0.8·0.058 + 0.2·0.01 = 0.0484, 0.8·0.808 = 0.6464.
        close(
            &run(ServerOpt::Adam {
                beta1: 0.5,
                beta2: 0.8,
                tau: 0.1,
            }),
            [
                [
                    0.25 / (0.058_f64.sqrt() + 0.1),
                    -1.0 / (0.808_f64.sqrt() + 0.1),
                ],
                [
                    0.175 / (0.0484_f64.sqrt() + 0.1),
                    -0.5 / (0.6464_f64.sqrt() + 0.1),
                ],
            ],
        );
        // Yogi, same: step 1: v = 0.01 - 0.2·0.25·sign(0.01-0.25) = 0.06,
        // 0.01 + 0.2·4 = 0.81. step 2: v = 0.06 - 0.2·0.01·sign(0.05) =
        // 0.058; Δ² = 0 < v: v = 0.81 - 0 = 0.81.
        close(
            &run(ServerOpt::Yogi {
                beta1: 0.5,
                beta2: 0.8,
                tau: 0.1,
            }),
            [
                [
                    0.25 / (0.06_f64.sqrt() + 0.1),
                    -1.0 / (0.81_f64.sqrt() + 0.1),
                ],
                [
                    0.175 / (0.058_f64.sqrt() + 0.1),
                    -0.5 / (0.81_f64.sqrt() + 0.1),
                ],
            ],
        );
    }

    #[test]
    fn bad_hyperparameters_and_a_state_of_another_size_are_errors() {
        assert!(ServerOpt::Momentum { beta: 1.0 }.check().is_err());
        assert!(
            ServerOpt::Adam {
                beta1: 0.9,
                beta2: 0.99,
                tau: 0.0
            }
            .check()
            .is_err()
        );
        for opt in [
            ServerOpt::Sgd,
            ServerOpt::momentum(),
            ServerOpt::adagrad(),
            ServerOpt::adam(),
            ServerOpt::yogi(),
        ] {
            opt.check().unwrap();
        }
        let mut state = OptState::default();
        ServerOpt::adam()
            .direction(&mut state, &mut [1.0, 2.0])
            .unwrap();
        let e = ServerOpt::adam()
            .direction(&mut state, &mut [1.0, 2.0, 3.0])
            .unwrap_err();
        assert!(e.to_string().contains("holds 2 and 2 values"), "{e}");
        for name in ["sgd", "momentum", "adagrad", "adam", "yogi"] {
            assert_eq!(name.parse::<ServerOpt>().unwrap().name(), name);
        }
        assert!("sgdm".parse::<ServerOpt>().is_err());
    }
}
