//! Slow and flaky links: tasks and replies cross a throttling proxy on
//! 127.0.0.1 that limits each direction's rate, cuts every connection at a
//! fixed interval, or stalls. Liveness is progress in bytes (a link slower
//! than one chunk per liveness window completes), a stalled link is
//! detected, and a dropped transfer resumes from the bytes that arrived.
#![allow(clippy::unwrap_used)] // helpers outside #[test] functions
#![cfg(feature = "net")]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use fedcore::net::provision::{Kit, Project, ProjectSpec};
use fedcore::net::{self, ClientOptions, GrpcTransport, Limits, ServerOptions, ShutdownKind};
use fedcore::{ClientId, Failure, FitIns, Parameters, Task, TrainConfig, Transport};

use common::{Doubler, check_doubled};

/// What the proxy does to the link.
#[derive(Default)]
struct LinkState {
    /// Bytes per second in each direction of each connection.
    rate: u64,
    /// Bumped to cut every open connection.
    generation: AtomicU64,
    /// While set, nothing is forwarded (the sockets stay open).
    stalled: AtomicBool,
    /// Bytes forwarded, both directions.
    forwarded: AtomicU64,
    /// Connections cut.
    cuts: AtomicU64,
    stop: AtomicBool,
}

/// A TCP proxy on 127.0.0.1 in front of `upstream`.
struct Proxy {
    addr: SocketAddr,
    link: Arc<LinkState>,
}

