//! Collective relinearization keys without a dealer: the two-round RKG
//! protocol of Mouchet, Troncoso-Pastoriza, Bossuat and Hubaux (PoPETs
//! 2021, section 4.2), in SEAL's key format.
//!
//! SEAL relinearizes with a key-switching key for `s^2` under `s`: one
//! key-level ciphertext per data prime `q_j`, `(b_j, a_j)` with
//! `b_j + a_j s = w_j s^2 + e`, where the gadget `w_j` is `P mod q_j` on
//! prime `j` and zero on every other prime (`P` the special prime). With
//! `s = sum s_i` held by nobody:
//!
//! 1. each party draws an ephemeral ternary `u_i` and publishes, for every
//!    `j`, `h0_ij = -u_i a_j + w_j s_i + e0` and `h1_ij = s_i a_j + e1`
//!    (`a_j` expanded from the collective key's seed);
//! 2. with the sums `H0_j`, `H1_j` of every party's first share, each party
//!    publishes `h0'_ij = s_i H0_j + e2` and `h1'_ij = (u_i - s_i) H1_j + e3`;
//! 3. the key is `(sum_i h0'_ij + h1'_ij, H1_j)`:
//!    `b_j + H1_j s = s H0_j + u H1_j + noise = w_j s^2 + noise`.
//!
//! `u_i` and every error are drawn from ChaCha20 keyed by the party's secret
//! and the seed (the second round's errors also by the first round's sum):
//! nothing is stored between the rounds, and a party asked twice gives the
//! same answer, so averaging answers wears nothing down.

use super::*;

const RELIN_SHARE_MAGIC: &[u8; 4] = b"FCRK";

/// One party's share of a round of the collective relinearization-key
/// generation ([`PartyKey::relin_round1`], [`CollectiveKey::with_relinearization`]).
/// Public: under RLWE it reveals nothing of the party's secret.
#[derive(Clone, PartialEq, Eq)]
pub struct RelinShare {
    party: u32,
    round: u8,
    crs: Crs,
    /// Round 2: SHA-256 of the first round's sum it was made from; zero in
    /// round 1.
    round1: [u8; 32],
    /// `2 L` polynomials over the `L + 1` key-level primes, NTT form:
    /// `h0_0 .. h0_(L-1)`, then `h1_0 .. h1_(L-1)`.
    data: Vec<u64>,
}

impl fmt::Debug for RelinShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelinShare")
            .field("party", &self.party)
            .field("round", &self.round)
            .field("crs", &self.crs)
            .field("coefficients", &self.data.len())
            .finish()
    }
}

impl RelinShare {
    /// The party that made it.
    pub fn party(&self) -> u32 {
        self.party
    }

    /// The round it belongs to: 1 or 2.
    pub fn round(&self) -> u8 {
        self.round
    }

    /// Bytes for the wire: magic, version, round, party (u32), seed (32
    /// bytes), the first round's digest (32 bytes), coefficient count (u32),
    /// the coefficients (u64 each).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(78 + 8 * self.data.len());
        out.extend_from_slice(RELIN_SHARE_MAGIC);
        out.push(VERSION);
        out.push(self.round);
        out.extend_from_slice(&self.party.to_le_bytes());
        out.extend_from_slice(&self.crs.0);
        out.extend_from_slice(&self.round1);
        out.extend_from_slice(&(self.data.len() as u32).to_le_bytes());
        push_words(&mut out, &self.data);
        out
    }

    /// Parses [`RelinShare::to_bytes`] for `params`: the layout and the
    /// exact length here; the coefficients against the primes where the
    /// shares are added.
    pub fn from_bytes(params: &CkksParams, bytes: &[u8]) -> Result<Self> {
        let bad = |m: &str| HeError::Malformed(format!("relinearization share: {m}"));
        let mut r = Reader::new(bytes);
        expect_magic(
            &mut r,
            RELIN_SHARE_MAGIC,
            "a fedcore-he relinearization share",
            &bad,
        )?;
        let round = r.u8().map_err(|_| bad("truncated"))?;
        if !(1..=2).contains(&round) {
            return Err(bad(&format!("round {round}; there are two")));
        }
        let party = r.u32().map_err(|_| bad("truncated"))?;
        let crs = Crs(r
            .take(32)
            .map_err(|_| bad("truncated"))?
            .try_into()
            .expect("32 bytes"));
        let round1: [u8; 32] = r
            .take(32)
            .map_err(|_| bad("truncated"))?
            .try_into()
            .expect("32 bytes");
        let count = r.u32().map_err(|_| bad("truncated"))? as usize;
        let expected = share_words(params);
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
            round,
            crs,
            round1,
            data: bytes_to_words(raw),
        })
    }
}

/// Words in a share: `2 L` polynomials of `N` coefficients over `L + 1`
/// primes.
fn share_words(params: &CkksParams) -> usize {
    let k = params.coeff_bits().len();
    2 * (k - 1) * k * params.degree()
}

