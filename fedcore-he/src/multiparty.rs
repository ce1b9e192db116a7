//! Multiparty CKKS without a dealer: no single party, and no coalition that
//! lacks one hospital, can decrypt a hospital's upload.
//!
//! Mouchet, Troncoso-Pastoriza, Bossuat and Hubaux, "Multiparty Homomorphic
//! Encryption from Ring-Learning-with-Errors" (PoPETs 2021), N-of-N:
//!
//! 1. **Collective key generation (CKG).** Each hospital `i` draws its own
//!    secret `s_i` ([`PartyKey::generate`]) and publishes a key share
//!    `p_i = -(a * s_i + e_i)` ([`PartyKey::key_share`]), where `a` is a
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
//! **Threshold t-of-N** (Mouchet, Bertrand and Hubaux, "An Efficient
//! Threshold Access-Structure for RLWE-Based Multiparty Homomorphic
//! Encryption", ePrint 2022/780, with Shamir shares): each hospital
//! Shamir-shares its `s_i` among a [`Roster`] ([`PartyKey::deal`]; each
//! [`Deal`] sealed to its recipient's X25519 key, so the server relays them
//! blind once the hospitals have compared [`Roster::fingerprint`]) and sums
//! the shares it receives into a
//! [`ThresholdKey`] ([`PartyKey::threshold_key`]), a Shamir share of `s`.
//! Any `t` of them answer a switch ([`ThresholdKey::switch_share`]) with
//! their share weighted by its Lagrange coefficient within the signing set
//! the server names, so the round completes when up to `N - t` hospitals
//! have dropped out before the key switch.
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
//! the coefficients travel through SEAL's byte format (module `raw`) and
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
use crate::raw::{self, RawCiphertext, RawSecretKey};
use crate::reader::Reader;
use crate::seal;
use crate::vector::{EncryptedVector, Form};

mod distance;
mod relin;

pub use distance::{
    DEFAULT_DISTANCE_BOUND, DistanceRequest, DistanceShare, Distances, distance_error,
    distance_noise_bound,
};
pub(crate) use distance::{distance_step_bytes, is_distance_step, parse_distance_step};
pub use relin::RelinShare;

/// The statistical security of the smudging noise, in bits: the switched
/// aggregate's distribution is within `2^-(SMUDGING_BITS + 1)` of one that
/// does not depend on the aggregate's noise, per ciphertext.
pub const SMUDGING_BITS: u32 = 40;

/// The most parties a collective key may have.
pub const MAX_PARTIES: usize = 1024;

const KEY_SHARE_MAGIC: &[u8; 4] = b"FCKS";
const SWITCH_SHARE_MAGIC: &[u8; 4] = b"FCSW";
/// Switch shares pack their residues since version 2 (they are not kept,
/// so version 1 is not read).
const SWITCH_SHARE_VERSION: u8 = 2;
pub(crate) const VERSION: u8 = 1;

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

const PARTY_FILE_MAGIC: &[u8; 4] = b"FCPK";
const THRESHOLD_FILE_MAGIC: &[u8; 4] = b"FCTK";

/// Appends `bytes` with its length (u32).
fn push_sized(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// The range of a weight-sum bound ([`PartyKey::with_weight_sum`]).
fn check_weight_sum(bound: f64) -> std::result::Result<(), String> {
    if (1.0..=1_048_576.0).contains(&bound) {
        Ok(())
    } else {
        Err(format!("weight sum bound {bound} is not in [1, 2^20]"))
    }
}

/// A key file's common head: magic, version, parameters (JSON, sized),
/// party, weight-sum bound.
fn file_head(magic: &[u8; 4], params: &CkksParams, party: u32, weight_sum: f64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(magic);
    out.push(VERSION);
    let json = serde_json::to_vec(params)
        .map_err(|e| HeError::Seal(format!("parameters to JSON: {e}")))?;
    push_sized(&mut out, &json);
    out.extend_from_slice(&party.to_le_bytes());
    out.extend_from_slice(&weight_sum.to_le_bytes());
    Ok(out)
}

/// Checks an object's magic and format version; `what` names the object
/// in the error.
pub(crate) fn expect_magic(
    r: &mut Reader<'_>,
    magic: &[u8; 4],
    what: &str,
    bad: &dyn Fn(&str) -> HeError,
) -> Result<()> {
    expect_version(r, magic, VERSION, what, bad)
}

/// [`expect_magic`] for an object at another format version than the rest.
fn expect_version(
    r: &mut Reader<'_>,
    magic: &[u8; 4],
    want: u8,
    what: &str,
    bad: &dyn Fn(&str) -> HeError,
) -> Result<()> {
    if r.take(4).map_err(|_| bad("truncated"))? != magic {
        return Err(bad(&format!("not {what}")));
    }
    let version = r.u8().map_err(|_| bad("truncated"))?;
    if version != want {
        return Err(bad(&format!("format version {version}")));
    }
    Ok(())
}

/// Little-endian words, appended.
fn push_words(out: &mut Vec<u8>, words: &[u64]) {
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Reads a key file's head: checks the magic and version, parses and checks
/// the parameters and the weight-sum bound; returns them with the party.
fn read_head<'a>(
    r: &mut Reader<'a>,
    magic: &[u8; 4],
    bad: &dyn Fn(&str) -> HeError,
) -> Result<(CkksParams, u32, f64)> {
    expect_magic(r, magic, "a key file of this kind", bad)?;
    let json = sized(r, bad)?;
    let params: CkksParams =
        serde_json::from_slice(json).map_err(|e| bad(&format!("parameters: {e}")))?;
    params
        .check()
        .map_err(|e| bad(&format!("parameters: {e}")))?;
    let party = r.u32().map_err(|_| bad("truncated"))?;
    let weight_sum = f64::from_bits(r.u64().map_err(|_| bad("truncated"))?);
    check_weight_sum(weight_sum).map_err(|e| bad(&e))?;
    Ok((params, party, weight_sum))
}

fn sized<'a>(r: &mut Reader<'a>, bad: &dyn Fn(&str) -> HeError) -> Result<&'a [u8]> {
    let n = r.u32().map_err(|_| bad("truncated"))? as usize;
    r.take(n).map_err(|_| bad("truncated"))
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
    if let Some((_, j, c)) = raw::unreduced(data, primes, degree) {
        return Err(HeError::Malformed(format!(
            "{what}: coefficient {c} of prime {j} is not reduced"
        )));
    }
    Ok(())
}

fn seal_err(e: seal::SealFailure) -> HeError {
    HeError::Seal(e.to_string())
}

