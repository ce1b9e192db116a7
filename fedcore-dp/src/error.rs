//! The errors of this crate.

/// Everything that can go wrong in `fedcore-dp`.
///
/// Converts into [`fedcore::Error`] (for `?` in mechanisms and aggregators):
/// an exhausted budget becomes [`fedcore::Error::PrivacyBudgetExhausted`]
/// (what the orchestrator and dashboards react to), an error of the core
/// stays itself, anything else becomes [`fedcore::Error::PrivacyMechanism`]
/// with this error as its source.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DpError {
    /// A setting that cannot work (a clipping norm, a noise multiplier, a
    /// sampling rate, a budget).
    #[error("invalid configuration: {0}")]
    InvalidParams(String),
    /// The accountant cannot account for a cost (a mechanism it does not know).
    #[error("privacy accounting: {0}")]
    Accounting(String),
    /// The operating system's randomness is not available.
    #[error("randomness: {0}")]
    Randomness(String),
    /// Another release would spend more privacy than the budget allows;
    /// nothing was released.
    #[error(
        "privacy budget of {who} exhausted: spent epsilon = {spent:.4}, the next release would reach {next:.4} > budget {budget} (delta = {delta:e})"
    )]
    BudgetExhausted {
        /// Whose budget.
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
    /// An error of the core (parameters, layouts, a model).
    #[error(transparent)]
    Core(#[from] fedcore::Error),
}

impl From<DpError> for fedcore::Error {
    fn from(e: DpError) -> Self {
        match e {
            DpError::BudgetExhausted {
                who,
                spent,
                next,
                budget,
                delta,
            } => fedcore::Error::PrivacyBudgetExhausted {
                who,
                spent,
                next,
                budget,
                delta,
            },
            DpError::Core(e) => e,
            other => fedcore::Error::PrivacyMechanism(Box::new(other)),
        }
    }
}

/// `Result` with [`DpError`].
pub type Result<T, E = DpError> = std::result::Result<T, E>;
