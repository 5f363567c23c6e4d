//! Graceful shutdown: requests in flight when the signal comes are still answered, and
//! a stopped Warren leaves no broker connection open.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use warren::auth::{TokenRequest, mint};

use crate::common::*;

#[tokio::test]
async fn in_flight_publishes_finish_after_the_shutdown_signal() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "#").await;
    let tenant = unique("t");
    let mut server = TestServer::start_ready(tenant_config(&tenant, &exchange, "#")).await;
    let token = server.token(&tenant, "publish");

    // Requests whose bodies are still arriving when shutdown starts.
    let body =
        json!({"exchange": exchange, "routing_key": "k", "payload": {"pad": "x".repeat(100)}})
            .to_string();
    let (head, tail) = body.split_at(body.len() / 2);
    let mut senders = Vec::new();
    let mut requests = Vec::new();
    for _ in 0..10 {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
        tx.send(Ok(head.as_bytes().to_vec())).await.unwrap();
        let stream = tokio_stream_from(rx);
        let request = server
            .http
            .post(format!("{}/v1/publish", server.base))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(reqwest::Body::wrap_stream(stream));
        requests.push(tokio::spawn(async move { request.send().await }));
        senders.push(tx);
    }
    // Let the server take them all in, signal shutdown, then finish the bodies.
    let state = server.state.clone();
    let all_in = eventually(Duration::from_secs(5), || async { state.in_flight() == 10 }).await;
    assert!(all_in, "requests in flight: {}", state.in_flight());
    server.trigger_shutdown();
    let stopping = eventually(Duration::from_secs(5), || async {
        state.is_shutting_down()
    })
    .await;
    assert!(stopping);
    for tx in &senders {
        tx.send(Ok(tail.as_bytes().to_vec())).await.unwrap();
    }
    drop(senders);
    for request in requests {
        let response = request.await.unwrap().expect("answered, not reset");
        assert_eq!(response.status(), 202);
    }
    let result = tokio::time::timeout(Duration::from_secs(5), server.join()).await;
    assert!(
        matches!(result, Ok(Ok(()))),
        "serve did not return: {result:?}"
    );
    assert_eq!(rabbit.wait_count(&queue, 10).await, 10);
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Warren the way `main` runs it: on a runtime of its own that is dropped as soon as
/// `serve` returns, so anything shutdown did not await never happens. Subscriptions
/// and publishes are open on it when it stops; afterwards every AMQP connection it
/// opened (seen through a proxy that reads Warren's frames) must have been closed with
/// `connection.close` before `serve` returned, the app's task tracker must be empty
/// then, and the broker must list none of the connections.
#[tokio::test]
async fn a_stopped_warren_leaves_no_broker_connection_open() {
    let admin = Admin::new();
    let vhost = unique("shutdown");
    admin.vhost(&vhost).await;
    let proxy = AmqpCountingProxy::start("127.0.0.1:5672").await;
    let tenant = unique("t");
    let config = warren::config::Config::from_toml(&format!(
        "[auth]\nhs256_secret = \"{SECRET}\"\n\
         [amqp]\nurl = \"amqp://guest:guest@127.0.0.1:{port}\"\nconnections_per_vhost = 2\n\
         [server]\nshutdown_grace_s = 5\n\
         [tenants.{tenant}]\nvhost = \"{vhost}\"\n\
         publish = [{{ exchange = \"amq.topic\", routing_key = \"#\" }}]\n\
         subscribe = [{{ exchange = \"amq.topic\", routing_key = \"#\" }}]\n",
        port = proxy.port,
    ))
    .expect("test config parses");
    let resolved = config.resolve().expect("config resolves");
    let token = mint(
        &config.auth,
        resolved.signing_secret.as_ref().expect("an HMAC secret"),
        &TokenRequest {
            tenant: &tenant,
            subject: "tester",
            scope: "publish subscribe",
            ttl: Duration::from_secs(600),
        },
    )
    .expect("mint");

    let (started_tx, started) = tokio::sync::oneshot::channel::<String>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let counts = proxy.counts.clone();
    let warren = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let served = runtime.block_on(async move {
            let state = warren::App::start(config).await.expect("app starts");
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let base = format!("http://{}", listener.local_addr().expect("addr"));
            let _ = started_tx.send(base);
            let served = warren::serve(state.clone(), listener, None, async move {
                let _ = stopped.await;
            })
            .await;
            let tasks = state.tasks();
            assert!(
                tasks.is_closed() && tasks.is_empty(),
                "serve returned with {} background tasks running",
                tasks.len()
            );
            served
        });
        // What was closed when `serve` returned, before the runtime goes (as in main).
        let closed_cleanly = counts.closed_cleanly.load(Ordering::Acquire);
        drop(runtime);
        served.map(|()| closed_cleanly)
    });
    let base = started.await.expect("warren started");
    let http = reqwest::Client::new();
    let ready = eventually(Duration::from_secs(10), || async {
        let r = http.get(format!("{base}/readyz")).send().await;
        r.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "warren did not become ready");

    // Live subscriptions (each a consumer channel), and publishes through the pool.
    let mut sockets = Vec::new();
    for i in 0..3 {
        let mut ws = ws_connect(&base, &token).await;
        let frame = json!({"type": "subscribe", "id": format!("s{i}"), "exchange": "amq.topic",
                           "binding_key": "#", "mode": "live"});
        ws.send(Message::text(frame.to_string()))
            .await
            .expect("send");
        let answer = next_json(&mut ws).await;
        assert_eq!(answer["type"], "subscribed", "{answer}");
        sockets.push(ws);
    }
    for n in 0..5 {
        let response = http
            .post(format!("{base}/v1/publish"))
            .bearer_auth(&token)
            .json(&json!({"exchange": "amq.topic", "routing_key": "k", "payload": {"n": n}}))
            .send()
            .await
            .expect("publish");
        assert_eq!(response.status(), 202);
    }
    let opened = proxy.counts.opened.load(Ordering::Acquire);
    assert!(opened >= 2, "warren opened {opened} connections");
    // The management API lists connections from statistics, which lag by seconds.
    let listed = eventually(Duration::from_secs(15), || async {
        broker_connections(&vhost).await == opened
    })
    .await;
    assert!(listed, "the broker lists warren's {opened} connections");

    // The sessions end with the shutdown; read them to the end meanwhile.
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} }))
        .collect();
    let _ = stop.send(());
    let joined = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::task::spawn_blocking(move || warren.join()),
    )
    .await
    .expect("serve returned within the grace period")
    .expect("join");
    let Ok(Ok(closed_cleanly)) = joined else {
        panic!("serve failed: {joined:?}");
    };
    for reader in readers {
        let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
    }

    // Closed by Warren, not by its runtime going away: by the time `serve` returned,
    // it had sent connection.close on every connection it opened.
    let counts = &proxy.counts;
    assert_eq!(
        closed_cleanly,
        counts.opened.load(Ordering::Acquire),
        "connections closed with connection.close when serve returned"
    );
    let none_open = eventually(Duration::from_secs(5), || async {
        counts.open.load(Ordering::Acquire) == 0
    })
    .await;
    assert!(
        none_open,
        "{} connections still open",
        counts.open.load(Ordering::Acquire)
    );
    let broker_sees_none = eventually(Duration::from_secs(15), || async {
        broker_connections(&vhost).await == 0
    })
    .await;
    assert!(
        broker_sees_none,
        "the broker still lists warren's connections"
    );
}

