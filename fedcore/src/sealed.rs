use std::sync::Arc;

use crate::error::Result;
use crate::params::Layout;

/// The encrypted values of some tensors: their layout in the clear (names and
/// shapes are not secret) and the scheme's bytes, opaque to the core.
///
/// Sealed tensors are what the server combines without opening them.
/// Some tensors — by default the classifier head, `classifier.*` — can be
/// *sealed*: clients send them encrypted, the server sums them homomorphically
/// with the same per-client weights its aggregator gave the plain part, and
/// only key holders (the hospitals) can open the result. The core knows
/// nothing about the cryptography: it moves [`SealedTensors`] (a layout plus
/// opaque bytes) and calls two plug-ins, [`Sealer`] on the clients and
/// [`SealedAggregator`] on the server. `fedcore-he` implements both with CKKS.
///
/// A round with sealing:
/// 1. The server holds the body in the clear and the sealed tensors only as
///    [`SealedTensors`]; its plain copy of them stays zero. `FitIns` carries both.
/// 2. The client opens the sealed global, trains the whole model, and sends
///    the body delta as [`ClientUpdate::values`](crate::ClientUpdate) (privacy
///    mechanisms see only the body) and the sealed delta as
///    [`ClientUpdate::sealed`](crate::ClientUpdate).
/// 3. The server checks each sealed part ([`SealedAggregator::check`]),
///    aggregates the bodies with its aggregator, and sets
///    `global_sealed += lr * sum_i w_i * sealed_i` with the weights `w_i` that
///    the aggregator reported for each client (normalized to sum to 1), so the
///    sealed part inherits the aggregator's robustness.
#[derive(Debug, Clone, PartialEq)]
pub struct SealedTensors {
    layout: Arc<Layout>,
    bytes: Vec<u8>,
}

impl SealedTensors {
    /// Wraps a scheme's bytes for the tensors of `layout`.
    pub fn new(layout: Arc<Layout>, bytes: Vec<u8>) -> Self {
        Self { layout, bytes }
    }

    /// Which tensors, in which order.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// The encrypted bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of f32 values sealed (the layout's length).
    pub fn len(&self) -> usize {
        self.layout.len()
    }

    /// True when no value is sealed.
    pub fn is_empty(&self) -> bool {
        self.layout.is_empty()
    }
}

/// The client side: opens what the server sends, seals what goes back.
/// Implementations hold the secret key.
pub trait Sealer: Send {
    /// A short description for provenance, e.g. `ckks(n=8192)`.
    fn name(&self) -> String;

    /// Decrypts `sealed` into its values, in its layout's order.
    fn open(&self, sealed: &SealedTensors) -> Result<Vec<f32>>;

    /// Encrypts `values` for upload as an update of `global` (the sealed
    /// global values of this round): in its layout's order and encoded so
    /// that the server can add it to `global` (e.g. the same packing).
    fn seal(&self, global: &SealedTensors, values: &[f32]) -> Result<SealedTensors>;
}

/// The server side: combines sealed parts without a secret key.
pub trait SealedAggregator: Send {
    /// A short description for logs, e.g. `ckks-weighted-sum`.
    fn name(&self) -> String;

    /// Encrypts the initial global values (public-key encryption).
    fn seal_initial(&self, layout: &Arc<Layout>, values: &[f32]) -> Result<SealedTensors>;

    /// Checks that one client's sealed part is well formed for this key and
    /// can be added to `global` (parses, right parameters, level, length
    /// and encoding), before any part is added: one client's bad part must
    /// not fail the others' sum. The error's text becomes the rejection
    /// reason.
    fn check(&self, global: &SealedTensors, part: &SealedTensors) -> Result<()>;

    /// Checks sealed global values (e.g. read back from a checkpoint).
    fn check_global(&self, global: &SealedTensors) -> Result<()>;

    /// `global + sum_i weights[i] * parts[i]`, all in `global`'s layout.
    fn accumulate(
        &self,
        global: &SealedTensors,
        parts: &[&SealedTensors],
        weights: &[f64],
    ) -> Result<SealedTensors>;
}

impl<S: Sealer + ?Sized> Sealer for Box<S> {
    fn name(&self) -> String {
        (**self).name()
    }

    fn open(&self, sealed: &SealedTensors) -> Result<Vec<f32>> {
        (**self).open(sealed)
    }

    fn seal(&self, global: &SealedTensors, values: &[f32]) -> Result<SealedTensors> {
        (**self).seal(global, values)
    }
}

impl<S: SealedAggregator + ?Sized> SealedAggregator for Box<S> {
    fn name(&self) -> String {
        (**self).name()
    }

    fn seal_initial(&self, layout: &Arc<Layout>, values: &[f32]) -> Result<SealedTensors> {
        (**self).seal_initial(layout, values)
    }

    fn check(&self, global: &SealedTensors, part: &SealedTensors) -> Result<()> {
        (**self).check(global, part)
    }

    fn check_global(&self, global: &SealedTensors) -> Result<()> {
        (**self).check_global(global)
    }

    fn accumulate(
        &self,
        global: &SealedTensors,
        parts: &[&SealedTensors],
        weights: &[f64],
    ) -> Result<SealedTensors> {
        (**self).accumulate(global, parts, weights)
    }
}
