//! SEAL's uncompressed serialization of ciphertexts, public keys and secret
//! keys, read and written in safe Rust, so that the multiparty protocols
//! ([`crate::multiparty`]) can compute on polynomial coefficients.
//!
//! SEAL's C API reads and writes coefficients one at a time; its byte format
//! gives them all at once. Reading checks every header field and length
//! against what the caller expects; what is written goes back through SEAL's
//! own validated loading (known parameters, reduced coefficients), so a bug
//! here cannot hand SEAL an invalid object.
//!
//! Layouts (SEAL 4.0, `compr_mode_type::none`, little-endian):
//! - header: magic `0xA15E` (u16), header size 16 (u8), version 4.0 (two
//!   u8), compression mode (u8), reserved (u16), total size (u64);
//! - ciphertext (public keys are one): header, `parms_id` (4 u64), NTT form
//!   (u8), size (u64), degree (u64), primes (u64), scale (f64), correction
//!   factor (u64), then the coefficients as a nested object (header, count
//!   u64, count u64 words: polynomial by polynomial, prime by prime);
//! - secret key (a plaintext): header, `parms_id`, coefficient count (u64),
//!   scale (f64), then the coefficients as a nested object.

use crypto_bigint::{U64, U192};

use crate::reader::Reader;
use crate::seal::ParmsId;

const MAGIC: u16 = 0xA15E;
const HEADER: usize = 16;

fn header(out: &mut Vec<u8>, total: usize) {
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(HEADER as u8);
    out.push(4);
    out.push(0);
    out.push(0);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(total as u64).to_le_bytes());
}

fn read_header(r: &mut Reader<'_>, len: usize, what: &str) -> Result<(), String> {
    let short = |_| format!("{what}: truncated header");
    let h = r.take(HEADER).map_err(short)?;
    let magic = u16::from_le_bytes([h[0], h[1]]);
    let size = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if magic != MAGIC || h[2] != HEADER as u8 || h[3] != 4 {
        return Err(format!("{what}: not a SEAL 4 object"));
    }
    if h[5] != 0 {
        return Err(format!("{what}: compressed; expected uncompressed"));
    }
    if size != len as u64 {
        return Err(format!("{what}: header says {size} bytes, {len} given"));
    }
    Ok(())
}

fn parms_id(r: &mut Reader<'_>) -> Result<ParmsId, crate::reader::Short> {
    Ok([r.u64()?, r.u64()?, r.u64()?, r.u64()?])
}

