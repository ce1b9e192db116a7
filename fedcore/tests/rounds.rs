//! End-to-end rounds of the orchestrator over the in-memory transport.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::mpsc;
use std::time::Duration;

use common::*;
use fedcore::linear::SoftmaxRegression;
use fedcore::memory::Fault;
use fedcore::{
    ClientId, Error, Failure, FedAvg, LrSchedule, Model, Rejection, RoundOutcome, Server,
    ServerEvent,
};

#[test]
fn five_clients_ten_rounds_loss_falls() {
    let mut server = Server::new(config(10), initial(), federation(5), FedAvg).unwrap();
    server.set_evaluator(|p| {
        let mut m = SoftmaxRegression::new(DIM, CLASSES);
        m.set_parameters(p)?;
        m.evaluate(&test_data())
    });
    let before = central_loss(server.global());
    server.run().unwrap();
    let losses: Vec<f64> = server
        .history()
        .iter()
        .map(|r| r.evaluation.as_ref().unwrap().loss)
        .collect();
    assert_eq!(losses.len(), 10);
    assert!(
        losses[0] < before,
        "first round improves on the initial model"
    );
    assert!(
        losses[9] < 0.6 * before,
        "loss should fall clearly: {before} -> {losses:?}"
    );
    let acc = server.history()[9].evaluation.as_ref().unwrap().metrics["accuracy"];
    assert!(acc > 0.8, "accuracy {acc}");
    for r in server.history() {
        assert_eq!(r.outcome, RoundOutcome::Completed);
        assert_eq!(r.accepted.len(), 5);
        assert!(r.failures.is_empty());
        let total: f64 = r.accepted.iter().map(|a| a.weight).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert!(r.train_metrics.contains_key("loss"));
    }
}

#[test]
fn dropout_and_nan_clients_are_reported_and_the_run_completes() {
    let transport = federation(5);
    transport
        .inject(&ClientId::new(name(1)), Some(Fault::Drop))
        .unwrap();
    transport
        .inject(&ClientId::new(name(3)), Some(Fault::CorruptNan))
        .unwrap();
    let mut server = Server::new(config(10), initial(), transport, FedAvg).unwrap();
    let (tx, rx) = mpsc::channel();
    server.subscribe(tx);
    let before = central_loss(server.global());
    server.run().unwrap();
    assert!(central_loss(server.global()) < 0.6 * before);

    for r in server.history() {
        assert_eq!(r.outcome, RoundOutcome::Completed);
        let accepted: Vec<&str> = r.accepted.iter().map(|a| a.client.as_str()).collect();
        assert_eq!(accepted, ["hospital-0", "hospital-2", "hospital-4"]);
        assert_eq!(r.failures.len(), 2);
        assert_eq!(r.failures[0].client.as_str(), "hospital-1");
        assert!(matches!(r.failures[0].reason, Failure::Disconnected(_)));
        assert_eq!(r.failures[1].client.as_str(), "hospital-3");
        match &r.failures[1].reason {
            Failure::Rejected(Rejection::NonFinite(nf)) => {
                assert_eq!(nf.tensor, "linear.weight");
                assert_eq!(nf.index, 0);
            }
            other => panic!("expected a NaN rejection, got {other:?}"),
        }
        assert!(r.failures[1].reason.to_string().contains("NaN"));
    }

    let events: Vec<ServerEvent> = rx.try_iter().collect();
    let rejected = events
        .iter()
        .filter(|e| matches!(e, ServerEvent::UpdateRejected { .. }))
        .count();
    let accepted = events
        .iter()
        .filter(|e| matches!(e, ServerEvent::UpdateAccepted { .. }))
        .count();
    let finished = events
        .iter()
        .filter(|e| matches!(e, ServerEvent::RoundFinished { .. }))
        .count();
    assert_eq!((rejected, accepted, finished), (20, 30, 10));
    // Events serialize for dashboards and logs.
    let json = serde_json::to_string(&events[0]).unwrap();
    assert!(json.contains("\"event\":\"round_started\""), "{json}");
}

