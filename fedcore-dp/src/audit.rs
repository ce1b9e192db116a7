//! An empirical check of a DP guarantee in one training run: canaries are
//! each put into the training data with probability 1/2, the released
//! model scores every canary, and the guesses "in" for the best-scored and
//! "out" for the worst-scored are checked against the truth. An
//! epsilon-DP training cannot make more of them right than a coin that is
//! right with probability `e^eps / (1 + e^eps)` (Steinke, Nasr and
//! Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023),
//! so the number of right guesses gives, with confidence `1 - beta`, a
//! lower bound on epsilon.
//!
//! This is the paper's bound for delta = 0, without its correction for
//! delta > 0: read it as an approximate lower bound for an (epsilon, delta)
//! guarantee with a small delta.

use crate::error::{DpError, Result};

/// What an audit found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuditOutcome {
    /// Canaries scored.
    pub canaries: usize,
    /// Guesses made ("in" for the best-scored, "out" for the worst-scored).
    pub guesses: usize,
    /// Guesses that were right.
    pub correct: usize,
    /// The largest epsilon the right guesses rule out at the confidence
    /// (0 when they are no better than chance).
    pub epsilon_lower_bound: f64,
}

/// Audits one run: `scores[i]` is how strongly the released model suggests
/// canary `i` was trained on (e.g. minus its loss), `included[i]` whether
/// it was. Guesses "in" for the `guesses / 2` best-scored canaries and "out"
/// for the `guesses / 2` worst-scored (fix `guesses` before looking at the
/// scores); `confidence` is e.g. 0.95.
pub fn one_run_audit(
    scores: &[f64],
    included: &[bool],
    guesses: usize,
    confidence: f64,
) -> Result<AuditOutcome> {
    let m = scores.len();
    if m != included.len() || m == 0 {
        return Err(DpError::InvalidParams(format!(
            "{} scores for {} canaries",
            m,
            included.len()
        )));
    }
    if let Some(bad) = scores.iter().find(|s| s.is_nan()) {
        return Err(DpError::InvalidParams(format!("a canary's score is {bad}")));
    }
    let half = guesses / 2;
    if half == 0 || 2 * half > m {
        return Err(DpError::InvalidParams(format!(
            "{guesses} guesses for {m} canaries: make at least 2 and at most {m}"
        )));
    }
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(DpError::InvalidParams(format!(
            "the confidence must be in (0, 1), got {confidence}"
        )));
    }
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let correct = order[..half].iter().filter(|&&i| included[i]).count()
        + order[m - half..].iter().filter(|&&i| !included[i]).count();
    let r = 2 * half;
    let beta = 1.0 - confidence;
    // P[Binomial(r, p(eps)) >= correct] grows with eps: the bound is the
    // largest eps where it is still at most beta.
    let tail_at = |eps: f64| binomial_tail(r, correct, 1.0 / (1.0 + (-eps).exp()));
    let epsilon_lower_bound = if tail_at(0.0) > beta {
        0.0
    } else {
        let (mut lo, mut hi) = (0.0f64, 1.0f64);
        while tail_at(hi) <= beta && hi < 1e3 {
            lo = hi;
            hi *= 2.0;
        }
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if tail_at(mid) <= beta {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    };
    Ok(AuditOutcome {
        canaries: m,
        guesses: r,
        correct,
        epsilon_lower_bound,
    })
}

/// `P[Binomial(n, p) >= k]`, summed exactly in log space. (A binomial
/// tail for n up to a few thousand is a short sum; a statistics crate
/// would bring a linear-algebra dependency for this one line.)
fn binomial_tail(n: usize, k: usize, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    if p <= 0.0 {
        return 0.0;
    }
    let (lp, lq) = (p.ln(), (1.0 - p).ln());
    // ln C(n, k), then each next term from the one before.
    let mut ln_c: f64 = (0..k)
        .map(|i| ((n - i) as f64).ln() - ((i + 1) as f64).ln())
        .sum();
    let mut terms = Vec::with_capacity(n - k + 1);
    for j in k..=n {
        terms.push(ln_c + j as f64 * lp + (n - j) as f64 * lq);
        if j < n {
            ln_c += ((n - j) as f64).ln() - ((j + 1) as f64).ln();
        }
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln())
        .min(0.0)
        .exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binomial_tail_is_exact() {
        // P[Bin(4, 1/2) >= 3] = 5/16; P[Bin(10, 0.3) >= 0] = 1.
        assert!((binomial_tail(4, 3, 0.5) - 5.0 / 16.0).abs() < 1e-12);
        assert_eq!(binomial_tail(10, 0, 0.3), 1.0);
        assert_eq!(binomial_tail(3, 4, 0.3), 0.0);
        // P[Bin(20, 0.9) >= 20] = 0.9^20.
        assert!((binomial_tail(20, 20, 0.9) - 0.9f64.powi(20)).abs() < 1e-12);
        // Summing to one: P[>= 0] with the terms computed one by one.
        let all: f64 = (0..=30)
            .map(|k| binomial_tail(30, k, 0.37) - binomial_tail(30, k + 1, 0.37))
            .sum();
        assert!((all - 1.0).abs() < 1e-9);
    }

    /// Canaries whose scores tell membership with probability `right`.
    fn canaries(m: usize, right: f64, seed: u64) -> (Vec<f64>, Vec<bool>) {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
        (0..m)
            .map(|_| {
                let inside = rng.random_bool(0.5);
                let told = if rng.random_bool(right) {
                    inside
                } else {
                    !inside
                };
                let score = if told { 1.0 } else { -1.0 } + rng.random::<f64>() * 0.1;
                (score, inside)
            })
            .unzip()
    }

    #[test]
    fn a_leaky_run_gets_a_positive_bound_and_a_blind_one_none() {
        // Scores that tell membership 90 % of the time: a pure-DP mechanism
        // doing that has epsilon >= ln 9 = 2.2; the bound is positive and
        // below that.
        let (s, inc) = canaries(2000, 0.9, 1);
        let a = one_run_audit(&s, &inc, 400, 0.95).unwrap();
        assert!(a.correct > 300, "{a:?}");
        assert!(
            a.epsilon_lower_bound > 1.0 && a.epsilon_lower_bound < 9f64.ln(),
            "{a:?}"
        );
        // Scores that say nothing: no bound.
        let (s, inc) = canaries(2000, 0.5, 2);
        let a = one_run_audit(&s, &inc, 400, 0.95).unwrap();
        assert!(a.epsilon_lower_bound < 0.3, "{a:?}");
        // Perfect scores of few guesses give a modest bound: few
        // observations cannot prove much.
        let (s, inc) = canaries(100, 1.0, 3);
        let few = one_run_audit(&s, &inc, 10, 0.95).unwrap();
        assert_eq!(few.correct, 10);
        assert!(few.epsilon_lower_bound < 2.0, "{few:?}");
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(one_run_audit(&[1.0], &[true, false], 2, 0.95).is_err());
        assert!(one_run_audit(&[1.0, f64::NAN], &[true, false], 2, 0.95).is_err());
        assert!(one_run_audit(&[1.0, 0.0], &[true, false], 4, 0.95).is_err());
        assert!(one_run_audit(&[1.0, 0.0], &[true, false], 2, 1.0).is_err());
    }
}
