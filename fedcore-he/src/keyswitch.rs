//! Multiparty keys in the round: hospitals upload under the collective key,
//! and a second step of the round switches the sealed aggregate to the
//! hospitals' output key (see [`crate::multiparty`]).
//!
//! - Server: [`key_switch_round`] pairs a strategy ([`KeySwitchRound`],
//!   wrapping the body's strategy, e.g. FedAvg) with a sealed aggregator
//!   ([`KeySwitchSum`], for [`Server::with_sealing`](fedcore::Server::with_sealing)).
//!   After the body is aggregated, the strategy forms the encrypted weighted
//!   sum of the sealed parts with the weights the server will use, asks every
//!   hospital still in the round for its switch share (one extra step), and
//!   combines them; the sealed aggregator then adds the switched sum to the
//!   sealed global, after checking that it was made from the same parts and
//!   weights.
//! - Hospitals: [`MultipartySealer`] (decrypts the global with the output
//!   key, uploads under the collective key) and [`KeySwitcher`] (answers the
//!   step with its [`PartyKey`] or [`ThresholdKey`]).
//!
//! N-of-N: every party must upload and answer in every round (the strategy
//! asks for a quorum of all of them); a hospital that drops before the key
//! switch ends the round (the sealed global stays as it was). Threshold:
//! when a hospital drops at the step, the strategy forms the sum again
//! without it and asks the rest, as long as at least `t` remain.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use fedcore::{
    Aggregate, ClientId, ClientUpdate, Layout, Parameters, RoundSteps, SealedAggregator,
    SealedTensors, Sealer, StepIns, StepReply, StepRequest, StepResponder, Strategy, StrategyInfo,
};
use sha2::{Digest, Sha256};

use crate::context::{CkksContext, Public, Secret};
use crate::error::HeError;
use crate::median::POINTS_METRIC;
use crate::multiparty::{
    CollectiveKey, DistanceRequest, MAX_PARTIES, PartyKey, SwitchShare, ThresholdKey, VERSION,
    check_switch_error, expect_magic, is_distance_step, parse_distance_step,
};
use crate::reader::Reader;
use crate::sealer::{
    check_len, check_part_packing, load_sealed, open_sum, packing_of_global, seal_values,
};
use crate::vector::{EncryptedVector, Form, SlotPacking};

/// How many key switches a hospital answers in one round: the first ask
/// and, under a threshold, one more per hospital that dropped at the step.
pub const MAX_SWITCHES_PER_ROUND: usize = 4;

const REQUEST_MAGIC: &[u8; 4] = b"FCSR";

/// The step's sealed bytes: magic, version, the sum of the weights'
/// absolute values (f64), signer count (u32), signers (u32 each; none for
/// N-of-N), then the aggregate's bytes.
fn request_bytes(weight_sum: f64, signers: &[u32], aggregate: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + 4 * signers.len() + aggregate.len());
    out.extend_from_slice(REQUEST_MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&weight_sum.to_le_bytes());
    out.extend_from_slice(&(signers.len() as u32).to_le_bytes());
    for s in signers {
        out.extend_from_slice(&s.to_le_bytes());
    }
    out.extend_from_slice(aggregate);
    out
}

/// A parsed request: the weights' absolute sum, the signers, the aggregate.
type Request<'a> = (f64, Vec<u32>, &'a [u8]);

fn parse_request(bytes: &[u8]) -> crate::Result<Request<'_>> {
    let bad = |m: &str| HeError::Malformed(format!("key-switch request: {m}"));
    let mut r = Reader::new(bytes);
    expect_magic(
        &mut r,
        REQUEST_MAGIC,
        "a fedcore-he key-switch request",
        &bad,
    )?;
    let weight_sum = f64::from_bits(r.u64().map_err(|_| bad("truncated"))?);
    if !(weight_sum.is_finite() && weight_sum >= 0.0) {
        return Err(bad(&format!("weight sum {weight_sum}")));
    }
    let count = r.u32().map_err(|_| bad("truncated"))? as usize;
    if count > MAX_PARTIES {
        return Err(bad(&format!("{count} signers; at most {MAX_PARTIES}")));
    }
    let signers = (0..count)
        .map(|_| r.u32().map_err(|_| bad("truncated")))
        .collect::<crate::Result<Vec<u32>>>()?;
    let rest = r.rest_len();
    let aggregate = r.take(rest).map_err(|_| bad("truncated"))?;
    Ok((weight_sum, signers, aggregate))
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Checks that a client map (client id to party number) names exactly the
/// parties of `collective`.
pub(crate) fn check_client_map(
    collective: &CollectiveKey,
    parties: &BTreeMap<ClientId, u32>,
) -> crate::Result<()> {
    let mut named: Vec<u32> = parties.values().copied().collect();
    named.sort_unstable();
    if named != collective.parties() {
        return Err(HeError::Mismatch(format!(
            "the client map names parties {named:?}, the collective key {:?}",
            collective.parties()
        )));
    }
    Ok(())
}

