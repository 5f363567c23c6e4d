//! WebSocket sessions over real sockets against the real broker: live fan-out, durable
//! resume, grants, token expiry and refresh, slow consumers, limits, publish frames.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, http};

use crate::common::*;

pub(crate) type Ws = WsStream;

pub(crate) async fn connect(server: &TestServer, token: &str) -> Ws {
    ws_connect(&server.base, token).await
}

pub(crate) async fn send(ws: &mut Ws, frame: Value) {
    ws.send(Message::text(frame.to_string())).await.unwrap();
}

/// The next JSON frame (pings skipped), or panic after 10 s.
pub(crate) async fn recv(ws: &mut Ws) -> Value {
    recv_within(ws, Duration::from_secs(10)).await
}

/// The next JSON frame (pings skipped), or panic after `within`.
pub(crate) async fn recv_within(ws: &mut Ws, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|e| panic!("a frame within {within:?}: {e:?}"))
            .expect("socket open")
            .expect("frame");
        match next {
            Message::Text(text) => return serde_json::from_str(text.as_str()).unwrap(),
            Message::Close(close) => panic!("closed: {close:?}"),
            _ => continue,
        }
    }
}

/// Reads until the close frame and returns its code.
async fn close_code(ws: &mut Ws, within: Duration) -> u16 {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(CloseFrame { code, .. }))))) => return code.into(),
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("socket ended without a close frame: {other:?}"),
            Err(_) => panic!("no close within {within:?}"),
        }
    }
}

pub(crate) async fn subscribe(ws: &mut Ws, id: &str, exchange: &str, binding_key: &str) -> Value {
    send(
        ws,
        json!({"type": "subscribe", "id": id, "exchange": exchange, "binding_key": binding_key, "mode": "live"}),
    )
    .await;
    recv(ws).await
}

fn ws_config(tenant: &str, exchange: &str) -> warren::config::Config {
    config(&format!(
        "[tenants.{tenant}]\nvhost = \"/\"\n\
         publish = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}]\n\
         subscribe = [{{ exchange = \"{exchange}\", routing_key = \"order.#\" }}]\n"
    ))
}

