//! The `tch` models: torchvision equivalence, DenseNet-121 shapes and
//! parameter counts, square-activation training on synthetic X-rays, the
//! small CNN, weight import/export and bad input.
#![cfg(feature = "tch")]
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedcore::data::{
    ChestXray14, ChestXrayConfig, DataSplit, InMemoryImages, SyntheticXrays, Targets,
    synthetic_digits, write_synthetic_chestxray,
};
use fedcore::models::{
    Activation, DenseNet, DenseNetConfig, Device, LoadOptions, Network, Normalization, Placement,
    SmallCnn, TchModel,
};
use fedcore::{Model, Optimizer, TrainConfig};
use safetensors::SafeTensors;
use tch::Tensor;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tiny_config() -> DenseNetConfig {
    DenseNetConfig {
        growth_rate: 4,
        block_config: vec![2, 2],
        num_init_features: 8,
        bn_size: 2,
        in_channels: 3,
        num_classes: 3,
        multi_label: false,
        activation: Activation::Relu,
        placement: Placement::Everywhere,
        norm: Normalization::Batch,
    }
}

/// The tiny DenseNet with GroupNorm (at most 4 groups per layer).
fn tiny_group_norm_config() -> DenseNetConfig {
    DenseNetConfig {
        norm: Normalization::Group { groups: 4 },
        ..tiny_config()
    }
}

/// The tiny DenseNet with the torchvision fixture's weights.
fn tiny_from_fixture() -> TchModel<DenseNet> {
    let mut model = densenet(tiny_config(), 0);
    model
        .load_torchvision(
            &fixture("densenet_tiny.safetensors"),
            &LoadOptions::default(),
        )
        .unwrap();
    model
}

