//! The hospital federation deployed as processes on 127.0.0.1: provisioning
//! with CKKS keys in the kits, the aggregation server and two hospitals over
//! gRPC with mutual TLS, the head encrypted end to end, and the server's
//! dashboard showing the run.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_hospital");

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_ok(child: &mut Child, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "{what} failed: {status}");
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not finish in time");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One HTTP/1.1 request to the dashboard: (status, body).
fn http(
    at: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(at).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer[9..12].parse().unwrap();
    let (head, rest) = answer.split_once("\r\n\r\n").unwrap();
    // Chunked answers: the one chunk of a small JSON body.
    let body = if head.to_lowercase().contains("transfer-encoding: chunked") {
        let (_, chunk) = rest.split_once("\r\n").unwrap();
        chunk
            .rsplit_once("\r\n0\r\n")
            .map_or(chunk, |c| c.0)
            .to_owned()
    } else {
        rest.to_owned()
    };
    (status, body)
}

#[test]
fn a_server_and_two_hospitals_train_with_the_head_encrypted() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    let out = Command::new(BIN)
        .args([
            "provision",
            "--out",
            project.to_str().unwrap(),
            "--hospitals",
            "2",
            "--port",
            "1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(project.join("server/he-public.key").exists());
    assert!(
        !project.join("server/he-secret.key").exists(),
        "the server never holds the secret key"
    );
    assert!(project.join("hospital-1/he-secret.key").exists());

    let run = tmp.path().join("server-run");
    let mut server = Killed(
        Command::new(BIN)
            .args(["server", "--kit", project.join("server").to_str().unwrap()])
            .args([
                "--listen",
                "127.0.0.1:0",
                "--rounds",
                "2",
                "--min-clients",
                "2",
            ])
            .args(["--batch-size", "8", "--run-dir", run.to_str().unwrap()])
            // Public pretraining, small: 6 patients, one epoch.
            .args(["--image-size", "32", "--public-patients", "6"])
            .args(["--public-epochs", "1"])
            .args(["--dashboard", "127.0.0.1:0"])
            .env("HOSPITAL_ADMIN_PASSWORD", "deploy-admin-password-7")
            .env(
                "DATABASE_URL",
                format!(
                    "sqlite://{}?mode=rwc",
                    tmp.path().join("d.sqlite").display()
                ),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let (tx, lines) = mpsc::channel();
    let stdout = server.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut printed = Vec::new();
    let addr = loop {
        let l = lines.recv_timeout(Duration::from_secs(120)).unwrap();
        printed.push(l.clone());
        if let Some(addr) = l.strip_prefix("listening on ") {
            break addr.to_owned();
        }
    };
    assert!(
        printed[0].starts_with("public pretraining: 1 epochs over"),
        "{printed:?}"
    );
    let dashboard = loop {
        let l = lines.recv_timeout(Duration::from_secs(60)).unwrap();
        printed.push(l.clone());
        if let Some(rest) = l.strip_prefix("dashboard: http://") {
            break rest.split('/').next().unwrap().to_owned();
        }
    };
    let mut sites: Vec<Killed> = ["hospital-1", "hospital-2"]
        .iter()
        .map(|h| {
            Killed(
                Command::new(BIN)
                    .args([
                        "client",
                        "--kit",
                        project.join(h).to_str().unwrap(),
                        "--server",
                        &addr,
                    ])
                    .args(["--image-size", "32", "--patients", "16"])
                    // hospital-1 trains by DP-SGD (the default), on the
                    // classifier (the default); hospital-2 trains the last
                    // block too and protects it with client-level DP.
                    .args(if *h == "hospital-2" {
                        &[
                            "--trainable",
                            "last-block",
                            "--dp",
                            "client",
                            "--epsilon",
                            "50",
                            "--clip",
                            "0.01",
                            "--dp-rounds",
                            "2",
                        ][..]
                    } else {
                        &["--epsilon", "50", "--dp-batch-size", "4"][..]
                    })
                    .args(["--work-dir", tmp.path().join(h).to_str().unwrap()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    // The server keeps its dashboard up after the run: wait for the run.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !printed.iter().any(|l| l.starts_with("run complete")) {
        assert!(Instant::now() < deadline, "the run did not complete");
        if let Ok(l) = lines.recv_timeout(Duration::from_secs(1)) {
            printed.push(l);
        }
        assert!(server.0.try_wait().unwrap().is_none(), "the server exited");
    }
    for (i, s) in sites.iter_mut().enumerate() {
        wait_ok(
            &mut s.0,
            &format!("hospital-{}", i + 1),
            Duration::from_secs(60),
        );
    }
    printed.extend(lines.try_iter());
    let text = printed.join("\n");
    assert!(text.contains("classifier head sealed with CKKS"), "{text}");
    for round in [1, 2] {
        let line = printed
            .iter()
            .find(|l| l.starts_with(&format!("round {round} completed")))
            .unwrap_or_else(|| panic!("round {round} not completed:\n{text}"));
        assert!(line.contains(": 2 updates"), "{line}");
        assert!(
            !line.contains("held-out loss -"),
            "the hospitals evaluated: {line}"
        );
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("checkpoints/state.json")).unwrap())
            .unwrap();
    let history = state["history"].as_array().unwrap();
    assert_eq!(history.len(), 2);
    // Each update says what protected it: CKKS for both, DP-SGD for
    // hospital-1, client-level DP for hospital-2.
    for update in history[0]["accepted"].as_array().unwrap() {
        let provenance: Vec<fedcore::Protection> =
            serde_json::from_value(update["provenance"].clone()).unwrap();
        let kinds: Vec<fedcore::ProtectionKind> = provenance.iter().map(|p| p.kind).collect();
        assert!(
            kinds.contains(&fedcore::ProtectionKind::Encryption),
            "{provenance:?}"
        );
        assert!(
            kinds.contains(&fedcore::ProtectionKind::DifferentialPrivacy),
            "{provenance:?}"
        );
        let mechanism = if update["client"] == "hospital-2" {
            "gaussian"
        } else {
            "dp-sgd"
        };
        assert!(
            provenance.iter().any(|p| p.mechanism.contains(mechanism)),
            "{provenance:?}"
        );
    }
    // The deployed server's dashboard shows the run: its rounds with the
    // hospitals' own held-out numbers, the hospitals, hospital-2's epsilon.
    let (status, body) = http(
        &dashboard,
        "POST",
        "/api/auth/login",
        None,
        Some(r#"{"username":"admin","password":"deploy-admin-password-7"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let login: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = login["token"].as_str().unwrap();
    let get = |path: &str| {
        let (status, body) = http(&dashboard, "GET", path, Some(token), None);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let rounds = get("/api/training/rounds");
    let rounds = rounds.as_array().unwrap();
    assert_eq!(rounds.len(), 2, "{rounds:?}");
    for r in rounds {
        assert_eq!(r["outcome"], "completed", "{r}");
        assert_eq!(r["accepted"], 2, "{r}");
        assert!(r["loss"].is_number(), "the hospitals' evaluation: {r}");
    }
    assert_eq!(
        get("/api/training/rounds/current")["progress"]["status"],
        "finished"
    );
    let clients = get("/api/clients");
    assert_eq!(clients.as_array().unwrap().len(), 2, "{clients}");
    let privacy = get("/api/metrics/privacy");
    let spent = |c: &str| {
        privacy
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["client"] == c)
            .map(|p| p["history"].as_array().unwrap().len())
    };
    assert_eq!(
        (spent("hospital-1"), spent("hospital-2")),
        (Some(2), Some(2))
    );
    // No model to read X-rays with at the server (the head stays sealed).
    let (status, _) = http(&dashboard, "GET", "/api/model/export", Some(token), None);
    assert_eq!(status, 503);

    // The sealed head was checkpointed next to the model (as bytes the server cannot open).
    let sealed = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains("sealed"));
    assert!(sealed, "a sealed checkpoint file");
}

/// A hospital decrypts distances for the server only when it agreed to
/// `--encrypt all`, and refuses that together with local DP (which would
/// cover nothing) before doing any work; the server refuses `--encrypt all`
/// with an aggregator that needs the updates in the clear.
#[test]
fn encrypt_all_is_refused_with_dp_at_a_hospital_and_with_krum_at_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    let out = Command::new(BIN)
        .args(["provision", "--out", project.to_str().unwrap()])
        .args(["--hospitals", "1", "--port", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let client = Command::new(BIN)
        .args([
            "client",
            "--kit",
            project.join("hospital-1").to_str().unwrap(),
        ])
        .args(["--encrypt", "all", "--dp", "client", "--give-up-after", "5"])
        .args(["--work-dir", tmp.path().join("site").to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&client.stderr);
    assert!(
        !client.status.success() && err.contains("--dp client with --encrypt all"),
        "{err}"
    );
    assert!(!tmp.path().join("site").exists(), "no work was done");
    let server = Command::new(BIN)
        .args(["server", "--kit", project.join("server").to_str().unwrap()])
        .args([
            "--listen",
            "127.0.0.1:0",
            "--encrypt",
            "all",
            "--aggregator",
            "krum",
        ])
        .args(["--run-dir", tmp.path().join("run").to_str().unwrap()])
        .args(["--wait", "1", "--rounds", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&server.stderr);
    assert!(
        !server.status.success() && err.contains("needs the updates in the clear"),
        "{err}"
    );
}
