//! The encrypted geometric median's squared distances under a collective
//! key: the server computes them under encryption and the hospitals decrypt
//! them together, one coefficient each, with smudging noise.
//!
//! With the collective relinearization key
//! ([`CollectiveKey::with_relinearization`]) the server forms, per pair of
//! uploads, `sum_c (x_i - x_j)_c^2` over the ciphertexts `c`, relinearized
//! once: a ciphertext `(c0, c1)` whose slots hold partial sums of the squared
//! differences. The squared distance is the sum of those slots, and the sum
//! of a CKKS plaintext's slots is `N / 2` times its constant coefficient
//! divided by the scale (the constant coefficient of a polynomial is the mean
//! of its values at the `N` roots of `X^N + 1`, which are the slots and their
//! conjugates). So no rotation keys are needed, and the decryption reveals
//! that one coefficient and nothing of the others:
//!
//! - the server sends `c1` of every pair ([`DistanceRequest`]);
//! - each hospital answers, per pair and prime, `(c1 s_i)_0 + E_i`
//!   ([`PartyKey::distance_share`], [`ThresholdKey::distance_share`] with its
//!   Lagrange-weighted share): in the NTT domain the constant coefficient of
//!   a product is `N^-1` times the sum of its pointwise products;
//! - the server adds `c0`'s constant coefficient and every answer
//!   ([`Distances::combine`]) and reads the integer through the primes
//!   (mixed radix, balanced digits).
//!
//! `E_i` is Gaussian with standard deviation `2^40` times a bound on that
//! coefficient's own noise ([`distance_noise_bound`]), which unlike a
//! weighted sum's grows with the scale and with the distance: a bound on the
//! squared distances (`PartyKey::with_distance_bound`) is part of it.

use super::*;
use crate::gram::{MAX_GRAM_POINTS, Pairs};

const DISTANCE_REQUEST_MAGIC: &[u8; 4] = b"FCDQ";
const DISTANCE_SHARE_MAGIC: &[u8; 4] = b"FCDS";
const DISTANCE_STEP_MAGIC: &[u8; 4] = b"FCDT";

/// A distance step's sealed bytes: magic, version, signer count (u32),
/// signers (u32 each; none for N-of-N), then the request's bytes.
pub(crate) fn distance_step_bytes(signers: &[u32], request: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + 4 * signers.len() + request.len());
    out.extend_from_slice(DISTANCE_STEP_MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(signers.len() as u32).to_le_bytes());
    for s in signers {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.extend_from_slice(request);
    out
}

/// Whether a step's sealed bytes are a distance step's.
pub(crate) fn is_distance_step(bytes: &[u8]) -> bool {
    bytes.starts_with(DISTANCE_STEP_MAGIC)
}

/// The signers and the request's bytes of [`distance_step_bytes`].
pub(crate) fn parse_distance_step(bytes: &[u8]) -> Result<(Vec<u32>, &[u8])> {
    let bad = |m: &str| HeError::Malformed(format!("distance step: {m}"));
    let mut r = Reader::new(bytes);
    expect_magic(
        &mut r,
        DISTANCE_STEP_MAGIC,
        "a fedcore-he distance step",
        &bad,
    )?;
    let count = r.u32().map_err(|_| bad("truncated"))? as usize;
    if count > MAX_PARTIES {
        return Err(bad(&format!("{count} signers (at most {MAX_PARTIES})")));
    }
    let signers = (0..count)
        .map(|_| r.u32().map_err(|_| bad("truncated signers")))
        .collect::<Result<Vec<_>>>()?;
    let rest = r.rest_len();
    let request = r.take(rest).map_err(|_| bad("truncated"))?;
    Ok((signers, request))
}

/// The largest squared distance a hospital's distance shares smudge for
/// unless it sets another ([`PartyKey::with_distance_bound`]): 2^19, as
/// [`CkksContext::inner_product_bound`] at the single-key parameters.
pub const DEFAULT_DISTANCE_BOUND: f64 = 524_288.0;

/// The most a distance bound may be: 2^40.
const MAX_DISTANCE_BOUND: f64 = 1_099_511_627_776.0;

/// A bound on the noise of the constant coefficient of a squared distance
/// `sum_c (x_i - x_j)_c^2` of fresh uploads under a collective key of
/// `parties` parties, relinearized, for squared distances up to `bound`, in
/// the product's integer units:
/// `136 * 2^scale * sqrt(bound) * sqrt(2 parties) / 3 + 2^32`.
///
/// The product of `Delta m + e` with itself leaves `2 Delta m e + e^2`; the
/// constant coefficient of `m e` has standard deviation
/// `||m||_2 * sigma_e`, where `||m||_2 = sqrt(2 / N) ||x_i - x_j||` (the
/// canonical embedding's Parseval identity) and `sigma_e`, the difference
/// of two fresh encryptions' roundings, `sqrt(2) sqrt(N parties / 18)`
/// ([`aggregate_noise_bound`]). The bound is 68 such deviations; `2^32`
/// covers `e^2` (about `sqrt(C N) sigma_e^2` over `C` ciphertexts: 2^24 for
/// 855, a 7M-value update, at [`CkksParams::multiparty_median`]) and the
/// relinearization with its rounding (about `2^18` for 3 parties, linear in
/// their number).
pub fn distance_noise_bound(params: &CkksParams, parties: usize, bound: f64) -> f64 {
    let scale = 2f64.powi(params.scale_bits() as i32);
    136.0 * scale * bound.sqrt() * (2.0 * parties as f64).sqrt() / 3.0 + 2f64.powi(32)
}

/// The smudging's standard deviation for one distance share.
fn distance_sigma(params: &CkksParams, parties: usize, bound: f64) -> f64 {
    2f64.powi(SMUDGING_BITS as i32) * distance_noise_bound(params, parties, bound)
}

/// The standard deviation of the error `signers` smudged shares add to a
/// decrypted squared distance: `N sigma sqrt(signers) / (2 scale^2)`.
pub fn distance_error(params: &CkksParams, parties: usize, signers: usize, bound: f64) -> f64 {
    let scale = 2f64.powi(2 * params.scale_bits() as i32);
    params.degree() as f64 * distance_sigma(params, parties, bound) * (signers as f64).sqrt()
        / (2.0 * scale)
}

