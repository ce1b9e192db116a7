//! The geometric median of encrypted updates as a `fedcore` round strategy:
//! [`EncryptedMedian`] on the server, [`DistanceDecryptor`] at each hospital.
//!
//! A round, with every tensor sealed (`Server::with_sealing(&["*"],
//! median.sealed_sum())`, one value per CKKS slot):
//! 1. *Fit* (step 0): each hospital uploads its whole delta encrypted.
//! 2. The server computes the encrypted squared distances between every
//!    pair of uploads ([`CkksContext::squared_distances`]) and sends them,
//!    one ciphertext per pair, to every hospital still in the round
//!    (step 1).
//! 3. Each hospital decrypts them, floods the decryption noise, and answers
//!    the `n (n - 1) / 2` numbers ([`DistanceDecryptor`]).
//! 4. The server takes the median of the answers per entry (a minority of
//!    lying hospitals cannot move it), adds the squared distances of the
//!    tensors that travel in the clear (none when everything is sealed),
//!    and runs smoothed Weiszfeld on the distances alone
//!    ([`GeometricMedian::compute_on_distances`]). A row that breaks
//!    Cauchy-Schwarz on the centered Gram matrix the distances determine (a
//!    wrapped or forged upload) takes that hospital out of the round, and
//!    the rest is iterated again.
//! 5. It reports the median's coefficients as the clients' weights, so the
//!    orchestrator's sealed sum `global += lr * sum_i w_i Enc(x_i)` forms
//!    the median under encryption; the plain tensors, if any, get the same
//!    coefficients. Trust scores come from the distances to the median.
//!
//! Under multiparty keys ([`EncryptedMedian::multiparty`]) step 2 computes
//! the distances with the collective relinearization key and steps 3 and 4
//! are a collective decryption: each hospital answers its smudged share of
//! one coefficient per pair ([`crate::multiparty::Distances`], answered by
//! [`KeySwitcher`](crate::keyswitch::KeySwitcher)), every party's under
//! N-of-N, the signing set's under a roster; the hospitals learn nothing of
//! the distances, and a lying share is not outvoted (docs/he.md). The
//! median's sum is then switched to the hospitals' output key
//! ([`crate::keyswitch::key_switch_round`]).
//!
//! An honest-but-curious server learns the pairwise distances of the
//! updates and nothing else about them (under one key, every hospital
//! learns the same distances); it never holds a secret key (its context is
//! [`CkksContext<Public>`]) and never decrypts a vector. A malicious server
//! is outside this threat model: a hospital cannot tell what the
//! ciphertexts it is asked to decrypt hold. With two hospitals the median
//! of the answers is their mean, so a lying decryptor needs at least three
//! hospitals to be outvoted. See docs/he.md.

use std::collections::BTreeMap;
use std::sync::Arc;

use fedcore::aggregate::{Weighting, weighted_sum_into};
use fedcore::{
    Aggregate, ClientId, ClientUpdate, Layout, Parameters, RoundSteps, StepIns, StepReply,
    StepResponder, Strategy, StrategyInfo, TensorSpec,
};
use fedcore_robust::{GeometricMedian, GeometricMedianParams, GramSlack};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use crate::context::{CkksContext, Public, Secret};
use crate::error::HeError;
use crate::gram::{MAX_GRAM_POINTS, Pairs};
use crate::keyswitch::{
    MAX_SWITCHES_PER_ROUND, ask_shares, check_client_map, sealed_request, signing_set,
};
use crate::multiparty::{CollectiveKey, DistanceShare, distance_step_bytes};
use crate::sealer::CkksSum;
use crate::vector::{EncryptedVector, Form, SlotPacking};

/// The name of the one tensor a distance step carries (sealed, from the
/// server) and its answer carries (decrypted, from a hospital).
pub const DISTANCES_TENSOR: &str = "squared_distances";

/// The step metric that tells a hospital how many points the distances are
/// between.
pub const POINTS_METRIC: &str = "points";

/// The default relative slack of the distance check
/// ([`EncryptedMedian::with_slack`]): decrypted distances carry the
/// hospitals' flooding noise ([`DEFAULT_FLOODING`], about `2.4e-7` of
/// each entry) and f32 rounding.
pub const DEFAULT_DISTANCE_SLACK: f64 = 1e-5;

