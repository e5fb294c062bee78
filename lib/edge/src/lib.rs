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
    routing::{delete, get, post},
};
use chat_auth::Verifier;
use chat_bus::Bus;
use chat_crypto::KeyRing;
use tokio::net::TcpListener;

mod auth;
mod claims;
mod error;
mod rest;
pub mod telemetry;
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
    /// Requests per second per connection, sustained.
    pub requests_per_sec: f64,
    /// Requests a connection may burst above the sustained rate.
    pub request_burst: f64,
    /// Error replies in a row after which a connection is closed as abusive.
    pub max_errors_in_a_row: u32,
    /// The secret every worker call carries, once the worker proved it.
    pub service_secret: Option<chat_rpc::ServiceSecret>,
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
            requests_per_sec: 50.0,
            request_burst: 100.0,
            max_errors_in_a_row: 50,
            service_secret: None,
        }
    }
}

/// Why an edge could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no worker endpoints configured")]
    NoWorkers,
    #[error("bad worker endpoint {0:?}: {1}")]
    Endpoint(String, tonic::transport::Error),
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
    /// Deliveries not yet reported (see `ws::report_delivered`).
    pub(crate) delivered: ws::DeliveredHub,
    /// This edge's connection of each device (see `claims`).
    pub(crate) claims: claims::DeviceClaims,
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
        )?;
        workers.spawn_health_checks();
        let state = Self(Arc::new(Inner {
            verifier,
            workers,
            bus,
            keys,
            closing: tokio::sync::watch::channel(false).0,
            sessions_running: tokio_util::task::TaskTracker::new(),
            opened: Default::default(),
            delivered: Default::default(),
            claims: Default::default(),
            config,
        }));
        tokio::spawn(ws::report_delivered(Arc::downgrade(&state.0)));
        tokio::spawn(claims::watch(Arc::downgrade(&state.0)));
        Ok(state)
    }
}

/// The edge's routes; shared by `serve` and tests.
pub fn app(state: AppState) -> Router {
    let body_limit = state.config.max_body_bytes;
    Router::new()
        .route("/groups", post(rest::create_group).get(rest::list_groups))
        .route("/groups/{id}", get(rest::get_group))
        .route("/groups/{id}/owner", post(rest::transfer_owner))
        .route("/groups/{id}/members", post(rest::add_members))
        .route(
            "/groups/{id}/members/{user_id}",
            delete(rest::remove_member),
        )
        .route("/groups/{id}/messages", get(rest::history))
        .route("/groups/{id}/uploads", post(rest::create_upload))
        .route("/groups/{id}/media/{object}", get(rest::download_media))
        .route(
            "/groups/{id}/messages/{message_id}/status",
            get(rest::message_status),
        )
        .route("/healthz", get(rest::healthz))
        .route("/readyz", get(rest::readyz))
        .route("/ws", get(ws::upgrade))
        .merge(telemetry::metrics_router())
        .fallback(rest::not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Serves the edge on `listener` until `shutdown` completes, then drains:
/// stops accepting connections, tells every WebSocket client to reconnect
/// (close code 1012) after handing back what its session holds, finishes
/// in-flight requests, and returns when all of that is done. The caller bounds
/// the drain with its grace period.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // small frames must not wait for Nagle's algorithm
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let closing = state.closing.clone();
    let sessions = state.sessions_running.clone();
    let last_receipts = state.clone();
    let signal = async move {
        shutdown.await;
        tracing::info!("draining: closing websocket sessions");
        let _ = closing.send(true);
    };
    // know which workers prove the service secret before the first request
    state.workers.check_all().await;
    let result = axum::serve(listener, app(state))
        .with_graceful_shutdown(signal)
        .await;
    sessions.close();
    sessions.wait().await;
    // what the closed sessions wrote since the last report
    ws::flush_delivered(&last_receipts).await;
    result
}
