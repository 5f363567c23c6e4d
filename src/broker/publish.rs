//! Publish outcomes: what a message is, and how an ack, a return, a nack, a timeout or
//! a lost channel become one typed answer.

use std::time::Duration;

use lapin::protocol::AMQPErrorKind;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ErrorKind};

use crate::error::ApiError;

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
    /// A message the broker would answer by closing the channel it came on (which fails
    /// every publish in flight there, of every tenant sharing the pool); refused before
    /// it reaches one. The text says what to change.
    #[error("{0}")]
    Refused(String),
    /// Larger than the broker accepts (`amqp.max_message_bytes`).
    #[error(
        "the message body is {bytes} bytes; the broker accepts at most {max} (amqp.max_message_bytes)"
    )]
    TooLarge { bytes: usize, max: usize },
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
            Self::Refused(_) | Self::TooLarge { .. } => "refused",
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

/// What a publish failure is to a client: its problem code and status.
impl From<PublishError> for ApiError {
    fn from(error: PublishError) -> Self {
        match error {
            PublishError::Unavailable {
                reason,
                retry_after,
            } => Self::BrokerUnavailable {
                detail: reason,
                retry_after,
            },
            e @ PublishError::LostBeforeConfirm(_) => Self::BrokerUnavailable {
                detail: e.to_string(),
                retry_after: Duration::from_secs(1),
            },
            PublishError::ExchangeNotFound(name) => Self::ExchangeNotFound(name),
            e @ PublishError::AccessRefused(_) => Self::Forbidden(e.to_string()),
            PublishError::Refused(detail) => Self::InvalidRequest(detail),
            e @ PublishError::TooLarge { .. } => Self::PayloadTooLarge(e.to_string()),
            e @ PublishError::Unroutable(_) => Self::Unroutable(e.to_string()),
            e @ PublishError::Rejected => Self::BrokerRejected(e.to_string()),
            e @ PublishError::ConfirmTimeout(_) => Self::ConfirmTimeout(e.to_string()),
        }
    }
}

pub type PublishResult = Result<Published, PublishError>;

/// RabbitMQ's pseudo-queue for direct reply-to: only an RPC channel may publish with it
/// ([`super::rpc`]); [`refusal`] refuses it on every other.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The most header bytes a message may carry into `basic.publish`. A content header
/// frame larger than the broker's frame size (RabbitMQ's 128 KiB) makes it close the
/// whole connection; the rest of the properties and the frame's own bytes fit in the
/// margin. Client publishes are held to the lower `server.max_headers_bytes`; this
/// bounds what Warren republishes from the broker (a retry hop adds a header to what
/// another producer sent).
pub const MAX_HEADER_TABLE_BYTES: usize = 120 * 1024;

/// Why the broker would close the channel `message` is published on, if it would: the
/// inputs RabbitMQ answers with a channel close rather than a nack. Checked for every
/// message before it reaches a pooled channel, whoever built it (a client's publish,
/// a retry hop, a push or scheduled republish). Not here: the exchange itself (missing,
/// internal, not writable), which [`super::Broker::ensure_exchange`] probes.
pub fn refusal(message: &OutgoingMessage, max_message_bytes: usize) -> Option<PublishError> {
    if message.body.len() > max_message_bytes {
        return Some(PublishError::TooLarge {
            bytes: message.body.len(),
            max: max_message_bytes,
        });
    }
    let p = &message.properties;
    // PRECONDITION_FAILED "fast reply consumer does not exist": direct reply-to works
    // only on a channel that consumes it, which a pooled channel never does. (The
    // broker rewrites it to `amq.rabbitmq.reply-to.<suffix>` on the way out; that form
    // is an address like any other, and a retried request carries it.)
    if p.reply_to()
        .as_ref()
        .is_some_and(|r| r.as_str() == DIRECT_REPLY_TO)
    {
        return Some(PublishError::Refused(format!(
            "properties.reply_to: {:?} is RabbitMQ's direct reply-to, which a gateway channel cannot publish with; use POST /v1/request for request/reply",
            DIRECT_REPLY_TO
        )));
    }
    // PRECONDITION_FAILED unless it names the user of the gateway's connection.
    if p.user_id().is_some() {
        return Some(PublishError::Refused(
            "properties.user_id: the broker sets who published a message; Warren publishes as itself".to_owned(),
        ));
    }
    if p.headers()
        .as_ref()
        .is_some_and(|h| table_len(h) > MAX_HEADER_TABLE_BYTES)
    {
        return Some(PublishError::Refused(format!(
            "properties.headers: more than {MAX_HEADER_TABLE_BYTES} bytes encoded do not fit the broker's frame"
        )));
    }
    None
}

/// The encoded size of a header table in an AMQP content header frame.
pub fn table_len(table: &FieldTable) -> usize {
    4 + table
        .inner()
        .iter()
        .map(|(name, value)| 1 + name.as_str().len() + value_len(value))
        .sum::<usize>()
}

/// The encoded size of one field value, its type tag included. The parser bounds how
/// deep a table from the broker nests (vendor/amq-protocol-types), and Warren's own
/// tables nest at most 8 deep, so the recursion is bounded.
fn value_len(value: &AMQPValue) -> usize {
    1 + match value {
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(items) => 4 + items.as_slice().iter().map(value_len).sum::<usize>(),
        AMQPValue::FieldTable(table) => table_len(table),
        AMQPValue::Void => 0,
    }
}

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
