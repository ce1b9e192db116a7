//! Jobs: the store's `jobs` table and its lifecycle on SQLite (and on
//! PostgreSQL when `FEDCORE_TEST_POSTGRES` is set), rounds recorded before
//! jobs existed, a deployed server's connection tables, a user's erasure
//! beside a concurrent writer, and the runs page's API with a real queue
//! training small MNIST jobs: an admin starts, stops, resumes, compares and
//! deletes them; a viewer can do none of it.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode, header};
use fedcore_hospital::api::{AppState, UploadLimits};
use fedcore_hospital::auth::{ClientAddress, LoginLimit, TokenLife};
use fedcore_hospital::infer::Predictor;
use fedcore_hospital::jobs::{JobOptions, JobQueue};
use fedcore_hospital::live::Shared;
use fedcore_hospital::store::{
    ClientStatus, ConnectionRow, JobKind, JobStatus, NewJob, NewRound, REFUSALS_KEPT, RefusalRow,
    Role, RoundRow, Store, TrustRow, UpdateRow,
};
use fedcore_hospital::web::{self, ServerLimits, WebConfig};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

// ---------------------------------------------------------------- the store

fn round(job_round: i64, auroc: f64, epsilon: f64) -> NewRound {
    NewRound {
        round: RoundRow {
            id: job_round,
            outcome: "completed".into(),
            aggregator: "FedAvg".into(),
            started_at: 1_700_000_000_000 + job_round,
            duration_ms: 10,
            accepted: 1,
            rejected: 0,
            loss: Some(1.0 / job_round as f64),
            train_loss: None,
            auroc_macro: Some(auroc),
            update_norm: None,
        },
        updates: vec![UpdateRow {
            round_id: job_round,
            client_id: "hospital-1".into(),
            accepted: true,
            reason: None,
            weight: Some(1.0),
            trust: Some(1.0),
            update_norm: Some(1.0),
            num_examples: Some(10),
            epsilon: Some(epsilon),
            delta: Some(1e-5),
            upload_bytes: Some(5_000),
        }],
        trust: vec![(
            "hospital-1".into(),
            TrustRow {
                round_id: job_round,
                trust: 1.0,
                trust_ema: None,
                suspicious: false,
            },
        )],
        metrics: vec![("eval.accuracy".into(), auroc)],
    }
}

fn new_job(status: JobStatus) -> NewJob<'static> {
    static SETTINGS: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    NewJob {
        kind: JobKind::Mnist,
        name: "a job",
        settings: SETTINGS.get_or_init(|| json!({"kind": "mnist"})),
        created_by: None,
        run_dir: Some("a-folder"),
        status,
    }
}

