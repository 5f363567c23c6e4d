//! Poison messages (security issue #13): a delivery whose header table nests as deep as
//! the broker's frame_max allows, published by a foreign AMQP producer straight into an
//! exchange Warren consumes, must not take the process down. It is not forwarded, the
//! durable copy is dead-lettered (never requeued), it is counted, and service goes on.
//!
//! The publisher here speaks AMQP 0-9-1 over a raw socket: lapin's own encoder (like its
//! parser) recurses per nesting level, and the test's lapin client would overflow too.
//! For the same reason the test never reads a poison message back with lapin.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::QueueDeleteOptions;
use lapin::types::FieldTable;
use serde_json::{Value, json};

use crate::common::*;
use crate::ws::send;

/// RabbitMQ's default frame_max (3.x). The broker lets a publisher send a frame whose
/// *payload* is up to frame_max, 8 bytes more than the spec's bound on the whole frame
/// (Warren's patched lapin accepts the same, see vendor/lapin/PATCHED.md).
const BROKER_FRAME_MAX: usize = 131_072;
/// Frame header (7) and frame end (1).
const FRAME_OVERHEAD: usize = 8;

/// The nesting shapes that cost the fewest bytes per level.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// `A <len>` per level: 5 bytes.
    Arrays,
    /// `F <len> <empty key>` per level: 6 bytes (the broker accepts empty keys).
    Tables,
}

/// One value nested `depth` containers deep, encoded inside out (no recursion).
fn nested(shape: Shape, depth: usize) -> Vec<u8> {
    let mut value: Vec<u8> = Vec::new();
    for _ in 0..depth {
        let mut out = Vec::with_capacity(value.len() + 6);
        match shape {
            Shape::Arrays => {
                out.push(b'A');
                out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            }
            Shape::Tables => {
                out.push(b'F');
                let entry = if value.is_empty() { 0 } else { value.len() + 1 };
                out.extend_from_slice(&(entry as u32).to_be_bytes());
                if !value.is_empty() {
                    out.push(0); // empty key
                }
            }
        }
        out.extend_from_slice(&value);
        value = out;
    }
    value
}

/// A `headers` table `{"p": <value nested depth deep>}`, with its length prefix.
fn headers(shape: Shape, depth: usize) -> Vec<u8> {
    let value = nested(shape, depth);
    let mut table = Vec::with_capacity(value.len() + 6);
    table.extend_from_slice(&((value.len() + 2) as u32).to_be_bytes());
    table.extend_from_slice(&[1, b'p']);
    table.extend_from_slice(&value);
    table
}

/// The size of the content header frame carrying `headers(shape, depth)`.
fn header_frame_len(shape: Shape, depth: usize) -> usize {
    // frame header 7 + class 2 + weight 2 + body size 8 + flags 2 + table + frame end 1
    7 + 14 + headers(shape, depth).len() + 1
}

/// The deepest nesting whose content header frame fits in `frame_max`.
fn max_depth(shape: Shape, frame_max: usize) -> usize {
    let per_level = match shape {
        Shape::Arrays => 5,
        Shape::Tables => 6,
    };
    let mut depth = (frame_max - 28) / per_level + 1;
    while header_frame_len(shape, depth) > frame_max {
        depth -= 1;
    }
    depth
}

/// A minimal AMQP 0-9-1 publisher with confirms on a blocking socket.
struct RawPublisher {
    socket: TcpStream,
}

