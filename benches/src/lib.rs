//! Shared inputs for the criterion benches in `benches/`.

use fedcore::{ClientUpdate, Parameters};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
