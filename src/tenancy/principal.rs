//! The authenticated caller: a verified token's claims resolved to a tenant. Lives
//! with the tenants (auth only verifies tokens), so the layers stay one-way:
//! tenancy → auth, never back.

use std::sync::Arc;

use super::{Tenant, Tenants};
use crate::auth::Verifier;
use crate::error::ApiError;

/// What a token may do (the `scope` claim, space-separated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Publish,
    Subscribe,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Publish => "publish",
            Self::Subscribe => "subscribe",
        }
    }
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

/// Verifies the bearer token and resolves the tenant.
pub async fn authenticate(
    verifier: &Verifier,
    tenants: &Tenants,
    token: Option<&str>,
) -> Result<Principal, ApiError> {
    let token =
        token.ok_or_else(|| ApiError::Unauthorized("a bearer token is required".to_owned()))?;
    let claims = verifier.verify(token).await?;
    let tenant = tenants.get(&claims.tenant)?;
    tracing::Span::current().record("tenant", tenant.name.as_str());
    Ok(Principal {
        tenant,
        subject: claims.subject,
        scopes: claims.scopes,
        expires_at: claims.expires_at,
    })
}
