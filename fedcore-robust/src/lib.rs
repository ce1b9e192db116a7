//! # fedcore-robust
//!
//! Byzantine-robust aggregation for `fedcore`: aggregators that bound the
//! influence of clients that send arbitrary updates.
//!
//! **Status:** this crate is a placeholder in the workspace. Its contents —
//! geometric median by smoothed Weiszfeld, coordinate-wise median, trimmed
//! mean, Krum / Multi-Krum, weighted mean, norm clipping and nearest-neighbour
//! mixing in front of any aggregator, trust scores, and attack simulators —
//! are tracked in the project's issue on `fedcore-robust` and are not written
//! yet. Until then, use [`fedcore::FedAvg`].
//!
//! Every aggregator here will implement [`fedcore::Aggregator`] and pass the
//! core contract suite (`fedcore::contract`, feature `testkit`).
#![forbid(unsafe_code)]

pub use fedcore::{Aggregator, FedAvg};
