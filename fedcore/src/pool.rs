//! Virtual clients: a simulation of many clients where only those at work
//! exist in memory.
//!
//! [`ClientPool`] is a [`Transport`] over `N` client ids (10,000 is fine)
//! and a [`ClientFactory`] that builds a client from its id. A bounded pool
//! of worker threads takes the server's tasks; the first task of a round
//! for a client builds it (from what the factory kept of it, if anything),
//! later tasks of the same round (an extra step, an evaluation) find it
//! alive, and when the next round starts every client of the last one is
//! suspended: the factory keeps what must outlive a round (a privacy
//! ledger, an error-feedback residual, a SCAFFOLD variate) and the model
//! and the data slice are dropped. Memory is the clients of one round plus
//! what the factory keeps; time is what they train.
//!
//! For the same seed a pool ends where [`InMemoryTransport`](crate::memory::InMemoryTransport)
//! (one thread and one live client per id) ends, as long as the factory
//! keeps everything a client carries from round to round; [`ModelClients`]
//! does for a [`ModelClient`] (its mechanisms, its residual, its variate),
//! but not for a model that keeps state of its own (a `DpSgd` model's
//! ledger): write a [`ClientFactory`] that keeps it.
//!
//! ```
//! use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
//! use fedcore::pool::{ClientPool, ModelClients};
//! use fedcore::{ClientId, FedAvg, Model, ModelClient, Server, ServerConfig};
//!
//! // A thousand clients, ten of them sampled per round, two training at once.
//! let ids: Vec<ClientId> = (0..1000).map(|i| ClientId::from(format!("c{i:04}"))).collect();
//! let factory = ModelClients::new(|id: &ClientId| {
//!     let seed: u64 = id.as_str()[1..].parse().expect("ids are c0000 to c0999");
//!     let data = synthetic_blobs(seed, 10, 4, 3, 2.0);
//!     Ok(ModelClient::new(id.clone(), SoftmaxRegression::new(4, 3), data))
//! });
//! let pool = ClientPool::new(factory, ids, 2)?;
//! let config = ServerConfig { rounds: 2, fraction_fit: 0.01, min_fit_clients: 10, min_available_clients: 1000, ..ServerConfig::default() };
//! let mut server = Server::new(config, SoftmaxRegression::new(4, 3).parameters(), pool, FedAvg)?;
//! server.run()?;
//! assert!(server.transport().live() <= 10);
//! # Ok::<(), fedcore::Error>(())
//! ```

use std::any::Any;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::client::{Client, ClientState, ModelClient};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::transport::{Envelope, Failure, ReplySender, Task, Transport};
use crate::update::ClientId;

/// Builds the clients of a [`ClientPool`] and keeps what each must carry
/// from one round to the next.
pub trait ClientFactory: Send + Sync + 'static {
    /// The client it builds.
    type Client: Client + 'static;
    /// What it keeps of a suspended client.
    type State: Send + 'static;

    /// Builds `id`'s client as it is before its first round. An error is
    /// the client's failure for this task (the server records it); what was
    /// kept of it stays kept.
    fn make(&self, id: &ClientId) -> Result<Self::Client>;

    /// Gives a freshly built client back what [`ClientFactory::suspend`]
    /// kept of it.
    fn resume(&self, client: Self::Client, state: Self::State) -> Self::Client;

    /// Takes a client apart at the end of a round: what it returns is
    /// handed to [`ClientFactory::resume`] the next time the id is built
    /// (`None`: nothing to keep; the next one starts fresh).
    fn suspend(&self, client: Self::Client) -> Option<Self::State>;
}

/// A [`ClientFactory`] of [`ModelClient`]s from a closure that builds one
/// from its id; what it keeps is the client's [`ClientState`] (its privacy
/// mechanisms with their ledgers, its error-feedback residual, its SCAFFOLD
/// variate), nothing when that is empty.
pub struct ModelClients<M, F> {
    build: F,
    _model: PhantomData<fn() -> M>,
}

impl<M, F> ModelClients<M, F>
where
    M: Model + 'static,
    M::Data: Sized + Send,
    F: Fn(&ClientId) -> Result<ModelClient<M>> + Send + Sync + 'static,
{
    /// Clients built by `build`.
    pub fn new(build: F) -> Self {
        Self {
            build,
            _model: PhantomData,
        }
    }
}

