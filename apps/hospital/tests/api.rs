//! The dashboard's API, in process: every endpoint with its 401/403 paths,
//! rate limiting, bad uploads, SQL-injection-shaped input, encryption at
//! rest, data-subject requests. Runs on SQLite; `FEDCORE_TEST_POSTGRES`
//! (set by scripts/test.sh when it can start Debian's PostgreSQL) runs the
//! same scenario on PostgreSQL.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode, header};
use fedcore::Model;
use fedcore_hospital::api::{AppState, UploadLimits};
use fedcore_hospital::atrest::AtRest;
use fedcore_hospital::auth::{ClientAddress, LoginLimit, TokenLife};
use fedcore_hospital::infer::Predictor;
use fedcore_hospital::live::Shared;
use fedcore_hospital::store::{
    ClientStatus, JobKind, JobStatus, NewJob, NewRound, RoundRow, TrustRow, UpdateRow,
};
use fedcore_hospital::web::{self, ServerLimits, WebConfig};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const PASSWORDS: [(&str, &str); 3] = [
    ("admin", "admin-password-123"),
    ("doctor", "doctor-password-123"),
    ("viewer", "viewer-password-123"),
];
const SIZE: u32 = 32;

struct Harness {
    app: Router,
    state: AppState,
    _dir: tempfile::TempDir,
}

async fn harness_at(url: Option<String>, at_rest: Option<AtRest>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let database_url = url.unwrap_or_else(|| {
        format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("t.sqlite").display()
        )
    });
    let config = WebConfig {
        database_url,
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
        uploads: UploadLimits {
            max_bytes: 256 * 1024,
            max_side: 2048,
            max_decoded_bytes: 1 << 20,
            max_concurrent_decodes: 1,
        },
        tls: None,
        at_rest,
    };
    let predictor = Arc::new(Predictor::new(SIZE, 1));
    predictor
        .update(
            &fedcore_hospital::recipe::densenet(1).unwrap().parameters(),
            3,
        )
        .unwrap();
    let state = web::state(&config, Arc::new(Shared::default()), predictor)
        .await
        .unwrap();
    for (name, password) in PASSWORDS {
        // SAFETY of the test: the env var route is what `bootstrap_users` reads.
        let hash = fedcore_hospital::auth::hash_password(password).unwrap();
        state
            .store
            .create_user(name, &hash, name.parse().unwrap())
            .await
            .unwrap();
    }
    seed_rounds(&state).await;
    let app =
        web::app(state.clone()).layer(MockConnectInfo(SocketAddr::from(([10, 0, 0, 7], 4000))));
    Harness {
        app,
        state,
        _dir: dir,
    }
}

async fn harness() -> Harness {
    harness_at(None, None).await
}

/// Two hospitals, two recorded rounds.
async fn seed_rounds(state: &AppState) {
    for c in ["hospital-1", "hospital-2"] {
        state.store.upsert_client(c, 100, 40).await.unwrap();
    }
    // The first harness on a store creates job 1; another harness on the
    // same store (PostgreSQL's scenario) records into it again.
    let job = match state.store.job(1).await.unwrap() {
        Some(j) => j.id,
        None => state
            .store
            .create_job(&NewJob {
                kind: JobKind::Xray,
                name: "seeded",
                settings: &serde_json::json!({}),
                created_by: None,
                run_dir: None,
                status: JobStatus::Running,
            })
            .await
            .unwrap(),
    };
    for round in 1..=2i64 {
        let update = |c: &str, accepted: bool| UpdateRow {
            round_id: round,
            client_id: c.into(),
            accepted,
            reason: (!accepted).then(|| "invalid update: NaN".into()),
            weight: accepted.then_some(1.0),
            trust: accepted.then_some(0.9),
            update_norm: accepted.then_some(2.5),
            num_examples: accepted.then_some(100),
            epsilon: accepted.then_some(round as f64 * 1.5),
            delta: accepted.then_some(1e-5),
            upload_bytes: accepted.then_some(104_040),
        };
        state
            .store
            .record_round(
                job,
                &NewRound {
                    round: RoundRow {
                        id: round,
                        outcome: "completed".into(),
                        aggregator: "geometric_median".into(),
                        started_at: 1_700_000_000_000 + round,
                        duration_ms: 1000,
                        accepted: 1,
                        rejected: 1,
                        loss: Some(0.5 / round as f64),
                        train_loss: Some(0.6),
                        auroc_macro: Some(0.6 + 0.1 * round as f64),
                        update_norm: Some(1.0),
                    },
                    updates: vec![update("hospital-1", true), update("hospital-2", false)],
                    trust: vec![(
                        "hospital-1".into(),
                        TrustRow {
                            round_id: round,
                            trust: 0.9,
                            trust_ema: Some(0.8),
                            suspicious: round == 2,
                        },
                    )],
                    metrics: vec![
                        ("eval.auroc.Effusion".into(), 0.7),
                        ("eval.auroc_macro".into(), 0.6 + 0.1 * round as f64),
                        ("agg.iterations".into(), 5.0),
                    ],
                },
            )
            .await
            .unwrap();
    }
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

async fn send(app: &Router, req: Request<Body>) -> Answer {
    let r = app.clone().oneshot(req).await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.into_body().collect().await.unwrap().to_bytes().to_vec();
    Answer {
        status,
        headers,
        body,
    }
}

fn req(method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    match body {
        Some(v) => b
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(v.to_string()))
            .unwrap(),
        None => b.body(Body::empty()).unwrap(),
    }
}

async fn login(app: &Router, user: &str) -> String {
    let pw = PASSWORDS.iter().find(|p| p.0 == user).unwrap().1;
    let a = send(
        app,
        req(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"username": user, "password": pw})),
        ),
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    a.json()["token"].as_str().unwrap().to_owned()
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 3 + y) % 256) as u8]));
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// A valid PNG header claiming `w x h` (the pixels never follow).
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut out = png(1, 1);
    // IHDR width/height live at bytes 16..24; fix the CRC after them.
    out[16..20].copy_from_slice(&w.to_be_bytes());
    out[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&out[12..29]);
    out[29..33].copy_from_slice(&crc.to_be_bytes());
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn upload(token: Option<&str>, field: &str, bytes: &[u8]) -> Request<Body> {
    let boundary = "XBOUNDARYX";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"x.png\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut b = Request::builder()
        .method("POST")
        .uri("/api/inference/predict")
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        );
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Body::from(body)).unwrap()
}

const READS: &[&str] = &[
    "/api/auth/me",
    "/api/clients",
    "/api/clients/hospital-1",
    "/api/clients/hospital-1/trust",
    "/api/training/rounds",
    "/api/training/rounds/current",
    "/api/training/rounds/1",
    "/api/metrics/overview",
    "/api/metrics/auc-history",
    "/api/metrics/loss-history",
    "/api/metrics/aggregation",
    "/api/metrics/privacy",
    "/api/connections",
];

#[tokio::test]
async fn every_endpoint_needs_a_valid_token() {
    let h = harness().await;
    let protected: Vec<(&str, &str)> = READS
        .iter()
        .map(|p| ("GET", *p))
        .chain([
            ("POST", "/api/auth/register"),
            ("POST", "/api/auth/refresh"),
            ("POST", "/api/auth/password"),
            ("GET", "/api/users"),
            ("PUT", "/api/users/2/password"),
            ("PATCH", "/api/users/1/role"),
            ("GET", "/api/users/1/export"),
            ("DELETE", "/api/users/2"),
            ("PATCH", "/api/clients/hospital-1/status"),
            ("POST", "/api/connections/hospital-1/revoke"),
            ("POST", "/api/connections/hospital-1/certificate"),
            ("POST", "/api/training/stop"),
            ("POST", "/api/inference/predict"),
            ("GET", "/api/inference/history"),
            ("GET", "/api/audit"),
            ("GET", "/api/model/export"),
            ("GET", "/api/events"),
        ])
        .collect();
    let forged = {
        // Signed with another key.
        let other = fedcore_hospital::auth::Tokens::new(&[9; 32], TokenLife::default()).unwrap();
        let admin = h.state.store.user(1).await.unwrap().unwrap();
        other.issue(&admin, 0, None).unwrap().unwrap()
    };
    for (method, path) in protected {
        for token in [None, Some("garbage"), Some(forged.as_str())] {
            let body = (method != "GET" && method != "DELETE").then(|| json!({}));
            let a = send(&h.app, req(method, path, token, body)).await;
            assert_eq!(
                a.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}"
            );
            assert!(a.json()["error"].is_string());
        }
    }
}