/// The server's side: the geometric median of encrypted updates, computed
/// from their decrypted pairwise distances (see the [module](self)).
///
/// Needs a public context with evaluation keys
/// ([`CkksContext::with_evaluation_keys`]); its type has no decryption
/// method, so the strategy cannot open an update:
///
/// ```compile_fail
/// # fn f(m: &fedcore_he::EncryptedMedian, v: &fedcore_he::EncryptedVector) {
/// // There is no secret key on the server's side to decrypt with.
/// m.context().decrypt(v);
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct EncryptedMedian {
    ctx: CkksContext<Public>,
    median: GeometricMedian,
    weighting: Weighting,
    slack: f64,
    /// Under multiparty keys: who decrypts the distances together.
    collective: Option<Collective>,
}

/// The collective decryption of the distances under multiparty keys.
#[derive(Debug, Clone)]
struct Collective {
    key: CollectiveKey,
    parties: BTreeMap<ClientId, u32>,
    bound: f64,
}

impl EncryptedMedian {
    /// The strategy over `ctx` (which must hold the evaluation keys) with
    /// the default geometric-median settings, weighted by example counts.
    pub fn new(ctx: CkksContext<Public>) -> crate::Result<Self> {
        if !ctx.has_evaluation_keys() {
            return Err(HeError::Mismatch(
                "the encrypted geometric median needs the evaluation keys (CkksContext::with_evaluation_keys)".into(),
            ));
        }
        let median = GeometricMedianParams::new()
            .check()
            .map_err(|e| HeError::InvalidParameters(e.to_string()))?;
        Ok(Self {
            ctx,
            median,
            weighting: Weighting::ExampleCounts,
            slack: DEFAULT_DISTANCE_SLACK,
            collective: None,
        })
    }

    /// The strategy under multiparty keys: the distances are computed under
    /// `collective` (which must hold its collective relinearization key,
    /// [`CollectiveKey::with_relinearization`]) and decrypted together by
    /// the hospitals, one coefficient per pair
    /// ([`crate::multiparty::Distances`]): every party for N-of-N, the
    /// hospitals still in the round (at least the threshold) under a
    /// roster. `parties` maps each hospital's client id to its party
    /// number and must cover exactly the collective key's parties; `bound`
    /// is the largest squared distance the parameters must hold (the
    /// hospitals smudge for their own,
    /// [`PartyKey::with_distance_bound`](crate::multiparty::PartyKey::with_distance_bound)).
    ///
    /// Pair it with the key switch of the weighted sum:
    /// `key_switch_round(median, collective, output, parties, lr)`, its
    /// sealed sum with one value per slot
    /// (`sum.with_slot_packing(SlotPacking::Real)`); hospitals answer both
    /// steps with one [`KeySwitcher`](crate::keyswitch::KeySwitcher).
    pub fn multiparty(
        collective: CollectiveKey,
        parties: BTreeMap<ClientId, u32>,
        bound: f64,
    ) -> crate::Result<Self> {
        check_client_map(&collective, &parties)?;
        if !collective.context().has_evaluation_keys() {
            return Err(HeError::Mismatch(
                "the encrypted geometric median under multiparty keys needs the collective relinearization key (CollectiveKey::with_relinearization)".into(),
            ));
        }
        collective.check_distance_bound(bound)?;
        let mut median = Self::new(collective.context().clone())?;
        median.collective = Some(Collective {
            key: collective,
            parties,
            bound,
        });
        Ok(median)
    }

    /// The relative slack of the check that the decrypted distances are
    /// distances of some points (Cauchy-Schwarz on the centered Gram
    /// matrix, each entry allowed `slack` times the largest distance);
    /// several times the hospitals' flooding
    /// ([`DistanceDecryptor::with_flooding`]). Default
    /// [`DEFAULT_DISTANCE_SLACK`].
    pub fn with_slack(mut self, relative: f64) -> crate::Result<Self> {
        if !(relative.is_finite() && relative > 0.0 && relative < 1.0) {
            return Err(HeError::OutOfRange(format!(
                "slack {relative} is not in (0, 1)"
            )));
        }
        self.slack = relative;
        Ok(self)
    }

    /// Other smoothing, tolerance or iteration settings.
    pub fn with_median(mut self, median: GeometricMedian) -> Self {
        self.median = median;
        self
    }