fn densenet(config: DenseNetConfig, seed: u64) -> TchModel<DenseNet> {
    TchModel::build(Device::Cpu, seed, |b| DenseNet::build(b, config)).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn densenet_matches_torchvision() {
    // Weights, input and logits made once by torchvision's own DenseNet class
    // (scripts/make_densenet_fixture.py); input 20 x 20, so the final pool is
    // adaptive and the transition pools average.
    let model = tiny_from_fixture();
    let bytes = std::fs::read(fixture("densenet_tiny_io.safetensors")).unwrap();
    let (io, _) = fedcore::Parameters::from_safetensors(&bytes).unwrap();
    let input = io.tensor("input").unwrap();
    let shape: [usize; 4] = io
        .layout()
        .spec("input")
        .unwrap()
        .shape
        .clone()
        .try_into()
        .unwrap();
    let expected_eval = io.tensor("logits_eval").unwrap();
    let expected_train = io.tensor("logits_train").unwrap();

    let got = model.forward(input, shape).unwrap();
    let diff = max_abs_diff(&got, expected_eval);
    assert!(
        diff < 1e-5,
        "eval logits differ by {diff}: {got:?} vs {expected_eval:?}"
    );

    // Training mode (batch statistics) matches too.
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let xs = Tensor::from_slice(input).reshape(dims.as_slice());
    let train = tch::no_grad(|| model.network().forward(&xs, true));
    let train = Vec::<f32>::try_from(train.reshape([-1])).unwrap();
    let diff = max_abs_diff(&train, expected_train);
    assert!(diff < 1e-5, "train logits differ by {diff}");
}

#[test]
fn export_is_a_torchvision_state_dict_and_round_trips_bit_exact() {
    let model = tiny_from_fixture();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("global.safetensors");
    model.save_torchvision(&out).unwrap();

    // Same tensor names, dtypes and shapes as torchvision's state_dict,
    // num_batches_tracked included: what load_state_dict(strict=True) checks.
    let theirs = std::fs::read(fixture("densenet_tiny.safetensors")).unwrap();
    let ours = std::fs::read(&out).unwrap();
    let (theirs, ours) = (
        SafeTensors::deserialize(&theirs).unwrap(),
        SafeTensors::deserialize(&ours).unwrap(),
    );
    let mut a = theirs.names();
    let mut b = ours.names();
    a.sort();
    b.sort();
    assert_eq!(a, b);
    for name in a {
        let (x, y) = (theirs.tensor(name).unwrap(), ours.tensor(name).unwrap());
        assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{name}");
        if !name.ends_with("num_batches_tracked") {
            assert_eq!(x.data(), y.data(), "{name} is not bit-exact");
        }
    }

    // And back: every value bit for bit.
    let mut again = densenet(tiny_config(), 99);
    again
        .load_torchvision(&out, &LoadOptions::default())
        .unwrap();
    let (p, q) = (model.parameters(), again.parameters());
    assert!(
        p.as_slice()
            .iter()
            .zip(q.as_slice())
            .all(|(x, y)| x.to_bits() == y.to_bits())
    );
}

#[test]
fn missing_mismatched_or_unexpected_tensors_are_named_and_change_nothing() {
    let src = std::fs::read(fixture("densenet_tiny.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&src).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Rewrites the fixture with `edit` applied to the (name, dtype, shape, bytes) list.
    type Raw = Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>;
    let write = |edit: &dyn Fn(&mut Raw)| {
        let mut all: Vec<_> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
            .collect();
        edit(&mut all);
        let views: Vec<_> = all
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        let path = dir.path().join("edited.safetensors");
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
        path
    };
    let mut model = densenet(tiny_config(), 5);
    let before = model.parameters();
    let err = |path: PathBuf, model: &mut TchModel<DenseNet>| {
        model
            .load_torchvision(&path, &LoadOptions::default())
            .unwrap_err()
            .to_string()
    };

    let missing = write(&|t| t.retain(|(n, ..)| n != "features.transition1.conv.weight"));
    let e = err(missing, &mut model);
    assert!(
        e.contains("`features.transition1.conv.weight` is missing"),
        "{e}"
    );

    let reshaped = write(&|t| {
        for (n, _, s, _) in t.iter_mut() {
            if n == "classifier.weight" {
                *s = vec![16, 3];
            }
        }
    });
    let e = err(reshaped.clone(), &mut model);
    assert!(e.contains("`classifier.weight` has shape [16, 3]"), "{e}");
    // Skipping the head accepts it (fine-tuning from another task's weights).
    let skip = LoadOptions {
        skip: vec!["classifier.*".into()],
        ..LoadOptions::default()
    };
    let mut other = densenet(tiny_config(), 5);
    other.load_torchvision(&reshaped, &skip).unwrap();
    assert_eq!(
        other.parameters().tensor("classifier.weight").unwrap(),
        before.tensor("classifier.weight").unwrap()
    );

    let extra = write(&|t| {
        t.push((
            "features.conv9.weight".into(),
            safetensors::Dtype::F32,
            vec![1],
            vec![0; 4],
        ))
    });
    let e = err(extra, &mut model);
    assert!(
        e.contains("`features.conv9.weight` is not in the model"),
        "{e}"
    );

    let e = model
        .load_torchvision(
            &dir.path().join("nope.safetensors"),
            &LoadOptions::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("No such file"), "{e}");
    std::fs::write(
        dir.path().join("junk.safetensors"),
        b"\x10\0\0\0\0\0\0\0{not json",
    )
    .unwrap();
    assert!(
        model
            .load_torchvision(
                &dir.path().join("junk.safetensors"),
                &LoadOptions::default()
            )
            .is_err()
    );

    assert_eq!(
        model.parameters(),
        before,
        "a failed load leaves the model as it was"
    );
}

#[test]
fn densenet121_layout_counts_and_shapes_for_1_and_3_channels() {
    for (channels, classes) in [(1usize, 14usize), (3, 1000)] {
        let config = DenseNetConfig {
            num_classes: classes,
            ..DenseNetConfig::densenet121(channels, Activation::Relu)
        };
        let mut model = densenet(config, 1);
        // torchvision's state_dict has 727 entries: 606 tensors + 121 num_batches_tracked.
        assert_eq!(model.layout().tensors().len(), 606);
        let expected = if channels == 3 { 7_978_856 } else { 6_961_934 };
        assert_eq!(
            model.trainable_values(),
            expected,
            "torchvision's parameter count"
        );
        assert_eq!(model.buffers().len(), 83_648);
        let names: Vec<&str> = model
            .layout()
            .tensors()
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names[0], "features.conv0.weight");
        assert!(names.contains(&"features.denseblock3.denselayer24.conv2.weight"));
        assert!(names.contains(&"features.transition3.norm.running_var"));
        assert_eq!(
            &names[names.len() - 2..],
            ["classifier.weight", "classifier.bias"]
        );
        let head = model.head();
        assert_eq!(
            head.names(model.layout()).unwrap().collect::<Vec<_>>(),
            ["classifier.weight", "classifier.bias"]
        );

        // Forward and backward at 32 x 32 (7 x 7 pooling would fail here).
        let xs = Tensor::randn(
            [2, channels as i64, 32, 32],
            (tch::Kind::Float, tch::Device::Cpu),
        );
        let logits = model.network().forward(&xs, true);
        assert_eq!(logits.size(), [2, classes as i64]);
        logits.sum(tch::Kind::Float).backward();
        let grads: Vec<_> = tch_grads(&mut model);
        assert!(grads.iter().all(|g| g.is_finite()), "finite gradients");
        assert!(grads.iter().any(|&g| g > 0.0), "gradients flow");
    }
}

/// Gradient norm of the first convolution and the classifier weight.
fn tch_grads(model: &mut TchModel<DenseNet>) -> Vec<f64> {
    let vs_names = ["features.conv0.weight", "classifier.weight"];
    vs_names
        .iter()
        .map(|n| model.grad_norm(n).unwrap())
        .collect()
}

fn synthetic_xrays(dir: &Path, patients: usize, size: u32) -> ChestXray14 {
    let config = SyntheticXrays {
        patients,
        size: 48,
        seed: 11,
        ..SyntheticXrays::default()
    };
    write_synthetic_chestxray(dir, &config).unwrap();
    ChestXray14::open(
        dir,
        ChestXrayConfig {
            size,
            ..ChestXrayConfig::default()
        },
    )
    .unwrap()
}

#[test]
fn square_densenet121_trains_on_synthetic_xrays_with_finite_falling_loss() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataSplit::all(Arc::new(synthetic_xrays(dir.path(), 40, 32)));
    // x² after every BatchNorm: the hard case.
    let config = DenseNetConfig {
        placement: Placement::Everywhere,
        ..DenseNetConfig::densenet121(1, Activation::Square)
    };
    let mut model = densenet(config, 3);
    // Plain x² trains with SGD + momentum at 1e-3; Adam at 1e-3 oscillates
    // (see the `Activation` docs and docs/models.md).
    let config = TrainConfig {
        epochs: 1,
        batch_size: 16,
        learning_rate: 1e-3,
        optimizer: Optimizer::Sgd { momentum: 0.9 },
        seed: 1,
        ..TrainConfig::default()
    };
    let before = model.parameters();
    let mut losses = Vec::new();
    for round in 0..6 {
        let out = model
            .fit(
                &data,
                &TrainConfig {
                    seed: round,
                    ..config.clone()
                },
            )
            .unwrap();
        losses.push(out.metrics["loss"]);
    }
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(losses[5] < losses[0] * 0.95, "loss should fall: {losses:?}");
    // BatchNorm running statistics moved, and they are part of the parameters.
    let after = model.parameters();
    assert_ne!(
        after.tensor("features.norm0.running_mean").unwrap(),
        before.tensor("features.norm0.running_mean").unwrap()
    );
    // Inference with running statistics overflows for such a network; it
    // is a clear error, not a NaN AUROC.
    match model.evaluate(&data) {
        Ok(eval) => assert!(eval.loss.is_finite(), "{eval:?}"),
        Err(e) => assert!(e.to_string().contains("non-finite logits"), "{e}"),
    }
}

#[test]
fn training_is_seeded_and_statistics_travel_with_the_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataSplit::all(Arc::new(synthetic_xrays(dir.path(), 12, 32)));
    let config = DenseNetConfig {
        block_config: vec![2, 2, 2],
        growth_rate: 8,
        num_init_features: 16,
        ..DenseNetConfig::densenet121(1, Activation::Relu)
    };
    let train = TrainConfig {
        epochs: 2,
        batch_size: 4,
        learning_rate: 0.05,
        optimizer: Optimizer::Sgd { momentum: 0.9 },
        seed: 42,
        ..TrainConfig::default()
    };
    let mut a = densenet(config.clone(), 7);
    let mut b = densenet(config.clone(), 7);
    assert_eq!(a.parameters(), b.parameters());
    a.fit(&data, &train).unwrap();
    b.fit(&data, &train).unwrap();
    assert_eq!(a.parameters(), b.parameters(), "same seed, same result");

    // A fresh model given a's parameters (running statistics included)
    // predicts exactly what a predicts.
    let mut c = densenet(config, 8);
    c.set_parameters(&a.parameters()).unwrap();
    let pa = a.predict(&data, 8).unwrap();
    let pc = c.predict(&data, 8).unwrap();
    assert_eq!(pa.logits, pc.logits);
}

#[test]
fn bad_input_is_an_error_and_the_model_keeps_working() {
    let mut model = densenet(DenseNetConfig::densenet121(1, Activation::Relu), 0);
    let rgb = InMemoryImages::new(
        vec![0.0; 2 * 3 * 32 * 32],
        [3, 32, 32],
        Targets::MultiLabel {
            values: vec![0.0; 28],
            labels: 14,
        },
    )
    .unwrap();
    let e = model
        .fit(&DataSplit::all(Arc::new(rgb)), &TrainConfig::default())
        .unwrap_err();
    assert!(e.to_string().contains("3 channel(s)"), "{e}");
    let small = InMemoryImages::new(
        vec![0.0; 2 * 16 * 16],
        [1, 16, 16],
        Targets::MultiLabel {
            values: vec![0.0; 28],
            labels: 14,
        },
    )
    .unwrap();
    let e = model
        .evaluate(&DataSplit::all(Arc::new(small)))
        .unwrap_err();
    assert!(e.to_string().contains("too small"), "{e}");
    let wrong_labels = InMemoryImages::new(
        vec![0.0; 2 * 32 * 32],
        [1, 32, 32],
        Targets::Classes(vec![0, 1]),
    )
    .unwrap();
    let e = model
        .fit(
            &DataSplit::all(Arc::new(wrong_labels)),
            &TrainConfig::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("task"), "{e}");
    let mut nan = model.parameters();
    nan.as_mut_slice()[10] = f32::NAN;
    let e = model.set_parameters(&nan).unwrap_err();
    assert!(e.to_string().contains("features.conv0.weight"), "{e}");
    let e = model.forward(&[0.0; 10], [1, 1, 32, 32]).unwrap_err();
    assert!(e.to_string().contains("1024"), "{e}");
    // Still fine afterwards.
    let ok = model.forward(&vec![0.5; 32 * 32], [1, 1, 32, 32]).unwrap();
    assert_eq!(ok.len(), 14);
}

