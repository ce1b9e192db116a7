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
    let (mut acc, mut held) = (0u128, 0u32);
    for (run, chunk) in words.chunks_exact(degree).enumerate() {
        let b = widths[run % widths.len()];
        for &w in chunk {
            acc |= u128::from(w) << held;
            held += b;
            if held >= 64 {
                out.extend_from_slice(&(acc as u64).to_le_bytes());
                acc >>= 64;
                held -= 64;
            }
        }
    }
    debug_assert_eq!(held, 0);
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
    let mut src = bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")));
    let mut out = Vec::with_capacity(polys * degree * primes.len());
    let (mut acc, mut held) = (0u128, 0u32);
    for run in 0..polys * primes.len() {
        let (j, b) = (run % primes.len(), widths[run % primes.len()]);
        let mask = (1u128 << b) - 1;
        for i in 0..degree {
            if held < b {
                acc |= u128::from(src.next().expect("exact length")) << held;
                held += 64;
            }
            let w = (acc & mask) as u64;
            acc >>= b;
            held -= b;
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
