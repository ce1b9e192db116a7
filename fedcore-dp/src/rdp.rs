//! Rényi-DP accountant for the Poisson-sampled Gaussian mechanism.
//!
//! The RDP of one step at order `alpha` follows Mironov, Talwar and Zhang,
//! "Rényi Differential Privacy of the Sampled Gaussian Mechanism" (2019):
//! for integer orders the binomial expansion of `A_alpha`, for fractional
//! orders the two-series expansion with complementary error functions, both
//! summed in log space. Steps compose by adding RDP per order. The
//! conversion to (epsilon, delta) is the one Google's `dp_accounting` and
//! Opacus use today (Canonne, Kamath and Steinke 2020, Proposition 12 of
//! arXiv:2004.00010 v4), minimized over the orders; it is tighter than the
//! classic `rdp - log(delta) / (alpha - 1)`.
//!
//! Written here rather than taken from a crate: no maintained Rust crate
//! implements the sampled-Gaussian RDP bound; the tests pin it to
//! `dp_accounting`'s published values.

use fedcore::PrivacyCost;

use crate::error::{DpError, Result};

/// `dp_accounting`'s default orders: 1.1, 1.2, ..., 10.9, 11, ..., 63, 128,
/// 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((11..64).map(f64::from))
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// Composes privacy costs and converts them to (epsilon, delta).
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// An accountant over [`default_orders`], nothing spent.
    pub fn new() -> Self {
        Self::with_orders(default_orders()).unwrap_or_else(|_| unreachable!("the defaults are > 1"))
    }

    /// An accountant over the given orders (each finite and > 1).
    pub fn with_orders(orders: Vec<f64>) -> Result<Self> {
        if orders.is_empty()
            || orders
                .iter()
                .any(|&a| a.is_nan() || a <= 1.0 || a.is_infinite())
        {
            return Err(DpError::InvalidParams(
                "RDP orders must be finite and greater than 1".into(),
            ));
        }
        let rdp = vec![0.0; orders.len()];
        Ok(Self { orders, rdp })
    }

    /// The orders.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The accumulated RDP per order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// Adds `steps` runs of the Gaussian mechanism with noise multiplier
    /// `sigma`, each on a Poisson sample with rate `q` (add/remove-one
    /// neighbours).
    pub fn compose_sampled_gaussian(&mut self, sigma: f64, q: f64, steps: u64) -> Result<()> {
        check_sampled_gaussian(sigma, q)?;
        for (r, &a) in self.rdp.iter_mut().zip(&self.orders) {
            *r += steps as f64 * rdp_sampled_gaussian(q, sigma, a);
        }
        Ok(())
    }

    /// Adds a cost reported by a mechanism.
    pub fn compose(&mut self, cost: &PrivacyCost) -> Result<()> {
        match sampled_gaussian(cost, "RDP")? {
            Some((sigma, q, steps)) => self.compose_sampled_gaussian(sigma, q, steps),
            None => Ok(()),
        }
    }

    /// The smallest epsilon over the orders at which the composed mechanism is
    /// (epsilon, `delta`)-DP, with the order that gives it. Infinite when no
    /// order gives a finite bound (e.g. sigma = 0).
    pub fn epsilon(&self, delta: f64) -> (f64, f64) {
        epsilon_from_rdp(&self.orders, &self.rdp, delta)
    }
}

/// What the accountants compose: `(sigma, q, steps)` of a sampled-Gaussian
/// cost, `None` for no cost, an error naming `accountant` for anything else.
pub(crate) fn sampled_gaussian(
    cost: &PrivacyCost,
    accountant: &str,
) -> Result<Option<(f64, f64, u64)>> {
    match cost {
        PrivacyCost::None => Ok(None),
        PrivacyCost::SampledGaussian {
            noise_multiplier,
            sampling_rate,
            steps,
        } => Ok(Some((*noise_multiplier, *sampling_rate, *steps))),
        other => Err(DpError::Accounting(format!(
            "the {accountant} accountant cannot compose {other:?}"
        ))),
    }
}

