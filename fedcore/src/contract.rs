//! The contract every [`Aggregator`] of the workspace must pass.
//!
//! Call [`check_aggregator`] from a test with a constructor for the
//! aggregator and what it promises about example-count weights:
//!
//! ```
//! use fedcore::FedAvg;
//! use fedcore::contract::{Weighting, check_aggregator};
//! check_aggregator(|| FedAvg, Weighting::ExampleCounts);
//! ```
//!
//! Each check panics with a message that names the aggregator and the check.
//! The checks:
//!
//! 1. empty input is [`Error::EmptyUpdates`];
//! 2. updates with different layouts are a typed error, not a panic;
//! 3. identical updates return that update (for `m`, `m + 1` and `m + 6`
//!    clients, any counts, where `m` is [`Aggregator::min_updates`]);
//! 4. input order does not matter (proptest over random updates and permutations);
//! 5. weights: with [`Weighting::ExampleCounts`], one client with `2k`
//!    examples counts like two identical clients with `k` each; with
//!    [`Weighting::Uniform`], changing counts changes nothing;
//! 6. the result keeps the input layout and is finite, and there is one
//!    diagnostics entry per update, in input order, with a finite,
//!    non-negative weight.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::aggregate::{Aggregate, Aggregator};
use crate::error::Error;
use crate::params::Parameters;
use crate::update::{ClientId, ClientUpdate};

pub use crate::aggregate::Weighting;

/// Relative tolerance of the comparisons (iterative aggregators converge to it).
pub const TOLERANCE: f32 = 1e-4;

fn params(values: Vec<f32>) -> Parameters {
    let n = values.len();
    let split = n / 3;
    Parameters::from_tensors([
        ("layer.weight", vec![split], values[..split].to_vec()),
        ("layer.bias", vec![n - split], values[split..].to_vec()),
    ])
    .expect("valid test layout")
}

fn update(i: usize, n: u64, values: Vec<f32>) -> ClientUpdate {
    ClientUpdate::new(
        ClientId::new(format!("client-{i:03}")),
        1,
        n,
        params(values),
    )
}

fn close(a: &[f32], b: &[f32]) -> Result<(), String> {
    let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if (x - y).abs() > TOLERANCE * scale || !x.is_finite() {
            return Err(format!("index {i}: {x} vs {y}"));
        }
    }
    if a.len() != b.len() {
        return Err(format!("length {} vs {}", a.len(), b.len()));
    }
    Ok(())
}

fn run<A: Aggregator>(agg: &mut A, updates: &[ClientUpdate]) -> Aggregate {
    let name = agg.name();
    let out = agg
        .aggregate(updates)
        .unwrap_or_else(|e| panic!("{name}: aggregate failed on valid input: {e}"));
    check_shape(&name, updates, &out);
    out
}

fn check_shape(name: &str, updates: &[ClientUpdate], out: &Aggregate) {
    assert!(
        out.parameters.layout() == updates[0].values.layout(),
        "{name}: result layout differs from the input layout"
    );
    assert!(
        out.parameters.first_non_finite().is_none(),
        "{name}: result is not finite"
    );
    assert_eq!(
        out.clients.len(),
        updates.len(),
        "{name}: one diagnostics entry per update"
    );
    for (d, u) in out.clients.iter().zip(updates) {
        assert_eq!(d.client, u.client, "{name}: diagnostics out of input order");
        assert!(
            d.weight.is_finite() && d.weight >= 0.0,
            "{name}: weight {} of {} is not a finite non-negative number",
            d.weight,
            d.client
        );
    }
}

