//! The PLD accountant against Google's dp_accounting (PyPI `dp-accounting`
//! 0.6.0), whose values `benches/reference/pld_reference.py` wrote to
//! `tests/data/pld_reference.json`: within 1 % on every point of the grid,
//! and below our own RDP accountant's epsilon (the point of a PLD).
#![allow(clippy::unwrap_used)]

use fedcore_dp::{PldAccountant, RdpAccountant};
use serde_json::Value;

#[test]
fn pld_epsilon_matches_dp_accounting_within_one_percent() {
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
            err < 0.01,
            "sigma {sigma} q {q} steps {steps}: {got} vs {want}"
        );
        assert!(got < rdp_eps, "PLD {got} not below RDP {rdp_eps}");
    }
    println!("worst relative difference {:.3} %", 100.0 * worst);
}
