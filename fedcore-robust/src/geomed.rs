//! Geometric median by smoothed Weiszfeld iterations (Pillutla, Kakade and
//! Harchaoui, "Robust Aggregation for Federated Learning", 2022).

use fedcore::aggregate::ensure_aggregatable;
use fedcore::{
    Aggregate, Aggregator, ClientDiagnostics, ClientId, ClientUpdate, Metrics, Parameters,
};

use crate::error::ParamsError;
use fedcore::aggregate::{output_buffer, weighted_sum_into};

use crate::kernels::{
    GRAM_SUB, dist_f64, gram, gram_with_sum, sampled_gram, weighted_mean_and_sq_dists,
};
use crate::{Weighting, alphas, trust_from_distances};

/// Settings of [`GeometricMedian`]; [`GeometricMedianParams::check`] turns
/// them into a ready aggregator.
///
/// Defaults (from [`GeometricMedianParams::new`]): [`Method::Auto`], example-count weights,
/// smoothing `nu = 1e-6`, relative tolerance on the objective `1e-6`, at most
/// 100 iterations.
#[derive(Debug, Clone, PartialEq)]
pub struct GeometricMedianParams {
    method: Method,
    weighting: Weighting,
    nu: f64,
    tolerance: f64,
    max_iterations: usize,
}

impl Default for GeometricMedianParams {
    fn default() -> Self {
        Self::new()
    }
}

impl GeometricMedianParams {
    /// The defaults listed above.
    pub fn new() -> Self {
        Self {
            method: Method::Auto,
            weighting: Weighting::ExampleCounts,
            nu: 1e-6,
            tolerance: 1e-6,
            max_iterations: 100,
        }
    }

    /// How the iterate is held ([`Method::Auto`] by default).
    pub fn method(mut self, method: Method) -> Self {
        self.method = method;
        self
    }

    /// How each point is weighted (`alpha_i`).
    pub fn weighting(mut self, weighting: Weighting) -> Self {
        self.weighting = weighting;
        self
    }

    /// Smoothing: distances below `nu` count as `nu`, so a point that
    /// coincides with the estimate causes no division by zero.
    pub fn nu(mut self, nu: f64) -> Self {
        self.nu = nu;
        self
    }

    /// Stop when the objective changes by less than this fraction **and** the
    /// optimality residual (see [`Weiszfeld::residual`]) is below its square
    /// root. The objective rule alone stops too early under large outliers:
    /// one update at distance 1e9 dominates the objective, so relative
    /// changes fall below 1e-6 while the estimate is still far from the
    /// honest points. The residual is scale-free and costs one pass over the
    /// estimate (not over the updates).
    pub fn tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Upper bound on iterations.
    pub fn max_iterations(mut self, max_iterations: usize) -> Self {
        self.max_iterations = max_iterations;
        self
    }

    /// Checks the settings.
    pub fn check(self) -> Result<GeometricMedian, ParamsError> {
        if !(self.nu.is_finite() && self.nu > 0.0) {
            return Err(ParamsError::new(
                "geometric median",
                "nu must be positive and finite",
            ));
        }
        if !(self.tolerance.is_finite() && self.tolerance > 0.0) {
            return Err(ParamsError::new(
                "geometric median",
                "tolerance must be positive and finite",
            ));
        }
        if self.max_iterations == 0 {
            return Err(ParamsError::new(
                "geometric median",
                "max_iterations must be at least 1",
            ));
        }
        Ok(GeometricMedian {
            params: self,
            scratch: Default::default(),
        })
    }
}

/// The result of [`GeometricMedian::compute`].
#[derive(Debug, Clone, PartialEq)]
pub struct Weiszfeld {
    /// The estimate.
    pub median: Vec<f32>,
    /// Iterations run: 0 when the starting point already had objective 0,
    /// or, with [`Method::Auto`] on long points, when the starting point
    /// (the median of a sample of the coordinates) already met both
    /// stopping rules and is the estimate.
    pub iterations: usize,
    /// The objective `sum_i alpha_i ||median - x_i||` at `median`, with `alpha` summing to 1.
    pub objective: f64,
    /// Distance of each point to `median`.
    pub distances: Vec<f64>,
    /// The last Weiszfeld weights `beta_i = alpha_i / max(nu, d_i)`, normalized to sum to 1:
    /// how much each point pulled on the estimate.
    pub weights: Vec<f64>,
    /// The optimality residual `||sum_i alpha_i (z - x_i) / max(nu, d_i)||`
    /// at the last iterate before `median` (at `median` itself when no
    /// iteration moved it): the net pull of the points, in `[0, 1]`, 0 at
    /// the exact median.
    pub residual: f64,
    /// Whether both stopping rules held before `max_iterations`.
    pub converged: bool,
}

