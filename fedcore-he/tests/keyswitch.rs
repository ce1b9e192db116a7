//! Multiparty keys in the orchestrator's round (in memory): hospitals upload
//! under the collective key, a second step switches the sealed aggregate to
//! the output key. N-of-N and t-of-N, with a hospital dropping at the step.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fedcore::memory::{Fault, InMemoryTransport};
use fedcore::{
    Client, ClientId, ClientUpdate, EvaluateIns, Evaluation, Failure, FedAvg, FitIns, Parameters,
    RoundOutcome, Sealer, Server, ServerConfig, StepIns, StepReply, StepResponder,
};
use fedcore_he::keyswitch::{KeySwitchRound, KeySwitcher, MultipartySealer, key_switch_round};
use fedcore_he::multiparty::{CollectiveKey, Crs, Deal, KeyShare, PartyKey, Roster, ThresholdKey};
use fedcore_he::{CkksContext, CkksParams, Form, Secret};

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
                let mine: Vec<Deal> = deals
                    .iter()
                    .filter(|d| d.recipient() == p.party())
                    .cloned()
                    .collect();
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
}

impl Client for Hospital {
    fn id(&self) -> &ClientId {
        &self.id
    }

    fn fit(&mut self, ins: &FitIns) -> fedcore::Result<ClientUpdate> {
        let sealed = ins.sealed.as_ref().expect("everything is sealed");
        let body = Parameters::zeros(Arc::new(fedcore::Layout::new([])?));
        let mut u = ClientUpdate::new(self.id.clone(), ins.round, examples(self.party), body);
        u.sealed = Some(self.sealer.seal(sealed.layout(), &delta(self.party))?);
        Ok(u)
    }

    fn evaluate(&mut self, _: &EvaluateIns) -> fedcore::Result<Evaluation> {
        Err(fedcore::Error::Unsupported("no evaluation".into()))
    }

    fn step(&mut self, ins: &StepIns) -> fedcore::Result<StepReply> {
        let sent = ClientUpdate::new(
            self.id.clone(),
            ins.round,
            1,
            Parameters::zeros(Arc::new(fedcore::Layout::new([])?)),
        );
        self.switcher.respond(ins, &sent)
    }
}

fn transport(threshold: bool) -> InMemoryTransport {
    let k = keys();
    let mut t = InMemoryTransport::new();
    for (i, p) in k.parties.iter().enumerate() {
        let (collective, switcher) = if threshold {
            let (c, keys) = &k.threshold;
            let key = keys[i].clone();
            (c, KeySwitcher::threshold(key, c.clone(), k.output.public()))
        } else {
            (
                &k.collective,
                KeySwitcher::new(p.clone(), k.collective.clone(), k.output.public()),
            )
        };
        t.add_client(Hospital {
            id: name(p.party()),
            party: p.party(),
            sealer: MultipartySealer::new(collective, k.output.clone()),
            switcher,
        })
        .expect("add client");
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

type KsServer = Server<InMemoryTransport, KeySwitchRound<FedAvg>>;

fn server(threshold: bool, quorum: usize, strategy_lr: f32, server_lr: f32) -> KsServer {
    let k = keys();
    let collective = if threshold {
        k.threshold.0.clone()
    } else {
        k.collective.clone()
    };
    let parties: BTreeMap<ClientId, u32> = (1..=N).map(|p| (name(p), p)).collect();
    let (strategy, sum) =
        key_switch_round(FedAvg, collective, k.output.public(), parties, strategy_lr)
            .expect("pair");
    let initial = Parameters::from_tensors([("w", vec![LEN], vec![0.0; LEN])]).expect("initial");
    Server::new(
        config(quorum, server_lr),
        initial,
        transport(threshold),
        strategy,
    )
    .expect("server")
    .with_sealing(&["*"], sum)
    .expect("seal everything")
}

fn open(s: &KsServer) -> Vec<f64> {
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
    s.run_round().expect("round");
    let r = &s.history()[0];
    assert!(r.outcome.is_completed(), "{:?} {:?}", r.outcome, r.failures);
    assert!(r.aggregator.contains("+key-switch"), "{}", r.aggregator);
    let err = max_error(&open(&s), &mean(&[1, 2, 3]));
    assert!(err < 1e-6, "max error {err:e}");
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
