//! SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled
//! Averaging for Federated Learning"): control variates that correct the
//! client drift of local training on non-IID data.
//!
//! The server keeps `c`, the clients' mean control variate, and sends it with
//! every fit request ([`Strategy::fit_extra`]). Client `i` keeps its own
//! `c_i` ([`ControlVariate`], from zero), trains with every step's gradient
//! corrected by `c - c_i` ([`Model::fit_corrected`](crate::Model::fit_corrected)),
//! then takes the paper's option II,
//! `c_i+ = c_i - c + (x - y_i) / (K * lr)` for `K` local steps from the
//! global `x` to its `y_i`, and returns `c_i+ - c_i` next to its update
//! ([`ClientUpdate::extra`]). The server's [`Scaffold`] aggregates the
//! updates with its inner rule and moves `c` by `sum_i (c_i+ - c_i) / N`
//! over the federation's `N` clients.
//!
//! The client computes `c_i+` from the update it releases (after its privacy
//! mechanisms), so what it sends about its data is post-processing of that
//! update. Central DP at the server (`fedcore_dp::Dp`) is refused as the
//! inner rule: `c` moves by the raw variate changes, which it does not
//! cover. Sealed (encrypted) tensors are refused: their control variates
//! would travel in the clear. Option II assumes plain local SGD: a client
//! asked to train with momentum or Adam under SCAFFOLD refuses. SCAFFOLD is
//! not Byzantine-robust: a robust inner rule bounds a lying client's model
//! update, but its variate change moves `c` unchecked (only NaN, infinity
//! and wrong shapes are refused).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::aggregate::{Aggregate, Aggregator};
use crate::error::{Error, Result};
use crate::params::Parameters;
use crate::strategy::{RoundSteps, Strategy, StrategyInfo};
use crate::update::ClientUpdate;

/// The server side of SCAFFOLD: the inner rule aggregates the model deltas,
/// and the server control variate `c` moves by the clients' variate changes.
/// `c` is the strategy's saved state, so it is in every checkpoint and a
/// resumed run continues with it.
#[derive(Debug, Clone)]
pub struct Scaffold<A: Aggregator> {
    inner: A,
    clients: usize,
    c: Arc<Parameters>,
}

impl<A: Aggregator> Scaffold<A> {
    /// SCAFFOLD over `inner` (FedAvg in the paper) for a model of `layout`
    /// and a federation of `clients` clients (the `N` that `c`'s step is
    /// divided by; sampled clients are a subset of them).
    pub fn new(inner: A, layout: Arc<crate::params::Layout>, clients: usize) -> Result<Self> {
        if clients == 0 {
            return Err(Error::InvalidConfig(
                "SCAFFOLD needs the number of clients in the federation (at least 1)".into(),
            ));
        }
        if inner.privatizes() {
            return Err(Error::InvalidConfig(format!(
                "SCAFFOLD over `{}`: its control variate moves by the clients' raw variate changes, which central DP does not cover; use client-side DP (DP-SGD) with SCAFFOLD",
                inner.name()
            )));
        }
        Ok(Self {
            inner,
            clients,
            c: Arc::new(Parameters::zeros(layout)),
        })
    }

    /// The server control variate `c`.
    pub fn control(&self) -> &Parameters {
        &self.c
    }

    /// The inner rule.
    pub fn inner(&self) -> &A {
        &self.inner
    }
}

impl<A: Aggregator> Strategy for Scaffold<A> {
    fn describe(&self) -> StrategyInfo {
        StrategyInfo::new(format!("scaffold({})", self.inner.name()))
            .with_min_updates(self.inner.min_updates())
    }

    fn fit_extra(&self) -> Option<Arc<Parameters>> {
        Some(self.c.clone())
    }

    fn aggregate_round(
        &mut self,
        updates: &[ClientUpdate],
        steps: &mut RoundSteps<'_>,
    ) -> Result<Aggregate> {
        if updates.len() > self.clients {
            return Err(Error::InvalidConfig(format!(
                "SCAFFOLD was set up for {} clients but the round has {} updates",
                self.clients,
                updates.len()
            )));
        }
        // The server checked each update's variate change against `c`'s
        // layout and for NaN; a missing one is refused here.
        let mut changes = Vec::with_capacity(updates.len());
        for u in updates {
            match &u.extra {
                Some(dc) => changes.push(dc),
                None => {
                    steps.reject(&u.client, "SCAFFOLD needs the client's control variate")?;
                }
            }
        }
        let kept: Vec<ClientUpdate> = updates
            .iter()
            .filter(|u| steps.clients().contains(&u.client))
            .cloned()
            .collect();
        let agg = if kept.len() == updates.len() {
            self.inner.aggregate(updates)?
        } else {
            self.inner.aggregate(&kept)?
        };
        let c = Arc::make_mut(&mut self.c);
        let scale = 1.0 / self.clients as f32;
        for dc in changes {
            c.axpy(scale, dc)?;
        }
        // Finite changes can still overflow together; the server then
        // restores the state the round started from.
        if let Some(nf) = c.first_non_finite() {
            return Err(Error::AggregateNotFinite {
                aggregator: format!("SCAFFOLD's control variate ({})", self.inner.name()),
                tensor: nf.tensor,
            });
        }
        Ok(agg)
    }

    fn saved_state(&self) -> Option<Vec<f32>> {
        let mut state = self.c.as_slice().to_vec();
        if let Some(inner) = self.inner.state() {
            state.extend(inner);
        }
        Some(state)
    }

