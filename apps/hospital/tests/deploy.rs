//! The hospital federation deployed as processes on 127.0.0.1: provisioning
//! with CKKS keys in the kits, the aggregation server and two hospitals over
//! gRPC with mutual TLS, the head encrypted end to end, and the server's
//! dashboard showing the run and steering the federation: both hospitals
//! connected with their certificates, one suspended (the next round does
//! not sample it), then revoked (its session is closed and the refusal
//! listed), then given a new certificate; a viewer can do none of that.
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

/// The lines `child` prints on its (piped) standard output, as they come.
fn lines_of(child: &mut Killed) -> mpsc::Receiver<String> {
    let (tx, lines) = mpsc::channel();
    let stdout = child.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    lines
}

/// One HTTP/1.1 request with a JSON body to a dashboard: (status, body).
fn http(
    at: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let body = body.unwrap_or("");
    http_raw(at, method, path, token, "application/json", body.as_bytes())
}

/// An X-ray upload (multipart, field `image`) to a dashboard's inference.
fn predict(at: &str, token: &str) -> (u16, String) {
    let img =
        image::GrayImage::from_fn(64, 64, |x, y| image::Luma([((x * 3 + y * 5) % 256) as u8]));
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let mut body =
        b"--XB\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n\
                     Content-Type: image/png\r\n\r\n"
            .to_vec();
    body.extend_from_slice(&png);
    body.extend_from_slice(b"\r\n--XB--\r\n");
    http_raw(
        at,
        "POST",
        "/api/inference/predict",
        Some(token),
        "multipart/form-data; boundary=XB",
        &body,
    )
}

