//! The fedcore hospital app: a chest X-ray federated simulation
//! ([`sim`]) and the dashboard that hospitals and their doctors use
//! ([`web`], [`api`]), over a SQLite or PostgreSQL store ([`store`]), and
//! the same federation deployed across processes over mutual TLS ([`deploy`]);
//! both runs tell the dashboard what they do through [`live`].
//!
//! It links `fedcore-he` (SEAL, GPL-3.0) and is therefore GPL-3.0.

pub mod api;
pub mod atrest;
pub mod auth;
pub mod deploy;
pub mod dp;
pub mod infer;
pub mod live;
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
