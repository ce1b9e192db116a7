//! The network transport in one process: tasks and replies of any size
//! stream in chunks over mutual TLS, bit-exactly; a payload declared over
//! the limit closes only the session that declared it.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions
#![cfg(feature = "net")]

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use fedcore::net::provision::{Kit, Project, ProjectSpec, provision};
use fedcore::net::{self, ClientOptions, GrpcTransport, ServerOptions, open_session, proto};
use fedcore::{
    Client, ClientId, ClientUpdate, Envelope, EvaluateIns, Evaluation, Failure, FitIns, Layout,
    Parameters, Reply, SealedTensors, Task, TensorSpec, TrainConfig, Transport,
};

/// Sends back `2 * global` as its update, and the sealed bytes reversed.
struct Doubler(ClientId);

impl Client for Doubler {
    fn id(&self) -> &ClientId {
        &self.0
    }

    fn fit(&mut self, ins: &FitIns) -> fedcore::Result<ClientUpdate> {
        let values = ins.parameters.as_slice().iter().map(|v| v * 2.0).collect();
        let mut u = ClientUpdate::new(
            self.0.clone(),
            ins.round,
            10,
            ins.parameters.with_values(values)?,
        );
        if let Some(s) = &ins.sealed {
            let mut bytes = s.bytes().to_vec();
            bytes.reverse();
            u.sealed = Some(SealedTensors::new(s.layout().clone(), bytes));
        }
        Ok(u)
    }

    fn evaluate(&mut self, _: &EvaluateIns) -> fedcore::Result<Evaluation> {
        Ok(Evaluation {
            loss: 0.5,
            num_examples: 3,
            metrics: Default::default(),
        })
    }
}

struct Setup {
    _tmp: tempfile::TempDir,
    project: Project,
    transport: GrpcTransport,
    sites: Vec<JoinHandle<fedcore::Result<()>>>,
}

fn client_options(transport: &GrpcTransport) -> ClientOptions {
    ClientOptions {
        address: Some(transport.local_addr().to_string()),
        give_up_after: Some(Duration::from_secs(20)),
        ..ClientOptions::default()
    }
}

fn setup(sites: &[&str], serving: &[&str]) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let spec = ProjectSpec::new("test", sites.iter().map(|s| s.to_string()).collect(), 0);
    let project = provision(tmp.path().join("p"), &spec).unwrap();
    let options = ServerOptions {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ..ServerOptions::default()
    };
    let transport =
        GrpcTransport::start(&Kit::load(project.server_kit()).unwrap(), options).unwrap();
    let sites = serving
        .iter()
        .map(|s| {
            let kit = Kit::load(project.site_kit(s)).unwrap();
            let options = client_options(&transport);
            let id = ClientId::new(*s);
            std::thread::spawn(move || net::run_client(&kit, Doubler(id), &options))
        })
        .collect();
    assert_eq!(
        transport.wait_for_clients(serving.len(), Duration::from_secs(20)),
        serving.len()
    );
    Setup {
        _tmp: tmp,
        project,
        transport,
        sites,
    }
}

fn finish(mut s: Setup) {
    s.transport.shutdown("done", true, Duration::from_secs(5));
    for h in s.sites {
        h.join().unwrap().unwrap();
    }
}

fn fit(round: u64, params: Arc<Parameters>, sealed: Option<Arc<SealedTensors>>) -> Task {
    Task::Fit(FitIns {
        round,
        parameters: params,
        config: TrainConfig::default(),
        sealed,
    })
}

fn collect(rx: &mpsc::Receiver<Envelope>, n: usize) -> Vec<Envelope> {
    (0..n)
        .map(|_| rx.recv_timeout(Duration::from_secs(120)).expect("a reply"))
        .collect()
}

/// A model of `n` parameters in a few tensors, with distinct values.
fn model(n: usize) -> Parameters {
    let a = n / 2;
    Parameters::from_tensors([
        (
            "features.weight",
            vec![a],
            (0..a).map(|i| (i % 1000) as f32 * 1e-3).collect::<Vec<_>>(),
        ),
        (
            "classifier.weight",
            vec![n - a],
            (0..n - a).map(|i| -((i % 997) as f32)).collect(),
        ),
    ])
    .unwrap()
}

