//! The encrypted geometric median as a round strategy: whole updates sealed,
//! distances decrypted by the hospitals, the median formed under encryption.
//! Compared with the plaintext geometric median of the same updates.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fedcore::memory::{Fault, InMemoryTransport};
use fedcore::{Aggregator, Sealer};
use fedcore::{
    Client, ClientId, ClientUpdate, EvaluateIns, Evaluation, Failure, FitIns, Parameters,
    Rejection, RoundOutcome, Server, ServerConfig, StepIns, StepReply, StepResponder,
};
use fedcore_he::{
    CkksContext, CkksParams, CkksSealer, CkksSum, DISTANCES_TENSOR, DistanceDecryptor,
    EncryptedMedian, Form, POINTS_METRIC, Public, Secret, SlotPacking,
};
use fedcore_robust::GeometricMedian;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn keys() -> &'static (CkksContext<Secret>, CkksContext<Public>) {
    static KEYS: OnceLock<(CkksContext<Secret>, CkksContext<Public>)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let secret = CkksContext::generate(CkksParams::default()).expect("keygen");
        let eval = secret.evaluation_keys().expect("evaluation keys");
        let public = secret
            .public()
            .with_evaluation_keys(&eval)
            .expect("load evaluation keys");
        (secret, public)
    })
}

/// How a test client answers the distance step.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Honest,
    /// Every distance multiplied by 1000.
    Lie,
    /// One value too many.
    WrongShape,
}

/// A hospital whose delta is fixed: the whole update sealed.
struct Fixed {
    id: ClientId,
    delta: Vec<f32>,
    examples: u64,
    answer: Answer,
    decryptor: DistanceDecryptor,
}

impl Client for Fixed {
    fn id(&self) -> &ClientId {
        &self.id
    }

    fn fit(&mut self, ins: &FitIns) -> fedcore::Result<ClientUpdate> {
        let sealed = ins.sealed.as_ref().expect("everything is sealed");
        // Everything is sealed: the part in the clear has no tensors.
        let body = Parameters::zeros(Arc::new(fedcore::Layout::new([])?));
        let mut u = ClientUpdate::new(self.id.clone(), ins.round, self.examples, body);
        u.sealed = Some(CkksSealer::new(keys().0.clone()).seal(sealed, &self.delta)?);
        Ok(u)
    }

    fn evaluate(&mut self, _: &EvaluateIns) -> fedcore::Result<Evaluation> {
        Err(fedcore::Error::Unsupported("no evaluation".into()))
    }

    fn step(&mut self, ins: &StepIns) -> fedcore::Result<StepReply> {
        let dummy = ClientUpdate::new(
            self.id.clone(),
            ins.round,
            1,
            Parameters::zeros(Arc::new(fedcore::Layout::new([])?)),
        );
        let mut r = self.decryptor.respond(ins, &dummy)?;
        match self.answer {
            Answer::Honest => {}
            Answer::Lie => r
                .values
                .as_mut_slice()
                .iter_mut()
                .for_each(|v| *v *= 1000.0),
            Answer::WrongShape => {
                let n = r.values.len() + 1;
                r.values = Parameters::from_tensors([(DISTANCES_TENSOR, vec![n], vec![0.0; n])])?;
            }
        }
        Ok(r)
    }
}

fn name(i: usize) -> ClientId {
    ClientId::new(format!("hospital-{i:02}"))
}

/// `n` deltas of `len` values around a common direction; the first
/// `byzantine` are sign-flipped (x4) or scaled (x10), alternately.
fn deltas(n: usize, byzantine: usize, len: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let common: Vec<f32> = (0..len).map(|_| rng.random_range(-1e-2..1e-2)).collect();
    (0..n)
        .map(|i| {
            let honest = common.iter().map(|c| c + rng.random_range(-4e-3..4e-3));
            match i {
                i if i < byzantine && i % 2 == 0 => honest.map(|v| -4.0 * v).collect(),
                i if i < byzantine => honest.map(|v| 10.0 * v).collect(),
                _ => honest.collect(),
            }
        })
        .collect()
}

