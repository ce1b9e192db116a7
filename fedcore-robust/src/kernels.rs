//! Chunked, parallel passes over the flat updates shared by the aggregators.
//!
//! Each pass splits the coordinates into blocks ([`CHUNK`] coordinates, or
//! fewer where every input's block must stay in cache) over rayon threads
//! and reads every input once per block, so the cost is one stream through
//! memory. Per-block scratch is allocated once per block, never per
//! coordinate.
//!
//! Partial sums are collected in block order and added sequentially, never
//! through rayon's `reduce` (whose tree depends on scheduling): results are
//! bit-for-bit reproducible, which resumed runs rely on.
//!
//! The arithmetic kernels are compiled for several instruction sets
//! ([`simd!`]: AVX-512, AVX2 + FMA, SSE4.2, NEON, and the baseline the
//! crate is built for) and pick the best the CPU has at run time. Rust
//! never fuses a multiply and an add on its own and the lanes fix the order
//! of every sum, so each version returns the same bits; only the vector
//! width differs.

use fedcore::aggregate::CHUNK;
use multiversion::multiversion;
use rayon::prelude::*;

/// Compiles the function it wraps once per instruction set and dispatches
/// at run time: `multiversion`'s "simd" list (AVX2 + FMA, SSE4.2, SSE2,
/// NEON) with AVX-512 first, which that list leaves out (commented out in
/// multiversion 0.8). On a CPU with 512-bit FP units (AMD Zen 5, Intel
/// server parts) the f64 kernels then run 8 lanes per instruction instead
/// of 4.
macro_rules! simd {
    ($($item:tt)*) => {
        #[multiversion(targets(
            "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
            "x86_64+avx2+fma",
            "x86_64+sse4.2",
            "x86+avx2+fma",
            "x86+sse4.2",
            "x86+sse2",
            "aarch64+neon",
        ))]
        $($item)*
    };
}

