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
        let count = 2 * degree * k as usize;
        let data = nested_words(&mut r, count, what)?;
        if !r.is_empty() {
            return Err(format!("{what}: trailing bytes"));
        }
        Ok(Self {
            parms_id,
            ntt,
            size: 2,
            degree,
            primes: k as usize,
            scale,
            data,
        })
    }

    /// SEAL's uncompressed ciphertext bytes.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        debug_assert_eq!(self.data.len(), self.size * self.primes * self.degree);
        let total = HEADER + 32 + 1 + 5 * 8 + HEADER + 8 + self.data.len() * 8;
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