fn transport(deltas: &[Vec<f32>], answers: &[Answer]) -> InMemoryTransport {
    let mut t = InMemoryTransport::new();
    for (i, d) in deltas.iter().enumerate() {
        t.add_client(Fixed {
            id: name(i),
            delta: d.clone(),
            examples: 50 + 10 * i as u64,
            answer: answers.get(i).copied().unwrap_or(Answer::Honest),
            decryptor: DistanceDecryptor::new(keys().0.clone()).expect("decryptor"),
        })
        .expect("add client");
    }
    t
}

fn config(n: usize, quorum: usize) -> ServerConfig {
    ServerConfig {
        rounds: 1,
        min_fit_clients: quorum,
        min_available_clients: n,
        round_timeout: Duration::from_secs(60),
        ..ServerConfig::default()
    }
}

fn initial(len: usize) -> Parameters {
    Parameters::from_tensors([("w", vec![len], vec![0.0; len])]).expect("initial")
}

fn server(
    config: ServerConfig,
    len: usize,
    t: InMemoryTransport,
) -> Server<InMemoryTransport, EncryptedMedian> {
    let strategy = EncryptedMedian::new(keys().1.clone()).expect("strategy");
    let sum = strategy.sealed_sum();
    Server::new(config, initial(len), t, strategy)
        .expect("server")
        .with_sealing(&["*"], sum)
        .expect("seal everything")
}

fn open(server: &Server<InMemoryTransport, EncryptedMedian>) -> Vec<f64> {
    let h = &keys().0;
    let sealed = server.sealed_global().expect("sealed");
    h.decrypt(&h.load(sealed.bytes(), Form::Sum).expect("load"))
        .expect("decrypt")
}

/// The plaintext geometric median of `deltas[kept]`, as the aggregator
/// `fedcore_robust::GeometricMedian` computes it on the same updates.
fn plaintext(deltas: &[Vec<f32>], kept: &[usize]) -> fedcore::Aggregate {
    let updates: Vec<ClientUpdate> = kept
        .iter()
        .map(|&i| {
            let p = Parameters::from_tensors([("w", vec![deltas[i].len()], deltas[i].clone())])
                .expect("params");
            ClientUpdate::new(name(i), 1, 50 + 10 * i as u64, p)
        })
        .collect();
    GeometricMedian::default()
        .aggregate(&updates)
        .expect("plaintext median")
}

/// The median under encryption equals the plaintext one within 1e-4 of its
/// largest value per coordinate, and so do the trust scores and distances.
fn assert_matches_plaintext(
    server: &Server<InMemoryTransport, EncryptedMedian>,
    deltas: &[Vec<f32>],
    kept: &[usize],
) {
    let record = server.history().last().expect("a round");
    assert!(
        record.outcome.is_completed(),
        "{:?} {:?}",
        record.outcome,
        record.failures
    );
    let want = plaintext(deltas, kept);
    let got = open(server);
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
    assert_eq!(record.accepted.len(), kept.len());
    // Each distance is to its own estimate: by the triangle inequality the
    // two differ by at most the estimates' distance, plus the decrypted
    // Gram matrix's error (at most 1.7e-6 of the distance in 72 distances
    // of 12 runs). A fixed 1e-4 of the distance failed a CI run: the
    // estimates' distance alone reaches 1.4e-6 against distances of 0.014,
    // which is 1e-4 of them.
    let gap = got
        .iter()
        .zip(want.parameters.as_slice())
        .map(|(a, b)| (a - f64::from(*b)).powi(2))
        .sum::<f64>()
        .sqrt();
    for (a, w) in record.accepted.iter().zip(&want.clients) {
        assert_eq!(a.client, w.client);
        let (t, wt) = (a.trust.expect("trust"), w.trust.expect("trust"));
        assert!((t - wt).abs() <= 1e-4, "{}: trust {t} vs {wt}", a.client);
        let (d, wd) = (a.distance.expect("distance"), w.distance.expect("distance"));
        assert!(
            (d - wd).abs() <= gap + 1e-5 * wd.max(1e-12),
            "{}: distance {d} vs {wd}, the estimates {gap:e} apart",
            a.client
        );
    }
}

const LEN: usize = 20_000;