/// `a_j` of the relinearization key: uniform below each key-level prime,
/// from the collective key's seed, apart from the key share's `a`.
fn relin_a(crs: &Crs, j: usize, primes: &[u64], degree: usize) -> Vec<u64> {
    let mut h = Sha256::new();
    h.update(b"fedcore-he relinearization key a_j v1");
    h.update(crs.0);
    h.update((j as u64).to_le_bytes());
    let mut rng = ChaCha20Rng::from_seed(h.finalize().into());
    let mut a = Vec::with_capacity(primes.len() * degree);
    for &q in primes {
        a.extend((0..degree).map(|_| rng.random_range(0..q)));
    }
    a
}

/// The sum of one round's shares, every coefficient checked; the shares must
/// be for `round` and `crs`, one from each of `parties` and nothing else.
fn sum_round(
    collective: &CollectiveKey,
    shares: &[RelinShare],
    round: u8,
    round1: &[u8; 32],
) -> Result<Vec<u64>> {
    let params = collective.ctx.params();
    let primes = &collective.ctx.engine().context().primes;
    let n = params.degree();
    let mut seen: Vec<u32> = Vec::with_capacity(shares.len());
    for s in shares {
        let who = format!("party {}'s round-{round} relinearization share", s.party);
        if s.round != round {
            return Err(HeError::Mismatch(format!(
                "{who} is a round-{} share",
                s.round
            )));
        }
        if s.crs != collective.crs {
            return Err(HeError::Mismatch(format!(
                "{who} is for another collective key's seed"
            )));
        }
        if &s.round1 != round1 {
            return Err(HeError::Mismatch(format!(
                "{who} answers another first round"
            )));
        }
        if !collective.parties.contains(&s.party) {
            return Err(HeError::Mismatch(format!(
                "{who}: the party is not in the collective key"
            )));
        }
        if seen.contains(&s.party) {
            return Err(HeError::Mismatch(format!("two of {who}")));
        }
        if s.data.len() != share_words(params) {
            return Err(HeError::Malformed(format!(
                "{who} has {} coefficients, expected {}",
                s.data.len(),
                share_words(params)
            )));
        }
        for (c, poly) in s.data.chunks(primes.len() * n).enumerate() {
            check_reduced(poly, primes, n, &format!("{who}, polynomial {c}"))?;
        }
        seen.push(s.party);
    }
    let missing: Vec<u32> = collective
        .parties
        .iter()
        .copied()
        .filter(|p| !seen.contains(p))
        .collect();
    if !missing.is_empty() {
        return Err(HeError::Mismatch(format!(
            "the relinearization key needs every party's round-{round} share; missing {missing:?}"
        )));
    }
    let kn = primes.len() * n;
    let mut sum = vec![0u64; share_words(params)];
    sum.par_iter_mut().enumerate().for_each(|(i, out)| {
        let q = primes[(i % kn) / n];
        *out = shares.iter().fold(0, |acc, s| add(acc, s.data[i], q));
    });
    Ok(sum)
}

fn digest_words(tag: &[u8], words: &[u64]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(tag);
    for w in words {
        h.update(w.to_le_bytes());
    }
    h.finalize().into()
}

impl PartyKey {
    /// A generator only this party can seed, the same for the same inputs.
    fn relin_rng(&self, crs: &Crs, what: &[u8], round1: &[u8; 32]) -> ChaCha20Rng {
        let mut h = Sha256::new();
        h.update(b"fedcore-he relinearization key v1");
        h.update(what);
        for w in &self.secret.data {
            h.update(w.to_le_bytes());
        }
        h.update(crs.0);
        h.update(round1);
        ChaCha20Rng::from_seed(h.finalize().into())
    }

    /// The ephemeral ternary secret `u_i` (NTT form, key level).
    fn relin_ephemeral(&self, crs: &Crs, ntt: &KeyNtt) -> Result<Vec<u64>> {
        let mut rng = self.relin_rng(crs, b"u", &[0; 32]);
        let u: Vec<i128> = (0..self.params.degree())
            .map(|_| rng.random_range(-1i128..=1))
            .collect();
        ntt.ntt(&u)
    }

    pub(super) fn check_member(&self, collective: &CollectiveKey) -> Result<()> {
        if collective.ctx.params() != &self.params {
            return Err(HeError::Mismatch(
                "the collective key has other parameters".into(),
            ));
        }
        if !collective.parties.contains(&self.party) {
            return Err(HeError::Mismatch(format!(
                "party {} is not in the collective key",
                self.party
            )));
        }
        Ok(())
    }