fn words(r: &mut Reader<'_>, count: usize, what: &str) -> Result<Vec<u64>, String> {
    let bytes = r
        .take(count.checked_mul(8).ok_or(format!("{what}: too long"))?)
        .map_err(|_| format!("{what}: truncated coefficients"))?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn nested_words(r: &mut Reader<'_>, count: usize, what: &str) -> Result<Vec<u64>, String> {
    let rest = HEADER + 8 + count * 8;
    read_header(r, rest, what)?;
    let n = r.u64().map_err(|_| format!("{what}: truncated"))?;
    if n != count as u64 {
        return Err(format!("{what}: {n} coefficients, expected {count}"));
    }
    words(r, count, what)
}

fn push_nested(out: &mut Vec<u8>, data: &[u64]) {
    header(out, HEADER + 8 + data.len() * 8);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    for w in data {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// SEAL's uncompressed serialization of key-switching keys with one key
/// slot, index 0 (relinearization keys: the key for `s^2`), holding `keys`
/// (key-level ciphertexts, one per data prime).
pub(crate) fn relin_keys_bytes(parms_id: ParmsId, keys: &[RawCiphertext]) -> Vec<u8> {
    let body: Vec<Vec<u8>> = keys.iter().map(RawCiphertext::to_bytes).collect();
    let total = HEADER + 32 + 8 + 8 + body.iter().map(Vec::len).sum::<usize>();
    let mut out = Vec::with_capacity(total);
    header(&mut out, total);
    for w in parms_id {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&1u64.to_le_bytes());
    out.extend_from_slice(&(keys.len() as u64).to_le_bytes());
    for b in &body {
        out.extend_from_slice(b);
    }
    debug_assert_eq!(out.len(), total);
    out
}

/// A ciphertext's (or public key's) polynomials in RNS form.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawCiphertext {
    pub(crate) parms_id: ParmsId,
    pub(crate) ntt: bool,
    /// Number of polynomials.
    pub(crate) size: usize,
    /// Polynomial degree.
    pub(crate) degree: usize,
    /// Number of primes.
    pub(crate) primes: usize,
    pub(crate) scale: f64,
    /// `size * primes * degree` words: polynomial by polynomial, prime by prime.
    pub(crate) data: Vec<u64>,
}

impl RawCiphertext {
    /// Parses SEAL's uncompressed ciphertext bytes, expecting `degree` and at
    /// most `max_primes` primes and 2 polynomials (all this crate makes).
    pub(crate) fn parse(bytes: &[u8], degree: usize, max_primes: usize) -> Result<Self, String> {
        match Self::parse_any(bytes, degree, max_primes)? {
            (raw, None) => Ok(raw),
            (_, Some(_)) => Err("ciphertext: seeded; expected both polynomials".into()),
        }
    }

    /// [`RawCiphertext::parse`], also accepting a seeded ciphertext (as
    /// SEAL saves one from seeded symmetric encryption: the first
    /// polynomial, then the seed record), whose `data` then holds the first
    /// polynomial only. The seed record is checked in full (uncompressed,
    /// its exact size, a known PRNG) so that SEAL never reads a size from it.
    pub(crate) fn parse_any(
        bytes: &[u8],
        degree: usize,
        max_primes: usize,
    ) -> Result<(Self, Option<Seed>), String> {
        let what = "ciphertext";
        let mut r = Reader::new(bytes);
        read_header(&mut r, bytes.len(), what)?;
        let short = |_| format!("{what}: truncated metadata");
        let parms_id = parms_id(&mut r).map_err(short)?;
        let ntt = r.u8().map_err(short)? != 0;
        let size = r.u64().map_err(short)?;
        let n = r.u64().map_err(short)?;
        let k = r.u64().map_err(short)?;
        let scale = f64::from_bits(r.u64().map_err(short)?);
        let _correction = r.u64().map_err(short)?;
        if size != 2 || n != degree as u64 || k == 0 || k > max_primes as u64 {
            return Err(format!(
                "{what}: {size} polynomials of degree {n} over {k} primes; expected 2 of degree {degree} over at most {max_primes}"
            ));
        }
        let full = 2 * degree * k as usize;
        let seeded = r.rest_len() == HEADER + 8 + full / 2 * 8 + SEED_RECORD;
        let data = nested_words(&mut r, if seeded { full / 2 } else { full }, what)?;
        let seed = if seeded {
            let mut record = Reader::new(r.take(SEED_RECORD).expect("length checked"));
            read_header(&mut record, SEED_RECORD, "seed record")?;
            let seed: Seed = record
                .take(SEED)
                .expect("length checked")
                .try_into()
                .expect("65");
            check_prng(seed[0])?;
            Some(seed)
        } else {
            None
        };
        if !r.is_empty() {
            return Err(format!("{what}: trailing bytes"));
        }
        let raw = Self {
            parms_id,
            ntt,
            size: 2,
            degree,
            primes: k as usize,
            scale,
            data,
        };
        Ok((raw, seed))
    }

    /// SEAL's uncompressed ciphertext bytes.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        debug_assert_eq!(self.data.len(), self.size * self.primes * self.degree);
        self.to_bytes_with(None)
    }

    /// SEAL's uncompressed bytes of a ciphertext, seeded when `seed` is
    /// given (then `data` holds the first polynomial only).
    fn to_bytes_with(&self, seed: Option<&Seed>) -> Vec<u8> {
        let record = seed.map_or(0, |_| SEED_RECORD);
        let total = HEADER + 32 + 1 + 5 * 8 + HEADER + 8 + self.data.len() * 8 + record;
        let mut out = Vec::with_capacity(total);
        header(&mut out, total);
        for w in self.parms_id {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.push(u8::from(self.ntt));
        for w in [self.size as u64, self.degree as u64, self.primes as u64] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&self.scale.to_bits().to_le_bytes());
        out.extend_from_slice(&1u64.to_le_bytes());
        push_nested(&mut out, &self.data);
        if let Some(seed) = seed {
            header(&mut out, SEED_RECORD);
            out.extend_from_slice(seed);
        }
        debug_assert_eq!(out.len(), total);
        out
    }

    /// Polynomial `i`: `primes * degree` words.
    pub(crate) fn poly(&self, i: usize) -> &[u64] {
        let m = self.primes * self.degree;
        &self.data[i * m..(i + 1) * m]
    }

    /// Polynomial `i`, mutable.
    pub(crate) fn poly_mut(&mut self, i: usize) -> &mut [u64] {
        let m = self.primes * self.degree;
        &mut self.data[i * m..(i + 1) * m]
    }
}

/// A secret key's polynomial: NTT form, at the key level (every prime).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RawSecretKey {
    pub(crate) parms_id: ParmsId,
    pub(crate) scale: f64,
    /// `primes * degree` words, prime by prime.
    pub(crate) data: Vec<u64>,
}

impl RawSecretKey {
    /// Parses SEAL's uncompressed secret-key bytes, expecting `words`
    /// coefficients (degree times the number of primes).
    pub(crate) fn parse(bytes: &[u8], words: usize) -> Result<Self, String> {
        let what = "secret key";
        let mut r = Reader::new(bytes);
        read_header(&mut r, bytes.len(), what)?;
        let short = |_| format!("{what}: truncated metadata");
        let parms_id = parms_id(&mut r).map_err(short)?;
        let count = r.u64().map_err(short)?;
        let scale = f64::from_bits(r.u64().map_err(short)?);
        if count != words as u64 {
            return Err(format!("{what}: {count} coefficients, expected {words}"));
        }
        let data = nested_words(&mut r, words, what)?;
        if !r.is_empty() {
            return Err(format!("{what}: trailing bytes"));
        }
        Ok(Self {
            parms_id,
            scale,
            data,
        })
    }

    /// SEAL's uncompressed secret-key bytes.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let total = HEADER + 32 + 16 + HEADER + 8 + self.data.len() * 8;
        let mut out = Vec::with_capacity(total);
        header(&mut out, total);
        for w in self.parms_id {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&(self.data.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.scale.to_bits().to_le_bytes());
        push_nested(&mut out, &self.data);
        debug_assert_eq!(out.len(), total);
        out
    }
}