fn short(s: &str) -> Vec<u8> {
    let mut out = vec![s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut out = class.to_be_bytes().to_vec();
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(args);
    out
}

impl RawPublisher {
    fn connect() -> std::io::Result<Self> {
        let socket = TcpStream::connect(broker_addr())?;
        socket.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut this = Self { socket };
        this.socket.write_all(b"AMQP\x00\x00\x09\x01")?;
        this.expect(10, 10)?; // connection.start
        let mut start_ok = 0u32.to_be_bytes().to_vec(); // no client properties
        start_ok.extend(short("PLAIN"));
        let response = b"\0guest\0guest";
        start_ok.extend_from_slice(&(response.len() as u32).to_be_bytes());
        start_ok.extend_from_slice(response);
        start_ok.extend(short("en_US"));
        this.send(1, 0, &method(10, 11, &start_ok))?;
        let tune = this.expect(10, 30)?;
        let mut tune_ok = tune[0..6].to_vec(); // channel_max, frame_max as offered
        tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        this.send(1, 0, &method(10, 31, &tune_ok))?;
        let mut open = short("/");
        open.extend(short(""));
        open.push(0);
        this.send(1, 0, &method(10, 40, &open))?;
        this.expect(10, 41)?;
        this.send(1, 1, &method(20, 10, &short("")))?;
        this.expect(20, 11)?;
        this.send(1, 1, &method(85, 10, &[0]))?; // confirm.select
        this.expect(85, 11)?;
        Ok(this)
    }

    fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(0xCE);
        self.socket.write_all(&frame)
    }

    /// The next method frame as (class, method, arguments); other frames are skipped.
    fn next_method(&mut self) -> std::io::Result<(u16, u16, Vec<u8>)> {
        loop {
            let mut head = [0u8; 7];
            self.socket.read_exact(&mut head)?;
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            self.socket.read_exact(&mut payload)?;
            if head[0] == 1 && size >= 4 {
                let class = u16::from_be_bytes([payload[0], payload[1]]);
                let id = u16::from_be_bytes([payload[2], payload[3]]);
                payload.truncate(size);
                return Ok((class, id, payload[4..].to_vec()));
            }
        }
    }

    fn expect(&mut self, class: u16, id: u16) -> std::io::Result<Vec<u8>> {
        let (c, m, args) = self.next_method()?;
        if (c, m) != (class, id) {
            return Err(std::io::Error::other(format!(
                "expected {class}.{id}, got {c}.{m}: {}",
                String::from_utf8_lossy(&args)
            )));
        }
        Ok(args)
    }

    /// Publishes and waits for the confirm: `Ok(())` when the broker acked it, the
    /// broker's refusal (connection or channel close) otherwise.
    fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        properties: &Properties,
        body: &[u8],
    ) -> Result<(), String> {
        let mut args = 0u16.to_be_bytes().to_vec();
        args.extend(short(exchange));
        args.extend(short(routing_key));
        args.push(0);
        let mut header = 60u16.to_be_bytes().to_vec();
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        header.extend_from_slice(&properties.flags.to_be_bytes());
        header.extend_from_slice(&properties.encoded);
        let sent = self
            .send(1, 1, &method(60, 40, &args))
            .and_then(|()| self.send(2, 1, &header))
            .and_then(|()| self.send(3, 1, body));
        sent.map_err(|e| format!("send: {e}"))?;
        match self.next_method() {
            Ok((60, 80, _)) => Ok(()),
            Ok((c, m, args)) => Err(format!("{c}.{m}: {}", String::from_utf8_lossy(&args))),
            Err(e) => Err(format!("read: {e}")),
        }
    }
}

/// Encoded basic properties: the property flags and the present properties in order.
struct Properties {
    flags: u16,
    encoded: Vec<u8>,
}

impl Properties {
    /// Only `headers`, given as an encoded table.
    fn headers(table: Vec<u8>) -> Self {
        Self {
            flags: 0x2000,
            encoded: table,
        }
    }

    /// Only `content-type`, as raw bytes (the broker does not check they are UTF-8).
    fn content_type(raw: &[u8]) -> Self {
        let mut encoded = vec![raw.len() as u8];
        encoded.extend_from_slice(raw);
        Self {
            flags: 0x8000,
            encoded,
        }
    }
}

/// Publishes one message with the given headers from a blocking thread.
async fn raw_publish(exchange: &str, routing_key: &str, headers: Vec<u8>) -> Result<(), String> {
    raw_publish_with(exchange, routing_key, Properties::headers(headers)).await
}

async fn raw_publish_with(
    exchange: &str,
    routing_key: &str,
    properties: Properties,
) -> Result<(), String> {
    let (exchange, routing_key) = (exchange.to_owned(), routing_key.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut publisher = RawPublisher::connect().map_err(|e| format!("connect: {e}"))?;
        publisher.publish(&exchange, &routing_key, &properties, b"poison")
    })
    .await
    .map_err(|e| format!("publisher thread: {e}"))?
}

/// The next JSON frame (pings skipped), or panic after 15 s.
async fn recv(ws: &mut WsStream) -> Value {
    crate::ws::recv_within(ws, Duration::from_secs(15)).await
}

