//! Writing to a WebSocket: every send bounded by a timeout, so a stalled reader costs
//! a close (4408), never a buffer.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures::{Sink, SinkExt};

use super::protocol::ServerFrame;
use crate::telemetry;

/// A frame over `ws.max_message_bytes`: tungstenite reports it as a capacity error.
pub(super) fn too_large(error: &axum::Error) -> bool {
    use std::error::Error as _;
    error
        .source()
        .and_then(|e| e.downcast_ref::<tokio_tungstenite::tungstenite::Error>())
        .is_some_and(|e| matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)))
}

pub(super) async fn write<S>(socket: &mut S, frame: ServerFrame, timeout: Duration) -> bool
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    telemetry::ws_frame("out", frame.kind());
    send(
        socket,
        Message::Text(Utf8Bytes::from(frame.to_json())),
        timeout,
    )
    .await
}

/// Sends within `timeout`; `false` when the socket did not take it in time (or failed).
pub(super) async fn send<S>(socket: &mut S, message: Message, timeout: Duration) -> bool
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    matches!(
        tokio::time::timeout(timeout, socket.send(message)).await,
        Ok(Ok(()))
    )
}

/// Best effort: a stalled peer may never read the close frame.
pub(super) async fn close<S>(socket: &mut S, code: u16, reason: &'static str)
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }));
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.send(frame)).await;
}
