//! What a client sends back after local training.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::params::Parameters;
use crate::privacy::{PrivacyCost, Spent};
use crate::sealed::SealedTensors;

/// Named scalar metrics (`loss`, `accuracy`, `auroc_macro`, ...).
pub type Metrics = BTreeMap<String, f64>;

/// A participant's identity, e.g. `hospital-1`. With the network transport it is
/// the identity in the participant's certificate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClientId(String);

impl ClientId {
    /// A client id from any string.
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for ClientId {
    fn from(s: &str) -> Self {
        Self(s.to_owned())
    }
}

impl From<String> for ClientId {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// Whether an update holds the client's new weights or the change it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateKind {
    /// `local - global` (the default; what clipping and robust aggregation expect).
    #[default]
    Delta,
    /// The client's full local weights; the server turns them into a delta.
    Weights,
}

/// The kinds of [`Protection`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProtectionKind {
    /// Differential privacy: the mechanism reports a privacy cost.
    DifferentialPrivacy,
    /// The values travel encrypted ([`crate::sealed::Sealer`]).
    Encryption,
    /// The values travel in a lossy encoding ([`crate::Encoding`]); not a
    /// protection, but a transform the server should know of.
    Compression,
    /// Anything else (clipping alone, a custom transform; also records
    /// written before 0.2, which did not say).
    #[default]
    Other,
}

impl ProtectionKind {
    /// The kind a privacy mechanism that reported `cost` provides.
    pub fn of_cost(cost: &PrivacyCost) -> Self {
        match cost {
            PrivacyCost::None => ProtectionKind::Other,
            _ => ProtectionKind::DifferentialPrivacy,
        }
    }
}

/// One protection that ran on an update, recorded so that the server and the
/// dashboard can show which mechanisms were applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Protection {
    /// What kind of protection it is (what the server and the dashboard
    /// check, rather than the mechanism's name).
    #[serde(default)]
    pub kind: ProtectionKind,
    /// The mechanism, e.g. `clip(l2<=1.0)+gaussian(sigma=1.1)`.
    pub mechanism: String,
    /// The privacy cost it reported.
    pub cost: PrivacyCost,
    /// The (epsilon, delta) its owner had spent in total after this release,
    /// where the mechanism keeps an accountant.
    #[serde(default)]
    pub spent: Option<Spent>,
}

/// A client's answer to a fit request.
///
/// Construct with [`ClientUpdate::new`] and the `with_*` methods; fields are
/// public to read and to adjust (attack simulators and tests do).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ClientUpdate {
    /// Who sent it.
    pub client: ClientId,
    /// The round it answers.
    pub round: u64,
    /// Number of local training examples (the FedAvg weight).
    pub num_examples: u64,
    /// Delta or weights.
    pub kind: UpdateKind,
    /// The values, in the global model's layout; when the run seals some
    /// tensors, in the layout of the other tensors (the body).
    pub values: Parameters,
    /// The sealed tensors' delta, encrypted, when the run seals some tensors.
    pub sealed: Option<SealedTensors>,
    /// Training metrics reported by the client.
    pub metrics: Metrics,
    /// Protections applied to `values` before they left the client, in order.
    pub provenance: Vec<Protection>,
    /// Tensors a strategy asked for with [`FitIns::extra`](crate::FitIns::extra)
    /// (SCAFFOLD's control variate change), in that request's layout.
    pub extra: Option<Parameters>,
    /// `values` in the upload encoding the server asked for
    /// ([`TrainConfig::upload`](crate::TrainConfig::upload)), when it is a
    /// lossy one: what the network transport sends instead of the float32
    /// values (which are its decoding). Code that changes `values` in place
    /// must clear it ([`Self::with_values`] does).
    pub compressed: Option<crate::Compressed>,
}

impl ClientUpdate {
    /// A delta update with no metrics and no provenance.
    pub fn new(client: ClientId, round: u64, num_examples: u64, values: Parameters) -> Self {
        Self {
            client,
            round,
            num_examples,
            kind: UpdateKind::Delta,
            values,
            sealed: None,
            metrics: Metrics::new(),
            provenance: Vec::new(),
            extra: None,
            compressed: None,
        }
    }

    /// The same update (client, round, counts, metrics, provenance, extra
    /// tensors) with other values; copies everything but the values (and
    /// their encoding, which no longer holds).
    pub fn with_values(&self, values: Parameters) -> Self {
        Self {
            client: self.client.clone(),
            round: self.round,
            num_examples: self.num_examples,
            kind: self.kind,
            values,
            sealed: self.sealed.clone(),
            metrics: self.metrics.clone(),
            provenance: self.provenance.clone(),
            extra: self.extra.clone(),
            compressed: None,
        }
    }

    /// Sets the kind.
    pub fn with_kind(mut self, kind: UpdateKind) -> Self {
        self.kind = kind;
        self
    }

    /// Attaches the sealed part.
    pub fn with_sealed(mut self, sealed: SealedTensors) -> Self {
        self.sealed = Some(sealed);
        self
    }

    /// Sets the metrics.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Attaches the tensors a strategy asked for.
    pub fn with_extra(mut self, extra: Parameters) -> Self {
        self.extra = Some(extra);
        self
    }

    /// The bytes its values, extra tensors and sealed tensors take on the
    /// network transport (in their encoding).
    pub fn upload_bytes(&self) -> u64 {
        let values = match &self.compressed {
            Some(c) => c.bytes().len() as u64,
            None => self.values.len() as u64 * 4,
        };
        values
            + self.extra.as_ref().map_or(0, |e| e.len() as u64 * 4)
            + self.sealed.as_ref().map_or(0, |s| s.bytes().len() as u64)
    }

    /// Appends a protection record.
    pub fn with_protection(mut self, protection: Protection) -> Self {
        self.provenance.push(protection);
        self
    }
}
