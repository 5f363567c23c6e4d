//! The JSON body extractor (and [`RawBody`] for any content type): 415 for non-JSON, 413 over `server.max_body_bytes`, 408 when
//! the body does not arrive within `server.body_read_timeout_s`, and 400 naming the JSON
//! path of whatever is wrong. Rejections use our problem+json format.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use crate::AppState;
use crate::error::ApiError;
use crate::wire::parse_json;

/// A parsed JSON body, with the raw bytes kept (for fingerprints and verbatim payloads).
pub struct JsonBody<T> {
    pub value: T,
    pub raw: Bytes,
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        check_content_type(request.headers().get(CONTENT_TYPE))?;
        let RawBody(raw) = RawBody::from_request(request, state).await?;
        let value = parse_json(&raw)?;
        Ok(Self { value, raw })
    }
}

/// A body of any content type, read under the same size and time limits (for
/// CloudEvents in binary mode, whose body is the event's data).
pub struct RawBody(pub Bytes);

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        let limit = state.config.server.max_body_bytes;
        let too_large = || {
            ApiError::PayloadTooLarge(format!(
                "the request body exceeds server.max_body_bytes ({limit} bytes)"
            ))
        };
        let declared = request
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > limit as u64) {
            return Err(too_large());
        }
        let timeout = std::time::Duration::from_secs(state.config.server.body_read_timeout_s);
        let read = tokio::time::timeout(timeout, read_limited(request.into_body(), limit));
        let raw = read
            .await
            .map_err(|_| {
                ApiError::RequestTimeout(format!(
                    "the request body did not arrive within server.body_read_timeout_s ({} s)",
                    timeout.as_secs()
                ))
            })?
            .map_err(|e| match e {
                ReadError::TooLarge => too_large(),
                ReadError::Io(detail) => {
                    ApiError::InvalidRequest(format!("could not read the request body: {detail}"))
                }
            })?;
        Ok(Self(raw))
    }
}

enum ReadError {
    TooLarge,
    Io(String),
}

async fn read_limited(body: Body, limit: usize) -> Result<Bytes, ReadError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if err.is::<http_body_util::LengthLimitError>() {
                return ReadError::TooLarge;
            }
            source = err.source();
        }
        ReadError::Io(e.to_string())
    })
}

fn check_content_type(value: Option<&axum::http::HeaderValue>) -> Result<(), ApiError> {
    let unsupported = || {
        ApiError::UnsupportedMediaType(
            "the request body must be JSON (Content-Type: application/json)".to_owned(),
        )
    };
    let value = value
        .and_then(|v| v.to_str().ok())
        .ok_or_else(unsupported)?;
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
    {
        Ok(())
    } else {
        Err(unsupported())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn content_types() {
        let ok = |s: &'static str| check_content_type(Some(&HeaderValue::from_static(s))).is_ok();
        assert!(ok("application/json"));
        assert!(ok("Application/JSON; charset=utf-8"));
        assert!(ok("application/merge-patch+json"));
        assert!(!ok("text/plain"));
        assert!(!ok("application/jsonx"));
        assert!(check_content_type(None).is_err());
    }
}