#[test]
fn late_stale_and_failing_clients_are_rejected_with_reasons() {
    let transport = federation(5);
    transport
        .inject(
            &ClientId::new(name(0)),
            Some(Fault::Delay(Duration::from_millis(1500))),
        )
        .unwrap();
    transport
        .inject(&ClientId::new(name(2)), Some(Fault::StaleRound))
        .unwrap();
    transport
        .inject(
            &ClientId::new(name(4)),
            Some(Fault::Error("disk full".into())),
        )
        .unwrap();
    let mut cfg = config(1);
    cfg.min_fit_clients = 2;
    cfg.round_timeout = Duration::from_millis(500);
    let mut server = Server::new(cfg, initial(), transport, FedAvg).unwrap();
    let r = server.run_round().unwrap().clone();
    let reasons: Vec<(String, String)> = r
        .failures
        .iter()
        .map(|f| (f.client.to_string(), f.reason.to_string()))
        .collect();
    assert_eq!(r.accepted.len(), 2, "{reasons:?}");
    assert!(
        matches!(r.failures[0].reason, Failure::Timeout(500)),
        "{reasons:?}"
    );
    assert!(matches!(
        r.failures[1].reason,
        Failure::Rejected(Rejection::StaleRound {
            expected: 1,
            got: 0
        })
    ));
    assert_eq!(
        r.failures[2].reason,
        Failure::ClientError("disk full".into())
    );
}

#[test]
fn the_round_deadline_grows_with_the_model_when_asked() {
    let mut cfg = config(1);
    cfg.round_timeout = Duration::from_millis(500);
    assert_eq!(cfg.deadline_for(200_000_000), Duration::from_millis(500));
    cfg.round_timeout_per_mb = Duration::from_secs(2);
    assert_eq!(
        cfg.deadline_for(200_000_000),
        Duration::from_millis(400_500)
    );
    // A client 1.5 s late: out with the fixed 0.5 s, in with 3 s for this
    // model's size.
    let bytes = initial().len() as u64 * 4;
    cfg.round_timeout_per_mb = Duration::from_secs_f64(2.5 / (bytes as f64 / 1e6));
    cfg.min_fit_clients = 3;
    let transport = federation(3);
    transport
        .inject(
            &ClientId::new(name(0)),
            Some(Fault::Delay(Duration::from_millis(1500))),
        )
        .unwrap();
    let mut server = Server::new(cfg, initial(), transport, FedAvg).unwrap();
    let r = server.run_round().unwrap().clone();
    assert_eq!(r.accepted.len(), 3, "{:?}", r.failures);
}

#[test]
fn too_few_valid_updates_is_a_recorded_outcome_and_the_model_is_unchanged() {
    let transport = federation(3);
    transport
        .inject(&ClientId::new(name(0)), Some(Fault::CorruptNan))
        .unwrap();
    let mut server = Server::new(config(3), initial(), transport, FedAvg).unwrap();
    let (tx, rx) = mpsc::channel();
    server.subscribe(tx);
    let before = server.global().clone();
    let record = server.run_round().unwrap().clone();
    assert_eq!(record.outcome, RoundOutcome::QuorumNotReached);
    let err = record.ensure_completed().unwrap_err();
    match &err {
        Error::QuorumNotReached {
            round,
            required,
            accepted,
            failures,
        } => {
            assert_eq!((*round, *required, *accepted), (1, 3, 2));
            assert_eq!(failures[0].client.as_str(), "hospital-0");
            assert!(matches!(
                failures[0].reason,
                Failure::Rejected(Rejection::NonFinite(_))
            ));
        }
        e => panic!("expected QuorumNotReached, got {e}"),
    }
    assert!(err.to_string().contains("hospital-0"), "{err}");
    assert_eq!(server.global(), &before);
    assert_eq!(server.history()[0].outcome, RoundOutcome::QuorumNotReached);
    assert!(
        rx.try_iter()
            .any(|e| matches!(e, ServerEvent::RoundFailed { .. }))
    );

    // The next round runs once the client is healthy again.
    server
        .transport()
        .inject(&ClientId::new(name(0)), None)
        .unwrap();
    assert_eq!(server.run_round().unwrap().round, 2);
    assert_ne!(server.global(), &before);
}

#[test]
fn not_enough_connected_clients() {
    let mut server = Server::new(config(1), initial(), federation(2), FedAvg).unwrap();
    assert!(matches!(
        server.run_round(),
        Err(Error::NotEnoughClients {
            available: 2,
            required: 3
        })
    ));
    assert!(server.history().is_empty());
}

#[test]
fn sampling_a_fraction_is_seeded() {
    let run = || {
        let mut cfg = config(4);
        cfg.fraction_fit = 0.4;
        cfg.min_fit_clients = 2;
        let mut server = Server::new(cfg, initial(), federation(10), FedAvg).unwrap();
        server.run().unwrap();
        let sampled: Vec<Vec<ClientId>> =
            server.history().iter().map(|r| r.sampled.clone()).collect();
        (sampled, server.global().clone())
    };
    let (a, ga) = run();
    let (b, gb) = run();
    assert!(a.iter().all(|s| s.len() == 4));
    assert_eq!(a, b);
    assert_eq!(ga, gb, "same seed, same model, bit for bit");
    assert!(
        a.windows(2).any(|w| w[0] != w[1]),
        "rounds sample differently"
    );
}