/// What this crate keeps of SEAL's seed record: the PRNG type (1 byte)
/// and the 64-byte seed.
pub(crate) type Seed = [u8; SEED];
const SEED: usize = 65;
/// SEAL's seed record: its own 16-byte header, then the type and the seed.
const SEED_RECORD: usize = HEADER + SEED;

/// SEAL 4.0's PRNGs: 1 (BLAKE2xb), 2 (SHAKE256).
fn check_prng(t: u8) -> Result<(), String> {
    if matches!(t, 1 | 2) {
        Ok(())
    } else {
        Err(format!("seed record: unknown PRNG type {t}"))
    }
}

/// Bits a residue below each prime needs.
pub(crate) fn widths(primes: &[u64]) -> Vec<u32> {
    primes.iter().map(|q| 64 - q.leading_zeros()).collect()
}

/// Bytes of `polys` packed polynomials of `degree` residues per prime.
pub(crate) fn packed_len(polys: usize, degree: usize, primes: &[u64]) -> usize {
    polys * degree * widths(primes).iter().map(|&b| b as usize).sum::<usize>() / 8
}

/// A ciphertext at a known level in the packed form: each residue in its
/// prime's bit width instead of a 64-bit word, polynomial by polynomial,
/// prime by prime, least significant bit first; then, for a seeded
/// ciphertext (its second polynomial replaced by a PRNG seed), the PRNG
/// type and the seed (65 bytes). The level, size, NTT form, scale and the
/// seed record's header are not written: the reader knows them. `seal` is
/// SEAL's uncompressed bytes of a ciphertext that must be at `parms_id`
/// (the level of `primes`) with `scale`, in NTT form; anything else is an
/// error naming what differs. Returns the packed bytes and whether the
/// ciphertext is seeded.
///
/// Written by hand, not with a bit-stream crate: the packing is one 128-bit
/// shift register over the words (about 15 lines), the general crates
/// (`bitstream-io`, `bitvec`) pay a call per field, and `bitpacking` packs
/// 32-bit integers only.
pub(crate) fn pack_ciphertext(
    seal: &[u8],
    degree: usize,
    primes: &[u64],
    parms_id: &ParmsId,
    scale: f64,
) -> Result<(Vec<u8>, bool), String> {
    let (raw, seed) = checked(seal, degree, primes, parms_id, scale)?;
    let polys = raw.data.len() / (degree * primes.len());
    let mut out = Vec::with_capacity(packed_len(polys, degree, primes) + SEED);
    pack_words(&mut out, &raw.data, degree, &widths(primes));
    if let Some(seed) = &seed {
        out.extend_from_slice(seed);
    }
    Ok((out, seed.is_some()))
}

/// SEAL's bytes of a ciphertext (format 1 of an encrypted vector: SEAL's
/// own, from untrusted hands) checked as [`pack_ciphertext`] checks them
/// and written anew, so that SEAL reads no header this crate did not write.
pub(crate) fn rewrite_ciphertext(
    seal: &[u8],
    degree: usize,
    primes: &[u64],
    parms_id: &ParmsId,
    scale: f64,
) -> Result<Vec<u8>, String> {
    let (raw, seed) = checked(seal, degree, primes, parms_id, scale)?;
    Ok(raw.to_bytes_with(seed.as_ref()))
}

/// Parses SEAL's ciphertext bytes ([`RawCiphertext::parse_any`]) and checks
/// the level, NTT form and scale against what is expected and every
/// coefficient against its prime.
fn checked(
    seal: &[u8],
    degree: usize,
    primes: &[u64],
    parms_id: &ParmsId,
    scale: f64,
) -> Result<(RawCiphertext, Option<Seed>), String> {
    let (raw, seed) = RawCiphertext::parse_any(seal, degree, primes.len())?;
    if raw.primes != primes.len() {
        return Err(format!(
            "ciphertext: {} primes where the level has {}",
            raw.primes,
            primes.len()
        ));
    }
    if &raw.parms_id != parms_id {
        return Err("ciphertext: at another level than expected".into());
    }
    if !raw.ntt {
        return Err("ciphertext: not in NTT form".into());
    }
    if raw.scale != scale {
        return Err(format!(
            "ciphertext: scale 2^{:.2} where 2^{:.0} is expected",
            raw.scale.log2(),
            scale.log2()
        ));
    }
    if let Some((poly, j, i)) = unreduced(&raw.data, primes, degree) {
        return Err(format!(
            "polynomial {poly}: coefficient {i} of prime {j} is not reduced"
        ));
    }
    Ok((raw, seed))
}

/// The first coefficient of `data` (polynomials of `degree` residues per
/// prime, prime by prime) that is not below its prime, as (polynomial,
/// prime, coefficient).
pub(crate) fn unreduced(
    data: &[u64],
    primes: &[u64],
    degree: usize,
) -> Option<(usize, usize, usize)> {
    data.chunks_exact(degree)
        .enumerate()
        .find_map(|(run, chunk)| {
            let (j, q) = (run % primes.len(), primes[run % primes.len()]);
            chunk
                .iter()
                .position(|&w| w >= q)
                .map(|i| (run / primes.len(), j, i))
        })
}

