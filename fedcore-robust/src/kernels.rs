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
//!
//! The arithmetic kernels are compiled for several instruction sets
//! (`multiversion`: AVX-512, AVX2 + FMA, ..., and the x86-64 baseline the
//! crate is built for) and pick the best the CPU has at run time. Rust never
//! fuses a multiply and an add on its own and the lanes fix the order of
//! every sum, so each version returns the same bits; only the vector width
//! differs.

use fedcore::aggregate::CHUNK;
use multiversion::multiversion;
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
                axpy(z, &x[start..start + len], wi);
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

/// `z += w x`.
#[multiversion(targets = "simd")]
fn axpy(z: &mut [f64], x: &[f32], w: f64) {
    for (a, &b) in z.iter_mut().zip(x) {
        *a += w * f64::from(b);
    }
}

/// Squared Euclidean distance of two f32 slices, accumulated in f64: the
/// geometric median's position is only as accurate as the square root of
/// the resolution of its objective.
#[multiversion(targets = "simd")]
pub(crate) fn sq_dist_f32(a: &[f32], b: &[f32]) -> f64 {
    lanes(a, b, |x, y| f64::from(x - y).powi(2))
}

/// `||x - z||^2` for an f32 point and an f64 estimate.
#[multiversion(targets = "simd")]
fn sq_dist_f64(x: &[f32], z: &[f64]) -> f64 {
    lanes(x, z, |a, b| (f64::from(a) - b).powi(2))
}

/// `||a - b||^2` for two f64 slices.
#[multiversion(targets = "simd")]
fn sq_dist_f64s(a: &[f64], b: &[f64]) -> f64 {
    lanes(a, b, |p, q| (p - q) * (p - q))
}

/// `a . b` for two f32 slices, accumulated in f64.
#[multiversion(targets = "simd")]
fn dot_f32(a: &[f32], b: &[f32]) -> f64 {
    lanes(a, b, |x, y| f64::from(x) * f64::from(y))
}

/// `||a - b||` for two f64 vectors, in parallel blocks of 8 lanes, summed in
/// block order (reproducible).
pub(crate) fn dist_f64(a: &[f64], b: &[f64]) -> f64 {
    a.par_chunks(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .map(|(x, y)| sq_dist_f64s(x, y))
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
    pairwise(xs, true, dot_f32)
}

/// Update counts up to this are sorted per coordinate by a compare-exchange
/// network over blocks of coordinates (vectorized min/max, no branches);
/// larger counts gather each coordinate and select in it.
pub(crate) const NETWORK_MAX: usize = 128;

/// Coordinates sorted together by the network: `n` rows of this many values
/// (400 KB at n = 100, within a core's L2).
const LANES: usize = 1024;

/// Batcher's odd-even merge sort on `n` wires: its compare-exchanges `(a, b)`,
/// `a < b`, in order. It is the network for the next power of two with the
/// wires from `n` on removed: they would hold +inf, which no
/// compare-exchange moves. `n log^2 n / 4` of them about (1,225 at n = 100,
/// against 4,950 for odd-even transposition).
fn batcher(n: usize) -> Vec<(usize, usize)> {
    let size = n.next_power_of_two();
    let mut pairs = Vec::new();
    let mut p = 1;
    while p < size {
        let mut k = p;
        while k >= 1 {
            let mut j = k % p;
            while j + k < size {
                for i in 0..k {
                    let (a, b) = (i + j, i + j + k);
                    if a / (2 * p) == b / (2 * p) && b < n {
                        pairs.push((a, b));
                    }
                }
                j += 2 * k;
            }
            k /= 2;
        }
        p *= 2;
    }
    pairs
}

/// Sorts every column of `rows` (rows of `out.len()` values) with the
/// network `pairs`, then writes the mean of rows `lo..hi` of each column to
/// `out`, summed in f64 in row order.
#[multiversion(targets = "simd")]
fn network_block(
    rows: &mut [f32],
    pairs: &[(usize, usize)],
    lo: usize,
    hi: usize,
    out: &mut [f32],
) {
    let len = out.len();
    for &(a, b) in pairs {
        let (low, high) = rows.split_at_mut(b * len);
        let (x, y) = (&mut low[a * len..(a + 1) * len], &mut high[..len]);
        for (x, y) in x.iter_mut().zip(y.iter_mut()) {
            // NaN-free input: one vector min and one max.
            let (p, q) = (*x, *y);
            let swap = q < p;
            *x = if swap { q } else { p };
            *y = if swap { p } else { q };
        }
    }
    let mut acc = vec![0.0f64; len];
    for row in rows.chunks_exact(len).take(hi).skip(lo) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += f64::from(v);
        }
    }
    let kept = (hi - lo) as f64;
    for (slot, a) in out.iter_mut().zip(acc) {
        *slot = (a / kept) as f32;
    }
}

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
        let pairs = batcher(n);
        out.par_chunks_mut(LANES).enumerate().for_each(|(c, o)| {
            let start = c * LANES;
            let len = o.len();
            let mut rows = vec![0.0f32; n * len];
            for (row, x) in rows.chunks_exact_mut(len).zip(xs) {
                row.copy_from_slice(&x[start..start + len]);
            }
            network_block(&mut rows, &pairs, lo, hi, o);
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

    /// Applies a network to one column.
    fn run(pairs: &[(usize, usize)], v: &mut [u32]) {
        for &(a, b) in pairs {
            if v[b] < v[a] {
                v.swap(a, b);
            }
        }
    }

    #[test]
    fn batcher_sorts_every_input_of_every_size_up_to_the_network_limit() {
        // The 0-1 principle: a network that sorts every 0/1 input sorts
        // every input. Exhaustive up to 14 wires.
        for n in 1..=14usize {
            let pairs = batcher(n);
            for bits in 0u32..(1 << n) {
                let mut v: Vec<u32> = (0..n).map(|i| (bits >> i) & 1).collect();
                run(&pairs, &mut v);
                assert!(v.is_sorted(), "n = {n}, input {bits:b}");
            }
        }
        // Above: reversed, constant-run and pseudo-random inputs.
        for n in 15..=NETWORK_MAX {
            let pairs = batcher(n);
            assert!(pairs.iter().all(|&(a, b)| a < b && b < n));
            for seed in 0..50u64 {
                let mut v: Vec<u32> = (0..n as u64)
                    .map(|i| match seed {
                        0 => (n as u64 - i) as u32,
                        1 => (i % 3) as u32,
                        _ => ((i + 1) * (seed * 2 + 1) * 2_654_435_761 % 1_009) as u32,
                    })
                    .collect();
                let mut want = v.clone();
                want.sort_unstable();
                run(&pairs, &mut v);
                assert_eq!(v, want, "n = {n}, seed {seed}");
            }
        }
        // Fewer compare-exchanges than odd-even transposition's n (n-1) / 2.
        assert!(batcher(100).len() < 100 * 99 / 4);
    }

    #[test]
    fn order_statistics_match_a_full_sort_on_both_paths() {
        // Network path (n <= NETWORK_MAX) and selection path, a partial
        // last block, ties, and every (lo, hi) window kind the callers use.
        let d = LANES + 7;
        for n in [
            1usize,
            2,
            3,
            10,
            24,
            25,
            40,
            100,
            NETWORK_MAX,
            NETWORK_MAX + 1,
        ] {
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
