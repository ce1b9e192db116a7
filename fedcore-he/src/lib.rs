//! # fedcore-he
//!
//! CKKS homomorphic encryption of selected layers (by default the classifier
//! head) for `fedcore`, so that the aggregation server adds hospitals'
//! encrypted updates without ever holding the secret key.
//!
//! **Status:** this crate is a placeholder in the workspace. Its contents —
//! CKKS contexts over Microsoft SEAL (crate `sealy`) with the key roles in the
//! type system (`CkksContext<Secret>` decrypts, `CkksContext<Public>` only
//! adds and multiplies by plaintexts), packing of any vector length,
//! encrypted weighted sums, compact serialization and selective encryption by
//! parameter name — are tracked in the project's issue on `fedcore-he` and
//! are not written yet.
//!
//! This crate is licensed GPL-3.0-only because SEAL's Rust bindings are; the
//! rest of the workspace stays MIT OR Apache-2.0 and does not depend on it.
#![forbid(unsafe_code)]

pub use fedcore::Parameters;
