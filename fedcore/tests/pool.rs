//! Virtual clients ([`fedcore::pool::ClientPool`]): a pool of a few
//! workers over many client ids ends bit for bit where one thread and one
//! live client per id ends, keeps only the round's clients alive, keeps
//! exactly what each client carries between rounds, and turns a client it
//! cannot build into that client's failure.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use fedcore::linear::SoftmaxRegression;
use fedcore::memory::InMemoryTransport;
use fedcore::pool::{ClientFactory, ClientPool, ModelClients};
use fedcore::{
    ClientId, ControlVariate, Encoding, Failure, FedAvg, ModelClient, Parameters, PrivacyCost,
    PrivacyMechanism, Scaffold, Server, ServerConfig, Strategy, Transport,
};

const CLIENTS: u64 = 12;

/// A mechanism whose effect depends on its past: the k-th release is
/// scaled by 1/k. A pool that lost it between rounds would scale by 1.
struct Shrinking {
    releases: u32,
}

impl PrivacyMechanism for Shrinking {
    fn name(&self) -> String {
        "shrinking".into()
    }

    fn privatize(&mut self, update: &mut Parameters) -> fedcore::Result<PrivacyCost> {
        self.releases += 1;
        let s = 1.0 / self.releases as f32;
        update.as_mut_slice().iter_mut().for_each(|v| *v *= s);
        Ok(PrivacyCost::None)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// No state between rounds.
    Plain,
    /// A stateful mechanism and int8 uploads (an error-feedback residual).
    Stateful,
    /// SCAFFOLD's client variate.
    Scaffold,
}

fn client(i: u64, kind: Kind) -> ModelClient<SoftmaxRegression> {
    let c = ModelClient::new(
        name(i),
        SoftmaxRegression::new(DIM, CLASSES),
        client_data(i),
    );
    match kind {
        Kind::Plain => c,
        Kind::Stateful => c.with_mechanism(Shrinking { releases: 0 }),
        Kind::Scaffold => c.with_control_variate(ControlVariate::new()),
    }
}

fn index(id: &ClientId) -> u64 {
    id.as_str().trim_start_matches("hospital-").parse().unwrap()
}

fn ids() -> Vec<ClientId> {
    (0..CLIENTS).map(|i| ClientId::from(name(i))).collect()
}

fn pool(kind: Kind, workers: usize) -> ClientPool<impl ClientFactory> {
    let factory = ModelClients::new(move |id: &ClientId| Ok(client(index(id), kind)));
    ClientPool::new(factory, ids(), workers).unwrap()
}

fn threads(kind: Kind) -> InMemoryTransport {
    let mut t = InMemoryTransport::new();
    for i in 0..CLIENTS {
        t.add_client(client(i, kind)).unwrap();
    }
    t
}

/// 12 clients, a quarter sampled per round (3), 6 rounds: most clients
/// sit some rounds out and come back.
fn cfg(kind: Kind) -> ServerConfig {
    let mut c = config(6);
    c.fraction_fit = 0.25;
    c.min_fit_clients = 3;
    c.min_available_clients = CLIENTS as usize;
    if kind == Kind::Stateful {
        c.train.upload = Encoding::Int8;
    }
    c
}

fn run<T: Transport, S: Strategy>(transport: T, strategy: S, kind: Kind) -> Server<T, S> {
    let mut s = Server::new(cfg(kind), initial(), transport, strategy).unwrap();
    s.run().unwrap();
    assert!(s.history().iter().all(|r| r.outcome.is_completed()));
    s
}

fn accepted<T: Transport, S: Strategy>(s: &Server<T, S>) -> Vec<Vec<ClientId>> {
    s.history()
        .iter()
        .map(|r| {
            let mut ids: Vec<ClientId> = r.accepted.iter().map(|a| a.client.clone()).collect();
            ids.sort();
            ids
        })
        .collect()
}

#[test]
fn a_pool_ends_where_one_thread_per_client_ends() {
    for kind in [Kind::Plain, Kind::Stateful] {
        let reference = run(threads(kind), FedAvg, kind);
        for workers in [1, 3] {
            let pooled = run(pool(kind, workers), FedAvg, kind);
            assert_eq!(accepted(&pooled), accepted(&reference));
            assert_eq!(
                pooled.global().as_slice(),
                reference.global().as_slice(),
                "{workers} workers"
            );
            // Only the last round's three clients are alive.
            assert!(
                pooled.transport().live() <= 3,
                "{}",
                pooled.transport().live()
            );
        }
    }
    // The state mattered: without it the run ends elsewhere.
    let plain = run(threads(Kind::Plain), FedAvg, Kind::Stateful);
    let stateful = run(threads(Kind::Stateful), FedAvg, Kind::Stateful);
    assert_ne!(plain.global().as_slice(), stateful.global().as_slice());
}

#[test]
fn a_pool_keeps_scaffold_variates_between_rounds() {
    let scaffold = || Scaffold::new(FedAvg, initial().layout().clone(), CLIENTS as usize).unwrap();
    let reference = run(threads(Kind::Scaffold), scaffold(), Kind::Scaffold);
    let pooled = run(pool(Kind::Scaffold, 2), scaffold(), Kind::Scaffold);
    assert_eq!(pooled.global().as_slice(), reference.global().as_slice());
    // Every client that trained keeps its variate, and only those.
    let trained: std::collections::BTreeSet<ClientId> =
        accepted(&pooled).into_iter().flatten().collect();
    let t = pooled.transport();
    assert_eq!(t.kept() + t.live(), trained.len());
}

#[test]
fn a_pool_without_state_keeps_nothing() {
    let s = run(pool(Kind::Plain, 2), FedAvg, Kind::Plain);
    assert_eq!(s.transport().kept(), 0);
    assert!(s.transport().live() <= 3);
    let s = run(pool(Kind::Stateful, 2), FedAvg, Kind::Stateful);
    assert!(s.transport().kept() > 0);
}

/// Builds like [`ModelClients`] but fails for `hospital-3` the first
/// `fail` times it is asked.
struct Flaky {
    fail: usize,
    asked: AtomicUsize,
}

impl ClientFactory for Flaky {
    type Client = ModelClient<SoftmaxRegression>;
    type State = fedcore::ClientState;

