//! The authenticated caller of a REST request or WebSocket upgrade.

use axum::{extract::FromRequestParts, http::request::Parts};
use chat_auth::{AuthError, Identity};

use crate::{ApiError, AppState};

/// Extracts and verifies `Authorization: Bearer <jwt>`; a missing or bad
/// token is a 401 before the handler runs.
#[derive(Debug, Clone)]
pub struct Caller(pub Identity);

pub(crate) fn bearer(parts: &Parts) -> Option<&str> {
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts).ok_or(AuthError::Missing)?;
        Ok(Caller(state.verifier.verify(token)?))
    }
}
