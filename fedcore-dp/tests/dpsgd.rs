//! DP-SGD on the small CNN: it learns, it clips, it refuses BatchNorm and
//! an exhausted budget, and its spending reaches the update's provenance.
#![cfg(feature = "tch")]
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use fedcore::data::{
    ChestXray14, ChestXrayConfig, DataSplit, SyntheticXrays, Targets, synthetic_digits,
    write_synthetic_chestxray,
};
use fedcore::models::{DenseNet, DenseNetConfig, Device, Normalization, SmallCnn, TchModel};
use fedcore::{Client, Error, FitIns, Model, ModelClient, Optimizer, PrivacyCost, TrainConfig};
use fedcore_dp::{Budget, DpSgd, DpSgdConfig, Noise};

fn cnn(seed: u64) -> TchModel<SmallCnn> {
    TchModel::build(Device::Cpu, seed, |b| SmallCnn::build(b, 1, 28, 10)).unwrap()
}

fn sgd(epochs: usize, batch_size: usize, lr: f64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size,
        learning_rate: lr,
        optimizer: Optimizer::Sgd { momentum: 0.5 },
        seed: 1,
        ..TrainConfig::default()
    }
}

/// Two small dense blocks with GroupNorm, one input channel; 14 labels
/// unless changed.
fn small_group_norm_config() -> DenseNetConfig {
    DenseNetConfig {
        block_config: vec![2, 2],
        growth_rate: 8,
        num_init_features: 16,
        bn_size: 2,
        norm: Normalization::Group { groups: 8 },
        ..DenseNetConfig::densenet121(1, fedcore::models::Activation::Relu)
    }
}

fn small_group_norm_densenet(config: DenseNetConfig, seed: u64) -> TchModel<DenseNet> {
    TchModel::build(Device::Cpu, seed, |b| DenseNet::build(b, config)).unwrap()
}

fn unlimited() -> Budget {
    Budget::new(f64::INFINITY, 1e-5).unwrap()
}