    /// How the points are weighted (`alpha_i`).
    pub fn with_weighting(mut self, weighting: Weighting) -> Self {
        self.weighting = weighting;
        self
    }

    /// The server's context (public key and evaluation keys only).
    pub fn context(&self) -> &CkksContext<Public> {
        &self.ctx
    }

    /// The sealed sum this strategy needs beside it
    /// (`Server::with_sealing(&["*"], median.sealed_sum())`): a [`CkksSum`]
    /// over the same keys that seals one value per slot, so that the
    /// uploads' inner products can be formed ([`CkksSum::new`] packs two).
    pub fn sealed_sum(&self) -> CkksSum {
        CkksSum::new(self.ctx.clone()).with_slot_packing(SlotPacking::Real)
    }

    /// The squared distances between the sealed parts of `clients`' updates,
    /// decrypted by the hospitals still in the round (median of their
    /// answers per entry), `n x n` over the clients still in after the step.
    fn sealed_distances(
        &self,
        updates: &[&ClientUpdate],
        steps: &mut RoundSteps<'_>,
    ) -> fedcore::Result<Vec<f64>> {
        let mut parts: Vec<EncryptedVector> = Vec::with_capacity(updates.len());
        let mut asked: Vec<ClientId> = Vec::with_capacity(updates.len());
        for u in updates {
            let loaded = u
                .sealed
                .as_ref()
                .ok_or_else(|| HeError::Mismatch("no sealed part".into()))
                .and_then(|s| {
                    let v = self.ctx.load(s.bytes(), Form::Fresh)?;
                    if v.len() != s.len() {
                        return Err(HeError::Mismatch(format!(
                            "{} values for a layout of {}",
                            v.len(),
                            s.len()
                        )));
                    }
                    Ok(v)
                });
            match loaded {
                Ok(v) => {
                    parts.push(v);
                    asked.push(u.client.clone());
                }
                Err(e) => steps.reject(&u.client, format!("sealed part: {e}"))?,
            }
        }
        let n = parts.len();
        if n < 2 {
            return Ok(vec![0.0; n * n]);
        }
        let decrypted = match &self.collective {
            None => self.each_decrypts(parts, steps)?,
            Some(c) => c.decrypt(parts, steps)?,
        };
        // Restrict the matrix to the hospitals still in the round.
        let kept: Vec<usize> = (0..n)
            .filter(|&i| steps.clients().contains(&asked[i]))
            .collect();
        let index = |i: usize, j: usize| {
            let (i, j) = (i.min(j), i.max(j));
            i * n - i * (i + 1) / 2 + (j - i - 1)
        };
        let m = kept.len();
        let mut d = vec![0.0; m * m];
        for (a, &i) in kept.iter().enumerate() {
            for (b, &j) in kept.iter().enumerate() {
                if i != j {
                    d[a * m + b] = decrypted[index(i, j)];
                }
            }
        }
        Ok(d)
    }
}

impl EncryptedMedian {
    /// Under one key: every hospital decrypts the distances and floods them;
    /// the median of the answers per pair.
    fn each_decrypts(
        &self,
        parts: Vec<EncryptedVector>,
        steps: &mut RoundSteps<'_>,
    ) -> fedcore::Result<Vec<f64>> {
        let n = parts.len();
        let refs: Vec<&EncryptedVector> = parts.iter().collect();
        let bytes = self.ctx.squared_distances(&refs)?.to_bytes()?;
        drop(refs);
        drop(parts);
        let pairs = n * (n - 1) / 2;
        let layout = distances_layout(pairs)?;
        let request = sealed_request(layout.clone(), bytes)?
            .with_metrics([(POINTS_METRIC.to_owned(), n as f64)].into())
            .with_max_reply_bytes(pairs as u64 * 4 + (1 << 16));
        let answers = steps.ask(|_| request.clone())?;
        let mut columns: Vec<Vec<f64>> = vec![Vec::with_capacity(answers.len()); pairs];
        for (client, reply) in &answers {
            if reply.values.layout().as_ref() != layout.as_ref() {
                steps.reject(
                    client,
                    format!("the distance answer is not one tensor `{DISTANCES_TENSOR}` of {pairs} values"),
                )?;
                continue;
            }
            for (c, v) in columns.iter_mut().zip(reply.values.as_slice()) {
                c.push(f64::from(*v));
            }
        }
        if columns.first().is_some_and(Vec::is_empty) {
            return Err(fedcore::Error::InvalidInput(
                "no hospital answered the distance step".into(),
            ));
        }
        Ok(columns.iter_mut().map(|c| median_of(c)).collect())
    }
}

