//! The edge role: an axum app with the REST API and the WebSocket endpoint.
//!
//! An edge verifies JWTs, keeps only per-connection state, turns client
//! requests into gRPC calls on workers, and streams each connected device's
//! deliveries from its JetStream durable consumers to the socket. It never
//! talks to MongoDB or object storage.

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::DefaultBodyLimit,
    routing::{delete, get, post, put},
};
use chat_auth::Verifier;
use chat_bus::Bus;
use chat_crypto::KeyRing;
use tokio::net::TcpListener;

pub mod asyncapi;
mod auth;
mod error;
mod evictions;
mod limits;
mod live;
pub mod openapi;
mod presence;
mod rest;
mod signals;
pub mod telemetry;
mod web;
mod workers;
mod ws;

pub use auth::Caller;
pub use error::ApiError;
pub use workers::Workers;

/// What an edge needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Worker gRPC endpoints (`http://host:port`), balanced across.
    pub workers: Vec<String>,
    /// Deadline of every worker call.
    pub rpc_timeout: Duration,
    /// Largest WebSocket frame handled; larger ones get `too_large` and the
    /// connection stays open.
    pub max_frame_bytes: usize,
    /// Largest WebSocket message accepted at all; past it the connection is
    /// closed (1009), since the client is abusing it.
    pub max_ws_message_bytes: usize,
    /// Largest REST body.
    pub max_body_bytes: usize,
    /// Frames queued for one connection before it counts as too slow and is
    /// closed.
    pub outbox_frames: usize,
    /// Bytes queued for one connection at most (frames and the deliveries
    /// they come from): with tungstenite's write buffer (2 MiB at most) and
    /// one read (`max_ws_message_bytes`), what a connection can hold.
    pub outbox_bytes: usize,
    /// How long one write or flush to a socket may take: a client that stops
    /// reading is closed after it (1013), its unwritten deliveries handed
    /// back.
    pub write_timeout: Duration,
    /// A busy connection (a frame or more per this, sustained over ten of
    /// them) that flushed less than this ago lets the next frames gather
    /// for the rest of it and writes them at once (replies to requests
    /// excepted); `ZERO`: a write whenever its queue runs dry. Costs a busy
    /// connection at most this much latency.
    pub write_coalesce: Duration,
    /// Live group frames per second past which the edge's coalescing
    /// window stretches to (connections writing them ÷ this), at most five
    /// times `write_coalesce`, so that its writes stay near this many a
    /// second; 0: it never stretches (`ws/load.rs`).
    pub write_budget: u64,
    /// Requests per second per connection, sustained.
    pub requests_per_sec: f64,
    /// WebSocket requests per second of all of one user's connections on
    /// this edge together (burst: twice that); 0 for no limit.
    pub user_ws_requests_per_sec: f64,
    /// REST calls and WebSocket upgrades per second per user (burst: twice
    /// that); 0 for no limit.
    pub user_requests_per_sec: f64,
    /// Requests per second per client address, before authentication
    /// (burst: twice that); 0 for no limit. Behind a load balancer every
    /// client has its address: limit there, or raise this.
    pub address_requests_per_sec: f64,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body, from the
    /// moment a handler starts to read it (past it: 408, and the
    /// connection closes).
    pub body_read_timeout: Duration,
    /// Most connections served at once; more wait to be accepted.
    pub max_connections: usize,
    /// Most WebSocket connections one user may have open on this edge;
    /// past it an upgrade gets `429`.
    pub max_connections_per_user: usize,
    /// Requests a connection may burst above the sustained rate.
    pub request_burst: f64,
    /// Error replies in a row after which a connection is closed as abusive.
    pub max_errors_in_a_row: u32,
    /// The secret every worker call carries, once the worker proved it.
    pub service_secret: Option<chat_rpc::ServiceSecret>,
    /// TLS to the workers: every worker URL is then `https://`, and each
    /// worker's certificate is checked against its CA.
    pub worker_tls: Option<chat_rpc::ClientTls>,
    /// Serve the web client at `/app/`.
    pub web_app: bool,
    /// Take a WebSocket's token from `?token=` (which proxies may log);
    /// when off, only the header and the subprotocol.
    pub ws_query_token: bool,
    /// Development stacks only: `POST /dev/token` mints HS256 tokens for
    /// any user with this secret.
    pub dev_token_secret: Option<Vec<u8>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            workers: Vec::new(),
            rpc_timeout: Duration::from_secs(10),
            max_frame_bytes: 64 * 1024,
            max_ws_message_bytes: 1024 * 1024,
            max_body_bytes: 64 * 1024,
            outbox_frames: 1024,
            outbox_bytes: 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            write_coalesce: Duration::from_millis(10),
            write_budget: 20_000,
            requests_per_sec: 50.0,
            user_ws_requests_per_sec: 200.0,
            user_requests_per_sec: 50.0,
            address_requests_per_sec: 500.0,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            max_connections: 100_000,
            max_connections_per_user: 32,
            request_burst: 100.0,
            max_errors_in_a_row: 50,
            service_secret: None,
            worker_tls: None,
            web_app: true,
            ws_query_token: true,
            dev_token_secret: None,
        }
    }
}