impl<M, F> ClientFactory for ModelClients<M, F>
where
    M: Model + 'static,
    M::Data: Sized + Send,
    F: Fn(&ClientId) -> Result<ModelClient<M>> + Send + Sync + 'static,
{
    type Client = ModelClient<M>;
    type State = ClientState;

    fn make(&self, id: &ClientId) -> Result<ModelClient<M>> {
        let client = (self.build)(id)?;
        if client.id() != id {
            return Err(Error::InvalidConfig(format!(
                "the factory built client `{}` when asked for `{id}`",
                client.id()
            )));
        }
        Ok(client)
    }

    fn resume(&self, client: ModelClient<M>, state: ClientState) -> ModelClient<M> {
        client.with_state(state)
    }

    fn suspend(&self, client: ModelClient<M>) -> Option<ClientState> {
        let state = client.into_state();
        (!state.is_empty()).then_some(state)
    }
}

/// A client's place in the pool.
enum Slot<C, S> {
    /// Built for a round (and alive until the next round starts).
    Live { client: C, round: u64 },
    /// Taken apart; what the factory kept.
    Suspended(S),
}

/// One client's place: `None` while nothing is kept for it.
type SlotRef<C, S> = Arc<Mutex<Option<Slot<C, S>>>>;
type Slots<C, S> = Mutex<HashMap<ClientId, SlotRef<C, S>>>;

struct Shared<F: ClientFactory> {
    factory: F,
    slots: Slots<F::Client, F::State>,
    /// The latest round a task was sent for.
    round: AtomicU64,
}

impl<F: ClientFactory> Shared<F> {
    fn slot(&self, id: &ClientId) -> SlotRef<F::Client, F::State> {
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(id.clone())
            .or_default()
            .clone()
    }

    /// Suspends `slot` if it holds a client of a round before `round`.
    fn suspend_before(
        &self,
        id: &ClientId,
        slot: &mut Option<Slot<F::Client, F::State>>,
        round: u64,
    ) {
        if matches!(slot, Some(Slot::Live { round: r, .. }) if *r < round)
            && let Some(Slot::Live { client, .. }) = slot.take()
        {
            // A factory that panics loses this client's state, not the pool.
            match catch_unwind(AssertUnwindSafe(|| self.factory.suspend(client))) {
                Ok(state) => *slot = state.map(Slot::Suspended),
                Err(panic) => {
                    tracing::warn!(client = %id, panic = %panic_message(&*panic), "suspending the client panicked; its state is lost");
                }
            }
        }
        if slot.is_none() {
            // Nothing kept: forget the id (it starts fresh next time).
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(s) = slots.get(id)
                && Arc::strong_count(s) <= 2
            {
                slots.remove(id);
            }
        }
    }
}

/// A panic's message.
fn panic_message(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn panicked(panic: &(dyn Any + Send)) -> Error {
    Error::InvalidInput(format!("the factory panicked: {}", panic_message(panic)))
}

struct Job {
    client: ClientId,
    task: Task,
    reply_to: ReplySender,
}

/// A [`Transport`] over many virtual clients, of which only those of the
/// current round exist (see the [module](self) documentation).
pub struct ClientPool<F: ClientFactory> {
    ids: Vec<ClientId>,
    shared: Arc<Shared<F>>,
    jobs: Option<Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl<F: ClientFactory> ClientPool<F> {
    /// A pool over `ids` built by `factory`, with `workers` threads (at
    /// least 1: the clients that train at once); each id must appear once.
    pub fn new(factory: F, ids: Vec<ClientId>, workers: usize) -> Result<Self> {
        if workers == 0 {
            return Err(Error::InvalidConfig(
                "a client pool needs at least one worker".into(),
            ));
        }
        let mut sorted = ids.clone();
        sorted.sort();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::InvalidConfig(format!(
                "client `{}` listed twice",
                w[0]
            )));
        }
        let shared = Arc::new(Shared {
            factory,
            slots: Mutex::new(HashMap::new()),
            round: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..workers)
            .map(|i| {
                let shared = shared.clone();
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("pool-{i}"))
                    .spawn(move || work(&shared, &rx))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            ids: sorted,
            shared,
            jobs: Some(tx),
            workers,
        })
    }

    /// How many clients exist now (built and not yet suspended).
    pub fn live(&self) -> usize {
        self.count(|s| matches!(s, Slot::Live { .. }))
    }

    /// How many suspended clients the factory keeps something of.
    pub fn kept(&self) -> usize {
        self.count(|s| matches!(s, Slot::Suspended(_)))
    }

    fn count(&self, f: impl Fn(&Slot<F::Client, F::State>) -> bool) -> usize {
        let slots: Vec<_> = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        slots
            .iter()
            .filter(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                    .is_some_and(&f)
            })
            .count()
    }

    /// The factory.
    pub fn factory(&self) -> &F {
        &self.shared.factory
    }

    /// Suspends every client of a round before `round` that is not at work.
    fn suspend_before(&self, round: u64) {
        let slots: Vec<_> = self
            .shared
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(id, s)| (id.clone(), s.clone()))
            .collect();
        for (id, slot) in slots {
            // A client at work is suspended by its worker when it is done.
            if let Ok(mut s) = slot.try_lock() {
                self.shared.suspend_before(&id, &mut s, round);
            }
        }
    }
}

