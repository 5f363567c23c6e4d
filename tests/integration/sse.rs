//! Server-sent events (`GET /v1/events`, SPEC §9) over raw HTTP clients against real
//! RabbitMQ streams: resume with `Last-Event-ID`, live events, problems before the
//! stream starts, token expiry, shutdown, and a slow reader cut while a fast one
//! keeps up.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren::auth::TokenRequest;

use crate::common::*;
use crate::streams::StreamWorld;

/// Request headers as (name, value) pairs.
type Headers<'a> = &'a [(&'a str, &'a str)];

/// One parsed event.
#[derive(Debug, Clone)]
struct Event {
    id: Option<String>,
    event: String,
    data: Value,
}

/// Reads events from a `text/event-stream` response.
struct Events {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
    /// `retry:` values and comments seen.
    retry: Option<u64>,
    comments: usize,
}

impl Events {
    fn new(response: reqwest::Response) -> Self {
        Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
            retry: None,
            comments: 0,
        }
    }

    /// The next event, or `None` when the response ended (or `within` passed).
    async fn next(&mut self, within: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            // As a browser reads it: a line ends at CRLF, CR or LF (a CR at the end of
            // the buffer waits for the next chunk, which may start with its LF).
            let complete = self.buffer.len() - usize::from(self.buffer.ends_with('\r'));
            let (head, tail) = self.buffer.split_at(complete);
            let normalised = head.replace("\r\n", "\n").replace('\r', "\n");
            self.buffer = normalised + tail;
            while let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = Event {
                    id: None,
                    event: "message".to_owned(),
                    data: Value::Null,
                };
                let mut data: Option<String> = None;
                for line in block.lines() {
                    if let Some(comment) = line.strip_prefix(':') {
                        let _ = comment;
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("retry: ") {
                        self.retry = v.parse().ok();
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        event.id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        v.clone_into(&mut event.event);
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        // Several data lines are one field, joined with LF.
                        data = Some(match data {
                            Some(before) => format!("{before}\n{v}"),
                            None => v.to_owned(),
                        });
                    }
                }
                if let Some(data) = data {
                    event.data = serde_json::from_str(&data)
                        .unwrap_or_else(|e| panic!("data is JSON ({e}): {data:?}"));
                    return Some(event);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next()).await;
            match chunk {
                Ok(Some(Ok(bytes))) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    /// `count` message events: (id, offset, n) each.
    async fn messages(&mut self, count: usize) -> Vec<(u64, u64)> {
        let mut seen = Vec::with_capacity(count);
        while seen.len() < count {
            let event = self
                .next(Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("event {} of {count}", seen.len()));
            assert_eq!(event.event, "message", "{event:?}");
            let offset = event.data["offset"].as_u64().expect("an offset");
            assert_eq!(event.id, Some(offset.to_string()), "id: is the offset");
            seen.push((offset, event.data["payload"]["n"].as_u64().expect("n")));
        }
        seen
    }
}

async fn open(world: &StreamWorld, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = world
        .server
        .http
        .get(format!("{}/v1/events?{query}", world.server.base))
        .header("accept", "text/event-stream");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.expect("request")
}

#[tokio::test]
async fn last_event_id_resumes_a_stream_and_live_events_carry_the_message_id() {
    let grants = r#"{ stream = "log" }, { exchange = "*", routing_key = "order.#" }"#;
    let world = StreamWorld::start(grants, "").await;
    world.stream("log").await;
    world.publish("", "log", 0..300).await;
    let bearer = format!("Bearer {}", world.token);

    let response = open(
        &world,
        "stream=log&offset=first",
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(response.status(), 200);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("content-type").as_deref(), Some("text/event-stream"));
    assert_eq!(header("cache-control").as_deref(), Some("no-cache"));
    assert_eq!(header("x-accel-buffering").as_deref(), Some("no"));
    let mut events = Events::new(response);
    let first = events.messages(120).await;
    assert_eq!(first, (0..120).map(|n| (n, n)).collect::<Vec<_>>());
    assert!(events.retry.is_some(), "retry: is set");
    drop(events);

    // Reconnect as an EventSource does: the token in the query, Last-Event-ID set.
    let query = format!("stream=log&access_token={}", world.token);
    let response = open(&world, &query, &[("last-event-id", "119")]).await;
    assert_eq!(response.status(), 200);
    let mut events = Events::new(response);
    let rest = events.messages(180).await;
    assert_eq!(rest, (120..300).map(|n| (n, n)).collect::<Vec<_>>());
    let extra = events.next(Duration::from_millis(300)).await;
    assert!(extra.is_none(), "nothing twice: {extra:?}");

    // Live: the id is the message id, the data the WebSocket message frame.
    let exchange = world.rabbit.topic_exchange().await;
    let query = format!("exchange={exchange}&binding_key=order.*");
    let response = open(&world, &query, &[("authorization", &bearer)]).await;
    assert_eq!(response.status(), 200);
    let mut events = Events::new(response);
    let published = async {
        // The live queue is bound once the headers are out; keep publishing until the
        // subscriber sees one (live is at-most-once from when it joined).
        for n in 0..50 {
            world.publish(&exchange, "order.created", n..n + 1).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let received = async { events.next(Duration::from_secs(10)).await };
    let event = tokio::select! {
        event = received => event,
        () = published => None,
    }
    .expect("a live event");
    assert_eq!(event.event, "message");
    let n = event.data["payload"]["n"].as_u64().expect("n");
    assert_eq!(event.id, Some(format!("m-{n}")));
    assert_eq!(event.data["type"], "message");
    assert_eq!(event.data["routing_key"], "order.created");
    assert!(event.data.get("offset").is_none());
}

#[tokio::test]
async fn a_payload_with_line_breaks_in_its_whitespace_stays_one_well_formed_event() {
    use lapin::BasicProperties;
    use lapin::options::BasicPublishOptions;
    let world = StreamWorld::start(r#"{ stream = "log" }"#, "").await;
    world.stream("log").await;
    // Valid JSON, forwarded byte for byte: the blank line would end an event early.
    for body in ["{\"n\":\r\n\r\n0}", "{\"n\":\n\n1}", "{\"n\":\r\r2}"] {
        world
            .rabbit
            .channel
            .basic_publish(
                "".into(),
                "log".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_message_id("m".into()),
            )
            .await
            .expect("publish");
    }
    let bearer = format!("Bearer {}", world.token);
    for format in ["warren", "cloudevents"] {
        let query = format!("stream=log&offset=first&format={format}");
        let response = open(&world, &query, &[("authorization", &bearer)]).await;
        assert_eq!(response.status(), 200);
        let mut events = Events::new(response);
        for n in 0..3u64 {
            let event = events
                .next(Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("{format}: event {n}"));
            assert_eq!(event.event, "message", "{event:?}");
            let payload = match format {
                "warren" => &event.data["payload"],
                _ => &event.data["event"]["data"],
            };
            assert_eq!(payload["n"], n, "{format}: {event:?}");
        }
    }
}

#[tokio::test]
async fn a_transient_failure_is_an_event_stream_an_event_source_retries_a_permanent_one_is_not() {
    let port = closed_port().await;
    let mut config = config(
        "[tenants.acme]\nvhost = \"/\"\nsubscribe = [{ stream = \"log\" }]\n[sse]\nretry_ms = 250\n",
    );
    config.amqp.url = Some(format!("amqp://guest:guest@127.0.0.1:{port}"));
    let server = TestServer::start(config).await;
    let token = server.token("acme", "subscribe");
    let get = |accept: Option<&'static str>, token: String| {
        let mut request = server.http.get(format!(
            "{}/v1/events?stream=log&access_token={token}",
            server.base
        ));
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        request.send()
    };
    // What an EventSource gets while the broker is down: a 200 event stream that sets
    // `retry:` and says why, then ends, so the browser comes back by itself.
    let response = get(Some("text/event-stream"), token.clone())
        .await
        .expect("request");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let mut events = Events::new(response);
    let event = events
        .next(Duration::from_secs(5))
        .await
        .expect("an error event");
    assert_eq!(event.event, "error");
    assert_eq!(event.data["code"], "broker_unavailable", "{event:?}");
    assert!(
        events.retry.is_some_and(|ms| ms >= 250),
        "{:?}",
        events.retry
    );
    assert!(
        events.next(Duration::from_secs(2)).await.is_none(),
        "the stream ends"
    );
    // Any other reader gets the problem.
    let plain = into_resp(get(None, token.clone()).await.expect("request")).await;
    assert_problem(&plain, 503, "broker_unavailable");
    // Permanent failures stay problems, so an EventSource stops on them.
    let denied = into_resp(
        get(Some("text/event-stream"), "not-a-token".into())
            .await
            .expect("request"),
    )
    .await;
    assert_problem(&denied, 401, "unauthorized");
    let forbidden = server.token("acme", "publish");
    let denied = into_resp(
        get(Some("text/event-stream"), forbidden)
            .await
            .expect("request"),
    )
    .await;
    assert_problem(&denied, 403, "forbidden");
}

#[tokio::test]
async fn problems_before_the_stream_starts() {
    let grants = r#"{ stream = "log", routing_key = "order.#" }, { stream = "ghost" }"#;
    let world = StreamWorld::start(grants, "").await;
    world.stream("log").await;
    world.stream("secret").await;
    let bearer = format!("Bearer {}", world.token);
    let auth: &[(&str, &str)] = &[("authorization", &bearer)];
    let cases: [(&str, Headers, u16, &str); 10] = [
        ("stream=log&binding_key=order.*", &[], 401, "unauthorized"),
        ("stream=log&access_token=nope", &[], 401, "unauthorized"),
        ("stream=secret", auth, 403, "forbidden"),
        ("stream=log", auth, 403, "forbidden"),
        ("stream=log&binding_key=%23", auth, 403, "forbidden"),
        ("stream=ghost", auth, 404, "stream_not_found"),
        (
            "stream=log&exchange=e&binding_key=order.x",
            auth,
            400,
            "invalid_request",
        ),
        (
            "stream=log&binding_key=order.x&offset=soon",
            auth,
            400,
            "invalid_request",
        ),
        ("exchange=e", auth, 400, "invalid_request"),
        ("", auth, 400, "invalid_request"),
    ];
    for (query, headers, status, code) in cases {
        let r = into_resp(open(&world, query, headers).await).await;
        assert_eq!(
            (r.status, r.code()),
            (status, code),
            "{query}: {:?}",
            r.body
        );
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
    }
    let headers: &[(&str, &str)] = &[("authorization", &bearer), ("last-event-id", "x")];
    let r = into_resp(open(&world, "stream=log&binding_key=order.*", headers).await).await;
    assert_problem(&r, 400, "invalid_request");
}

#[tokio::test]
async fn event_streams_per_tenant_are_limited() {
    let extra = "[sse]\nmax_connections_per_tenant = 1\nkeepalive_s = 1\n";
    let world = StreamWorld::start(r#"{ stream = "log" }"#, extra).await;
    world.stream("log").await;
    let bearer = format!("Bearer {}", world.token);
    let first = open(&world, "stream=log", &[("authorization", &bearer)]).await;
    assert_eq!(first.status(), 200);
    // Without `Accept: text/event-stream`, the limit is a problem.
    let plain = || {
        world
            .server
            .http
            .get(format!("{}/v1/events?stream=log", world.server.base))
            .header("authorization", &bearer)
            .send()
    };
    let second = into_resp(plain().await.expect("request")).await;
    assert_problem(&second, 429, "rate_limited");
    assert!(second.header("retry-after").is_some());
    // An EventSource gets it as an event stream to retry after (Retry-After: 5 s).
    let limited = open(&world, "stream=log", &[("authorization", &bearer)]).await;
    assert_eq!(limited.status(), 200);
    let mut events = Events::new(limited);
    let event = events
        .next(Duration::from_secs(5))
        .await
        .expect("an error event");
    assert_eq!(
        (event.event.as_str(), &event.data["code"]),
        ("error", &"rate_limited".into())
    );
    assert_eq!(events.retry, Some(5000));
    drop(first);
    // The server notices the closed connection at its next write (a keep-alive).
    let again = eventually(Duration::from_secs(10), || async {
        plain().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(again, "the slot is given back when the response is dropped");
}

#[tokio::test]
async fn token_expiry_and_shutdown_end_the_stream_with_an_error_event() {
    let world = StreamWorld::start(r#"{ stream = "log" }"#, "").await;
    world.stream("log").await;
    world.publish("", "log", 0..3).await;
    let short = world.server.token_with(&TokenRequest {
        tenant: &world.tenant,
        subject: "tester",
        scope: "subscribe",
        ttl: Duration::from_secs(2),
    });
    let query = format!("stream=log&offset=first&access_token={short}");
    let mut expiring = Events::new(open(&world, &query, &[]).await);
    assert_eq!(expiring.messages(3).await.len(), 3);
    let end = expiring
        .next(Duration::from_secs(10))
        .await
        .expect("an error event");
    assert_eq!(end.event, "error");
    assert_eq!(end.data["code"], "unauthorized", "{end:?}");
    assert!(
        expiring.next(Duration::from_secs(2)).await.is_none(),
        "then the end"
    );

    let bearer = format!("Bearer {}", world.token);
    let mut open_stream =
        Events::new(open(&world, "stream=log", &[("authorization", &bearer)]).await);
    // Headers are out, so the subscription exists; now shut the gateway down.
    let StreamWorld {
        mut server,
        rabbit: _rabbit,
        admin: _admin,
        ..
    } = world;
    server.trigger_shutdown();
    let end = open_stream
        .next(Duration::from_secs(10))
        .await
        .expect("an error event");
    assert_eq!(end.event, "error");
    assert_eq!(end.data["code"], "broker_unavailable", "{end:?}");
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.join()).await;
    assert!(
        stopped.is_ok(),
        "shutdown does not hang on an open event stream"
    );
}

#[tokio::test]
async fn a_slow_reader_is_cut_while_a_fast_one_keeps_up() {
    let extra =
        "[sse]\nslow_reader_timeout_ms = 2000\nmax_buffered_bytes = 65536\nsend_buffer = 16\n";
    let world = StreamWorld::start(r#"{ stream = "big" }"#, extra).await;
    world.stream("big").await;
    const TOTAL: u64 = 12_000;
    // ~2 KiB per event: far more than the socket buffers hold for a reader that stalls.
    let filler = "x".repeat(2048);
    world.publish_padded("", "big", 0..TOTAL, &filler).await;

    // The slow reader: a raw connection that sends its request and then reads nothing.
    let address = world.server.base.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let request = format!(
        "GET /v1/events?stream=big&offset=first&access_token={} HTTP/1.1\r\nHost: {address}\r\nAccept: text/event-stream\r\n\r\n",
        world.token
    );
    slow.write_all(request.as_bytes()).await.expect("request");

    // The fast one reads everything, in order, while the slow one stalls.
    let bearer = format!("Bearer {}", world.token);
    let mut fast = Events::new(
        open(
            &world,
            "stream=big&offset=first",
            &[("authorization", &bearer)],
        )
        .await,
    );
    let mut expected = 0;
    while expected < TOTAL {
        let event = fast.next(Duration::from_secs(20)).await;
        let event =
            event.unwrap_or_else(|| panic!("the fast reader keeps up: {expected} of {TOTAL}"));
        assert_eq!(event.data["payload"]["n"], expected);
        expected += 1;
    }

    // The slow one was cut: its connection ends before everything arrived.
    let cut = eventually(Duration::from_secs(10), || async {
        world
            .server
            .metrics()
            .await
            .lines()
            .any(|l| l.starts_with("warren_sse_slow_reader_closes_total") && !l.ends_with(" 0"))
    })
    .await;
    assert!(cut, "the slow reader's subscription was cut");
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match slow.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the slow reader's connection is closed");
    let events = String::from_utf8_lossy(&received)
        .matches("event: message")
        .count() as u64;
    assert!(events < TOTAL, "cut before the end: {events} of {TOTAL}");
}

/// Reads from `stream` until `done` holds for what came, the peer closes, or 10 s pass.
async fn read_until(stream: &mut tokio::net::TcpStream, done: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 4096];
    while !done(&text) {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => text.push_str(&String::from_utf8_lossy(&chunk[..n])),
        }
    }
    text
}

/// A connection that opens with `GET /v1/events` is answered without hyper (so an idle
/// stream costs less memory): the same head and events as through hyper, which serves
/// the request when it comes after another on a kept-alive connection; a problem is
/// answered the same way, and the connection then closes.
#[tokio::test]
async fn an_event_stream_is_the_same_on_a_fresh_or_a_reused_connection() {
    let world = StreamWorld::start(r#"{ stream = "log" }"#, "").await;
    world.stream("log").await;
    world.publish("", "log", 0..3).await;
    let addr = world.server.base.trim_start_matches("http://").to_owned();
    let events = format!(
        "GET /v1/events?stream=log&offset=first&access_token={} HTTP/1.1\r\nhost: x\r\n\r\n",
        world.token
    );
    let three_events = |text: &str| text.contains("id: 2\n");

    // Fresh connection: served directly.
    let mut fresh = tokio::net::TcpStream::connect(&addr).await.unwrap();
    fresh.write_all(events.as_bytes()).await.unwrap();
    let direct = read_until(&mut fresh, three_events)
        .await
        .to_ascii_lowercase();
    assert!(direct.starts_with("http/1.1 200 ok\r\n"), "{direct}");
    for header in [
        "content-type: text/event-stream",
        "cache-control: no-cache",
        "x-accel-buffering: no",
        "x-request-id: ",
        "connection: close",
    ] {
        assert!(direct.contains(header), "{header} missing: {direct}");
    }
    assert!(!direct.contains("transfer-encoding"), "{direct}");
    assert!(direct.contains("retry: ") && direct.contains("id: 0\n") && direct.contains("id: 1\n"));

    // After another request on the same connection: hyper serves it, same events.
    let mut reused = tokio::net::TcpStream::connect(&addr).await.unwrap();
    reused
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let health = read_until(&mut reused, |t| t.contains("\r\n\r\n") && t.ends_with('}')).await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    reused.write_all(events.as_bytes()).await.unwrap();
    let via_hyper = read_until(&mut reused, three_events)
        .await
        .to_ascii_lowercase();
    assert!(via_hyper.starts_with("http/1.1 200 ok\r\n"), "{via_hyper}");
    assert!(via_hyper.contains("content-type: text/event-stream"));
    assert!(via_hyper.contains("id: 0\n") && via_hyper.contains("id: 2\n"));

    // A problem on a fresh connection: the problem+json answer, then the close.
    let mut refused = tokio::net::TcpStream::connect(&addr).await.unwrap();
    refused
        .write_all(b"GET /v1/events?stream=log HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let problem = read_until(&mut refused, |_| false).await;
    assert!(
        problem.starts_with("HTTP/1.1 401 Unauthorized\r\n"),
        "{problem}"
    );
    let lower = problem.to_ascii_lowercase();
    assert!(
        lower.contains("content-type: application/problem+json"),
        "{problem}"
    );
    assert!(lower.contains("www-authenticate: bearer"), "{problem}");
    assert!(problem.contains("\"code\":\"unauthorized\""), "{problem}");
}
