//! Multiparty CKKS without a dealer: no single party, and no coalition that
//! lacks one hospital, can decrypt a hospital's upload.
//!
//! Mouchet, Troncoso-Pastoriza, Bossuat and Hubaux, "Multiparty Homomorphic
//! Encryption from Ring-Learning-with-Errors" (PoPETs 2021), N-of-N:
//!
//! 1. **Collective key generation (CKG).** Each hospital `i` draws its own
//!    secret `s_i` ([`PartyKey::generate`]) and publishes a key share
//!    `p_i = -a * s_i + e_i` ([`PartyKey::key_share`]), where `a` is a
//!    common random polynomial expanded from a public seed ([`Crs`]). The
//!    server adds the shares ([`CollectiveKey::combine`]):
//!    `(sum p_i, a)` is an ordinary CKKS public key for the secret
//!    `s = sum s_i`, which nobody holds.
//! 2. **Uploads** are public-key encryptions under that key
//!    ([`CkksContext::encrypt_upload`] of [`CollectiveKey::context`]); the
//!    server adds them as today.
//! 3. **Collective public-key switching (PCKS)** takes the aggregate, and
//!    only the aggregate, to an output key `s'` the hospitals hold (today's
//!    hospital key, [`KeyAuthority`](crate::KeyAuthority)): each hospital
//!    answers ([`PartyKey::switch_share`])
//!    `h0_i = s_i * c1 + u_i * p0' + e0_i + E_i`, `h1_i = u_i * p1' + e1_i`
//!    and the server combines ([`CollectiveKey::switch`])
//!    `(c0 + sum h0_i, sum h1_i)`, a ciphertext under `s'`. The server holds
//!    no secret; `s'` alone decrypts nothing a hospital uploaded.
//!
//! `E_i` is the smudging noise: Gaussian with a standard deviation
//! ([`PartyKey::smudging_sigma`]) `2^40 * sqrt(N)` times a bound on the
//! aggregate's own noise, so that the switched result reveals that noise
//! (which depends on `s`) only up to a statistical distance of `2^-41` per
//! ciphertext (the Kullback-Leibler bound, see docs/he.md). The noise is
//! drawn from a generator keyed by the hospital's secret and the
//! aggregate's digest: asked twice for the same aggregate, a hospital gives
//! the same noise, so averaging answers removes nothing.
//!
//! Every polynomial operation is pointwise per prime in SEAL's NTT domain;
//! the coefficients travel through SEAL's byte format ([`crate::raw`]) and
//! every object built here is loaded back through SEAL's validation.

use std::fmt;
use std::sync::Arc;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::context::{CkksContext, Public};
use crate::error::{HeError, Result};
use crate::params::CkksParams;
use crate::raw::{RawCiphertext, RawSecretKey};
use crate::reader::Reader;
use crate::seal;
use crate::vector::{EncryptedVector, Form};

/// The statistical security of the smudging noise, in bits: the switched
/// aggregate's distribution is within `2^-(SMUDGING_BITS + 1)` of one that
/// does not depend on the aggregate's noise, per ciphertext.
pub const SMUDGING_BITS: u32 = 40;

/// The most parties a collective key may have.
pub const MAX_PARTIES: usize = 1024;

const KEY_SHARE_MAGIC: &[u8; 4] = b"FCKS";
const SWITCH_SHARE_MAGIC: &[u8; 4] = b"FCSW";
const VERSION: u8 = 1;

/// The public seed of the common random polynomial `a` (the "common
/// reference string"): every hospital must use the same one, and no party
/// may choose it after seeing others' shares (the server draws it with
/// [`Crs::random`] and publishes it before any share is made).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Crs([u8; 32]);

impl fmt::Debug for Crs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Crs({})", hex(&self.0[..8]))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Crs {
    /// A seed given by the caller (public: it is no secret).
    pub fn new(seed: [u8; 32]) -> Self {
        Self(seed)
    }

    /// A fresh seed from the operating system's generator.
    pub fn random() -> Result<Self> {
        let mut rng = ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng)
            .map_err(|e| HeError::Seal(format!("the operating system's generator failed: {e}")))?;
        Ok(Self(rng.random()))
    }

    /// The seed.
    pub fn bytes(&self) -> [u8; 32] {
        self.0
    }

    /// `a`: uniform below each prime, in the NTT domain (uniform there as in
    /// the coefficient domain: the NTT is a bijection).
    fn expand(&self, primes: &[u64], degree: usize) -> Vec<u64> {
        let mut h = Sha256::new();
        h.update(b"fedcore-he common random polynomial v1");
        h.update(self.0);
        let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
        let mut a = Vec::with_capacity(primes.len() * degree);
        for &q in primes {
            a.extend((0..degree).map(|_| rng.random_range(0..q)));
        }
        a
    }
}

/// `a * b mod q`.
fn mul(a: u64, b: u64, q: u64) -> u64 {
    ((a as u128 * b as u128) % q as u128) as u64
}

/// `a + b mod q`, both below `q`.
fn add(a: u64, b: u64, q: u64) -> u64 {
    let s = a + b;
    if s >= q { s - q } else { s }
}

/// `a - b mod q`, both below `q`.
fn sub(a: u64, b: u64, q: u64) -> u64 {
    if a >= b { a - b } else { a + q - b }
}