fn check_doubled(env: Envelope, global: &Parameters) {
    let Ok(Reply::Fit(u)) = env.reply else {
        panic!("{}: {:?}", env.client, env.reply.err())
    };
    assert_eq!(u.client, env.client);
    assert_eq!(u.values.layout().tensors(), global.layout().tensors());
    assert!(
        u.values
            .as_slice()
            .iter()
            .zip(global.as_slice())
            .all(|(a, b)| a.to_bits() == (b * 2.0).to_bits())
    );
}

#[test]
fn seven_and_a_hundred_million_parameters_stream_bit_exactly() {
    let mut s = setup(&["a", "b"], &["a", "b"]);
    for n in [7_000_000, 100_000_000] {
        let global = Arc::new(model(n));
        let (tx, rx) = mpsc::channel();
        for c in ["a", "b"] {
            s.transport
                .send(&ClientId::new(c), fit(1, global.clone(), None), tx.clone())
                .unwrap();
        }
        for env in collect(&rx, 2) {
            check_doubled(env, &global);
        }
    }
    finish(s);
}

#[test]
fn sealed_bytes_and_evaluations_travel_intact() {
    let mut s = setup(&["a"], &["a"]);
    let head = Arc::new(Layout::new([TensorSpec::new("classifier.weight", vec![4])]).unwrap());
    let bytes: Vec<u8> = (0..=255u8).cycle().take(3 << 20).collect();
    let sealed = Arc::new(SealedTensors::new(head, bytes.clone()));
    let global = Arc::new(model(1000));
    let (tx, rx) = mpsc::channel();
    let a = ClientId::new("a");
    s.transport
        .send(&a, fit(4, global.clone(), Some(sealed)), tx.clone())
        .unwrap();
    s.transport
        .send(
            &a,
            Task::Evaluate(EvaluateIns {
                round: 4,
                parameters: global,
                sealed: None,
            }),
            tx,
        )
        .unwrap();
    let mut replies = collect(&rx, 2).into_iter();
    let Ok(Reply::Fit(u)) = replies.next().unwrap().reply else {
        panic!("fit reply")
    };
    let mut want = bytes;
    want.reverse();
    assert_eq!(u.round, 4);
    assert_eq!(u.sealed.unwrap().bytes(), &want[..]);
    let Ok(Reply::Evaluate(e)) = replies.next().unwrap().reply else {
        panic!("evaluate reply")
    };
    assert_eq!((e.loss, e.num_examples), (0.5, 3));
    finish(s);
}

#[test]
fn a_reply_declared_over_the_payload_limit_closes_only_its_session() {
    let mut s = setup(&["good", "rogue"], &["good"]);
    let kit = Kit::load(s.project.site_kit("rogue")).unwrap();
    let options = client_options(&s.transport);
    let (ready_tx, ready_rx) = mpsc::channel();
    let rogue = std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move {
                let (tx, mut inbound) = open_session(&kit, &options).await.unwrap();
                let msg = |k| proto::ClientMessage { kind: Some(k) };
                ready_tx.send(()).unwrap();
                while let Ok(Some(m)) = inbound.message().await {
                    if let Some(proto::server_message::Kind::Task(t)) = m.kind {
                        // 2^31 values = 8 GiB: over what a reply to this task
                        // may be (twice its payload + 1 MiB), refused before
                        // anything is allocated.
                        let header = proto::ReplyHeader {
                            task_id: t.task_id,
                            kind: proto::TaskKind::Fit as i32,
                            meta_json: "{}".into(),
                            layout: vec![proto::TensorSpec {
                                name: "w".into(),
                                shape: vec![1 << 31],
                            }],
                            sealed: None,
                        };
                        tx.send(msg(proto::client_message::Kind::Reply(header)))
                            .await
                            .unwrap();
                    }
                }
            })
    });
    ready_rx.recv().unwrap();
    assert_eq!(s.transport.wait_for_clients(2, Duration::from_secs(10)), 2);
    let global = Arc::new(model(10));
    let (tx, rx) = mpsc::channel();
    for c in ["good", "rogue"] {
        s.transport
            .send(&ClientId::new(c), fit(1, global.clone(), None), tx.clone())
            .unwrap();
    }
    let mut replies = collect(&rx, 2);
    replies.sort_by(|a, b| a.client.cmp(&b.client));
    check_doubled(replies.remove(0), &global);
    let rogue_reply = replies.remove(0);
    assert_eq!(rogue_reply.client.as_str(), "rogue");
    let Err(Failure::Disconnected(reason)) = rogue_reply.reply else {
        panic!("rogue not refused")
    };
    assert!(reason.contains("exceeds the limit"), "{reason}");
    rogue.join().unwrap();
    assert_eq!(s.transport.clients(), [ClientId::new("good")]);
    // The good site keeps working.
    let (tx, rx) = mpsc::channel();
    s.transport
        .send(&ClientId::new("good"), fit(2, global.clone(), None), tx)
        .unwrap();
    check_doubled(collect(&rx, 1).remove(0), &global);
    finish(s);
}

