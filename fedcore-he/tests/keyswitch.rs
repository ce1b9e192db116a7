//! Multiparty keys in the orchestrator's round (in memory): hospitals upload
//! under the collective key, a second step switches the sealed aggregate to
//! the output key. N-of-N and t-of-N, with a hospital dropping at the step.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fedcore::memory::{Fault, InMemoryTransport};
use fedcore::net::provision::{Kit, Project, ProjectSpec};
use fedcore::net::{self, ClientOptions, GrpcTransport, ServerOptions};
use fedcore::{
    Aggregate, Aggregator, Client, ClientId, ClientUpdate, EvaluateIns, Evaluation, Failure,
    FedAvg, FitIns, Parameters, RoundOutcome, RoundSteps, RunPolicy, Sealer, Server, ServerConfig,
    StepIns, StepReply, StepResponder, Strategy, StrategyInfo, Transport,
};
use fedcore_he::keyswitch::{KeySwitchRound, KeySwitcher, MultipartySealer, key_switch_round};
use fedcore_he::multiparty::{CollectiveKey, Crs, Deal, KeyShare, PartyKey, Roster, ThresholdKey};
use fedcore_he::{CkksContext, CkksParams, Form, Secret};
use proptest::prelude::*;

const N: u32 = 3;
const LEN: usize = 5_000;

/// Three hospitals' keys, made once: secret shares, the collective key, the
/// threshold keys (2 of 3) and the output key.
struct Keys {
    parties: Vec<PartyKey>,
    collective: CollectiveKey,
    threshold: (CollectiveKey, Vec<ThresholdKey>),
    output: CkksContext<Secret>,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let params = CkksParams::multiparty();
        let parties: Vec<PartyKey> = (1..=N)
            .map(|i| PartyKey::generate(params.clone(), i).expect("secret share"))
            .collect();
        let crs = Crs::new([3; 32]);
        let shares: Vec<KeyShare> = parties
            .iter()
            .map(|p| p.key_share(&crs).expect("key share"))
            .collect();
        let collective = CollectiveKey::combine(&params, &crs, &shares).expect("collective key");
        let roster = Roster::new(
            2,
            parties
                .iter()
                .map(|p| (p.party(), p.transport_key()))
                .collect(),
        )
        .expect("roster");
        let deals: Vec<Deal> = parties
            .iter()
            .flat_map(|p| p.deal(&roster, &crs).expect("deal"))
            .collect();
        let threshold = parties
            .iter()
            .map(|p| {
                let mine = Deal::addressed_to(&deals, p.party());
                p.threshold_key(&roster, &crs, &mine)
                    .expect("threshold key")
            })
            .collect();
        let with_roster = collective.clone().with_roster(roster).expect("roster");
        Keys {
            parties,
            collective,
            threshold: (with_roster, threshold),
            output: CkksContext::generate(params).expect("output key"),
        }
    })
}

fn name(party: u32) -> ClientId {
    ClientId::new(format!("hospital-{party}"))
}

fn delta(party: u32) -> Vec<f32> {
    (0..LEN)
        .map(|i| ((i as f32 * 0.37 + party as f32).sin()) * 1e-2)
        .collect()
}

fn examples(party: u32) -> u64 {
    40 + 10 * u64::from(party)
}

/// A hospital whose whole update is its fixed delta, sealed.
struct Hospital {
    id: ClientId,
    party: u32,
    sealer: MultipartySealer,
    switcher: KeySwitcher,
    /// Over gRPC: tells the test it was asked for the key switch, then waits
    /// (while the test revokes it) before answering.
    gate: Option<(Sender<()>, Receiver<()>)>,
}

impl Client for Hospital {
    fn id(&self) -> &ClientId {
        &self.id
    }

    fn fit(&mut self, ins: &FitIns) -> fedcore::Result<ClientUpdate> {
        let sealed = ins.sealed.as_ref().expect("everything is sealed");
        let body = Parameters::zeros(Arc::new(fedcore::Layout::new([])?));
        let mut u = ClientUpdate::new(self.id.clone(), ins.round, examples(self.party), body);
        u.sealed = Some(self.sealer.seal(sealed, &delta(self.party))?);
        Ok(u)
    }

