//! Checkpoints: resume after a crash, and corrupted files.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs;

use common::*;
use fedcore::{Error, FedAvg, Server};

fn bits(p: &fedcore::Parameters) -> Vec<u32> {
    p.as_slice().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn a_run_killed_between_rounds_and_resumed_matches_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut uninterrupted = Server::new(config(6), initial(), federation(4), FedAvg).unwrap();
    uninterrupted.run().unwrap();

    let mut cfg = config(6);
    cfg.checkpoint_dir = Some(dir.path().to_owned());
    {
        let mut first = Server::new(cfg.clone(), initial(), federation(4), FedAvg).unwrap();
        first.run_round().unwrap();
        first.run_round().unwrap();
        first.run_round().unwrap();
        // The process "dies" here: server, transport and clients are dropped.
    }
    // Nothing is overwritten by starting a new run in the same directory.
    assert!(matches!(
        Server::new(cfg.clone(), initial(), federation(4), FedAvg),
        Err(Error::InvalidConfig(_))
    ));
    let mut resumed = Server::resume(cfg, initial(), federation(4), FedAvg).unwrap();
    assert_eq!(resumed.next_round(), 4);
    resumed.run().unwrap();

    assert_eq!(bits(resumed.global()), bits(uninterrupted.global()));
    let rounds: Vec<u64> = resumed.history().iter().map(|r| r.round).collect();
    assert_eq!(rounds, [1, 2, 3, 4, 5, 6], "every round recorded once");
    // Only the newest model files are kept.
    let models = fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("model-")
        })
        .count();
    assert_eq!(models, 3);
}

/// A stateful server optimizer (FedAvgM, FedAdagrad, FedAdam, FedYogi)
/// keeps its moments in the checkpoint: killed after round 3 and resumed,
/// the run ends on the uninterrupted run's model bit for bit, and it moved
/// elsewhere than plain FedAvg. Resuming with another optimizer, or with
/// its state file damaged, is refused.
#[test]
fn every_server_optimizer_resumes_bit_for_bit() {
    use fedcore::ServerOpt;
    // Plain SGD at the same server learning rate: what the optimizers
    // must differ from.
    let plain = {
        let mut cfg = config(6);
        cfg.server_learning_rate = 0.05;
        let mut s = Server::new(cfg, initial(), federation(4), FedAvg).unwrap();
        s.run().unwrap();
        bits(s.global())
    };
    for opt in [
        ServerOpt::momentum(),
        ServerOpt::adagrad(),
        ServerOpt::adam(),
        ServerOpt::yogi(),
    ] {
        let mut cfg = config(6);
        cfg.server_opt = opt;
        cfg.server_learning_rate = 0.05;
        let mut uninterrupted = Server::new(cfg.clone(), initial(), federation(4), FedAvg).unwrap();
        uninterrupted.run().unwrap();
        assert!(
            uninterrupted
                .history()
                .iter()
                .all(|r| r.outcome.is_completed()),
            "{opt:?}"
        );
        assert_ne!(
            bits(uninterrupted.global()),
            plain,
            "{opt:?} steps like FedAvg"
        );

        let dir = tempfile::tempdir().unwrap();
        cfg.checkpoint_dir = Some(dir.path().to_owned());
        {
            let mut first = Server::new(cfg.clone(), initial(), federation(4), FedAvg).unwrap();
            for _ in 0..3 {
                first.run_round().unwrap();
            }
        }
        let mut resumed = Server::resume(cfg.clone(), initial(), federation(4), FedAvg).unwrap();
        resumed.run().unwrap();
        assert_eq!(
            bits(resumed.global()),
            bits(uninterrupted.global()),
            "{opt:?}"
        );

        let mut other = cfg.clone();
        other.server_opt = if opt == ServerOpt::adam() {
            ServerOpt::yogi()
        } else {
            ServerOpt::adam()
        };
        let e = resume_error(&other);
        assert!(e.contains("server optimizer"), "{e}");
        let mut sgd = cfg.clone();
        sgd.server_opt = ServerOpt::Sgd;
        assert!(resume_error(&sgd).contains("server optimizer"));
        // The same optimizer with other settings: its moments do not fit.
        let mut tweaked = cfg.clone();
        tweaked.server_opt = match opt {
            ServerOpt::Momentum { beta } => ServerOpt::Momentum { beta: beta / 2.0 },
            ServerOpt::Adagrad { beta1, tau } => ServerOpt::Adagrad {
                beta1,
                tau: tau * 2.0,
            },
            ServerOpt::Adam { beta1, beta2, tau } => ServerOpt::Adam {
                beta1,
                beta2: beta2 / 2.0,
                tau,
            },
            ServerOpt::Yogi { beta1, beta2, tau } => ServerOpt::Yogi {
                beta1: beta1 / 2.0,
                beta2,
                tau,
            },
            ServerOpt::Sgd => unreachable!("stateful ones only"),
        };
        assert!(resume_error(&tweaked).contains("server optimizer"));
        let file = dir.path().join("server-opt-000006.safetensors");
        let mut bytes = fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(&file, &bytes).unwrap();
        let e = resume_error(&cfg);
        assert!(e.contains("corrupt"), "{e}");
    }
}

