use fedcore::aggregate::{aggregate_maybe_into, ensure_aggregatable};
use fedcore::{Aggregate, Aggregator, ClientUpdate, PrivacyCost, Spent};

use crate::error::{DpError, Result};

use crate::budget::{Budget, Ledger};
use crate::clip::Clip;
use crate::noise::Noise;

/// Settings of [`Dp`].
#[derive(Debug, Clone, PartialEq)]
pub struct DpParams {
    /// Per-client clipping (norm and tensors); noise covers the same tensors.
    pub clip: Clip,
    /// Noise standard deviation divided by the per-client sensitivity.
    pub noise_multiplier: f64,
    /// The probability that a client takes part in a round (clients per
    /// round / clients), for privacy amplification by sampling.
    pub sampling_rate: f64,
    /// The run's budget; a round that would exceed it is refused.
    pub budget: Budget,
}

impl DpParams {
    /// `clip`, noise multiplier `sigma`, every client in every round, the
    /// default budget (epsilon 1, delta 1e-5).
    pub fn new(clip: Clip, noise_multiplier: f64) -> Self {
        Self {
            clip,
            noise_multiplier,
            sampling_rate: 1.0,
            budget: Budget::default(),
        }
    }

    /// Sets the client sampling rate.
    pub fn with_sampling_rate(mut self, q: f64) -> Self {
        self.sampling_rate = q;
        self
    }

    /// Replaces the budget.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = budget;
        self
    }
}

/// Client-level DP around any aggregator `A`: central DP-FedAvg.
///
/// The server clips every client's update, aggregates, and adds Gaussian
/// noise to the aggregate before it touches the model (McMahan et al.,
/// "Learning Differentially Private Recurrent Language Models", 2018).
/// Clients trust the server with their updates; everyone who sees the
/// models it releases sees only differentially private ones.
///
/// Each round: every update is clipped to `C`, given the same weight (example
/// counts are themselves private and would make the sensitivity unbounded),
/// aggregated by `A`, and N(0, (sigma C / n)^2) noise is added to the clipped
/// tensors of the aggregate, `n` being the updates of the round (Flower's
/// server-side fixed clipping uses the same scale). For the mean, one
/// client's update moves the aggregate by at most `C / n`, so each round is
/// the Gaussian mechanism with noise multiplier `sigma`, accounted with
/// client sampling rate `q`.
///
/// The guarantee needs `A` to move by at most `C / n` when one clipped update
/// changes: true for [`fedcore::FedAvg`] (here with uniform weights) and the
/// trimmed mean; robust aggregators such as the geometric median or Krum can
/// move further, so wrapping them gives robustness and noise but not this
/// accounting.
///
/// The aggregate's metrics carry `dp_epsilon`, `dp_delta`, `dp_noise_std`
/// and `dp_clipped` (clients clipped this round), so every round record and
/// server event reports the run's spending.
#[derive(Debug)]
pub struct Dp<A> {
    inner: A,
    clip: Clip,
    sigma: f64,
    q: f64,
    noise: Noise,
    ledger: Ledger,
}

impl<A: Aggregator> Dp<A> {
    /// Wraps `inner`.
    pub fn new(inner: A, params: DpParams, noise: Noise) -> Result<Self> {
        if !(params.noise_multiplier >= 0.0 && params.noise_multiplier.is_finite()) {
            return Err(DpError::InvalidParams(format!(
                "noise multiplier must be finite and >= 0, got {}",
                params.noise_multiplier
            )));
        }
        if !(params.sampling_rate > 0.0 && params.sampling_rate <= 1.0) {
            return Err(DpError::InvalidParams(format!(
                "client sampling rate must be in (0, 1], got {}",
                params.sampling_rate
            )));
        }
        Ok(Self {
            inner,
            clip: params.clip,
            sigma: params.noise_multiplier,
            q: params.sampling_rate,
            noise,
            ledger: Ledger::new("run", params.budget)?,
        })
    }

    /// The wrapped aggregator.
    pub fn inner(&self) -> &A {
        &self.inner
    }

    /// The run's ledger.
    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Spent so far.
    pub fn spent(&self) -> Spent {
        self.ledger.spent()
    }

    fn cost(&self) -> PrivacyCost {
        PrivacyCost::SampledGaussian {
            noise_multiplier: self.sigma,
            sampling_rate: self.q,
            steps: 1,
        }
    }
}

impl<A: Aggregator> Aggregator for Dp<A> {
    fn state(&self) -> Option<Vec<f32>> {
        self.inner.state()
    }

    fn privatizes(&self) -> bool {
        true
    }

    fn restore(&mut self, state: Vec<f32>) -> fedcore::Result<()> {
        self.inner.restore(state)
    }

    fn name(&self) -> String {
        format!(
            "dp({},{},sigma={})",
            self.inner.name(),
            self.clip.describe(),
            self.sigma
        )
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> fedcore::Result<Aggregate> {
        self.aggregate_with(updates, None)
    }

    fn aggregate_into(
        &mut self,
        updates: &[ClientUpdate],
        buffer: fedcore::Parameters,
    ) -> fedcore::Result<Aggregate> {
        self.aggregate_with(updates, Some(buffer))
    }

    fn min_updates(&self) -> usize {
        self.inner.min_updates()
    }
}

impl<A: Aggregator> Dp<A> {
    /// Clip, the inner rule (into `buffer` where it can), noise.
    fn aggregate_with(
        &mut self,
        updates: &[ClientUpdate],
        buffer: Option<fedcore::Parameters>,
    ) -> fedcore::Result<Aggregate> {
        ensure_aggregatable(updates)?;
        let cost = self.cost();
        self.ledger.check(&cost)?;
        let mut clipped_count = 0usize;
        let clipped: Vec<ClientUpdate> = updates
            .iter()
            .map(|u| {
                let mut values = u.values.clone();
                clipped_count += usize::from(self.clip.apply(&mut values)?.clipped);
                let mut c = u.with_values(values);
                c.num_examples = 1;
                Ok(c)
            })
            .collect::<Result<_>>()?;
        let mut agg = aggregate_maybe_into(&mut self.inner, &clipped, buffer)?;
        let std = self.sigma * self.clip.max_norm() / updates.len() as f64;
        let ranges = self.clip.ranges(&agg.parameters)?;
        let values = agg.parameters.as_mut_slice();
        for r in ranges {
            self.noise.add_gaussian(&mut values[r], std);
        }
        let spent = self.ledger.charge(&cost)?;
        // An inner rule that carries its output to the next round (centered
        // clipping's center) carries the noised aggregate, the one that was
        // released, never its own noiseless one.
        if self.inner.state().is_some() {
            self.inner.restore(agg.parameters.as_slice().to_vec())?;
        }
        agg.metrics.insert("dp_epsilon".into(), spent.epsilon);
        agg.metrics.insert("dp_delta".into(), spent.delta);
        agg.metrics.insert("dp_noise_std".into(), std);
        agg.metrics
            .insert("dp_clipped".into(), clipped_count as f64);
        Ok(agg)
    }
}