/// A step request that carries only `bytes`, sealed under `layout` (no
/// plain parameters).
pub(crate) fn sealed_request(layout: Arc<Layout>, bytes: Vec<u8>) -> fedcore::Result<StepRequest> {
    Ok(
        StepRequest::new(Arc::new(Parameters::zeros(Arc::new(Layout::new([])?))))
            .with_sealed(Arc::new(SealedTensors::new(layout, bytes))),
    )
}

/// The signing set a collective step names, from the parties in the round:
/// none for N-of-N (every party must be in the round), the sorted parties
/// under a roster (at least its threshold); otherwise an error naming the
/// step (`what`).
pub(crate) fn signing_set(
    collective: &CollectiveKey,
    mut parties: Vec<u32>,
    what: &str,
) -> crate::Result<Vec<u32>> {
    parties.sort_unstable();
    match collective.roster().map(|r| r.threshold()) {
        None if parties.len() != collective.parties().len() => Err(HeError::Mismatch(format!(
            "the {what} needs every party (N-of-N); only {parties:?} of {:?} are in the round",
            collective.parties()
        ))),
        Some(t) if parties.len() < t => Err(HeError::Mismatch(format!(
            "the {what} needs {t} hospitals; only {parties:?} are in the round"
        ))),
        None => Ok(Vec::new()),
        Some(_) => Ok(parties),
    }
}

/// Asks the hospitals in the round `request` and reads each reply's sealed
/// bytes with `parse` (which checks the share and says whose it is); a
/// reply that cannot be read, or that is not from its client's party, takes
/// that hospital out (`names`: the step and its share, for the reasons).
/// `None` when a hospital left and a threshold allows asking the rest
/// again; under N-of-N that is an error naming who left.
pub(crate) fn ask_shares<S>(
    steps: &mut RoundSteps<'_>,
    request: &StepRequest,
    parties: &BTreeMap<ClientId, u32>,
    threshold: Option<usize>,
    (step, share): (&str, &str),
    parse: impl Fn(&[u8]) -> crate::Result<(u32, S)>,
) -> fedcore::Result<Option<Vec<S>>> {
    let asked: Vec<ClientId> = steps.clients().to_vec();
    let replies = steps.ask(|_| request.clone())?;
    let mut shares = Vec::with_capacity(replies.len());
    for (client, reply) in &replies {
        let read = reply
            .sealed
            .as_ref()
            .ok_or_else(|| HeError::Malformed(format!("no {share}")))
            .and_then(|s| parse(s.bytes()))
            .and_then(|(party, s)| {
                if Some(&party) == parties.get(client) {
                    Ok(s)
                } else {
                    Err(HeError::Mismatch(format!(
                        "a {share} of party {party} from `{client}`"
                    )))
                }
            });
        match read {
            Ok(s) => shares.push(s),
            Err(e) => steps.reject(client, format!("{step}: {e}"))?,
        }
    }
    if steps.clients().len() == asked.len() {
        return Ok(Some(shares));
    }
    if threshold.is_none() {
        let gone: Vec<&ClientId> = asked
            .iter()
            .filter(|c| !steps.clients().contains(c))
            .collect();
        return Err(HeError::Mismatch(format!(
            "the {step} needs every party's share (N-of-N); {gone:?} left at the step"
        ))
        .into());
    }
    Ok(None)
}

/// What the strategy hands the sealed aggregator: the switched sum and
/// what it was made from.
struct Pending {
    weights: Vec<f64>,
    parts: Vec<[u8; 32]>,
    switched: EncryptedVector,
}

type Slot = Arc<Mutex<Option<Pending>>>;

