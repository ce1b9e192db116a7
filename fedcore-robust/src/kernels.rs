//! Chunked, parallel passes over the flat updates shared by the aggregators.
//!
//! Each pass splits the coordinates into [`CHUNK`]-sized blocks over rayon
//! threads and reads every input once per block, so the cost is one stream
//! through memory. Per-block scratch is allocated once per block, never per
//! coordinate.
//!
//! Partial sums are collected in block order and added sequentially, never
//! through rayon's `reduce` (whose tree depends on scheduling): results are
//! bit-for-bit reproducible, which resumed runs rely on.

use fedcore::aggregate::CHUNK;
use rayon::prelude::*;

/// `out = sum_i w_i x_i / sum_i w_i` and, in the same pass while each block
/// is in cache, the squared distances `||x_i - out||^2`. The estimate is kept
/// in f64: iterative methods (Weiszfeld) stall at the rounding noise of an
/// f32 sum long before they reach their tolerance.
pub(crate) fn weighted_mean_and_sq_dists(xs: &[&[f32]], w: &[f64], out: &mut [f64]) -> Vec<f64> {
    let total: f64 = w.iter().sum();
    let w: Vec<f64> = w.iter().map(|&v| v / total).collect();
    let n = xs.len();
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(c, z)| {
            let start = c * CHUNK;
            let len = z.len();
            z.fill(0.0);
            for (x, &wi) in xs.iter().zip(&w) {
                for (a, &b) in z.iter_mut().zip(&x[start..start + len]) {
                    *a += wi * f64::from(b);
                }
            }
            xs.iter()
                .map(|x| sq_dist_f64(&x[start..start + len], z))
                .collect::<Vec<f64>>()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0.0; n], add_vecs)
}

/// `sum_k f(a_k, b_k)` in 8 independent f64 lanes: a single running sum is
/// a serial dependency the compiler cannot vectorize, which made these
/// passes compute-bound. Monomorphized per `f`, so it costs nothing.
#[inline(always)]
fn lanes<A: Copy, B: Copy>(a: &[A], b: &[B], f: impl Fn(A, B) -> f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut ia = a.chunks_exact(8);
    let mut ib = b.chunks_exact(8);
    for (x, y) in (&mut ia).zip(&mut ib) {
        for k in 0..8 {
            acc[k] += f(x[k], y[k]);
        }
    }
    let tail: f64 = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// Squared Euclidean distance of two f32 slices, accumulated in f64: the
/// geometric median's position is only as accurate as the square root of
/// the resolution of its objective.
pub(crate) fn sq_dist_f32(a: &[f32], b: &[f32]) -> f64 {
    lanes(a, b, |x, y| f64::from(x - y).powi(2))
}

/// `||x - z||^2` for an f32 point and an f64 estimate.
fn sq_dist_f64(x: &[f32], z: &[f64]) -> f64 {
    lanes(x, z, |a, b| (f64::from(a) - b).powi(2))
}

/// `||a - b||` for two f64 vectors, in parallel blocks of 8 lanes, summed in
/// block order (reproducible).
pub(crate) fn dist_f64(a: &[f64], b: &[f64]) -> f64 {
    a.par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(x, y)| lanes(x, y, |p, q| (p - q) * (p - q)))
        .collect::<Vec<f64>>()
        .iter()
        .sum::<f64>()
        .sqrt()
}

/// Squared distances `||x_i - z||^2` for every input, one parallel pass.
pub(crate) fn sq_dists_to(xs: &[&[f32]], z: &[f32]) -> Vec<f64> {
    let n = xs.len();
    (0..z.len().div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let r = c * CHUNK..((c + 1) * CHUNK).min(z.len());
            xs.iter()
                .map(|x| sq_dist_f32(&x[r.clone()], &z[r.clone()]))
                .collect::<Vec<f64>>()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0.0; n], add_vecs)
}

fn add_vecs(mut a: Vec<f64>, b: Vec<f64>) -> Vec<f64> {
    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
    a
}