/// The lifecycle and the per-job records on one store.
async fn lifecycle(store: &Store) {
    // Two runs record the same round numbers without touching each other.
    let a = store
        .create_job(&new_job(JobStatus::Running))
        .await
        .unwrap();
    let b = store.create_job(&new_job(JobStatus::Queued)).await.unwrap();
    assert_eq!((a, b), (1, 2), "a new store numbers its jobs from 1");
    assert_eq!(store.current_job().await.unwrap(), Some(a));
    for r in 1..=3 {
        store
            .record_round(a, &round(r, 0.5 + 0.1 * r as f64, r as f64))
            .await
            .unwrap();
    }
    store.record_round(b, &round(1, 0.9, 7.0)).await.unwrap();
    assert_eq!(store.rounds(a).await.unwrap().len(), 3);
    assert_eq!(store.rounds(b).await.unwrap().len(), 1);
    let ups = store.updates(a, Some(1), None).await.unwrap();
    assert_eq!(ups.len(), 1);
    assert_eq!(
        ups[0].upload_bytes,
        Some(5_000),
        "the upload's bytes are kept"
    );
    assert_eq!(store.trust(b, "hospital-1").await.unwrap().len(), 1);
    assert_eq!(
        store.epsilons(a).await.unwrap(),
        vec![(1, 1.0), (2, 2.0), (3, 3.0)]
    );
    let row = store.job(a).await.unwrap().unwrap();
    assert_eq!(row.rounds, 3);
    assert_eq!(row.epsilon, Some(3.0));
    assert!((row.auroc_macro.unwrap() - 0.8).abs() < 1e-12);
    assert!((row.accuracy.unwrap() - 0.8).abs() < 1e-12);
    assert!(row.started_at.is_some() && row.finished_at.is_none());

    // Transitions happen only from the states they name.
    assert!(
        !store
            .move_job(a, &[JobStatus::Queued], JobStatus::Stopped, None)
            .await
            .unwrap()
    );
    assert!(!store.delete_job(a).await.unwrap(), "a running job stays");
    assert!(
        store
            .move_job(a, &[JobStatus::Running], JobStatus::Failed, Some("boom"))
            .await
            .unwrap()
    );
    let row = store.job(a).await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.error.as_deref()),
        (JobStatus::Failed, Some("boom"))
    );
    assert!(row.finished_at.is_some());
    assert!(store.requeue_job(a, true).await.unwrap());
    assert!(!store.requeue_job(a, true).await.unwrap(), "already queued");
    let row = store.job(a).await.unwrap().unwrap();
    assert_eq!(
        (row.status, row.resume, row.error),
        (JobStatus::Queued, true, None)
    );

    // The queue takes the oldest queued job first.
    let next = store.start_next_job().await.unwrap().unwrap();
    assert_eq!((next.id, next.status), (a, JobStatus::Running));
    let next = store.start_next_job().await.unwrap().unwrap();
    assert_eq!(next.id, b);
    assert!(store.start_next_job().await.unwrap().is_none());

    // A restart finds both training: they become stopped and resumable.
    assert_eq!(store.recover_jobs().await.unwrap(), 2);
    for id in [a, b] {
        let j = store.job(id).await.unwrap().unwrap();
        assert_eq!((j.status, j.resume), (JobStatus::Stopped, true));
    }

    // Deleting one job takes its records and leaves the other's.
    assert!(store.delete_job(b).await.unwrap());
    assert!(store.job(b).await.unwrap().is_none());
    assert!(store.rounds(b).await.unwrap().is_empty());
    assert!(store.trust(b, "hospital-1").await.unwrap().is_empty());
    assert!(store.epsilons(b).await.unwrap().is_empty());
    assert_eq!(store.rounds(a).await.unwrap().len(), 3);
    assert_eq!(
        store
            .jobs()
            .await
            .unwrap()
            .iter()
            .map(|j| j.id)
            .collect::<Vec<_>>(),
        vec![a]
    );
    assert!(
        store
            .move_job(a, &[], JobStatus::Stopped, None)
            .await
            .is_err(),
        "a move names where it comes from"
    );
    // A queued job runs only once it has its folder.
    let c = store
        .create_job(&NewJob {
            run_dir: None,
            ..new_job(JobStatus::Queued)
        })
        .await
        .unwrap();
    assert!(store.start_next_job().await.unwrap().is_none());
    store.set_job_run_dir(c, "its-folder").await.unwrap();
    assert_eq!(store.start_next_job().await.unwrap().map(|j| j.id), Some(c));

    // A cross-site matrix is kept with its job and goes with it.
    assert_eq!(store.job_cross_site(c).await.unwrap(), Some(None));
    assert_eq!(store.job_cross_site(999).await.unwrap(), None);
    let matrix = serde_json::json!({"round": 3, "sites": ["hospital-1"], "cells": [[null]]});
    store.set_job_cross_site(c, &matrix).await.unwrap();
    assert_eq!(store.job_cross_site(c).await.unwrap(), Some(Some(matrix)));
    assert_eq!(store.job_cross_site(a).await.unwrap(), Some(None));
    store
        .move_job(c, &[JobStatus::Running], JobStatus::Stopped, None)
        .await
        .unwrap();
    assert!(store.delete_job(c).await.unwrap());
    assert_eq!(store.job_cross_site(c).await.unwrap(), None);
}

/// A store migrated from before jobs: the rounds recorded then are job 1.
async fn migrated(url: &str, old_migrations: &Path) {
    use sqlx::any::{AnyPoolOptions, install_default_drivers};
    install_default_drivers();
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .unwrap();
    sqlx::migrate::Migrator::new(old_migrations)
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO rounds (id, outcome, aggregator, started_at, duration_ms, accepted, rejected, \
         auroc_macro) VALUES (1, 'completed', 'FedAvg', 1000, 50, 3, 0, 0.7), \
         (2, 'completed', 'FedAvg', 2000, 50, 3, 0, 0.8)",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO client_updates (round_id, client_id, accepted, epsilon) \
         VALUES (2, 'hospital-1', 1, 2.5)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let store = Store::connect(url).await.unwrap();
    let jobs = store.jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    let j = &jobs[0];
    assert_eq!(
        (j.id, j.kind, j.status),
        (1, JobKind::Xray, JobStatus::Finished)
    );
    assert_eq!(
        (j.rounds, j.auroc_macro, j.epsilon),
        (2, Some(0.8), Some(2.5))
    );
    assert_eq!(j.started_at, Some(1000));
    assert_eq!(j.finished_at, Some(2050));
    assert_eq!(store.current_job().await.unwrap(), Some(1));
    assert_eq!(store.updates(1, Some(2), None).await.unwrap().len(), 1);
    // New jobs number on from it.
    let next = store.create_job(&new_job(JobStatus::Queued)).await.unwrap();
    assert_eq!(next, 2);
}