/// Trains `model` on `train` with `config` and checks that it learned:
/// the test loss at least halves and the test accuracy passes 90 %.
fn assert_learns<N: Network>(
    model: &mut TchModel<N>,
    train: &DataSplit,
    test: &DataSplit,
    config: &TrainConfig,
) -> fedcore::FitOutput {
    let before = model.evaluate(test).unwrap();
    let fit = model.fit(train, config).unwrap();
    let after = model.evaluate(test).unwrap();
    assert!(
        after.loss < before.loss * 0.5,
        "{} -> {}",
        before.loss,
        after.loss
    );
    assert!(after.metrics["accuracy"] > 0.9, "{:?}", after.metrics);
    fit
}

/// 28 x 28 images whose class is where a bright 7 x 7 square sits (a 3 x 3
/// grid plus "empty"), with noise: learnable in a few epochs.
#[test]
fn small_cnn_learns_and_has_the_documented_size() {
    let mut model = TchModel::build(Device::Cpu, 0, |b| SmallCnn::build(b, 1, 28, 10)).unwrap();
    assert_eq!(model.trainable_values(), 215_370);
    assert_eq!(
        model
            .head()
            .names(model.layout())
            .unwrap()
            .collect::<Vec<_>>(),
        ["fc2.weight", "fc2.bias"]
    );
    let train = DataSplit::all(Arc::new(synthetic_digits(400, 1)));
    let test = DataSplit::all(Arc::new(synthetic_digits(200, 2)));
    let config = TrainConfig {
        epochs: 3,
        batch_size: 32,
        learning_rate: 1e-3,
        optimizer: Optimizer::adam(),
        seed: 3,
        ..TrainConfig::default()
    };
    let fit = assert_learns(&mut model, &train, &test, &config);
    assert_eq!(fit.num_examples, 400);
    // Images of the wrong size are refused.
    let e = model
        .fit(&DataSplit::all(Arc::new(synthetic_digits(4, 1))), &config)
        .map(|_| ());
    assert!(e.is_ok());
    let wrong =
        InMemoryImages::new(vec![0.0; 32 * 32], [1, 32, 32], Targets::Classes(vec![1])).unwrap();
    assert!(model.evaluate(&DataSplit::all(Arc::new(wrong))).is_err());
}

#[test]
fn rgb_weights_load_into_a_gray_model() {
    let mut gray = densenet(
        DenseNetConfig {
            in_channels: 1,
            ..tiny_config()
        },
        0,
    );
    let opts = LoadOptions {
        rgb_to_gray: true,
        ..LoadOptions::default()
    };
    gray.load_torchvision(&fixture("densenet_tiny.safetensors"), &opts)
        .unwrap();
    let rgb = tiny_from_fixture();
    // A gray image repeated over three channels gives the same logits.
    let plane: Vec<f32> = (0..400).map(|i| ((i * 37) % 11) as f32 / 11.0).collect();
    let three: Vec<f32> = plane.iter().chain(&plane).chain(&plane).copied().collect();
    let a = gray.forward(&plane, [1, 1, 20, 20]).unwrap();
    let b = rgb.forward(&three, [1, 3, 20, 20]).unwrap();
    assert!(max_abs_diff(&a, &b) < 1e-4, "{a:?} vs {b:?}");
    // Without the option it is a named shape error.
    let e = gray
        .load_torchvision(
            &fixture("densenet_tiny.safetensors"),
            &LoadOptions::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("features.conv0.weight"), "{e}");
}

/// Per-sample gradients and loss in one pass equal those of one backward
/// pass per sample (1e-5 relative); returns both and the gradients' scale.
fn assert_one_pass_matches_looped<N: Network>(
    model: &TchModel<N>,
    batch: &fedcore::data::Batch,
) -> (
    fedcore::models::PerSampleGradients,
    fedcore::models::PerSampleGradients,
    f64,
) {
    let fast = model
        .per_sample_gradients(&batch.images, batch.shape, &batch.targets)
        .unwrap();
    let slow = model
        .per_sample_gradients_looped(&batch.images, batch.shape, &batch.targets)
        .unwrap();
    let diff = (&fast.grads - &slow.grads).abs().max().double_value(&[]);
    let scale = slow.grads.abs().max().double_value(&[]);
    assert!(
        diff <= 1e-5 * scale,
        "max difference {diff} at scale {scale}"
    );
    assert!((fast.loss - slow.loss).abs() < 1e-5 * slow.loss.abs().max(1.0));
    (fast, slow, scale)
}

#[test]
fn per_sample_gradients_in_one_pass_match_one_pass_per_sample() {
    let model = TchModel::build(Device::Cpu, 4, |b| SmallCnn::build(b, 1, 28, 10)).unwrap();
    let data = DataSplit::all(Arc::new(synthetic_digits(6, 9)));
    let batch = data.batches(6, None).next().unwrap().unwrap();
    let (fast, slow, scale) = assert_one_pass_matches_looped(&model, &batch);
    assert_eq!(fast.grads.size(), [6, 215_370]);
    assert_eq!(slow.grads.size(), [6, 215_370]);
    // Rows differ: they are per-sample, not copies of the batch gradient.
    let r01 = (fast.grads.get(0) - fast.grads.get(1))
        .abs()
        .max()
        .double_value(&[]);
    assert!(r01 > 1e-3 * scale);
    // Their mean is the ordinary batch gradient's direction source: a step
    // on it lowers the batch loss.
    let mut model = model;
    let mean: Vec<f32> = Vec::try_from(&fast.grads.mean_dim(0, false, tch::Kind::Float)).unwrap();
    let step: Vec<f32> = mean.iter().map(|g| 0.05 * g).collect();
    model.sub_trainable(&step).unwrap();
    let after = model
        .per_sample_gradients(&batch.images, batch.shape, &batch.targets)
        .unwrap();
    assert!(after.loss < fast.loss, "{} -> {}", fast.loss, after.loss);
    assert!(model.sub_trainable(&step[1..]).is_err());
}

#[test]
fn the_tanh_cnn_has_its_per_sample_gradients_in_one_pass_too() {
    let model = TchModel::build(Device::Cpu, 4, |b| {
        Ok(SmallCnn::build(b, 1, 28, 10)?.with_activation(Activation::Tanh))
    })
    .unwrap();
    let relu = TchModel::build(Device::Cpu, 4, |b| SmallCnn::build(b, 1, 28, 10)).unwrap();
    let data = DataSplit::all(Arc::new(synthetic_digits(4, 3)));
    let batch = data.batches(4, None).next().unwrap().unwrap();
    let (fast, _, _) = assert_one_pass_matches_looped(&model, &batch);
    // Same weights, another activation: another loss.
    let other = relu
        .per_sample_gradients(&batch.images, batch.shape, &batch.targets)
        .unwrap();
    assert!((other.loss - fast.loss).abs() > 1e-6);
    assert_eq!(Activation::parse("tanh").unwrap(), Activation::Tanh);
}