fn checkpointed(dir: &std::path::Path) -> fedcore::ServerConfig {
    let mut cfg = config(2);
    cfg.checkpoint_dir = Some(dir.to_owned());
    let mut s = Server::new(cfg.clone(), initial(), federation(3), FedAvg).unwrap();
    s.run().unwrap();
    cfg
}

fn resume_error(cfg: &fedcore::ServerConfig) -> String {
    match Server::resume(cfg.clone(), initial(), federation(3), FedAvg) {
        Ok(_) => panic!("resume should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn corrupted_model_bytes_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = checkpointed(dir.path());
    let model = dir.path().join("model-000002.safetensors");
    let mut bytes = fs::read(&model).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40; // a flipped bit in the tensor data, header intact
    fs::write(&model, &bytes).unwrap();
    let e = resume_error(&cfg);
    assert!(
        e.contains("model-000002.safetensors") && e.contains("corrupt"),
        "{e}"
    );
}

#[test]
fn truncated_or_garbage_state_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = checkpointed(dir.path());
    let state = dir.path().join("state.json");
    let good = fs::read(&state).unwrap();
    fs::write(&state, &good[..good.len() / 2]).unwrap();
    let e = resume_error(&cfg);
    assert!(
        e.contains("state.json") && e.contains("not a valid state file"),
        "{e}"
    );

    fs::write(&state, b"\x00\x01garbage").unwrap();
    assert!(resume_error(&cfg).contains("state.json"));

    // A state file that points outside the directory is refused.
    let text = String::from_utf8(good.clone()).unwrap();
    let evil = text.replace("model-000002.safetensors", "../../etc/passwd");
    fs::write(&state, evil).unwrap();
    assert!(resume_error(&cfg).contains("plain file name"));

    // A missing model file names the file.
    fs::write(&state, &good).unwrap();
    fs::remove_file(dir.path().join("model-000002.safetensors")).unwrap();
    assert!(resume_error(&cfg).contains("model-000002.safetensors"));
}

#[test]
fn a_checkpoint_of_another_model_or_seed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = checkpointed(dir.path());
    let other = fedcore::linear::SoftmaxRegression::new(DIM + 1, CLASSES);
    let e = Server::resume(
        cfg.clone(),
        fedcore::Model::parameters(&other),
        federation(3),
        FedAvg,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("linear.weight"), "{e}");
    let mut other_seed = cfg;
    other_seed.seed += 1;
    assert!(resume_error(&other_seed).contains("seed"));
}

#[test]
fn resume_without_a_checkpoint_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(2);
    cfg.checkpoint_dir = Some(dir.path().to_owned());
    assert!(resume_error(&cfg).contains("no checkpoint"));
}
