//! Authentication and authorization over HTTP: 401 for bad tokens, 403 for tenants,
//! scopes and grants — and a denied publish never reaches the broker.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::common::*;

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub(crate) fn sign(claims: &Value, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn tokens_tenants_scopes_and_grants() {
    let rabbit = Rabbit::connect().await;
    let exchange = rabbit.topic_exchange().await;
    let queue = rabbit.bound_queue(&exchange, "#").await;
    let tenant = unique("t");
    let server = TestServer::start_ready(tenant_config(&tenant, &exchange, "order.*")).await;
    let body = json!({"exchange": exchange, "routing_key": "order.created", "payload": 1});
    let secret = SECRET.as_bytes();

    // No token at all.
    let r = server.post("/v1/publish", None, &body).await;
    assert_eq!((r.status, r.code()), (401, "unauthorized"));
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer"))
    );

    let valid = json!({"sub": "s", "tenant": tenant, "scope": "publish", "exp": now() + 600});
    let mut unauthorized = vec![
        ("not a jwt".to_owned(), "garbage"),
        (
            sign(&valid, b"another-secret-another-secret-another"),
            "wrong key",
        ),
        (
            sign(
                &json!({"sub": "s", "tenant": tenant, "scope": "publish", "exp": now() - 3600}),
                secret,
            ),
            "expired",
        ),
        (
            sign(
                &json!({"sub": "s", "tenant": tenant, "scope": "publish"}),
                secret,
            ),
            "no exp",
        ),
        (
            sign(
                &json!({"sub": "s", "tenant": tenant, "scope": "publish", "exp": now() + 600, "nbf": now() + 3600}),
                secret,
            ),
            "not yet valid",
        ),
        (
            sign(
                &json!({"sub": "s", "scope": "publish", "exp": now() + 600}),
                secret,
            ),
            "no tenant claim",
        ),
    ];
    // A tampered payload keeps the old signature.
    let good = sign(&valid, secret);
    let parts: Vec<&str> = good.split('.').collect();
    let forged = json!({"sub": "s", "tenant": tenant, "scope": "publish subscribe admin", "exp": now() + 600});
    let forged_payload = base64_url(&forged.to_string());
    unauthorized.push((
        format!("{}.{}.{}", parts[0], forged_payload, parts[2]),
        "tampered",
    ));
    // alg none.
    let none_header = base64_url(r#"{"alg":"none","typ":"JWT"}"#);
    unauthorized.push((
        format!("{none_header}.{}.", base64_url(&valid.to_string())),
        "alg none",
    ));

    for (token, case) in &unauthorized {
        let r = server.post("/v1/publish", Some(token), &body).await;
        assert_eq!(
            (r.status, r.code()),
            (401, "unauthorized"),
            "{case}: {:?}",
            r.body
        );
    }

    // Valid token, but the tenant is not configured.
    let stranger = sign(
        &json!({"sub": "s", "tenant": "nobody-here", "scope": "publish", "exp": now() + 600}),
        secret,
    );
    let r = server.post("/v1/publish", Some(&stranger), &body).await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));

    // Scope without publish.
    let r = server
        .post(
            "/v1/publish",
            Some(&server.token(&tenant, "subscribe")),
            &body,
        )
        .await;
    assert_eq!((r.status, r.code()), (403, "forbidden"));

    // Grant denies: other routing key, other exchange.
    let token = server.token(&tenant, "publish");
    for denied in [
        json!({"exchange": exchange, "routing_key": "order.created.eu", "payload": 1}),
        json!({"exchange": exchange, "routing_key": "invoice.created", "payload": 1}),
        json!({"exchange": "amq.topic", "routing_key": "order.created", "payload": 1}),
    ] {
        let r = server.publish(&token, &denied).await;
        assert_eq!((r.status, r.code()), (403, "forbidden"), "{denied}");
    }
    assert_eq!(
        rabbit.count(&queue).await,
        0,
        "denied publishes reached the broker"
    );

    // And the happy path with the same token.
    let r = server.publish(&token, &body).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    assert_eq!(rabbit.wait_count(&queue, 1).await, 1);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn issuer_and_audience_are_enforced_when_configured() {
    let tenant = unique("t");
    let mut config = tenant_config(&tenant, "*", "#");
    config.auth.issuer = Some("https://idp.test".into());
    config.auth.audience = Some("warren".into());
    let server = TestServer::start_ready(config).await;
    let secret = SECRET.as_bytes();
    let body =
        json!({"exchange": "amq.topic", "routing_key": "x", "payload": 1, "mandatory": false});
    let base = |iss: &str, aud: &str| json!({"sub": "s", "tenant": tenant, "scope": "publish", "exp": now() + 600, "iss": iss, "aud": aud});
    let r = server
        .post(
            "/v1/publish",
            Some(&sign(&base("https://evil.test", "warren"), secret)),
            &body,
        )
        .await;
    assert_eq!(r.status, 401, "wrong issuer: {:?}", r.body);
    let r = server
        .post(
            "/v1/publish",
            Some(&sign(&base("https://idp.test", "other"), secret)),
            &body,
        )
        .await;
    assert_eq!(r.status, 401, "wrong audience: {:?}", r.body);
    let r = server
        .post(
            "/v1/publish",
            Some(&sign(&base("https://idp.test", "warren"), secret)),
            &body,
        )
        .await;
    assert_eq!(r.status, 202, "right issuer and audience: {:?}", r.body);
    server.shutdown().await.unwrap();
}

fn base64_url(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}