/// `out = sum_i w_i x_i / sum_i w_i` and, in the same pass while each block
/// is in cache, the squared distances `||x_i - out||^2`. The estimate is kept
/// in f64: iterative methods (Weiszfeld) stall at the rounding noise of an
/// f32 sum long before they reach their tolerance.
pub(crate) fn weighted_mean_and_sq_dists(xs: &[&[f32]], w: &[f64], out: &mut [f64]) -> Vec<f64> {
    let total: f64 = w.iter().sum();
    let w: Vec<f64> = w.iter().map(|&v| v / total).collect();
    let n = xs.len();
    // Blocks small enough that the second read of every input's block (for
    // the distances) comes from L2: 512 KB of inputs per block.
    let block = (131_072 / n.max(1)).clamp(1024, CHUNK) / 64 * 64;
    out.par_chunks_mut(block)
        .enumerate()
        .map(|(c, z)| {
            let start = c * block;
            let len = z.len();
            let r = start..start + len;
            z.fill(0.0);
            for (x, wi) in xs.chunks_exact(4).zip(w.chunks_exact(4)) {
                let x = [0, 1, 2, 3].map(|k| &x[k][r.clone()]);
                axpy_x4(z, x, [wi[0], wi[1], wi[2], wi[3]]);
            }
            let rest = n / 4 * 4;
            for (x, &wi) in xs[rest..].iter().zip(&w[rest..]) {
                axpy(z, &x[r.clone()], wi);
            }
            let mut sq = Vec::with_capacity(n);
            for x in xs.chunks_exact(4) {
                let x = [0, 1, 2, 3].map(|k| &x[k][r.clone()]);
                sq.extend(sq_dist_f64_x4(x, z));
            }
            sq.extend(xs[rest..].iter().map(|x| sq_dist_f64(&x[r.clone()], z)));
            sq
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

simd! {
/// `z += w x`.
fn axpy(z: &mut [f64], x: &[f32], w: f64) {
    for (a, &b) in z.iter_mut().zip(x) {
        *a += w * f64::from(b);
    }
}
}

simd! {
/// Four [`axpy`]s in one pass, the same bits (each coordinate still adds
/// `w_0 x_0`, then `w_1 x_1`, ... in order), with `z` loaded and stored
/// once for four inputs instead of once per input: at 100 inputs the
/// per-input version spent 60 % of the geometric median's time here, at
/// half the memory bandwidth.
fn axpy_x4(z: &mut [f64], x: [&[f32]; 4], w: [f64; 4]) {
    let len = z.len();
    let [x0, x1, x2, x3] = x.map(|x| &x[..len]);
    for (k, a) in z.iter_mut().enumerate() {
        let mut v = *a;
        v += w[0] * f64::from(x0[k]);
        v += w[1] * f64::from(x1[k]);
        v += w[2] * f64::from(x2[k]);
        v += w[3] * f64::from(x3[k]);
        *a = v;
    }
}
}

simd! {
/// Squared Euclidean distance of two f32 slices, accumulated in f64: the
/// geometric median's position is only as accurate as the square root of
/// the resolution of its objective.
pub(crate) fn sq_dist_f32(a: &[f32], b: &[f32]) -> f64 {
    lanes(a, b, |x, y| {
        let d = f64::from(x - y);
        d * d
    })
}
}

/// `||a - b||^2` for the pairwise matrices (Krum, Bulyan, pre-aggregated
/// distances), at a quarter of [`sq_dist_f32`]'s f64 work: each square is
/// taken in f32 and 4 of them are summed per lane (16 lanes) in f32 before
/// the f64 sum. Every term is non-negative, so the result is within
/// 2.4e-7 of [`sq_dist_f32`]'s, relatively (four f32 roundings per term),
/// wherever the differences' squares are normal f32 numbers; a pair whose
/// f32 squares overflow (differences above about 9e18) is summed again in
/// f64, and squares below f32's normal range (differences below 1e-19)
/// lose at most 1.4e-45 each. It ranks distances, it does not locate a
/// median. Built from multiversion's own list, without AVX-512: there
/// LLVM scalarized the four-pair form this kernel had before the Gram
/// matrix took over (2.6x slower than its AVX2 version); this one-pair
/// form only serves the pairs the Gram matrix cannot, and was not
/// measured there.
#[multiversion(targets = "simd")]
fn sq_dist_ranked(a: &[f32], b: &[f32]) -> f64 {
    const RUN: usize = 4;
    const W: usize = 16;
    const BLOCK: usize = RUN * W;
    let mut acc = [0.0f64; W];
    let full = a.len() / BLOCK * BLOCK;
    for start in (0..full).step_by(BLOCK) {
        let x: &[f32; BLOCK] = a[start..start + BLOCK].try_into().expect("a block");
        let y: &[f32; BLOCK] = b[start..start + BLOCK].try_into().expect("a block");
        let mut run = [0.0f32; W];
        for r in 0..RUN {
            for k in 0..W {
                let d = x[r * W + k] - y[r * W + k];
                run[k] += d * d;
            }
        }
        for k in 0..W {
            acc[k] += f64::from(run[k]);
        }
    }
    let sum = acc.iter().sum::<f64>() + sq_dist_f32(&a[full..], &b[full..]);
    if sum == f64::INFINITY {
        // An f32 square overflowed (or the inputs hold inf): the pair in
        // f64, as the geometric median sums it.
        return sq_dist_f32(a, b);
    }
    sum
}

simd! {
/// `||x - z||^2` for an f32 point and an f64 estimate.
fn sq_dist_f64(x: &[f32], z: &[f64]) -> f64 {
    lanes(x, z, |a, b| {
        let d = f64::from(a) - b;
        d * d
    })
}
}

/// [`sq_dist_f64`] of four points to one estimate (the same bits as four
/// calls: the same lanes), loading `z` once for the four.
fn sq_dist_f64_x4(x: [&[f32]; 4], z: &[f64]) -> [f64; 4] {
    let len = z.len();
    let full = len / 8 * 8;
    let acc = sq_dist_f64_x4_lanes(x.map(|x| &x[..full]), &z[..full]);
    let mut out = [0.0; 4];
    for (p, o) in out.iter_mut().enumerate() {
        // Under 8 coordinates `sq_dist_f64` is its own tail sum, exactly.
        *o = acc[p].iter().sum::<f64>() + sq_dist_f64(&x[p][full..len], &z[full..]);
    }
    out
}

simd! {
/// The lanes of [`sq_dist_f64_x4`] over a multiple of 8 coordinates: four
/// named accumulators, each updated by its own statement, returned
/// unsummed. (Written as a loop over the points, or summed here, LLVM's SLP
/// vectorizer packed one lane of each point into a vector instead: a gather
/// per coordinate, 2x slower.)
fn sq_dist_f64_x4_lanes(x: [&[f32]; 4], z: &[f64]) -> [[f64; 8]; 4] {
    type V = [f64; 8];
    #[inline(always)]
    fn add_sq(acc: V, x: &[f32], z: &V, i: usize) -> V {
        let x: &[f32; 8] = x[i..i + 8].try_into().expect("8 lanes");
        let mut out = acc;
        for k in 0..8 {
            let d = f64::from(x[k]) - z[k];
            out[k] += d * d;
        }
        out
    }
    let (mut a0, mut a1, mut a2, mut a3) = ([0.0; 8], [0.0; 8], [0.0; 8], [0.0; 8]);
    for i in (0..z.len()).step_by(8) {
        let zs: &V = z[i..i + 8].try_into().expect("8 lanes");
        a0 = add_sq(a0, x[0], zs, i);
        a1 = add_sq(a1, x[1], zs, i);
        a2 = add_sq(a2, x[2], zs, i);
        a3 = add_sq(a3, x[3], zs, i);
    }
    [a0, a1, a2, a3]
}
}

simd! {
/// `||a - b||^2` for two f64 slices.
fn sq_dist_f64s(a: &[f64], b: &[f64]) -> f64 {
    lanes(a, b, |p, q| (p - q) * (p - q))
}
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

/// A symmetric `n x n` row-major matrix of pairwise quantities, computed
/// block by block so that the `n` blocks of one chunk stay in cache:
/// `block(range, part)` writes the entries `(i, j)`, `j >= i`, of `part`
/// (row-major; what it leaves stays 0) for the coordinates in `range`;
/// per-block partials are added in block order, and the lower triangle is
/// mirrored from the upper.
fn pairwise(xs: &[&[f32]], block: impl Fn(std::ops::Range<usize>, &mut [f64]) + Sync) -> Vec<f64> {
    let n = xs.len();
    let d = xs.first().map_or(0, |x| x.len());
    let parts = (0..d.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let r = c * CHUNK..((c + 1) * CHUNK).min(d);
            let mut part = vec![0.0f64; n * n];
            block(r, &mut part);
            part
        })
        .collect::<Vec<_>>();
    sum_upper(parts, n)
}

/// The sum of per-block partial matrices (`n x n`, row-major, upper
/// triangle), added in block order, with the lower triangle mirrored.
fn sum_upper(parts: Vec<Vec<f64>>, n: usize) -> Vec<f64> {
    let mut m = parts.into_iter().fold(vec![0.0; n * n], add_vecs);
    for i in 0..n {
        for j in 0..i {
            m[i * n + j] = m[j * n + i];
        }
    }
    m
}

/// The Gram matrix of the points restricted to a sample of their
/// coordinates: the first run of [`GRAM_SUB`] in every `every` runs, spread
/// over the whole length. Returns it and the number of coordinates taken.
/// The runs are summed in at most 16 groups, each in order, and the groups
/// in order: the same bits however many threads run it, and at most 16
/// partial matrices in memory.
pub(crate) fn sampled_gram(xs: &[&[f32]], every: usize) -> (Vec<f64>, usize) {
    let n = xs.len();
    let d = xs.first().map_or(0, |x| x.len());
    let runs: Vec<std::ops::Range<usize>> = (0..d)
        .step_by(GRAM_SUB * every.max(1))
        .map(|s| s..(s + GRAM_SUB).min(d))
        .collect();
    let taken = runs.iter().map(|r| r.len()).sum();
    let parts = runs
        .par_chunks(runs.len().div_ceil(16).max(1))
        .map(|group| {
            let mut part = vec![0.0f64; n * n];
            for r in group {
                let rows: Vec<&[f32]> = xs.iter().map(|x| &x[r.clone()]).collect();
                gram_tiles(&rows, &mut part);
            }
            part
        })
        .collect::<Vec<_>>();
    (sum_upper(parts, n), taken)
}

/// All pairwise squared distances as an `n x n` row-major matrix: each
/// within [`PAIR_RELATIVE`] of its exact value, relatively, or, where it
/// was summed directly, within 2.4e-7 of [`sq_dist_f32`]'s.
///
/// From the Gram matrix ([`gram`], one read of the data in tiles):
/// `||a - b||^2 = G_aa + G_bb - 2 G_ab`. That difference cancels where two
/// points are close compared with their norms, so each entry is kept only
/// where the Gram matrix's rounding bound ([`gram_error`]) is within
/// [`PAIR_RELATIVE`] of it; the others (close pairs, equal points) are
/// summed again directly ([`sq_dist_ranked`]: within 2.4e-7). Updates that
/// share a large common part (whole models rather than their changes) fall
/// back pair by pair (still one chunked read of the data for all of them);
/// deltas of the usual size never do. At n = 100 and 7M values Krum went
/// from 1.2 s (4,950 direct distances) to 0.56-0.58 s (docs/benchmarks.md).
/// A pair's value and whether it is summed again depend only on the Gram
/// matrix's bits, which are the same on every instruction set.
pub(crate) fn pairwise_sq_dists(xs: &[&[f32]]) -> Vec<f64> {
    let n = xs.len();
    let len = xs.first().map_or(0, |x| x.len());
    let g = gram(xs);
    let bound = gram_error(len);
    let mut m = vec![0.0; n * n];
    let mut close = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            let (gii, gjj) = (g[i * n + i], g[j * n + j]);
            let v = (gii + gjj - 2.0 * g[i * n + j]).max(0.0);
            // The entry's error is at most bound * (G_ii + G_jj).
            if bound * (gii + gjj) <= PAIR_RELATIVE * v {
                (m[i * n + j], m[j * n + i]) = (v, v);
            } else {
                close.push((i, j));
            }
        }
    }
    if close.is_empty() {
        return m;
    }
    // Chunk by chunk, as the Gram matrix was read: every input once per
    // chunk however many of its pairs are close (a pair at a time over the
    // whole vectors read 56 MB per pair at 7M values).
    let direct = pairwise(xs, |r, part| {
        for &(i, j) in &close {
            part[i * n + j] = sq_dist_ranked(&xs[i][r.clone()], &xs[j][r.clone()]);
        }
    });
    for &(i, j) in &close {
        (m[i * n + j], m[j * n + i]) = (direct[i * n + j], direct[i * n + j]);
    }
    m
}

/// How far, relatively, an entry of [`pairwise_sq_dists`] may be from its
/// exact value (the direct sums' own bound is 2.4e-7).
const PAIR_RELATIVE: f64 = 2e-7;

/// `c` such that `G_aa + G_bb - 2 G_ab`, computed from [`gram`] over `len`
/// coordinates, is within `c (G_aa + G_bb)` of its exact value.
/// Each Gram entry is a sum of exact products in which every term passes
/// through at most `m` roundings: a tile lane's [`GRAM_SUB`]` / 8` terms,
/// the 8 lanes, the tail (at most 7), the sub-blocks of a chunk, and the
/// chunks in order; so its error is at most `gamma(m) sum |x_a x_b|`
/// (Higham's `gamma(m) = m u / (1 - m u)`, `u = 2^-53`), and
/// `sum |x_a x_b| <= (G_aa + G_bb) / 2`. The three entries then contribute
/// `2 gamma(m) (G_aa + G_bb)`, and the two additions and the doubling at
/// most `3 u (G_aa + G_bb)` more (everything is bounded by `G_aa + G_bb`
/// there).
fn gram_error(len: usize) -> f64 {
    let u = f64::EPSILON / 2.0;
    let m = (GRAM_SUB / TILE_LANES + TILE_LANES + TILE_LANES + CHUNK / GRAM_SUB + len / CHUNK + 2)
        as f64;
    let gamma = m * u / (1.0 - m * u);
    2.0 * gamma + 3.0 * u
}

/// The Gram matrix `G_ij = x_i . x_j`, accumulated in f64 (each product of
/// two f32 values is exact in f64; only the sums round).
///
/// The upper triangle is covered block by block ([`GRAM_SUB`] coordinates)
/// by tiles ([`gram_tiles`]): each coordinate of a tile's inputs is loaded
/// and widened once for all the tile's products, where one dot product at a
/// time loads and widens 2 for 1.
pub(crate) fn gram(xs: &[&[f32]]) -> Vec<f64> {
    pairwise(xs, |r, part| {
        for start in r.clone().step_by(GRAM_SUB) {
            let end = (start + GRAM_SUB).min(r.end);
            let rows: Vec<&[f32]> = xs.iter().map(|x| &x[start..end]).collect();
            gram_tiles(&rows, part);
        }
    })
}

/// [`gram`] (the same bits), and in the same read `out = sum_j w_j x_j`
/// by FedAvg's kernel (`weighted_sum_into`, the same bits as after it),
/// piece by piece while the tiles have the inputs' pieces in cache: the
/// weighted sum adds `n` f32 multiply-adds per coordinate to the tiles'
/// `n (n + 1) / 2` in f64, instead of a read of its own.
pub(crate) fn gram_with_sum(xs: &[&[f32]], w: &[f32], out: &mut [f32]) -> Vec<f64> {
    let n = xs.len();
    let parts = out
        .par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(c, o)| {
            let mut part = vec![0.0f64; n * n];
            for (s, piece) in o.chunks_mut(GRAM_SUB).enumerate() {
                let start = c * CHUNK + s * GRAM_SUB;
                let rows: Vec<&[f32]> = xs.iter().map(|x| &x[start..start + piece.len()]).collect();
                gram_tiles(&rows, &mut part);
                fedcore::aggregate::weighted_sum_into(&rows, w, piece)
                    .expect("points, weights and output of one length");
            }
            part
        })
        .collect::<Vec<_>>();
    sum_upper(parts, n)
}