/// Why an edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no worker endpoints configured")]
    NoWorkers,
    #[error("bad worker endpoint {0:?}: {1}")]
    Endpoint(String, String),
    #[error(
        "worker endpoint {0:?} is https but no CA is given to check workers' certificates \
         against (--worker-ca)"
    )]
    TlsWithoutCa(String),
    #[error(
        "worker endpoint {0:?} is plaintext but a CA is given for TLS to workers: make it \
         https:// (a TLS edge never calls a worker in the clear)"
    )]
    PlaintextWithCa(String),
}

/// The contents of [`AppState`].
pub struct Inner {
    pub verifier: Verifier,
    /// The workers, health-checked, with failover.
    pub workers: Arc<Workers>,
    pub bus: Bus,
    /// Opens the sealed content of deliveries.
    pub keys: KeyRing,
    /// Set when the edge drains: every session closes with 1012.
    pub closing: tokio::sync::watch::Sender<bool>,
    /// The WebSocket sessions, so that a drain can wait for them.
    pub sessions_running: tokio_util::task::TaskTracker,
    /// Group messages recently opened for delivery (see `ws`).
    pub(crate) opened: ws::OpenedFrames,
    /// What became of messages replies answer, asked by catch-ups.
    pub(crate) answers: ws::Answers,
    /// This edge's live connections and the groups they follow (`live`).
    pub(crate) live: Arc<live::LiveHub>,
    /// The same for notifications, by user.
    pub(crate) notices: Arc<live::LiveHub>,
    /// The live feeds' tasks, stopped with the edge.
    feed_tasks: std::sync::Mutex<Vec<tokio::task::AbortHandle>>,
    /// Every device's place in the streams (saved by its connections).
    pub(crate) places: chat_bus::Places,
    /// Deliveries not yet reported (see `ws::report_delivered`).
    pub(crate) delivered: ws::DeliveredHub,
    /// The writers' window, stretched over the write budget.
    pub(crate) write_load: Arc<ws::WriteLoad>,
    /// This edge's connections of each device, closed on eviction.
    pub(crate) devices: evictions::Devices,
    /// Which users are connected here, written to the presence bucket.
    pub(crate) presence: presence::EdgePresence,
    /// Per-user and per-address request limits.
    pub(crate) limits: limits::Limits,
    pub config: Config,
}

/// Shared state of one edge node.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let tasks = self.feed_tasks.get_mut().unwrap_or_else(|e| e.into_inner());
        for task in tasks.drain(..) {
            task.abort();
        }
    }
}