fn take(slot: &Slot) -> Option<Pending> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// The server's pair for a round with multiparty keys: the strategy
/// (wrapping `inner`, which aggregates the body and reports the weights)
/// and the sealed aggregator to give
/// [`Server::with_sealing`](fedcore::Server::with_sealing).
///
/// `parties` maps each hospital's client id to its party number in
/// `collective`, and must cover exactly its parties. `server_learning_rate`
/// must be the server's (`ServerConfig::server_learning_rate`): the sealed
/// sum is weighted `lr * w_i / sum w`, and the sealed aggregator refuses a
/// switched sum made with other weights. With a roster on `collective`
/// ([`CollectiveKey::with_roster`]) the switch is t-of-N, else N-of-N.
pub fn key_switch_round<S: Strategy>(
    inner: S,
    collective: CollectiveKey,
    output: CkksContext<Public>,
    parties: BTreeMap<ClientId, u32>,
    server_learning_rate: f32,
) -> crate::Result<(KeySwitchRound<S>, KeySwitchSum)> {
    check_client_map(&collective, &parties)?;
    if collective.context().params() != output.params() {
        return Err(HeError::Mismatch(
            "the output key has other parameters than the collective key".into(),
        ));
    }
    if !(server_learning_rate.is_finite() && server_learning_rate > 0.0) {
        return Err(HeError::OutOfRange(format!(
            "server learning rate {server_learning_rate}"
        )));
    }
    let slot: Slot = Arc::new(Mutex::new(None));
    Ok((
        KeySwitchRound {
            inner,
            collective: collective.clone(),
            output: output.clone(),
            parties,
            lr: f64::from(server_learning_rate),
            slot: slot.clone(),
        },
        KeySwitchSum {
            collective,
            // Key switching is linear: the global and the uploads pack two
            // values per slot (half the bytes of uploads, switch shares and
            // the sum).
            output: output.with_slot_packing(SlotPacking::Complex),
            slot,
        },
    ))
}

/// The server's strategy for multiparty keys (see [`key_switch_round`]).
pub struct KeySwitchRound<S> {
    inner: S,
    collective: CollectiveKey,
    output: CkksContext<Public>,
    parties: BTreeMap<ClientId, u32>,
    lr: f64,
    slot: Slot,
}

impl<S> std::fmt::Debug for KeySwitchRound<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySwitchRound")
            .field("collective", &self.collective)
            .field("parties", &self.parties)
            .finish_non_exhaustive()
    }
}

impl<S> KeySwitchRound<S> {
    /// The body's strategy.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: Strategy> KeySwitchRound<S> {
    /// One attempt over the clients still in: the body's aggregate, the
    /// sealed sum, the step. `Ok(None)` when a hospital left at the step
    /// and a threshold allows another attempt without it.
    fn attempt(
        &mut self,
        updates: &[ClientUpdate],
        steps: &mut RoundSteps<'_>,
    ) -> fedcore::Result<Option<Aggregate>> {
        // Copies only after a hospital has left (a retry).
        let copied: Vec<ClientUpdate>;
        let in_round: &[ClientUpdate] =
            if updates.iter().all(|u| steps.clients().contains(&u.client)) {
                updates
            } else {
                copied = updates
                    .iter()
                    .filter(|u| steps.clients().contains(&u.client))
                    .cloned()
                    .collect();
                &copied
            };
        let agg = self.inner.aggregate_round(in_round, steps)?;
        let kept: Vec<&ClientUpdate> = in_round
            .iter()
            .filter(|u| steps.clients().contains(&u.client))
            .collect();
        // The weights in the updates' order, summed in that order: exactly
        // what the server's sealed sum will compute.
        let raw = kept
            .iter()
            .map(|u| {
                agg.clients
                    .iter()
                    .find(|d| d.client == u.client)
                    .map(|d| d.weight)
                    .ok_or_else(|| {
                        fedcore::Error::InvalidInput(format!(
                            "the body's strategy reports no weight for `{}`",
                            u.client
                        ))
                    })
            })
            .collect::<fedcore::Result<Vec<f64>>>()?;
        let total: f64 = raw.iter().sum();
        if !(total.is_finite() && total > 0.0) || raw.iter().any(|w| *w < 0.0) {
            return Err(HeError::OutOfRange(format!(
                "the body's strategy reported weights {raw:?}; the key switch needs non-negative weights with a positive sum"
            ))
            .into());
        }
        let ctx = self.collective.context();
        let mut weights = Vec::with_capacity(kept.len());
        let mut parts = Vec::with_capacity(kept.len());
        let mut digests = Vec::with_capacity(kept.len());
        let mut signers = Vec::with_capacity(kept.len());
        for (u, w) in kept.iter().zip(raw) {
            let sealed = u.sealed.as_ref().ok_or_else(|| {
                fedcore::Error::Sealing(format!("update of {} has no sealed part", u.client))
            })?;
            let party = self.parties.get(&u.client).copied().ok_or_else(|| {
                HeError::Mismatch(format!(
                    "`{}` is not a party of the collective key",
                    u.client
                ))
            })?;
            weights.push(self.lr * w / total);
            parts.push(ctx.load(sealed.bytes(), Form::Fresh)?);
            digests.push(digest(sealed.bytes()));
            signers.push(party);
        }
        let threshold = self.collective.roster().map(|r| r.threshold());
        let named = signing_set(&self.collective, signers, "key switch")?;
        let refs: Vec<&EncryptedVector> = parts.iter().collect();
        let sum = ctx.weighted_sum(&refs, &weights)?;
        drop(refs);
        drop(parts);
        let layout = kept
            .first()
            .and_then(|u| u.sealed.as_ref())
            .map(|s| s.layout().clone())
            .ok_or(fedcore::Error::EmptyUpdates)?;
        let request = sealed_request(
            layout,
            request_bytes(weights.iter().sum(), &named, &sum.to_bytes()?),
        )?;
        // Someone leaving at the step (or answering wrongly) leaves their
        // upload in the sum: without a threshold the round cannot complete.
        let Some(shares) = ask_shares(
            steps,
            &request,
            &self.parties,
            threshold,
            ("key switch", "switch share"),
            |bytes| {
                let s = SwitchShare::from_bytes(&self.collective, bytes)?;
                Ok((s.party(), s))
            },
        )?
        else {
            return Ok(None);
        };
        let switched = self.collective.switch(&sum, &self.output, &shares)?;
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Pending {
            weights,
            parts: digests,
            switched,
        });
        Ok(Some(agg))
    }
}