/// The migrations before jobs, copied into a folder of their own.
fn old_migrations(db: &str, to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(db);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(&from).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name.as_str() < "0004" {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

/// A deployed server's connections: each hospital's latest session
/// replaces the one before; refused connections are kept newest first, at
/// most `REFUSALS_KEPT`; a hospital that connects is registered without
/// touching a known one's status.
async fn connections(store: &Store) {
    let session = |site: &str, at: i64| ConnectionRow {
        site: site.into(),
        fingerprint: format!("{site}-fp"),
        not_after: Some(at + 365 * 24 * 3600 * 1000),
        peer: Some("127.0.0.1:4000".into()),
        connected_at: at,
        last_seen: at + 2000,
        closed_at: None,
        close_reason: None,
    };
    store.record_connection(&session("h2", 1000)).await.unwrap();
    store.record_connection(&session("h1", 500)).await.unwrap();
    let mut closed = session("h2", 1000);
    closed.last_seen = 9000;
    closed.closed_at = Some(9500);
    closed.close_reason = Some("certificate h2-fp of `h2` is revoked".into());
    store.record_connection(&closed).await.unwrap();
    assert_eq!(
        store.connections().await.unwrap(),
        [session("h1", 500), closed.clone()]
    );
    // A new session of h2 replaces the closed one.
    store
        .record_connection(&session("h2", 20_000))
        .await
        .unwrap();
    assert_eq!(store.connections().await.unwrap()[1], session("h2", 20_000));
    // A server that starts closes what an ended process left open.
    assert_eq!(
        store
            .close_open_connections(30_000, "the server restarted")
            .await
            .unwrap(),
        2
    );
    for c in store.connections().await.unwrap() {
        assert_eq!(c.closed_at, Some(30_000));
        assert_eq!(c.close_reason.as_deref(), Some("the server restarted"));
    }

    let refusal = |i: i64| RefusalRow {
        id: 0,
        at: i,
        site: "h3".into(),
        fingerprint: format!("fp{i}"),
        not_after: None,
        peer: None,
        kind: if i % 2 == 0 {
            "revoked"
        } else {
            "not_on_roster"
        }
        .into(),
        reason: format!("refusal {i}"),
        closed_session: i == 1,
    };
    let first = store.record_refusal(&refusal(1)).await.unwrap();
    store.record_refusal(&refusal(2)).await.unwrap();
    let newest = store.refusals(10).await.unwrap();
    assert_eq!(newest.len(), 2);
    assert_eq!(
        newest[1],
        RefusalRow {
            id: first,
            ..refusal(1)
        }
    );
    assert_eq!(newest[0].kind, "revoked");
    assert!(!newest[0].closed_session);
    for i in 3..=REFUSALS_KEPT + 2 {
        store.record_refusal(&refusal(i)).await.unwrap();
    }
    let kept = store.refusals(2 * REFUSALS_KEPT).await.unwrap();
    assert_eq!(kept.len() as i64, REFUSALS_KEPT, "the oldest are deleted");
    assert_eq!(kept[0].at, REFUSALS_KEPT + 2);
    assert_eq!(kept.last().unwrap().at, 3);

    store.ensure_client("h1").await.unwrap();
    store.upsert_client("h2", 40, 10).await.unwrap();
    store
        .set_client_status("h2", ClientStatus::Suspended)
        .await
        .unwrap();
    store.ensure_client("h2").await.unwrap();
    let h1 = store.client("h1").await.unwrap().unwrap();
    assert_eq!((h1.status, h1.examples), (ClientStatus::Active, 0));
    let h2 = store.client("h2").await.unwrap().unwrap();
    assert_eq!((h2.status, h2.examples), (ClientStatus::Suspended, 40));
}

#[tokio::test]
async fn each_run_is_a_job_with_its_own_rounds_on_sqlite_and_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("j.sqlite").display()
    );
    lifecycle(&Store::connect(&url).await.unwrap()).await;
    connections(&Store::connect(&url).await.unwrap()).await;
    old_migrations("sqlite", &dir.path().join("old-sqlite"));
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("old.sqlite").display()
    );
    migrated(&url, &dir.path().join("old-sqlite")).await;

    let Ok(pg) = std::env::var("FEDCORE_TEST_POSTGRES") else {
        eprintln!("FEDCORE_TEST_POSTGRES is not set: PostgreSQL not tested here");
        return;
    };
    reset_postgres(&pg).await;
    lifecycle(&Store::connect(&pg).await.unwrap()).await;
    connections(&Store::connect(&pg).await.unwrap()).await;
    reset_postgres(&pg).await;
    old_migrations("postgres", &dir.path().join("old-postgres"));
    migrated(&pg, &dir.path().join("old-postgres")).await;
    reset_postgres(&pg).await;
}