/// Checks that `data` holds `primes.len()` polynomials of `degree`
/// coefficients, each reduced below its prime.
fn check_reduced(data: &[u64], primes: &[u64], degree: usize, what: &str) -> Result<()> {
    if data.len() != primes.len() * degree {
        return Err(HeError::Malformed(format!(
            "{what}: {} coefficients, expected {} primes x {degree}",
            data.len(),
            primes.len()
        )));
    }
    for (j, (chunk, &q)) in data.chunks_exact(degree).zip(primes).enumerate() {
        if let Some(c) = chunk.iter().position(|&x| x >= q) {
            return Err(HeError::Malformed(format!(
                "{what}: coefficient {c} of prime {j} is not reduced"
            )));
        }
    }
    Ok(())
}

fn seal_err(e: seal::SealFailure) -> HeError {
    HeError::Seal(e.to_string())
}

/// A hospital's secret share `s_i` of the collective key. It can make a
/// key share and answer a key switch; it has no decryption method, and
/// there is no way to combine it with another party's.
pub struct PartyKey {
    params: CkksParams,
    ctx: Arc<seal::Context>,
    party: u32,
    /// `s_i`: NTT form, every prime of the key level.
    secret: RawSecretKey,
    /// The key level's public key for `s_i` alone, `(-a' s_i + e, a')`,
    /// from which the key share is made.
    own_public: RawCiphertext,
    weight_sum: f64,
}

impl fmt::Debug for PartyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartyKey")
            .field("party", &self.party)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

fn context_for(params: &CkksParams) -> Result<Arc<seal::Context>> {
    crate::context::make_context(params)
}

impl PartyKey {
    /// A fresh secret share for party `party` (a hospital's number in the
    /// federation, unique within it).
    pub fn generate(params: CkksParams, party: u32) -> Result<Self> {
        let ctx = context_for(&params)?;
        let (sk, pk) = seal::keygen(&ctx).map_err(seal_err)?;
        let n = params.degree();
        let k = ctx.primes.len();
        let secret =
            RawSecretKey::parse(&sk.to_bytes().map_err(seal_err)?, n * k).map_err(HeError::Seal)?;
        let own_public =
            RawCiphertext::parse(&pk.to_bytes().map_err(seal_err)?, n, k).map_err(HeError::Seal)?;
        Ok(Self {
            params,
            ctx,
            party,
            secret,
            own_public,
            weight_sum: 1.0,
        })
    }

    /// This party's number.
    pub fn party(&self) -> u32 {
        self.party
    }

    /// The parameters.
    pub fn params(&self) -> &CkksParams {
        &self.params
    }

    /// Sets the bound on the sum of the absolute weights of the aggregates
    /// this party will switch (1 by default: a weighted mean). The smudging
    /// noise grows with it, in `[1, 2^20]`.
    pub fn with_weight_sum(mut self, bound: f64) -> Result<Self> {
        if !(1.0..=1_048_576.0).contains(&bound) {
            return Err(HeError::OutOfRange(format!(
                "weight sum bound {bound} is not in [1, 2^20]"
            )));
        }
        self.weight_sum = bound;
        Ok(self)
    }

    /// This party's key share `p_i = -a * s_i + e_i` for the common random
    /// polynomial of `crs`: its own public key `(-a' s_i + e, a')` turned to
    /// `a` by adding `(a' - a) * s_i`.
    pub fn key_share(&self, crs: &Crs) -> Result<KeyShare> {
        let n = self.params.degree();
        let primes = &self.ctx.primes;
        let a = crs.expand(primes, n);
        let p0 = self.own_public.poly(0);
        let a_own = self.own_public.poly(1);
        let s = &self.secret.data;
        let poly = (0..primes.len() * n)
            .into_par_iter()
            .map(|i| {
                let q = primes[i / n];
                add(p0[i], mul(sub(a_own[i], a[i], q), s[i], q), q)
            })
            .collect();
        Ok(KeyShare {
            party: self.party,
            crs: *crs,
            poly,
        })
    }

    /// The standard deviation of the smudging noise for this party's
    /// parameters and weight-sum bound: `2^SMUDGING_BITS * sqrt(N)` times
    /// the bound [`aggregate_noise_bound`] on the aggregate's own noise.
    pub fn smudging_sigma(&self, parties: usize) -> f64 {
        let b = aggregate_noise_bound(&self.params, parties, self.weight_sum);
        2f64.powi(SMUDGING_BITS as i32) * (self.params.degree() as f64).sqrt() * b
    }

