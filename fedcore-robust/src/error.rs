//! Errors of this crate.

/// A setting that cannot work, refused when the aggregator is built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{aggregator}: {reason}")]
#[non_exhaustive]
pub struct ParamsError {
    /// The aggregator whose settings failed.
    pub aggregator: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl ParamsError {
    pub(crate) fn new(aggregator: &'static str, reason: impl Into<String>) -> Self {
        Self {
            aggregator,
            reason: reason.into(),
        }
    }
}