simd! {
/// Adds the upper triangle of the Gram matrix of `rows` (of one length)
/// to `part` (`n x n`, row-major). With AVX-512, by [`cover_blocks`]: the
/// inputs in blocks of 4 or 5, tiles of up to 5 x 5 (25 accumulators of
/// one 512-bit register each, of 32). Without AVX-512, by tiles of 1 row by 4
/// columns ([`tile_1x4`]): 2 x 4 tiles' 8 accumulators of 8 lanes fill
/// AVX2's 16 registers, and their spills made the geometric median at n =
/// 64 take 600-617 ms against 403-408 (27-28 against 32-34 at n = 10). The
/// tile's shape changes which products share a load, not how any sum is
/// formed: the same bits either way.
fn gram_tiles(rows: &[&[f32]], part: &mut [f64]) {
    // Fused multiply-adds are part of every aarch64 CPU.
    const FMA: bool = multiversion::target::selected_target!().supports_feature_str("fma")
        || cfg!(target_arch = "aarch64");
    const AVX512: bool = multiversion::target::selected_target!().supports_feature_str("avx512f");
    if AVX512 {
        cover_blocks::<FMA>(rows, part);
    } else {
        cover::<1, 4, FMA, Tile1x4>(rows, part);
    }
}
}

/// [`gram_tiles`] with AVX-512: the inputs in as few blocks as hold at
/// most 5 each, `k = ceil(n / 5)`, of 4 or 5 inputs where `n` allows it
/// (`4k <= n`: every count from 12 on, and 4, 5, 8, 9, 10), else
/// [`cover_fours`]. Each block's own products by a triangular tile
/// ([`tile_diag4`], [`tile_diag5`]: 4 loads for 10 products, 5 for 15),
/// each pair of blocks by a rectangular one ([`tile_4x4`], [`tile_4x5`],
/// [`tile_5x5`]: 25 accumulators and 6 operands of 32 registers). Every
/// product of the upper triangle is computed once, and each input is loaded
/// (and widened: `vcvtps2pd`, which took as many samples in `perf annotate`
/// as the multiply-adds) once per block, `k` times. At n = 10, 20 loads and
/// 55 multiply-adds per 8 coordinates, where 2 x 4 tiles over the upper
/// triangle did 54 and 72 (the geometric median 17-20 ms, here 15-17).
#[inline(always)]
fn cover_blocks<const FMA: bool>(rows: &[&[f32]], part: &mut [f64]) {
    let n = rows.len();
    let k = n.div_ceil(5);
    if n < 4 * k {
        return cover_fours::<FMA>(rows, part);
    }
    let len = rows.first().map_or(0, |r| r.len());
    let full = len / TILE_LANES * TILE_LANES;
    let slice = |i: usize| &rows[i][..full];
    // `k - fives` blocks of 4, then `fives` blocks of 5.
    let fives = n - 4 * k;
    let start = |b: usize| 4 * b + b.saturating_sub(k - fives);
    let four = |b: usize| -> [usize; 4] { std::array::from_fn(|p| start(b) + p) };
    let five = |b: usize| -> [usize; 5] { std::array::from_fn(|p| start(b) + p) };
    let is_five = |b: usize| b >= k - fives;
    for bi in 0..k {
        if is_five(bi) {
            let a = five(bi);
            add_tile(rows, part, a, a, &tile_diag5::<FMA>(a.map(slice)), true);
        } else {
            let a = four(bi);
            add_tile(rows, part, a, a, &tile_diag4::<FMA>(a.map(slice)), true);
        }
        for bj in bi + 1..k {
            match (is_five(bi), is_five(bj)) {
                (false, false) => {
                    let (a, b) = (four(bi), four(bj));
                    let acc = tile_4x4::<FMA>(a.map(slice), b.map(slice));
                    add_tile(rows, part, a, b, &acc, false);
                }
                (false, true) => {
                    let (a, b) = (four(bi), five(bj));
                    let acc = tile_4x5::<FMA>(a.map(slice), b.map(slice));
                    add_tile(rows, part, a, b, &acc, false);
                }
                // The blocks of 5 come last.
                (true, _) => {
                    let (a, b) = (five(bi), five(bj));
                    let acc = tile_5x5::<FMA>(a.map(slice), b.map(slice));
                    add_tile(rows, part, a, b, &acc, false);
                }
            }
        }
    }
}

