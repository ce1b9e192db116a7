//! End to end with the core orchestrator: the head sealed with CKKS, the
//! body aggregated in the clear by a robust aggregator, the encrypted head
//! summed with the aggregator's weights.

use std::sync::{Arc, Mutex, OnceLock};

use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
use fedcore::memory::InMemoryTransport;
use fedcore::{
    Client, ClientId, EvaluateIns, Failure, FitIns, Layout, Model, ModelClient, Rejection,
    SealedTensors, Sealer, Server, ServerConfig,
};
use fedcore_he::{CkksContext, CkksParams, CkksSealer, CkksSum, Form, Secret, SlotPacking};
use fedcore_robust::GeometricMedian;

const HEAD: &str = "linear.weight";
const DIM: usize = 20;
const CLASSES: usize = 4;

fn keys() -> &'static CkksContext<Secret> {
    static CTX: OnceLock<CkksContext<Secret>> = OnceLock::new();
    CTX.get_or_init(|| CkksContext::generate(CkksParams::default()).expect("keygen"))
}

/// The plaintext a client sealed, per round, so the test can compute the
/// expected global head.
type Log = Arc<Mutex<Vec<Vec<f32>>>>;

struct Recording {
    inner: CkksSealer,
    log: Log,
}

impl Sealer for Recording {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn open(&self, sealed: &SealedTensors) -> fedcore::Result<Vec<f32>> {
        self.inner.open(sealed)
    }
    fn seal(&self, global: &SealedTensors, values: &[f32]) -> fedcore::Result<SealedTensors> {
        self.log.lock().expect("lock").push(values.to_vec());
        self.inner.seal(global, values)
    }
}

/// A client that sends bytes that are not a ciphertext.
struct Garbage;

impl Sealer for Garbage {
    fn name(&self) -> String {
        "garbage".into()
    }
    fn open(&self, sealed: &SealedTensors) -> fedcore::Result<Vec<f32>> {
        CkksSealer::new(keys().clone()).open(sealed)
    }
    fn seal(&self, global: &SealedTensors, values: &[f32]) -> fedcore::Result<SealedTensors> {
        let mut bytes = CkksSealer::new(keys().clone())
            .seal(global, values)?
            .bytes()
            .to_vec();
        let n = bytes.len();
        bytes[n / 2..].iter_mut().for_each(|b| *b = !*b);
        Ok(SealedTensors::new(global.layout().clone(), bytes))
    }
}

/// A client that seals one value per slot whatever the global's packing.
struct OnePerSlot;

impl Sealer for OnePerSlot {
    fn name(&self) -> String {
        "one-per-slot".into()
    }
    fn open(&self, sealed: &SealedTensors) -> fedcore::Result<Vec<f32>> {
        CkksSealer::new(keys().clone()).open(sealed)
    }
    fn seal(&self, global: &SealedTensors, values: &[f32]) -> fedcore::Result<SealedTensors> {
        let v: Vec<f64> = values.iter().map(|&x| f64::from(x)).collect();
        let bytes = keys().encrypt_compact(&v).map_err(fedcore::Error::from)?;
        Ok(SealedTensors::new(global.layout().clone(), bytes))
    }
}

fn site(i: usize) -> ClientId {
    ClientId::new(format!("hospital-{i}"))
}

fn transport(logs: &[Log], garbage: bool) -> InMemoryTransport {
    let mut t = InMemoryTransport::new();
    for (i, log) in logs.iter().enumerate() {
        let data = synthetic_blobs(10 + i as u64, 150, DIM, CLASSES, 3.0);
        let client = ModelClient::new(site(i), SoftmaxRegression::new(DIM, CLASSES), data)
            .with_sealer(Recording {
                inner: CkksSealer::new(keys().clone()),
                log: log.clone(),
            });
        t.add_client(client).expect("add client");
    }
    if garbage {
        let data = synthetic_blobs(99, 150, DIM, CLASSES, 3.0);
        let client = ModelClient::new(site(9), SoftmaxRegression::new(DIM, CLASSES), data)
            .with_sealer(Garbage);
        t.add_client(client).expect("add client");
    }
    t
}