#[test]
fn dp_sgd_learns_the_synthetic_digits() {
    let train = DataSplit::all(Arc::new(synthetic_digits(600, 1)));
    let test = DataSplit::all(Arc::new(synthetic_digits(200, 2)));
    let config = DpSgdConfig::new(1.0, 0.8).with_budget(unlimited());
    let mut m = DpSgd::new("client1", cnn(0), config, Noise::dangerous().seeded(5)).unwrap();
    let before = m.evaluate(&test).unwrap().metrics["accuracy"];
    let out = m.fit(&train, &sgd(4, 60, 0.5)).unwrap();
    let after = m.evaluate(&test).unwrap().metrics["accuracy"];
    assert!(
        after > 0.8 && after > before + 0.3,
        "accuracy {before} -> {after}"
    );
    assert_eq!(out.metrics["steps"], 40.0);
    match &out.privacy[0].cost {
        PrivacyCost::SampledGaussian {
            noise_multiplier,
            sampling_rate,
            steps,
        } => {
            assert_eq!((*noise_multiplier, *sampling_rate, *steps), (0.8, 0.1, 40));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn each_sample_is_clipped_before_the_step() {
    // Tiny clipping norm, negligible noise, the whole set in one step
    // (q = 1): the step is lr * (sum of clipped gradients) / n, whose norm is
    // at most lr * C however large the raw gradients are.
    let data = DataSplit::all(Arc::new(synthetic_digits(16, 3)));
    let (c, lr) = (1e-3, 1.0);
    let config = DpSgdConfig::new(c, 1e-9).with_budget(unlimited());
    let mut m = DpSgd::new("c", cnn(1), config, Noise::dangerous().seeded(1)).unwrap();
    let before = m.parameters();
    let mut tc = sgd(1, 16, lr);
    tc.optimizer = Optimizer::Sgd { momentum: 0.0 };
    m.fit(&data, &tc).unwrap();
    let step = m.parameters().sub(&before).unwrap().l2_norm();
    assert!(
        step > 0.0 && step <= lr * c * (1.0 + 1e-3),
        "step norm {step}"
    );
    // The raw per-sample gradients are far longer than C.
    let b = data.batches(16, None).next().unwrap().unwrap();
    let g = cnn(1)
        .per_sample_gradients(&b.images, b.shape, &b.targets)
        .unwrap();
    let norms = g.grads.norm_scalaropt_dim(2, [1], false);
    assert!(norms.min().double_value(&[]) > 100.0 * c);
}

#[test]
fn dp_sgd_trains_a_group_norm_densenet() {
    // The BatchNorm-free DenseNet variant, two small blocks, on 28 x 28
    // digits: DP-SGD accepts it (one traced backward pass per step) and the
    // noisy, clipped steps still learn (seeded: 0.14 -> 0.52 here).
    let net = small_group_norm_densenet(
        DenseNetConfig {
            num_classes: 10,
            multi_label: false,
            ..small_group_norm_config()
        },
        3,
    );
    let train = DataSplit::all(Arc::new(synthetic_digits(300, 3)));
    let test = DataSplit::all(Arc::new(synthetic_digits(100, 4)));
    let config = DpSgdConfig::new(1.0, 0.5).with_budget(unlimited());
    let mut m = DpSgd::new("h1", net, config, Noise::dangerous().seeded(2)).unwrap();
    let before = m.evaluate(&test).unwrap().metrics["accuracy"];
    let out = m.fit(&train, &sgd(3, 50, 0.5)).unwrap();
    let after = m.evaluate(&test).unwrap().metrics["accuracy"];
    assert_eq!(out.metrics["steps"], 18.0);
    assert!(out.metrics["loss"].is_finite());
    assert!(
        after > 0.35 && after > before + 0.2,
        "accuracy {before} -> {after}"
    );
}

#[test]
fn dp_sgd_lowers_the_loss_of_a_group_norm_densenet_on_synthetic_xrays() {
    // 14 labels, 1 x 32 x 32 synthetic X-rays (the demo's generator at its
    // own difficulty), a GroupNorm DenseNet of two small blocks.
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_chestxray(
        dir.path(),
        &SyntheticXrays {
            patients: 60,
            size: 48,
            seed: 5,
            ..SyntheticXrays::default()
        },
    )
    .unwrap();
    let xrays = ChestXray14::open(
        dir.path(),
        ChestXrayConfig {
            size: 32,
            ..ChestXrayConfig::default()
        },
    )
    .unwrap();
    let data = DataSplit::all(Arc::new(xrays));
    let net = small_group_norm_densenet(small_group_norm_config(), 4);
    let config = DpSgdConfig::new(1.0, 0.7).with_budget(unlimited());
    let mut m = DpSgd::new("h1", net, config, Noise::dangerous().seeded(8)).unwrap();
    // What predicting each label's frequency scores: a model that only
    // learned the classifier's biases gets this loss, not less.
    let mut counts = [0.0f64; 14];
    let mut n = 0.0;
    for batch in data.batches(64, None) {
        let Targets::MultiLabel { values, labels } = batch.unwrap().targets else {
            panic!("multi-label targets")
        };
        for row in values.chunks(labels) {
            for (c, &v) in counts.iter_mut().zip(row) {
                *c += f64::from(v);
            }
            n += 1.0;
        }
    }
    let prevalence_loss = counts
        .iter()
        .map(|c| {
            let p = (c / n).clamp(1e-6, 1.0 - 1e-6);
            -(p * p.ln() + (1.0 - p) * (1.0 - p).ln())
        })
        .sum::<f64>()
        / 14.0;
    let before = m.evaluate(&data).unwrap().loss;
    let out = m.fit(&data, &sgd(3, 20, 0.5)).unwrap();
    let after = m.evaluate(&data).unwrap().loss;
    assert!(out.metrics["dp_epsilon"].is_finite() && out.metrics["dp_epsilon"] > 0.0);
    // The noisy, clipped steps reach the loss of the label frequencies (what
    // 60 patients at 32 x 32 teach in three epochs: even noise-free SGD
    // gets no further here; `dp_sgd_trains_a_group_norm_densenet` shows the
    // body learning on digits).
    assert!(
        after.is_finite() && after < 0.6 * before,
        "loss {before} -> {after}"
    );
    assert!(
        after < 1.05 * prevalence_loss,
        "loss {after} vs {prevalence_loss} for the label frequencies"
    );
}

#[test]
fn batch_norm_networks_are_refused_with_a_reason() {
    let net = TchModel::build(Device::Cpu, 0, |b| {
        DenseNet::build(
            b,
            DenseNetConfig {
                block_config: vec![1, 1],
                growth_rate: 4,
                num_init_features: 8,
                bn_size: 2,
                ..DenseNetConfig::densenet121(1, fedcore::models::Activation::Relu)
            },
        )
    })
    .unwrap();
    let e = DpSgd::new(
        "c",
        net,
        DpSgdConfig::new(1.0, 1.0),
        Noise::secure().unwrap(),
    )
    .unwrap_err();
    assert!(
        matches!(e, fedcore_dp::DpError::InvalidParams(_)) && e.to_string().contains("BatchNorm"),
        "{e}"
    );
}

#[test]
fn an_exhausted_budget_refuses_the_next_fit_and_spending_reaches_provenance() {
    let data = DataSplit::all(Arc::new(synthetic_digits(40, 4)));
    // One fit: 2 steps at q = 0.5, sigma 1.5; the budget holds two and a half.
    let one = fedcore_dp::epsilon_for(1.5, 0.5, 2, 1e-5).unwrap();
    let budget = 2.5 * one;
    let config = DpSgdConfig::new(1.0, 1.5).with_budget(Budget::new(budget, 1e-5).unwrap());
    let dp = DpSgd::new("client1", cnn(2), config, Noise::dangerous().seeded(2)).unwrap();
    let mut client = ModelClient::new("client1", dp, data);
    let global = Arc::new(cnn(2).parameters());
    let ins = FitIns {
        round: 1,
        parameters: global.clone(),
        config: sgd(3, 20, 0.5),
        sealed: None,
        extra: None,
    };
    let mut fits = 0;
    let mut last = 0.0;
    let err = loop {
        match client.fit(&FitIns {
            round: fits + 1,
            ..ins.clone()
        }) {
            Ok(u) => {
                let p = &u.provenance[0];
                assert!(p.mechanism.starts_with("dp-sgd("), "{}", p.mechanism);
                let spent = p.spent.unwrap();
                assert!(
                    spent.epsilon > last && spent.epsilon <= budget && spent.budget == Some(budget)
                );
                last = spent.epsilon;
                fits += 1;
            }
            Err(e) => break e,
        }
        assert!(fits < 50);
    };
    // RDP composes better than linearly, so at least two fit; never more
    // than the budget allows.
    assert!(
        fits >= 2,
        "{fits} fits of epsilon {one} in a budget of {budget}"
    );
    assert!(matches!(err, Error::PrivacyBudgetExhausted { .. }), "{err}");
    assert_eq!(client.model().ledger().epsilon(), last);
}

/// FedProx's term and SCAFFOLD's correction are added to DP-SGD's noised
/// gradient (post-processing: the privacy cost is the same). With the same
/// seeded noise and every example in each step (q = 1), a correction `c`
/// moves one step by `-lr * c`, and the proximal term adds
/// `lr * mu * (w1 - w0)` to the second step.
#[test]
fn dp_sgd_takes_the_proximal_term_and_the_correction_after_the_noise() {
    let data = DataSplit::all(Arc::new(synthetic_digits(8, 4)));
    let config = |epochs, mu| TrainConfig {
        optimizer: Optimizer::Sgd { momentum: 0.0 },
        proximal_mu: mu,
        ..sgd(epochs, 8, 0.2)
    };
    let dp = || {
        let config = DpSgdConfig::new(1.0, 0.5).with_budget(unlimited());
        DpSgd::new("client1", cnn(3), config, Noise::dangerous().seeded(11)).unwrap()
    };
    let max_diff = |a: &fedcore::Parameters, b: &fedcore::Parameters| a.max_abs_diff(b).unwrap();
    let mut plain = dp();
    let w0 = plain.parameters();
    let out = plain.fit(&data, &config(1, 0.0)).unwrap();
    assert_eq!(out.steps, 1);
    let w1 = plain.parameters();

    let c = w0
        .with_values(
            (0..w0.len())
                .map(|i| ((i % 5) as f32 - 2.0) * 0.01)
                .collect(),
        )
        .unwrap();
    let mut corrected = dp();
    let out_c = corrected.fit_corrected(&data, &config(1, 0.0), &c).unwrap();
    assert_eq!(out_c.privacy[0].cost, out.privacy[0].cost);
    let mut want = w1.clone();
    want.axpy(-0.2, &c).unwrap();
    assert!(max_diff(&corrected.parameters(), &want) < 1e-6);

    plain.fit(&data, &config(1, 0.0)).unwrap();
    let mut want = plain.parameters();
    let mut drift = w1.sub(&w0).unwrap();
    drift.scale(0.2 * 0.5);
    want.axpy(-1.0, &drift).unwrap();
    let mut prox = dp();
    prox.fit(&data, &config(2, 0.5)).unwrap();
    assert!(max_diff(&prox.parameters(), &want) < 1e-6);
    assert!(max_diff(&prox.parameters(), &plain.parameters()) > 1e-6);
}
