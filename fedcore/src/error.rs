//! The error type of the core crate.

use std::path::PathBuf;

use crate::events::{AggregationFailure, ClientFailure};

/// How [`Error::PrivacyBudgetExhausted`]'s message starts: a client's error
/// reaches the server as text, and [`crate::Failure::is_budget_exhausted`]
/// recognises it by this.
pub(crate) const BUDGET_EXHAUSTED: &str = "privacy budget of ";

/// Everything that can go wrong in `fedcore`.
///
/// Variants are structured so that callers can react to them (and so that a
/// dashboard can show them) without parsing strings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A flat vector had the wrong number of elements.
    #[error("dimension mismatch: expected {expected} values, got {got}")]
    DimensionMismatch {
        /// Elements the layout calls for.
        expected: usize,
        /// Elements that were supplied.
        got: usize,
    },
    /// A tensor name that the layout does not contain.
    #[error("unknown tensor `{name}`")]
    UnknownTensor {
        /// The name that was looked up.
        name: String,
    },
    /// A tensor name given twice when building a layout.
    #[error("tensor `{name}` appears twice")]
    DuplicateTensor {
        /// The repeated name.
        name: String,
    },
    /// A tensor whose shape differs from the one the layout expects.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The tensor.
        name: String,
        /// The shape the layout holds.
        expected: Vec<usize>,
        /// The shape that was supplied.
        got: Vec<usize>,
    },
    /// Two parameter sets whose layouts differ (names, order or shapes).
    #[error("layout mismatch at tensor #{position}: expected {expected}, got {got}")]
    LayoutMismatch {
        /// Index of the first tensor that differs.
        position: usize,
        /// The expected tensor (`name[shape]`), or `nothing` past the end.
        expected: String,
        /// The tensor found (`name[shape]`), or `nothing` past the end.
        got: String,
    },
    /// An aggregator was called with no updates.
    #[error("no updates to aggregate")]
    EmptyUpdates,
    /// An aggregator needs more updates than it was given (e.g. Krum needs n > 2f + 2).
    #[error("aggregator `{aggregator}` needs at least {needed} updates, got {got}")]
    TooFewUpdates {
        /// The aggregator's name.
        aggregator: String,
        /// Updates it needs.
        needed: usize,
        /// Updates it got.
        got: usize,
    },
    /// An aggregator was given weights that cannot be used (all zero, negative, not finite).
    #[error("invalid aggregation weights: {reason}")]
    InvalidWeights {
        /// What is wrong with them.
        reason: String,
    },
    /// An aggregator returned NaN or infinity; the round fails, the model is unchanged.
    #[error("aggregator `{aggregator}` produced a non-finite value in `{tensor}`")]
    AggregateNotFinite {
        /// The aggregator's name.
        aggregator: String,
        /// The first tensor holding such a value.
        tensor: String,
    },
    /// Fewer valid updates than the quorum arrived before the round deadline;
    /// the global model is unchanged.
    #[error(
        "round {round}: {accepted} valid update(s), quorum is {required}; {} failure(s): {}",
        failures.len(),
        summarize_failures(failures)
    )]
    QuorumNotReached {
        /// The round that failed.
        round: u64,
        /// `min_fit_clients`.
        required: usize,
        /// Valid updates received.
        accepted: usize,
        /// Why the others did not count.
        failures: Vec<ClientFailure>,
    },
    /// A round's aggregation failed; the global model is unchanged.
    #[error("round {round}: {failure}")]
    AggregationFailed {
        /// The round that failed.
        round: u64,
        /// What the aggregator reported.
        failure: AggregationFailure,
    },
    /// Not enough connected clients to start a round.
    #[error("{available} client(s) connected, at least {required} required")]
    NotEnoughClients {
        /// Clients the transport reports as connected.
        available: usize,
        /// `min_available_clients` (or the quorum, whichever is larger).
        required: usize,
    },
    /// A configuration value that cannot work.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// An argument that cannot be used (mismatched lengths, a NaN score, ...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A data file that cannot be read: a bad CSV row, a missing image, a
    /// malformed IDX header. `line` is 1-based where the file has lines.
    #[error("data {}{}: {reason}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Data {
        /// The file (or image) that failed.
        path: PathBuf,
        /// The line, for text files.
        line: Option<u64>,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint that cannot be read or is not consistent.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint {
        /// The file that failed.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A safetensors buffer that cannot be decoded.
    #[error("safetensors: {0}")]
    Safetensors(String),
    /// A model failed to train or evaluate.
    #[error("model: {0}")]
    Model(String),
    /// A transport failed to reach a client.
    #[error("transport: {0}")]
    Transport(String),
    /// Encrypting, decrypting or combining sealed tensors failed.
    #[error("sealed tensors: {0}")]
    Sealing(String),
    /// A privacy mechanism refused or failed.
    #[error("privacy: {0}")]
    Privacy(String),
    /// A sealing scheme's own error (e.g. `fedcore_he::HeError`), kept
    /// whole as the source: downcast it to react to its kind.
    #[error("sealed tensors: {0}")]
    SealingScheme(#[source] BoxError),
    /// Settings of an aggregator from another crate that cannot work (e.g.
    /// `fedcore_robust::ParamsError`), kept as the source.
    #[error("invalid configuration: {0}")]
    InvalidParams(#[source] BoxError),
    /// A privacy mechanism's own error (e.g. `fedcore_dp::DpError`), kept
    /// as the source.
    #[error("privacy: {0}")]
    PrivacyMechanism(#[source] BoxError),

    /// Another release would spend more privacy than the budget allows; the
    /// update was not released (no noise drawn, nothing sent).
    #[error(
        "{prefix}{who} exhausted: spent epsilon = {spent:.4}, the next release would reach {next:.4} > budget {budget} (delta = {delta:e})",
        prefix = BUDGET_EXHAUSTED
    )]
    PrivacyBudgetExhausted {
        /// Whose budget (a client id, `run`, ...).
        who: String,
        /// Epsilon spent so far.
        spent: f64,
        /// Epsilon after the refused release.
        next: f64,
        /// The budget's epsilon.
        budget: f64,
        /// The budget's delta.
        delta: f64,
    },
    /// Something this participant does not support (e.g. a client asked for
    /// a step of a multi-step round it does not implement).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A run ended because too many rounds in a row failed (see
    /// [`crate::run::RunPolicy::max_failed_in_a_row`]); each is in the history.
    #[error("{in_a_row} rounds in a row failed; the run gave up")]
    TooManyFailedRounds {
        /// The failed rounds in a row.
        in_a_row: u32,
    },
    /// The run was asked to stop.
    #[error("stopped by request")]
    Stopped,
    /// An I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A JSON (de)serialization error.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

fn summarize_failures(failures: &[ClientFailure]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl From<safetensors::SafeTensorError> for Error {
    fn from(e: safetensors::SafeTensorError) -> Self {
        Error::Safetensors(e.to_string())
    }
}

/// Another crate's error, boxed, as the source of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for `std::result::Result<T, fedcore::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;