/// A hospital's secret share `s_i` of the collective key. It can make a
/// key share and answer a key switch; it has no decryption method, and
/// there is no way to combine it with another party's.
#[derive(Clone)]
pub struct PartyKey {
    params: CkksParams,
    ctx: Arc<seal::Context>,
    party: u32,
    /// `s_i`: NTT form, every prime of the key level.
    secret: RawSecretKey,
    /// The X25519 key that deals ([`Deal`]) are sealed to.
    transport: x25519_dalek::StaticSecret,
    weight_sum: f64,
    /// The largest squared distance its distance shares smudge for (not
    /// written to its file).
    distance_bound: f64,
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
        let (sk, _) = seal::keygen(&ctx).map_err(seal_err)?;
        let n = params.degree();
        let k = ctx.primes.len();
        let secret =
            RawSecretKey::parse(&sk.to_bytes().map_err(seal_err)?, n * k).map_err(HeError::Seal)?;
        let transport = x25519_dalek::StaticSecret::from(secure_rng()?.random::<[u8; 32]>());
        Ok(Self {
            params,
            ctx,
            party,
            secret,
            transport,
            weight_sum: 1.0,
            distance_bound: DEFAULT_DISTANCE_BOUND,
        })
    }

    /// This party's number.
    pub fn party(&self) -> u32 {
        self.party
    }

    /// The bound on the weights' absolute sum it smudges for.
    pub fn weight_sum(&self) -> f64 {
        self.weight_sum
    }

    /// The parameters.
    pub fn params(&self) -> &CkksParams {
        &self.params
    }

    /// Writes this secret share to `path` (mode 0600; an existing file is
    /// an error, never overwritten): a hospital keeps it across restarts.
    /// Layout: magic `FCPK`, version, parameters (JSON), party, weight-sum
    /// bound, transport secret, SEAL's secret key (sized).
    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        let mut out = file_head(PARTY_FILE_MAGIC, &self.params, self.party, self.weight_sum)?;
        out.extend_from_slice(self.transport.as_bytes());
        push_sized(&mut out, &self.secret.to_bytes());
        crate::context::write_new(path, &out)
    }

    /// Reads a secret share written by [`PartyKey::write`]. The file must
    /// not be readable by group or others; every part is checked (the keys
    /// through SEAL's validation against the parameters).
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        crate::context::check_private(path)?;
        let bytes = crate::context::read_key_file(path)?;
        let bad = |m: &str| crate::context::key_err(path, m.to_owned());
        let mut r = Reader::new(&bytes);
        let (params, party, weight_sum) = read_head(&mut r, PARTY_FILE_MAGIC, &bad)?;
        let transport: [u8; 32] = r
            .take(32)
            .map_err(|_| bad("truncated"))?
            .try_into()
            .expect("32 bytes");
        let secret = sized(&mut r, &bad)?;
        if !r.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let ctx = context_for(&params)?;
        let (n, k) = (params.degree(), ctx.primes.len());
        seal::SecretKey::from_bytes(&ctx, secret).map_err(|e| bad(&format!("secret key: {e}")))?;
        let secret = RawSecretKey::parse(secret, n * k).map_err(|e| bad(&e))?;
        Ok(Self {
            params,
            ctx,
            party,
            secret,
            transport: x25519_dalek::StaticSecret::from(transport),
            weight_sum,
            distance_bound: DEFAULT_DISTANCE_BOUND,
        })
    }

    /// Sets the bound on the sum of the absolute weights of the aggregates
    /// this party will switch (1 by default: a weighted mean). The smudging
    /// noise grows with it, in `[1, 2^20]`.
    pub fn with_weight_sum(mut self, bound: f64) -> Result<Self> {
        check_weight_sum(bound).map_err(HeError::OutOfRange)?;
        self.weight_sum = bound;
        Ok(self)
    }

    /// This party's key share `p_i = -(a * s_i + e_i)` for the common
    /// random polynomial of `crs`. The error `e_i` is SEAL's (a clipped
    /// normal of deviation 3.19, at most 19 in magnitude), drawn from
    /// ChaCha20 keyed by this party's secret and the seed: asked again for
    /// the same seed, a party gives the same share (averaging several shares
    /// for one `a` would wear the error down), and for another seed an
    /// independent error (one error for two seeds would give `s_i` away by
    /// one division).
    pub fn key_share(&self, crs: &Crs) -> Result<KeyShare> {
        let n = self.params.degree();
        let primes = &self.ctx.primes;
        let a = crs.expand(primes, n);
        let e = self.share_error(crs)?;
        let s = &self.secret.data;
        let poly = (0..primes.len() * n)
            .into_par_iter()
            .map(|i| {
                let q = primes[i / n];
                sub(0, add(mul(a[i], s[i], q), e[i], q), q)
            })
            .collect();
        Ok(KeyShare {
            party: self.party,
            crs: *crs,
            poly,
        })
    }

    /// The key share's error for `crs`, in the NTT domain of every prime of
    /// the key level. SEAL transforms only data-level ciphertexts, and the
    /// key level's last prime is in no data level; a second context whose
    /// modulus is the same primes plus one more has them all at its first
    /// level (SEAL's NTT tables depend only on the degree and the prime;
    /// the primes are checked to be the same).
    fn share_error(&self, crs: &Crs) -> Result<Vec<u64>> {
        let n = self.params.degree();
        let primes = &self.ctx.primes;
        let mut h = Sha256::new();
        h.update(b"fedcore-he key share error v1");
        for w in &self.secret.data {
            h.update(w.to_le_bytes());
        }
        h.update(crs.0);
        let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
        KeyNtt::new(&self.params, primes)?.ntt(&key_error(&mut rng, n))
    }

    /// The standard deviation of the smudging noise for this party's
    /// parameters and weight-sum bound: `2^SMUDGING_BITS * sqrt(N)` times
    /// the bound [`aggregate_noise_bound`] on the aggregate's own noise.
    pub fn smudging_sigma(&self, parties: usize) -> f64 {
        smudging_sigma(&self.params, parties, self.weight_sum)
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
        self.answer().switch_share(collective, aggregate, output)
    }

    fn answer(&self) -> Answer<'_> {
        Answer {
            params: &self.params,
            primes: &self.ctx.primes,
            party: self.party,
            secret: &self.secret.data,
            weight_sum: self.weight_sum,
            distance_bound: self.distance_bound,
            signers: Vec::new(),
        }
    }

    /// The secret polynomial, for the tests' coalition attacks only.
    #[cfg(test)]
    pub(crate) fn secret(&self) -> &RawSecretKey {
        &self.secret
    }
}

fn smudging_sigma(params: &CkksParams, parties: usize, weight_sum: f64) -> f64 {
    let b = aggregate_noise_bound(params, parties, weight_sum);
    2f64.powi(SMUDGING_BITS as i32) * (params.degree() as f64).sqrt() * b
}

/// The largest standard deviation of the smudging's error per value that a
/// switch may add: 2^-22, about 2.4e-7 (a switched sum of the head stays
/// within 1e-6; a 7M-value one reaches about 5.3 deviations at the limit).
/// With [`CkksParams::multiparty`] the error is about `P * W * 2^-26.5` for
/// `P` parties and a weight-sum bound `W`: up to 22 parties at `W = 1`.
pub const MAX_SWITCH_ERROR: f64 = 1.0 / (1u64 << 22) as f64;

/// The standard deviation of the error `signers` smudged shares add to each
/// value of a switched sum: `sigma * sqrt(signers * N) / 2^(scale + weight bits)`.
pub fn switch_error(params: &CkksParams, parties: usize, signers: usize, weight_sum: f64) -> f64 {
    let sigma = smudging_sigma(params, parties, weight_sum);
    let scale = 2f64.powi((params.scale_bits() + params.weight_bits()) as i32);
    sigma * ((signers * params.degree()) as f64).sqrt() / scale
}

/// Refuses parameters under which the smudging would drown the values
/// ([`MAX_SWITCH_ERROR`]), naming the way out.
pub(crate) fn check_switch_error(
    params: &CkksParams,
    parties: usize,
    weight_sum: f64,
) -> Result<()> {
    let e = switch_error(params, parties, parties, weight_sum);
    if e > MAX_SWITCH_ERROR {
        return Err(HeError::InvalidParameters(format!(
            "with {parties} parties and a weight sum up to {weight_sum}, the key switch's smudging adds an error of {e:.1e} per value (at most {MAX_SWITCH_ERROR:.1e}); use CkksParams::multiparty() or a larger scale"
        )));
    }
    Ok(())
}

/// What a key-switch answer needs: the party's secret (its additive share,
/// or its Lagrange-weighted Shamir share) and who else signs.
struct Answer<'a> {
    params: &'a CkksParams,
    primes: &'a [u64],
    party: u32,
    secret: &'a [u64],
    weight_sum: f64,
    distance_bound: f64,
    /// Empty for N-of-N; the signing set of a threshold switch.
    signers: Vec<u32>,
}

