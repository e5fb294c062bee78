//! The authenticated caller of a REST request or WebSocket upgrade.

use axum::{
    extract::FromRequestParts,
    http::request::Parts,
    response::{IntoResponse, Response},
};
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

/// The WebSocket subprotocol a browser offers, next to its token, when it
/// cannot set an `Authorization` header: `Sec-WebSocket-Protocol: chat.v1,
/// bearer.<jwt>`. The edge answers `chat.v1`; the token never appears in a
/// URL, so no access log records it.
pub(crate) const WS_PROTOCOL: &str = "chat.v1";
const WS_BEARER_PREFIX: &str = "bearer.";

/// The token offered as a WebSocket subprotocol (`bearer.<jwt>`), if any.
pub(crate) fn subprotocol_bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get_all(axum::http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(WS_BEARER_PREFIX))
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    /// Verifies the token, then counts the call against the user's rate
    /// limit (a `429` with `Retry-After` over it).
    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = bearer(parts)
            .ok_or(AuthError::Missing)
            .map_err(|e| ApiError::from(e).into_response())?;
        let me = state
            .verifier
            .verify(token)
            .map_err(|e| ApiError::from(e).into_response())?;
        state
            .limits
            .user(&me.user_id)
            .map_err(IntoResponse::into_response)?;
        Ok(Caller(me))
    }
}
