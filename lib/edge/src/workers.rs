//! The workers an edge calls: one lazily connected channel per endpoint,
//! health-checked in the background, chosen round-robin among the healthy
//! ones. A call that fails at the transport level (the worker is down or went
//! away) marks that worker unhealthy and is tried on the next one, so losing
//! a worker costs its callers nothing but a retry; a worker that answers its
//! health check again is back in rotation.
//!
//! With a service secret, a worker is called only once its health check has
//! proved that it knows the secret (see `chat_rpc::ServiceSecret`), and every
//! call carries the secret; an edge never sends it to a process that could
//! not prove it already had it.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

pub(crate) use chat_rpc::pb::{
    groups_client::GroupsClient, health_client::HealthClient, media_client::MediaClient,
    messages_client::MessagesClient, sessions_client::SessionsClient,
};
use chat_rpc::{SECRET_HEADER, ServiceSecret, pb};
use tonic::{
    Status,
    transport::{Channel, Endpoint},
};

use crate::StartError;

/// How often each worker is health-checked.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// How long a health check may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);

struct Worker {
    url: String,
    channel: Channel,
    healthy: AtomicBool,
    /// Has proved the service secret (always, without one).
    verified: AtomicBool,
}

/// The pool of workers of one edge.
pub struct Workers {
    workers: Vec<Worker>,
    next: AtomicUsize,
    secret: Option<ServiceSecret>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<_> = self
            .workers
            .iter()
            .map(|w| (&w.url, w.healthy.load(Ordering::Relaxed)))
            .collect();
        f.debug_struct("Workers").field("workers", &urls).finish()
    }
}

/// Whether a failed call never got an answer from a worker (connection
/// refused, reset, the worker shutting down), so another worker should try.
fn transport_failure(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable && std::error::Error::source(status).is_some()
}

impl Workers {
    /// Channels to `urls`, each with a deadline of `timeout` per call.
    pub fn new(
        urls: &[String],
        timeout: Duration,
        secret: Option<ServiceSecret>,
    ) -> Result<Arc<Self>, StartError> {
        if urls.is_empty() {
            return Err(StartError::NoWorkers);
        }
        let workers = urls
            .iter()
            .map(|url| {
                let endpoint = Endpoint::from_shared(url.clone())
                    .map_err(|e| StartError::Endpoint(url.clone(), e))?
                    .timeout(timeout)
                    .connect_timeout(Duration::from_secs(2))
                    .tcp_nodelay(true);
                Ok(Worker {
                    url: url.clone(),
                    channel: endpoint.connect_lazy(),
                    healthy: AtomicBool::new(true),
                    verified: AtomicBool::new(secret.is_none()),
                })
            })
            .collect::<Result<Vec<_>, StartError>>()?;
        Ok(Arc::new(Self {
            workers,
            next: AtomicUsize::new(0),
            secret,
        }))
    }

    /// Checks one worker: ready, and (with a secret) proving it over a
    /// fresh nonce.
    async fn check(&self, w: &Worker) {
        let nonce = uuid::Uuid::new_v4().as_bytes().to_vec();
        let mut client = HealthClient::new(w.channel.clone());
        let check = client.ready(pb::ReadyRequest {
            nonce: nonce.clone(),
        });
        let (up, proved) = match tokio::time::timeout(HEALTH_TIMEOUT, check).await {
            Ok(Ok(r)) => {
                let proof = r.into_inner().proof;
                let proved = self
                    .secret
                    .as_ref()
                    .is_none_or(|s| s.verify_proof(&nonce, &proof));
                (proved, Some(proved))
            }
            _ => (false, None),
        };
        if let Some(proved) = proved
            && w.verified.swap(proved, Ordering::Relaxed) != proved
        {
            if proved {
                tracing::info!(worker = %w.url, "worker proved the service secret");
            } else {
                tracing::error!(worker = %w.url, "worker failed to prove the service secret; never calling it");
            }
        }
        if w.healthy.swap(up, Ordering::Relaxed) != up {
            tracing::info!(worker = %w.url, up, "worker health changed");
        }
    }

    /// Checks every worker once, at the same time.
    pub async fn check_all(&self) {
        futures::future::join_all(self.workers.iter().map(|w| self.check(w))).await;
    }

    /// Whether some worker passed its last health check.
    pub fn any_healthy(&self) -> bool {
        self.workers
            .iter()
            .any(|w| w.healthy.load(Ordering::Relaxed) && w.verified.load(Ordering::Relaxed))
    }

    /// `req` with `id` in its metadata, so the worker's logs carry it too,
    /// and the service secret.
    pub fn request<T>(&self, req: T, id: &str) -> tonic::Request<T> {
        let mut r = tonic::Request::new(req);
        if let Ok(v) = id.parse() {
            r.metadata_mut().insert(REQUEST_ID, v);
        }
        if let Some(secret) = &self.secret
            && let Ok(v) = secret.header_value().parse()
        {
            r.metadata_mut().insert(SECRET_HEADER, v);
        }
        r
    }

    /// Health-checks every worker until the pool is dropped.
    pub fn spawn_health_checks(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { return };
                pool.check_all().await;
            }
        });
    }

    /// The next worker to try that `tried` does not have: round-robin over
    /// the healthy ones, or over the rest when none of those is left; never
    /// one that has not proved the service secret.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.workers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = || {
            (0..n)
                .map(move |i| (start + i) % n)
                .filter(|i| !tried.contains(i))
                .filter(|&i| self.workers[i].verified.load(Ordering::Relaxed))
        };
        candidates()
            .find(|&i| self.workers[i].healthy.load(Ordering::Relaxed))
            .or_else(|| candidates().next())
    }

    /// Runs `call` on a worker; on a transport failure, marks that worker
    /// unhealthy and tries another, each worker once at most.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut last = None;
        let mut tried = Vec::with_capacity(self.workers.len());
        while let Some(i) = self.pick(&tried) {
            tried.push(i);
            let w = &self.workers[i];
            match call(w.channel.clone()).await {
                Err(status) if transport_failure(&status) => {
                    if w.healthy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(worker = %w.url, error = %status, "worker unreachable; trying another");
                    }
                    last = Some(status);
                }
                other => return other,
            }
        }
        Err(last.unwrap_or_else(|| Status::unavailable("no worker reachable")))
    }
}

/// Calls `$method` of the `$client` gRPC service on a worker of `$app`, with
/// failover (see [`Workers::call`]).
macro_rules! rpc {
    ($app:expr, $client:ident, $method:ident, $req:expr) => {{
        use tracing::Instrument as _;
        let req = $req;
        let request_id = $crate::workers::request_id();
        let span = tracing::info_span!("rpc", method = stringify!($method), request_id = %request_id);
        let started = std::time::Instant::now();
        let result = $app
            .workers
            .call(|channel| {
                let req = $app.workers.request(req.clone(), &request_id);
                async move {
                    $crate::workers::$client::new(channel)
                        .max_decoding_message_size($crate::workers::MAX_REPLY_BYTES)
                        .$method(req)
                        .await
                }
            })
            .instrument(span)
            .await;
        metrics::histogram!("chat_rpc_seconds", "method" => stringify!($method)).record(started.elapsed());
        result
    }};
}

/// Largest worker reply an edge takes (tonic's default is 4 MiB; a page of
/// groups is bounded well below this by the worker, see `ListGroups`).
pub const MAX_REPLY_BYTES: usize = 16 * 1024 * 1024;

/// The gRPC metadata key carrying a request's id from edge to worker.
pub const REQUEST_ID: &str = "x-request-id";

/// A fresh request id.
pub fn request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

pub(crate) use rpc;
