use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Asks a run to stop after the round in progress (cheap to clone; every
/// clone stops the same run). Hand one to a Ctrl-C handler or a dashboard.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicBool>);

impl StopSignal {
    /// A signal not yet raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop after the current round.
    pub fn stop(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`StopSignal::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// Lowers the signal, for the next run that shares it (a queue that
    /// runs one job after another with one stop button).
    pub fn reset(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

/// How [`crate::Server::run_with`] goes from round to round.
///
/// The simulation, the deployed server (`net::run_server` with
/// feature `net`) and every example drive their [`crate::Server`] with
/// [`crate::Server::run_with`]: one loop that waits for clients, runs rounds,
/// treats a failed round as data (it is recorded and the run goes on), ends
/// after too many failed rounds in a row, and stops between rounds when asked.
#[derive(Debug, Clone)]
pub struct RunPolicy {
    /// The run ends after this many failed rounds in a row (quorum not
    /// reached, aggregation failed); `None`: never, as a deployment that
    /// must outlast a hospital's outage wants. Default: 3.
    pub max_failed_in_a_row: Option<u32>,
    /// Before each round, how long to wait for enough clients (the larger of
    /// `min_available_clients` and `min_fit_clients`) to be connected before
    /// the run ends with [`crate::Error::NotEnoughClients`]. Default: 0 (an
    /// in-memory transport has its clients from the start).
    pub wait_for_clients: Duration,
    /// A pause after each round (e.g. to spread rounds of a deployment).
    /// Default: none.
    pub pause_between_rounds: Duration,
    /// Stops the run between rounds when raised.
    pub stop: StopSignal,
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            max_failed_in_a_row: Some(3),
            wait_for_clients: Duration::ZERO,
            pause_between_rounds: Duration::ZERO,
            stop: StopSignal::new(),
        }
    }
}

impl RunPolicy {
    /// The policy of a deployment: wait up to `wait` for clients before each
    /// round and never give up on failed rounds.
    pub fn deployment(wait: Duration) -> Self {
        Self {
            max_failed_in_a_row: None,
            wait_for_clients: wait,
            ..Self::default()
        }
    }

    /// Sets the failed rounds in a row that end the run (`None`: never).
    pub fn with_max_failed_in_a_row(mut self, n: Option<u32>) -> Self {
        self.max_failed_in_a_row = n;
        self
    }

    /// Sets the stop signal.
    pub fn with_stop(mut self, stop: StopSignal) -> Self {
        self.stop = stop;
        self
    }
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "end", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RunEnd {
    /// Every configured round was run.
    Completed,
    /// The stop signal was raised.
    Stopped,
    /// [`RunPolicy::max_failed_in_a_row`] rounds in a row failed.
    TooManyFailedRounds {
        /// The failed rounds in a row.
        in_a_row: u32,
    },
}

/// What [`crate::Server::run_with`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Why it ended.
    pub end: RunEnd,
    /// Rounds run by this call that completed.
    pub completed: u64,
    /// Rounds run by this call that failed (recorded, model unchanged).
    pub failed: u64,
    /// The cross-site matrix, when [`crate::ServerConfig::cross_site_evaluation`]
    /// is on and the run completed.
    #[serde(default)]
    pub cross_site: Option<crate::CrossSiteEvaluation>,
}

impl RunReport {
    /// `Ok` when the run did all its rounds or was stopped, otherwise an
    /// [`crate::Error::TooManyFailedRounds`], for callers that treat giving
    /// up as an error.
    pub fn ensure_not_given_up(&self) -> crate::Result<()> {
        match self.end {
            RunEnd::TooManyFailedRounds { in_a_row } => {
                Err(crate::Error::TooManyFailedRounds { in_a_row })
            }
            _ => Ok(()),
        }
    }
}