/// Erasing a user while another connection holds SQLite's write lock
/// waits for it (the busy timeout) instead of failing: the erasure's
/// transaction starts with a write. A transaction that reads first cannot
/// upgrade while another connection writes (SQLite answers SQLITE_BUSY at
/// once, without waiting), which was a 500 from DELETE /api/users/{id}
/// whenever a training round was being recorded at that moment.
#[tokio::test]
async fn erasing_a_user_waits_for_a_concurrent_writer() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("u.sqlite").display()
    );
    let store = Store::connect(&url).await.unwrap();
    let user = store
        .create_user("carol", "hash", Role::Viewer)
        .await
        .unwrap()
        .unwrap();
    let mut writer = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut writer)
        .await
        .unwrap();
    let erase = tokio::spawn({
        let store = store.clone();
        async move { store.anonymize_user(user.id).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!erase.is_finished(), "the erasure waits for the writer");
    sqlx::query("COMMIT").execute(&mut writer).await.unwrap();
    assert!(erase.await.unwrap().unwrap(), "erased after the writer");
    assert!(store.user(user.id).await.unwrap().is_none());
    let alias: String = sqlx::query_scalar("SELECT username FROM users WHERE id = ?")
        .bind(user.id)
        .fetch_one(&mut writer)
        .await
        .unwrap();
    assert_eq!(alias, format!("deleted-{}", user.id));
    assert!(store.user_by_name("carol").await.unwrap().is_none());
    // A second erasure finds nothing to erase.
    assert!(!store.anonymize_user(user.id).await.unwrap());

    // A name from before new names were kept off `deleted-`: the alias
    // steps aside instead of failing on the unique name.
    let dave = store
        .create_user("dave", "hash", Role::Viewer)
        .await
        .unwrap()
        .unwrap();
    sqlx::query(
        "INSERT INTO users (username, password_hash, role, created_at) VALUES (?, 'h', 'viewer', 0)",
    )
    .bind(format!("Deleted-{}", dave.id))
    .execute(&mut writer)
    .await
    .unwrap();
    assert!(store.anonymize_user(dave.id).await.unwrap());
    let alias: String = sqlx::query_scalar("SELECT username FROM users WHERE id = ?")
        .bind(dave.id)
        .fetch_one(&mut writer)
        .await
        .unwrap();
    assert_eq!(alias, format!("deleted-{}-2", dave.id));
}

async fn reset_postgres(url: &str) {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    for q in ["DROP SCHEMA public CASCADE", "CREATE SCHEMA public"] {
        sqlx::query(q).execute(&mut c).await.unwrap();
    }
}

// ---------------------------------------------------------------- the API

const PASSWORDS: [(&str, &str); 2] = [
    ("admin", "admin-password-123"),
    ("viewer", "viewer-password-123"),
];

/// A tiny MNIST: 28 x 28 images whose digit is where a bright square sits,
/// on noise, as IDX files (what `--mnist-dir` points at).
fn write_mnist(dir: &Path, train: usize, test: usize) {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    std::fs::create_dir_all(dir).unwrap();
    for (prefix, n) in [("train", train), ("t10k", test)] {
        let mut images = vec![0, 0, 8, 3];
        images.extend((n as u32).to_be_bytes());
        images.extend(28u32.to_be_bytes());
        images.extend(28u32.to_be_bytes());
        let mut labels = vec![0, 0, 8, 1];
        labels.extend((n as u32).to_be_bytes());
        for _ in 0..n {
            let digit = rng.random_range(0..10u8);
            labels.push(digit);
            let (r0, c0) = (
                4 + usize::from(digit / 5) * 12,
                1 + usize::from(digit % 5) * 5,
            );
            for r in 0..28 {
                for c in 0..28 {
                    let inside = (r0..r0 + 6).contains(&r) && (c0..c0 + 5).contains(&c);
                    let noise: u8 = rng.random_range(0..60);
                    images.push(if inside { 255 - noise } else { noise });
                }
            }
        }
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), images).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), labels).unwrap();
    }
}

