//! The CKKS-sealed head over the network transport: ciphertexts travel as
//! bytes over gRPC with mutual TLS, and the run ends where the same run over
//! the in-memory transport ends.

use std::sync::OnceLock;
use std::time::Duration;

use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
use fedcore::memory::InMemoryTransport;
use fedcore::net::provision::{Kit, Project, ProjectSpec};
use fedcore::net::{self, ClientOptions, GrpcTransport, ServerOptions};
use fedcore::{Model, ModelClient, ProtectionKind, Server, ServerConfig, Transport};
use fedcore_he::{
    CkksContext, CkksParams, CkksSealer, CkksSum, DistanceDecryptor, EncryptedMedian, Form,
    KeyAuthority, Public, Secret, SlotPacking,
};
use fedcore_robust::GeometricMedian;

const HEAD: &str = "linear.weight";
const DIM: usize = 12;
const CLASSES: usize = 3;
const SITES: [&str; 3] = ["hospital-1", "hospital-2", "hospital-3"];

fn keys() -> &'static CkksContext<Secret> {
    static CTX: OnceLock<CkksContext<Secret>> = OnceLock::new();
    CTX.get_or_init(|| CkksContext::generate(CkksParams::default()).expect("keygen"))
}

fn site_client(i: usize) -> ModelClient<SoftmaxRegression> {
    let data = synthetic_blobs((1 << 16) + i as u64, 120, DIM, CLASSES, 3.0);
    ModelClient::new(SITES[i], SoftmaxRegression::new(DIM, CLASSES), data)
        .with_sealer(CkksSealer::new(keys().clone()))
}

fn config() -> ServerConfig {
    ServerConfig {
        rounds: 3,
        min_fit_clients: 3,
        min_available_clients: 3,
        round_timeout: Duration::from_secs(60),
        ..ServerConfig::default()
    }
}

/// The opened head and the body after the run.
fn finish<T: Transport>(server: &Server<T, GeometricMedian>) -> (Vec<f64>, Vec<f32>) {
    let sealed = server.sealed_global().expect("sealed");
    let head = keys()
        .decrypt(&keys().load(sealed.bytes(), Form::Sum).expect("load"))
        .expect("decrypt");
    let body = server
        .global()
        .tensor("linear.bias")
        .expect("bias")
        .to_vec();
    (head, body)
}

#[test]
fn a_sealed_run_over_mutual_tls_matches_the_in_memory_run() {
    let initial = SoftmaxRegression::new(DIM, CLASSES).parameters();

    let mut memory = InMemoryTransport::new();
    for i in 0..3 {
        memory.add_client(site_client(i)).expect("add");
    }
    let mut reference = Server::new(
        config(),
        initial.clone(),
        memory,
        GeometricMedian::default(),
    )
    .expect("server")
    .with_sealing(&[HEAD], CkksSum::new(keys().public()))
    .expect("sealing");
    reference.run().expect("in-memory run");

    let tmp = tempfile::tempdir().expect("tmp");
    let spec = ProjectSpec::new("he", SITES.iter().map(|s| s.to_string()).collect(), 0);
    let project = Project::create(tmp.path().join("project"), &spec).expect("provision");
    let options = ServerOptions {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        ..ServerOptions::default()
    };
    let transport = GrpcTransport::start(&Kit::load(project.server_kit()).expect("kit"), options)
        .expect("listen");
    let address = transport.local_addr().to_string();
    let sites: Vec<_> = (0..3)
        .map(|i| {
            let kit = Kit::load(project.site_kit(SITES[i])).expect("kit");
            let options = ClientOptions {
                address: Some(address.clone()),
                ..ClientOptions::default()
            };
            std::thread::spawn(move || net::run_client(&kit, site_client(i), &options))
        })
        .collect();
    let mut server = Server::new(config(), initial, transport, GeometricMedian::default())
        .expect("server")
        .with_sealing(&[HEAD], CkksSum::new(keys().public()))
        .expect("sealing");
    net::run_server(
        &mut server,
        &fedcore::RunPolicy::deployment(Duration::from_secs(60)),
    )
    .expect("network run");
    for s in sites {
        s.join().expect("site thread").expect("site finished");
    }

    for r in server.history() {
        assert_eq!(r.accepted.len(), 3, "round {}: {:?}", r.round, r.failures);
        assert!(r.accepted.iter().all(|a| {
            a.provenance
                .iter()
                .any(|p| p.kind == ProtectionKind::Encryption)
        }));
    }
    let (head, body) = finish(&server);
    let (want_head, want_body) = finish(&reference);
    let diff = head
        .iter()
        .zip(&want_head)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-4, "head differs by {diff:e}");
    assert!(want_head.iter().any(|v| v.abs() > 1e-3), "the head trained");
    for (a, b) in body.iter().zip(&want_body) {
        assert!((a - b).abs() < 1e-3, "body {a} vs {b}");
    }
}

#[test]
fn the_key_authority_writes_its_keys_into_the_startup_kits() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec = ProjectSpec::new("he", vec!["a".into(), "b".into()], 0);
    let project = Project::create(tmp.path(), &spec).expect("provision");
    let sites = [project.site_kit("a"), project.site_kit("b")];
    let ctx = KeyAuthority::write_kits(CkksParams::default(), &project.server_kit(), &sites)
        .expect("write keys");
    use std::os::unix::fs::PermissionsExt;
    for s in &sites {
        let file = s.join(KeyAuthority::SECRET_FILE);
        let mode = std::fs::metadata(&file)
            .expect("secret file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let site = CkksContext::<Secret>::from_file(&file).expect("site keys");
        let v = ctx.encrypt(&[1.5, -2.0]).expect("encrypt");
        let got = site.decrypt(&v).expect("decrypt");
        assert!((got[0] - 1.5).abs() < 1e-6 && (got[1] + 2.0).abs() < 1e-6);
    }
    let server = project.server_kit().join(KeyAuthority::PUBLIC_FILE);
    CkksContext::<Public>::from_file(&server).expect("server keys");
    assert!(
        !project
            .server_kit()
            .join(KeyAuthority::SECRET_FILE)
            .exists(),
        "no secret on the server"
    );
    let evaluation = project.server_kit().join(KeyAuthority::EVALUATION_FILE);
    CkksContext::<Public>::from_file(&server)
        .expect("server keys")
        .with_evaluation_key_file(&evaluation)
        .expect("evaluation keys");
    // Keys are created once.
    assert!(
        KeyAuthority::write_kits(CkksParams::default(), &project.server_kit(), &sites).is_err()
    );
}