async fn poison_count(server: &TestServer, mode: &str) -> u64 {
    let prefix = format!("warren_poison_messages_total{{mode=\"{mode}\"");
    server
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A management-API policy that dead-letters the tenant's durable queues.
async fn dead_letter_policy(name: &str, pattern: &str, dlx: &str, put: bool) -> u16 {
    let base = std::env::var("WARREN_TEST_MANAGEMENT_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:15672".into());
    let url = format!("{base}/api/policies/%2F/{name}");
    let http = reqwest::Client::new();
    let request = if put {
        http.put(url).json(&json!({
            "pattern": pattern, "apply-to": "queues", "priority": 100,
            "definition": {"dead-letter-exchange": dlx}
        }))
    } else {
        http.delete(url)
    };
    request
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .expect("management API")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_nested_headers_are_rejected_and_service_continues() {
    // The deepest nesting a publisher gets through the broker, per shape.
    let array_depth = max_depth(Shape::Arrays, BROKER_FRAME_MAX + FRAME_OVERHEAD);
    let table_depth = max_depth(Shape::Tables, BROKER_FRAME_MAX + FRAME_OVERHEAD);
    assert_eq!((array_depth, table_depth), (26_210, 21_842));

    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let tenant = unique("t");
    let neighbour = unique("n");
    let server = TestServer::start_ready(config(&format!(
        "[tenants.{tenant}]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}]\n\
         subscribe = [{{ exchange = \"{exchange}\", routing_key = \"order.#\" }}]\n\
         [tenants.{neighbour}]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}]\n"
    )))
    .await;
    let token = server.token(&tenant, "publish subscribe");
    let neighbour_token = server.token(&neighbour, "publish");

    // That is the broker's bound: one level more is refused.
    for (shape, depth) in [(Shape::Arrays, array_depth), (Shape::Tables, table_depth)] {
        assert!(header_frame_len(shape, depth) > BROKER_FRAME_MAX);
        let refused = raw_publish(&exchange, "nowhere", headers(shape, depth + 1)).await;
        let refusal = refused.expect_err("a payload over frame_max is refused");
        assert!(
            refusal.starts_with("10.50") || refusal.starts_with("read:"),
            "{shape:?}: {refusal}"
        );
    }

    // Durable subscriptions' queues dead-letter into `dlq`.
    let dlx = rabbit.exchange(lapin::ExchangeKind::Fanout).await;
    let dlq = rabbit.queue(FieldTable::default()).await;
    rabbit.bind(&dlq, &dlx, "").await;
    let policy = unique("poison-dlx");
    let pattern = format!("^warren\\.{tenant}\\.");
    assert!(dead_letter_policy(&policy, &pattern, &dlx, true).await < 300);

    let mut ws = ws_connect(&server.base, &token).await;
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "s1", "exchange": exchange,
        "binding_key": "order.*", "mode": "live"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    let name = unique("billing");
    send(
        &mut ws,
        json!({"type": "subscribe", "id": "d1", "exchange": exchange,
        "binding_key": "order.#", "mode": "durable", "queue": name, "prefetch": 10}),
    )
    .await;
    let answer = recv(&mut ws).await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    let queue = answer["queue"].as_str().unwrap().to_owned();
    // Policies apply asynchronously; wait until the durable queue has it.
    let applied = eventually(Duration::from_secs(10), || async {
        let url = format!("http://127.0.0.1:15672/api/queues/%2F/{queue}");
        let info: Value = match reqwest::Client::new()
            .get(url)
            .basic_auth("guest", Some("guest"))
            .send()
            .await
        {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        };
        info["policy"] == json!(policy)
    })
    .await;
    assert!(applied, "the dead-letter policy applies to {queue}");

    let live_before = poison_count(&server, "live").await;
    let durable_before = poison_count(&server, "durable").await;

    // A neighbouring tenant keeps publishing over REST the whole time.
    let neighbour_publishes = {
        let (http, base, exchange) = (server.http.clone(), server.base.clone(), exchange.clone());
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for n in 0..40 {
                let status = http
                    .post(format!("{base}/v1/publish"))
                    .bearer_auth(&neighbour_token)
                    .json(&json!({"exchange": exchange, "routing_key": "neighbour.x",
                        "payload": {"n": n}, "mandatory": false}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0);
                statuses.push(status);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            statuses
        })
    };

    // The poison: both worst-case shapes, into the live and the durable subscription
    // (their frames are 6 and 7 bytes over frame_max, which the broker accepts).
    for (shape, depth) in [(Shape::Arrays, array_depth), (Shape::Tables, table_depth)] {
        raw_publish(&exchange, "order.poison", headers(shape, depth))
            .await
            .unwrap_or_else(|e| panic!("the broker accepts {shape:?} x {depth}: {e}"));
    }
    // One just over Warren's bound, and one within it (forwarded, nested 8 deep).
    raw_publish(&exchange, "order.poison", headers(Shape::Arrays, 65))
        .await
        .unwrap();
    raw_publish(&exchange, "order.fine", headers(Shape::Tables, 8))
        .await
        .unwrap();
    // Not UTF-8 where AMQP says "short string": the broker passes it on as it is.
    raw_publish_with(
        &exchange,
        "order.latin1",
        Properties::content_type(b"text/plain; charset=\xe9"),
    )
    .await
    .unwrap();

    let poisoned = eventually(Duration::from_secs(15), || async {
        poison_count(&server, "live").await >= live_before + 3
            && poison_count(&server, "durable").await >= durable_before + 3
    })
    .await;
    assert!(poisoned, "three poison deliveries counted per mode");
    assert_eq!(server.get("/healthz").await.status, 200);

    // The same subscriptions still deliver, and nothing poisoned reached the socket.
    let r = server
        .publish(
            &token,
            &json!({"exchange": exchange, "routing_key": "order.ok", "payload": {"ok": true}}),
        )
        .await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let mut seen = Vec::new();
    while seen.len() < 6 {
        let frame = recv(&mut ws).await;
        assert_eq!(frame["type"], "message", "{frame}");
        assert_ne!(
            frame["routing_key"], "order.poison",
            "poison is not forwarded"
        );
        seen.push((
            frame["subscription"].as_str().unwrap().to_owned(),
            frame["routing_key"].as_str().unwrap().to_owned(),
        ));
        if frame["subscription"] == "d1" {
            assert_eq!(frame["redelivered"], false);
            send(
                &mut ws,
                json!({"type": "ack", "subscription": "d1",
                "delivery_tag": frame["delivery_tag"]}),
            )
            .await;
        }
        if frame["routing_key"] == "order.latin1" {
            assert_eq!(
                frame["properties"]["content_type"], "text/plain; charset=\u{fffd}",
                "delivered, with the bad byte replaced"
            );
            assert_eq!(frame["body_base64"], "cG9pc29u");
        }
        if frame["routing_key"] == "order.fine" {
            let depth = {
                let mut value = &frame["properties"]["headers"]["p"];
                let mut depth = 0;
                while let Some(inner) = value.as_object().and_then(|o| o.values().next()) {
                    depth += 1;
                    value = inner;
                }
                depth + 1
            };
            assert_eq!(depth, 8, "{frame}");
        }
    }
    seen.sort();
    let expected: Vec<(String, String)> = [
        ("d1", "order.fine"),
        ("d1", "order.latin1"),
        ("d1", "order.ok"),
        ("s1", "order.fine"),
        ("s1", "order.latin1"),
        ("s1", "order.ok"),
    ]
    .iter()
    .map(|(s, k)| (s.to_string(), k.to_string()))
    .collect();
    assert_eq!(seen, expected);
    let extra = tokio::time::timeout(Duration::from_millis(500), ws.next()).await;
    assert!(extra.is_err(), "no redelivery of the poison: {extra:?}");

    // The durable poison left its queue for the dead-letter queue, never requeued.
    assert_eq!(rabbit.wait_count(&queue, 0).await, 0);
    assert_eq!(rabbit.wait_count(&dlq, 3).await, 3, "dead-lettered");

    let statuses = neighbour_publishes.await.unwrap();
    assert!(
        statuses.iter().all(|s| *s == 202),
        "the neighbour kept publishing: {statuses:?}"
    );
    assert_eq!(server.get("/healthz").await.status, 200);
    assert_eq!(server.get("/readyz").await.status, 200);

    ws.close(None).await.unwrap();
    let _ = dead_letter_policy(&policy, "", "", false).await;
    let _ = rabbit
        .channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    server.shutdown().await.unwrap();
}