/// `f(x_i, x_j)` for all `i <= j` (with the diagonal) or `i < j`, as a
/// symmetric `n x n` row-major matrix, computed block by block so that the
/// `n` blocks of one chunk stay in cache; per-block partials are added in
/// block order.
fn pairwise(xs: &[&[f32]], diagonal: bool, f: impl Fn(&[f32], &[f32]) -> f64 + Sync) -> Vec<f64> {
    let n = xs.len();
    let d = xs.first().map_or(0, |x| x.len());
    let first = usize::from(!diagonal);
    let mut m = (0..d.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let r = c * CHUNK..((c + 1) * CHUNK).min(d);
            let mut part = vec![0.0f64; n * n];
            for i in 0..n {
                for j in i + first..n {
                    part[i * n + j] = f(&xs[i][r.clone()], &xs[j][r.clone()]);
                }
            }
            part
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(vec![0.0; n * n], add_vecs);
    for i in 0..n {
        for j in 0..i {
            m[i * n + j] = m[j * n + i];
        }
    }
    m
}

/// All pairwise squared distances as an `n x n` row-major matrix.
pub(crate) fn pairwise_sq_dists(xs: &[&[f32]]) -> Vec<f64> {
    pairwise(xs, false, sq_dist_f32)
}

/// The Gram matrix `G_ij = x_i . x_j`, accumulated in f64.
pub(crate) fn gram(xs: &[&[f32]]) -> Vec<f64> {
    pairwise(xs, true, |a, b| {
        lanes(a, b, |x, y| f64::from(x) * f64::from(y))
    })
}

/// Update counts up to this are sorted per coordinate by a compare-exchange
/// network over blocks of coordinates (vectorized min/max, no branches);
/// larger counts gather each coordinate and select in it.
pub(crate) const NETWORK_MAX: usize = 24;

/// Coordinates sorted together by the network: `n` rows of this many values.
const LANES: usize = 1024;

/// For every coordinate, the mean of its order statistics `lo..hi` over the
/// `n` updates (`0 <= lo < hi <= n`): `lo = k, hi = n - k` is the trimmed
/// mean, the middle one or two the median. Inputs must be NaN-free (the
/// aggregators receive validated updates).
pub(crate) fn mean_of_order_statistics(xs: &[&[f32]], out: &mut [f32], lo: usize, hi: usize) {
    let n = xs.len();
    assert!(
        lo < hi && hi <= n,
        "order statistics {lo}..{hi} of {n} values"
    );
    let kept = (hi - lo) as f64;
    if n <= NETWORK_MAX {
        out.par_chunks_mut(LANES).enumerate().for_each(|(c, o)| {
            let start = c * LANES;
            let len = o.len();
            let mut rows = vec![0.0f32; n * len];
            for (row, x) in rows.chunks_exact_mut(len).zip(xs) {
                row.copy_from_slice(&x[start..start + len]);
            }
            // Odd-even transposition sort: n rounds of compare-exchanges
            // between neighbouring rows sort every column.
            for round in 0..n {
                for i in (round % 2..n.saturating_sub(1)).step_by(2) {
                    let (a, b) = rows[i * len..(i + 2) * len].split_at_mut(len);
                    for (x, y) in a.iter_mut().zip(b.iter_mut()) {
                        let (p, q) = (*x, *y);
                        *x = p.min(q);
                        *y = p.max(q);
                    }
                }
            }
            let mut acc = vec![0.0f64; len];
            for row in rows.chunks_exact(len).take(hi).skip(lo) {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += f64::from(v);
                }
            }
            for (slot, a) in o.iter_mut().zip(acc) {
                *slot = (a / kept) as f32;
            }
        });
    } else {
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            let start = c * CHUNK;
            let mut buf = vec![0.0f32; n];
            for (k, slot) in o.iter_mut().enumerate() {
                for (b, x) in buf.iter_mut().zip(xs) {
                    *b = x[start + k];
                }
                buf.select_nth_unstable_by(lo, f32::total_cmp);
                let rest = &mut buf[lo..];
                if hi - lo > 1 {
                    rest.select_nth_unstable_by(hi - lo - 1, f32::total_cmp);
                }
                let sum: f64 = rest[..hi - lo].iter().map(|&v| f64::from(v)).sum();
                *slot = (sum / kept) as f32;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_pass_matches_naive() {
        let d = 2 * CHUNK + 5;
        let xs: Vec<Vec<f32>> = (0..3)
            .map(|k| (0..d).map(|i| ((i * (k + 3)) % 17) as f32 - 8.0).collect())
            .collect();
        let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let w = [1.0, 2.0, 5.0];
        let mut z = vec![0.0f64; d];
        let sq = weighted_mean_and_sq_dists(&refs, &w, &mut z);
        for i in 0..d {
            let e: f64 = (0..3).map(|k| w[k] * f64::from(xs[k][i])).sum::<f64>() / 8.0;
            assert!((z[i] - e).abs() < 1e-9);
        }
        for k in 0..3 {
            let e: f64 = (0..d).map(|i| (f64::from(xs[k][i]) - z[i]).powi(2)).sum();
            assert!((sq[k] - e).abs() < 1e-3 * e.max(1.0), "{} vs {e}", sq[k]);
        }
        let m = pairwise_sq_dists(&refs);
        let e01: f64 = (0..d).map(|i| f64::from(xs[0][i] - xs[1][i]).powi(2)).sum();
        assert!((m[1] - e01).abs() < 1e-3 * e01 && m[3] == m[1] && m[0] == 0.0);
    }

    #[test]
    fn order_statistics_match_a_full_sort_on_both_paths() {
        // Network path (n <= NETWORK_MAX) and selection path, a partial
        // last block, ties, and every (lo, hi) window kind the callers use.
        let d = LANES + 7;
        for n in [1usize, 2, 3, 10, NETWORK_MAX, NETWORK_MAX + 1, 40] {
            let xs: Vec<Vec<f32>> = (0..n)
                .map(|k| {
                    (0..d)
                        .map(|i| {
                            (((i + 1) * (k * 7 + 3) * 2_654_435_761 % 1_000) / 10) as f32 - 50.0
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
            let windows = [
                (0, n),
                (n / 2, n / 2 + 1),
                (n / 4, n - n / 4),
                (0, 1),
                (n - 1, n),
            ];
            for (lo, hi) in windows {
                let mut out = vec![0.0f32; d];
                mean_of_order_statistics(&refs, &mut out, lo, hi);
                for i in 0..d {
                    let mut col: Vec<f32> = xs.iter().map(|x| x[i]).collect();
                    col.sort_by(f32::total_cmp);
                    let e =
                        col[lo..hi].iter().map(|&v| f64::from(v)).sum::<f64>() / (hi - lo) as f64;
                    assert_eq!(out[i], e as f32, "n {n} window {lo}..{hi} coordinate {i}");
                }
            }
        }
    }
}
