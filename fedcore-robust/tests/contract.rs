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