/// [`cover_blocks`] for the counts that are not sums of `ceil(n / 5)`
/// blocks of 4 and 5 (1, 2, 3, 6, 7 and 11): blocks of 4, the last one
/// clamped to the last input; each block's own products by [`tile_diag4`],
/// each pair of blocks by [`tile_4x4`], or by [`tile_1x4`] or [`tile_2x4`]
/// where the later block has only 1 or 2 inputs (of those counts, 2 x 4 at
/// n = 6; 1 x 4 only for counts [`cover_blocks`] splits otherwise, as the
/// tests call it for every count).
#[inline(always)]
fn cover_fours<const FMA: bool>(rows: &[&[f32]], part: &mut [f64]) {
    let n = rows.len();
    let len = rows.first().map_or(0, |r| r.len());
    let full = len / TILE_LANES * TILE_LANES;
    let slice = |i: usize| &rows[i][..full];
    let block = |b: usize| -> [usize; 4] { std::array::from_fn(|p| (4 * b + p).min(n - 1)) };
    for bi in 0..n.div_ceil(4) {
        let a = block(bi);
        add_tile(rows, part, a, a, &tile_diag4::<FMA>(a.map(slice)), true);
        for bj in bi + 1..n.div_ceil(4) {
            let b = block(bj);
            match n - 4 * bj {
                1 => {
                    let acc = tile_1x4::<FMA>([slice(b[0])], a.map(slice));
                    add_tile(rows, part, [b[0]], a, &acc, false);
                }
                2 => {
                    let acc = tile_2x4::<FMA>([slice(b[0]), slice(b[1])], a.map(slice));
                    add_tile(rows, part, [b[0], b[1]], a, &acc, false);
                }
                _ => {
                    let acc = tile_4x4::<FMA>(a.map(slice), b.map(slice));
                    add_tile(rows, part, a, b, &acc, false);
                }
            }
        }
    }
}

/// Adds a tile's products (`acc[p][q]`, inputs `a[p]` and `b[q]`) to the
/// upper triangle of `part`, with the coordinates past the last whole lane
/// group, skipping the clamped repeats of the last input and, on a tile
/// that crosses the diagonal (`diagonal`), what is below it. The product
/// of inputs `i` and `j` is the same bits either way round.
#[inline(always)]
fn add_tile<const R: usize, const C: usize>(
    rows: &[&[f32]],
    part: &mut [f64],
    a: [usize; R],
    b: [usize; C],
    acc: &[[[f64; TILE_LANES]; C]; R],
    diagonal: bool,
) {
    let n = rows.len();
    let len = rows.first().map_or(0, |r| r.len());
    let full = len / TILE_LANES * TILE_LANES;
    for (p, &ra) in a.iter().enumerate() {
        for (q, &cb) in b.iter().enumerate() {
            if (!diagonal || cb >= ra) && (p == 0 || ra != a[p - 1]) && (q == 0 || cb != b[q - 1]) {
                let tail: f64 = (full..len)
                    .map(|k| f64::from(rows[ra][k]) * f64::from(rows[cb][k]))
                    .sum();
                part[ra.min(cb) * n + ra.max(cb)] += acc[p][q].iter().sum::<f64>() + tail;
            }
        }
    }
}

/// [`gram_tiles`] with tiles of `R` rows by `C` columns, computed by `T`,
/// over the upper triangle (a tile that reaches past the last input or
/// below the diagonal computes products nobody reads).
#[inline(always)]
fn cover<const R: usize, const C: usize, const FMA: bool, T: Tile<R, C>>(
    rows: &[&[f32]],
    part: &mut [f64],
) {
    let n = rows.len();
    let len = rows.first().map_or(0, |r| r.len());
    let full = len / TILE_LANES * TILE_LANES;
    for i in (0..n).step_by(R) {
        let a: [usize; R] = std::array::from_fn(|p| (i + p).min(n - 1));
        for j in (i..n).step_by(C) {
            let b: [usize; C] = std::array::from_fn(|q| (j + q).min(n - 1));
            let acc = T::products::<FMA>(a.map(|p| &rows[p][..full]), b.map(|q| &rows[q][..full]));
            add_tile(rows, part, a, b, &acc, true);
        }
    }
}

/// A tile's products, `R` rows by `C` columns (a trait, not a function
/// passed in: a function pointer or closure argument was not inlined, and
/// `mul_add` outside the instruction set's version calls the software
/// `fma`, 50x slower).
trait Tile<const R: usize, const C: usize> {
    fn products<const FMA: bool>(a: [&[f32]; R], b: [&[f32]; C]) -> [[[f64; TILE_LANES]; C]; R];
}

/// Lanes of each of [`tile_2x4`]'s sums: one 512-bit register of f64 (two
/// of 256 bits with AVX2).
const TILE_LANES: usize = 8;

