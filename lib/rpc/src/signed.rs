//! Signed calls between edge and worker, as two tower services around the
//! gRPC transport: [`Signed`] on the edge's channel signs each call as it
//! leaves, [`Checked`] around each of the worker's services (not its health
//! check) refuses any call without a good, fresh, first-seen signature made
//! for it. The generated clients and servers see neither.
//!
//! The signature travels in [`SIGNATURE_HEADER`] as
//! `<milliseconds>.<nonce>.<instance>.<digest>.<HMAC>` (hex) and covers
//! the method's path, the time, the nonce, the worker's instance id and the
//! digest of the body as sent (see [`ServiceSecret::sign`]). A worker
//! checks it before it reads the body, so a caller without the secret never
//! has a body read; it takes a call for its own instance only, made at most
//! [`WINDOW`] before or after its own clock, and each nonce once: it keeps
//! the nonces of the window, at most [`MAX_SEEN`] of them.

use std::{
    collections::{BTreeMap, HashSet},
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use tonic::{Status, body::Body, server::NamedService};
use tower::Service;

use crate::{
    pb::{ReadyRequest, health_client::HealthClient},
    service_auth::{Call, Instance, ServiceSecret, digest},
};

/// The header carrying a call's signature.
pub const SIGNATURE_HEADER: &str = "x-chat-signature";
/// How far a call's time may be from the worker's clock either way.
pub const WINDOW: Duration = Duration::from_millis(WINDOW_MS);
const WINDOW_MS: u64 = 30_000;
/// Most nonces a worker keeps: at this many calls in a window it refuses
/// more (`unavailable`) rather than forget one it could see again.
pub const MAX_SEEN: usize = 4_000_000;
/// Largest call body a worker reads: tonic's limit on a request message
/// (4 MiB) and its frame header.
pub const MAX_CALL_BYTES: usize = 4 * 1024 * 1024 + 5;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Exactly `N` bytes from their hex.
fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The instance id of the worker a channel reaches, as its last proof of
/// the secret gave it: shared by the channel that signs calls and the
/// health check that learns it.
#[derive(Debug, Clone, Default)]
pub struct WorkerInstance(Arc<Mutex<Option<Instance>>>);

impl WorkerInstance {
    /// Known to be `id`.
    pub fn known(id: Instance) -> Self {
        Self(Arc::new(Mutex::new(Some(id))))
    }

    /// The worker proved itself as `id`.
    pub fn set(&self, id: Instance) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    fn get(&self) -> Option<Instance> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Asks the worker on `channel` whether it is ready, over a fresh nonce:
/// `Some(its instance)` if it proved `secret` (or there is none), `None` if
/// it answered without the proof (another secret, or a release before
/// signed calls).
pub async fn ready(
    channel: tonic::transport::Channel,
    secret: Option<&ServiceSecret>,
) -> Result<Option<Instance>, Status> {
    let nonce: [u8; 16] = rand::random();
    let answer = HealthClient::new(channel)
        .ready(ReadyRequest {
            nonce: nonce.to_vec(),
        })
        .await?
        .into_inner();
    let instance = <Instance>::try_from(answer.instance.as_slice()).ok();
    Ok(match (secret, instance) {
        (None, found) => Some(found.unwrap_or_default()),
        (Some(secret), Some(instance)) => secret
            .verify_proof(&instance, &nonce, &answer.proof)
            .then_some(instance),
        (Some(_), None) => None,
    })
}

/// The edge's side: a transport (tonic's `Channel`) whose calls are signed
/// with the secret for the worker it reaches, or go as they are without a
/// secret.
#[derive(Debug, Clone)]
pub struct Signed<S> {
    inner: S,
    secret: Option<ServiceSecret>,
    instance: WorkerInstance,
}

impl<S> Signed<S> {
    /// Calls on `inner`, signed with `secret` if there is one, for the
    /// worker `instance` names.
    pub fn new(inner: S, secret: Option<ServiceSecret>, instance: WorkerInstance) -> Self {
        Self {
            inner,
            secret,
            instance,
        }
    }
}

impl Signed<tonic::transport::Channel> {
    /// Calls on `channel`, signed with `secret` for the worker it reaches
    /// once that worker has proved the secret (a health check).
    pub async fn to_worker(
        channel: tonic::transport::Channel,
        secret: ServiceSecret,
    ) -> Result<Self, Status> {
        let instance = ready(channel.clone(), Some(&secret))
            .await?
            .ok_or_else(|| Status::unauthenticated("the worker did not prove the secret"))?;
        Ok(Self::new(
            channel,
            Some(secret),
            WorkerInstance::known(instance),
        ))
    }
}

impl<S> Service<http::Request<Body>> for Signed<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<Self::Response, BoxError>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // the instance polled ready makes the call
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let key = self.secret.clone().map(|s| (s, self.instance.get()));
        Box::pin(async move {
            let Some((secret, instance)) = key else {
                return inner.call(req).await.map_err(Into::into);
            };
            // never called before its proof (the edge picks proved workers)
            let instance = instance.ok_or_else(|| {
                Status::unavailable("the worker has not proved the service secret yet")
            })?;
            let (mut parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            let call = Call {
                path: parts.uri.path(),
                at_ms: now_ms(),
                nonce: rand::random(),
                instance,
                digest: digest(&body),
            };
            let value = [
                call.at_ms.to_string(),
                hex::encode(call.nonce),
                hex::encode(call.instance),
                hex::encode(call.digest),
                hex::encode(secret.sign(&call)),
            ]
            .join(".");
            parts.headers.insert(SIGNATURE_HEADER, value.parse()?);
            let req = http::Request::from_parts(parts, Body::new(Full::new(body)));
            inner.call(req).await.map_err(Into::into)
        })
    }
}

/// Why a worker refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No signature, or not one of this form.
    Unsigned,
    /// Made further from the worker's clock than the window.
    OutOfWindow,
    /// Signed for another worker, or for this one before it restarted.
    OtherWorker,
    /// Not a signature under the secret, or not of this body.
    BadSignature,
    /// Its nonce was seen before.
    Replayed,
    /// The body is over [`MAX_CALL_BYTES`] or could not be read.
    Body,
    /// The worker keeps as many nonces as it may.
    TooMany,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Self::Unsigned => "unsigned",
            Self::OutOfWindow => "out_of_window",
            Self::OtherWorker => "other_worker",
            Self::BadSignature => "bad_signature",
            Self::Replayed => "replayed",
            Self::Body => "body",
            Self::TooMany => "too_many",
        }
    }

    /// What the caller is told: `unauthenticated` for every refusal of the
    /// signature, which an edge takes as this worker's fault (it tries
    /// another), never as its client's.
    fn status(self) -> Status {
        match self {
            Self::Unsigned | Self::BadSignature => {
                Status::unauthenticated("a signed call is required (service secret)")
            }
            Self::OutOfWindow => Status::unauthenticated(
                "the call's signature is too old or from the future (clocks apart?)",
            ),
            Self::OtherWorker => {
                Status::unauthenticated("the call was signed for another worker (restarted?)")
            }
            Self::Replayed => Status::unauthenticated("the call's signature was used before"),
            Self::Body => Status::internal("call body too large or unreadable"),
            Self::TooMany => Status::unavailable("too many calls to check; try again"),
        }
    }
}