#[test]
fn the_compact_cnn_is_papernots_network_with_per_sample_gradients_in_one_pass() {
    let model = TchModel::build(Device::Cpu, 4, |b| SmallCnn::compact(b, 1, 28, 10)).unwrap();
    // conv1 16x1x8x8 + 16, conv2 32x16x4x4 + 32, fc1 512x32 + 32, fc2 32x10 + 10.
    let shapes: Vec<Vec<usize>> = model
        .layout()
        .tensors()
        .iter()
        .map(|s| s.shape.clone())
        .collect();
    assert_eq!(
        shapes,
        [
            vec![16, 1, 8, 8],
            vec![16],
            vec![32, 16, 4, 4],
            vec![32],
            vec![32, 512],
            vec![32],
            vec![10, 32],
            vec![10]
        ]
    );
    let data = DataSplit::all(Arc::new(synthetic_digits(5, 7)));
    let batch = data.batches(5, None).next().unwrap().unwrap();
    let (fast, _, _) = assert_one_pass_matches_looped(&model, &batch);
    assert_eq!(fast.grads.size(), [5, 26_010]);
    // The strided convolutions leave 4x4 maps at 28 pixels; at 8 pixels
    // nothing is left, which is refused rather than crashing in libtorch.
    let e = TchModel::build(Device::Cpu, 4, |b| SmallCnn::compact(b, 1, 8, 10)).unwrap_err();
    assert!(e.to_string().contains("large enough"), "{e}");
    let wide = TchModel::build(Device::Cpu, 4, |b| SmallCnn::build(b, 1, 28, 10)).unwrap();
    assert_eq!(wide.parameters().len(), 215_370);
}

#[test]
fn per_sample_gradients_refuse_batch_norm() {
    let model = densenet(tiny_config(), 1);
    let shape = [2, 3, 32, 32];
    let e = model
        .per_sample_gradients(
            &vec![0.0; 2 * 3 * 32 * 32],
            shape,
            &Targets::Classes(vec![0, 1]),
        )
        .unwrap_err();
    assert!(e.to_string().contains("BatchNorm"), "{e}");
}

#[test]
fn frozen_batch_norm_runs_on_its_statistics_and_has_per_sample_gradients() {
    // torchvision's weights and running statistics; every BatchNorm layer
    // and block 1 frozen: the traced per-sample gradients of what is left
    // (block 2's and the transition's convolutions, the classifier) equal
    // one backward pass per sample, both with BatchNorm on its running
    // statistics, which mixes no samples.
    let mut model = tiny_from_fixture();
    let names: Vec<String> = model
        .layout()
        .tensors()
        .iter()
        .map(|t| t.name.clone())
        .collect();
    let is_norm = |n: &str| n.contains("norm") && (n.ends_with(".weight") || n.ends_with(".bias"));
    // Only some BatchNorm layers frozen: still refused, naming one.
    model.set_frozen(&["features.norm0.*"]).unwrap();
    let (images, shape, targets) = tiny_batch(4, 5);
    let e = model
        .per_sample_gradients(&images, shape, &targets)
        .unwrap_err();
    assert!(e.to_string().contains("features.denseblock1"), "{e}");
    assert!(!model.frozen_statistics());
    let mut frozen: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| is_norm(n))
        .collect();
    frozen.push("features.denseblock1.*");
    frozen.push("features.conv0.*");
    model.set_frozen(&frozen).unwrap();
    assert!(model.frozen_statistics());
    model.check_per_sample().unwrap();
    let fast = model
        .per_sample_gradients(&images, shape, &targets)
        .unwrap();
    let slow = model
        .per_sample_gradients_looped(&images, shape, &targets)
        .unwrap();
    assert_eq!(fast.grads.size(), [4, model.trainable_values() as i64]);
    let diff = (&fast.grads - &slow.grads).abs().max().double_value(&[]);
    let scale = slow.grads.abs().max().double_value(&[]);
    assert!(scale > 0.0 && diff <= 1e-4 * scale, "{diff} at {scale}");
    // A sample's gradient does not depend on the others in its batch.
    let (one, one_shape) = (&images[..3 * 32 * 32], [1, 3, 32, 32]);
    let first = model
        .per_sample_gradients(
            one,
            one_shape,
            &Targets::Classes(vec![match &targets {
                Targets::Classes(c) => c[0],
                _ => unreachable!(),
            }]),
        )
        .unwrap();
    let d0 = (fast.grads.get(0) - first.grads.get(0))
        .abs()
        .max()
        .double_value(&[]);
    assert!(d0 <= 1e-5 * scale, "sample 0 alone differs by {d0}");
    assert_clipped_sum_matches_at_median(&model, (&images, shape, &targets), &slow);

    // Training leaves the running statistics and every frozen tensor as
    // they are (evaluation-mode BatchNorm), and moves the rest.
    assert_only_trainable_tensors_move(&mut model, &images, &targets);
}

/// A DP-SGD-like step (`sub_trainable`) and an epoch of `fit` on the
/// 3 x 32 x 32 batch move every trainable tensor and leave the frozen ones
/// and the buffers as they were.
fn assert_only_trainable_tensors_move<N: Network>(
    model: &mut TchModel<N>,
    images: &[f32],
    targets: &Targets,
) {
    let before = model.parameters();
    let step = vec![0.01f32; model.trainable_values()];
    model.sub_trainable(&step).unwrap();
    let data = DataSplit::all(Arc::new(
        InMemoryImages::new(images.to_vec(), [3, 32, 32], targets.clone()).unwrap(),
    ));
    let config = TrainConfig {
        epochs: 1,
        batch_size: 2,
        learning_rate: 0.05,
        optimizer: Optimizer::adam(),
        seed: 0,
        ..TrainConfig::default()
    };
    model.fit(&data, &config).unwrap();
    let after = model.parameters();
    let layout = model.layout().clone();
    let (frozen, buffers) = (model.frozen(), model.buffers());
    for (i, spec) in layout.tensors().iter().enumerate() {
        let r = layout.range_at(i);
        let same = before.as_slice()[r.clone()] == after.as_slice()[r];
        let kept = frozen.contains(i) || buffers.contains(i);
        assert_eq!(same, kept, "{}", spec.name);
    }
}

#[test]
fn clipped_gradient_sum_equals_clipping_each_sample_gradient() {
    let model = TchModel::build(Device::Cpu, 5, |b| SmallCnn::build(b, 1, 28, 10)).unwrap();
    let data = DataSplit::all(Arc::new(synthetic_digits(8, 11)));
    let batch = data.batches(8, None).next().unwrap().unwrap();
    let full = model
        .per_sample_gradients_looped(&batch.images, batch.shape, &batch.targets)
        .unwrap();
    let mut sorted: Vec<f32> =
        Vec::try_from(&full.grads.norm_scalaropt_dim(2, [1], false)).unwrap();
    sorted.sort_by(f32::total_cmp);
    // A norm that clips every sample, one that clips about half, one that clips none.
    for c in [
        f64::from(sorted[0]) * 0.5,
        f64::from(sorted[4]),
        f64::from(sorted[7]) * 2.0,
    ] {
        let fast = assert_clipped_sum_matches(
            &model,
            (&batch.images, batch.shape, &batch.targets),
            &full,
            c,
        );
        let sum_norm = fedcore::l2_norm(&fast.sum);
        assert!(
            sum_norm <= 8.0 * c * (1.0 + 1e-4),
            "sum of 8 clipped gradients has norm {sum_norm} > 8 C"
        );
    }
    assert!(
        model
            .clipped_gradient_sum(&batch.images, batch.shape, &batch.targets, 0.0)
            .is_err()
    );
}

