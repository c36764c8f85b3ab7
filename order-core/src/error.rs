//! Errors of the order core. The HTTP layer maps each kind to one answer in
//! one place (`http::error_response`); the kind also says whether anything
//! could have been deducted.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum CoreError {
    /// The client sent something we refuse (422). Not logged as an error.
    #[error("bad input: {0}")]
    BadInput(String),
    /// The idempotency key was used before for a different request (422).
    #[error("idempotency key reused for a different request (order {0})")]
    KeyReuse(String),
    /// Redis could not be reached or failed: nothing was deducted (503).
    #[error("store unavailable: {context}")]
    Store {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The broker could not be reached: nothing was deducted (503).
    #[error("broker unavailable: {context}")]
    Broker {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Too many checkouts in flight: this one waited its turn too long and
    /// was refused before anything was sent or deducted (503).
    #[error("busy: {0}")]
    Busy(String),
    /// The outcome of the local transaction is unknown (its reply was lost).
    /// The broker's check-back settles it from the store; a retry with the
    /// same idempotency key returns the order if it was created (503).
    #[error("checkout outcome unknown: {0}")]
    Unknown(String),
    /// A stored record we cannot read: a bug or a foreign writer (500).
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

impl CoreError {
    pub fn bad_input(msg: impl Into<String>) -> CoreError {
        CoreError::BadInput(msg.into())
    }
    pub fn store(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> CoreError {
        CoreError::Store {
            context: context.into(),
            source: source.into(),
        }
    }
    pub fn broker(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> CoreError {
        CoreError::Broker {
            context: context.into(),
            source: source.into(),
        }
    }
    /// Whether the answer is "try again later" (503).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            CoreError::Store { .. }
                | CoreError::Broker { .. }
                | CoreError::Busy(_)
                | CoreError::Unknown(_)
        )
    }
}
