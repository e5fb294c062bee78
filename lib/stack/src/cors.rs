//! A CORS front for `s3s-fs`, which answers no preflight: what an
//! operator's bucket CORS rule does on a real S3 (OPERATIONS.md), so that a
//! browser can PUT to a pre-signed upload URL and show media from another
//! origin. Every request but a preflight goes through unchanged (method,
//! path, query, headers including `Host`, and the body, streamed), so the
//! server still checks every signature against what the client signed.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{net::TcpListener, task::JoinHandle};

/// The front, serving until dropped.
#[derive(Debug)]
pub struct CorsFront {
    /// `http://127.0.0.1:PORT`: give this to clients instead of the server's.
    pub endpoint: String,
    task: JoinHandle<()>,
    refuse_deletes: Arc<AtomicBool>,
}

impl Drop for CorsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct Upstream {
    client: Client<HttpConnector, Body>,
    authority: String,
    refuse_deletes: Arc<AtomicBool>,
}

impl CorsFront {
    /// Serves on a free loopback port in front of `upstream`
    /// (`http://host:port`).
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let uri: Uri = upstream.parse()?;
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow::anyhow!("no host in {upstream}"))?
            .to_string();
        let refuse_deletes = Arc::new(AtomicBool::new(false));
        let state = Upstream {
            client: Client::builder(TokioExecutor::new()).build_http(),
            authority,
            refuse_deletes: refuse_deletes.clone(),
        };
        let app = Router::new().fallback(forward).with_state(state);
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::warn!(error = %e, "the S3 CORS front stopped");
            }
        });
        Ok(Self {
            endpoint,
            task,
            refuse_deletes,
        })
    }

    /// From now on (or no longer), answers every delete with 403 Access
    /// Denied, as a bucket policy that forbids deletes would: an object
    /// store that keeps an object the system asked it to delete.
    pub fn refuse_deletes(&self, on: bool) {
        self.refuse_deletes.store(on, Ordering::Relaxed);
    }
}

fn allow(headers: &mut HeaderMap) {
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("ETag"),
    );
}

async fn forward(State(up): State<Upstream>, mut req: Request) -> Response {
    let headers = req.headers();
    if req.method() == Method::OPTIONS
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        allow(h);
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, HEAD, PUT"),
        );
        if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        return r;
    }
    // a delete is a DELETE, or a POST of `?delete` (DeleteObjects, which
    // object_store sends for one key too)
    let deletes = req.method() == Method::DELETE
        || (req.method() == Method::POST && req.uri().query() == Some("delete"));
    if deletes && up.refuse_deletes.load(Ordering::Relaxed) {
        return (
            StatusCode::FORBIDDEN,
            "<Error><Code>AccessDenied</Code><Message>deletes are refused</Message></Error>",
        )
            .into_response();
    }
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let Ok(uri) = format!("http://{}{path}", up.authority).parse::<Uri>() else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    // `Host` stays the one the client sent (and signed)
    *req.uri_mut() = uri;
    match up.client.request(req).await {
        Ok(r) => {
            let (mut parts, body) = r.into_parts();
            allow(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Err(e) => {
            tracing::warn!(error = %e, "the S3 server did not answer the CORS front");
            StatusCode::BAD_GATEWAY.into_response()
        }
    }
}