impl Answer<'_> {
    fn switch_share(
        &self,
        collective: &CollectiveKey,
        aggregate: &EncryptedVector,
        output: &CkksContext<Public>,
    ) -> Result<SwitchShare> {
        if collective.ctx.params() != self.params || output.params() != self.params {
            return Err(HeError::Mismatch(
                "the collective or output key has other parameters".into(),
            ));
        }
        check_switch_error(self.params, collective.parties.len(), self.weight_sum)?;
        let cipher = collective.raw_aggregate(aggregate)?;
        let digest = digest_of(&cipher);
        let n = self.params.degree();
        let primes = self.primes;
        let sigma = smudging_sigma(self.params, collective.parties.len(), self.weight_sum);
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
                let (c1, s) = (ct.poly(1), self.secret);
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
        let k = cipher.first().map_or(0, |c| c.primes);
        Ok(SwitchShare {
            party: self.party,
            collective: collective.ctx.key_id(),
            output: output.key_id(),
            digest,
            signers: self.signers.clone(),
            polys,
            widths: raw::widths(&primes[..k]),
        })
    }

    /// A 32-byte seed only this party can compute, the same every time for
    /// the same aggregate, keys and signers.
    fn keyed_seed(&self, digest: &[u8; 32], collective: [u8; 16], output: [u8; 16]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"fedcore-he key-switch smudging v1");
        for w in self.secret {
            h.update(w.to_le_bytes());
        }
        h.update(digest);
        h.update(collective);
        h.update(output);
        for p in &self.signers {
            h.update(p.to_le_bytes());
        }
        h.finalize().into()
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
    to_ntt(ctx.engine(), like.parms_id, primes, &noise)
}

/// SEAL's key error: `n` integers from a normal of deviation 3.19 clipped at
/// 19 in magnitude.
fn key_error(rng: &mut ChaCha20Rng, n: usize) -> Vec<i128> {
    (0..n)
        .map(|_| {
            loop {
                let x: f64 = StandardNormal.sample(rng);
                let x = (x * 3.19).round();
                if x.abs() <= 19.0 {
                    break x as i128;
                }
            }
        })
        .collect()
}

/// The NTT of integer polynomials over every prime of the key level. SEAL
/// transforms only data-level ciphertexts, and the key level's last prime is
/// in no data level; a second context whose modulus is the same primes plus
/// one more has them all at its first level (SEAL's NTT tables depend only
/// on the degree and the prime; the primes are checked to be the same).
struct KeyNtt {
    engine: seal::Engine,
    parms_id: seal::ParmsId,
    primes: Vec<u64>,
}

impl KeyNtt {
    fn new(params: &CkksParams, primes: &[u64]) -> Result<Self> {
        // One more prime of a size the parameters do not use, so that SEAL
        // picks the same primes for the sizes they do.
        let mut bits = params.coeff_bits().to_vec();
        let extra = (20..=60)
            .rev()
            .find(|b| !bits.contains(b))
            .expect("at most 41 distinct prime sizes are in use");
        bits.push(extra);
        let aux = Arc::new(
            seal::Context::new(params.degree(), &bits, seal::SEC_NONE)
                .map_err(HeError::InvalidParameters)?,
        );
        if aux.primes[..primes.len()] != primes[..] {
            return Err(HeError::Seal(
                "SEAL chose other primes for the key level's NTT".into(),
            ));
        }
        let parms_id = aux.levels[0].parms_id;
        let engine = seal::Engine::new(aux, None, None).map_err(seal_err)?;
        Ok(Self {
            engine,
            parms_id,
            primes: primes.to_vec(),
        })
    }

    /// `coeffs` in the NTT domain of every prime of the key level.
    fn ntt(&self, coeffs: &[i128]) -> Result<Vec<u64>> {
        to_ntt(&self.engine, self.parms_id, &self.primes, coeffs)
    }
}

/// An integer polynomial (coefficient domain) in the NTT domain of each of
/// `primes`, by SEAL's `engine` at the level `parms_id` (which must hold
/// exactly those primes): a coefficient-form ciphertext is loaded through
/// SEAL's validation, transformed, and its first polynomial read back.
fn to_ntt(
    engine: &seal::Engine,
    parms_id: seal::ParmsId,
    primes: &[u64],
    coeffs: &[i128],
) -> Result<Vec<u64>> {
    let (n, k) = (coeffs.len(), primes.len());
    let mut raw = RawCiphertext {
        parms_id,
        ntt: false,
        size: 2,
        degree: n,
        primes: k,
        scale: 1.0,
        data: vec![0; 2 * k * n],
    };
    // In both polynomials: SEAL refuses to return a ciphertext whose second
    // polynomial is zero ("transparent").
    for (j, &q) in primes.iter().enumerate() {
        for (c, &e) in coeffs.iter().enumerate() {
            let r = e.rem_euclid(q as i128) as u64;
            raw.data[j * n + c] = r;
            raw.data[(k + j) * n + c] = r;
        }
    }
    let ct = seal::Ciphertext::from_bytes(engine.context(), &raw.to_bytes()).map_err(seal_err)?;
    let ct = engine.to_ntt(&ct).map_err(seal_err)?;
    let out =
        RawCiphertext::parse(&ct.to_bytes().map_err(seal_err)?, n, k).map_err(HeError::Seal)?;
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

/// One hospital's key share `p_i = -(a * s_i + e_i)` (public: it reveals
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
        push_words(&mut out, &self.poly);
        out
    }

    /// Parses [`KeyShare::to_bytes`] for `params`: the layout and the length
    /// here, the coefficients against the primes in
    /// [`CollectiveKey::combine`].
    pub fn from_bytes(params: &CkksParams, bytes: &[u8]) -> Result<Self> {
        let bad = |m: &str| HeError::Malformed(format!("key share: {m}"));
        let mut r = Reader::new(bytes);
        expect_magic(&mut r, KEY_SHARE_MAGIC, "a fedcore-he key share", &bad)?;
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
        Ok(Self {
            party,
            crs,
            poly: bytes_to_words(raw),
        })
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
    /// Set by [`CollectiveKey::with_roster`]: t-of-N switches allowed.
    roster: Option<Roster>,
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
        check_switch_error(params, shares.len(), 1.0)?;
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
        // Sums under it are written exactly: the key switch's request must
        // be the very sum the server switches (its digest binds the
        // shares), and the rounding's noise is sized for one ternary key,
        // not a sum of them.
        let ctx = CkksContext::from_public_key(params.clone(), ctx, pk)?.with_sum_rounding(None);
        parties.sort_unstable();
        Ok(Self {
            ctx,
            parties,
            crs: *crs,
            roster: None,
        })
    }

    /// Allows threshold switches: any `roster.threshold()` of the parties,
    /// each answering with its [`ThresholdKey`]. The roster must name exactly
    /// this key's parties.
    pub fn with_roster(mut self, roster: Roster) -> Result<Self> {
        let members: Vec<u32> = roster.members.iter().map(|m| m.0).collect();
        if members != self.parties {
            return Err(HeError::Mismatch(format!(
                "the roster names parties {members:?}, the collective key {:?}",
                self.parties
            )));
        }
        self.roster = Some(roster);
        Ok(self)
    }

    /// The roster of threshold switches, if set.
    pub fn roster(&self) -> Option<&Roster> {
        self.roster.as_ref()
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

    /// Who must have answered: every party for N-of-N shares; for threshold
    /// shares, the signing set they all name, at least the threshold and
    /// within the roster.
    fn signers_of<S: Signed>(&self, shares: &[S]) -> Result<Vec<u32>> {
        let Some(first) = shares.first() else {
            return Err(HeError::Mismatch("no share".into()));
        };
        if first.signers().is_empty() {
            if let Some(s) = shares.iter().find(|s| !s.signers().is_empty()) {
                return Err(HeError::Mismatch(format!(
                    "party {}'s threshold share mixed with N-of-N shares",
                    s.party()
                )));
            }
            return Ok(self.parties.clone());
        }
        let Some(roster) = &self.roster else {
            return Err(HeError::Mismatch(
                "threshold shares for a collective key without a roster".into(),
            ));
        };
        if let Some(s) = shares.iter().find(|s| s.signers() != first.signers()) {
            return Err(HeError::Mismatch(format!(
                "party {}'s share names signers {:?}, party {}'s {:?}",
                s.party(),
                s.signers(),
                first.party(),
                first.signers()
            )));
        }
        roster.check_signers(first.signers())?;
        Ok(first.signers().to_vec())
    }

    /// Combines the switch shares into the aggregate under `output`'s key:
    /// `(c0 + sum h0_i, sum h1_i)`. N-of-N shares ([`PartyKey`]) need every
    /// party; threshold shares ([`ThresholdKey`], with a roster set) need
    /// every signer they name, at least the threshold. A missing party is an
    /// error naming it; a share for another aggregate, key, output or
    /// signing set, a duplicate, an unknown party or a malformed share is
    /// refused with its reason.
    pub fn switch(
        &self,
        aggregate: &EncryptedVector,
        output: &CkksContext<Public>,
        shares: &[SwitchShare],
    ) -> Result<EncryptedVector> {
        let cipher = self.raw_aggregate(aggregate)?;
        let digest = digest_of(&cipher);
        let signers = self.signers_of(shares)?;
        let mut seen: Vec<u32> = Vec::with_capacity(shares.len());
        for s in shares {
            if !signers.contains(&s.party) {
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
        check_complete(&signers, &seen, shares, "the key switch needs")?;
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
            packing: output.packing_of(Form::Sum),
            slot_packing: aggregate.slot_packing,
        })
    }
}

