//! Encrypted vectors: packing into ciphertexts, arithmetic, bytes.

use std::sync::Arc;

use rayon::prelude::*;

use crate::context::{CkksContext, Role, Secret};
use crate::error::{HeError, Result};
use crate::reader::Reader;
use crate::{raw, seal};

/// The most values one encrypted vector may hold (2^28, about 1 GB of f32),
/// so that a length field cannot ask for unbounded work.
pub const MAX_VALUES: usize = 1 << 28;

/// The largest weight magnitude in a weighted sum (2^20).
pub const MAX_WEIGHT: f64 = 1_048_576.0;

/// What scale an encrypted vector's ciphertexts carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// Freshly encrypted values at scale `2^scale_bits`: a client's upload.
    Fresh,
    /// A weighted sum (or an encryption made to be added to one) at scale
    /// `2^(scale_bits + weight_bits)`: what the server keeps and sends down.
    Sum,
}

impl Form {
    fn tag(self) -> u8 {
        match self {
            Form::Fresh => 1,
            Form::Sum => 2,
        }
    }

    fn from_tag(t: u8) -> Option<Self> {
        match t {
            1 => Some(Form::Fresh),
            2 => Some(Form::Sum),
            _ => None,
        }
    }
}

/// How many values a CKKS slot holds. A slot is a complex number; a real
/// vector uses only its real part unless packed two to a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlotPacking {
    /// One value per slot (value `i` in slot `i % slots` of ciphertext
    /// `i / slots`): what inner products under encryption
    /// ([`CkksContext::inner_products`], the encrypted median) need.
    #[default]
    Real,
    /// Two values per slot, as its real and imaginary parts (values `2k`
    /// and `2k + 1` of a ciphertext's `2 * slots` in slot `k`): half the
    /// ciphertexts, bytes and encryption time for the same values, with the
    /// same precision. Sums, weighted sums and key switching are linear and
    /// work on it unchanged; a product of two such vectors mixes the parts,
    /// so inner products refuse it.
    Complex,
}

impl SlotPacking {
    /// Values per slot: 1 or 2.
    pub fn values_per_slot(self) -> usize {
        match self {
            SlotPacking::Real => 1,
            SlotPacking::Complex => 2,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            SlotPacking::Real => "one per slot",
            SlotPacking::Complex => "two per slot",
        }
    }
}

/// A vector of any length packed into CKKS ciphertexts of `slots` (or
/// `2 * slots`, see [`SlotPacking`]) values each. The length, the packing
/// and the key id travel with it.
pub struct EncryptedVector {
    pub(crate) len: usize,
    pub(crate) form: Form,
    pub(crate) key_id: [u8; 16],
    pub(crate) cts: Vec<seal::Ciphertext>,
    pub(crate) packing: Packing,
    pub(crate) slot_packing: SlotPacking,
}

/// The level and scale a vector's ciphertexts are at, as the packed form
/// ([`raw::pack_ciphertext`]) needs them (it writes neither), and what
/// writing a sum rounded needs: an engine of the context and the precision.
#[derive(Clone)]
pub(crate) struct Packing {
    /// A keyless engine of the vector's SEAL context.
    engine: Arc<seal::Engine>,
    degree: usize,
    parms_id: seal::ParmsId,
    /// The level's primes.
    primes: Vec<u64>,
    scale: f64,
    /// How precisely sums are rounded when written ([`sum_rounding`]).
    sum_rounding: Option<u32>,
}

impl std::fmt::Debug for EncryptedVector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedVector")
            .field("len", &self.len)
            .field("form", &self.form)
            .field("slot_packing", &self.slot_packing)
            .field("ciphertexts", &self.cts.len())
            .finish()
    }
}

impl EncryptedVector {
    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of ciphertexts.
    pub fn ciphertexts(&self) -> usize {
        self.cts.len()
    }

    /// Fresh upload or weighted sum.
    pub fn form(&self) -> Form {
        self.form
    }

    /// How its values are packed into slots.
    pub fn slot_packing(&self) -> SlotPacking {
        self.slot_packing
    }
}

pub(crate) fn scale_of(params: &crate::CkksParams, form: Form) -> f64 {
    let bits = match form {
        Form::Fresh => params.scale_bits(),
        Form::Sum => params.scale_bits() + params.weight_bits(),
    };
    2f64.powi(bits as i32)
}

fn check_values(values: &[f64], bound: f64) -> Result<()> {
    if values.len() > MAX_VALUES {
        return Err(HeError::OutOfRange(format!(
            "{} values; at most {MAX_VALUES} per vector",
            values.len()
        )));
    }
    if let Some(i) = values
        .iter()
        .position(|v| !v.is_finite() || v.abs() >= bound)
    {
        return Err(HeError::OutOfRange(format!(
            "value #{i} = {} (must be finite and below {bound:e} in magnitude)",
            values[i]
        )));
    }
    Ok(())
}

