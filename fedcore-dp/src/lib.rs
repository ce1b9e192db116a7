//! # fedcore-dp
//!
//! Differential privacy for `fedcore`.
//!
//! **Status:** this crate is a placeholder in the workspace. Its contents —
//! L2 clipping (whole update, a named subset, per layer), the Gaussian
//! mechanism with a cryptographically secure RNG, client-level DP-FedAvg
//! (a `Dp<A: Aggregator>` decorator and a client-side mechanism),
//! sample-level DP-SGD for the `tch` models, and an RDP accountant with
//! calibration and budgets — are tracked in the project's issue on
//! `fedcore-dp` and are not written yet.
//!
//! Mechanisms here will implement [`fedcore::PrivacyMechanism`] and report
//! [`fedcore::PrivacyCost`]s that the accountant turns into (epsilon, delta).
#![forbid(unsafe_code)]

pub use fedcore::{PrivacyCost, PrivacyMechanism};