#[test]
fn revoking_a_connected_site_closes_its_session_and_it_stops() {
    let mut s = setup(&["a", "b"], &["a", "b"]);
    assert_eq!(s.project.revoke_site("a").unwrap(), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s.transport.clients().len() != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(s.transport.clients(), [ClientId::new("b")]);
    let a = s.sites.remove(0).join().unwrap();
    let err = a.unwrap_err().to_string();
    assert!(
        err.contains("refused by the server") && err.contains("revoked"),
        "{err}"
    );
    // `b` is unaffected.
    let global = Arc::new(model(100));
    let (tx, rx) = mpsc::channel();
    s.transport
        .send(&ClientId::new("b"), fit(1, global.clone(), None), tx)
        .unwrap();
    check_doubled(collect(&rx, 1).remove(0), &global);
    finish(s);
}

#[test]
fn payloads_over_the_limit_are_refused_on_either_side() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = ProjectSpec::new("test", vec!["a".into()], 0);
    let project = provision(tmp.path().join("p"), &spec).unwrap();
    let limit = |bytes| fedcore::net::Limits {
        max_payload_bytes: bytes,
        ..Default::default()
    };
    let options = ServerOptions {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        limits: limit(3 << 20),
        ..ServerOptions::default()
    };
    let mut transport =
        GrpcTransport::start(&Kit::load(project.server_kit()).unwrap(), options).unwrap();
    let kit = Kit::load(project.site_kit("a")).unwrap();
    let copts = ClientOptions {
        limits: limit(1 << 20),
        backoff_initial: Duration::from_millis(50),
        ..client_options(&transport)
    };
    let site =
        std::thread::spawn(move || net::run_client(&kit, Doubler(ClientId::new("a")), &copts));
    assert_eq!(transport.wait_for_clients(1, Duration::from_secs(20)), 1);
    let a = ClientId::new("a");
    // Over the server's limit (4 MB > 3 MiB): not sent at all.
    let (tx, _rx) = mpsc::channel();
    let err = transport
        .send(&a, fit(1, Arc::new(model(1_000_000)), None), tx)
        .unwrap_err();
    assert!(
        err.to_string().contains("exceeds the payload limit"),
        "{err}"
    );
    // Under the server's, over the client's (2 MB > 1 MiB): the client
    // refuses it before allocating and the task fails as a dropout.
    let (tx, rx) = mpsc::channel();
    transport
        .send(&a, fit(1, Arc::new(model(500_000)), None), tx)
        .unwrap();
    let Err(Failure::Disconnected(reason)) = collect(&rx, 1).remove(0).reply else {
        panic!("the client accepted a task over its limit")
    };
    assert!(!reason.is_empty());
    // The client reconnects; a task within both limits goes through.
    let small = Arc::new(model(1000));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let reply = loop {
        let (tx, rx) = mpsc::channel();
        if transport.send(&a, fit(2, small.clone(), None), tx).is_ok()
            && let Ok(env) = rx.recv_timeout(Duration::from_secs(20))
            && env.reply.is_ok()
        {
            break env;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the client did not come back"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    check_doubled(reply, &small);
    transport.shutdown("done", true, Duration::from_secs(5));
    site.join().unwrap().unwrap();
}
