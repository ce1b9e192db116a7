//! The network transport (feature `net`): gRPC over mutual TLS.
//!
//! In a deployment each hospital runs its own process and the aggregation
//! server runs elsewhere. Hospitals' firewalls allow outbound connections
//! only, so clients dial out: each keeps one session (a bidirectional gRPC
//! stream) on which the server sends fit and evaluate tasks and the client
//! sends its replies. Both sides send heartbeats; a client that loses the
//! connection reconnects with exponential backoff, and a task whose session
//! ends counts as a dropout for that round (the round completes with the
//! quorum; the client is sampled again once it is back).
//!
//! - [`provision`]: the project CA, the server's and the sites' certificates
//!   and startup kits (rcgen), the roster, rotation and revocation.
//! - [`GrpcTransport`]: the server side, a [`crate::Transport`] — the same
//!   [`crate::Server`] orchestration as in a simulation, so moving from
//!   simulation to deployment means changing the transport.
//! - [`run_client`]: the client side, serving any [`crate::Client`].
//! - [`run_server`]: drives a [`crate::Server`] over the network (waits for
//!   clients, goes on after a failed round, tells clients when it is done).
//!
//! Model tensors travel as raw little-endian f32 after a header listing
//! their layout (protobuf, `proto/fedcore.proto`), cut into chunks of
//! [`Limits::chunk_bytes`] so that models of any size fit under the gRPC
//! message limit; sealed (CKKS) tensors travel as bytes after them. Each
//! side refuses any message over [`Limits::max_message_bytes`] and any
//! payload declared over [`Limits::max_payload_bytes`] before allocating it;
//! the offending session is closed and the others go on.
//!
//! ```no_run
//! use fedcore::linear::{SoftmaxRegression, synthetic_blobs};
//! use fedcore::net::{self, provision::{Kit, Project, ProjectSpec}};
//! use fedcore::{FedAvg, Model, ModelClient, Server, ServerConfig};
//!
//! // Once, by the project admin: kits for the server and two hospitals.
//! let project = Project::create("project", &ProjectSpec::new("chest-xray", vec!["h1".into(), "h2".into()], 50051))?;
//!
//! // On the server's machine:
//! let transport = net::GrpcTransport::start(&Kit::load(project.server_kit())?, Default::default())?;
//! let config = ServerConfig { rounds: 5, min_fit_clients: 2, ..ServerConfig::default() };
//! let mut server = Server::new(config, SoftmaxRegression::new(4, 3).parameters(), transport, FedAvg)?;
//! net::run_server(&mut server, &fedcore::RunPolicy::deployment(std::time::Duration::from_secs(600)))?;
//!
//! // On each hospital's machine:
//! let kit = Kit::load(project.site_kit("h1"))?;
//! let client = ModelClient::new("h1", SoftmaxRegression::new(4, 3), synthetic_blobs(1, 100, 4, 3, 2.0));
//! net::run_client(&kit, client, &net::ClientOptions::default())?;
//! # Ok::<(), fedcore::Error>(())
//! ```

mod caps;
mod client;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
mod monitor;
pub mod provision;
mod server;
mod wire;

/// The generated protobuf messages and gRPC stubs of `proto/fedcore.proto`
/// (private: the wire format is the protocol, not an API).
#[cfg(not(feature = "testkit"))]
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod proto {
    tonic::include_proto!("fedcore.v1");
}

/// With `testkit`, public (hidden here) for [`testkit::proto`].
#[cfg(feature = "testkit")]
#[doc(hidden)]
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("fedcore.v1");
}

/// For tests that speak the wire protocol by hand (feature `testkit`): the
/// generated messages and [`open_session`](testkit::open_session). Not a
/// stable API.
#[cfg(feature = "testkit")]
pub mod testkit {
    pub use super::client::{connect, open_session};
    pub use super::proto;

    /// A reply as a client sends it: its header and its payload's bytes.
    pub fn encode_reply(
        task_id: u64,
        reply: crate::Reply,
    ) -> crate::Result<(proto::ReplyHeader, Vec<u8>)> {
        let out = super::wire::encode_reply(task_id, reply)?;
        Ok((out.header, out.payload.concat()))
    }
}

use std::time::{SystemTime, UNIX_EPOCH};

pub use caps::{Connections, Counted, Progress};
pub use client::{ClientOptions, run_client};
pub use monitor::{Closed, NetMonitor, REFUSALS_KEPT, Refused, RefusedKind, SiteConnection};
pub use server::{GrpcTransport, ServerOptions, ShutdownKind, Transfer};
pub use wire::PROTOCOL;

use crate::error::{Error, Result};
use crate::run::{RunEnd, RunPolicy, RunReport};
use crate::server::Server;
use crate::strategy::Strategy;

/// HTTP/2's smallest and largest frame sizes (RFC 9113, 6.5.2).
const MIN_FRAME_BYTES: u32 = 1 << 14;
const MAX_FRAME_BYTES: u32 = (1 << 24) - 1;

