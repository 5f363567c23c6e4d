//! Idempotency keys end to end: one publish per key, replays, conflicts, mismatches,
//! transient failures releasing the key, and several replicas sharing Redis.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

async fn post_with_key(
    server: &TestServer,
    path: &str,
    token: &str,
    key: &str,
    body: &Value,
) -> Resp {
    let response = server
        .http
        .post(format!("{}{path}", server.base))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    into_resp(response).await
}

fn redis_config(tenant: &str, exchange: &str, prefix: &str) -> warren::config::Config {
    let mut config = tenant_config(tenant, exchange, "#");
    config.idempotency.store = warren::config::StoreKind::Redis;
    config.idempotency.redis_url =
        std::env::var("WARREN_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    config.idempotency.key_prefix = prefix.to_owned();
    config
}

/// Fires `n` identical keyed publishes at `servers` (round robin) at once.
async fn storm(
    servers: &[&TestServer],
    token: &str,
    key: &str,
    body: &Value,
    n: usize,
) -> Vec<Resp> {
    let mut tasks = Vec::new();
    for i in 0..n {
        let server = servers[i % servers.len()];
        let request = server
            .http
            .post(format!("{}/v1/publish", server.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .header("idempotency-key", key)
            .body(body.to_string());
        tasks.push(tokio::spawn(async move {
            into_resp(request.send().await.unwrap()).await
        }));
    }
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

fn assert_one_winner(answers: &[Resp]) -> Value {
    let accepted: Vec<&Resp> = answers.iter().filter(|r| r.status == 202).collect();
    assert!(!accepted.is_empty(), "no request succeeded");
    let first = accepted[0].body.clone();
    for r in answers {
        match r.status {
            202 => assert_eq!(r.body, first, "a replay differs from the original"),
            409 => {
                assert_eq!(r.code(), "idempotency_key_in_use");
                assert!(r.header("retry-after").is_some());
            }
            other => panic!("unexpected {other}: {:?}", r.body),
        }
    }
    first
}

#[tokio::test]
async fn fifty_concurrent_duplicates_publish_exactly_once() {
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|_| {}).await;
    let body = json!({"exchange": exchange, "routing_key": "k", "payload": {"order": 1}});

    let answers = storm(&[&server], &token, "order-1", &body, 50).await;
    let accepted = assert_one_winner(&answers);
    assert_eq!(rabbit.wait_count(&queue, 1).await, 1);

    // A later retry replays the identical answer, marked as a replay.
    let replay = post_with_key(&server, "/v1/publish", &token, "\"order-1\"", &body).await;
    assert_eq!(replay.status, 202);
    assert_eq!(replay.body, accepted);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    // The message id is derived from the key, so consumers can de-duplicate too.
    let message = rabbit.get(&queue).await.unwrap();
    let id = message
        .delivery
        .properties
        .message_id()
        .as_ref()
        .unwrap()
        .as_str()
        .to_owned();
    assert_eq!(accepted["message_id"], id);
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert_eq!(rabbit.count(&queue).await, 0);

    let metrics = server.metrics().await;
    for result in ["new", "replayed"] {
        assert!(
            metrics.contains(&format!(
                "warren_idempotency_requests_total{{result=\"{result}\"}}"
            )),
            "{result}"
        );
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn same_key_different_body_is_422_and_publishes_nothing_more() {
    let (rabbit, exchange, queue, tenant, server, token) = publishing_tenant(|_| {}).await;
    let first = json!({"exchange": exchange, "routing_key": "k", "payload": 1});
    let other = json!({"exchange": exchange, "routing_key": "k", "payload": 2});

    assert_eq!(
        post_with_key(&server, "/v1/publish", &token, "k1", &first)
            .await
            .status,
        202
    );
    let r = post_with_key(&server, "/v1/publish", &token, "k1", &other).await;
    assert_problem(&r, 422, "idempotency_key_mismatch");
    // Same key on another path is another request too.
    let r = post_with_key(
        &server,
        "/v1/publish/batch",
        &token,
        "k1",
        &json!({"messages": [first]}),
    )
    .await;
    assert_eq!((r.status, r.code()), (422, "idempotency_key_mismatch"));
    assert_eq!(rabbit.wait_count(&queue, 1).await, 1);

    // Keys are scoped by subject: another caller's identical key is independent.
    let other_subject = server.token_with(&warren::auth::TokenRequest {
        tenant: &tenant,
        subject: "someone-else",
        scope: "publish",
        ttl: Duration::from_secs(60),
    });
    assert_eq!(
        post_with_key(&server, "/v1/publish", &other_subject, "k1", &other)
            .await
            .status,
        202
    );
    assert_eq!(rabbit.wait_count(&queue, 2).await, 2);

    // Malformed keys are rejected before anything happens.
    for bad in ["", "\"unterminated", &"x".repeat(256)] {
        let r = post_with_key(&server, "/v1/publish", &token, bad, &first).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "{bad:?}");
    }
    assert_eq!(rabbit.count(&queue).await, 2);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_503_releases_the_key_and_the_retry_publishes_once() {
    let proxy = ChaosProxy::start().await;
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|config| {
        config.amqp.url = Some(proxy.url());
        config.amqp.reconnect_backoff_max_ms = 500;
    })
    .await;
    let body = json!({"exchange": exchange, "routing_key": "k", "payload": "retry me"});

    proxy.cut();
    assert!(
        eventually(Duration::from_secs(3), || async {
            server.get("/readyz").await.status == 503
        })
        .await
    );
    let r = post_with_key(&server, "/v1/publish", &token, "retry-1", &body).await;
    assert_problem(&r, 503, "broker_unavailable");

    proxy.restore();
    assert!(
        eventually(Duration::from_secs(5), || async {
            server.get("/readyz").await.status == 200
        })
        .await
    );
    let r = post_with_key(&server, "/v1/publish", &token, "retry-1", &body).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert!(r.header("idempotent-replayed").is_none());
    let again = post_with_key(&server, "/v1/publish", &token, "retry-1", &body).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body, r.body);
    assert_eq!(rabbit.wait_count(&queue, 1).await, 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn keyed_batches_replay_and_derive_one_id_per_item() {
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|_| {}).await;
    let body = json!({"messages": [
        {"exchange": exchange, "routing_key": "a", "payload": 1},
        {"exchange": exchange, "routing_key": "b", "payload": 2},
    ]});
    let first = post_with_key(&server, "/v1/publish/batch", &token, "batch-1", &body).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let ids: Vec<&str> = first.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["message_id"].as_str().unwrap())
        .collect();
    assert_ne!(ids[0], ids[1]);
    let replay = post_with_key(&server, "/v1/publish/batch", &token, "batch-1", &body).await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.body, first.body);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(rabbit.wait_count(&queue, 2).await, 2);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn two_replicas_sharing_redis_publish_exactly_once() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "#").await;
    let tenant = unique("t");
    let prefix = format!("{}:", unique("idem"));
    let a = TestServer::start_ready(redis_config(&tenant, &exchange, &prefix)).await;
    let b = TestServer::start_ready(redis_config(&tenant, &exchange, &prefix)).await;
    let token = a.token(&tenant, "publish");
    let body = json!({"exchange": exchange, "routing_key": "k", "payload": {"shared": true}});

    for round in 0..3 {
        let key = format!("shared-{round}");
        let answers = storm(&[&a, &b], &token, &key, &body, 40).await;
        assert_one_winner(&answers);
    }
    assert_eq!(rabbit.wait_count(&queue, 3).await, 3);
    let different = json!({"exchange": exchange, "routing_key": "other", "payload": 1});
    let r = post_with_key(&b, "/v1/publish", &token, "shared-0", &different).await;
    assert_eq!(r.code(), "idempotency_key_mismatch");
    let ready = b.get("/readyz").await;
    assert_eq!(ready.body["idempotency"]["store"], "redis");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn unreachable_redis_is_503_with_its_own_code_and_readyz_red() {
    let port = closed_port().await;
    let tenant = unique("t");
    let mut config = redis_config(&tenant, "*", "unused:");
    config.idempotency.redis_url = format!("redis://127.0.0.1:{port}");
    let server = TestServer::start(config).await;
    let token = server.token(&tenant, "publish");
    let body =
        json!({"exchange": "amq.topic", "routing_key": "k", "payload": 1, "mandatory": false});
    let r = post_with_key(&server, "/v1/publish", &token, "k", &body).await;
    assert_problem(&r, 503, "idempotency_store_unavailable");
    assert!(r.header("retry-after").is_some());
    let ready = server.get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.body["idempotency"]["ok"], false);
    server.shutdown().await.unwrap();
}

/// The AMQP `message_id` of a message a queue holds.
fn message_id_of(message: &lapin::message::BasicGetMessage) -> String {
    message
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str().to_owned())
        .unwrap_or_default()
}

