//! SPEC §1 proved by breaking things on purpose: the broker link cut under load, a
//! queue rejecting publishes, SIGTERM with requests and sockets in flight, slow and
//! hostile clients, and thousands of idle connections. Every loop is bounded by time.
//! (The broker memory alarm and a broker restart change the shared broker, so they
//! live in `tests/solo` and run alone; see scripts/test.sh.)

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use crate::common::*;
use crate::load::*;

const BIN: &str = env!("CARGO_BIN_EXE_warren");

#[tokio::test]
async fn broker_link_cut_under_load_loses_no_acknowledged_message_and_recovers() {
    let proxy = ChaosProxy::start().await;
    let mut run = FaultRun::start(Some(proxy.url())).await;
    let cut_at = Instant::now();
    proxy.cut();
    run.broken(cut_at).await;
    tokio::time::sleep_until((cut_at + Duration::from_secs(3)).into()).await;
    run.healing();
    let restored_at = Instant::now();
    proxy.restore();
    run.healed(restored_at).await;
    run.check("link-cut").await;
}

#[tokio::test]
async fn reject_publish_overflow_answers_broker_rejected_and_keeps_every_acked_message() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(50));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let queue = durable_queue(&rabbit, &exchange, arguments).await;
    let tenant = unique("t");
    let server = TestServer::start_ready(tenant_config(&tenant, &exchange, "#")).await;
    let token = server.token(&tenant, "publish");

    let mut tasks = Vec::new();
    for client in 0..20u64 {
        let (http, base, token, exchange) = (
            server.http.clone(),
            server.base.clone(),
            token.clone(),
            exchange.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for n in 0..10u64 {
                let message_id = unique("m");
                let response = http
                    .post(format!("{base}/v1/publish"))
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .header("idempotency-key", unique("k"))
                    .body(load_body(&exchange, &message_id, client * 100 + n).to_string())
                    .send()
                    .await
                    .expect("answered");
                outcomes.push((message_id, into_resp(response).await));
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.extend(
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("publishes finish")
                .unwrap(),
        );
    }
    let mut acked = HashSet::new();
    let mut rejected = 0;
    for (id, r) in &outcomes {
        match (r.status, r.code()) {
            (202, _) => {
                acked.insert(id.clone());
            }
            (503, "broker_rejected") => {
                assert!(r.header("retry-after").is_some(), "{:?}", r.body);
                rejected += 1;
            }
            other => panic!("unexpected {other:?}: {:?}", r.body),
        }
    }
    assert_eq!(acked.len(), 50, "the queue takes 50, then rejects");
    assert_eq!(rejected, 150);
    let (in_queue, duplicates) = drain(&rabbit, &queue).await;
    assert_eq!(duplicates, 0);
    assert_eq!(
        in_queue, acked,
        "the queue holds exactly the acked messages"
    );
    server.shutdown().await.unwrap();
}

/// A `warren serve` child process, killed when dropped.
struct Process {
    child: Child,
    base: String,
    token: String,
    _dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Starts the binary on a free port with one tenant that may publish and subscribe
    /// anything, and waits until it is ready.
    async fn start(tenant: &str, grace_s: u64) -> Self {
        let port = closed_port().await;
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace_s = {grace_s}\n\
             [amqp]\nurl = \"{}\"\n[auth]\nhs256_secret = \"{SECRET}\"\n\
             [tenants.{tenant}]\nvhost = \"/\"\n\
             publish = [{{ exchange = \"*\", routing_key = \"#\" }}]\n\
             subscribe = [{{ exchange = \"*\", routing_key = \"#\" }}]\n",
            broker_url()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warren.toml");
        std::fs::write(&path, &text).unwrap();
        let config = warren::config::Config::from_toml(&text).unwrap();
        let resolved = config.resolve().unwrap();
        let token = warren::auth::mint(
            &config.auth,
            resolved.signing_secret.as_ref().unwrap(),
            &warren::auth::TokenRequest {
                tenant,
                subject: "tester",
                scope: "publish subscribe",
                ttl: Duration::from_secs(600),
            },
        )
        .unwrap();
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        // Keep draining the log so the child never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ERROR") || line.contains("panic") {
                    eprintln!("warren: {line}");
                }
            }
        });
        let process = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            token,
            _dir: dir,
        };
        let http = reqwest::Client::new();
        let ready = eventually(Duration::from_secs(20), || async {
            matches!(
                http.get(format!("{}/readyz", process.base)).send().await,
                Ok(r) if r.status() == 200
            )
        })
        .await;
        assert!(ready, "warren did not become ready");
        process
    }

    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// Reads until the close frame; its code, or `None` when the socket ended without one.