/// The result of [`GeometricMedian::compute_on_gram`]: the estimate as
/// coefficients over the points, and what [`Weiszfeld`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct GramWeiszfeld {
    /// `median = sum_j coefficients[j] * x_j`; non-negative, summing to 1.
    pub coefficients: Vec<f64>,
    /// Iterations run.
    pub iterations: usize,
    /// The objective at the estimate (`alpha` normalized to sum to 1).
    pub objective: f64,
    /// Distance of each point to the estimate.
    pub distances: Vec<f64>,
    /// The last Weiszfeld weights, normalized (see [`Weiszfeld::weights`]).
    pub weights: Vec<f64>,
    /// The optimality residual (see [`Weiszfeld::residual`]).
    pub residual: f64,
    /// Whether both stopping rules held before `max_iterations`.
    pub converged: bool,
}

/// A Gram matrix that no set of points has: see
/// [`GeometricMedian::compute_on_gram`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("not a Gram matrix{}: {reason}", row.map(|r| format!(" (row {r})")).unwrap_or_default())]
pub struct GramError {
    /// The first row (point) found inconsistent, if one is to blame.
    pub row: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

/// How far a Gram matrix's entries may be from exact (decrypted entries
/// carry CKKS noise): entry `(i, j)` may be off by
/// `relative * sqrt(G_ii G_jj) + absolute`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GramSlack {
    /// Relative to the two points' norms.
    pub relative: f64,
    /// An absolute floor (the noise when the norms are near zero).
    pub absolute: f64,
}

impl GramSlack {
    /// `relative` and `absolute` slack, both finite and non-negative.
    pub fn new(relative: f64, absolute: f64) -> Result<Self, GramError> {
        if !(relative.is_finite() && relative >= 0.0 && absolute.is_finite() && absolute >= 0.0) {
            return Err(GramError {
                row: None,
                reason: format!(
                    "slack {relative} relative, {absolute} absolute: both must be finite and non-negative"
                ),
            });
        }
        Ok(Self { relative, absolute })
    }

    fn of(&self, gii: f64, gjj: f64) -> f64 {
        self.relative * (gii.max(0.0) * gjj.max(0.0)).sqrt() + self.absolute
    }
}

/// Checks that `g` (n x n, row-major) could be the Gram matrix of real
/// points, up to `slack`: finite, symmetric, non-negative diagonal, every
/// entry within Cauchy-Schwarz.
pub fn check_gram(g: &[f64], n: usize, slack: GramSlack) -> Result<(), GramError> {
    let err = |row: Option<usize>, reason: String| Err(GramError { row, reason });
    if n == 0 {
        return err(None, "no points".into());
    }
    if g.len() != n * n {
        return err(None, format!("{} entries for {n} points", g.len()));
    }
    for i in 0..n {
        let d = g[i * n + i];
        if !d.is_finite() || d < -slack.absolute {
            return err(
                Some(i),
                format!("squared norm {d} is negative or not finite"),
            );
        }
    }
    for i in 0..n {
        for j in 0..i {
            let (a, b) = (g[i * n + j], g[j * n + i]);
            if !a.is_finite() || !b.is_finite() {
                return err(Some(i), format!("entry ({i}, {j}) is not finite"));
            }
            if (a - b).abs() > slack.of(g[i * n + i], g[j * n + j]) {
                return err(
                    Some(i),
                    format!("entries ({i}, {j}) = {a} and ({j}, {i}) = {b} differ"),
                );
            }
        }
    }
    // Cauchy-Schwarz, |<x_i, x_j>| <= |x_i| |x_j|: a row whose squared norm
    // is not what its inner products say (an encrypted upload whose norm
    // wrapped around the modulus) breaks it with most other rows; blame the
    // row with the most breaks (ties: the smaller norm).
    let mut breaks = vec![0usize; n];
    let mut first = None;
    for i in 0..n {
        for j in 0..i {
            let a = g[i * n + j];
            let (gii, gjj) = (g[i * n + i], g[j * n + j]);
            let bound = (gii.max(0.0) * gjj.max(0.0)).sqrt();
            if a.abs() > bound + slack.of(gii, gjj) {
                breaks[i] += 1;
                breaks[j] += 1;
                first.get_or_insert((i, j, a, bound));
            }
        }
    }
    if let Some((i, j, a, bound)) = first {
        let row = (0..n)
            .max_by(|&x, &y| {
                breaks[x]
                    .cmp(&breaks[y])
                    .then(g[y * n + y].total_cmp(&g[x * n + x]))
            })
            .unwrap_or(i);
        return err(
            Some(row),
            format!(
                "breaks Cauchy-Schwarz with {} other rows (first: <x_{i}, x_{j}> = {a} exceeds |x_{i}| |x_{j}| = {bound})",
                breaks[row]
            ),
        );
    }
    Ok(())
}