#[tokio::test]
async fn live_fan_out_reaches_every_socket_once_through_one_queue() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let tenant = unique("t");
    let server = TestServer::start_ready(ws_config(&tenant, &exchange)).await;
    let token = server.token(&tenant, "publish subscribe");

    let mut sockets = Vec::new();
    for _ in 0..50 {
        let mut ws = connect(&server, &token).await;
        let answer = subscribe(&mut ws, "s1", &exchange, "order.*").await;
        assert_eq!(answer, json!({"type": "subscribed", "id": "s1"}));
        sockets.push(ws);
    }
    let queues = server.state.live.queues();
    assert_eq!(queues.len(), 1, "one broker queue for all 50 sockets");
    // Ask the broker too: one binding on the exchange, one consumer on its queue.
    let rabbitmqctl = |args: &[&str]| {
        let out = std::process::Command::new("rabbitmqctl")
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let bindings = rabbitmqctl(&[
        "list_bindings",
        "-q",
        "--no-table-headers",
        "source_name",
        "destination_name",
    ]);
    let ours: Vec<&str> = bindings
        .lines()
        .filter(|l| l.starts_with(&format!("{exchange}\t")))
        .collect();
    assert_eq!(ours, vec![format!("{exchange}\t{}", queues[0])]);
    let consumers = rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "consumers",
    ]);
    assert!(
        consumers.lines().any(|l| l == format!("{}\t1", queues[0])),
        "{consumers}"
    );

    for n in 0..20 {
        let r = server
            .publish(
                &token,
                &json!({"exchange": exchange, "routing_key": "order.created", "payload": {"n": n}}),
            )
            .await;
        assert_eq!(r.status, 202, "{:?}", r.body);
        assert_eq!(r.body["routed"], true);
    }
    // Not bound: must not arrive.
    let r = server
        .publish(&token, &json!({"exchange": exchange, "routing_key": "order.created.eu", "payload": 1, "mandatory": false}))
        .await;
    assert_eq!(r.status, 202);

    for ws in &mut sockets {
        for n in 0..20 {
            let frame = recv(ws).await;
            assert_eq!(frame["type"], "message");
            assert_eq!(frame["subscription"], "s1");
            assert_eq!(frame["routing_key"], "order.created");
            assert_eq!(frame["payload"]["n"], n, "in order, exactly once");
            assert_eq!(frame["properties"]["content_type"], "application/json");
        }
        let extra = tokio::time::timeout(Duration::from_millis(50), ws.next()).await;
        assert!(extra.is_err(), "no duplicate or unbound message: {extra:?}");
    }

    for mut ws in sockets {
        ws.close(None).await.unwrap();
    }
    let gone = eventually(Duration::from_secs(5), || async {
        server.state.live.queues().is_empty()
    })
    .await;
    assert!(
        gone,
        "the live queue is removed after the last subscriber leaves"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn durable_subscription_resumes_after_a_disconnect_without_loss() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let tenant = unique("t");
    let server = TestServer::start_ready(ws_config(&tenant, &exchange)).await;
    let token = server.token(&tenant, "publish subscribe");
    let name = unique("billing");
    let subscribe_frame = json!({"type": "subscribe", "id": "d1", "exchange": exchange,
        "binding_key": "order.#", "mode": "durable", "queue": name, "prefetch": 5});

    let mut ws = connect(&server, &token).await;
    send(&mut ws, subscribe_frame.clone()).await;
    let answer = recv(&mut ws).await;
    assert_eq!(answer["type"], "subscribed", "{answer}");
    let queue = answer["queue"].as_str().unwrap().to_owned();
    assert_eq!(queue, format!("warren.{tenant}.{name}"));

    for n in 0..10 {
        let r = server
            .publish(
                &token,
                &json!({"exchange": exchange, "routing_key": "order.paid", "payload": {"n": n}}),
            )
            .await;
        assert_eq!(r.status, 202);
    }
    // Prefetch 5: five arrive and no more until acked.
    let mut first = Vec::new();
    for _ in 0..5 {
        first.push(recv(&mut ws).await);
    }
    let nothing_more = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
    assert!(nothing_more.is_err(), "prefetch bounds what is outstanding");
    // Ack three: three more arrive. Then drop the socket mid-stream with five unacked.
    for frame in &first[..3] {
        send(
            &mut ws,
            json!({"type": "ack", "subscription": "d1", "delivery_tag": frame["delivery_tag"]}),
        )
        .await;
    }
    for _ in 0..3 {
        first.push(recv(&mut ws).await);
    }
    drop(ws);

    for n in 10..15 {
        let r = server
            .publish(
                &token,
                &json!({"exchange": exchange, "routing_key": "order.paid", "payload": {"n": n}}),
            )
            .await;
        assert_eq!(r.status, 202, "the queue outlives the socket");
    }

    let mut ws = connect(&server, &token).await;
    send(&mut ws, subscribe_frame).await;
    assert_eq!(recv(&mut ws).await["type"], "subscribed");
    let mut seen: Vec<i64> = first[..3]
        .iter()
        .map(|f| f["payload"]["n"].as_i64().unwrap())
        .collect();
    let mut redelivered = 0;
    while seen.len() < 15 {
        let frame = recv(&mut ws).await;
        assert_eq!(frame["type"], "message", "{frame}");
        if frame["redelivered"] == true {
            redelivered += 1;
        }
        seen.push(frame["payload"]["n"].as_i64().unwrap());
        send(
            &mut ws,
            json!({"type": "ack", "subscription": "d1", "delivery_tag": frame["delivery_tag"]}),
        )
        .await;
    }
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..15).collect::<Vec<_>>(),
        "nothing lost, nothing twice"
    );
    assert_eq!(
        redelivered, 5,
        "the five unacked messages came back marked redelivered"
    );
    ws.close(None).await.unwrap();
    rabbit.delete_queue(&queue).await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn ungranted_and_cross_tenant_subscriptions_are_refused() {
    let rabbit = Rabbit::connect().await;
    let ours = rabbit.topic_exchange().await;
    let theirs = rabbit.topic_exchange().await;
    let a = unique("a");
    let b = unique("b");
    let server = TestServer::start_ready(config(&format!(
        "[tenants.{a}]\nvhost = \"/\"\nsubscribe = [{{ exchange = \"{ours}\", routing_key = \"order.#\" }}]\n\
         [tenants.{b}]\nvhost = \"/\"\nsubscribe = [{{ exchange = \"{theirs}\", routing_key = \"#\" }}]\n"
    )))
    .await;
    let mut ws = connect(&server, &server.token(&a, "subscribe")).await;
    for (exchange, key) in [
        (&theirs, "#"),
        (&ours, "#"),
        (&ours, "invoice.*"),
        (&theirs, "order.*"),
    ] {
        let answer = subscribe(&mut ws, "x", exchange, key).await;
        assert_eq!(answer["type"], "error", "{exchange} {key}");
        assert_eq!(answer["code"], "forbidden");
        assert_eq!(answer["id"], "x");
    }
    assert_eq!(
        subscribe(&mut ws, "ok", &ours, "order.*").await["type"],
        "subscribed"
    );
    // A token without the subscribe scope.
    let mut ws2 = connect(&server, &server.token(&a, "publish")).await;
    assert_eq!(
        subscribe(&mut ws2, "s", &ours, "order.*").await["code"],
        "forbidden"
    );
    // No token at all: the upgrade is refused with 401.
    let url = format!("{}/v1/ws", server.base.replace("http://", "ws://"));
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {other:?}"),
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_expiring_token_closes_with_4401_unless_refreshed() {
    let tenant = unique("t");
    let mut config = ws_config(&tenant, "amq.topic");
    config.auth.leeway_s = 0;
    let server = TestServer::start_ready(config).await;
    let short = |secs| {
        server.token_with(&warren::auth::TokenRequest {
            tenant: &tenant,
            subject: "browser",
            scope: "publish subscribe",
            ttl: Duration::from_secs(secs),
        })
    };
    let mut expiring = connect(&server, &short(2)).await;
    let mut refreshed = connect(&server, &short(2)).await;
    send(&mut refreshed, json!({"type": "auth", "token": short(60)})).await;
    assert_eq!(
        close_code(&mut expiring, Duration::from_secs(5)).await,
        4401
    );
    // Past the first token's expiry the refreshed socket still works.
    send(
        &mut refreshed,
        json!({"type": "publish", "id": "p1", "exchange": "amq.topic", "routing_key": "x", "payload": 1, "mandatory": false}),
    )
    .await;
    let confirm = recv(&mut refreshed).await;
    assert_eq!(confirm["type"], "confirm", "{confirm}");
    // An invalid refresh is an error frame, not a close.
    send(&mut refreshed, json!({"type": "auth", "token": "garbage"})).await;
    assert_eq!(recv(&mut refreshed).await["code"], "unauthorized");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stalled_reader_is_closed_with_4408_while_a_healthy_one_keeps_receiving() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let tenant = unique("t");
    let mut config = ws_config(&tenant, &exchange);
    config.ws.slow_consumer_timeout_ms = 500;
    config.ws.send_buffer = 8;
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish subscribe");
    let mut stalled = connect(&server, &token).await;
    let mut healthy = connect(&server, &token).await;
    assert_eq!(
        subscribe(&mut stalled, "s", &exchange, "order.#").await["type"],
        "subscribed"
    );
    assert_eq!(
        subscribe(&mut healthy, "s", &exchange, "order.#").await["type"],
        "subscribed"
    );

    // ~12 MB in total: far more than the loopback socket buffers hold.
    let big = "x".repeat(120_000);
    let reader = tokio::spawn(async move {
        let mut received = 0;
        while received < 100 {
            let frame = recv(&mut healthy).await;
            assert_eq!(frame["type"], "message");
            received += 1;
        }
        received
    });
    let closes_before = slow_closes(&server).await;
    let publisher = {
        let (http, url, token, exchange) = (
            server.http.clone(),
            format!("{}/v1/publish", server.base),
            token.clone(),
            exchange.clone(),
        );
        tokio::spawn(async move {
            for _ in 0..100 {
                let response = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"exchange": exchange, "routing_key": "order.big", "body": big}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 202);
            }
        })
    };
    // Warren gives up on the stalled socket while the healthy one keeps receiving.
    let cut_off = eventually(Duration::from_secs(30), || async {
        slow_closes(&server).await > closes_before
    })
    .await;
    assert!(cut_off, "the stalled socket was not closed for being slow");
    // The stalled socket reads again only now: past what was buffered, a 4408 close.
    assert_eq!(
        close_code(&mut stalled, Duration::from_secs(15)).await,
        4408
    );
    publisher.await.unwrap();
    assert_eq!(
        reader.await.unwrap(),
        100,
        "the healthy socket got everything"
    );
    assert!(
        server
            .metrics()
            .await
            .contains("warren_ws_slow_consumer_closes_total")
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_frames_get_errors_and_oversized_ones_close_1009() {
    let tenant = unique("t");
    let mut config = ws_config(&tenant, "amq.topic");
    config.ws.max_message_bytes = 2048;
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish subscribe");
    let mut ws = connect(&server, &token).await;
    for bad in [
        "not json".to_owned(),
        "[]".to_owned(),
        json!({"type": "teleport"}).to_string(),
        json!({"type": "subscribe", "id": "s"}).to_string(),
        json!({"type": "ack", "subscription": "none", "delivery_tag": 1}).to_string(),
        json!({"type": "publish", "id": "p", "exchange": "amq.topic", "routing_key": "k"})
            .to_string(),
        json!({"type": "subscribe", "id": "b", "exchange": "amq.topic", "binding_key": "order.#x"})
            .to_string(),
    ] {
        ws.send(Message::text(bad.clone())).await.unwrap();
        let answer = recv(&mut ws).await;
        assert_eq!(answer["type"], "error", "{bad}");
        assert_eq!(answer["code"], "invalid_request", "{bad}: {answer}");
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    assert_eq!(recv(&mut ws).await["code"], "invalid_request");
    // Still usable after all that.
    send(&mut ws, json!({"type": "publish", "id": "p2", "exchange": "amq.topic", "routing_key": "k", "payload": 1, "mandatory": false})).await;
    assert_eq!(recv(&mut ws).await["type"], "confirm");
    // Over ws.max_message_bytes.
    ws.send(Message::text("x".repeat(4096))).await.unwrap();
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, 1009);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn publish_frames_confirm_or_answer_with_the_rest_api_codes() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "order.#").await;
    let tenant = unique("t");
    let server = TestServer::start_ready(ws_config(&tenant, &exchange)).await;
    let token = server.token(&tenant, "publish subscribe");
    // Token in the query string, as browsers do.
    let url = format!(
        "{}/v1/ws?access_token={token}",
        server.base.replace("http://", "ws://")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();

    send(&mut ws, json!({"type": "publish", "id": "p1", "exchange": exchange, "routing_key": "order.new", "payload": {"a": 1}})).await;
    let confirm = recv(&mut ws).await;
    assert_eq!(confirm["type"], "confirm");
    assert_eq!(confirm["id"], "p1");
    assert_eq!(confirm["routed"], true);
    send(&mut ws, json!({"type": "publish", "id": "p2", "exchange": exchange, "routing_key": "nobody.home", "payload": 1})).await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["id"].as_str(), e["code"].as_str()),
        (Some("p2"), Some("unroutable"))
    );
    send(&mut ws, json!({"type": "publish", "id": "p3", "exchange": "amq.topic", "routing_key": "x", "payload": 1})).await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["id"].as_str(), e["code"].as_str()),
        (Some("p3"), Some("forbidden"))
    );
    // Idempotent publish frames: the retry is confirmed with the same id, published once.
    for _ in 0..3 {
        send(&mut ws, json!({"type": "publish", "id": "p4", "idempotency_key": "ws-key-1", "exchange": exchange, "routing_key": "order.once", "payload": 2})).await;
        let answer = recv(&mut ws).await;
        assert_eq!(answer["type"], "confirm", "{answer}");
    }
    assert_eq!(rabbit.wait_count(&queue, 2).await, 2);
    // A key the HTTP header would refuse is refused on the frame, for that frame's id,
    // and nothing is published.
    send(&mut ws, json!({"type": "publish", "id": "p5", "idempotency_key": "\"unterminated", "exchange": exchange, "routing_key": "order.bad", "payload": 3})).await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["id"].as_str()),
        (Some("error"), Some("p5")),
        "{e}"
    );
    assert_eq!(e["code"], "invalid_request", "{e}");

    // A bearer.<jwt> subprotocol next to warren.v1 works too.
    let url = format!("{}/v1/ws", server.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        format!("warren.v1, bearer.{token}").parse().unwrap(),
    );
    let (mut ws2, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()[http::header::SEC_WEBSOCKET_PROTOCOL],
        "warren.v1"
    );
    assert_eq!(
        subscribe(&mut ws2, "s", &exchange, "order.*").await["type"],
        "subscribed"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutdown_closes_sockets_with_1001() {
    let tenant = unique("t");
    let mut server = TestServer::start_ready(ws_config(&tenant, "amq.topic")).await;
    let token = server.token(&tenant, "subscribe");
    let mut ws = connect(&server, &token).await;
    server.trigger_shutdown();
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, 1001);
    let stopped = tokio::time::timeout(Duration::from_secs(10), server.join()).await;
    assert!(matches!(stopped, Ok(Ok(()))));
}

