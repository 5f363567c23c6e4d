//! Token verification and the request principal: who is calling (subject), for which
//! tenant, with which scopes. Invalid tokens are 401, unknown tenants 403.

mod cache;
pub mod grants;
pub mod keys;
pub mod rules;
#[cfg(test)]
mod verify_tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, Header, Validation};
use serde_json::{Map, Value};
use tokio::task::AbortHandle;

use crate::error::ApiError;
use keys::{HmacSecret, KeyMiss, KeySources, KeyStore};
pub use rules::ClaimRules;

/// The verified content of a token.
#[derive(Debug, Clone)]
pub struct Claims {
    pub subject: String,
    pub tenant: String,
    pub scopes: Vec<String>,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Verifies tokens against the key store. The algorithm is pinned by the key: a token is
/// only ever checked with a key whose algorithm equals the token's `alg`, so `none`,
/// HS/RS confusion and a `kid` of another algorithm all fail.
pub struct Verifier {
    keys: Arc<KeyStore>,
    /// One validation per algorithm, each allowing only that algorithm.
    validations: HashMap<Algorithm, Validation>,
    tenant_claim: String,
    refresher: Option<AbortHandle>,
    /// Tokens already verified (`auth.token_cache_entries`).
    cache: cache::TokenCache,
}

impl Drop for Verifier {
    fn drop(&mut self) {
        if let Some(refresher) = &self.refresher {
            refresher.abort();
        }
    }
}

const ALGORITHMS: [Algorithm; 12] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

impl Verifier {
    /// Loads the keys (reading key files, fetching a JWKS URL once, bounded by its
    /// timeout) and starts their periodic refresh. Up to `cache_entries` verified
    /// tokens are kept (see [`cache`]); 0 verifies every token every time.
    pub async fn start(
        rules: impl Into<ClaimRules>,
        sources: &KeySources,
        cache_entries: usize,
    ) -> anyhow::Result<Self> {
        let config = rules.into();
        let keys = KeyStore::start(sources).await?;
        let refresher = keys.spawn_refresher();
        Ok(Self {
            keys,
            validations: ALGORITHMS
                .iter()
                .map(|alg| (*alg, validation(&config, *alg)))
                .collect(),
            tenant_claim: config.tenant_claim,
            refresher,
            cache: cache::TokenCache::new(cache_entries),
        })
    }

    /// The key store (tests and diagnostics).
    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// Checks the signature with the keys the token's header selects (see
    /// [`keys::KeySet::select`]), then `exp`, `nbf`, `iss`, `aud` and the tenant claim;
    /// or finds the token among those already verified with the keys in force.
    pub async fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let keys = self.keys.keys();
        let now = unix_now();
        if let Some(claims) = self.cache.get(token, &keys, now) {
            return Ok(claims);
        }
        let claims = self.verify_signed(token).await?;
        self.cache.put(token, &keys, &claims, now);
        Ok(claims)
    }

    async fn verify_signed(&self, token: &str) -> Result<Claims, ApiError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| {
            ApiError::Unauthorized(
                "the token is malformed or its header names an algorithm Warren does not accept"
                    .to_owned(),
            )
        })?;
        let kid = header.kid.as_deref();
        let mut selected = self.keys.keys().select(kid, header.alg);
        if matches!(selected, Err(KeyMiss::UnknownKid)) && self.keys.refresh_for_unknown_kid().await
        {
            selected = self.keys.keys().select(kid, header.alg);
        }
        let candidates = selected.map_err(|miss| {
            ApiError::Unauthorized(match miss {
                KeyMiss::UnknownKid => format!("no key has the token's kid {}", quoted(kid)),
                KeyMiss::OtherAlgorithm(algs) => format!(
                    "the key {} is for {}, not the token's {:?}",
                    quoted(kid),
                    algs.iter()
                        .map(|alg| format!("{alg:?}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    header.alg
                ),
                KeyMiss::NoKeyForAlgorithm => {
                    format!("no key accepts {:?} tokens", header.alg)
                }
            })
        })?;
        let validation = self.validations.get(&header.alg).ok_or_else(|| {
            ApiError::Unauthorized("the token's algorithm is not accepted".to_owned())
        })?;
        for key in &candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key.decoding_key(), validation)
            {
                Ok(data) => return self.claims(data.claims),
                // Another candidate (same kid, or no kid) may have signed it.
                Err(e) if signature_mismatch(e.kind()) => {}
                // The signature held: what failed is the token itself.
                Err(e) => return Err(ApiError::Unauthorized(describe_jwt_error(e.kind()))),
            }
        }
        Err(ApiError::Unauthorized(
            "the token's signature is invalid".to_owned(),
        ))
    }

    fn claims(&self, claims: Map<String, Value>) -> Result<Claims, ApiError> {
        let tenant = match claims.get(&self.tenant_claim) {
            Some(Value::String(t)) if !t.is_empty() => t.clone(),
            _ => {
                return Err(ApiError::Unauthorized(format!(
                    "the token has no {:?} claim naming a tenant",
                    self.tenant_claim
                )));
            }
        };
        let subject = match claims.get("sub") {
            Some(Value::String(s)) => s.clone(),
            _ => String::new(),
        };
        let scopes = match claims.get("scope") {
            Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        // `exp` is a NumericDate: JSON numbers, fractions allowed (jsonwebtoken checks it
        // as such); the whole second it falls in bounds the WebSocket's life.
        let expires_at = claims
            .get("exp")
            .and_then(|exp| {
                exp.as_u64()
                    .or_else(|| exp.as_f64().map(|f| f.max(0.0) as u64))
            })
            .unwrap_or(0);
        Ok(Claims {
            subject,
            tenant,
            scopes,
            expires_at,
        })
    }
}

