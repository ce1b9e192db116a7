//! The encrypted geometric median under multiparty keys, in the
//! orchestrator's round (in memory): whole updates uploaded under the
//! collective key, their squared distances computed under it with the
//! collective relinearization key and decrypted together by the hospitals
//! (one coefficient per pair), the median's weighted sum switched to the
//! output key. Compared with the plaintext geometric median of the same
//! updates; N-of-N and t-of-N, with a hospital dropping at the distance
//! step.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fedcore::memory::{Fault, InMemoryTransport};
use fedcore::net::provision::{Kit, Project, ProjectSpec};
use fedcore::net::{self, ClientOptions, GrpcTransport, ServerOptions};
use fedcore::{
    Aggregator, Client, ClientFailure, ClientId, ClientUpdate, EvaluateIns, Evaluation, Failure,
    FitIns, Parameters, RoundOutcome, RunPolicy, Sealer, Server, ServerConfig, StepIns, StepReply,
    StepResponder, Transport,
};
use fedcore_he::keyswitch::{KeySwitchRound, KeySwitcher, MultipartySealer, key_switch_round};
use fedcore_he::multiparty::{
    CollectiveKey, Crs, DEFAULT_DISTANCE_BOUND, Deal, KeyShare, PartyKey, RelinShare, Roster,
    ThresholdKey,
};
use fedcore_he::{CkksContext, CkksParams, EncryptedMedian, Form, Secret, SlotPacking};
use fedcore_robust::GeometricMedian;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const N: u32 = 4;
const LEN: usize = 10_000;

/// Four hospitals' keys at the median's parameters, made once: secret
/// shares, the collective key with its relinearization key (both RKG rounds
/// through bytes), the threshold keys (3 of 4) and the output key.
struct Keys {
    parties: Vec<PartyKey>,
    collective: CollectiveKey,
    threshold: (CollectiveKey, Vec<ThresholdKey>),
    output: CkksContext<Secret>,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let params = CkksParams::multiparty_median();
        let parties: Vec<PartyKey> = (1..=N)
            .map(|i| PartyKey::generate(params.clone(), i).expect("secret share"))
            .collect();
        let crs = Crs::new([5; 32]);
        let shares: Vec<KeyShare> = parties
            .iter()
            .map(|p| p.key_share(&crs).expect("key share"))
            .collect();
        let collective = CollectiveKey::combine(&params, &crs, &shares).expect("collective key");
        let wire = |s: RelinShare| RelinShare::from_bytes(&params, &s.to_bytes()).expect("bytes");
        let round1: Vec<RelinShare> = parties
            .iter()
            .map(|p| wire(p.relin_round1(&collective).expect("round 1")))
            .collect();
        let round2: Vec<RelinShare> = parties
            .iter()
            .map(|p| wire(p.relin_round2(&collective, &round1).expect("round 2")))
            .collect();
        let collective = collective
            .with_relinearization(&round1, &round2)
            .expect("relinearization key");
        let roster = Roster::new(
            3,
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
                p.threshold_key(&roster, &crs, &Deal::addressed_to(&deals, p.party()))
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

fn examples(party: u32) -> u64 {
    40 + 10 * u64::from(party)
}

/// The hospitals' deltas around a common direction; hospital 1 is
/// sign-flipped (x4).
fn deltas() -> &'static Vec<Vec<f32>> {
    static DELTAS: OnceLock<Vec<Vec<f32>>> = OnceLock::new();
    DELTAS.get_or_init(|| {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let common: Vec<f32> = (0..LEN).map(|_| rng.random_range(-1e-2..1e-2)).collect();
        (1..=N)
            .map(|p| {
                let honest = common.iter().map(|c| c + rng.random_range(-4e-3..4e-3));
                if p == 1 {
                    honest.map(|v| -4.0 * v).collect()
                } else {
                    honest.collect()
                }
            })
            .collect()
    })
}

/// A hospital whose whole update is its fixed delta, sealed under the
/// collective key; one `KeySwitcher` answers both steps.
struct Hospital {
    id: ClientId,
    party: u32,
    sealer: MultipartySealer,
    switcher: KeySwitcher,
    /// Over gRPC: tells the test it was asked for its first step (the
    /// distances), then waits (while the test revokes it) before answering.
    gate: Option<(Sender<()>, Receiver<()>)>,
    /// Answers the distance step with a share whose request digest is
    /// altered (well-formed, but for another request).
    corrupt: bool,
}

impl Client for Hospital {
    fn id(&self) -> &ClientId {
        &self.id
    }

