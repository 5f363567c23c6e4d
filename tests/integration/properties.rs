//! Property tests through the real parsers: publish and batch bodies, grant patterns,
//! idempotency keys. Nothing panics, every rejection says why, and `covers` agrees
//! with brute-force matching. (WebSocket frames: src/ws/protocol.rs.)

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use warren::auth::grants::GrantPattern;
use warren::idempotency::IdempotencyKey;
use warren::publishing::{Request, TraceContext};
use warren::wire::parse_json;
use warren::wire::{BatchRequest, PublishRequest};

/// JSON values of every kind, a few levels deep.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field name the publish body knows, or one it does not.
fn field() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec![
        "exchange",
        "routing_key",
        "payload",
        "body",
        "body_base64",
        "content_type",
        "properties",
        "mandatory",
        "unknown",
    ])
}

fn property_field() -> impl Strategy<Value = &'static str> {
    proptest::sample::select(vec![
        "message_id",
        "correlation_id",
        "reply_to",
        "expiration_ms",
        "priority",
        "type",
        "app_id",
        "persistent",
        "headers",
        "timestamp",
        "user_id",
        "bogus",
    ])
}

/// Values that hit the interesting edges: long strings, negatives, huge numbers,
/// base64 and not, nested objects.
fn edge_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any_json(),
        (0usize..300).prop_map(|n| Value::String("k".repeat(n))),
        Just(json!("AAH/")),
        Just(json!("not base64!")),
        Just(json!(-1)),
        Just(json!(u64::MAX)),
        Just(json!(1e300)),
        Just(json!({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}})),
    ]
}

/// A publish body: mostly well-formed, with random fields and values mixed in.
fn publish_body() -> impl Strategy<Value = Value> {
    (
        proptest::collection::vec((field(), edge_value()), 0..6),
        proptest::collection::vec((property_field(), edge_value()), 0..4),
        any::<bool>(),
    )
        .prop_map(|(fields, properties, base)| {
            let mut object = Map::new();
            if base {
                object.insert("exchange".into(), json!("events"));
                object.insert("routing_key".into(), json!("order.created"));
                object.insert("payload".into(), json!({"id": 1}));
            }
            for (name, value) in fields {
                object.insert(name.into(), value);
            }
            if !properties.is_empty() {
                let props: Map<String, Value> = properties
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect();
                object.insert("properties".into(), Value::Object(props));
            }
            Value::Object(object)
        })
}