/// `a_p . b_q` for 2 rows and 4 columns of one length (a multiple of
/// [`TILE_LANES`]), each accumulated in [`TILE_LANES`] f64 lanes
/// (coordinate `k` in lane `k % TILE_LANES`, the lanes summed in order by
/// the caller), the same bits on every instruction set. Every coordinate of
/// the 6 inputs is loaded and widened once for 8 products. The product of
/// two f32 values is exact in f64, so with `FMA` a fused multiply-add
/// rounds once where a multiply and an add round once too: the same bits
/// in half the instructions. Eight named accumulators, inlined into
/// [`gram_tiles`]: written with loops over arrays of accumulators, LLVM
/// kept them on the stack (2x slower).
#[inline(always)]
fn tile_2x4<const FMA: bool>(a: [&[f32]; 2], b: [&[f32]; 4]) -> [[[f64; TILE_LANES]; 4]; 2] {
    let (ld, madd) = (tile_load, tile_madd::<FMA>);
    let full = a[0].len();
    let [a0, a1] = a.map(|x| &x[..full]);
    let [b0, b1, b2, b3] = b.map(|y| &y[..full]);
    let z = [0.0; TILE_LANES];
    let (mut c00, mut c01, mut c02, mut c03) = (z, z, z, z);
    let (mut c10, mut c11, mut c12, mut c13) = (z, z, z, z);
    for i in (0..full).step_by(TILE_LANES) {
        let (x0, x1) = (ld(a0, i), ld(a1, i));
        let y0 = ld(b0, i);
        c00 = madd(c00, x0, y0);
        c10 = madd(c10, x1, y0);
        let y1 = ld(b1, i);
        c01 = madd(c01, x0, y1);
        c11 = madd(c11, x1, y1);
        let y2 = ld(b2, i);
        c02 = madd(c02, x0, y2);
        c12 = madd(c12, x1, y2);
        let y3 = ld(b3, i);
        c03 = madd(c03, x0, y3);
        c13 = madd(c13, x1, y3);
    }
    [[c00, c01, c02, c03], [c10, c11, c12, c13]]
}

/// [`tile_2x4`] for 4 rows: 16 named accumulators, 8 loads per coordinate
/// for 16 products.
#[inline(always)]
fn tile_4x4<const FMA: bool>(a: [&[f32]; 4], b: [&[f32]; 4]) -> [[[f64; TILE_LANES]; 4]; 4] {
    type V = [f64; TILE_LANES];
    let (ld, madd) = (tile_load, tile_madd::<FMA>);
    let full = a[0].len();
    let [a0, a1, a2, a3] = a.map(|x| &x[..full]);
    let [b0, b1, b2, b3] = b.map(|y| &y[..full]);
    let z: V = [0.0; TILE_LANES];
    let (mut c00, mut c01, mut c02, mut c03) = (z, z, z, z);
    let (mut c10, mut c11, mut c12, mut c13) = (z, z, z, z);
    let (mut c20, mut c21, mut c22, mut c23) = (z, z, z, z);
    let (mut c30, mut c31, mut c32, mut c33) = (z, z, z, z);
    for i in (0..full).step_by(TILE_LANES) {
        let (x0, x1, x2, x3) = (ld(a0, i), ld(a1, i), ld(a2, i), ld(a3, i));
        let y = ld(b0, i);
        (c00, c10, c20, c30) = (
            madd(c00, x0, y),
            madd(c10, x1, y),
            madd(c20, x2, y),
            madd(c30, x3, y),
        );
        let y = ld(b1, i);
        (c01, c11, c21, c31) = (
            madd(c01, x0, y),
            madd(c11, x1, y),
            madd(c21, x2, y),
            madd(c31, x3, y),
        );
        let y = ld(b2, i);
        (c02, c12, c22, c32) = (
            madd(c02, x0, y),
            madd(c12, x1, y),
            madd(c22, x2, y),
            madd(c32, x3, y),
        );
        let y = ld(b3, i);
        (c03, c13, c23, c33) = (
            madd(c03, x0, y),
            madd(c13, x1, y),
            madd(c23, x2, y),
            madd(c33, x3, y),
        );
    }
    [
        [c00, c01, c02, c03],
        [c10, c11, c12, c13],
        [c20, c21, c22, c23],
        [c30, c31, c32, c33],
    ]
}

/// The upper triangle of the products of 4 inputs with each other
/// (`acc[p][q]`, `q >= p`; what is below the diagonal stays 0), as
/// [`tile_2x4`] computes them: 10 named accumulators, 4 loads.
#[inline(always)]
fn tile_diag4<const FMA: bool>(a: [&[f32]; 4]) -> [[[f64; TILE_LANES]; 4]; 4] {
    type V = [f64; TILE_LANES];
    let (ld, madd) = (tile_load, tile_madd::<FMA>);
    let full = a[0].len();
    let [a0, a1, a2, a3] = a.map(|x| &x[..full]);
    let z: V = [0.0; TILE_LANES];
    let (mut c00, mut c01, mut c02, mut c03) = (z, z, z, z);
    let (mut c11, mut c12, mut c13) = (z, z, z);
    let (mut c22, mut c23, mut c33) = (z, z, z);
    for i in (0..full).step_by(TILE_LANES) {
        let (x0, x1, x2, x3) = (ld(a0, i), ld(a1, i), ld(a2, i), ld(a3, i));
        (c00, c01, c02, c03) = (
            madd(c00, x0, x0),
            madd(c01, x0, x1),
            madd(c02, x0, x2),
            madd(c03, x0, x3),
        );
        (c11, c12, c13) = (madd(c11, x1, x1), madd(c12, x1, x2), madd(c13, x1, x3));
        (c22, c23, c33) = (madd(c22, x2, x2), madd(c23, x2, x3), madd(c33, x3, x3));
    }
    [
        [c00, c01, c02, c03],
        [z, c11, c12, c13],
        [z, z, c22, c23],
        [z, z, z, c33],
    ]
}