async fn ws_close_code(ws: &mut WsStream, within: Duration) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(CloseFrame { code, .. }))))) => {
                return Some(code.into());
            }
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

#[tokio::test]
async fn sigterm_under_load_answers_every_request_closes_sockets_1001_and_exits_0() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "#").await;
    let tenant = unique("t");
    let mut process = Process::start(&tenant, 5).await;
    let (base, token) = (process.base.clone(), process.token.clone());

    // A few sockets, each with a live subscription.
    let mut sockets = Vec::new();
    for i in 0..3 {
        let mut ws = ws_connect(&base, &token).await;
        let frame = json!({"type": "subscribe", "id": format!("s{i}"), "exchange": exchange,
                           "binding_key": "#", "mode": "live"});
        ws.send(Message::text(frame.to_string())).await.unwrap();
        sockets.push(ws);
    }
    // Requests whose bodies are still arriving when the signal comes: surely in flight.
    let body = load_body(&exchange, "pinned", 0).to_string();
    let (head, tail) = body.split_at(body.len() / 2);
    let mut senders = Vec::new();
    let mut pinned = Vec::new();
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
        tx.send(Ok(head.as_bytes().to_vec())).await.unwrap();
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let request = http
            .post(format!("{base}/v1/publish"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .header("content-length", body.len())
            .body(reqwest::Body::wrap_stream(stream));
        pinned.push(tokio::spawn(async move { request.send().await }));
        senders.push(tx);
    }
    // And a steady load from many clients.
    let stop = Arc::new(AtomicBool::new(false));
    let log = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let clients = spawn_load(&base, &token, &exchange, 20, stop.clone(), log.clone());
    let loaded = eventually(Duration::from_secs(10), || async {
        count_ok_since(&log, start) >= 100
    })
    .await;
    assert!(loaded, "no load before the signal");

    let signalled = Instant::now();
    process.terminate();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for tx in &senders {
        tx.send(Ok(tail.as_bytes().to_vec())).await.unwrap();
    }
    drop(senders);
    for request in pinned {
        let response = tokio::time::timeout(Duration::from_secs(10), request)
            .await
            .expect("pinned request finished")
            .unwrap()
            .expect("a request in flight at SIGTERM is answered, not reset");
        assert_eq!(response.status(), 202);
    }
    for ws in &mut sockets {
        assert_eq!(
            ws_close_code(ws, Duration::from_secs(5)).await,
            Some(1001),
            "sockets close with 1001 on shutdown"
        );
    }
    // The load clients stop once the listener is gone (bounded either way).
    let stopper = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        stopper.store(true, Ordering::Release);
    });
    let exit = loop {
        if let Some(exit) = process.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(7),
            "warren did not exit within the 5s grace period"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let exited_after = signalled.elapsed();
    assert!(exit.success(), "exit status {exit:?}");
    stop.store(true, Ordering::Release);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(20), client)
            .await
            .expect("client stops")
            .unwrap();
    }

    let log = log.lock().unwrap().clone();
    let before: Vec<&Outcome> = log.iter().filter(|o| o.started < signalled).collect();
    let unanswered: Vec<&&Outcome> = before.iter().filter(|o| o.status == 0).collect();
    assert!(
        unanswered.is_empty(),
        "requests sent before SIGTERM got no HTTP answer: {unanswered:?}"
    );
    for o in &log {
        assert!(
            matches!(o.status, 0 | 202 | 503),
            "unexpected answer during shutdown: {o:?}"
        );
    }
    let in_flight_at_signal = before
        .iter()
        .filter(|o| o.started + o.took > signalled)
        .count();
    let after = log.len() - before.len();
    let refused = log
        .iter()
        .filter(|o| o.started >= signalled && o.status == 0)
        .count();
    let acked: HashSet<&str> = log
        .iter()
        .filter(|o| o.status == 202)
        .map(|o| o.message_id.as_str())
        .collect();
    let mut in_queue = 0;
    for id in drain(&rabbit, &queue).await.0 {
        if acked.contains(id.as_str()) {
            in_queue += 1;
        }
    }
    assert_eq!(in_queue, acked.len(), "every acked publish is in the queue");
    eprintln!(
        "sigterm figures: requests={} before_signal={} in_flight_at_signal={in_flight_at_signal} \
         started_after_signal={after} refused_after_close={refused} exited_after={exited_after:?}",
        log.len(),
        before.len(),
    );
}

