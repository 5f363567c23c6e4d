//! A CloudEvent 1.0 as Warren reads it over HTTP: binary mode (`ce-*` headers, the body
//! as data), structured mode (`application/cloudevents+json`) and batches
//! (`application/cloudevents-batch+json`), validated per the spec with every error
//! naming the attribute at fault. Also writes an event as structured JSON. Pure.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use serde_json::value::RawValue;

use crate::rfc3339::parse_rfc3339;

/// The only CloudEvents version Warren accepts.
pub const SPECVERSION: &str = "1.0";
/// Attribute names are lower-case letters and digits, at most this long.
pub const MAX_NAME_LEN: usize = 20;
/// At most this many extension attributes per event (each becomes an AMQP header).
pub const MAX_EXTENSIONS: usize = 32;
/// The attributes the spec defines; every other one is an extension.
const REQUIRED: [&str; 4] = ["specversion", "id", "source", "type"];
const OPTIONAL: [&str; 4] = ["datacontenttype", "dataschema", "subject", "time"];

/// An attribute value. Binary mode carries only strings; structured JSON may also carry
/// booleans and integers (extensions), which the AMQP binding writes as strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    String(String),
    Boolean(bool),
    Integer(i64),
}

impl Value {
    /// The string form (RabbitMQ binding headers): `true`, `42`, or the string.
    pub fn to_header(&self) -> String {
        match self {
            Self::String(s) => s.clone(),
            Self::Boolean(b) => b.to_string(),
            Self::Integer(i) => i.to_string(),
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    fn write_json(&self, out: &mut String) {
        match self {
            Self::String(s) => push_json_string(out, s),
            Self::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
            Self::Integer(i) => out.push_str(&i.to_string()),
        }
    }
}

/// The event's data.
#[derive(Debug, Clone)]
pub enum Data {
    None,
    /// Structured mode's `data` member, verbatim.
    Json(Box<RawValue>),
    /// A binary-mode body, or structured mode's `data_base64` decoded.
    Bytes(Bytes),
}

/// A validated CloudEvent: every attribute (required, optional and extensions) by
/// name, and its data.
#[derive(Debug, Clone)]
pub struct Event {
    attributes: BTreeMap<String, Value>,
    data: Data,
}

impl Event {
    fn string(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).and_then(Value::as_str)
    }

    pub fn id(&self) -> &str {
        self.string("id").unwrap_or_default()
    }

    pub fn source(&self) -> &str {
        self.string("source").unwrap_or_default()
    }

    /// The `type` attribute.
    pub fn kind(&self) -> &str {
        self.string("type").unwrap_or_default()
    }

    pub fn datacontenttype(&self) -> Option<&str> {
        self.string("datacontenttype")
    }

    /// `time` as Unix seconds, when set (validated at parse time).
    pub fn unix_time(&self) -> Option<i64> {
        self.string("time").and_then(parse_rfc3339)
    }

    /// Every attribute but `datacontenttype` (which is the content type in binary
    /// mode), by name.
    pub fn header_attributes(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.attributes
            .iter()
            .filter(|(name, _)| *name != "datacontenttype")
            .map(|(name, value)| (name.as_str(), value))
    }

    /// The data as bytes on the wire (binary mode): a JSON `data` member as its JSON
    /// text, except that a JSON string with a non-JSON `datacontenttype` is the string
    /// itself (the JSON format's rule for text data).
    pub fn body(&self) -> Bytes {
        match &self.data {
            Data::None => Bytes::new(),
            Data::Bytes(bytes) => bytes.clone(),
            Data::Json(raw) => {
                if !is_json_type(self.datacontenttype())
                    && let Ok(text) = serde_json::from_str::<String>(raw.get())
                {
                    return Bytes::from(text);
                }
                Bytes::copy_from_slice(raw.get().as_bytes())
            }
        }
    }

    /// The event in the JSON format (`application/cloudevents+json`): required
    /// attributes first, then the rest by name, then `data` or `data_base64`.
    pub fn to_structured_json(&self) -> String {
        let mut out = String::from("{");
        let ordered = REQUIRED
            .iter()
            .filter_map(|name| self.attributes.get_key_value(*name))
            .chain(
                self.attributes
                    .iter()
                    .filter(|(name, _)| !REQUIRED.contains(&name.as_str())),
            );
        for (i, (name, value)) in ordered.enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_json_string(&mut out, name);
            out.push(':');
            value.write_json(&mut out);
        }
        match &self.data {
            Data::None => {}
            Data::Json(raw) => {
                out.push_str(",\"data\":");
                out.push_str(raw.get());
            }
            Data::Bytes(bytes) => write_data(&mut out, self.datacontenttype(), bytes),
        }
        out.push('}');
        out
    }
}