/// Refuses parameters whose upload level cannot hold a squared distance up
/// to `bound` with its smudging (the product is at the scale squared), and
/// a bound outside `(0, 2^40]`.
fn check_distance_params(
    params: &CkksParams,
    level_bits: u32,
    parties: usize,
    bound: f64,
) -> Result<()> {
    check_bound(bound)?;
    let scale = 2f64.powi(2 * params.scale_bits() as i32);
    let coefficient = 2.0 * scale * bound / params.degree() as f64
        + 16.0 * distance_sigma(params, parties, bound) * (parties as f64).sqrt();
    if coefficient.log2() >= level_bits as f64 - 2.0 {
        return Err(HeError::InvalidParameters(format!(
            "a squared distance up to {bound} with its smudging needs {:.0} bits at the upload level, which has {level_bits}; use CkksParams::multiparty_median()",
            coefficient.log2() + 2.0
        )));
    }
    Ok(())
}

/// The residue modulo each of `primes` of one integer drawn from a Gaussian
/// of standard deviation `sigma` (up to about 2^200): drawn in double
/// precision and dithered below its resolution with uniform bits, so that
/// every integer near the mean is reachable.
fn gaussian_residues(rng: &mut ChaCha20Rng, sigma: f64, primes: &[u64]) -> Vec<u64> {
    let g: f64 = StandardNormal.sample(rng);
    let x = g * sigma;
    let magnitude = x.abs();
    // magnitude ~ mantissa * 2^shift + dither, dither uniform below 2^shift.
    let shift = if magnitude < 2f64.powi(53) {
        0
    } else {
        magnitude.log2().floor() as u32 - 52
    };
    let mantissa = (magnitude / 2f64.powi(shift as i32)).round() as u64;
    let limbs = shift.div_ceil(64) as usize;
    let mut dither: Vec<u64> = (0..limbs).map(|_| rng.random()).collect();
    if let Some(top) = dither.last_mut().filter(|_| shift % 64 != 0) {
        *top &= (1u64 << (shift % 64)) - 1;
    }
    primes
        .iter()
        .map(|&q| {
            let two = 2 % q;
            let mut r = mantissa % q;
            for _ in 0..shift {
                r = mul(r, two, q);
            }
            let d = dither.iter().rev().fold(0u64, |acc, &w| {
                ((((acc as u128) << 64) | w as u128) % q as u128) as u64
            });
            let r = add(r, d, q);
            if x < 0.0 { sub(0, r, q) } else { r }
        })
        .collect()
}

/// The integer with these residues, centered (`|x| < Q / 2`), as a float:
/// Garner's mixed radix with balanced digits, added from the top so that a
/// value far below `Q` keeps double precision.
fn centered(residues: &[u64], primes: &[u64]) -> f64 {
    let mut digits: Vec<i128> = Vec::with_capacity(primes.len());
    for (i, &q) in primes.iter().enumerate() {
        let (mut acc, mut radix) = (0u64, 1 % q);
        for (j, &d) in digits.iter().enumerate() {
            acc = add(acc, mul(d.rem_euclid(q as i128) as u64, radix, q), q);
            radix = mul(radix, primes[j] % q, q);
        }
        let t = mul(sub(residues[i], acc, q), inverse(radix, q), q);
        digits.push(if t > q / 2 {
            t as i128 - q as i128
        } else {
            t as i128
        });
    }
    primes
        .iter()
        .zip(&digits)
        .rev()
        .fold(0.0, |v, (&q, &d)| v * q as f64 + d as f64)
}

/// `N^-1 sum_t a_t b_t mod q` over one prime's `N` NTT values: the constant
/// coefficient of the product `a b`.
fn constant_of_product(a: &[u64], b: &[u64], q: u64) -> u64 {
    let sum = a
        .iter()
        .zip(b)
        .fold(0u64, |acc, (&x, &y)| add(acc, mul(x, y, q), q));
    mul(sum, inverse(a.len() as u64 % q, q), q)
}

/// `N^-1 sum_t a_t mod q`: the constant coefficient of `a`.
fn constant_of(a: &[u64], q: u64) -> u64 {
    let sum = a.iter().fold(0u64, |acc, &x| add(acc, x, q));
    mul(sum, inverse(a.len() as u64 % q, q), q)
}

/// Refuses a distance bound outside `(0, 2^40]`.
fn check_bound(bound: f64) -> Result<()> {
    if !(bound > 0.0 && bound <= MAX_DISTANCE_BOUND) {
        return Err(HeError::OutOfRange(format!(
            "a distance bound of {bound}; in (0, 2^40]"
        )));
    }
    Ok(())
}

/// What the server sends the hospitals for the collective decryption of the
/// squared distances: the second polynomial `c1` of each pair's ciphertext
/// (pairs `(i, j)`, `i < j`, row by row), bound to the collective key.
#[derive(Clone, PartialEq)]
pub struct DistanceRequest {
    key_id: [u8; 16],
    points: usize,
    /// Primes of the ciphertexts' level.
    primes: usize,
    scale: f64,
    /// `pairs * primes * N` words, NTT form.
    c1: Vec<u64>,
    /// SHA-256 of the request's bytes: what the answers are bound to.
    digest: [u8; 32],
}

impl fmt::Debug for DistanceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistanceRequest")
            .field("points", &self.points)
            .field("primes", &self.primes)
            .field("digest", &hex(&self.digest[..8]))
            .finish()
    }
}

impl DistanceRequest {
    /// The number of points (uploads) whose pairwise distances it holds.
    pub fn points(&self) -> usize {
        self.points
    }

    /// The bytes of the share that answers it: header and one residue per
    /// pair and prime.
    pub fn share_len(&self) -> usize {
        49 + 4 * MAX_PARTIES + 8 * self.pairs() * self.primes
    }

    fn pairs(&self) -> usize {
        self.points * (self.points - 1) / 2
    }