/// The status code of a raw HTTP/1.1 response on `stream` (0: closed without one).
async fn read_status(stream: &mut TcpStream, within: Duration) -> u16 {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => {
                buffer.extend_from_slice(&chunk[..n]);
                if buffer.windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&buffer);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn slow_and_hostile_clients_do_not_stop_others_being_served() {
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|config| {
        config.server.header_read_timeout_s = 2;
    })
    .await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let body = json!({"exchange": exchange, "routing_key": "k", "payload": 1}).to_string();

    // Slowloris: a few clients dribbling headers and then the body, a byte at a time.
    let request = format!(
        "POST /v1/publish HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let dribbling = Arc::new(AtomicBool::new(true));
    let mut slow = Vec::new();
    for _ in 0..5 {
        let (addr, request, dribbling) = (addr.clone(), request.clone(), dribbling.clone());
        slow.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(&addr).await.unwrap();
            for byte in request.as_bytes() {
                if !dribbling.load(Ordering::Acquire) {
                    break;
                }
                if stream.write_all(&[*byte]).await.is_err() {
                    return "closed by the server";
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            "still open"
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let publish = json!({"exchange": exchange, "routing_key": "k", "payload": 2});
    for _ in 0..5 {
        let started = Instant::now();
        let r = server.publish(&token, &publish).await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a normal publish took {:?} next to slow clients",
            started.elapsed()
        );
    }
    dribbling.store(false, Ordering::Release);
    for task in slow {
        let _ = task.await.unwrap();
    }

    // A 100 KB header: a 4xx (or the connection refused), never a crash.
    let huge = "a".repeat(100 * 1024);
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let raw = format!(
        "POST /v1/publish HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\
         x-junk: {huge}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(raw.as_bytes()).await;
    let status = read_status(&mut stream, Duration::from_secs(5)).await;
    assert!(
        (400..500).contains(&status),
        "a 100 KB header got {status}, not a 4xx"
    );
    // A 1 MB header too.
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    let raw = format!(
        "GET /healthz HTTP/1.1\r\nhost: {addr}\r\nx-junk: {}\r\n\r\n",
        "b".repeat(1024 * 1024)
    );
    let _ = stream.write_all(raw.as_bytes()).await;
    let status = read_status(&mut stream, Duration::from_secs(5)).await;
    assert!(
        status == 0 || (400..500).contains(&status),
        "a 1 MB header got {status}"
    );

    // Headers that never finish are cut off after server.header_read_timeout_s (2 s
    // here) instead of holding the connection forever (hyper's clock, which starts at
    // a request's first byte; the idle connections below are Warren's own timer).
    let opened = Instant::now();
    let mut dribbler = TcpStream::connect(&addr).await.unwrap();
    let mut closed_by_server = false;
    for byte in request.as_bytes().iter().cycle().take(200) {
        if dribbler.write_all(&[*byte]).await.is_err() {
            closed_by_server = true;
            break;
        }
        let mut probe = [0u8; 64];
        match dribbler.try_read(&mut probe) {
            Ok(_) => {
                closed_by_server = true;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => {
                closed_by_server = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dribbler_closed_after = opened.elapsed();
    assert!(closed_by_server, "a slow header was never cut off");
    assert!(
        dribbler_closed_after < Duration::from_millis(4500),
        "a slow header was cut off only after {dribbler_closed_after:?}"
    );
    eprintln!("header-timeout figures: slow header cut off after {dribbler_closed_after:?}");

    // A connection that never sends a byte, and a keep-alive one left idle after its
    // answer, are closed after the same timeout (2 s here), not held forever.
    let silent_at = Instant::now();
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let mut keep_alive = TcpStream::connect(&addr).await.unwrap();
    let health = format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    keep_alive.write_all(health.as_bytes()).await.unwrap();
    assert_eq!(
        read_status(&mut keep_alive, Duration::from_secs(5)).await,
        200
    );
    let answered_at = Instant::now();
    for (name, stream, since) in [
        ("silent", &mut silent, silent_at),
        ("idle keep-alive", &mut keep_alive, answered_at),
    ] {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(6), stream.read_to_end(&mut rest))
            .await
            .is_ok();
        let after = since.elapsed();
        assert!(closed, "a {name} connection was still open after 6 s");
        assert!(
            after >= Duration::from_millis(1500) && after < Duration::from_millis(4500),
            "a {name} connection closed after {after:?} (timeout 2 s)"
        );
        eprintln!("idle-timeout figures: {name} connection closed after {after:?}");
    }

    // Still alive and serving.
    let r = server.publish(&token, &publish).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(server.get("/healthz").await.status, 200);
    assert_eq!(rabbit.wait_count(&queue, 6).await, 6);
    server.shutdown().await.unwrap();
}

/// The soft limit on open files, from /proc (no libc needed).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

#[tokio::test]
async fn ten_thousand_idle_connections_do_not_stop_a_normal_client() {
    const IDLE: usize = 10_000;
    // The server runs as its own process (it inherits this limit), so each side
    // needs IDLE descriptors plus some headroom.
    match open_files_limit() {
        Some(limit) if limit as usize >= IDLE + 500 => {}
        other => {
            eprintln!(
                "SKIPPED ten_thousand_idle_connections: the open-files limit {other:?} is below {}",
                IDLE + 500
            );
            return;
        }
    }
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "#").await;
    let tenant = unique("t");
    let process = Process::start(&tenant, 2).await;
    let addr = process.base.trim_start_matches("http://").to_owned();

    let opened_at = Instant::now();
    // Opened 100 at a time; all are open well within the header read timeout (30 s)
    // that would otherwise close them.
    let connecting = futures::stream::iter(0..IDLE)
        .map(|_| TcpStream::connect(addr.as_str()))
        .buffer_unordered(100)
        .collect::<Vec<_>>();
    let idle: Vec<TcpStream> = tokio::time::timeout(Duration::from_secs(60), connecting)
        .await
        .expect("the idle connections opened in time")
        .into_iter()
        .map(|c| c.expect("connection accepted"))
        .collect();
    assert_eq!(idle.len(), IDLE);
    let opened = opened_at.elapsed();

    let http = reqwest::Client::new();
    let body = json!({"exchange": exchange, "routing_key": "k", "payload": 1});
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let started = Instant::now();
        let response = http
            .post(format!("{}/v1/publish", process.base))
            .bearer_auth(&process.token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .expect("served next to 10,000 idle connections");
        assert_eq!(response.status(), 202);
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(2),
        "a publish took {slowest:?}"
    );
    // The idle connections are still open (not reaped by an error).
    let mut probe = [0u8; 1];
    let alive = idle
        .iter()
        .take(100)
        .filter(|s| matches!(s.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock))
        .count();
    eprintln!(
        "idle-connections figures: opened {IDLE} in {opened:?}, slowest publish {slowest:?}, \
         {alive}/100 sampled still open"
    );
    drop(idle);
    assert_eq!(rabbit.wait_count(&queue, 5).await, 5);
    drop(process);
}