impl AppState {
    /// Builds the state; worker connections are made lazily and balanced
    /// across every endpoint, so workers may start after the edge.
    pub fn new(
        verifier: Verifier,
        bus: Bus,
        keys: KeyRing,
        config: Config,
    ) -> Result<Self, StartError> {
        let workers = Workers::new(
            &config.workers,
            config.rpc_timeout,
            config.service_secret.clone(),
            config.worker_tls.clone(),
        )?;
        workers.spawn_health_checks();
        let places = bus.places();
        let state = Self(Arc::new(Inner {
            verifier,
            workers,
            bus,
            keys,
            closing: tokio::sync::watch::channel(false).0,
            sessions_running: tokio_util::task::TaskTracker::new(),
            opened: Default::default(),
            answers: Default::default(),
            live: Arc::new(live::LiveHub::new(chat_bus::Feed::Groups)),
            notices: Arc::new(live::LiveHub::new(chat_bus::Feed::User)),
            feed_tasks: Default::default(),
            places,
            delivered: Default::default(),
            write_load: Arc::new(ws::WriteLoad::new(
                config.write_coalesce,
                config.write_budget,
            )),
            devices: Default::default(),
            presence: Default::default(),
            limits: limits::Limits::new(&config),
            config,
        }));
        tokio::spawn(ws::report_delivered(Arc::downgrade(&state.0)));
        tokio::spawn(ws::pace_writes(Arc::downgrade(&state.0)));
        tokio::spawn(evictions::listen(Arc::downgrade(&state.0)));
        tokio::spawn(signals::listen(Arc::downgrade(&state.0)));
        tokio::spawn(presence::write(Arc::downgrade(&state.0)));
        tokio::spawn(presence::beat(Arc::downgrade(&state.0)));
        tokio::spawn(presence::listen(Arc::downgrade(&state.0)));
        let feeds = [chat_bus::Feed::Groups, chat_bus::Feed::User]
            .map(|f| tokio::spawn(live::feed(Arc::downgrade(&state.0), f)).abort_handle());
        *state.feed_tasks.lock().unwrap_or_else(|e| e.into_inner()) = feeds.into();
        Ok(state)
    }
}

impl Inner {
    /// The hub of `feed`.
    pub(crate) fn hub(&self, feed: chat_bus::Feed) -> &Arc<live::LiveHub> {
        match feed {
            chat_bus::Feed::Groups => &self.live,
            chat_bus::Feed::User => &self.notices,
        }
    }
}

/// The edge's routes; shared by `serve` and tests.
pub fn app(state: AppState) -> Router {
    let body_limit = state.config.max_body_bytes;
    let limited = axum::middleware::from_fn_with_state(state.clone(), limits::by_address);
    let mints_tokens = state.config.dev_token_secret.is_some();
    let app = Router::new()
        .merge(web::routes(&state))
        .route("/groups", post(rest::create_group).get(rest::list_groups))
        .route(
            "/groups/{id}",
            get(rest::get_group)
                .patch(rest::update_group)
                .delete(rest::delete_group),
        )
        .route("/groups/{id}/owner", post(rest::transfer_owner))
        .route("/groups/{id}/pins", get(rest::list_pins))
        .route("/groups/{id}/search", get(rest::search))
        .route(
            "/groups/{id}/invites",
            get(rest::list_invites).post(rest::create_invite),
        )
        .route(
            "/groups/{id}/invites/{invite_id}",
            delete(rest::revoke_invite),
        )
        .route("/invites/join", post(rest::join_group))
        .route(
            "/groups/{id}/pins/{message_id}",
            put(rest::pin_message).delete(rest::unpin_message),
        )
        .route(
            "/groups/{id}/mute",
            put(rest::mute_group).delete(rest::unmute_group),
        )
        .route("/groups/{id}/members", post(rest::add_members))
        .route(
            "/groups/{id}/members/{user_id}",
            delete(rest::remove_member),
        )
        .route("/groups/{id}/messages", get(rest::history))
        .route("/groups/{id}/presence", get(rest::group_presence))
        .route("/mentions", get(rest::mentions))
        .route("/blocks", get(rest::list_blocks))
        .route(
            "/blocks/{user_id}",
            put(rest::block_user).delete(rest::unblock_user),
        )
        .route("/groups/{id}/uploads", post(rest::create_upload))
        .route(
            "/groups/{id}/uploads/{object}",
            delete(rest::release_upload),
        )
        .route("/groups/{id}/media/{object}", get(rest::download_media))
        .route("/groups/{id}/media/{object}/url", get(rest::media_url))
        .route(
            "/groups/{id}/messages/{message_id}/status",
            get(rest::message_status),
        )
        .route("/ws", get(ws::upgrade))
        // the contract's documents, built once, within the address limits
        .route("/openapi.json", get(rest::openapi))
        .route("/asyncapi.json", get(rest::asyncapi))
        .fallback(rest::not_found)
        .layer(limited)
        // liveness for load balancers, outside the limits
        .route("/healthz", get(rest::healthz))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state);
    if mints_tokens {
        app.layer(axum::middleware::from_fn(web::addressed_locally))
    } else {
        app
    }
}