    fn evaluate(&mut self, _: &EvaluateIns) -> fedcore::Result<Evaluation> {
        Err(fedcore::Error::Unsupported("no evaluation".into()))
    }

    fn step(&mut self, ins: &StepIns) -> fedcore::Result<StepReply> {
        if let Some((asked, release)) = &self.gate {
            let _ = asked.send(());
            let _ = release.recv_timeout(Duration::from_secs(60));
        }
        let sent = ClientUpdate::new(
            self.id.clone(),
            ins.round,
            1,
            Parameters::zeros(Arc::new(fedcore::Layout::new([])?)),
        );
        self.switcher.respond(ins, &sent)
    }
}

fn hospitals(threshold: bool) -> Vec<Hospital> {
    let k = keys();
    let mut out = Vec::new();
    for (i, p) in k.parties.iter().enumerate() {
        let (collective, switcher) = if threshold {
            let (c, keys) = &k.threshold;
            let key = keys[i].clone();
            (
                c,
                KeySwitcher::threshold(key, c.clone(), k.output.public()).expect("switcher"),
            )
        } else {
            (
                &k.collective,
                KeySwitcher::new(p.clone(), k.collective.clone(), k.output.public())
                    .expect("switcher"),
            )
        };
        out.push(Hospital {
            id: name(p.party()),
            party: p.party(),
            sealer: MultipartySealer::new(collective, k.output.clone()),
            switcher,
            gate: None,
        });
    }
    out
}

fn transport(threshold: bool) -> InMemoryTransport {
    let mut t = InMemoryTransport::new();
    for h in hospitals(threshold) {
        t.add_client(h).expect("add client");
    }
    t
}

fn config(quorum: usize, lr: f32) -> ServerConfig {
    ServerConfig {
        rounds: 1,
        min_fit_clients: quorum,
        min_available_clients: N as usize,
        round_timeout: Duration::from_secs(60),
        server_learning_rate: lr,
        ..ServerConfig::default()
    }
}

type KsServer<T = InMemoryTransport> = Server<T, KeySwitchRound<FedAvg>>;

fn server(threshold: bool, quorum: usize, strategy_lr: f32, server_lr: f32) -> KsServer {
    let t = transport(threshold);
    make(threshold, config(quorum, server_lr), strategy_lr, t)
}

fn make<T: Transport>(
    threshold: bool,
    config: ServerConfig,
    strategy_lr: f32,
    t: T,
) -> KsServer<T> {
    make_with(FedAvg, threshold, config, strategy_lr, t)
}

fn make_with<S: Strategy, T: Transport>(
    inner: S,
    threshold: bool,
    config: ServerConfig,
    strategy_lr: f32,
    t: T,
) -> Server<T, KeySwitchRound<S>> {
    make_packed(inner, threshold, config, strategy_lr, t, None)
}

/// [`make_with`], the global sealed with `packing` (`None`: what
/// `KeySwitchSum` seals by default).
fn make_packed<S: Strategy, T: Transport>(
    inner: S,
    threshold: bool,
    config: ServerConfig,
    strategy_lr: f32,
    t: T,
    packing: Option<fedcore_he::SlotPacking>,
) -> Server<T, KeySwitchRound<S>> {
    let k = keys();
    let collective = if threshold {
        k.threshold.0.clone()
    } else {
        k.collective.clone()
    };
    let parties: BTreeMap<ClientId, u32> = (1..=N).map(|p| (name(p), p)).collect();
    let (strategy, sum) =
        key_switch_round(inner, collective, k.output.public(), parties, strategy_lr).expect("pair");
    let sum = match packing {
        Some(p) => sum.with_slot_packing(p),
        None => sum,
    };
    let initial = Parameters::from_tensors([("w", vec![LEN], vec![0.0; LEN])]).expect("initial");
    Server::new(config, initial, t, strategy)
        .expect("server")
        .with_sealing(&["*"], sum)
        .expect("seal everything")
}