/// SEAL's uncompressed bytes of the ciphertext packed by
/// [`pack_ciphertext`]: `seeded` says whether its second polynomial is a
/// seed. The length must be exact, every residue below its prime and the
/// PRNG type known; the seed record's header is written here, so that
/// nothing in the input sets a size SEAL reads. What is returned goes to
/// SEAL's validated loading.
pub(crate) fn unpack_ciphertext(
    packed: &[u8],
    seeded: bool,
    degree: usize,
    primes: &[u64],
    parms_id: &ParmsId,
    scale: f64,
) -> Result<Vec<u8>, String> {
    let polys = if seeded { 1 } else { 2 };
    let len = packed_len(polys, degree, primes);
    let want = len + if seeded { SEED } else { 0 };
    if packed.len() != want {
        return Err(format!("{} bytes where {want} are needed", packed.len()));
    }
    let (coeffs, rest) = packed.split_at(len);
    let seed: Option<Seed> = if seeded {
        check_prng(rest[0])?;
        Some(rest.try_into().expect("length checked"))
    } else {
        None
    };
    let raw = RawCiphertext {
        parms_id: *parms_id,
        ntt: true,
        size: 2,
        degree,
        primes: primes.len(),
        scale,
        data: unpack_words(coeffs, polys, degree, primes)?,
    };
    Ok(raw.to_bytes_with(seed.as_ref()))
}

/// Appends `words` (polynomial by polynomial, `degree` residues per prime)
/// at `widths[j]` bits for prime `j`, least significant bit first. `degree`
/// is a multiple of 64, so every prime's run ends on a word boundary.
pub(crate) fn pack_words(out: &mut Vec<u8>, words: &[u64], degree: usize, widths: &[u32]) {
    assert_eq!(degree % 64, 0, "degrees are powers of two from 1024");
    let mut bits = BitWriter::new(out);
    for (run, chunk) in words.chunks_exact(degree).enumerate() {
        let b = widths[run % widths.len()];
        for &w in chunk {
            bits.push(w, b);
        }
    }
    bits.finish();
}

/// Fields of up to 64 bits appended least significant bit first, flushed
/// as little-endian 64-bit words: one 128-bit shift register.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    acc: u128,
    held: u32,
}

impl<'a> BitWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        Self {
            out,
            acc: 0,
            held: 0,
        }
    }

    /// Appends the low `bits` (at most 64) of `w`, which holds no others.
    #[inline(always)]
    fn push(&mut self, w: u64, bits: u32) {
        debug_assert!(bits <= 64 && (bits == 64 || w >> bits == 0));
        self.acc |= u128::from(w) << self.held;
        self.held += bits;
        if self.held >= 64 {
            self.out.extend_from_slice(&(self.acc as u64).to_le_bytes());
            self.acc >>= 64;
            self.held -= 64;
        }
    }

    /// Appends the low `bits` (at most 128) of `w`.
    #[inline(always)]
    fn push_wide(&mut self, w: u128, bits: u32) {
        if bits > 64 {
            self.push(w as u64, 64);
            self.push((w >> 64) as u64, bits - 64);
        } else {
            self.push(w as u64, bits);
        }
    }

    /// Checks that the fields ended on a word boundary.
    fn finish(self) {
        debug_assert_eq!(self.held, 0, "fields must fill whole words");
    }
}

/// The reader of [`BitWriter`]'s stream; the caller checks the length.
struct BitReader<'a> {
    src: std::slice::ChunksExact<'a, u8>,
    acc: u128,
    held: u32,
}

impl<'a> BitReader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self {
            src: bytes.chunks_exact(8),
            acc: 0,
            held: 0,
        }
    }

    /// The next field of `bits` (at most 64).
    #[inline(always)]
    fn pull(&mut self, bits: u32) -> u64 {
        if self.held < bits {
            let w = self.src.next().expect("length checked by the caller");
            self.acc |= u128::from(u64::from_le_bytes(w.try_into().expect("8 bytes"))) << self.held;
            self.held += 64;
        }
        let w = (self.acc & ((1u128 << bits) - 1)) as u64;
        self.acc >>= bits;
        self.held -= bits;
        w
    }

    /// The next field of `bits` (at most 128).
    #[inline(always)]
    fn pull_wide(&mut self, bits: u32) -> u128 {
        if bits > 64 {
            let lo = self.pull(64);
            u128::from(lo) | (u128::from(self.pull(bits - 64)) << 64)
        } else {
            u128::from(self.pull(bits))
        }
    }
}

/// The inverse of [`pack_words`] for `polys` polynomials; `bytes` must hold
/// exactly their packed length. A residue not below its prime is an error
/// naming it.
pub(crate) fn unpack_words(
    bytes: &[u8],
    polys: usize,
    degree: usize,
    primes: &[u64],
) -> Result<Vec<u64>, String> {
    debug_assert_eq!(bytes.len(), packed_len(polys, degree, primes));
    let widths = widths(primes);
    let mut bits = BitReader::new(bytes);
    let mut out = Vec::with_capacity(polys * degree * primes.len());
    for run in 0..polys * primes.len() {
        let (j, b) = (run % primes.len(), widths[run % primes.len()]);
        for i in 0..degree {
            let w = bits.pull(b);
            if w >= primes[j] {
                return Err(format!(
                    "polynomial {}: coefficient {i} of prime {j} is not reduced",
                    run / primes.len()
                ));
            }
            out.push(w);
        }
    }
    Ok(out)
}

