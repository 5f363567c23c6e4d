//! The OpenAPI 3.1 document: the handlers' `#[utoipa::path]` annotations and the model's
//! schemas on the base of `doc.rs`, plus what utoipa cannot say. One document, printed
//! by `warren openapi` and served at `/openapi.json` and `/docs`.

use serde_json::{Value, json};

/// The document as served and printed: utoipa's output plus what utoipa cannot say.
pub fn document() -> Value {
    let (_, openapi) = super::documented_routes(true).split_for_parts();
    let mut doc = serde_json::to_value(&openapi).unwrap_or_else(|_| json!({}));
    require_exactly_one_body(&mut doc);
    super::events::document_schemas(&mut doc);
    constrain_request(&mut doc);
    add_request_id_headers(&mut doc);
    doc
}

/// `warren openapi`: pretty JSON with a trailing newline (what `openapi/openapi.json` holds).
pub fn to_pretty_json() -> String {
    let mut text = serde_json::to_string_pretty(&document()).unwrap_or_default();
    text.push('\n');
    text
}

/// A publish carries exactly one of `payload`, `body` and `body_base64` (`null` counts as
/// absent). utoipa's derive cannot say so; it is said here as `not` (none, or two of
/// them), which validators and test generators honour and client generators leave alone
/// (a `oneOf` would make them split the model into one class per body kind).
fn require_exactly_one_body(doc: &mut Value) {
    let Some(schema) = doc.pointer_mut("/components/schemas/PublishRequest") else {
        return;
    };
    let set = || json!({ "not": { "type": "null" } });
    let both =
        |a: &str, b: &str| json!({ "required": [a, b], "properties": { a: set(), b: set() } });
    let none = json!({ "properties": {
        "payload": { "type": "null" },
        "body": { "type": "null" },
        "body_base64": { "type": "null" }
    } });
    schema["not"] = json!({ "anyOf": [
        none,
        both("payload", "body"),
        both("payload", "body_base64"),
        both("body", "body_base64"),
        // A scheduled publish says when in one way only.
        both("delay_ms", "not_before")
    ] });
}

/// A request (`POST /v1/request`) is a publish plus `timeout_ms`, whose `reply_to`
/// Warren sets, which is always mandatory, and whose `correlation_id`, when given, is
/// not empty. utoipa renders the flattened publish body as `allOf`, which the publish
/// schema's `additionalProperties: false` would make unsatisfiable with `timeout_ms`;
/// so the request schema is the publish schema (its body-kind rule included) with
/// `timeout_ms` added, and the request's rules joined to its `not`.
fn constrain_request(doc: &mut Value) {
    let Some(publish) = doc.pointer("/components/schemas/PublishRequest").cloned() else {
        return;
    };
    let Some(schema) = doc.pointer_mut("/components/schemas/RequestBody") else {
        return;
    };
    let timeout_ms = schema
        .pointer("/allOf/1/properties/timeout_ms")
        .cloned()
        .unwrap_or_else(|| json!({ "type": "integer", "minimum": 1 }));
    let mut merged = publish;
    merged["properties"]["timeout_ms"] = timeout_ms;
    // A request waits for its reply: it cannot be scheduled.
    if let Some(properties) = merged["properties"].as_object_mut() {
        properties.remove("delay_ms");
        properties.remove("not_before");
    }
    merged["description"] = schema["description"].clone();
    merged["example"] = schema["example"].clone();
    let in_properties = |member: &str, value: Value| {
        json!({ "required": ["properties"], "properties": { "properties": {
            "type": "object", "required": [member], "properties": { member: value }
        } } })
    };
    let rules = [
        in_properties("reply_to", json!({ "not": { "type": "null" } })),
        in_properties(
            "correlation_id",
            json!({ "type": "string", "maxLength": 0 }),
        ),
        json!({ "required": ["mandatory"], "properties": { "mandatory": { "const": false } } }),
    ];
    match merged
        .pointer_mut("/not/anyOf")
        .and_then(Value::as_array_mut)
    {
        Some(any_of) => any_of.extend(rules),
        None => merged["not"] = json!({ "anyOf": rules }),
    }
    *schema = merged;
}

/// Every response carries `X-Request-Id`, and every documented response header is always
/// sent except `Idempotent-Replayed`. utoipa's `Header` has no `required` member (OpenAPI
/// 3.1 §4.8.21), so it is set here.
fn add_request_id_headers(doc: &mut Value) {
    let request_id = json!({
        "description": "The request's `X-Request-Id`, or a fresh UUID when it sent none.",
        "required": true,
        "schema": { "type": "string" }
    });
    let Value::Object(root) = doc else {
        return;
    };
    let mut responses: Vec<&mut Value> = Vec::new();
    for (key, value) in root.iter_mut() {
        match (key.as_str(), value) {
            ("components", components) => {
                if let Some(Value::Object(map)) = components.get_mut("responses") {
                    responses.extend(map.values_mut());
                }
            }
            ("paths", Value::Object(paths)) => {
                for operation in paths.values_mut().filter_map(Value::as_object_mut) {
                    for operation in operation.values_mut() {
                        if let Some(Value::Object(map)) = operation.get_mut("responses") {
                            // References get the header where they are defined.
                            responses.extend(map.values_mut().filter(|r| r.get("$ref").is_none()));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    for response in responses {
        let Value::Object(response) = response else {
            continue;
        };
        let headers = response
            .entry("headers")
            .or_insert_with(|| Value::Object(Default::default()));
        let Value::Object(headers) = headers else {
            continue;
        };
        for (name, header) in headers.iter_mut() {
            if name != "Idempotent-Replayed" {
                header["required"] = Value::Bool(true);
            }
        }
        headers.insert("X-Request-Id".to_owned(), request_id.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ProblemCode;

    /// `openapi/openapi.json` is what `warren openapi` prints. Regenerate it with
    /// `cargo run -q -- openapi > openapi/openapi.json`.
    #[test]
    fn committed_spec_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == to_pretty_json(),
            "openapi/openapi.json is stale: run `cargo run -q -- openapi > openapi/openapi.json`"
        );
    }

    #[test]
    fn document_is_deterministic() {
        assert_eq!(to_pretty_json(), to_pretty_json());
    }

    #[test]
    fn problem_code_enum_lists_every_code() {
        let doc = document();
        let listed = doc
            .pointer("/components/schemas/ProblemCode/enum")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let expected: Vec<Value> = ProblemCode::ALL.iter().map(|c| c.as_str().into()).collect();
        assert_eq!(listed, expected);
    }
}
