//! The hospital federation deployed as processes on 127.0.0.1: provisioning
//! with CKKS keys in the kits, the aggregation server and two hospitals over
//! gRPC with mutual TLS, the head encrypted end to end.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

use std::io::{BufRead, BufReader};
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
    let first = lines.recv_timeout(Duration::from_secs(60)).unwrap();
    let addr = first
        .strip_prefix("listening on ")
        .expect("listening line")
        .to_owned();
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
                    // hospital-2 protects its body update with local DP.
                    .args(if *h == "hospital-2" {
                        &[
                            "--dp",
                            "true",
                            "--epsilon",
                            "50",
                            "--clip",
                            "0.01",
                            "--dp-rounds",
                            "2",
                        ][..]
                    } else {
                        &[][..]
                    })
                    .args(["--work-dir", tmp.path().join(h).to_str().unwrap()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    wait_ok(&mut server.0, "server", Duration::from_secs(600));
    for (i, s) in sites.iter_mut().enumerate() {
        wait_ok(
            &mut s.0,
            &format!("hospital-{}", i + 1),
            Duration::from_secs(60),
        );
    }
    let printed: Vec<String> = lines.try_iter().collect();
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
    // Each update says what protected it: CKKS for both, local DP for hospital-2.
    for update in history[0]["accepted"].as_array().unwrap() {
        let provenance: Vec<fedcore::Protection> =
            serde_json::from_value(update["provenance"].clone()).unwrap();
        let kinds: Vec<fedcore::ProtectionKind> = provenance.iter().map(|p| p.kind).collect();
        assert!(
            kinds.contains(&fedcore::ProtectionKind::Encryption),
            "{provenance:?}"
        );
        let dp = kinds.contains(&fedcore::ProtectionKind::DifferentialPrivacy);
        assert_eq!(dp, update["client"] == "hospital-2", "{provenance:?}");
        if dp {
            assert!(
                provenance.iter().any(|p| p.mechanism.contains("gaussian")),
                "{provenance:?}"
            );
        }
    }
    // The sealed head was checkpointed next to the model (as bytes the server cannot open).
    let sealed = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().contains("sealed"));
    assert!(sealed, "a sealed checkpoint file");
}
