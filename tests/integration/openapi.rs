//! The OpenAPI document as served (`/openapi.json`, `/docs`) and printed (`warren openapi`).

use std::process::Command;

use crate::common::*;

#[tokio::test]
async fn serves_the_document_and_interactive_docs_from_the_binary() {
    let server = TestServer::start(tenant_config("docs", "*", "#")).await;
    let r = server.get("/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, warren::api::openapi::document());
    assert!(r.header("x-request-id").is_some());

    // `/docs` redirects to `/docs/`; the page and its assets come from the binary.
    let r = server.get("/docs").await;
    assert_eq!(r.status, 200);
    assert!(
        r.body
            .as_str()
            .is_some_and(|html| html.contains("swagger-ui")),
        "{:?}",
        r.body
    );
    let r = server.get("/docs/swagger-initializer.js").await;
    assert_eq!(r.status, 200);
    assert!(
        r.body
            .as_str()
            .is_some_and(|js| js.contains("/openapi.json")),
        "{:?}",
        r.body
    );
    let r = server.get("/docs/swagger-ui-bundle.js").await;
    assert_eq!(r.status, 200);
    server.shutdown().await.unwrap();
}

#[test]
fn cli_prints_the_committed_document() {
    let output = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("openapi")
        .output()
        .unwrap();
    assert!(output.status.success());
    let printed = String::from_utf8(output.stdout).unwrap();
    assert_eq!(printed, warren::api::openapi::to_pretty_json());
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json"))
            .unwrap();
    assert!(
        printed == committed,
        "openapi/openapi.json is stale: run `cargo run -q -- openapi > openapi/openapi.json`"
    );
}

/// Every object schema says what it holds (properties, or what its values are): a bare
/// `{"type": "object"}` makes generated clients type it as an empty record (a
/// TypeScript generator made `ReplyMessage.properties` a `Record<string, never>`).
#[test]
fn no_schema_is_a_bare_object() {
    fn walk(value: &serde_json::Value, path: &str, bare: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                let is_object = match map.get("type") {
                    Some(serde_json::Value::String(t)) => t == "object",
                    Some(serde_json::Value::Array(ts)) => ts.iter().any(|t| t == "object"),
                    _ => false,
                };
                let described = [
                    "properties",
                    "additionalProperties",
                    "$ref",
                    "oneOf",
                    "allOf",
                    "anyOf",
                ]
                .iter()
                .any(|k| map.contains_key(*k));
                if is_object && !described {
                    bare.push(path.to_owned());
                }
                for (key, child) in map {
                    walk(child, &format!("{path}/{key}"), bare);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    walk(child, &format!("{path}[{i}]"), bare);
                }
            }
            _ => {}
        }
    }
    let mut bare = Vec::new();
    walk(&warren::api::openapi::document(), "", &mut bare);
    assert!(bare.is_empty(), "bare object schemas: {bare:?}");
}
