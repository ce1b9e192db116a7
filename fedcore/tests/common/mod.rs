//! Shared set-up for the integration tests: a federation of softmax-regression
//! clients on synthetic data.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use fedcore::linear::{Dataset, SoftmaxRegression, synthetic_blobs};
use fedcore::memory::InMemoryTransport;
use fedcore::{Model, ModelClient, Parameters, ServerConfig, TrainConfig};

pub const DIM: usize = 10;
pub const CLASSES: usize = 4;
/// All datasets share the task (same high seed bits) and differ in samples.
pub const TASK: u64 = 0xfed << 16;

pub fn client_data(i: u64) -> Dataset {
    synthetic_blobs(TASK + i, 120, DIM, CLASSES, 1.0)
}

pub fn test_data() -> Dataset {
    synthetic_blobs(TASK + 999, 500, DIM, CLASSES, 1.0)
}

pub fn name(i: u64) -> String {
    format!("hospital-{i}")
}

pub fn federation(n: u64) -> InMemoryTransport {
    let mut t = InMemoryTransport::new();
    for i in 0..n {
        t.add_client(ModelClient::new(
            name(i),
            SoftmaxRegression::new(DIM, CLASSES),
            client_data(i),
        ))
        .unwrap();
    }
    t
}

pub fn initial() -> Parameters {
    SoftmaxRegression::new(DIM, CLASSES).parameters()
}

pub fn config(rounds: u64) -> ServerConfig {
    ServerConfig {
        rounds,
        fraction_fit: 1.0,
        min_fit_clients: 3,
        min_available_clients: 3,
        round_timeout: Duration::from_secs(20),
        seed: 7,
        train: TrainConfig {
            epochs: 1,
            batch_size: 16,
            learning_rate: 0.05,
            ..TrainConfig::default()
        },
        ..ServerConfig::default()
    }
}

pub fn central_loss(params: &Parameters) -> f64 {
    let mut m = SoftmaxRegression::new(DIM, CLASSES);
    m.set_parameters(params).unwrap();
    m.evaluate(&test_data()).unwrap().loss
}
