//! The web client (`web/client/`, plain ES modules compiled into the binary)
//! at `/app/`, its configuration, and the development stack's token
//! minting (`POST /dev/token`).
//!
//! The files are served with a strict Content-Security-Policy: scripts
//! only from this origin, no inline script, no framing. Media and uploads
//! go to the object store's own origin (pre-signed URLs), which the edge
//! does not know, so images, media and connections may reach any origin.

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{StatusCode, header},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
};
use chat_domain::UserId;
use chat_protocol::{DevToken, DevTokenBody, ErrorCode, WebConfig};

use crate::{ApiError, AppState, rest::Body};

/// One file of the client: name under `/app/`, content type, content.
type Asset = (&'static str, &'static str, &'static str);

const JS: &str = "text/javascript; charset=utf-8";

const ASSETS: &[Asset] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("../../../web/client/index.html"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../../web/client/style.css"),
    ),
    ("app.js", JS, include_str!("../../../web/client/app.js")),
    ("api.js", JS, include_str!("../../../web/client/api.js")),
    (
        "socket.js",
        JS,
        include_str!("../../../web/client/socket.js"),
    ),
    (
        "devices.js",
        JS,
        include_str!("../../../web/client/devices.js"),
    ),
];

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self' ws: wss: http: https:; img-src 'self' http: https: blob: data:; \
    media-src 'self' http: https: blob:; form-action 'none'; base-uri 'none'; \
    frame-ancestors 'none'";

/// How long a minted development token lives.
const DEV_TOKEN_SECS: i64 = 24 * 3600;

/// The client's routes (unless switched off), and `/dev/token` only when
/// the edge mints tokens.
pub(crate) fn routes(state: &AppState) -> Router<AppState> {
    let mut r = Router::new();
    if state.config.web_app {
        r = r
            .route("/app", get(|| async { Redirect::permanent("/app/") }))
            .route("/app/", get(|| async { asset("index.html") }))
            .route("/app/config.json", get(config))
            .route(
                "/app/{file}",
                get(|Path(file): Path<String>| async move { asset(&file) }),
            );
    }
    if state.config.dev_token_secret.is_some() {
        r = r.route("/dev/token", post(dev_token));
    }
    r
}

/// On an edge that mints tokens, every request must be addressed to
/// `localhost` (or a name under it) or to an IP address: a web page the
/// developer visits could otherwise point a name of its own at this
/// machine (DNS rebinding), read the answers as its own origin's, mint
/// itself a token and read the local stack's chat. Anything else gets 421.
pub(crate) async fn addressed_locally(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("?"));
    match host {
        Some(host) if !local_host(host) => ApiError::new(
            ErrorCode::Forbidden,
            "this development server answers only requests addressed to localhost or an IP address",
        )
        .with_status(StatusCode::MISDIRECTED_REQUEST)
        .into_response(),
        _ => next.run(req).await,
    }
}

/// Whether a `Host` header names `localhost`, a name under it, or an IP
/// address (no DNS answer stands behind those), with or without a port.
fn local_host(host: &str) -> bool {
    let port_ok = |port: &str| port.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = host.strip_prefix('[') {
        // [v6] or [v6]:port
        return rest.split_once(']').is_some_and(|(ip, after)| {
            ip.parse::<std::net::Ipv6Addr>().is_ok()
                && (after.is_empty() || after.strip_prefix(':').is_some_and(port_ok))
        });
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port_ok(port) => name,
        Some(_) => return false,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name.parse::<std::net::Ipv4Addr>().is_ok()
        || name == "localhost"
        || name.ends_with(".localhost")
}

fn asset(name: &str) -> Response {
    let Some((_, kind, body)) = ASSETS.iter().find(|(n, _, _)| *n == name) else {
        return ApiError::new(ErrorCode::NotFound, "no such file").into_response();
    };
    (
        [
            (header::CONTENT_TYPE, *kind),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // the binary is the version: revalidate rather than serve stale
            (header::CACHE_CONTROL, "no-cache"),
        ],
        *body,
    )
        .into_response()
}

async fn config(State(app): State<AppState>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(WebConfig {
            dev_tokens: app.config.dev_token_secret.is_some(),
        }),
    )
}

/// `POST /dev/token {userId, name?}`: a token for any user, signed with the
/// edge's HS256 secret. Only on development stacks (`--dev-tokens`): it
/// lets anyone who reaches the edge act as anyone.
#[utoipa::path(post, path = "/dev/token", tag = "development",
    security(),
    request_body = DevTokenBody,
    responses(
        (status = 200, description = "a token valid for a day (only with `--dev-tokens`; otherwise 404)", body = DevToken),
        (status = 400, description = "`invalid`: not a user id", body = chat_protocol::RestError),
    ))]
pub(crate) async fn dev_token(
    State(app): State<AppState>,
    Body(body): Body<DevTokenBody>,
) -> Result<impl IntoResponse, ApiError> {
    let Some(secret) = app.config.dev_token_secret.as_deref() else {
        return Err(ApiError::new(ErrorCode::NotFound, "no such endpoint"));
    };
    let user = UserId::parse_new(body.user_id).map_err(|e| ApiError::invalid(e.to_string()))?;
    let name = body.name.filter(|n| !n.trim().is_empty());
    if name.as_ref().is_some_and(|n| n.chars().count() > 128) {
        return Err(ApiError::invalid("name must be at most 128 characters"));
    }
    let token =
        chat_auth::mint_hs256(secret, &user, name.as_deref(), DEV_TOKEN_SECS).map_err(|e| {
            tracing::error!(error = %e, "cannot mint a development token");
            ApiError::new(ErrorCode::Internal, "internal error")
        })?;
    tracing::info!(user = %user, "minted a development token");
    Ok((
        StatusCode::OK,
        [(header::CACHE_CONTROL, "no-store")],
        Json(DevToken { token }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_is_served_and_nothing_else() {
        for (name, kind, body) in ASSETS {
            let r = asset(name);
            assert_eq!(r.status(), StatusCode::OK, "{name}");
            assert_eq!(r.headers()[header::CONTENT_TYPE], *kind);
            assert!(
                r.headers()[header::CONTENT_SECURITY_POLICY]
                    .to_str()
                    .is_ok_and(|c| c.contains("script-src 'self'"))
            );
            assert!(!body.is_empty(), "{name} is empty");
        }
        for name in ["../Cargo.toml", "missing.js", "", ".."] {
            assert_eq!(asset(name).status(), StatusCode::NOT_FOUND, "{name}");
        }
    }

    #[test]
    fn the_page_loads_only_its_own_modules() {
        let (_, _, index) = ASSETS[0];
        // no inline script (the policy would block it) and every module local
        assert!(!index.contains("<script>"), "inline script in index.html");
        for remote in ["src=\"http", "href=\"http", "src=\"//", "href=\"//"] {
            assert!(!index.contains(remote), "index.html loads {remote}…");
        }
    }

    #[test]
    fn only_localhost_and_ip_addresses_are_local_hosts() {
        for host in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "192.168.1.20:8080",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(local_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io:8080",
            "[::1].evil",
            "[evil]:8080",
            "?",
            "",
        ] {
            assert!(!local_host(host), "{host}");
        }
    }
}