/// An error naming the `signers` whose share is not among those `seen`
/// (`needs` says what: "the key switch needs").
fn check_complete<S: Signed>(
    signers: &[u32],
    seen: &[u32],
    shares: &[S],
    needs: &str,
) -> Result<()> {
    let missing: Vec<u32> = signers
        .iter()
        .copied()
        .filter(|p| !seen.contains(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(HeError::Mismatch(
        if shares.iter().all(|s| s.signers().is_empty()) {
            format!("{needs} every party's share (N-of-N); missing {missing:?}")
        } else {
            format!("the signers {signers:?} named a share from each; missing {missing:?}")
        },
    ))
}

/// A share answered by one party, alone (N-of-N: no signers named) or
/// within a signing set.
trait Signed {
    fn party(&self) -> u32;
    fn signers(&self) -> &[u32];
}

impl Signed for SwitchShare {
    fn party(&self) -> u32 {
        self.party
    }
    fn signers(&self) -> &[u32] {
        &self.signers
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
    /// Empty for an N-of-N share; the signing set of a threshold one.
    signers: Vec<u32>,
    polys: Vec<(Vec<u64>, Vec<u64>)>,
    /// The bits of each prime at the aggregate's level: the packed width
    /// of its residues on the wire.
    widths: Vec<u32>,
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

    /// The signing set of a threshold share (empty for N-of-N).
    pub fn signers(&self) -> &[u32] {
        &self.signers
    }

    /// Bytes for the wire: magic, version, party (u32), collective and
    /// output key ids (16 bytes each), the aggregate's digest (32 bytes),
    /// signer count (u32) and signers (u32 each), ciphertext count (u32),
    /// coefficients per polynomial (u32), then `h0` and `h1` of each
    /// ciphertext, each residue in its prime's bit width (as
    /// [`EncryptedVector::to_bytes`] packs them).
    pub fn to_bytes(&self) -> Vec<u8> {
        let per = self.polys.first().map_or(0, |(h0, _)| h0.len());
        let bits: usize = self.widths.iter().map(|&b| b as usize).sum();
        let n = per / self.widths.len().max(1);
        let mut out = Vec::with_capacity(77 + 2 * n * bits / 8 * self.polys.len());
        out.extend_from_slice(SWITCH_SHARE_MAGIC);
        out.push(SWITCH_SHARE_VERSION);
        out.extend_from_slice(&self.party.to_le_bytes());
        out.extend_from_slice(&self.collective);
        out.extend_from_slice(&self.output);
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&(self.signers.len() as u32).to_le_bytes());
        for p in &self.signers {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out.extend_from_slice(&(self.polys.len() as u32).to_le_bytes());
        out.extend_from_slice(&(per as u32).to_le_bytes());
        for (h0, h1) in &self.polys {
            raw::pack_words(&mut out, h0, n, &self.widths);
            raw::pack_words(&mut out, h1, n, &self.widths);
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
        expect_version(
            &mut r,
            SWITCH_SHARE_MAGIC,
            SWITCH_SHARE_VERSION,
            "a fedcore-he switch share",
            &bad,
        )?;
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
        let signer_count = r.u32().map_err(|_| bad("truncated"))? as usize;
        if signer_count > MAX_PARTIES {
            return Err(bad(&format!(
                "{signer_count} signers; at most {MAX_PARTIES}"
            )));
        }
        let signers = (0..signer_count)
            .map(|_| r.u32().map_err(|_| bad("truncated")))
            .collect::<Result<Vec<u32>>>()?;
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
        let primes = &collective.ctx.engine().context().primes[..per / n];
        let packed = raw::packed_len(1, n, primes);
        if r.rest_len() != count * 2 * packed {
            return Err(bad(&format!(
                "{} bytes of coefficients, expected {}",
                r.rest_len(),
                count * 2 * packed
            )));
        }
        let mut polys = Vec::with_capacity(count);
        for c in 0..count {
            let mut poly = |h: &str| {
                raw::unpack_words(r.take(packed).expect("length checked above"), 1, n, primes)
                    .map_err(|e| bad(&format!("ciphertext {c}, {h}: {e}")))
            };
            let h0 = poly("h0")?;
            let h1 = poly("h1")?;
            polys.push((h0, h1));
        }
        Ok(Self {
            party,
            collective: coll,
            output: out,
            digest,
            signers,
            polys,
            widths: raw::widths(primes),
        })
    }
}

/// Who holds a threshold key and how many must answer a switch: each
/// member's party number and transport public key ([`PartyKey::transport_key`]),
/// and the threshold `t`. Every member and the server build the same roster
/// (the server publishes it with the seed).
#[derive(Clone, PartialEq, Eq)]
pub struct Roster {
    threshold: usize,
    /// Sorted by party.
    members: Vec<(u32, [u8; 32])>,
}

impl fmt::Debug for Roster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Roster")
            .field("threshold", &self.threshold)
            .field(
                "parties",
                &self.members.iter().map(|m| m.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Roster {
    /// `threshold` of the `members` (party, transport key) must answer;
    /// `1 <= threshold <= members <= MAX_PARTIES`, parties distinct.
    pub fn new(threshold: usize, mut members: Vec<(u32, [u8; 32])>) -> Result<Self> {
        members.sort_unstable_by_key(|m| m.0);
        if members.is_empty() || members.len() > MAX_PARTIES {
            return Err(HeError::OutOfRange(format!(
                "{} members; between 1 and {MAX_PARTIES}",
                members.len()
            )));
        }
        if !(1..=members.len()).contains(&threshold) {
            return Err(HeError::OutOfRange(format!(
                "threshold {threshold} of {} members",
                members.len()
            )));
        }
        if let Some(w) = members.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(HeError::Mismatch(format!(
                "party {} twice in the roster",
                w[0].0
            )));
        }
        Ok(Self { threshold, members })
    }

    /// SHA-256 of the roster (threshold, parties, transport keys), in hex:
    /// what each hospital compares with the others through a channel the
    /// server does not control before it deals. A server that swaps a
    /// transport key in the roster it publishes could open that member's
    /// deals; the fingerprint is how hospitals notice.
    pub fn fingerprint(&self) -> String {
        hex(&self.digest())
    }

    /// How many must answer.
    pub fn threshold(&self) -> usize {
        self.threshold
    }

    /// The parties, ascending.
    pub fn parties(&self) -> Vec<u32> {
        self.members.iter().map(|m| m.0).collect()
    }

    /// The Shamir evaluation point of `party`: its position + 1 (at most
    /// `MAX_PARTIES`, below every prime, so that differences are invertible).
    fn point(&self, party: u32) -> Option<u64> {
        self.members
            .iter()
            .position(|m| m.0 == party)
            .map(|i| i as u64 + 1)
    }

    /// The transport key of `party`, if it is a member.
    pub fn transport(&self, party: u32) -> Option<[u8; 32]> {
        self.members.iter().find(|m| m.0 == party).map(|m| m.1)
    }

    fn digest(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"fedcore-he roster v1");
        h.update((self.threshold as u64).to_le_bytes());
        for (p, k) in &self.members {
            h.update(p.to_le_bytes());
            h.update(k);
        }
        h.finalize().into()
    }

    /// A signing set: sorted, distinct, members, at least the threshold.
    fn check_signers(&self, signers: &[u32]) -> Result<()> {
        if signers.windows(2).any(|w| w[0] >= w[1]) {
            return Err(HeError::Mismatch(format!(
                "signers {signers:?} are not sorted and distinct"
            )));
        }
        if let Some(p) = signers.iter().find(|&&p| self.point(p).is_none()) {
            return Err(HeError::Mismatch(format!(
                "signer {p} is not in the roster"
            )));
        }
        if signers.len() < self.threshold {
            return Err(HeError::Mismatch(format!(
                "{} signers {signers:?}; the threshold is {} of {}",
                signers.len(),
                self.threshold,
                self.members.len()
            )));
        }
        Ok(())
    }

    /// The Lagrange coefficient at 0 of `party` within `signers`, mod `q`.
    fn lagrange(&self, party: u32, signers: &[u32], q: u64) -> u64 {
        let x = self.point(party).expect("a checked signer");
        let (mut num, mut den) = (1u64, 1u64);
        for &m in signers.iter().filter(|&&m| m != party) {
            let xm = self.point(m).expect("a checked signer");
            num = mul(num, xm % q, q);
            den = mul(den, sub(xm % q, x % q, q), q);
        }
        mul(num, inverse(den, q), q)
    }
}

/// `a^-1 mod q` for a prime `q` and `a` not a multiple of it.
fn inverse(a: u64, q: u64) -> u64 {
    let (mut base, mut e, mut r) = (a % q, q - 2, 1u64);
    while e > 0 {
        if e & 1 == 1 {
            r = mul(r, base, q);
        }
        base = mul(base, base, q);
        e >>= 1;
    }
    r
}

const DEAL_MAGIC: &[u8; 4] = b"FCDL";

/// One Shamir share of a party's secret, sealed to its recipient: only the
/// recipient's transport key opens it (X25519 with a fresh ephemeral key,
/// a key derived by SHA-256, AES-256-GCM whose associated data binds the
/// dealer, the recipient, the roster and the seed). The server relays it
/// and learns nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Deal {
    dealer: u32,
    recipient: u32,
    ephemeral: [u8; 32],
    sealed: Vec<u8>,
}

impl fmt::Debug for Deal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deal")
            .field("dealer", &self.dealer)
            .field("recipient", &self.recipient)
            .field("bytes", &self.sealed.len())
            .finish()
    }
}

impl Deal {
    /// The deals of `deals` addressed to `party` (what the server forwards
    /// to it), in order.
    pub fn addressed_to(deals: &[Deal], party: u32) -> Vec<Deal> {
        deals
            .iter()
            .filter(|d| d.recipient == party)
            .cloned()
            .collect()
    }

    /// The party that dealt it.
    pub fn dealer(&self) -> u32 {
        self.dealer
    }

    /// The party it is sealed to.
    pub fn recipient(&self) -> u32 {
        self.recipient
    }

    /// Bytes for the wire: magic, version, dealer, recipient (u32 each),
    /// ephemeral public key (32 bytes), sealed length (u32), sealed bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(49 + self.sealed.len());
        out.extend_from_slice(DEAL_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.dealer.to_le_bytes());
        out.extend_from_slice(&self.recipient.to_le_bytes());
        out.extend_from_slice(&self.ephemeral);
        out.extend_from_slice(&(self.sealed.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.sealed);
        out
    }

    /// Parses [`Deal::to_bytes`] for `params` (the sealed length must be one
    /// key-level polynomial plus the tag).
    pub fn from_bytes(params: &CkksParams, bytes: &[u8]) -> Result<Self> {
        let bad = |m: &str| HeError::Malformed(format!("deal: {m}"));
        let mut r = Reader::new(bytes);
        expect_magic(&mut r, DEAL_MAGIC, "a fedcore-he deal", &bad)?;
        let dealer = r.u32().map_err(|_| bad("truncated"))?;
        let recipient = r.u32().map_err(|_| bad("truncated"))?;
        let ephemeral: [u8; 32] = r
            .take(32)
            .map_err(|_| bad("truncated"))?
            .try_into()
            .expect("32 bytes");
        let len = r.u32().map_err(|_| bad("truncated"))? as usize;
        let expected = params.degree() * params.coeff_bits().len() * 8 + 16;
        if len != expected {
            return Err(bad(&format!("{len} sealed bytes, expected {expected}")));
        }
        let sealed = r.take(len).map_err(|_| bad("truncated"))?.to_vec();
        if !r.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self {
            dealer,
            recipient,
            ephemeral,
            sealed,
        })
    }
}

