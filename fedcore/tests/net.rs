//! The network transport in one process: tasks and replies of any size
//! stream in chunks over mutual TLS, bit-exactly; a payload declared over
//! the limit closes only the session that declared it.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions
#![cfg(all(feature = "net", feature = "testkit"))]

mod common;

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::{Doubler, check_doubled};
use fedcore::linear::SoftmaxRegression;
use fedcore::net::provision::{Kit, Project, ProjectSpec};
use fedcore::net::{
    self, ClientOptions, GrpcTransport, ServerOptions, ShutdownKind,
    testkit::{self, open_session, proto},
};
use fedcore::{
    AggregationFailureKind, Client, ClientId, ClientUpdate, Envelope, EvaluateIns, Failure, FitIns,
    Layout, ModelClient, Parameters, Reply, RoundOutcome, RunEnd, RunPolicy, SealedTensors, Server,
    ServerConfig, Task, TensorSpec, TrainConfig, Transport,
};

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
    let clients = serving
        .iter()
        .map(|s| Box::new(Doubler(ClientId::new(*s))) as Box<dyn Client>)
        .collect();
    setup_clients(sites, clients)
}

/// A project of `sites`; `clients` (each a site) served over the network.
fn setup_clients(sites: &[&str], clients: Vec<Box<dyn Client>>) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let spec = ProjectSpec::new("test", sites.iter().map(|s| s.to_string()).collect(), 0);
    let project = Project::create(tmp.path().join("p"), &spec).unwrap();
    let options = ServerOptions {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        ..ServerOptions::default()
    };
    let transport =
        GrpcTransport::start(&Kit::load(project.server_kit()).unwrap(), options).unwrap();
    let serving = clients.len();
    let sites = clients
        .into_iter()
        .map(|client| {
            let kit = Kit::load(project.site_kit(client.id().as_str())).unwrap();
            let options = client_options(&transport);
            std::thread::spawn(move || net::run_client(&kit, client, &options))
        })
        .collect();
    let mut transport = transport;
    assert_eq!(
        transport.wait_for_clients(serving, Duration::from_secs(20)),
        serving
    );
    Setup {
        _tmp: tmp,
        project,
        transport,
        sites,
    }
}

fn finish(mut s: Setup) {
    s.transport
        .shutdown("done", ShutdownKind::Finished, Duration::from_secs(5));
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
        extra: None,
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
                            extra: None,
                            encoding: String::new(),
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
    let monitor = s.transport.monitor();
    let a_kit = Kit::load(s.project.site_kit("a")).unwrap();
    let sites = monitor.sites();
    assert_eq!(sites.len(), 2, "{sites:?}");
    let year = 300 * 24 * 3600 * 1000_i64; // certificates last a year
    for site in &sites {
        assert!(site.closed.is_none(), "{site:?}");
        assert_eq!(site.fingerprint.len(), 64);
        assert!(site.peer.as_deref().unwrap().starts_with("127.0.0.1:"));
        assert!(site.not_after_ms.unwrap() > site.connected_at_ms + year);
        assert!(site.last_seen_ms >= site.connected_at_ms);
    }
    assert_eq!(sites[0].fingerprint, a_kit.fingerprint().unwrap());
    assert!(monitor.refused_since(0).is_empty());
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
    // The monitor saw the session closed by the revocation, as a refusal.
    let sites = monitor.sites();
    let closed = sites[0].closed.as_ref().expect("a's session closed");
    assert!(closed.reason.contains("revoked"), "{closed:?}");
    assert!(sites[1].closed.is_none(), "{sites:?}");
    // (A client that saw its stream end before the refusal could retry
    // once: the closing refusal is the first.)
    let refused = monitor.refused_since(0);
    assert_eq!(
        (refused[0].identity.as_str(), refused[0].kind),
        ("a", net::RefusedKind::Revoked)
    );
    assert!(refused[0].closed_session, "{refused:?}");
    let seen = refused.last().unwrap().seq;
    // A new connection with the revoked certificate is refused and listed.
    let again = net::run_client(
        &a_kit,
        Box::new(Doubler(ClientId::new("a"))) as Box<dyn Client>,
        &client_options(&s.transport),
    );
    assert!(again.unwrap_err().to_string().contains("revoked"));
    let refused = monitor.refused_since(seen);
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(!refused[0].closed_session && refused[0].seq == seen + 1);
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
    let project = Project::create(tmp.path().join("p"), &spec).unwrap();
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
    transport.shutdown("done", ShutdownKind::Finished, Duration::from_secs(5));
    site.join().unwrap().unwrap();
}

