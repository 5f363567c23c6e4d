//! CloudEvents on AMQP 0-9-1, both ways. Out: an event becomes the publish service's
//! [`Request`] in the RabbitMQ protocol binding's binary mode (`ce-<name>` string headers,
//! data as the body, `datacontenttype` as `content_type`) or, when asked, structured mode;
//! `message_id` is the event's `id` and `timestamp` its `time`. In: a delivery becomes a
//! structured CloudEvent JSON, rebuilt from `ce-` headers (or the AMQP 1.0 binding's
//! `cloudEvents_`/`cloudEvents:` prefixes), taken from a structured body, or synthesized
//! from the AMQP properties. Pure.

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};

use super::event::{Event, push_json_string, write_data};
use crate::publishing::{Limits, Prepared, Properties, Request, TraceContext};
use crate::rfc3339::{format_rfc3339, parse_rfc3339};

/// The content type of structured mode (JSON format).
pub const STRUCTURED: &str = "application/cloudevents+json";
/// The content type of a batch.
pub const BATCH: &str = "application/cloudevents-batch+json";

/// How an event is carried on AMQP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// The RabbitMQ binding's binary mode (the default).
    #[default]
    Binary,
    /// The whole event as `application/cloudevents+json` in the body.
    Structured,
}

/// Where an event goes.
#[derive(Debug, Clone)]
pub struct Destination {
    pub exchange: String,
    /// `None`: the event's `type`.
    pub routing_key: Option<String>,
    pub mode: Mode,
    /// Publish later (SPEC §15, the `delay_ms` query parameter).
    pub delay_ms: Option<u64>,
}

impl Destination {
    pub fn routing_key<'a>(&'a self, event: &'a Event) -> &'a str {
        self.routing_key.as_deref().unwrap_or(event.kind())
    }
}

/// The event as a validated AMQP message, through the same [`Request::prepare`] as any
/// publish (exchange, routing key, header table bounds, trace context), then given the
/// event's own body, content type and timestamp. Errors name the attribute.
pub fn prepare(
    event: &Event,
    destination: &Destination,
    trace: &TraceContext,
    limits: Limits,
) -> Result<Prepared, String> {
    if event.id().len() > 255 {
        return Err("id: must be at most 255 bytes (it is the AMQP message_id)".to_owned());
    }
    if event.kind().len() > 255 {
        return Err("type: must be at most 255 bytes (it is the default routing key)".to_owned());
    }
    let (headers, content_type, body) = match destination.mode {
        Mode::Binary => {
            let headers: serde_json::Map<String, serde_json::Value> = event
                .header_attributes()
                .map(|(name, value)| (format!("ce-{name}"), value.to_header().into()))
                .collect();
            (Some(headers), event.datacontenttype(), event.body())
        }
        Mode::Structured => (
            None,
            Some(STRUCTURED),
            bytes::Bytes::from(event.to_structured_json()),
        ),
    };
    if let Some(ct) = content_type
        && ct.len() > 255
    {
        return Err(
            "datacontenttype: must be at most 255 bytes (it is the AMQP content_type)".into(),
        );
    }
    let request = Request {
        exchange: destination.exchange.clone(),
        routing_key: destination.routing_key(event).to_owned(),
        // A placeholder: the event's data is bytes already, set below once validated.
        payload: None,
        body: Some(String::new()),
        body_base64: None,
        content_type: None,
        properties: Properties {
            message_id: Some(event.id().to_owned()),
            headers,
            ..Properties::default()
        },
        mandatory: None,
        delay_ms: destination.delay_ms,
        not_before: None,
    };
    let mut prepared = request.prepare(trace, None, limits).map_err(|e| {
        match e.strip_prefix("properties.headers") {
            Some(rest) => format!("attributes (as AMQP headers){rest}"),
            None => e,
        }
    })?;
    // `prepare` set the defaults of a text body; an event says its own.
    let built = &prepared.message.properties;
    let mut properties = BasicProperties::default()
        .with_message_id(prepared.message_id.as_str().into())
        .with_delivery_mode(2);
    if let Some(ts) = event
        .unix_time()
        .and_then(|t| u64::try_from(t).ok())
        .or(*built.timestamp())
    {
        properties = properties.with_timestamp(ts);
    }
    if let Some(ct) = content_type {
        properties = properties.with_content_type(ct.into());
    }
    if let Some(headers) = built.headers() {
        properties = properties.with_headers(headers.clone());
    }
    prepared.message.properties = properties;
    prepared.message.body = body.to_vec().into();
    Ok(prepared)
}