fn http_raw(
    at: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(at).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
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

/// Runs `hospital` with `args` to its end: (success, stdout and stderr).
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `cp -a from into`: a file or a folder, as an operator copies it.
fn copy_into(from: &std::path::Path, into: &std::path::Path) {
    let copied = Command::new("cp")
        .arg("-a")
        .args([from, into])
        .status()
        .unwrap();
    assert!(
        copied.success(),
        "cp -a {} {}",
        from.display(),
        into.display()
    );
}

/// `hospital server` on 127.0.0.1 with the small model for one round,
/// starting with `min_clients` hospitals, and the lines it prints.
fn small_server(
    kit: &str,
    run_dir: &std::path::Path,
    min_clients: &str,
) -> (Killed, mpsc::Receiver<String>) {
    let mut server = Killed(
        Command::new(BIN)
            .args(["server", "--kit", kit])
            .args(["--listen", "127.0.0.1:0", "--rounds", "1"])
            .args(["--min-clients", min_clients, "--start-with", min_clients])
            .args(["--batch-size", "8", "--run-dir", run_dir.to_str().unwrap()])
            .args(["--image-size", "32", "--public-patients", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(&mut server);
    (server, lines)
}

/// The lines a hospital prints until it says the run is complete (that
/// one left out); then it must exit successfully within a minute.
fn until_it_completes(client: &mut Killed, lines: &mpsc::Receiver<String>) -> Vec<String> {
    let mut said = Vec::new();
    loop {
        let l = lines.recv_timeout(Duration::from_secs(300)).unwrap();
        if l.ends_with("the run is complete") {
            break;
        }
        said.push(l);
    }
    assert!(exit_within_a_minute(client, &said).success(), "{said:?}");
    said
}

/// `child`'s exit status, which must come within a minute (`what` is
/// shown otherwise).
fn exit_within_a_minute(
    child: &mut Killed,
    what: &dyn std::fmt::Debug,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "still running: {what:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `hospital client` of `kit` refuses to start, saying `says`, before it
/// touches any data (nothing is written to `work`).
fn refuses_to_start(kit: &str, server: &str, work: &std::path::Path, says: &str) {
    let (ok, said) = run(&[
        "client",
        "--kit",
        kit,
        "--server",
        server,
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    assert!(!ok && said.contains(says), "{said}");
    assert!(!work.exists(), "refused before touching any data");
}

/// `hospital client` with the small model, its data in `work`.
fn small_client(kit: &str, addr: &str, work: &std::path::Path) -> Killed {
    Killed(
        Command::new(BIN)
            .args(["client", "--kit", kit, "--server", addr])
            .args(["--image-size", "32", "--patients", "16", "--dp", "off"])
            .args(["--work-dir", work.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

#[test]
fn a_server_and_two_hospitals_train_and_the_dashboard_suspends_and_revokes_one() {
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
    // Where the project CA is kept (not on the server): a copy made now,
    // which issues hospital-2's new certificate later.
    let offline = tmp.path().join("offline");
    copy_into(&project, &offline);

    let run = tmp.path().join("server-run");
    let mut server = Killed(
        Command::new(BIN)
            .args(["server", "--kit", project.join("server").to_str().unwrap()])
            .args([
                "--listen",
                "127.0.0.1:0",
                // Both hospitals in round 1; later rounds need one (one
                // is suspended, then revoked).
                "--rounds",
                "4",
                "--min-clients",
                "1",
                "--start-with",
                "2",
            ])
            .args(["--batch-size", "8", "--run-dir", run.to_str().unwrap()])
            // Public pretraining, small: 6 patients, one epoch.
            .args(["--image-size", "32", "--public-patients", "6"])
            .args(["--public-epochs", "1"])
            .args(["--dashboard", "127.0.0.1:0"])
            .env("HOSPITAL_ADMIN_PASSWORD", "deploy-admin-password-7")
            .env("HOSPITAL_VIEWER_PASSWORD", "deploy-viewer-password-7")
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
    let lines = lines_of(&mut server);
    let mut printed = Vec::new();
    let addr = loop {
        let l = lines.recv_timeout(Duration::from_secs(600)).unwrap();
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
    let login = |user: &str, password: &str| {
        let (status, body) = http(
            &dashboard,
            "POST",
            "/api/auth/login",
            None,
            Some(&format!(
                r#"{{"username":"{user}","password":"{password}"}}"#
            )),
        );
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["token"].as_str().unwrap().to_owned()
    };
    let token = login("admin", "deploy-admin-password-7");
    let viewer = login("viewer", "deploy-viewer-password-7");
    let token = token.as_str();
    let get = |path: &str| {
        let (status, body) = http(&dashboard, "GET", path, Some(token), None);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    let site = |connections: &serde_json::Value, name: &str| {
        connections["sites"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["site"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not listed: {connections}"))
    };
    // The roster's hospitals, before any connected.
    let before = get("/api/connections");
    assert_eq!(before["deployed"], true, "{before}");
    assert_eq!(site(&before, "hospital-2")["connected"], false);
    assert_eq!(
        site(&before, "hospital-2")["certificates"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
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
                            "4",
                        ][..]
                    } else {
                        &["--epsilon", "50", "--dp-batch-size", "4"][..]
                    })
                    .args(["--work-dir", tmp.path().join(h).to_str().unwrap()])
                    // hospital-1's staff read X-rays on its own dashboard.
                    .args(if *h == "hospital-1" {
                        &["--dashboard", "127.0.0.1:0"][..]
                    } else {
                        &[][..]
                    })
                    .env("HOSPITAL_ADMIN_PASSWORD", "site-admin-password-7")
                    .env("HOSPITAL_DOCTOR_PASSWORD", "site-doctor-password-7")
                    .env_remove("DATABASE_URL")
                    .stdout(if *h == "hospital-1" {
                        Stdio::piped()
                    } else {
                        Stdio::null()
                    })
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let site_lines = lines_of(&mut sites[0]);
    let mut site_printed = Vec::new();
    let site_dashboard = loop {
        // Before its dashboard a hospital writes its synthetic set, builds
        // DenseNet-121 and calibrates its DP noise, beside the server and
        // the other hospital (and, in `cargo test`, the other tests) on two
        // cores: minutes under load, not seconds.
        let l = site_lines
            .recv_timeout(Duration::from_secs(600))
            .expect("hospital-1 prints its dashboard's address");
        site_printed.push(l.clone());
        if let Some(rest) = l.strip_prefix("hospital-1: dashboard: http://") {
            break rest.split('/').next().unwrap().to_owned();
        }
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut wait_for = |what: &str, printed: &mut Vec<String>| {
        while !printed.iter().any(|l| l.starts_with(what)) {
            assert!(
                Instant::now() < deadline,
                "no `{what}`:\n{}",
                printed.join("\n")
            );
            if let Ok(l) = lines.recv_timeout(Duration::from_secs(1)) {
                printed.push(l);
            }
            assert!(server.0.try_wait().unwrap().is_none(), "the server exited");
        }
    };
    // Round 1 starts with both hospitals connected: the page shows their
    // sessions with the certificates of their kits.
    wait_for("round 1 started", &mut printed);
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
    };
    let connected = loop {
        let c = get("/api/connections");
        if ["hospital-1", "hospital-2"]
            .iter()
            .all(|h| site(&c, h)["connected"] == true)
        {
            break c;
        }
        assert!(Instant::now() < deadline, "{c}");
        std::thread::sleep(Duration::from_millis(300));
    };
    for h in ["hospital-1", "hospital-2"] {
        let s = site(&connected, h);
        let kit = fedcore::net::provision::Kit::load(project.join(h)).unwrap();
        let c = &s["connection"];
        assert_eq!(c["fingerprint"], kit.fingerprint().unwrap().as_str(), "{s}");
        let year = 300 * 24 * 3600 * 1000_i64;
        assert!(c["not_after"].as_i64().unwrap() > now_ms() + year, "{s}");
        assert!(c["last_seen"].as_i64().unwrap() > now_ms() - 30_000, "{s}");
        assert!(c["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{s}");
        // The live transfers (a model moving now, or none): each with its
        // size and progress.
        for t in s["transfers"].as_array().unwrap() {
            assert!(
                t["bytes"].as_u64().unwrap() <= t["total"].as_u64().unwrap(),
                "{t}"
            );
        }
    }
    assert_eq!(connected["refused"].as_array().unwrap().len(), 0);

    // A viewer steers nothing.
    for path in [
        "/api/connections/hospital-2/revoke",
        "/api/connections/hospital-2/certificate",
    ] {
        let body = Some(r#"{"certificate":"-----BEGIN CERTIFICATE-----"}"#);
        let (status, body) = http(&dashboard, "POST", path, Some(&viewer), body);
        assert_eq!(status, 403, "{path}: {body}");
    }
    let (status, _) = http(
        &dashboard,
        "PATCH",
        "/api/clients/hospital-2/status",
        Some(&viewer),
        Some(r#"{"status":"suspended"}"#),
    );
    assert_eq!(status, 403);

    // An admin suspends hospital-2: no round that starts from now on
    // samples it.
    let (status, body) = http(
        &dashboard,
        "PATCH",
        "/api/clients/hospital-2/status",
        Some(token),
        Some(r#"{"status":"suspended"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let suspended_at = now_ms();

    // After round 2, the admin revokes hospital-2's certificate: its
    // session is closed, the hospital stops, the refusal is listed.
    wait_for("round 2 completed", &mut printed);
    let (status, body) = http(
        &dashboard,
        "POST",
        "/api/connections/hospital-2/revoke",
        Some(token),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let revoked: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(revoked["certificates"][0]["revoked"], true, "{revoked}");
    let (status, _) = http(
        &dashboard,
        "POST",
        "/api/connections/hospital-2/revoke",
        Some(token),
        None,
    );
    assert_eq!(status, 409, "revoked already");
    let (status, _) = http(
        &dashboard,
        "POST",
        "/api/connections/hospital-9/revoke",
        Some(token),
        None,
    );
    assert_eq!(status, 404, "not on the roster");
    let mut hospital_2 = sites.remove(1);
    let status = exit_within_a_minute(&mut hospital_2, &"hospital-2");
    assert!(!status.success(), "a revoked hospital stops with an error");
    let closing = |c: &serde_json::Value| {
        c["refused"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["closed_session"] == true)
            .cloned()
    };
    let after = loop {
        let c = get("/api/connections");
        if closing(&c).is_some() && site(&c, "hospital-2")["connected"] == false {
            break c;
        }
        assert!(Instant::now() < deadline, "{c}");
        std::thread::sleep(Duration::from_millis(300));
    };
    let h2 = site(&after, "hospital-2");
    assert!(
        h2["connection"]["close_reason"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{h2}"
    );
    assert_eq!(h2["suspended"], true);
    let refusal = closing(&after).unwrap();
    assert_eq!(
        (&refusal["site"], &refusal["kind"]),
        (&"hospital-2".into(), &"revoked".into()),
        "{after}"
    );
    assert_eq!(site(&after, "hospital-1")["connected"], true);

    // Its new certificate, issued where the CA is kept, listed from the
    // page; a certificate of another hospital under its name is refused.
    let ca = fedcore::net::provision::Project::open(&offline);
    ca.issue_site("hospital-2", true).unwrap();
    ca.issue_site("hospital-1", true).unwrap();
    let new_kit = fedcore::net::provision::Kit::load(offline.join("hospital-2")).unwrap();
    let body = serde_json::json!({ "certificate": new_kit.cert_pem }).to_string();
    // hospital-1's new certificate (not on the server's roster) under
    // hospital-2's name.
    let wrong = serde_json::json!({
        "certificate": fedcore::net::provision::Kit::load(offline.join("hospital-1")).unwrap().cert_pem
    })
    .to_string();
    let (status, answer) = http(
        &dashboard,
        "POST",
        "/api/connections/hospital-2/certificate",
        Some(token),
        Some(&wrong),
    );
    assert_eq!(status, 422, "{answer}");
    assert!(answer.contains("not `hospital-2`'s"), "{answer}");
    let (status, answer) = http(
        &dashboard,
        "POST",
        "/api/connections/hospital-2/certificate",
        Some(token),
        Some(&body),
    );
    assert_eq!(status, 200, "{answer}");
    let rotated: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let certs = rotated["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{rotated}");
    assert_eq!(
        certs[1]["fingerprint"],
        new_kit.fingerprint().unwrap().as_str()
    );
    assert_eq!(certs[1]["revoked"], false);
    let roster =
        fedcore::net::provision::Roster::load(&project.join("server/roster.json")).unwrap();
    assert_eq!(
        roster.admit("hospital-2", &new_kit.fingerprint().unwrap()),
        Ok(())
    );
    let audit = get("/api/audit");
    for action in [
        "certificate_revoked",
        "certificate_rotated",
        "client_status_change",
    ] {
        assert!(
            audit
                .as_array()
                .unwrap()
                .iter()
                .any(|a| a["action"] == action),
            "{action}: {audit}"
        );
    }

    // The server keeps its dashboard up after the run: wait for the run.
    wait_for("run complete", &mut printed);
    // hospital-1 heard the run is complete and keeps serving its dashboard.
    while !site_printed
        .iter()
        .any(|l| l == "hospital-1: the run is complete")
    {
        assert!(Instant::now() < deadline, "{site_printed:?}");
        if let Ok(l) = site_lines.recv_timeout(Duration::from_secs(1)) {
            site_printed.push(l);
        }
        assert!(
            sites[0].0.try_wait().unwrap().is_none(),
            "hospital-1 exited"
        );
    }
    // A doctor at hospital-1 reads an X-ray with round 4's global model,
    // whose head hospital-1 opened; the server cannot read one.
    let doctor = {
        let (status, body) = http(
            &site_dashboard,
            "POST",
            "/api/auth/login",
            None,
            Some(r#"{"username":"doctor","password":"site-doctor-password-7"}"#),
        );
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["token"].as_str().unwrap().to_owned()
    };
    let (status, body) = predict(&site_dashboard, &doctor);
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["model_round"], 4, "{answer}");
    assert_eq!(answer["findings"].as_array().unwrap().len(), 14, "{answer}");
    assert_eq!(answer["protections"]["encrypt"], "head", "{answer}");
    assert_eq!(answer["protections"]["dp_mode"], "sample", "{answer}");
    let (status, _) = predict(&dashboard, token);
    assert_eq!(status, 503, "the server holds no key to open the head");
    printed.extend(lines.try_iter());
    let text = printed.join("\n");
    assert!(text.contains("classifier head sealed with CKKS"), "{text}");
    for round in 1..=4 {
        let line = printed
            .iter()
            .find(|l| l.starts_with(&format!("round {round} completed")))
            .unwrap_or_else(|| panic!("round {round} not completed:\n{text}"));
        if round == 1 {
            assert!(line.contains(": 2 updates"), "{line}");
        }
        assert!(
            !line.contains("held-out loss -"),
            "the hospitals evaluated: {line}"
        );
    }
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("checkpoints/state.json")).unwrap())
            .unwrap();
    let history = state["history"].as_array().unwrap();
    assert_eq!(history.len(), 4);
    // Every round that started after the suspension left hospital-2 out.
    let later: Vec<&serde_json::Value> = history
        .iter()
        .filter(|r| r["started_at_ms"].as_i64().unwrap() > suspended_at)
        .collect();
    assert!(!later.is_empty(), "rounds 3 and 4 start after it");
    for r in &later {
        assert_eq!(r["sampled"], serde_json::json!(["hospital-1"]), "{r}");
    }
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
    let rounds = get("/api/training/rounds");
    let rounds = rounds.as_array().unwrap();
    assert_eq!(rounds.len(), 4, "{rounds:?}");
    for r in rounds {
        assert_eq!(r["outcome"], "completed", "{r}");
        if r["started_at"].as_i64().unwrap() > suspended_at {
            assert_eq!(r["accepted"], 1, "only hospital-1: {r}");
        }
        assert!(r["loss"].is_number(), "the hospitals' evaluation: {r}");
    }
    assert_eq!(rounds[0]["accepted"], 2);
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
    assert_eq!(spent("hospital-1"), Some(4));
    assert!(matches!(spent("hospital-2"), Some(1 | 2)), "{privacy}");
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

/// `provision --keys multiparty --encrypt all`: the encrypted geometric
/// median's parameters, and two more `keygen` rounds for the collective
/// relinearization key, each share signed and carried like the key shares.
/// The server and the hospitals make the key at start (no round runs here:
/// three whole DenseNet-121 updates under multiparty keys take gigabytes;
/// the round is tested in fedcore-he/tests/multiparty_median.rs).
#[test]
fn multiparty_keys_for_whole_updates_take_two_signed_relinearization_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    let kit = |h: &str| project.join(h).to_str().unwrap().to_owned();
    let hospitals = ["hospital-1", "hospital-2"];
    let (ok, said) = run(&[
        "provision",
        "--out",
        project.to_str().unwrap(),
        "--hospitals",
        "2",
        "--port",
        "1",
        "--keys",
        "multiparty",
        "--encrypt",
        "all",
    ]);
    assert!(ok && said.contains("he-relin1.bin"), "{said}");
    // Carries `file` of every hospital into `folder/<site>.<ext>` of the
    // server's kit and then of every hospital's, as the operator does.
    let carry = |file: &str, folder: &str, ext: &str| {
        let dir = project.join("server").join(folder);
        std::fs::create_dir_all(&dir).unwrap();
        for h in hospitals {
            std::fs::copy(project.join(h).join(file), dir.join(format!("{h}.{ext}"))).unwrap();
        }
        for h in hospitals {
            let mine = project.join(h).join(folder);
            if mine.exists() {
                std::fs::remove_dir_all(&mine).unwrap();
            }
            copy_into(&dir, &project.join(h));
        }
    };
    let keygen = |h: &str| {
        let (ok, said) = run(&["keygen", "--kit", &kit(h)]);
        assert!(ok, "{said}");
        said
    };
    for h in hospitals {
        keygen(h);
    }
    carry("he-keyshare.bin", "he-keyshares", "bin");
    // The second run signs the statement and the first-round share.
    for h in hospitals {
        let said = keygen(h);
        assert!(said.contains("first relinearization share"), "{said}");
        assert!(!project.join(h).join("he-relin2.bin").exists());
    }
    carry("he-attestation.json", "he-attestations", "json");
    // Provisioning made the folders the operator copies into.
    assert!(project.join("server/he-relin1").is_dir() && project.join("server/he-relin2").is_dir());
    // With only its own first-round share in, a hospital says whose are
    // missing and waits.
    let own = project.join("hospital-1/he-relin1");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::copy(
        project.join("hospital-1/he-relin1.bin"),
        own.join("hospital-1.bin"),
    )
    .unwrap();
    let said = keygen("hospital-1");
    assert!(said.contains("missing hospital-2"), "{said}");
    assert!(!project.join("hospital-1/he-relin2.bin").exists());
    carry("he-relin1.bin", "he-relin1", "bin");
    // The third: the statements agree and every first-round share is in.
    for h in hospitals {
        let said = keygen(h);
        assert!(said.contains("second relinearization share"), "{said}");
    }
    // Asked again, the same second round; for another first round (its
    // record says so), refused: answers could be averaged.
    let second = std::fs::read(project.join("hospital-1/he-relin2.bin")).unwrap();
    keygen("hospital-1");
    let record = project.join("hospital-1/he-relin2.txt");
    let answered = std::fs::read_to_string(&record).unwrap();
    std::fs::write(&record, "00\n").unwrap();
    let (ok, said) = run(&["keygen", "--kit", &kit("hospital-1")]);
    assert!(!ok && said.contains("for another first round"), "{said}");
    std::fs::write(&record, answered).unwrap();
    keygen("hospital-1");
    // The signature is fresh each time; the share it signs is the same.
    let share_of = |file: &[u8]| {
        let n = u32::from_le_bytes(file[..4].try_into().unwrap()) as usize;
        file[4 + n..].to_vec()
    };
    assert_eq!(
        share_of(&std::fs::read(project.join("hospital-1/he-relin2.bin")).unwrap()),
        share_of(&second)
    );
    carry("he-relin2.bin", "he-relin2", "bin");

    let run_dir = tmp.path().join("server-run");
    let server = |extra: &[&str]| {
        run(&[
            &["server", "--kit", &kit("server"), "--listen", "127.0.0.1:0"][..],
            &["--run-dir", run_dir.to_str().unwrap(), "--wait", "3"][..],
            &["--image-size", "32", "--public-patients", "0"][..],
            extra,
        ]
        .concat())
    };
    // The server makes the relinearization key and seals whole updates
    // (then gives up: no hospital connects).
    let (_, said) = server(&["--encrypt", "all"]);
    assert!(
        said.contains("with its relinearization key (whole updates)")
            && said.contains("whole updates sealed with CKKS; encrypted-geometric-median"),
        "{said}"
    );
    let (ok, said) = server(&[]);
    assert!(
        !ok && said.contains("seals whole updates (--encrypt all)"),
        "{said}"
    );
    // A second-round share altered on the way, or under another name.
    let relin2 = project.join("server/he-relin2");
    let theirs = relin2.join("hospital-2.bin");
    let genuine = std::fs::read(&theirs).unwrap();
    let mut altered = genuine.clone();
    let last = altered.len() - 1;
    altered[last] ^= 1;
    std::fs::write(&theirs, &altered).unwrap();
    let (ok, said) = server(&["--encrypt", "all"]);
    assert!(
        !ok && said.contains("signature is not over this relinearization share"),
        "{said}"
    );
    std::fs::copy(relin2.join("hospital-1.bin"), &theirs).unwrap();
    let (ok, said) = server(&["--encrypt", "all"]);
    assert!(
        !ok && said.contains("signed by hospital-1, not by hospital-2"),
        "{said}"
    );
    std::fs::write(&theirs, &genuine).unwrap();
    std::fs::remove_file(project.join("server/he-relin1/hospital-2.bin")).unwrap();
    let (ok, said) = server(&["--encrypt", "all"]);
    assert!(
        !ok && said.contains("has no relinearization share of hospital-2"),
        "{said}"
    );
    std::fs::copy(
        project.join("hospital-2/he-relin1.bin"),
        project.join("server/he-relin1/hospital-2.bin"),
    )
    .unwrap();

    // A hospital makes the key too (then gives up: no server), and refuses
    // to seal only the head with keys for whole updates.
    let work = tmp.path().join("work");
    let (ok, said) = run(&[
        "client",
        "--kit",
        &kit("hospital-1"),
        "--server",
        "127.0.0.1:1",
        "--encrypt",
        "all",
        "--image-size",
        "32",
        "--patients",
        "16",
        "--dp",
        "off",
        "--give-up-after",
        "2",
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    assert!(
        !ok && said.contains("hospital-1: multiparty keys, collective key"),
        "{said}"
    );
    // A hospital refuses a second-round share altered in its own kit.
    let in_kit = project.join("hospital-2/he-relin2/hospital-1.bin");
    let genuine = std::fs::read(&in_kit).unwrap();
    let mut altered = genuine.clone();
    altered[genuine.len() - 1] ^= 1;
    std::fs::write(&in_kit, &altered).unwrap();
    let (ok, said) = run(&[
        "client",
        "--kit",
        &kit("hospital-2"),
        "--server",
        "127.0.0.1:1",
        "--encrypt",
        "all",
        "--work-dir",
        tmp.path().join("work-3").to_str().unwrap(),
    ]);
    assert!(
        !ok && said.contains("signature is not over this relinearization share"),
        "{said}"
    );
    std::fs::write(&in_kit, &genuine).unwrap();
    refuses_to_start(
        &kit("hospital-2"),
        "127.0.0.1:1",
        &tmp.path().join("work-2"),
        "seal whole updates: run with --encrypt all",
    );
}

/// Multiparty keys deployed: provisioning makes no share of the collective
/// key; each hospital makes its own (`hospital keygen`) and only its key
/// share travels, carried by the operator; two hospitals and the server,
/// all showing the same collective key id, train a round over mutual TLS
/// with the head switched to the hospitals' output key. A hospital whose
/// share is not the one under its name, or that has none, refuses to start.
#[test]
fn multiparty_keys_are_made_at_each_hospital_and_a_round_switches_the_head() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    let kit = |h: &str| project.join(h).to_str().unwrap().to_owned();
    let work = tmp.path().join("work").to_str().unwrap().to_owned();
    let (ok, said) = run(&[
        "provision",
        "--out",
        project.to_str().unwrap(),
        "--hospitals",
        "2",
        "--port",
        "1",
        "--keys",
        "multiparty",
    ]);
    assert!(ok, "{said}");
    assert!(project.join("server/he-crs.bin").exists());
    assert!(!project.join("server/he-secret.key").exists());
    assert!(
        project.join("hospital-1/he-secret.key").exists(),
        "the output key"
    );
    assert!(
        !project.join("hospital-1/he-party.key").exists(),
        "made by the hospital"
    );
    // Before its share is made, a hospital refuses to start (before it
    // touches any data: nothing is written to its work folder).
    refuses_to_start(
        &kit("hospital-1"),
        "127.0.0.1:1",
        std::path::Path::new(&work),
        "hospital keygen",
    );

    let shares = project.join("server/he-keyshares");
    for h in ["hospital-1", "hospital-2"] {
        let (ok, said) = run(&["keygen", "--kit", &kit(h)]);
        assert!(ok, "{said}");
        let share = std::fs::read(project.join(h).join("he-keyshare.bin")).unwrap();
        // Asked again: the same secret share, the same key share.
        assert!(run(&["keygen", "--kit", &kit(h)]).0);
        assert_eq!(
            std::fs::read(project.join(h).join("he-keyshare.bin")).unwrap(),
            share
        );
        std::fs::write(shares.join(format!("{h}.bin")), share).unwrap();
    }
    for h in ["hospital-1", "hospital-2"] {
        copy_into(&shares, &project.join(h));
    }
    // Each hospital combines the key and signs a statement of it; the
    // operator carries the statements to every kit, the server's too.
    let statements = project.join("server/he-attestations");
    std::fs::create_dir_all(&statements).unwrap();
    for h in ["hospital-1", "hospital-2"] {
        let (ok, said) = run(&["keygen", "--kit", &kit(h)]);
        assert!(
            ok && said.contains("signed statement of these keys"),
            "{said}"
        );
        std::fs::copy(
            project.join(h).join("he-attestation.json"),
            statements.join(format!("{h}.json")),
        )
        .unwrap();
    }
    for h in ["hospital-1", "hospital-2"] {
        copy_into(&statements, &project.join(h));
        let (ok, said) = run(&["keygen", "--kit", &kit(h)]);
        assert!(
            ok && said.contains("every hospital states the same keys"),
            "{said}"
        );
    }
    let run_dir = tmp.path().join("server-run");
    // A server that does not refuse gives up after 3 s without hospitals
    // (the small model: nothing long before), and the assertion says so.
    let server_refuses = |extra: &[&str], says: &str| {
        let (ok, said) = run(&[
            &["server", "--kit", &kit("server"), "--listen", "127.0.0.1:0"][..],
            &["--run-dir", run_dir.to_str().unwrap(), "--wait", "3"][..],
            &["--image-size", "32", "--public-patients", "0"][..],
            extra,
        ]
        .concat());
        assert!(!ok && said.contains(says), "{extra:?}: {said}");
    };
    // The head must be sealed: a multiparty kit never runs in the clear.
    server_refuses(&["--encrypt", "none"], "seals the head");
    // A share for a site that was not provisioned (whoever made it would
    // know part of the collective key), or a missing one, is refused.
    let extra = shares.join("hospital-9.bin");
    std::fs::copy(shares.join("hospital-1.bin"), &extra).unwrap();
    server_refuses(&[], "hospital-9 is not a party provisioned");
    // hospital-2's share under another name.
    std::fs::rename(shares.join("hospital-2.bin"), &extra).unwrap();
    server_refuses(&[], "hospital-9 is not a party provisioned");
    std::fs::remove_file(&extra).unwrap();
    server_refuses(&[], "has no key share of hospital-2");
    std::fs::copy(
        project.join("hospital-2/he-keyshare.bin"),
        shares.join("hospital-2.bin"),
    )
    .unwrap();
    // The statements: one missing, or hospital-1's under hospital-2's name.
    let second = statements.join("hospital-2.json");
    std::fs::remove_file(&second).unwrap();
    server_refuses(&[], "has no signed statement of hospital-2");
    std::fs::copy(statements.join("hospital-1.json"), &second).unwrap();
    server_refuses(&[], "signed by hospital-1, not by hospital-2");
    std::fs::copy(project.join("hospital-2/he-attestation.json"), &second).unwrap();
    // hospital-1's certificate rotated (the roster admits another one):
    // its statement, under the old one, is refused.
    let roster_path = project.join("server/roster.json");
    let roster = std::fs::read(&roster_path).unwrap();
    let mut rotated: serde_json::Value = serde_json::from_slice(&roster).unwrap();
    for c in rotated["certificates"].as_array_mut().unwrap() {
        if c["identity"] == "hospital-1" {
            c["fingerprint"] = "00".repeat(32).into();
        }
    }
    std::fs::write(&roster_path, serde_json::to_vec(&rotated).unwrap()).unwrap();
    server_refuses(&[], "signed with a certificate the roster does not admit");
    std::fs::write(&roster_path, &roster).unwrap();
    // hospital-2 stating other keys: its kit held another party 1's share
    // (an impostor's, made in a copy of hospital-1's kit). `other` copies
    // a kit as it was provisioned, before its keygen.
    let other = |name: &str, from: &str| {
        let dir = tmp.path().join(name);
        copy_into(&project.join(from), &dir);
        for made in ["he-party.key", "he-keyshares", "he-attestations"] {
            let path = dir.join(made);
            if path.is_dir() {
                std::fs::remove_dir_all(path).unwrap();
            } else if path.exists() {
                std::fs::remove_file(path).unwrap();
            }
        }
        dir
    };
    let impostor_1 = other("impostor-1", "hospital-1");
    assert!(run(&["keygen", "--kit", impostor_1.to_str().unwrap()]).0);
    let misled = other("misled-2", "hospital-2");
    copy_into(&shares, &misled);
    std::fs::copy(
        impostor_1.join("he-keyshare.bin"),
        misled.join("he-keyshares/hospital-1.bin"),
    )
    .unwrap();
    std::fs::copy(
        project.join("hospital-2/he-party.key"),
        misled.join("he-party.key"),
    )
    .unwrap();
    assert!(run(&["keygen", "--kit", misled.to_str().unwrap()]).0);
    std::fs::copy(misled.join("he-attestation.json"), &second).unwrap();
    server_refuses(&[], "hospital-2 states other keys than this kit makes");
    std::fs::copy(project.join("hospital-2/he-attestation.json"), &second).unwrap();

    let (_server, lines) = small_server(&kit("server"), &run_dir, "2");
    let mut printed = Vec::new();
    let next = |printed: &mut Vec<String>| {
        let l = lines.recv_timeout(Duration::from_secs(600)).unwrap();
        printed.push(l.clone());
        l
    };
    let key = loop {
        let l = next(&mut printed);
        if let Some(rest) = l.strip_prefix("multiparty keys: collective key ") {
            assert!(rest.ends_with(" of 2 hospitals"), "{l}");
            break rest.split(' ').next().unwrap().to_owned();
        }
    };
    let addr = loop {
        if let Some(a) = next(&mut printed).strip_prefix("listening on ") {
            break a.to_owned();
        }
    };
    let mut sites: Vec<Killed> = ["hospital-1", "hospital-2"]
        .iter()
        .map(|h| small_client(&kit(h), &addr, &tmp.path().join(h)))
        .collect();
    let site_lines: Vec<_> = sites.iter_mut().map(lines_of).collect();
    let finished = loop {
        let l = next(&mut printed);
        if l.starts_with("round 1 ") && !l.starts_with("round 1 started") {
            break l;
        }
    };
    assert!(
        finished.starts_with("round 1 completed: 2 updates"),
        "{printed:?}"
    );
    let done = loop {
        let l = next(&mut printed);
        if l.starts_with("run ") {
            break l;
        }
    };
    assert!(done.starts_with("run complete: 1 rounds"), "{printed:?}");
    // Each hospital combined the same key, and ends with the run.
    for (s, lines) in sites.iter_mut().zip(site_lines) {
        let said = until_it_completes(s, &lines);
        assert!(
            said.iter()
                .any(|l| l.ends_with(&format!("multiparty keys, collective key {key}"))),
            "{said:?}"
        );
    }

    // A share under hospital-2's name that is not hospital-2's: of
    // another party, or of party 2 made by someone else (an impostor's
    // keygen in a copy of the kit). Both refused.
    let mine = project.join("hospital-2/he-keyshares/hospital-2.bin");
    let client_refuses =
        |h: &str, says: &str| refuses_to_start(&kit(h), &addr, std::path::Path::new(&work), says);
    std::fs::copy(project.join("hospital-1/he-keyshare.bin"), &mine).unwrap();
    client_refuses(
        "hospital-2",
        "a share of party 1, where hospital-2 is party 2",
    );
    let impostor = other("impostor", "hospital-2");
    assert!(run(&["keygen", "--kit", impostor.to_str().unwrap()]).0);
    std::fs::copy(impostor.join("he-keyshare.bin"), &mine).unwrap();
    client_refuses("hospital-2", "is not this hospital's key share");
    std::fs::copy(project.join("hospital-2/he-keyshare.bin"), &mine).unwrap();

    // The statements: hospital-2's kit holding another set of shares (the
    // impostor's under its name) states another key, signed with its
    // certificate; hospital-1 refuses to start beside it, as it refuses a
    // statement altered on the way or signed by another hospital.
    copy_into(&shares, &impostor);
    std::fs::copy(
        impostor.join("he-keyshare.bin"),
        impostor.join("he-keyshares/hospital-2.bin"),
    )
    .unwrap();
    assert!(run(&["keygen", "--kit", impostor.to_str().unwrap()]).0);
    let theirs = project.join("hospital-1/he-attestations/hospital-2.json");
    let good = std::fs::read(&theirs).unwrap();
    std::fs::copy(impostor.join("he-attestation.json"), &theirs).unwrap();
    client_refuses(
        "hospital-1",
        "hospital-2 states other keys than this kit makes",
    );
    let altered = String::from_utf8(good.clone())
        .unwrap()
        .replace("site: hospital-2", "site: hospital-9");
    std::fs::write(&theirs, altered).unwrap();
    client_refuses(
        "hospital-1",
        "not the certificate's key's over this statement",
    );
    std::fs::copy(
        project.join("hospital-1/he-attestations/hospital-1.json"),
        &theirs,
    )
    .unwrap();
    client_refuses("hospital-1", "signed by hospital-1, not by hospital-2");
    std::fs::write(&theirs, &good).unwrap();
}

/// Threshold multiparty keys made as a deployment makes them: provisioned
/// 2 of 3, each hospital's key share and transport key carried to every
/// kit, each hospital signing a statement of the keys its kit makes, the
/// statements carried to every kit, each hospital dealing only when every
/// statement agrees with its own and only once, the deals carried to their
/// recipients. A kit with a transport key swapped by whoever carried them
/// is caught by the statements before anyone deals. A round then
/// completes with two hospitals while the third never comes. A deal that
/// does not open, a deal of another dealer, a transport key under a
/// hospital's name that is not its own, a threshold of 1, and a server
/// with fewer certified parties than the threshold are refused.
#[test]
fn threshold_keys_are_dealt_between_hospitals_and_a_round_completes_without_one() {
    let tmp = tempfile::tempdir().unwrap();
    let project = tmp.path().join("project");
    let kit = |h: &str| project.join(h).to_str().unwrap().to_owned();
    let sites = ["hospital-1", "hospital-2", "hospital-3"];
    let provision = |threshold: &str| {
        run(&[
            "provision",
            "--out",
            project.to_str().unwrap(),
            "--hospitals",
            "3",
            "--port",
            "1",
            "--keys",
            "multiparty",
            "--threshold",
            threshold,
        ])
    };
    // A threshold of 1 would let any hospital open every upload.
    let (ok, said) = provision("1");
    assert!(
        !ok && said.contains("between 2 and the 3 hospitals"),
        "{said}"
    );
    let (ok, said) = provision("2");
    assert!(ok, "{said}");
    let server = project.join("server");
    // The operator gathers each hospital's public file into the server's
    // kit, then copies that folder into every hospital's kit.
    let carry = |file: &str, folder: &str, ext: &str, from: &[&str]| {
        std::fs::create_dir_all(server.join(folder)).unwrap();
        for h in from {
            std::fs::copy(
                project.join(h).join(file),
                server.join(folder).join(format!("{h}.{ext}")),
            )
            .unwrap();
        }
        for h in sites {
            copy_into(&server.join(folder), &project.join(h));
        }
    };
    for h in sites {
        let (ok, said) = run(&["keygen", "--kit", &kit(h)]);
        assert!(ok && said.contains("run keygen again"), "{said}");
    }
    carry("he-keyshare.bin", "he-keyshares", "bin", &sites);
    carry("he-transport.bin", "he-transport", "bin", &sites);
    // Whoever carried them put hospital-3's transport key under
    // hospital-2's name in hospital-1's kit (as an operator would put his
    // own, to open hospital-1's deal to hospital-2).
    let swapped = project.join("hospital-1/he-transport/hospital-2.bin");
    let real = std::fs::read(&swapped).unwrap();
    std::fs::copy(project.join("hospital-3/he-transport.bin"), &swapped).unwrap();
    let mut rosters = Vec::new();
    for h in sites {
        let (ok, said) = run(&["keygen", "--kit", &kit(h)]);
        assert!(
            ok && said.contains("signed statement of these keys"),
            "{said}"
        );
        rosters.push(
            said.lines()
                .find_map(|l| l.strip_prefix("threshold 2 of 3, roster "))
                .unwrap()
                .to_owned(),
        );
    }
    assert_ne!(rosters[0], rosters[1]);
    assert_eq!(rosters[1], rosters[2]);
    // Nothing is dealt before every statement is in, nor beside one that
    // states other keys.
    let (ok, said) = run(&["keygen", "--kit", &kit("hospital-2"), "--deal"]);
    assert!(
        !ok && said.contains("needs every hospital's signed statement"),
        "{said}"
    );
    carry("he-attestation.json", "he-attestations", "json", &sites);
    for (h, says) in [
        ("hospital-1", "hospital-2 states other keys"),
        ("hospital-2", "hospital-1 states other keys"),
    ] {
        let (ok, said) = run(&["keygen", "--kit", &kit(h), "--deal"]);
        assert!(!ok && said.contains(says), "{h}: {said}");
    }
    for h in sites {
        assert!(!project.join(h).join("he-deals-out").exists());
    }
    // The kit put right, hospital-1 signs anew; its old statement, in
    // every kit, is no longer what it states.
    std::fs::write(&swapped, &real).unwrap();
    let (ok, said) = run(&["keygen", "--kit", &kit("hospital-1")]);
    assert!(
        !ok && said.contains("this kit makes other keys than this hospital stated"),
        "{said}"
    );
    carry(
        "he-attestation.json",
        "he-attestations",
        "json",
        &["hospital-1"],
    );
    let work = tmp.path().join("refused");
    let client_refuses =
        |h: &str, says: &str| refuses_to_start(&kit(h), "127.0.0.1:1", &work, says);
    client_refuses("hospital-1", "has not dealt yet");
    let fingerprint = rosters[1].clone();
    for h in sites {
        let (ok, said) = run(&["keygen", "--kit", &kit(h), "--deal"]);
        assert!(ok && said.contains("deals made"), "{said}");
        assert!(said.contains(&fingerprint), "{said}");
        // Asked again, it keeps the deals it made (dealing twice for one
        // roster would give keys that do not fit together).
        let dealt = std::fs::read(project.join(h).join("he-deals-out/hospital-1.bin")).unwrap();
        for again in [&[][..], &["--deal"][..]] {
            let (ok, said) = run(&[&["keygen", "--kit", &kit(h)][..], again].concat());
            assert!(ok && said.contains("made before, kept"), "{said}");
        }
        assert_eq!(
            std::fs::read(project.join(h).join("he-deals-out/hospital-1.bin")).unwrap(),
            dealt
        );
    }
    // The operator carries each deal to its recipient.
    for dealer in sites {
        for to in sites {
            let into = project.join(to).join("he-deals");
            std::fs::create_dir_all(&into).unwrap();
            std::fs::copy(
                project.join(dealer).join(format!("he-deals-out/{to}.bin")),
                into.join(format!("{dealer}.bin")),
            )
            .unwrap();
        }
    }

    let run_dir = tmp.path().join("server-run");
    let (_server, lines) = small_server(&kit("server"), &run_dir, "2");
    let mut printed = Vec::new();
    let mut next = || {
        let l = lines.recv_timeout(Duration::from_secs(600)).unwrap();
        printed.push(l.clone());
        l
    };
    let roster = format!("multiparty keys: threshold 2 of 3, roster {fingerprint}");
    while next() != roster {}
    let addr = loop {
        if let Some(a) = next().strip_prefix("listening on ") {
            break a.to_owned();
        }
    };
    // hospital-3 never comes: two of three switch the round's sum.
    let mut clients: Vec<Killed> = sites[..2]
        .iter()
        .map(|h| small_client(&kit(h), &addr, &tmp.path().join(h)))
        .collect();
    let client_lines: Vec<_> = clients.iter_mut().map(lines_of).collect();
    let finished = loop {
        let l = next();
        if l.starts_with("round 1 ") && !l.starts_with("round 1 started") {
            break l;
        }
    };
    assert!(
        finished.starts_with("round 1 completed: 2 updates"),
        "{finished}"
    );
    while !next().starts_with("run complete: 1 rounds") {}
    for ((h, lines), client) in sites.iter().zip(client_lines).zip(&mut clients) {
        let said = until_it_completes(client, &lines);
        let roster = format!("{h}: threshold 2 of 3, roster {fingerprint}");
        assert!(said.contains(&roster), "{said:?}");
    }
    drop(clients);
    // The hospitals that started opened their deals once, into their
    // threshold key: hospital-1 starts again without them (the deals'
    // signatures need not outlive the certificates), up to dialing a
    // server that is not there.
    assert!(project.join("hospital-1/he-threshold.key").exists());
    assert!(!project.join("hospital-3/he-threshold.key").exists());
    std::fs::remove_dir_all(project.join("hospital-1/he-deals")).unwrap();
    let (ok, said) = run(&[
        "client",
        "--kit",
        &kit("hospital-1"),
        "--server",
        "127.0.0.1:1",
        "--give-up-after",
        "1",
        "--image-size",
        "32",
        "--patients",
        "16",
        "--dp",
        "off",
        "--work-dir",
        tmp.path().join("hospital-1").to_str().unwrap(),
    ]);
    assert!(
        !ok && said.contains(&format!(
            "hospital-1: threshold 2 of 3, roster {fingerprint}"
        )),
        "{said}"
    );

    // hospital-3's kit, tampered: a deal altered on the way, a deal of
    // another dealer under hospital-2's name, hospital-2's deal to another
    // hospital, a deal with no signature; its own transport key replaced.
    let deal = project.join("hospital-3/he-deals/hospital-2.bin");
    let good = std::fs::read(&deal).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    std::fs::write(&deal, &bad).unwrap();
    client_refuses(
        "hospital-3",
        "hospital-2's signature is not over this deal to hospital-3",
    );
    std::fs::copy(
        project.join("hospital-1/he-deals-out/hospital-3.bin"),
        &deal,
    )
    .unwrap();
    client_refuses("hospital-3", "signed by hospital-1, not by hospital-2");
    std::fs::copy(
        project.join("hospital-2/he-deals-out/hospital-1.bin"),
        &deal,
    )
    .unwrap();
    client_refuses(
        "hospital-3",
        "hospital-2's signature is not over this deal to hospital-3",
    );
    std::fs::write(&deal, &good[good.len() - 100..]).unwrap();
    client_refuses("hospital-3", "not a signed deal");
    std::fs::write(&deal, &good).unwrap();
    std::fs::copy(
        project.join("hospital-1/he-transport.bin"),
        project.join("hospital-3/he-transport/hospital-3.bin"),
    )
    .unwrap();
    let (ok, said) = run(&["keygen", "--kit", &kit("hospital-3")]);
    assert!(
        !ok && said.contains("is not this hospital's transport key"),
        "{said}"
    );
    // A threshold of 1 written into a kit is refused as at provisioning.
    std::fs::write(project.join("hospital-2/he-threshold.txt"), "1\n").unwrap();
    client_refuses("hospital-2", "between 2 and the 3 hospitals");

    // The server starts while 2 parties hold a valid certificate, and
    // refuses with 1.
    let revoke = |site: &str| {
        let path = server.join("roster.json");
        let mut roster: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        for c in roster["certificates"].as_array_mut().unwrap() {
            if c["identity"] == site {
                c["revoked"] = true.into();
            }
        }
        std::fs::write(&path, serde_json::to_vec(&roster).unwrap()).unwrap();
    };
    revoke("hospital-3");
    let later = tmp.path().join("server-run-2");
    let (_again, lines) = small_server(&kit("server"), &later, "2");
    let notice = loop {
        let l = lines.recv_timeout(Duration::from_secs(600)).unwrap();
        if l.contains("no valid certificate") {
            break l;
        }
    };
    assert!(
        notice.contains("for hospital-3; the other 2 switch"),
        "{notice}"
    );
    // It goes on past the statements (hospital-3's checked against the CA
    // only, its certificate being revoked).
    while !lines
        .recv_timeout(Duration::from_secs(600))
        .unwrap()
        .starts_with("multiparty keys: collective key ")
    {}
    revoke("hospital-2");
    let (ok, said) = run(&[
        "server",
        "--kit",
        &kit("server"),
        "--listen",
        "127.0.0.1:0",
        "--run-dir",
        tmp.path().join("server-run-3").to_str().unwrap(),
    ]);
    assert!(
        !ok && said.contains("hospital-2, hospital-3 of the collective key's parties")
            && said.contains("at least 2 parties must answer"),
        "{said}"
    );
}
