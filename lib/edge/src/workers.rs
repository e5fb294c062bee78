//! The workers an edge calls: one lazily connected channel per endpoint,
//! health-checked in the background, chosen round-robin among the healthy
//! ones. A call that fails at the transport level (the worker is down or went
//! away) marks that worker unhealthy and is tried on the next one, so losing
//! a worker costs its callers nothing but a retry; a worker that answers its
//! health check again is back in rotation.
//!
//! A `--workers` URL may name a host instead of an address: the name is
//! resolved again every few seconds and every address it has is a worker of
//! its own, so adding a worker behind one DNS name (compose's `--scale`, a
//! Kubernetes headless service) reaches every edge with no restart. A failed
//! lookup keeps the addresses the name had.
//!
//! With a service secret, a worker is called only once its health check has
//! proved that it knows the secret (see `chat_rpc::ServiceSecret`), and every
//! call is signed with it (`chat_rpc::Signed`); the secret itself never
//! leaves the edge.
//!
//! With TLS (`chat_rpc::ClientTls`), every URL is `https://` and each
//! worker's certificate is checked against the given CA, for the URL's
//! host, or for the name an address was looked up by, so workers found
//! behind one DNS name need certificates for that name, not for their
//! addresses. An edge with TLS never calls a worker in the clear.

use std::{
    future::Future,
    net::IpAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

pub(crate) use chat_rpc::pb::{
    groups_client::GroupsClient, media_client::MediaClient, messages_client::MessagesClient,
    sessions_client::SessionsClient,
};
use chat_rpc::{ClientTls, ServiceSecret, Signed, WorkerInstance};
use tonic::{
    Status,
    transport::{Channel, Endpoint, Uri},
};

use crate::StartError;

/// How often each worker is health-checked.
const HEALTH_EVERY: Duration = Duration::from_millis(500);
/// How long a health check may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// Health checks between two lookups of the workers' host names (5 s).
const RESOLVE_EVERY_CHECKS: usize = 10;
/// Most addresses one name may bring into the pool.
const MAX_ADDRESSES_PER_NAME: usize = 64;
/// The longest a lookup may take before the name keeps what it had.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

struct Worker {
    url: String,
    /// The `--workers` URL it came from: itself, or the name's (the label
    /// of its metrics, which stay as few as the URLs given).
    target: String,
    /// Why its last health check failed, if it did: logged when it changes.
    failure: std::sync::Mutex<Option<String>>,
    /// Signs every call with the secret, if there is one, for the worker
    /// process the last health check proved.
    channel: Signed<Channel>,
    /// The same, unsigned: the health check's.
    health: Channel,
    instance: WorkerInstance,
    healthy: AtomicBool,
    /// Has proved the service secret (always, without one).
    verified: AtomicBool,
}

/// One `--workers` URL.
struct Target {
    /// As given.
    url: String,
    scheme: String,
    /// `Some` if the URL names a host rather than an address.
    host: Option<(String, u16)>,
    /// The worker URLs the host's last successful lookup gave.
    found: std::sync::Mutex<Vec<String>>,
}

/// A worker's URL, and for an address found by a lookup, the name it was
/// looked up by (what its certificate must be for) and the `--workers`
/// URL that named it.
struct Address {
    url: String,
    found_by: Option<(String, String)>,
}

impl Address {
    fn fixed(url: String) -> Self {
        Self {
            url,
            found_by: None,
        }
    }
}

/// The pool of workers of one edge.
pub struct Workers {
    targets: Vec<Target>,
    /// The workers now, replaced whole when a lookup changes them; a call
    /// works on the list it started with.
    pool: RwLock<Arc<Vec<Arc<Worker>>>>,
    next: AtomicUsize,
    checks: AtomicUsize,
    timeout: Duration,
    secret: Option<ServiceSecret>,
    tls: Option<ClientTls>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pool = self.snapshot();
        let urls: Vec<_> = pool
            .iter()
            .map(|w| (&w.url, w.healthy.load(Ordering::Relaxed)))
            .collect();
        f.debug_struct("Workers").field("workers", &urls).finish()
    }
}

