//! Clipping, noise, local DP and the central `Dp` decorator.
#![allow(clippy::unwrap_used)]

use fedcore::contract::{Weighting, check_aggregator};
use fedcore::l2_norm;
use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
use fedcore::memory::InMemoryTransport;
use fedcore::{
    Aggregator, ClientId, ClientUpdate, Error, FedAvg, Model, ModelClient, Parameters, PrivacyCost,
    PrivacyMechanism, RoundOutcome, RunEnd, Server, ServerConfig, ServerEvent,
};
use fedcore_dp::{Budget, Clip, Dp, DpParams, LocalDp, LocalDpParams, Noise};
use proptest::prelude::*;

fn params(tensors: &[(&str, Vec<f32>)]) -> Parameters {
    Parameters::from_tensors(
        tensors
            .iter()
            .map(|(n, v)| (n.to_string(), vec![v.len()], v.clone())),
    )
    .unwrap()
}

proptest! {
    #[test]
    fn clipping_never_lengthens_and_leaves_short_vectors_alone(
        body in prop::collection::vec(-100.0f32..100.0, 1..60),
        head in prop::collection::vec(-100.0f32..100.0, 1..20),
        max_norm in 0.01f64..200.0,
    ) {
        let p = params(&[("body.w", body.clone()), ("classifier.w", head.clone())]);
        let before = p.l2_norm();

        let mut whole = p.clone();
        let r = Clip::new(max_norm).unwrap().apply(&mut whole).unwrap();
        prop_assert!(whole.l2_norm() <= before);
        prop_assert!(whole.l2_norm() <= max_norm);
        prop_assert_eq!(r.clipped, before > max_norm);
        if before <= max_norm {
            prop_assert_eq!(&whole, &p);
        } else {
            // Direction kept: a positive multiple of the input.
            let s = whole.as_slice()[0] / p.as_slice()[0];
            for (a, b) in whole.as_slice().iter().zip(p.as_slice()) {
                prop_assert!((a - s * b).abs() <= 1e-4 * b.abs().max(1e-3));
            }
        }

        // Only the body: the head is untouched, the body within the bound.
        let mut part = p.clone();
        Clip::new(max_norm).unwrap().only(&["body.*"]).apply(&mut part).unwrap();
        prop_assert_eq!(part.tensor("classifier.w").unwrap(), &head[..]);
        prop_assert!(l2_norm(part.tensor("body.w").unwrap()) <= max_norm.min(l2_norm(&body)));

        // Per layer: each tensor within max_norm / sqrt(2), so the whole within max_norm.
        let mut layered = p.clone();
        Clip::new(max_norm).unwrap().per_layer().apply(&mut layered).unwrap();
        prop_assert!(layered.l2_norm() <= max_norm.min(before) * (1.0 + 1e-6));
        for name in ["body.w", "classifier.w"] {
            let (a, b) = (layered.tensor(name).unwrap(), p.tensor(name).unwrap());
            prop_assert!(l2_norm(a) <= (max_norm / 2f64.sqrt()).min(l2_norm(b)) * (1.0 + 1e-6));
        }
    }
}

#[test]
fn bad_clipping_norms_are_refused() {
    for c in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(
            matches!(Clip::new(c), Err(fedcore_dp::DpError::InvalidParams(_))),
            "{c}"
        );
    }
    let mut p = params(&[("a", vec![3.0, 4.0])]);
    assert!(
        Clip::new(1.0)
            .unwrap()
            .only(&["nope.*"])
            .apply(&mut p)
            .is_err()
    );
}