    /// Bytes for the wire: magic, version, collective key id (16 bytes),
    /// points (u32), primes (u32), scale (f64), then every pair's `c1`
    /// (u64 words).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(45 + 8 * self.c1.len());
        out.extend_from_slice(DISTANCE_REQUEST_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.key_id);
        out.extend_from_slice(&(self.points as u32).to_le_bytes());
        out.extend_from_slice(&(self.primes as u32).to_le_bytes());
        out.extend_from_slice(&self.scale.to_bits().to_le_bytes());
        push_words(&mut out, &self.c1);
        out
    }

    /// Parses [`DistanceRequest::to_bytes`] for `points` points (what the
    /// step names, at most 256: the bytes cannot make a hospital hold more
    /// than that many points' pairs, 512 KiB each at
    /// [`CkksParams::multiparty_median`]; the transport's message limit
    /// bounds the rest):
    /// the collective key's id, the point count (2 to 256), the level (the
    /// upload level's primes), the scale (the product of two uploads'), the
    /// exact length and every coefficient reduced.
    pub fn from_bytes(collective: &CollectiveKey, bytes: &[u8], points: usize) -> Result<Self> {
        let bad = |m: String| HeError::Malformed(format!("distance request: {m}"));
        let mut r = Reader::new(bytes);
        expect_magic(
            &mut r,
            DISTANCE_REQUEST_MAGIC,
            "a fedcore-he distance request",
            &|m: &str| bad(m.to_owned()),
        )?;
        let key_id: [u8; 16] = r
            .take(16)
            .map_err(|_| bad("truncated".into()))?
            .try_into()
            .expect("16 bytes");
        if key_id != collective.ctx.key_id() {
            return Err(HeError::Mismatch(
                "a distance request under another collective key".into(),
            ));
        }
        let n = r.u32().map_err(|_| bad("truncated".into()))? as usize;
        if n != points || !(2..=MAX_GRAM_POINTS).contains(&n) {
            return Err(bad(format!(
                "{n} points where {points} are expected (2 to {MAX_GRAM_POINTS})"
            )));
        }
        let k = r.u32().map_err(|_| bad("truncated".into()))? as usize;
        let (level_primes, _) = collective.upload_level();
        if k != level_primes.len() {
            return Err(bad(format!(
                "{k} primes; the upload level has {}",
                level_primes.len()
            )));
        }
        let scale = f64::from_bits(r.u64().map_err(|_| bad("truncated".into()))?);
        let expected = 2f64.powi(2 * collective.ctx.params().scale_bits() as i32);
        if scale != expected {
            return Err(bad(format!(
                "scale {scale:e}; a product of uploads is at {expected:e}"
            )));
        }
        let degree = collective.ctx.params().degree();
        let words = n * (n - 1) / 2 * k * degree;
        let raw = r
            .take(words * 8)
            .map_err(|_| bad("truncated coefficients".into()))?;
        if !r.is_empty() {
            return Err(bad("trailing bytes".into()));
        }
        let c1 = bytes_to_words(raw);
        for (p, poly) in c1.chunks(k * degree).enumerate() {
            check_reduced(
                poly,
                &level_primes,
                degree,
                &format!("distance request, pair {p}"),
            )?;
        }
        Ok(Self {
            key_id,
            points: n,
            primes: k,
            scale,
            c1,
            digest: Sha256::digest(bytes).into(),
        })
    }
}

/// The server's side of a distance decryption: the request and, per pair,
/// the constant coefficient of `c0`.
#[derive(Clone)]
pub struct Distances {
    request: DistanceRequest,
    /// `pairs * primes` words.
    c0: Vec<u64>,
}

impl fmt::Debug for Distances {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Distances")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
}

impl Distances {
    /// What to send every hospital that decrypts.
    pub fn request(&self) -> &DistanceRequest {
        &self.request
    }

    fn check_key(&self, collective: &CollectiveKey) -> Result<()> {
        if collective.ctx.key_id() != self.request.key_id {
            return Err(HeError::Mismatch(
                "these distances are under another collective key".into(),
            ));
        }
        Ok(())
    }

    /// Checks one share before it is combined (the round does it for each
    /// answer, so that a hospital that answers wrongly is out of the round
    /// and the others can still decrypt): under this request's key, naming
    /// the signing set `named` (empty for N-of-N), from a party in it (or
    /// in the collective key), for this request, one reduced value per pair
    /// and prime. A well-formed share made with a wrong secret passes: no
    /// proof of a correct decryption is asked for (docs/he.md).
    pub fn check_share(
        &self,
        collective: &CollectiveKey,
        share: &DistanceShare,
        named: &[u32],
    ) -> Result<()> {
        self.check_key(collective)?;
        let who = format!("party {}'s distance share", share.party);
        if share.signers != named {
            return Err(HeError::Mismatch(format!(
                "{who} names signers {:?}, the request {named:?}",
                share.signers
            )));
        }
        let members = if named.is_empty() {
            &collective.parties[..]
        } else {
            named
        };
        if !members.contains(&share.party) {
            return Err(HeError::Mismatch(format!(
                "{who}: the party is not {}",
                if named.is_empty() {
                    "in the collective key"
                } else {
                    "among the signers"
                }
            )));
        }
        if share.digest != self.request.digest {
            return Err(HeError::Mismatch(format!("{who} is for another request")));
        }
        let (primes, _) = collective.upload_level();
        let k = self.request.primes;
        let want = self.request.pairs() * k;
        if share.values.len() != want {
            return Err(HeError::Malformed(format!(
                "{who} has {} values, expected {want}",
                share.values.len()
            )));
        }
        if let Some((i, _)) = share
            .values
            .iter()
            .enumerate()
            .find(|&(i, &v)| v >= primes[i % k])
        {
            return Err(HeError::Malformed(format!(
                "{who}: value {i} is not reduced"
            )));
        }
        Ok(())
    }