    /// This party's answer to a key switch of `aggregate` (a weighted sum
    /// under `collective`) to `output`'s key: for each ciphertext
    /// `(c0, c1)`, `h0 = s_i * c1 + u * p0' + e0 + E` and `h1 = u * p1' + e1`,
    /// where `(u * p0' + e0, u * p1' + e1)` is a fresh encryption of zero
    /// under `output` and `E` the smudging noise.
    ///
    /// The share is bound to the collective key, the output key and the
    /// aggregate's digest; [`CollectiveKey::switch`] refuses it for anything
    /// else. A hospital should answer only for an aggregate of the round
    /// (see docs/he.md: a server that asks for the switch of one upload is
    /// outside the semi-honest model this protects against).
    pub fn switch_share(
        &self,
        collective: &CollectiveKey,
        aggregate: &EncryptedVector,
        output: &CkksContext<Public>,
    ) -> Result<SwitchShare> {
        if !collective.parties.contains(&self.party) {
            return Err(HeError::Mismatch(format!(
                "party {} is not in the collective key",
                self.party
            )));
        }
        if collective.ctx.params() != &self.params || output.params() != &self.params {
            return Err(HeError::Mismatch(
                "the collective or output key has other parameters".into(),
            ));
        }
        let cipher = collective.raw_aggregate(aggregate)?;
        let digest = digest_of(&cipher);
        let n = self.params.degree();
        let primes = &self.ctx.primes;
        let sigma = self.smudging_sigma(collective.parties.len());
        let seed = self.keyed_seed(&digest, collective.ctx.key_id(), output.key_id());
        let polys = cipher
            .par_iter()
            .enumerate()
            .map(|(index, ct)| {
                let level = collective.level_of(ct)?;
                let k = ct.primes;
                let zero = output
                    .engine()
                    .encode(&[], level, ct.scale)
                    .and_then(|p| output.engine().encrypt_public(&p))
                    .map_err(seal_err)?;
                let zero = RawCiphertext::parse(&zero.to_bytes().map_err(seal_err)?, n, k)
                    .map_err(HeError::Seal)?;
                let smudge =
                    smudging(output, ct, &primes[..k], sigma, derive(&seed, index as u64))?;
                let (c1, s) = (ct.poly(1), &self.secret.data);
                let (z0, z1) = (zero.poly(0), zero.poly(1));
                let h0: Vec<u64> = (0..k * n)
                    .map(|i| {
                        let q = primes[i / n];
                        add(add(mul(s[i], c1[i], q), z0[i], q), smudge[i], q)
                    })
                    .collect();
                Ok((h0, z1.to_vec()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SwitchShare {
            party: self.party,
            collective: collective.ctx.key_id(),
            output: output.key_id(),
            digest,
            polys,
        })
    }

    /// A 32-byte seed only this party can compute, the same every time for
    /// the same aggregate and keys.
    fn keyed_seed(&self, digest: &[u8; 32], collective: [u8; 16], output: [u8; 16]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"fedcore-he key-switch smudging v1");
        for w in &self.secret.data {
            h.update(w.to_le_bytes());
        }
        h.update(digest);
        h.update(collective);
        h.update(output);
        h.finalize().into()
    }

    /// The secret polynomial, for the tests' coalition attacks only.
    #[cfg(test)]
    pub(crate) fn secret(&self) -> &RawSecretKey {
        &self.secret
    }
}

fn derive(seed: &[u8; 32], index: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(seed);
    h.update(index.to_le_bytes());
    h.finalize().into()
}

/// Smudging noise for one ciphertext of `like`'s level: Gaussian integers of
/// standard deviation `sigma` in the coefficient domain, taken to the NTT
/// domain by SEAL. The Gaussian is drawn in double precision and dithered
/// below its resolution with uniform integers, so that every integer near
/// the mean is reachable.
fn smudging(
    ctx: &CkksContext<Public>,
    like: &RawCiphertext,
    primes: &[u64],
    sigma: f64,
    seed: [u8; 32],
) -> Result<Vec<u64>> {
    let n = like.degree;
    let mut rng = ChaCha20Rng::from_seed(seed);
    // f64 resolution at 8 sigma, with margin: 2^(log2(8 sigma) - 52).
    let dither = 2f64.powi((8.0 * sigma).log2().ceil() as i32 - 52).max(1.0) as i128;
    let noise: Vec<i128> = (0..n)
        .map(|_| {
            let g: f64 = StandardNormal.sample(&mut rng);
            (g * sigma).round() as i128 + rng.random_range(-dither..=dither)
        })
        .collect();
    let mut raw = RawCiphertext {
        parms_id: like.parms_id,
        ntt: false,
        size: 2,
        degree: n,
        primes: primes.len(),
        scale: 1.0,
        data: vec![0; 2 * primes.len() * n],
    };
    // The noise goes in both polynomials: SEAL refuses to return a
    // ciphertext whose second polynomial is zero ("transparent").
    let k = primes.len();
    for (j, &q) in primes.iter().enumerate() {
        let q = q as i128;
        for (c, &e) in noise.iter().enumerate() {
            let r = e.rem_euclid(q) as u64;
            raw.data[j * n + c] = r;
            raw.data[(k + j) * n + c] = r;
        }
    }
    let seal_ctx = ctx.engine().context();
    let ct = seal::Ciphertext::from_bytes(seal_ctx, &raw.to_bytes()).map_err(seal_err)?;
    let ct = ctx.engine().to_ntt(&ct).map_err(seal_err)?;
    let out = RawCiphertext::parse(&ct.to_bytes().map_err(seal_err)?, n, primes.len())
        .map_err(HeError::Seal)?;
    Ok(out.poly(0).to_vec())
}

/// A bound on the noise of a weighted sum of fresh uploads under a
/// collective key of `parties` parties, in the sum's scaled integer units
/// (coefficient domain), for weights whose absolute values add up to at most
/// `weight_sum`: `2^weight_bits * weight_sum * 16 * sqrt(N * parties)`.
///
/// A fresh public-key encryption is made at the key level and divided by
/// the special prime, which leaves the rounding `r0 + r1 * s` (`|r| <= 1/2`,
/// `s` the sum of `parties` ternary secrets): a standard deviation of about
/// `sqrt(N * parties / 18)`; the bound is 68 such deviations (the encoding's
/// rounding and the encryption errors divided by the special prime are below
/// 1). docs/he.md has the derivation.
pub fn aggregate_noise_bound(params: &CkksParams, parties: usize, weight_sum: f64) -> f64 {
    let n = params.degree() as f64;
    2f64.powi(params.weight_bits() as i32) * weight_sum * 16.0 * (n * parties as f64).sqrt()
}

/// SHA-256 over every coefficient of the aggregate's ciphertexts.
fn digest_of(cts: &[RawCiphertext]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"fedcore-he aggregate v1");
    for ct in cts {
        h.update(ct.parms_id.map(u64::to_le_bytes).concat());
        h.update(ct.scale.to_bits().to_le_bytes());
        for w in &ct.data {
            h.update(w.to_le_bytes());
        }
    }
    h.finalize().into()
}

/// One hospital's key share `p_i = -a * s_i + e_i` (public: it reveals
/// nothing of `s_i` under RLWE).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyShare {
    party: u32,
    crs: Crs,
    poly: Vec<u64>,
}