/// Runs a parsed request through `prepare`; an error must say what is wrong.
fn check_prepare(request: PublishRequest) -> Result<(), TestCaseError> {
    match Request::from(request).prepare(
        &TraceContext::default(),
        None,
        warren::publishing::Limits::default(),
    ) {
        Ok(prepared) => {
            prop_assert!(!prepared.message_id.is_empty());
            prop_assert!(prepared.message.routing_key.len() <= 255);
            prop_assert!(prepared.message.exchange.len() <= 255);
        }
        Err(detail) => prop_assert!(!detail.is_empty()),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn publish_bodies_parse_or_are_rejected_with_a_reason(body in publish_body()) {
        let raw = body.to_string();
        match parse_json::<PublishRequest>(raw.as_bytes()) {
            Ok(request) => check_prepare(request)?,
            Err(error) => {
                prop_assert_eq!(error.code(), "invalid_request");
                prop_assert!(!error.to_string().is_empty());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_body_parsers(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Err(error) = parse_json::<PublishRequest>(&raw) {
            prop_assert_eq!(error.code(), "invalid_request");
            prop_assert!(!error.to_string().is_empty());
        }
        if let Err(error) = parse_json::<BatchRequest>(&raw) {
            prop_assert_eq!(error.code(), "invalid_request");
            prop_assert!(!error.to_string().is_empty());
        }
    }

    #[test]
    fn batch_bodies_parse_or_name_the_bad_item(items in proptest::collection::vec(publish_body(), 0..6)) {
        let raw = json!({"messages": items}).to_string();
        match parse_json::<BatchRequest>(raw.as_bytes()) {
            Ok(batch) => {
                prop_assert_eq!(batch.messages.len(), items.len());
                for request in batch.messages {
                    check_prepare(request)?;
                }
            }
            Err(error) => {
                prop_assert_eq!(error.code(), "invalid_request");
                let detail = error.to_string();
                prop_assert!(!detail.is_empty());
                // serde_path_to_error points at the item (messages[i]...) unless the
                // whole document is at fault.
                prop_assert!(detail.contains("messages") || detail.contains("invalid JSON"), "{}", detail);
            }
        }
    }

    #[test]
    fn idempotency_keys_parse_or_are_rejected_with_a_code(raw in proptest::collection::vec(any::<u8>(), 0..300)) {
        match IdempotencyKey::parse(&raw) {
            Ok(key) => {
                let key = key.as_str();
                prop_assert!(!key.is_empty() && key.len() <= 255);
                prop_assert!(key.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            }
            Err(error) => {
                prop_assert_eq!(error.code(), "invalid_request");
                prop_assert!(error.to_string().starts_with("Idempotency-Key: "));
                prop_assert!(error.to_string().len() > "Idempotency-Key: ".len());
            }
        }
    }

    #[test]
    fn printable_keys_bare_and_quoted_are_the_same_key(key in "[!#-\\[\\]-~][ -!#-\\[\\]-~]{0,200}[!#-\\[\\]-~]") {
        // No quotes or backslashes, no edge spaces: both forms must give the same key.
        let bare = IdempotencyKey::parse(key.as_bytes()).unwrap();
        let quoted = IdempotencyKey::parse(format!("\"{key}\"").as_bytes()).unwrap();
        prop_assert_eq!(bare.as_str(), key.as_str());
        prop_assert_eq!(quoted, bare);
    }

    #[test]
    fn arbitrary_grant_patterns_never_panic(source in ".{0,300}", key in ".{0,60}") {
        if let Ok(pattern) = GrantPattern::parse(&source) {
            let _ = pattern.matches(&key);
            if let Ok(other) = GrantPattern::parse(&key) {
                let _ = pattern.covers(&other);
                let _ = other.covers(&pattern);
            }
        }
    }

    #[test]
    fn matches_agrees_with_a_reference_matcher(pattern in words(&["a", "b", "*", "#"], 5), key in words(&["a", "b", "z"], 6)) {
        let parsed = GrantPattern::parse(&pattern).unwrap();
        prop_assert_eq!(parsed.matches(&key), reference_match(&split(&pattern), &split(&key)), "{} vs {}", pattern, key);
    }

    #[test]
    fn covers_agrees_with_brute_force(grant in words(&["a", "b", "*", "#"], 3), binding in words(&["a", "b", "*", "#"], 3)) {
        let g = GrantPattern::parse(&grant).unwrap();
        let b = GrantPattern::parse(&binding).unwrap();
        // Every key of up to 7 words over the literals plus a word in neither pattern:
        // a shortest counterexample to inclusion is never longer than both patterns
        // together plus one.
        let mut witness = None;
        for key in all_keys(&["a", "b", "z"], 7) {
            if b.matches(&key) && !g.matches(&key) {
                witness = Some(key);
                break;
            }
        }
        prop_assert_eq!(g.covers(&b), Some(witness.is_none()), "grant {:?} binding {:?} witness {:?}", grant, binding, witness);
    }
}

/// Dot-joined words from `alphabet`, 0 to `max` of them.
fn words(alphabet: &[&'static str], max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(alphabet.to_vec()), 0..=max)
        .prop_map(|w| w.join("."))
}

fn split(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

/// Textbook recursive topic matching.
fn reference_match(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| reference_match(rest, &key[skip..])),
        Some((&"*", rest)) => !key.is_empty() && reference_match(rest, &key[1..]),
        Some((word, rest)) => key.first() == Some(word) && reference_match(rest, &key[1..]),
    }
}

fn all_keys(alphabet: &[&str], max: usize) -> Vec<String> {
    let mut keys = vec![String::new()];
    let mut layer = vec![Vec::<&str>::new()];
    for _ in 0..max {
        let mut next = Vec::new();
        for prefix in &layer {
            for word in alphabet {
                let mut key = prefix.clone();
                key.push(word);
                keys.push(key.join("."));
                next.push(key);
            }
        }
        layer = next;
    }
    keys
}

/// A topic pattern of up to 255 bytes built from hostile words: many `#` and `*` mixed
/// with literals, as an attacker would send in a subscribe frame.
fn hostile_pattern() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        proptest::sample::select(vec!["#", "*", "a", "b", "w1", ""]),
        1..128,
    )
    .prop_map(|words| {
        let mut pattern = words.join(".");
        pattern.truncate(255);
        pattern.trim_end_matches(['#', '*']).to_owned() + "#"
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Coverage of any pair of patterns is decided (or refused as too complex) within
    /// a time bound: the check is polynomial and capped, never exponential.
    #[test]
    fn coverage_of_hostile_patterns_is_decided_within_a_bound(grant in hostile_pattern(), binding in hostile_pattern()) {
        let (Ok(g), Ok(b)) = (GrantPattern::parse(&grant), GrantPattern::parse(&binding)) else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let covered = g.covers(&b);
        let everything = GrantPattern::parse("#").unwrap().covers(&b);
        prop_assert!(started.elapsed() < std::time::Duration::from_millis(500), "{:?} for {} vs {}", started.elapsed(), grant, binding);
        prop_assert_eq!(everything, Some(true));
        // Whatever is decided is right on keys the binding matches.
        if covered == Some(true) {
            for key in all_keys(&["a", "b", "z"], 4) {
                prop_assert!(!b.matches(&key) || g.matches(&key), "{} covers {} but not {}", grant, binding, key);
            }
        }
    }

    /// Any text, or JSON nested past serde's own limit, is parsed or refused as a frame
    /// quickly and without a panic.
    #[test]
    fn arbitrary_frames_are_parsed_or_refused_quickly(text in ".{0,2000}", depth in 0usize..400) {
        let started = std::time::Instant::now();
        let _ = warren::ws::protocol::parse(&text);
        let nested = format!(
            r#"{{"type":"subscribe","id":"s","exchange":"e","binding_key":{}1{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        prop_assert!(warren::ws::protocol::parse(&nested).is_err());
        prop_assert!(started.elapsed() < std::time::Duration::from_millis(200));
    }
}