/// A site that seals its whole update and answers the distance step.
fn median_site(i: usize, secret: &CkksContext<Secret>) -> ModelClient<SoftmaxRegression> {
    let data = synthetic_blobs((1 << 17) + i as u64, 120, DIM, CLASSES, 3.0);
    ModelClient::new(SITES[i], SoftmaxRegression::new(DIM, CLASSES), data)
        .with_sealer(CkksSealer::new(secret.clone()))
        .with_responder(DistanceDecryptor::new(secret.clone()).expect("decryptor"))
}

fn opened<T: Transport>(
    server: &Server<T, EncryptedMedian>,
    secret: &CkksContext<Secret>,
) -> Vec<f64> {
    let sealed = server.sealed_global().expect("sealed");
    secret
        .decrypt(&secret.load(sealed.bytes(), Form::Sum).expect("load"))
        .expect("decrypt")
}

#[test]
fn the_encrypted_median_over_mutual_tls_with_server_keys_from_its_kit_matches_in_memory() {
    let tmp = tempfile::tempdir().expect("tmp");
    let spec = ProjectSpec::new("he", SITES.iter().map(|s| s.to_string()).collect(), 0);
    let project = Project::create(tmp.path().join("project"), &spec).expect("provision");
    let site_kits: Vec<_> = SITES.iter().map(|s| project.site_kit(s)).collect();
    KeyAuthority::write_kits(CkksParams::default(), &project.server_kit(), &site_kits)
        .expect("keys");
    // The server's keys come from its kit alone: a public context (no
    // secret key in the kit, no decrypt method on the type) and the
    // evaluation keys.
    let server_kit = project.server_kit();
    assert!(!server_kit.join(KeyAuthority::SECRET_FILE).exists());
    let public = CkksContext::<Public>::from_file(&server_kit.join(KeyAuthority::PUBLIC_FILE))
        .expect("public context")
        .with_evaluation_key_file(&server_kit.join(KeyAuthority::EVALUATION_FILE))
        .expect("evaluation keys");
    let secret = CkksContext::<Secret>::from_file(&site_kits[0].join(KeyAuthority::SECRET_FILE))
        .expect("site keys");
    let initial = SoftmaxRegression::new(DIM, CLASSES).parameters();
    fn make<T: Transport>(
        t: T,
        public: &CkksContext<Public>,
        initial: &fedcore::Parameters,
    ) -> Server<T, EncryptedMedian> {
        Server::new(
            config(),
            initial.clone(),
            t,
            EncryptedMedian::new(public.clone()).expect("strategy"),
        )
        .expect("server")
        .with_sealing(
            &["*"],
            CkksSum::new(public.clone()).with_slot_packing(SlotPacking::Real),
        )
        .expect("seal everything")
    }

    let mut memory = InMemoryTransport::new();
    for i in 0..3 {
        memory.add_client(median_site(i, &secret)).expect("add");
    }
    let mut reference = make(memory, &public, &initial);
    reference.run().expect("in-memory run");

    let options = ServerOptions {
        listen: Some("127.0.0.1:0".parse().expect("addr")),
        ..ServerOptions::default()
    };
    let transport =
        GrpcTransport::start(&Kit::load(&server_kit).expect("kit"), options).expect("listen");
    let address = transport.local_addr().to_string();
    let sites: Vec<_> = (0..3)
        .map(|i| {
            let kit = Kit::load(project.site_kit(SITES[i])).expect("kit");
            let secret = CkksContext::<Secret>::from_file(&kit.dir.join(KeyAuthority::SECRET_FILE))
                .expect("site keys");
            let options = ClientOptions {
                address: Some(address.clone()),
                ..ClientOptions::default()
            };
            std::thread::spawn(move || net::run_client(&kit, median_site(i, &secret), &options))
        })
        .collect();
    let mut server = make(transport, &public, &initial);
    net::run_server(
        &mut server,
        &fedcore::RunPolicy::deployment(Duration::from_secs(60)),
    )
    .expect("network run");
    for s in sites {
        s.join().expect("site thread").expect("site finished");
    }

    assert_eq!(server.history().len(), 3);
    for r in server.history() {
        assert!(
            r.outcome.is_completed(),
            "round {}: {:?}",
            r.round,
            r.failures
        );
        assert_eq!(r.accepted.len(), 3, "round {}: {:?}", r.round, r.failures);
        assert!(r.aggregator.starts_with("encrypted-geometric-median"));
        assert!(r.accepted.iter().all(|a| a.trust.is_some()));
    }
    // Nothing travels in the clear: every update's clear part is empty.
    for r in server.history() {
        assert!(
            r.accepted.iter().all(|a| a.update_norm == 0.0),
            "{:?}",
            r.accepted
        );
    }
    let (got, want) = (opened(&server, &secret), opened(&reference, &secret));
    let top = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(top > 1e-3, "the model trained");
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-4 * top, "global differs by {diff:e}");
}
