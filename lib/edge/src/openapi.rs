//! The REST API as an OpenAPI 3.1 document, generated from the handlers'
//! annotations and the `lib/protocol` types; served at `/openapi.json` and
//! committed as `docs/openapi.json` (a test fails when the two differ).

use utoipa::{
    Modify, OpenApi,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};

use chat_protocol::RestError;

use crate::rest;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "chat",
        version = "1",
        description = "REST half of the group chat client contract (PROTOCOL.md). \
            The WebSocket half is described in docs/asyncapi.json.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    paths(
        rest::create_group,
        rest::list_groups,
        rest::get_group,
        rest::group_presence,
        rest::mentions,
        rest::list_blocks,
        rest::block_user,
        rest::unblock_user,
        rest::update_group,
        rest::delete_group,
        rest::list_pins,
        rest::search,
        rest::create_invite,
        rest::list_invites,
        rest::revoke_invite,
        rest::join_group,
        rest::pin_message,
        rest::unpin_message,
        rest::mute_group,
        rest::unmute_group,
        rest::transfer_owner,
        rest::add_members,
        rest::remove_member,
        rest::history,
        rest::message_status,
        rest::create_upload,
        rest::release_upload,
        rest::download_media,
        rest::media_url,
        rest::healthz,
        crate::web::dev_token,
    ),
    modifiers(&Bearer),
    security(("bearer" = [])),
    tags(
        (name = "groups", description = "groups, members and ownership"),
        (name = "messages", description = "history and receipts"),
        (name = "users", description = "whom the caller blocks from adding them to groups"),
        (name = "media", description = "pre-signed uploads and downloads"),
        (name = "operations", description = "liveness"),
        (name = "development", description = "only on development stacks (`chatd --dev-tokens`)"),
    )
)]
struct ApiDoc;

/// What any authenticated call may answer besides its own result.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // described, never built
pub(crate) enum CallerErrors {
    /// `invalid` or `too_large`
    #[response(status = 400)]
    Invalid(RestError),
    /// no valid token
    #[response(status = 401)]
    Unauthorized(RestError),
    /// `rate_limited`; see `Retry-After`
    #[response(status = 429)]
    RateLimited(RestError),
    /// `unavailable`: retry
    #[response(status = 503)]
    Unavailable(RestError),
}

/// What a call about one group may answer besides [`CallerErrors`].
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)] // described, never built
pub(crate) enum GroupErrors {
    /// not a member (or not the owner)
    #[response(status = 403)]
    Forbidden(RestError),
    /// no such group
    #[response(status = 404)]
    NotFound(RestError),
}

/// Every call but `/healthz` takes a JWT as `Authorization: Bearer`.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let mut http = Http::new(HttpAuthScheme::Bearer);
        http.bearer_format = Some("JWT".into());
        components.add_security_scheme("bearer", SecurityScheme::Http(http));
    }
}

/// The document, pretty-printed as committed.
pub fn json() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    /// `docs/openapi.json` is what the code generates.
    #[test]
    fn the_committed_openapi_document_is_current() {
        let now = super::json();
        crate::assert_committed("openapi.json", &now);
        assert!(now.contains("\"openapi\": \"3.1"), "OpenAPI 3.1");
    }
}