impl fmt::Debug for KeyShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyShare")
            .field("party", &self.party)
            .field("crs", &self.crs)
            .field("coefficients", &self.poly.len())
            .finish()
    }
}

impl KeyShare {
    /// The party that made it.
    pub fn party(&self) -> u32 {
        self.party
    }

    /// Bytes for the wire: magic, version, party (u32), seed (32 bytes),
    /// coefficient count (u32), the coefficients (u64 each).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(45 + 8 * self.poly.len());
        out.extend_from_slice(KEY_SHARE_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.party.to_le_bytes());
        out.extend_from_slice(&self.crs.0);
        out.extend_from_slice(&(self.poly.len() as u32).to_le_bytes());
        for w in &self.poly {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Parses [`KeyShare::to_bytes`] for `params`: the layout and the length
    /// here, the coefficients against the primes in
    /// [`CollectiveKey::combine`].
    pub fn from_bytes(params: &CkksParams, bytes: &[u8]) -> Result<Self> {
        let bad = |m: &str| HeError::Malformed(format!("key share: {m}"));
        let mut r = Reader::new(bytes);
        if r.take(4).map_err(|_| bad("truncated"))? != KEY_SHARE_MAGIC {
            return Err(bad("not a fedcore-he key share"));
        }
        let version = r.u8().map_err(|_| bad("truncated"))?;
        if version != VERSION {
            return Err(bad(&format!("format version {version}")));
        }
        let party = r.u32().map_err(|_| bad("truncated"))?;
        let crs = Crs(r
            .take(32)
            .map_err(|_| bad("truncated"))?
            .try_into()
            .expect("32 bytes"));
        let count = r.u32().map_err(|_| bad("truncated"))? as usize;
        let expected = params.degree() * params.coeff_bits().len();
        if count != expected {
            return Err(bad(&format!(
                "{count} coefficients, expected {expected} for these parameters"
            )));
        }
        let raw = r
            .take(count * 8)
            .map_err(|_| bad("truncated coefficients"))?;
        if !r.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let poly = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        Ok(Self { party, crs, poly })
    }
}

/// The collective public key `(sum p_i, a)` with the parties it was made
/// from: what the server and every hospital encrypt and add under. Nobody
/// holds its secret.
#[derive(Clone)]
pub struct CollectiveKey {
    ctx: CkksContext<Public>,
    parties: Vec<u32>,
    crs: Crs,
}

impl fmt::Debug for CollectiveKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CollectiveKey")
            .field("parties", &self.parties)
            .field("crs", &self.crs)
            .field("key_id", &hex(&self.ctx.key_id()))
            .finish()
    }
}

impl CollectiveKey {
    /// Adds the key shares of every party into the collective public key.
    /// Every share must be for `crs` and these parameters, with reduced
    /// coefficients, one per party; the server and each hospital can run it
    /// (a hospital checks that its own share is in).
    pub fn combine(params: &CkksParams, crs: &Crs, shares: &[KeyShare]) -> Result<Self> {
        if shares.is_empty() || shares.len() > MAX_PARTIES {
            return Err(HeError::OutOfRange(format!(
                "{} key shares; between 1 and {MAX_PARTIES}",
                shares.len()
            )));
        }
        let ctx = context_for(params)?;
        let n = params.degree();
        let primes = ctx.primes.clone();
        let mut parties: Vec<u32> = Vec::with_capacity(shares.len());
        for s in shares {
            if s.crs != *crs {
                return Err(HeError::Mismatch(format!(
                    "party {}'s key share is for another common random polynomial",
                    s.party
                )));
            }
            if parties.contains(&s.party) {
                return Err(HeError::Mismatch(format!(
                    "two key shares from party {}",
                    s.party
                )));
            }
            check_reduced(
                &s.poly,
                &primes,
                n,
                &format!("party {}'s key share", s.party),
            )?;
            parties.push(s.party);
        }
        let a = crs.expand(&primes, n);
        let mut p0 = vec![0u64; primes.len() * n];
        p0.par_iter_mut().enumerate().for_each(|(i, out)| {
            let q = primes[i / n];
            *out = shares.iter().fold(0, |acc, s| add(acc, s.poly[i], q));
        });
        // A public key is a key-level ciphertext: take the shape (and the
        // key level's parms_id) from a throwaway key of the same context.
        let (_, template) = seal::keygen(&ctx).map_err(seal_err)?;
        let mut pk = RawCiphertext::parse(&template.to_bytes().map_err(seal_err)?, n, primes.len())
            .map_err(HeError::Seal)?;
        pk.poly_mut(0).copy_from_slice(&p0);
        pk.poly_mut(1).copy_from_slice(&a);
        let pk = seal::PublicKey::from_bytes(&ctx, &pk.to_bytes()).map_err(seal_err)?;
        let ctx = CkksContext::from_public_key(params.clone(), ctx, pk)?;
        parties.sort_unstable();
        Ok(Self {
            ctx,
            parties,
            crs: *crs,
        })
    }