fn softmax_client(site: &str, i: u64) -> ModelClient<SoftmaxRegression> {
    ModelClient::new(
        site,
        SoftmaxRegression::new(common::DIM, common::CLASSES),
        common::client_data(i),
    )
}

fn grpc_config(rounds: u64, quorum: usize) -> ServerConfig {
    ServerConfig {
        min_fit_clients: quorum,
        min_available_clients: quorum,
        ..common::config(rounds)
    }
}

/// The deployment's loop is the simulation's: an aggregator that fails in
/// round 2 leaves that round recorded as failed, and rounds 3 and 4 run.
#[test]
fn an_aggregator_failing_in_round_2_over_grpc_is_recorded_and_the_run_goes_on() {
    let sites = ["a", "b", "c"];
    let clients = sites
        .iter()
        .enumerate()
        .map(|(i, s)| Box::new(softmax_client(s, i as u64)) as Box<dyn Client>)
        .collect();
    let s = setup_clients(&sites, clients);
    let aggregator = common::FailsInRounds {
        rounds: vec![2],
        calls: 0,
    };
    let mut server = Server::new(
        grpc_config(4, 3),
        common::initial(),
        s.transport,
        aggregator,
    )
    .unwrap();
    let report =
        net::run_server(&mut server, &RunPolicy::deployment(Duration::from_secs(20))).unwrap();
    assert_eq!(report.end, RunEnd::Completed);
    assert_eq!((report.completed, report.failed), (3, 1));
    let outcomes: Vec<&RoundOutcome> = server.history().iter().map(|r| &r.outcome).collect();
    assert!(matches!(
        outcomes[..],
        [
            RoundOutcome::Completed,
            RoundOutcome::AggregationFailed(_),
            RoundOutcome::Completed,
            RoundOutcome::Completed
        ]
    ));
    let RoundOutcome::AggregationFailed(why) = &server.history()[1].outcome else {
        unreachable!()
    };
    assert_eq!(why.kind, AggregationFailureKind::InvalidWeights);
    assert!(server.history()[2..].iter().all(|r| r.accepted.len() == 3));
    // Every site heard that the run is complete and exited cleanly.
    for h in s.sites {
        h.join().unwrap().unwrap();
    }
}