/// The weighted geometric median: the point minimizing the weighted sum of
/// Euclidean distances to the updates. With fewer than half the weight on
/// arbitrary outliers it stays close to the rest.
///
/// ```
/// use fedcore::{Aggregator, ClientUpdate, Parameters};
/// use fedcore_robust::GeometricMedianParams;
///
/// let p = |v: [f32; 2]| Parameters::from_tensors([("w", vec![2], v.to_vec())]).unwrap();
/// let updates: Vec<ClientUpdate> = [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1e6, -1e6]]
///     .into_iter()
///     .enumerate()
///     .map(|(i, v)| ClientUpdate::new(format!("c{i}").into(), 1, 10, p(v)))
///     .collect();
/// let mut gm = GeometricMedianParams::new().check()?;
/// let agg = gm.aggregate(&updates)?;
/// // The outlier moves the estimate by less than 1, not by 250,000 as a mean would.
/// assert!(agg.parameters.as_slice().iter().all(|v| v.abs() < 1.0));
/// assert!(agg.clients[3].weight < 1e-5);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct GeometricMedian {
    params: GeometricMedianParams,
    /// The f64 iterate and its successor, kept across rounds: for DenseNet
    /// they are 56 MB each, and fresh allocations cost a page fault per 4 KiB.
    scratch: (Vec<f64>, Vec<f64>),
}

impl PartialEq for GeometricMedian {
    fn eq(&self, other: &Self) -> bool {
        self.params == other.params
    }
}

impl GeometricMedian {
    /// Runs smoothed Weiszfeld on `points` with weights `alpha` (any positive
    /// scale), starting from the weighted mean, or, on long points, from the
    /// median of a sample of the coordinates: with [`Method::Passes`], and
    /// with [`Method::Auto`] from 4 points (see [`Method`]). How each
    /// iteration is computed depends on the [`Method`]: on the Gram matrix
    /// (no pass over the data) or as one fused pass (new estimate and the
    /// distances to it). All points must have the same length.
    pub fn compute(&self, points: &[&[f32]], alpha: &[f64]) -> Weiszfeld {
        let mut median = vec![0.0f32; points.first().map_or(0, |x| x.len())];
        let w = self.compute_with(points, alpha, &mut Default::default(), &mut median);
        Weiszfeld { median, ..w }
    }

    /// [`compute`](Self::compute) with the estimate written into `out` (the
    /// points' length) and the result's `median` left empty.
    fn compute_with(
        &self,
        points: &[&[f32]],
        alpha: &[f64],
        scratch: &mut (Vec<f64>, Vec<f64>),
        out: &mut [f32],
    ) -> Weiszfeld {
        let n = points.len();
        let use_gram = match self.params.method {
            Method::Auto => n <= GRAM_MAX_POINTS,
            Method::Gram => true,
            Method::Passes => false,
        };
        if !use_gram {
            let start = self.sampled_start(points, alpha);
            let state = PassState { points, scratch };
            return self.iterate_points(points, alpha, start.as_deref(), state, out);
        }
        let guess = (self.params.method == Method::Auto && n >= GUESS_MIN_POINTS)
            .then(|| self.sampled_start(points, alpha))
            .flatten();
        let state = match &guess {
            // The sample's median is formed in the Gram matrix's read, and
            // kept where it already meets the stopping rules.
            Some(g) => GramState {
                start_formed: true,
                ..GramState::of(n, gram_with_sum(points, &as_f32(g), out))
            },
            None => GramState::of(n, gram(points)),
        };
        self.iterate_points(points, alpha, guess.as_deref(), state, out)
    }

    /// Where direct passes start on long points: the median of the points
    /// restricted to a sample of their coordinates (one run of 2,048 in
    /// every [`SAMPLE_EVERY`]), as weights over the points, found on that
    /// sample's Gram matrix (scaled to the whole length) with this
    /// aggregator's settings. It costs about a tenth of one pass (8-10 ms
    /// for 100 points of 7M values) and takes the place of the first
    /// iterations from the weighted mean: 30 outliers in 100 updates of 7M
    /// values pull the mean far off, and from there five passes were needed
    /// (four iterations), from the sample's median two (one iteration;
    /// docs/benchmarks.md). The iterations after it,
    /// and their stopping rules, are the same as from the mean, over all
    /// coordinates; where the sample misleads (coordinates outside it that
    /// differ), they only need more passes. `None` (start from the weighted
    /// mean) for short points, where the sample would be the whole, and for
    /// more than [`SAMPLE_MAX_POINTS`] points, where the sample's Gram
    /// matrix would cost more than a pass.
    fn sampled_start(&self, points: &[&[f32]], alpha: &[f64]) -> Option<Vec<f64>> {
        let n = points.len();
        let d = points.first().map_or(0, |x| x.len());
        if !(2..=SAMPLE_MAX_POINTS).contains(&n) || d < 4 * SAMPLE_EVERY * GRAM_SUB {
            return None;
        }
        let (mut g, taken) = sampled_gram(points, SAMPLE_EVERY);
        let scale = d as f64 / taken as f64;
        g.iter_mut().for_each(|v| *v *= scale);
        let (_, state) = self.iterate(alpha, None, GramState::of(n, g));
        state.w.iter().all(|v| v.is_finite()).then_some(state.w)
    }