    /// The squared distances `||x_i - x_j||^2` for `i < j`, row by row, from
    /// the hospitals' shares: every party's for N-of-N shares, the signers'
    /// (at least the threshold, all naming the same set) for threshold
    /// shares. A missing party is an error naming it; a share for another
    /// request, a duplicate, a stranger's, an unreduced or truncated one is
    /// refused with its reason.
    pub fn combine(
        &self,
        collective: &CollectiveKey,
        shares: &[DistanceShare],
    ) -> Result<Vec<f64>> {
        self.check_key(collective)?;
        let (primes, _) = collective.upload_level();
        let signers = collective.signers_of(shares)?;
        let named = shares.first().map_or(&[][..], |s| &s.signers[..]);
        let k = self.request.primes;
        let mut seen: Vec<u32> = Vec::with_capacity(shares.len());
        for s in shares {
            self.check_share(collective, s, named)?;
            if seen.contains(&s.party) {
                return Err(HeError::Mismatch(format!(
                    "two of party {}'s distance shares",
                    s.party
                )));
            }
            seen.push(s.party);
        }
        check_complete(&signers, &seen, shares, "the distances need")?;
        let n = collective.ctx.params().degree() as f64;
        Ok((0..self.request.pairs())
            .map(|p| {
                let residues: Vec<u64> = (0..k)
                    .map(|j| {
                        let q = primes[j];
                        shares.iter().fold(self.c0[p * k + j], |acc, s| {
                            add(acc, s.values[p * k + j], q)
                        })
                    })
                    .collect();
                centered(&residues, &primes[..k]) * n / (2.0 * self.request.scale)
            })
            .collect())
    }
}

/// One hospital's answer to a [`DistanceRequest`]: per pair and prime, its
/// part of the constant coefficient, smudged.
#[derive(Clone, PartialEq, Eq)]
pub struct DistanceShare {
    party: u32,
    signers: Vec<u32>,
    digest: [u8; 32],
    /// `pairs * primes` residues.
    values: Vec<u64>,
}

impl fmt::Debug for DistanceShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistanceShare")
            .field("party", &self.party)
            .field("signers", &self.signers)
            .field("values", &self.values.len())
            .finish()
    }
}

impl Signed for DistanceShare {
    fn party(&self) -> u32 {
        self.party
    }
    fn signers(&self) -> &[u32] {
        &self.signers
    }
}

impl DistanceShare {
    /// The party that answered.
    pub fn party(&self) -> u32 {
        self.party
    }

    /// Bytes for the wire: magic, version, party (u32), the request's digest
    /// (32 bytes), signer count (u32) and signers (u32 each), value count
    /// (u32) and values (u64 each).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(49 + 4 * self.signers.len() + 8 * self.values.len());
        out.extend_from_slice(DISTANCE_SHARE_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.party.to_le_bytes());
        out.extend_from_slice(&self.digest);
        out.extend_from_slice(&(self.signers.len() as u32).to_le_bytes());
        for s in &self.signers {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(&(self.values.len() as u32).to_le_bytes());
        push_words(&mut out, &self.values);
        out
    }

    /// Parses [`DistanceShare::to_bytes`]: the layout, at most
    /// [`MAX_PARTIES`] signers and the values a request of at most 256
    /// points has; the rest is checked by [`Distances::combine`].
    pub fn from_bytes(collective: &CollectiveKey, bytes: &[u8]) -> Result<Self> {
        let bad = |m: &str| HeError::Malformed(format!("distance share: {m}"));
        let mut r = Reader::new(bytes);
        expect_magic(
            &mut r,
            DISTANCE_SHARE_MAGIC,
            "a fedcore-he distance share",
            &bad,
        )?;
        let party = r.u32().map_err(|_| bad("truncated"))?;
        let digest: [u8; 32] = r
            .take(32)
            .map_err(|_| bad("truncated"))?
            .try_into()
            .expect("32 bytes");
        let count = r.u32().map_err(|_| bad("truncated"))? as usize;
        if count > MAX_PARTIES {
            return Err(bad(&format!("{count} signers (at most {MAX_PARTIES})")));
        }
        let signers = (0..count)
            .map(|_| r.u32().map_err(|_| bad("truncated signers")))
            .collect::<Result<Vec<_>>>()?;
        let values = r.u32().map_err(|_| bad("truncated"))? as usize;
        let (primes, _) = collective.upload_level();
        let most = MAX_GRAM_POINTS * (MAX_GRAM_POINTS - 1) / 2 * primes.len();
        if values > most {
            return Err(bad(&format!("{values} values (at most {most})")));
        }
        let raw = r.take(values * 8).map_err(|_| bad("truncated values"))?;
        if !r.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Self {
            party,
            signers,
            digest,
            values: bytes_to_words(raw),
        })
    }
}

impl CollectiveKey {
    /// Refuses a distance bound this key's parameters cannot decrypt with
    /// its smudging (see [`CollectiveKey::distances`]).
    pub(crate) fn check_distance_bound(&self, bound: f64) -> Result<()> {
        let (_, bits) = self.upload_level();
        check_distance_params(self.ctx.params(), bits, self.parties.len(), bound)
    }

    /// The primes of the upload level and its modulus bits.
    fn upload_level(&self) -> (Vec<u64>, u32) {
        let ctx = self.ctx.engine().context();
        let level = &ctx.levels[self.ctx.upload_level_index()];
        (ctx.primes[..level.primes].to_vec(), level.modulus_bits)
    }