/// Checks `clipped_gradient_sum` at clipping norm `c` against clipping the
/// per-sample gradients `slow` (one backward pass per sample): the norms and
/// the clipped sum within 1e-4 relative. Returns the one-pass result.
fn assert_clipped_sum_matches<N: Network>(
    model: &TchModel<N>,
    (images, shape, targets): (&[f32], [usize; 4], &Targets),
    slow: &fedcore::models::PerSampleGradients,
    c: f64,
) -> fedcore::models::ClippedGradientSum {
    let norms = slow.grads.norm_scalaropt_dim(2, [1], false);
    let want_norms: Vec<f32> = Vec::try_from(&norms).unwrap();
    let fast = model
        .clipped_gradient_sum(images, shape, targets, c)
        .unwrap();
    for (a, b) in fast.norms.iter().zip(&want_norms) {
        assert!((a - b).abs() <= 1e-4 * b, "C = {c}: norm {a} vs {b}");
    }
    let factor = (c / (&norms + 1e-6)).clamp_max(1.0);
    let want: Vec<f32> = Vec::try_from(&(&slow.grads * factor.unsqueeze(1)).sum_dim_intlist(
        0,
        false,
        tch::Kind::Float,
    ))
    .unwrap();
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&fast.sum, &want);
    assert!(
        diff <= 1e-4 * scale,
        "C = {c}: clipped sum {diff} at scale {scale}"
    );
    fast
}

/// [`assert_clipped_sum_matches`] with `C` the median per-sample norm, so
/// that some samples are clipped and some are not.
fn assert_clipped_sum_matches_at_median<N: Network>(
    model: &TchModel<N>,
    batch: (&[f32], [usize; 4], &Targets),
    slow: &fedcore::models::PerSampleGradients,
) {
    let c = slow
        .grads
        .norm_scalaropt_dim(2, [1], false)
        .median()
        .double_value(&[]);
    assert_clipped_sum_matches(model, batch, slow, c);
}

/// Inputs and targets for the tiny DenseNet: `n` seeded 3 x 32 x 32 images.
fn tiny_batch(n: usize, seed: u64) -> (Vec<f32>, [usize; 4], Targets) {
    let shape = [n, 3, 32, 32];
    let images: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| ((i as u64 * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
        .collect();
    let targets = Targets::Classes((0..n).map(|i| ((i as u64 + seed) % 3) as i64).collect());
    (images, shape, targets)
}

#[test]
fn group_norm_densenet_has_per_sample_gradients_in_one_pass() {
    let model = densenet(tiny_group_norm_config(), 3);
    assert!(!model.network().has_batch_norm());
    assert_eq!(model.buffers().len(), 0, "no running statistics");
    let (images, shape, targets) = tiny_batch(5, 1);
    let fast = model
        .per_sample_gradients(&images, shape, &targets)
        .unwrap();
    let slow = model
        .per_sample_gradients_looped(&images, shape, &targets)
        .unwrap();
    assert_eq!(fast.grads.size(), [5, model.trainable_values() as i64]);
    let diff = (&fast.grads - &slow.grads).abs().max().double_value(&[]);
    let scale = slow.grads.abs().max().double_value(&[]);
    assert!(
        diff <= 1e-4 * scale,
        "max difference {diff} at scale {scale}"
    );
    // The traced pass runs the same layers: the same loss.
    assert!((fast.loss - slow.loss).abs() < 1e-5 * slow.loss.abs().max(1.0));
    // GroupNorm weights have per-sample gradients of their own (not zero,
    // not equal across samples).
    let layout = model.parameters().layout().clone();
    let trainable = model.trainable_tensors();
    let norm0 = layout.position("features.norm0.weight").unwrap();
    let offset: usize = trainable
        .iter()
        .take_while(|&&i| i != norm0)
        .map(|&i| layout.range_at(i).len())
        .sum();
    let g = fast.grads.narrow(1, offset as i64, 8);
    let spread = (g.get(0) - g.get(1)).abs().max().double_value(&[]);
    assert!(
        spread > 1e-6 * scale,
        "norm0 gradients equal across samples"
    );

    // Clipped sums from the traced pass equal clipping the looped rows
    // (DenseNet's convolutions have no bias: nothing to count for it).
    assert_clipped_sum_matches_at_median(&model, (&images, shape, &targets), &slow);
}

#[test]
fn a_frozen_part_has_no_gradients_and_stays_as_it_is() {
    // Freeze the stem, block 1 and the transition: DP-SGD's per-sample
    // gradients cover only block 2, norm5 and the classifier, and equal
    // the columns of those tensors in the unfrozen network's gradients.
    let full = densenet(tiny_group_norm_config(), 3);
    let mut model = densenet(tiny_group_norm_config(), 3);
    let frozen = [
        "features.conv0.*",
        "features.norm0.*",
        "features.denseblock1.*",
        "features.transition1.*",
    ];
    model.set_frozen(&frozen).unwrap();
    let layout = model.layout().clone();
    let selection = model.frozen();
    assert!(!selection.is_empty());
    assert_eq!(
        model.trainable_values() + selection.len(),
        full.trainable_values()
    );
    assert!(model.set_frozen(&["no.such.*"]).is_err());
    model.set_frozen(&frozen).unwrap();

    let (images, shape, targets) = tiny_batch(4, 2);
    let fast = model
        .per_sample_gradients(&images, shape, &targets)
        .unwrap();
    let all = full
        .per_sample_gradients_looped(&images, shape, &targets)
        .unwrap();
    // The unfrozen network's columns of the tensors still trainable.
    let mut offset = 0i64;
    let mut kept = Vec::new();
    for i in full.trainable_tensors() {
        let len = layout.range_at(i).len() as i64;
        if !selection.contains(i) {
            kept.push(all.grads.narrow(1, offset, len));
        }
        offset += len;
    }
    let want = tch::Tensor::cat(&kept, 1);
    assert_eq!(fast.grads.size(), want.size());
    let diff = (&fast.grads - &want).abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]);
    assert!(
        diff <= 1e-4 * scale,
        "max difference {diff} at scale {scale}"
    );
    let slow = model
        .per_sample_gradients_looped(&images, shape, &targets)
        .unwrap();
    assert_clipped_sum_matches_at_median(&model, (&images, shape, &targets), &slow);

    // A DP-SGD-like step and plain training move only what is trainable.
    assert_only_trainable_tensors_move(&mut model, &images, &targets);

    // Nothing left to train is an error, not an empty gradient.
    model.set_frozen(&["*"]).unwrap();
    assert!(
        model
            .per_sample_gradients(&images, shape, &targets)
            .is_err()
    );
}

