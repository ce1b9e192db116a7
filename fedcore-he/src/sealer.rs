//! `fedcore`'s sealing plug-ins over CKKS: [`CkksSealer`] for hospitals,
//! [`CkksSum`] for the server.

use std::sync::Arc;

use fedcore::{Layout, SealedAggregator, SealedTensors, Sealer};

use crate::context::{CkksContext, Public, Role, Secret};
use crate::error::HeError;
use crate::vector::{EncryptedVector, Form, SlotPacking, slot_packing_of};

/// The default tensors to seal: the classifier head.
pub const DEFAULT_PATTERNS: &[&str] = &["classifier.*"];

/// `n` values where `layout` names as many, or a mismatch.
pub(crate) fn check_len(layout: &Layout, n: usize) -> crate::Result<()> {
    if layout.len() != n {
        return Err(HeError::Mismatch(format!(
            "{n} values for a layout of {}",
            layout.len()
        )));
    }
    Ok(())
}

/// Loads and validates `sealed` as `form` under `ctx`, with the length its
/// layout names.
pub(crate) fn load_sealed<R: Role>(
    ctx: &CkksContext<R>,
    sealed: &SealedTensors,
    form: Form,
) -> fedcore::Result<EncryptedVector> {
    let v = ctx.load(sealed.bytes(), form)?;
    check_len(sealed.layout(), v.len())?;
    Ok(v)
}

/// Checks `values` against `layout` and seals them with `encrypt` (the
/// values in f64 in, the vector's bytes out): what every sealer's `seal`
/// and every sealed aggregator's `seal_initial` does.
pub(crate) fn seal_values(
    layout: &Arc<Layout>,
    values: &[f32],
    encrypt: impl FnOnce(&[f64]) -> crate::Result<Vec<u8>>,
) -> fedcore::Result<SealedTensors> {
    check_len(layout, values.len())?;
    let values: Vec<f64> = values.iter().map(|&x| f64::from(x)).collect();
    Ok(SealedTensors::new(layout.clone(), encrypt(&values)?))
}

/// The slot packing of the sealed global `global`, which an update of it
/// must share to be added to it.
pub(crate) fn packing_of_global(global: &SealedTensors) -> crate::Result<SlotPacking> {
    slot_packing_of(global.bytes())
}

/// Checks that `part` (loaded) is packed as `global` (sealed) is.
pub(crate) fn check_part_packing(
    global: &SealedTensors,
    part: &EncryptedVector,
) -> crate::Result<()> {
    let want = packing_of_global(global)?;
    if part.slot_packing() != want {
        return Err(HeError::Mismatch(format!(
            "packed {:?} (values per slot: {}), the global {:?} ({})",
            part.slot_packing(),
            part.slot_packing().values_per_slot(),
            want,
            want.values_per_slot()
        )));
    }
    Ok(())
}

/// Loads sealed global values (a [`Form::Sum`] vector of the layout's
/// length) and decrypts them with `ctx`: what every hospital-side sealer's
/// `open` does.
pub(crate) fn open_sum(
    ctx: &CkksContext<Secret>,
    sealed: &SealedTensors,
) -> fedcore::Result<Vec<f32>> {
    let v = load_sealed(ctx, sealed, Form::Sum)?;
    let values = ctx.decrypt(&v)?;
    Ok(values.into_iter().map(|x| x as f32).collect())
}

/// A hospital's [`Sealer`]: decrypts the global sealed tensors and encrypts
/// its delta compactly (seeded symmetric encryption at the lowest level the
/// server needs, each coefficient in its prime's bits), packed into slots
/// as the global is (see [`CkksSum::with_slot_packing`]).
#[derive(Debug, Clone)]
pub struct CkksSealer {
    ctx: CkksContext<Secret>,
}

impl CkksSealer {
    /// A sealer with a hospital's context.
    pub fn new(ctx: CkksContext<Secret>) -> Self {
        Self { ctx }
    }
}