    fn fit(&mut self, ins: &FitIns) -> fedcore::Result<ClientUpdate> {
        let sealed = ins.sealed.as_ref().expect("everything is sealed");
        let body = Parameters::zeros(Arc::new(fedcore::Layout::new([])?));
        let mut u = ClientUpdate::new(self.id.clone(), ins.round, examples(self.party), body);
        u.sealed = Some(
            self.sealer
                .seal(sealed, &deltas()[self.party as usize - 1])?,
        );
        Ok(u)
    }

    fn evaluate(&mut self, _: &EvaluateIns) -> fedcore::Result<Evaluation> {
        Err(fedcore::Error::Unsupported("no evaluation".into()))
    }

    fn step(&mut self, ins: &StepIns) -> fedcore::Result<StepReply> {
        if let Some((asked, release)) = self.gate.take() {
            let _ = asked.send(());
            let _ = release.recv_timeout(Duration::from_secs(60));
        }
        let sent = ClientUpdate::new(
            self.id.clone(),
            ins.round,
            1,
            Parameters::zeros(Arc::new(fedcore::Layout::new([])?)),
        );
        let mut reply = self.switcher.respond(ins, &sent)?;
        let distances = ins
            .sealed
            .as_ref()
            .is_some_and(|s| s.bytes().starts_with(b"FCDT"));
        if self.corrupt && distances {
            let sealed = reply.sealed.take().expect("a share");
            let mut bytes = sealed.bytes().to_vec();
            // Magic, version, party, then the digest.
            bytes[9] ^= 1;
            reply.sealed = Some(fedcore::SealedTensors::new(sealed.layout().clone(), bytes));
        }
        Ok(reply)
    }
}

fn collective(threshold: bool) -> &'static CollectiveKey {
    let k = keys();
    if threshold {
        &k.threshold.0
    } else {
        &k.collective
    }
}

fn hospitals(threshold: bool) -> Vec<Hospital> {
    let k = keys();
    let mut out = Vec::new();
    for (i, p) in k.parties.iter().enumerate() {
        let c = collective(threshold);
        let switcher = if threshold {
            KeySwitcher::threshold(k.threshold.1[i].clone(), c.clone(), k.output.public())
        } else {
            KeySwitcher::new(p.clone(), c.clone(), k.output.public())
        }
        .expect("switcher");
        out.push(Hospital {
            id: name(p.party()),
            party: p.party(),
            sealer: MultipartySealer::new(c, k.output.clone()),
            switcher,
            gate: None,
            corrupt: false,
        });
    }
    out
}

fn transport(threshold: bool) -> InMemoryTransport {
    transport_with(threshold, None)
}

/// The hospitals, `corrupt` answering the distance step wrongly.
fn transport_with(threshold: bool, corrupt: Option<u32>) -> InMemoryTransport {
    let mut t = InMemoryTransport::new();
    for mut h in hospitals(threshold) {
        h.corrupt = Some(h.party) == corrupt;
        t.add_client(h).expect("add client");
    }
    t
}

type MedianServer<T = InMemoryTransport> = Server<T, KeySwitchRound<EncryptedMedian>>;

fn server(threshold: bool, quorum: usize) -> MedianServer {
    make(threshold, quorum, transport(threshold))
}

fn make<T: Transport>(threshold: bool, quorum: usize, t: T) -> MedianServer<T> {
    let k = keys();
    let c = collective(threshold).clone();
    let parties: BTreeMap<ClientId, u32> = (1..=N).map(|p| (name(p), p)).collect();
    let median = EncryptedMedian::multiparty(c.clone(), parties.clone(), DEFAULT_DISTANCE_BOUND)
        .expect("strategy");
    let (strategy, sum) =
        key_switch_round(median, c, k.output.public(), parties, 1.0).expect("pair");
    let config = ServerConfig {
        rounds: 1,
        min_fit_clients: quorum,
        min_available_clients: N as usize,
        round_timeout: Duration::from_secs(120),
        ..ServerConfig::default()
    };
    let initial = Parameters::from_tensors([("w", vec![LEN], vec![0.0; LEN])]).expect("initial");
    Server::new(config, initial, t, strategy)
        .expect("server")
        .with_sealing(&["*"], sum.with_slot_packing(SlotPacking::Real))
        .expect("seal everything")
}