#[tokio::test]
async fn socket_subscription_and_origin_limits_hold() {
    let tenant = unique("t");
    let mut config = ws_config(&tenant, "amq.topic");
    config.ws.max_sockets_per_tenant = 2;
    config.ws.max_subscriptions = 1;
    config.ws.allowed_origins = vec!["https://app.example".into()];
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "subscribe");

    let mut first = connect(&server, &token).await;
    let _second = connect(&server, &token).await;
    let url = format!(
        "{}/v1/ws?access_token={token}",
        server.base.replace("http://", "ws://")
    );
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
            assert!(response.headers().contains_key("retry-after"));
        }
        other => panic!("a third socket must be refused: {other:?}"),
    }

    assert_eq!(
        subscribe(&mut first, "a", "amq.topic", "order.a").await["type"],
        "subscribed"
    );
    let refused = subscribe(&mut first, "b", "amq.topic", "order.b").await;
    assert_eq!(refused["code"], "invalid_request", "{refused}");
    let duplicate = subscribe(&mut first, "a", "amq.topic", "order.c").await;
    assert_eq!(duplicate["code"], "invalid_request", "{duplicate}");
    send(&mut first, json!({"type": "unsubscribe", "id": "a"})).await;
    assert_eq!(
        recv(&mut first).await,
        json!({"type": "unsubscribed", "id": "a"})
    );
    drop(first);

    // A browser from an origin not on the list is refused; a listed one is let in.
    let ok = eventually(Duration::from_secs(5), || async {
        server.state.sockets.open() < 2
    })
    .await;
    assert!(ok);
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        http::header::ORIGIN,
        "https://evil.example".parse().unwrap(),
    );
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("a foreign origin must be refused: {other:?}"),
    }
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert(http::header::ORIGIN, "https://app.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_ok());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refreshed_token_ends_the_subscriptions_it_no_longer_allows() {
    let tenant = unique("t");
    let server = TestServer::start_ready(ws_config(&tenant, "amq.topic")).await;
    let mut ws = connect(&server, &server.token(&tenant, "publish subscribe")).await;
    assert_eq!(
        subscribe(&mut ws, "s1", "amq.topic", "order.*").await["type"],
        "subscribed"
    );
    // The fresh token lacks `subscribe`: s1 ends with a 403 error frame, the socket stays.
    send(
        &mut ws,
        json!({"type": "auth", "token": server.token(&tenant, "publish")}),
    )
    .await;
    let ended = recv(&mut ws).await;
    assert_eq!(
        (
            ended["type"].as_str(),
            ended["id"].as_str(),
            ended["code"].as_str()
        ),
        (Some("error"), Some("s1"), Some("forbidden"))
    );
    send(&mut ws, json!({"type": "unsubscribe", "id": "s1"})).await;
    assert_eq!(recv(&mut ws).await["code"], "invalid_request", "s1 is gone");
    // A token for a tenant that is not configured: an error frame, the socket stays.
    let foreign = server.token_with(&warren::auth::TokenRequest {
        tenant: "nobody-configured",
        subject: "x",
        scope: "subscribe",
        ttl: Duration::from_secs(60),
    });
    send(&mut ws, json!({"type": "auth", "token": foreign})).await;
    assert_eq!(recv(&mut ws).await["code"], "forbidden");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_silent_socket_is_reaped_after_the_idle_timeout() {
    let tenant = unique("t");
    let mut config = ws_config(&tenant, "amq.topic");
    config.ws.ping_interval_s = 1;
    config.ws.idle_timeout_s = 1;
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "subscribe");
    let mut ws = connect(&server, &token).await;
    // Not reading means not answering pings: the server closes within a few ticks.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, 1000);
    let gone = eventually(Duration::from_secs(5), || async {
        server.state.sockets.open() == 0
    })
    .await;
    assert!(gone);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_refreshed_token_for_another_tenant_closes_with_1008() {
    let (a, b) = (unique("a"), unique("b"));
    let server = TestServer::start_ready(config(&format!(
        "[tenants.{a}]\nvhost = \"/\"\n[tenants.{b}]\nvhost = \"/\"\n"
    )))
    .await;
    let mut ws = connect(&server, &server.token(&a, "subscribe")).await;
    send(
        &mut ws,
        json!({"type": "auth", "token": server.token(&b, "subscribe")}),
    )
    .await;
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, 1008);
    server.shutdown().await.unwrap();
}

/// `warren_ws_slow_consumer_closes_total` as scraped now (the only test that makes it
/// move is the stalled-reader one).
async fn slow_closes(server: &TestServer) -> u64 {
    server
        .metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("warren_ws_slow_consumer_closes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_single_frame_far_over_the_limit_gets_1009_not_a_reset() {
    let tenant = unique("t");
    let mut config = ws_config(&tenant, "amq.topic");
    config.ws.max_message_bytes = 64 * 1024;
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish subscribe");
    let mut ws = connect(&server, &token).await;
    // One unfragmented 4 MiB frame: the server refuses it from its header while the
    // client is still sending the rest.
    ws.send(Message::text("x".repeat(4 * 1024 * 1024)))
        .await
        .expect("the frame is sent, not cut off by a reset");
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, 1009);
    server.shutdown().await.unwrap();
}