/// The claim checks, allowing exactly `alg`. `iss` and `aud` are required when
/// configured (a token without them is refused, not waved through).
fn validation(config: &ClaimRules, alg: Algorithm) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = config.leeway_s;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    match &config.issuer {
        Some(issuer) => {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        None => validation.iss = None,
    }
    match &config.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// Errors that mean "not this key": the next candidate may still verify the token.
fn signature_mismatch(kind: &JwtErrorKind) -> bool {
    matches!(
        kind,
        JwtErrorKind::InvalidSignature
            | JwtErrorKind::InvalidKeyFormat
            | JwtErrorKind::InvalidRsaKey(_)
            | JwtErrorKind::InvalidEcdsaKey
            | JwtErrorKind::InvalidEddsaKey
    )
}

/// A `kid` from a token for a message: quoted, and cut short (it is the caller's text).
fn quoted(kid: Option<&str>) -> String {
    let kid = kid.unwrap_or_default();
    match kid.char_indices().nth(64) {
        Some((end, _)) => format!("{:?}...", &kid[..end]),
        None => format!("{kid:?}"),
    }
}

fn describe_jwt_error(kind: &JwtErrorKind) -> String {
    match kind {
        JwtErrorKind::ExpiredSignature => "the token has expired".to_owned(),
        JwtErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".to_owned(),
        JwtErrorKind::InvalidIssuer => "the token's issuer is not accepted".to_owned(),
        JwtErrorKind::InvalidAudience => "the token's audience is not accepted".to_owned(),
        JwtErrorKind::InvalidSignature => "the token's signature is invalid".to_owned(),
        JwtErrorKind::InvalidAlgorithm => "the token's algorithm is not accepted".to_owned(),
        JwtErrorKind::MissingRequiredClaim(claim) => {
            format!("the token lacks the required {claim:?} claim")
        }
        _ => "the token is malformed or invalid".to_owned(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parameters for minting a token (`warren token`, dev mode, tests).
pub struct TokenRequest<'a> {
    pub tenant: &'a str,
    pub subject: &'a str,
    pub scope: &'a str,
    pub ttl: std::time::Duration,
}

/// Signs a token carrying the claims Warren reads with an HMAC secret from the config
/// (its algorithm, and its `kid` in the header when it has one).
pub fn mint(
    rules: impl Into<ClaimRules>,
    secret: &HmacSecret,
    request: &TokenRequest<'_>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let config = rules.into();
    let now = unix_now();
    let mut claims = Map::new();
    claims.insert("sub".into(), request.subject.into());
    claims.insert(config.tenant_claim.clone(), request.tenant.into());
    claims.insert("scope".into(), request.scope.into());
    claims.insert("iat".into(), now.into());
    claims.insert("exp".into(), (now + request.ttl.as_secs()).into());
    if let Some(issuer) = &config.issuer {
        claims.insert("iss".into(), issuer.as_str().into());
    }
    if let Some(audience) = &config.audience {
        claims.insert("aud".into(), audience.as_str().into());
    }
    let mut header = Header::new(secret.alg);
    header.kid = secret.kid.clone();
    jsonwebtoken::encode(&header, &claims, &secret.encoding_key())
}

/// The token of an `Authorization: Bearer <jwt>` header (its raw bytes), if there is
/// one.
pub fn bearer(authorization: Option<&[u8]>) -> Result<Option<&str>, ApiError> {
    let Some(value) = authorization else {
        return Ok(None);
    };
    // What `HeaderValue::to_str` accepts: visible ASCII, spaces and tabs. (Written as
    // one test per byte with no early exit, which the compiler vectorizes: a token is a
    // few hundred bytes on every request.)
    let invalid = value
        .iter()
        .fold(false, |bad, &b| bad | ((b < 32 && b != b'\t') | (b >= 127)));
    let value = (!invalid)
        .then(|| std::str::from_utf8(value).ok())
        .flatten()
        .ok_or_else(|| {
            ApiError::Unauthorized("the Authorization header is not ASCII".to_owned())
        })?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(ApiError::Unauthorized(
            "the Authorization header must be `Bearer <token>`".to_owned(),
        )),
    }
}

#[cfg(test)]
mod bearer_tests {
    use super::bearer;

    #[test]
    fn takes_the_token_of_a_bearer_header_and_refuses_anything_else() {
        assert_eq!(bearer(None).ok(), Some(None));
        assert_eq!(bearer(Some(b"Bearer abc.def")).ok(), Some(Some("abc.def")));
        assert_eq!(bearer(Some(b"bearer \tabc ")).ok(), Some(Some("abc")));
        for bad in [
            &b"Basic abc"[..],
            b"Bearer",
            b"Bearer abc\x7f",
            b"Bearer ab\x01c",
            b"Bearer ab\xc3\xa9c",
            b"Bearer ab\nc",
        ] {
            assert!(bearer(Some(bad)).is_err(), "{bad:?}");
        }
    }
}
