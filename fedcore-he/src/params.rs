//! CKKS parameters and the 128-bit security check.

use serde::{Deserialize, Serialize};

use crate::error::{HeError, Result};

/// The fewest bits of the upload level's modulus left above the scale of a
/// weighted sum: the sum's values must stay below `2^(headroom - 2)`.
pub const MIN_HEADROOM_BITS: u32 = 10;

/// CKKS encryption parameters.
///
/// The default is the common TenSEAL setting: polynomial degree 8192 (4096
/// slots per ciphertext), coefficient modulus primes of [60, 40, 40, 60] bits
/// (200 bits, within the 218 allowed at 128-bit security), and values encoded
/// at scale 2^40. Weights of a weighted sum are encoded at scale 2^30.
///
/// How the levels are used: clients encrypt at the lowest level whose
/// modulus still holds `scale * weight_scale` plus [`MIN_HEADROOM_BITS`]
/// ([60, 40] = 100 bits by default), the server multiplies by the weights
/// without rescaling (the result has scale 2^70) and adds; hospitals decode
/// at that scale. No level is spent on a rescale, so the upload is as small
/// as the arithmetic allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CkksParams {
    degree: usize,
    coeff_bits: Vec<u32>,
    scale_bits: u32,
    weight_bits: u32,
    secure: bool,
}

impl Default for CkksParams {
    fn default() -> Self {
        Self {
            degree: 8192,
            coeff_bits: vec![60, 40, 40, 60],
            scale_bits: 40,
            weight_bits: 30,
            secure: true,
        }
    }
}

/// The largest total coefficient-modulus bits at 128-bit classical security
/// for a degree (HomomorphicEncryption.org standard, ternary secrets; the
/// values SEAL's `CoeffModulus::MaxBitCount` returns).
pub fn max_bits_128(degree: usize) -> Option<u32> {
    crate::seal::max_bits_128(degree)
}

impl CkksParams {
    /// Parameters at 128-bit security; anything weaker is
    /// [`HeError::Insecure`].
    ///
    /// `coeff_bits` lists the primes' sizes, the last being the special
    /// prime (as in SEAL); `scale_bits` is the encoding scale of values.
    pub fn new(degree: usize, coeff_bits: &[u32], scale_bits: u32) -> Result<Self> {
        let p = Self {
            degree,
            coeff_bits: coeff_bits.to_vec(),
            scale_bits,
            weight_bits: 30,
            secure: true,
        };
        p.check()?;
        Ok(p)
    }

    /// The parameters of multiparty keys ([`crate::multiparty`]): degree
    /// 8192, primes [60, 50, 30, 60] (200 bits, 128-bit secure), scale 2^90
    /// and weights at 2^30, so that a weighted sum sits at 2^120 in the
    /// 140 bits of the three data primes. The scale is high because the key
    /// switch adds smudging noise `2^40 * sqrt(N)` times the sum's own noise
    /// (docs/he.md); the result still decrypts within about 2e-7. Sums stay
    /// below 2^18 in magnitude
    /// ([`CkksContext::sum_bound`](crate::CkksContext::sum_bound)).
    pub fn multiparty() -> Self {
        let p = Self {
            degree: 8192,
            coeff_bits: vec![60, 50, 30, 60],
            scale_bits: 90,
            weight_bits: 30,
            secure: true,
        };
        debug_assert!(p.check().is_ok());
        p
    }

    /// The parameters of multiparty keys for the encrypted geometric median
    /// ([`crate::multiparty`]'s collective relinearization key and distance
    /// decryption): degree 16384, primes [50, 50, 50, 60, 60] (270 bits;
    /// 128-bit security allows 438), scale 2^95, weights at 2^50. A squared
    /// distance is a product of uploads, at scale 2^190, and its collective
    /// decryption adds smudging noise `2^40` times that product's own noise,
    /// which grows with the scale (docs/he.md, "The encrypted geometric
    /// median under multiparty keys"): degree 8192's 218 bits cannot hold
    /// both. Uploads stay at the first level (210 bits: the weighted sum at
    /// 2^145 needs more than the 150 of the next), which holds squared
    /// distances up to 2^19 with their smudging. The key switch of a
    /// weighted sum works as under [`CkksParams::multiparty`].
    pub fn multiparty_median() -> Self {
        let p = Self {
            degree: 16384,
            coeff_bits: vec![50, 50, 50, 60, 60],
            scale_bits: 95,
            weight_bits: 50,
            secure: true,
        };
        debug_assert!(p.check().is_ok());
        p
    }