    /// Runs smoothed Weiszfeld from the Gram matrix of the points alone
    /// (`gram[i * n + j] = <x_i, x_j>`, row-major, `n = alpha.len()`), without
    /// the points: the estimate comes back as coefficients over the points,
    /// `median = sum_j coefficients[j] * x_j`. Same iterations, weights,
    /// distances and stopping rules as [`GeometricMedian::compute`] with
    /// [`Method::Gram`] on the points themselves.
    ///
    /// This is how a server that holds the updates only encrypted aggregates
    /// them: the Gram matrix is computed under encryption and decrypted (n²
    /// numbers instead of n vectors), the coefficients become the weights of
    /// an encrypted weighted sum. A Gram matrix that no set of points could
    /// have (not symmetric, a negative or non-finite entry on the diagonal,
    /// an entry beyond Cauchy-Schwarz, each by more than `slack`) is
    /// an error naming the first offending row: a client that lied about its
    /// update, or a decryption that failed.
    pub fn compute_on_gram(
        &self,
        gram: &[f64],
        alpha: &[f64],
        slack: GramSlack,
    ) -> Result<GramWeiszfeld, GramError> {
        let n = alpha.len();
        check_gram(gram, n, slack)?;
        if let Some(i) = alpha.iter().position(|a| !(a.is_finite() && *a > 0.0)) {
            return Err(GramError {
                row: Some(i),
                reason: format!("weight alpha_{i} = {} is not positive", alpha[i]),
            });
        }
        let (result, state) = self.iterate(alpha, None, GramState::of(n, gram.to_vec()));
        Ok(GramWeiszfeld {
            coefficients: state.w,
            iterations: result.iterations,
            objective: result.objective,
            distances: result.distances,
            weights: result.weights,
            residual: result.residual,
            converged: result.converged,
        })
    }

    /// Runs smoothed Weiszfeld from the points' squared pairwise distances
    /// alone (`d[i * n + j] = ||x_i - x_j||^2`), as
    /// [`compute_on_gram`](Self::compute_on_gram) does from the Gram matrix:
    /// Weiszfeld's iterates are affine combinations of the points, so it is
    /// the same on the points shifted to their mean, whose Gram matrix is
    /// `-1/2 J D J` (`J = I - 11^T / n`). The coefficients apply to the
    /// original points. A matrix whose diagonal is not zero (within the
    /// absolute slack), or that is not symmetric, or whose centered form no
    /// points could have (not a Euclidean distance matrix) is an error naming
    /// the row.
    pub fn compute_on_distances(
        &self,
        d: &[f64],
        alpha: &[f64],
        slack: GramSlack,
    ) -> Result<GramWeiszfeld, GramError> {
        let n = alpha.len();
        if n == 0 || d.len() != n * n {
            return Err(GramError {
                row: None,
                reason: format!("{} entries for {n} points", d.len()),
            });
        }
        for i in 0..n {
            let v = d[i * n + i];
            if !v.is_finite() || v.abs() > slack.absolute {
                return Err(GramError {
                    row: Some(i),
                    reason: format!("distance {v} from point {i} to itself"),
                });
            }
            for j in 0..i {
                let (a, b) = (d[i * n + j], d[j * n + i]);
                if !a.is_finite() || !b.is_finite() || (a - b).abs() > slack.of(a, b) {
                    return Err(GramError {
                        row: Some(i),
                        reason: format!("distances ({i}, {j}) = {a} and ({j}, {i}) = {b}"),
                    });
                }
            }
        }
        let row_mean: Vec<f64> = (0..n)
            .map(|i| d[i * n..(i + 1) * n].iter().sum::<f64>() / n as f64)
            .collect();
        let mean = row_mean.iter().sum::<f64>() / n as f64;
        let centered: Vec<f64> = (0..n * n)
            .map(|k| {
                let (i, j) = (k / n, k % n);
                -0.5 * (d[k] - row_mean[i] - row_mean[j] + mean)
            })
            .collect();
        self.compute_on_gram(&centered, alpha, slack)
    }

    /// The Weiszfeld loop on points, writing the estimate into `out`.
    fn iterate_points<S: Iterate>(
        &self,
        points: &[&[f32]],
        alpha: &[f64],
        start: Option<&[f64]>,
        state: S,
        out: &mut [f32],
    ) -> Weiszfeld {
        let (w, state) = self.iterate(alpha, start, state);
        state.finish(points, out);
        w
    }