/// SCAFFOLD over mutual TLS: the server's control variate travels with each
/// fit task and each client's variate change with its update; the run ends
/// on the in-memory run's model and variate bit for bit, then evaluates
/// every model on every site (cross-site evaluation) before it ends.
#[test]
fn scaffold_over_grpc_ends_where_the_in_memory_run_does() {
    let sites = ["a", "b", "c"];
    let scaffold_client = |i: usize| {
        softmax_client(sites[i], i as u64).with_control_variate(fedcore::ControlVariate::new())
    };
    let strategy =
        || fedcore::Scaffold::new(fedcore::FedAvg, common::initial().layout().clone(), 3).unwrap();
    let mut memory = fedcore::memory::InMemoryTransport::new();
    for i in 0..3 {
        memory.add_client(scaffold_client(i)).unwrap();
    }
    let mut local = Server::new(grpc_config(3, 3), common::initial(), memory, strategy()).unwrap();
    local.run().unwrap();

    let clients = (0..3)
        .map(|i| Box::new(scaffold_client(i)) as Box<dyn Client>)
        .collect();
    let s = setup_clients(&sites, clients);
    let config = ServerConfig {
        cross_site_evaluation: true,
        ..grpc_config(3, 3)
    };
    let mut server = Server::new(config, common::initial(), s.transport, strategy()).unwrap();
    let report =
        net::run_server(&mut server, &RunPolicy::deployment(Duration::from_secs(20))).unwrap();
    assert_eq!(report.end, RunEnd::Completed);
    assert_eq!(report.completed, 3);
    // Cross-site evaluation ran before the sites were sent home: the global
    // model and each site's local model on each site's data.
    let matrix = report.cross_site.expect("cross-site evaluation");
    assert_eq!((matrix.models.len(), matrix.sites.len()), (4, 3));
    assert!(matrix.failures.is_empty(), "{:?}", matrix.failures);
    assert!(matrix.cells.iter().flatten().all(Option::is_some));
    let bits = |p: &Parameters| p.as_slice().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(server.global()), bits(local.global()));
    assert_eq!(
        bits(server.aggregator().control()),
        bits(local.aggregator().control())
    );
    assert!(server.aggregator().control().l2_norm() > 0.0);
    for h in s.sites {
        h.join().unwrap().unwrap();
    }
}

/// Compressed uploads over mutual TLS: each site sends its update in int8
/// (a quarter of the float32 bytes plus a scale per tensor) and keeps its
/// error-feedback residual between rounds; the run ends on the in-memory
/// run's model bit for bit, and every record counts the encoded bytes.
#[test]
fn int8_uploads_over_grpc_end_where_the_in_memory_run_does() {
    let sites = ["a", "b", "c"];
    let config = || {
        let mut c = grpc_config(3, 3);
        c.train.upload = fedcore::Encoding::Int8;
        c
    };
    let mut memory = fedcore::memory::InMemoryTransport::new();
    for (i, site) in sites.iter().enumerate() {
        memory.add_client(softmax_client(site, i as u64)).unwrap();
    }
    let mut local = Server::new(config(), common::initial(), memory, fedcore::FedAvg).unwrap();
    local.run().unwrap();

    let clients = (0..3)
        .map(|i| Box::new(softmax_client(sites[i], i as u64)) as Box<dyn Client>)
        .collect();
    let s = setup_clients(&sites, clients);
    let mut server =
        Server::new(config(), common::initial(), s.transport, fedcore::FedAvg).unwrap();
    let report =
        net::run_server(&mut server, &RunPolicy::deployment(Duration::from_secs(20))).unwrap();
    assert_eq!(report.completed, 3);
    let bits = |p: &Parameters| p.as_slice().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(server.global()), bits(local.global()));
    // 40 + 4 values: (40 + 4) + (4 + 4) bytes against 176 in float32.
    for r in server.history() {
        assert_eq!(r.accepted.len(), 3);
        assert!(
            r.accepted.iter().all(|a| a.upload_bytes == 52),
            "{:?}",
            r.accepted
        );
    }
    for h in s.sites {
        h.join().unwrap().unwrap();
    }
}