/// Where a delivery came from, for attributes a non-CloudEvents message lacks.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub tenant: &'a str,
    pub exchange: &'a str,
}

impl Origin<'_> {
    /// `/warren/<tenant>/<exchange>` (each segment percent-encoded; the default
    /// exchange is `amq.default`).
    pub fn source(&self) -> String {
        let exchange = if self.exchange.is_empty() {
            "amq.default"
        } else {
            self.exchange
        };
        format!(
            "/warren/{}/{}",
            encode_segment(self.tenant),
            encode_segment(exchange)
        )
    }
}

fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The header prefixes that mark CloudEvents attributes: the RabbitMQ binding's, and the
/// AMQP 1.0 binding's two (application properties).
const PREFIXES: [&str; 3] = ["ce-", "cloudEvents_", "cloudEvents:"];

/// A delivery as a structured CloudEvent (JSON text): for SSE and WebSocket subscribers
/// that ask for `format: cloudevents`. See [`render`].
pub fn delivery_json(delivery: &Delivery, tenant: &str, exchange: &str) -> String {
    render(
        &delivery.properties,
        &delivery.data,
        delivery.routing_key.as_str(),
        Origin { tenant, exchange },
    )
}

/// A message as a structured CloudEvent (JSON text):
/// - a structured body (`application/cloudevents+json` holding a valid event) as it is;
/// - a binary-mode event (a `specversion` header under one of [`PREFIXES`]): its
///   attributes from those headers, `datacontenttype` from `content_type`, the data from
///   the body;
/// - anything else synthesized: `id` = `message_id`, `type` = AMQP `type` or the routing
///   key, `source` = [`Origin::source`], `time` = `timestamp`, `datacontenttype` =
///   `content_type`.
///
/// Required attributes a binary-mode event lacks are filled in the synthesized way, so
/// the result is a valid event; headers that would make an invalid one are ignored and
/// the event synthesized. A message without `message_id` gets a fresh id.
pub fn render(
    properties: &BasicProperties,
    body: &[u8],
    routing_key: &str,
    origin: Origin<'_>,
) -> String {
    let content_type = properties.content_type().as_ref().map(|c| c.as_str());
    if content_type.is_some_and(|ct| {
        ct.get(..STRUCTURED.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(STRUCTURED))
    }) && super::event::from_structured(body).is_ok()
        && let Ok(text) = std::str::from_utf8(body)
    {
        return text.trim().to_owned();
    }
    let from_headers = properties
        .headers()
        .as_ref()
        .map(header_attributes)
        .unwrap_or_default();
    if from_headers.is_empty() {
        return render_attributes(properties, body, routing_key, origin, from_headers);
    }
    let event = render_attributes(properties, body, routing_key, origin, from_headers);
    // Headers another producer wrote can make an invalid event (a `source` with a space,
    // a `specversion` of 2.0); the subscriber is then given the synthesized event, never
    // an invalid one.
    if super::event::from_structured(event.as_bytes()).is_ok() {
        return event;
    }
    render_attributes(properties, body, routing_key, origin, Vec::new())
}

fn render_attributes(
    properties: &BasicProperties,
    body: &[u8],
    routing_key: &str,
    origin: Origin<'_>,
    mut attributes: Vec<(String, serde_json::Value)>,
) -> String {
    let content_type = properties.content_type().as_ref().map(|c| c.as_str());
    let has = |attributes: &[(String, serde_json::Value)], name: &str| {
        attributes.iter().any(|(n, _)| n == name)
    };
    if !has(&attributes, "specversion") {
        // Not a binary-mode event: every attribute is synthesized.
        attributes.clear();
        attributes.push(("specversion".into(), "1.0".into()));
        if let Some(ts) = properties.timestamp() {
            attributes.push(("time".into(), format_rfc3339(*ts).into()));
        }
    }
    if !has(&attributes, "id") {
        let id = properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_else(|| crate::ids::uuid_v4().to_string());
        attributes.push(("id".into(), id.into()));
    }
    if !has(&attributes, "source") {
        attributes.push(("source".into(), origin.source().into()));
    }
    if !has(&attributes, "type") {
        let kind = properties
            .kind()
            .as_ref()
            .map(|k| k.as_str())
            .unwrap_or(routing_key);
        attributes.push(("type".into(), kind.into()));
    }
    attributes.retain(|(name, _)| name != "datacontenttype");
    if let Some(ct) = content_type {
        attributes.push(("datacontenttype".into(), ct.into()));
    }
    let order = |name: &str| match name {
        "specversion" => 0,
        "id" => 1,
        "source" => 2,
        "type" => 3,
        _ => 4,
    };
    attributes.sort_by(|(a, _), (b, _)| order(a).cmp(&order(b)).then_with(|| a.cmp(b)));
    let mut out = String::from("{");
    for (i, (name, value)) in attributes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, name);
        out.push(':');
        out.push_str(&value.to_string());
    }
    write_data(&mut out, content_type, body);
    out.push('}');
    out
}