fn open<T: Transport>(s: &MedianServer<T>) -> Vec<f64> {
    let out = &keys().output;
    let sealed = s.sealed_global().expect("sealed");
    out.decrypt(&out.load(sealed.bytes(), Form::Sum).expect("load"))
        .expect("decrypt")
}

/// The plaintext geometric median of the `kept` hospitals' deltas.
fn plaintext(kept: &[u32]) -> fedcore::Aggregate {
    let updates: Vec<ClientUpdate> = kept
        .iter()
        .map(|&p| {
            let d = deltas()[p as usize - 1].clone();
            let values = Parameters::from_tensors([("w", vec![LEN], d)]).expect("params");
            ClientUpdate::new(name(p), 1, examples(p), values)
        })
        .collect();
    GeometricMedian::default()
        .aggregate(&updates)
        .expect("plaintext median")
}

/// Hospital `party`'s failure in the first round, which was at the distance
/// step (step 1).
fn failed_at_the_distances<T: Transport>(s: &MedianServer<T>, party: u32) -> &ClientFailure {
    let r = &s.history()[0];
    let f = r
        .failures
        .iter()
        .find(|f| f.client == name(party))
        .unwrap_or_else(|| panic!("hospital {party}'s failure: {:?}", r.failures));
    assert_eq!(f.step, Some(1), "{:?}", r.failures);
    f
}

/// The decrypted global is the plaintext geometric median of `kept` within
/// 1e-4 of its largest value, with the same trust scores; the sign-flipped
/// hospital 1, if kept, is the least trusted.
fn assert_matches_plaintext<T: Transport>(s: &MedianServer<T>, kept: &[u32]) {
    let record = s.history().last().expect("a round");
    assert!(
        record.outcome.is_completed(),
        "{:?} {:?}",
        record.outcome,
        record.failures
    );
    let want = plaintext(kept);
    let got = open(s);
    let top = want
        .parameters
        .as_slice()
        .iter()
        .fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let worst = got
        .iter()
        .zip(want.parameters.as_slice())
        .map(|(a, b)| (a - f64::from(*b)).abs())
        .fold(0f64, f64::max);
    assert!(
        worst <= 1e-4 * top,
        "median off by {worst:e} (largest value {top:e})"
    );
    let accepted: Vec<ClientId> = record.accepted.iter().map(|a| a.client.clone()).collect();
    let names: Vec<ClientId> = kept.iter().map(|&p| name(p)).collect();
    assert_eq!(accepted, names);
    for (a, w) in record.accepted.iter().zip(&want.clients) {
        let (t, wt) = (a.trust.expect("trust"), w.trust.expect("trust"));
        assert!((t - wt).abs() <= 1e-4, "{}: trust {t} vs {wt}", a.client);
    }
    if kept.contains(&1) {
        let least = record
            .accepted
            .iter()
            .min_by(|a, b| a.trust.partial_cmp(&b.trust).expect("finite"))
            .expect("accepted");
        assert_eq!(least.client, name(1), "{:?}", record.accepted);
    }
}

#[test]
fn the_multiparty_median_of_4_hospitals_one_byzantine_is_the_plaintext_one() {
    let mut s = server(false, N as usize);
    s.run_round().expect("round");
    assert_matches_plaintext(&s, &[1, 2, 3, 4]);
    assert!(
        s.history()[0]
            .aggregator
            .contains("encrypted-geometric-median")
    );
}

#[test]
fn a_threshold_median_round_completes_when_a_hospital_drops_at_the_distance_step() {
    let mut s = server(true, 3);
    s.transport()
        .inject(&name(2), Some(Fault::DropAtStep))
        .expect("inject");
    s.run_round().expect("round");
    let f = failed_at_the_distances(&s, 2);
    assert!(
        matches!(f.reason, Failure::Disconnected(_)),
        "{:?}",
        f.reason
    );
    assert_matches_plaintext(&s, &[1, 3, 4]);
}

#[test]
fn a_hospital_whose_distance_share_cannot_be_combined_is_out_and_a_threshold_round_completes() {
    let mut s = make(true, 3, transport_with(true, Some(2)));
    s.run_round().expect("round");
    let f = failed_at_the_distances(&s, 2);
    assert!(
        format!("{:?}", f.reason).contains("another request"),
        "{:?}",
        f.reason
    );
    assert_matches_plaintext(&s, &[1, 3, 4]);
}