    /// The Weiszfeld loop, the same for every way of holding the iterate,
    /// from `sum_j start_j x_j` (by default the `alpha`-weighted mean); the
    /// result's `median` is left empty (the caller materializes it from the
    /// returned state). Where the state already holds the start formed
    /// ([`Iterate::keeps_start`]), a start that meets both stopping rules
    /// (as the first step shows) is the estimate, with 0 iterations and the
    /// residual at the start itself.
    fn iterate<S: Iterate>(
        &self,
        alpha: &[f64],
        start: Option<&[f64]>,
        mut state: S,
    ) -> (Weiszfeld, S) {
        let p = &self.params;
        let total: f64 = alpha.iter().sum();
        let alpha: Vec<f64> = alpha.iter().map(|a| a / total).collect();
        let dist = |sq: Vec<f64>| {
            sq.into_iter()
                .map(|v| v.max(0.0).sqrt())
                .collect::<Vec<f64>>()
        };
        let mut dists = dist(state.start(start.unwrap_or(&alpha)));
        let objective = |ds: &[f64]| ds.iter().zip(&alpha).map(|(d, a)| d * a).sum::<f64>();
        let mut obj = objective(&dists);
        let beta = |ds: &[f64]| -> Vec<f64> {
            ds.iter()
                .zip(&alpha)
                .map(|(d, a)| a / d.max(p.nu))
                .collect()
        };
        let mut iterations = 0;
        let mut residual = 0.0;
        let mut converged = obj <= f64::MIN_POSITIVE;
        let residual_tolerance = p.tolerance.sqrt();
        while !converged && iterations < p.max_iterations {
            let b = beta(&dists);
            let bsum: f64 = b.iter().sum();
            let (new_sq, step) = state.propose(&b);
            let new_dists = dist(new_sq);
            // The net pull of the points on z, sum_i alpha_i (z - x_i) / max(nu, d_i),
            // equals bsum * (z - next): its norm is 0 at the median and at most 1.
            residual = bsum * step;
            let new_obj = objective(&new_dists);
            iterations += 1;
            // Weiszfeld never increases the (smoothed) objective; if rounding
            // makes it do so, keep the better point and stop.
            if new_obj > obj {
                converged = residual <= residual_tolerance;
                break;
            }
            converged = obj - new_obj <= p.tolerance * new_obj && residual <= residual_tolerance;
            if converged && iterations == 1 && state.keeps_start() {
                iterations = 0;
                break;
            }
            state.accept();
            dists = new_dists;
            obj = new_obj;
        }
        let b = beta(&dists);
        let bsum: f64 = b.iter().sum();
        let w = Weiszfeld {
            median: Vec::new(),
            iterations,
            objective: obj,
            distances: dists,
            residual,
            weights: b.iter().map(|x| x / bsum).collect(),
            converged,
        };
        (w, state)
    }
}

impl Aggregator for GeometricMedian {
    fn name(&self) -> String {
        "geometric-median".into()
    }

    fn aggregate(&mut self, updates: &[ClientUpdate]) -> fedcore::Result<Aggregate> {
        self.aggregate_with(updates, None)
    }

    fn aggregate_into(
        &mut self,
        updates: &[ClientUpdate],
        buffer: Parameters,
    ) -> fedcore::Result<Aggregate> {
        self.aggregate_with(updates, Some(buffer))
    }
}

impl GeometricMedian {
    /// The aggregate, into `buffer` when it has the updates' layout (no
    /// fresh 28 MB output per round at 7M values), else into a new one.
    fn aggregate_with(
        &mut self,
        updates: &[ClientUpdate],
        buffer: Option<Parameters>,
    ) -> fedcore::Result<Aggregate> {
        let first = ensure_aggregatable(updates)?;
        let alpha = alphas(updates, self.params.weighting)?;
        let points: Vec<&[f32]> = updates.iter().map(|u| u.values.as_slice()).collect();
        let mut out = output_buffer(&first.values, buffer);
        let mut scratch = std::mem::take(&mut self.scratch);
        let w = self.compute_with(&points, &alpha, &mut scratch, out.as_mut_slice());
        self.scratch = scratch;
        let (clients, metrics) = report(
            updates.iter().map(|u| u.client.clone()),
            &w.weights,
            &w.distances,
            [w.iterations as f64, w.objective, w.residual],
            w.converged,
        );
        Ok(Aggregate {
            parameters: out,
            clients,
            metrics,
        })
    }
}

/// Per-client diagnostics (`weights`, the distances to the median and the
/// trust from them) and the metrics of a Weiszfeld run
/// (`[iterations, objective, residual]`, converged).
fn report(
    clients: impl Iterator<Item = ClientId>,
    weights: &[f64],
    distances: &[f64],
    [iterations, objective, residual]: [f64; 3],
    converged: bool,
) -> (Vec<ClientDiagnostics>, Metrics) {
    let trust = trust_from_distances(distances);
    let diagnostics = clients
        .zip(weights.iter().zip(distances).zip(trust))
        .map(
            |(client, ((&weight, &distance), trust))| ClientDiagnostics {
                client,
                weight,
                distance: Some(distance),
                trust: Some(trust),
            },
        )
        .collect();
    let metrics: Metrics = [
        ("iterations".to_owned(), iterations),
        ("objective".to_owned(), objective),
        ("residual".to_owned(), residual),
        ("converged".to_owned(), f64::from(u8::from(converged))),
    ]
    .into();
    (diagnostics, metrics)
}

impl GramWeiszfeld {
    /// What an aggregator reports of this run for `clients` (in the points'
    /// order): each client's coefficient as its weight, its distance to the
    /// median and the trust score from the distances (as
    /// [`GeometricMedian`]'s aggregate reports them), and the run's metrics
    /// (`iterations`, `objective`, `residual`, `converged`).
    pub fn report(
        &self,
        clients: impl IntoIterator<Item = ClientId>,
    ) -> (Vec<ClientDiagnostics>, Metrics) {
        report(
            clients.into_iter(),
            &self.coefficients,
            &self.distances,
            [self.iterations as f64, self.objective, self.residual],
            self.converged,
        )
    }
}