/// Size limits of the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// The largest gRPC message either side accepts (default 4 MiB, gRPC's
    /// usual limit). A larger message closes the session that sent it.
    pub max_message_bytes: usize,
    /// Payload bytes per chunk message (default 1 MiB; must leave room for
    /// the chunk's framing under `max_message_bytes`).
    pub chunk_bytes: usize,
    /// The largest task or reply payload (values plus sealed bytes) either
    /// side accepts (default 2 GiB: a 500M-parameter model).
    pub max_payload_bytes: u64,
    /// HTTP/2 flow-control window per stream and per connection (default
    /// 8 MiB: large windows keep loopback and LAN links busy).
    pub window_bytes: u32,
    /// The largest HTTP/2 frame this side accepts, so the largest the peer
    /// sends (default 256 KiB; HTTP/2 allows 16 KiB to 16 MiB - 1). Each
    /// frame costs a header, flow-control bookkeeping and buffer handling
    /// on both sides: with HTTP/2's usual 16 KiB the 7M-value round took
    /// 1.36-1.41x a plain TLS socket on loopback, with 256 KiB 1.04-1.11x
    /// (docs/benchmarks.md). A frame is decoded only once it has arrived
    /// whole, so on a very slow link a message waits for the frame it ends
    /// in: 5 s at 50 KB/s for 256 KiB. Liveness and the transfers' progress
    /// count bytes as they arrive, not frames, so sessions on such links
    /// live on; lower it there if a message sent behind a chunk (a
    /// shutdown, a refusal) should arrive sooner.
    pub frame_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            chunk_bytes: 1 << 20,
            max_payload_bytes: 2 << 30,
            window_bytes: 8 << 20,
            frame_bytes: 256 << 10,
        }
    }
}

impl Limits {
    /// Checks that chunks fit in messages and that the frame size is one
    /// HTTP/2 allows.
    pub fn check(&self) -> Result<()> {
        if !(MIN_FRAME_BYTES..=MAX_FRAME_BYTES).contains(&self.frame_bytes) {
            return Err(Error::InvalidConfig(format!(
                "frame_bytes {} must be from {MIN_FRAME_BYTES} to {MAX_FRAME_BYTES} (HTTP/2's bounds)",
                self.frame_bytes
            )));
        }
        if self.chunk_bytes == 0 || self.chunk_bytes + 4096 > self.max_message_bytes {
            return Err(Error::InvalidConfig(format!(
                "chunk_bytes {} must be positive and at least 4 KiB below max_message_bytes {}",
                self.chunk_bytes, self.max_message_bytes
            )));
        }
        Ok(())
    }
}

/// Checks a heartbeat and the liveness window built on it.
pub(crate) fn check_timing(
    heartbeat: std::time::Duration,
    liveness: std::time::Duration,
) -> Result<()> {
    if heartbeat.is_zero() || liveness < heartbeat * 2 {
        return Err(Error::InvalidConfig(format!(
            "the heartbeat ({} ms) must be positive and liveness ({} ms) at least twice as long",
            heartbeat.as_millis(),
            liveness.as_millis()
        )));
    }
    Ok(())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `server` over the network under `policy` (usually
/// [`RunPolicy::deployment`]: wait for clients before each round, never give
/// up on failed rounds, as a deployment should not stop because a hospital
/// went offline), then tells every client that the run is over (after all
/// its rounds) or that the server is going away (stopped, or gave up: the
/// clients keep reconnecting for a resumed server).
///
/// The loop is [`Server::run_with`]'s: a failed round is recorded and the
/// next one starts. Errors: not enough clients within the policy's wait, or
/// a failure that is not a round's (a checkpoint that cannot be written);
/// the clients are then not told (they reconnect to a restarted server,
/// which resumes from its checkpoint).
pub fn run_server<S: Strategy>(
    server: &mut Server<GrpcTransport, S>,
    policy: &RunPolicy,
) -> Result<RunReport> {
    let report = server.run_with(policy, |_, _| Ok::<(), Error>(()))?;
    // Only a complete run sends the clients home; after a stop or giving
    // up, they keep reconnecting so that a server resumed from its
    // checkpoint finds them.
    let (reason, kind) = match report.end {
        RunEnd::Completed => ("the run is complete", ShutdownKind::Finished),
        RunEnd::Stopped => ("the run was stopped", ShutdownKind::GoingAway),
        _ => (
            "the run gave up after too many failed rounds",
            ShutdownKind::GoingAway,
        ),
    };
    let grace = server.transport().options().finish_grace;
    server.transport_mut().shutdown(reason, kind, grace);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_frames_http2_does_not_allow_and_chunks_over_the_message_size() {
        let with = |f: fn(&mut Limits)| {
            let mut l = Limits::default();
            f(&mut l);
            l.check().map_err(|e| e.to_string())
        };
        assert_eq!(with(|_| {}), Ok(()));
        assert_eq!(with(|l| l.frame_bytes = 1 << 14), Ok(()));
        assert_eq!(with(|l| l.frame_bytes = (1 << 24) - 1), Ok(()));
        for bad in [
            with(|l| l.frame_bytes = 0),
            with(|l| l.frame_bytes = (1 << 14) - 1),
            with(|l| l.frame_bytes = 1 << 24),
        ] {
            let e = bad.unwrap_err();
            assert!(e.contains("frame_bytes") && e.contains("HTTP/2"), "{e}");
        }
        for bad in [
            with(|l| l.chunk_bytes = 0),
            with(|l| l.chunk_bytes = l.max_message_bytes),
        ] {
            assert!(bad.unwrap_err().contains("chunk_bytes"));
        }
    }
}