impl Proxy {
    /// Limits each direction to `rate` bytes/s and, with `cut_every`, cuts
    /// every connection at that interval.
    fn start(upstream: SocketAddr, rate: u64, cut_every: Option<Duration>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let link = Arc::new(LinkState {
            rate,
            ..LinkState::default()
        });
        let l = link.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if l.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(down) = conn else { continue };
                let Ok(up) = TcpStream::connect(upstream) else {
                    continue;
                };
                let generation = l.generation.load(Ordering::SeqCst);
                for (from, to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let l = l.clone();
                    std::thread::spawn(move || pump(from, to, &l, generation));
                }
            }
        });
        if let Some(every) = cut_every {
            let l = link.clone();
            std::thread::spawn(move || {
                while !l.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(every);
                    l.generation.fetch_add(1, Ordering::SeqCst);
                    l.cuts.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        Self { addr, link }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.link.stop.store(true, Ordering::SeqCst);
        self.link.generation.fetch_add(1, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

/// Forwards `from` to `to` at the link's rate until either side closes or
/// the connection is cut.
fn pump(mut from: TcpStream, mut to: TcpStream, link: &LinkState, generation: u64) {
    let tick = Duration::from_millis(20);
    from.set_read_timeout(Some(tick)).unwrap();
    to.set_write_timeout(Some(tick)).unwrap();
    let cut =
        || link.stop.load(Ordering::SeqCst) || link.generation.load(Ordering::SeqCst) != generation;
    // Small reads so that the rate is smooth (50 slices a second).
    let mut buf = vec![0u8; (link.rate / 50).clamp(512, 64 << 10) as usize];
    // When the next byte may go: an idle link earns no credit beyond one
    // slice, so a burst after a pause is not faster than the rate.
    let mut next = Instant::now();
    'pump: loop {
        if cut() {
            break;
        }
        if link.stalled.load(Ordering::SeqCst) {
            std::thread::sleep(tick);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        let mut data = &buf[..n];
        while !data.is_empty() {
            if cut() {
                break 'pump;
            }
            match to.write(data) {
                Ok(0) => break 'pump,
                Ok(w) => data = &data[w..],
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break 'pump,
            }
        }
        link.forwarded.fetch_add(n as u64, Ordering::Relaxed);
        let now = Instant::now();
        next = next.max(now.checked_sub(tick).unwrap_or(now));
        next += Duration::from_secs_f64(n as f64 / link.rate as f64);
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

struct Setup {
    _tmp: tempfile::TempDir,
    transport: GrpcTransport,
    proxy: Proxy,
    site: JoinHandle<fedcore::Result<()>>,
}

/// A server, a proxy in front of it, and site `h1` dialing the proxy.
fn setup(
    rate: u64,
    cut_every: Option<Duration>,
    timing: (Duration, Duration),
    limits: Limits,
    resume_window: Duration,
) -> Setup {
    let (heartbeat, liveness) = timing;
    let tmp = tempfile::tempdir().unwrap();
    let spec = ProjectSpec::new("links", vec!["h1".into()], 0);
    let project = Project::create(tmp.path().join("p"), &spec).unwrap();
    let options = ServerOptions {
        listen: Some("127.0.0.1:0".parse().unwrap()),
        heartbeat,
        liveness,
        resume_window,
        limits: limits.clone(),
        ..ServerOptions::default()
    };
    let mut transport =
        GrpcTransport::start(&Kit::load(project.server_kit()).unwrap(), options).unwrap();
    let proxy = Proxy::start(transport.local_addr(), rate, cut_every);
    let kit = Kit::load(project.site_kit("h1")).unwrap();
    let options = ClientOptions {
        address: Some(proxy.addr.to_string()),
        heartbeat,
        liveness,
        limits,
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(400),
        connect_timeout: Duration::from_secs(5),
        give_up_after: Some(Duration::from_secs(60)),
    };
    let site =
        std::thread::spawn(move || net::run_client(&kit, Doubler(ClientId::new("h1")), &options));
    assert_eq!(transport.wait_for_clients(1, Duration::from_secs(20)), 1);
    Setup {
        _tmp: tmp,
        transport,
        proxy,
        site,
    }
}

impl Setup {
    fn finish(mut self) {
        self.proxy.link.stalled.store(false, Ordering::SeqCst);
        self.transport
            .shutdown("done", ShutdownKind::Finished, Duration::from_secs(5));
        drop(self.proxy);
        // The site either heard the end or gives up reconnecting to a proxy
        // that is gone; either way it stops.
        let _ = self.site.join().unwrap();
    }
}

/// A model of `n` distinct values.
fn model(n: usize) -> Arc<Parameters> {
    Arc::new(
        Parameters::from_tensors([(
            "w",
            vec![n],
            (0..n)
                .map(|i| (i % 4093) as f32 - 2000.5)
                .collect::<Vec<_>>(),
        )])
        .unwrap(),
    )
}

fn fit(global: &Arc<Parameters>) -> Task {
    Task::Fit(FitIns {
        round: 1,
        parameters: global.clone(),
        config: TrainConfig::default(),
        sealed: None,
        extra: None,
    })
}

#[test]
fn a_link_slower_than_a_chunk_per_liveness_window_completes() {
    // 50 KB/s; 160 KB each way in one 1 MiB chunk: 3.2 s per message with
    // a 1 s liveness. Whole-message liveness would cut it every time.
    let mut s = setup(
        50_000,
        None,
        (Duration::from_millis(250), Duration::from_secs(1)),
        Limits::default(),
        Duration::from_secs(30),
    );
    let global = model(40_000);
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    s.transport
        .send(&ClientId::new("h1"), fit(&global), tx)
        .unwrap();
    // The transfer shows on the monitor while it runs.
    let monitor = s.transport.monitor();
    let mut seen = None;
    while started.elapsed() < Duration::from_secs(3) && seen.is_none() {
        std::thread::sleep(Duration::from_millis(200));
        seen = monitor
            .transfers()
            .into_iter()
            .find(|t| t.direction == "download" && t.bytes > 0);
    }
    let reply = rx.recv_timeout(Duration::from_secs(60)).expect("a reply");
    let took = started.elapsed();
    check_doubled(reply, &global);
    // 320 KB at 50 KB/s: at least 6.4 s; no reconnect, so no byte twice.
    assert!(took >= Duration::from_secs(6), "{took:?}");
    assert!(
        s.proxy.link.forwarded.load(Ordering::SeqCst) < 400_000,
        "forwarded {} bytes",
        s.proxy.link.forwarded.load(Ordering::SeqCst)
    );
    let t = seen.expect("the download on the monitor");
    assert_eq!((t.identity.as_str(), t.total), ("h1", 160_000));
    assert!(t.rate_bytes_per_s > 0.0 && t.eta_s.is_some(), "{t:?}");
    let closed: Vec<_> = monitor
        .sites()
        .into_iter()
        .filter(|c| c.closed.is_some())
        .collect();
    assert!(closed.is_empty(), "{closed:?}");
    s.finish();
}

#[test]
fn transfers_resume_across_a_link_that_drops_every_2_s() {
    // 1 MB/s, every connection cut after 2 s: 4 MB each way needs about 3
    // connections per direction. Starting over could never finish.
    let limits = Limits {
        chunk_bytes: 64 << 10,
        ..Limits::default()
    };
    let mut s = setup(
        1_000_000,
        Some(Duration::from_secs(2)),
        (Duration::from_millis(250), Duration::from_secs(1)),
        limits,
        Duration::from_secs(30),
    );
    let global = model(1_000_000);
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    s.transport
        .send(&ClientId::new("h1"), fit(&global), tx)
        .unwrap();
    let reply = rx.recv_timeout(Duration::from_secs(90)).expect("a reply");
    let took = started.elapsed();
    check_doubled(reply, &global);
    let cuts = s.proxy.link.cuts.load(Ordering::SeqCst);
    let forwarded = s.proxy.link.forwarded.load(Ordering::SeqCst);
    eprintln!("8 MB crossed in {took:?}: {cuts} cuts, {forwarded} bytes forwarded");
    assert!(cuts >= 3, "only {cuts} cuts in {took:?}");
    // Resumed, not restarted: little more than the 8 MB of payload (TLS
    // handshakes, framing, the bytes in flight at each cut).
    assert!(forwarded < 12_000_000, "{forwarded} bytes for 8 MB");
    s.finish();
}

#[test]
fn a_stalled_link_is_detected_and_the_task_resumes_when_it_moves_again() {
    let limits = Limits {
        chunk_bytes: 64 << 10,
        ..Limits::default()
    };
    let mut s = setup(
        500_000,
        None,
        (Duration::from_millis(250), Duration::from_secs(1)),
        limits,
        Duration::from_secs(30),
    );
    let global = model(500_000);
    let (tx, rx) = mpsc::channel();
    s.transport
        .send(&ClientId::new("h1"), fit(&global), tx)
        .unwrap();
    // Stall mid-download for 4 s: both sides see no byte for 1 s and drop
    // the connection; the site keeps trying through the stalled proxy.
    std::thread::sleep(Duration::from_millis(1500));
    s.proxy.link.stalled.store(true, Ordering::SeqCst);
    let monitor = s.transport.monitor();
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut closed = None;
    while Instant::now() < deadline && closed.is_none() {
        std::thread::sleep(Duration::from_millis(100));
        closed = monitor.sites().into_iter().find_map(|c| c.closed);
    }
    let closed = closed.expect("the stalled session is closed");
    assert!(closed.reason.contains("no byte"), "{}", closed.reason);
    assert!(rx.try_recv().is_err(), "the task waits for the site");
    std::thread::sleep(Duration::from_secs(2));
    s.proxy.link.stalled.store(false, Ordering::SeqCst);
    let reply = rx.recv_timeout(Duration::from_secs(60)).expect("a reply");
    check_doubled(reply, &global);
    s.finish();
}

#[test]
fn a_site_that_does_not_come_back_fails_its_task_after_the_resume_window() {
    let mut s = setup(
        2_000_000,
        None,
        (Duration::from_millis(250), Duration::from_secs(1)),
        Limits::default(),
        Duration::from_secs(2),
    );
    let global = model(1_000_000);
    let (tx, rx) = mpsc::channel();
    s.transport
        .send(&ClientId::new("h1"), fit(&global), tx)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    s.proxy.link.stalled.store(true, Ordering::SeqCst);
    let stalled = Instant::now();
    let env = rx.recv_timeout(Duration::from_secs(20)).expect("a failure");
    let waited = stalled.elapsed();
    let Err(Failure::Disconnected(reason)) = env.reply else {
        panic!("{:?}", env.reply.map(|_| ()))
    };
    assert!(reason.contains("not back within 2 s"), "{reason}");
    // Liveness (1 s) then the window (2 s), not at once and not forever.
    // The silence starts with the client's last byte before the stall,
    // which can be a heartbeat (250 ms) or more earlier: 2.97 s was seen
    // once in 12 runs with both cores busy.
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    s.finish();
}

/// The bench of the resumed transfer (`cargo test --release -p fedcore
/// --features net --test links -- --ignored --nocapture`): a model of
/// `FEDCORE_LINK_MB` MB (default 200) to a site and back over a 1 MB/s
/// link cut every `FEDCORE_LINK_CUT_S` seconds (default 30), with the
/// default liveness and resume window. Prints the time, the cuts and the
/// bytes forwarded; docs/benchmarks.md records a run.
#[test]
#[ignore = "minutes long: the bench of the resumed transfer"]
fn bench_a_large_model_over_a_1_mb_s_link_that_drops() {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let mb = var("FEDCORE_LINK_MB", 200);
    let cut = var("FEDCORE_LINK_CUT_S", 30);
    let mut s = setup(
        1_000_000,
        Some(Duration::from_secs(cut)),
        (Duration::from_secs(2), Duration::from_secs(10)),
        Limits::default(),
        Duration::from_secs(60),
    );
    let global = model((mb * 250_000) as usize);
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    s.transport
        .send(&ClientId::new("h1"), fit(&global), tx)
        .unwrap();
    let reply = rx
        .recv_timeout(Duration::from_secs(mb * 20 + 600))
        .expect("a reply");
    let took = started.elapsed();
    check_doubled(reply, &global);
    let cuts = s.proxy.link.cuts.load(Ordering::SeqCst);
    let forwarded = s.proxy.link.forwarded.load(Ordering::SeqCst);
    println!(
        "{mb} MB down and {mb} MB up over 1 MB/s cut every {cut} s: {:.1} s, {cuts} cuts, \
         {forwarded} bytes forwarded ({:.3} of the payload)",
        took.as_secs_f64(),
        forwarded as f64 / (2.0 * mb as f64 * 1e6)
    );
    s.finish();
}