fn distances_layout(pairs: usize) -> fedcore::Result<Arc<Layout>> {
    Ok(Arc::new(Layout::new([TensorSpec::new(
        DISTANCES_TENSOR,
        [pairs],
    )])?))
}

impl Collective {
    /// Under multiparty keys: the distances under the collective key, each
    /// hospital's share of their decryption, combined. N-of-N needs every
    /// party's share; a threshold asks the hospitals still in the round and,
    /// when one leaves at the step, asks the rest again (a new signing set),
    /// up to [`MAX_SWITCHES_PER_ROUND`] times.
    fn decrypt(
        &self,
        parts: Vec<EncryptedVector>,
        steps: &mut RoundSteps<'_>,
    ) -> fedcore::Result<Vec<f64>> {
        let n = parts.len();
        let refs: Vec<&EncryptedVector> = parts.iter().collect();
        let distances = self.key.distances(&refs, self.bound)?;
        drop(refs);
        drop(parts);
        let request = distances.request().to_bytes();
        let layout = distances_layout(n * (n - 1) / 2)?;
        let threshold = self.key.roster().map(|r| r.threshold());
        let strangers: Vec<ClientId> = steps
            .clients()
            .iter()
            .filter(|c| !self.parties.contains_key(*c))
            .cloned()
            .collect();
        for c in &strangers {
            steps.reject(c, "not a party of the collective key".to_owned())?;
        }
        for _ in 0..MAX_SWITCHES_PER_ROUND {
            let parties: Vec<u32> = steps
                .clients()
                .iter()
                .filter_map(|c| self.parties.get(c).copied())
                .collect();
            let named = signing_set(&self.key, parties, "distances' decryption")?;
            let step = sealed_request(layout.clone(), distance_step_bytes(&named, &request))?
                .with_metrics([(POINTS_METRIC.to_owned(), n as f64)].into())
                .with_max_reply_bytes(distances.request().share_len() as u64 + (1 << 16));
            // A share that cannot be combined takes its hospital out, not
            // the round.
            let shares = ask_shares(
                steps,
                &step,
                &self.parties,
                threshold,
                ("distances' decryption", "distance share"),
                |bytes| {
                    let s = DistanceShare::from_bytes(&self.key, bytes)?;
                    distances.check_share(&self.key, &s, &named)?;
                    Ok((s.party(), s))
                },
            )?;
            if let Some(shares) = shares {
                return Ok(distances.combine(&self.key, &shares)?);
            }
        }
        Err(HeError::Mismatch(format!(
            "hospitals left at each of {MAX_SWITCHES_PER_ROUND} distance decryptions"
        ))
        .into())
    }
}

/// The median of `values` (the mean of the two middle ones for an even
/// count); `values` must not be empty.
fn median_of(values: &mut [f64]) -> f64 {
    values.sort_unstable_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        0.5 * (values[n / 2 - 1] + values[n / 2])
    }
}

/// `||a - b||^2` in f64.
fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.par_iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum()
}

impl Strategy for EncryptedMedian {
    fn describe(&self) -> StrategyInfo {
        StrategyInfo::new(format!(
            "encrypted-geometric-median(n={})",
            self.ctx.params().degree()
        ))
    }