/// Runs the whole contract against aggregators made by `make` (a fresh one
/// for each check, so that stateful aggregators start clean).
pub fn check_aggregator<A: Aggregator>(make: impl Fn() -> A, weighting: Weighting) {
    let name = make().name();

    // 1. Empty input.
    match make().aggregate(&[]) {
        Err(Error::EmptyUpdates) => {}
        other => panic!("{name}: empty input must be Error::EmptyUpdates, got {other:?}"),
    }

    // 2. Mismatched layouts.
    let a = update(0, 10, vec![1.0; 9]);
    let b = update(1, 10, vec![1.0; 12]);
    assert!(
        make().aggregate(&[a, b]).is_err(),
        "{name}: mismatched layouts must be an error"
    );

    // 3. Identical updates (from the aggregator's minimum count up).
    let min = make().min_updates().max(1);
    for n in [min, min + 1, min + 6] {
        let v: Vec<f32> = (0..30).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let updates: Vec<_> = (0..n)
            .map(|i| update(i, [5, 1, 100, 3, 9, 2][i % 6], v.clone()))
            .collect();
        let out = run(&mut make(), &updates);
        if let Err(e) = close(out.parameters.as_slice(), &v) {
            panic!("{name}: {n} identical updates must aggregate to that update ({e})");
        }
        // The same through `aggregate_into` with a used buffer (NaN where
        // a rule that forgot to overwrite a value would leave it).
        let mut used = updates[0].values.zeros_like();
        used.as_mut_slice().fill(f32::NAN);
        let out = make()
            .aggregate_into(&updates, used)
            .unwrap_or_else(|e| panic!("{name}: aggregate_into failed on valid input: {e}"));
        if let Err(e) = close(out.parameters.as_slice(), &v) {
            panic!("{name}: aggregate_into a used buffer must give what aggregate gives ({e})");
        }
        check_shape(&name, &updates, &out);
    }

    let runner = || {
        TestRunner::new(Config {
            cases: 24,
            failure_persistence: None,
            ..Config::default()
        })
    };

    // 4. Order invariance.
    let strategy = (min.max(3)..min.max(3) + 5, 3usize..40).prop_flat_map(|(n, d)| {
        (
            prop::collection::vec(prop::collection::vec(-10.0f32..10.0, d), n),
            prop::collection::vec(1u64..50, n),
            Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
        )
    });
    runner()
        .run(&strategy, |(values, counts, perm)| {
            let updates: Vec<_> = values
                .iter()
                .zip(&counts)
                .enumerate()
                .map(|(i, (v, &c))| update(i, c, v.clone()))
                .collect();
            let shuffled: Vec<_> = perm.iter().map(|&i| updates[i].clone()).collect();
            let x = run(&mut make(), &updates);
            let y = run(&mut make(), &shuffled);
            close(x.parameters.as_slice(), y.parameters.as_slice()).map_err(|e| {
                TestCaseError::fail(format!("{name}: input order changed the result ({e})"))
            })
        })
        .unwrap_or_else(|e| panic!("{e}"));

    // 5. Weights.
    let strategy = (min.max(2)..min.max(2) + 4, 3usize..30).prop_flat_map(|(n, d)| {
        (
            prop::collection::vec(prop::collection::vec(-10.0f32..10.0, d), n),
            prop::collection::vec(1u64..20, n),
        )
    });
    runner()
        .run(&strategy, |(values, counts)| {
            let updates: Vec<_> = values
                .iter()
                .zip(&counts)
                .enumerate()
                .map(|(i, (v, &c))| update(i, c, v.clone()))
                .collect();
            let base = run(&mut make(), &updates);
            let (other, what) = match weighting {
                Weighting::ExampleCounts => {
                    // Client 0 with 2k examples == two copies of client 0 with k each.
                    let mut doubled = updates.clone();
                    doubled[0].num_examples = 2 * counts[0];
                    let mut split = updates.clone();
                    split.push(update(values.len(), counts[0], values[0].clone()));
                    (
                        (run(&mut make(), &doubled), run(&mut make(), &split)),
                        "a client with 2k examples must count like two clients with k",
                    )
                }
                Weighting::Uniform => {
                    let mut recounted = updates.clone();
                    for (i, u) in recounted.iter_mut().enumerate() {
                        u.num_examples = 1 + (i as u64 * 7919) % 1000;
                    }
                    (
                        (base.clone(), run(&mut make(), &recounted)),
                        "example counts must not change the result",
                    )
                }
            };
            close(other.0.parameters.as_slice(), other.1.parameters.as_slice())
                .map_err(|e| TestCaseError::fail(format!("{name}: {what} ({e})")))
        })
        .unwrap_or_else(|e| panic!("{e}"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FedAvg;

    #[test]
    fn fedavg_passes_the_contract() {
        check_aggregator(|| FedAvg, Weighting::ExampleCounts);
    }

    /// An aggregator that breaks the weights promise must fail the suite,
    /// or the suite proves nothing.
    #[test]
    #[should_panic(expected = "2k examples")]
    fn unweighted_mean_fails_the_weighted_contract() {
        struct PlainMean;
        impl Aggregator for PlainMean {
            fn name(&self) -> String {
                "plain-mean".into()
            }
            fn aggregate(&mut self, updates: &[ClientUpdate]) -> crate::Result<Aggregate> {
                let mut agg = FedAvg.aggregate(updates)?;
                let mut out = updates[0].values.zeros_like();
                for u in updates {
                    out.axpy(1.0 / updates.len() as f32, &u.values)?;
                }
                agg.parameters = out;
                Ok(agg)
            }
        }
        check_aggregator(|| PlainMean, Weighting::ExampleCounts);
    }

    /// A rule that writes into the buffer but skips a value fails.
    #[test]
    #[should_panic(expected = "aggregate_into a used buffer")]
    fn a_rule_that_leaves_old_values_in_the_buffer_fails() {
        struct Sloppy;
        impl Aggregator for Sloppy {
            fn name(&self) -> String {
                "sloppy".into()
            }
            fn aggregate(&mut self, updates: &[ClientUpdate]) -> crate::Result<Aggregate> {
                FedAvg.aggregate(updates)
            }
            fn aggregate_into(
                &mut self,
                updates: &[ClientUpdate],
                mut buffer: crate::Parameters,
            ) -> crate::Result<Aggregate> {
                let mut agg = FedAvg.aggregate(updates)?;
                let n = buffer.as_slice().len();
                buffer.as_mut_slice()[..n - 1].copy_from_slice(&agg.parameters.as_slice()[..n - 1]);
                agg.parameters = buffer;
                Ok(agg)
            }
        }
        check_aggregator(|| Sloppy, Weighting::ExampleCounts);
    }

    #[test]
    #[should_panic(expected = "input order")]
    fn order_dependent_aggregator_fails() {
        struct First;
        impl Aggregator for First {
            fn name(&self) -> String {
                "first".into()
            }
            fn aggregate(&mut self, updates: &[ClientUpdate]) -> crate::Result<Aggregate> {
                let mut agg = FedAvg.aggregate(updates)?;
                agg.parameters = updates[0].values.clone();
                Ok(agg)
            }
        }
        check_aggregator(|| First, Weighting::Uniform);
    }
}
