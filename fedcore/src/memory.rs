//! The in-memory transport: each client on its own worker thread.
//!
//! Used by the simulation and the tests. Faults can be injected per client to
//! exercise the server's failure handling: a dropped connection, a reply that
//! arrives after the deadline, a corrupted (NaN) update, a client error.

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::client::Client;
use crate::error::{Error, Result};
use crate::transport::{Envelope, Failure, Reply, ReplySender, Task, Transport};
use crate::update::ClientId;

/// A fault to inject into a client's next replies.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Fault {
    /// The connection drops when the task arrives; no work is done.
    Drop,
    /// The client works normally but replies only after this delay.
    Delay(Duration),
    /// The client's update has its first value replaced by NaN.
    CorruptNan,
    /// The client's update claims another round (a replayed message).
    StaleRound,
    /// The client reports this error instead of an update.
    Error(String),
    /// The client answers fit and evaluate tasks normally, but its
    /// connection drops when a step of a multi-step round arrives: it
    /// leaves between the steps.
    DropAtStep,
}

struct Job {
    task: Task,
    reply_to: ReplySender,
}

struct Worker {
    jobs: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
    fault: Arc<Mutex<Option<Fault>>>,
}

/// Clients on worker threads inside this process.
///
/// ```
/// use fedcore::memory::{Fault, InMemoryTransport};
/// use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
/// use fedcore::{ModelClient, Transport};
///
/// let data = synthetic_blobs(7, 100, 4, 3, 2.0);
/// let mut transport = InMemoryTransport::new();
/// transport.add_client(ModelClient::new("site-a", SoftmaxRegression::new(4, 3), data))?;
/// transport.inject(&"site-a".into(), Some(Fault::Drop))?;
/// assert_eq!(transport.clients().len(), 1);
/// # Ok::<(), fedcore::Error>(())
/// ```
#[derive(Default)]
pub struct InMemoryTransport {
    workers: BTreeMap<ClientId, Worker>,
}

impl InMemoryTransport {
    /// An empty transport.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a worker thread for `client`. Its id must be new.
    pub fn add_client(&mut self, client: impl Client + 'static) -> Result<()> {
        let id = client.id().clone();
        if self.workers.contains_key(&id) {
            return Err(Error::InvalidConfig(format!("client `{id}` added twice")));
        }
        let (tx, rx) = mpsc::channel();
        let fault = Arc::new(Mutex::new(None));
        let handle = std::thread::Builder::new()
            .name(format!("client-{id}"))
            .spawn({
                let fault = fault.clone();
                move || serve(client, rx, fault)
            })?;
        self.workers.insert(
            id,
            Worker {
                jobs: Some(tx),
                handle: Some(handle),
                fault,
            },
        );
        Ok(())
    }

    /// Sets (or with `None` clears) the fault applied to every task `client`
    /// receives from now on.
    pub fn inject(&self, client: &ClientId, fault: Option<Fault>) -> Result<()> {
        let w = self.workers.get(client).ok_or_else(|| {
            Error::InvalidConfig(format!("no client `{client}` in this transport"))
        })?;
        *w.fault.lock().unwrap_or_else(PoisonError::into_inner) = fault;
        Ok(())
    }

    /// Disconnects `client`: its thread finishes its current task and ends.
    pub fn remove_client(&mut self, client: &ClientId) -> bool {
        self.workers.remove(client).is_some()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(h) = self.handle.take() {
            // A client that panicked already reported it; nothing to add here.
            let _ = h.join();
        }
    }
}

impl Transport for InMemoryTransport {
    fn clients(&self) -> Vec<ClientId> {
        self.workers.keys().cloned().collect()
    }

    fn send(&mut self, client: &ClientId, task: Task, reply_to: ReplySender) -> Result<()> {
        let w = self
            .workers
            .get(client)
            .ok_or_else(|| Error::Transport(format!("no client `{client}`")))?;
        let jobs = w
            .jobs
            .as_ref()
            .ok_or_else(|| Error::Transport(format!("client `{client}` is shut down")))?;
        jobs.send(Job { task, reply_to })
            .map_err(|_| Error::Transport(format!("client `{client}` has stopped")))
    }
}

fn serve<C: Client>(mut client: C, jobs: Receiver<Job>, fault: Arc<Mutex<Option<Fault>>>) {
    let id = client.id().clone();
    for job in jobs {
        let fault = fault.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let reply = match &fault {
            Some(Fault::Drop) => Err(Failure::Disconnected("connection dropped".into())),
            Some(Fault::DropAtStep) if matches!(job.task, Task::Step(_)) => {
                Err(Failure::Disconnected("connection dropped".into()))
            }
            Some(Fault::Error(msg)) => Err(Failure::ClientError(msg.clone())),
            _ => run(&mut client, &job.task),
        };
        let reply = reply.map(|r| match (r, &fault) {
            (Reply::Fit(mut u), Some(Fault::CorruptNan)) => {
                if let Some(v) = u.values.as_mut_slice().first_mut() {
                    *v = f32::NAN;
                }
                Reply::Fit(u)
            }
            (Reply::Fit(mut u), Some(Fault::StaleRound)) => {
                u.round = u.round.saturating_sub(1);
                Reply::Fit(u)
            }
            (r, _) => r,
        });
        if let Some(Fault::Delay(d)) = fault {
            std::thread::sleep(d);
        }
        // The task goes before the reply: the server may reuse the model it
        // shares once the round's replies are in, if no task still holds it.
        let Job { task, reply_to } = job;
        drop(task);
        // The server stops listening after the deadline; a late reply is dropped.
        let _ = reply_to.send(Envelope {
            client: id.clone(),
            reply,
        });
    }
}

pub(crate) fn run<C: Client>(client: &mut C, task: &Task) -> std::result::Result<Reply, Failure> {
    let result = catch_unwind(AssertUnwindSafe(|| match task {
        Task::Fit(ins) => client.fit(ins).map(Reply::Fit),
        Task::Evaluate(ins) => client.evaluate(ins).map(Reply::Evaluate),
        Task::Step(ins) => client.step(ins).map(Reply::Step),
    }));
    match result {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(Failure::ClientError(e.to_string())),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Failure::ClientError(format!("client panicked: {msg}")))
        }
    }
}