#[test]
fn group_norm_densenet_loads_torchvision_weights_except_running_statistics() {
    let batch_norm = tiny_from_fixture();
    let mut group_norm = densenet(tiny_group_norm_config(), 9);
    let path = fixture("densenet_tiny.safetensors");
    let e = group_norm
        .load_torchvision(&path, &LoadOptions::default())
        .unwrap_err();
    assert!(e.to_string().contains("running_"), "{e}");
    group_norm
        .load_torchvision(
            &path,
            &LoadOptions {
                allow_unexpected: true,
                ..LoadOptions::default()
            },
        )
        .unwrap();
    // Every tensor of the GroupNorm model (convolutions, norm weights and
    // biases, classifier) now holds the torchvision file's values.
    let gn = group_norm.parameters();
    let bn = batch_norm.parameters();
    for spec in gn.layout().tensors() {
        assert_eq!(
            gn.tensor(&spec.name).unwrap(),
            bn.tensor(&spec.name).unwrap(),
            "{}",
            spec.name
        );
    }
    assert_eq!(gn.len(), batch_norm.trainable_values());
}

#[test]
fn group_norm_densenet121_has_the_batch_norm_variants_trainable_values() {
    let config = DenseNetConfig::densenet121_group_norm(1, Activation::Relu);
    assert_eq!(config.norm, Normalization::Group { groups: 32 });
    let gn = densenet(config, 0);
    let bn = densenet(DenseNetConfig::densenet121(1, Activation::Relu), 0);
    assert_eq!(gn.trainable_values(), bn.trainable_values());
    assert_eq!(gn.parameters().len(), gn.trainable_values());
    let traced = gn.network().forward_traced(
        &Tensor::zeros([1, 1, 32, 32], (tch::Kind::Float, tch::Device::Cpu)),
        &mut Default::default(),
    );
    assert!(traced.is_some(), "GroupNorm DenseNet-121 traces its layers");
    let bn_traced = bn.network().forward_traced(
        &Tensor::zeros([2, 1, 32, 32], (tch::Kind::Float, tch::Device::Cpu)),
        &mut Default::default(),
    );
    assert!(
        bn_traced.is_some(),
        "BatchNorm networks trace (BatchNorm itself on its running statistics)"
    );
    let zero_groups = DenseNetConfig {
        norm: Normalization::Group { groups: 0 },
        ..tiny_config()
    };
    assert!(TchModel::build(Device::Cpu, 0, |b| DenseNet::build(b, zero_groups)).is_err());
}

#[test]
fn mixed_ghost_clipping_equals_clipping_each_sample_gradient() {
    // Wide enough that block 2 (4 x 4 positions) takes the ghost norm in
    // both its convolutions (3x3: 16 x (32 + 1152) < 32 x 1152), while the
    // stem and block 1 (8 x 8 positions) store their per-sample gradients:
    // both paths in one network.
    let config = DenseNetConfig {
        growth_rate: 32,
        block_config: vec![1, 1],
        num_init_features: 64,
        bn_size: 4,
        norm: Normalization::Group { groups: 8 },
        ..tiny_config()
    };
    let model = densenet(config, 21);
    let (images, shape, targets) = tiny_batch(4, 5);
    let slow = model
        .per_sample_gradients_looped(&images, shape, &targets)
        .unwrap();
    let mut sorted: Vec<f32> =
        Vec::try_from(&slow.grads.norm_scalaropt_dim(2, [1], false)).unwrap();
    sorted.sort_by(f32::total_cmp);
    // A norm that clips every sample, one that clips some, one that clips none.
    for c in [
        f64::from(sorted[0]) * 0.5,
        f64::from(sorted[2]),
        f64::from(sorted[3]) * 2.0,
    ] {
        assert_clipped_sum_matches(&model, (&images, shape, &targets), &slow, c);
    }
}

/// A network written with the public layer kit: a biased 3x3 convolution on
/// 8 x 8 (stored per-sample gradients), average pooling to 2 x 2, a biased
/// 3x3 convolution there (ghost norm: 4 x (64 + 576) < 64 x 576), a linear
/// classifier.
struct BiasedConvs {
    conv1: fedcore::models::layers::Conv,
    conv2: fedcore::models::layers::Conv,
    fc: fedcore::models::layers::Linear,
}

impl BiasedConvs {
    fn pass(&self, xs: &Tensor, mut trace: Option<&mut fedcore::models::Trace>) -> Tensor {
        let conv = |c: &fedcore::models::layers::Conv, x: &Tensor, t: Option<&mut _>| match t {
            Some(t) => c.forward_traced(x, 1, 1, t),
            None => c.forward(x, 1, 1),
        };
        let h = conv(&self.conv1, xs, trace.as_deref_mut()).relu();
        let h = h.avg_pool2d([4, 4], [4, 4], [0, 0], false, true, None);
        let h = conv(&self.conv2, &h, trace.as_deref_mut())
            .relu()
            .flatten(1, -1);
        match trace {
            Some(t) => self.fc.forward_traced(&h, t),
            None => self.fc.forward(&h),
        }
    }
}

impl Network for BiasedConvs {
    fn forward(&self, xs: &Tensor, _train: bool) -> Tensor {
        self.pass(xs, None)
    }
    fn task(&self) -> fedcore::models::Task {
        fedcore::models::Task::MultiClass { classes: 3 }
    }
    fn check_input(&self, shape: [usize; 3]) -> fedcore::Result<()> {
        assert_eq!(shape, [3, 8, 8]);
        Ok(())
    }
    fn has_batch_norm(&self) -> bool {
        false
    }
    fn head_patterns(&self) -> Vec<String> {
        vec!["fc.*".into()]
    }
    fn forward_traced(&self, xs: &Tensor, trace: &mut fedcore::models::Trace) -> Option<Tensor> {
        Some(self.pass(xs, Some(trace)))
    }
}

#[test]
fn ghost_clipping_counts_and_sums_convolution_biases() {
    let model = TchModel::build(Device::Cpu, 13, |b| {
        Ok(BiasedConvs {
            conv1: b.conv("conv1", 3, 64, 3, true),
            conv2: b.conv("conv2", 64, 64, 3, true),
            fc: b.linear("fc", 64 * 4, 3, false),
        })
    })
    .unwrap();
    let n = 5;
    let shape = [n, 3, 8, 8];
    let images: Vec<f32> = (0..n * 3 * 64)
        .map(|i| ((i * 7919 % 2001) as f32 / 1000.0) - 1.0)
        .collect();
    let targets = Targets::Classes((0..n as i64).map(|i| i % 3).collect());
    let slow = model
        .per_sample_gradients_looped(&images, shape, &targets)
        .unwrap();
    assert_clipped_sum_matches_at_median(&model, (&images, shape, &targets), &slow);
}

/// 32 x 32 images with a bright 8 x 8 square in a random quadrant when the
/// single label is 1, noise only when it is 0.
struct Squares {
    images: Vec<f32>,
    labels: Vec<f32>,
    quadrant: Vec<usize>,
}

impl Squares {
    fn new(n: usize, seed: u64) -> Self {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut images, mut labels, mut quadrant) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..n {
            let present = rng.random_bool(0.5);
            let q = rng.random_range(0..4usize);
            let (r0, c0) = (4 + 16 * (q / 2), 4 + 16 * (q % 2));
            for r in 0..32 {
                for c in 0..32 {
                    let inside = present && (r0..r0 + 8).contains(&r) && (c0..c0 + 8).contains(&c);
                    images.push(if inside {
                        2.0
                    } else {
                        rng.random_range(-0.5..0.5)
                    });
                }
            }
            labels.push(if present { 1.0 } else { 0.0 });
            quadrant.push(q);
        }
        Self {
            images,
            labels,
            quadrant,
        }
    }
}