// `narrow` reads a `U192` as three 64-bit words.
const _: () = assert!(crypto_bigint::Limb::BITS == 64, "64-bit limbs");

/// `x` as a `u128`, if it fits.
fn narrow(x: &U192) -> Option<u128> {
    let w = x.as_words();
    (w[2] == 0).then(|| u128::from(w[0]) | (u128::from(w[1]) << 64))
}

/// `a * b mod q`.
#[inline(always)]
fn mul_mod(a: u64, b: u64, q: u64) -> u64 {
    (u128::from(a) * u128::from(b) % u128::from(q)) as u64
}

/// A constant multiplier `w < q` modulo `q < 2^63` with Shoup's
/// precomputed quotient `floor(w 2^64 / q)`: `a w mod q` for any 64-bit
/// `a` in two multiplications and no division.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MulConst {
    w: u64,
    shoup: u64,
}

impl MulConst {
    fn new(w: u64, q: u64) -> Self {
        debug_assert!(w < q && q < 1 << 63);
        Self {
            w,
            shoup: ((u128::from(w) << 64) / u128::from(q)) as u64,
        }
    }

    /// `a * w mod q`.
    #[inline(always)]
    fn mul(self, a: u64, q: u64) -> u64 {
        let quotient = ((u128::from(a) * u128::from(self.shoup)) >> 64) as u64;
        // Within [0, 2q) (Shoup), which fits a word for q < 2^63.
        let r = a
            .wrapping_mul(self.w)
            .wrapping_sub(quotient.wrapping_mul(q));
        if r >= q { r - q } else { r }
    }
}

/// `a^e mod q`.
fn pow_mod(mut a: u64, mut e: u64, q: u64) -> u64 {
    let mut r = 1 % q;
    a %= q;
    while e > 0 {
        if e & 1 == 1 {
            r = mul_mod(r, a, q);
        }
        a = mul_mod(a, a, q);
        e >>= 1;
    }
    r
}

/// The rounded form of a ciphertext in coefficient form, for what the
/// server sends back (a weighted sum, which cannot be seeded): each
/// coefficient of both polynomials is composed from its residues (CRT)
/// into one integer `c` modulo the level's modulus `Q`, and only
/// `t = round(c / 2^drop)` is written, in `width` bits, after the two
/// polynomials' `drop` (one byte each), so that a reader needs nothing
/// but the level to read it ([`Rounding::read`]). A `t` with
/// `t * 2^drop >= Q` is written as 0, which is the same modulo `Q`, so
/// that every written `t` lies below `ceil(Q / 2^drop)` and rounding again
/// what was read gives the same `t`.
///
/// Rounding is a public operation (anyone holding the ciphertext can do
/// it). Decryption computes `c0 + c1 * s`; rounding moves `c0` by at most
/// `2^(drop[0] - 1)` and `c1` by at most `2^(drop[1] - 1)` per coefficient,
/// so the message by `e0 + e1 * s`: noise that the caller sizes below the
/// values' precision (`vector::sum_rounding`).
///
/// The composition is in 192-bit integers (`crypto-bigint`'s fixed-size
/// `U192`, no allocation), for levels up to 190 bits (the multiparty
/// parameters' 140 included); what is written, `t`, has at most 127 bits.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Rounding {
    primes: Vec<u64>,
    modulus: U192,
    /// Low bits rounded away from the first and the second polynomial.
    drop: [u32; 2],
    /// Per prime `q_j`: `(Q / q_j)^-1 mod q_j` and `Q / q_j`.
    crt: Vec<(MulConst, U192)>,
    /// Per polynomial, per prime: `2^drop mod q_j` and `2^(drop + 64) mod
    /// q_j`, which lift a `t`'s low and high words.
    lift: [Vec<(MulConst, MulConst)>; 2],
}

