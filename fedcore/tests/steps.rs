//! The run loop and multi-step rounds over the in-memory transport: a failed
//! round is recorded and the run goes on under its policy; a strategy asks
//! the clients for a second message and a client that leaves between the
//! steps is recorded with the step it left in.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use fedcore::linear::SoftmaxRegression;
use fedcore::memory::{Fault, InMemoryTransport};
use fedcore::{
    AggregationFailureKind, ClientId, Error, Failure, FedAvg, ModelClient, Rejection, RoundOutcome,
    RunEnd, RunPolicy, Server, ServerEvent, StepReply, StopSignal,
};

/// `n` clients that answer the [`Residuals`] strategy's second step.
fn answering(n: u64) -> InMemoryTransport {
    let mut t = InMemoryTransport::new();
    for i in 0..n {
        t.add_client(
            ModelClient::new(
                name(i),
                SoftmaxRegression::new(DIM, CLASSES),
                client_data(i),
            )
            .with_responder(residual),
        )
        .unwrap();
    }
    t
}

#[test]
fn an_aggregator_failing_in_round_2_is_recorded_and_the_run_goes_on() {
    let aggregator = FailsInRounds {
        rounds: vec![2],
        calls: 0,
    };
    let mut server = Server::new(config(4), initial(), federation(3), aggregator).unwrap();
    let (tx, events) = std::sync::mpsc::channel();
    server.subscribe(tx);
    let mut seen = Vec::new();
    let mut after_round_1 = None;
    let report = server
        .run_with(&RunPolicy::default(), |server, record| {
            seen.push((record.round, record.outcome.clone()));
            if record.round == 1 {
                after_round_1 = Some(server.global().clone());
            }
            if record.round == 2 {
                // The failed round left the model as round 1 made it.
                assert_eq!(Some(server.global()), after_round_1.as_ref());
            }
            Ok::<(), Error>(())
        })
        .unwrap();
    assert_eq!(report.end, RunEnd::Completed);
    assert_eq!((report.completed, report.failed), (3, 1));
    assert_eq!(seen.len(), 4);
    let failed = &server.history()[1];
    assert_eq!(failed.round, 2);
    let RoundOutcome::AggregationFailed(why) = &failed.outcome else {
        panic!("round 2: {:?}", failed.outcome)
    };
    assert_eq!(why.kind, AggregationFailureKind::InvalidWeights);
    assert_eq!(why.aggregator, "fails-in-rounds");
    assert!(why.detail.contains("refused on call 2"), "{}", why.detail);
    assert!(failed.accepted.is_empty() && failed.update_norm.is_none());
    assert!(matches!(
        failed.ensure_completed(),
        Err(Error::AggregationFailed { round: 2, .. })
    ));
    for r in [0, 2, 3] {
        assert_eq!(server.history()[r].outcome, RoundOutcome::Completed);
        assert_eq!(server.history()[r].accepted.len(), 3);
    }
    let failed_events = events
        .try_iter()
        .filter(|e| matches!(e, ServerEvent::RoundFailed { record } if record.round == 2))
        .count();
    assert_eq!(failed_events, 1);
}

#[test]
fn failed_rounds_in_a_row_end_the_run_under_its_policy() {
    let aggregator = FailsInRounds {
        rounds: vec![2, 3, 4, 5],
        calls: 0,
    };
    let mut server = Server::new(config(10), initial(), federation(3), aggregator).unwrap();
    let policy = RunPolicy::default().with_max_failed_in_a_row(Some(2));
    let report = server
        .run_with(&policy, |_, _| Ok::<(), Error>(()))
        .unwrap();
    assert_eq!(report.end, RunEnd::TooManyFailedRounds { in_a_row: 2 });
    assert_eq!((report.completed, report.failed), (1, 2));
    assert_eq!(server.history().len(), 3);
    assert!(matches!(
        report.ensure_not_given_up(),
        Err(Error::TooManyFailedRounds { in_a_row: 2 })
    ));
    // The run can be continued: the next call runs round 4 (a failure) and
    // round 5 (another), then gives up again; round 6 completes after that.
    let report = server
        .run_with(&policy, |_, _| Ok::<(), Error>(()))
        .unwrap();
    assert_eq!(report.end, RunEnd::TooManyFailedRounds { in_a_row: 2 });
    assert_eq!(server.next_round(), 6);
    let never = RunPolicy::default().with_max_failed_in_a_row(None);
    let report = server.run_with(&never, |_, _| Ok::<(), Error>(())).unwrap();
    assert_eq!(report.end, RunEnd::Completed);
    assert_eq!(server.history().len(), 10);
}