impl<R: Role> CkksContext<R> {
    pub(crate) fn engine(&self) -> &seal::Engine {
        &self.inner.engine
    }

    /// The packing of ciphertexts at the upload level with `scale`.
    pub(crate) fn packing(&self, scale: f64) -> Packing {
        let ctx = self.engine().context();
        let level = &ctx.levels[self.inner.level];
        Packing {
            engine: self.inner.keyless.clone(),
            degree: self.params().degree(),
            parms_id: level.parms_id,
            primes: ctx.primes[..level.primes].to_vec(),
            scale,
            sum_rounding: self.sum_rounding,
        }
    }

    /// The packing of a vector in `form`.
    pub(crate) fn packing_of(&self, form: Form) -> Packing {
        self.packing(scale_of(self.params(), form))
    }

    /// Encodes and encrypts at the upload level with `encrypt`, chunk by chunk
    /// in parallel.
    fn pack(
        &self,
        values: &[f64],
        form: Form,
        encrypt: impl Fn(&seal::Plaintext) -> std::result::Result<seal::Ciphertext, seal::SealFailure>
        + Sync,
    ) -> Result<EncryptedVector> {
        check_values(values, self.sum_bound())?;
        let scale = scale_of(self.params(), form);
        let level = self.inner.level;
        let slots = self.slot_packing;
        let cts = values
            .par_chunks(self.values_per_ciphertext(slots))
            .map(|chunk| {
                let p = match slots {
                    SlotPacking::Real => self.engine().encode(chunk, level, scale)?,
                    SlotPacking::Complex => self.engine().encode_complex(chunk, level, scale)?,
                };
                encrypt(&p)
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(EncryptedVector {
            len: values.len(),
            form,
            key_id: self.key_id(),
            cts,
            packing: self.packing_of(form),
            slot_packing: slots,
        })
    }

    /// Values per ciphertext with `packing`.
    pub fn values_per_ciphertext(&self, packing: SlotPacking) -> usize {
        self.slots().max(1) * packing.values_per_slot()
    }

    /// Public-key encryption in the [`Form::Sum`] form, so that the result
    /// can be added to weighted sums: how the server seals the initial
    /// global values. Anyone with the public key can do this.
    pub fn encrypt_public(&self, values: &[f64]) -> Result<EncryptedVector> {
        self.pack(values, Form::Sum, |p| self.engine().encrypt_public(p))
    }

    /// Public-key encryption in the [`Form::Fresh`] form: an upload by a
    /// party that does not hold the secret key, as every hospital under a
    /// collective key ([`crate::multiparty`]). Twice the bytes of
    /// [`CkksContext::encrypt_compact`] (no seed stands in for the second
    /// polynomial).
    pub fn encrypt_upload(&self, values: &[f64]) -> Result<EncryptedVector> {
        self.pack(values, Form::Fresh, |p| self.engine().encrypt_public(p))
    }

    pub(crate) fn check_same(&self, v: &EncryptedVector, form: Form, len: usize) -> Result<()> {
        if v.key_id != self.key_id() {
            return Err(HeError::Mismatch("encrypted under another key".into()));
        }
        if v.form != form {
            return Err(HeError::Mismatch(format!(
                "a {:?} vector where a {form:?} one is needed",
                v.form
            )));
        }
        if v.len != len {
            return Err(HeError::Mismatch(format!(
                "{} values where {len} are needed",
                v.len
            )));
        }
        Ok(())
    }

    /// `v` packed as `slots`, or a mismatch naming both.
    pub(crate) fn check_slots(v: &EncryptedVector, slots: SlotPacking) -> Result<()> {
        if v.slot_packing != slots {
            return Err(HeError::Mismatch(format!(
                "values packed {} where {} are needed",
                v.slot_packing.describe(),
                slots.describe()
            )));
        }
        Ok(())
    }

    /// `sum_i weights[i] * parts[i]` over fresh uploads, with plaintext
    /// weights (example counts or trust weights, normalized by the caller if
    /// a mean is wanted). Weights are encoded at scale `2^weight_bits`; no
    /// rescale is spent, the result is in the [`Form::Sum`] form. Weights
    /// that round to zero at that scale are skipped.
    ///
    /// The result's error for values in `[-1, 1]`: at most
    /// `sum_i |v_i| * 2^-(weight_bits+1)` from weight rounding plus the
    /// encryption noise (about 1e-9 per fresh ciphertext at the default
    /// parameters); for larger values the first term grows with them, the
    /// second does not. The sum must stay below [`CkksContext::sum_bound`].
    pub fn weighted_sum(
        &self,
        parts: &[&EncryptedVector],
        weights: &[f64],
    ) -> Result<EncryptedVector> {
        let first = parts
            .first()
            .ok_or_else(|| HeError::OutOfRange("a weighted sum of nothing".into()))?;
        if parts.len() != weights.len() {
            return Err(HeError::OutOfRange(format!(
                "{} parts but {} weights",
                parts.len(),
                weights.len()
            )));
        }
        for p in parts {
            self.check_same(p, Form::Fresh, first.len)?;
            Self::check_slots(p, first.slot_packing)?;
        }
        let wscale = 2f64.powi(self.params().weight_bits() as i32);
        if let Some(w) = weights
            .iter()
            .find(|w| !w.is_finite() || w.abs() >= MAX_WEIGHT)
        {
            return Err(HeError::OutOfRange(format!(
                "weight {w} (must be finite and below {MAX_WEIGHT:e} in magnitude)"
            )));
        }
        let level = self.inner.level;
        // One scalar plaintext per weight that survives rounding.
        let encoded: Vec<(usize, seal::Plaintext)> = weights
            .iter()
            .enumerate()
            .filter(|(_, w)| (**w * wscale).round() != 0.0)
            .map(|(i, &w)| Ok((i, self.engine().encode_scalar(w, level, wscale)?)))
            .collect::<Result<_>>()?;
        if encoded.is_empty() {
            return Err(HeError::OutOfRange(format!(
                "every weight rounds to zero at scale 2^{}",
                self.params().weight_bits()
            )));
        }
        let cts = (0..first.cts.len())
            .into_par_iter()
            .map(|j| {
                let mut acc: Option<seal::Ciphertext> = None;
                for (i, w) in &encoded {
                    let prod = self.engine().multiply_plain(&parts[*i].cts[j], w)?;
                    match acc.as_mut() {
                        None => acc = Some(prod),
                        Some(a) => self.engine().add_inplace(a, &prod)?,
                    }
                }
                Ok(acc.expect("at least one weight"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(EncryptedVector {
            len: first.len,
            form: Form::Sum,
            key_id: self.key_id(),
            cts,
            packing: self.packing_of(Form::Sum),
            slot_packing: first.slot_packing,
        })
    }

    /// `a + b` for two vectors of the same form and length.
    pub fn add(&self, a: &EncryptedVector, b: &EncryptedVector) -> Result<EncryptedVector> {
        self.check_same(a, a.form, a.len)?;
        self.check_same(b, a.form, a.len)?;
        Self::check_slots(b, a.slot_packing)?;
        let cts = a
            .cts
            .par_iter()
            .zip(&b.cts)
            .map(|(x, y)| {
                let mut out = self.engine().copy(x)?;
                self.engine().add_inplace(&mut out, y)?;
                Ok(out)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(EncryptedVector {
            len: a.len,
            form: a.form,
            key_id: a.key_id,
            cts,
            packing: a.packing.clone(),
            slot_packing: a.slot_packing,
        })
    }

    /// `global + sum_i weights[i] * parts[i]`: one federated step on
    /// encrypted values (`global` in the [`Form::Sum`] form, `parts` fresh).
    pub fn accumulate(
        &self,
        global: &EncryptedVector,
        parts: &[&EncryptedVector],
        weights: &[f64],
    ) -> Result<EncryptedVector> {
        self.check_same(global, Form::Sum, global.len)?;
        if let Some(p) = parts.first() {
            Self::check_slots(p, global.slot_packing)?;
        }
        let mut sum = self.weighted_sum(parts, weights)?;
        if sum.len != global.len {
            return Err(HeError::Mismatch(format!(
                "parts hold {} values, the global {}",
                sum.len, global.len
            )));
        }
        sum.cts
            .par_iter_mut()
            .zip(&global.cts)
            .try_for_each(|(s, g)| self.engine().add_inplace(s, g))?;
        Ok(sum)
    }

    /// Loads an encrypted vector saved by [`EncryptedVector::to_bytes`] or
    /// [`CkksContext::encrypt_compact`], expecting `form`.
    ///
    /// Everything is checked before SEAL sees it and again by SEAL: the
    /// header, the key id, the length against the ciphertext count, each
    /// ciphertext's exact packed length, every coefficient below its prime
    /// and the seed's PRNG type, then SEAL's own validation against the
    /// context of the bytes rebuilt here (SEAL never reads a size from the
    /// input), then the level, size and scale this crate's arithmetic needs.
    /// Format version 1 (deflated SEAL bytes) is inflated with a bound (a
    /// compression bomb is refused) and parsed in full before the same
    /// path. Any failure is a [`HeError::Malformed`] or
    /// [`HeError::Mismatch`].
    pub fn load(&self, bytes: &[u8], form: Form) -> Result<EncryptedVector> {
        let malformed = |m: String| HeError::Malformed(m);
        let mut r = Reader::new(bytes);
        let head = r
            .take(VECTOR_MAGIC.len())
            .map_err(|_| malformed("shorter than the header".into()))?;
        if head != VECTOR_MAGIC {
            return Err(malformed("not a fedcore-he encrypted vector".into()));
        }
        let version = r.u8().map_err(|_| malformed("truncated header".into()))?;
        if version != VERSION && version != DEFLATE_VERSION {
            return Err(malformed(format!("format version {version}")));
        }
        let got_form = Form::from_tag(r.u8().map_err(|_| malformed("truncated header".into()))?)
            .ok_or_else(|| malformed("unknown form".into()))?;
        let flags = r.u8().map_err(|_| malformed("truncated header".into()))?;
        let Flags {
            seeded,
            slots,
            rounded,
        } = parse_flags(version, flags)?;
        let encoding = if rounded {
            Encoding::Rounded
        } else {
            encoding(version, seeded)
        };
        let key: [u8; 16] = r
            .take(16)
            .map_err(|_| malformed("truncated header".into()))?
            .try_into()
            .expect("16 bytes");
        let len = r.u64().map_err(|_| malformed("truncated header".into()))?;
        let count = r.u32().map_err(|_| malformed("truncated header".into()))? as usize;
        if key != self.key_id() {
            return Err(HeError::Mismatch(
                "encrypted under another key (key id differs)".into(),
            ));
        }
        if got_form != form {
            return Err(HeError::Mismatch(format!(
                "a {got_form:?} vector where a {form:?} one is expected"
            )));
        }
        if rounded && form != Form::Sum {
            return Err(malformed(format!("a rounded {form:?} vector")));
        }
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= MAX_VALUES)
            .ok_or_else(|| malformed(format!("length {len} exceeds {MAX_VALUES}")))?;
        let per = self.values_per_ciphertext(slots);
        if count != len.div_ceil(per) {
            return Err(malformed(format!(
                "{count} ciphertexts for {len} values at {per} each"
            )));
        }
        let mut blobs = Vec::with_capacity(count);
        for i in 0..count {
            let n = r
                .u32()
                .map_err(|_| malformed(format!("truncated before ciphertext {i}")))?
                as usize;
            let blob = r
                .take(n)
                .map_err(|_| malformed(format!("ciphertext {i} is truncated")))?;
            blobs.push(blob);
        }
        if !r.is_empty() {
            return Err(malformed("trailing bytes".into()));
        }
        let packing = self.packing_of(form);
        let cts = load_all(self, &blobs, &packing, encoding, "ciphertext", "")?;
        Ok(EncryptedVector {
            len,
            form,
            key_id: key,
            cts,
            packing,
            slot_packing: slots,
        })
    }
}

impl CkksContext<Secret> {
    /// Encrypts with the secret key (symmetric), in the [`Form::Fresh`] form,
    /// for arithmetic in memory. For upload use
    /// [`CkksContext::encrypt_compact`].
    pub fn encrypt(&self, values: &[f64]) -> Result<EncryptedVector> {
        self.pack(values, Form::Fresh, |p| {
            self.engine().encrypt_symmetric(p, false)
        })
    }

    /// Encrypts for upload, as small as SEAL allows: symmetric encryption
    /// with the second polynomial replaced by its 64-byte PRNG seed (about
    /// half the bytes; SEAL regenerates it when the server loads), at the
    /// lowest level the server's weighted sum needs, each coefficient in its
    /// prime's bit width (25 bytes per value at the default parameters: two
    /// coefficients of 60 + 40 bits per slot; 12.5 with
    /// [`SlotPacking::Complex`], two values per slot).
    pub fn encrypt_compact(&self, values: &[f64]) -> Result<Vec<u8>> {
        self.encrypt_seeded(values)?.write(true)
    }

    /// The seeded ciphertexts [`CkksContext::encrypt_compact`] writes.
    fn encrypt_seeded(&self, values: &[f64]) -> Result<EncryptedVector> {
        self.pack(values, Form::Fresh, |p| {
            self.engine().encrypt_symmetric(p, true)
        })
    }

    /// Decrypts and decodes into the vector's values.
    pub fn decrypt(&self, v: &EncryptedVector) -> Result<Vec<f64>> {
        if v.key_id != self.key_id() {
            return Err(HeError::Mismatch("encrypted under another key".into()));
        }
        let per = self.values_per_ciphertext(v.slot_packing);
        let chunks = v
            .cts
            .par_iter()
            .map(|ct| {
                let p = self.engine().decrypt(ct)?;
                Ok(match v.slot_packing {
                    SlotPacking::Real => self.engine().decode(&p)?,
                    SlotPacking::Complex => self.engine().decode_complex(&p)?,
                })
            })
            .collect::<Result<Vec<Vec<f64>>>>()?;
        let mut out = Vec::with_capacity(v.len);
        for (i, c) in chunks.into_iter().enumerate() {
            let n = per.min(v.len - i * per);
            out.extend_from_slice(&c[..n]);
        }
        Ok(out)
    }
}

const VECTOR_MAGIC: &[u8; 4] = b"FCKK";
/// The envelope's header: magic, version, form, flags, key id,
/// length (u64), ciphertext count (u32).
pub const ENVELOPE_HEADER: usize = 4 + 3 + 16 + 8 + 4;
/// The packed format ([`raw::pack_ciphertext`]).
const VERSION: u8 = 2;
/// Format version 1, before 0.2 (each ciphertext as SEAL writes it,
/// deflated), still read so that saved vectors (a server's checkpoint)
/// load; its SEAL bytes are parsed and rewritten before SEAL sees them.
pub(crate) const DEFLATE_VERSION: u8 = 1;

/// How an envelope's ciphertexts are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// SEAL's uncompressed bytes, deflated (format version 1).
    Deflate,
    /// [`raw::pack_ciphertext`]; `seeded` when the second polynomial is a
    /// seed record (an upload from [`CkksContext::encrypt_compact`]).
    Packed { seeded: bool },
    /// A [`Form::Sum`] vector's low bits rounded away ([`raw::Rounding`]):
    /// each ciphertext's bits dropped from its two polynomials (one byte
    /// each), then its fields.
    Rounded,
}

/// The envelope's flags byte: bit 0 seeded, bit 1 two values per slot,
/// bit 2 rounded ([`Encoding::Rounded`]).
fn flags(seeded: bool, slots: SlotPacking, rounded: bool) -> u8 {
    u8::from(seeded) | (u8::from(slots == SlotPacking::Complex) << 1) | (u8::from(rounded) << 2)
}

/// What an envelope's flags byte says.
#[derive(Debug, Clone, Copy)]
struct Flags {
    seeded: bool,
    slots: SlotPacking,
    rounded: bool,
}

/// An envelope's flags byte read; format 1 knows only the seeded flag, and
/// a rounded vector is not seeded.
fn parse_flags(version: u8, flags: u8) -> Result<Flags> {
    let known = if version == DEFLATE_VERSION { 1 } else { 7 };
    if flags & !known != 0 || flags & 5 == 5 {
        return Err(HeError::Malformed(format!(
            "flags {flags:#04x} in format version {version}"
        )));
    }
    let slots = if flags & 2 == 0 {
        SlotPacking::Real
    } else {
        SlotPacking::Complex
    };
    Ok(Flags {
        seeded: flags & 1 == 1,
        slots,
        rounded: flags & 4 == 4,
    })
}

/// How far below the values' unit the noise of rounding a [`Form::Sum`]
/// vector lies by default ([`CkksContext::with_sum_rounding`]): about
/// `2^-31` in standard deviation per value (3.2e-10 measured at the default
/// parameters, beside 1.7e-10 of a fresh upload's encryption noise; its
/// tail is heavier than a Gaussian's, 2.6e-9 at most over 14,350 values).
/// The hospitals read the global as `f32`, whose own rounding is larger
/// than the typical error for every value above `2^-7` in magnitude.
pub const SUM_ROUNDING_PRECISION_BITS: u32 = 31;

/// The coarsest rounding of a sum: `2^-20` (1e-6) of noise per value; a
/// context asking for less precision gets this.
pub const SUM_ROUNDING_MIN_BITS: u32 = 20;

/// Extra bits rounded from a ciphertext's first polynomial: its error
/// reaches the message directly, the second's through the secret key
/// (at equal drops `sqrt(2N / 3)` times larger, 74 at `N = 8192`); 4 more
/// bits leave the first's share of the noise at about 5 % of the variance.
const SUM_ROUNDING_FIRST_EXTRA: u32 = 4;

/// The rounding of [`Form::Sum`] vectors packed as `p`: the most bits
/// whose rounding noise stays about `p.sum_rounding` bits (by default
/// [`SUM_ROUNDING_PRECISION_BITS`]) below the values' unit, or `None`
/// where no rounding is asked for, the level's modulus has more than 190
/// bits, or the scale leaves no bit to drop.
///
/// The noise: rounding `c1` adds a uniform error of variance `4^d / 12`
/// per coefficient, times a ternary secret key (variance 2/3) in
/// `c1 * s`: variance `N 4^d / 18` per coefficient, `N` times that in a
/// slot after decoding, halved in each of its parts. A collective key
/// (a sum of `n` ternary keys) makes it `sqrt(n)` times larger.
pub(crate) fn sum_rounding(p: &Packing) -> Option<raw::Rounding> {
    let bits = p.sum_rounding?.max(SUM_ROUNDING_MIN_BITS);
    let n = p.degree as f64;
    let spread = 0.5 * (n * n / 36.0).log2();
    let d = (p.scale.log2() - f64::from(bits) - spread).floor();
    if d < 1.0 {
        return None;
    }
    let d = d as u32;
    raw::Rounding::new(&p.primes, [d + SUM_ROUNDING_FIRST_EXTRA, d])
}

/// The slot packing an encrypted vector's bytes declare, from the header
/// alone (nothing else is checked: [`CkksContext::load`] does that).
pub fn slot_packing_of(bytes: &[u8]) -> Result<SlotPacking> {
    let header = bytes
        .get(..VECTOR_MAGIC.len() + 3)
        .ok_or_else(|| HeError::Malformed("shorter than the header".into()))?;
    if &header[..4] != VECTOR_MAGIC {
        return Err(HeError::Malformed(
            "not a fedcore-he encrypted vector".into(),
        ));
    }
    let version = header[4];
    if version != VERSION && version != DEFLATE_VERSION {
        return Err(HeError::Malformed(format!("format version {version}")));
    }
    Ok(parse_flags(version, header[6])?.slots)
}

pub(crate) fn encoding(version: u8, seeded: bool) -> Encoding {
    if version == DEFLATE_VERSION {
        Encoding::Deflate
    } else {
        Encoding::Packed { seeded }
    }
}
/// Raw deflate (RFC 1951) through `flate2`'s pure-Rust backend (miniz_oxide:
/// no C symbols to collide with SEAL's bundled zlib).
///
/// Why not zstd: SEAL bundles its own zstd, and a second copy from
/// `zstd-sys` (ours, or the one `tch`'s `zip` pulls in) collides with it at
/// link time; SEAL's built-in compression inflates without a size limit. Why
/// compress at all: the coefficients are uniform below 60- and 40-bit primes
/// stored in 64-bit words, so entropy coding saves the unused high bits.
pub fn deflate(raw: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut e = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(raw.len()),
        flate2::Compression::fast(),
    );
    e.write_all(raw)?;
    e.finish()
}

/// Inflates at most `max` bytes; more is an error (a compression bomb
/// cannot make this allocate beyond `max`).
pub fn inflate(compressed: &[u8], max: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(compressed)
        .take(max as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > max {
        return Err(std::io::Error::other(format!(
            "inflates beyond {max} bytes"
        )));
    }
    Ok(out)
}

impl EncryptedVector {
    /// Bytes for the wire or a file: a small header (format, form, key id,
    /// length, count) and each ciphertext with every coefficient in its
    /// prime's bit width ([`raw::pack_ciphertext`]).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.write(false)
    }

    /// The packed form; a sum (not seeded) rounded where its level allows.
    fn write(&self, seeded: bool) -> Result<Vec<u8>> {
        self.write_as(seeded, true)
    }

    fn write_as(&self, seeded: bool, round: bool) -> Result<Vec<u8>> {
        let rounding = match self.form {
            Form::Sum if round && !seeded => sum_rounding(&self.packing),
            _ => None,
        };
        let blobs = match &rounding {
            Some(r) => round_all(&self.cts, &self.packing, r)?,
            None => pack_all(&self.cts, &self.packing, seeded)?,
        };
        Ok(envelope(
            VERSION,
            self.form,
            flags(seeded, self.slot_packing, rounding.is_some()),
            &self.key_id,
            self.len,
            &blobs,
        ))
    }
}

/// Each ciphertext in the rounded form ([`raw::Rounding`]), in parallel:
/// taken to coefficient form by SEAL (an evaluator of the packing's
/// context), read back, composed and rounded.
fn round_all(
    cts: &[seal::Ciphertext],
    packing: &Packing,
    rounding: &raw::Rounding,
) -> Result<Vec<Vec<u8>>> {
    let engine = &packing.engine;
    cts.par_iter()
        .map(|ct| {
            let p = packing;
            let coeffs = engine.to_coefficients(ct)?.to_bytes()?;
            let raw = raw::RawCiphertext::parse(&coeffs, p.degree, p.primes.len())
                .map_err(|e| HeError::Seal(format!("rounding: {e}")))?;
            if raw.parms_id != p.parms_id || raw.scale != p.scale || raw.ntt {
                return Err(HeError::Seal(
                    "rounding: a ciphertext at another level or scale than its vector's".into(),
                ));
            }
            rounding
                .round(&raw)
                .map_err(|e| HeError::Seal(format!("rounding: {e}")))
        })
        .collect()
}

/// Each ciphertext packed ([`raw::pack_ciphertext`]), in parallel; each
/// must be `seeded` or not, as the envelope will say.
pub(crate) fn pack_all(
    cts: &[seal::Ciphertext],
    packing: &Packing,
    seeded: bool,
) -> Result<Vec<Vec<u8>>> {
    cts.par_iter()
        .map(|ct| {
            let p = packing;
            let (bytes, is_seeded) =
                raw::pack_ciphertext(&ct.to_bytes()?, p.degree, &p.primes, &p.parms_id, p.scale)
                    .map_err(|e| HeError::Seal(format!("packing: {e}")))?;
            if is_seeded != seeded {
                return Err(HeError::Seal(format!(
                    "packing: a ciphertext that is {}seeded where the envelope says {}",
                    if is_seeded { "" } else { "not " },
                    if seeded { "seeded" } else { "not seeded" }
                )));
            }
            Ok(bytes)
        })
        .collect()
}

/// Loads ciphertexts at `ctx`'s upload level written with `encoding`, in
/// parallel: exact unpacking with every coefficient checked against its
/// prime (or, for the old format, bounded decompression: two polynomials
/// over the level's primes, the most a valid one inflates to), SEAL's
/// validation against the context, then the level, size 2, NTT form and
/// scale of `packing` this crate's arithmetic needs. Errors name the `what`
/// by index, after `prefix`.
pub(crate) fn load_all<R: Role>(
    ctx: &CkksContext<R>,
    blobs: &[&[u8]],
    packing: &Packing,
    encoding: Encoding,
    what: &str,
    prefix: &str,
) -> Result<Vec<seal::Ciphertext>> {
    let malformed = |m: String| HeError::Malformed(format!("{prefix}{m}"));
    let seal_ctx = ctx.engine().context();
    let level = &seal_ctx.levels[ctx.inner.level];
    let max_raw = 2 * ctx.params().degree() * level.primes * 8 + 1024;
    let scale = packing.scale;
    blobs
        .par_iter()
        .enumerate()
        .map(|(i, blob)| {
            let p = packing;
            let raw = match encoding {
                // The old format's SEAL bytes are parsed here in full and
                // rewritten, so that SEAL sees only headers this crate wrote
                // (a header of SEAL's format can ask for any allocation).
                Encoding::Deflate => {
                    let raw = inflate(blob, max_raw)
                        .map_err(|e| malformed(format!("{what} {i}: decompression: {e}")))?;
                    raw::rewrite_ciphertext(&raw, p.degree, &p.primes, &p.parms_id, scale)
                        .map_err(|e| malformed(format!("{what} {i}: {e}")))?
                }
                Encoding::Packed { seeded } => {
                    raw::unpack_ciphertext(blob, seeded, p.degree, &p.primes, &p.parms_id, scale)
                        .map_err(|e| malformed(format!("{what} {i}: {e}")))?
                }
                // Coefficient form, which SEAL validates and takes to the
                // NTT form below.
                Encoding::Rounded => {
                    raw::Rounding::read(&p.primes, blob, p.degree, &p.parms_id, scale)
                        .map_err(|e| malformed(format!("{what} {i}: {e}")))?
                        .to_bytes()
                }
            };
            let ct = seal::Ciphertext::from_bytes(seal_ctx, &raw)
                .map_err(|e| malformed(format!("{what} {i}: {e}")))?;
            let ct = match encoding {
                // SEAL refuses, for one, a ciphertext whose second
                // polynomial is all zeros (transparent).
                Encoding::Rounded => p
                    .engine
                    .to_ntt(&ct)
                    .map_err(|e| malformed(format!("{what} {i}: {e}")))?,
                _ => ct,
            };
            let at = ct.parms_id()?;
            if at != level.parms_id {
                return Err(HeError::Mismatch(format!(
                    "{what} {i} is at level {:?}, expected {}",
                    seal_ctx.level_of(&at),
                    ctx.inner.level
                )));
            }
            if ct.size()? != 2 || !ct.is_ntt_form()? {
                return Err(malformed(format!("{what} {i} has the wrong shape")));
            }
            if ct.is_transparent()? {
                return Err(malformed(format!(
                    "{what} {i} is not encrypted (transparent)"
                )));
            }
            let s = ct.scale()?;
            if s != scale {
                return Err(HeError::Mismatch(format!(
                    "{what} {i} has scale 2^{:.2}, expected 2^{:.0}",
                    s.log2(),
                    scale.log2()
                )));
            }
            Ok(ct)
        })
        .collect()
}

/// The serialized form: magic, version, form, flags (bit 0: seeded, bit 1:
/// [`SlotPacking::Complex`]), key id, length
/// (u64 LE), ciphertext count (u32 LE), then each packed (version 2) or
/// deflated (version 1) ciphertext with its length (u32 LE).
fn envelope(
    version: u8,
    form: Form,
    flags: u8,
    key_id: &[u8; 16],
    len: usize,
    blobs: &[Vec<u8>],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(40 + blobs.iter().map(|b| b.len() + 4).sum::<usize>());
    out.extend_from_slice(VECTOR_MAGIC);
    out.push(version);
    out.push(form.tag());
    out.push(flags);
    out.extend_from_slice(key_id);
    out.extend_from_slice(&(len as u64).to_le_bytes());
    out.extend_from_slice(&(blobs.len() as u32).to_le_bytes());
    for b in blobs {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    out
}

/// Helpers for fuzzing and tests; not a stable API.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    pub use super::{ENVELOPE_HEADER, deflate, inflate};
    pub use crate::context::fuzz_key_file as key_file;
    pub use crate::gram::fuzz_eval_keys as eval_keys;

    /// Raw SEAL ciphertext bytes (any bytes) in a valid envelope for `ctx`'s
    /// key: one ciphertext of `slots` values in the deflated format (version
    /// 1), so that `load` hands them to SEAL's parser unchanged.
    pub fn wrap<R: Role>(ctx: &CkksContext<R>, seal_bytes: &[u8], form: Form) -> Vec<u8> {
        let blob = deflate(seal_bytes).unwrap_or_default();
        envelope(
            DEFLATE_VERSION,
            form,
            flags(false, SlotPacking::Real, false),
            &ctx.key_id(),
            ctx.slots(),
            &[blob],
        )
    }

    /// `encrypt_compact`'s upload in format version 1 (each seeded
    /// ciphertext as SEAL writes it, deflated): what the bench compares the
    /// packed form with, and what the tests load to show it still loads.
    pub fn encrypt_compact_deflated(ctx: &CkksContext<Secret>, values: &[f64]) -> Result<Vec<u8>> {
        write_deflated(&ctx.encrypt_seeded(values)?, true)
    }

    /// [`EncryptedVector::to_bytes`] without rounding a sum: every
    /// coefficient exact, as format 2 wrote sums before the rounded form
    /// (flag bit 2), which still load.
    pub fn to_unrounded_bytes(v: &EncryptedVector) -> Result<Vec<u8>> {
        v.write_as(false, false)
    }

    /// [`EncryptedVector::to_bytes`] in format version 1.
    pub fn to_deflated_bytes(v: &EncryptedVector) -> Result<Vec<u8>> {
        write_deflated(v, false)
    }

    fn write_deflated(v: &EncryptedVector, seeded: bool) -> Result<Vec<u8>> {
        if v.slot_packing != SlotPacking::Real {
            return Err(HeError::Mismatch(
                "format 1 holds one value per slot only".into(),
            ));
        }
        let blobs = v
            .cts
            .par_iter()
            .map(|ct| deflate(&ct.to_bytes()?).map_err(|e| HeError::Seal(format!("deflate: {e}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(envelope(
            DEFLATE_VERSION,
            v.form,
            flags(seeded, SlotPacking::Real, false),
            &v.key_id,
            v.len,
            &blobs,
        ))
    }

    /// The SEAL bytes the loader makes of an upload's first packed
    /// ciphertext (its first polynomial and seed record), for the tests
    /// that mutate SEAL's own format.
    pub fn first_seal_bytes<R: Role>(ctx: &CkksContext<R>, upload: &[u8]) -> Result<Vec<u8>> {
        let header = ENVELOPE_HEADER;
        let blob = upload
            .get(header + 4..)
            .ok_or_else(|| HeError::Malformed("too short".into()))?;
        let n = u32::from_le_bytes(upload[header..header + 4].try_into().expect("4 bytes"));
        let p = ctx.packing_of(Form::Fresh);
        raw::unpack_ciphertext(
            blob.get(..n as usize)
                .ok_or_else(|| HeError::Malformed("truncated".into()))?,
            true,
            p.degree,
            &p.primes,
            &p.parms_id,
            p.scale,
        )
        .map_err(HeError::Malformed)
    }
}