/// The attributes of the CloudEvents headers, by lower-case name (first one wins).
/// Strings stay strings; booleans and integers (AMQP 1.0 typed properties) keep their
/// type; an AMQP timestamp becomes RFC 3339; names that are not valid attribute names
/// and values with no CloudEvents type are left out.
fn header_attributes(headers: &FieldTable) -> Vec<(String, serde_json::Value)> {
    let mut out: Vec<(String, serde_json::Value)> = Vec::new();
    for (name, value) in headers.inner() {
        let name = name.as_str();
        let Some(attribute) = PREFIXES.iter().find_map(|p| {
            name.get(..p.len())
                .filter(|head| head.eq_ignore_ascii_case(p))
                .map(|_| name[p.len()..].to_ascii_lowercase())
        }) else {
            continue;
        };
        let valid = !attribute.is_empty()
            && attribute.len() <= super::event::MAX_NAME_LEN
            && attribute
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && attribute != "data";
        if !valid || out.iter().any(|(n, _)| *n == attribute) {
            continue;
        }
        let value = match value {
            AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned().into(),
            AMQPValue::ShortString(s) => s.as_str().into(),
            AMQPValue::Boolean(b) => (*b).into(),
            AMQPValue::ShortShortInt(n) => (*n).into(),
            AMQPValue::ShortShortUInt(n) => (*n).into(),
            AMQPValue::ShortInt(n) => (*n).into(),
            AMQPValue::ShortUInt(n) => (*n).into(),
            AMQPValue::LongInt(n) => (*n).into(),
            AMQPValue::LongUInt(n) => (*n).into(),
            AMQPValue::LongLongInt(n) => (*n).into(),
            AMQPValue::Timestamp(t) => format_rfc3339(*t).into(),
            _ => continue,
        };
        out.push((attribute, value));
    }
    // `time` as a string must be RFC 3339 to be a valid event; drop it otherwise.
    out.retain(|(name, value)| name != "time" || value.as_str().and_then(parse_rfc3339).is_some());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloudevents::event::{from_binary, from_structured};
    use serde_json::{Value, json};

    fn origin() -> Origin<'static> {
        Origin {
            tenant: "acme",
            exchange: "ev ents",
        }
    }

    fn destination(mode: Mode) -> Destination {
        Destination {
            exchange: "events".into(),
            routing_key: None,
            mode,
            delay_ms: None,
        }
    }

    #[test]
    fn binary_mode_follows_the_rabbitmq_binding() {
        let event = from_structured(
            br#"{"specversion":"1.0","id":"e-1","source":"/s","type":"order.created","time":"2026-11-29T10:00:00Z",
                "datacontenttype":"application/json","count":3,"data":{"n":1}}"#,
        )
        .unwrap();
        let trace = TraceContext {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: None,
        };
        let p = prepare(
            &event,
            &destination(Mode::Binary),
            &trace,
            Limits::default(),
        )
        .unwrap();
        let props = &p.message.properties;
        assert_eq!(p.message.routing_key, "order.created");
        assert_eq!(&p.message.body[..], br#"{"n":1}"#);
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "e-1");
        assert_eq!(p.message_id, "e-1");
        assert_eq!(props.timestamp(), &Some(1_795_946_400));
        assert_eq!(
            props.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
        assert_eq!(props.delivery_mode(), &Some(2));
        assert!(p.message.mandatory);
        let headers = props.headers().as_ref().unwrap().inner();
        let s = |n: &str| match headers.get(n) {
            Some(AMQPValue::LongString(s)) => s.to_string(),
            other => panic!("{n}: {other:?}"),
        };
        assert_eq!(s("ce-specversion"), "1.0");
        assert_eq!(s("ce-id"), "e-1");
        assert_eq!(s("ce-source"), "/s");
        assert_eq!(s("ce-type"), "order.created");
        assert_eq!(s("ce-time"), "2026-11-29T10:00:00Z");
        assert_eq!(s("ce-count"), "3");
        assert!(headers.get("ce-datacontenttype").is_none());
        assert!(headers.contains_key("traceparent"));

        // Rendered back, the same event.
        let back: Value =
            serde_json::from_str(&render(props, &p.message.body, "order.created", origin()))
                .unwrap();
        assert_eq!(
            back,
            json!({"specversion":"1.0","id":"e-1","source":"/s","type":"order.created","count":"3",
                   "datacontenttype":"application/json","time":"2026-11-29T10:00:00Z","data":{"n":1}})
        );
    }

    #[test]
    fn no_content_type_and_no_time_stay_absent() {
        let event = from_binary(
            [
                ("ce-specversion", &b"1.0"[..]),
                ("ce-id", b"1"),
                ("ce-source", b"/s"),
                ("ce-type", b"t"),
            ],
            None,
            bytes::Bytes::from_static(b"\x00\x01"),
        )
        .unwrap();
        let mut d = destination(Mode::Binary);
        d.routing_key = Some("rk".into());
        let p = prepare(&event, &d, &TraceContext::default(), Limits::default()).unwrap();
        assert_eq!(p.message.routing_key, "rk");
        assert!(p.message.properties.content_type().is_none());
        assert!(
            p.message.properties.timestamp().is_some(),
            "the publish time"
        );
        let back: Value = serde_json::from_str(&render(
            &p.message.properties,
            &p.message.body,
            "rk",
            origin(),
        ))
        .unwrap();
        assert_eq!(
            back,
            json!({"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"AAE="})
        );
    }

    #[test]
    fn structured_mode_keeps_the_event_in_the_body() {
        let event = from_structured(
            br#"{"specversion":"1.0","id":"e-2","source":"/s","type":"t","data_base64":"AAH/"}"#,
        )
        .unwrap();
        let p = prepare(
            &event,
            &destination(Mode::Structured),
            &TraceContext::default(),
            Limits::default(),
        )
        .unwrap();
        let props = &p.message.properties;
        assert_eq!(props.content_type().as_ref().unwrap().as_str(), STRUCTURED);
        assert!(props.headers().is_none());
        let body: Value = serde_json::from_slice(&p.message.body).unwrap();
        assert_eq!(body["data_base64"], "AAH/");
        assert_eq!(body["id"], "e-2");
        let back: Value =
            serde_json::from_str(&render(props, &p.message.body, "t", origin())).unwrap();
        assert_eq!(back, body);
    }

    #[test]
    fn limits_name_the_attribute() {
        let long = "x".repeat(256);
        let event = from_structured(
            format!(r#"{{"specversion":"1.0","id":"{long}","source":"/s","type":"t"}}"#).as_bytes(),
        )
        .unwrap();
        let err = prepare(
            &event,
            &destination(Mode::Binary),
            &TraceContext::default(),
            Limits::default(),
        )
        .unwrap_err();
        assert!(err.starts_with("id:"), "{err}");
        let event = from_structured(
            format!(r#"{{"specversion":"1.0","id":"1","source":"/s","type":"{long}"}}"#).as_bytes(),
        )
        .unwrap();
        let err = prepare(
            &event,
            &destination(Mode::Binary),
            &TraceContext::default(),
            Limits::default(),
        )
        .unwrap_err();
        assert!(err.starts_with("type:"), "{err}");
        let big = "v".repeat(2000);
        let event = from_structured(
            format!(r#"{{"specversion":"1.0","id":"1","source":"/s","type":"t","big":"{big}"}}"#)
                .as_bytes(),
        )
        .unwrap();
        let err = prepare(
            &event,
            &destination(Mode::Binary),
            &TraceContext::default(),
            Limits {
                max_headers_bytes: 1024,
                ..Limits::default()
            },
        )
        .unwrap_err();
        assert!(err.starts_with("attributes (as AMQP headers):"), "{err}");
        assert!(!err.contains("properties"), "{err}");
    }

    #[test]
    fn other_bindings_and_plain_messages_are_recognized() {
        let mut headers = FieldTable::default();
        headers.insert(
            "cloudEvents_specversion".into(),
            AMQPValue::LongString("1.0".into()),
        );
        headers.insert("cloudEvents:id".into(), AMQPValue::LongString("x".into()));
        headers.insert(
            "cloudEvents_source".into(),
            AMQPValue::LongString("/amqp".into()),
        );
        headers.insert("cloudEvents_type".into(), AMQPValue::LongString("t".into()));
        headers.insert("cloudEvents_time".into(), AMQPValue::Timestamp(0));
        headers.insert("cloudEvents_seq".into(), AMQPValue::LongLongInt(7));
        headers.insert("cloudEvents_flag".into(), AMQPValue::Boolean(true));
        headers.insert(
            "cloudEvents_bad_name".into(),
            AMQPValue::LongString("no".into()),
        );
        headers.insert("other".into(), AMQPValue::LongString("no".into()));
        let props = BasicProperties::default()
            .with_headers(headers)
            .with_content_type("text/plain".into());
        let v: Value = serde_json::from_str(&render(&props, b"hi", "rk", origin())).unwrap();
        assert_eq!(
            v,
            json!({"specversion":"1.0","id":"x","source":"/amqp","type":"t","datacontenttype":"text/plain",
                   "flag":true,"seq":7,"time":"1970-01-01T00:00:00Z","data":"hi"})
        );

        // A plain message: everything synthesized.
        let props = BasicProperties::default()
            .with_message_id("m-1".into())
            .with_timestamp(1_795_946_400)
            .with_content_type("application/json".into());
        let v: Value =
            serde_json::from_str(&render(&props, br#"{"a":1}"#, "order.created", origin()))
                .unwrap();
        assert_eq!(
            v,
            json!({"specversion":"1.0","id":"m-1","source":"/warren/acme/ev%20ents","type":"order.created",
                   "datacontenttype":"application/json","time":"2026-11-29T10:00:00Z","data":{"a":1}})
        );
        let props = BasicProperties::default().with_type("audit".into());
        let v: Value = serde_json::from_str(&render(
            &props,
            b"",
            "rk",
            Origin {
                tenant: "t",
                exchange: "",
            },
        ))
        .unwrap();
        assert_eq!(v["type"], "audit");
        assert_eq!(v["source"], "/warren/t/amq.default");
        assert!(uuid::Uuid::parse_str(v["id"].as_str().unwrap()).is_ok());
        assert!(v.get("data").is_none() && v.get("data_base64").is_none());

        // A structured body that is not JSON, or not a valid event, is not a structured
        // event: synthesized around it.
        let props = BasicProperties::default().with_content_type(STRUCTURED.into());
        let v: Value = serde_json::from_str(&render(&props, b"{oops", "rk", origin())).unwrap();
        assert_eq!(v["data_base64"], "e29vcHM=");
        assert_eq!(v["type"], "rk");
        let v: Value = serde_json::from_str(&render(
            &props,
            br#"{"specversion":"1.0","id":"x"}"#,
            "rk",
            origin(),
        ))
        .unwrap();
        assert_eq!(v["type"], "rk");
        assert_eq!(v["data"], json!({"specversion":"1.0","id":"x"}));
    }

    #[test]
    fn headers_that_make_an_invalid_event_give_way_to_the_synthesized_one() {
        for (name, value) in [("ce-source", "/has space"), ("ce-specversion", "2.0")] {
            let mut headers = FieldTable::default();
            headers.insert("ce-specversion".into(), AMQPValue::LongString("1.0".into()));
            headers.insert("ce-id".into(), AMQPValue::LongString("e1".into()));
            headers.insert(name.into(), AMQPValue::LongString(value.into()));
            let props = BasicProperties::default()
                .with_headers(headers)
                .with_message_id("m-1".into());
            let text = render(&props, b"", "rk", origin());
            assert!(
                super::super::event::from_structured(text.as_bytes()).is_ok(),
                "{text}"
            );
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["id"], "m-1", "{name}");
            assert_eq!(v["source"], "/warren/acme/ev%20ents", "{name}");
        }
    }
}
