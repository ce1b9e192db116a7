//! Cross-site evaluation: the global model and every site's local model on
//! every site's held-out data, at the end of a run.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::*;
use fedcore::linear::{Dataset, SoftmaxRegression};
use fedcore::memory::InMemoryTransport;
use fedcore::{
    Client, ClientId, ClientUpdate, CrossSiteModel, EvaluateIns, Evaluation, Failure, FedAvg,
    FitIns, Layout, Model, ModelClient, SealedAggregator, SealedTensors, Server,
};

/// Site `i`: 90 % of its examples from class `i` (train and held-out alike).
fn skewed(i: usize, seed: u64) -> Dataset {
    let all = fedcore::linear::synthetic_blobs(TASK + seed, 800, DIM, CLASSES, 1.0);
    let mine: Vec<usize> = (0..all.len()).filter(|&k| all.y[k] == i).take(90).collect();
    let others: Vec<usize> = (0..all.len()).filter(|&k| all.y[k] != i).take(10).collect();
    all.select(&[mine, others].concat())
}

fn sites() -> (InMemoryTransport, Vec<Dataset>) {
    let mut t = InMemoryTransport::new();
    let mut tests = Vec::new();
    for i in 0..3 {
        let test = skewed(i, 100 + i as u64);
        t.add_client(
            ModelClient::new(
                name(i as u64),
                SoftmaxRegression::new(DIM, CLASSES),
                skewed(i, i as u64),
            )
            .with_test_data(test.clone()),
        )
        .unwrap();
        tests.push(test);
    }
    (t, tests)
}

/// The matrix has the global model and the three local models as rows and
/// the three sites as columns; the global row is exactly the global model
/// evaluated on each site's held-out data here, and each local model (many
/// local epochs on one site's skewed data) does best on its own site.
#[test]
fn the_matrix_holds_the_global_and_every_local_model_on_every_site() {
    let (t, tests) = sites();
    let mut cfg = config(3);
    cfg.train.epochs = 5;
    cfg.cross_site_evaluation = true;
    let mut s = Server::new(cfg, initial(), t, FedAvg).unwrap();
    let report = s.run().unwrap();
    let m = report.cross_site.expect("the run completed");
    assert_eq!(m.round, 3);
    assert_eq!(
        m.sites,
        (0..3).map(|i| ClientId::new(name(i))).collect::<Vec<_>>()
    );
    assert_eq!(m.models[0], CrossSiteModel::Global);
    for i in 0..3 {
        assert_eq!(
            m.models[i + 1],
            CrossSiteModel::Local {
                site: ClientId::new(name(i as u64)),
                round: 3
            }
        );
    }
    assert!(m.failures.is_empty(), "{:?}", m.failures);
    let mut global = SoftmaxRegression::new(DIM, CLASSES);
    global.set_parameters(s.global()).unwrap();
    for (k, test) in tests.iter().enumerate() {
        assert_eq!(m.cells[0][k], Some(global.evaluate(test).unwrap()));
    }
    for i in 0..3 {
        let losses: Vec<f64> = (0..3).map(|k| m.value(i + 1, k, "loss").unwrap()).collect();
        let best = (0..3)
            .min_by(|&a, &b| losses[a].total_cmp(&losses[b]))
            .unwrap();
        assert_eq!(best, i, "local model of site {i}: {losses:?}");
        // And it beats the global model there.
        assert!(losses[i] < m.value(0, i, "loss").unwrap());
    }
    let md = m.to_markdown("accuracy", 100.0, 1);
    assert_eq!(md.lines().count(), 2 + 4, "{md}");
}

/// Trains, but cannot evaluate.
struct FailsToEvaluate(ModelClient<SoftmaxRegression>);

impl Client for FailsToEvaluate {
    fn id(&self) -> &ClientId {
        self.0.id()
    }

    fn fit(&mut self, ins: &FitIns) -> fedcore::Result<ClientUpdate> {
        self.0.fit(ins)
    }

    fn evaluate(&mut self, _: &EvaluateIns) -> fedcore::Result<Evaluation> {
        Err(fedcore::Error::Model("the held-out set is gone".into()))
    }
}

/// A site that cannot evaluate leaves its column empty with the reason; the
/// other cells are there.
#[test]
fn a_site_that_cannot_evaluate_leaves_its_cells_empty() {
    let (mut t, _) = sites();
    t.add_client(FailsToEvaluate(ModelClient::new(
        name(3),
        SoftmaxRegression::new(DIM, CLASSES),
        client_data(3),
    )))
    .unwrap();
    let mut cfg = config(1);
    cfg.cross_site_evaluation = true;
    let mut s = Server::new(cfg, initial(), t, FedAvg).unwrap();
    let m = s.run().unwrap().cross_site.unwrap();
    assert_eq!(m.models.len(), 5);
    assert_eq!(m.failures.len(), 5, "one per model, all at site 3");
    for (r, row) in m.cells.iter().enumerate() {
        assert!(row[..3].iter().all(Option::is_some), "row {r}");
        assert!(row[3].is_none());
    }
    let f = &m.failures[0];
    assert_eq!(f.site.as_str(), name(3));
    assert!(
        matches!(&f.reason, Failure::ClientError(e) if e.contains("held-out set is gone")),
        "{}",
        f.reason
    );
    // Off by default: no matrix, no local models kept.
    let (t, _) = sites();
    let mut s = Server::new(config(1), initial(), t, FedAvg).unwrap();
    assert!(s.run().unwrap().cross_site.is_none());
    assert_eq!(s.cross_site_evaluation().unwrap().models.len(), 1);
}

/// A sealed aggregator that is never reached.
struct NeverSeals;

impl SealedAggregator for NeverSeals {
    fn name(&self) -> String {
        "never".into()
    }

    fn seal_initial(&self, layout: &Arc<Layout>, _: &[f32]) -> fedcore::Result<SealedTensors> {
        Ok(SealedTensors::new(layout.clone(), Vec::new()))
    }

    fn check(&self, _: &SealedTensors, _: &SealedTensors) -> fedcore::Result<()> {
        Ok(())
    }

    fn check_global(&self, _: &SealedTensors) -> fedcore::Result<()> {
        Ok(())
    }

    fn accumulate(
        &self,
        global: &SealedTensors,
        _: &[&SealedTensors],
        _: &[f64],
    ) -> fedcore::Result<SealedTensors> {
        Ok(global.clone())
    }
}

#[test]
fn sealed_runs_refuse_cross_site_evaluation() {
    let mut cfg = config(1);
    cfg.cross_site_evaluation = true;
    let s = Server::new(cfg, initial(), federation(3), FedAvg).unwrap();
    let err = match s.with_sealing(&["linear.bias"], NeverSeals) {
        Ok(_) => panic!("sealing with cross-site evaluation should be refused"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cross-site evaluation"), "{err}");
}