    fn restore_state(&mut self, mut state: Vec<f32>) -> Result<()> {
        let n = self.c.len();
        if state.len() < n {
            return Err(Error::InvalidConfig(format!(
                "the checkpoint holds {} values for SCAFFOLD, which needs at least {n}",
                state.len()
            )));
        }
        let inner = state.split_off(n);
        let inner_had_state = self.inner.state().is_some();
        if !inner.is_empty() || inner_had_state {
            self.inner.restore(inner)?;
        }
        self.c = Arc::new(self.c.with_values(state)?);
        Ok(())
    }
}

/// A client's SCAFFOLD control variate `c_i`, from zero, kept in memory or
/// in a file (so that a hospital that restarts keeps it; written atomically
/// after every round it trains in).
#[derive(Debug, Default)]
pub struct ControlVariate {
    value: Option<Parameters>,
    path: Option<PathBuf>,
}

impl ControlVariate {
    /// A variate kept in memory.
    pub fn new() -> Self {
        Self::default()
    }

    /// A variate kept in `path` (safetensors): read from it when it exists,
    /// written after every round.
    pub fn at(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let value = if path.exists() {
            Some(Parameters::load(&path)?)
        } else {
            None
        };
        Ok(Self {
            value,
            path: Some(path),
        })
    }

    /// The file it is kept in, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The current `c_i` (zeros of `like`'s layout before the first round);
    /// a stored one of another layout is an error.
    pub fn current(&self, like: &Parameters) -> Result<Parameters> {
        match &self.value {
            Some(v) => {
                v.layout().ensure_same(like.layout()).map_err(|e| {
                    Error::InvalidInput(format!(
                        "the stored SCAFFOLD control variate{} does not fit the model: {e}",
                        self.path
                            .as_ref()
                            .map(|p| format!(" ({})", p.display()))
                            .unwrap_or_default()
                    ))
                })?;
                Ok(v.clone())
            }
            None => Ok(like.zeros_like()),
        }
    }

    /// Replaces `c_i` (and writes the file).
    pub fn set(&mut self, value: Parameters) -> Result<()> {
        if let Some(path) = &self.path {
            value.save(path)?;
        }
        self.value = Some(value);
        Ok(())
    }

    /// One round's client-side SCAFFOLD: the correction `c - c_i` to train
    /// with, and after training [`Self::finish`].
    pub(crate) fn correction(&self, c: &Parameters) -> Result<(Parameters, Parameters)> {
        let ci = self.current(c)?;
        let correction = c.sub(&ci)?;
        Ok((ci, correction))
    }

    /// Takes `c_i+ = c_i - c + (x - y_i) / (K * lr) = -correction - delta / (K * lr)`
    /// and returns the change `c_i+ - c_i` the server needs.
    pub(crate) fn finish(
        &mut self,
        ci: &Parameters,
        correction: &Parameters,
        delta: &Parameters,
        steps: u64,
        learning_rate: f64,
    ) -> Result<Parameters> {
        if steps == 0 {
            return Err(Error::Model(
                "SCAFFOLD needs the number of local steps, and the model reported none".into(),
            ));
        }
        let mut next = correction.clone();
        next.scale(-1.0);
        next.axpy((-1.0 / (steps as f64 * learning_rate)) as f32, delta)?;
        if let Some(nf) = next.first_non_finite() {
            return Err(Error::Model(format!(
                "the SCAFFOLD control variate became {} in `{}`",
                nf.value, nf.tensor
            )));
        }
        let change = next.sub(ci)?;
        self.set(next)?;
        Ok(change)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_step_is_option_ii_of_the_paper() {
        let like = Parameters::from_tensors([("w", vec![2], vec![0.0, 0.0])]).unwrap();
        let mut v = ControlVariate::new();
        v.set(like.with_values(vec![1.0, -1.0]).unwrap()).unwrap();
        let c = like.with_values(vec![0.5, 0.5]).unwrap();
        let (ci, correction) = v.correction(&c).unwrap();
        assert_eq!(correction.as_slice(), &[-0.5, 1.5]);
        // x - y_i = -delta; K = 4 steps at lr 0.25: (x - y_i) / (K lr) = -delta.
        let delta = like.with_values(vec![2.0, -3.0]).unwrap();
        let change = v.finish(&ci, &correction, &delta, 4, 0.25).unwrap();
        // c_i+ = c_i - c - delta = [1 - 0.5 - 2, -1 - 0.5 + 3] = [-1.5, 1.5].
        assert_eq!(v.current(&like).unwrap().as_slice(), &[-1.5, 1.5]);
        assert_eq!(change.as_slice(), &[-2.5, 2.5]);
        let err = v.finish(&ci, &correction, &delta, 0, 0.25).unwrap_err();
        assert!(err.to_string().contains("number of local steps"), "{err}");
    }

    #[test]
    fn a_variate_file_survives_a_restart_and_must_fit_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scaffold.safetensors");
        let like = Parameters::from_tensors([("w", vec![3], vec![0.0; 3])]).unwrap();
        let mut v = ControlVariate::at(&path).unwrap();
        assert_eq!(v.current(&like).unwrap().as_slice(), &[0.0; 3]);
        v.set(like.with_values(vec![1.0, 2.0, 3.0]).unwrap())
            .unwrap();
        let again = ControlVariate::at(&path).unwrap();
        assert_eq!(again.current(&like).unwrap().as_slice(), &[1.0, 2.0, 3.0]);
        let other = Parameters::from_tensors([("w", vec![2], vec![0.0; 2])]).unwrap();
        let err = again.current(&other).unwrap_err();
        assert!(err.to_string().contains("does not fit the model"), "{err}");
    }
}
