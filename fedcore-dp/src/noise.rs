use crate::error::{DpError, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

const BLOCK: usize = 1 << 16;

/// A source of Gaussian noise for the mechanisms.
///
/// Production noise comes from ChaCha20 seeded by the operating system
/// ([`Noise::secure`]): nobody, including whoever runs the process, can
/// reproduce it. Reproducible experiments need a seed; that generator is
/// only reachable through [`Noise::dangerous`], so a seeded run is visible in
/// the code that asks for it, and [`Noise::is_seeded`] lets callers record it.
///
/// Long vectors are filled in parallel: the generator draws one fresh
/// 256-bit ChaCha20 key per 64 Ki-value block, and every block is filled from
/// its own stream, so the result does not depend on the thread count.
///
/// Known limit: the noise is IEEE floating point, like every mainstream DP
/// library (Opacus, TF Privacy); floating-point attacks on the low bits
/// (Mironov 2012) are not mitigated here.
pub struct Noise {
    rng: ChaCha20Rng,
    seeded: bool,
}

impl std::fmt::Debug for Noise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the generator's state.
        f.debug_struct("Noise")
            .field("seeded", &self.seeded)
            .finish()
    }
}

/// The way to a reproducible, *not* private, noise source; see [`Noise::dangerous`].
#[derive(Debug)]
pub struct Dangerous(());

impl Dangerous {
    /// Noise determined by `seed`. Anyone who knows the seed can subtract
    /// the noise: use for experiments and tests only.
    pub fn seeded(self, seed: u64) -> Noise {
        Noise {
            rng: ChaCha20Rng::seed_from_u64(seed),
            seeded: true,
        }
    }
}

impl Noise {
    /// ChaCha20 keyed from the operating system's generator.
    pub fn secure() -> Result<Self> {
        let rng = ChaCha20Rng::try_from_rng(&mut rand::rngs::SysRng).map_err(|e| {
            DpError::Randomness(format!(
                "the operating system's random generator failed: {e}"
            ))
        })?;
        Ok(Self { rng, seeded: false })
    }

    /// The reproducible (seeded) source, for experiments; see [`Dangerous::seeded`].
    pub fn dangerous() -> Dangerous {
        Dangerous(())
    }

    /// Whether this source came from a seed.
    pub fn is_seeded(&self) -> bool {
        self.seeded
    }

    /// Adds independent N(0, `std`^2) noise to every value.
    pub fn add_gaussian(&mut self, values: &mut [f32], std: f64) {
        self.for_each_block(values, std, |v, z| *v += z);
    }

    /// Overwrites every value with independent N(0, `std`^2) noise.
    pub fn fill_gaussian(&mut self, values: &mut [f32], std: f64) {
        self.for_each_block(values, std, |v, z| *v = z);
    }

    /// A Poisson sample of `0..n`: each index independently with probability
    /// `q`, from this source (secret when the source is secure, which the
    /// amplification-by-sampling bound assumes).
    pub fn poisson_sample(&mut self, n: usize, q: f64) -> Vec<usize> {
        use rand::RngExt;
        (0..n).filter(|_| self.rng.random::<f64>() < q).collect()
    }

    fn for_each_block(&mut self, values: &mut [f32], std: f64, f: impl Fn(&mut f32, f32) + Sync) {
        let keys: Vec<[u8; 32]> = (0..values.len().div_ceil(BLOCK))
            .map(|_| {
                let mut k = [0u8; 32];
                rand::Rng::fill_bytes(&mut self.rng, &mut k);
                k
            })
            .collect();
        values
            .par_chunks_mut(BLOCK)
            .zip(keys)
            .for_each(|(block, key)| {
                let mut rng = ChaCha20Rng::from_seed(key);
                for v in block {
                    let z: f64 = StandardNormal.sample(&mut rng);
                    f(v, (z * std) as f32);
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_repeats_and_secure_noise_does_not() {
        let mut a = vec![0.0f32; BLOCK + 3];
        let mut b = a.clone();
        Noise::dangerous().seeded(7).add_gaussian(&mut a, 1.0);
        Noise::dangerous().seeded(7).add_gaussian(&mut b, 1.0);
        assert_eq!(a, b);
        let mut s1 = vec![0.0f32; 64];
        let mut s2 = s1.clone();
        let mut n = Noise::secure().unwrap();
        assert!(!n.is_seeded());
        n.fill_gaussian(&mut s1, 1.0);
        Noise::secure().unwrap().fill_gaussian(&mut s2, 1.0);
        assert_ne!(s1, s2);
    }
}
