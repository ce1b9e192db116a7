//! Trust over rounds with a Byzantine client: its moving-average trust falls
//! below the threshold, it is flagged in the events and sits the next round
//! out, and a resumed server rebuilds the same averages. Centered
//! clipping's center (its state) resumes bit for bit.
#![allow(clippy::unwrap_used)]

use std::sync::mpsc;

use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
use fedcore::memory::InMemoryTransport;
use fedcore::trust::TrustPolicy;
use fedcore::{Model, ModelClient, Server, ServerConfig, ServerEvent};
use fedcore_robust::GeometricMedianParams;
use fedcore_robust::attacks::{Attack, Byzantine};

fn transport() -> InMemoryTransport {
    let mut t = InMemoryTransport::new();
    for i in 0..5u64 {
        let data = synthetic_blobs((1 << 16) + i, 100, 6, 3, 2.0);
        t.add_client(ModelClient::new(
            format!("h{i}"),
            SoftmaxRegression::new(6, 3),
            data,
        ))
        .unwrap();
    }
    let data = synthetic_blobs((1 << 16) + 9, 100, 6, 3, 2.0);
    let liar = Byzantine::new(
        SoftmaxRegression::new(6, 3),
        Attack::SignFlip { scale: 10.0 },
    )
    .unwrap();
    t.add_client(ModelClient::new("byz", liar, data)).unwrap();
    t
}

fn config(dir: Option<&std::path::Path>, rounds: u64) -> ServerConfig {
    ServerConfig {
        rounds,
        min_fit_clients: 4,
        seed: 7,
        checkpoint_dir: dir.map(|d| d.to_path_buf()),
        trust: Some(TrustPolicy {
            smoothing: 0.5,
            threshold: 0.5,
            exclude_next_round: true,
        }),
        ..ServerConfig::default()
    }
}

#[test]
fn a_sign_flipper_is_flagged_and_sits_out_the_next_round() {
    let gm = GeometricMedianParams::new().check().unwrap();
    let mut server = Server::new(
        config(None, 4),
        SoftmaxRegression::new(6, 3).parameters(),
        transport(),
        gm,
    )
    .unwrap();
    let (tx, events) = mpsc::channel();
    server.subscribe(tx);
    server.run().unwrap();
    let h = server.history();
    let first = &h[0];
    let byz = first
        .accepted
        .iter()
        .find(|a| a.client.as_str() == "byz")
        .unwrap();
    assert!(byz.trust.unwrap() < 0.5 && byz.suspicious, "{byz:?}");
    assert!(
        first
            .accepted
            .iter()
            .filter(|a| a.client.as_str() != "byz")
            .all(|a| !a.suspicious)
    );
    // Suspicious after round 1: left out of round 2, and recorded as such.
    assert_eq!(
        h[1].excluded.iter().map(|c| c.as_str()).collect::<Vec<_>>(),
        ["byz"]
    );
    assert!(!h[1].sampled.iter().any(|c| c.as_str() == "byz"));
    let flagged: Vec<_> = events
        .try_iter()
        .filter_map(|e| match e {
            ServerEvent::ClientFlagged { round, client, .. } => Some((round, client)),
            _ => None,
        })
        .collect();
    assert_eq!(
        flagged.first().map(|(r, c)| (*r, c.as_str())),
        Some((1, "byz"))
    );
    // Back in round 3 (one round out), still caught, out again in round 4.
    assert!(
        h[2].accepted
            .iter()
            .any(|a| a.client.as_str() == "byz" && a.suspicious)
    );
    assert_eq!(h[3].excluded.len(), 1);
    let standing = server.trust().unwrap().get(&"byz".into()).unwrap();
    assert!(standing.suspicious && standing.rounds == 2, "{standing:?}");
}

#[test]
fn resume_rebuilds_the_trust_averages() {
    let dir = tempfile::tempdir().unwrap();
    let gm = || GeometricMedianParams::new().check().unwrap();
    let init = SoftmaxRegression::new(6, 3).parameters();
    let mut full = Server::new(config(None, 4), init.clone(), transport(), gm()).unwrap();
    full.run().unwrap();

    let mut first =
        Server::new(config(Some(dir.path()), 2), init.clone(), transport(), gm()).unwrap();
    first.run().unwrap();
    drop(first);
    let mut resumed = Server::resume(config(Some(dir.path()), 4), init, transport(), gm()).unwrap();
    resumed.run().unwrap();
    assert_eq!(
        resumed.trust().unwrap().clients(),
        full.trust().unwrap().clients()
    );
    assert_eq!(resumed.global().as_slice(), full.global().as_slice());
}

#[test]
fn bad_trust_policy_is_refused() {
    let mut cfg = config(None, 1);
    cfg.trust = Some(TrustPolicy {
        smoothing: 0.0,
        ..TrustPolicy::default()
    });
    let gm = GeometricMedianParams::new().check().unwrap();
    let e = Server::new(
        cfg,
        SoftmaxRegression::new(6, 3).parameters(),
        transport(),
        gm,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("smoothing"), "{e}");
}

/// Centered clipping carries its center from round to round: a run killed
/// after round 2 and resumed ends on the uninterrupted run's model bit for
/// bit, with and without server momentum; another rule cannot resume it.
#[test]
fn centered_clipping_resumes_bit_for_bit() {
    use fedcore_robust::CenteredClippingParams;
    let cc = || CenteredClippingParams::new(0.5).check().unwrap();
    let bits = |p: &fedcore::Parameters| -> Vec<u32> {
        p.as_slice().iter().map(|v| v.to_bits()).collect()
    };
    for opt in [fedcore::ServerOpt::Sgd, fedcore::ServerOpt::momentum()] {
        let mut cfg = config(None, 5);
        cfg.trust = None;
        cfg.server_opt = opt;
        let initial = SoftmaxRegression::new(6, 3).parameters();
        let mut whole = Server::new(cfg.clone(), initial.clone(), transport(), cc()).unwrap();
        whole.run().unwrap();
        assert!(whole.history().iter().all(|r| r.outcome.is_completed()));

        let dir = tempfile::tempdir().unwrap();
        cfg.checkpoint_dir = Some(dir.path().to_owned());
        {
            let mut first = Server::new(cfg.clone(), initial.clone(), transport(), cc()).unwrap();
            first.run_round().unwrap();
            first.run_round().unwrap();
        }
        let mut resumed = Server::resume(cfg.clone(), initial.clone(), transport(), cc()).unwrap();
        resumed.run().unwrap();
        assert_eq!(bits(resumed.global()), bits(whole.global()), "{opt:?}");

        let gm = GeometricMedianParams::new().check().unwrap();
        let e = Server::resume(cfg.clone(), initial.clone(), transport(), gm)
            .err()
            .unwrap();
        assert!(e.to_string().contains("strategy"), "{e}");
    }
}
