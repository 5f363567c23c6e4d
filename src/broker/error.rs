//! [`BrokerError`]: the broker layer's internal failures, mapped to client answers
//! (`PublishError`) at the edge of the layer and never shown to clients as such.

use deadpool::managed::PoolError;

/// Internal broker-layer failures; never shown to clients as such.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Pool(String),
    #[error("no open connection to the broker")]
    NotConnected,
    #[error("every pooled channel stayed busy")]
    PoolExhausted,
}

impl BrokerError {
    pub(super) fn from_pool(error: PoolError<BrokerError>) -> Self {
        match error {
            PoolError::Backend(e) => e,
            PoolError::Timeout(deadpool::managed::TimeoutType::Wait) => Self::PoolExhausted,
            PoolError::Timeout(_) => Self::Timeout("opening a channel"),
            other => Self::Pool(other.to_string()),
        }
    }
}