impl fedcore::data::ImageDataset for Squares {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn image_shape(&self) -> [usize; 3] {
        [1, 32, 32]
    }

    fn batch(&self, indices: &[usize]) -> fedcore::Result<fedcore::data::Batch> {
        let mut images = Vec::with_capacity(indices.len() * 1024);
        let mut values = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(&self.images[i * 1024..(i + 1) * 1024]);
            values.push(self.labels[i]);
        }
        Ok(fedcore::data::Batch {
            images,
            shape: [indices.len(), 1, 32, 32],
            targets: fedcore::data::Targets::MultiLabel { values, labels: 1 },
        })
    }
}

#[test]
fn grad_cam_points_at_what_the_model_learned_to_look_for() {
    let config = DenseNetConfig {
        block_config: vec![2, 2, 2],
        growth_rate: 8,
        num_init_features: 16,
        num_classes: 1,
        ..DenseNetConfig::densenet121(1, Activation::Relu)
    };
    let mut model = densenet(config, 5);
    let train = Squares::new(256, 1);
    let data = DataSplit::all(Arc::new(train));
    model
        .fit(
            &data,
            &TrainConfig {
                epochs: 12,
                batch_size: 32,
                learning_rate: 3e-3,
                optimizer: Optimizer::adam(),
                seed: 2,
                ..TrainConfig::default()
            },
        )
        .unwrap();
    let test = Squares::new(40, 9);
    let mut hits = 0;
    let mut shown = 0;
    for i in 0..40 {
        if test.labels[i] == 0.0 {
            continue;
        }
        shown += 1;
        let image = &test.images[i * 1024..(i + 1) * 1024];
        let maps = model.grad_cam(image, [1, 1, 32, 32], &[0]).unwrap();
        let cam = &maps[0];
        assert_eq!(cam.len(), 1024);
        assert!(
            cam.iter().all(|v| (0.0..=1.0).contains(v)),
            "scaled to [0, 1]"
        );
        // The quadrant with the square holds more of the map than any other.
        let mass = |q: usize| -> f32 {
            let (r0, c0) = (16 * (q / 2), 16 * (q % 2));
            (r0..r0 + 16)
                .flat_map(|r| (c0..c0 + 16).map(move |c| r * 32 + c))
                .map(|k| cam[k])
                .sum()
        };
        let best = (0..4).max_by(|&a, &b| mass(a).total_cmp(&mass(b))).unwrap();
        if best == test.quadrant[i] {
            hits += 1;
        }
    }
    eprintln!("Grad-CAM found the square in {hits} of {shown} test images");
    assert!(shown >= 10);
    // By chance a quarter of the maps would point at the right quadrant.
    assert!(
        hits * 10 >= shown * 7,
        "Grad-CAM found the square in {hits} of {shown} images"
    );
    // Bad requests are errors, and the model still works.
    let one = &test.images[..1024];
    assert!(
        model.grad_cam(one, [1, 1, 32, 32], &[1]).is_err(),
        "one output only"
    );
    assert!(
        model
            .grad_cam(&test.images[..2048], [2, 1, 32, 32], &[0])
            .is_err()
    );
    assert!(model.grad_cam(&one[..100], [1, 1, 32, 32], &[0]).is_err());
    assert!(model.grad_cam(one, [1, 1, 32, 32], &[0]).is_ok());
}

const FULL_BATCH_LR: f64 = 0.05;

/// Plain SGD over the 8 images of the next two tests in one batch, with
/// FedProx's `mu`.
fn full_batch(epochs: usize, mu: f64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 8,
        learning_rate: FULL_BATCH_LR,
        proximal_mu: mu,
        ..TrainConfig::default()
    }
}

/// FedProx and SCAFFOLD on a libtorch model, against plain SGD as the
/// oracle: a correction `c` moves one full-batch SGD step by `-lr * c`, a
/// zero correction changes nothing, and the proximal term adds
/// `lr * mu * (w1 - w0)` to the second step.
#[test]
fn the_proximal_term_and_the_correction_enter_each_sgd_step() {
    let data = DataSplit::all(Arc::new(synthetic_digits(8, 5)));
    let (lr, mu) = (FULL_BATCH_LR, 0.5);
    let config = full_batch;
    let build = || TchModel::build(Device::Cpu, 6, |b| SmallCnn::build(b, 1, 28, 10)).unwrap();
    let max_diff = |a: &fedcore::Parameters, b: &fedcore::Parameters| a.max_abs_diff(b).unwrap();
    let mut plain = build();
    let w0 = plain.parameters();
    let out = plain.fit(&data, &config(1, 0.0)).unwrap();
    assert_eq!(out.steps, 1);
    let w1 = plain.parameters();

    let mut zero = build();
    zero.fit_corrected(&data, &config(1, 0.0), &w0.zeros_like())
        .unwrap();
    assert_eq!(zero.parameters(), w1, "a zero correction is plain SGD");

    let c = w0
        .with_values(
            (0..w0.len())
                .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
                .collect(),
        )
        .unwrap();
    let mut corrected = build();
    corrected.fit_corrected(&data, &config(1, 0.0), &c).unwrap();
    let mut want = w1.clone();
    want.axpy(-(lr as f32), &c).unwrap();
    assert!(max_diff(&corrected.parameters(), &want) < 1e-6);

    // Prox: two steps from w0; plain's second step from w1 is the oracle.
    plain.fit(&data, &config(1, 0.0)).unwrap();
    let mut want = plain.parameters();
    let mut drift = w1.sub(&w0).unwrap();
    drift.scale((lr * mu) as f32);
    want.axpy(-1.0, &drift).unwrap();
    let mut prox = build();
    prox.fit(&data, &config(2, mu)).unwrap();
    assert!(max_diff(&prox.parameters(), &want) < 1e-6);
    assert!(max_diff(&prox.parameters(), &plain.parameters()) > 1e-6);
    let wrong = fedcore::Parameters::from_tensors([("x", vec![1], vec![0.0])]).unwrap();
    assert!(
        build()
            .fit_corrected(&data, &config(1, 0.0), &wrong)
            .is_err()
    );
}

/// A frozen tensor takes neither SCAFFOLD's correction nor FedProx's pull:
/// it stays as it was while the trainable tensors move by the oracle above
/// (plain SGD of the same frozen model, minus `lr * c`).
#[test]
fn frozen_tensors_take_no_correction_and_no_proximal_term() {
    let data = DataSplit::all(Arc::new(synthetic_digits(8, 5)));
    let (lr, config) = (FULL_BATCH_LR, full_batch);
    let build = || {
        let mut m = TchModel::build(Device::Cpu, 6, |b| SmallCnn::build(b, 1, 28, 10)).unwrap();
        m.set_frozen(&["conv1.*", "fc1.*"]).unwrap();
        m
    };
    let mut plain = build();
    let frozen = plain.frozen();
    assert_eq!(frozen.tensors().len(), 4, "conv1 and fc1, weight and bias");
    let w0 = plain.parameters();
    plain.fit(&data, &config(1, 0.0)).unwrap();
    let w1 = plain.parameters();
    let c = w0.with_values(vec![0.01; w0.len()]).unwrap();
    let mut corrected = build();
    corrected.fit_corrected(&data, &config(1, 0.0), &c).unwrap();
    let mut prox = build();
    prox.fit(&data, &config(2, 0.5)).unwrap();
    let (got, pulled) = (corrected.parameters(), prox.parameters());
    for (i, (spec, values)) in got.iter().enumerate() {
        let name = spec.name.as_str();
        if frozen.contains(i) {
            assert_eq!(values, w0.tensor(name).unwrap(), "{name} moved");
            assert_eq!(pulled.tensor(name).unwrap(), w0.tensor(name).unwrap());
        } else {
            let near = values
                .iter()
                .zip(w1.tensor(name).unwrap())
                .all(|(g, w)| (g - (w - lr as f32 * 0.01)).abs() < 1e-6);
            assert!(near, "{name} is not plain SGD minus lr * c");
        }
    }
}

