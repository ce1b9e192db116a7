//! # fedcore-dp
//!
//! Differential privacy for `fedcore`:
//!
//! - [`Clip`]: L2 clipping of a whole update, of a named subset of its
//!   tensors (the "body"), or per layer.
//! - [`Noise`]: the Gaussian mechanism's noise, from a ChaCha20 generator
//!   seeded by the operating system ([`Noise::secure`]) or, for reproducible
//!   experiments only, from a seed ([`Noise::dangerous`]).
//! - [`LocalDp`]: client-level DP where each client clips and noises its own
//!   update before it leaves ([`fedcore::PrivacyMechanism`]).
//! - [`Dp`]: client-level DP-FedAvg on the server, a decorator around any
//!   [`fedcore::Aggregator`] that clips every update and noises the aggregate.
//! - [`rdp`]: the Rényi-DP accountant for the Poisson-sampled Gaussian
//!   mechanism, conversion to (epsilon, delta) and noise calibration;
//!   [`PldAccountant`], the tighter privacy-loss-distribution accountant
//!   for the same mechanism; [`Budget`] and [`Ledger`] stop a run before it
//!   would exceed its budget.
//! - [`one_run_audit`]: an empirical lower bound on epsilon from canaries
//!   in one training run, to check a guarantee against what a model leaks.
//! - [`DpError`]: this crate's errors; they convert into `fedcore::Error`
//!   (an exhausted budget into `PrivacyBudgetExhausted`).
//! - `DpSgd` (feature `tch`): sample-level DP-SGD for fedcore's libtorch
//!   models, with per-sample clipping and Poisson-sampled batches.
#![forbid(unsafe_code)]

mod audit;
mod budget;
mod central;
mod clip;
#[cfg(feature = "tch")]
mod dpsgd;
mod error;
mod local;
mod noise;
mod pld;
pub mod rdp;

pub use audit::{AuditOutcome, one_run_audit};
pub use budget::{Accounting, Budget, Ledger};
pub use central::{Dp, DpParams};
pub use clip::{Clip, ClipReport, clip_slice};
#[cfg(feature = "tch")]
pub use dpsgd::{DpSgd, DpSgdConfig};
pub use error::{DpError, Result};
pub use fedcore::{PrivacyCost, PrivacyMechanism, Spent};
pub use local::{LocalDp, LocalDpParams};
pub use noise::{Dangerous, Noise};
pub use pld::PldAccountant;
pub use rdp::{RdpAccountant, calibrate_noise, epsilon_for};