/// Appends `,"data":…` or `,"data_base64":…` for `body` of content type `content_type`:
/// JSON content (or none declared, which the JSON format reads as JSON) that parses as
/// JSON goes verbatim as `data`; text that is UTF-8 as a `data` string; everything else,
/// and anything that does not fit its declared type, as `data_base64`. An empty body
/// writes nothing.
pub fn write_data(out: &mut String, content_type: Option<&str>, body: &[u8]) {
    if body.is_empty() {
        return;
    }
    let text = std::str::from_utf8(body).ok();
    if is_json_type(content_type)
        && let Some(raw) = text.and_then(|t| serde_json::from_str::<&RawValue>(t).ok())
    {
        out.push_str(",\"data\":");
        out.push_str(raw.get());
        return;
    }
    if is_text_type(content_type)
        && let Some(text) = text
    {
        out.push_str(",\"data\":");
        push_json_string(out, text);
        return;
    }
    out.push_str(",\"data_base64\":\"");
    out.push_str(&BASE64.encode(body));
    out.push('"');
}

fn essence(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
}

/// `application/json`, `text/json`, `*/*+json`; and no content type at all, which the
/// JSON format reads as `application/json`.
pub fn is_json_type(content_type: Option<&str>) -> bool {
    let Some(content_type) = content_type else {
        return true;
    };
    let essence = essence(content_type);
    essence == "application/json" || essence == "text/json" || essence.ends_with("+json")
}

/// Text that a JSON string carries faithfully: `text/*` and XML.
fn is_text_type(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let essence = essence(ct);
        essence.starts_with("text/") || essence == "application/xml" || essence.ends_with("+xml")
    })
}

pub(super) fn push_json_string(out: &mut String, text: &str) {
    // Serialising a &str cannot fail.
    out.push_str(&serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned()));
}

/// A name as it may appear in an error detail: quoted, and cut short when long.
fn shown(name: &str) -> String {
    let cut: String = name.chars().take(40).collect();
    if cut.len() < name.len() {
        format!("{:?}…", cut)
    } else {
        format!("{cut:?}")
    }
}

/// Lower-case ASCII letters and digits, 1 to [`MAX_NAME_LEN`] characters.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!(
            "{}: attribute names are 1-{MAX_NAME_LEN} lower-case letters (a-z) and digits",
            shown(name)
        ));
    }
    if name == "data" {
        return Err("data: is the event's data, not an attribute".to_owned());
    }
    Ok(())
}