/// The next JSON text frame (pings skipped), within 10 s.
async fn next_json(ws: &mut WsStream) -> serde_json::Value {
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10s")
            .expect("socket open")
            .expect("frame");
        if let Message::Text(text) = next {
            return serde_json::from_str(text.as_str()).expect("JSON");
        }
    }
}

/// Connections the broker lists on `vhost` (management API).
async fn broker_connections(vhost: &str) -> usize {
    let base = std::env::var("WARREN_TEST_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:15672".into());
    let listed: Vec<serde_json::Value> = reqwest::Client::new()
        .get(format!(
            "{base}/api/vhosts/{}/connections",
            vhost.replace('/', "%2F")
        ))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management API")
        .json()
        .await
        .expect("a connection list");
    listed.len()
}

#[derive(Default)]
struct Counts {
    /// Connections accepted from Warren.
    opened: AtomicUsize,
    /// Connections with either side still open.
    open: AtomicUsize,
    /// Connections on which Warren sent `connection.close`.
    closed_cleanly: AtomicUsize,
}

/// A TCP proxy in front of RabbitMQ that reads the client's AMQP frames, to tell a
/// connection Warren closed (`connection.close`) from one dropped with its runtime.
struct AmqpCountingProxy {
    port: u16,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

impl AmqpCountingProxy {
    async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let counts = Arc::new(Counts::default());
        let upstream = upstream.to_owned();
        let shared = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                shared.opened.fetch_add(1, Ordering::AcqRel);
                shared.open.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(relay(client, server, shared.clone()));
            }
        });
        Self { port, counts, task }
    }
}

impl Drop for AmqpCountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, server: TcpStream, counts: Arc<Counts>) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut frames = FrameReader::default();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if frames.feed(&buffer[..n]) {
                counts.closed_cleanly.fetch_add(1, Ordering::AcqRel);
            }
            if server_write.write_all(&buffer[..n]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    futures::join!(upstream, downstream);
    counts.open.fetch_sub(1, Ordering::AcqRel);
}

/// Splits the client's byte stream into AMQP 0-9-1 frames and spots `connection.close`
/// (a method frame on channel 0, class 10, method 50).
#[derive(Default)]
struct FrameReader {
    buffer: Vec<u8>,
    header_skipped: bool,
}

impl FrameReader {
    /// Takes in bytes; true when they complete a `connection.close`.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        self.buffer.extend_from_slice(bytes);
        if !self.header_skipped {
            if self.buffer.len() < 8 {
                return false;
            }
            self.buffer.drain(..8); // "AMQP" 0 0 9 1
            self.header_skipped = true;
        }
        let mut close = false;
        while self.buffer.len() >= 7 {
            let size = u32::from_be_bytes([
                self.buffer[3],
                self.buffer[4],
                self.buffer[5],
                self.buffer[6],
            ]) as usize;
            if self.buffer.len() < 7 + size + 1 {
                break;
            }
            let (kind, channel) = (
                self.buffer[0],
                u16::from_be_bytes([self.buffer[1], self.buffer[2]]),
            );
            if kind == 1 && channel == 0 && self.buffer[7..].starts_with(&[0, 10, 0, 50]) {
                close = true;
            }
            self.buffer.drain(..7 + size + 1);
        }
        close
    }
}