#[test]
fn the_encrypted_median_of_3_hospitals_one_byzantine_is_the_plaintext_one() {
    let x = deltas(3, 1, LEN, 3);
    let mut s = server(config(3, 3), LEN, transport(&x, &[]));
    s.run_round().expect("round");
    assert_matches_plaintext(&s, &x, &[0, 1, 2]);
    let r = &s.history()[0];
    assert!(r.aggregator.starts_with("encrypted-geometric-median"));
    // The sign-flipped hospital is the least trusted.
    assert!(
        r.accepted[0].trust.expect("trust") < 0.5,
        "{:?}",
        r.accepted
    );
}

#[test]
fn the_encrypted_median_of_10_hospitals_three_byzantine_is_the_plaintext_one() {
    let x = deltas(10, 3, LEN, 10);
    let mut s = server(config(10, 10), LEN, transport(&x, &[]));
    s.run_round().expect("round");
    assert_matches_plaintext(&s, &x, &(0..10).collect::<Vec<_>>());
    let r = &s.history()[0];
    for a in &r.accepted[..3] {
        assert!(a.weight < 0.05, "{}: weight {}", a.client, a.weight);
    }
}

#[test]
fn a_sealed_sum_packing_two_values_per_slot_is_named_as_the_cause() {
    // `CkksSum::new` packs two values per slot: the hospitals follow it, and
    // the distances cannot be formed. The round fails with the fix named,
    // and the sealed global is kept.
    let x = deltas(3, 0, LEN, 4);
    let strategy = EncryptedMedian::new(keys().1.clone()).expect("strategy");
    let mut s = Server::new(config(3, 3), initial(LEN), transport(&x, &[]), strategy)
        .expect("server")
        .with_sealing(&["*"], CkksSum::new(keys().1.clone()))
        .expect("seal everything");
    let before = s.sealed_global().expect("sealed").bytes().to_vec();
    let record = s.run_round().expect("a failed round is a record").clone();
    let RoundOutcome::AggregationFailed(why) = &record.outcome else {
        panic!("{:?}", record.outcome)
    };
    assert!(
        why.detail.contains("EncryptedMedian::sealed_sum"),
        "{}",
        why.detail
    );
    assert_eq!(s.sealed_global().expect("sealed").bytes(), &before[..]);
}

#[test]
fn a_lying_minority_of_decryptors_cannot_move_the_median() {
    let x = deltas(5, 1, LEN, 5);
    let answers = [Answer::Lie, Answer::Honest, Answer::Honest, Answer::Lie];
    let mut s = server(config(5, 3), LEN, transport(&x, &answers));
    s.run_round().expect("round");
    assert_matches_plaintext(&s, &x, &[0, 1, 2, 3, 4]);
}

#[test]
fn a_hospital_that_leaves_at_the_distance_step_is_out_and_the_rest_is_aggregated() {
    let x = deltas(4, 1, LEN, 4);
    let t = transport(&x, &[]);
    t.inject(&name(2), Some(Fault::DropAtStep)).expect("inject");
    let mut s = server(config(4, 3), LEN, t);
    s.run_round().expect("round");
    assert_matches_plaintext(&s, &x, &[0, 1, 3]);
    let r = &s.history()[0];
    let f = r
        .failures
        .iter()
        .find(|f| f.client == name(2))
        .expect("failure");
    assert_eq!(f.step, Some(1));
    assert!(
        matches!(f.reason, Failure::Disconnected(_)),
        "{:?}",
        f.reason
    );
}