    /// The squared distances of every pair of `uploads` (fresh uploads under
    /// this key, one value per slot), under encryption, ready for the
    /// hospitals' collective decryption: per pair, the products of the
    /// ciphertexts' differences summed and relinearized once with the
    /// collective relinearization key. Needs that key
    /// ([`CollectiveKey::with_relinearization`]) and parameters whose upload
    /// level holds a squared distance up to `bound` with its smudging
    /// ([`CkksParams::multiparty_median`]).
    pub fn distances(&self, uploads: &[&EncryptedVector], bound: f64) -> Result<Distances> {
        self.check_distance_bound(bound)?;
        let (primes, _) = self.upload_level();
        if uploads.len() < 2 {
            return Err(HeError::OutOfRange(
                "squared distances need at least two uploads".into(),
            ));
        }
        let cts = self
            .ctx
            .pair_products(uploads, Pairs::SquaredDistances, false)?;
        let n = self.ctx.params().degree();
        let k = primes.len();
        let mut c0 = Vec::with_capacity(cts.len() * k);
        let mut c1 = Vec::with_capacity(cts.len() * k * n);
        let mut scale = 0.0;
        for ct in &cts {
            let raw = RawCiphertext::parse(&ct.to_bytes().map_err(seal_err)?, n, k)
                .map_err(HeError::Seal)?;
            if raw.primes != k || !raw.ntt {
                return Err(HeError::Seal(
                    "a product not at the upload level in NTT form".into(),
                ));
            }
            for (j, &q) in primes.iter().enumerate() {
                c0.push(constant_of(&raw.poly(0)[j * n..(j + 1) * n], q));
            }
            c1.extend_from_slice(raw.poly(1));
            scale = raw.scale;
        }
        let mut request = DistanceRequest {
            key_id: self.ctx.key_id(),
            points: uploads.len(),
            primes: k,
            scale,
            c1,
            digest: [0; 32],
        };
        request.digest = Sha256::digest(request.to_bytes()).into();
        Ok(Distances { request, c0 })
    }
}

impl Answer<'_> {
    fn distance_share(
        &self,
        collective: &CollectiveKey,
        request: &DistanceRequest,
    ) -> Result<DistanceShare> {
        if collective.ctx.params() != self.params {
            return Err(HeError::Mismatch(
                "the collective key has other parameters".into(),
            ));
        }
        if request.key_id != collective.ctx.key_id() {
            return Err(HeError::Mismatch(
                "a distance request under another collective key".into(),
            ));
        }
        let (primes, bits) = collective.upload_level();
        let parties = collective.parties.len();
        check_distance_params(self.params, bits, parties, self.distance_bound)?;
        let sigma = distance_sigma(self.params, parties, self.distance_bound);
        let mut h = Sha256::new();
        h.update(b"fedcore-he distance smudging v1");
        for w in self.secret {
            h.update(w.to_le_bytes());
        }
        h.update(request.digest);
        for p in &self.signers {
            h.update(p.to_le_bytes());
        }
        let seed: [u8; 32] = h.finalize().into();
        let n = self.params.degree();
        let k = request.primes;
        let values = (0..request.pairs())
            .into_par_iter()
            .map(|p| {
                let mut rng = ChaCha20Rng::from_seed(derive(&seed, p as u64));
                let smudge = gaussian_residues(&mut rng, sigma, &primes[..k]);
                let c1 = &request.c1[p * k * n..(p + 1) * k * n];
                (0..k)
                    .map(|j| {
                        let q = primes[j];
                        let share = constant_of_product(
                            &c1[j * n..(j + 1) * n],
                            &self.secret[j * n..(j + 1) * n],
                            q,
                        );
                        add(share, smudge[j], q)
                    })
                    .collect::<Vec<u64>>()
            })
            .collect::<Vec<_>>()
            .concat();
        Ok(DistanceShare {
            party: self.party,
            signers: self.signers.clone(),
            digest: request.digest,
            values,
        })
    }
}

impl PartyKey {
    /// Sets the largest squared distance this party's distance shares
    /// smudge for (default [`DEFAULT_DISTANCE_BOUND`], in `(0, 2^40]`; not
    /// written to its file). The smudging, and the decrypted distances'
    /// error ([`distance_error`]), grow with its square root.
    pub fn with_distance_bound(mut self, bound: f64) -> Result<Self> {
        check_bound(bound)?;
        self.distance_bound = bound;
        Ok(self)
    }

    /// This party's answer to the collective decryption of the squared
    /// distances in `request`: per pair and prime, `(c1 s_i)_0` plus
    /// smudging noise drawn from a generator keyed by its secret and the
    /// request (asked again, the same answer). A hospital should answer one
    /// request per round, for the round's uploads (docs/he.md: a server
    /// that sends something else is outside the semi-honest model).
    pub fn distance_share(
        &self,
        collective: &CollectiveKey,
        request: &DistanceRequest,
    ) -> Result<DistanceShare> {
        self.check_member(collective)?;
        self.answer().distance_share(collective, request)
    }
}

impl ThresholdKey {
    /// As [`PartyKey::with_distance_bound`].
    pub fn with_distance_bound(mut self, bound: f64) -> Result<Self> {
        check_bound(bound)?;
        self.distance_bound = bound;
        Ok(self)
    }

