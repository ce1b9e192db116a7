//! The client side: what runs at a hospital.

use std::sync::Arc;

use crate::compress::ErrorFeedback;
use crate::error::{Error, Result};
use crate::model::{Evaluation, Model, TrainConfig};
use crate::params::Parameters;
use crate::privacy::PrivacyMechanism;
use crate::scaffold::ControlVariate;
use crate::sealed::{SealedTensors, Sealer};
use crate::update::{ClientId, ClientUpdate, Metrics, Protection};

/// A fit request: train from `parameters` for `config`.
#[derive(Debug, Clone)]
pub struct FitIns {
    /// The round this request belongs to; the update must carry it back.
    pub round: u64,
    /// The global model (shared, not copied, between in-process clients).
    pub parameters: Arc<Parameters>,
    /// Local training settings, with a seed specific to this round and client.
    pub config: TrainConfig,
    /// The sealed tensors of the global model, when the run seals some
    /// (their values in `parameters` are then zeros).
    pub sealed: Option<Arc<SealedTensors>>,
    /// The strategy's tensors for this round ([`crate::Strategy::fit_extra`]),
    /// e.g. SCAFFOLD's server control variate.
    pub extra: Option<Arc<Parameters>>,
}

/// An evaluate request: evaluate `parameters` on local held-out data.
#[derive(Debug, Clone)]
pub struct EvaluateIns {
    /// The round this request belongs to.
    pub round: u64,
    /// The global model.
    pub parameters: Arc<Parameters>,
    /// The sealed tensors of the global model, as in [`FitIns::sealed`].
    pub sealed: Option<Arc<SealedTensors>>,
}

/// An extra step of a multi-step round (see [`Strategy`](crate::Strategy)): what the
/// server's strategy sends to each client still in the round after the fit
/// exchange, e.g. an aggregate of the first step's updates.
#[derive(Debug, Clone)]
pub struct StepIns {
    /// The round.
    pub round: u64,
    /// The step, from 1 (the fit exchange is step 0).
    pub step: u32,
    /// Tensors for the client (any layout the strategy chooses; may be empty).
    pub values: Arc<Parameters>,
    /// Sealed tensors for the client, if the strategy sends some.
    pub sealed: Option<Arc<SealedTensors>>,
    /// Scalars for the client.
    pub metrics: Metrics,
    /// The largest reply (values and sealed bytes) the server accepts for
    /// this step. A transport that reads replies from the network refuses a
    /// larger one before allocating it; it is not sent to the client.
    pub max_reply_bytes: u64,
}

/// A client's answer to a [`StepIns`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepReply {
    /// The round it answers.
    pub round: u64,
    /// The step it answers.
    pub step: u32,
    /// Tensors (may be empty).
    pub values: Parameters,
    /// Sealed tensors, if the step asks for some.
    pub sealed: Option<SealedTensors>,
    /// Scalars.
    pub metrics: Metrics,
}

impl StepReply {
    /// A reply to `ins` carrying `values` and nothing else.
    pub fn new(ins: &StepIns, values: Parameters) -> Self {
        Self {
            round: ins.round,
            step: ins.step,
            values,
            sealed: None,
            metrics: Metrics::new(),
        }
    }
}

/// A participant as the server sees it through a transport.
pub trait Client: Send {
    /// Its identity.
    fn id(&self) -> &ClientId;

    /// Trains locally and returns an update.
    fn fit(&mut self, ins: &FitIns) -> Result<ClientUpdate>;

    /// Evaluates the given parameters locally.
    fn evaluate(&mut self, ins: &EvaluateIns) -> Result<Evaluation>;

    /// Answers an extra step of a multi-step round. The default refuses:
    /// a client takes part in a multi-step strategy only if it implements
    /// this (a [`ModelClient`] does with [`ModelClient::with_responder`]).
    fn step(&mut self, ins: &StepIns) -> Result<StepReply> {
        Err(Error::Unsupported(format!(
            "client `{}` answers no step of a multi-step round (step {} of round {})",
            self.id(),
            ins.step,
            ins.round
        )))
    }
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

    fn step(&mut self, ins: &StepIns) -> Result<StepReply> {
        (**self).step(ins)
    }
}

/// The client side of a multi-step strategy, plugged into a [`ModelClient`]:
/// computes a step's answer from what the server sent and the update this
/// client sent in the round's fit exchange (after its privacy mechanisms,
/// i.e. what the server saw).
///
/// Implemented for closures `FnMut(&StepIns, &ClientUpdate) -> Result<StepReply>`.
pub trait StepResponder: Send {
    /// Answers one step.
    fn respond(&mut self, ins: &StepIns, sent: &ClientUpdate) -> Result<StepReply>;
}

impl<F> StepResponder for F
where
    F: FnMut(&StepIns, &ClientUpdate) -> Result<StepReply> + Send,
{
    fn respond(&mut self, ins: &StepIns, sent: &ClientUpdate) -> Result<StepReply> {
        self(ins, sent)
    }
}