/// Checks the attributes per the spec; each error starts with the attribute's name.
fn validate(attributes: BTreeMap<String, Value>, data: Data) -> Result<Event, String> {
    for name in REQUIRED {
        match attributes.get(name) {
            None => return Err(format!("{name}: required attribute is missing")),
            Some(Value::String(s)) if s.is_empty() => {
                return Err(format!("{name}: must not be empty"));
            }
            Some(Value::String(_)) => {}
            Some(_) => return Err(format!("{name}: must be a string")),
        }
    }
    if attributes.get("specversion").and_then(Value::as_str) != Some(SPECVERSION) {
        return Err(format!(
            "specversion: must be \"{SPECVERSION}\" (the only CloudEvents version accepted)"
        ));
    }
    for name in OPTIONAL {
        match attributes.get(name) {
            None | Some(Value::String(_)) => {}
            Some(_) => return Err(format!("{name}: must be a string")),
        }
        if attributes.get(name).and_then(Value::as_str) == Some("") {
            return Err(format!("{name}: must not be empty when present"));
        }
    }
    let source = attributes.get("source").and_then(Value::as_str);
    if source.is_some_and(|s| s.chars().any(is_space_or_control)) {
        return Err("source: must be a URI-reference (no spaces or control characters)".into());
    }
    if let Some(time) = attributes.get("time").and_then(Value::as_str)
        && parse_rfc3339(time).is_none()
    {
        return Err("time: must be an RFC 3339 timestamp (2026-11-29T10:00:00Z)".to_owned());
    }
    if let Some(schema) = attributes.get("dataschema").and_then(Value::as_str)
        && !is_absolute_uri(schema)
    {
        return Err("dataschema: must be an absolute URI".to_owned());
    }
    let extensions = attributes
        .keys()
        .filter(|name| !REQUIRED.contains(&name.as_str()) && !OPTIONAL.contains(&name.as_str()))
        .count();
    if extensions > MAX_EXTENSIONS {
        return Err(format!(
            "extensions: {extensions} extension attributes; at most {MAX_EXTENSIONS} are accepted"
        ));
    }
    Ok(Event { attributes, data })
}

/// A scheme (`letter *( letter / digit / + - . )`) followed by `:`, and no spaces.
fn is_absolute_uri(text: &str) -> bool {
    let Some((scheme, _)) = text.split_once(':') else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !text.chars().any(is_space_or_control)
}

/// What a URI never holds: white space (JSON Schema's `\s`, which counts U+FEFF) and
/// control characters.
fn is_space_or_control(c: char) -> bool {
    c.is_whitespace() || c.is_control() || c == '\u{feff}'
}

/// Structured mode: one event as a JSON object.
pub fn from_structured(raw: &[u8]) -> Result<Event, String> {
    let members: BTreeMap<String, &RawValue> = serde_json::from_slice(raw)
        .map_err(|e| format!("invalid JSON body: a structured event must be a JSON object: {e}"))?;
    from_members(members)
}

fn from_members(members: BTreeMap<String, &RawValue>) -> Result<Event, String> {
    let mut attributes = BTreeMap::new();
    let mut data = Data::None;
    let mut base64 = None;
    for (name, raw) in members {
        match name.as_str() {
            "data" => {
                if raw.get() != "null" {
                    data = Data::Json(raw.to_owned());
                }
            }
            "data_base64" => {
                let text: String = serde_json::from_str(raw.get())
                    .map_err(|_| "data_base64: must be a base64 string".to_owned())?;
                base64 = Some(text);
            }
            _ => {
                check_name(&name)?;
                let value: serde_json::Value =
                    serde_json::from_str(raw.get()).map_err(|e| format!("{name}: {e}"))?;
                let value = match value {
                    serde_json::Value::String(s) => Value::String(s),
                    serde_json::Value::Bool(b) => Value::Boolean(b),
                    serde_json::Value::Number(n) => match n.as_i64() {
                        Some(i) if i32::try_from(i).is_ok() => Value::Integer(i),
                        _ => {
                            return Err(format!(
                                "{name}: a number must be an integer from -2147483648 to 2147483647"
                            ));
                        }
                    },
                    _ => {
                        return Err(format!("{name}: must be a string, a boolean or an integer"));
                    }
                };
                attributes.insert(name, value);
            }
        }
    }
    if let Some(text) = base64 {
        if matches!(data, Data::Json(_)) {
            return Err("data_base64: set only one of data and data_base64".to_owned());
        }
        let bytes = BASE64
            .decode(text.as_bytes())
            .map_err(|_| "data_base64: not valid base64".to_owned())?;
        data = Data::Bytes(bytes.into());
    }
    validate(attributes, data)
}