/// The nonces a worker saw in the window, by the second their calls were
/// made: a replay carries its call's time, so it is looked for in one set,
/// and whole seconds fall out of the window at once.
#[derive(Debug)]
pub struct Seen {
    by_second: BTreeMap<u64, HashSet<[u8; 16]>>,
    len: usize,
    max: usize,
    /// The latest time it was given: a clock stepped back does not bring
    /// forgotten seconds back into the window.
    latest: u64,
}

impl Seen {
    /// Keeping at most `max` nonces.
    pub fn new(max: usize) -> Self {
        Self {
            by_second: BTreeMap::new(),
            len: 0,
            max,
            latest: 0,
        }
    }

    /// The oldest call time taken at `now_ms`, and forgets the seconds
    /// before it.
    fn oldest(&mut self, now_ms: u64) -> u64 {
        self.latest = self.latest.max(now_ms);
        let oldest = self.latest.saturating_sub(WINDOW_MS);
        while let Some(entry) = self.by_second.first_entry() {
            if (entry.key() + 1) * 1000 > oldest {
                break;
            }
            self.len -= entry.remove().len();
        }
        oldest
    }

    /// Whether a call made at `at_ms` with `nonce` could be taken at
    /// `now_ms`: in the window and not seen.
    pub fn check(&mut self, at_ms: u64, nonce: &[u8; 16], now_ms: u64) -> Result<(), Refusal> {
        let oldest = self.oldest(now_ms);
        if at_ms < oldest || at_ms > now_ms.saturating_add(WINDOW_MS) {
            return Err(Refusal::OutOfWindow);
        }
        if self
            .by_second
            .get(&(at_ms / 1000))
            .is_some_and(|second| second.contains(nonce))
        {
            return Err(Refusal::Replayed);
        }
        Ok(())
    }