pub(crate) fn check_sampled_gaussian(sigma: f64, q: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&q) {
        return Err(DpError::InvalidParams(format!(
            "sampling rate must be in [0, 1], got {q}"
        )));
    }
    if sigma.is_nan() || sigma < 0.0 || sigma.is_infinite() {
        return Err(DpError::InvalidParams(format!(
            "noise multiplier must be finite and >= 0, got {sigma}"
        )));
    }
    Ok(())
}

/// RDP at order `alpha` of one step of the Gaussian mechanism with noise
/// multiplier `sigma` on a Poisson sample of rate `q`.
pub fn rdp_sampled_gaussian(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if sigma == 0.0 {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    if alpha.is_infinite() {
        return f64::INFINITY;
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// `log(exp(a) - exp(b))` for `a >= b`.
fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        return a;
    }
    if a <= b {
        return f64::NEG_INFINITY;
    }
    a + (-(b - a).exp_m1()).ln()
}

/// `ln erfc(x)`, accurate where `erfc(x)` underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 20.0 {
        libm::erfc(x).ln()
    } else {
        // Asymptotic series: erfc(x) = exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6) ...).
        let r = 1.0 / (x * x);
        -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln()
            + (1.0 - 0.5 * r + 0.75 * r * r - 1.875 * r * r * r).ln()
    }
}

/// `ln A_alpha` for integer `alpha` by the binomial expansion.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let mut log_a = f64::NEG_INFINITY;
    let mut log_binom = 0.0f64;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let a = alpha as f64;
    for i in 0..=alpha {
        let fi = i as f64;
        if i > 0 {
            log_binom += ((a - fi + 1.0) / fi).ln();
        }
        let term = log_binom + fi * lq + (a - fi) * l1q + (fi * fi - fi) / (2.0 * sigma * sigma);
        log_a = log_add(log_a, term);
    }
    log_a
}

/// `ln A_alpha` for fractional `alpha` by the two-series expansion (the
/// binomial coefficients of a fractional order change sign past `alpha`).
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let (lq, l1q) = (q.ln(), (-q).ln_1p());
    let s2 = std::f64::consts::SQRT_2 * sigma;
    let mut coef = 1.0f64; // binom(alpha, i), by the recurrence
    let mut log_coef = 0.0f64;
    let mut i = 0u64;
    loop {
        let fi = i as f64;
        let j = alpha - fi;
        let log_t0 = log_coef + fi * lq + j * l1q;
        let log_t1 = log_coef + j * lq + fi * l1q;
        let log_e0 = 0.5f64.ln() + log_erfc((fi - z0) / s2);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / s2);
        let log_s0 = log_t0 + (fi * fi - fi) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if coef > 0.0 {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        if log_s0.max(log_s1) < -30.0 || i > 100_000 {
            break;
        }
        // binom(alpha, i + 1) = binom(alpha, i) * (alpha - i) / (i + 1).
        let factor = (alpha - fi) / (fi + 1.0);
        coef *= factor;
        log_coef += factor.abs().ln();
        i += 1;
    }
    log_add(log_a0, log_a1)
}

/// The (epsilon, order) conversion of accumulated RDP values, minimized over
/// the orders (Canonne, Kamath, Steinke 2020, Proposition 12).
pub fn epsilon_from_rdp(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(f64::NAN));
    if !(delta > 0.0 && delta < 1.0) {
        return best;
    }
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if delta * delta + (-r).exp_m1() > 0.0 {
            // delta <= sqrt(1 - exp(-KL)): (0, delta)-DP already.
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// Epsilon of `steps` sampled-Gaussian steps at `delta`, over the default orders.
pub fn epsilon_for(sigma: f64, q: f64, steps: u64, delta: f64) -> Result<f64> {
    let mut acc = RdpAccountant::new();
    acc.compose_sampled_gaussian(sigma, q, steps)?;
    Ok(acc.epsilon(delta).0)
}

/// The smallest noise multiplier (to 0.1 %) for which `steps` steps at
/// sampling rate `q` stay within (`epsilon`, `delta`) under RDP
/// ([`crate::Accounting::calibrate_noise`] with [`crate::Accounting::Rdp`]).
pub fn calibrate_noise(epsilon: f64, delta: f64, q: f64, steps: u64) -> Result<f64> {
    crate::Accounting::Rdp.calibrate_noise(epsilon, delta, q, steps)
}