#[test]
fn a_malformed_distance_answer_is_rejected_with_a_reason_and_the_round_goes_on() {
    let x = deltas(4, 0, LEN, 6);
    let answers = [Answer::Honest, Answer::WrongShape];
    let mut s = server(config(4, 3), LEN, transport(&x, &answers));
    s.run_round().expect("round");
    assert_matches_plaintext(&s, &x, &[0, 2, 3]);
    let r = &s.history()[0];
    let f = r
        .failures
        .iter()
        .find(|f| f.client == name(1))
        .expect("failure");
    assert_eq!(f.step, Some(1));
    match &f.reason {
        Failure::Rejected(Rejection::Strategy { detail }) => {
            assert!(detail.contains(DISTANCES_TENSOR), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn losing_the_quorum_at_the_distance_step_keeps_the_encrypted_global() {
    let x = deltas(3, 0, LEN, 7);
    let t = transport(&x, &[]);
    t.inject(&name(0), Some(Fault::DropAtStep)).expect("inject");
    let mut s = server(config(3, 3), LEN, t);
    let before = s.sealed_global().expect("sealed").clone();
    s.run_round().expect("round");
    let r = &s.history()[0];
    assert_eq!(r.outcome, RoundOutcome::QuorumNotReached);
    assert_eq!(s.sealed_global().expect("sealed"), &before);
}

#[test]
fn a_resumed_run_continues_from_the_saved_encrypted_global() {
    let x = deltas(3, 1, 5_000, 8);
    let dir = tempfile::tempdir().expect("tmp");
    let with_checkpoints = |rounds| ServerConfig {
        rounds,
        checkpoint_dir: Some(dir.path().to_path_buf()),
        ..config(3, 3)
    };
    let mut first = server(with_checkpoints(1), 5_000, transport(&x, &[]));
    first.run().expect("round 1");
    let after_one = open(&first);
    drop(first);
    let strategy = EncryptedMedian::new(keys().1.clone()).expect("strategy");
    // The long form of `strategy.sealed_sum()`.
    let sum = CkksSum::new(keys().1.clone()).with_slot_packing(SlotPacking::Real);
    let mut resumed = Server::resume(
        with_checkpoints(2),
        initial(5_000),
        transport(&x, &[]),
        strategy,
    )
    .expect("resume")
    .with_sealing(&["*"], sum)
    .expect("sealing");
    assert_eq!(resumed.next_round(), 2);
    resumed.run().expect("round 2");
    // The same updates twice: the global is twice the first round's median.
    let after_two = open(&resumed);
    for (a, b) in after_two.iter().zip(&after_one) {
        assert!((a - 2.0 * b).abs() < 1e-6, "{a} vs 2 x {b}");
    }
    drop(resumed);
    // Resumed without sealing, the run would train from the zeros that
    // stand in for the sealed values: refused.
    let strategy = EncryptedMedian::new(keys().1.clone()).expect("strategy");
    let mut unsealed = Server::resume(
        with_checkpoints(3),
        initial(5_000),
        transport(&x, &[]),
        strategy,
    )
    .expect("resume");
    let err = unsealed.run_round().expect_err("sealing is missing");
    assert!(err.to_string().contains("sealed tensors"), "{err}");
}

#[test]
fn an_upload_whose_distances_wrap_is_taken_out_and_the_rest_is_aggregated() {
    // Hospital 3's values are large enough that its squared distances pass
    // the modulus (CkksContext::inner_product_bound) and wrap around.
    let mut x = deltas(4, 0, LEN, 11);
    let bound = keys().1.inner_product_bound();
    x[3].iter_mut().for_each(|v| *v *= 2e4);
    let far: f64 = x[3].iter().map(|v| f64::from(*v).powi(2)).sum();
    assert!(far > 4.0 * bound, "{far} vs {bound}");
    let mut s = server(config(4, 3), LEN, transport(&x, &[]));
    s.run_round().expect("round");
    assert_matches_plaintext(&s, &x, &[0, 1, 2]);
    let f = &s.history()[0]
        .failures
        .iter()
        .find(|f| f.client == name(3))
        .expect("the wrapped hospital is out");
    match &f.reason {
        Failure::Rejected(Rejection::Strategy { detail }) => {
            assert!(detail.contains("inconsistent"), "{detail}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_hospital_decrypts_only_squared_distances_for_the_points_it_is_told() {
    let (secret, public) = keys();
    let x: Vec<Vec<f64>> = (0..3).map(|i| vec![i as f64; 100]).collect();
    let parts: Vec<_> = x
        .iter()
        .map(|v| {
            public
                .load(&secret.encrypt_compact(v).expect("encrypt"), Form::Fresh)
                .expect("load")
        })
        .collect();
    let refs: Vec<_> = parts.iter().collect();
    let step = |bytes: Vec<u8>, entries: usize, points: f64| StepIns {
        round: 1,
        step: 1,
        values: Arc::new(Parameters::zeros(Arc::new(
            fedcore::Layout::new([]).expect("layout"),
        ))),
        sealed: Some(Arc::new(fedcore::SealedTensors::new(
            Arc::new(
                fedcore::Layout::new([fedcore::TensorSpec::new(DISTANCES_TENSOR, [entries])])
                    .expect("layout"),
            ),
            bytes,
        ))),
        metrics: [(POINTS_METRIC.to_owned(), points)].into(),
        max_reply_bytes: 1 << 20,
    };
    let sent = ClientUpdate::new(
        ClientId::new("h"),
        1,
        1,
        Parameters::zeros(Arc::new(fedcore::Layout::new([]).expect("layout"))),
    );
    let mut d = DistanceDecryptor::new(secret.clone()).expect("decryptor");
    let distances = public.squared_distances(&refs).expect("distances");
    let ok = d
        .respond(&step(distances.to_bytes().expect("bytes"), 3, 3.0), &sent)
        .expect("answer");
    // ||x_i - x_j||^2 = 100 (i - j)^2.
    let got = ok.values.as_slice();
    for (g, want) in got.iter().zip([100.0, 400.0, 100.0]) {
        assert!((g - want).abs() < 1e-3, "{got:?}");
    }
    // Once per round.
    let again = d
        .respond(&step(distances.to_bytes().expect("bytes"), 3, 3.0), &sent)
        .expect_err("a second answer in round 1");
    assert!(again.to_string().contains("once per round"), "{again}");
    // Every key holder floods the same ciphertexts with the same noise, so
    // asking several gives no fresh samples; without flooding the answer
    // differs (the noise is there).
    let bytes = distances.to_bytes().expect("bytes");
    let other = DistanceDecryptor::new(secret.clone())
        .expect("decryptor")
        .respond(&step(bytes.clone(), 3, 3.0), &sent)
        .expect("answer");
    assert_eq!(other.values, ok.values);
    let plain = DistanceDecryptor::new(secret.clone())
        .expect("decryptor")
        .with_flooding(0.0)
        .expect("no flooding")
        .respond(&step(bytes, 3, 3.0), &sent)
        .expect("answer");
    assert_ne!(plain.values, ok.values);
    assert!(
        DistanceDecryptor::new(secret.clone())
            .expect("decryptor")
            .with_flooding(0.1)
            .is_err()
    );
    let mut d = DistanceDecryptor::new(secret.clone()).expect("decryptor");
    let inner = public.inner_products(&refs).expect("gram");
    let err = d
        .respond(&step(inner.to_bytes().expect("bytes"), 3, 3.0), &sent)
        .expect_err("inner products refused");
    assert!(err.to_string().contains("inner products"), "{err}");
    let bytes = distances.to_bytes().expect("bytes");
    for (entries, points) in [(3, 4.0), (3, 2.5), (3, 1000.0), (4, 3.0)] {
        assert!(
            d.respond(&step(bytes.clone(), entries, points), &sent)
                .is_err(),
            "{entries} entries, {points} points"
        );
    }
}

#[test]
fn the_strategy_needs_evaluation_keys() {
    let err = EncryptedMedian::new(keys().0.public()).expect_err("no evaluation keys");
    assert!(err.to_string().contains("evaluation keys"), "{err}");
}

#[test]
fn the_flooding_floor_is_far_above_ckks_error_on_distances_of_known_values() {
    // What a server that encrypted known values itself would see of CKKS's
    // error without flooding: the distances of encryptions of zeros, and
    // of a vector from itself.
    let (secret, public) = keys();
    let zeros = vec![0.0; 4096 * 4];
    let parts: Vec<_> = (0..3)
        .map(|_| {
            public
                .load(
                    &secret.encrypt_compact(&zeros).expect("encrypt"),
                    Form::Fresh,
                )
                .expect("load")
        })
        .collect();
    let refs: Vec<_> = parts.iter().collect();
    let d = secret
        .decrypt_gram(&public.squared_distances(&refs).expect("distances"))
        .expect("decrypt");
    let worst = d.iter().fold(0f64, |m, v| m.max(v.abs()));
    eprintln!("CKKS error on the distances of encryptions of zeros: {worst:e}");
    assert!(worst < fedcore_he::FLOODING_FLOOR / 1e3, "{worst:e}");
}