    /// Takes a call made at `at_ms` with `nonce`, at `now_ms`: in the
    /// window, and its nonce never seen.
    pub fn admit(&mut self, at_ms: u64, nonce: [u8; 16], now_ms: u64) -> Result<(), Refusal> {
        self.check(at_ms, &nonce, now_ms)?;
        if self.len >= self.max {
            return Err(Refusal::TooMany);
        }
        self.by_second
            .entry(at_ms / 1000)
            .or_default()
            .insert(nonce);
        self.len += 1;
        Ok(())
    }
}

/// What every [`Checked`] service of a worker shares.
#[derive(Debug)]
pub struct Checker {
    secret: ServiceSecret,
    instance: Instance,
    seen: Mutex<Seen>,
}

/// A signature header's parts.
struct Signature {
    at_ms: u64,
    nonce: [u8; 16],
    instance: Instance,
    digest: [u8; 32],
    tag: [u8; 32],
}

impl Checker {
    /// Checking calls for worker `instance` against `secret`.
    pub fn new(secret: ServiceSecret, instance: Instance) -> Arc<Self> {
        Arc::new(Self {
            secret,
            instance,
            seen: Mutex::new(Seen::new(MAX_SEEN)),
        })
    }

    fn header(req: &http::Request<Body>) -> Option<Signature> {
        Self::parse(req.headers().get(SIGNATURE_HEADER)?.to_str().ok()?)
    }