#[test]
fn federated_evaluation_is_example_weighted() {
    let mut cfg = config(2);
    cfg.fraction_evaluate = 1.0;
    let mut server = Server::new(cfg, initial(), federation(3), FedAvg).unwrap();
    server.run().unwrap();
    let e = server.history()[1].federated_evaluation.clone().unwrap();
    assert_eq!(e.num_examples, 360);
    assert!(e.loss.is_finite() && e.metrics.contains_key("accuracy"));
}

#[test]
fn bad_configuration_is_refused() {
    let mut cfg = config(1);
    cfg.fraction_fit = 0.0;
    assert!(matches!(
        Server::new(cfg, initial(), federation(3), FedAvg),
        Err(Error::InvalidConfig(_))
    ));
    let mut nan = initial();
    nan.as_mut_slice()[0] = f32::NAN;
    assert!(Server::new(config(1), nan, federation(3), FedAvg).is_err());
}

/// A softmax regression that writes down the learning rate of every fit.
struct RecordsRate {
    inner: SoftmaxRegression,
    rates: std::sync::Arc<std::sync::Mutex<Vec<f64>>>,
}

impl Model for RecordsRate {
    type Data = fedcore::linear::Dataset;

    fn parameters(&self) -> fedcore::Parameters {
        self.inner.parameters()
    }

    fn set_parameters(&mut self, p: &fedcore::Parameters) -> fedcore::Result<()> {
        self.inner.set_parameters(p)
    }

    fn fit(
        &mut self,
        data: &Self::Data,
        config: &fedcore::TrainConfig,
    ) -> fedcore::Result<fedcore::FitOutput> {
        self.rates.lock().unwrap().push(config.learning_rate);
        self.inner.fit(data, config)
    }

    fn evaluate(&mut self, data: &Self::Data) -> fedcore::Result<fedcore::Evaluation> {
        self.inner.evaluate(data)
    }
}

#[test]
fn a_cosine_schedule_sends_each_round_its_learning_rate() {
    let rates = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut transport = fedcore::memory::InMemoryTransport::new();
    for i in 0..3 {
        let model = RecordsRate {
            inner: SoftmaxRegression::new(DIM, CLASSES),
            rates: if i == 0 {
                rates.clone()
            } else {
                Default::default()
            },
        };
        transport
            .add_client(fedcore::ModelClient::new(name(i), model, client_data(i)))
            .unwrap();
    }
    let mut cfg = config(5);
    cfg.lr_schedule = LrSchedule::Cosine { floor: 0.1 };
    let mut server = Server::new(cfg, initial(), transport, FedAvg).unwrap();
    let before = central_loss(server.global());
    server.run().unwrap();
    assert!(central_loss(server.global()) < before);
    // Round r of 5 trains at 0.05 (0.1 + 0.9 (1 + cos(pi (r - 1) / 4)) / 2):
    // 0.05 in round 1, 0.0275 half-way, 0.005 in round 5.
    let half = 0.5f64.sqrt();
    let expected: Vec<f64> = [1.0, half, 0.0, -half, -1.0]
        .iter()
        .map(|cos| 0.05 * (0.1 + 0.9 * 0.5 * (1.0 + cos)))
        .collect();
    let got = rates.lock().unwrap().clone();
    assert_eq!(got.len(), 5);
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() < 1e-12, "{got:?} against {expected:?}");
    }
    // A floor outside [0, 1] is refused before any round.
    let mut bad = config(5);
    bad.lr_schedule = LrSchedule::Cosine { floor: 1.5 };
    assert!(matches!(
        Server::new(bad, initial(), federation(3), FedAvg),
        Err(Error::InvalidConfig(_))
    ));
    assert_eq!(
        LrSchedule::parse("cosine:0.1").unwrap(),
        LrSchedule::Cosine { floor: 0.1 }
    );
    assert_eq!(LrSchedule::parse("constant").unwrap(), LrSchedule::Constant);
    assert!(LrSchedule::parse("cosine:-1").is_err() && LrSchedule::parse("step").is_err());
}