    /// The way to parameters below 128-bit security, for tests and
    /// experiments only: `CkksParams::dangerous().insecure(2048, &[30, 30], 20)`.
    pub fn dangerous() -> Dangerous {
        Dangerous(())
    }

    /// Sets the scale of weights in a weighted sum to `2^bits` (default 30).
    /// A weight `w` is applied as `round(w * 2^bits) / 2^bits`, so the sum's
    /// error from weight rounding is at most `n * max|v| * 2^-(bits+1)` for
    /// `n` clients.
    pub fn with_weight_bits(mut self, bits: u32) -> Result<Self> {
        self.weight_bits = bits;
        self.check()?;
        Ok(self)
    }

    /// Polynomial modulus degree.
    pub fn degree(&self) -> usize {
        self.degree
    }

    /// Values per ciphertext (`degree / 2`).
    pub fn slots(&self) -> usize {
        self.degree / 2
    }

    /// Bit sizes of the coefficient-modulus primes (the last is the special prime).
    pub fn coeff_bits(&self) -> &[u32] {
        &self.coeff_bits
    }

    /// log2 of the encoding scale of values.
    pub fn scale_bits(&self) -> u32 {
        self.scale_bits
    }

    /// log2 of the encoding scale of weights.
    pub fn weight_bits(&self) -> u32 {
        self.weight_bits
    }

    /// Whether these parameters meet 128-bit security.
    pub fn is_secure(&self) -> bool {
        self.secure
    }

    /// Total bits of the coefficient modulus.
    pub fn total_bits(&self) -> u32 {
        self.coeff_bits.iter().sum()
    }

    pub(crate) fn check(&self) -> Result<()> {
        let bad = |m: String| Err(HeError::InvalidParameters(m));
        if !self.degree.is_power_of_two() || !(1024..=32768).contains(&self.degree) {
            return bad(format!(
                "degree {} is not a power of two in 1024..=32768",
                self.degree
            ));
        }
        if self.coeff_bits.len() < 2 {
            return bad("need at least two primes (data and special)".into());
        }
        if let Some(b) = self.coeff_bits.iter().find(|&&b| !(20..=60).contains(&b)) {
            return bad(format!("prime of {b} bits; SEAL supports 20 to 60"));
        }
        if !(20..=100).contains(&self.scale_bits) {
            return bad(format!(
                "scale 2^{} is outside 2^20..=2^100",
                self.scale_bits
            ));
        }
        if !(10..=50).contains(&self.weight_bits) {
            return bad(format!(
                "weight scale 2^{} is outside 2^10..=2^50",
                self.weight_bits
            ));
        }
        let data: u32 = self.coeff_bits[..self.coeff_bits.len() - 1].iter().sum();
        let need = self.scale_bits + self.weight_bits + MIN_HEADROOM_BITS;
        if data < need {
            return bad(format!(
                "the data primes hold {data} bits; a weighted sum at scale 2^{} needs {need}",
                self.scale_bits + self.weight_bits
            ));
        }
        if self.secure {
            let max = max_bits_128(self.degree).unwrap_or(0);
            if self.total_bits() > max {
                return Err(HeError::Insecure(format!(
                    "degree {} with a {}-bit coefficient modulus {:?} is below 128-bit security (at most {max} bits); use CkksParams::dangerous() to allow it",
                    self.degree,
                    self.total_bits(),
                    self.coeff_bits
                )));
            }
        }
        Ok(())
    }
}

/// The step that allows parameters below 128-bit security; see
/// [`CkksParams::dangerous`].
#[derive(Debug)]
pub struct Dangerous(());

impl Dangerous {
    /// Parameters checked for everything but security.
    pub fn insecure(
        self,
        degree: usize,
        coeff_bits: &[u32],
        scale_bits: u32,
    ) -> Result<CkksParams> {
        let mut p = CkksParams {
            degree,
            coeff_bits: coeff_bits.to_vec(),
            scale_bits,
            weight_bits: 30,
            secure: false,
        };
        p.check()?;
        // Parameters that happen to be secure are marked so.
        p.secure = max_bits_128(degree).is_some_and(|m| p.total_bits() <= m);
        Ok(p)
    }
}