/// [`tile_diag4`] for 5 inputs: 15 named accumulators, 5 loads.
#[inline(always)]
fn tile_diag5<const FMA: bool>(a: [&[f32]; 5]) -> [[[f64; TILE_LANES]; 5]; 5] {
    type V = [f64; TILE_LANES];
    let (ld, madd) = (tile_load, tile_madd::<FMA>);
    let full = a[0].len();
    let [a0, a1, a2, a3, a4] = a.map(|x| &x[..full]);
    let z: V = [0.0; TILE_LANES];
    let (mut c00, mut c01, mut c02, mut c03, mut c04) = (z, z, z, z, z);
    let (mut c11, mut c12, mut c13, mut c14) = (z, z, z, z);
    let (mut c22, mut c23, mut c24) = (z, z, z);
    let (mut c33, mut c34, mut c44) = (z, z, z);
    for i in (0..full).step_by(TILE_LANES) {
        let (x0, x1, x2, x3, x4) = (ld(a0, i), ld(a1, i), ld(a2, i), ld(a3, i), ld(a4, i));
        (c00, c01, c02, c03, c04) = (
            madd(c00, x0, x0),
            madd(c01, x0, x1),
            madd(c02, x0, x2),
            madd(c03, x0, x3),
            madd(c04, x0, x4),
        );
        (c11, c12, c13, c14) = (
            madd(c11, x1, x1),
            madd(c12, x1, x2),
            madd(c13, x1, x3),
            madd(c14, x1, x4),
        );
        (c22, c23, c24) = (madd(c22, x2, x2), madd(c23, x2, x3), madd(c24, x2, x4));
        (c33, c34, c44) = (madd(c33, x3, x3), madd(c34, x3, x4), madd(c44, x4, x4));
    }
    [
        [c00, c01, c02, c03, c04],
        [z, c11, c12, c13, c14],
        [z, z, c22, c23, c24],
        [z, z, z, c33, c34],
        [z, z, z, z, c44],
    ]
}

/// [`tile_4x4`] with 5 columns: 20 named accumulators, 9 loads per
/// coordinate for 20 products.
#[inline(always)]
fn tile_4x5<const FMA: bool>(a: [&[f32]; 4], b: [&[f32]; 5]) -> [[[f64; TILE_LANES]; 5]; 4] {
    type V = [f64; TILE_LANES];
    let (ld, madd) = (tile_load, tile_madd::<FMA>);
    let full = a[0].len();
    let [a0, a1, a2, a3] = a.map(|x| &x[..full]);
    let [b0, b1, b2, b3, b4] = b.map(|y| &y[..full]);
    let z: V = [0.0; TILE_LANES];
    let (mut c00, mut c01, mut c02, mut c03, mut c04) = (z, z, z, z, z);
    let (mut c10, mut c11, mut c12, mut c13, mut c14) = (z, z, z, z, z);
    let (mut c20, mut c21, mut c22, mut c23, mut c24) = (z, z, z, z, z);
    let (mut c30, mut c31, mut c32, mut c33, mut c34) = (z, z, z, z, z);
    for i in (0..full).step_by(TILE_LANES) {
        let (x0, x1, x2, x3) = (ld(a0, i), ld(a1, i), ld(a2, i), ld(a3, i));
        let y = ld(b0, i);
        (c00, c10, c20, c30) = (
            madd(c00, x0, y),
            madd(c10, x1, y),
            madd(c20, x2, y),
            madd(c30, x3, y),
        );
        let y = ld(b1, i);
        (c01, c11, c21, c31) = (
            madd(c01, x0, y),
            madd(c11, x1, y),
            madd(c21, x2, y),
            madd(c31, x3, y),
        );
        let y = ld(b2, i);
        (c02, c12, c22, c32) = (
            madd(c02, x0, y),
            madd(c12, x1, y),
            madd(c22, x2, y),
            madd(c32, x3, y),
        );
        let y = ld(b3, i);
        (c03, c13, c23, c33) = (
            madd(c03, x0, y),
            madd(c13, x1, y),
            madd(c23, x2, y),
            madd(c33, x3, y),
        );
        let y = ld(b4, i);
        (c04, c14, c24, c34) = (
            madd(c04, x0, y),
            madd(c14, x1, y),
            madd(c24, x2, y),
            madd(c34, x3, y),
        );
    }
    [
        [c00, c01, c02, c03, c04],
        [c10, c11, c12, c13, c14],
        [c20, c21, c22, c23, c24],
        [c30, c31, c32, c33, c34],
    ]
}

/// [`tile_4x4`] for 5 rows and 5 columns: 25 named accumulators, with the
/// 5 rows' values and one column's, 31 of AVX-512's 32 registers; 10 loads
/// per coordinate for 25 products.
#[inline(always)]
fn tile_5x5<const FMA: bool>(a: [&[f32]; 5], b: [&[f32]; 5]) -> [[[f64; TILE_LANES]; 5]; 5] {
    type V = [f64; TILE_LANES];
    let (ld, madd) = (tile_load, tile_madd::<FMA>);
    let full = a[0].len();
    let [a0, a1, a2, a3, a4] = a.map(|x| &x[..full]);
    let [b0, b1, b2, b3, b4] = b.map(|y| &y[..full]);
    let z: V = [0.0; TILE_LANES];
    let (mut c00, mut c01, mut c02, mut c03, mut c04) = (z, z, z, z, z);
    let (mut c10, mut c11, mut c12, mut c13, mut c14) = (z, z, z, z, z);
    let (mut c20, mut c21, mut c22, mut c23, mut c24) = (z, z, z, z, z);
    let (mut c30, mut c31, mut c32, mut c33, mut c34) = (z, z, z, z, z);
    let (mut c40, mut c41, mut c42, mut c43, mut c44) = (z, z, z, z, z);
    for i in (0..full).step_by(TILE_LANES) {
        let (x0, x1, x2, x3, x4) = (ld(a0, i), ld(a1, i), ld(a2, i), ld(a3, i), ld(a4, i));
        let y = ld(b0, i);
        (c00, c10, c20, c30, c40) = (
            madd(c00, x0, y),
            madd(c10, x1, y),
            madd(c20, x2, y),
            madd(c30, x3, y),
            madd(c40, x4, y),
        );
        let y = ld(b1, i);
        (c01, c11, c21, c31, c41) = (
            madd(c01, x0, y),
            madd(c11, x1, y),
            madd(c21, x2, y),
            madd(c31, x3, y),
            madd(c41, x4, y),
        );
        let y = ld(b2, i);
        (c02, c12, c22, c32, c42) = (
            madd(c02, x0, y),
            madd(c12, x1, y),
            madd(c22, x2, y),
            madd(c32, x3, y),
            madd(c42, x4, y),
        );
        let y = ld(b3, i);
        (c03, c13, c23, c33, c43) = (
            madd(c03, x0, y),
            madd(c13, x1, y),
            madd(c23, x2, y),
            madd(c33, x3, y),
            madd(c43, x4, y),
        );
        let y = ld(b4, i);
        (c04, c14, c24, c34, c44) = (
            madd(c04, x0, y),
            madd(c14, x1, y),
            madd(c24, x2, y),
            madd(c34, x3, y),
            madd(c44, x4, y),
        );
    }
    [
        [c00, c01, c02, c03, c04],
        [c10, c11, c12, c13, c14],
        [c20, c21, c22, c23, c24],
        [c30, c31, c32, c33, c34],
        [c40, c41, c42, c43, c44],
    ]
}