    fn parse(value: &str) -> Option<Signature> {
        let mut parts = value.split('.');
        let signature = Signature {
            at_ms: parts.next()?.parse().ok()?,
            nonce: unhex(parts.next()?)?,
            instance: unhex(parts.next()?)?,
            digest: unhex(parts.next()?)?,
            tag: unhex(parts.next()?)?,
        };
        parts.next().is_none().then_some(signature)
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything the headers tell, then the body: a caller without the
    /// secret has no byte of its body read.
    async fn check(&self, req: http::Request<Body>) -> Result<http::Request<Body>, Refusal> {
        let sig = Self::header(&req).ok_or(Refusal::Unsigned)?;
        self.seen().check(sig.at_ms, &sig.nonce, now_ms())?;
        if sig.instance != self.instance {
            return Err(Refusal::OtherWorker);
        }
        let call = Call {
            path: req.uri().path(),
            at_ms: sig.at_ms,
            nonce: sig.nonce,
            instance: sig.instance,
            digest: sig.digest,
        };
        if !self.secret.verify(&call, &sig.tag) {
            return Err(Refusal::BadSignature);
        }
        let (parts, body) = req.into_parts();
        let body: Bytes = Limited::new(body, MAX_CALL_BYTES)
            .collect()
            .await
            .map_err(|_| Refusal::Body)?
            .to_bytes();
        if digest(&body) != sig.digest {
            return Err(Refusal::BadSignature);
        }
        // only a good call's nonce is kept
        self.seen().admit(sig.at_ms, sig.nonce, now_ms())?;
        Ok(http::Request::from_parts(parts, Body::new(Full::new(body))))
    }
}

/// The worker's side: `inner` (a generated gRPC server) takes only calls
/// signed with the secret, or every call without one (which the node allows
/// on loopback only).
#[derive(Debug, Clone)]
pub struct Checked<S> {
    inner: S,
    checker: Option<Arc<Checker>>,
}

impl<S> Checked<S> {
    /// `inner` behind `checker`, if there is one.
    pub fn new(inner: S, checker: Option<Arc<Checker>>) -> Self {
        Self { inner, checker }
    }
}

impl<S: NamedService> NamedService for Checked<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Checked<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let fresh = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, fresh);
        let checker = self.checker.clone();
        Box::pin(async move {
            let Some(checker) = checker else {
                return inner.call(req).await;
            };
            // for the log of a refusal (a clone of the URI shares its bytes)
            let uri = req.uri().clone();
            let remote = req
                .extensions()
                .get::<tonic::transport::server::TcpConnectInfo>()
                .and_then(|i| i.remote_addr());
            match checker.check(req).await {
                Ok(req) => inner.call(req).await,
                Err(refusal) => {
                    metrics::counter!("chat_rpc_unauthenticated_total", "reason" => refusal.as_str())
                        .increment(1);
                    let path = uri.path();
                    tracing::warn!(?remote, path, reason = refusal.as_str(), "refused a call");
                    Ok(refusal.status().into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000;

    #[test]
    fn a_nonce_is_taken_once_within_the_window_and_never_outside_it() {
        let mut seen = Seen::new(10);
        let now = 100 * S;
        assert_eq!(seen.check(now, &[1; 16], now), Ok(()));
        assert_eq!(seen.admit(now, [1; 16], now), Ok(()));
        assert_eq!(seen.check(now, &[1; 16], now + 5), Err(Refusal::Replayed));
        assert_eq!(seen.admit(now, [1; 16], now + 5), Err(Refusal::Replayed));
        assert_eq!(seen.admit(now, [2; 16], now), Ok(()), "another nonce");
        let window = 30 * S;
        assert_eq!(
            seen.admit(now - window - 1, [3; 16], now),
            Err(Refusal::OutOfWindow),
            "too old"
        );
        assert_eq!(
            seen.admit(now + window + 1, [3; 16], now),
            Err(Refusal::OutOfWindow),
            "from the future"
        );
        assert_eq!(seen.admit(now + window, [3; 16], now), Ok(()));
        // once its second is out of the window, a nonce is forgotten: a call
        // carrying it is refused for its time anyway
        let later = now + window + S;
        assert_eq!(seen.admit(now, [1; 16], later), Err(Refusal::OutOfWindow));
        assert_eq!(seen.admit(later, [4; 16], later), Ok(()));
        assert_eq!(seen.len, 2, "the second at `now` is gone: [3] and [4]");
        // a clock stepped back does not bring the forgotten second back
        assert_eq!(
            seen.admit(now, [1; 16], now + 5),
            Err(Refusal::OutOfWindow),
            "the window ends where the latest clock put it"
        );
    }

    #[test]
    fn a_worker_keeps_at_most_so_many_nonces() {
        let mut seen = Seen::new(3);
        let now = 100 * S;
        for n in 0..3 {
            assert_eq!(seen.admit(now, [n; 16], now), Ok(()));
        }
        assert_eq!(seen.admit(now, [9; 16], now), Err(Refusal::TooMany));
        assert_eq!(
            seen.admit(now, [0; 16], now),
            Err(Refusal::Replayed),
            "a replay is still one"
        );
        // room again once the window moves past them
        let later = now + 31 * S;
        assert_eq!(seen.admit(later, [9; 16], later), Ok(()));
    }

    #[test]
    fn a_signature_header_parses_only_in_its_one_form() {
        let part = |n: usize, b: &str| b.repeat(n);
        let (nonce, instance, digest, tag) = (
            part(16, "01"),
            part(16, "ab"),
            part(32, "ff"),
            part(32, "00"),
        );
        let good = format!("1000.{nonce}.{instance}.{digest}.{tag}");
        let sig = Checker::parse(&good).expect("parses");
        assert_eq!(
            (sig.at_ms, sig.nonce, sig.instance, sig.digest, sig.tag),
            (1000, [1; 16], [0xab; 16], [0xff; 32], [0; 32])
        );
        for bad in [
            format!("1000.{nonce}.{instance}.{digest}"),
            format!("{good}.00"),
            format!("x.{nonce}.{instance}.{digest}.{tag}"),
            format!("1000.{}.{instance}.{digest}.{tag}", &nonce[1..]),
            format!("1000.{}zz.{instance}.{digest}.{tag}", &nonce[2..]),
            format!("1000.{}éé.{instance}.{digest}.{tag}", &nonce[4..]),
        ] {
            assert!(Checker::parse(&bad).is_none(), "{bad}");
        }
    }
}
