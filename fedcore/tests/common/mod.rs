//! Shared set-up for the integration tests: a federation of softmax-regression
//! clients on synthetic data.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use fedcore::linear::{Dataset, SoftmaxRegression, synthetic_blobs};
use fedcore::memory::InMemoryTransport;
use fedcore::{
    Client, ClientId, ClientUpdate, Envelope, EvaluateIns, Evaluation, FitIns, Model, ModelClient,
    Parameters, Reply, SealedTensors, ServerConfig, TrainConfig,
};

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

/// A two-step strategy for the tests: step 1 averages the updates (FedAvg);
/// step 2 sends that mean to every client still in the round and asks for
/// its own update minus the mean ([`residual`]); the aggregate is the
/// example-weighted mean of `mean + residual` over the clients that answered,
/// i.e. FedAvg over the clients that stayed for both steps.
pub struct Residuals;

impl fedcore::Strategy for Residuals {
    fn describe(&self) -> fedcore::StrategyInfo {
        fedcore::StrategyInfo::new("residuals")
    }

    fn aggregate_round(
        &mut self,
        updates: &[fedcore::ClientUpdate],
        steps: &mut fedcore::RoundSteps<'_>,
    ) -> fedcore::Result<fedcore::Aggregate> {
        use fedcore::Aggregator;
        let mean = std::sync::Arc::new(fedcore::FedAvg.aggregate(updates)?.parameters);
        let answers = steps.ask(|_| fedcore::StepRequest::new(mean.clone()))?;
        let mut back = Vec::new();
        for (client, reply) in answers {
            let u = updates
                .iter()
                .find(|u| u.client == client)
                .expect("an answer from a client of the round");
            if reply.values.layout() != mean.layout() {
                steps.reject(&client, "the residual has another layout")?;
                continue;
            }
            let mut values = (*mean).clone();
            values.axpy(1.0, &reply.values)?;
            back.push(fedcore::ClientUpdate::new(
                client,
                u.round,
                u.num_examples,
                values,
            ));
        }
        fedcore::FedAvg.aggregate(&back)
    }
}

/// The client side of [`Residuals`]: the update it sent minus the mean.
pub fn residual(
    ins: &fedcore::StepIns,
    sent: &fedcore::ClientUpdate,
) -> fedcore::Result<fedcore::StepReply> {
    let mut values = sent.values.clone();
    values.axpy(-1.0, &ins.values)?;
    Ok(fedcore::StepReply::new(ins, values))
}

/// FedAvg that fails in the given rounds (counted by its calls, from 1).
pub struct FailsInRounds {
    pub rounds: Vec<u64>,
    pub calls: u64,
}

impl fedcore::Aggregator for FailsInRounds {
    fn name(&self) -> String {
        "fails-in-rounds".into()
    }

    fn aggregate(
        &mut self,
        updates: &[fedcore::ClientUpdate],
    ) -> fedcore::Result<fedcore::Aggregate> {
        self.calls += 1;
        if self.rounds.contains(&self.calls) {
            return Err(fedcore::Error::InvalidWeights {
                reason: format!("refused on call {}", self.calls),
            });
        }
        fedcore::FedAvg.aggregate(updates)
    }
}

/// Sends back `2 * global` as its update, and the sealed bytes reversed.
pub struct Doubler(pub ClientId);

impl Client for Doubler {
    fn id(&self) -> &ClientId {
        &self.0
    }

    fn fit(&mut self, ins: &FitIns) -> fedcore::Result<ClientUpdate> {
        let values = ins.parameters.as_slice().iter().map(|v| v * 2.0).collect();
        let mut u = ClientUpdate::new(
            self.0.clone(),
            ins.round,
            10,
            ins.parameters.with_values(values)?,
        );
        if let Some(s) = &ins.sealed {
            let mut bytes = s.bytes().to_vec();
            bytes.reverse();
            u.sealed = Some(SealedTensors::new(s.layout().clone(), bytes));
        }
        Ok(u)
    }

    fn evaluate(&mut self, _: &EvaluateIns) -> fedcore::Result<Evaluation> {
        Ok(Evaluation {
            loss: 0.5,
            num_examples: 3,
            metrics: Default::default(),
        })
    }
}

/// Checks that `env` is a fit reply from [`Doubler`]: its own client,
/// `global`'s layout, and `2 * global` bit for bit.
pub fn check_doubled(env: Envelope, global: &Parameters) {
    let Ok(Reply::Fit(u)) = env.reply else {
        panic!("{}: {:?}", env.client, env.reply.err())
    };
    assert_eq!(u.client, env.client);
    assert_eq!(u.values.layout().tensors(), global.layout().tensors());
    assert!(
        u.values
            .as_slice()
            .iter()
            .zip(global.as_slice())
            .all(|(a, b)| a.to_bits() == (b * 2.0).to_bits())
    );
}