#[test]
fn the_stop_signal_ends_the_run_between_rounds_and_after_round_errors_end_it() {
    let stop = StopSignal::new();
    let policy = RunPolicy::default().with_stop(stop.clone());
    let mut server = Server::new(config(10), initial(), federation(3), FedAvg).unwrap();
    let report = server
        .run_with(&policy, |_, record| {
            if record.round == 2 {
                stop.stop();
            }
            Ok::<(), Error>(())
        })
        .unwrap();
    assert_eq!(report.end, RunEnd::Stopped);
    assert_eq!(server.history().len(), 2);

    let mut server = Server::new(config(10), initial(), federation(3), FedAvg).unwrap();
    let err = server
        .run_with(&RunPolicy::default(), |_, record| {
            if record.round == 3 {
                return Err(Error::InvalidInput("the store is full".into()));
            }
            Ok::<(), Error>(())
        })
        .unwrap_err();
    assert!(err.to_string().contains("the store is full"));
    assert_eq!(server.history().len(), 3);
}

#[test]
fn the_default_run_records_a_lost_quorum_and_goes_on() {
    let transport = federation(3);
    transport
        .inject(&ClientId::new(name(2)), Some(Fault::Drop))
        .unwrap();
    let mut server = Server::new(config(5), initial(), transport, FedAvg).unwrap();
    let report = server.run().unwrap();
    // Every round lost its quorum (3 needed, 2 answered): after three in a
    // row the default policy gives up, each round recorded with its reason.
    assert_eq!(report.end, RunEnd::TooManyFailedRounds { in_a_row: 3 });
    assert_eq!(server.history().len(), 3);
    for r in server.history() {
        assert_eq!(r.outcome, RoundOutcome::QuorumNotReached);
        assert_eq!(r.quorum, 3);
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.failures[0].client.as_str(), "hospital-2");
        assert!(matches!(r.failures[0].reason, Failure::Disconnected(_)));
    }
}

#[test]
fn a_two_step_round_computes_fedavg_over_the_clients_that_stayed() {
    // Four clients, quorum 3; hospital-3 leaves when the second step comes.
    let transport = answering(4);
    transport
        .inject(&ClientId::new(name(3)), Some(Fault::DropAtStep))
        .unwrap();
    let mut server = Server::new(config(2), initial(), transport, Residuals).unwrap();
    server.run().unwrap();

    // The same rounds with plain FedAvg where hospital-3 never answers.
    let reference_transport = federation(4);
    reference_transport
        .inject(&ClientId::new(name(3)), Some(Fault::Drop))
        .unwrap();
    let mut reference = Server::new(config(2), initial(), reference_transport, FedAvg).unwrap();
    reference.run().unwrap();

    for r in server.history() {
        assert_eq!(r.outcome, RoundOutcome::Completed, "round {}", r.round);
        assert_eq!(r.aggregator, "residuals");
        let accepted: Vec<&str> = r.accepted.iter().map(|a| a.client.as_str()).collect();
        assert_eq!(accepted, ["hospital-0", "hospital-1", "hospital-2"]);
        assert_eq!(r.failures.len(), 1);
        assert_eq!(r.failures[0].client.as_str(), "hospital-3");
        assert_eq!(r.failures[0].step, Some(1));
        assert!(matches!(r.failures[0].reason, Failure::Disconnected(_)));
        assert!(r.failures[0].to_string().contains("(step 1)"));
    }
    let worst = server.global().max_abs_diff(reference.global()).unwrap();
    assert!(
        worst < 1e-5,
        "two-step result differs from FedAvg by {worst}"
    );
    assert_ne!(server.global(), &initial());
}