/// The standard client: a [`Model`] with its local data and the privacy
/// mechanisms that run on every outgoing update.
///
/// `fit` loads the global parameters, trains, computes the delta
/// `local - global`, runs each mechanism on it in order and records each in
/// the update's provenance.
///
/// When the server seals some tensors (see [`SealedTensors`](crate::SealedTensors)), a client with
/// a [`Sealer`] opens them before training and seals their delta afterwards;
/// the mechanisms then see only the rest (the body).
pub struct ModelClient<M: Model>
where
    M::Data: Sized,
{
    id: ClientId,
    model: M,
    train: M::Data,
    test: Option<M::Data>,
    mechanisms: Vec<Box<dyn PrivacyMechanism>>,
    sealer: Option<Box<dyn Sealer>>,
    responder: Option<Box<dyn StepResponder>>,
    /// The last update sent, kept only when a responder needs it.
    sent: Option<ClientUpdate>,
    /// SCAFFOLD's client control variate, when the client takes part.
    variate: Option<ControlVariate>,
    /// What lossy upload encodings dropped so far.
    feedback: ErrorFeedback,
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
            sealer: None,
            responder: None,
            sent: None,
            variate: None,
            feedback: ErrorFeedback::new(),
        }
    }

    /// Takes part in SCAFFOLD with the control variate `variate` (in memory,
    /// or in a file a restarted client reads back): when a fit request
    /// carries the server's control variate, training is corrected by it
    /// and the update carries the variate's change.
    pub fn with_control_variate(mut self, variate: ControlVariate) -> Self {
        self.variate = Some(variate);
        self
    }

    /// Answers the extra steps of a multi-step round with `responder`; the
    /// client then keeps a copy of its last update for it.
    pub fn with_responder(mut self, responder: impl StepResponder + 'static) -> Self {
        self.responder = Some(Box::new(responder));
        self
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

    /// Opens and seals the tensors the server sends sealed (needs the secret key).
    pub fn with_sealer(mut self, sealer: impl Sealer + 'static) -> Self {
        self.sealer = Some(Box::new(sealer));
        self
    }

    /// The global model with its sealed tensors opened, if any.
    fn open_global(
        &self,
        parameters: &Arc<Parameters>,
        sealed: Option<&SealedTensors>,
    ) -> Result<Arc<Parameters>> {
        let Some(sealed) = sealed else {
            return Ok(parameters.clone());
        };
        let sealer = self.sealer.as_ref().ok_or_else(|| {
            Error::Sealing("the server sent sealed tensors but this client holds no key".into())
        })?;
        let values = sealer.open(sealed)?;
        let mut global = (**parameters).clone();
        let selection = sealed_selection(global.layout(), sealed)?;
        selection.scatter(parameters.layout(), &values, global.as_mut_slice())?;
        Ok(Arc::new(global))
    }

    /// The model (e.g. to inspect it after training).
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Takes the client apart, keeping what it carries from one round to
    /// the next besides its model: its privacy mechanisms (with their
    /// ledgers), its error-feedback residual and its SCAFFOLD variate. The
    /// model, the data, the key and the responder are dropped, and so is the
    /// copy of the last update a responder keeps (it serves the round that
    /// ends). [`ModelClient::with_state`] puts it back into a client built
    /// afresh; see [`crate::pool`].
    pub fn into_state(self) -> ClientState {
        ClientState {
            mechanisms: self.mechanisms,
            feedback: self.feedback,
            variate: self.variate,
        }
    }

    /// Gives a client what [`ModelClient::into_state`] kept of an earlier
    /// one of the same id, in place of its own mechanisms, residual and
    /// variate.
    pub fn with_state(mut self, state: ClientState) -> Self {
        self.mechanisms = state.mechanisms;
        self.feedback = state.feedback;
        self.variate = state.variate;
        self
    }
}

/// What a [`ModelClient`] carries from one round to the next besides its
/// model (see [`ModelClient::into_state`]).
pub struct ClientState {
    mechanisms: Vec<Box<dyn PrivacyMechanism>>,
    feedback: ErrorFeedback,
    variate: Option<ControlVariate>,
}

impl ClientState {
    /// Whether it holds nothing a fresh client lacks: no mechanism, no
    /// residual, no variate.
    pub fn is_empty(&self) -> bool {
        self.mechanisms.is_empty() && self.feedback.residual().is_none() && self.variate.is_none()
    }
}