/// Up to this many points, [`Method::Auto`] iterates on the Gram matrix.
/// Forming it costs `n (n + 1) / 2` dot products over the data (in tiles,
/// one read of the data; compute-bound from about 10 points), after which
/// iterations are free; each direct iteration reads the data once from
/// memory and once from cache, and on long points they start from the
/// median of a sample of the coordinates, which saved three passes of five
/// in the benches. Measured at 7M values on a CPU with AVX-512
/// (docs/benchmarks.md, "The direct passes start from a sample's median"
/// and "The Gram matrix keeps the sample's median"), in one run: the Gram
/// matrix with the sample's median formed in its read (as [`Method::Auto`]
/// runs it) 35.9 ms at 24 points, 56.7 at 32, 76.7 at 40, 108.8 at 48 and
/// 168.4 at 64; the passes 42.5, 61.1, 75.7, 85.1 and 116.0 ms (FedAvg:
/// 13-33 ms); at 100 points the passes are 3.1-3.9x FedAvg. The passes'
/// count depends on the data (1 to 4 iterations after the start in the
/// benches); the Gram matrix's cost does not, hence the switch at 32
/// rather than 40.
pub const GRAM_MAX_POINTS: usize = 32;

/// From this many points, [`Method::Auto`] on long points forms the
/// sample's median with the Gram matrix and keeps it where it meets the
/// stopping rules. Below, the Gram matrix's read is bound by memory and
/// the weighted sum's writes add much to it: at 3 points of the bench with
/// example-count weights (the aggregator's default), where Weiszfeld does
/// not converge in 100 iterations and the estimate is formed again anyway,
/// 4.6 ms against 3.3 ms without (docs/benchmarks.md).
const GUESS_MIN_POINTS: usize = 4;

/// Direct passes over points of at least `4 * SAMPLE_EVERY * 2048` values
/// start from the median of one run of 2,048 coordinates in every
/// `SAMPLE_EVERY` (see `GeometricMedian::sampled_start`).
const SAMPLE_EVERY: usize = 64;

/// Up to this many points: the sample's Gram matrix costs `n^2 / 2`
/// products per sampled coordinate, about `n / 12 / SAMPLE_EVERY` of a
/// pass (a pass reads `n` values per coordinate at memory bandwidth), so a
/// third of a pass at 256 points.
const SAMPLE_MAX_POINTS: usize = 256;

/// How the Weiszfeld iterate is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// [`Method::Gram`] up to [`GRAM_MAX_POINTS`] points, [`Method::Passes`]
    /// beyond. From 4 points up to [`GRAM_MAX_POINTS`], on long points (at
    /// least 524,288 values), the Gram matrix's iterations start from the
    /// median of a sample of the coordinates, whose weighted sum is formed
    /// in the same read as the Gram matrix. Where that start already meets
    /// both stopping rules on all coordinates it is the estimate (0
    /// iterations), and the data is read once instead of twice; else the
    /// iterations go on from it and the estimate is formed at the end, as
    /// with [`Method::Gram`].
    #[default]
    Auto,
    /// As weights over the points: one pass builds `G = X X^T`, then each
    /// iteration costs O(n^2), with `||x_i - z||^2 = G_ii - 2 (G w)_i + w^T G w`
    /// for `z = sum_j w_j x_j`; the estimate is formed once at the end.
    Gram,
    /// As an explicit f64 vector: each iteration is one fused pass over the
    /// data. On long points (at least 524,288 values) and up to 256 of them,
    /// the first iterate is the median of a sample of the coordinates,
    /// found on the sample's Gram matrix.
    Passes,
}

/// One way of holding the iterate: start from weights, propose the next
/// iterate for Weiszfeld weights, accept it, materialize the result.
trait Iterate {
    /// Squared distances from the points to `sum_j w_j x_j` (`w` sums to 1), which becomes the iterate.
    fn start(&mut self, w: &[f64]) -> Vec<f64>;
    /// The next iterate for weights `b` (any positive scale): squared distances to it
    /// and its distance to the current iterate.
    fn propose(&mut self, b: &[f64]) -> (Vec<f64>, f64);
    /// Makes the proposal the iterate.
    fn accept(&mut self);
    /// Writes the iterate as f32 values into `out` (the points' length).
    fn finish(self, points: &[&[f32]], out: &mut [f32]);
    /// Whether `out` already holds the start, so that keeping it saves
    /// forming the estimate.
    fn keeps_start(&self) -> bool {
        false
    }
}

struct PassState<'a, 'p> {
    points: &'p [&'p [f32]],
    scratch: &'a mut (Vec<f64>, Vec<f64>),
}

impl Iterate for PassState<'_, '_> {
    fn start(&mut self, w: &[f64]) -> Vec<f64> {
        let d = self.points.first().map_or(0, |x| x.len());
        // Every element is overwritten by the pass; resizing keeps the pages.
        self.scratch.0.resize(d, 0.0);
        self.scratch.1.resize(d, 0.0);
        weighted_mean_and_sq_dists(self.points, w, &mut self.scratch.0)
    }

    fn propose(&mut self, b: &[f64]) -> (Vec<f64>, f64) {
        let (z, next) = &mut *self.scratch;
        let sq = weighted_mean_and_sq_dists(self.points, b, next);
        (sq, dist_f64(z, next))
    }

