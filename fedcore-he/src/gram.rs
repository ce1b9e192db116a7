//! Inner products under encryption: the evaluation keys and the encrypted
//! Gram matrix of a set of encrypted vectors.
//!
//! The geometric median by Weiszfeld needs, per iteration, each point's
//! distance to the current estimate `z = sum_j w_j x_j`, and
//! `||x_i - z||^2 = G_ii - 2 (G w)_i + w^T G w` with `G_ij = <x_i, x_j>`: the
//! Gram matrix of the points is all it needs. So the server computes `G`
//! under encryption once per round ([`CkksContext::inner_products`]), the
//! key holders decrypt its `n (n + 1) / 2` entries
//! ([`CkksContext::decrypt_gram`]), the server iterates in the clear on those
//! numbers and forms the estimate as an encrypted weighted sum
//! ([`CkksContext::weighted_sum`]) that only the key holders can open.
//!
//! The squared pairwise distances ([`CkksContext::squared_distances`]) do
//! the same and tell less: Weiszfeld is translation-invariant, so the
//! centered Gram matrix they determine serves as well, and they reveal how
//! far apart the points are, not where they are.

use rayon::prelude::*;

use crate::context::{CkksContext, Role, Secret};
use crate::error::{HeError, Result};
use crate::reader::Reader;
use crate::seal;
use crate::vector::{
    DEFLATE_VERSION, EncryptedVector, Form, Packing, SlotPacking, deflate, encoding, inflate,
    load_all, pack_all,
};

/// The most points an encrypted Gram matrix may have (its entries are
/// `n (n + 1) / 2` ciphertexts).
pub const MAX_GRAM_POINTS: usize = 256;

const KEYS_MAGIC: &[u8; 4] = b"FCEK";
const GRAM_MAGIC: &[u8; 4] = b"FCKG";
/// The evaluation keys' format.
const VERSION: u8 = 1;
/// The Gram matrix's format: 2 packs the entries (1, still read, deflated
/// SEAL's bytes).
const GRAM_VERSION: u8 = 2;

/// Relinearization keys and the Galois keys of a slot sum, loaded. A
/// collective key's relinearization keys ([`crate::multiparty`]) come
/// without Galois keys: its distances are decrypted from one coefficient,
/// with no slot sum.
pub(crate) struct EvalKeys {
    relin: seal::KSwitchKeys,
    galois: Option<seal::KSwitchKeys>,
}

/// The rotations that sum all slots into every slot: 1, 2, 4, ..., slots/2.
fn sum_steps(slots: usize) -> Vec<i32> {
    std::iter::successors(Some(1usize), |s| Some(s * 2))
        .take_while(|&s| s < slots)
        .map(|s| s as i32)
        .collect()
}

/// The most bytes one set of `count` key-switching keys may take in SEAL's
/// uncompressed serialization: each key is `primes - 1` ciphertexts of two
/// polynomials over all `primes`, 8 bytes per coefficient, plus headers, and
/// one length word per Galois index (up to `degree` of them).
fn max_kswitch_bytes<R: Role>(ctx: &CkksContext<R>, count: usize) -> usize {
    let primes = ctx.params().coeff_bits().len();
    count * ((primes - 1) * (2 * ctx.params().degree() * primes * 8 + 1024))
        + 8 * ctx.params().degree()
        + 4096
}

/// The index SEAL files the Galois key of a left rotation by `step` under:
/// `(3^step mod 2N - 1) / 2` (SEAL's `GaloisTool`, generator 3).
fn galois_index(step: i32, degree: usize) -> usize {
    let m = 2 * degree as u64;
    let elt = (0..step).fold(1u64, |e, _| (e * 3) % m);
    ((elt - 1) / 2) as usize
}