/// An aggregator that returns NaN: the round fails, nothing is applied.
#[test]
fn a_non_finite_aggregate_fails_the_round_and_keeps_the_model() {
    struct Broken;
    impl fedcore::Aggregator for Broken {
        fn name(&self) -> String {
            "broken".into()
        }
        fn aggregate(
            &mut self,
            updates: &[fedcore::ClientUpdate],
        ) -> fedcore::Result<fedcore::Aggregate> {
            let mut agg = fedcore::Aggregator::aggregate(&mut FedAvg, updates)?;
            agg.parameters.as_mut_slice()[3] = f32::INFINITY;
            Ok(agg)
        }
    }
    let mut server = Server::new(config(2), initial(), federation(3), Broken).unwrap();
    let before = server.global().clone();
    let record = server.run_round().unwrap().clone();
    let RoundOutcome::AggregationFailed(why) = &record.outcome else {
        panic!("{:?}", record.outcome)
    };
    assert_eq!(
        why.kind,
        fedcore::AggregationFailureKind::NotFinite {
            tensor: "linear.weight".into()
        }
    );
    assert_eq!(why.aggregator, "broken");
    let err = record.ensure_completed().unwrap_err();
    assert!(
        err.to_string()
            .contains("non-finite value in `linear.weight`"),
        "{err}"
    );
    assert_eq!(server.global(), &before);
    assert_eq!(server.next_round(), 2);
}

/// A transport under an attacker's control: replies for other clients,
/// replies twice, and replies from clients nobody asked.
#[test]
fn impersonated_duplicate_and_unsolicited_replies_do_not_count() {
    use fedcore::{ClientUpdate, Envelope, Reply, ReplySender, Task, Transport};

    struct Hostile;
    impl Transport for Hostile {
        fn clients(&self) -> Vec<ClientId> {
            ["a", "b", "c"].map(ClientId::from).to_vec()
        }
        fn send(
            &mut self,
            client: &ClientId,
            task: Task,
            reply_to: ReplySender,
        ) -> fedcore::Result<()> {
            let Task::Fit(ins) = task else {
                unreachable!("fit only")
            };
            let update = |claimed: &str| {
                Reply::Fit(ClientUpdate::new(
                    claimed.into(),
                    ins.round,
                    10,
                    ins.parameters.zeros_like(),
                ))
            };
            let send = |from: &str, reply| {
                reply_to
                    .send(Envelope {
                        client: from.into(),
                        reply: Ok(reply),
                    })
                    .unwrap()
            };
            match client.as_str() {
                "a" => {
                    send("a", update("a"));
                    send("a", update("a")); // twice
                    send("mallory", update("mallory")); // never asked
                }
                "b" => send("b", update("a")), // claims to be a
                _ => send(
                    "c",
                    Reply::Evaluate(fedcore::Evaluation {
                        loss: 0.0,
                        num_examples: 1,
                        metrics: Default::default(),
                    }),
                ),
            }
            Ok(())
        }
    }
    let mut cfg = config(1);
    cfg.min_fit_clients = 1;
    let mut server = Server::new(cfg, initial(), Hostile, FedAvg).unwrap();
    let r = server.run_round().unwrap().clone();
    let accepted: Vec<&str> = r.accepted.iter().map(|a| a.client.as_str()).collect();
    assert_eq!(accepted, ["a"]);
    let failures: Vec<(&str, &Failure)> = r
        .failures
        .iter()
        .map(|f| (f.client.as_str(), &f.reason))
        .collect();
    assert_eq!(failures.len(), 3, "{failures:?}");
    assert!(failures.contains(&("a", &Failure::Rejected(Rejection::Duplicate))));
    assert!(failures.contains(&(
        "b",
        &Failure::Rejected(Rejection::IdentityMismatch {
            claimed: "a".into()
        })
    )));
    assert!(failures.contains(&("c", &Failure::Rejected(Rejection::WrongReply))));
    assert!(r.sampled.iter().all(|c| c.as_str() != "mallory"));
}

/// An operator's exclusion list keeps a connected client out of rounds,
/// records why, and lets it back in.
#[test]
fn excluded_clients_are_withheld_recorded_and_readmitted() {
    let mut cfg = config(3);
    cfg.min_available_clients = 2;
    cfg.min_fit_clients = 2;
    let mut server = Server::new(cfg, initial(), federation(3), FedAvg).unwrap();
    let (tx, rx) = mpsc::channel();
    server.subscribe(tx);
    let exclusions = server.exclusions();
    exclusions.exclude(ClientId::new(name(1)), "under maintenance");
    let r = server.run_round().unwrap().clone();
    assert_eq!(r.outcome, RoundOutcome::Completed);
    assert!(!r.sampled.contains(&ClientId::new(name(1))));
    assert_eq!(r.withheld.len(), 1);
    assert_eq!(r.withheld[0].client.as_str(), "hospital-1");
    assert_eq!(r.withheld[0].reason, "under maintenance");
    assert!(rx.try_iter().any(|e| matches!(
        e,
        ServerEvent::ClientWithheld { round: 1, ref reason, .. } if reason == "under maintenance"
    )));
    assert!(exclusions.include(&ClientId::new(name(1))));
    let r = server.run_round().unwrap().clone();
    assert_eq!(r.sampled.len(), 3);
    assert!(r.withheld.is_empty());
}