fn initial() -> fedcore::Parameters {
    let mut m = SoftmaxRegression::new(DIM, CLASSES);
    let mut p = m.parameters();
    // A non-zero head, so that sealing the initial values matters.
    for (i, v) in p.tensor_mut(HEAD).expect("head").iter_mut().enumerate() {
        *v = ((i % 7) as f32 - 3.0) * 0.01;
    }
    m.set_parameters(&p).expect("set");
    m.parameters()
}

/// A server over `t` with the geometric median and `HEAD` sealed.
fn sealed_server(
    config: ServerConfig,
    initial: fedcore::Parameters,
    t: InMemoryTransport,
) -> Server<InMemoryTransport, GeometricMedian> {
    sealed_server_with(config, initial, t, CkksSum::new(keys().public()))
}

/// [`sealed_server`] with `sum` as the sealed aggregator.
fn sealed_server_with(
    config: ServerConfig,
    initial: fedcore::Parameters,
    t: InMemoryTransport,
    sum: CkksSum,
) -> Server<InMemoryTransport, GeometricMedian> {
    Server::new(config, initial, t, GeometricMedian::default())
        .expect("server")
        .with_sealing(&[HEAD], sum)
        .expect("sealing")
}

/// The server resumed from `config`'s checkpoints with a default `CkksSum`;
/// its sealed global is `after_one`, the global after round 1.
fn resumed_sealed_server(
    config: ServerConfig,
    logs: &[Log],
    after_one: &[f64],
) -> Server<InMemoryTransport, GeometricMedian> {
    let server = Server::resume(
        config,
        initial(),
        transport(logs, false),
        GeometricMedian::default(),
    )
    .expect("resume")
    .with_sealing(&[HEAD], CkksSum::new(keys().public()))
    .expect("sealing from the checkpoint");
    assert!(max_diff(&open_global(&server), after_one) < 1e-9);
    server
}

/// How the server's sealed global packs its values.
fn global_packing(server: &Server<InMemoryTransport, GeometricMedian>) -> SlotPacking {
    let global = server.sealed_global().expect("sealed");
    fedcore_he::slot_packing_of(global.bytes()).expect("header")
}

fn open_global(server: &Server<InMemoryTransport, GeometricMedian>) -> Vec<f64> {
    let h = keys();
    let sealed = server.sealed_global().expect("sealed");
    h.decrypt(&h.load(sealed.bytes(), Form::Sum).expect("load"))
        .expect("decrypt")
}

#[test]
fn encrypted_head_follows_the_plaintext_weighted_mean_with_the_aggregators_weights() {
    let logs: Vec<Log> = (0..3).map(|_| Log::default()).collect();
    let config = ServerConfig {
        rounds: 2,
        min_fit_clients: 3,
        server_learning_rate: 0.8,
        ..ServerConfig::default()
    };
    let init = initial();
    let mut server = sealed_server(config, init.clone(), transport(&logs, false));

    // The server's plain copy of the head is zero; the sealed one is the initial head.
    assert!(
        server
            .global()
            .tensor(HEAD)
            .expect("head")
            .iter()
            .all(|&v| v == 0.0)
    );
    let mut expected: Vec<f64> = init
        .tensor(HEAD)
        .expect("head")
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let got = open_global(&server);
    assert!(max_diff(&got, &expected) < 1e-6);

    for round in 0..2 {
        let record = server.run_round().expect("round").clone();
        assert_eq!(record.accepted.len(), 3);
        assert!(record.aggregate_metrics.contains_key("sealed_sum_ms"));
        let weights: Vec<f64> = record.accepted.iter().map(|a| a.weight).collect();
        let total: f64 = weights.iter().sum();
        // Robust weights, not example counts: the geometric median's.
        for (i, a) in record.accepted.iter().enumerate() {
            assert_eq!(a.client, site(i));
            let delta = &logs[i].lock().expect("lock")[round];
            for (e, d) in expected.iter_mut().zip(delta) {
                *e += 0.8 * a.weight / total * f64::from(*d);
            }
        }
        let got = open_global(&server);
        let err = max_diff(&got, &expected);
        assert!(err < 1e-6, "round {}: max error {err:e}", round + 1);
        // Each client's sealed delta went into provenance; the body moved.
        assert!(
            record.accepted[0]
                .provenance
                .iter()
                .any(|p| p.kind == fedcore::ProtectionKind::Encryption
                    && p.mechanism.starts_with("ckks"))
        );
        assert!(
            server
                .global()
                .tensor(HEAD)
                .expect("head")
                .iter()
                .all(|&v| v == 0.0)
        );
    }
    assert_ne!(
        server.global().tensor("linear.bias").expect("bias"),
        init.tensor("linear.bias").expect("bias")
    );
}

