//! Shared inputs for the criterion benches in `benches/`.

use fedcore::aggregate::CHUNK;
use fedcore::{ClientUpdate, Parameters};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// `n` seeded updates of `d` values in one tensor, values in [-1, 1), example
/// counts 50..150. The first `byzantine` of them are scaled by -100 (a
/// boosted sign flip), so that robust aggregators have work to do.
pub fn updates(n: usize, d: usize, byzantine: usize, seed: u64) -> Vec<ClientUpdate> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            // One random u32 per 8 values keeps set-up fast for 100 x 7M values.
            let scale = if i < byzantine { -100.0 } else { 1.0 };
            let mut values = Vec::with_capacity(d);
            while values.len() < d {
                let r = rng.next_u32();
                values.extend((0..8).map(|k| scale * (((r >> (4 * k)) & 0xf) as f32 / 8.0 - 1.0)));
            }
            values.truncate(d);
            let p = Parameters::from_tensors([("w", vec![d], values)]).expect("one tensor");
            ClientUpdate::new(format!("c{i:03}").into(), 1, 50 + (i as u64 * 37) % 100, p)
        })
        .collect()
}

/// Sum of every value of every input, read once in the same chunked, parallel
/// order as `fedcore::aggregate::weighted_sum_into` (FedAvg's kernel). It
/// does the least work that still reads all bytes, which makes it the
/// memory-bandwidth yardstick of the FedAvg bench.
pub fn streaming_sum(inputs: &[&[f32]]) -> f32 {
    let len = inputs.iter().map(|x| x.len()).max().unwrap_or(0);
    (0..len.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = [0.0f32; 16];
            for x in inputs {
                let s = &x[(c * CHUNK).min(x.len())..((c + 1) * CHUNK).min(x.len())];
                let mut it = s.chunks_exact(16);
                for block in &mut it {
                    for (a, &b) in acc.iter_mut().zip(block) {
                        *a += b;
                    }
                }
                acc[0] += it.remainder().iter().sum::<f32>();
            }
            acc.iter().sum::<f32>()
        })
        .sum()
}

/// [`streaming_sum`] reading four inputs at once per pass over a chunk, as
/// FedAvg's kernel does since it adds up to four inputs per pass: more
/// streams in flight per core. On the 2-core VM the one-input-at-a-time
/// read stays near 13 GiB/s at n = 100 while the four-stream read and
/// FedAvg go past 20; the faster of the two is the yardstick.
pub fn streaming_sum4(inputs: &[&[f32]]) -> f32 {
    let len = inputs.iter().map(|x| x.len()).min().unwrap_or(0);
    (0..len.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let range = c * CHUNK..((c + 1) * CHUNK).min(len);
            let mut acc = [0.0f32; 16];
            for group in inputs.chunks(4) {
                let x = |k: usize| &group[k][range.clone()];
                let n = range.len();
                match group.len() {
                    4 => {
                        let (a, b, cc, d) = (x(0), x(1), x(2), x(3));
                        for i in 0..n {
                            acc[i % 16] += a[i] + b[i] + cc[i] + d[i];
                        }
                    }
                    3 => {
                        let (a, b, cc) = (x(0), x(1), x(2));
                        for i in 0..n {
                            acc[i % 16] += a[i] + b[i] + cc[i];
                        }
                    }
                    2 => {
                        let (a, b) = (x(0), x(1));
                        for i in 0..n {
                            acc[i % 16] += a[i] + b[i];
                        }
                    }
                    _ => {
                        for (i, v) in x(0).iter().enumerate() {
                            acc[i % 16] += v;
                        }
                    }
                }
            }
            acc.iter().sum::<f32>()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_stream_read_sums_every_value() {
        let xs: Vec<Vec<f32>> = (0..6).map(|k| vec![k as f32; CHUNK + 3]).collect();
        let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let want = (0..6).sum::<usize>() as f32 * (CHUNK + 3) as f32;
        assert_eq!(streaming_sum4(&refs), want);
        assert_eq!(streaming_sum(&refs), want);
    }

    #[test]
    fn streaming_sum_reads_every_value_of_inputs_of_unequal_length() {
        let xs: Vec<Vec<f32>> = [2 * CHUNK + 5, CHUNK - 3, 17]
            .iter()
            .enumerate()
            .map(|(k, &d)| {
                (0..d)
                    .map(|i| ((i * 7 + k * 13) % 101) as f32 - 50.0)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
        let total: f64 = xs.iter().flatten().map(|&v| f64::from(v)).sum();
        let got = f64::from(streaming_sum(&refs));
        assert!(
            (got - total).abs() < 1e-2 * total.abs().max(1.0),
            "{got} vs {total}"
        );
    }
}