    fn aggregate_round(
        &mut self,
        updates: &[ClientUpdate],
        steps: &mut RoundSteps<'_>,
    ) -> fedcore::Result<Aggregate> {
        let first = fedcore::aggregate::ensure_aggregatable(updates)?;
        let sealed = updates.iter().any(|u| u.sealed.is_some());
        let in_round: Vec<&ClientUpdate> = updates
            .iter()
            .filter(|u| steps.clients().contains(&u.client))
            .collect();
        let mut d = if sealed {
            self.sealed_distances(&in_round, steps)?
        } else {
            vec![0.0; in_round.len() * in_round.len()]
        };
        let mut kept: Vec<&ClientUpdate> = in_round
            .into_iter()
            .filter(|u| steps.clients().contains(&u.client))
            .collect();
        // The tensors that travel in the clear add their own distances.
        let m = kept.len();
        for i in 0..m {
            for j in 0..i {
                let p = squared_distance(kept[i].values.as_slice(), kept[j].values.as_slice());
                d[i * m + j] += p;
                d[j * m + i] += p;
            }
        }
        // Weiszfeld on `d` (over `alpha`), its slack scaled by `d`'s largest entry.
        let attempt = |d: &[f64], alpha: &[f64]| {
            let top = d.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            let slack = GramSlack::new(self.slack, self.slack * top + f64::MIN_POSITIVE)?;
            self.median.compute_on_distances(d, alpha, slack)
        };
        let w = loop {
            let m = kept.len();
            if m == 0 {
                return Err(fedcore::Error::EmptyUpdates);
            }
            let alpha: Vec<f64> = match self.weighting {
                Weighting::Uniform => vec![1.0; m],
                Weighting::ExampleCounts => kept.iter().map(|u| u.num_examples as f64).collect(),
            };
            let e = match attempt(&d, &alpha) {
                Ok(w) => break w,
                Err(e) => e,
            };
            // The distances are not those of any points: take out the
            // hospital without which they are (the most outlying one if
            // several would do; a wrapped upload spoils the centering of
            // every row, so the row the check names need not be its own),
            // else the row the check names, and try again.
            let without = |i: usize| {
                let mut a = alpha.clone();
                a.remove(i);
                attempt(&remove_row(&d, m, i), &a).is_ok()
            };
            let spread = |i: usize| d[i * m..(i + 1) * m].iter().sum::<f64>();
            let row = (0..m)
                .filter(|&i| without(i))
                .max_by(|&a, &b| spread(a).total_cmp(&spread(b)))
                .or(e.row.filter(|&r| r < m))
                .ok_or_else(|| {
                    fedcore::Error::InvalidInput(format!("the decrypted distances: {}", e.reason))
                })?;
            steps.reject(
                &kept[row].client,
                format!("its distances to the others are inconsistent: {}", e.reason),
            )?;
            kept.remove(row);
            d = remove_row(&d, m, row);
        };
        let coefficients: Vec<f32> = w.coefficients.iter().map(|&c| c as f32).collect();
        let mut body = first.values.zeros_like();
        let inputs: Vec<&[f32]> = kept.iter().map(|u| u.values.as_slice()).collect();
        weighted_sum_into(&inputs, &coefficients, body.as_mut_slice())?;
        let (clients, metrics) = w.report(kept.iter().map(|u| u.client.clone()));
        Ok(Aggregate {
            parameters: body,
            clients,
            metrics,
        })
    }
}

/// `d` (`m x m`) without row and column `row`.
fn remove_row(d: &[f64], m: usize, row: usize) -> Vec<f64> {
    (0..m * m)
        .filter(|k| k / m != row && k % m != row)
        .map(|k| d[k])
        .collect()
}

/// The relative standard deviation of the Gaussian noise a
/// [`DistanceDecryptor`] adds to each decrypted distance by default:
/// `2^-22`, 4 times the resolution of the f32 it is sent as and, measured
/// at 7M values, about 200 times CKKS's own error on the distances
/// (docs/he.md). More costs accuracy: the distances to the median come
/// from differences of the pairwise ones, which amplify the noise.
pub const DEFAULT_FLOODING: f64 = 1.0 / (1u64 << 22) as f64;

/// The absolute part of the flooding noise's standard deviation, in the
/// units of the values: `2^-40`, so that a distance near zero (identical
/// updates, or a ciphertext the server paired with itself) is flooded too
/// (CKKS's own error there is measured in docs/he.md).
pub const FLOODING_FLOOR: f64 = 1.0 / (1u64 << 40) as f64;