/// The operator's routes of a process without an edge: `/metrics` and
/// `/healthz` (its workers' readiness is the gRPC health check).
pub fn worker_ops_app() -> Router {
    Router::new()
        .route("/healthz", get(rest::healthz))
        .merge(telemetry::metrics_router())
}

/// The operator's routes (`/metrics`, `/readyz`, `/healthz`), served on
/// their own listener (`--metrics-listen`), never on the public one.
pub fn ops_app(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .merge(telemetry::metrics_router())
        .with_state(state)
}

/// Serves the edge on `listener` until `shutdown` completes, then drains:
/// stops accepting connections, tells every WebSocket client to reconnect
/// (close code 1012) after handing back what its session holds, finishes
/// in-flight requests, and returns when all of that is done. The caller bounds
/// the drain with its grace period.
///
/// Connections are served by hyper directly rather than `axum::serve`, for
/// what that does not offer: a deadline on reading a request's headers, so
/// half-open connections cannot pile up (each carries its client address,
/// for the per-address rate limit).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt as _;

    // know the workers behind host names, and which prove the service
    // secret, before the first request
    state.workers.resolve().await;
    state.workers.check_all().await;
    let router = app(state.clone());
    let header_timeout = state.config.header_read_timeout;
    let (drain, draining) = tokio::sync::watch::channel(false);
    let connections = tokio_util::task::TaskTracker::new();
    // past the cap, new connections wait in the kernel's backlog
    let room = Arc::new(tokio::sync::Semaphore::new(
        state.config.max_connections.max(1),
    ));
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, remote, permit) = tokio::select! {
            accepted = async {
                let permit = room.clone().acquire_owned().await;
                (listener.accept().await, permit)
            } => match accepted {
                (Ok((tcp, remote)), Ok(permit)) => (tcp, remote, permit),
                (Ok(_), Err(_)) => break,
                (Err(e), _) => {
                    // out of file descriptors, say: wait, do not spin
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // small frames must not wait for Nagle's algorithm
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(axum::extract::ConnectInfo(remote));
                router.clone().oneshot(req.map(axum::body::Body::new))
            });
        let mut draining = draining.clone();
        connections.spawn(async move {
            let _permit = permit;
            // HTTP/1.1 only: hyper's automatic HTTP/2 detection reads the
            // first bytes with no deadline, which let idle connections stay
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::trace!(error = %e, "connection ended with an error");
                    }
                }
                _ = async { drop(draining.wait_for(|d| *d).await) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    tracing::info!("draining: closing websocket sessions");
    let _ = state.closing.send(true);
    let _ = drain.send(true);
    connections.close();
    connections.wait().await;
    state.sessions_running.close();
    state.sessions_running.wait().await;
    // what the closed sessions wrote since the last report
    ws::flush_delivered(&state).await;
    Ok(())
}

/// Fails unless `docs/<file>` holds `now`; with `UPDATE_CONTRACT` set, writes
/// it first (`UPDATE_CONTRACT=1 cargo test -p chat-edge api`).
#[cfg(test)]
pub(crate) fn assert_committed(file: &str, now: &str) {
    let path = format!("{}/../../docs/{file}", env!("CARGO_MANIFEST_DIR"));
    if std::env::var_os("UPDATE_CONTRACT").is_some() {
        std::fs::write(&path, now).unwrap_or_else(|e| panic!("write {path}: {e}"));
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == now,
        "docs/{file} is stale: run UPDATE_CONTRACT=1 cargo test -p chat-edge api"
    );
}
