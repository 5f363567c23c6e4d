//! Extractors from the app state: the authenticated [`Principal`] of a `/v1` request.

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use crate::AppState;
use crate::auth;
use crate::error::ApiError;
use crate::tenancy::{self, Principal};

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = auth::bearer(parts.headers.get(AUTHORIZATION).map(|v| v.as_bytes()))?;
        tenancy::authenticate(&state.verifier, &state.tenants, token).await
    }
}