struct Harness {
    app: Router,
    state: AppState,
    root: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mnist = dir.path().join("mnist");
    write_mnist(&mnist, 600, 200);
    let config = WebConfig {
        database_url: format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("t.sqlite").display()
        ),
        jwt_secret: Some("a test secret that is long enough!".into()),
        token_life: TokenLife {
            access: Duration::from_secs(600),
            session: Duration::from_secs(3600),
        },
        login_limit: LoginLimit {
            burst: 5,
            per: Duration::from_secs(60),
        },
        client_address: ClientAddress::default(),
        server: ServerLimits::default(),
        uploads: UploadLimits::default(),
        tls: None,
        at_rest: None,
    };
    let shared = Arc::new(Shared::default());
    let predictor = Arc::new(Predictor::new(32, 1));
    let mut state = web::state(&config, shared.clone(), predictor.clone())
        .await
        .unwrap();
    for (name, password) in PASSWORDS {
        let hash = fedcore_hospital::auth::hash_password(password).unwrap();
        state
            .store
            .create_user(name, &hash, name.parse().unwrap())
            .await
            .unwrap();
    }
    let root = dir.path().join("run");
    let queue = Arc::new(JobQueue::new(
        state.store.clone(),
        shared,
        predictor,
        JobOptions {
            root: root.clone(),
            mnist_dir: Some(mnist),
            chestxray14_dir: None,
        },
    ));
    state.jobs = Some(queue.clone());
    tokio::spawn(queue.work());
    let app =
        web::app(state.clone()).layer(MockConnectInfo(SocketAddr::from(([10, 0, 0, 7], 4000))));
    Harness {
        app,
        state,
        root,
        _dir: dir,
    }
}

async fn send(
    app: &Router,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let b = Request::builder()
        .method(method)
        .uri(path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"));
    let req = match body {
        Some(v) => b
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(v.to_string()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    };
    let r = app.clone().oneshot(req).await.unwrap();
    let status = r.status();
    let bytes = r.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, v)
}

async fn login(app: &Router, user: &str) -> String {
    let pw = PASSWORDS.iter().find(|p| p.0 == user).unwrap().1;
    let req = Request::builder()
        .method("POST")
        .uri("/api/auth/login")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            json!({"username": user, "password": pw}).to_string(),
        ))
        .unwrap();
    let r = app.clone().oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let bytes = r.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice::<Value>(&bytes).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Polls a job until `done` says so (or fails after two minutes).