impl std::fmt::Debug for ClientState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientState")
            .field(
                "mechanisms",
                &self.mechanisms.iter().map(|m| m.name()).collect::<Vec<_>>(),
            )
            .field("residual", &self.feedback.residual().map(|r| r.len()))
            .field("variate", &self.variate.is_some())
            .finish()
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
        let global = self.open_global(&ins.parameters, ins.sealed.as_deref())?;
        self.model.set_parameters(&global)?;
        // SCAFFOLD: train with c - c_i added to every gradient.
        let scaffold = match (&ins.extra, &self.variate) {
            (None, _) => None,
            (Some(_), _) if ins.sealed.is_some() => {
                return Err(Error::Unsupported(
                    "SCAFFOLD with sealed tensors: their control variates would travel in the clear"
                        .into(),
                ));
            }
            (Some(_), Some(_))
                if ins.config.optimizer != (crate::model::Optimizer::Sgd { momentum: 0.0 }) =>
            {
                return Err(Error::Unsupported(format!(
                    "SCAFFOLD's control variates assume plain local SGD, and the server asked for {:?}",
                    ins.config.optimizer
                )));
            }
            (Some(c), Some(variate)) => Some(variate.correction(c)?),
            (Some(_), None) => {
                return Err(Error::Unsupported(format!(
                    "the server sent a control variate (SCAFFOLD) and client `{}` keeps none (ModelClient::with_control_variate)",
                    self.id
                )));
            }
        };
        let out = match &scaffold {
            Some((_, correction)) => {
                self.model
                    .fit_corrected(&self.train, &ins.config, correction)?
            }
            None => self.model.fit(&self.train, &ins.config)?,
        };
        let mut delta = self.model.parameters().sub(&global)?;
        let mut sealed_delta = None;
        if let Some(sealed) = &ins.sealed {
            let selection = sealed_selection(global.layout(), sealed)?;
            let head = selection.gather(global.layout(), delta.as_slice())?;
            if let Some(i) = head.iter().position(|v| !v.is_finite()) {
                return Err(Error::Model(format!(
                    "local training produced {} in a sealed tensor (value #{i})",
                    head[i]
                )));
            }
            sealed_delta = Some((sealed.clone(), head));
            delta = selection.complement(global.layout())?.subset(&delta)?;
        }
        let mut provenance = out.privacy;
        for m in &mut self.mechanisms {
            let cost = m.privatize(&mut delta)?;
            provenance.push(Protection {
                kind: crate::update::ProtectionKind::of_cost(&cost),
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
        let extra = match (scaffold, self.variate.as_mut()) {
            // From the released delta: post-processing of what the server sees.
            (Some((ci, correction)), Some(variate)) => Some(variate.finish(
                &ci,
                &correction,
                &delta,
                out.steps,
                ins.config.learning_rate,
            )?),
            _ => None,
        };
        // The upload encoding: post-processing of the released delta; what
        // it drops is carried into the next update (error feedback), and a
        // lossless round sends what is left of earlier ones.
        let upload = ins.config.upload;
        self.feedback.start_round(ins.round);
        let mut compressed = None;
        if !upload.is_lossless() || self.feedback.residual().is_some() {
            let (c, sent) = self.feedback.compress(&upload, &delta)?;
            delta = sent;
            if !upload.is_lossless() {
                provenance.push(Protection {
                    kind: crate::update::ProtectionKind::Compression,
                    mechanism: format!("{upload}+error-feedback"),
                    cost: crate::privacy::PrivacyCost::None,
                    spent: None,
                });
                compressed = Some(c);
            }
        }
        let mut update = ClientUpdate::new(self.id.clone(), ins.round, out.num_examples, delta)
            .with_metrics(out.metrics);
        update.extra = extra;
        update.compressed = compressed;
        if let (Some((global, head)), Some(sealer)) = (sealed_delta, &self.sealer) {
            update.sealed = Some(sealer.seal(&global, &head)?);
            provenance.push(Protection {
                kind: crate::update::ProtectionKind::Encryption,
                mechanism: sealer.name(),
                cost: crate::privacy::PrivacyCost::None,
                spent: None,
            });
        }
        update.provenance = provenance;
        if self.responder.is_some() {
            self.sent = Some(update.clone());
        }
        Ok(update)
    }

    fn step(&mut self, ins: &StepIns) -> Result<StepReply> {
        let responder = self.responder.as_mut().ok_or_else(|| {
            Error::Unsupported(format!(
                "client `{}` has no step responder (step {} of round {})",
                self.id, ins.step, ins.round
            ))
        })?;
        let sent = self
            .sent
            .as_ref()
            .filter(|u| u.round == ins.round)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "client `{}` sent no update in round {}, so it cannot answer its step {}",
                    self.id, ins.round, ins.step
                ))
            })?;
        responder.respond(ins, sent)
    }

    fn evaluate(&mut self, ins: &EvaluateIns) -> Result<Evaluation> {
        let global = self.open_global(&ins.parameters, ins.sealed.as_deref())?;
        self.model.set_parameters(&global)?;
        let data = self.test.as_ref().unwrap_or(&self.train);
        self.model.evaluate(data)
    }
}

/// The tensors of `layout` that `sealed` covers; its layout must list them
/// in the same order with the same shapes.
pub(crate) fn sealed_selection(
    layout: &crate::params::Layout,
    sealed: &SealedTensors,
) -> Result<crate::params::Selection> {
    let names: Vec<&str> = sealed
        .layout()
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    let selection = layout.select(&names)?;
    selection.layout(layout)?.ensure_same(sealed.layout())?;
    Ok(selection)
}