#[test]
fn a_malformed_sealed_part_is_rejected_and_the_round_completes() {
    let logs: Vec<Log> = (0..3).map(|_| Log::default()).collect();
    let config = ServerConfig {
        rounds: 1,
        min_fit_clients: 3,
        ..ServerConfig::default()
    };
    let mut server = sealed_server(config, initial(), transport(&logs, true));
    let record = server.run_round().expect("round completes with the quorum");
    assert_sealed_part_rejected(record, &site(9), "malformed");
}

/// The round kept the three honest hospitals, and `client`'s sealed part
/// was rejected with `reason` in the detail.
fn assert_sealed_part_rejected(record: &fedcore::RoundRecord, client: &ClientId, reason: &str) {
    assert_eq!(record.accepted.len(), 3);
    let f = record
        .failures
        .iter()
        .find(|f| &f.client == client)
        .expect("the client is rejected");
    assert!(
        matches!(&f.reason, Failure::Rejected(Rejection::Sealed { detail }) if detail.contains(reason)),
        "{:?}",
        f.reason
    );
}

#[test]
fn a_part_packed_otherwise_than_the_global_is_rejected_and_the_round_completes() {
    let logs: Vec<Log> = (0..3).map(|_| Log::default()).collect();
    let config = ServerConfig {
        rounds: 1,
        min_fit_clients: 3,
        ..ServerConfig::default()
    };
    let mut t = transport(&logs, false);
    let data = synthetic_blobs(98, 150, DIM, CLASSES, 3.0);
    t.add_client(
        ModelClient::new(site(8), SoftmaxRegression::new(DIM, CLASSES), data)
            .with_sealer(OnePerSlot),
    )
    .expect("add client");
    let mut server = sealed_server(config, initial(), t);
    // CkksSum seals the global two values per slot by default.
    assert_eq!(global_packing(&server), SlotPacking::Complex);
    let record = server.run_round().expect("round completes with the quorum");
    assert_sealed_part_rejected(record, &site(8), "Real");
}

#[test]
fn a_checkpoint_sealed_one_value_per_slot_resumes_in_its_packing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs: Vec<Log> = (0..3).map(|_| Log::default()).collect();
    let config = ServerConfig {
        rounds: 2,
        min_fit_clients: 3,
        checkpoint_dir: Some(dir.path().join("checkpoints")),
        ..ServerConfig::default()
    };
    let after_one = {
        let mut server = sealed_server_with(
            config.clone(),
            initial(),
            transport(&logs, false),
            CkksSum::new(keys().public()).with_slot_packing(SlotPacking::Real),
        );
        server.run_round().expect("round 1");
        open_global(&server)
    };
    // Resumed by a server that would seal a new global two per slot: the
    // saved global keeps one per slot, the hospitals follow it, and the
    // round completes with every part accepted.
    let mut server = resumed_sealed_server(config, &logs, &after_one);
    let record = server.run_round().expect("round 2");
    assert_eq!(record.accepted.len(), 3, "{:?}", record.failures);
    assert_eq!(global_packing(&server), SlotPacking::Real);
}