/// [`tile_2x4`] for 1 row: 4 accumulators, which without AVX-512 (two
/// 256-bit registers each, of 16) leave room for the loads.
#[inline(always)]
fn tile_1x4<const FMA: bool>(a: [&[f32]; 1], b: [&[f32]; 4]) -> [[[f64; TILE_LANES]; 4]; 1] {
    type V = [f64; TILE_LANES];
    let (ld, madd) = (tile_load, tile_madd::<FMA>);
    let full = a[0].len();
    let [a0] = a.map(|x| &x[..full]);
    let [b0, b1, b2, b3] = b.map(|y| &y[..full]);
    let z: V = [0.0; TILE_LANES];
    let (mut c00, mut c01, mut c02, mut c03) = (z, z, z, z);
    for i in (0..full).step_by(TILE_LANES) {
        let x0 = ld(a0, i);
        let y = ld(b0, i);
        c00 = madd(c00, x0, y);
        let y = ld(b1, i);
        c01 = madd(c01, x0, y);
        let y = ld(b2, i);
        c02 = madd(c02, x0, y);
        let y = ld(b3, i);
        c03 = madd(c03, x0, y);
    }
    [[c00, c01, c02, c03]]
}

/// [`tile_1x4`].
struct Tile1x4;

impl Tile<1, 4> for Tile1x4 {
    #[inline(always)]
    fn products<const FMA: bool>(a: [&[f32]; 1], b: [&[f32]; 4]) -> [[[f64; TILE_LANES]; 4]; 1] {
        tile_1x4::<FMA>(a, b)
    }
}

/// 8 coordinates of `s` from `i`, widened.
#[inline(always)]
fn tile_load(s: &[f32], i: usize) -> [f64; TILE_LANES] {
    let v: &[f32; TILE_LANES] = s[i..i + TILE_LANES].try_into().expect("a lane group");
    v.map(f64::from)
}

/// `acc + x y` per lane; fused where `FMA` (see [`tile_2x4`]: the same bits).
#[inline(always)]
fn tile_madd<const FMA: bool>(
    acc: [f64; TILE_LANES],
    x: [f64; TILE_LANES],
    y: [f64; TILE_LANES],
) -> [f64; TILE_LANES] {
    let mut out = acc;
    for k in 0..TILE_LANES {
        out[k] = if FMA {
            x[k].mul_add(y[k], out[k])
        } else {
            out[k] + x[k] * y[k]
        };
    }
    out
}

/// Coordinates per tile pass of [`gram`]: 8 KB of f32 per input (a tile
/// reads 4 to 10 of them; all 64 inputs' pieces are 512 KB, within L2).
/// 1,024 and 4,096 were the same within the run-to-run noise at 10, 16
/// and 64 inputs (18-19, 31-32 and 212-221 ms).
pub(crate) const GRAM_SUB: usize = 2048;

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
/// compare-exchange moves. About `n log^2 n / 4` of them (1,104 at n = 100,
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

