//! `POST /v1/publish/batch`: all-or-per-item answers, in request order.

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn batch_all_confirmed_is_200_in_order() {
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|_| {}).await;

    let messages: Vec<_> = (0..50)
        .map(|i| {
            json!({"exchange": exchange, "routing_key": format!("k.{i}"), "payload": {"n": i},
                        "properties": {"message_id": format!("m-{i}")}})
        })
        .collect();
    let r = server
        .post(
            "/v1/publish/batch",
            Some(&token),
            &json!({"messages": messages}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let results = r.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 50);
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result["status"], 202);
        assert_eq!(result["message_id"], format!("m-{i}"));
        assert_eq!(result["routed"], true);
    }
    assert_eq!(rabbit.wait_count(&queue, 50).await, 50);
    // Pipelined on one channel: the broker keeps their order.
    for i in 0..50 {
        let m = rabbit.get(&queue).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&m.delivery.data).unwrap();
        assert_eq!(body["n"], i);
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn batch_with_failures_is_207_with_per_item_results() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "ok.#").await;
    let tenant = unique("t");
    let config = config(&format!(
        "[tenants.{tenant}]\nvhost = \"/\"\npublish = [{{ exchange = \"{exchange}\", routing_key = \"ok.#\" }}, \
         {{ exchange = \"{exchange}\", routing_key = \"lost.#\" }}, \
         {{ exchange = \"missing-{tenant}\", routing_key = \"#\" }}]\n"
    ));
    let server = TestServer::start_ready(config).await;
    let token = server.token(&tenant, "publish");
    let r = server
        .post(
            "/v1/publish/batch",
            Some(&token),
            &json!({"messages": [
                {"exchange": exchange, "routing_key": "ok.1", "payload": 1},
                {"exchange": exchange, "routing_key": "lost.1", "payload": 2},
                {"exchange": exchange, "routing_key": "denied.1", "payload": 3},
                {"exchange": format!("missing-{tenant}"), "routing_key": "x", "payload": 4},
                {"exchange": exchange, "routing_key": "ok.2", "payload": 5},
            ]}),
        )
        .await;
    assert_eq!(r.status, 207, "{:?}", r.body);
    let results = r.body["results"].as_array().unwrap();
    let summary: Vec<(u64, &str)> = results
        .iter()
        .map(|r| {
            (
                r["status"].as_u64().unwrap(),
                r["code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (202, ""),
            (422, "unroutable"),
            (403, "forbidden"),
            (404, "exchange_not_found"),
            (202, "")
        ]
    );
    assert!(results.iter().all(|r| r["message_id"].is_string()));
    assert!(results[1]["detail"].is_string());
    assert_eq!(rabbit.wait_count(&queue, 2).await, 2);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn malformed_empty_or_oversized_batches_publish_nothing() {
    let (rabbit, exchange, queue, _, server, token) = publishing_tenant(|config| {
        config.server.max_batch_messages = 3;
    })
    .await;
    let good = json!({"exchange": exchange, "routing_key": "a", "payload": 1});

    let r = server
        .post(
            "/v1/publish/batch",
            Some(&token),
            &json!({"messages": [good, {"exchange": exchange, "routing_key": "b",
                                         "body": "", "properties": {"priority": 1000}}]}),
        )
        .await;
    assert_problem(&r, 400, "invalid_request");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .starts_with("messages[1]"),
        "{:?}",
        r.body
    );
    let r = server
        .post(
            "/v1/publish/batch",
            Some(&token),
            &json!({"messages": [good, {"routing_key": "b"}]}),
        )
        .await;
    assert_problem(&r, 400, "invalid_request");
    let r = server
        .post("/v1/publish/batch", Some(&token), &json!({"messages": []}))
        .await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"));
    let r = server
        .post(
            "/v1/publish/batch",
            Some(&token),
            &json!({"messages": [good, good, good, good]}),
        )
        .await;
    assert_eq!((r.status, r.code()), (413, "payload_too_large"));

    assert_eq!(rabbit.count(&queue).await, 0);
    server.shutdown().await.unwrap();
}