#[test]
fn a_two_step_round_that_loses_its_quorum_in_a_step_keeps_the_model() {
    let transport = answering(3);
    transport
        .inject(&ClientId::new(name(1)), Some(Fault::DropAtStep))
        .unwrap();
    let mut server = Server::new(config(1), initial(), transport, Residuals).unwrap();
    let record = server.run_round().unwrap().clone();
    assert_eq!(record.outcome, RoundOutcome::QuorumNotReached);
    assert!(record.accepted.is_empty());
    assert_eq!(record.failures.len(), 1);
    assert_eq!(record.failures[0].step, Some(1));
    assert_eq!(server.global(), &initial());
    match record.ensure_completed() {
        Err(Error::QuorumNotReached {
            round: 1,
            required: 3,
            accepted: 2,
            failures,
        }) => assert_eq!(failures[0].client.as_str(), "hospital-1"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_step_answers_and_clients_without_a_responder_are_out_of_the_round() {
    let mut t = answering(3);
    // Answers with NaN.
    t.add_client(
        ModelClient::new(
            name(3),
            SoftmaxRegression::new(DIM, CLASSES),
            client_data(3),
        )
        .with_responder(|ins: &fedcore::StepIns, sent: &fedcore::ClientUpdate| {
            let mut reply = residual(ins, sent)?;
            reply.values.as_mut_slice()[0] = f32::NAN;
            Ok(reply)
        }),
    )
    .unwrap();
    // Answers another step.
    t.add_client(
        ModelClient::new(
            name(4),
            SoftmaxRegression::new(DIM, CLASSES),
            client_data(4),
        )
        .with_responder(|ins: &fedcore::StepIns, sent: &fedcore::ClientUpdate| {
            let reply = residual(ins, sent)?;
            Ok(StepReply {
                step: ins.step + 1,
                ..reply
            })
        }),
    )
    .unwrap();
    // Takes part in fit but has no responder.
    t.add_client(ModelClient::new(
        name(5),
        SoftmaxRegression::new(DIM, CLASSES),
        client_data(5),
    ))
    .unwrap();
    let mut server = Server::new(config(1), initial(), t, Residuals).unwrap();
    let record = server.run_round().unwrap().clone();
    assert_eq!(record.outcome, RoundOutcome::Completed);
    assert_eq!(record.accepted.len(), 3);
    let reasons: Vec<(&str, Option<u32>, &Failure)> = record
        .failures
        .iter()
        .map(|f| (f.client.as_str(), f.step, &f.reason))
        .collect();
    assert!(matches!(
        reasons[0],
        (
            "hospital-3",
            Some(1),
            Failure::Rejected(Rejection::NonFinite(_))
        )
    ));
    assert!(matches!(
        reasons[1],
        (
            "hospital-4",
            Some(1),
            Failure::Rejected(Rejection::WrongStep {
                expected: 1,
                got: 2
            })
        )
    ));
    assert!(
        matches!(reasons[2], ("hospital-5", Some(1), Failure::ClientError(e)) if e.contains("no step responder")),
        "{reasons:?}"
    );
}

/// A client in the middle of the sorted order leaves between the steps:
/// every remaining client keeps its own norm and weight (no shift).
#[test]
fn a_client_leaving_mid_order_keeps_norms_and_weights_aligned() {
    let transport = answering(4);
    transport
        .inject(&ClientId::new(name(1)), Some(Fault::DropAtStep))
        .unwrap();
    let mut server = Server::new(config(1), initial(), transport, Residuals).unwrap();
    let (tx, events) = std::sync::mpsc::channel();
    server.subscribe(tx);
    let record = server.run_round().unwrap().clone();
    assert_eq!(record.outcome, RoundOutcome::Completed);
    let accepted: Vec<&str> = record.accepted.iter().map(|a| a.client.as_str()).collect();
    assert_eq!(accepted, ["hospital-0", "hospital-2", "hospital-3"]);
    assert_eq!(record.failures.len(), 1);
    assert_eq!(
        (record.failures[0].client.as_str(), record.failures[0].step),
        ("hospital-1", Some(1))
    );
    let norms: std::collections::BTreeMap<ClientId, f64> = events
        .try_iter()
        .filter_map(|e| match e {
            ServerEvent::UpdateAccepted {
                client,
                update_norm,
                ..
            } => Some((client, update_norm)),
            _ => None,
        })
        .collect();
    assert_eq!(norms.len(), 4, "every fit update was accepted first");
    let total: u64 = record.accepted.iter().map(|a| a.num_examples).sum();
    for a in &record.accepted {
        assert_eq!(a.update_norm, norms[&a.client], "{}", a.client);
        let expected = a.num_examples as f64 / total as f64;
        assert!((a.weight - expected).abs() < 1e-12, "{}", a.client);
    }
    // The three norms differ, so a shift would have been seen.
    let mut distinct: Vec<f64> = record.accepted.iter().map(|a| a.update_norm).collect();
    distinct.dedup();
    assert_eq!(distinct.len(), 3);
}

#[test]
fn exclusions_below_the_quorum_send_no_task() {
    let transport = answering(3);
    let mut server = Server::new(config(1), initial(), transport, FedAvg).unwrap();
    server
        .exclusions()
        .exclude(ClientId::new(name(0)), "maintenance");
    let record = server.run_round().unwrap().clone();
    assert_eq!(record.outcome, RoundOutcome::QuorumNotReached);
    assert!(record.sampled.is_empty(), "nobody was asked to train");
    assert_eq!(record.withheld.len(), 1);
    assert_eq!(server.global(), &initial());
}