    /// This party's answer to the collective decryption of `request` within
    /// `signers` (as [`ThresholdKey::switch_share`] names them), with its
    /// Lagrange-weighted share in place of `s_i`.
    pub fn distance_share(
        &self,
        collective: &CollectiveKey,
        request: &DistanceRequest,
        signers: &[u32],
    ) -> Result<DistanceShare> {
        let secret = self.signing(collective, signers)?;
        self.answer(&secret, signers)
            .distance_share(collective, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARTIES: u32 = 3;

    struct Setup {
        params: CkksParams,
        parties: Vec<PartyKey>,
        collective: CollectiveKey,
    }

    /// Three parties at the median's parameters: CKG, then both RKG rounds,
    /// every share through its bytes.
    fn setup() -> Setup {
        let params = CkksParams::multiparty_median();
        let parties: Vec<PartyKey> = (1..=PARTIES)
            .map(|i| PartyKey::generate(params.clone(), i).unwrap())
            .collect();
        let crs = Crs::new([9; 32]);
        let shares: Vec<KeyShare> = parties.iter().map(|p| p.key_share(&crs).unwrap()).collect();
        let collective = CollectiveKey::combine(&params, &crs, &shares).unwrap();
        let wire = |s: RelinShare| RelinShare::from_bytes(&params, &s.to_bytes()).unwrap();
        let round1: Vec<RelinShare> = parties
            .iter()
            .map(|p| wire(p.relin_round1(&collective).unwrap()))
            .collect();
        let round2: Vec<RelinShare> = parties
            .iter()
            .map(|p| wire(p.relin_round2(&collective, &round1).unwrap()))
            .collect();
        let collective = collective.with_relinearization(&round1, &round2).unwrap();
        Setup {
            params,
            parties,
            collective,
        }
    }

    /// Four uploads of `len` values in [-1, 1) and their squared distances
    /// in the clear (pairs `i < j`, row by row).
    fn uploads(s: &Setup, len: usize) -> (Vec<EncryptedVector>, Vec<f64>) {
        let ctx = s.collective.context();
        let plain: Vec<Vec<f64>> = (0..4u64)
            .map(|i| {
                let mut rng = ChaCha20Rng::seed_from_u64(i);
                (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
            })
            .collect();
        let cts = plain
            .iter()
            .map(|v| {
                let bytes = ctx.encrypt_upload(v).unwrap().to_bytes().unwrap();
                ctx.load(&bytes, Form::Fresh).unwrap()
            })
            .collect();
        let mut d = Vec::new();
        for i in 0..4 {
            for j in i + 1..4 {
                d.push(
                    plain[i]
                        .iter()
                        .zip(&plain[j])
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum(),
                );
            }
        }
        (cts, d)
    }

    fn answers(s: &Setup, distances: &Distances) -> Vec<DistanceShare> {
        answers_of(s, distances, 4)
    }

    fn answers_of(s: &Setup, distances: &Distances, points: usize) -> Vec<DistanceShare> {
        let request =
            DistanceRequest::from_bytes(&s.collective, &distances.request().to_bytes(), points)
                .unwrap();
        s.parties
            .iter()
            .map(|p| {
                let share = p.distance_share(&s.collective, &request).unwrap();
                DistanceShare::from_bytes(&s.collective, &share.to_bytes()).unwrap()
            })
            .collect()
    }

    fn worst(got: &[f64], want: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(g, w)| (g - w).abs() / w)
            .fold(0.0, f64::max)
    }

    #[test]
    fn every_share_decrypts_the_squared_distances_and_one_fewer_gives_noise() {
        let s = setup();
        // Three ciphertexts per upload (8192 slots each), the last partly
        // filled.
        let (cts, want) = uploads(&s, 20_000);
        let refs: Vec<&EncryptedVector> = cts.iter().collect();
        let distances = s
            .collective
            .distances(&refs, DEFAULT_DISTANCE_BOUND)
            .unwrap();
        let shares = answers(&s, &distances);
        let got = distances.combine(&s.collective, &shares).unwrap();
        let expected_error = distance_error(&s.params, 3, 3, DEFAULT_DISTANCE_BOUND);
        eprintln!(
            "distances {got:?} vs {want:?}: worst relative error {:.1e} (smudging's deviation {expected_error:.1e})",
            worst(&got, &want)
        );
        assert!(worst(&got, &want) < 1e-6, "{got:?} vs {want:?}");
        // Asked again, every party gives the same answer.
        assert_eq!(answers(&s, &distances), shares);

        // N-of-N: two shares are refused, naming the missing party ...
        let err = distances.combine(&s.collective, &shares[..2]).unwrap_err();
        assert!(err.to_string().contains("missing [3]"), "{err}");
        // ... and with a well-formed zero share in its place the distances
        // are off by far more than 10^3 times their range.
        let mut forged = shares.clone();
        forged[2].values.iter_mut().for_each(|v| *v = 0);
        let noise = distances.combine(&s.collective, &forged).unwrap();
        let range = want.iter().copied().fold(0.0, f64::max);
        for (g, w) in noise.iter().zip(&want) {
            assert!((g - w).abs() > 1e3 * range, "{g} vs {w}");
        }
    }

    #[test]
    fn any_t_threshold_shares_decrypt_the_distances() {
        let s = setup();
        let members = s
            .parties
            .iter()
            .map(|p| (p.party(), p.transport_key()))
            .collect();
        let roster = Roster::new(2, members).unwrap();
        let crs = s.collective.crs();
        let deals: Vec<Deal> = s
            .parties
            .iter()
            .flat_map(|p| p.deal(&roster, &crs).unwrap())
            .collect();
        let keys: Vec<ThresholdKey> = s
            .parties
            .iter()
            .map(|p| {
                p.threshold_key(&roster, &crs, &Deal::addressed_to(&deals, p.party()))
                    .unwrap()
            })
            .collect();
        let collective = s.collective.clone().with_roster(roster).unwrap();
        let (cts, want) = uploads(&s, 9_000);
        let refs: Vec<&EncryptedVector> = cts.iter().collect();
        let distances = collective.distances(&refs, DEFAULT_DISTANCE_BOUND).unwrap();
        for signers in [[1u32, 2], [1, 3], [2, 3]] {
            let shares: Vec<DistanceShare> = keys
                .iter()
                .filter(|k| signers.contains(&k.party()))
                .map(|k| {
                    k.distance_share(&collective, distances.request(), &signers)
                        .unwrap()
                })
                .collect();
            let got = distances.combine(&collective, &shares).unwrap();
            assert!(
                worst(&got, &want) < 1e-6,
                "{signers:?}: {got:?} vs {want:?}"
            );
            // One signer's share alone is refused ...
            let err = distances.combine(&collective, &shares[..1]).unwrap_err();
            assert!(err.to_string().contains("missing"), "{err}");
            // ... and with a zero share for the other it gives noise.
            let mut forged = shares.clone();
            forged[1].values.iter_mut().for_each(|v| *v = 0);
            let noise = distances.combine(&collective, &forged).unwrap();
            let range = want.iter().copied().fold(0.0, f64::max);
            assert!(
                noise
                    .iter()
                    .zip(&want)
                    .all(|(g, w)| (g - w).abs() > 1e3 * range)
            );
        }
        // A single signer is below the threshold.
        let err = keys[0]
            .distance_share(&collective, distances.request(), &[1])
            .unwrap_err();
        assert!(err.to_string().contains("threshold"), "{err}");
    }

    #[test]
    fn malformed_or_foreign_shares_and_requests_are_refused_with_a_reason() {
        let s = setup();
        let (cts, _) = uploads(&s, 100);
        let refs: Vec<&EncryptedVector> = cts.iter().collect();
        let distances = s
            .collective
            .distances(&refs, DEFAULT_DISTANCE_BOUND)
            .unwrap();
        let bytes = distances.request().to_bytes();
        let err = |r: Result<DistanceRequest>| r.unwrap_err().to_string();
        // The request: another point count, truncated, an unreduced
        // coefficient, under another collective key.
        assert!(
            err(DistanceRequest::from_bytes(&s.collective, &bytes, 5)).contains("5 are expected")
        );
        assert!(
            err(DistanceRequest::from_bytes(
                &s.collective,
                &bytes[..bytes.len() - 1],
                4
            ))
            .contains("truncated")
        );
        let mut unreduced = bytes.clone();
        let at = bytes.len() - 8;
        unreduced[at..].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            err(DistanceRequest::from_bytes(&s.collective, &unreduced, 4)).contains("not reduced")
        );
        let other = {
            let crs = Crs::new([10; 32]);
            let shares: Vec<KeyShare> = s
                .parties
                .iter()
                .map(|p| p.key_share(&crs).unwrap())
                .collect();
            CollectiveKey::combine(&s.params, &crs, &shares).unwrap()
        };
        assert!(
            err(DistanceRequest::from_bytes(&other, &bytes, 4)).contains("another collective key")
        );
        // Without the relinearization key the server cannot form them.
        let plain_refs: Vec<&EncryptedVector> = cts.iter().collect();
        let e = other
            .distances(&plain_refs, DEFAULT_DISTANCE_BOUND)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no evaluation keys"), "{e}");

        // Shares: for another request, twice from one party, a stranger's,
        // an unreduced value, truncated bytes.
        let shares = answers(&s, &distances);
        let again = s
            .collective
            .distances(&refs[..3], DEFAULT_DISTANCE_BOUND)
            .unwrap();
        let e = again
            .combine(&s.collective, &shares)
            .unwrap_err()
            .to_string();
        assert!(e.contains("another request"), "{e}");
        let mut twice = shares.clone();
        twice[1] = twice[0].clone();
        let e = distances
            .combine(&s.collective, &twice)
            .unwrap_err()
            .to_string();
        assert!(e.contains("two of party 1"), "{e}");
        let mut stranger = shares.clone();
        stranger[2].party = 9;
        let e = distances
            .combine(&s.collective, &stranger)
            .unwrap_err()
            .to_string();
        assert!(e.contains("party 9"), "{e}");
        let mut big = shares.clone();
        big[0].values[3] = u64::MAX;
        let e = distances
            .combine(&s.collective, &big)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not reduced"), "{e}");
        let b = shares[0].to_bytes();
        assert!(DistanceShare::from_bytes(&s.collective, &b[..b.len() - 3]).is_err());
        // A distance bound the upload level cannot hold.
        let e = s.parties[0]
            .clone()
            .with_distance_bound(2f64.powi(40))
            .unwrap()
            .distance_share(&s.collective, distances.request())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bits at the upload level"), "{e}");
        assert!(s.parties[0].clone().with_distance_bound(f64::NAN).is_err());

        // Relinearization shares: round 2 from another first round, a
        // first-round share of another seed, a missing party, a hospital
        // whose own first share is not among those it is given.
        let round1: Vec<RelinShare> = s
            .parties
            .iter()
            .map(|p| p.relin_round1(&s.collective).unwrap())
            .collect();
        let e = s.parties[0]
            .relin_round2(&s.collective, &round1[1..])
            .unwrap_err()
            .to_string();
        assert!(e.contains("own first-round share"), "{e}");
        let foreign: Vec<RelinShare> = s
            .parties
            .iter()
            .map(|p| p.relin_round1(&other).unwrap())
            .collect();
        let mut mixed = round1.clone();
        mixed[2] = foreign[2].clone();
        let e = s.parties[0]
            .relin_round2(&s.collective, &mixed)
            .unwrap_err()
            .to_string();
        assert!(e.contains("another collective key's seed"), "{e}");
        let round2: Vec<RelinShare> = s
            .parties
            .iter()
            .map(|p| p.relin_round2(&s.collective, &round1).unwrap())
            .collect();
        let other2: Vec<RelinShare> = foreign
            .iter()
            .zip(&s.parties)
            .map(|(_, p)| p.relin_round2(&other, &foreign).unwrap())
            .collect();
        let e = s
            .collective
            .clone()
            .with_relinearization(
                &round1,
                &[round2[0].clone(), round2[1].clone(), other2[2].clone()],
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("another collective key's seed"), "{e}");
        let e = s
            .collective
            .clone()
            .with_relinearization(&round1, &round2[..2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing [3]"), "{e}");
        // A second round made from another first round (party 3's first
        // share altered on the way to the others) is refused.
        let mut altered = round1.clone();
        let q = s.collective.context().engine().context().primes[0];
        let mut bytes = altered[2].to_bytes();
        let w = u64::from_le_bytes(bytes[78..86].try_into().unwrap());
        bytes[78..86].copy_from_slice(&((w + 1) % q).to_le_bytes());
        altered[2] = RelinShare::from_bytes(&s.params, &bytes).unwrap();
        let stale: Vec<RelinShare> = s.parties[..2]
            .iter()
            .map(|p| p.relin_round2(&s.collective, &altered).unwrap())
            .chain([round2[2].clone()])
            .collect();
        let e = s
            .collective
            .clone()
            .with_relinearization(&round1, &stale)
            .unwrap_err()
            .to_string();
        assert!(e.contains("answers another first round"), "{e}");
        let e = s
            .collective
            .clone()
            .with_relinearization(&round2, &round2)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a round-2 share"), "{e}");
        let bytes = round1[0].to_bytes();
        let e = RelinShare::from_bytes(&s.params, &bytes[..bytes.len() - 8])
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
        let e = RelinShare::from_bytes(&CkksParams::multiparty(), &bytes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected"), "{e}");
    }

    /// SEAL's encoding of `values` as the upload encodes them, read back in
    /// the NTT domain (multiplied into a ciphertext whose first polynomial
    /// is the constant 1): per ciphertext, `primes * N` words.
    fn encoded(ctx: &CkksContext<Public>, values: &[f64]) -> Vec<Vec<u64>> {
        let engine = ctx.engine();
        let level = ctx.upload_level_index();
        let seal_ctx = engine.context();
        let (n, k) = (ctx.params().degree(), seal_ctx.levels[level].primes);
        let ones = RawCiphertext {
            parms_id: seal_ctx.levels[level].parms_id,
            ntt: true,
            size: 2,
            degree: n,
            primes: k,
            scale: 1.0,
            data: vec![1; 2 * k * n],
        };
        let ones = seal::Ciphertext::from_bytes(seal_ctx, &ones.to_bytes()).unwrap();
        let scale = 2f64.powi(ctx.params().scale_bits() as i32);
        values
            .chunks(ctx.slots())
            .map(|chunk| {
                let pt = engine.encode(chunk, level, scale).unwrap();
                let ct = engine.multiply_plain(&ones, &pt).unwrap();
                let raw = RawCiphertext::parse(&ct.to_bytes().unwrap(), n, k).unwrap();
                raw.poly(0).to_vec()
            })
            .collect()
    }

    /// The distances' own noise, measured exactly: the unsmudged constant
    /// coefficient minus that of the product of SEAL's very encodings is
    /// the noise the encryption (and the relinearization) added, which the
    /// smudging must cover; the smudging actually added is about its
    /// deviation.
    #[test]
    fn the_smudging_covers_the_distances_own_noise_and_is_there() {
        let s = setup();
        let ctx = s.collective.context();
        let plain: Vec<Vec<f64>> = (0..3u64)
            .map(|i| {
                let mut rng = ChaCha20Rng::seed_from_u64(10 + i);
                (0..12_000).map(|_| rng.random_range(-1.0..1.0)).collect()
            })
            .collect();
        let cts: Vec<EncryptedVector> = plain
            .iter()
            .map(|x| ctx.encrypt_upload(x).unwrap())
            .collect();
        let pts: Vec<Vec<Vec<u64>>> = plain.iter().map(|x| encoded(ctx, x)).collect();
        let refs: Vec<&EncryptedVector> = cts.iter().collect();
        let distances = s
            .collective
            .distances(&refs, DEFAULT_DISTANCE_BOUND)
            .unwrap();
        let request = distances.request();
        let (primes, _) = s.collective.upload_level();
        let (n, k) = (s.params.degree(), primes.len());
        let sigma = distance_sigma(&s.params, 3, DEFAULT_DISTANCE_BOUND);
        let shares = answers_of(&s, &distances, 3);
        let mut smudges = Vec::new();
        let mut pair = 0;
        for i in 0..3 {
            for j in i + 1..3 {
                let mut noise = Vec::with_capacity(k);
                for (p, &q) in primes.iter().enumerate() {
                    let c1 = &request.c1[(pair * k + p) * n..(pair * k + p + 1) * n];
                    let mut acc = distances.c0[pair * k + p];
                    for (party, share) in s.parties.iter().zip(&shares) {
                        let secret = &party.secret().data[p * n..(p + 1) * n];
                        let own = constant_of_product(c1, secret, q);
                        acc = add(acc, own, q);
                        smudges.push(sub(share.values[pair * k + p], own, q));
                    }
                    // The constant coefficient of sum_c (m_ic - m_jc)^2.
                    let exact = pts[i].iter().zip(&pts[j]).fold(0, |e, (a, b)| {
                        let d: Vec<u64> =
                            (0..n).map(|t| sub(a[p * n + t], b[p * n + t], q)).collect();
                        add(e, constant_of_product(&d, &d, q), q)
                    });
                    noise.push(sub(acc, exact, q));
                }
                let e0 = centered(&noise, &primes).abs();
                let d: f64 = plain[i]
                    .iter()
                    .zip(&plain[j])
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum();
                let bound = distance_noise_bound(&s.params, 3, d);
                eprintln!(
                    "pair {i}-{j}: D = {d:.1}, noise 2^{:.1}, bound 2^{:.1}",
                    e0.log2(),
                    bound.log2()
                );
                assert!(
                    e0 > 0.0 && e0 < bound / 8.0,
                    "noise {e0:e} vs bound {bound:e}"
                );
                pair += 1;
            }
        }
        // Each party's smudging: residues of one integer per pair, of
        // deviation sigma.
        let mut squares = 0.0;
        let mut count = 0.0;
        for pair in 0..3 {
            for party in 0..3 {
                let residues: Vec<u64> = (0..k)
                    .map(|p| smudges[(pair * k + p) * 3 + party])
                    .collect();
                let v = centered(&residues, &primes);
                assert!(v.abs() < 8.0 * sigma, "{v:e} vs sigma {sigma:e}");
                squares += v * v;
                count += 1.0;
            }
        }
        let deviation = (squares / count).sqrt();
        // Nine samples: chi-square with 9 degrees of freedom leaves this band
        // with a probability below 1e-6.
        assert!(
            (0.25 * sigma..2.5 * sigma).contains(&deviation),
            "{deviation:e} vs {sigma:e}"
        );
    }

    #[test]
    fn the_integer_is_read_back_through_the_primes_with_either_sign() {
        let primes = [
            1_152_921_504_606_584_833u64,
            1_152_921_504_598_720_513,
            1_099_511_922_689,
        ];
        for x in [
            0i128,
            1,
            -1,
            123_456_789_012_345_678_901_234,
            -987_654_321_098_765_432_109,
        ] {
            let residues: Vec<u64> = primes
                .iter()
                .map(|&q| x.rem_euclid(q as i128) as u64)
                .collect();
            let got = centered(&residues, &primes);
            assert!(
                (got - x as f64).abs() <= (x as f64).abs() * 1e-15,
                "{x}: {got}"
            );
        }
        // A Gaussian far wider than 2^64 has the same residues' integer.
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let sigma = 2f64.powi(100);
        let mut total = 0.0;
        for _ in 0..200 {
            let r = gaussian_residues(&mut rng, sigma, &primes);
            let v = centered(&r, &primes);
            assert!(v.abs() < 8.0 * sigma);
            total += v * v;
        }
        let deviation = (total / 200.0).sqrt();
        assert!(
            (0.8 * sigma..1.2 * sigma).contains(&deviation),
            "{deviation:e}"
        );
    }
}