fn deal_aad(roster: &Roster, crs: &Crs, dealer: u32, recipient: u32) -> Vec<u8> {
    let mut aad = Vec::with_capacity(90);
    aad.extend_from_slice(b"fedcore-he deal v1");
    aad.extend_from_slice(&roster.digest());
    aad.extend_from_slice(&crs.0);
    aad.extend_from_slice(&dealer.to_le_bytes());
    aad.extend_from_slice(&recipient.to_le_bytes());
    aad
}

fn deal_cipher(
    shared: &[u8; 32],
    ephemeral: &[u8; 32],
    recipient: &[u8; 32],
) -> aes_gcm::Aes256Gcm {
    use aes_gcm::KeyInit;
    let mut h = Sha256::new();
    h.update(b"fedcore-he deal key v1");
    h.update(shared);
    h.update(ephemeral);
    h.update(recipient);
    let key: [u8; 32] = h.finalize().into();
    aes_gcm::Aes256Gcm::new_from_slice(&key).expect("a 32-byte key")
}

fn words_to_bytes(w: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 * w.len());
    push_words(&mut out, w);
    out
}

fn bytes_to_words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

fn secure_rng() -> Result<ChaCha20Rng> {
    ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng)
        .map_err(|e| HeError::Seal(format!("the operating system's generator failed: {e}")))
}

