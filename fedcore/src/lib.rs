//! # fedcore
//!
//! The core of a federated-learning library for sites that must not share raw
//! data — for example hospitals training one chest X-ray model together.
//!
//! It holds the pieces every deployment needs and nothing heavy:
//!
//! - [`Parameters`]: named f32 tensors with shapes, stored as one flat vector
//!   plus a [`Layout`], so that aggregation is a loop over slices.
//! - Four small traits: [`Model`] (what a client trains), [`Aggregator`]
//!   (how updates combine), [`PrivacyMechanism`] (what runs on an outgoing
//!   update), [`Transport`] (how the server reaches clients).
//! - [`Server`], the round orchestrator: seeded sampling, a per-round
//!   deadline, a quorum, validation of every update with a reason for each
//!   rejection, events for dashboards and logs, crash-safe checkpoints and
//!   [`Server::resume`].
//! - [`FedAvg`], the reference aggregator; [`memory::InMemoryTransport`]
//!   with fault injection; [`pool::ClientPool`], thousands of virtual
//!   clients of which only those at work exist; safetensors files PyTorch reads
//!   ([`Parameters::save`], [`Parameters::to_safetensors`]) and crash-safe
//!   run checkpoints ([`checkpoint`]);
//!   [`linear::SoftmaxRegression`], a tiny pure-Rust model for tests and demos.
//!
//! Robust aggregation lives in `fedcore-robust`, differential privacy in
//! `fedcore-dp`, CKKS encryption in `fedcore-he`.
//!
//! ## Getting started
//!
//! Five clients, each with its own data, ten rounds of FedAvg, one client
//! sending NaN every round: the round goes on without it and says why.
//!
//! ```
//! use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
//! use fedcore::memory::{Fault, InMemoryTransport};
//! use fedcore::{FedAvg, Model, ModelClient, Server, ServerConfig, ServerEvent};
//!
//! let mut transport = InMemoryTransport::new();
//! for i in 0..5u64 {
//!     let data = synthetic_blobs((1 << 16) + i, 200, 8, 4, 2.0);
//!     transport.add_client(ModelClient::new(format!("hospital-{i}"), SoftmaxRegression::new(8, 4), data))?;
//! }
//! transport.inject(&"hospital-4".into(), Some(Fault::CorruptNan))?;
//!
//! let config = ServerConfig { rounds: 10, min_fit_clients: 3, ..ServerConfig::default() };
//! let mut server = Server::new(config, SoftmaxRegression::new(8, 4).parameters(), transport, FedAvg)?;
//! let (tx, events) = std::sync::mpsc::channel();
//! server.subscribe(tx);
//! server.run()?;
//!
//! let last = server.history().last().unwrap();
//! assert_eq!(last.accepted.len(), 4);
//! assert!(last.failures[0].reason.to_string().contains("non-finite"));
//! assert!(events.try_iter().any(|e| matches!(e, ServerEvent::UpdateRejected { .. })));
//! # Ok::<(), fedcore::Error>(())
//! ```
//!
//! ## Features
//!
//! None is on by default.
//!
//! - `testkit`: `fedcore::contract`, the suite every `Aggregator` must pass, and
//!   `net::testkit` (with `net`) for tests that speak the wire protocol by hand.
//! - `data`: `fedcore::data`, loaders that need no libtorch: ChestX-ray14
//!   (CSV + PNG), MNIST (IDX), the synthetic X-ray generator, the
//!   Dirichlet partitioner.
//! - `tch`: `fedcore::models`, DenseNet-121 and a small CNN on libtorch
//!   (tch 0.26, libtorch 2.13; needs `LIBTORCH` at build time). Implies `data`.
//! - `net`: `fedcore::net`, the gRPC transport over mutual TLS with
//!   provisioning (needs `protoc` at build time).
//! - `fuzzing`: `net::fuzzing`, the entry points of the fuzz targets in
//!   `fedcore/fuzz` (not a stable API). Implies `net`.
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod checkpoint;
mod client;
mod compress;
#[cfg(feature = "testkit")]
pub mod contract;
mod cross_site;
#[cfg(feature = "data")]
pub mod data;
mod error;
mod events;
pub mod linear;
pub mod memory;
pub mod metrics;
mod model;
#[cfg(feature = "tch")]
pub mod models;
#[cfg(feature = "net")]
pub mod net;
mod params;
pub mod pool;
mod privacy;
mod round;
mod run;
mod scaffold;
mod sealed;
mod server;
mod server_opt;
mod strategy;
mod transport;
pub mod trust;
mod update;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub use aggregate::{Aggregate, Aggregator, ClientDiagnostics, FedAvg};
pub use client::{
    Client, ClientState, EvaluateIns, FitIns, ModelClient, StepIns, StepReply, StepResponder,
};
pub use compress::{Compressed, Encoding, ErrorFeedback};
pub use cross_site::{CrossSiteEvaluation, CrossSiteFailure, CrossSiteModel};
pub use error::{BoxError, Error, Result};
pub use events::{
    AcceptedUpdate, AggregationFailure, AggregationFailureKind, ClientFailure, EventSubscriber,
    RoundOutcome, RoundRecord, ServerEvent, Withheld,
};
pub use model::{Evaluation, FitOutput, LrSchedule, Model, Optimizer, TrainConfig};
pub use params::{Layout, NonFinite, Parameters, Selection, TensorSpec, l2_norm};
pub use privacy::{PrivacyCost, PrivacyMechanism, Spent};
pub use run::{RunEnd, RunPolicy, RunReport, StopSignal};
pub use scaffold::{ControlVariate, Scaffold};
pub use sealed::{SealedAggregator, SealedTensors, Sealer};
pub use server::{Evaluator, Exclusions, Server, ServerConfig};
pub use server_opt::{OptState, ServerOpt};
pub use strategy::{RoundSteps, StepRequest, Strategy, StrategyInfo};
pub use transport::{Envelope, Failure, Rejection, Reply, ReplySender, Task, Transport};
pub use update::{ClientId, ClientUpdate, Metrics, Protection, ProtectionKind, UpdateKind};
