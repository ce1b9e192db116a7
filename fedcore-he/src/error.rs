//! The crate's error type.

use std::path::PathBuf;

/// What can go wrong in `fedcore-he`. Bad input (bytes, files, values) is
/// always one of these, never a panic or an abort.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeError {
    /// The parameters are below 128-bit security and were not set through
    /// [`CkksParams::dangerous`](crate::CkksParams::dangerous).
    #[error("insecure CKKS parameters: {0}")]
    Insecure(String),
    /// The parameters cannot work (degree, primes, scales).
    #[error("invalid CKKS parameters: {0}")]
    InvalidParameters(String),
    /// Ciphertext bytes that are not a valid encrypted vector.
    #[error("malformed encrypted vector: {0}")]
    Malformed(String),
    /// A valid encrypted vector for other keys, parameters or purposes.
    #[error("encrypted vector does not fit: {0}")]
    Mismatch(String),
    /// A value that cannot be encrypted or a weight that cannot be applied.
    #[error("value out of range: {0}")]
    OutOfRange(String),
    /// A key file that cannot be used.
    #[error("key file {}: {reason}", path.display())]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A key file holding the other role's context.
    #[error("key file {}: holds a {found} context, expected a {expected} one", path.display())]
    WrongRole {
        /// The file.
        path: PathBuf,
        /// The role asked for.
        expected: &'static str,
        /// The role in the file.
        found: &'static str,
    },
    /// A SEAL call failed where the inputs were already checked.
    #[error("{0}")]
    Seal(String),
}

impl From<crate::seal::SealFailure> for HeError {
    fn from(e: crate::seal::SealFailure) -> Self {
        HeError::Seal(e.to_string())
    }
}

impl From<HeError> for fedcore::Error {
    fn from(e: HeError) -> Self {
        fedcore::Error::SealingScheme(Box::new(e))
    }
}

/// `Result` with [`HeError`].
pub type Result<T> = std::result::Result<T, HeError>;
