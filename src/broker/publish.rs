//! Publish outcomes: what a message is, and how an ack, a return, a nack, a timeout or
//! a lost channel become one typed answer.

use std::time::Duration;

use lapin::protocol::AMQPErrorKind;
use lapin::{BasicProperties, ErrorKind};

/// A message ready for `basic.publish`.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub exchange: String,
    pub routing_key: String,
    /// Cheap to clone: the publish future owns a handle to it.
    pub body: bytes::Bytes,
    pub properties: BasicProperties,
    pub mandatory: bool,
}

/// The broker confirmed the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// `true` only when the publish was mandatory, so an ack without a return proves
    /// a queue took it. A non-mandatory publish cannot tell, and says `false`.
    pub routed: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error("{reason}")]
    Unavailable {
        reason: String,
        retry_after: Duration,
    },
    #[error("exchange {0:?} does not exist in this tenant's vhost")]
    ExchangeNotFound(String),
    /// The broker's reply text is logged, not shown: it names vhosts and users.
    #[error("the broker refused the tenant's credentials access to this exchange")]
    AccessRefused(String),
    #[error(
        "the broker returned the message as unroutable ({0}): no queue is bound for this routing key"
    )]
    Unroutable(String),
    #[error(
        "the broker rejected the message (basic.nack), e.g. a queue at its length limit with overflow reject-publish"
    )]
    Rejected,
    #[error(
        "no publisher confirm within {0:?}; the outcome is unknown, retry with the same Idempotency-Key"
    )]
    ConfirmTimeout(Duration),
    /// The cause is logged, not shown: it can quote the broker (frame sizes, vhosts).
    #[error(
        "the channel was lost before the broker confirmed; the outcome is unknown, retry with the same Idempotency-Key"
    )]
    LostBeforeConfirm(String),
}

impl PublishError {
    /// The `outcome` label of `warren_publish_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Unavailable { .. } | Self::LostBeforeConfirm(_) => "unavailable",
            Self::ExchangeNotFound(_) => "exchange_not_found",
            Self::AccessRefused(_) => "forbidden",
            Self::Unroutable(_) => "unroutable",
            Self::Rejected => "nacked",
            Self::ConfirmTimeout(_) => "timeout",
        }
    }

    pub(super) fn unavailable(reason: impl Into<String>, retry_after: Duration) -> Self {
        Self::Unavailable {
            reason: reason.into(),
            retry_after,
        }
    }
}

pub type PublishResult = Result<Published, PublishError>;

/// How an AMQP error relates to the message that saw it.
pub(super) enum AmqpFailure {
    /// The broker closed the channel because this message's exchange is missing.
    ExchangeNotFound,
    AccessRefused(String),
    /// The channel is gone; if `connection` the whole connection is.
    Lost {
        connection: bool,
        detail: String,
    },
}

/// Classifies an error seen while publishing to `exchange` or awaiting its confirm.
/// `NOT_FOUND` from the broker. On a channel that did nothing but declare one exchange
/// passively, that can only be about that exchange. (The reply text is no proof: RabbitMQ
/// drops control characters such as CR and LF from the name it quotes.)
pub fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
}

pub(super) fn classify(error: &lapin::Error, exchange: &str) -> AmqpFailure {
    if let ErrorKind::ProtocolError(amqp) = error.kind() {
        let message = amqp.get_message().as_str();
        match amqp.get_id() {
            // NOT_FOUND - no exchange 'x' in vhost 'v': only ours if it names our exchange,
            // since every confirm pending on the closed channel sees the same error.
            404 if message.contains(&format!("exchange '{exchange}'")) => {
                return AmqpFailure::ExchangeNotFound;
            }
            403 => return AmqpFailure::AccessRefused(message.to_owned()),
            _ => {}
        }
        return AmqpFailure::Lost {
            connection: matches!(amqp.kind(), AMQPErrorKind::Hard(_)),
            detail: error.to_string(),
        };
    }
    let connection = error.is_io_error()
        || matches!(
            error.kind(),
            ErrorKind::InvalidConnectionState(_) | ErrorKind::MissingHeartbeatError
        );
    AmqpFailure::Lost {
        connection,
        detail: error.to_string(),
    }
}