#[test]
fn an_n_of_n_median_round_fails_cleanly_when_a_hospital_drops_at_the_distance_step() {
    let mut s = server(false, N as usize);
    let before = s.sealed_global().expect("sealed").clone();
    s.transport()
        .inject(&name(3), Some(Fault::DropAtStep))
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
    // With hospital 3 back, the next round completes.
    s.transport().inject(&name(3), None).expect("heal");
    s.run_round().expect("round");
    assert_matches_plaintext(&s, &[1, 2, 3, 4]);
}

/// Over gRPC with mutual TLS: hospital 4 is revoked while it is asked for
/// its share of the distances' decryption.
fn over_grpc_with_hospital_4_revoked_at_the_distances(
    threshold: bool,
) -> MedianServer<GrpcTransport> {
    let tmp = tempfile::tempdir().expect("tmp");
    let sites: Vec<String> = (1..=N).map(|p| name(p).as_str().to_owned()).collect();
    let project = Project::create(
        tmp.path().join("p"),
        &ProjectSpec::new("mhe-median", sites, 0),
    )
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
            if h.party == 4 {
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
    assert_eq!(transport.wait_for_clients(4, Duration::from_secs(30)), 4);
    let revoker = {
        let project = project.clone();
        std::thread::spawn(move || {
            asked_rx
                .recv_timeout(Duration::from_secs(60))
                .expect("hospital 4 is asked for its distance share");
            project.revoke_site(name(4).as_str()).expect("revoke");
        })
    };
    let quorum = if threshold { 3 } else { N as usize };
    let mut server = make(threshold, quorum, transport);
    net::run_server(&mut server, &RunPolicy::deployment(Duration::from_secs(20))).expect("run");
    let _ = release_tx.send(());
    revoker.join().expect("revoker");
    for (i, h) in handles.into_iter().enumerate() {
        let r = h.join().expect("site thread");
        if i < 3 {
            r.expect("hospitals 1 to 3 finish");
        } else {
            let e = r.expect_err("hospital 4 is revoked");
            assert!(e.to_string().contains("revoked"), "{e}");
        }
    }
    server
}

#[test]
fn over_grpc_a_threshold_median_round_completes_without_the_hospital_revoked_at_the_distances() {
    let s = over_grpc_with_hospital_4_revoked_at_the_distances(true);
    failed_at_the_distances(&s, 4);
    assert_matches_plaintext(&s, &[1, 2, 3]);
}

#[test]
fn over_grpc_an_n_of_n_median_round_fails_cleanly_when_a_hospital_is_revoked_at_the_distances() {
    let s = over_grpc_with_hospital_4_revoked_at_the_distances(false);
    let r = &s.history()[0];
    assert_eq!(
        r.outcome,
        RoundOutcome::QuorumNotReached,
        "{:?}",
        r.failures
    );
    // The sealed global is still the initial zeros.
    assert!(open(&s).iter().all(|v| v.abs() < 1e-6));
}

#[test]
fn the_strategy_refuses_keys_and_bounds_it_cannot_decrypt_distances_with() {
    let k = keys();
    let parties: BTreeMap<ClientId, u32> = (1..=N).map(|p| (name(p), p)).collect();
    // A distance bound the upload level cannot hold with its smudging.
    let e = EncryptedMedian::multiparty(k.collective.clone(), parties.clone(), 2f64.powi(40))
        .unwrap_err()
        .to_string();
    assert!(e.contains("bits at the upload level"), "{e}");
    // A collective key without its relinearization key.
    let params = CkksParams::multiparty_median();
    let crs = Crs::new([6; 32]);
    let shares: Vec<KeyShare> = k
        .parties
        .iter()
        .map(|p| p.key_share(&crs).expect("key share"))
        .collect();
    let bare = CollectiveKey::combine(&params, &crs, &shares).expect("collective key");
    let e = EncryptedMedian::multiparty(bare, parties.clone(), DEFAULT_DISTANCE_BOUND)
        .unwrap_err()
        .to_string();
    assert!(e.contains("relinearization key"), "{e}");
    // A client map that is not the collective key's parties.
    let mut fewer = parties;
    fewer.remove(&name(4));
    let e = EncryptedMedian::multiparty(k.collective.clone(), fewer, DEFAULT_DISTANCE_BOUND)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the client map names parties"), "{e}");
}