impl<F: ClientFactory> Transport for ClientPool<F> {
    fn clients(&self) -> Vec<ClientId> {
        self.ids.clone()
    }

    fn send(&mut self, client: &ClientId, task: Task, reply_to: ReplySender) -> Result<()> {
        if self.ids.binary_search(client).is_err() {
            return Err(Error::Transport(format!("no client `{client}`")));
        }
        let round = task.round();
        if round > self.shared.round.fetch_max(round, Ordering::SeqCst) {
            self.suspend_before(round);
        }
        self.jobs
            .as_ref()
            .ok_or_else(|| Error::Transport("the client pool is shut down".into()))?
            .send(Job {
                client: client.clone(),
                task,
                reply_to,
            })
            .map_err(|_| Error::Transport("the client pool's workers stopped".into()))
    }
}

impl<F: ClientFactory> Drop for ClientPool<F> {
    fn drop(&mut self) {
        drop(self.jobs.take());
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn work<F: ClientFactory>(shared: &Shared<F>, jobs: &Mutex<Receiver<Job>>) {
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(PoisonError::into_inner);
            rx.recv()
        };
        let Ok(Job {
            client: id,
            task,
            reply_to,
        }) = job
        else {
            return;
        };
        let round = task.round();
        let slot = shared.slot(&id);
        let reply = {
            let mut s = slot.lock().unwrap_or_else(PoisonError::into_inner);
            // The latest round the client worked in: a late task of an
            // earlier round must not make it look older than it is.
            let mut latest = round;
            let built = match s.take() {
                Some(Slot::Live { client, round: r }) => {
                    latest = latest.max(r);
                    Ok(client)
                }
                // A factory that panics fails this task (and loses what was
                // kept for the client), not the worker.
                Some(Slot::Suspended(state)) => {
                    match catch_unwind(AssertUnwindSafe(|| shared.factory.make(&id))) {
                        Ok(Ok(client)) => {
                            catch_unwind(AssertUnwindSafe(|| shared.factory.resume(client, state)))
                                .map_err(|p| panicked(&*p))
                        }
                        Ok(Err(e)) => {
                            *s = Some(Slot::Suspended(state));
                            Err(e)
                        }
                        Err(p) => {
                            *s = Some(Slot::Suspended(state));
                            Err(panicked(&*p))
                        }
                    }
                }
                None => catch_unwind(AssertUnwindSafe(|| shared.factory.make(&id)))
                    .unwrap_or_else(|p| Err(panicked(&*p))),
            };
            match built {
                Ok(mut client) => {
                    let reply = crate::memory::run(&mut client, &task);
                    *s = Some(Slot::Live {
                        client,
                        round: latest,
                    });
                    // A round that started while this one worked: suspend now.
                    let now = shared.round.load(Ordering::SeqCst);
                    shared.suspend_before(&id, &mut s, now);
                    reply
                }
                Err(e) => Err(Failure::ClientError(format!(
                    "the pool could not build the client: {e}"
                ))),
            }
        };
        drop(slot);
        // The server stops listening after the deadline; a late reply is dropped.
        let _ = reply_to.send(Envelope { client: id, reply });
    }
}