    fn accept(&mut self) {
        let (z, next) = &mut *self.scratch;
        std::mem::swap(z, next);
    }

    fn finish(self, _: &[&[f32]], out: &mut [f32]) {
        for (o, &z) in out.iter_mut().zip(&self.scratch.0) {
            *o = z as f32;
        }
    }
}

struct GramState {
    n: usize,
    g: Vec<f64>,
    w: Vec<f64>,
    next: Vec<f64>,
    /// Whether a proposal was accepted: the iterate left its start.
    moved: bool,
    /// Whether `out` already holds the start's weighted sum (formed in
    /// the Gram matrix's read).
    start_formed: bool,
}

impl GramState {
    /// Iterations on the Gram matrix `g` of `n` points.
    fn of(n: usize, g: Vec<f64>) -> Self {
        Self {
            n,
            g,
            w: Vec::new(),
            next: Vec::new(),
            moved: false,
            start_formed: false,
        }
    }

    /// `G v`.
    fn times(&self, v: &[f64]) -> Vec<f64> {
        (0..self.n)
            .map(|i| (0..self.n).map(|j| self.g[i * self.n + j] * v[j]).sum())
            .collect()
    }

    /// Squared distances from every point to `sum_j w_j x_j`.
    fn sq_dists(&self, w: &[f64]) -> Vec<f64> {
        let gw = self.times(w);
        let wgw: f64 = w.iter().zip(&gw).map(|(a, b)| a * b).sum();
        (0..self.n)
            .map(|i| (self.g[i * self.n + i] - 2.0 * gw[i] + wgw).max(0.0))
            .collect()
    }
}

impl Iterate for GramState {
    fn start(&mut self, w: &[f64]) -> Vec<f64> {
        let total: f64 = w.iter().sum();
        self.w = w.iter().map(|v| v / total).collect();
        self.sq_dists(&self.w)
    }

    fn propose(&mut self, b: &[f64]) -> (Vec<f64>, f64) {
        let total: f64 = b.iter().sum();
        self.next = b.iter().map(|v| v / total).collect();
        let diff: Vec<f64> = self.w.iter().zip(&self.next).map(|(a, b)| a - b).collect();
        let gd = self.times(&diff);
        let step = diff
            .iter()
            .zip(&gd)
            .map(|(a, b)| a * b)
            .sum::<f64>()
            .max(0.0)
            .sqrt();
        (self.sq_dists(&self.next), step)
    }

    fn accept(&mut self) {
        std::mem::swap(&mut self.w, &mut self.next);
        self.moved = true;
    }

    fn finish(self, points: &[&[f32]], out: &mut [f32]) {
        if self.start_formed && !self.moved {
            return;
        }
        weighted_sum_into(points, &as_f32(&self.w), out).expect("points share one length");
    }

    fn keeps_start(&self) -> bool {
        self.start_formed
    }
}

