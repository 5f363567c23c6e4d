//! One WebSocket session: a single `select!` over client frames, deliveries for the
//! socket, finished publishes, token expiry, keepalive and shutdown. Writes are bounded
//! by the slow-consumer timeout, so a stalled reader is closed (4408), never buffered.
//!
//! The loop and the handlers of each client frame share the session's state
//! (subscriptions, queues, token expiry), so they stay together. Frame parsing lives in
//! `protocol.rs`, writes in `socket.rs`, the publish and request frames' calls in
//! `publish.rs` and `request.rs`, the queue and stream adapters in `queue.rs` and
//! `stream.rs`, the deliveries themselves in `delivery/`.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Message;
use futures::{Sink, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::SocketGuard;
use super::protocol::{self, ClientFrame, Mode, ServerFrame, Subscribe};
use super::socket::{close, send, too_large, write};
use super::stream::SocketSide;
use crate::AppState;
use crate::auth::grants::GrantPattern;
use crate::delivery::durable::{Durable, DurableRequest, Source, queue_name};
use crate::delivery::live::{LiveSink, LiveSubscription};
use crate::delivery::stream::StreamSubscription;
use crate::delivery::{Outgoing, SendBudget};
use crate::error::ApiError;
use crate::telemetry;
use crate::tenancy::{self, Principal, Scope};

pub const CLOSE_SHUTDOWN: u16 = 1001;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_LARGE: u16 = 1009;
pub const CLOSE_TOKEN_EXPIRED: u16 = 4401;
pub const CLOSE_SLOW_CONSUMER: u16 = 4408;
const CLOSE_NORMAL: u16 = 1000;

enum Kind {
    Live(LiveSubscription),
    Durable(Durable),
    Stream(StreamSubscription),
}

struct Subscription {
    /// The exchange; for a stream subscription, the stream.
    exchange: String,
    binding_key: GrantPattern,
    /// `mode: "queue"`: the queue its grant must still cover.
    queue_grant: Option<String>,
    kind: Kind,
}

/// What one turn of the loop decided.
enum Step {
    Write(Vec<ServerFrame>),
    Ping,
    Close(u16, &'static str),
    /// The peer went away; nothing more can be written.
    Gone,
}

/// Runs the session until the socket closes; `guard` keeps it counted meanwhile.
pub async fn run<S>(state: AppState, socket: S, principal: Principal, guard: SocketGuard)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    let (tx, rx) = mpsc::channel(state.config.ws.send_buffer);
    let budget = SendBudget::new(state.config.ws.max_buffered_bytes);
    let mut session = Session {
        state,
        principal,
        subscriptions: HashMap::new(),
        tx,
        rx,
        budget,
        publishes: JoinSet::new(),
    };
    session.serve(socket).await;
    session.cleanup().await;
    drop(guard);
}

struct Session {
    state: AppState,
    principal: Principal,
    subscriptions: HashMap<String, Subscription>,
    tx: mpsc::Sender<Outgoing>,
    rx: mpsc::Receiver<Outgoing>,
    budget: SendBudget,
    publishes: JoinSet<ServerFrame>,
}

impl Session {
    async fn serve<S>(&mut self, mut socket: S)
    where
        S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
    {
        let config = self.state.config.ws.clone();
        let write_timeout = Duration::from_millis(config.slow_consumer_timeout_ms);
        let idle = Duration::from_secs(config.idle_timeout_s);
        let mut shutdown = self.state.shutdown_receiver();
        let expiry = tokio::time::sleep_until(expiry_instant(self.principal.expires_at));
        tokio::pin!(expiry);
        let mut ping = tokio::time::interval(Duration::from_secs(config.ping_interval_s));
        ping.tick().await;
        let mut last_seen = Instant::now();

        loop {
            let step = tokio::select! {
                _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => Step::Close(CLOSE_SHUTDOWN, "gateway shutting down"),
                () = &mut expiry => Step::Close(CLOSE_TOKEN_EXPIRED, "token expired; reconnect with a fresh token"),
                incoming = socket.next(), if self.publishes.len() < config.max_inflight_publishes => {
                    match incoming {
                        None | Some(Ok(Message::Close(_))) => Step::Gone,
                        Some(Err(error)) if too_large(&error) => {
                            Step::Close(CLOSE_TOO_LARGE, "frame larger than ws.max_message_bytes")
                        }
                        Some(Err(_)) => Step::Gone,
                        Some(Ok(Message::Text(text))) => {
                            last_seen = Instant::now();
                            telemetry::ws_frame("in", "text");
                            self.handle(text.as_str(), expiry.as_mut()).await
                        }
                        Some(Ok(Message::Binary(_))) => {
                            last_seen = Instant::now();
                            Step::Write(vec![ServerFrame::error(None, &ApiError::InvalidRequest(
                                "binary frames are not part of warren.v1; send JSON text frames".into(),
                            ))])
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                            last_seen = Instant::now();
                            Step::Write(Vec::new())
                        }
                    }
                }
                Some(outgoing) = self.rx.recv() => Step::Write(vec![self.outgoing(outgoing)]),
                Some(done) = self.publishes.join_next() => {
                    Step::Write(vec![done.unwrap_or_else(|e| ServerFrame::error(None, &ApiError::Internal(e.to_string())))])
                }
                _ = ping.tick() => {
                    if last_seen.elapsed() > idle {
                        Step::Close(CLOSE_NORMAL, "idle timeout")
                    } else {
                        Step::Ping
                    }
                }
            };
            match step {
                Step::Write(frames) => {
                    for frame in frames {
                        if !write(&mut socket, frame, write_timeout).await {
                            return self.slow_consumer(&mut socket).await;
                        }
                    }
                }
                Step::Ping => {
                    let ping = Message::Ping(axum::body::Bytes::from_static(b"warren"));
                    if !send(&mut socket, ping, write_timeout).await {
                        return self.slow_consumer(&mut socket).await;
                    }
                }
                Step::Close(code, reason) => {
                    if code == CLOSE_SHUTDOWN {
                        self.drain(&mut socket, write_timeout).await;
                    }
                    return close(&mut socket, code, reason).await;
                }
                Step::Gone => return,
            }
        }
    }

    /// On shutdown: what was already delivered to this socket, and the answers to its
    /// publishes in flight, still go out before the close.
    async fn drain<S>(&mut self, socket: &mut S, timeout: Duration)
    where
        S: Sink<Message, Error = axum::Error> + Unpin,
    {
        self.stop_all().await;
        while let Ok(outgoing) = self.rx.try_recv() {
            let frame = self.outgoing(outgoing);
            if !write(socket, frame, timeout).await {
                return;
            }
        }
        while let Some(done) = self.publishes.join_next().await {
            let Ok(frame) = done else { continue };
            if !write(socket, frame, timeout).await {
                return;
            }
        }
    }

    async fn slow_consumer<S>(&mut self, socket: &mut S)
    where
        S: Sink<Message, Error = axum::Error> + Unpin,
    {
        telemetry::ws_slow_consumer_closed();
        tracing::info!(tenant = %self.principal.tenant.name, "Closing a WebSocket whose reader stalled (4408).");
        close(
            socket,
            CLOSE_SLOW_CONSUMER,
            "slow consumer: the socket stopped reading",
        )
        .await;
    }

    /// The frame to write; a delivery's byte budget is given back once the frame is
    /// serialised for the socket (the writer's own buffer is bounded separately).
    fn outgoing(&mut self, outgoing: Outgoing) -> ServerFrame {
        match outgoing {
            Outgoing::Message(frame, _bytes) => {
                // Closed as the frame goes to the writer (a span only while traces
                // are exported).
                drop(crate::otel::delivery_span("websocket", frame.delivered()));
                ServerFrame::Message(frame)
            }
            Outgoing::Ended {
                subscription,
                error,
            } => {
                match self.subscriptions.remove(&subscription).map(|s| s.kind) {
                    Some(Kind::Durable(durable)) => telemetry::ws_subscriptions(durable.mode, -1),
                    Some(Kind::Stream(_)) => telemetry::ws_subscriptions("stream", -1),
                    _ => {}
                }
                ServerFrame::error(Some(subscription), &error)
            }
        }
    }

    async fn handle(&mut self, text: &str, expiry: std::pin::Pin<&mut tokio::time::Sleep>) -> Step {
        let frame = match protocol::parse(text) {
            Ok(frame) => frame,
            Err(e) => {
                return Step::Write(vec![ServerFrame::error(
                    e.id,
                    &ApiError::InvalidRequest(e.detail),
                )]);
            }
        };
        let reply = match frame {
            ClientFrame::Subscribe(s) => {
                let id = s.id.clone();
                match self.subscribe(s).await {
                    Ok(queue) => ServerFrame::Subscribed { id, queue },
                    Err(e) => ServerFrame::error(Some(id), &e),
                }
            }
            ClientFrame::Unsubscribe(u) => match self.subscriptions.remove(&u.id) {
                Some(subscription) => {
                    self.stop(subscription).await;
                    ServerFrame::Unsubscribed { id: u.id }
                }
                None => ServerFrame::error(Some(u.id), &unknown_subscription()),
            },
            ClientFrame::Ack(a) => match self.durable(&a.subscription) {
                Ok(durable) => match durable.ack(a.delivery_tag, a.multiple).await {
                    Ok(()) => return Step::Write(Vec::new()),
                    Err(e) => ServerFrame::error(Some(a.subscription), &e),
                },
                Err(e) => ServerFrame::error(Some(a.subscription), &e),
            },
            ClientFrame::Nack(n) => match self.durable(&n.subscription) {
                Ok(durable) => match durable.nack(n.delivery_tag, n.multiple, n.requeue).await {
                    Ok(()) => return Step::Write(Vec::new()),
                    Err(e) => ServerFrame::error(Some(n.subscription), &e),
                },
                Err(e) => ServerFrame::error(Some(n.subscription), &e),
            },
            ClientFrame::Publish(p) => match self.principal.require(Scope::Publish) {
                Ok(()) => {
                    let state = self.state.clone();
                    let principal = self.principal.clone();
                    self.publishes
                        .spawn(super::publish::publish(state, principal, *p));
                    return Step::Write(Vec::new());
                }
                Err(e) => ServerFrame::error(Some(p.id), &e),
            },
            ClientFrame::Auth(a) => return self.reauthenticate(&a.token, expiry).await,
            // Request frames share the publish frames' in-flight bound (they are
            // publishes that wait longer) and answer through the same set.
            ClientFrame::Request(r) => match self.principal.require(Scope::Publish) {
                Ok(()) => {
                    let state = self.state.clone();
                    let principal = self.principal.clone();
                    self.publishes
                        .spawn(super::request::request(state, principal, *r));
                    return Step::Write(Vec::new());
                }
                Err(e) => ServerFrame::error(Some(r.id), &e),
            },
        };
        Step::Write(vec![reply])
    }

    async fn subscribe(&mut self, s: Subscribe) -> Result<Option<String>, ApiError> {
        let config = &self.state.config.ws;
        self.principal.require(Scope::Subscribe)?;
        if s.id.is_empty() || s.id.len() > 255 {
            return Err(ApiError::InvalidRequest("id: must be 1-255 bytes".into()));
        }
        if self.subscriptions.contains_key(&s.id) {
            return Err(ApiError::InvalidRequest(format!(
                "id: subscription {:?} already exists on this socket",
                s.id
            )));
        }
        if self.subscriptions.len() >= config.max_subscriptions {
            return Err(ApiError::InvalidRequest(format!(
                "at most {} subscriptions per socket (ws.max_subscriptions)",
                config.max_subscriptions
            )));
        }
        match s.mode {
            Mode::Stream => self.subscribe_stream(s).await,
            Mode::Queue => self.subscribe_queue(s).await,
            Mode::Live | Mode::Durable => self.subscribe_bound(s).await,
        }
    }

    /// `mode: "queue"`: an existing queue, consumed whole.
    async fn subscribe_queue(&mut self, s: Subscribe) -> Result<Option<String>, ApiError> {
        let tenant = self.principal.tenant.clone();
        let sink = self.tx.clone();
        let queue = super::queue::start(&self.state, tenant, &s, sink, self.budget.clone());
        let durable = queue.await?;
        telemetry::ws_subscriptions(durable.mode, 1);
        let queue = durable.queue.clone();
        let subscription = Subscription {
            exchange: String::new(),
            binding_key: GrantPattern::every_key(),
            queue_grant: Some(queue.clone()),
            kind: Kind::Durable(durable),
        };
        self.subscriptions.insert(s.id, subscription);
        Ok(Some(queue))
    }

    /// `live` and `durable`: a binding on an exchange, covered by the tenant's grants.
    async fn subscribe_bound(&mut self, s: Subscribe) -> Result<Option<String>, ApiError> {
        let config = &self.state.config.ws;
        if s.exchange.len() > 255 {
            return Err(ApiError::InvalidRequest(
                "exchange: must be at most 255 bytes".into(),
            ));
        }
        let pattern = GrantPattern::parse(&s.binding_key)
            .map_err(|e| ApiError::InvalidRequest(format!("binding_key: {e}")))?;
        let tenant = self.principal.tenant.clone();
        tenant.authorize_subscribe(&s.exchange, &pattern)?;
        let (kind, queue) = if s.mode == Mode::Live {
            let target = LiveSink {
                subscription: &s.id,
                sink: self.tx.clone(),
                budget: self.budget.clone(),
            };
            let live = self
                .state
                .live
                .join_as(
                    &tenant,
                    &s.exchange,
                    &pattern,
                    target,
                    config.live_queue_max_length,
                    s.format,
                )
                .await?;
            (Kind::Live(live), None)
        } else {
            let name = s.queue.as_deref().unwrap_or_default();
            let queue = queue_name(&tenant.name, name)?;
            let request = DurableRequest {
                subscription: &s.id,
                source: Source::Bound {
                    exchange: &s.exchange,
                    binding_key: &s.binding_key,
                    expiry: Duration::from_secs(config.durable_queue_expiry_s),
                    queue_type: config.durable_queue_type,
                },
                queue,
                prefetch: super::queue::prefetch(s.prefetch, config)?,
                slow_consumer_timeout: Duration::from_millis(config.slow_consumer_timeout_ms),
                budget: self.budget.clone(),
            };
            let durable =
                Durable::start_as(tenant.clone(), request, self.tx.clone(), s.format).await?;
            telemetry::ws_subscriptions("durable", 1);
            let queue = durable.queue.clone();
            (Kind::Durable(durable), Some(queue))
        };
        self.subscriptions.insert(
            s.id,
            Subscription {
                exchange: s.exchange,
                binding_key: pattern,
                queue_grant: None,
                kind,
            },
        );
        Ok(queue)
    }

    /// `mode: "stream"` (SPEC §9): replay from an offset; Warren acks.
    async fn subscribe_stream(&mut self, s: Subscribe) -> Result<Option<String>, ApiError> {
        let config = &self.state.config;
        let side = SocketSide {
            sink: self.tx.clone(),
            budget: self.budget.clone(),
            slow_consumer_timeout: Duration::from_millis(config.ws.slow_consumer_timeout_ms),
            streams: &config.streams,
            slots: &self.state.stream_slots,
        };
        let tenant = self.principal.tenant.clone();
        let stream = super::stream::subscribe_socket(tenant, &s, side).await?;
        telemetry::ws_subscriptions("stream", 1);
        let (exchange, binding_key) = (stream.stream.clone(), stream.filter.clone());
        let kind = Kind::Stream(stream);
        let subscription = Subscription {
            exchange,
            binding_key,
            queue_grant: None,
            kind,
        };
        self.subscriptions.insert(s.id, subscription);
        Ok(None)
    }

    fn durable(&self, id: &str) -> Result<&Durable, ApiError> {
        match self.subscriptions.get(id).map(|s| &s.kind) {
            Some(Kind::Durable(durable)) => Ok(durable),
            Some(Kind::Live(_)) => Err(ApiError::InvalidRequest(
                "live subscriptions are not acknowledged; only durable ones are".into(),
            )),
            Some(Kind::Stream(_)) => Err(ApiError::InvalidRequest(
                "stream subscriptions are acknowledged by Warren; send no acks".into(),
            )),
            None => Err(unknown_subscription()),
        }
    }

    /// A fresh token extends the socket; subscriptions it no longer allows end.
    async fn reauthenticate(
        &mut self,
        token: &str,
        expiry: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> Step {
        let principal =
            match tenancy::authenticate(&self.state.verifier, &self.state.tenants, Some(token))
                .await
            {
                Ok(principal) => principal,
                Err(e) => return Step::Write(vec![ServerFrame::error(None, &e)]),
            };
        if principal.tenant.name != self.principal.tenant.name {
            return Step::Close(CLOSE_POLICY, "a refreshed token must name the same tenant");
        }
        expiry.reset(expiry_instant(principal.expires_at));
        self.principal = principal;
        let revoked: Vec<String> = self
            .subscriptions
            .iter()
            .filter(|(_, s)| {
                let tenant = &self.principal.tenant;
                let allowed = match (&s.kind, &s.queue_grant) {
                    (Kind::Stream(_), _) => tenant.authorize_stream(&s.exchange, &s.binding_key),
                    (_, Some(queue)) => tenant.authorize_queue(queue),
                    _ => tenant.authorize_subscribe(&s.exchange, &s.binding_key),
                };
                self.principal.require(Scope::Subscribe).is_err() || allowed.is_err()
            })
            .map(|(id, _)| id.clone())
            .collect();
        let mut frames = Vec::new();
        for id in revoked {
            if let Some(subscription) = self.subscriptions.remove(&id) {
                self.stop(subscription).await;
            }
            frames.push(ServerFrame::error(
                Some(id),
                &ApiError::Forbidden(
                    "the refreshed token no longer allows this subscription".into(),
                ),
            ));
        }
        Step::Write(frames)
    }

    async fn stop(&self, subscription: Subscription) {
        match subscription.kind {
            Kind::Live(live) => self.state.live.leave(live).await,
            Kind::Durable(durable) => {
                let mode = durable.mode;
                durable.stop().await;
                telemetry::ws_subscriptions(mode, -1);
            }
            Kind::Stream(stream) => {
                stream.stop().await;
                telemetry::ws_subscriptions("stream", -1);
            }
        }
    }

    async fn stop_all(&mut self) {
        let all: Vec<Subscription> = self.subscriptions.drain().map(|(_, s)| s).collect();
        for subscription in all {
            self.stop(subscription).await;
        }
    }

    async fn cleanup(&mut self) {
        self.stop_all().await;
        // Publishes already handed to the broker finish (their outcome is the broker's);
        // nobody is left to tell.
        while self.publishes.join_next().await.is_some() {}
    }
}

fn unknown_subscription() -> ApiError {
    ApiError::InvalidRequest("no subscription with this id on this socket".into())
}

/// When the token's `exp` (Unix seconds) falls, as a monotonic instant.
fn expiry_instant(expires_at: u64) -> Instant {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let remaining = (expires_at as f64 - now).max(0.0);
    Instant::now() + Duration::from_secs_f64(remaining.min(10.0 * 365.0 * 86_400.0))
}