/// Sample mean, standard deviation and fraction within one deviation.
fn moments(v: &[f32]) -> (f64, f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    let var = v
        .iter()
        .map(|&x| (f64::from(x) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    let sd = var.sqrt();
    let inside = v
        .iter()
        .filter(|&&x| (f64::from(x) - mean).abs() <= sd)
        .count() as f64
        / n;
    (mean, sd, inside)
}

#[test]
fn gaussian_noise_has_the_requested_scale() {
    // 10^6 draws: the standard error of the sample deviation is
    // sd / sqrt(2n) = 0.07 %, of the mean sd / 1000; the bounds below are
    // about 7 standard errors wide, and a wrong scale (a missing sqrt, a
    // forgotten clip norm) misses them by orders of magnitude.
    let std = 2.5;
    let mut v = vec![0.0f32; 1_000_000];
    Noise::dangerous().seeded(42).add_gaussian(&mut v, std);
    let (mean, sd, inside) = moments(&v);
    assert!(mean.abs() < 7.0 * std / 1000.0, "mean {mean}");
    assert!((sd / std - 1.0).abs() < 0.005, "sd {sd}");
    // Shape: P(|Z| <= 1) = 0.682689 for a normal; 7 standard errors of a
    // proportion at n = 10^6 is 0.0033.
    assert!((inside - 0.682689).abs() < 0.0033, "inside {inside}");
}

fn local(sigma: f64, budget: Budget) -> LocalDp {
    let p = LocalDpParams::new(Clip::new(1.0).unwrap(), sigma).with_budget(budget);
    LocalDp::new("client1", p, Noise::dangerous().seeded(3)).unwrap()
}

#[test]
fn local_dp_clips_noises_and_reports_its_cost() {
    let mut m = local(0.5, Budget::new(f64::INFINITY, 1e-5).unwrap());
    let mut u = params(&[("w", vec![0.0; 100_000])]);
    let cost = m.privatize(&mut u).unwrap();
    assert_eq!(
        cost,
        PrivacyCost::SampledGaussian {
            noise_multiplier: 0.5,
            sampling_rate: 1.0,
            steps: 1
        }
    );
    let (_, sd, _) = moments(u.as_slice());
    assert!(
        (sd / 0.5 - 1.0).abs() < 0.03,
        "noise sd {sd} for sigma 0.5 and C 1"
    );
    assert!(m.name().contains("seeded"));
    let spent = m.spent().unwrap();
    assert!(spent.epsilon > 0.0 && spent.delta == 1e-5);
}

#[test]
fn local_dp_refuses_once_the_budget_would_be_exceeded_and_leaves_the_update_alone() {
    // sigma = 5, no sampling: each release costs about 0.95 at delta 1e-5
    // alone, so a budget of 2 allows two releases at most.
    let mut m = local(5.0, Budget::new(2.0, 1e-5).unwrap());
    let mut released = 0;
    let err = loop {
        let mut u = params(&[("w", vec![3.0, 4.0])]);
        let before = u.clone();
        match m.privatize(&mut u) {
            Ok(_) => released += 1,
            Err(e) => {
                assert_eq!(u, before, "a refused release must not touch the update");
                break e;
            }
        }
        assert!(released < 100);
    };
    assert!(released >= 1);
    assert!(m.ledger().epsilon() <= 2.0);
    match err {
        Error::PrivacyBudgetExhausted {
            who, budget, next, ..
        } => {
            assert_eq!(who, "client1");
            assert_eq!(budget, 2.0);
            assert!(next > 2.0);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn a_resumed_local_dp_counts_the_earlier_releases() {
    let budget = Budget::new(2.0, 1e-5).unwrap();
    let mut fresh = local(5.0, budget);
    fresh.privatize(&mut params(&[("w", vec![1.0])])).unwrap();
    let resumed = local(5.0, budget).resumed(1).unwrap();
    assert_eq!(resumed.ledger().releases(), 1);
    assert_eq!(resumed.ledger().epsilon(), fresh.ledger().epsilon());
    // Past the budget: refused at start, not after spending it again.
    assert!(matches!(
        local(5.0, budget).resumed(50),
        Err(fedcore_dp::DpError::BudgetExhausted { .. })
    ));
}

#[test]
fn budget_exhaustion_stops_federated_training_with_a_clear_error() {
    let mut t = InMemoryTransport::new();
    for i in 0..3u64 {
        let data = synthetic_blobs(100 + i, 60, 4, 3, 2.0);
        let dp = LocalDp::new(
            format!("client{}", i + 1),
            LocalDpParams::new(Clip::new(1.0).unwrap(), 5.0)
                .with_budget(Budget::new(2.0, 1e-5).unwrap()),
            Noise::dangerous().seeded(i),
        )
        .unwrap();
        t.add_client(
            ModelClient::new(
                format!("client{}", i + 1),
                SoftmaxRegression::new(4, 3),
                data,
            )
            .with_mechanism(dp),
        )
        .unwrap();
    }
    let config = ServerConfig {
        rounds: 20,
        min_fit_clients: 3,
        ..ServerConfig::default()
    };
    let mut server =
        Server::new(config, SoftmaxRegression::new(4, 3).parameters(), t, FedAvg).unwrap();
    let (tx, events) = std::sync::mpsc::channel();
    server.subscribe(tx);
    // Once the budget is spent every round loses its quorum; the default
    // policy ends the run after three such rounds in a row.
    let report = server.run().unwrap();
    assert_eq!(report.end, RunEnd::TooManyFailedRounds { in_a_row: 3 });
    let last = server.history().last().unwrap();
    assert_eq!(last.outcome, RoundOutcome::QuorumNotReached);
    let err = last.ensure_completed().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("privacy budget"), "{text}");
    let done = server
        .history()
        .iter()
        .filter(|r| r.accepted.len() == 3)
        .count();
    assert!(
        (1..20).contains(&done),
        "{done} rounds before the budget ran out"
    );
    // Every completed round reported each client's spending, growing.
    let mut last = 0.0;
    for ev in events.try_iter() {
        if let ServerEvent::RoundFinished { record } = ev {
            let eps: Vec<f64> = record
                .accepted
                .iter()
                .map(|a| a.provenance[0].spent.unwrap().epsilon)
                .collect();
            assert!(eps.iter().all(|&e| e > last && e <= 2.0), "{eps:?}");
            last = eps[0];
        }
    }
    assert!(last > 0.0);
}

fn update(i: usize, values: Vec<f32>) -> ClientUpdate {
    ClientUpdate::new(
        ClientId::new(format!("c{i}")),
        1,
        10 * (i as u64 + 1),
        params(&[("w", values)]),
    )
}

#[test]
fn dp_decorator_passes_the_aggregator_contract() {
    // Negligible noise and no budget, so the contract's exact checks apply;
    // example counts are replaced by uniform weights.
    check_aggregator(
        || {
            let p = DpParams::new(Clip::new(1e6).unwrap(), 1e-12)
                .with_budget(Budget::new(f64::INFINITY, 1e-5).unwrap());
            Dp::new(FedAvg, p, Noise::dangerous().seeded(1)).unwrap()
        },
        Weighting::Uniform,
    );
}

#[test]
fn dp_decorator_clips_each_client_and_noises_the_mean() {
    let n = 4;
    let d = 200_000;
    let sigma = 1.5;
    let p = DpParams::new(Clip::new(2.0).unwrap(), sigma)
        .with_sampling_rate(0.5)
        .with_budget(Budget::new(f64::INFINITY, 1e-5).unwrap());
    let mut dp = Dp::new(FedAvg, p, Noise::dangerous().seeded(9)).unwrap();
    // One huge update is clipped to norm 2 like the others: its influence on
    // the mean is bounded by C / n whatever it sends.
    let mut ups: Vec<ClientUpdate> = (0..n).map(|i| update(i, vec![0.0; d])).collect();
    ups[0].values.as_mut_slice()[0] = 1e9;
    let agg = dp.aggregate(&ups).unwrap();
    let v = agg.parameters.as_slice();
    let std = sigma * 2.0 / n as f64;
    let (_, sd, _) = moments(&v[1..]);
    assert!(
        (sd / std - 1.0).abs() < 0.01,
        "noise sd {sd}, expected {std}"
    );
    assert!(
        (v[0] - 0.5).abs() < 6.0 * std as f32,
        "clipped outlier gives C/n = 0.5 plus noise, got {}",
        v[0]
    );
    assert_eq!(agg.metrics["dp_clipped"], 1.0);
    let e1 = agg.metrics["dp_epsilon"];
    let e2 = dp.aggregate(&ups).unwrap().metrics["dp_epsilon"];
    assert!(e2 > e1 && e1 > 0.0);
}

/// An inner rule that keeps its last output (as centered clipping keeps
/// its center): under `Dp` it must keep the released, noised aggregate.
#[derive(Default)]
struct KeepsLast(Vec<f32>);

impl Aggregator for KeepsLast {
    fn name(&self) -> String {
        "keeps-last".into()
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> fedcore::Result<fedcore::Aggregate> {
        let agg = FedAvg.aggregate(updates)?;
        self.0 = agg.parameters.as_slice().to_vec();
        Ok(agg)
    }

    fn state(&self) -> Option<Vec<f32>> {
        Some(self.0.clone())
    }

    fn restore(&mut self, state: Vec<f32>) -> fedcore::Result<()> {
        self.0 = state;
        Ok(())
    }
}

#[test]
fn an_inner_rule_with_state_keeps_the_noised_aggregate() {
    let p = DpParams::new(Clip::new(1.0).unwrap(), 1.0)
        .with_budget(Budget::new(f64::INFINITY, 1e-5).unwrap());
    let mut dp = Dp::new(KeepsLast::default(), p, Noise::dangerous().seeded(4)).unwrap();
    let ups: Vec<ClientUpdate> = (0..3).map(|i| update(i, vec![0.1; 50])).collect();
    let agg = dp.aggregate(&ups).unwrap();
    assert_ne!(agg.parameters.as_slice(), &[0.1; 50][..], "noised");
    assert_eq!(dp.state().unwrap(), agg.parameters.as_slice());
}

#[test]
fn dp_decorator_refuses_a_round_past_the_budget() {
    let p =
        DpParams::new(Clip::new(1.0).unwrap(), 1.0).with_budget(Budget::new(5.0, 1e-5).unwrap());
    let mut dp = Dp::new(FedAvg, p, Noise::secure().unwrap()).unwrap();
    let ups: Vec<ClientUpdate> = (0..3).map(|i| update(i, vec![0.1; 10])).collect();
    let mut rounds = 0;
    let err = loop {
        match dp.aggregate(&ups) {
            Ok(_) => rounds += 1,
            Err(e) => break e,
        }
    };
    assert!(rounds >= 1 && dp.ledger().epsilon() <= 5.0, "{rounds}");
    assert!(matches!(err, Error::PrivacyBudgetExhausted { .. }), "{err}");
    // Still refused, still nothing spent.
    let before = dp.ledger().epsilon();
    assert!(dp.aggregate(&ups).is_err());
    assert_eq!(dp.ledger().epsilon(), before);
}

/// SCAFFOLD's control variate moves by the clients' raw variate changes,
/// which central DP does not cover: SCAFFOLD over `Dp` is refused, also
/// behind a pre-aggregation wrapper's `Box`.
#[test]
fn scaffold_refuses_central_dp_as_its_inner_rule() {
    let p = DpParams::new(Clip::new(1.0).unwrap(), 1.0)
        .with_budget(Budget::new(f64::INFINITY, 1e-5).unwrap());
    let layout = SoftmaxRegression::new(3, 2).parameters().layout().clone();
    let dp = Dp::new(FedAvg, p.clone(), Noise::dangerous().seeded(1)).unwrap();
    let err = fedcore::Scaffold::new(dp, layout.clone(), 3).unwrap_err();
    assert!(err.to_string().contains("central DP"), "{err}");
    let boxed: Box<dyn fedcore::Aggregator> =
        Box::new(Dp::new(FedAvg, p, Noise::dangerous().seeded(1)).unwrap());
    assert!(fedcore::Scaffold::new(boxed, layout.clone(), 3).is_err());
    assert!(fedcore::Scaffold::new(FedAvg, layout, 3).is_ok());
}