    /// The server's (and the hospitals') context under the collective key:
    /// public-key encryption, weighted sums, loading; no decryption.
    pub fn context(&self) -> &CkksContext<Public> {
        &self.ctx
    }

    /// The parties, ascending.
    pub fn parties(&self) -> &[u32] {
        &self.parties
    }

    /// The seed of the common random polynomial.
    pub fn crs(&self) -> Crs {
        self.crs
    }

    fn level_of(&self, ct: &RawCiphertext) -> Result<usize> {
        self.ctx
            .engine()
            .context()
            .level_of(&ct.parms_id)
            .ok_or_else(|| HeError::Mismatch("a ciphertext at an unknown level".into()))
    }

    /// The aggregate's ciphertexts as coefficients, checked to be a sum
    /// under this key.
    fn raw_aggregate(&self, aggregate: &EncryptedVector) -> Result<Vec<RawCiphertext>> {
        if aggregate.key_id != self.ctx.key_id() {
            return Err(HeError::Mismatch(
                "the aggregate is encrypted under another key than the collective one".into(),
            ));
        }
        if aggregate.form != Form::Sum {
            return Err(HeError::Mismatch(
                "only a weighted sum (Form::Sum) is switched".into(),
            ));
        }
        let n = self.ctx.params().degree();
        let k = self.ctx.engine().context().primes.len();
        aggregate
            .cts
            .par_iter()
            .map(|ct| {
                let raw = RawCiphertext::parse(&ct.to_bytes().map_err(seal_err)?, n, k)
                    .map_err(HeError::Seal)?;
                if !raw.ntt {
                    return Err(HeError::Malformed(
                        "an aggregate ciphertext not in NTT form".into(),
                    ));
                }
                Ok(raw)
            })
            .collect()
    }

    /// Combines the switch shares of every party into the aggregate under
    /// `output`'s key: `(c0 + sum h0_i, sum h1_i)`. N-of-N: a missing party
    /// is an error naming it; a share for another aggregate, key or output,
    /// a duplicate, an unknown party or a malformed share is refused with its
    /// reason.
    pub fn switch(
        &self,
        aggregate: &EncryptedVector,
        output: &CkksContext<Public>,
        shares: &[SwitchShare],
    ) -> Result<EncryptedVector> {
        let cipher = self.raw_aggregate(aggregate)?;
        let digest = digest_of(&cipher);
        let mut seen: Vec<u32> = Vec::with_capacity(shares.len());
        for s in shares {
            if !self.parties.contains(&s.party) {
                return Err(HeError::Mismatch(format!(
                    "a switch share from party {}, which is not in the collective key",
                    s.party
                )));
            }
            if seen.contains(&s.party) {
                return Err(HeError::Mismatch(format!(
                    "two switch shares from party {}",
                    s.party
                )));
            }
            if s.collective != self.ctx.key_id() {
                return Err(HeError::Mismatch(format!(
                    "party {}'s switch share is for another collective key",
                    s.party
                )));
            }
            if s.output != output.key_id() {
                return Err(HeError::Mismatch(format!(
                    "party {}'s switch share is for another output key",
                    s.party
                )));
            }
            if s.digest != digest {
                return Err(HeError::Mismatch(format!(
                    "party {}'s switch share is for another aggregate",
                    s.party
                )));
            }
            if s.polys.len() != cipher.len() {
                return Err(HeError::Malformed(format!(
                    "party {}'s switch share has {} ciphertexts, the aggregate {}",
                    s.party,
                    s.polys.len(),
                    cipher.len()
                )));
            }
            seen.push(s.party);
        }
        let missing: Vec<u32> = self
            .parties
            .iter()
            .copied()
            .filter(|p| !seen.contains(p))
            .collect();
        if !missing.is_empty() {
            return Err(HeError::Mismatch(format!(
                "the key switch needs every party's share (N-of-N); missing {missing:?}"
            )));
        }
        let n = self.ctx.params().degree();
        let primes = &self.ctx.engine().context().primes;
        let seal_ctx = output.engine().context();
        let cts = cipher
            .par_iter()
            .enumerate()
            .map(|(index, ct)| {
                let k = ct.primes;
                for s in shares {
                    let (h0, h1) = &s.polys[index];
                    let what = format!("party {}'s switch share, ciphertext {index}", s.party);
                    check_reduced(h0, &primes[..k], n, &what)?;
                    check_reduced(h1, &primes[..k], n, &what)?;
                }
                let mut out = ct.clone();
                let c0 = ct.poly(0);
                let (o0, o1) = out.data.split_at_mut(k * n);
                for i in 0..k * n {
                    let q = primes[i / n];
                    let (mut a, mut b) = (c0[i], 0);
                    for s in shares {
                        let (h0, h1) = &s.polys[index];
                        a = add(a, h0[i], q);
                        b = add(b, h1[i], q);
                    }
                    o0[i] = a;
                    o1[i] = b;
                }
                seal::Ciphertext::from_bytes(seal_ctx, &out.to_bytes()).map_err(seal_err)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(EncryptedVector {
            len: aggregate.len,
            form: Form::Sum,
            key_id: output.key_id(),
            cts,
        })
    }
}

/// One hospital's answer to a key switch: `(h0, h1)` per ciphertext, bound
/// to the collective key, the output key and the aggregate.
#[derive(Clone, PartialEq, Eq)]
pub struct SwitchShare {
    party: u32,
    collective: [u8; 16],
    output: [u8; 16],
    digest: [u8; 32],
    polys: Vec<(Vec<u64>, Vec<u64>)>,
}

impl fmt::Debug for SwitchShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SwitchShare")
            .field("party", &self.party)
            .field("ciphertexts", &self.polys.len())
            .finish_non_exhaustive()
    }
}

