//! The REST API as an OpenAPI 3.1 document, generated from the handlers'
//! annotations and the `lib/protocol` types; served at `/openapi.json` and
//! committed as `docs/openapi.json` (a test fails when the two differ).

use utoipa::{
    Modify, OpenApi,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};

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
        rest::transfer_owner,
        rest::add_members,
        rest::remove_member,
        rest::history,
        rest::message_status,
        rest::create_upload,
        rest::download_media,
        rest::healthz,
    ),
    modifiers(&Bearer),
    security(("bearer" = [])),
    tags(
        (name = "groups", description = "groups, members and ownership"),
        (name = "messages", description = "history and receipts"),
        (name = "media", description = "pre-signed uploads and downloads"),
        (name = "operations", description = "liveness"),
    )
)]
struct ApiDoc;

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
    /// `docs/openapi.json` is what the code generates. To regenerate:
    /// `UPDATE_CONTRACT=1 cargo test -p chat-edge openapi`.
    #[test]
    fn the_committed_openapi_document_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
        let now = super::json();
        if std::env::var_os("UPDATE_CONTRACT").is_some() {
            std::fs::write(path, &now).expect("write docs/openapi.json");
        }
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == now,
            "docs/openapi.json is stale: run UPDATE_CONTRACT=1 cargo test -p chat-edge openapi"
        );
        assert!(now.contains("\"openapi\": \"3.1"), "OpenAPI 3.1");
    }
}
