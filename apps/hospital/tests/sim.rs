//! The simulation end to end on a tiny synthetic set: DenseNet-121 with the
//! CKKS head and DP-SGD at every hospital, records in the store, a hospital
//! suspended from the dashboard, resume from the checkpoint.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

/// The job the simulations record their rounds under.
const JOB: i64 = 1;

use clap::Parser;
use fedcore_hospital::infer::Predictor;
use fedcore_hospital::live::Shared;
use fedcore_hospital::sim::{self, SimConfig};
use fedcore_hospital::store::Store;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    sim: SimConfig,
}

/// A tiny simulation in `dir` with `extra` flags.
fn sim_config(dir: &std::path::Path, rounds: u64, extra: &[&str]) -> SimConfig {
    let rounds = rounds.to_string();
    let mut args = vec![
        "sim",
        "--rounds",
        &rounds,
        "--image-size",
        "32",
        "--patients",
        "45",
        "--batch-size",
        "8",
        "--public-patients",
        "0",
        "--run-dir",
        dir.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Cli::parse_from(args).sim
}

/// With DP-SGD at every hospital (the default) on the last block, after
/// public pretraining on 8 other patients.
fn config(dir: &std::path::Path, rounds: u64) -> SimConfig {
    let mut cfg = sim_config(
        dir,
        rounds,
        &[
            "--epsilon",
            "50",
            "--dp-batch-size",
            "8",
            "--dp-rounds",
            "3",
        ],
    );
    cfg.pretrain.public_patients = 8;
    cfg.pretrain.public_epochs = 1;
    cfg
}

/// A runtime, a SQLite store in `dir`, the live state and a predictor.
fn setup(dir: &std::path::Path) -> (tokio::runtime::Runtime, Store, Arc<Shared>, Arc<Predictor>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("db.sqlite").display());
    let store = rt.block_on(Store::connect(&url)).unwrap();
    (
        rt,
        store,
        Arc::new(Shared::default()),
        Arc::new(Predictor::new(32, 42)),
    )
}

