//! Compressed uploads on the softmax-regression federation of `common`:
//! every encoding learns, records its bytes and its provenance, and error
//! feedback carries what top-k drops into later rounds.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use fedcore::{Encoding, FedAvg, Parameters, ProtectionKind, Server, ServerConfig, TrainConfig};

fn run(upload: Encoding, rounds: u64) -> (Parameters, Vec<fedcore::RoundRecord>) {
    let cfg = ServerConfig {
        train: TrainConfig {
            upload,
            ..config(rounds).train
        },
        ..config(rounds)
    };
    let mut s = Server::new(cfg, initial(), federation(3), FedAvg).unwrap();
    s.run().unwrap();
    assert!(s.history().iter().all(|r| r.outcome.is_completed()));
    (s.global().clone(), s.history().to_vec())
}

/// 44 values (a 4x10 weight and 4 biases): float32 takes 176 bytes, the
/// half formats 88, int8 52 (a scale per tensor), top-k of a tenth keeps
/// 4 + 1 values at 8 bytes each. Each encoded run learns nearly as well as
/// the float32 one after 15 rounds, and each accepted update says how it
/// travelled.
#[test]
fn every_encoding_learns_and_records_its_bytes_and_provenance() {
    let start = central_loss(&initial());
    let (exact, records) = run(Encoding::F32, 15);
    let exact = central_loss(&exact);
    assert!(exact < 0.5 * start, "{exact} vs {start}");
    assert!(records.iter().flat_map(|r| &r.accepted).all(|a| {
        a.upload_bytes == 176
            && a.provenance
                .iter()
                .all(|p| p.kind != ProtectionKind::Compression)
    }));
    for (enc, bytes, slack) in [
        (Encoding::F16, 88, 1e-3),
        (Encoding::Bf16, 88, 1e-2),
        (Encoding::Int8, 52, 2e-2),
        (Encoding::TopK { fraction: 0.1 }, 40, 0.15),
    ] {
        let (global, records) = run(enc, 15);
        let loss = central_loss(&global);
        assert!(
            loss <= exact * (1.0 + slack),
            "{enc}: loss {loss} against {exact} in float32"
        );
        for a in records.iter().flat_map(|r| &r.accepted) {
            assert_eq!(a.upload_bytes, bytes, "{enc}");
            let last = a.provenance.last().unwrap();
            assert_eq!(last.kind, ProtectionKind::Compression);
            assert_eq!(last.mechanism, format!("{enc}+error-feedback"));
        }
    }
}

/// Top-k of a tenth changes 5 of 44 values per update; with error feedback
/// the dropped rest comes in later rounds, so the model still moves in
/// every coordinate and ends near the float32 run, while a single round's
/// step touches at most 5 coordinates per client.
#[test]
fn top_k_with_error_feedback_reaches_every_coordinate() {
    let (one, _) = run(Encoding::TopK { fraction: 0.1 }, 1);
    let moved = |p: &Parameters| {
        p.as_slice()
            .iter()
            .zip(initial().as_slice())
            .filter(|(a, b)| a != b)
            .count()
    };
    assert!(moved(&one) <= 15, "{} coordinates moved", moved(&one));
    let (many, _) = run(Encoding::TopK { fraction: 0.1 }, 15);
    assert_eq!(moved(&many), 44);
}

/// A bad setting is refused before the run starts.
#[test]
fn a_top_k_fraction_outside_0_1_is_refused() {
    let cfg = ServerConfig {
        train: TrainConfig {
            upload: Encoding::TopK { fraction: 1.5 },
            ..config(1).train
        },
        ..config(1)
    };
    let err = Server::new(cfg, initial(), federation(3), FedAvg)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("top-k keeps a fraction in (0, 1]"), "{err}");
}