/// The images of `benches/reference/scattering_fixture.py`:
/// `((3 i + 5 k + 7 c) mod 11) / 11`.
fn scattering_test_image([c, h, w]: [usize; 3]) -> Vec<f32> {
    let mut v = Vec::with_capacity(c * h * w);
    for ch in 0..c {
        for i in 0..h {
            for k in 0..w {
                v.push(((3 * i + 5 * k + 7 * ch) % 11) as f32 / 11.0);
            }
        }
    }
    v
}

#[test]
fn the_scattering_transform_equals_kymatio() {
    // Kymatio 0.3.0's Scattering2D on three inputs: MNIST's 28 x 28 with
    // J = 2, L = 8 (81 maps of 7 x 7); a non-square image with J = 3, L = 4
    // (second order with two scales after the first, filters periodized
    // to coarser grids); two channels with J = 1.
    let text = std::fs::read_to_string(fixture("scattering_kymatio.json")).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for case in cases {
        let dims = |k: &str| -> [usize; 3] {
            let v: Vec<usize> = case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            [v[0], v[1], v[2]]
        };
        let (shape, out) = (dims("shape"), dims("out_shape"));
        let j = case["J"].as_u64().unwrap() as usize;
        let l = case["L"].as_u64().unwrap() as usize;
        let want: Vec<f32> = case["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let s = fedcore::models::Scattering::new(shape, j, l).unwrap();
        assert_eq!(s.output_shape(), out, "J = {j}, L = {l}, {shape:?}");
        let [c, h, w] = shape.map(|v| v as i64);
        let x = Tensor::from_slice(&scattering_test_image(shape)).view([1, c, h, w]);
        let got = Vec::<f32>::try_from(s.transform(&x).unwrap().flatten(0, -1)).unwrap();
        assert_eq!(got.len(), want.len());
        // Per coefficient: 1e-5 relative, or 5e-7 absolute for the small
        // second-order ones (float32 FFTs here, 8 significant digits in the
        // fixture; the largest differences are about 2e-7).
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * w.abs() + 5e-7,
                "J = {j}, L = {l}, {shape:?}: coefficient {i} is {g}, Kymatio's {w}"
            );
        }
    }
}

#[test]
fn scattering_features_of_a_data_set_keep_its_targets_and_refuse_other_shapes() {
    use fedcore::data::ImageDataset;
    use fedcore::models::Scattering;
    let s = Scattering::mnist().unwrap();
    assert_eq!(s.output_shape(), [81, 7, 7]);
    let digits = synthetic_digits(5, 3);
    // Batches of 2 (the last one short) give what one batch of 5 gives.
    let features = s.features(&digits, 2).unwrap();
    assert_eq!(features.len(), 5);
    assert_eq!(features.image_shape(), [81, 7, 7]);
    let all: Vec<usize> = (0..5).collect();
    let images = digits.batch(&all).unwrap();
    let direct = s
        .transform(&Tensor::from_slice(&images.images).view([5, 1, 28, 28]))
        .unwrap();
    let kept = features.batch(&all).unwrap();
    assert_eq!(kept.targets, images.targets);
    assert_eq!(
        max_abs_diff(
            &kept.images,
            &Vec::<f32>::try_from(direct.flatten(0, -1)).unwrap()
        ),
        0.0
    );
    // A constant image: the wavelets have zero mean, so orders 1 and 2
    // vanish, and the low-pass filter keeps the constant (its sum is 1 up
    // to Kymatio's 3.1415 for pi) in order 0.
    let flat = s
        .transform(&Tensor::full([1, 1, 28, 28], 0.7, tch::kind::FLOAT_CPU))
        .unwrap();
    let order0 = flat.narrow(1, 0, 1);
    let rest = flat.narrow(1, 1, 80);
    assert!((order0 - 0.7).abs().max().double_value(&[]) < 1e-4);
    assert!(rest.abs().max().double_value(&[]) < 1e-5);
    assert_eq!(
        Scattering::shape_for([3, 32, 20], 3, 6),
        [3 * (1 + 18 + 108), 4, 2]
    );
    // Wrong shapes and settings are refused with what was expected.
    let e = s
        .transform(&Tensor::zeros([2, 1, 32, 32], tch::kind::FLOAT_CPU))
        .unwrap_err();
    assert!(e.to_string().contains("[N, 1, 28, 28]"), "{e}");
    let wrong = InMemoryImages::new(vec![0.0; 64], [1, 8, 8], Targets::Classes(vec![1])).unwrap();
    assert!(s.features(&wrong, 4).is_err());
    for (shape, j, l) in [([1, 4, 28], 2, 8), ([1, 28, 28], 0, 8), ([0, 28, 28], 2, 8)] {
        assert!(
            Scattering::new(shape, j, l).is_err(),
            "{shape:?} J {j} L {l}"
        );
    }
}

#[test]
fn a_linear_model_on_scattering_features_has_per_sample_gradients_and_learns() {
    use fedcore::models::{ScatterLinear, Scattering};
    let s = Scattering::mnist().unwrap();
    let mut model = TchModel::build(Device::Cpu, 4, |b| {
        ScatterLinear::build(b, s.output_shape(), 27, 10)
    })
    .unwrap();
    // One linear layer: 10 x 3969 weights and 10 biases.
    assert_eq!(model.parameters().len(), 39_700);
    let data = DataSplit::all(Arc::new(s.features(&synthetic_digits(6, 9), 6).unwrap()));
    let batch = data.batches(6, None).next().unwrap().unwrap();
    let (fast, _, _) = assert_one_pass_matches_looped(&model, &batch);
    assert_eq!(fast.grads.size(), [6, 39_700]);
    // It learns the synthetic digits.
    let train = DataSplit::all(Arc::new(
        s.features(&synthetic_digits(300, 1), 100).unwrap(),
    ));
    let test = DataSplit::all(Arc::new(
        s.features(&synthetic_digits(100, 2), 100).unwrap(),
    ));
    let config = TrainConfig {
        epochs: 5,
        batch_size: 32,
        learning_rate: 0.5,
        optimizer: Optimizer::Sgd { momentum: 0.9 },
        seed: 3,
        ..TrainConfig::default()
    };
    assert_learns(&mut model, &train, &test, &config);
    // Raw images and a group count that does not divide the maps are refused.
    assert!(
        model
            .evaluate(&DataSplit::all(Arc::new(synthetic_digits(2, 1))))
            .is_err()
    );
    let e = TchModel::build(Device::Cpu, 1, |b| {
        ScatterLinear::build(b, [81, 7, 7], 10, 10)
    })
    .unwrap_err();
    assert!(e.to_string().contains("divides"), "{e}");
}