impl PartyKey {
    /// This party's transport public key (X25519), for the roster: other
    /// members seal their deals to it.
    pub fn transport_key(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.transport).to_bytes()
    }

    /// Shamir-shares this party's secret `s_i` among the roster: a random
    /// polynomial `f(X) = s_i + c_1 X + ... + c_(t-1) X^(t-1)` over the
    /// ring (each coefficient uniform below each prime), and `f(x_j)` sealed
    /// to each member `j` (itself included). Fresh randomness every call:
    /// deal once per roster.
    pub fn deal(&self, roster: &Roster, crs: &Crs) -> Result<Vec<Deal>> {
        use aes_gcm::aead::{Aead, Payload};
        if roster.point(self.party).is_none() {
            return Err(HeError::Mismatch(format!(
                "party {} is not in the roster",
                self.party
            )));
        }
        let n = self.params.degree();
        let primes = &self.ctx.primes;
        let mut rng = secure_rng()?;
        let coeffs: Vec<Vec<u64>> = (1..roster.threshold)
            .map(|_| {
                primes
                    .iter()
                    .flat_map(|&q| (0..n).map(|_| rng.random_range(0..q)).collect::<Vec<_>>())
                    .collect()
            })
            .collect();
        roster
            .members
            .iter()
            .map(|&(recipient, key)| {
                let x = roster.point(recipient).expect("a member");
                // Horner: f(x) = s + x (c_1 + x (c_2 + ...)).
                let share: Vec<u64> = (0..primes.len() * n)
                    .map(|i| {
                        let q = primes[i / n];
                        let acc = coeffs
                            .iter()
                            .rev()
                            .fold(0, |acc, c| add(mul(acc, x, q), c[i], q));
                        add(mul(acc, x, q), self.secret.data[i], q)
                    })
                    .collect();
                let eph = x25519_dalek::StaticSecret::from(rng.random::<[u8; 32]>());
                let eph_pub = x25519_dalek::PublicKey::from(&eph).to_bytes();
                let shared = eph.diffie_hellman(&x25519_dalek::PublicKey::from(key));
                if !shared.was_contributory() {
                    return Err(HeError::Mismatch(format!(
                        "party {recipient}'s transport key in the roster is a low-order point"
                    )));
                }
                let cipher = deal_cipher(shared.as_bytes(), &eph_pub, &key);
                let aad = deal_aad(roster, crs, self.party, recipient);
                let sealed = cipher
                    .encrypt(
                        &Default::default(),
                        Payload {
                            msg: &words_to_bytes(&share),
                            aad: &aad,
                        },
                    )
                    .map_err(|_| HeError::Seal("sealing a deal failed".into()))?;
                Ok(Deal {
                    dealer: self.party,
                    recipient,
                    ephemeral: eph_pub,
                    sealed,
                })
            })
            .collect()
    }

    /// This party's threshold key from the deals addressed to it, one from
    /// every member (itself included): the sum of the opened shares, a
    /// Shamir share of the collective secret `s = sum s_i`. A missing,
    /// duplicate, misaddressed, tampered or unreduced deal is an error naming
    /// its dealer.
    pub fn threshold_key(
        &self,
        roster: &Roster,
        crs: &Crs,
        deals: &[Deal],
    ) -> Result<ThresholdKey> {
        use aes_gcm::aead::{Aead, Payload};
        if roster.point(self.party).is_none() {
            return Err(HeError::Mismatch(format!(
                "party {} is not in the roster",
                self.party
            )));
        }
        if roster.transport(self.party) != Some(self.transport_key()) {
            return Err(HeError::Mismatch(format!(
                "the roster has another transport key for party {}",
                self.party
            )));
        }
        let n = self.params.degree();
        let primes = &self.ctx.primes;
        let mut share = vec![0u64; primes.len() * n];
        let mut seen = Vec::with_capacity(deals.len());
        for d in deals {
            if d.recipient != self.party {
                return Err(HeError::Mismatch(format!(
                    "a deal from party {} for party {}, not for {}",
                    d.dealer, d.recipient, self.party
                )));
            }
            if roster.point(d.dealer).is_none() {
                return Err(HeError::Mismatch(format!(
                    "a deal from party {}, which is not in the roster",
                    d.dealer
                )));
            }
            if seen.contains(&d.dealer) {
                return Err(HeError::Mismatch(format!(
                    "two deals from party {}",
                    d.dealer
                )));
            }
            seen.push(d.dealer);
            let shared = self
                .transport
                .diffie_hellman(&x25519_dalek::PublicKey::from(d.ephemeral));
            if !shared.was_contributory() {
                return Err(HeError::Mismatch(format!(
                    "the deal from party {} has a low-order ephemeral key",
                    d.dealer
                )));
            }
            let cipher = deal_cipher(shared.as_bytes(), &d.ephemeral, &self.transport_key());
            let aad = deal_aad(roster, crs, d.dealer, d.recipient);
            let plain = cipher
                .decrypt(
                    &Default::default(),
                    Payload {
                        msg: &d.sealed,
                        aad: &aad,
                    },
                )
                .map_err(|_| {
                    HeError::Mismatch(format!(
                        "the deal from party {} does not open: tampered, or sealed for another key, roster or seed",
                        d.dealer
                    ))
                })?;
            let words = bytes_to_words(&plain);
            check_reduced(
                &words,
                primes,
                n,
                &format!("the deal from party {}", d.dealer),
            )?;
            for (i, (acc, w)) in share.iter_mut().zip(&words).enumerate() {
                *acc = add(*acc, *w, primes[i / n]);
            }
        }
        let missing: Vec<u32> = roster
            .parties()
            .into_iter()
            .filter(|p| !seen.contains(p))
            .collect();
        if !missing.is_empty() {
            return Err(HeError::Mismatch(format!(
                "a threshold key needs a deal from every member; missing {missing:?}"
            )));
        }
        Ok(ThresholdKey {
            params: self.params.clone(),
            primes: primes.clone(),
            party: self.party,
            roster: roster.clone(),
            share,
            weight_sum: self.weight_sum,
            distance_bound: self.distance_bound,
        })
    }
}

/// A hospital's Shamir share of the collective secret: any `t` of the
/// roster's members answer a key switch together ([`ThresholdKey::switch_share`]).
/// Like [`PartyKey`], it has no decryption method.
#[derive(Clone)]
pub struct ThresholdKey {
    params: CkksParams,
    primes: Vec<u64>,
    party: u32,
    roster: Roster,
    /// `sum_i f_i(x_party)`: NTT form, every prime of the key level.
    share: Vec<u64>,
    weight_sum: f64,
    /// The largest squared distance its distance shares smudge for (not
    /// written to its file).
    distance_bound: f64,
}

impl fmt::Debug for ThresholdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThresholdKey")
            .field("party", &self.party)
            .field("roster", &self.roster)
            .finish_non_exhaustive()
    }
}

impl ThresholdKey {
    /// This party's number.
    pub fn party(&self) -> u32 {
        self.party
    }

    /// The bound on the weights' absolute sum it smudges for.
    pub fn weight_sum(&self) -> f64 {
        self.weight_sum
    }

    /// The parameters.
    pub fn params(&self) -> &CkksParams {
        &self.params
    }

    /// The roster it was dealt for.
    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// Writes this threshold key to `path` (mode 0600, never overwriting).
    /// Layout: magic `FCTK`, version, parameters (JSON), party, weight-sum
    /// bound, threshold, member count, members (party and transport key),
    /// the share's coefficients (sized).
    pub fn write(&self, path: &std::path::Path) -> Result<()> {
        let mut out = file_head(
            THRESHOLD_FILE_MAGIC,
            &self.params,
            self.party,
            self.weight_sum,
        )?;
        out.extend_from_slice(&(self.roster.threshold as u32).to_le_bytes());
        out.extend_from_slice(&(self.roster.members.len() as u32).to_le_bytes());
        for (p, k) in &self.roster.members {
            out.extend_from_slice(&p.to_le_bytes());
            out.extend_from_slice(k);
        }
        push_sized(&mut out, &words_to_bytes(&self.share));
        crate::context::write_new(path, &out)
    }