#[test]
fn encrypted_private_run_is_recorded_honours_suspension_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, store, shared, predictor) = setup(dir.path());
    shared.suspended.lock().unwrap().insert("hospital-2".into());
    let mut events = shared.events.subscribe();

    let cfg = config(dir.path(), 2);
    let s = sim::run(&cfg, JOB, &store, rt.handle(), &shared, &predictor).unwrap();
    assert_eq!(s.rounds, 2);
    assert_eq!(s.rejected, 2, "the suspended hospital, twice");
    assert!(dir.path().join("he-keys/he-secret.key").exists());
    let rounds = rt.block_on(store.rounds(JOB)).unwrap();
    assert_eq!(rounds.len(), 2);
    assert!(rounds.iter().all(|r| r.accepted == 2 && r.rejected == 1));
    let ups = rt
        .block_on(store.updates(JOB, None, Some("hospital-2")))
        .unwrap();
    assert!(
        ups.iter()
            .all(|u| !u.accepted && u.reason.as_deref().unwrap().contains("suspended"))
    );
    // DP-SGD: each counted update carries the hospital's growing epsilon.
    assert!(
        dir.path().join("public/test_list.txt").exists(),
        "pretrained"
    );
    let eps: Vec<f64> = rt
        .block_on(store.updates(JOB, None, Some("hospital-1")))
        .unwrap()
        .iter()
        .map(|u| u.epsilon.unwrap())
        .collect();
    assert_eq!(eps.len(), 2);
    assert!(eps[0] > 0.0 && eps[1] > eps[0] && eps[1] <= 50.0, "{eps:?}");
    // The evaluation site opened the encrypted head: finite held-out metrics.
    let last = rounds.last().unwrap();
    assert!(last.loss.unwrap().is_finite(), "{last:?}");
    let metrics = rt
        .block_on(store.metrics(JOB, "eval.auroc.", None))
        .unwrap();
    assert_eq!(
        metrics.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2],
        "per-label AUROC before training (round 0) and after each round"
    );
    assert!(
        rt.block_on(store.metrics(JOB, "agg.sealed_sum_ms", None))
            .unwrap()
            .len()
            == 2
    );
    assert_eq!(predictor.round(), Some(2));
    let mut kinds = Vec::new();
    while let Ok(e) = events.try_recv() {
        kinds.push(
            serde_json::to_value(&e).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    for k in [
        "round_started",
        "update_rejected",
        "round_finished",
        "finished",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} missing from {kinds:?}");
    }

    // Reactivated, and one round more from the checkpoint.
    shared.suspended.lock().unwrap().clear();
    let mut cfg = config(dir.path(), 3);
    cfg.resume = true;
    let s = sim::run(&cfg, JOB, &store, rt.handle(), &shared, &predictor).unwrap();
    assert_eq!(s.rounds, 3);
    let rounds = rt.block_on(store.rounds(JOB)).unwrap();
    assert_eq!(rounds.len(), 3);
    assert_eq!(rounds[2].accepted, 3);
    assert_eq!(predictor.round(), Some(3));
    // The ledger came back with the checkpoint: hospital-1's third release
    // is charged on top of its first two (a fresh ledger would report the
    // first release's epsilon again).
    let eps: Vec<f64> = rt
        .block_on(store.updates(JOB, None, Some("hospital-1")))
        .unwrap()
        .iter()
        .filter_map(|u| u.epsilon)
        .collect();
    assert_eq!(eps.len(), 3, "{eps:?}");
    assert!(
        eps[2] > eps[1] && eps[1] > eps[0] && eps[2] <= 50.0,
        "{eps:?}"
    );
    assert!(dir.path().join("dp-ledgers/hospital-1.json").exists());

    // A fourth round would take hospitals 1 and 3 past the budget spread
    // over 3 rounds: they refuse, the quorum cannot be met by hospital-2
    // alone, and the run ends with a clear error instead of retrying.
    let mut cfg = config(dir.path(), 4);
    cfg.resume = true;
    let e = sim::run(&cfg, JOB, &store, rt.handle(), &shared, &predictor).unwrap_err();
    assert!(
        e.to_string()
            .contains("privacy budgets of hospital-1, hospital-3 are spent"),
        "{e}"
    );
    let rounds = rt.block_on(store.rounds(JOB)).unwrap();
    assert_eq!(rounds.len(), 4, "the refused round is recorded");
    assert_eq!(rounds[3].outcome, "quorum_not_reached", "{:?}", rounds[3]);
}

/// Round 1's sign-flipping hospital-1 has a lower weight and trust than
/// hospitals 2 and 3.
fn assert_byzantine_least(rt: &tokio::runtime::Runtime, store: &Store) {
    let ups = rt.block_on(store.updates(JOB, Some(1), None)).unwrap();
    let of = |name: &str| ups.iter().find(|u| u.client_id == name).unwrap();
    let byzantine = of("hospital-1");
    for honest in [of("hospital-2"), of("hospital-3")] {
        assert!(
            byzantine.weight.unwrap() < honest.weight.unwrap()
                && byzantine.trust.unwrap() < honest.trust.unwrap(),
            "{byzantine:?} vs {honest:?}"
        );
    }
}

/// `--encrypt all`: every hospital seals its whole DenseNet-121 update, the
/// server aggregates ciphertexts only with the encrypted geometric median,
/// and the sign-flipping hospital gets the lowest weight and trust.
#[test]
fn whole_updates_encrypted_run_the_encrypted_geometric_median() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, store, shared, predictor) = setup(dir.path());
    let cfg = sim_config(
        dir.path(),
        1,
        &["--encrypt", "all", "--byzantine", "1", "--min-clients", "3"],
    );
    let s = sim::run(&cfg, JOB, &store, rt.handle(), &shared, &predictor).unwrap();
    assert_eq!(s.rounds, 1);
    let rounds = rt.block_on(store.rounds(JOB)).unwrap();
    assert_eq!(rounds.len(), 1);
    let r = &rounds[0];
    assert_eq!(r.outcome, "completed", "{r:?}");
    assert_eq!(r.accepted, 3, "{r:?}");
    assert!(
        r.aggregator.starts_with("encrypted-geometric-median"),
        "{r:?}"
    );
    // The evaluation site opened the whole encrypted model.
    assert!(r.loss.unwrap().is_finite(), "{r:?}");
    assert_byzantine_least(&rt, &store);
    // Client-level DP on the clear part would cover nothing here: refused.
    let mut dp = cfg.clone();
    dp.dp.mode = fedcore_hospital::recipe::DpMode::Client;
    let e = sim::run(&dp, JOB, &store, rt.handle(), &shared, &predictor).unwrap_err();
    assert!(e.to_string().contains("--encrypt all"), "{e}");
}