/// A batch: a JSON array of structured events; errors are prefixed with `[i].`.
/// `Err(Ok(n))` when it holds `n` events, more than `max`.
pub fn from_batch(raw: &[u8], max: usize) -> Result<Vec<Event>, BatchError> {
    let items: Vec<&RawValue> = serde_json::from_slice(raw).map_err(|e| {
        BatchError::Invalid(format!(
            "invalid JSON body: a batch must be a JSON array of events: {e}"
        ))
    })?;
    if items.is_empty() {
        return Err(BatchError::Invalid(
            "a batch needs at least one event".to_owned(),
        ));
    }
    if items.len() > max {
        return Err(BatchError::TooMany(items.len()));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, raw)| {
            from_structured(raw.get().as_bytes())
                .map_err(|e| BatchError::Invalid(format!("[{i}].{e}")))
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchError {
    Invalid(String),
    TooMany(usize),
}

/// Binary mode: every `ce-` header is an attribute (its value percent-decoded, as the
/// HTTP binding says), `content_type` is `datacontenttype`, the body is the data.
pub fn from_binary<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<Event, String> {
    let mut attributes = BTreeMap::new();
    let mut any = false;
    for (header, value) in headers {
        let Some(name) = header
            .get(..3)
            .filter(|p| p.eq_ignore_ascii_case("ce-"))
            .map(|_| header[3..].to_ascii_lowercase())
        else {
            continue;
        };
        any = true;
        check_name(&name)?;
        if name == "datacontenttype" {
            return Err(
                "datacontenttype: in binary mode it is the Content-Type header, \
                        not ce-datacontenttype"
                    .to_owned(),
            );
        }
        // A value whose %-sequences do not decode to UTF-8 was not percent-encoded by
        // its sender: it is kept as sent.
        let text = String::from_utf8(percent_decode(value))
            .or_else(|_| String::from_utf8(value.to_vec()))
            .map_err(|_| format!("{name}: must be UTF-8 (percent-encoded)"))?;
        if attributes
            .insert(name.clone(), Value::String(text))
            .is_some()
        {
            return Err(format!("{name}: sent more than once"));
        }
    }
    if !any {
        return Err(
            "specversion: required attribute is missing: send the attributes as \
                    ce-* headers (binary mode), or the event as application/cloudevents+json \
                    (structured mode)"
                .to_owned(),
        );
    }
    if let Some(ct) = content_type {
        attributes.insert("datacontenttype".to_owned(), Value::String(ct.to_owned()));
    }
    let data = if body.is_empty() {
        Data::None
    } else {
        Data::Bytes(body)
    };
    validate(attributes, data)
}

/// `%xy` sequences become the byte they name; anything else stays as it is.
fn percent_decode(value: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] == b'%'
            && let (Some(h), Some(l)) = (
                value.get(i + 1).copied().and_then(hex),
                value.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(value[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"specversion":"1.0","id":"1","source":"/s","type":"t"}"#;

    fn with(extra: &str) -> Result<Event, String> {
        from_structured(format!("{}{extra}}}", &MINIMAL[..MINIMAL.len() - 1]).as_bytes())
    }

    #[test]
    fn structured_events_keep_attributes_and_data() {
        let e = with(r#","time":"2026-11-29T10:00:00Z","subject":"x","datacontenttype":"application/json","count":5,"flag":true,"data":{"a": [1, 2]}"#).unwrap();
        assert_eq!((e.id(), e.source(), e.kind()), ("1", "/s", "t"));
        assert_eq!(e.unix_time(), Some(1_795_946_400));
        assert_eq!(&e.body()[..], br#"{"a": [1, 2]}"#);
        let headers: Vec<_> = e
            .header_attributes()
            .map(|(n, v)| (n.to_owned(), v.to_header()))
            .collect();
        assert!(headers.contains(&("count".into(), "5".into())));
        assert!(headers.contains(&("flag".into(), "true".into())));
        assert!(!headers.iter().any(|(n, _)| n == "datacontenttype"));
        let json: serde_json::Value = serde_json::from_str(&e.to_structured_json()).unwrap();
        assert_eq!(json["count"], 5);
        assert_eq!(json["data"]["a"][1], 2);
        assert!(
            e.to_structured_json()
                .starts_with(r#"{"specversion":"1.0","id":"1""#)
        );

        let e = with(r#","data_base64":"AAH/""#).unwrap();
        assert_eq!(&e.body()[..], &[0, 1, 255]);
        assert!(
            e.to_structured_json()
                .ends_with(r#","data_base64":"AAH/"}"#)
        );

        // Text data with a text content type is the string itself on the wire.
        let e = with(r#","datacontenttype":"text/plain","data":"h\u00e9""#).unwrap();
        assert_eq!(&e.body()[..], "hé".as_bytes());
        // A JSON string with a JSON (or no) content type stays JSON.
        let e = with(r#","data":"hi""#).unwrap();
        assert_eq!(&e.body()[..], br#""hi""#);
        assert!(with(r#","data":null"#).unwrap().body().is_empty());
    }

    #[test]
    fn invalid_attributes_are_named() {
        let cases = [
            (r#"{"id":"1","source":"/s","type":"t"}"#, "specversion:"),
            (
                r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
                "specversion:",
            ),
            (
                r#"{"specversion":1.0,"id":"1","source":"/s","type":"t"}"#,
                "specversion:",
            ),
            (r#"{"specversion":"1.0","source":"/s","type":"t"}"#, "id:"),
            (
                r#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#,
                "id:",
            ),
            (r#"{"specversion":"1.0","id":"1","type":"t"}"#, "source:"),
            (
                r#"{"specversion":"1.0","id":"1","source":"a b","type":"t"}"#,
                "source:",
            ),
            (r#"{"specversion":"1.0","id":"1","source":"/s"}"#, "type:"),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":7}"#,
                "type:",
            ),
        ];
        for (json, prefix) in cases {
            let err = from_structured(json.as_bytes()).unwrap_err();
            assert!(err.starts_with(prefix), "{json}: {err}");
        }
        for (extra, prefix) in [
            (r#","time":"yesterday""#, "time:"),
            (r#","time":"2026-11-29T10:00:00""#, "time:"),
            (r#","subject":"""#, "subject:"),
            (r#","dataschema":"/relative""#, "dataschema:"),
            (r#","datacontenttype":5"#, "datacontenttype:"),
            (r#","Upper":"x""#, "\"Upper\":"),
            (r#","with_underscore":"x""#, "\"with_underscore\":"),
            (
                r#","abcdefghijklmnopqrstu":"x""#,
                "\"abcdefghijklmnopqrstu\":",
            ),
            (r#","ext":1.5"#, "ext:"),
            (r#","ext":4294967296"#, "ext:"),
            (r#","ext":{"a":1}"#, "ext:"),
            (r#","data":1,"data_base64":"AA==""#, "data_base64:"),
            (r#","data_base64":"!!""#, "data_base64:"),
        ] {
            let err = with(extra).unwrap_err();
            assert!(err.starts_with(prefix), "{extra}: {err}");
        }
        let many: String = (0..=MAX_EXTENSIONS)
            .map(|i| format!(r#","x{i}":"v""#))
            .collect();
        assert!(with(&many).unwrap_err().starts_with("extensions:"));
        let enough: String = (0..MAX_EXTENSIONS)
            .map(|i| format!(r#","x{i}":"v""#))
            .collect();
        assert!(with(&enough).is_ok());
        assert!(with(r#","abcdefghijklmnopqrst":"x""#).is_ok());
        assert!(
            from_structured(b"[1]")
                .unwrap_err()
                .starts_with("invalid JSON body")
        );
    }

    #[test]
    fn binary_mode_reads_percent_encoded_headers() {
        let headers: Vec<(&str, &[u8])> = vec![
            ("ce-specversion", b"1.0"),
            ("ce-id", b"a%2Fb"),
            ("ce-source", b"%2Fsensors%2F%C3%A9"),
            ("CE-Type", b"t.created"),
            ("ce-time", b"2026-11-29T10%3A00%3A00Z"),
            ("ce-myext", b"100%"),
            ("content-length", b"3"),
        ];
        let e = from_binary(
            headers,
            Some("application/octet-stream"),
            Bytes::from_static(b"\x00\x01\xff"),
        )
        .unwrap();
        assert_eq!(
            (e.id(), e.source(), e.kind()),
            ("a/b", "/sensors/é", "t.created")
        );
        assert_eq!(e.unix_time(), Some(1_795_946_400));
        assert_eq!(e.datacontenttype(), Some("application/octet-stream"));
        assert_eq!(&e.body()[..], b"\x00\x01\xff");
        let json: serde_json::Value = serde_json::from_str(&e.to_structured_json()).unwrap();
        assert_eq!(json["data_base64"], "AAH/");
        assert_eq!(json["myext"], "100%");

        let err = from_binary(
            [("content-type", &b"application/json"[..])],
            Some("application/json"),
            Bytes::new(),
        )
        .unwrap_err();
        assert!(
            err.starts_with("specversion:") && err.contains("ce-* headers"),
            "{err}"
        );
        let base: Vec<(&str, &[u8])> = vec![
            ("ce-specversion", b"1.0"),
            ("ce-id", b"1"),
            ("ce-source", b"/s"),
        ];
        let err = from_binary(base.clone(), None, Bytes::new()).unwrap_err();
        assert!(err.starts_with("type:"), "{err}");
        let mut dup = base.clone();
        dup.extend([("ce-type", &b"t"[..]), ("ce-id", &b"2"[..])]);
        assert!(
            from_binary(dup, None, Bytes::new())
                .unwrap_err()
                .starts_with("id:")
        );
        let mut bad = base.clone();
        bad.extend([("ce-type", &b"t"[..]), ("ce-datacontenttype", &b"x/y"[..])]);
        assert!(
            from_binary(bad, None, Bytes::new())
                .unwrap_err()
                .starts_with("datacontenttype:")
        );
        let mut bad = base;
        bad.extend([("ce-type", &b"t"[..]), ("ce-bad_name", &b"x"[..])]);
        assert!(
            from_binary(bad, None, Bytes::new())
                .unwrap_err()
                .starts_with("\"bad_name\":")
        );
    }

    #[test]
    fn batches_name_the_item() {
        let ok = format!("[{MINIMAL},{MINIMAL}]");
        assert_eq!(from_batch(ok.as_bytes(), 2).unwrap().len(), 2);
        assert_eq!(
            from_batch(ok.as_bytes(), 1).unwrap_err(),
            BatchError::TooMany(2)
        );
        let bad = format!(r#"[{MINIMAL},{{"specversion":"1.0","id":"2","source":"/s"}}]"#);
        assert!(
            matches!(from_batch(bad.as_bytes(), 9), Err(BatchError::Invalid(e)) if e.starts_with("[1].type:"))
        );
        assert!(matches!(from_batch(b"[]", 9), Err(BatchError::Invalid(_))));
        assert!(matches!(from_batch(b"{}", 9), Err(BatchError::Invalid(_))));
    }

    #[test]
    fn data_is_written_by_content_type() {
        let data = |ct: Option<&str>, body: &[u8]| {
            let mut out = String::new();
            write_data(&mut out, ct, body);
            out
        };
        assert_eq!(
            data(Some("application/json"), br#"{"a":1}"#),
            r#","data":{"a":1}"#
        );
        assert_eq!(data(None, b"[1]"), r#","data":[1]"#);
        assert_eq!(
            data(Some("application/cloudevents+json; charset=utf-8"), b"2"),
            r#","data":2"#
        );
        assert_eq!(
            data(Some("application/json"), b"{oops"),
            r#","data_base64":"e29vcHM=""#
        );
        assert_eq!(
            data(Some("text/plain"), "é\"".as_bytes()),
            r#","data":"é\"""#
        );
        assert_eq!(
            data(Some("text/plain"), b"\xff"),
            r#","data_base64":"/w==""#
        );
        assert_eq!(
            data(Some("application/octet-stream"), b"hi"),
            r#","data_base64":"aGk=""#
        );
        assert_eq!(data(None, b"plain"), r#","data_base64":"cGxhaW4=""#);
        assert_eq!(data(Some("text/plain"), b""), "");
    }
}