    /// Reads a threshold key written by [`ThresholdKey::write`] (private
    /// file; roster and coefficients checked).
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        crate::context::check_private(path)?;
        let bytes = crate::context::read_key_file(path)?;
        let bad = |m: &str| crate::context::key_err(path, m.to_owned());
        let mut r = Reader::new(&bytes);
        let (params, party, weight_sum) = read_head(&mut r, THRESHOLD_FILE_MAGIC, &bad)?;
        let threshold = r.u32().map_err(|_| bad("truncated"))? as usize;
        let count = r.u32().map_err(|_| bad("truncated"))? as usize;
        if count > MAX_PARTIES {
            return Err(bad(&format!("{count} members; at most {MAX_PARTIES}")));
        }
        let mut members = Vec::with_capacity(count);
        for _ in 0..count {
            let p = r.u32().map_err(|_| bad("truncated"))?;
            let k: [u8; 32] = r
                .take(32)
                .map_err(|_| bad("truncated"))?
                .try_into()
                .expect("32 bytes");
            members.push((p, k));
        }
        let share = bytes_to_words(sized(&mut r, &bad)?);
        if !r.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let roster = Roster::new(threshold, members).map_err(|e| bad(&format!("roster: {e}")))?;
        if roster.point(party).is_none() {
            return Err(bad(&format!("party {party} is not in its roster")));
        }
        let ctx = context_for(&params)?;
        check_reduced(&share, &ctx.primes, params.degree(), "share")
            .map_err(|e| bad(&e.to_string()))?;
        Ok(Self {
            params,
            primes: ctx.primes.clone(),
            party,
            roster,
            share,
            weight_sum,
            distance_bound: DEFAULT_DISTANCE_BOUND,
        })
    }

    /// This party's answer to the key switch of `aggregate` signed by
    /// `signers` (sorted, at least the threshold, this party among them; the
    /// server names them in its request, and every signer must answer for
    /// the same set): as [`PartyKey::switch_share`] with the secret
    /// `lambda * share`, `lambda` the Lagrange coefficient at 0 of this
    /// party within `signers`, so that the signers' secrets add up to `s`.
    /// Answer one signing set per aggregate: each set's answer has its own
    /// smudging noise.
    pub fn switch_share(
        &self,
        collective: &CollectiveKey,
        aggregate: &EncryptedVector,
        output: &CkksContext<Public>,
        signers: &[u32],
    ) -> Result<SwitchShare> {
        let secret = self.signing(collective, signers)?;
        self.answer(&secret, signers)
            .switch_share(collective, aggregate, output)
    }

    /// `lambda * share` for `signers` (checked against the collective key's
    /// roster, this party among them): this party's part of `s` within the
    /// signing set.
    fn signing(&self, collective: &CollectiveKey, signers: &[u32]) -> Result<Vec<u64>> {
        if collective.roster.as_ref() != Some(&self.roster) {
            return Err(HeError::Mismatch(
                "the collective key has another roster (or none)".into(),
            ));
        }
        self.roster.check_signers(signers)?;
        if !signers.contains(&self.party) {
            return Err(HeError::Mismatch(format!(
                "party {} is not among the signers {signers:?}",
                self.party
            )));
        }
        let n = self.params.degree();
        let lambdas: Vec<u64> = self
            .primes
            .iter()
            .map(|&q| self.roster.lagrange(self.party, signers, q))
            .collect();
        Ok(self
            .share
            .iter()
            .enumerate()
            .map(|(i, &w)| mul(w, lambdas[i / n], self.primes[i / n]))
            .collect())
    }

    fn answer<'a>(&'a self, secret: &'a [u64], signers: &[u32]) -> Answer<'a> {
        Answer {
            params: &self.params,
            primes: &self.primes,
            party: self.party,
            secret,
            weight_sum: self.weight_sum,
            distance_bound: self.distance_bound,
            signers: signers.to_vec(),
        }
    }

    /// `lambda * share` for `signers`, for the tests' coalition attacks only.
    #[cfg(test)]
    pub(crate) fn weighted(&self, signers: &[u32]) -> Vec<u64> {
        let n = self.params.degree();
        self.share
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let q = self.primes[i / n];
                mul(w, self.roster.lagrange(self.party, signers, q), q)
            })
            .collect()
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
        assert_eq!(party.secret.data.len(), n * k);
    }

    #[test]
    fn key_shares_for_two_seeds_do_not_give_the_secret_away() {
        let params = CkksParams::multiparty();
        let party = PartyKey::generate(params.clone(), 1).unwrap();
        let (c1, c2) = (Crs::new([1; 32]), Crs::new([2; 32]));
        let (p1, p2) = (party.key_share(&c1).unwrap(), party.key_share(&c2).unwrap());
        let primes = &party.ctx.primes;
        let n = params.degree();
        let (a1, a2) = (c1.expand(primes, n), c2.expand(primes, n));
        // With one error for both, (p1 - p2) / (a2 - a1) would be s_i.
        let s = &party.secret.data;
        let recovered = (0..primes.len() * n)
            .filter(|&i| {
                let q = primes[i / n];
                let d = sub(a2[i], a1[i], q);
                d != 0 && mul(sub(p1.poly[i], p2.poly[i], q), inverse(d, q), q) == s[i]
            })
            .count();
        assert!(recovered < 16, "{recovered} coefficients of s_i recovered");
        // The same seed twice gives the same share: re-asking yields nothing
        // to average.
        assert_eq!(party.key_share(&c1).unwrap(), p1);
        // The error is small: p + a s is within SEAL's bound of 19 once
        // taken back from the NTT domain; here, checked through the
        // collective key: one party's key encrypts and its secret decrypts.
        let key = CollectiveKey::combine(&params, &c1, &[p1]).unwrap();
        let ctx = key.context().engine().context().clone();
        let sk = seal::SecretKey::from_bytes(&ctx, &party.secret.to_bytes()).unwrap();
        let own = CkksContext::from_secret_key(
            params.clone(),
            ctx,
            key.context().public_key().clone(),
            sk,
        )
        .unwrap();
        let v: Vec<f64> = (0..100).map(|i| i as f64 / 100.0).collect();
        let back = own
            .decrypt(&key.context().encrypt_upload(&v).unwrap())
            .unwrap();
        assert!(max_error(&back, &v) < 1e-6);
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

    /// Every party deals to the roster (through bytes) and builds its
    /// threshold key from the deals addressed to it.
    fn threshold(f: &Federation, t: usize) -> (CollectiveKey, Vec<ThresholdKey>) {
        let members = f
            .parties
            .iter()
            .map(|p| (p.party(), p.transport_key()))
            .collect();
        let roster = Roster::new(t, members).unwrap();
        let crs = f.collective.crs();
        let deals: Vec<Deal> = f
            .parties
            .iter()
            .flat_map(|p| p.deal(&roster, &crs).unwrap())
            .map(|d| Deal::from_bytes(&f.params, &d.to_bytes()).unwrap())
            .collect();
        let keys = f
            .parties
            .iter()
            .map(|p| {
                let mine = Deal::addressed_to(&deals, p.party());
                p.threshold_key(&roster, &crs, &mine).unwrap()
            })
            .collect();
        (f.collective.clone().with_roster(roster).unwrap(), keys)
    }

    #[test]
    fn any_t_of_the_hospitals_switch_the_aggregate_and_fewer_cannot() {
        let f = federation();
        let (collective, keys) = threshold(&f, 2);
        let (plain, uploads, sum) = round(&f, 5000);
        let out = f.output.public();
        let want = expected(&plain);
        for signers in [vec![1, 2], vec![1, 3], vec![2, 3], vec![1, 2, 3]] {
            let shares: Vec<SwitchShare> = keys
                .iter()
                .filter(|k| signers.contains(&k.party()))
                .map(|k| {
                    let s = k.switch_share(&collective, &sum, &out, &signers).unwrap();
                    SwitchShare::from_bytes(&collective, &s.to_bytes()).unwrap()
                })
                .collect();
            let got = f
                .output
                .decrypt(&collective.switch(&sum, &out, &shares).unwrap())
                .unwrap();
            let err = max_error(&got, &want);
            assert!(err < 1e-6, "signers {signers:?}: max error {err:e}");
        }
        // Fewer than the threshold: refused by the hospital...
        let e = keys[0]
            .switch_share(&collective, &sum, &out, &[1])
            .unwrap_err();
        assert!(e.to_string().contains("the threshold is 2 of 3"), "{e}");
        // ...and by the server when a named signer does not answer.
        let one = keys[0]
            .switch_share(&collective, &sum, &out, &[1, 2])
            .unwrap();
        let e = collective
            .switch(&sum, &out, std::slice::from_ref(&one))
            .unwrap_err();
        assert!(e.to_string().contains("missing [2]"), "{e}");
        // A zero share in place of the missing signer leaves noise.
        let zeros = one
            .polys
            .iter()
            .map(|(a, b)| (vec![0; a.len()], vec![0; b.len()]))
            .collect();
        let forged = SwitchShare {
            party: 2,
            polys: zeros,
            ..one.clone()
        };
        let got = f
            .output
            .decrypt(
                &collective
                    .switch(&sum, &out, &[one.clone(), forged])
                    .unwrap(),
            )
            .unwrap();
        assert!(max_error(&got, &want) > 1e3 * 2.0);
        // Shares for different signing sets do not mix.
        let other = keys[1]
            .switch_share(&collective, &sum, &out, &[2, 3])
            .unwrap();
        let e = collective.switch(&sum, &out, &[one, other]).unwrap_err();
        assert!(e.to_string().contains("names signers [2, 3]"), "{e}");
        // The server with one hospital's threshold key (t - 1 = 1) cannot
        // decrypt an upload; two hospitals' weighted shares can (the shares
        // are right, the attack fails for want of one).
        let ctx = f.collective.context().engine().context().clone();
        let decrypt_with = |secret: Vec<u64>| {
            let mut key = f.parties[0].secret().clone();
            key.data = secret;
            let sk = seal::SecretKey::from_bytes(&ctx, &key.to_bytes()).unwrap();
            CkksContext::from_secret_key(
                f.params.clone(),
                ctx.clone(),
                f.collective.context().public_key().clone(),
                sk,
            )
            .unwrap()
            .decrypt(&uploads[0])
            .unwrap()
        };
        for k in &keys {
            for signers in [[1, 2], [1, 3], [2, 3]] {
                if signers.contains(&k.party()) {
                    let err = max_error(&decrypt_with(k.weighted(&signers)), &plain[0]);
                    assert!(
                        err > 1e3 * 2.0,
                        "party {} alone: error only {err:e}",
                        k.party()
                    );
                }
            }
        }
        let n = f.params.degree();
        let pair: Vec<u64> = keys[0]
            .weighted(&[1, 3])
            .iter()
            .zip(keys[2].weighted(&[1, 3]))
            .enumerate()
            .map(|(i, (a, b))| add(*a, b, ctx.primes[i / n]))
            .collect();
        assert!(max_error(&decrypt_with(pair), &plain[0]) < 1e-6);
    }

    #[test]
    fn secret_shares_and_threshold_keys_survive_a_restart_in_private_files() {
        let f = federation();
        let (collective, keys) = threshold(&f, 2);
        let dir = tempfile::tempdir().unwrap();
        let (pk, tk) = (
            dir.path().join("party.key"),
            dir.path().join("threshold.key"),
        );
        f.parties[1].write(&pk).unwrap();
        keys[1].write(&tk).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for p in [&pk, &tk] {
                assert_eq!(
                    std::fs::metadata(p).unwrap().permissions().mode() & 0o777,
                    0o600
                );
            }
        }
        let party = PartyKey::from_file(&pk).unwrap();
        assert_eq!(party.secret, f.parties[1].secret);
        assert_eq!(party.party(), 2);
        assert_eq!(party.transport_key(), f.parties[1].transport_key());
        let key = ThresholdKey::from_file(&tk).unwrap();
        assert_eq!(key.weighted(&[1, 2]), keys[1].weighted(&[1, 2]));
        // The reloaded key answers a switch the others can complete.
        let (plain, _, sum) = round(&f, 100);
        let out = f.output.public();
        let shares = vec![
            keys[0]
                .switch_share(&collective, &sum, &out, &[1, 2])
                .unwrap(),
            key.switch_share(&collective, &sum, &out, &[1, 2]).unwrap(),
        ];
        let got = f
            .output
            .decrypt(&collective.switch(&sum, &out, &shares).unwrap())
            .unwrap();
        assert!(max_error(&got, &expected(&plain)) < 1e-6);
        // Never overwritten; refused when others may read it; truncation
        // and the other kind of file are reasons.
        assert!(f.parties[1].write(&pk).is_err());
        let bytes = std::fs::read(&pk).unwrap();
        let short = dir.path().join("short.key");
        crate::context::write_new(&short, &bytes[..bytes.len() - 3]).unwrap();
        assert!(
            PartyKey::from_file(&short)
                .unwrap_err()
                .to_string()
                .contains("truncated")
        );
        assert!(
            PartyKey::from_file(&tk)
                .unwrap_err()
                .to_string()
                .contains("not a key file of this kind")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tk, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(
                ThresholdKey::from_file(&tk)
                    .unwrap_err()
                    .to_string()
                    .contains("chmod 600")
            );
        }
    }

    #[test]
    fn deals_open_only_for_their_recipient_and_roster() {
        let f = federation();
        let members: Vec<(u32, [u8; 32])> = f
            .parties
            .iter()
            .map(|p| (p.party(), p.transport_key()))
            .collect();
        let roster = Roster::new(2, members.clone()).unwrap();
        let crs = f.collective.crs();
        let deals: Vec<Vec<Deal>> = f
            .parties
            .iter()
            .map(|p| p.deal(&roster, &crs).unwrap())
            .collect();
        // Deals for party 1: deals[dealer][0].
        let for_one = |d: &[Vec<Deal>]| d.iter().map(|v| v[0].clone()).collect::<Vec<_>>();
        let me = &f.parties[0];
        assert!(me.threshold_key(&roster, &crs, &for_one(&deals)).is_ok());
        let err = |deals: &[Deal], roster: &Roster, crs: &Crs| {
            me.threshold_key(roster, crs, deals)
                .unwrap_err()
                .to_string()
        };
        let mut tampered = for_one(&deals);
        tampered[2].sealed[10] ^= 1;
        assert!(err(&tampered, &roster, &crs).contains("the deal from party 3 does not open"));
        // Another roster (threshold 3) or seed: the associated data differs.
        let other = Roster::new(3, members.clone()).unwrap();
        assert!(err(&for_one(&deals), &other, &crs).contains("does not open"));
        assert!(err(&for_one(&deals), &roster, &Crs::new([9; 32])).contains("does not open"));
        // Party 2's deal from party 3, handed to party 1.
        let mut wrong = for_one(&deals);
        wrong[2] = deals[2][1].clone();
        assert!(err(&wrong, &roster, &crs).contains("for party 2, not for 1"));
        // Even relabelled, it does not open with party 1's key.
        wrong[2].recipient = 1;
        assert!(err(&wrong, &roster, &crs).contains("does not open"));
        let mut missing = for_one(&deals);
        missing.pop();
        assert!(err(&missing, &roster, &crs).contains("missing [3]"));
        let mut dup = for_one(&deals);
        dup[2] = dup[1].clone();
        assert!(err(&dup, &roster, &crs).contains("two deals from party 2"));
        // Bytes: truncated or the wrong size for the parameters.
        let bytes = deals[0][0].to_bytes();
        assert!(Deal::from_bytes(&f.params, &bytes[..bytes.len() - 1]).is_err());
        assert!(
            Deal::from_bytes(&CkksParams::new(8192, &[60, 40, 60], 40).unwrap(), &bytes)
                .unwrap_err()
                .to_string()
                .contains("expected")
        );
        // Rosters: threshold out of range, duplicates.
        assert!(Roster::new(0, members.clone()).is_err());
        assert!(Roster::new(4, members.clone()).is_err());
        let mut twice = members.clone();
        twice[1].0 = 1;
        assert!(
            Roster::new(2, twice)
                .unwrap_err()
                .to_string()
                .contains("party 1 twice")
        );
        // A low-order transport key (the shared secret would be zero) is
        // refused before anything is sealed to it.
        let mut weak = members.clone();
        weak[2].1 = [0; 32];
        let weak = Roster::new(2, weak).unwrap();
        let e = f.parties[0].deal(&weak, &crs).unwrap_err().to_string();
        assert!(
            e.contains("party 3's transport key in the roster is a low-order point"),
            "{e}"
        );
        assert_ne!(weak.fingerprint(), roster.fingerprint());
        // A roster that does not match the collective key's parties.
        let short = Roster::new(1, members[..2].to_vec()).unwrap();
        assert!(f.collective.clone().with_roster(short).is_err());
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
        // Parameters whose smudging would drown the values are refused.
        let default = CkksParams::default();
        let weak = PartyKey::generate(default.clone(), 1).unwrap();
        let crs = f.collective.crs();
        let e = CollectiveKey::combine(&default, &crs, &[weak.key_share(&crs).unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("smudging adds an error"), "{e}");
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
            KeyShare::from_bytes(&CkksParams::new(8192, &[60, 40, 60], 40).unwrap(), &bytes)
                .unwrap_err()
                .to_string()
                .contains("expected")
        );
        // The same shares recombine to the same key (a hospital's check).
        let once = CollectiveKey::combine(&f.params, &crs, &ks).unwrap();
        let again = CollectiveKey::combine(&f.params, &crs, &ks).unwrap();
        assert_eq!(again.context().key_id(), once.context().key_id());
    }
}