/// `--keys multiparty --encrypt all`: whole updates sealed under the
/// collective key; the server computes their distances with the collective
/// relinearization key, the hospitals decrypt them together (each its share
/// of one coefficient per pair), and the median's sum is switched to their
/// output key. The sign-flipping hospital gets the lowest weight and trust;
/// a resumed run makes the same relinearization key again, and keys made
/// for the head are refused for whole updates.
///
/// Ignored in `make test`: three hospitals' whole DenseNet-121 updates
/// (7M values each, 105 B/value under multiparty keys) and their key
/// switches in one process peak at 17.9 GB and take 8.5 minutes (2-core
/// AMD EPYC VM, 2026-12-05), beyond CI's machine. Run it with
/// `cargo test -p fedcore-hospital --test sim -- --ignored whole_updates_under_multiparty_keys`.
/// The protocol itself runs in CI in `fedcore-he/tests/multiparty_median.rs`.
#[test]
#[ignore = "17.9 GB and 8.5 minutes: run with --ignored (see the comment)"]
fn whole_updates_under_multiparty_keys_run_the_multiparty_median() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, store, shared, predictor) = setup(dir.path());
    let flags = [
        "--keys",
        "multiparty",
        "--encrypt",
        "all",
        "--byzantine",
        "1",
        "--min-clients",
        "3",
        "--dp",
        "off",
    ];
    let cfg = sim_config(dir.path(), 1, &flags);
    let s = sim::run(&cfg, JOB, &store, rt.handle(), &shared, &predictor).unwrap();
    assert_eq!(s.rounds, 1);
    let r = &rt.block_on(store.rounds(JOB)).unwrap()[0];
    assert_eq!(r.outcome, "completed", "{r:?}");
    assert_eq!(r.accepted, 3, "{r:?}");
    assert!(
        r.aggregator.starts_with("encrypted-geometric-median")
            && r.aggregator.ends_with("+key-switch"),
        "{r:?}"
    );
    assert!(r.loss.unwrap().is_finite(), "{r:?}");
    assert_byzantine_least(&rt, &store);
    // Resumed: the keys are read back and the relinearization key made
    // again from the same shares; round 2 completes.
    let mut more = sim_config(dir.path(), 2, &flags);
    more.resume = true;
    let s = sim::run(&more, JOB, &store, rt.handle(), &shared, &predictor).unwrap();
    assert_eq!(s.rounds, 2);
    let r = &rt.block_on(store.rounds(JOB)).unwrap()[1];
    assert_eq!(r.outcome, "completed", "{r:?}");
    // The same folder's keys do not seal the head only.
    let mut head = sim_config(dir.path(), 3, &["--keys", "multiparty"]);
    head.resume = true;
    let e = sim::run(&head, JOB, &store, rt.handle(), &shared, &predictor).unwrap_err();
    assert!(e.to_string().contains("were made for whole updates"), "{e}");
}