#[test]
fn the_server_offers_the_last_aggregate_to_write_into_and_the_result_is_unchanged() {
    use std::sync::{Arc, Mutex};

    use fedcore::{Aggregate, Aggregator, ClientUpdate, Parameters};

    /// FedAvg that records, each round, whether it was offered a buffer
    /// and of how many values.
    struct Recording(Arc<Mutex<Vec<Option<usize>>>>);
    impl Aggregator for Recording {
        fn name(&self) -> String {
            "recording-fedavg".into()
        }
        fn aggregate(&mut self, updates: &[ClientUpdate]) -> fedcore::Result<Aggregate> {
            self.0.lock().unwrap().push(None);
            FedAvg.aggregate(updates)
        }
        fn aggregate_into(
            &mut self,
            updates: &[ClientUpdate],
            buffer: Parameters,
        ) -> fedcore::Result<Aggregate> {
            self.0.lock().unwrap().push(Some(buffer.len()));
            FedAvg.aggregate_into(updates, buffer)
        }
    }
    let offered = Arc::new(Mutex::new(Vec::new()));
    let mut reusing = Server::new(
        config(4),
        initial(),
        federation(3),
        Recording(offered.clone()),
    )
    .unwrap();
    reusing.run().unwrap();
    // Round 1 has nothing to offer; every later round gets the last
    // aggregate, which has the model's size.
    let len = initial().len();
    assert_eq!(
        *offered.lock().unwrap(),
        [None, Some(len), Some(len), Some(len)]
    );
    // The same run with a FedAvg that always aggregates into fresh memory
    // gives the same model, bit for bit, and the same norms.
    let mut plain = Server::new(config(4), initial(), federation(3), FreshFedAvg).unwrap();
    plain.run().unwrap();
    assert_eq!(reusing.global(), plain.global());
    assert_eq!(
        update_norms(reusing.history()),
        update_norms(plain.history())
    );
    assert!(
        update_norms(plain.history())
            .iter()
            .all(|n| n.is_some_and(|v| v > 0.0))
    );
}

#[test]
fn the_server_writes_each_new_global_into_the_memory_of_the_one_before_last() {
    // With the in-memory transport nothing holds an old global once its
    // round is over, so the server alternates between two buffers: round
    // 2's global lives where the initial model was, round 3's where round
    // 1's was. A stateful server optimizer (momentum) computes its
    // direction in the aggregate's memory; the run equals one that never
    // reuses memory.
    use fedcore::ServerOpt;
    let mut cfg = config(4);
    cfg.server_opt = ServerOpt::Momentum { beta: 0.9 };
    let mut server = Server::new(cfg.clone(), initial(), federation(3), FedAvg).unwrap();
    let mut at = vec![server.global().as_slice().as_ptr()];
    for _ in 0..3 {
        server.run_round().unwrap();
        at.push(server.global().as_slice().as_ptr());
    }
    assert_eq!(at[2], at[0], "round 2 in the initial model's memory");
    assert_eq!(at[3], at[1], "round 3 in round 1's");
    assert_ne!(at[1], at[0]);
    server.run_round().unwrap();
    let mut fresh = Server::new(cfg, initial(), federation(3), FreshFedAvg).unwrap();
    fresh.run().unwrap();
    assert_eq!(server.global(), fresh.global());
    assert_eq!(
        update_norms(server.history()),
        update_norms(fresh.history())
    );
}

/// FedAvg that always aggregates into fresh memory: it keeps the default
/// `aggregate_into`, which drops the buffer the server offers.
struct FreshFedAvg;

impl fedcore::Aggregator for FreshFedAvg {
    fn name(&self) -> String {
        "fresh-fedavg".into()
    }
    fn aggregate(
        &mut self,
        updates: &[fedcore::ClientUpdate],
    ) -> fedcore::Result<fedcore::Aggregate> {
        FedAvg.aggregate(updates)
    }
}

/// Each round's update norm.
fn update_norms(history: &[fedcore::RoundRecord]) -> Vec<Option<f64>> {
    history.iter().map(|r| r.update_norm).collect()
}