impl Rounding {
    /// The rounding of ciphertexts over `primes` (distinct primes below
    /// `2^62`, as SEAL's levels have) dropping `drop` bits; `None` when
    /// their bits add up to more than 190, a drop leaves fewer than two
    /// bits, or more than 127.
    pub(crate) fn new(primes: &[u64], drop: [u32; 2]) -> Option<Self> {
        let width: u32 = primes.iter().map(|q| 64 - q.leading_zeros()).sum();
        if primes.is_empty() || primes.iter().any(|&q| q >= 1 << 62) || width > 190 {
            return None;
        }
        // Below 2^190: no product overflows.
        let product = |skip: Option<usize>| {
            primes
                .iter()
                .enumerate()
                .filter(|(j, _)| Some(*j) != skip)
                .fold(U192::ONE, |m, (_, &q)| m.wrapping_mul(&U64::from_u64(q)))
        };
        let modulus = product(None);
        let bits = modulus.bits() as u32;
        if drop
            .iter()
            .any(|&d| d == 0 || d + 2 > bits || bits - d > 127)
        {
            return None;
        }
        let crt = primes
            .iter()
            .enumerate()
            .map(|(j, &q)| {
                let qhat_mod_q = primes
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != j)
                    .fold(1 % q, |m, (_, &p)| mul_mod(m, p % q, q));
                let inv = pow_mod(qhat_mod_q, q - 2, q);
                (MulConst::new(inv, q), product(Some(j)))
            })
            .collect();
        let lift = drop.map(|d| {
            primes
                .iter()
                .map(|&q| {
                    let (lo, hi) = (pow_mod(2, d.into(), q), pow_mod(2, u64::from(d) + 64, q));
                    (MulConst::new(lo, q), MulConst::new(hi, q))
                })
                .collect()
        });
        Some(Self {
            primes: primes.to_vec(),
            modulus,
            drop,
            crt,
            lift,
        })
    }

    /// Bits dropped from each polynomial.
    #[cfg(test)]
    pub(crate) fn drop(&self) -> [u32; 2] {
        self.drop
    }

    /// The largest `t` polynomial `p` may hold (below 2^127, checked in
    /// [`Rounding::new`]).
    fn max(&self, p: usize) -> u128 {
        narrow(
            &self
                .modulus
                .wrapping_sub(&U192::ONE)
                .shr_vartime(self.drop[p] as usize),
        )
        .expect("checked when made")
    }

    /// Bits each `t` of polynomial `p` takes.
    pub(crate) fn width(&self, p: usize) -> u32 {
        128 - self.max(p).leading_zeros()
    }

    /// Bytes of one rounded ciphertext of `degree` coefficients per
    /// polynomial: the drops, then the fields (`degree` is a multiple of
    /// 64, so both polynomials end on a word).
    pub(crate) fn packed_len(&self, degree: usize) -> usize {
        2 + degree * (self.width(0) + self.width(1)) as usize / 8
    }

    /// Reads what [`Rounding::round`] wrote of a ciphertext over `primes`:
    /// its drops must suit the level ([`Rounding::new`]) and the rest is
    /// read as [`Rounding::unround`] reads it.
    pub(crate) fn read(
        primes: &[u64],
        bytes: &[u8],
        degree: usize,
        parms_id: &ParmsId,
        scale: f64,
    ) -> Result<RawCiphertext, String> {
        let [a, b] = *bytes
            .first_chunk::<2>()
            .ok_or("truncated before the bits dropped")?;
        let r = Self::new(primes, [a.into(), b.into()]).ok_or_else(|| {
            format!("{a} and {b} bits dropped: out of range for this level, or it is never rounded")
        })?;
        r.unround(bytes, degree, parms_id, scale)
    }

    /// The rounded bytes of `raw`, a ciphertext of two polynomials in
    /// coefficient form over this rounding's primes, of a degree that is a
    /// multiple of 64.
    pub(crate) fn round(&self, raw: &RawCiphertext) -> Result<Vec<u8>, String> {
        if raw.ntt
            || raw.size != 2
            || raw.primes != self.primes.len()
            || !raw.degree.is_multiple_of(64)
            || raw.data.len() != 2 * raw.primes * raw.degree
        {
            return Err(format!(
                "a ciphertext of {} polynomials of degree {} over {} primes{}; expected 2 over {} in coefficient form",
                raw.size,
                raw.degree,
                raw.primes,
                if raw.ntt { " in NTT form" } else { "" },
                self.primes.len()
            ));
        }
        let n = raw.degree;
        let mut out = Vec::with_capacity(self.packed_len(n));
        out.extend(
            self.drop
                .map(|d| u8::try_from(d).expect("a drop below 190")),
        );
        let mut bits = BitWriter::new(&mut out);
        for p in 0..2 {
            let poly = raw.poly(p);
            let (d, width, max) = (self.drop[p], self.width(p), self.max(p));
            let half = U192::ONE.shl_vartime(d as usize - 1);
            for i in 0..n {
                let mut c = U192::ZERO;
                for (j, (&q, (inv, qhat))) in self.primes.iter().zip(&self.crt).enumerate() {
                    let r = U64::from_u64(inv.mul(poly[j * n + i], q));
                    // Each term is below Q, the sum below 2Q < 2^191.
                    c = c.wrapping_add(&qhat.wrapping_mul(&r));
                    if c >= self.modulus {
                        c = c.wrapping_sub(&self.modulus);
                    }
                }
                // At most max + 1, which is at most 2^127.
                let t =
                    narrow(&c.wrapping_add(&half).shr_vartime(d as usize)).expect("at most 2^127");
                bits.push_wide(if t > max { 0 } else { t }, width);
            }
        }
        bits.finish();
        Ok(out)
    }

    /// The ciphertext (coefficient form, at `parms_id` with `scale`) whose
    /// coefficients are `t * 2^drop` for the `t` in `bytes`, which must be
    /// exactly [`Rounding::packed_len`] long, begin with this rounding's
    /// drops and hold every `t` in range; an error names what is not.
    pub(crate) fn unround(
        &self,
        bytes: &[u8],
        degree: usize,
        parms_id: &ParmsId,
        scale: f64,
    ) -> Result<RawCiphertext, String> {
        let want = self.packed_len(degree);
        if bytes.len() != want {
            return Err(format!("{} bytes where {want} are needed", bytes.len()));
        }
        if bytes[..2] != self.drop.map(|d| d as u8) {
            return Err(format!(
                "{:?} bits dropped where {:?} are expected",
                &bytes[..2],
                self.drop
            ));
        }
        let k = self.primes.len();
        let mut data = vec![0u64; 2 * k * degree];
        let mut bits = BitReader::new(&bytes[2..]);
        for p in 0..2 {
            let (width, max) = (self.width(p), self.max(p));
            let poly = &mut data[p * k * degree..(p + 1) * k * degree];
            for i in 0..degree {
                let t = bits.pull_wide(width);
                if t > max {
                    return Err(format!(
                        "polynomial {p}: coefficient {i} is not below the modulus"
                    ));
                }
                let (lo, hi) = (t as u64, (t >> 64) as u64);
                for (j, (&q, &(by_lo, by_hi))) in self.primes.iter().zip(&self.lift[p]).enumerate()
                {
                    let r = by_lo.mul(lo, q) + by_hi.mul(hi, q);
                    poly[j * degree + i] = if r >= q { r - q } else { r };
                }
            }
        }
        Ok(RawCiphertext {
            parms_id: *parms_id,
            ntt: false,
            size: 2,
            degree,
            primes: k,
            scale,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    /// Garner's reconstruction for two primes, written apart from the
    /// rounding's own composition.
    fn garner(r0: u64, r1: u64, q0: u64, q1: u64) -> u128 {
        let inv = pow_mod(q0 % q1, q1 - 2, q1);
        let d = (u128::from(r1) + u128::from(q1) - u128::from(r0 % q1)) % u128::from(q1);
        let h = (d * u128::from(inv)) % u128::from(q1);
        u128::from(r0) + u128::from(q0) * h
    }

    #[test]
    fn rounding_moves_each_coefficient_by_at_most_half_a_step_and_reads_back_exactly() {
        let (q0, q1) = ((1u64 << 61) - 1, (1u64 << 31) - 1);
        let q = u128::from(q0) * u128::from(q1);
        let r = Rounding::new(&[q0, q1], [30, 26]).expect("92 bits");
        assert_eq!(r.drop(), [30, 26]);
        assert_eq!((r.width(0), r.width(1)), (92 - 30, 92 - 26));
        let n = 128;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut coeffs: Vec<u128> = (0..2 * n).map(|_| rng.random_range(0..q)).collect();
        // The edges: zero, the top, and both sides of the wrap to 0.
        for (i, d) in [30u32, 26].into_iter().enumerate() {
            let p = &mut coeffs[i * n..];
            let half = 1u128 << (d - 1);
            p[..6].copy_from_slice(&[0, q - 1, q - half, q - half - 1, half - 1, half]);
        }
        let mut data = vec![0u64; 4 * n];
        for p in 0..2 {
            for (j, &m) in [q0, q1].iter().enumerate() {
                for i in 0..n {
                    data[(p * 2 + j) * n + i] = (coeffs[p * n + i] % u128::from(m)) as u64;
                }
            }
        }
        let raw = RawCiphertext {
            parms_id: [1, 2, 3, 4],
            ntt: false,
            size: 2,
            degree: n,
            primes: 2,
            scale: 8.0,
            data,
        };
        let bytes = r.round(&raw).expect("round");
        assert_eq!(bytes.len(), r.packed_len(n));
        let back = r.unround(&bytes, n, &raw.parms_id, 8.0).expect("unround");
        assert!(!back.ntt && back.scale == 8.0 && back.parms_id == raw.parms_id);
        for p in 0..2 {
            let d = [30, 26][p];
            for i in 0..n {
                let got = garner(back.poly(p)[i], back.poly(p)[n + i], q0, q1);
                assert!(got < q && got.is_multiple_of(1 << d), "{p}/{i}");
                let c = coeffs[p * n + i];
                let diff = (c + q - got) % q;
                let dist = diff.min(q - diff);
                assert!(dist <= 1 << (d - 1), "{p}/{i}: moved by {dist}");
            }
        }
        // Rounding what was read changes nothing.
        assert_eq!(r.round(&back).expect("round"), bytes);
        let mut ntt = back.clone();
        ntt.ntt = true;
        assert!(r.round(&ntt).unwrap_err().contains("in NTT form"));
        assert_eq!(
            Rounding::read(&[q0, q1], &bytes, n, &raw.parms_id, 8.0).expect("read"),
            back
        );
        // Any field above the top, a wrong length, or drops other than
        // this rounding's, or out of range, are refused.
        let mut bad = bytes.clone();
        bad[2..10].fill(0xFF);
        bad[10] = 0xFF;
        let e = r.unround(&bad, n, &raw.parms_id, 8.0).unwrap_err();
        assert!(e.contains("coefficient 0 is not below the modulus"), "{e}");
        assert!(r.unround(&bytes[1..], n, &raw.parms_id, 8.0).is_err());
        let mut other = bytes.clone();
        other[0] = 31;
        let e = r.unround(&other, n, &raw.parms_id, 8.0).unwrap_err();
        assert!(e.contains("bits dropped where"), "{e}");
        for drops in [[0, 26], [91, 26], [30, 200]] {
            let mut bad = bytes.clone();
            bad[..2].copy_from_slice(&drops);
            let e = Rounding::read(&[q0, q1], &bad, n, &raw.parms_id, 8.0).unwrap_err();
            assert!(e.contains("out of range"), "{drops:?}: {e}");
        }
        assert!(Rounding::read(&[q0, q1], &bytes[..1], n, &raw.parms_id, 8.0).is_err());
    }

    /// Composes `residues` (one per prime) with big integers: the
    /// reference the 192-bit composition is checked against.
    fn compose(residues: &[u64], primes: &[u64]) -> num_bigint::BigUint {
        use num_bigint::BigUint;
        let q: BigUint = primes.iter().map(|&p| BigUint::from(p)).product();
        let mut c = BigUint::from(0u32);
        for (&r, &p) in residues.iter().zip(primes) {
            let m = &q / p;
            let inv = pow_mod((&m % p).try_into().expect("below p"), p - 2, p);
            c += m * BigUint::from(mul_mod(r, inv, p));
        }
        c % q
    }

    #[test]
    fn rounding_a_152_bit_level_agrees_with_big_integers() {
        use num_bigint::BigUint;
        let primes = [
            (1u64 << 61) - 1,
            (1u64 << 31) - 1,
            1_000_000_007,
            998_244_353,
        ];
        let q: BigUint = primes.iter().map(|&p| BigUint::from(p)).product();
        assert_eq!(q.bits(), 152);
        // The first drop is one where rounding up wraps past Q to 0 (Q mod
        // 2^d above half a step); the second leaves 127-bit fields.
        let step = |d: u32| BigUint::from(1u32) << d;
        let d0 = (36..64)
            .find(|&d| (&q % step(d)) > step(d - 1))
            .expect("a drop that wraps");
        let drops = [d0, 25];
        let r = Rounding::new(&primes, drops).expect("152 bits");
        assert_eq!((r.width(0), r.width(1)), (152 - d0, 127));
        let (n, k) = (64, primes.len());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        // Uniform residues are a uniform coefficient below Q; the first few
        // are the edges: 0, Q - 1, half a step and either side of it, and
        // either side of where rounding up reaches Q (the wrap to 0).
        let mut coeffs: Vec<BigUint> = (0..2 * n)
            .map(|_| {
                let res: Vec<u64> = primes.iter().map(|&p| rng.random_range(0..p)).collect();
                compose(&res, &primes)
            })
            .collect();
        let mut wrapped = [false; 2];
        for (p, d) in drops.into_iter().enumerate() {
            let half = step(d - 1);
            let top = ((&q >> d) + 1u32) << d;
            let wrap = &top - &half;
            let mut edges = vec![
                BigUint::from(0u32),
                &q - 1u32,
                &half - 1u32,
                half.clone(),
                &half + 1u32,
            ];
            if wrap < q {
                wrapped[p] = true;
                edges.extend([&wrap - 1u32, wrap]);
            }
            for (i, e) in edges.into_iter().enumerate() {
                coeffs[p * n + i] = e;
            }
        }
        assert!(wrapped[0]);
        let mut data = vec![0u64; 2 * k * n];
        for p in 0..2 {
            for (j, &m) in primes.iter().enumerate() {
                for i in 0..n {
                    let res = &coeffs[p * n + i] % m;
                    data[(p * k + j) * n + i] = res.try_into().expect("below the prime");
                }
            }
        }
        let raw = RawCiphertext {
            parms_id: [5, 6, 7, 8],
            ntt: false,
            size: 2,
            degree: n,
            primes: k,
            scale: 2.0,
            data,
        };
        let bytes = r.round(&raw).expect("round");
        let back = r.unround(&bytes, n, &raw.parms_id, 2.0).expect("unround");
        for (p, d) in drops.into_iter().enumerate() {
            let unit = step(d);
            for i in 0..n {
                let res: Vec<u64> = (0..k).map(|j| back.poly(p)[j * n + i]).collect();
                let got = compose(&res, &primes);
                assert!(got < q && (&got % &unit) == BigUint::from(0u32), "{p}/{i}");
                let c = &coeffs[p * n + i];
                let diff = (c + &q - &got) % &q;
                let dist = diff.clone().min(&q - &diff);
                assert!(dist <= &unit >> 1, "{p}/{i}: moved by {dist}");
                // The wrap edge (the 7th) rounds up to Q: written as 0.
                if wrapped[p] && i == 6 {
                    assert_eq!(got, BigUint::from(0u32));
                }
            }
        }
        assert_eq!(r.round(&back).expect("round"), bytes);
    }

    #[test]
    fn rounding_needs_a_modulus_below_2_190_and_bits_left() {
        let (a, b, c) = ((1u64 << 61) - 1, (1u64 << 31) - 1, 1_000_000_007u64);
        assert!(Rounding::new(&[a, b, c], [40, 40]).is_some());
        // 152 bits: fine, but a field of more than 127 bits is not.
        assert!(Rounding::new(&[a, b, c, 998_244_353], [40, 40]).is_some());
        assert!(Rounding::new(&[a, b, c, 998_244_353], [24, 40]).is_none());
        // More than 190 bits.
        let wide = [
            a,
            (1u64 << 61) + 20_091,
            (1u64 << 61) + 20_787,
            (1u64 << 59) + 2_239,
        ];
        assert!(Rounding::new(&wide, [100, 100]).is_none());
        assert!(Rounding::new(&[b], [29, 29]).is_some());
        assert!(Rounding::new(&[b], [30, 29]).is_none());
        assert!(Rounding::new(&[b], [0, 29]).is_none());
        assert!(Rounding::new(&[], [1, 1]).is_none());
    }
}