fn open<T: Transport, S: Strategy>(s: &Server<T, KeySwitchRound<S>>) -> Vec<f64> {
    let out = &keys().output;
    let sealed = s.sealed_global().expect("sealed");
    out.decrypt(&out.load(sealed.bytes(), Form::Sum).expect("load"))
        .expect("decrypt")
}

/// The weighted mean of the kept hospitals' deltas (FedAvg by examples).
fn mean(kept: &[u32]) -> Vec<f64> {
    let total: f64 = kept.iter().map(|&p| examples(p) as f64).sum();
    (0..LEN)
        .map(|i| {
            kept.iter()
                .map(|&p| f64::from(delta(p)[i]) * examples(p) as f64 / total)
                .sum()
        })
        .collect()
}

fn max_error(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn an_n_of_n_round_switches_the_sealed_mean_to_the_output_key() {
    let mut s = server(false, 3, 1.0, 1.0);
    // Two values per slot by default: the global, and so the uploads.
    round_gives_the_mean_packed(&mut s, fedcore_he::SlotPacking::Complex);
    let r = &s.history()[0];
    assert!(r.aggregator.contains("+key-switch"), "{}", r.aggregator);
    // The request's sum is written exactly under the collective key (its
    // digest binds the shares, which rounding would change, and the
    // rounding's noise is sized for one ternary key).
    assert_eq!(keys().collective.context().sum_rounding(), None);
}

#[test]
fn a_key_switch_round_one_value_per_slot_gives_the_same_mean() {
    let real = Some(fedcore_he::SlotPacking::Real);
    let mut s = make_packed(FedAvg, false, config(3, 1.0), 1.0, transport(false), real);
    round_gives_the_mean_packed(&mut s, fedcore_he::SlotPacking::Real);
}

/// Runs one round of all three hospitals: it completes, the sealed global
/// decrypts within 1e-6 of their mean, and it is packed as `packing`.
fn round_gives_the_mean_packed(s: &mut KsServer, packing: fedcore_he::SlotPacking) {
    s.run_round().expect("round");
    let r = &s.history()[0];
    assert!(r.outcome.is_completed(), "{:?} {:?}", r.outcome, r.failures);
    let err = max_error(&open(s), &mean(&[1, 2, 3]));
    assert!(err < 1e-6, "max error {err:e}");
    let sealed = s.sealed_global().expect("sealed");
    assert_eq!(
        fedcore_he::slot_packing_of(sealed.bytes()).expect("header"),
        packing
    );
}

#[test]
fn a_threshold_round_completes_when_a_hospital_drops_at_the_key_switch() {
    let mut s = server(true, 2, 1.0, 1.0);
    s.transport()
        .inject(&name(3), Some(Fault::DropAtStep))
        .expect("inject");
    s.run_round().expect("round");
    let r = &s.history()[0];
    assert!(r.outcome.is_completed(), "{:?} {:?}", r.outcome, r.failures);
    let accepted: Vec<&ClientId> = r.accepted.iter().map(|a| &a.client).collect();
    assert_eq!(accepted, [&name(1), &name(2)]);
    let f = r
        .failures
        .iter()
        .find(|f| f.client == name(3))
        .expect("hospital 3's failure");
    assert_eq!(f.step, Some(1));
    assert!(
        matches!(f.reason, Failure::Disconnected(_)),
        "{:?}",
        f.reason
    );
    // The switched sum is the mean of the two that stayed.
    let err = max_error(&open(&s), &mean(&[1, 2]));
    assert!(err < 1e-6, "max error {err:e}");
}

#[test]
fn an_n_of_n_round_fails_cleanly_when_a_hospital_drops_at_the_key_switch() {
    let mut s = server(false, 3, 1.0, 1.0);
    let before = s.sealed_global().expect("sealed").clone();
    s.transport()
        .inject(&name(2), Some(Fault::DropAtStep))
        .expect("inject");
    s.run_round()
        .expect("a failed round is recorded, not an error");
    let r = &s.history()[0];
    assert_eq!(
        r.outcome,
        RoundOutcome::QuorumNotReached,
        "{:?}",
        r.failures
    );
    assert_eq!(s.sealed_global().expect("sealed"), &before);
    // With hospital 2 back, the next round completes.
    s.transport().inject(&name(2), None).expect("heal");
    s.run_round().expect("round");
    let r = s.history().last().expect("round");
    assert!(r.outcome.is_completed(), "{:?} {:?}", r.outcome, r.failures);
    assert!(max_error(&open(&s), &mean(&[1, 2, 3])) < 1e-6);
}

#[test]
fn hospitals_refuse_to_switch_a_sum_heavier_than_their_smudging_covers() {
    // Weights adding up to 2 (server learning rate 2): each hospital's
    // smudging is sized for 1, so none answers and the round fails.
    let mut s = server(false, 3, 2.0, 2.0);
    let before = s.sealed_global().expect("sealed").clone();
    s.run_round().expect("round");
    let r = &s.history()[0];
    assert_eq!(
        r.outcome,
        RoundOutcome::QuorumNotReached,
        "{:?}",
        r.failures
    );
    assert!(
        r.failures
            .iter()
            .all(|f| f.step == Some(1) && f.reason.to_string().contains("smudges for at most 1")),
        "{:?}",
        r.failures
    );
    assert_eq!(s.sealed_global().expect("sealed"), &before);
}

/// A body strategy that counts its calls (its saved state), FedAvg
/// otherwise; `negative` reports hospital 1's weight negated.
struct Counting {
    calls: f32,
    negative: bool,
}

impl Strategy for Counting {
    fn describe(&self) -> StrategyInfo {
        StrategyInfo::new("counting")
    }

    fn aggregate_round(
        &mut self,
        updates: &[ClientUpdate],
        _: &mut RoundSteps<'_>,
    ) -> fedcore::Result<Aggregate> {
        self.calls += 1.0;
        let mut agg = FedAvg.aggregate(updates)?;
        if self.negative {
            agg.clients[0].weight = -agg.clients[0].weight;
        }
        Ok(agg)
    }

    fn saved_state(&self) -> Option<Vec<f32>> {
        Some(vec![self.calls])
    }

    fn restore_state(&mut self, state: Vec<f32>) -> fedcore::Result<()> {
        self.calls = state[0];
        Ok(())
    }
}

#[test]
fn a_retry_after_a_drop_starts_the_body_strategy_from_the_same_state() {
    let counting = Counting {
        calls: 0.0,
        negative: false,
    };
    let mut s = make_with(counting, true, config(2, 1.0), 1.0, transport(true));
    s.transport()
        .inject(&name(3), Some(Fault::DropAtStep))
        .expect("inject");
    s.run_round().expect("round");
    let r = &s.history()[0];
    assert!(r.outcome.is_completed(), "{:?} {:?}", r.outcome, r.failures);
    // Two attempts (with and without hospital 3), one call's worth of state.
    assert_eq!(s.aggregator().inner().saved_state(), Some(vec![1.0]));
    assert!(max_error(&open(&s), &mean(&[1, 2])) < 1e-6);
}

#[test]
fn negative_weights_are_refused_before_any_hospital_is_asked() {
    let counting = Counting {
        calls: 0.0,
        negative: true,
    };
    let mut s = make_with(counting, false, config(3, 1.0), 1.0, transport(false));
    s.run_round().expect("round");
    let r = &s.history()[0];
    match &r.outcome {
        RoundOutcome::AggregationFailed(f) => {
            assert!(f.detail.contains("non-negative weights"), "{}", f.detail)
        }
        other => panic!("{other:?}"),
    }
    assert!(r.failures.is_empty(), "{:?}", r.failures);
}

#[test]
fn a_switch_made_with_another_learning_rate_is_refused_and_the_global_kept() {
    let mut s = server(false, 3, 0.5, 1.0);
    let before = s.sealed_global().expect("sealed").clone();
    s.run_round().expect("round");
    let r = &s.history()[0];
    match &r.outcome {
        RoundOutcome::AggregationFailed(f) => {
            assert!(f.detail.contains("other parts or weights"), "{}", f.detail)
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.sealed_global().expect("sealed"), &before);
}

/// One round over gRPC with mutual TLS: hospital 3 is asked for the key
/// switch, and revoked (its session closes) before it answers.
fn over_grpc_with_hospital_3_revoked_at_the_switch(threshold: bool) -> KsServer<GrpcTransport> {
    let tmp = tempfile::tempdir().expect("tmp");
    let sites: Vec<String> = (1..=N).map(|p| name(p).as_str().to_owned()).collect();
    let project = Project::create(tmp.path().join("p"), &ProjectSpec::new("mhe", sites, 0))
        .expect("provision");
    let options = ServerOptions {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        ..ServerOptions::default()
    };
    let mut transport =
        GrpcTransport::start(&Kit::load(project.server_kit()).expect("kit"), options)
            .expect("listen");
    let address = transport.local_addr().to_string();
    let (asked_tx, asked_rx) = channel();
    let (release_tx, release_rx) = channel();
    let mut gate = Some((asked_tx, release_rx));
    let handles: Vec<_> = hospitals(threshold)
        .into_iter()
        .map(|mut h| {
            if h.party == 3 {
                h.gate = gate.take();
            }
            let kit = Kit::load(project.site_kit(h.id.as_str())).expect("kit");
            let options = ClientOptions {
                address: Some(address.clone()),
                ..ClientOptions::default()
            };
            std::thread::spawn(move || net::run_client(&kit, h, &options))
        })
        .collect();
    assert_eq!(transport.wait_for_clients(3, Duration::from_secs(30)), 3);
    let revoker = {
        let project = project.clone();
        std::thread::spawn(move || {
            asked_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("hospital 3 is asked for the key switch");
            project.revoke_site(name(3).as_str()).expect("revoke");
        })
    };
    let quorum = if threshold { 2 } else { 3 };
    let config = ServerConfig {
        min_available_clients: quorum,
        ..config(quorum, 1.0)
    };
    let mut server = make(threshold, config, 1.0, transport);
    net::run_server(&mut server, &RunPolicy::deployment(Duration::from_secs(20))).expect("run");
    let _ = release_tx.send(());
    revoker.join().expect("revoker");
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.join().expect("site thread");
        if i < 2 {
            r.expect("hospitals 1 and 2 finish");
        } else {
            let e = r.expect_err("hospital 3 is revoked");
            assert!(e.to_string().contains("revoked"), "{e}");
        }
    }
    server
}

#[test]
fn over_grpc_a_threshold_round_completes_without_the_hospital_that_dropped_at_the_switch() {
    let s = over_grpc_with_hospital_3_revoked_at_the_switch(true);
    let r = &s.history()[0];
    assert!(r.outcome.is_completed(), "{:?} {:?}", r.outcome, r.failures);
    let accepted: Vec<&str> = r.accepted.iter().map(|a| a.client.as_str()).collect();
    assert_eq!(accepted, ["hospital-1", "hospital-2"]);
    let f = &r.failures[0];
    assert_eq!((f.client.as_str(), f.step), ("hospital-3", Some(1)));
    assert!(matches!(f.reason, Failure::Disconnected(_)), "{f}");
    let err = max_error(&open(&s), &mean(&[1, 2]));
    assert!(err < 1e-6, "max error {err:e}");
}

#[test]
fn over_grpc_an_n_of_n_round_fails_cleanly_when_a_hospital_drops_at_the_switch() {
    let s = over_grpc_with_hospital_3_revoked_at_the_switch(false);
    let r = &s.history()[0];
    assert_eq!(
        r.outcome,
        RoundOutcome::QuorumNotReached,
        "{:?}",
        r.failures
    );
    let f = &r.failures[0];
    assert_eq!((f.client.as_str(), f.step), ("hospital-3", Some(1)));
    // The sealed global is still the initial zeros.
    assert!(open(&s).iter().all(|v| v.abs() < 1e-6));
}

/// Valid wire objects of every multiparty kind, for the mutation test: a
/// key share, a deal, a threshold switch share, and the aggregate it is for.
struct Wire {
    key_share: Vec<u8>,
    /// The deals for party 2, from parties 1, 2 and 3 (the first mutated).
    deals: Vec<Vec<u8>>,
    switch_share: Vec<u8>,
    sum: fedcore_he::EncryptedVector,
}

fn wire() -> &'static Wire {
    static W: OnceLock<Wire> = OnceLock::new();
    W.get_or_init(|| {
        let k = keys();
        let crs = k.collective.crs();
        let (collective, threshold) = &k.threshold;
        let roster = collective.roster().expect("roster").clone();
        let ctx = collective.context();
        let up = ctx.encrypt_upload(&[0.25; 64]).expect("encrypt");
        let sum = ctx.weighted_sum(&[&up], &[1.0]).expect("sum");
        let share = threshold[0]
            .switch_share(collective, &sum, &k.output.public(), &[1, 2])
            .expect("switch share");
        let deals: Vec<Vec<u8>> = k
            .parties
            .iter()
            .map(|p| p.deal(&roster, &crs).expect("deal")[1].to_bytes())
            .collect();
        // Unchanged, they make party 2's threshold key.
        let intact: Vec<Deal> = deals
            .iter()
            .map(|b| Deal::from_bytes(&CkksParams::multiparty(), b).expect("deal"))
            .collect();
        k.parties[1]
            .threshold_key(&roster, &crs, &intact)
            .expect("intact deals open");
        Wire {
            key_share: k.parties[0].key_share(&crs).expect("key share").to_bytes(),
            deals,
            switch_share: share.to_bytes(),
            sum,
        }
    })
}