/// A hospital's answer to the distance step of [`EncryptedMedian`]: loads
/// the encrypted squared distances the server sent (only for as many points
/// as the step names, at most [`MAX_GRAM_POINTS`]; an inner-product matrix,
/// which would tell where the updates are, is refused), decrypts them, adds
/// Gaussian noise of standard deviation `flooding * |entry| +`
/// [`FLOODING_FLOOR`] to each and answers the upper triangle as one f32
/// tensor [`DISTANCES_TENSOR`].
///
/// The noise floods CKKS's decryption error, which depends on the secret
/// key (published decryptions can leak it; Li and Micciancio, 2021). It is
/// drawn from a generator seeded by the secret key and the ciphertexts, so
/// every hospital adds the same noise to the same ciphertexts and asking
/// again, or asking every hospital, gives the server no fresh samples to
/// average; and a decryptor answers at most one distance step per round.
/// This protects against an honest-but-curious server: the hospital cannot
/// tell what the ciphertexts hold, so a malicious server could ask it to
/// decrypt something else tagged as distances (docs/he.md).
///
/// Plug it into a client with
/// [`ModelClient::with_responder`](fedcore::ModelClient::with_responder).
pub struct DistanceDecryptor {
    ctx: CkksContext<Secret>,
    flooding: f64,
    /// The last round answered.
    answered: Option<u64>,
}

impl std::fmt::Debug for DistanceDecryptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistanceDecryptor")
            .field("flooding", &self.flooding)
            .field("answered", &self.answered)
            .finish_non_exhaustive()
    }
}

impl DistanceDecryptor {
    /// A decryptor with a hospital's context and [`DEFAULT_FLOODING`].
    pub fn new(ctx: CkksContext<Secret>) -> crate::Result<Self> {
        Ok(Self {
            ctx,
            flooding: DEFAULT_FLOODING,
            answered: None,
        })
    }

    /// Sets the relative noise, at most `1e-4` (0 turns flooding off:
    /// tests only). The server's [`EncryptedMedian::with_slack`] must stay
    /// several times above it.
    pub fn with_flooding(mut self, relative: f64) -> crate::Result<Self> {
        if !(relative.is_finite() && (0.0..=1e-4).contains(&relative)) {
            return Err(HeError::OutOfRange(format!(
                "flooding {relative} is not in [0, 1e-4]"
            )));
        }
        self.flooding = relative;
        Ok(self)
    }

    /// The decrypted, flooded upper triangle of the distances `ins` carries.
    fn answer(&mut self, ins: &StepIns) -> crate::Result<Vec<f32>> {
        if self.answered == Some(ins.round) {
            return Err(HeError::Mismatch(format!(
                "the distances of round {} were answered already; a hospital answers once per round",
                ins.round
            )));
        }
        let sealed = ins.sealed.as_ref().ok_or_else(|| {
            HeError::Mismatch("the distance step carries no encrypted distances".into())
        })?;
        let points = ins
            .metrics
            .get(POINTS_METRIC)
            .copied()
            .filter(|p| p.fract() == 0.0 && (2.0..=MAX_GRAM_POINTS as f64).contains(p))
            .ok_or_else(|| {
                HeError::OutOfRange(format!(
                    "the step must name between 2 and {MAX_GRAM_POINTS} points (`{POINTS_METRIC}`)"
                ))
            })? as usize;
        let pairs = points * (points - 1) / 2;
        let tensors = sealed.layout().tensors();
        if tensors.len() != 1 || tensors[0].name != DISTANCES_TENSOR || sealed.len() != pairs {
            return Err(HeError::Mismatch(format!(
                "the step must carry one tensor `{DISTANCES_TENSOR}` of {pairs} values"
            )));
        }
        let g = self.ctx.load_gram(sealed.bytes(), points)?;
        if g.kind() != Pairs::SquaredDistances {
            return Err(HeError::Mismatch(
                "refusing to decrypt inner products: only squared distances are answered".into(),
            ));
        }
        let d = self.ctx.decrypt_gram(&g)?;
        self.answered = Some(ins.round);
        let mut rng = ChaCha20Rng::from_seed(self.ctx.keyed_seed(sealed.bytes())?);
        let mut out = Vec::with_capacity(pairs);
        for i in 0..points {
            for j in i + 1..points {
                let v = d[i * points + j];
                let noise: f64 = StandardNormal.sample(&mut rng);
                let sigma = self.flooding * v.abs() + FLOODING_FLOOR;
                out.push((v + noise * sigma) as f32);
            }
        }
        Ok(out)
    }
}

impl StepResponder for DistanceDecryptor {
    fn respond(&mut self, ins: &StepIns, _sent: &ClientUpdate) -> fedcore::Result<StepReply> {
        let values = self.answer(ins)?;
        let n = values.len();
        Ok(StepReply::new(
            ins,
            Parameters::from_tensors([(DISTANCES_TENSOR, vec![n], values)])?,
        ))
    }
}