/// `--keys multiparty`: the head is sealed under a collective key made from
/// each hospital's share, and every round's sum is switched to the
/// hospitals' output key by a second step. The run folder holds each
/// hospital's share and no secret of the server's; the run resumes with
/// the same keys; a threshold lets a round complete with a hospital gone.
#[test]
fn multiparty_keys_run_switch_each_round_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let (rt, store, shared, predictor) = setup(dir.path());
    let flags = ["--keys", "multiparty", "--dp", "off"];
    let cfg = sim_config(dir.path(), 2, &flags);
    let s = sim::run(&cfg, JOB, &store, rt.handle(), &shared, &predictor).unwrap();
    assert_eq!(s.rounds, 2);
    let rounds = rt.block_on(store.rounds(JOB)).unwrap();
    assert_eq!(rounds.len(), 2);
    for r in &rounds {
        assert_eq!(r.outcome, "completed", "{r:?}");
        assert_eq!(r.accepted, 3, "N-of-N: every hospital, {r:?}");
        assert!(r.aggregator.ends_with("+key-switch"), "{r:?}");
        // The evaluation site opened the head under the output key.
        assert!(r.loss.unwrap().is_finite(), "{r:?}");
    }
    let keys = dir.path().join("he-keys");
    for i in 1..=3 {
        assert!(keys.join(format!("he-party-{i}.key")).exists());
    }
    assert!(keys.join("he-crs.bin").exists());
    assert!(!keys.join("he-threshold-1.key").exists());
    // The dashboard is told whose keys protect the head.
    assert_eq!(
        shared.progress.read().unwrap().keys,
        fedcore_hospital::recipe::HeKeys::Multiparty
    );
    assert_eq!(shared.progress.read().unwrap().threshold, None);

    // Resumed: the same keys are read back (the sealed global in the
    // checkpoint is under the same output key) and round 3 completes.
    let mut more = sim_config(dir.path(), 3, &flags);
    more.resume = true;
    let s = sim::run(&more, JOB, &store, rt.handle(), &shared, &predictor).unwrap();
    assert_eq!(s.rounds, 3);
    let rounds = rt.block_on(store.rounds(JOB)).unwrap();
    assert_eq!(rounds[2].outcome, "completed", "{:?}", rounds[2]);
    // Asking the same folder for other keys is refused, not mixed.
    let mut single = sim_config(dir.path(), 4, &["--dp", "off"]);
    single.resume = true;
    let e = sim::run(&single, JOB, &store, rt.handle(), &shared, &predictor).unwrap_err();
    assert!(e.to_string().contains("are multiparty keys"), "{e}");
    let mut other = sim_config(dir.path(), 4, &[&flags[..], &["--threshold", "2"]].concat());
    other.resume = true;
    let e = sim::run(&other, JOB, &store, rt.handle(), &shared, &predictor).unwrap_err();
    assert!(
        e.to_string().contains("were made for every hospital"),
        "{e}"
    );

    // 2 of 3: hospital 3 drops out of every round, the others complete it.
    let dir = tempfile::tempdir().unwrap();
    let (rt, store, shared, predictor) = setup(dir.path());
    let cfg = sim_config(
        dir.path(),
        1,
        &[&flags[..], &["--threshold", "2", "--drop-client", "3"]].concat(),
    );
    let s = sim::run(&cfg, JOB, &store, rt.handle(), &shared, &predictor).unwrap();
    assert_eq!(s.rounds, 1);
    let r = &rt.block_on(store.rounds(JOB)).unwrap()[0];
    assert_eq!(r.outcome, "completed", "{r:?}");
    assert_eq!(r.accepted, 2, "{r:?}");
    assert!(dir.path().join("he-keys/he-threshold-3.key").exists());
    assert_eq!(shared.progress.read().unwrap().threshold, Some(2));

    // What multiparty keys cannot do yet, or a threshold without them.
    for (extra, says) in [
        (&["--encrypt", "none"][..], "needs something encrypted"),
        (&["--drop-client", "3"][..], "set --threshold"),
        (&["--threshold", "1"][..], "between 2 and the 3 hospitals"),
        (
            &["--threshold", "3", "--drop-client", "1"][..],
            "only 2 hospitals can answer",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = sim_config(dir.path(), 1, &[&flags[..], extra].concat());
        let e = sim::run(&cfg, JOB, &store, rt.handle(), &shared, &predictor).unwrap_err();
        assert!(e.to_string().contains(says), "{extra:?}: {e}");
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = sim_config(dir.path(), 1, &["--threshold", "2"]);
    let e = sim::run(&cfg, JOB, &store, rt.handle(), &shared, &predictor).unwrap_err();
    assert!(
        e.to_string()
            .contains("--threshold applies to --keys multiparty"),
        "{e}"
    );
}