/// Checks SEAL's uncompressed serialization of key-switching keys before
/// SEAL reads it (SEAL reserves memory for the counts it reads before it
/// validates them, and an allocation failure would abort the process): the
/// header, then at most `degree` key slots, each empty or holding exactly
/// `primes - 1` keys of a bounded size, and non-empty exactly at `want`
/// (so every key the arithmetic uses is there and nothing else is).
pub(crate) fn check_kswitch_layout(
    raw: &[u8],
    degree: usize,
    primes: usize,
    want: &[usize],
) -> std::result::Result<(), String> {
    let short = |_| "truncated".to_owned();
    let mut r = Reader::new(raw);
    let header = |r: &mut Reader<'_>| -> std::result::Result<u64, String> {
        let h = r.take(16).map_err(short)?;
        if h[..2] != [0x5E, 0xA1] || h[2] != 16 || h[5] != 0 {
            return Err("not an uncompressed SEAL object".into());
        }
        Ok(u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")))
    };
    if header(&mut r)? != raw.len() as u64 {
        return Err("the header's size is not the object's".into());
    }
    r.take(32).map_err(short)?;
    let slots = r.u64().map_err(short)?;
    if slots > degree as u64 {
        return Err(format!("{slots} key slots (at most {degree})"));
    }
    let max_key = 2 * degree * primes * 8 + 1024;
    for index in 0..slots as usize {
        let keys = r.u64().map_err(short)?;
        let wanted = want.contains(&index);
        if keys != 0 && keys != (primes - 1) as u64 {
            return Err(format!("slot {index} holds {keys} keys"));
        }
        if (keys != 0) != wanted {
            return Err(format!(
                "slot {index} is {} where it must be {}",
                if keys == 0 { "empty" } else { "filled" },
                if wanted { "filled" } else { "empty" }
            ));
        }
        for _ in 0..keys {
            let size = header(&mut r)?;
            if !(16..=max_key as u64).contains(&size) {
                return Err(format!("a key of {size} bytes"));
            }
            r.take(size as usize - 16).map_err(short)?;
        }
    }
    if want.iter().any(|&i| i >= slots as usize) {
        return Err("a key the slot sum needs is missing".into());
    }
    if !r.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(())
}

/// What an [`EncryptedGram`] holds for each pair of points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairs {
    /// `<x_i, x_j>` for `i <= j`: the Gram matrix.
    InnerProducts,
    /// `||x_i - x_j||^2` for `i < j` (the diagonal is zero): tells only
    /// how far apart the points are, not where they are.
    SquaredDistances,
}

impl Pairs {
    fn tag(self) -> u8 {
        match self {
            Pairs::InnerProducts => 1,
            Pairs::SquaredDistances => 2,
        }
    }

    /// The pairs `(i, j)` with an entry, row by row.
    fn of(self, n: usize) -> Vec<(usize, usize)> {
        let skip = usize::from(self == Pairs::SquaredDistances);
        (0..n)
            .flat_map(|i| (i + skip..n).map(move |j| (i, j)))
            .collect()
    }
}

/// An `n x n` matrix of pairwise quantities of encrypted vectors, under
/// encryption: the Gram matrix `G_ij = <x_i, x_j>`
/// ([`CkksContext::inner_products`]) or the squared distances
/// `D_ij = ||x_i - x_j||^2` ([`CkksContext::squared_distances`]); one
/// ciphertext per entry of the upper triangle, each holding the entry in
/// every slot. Opened by [`CkksContext::decrypt_gram`] (key holders only).
pub struct EncryptedGram {
    n: usize,
    kind: Pairs,
    key_id: [u8; 16],
    /// The entries of `kind.of(n)`, in that order.
    cts: Vec<seal::Ciphertext>,
    packing: Packing,
}

impl std::fmt::Debug for EncryptedGram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedGram")
            .field("points", &self.n)
            .field("ciphertexts", &self.cts.len())
            .finish()
    }
}

impl EncryptedGram {
    /// Number of points (rows).
    pub fn points(&self) -> usize {
        self.n
    }

    /// Inner products or squared distances.
    pub fn kind(&self) -> Pairs {
        self.kind
    }