/// Weights over the points as FedAvg's kernel takes them.
fn as_f32(w: &[f64]) -> Vec<f32> {
    w.iter().map(|&v| v as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest length that gets a sampled start, and a little more.
    const LONG: usize = 4 * SAMPLE_EVERY * GRAM_SUB + 1000;

    /// `n` points of `d` values in [-1, 1); the first `outliers` are scaled
    /// by -100 on the coordinates where `scaled` holds.
    fn points(
        n: usize,
        d: usize,
        outliers: usize,
        scaled: impl Fn(usize) -> bool,
    ) -> Vec<Vec<f32>> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|i| {
                (0..d)
                    .map(|k| {
                        state = state
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        let v = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                        if i < outliers && scaled(k) {
                            -100.0 * v
                        } else {
                            v
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn passes(
        gm: &GeometricMedian,
        refs: &[&[f32]],
        alpha: &[f64],
        start: Option<&[f64]>,
    ) -> Weiszfeld {
        let mut scratch = Default::default();
        let state = PassState {
            points: refs,
            scratch: &mut scratch,
        };
        gm.iterate(alpha, start, state).0
    }

    #[test]
    fn passes_over_long_points_start_from_the_samples_median_and_need_fewer_iterations() {
        let pts = points(7, LONG, 2, |_| true);
        let refs: Vec<&[f32]> = pts.iter().map(Vec::as_slice).collect();
        let alpha = [1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 1.0];
        let gm = GeometricMedianParams::new()
            .method(Method::Passes)
            .check()
            .unwrap();
        let start = gm.sampled_start(&refs, &alpha).expect("a sampled start");
        // Not the weighted mean: the outliers hardly count in it.
        assert!(start[0] < 0.01 && start[1] < 0.01, "{start:?}");
        assert!((start.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let (from_mean, from_sample) = (
            passes(&gm, &refs, &alpha, None),
            passes(&gm, &refs, &alpha, Some(&start)),
        );
        assert!(from_mean.converged && from_sample.converged);
        assert!(
            from_sample.iterations < from_mean.iterations,
            "{} iterations from the sample's median, {} from the mean",
            from_sample.iterations,
            from_mean.iterations
        );
        let rel = (from_sample.objective - from_mean.objective).abs() / from_mean.objective;
        assert!(
            rel < 1e-6,
            "objectives {} and {}",
            from_sample.objective,
            from_mean.objective
        );
        // `compute` takes that start; short points or too many start from the mean.
        assert_eq!(gm.compute(&refs, &alpha).iterations, from_sample.iterations);
        let short: Vec<&[f32]> = refs.iter().map(|x| &x[..LONG - 2000]).collect();
        assert!(gm.sampled_start(&short, &alpha).is_none());
        assert!(gm.sampled_start(&refs[..1], &alpha[..1]).is_none());
    }

    #[test]
    fn on_long_points_the_gram_matrix_keeps_the_samples_median_when_it_meets_the_rules() {
        let pts = points(7, LONG, 2, |_| true);
        let refs: Vec<&[f32]> = pts.iter().map(Vec::as_slice).collect();
        let alpha = [1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 1.0];
        let with = |m, tolerance| {
            GeometricMedianParams::new()
                .method(m)
                .tolerance(tolerance)
                .check()
                .unwrap()
        };
        // A tolerance the sample's median meets on all coordinates.
        let loose = 1e-4;
        let auto = with(Method::Auto, loose).compute(&refs, &alpha);
        let guess = with(Method::Auto, loose)
            .sampled_start(&refs, &alpha)
            .unwrap();
        assert_eq!((auto.iterations, auto.converged), (0, true));
        // The estimate is the sample's median, formed in the Gram matrix's read.
        let w: Vec<f32> = guess.iter().map(|&v| v as f32).collect();
        let mut want = vec![0.0f32; LONG];
        weighted_sum_into(&refs, &w, &mut want).unwrap();
        assert!(
            auto.median
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        );
        // What it reports is about that estimate: distances, objective.
        for (x, d) in refs.iter().zip(&auto.distances) {
            let exact = x
                .iter()
                .zip(&auto.median)
                .map(|(&a, &m)| (f64::from(a) - f64::from(m)).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!((d - exact).abs() <= 1e-5 * exact, "{d} vs {exact}");
        }
        let gram = with(Method::Gram, loose).compute(&refs, &alpha);
        assert!(gram.iterations > 0 && gram.converged);
        let rel = (auto.objective - gram.objective).abs() / gram.objective;
        assert!(
            rel <= loose,
            "objectives {} and {}",
            auto.objective,
            gram.objective
        );
        // Where it does not meet them, the iterations go on from it and
        // the estimate is formed again: the median Method::Gram finds.
        let tight = 1e-12;
        let (auto, gram) = (
            with(Method::Auto, tight).compute(&refs, &alpha),
            with(Method::Gram, tight).compute(&refs, &alpha),
        );
        assert!(auto.iterations > 0 && auto.converged && gram.converged);
        let off = largest_difference(&auto.median, &gram.median);
        assert!(off <= 1e-4, "auto and gram differ by {off}");
        assert!((auto.objective - gram.objective).abs() <= 1e-9 * gram.objective);
    }

    #[test]
    fn a_sample_that_misleads_costs_iterations_not_accuracy() {
        // The outliers are honest on every sampled coordinate and far off
        // everywhere else: the sample's median counts them fully.
        let pts = points(7, LONG, 3, |k| k % (SAMPLE_EVERY * GRAM_SUB) >= GRAM_SUB);
        let refs: Vec<&[f32]> = pts.iter().map(Vec::as_slice).collect();
        let alpha = [1.0; 7];
        let with = |m, tolerance| {
            GeometricMedianParams::new()
                .method(m)
                .tolerance(tolerance)
                .max_iterations(10_000)
                .check()
                .unwrap()
        };
        let start = with(Method::Passes, 1e-6)
            .sampled_start(&refs, &alpha)
            .expect("a sampled start");
        assert!(start[..3].iter().all(|&c| c > 0.1), "{start:?}");
        // At the default tolerance the Gram matrix does not keep that
        // start: its iterations go on from it, to the median.
        let (auto, gram) = (
            with(Method::Auto, 1e-6).compute(&refs, &alpha),
            with(Method::Gram, 1e-6).compute(&refs, &alpha),
        );
        assert!(auto.iterations > 0 && auto.converged, "{}", auto.iterations);
        assert!((auto.objective - gram.objective).abs() <= 1e-6 * gram.objective);
        assert!(
            auto.weights[..3].iter().all(|&w| w < 0.01),
            "{:?}",
            auto.weights
        );
        // To a tight tolerance, all three ways reach the same median.
        let [a, b, c] = [Method::Gram, Method::Passes, Method::Auto]
            .map(|m| with(m, 1e-12).compute(&refs, &alpha));
        for other in [&b, &c] {
            assert!(a.converged && other.converged);
            let off = largest_difference(&a.median, &other.median);
            assert!(off <= 1e-4, "gram and another way differ by {off}");
            assert!((a.objective - other.objective).abs() <= 1e-7 * a.objective);
            assert!(
                other.weights[..3].iter().all(|&w| w < 0.01),
                "{:?}",
                other.weights
            );
        }
    }

    fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    }
}