simd! {
/// Sorts every column of `rows` (rows of `out.len()` values) with the
/// network `pairs`, then writes the mean of rows `lo..hi` of each column to
/// `out`, summed in f64 in row order.
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

    #[test]
    fn four_at_once_kernels_give_the_bits_of_one_at_a_time() {
        for len in [0usize, 1, 7, 8, 9, 63, 1001] {
            let xs: Vec<Vec<f32>> = (0..4)
                .map(|k| {
                    (0..len)
                        .map(|i| ((i * (k + 7) * 2_654_435_761) % 10_007) as f32 / 1e3 - 5.0)
                        .collect()
                })
                .collect();
            let x = [0, 1, 2, 3].map(|k| xs[k].as_slice());
            let w = [0.3, -1.7, 2.25e-3, 11.0];
            let start: Vec<f64> = (0..len).map(|i| i as f64 * 0.37 - 9.0).collect();
            let (mut one, mut four) = (start.clone(), start);
            for (x, &w) in x.iter().zip(&w) {
                axpy(&mut one, x, w);
            }
            axpy_x4(&mut four, x, w);
            assert_eq!(
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                four.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "axpy, len {len}"
            );
            let each = x.map(|x| sq_dist_f64(x, &one).to_bits());
            assert_eq!(sq_dist_f64_x4(x, &one).map(f64::to_bits), each, "len {len}");
        }
    }

    #[test]
    fn every_tile_shape_with_or_without_fma_gives_the_same_bits() {
        // Up to 23: every tile shape of the blocks of 4 and 5 (4 x 5 from
        // 9, 5 x 5 from 10) and of the blocks of 4 (1 x 4 at 5, 2 x 4 at 6,
        // a clamped 4 x 4 at 7 and 11).
        for n in 1..=23usize {
            for len in [1usize, 8, 13, 300] {
                let xs: Vec<Vec<f32>> = (0..n)
                    .map(|k| {
                        (0..len)
                            .map(|i| ((i * (k + 3) * 2_654_435_761) % 7_919) as f32 / 77.0 - 50.0)
                            .collect()
                    })
                    .collect();
                let rows: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
                let run = |f: fn(&[&[f32]], &mut [f64])| {
                    let mut part = vec![0.0f64; n * n];
                    f(&rows, &mut part);
                    part.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                };
                let narrow = run(cover::<1, 4, false, Tile1x4>);
                assert!(narrow.iter().any(|&b| b != 0), "n {n}, len {len}");
                assert_eq!(
                    run(cover::<1, 4, true, Tile1x4>),
                    narrow,
                    "n {n}, len {len}"
                );
                assert_eq!(run(cover_blocks::<false>), narrow, "n {n}, len {len}");
                assert_eq!(run(cover_blocks::<true>), narrow, "n {n}, len {len}");
                assert_eq!(run(cover_fours::<true>), narrow, "n {n}, len {len}");
                assert_eq!(run(gram_tiles), narrow, "n {n}, len {len}");
            }
        }
    }

    #[test]
    fn pairwise_distances_are_summed_directly_where_the_gram_matrix_cancels() {
        // Five points sharing a large common part (as whole models would),
        // two of them equal, and one far away: the close pairs' Gram
        // differences lose most of their digits, the far pairs' do not.
        let len = 3 * CHUNK + 11;
        let xs: Vec<Vec<f32>> = (0..6)
            .map(|k| {
                (0..len)
                    .map(|i| {
                        let noise = (((i * (k.min(3) + 1) * 2_654_435_761) % 17) as f32) * 1e-4;
                        if k == 5 { -3e3 - noise } else { 1e3 + noise }
                    })
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let m = pairwise_sq_dists(&refs);
        let g = gram(&refs);
        let mut cancelled = 0;
        for i in 0..6 {
            assert_eq!(m[i * 6 + i], 0.0);
            for j in 0..6 {
                assert_eq!(m[i * 6 + j].to_bits(), m[j * 6 + i].to_bits());
                // Exact differences (f32 differences in f64 are exact here).
                let e: f64 = refs[i]
                    .iter()
                    .zip(refs[j])
                    .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                    .sum();
                assert!(
                    (m[i * 6 + j] - e).abs() <= 2.4e-7 * e,
                    "{i}, {j}: {} vs {e}",
                    m[i * 6 + j]
                );
                let from_gram = g[i * 6 + i] + g[j * 6 + j] - 2.0 * g[i * 6 + j];
                if (from_gram - e).abs() > 2.4e-7 * e {
                    cancelled += 1;
                }
            }
        }
        // The test is only worth something if the Gram differences alone
        // would have failed it for the close pairs.
        assert!(cancelled >= 2 * 6, "{cancelled} pairs cancelled");
        // The far pairs are not summed again: they are the Gram matrix's.
        for i in 0..5 {
            let from_gram = (g[i * 6 + i] + g[5 * 6 + 5] - 2.0 * g[i * 6 + 5]).max(0.0);
            assert_eq!(m[i * 6 + 5].to_bits(), from_gram.to_bits(), "{i}, 5");
        }
        assert_eq!(m[4 * 6 + 3], 0.0, "points 3 and 4 are equal");
    }

    #[test]
    fn the_gram_matrix_with_a_weighted_sum_has_the_bits_of_each_alone() {
        for n in [1usize, 3, 5, 10] {
            for len in [0usize, 7, GRAM_SUB + 3, 2 * CHUNK + GRAM_SUB + 5] {
                let xs: Vec<Vec<f32>> = (0..n)
                    .map(|k| {
                        (0..len)
                            .map(|i| ((i * (k + 7) * 2_654_435_761) % 8_191) as f32 / 819.0 - 5.0)
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
                let w: Vec<f32> = (0..n).map(|k| 0.1 + k as f32 / 7.0).collect();
                let mut fused = vec![f32::NAN; len];
                let g = gram_with_sum(&refs, &w, &mut fused);
                let mut sum = vec![0.0f32; len];
                fedcore::aggregate::weighted_sum_into(&refs, &w, &mut sum).unwrap();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fused), bits(&sum), "n {n}, len {len}");
                let plain = gram(&refs);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&g), bits(&plain), "n {n}, len {len}");
            }
        }
    }

    #[test]
    fn a_sampled_gram_matrix_is_the_gram_matrix_of_the_sampled_runs() {
        let (n, every) = (4usize, 3usize);
        let len = 7 * GRAM_SUB + 100;
        let xs: Vec<Vec<f32>> = (0..n)
            .map(|k| {
                (0..len)
                    .map(|i| ((i * (k + 2)) % 101) as f32 / 10.0 - 5.0)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let (g, taken) = sampled_gram(&refs, every);
        // Runs 0, 3 and 6 of 2,048: 0..2048, 6144..8192, 12288..14336.
        let picked: Vec<usize> = [0, 3, 6]
            .iter()
            .flat_map(|r| r * GRAM_SUB..(r + 1) * GRAM_SUB)
            .collect();
        assert_eq!(taken, picked.len());
        for i in 0..n {
            for j in 0..n {
                let dot: f64 = picked
                    .iter()
                    .map(|&t| f64::from(xs[i][t]) * f64::from(xs[j][t]))
                    .sum();
                assert!(
                    (g[i * n + j] - dot).abs() <= 1e-9 * dot.abs().max(1.0),
                    "({i}, {j})"
                );
            }
        }
        // Every run, when every = 1, is the whole Gram matrix.
        let (all, taken) = sampled_gram(&refs, 1);
        assert_eq!(taken, len);
        for (a, b) in all.iter().zip(gram(&refs)) {
            assert!((a - b).abs() <= 1e-9 * b.abs().max(1.0));
        }
    }

    #[test]
    fn tiled_gram_matches_the_f64_dot_products_for_every_count_and_tail() {
        for n in 1..=17usize {
            for len in [0usize, 1, 3, 4, 5, 1001, CHUNK + 6] {
                let xs: Vec<Vec<f32>> = (0..n)
                    .map(|k| {
                        (0..len)
                            .map(|i| ((i * (k + 5) * 2_654_435_761) % 9_973) as f32 / 997.0 - 5.0)
                            .collect()
                    })
                    .collect();
                let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
                let g = gram(&refs);
                assert_eq!(g.len(), n * n);
                for i in 0..n {
                    for j in 0..n {
                        let (dot, abs) = (0..len).fold((0.0f64, 0.0f64), |(d, a), t| {
                            let p = f64::from(xs[i][t]) * f64::from(xs[j][t]);
                            (d + p, a + p.abs())
                        });
                        let got = g[i * n + j];
                        assert!(
                            (got - dot).abs() <= 1e-12 * abs,
                            "n {n}, len {len}, ({i}, {j}): {got} vs {dot}"
                        );
                        assert_eq!(got.to_bits(), g[j * n + i].to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn ranked_distances_are_within_their_bound_of_the_f64_sums() {
        // Lengths around the 64-coordinate runs, values of mixed scale.
        for len in [0usize, 5, 63, 64, 65, 1000, 70_001] {
            let row = |k: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| {
                        let v = ((i * (k + 3) * 2_654_435_761) % 10_007) as f32 / 777.0 - 6.0;
                        if i % 7 == 0 { v * 1e3 } else { v }
                    })
                    .collect()
            };
            let (a, b) = (row(0), row(1));
            let (fast, exact) = (sq_dist_ranked(&a, &b), sq_dist_f32(&a, &b));
            assert!(
                (fast - exact).abs() <= 2.4e-7 * exact,
                "len {len}: {fast} vs {exact}"
            );
        }
        // Differences whose f32 squares overflow: the pair in f64, so the
        // distance stays finite and within the bound.
        let mut big = vec![1.0f32; 200];
        big[70] = 3e19;
        let small = vec![-2.0f32; 200];
        let (fast, exact) = (sq_dist_ranked(&big, &small), sq_dist_f32(&big, &small));
        assert!(
            fast.is_finite() && (fast - exact).abs() <= 2.4e-7 * exact,
            "{fast} vs {exact}"
        );
        // Identical rows are exactly 0 apart.
        assert_eq!(sq_dist_ranked(&big, &big), 0.0);
        // The matrix: symmetric, zero diagonal, each entry its pair's.
        let xs: Vec<Vec<f32>> = (0..6)
            .map(|k| {
                (0..CHUNK + 9)
                    .map(|i| ((i * (k + 1)) % 97) as f32 * 0.01)
                    .collect()
            })
            .collect();
        let refs: Vec<&[f32]> = xs.iter().map(|x| x.as_slice()).collect();
        let m = pairwise_sq_dists(&refs);
        for i in 0..6 {
            assert_eq!(m[i * 6 + i], 0.0);
            for j in 0..6 {
                assert_eq!(m[i * 6 + j], m[j * 6 + i]);
                let e = sq_dist_f32(refs[i], refs[j]);
                assert!((m[i * 6 + j] - e).abs() <= 2.4e-7 * e, "{i}, {j}");
            }
        }
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