    /// Bytes for the wire: magic, version, key id, kind (1 byte: 1 inner
    /// products, 2 squared distances), `n` (u32 LE), then each
    /// entry's ciphertext packed (each coefficient in its prime's bit width),
    /// with its length (u32 LE).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let blobs = pack_all(&self.cts, &self.packing, false)?;
        let mut out = Vec::with_capacity(32 + blobs.iter().map(|b| b.len() + 4).sum::<usize>());
        out.extend_from_slice(GRAM_MAGIC);
        out.push(GRAM_VERSION);
        out.extend_from_slice(&self.key_id);
        out.push(self.kind.tag());
        out.extend_from_slice(&(self.n as u32).to_le_bytes());
        for b in &blobs {
            out.extend_from_slice(&(b.len() as u32).to_le_bytes());
            out.extend_from_slice(b);
        }
        Ok(out)
    }
}

impl CkksContext<Secret> {
    /// The evaluation keys the server needs for
    /// [`inner_products`](CkksContext::inner_products): relinearization
    /// keys and the Galois keys of the rotations that sum the slots
    /// (`log2(slots)` of them). They are public keys — they let their holder
    /// compute, never decrypt — and are written once by the key authority
    /// next to the public key. About 9 MB at the default parameters.
    pub fn evaluation_keys(&self) -> Result<Vec<u8>> {
        let sk = self
            .inner
            .secret_key()
            .expect("a CkksContext<Secret> holds its secret key");
        let steps = sum_steps(self.slots());
        let (relin, galois) = seal::evaluation_keys(self.inner.engine.context(), sk, &steps)?;
        let (relin, galois) = (
            deflate(&relin).map_err(|e| HeError::Seal(format!("deflate: {e}")))?,
            deflate(&galois).map_err(|e| HeError::Seal(format!("deflate: {e}")))?,
        );
        Ok(keys_envelope(&self.key_id(), &relin, &galois))
    }

    /// A 32-byte seed that only key holders can compute, the same for every
    /// key holder and every time for the same `data`: SHA-256 of a label,
    /// the secret key and `data`.
    pub(crate) fn keyed_seed(&self, data: &[u8]) -> Result<[u8; 32]> {
        use sha2::{Digest, Sha256};
        let sk = self
            .inner
            .secret_key()
            .expect("a CkksContext<Secret> holds its secret key")
            .to_bytes()?;
        let mut h = Sha256::new();
        h.update(b"fedcore-he decryption flooding v1");
        h.update((sk.len() as u64).to_le_bytes());
        h.update(&sk);
        h.update(data);
        Ok(h.finalize().into())
    }

    /// Opens an encrypted Gram or squared-distance matrix: `n x n`,
    /// row-major, symmetric (a distance matrix with a zero diagonal). Each
    /// entry is the mean of its ciphertext's slots (all of which hold it).
    ///
    /// Whoever receives these numbers learns the inner products of the
    /// points and nothing else about them; see docs/he.md for what that is.
    pub fn decrypt_gram(&self, g: &EncryptedGram) -> Result<Vec<f64>> {
        if g.key_id != self.key_id() {
            return Err(HeError::Mismatch("encrypted under another key".into()));
        }
        let n = g.n;
        let values = g
            .cts
            .par_iter()
            .map(|ct| {
                let p = self.engine().decrypt(ct)?;
                let slots = self.engine().decode(&p)?;
                Ok(slots.iter().sum::<f64>() / slots.len().max(1) as f64)
            })
            .collect::<Result<Vec<f64>>>()?;
        let mut out = vec![0.0; n * n];
        for ((i, j), v) in g.kind.of(n).into_iter().zip(values) {
            out[i * n + j] = v;
            out[j * n + i] = v;
        }
        Ok(out)
    }
}