/// An error and its causes on one line: tonic's own text for a failed
/// connection is only "transport error", and a refused certificate is
/// known only from its causes.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Whether a failed call never got an answer from a worker (connection
/// refused, reset, the worker shutting down), so another worker should try.
fn transport_failure(status: &Status) -> bool {
    status.code() == tonic::Code::Unavailable && std::error::Error::source(status).is_some()
}

impl Workers {
    /// Channels to `urls`, each with a deadline of `timeout` per call. URLs
    /// with an address are in the pool at once; those with a host name join
    /// it at the first lookup (`check_all`). With `tls`, every URL must be
    /// `https://`; without it, none may be.
    pub fn new(
        urls: &[String],
        timeout: Duration,
        secret: Option<ServiceSecret>,
        tls: Option<ClientTls>,
    ) -> Result<Arc<Self>, StartError> {
        if urls.is_empty() {
            return Err(StartError::NoWorkers);
        }
        let targets = urls
            .iter()
            .map(|url| {
                let bad = |e: String| StartError::Endpoint(url.clone(), e);
                let uri: Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
                let scheme = uri.scheme_str().unwrap_or("http").to_owned();
                let host = uri.host().ok_or_else(|| bad("no host".into()))?;
                let is_address = host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok();
                match (scheme.as_str(), &tls) {
                    ("https", None) => return Err(StartError::TlsWithoutCa(url.clone())),
                    ("https", Some(_)) | ("http", None) => {}
                    (_, Some(_)) => return Err(StartError::PlaintextWithCa(url.clone())),
                    (other, None) => {
                        return Err(bad(format!("scheme {other:?} is not http or https")));
                    }
                }
                let port = uri
                    .port_u16()
                    .unwrap_or(if scheme == "https" { 443 } else { 80 });
                Ok(Target {
                    url: url.clone(),
                    scheme,
                    host: (!is_address).then(|| (host.to_owned(), port)),
                    found: std::sync::Mutex::default(),
                })
            })
            .collect::<Result<Vec<_>, StartError>>()?;
        let pool = Arc::new(Self {
            targets,
            pool: RwLock::new(Arc::default()),
            next: AtomicUsize::new(0),
            checks: AtomicUsize::new(0),
            timeout,
            secret,
            tls,
        });
        let fixed: Vec<Address> = pool
            .targets
            .iter()
            .filter(|t| t.host.is_none())
            .map(|t| Address::fixed(t.url.clone()))
            .collect();
        pool.replace(fixed, true, true)?;
        Ok(pool)
    }

