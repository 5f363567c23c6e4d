//! CloudEvents HTTP binary mode for push deliveries (`format = "cloudevents"`): the
//! message rendered as the structured event subscribers get (`cloudevents::render`),
//! then written as `ce-<attribute>` headers, the data as the body and
//! `datacontenttype` as the `Content-Type`.

use lapin::message::Delivery;

/// The request body, with the event's headers added to `headers`.
pub fn binary(
    delivery: &Delivery,
    tenant: &str,
    headers: &mut Vec<(http::HeaderName, http::HeaderValue)>,
) -> bytes::Bytes {
    let structured =
        crate::cloudevents::delivery_json(delivery, tenant, delivery.exchange.as_str());
    // `render` always writes a valid event; should it ever not, the raw body goes out
    // without attributes rather than not at all.
    let Ok(event) = crate::cloudevents::from_structured(structured.as_bytes()) else {
        return bytes::Bytes::from(delivery.data.clone());
    };
    for (name, value) in event.header_attributes() {
        let name = http::HeaderName::from_bytes(format!("ce-{name}").as_bytes());
        let value = http::HeaderValue::from_str(&percent_encode(&value.to_header()));
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.push((name, value));
        }
    }
    if let Some(content_type) = event
        .datacontenttype()
        .and_then(|ct| http::HeaderValue::from_str(ct).ok())
    {
        headers.push((http::header::CONTENT_TYPE, content_type));
    }
    event.body()
}

/// The CloudEvents HTTP binding's header encoding: printable ASCII as it is, except
/// space, `"` and `%`, which are percent-encoded like every byte of a non-ASCII or
/// control character.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_graphic() && byte != b'"' && byte != b'%' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use lapin::BasicProperties;
    use lapin::types::{AMQPValue, FieldTable};

    use super::*;

    #[test]
    fn a_binary_mode_event_keeps_its_attributes_and_data() {
        let mut table = FieldTable::default();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-id", "e1"),
            ("ce-source", "/sensors/7é\"%"),
            ("ce-type", "reading"),
        ] {
            table.insert(k.into(), AMQPValue::LongString(v.into()));
        }
        let mut delivery =
            Delivery::mock(1, "ex".into(), "k".into(), false, b"{\"t\":21}".to_vec());
        delivery.properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_headers(table);
        let mut headers = Vec::new();
        let body = binary(&delivery, "acme", &mut headers);
        assert_eq!(&body[..], b"{\"t\":21}");
        let get = |n: &str| {
            headers
                .iter()
                .find(|(name, _)| name.as_str() == n)
                .and_then(|(_, v)| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(get("ce-id").as_deref(), Some("e1"));
        assert_eq!(get("ce-source").as_deref(), Some("/sensors/7%C3%A9%22%25"));
        assert_eq!(get("content-type").as_deref(), Some("application/json"));
        assert_eq!(get("ce-datacontenttype"), None);
    }
}