impl<S: Strategy> Strategy for KeySwitchRound<S> {
    fn describe(&self) -> StrategyInfo {
        let inner = self.inner.describe();
        let need = self
            .collective
            .roster()
            .map_or(self.collective.parties().len(), |r| r.threshold());
        StrategyInfo::new(format!("{}+key-switch", inner.name))
            .with_min_updates(inner.min_updates.max(need))
    }

    fn aggregate_round(
        &mut self,
        updates: &[ClientUpdate],
        steps: &mut RoundSteps<'_>,
    ) -> fedcore::Result<Aggregate> {
        take(&self.slot);
        // A retry aggregates the body again: a stateful body strategy
        // (centered clipping's center, say) must start from the same state.
        let state = self.inner.saved_state();
        for attempt in 0..MAX_SWITCHES_PER_ROUND {
            if attempt > 0
                && let Some(s) = &state
            {
                self.inner.restore_state(s.clone())?;
            }
            if let Some(agg) = self.attempt(updates, steps)? {
                return Ok(agg);
            }
        }
        Err(HeError::Mismatch(format!(
            "hospitals left at each of {MAX_SWITCHES_PER_ROUND} key-switch attempts"
        ))
        .into())
    }

    fn saved_state(&self) -> Option<Vec<f32>> {
        self.inner.saved_state()
    }

    fn restore_state(&mut self, state: Vec<f32>) -> fedcore::Result<()> {
        self.inner.restore_state(state)
    }
}

/// The server's sealed aggregator for multiparty keys (see
/// [`key_switch_round`]): the sealed global is under the output key; each
/// round adds the sum the strategy switched to it.
#[derive(Clone)]
pub struct KeySwitchSum {
    collective: CollectiveKey,
    output: CkksContext<Public>,
    slot: Slot,
}

impl std::fmt::Debug for KeySwitchSum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySwitchSum")
            .field("collective", &self.collective)
            .finish_non_exhaustive()
    }
}

impl KeySwitchSum {
    /// Seals the initial global with `packing` instead of two values per
    /// slot (the hospitals' uploads follow the global).
    pub fn with_slot_packing(mut self, packing: SlotPacking) -> Self {
        self.output = self.output.with_slot_packing(packing);
        self
    }
}

impl SealedAggregator for KeySwitchSum {
    fn name(&self) -> String {
        format!(
            "ckks-key-switch(parties={})",
            self.collective.parties().len()
        )
    }

    fn seal_initial(&self, layout: &Arc<Layout>, values: &[f32]) -> fedcore::Result<SealedTensors> {
        seal_values(layout, values, |v| {
            self.output.encrypt_public(v)?.to_bytes()
        })
    }