fn mutate(
    bytes: &[u8],
    flips: &[(prop::sample::Index, u8)],
    cut: Option<prop::sample::Index>,
) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for (at, x) in flips {
        // Half of the flips at the headers, where the lengths are.
        let i = if x & 0x80 == 0 {
            at.index(b.len().min(96))
        } else {
            at.index(b.len())
        };
        b[i] ^= x | 1;
    }
    if let Some(c) = cut {
        b.truncate(c.index(b.len()));
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random byte changes and truncations in key shares, deals and switch
    /// shares: parsing, combining, opening and switching return an error or
    /// a result; never a panic.
    #[test]
    fn mutated_multiparty_bytes_fail_cleanly(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let k = keys();
        let w = wire();
        let params = CkksParams::multiparty();
        let crs = k.collective.crs();
        let (collective, _) = &k.threshold;
        let roster = collective.roster().expect("roster");
        if let Ok(s) = KeyShare::from_bytes(&params, &mutate(&w.key_share, &flips, cut)) {
            let _ = CollectiveKey::combine(&params, &crs, &[s]);
        }
        if let Ok(d) = Deal::from_bytes(&params, &mutate(&w.deals[0], &flips, cut)) {
            // A changed deal does not open (AES-GCM) or is refused, where the
            // intact set makes a key (checked once, in `wire`).
            let mut set = vec![d];
            for b in &w.deals[1..] {
                set.push(Deal::from_bytes(&params, b).expect("deal"));
            }
            prop_assert!(k.parties[1].threshold_key(roster, &crs, &set).is_err());
        }
        if let Ok(s) = fedcore_he::multiparty::SwitchShare::from_bytes(
            collective,
            &mutate(&w.switch_share, &flips, cut),
        ) {
            let _ = collective.switch(&w.sum, &k.output.public(), &[s]);
        }
    }
}
