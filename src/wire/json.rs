//! JSON read with the path of the first problem (`messages[3].routing_key: ...`), the
//! same for a request body and a WebSocket frame.

use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Parses JSON, reporting the path of the first problem (`messages[3].routing_key: ...`).
/// A body that parses is parsed once, without path tracking (which costs about a third
/// more); only a bad one is parsed again to find the path.
pub fn parse_json<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    if let Ok(value) = serde_json::from_slice(raw) {
        return Ok(value);
    }
    let mut deserializer = serde_json::Deserializer::from_slice(raw);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::InvalidRequest(format!("invalid JSON body: {inner}"))
        } else {
            ApiError::InvalidRequest(format!("{path}: {inner}"))
        }
    })?;
    deserializer
        .end()
        .map_err(|e| ApiError::InvalidRequest(format!("invalid JSON body: {e}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Item {
        name: String,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Outer {
        items: Vec<Item>,
    }

    #[test]
    fn errors_name_the_path() {
        let err = parse_json::<Outer>(br#"{"items":[{"name":"a"},{"name":5}]}"#).unwrap_err();
        assert!(err.to_string().starts_with("items[1].name:"), "{err}");
        let err = parse_json::<Outer>(b"{not json").unwrap_err();
        assert_eq!(err.code(), "invalid_request");
        let err = parse_json::<Outer>(br#"{"items":[]} trailing"#).unwrap_err();
        assert_eq!(err.code(), "invalid_request");
    }
}