    fn check(&self, global: &SealedTensors, part: &SealedTensors) -> fedcore::Result<()> {
        let p = load_sealed(self.collective.context(), part, Form::Fresh)?;
        Ok(check_part_packing(global, &p)?)
    }

    fn check_global(&self, global: &SealedTensors) -> fedcore::Result<()> {
        load_sealed(&self.output, global, Form::Sum).map(drop)
    }

    fn accumulate(
        &self,
        global: &SealedTensors,
        parts: &[&SealedTensors],
        weights: &[f64],
    ) -> fedcore::Result<SealedTensors> {
        let pending = take(&self.slot).ok_or_else(|| {
            HeError::Mismatch("no switched sum: the round's strategy is not KeySwitchRound".into())
        })?;
        let same_parts = pending.parts.len() == parts.len()
            && pending
                .parts
                .iter()
                .zip(parts)
                .all(|(d, p)| *d == digest(p.bytes()));
        let same_weights = pending.weights.len() == weights.len()
            && pending
                .weights
                .iter()
                .zip(weights)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        if !same_parts || !same_weights {
            return Err(HeError::Mismatch(
                "the switched sum was made from other parts or weights (is the strategy's server learning rate the server's?)".into(),
            )
            .into());
        }
        let g = load_sealed(&self.output, global, Form::Sum)?;
        let next = self.output.add(&g, &pending.switched)?;
        Ok(SealedTensors::new(
            global.layout().clone(),
            next.to_bytes()?,
        ))
    }
}

/// A hospital's [`Sealer`] under multiparty keys: opens the global with the
/// output key, uploads under the collective key (public-key encryption).
#[derive(Debug, Clone)]
pub struct MultipartySealer {
    collective: CkksContext<Public>,
    output: CkksContext<Secret>,
}

impl MultipartySealer {
    /// A sealer uploading under `collective` and decrypting with `output`.
    pub fn new(collective: &CollectiveKey, output: CkksContext<Secret>) -> Self {
        Self {
            collective: collective.context().clone(),
            output,
        }
    }
}

impl Sealer for MultipartySealer {
    fn name(&self) -> String {
        format!("ckks-multiparty(n={})", self.output.params().degree())
    }

    fn open(&self, sealed: &SealedTensors) -> fedcore::Result<Vec<f32>> {
        open_sum(&self.output, sealed)
    }

    fn seal(&self, global: &SealedTensors, values: &[f32]) -> fedcore::Result<SealedTensors> {
        let ctx = self
            .collective
            .clone()
            .with_slot_packing(packing_of_global(global)?);
        seal_values(global.layout(), values, |v| {
            ctx.encrypt_upload(v)?.to_bytes()
        })
    }
}

enum SwitchKey {
    Full(PartyKey),
    Threshold(ThresholdKey),
}

impl SwitchKey {
    fn params(&self) -> &crate::CkksParams {
        match self {
            SwitchKey::Full(k) => k.params(),
            SwitchKey::Threshold(k) => k.params(),
        }
    }

    fn weight_sum(&self) -> f64 {
        match self {
            SwitchKey::Full(k) => k.weight_sum(),
            SwitchKey::Threshold(k) => k.weight_sum(),
        }
    }
}

/// A hospital's answer to the key-switch step ([`StepResponder`]): its
/// switch share of the aggregate the server sends, at most
/// [`MAX_SWITCHES_PER_ROUND`] per round. Under the encrypted geometric
/// median ([`EncryptedMedian::multiparty`](crate::EncryptedMedian::multiparty))
/// it also answers the distance step with its share of the distances'
/// decryption, at most as many times a round.
pub struct KeySwitcher {
    key: SwitchKey,
    collective: CollectiveKey,
    output: CkksContext<Public>,
    answered: (u64, usize),
    distances_answered: (u64, usize),
}

impl std::fmt::Debug for KeySwitcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySwitcher")
            .field("collective", &self.collective)
            .finish_non_exhaustive()
    }
}

impl KeySwitcher {
    /// Answers N-of-N switches with `key`. Refuses a federation too large
    /// for the parameters' smudging (see [`crate::multiparty::MAX_SWITCH_ERROR`]).
    pub fn new(
        key: PartyKey,
        collective: CollectiveKey,
        output: CkksContext<Public>,
    ) -> crate::Result<Self> {
        Self::with_key(SwitchKey::Full(key), collective, output)
    }

    /// Answers threshold switches with `key` (`collective` must carry the
    /// same roster), with the same check as [`KeySwitcher::new`].
    pub fn threshold(
        key: ThresholdKey,
        collective: CollectiveKey,
        output: CkksContext<Public>,
    ) -> crate::Result<Self> {
        Self::with_key(SwitchKey::Threshold(key), collective, output)
    }