    /// This party's share of the first round of the collective
    /// relinearization key for `collective` (whose seed it uses).
    pub fn relin_round1(&self, collective: &CollectiveKey) -> Result<RelinShare> {
        self.check_member(collective)?;
        let crs = collective.crs;
        let n = self.params.degree();
        let primes = &self.ctx.primes;
        let k = primes.len();
        let special = primes[k - 1];
        let ntt = KeyNtt::new(&self.params, primes)?;
        let u = self.relin_ephemeral(&crs, &ntt)?;
        let mut rng = self.relin_rng(&crs, b"round 1 errors", &[0; 32]);
        let s = &self.secret.data;
        let mut h0 = Vec::with_capacity((k - 1) * k * n);
        let mut h1 = Vec::with_capacity((k - 1) * k * n);
        for j in 0..k - 1 {
            let a = relin_a(&crs, j, primes, n);
            let e0 = ntt.ntt(&key_error(&mut rng, n))?;
            let e1 = ntt.ntt(&key_error(&mut rng, n))?;
            let w = special % primes[j];
            for i in 0..k * n {
                let (p, q) = (i / n, primes[i / n]);
                let gadget = if p == j { mul(w, s[i], q) } else { 0 };
                h0.push(add(sub(gadget, mul(u[i], a[i], q), q), e0[i], q));
                h1.push(add(mul(s[i], a[i], q), e1[i], q));
            }
        }
        h0.extend(h1);
        Ok(RelinShare {
            party: self.party,
            round: 1,
            crs,
            round1: [0; 32],
            data: h0,
        })
    }

    /// This party's share of the second round, from every party's first
    /// round shares (it adds them itself, and checks that its own is among
    /// them as it made it).
    pub fn relin_round2(
        &self,
        collective: &CollectiveKey,
        round1: &[RelinShare],
    ) -> Result<RelinShare> {
        self.check_member(collective)?;
        let own = self.relin_round1(collective)?;
        if !round1.contains(&own) {
            return Err(HeError::Mismatch(format!(
                "party {}'s own first-round share is not among the shares given",
                self.party
            )));
        }
        let sum = sum_round(collective, round1, 1, &[0; 32])?;
        let digest = digest_words(b"fedcore-he relinearization round 1", &sum);
        let crs = collective.crs;
        let n = self.params.degree();
        let primes = &self.ctx.primes;
        let k = primes.len();
        let kn = k * n;
        let ntt = KeyNtt::new(&self.params, primes)?;
        let u = self.relin_ephemeral(&crs, &ntt)?;
        let mut rng = self.relin_rng(&crs, b"round 2 errors", &digest);
        let s = &self.secret.data;
        let (big0, big1) = sum.split_at((k - 1) * kn);
        let mut h0 = Vec::with_capacity((k - 1) * kn);
        let mut h1 = Vec::with_capacity((k - 1) * kn);
        for j in 0..k - 1 {
            let e2 = ntt.ntt(&key_error(&mut rng, n))?;
            let e3 = ntt.ntt(&key_error(&mut rng, n))?;
            for i in 0..kn {
                let q = primes[i / n];
                h0.push(add(mul(s[i], big0[j * kn + i], q), e2[i], q));
                h1.push(add(mul(sub(u[i], s[i], q), big1[j * kn + i], q), e3[i], q));
            }
        }
        h0.extend(h1);
        Ok(RelinShare {
            party: self.party,
            round: 2,
            crs,
            round1: digest,
            data: h0,
        })
    }
}

impl CollectiveKey {
    /// This collective key with the relinearization key made from every
    /// party's shares of both rounds ([`PartyKey::relin_round1`],
    /// [`PartyKey::relin_round2`]): the server's context (and every
    /// hospital's) can then multiply ciphertexts, which the encrypted
    /// geometric median's distances need ([`CollectiveKey::distances`]).
    /// Every share is checked (round, seed, party, one each, the second
    /// round made from this first round's sum, reduced coefficients) before
    /// the key is built, and SEAL validates the key it loads.
    pub fn with_relinearization(
        mut self,
        round1: &[RelinShare],
        round2: &[RelinShare],
    ) -> Result<Self> {
        let sum1 = sum_round(&self, round1, 1, &[0; 32])?;
        let digest = digest_words(b"fedcore-he relinearization round 1", &sum1);
        let sum2 = sum_round(&self, round2, 2, &digest)?;
        let seal_ctx = self.ctx.engine().context().clone();
        let primes = &seal_ctx.primes;
        let (n, k) = (self.ctx.params().degree(), primes.len());
        let kn = k * n;
        // The key level's parms_id, from a throwaway public key (a key-level
        // object) of the same context.
        let (_, template) = seal::keygen(&seal_ctx).map_err(seal_err)?;
        let parms_id = RawCiphertext::parse(&template.to_bytes().map_err(seal_err)?, n, k)
            .map_err(HeError::Seal)?
            .parms_id;
        let keys: Vec<RawCiphertext> = (0..k - 1)
            .map(|j| {
                let mut data = Vec::with_capacity(2 * kn);
                data.extend((0..kn).map(|i| {
                    let q = primes[i / n];
                    add(sum2[j * kn + i], sum2[(k - 1 + j) * kn + i], q)
                }));
                data.extend_from_slice(&sum1[(k - 1 + j) * kn..(k + j) * kn]);
                RawCiphertext {
                    parms_id,
                    ntt: true,
                    size: 2,
                    degree: n,
                    primes: k,
                    scale: 1.0,
                    data,
                }
            })
            .collect();
        let raw = raw::relin_keys_bytes(parms_id, &keys);
        self.ctx = self.ctx.with_relinearization_keys(&raw)?;
        Ok(self)
    }
}
