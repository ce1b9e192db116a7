//! The PLD accountant against Google's dp_accounting (PyPI `dp-accounting`
//! 0.6.0), whose values `benches/reference/pld_reference.py` wrote to
//! `tests/data/pld_reference.json`: the issue asks for 1 %; both compute the
//! same discretization, so we hold them to 1e-5 relative on every point of
//! the grid, and below our own RDP accountant's epsilon (the point of a PLD).
#![allow(clippy::unwrap_used)]

use fedcore::PrivacyCost;
use fedcore_dp::{Accounting, Budget, Ledger, PldAccountant, RdpAccountant};
use serde_json::Value;

#[test]
fn pld_epsilon_matches_dp_accounting() {
    let reference: Value = serde_json::from_str(include_str!("data/pld_reference.json")).unwrap();
    let rows = reference["rows"].as_array().unwrap();
    assert!(rows.len() >= 20, "the committed grid");
    let mut worst: f64 = 0.0;
    for row in rows {
        let f = |k: &str| row[k].as_f64().unwrap();
        let (sigma, q, delta) = (f("sigma"), f("q"), f("delta"));
        let steps = row["steps"].as_u64().unwrap();
        let mut pld = PldAccountant::new();
        pld.compose_sampled_gaussian(sigma, q, steps).unwrap();
        let got = pld.epsilon(delta);
        let want = f("pld_epsilon");
        let err = (got - want).abs() / want;
        worst = worst.max(err);
        let mut rdp = RdpAccountant::new();
        rdp.compose_sampled_gaussian(sigma, q, steps).unwrap();
        let (rdp_eps, _) = rdp.epsilon(delta);
        println!(
            "sigma {sigma} q {q:.5} steps {steps}: pld {got:.6} (dp_accounting {want:.6}, {:+.4} %), rdp {rdp_eps:.4}",
            100.0 * (got - want) / want
        );
        assert!(
            err < 1e-5,
            "sigma {sigma} q {q} steps {steps}: {got} vs {want}"
        );
        assert!(got < rdp_eps, "PLD {got} not below RDP {rdp_eps}");
    }
    println!("worst relative difference {worst:e}");
}

#[test]
fn pld_calibration_asks_for_less_noise_for_the_same_budget() {
    let (eps, delta, q, steps) = (1.0, 1e-5, 0.01, 1_000);
    let rdp = Accounting::Rdp
        .calibrate_noise(eps, delta, q, steps)
        .unwrap();
    let pld = Accounting::Pld
        .calibrate_noise(eps, delta, q, steps)
        .unwrap();
    assert!(pld < 0.97 * rdp, "PLD sigma {pld} vs RDP {rdp}");
    let spent = Accounting::Pld.epsilon(pld, q, steps, delta).unwrap();
    assert!(spent <= eps, "{spent}");
    let less = Accounting::Pld
        .epsilon(pld * 0.99, q, steps, delta)
        .unwrap();
    assert!(less > eps, "{less}");
}

#[test]
fn a_pld_ledger_fits_more_releases_in_the_same_budget() {
    let cost = PrivacyCost::SampledGaussian {
        noise_multiplier: 1.0,
        sampling_rate: 0.01,
        steps: 100,
    };
    let count = |accounting: Accounting| {
        let budget = Budget::new(1.5, 1e-5).unwrap().with_accounting(accounting);
        let mut ledger = Ledger::new("h", budget).unwrap();
        let mut n = 0;
        while ledger.charge(&cost).is_ok() {
            n += 1;
        }
        assert!(ledger.epsilon() <= 1.5);
        (n, ledger.epsilon())
    };
    let (rdp, _) = count(Accounting::Rdp);
    let (pld, spent) = count(Accounting::Pld);
    assert!(pld > rdp, "PLD {pld} releases vs RDP {rdp}");
    // The ledger's epsilon is the accountant's for what it charged.
    let mut acc = PldAccountant::new();
    acc.compose_sampled_gaussian(1.0, 0.01, 100 * pld).unwrap();
    assert!((acc.epsilon(1e-5) - spent).abs() < 1e-6, "{spent}");
}