impl Sealer for CkksSealer {
    fn name(&self) -> String {
        format!("ckks(n={})", self.ctx.params().degree())
    }

    fn open(&self, sealed: &SealedTensors) -> fedcore::Result<Vec<f32>> {
        open_sum(&self.ctx, sealed)
    }

    fn seal(&self, global: &SealedTensors, values: &[f32]) -> fedcore::Result<SealedTensors> {
        let ctx = self
            .ctx
            .clone()
            .with_slot_packing(packing_of_global(global)?);
        seal_values(global.layout(), values, |v| ctx.encrypt_compact(v))
    }
}

/// The server's [`SealedAggregator`]: the encrypted weighted sum, with only
/// the public key.
///
/// It seals the initial global two values per slot
/// ([`SlotPacking::Complex`]): half the bytes each way, and the hospitals'
/// [`CkksSealer`]s follow the global's packing. The encrypted median
/// computes inner products, which need one value per slot: pair it with
/// `CkksSum::new(ctx).with_slot_packing(SlotPacking::Real)`
/// ([`EncryptedMedian::sealed_sum`](crate::EncryptedMedian::sealed_sum)
/// makes it). A sealed global read back from a checkpoint keeps its
/// packing, and so do the updates of it.
///
/// The global it writes each round is rounded as `ctx` asks
/// ([`CkksContext::with_sum_rounding`]: about `2^-31` of noise per value
/// by default, 30 % fewer bytes; `None` writes it exactly).
#[derive(Debug, Clone)]
pub struct CkksSum {
    ctx: CkksContext<Public>,
}

impl CkksSum {
    /// A summer with the server's context, packing two values per slot
    /// whatever `ctx`'s own packing (set it with
    /// [`with_slot_packing`](Self::with_slot_packing)).
    pub fn new(ctx: CkksContext<Public>) -> Self {
        Self {
            ctx: ctx.with_slot_packing(SlotPacking::Complex),
        }
    }

    /// Seals the initial global with `packing` instead.
    pub fn with_slot_packing(mut self, packing: SlotPacking) -> Self {
        self.ctx = self.ctx.with_slot_packing(packing);
        self
    }
}

impl CkksSum {
    /// Loads and validates `sealed` as `form`, with the length its layout names.
    fn load(&self, sealed: &SealedTensors, form: Form) -> fedcore::Result<EncryptedVector> {
        load_sealed(&self.ctx, sealed, form)
    }
}

impl SealedAggregator for CkksSum {
    fn name(&self) -> String {
        format!("ckks-weighted-sum(n={})", self.ctx.params().degree())
    }

    fn seal_initial(&self, layout: &Arc<Layout>, values: &[f32]) -> fedcore::Result<SealedTensors> {
        seal_values(layout, values, |v| self.ctx.encrypt_public(v)?.to_bytes())
    }

    fn check(&self, global: &SealedTensors, part: &SealedTensors) -> fedcore::Result<()> {
        let p = self.load(part, Form::Fresh)?;
        Ok(check_part_packing(global, &p)?)
    }

    fn check_global(&self, global: &SealedTensors) -> fedcore::Result<()> {
        self.load(global, Form::Sum).map(drop)
    }

    fn accumulate(
        &self,
        global: &SealedTensors,
        parts: &[&SealedTensors],
        weights: &[f64],
    ) -> fedcore::Result<SealedTensors> {
        let g = self.load(global, Form::Sum)?;
        let loaded = parts
            .iter()
            .map(|p| self.load(p, Form::Fresh))
            .collect::<fedcore::Result<Vec<_>>>()?;
        let refs: Vec<_> = loaded.iter().collect();
        let next = self.ctx.accumulate(&g, &refs, weights)?;
        Ok(SealedTensors::new(
            global.layout().clone(),
            next.to_bytes()?,
        ))
    }
}