/// `body` posted to `path` under `key` by two subjects of one tenant: first as
/// `billing`, then as `shipping` (`token_for` mints a subject's token).
async fn post_as_billing_then_shipping(
    server: &TestServer,
    token_for: impl Fn(&TestServer, &str) -> String,
    path: &str,
    key: &str,
    body: &Value,
) -> (Resp, Resp) {
    let billing = post_with_key(server, path, &token_for(server, "billing"), key, body).await;
    let shipping = post_with_key(server, path, &token_for(server, "shipping"), key, body).await;
    (billing, shipping)
}

#[tokio::test]
async fn derived_message_ids_are_scoped_by_subject_like_the_key() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "#").await;
    let tenant = unique("t");
    let config = tenant_config(&tenant, &exchange, "#");
    let server = TestServer::start_ready(config.clone()).await;
    let token_for = |server: &TestServer, subject: &str| {
        server.token_with(&warren::auth::TokenRequest {
            tenant: &tenant,
            subject,
            scope: "publish",
            ttl: Duration::from_secs(60),
        })
    };
    let body = json!({"exchange": exchange, "routing_key": "k", "payload": {"n": 1}});

    // Two services of one tenant pick the same key: two publishes, two message ids, so
    // a consumer de-duplicating on message_id keeps both.
    let (billing, shipping) =
        post_as_billing_then_shipping(&server, &token_for, "/v1/publish", "order-7", &body).await;
    assert_eq!(
        (billing.status, shipping.status),
        (202, 202),
        "{:?} {:?}",
        billing.body,
        shipping.body
    );
    assert_ne!(billing.body["message_id"], shipping.body["message_id"]);
    assert_eq!(rabbit.wait_count(&queue, 2).await, 2);
    let first = rabbit.get(&queue).await.unwrap();
    let second = rabbit.get(&queue).await.unwrap();
    let mut landed = [message_id_of(&first), message_id_of(&second)];
    landed.sort();
    let mut answered = [
        billing.body["message_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        shipping.body["message_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ];
    answered.sort();
    assert_eq!(landed, answered);

    // Batch items too: item 0 of the same key differs per subject.
    let batch = json!({"messages": [body]});
    let (a, b) =
        post_as_billing_then_shipping(&server, &token_for, "/v1/publish/batch", "batch-7", &batch)
            .await;
    assert_eq!((a.status, b.status), (200, 200));
    assert_ne!(
        a.body["results"][0]["message_id"],
        b.body["results"][0]["message_id"]
    );
    assert_eq!(rabbit.wait_count(&queue, 2).await, 2);
    while rabbit.get(&queue).await.is_some() {}
    server.shutdown().await.unwrap();

    // The same subject retrying runs again on a replica that never saw the key (a fresh
    // memory store): the message lands twice, with the same id, for consumers to drop.
    let fresh = TestServer::start_ready(config).await;
    let retry = post_with_key(
        &fresh,
        "/v1/publish",
        &token_for(&fresh, "billing"),
        "order-7",
        &body,
    )
    .await;
    assert_eq!(retry.status, 202, "{:?}", retry.body);
    assert!(retry.header("idempotent-replayed").is_none());
    assert_eq!(retry.body["message_id"], billing.body["message_id"]);
    assert_eq!(rabbit.wait_count(&queue, 1).await, 1);
    let landed = rabbit.get(&queue).await.unwrap();
    assert_eq!(json!(message_id_of(&landed)), billing.body["message_id"]);
    fresh.shutdown().await.unwrap();
}