    fn snapshot(&self) -> Arc<Vec<Arc<Worker>>> {
        self.pool.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Makes the pool `urls`, keeping the workers (and their state) it
    /// already has; new ones start healthy if `healthy`. A URL that is not a
    /// usable endpoint is an error if `strict` (the command line), else it
    /// is left out (a looked-up address, such as a link-local IPv6 one).
    fn replace(&self, urls: Vec<Address>, healthy: bool, strict: bool) -> Result<(), StartError> {
        let old = self.snapshot();
        let mut workers = Vec::with_capacity(urls.len());
        for Address { url, found_by } in urls {
            if workers.iter().any(|w: &Arc<Worker>| w.url == url) {
                continue;
            }
            if let Some(w) = old.iter().find(|w| w.url == url) {
                workers.push(w.clone());
                continue;
            }
            let endpoint = Endpoint::from_shared(url.clone()).and_then(|e| match &self.tls {
                Some(tls) => {
                    e.tls_config(tls.config(found_by.as_ref().map(|(host, _)| host.as_str())))
                }
                None => Ok(e),
            });
            let endpoint = match endpoint {
                Ok(e) => e,
                Err(e) if strict => return Err(StartError::Endpoint(url, e.to_string())),
                Err(e) => {
                    tracing::warn!(url, error = %e, "a looked-up worker address is not usable; skipped");
                    continue;
                }
            };
            let endpoint = endpoint
                .timeout(self.timeout)
                .connect_timeout(Duration::from_secs(2))
                .tcp_nodelay(true);
            let channel = endpoint.connect_lazy();
            let instance = WorkerInstance::default();
            workers.push(Arc::new(Worker {
                target: found_by.map_or_else(|| url.clone(), |(_, target)| target),
                url,
                failure: std::sync::Mutex::default(),
                channel: Signed::new(channel.clone(), self.secret.clone(), instance.clone()),
                health: channel,
                instance,
                healthy: AtomicBool::new(healthy),
                verified: AtomicBool::new(self.secret.is_none()),
            }));
        }
        let (before, after) = (old.len(), workers.len());
        let changed = before != after || old.iter().zip(&workers).any(|(a, b)| a.url != b.url);
        if changed && !old.is_empty() {
            let urls: Vec<&str> = workers.iter().map(|w| w.url.as_str()).collect();
            tracing::info!(workers = ?urls, "the worker pool changed");
        }
        *self.pool.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(workers);
        Ok(())
    }

    /// Looks the host names up again: each address is a worker. A name that
    /// cannot be looked up (within `LOOKUP_TIMEOUT`) keeps the workers it
    /// had.
    pub async fn resolve(&self) {
        if self.targets.iter().all(|t| t.host.is_none()) {
            return;
        }
        let mut urls = Vec::new();
        for t in &self.targets {
            let Some((host, port)) = &t.host else {
                urls.push(Address::fixed(t.url.clone()));
                continue;
            };
            let mut found = t.found.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let lookup = tokio::net::lookup_host((host.as_str(), *port));
            match tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
                .await
                .unwrap_or_else(|_| Err(std::io::Error::other("timed out")))
            {
                Ok(addrs) => {
                    found = addrs
                        .take(MAX_ADDRESSES_PER_NAME)
                        .map(|a| format!("{}://{a}", t.scheme))
                        .collect();
                    *t.found.lock().unwrap_or_else(|p| p.into_inner()) = found.clone();
                }
                Err(e) => {
                    tracing::warn!(host = %host, error = %e, "cannot look up workers; keeping the ones it had");
                }
            }
            urls.extend(found.into_iter().map(|url| Address {
                url,
                found_by: Some((host.clone(), t.url.clone())),
            }));
        }
        if let Err(e) = self.replace(urls, false, false) {
            tracing::warn!(error = %e, "cannot change the worker pool");
        }
    }

    /// Checks one worker: ready, and (with a secret) proving it over a
    /// fresh nonce, which tells the worker process calls are signed for.
    async fn check(&self, w: &Worker) {
        let check = chat_rpc::signed::ready(w.health.clone(), self.secret.as_ref());
        let (up, proved, failure) = match tokio::time::timeout(HEALTH_TIMEOUT, check).await {
            Ok(Ok(Some(instance))) => {
                w.instance.set(instance);
                (true, Some(true), None)
            }
            Ok(Ok(None)) => (false, Some(false), None),
            // with the causes: a refused certificate is only in them
            Ok(Err(status)) => {
                let failure = match std::error::Error::source(&status) {
                    Some(cause) => {
                        format!("{}: {}", status.message(), error_chain(cause))
                    }
                    None => status.message().to_owned(),
                };
                (false, None, Some(failure))
            }
            Err(_) => (false, None, Some("timed out".to_owned())),
        };
        let outcome = match (up, proved) {
            (true, _) => "up",
            (false, Some(false)) => "unproved",
            (false, _) => "down",
        };
        metrics::counter!("chat_worker_checks_total", "worker" => w.target.clone(), "outcome" => outcome)
            .increment(1);
        {
            // each new cause once, whatever the worker's state was (one
            // found by a lookup starts as down, so a change of state alone
            // would never tell why it stays so)
            let mut last = w.failure.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(error) = &failure
                && last.as_ref() != Some(error)
            {
                tracing::warn!(worker = %w.url, %error, "worker is down");
            }
            *last = failure;
        }
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

    /// Checks every worker once, at the same time; looks the host names up
    /// again first on the first call and every few seconds.
    pub async fn check_all(&self) {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(RESOLVE_EVERY_CHECKS)
        {
            self.resolve().await;
        }
        let pool = self.snapshot();
        futures::future::join_all(pool.iter().map(|w| self.check(w))).await;
    }

    /// Whether some worker passed its last health check.
    pub fn any_healthy(&self) -> bool {
        self.snapshot()
            .iter()
            .any(|w| w.healthy.load(Ordering::Relaxed) && w.verified.load(Ordering::Relaxed))
    }

    /// `req` with `id` in its metadata, so the worker's logs carry it too.
    pub fn request<T>(&self, req: T, id: &str) -> tonic::Request<T> {
        let mut r = tonic::Request::new(req);
        if let Ok(v) = id.parse() {
            r.metadata_mut().insert(REQUEST_ID, v);
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

    /// The next worker of `pool` to try that `tried` does not have:
    /// round-robin over the healthy ones, or over the rest when none of those
    /// is left; never one that has not proved the service secret.
    fn pick(&self, pool: &[Arc<Worker>], tried: &[usize]) -> Option<usize> {
        let n = pool.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates = || {
            (0..n)
                .map(move |i| (start + i) % n)
                .filter(|i| !tried.contains(i))
                .filter(|&i| pool[i].verified.load(Ordering::Relaxed))
        };
        candidates()
            .find(|&i| pool[i].healthy.load(Ordering::Relaxed))
            .or_else(|| candidates().next())
    }

    /// Runs `call` on a worker; on a transport failure, marks that worker
    /// unhealthy and tries another, each worker once at most.
    pub async fn call<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(Signed<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let pool = self.snapshot();
        let mut last = None;
        let mut tried = Vec::with_capacity(pool.len());
        while let Some(i) = self.pick(&pool, &tried) {
            tried.push(i);
            let w = &pool[i];
            let mut outcome = call(w.channel.clone()).await;
            if outcome
                .as_ref()
                .is_err_and(|s| s.code() == tonic::Code::Unauthenticated)
            {
                // most likely restarted since its last check, as another
                // process: checked again at once, and asked again if it
                // proves itself
                self.check(w).await;
                if w.healthy.load(Ordering::Relaxed) && w.verified.load(Ordering::Relaxed) {
                    outcome = call(w.channel.clone()).await;
                }
            }
            match outcome {
                Err(status) if transport_failure(&status) => {
                    if w.healthy.swap(false, Ordering::Relaxed) {
                        tracing::warn!(worker = %w.url, error = %status, "worker unreachable; trying another");
                    }
                    last = Some(status);
                }
                // the worker refused the edge's signature (restarted since
                // its last health check, clocks apart, another secret): its
                // fault, never the client's; out of rotation until its next
                // health check proves it again
                Err(status) if status.code() == tonic::Code::Unauthenticated => {
                    w.healthy.store(false, Ordering::Relaxed);
                    tracing::error!(worker = %w.url, error = %status, "worker refused a signed call; trying another");
                    last = Some(Status::unavailable("no worker took the call"));
                }
                // a worker of an earlier release, during a rolling upgrade:
                // it did nothing, and an upgraded one may know the call; it
                // stays in rotation for the calls it knows
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    tracing::debug!(worker = %w.url, error = %status, "worker does not know the call; trying another");
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

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(pool: &Workers) -> Vec<String> {
        pool.snapshot().iter().map(|w| w.url.clone()).collect()
    }

    fn looked_up(urls: &[&str]) -> Vec<Address> {
        urls.iter()
            .map(|u| Address {
                url: (*u).to_owned(),
                found_by: Some(("workers".to_owned(), "http://workers:1".to_owned())),
            })
            .collect()
    }

    #[tokio::test]
    async fn https_needs_a_ca_and_other_schemes_are_refused() {
        let pool = |url: &str| Workers::new(&[url.to_owned()], Duration::from_secs(1), None, None);
        assert!(matches!(
            pool("https://10.0.0.1:1"),
            Err(StartError::TlsWithoutCa(_))
        ));
        assert!(matches!(
            pool("ftp://10.0.0.1:1"),
            Err(StartError::Endpoint(_, _))
        ));
        assert!(pool("http://10.0.0.1:1").is_ok());
    }

    #[tokio::test]
    async fn addresses_are_fixed_and_names_join_at_their_lookup() {
        let given = [
            "http://10.0.0.1:50051".to_owned(),
            "http://[::1]:50051".to_owned(),
            "http://localhost:50051".to_owned(),
        ];
        let pool = Workers::new(&given, Duration::from_secs(1), None, None).expect("pool");
        assert_eq!(urls(&pool), given[..2], "names wait for a lookup");
        pool.resolve().await;
        let after = urls(&pool);
        assert!(after.starts_with(&given[..2]), "{after:?}");
        assert!(
            after.iter().any(|u| u == "http://127.0.0.1:50051"),
            "localhost's address joined: {after:?}"
        );
        assert!(
            Workers::new(&["no scheme".into()], Duration::from_secs(1), None, None).is_err(),
            "a bad URL stops the edge at start"
        );
    }

    #[tokio::test]
    async fn a_new_lookup_keeps_the_workers_it_still_has_with_their_state() {
        let pool = Workers::new(
            &["http://10.0.0.1:1".into()],
            Duration::from_secs(1),
            None,
            None,
        )
        .expect("pool");
        pool.replace(
            looked_up(&["http://10.0.0.1:1", "http://10.0.0.2:1"]),
            false,
            false,
        )
        .expect("replace");
        let first = pool.snapshot();
        assert!(first[0].healthy.load(Ordering::Relaxed), "kept as it was");
        assert!(
            !first[1].healthy.load(Ordering::Relaxed),
            "new ones wait for a check"
        );
        first[1].healthy.store(true, Ordering::Relaxed);
        // 10.0.0.1 is gone from the name, 10.0.0.3 came
        pool.replace(
            looked_up(&["http://10.0.0.2:1", "http://not a url", "http://10.0.0.3:1"]),
            false,
            false,
        )
        .expect("a bad looked-up address is skipped");
        let second = pool.snapshot();
        assert_eq!(urls(&pool), ["http://10.0.0.2:1", "http://10.0.0.3:1"]);
        assert!(
            Arc::ptr_eq(&first[1], &second[0]),
            "the same worker, channel and all"
        );
        assert!(second[0].healthy.load(Ordering::Relaxed));
        // a call made on the earlier list still has its channels
        assert_eq!(first.len(), 2);
    }

    /// A worker that refuses the edge's signature (restarted since its last
    /// check, say) is out of rotation and the call goes to another; with
    /// none left it is `unavailable`, never `unauthenticated`, which the
    /// edge would pass on as its client's fault (a 401 signs a web client
    /// out).
    /// A pool of two workers, and the answer to a call the first worker
    /// asked refuses with `refusal` and the second takes.
    async fn first_refuses(refusal: Status) -> (Arc<Workers>, Result<&'static str, Status>) {
        let urls = [
            "http://10.0.0.1:1".to_owned(),
            "http://10.0.0.2:1".to_owned(),
        ];
        let pool = Workers::new(&urls, Duration::from_secs(1), None, None).expect("pool");
        let asked = std::sync::Mutex::new(0);
        let answer = pool
            .call(|_| {
                let mut n = asked.lock().expect("count");
                *n += 1;
                let refused = (*n == 1).then(|| refusal.clone());
                async move {
                    match refused {
                        Some(status) => Err(status),
                        None => Ok("taken"),
                    }
                }
            })
            .await;
        (pool, answer)
    }

    #[tokio::test]
    async fn a_worker_that_refuses_the_signature_is_passed_over_never_the_client_blamed() {
        let (pool, first) =
            first_refuses(Status::unauthenticated("signed for another worker")).await;
        assert_eq!(first.ok(), Some("taken"), "the other worker took it");
        let healthy: Vec<bool> = pool
            .snapshot()
            .iter()
            .map(|w| w.healthy.load(Ordering::Relaxed))
            .collect();
        assert_eq!(healthy.iter().filter(|h| !**h).count(), 1, "{healthy:?}");
        let none = pool
            .call(|_| async { Err::<(), _>(Status::unauthenticated("no")) })
            .await;
        assert_eq!(none.map_err(|s| s.code()), Err(tonic::Code::Unavailable));
    }

    /// A call one worker does not know yet (an earlier release, in a
    /// rolling upgrade) goes to another, and that worker stays in rotation.
    #[tokio::test]
    async fn a_call_a_worker_does_not_know_goes_to_another() {
        let (pool, answer) = first_refuses(Status::unimplemented("UpdateGroup")).await;
        assert_eq!(answer.ok(), Some("taken"));
        assert!(
            pool.snapshot()
                .iter()
                .all(|w| w.healthy.load(Ordering::Relaxed)),
            "both still in rotation"
        );
        let none = pool
            .call(|_| async { Err::<(), _>(Status::unimplemented("no")) })
            .await;
        assert_eq!(none.map_err(|s| s.code()), Err(tonic::Code::Unimplemented));
    }
}
