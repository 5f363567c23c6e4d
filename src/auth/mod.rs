//! Token verification and the request principal: who is calling (subject), for which
//! tenant, with which scopes. Invalid tokens are 401, unknown tenants 403.

pub mod grants;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind as JwtErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};

use crate::AppState;
use crate::config::AuthConfig;
use crate::error::ApiError;
use crate::tenancy::Tenant;

/// What a token may do (the `scope` claim, space-separated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Publish,
    Subscribe,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Subscribe => "subscribe",
        }
    }
}

/// The verified content of a token.
#[derive(Debug, Clone)]
pub struct Claims {
    pub subject: String,
    pub tenant: String,
    pub scopes: Vec<String>,
    /// Unix seconds.
    pub expires_at: u64,
}

/// Verifies tokens against the configured key, algorithm pinned by the key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    tenant_claim: String,
}

impl Verifier {
    pub fn new(config: &AuthConfig, hs256_secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.leeway_s;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &config.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        Self {
            key: DecodingKey::from_secret(hs256_secret),
            validation,
            tenant_claim: config.tenant_claim.clone(),
        }
    }

    pub fn verify(&self, token: &str) -> Result<Claims, ApiError> {
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, &self.key, &self.validation)
            .map_err(|e| ApiError::Unauthorized(describe_jwt_error(e.kind())))?;
        let claims = data.claims;
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
        let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        Ok(Claims {
            subject,
            tenant,
            scopes,
            expires_at,
        })
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

/// Parameters for minting a token (`warren token`, dev mode, tests).
pub struct TokenRequest<'a> {
    pub tenant: &'a str,
    pub subject: &'a str,
    pub scope: &'a str,
    pub ttl: std::time::Duration,
}

/// Signs an HS256 token carrying the claims Warren reads.
pub fn mint(
    config: &AuthConfig,
    hs256_secret: &[u8],
    request: &TokenRequest<'_>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
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
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(hs256_secret),
    )
}

/// The authenticated caller of a `/v1` request.
#[derive(Clone)]
pub struct Principal {
    pub tenant: Arc<Tenant>,
    pub subject: String,
    pub scopes: Vec<String>,
    pub expires_at: u64,
}

impl Principal {
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.iter().any(|s| s == scope.as_str()) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "the token's scope does not include {:?}",
                scope.as_str()
            )))
        }
    }
}

/// Reads `Authorization: Bearer <jwt>` and resolves the tenant.
pub fn authenticate(state: &AppState, token: Option<&str>) -> Result<Principal, ApiError> {
    let token =
        token.ok_or_else(|| ApiError::Unauthorized("a bearer token is required".to_owned()))?;
    let claims = state.verifier.verify(token)?;
    let tenant = state.tenants.get(&claims.tenant)?;
    Ok(Principal {
        tenant,
        subject: claims.subject,
        scopes: claims.scopes,
        expires_at: claims.expires_at,
    })
}

fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    let Some(value) = parts.headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthorized("the Authorization header is not ASCII".to_owned()))?;
    match value.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => Ok(Some(token.trim())),
        _ => Err(ApiError::Unauthorized(
            "the Authorization header must be `Bearer <token>`".to_owned(),
        )),
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer(parts)?;
        authenticate(state, token)
    }
}