#[tokio::test]
async fn another_tenants_flood_of_keys_does_not_evict_a_retained_key() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "a.#").await;
    let (a, b) = (unique("a"), unique("b"));
    let tenant = |name: &str| {
        format!(
            "[tenants.{name}]\nvhost = \"/\"\n\
             publish = [{{ exchange = \"{exchange}\", routing_key = \"#\" }}]\n"
        )
    };
    // Room for four keys in total: two per tenant by default.
    let mut config = config(&format!("{}{}", tenant(&a), tenant(&b)));
    config.idempotency.max_entries = 4;
    let server = TestServer::start_ready(config).await;
    let (token_a, token_b) = (server.token(&a, "publish"), server.token(&b, "publish"));
    let body = json!({"exchange": exchange, "routing_key": "a.order", "payload": {"n": 1}});

    let first = post_with_key(&server, "/v1/publish", &token_a, "a-order-1", &body).await;
    assert_eq!(first.status, 202, "{:?}", first.body);

    // Tenant b publishes many keyed requests: each is served, churning b's own share.
    for i in 0..20 {
        let flood = json!({"exchange": exchange, "routing_key": "b.noise", "payload": i,
                           "mandatory": false});
        let r = post_with_key(&server, "/v1/publish", &token_b, &format!("b-{i}"), &flood).await;
        assert_eq!(r.status, 202, "b's key {i}: {:?}", r.body);
    }

    // a's retry is still a replay: one message in a's queue, not two.
    let retry = post_with_key(&server, "/v1/publish", &token_a, "a-order-1", &body).await;
    assert_eq!(retry.status, 202, "{:?}", retry.body);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.body, first.body);
    assert_eq!(rabbit.wait_count(&queue, 1).await, 1);
    server.shutdown().await.unwrap();
}
