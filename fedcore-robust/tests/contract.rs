//! Every aggregator of this crate runs the core contract suite.
#![allow(clippy::unwrap_used, missing_docs)]

use fedcore::contract::check_aggregator;
use fedcore_robust::*;

/// The contract compares results to 1e-4; Weiszfeld's default stopping rule
/// (objective change 1e-6) leaves about 1e-3 of slack in the position, so the
/// suite runs it to a tight tolerance.
fn tight() -> GeometricMedianParams {
    GeometricMedianParams::new()
        .tolerance(1e-12)
        .max_iterations(10_000)
}

#[test]
fn geometric_median_weighted() {
    check_aggregator(|| tight().check().unwrap(), Weighting::ExampleCounts);
}

#[test]
fn geometric_median_by_direct_passes() {
    check_aggregator(
        || tight().method(Method::Passes).check().unwrap(),
        Weighting::ExampleCounts,
    );
}

/// One aggregator over rounds of other dimensions, into the last round's
/// output or a buffer of another layout: always what `aggregate` gives.
#[test]
fn geometric_median_into_reused_buffers_across_dimensions() {
    use fedcore::{Aggregator, ClientUpdate, Parameters};
    let round = |d: usize, seed: usize| -> Vec<ClientUpdate> {
        (0..5)
            .map(|i| {
                let v: Vec<f32> = (0..d)
                    .map(|k| ((k * 7 + i * 13 + seed) % 17) as f32 - 8.0)
                    .collect();
                let p = Parameters::from_tensors([("w", vec![d], v)]).unwrap();
                ClientUpdate::new(format!("c{i}").into(), 1, 10 + i as u64, p)
            })
            .collect()
    };
    for method in [Method::Gram, Method::Passes] {
        let mut reused = tight().method(method).check().unwrap();
        let mut last: Option<Parameters> = None;
        for (r, d) in [30usize, 5, 30, 30].into_iter().enumerate() {
            let ups = round(d, r);
            let fresh = tight()
                .method(method)
                .check()
                .unwrap()
                .aggregate(&ups)
                .unwrap();
            let got = match last.take() {
                Some(b) => reused.aggregate_into(&ups, b).unwrap(),
                None => reused.aggregate(&ups).unwrap(),
            };
            assert_eq!(got.parameters.layout(), fresh.parameters.layout());
            let same = got
                .parameters
                .as_slice()
                .iter()
                .zip(fresh.parameters.as_slice())
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{method:?}, round {r}, d = {d}");
            last = Some(got.parameters);
        }
    }
}

#[test]
fn geometric_median_uniform() {
    check_aggregator(
        || tight().weighting(Weighting::Uniform).check().unwrap(),
        Weighting::Uniform,
    );
}

#[test]
fn coordinate_median() {
    check_aggregator(|| CoordinateMedian, Weighting::Uniform);
}

#[test]
fn trimmed_mean() {
    check_aggregator(
        || TrimmedMeanParams::new(0.2).check().unwrap(),
        Weighting::Uniform,
    );
}

#[test]
fn krum_and_multi_krum() {
    check_aggregator(
        || KrumParams::new(10, 1).check().unwrap(),
        Weighting::Uniform,
    );
    check_aggregator(
        || KrumParams::new(10, 1).multi(3).check().unwrap(),
        Weighting::Uniform,
    );
}

#[test]
fn bulyan() {
    check_aggregator(
        || BulyanParams::new(11, 1).check().unwrap(),
        Weighting::Uniform,
    );
    check_aggregator(
        || BulyanParams::new(11, 2).check().unwrap(),
        Weighting::Uniform,
    );
}

/// Run to its fixed point (many iterations) for the contract's
/// comparisons; a fresh aggregator, its center at zero, for each check.
#[test]
fn centered_clipping() {
    check_aggregator(
        || {
            CenteredClippingParams::new(2.0)
                .iterations(100_000)
                .check()
                .unwrap()
        },
        Weighting::Uniform,
    );
}

#[test]
fn means() {
    check_aggregator(Mean::default, Weighting::ExampleCounts);
    check_aggregator(
        || Mean {
            weighting: Weighting::Uniform,
        },
        Weighting::Uniform,
    );
}

#[test]
fn pre_aggregated() {
    check_aggregator(
        || PreAggregated::new(CoordinateMedian).with(NormClip::median()),
        Weighting::Uniform,
    );
    check_aggregator(
        || PreAggregated::new(CoordinateMedian).with(Nnm::new(1)),
        Weighting::Uniform,
    );
    check_aggregator(
        || {
            let gm = tight().weighting(Weighting::Uniform).check().unwrap();
            PreAggregated::new(gm)
                .with(NormClip::median())
                .with(Nnm::new(1))
        },
        Weighting::Uniform,
    );
}