    fn make(&self, id: &ClientId) -> fedcore::Result<Self::Client> {
        if index(id) == 3 && self.asked.fetch_add(1, Ordering::SeqCst) < self.fail {
            return Err(fedcore::Error::InvalidInput(
                "hospital-3's data is offline".into(),
            ));
        }
        Ok(client(index(id), Kind::Stateful))
    }

    fn resume(&self, c: Self::Client, state: Self::State) -> Self::Client {
        c.with_state(state)
    }

    fn suspend(&self, c: Self::Client) -> Option<Self::State> {
        Some(c.into_state())
    }
}

#[test]
fn a_client_the_factory_cannot_build_fails_alone() {
    let factory = Flaky {
        fail: usize::MAX,
        asked: AtomicUsize::new(0),
    };
    let mut c = cfg(Kind::Plain);
    c.fraction_fit = 1.0;
    c.rounds = 2;
    let mut s = Server::new(
        c,
        initial(),
        ClientPool::new(factory, ids(), 2).unwrap(),
        FedAvg,
    )
    .unwrap();
    s.run().unwrap();
    for r in s.history() {
        assert!(r.outcome.is_completed());
        assert_eq!(r.accepted.len(), CLIENTS as usize - 1);
        let [f] = &r.failures[..] else {
            panic!("{:?}", r.failures)
        };
        assert_eq!(f.client.as_str(), "hospital-3");
        assert!(
            matches!(&f.reason, Failure::ClientError(m) if m.contains("offline")),
            "{:?}",
            f.reason
        );
    }
}

/// A factory that panics for one client fails that client's task with the
/// panic's message; the workers live on and the other clients train, round
/// after round.
#[test]
fn a_factory_that_panics_fails_its_client_not_the_pool() {
    struct Panicky;
    impl ClientFactory for Panicky {
        type Client = ModelClient<SoftmaxRegression>;
        type State = fedcore::ClientState;

        fn make(&self, id: &ClientId) -> fedcore::Result<Self::Client> {
            assert!(index(id) != 2, "hospital-2's loader broke");
            Ok(client(index(id), Kind::Stateful))
        }

        fn resume(&self, c: Self::Client, state: Self::State) -> Self::Client {
            c.with_state(state)
        }

        fn suspend(&self, c: Self::Client) -> Option<Self::State> {
            Some(c.into_state())
        }
    }
    let mut c = cfg(Kind::Plain);
    c.fraction_fit = 1.0;
    c.rounds = 3;
    let mut s = Server::new(
        c,
        initial(),
        ClientPool::new(Panicky, ids(), 2).unwrap(),
        FedAvg,
    )
    .unwrap();
    s.run().unwrap();
    assert_eq!(s.history().len(), 3);
    for r in s.history() {
        assert_eq!(r.accepted.len(), CLIENTS as usize - 1);
        let [f] = &r.failures[..] else {
            panic!("{:?}", r.failures)
        };
        assert_eq!(f.client.as_str(), "hospital-2");
        assert!(
            matches!(&f.reason, Failure::ClientError(m) if m.contains("panicked") && m.contains("loader broke")),
            "{:?}",
            f.reason
        );
    }
}

/// A client built once, then not (its data went offline), then again:
/// what was kept of it survives the failed build, so its third release
/// is its second one's successor (scaled by 1/2), as with a live client
/// that sat a round out.
#[test]
fn what_was_kept_survives_a_failed_build() {
    let asked = Arc::new(AtomicUsize::new(0));
    struct Once(Arc<AtomicUsize>);
    impl ClientFactory for Once {
        type Client = ModelClient<SoftmaxRegression>;
        type State = fedcore::ClientState;
        fn make(&self, id: &ClientId) -> fedcore::Result<Self::Client> {
            // hospital-3: built, refused, built.
            if index(id) == 3 && self.0.fetch_add(1, Ordering::SeqCst) == 1 {
                return Err(fedcore::Error::InvalidInput("offline".into()));
            }
            Ok(client(index(id), Kind::Stateful))
        }
        fn resume(&self, c: Self::Client, state: Self::State) -> Self::Client {
            c.with_state(state)
        }
        fn suspend(&self, c: Self::Client) -> Option<Self::State> {
            Some(c.into_state())
        }
    }
    let mut c = cfg(Kind::Stateful);
    c.fraction_fit = 1.0;
    c.rounds = 3;
    let pooled = {
        let mut s = Server::new(
            c.clone(),
            initial(),
            ClientPool::new(Once(asked.clone()), ids(), 2).unwrap(),
            FedAvg,
        )
        .unwrap();
        s.run().unwrap();
        s
    };
    assert_eq!(pooled.history()[1].failures.len(), 1);
    // The same with live clients, hospital-3 refusing round 2 only.
    let mut s = Server::new(c, initial(), threads(Kind::Stateful), FedAvg).unwrap();
    s.run_round().unwrap();
    s.transport()
        .inject(
            &name(3).into(),
            Some(fedcore::memory::Fault::Error("offline".into())),
        )
        .unwrap();
    s.run_round().unwrap();
    s.transport().inject(&name(3).into(), None).unwrap();
    s.run_round().unwrap();
    assert_eq!(s.global().as_slice(), pooled.global().as_slice());
}

#[test]
fn bad_pools_are_refused() {
    let factory = || ModelClients::new(|id: &ClientId| Ok(client(index(id), Kind::Plain)));
    assert!(ClientPool::new(factory(), ids(), 0).is_err());
    let mut twice = ids();
    twice.push(ClientId::from(name(0)));
    let err = ClientPool::new(factory(), twice, 1).err().unwrap();
    assert!(err.to_string().contains("twice"), "{err}");
    let mut p = ClientPool::new(factory(), ids(), 1).unwrap();
    let (tx, _rx) = std::sync::mpsc::channel();
    let task = fedcore::Task::Evaluate(fedcore::EvaluateIns {
        round: 1,
        parameters: Arc::new(initial()),
        sealed: None,
    });
    assert!(p.send(&ClientId::from("stranger"), task, tx).is_err());
    // A factory that builds another id than asked.
    let liar = ModelClients::new(|_: &ClientId| Ok(client(0, Kind::Plain)));
    let mut p = ClientPool::new(liar, ids(), 1).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let task = fedcore::Task::Evaluate(fedcore::EvaluateIns {
        round: 1,
        parameters: Arc::new(initial()),
        sealed: None,
    });
    p.send(&ClientId::from(name(5)), task, tx).unwrap();
    let e = rx.recv().unwrap();
    assert!(
        matches!(&e.reply, Err(Failure::ClientError(m)) if m.contains("hospital-0")),
        "{:?}",
        e.reply
    );
}
