//! The network transport with real processes on 127.0.0.1: a server and its
//! sites as separate `fedcore-deploy` processes over gRPC with mutual TLS.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fedcore::RoundRecord;
use fedcore::net::provision::{Kit, Roster};
use fedcore::net::testkit::{open_session, proto};
use fedcore::net::{ClientOptions, Limits};

const BIN: &str = env!("CARGO_BIN_EXE_fedcore-deploy");
const WAIT: Duration = Duration::from_secs(90);

/// A child process whose stdout lines and stderr are collected; killed on drop.
struct Proc {
    name: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn start(name: &str, args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fedcore-deploy");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proc {
            name: name.into(),
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// The first stdout line (from now on) that satisfies `pred`.
    fn wait_line(&mut self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "{}: no matching line; stdout so far:\n{}\nstderr:\n{}",
                    self.name,
                    self.seen.join("\n"),
                    self.stderr()
                ),
            }
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                while let Ok(l) = self.lines.try_recv() {
                    self.seen.push(l);
                }
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit; stderr:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_success(&mut self) {
        let status = self.wait();
        assert!(
            status.success(),
            "{} failed ({status}); stdout:\n{}\nstderr:\n{}",
            self.name,
            self.seen.join("\n"),
            self.stderr()
        );
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn run_ok(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run fedcore-deploy");
    assert!(
        out.status.success(),
        "fedcore-deploy {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn provision(dir: &Path, sites: &str) {
    run_ok(&[
        "provision",
        "--out",
        dir.to_str().unwrap(),
        "--sites",
        sites,
        "--port",
        "1",
    ]);
}

fn kit(dir: &Path, who: &str) -> String {
    dir.join(who).to_str().unwrap().to_owned()
}

/// Starts a server on a free port of 127.0.0.1; returns it and its address.
fn start_server(project: &Path, extra: &[&str]) -> (Proc, String) {
    let kit = kit(project, "server");
    let mut args = vec!["server", "--kit", &kit, "--heartbeat-ms", "500"];
    if !extra.contains(&"--listen") {
        args.extend(["--listen", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    let mut p = Proc::start("server", &args);
    let line = p.wait_line(|l| l.starts_with("listening on "));
    let addr = line.trim_start_matches("listening on ").to_owned();
    (p, addr)
}

fn start_client(project: &Path, site: &str, addr: &str, extra: &[&str]) -> Proc {
    let kit = kit(project, site);
    let mut args = vec![
        "client",
        "--kit",
        &kit,
        "--server",
        addr,
        "--heartbeat-ms",
        "500",
    ];
    args.extend_from_slice(extra);
    Proc::start(site, &args)
}

fn history(checkpoints: &Path) -> Vec<RoundRecord> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(checkpoints.join("state.json")).unwrap()).unwrap();
    serde_json::from_value(state["history"].clone()).unwrap()
}

/// A project provisioned for sites h1, h2, h3, and a checkpoint folder.
struct Run {
    tmp: tempfile::TempDir,
    project: PathBuf,
    ckpt: PathBuf,
}

impl Run {
    fn new() -> Run {
        let tmp = tempfile::tempdir().unwrap();
        let project = tmp.path().join("project");
        provision(&project, "h1,h2,h3");
        let ckpt = tmp.path().join("ckpt");
        Run { tmp, project, ckpt }
    }

    /// Starts the server for `rounds` rounds, each needing `quorum` valid
    /// updates and `available` sites connected to start, checkpointing into
    /// `ckpt`, with `extra` flags.
    fn server(&self, rounds: u32, quorum: u32, available: u32, extra: &[&str]) -> (Proc, String) {
        let (rounds, quorum, available) = (
            rounds.to_string(),
            quorum.to_string(),
            available.to_string(),
        );
        let mut args = vec!["--rounds", &rounds, "--min-clients", &quorum];
        args.extend(["--min-available", &available]);
        args.extend(["--checkpoint-dir", self.ckpt.to_str().unwrap()]);
        args.extend_from_slice(extra);
        start_server(&self.project, &args)
    }
}

fn accepted(r: &RoundRecord) -> Vec<&str> {
    r.accepted.iter().map(|a| a.client.as_str()).collect()
}

#[test]
fn three_sites_complete_five_rounds_over_mutual_tls() {
    let run = Run::new();
    let (project, ckpt) = (&run.project, &run.ckpt);
    let (mut server, addr) = run.server(5, 3, 3, &[]);
    let mut clients: Vec<Proc> = ["h1", "h2", "h3"]
        .iter()
        .map(|s| start_client(project, s, &addr, &[]))
        .collect();
    server.wait_success();
    for c in &mut clients {
        c.wait_success();
    }
    let h = history(ckpt);
    assert_eq!(
        h.iter().map(|r| r.round).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    for r in &h {
        assert_eq!(accepted(r), ["h1", "h2", "h3"], "round {}", r.round);
        assert!(r.failures.is_empty());
    }
    let accuracy = |r: &RoundRecord| r.evaluation.as_ref().unwrap().metrics["accuracy"];
    assert!(
        accuracy(&h[4]) > 0.6,
        "the model learned over the wire: {}",
        accuracy(&h[4])
    );
}

#[test]
fn a_site_killed_mid_round_is_a_dropout_and_rejoins_after_restart() {
    let run = Run::new();
    let (project, ckpt) = (&run.project, &run.ckpt);
    // Rounds start with all three connected: h3 is in round 2, and after
    // its restart in round 3; a round completes with two valid updates.
    let (mut server, addr) = run.server(5, 2, 3, &[]);
    let slow = ["--fit-delay-ms", "800"];
    let mut h1 = start_client(project, "h1", &addr, &slow);
    let mut h2 = start_client(project, "h2", &addr, &slow);
    let mut h3 = start_client(project, "h3", &addr, &slow);
    // Round 2 with all three sampled; kill h3 while it trains and start it
    // again. The server keeps h3's task for the resume window (a dropped
    // link would resume it); the restarted process no longer holds it, so
    // it fails as a dropout as soon as h3 is back.
    server.wait_line(|l| l.starts_with("round 2 started") && l.contains("h3"));
    std::thread::sleep(Duration::from_millis(300));
    h3.kill();
    let mut h3 = start_client(project, "h3", &addr, &slow);
    let line = server.wait_line(|l| l.starts_with("round 2 "));
    assert!(line.contains("finished accepted=h1,h2 "), "{line}");
    assert!(line.contains("h3(disconnected"), "{line}");
    server.wait_success();
    for c in [&mut h1, &mut h2, &mut h3] {
        c.wait_success();
    }
    let h = history(ckpt);
    assert_eq!(h.len(), 5);
    assert_eq!(accepted(&h[1]), ["h1", "h2"]);
    assert_eq!(accepted(&h[2]), ["h1", "h2", "h3"], "h3 rejoined round 3");
}

/// Connects as `site` and, once a task arrives, sends one message over the
/// server's limit. Returns the error the stream ends with.
fn oversized_sender(kit_dir: String, addr: String) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let kit = Kit::load(&kit_dir).unwrap();
        let options = ClientOptions {
            address: Some(addr),
            limits: Limits {
                max_message_bytes: 64 << 20,
                ..Limits::default()
            },
            ..ClientOptions::default()
        };
        let (tx, mut inbound) = open_session(&kit, &options).await.unwrap();
        let msg = |k| proto::ClientMessage { kind: Some(k) };
        loop {
            match inbound.message().await {
                Ok(Some(proto::ServerMessage {
                    kind: Some(proto::server_message::Kind::Task(t)),
                })) => {
                    let chunk = proto::Chunk {
                        task_id: t.task_id,
                        offset: 0,
                        data: vec![7u8; 3 << 20].into(),
                    };
                    tx.send(msg(proto::client_message::Kind::Chunk(chunk)))
                        .await
                        .unwrap();
                }
                Ok(Some(_)) => {}
                Ok(None) => return "stream ended".to_owned(),
                Err(s) => return s.to_string(),
            }
        }
    })
}

#[test]
fn foreign_off_roster_revoked_plain_and_oversized_connections_are_refused_while_the_run_goes_on() {
    let run = Run::new();
    let (tmp, project, ckpt) = (&run.tmp, &run.project, &run.ckpt);
    let foreign = tmp.path().join("foreign");
    provision(&foreign, "h1");
    let p = project.to_str().unwrap();
    run_ok(&["revoke", "--project", p, "h3"]);
    run_ok(&["add-site", "--project", p, "h4"]);
    run_ok(&["add-site", "--project", p, "h5"]);
    // h4 has a certificate from the project CA but is taken off the roster.
    let roster_path = Kit::load(project.join("server")).unwrap().roster_path();
    let mut roster = Roster::load(&roster_path).unwrap();
    roster.certificates.retain(|c| c.identity != "h4");
    roster.save(&roster_path).unwrap();

    let limits = ["--max-message-bytes", "1100000", "--chunk-bytes", "262144"];
    let mut flags = limits.to_vec();
    // The rogue site below never hears the end: do not wait 20 s for it.
    flags.extend(["--finish-grace", "2"]);
    let (mut server, addr) = run.server(6, 2, 2, &flags);
    let slow = ["--fit-delay-ms", "700"];
    let mut h1 = start_client(project, "h1", &addr, &slow);
    let mut h2 = start_client(project, "h2", &addr, &slow);
    server.wait_line(|l| l.starts_with("round 1 started sampled=h1,h2"));

    // A certificate from another CA with a roster name, in a kit that trusts
    // the real server: the server refuses it in the handshake.
    let forged = tmp.path().join("forged");
    std::fs::create_dir(&forged).unwrap();
    for f in ["kit.json", "cert.pem", "key.pem"] {
        std::fs::copy(foreign.join("h1").join(f), forged.join(f)).unwrap();
    }
    std::fs::copy(project.join("h1").join("ca.pem"), forged.join("ca.pem")).unwrap();
    let mut other = start_client(tmp.path(), "forged", &addr, &["--give-up-after", "0"]);
    // Revoked, and off the roster: refused after the handshake, with the reason.
    let mut revoked = start_client(project, "h3", &addr, &[]);
    let mut off_roster = start_client(project, "h4", &addr, &[]);
    // Plain TCP, no TLS: the server answers no HTTP/2.
    let mut tcp = TcpStream::connect(addr.parse::<SocketAddr>().unwrap()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let mut buf = [0u8; 64];
    // The server hangs up (or answers with a TLS alert record, 0x15); a
    // read that times out means it kept the connection open: a failure.
    match tcp.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => assert_eq!(buf[0], 0x15, "not a TLS alert: {:?}", &buf[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the server neither answered nor hung up: {e}"),
    }
    // A valid site that sends a message over the limit once it has a task.
    let (kit5, addr5) = (kit(project, "h5"), addr.clone());
    let rogue = std::thread::spawn(move || oversized_sender(kit5, addr5));
    server.wait_line(|l| l.contains(" started sampled=") && l.contains("h5"));

    assert!(!other.wait().success());
    assert!(other.stderr().contains("gave up"), "{}", other.stderr());
    let refusal = other.stderr();
    let refusal = refusal
        .lines()
        .find(|l| l.contains("gave up"))
        .unwrap_or_default();
    eprintln!("foreign certificate: {refusal}");
    // Refused by the server's TLS stack, in the handshake: the client never
    // had a session (how the broken handshake reads on its side varies: a
    // `DecryptError` alert, a broken pipe, a closed connection), and the
    // server never got as far as its roster check for that certificate.
    assert!(!refusal.contains("refused by the server"), "{refusal}");
    let forged_fp = Kit::load(&forged).unwrap().fingerprint().unwrap();
    assert!(!revoked.wait().success());
    assert!(revoked.stderr().contains("revoked"), "{}", revoked.stderr());
    assert!(!off_roster.wait().success());
    assert!(
        off_roster.stderr().contains("not on the roster"),
        "{}",
        off_roster.stderr()
    );
    let rogue_end = rogue.join().unwrap();
    assert!(!rogue_end.is_empty());

    server.wait_success();
    h1.wait_success();
    h2.wait_success();
    let log = server.stderr();
    assert!(
        log.contains("not on the roster"),
        "the off-roster refusal is logged"
    );
    assert!(
        !log.contains(&forged_fp),
        "the forged certificate reached the roster check:\n{log}"
    );
    let h = history(ckpt);
    assert_eq!(h.len(), 6);
    for r in &h {
        // The real h1 and h2 took part in every round: nobody displaced them.
        assert_eq!(
            accepted(r),
            ["h1", "h2"],
            "round {}: {:?} {:?} {:?}",
            r.round,
            r.outcome,
            r.sampled,
            r.failures
        );
        assert!(
            r.sampled
                .iter()
                .all(|c| ["h1", "h2", "h5"].contains(&c.as_str()))
        );
    }
    let h5: Vec<String> = h
        .iter()
        .flat_map(|r| &r.failures)
        .filter(|f| f.client.as_str() == "h5")
        .map(|f| f.reason.to_string())
        .collect();
    assert_eq!(h5.len(), 1, "the oversized sender failed one round: {h5:?}");
    assert!(
        h5[0].contains("too large") || h5[0].contains("limit"),
        "{}",
        h5[0]
    );
}

#[test]
fn a_killed_server_restarts_from_its_checkpoint_and_every_round_is_recorded_once() {
    let run = Run::new();
    let (project, ckpt) = (&run.project, &run.ckpt);
    let (mut server, addr) = run.server(5, 3, 3, &[]);
    let slow = ["--fit-delay-ms", "400"];
    let mut clients: Vec<Proc> = ["h1", "h2", "h3"]
        .iter()
        .map(|s| start_client(project, s, &addr, &slow))
        .collect();
    server.wait_line(|l| l.starts_with("round 2 finished"));
    server.kill();

    let (mut server, _) = run.server(5, 3, 3, &["--listen", &addr]);
    let resumed = server.wait_line(|l| l.starts_with("resumed at round "));
    let at: u64 = resumed
        .trim_start_matches("resumed at round ")
        .parse()
        .unwrap();
    assert!(at >= 3, "{resumed}");
    server.wait_success();
    for c in &mut clients {
        c.wait_success();
    }
    let h = history(ckpt);
    assert_eq!(
        h.iter().map(|r| r.round).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5],
        "each round once"
    );
    assert!(h.iter().all(|r| accepted(r) == ["h1", "h2", "h3"]));
}