impl<R: Role> CkksContext<R> {
    /// This context with the evaluation keys made by
    /// [`CkksContext::evaluation_keys`] for the same key pair. The bytes are
    /// checked as uploads are: header, key id, bounded decompression, then
    /// SEAL's own validation against the parameters, then the number of
    /// keys; anything else is a [`HeError::Malformed`] or
    /// [`HeError::Mismatch`].
    pub fn with_evaluation_keys(&self, bytes: &[u8]) -> Result<Self> {
        let malformed = |m: &str| HeError::Malformed(format!("evaluation keys: {m}"));
        let mut r = Reader::new(bytes);
        if r.take(4).map_err(|_| malformed("too short"))? != KEYS_MAGIC {
            return Err(malformed("not fedcore-he evaluation keys"));
        }
        let version = r.u8().map_err(|_| malformed("truncated header"))?;
        if version != VERSION {
            return Err(malformed(&format!("format version {version}")));
        }
        let key = r.take(16).map_err(|_| malformed("truncated header"))?;
        if key != self.key_id() {
            return Err(HeError::Mismatch(
                "evaluation keys of another key pair (key id differs)".into(),
            ));
        }
        let mut part = |what: &str| -> Result<&[u8]> {
            let n = r
                .u64()
                .map_err(|_| malformed(&format!("truncated before the {what} keys")))?;
            let n = usize::try_from(n).map_err(|_| malformed("bad length"))?;
            r.take(n)
                .map_err(|_| malformed(&format!("the {what} keys are truncated")))
        };
        let (relin, galois) = (part("relinearization")?, part("Galois")?);
        if !r.is_empty() {
            return Err(malformed("trailing bytes"));
        }
        let steps = sum_steps(self.slots());
        let ctx = self.inner.engine.context();
        let (degree, primes) = (self.params().degree(), self.params().coeff_bits().len());
        let load = |blob: &[u8], what: &str, want: &[usize]| -> Result<seal::KSwitchKeys> {
            let count = want.len();
            let raw = inflate(blob, max_kswitch_bytes(self, count))
                .map_err(|e| malformed(&format!("{what} keys: decompression: {e}")))?;
            check_kswitch_layout(&raw, degree, primes, want)
                .map_err(|e| malformed(&format!("{what} keys: {e}")))?;
            let keys = seal::KSwitchKeys::from_bytes(ctx, &raw)
                .map_err(|e| malformed(&format!("{what} keys: {e}")))?;
            let held = keys.size()?;
            if held != count as u64 {
                return Err(malformed(&format!(
                    "{held} {what} keys where {count} are needed"
                )));
            }
            Ok(keys)
        };
        // Relinearization keys sit at index 0 (the key for s^2); the Galois
        // keys at the indices of the slot sum's rotations.
        let galois_at: Vec<usize> = steps.iter().map(|&s| galois_index(s, degree)).collect();
        let keys = EvalKeys {
            relin: load(relin, "relinearization", &[0])?,
            galois: Some(load(galois, "Galois", &galois_at)?),
        };
        self.with_eval(keys)
    }

