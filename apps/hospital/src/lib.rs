//! The fedcore hospital product: federated chest X-ray training across
//! hospitals, simulated in one process or deployed across processes over
//! mutual TLS, with the web dashboard that hospitals and their doctors use.
//!
//! The layers, bottom up:
//! - [`recipe`]: what is trained and how (model, aggregator, local DP,
//!   local training, preprocessing), shared by both runners; [`dp`] keeps a
//!   hospital's DP ledger across restarts;
//! - [`store`]: the database (SQLite or PostgreSQL), by table group;
//! - [`live`]: a run's live state and events, written by the runners and
//!   read by the API;
//! - [`jobs`]: what a run is and its lifecycle: the form's settings, the
//!   queue that runs one job at a time, stop, resume and delete;
//! - [`sim`]: the simulation runner (N hospitals in one process);
//!   [`mnist`]: the MNIST job's runner (the small CNN with DP-SGD);
//!   [`deploy`]: the deployment runner (`hospital provision/server/client`),
//!   which does not use the simulation; [`federation`]: what the dashboard
//!   of a deployed server sees of its hospitals' connections and changes
//!   (suspension, the certificate roster);
//! - [`api`]: the HTTP API by resource, with [`auth`] (passwords, tokens,
//!   roles, sign-in limits); [`infer`]: inference on uploads; [`atrest`]:
//!   encryption at rest; [`web`]: the server that serves pages and API.
//!
//! It links `fedcore-he` (SEAL, GPL-3.0) and is therefore GPL-3.0.

pub mod api;
pub mod atrest;
pub mod auth;
pub mod deploy;
pub mod dp;
pub mod federation;
pub mod he_keys;
pub mod infer;
pub mod jobs;
pub mod live;
pub mod mnist;
pub mod recipe;
pub mod sim;
pub mod store;
pub mod web;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// The per-round progress bar of the terminal (hidden when stderr is not a
/// terminal; round lines are printed either way).
pub fn progress_bar(len: u64) -> Result<ProgressBar> {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{spinner} round {pos}/{len} [{bar:30}] {elapsed} {msg}")
            .context("progress template")?
            .progress_chars("=> "),
    );
    Ok(bar)
}
