//! The WebSocket edge of stream subscriptions (SPEC §9): a `subscribe` frame with
//! `mode: "stream"` becomes a [`StreamSubscription`] on the session's sink.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::protocol::Subscribe;
use crate::auth::grants::GrantPattern;
use crate::delivery::stream::{StreamRequest, StreamSlots, StreamSubscription};
use crate::delivery::{Outgoing, SendBudget};
use crate::error::ApiError;
use crate::tenancy::Tenant;

/// What a WebSocket session lends its stream subscriptions.
pub struct SocketSide<'a> {
    pub sink: mpsc::Sender<Outgoing>,
    pub budget: SendBudget,
    /// `ws.slow_consumer_timeout_ms`: the socket's own write timeout (4408).
    pub slow_consumer_timeout: Duration,
    pub streams: &'a crate::config::StreamsConfig,
    pub slots: &'a StreamSlots,
}

/// A WebSocket `subscribe` frame with `mode: "stream"` (checked by the frame parser:
/// `stream` is set, `binding_key` is `#` when absent).
pub async fn subscribe_socket(
    tenant: Arc<Tenant>,
    frame: &Subscribe,
    side: SocketSide<'_>,
) -> Result<StreamSubscription, ApiError> {
    let filter = GrantPattern::parse(&frame.binding_key)
        .map_err(|e| ApiError::InvalidRequest(format!("binding_key: {e}")))?;
    let prefetch = match frame.prefetch {
        Some(0) => {
            return Err(ApiError::InvalidRequest(
                "prefetch: must be at least 1".into(),
            ));
        }
        Some(p) => p.min(side.streams.prefetch),
        None => side.streams.prefetch,
    };
    let offset = frame.offset.unwrap_or_default();
    let request = StreamRequest {
        subscription: &frame.id,
        format: frame.format,
        stream: frame.stream.as_deref().unwrap_or_default(),
        filter,
        offset,
        resume: offset.kind(),
        prefetch,
        // Longer than the socket's own write timeout: a stalled socket is closed with
        // 4408 by its session before the subscription would give up on it.
        slow_timeout: side.slow_consumer_timeout * 2,
        budget: side.budget,
        transport: "ws",
        slots: side.slots,
    };
    StreamSubscription::start(tenant, request, side.sink).await
}

#[cfg(test)]
mod tests {
    use crate::delivery::stream::StreamOffset;

    #[test]
    fn stream_subscribe_frames_parse_with_their_own_members() {
        use crate::ws::protocol::{ClientFrame, Mode, parse};
        let frame = parse(
            r#"{"type":"subscribe","id":"s3","mode":"stream","stream":"order-log","offset":{"timestamp":"2026-11-29T10:00:00Z"}}"#,
        );
        let Ok(ClientFrame::Subscribe(s)) = frame else {
            panic!("{frame:?}")
        };
        assert_eq!(s.mode, Mode::Stream);
        assert_eq!(s.stream.as_deref(), Some("order-log"));
        assert_eq!(s.offset, Some(StreamOffset::Timestamp(1_795_946_400)));
        assert_eq!(s.binding_key, "#", "no filter: every routing key");
        let frame = parse(
            r#"{"type":"subscribe","id":"s","mode":"stream","stream":"l","binding_key":"order.*","offset":5}"#,
        );
        assert!(
            matches!(frame, Ok(ClientFrame::Subscribe(ref s)) if s.binding_key == "order.*" && s.offset == Some(StreamOffset::At(5))),
            "{frame:?}"
        );
        for (bad, says) in [
            (r#"{"type":"subscribe","id":"s","mode":"stream"}"#, "stream"),
            (
                r#"{"type":"subscribe","id":"s","mode":"stream","stream":"l","exchange":"e"}"#,
                "exchange",
            ),
            (
                r#"{"type":"subscribe","id":"s","mode":"stream","stream":"l","queue":"q"}"#,
                "queue",
            ),
            (
                r#"{"type":"subscribe","id":"s","mode":"stream","stream":"l","offset":"soon"}"#,
                "offset",
            ),
            (
                r#"{"type":"subscribe","id":"s","exchange":"e","binding_key":"k","offset":"first"}"#,
                "offset",
            ),
            (
                r#"{"type":"subscribe","id":"s","exchange":"e","binding_key":"k","stream":"l"}"#,
                "stream",
            ),
            (
                r#"{"type":"subscribe","id":"s","binding_key":"k"}"#,
                "exchange",
            ),
        ] {
            let error = parse(bad).expect_err(bad);
            assert_eq!(error.id.as_deref(), Some("s"));
            assert!(error.detail.contains(says), "{bad}: {}", error.detail);
        }
    }
}