#[test]
fn a_resumed_run_continues_from_the_saved_sealed_head() {
    let dir = tempfile::tempdir().expect("tempdir");
    let logs: Vec<Log> = (0..3).map(|_| Log::default()).collect();
    let config = ServerConfig {
        rounds: 2,
        min_fit_clients: 3,
        // A folder that does not exist yet: the first sealed checkpoint creates it.
        checkpoint_dir: Some(dir.path().join("run").join("checkpoints")),
        ..ServerConfig::default()
    };
    let after_one = {
        let mut server = sealed_server(config.clone(), initial(), transport(&logs, false));
        server.run_round().expect("round 1");
        open_global(&server)
    };
    let mut server = resumed_sealed_server(config, &logs, &after_one);
    server.run().expect("round 2");
    assert_eq!(server.history().len(), 2);
}

/// A client that attaches a sealed part although the run seals nothing.
struct Unasked(ModelClient<SoftmaxRegression>);

impl Client for Unasked {
    fn id(&self) -> &ClientId {
        self.0.id()
    }
    fn fit(&mut self, ins: &FitIns) -> fedcore::Result<fedcore::ClientUpdate> {
        let u = self.0.fit(ins)?;
        let layout = Arc::new(Layout::new([fedcore::TensorSpec::new("x", [3])])?);
        Ok(u.with_sealed(SealedTensors::new(layout, vec![1, 2, 3])))
    }
    fn evaluate(&mut self, ins: &EvaluateIns) -> fedcore::Result<fedcore::Evaluation> {
        self.0.evaluate(ins)
    }
}

#[test]
fn a_sealed_part_in_a_plain_run_is_rejected() {
    let mut t = InMemoryTransport::new();
    for i in 0..2 {
        let data = synthetic_blobs(i, 100, DIM, CLASSES, 3.0);
        let c = ModelClient::new(site(i as usize), SoftmaxRegression::new(DIM, CLASSES), data);
        if i == 0 {
            t.add_client(Unasked(c)).expect("add");
        } else {
            t.add_client(c).expect("add");
        }
    }
    let config = ServerConfig {
        rounds: 1,
        ..ServerConfig::default()
    };
    let mut server = Server::new(config, initial(), t, GeometricMedian::default()).expect("server");
    let record = server.run_round().expect("round");
    assert_eq!(record.accepted.len(), 1);
    assert!(
        matches!(&record.failures[0].reason, Failure::Rejected(Rejection::Sealed { detail }) if detail.contains("seals no tensors")),
        "{:?}",
        record.failures
    );
}

#[test]
fn a_client_without_the_key_fails_with_a_clear_error() {
    // A client without a key cannot even open the global head.
    let mut t = InMemoryTransport::new();
    for i in 0..2 {
        let data = synthetic_blobs(i, 100, DIM, CLASSES, 3.0);
        let mut c = ModelClient::new(site(i as usize), SoftmaxRegression::new(DIM, CLASSES), data);
        if i == 0 {
            c = c.with_sealer(CkksSealer::new(keys().clone()));
        }
        t.add_client(c).expect("add");
    }
    let config = ServerConfig {
        rounds: 1,
        min_fit_clients: 1,
        ..ServerConfig::default()
    };
    let mut server = sealed_server(config, initial(), t);
    let record = server.run_round().expect("round");
    assert_eq!(record.accepted.len(), 1);
    assert!(
        matches!(&record.failures[0].reason, Failure::ClientError(m) if m.contains("holds no key")),
        "{:?}",
        record.failures
    );
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}