    fn with_key(
        key: SwitchKey,
        collective: CollectiveKey,
        output: CkksContext<Public>,
    ) -> crate::Result<Self> {
        check_switch_error(key.params(), collective.parties().len(), key.weight_sum())?;
        Ok(Self {
            key,
            collective,
            output,
            answered: (0, 0),
            distances_answered: (0, 0),
        })
    }

    /// This hospital's share of the decryption of the squared distances a
    /// distance step carries.
    fn answer_distances(&mut self, ins: &StepIns, bytes: &[u8]) -> crate::Result<Vec<u8>> {
        let (signers, request) = parse_distance_step(bytes)?;
        let points = ins
            .metrics
            .get(POINTS_METRIC)
            .copied()
            .filter(|p| p.fract() == 0.0 && (2.0..=crate::MAX_GRAM_POINTS as f64).contains(p))
            .ok_or_else(|| {
                HeError::OutOfRange(format!(
                    "the step must name between 2 and {} points (`{POINTS_METRIC}`)",
                    crate::MAX_GRAM_POINTS
                ))
            })? as usize;
        let count = if self.distances_answered.0 == ins.round {
            self.distances_answered.1
        } else {
            0
        };
        if count >= MAX_SWITCHES_PER_ROUND {
            return Err(HeError::Mismatch(format!(
                "already answered {count} distance steps in round {}",
                ins.round
            )));
        }
        let request = DistanceRequest::from_bytes(&self.collective, request, points)?;
        let share = match &self.key {
            SwitchKey::Full(k) if signers.is_empty() => {
                k.distance_share(&self.collective, &request)?
            }
            SwitchKey::Full(_) => {
                return Err(HeError::Mismatch(
                    "a threshold decryption asked of an N-of-N key".into(),
                ));
            }
            SwitchKey::Threshold(k) => k.distance_share(&self.collective, &request, &signers)?,
        };
        self.distances_answered = (ins.round, count + 1);
        Ok(share.to_bytes())
    }

    fn answer(&mut self, ins: &StepIns) -> crate::Result<SealedTensors> {
        let sealed = ins
            .sealed
            .as_ref()
            .ok_or_else(|| HeError::Malformed("the key-switch step carries no aggregate".into()))?;
        if is_distance_step(sealed.bytes()) {
            let share = self.answer_distances(ins, sealed.bytes())?;
            return Ok(SealedTensors::new(sealed.layout().clone(), share));
        }
        let (weight_sum, signers, bytes) = parse_request(sealed.bytes())?;
        let bound = self.key.weight_sum();
        // Normalized weights add up to 1 only to rounding.
        if weight_sum > bound * (1.0 + 1e-9) {
            return Err(HeError::OutOfRange(format!(
                "the aggregate's weights add up to {weight_sum}; this hospital smudges for at most {bound} (PartyKey::with_weight_sum)"
            )));
        }
        let aggregate = self.collective.context().load(bytes, Form::Sum)?;
        check_len(sealed.layout(), aggregate.len())?;
        let count = if self.answered.0 == ins.round {
            self.answered.1
        } else {
            0
        };
        if count >= MAX_SWITCHES_PER_ROUND {
            return Err(HeError::Mismatch(format!(
                "already answered {count} key switches in round {}",
                ins.round
            )));
        }
        let share = match &self.key {
            SwitchKey::Full(k) if signers.is_empty() => {
                k.switch_share(&self.collective, &aggregate, &self.output)?
            }
            SwitchKey::Full(_) => {
                return Err(HeError::Mismatch(
                    "a threshold switch asked of an N-of-N key".into(),
                ));
            }
            SwitchKey::Threshold(k) => {
                k.switch_share(&self.collective, &aggregate, &self.output, &signers)?
            }
        };
        self.answered = (ins.round, count + 1);
        Ok(SealedTensors::new(
            sealed.layout().clone(),
            share.to_bytes(),
        ))
    }
}

impl StepResponder for KeySwitcher {
    fn respond(&mut self, ins: &StepIns, _sent: &ClientUpdate) -> fedcore::Result<StepReply> {
        let sealed = self.answer(ins)?;
        let mut reply = StepReply::new(ins, Parameters::zeros(Arc::new(Layout::new([])?)));
        reply.sealed = Some(sealed);
        Ok(reply)
    }
}