async fn wait_for(
    app: &Router,
    token: &str,
    id: i64,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let (s, job) = send(app, "GET", &format!("/api/jobs/{id}"), token, None).await;
        assert_eq!(s, StatusCode::OK);
        if done(&job) {
            return job;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "job {id} never {what}: {job}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An MNIST job with server momentum, FedProx and cross-site evaluation
/// (issue 22 in the app): it trains, and its matrix scores the global model
/// and each hospital's local model on each hospital's held-out tenth; X-ray
/// runs refuse these settings, and a run without the matrix answers 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mnist_job_with_server_momentum_fedprox_and_cross_site_keeps_its_matrix() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let viewer = login(&h.app, "viewer").await;
    let (s, choices) = send(&h.app, "GET", "/api/jobs/choices", &admin, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        choices["server_optimizers"],
        json!(["sgd", "momentum", "adam", "yogi"])
    );
    let mut body = mnist_job(2, true);
    body["server_optimizer"] = json!("momentum");
    body["proximal_mu"] = json!(0.01);
    body["cross_site"] = json!(true);
    body["upload"] = json!("int8");
    let (s, job) = send(&h.app, "POST", "/api/jobs", &admin, Some(body)).await;
    assert_eq!(s, StatusCode::CREATED, "{job}");
    let id = job["id"].as_i64().unwrap();
    assert_eq!(job["settings"]["server_optimizer"], "momentum");
    assert_eq!(job["settings"]["proximal_mu"], 0.01);
    assert_eq!(job["settings"]["upload"], "int8");
    let done = wait_for(&h.app, &admin, id, "finished", |j| {
        j["status"] != "queued" && j["status"] != "running"
    })
    .await;
    assert_eq!(done["status"], "finished", "{done}");
    assert_eq!(done["rounds"], 2);
    // In int8 each update took a byte per value and a 4-byte scale per
    // tensor: 26,010 + 8 x 4 bytes, against 104,040 in float32.
    let (s, round) = send(
        &h.app,
        "GET",
        &format!("/api/training/rounds/1?job={id}"),
        &viewer,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{round}");
    let ups = round["updates"].as_array().unwrap();
    assert_eq!(ups.len(), 2, "{round}");
    assert!(ups.iter().all(|u| u["upload_bytes"] == 26_042), "{round}");

    let (s, cs) = send(
        &h.app,
        "GET",
        &format!("/api/jobs/{id}/cross-site"),
        &viewer,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{cs}");
    let m = &cs["matrix"];
    assert_eq!(m["round"], 2);
    assert_eq!(m["sites"], json!(["hospital-1", "hospital-2"]));
    let models: Vec<&str> = m["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["type"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["global", "local", "local"]);
    for row in m["cells"].as_array().unwrap() {
        let row = row.as_array().unwrap();
        assert_eq!(row.len(), 2);
        for cell in row {
            // 600 images, 2 hospitals: 300 each, 30 held out.
            assert_eq!(cell["num_examples"], 30, "{cell}");
            let acc = cell["metrics"]["accuracy"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&acc), "{cell}");
        }
    }
    // The hospitals train on the rest: the dashboard lists 270 images each.
    let (_, clients) = send(&h.app, "GET", "/api/clients", &admin, None).await;
    assert_eq!(clients.as_array().unwrap().len(), 2, "{clients}");
    assert!(
        clients
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["examples"] == 270),
        "{clients}"
    );

    // A job without the matrix, and no job at all: 404.
    let (s, other) = send(
        &h.app,
        "POST",
        "/api/jobs",
        &admin,
        Some(mnist_job(1, false)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let other = other["id"].as_i64().unwrap();
    wait_for(&h.app, &admin, other, "finished", |j| {
        j["status"] == "finished"
    })
    .await;
    for missing in [other, 999] {
        let (s, _) = send(
            &h.app,
            "GET",
            &format!("/api/jobs/{missing}/cross-site"),
            &admin,
            None,
        )
        .await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
    // X-ray runs and out-of-range values are refused with the reason.
    for (extra, why) in [
        (
            json!({"data": "synthetic_xrays", "cross_site": true}),
            "MNIST jobs",
        ),
        (
            json!({"data": "synthetic_xrays", "server_optimizer": "adam"}),
            "MNIST jobs",
        ),
        (json!({"proximal_mu": 11.0}), "proximal_mu"),
        (
            json!({"upload": "top-k:2"}),
            "top-k keeps a fraction in (0, 1]",
        ),
        (
            json!({"data": "synthetic_xrays", "upload": "int8"}),
            "compressed uploads",
        ),
    ] {
        let mut body = mnist_job(1, false);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (s, e) = send(&h.app, "POST", "/api/jobs", &admin, Some(body)).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        assert!(e["error"].as_str().unwrap().contains(why), "{e}");
    }
}

fn mnist_job(rounds: u64, dp: bool) -> Value {
    json!({"data": "mnist", "rounds": rounds, "hospitals": 2, "aggregator": "fedavg",
           "dp": dp, "epsilon": 8.0, "seed": 3})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_start_stop_resume_compare_and_delete_jobs_and_viewers_cannot() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let viewer = login(&h.app, "viewer").await;

    // The form offers MNIST here; a viewer reads but starts nothing.
    let (s, choices) = send(&h.app, "GET", "/api/jobs/choices", &viewer, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(choices["enabled"], true);
    assert!(
        choices["data"]
            .as_array()
            .unwrap()
            .contains(&json!("mnist"))
    );
    assert!(
        !choices["data"]
            .as_array()
            .unwrap()
            .contains(&json!("chestxray14"))
    );
    let (s, _) = send(
        &h.app,
        "POST",
        "/api/jobs",
        &viewer,
        Some(mnist_job(2, false)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(h.state.store.jobs().await.unwrap().is_empty());

    // Bad requests are refused with a reason.
    for (bad, why) in [
        (
            json!({"data": "mnist", "rounds": 0, "hospitals": 2}),
            "rounds",
        ),
        (
            json!({"data": "mnist", "rounds": 2, "hospitals": 2, "encrypt": "head"}),
            "encryption",
        ),
        (
            json!({"data": "mnist", "rounds": 2, "hospitals": 2, "byzantine": 3}),
            "byzantine",
        ),
        (
            json!({"data": "mnist", "rounds": 2, "hospitals": 2, "epsilon": -1.0}),
            "epsilon",
        ),
        (
            json!({"data": "chestxray14", "rounds": 2, "hospitals": 2}),
            "ChestX-ray14",
        ),
        (
            json!({"data": "synthetic_xrays", "rounds": 2, "hospitals": 2, "aggregator": "krum"}),
            "Krum",
        ),
        (
            json!({"data": "mnist", "rounds": 2, "hospitals": 2, "keys": "multiparty"}),
            "encryption",
        ),
        (
            json!({"data": "synthetic_xrays", "rounds": 2, "hospitals": 3, "keys": "multiparty",
                   "encrypt": "all", "aggregator": "fedavg"}),
            "seal the head",
        ),
        (
            json!({"data": "synthetic_xrays", "rounds": 2, "hospitals": 3, "keys": "multiparty",
                   "drop_hospital": 3}),
            "set threshold",
        ),
        (
            json!({"data": "synthetic_xrays", "rounds": 2, "hospitals": 3, "keys": "multiparty",
                   "threshold": 4}),
            "between 2 and the 3 hospitals",
        ),
        (
            json!({"data": "synthetic_xrays", "rounds": 2, "hospitals": 3, "threshold": 2}),
            "threshold applies to multiparty keys",
        ),
        (
            json!({"data": "synthetic_xrays", "rounds": 2, "hospitals": 3, "keys": "multiparty",
                   "threshold": 3, "drop_hospital": 1}),
            "lower the threshold",
        ),
    ] {
        let (s, body) = send(&h.app, "POST", "/api/jobs", &admin, Some(bad.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(why),
            "{bad}: {body}"
        );
    }

    // An MNIST job without DP: it trains, an admin stops it mid-way...
    let (s, a) = send(
        &h.app,
        "POST",
        "/api/jobs",
        &admin,
        Some(mnist_job(12, false)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{a}");
    let a_id = a["id"].as_i64().unwrap();
    assert_eq!(a["kind"], "mnist");
    assert_eq!(a["created_by"], "admin");
    wait_for(&h.app, &admin, a_id, "trained a round", |j| {
        j["rounds"].as_i64() >= Some(1)
    })
    .await;
    let (s, _) = send(
        &h.app,
        "POST",
        &format!("/api/jobs/{a_id}/stop"),
        &viewer,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, j) = send(
        &h.app,
        "POST",
        &format!("/api/jobs/{a_id}/stop"),
        &admin,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{j}");
    let stopped = wait_for(&h.app, &admin, a_id, "stopped", |j| {
        j["status"] == "stopped"
    })
    .await;
    let done_before = stopped["rounds"].as_i64().unwrap();
    assert!((1..12).contains(&done_before), "{stopped}");
    let first = h.state.store.rounds(a_id).await.unwrap()[0].clone();
    // ...a stopped job cannot be stopped again, and a viewer cannot resume it...
    let (s, _) = send(
        &h.app,
        "POST",
        &format!("/api/jobs/{a_id}/stop"),
        &admin,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let (s, _) = send(
        &h.app,
        "POST",
        &format!("/api/jobs/{a_id}/resume"),
        &viewer,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // ...an admin resumes it from its checkpoint, and it finishes.
    let (s, j) = send(
        &h.app,
        "POST",
        &format!("/api/jobs/{a_id}/resume"),
        &admin,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::ACCEPTED, "{j}");
    assert_eq!(j["resume"], true, "it continues from its checkpoint");
    let a = wait_for(&h.app, &admin, a_id, "finished", |j| {
        j["status"] == "finished"
    })
    .await;
    assert_eq!(a["rounds"], 12, "{a}");
    let rounds = h.state.store.rounds(a_id).await.unwrap();
    assert_eq!(
        rounds.iter().map(|r| r.id).collect::<Vec<_>>(),
        (1..=12).collect::<Vec<_>>()
    );
    assert_eq!(
        rounds[0].started_at, first.started_at,
        "resumed, not started over: the rounds before the stop stay as they were"
    );
    let accuracy = a["accuracy"].as_f64().unwrap();
    assert!(accuracy > 0.5, "the squares are learnable: {accuracy}");

    // A second job with DP-SGD at epsilon 8; both curves for the comparison.
    let (s, b) = send(
        &h.app,
        "POST",
        "/api/jobs",
        &admin,
        Some(mnist_job(3, true)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let b_id = b["id"].as_i64().unwrap();
    let b = wait_for(&h.app, &admin, b_id, "finished", |j| {
        j["status"] == "finished" || j["status"] == "failed"
    })
    .await;
    assert_eq!(b["status"], "finished", "{b}");
    let (s, ca) = send(
        &h.app,
        "GET",
        &format!("/api/jobs/{a_id}/curve"),
        &viewer,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (_, cb) = send(
        &h.app,
        "GET",
        &format!("/api/jobs/{b_id}/curve"),
        &viewer,
        None,
    )
    .await;
    assert_eq!(ca["metric"], "accuracy");
    let pa = ca["points"].as_array().unwrap();
    assert_eq!(
        pa.iter()
            .map(|p| p["round"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        (0..=12).collect::<Vec<_>>(),
        "round 0 is the model before training, recorded once (not again on resume)"
    );
    let before = pa[0]["value"].as_f64().unwrap();
    assert!(before < 0.5, "an untrained CNN is near chance: {before}");
    assert!(pa[12]["value"].as_f64().unwrap() > 0.5);
    assert!(
        pa.iter().all(|p| p["epsilon"].is_null()),
        "no DP, no epsilon"
    );
    assert_eq!(ca["budget"], Value::Null);
    let pb = cb["points"].as_array().unwrap();
    assert!(pb[0]["epsilon"].is_null(), "nothing spent before round 1");
    let eps: Vec<f64> = pb[1..]
        .iter()
        .map(|p| p["epsilon"].as_f64().unwrap())
        .collect();
    assert_eq!(eps.len(), 3);
    assert!(eps.windows(2).all(|w| w[0] < w[1]), "{eps:?}");
    assert!(eps[2] <= 8.0 + 1e-9, "{eps:?}");
    assert_eq!(cb["budget"], json!([8.0, 1e-5]));

    // The dashboard's pages read any job; by default the latest.
    let (_, latest) = send(&h.app, "GET", "/api/training/rounds", &viewer, None).await;
    assert_eq!(latest.as_array().unwrap().len(), 3);
    let (_, older) = send(
        &h.app,
        "GET",
        &format!("/api/training/rounds?job={a_id}"),
        &viewer,
        None,
    )
    .await;
    assert_eq!(older.as_array().unwrap().len(), 12);
    let (s, _) = send(&h.app, "GET", "/api/training/rounds?job=x", &viewer, None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    // The runs page lists both; deleting one takes its rounds and folder.
    let (_, list) = send(&h.app, "GET", "/api/jobs", &viewer, None).await;
    assert_eq!(
        list.as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![b_id, a_id]
    );
    let folder = h.root.join("jobs").join(b_id.to_string());
    assert!(folder.join("checkpoints").is_dir());
    let (s, _) = send(
        &h.app,
        "DELETE",
        &format!("/api/jobs/{b_id}"),
        &viewer,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = send(&h.app, "DELETE", &format!("/api/jobs/{b_id}"), &admin, None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert!(!folder.exists());
    assert!(h.state.store.rounds(b_id).await.unwrap().is_empty());
    let (s, _) = send(&h.app, "GET", &format!("/api/jobs/{b_id}"), &admin, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = send(
        &h.app,
        "POST",
        &format!("/api/jobs/{b_id}/resume"),
        &admin,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The API shows no server folders; an unknown job is 404.
    let (_, a_row) = send(&h.app, "GET", &format!("/api/jobs/{a_id}"), &viewer, None).await;
    assert!(a_row["settings"].get("run_dir").is_none(), "{a_row}");
    let (s, _) = send(&h.app, "GET", "/api/training/rounds?job=999", &viewer, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Resuming is refused where it would lie: a job whose folder a later
    // run took over, and one that spent privacy budget before its first
    // checkpoint (starting it over would start its budgets over).
    let orphan = h
        .state
        .store
        .create_job(&NewJob {
            run_dir: None,
            ..new_job(JobStatus::Running)
        })
        .await
        .unwrap();
    h.state
        .store
        .move_job(orphan, &[JobStatus::Running], JobStatus::Stopped, None)
        .await
        .unwrap();
    let (s, body) = send(
        &h.app,
        "POST",
        &format!("/api/jobs/{orphan}/resume"),
        &admin,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("taken over"),
        "{body}"
    );
    let spent = h.root.join("jobs").join("spent");
    std::fs::create_dir_all(spent.join("dp-ledgers")).unwrap();
    std::fs::write(spent.join("dp-ledgers").join("hospital-1.json"), "{}").unwrap();
    h.state
        .store
        .set_job_run_dir(orphan, spent.to_str().unwrap())
        .await
        .unwrap();
    let (s, body) = send(
        &h.app,
        "POST",
        &format!("/api/jobs/{orphan}/resume"),
        &admin,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("privacy budget"),
        "{body}"
    );
    assert_eq!(
        h.state.store.job(orphan).await.unwrap().unwrap().status,
        JobStatus::Stopped
    );

    let log = h.state.store.audit_log(None, 50).await.unwrap();
    for action in ["job_created", "job_stopped", "job_resumed", "job_deleted"] {
        assert!(
            log.iter().any(|e| e.action == action && e.actor == "admin"),
            "{action} audited"
        );
    }
    assert!(
        log.iter()
            .any(|e| e.action == "permission_denied" && e.actor == "viewer"),
        "the viewer's attempts audited"
    );
}
