//! `fedcore`'s sealing plug-ins over CKKS: [`CkksSealer`] for hospitals,
//! [`CkksSum`] for the server.

use std::sync::Arc;

use fedcore::{Layout, SealedAggregator, SealedTensors, Sealer};

use crate::context::{CkksContext, Public, Role, Secret};
use crate::error::HeError;
use crate::vector::{EncryptedVector, Form};

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
/// server needs, compressed).
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

    fn seal(&self, layout: &Arc<Layout>, values: &[f32]) -> fedcore::Result<SealedTensors> {
        seal_values(layout, values, |v| self.ctx.encrypt_compact(v))
    }
}

/// The server's [`SealedAggregator`]: the encrypted weighted sum, with only
/// the public key.
#[derive(Debug, Clone)]
pub struct CkksSum {
    ctx: CkksContext<Public>,
}

impl CkksSum {
    /// A summer with the server's context.
    pub fn new(ctx: CkksContext<Public>) -> Self {
        Self { ctx }
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

    fn check(&self, part: &SealedTensors) -> fedcore::Result<()> {
        self.load(part, Form::Fresh).map(drop)
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