    /// [`with_evaluation_keys`](CkksContext::with_evaluation_keys) from a
    /// file the key authority wrote (`he-evaluation.keys`); a file larger
    /// than the keys can be is refused before it is read.
    pub fn with_evaluation_key_file(&self, path: &std::path::Path) -> Result<Self> {
        let key_file = |reason: String| HeError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let limit = 2 * max_kswitch_bytes(self, 1 + sum_steps(self.slots()).len()) as u64;
        let size = std::fs::metadata(path)
            .map_err(|e| key_file(e.to_string()))?
            .len();
        if size > limit {
            return Err(key_file(format!(
                "{size} bytes; evaluation keys take at most {limit}"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| key_file(e.to_string()))?;
        self.with_evaluation_keys(&bytes)
    }

    /// Whether [`with_evaluation_keys`](CkksContext::with_evaluation_keys)
    /// gave this context its evaluation keys.
    pub fn has_evaluation_keys(&self) -> bool {
        self.inner.eval.is_some()
    }

    /// The largest inner product an encrypted Gram matrix can hold:
    /// `2^(upload level bits - 2 scale bits - 1)` (2^19 at the default
    /// parameters). An upload whose squared norm reaches it makes its row of
    /// the matrix wrap around; a hospital checks its own update against it
    /// before encrypting, and the server's check of the decrypted matrix
    /// (Cauchy-Schwarz) catches one that did not.
    pub fn inner_product_bound(&self) -> f64 {
        let l = &self.inner.engine.context().levels[self.inner.level];
        let bits = l.modulus_bits as i32 - 2 * self.params().scale_bits() as i32 - 1;
        2f64.powi(bits)
    }

    /// The Gram matrix `G_ij = <parts_i, parts_j>` of fresh uploads, under
    /// encryption, with the evaluation keys: per pair, the ciphertexts'
    /// products summed, relinearized once, then the slots summed by
    /// `log2(slots)` rotations. No level is spent: the products stay at the
    /// upload level at scale `2^(2 scale bits)`.
    ///
    /// Cost: `n (n + 1) / 2` pairs, each one ciphertext product per
    /// `slots` values plus one relinearization and `log2(slots)` rotations.
    pub fn inner_products(&self, parts: &[&EncryptedVector]) -> Result<EncryptedGram> {
        self.pairwise(parts, Pairs::InnerProducts)
    }

    /// The squared distances `D_ij = ||parts_i - parts_j||^2` of fresh
    /// uploads, under encryption, as [`inner_products`](Self::inner_products)
    /// computes the Gram matrix but on the differences (one ciphertext
    /// subtraction more per product, `n (n - 1) / 2` pairs). Whoever decrypts
    /// them learns how far apart the points are and nothing about where they
    /// are (every point shifted by one vector gives the same matrix), which
    /// is all the geometric median needs
    /// (`fedcore_robust::GeometricMedian::compute_on_distances`). At least
    /// two parts.
    pub fn squared_distances(&self, parts: &[&EncryptedVector]) -> Result<EncryptedGram> {
        if parts.len() < 2 {
            return Err(HeError::OutOfRange(
                "squared distances need at least two parts".into(),
            ));
        }
        self.pairwise(parts, Pairs::SquaredDistances)
    }

    fn pairwise(&self, parts: &[&EncryptedVector], kind: Pairs) -> Result<EncryptedGram> {
        let n = parts.len();
        let cts = self.pair_products(parts, kind, true)?;
        Ok(EncryptedGram {
            n,
            kind,
            key_id: self.key_id(),
            cts,
            packing: self.packing(entry_scale(self.params())),
        })
    }

    /// This context with relinearization keys alone, from SEAL's
    /// uncompressed serialization of key-switching keys (a collective key's,
    /// made by [`crate::multiparty`]'s RKG): the layout is checked before
    /// SEAL reads it (one key slot, index 0, `primes - 1` keys of a bounded
    /// size), then SEAL validates the keys against the parameters.
    pub(crate) fn with_relinearization_keys(&self, raw: &[u8]) -> Result<Self> {
        let bad = |m: String| HeError::Malformed(format!("relinearization keys: {m}"));
        let (degree, primes) = (self.params().degree(), self.params().coeff_bits().len());
        if raw.len() > max_kswitch_bytes(self, 1) {
            return Err(bad(format!("{} bytes", raw.len())));
        }
        check_kswitch_layout(raw, degree, primes, &[0]).map_err(bad)?;
        let relin = seal::KSwitchKeys::from_bytes(self.inner.engine.context(), raw)
            .map_err(|e| bad(e.to_string()))?;
        if relin.size()? != 1 {
            return Err(bad("not one relinearization key".into()));
        }
        self.with_eval(EvalKeys {
            relin,
            galois: None,
        })
    }

    /// Per pair of `parts`, the ciphertexts' products (of the differences,
    /// for [`Pairs::SquaredDistances`]) summed and relinearized once, then,
    /// with `slot_sum`, the slots summed by `log2(slots)` rotations. Without
    /// it every slot holds its own partial sum, and the sum of the slots is
    /// `N / 2` times the constant coefficient of the plaintext: what a
    /// collective decryption of that one coefficient reveals.
    pub(crate) fn pair_products(
        &self,
        parts: &[&EncryptedVector],
        kind: Pairs,
        slot_sum: bool,
    ) -> Result<Vec<seal::Ciphertext>> {
        let keys = self.inner.eval.as_ref().ok_or_else(|| {
            HeError::Mismatch(
                "this context has no evaluation keys (CkksContext::with_evaluation_keys)".into(),
            )
        })?;
        let first = parts
            .first()
            .ok_or_else(|| HeError::OutOfRange("inner products of nothing".into()))?;
        if first.is_empty() {
            return Err(HeError::OutOfRange(
                "inner products of empty vectors".into(),
            ));
        }
        let n = parts.len();
        if n > MAX_GRAM_POINTS {
            return Err(HeError::OutOfRange(format!(
                "{n} points; at most {MAX_GRAM_POINTS}"
            )));
        }
        for p in parts {
            self.check_same(p, Form::Fresh, first.len)?;
            // A product of two slots packed two values each mixes the parts
            // (`(a + ib)(c + id)` is not `ac + bd`).
            if p.slot_packing() != SlotPacking::Real {
                return Err(HeError::Mismatch(
                    "inner products under encryption need one value per slot, these hold two (seal the global for the encrypted median with EncryptedMedian::sealed_sum, which packs SlotPacking::Real)".into(),
                ));
            }
        }
        let galois = match (slot_sum, &keys.galois) {
            (true, None) => {
                return Err(HeError::Mismatch(
                    "these evaluation keys have no Galois keys for the slot sum".into(),
                ));
            }
            (true, Some(g)) => Some(g),
            (false, _) => None,
        };
        let steps = sum_steps(self.slots());
        let pairs = kind.of(n);
        let engine = self.engine();
        let product = |a: &seal::Ciphertext, b: &seal::Ciphertext| -> Result<seal::Ciphertext> {
            Ok(match kind {
                Pairs::InnerProducts => engine.multiply(a, b)?,
                Pairs::SquaredDistances => {
                    let d = engine.sub(a, b)?;
                    engine.multiply(&d, &d)?
                }
            })
        };
        pairs
            .par_iter()
            .map(|&(i, j)| {
                let mut acc = parts[i]
                    .cts
                    .par_iter()
                    .zip(&parts[j].cts)
                    .map(|(a, b)| product(a, b))
                    .try_reduce_with(|mut acc, c| {
                        engine.add_inplace(&mut acc, &c)?;
                        Ok(acc)
                    })
                    .expect("a non-empty vector has a ciphertext")?;
                engine.relinearize_inplace(&mut acc, &keys.relin)?;
                if let Some(galois) = galois {
                    for &s in &steps {
                        let rotated = engine.rotate(&acc, s, galois)?;
                        engine.add_inplace(&mut acc, &rotated)?;
                    }
                }
                Ok(acc)
            })
            .collect::<Result<Vec<_>>>()
    }

    /// Loads an encrypted Gram matrix of `points` points saved by
    /// [`EncryptedGram::to_bytes`] (a hospital knows how many took part, so
    /// the bytes cannot make it hold more): header, key id, the point count,
    /// each entry's exact packed length and reduced coefficients, SEAL's
    /// validation, then
    /// each ciphertext's level, size and scale (what
    /// [`inner_products`](CkksContext::inner_products) makes).
    pub fn load_gram(&self, bytes: &[u8], points: usize) -> Result<EncryptedGram> {
        let malformed = |m: String| HeError::Malformed(format!("encrypted Gram matrix: {m}"));
        let mut r = Reader::new(bytes);
        if r.take(4).map_err(|_| malformed("too short".into()))? != GRAM_MAGIC {
            return Err(malformed("not a fedcore-he encrypted Gram matrix".into()));
        }
        let version = r.u8().map_err(|_| malformed("truncated header".into()))?;
        if version != GRAM_VERSION && version != DEFLATE_VERSION {
            return Err(malformed(format!("format version {version}")));
        }
        let encoding = encoding(version, false);
        let key: [u8; 16] = r
            .take(16)
            .map_err(|_| malformed("truncated header".into()))?
            .try_into()
            .expect("16 bytes");
        if key != self.key_id() {
            return Err(HeError::Mismatch(
                "encrypted under another key (key id differs)".into(),
            ));
        }
        let kind = match r.u8().map_err(|_| malformed("truncated header".into()))? {
            1 => Pairs::InnerProducts,
            2 => Pairs::SquaredDistances,
            t => return Err(malformed(format!("unknown kind {t}"))),
        };
        let n = r.u32().map_err(|_| malformed("truncated header".into()))? as usize;
        if n != points || n == 0 || n > MAX_GRAM_POINTS {
            return Err(malformed(format!(
                "{n} points where {points} are expected (1 to {MAX_GRAM_POINTS})"
            )));
        }
        let count = kind.of(n).len();
        let mut blobs = Vec::with_capacity(count);
        for k in 0..count {
            let len = r
                .u32()
                .map_err(|_| malformed(format!("truncated before entry {k}")))?;
            blobs.push(
                r.take(len as usize)
                    .map_err(|_| malformed(format!("entry {k} is truncated")))?,
            );
        }
        if !r.is_empty() {
            return Err(malformed("trailing bytes".into()));
        }
        let packing = self.packing(entry_scale(self.params()));
        let cts = load_all(
            self,
            &blobs,
            &packing,
            encoding,
            "entry",
            "encrypted Gram matrix: ",
        )?;
        Ok(EncryptedGram {
            n,
            kind,
            key_id: key,
            cts,
            packing,
        })
    }
}

/// The serialized evaluation keys: magic, version, key id, then the
/// deflated relinearization and Galois keys, each after its length (u64 LE).
fn keys_envelope(key_id: &[u8; 16], relin: &[u8], galois: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + relin.len() + galois.len());
    out.extend_from_slice(KEYS_MAGIC);
    out.push(VERSION);
    out.extend_from_slice(key_id);
    for part in [relin, galois] {
        out.extend_from_slice(&(part.len() as u64).to_le_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Evaluation keys' bytes for `ctx`'s key pair around raw (uncompressed)
/// SEAL bytes for the relinearization and the Galois keys: the fuzz target
/// `eval_keys` uses it to reach the layout check and SEAL's parser.
pub fn fuzz_eval_keys<R: Role>(ctx: &CkksContext<R>, relin: &[u8], galois: &[u8]) -> Vec<u8> {
    keys_envelope(
        &ctx.key_id(),
        &deflate(relin).unwrap_or_default(),
        &deflate(galois).unwrap_or_default(),
    )
}

/// The scale of a Gram entry: a product of two fresh uploads, not rescaled.
fn entry_scale(params: &crate::CkksParams) -> f64 {
    2f64.powi(2 * params.scale_bits() as i32)
}

#[cfg(test)]
mod tests {
    use super::{galois_index, sum_steps};

    #[test]
    fn galois_indices_follow_seal_s_generator() {
        // 3^1 mod 16384 = 3 -> index 1; 3^2 = 9 -> index 4; 3^4 = 81 -> 40.
        assert_eq!(galois_index(1, 8192), 1);
        assert_eq!(galois_index(2, 8192), 4);
        assert_eq!(galois_index(4, 8192), 40);
    }

    #[test]
    fn the_slot_sum_rotates_by_every_power_of_two_below_the_slot_count() {
        assert_eq!(sum_steps(8), vec![1, 2, 4]);
        assert_eq!(sum_steps(4096).len(), 12);
        assert!(sum_steps(1).is_empty());
    }
}