#[tokio::test]
async fn reads_work_for_every_role_and_answer_json() {
    let h = harness().await;
    for user in ["admin", "doctor", "viewer"] {
        let t = login(&h.app, user).await;
        for path in READS {
            let a = send(&h.app, req("GET", path, Some(&t), None)).await;
            assert_eq!(a.status, StatusCode::OK, "{user} GET {path}");
            a.json();
        }
    }
    let t = login(&h.app, "viewer").await;
    let get = |p: &'static str| {
        let app = h.app.clone();
        let t = t.clone();
        async move { send(&app, req("GET", p, Some(&t), None)).await.json() }
    };
    let auc = get("/api/metrics/auc-history").await;
    assert_eq!(auc.as_array().unwrap().len(), 2);
    assert_eq!(auc[1]["per_label"]["Effusion"], 0.7);
    assert!((auc[1]["macro_auroc"].as_f64().unwrap() - 0.8).abs() < 1e-12);
    let detail = get("/api/training/rounds/2").await;
    let ups = detail["updates"].as_array().unwrap();
    assert_eq!(ups.len(), 2);
    assert_eq!(ups[0]["accepted"], true);
    assert_eq!(ups[0]["weight"], 1.0);
    assert_eq!(ups[1]["accepted"], false);
    assert_eq!(ups[1]["reason"], "invalid update: NaN");
    assert_eq!(detail["metrics"]["agg.iterations"], 5.0);
    let overview = get("/api/metrics/overview").await;
    assert_eq!(overview["rounds_recorded"], 2);
    assert_eq!(overview["suspicious_clients"], json!(["hospital-1"]));
    assert_eq!(overview["model_round"], 3);
    let privacy = get("/api/metrics/privacy").await;
    assert_eq!(privacy[0]["epsilon"], 3.0);
    assert_eq!(privacy[0]["history"], json!([[1, 1.5], [2, 3.0]]));
    let trust = get("/api/clients/hospital-1/trust").await;
    assert_eq!(trust.as_array().unwrap().len(), 2);
    assert_eq!(trust[1]["suspicious"], true);
    let a = send(
        &h.app,
        req("GET", "/api/training/rounds/99", Some(&t), None),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = send(&h.app, req("GET", "/api/clients/nope", Some(&t), None)).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn login_sets_a_safe_cookie_and_logout_clears_it() {
    let h = harness().await;
    let a = send(
        &h.app,
        req(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"username": "doctor", "password": "doctor-password-123"})),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let cookie = a.headers[header::SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains("Secure"), "no TLS here");
    let pair = cookie.split(';').next().unwrap();
    let me = send(
        &h.app,
        Request::builder()
            .uri("/api/auth/me")
            .header(header::COOKIE, format!("theme=dark; {pair}"))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.json()["user"]["role"], "doctor");
    assert_eq!(
        me.json()["permissions"],
        json!(["view_metrics", "run_inference"])
    );
    let out = send(
        &h.app,
        Request::builder()
            .method("POST")
            .uri("/api/auth/logout")
            .header(header::COOKIE, pair)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    assert!(
        out.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
    // The token itself is dead after sign-out, not just the cookie.
    let token = pair.split_once('=').unwrap().1;
    assert_eq!(
        send(&h.app, req("GET", "/api/auth/me", Some(token), None))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    // Signing out without a session is harmless.
    let out = send(&h.app, req("POST", "/api/auth/logout", None, None)).await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);

    for (user, pw) in [
        ("doctor", "wrong-password-123"),
        ("nobody", "whatever-password"),
    ] {
        let a = send(
            &h.app,
            req(
                "POST",
                "/api/auth/login",
                None,
                Some(json!({"username": user, "password": pw})),
            ),
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            a.json()["error"],
            "wrong user name or password",
            "same answer for both"
        );
    }
    let log = h.state.store.audit_log(None, 100).await.unwrap();
    let logins: Vec<(&str, &str)> = log
        .iter()
        .filter(|a| a.action == "login")
        .map(|a| (a.actor.as_str(), a.outcome.as_str()))
        .collect();
    assert!(logins.contains(&("doctor", "success")));
    assert!(logins.contains(&("doctor", "failure")));
    assert!(logins.contains(&("nobody", "failure")));
    assert!(
        log.iter().all(|a| a.ip.as_deref() == Some("10.0.0.7")),
        "{log:?}"
    );
    // Malformed bodies are 4xx, not 500.
    let a = send(
        &h.app,
        Request::builder()
            .method("POST")
            .uri("/api/auth/login")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from("{not json"))
            .unwrap(),
    )
    .await;
    assert!(a.status.is_client_error(), "{}", a.status);
}

/// The app as seen from another client address.
fn from_address(state: &AppState, ip: [u8; 4]) -> Router {
    web::app(state.clone()).layer(MockConnectInfo(SocketAddr::from((ip, 4000))))
}

fn login_req(user: &str, password: &str) -> Request<Body> {
    req(
        "POST",
        "/api/auth/login",
        None,
        Some(json!({"username": user, "password": password})),
    )
}

async fn sign_in(app: &Router, user: &str, password: &str) -> String {
    let a = send(app, login_req(user, password)).await;
    assert_eq!(a.status, StatusCode::OK, "{user}: {}", a.json());
    a.json()["token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn login_is_rate_limited() {
    let h = harness().await;
    let attempt = || send(&h.app, login_req("admin", "nope-nope-nope"));
    // Five failures fit the bucket; the sixth empties it and blocks.
    for _ in 0..6 {
        assert_eq!(attempt().await.status, StatusCode::UNAUTHORIZED);
    }
    let a = attempt().await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(a.headers.contains_key(header::RETRY_AFTER));
    // From the address that guessed, even the right password waits.
    let a = send(&h.app, login_req("admin", "admin-password-123")).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    let limited = h
        .state
        .store
        .audit_log(None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|a| a.detail.filter(|d| d.starts_with("rate limited")))
        .collect::<Vec<_>>();
    // Both throttled attempts, counted in one row.
    assert_eq!(limited, ["rate limited (2 attempts)"]);
}

#[tokio::test]
async fn nobody_can_lock_the_admin_out() {
    let h = harness().await;
    // Before the fix, one address failing at `admin` blocked `admin` from
    // everywhere: the owner from another address is let in.
    for _ in 0..6 {
        send(&h.app, login_req("admin", "nope-nope-nope")).await;
    }
    let owner = from_address(&h.state, [10, 9, 9, 9]);
    sign_in(&owner, "admin", "admin-password-123").await;

    // Behind a trusted reverse proxy, each client has its own address (the
    // one the proxy appends to X-Forwarded-For), so guessing from many
    // addresses empties the name's failure bucket ...
    let mut state = h.state.clone();
    state.client_address = Arc::new(ClientAddress {
        trusted_proxies: vec!["10.0.0.7".parse().unwrap()],
    });
    let proxied = web::app(state).layer(MockConnectInfo(SocketAddr::from(([10, 0, 0, 7], 4000))));
    let via = |client: &str, password: &str| {
        let mut r = login_req("admin", password);
        r.headers_mut().insert(
            "x-forwarded-for",
            format!("1.2.3.4, {client}").parse().unwrap(),
        );
        send(&proxied, r)
    };
    for i in 1..=6 {
        let a = via(&format!("192.0.2.{i}"), "nope-nope-nope").await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.json());
    }
    // ... after which the guessers are refused before their password is
    // checked, while the owner's address, which has not failed, gets in.
    assert_eq!(
        via("192.0.2.1", "admin-password-123").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let a = via("198.51.100.20", "admin-password-123").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.json());
    // The address in the log is the client's, not the proxy's.
    let log = h.state.store.audit_log(None, 5).await.unwrap();
    assert_eq!(log[0].ip.as_deref(), Some("198.51.100.20"));
}

#[tokio::test]
async fn sessions_end_on_sign_out_password_change_reset_and_refresh_keeps_them() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let me = |t: String| {
        let app = h.app.clone();
        async move {
            send(&app, req("GET", "/api/auth/me", Some(&t), None))
                .await
                .status
        }
    };
    // Refresh: a new token for the same session, the old one still valid
    // until it expires or the session ends.
    let t1 = login(&h.app, "doctor").await;
    let r = send(&h.app, req("POST", "/api/auth/refresh", Some(&t1), None)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("HttpOnly")
    );
    let t2 = r.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(me(t2.clone()).await, StatusCode::OK);
    // Signing out ends every session of the user.
    let t3 = login(&h.app, "doctor").await;
    assert_eq!(
        send(&h.app, req("POST", "/api/auth/logout", Some(&t3), None))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    for t in [&t1, &t2, &t3] {
        assert_eq!(me(t.clone()).await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            send(&h.app, req("POST", "/api/auth/refresh", Some(t), None))
                .await
                .status,
            StatusCode::UNAUTHORIZED
        );
    }

    // Changing one's password: the current one is checked, other sessions
    // end, this one continues with a new token. (From another address: this
    // one has used its sign-in attempts at `doctor` for the minute.)
    let elsewhere = from_address(&h.state, [10, 0, 0, 8]);
    let other = login(&elsewhere, "doctor").await;
    let mine = login(&elsewhere, "doctor").await;
    let change = |current: &str, new: &str| {
        req(
            "POST",
            "/api/auth/password",
            Some(&mine),
            Some(json!({"current_password": current, "new_password": new})),
        )
    };
    assert_eq!(
        send(
            &elsewhere,
            change("not-the-password", "doctor-new-password-42")
        )
        .await
        .status,
        StatusCode::UNAUTHORIZED
    );
    let weak = send(&elsewhere, change("doctor-password-123", "password1234")).await;
    assert_eq!(weak.status, StatusCode::BAD_REQUEST);
    let ok = send(
        &elsewhere,
        change("doctor-password-123", "doctor-new-password-42"),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.json());
    let renewed = ok.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(me(other).await, StatusCode::UNAUTHORIZED);
    assert_eq!(me(mine.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(me(renewed.clone()).await, StatusCode::OK);
    assert_eq!(
        send(&h.app, login_req("doctor", "doctor-password-123"))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    sign_in(&h.app, "doctor", "doctor-new-password-42").await;

    // An admin's reset: only admins, the rule holds, sessions end.
    let reset = |token: &str, pw: &str| {
        req(
            "PUT",
            "/api/users/2/password",
            Some(token),
            Some(json!({"new_password": pw})),
        )
    };
    let viewer = login(&h.app, "viewer").await;
    assert_eq!(
        send(&h.app, reset(&viewer, "reset-by-a-viewer-99"))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        send(&h.app, reset(&admin, "short")).await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(&h.app, reset(&admin, "a-reset-password-for-doc"))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(me(renewed).await, StatusCode::UNAUTHORIZED);
    sign_in(&h.app, "doctor", "a-reset-password-for-doc").await;
    assert_eq!(
        send(
            &h.app,
            req(
                "PUT",
                "/api/users/999/password",
                Some(&admin),
                Some(json!({"new_password": "a-reset-password-for-doc"}))
            )
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
    let log = h.state.store.audit_log(None, 100).await.unwrap();
    for action in ["logout", "password_change", "password_reset"] {
        assert!(log.iter().any(|a| a.action == action), "{action}");
    }
}

/// Opens the event stream; the answer's status and, when it is 200, its
/// body.
async fn open_stream(app: &Router, token: &str) -> (StatusCode, Body) {
    let r = app
        .clone()
        .oneshot(req("GET", "/api/events", Some(token), None))
        .await
        .unwrap();
    (r.status(), r.into_body())
}

/// Whether the stream's body ends within `within`.
async fn ends(body: Body, within: Duration) -> bool {
    tokio::time::timeout(within, body.collect()).await.is_ok()
}

#[tokio::test]
async fn open_event_streams_close_when_the_session_ends() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let doctor = login(&h.app, "doctor").await;
    let viewer = login(&h.app, "viewer").await;
    let (status, doctor_stream) = open_stream(&h.app, &doctor).await;
    assert_eq!(status, StatusCode::OK);
    let (_, viewer_stream) = open_stream(&h.app, &viewer).await;
    let (_, admin_stream) = open_stream(&h.app, &admin).await;
    // Erasing the doctor closes the doctor's stream, and only that one.
    assert_eq!(
        send(&h.app, req("DELETE", "/api/users/2", Some(&admin), None))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert!(ends(doctor_stream, Duration::from_secs(5)).await, "erased");
    // Promoting the viewer ends their sessions (a token of the old role);
    // signing out ends the admin's.
    assert_eq!(
        send(
            &h.app,
            req(
                "PATCH",
                "/api/users/3/role",
                Some(&admin),
                Some(json!({"role": "doctor"}))
            )
        )
        .await
        .status,
        StatusCode::OK
    );
    assert!(ends(viewer_stream, Duration::from_secs(5)).await, "role");
    let (_, admin_stream_2) = open_stream(&h.app, &admin).await;
    send(&h.app, req("POST", "/api/auth/logout", Some(&admin), None)).await;
    assert!(ends(admin_stream, Duration::from_secs(5)).await, "logout");
    assert!(ends(admin_stream_2, Duration::from_secs(5)).await, "logout");
}

#[tokio::test]
async fn event_streams_are_capped_per_user_and_in_all() {
    let h = harness().await;
    let mut state = h.state.clone();
    state.streams = fedcore_hospital::api::EventStreams::new(3, 2);
    let app = from_address(&state, [10, 0, 0, 7]);
    let admin = login(&app, "admin").await;
    let doctor = login(&app, "doctor").await;
    let (s1, b1) = open_stream(&app, &admin).await;
    let (s2, _b2) = open_stream(&app, &admin).await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    let (s3, _) = open_stream(&app, &admin).await;
    assert_eq!(s3, StatusCode::TOO_MANY_REQUESTS, "third of one user");
    let (s4, _b4) = open_stream(&app, &doctor).await;
    assert_eq!(s4, StatusCode::OK);
    let (s5, _) = open_stream(&app, &doctor).await;
    assert_eq!(s5, StatusCode::TOO_MANY_REQUESTS, "fourth on the server");
    // A closed stream frees its place.
    drop(b1);
    let (s6, _b6) = open_stream(&app, &doctor).await;
    assert_eq!(s6, StatusCode::OK);
}

#[tokio::test]
async fn a_request_that_does_not_finish_times_out() {
    let h = harness().await;
    let mut state = h.state.clone();
    state.request_timeout = Duration::from_millis(500);
    let app = from_address(&state, [10, 0, 0, 7]);
    // (Signing in hashes a password, which takes longer than this timeout
    // in a debug build: through the app with the default timeout.)
    let doctor = login(&h.app, "doctor").await;
    // An upload whose body never ends (a slow client).
    let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let r = Request::builder()
        .method("POST")
        .uri("/api/inference/predict")
        .header(header::AUTHORIZATION, format!("Bearer {doctor}"))
        .header(header::CONTENT_TYPE, "multipart/form-data; boundary=B")
        .body(body)
        .unwrap();
    let a = tokio::time::timeout(Duration::from_secs(10), send(&app, r))
        .await
        .expect("the server answers");
    assert_eq!(a.status, StatusCode::REQUEST_TIMEOUT);
}

#[tokio::test]
async fn anonymous_sign_ins_cannot_flood_the_audit_log_and_it_pages() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let attempt = |name: String| {
        send(
            &h.app,
            req(
                "POST",
                "/api/auth/login",
                None,
                Some(json!({"username": name, "password": "nope-nope-nope"})),
            ),
        )
    };
    // A 60 KB name is refused like a wrong password, and not stored.
    let huge = "x".repeat(60_000);
    assert_eq!(attempt(huge.clone()).await.status, StatusCode::UNAUTHORIZED);
    let log = h.state.store.audit_log(None, 5).await.unwrap();
    assert_eq!(log[0].actor, "(invalid user name)");
    assert_eq!(
        log[0].detail.as_deref(),
        Some("wrong user name or password")
    );
    // 40 more attempts from the same address: the limiter blocks the
    // address once its failures fill its bucket, and the throttled attempts
    // share one row.
    let started = std::time::Instant::now();
    for i in 0..40 {
        let name = if i % 2 == 0 {
            huge.clone()
        } else {
            format!("user{i}")
        };
        let s = attempt(name).await.status;
        assert!(s == StatusCode::UNAUTHORIZED || s == StatusCode::TOO_MANY_REQUESTS);
    }
    let all = h.state.store.audit_log(None, 1000).await.unwrap();
    assert!(
        all.iter().all(|a| a.actor.len() <= 64),
        "no attacker text stored"
    );
    let throttled: Vec<_> = all
        .iter()
        .filter(|a| {
            a.detail
                .as_deref()
                .is_some_and(|d| d.starts_with("rate limited"))
        })
        .collect();
    let slow_refills = (started.elapsed().as_secs() / 15) as usize;
    assert!(
        (1..=1 + slow_refills).contains(&throttled.len()),
        "{throttled:?}"
    );
    // The address's bucket holds 4 x 5 failures and gets one back every
    // 60 s / 4 (the harness's limit); after them one row counts the
    // throttled attempts: 41 attempts write at most about 23 rows, plus one
    // per refill on a slow (loaded) machine.
    let refills = (started.elapsed().as_secs() / 15) as usize;
    assert!(
        all.len() <= 4 * 5 + 4 + refills,
        "41 attempts wrote {} rows in {:?}; the sign-in that opened the test is still in view",
        all.len(),
        started.elapsed()
    );
    assert!(
        all.iter()
            .any(|a| a.actor == "admin" && a.outcome == "success")
    );
    // Paging: newest first, then strictly older.
    let page = |q: String| {
        let admin = admin.clone();
        let app = h.app.clone();
        async move {
            send(
                &app,
                req("GET", &format!("/api/audit?{q}"), Some(&admin), None),
            )
            .await
            .json()
        }
    };
    let first = page("limit=3".into()).await;
    let ids: Vec<i64> = first
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] > w[1]));
    let next = page(format!("limit=3&before={}", ids[2])).await;
    let older: Vec<i64> = next
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_i64().unwrap())
        .collect();
    assert!(
        !older.is_empty() && older.iter().all(|&id| id < ids[2]),
        "{older:?}"
    );
}

#[tokio::test]
async fn roles_are_enforced_and_denials_audited() {
    let h = harness().await;
    let viewer = login(&h.app, "viewer").await;
    let doctor = login(&h.app, "doctor").await;
    let admin_only: Vec<(&str, &str, Option<Value>)> = vec![
        (
            "POST",
            "/api/auth/register",
            Some(json!({"username": "eve", "password": "eve-password-123", "role": "admin"})),
        ),
        ("GET", "/api/users", None),
        ("PATCH", "/api/users/3/role", Some(json!({"role": "admin"}))),
        ("GET", "/api/users/3/export", None),
        ("DELETE", "/api/users/3", None),
        (
            "PATCH",
            "/api/clients/hospital-1/status",
            Some(json!({"status": "suspended"})),
        ),
        ("GET", "/api/audit", None),
        ("GET", "/api/model/export", None),
    ];
    for t in [&viewer, &doctor] {
        for (m, p, b) in &admin_only {
            let a = send(&h.app, req(m, p, Some(t), b.clone())).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{m} {p}");
        }
    }
    for p in ["/api/inference/history"] {
        assert_eq!(
            send(&h.app, req("GET", p, Some(&viewer), None))
                .await
                .status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            send(&h.app, req("GET", p, Some(&doctor), None))
                .await
                .status,
            StatusCode::OK
        );
    }
    let a = send(&h.app, upload(Some(&viewer), "image", &png(64, 64))).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    // Nothing changed.
    assert_eq!(h.state.store.users().await.unwrap().len(), 3);
    assert_eq!(
        h.state.store.user(3).await.unwrap().unwrap().role.as_str(),
        "viewer"
    );
    assert_eq!(
        h.state
            .store
            .client("hospital-1")
            .await
            .unwrap()
            .unwrap()
            .status,
        ClientStatus::Active
    );
    let denials = h
        .state
        .store
        .audit_log(None, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.action == "permission_denied")
        .count();
    assert_eq!(denials, 2 * admin_only.len() + 2);
}

#[tokio::test]
async fn admins_manage_users_and_data_subject_requests() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let reg = |body: Value| {
        send(
            &h.app,
            req("POST", "/api/auth/register", Some(&admin), Some(body)),
        )
    };
    let a =
        reg(json!({"username": "dr.house", "password": "a-long-password", "role": "doctor"})).await;
    assert_eq!(a.status, StatusCode::CREATED);
    let id = a.json()["id"].as_i64().unwrap();
    assert_eq!(
        reg(json!({"username": "dr.house", "password": "a-long-password", "role": "doctor"}))
            .await
            .status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        reg(json!({"username": "x", "password": "a-long-password", "role": "doctor"}))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        reg(json!({"username": "shorty", "password": "short", "role": "doctor"}))
            .await
            .status,
        StatusCode::BAD_REQUEST
    );
    assert!(
        reg(json!({"username": "root", "password": "a-long-password", "role": "superuser"}))
            .await
            .status
            .is_client_error()
    );

    // The new doctor works, runs an inference, then is promoted to viewer... and exported.
    let a = send(
        &h.app,
        req(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"username": "dr.house", "password": "a-long-password"})),
        ),
    )
    .await;
    let t = a.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(
        send(&h.app, upload(Some(&t), "image", &png(64, 64)))
            .await
            .status,
        StatusCode::OK
    );
    let a = send(
        &h.app,
        req(
            "PATCH",
            &format!("/api/users/{id}/role"),
            Some(&admin),
            Some(json!({"role": "viewer"})),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    // The role change ends the sessions issued under the old role; signed
    // in again, the new role holds.
    assert_eq!(
        send(&h.app, upload(Some(&t), "image", &png(64, 64)))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let a = send(
        &h.app,
        req(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"username": "dr.house", "password": "a-long-password"})),
        ),
    )
    .await;
    let t = a.json()["token"].as_str().unwrap().to_owned();
    assert_eq!(
        send(&h.app, upload(Some(&t), "image", &png(64, 64)))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // A sign-in tried with the name by someone else.
    let tried = send(
        &h.app,
        req(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"username": "Dr.House", "password": "a-guess-at-it"})),
        ),
    )
    .await;
    assert_eq!(tried.status, StatusCode::UNAUTHORIZED);
    let export = send(
        &h.app,
        req(
            "GET",
            &format!("/api/users/{id}/export"),
            Some(&admin),
            None,
        ),
    )
    .await;
    assert_eq!(export.status, StatusCode::OK);
    let e = export.json();
    assert_eq!(e["user"]["username"], "dr.house");
    assert_eq!(e["inferences"].as_array().unwrap().len(), 1);
    assert_eq!(e["inferences"][0]["parsed"].as_array().unwrap().len(), 14);
    // The export holds every audit entry about the user: their actions,
    // sign-ins tried with their name, and entries naming them as target.
    let entries: Vec<(String, String)> = e["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["action"].as_str().unwrap().to_owned(),
                a["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for row in e["audit"].as_array().unwrap() {
        if row["actor_id"] != json!(id) {
            assert!(row["ip"].is_null(), "someone else's address: {row}");
        }
    }
    for (action, outcome) in [
        ("inference", "success"),
        ("login", "success"),
        ("login", "failure"),
        ("user_created", "success"),
        ("role_change", "success"),
    ] {
        assert!(
            entries.contains(&(action.to_owned(), outcome.to_owned())),
            "{action}/{outcome} missing from {entries:?}"
        );
    }

    // Erasure: no login, no token, name gone from the audit log.
    assert_eq!(
        send(
            &h.app,
            req("DELETE", &format!("/api/users/{id}"), Some(&admin), None)
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        send(&h.app, req("GET", "/api/auth/me", Some(&t), None))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let a = send(
        &h.app,
        req(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"username": "dr.house", "password": "a-long-password"})),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let mut log = h.state.store.audit_log(None, 1000).await.unwrap();
    // (The sign-in tried just now, after the erasure, is a new entry.)
    let newest = log[0].id;
    log.retain(|a| a.id < newest);
    assert!(
        log.iter()
            .filter(|a| a.actor_id == Some(id))
            .all(|a| a.actor == format!("deleted-{id}") && a.ip.is_none())
    );
    // The name is nowhere in the log: not as actor (the sign-in someone
    // tried), not as target (creation, role change, export).
    let text = serde_json::to_string(&log).unwrap().to_lowercase();
    assert!(!text.contains("dr.house"), "{text}");
    assert!(
        log.iter()
            .any(|a| a.action == "user_created" && a.target == Some(format!("deleted-{id}")))
    );
    assert!(log.iter().any(|a| a.action == "user_erased"));
    assert!(
        log.iter()
            .any(|a| a.action == "role_change" && a.detail.as_deref() == Some("doctor -> viewer"))
    );
    assert!(log.iter().any(|a| a.action == "user_data_export"));
    assert_eq!(
        send(
            &h.app,
            req(
                "GET",
                &format!("/api/users/{id}/export"),
                Some(&admin),
                None
            )
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );

    // The last admin stays.
    assert_eq!(
        send(&h.app, req("DELETE", "/api/users/1", Some(&admin), None))
            .await
            .status,
        StatusCode::CONFLICT
    );
    assert_eq!(
        send(
            &h.app,
            req(
                "PATCH",
                "/api/users/1/role",
                Some(&admin),
                Some(json!({"role": "viewer"}))
            )
        )
        .await
        .status,
        StatusCode::CONFLICT
    );
    let users = send(&h.app, req("GET", "/api/users", Some(&admin), None))
        .await
        .json();
    assert_eq!(users.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn admins_stop_a_run_from_the_page() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let doctor = login(&h.app, "doctor").await;
    let stop = |t: &str| send(&h.app, req("POST", "/api/training/stop", Some(t), None));
    // Nothing trains in this process yet.
    assert_eq!(stop(&admin).await.status, StatusCode::CONFLICT);
    h.state
        .shared
        .set_progress(|p| p.status = fedcore_hospital::live::RunStatus::Training);
    assert_eq!(stop(&doctor).await.status, StatusCode::FORBIDDEN);
    assert!(!h.state.shared.stop.is_stopped());
    let a = stop(&admin).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.json());
    assert!(
        h.state.shared.stop.is_stopped(),
        "the run loop sees the stop"
    );
    let log = h.state.store.audit_log(None, 10).await.unwrap();
    assert!(
        log.iter()
            .any(|e| e.action == "training_stopped" && e.actor == "admin")
    );
    let me = send(&h.app, req("GET", "/api/auth/me", Some(&admin), None))
        .await
        .json();
    assert!(
        me["permissions"]
            .as_array()
            .unwrap()
            .contains(&json!("control_training"))
    );
}

/// The simulation has no roster: no connections, and the roster's actions
/// say why they cannot be done (the deployment test does them).
#[tokio::test]
async fn the_simulation_lists_no_connections_and_refuses_roster_changes() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let c = send(&h.app, req("GET", "/api/connections", Some(&admin), None))
        .await
        .json();
    assert_eq!(c, json!({"deployed": false, "sites": [], "refused": []}));
    let a = send(
        &h.app,
        req(
            "POST",
            "/api/connections/hospital-1/revoke",
            Some(&admin),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert!(a.json()["error"].as_str().unwrap().contains("no roster"));
    let a = send(
        &h.app,
        req(
            "POST",
            "/api/connections/hospital-1/certificate",
            Some(&admin),
            Some(json!({"certificate": "-----BEGIN CERTIFICATE-----"})),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn admins_suspend_hospitals() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let patch = |id: &str, status: &str| {
        send(
            &h.app,
            req(
                "PATCH",
                &format!("/api/clients/{id}/status"),
                Some(&admin),
                Some(json!({"status": status})),
            ),
        )
    };
    let a = patch("hospital-2", "suspended").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.json()["status"], "suspended");
    assert!(
        h.state
            .shared
            .suspended
            .lock()
            .unwrap()
            .contains("hospital-2")
    );
    // Not a status: the body does not match its schema (an enum).
    assert_eq!(
        patch("hospital-2", "deleted").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );
    assert_eq!(
        patch("hospital-9", "active").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(patch("hospital-2", "active").await.status, StatusCode::OK);
    assert!(h.state.shared.suspended.lock().unwrap().is_empty());
    let log = h.state.store.audit_log(None, 100).await.unwrap();
    assert_eq!(
        log.iter()
            .filter(|a| a.action == "client_status_change")
            .count(),
        2
    );
}

#[tokio::test]
async fn uploads_are_checked() {
    let h = harness().await;
    let t = login(&h.app, "doctor").await;
    // A real image: the 14 findings, logged.
    let a = send(&h.app, upload(Some(&t), "image", &png(300, 280))).await;
    assert_eq!(
        a.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let p = a.json();
    assert_eq!(p["findings"].as_array().unwrap().len(), 14);
    assert_eq!(p["model_round"], 3);
    assert_eq!(
        (p["width"].as_u64(), p["height"].as_u64()),
        (Some(300), Some(280))
    );
    let probs: Vec<f64> = p["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["probability"].as_f64().unwrap())
        .collect();
    assert!(
        probs.iter().all(|p| (0.0..=1.0).contains(p)) && probs.windows(2).all(|w| w[0] >= w[1])
    );
    // Where the model looked for the three most likely findings: a heatmap
    // PNG of the model's input size each, in the findings' order.
    let saliency = p["saliency"].as_array().unwrap();
    assert_eq!(saliency.len(), 3);
    for (s, f) in saliency.iter().zip(p["findings"].as_array().unwrap()) {
        assert_eq!(s["label"], f["label"]);
        let url = s["heatmap_png"].as_str().unwrap();
        let b64 = url.strip_prefix("data:image/png;base64,").unwrap();
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let img = image::load_from_memory(&bytes).unwrap();
        assert_eq!((img.width(), img.height()), (SIZE, SIZE));
    }
    // The harness's predictor was given no runner's protections.
    assert!(p["protections"].is_null());
    // The history names who asked.
    let hist = send(&h.app, req("GET", "/api/inference/history", Some(&t), None))
        .await
        .json();
    assert_eq!(hist[0]["username"], "doctor");

    let cases: Vec<(Vec<u8>, &str, StatusCode)> = vec![
        (
            b"this is not an image".to_vec(),
            "image",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            b"GIF89a\x01\x00\x01\x00".to_vec(),
            "image",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            png_header(50_000, 50_000),
            "image",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            png(64, 64)[..60].to_vec(),
            "image",
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (png(64, 64), "file", StatusCode::BAD_REQUEST),
        (
            vec![0x89; 300 * 1024],
            "image",
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (bytes, field, want) in cases {
        let a = send(&h.app, upload(Some(&t), field, &bytes)).await;
        assert_eq!(a.status, want, "{}", String::from_utf8_lossy(&a.body));
        assert!(a.json()["error"].is_string());
    }
    // Not multipart at all.
    let a = send(
        &h.app,
        req(
            "POST",
            "/api/inference/predict",
            Some(&t),
            Some(json!({"image": "x"})),
        ),
    )
    .await;
    assert!(a.status.is_client_error());
    let hist = send(&h.app, req("GET", "/api/inference/history", Some(&t), None))
        .await
        .json();
    assert_eq!(
        hist.as_array().unwrap().len(),
        1,
        "only the good upload is logged"
    );
    assert_eq!(hist[0]["parsed"].as_array().unwrap().len(), 14);
    // Doctors see their own history; the admin sees everyone's.
    let admin = login(&h.app, "admin").await;
    assert_eq!(
        send(&h.app, upload(Some(&admin), "image", &png(64, 64)))
            .await
            .status,
        StatusCode::OK
    );
    let mine = send(&h.app, req("GET", "/api/inference/history", Some(&t), None))
        .await
        .json();
    let all = send(
        &h.app,
        req("GET", "/api/inference/history", Some(&admin), None),
    )
    .await
    .json();
    assert_eq!(
        (
            mine.as_array().unwrap().len(),
            all.as_array().unwrap().len()
        ),
        (1, 2)
    );
}

#[tokio::test]
async fn findings_and_exports_are_encrypted_at_rest_with_a_key() {
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let h = harness_at(None, Some(AtRest::from_base64(&key, &[]).unwrap())).await;
    let t = login(&h.app, "admin").await;
    assert_eq!(
        send(&h.app, upload(Some(&t), "image", &png(64, 64)))
            .await
            .status,
        StatusCode::OK
    );
    let raw = h.state.store.inferences(None, 10).await.unwrap();
    assert!(
        fedcore_hospital::atrest::is_sealed(&raw[0].findings),
        "{}",
        raw[0].findings
    );
    assert!(!raw[0].findings.contains("Effusion"));
    let hist = send(&h.app, req("GET", "/api/inference/history", Some(&t), None))
        .await
        .json();
    assert_eq!(hist[0]["parsed"].as_array().unwrap().len(), 14);
    let export = send(&h.app, req("GET", "/api/model/export", Some(&t), None)).await;
    assert_eq!(export.status, StatusCode::OK);
    let body = String::from_utf8(export.body).unwrap();
    let plain = AtRest::from_base64(&key, &[])
        .unwrap()
        .open_bytes(&body)
        .unwrap();
    let (params, _) = fedcore::Parameters::from_safetensors(&plain).unwrap();
    assert_eq!(
        params.len(),
        fedcore_hospital::recipe::densenet(1)
            .unwrap()
            .parameters()
            .len()
    );
    assert!(
        h.state
            .store
            .audit_log(None, 10)
            .await
            .unwrap()
            .iter()
            .any(|a| a.action == "model_export")
    );
}

#[tokio::test]
async fn sealed_findings_are_bound_to_their_row_and_fail_alone() {
    use base64::Engine;
    let b64 = |b: u8| base64::engine::general_purpose::STANDARD.encode([b; 32]);
    let h = harness_at(None, Some(AtRest::from_base64(&b64(7), &[]).unwrap())).await;
    let t = login(&h.app, "admin").await;
    for side in [64, 72] {
        let r = send(&h.app, upload(Some(&t), "image", &png(side, side))).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let raw = h.state.store.inferences(None, 10).await.unwrap();
    let (a, b) = (&raw[1], &raw[0]);
    assert_ne!(a.image_sha256, b.image_sha256);
    // Row b's sealed findings copied into a row that names a's image: the
    // associated data differs, so they no longer open.
    let moved = h
        .state
        .store
        .log_inference(
            a.user_id,
            a.model_round,
            &a.image_sha256,
            a.width,
            a.height,
            &b.findings,
        )
        .await
        .unwrap();
    // A row sealed under a key this server does not have.
    let foreign = AtRest::from_base64(&b64(9), &[]).unwrap();
    let place = format!(
        "inference_logs.findings user={} round={} image={}",
        a.user_id,
        a.model_round.unwrap(),
        a.image_sha256
    );
    let unknown = h
        .state
        .store
        .log_inference(
            a.user_id,
            a.model_round,
            &a.image_sha256,
            a.width,
            a.height,
            &foreign.seal_for("[]", &place).unwrap(),
        )
        .await
        .unwrap();
    let hist = send(&h.app, req("GET", "/api/inference/history", Some(&t), None)).await;
    assert_eq!(
        hist.status,
        StatusCode::OK,
        "one bad row does not fail the list"
    );
    let rows = hist.json();
    let by_id = |id: i64| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
            .unwrap()
            .clone()
    };
    let m = by_id(moved);
    assert!(
        m["error"]
            .as_str()
            .unwrap()
            .contains("fails authentication"),
        "{m}"
    );
    assert!(m["parsed"].as_array().unwrap().is_empty());
    let u = by_id(unknown);
    assert!(
        u["error"].as_str().unwrap().contains("not configured"),
        "{u}"
    );
    for id in [a.id, b.id] {
        let ok = by_id(id);
        assert!(ok.get("error").is_none(), "{ok}");
        assert_eq!(ok["parsed"].as_array().unwrap().len(), 14);
    }
    // The user's data export goes through as well.
    let export = send(
        &h.app,
        req(
            "GET",
            &format!("/api/users/{}/export", a.user_id),
            Some(&t),
            None,
        ),
    )
    .await;
    assert_eq!(export.status, StatusCode::OK);
    assert_eq!(export.json()["inferences"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn decoding_is_bounded_in_bytes_and_in_parallel() {
    let h = harness().await;
    let t = login(&h.app, "admin").await;
    // 512 x 512 RGBA16: a few KB as a PNG, 2 MiB decoded, over the
    // harness's 1 MiB: refused from the header.
    let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(
        512,
        512,
        image::Rgba([1, 2, 3, 65535]),
    );
    let mut big = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut big), image::ImageFormat::Png)
        .unwrap();
    let r = send(&h.app, upload(Some(&t), "image", &big)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("would decode to 2097152 bytes")
    );
    // Four uploads at once with one decode permit: they take turns, all
    // answer, and the permit is back afterwards.
    assert_eq!(h.state.decodes.available_permits(), 1);
    let uploads = (0..4).map(|i| send(&h.app, upload(Some(&t), "image", &png(40 + i, 40))));
    for r in futures_util::future::join_all(uploads).await {
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(h.state.decodes.available_permits(), 1);
}

#[tokio::test]
async fn user_names_fold_case_and_guessable_passwords_are_refused() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let register = |name: &str, password: &str| {
        send(
            &h.app,
            req(
                "POST",
                "/api/auth/register",
                Some(&admin),
                Some(json!({"username": name, "password": password, "role": "doctor"})),
            ),
        )
    };
    let weak = register("dr.who", "password1234").await;
    assert_eq!(weak.status, StatusCode::BAD_REQUEST);
    assert!(
        weak.json()["error"]
            .as_str()
            .unwrap()
            .contains("too easy to guess")
    );
    let made = register("Dr.Who", "tardis-blue-box-1963").await;
    assert_eq!(made.status, StatusCode::CREATED);
    assert_eq!(made.json()["username"], "dr.who");
    assert_eq!(
        register("DR.WHO", "another-tardis-1964").await.status,
        StatusCode::CONFLICT,
        "a name that differs only in case is taken"
    );
    let signed_in = send(
        &h.app,
        req(
            "POST",
            "/api/auth/login",
            None,
            Some(json!({"username": "dR.wHo", "password": "tardis-blue-box-1963"})),
        ),
    )
    .await;
    assert_eq!(signed_in.status, StatusCode::OK);
    assert_eq!(signed_in.json()["user"]["username"], "dr.who");
    // Erased users are named `deleted-<id>`: a new name cannot take that
    // form (it would make erasing that id fail), in any case.
    let id = made.json()["id"].as_i64().unwrap();
    let reserved = register(&format!("Deleted-{id}"), "tardis-blue-box-1963").await;
    assert_eq!(reserved.status, StatusCode::BAD_REQUEST);
    assert!(
        reserved.json()["error"]
            .as_str()
            .unwrap()
            .contains("cannot start with")
    );
    let erased = send(
        &h.app,
        req("DELETE", &format!("/api/users/{id}"), Some(&admin), None),
    )
    .await;
    assert_eq!(erased.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn sql_injection_shaped_input_changes_nothing() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let before = (
        h.state.store.users().await.unwrap().len(),
        h.state.store.clients().await.unwrap().len(),
        h.state.store.rounds(1).await.unwrap().len(),
    );
    for name in [
        "admin' OR '1'='1",
        "admin'--",
        "' OR 1=1; DROP TABLE users; --",
    ] {
        let a = send(
            &h.app,
            req(
                "POST",
                "/api/auth/login",
                None,
                Some(json!({"username": name, "password": "x' OR 'x'='x"})),
            ),
        )
        .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{name}");
    }
    for id in [
        "hospital-1'%20OR%20'1'='1",
        "x';%20DROP%20TABLE%20clients;--",
        "%27",
    ] {
        let a = send(
            &h.app,
            req("GET", &format!("/api/clients/{id}"), Some(&admin), None),
        )
        .await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{id}");
        let a = send(
            &h.app,
            req(
                "PATCH",
                &format!("/api/clients/{id}/status"),
                Some(&admin),
                Some(json!({"status": "suspended"})),
            ),
        )
        .await;
        assert_eq!(a.status, StatusCode::NOT_FOUND);
    }
    let a = send(
        &h.app,
        req(
            "GET",
            "/api/training/rounds/1%20OR%201=1",
            Some(&admin),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = send(
        &h.app,
        req("POST", "/api/auth/register", Some(&admin), Some(json!({"username": "x'); DROP TABLE users;--", "password": "long-enough-password", "role": "viewer"}))),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let a = send(
        &h.app,
        req(
            "GET",
            "/api/audit?limit=1;DROP%20TABLE%20audit_log",
            Some(&admin),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let after = (
        h.state.store.users().await.unwrap().len(),
        h.state.store.clients().await.unwrap().len(),
        h.state.store.rounds(1).await.unwrap().len(),
    );
    assert_eq!(before, after);
    assert!(
        h.state
            .store
            .clients()
            .await
            .unwrap()
            .iter()
            .all(|c| c.status == ClientStatus::Active)
    );
    // The injection-shaped names are no user name an account can have:
    // audited as such, never stored as given (issue 20, finding 1).
    let log = h.state.store.audit_log(None, 100).await.unwrap();
    assert!(log.iter().any(|a| a.actor == "(invalid user name)"));
    assert!(!log.iter().any(|a| a.actor.contains("DROP TABLE")));
}

#[tokio::test]
async fn pages_docs_and_headers() {
    let h = harness().await;
    for path in [
        "/login",
        "/app",
        "/assets/app.js",
        "/assets/app.css",
        "/assets/login.js",
        "/api/openapi.json",
        "/docs/",
    ] {
        let a = send(&h.app, req("GET", path, None, None)).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        let csp = a.headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        assert!(
            csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'self'"),
            "{csp}"
        );
        assert_eq!(a.headers[header::X_FRAME_OPTIONS], "DENY");
        assert_eq!(a.headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(a.headers[header::REFERRER_POLICY], "no-referrer");
        assert!(
            !a.headers.contains_key(header::STRICT_TRANSPORT_SECURITY),
            "no TLS here"
        );
        let body = String::from_utf8_lossy(&a.body);
        assert!(
            !body.contains("https://cdn") && !body.contains("unpkg.com"),
            "{path} loads from a CDN"
        );
    }
    let spec = send(&h.app, req("GET", "/api/openapi.json", None, None))
        .await
        .json();
    let paths = spec["paths"].as_object().unwrap();
    for p in [
        "/api/auth/login",
        "/api/auth/me",
        "/api/auth/register",
        "/api/clients",
        "/api/clients/{id}",
        "/api/clients/{id}/trust",
        "/api/clients/{id}/status",
        "/api/connections",
        "/api/connections/{site}/revoke",
        "/api/connections/{site}/certificate",
        "/api/training/rounds",
        "/api/training/rounds/current",
        "/api/training/rounds/{id}",
        "/api/metrics/overview",
        "/api/metrics/auc-history",
        "/api/metrics/loss-history",
        "/api/metrics/aggregation",
        "/api/metrics/privacy",
        "/api/inference/predict",
        "/api/inference/history",
    ] {
        assert!(
            paths.contains_key(p),
            "{p} missing from the OpenAPI document"
        );
    }
    let a = send(&h.app, req("GET", "/nope", None, None)).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    // The live stream is an event stream.
    let t = login(&h.app, "viewer").await;
    let r = h
        .app
        .clone()
        .oneshot(req("GET", "/api/events", Some(&t), None))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()[header::CONTENT_TYPE], "text/event-stream");
}

/// The same store code on PostgreSQL, when scripts/test.sh started one.
#[tokio::test]
async fn every_error_is_json_and_documented() {
    let h = harness().await;
    let admin = login(&h.app, "admin").await;
    let raw = |method: &str, path: &str, content_type: Option<&str>, body: &str| {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {admin}"));
        if let Some(c) = content_type {
            b = b.header(header::CONTENT_TYPE, c);
        }
        b.body(Body::from(body.to_owned())).unwrap()
    };
    // Before, the framework's rejections were text/plain (or empty).
    let cases = [
        (
            raw(
                "POST",
                "/api/auth/register",
                Some("application/json"),
                "{not json",
            ),
            400,
        ),
        (
            raw("POST", "/api/auth/register", Some("text/plain"), "{}"),
            415,
        ),
        (raw("POST", "/api/auth/register", None, "{}"), 415),
        (
            raw(
                "POST",
                "/api/auth/register",
                Some("application/json"),
                r#"{"username":"abc"}"#,
            ),
            422,
        ),
        (raw("GET", "/api/users/not-a-number/export", None, ""), 400),
        (raw("GET", "/api/audit?limit=many", None, ""), 400),
        (raw("PUT", "/api/metrics/overview", None, ""), 405),
        (
            raw(
                "POST",
                "/api/auth/register",
                Some("application/json"),
                &format!(r#"{{"username":"{}"}}"#, "x".repeat(70_000)),
            ),
            413,
        ),
    ];
    for (request, want) in cases {
        let what = format!("{} {}", request.method(), request.uri());
        let a = send(&h.app, request).await;
        assert_eq!(a.status.as_u16(), want, "{what}");
        assert_eq!(
            a.headers[header::CONTENT_TYPE],
            "application/json",
            "{what}"
        );
        assert!(
            a.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}"
        );
        if want == 405 {
            assert!(a.headers.contains_key(header::ALLOW), "{what}");
        }
    }
    // The document lists those answers, and the constraints the server
    // enforces.
    let doc = send(&h.app, req("GET", "/api/openapi.json", None, None))
        .await
        .json();
    let responses = |path: &str, method: &str| -> Vec<String> {
        doc["paths"][path][method]["responses"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    let register = responses("/api/auth/register", "post");
    for code in [
        "201", "400", "401", "403", "408", "409", "413", "415", "422",
    ] {
        assert!(register.contains(&code.to_owned()), "register lacks {code}");
    }
    assert!(responses("/api/users/{id}/export", "get").contains(&"400".to_owned()));
    // Signing in needs no token: the document says so.
    assert_eq!(
        doc["paths"]["/api/auth/login"]["post"]["security"],
        json!([{}])
    );
    let schema = &doc["components"]["schemas"]["RegisterRequest"]["properties"];
    assert_eq!(schema["password"]["minLength"], 12);
    assert_eq!(schema["password"]["maxLength"], 256);
    assert_eq!(schema["username"]["pattern"], "^[A-Za-z0-9._@-]{3,64}$");
    assert_eq!(
        doc["components"]["schemas"]["Upload"]["additionalProperties"],
        false
    );
}

/// Serves `state`'s app on 127.0.0.1 over real TCP, as `hospital` does.
async fn serve(
    state: &AppState,
    limits: ServerLimits,
    tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
) -> SocketAddr {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let app = web::app(state.clone());
    let at = SocketAddr::from(([127, 0, 0, 1], 0));
    tokio::spawn(async move { web::serve(app, at, tls.as_ref(), limits, &[], tx).await });
    rx.await.unwrap()
}

/// Reads until the server closes the connection (or `within` passes:
/// `None`).
async fn read_to_close<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    within: Duration,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    match tokio::time::timeout(within, r.read_to_end(&mut out)).await {
        Ok(_) => Some(String::from_utf8_lossy(&out).into_owned()),
        Err(_) => None,
    }
}

/// Opens `cap` connections to `at` and checks that one more is closed
/// without an answer; returns the ones held.
async fn one_over_the_cap_is_closed(at: SocketAddr, cap: usize) -> Vec<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(tokio::net::TcpStream::connect(at).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = tokio::net::TcpStream::connect(at).await.unwrap();
    let _ = over
        .write_all(b"GET /login HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let answer = read_to_close(&mut over, Duration::from_millis(800)).await;
    assert_eq!(
        answer.as_deref(),
        Some(""),
        "connection {} was served",
        cap + 1
    );
    held
}

#[tokio::test]
async fn slow_headers_are_cut_off_and_connections_are_capped() {
    use tokio::io::AsyncWriteExt;
    let h = harness().await;
    let limits = ServerLimits {
        header_read_timeout: Duration::from_secs(1),
        max_connections: 3,
        ..ServerLimits::default()
    };
    let at = serve(&h.state, limits, None).await;
    // Half-sent headers: closed after the header-read timeout (before the
    // fix they were held for as long as the client liked).
    let mut slow = tokio::net::TcpStream::connect(at).await.unwrap();
    slow.write_all(b"GET /login HTTP/1.1\r\nHost: localhost\r\nX-Slow: 1")
        .await
        .unwrap();
    assert!(
        read_to_close(&mut slow, Duration::from_secs(5))
            .await
            .is_some(),
        "a slow-header connection stays open"
    );
    drop(slow);
    // A client that connects and says nothing at all is cut off too (before
    // the fix such a connection was never closed).
    let mut silent = tokio::net::TcpStream::connect(at).await.unwrap();
    assert!(
        read_to_close(&mut silent, Duration::from_secs(5))
            .await
            .is_some(),
        "a silent connection stays open"
    );
    drop(silent);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // At most three connections: a fourth is closed at once.
    let held = one_over_the_cap_is_closed(at, 3).await;
    // Once they are gone (the header timeout closes idle ones too), the
    // server takes connections again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ok = tokio::net::TcpStream::connect(at).await.unwrap();
    ok.write_all(b"GET /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut ok, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // At most two from one address, however many the server takes.
    let per_address = ServerLimits {
        max_connections: 100,
        max_connections_per_address: 2,
        ..ServerLimits::default()
    };
    let at = serve(&h.state, per_address, None).await;
    drop(one_over_the_cap_is_closed(at, 2).await);
}

#[tokio::test]
async fn the_dashboard_speaks_https_with_secure_cookies_and_hsts() {
    use tokio::io::AsyncWriteExt;
    let h = harness().await;
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_pem, key_pem) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
    let mut state = h.state.clone();
    state.tls = true;
    let at = serve(&state, ServerLimits::default(), Some((cert_pem, key_pem))).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let https = |request: String| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(at).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, tcp).await.unwrap();
            tls.write_all(request.as_bytes()).await.unwrap();
            read_to_close(&mut tls, Duration::from_secs(10))
                .await
                .unwrap()
        }
    };
    let page =
        https("GET /login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".into()).await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.to_lowercase()
            .contains("strict-transport-security: max-age="),
        "{page}"
    );
    let body = json!({"username": "doctor", "password": "doctor-password-123"}).to_string();
    let login = https(format!(
        "POST /api/auth/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
    .await;
    assert!(login.starts_with("HTTP/1.1 200"), "{login}");
    let cookie = login
        .lines()
        .find(|l| l.to_lowercase().starts_with("set-cookie:"))
        .unwrap();
    assert!(
        cookie.contains("; Secure") && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    // Plain HTTP to the TLS port gets no page.
    let mut plain = tokio::net::TcpStream::connect(at).await.unwrap();
    plain
        .write_all(b"GET /login HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut plain, Duration::from_secs(15)).await;
    assert!(!answer.unwrap_or_default().contains("200 OK"));
}

#[tokio::test]
async fn postgres_runs_the_same_queries() {
    let Ok(url) = std::env::var("FEDCORE_TEST_POSTGRES") else {
        eprintln!("FEDCORE_TEST_POSTGRES is not set: PostgreSQL not tested here");
        return;
    };
    reset_postgres(&url).await;
    let h = harness_at(Some(url), None).await;
    assert!(h.state.store.is_postgres());
    let admin = login(&h.app, "admin").await;
    for path in READS {
        let a = send(&h.app, req("GET", path, Some(&admin), None)).await;
        assert_eq!(
            a.status,
            StatusCode::OK,
            "GET {path}: {}",
            String::from_utf8_lossy(&a.body)
        );
    }
    let auc = send(
        &h.app,
        req("GET", "/api/metrics/auc-history", Some(&admin), None),
    )
    .await
    .json();
    assert_eq!(auc[1]["per_label"]["Effusion"], 0.7);
    assert_eq!(
        send(&h.app, upload(Some(&admin), "image", &png(64, 64)))
            .await
            .status,
        StatusCode::OK
    );
    let a = send(
        &h.app,
        req(
            "POST",
            "/api/auth/register",
            Some(&admin),
            Some(json!({"username": "pg.doc", "password": "a-long-password", "role": "doctor"})),
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::CREATED);
    let id = a.json()["id"].as_i64().unwrap();
    // Session versions: a reset ends the user's sessions.
    let pg_doc = sign_in(&h.app, "pg.doc", "a-long-password").await;
    assert_eq!(
        send(
            &h.app,
            req(
                "PUT",
                &format!("/api/users/{id}/password"),
                Some(&admin),
                Some(json!({"new_password": "another-long-password-7"}))
            )
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        send(&h.app, req("GET", "/api/auth/me", Some(&pg_doc), None))
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&h.app, req("POST", "/api/auth/refresh", Some(&admin), None))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        send(
            &h.app,
            req(
                "GET",
                &format!("/api/users/{id}/export"),
                Some(&admin),
                None
            )
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        send(
            &h.app,
            req("DELETE", &format!("/api/users/{id}"), Some(&admin), None)
        )
        .await
        .status,
        StatusCode::NO_CONTENT
    );
    let a = send(
        &h.app,
        req(
            "GET",
            "/api/clients/x';%20DROP%20TABLE%20clients;--",
            Some(&admin),
            None,
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(h.state.store.clients().await.unwrap().len(), 2);
    // Re-recording a round replaces it.
    seed_rounds(&h.state).await;
    assert_eq!(h.state.store.rounds(1).await.unwrap().len(), 2);
    assert_eq!(
        h.state.store.updates(1, Some(1), None).await.unwrap().len(),
        2
    );
}

async fn reset_postgres(url: &str) {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("DROP SCHEMA public CASCADE")
        .execute(&mut c)
        .await
        .unwrap();
    sqlx::query("CREATE SCHEMA public")
        .execute(&mut c)
        .await
        .unwrap();
}
