//! The client side: what runs at a hospital.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::{Evaluation, Model, TrainConfig};
use crate::params::Parameters;
use crate::privacy::PrivacyMechanism;
use crate::update::{ClientId, ClientUpdate, Protection};

/// A fit request: train from `parameters` for `config`.
#[derive(Debug, Clone)]
pub struct FitIns {
    /// The round this request belongs to; the update must carry it back.
    pub round: u64,
    /// The global model (shared, not copied, between in-process clients).
    pub parameters: Arc<Parameters>,
    /// Local training settings, with a seed specific to this round and client.
    pub config: TrainConfig,
}

/// An evaluate request: evaluate `parameters` on local held-out data.
#[derive(Debug, Clone)]
pub struct EvaluateIns {
    /// The round this request belongs to.
    pub round: u64,
    /// The global model.
    pub parameters: Arc<Parameters>,
}

/// A participant as the server sees it through a transport.
pub trait Client: Send {
    /// Its identity.
    fn id(&self) -> &ClientId;

    /// Trains locally and returns an update.
    fn fit(&mut self, ins: &FitIns) -> Result<ClientUpdate>;

    /// Evaluates the given parameters locally.
    fn evaluate(&mut self, ins: &EvaluateIns) -> Result<Evaluation>;
}

impl<C: Client + ?Sized> Client for Box<C> {
    fn id(&self) -> &ClientId {
        (**self).id()
    }

    fn fit(&mut self, ins: &FitIns) -> Result<ClientUpdate> {
        (**self).fit(ins)
    }

    fn evaluate(&mut self, ins: &EvaluateIns) -> Result<Evaluation> {
        (**self).evaluate(ins)
    }
}

/// The standard client: a [`Model`] with its local data and the privacy
/// mechanisms that run on every outgoing update.
///
/// `fit` loads the global parameters, trains, computes the delta
/// `local - global`, runs each mechanism on it in order and records each in
/// the update's provenance.
pub struct ModelClient<M: Model>
where
    M::Data: Sized,
{
    id: ClientId,
    model: M,
    train: M::Data,
    test: Option<M::Data>,
    mechanisms: Vec<Box<dyn PrivacyMechanism>>,
}

impl<M: Model> ModelClient<M>
where
    M::Data: Sized + Send,
{
    /// A client that trains `model` on `train`.
    pub fn new(id: impl Into<ClientId>, model: M, train: M::Data) -> Self {
        Self {
            id: id.into(),
            model,
            train,
            test: None,
            mechanisms: Vec::new(),
        }
    }

    /// Local held-out data for federated evaluation (otherwise the training data is used).
    pub fn with_test_data(mut self, test: M::Data) -> Self {
        self.test = Some(test);
        self
    }

    /// Adds a privacy mechanism applied to every outgoing update.
    pub fn with_mechanism(mut self, mechanism: impl PrivacyMechanism + 'static) -> Self {
        self.mechanisms.push(Box::new(mechanism));
        self
    }

    /// The model (e.g. to inspect it after training).
    pub fn model(&self) -> &M {
        &self.model
    }
}

impl<M: Model> Client for ModelClient<M>
where
    M::Data: Sized + Send,
{
    fn id(&self) -> &ClientId {
        &self.id
    }

    fn fit(&mut self, ins: &FitIns) -> Result<ClientUpdate> {
        self.model.set_parameters(&ins.parameters)?;
        let out = self.model.fit(&self.train, &ins.config)?;
        let mut delta = self.model.parameters().sub(&ins.parameters)?;
        let mut provenance = out.privacy;
        for m in &mut self.mechanisms {
            let cost = m.privatize(&mut delta)?;
            provenance.push(Protection {
                mechanism: m.name(),
                cost,
                spent: m.spent(),
            });
        }
        if let Some(nf) = delta.first_non_finite() {
            return Err(Error::Model(format!(
                "local training produced {} in `{}`[{}]",
                nf.value, nf.tensor, nf.index
            )));
        }
        let mut update = ClientUpdate::new(self.id.clone(), ins.round, out.num_examples, delta)
            .with_metrics(out.metrics);
        update.provenance = provenance;
        Ok(update)
    }

    fn evaluate(&mut self, ins: &EvaluateIns) -> Result<Evaluation> {
        self.model.set_parameters(&ins.parameters)?;
        let data = self.test.as_ref().unwrap_or(&self.train);
        self.model.evaluate(data)
    }
}
