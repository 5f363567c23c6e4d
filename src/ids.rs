//! Random identifiers: message ids, request ids, consumer tags, lock tokens.
//!
//! `uuid::Uuid::new_v4` asks the kernel for 16 random bytes on every call (a
//! `getrandom` system call); a publish made two of them. These come from the
//! thread-local generator of `rand` (ChaCha12, seeded from the OS and reseeded), which
//! is as unpredictable and costs no system call.

use axum::http::{HeaderValue, Request};
use tower_http::request_id::{MakeRequestId, RequestId};

/// A random (version 4) UUID.
pub fn uuid_v4() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid()
}

/// `x-request-id` for a request that comes without one.
#[derive(Clone, Copy, Default)]
pub struct MakeRequestUuid;

impl MakeRequestId for MakeRequestUuid {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid_v4().hyphenated().encode_lower(&mut text);
        HeaderValue::from_str(id).ok().map(RequestId::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_4_and_distinct() {
        let (a, b) = (uuid_v4(), uuid_v4());
        assert_eq!(a.get_version(), Some(uuid::Version::Random));
        assert_eq!(a.get_variant(), uuid::Variant::RFC4122);
        assert_ne!(a, b);
    }
}
