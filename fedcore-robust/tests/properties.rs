//! Properties of the robust aggregators, an oracle for Weiszfeld, and the
//! checked parameter types.
#![allow(clippy::unwrap_used, missing_docs)]

use fedcore::{Aggregator, ClientUpdate, Error, Parameters};
use fedcore_robust::*;
use proptest::prelude::*;

fn update(i: usize, values: Vec<f32>) -> ClientUpdate {
    let d = values.len();
    ClientUpdate::new(
        format!("c{i:03}").into(),
        1,
        10,
        Parameters::from_tensors([("w", vec![d], values)]).unwrap(),
    )
}

fn updates(points: &[Vec<f32>]) -> Vec<ClientUpdate> {
    points
        .iter()
        .enumerate()
        .map(|(i, p)| update(i, p.clone()))
        .collect()
}

fn dist(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn points_strategy(
    n: std::ops::Range<usize>,
    d: std::ops::Range<usize>,
) -> impl Strategy<Value = Vec<Vec<f32>>> {
    (n, d).prop_flat_map(|(n, d)| prop::collection::vec(prop::collection::vec(-5.0f32..5.0, d), n))
}

fn gm() -> GeometricMedian {
    GeometricMedianParams::new()
        .weighting(Weighting::Uniform)
        .check()
        .unwrap()
}

/// Sum of distances, in f64.
fn objective(points: &[Vec<f32>], z: &[f64]) -> f64 {
    points.iter().map(|p| dist(p, z)).sum()
}

/// The oracle: the best of (a) damped Newton on the sum of distances, in
/// f64, from the mean, (b) the ellipsoid method, which converges on any
/// convex function from subgradients alone, kinks included, and (c) every
/// data point. The sum of distances is
/// convex and smooth away from the data points, so its minimum is either a
/// stationary point, which (a) reaches, or a data point, which (b) lists;
/// (a) alone stalls at such a kink. Slow and obvious, and shares nothing with
/// Weiszfeld's fixed-point update.
fn direct_minimize(points: &[Vec<f32>]) -> Vec<f64> {
    let candidates = [newton(points), ellipsoid(points)];
    points
        .iter()
        .map(|p| p.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>())
        .chain(candidates)
        .min_by(|a, b| objective(points, a).total_cmp(&objective(points, b)))
        .unwrap()
}

/// Damped Newton on the sum of distances: gradient sum u_i, Hessian
/// sum (I - u_i u_i^T) / d_i with u_i the unit vector from x_i to z.
fn newton(points: &[Vec<f32>]) -> Vec<f64> {
    let d = points[0].len();
    let mut z: Vec<f64> = (0..d)
        .map(|j| points.iter().map(|p| f64::from(p[j])).sum::<f64>() / points.len() as f64)
        .collect();
    for _ in 0..5000 {
        let mut g = vec![0.0; d];
        let mut h = vec![vec![0.0; d]; d];
        for p in points {
            let r = dist(p, &z).max(1e-300);
            let u: Vec<f64> = (0..d).map(|j| (z[j] - f64::from(p[j])) / r).collect();
            for a in 0..d {
                g[a] += u[a];
                for b in 0..d {
                    h[a][b] += (f64::from(u8::from(a == b)) - u[a] * u[b]) / r;
                }
            }
        }
        // Points on a line make the Hessian singular across it: regularize.
        let trace: f64 = (0..d).map(|a| h[a][a]).sum();
        for (a, row) in h.iter_mut().enumerate() {
            row[a] += 1e-9 * trace / d as f64 + 1e-300;
        }
        let newton_step = solve(h, g.iter().map(|v| -v).collect());
        let f0 = objective(points, &z);
        // Newton first; where it makes no progress (near a kink), a gradient step.
        let moved = [newton_step, g.iter().map(|v| -v).collect()]
            .into_iter()
            .any(|step| {
                let slope: f64 = g.iter().zip(&step).map(|(a, b)| a * b).sum();
                if slope.is_nan() || slope >= -1e-300 || step.iter().any(|v| !v.is_finite()) {
                    return false;
                }
                let mut t = 1.0;
                while t > 1e-30 {
                    let cand: Vec<f64> = z.iter().zip(&step).map(|(a, b)| a + t * b).collect();
                    let f = objective(points, &cand);
                    if f.is_finite() && f <= f0 + 1e-4 * t * slope && f < f0 {
                        z = cand;
                        return true;
                    }
                    t *= 0.5;
                }
                false
            });
        if !moved {
            break;
        }
    }
    z
}

/// The ellipsoid method (Shor; Nemirovski-Yudin) from the ball around the
/// mean that holds every point (the median lies in their convex hull);
/// bisection in one dimension. Returns the best centre seen.
fn ellipsoid(points: &[Vec<f32>]) -> Vec<f64> {
    let d = points[0].len();
    let mut c: Vec<f64> = (0..d)
        .map(|j| points.iter().map(|p| f64::from(p[j])).sum::<f64>() / points.len() as f64)
        .collect();
    let r = points.iter().map(|p| dist(p, &c)).fold(0.0, f64::max) * 1.01 + 1e-9;
    let subgradient = |z: &[f64]| -> Vec<f64> {
        let mut g = vec![0.0; d];
        for p in points {
            let r = dist(p, z);
            if r > 0.0 {
                for j in 0..d {
                    g[j] += (z[j] - f64::from(p[j])) / r;
                }
            }
        }
        g
    };
    let mut best = (objective(points, &c), c.clone());
    if d == 1 {
        let (mut lo, mut hi) = (c[0] - r, c[0] + r);
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            let g = subgradient(&[mid])[0];
            if g > 0.0 { hi = mid } else { lo = mid }
        }
        return vec![0.5 * (lo + hi)];
    }
    let mut pm: Vec<Vec<f64>> = (0..d)
        .map(|i| (0..d).map(|j| if i == j { r * r } else { 0.0 }).collect())
        .collect();
    let df = d as f64;
    for _ in 0..400 * d * d {
        let g = subgradient(&c);
        let pg: Vec<f64> = (0..d)
            .map(|i| (0..d).map(|j| pm[i][j] * g[j]).sum())
            .collect();
        let gpg: f64 = g.iter().zip(&pg).map(|(a, b)| a * b).sum();
        if gpg.is_nan() || gpg <= 1e-300 {
            break;
        }
        let b: Vec<f64> = pg.iter().map(|v| v / gpg.sqrt()).collect();
        for j in 0..d {
            c[j] -= b[j] / (df + 1.0);
        }
        for i in 0..d {
            for j in 0..d {
                pm[i][j] = df * df / (df * df - 1.0) * (pm[i][j] - 2.0 / (df + 1.0) * b[i] * b[j]);
            }
        }
        let f = objective(points, &c);
        if f < best.0 {
            best = (f, c.clone());
        }
    }
    best.1
}

/// Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap();
        a.swap(c, p);
        b.swap(c, p);
        let (top, bottom) = a.split_at_mut(c + 1);
        let pivot = &top[c];
        for (r, row) in bottom.iter_mut().enumerate() {
            let f = row[c] / pivot[c];
            for (x, p) in row[c..].iter_mut().zip(&pivot[c..]) {
                *x -= f * p;
            }
            b[c + 1 + r] -= f * b[c];
        }
    }
    let mut x = vec![0.0; n];
    for r in (0..n).rev() {
        x[r] = (b[r] - (r + 1..n).map(|k| a[r][k] * x[k]).sum::<f64>()) / a[r][r];
    }
    x
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    /// Oracle: Weiszfeld's objective equals the direct minimum to 1e-6 relative.
    #[test]
    fn weiszfeld_matches_direct_minimization(points in points_strategy(3..8, 1..5)) {
        let p = GeometricMedianParams::new()
            .weighting(Weighting::Uniform)
            .tolerance(1e-10)
            .nu(1e-9)
            .max_iterations(10_000)
            .check()
            .unwrap();
        let refs: Vec<&[f32]> = points.iter().map(|v| v.as_slice()).collect();
        let w = p.compute(&refs, &vec![1.0; points.len()]);
        let z_oracle = direct_minimize(&points);
        let z_w: Vec<f64> = w.median.iter().map(|&v| f64::from(v)).collect();
        let (fw, fo) = (objective(&points, &z_w), objective(&points, &z_oracle));
        prop_assert!((fw - fo).abs() <= 1e-6 * fo, "weiszfeld {fw} vs oracle {fo}");
    }

    /// Translating every point translates the median.
    #[test]
    fn geometric_median_is_translation_equivariant(
        points in points_strategy(2..9, 1..20),
        shift in -100.0f32..100.0,
    ) {
        let a = gm().aggregate(&updates(&points)).unwrap();
        let moved: Vec<Vec<f32>> = points.iter().map(|p| p.iter().map(|v| v + shift).collect()).collect();
        let b = gm().aggregate(&updates(&moved)).unwrap();
        for (x, y) in a.parameters.as_slice().iter().zip(b.parameters.as_slice()) {
            prop_assert!((x + shift - y).abs() < 1e-3 * (1.0 + shift.abs()), "{x} + {shift} vs {y}");
        }
    }

    /// Robustness. Bound tested (Minsker 2015, Lemma 2.1): if fewer than
    /// alpha * n points lie outside the ball B(m, r), alpha < 1/2, then the
    /// geometric median z satisfies ||z - m|| <= C_alpha * r with
    /// C_alpha = (1 - alpha) / sqrt(1 - 2 alpha). Here m is the honest points'
    /// centre, r their largest distance to it, alpha = (f + 1/2) / n for f
    /// arbitrary outliers with 2f < n.
    #[test]
    fn geometric_median_stays_near_the_honest_majority(
        honest in points_strategy(3..12, 2..10),
        outlier_scale in 1e2f32..1e7,
        f_frac in 0.0f64..0.49,
        seed in 0u64..1000,
    ) {
        let n_honest = honest.len();
        let d = honest[0].len();
        // f < n/2 with n = n_honest + f  <=>  f < n_honest.
        let f = ((f_frac * n_honest as f64) as usize).min(n_honest - 1);
        let n = n_honest + f;
        let mut all = honest.clone();
        for k in 0..f {
            // Arbitrary: far away, in varied directions, some colluding.
            let dir = (seed as usize + k / 2) % d;
            let mut p = vec![0.0f32; d];
            p[dir] = if k % 3 == 0 { outlier_scale } else { -outlier_scale };
            all.push(p);
        }
        let m: Vec<f64> = (0..d)
            .map(|j| honest.iter().map(|p| f64::from(p[j])).sum::<f64>() / n_honest as f64)
            .collect();
        let r = honest.iter().map(|p| dist(p, &m)).fold(0.0, f64::max);
        let alpha = (f as f64 + 0.5) / n as f64;
        let c = (1.0 - alpha) / (1.0 - 2.0 * alpha).sqrt();
        let z = gm().aggregate(&updates(&all)).unwrap();
        let err = dist(z.parameters.as_slice(), &m);
        prop_assert!(err <= c * r * (1.0 + 1e-3) + 1e-3, "||z - m|| = {err} > C r = {}", c * r);
    }

    /// Krum with n > 2f + 2 picks an honest update.
    #[test]
    fn krum_picks_an_honest_update(
        honest in points_strategy(5..12, 2..8),
        far in 10.0f32..1e6,
        colluding in any::<bool>(),
    ) {
        let n_honest = honest.len();
        let f = (n_honest - 3) / 2; // n = n_honest + f > 2f + 2
        let n = n_honest + f;
        let mut all = honest.clone();
        for k in 0..f {
            let v = if colluding { far } else { far * (k as f32 + 1.0) };
            all.push(vec![v; honest[0].len()]);
        }
        let mut krum = KrumParams::new(n, f).check().unwrap();
        let agg = krum.aggregate(&updates(&all)).unwrap();
        let chosen: Vec<usize> = agg.clients.iter().enumerate().filter(|(_, d)| d.weight > 0.0).map(|(i, _)| i).collect();
        prop_assert_eq!(chosen.len(), 1);
        prop_assert!(chosen[0] < n_honest, "picked Byzantine update {}", chosen[0]);
        prop_assert_eq!(agg.parameters.as_slice(), all[chosen[0]].as_slice());
    }

    /// Bulyan with n >= 4f + 3 stays within the honest updates' range in
    /// every coordinate when the f others send far values (together or
    /// not), and selects none of them when they do not collude (colluders'
    /// identical updates can be selected last, when few are left: the
    /// coordinate step keeps them out of the result).
    #[test]
    fn bulyan_stays_within_the_honest_range(
        honest in points_strategy(7..14, 1..8),
        far in 100.0f32..1e6,
        colluding in any::<bool>(),
    ) {
        let n_honest = honest.len();
        let f = (n_honest - 3) / 3; // n = n_honest + f >= 4f + 3
        let n = n_honest + f;
        let mut all = honest.clone();
        for k in 0..f {
            let v = if colluding { far } else { -far * (k as f32 + 1.0) };
            all.push(vec![v; honest[0].len()]);
        }
        let mut bulyan = BulyanParams::new(n, f).check().unwrap();
        let agg = bulyan.aggregate(&updates(&all)).unwrap();
        for (j, &got) in agg.parameters.as_slice().iter().enumerate() {
            let lo = honest.iter().map(|p| p[j]).fold(f32::INFINITY, f32::min);
            let hi = honest.iter().map(|p| p[j]).fold(f32::NEG_INFINITY, f32::max);
            prop_assert!(got >= lo - 1e-4 && got <= hi + 1e-4, "coordinate {j}: {got} not in [{lo}, {hi}]");
        }
        if !colluding {
            for d in &agg.clients[n_honest..] {
                prop_assert_eq!(d.weight, 0.0, "a far update was selected");
            }
        }
    }

    /// Centered clipping moves its center by at most tau per iteration
    /// however far the updates are, and is the mean when every update is
    /// within tau of the center.
    #[test]
    fn centered_clipping_steps_are_bounded_by_tau(
        points in points_strategy(1..10, 1..20),
        far in 1.0f32..1e6,
        tau in 0.1f64..5.0,
        iterations in 1usize..4,
    ) {
        let mut all = points.clone();
        all.push(vec![far; points[0].len()]);
        let mut cc = CenteredClippingParams::new(tau).iterations(iterations).check().unwrap();
        let agg = cc.aggregate(&updates(&all)).unwrap();
        let zero = vec![0.0f64; points[0].len()];
        let moved = dist(agg.parameters.as_slice(), &zero);
        prop_assert!(moved <= tau * iterations as f64 * (1.0 + 1e-5) + 1e-5, "moved {moved}");
        // Within tau of zero: one iteration is the mean.
        let small: Vec<Vec<f32>> = points.iter().map(|p| p.iter().map(|v| v * 1e-3).collect()).collect();
        let mut cc = CenteredClippingParams::new(tau).iterations(1).check().unwrap();
        let a = cc.aggregate(&updates(&small)).unwrap();
        let mut mean = Mean { weighting: Weighting::Uniform };
        let b = mean.aggregate(&updates(&small)).unwrap();
        for (x, y) in a.parameters.as_slice().iter().zip(b.parameters.as_slice()) {
            prop_assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }

    /// Trimmed mean with beta = 0 is the mean.
    #[test]
    fn trimmed_mean_without_trimming_is_the_mean(points in points_strategy(1..10, 1..30)) {
        let mut tm = TrimmedMeanParams::new(0.0).check().unwrap();
        let a = tm.aggregate(&updates(&points)).unwrap();
        let mut mean = Mean { weighting: Weighting::Uniform };
        let b = mean.aggregate(&updates(&points)).unwrap();
        for (x, y) in a.parameters.as_slice().iter().zip(b.parameters.as_slice()) {
            prop_assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    /// Coordinate median equals sorting each coordinate.
    #[test]
    fn coordinate_median_matches_sorting(points in points_strategy(1..10, 1..20)) {
        let agg = CoordinateMedian.aggregate(&updates(&points)).unwrap();
        for (j, &got) in agg.parameters.as_slice().iter().enumerate() {
            let mut c: Vec<f32> = points.iter().map(|p| p[j]).collect();
            c.sort_by(f32::total_cmp);
            let n = c.len();
            let want = if n % 2 == 1 { c[n / 2] } else { 0.5 * (c[n / 2 - 1] + c[n / 2]) };
            prop_assert_eq!(got, want);
        }
    }
}

#[test]
fn weiszfeld_edge_cases() {
    let g = GeometricMedianParams::new().check().unwrap();
    // n = 1.
    let w = g.compute(&[&[3.0, -1.0]], &[1.0]);
    assert_eq!(w.median, [3.0, -1.0]);
    assert!(w.converged && w.objective == 0.0);
    // Identical points.
    let p = [1.5f32, 2.5];
    let w = g.compute(&[&p, &p, &p], &[1.0, 2.0, 3.0]);
    assert_eq!(w.median, p);
    // The estimate lands on a data point (the middle of three collinear
    // points is the geometric median): no division by zero, finite result.
    let w = g.compute(&[&[0.0], &[1.0], &[10.0]], &[1.0, 1.0, 1.0]);
    assert!((w.median[0] - 1.0).abs() < 1e-3, "{:?}", w.median);
    assert!(w.weights.iter().all(|x| x.is_finite()));
    // Weights sum to 1 and the far point pulls least.
    assert!((w.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    assert!(w.weights[2] < w.weights[0]);
}

#[test]
fn impossible_settings_are_refused_at_construction() {
    assert!(KrumParams::new(4, 1).check().is_err(), "n <= 2f + 2");
    assert!(KrumParams::new(5, 1).check().is_ok());
    assert!(KrumParams::new(5, 1).multi(5).check().is_err(), "m > n - f");
    assert!(KrumParams::new(5, 1).multi(0).check().is_err());
    assert!(BulyanParams::new(6, 1).check().is_err(), "n < 4f + 3");
    assert!(BulyanParams::new(7, 1).check().is_ok());
    assert!(CenteredClippingParams::new(0.0).check().is_err());
    assert!(
        CenteredClippingParams::new(1.0)
            .iterations(0)
            .check()
            .is_err()
    );
    assert!(TrimmedMeanParams::new(0.5).check().is_err());
    assert!(TrimmedMeanParams::new(-0.1).check().is_err());
    assert!(GeometricMedianParams::new().nu(0.0).check().is_err());
    assert!(
        GeometricMedianParams::new()
            .tolerance(f64::NAN)
            .check()
            .is_err()
    );
    assert!(
        GeometricMedianParams::new()
            .max_iterations(0)
            .check()
            .is_err()
    );
    assert!(NormClip::fixed(-1.0).is_err());
    let e = KrumParams::new(3, 1).check().unwrap_err();
    assert!(e.to_string().contains("n > 2f + 2"), "{e}");
}

#[test]
fn krum_with_too_few_updates_this_round_is_a_typed_error() {
    let mut krum = KrumParams::new(7, 2).check().unwrap();
    let ups = updates(&vec![vec![1.0]; 6]);
    assert!(matches!(
        krum.aggregate(&ups),
        Err(Error::TooFewUpdates {
            needed: 7,
            got: 6,
            ..
        })
    ));
}

#[test]
fn fixed_norm_clip_bounds_every_update() {
    let mut agg = PreAggregated::new(Mean::default()).with(NormClip::fixed(1.0).unwrap());
    let ups = updates(&[vec![3.0, 4.0], vec![0.3, 0.4]]);
    let out = agg.aggregate(&ups).unwrap();
    // (0.6, 0.8) and (0.3, 0.4) averaged.
    let v = out.parameters.as_slice();
    assert!(
        (v[0] - 0.45).abs() < 1e-6 && (v[1] - 0.6).abs() < 1e-6,
        "{v:?}"
    );
}

#[test]
fn the_server_refuses_a_quorum_below_the_aggregators_minimum() {
    use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
    use fedcore::memory::InMemoryTransport;
    use fedcore::{Model, ModelClient, Server, ServerConfig};
    let mut t = InMemoryTransport::new();
    for i in 0..5 {
        t.add_client(ModelClient::new(
            format!("h{i}"),
            SoftmaxRegression::new(3, 2),
            synthetic_blobs(i, 20, 3, 2, 1.0),
        ))
        .unwrap();
    }
    let cfg = ServerConfig {
        min_fit_clients: 4,
        ..ServerConfig::default()
    };
    let krum = KrumParams::new(5, 1).check().unwrap();
    let e = Server::new(cfg, SoftmaxRegression::new(3, 2).parameters(), t, krum)
        .err()
        .unwrap();
    assert!(e.to_string().contains("needs at least 5"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    /// The Gram-matrix and direct-pass iterations reach the same median, up
    /// to beyond the 32 points where `Method::Auto` switches.
    #[test]
    fn gram_and_passes_agree(points in points_strategy(1..70, 1..40), outliers in 0usize..3) {
        let mut points = points;
        for k in 0..outliers.min(points.len().saturating_sub(1) / 2) {
            points[k].iter_mut().for_each(|v| *v *= -1000.0);
        }
        let refs: Vec<&[f32]> = points.iter().map(|v| v.as_slice()).collect();
        let alpha: Vec<f64> = (0..points.len()).map(|i| 1.0 + (i % 3) as f64).collect();
        let run = |m: Method| {
            GeometricMedianParams::new().method(m).tolerance(1e-12).max_iterations(10_000)
                .check().unwrap().compute(&refs, &alpha)
        };
        let (a, b) = (run(Method::Gram), run(Method::Passes));
        let scale = points.iter().flatten().fold(1.0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.median.iter().zip(&b.median) {
            prop_assert!((x - y).abs() <= 1e-4 * scale, "gram {x} vs passes {y}");
        }
        prop_assert!((a.objective - b.objective).abs() <= 1e-7 * a.objective.max(1.0), "objective gram {} vs passes {} (iterations {} / {})", a.objective, b.objective, a.iterations, b.iterations);
    }
}

fn gram_of(points: &[Vec<f32>]) -> Vec<f64> {
    let n = points.len();
    let mut g = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            g[i * n + j] = points[i]
                .iter()
                .zip(&points[j])
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
        }
    }
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    /// From the Gram matrix alone, the same iterations reach the same
    /// estimate: its coefficients over the points give the median of
    /// `compute`, with the same weights and distances.
    #[test]
    fn the_median_from_the_gram_matrix_alone_is_the_median(points in points_strategy(1..12, 1..40), outliers in 0usize..3) {
        let mut points = points;
        for k in 0..outliers.min(points.len().saturating_sub(1) / 2) {
            points[k].iter_mut().for_each(|v| *v *= -1000.0);
        }
        let refs: Vec<&[f32]> = points.iter().map(|v| v.as_slice()).collect();
        let alpha: Vec<f64> = (0..points.len()).map(|i| 1.0 + (i % 3) as f64).collect();
        let gm = GeometricMedianParams::new().method(Method::Gram).check().unwrap();
        let direct = gm.compute(&refs, &alpha);
        let g = gm.compute_on_gram(&gram_of(&points), &alpha, GramSlack::new(1e-9, 0.0).unwrap()).unwrap();
        // The Gram matrix here is summed in another order than the one
        // `compute` forms, so the two agree to rounding, not bit for bit.
        prop_assert!(g.iterations.abs_diff(direct.iterations) <= 1);
        prop_assert!((g.coefficients.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let scale = points.iter().flatten().fold(1.0f32, |m, v| m.max(v.abs()));
        for (k, m) in direct.median.iter().enumerate() {
            let z: f64 = g.coefficients.iter().zip(&points).map(|(c, p)| c * f64::from(p[k])).sum();
            prop_assert!((z - f64::from(*m)).abs() <= 1e-5 * f64::from(scale), "coordinate {k}: {z} vs {m}");
        }
        for (a, b) in g.weights.iter().zip(&direct.weights) {
            prop_assert!((a - b).abs() < 1e-6, "weight {a} vs {b}");
        }
        for (a, b) in g.distances.iter().zip(&direct.distances) {
            prop_assert!((a - b).abs() <= 1e-5 * b.max(1.0), "distance {a} vs {b}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, failure_persistence: None, ..ProptestConfig::default() })]

    /// From the squared pairwise distances alone (nothing about where the
    /// points are), the same estimate: its coefficients over the original
    /// points give the median of `compute`.
    #[test]
    fn the_median_from_pairwise_distances_alone_is_the_median(points in points_strategy(2..12, 1..40), shift in -50.0f32..50.0) {
        let refs: Vec<&[f32]> = points.iter().map(|v| v.as_slice()).collect();
        let alpha: Vec<f64> = (0..points.len()).map(|i| 1.0 + (i % 3) as f64).collect();
        let gm = GeometricMedianParams::new().method(Method::Gram).check().unwrap();
        let direct = gm.compute(&refs, &alpha);
        let n = points.len();
        // The distances of the points shifted by a common vector: the same.
        let shifted: Vec<Vec<f32>> = points.iter().map(|p| p.iter().map(|v| v + shift).collect()).collect();
        let g = gram_of(&shifted);
        let d: Vec<f64> = (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                (g[i * n + i] + g[j * n + j] - 2.0 * g[k]).max(0.0) * f64::from(u8::from(i != j))
            })
            .collect();
        let slack = GramSlack::new(1e-6, 1e-6 * d.iter().fold(1.0f64, |m, v| m.max(*v))).unwrap();
        let w = gm.compute_on_distances(&d, &alpha, slack).unwrap();
        let scale = points.iter().flatten().fold(1.0f32, |m, v| m.max(v.abs())) + shift.abs();
        for (k, m) in direct.median.iter().enumerate() {
            let z: f64 = w.coefficients.iter().zip(&points).map(|(c, p)| c * f64::from(p[k])).sum();
            prop_assert!((z - f64::from(*m)).abs() <= 1e-4 * f64::from(scale), "coordinate {k}: {z} vs {m}");
        }
    }
}

#[test]
fn a_distance_matrix_with_a_nonzero_diagonal_or_asymmetric_is_refused() {
    let gm = GeometricMedianParams::new().check().unwrap();
    let slack = GramSlack::new(1e-9, 1e-9).unwrap();
    let good = [0.0, 1.0, 4.0, 1.0, 0.0, 1.0, 4.0, 1.0, 0.0]; // 0, 1, 2 on a line
    let w = gm.compute_on_distances(&good, &[1.0; 3], slack).unwrap();
    // The median of 0, 1, 2 is 1.
    assert!(
        (w.coefficients[0] * 0.0 + w.coefficients[1] + 2.0 * w.coefficients[2] - 1.0).abs() < 1e-4
    );
    let mut bad = good;
    bad[4] = 0.5;
    assert_eq!(
        gm.compute_on_distances(&bad, &[1.0; 3], slack)
            .unwrap_err()
            .row,
        Some(1)
    );
    let mut bad = good;
    bad[2] = 9.0;
    assert_eq!(
        gm.compute_on_distances(&bad, &[1.0; 3], slack)
            .unwrap_err()
            .row,
        Some(2)
    );
    // Not a Euclidean distance matrix: 0-1 and 1-2 at distance 1, 0-2 at 10.
    let far = [0.0, 1.0, 100.0, 1.0, 0.0, 1.0, 100.0, 1.0, 0.0];
    assert!(gm.compute_on_distances(&far, &[1.0; 3], slack).is_err());
}

#[test]
fn a_matrix_no_points_could_have_is_refused_naming_the_row() {
    let gm = GeometricMedianParams::new().check().unwrap();
    let good = gram_of(&[vec![1.0, 0.0], vec![0.0, 2.0], vec![1.0, 1.0]]);
    let alpha = [1.0; 3];
    let slack = GramSlack::new(1e-9, 0.0).unwrap();
    assert!(gm.compute_on_gram(&good, &alpha, slack).is_ok());
    let refused = |g: Vec<f64>, alpha: &[f64]| gm.compute_on_gram(&g, alpha, slack).unwrap_err();
    // A negative squared norm.
    let mut g = good.clone();
    g[4] = -1.0;
    assert_eq!(refused(g, &alpha).row, Some(1));
    // An inner product beyond Cauchy-Schwarz: |<x_0, x_2>| <= |x_0| |x_2| = 1.41.
    let mut g = good.clone();
    g[2] = 5.0;
    g[6] = 5.0;
    let e = refused(g, &alpha);
    assert_eq!(e.row, Some(0), "{e}");
    assert!(e.to_string().contains("exceeds"), "{e}");
    // Not symmetric, not finite, the wrong size, a zero weight.
    let mut g = good.clone();
    g[1] = 0.5;
    assert!(refused(g, &alpha).to_string().contains("differ"));
    let mut g = good.clone();
    g[8] = f64::NAN;
    assert_eq!(refused(g, &alpha).row, Some(2));
    assert!(
        refused(good[..8].to_vec(), &alpha)
            .to_string()
            .contains("8 entries")
    );
    assert_eq!(refused(good.clone(), &[1.0, 0.0, 1.0]).row, Some(1));
    // Slack is per pair: one large norm does not loosen the check of the
    // others, and a floor lets near-zero points carry decryption noise.
    let mut g = gram_of(&[vec![1e3, 0.0], vec![1e-3, 0.0], vec![0.0, 1e-3]]);
    g[5] = 1e-4; // <x_1, x_2> = 1e-4 > |x_1| |x_2| = 1e-6
    g[7] = 1e-4;
    assert!(
        gm.compute_on_gram(&g, &alpha, GramSlack::new(1e-6, 0.0).unwrap())
            .is_err()
    );
    assert!(
        gm.compute_on_gram(&g, &alpha, GramSlack::new(1e-6, 1e-3).unwrap())
            .is_ok()
    );
    assert!(GramSlack::new(f64::NAN, 0.0).is_err() && GramSlack::new(0.0, -1.0).is_err());
}

#[test]
fn pre_aggregated_trust_follows_distances_to_the_original_updates() {
    // Clipping to the median norm makes the outlier look like the others to
    // the inner aggregator; its trust must still reflect what it sent.
    let mut agg =
        PreAggregated::new(GeometricMedianParams::new().check().unwrap()).with(NormClip::median());
    let ups = updates(&[
        vec![1.0, 0.1],
        vec![1.1, 0.0],
        vec![0.9, -0.1],
        vec![1.0, 0.0],
        vec![-300.0, 400.0],
    ]);
    let out = agg.aggregate(&ups).unwrap();
    let dist: Vec<f64> = out.clients.iter().map(|c| c.distance.unwrap()).collect();
    let trust: Vec<f64> = out.clients.iter().map(|c| c.trust.unwrap()).collect();
    assert_eq!(trust, trust_from_distances(&dist));
    assert!(dist[4] > 400.0, "{dist:?}");
    assert!(
        trust[4] < 0.01 && trust[..4].iter().all(|&t| t > 0.5),
        "{trust:?}"
    );
}
