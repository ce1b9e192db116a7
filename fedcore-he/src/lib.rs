//! # fedcore-he
//!
//! CKKS homomorphic encryption of selected layers — by default the
//! classifier head — for `fedcore`, over Microsoft SEAL 4.0, so that the
//! aggregation server adds hospitals' updates without ever holding the
//! secret key.
//!
//! - [`CkksParams`]: degree 8192, primes [60, 40, 40, 60], scale 2^40 by
//!   default; anything below 128-bit security only through
//!   [`CkksParams::dangerous`].
//! - Key roles in the type: [`CkksContext<Secret>`] (hospitals: encrypt,
//!   decrypt) and [`CkksContext<Public>`] (the server: weighted sums, no
//!   decryption method at all). [`KeyAuthority::write`] creates the keys once
//!   and writes one file per role (mode 0600); loading checks the role.
//! - [`EncryptedVector`]: any length, packed into `ceil(len / 4096)`
//!   ciphertexts, or `ceil(len / 8192)` two values per slot
//!   ([`SlotPacking`]); [`CkksContext::weighted_sum`] and
//!   [`CkksContext::accumulate`] on the server; compact bytes
//!   ([`CkksContext::encrypt_compact`]: seeded symmetric encryption at the
//!   lowest level the sum needs, each residue in its prime's bits) and
//!   validated loading
//!   ([`CkksContext::load`]): malformed bytes are a typed error.
//! - [`EncryptedMedian`] (a `fedcore::Strategy`) and [`DistanceDecryptor`]
//!   (its hospitals' side): the geometric median of whole encrypted
//!   updates, from encrypted pairwise distances that the hospitals decrypt;
//!   the server never holds a secret key or decrypts a vector.
//! - [`multiparty`]: keys no single party holds. A collective key from
//!   every hospital's key share (no dealer), the aggregate switched to the
//!   hospitals' output key by all of them (N-of-N) or any `t` (threshold,
//!   Shamir shares); no hospital, alone or with the server, can decrypt
//!   another's upload. [`keyswitch`] runs it as a second step of the round.
//! - [`CkksSealer`] and [`CkksSum`] plug into `fedcore`'s
//!   [`Server::with_sealing`](fedcore::Server::with_sealing) and
//!   [`ModelClient::with_sealer`](fedcore::ModelClient::with_sealer).
//!
//! ```
//! use fedcore_he::{CkksContext, CkksParams, Form};
//! let hospital = CkksContext::generate(CkksParams::default())?;
//! let server = hospital.public();
//! let a = hospital.encrypt_compact(&[1.0, 2.0, 3.0])?;
//! let b = hospital.encrypt_compact(&[3.0, 2.0, 1.0])?;
//! // The server: load, weighted sum, send back.
//! let (a, b) = (server.load(&a, Form::Fresh)?, server.load(&b, Form::Fresh)?);
//! let sum = server.weighted_sum(&[&a, &b], &[0.25, 0.75])?.to_bytes()?;
//! // A hospital decrypts.
//! let mean = hospital.decrypt(&hospital.load(&sum, Form::Sum)?)?;
//! assert!((mean[0] - 2.5).abs() < 1e-6 && (mean[2] - 1.5).abs() < 1e-6);
//! # Ok::<(), fedcore_he::HeError>(())
//! ```
//!
//! All `unsafe` code and every SEAL type stay inside this crate (module
//! `seal`). This crate is licensed GPL-3.0-only because SEAL's Rust bindings
//! (`sealy`, which builds and links SEAL) are; the rest of the workspace stays
//! MIT OR Apache-2.0 and does not depend on it.
#![deny(unsafe_code, unsafe_op_in_unsafe_fn)]

mod context;
mod error;
mod gram;
pub mod keyswitch;
mod median;
pub mod multiparty;
mod params;
mod raw;
mod reader;
mod seal;
mod sealer;
mod vector;

pub use context::{CkksContext, KeyAuthority, KeyFiles, Public, Role, Secret};
pub use error::{HeError, Result};
pub use gram::{EncryptedGram, MAX_GRAM_POINTS, Pairs};
pub use median::{
    DEFAULT_DISTANCE_SLACK, DEFAULT_FLOODING, DISTANCES_TENSOR, DistanceDecryptor, EncryptedMedian,
    FLOODING_FLOOR, POINTS_METRIC,
};
pub use params::{CkksParams, Dangerous, MIN_HEADROOM_BITS, max_bits_128};
pub use sealer::{CkksSealer, CkksSum, DEFAULT_PATTERNS};
pub use vector::{
    EncryptedVector, Form, MAX_VALUES, MAX_WEIGHT, SUM_ROUNDING_MIN_BITS,
    SUM_ROUNDING_PRECISION_BITS, SlotPacking, fuzzing, slot_packing_of,
};

// `sealy` builds SEAL and its C API (`libsealc`), whose functions `seal`
// declares; nothing of its Rust API is used.
use sealy as _;