/// A two-step round over gRPC: the strategy's second message reaches every
/// client through its session; site `c` is revoked while it works on the
/// second step, its session closes, and the round completes with `a` and
/// `b` (quorum 2), recording `c`'s failure in step 1.
#[test]
fn a_two_step_round_over_grpc_survives_a_client_dropping_between_the_steps() {
    let (asked_tx, asked_rx) = mpsc::channel::<()>();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let leaving = softmax_client("c", 2).with_responder(
        move |ins: &fedcore::StepIns, sent: &ClientUpdate| {
            let _ = asked_tx.send(());
            // Answers only once released, long after its session is gone.
            let _ = release_rx.recv_timeout(Duration::from_secs(60));
            common::residual(ins, sent)
        },
    );
    let clients: Vec<Box<dyn Client>> = vec![
        Box::new(softmax_client("a", 0).with_responder(common::residual)),
        Box::new(softmax_client("b", 1).with_responder(common::residual)),
        Box::new(leaving),
    ];
    let s = setup_clients(&["a", "b", "c"], clients);
    let project = s.project.clone();
    let revoker = std::thread::spawn(move || {
        asked_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("c is asked for the second step");
        project.revoke_site("c").unwrap();
    });
    let mut server = Server::new(
        grpc_config(2, 2),
        common::initial(),
        s.transport,
        common::Residuals,
    )
    .unwrap();
    let report =
        net::run_server(&mut server, &RunPolicy::deployment(Duration::from_secs(20))).unwrap();
    release_tx.send(()).unwrap();
    revoker.join().unwrap();
    assert_eq!(report.end, RunEnd::Completed);
    let first = &server.history()[0];
    assert_eq!(first.outcome, RoundOutcome::Completed);
    assert_eq!(first.sampled.len(), 3);
    let accepted: Vec<&str> = first.accepted.iter().map(|a| a.client.as_str()).collect();
    assert_eq!(accepted, ["a", "b"]);
    assert_eq!(first.failures.len(), 1);
    assert_eq!(first.failures[0].client.as_str(), "c");
    assert_eq!(first.failures[0].step, Some(1));
    assert!(
        matches!(first.failures[0].reason, Failure::Disconnected(_)),
        "{}",
        first.failures[0]
    );
    // The next round runs with the two sites left.
    let second = &server.history()[1];
    assert_eq!(second.outcome, RoundOutcome::Completed);
    assert_eq!(second.accepted.len(), 2);
    let mut sites = s.sites.into_iter();
    for h in sites.by_ref().take(2) {
        h.join().unwrap().unwrap();
    }
    let c = sites.next().unwrap().join().unwrap();
    assert!(c.unwrap_err().to_string().contains("revoked"));
}

#[test]
fn a_site_opening_many_sessions_holds_two_and_the_others_keep_working() {
    let mut s = setup(&["good", "greedy"], &["good"]);
    let kit = Kit::load(s.project.site_kit("greedy")).unwrap();
    let options = client_options(&s.transport);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Twenty session calls that never say hello: ten over one connection,
    // ten over connections of their own. Before the cap each waited out
    // its hello timeout holding a task, however many there were.
    let (refused, pending, held) = rt.block_on(async {
        let shared = testkit::connect(&kit, &options).await.unwrap();
        let mut calls = tokio::task::JoinSet::new();
        let mut held = Vec::new();
        for i in 0..20 {
            let mut grpc = if i < 10 {
                shared.clone()
            } else {
                testkit::connect(&kit, &options).await.unwrap()
            };
            let (tx, rx) = tokio::sync::mpsc::channel::<proto::ClientMessage>(1);
            held.push(tx);
            calls.spawn(async move {
                grpc.session(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map(|_| ())
                    .map_err(|s| s.code())
            });
        }
        let mut refused = 0;
        let deadline = tokio::time::sleep(Duration::from_secs(5));
        tokio::pin!(deadline);
        while refused < 18 {
            tokio::select! {
                r = calls.join_next() => match r {
                    // Over the site's cap; or over the connection's stream
                    // cap (the client opens streams before it has read the
                    // server's settings, and HTTP/2 refuses the extra ones).
                    Some(Ok(Err(tonic::Code::ResourceExhausted | tonic::Code::Unavailable))) => {
                        refused += 1;
                    }
                    other => panic!("a call ended otherwise: {other:?}"),
                },
                () = &mut deadline => break,
            }
        }
        (refused, calls.len(), held)
    });
    assert_eq!((refused, pending), (18, 2));
    // The good site is served as before.
    let global = Arc::new(model(100));
    let (tx, rx) = mpsc::channel();
    s.transport
        .send(&ClientId::new("good"), fit(1, global.clone(), None), tx)
        .unwrap();
    check_doubled(collect(&rx, 1).remove(0), &global);
    drop(held);
    drop(rt);
    finish(s);
}

#[test]
fn connections_are_capped_per_address_and_freed_when_they_close() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let spec = ProjectSpec::new("test", vec!["a".into()], 0);
    let project = Project::create(tmp.path().join("p"), &spec).unwrap();
    let options = ServerOptions {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        max_connections_per_address: 3,
        handshake_timeout: Duration::from_secs(30),
        ..ServerOptions::default()
    };
    let transport =
        GrpcTransport::start(&Kit::load(project.server_kit()).unwrap(), options).unwrap();
    let at = transport.local_addr();
    // Three sockets that never start TLS hold the address's places ...
    let held: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(at).unwrap())
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while transport.open_connections() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(transport.open_connections(), 3);
    // ... so a fourth is closed at once,
    let mut fourth = std::net::TcpStream::connect(at).unwrap();
    fourth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let _ = fourth.write_all(b"\x16\x03\x01\x00\x05hello");
    let mut buf = [0u8; 16];
    assert!(
        matches!(fourth.read(&mut buf), Ok(0) | Err(_)),
        "the fourth connection was served"
    );
    assert_eq!(transport.open_connections(), 3);
    // and once they close, a site connects.
    drop(held);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while transport.open_connections() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let kit = Kit::load(project.site_kit("a")).unwrap();
    let options = ClientOptions {
        address: Some(at.to_string()),
        ..ClientOptions::default()
    };
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { open_session(&kit, &options).await.map(|_| ()) })
        .unwrap();
}