impl SwitchShare {
    /// The party that made it.
    pub fn party(&self) -> u32 {
        self.party
    }

    /// Bytes for the wire: magic, version, party (u32), collective and
    /// output key ids (16 bytes each), the aggregate's digest (32 bytes),
    /// ciphertext count (u32), coefficients per polynomial (u32), then `h0`
    /// and `h1` of each ciphertext (u64 each).
    pub fn to_bytes(&self) -> Vec<u8> {
        let per = self.polys.first().map_or(0, |(h0, _)| h0.len());
        let mut out = Vec::with_capacity(77 + 16 * per * self.polys.len());
        out.extend_from_slice(SWITCH_SHARE_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.party.to_le_bytes());
        out.extend_from_slice(&self.collective);
        out.extend_from_slice(&self.output);
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&(self.polys.len() as u32).to_le_bytes());
        out.extend_from_slice(&(per as u32).to_le_bytes());
        for (h0, h1) in &self.polys {
            for w in h0.iter().chain(h1) {
                out.extend_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// Parses [`SwitchShare::to_bytes`] for an aggregate under `collective`:
    /// the layout, the ciphertext count (at most [`crate::MAX_VALUES`]
    /// values' worth) and the polynomial length against the parameters here;
    /// the coefficients against the primes in [`CollectiveKey::switch`].
    pub fn from_bytes(collective: &CollectiveKey, bytes: &[u8]) -> Result<Self> {
        let bad = |m: &str| HeError::Malformed(format!("switch share: {m}"));
        let mut r = Reader::new(bytes);
        if r.take(4).map_err(|_| bad("truncated"))? != SWITCH_SHARE_MAGIC {
            return Err(bad("not a fedcore-he switch share"));
        }
        let version = r.u8().map_err(|_| bad("truncated"))?;
        if version != VERSION {
            return Err(bad(&format!("format version {version}")));
        }
        let party = r.u32().map_err(|_| bad("truncated"))?;
        let mut id = || -> Result<[u8; 16]> {
            Ok(r.take(16)
                .map_err(|_| bad("truncated"))?
                .try_into()
                .expect("16 bytes"))
        };
        let (coll, out) = (id()?, id()?);
        let digest: [u8; 32] = r
            .take(32)
            .map_err(|_| bad("truncated"))?
            .try_into()
            .expect("32 bytes");
        let count = r.u32().map_err(|_| bad("truncated"))? as usize;
        let per = r.u32().map_err(|_| bad("truncated"))? as usize;
        let params = collective.ctx.params();
        let max_cts = crate::MAX_VALUES.div_ceil(params.slots());
        if count == 0 || count > max_cts {
            return Err(bad(&format!(
                "{count} ciphertexts; between 1 and {max_cts}"
            )));
        }
        let n = params.degree();
        if per == 0 || !per.is_multiple_of(n) || per / n >= params.coeff_bits().len() {
            return Err(bad(&format!(
                "{per} coefficients per polynomial is not a data level of degree {n}"
            )));
        }
        if r.rest_len() != count * 2 * per * 8 {
            return Err(bad(&format!(
                "{} bytes of coefficients, expected {}",
                r.rest_len(),
                count * 2 * per * 8
            )));
        }
        let mut polys = Vec::with_capacity(count);
        for _ in 0..count {
            let mut poly = || -> Vec<u64> {
                r.take(per * 8)
                    .expect("length checked above")
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect()
            };
            let h0 = poly();
            let h1 = poly();
            polys.push((h0, h1));
        }
        Ok(Self {
            party,
            collective: coll,
            output: out,
            digest,
            polys,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CkksContext;
    use crate::context::Secret;

    const PARTIES: u32 = 3;

    struct Federation {
        params: CkksParams,
        parties: Vec<PartyKey>,
        collective: CollectiveKey,
        output: CkksContext<Secret>,
    }

    fn federation() -> Federation {
        let params = CkksParams::multiparty();
        let parties: Vec<PartyKey> = (1..=PARTIES)
            .map(|i| PartyKey::generate(params.clone(), i).unwrap())
            .collect();
        let crs = Crs::new([7; 32]);
        // Every share crosses the wire.
        let shares: Vec<KeyShare> = parties
            .iter()
            .map(|p| KeyShare::from_bytes(&params, &p.key_share(&crs).unwrap().to_bytes()).unwrap())
            .collect();
        let collective = CollectiveKey::combine(&params, &crs, &shares).unwrap();
        let output = CkksContext::generate(params.clone()).unwrap();
        Federation {
            params,
            parties,
            collective,
            output,
        }
    }

    /// Deterministic values in [-1, 1).
    fn values(seed: u64, len: usize) -> Vec<f64> {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    const WEIGHTS: [f64; 3] = [0.2, 0.3, 0.5];

    /// Each party's upload under the collective key, and the server's
    /// weighted sum of them (through bytes, as over the wire).
    fn round(f: &Federation, len: usize) -> (Vec<Vec<f64>>, Vec<EncryptedVector>, EncryptedVector) {
        let server = f.collective.context();
        let plain: Vec<Vec<f64>> = (0..PARTIES as u64).map(|i| values(i, len)).collect();
        let uploads: Vec<EncryptedVector> = plain
            .iter()
            .map(|v| {
                let bytes = server.encrypt_upload(v).unwrap().to_bytes().unwrap();
                server.load(&bytes, Form::Fresh).unwrap()
            })
            .collect();
        let refs: Vec<&EncryptedVector> = uploads.iter().collect();
        let sum = server.weighted_sum(&refs, &WEIGHTS).unwrap();
        (plain, uploads, sum)
    }

    fn expected(plain: &[Vec<f64>]) -> Vec<f64> {
        (0..plain[0].len())
            .map(|j| plain.iter().zip(WEIGHTS).map(|(v, w)| v[j] * w).sum())
            .collect()
    }

    fn max_error(a: &[f64], b: &[f64]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn shares(f: &Federation, sum: &EncryptedVector) -> Vec<SwitchShare> {
        let out = f.output.public();
        f.parties
            .iter()
            .map(|p| {
                let s = p.switch_share(&f.collective, sum, &out).unwrap();
                SwitchShare::from_bytes(&f.collective, &s.to_bytes()).unwrap()
            })
            .collect()
    }

    /// The coalition of every party but `missing`: the sum of their secrets
    /// as a SEAL secret key under the collective public key.
    fn coalition(f: &Federation, missing: u32) -> CkksContext<Secret> {
        let ctx = f.collective.context().engine().context().clone();
        let primes = &ctx.primes;
        let n = f.params.degree();
        let mut key = f.parties[0].secret().clone();
        key.data.iter_mut().for_each(|w| *w = 0);
        for p in f.parties.iter().filter(|p| p.party() != missing) {
            for (i, w) in key.data.iter_mut().enumerate() {
                *w = add(*w, p.secret().data[i], primes[i / n]);
            }
        }
        let sk = seal::SecretKey::from_bytes(&ctx, &key.to_bytes()).unwrap();
        CkksContext::from_secret_key(
            f.params.clone(),
            ctx,
            f.collective.context().public_key().clone(),
            sk,
        )
        .unwrap()
    }

    #[test]
    fn seal_bytes_round_trip_through_the_raw_forms() {
        let params = CkksParams::multiparty();
        let party = PartyKey::generate(params.clone(), 1).unwrap();
        let ctx = context_for(&params).unwrap();
        let (sk, pk) = seal::keygen(&ctx).unwrap();
        let (n, k) = (params.degree(), ctx.primes.len());
        let sk_bytes = sk.to_bytes().unwrap();
        assert_eq!(
            RawSecretKey::parse(&sk_bytes, n * k).unwrap().to_bytes(),
            sk_bytes
        );
        let pk_bytes = pk.to_bytes().unwrap();
        assert_eq!(
            RawCiphertext::parse(&pk_bytes, n, k).unwrap().to_bytes(),
            pk_bytes
        );
        // Shape errors are reasons, not panics.
        assert!(
            RawCiphertext::parse(&pk_bytes, n / 2, k)
                .unwrap_err()
                .contains("degree")
        );
        assert!(
            RawCiphertext::parse(&pk_bytes[..100], n, k)
                .unwrap_err()
                .contains("header")
        );
        assert!(
            RawSecretKey::parse(&sk_bytes, n)
                .unwrap_err()
                .contains("expected")
        );
        assert_eq!(party.own_public.primes, k);
    }

    #[test]
    fn with_every_share_the_aggregate_decrypts_to_the_weighted_sum() {
        let f = federation();
        assert_eq!(f.collective.parties(), &[1, 2, 3]);
        // Two ciphertexts' worth, the second one partly filled.
        let (plain, _, sum) = round(&f, 5000);
        let switched = f
            .collective
            .switch(&sum, &f.output.public(), &shares(&f, &sum))
            .unwrap();
        // Through bytes, as the hospitals receive it.
        let bytes = switched.to_bytes().unwrap();
        let got = f
            .output
            .decrypt(&f.output.load(&bytes, Form::Sum).unwrap())
            .unwrap();
        let err = max_error(&got, &expected(&plain));
        assert!(err < 1e-6, "max error {err:e}");
        // The collective key itself decrypts nothing for the output key's holder.
        assert!(f.output.decrypt(&sum).is_err());
    }

    #[test]
    fn every_party_but_one_together_with_the_server_cannot_decrypt_an_upload() {
        let f = federation();
        let (plain, uploads, sum) = round(&f, 4096);
        let range = 2.0;
        for missing in 1..=PARTIES {
            let k = (missing - 1) as usize;
            // Their secrets added up decrypt the missing party's upload to noise.
            let attempt = coalition(&f, missing).decrypt(&uploads[k]).unwrap();
            let err = max_error(&attempt, &plain[k]);
            assert!(
                err > 1e3 * range,
                "coalition without {missing}: error only {err:e}"
            );
            // The switch refuses to run without the missing party's share...
            let mut some = shares(&f, &sum);
            some.retain(|s| s.party != missing);
            let e = f
                .collective
                .switch(&sum, &f.output.public(), &some)
                .unwrap_err();
            assert!(
                e.to_string().contains(&format!("missing [{missing}]")),
                "{e}"
            );
            // ...and a zero share in its place leaves noise for the output key.
            let template = some[0].clone();
            let zeros = template
                .polys
                .iter()
                .map(|(h0, h1)| (vec![0; h0.len()], vec![0; h1.len()]))
                .collect();
            some.push(SwitchShare {
                party: missing,
                polys: zeros,
                ..template
            });
            let forged = f
                .collective
                .switch(&sum, &f.output.public(), &some)
                .unwrap();
            let got = f.output.decrypt(&forged).unwrap();
            let err = max_error(&got, &expected(&plain));
            assert!(
                err > 1e3 * range,
                "switch without {missing}: error only {err:e}"
            );
        }
        // With every secret the upload does decrypt: the attack above failed
        // for want of one share, not for a broken key.
        let all = coalition(&f, 0).decrypt(&uploads[0]).unwrap();
        assert!(max_error(&all, &plain[0]) < 1e-6);
    }

    #[test]
    fn malformed_or_foreign_shares_are_refused_with_a_reason() {
        let f = federation();
        let (_, uploads, sum) = round(&f, 100);
        let out = f.output.public();
        let good = shares(&f, &sum);
        let err = |shares: &[SwitchShare]| {
            f.collective
                .switch(&sum, &out, shares)
                .unwrap_err()
                .to_string()
        };
        // Bytes: truncated, wrong magic, trailing, wrong lengths.
        let bytes = good[0].to_bytes();
        for (cut, why) in [
            (&bytes[..bytes.len() - 1], "bytes of coefficients"),
            (&bytes[..50], "truncated"),
            (&bytes[4..], "not a fedcore-he switch share"),
        ] {
            let e = SwitchShare::from_bytes(&f.collective, cut)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{e}");
        }
        let mut long = bytes.clone();
        long.extend_from_slice(&[0; 8]);
        assert!(SwitchShare::from_bytes(&f.collective, &long).is_err());
        // An unreduced coefficient.
        let mut bad = good.clone();
        bad[1].polys[0].0[5] = u64::MAX;
        assert!(err(&bad).contains(
            "party 2's switch share, ciphertext 0: coefficient 5 of prime 0 is not reduced"
        ));
        // A share for another aggregate.
        let other = f
            .collective
            .context()
            .weighted_sum(&[&uploads[0], &uploads[1]], &[0.5, 0.5])
            .unwrap();
        let mut mixed = good.clone();
        mixed[2] = f.parties[2]
            .switch_share(&f.collective, &other, &out)
            .unwrap();
        assert!(err(&mixed).contains("party 3's switch share is for another aggregate"));
        // A share for another output key.
        let elsewhere = CkksContext::generate(f.params.clone()).unwrap().public();
        let mut mixed = good.clone();
        mixed[0] = f.parties[0]
            .switch_share(&f.collective, &sum, &elsewhere)
            .unwrap();
        assert!(err(&mixed).contains("party 1's switch share is for another output key"));
        // Duplicates and strangers.
        let mut dup = good.clone();
        dup[1] = good[0].clone();
        assert!(err(&dup).contains("two switch shares from party 1"));
        let stranger = PartyKey::generate(f.params.clone(), 9).unwrap();
        assert!(
            stranger
                .switch_share(&f.collective, &sum, &out)
                .unwrap_err()
                .to_string()
                .contains("not in the collective key")
        );
        // Only a sum under the collective key is switched.
        let e = f.parties[0]
            .switch_share(&f.collective, &uploads[0], &out)
            .unwrap_err();
        assert!(e.to_string().contains("only a weighted sum"), "{e}");
        // Key shares: another common random polynomial, a duplicate,
        // unreduced coefficients, bad bytes.
        let crs = f.collective.crs();
        let ks: Vec<KeyShare> = f
            .parties
            .iter()
            .map(|p| p.key_share(&crs).unwrap())
            .collect();
        let mut wrong = ks.clone();
        wrong[1] = f.parties[1].key_share(&Crs::new([8; 32])).unwrap();
        let e = CollectiveKey::combine(&f.params, &crs, &wrong)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("party 2's key share is for another common random polynomial"),
            "{e}"
        );
        let mut dup = ks.clone();
        dup[2] = ks[0].clone();
        assert!(
            CollectiveKey::combine(&f.params, &crs, &dup)
                .unwrap_err()
                .to_string()
                .contains("two key shares from party 1")
        );
        let mut unreduced = ks.clone();
        unreduced[0].poly[3] = u64::MAX;
        assert!(
            CollectiveKey::combine(&f.params, &crs, &unreduced)
                .unwrap_err()
                .to_string()
                .contains("not reduced")
        );
        let bytes = ks[0].to_bytes();
        assert!(
            KeyShare::from_bytes(&f.params, &bytes[..bytes.len() - 8])
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        assert!(
            KeyShare::from_bytes(&CkksParams::default(), &bytes)
                .unwrap_err()
                .to_string()
                .contains("expected")
        );
        // The same parties recombine to the same key (a hospital's check).
        let again = CollectiveKey::combine(&f.params, &crs, &ks).unwrap();
        assert_eq!(again.context().key_id(), f.collective.context().key_id());
    }
}
