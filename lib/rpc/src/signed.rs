//! Signed calls between edge and worker, as two tower services around the
//! gRPC transport: [`Signed`] on the edge's channel signs each call as it
//! leaves, [`Checked`] around each of the worker's services (not its health
//! check) refuses any call without a good, fresh, first-seen signature. The
//! generated clients and servers see neither.
//!
//! The signature travels in [`SIGNATURE_HEADER`] as
//! `<milliseconds>.<nonce, hex>.<HMAC, hex>` and covers the method's path,
//! the time, the nonce and the digest of the body as sent (see
//! [`ServiceSecret::sign`]). A worker takes a call made at most
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

use crate::service_auth::{Call, ServiceSecret};

/// The header carrying a call's signature.
pub const SIGNATURE_HEADER: &str = "x-chat-signature";
/// How far a call's time may be from the worker's clock either way.
pub const WINDOW: Duration = Duration::from_secs(30);
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

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(2 * bytes.len());
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The edge's side: a transport (tonic's `Channel`) whose calls are signed
/// with the secret, or go as they are without one.
#[derive(Debug, Clone)]
pub struct Signed<S> {
    inner: S,
    secret: Option<ServiceSecret>,
}

impl<S> Signed<S> {
    /// Calls on `inner`, signed with `secret` if there is one.
    pub fn new(inner: S, secret: Option<ServiceSecret>) -> Self {
        Self { inner, secret }
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
        let secret = self.secret.clone();
        Box::pin(async move {
            let Some(secret) = secret else {
                return inner.call(req).await.map_err(Into::into);
            };
            let (mut parts, body) = req.into_parts();
            let body = body.collect().await?.to_bytes();
            let (at_ms, nonce) = (now_ms(), rand::random::<[u8; 16]>());
            let call = Call {
                path: parts.uri.path(),
                at_ms,
                nonce,
                body: &body,
            };
            let value = format!("{at_ms}.{}.{}", hex(&nonce), hex(&secret.sign(&call)));
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
    /// Not the signature of this call under the secret.
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
            Self::BadSignature => "bad_signature",
            Self::Replayed => "replayed",
            Self::Body => "body",
            Self::TooMany => "too_many",
        }
    }

    fn status(self) -> Status {
        match self {
            Self::Unsigned | Self::BadSignature => {
                Status::unauthenticated("a signed call is required (service secret)")
            }
            Self::OutOfWindow => Status::unauthenticated(
                "the call's signature is too old or from the future (clocks apart?)",
            ),
            Self::Replayed => Status::unauthenticated("the call's signature was used before"),
            Self::Body => Status::resource_exhausted("call body too large or unreadable"),
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
}

impl Seen {
    /// Keeping at most `max` nonces.
    pub fn new(max: usize) -> Self {
        Self {
            by_second: BTreeMap::new(),
            len: 0,
            max,
        }
    }

    /// Admits a call made at `at_ms` with `nonce`, at `now_ms`: in the
    /// window, and its nonce never seen.
    pub fn admit(&mut self, at_ms: u64, nonce: [u8; 16], now_ms: u64) -> Result<(), Refusal> {
        let window = u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX);
        let oldest = now_ms.saturating_sub(window);
        if at_ms < oldest || at_ms > now_ms.saturating_add(window) {
            return Err(Refusal::OutOfWindow);
        }
        // seconds whose every call is now out of the window
        while let Some(entry) = self.by_second.first_entry() {
            if (entry.key() + 1) * 1000 > oldest {
                break;
            }
            self.len -= entry.remove().len();
        }
        let second = self.by_second.entry(at_ms / 1000).or_default();
        if second.contains(&nonce) {
            return Err(Refusal::Replayed);
        }
        if self.len >= self.max {
            return Err(Refusal::TooMany);
        }
        second.insert(nonce);
        self.len += 1;
        Ok(())
    }
}

/// What every [`Checked`] service of a worker shares.
#[derive(Debug)]
pub struct Checker {
    secret: ServiceSecret,
    seen: Mutex<Seen>,
}

impl Checker {
    /// Checking calls against `secret`.
    pub fn new(secret: ServiceSecret) -> Arc<Self> {
        Arc::new(Self {
            secret,
            seen: Mutex::new(Seen::new(MAX_SEEN)),
        })
    }

    fn header(req: &http::Request<Body>) -> Option<(u64, [u8; 16], [u8; 32])> {
        let value = req.headers().get(SIGNATURE_HEADER)?.to_str().ok()?;
        let mut parts = value.split('.');
        let at_ms = parts.next()?.parse().ok()?;
        let nonce = unhex(parts.next()?)?;
        let tag = unhex(parts.next()?)?;
        parts.next().is_none().then_some((at_ms, nonce, tag))
    }

    async fn check(&self, req: http::Request<Body>) -> Result<http::Request<Body>, Refusal> {
        let (at_ms, nonce, tag) = Self::header(&req).ok_or(Refusal::Unsigned)?;
        let window = u64::try_from(WINDOW.as_millis()).unwrap_or(u64::MAX);
        let now = now_ms();
        if at_ms.abs_diff(now) > window {
            // before reading a body for nothing
            return Err(Refusal::OutOfWindow);
        }
        let (parts, body) = req.into_parts();
        let body: Bytes = Limited::new(body, MAX_CALL_BYTES)
            .collect()
            .await
            .map_err(|_| Refusal::Body)?
            .to_bytes();
        let call = Call {
            path: parts.uri.path(),
            at_ms,
            nonce,
            body: &body,
        };
        if !self.secret.verify(&call, &tag) {
            return Err(Refusal::BadSignature);
        }
        // only a good signature's nonce is kept
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(at_ms, nonce, now_ms())?;
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
        assert_eq!(seen.admit(now, [1; 16], now), Ok(()));
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
    fn hex_round_trips_and_refuses_what_is_not_hex() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex::<4>(&hex(&bytes)), Some(bytes));
        assert_eq!(unhex::<4>("0001abf"), None, "short");
        assert_eq!(unhex::<4>("0001abzz"), None, "not hex");
        assert_eq!(unhex::<2>("éé"), None, "not ASCII");
    }
}