/// The server asks a session only for an update encoding its client listed
/// in its hello: a client that lists none (built before encodings) is
/// asked for float32 when the round wants int8; one that lists int8 is
/// asked for int8.
#[test]
fn a_session_is_asked_only_for_encodings_its_client_listed() {
    let mut s = setup(&["old", "new"], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let open = |site: &str, encodings: Vec<String>| {
        let kit = Kit::load(s.project.site_kit(site)).unwrap();
        let options = client_options(&s.transport);
        rt.block_on(async move {
            let mut grpc = testkit::connect(&kit, &options).await.unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel::<proto::ClientMessage>(4);
            let hello = proto::Hello {
                identity: kit.info.identity.clone(),
                protocol: net::PROTOCOL,
                max_message_bytes: 4 << 20,
                holding: Vec::new(),
                encodings,
            };
            tx.send(proto::ClientMessage {
                kind: Some(proto::client_message::Kind::Hello(hello)),
            })
            .await
            .unwrap();
            let inbound = grpc
                .session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            (tx, inbound)
        })
    };
    let (_old_tx, mut old) = open("old", Vec::new());
    let (_new_tx, mut new) = open("new", vec!["f16".into(), "int8".into()]);
    assert_eq!(s.transport.wait_for_clients(2, Duration::from_secs(10)), 2);
    let global = Arc::new(model(10));
    let (tx, _rx) = mpsc::channel();
    for site in ["old", "new"] {
        let mut task = fit(1, global.clone(), None);
        if let Task::Fit(f) = &mut task {
            f.config.upload = fedcore::Encoding::Int8;
        }
        s.transport
            .send(&ClientId::new(site), task, tx.clone())
            .unwrap();
    }
    let asked = |inbound: &mut tonic::Streaming<proto::ServerMessage>| {
        rt.block_on(async {
            loop {
                let m = inbound.message().await.unwrap().unwrap();
                if let Some(proto::server_message::Kind::Task(t)) = m.kind {
                    let c: TrainConfig = serde_json::from_str(&t.train_config_json).unwrap();
                    return c.upload;
                }
            }
        })
    };
    assert_eq!(asked(&mut old), fedcore::Encoding::F32);
    assert_eq!(asked(&mut new), fedcore::Encoding::Int8);
    s.transport
        .shutdown("done", ShutdownKind::Finished, Duration::from_secs(1));
}

/// Opens a session by hand with `hello` (identity and protocol filled in);
/// returns where to send and the server's stream after its welcome, and
/// the welcome.
fn raw_session(
    rt: &tokio::runtime::Runtime,
    kit: &Kit,
    options: &ClientOptions,
    mut hello: proto::Hello,
) -> (
    tokio::sync::mpsc::Sender<proto::ClientMessage>,
    tonic::Streaming<proto::ServerMessage>,
    proto::Welcome,
) {
    hello.identity = kit.info.identity.clone();
    hello.protocol = net::PROTOCOL;
    rt.block_on(async move {
        let mut grpc = testkit::connect(kit, options).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel::<proto::ClientMessage>(64);
        tx.send(proto::ClientMessage {
            kind: Some(proto::client_message::Kind::Hello(hello)),
        })
        .await
        .unwrap();
        let mut inbound = grpc
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let Some(proto::server_message::Kind::Welcome(w)) =
            inbound.message().await.unwrap().unwrap().kind
        else {
            panic!("no welcome")
        };
        (tx, inbound, w)
    })
}

/// A reply cut after its header, before any of its payload: the site
/// reconnects holding the task, the server says it holds the header and 0
/// bytes, and the payload alone (no second header) completes the reply.
#[test]
fn a_reply_cut_after_its_header_resumes_from_byte_0_without_a_second_header() {
    let mut s = setup(&["h"], &[]);
    let kit = Kit::load(s.project.site_kit("h")).unwrap();
    let options = client_options(&s.transport);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx1, mut in1, _) = raw_session(&rt, &kit, &options, proto::Hello::default());
    assert_eq!(s.transport.wait_for_clients(1, Duration::from_secs(10)), 1);
    let global = Arc::new(model(1000));
    let (reply_tx, reply_rx) = mpsc::channel();
    s.transport
        .send(&ClientId::new("h"), fit(1, global.clone(), None), reply_tx)
        .unwrap();
    // The whole task arrives.
    let task_id = rt.block_on(async {
        let (mut id, mut got, mut total) = (0, 0u64, u64::MAX);
        while got < total {
            match in1.message().await.unwrap().unwrap().kind {
                Some(proto::server_message::Kind::Task(t)) => {
                    id = t.task_id;
                    total = 4000;
                }
                Some(proto::server_message::Kind::Chunk(c)) => got += c.data.len() as u64,
                _ => {}
            }
        }
        id
    });
    let values = global.as_slice().iter().map(|v| v * 2.0).collect();
    let update = ClientUpdate::new(
        ClientId::new("h"),
        1,
        10,
        global.with_values(values).unwrap(),
    );
    let (header, payload) = testkit::encode_reply(task_id, Reply::Fit(update)).unwrap();
    let msg = |k| proto::ClientMessage { kind: Some(k) };
    rt.block_on(tx1.send(msg(proto::client_message::Kind::Reply(header))))
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    drop((tx1, in1)); // the connection drops after the header
    let holding = vec![proto::Holding {
        task_id,
        received: 4000,
        complete: true,
    }];
    let hello = proto::Hello {
        holding,
        ..proto::Hello::default()
    };
    let (tx2, _in2, welcome) = raw_session(&rt, &kit, &options, hello);
    assert_eq!(
        welcome.resumed,
        [proto::Resumed {
            task_id,
            reply_received: Some(0)
        }]
    );
    let chunk = proto::Chunk {
        task_id,
        offset: 0,
        data: payload.into(),
    };
    rt.block_on(tx2.send(msg(proto::client_message::Kind::Chunk(chunk))))
        .unwrap();
    let env = reply_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the reply");
    check_doubled(env, &global);
    s.transport
        .shutdown("done", ShutdownKind::Finished, Duration::from_secs(1));
}
