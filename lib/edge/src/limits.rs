//! Request rate limits: per connection (WebSocket requests), per user (REST
//! calls and WebSocket upgrades, once the token is verified; and, apart,
//! the WebSocket connections it may hold and the requests of all of them
//! together) and per client
//! address (every request, before the token is even looked at, so floods of
//! bad tokens cost little). Limits are per edge; an operator with N edges
//! behind a balancer allows N times the rate.
//!
//! Over a limit, REST answers `429` with `Retry-After`.

use std::{
    collections::HashMap,
    hash::Hash,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    extract::{ConnectInfo, Request, State},
    http::HeaderValue,
    middleware::Next,
    response::{IntoResponse, Response},
};
use chat_domain::UserId;
use chat_protocol::ErrorCode;

use crate::{ApiError, AppState};

/// A token bucket: `rate` per second sustained, `burst` at once.
#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes one token if there is one.
    pub(crate) fn take(&mut self) -> bool {
        self.try_take().is_ok()
    }

    /// Takes one token, or says how long until there is one.
    fn try_take(&mut self) -> Result<(), Duration> {
        self.try_take_n(1.0)
    }

    /// Takes `n` tokens (at most the burst), or says how long until there
    /// are as many; takes none then.
    fn try_take_n(&mut self, n: f64) -> Result<(), Duration> {
        let n = n.min(self.burst);
        self.refill(Instant::now());
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else if self.rate <= 0.0 {
            Err(Duration::from_secs(60))
        } else {
            Err(Duration::from_secs_f64((n - self.tokens) / self.rate))
        }
    }

    /// Takes `n` tokens whether or not there are as many, for work already
    /// done: the bucket may go into debt, down to minus a burst, which
    /// later requests wait out.
    fn charge(&mut self, n: f64) {
        self.refill(Instant::now());
        self.tokens = (self.tokens - n).max(-self.burst);
    }

    /// Whether the bucket is full again: its key can be forgotten.
    fn idle(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Most keys one limiter remembers: past it, idle keys are forgotten, and a
/// new key is refused while none is idle (memory stays bounded under a flood
/// of new users or addresses).
const MAX_KEYS: usize = 100_000;

/// Reads of a fanning-out request (a group's presence: one per member)
/// that cost as much of a user's budget as one request.
pub(crate) const FAN_OUT_PER_REQUEST: usize = 10;

/// One bucket per key.
#[derive(Debug)]
pub(crate) struct Keyed<K> {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    /// `rate` per second and key (0: no limit), `burst` at once.
    pub(crate) fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one request of `key`; how long to wait if over the limit.
    pub(crate) fn take(&self, key: &K) -> Result<(), Duration> {
        self.take_n(key, 1.0)
    }

    /// Counts `n` requests of `key` at once (at most a burst).
    pub(crate) fn take_n(&self, key: &K, n: f64) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(key) && buckets.len() >= MAX_KEYS {
            let now = Instant::now();
            buckets.retain(|_, b| !b.idle(now));
            if buckets.len() >= MAX_KEYS {
                return Err(Duration::from_secs(1));
            }
        }
        buckets
            .entry(key.clone())
            .or_insert_with(|| TokenBucket::new(self.rate, self.burst))
            .try_take_n(n)
    }
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    /// Charges `n` requests of `key` for work already done (see
    /// [`TokenBucket::charge`]); nothing for a key it has no room to keep.
    pub(crate) fn charge(&self, key: &K, n: f64) {
        if self.rate <= 0.0 {
            return;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = buckets.get_mut(key) {
            b.charge(n);
        } else if buckets.len() < MAX_KEYS {
            let mut b = TokenBucket::new(self.rate, self.burst);
            b.charge(n);
            buckets.insert(key.clone(), b);
        }
    }
}

/// The edge's per-user and per-address limits.
#[derive(Debug)]
pub(crate) struct Limits {
    per_user: Keyed<UserId>,
    per_address: Keyed<IpAddr>,
    connections: Arc<Connections>,
}

/// Each user's connections open on this edge, against a cap (one account
/// must not take the edge's connection slots from everyone else), and the
/// request budget they share (more connections must not mean more
/// requests). An entry lives while the user has a connection here.
#[derive(Debug)]
struct Connections {
    max: usize,
    /// The shared budget: requests per second (0: none) and burst.
    rate: f64,
    burst: f64,
    open: Mutex<HashMap<UserId, Open>>,
}

#[derive(Debug)]
struct Open {
    count: usize,
    budget: Arc<Mutex<TokenBucket>>,
}

/// One of a user's connections, counted until dropped, with the budget its
/// user's connections share: a frame costs one lock of the user's own
/// bucket, no lookup.
#[derive(Debug)]
pub(crate) struct UserConnection {
    of: Arc<Connections>,
    user: UserId,
    budget: Arc<Mutex<TokenBucket>>,
}

impl UserConnection {
    /// Counts one request against the user's shared budget: whether it is
    /// within it.
    pub(crate) fn take(&self) -> bool {
        self.of.rate <= 0.0 || self.budget.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl Drop for UserConnection {
    fn drop(&mut self) {
        let mut open = self.of.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = open.get_mut(&self.user) {
            o.count -= 1;
            if o.count == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// A user already at its cap of connections on this edge.
#[derive(Debug)]
pub(crate) struct TooManyConnections(pub(crate) usize);

impl From<TooManyConnections> for ApiError {
    fn from(e: TooManyConnections) -> Self {
        metrics::counter!("chat_ws_refused_total", "why" => "user_connections").increment(1);
        ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "you have {} connections open on this server; close one first",
                e.0
            ),
        )
    }
}

/// `429` with the contract's body and a `Retry-After` in whole seconds.
fn too_many(wait: Duration) -> Response {
    let mut res =
        ApiError::new(ErrorCode::RateLimited, "too many requests; slow down").into_response();
    let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        res.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
    }
    res
}

impl Limits {
    pub(crate) fn new(config: &crate::Config) -> Self {
        Self {
            per_user: Keyed::new(
                config.user_requests_per_sec,
                config.user_requests_per_sec * 2.0,
            ),
            per_address: Keyed::new(
                config.address_requests_per_sec,
                config.address_requests_per_sec * 2.0,
            ),
            connections: Arc::new(Connections {
                max: config.max_connections_per_user.max(1),
                rate: config.user_ws_requests_per_sec,
                // a user may at least burst as one connection may
                burst: (config.user_ws_requests_per_sec * 2.0).max(config.request_burst),
                open: Mutex::default(),
            }),
        }
    }

    /// Counts a new connection of `user`, unless it has its cap open here;
    /// the count drops with the returned guard, which also holds the
    /// user's shared request budget.
    pub(crate) fn connection(&self, user: &UserId) -> Result<UserConnection, TooManyConnections> {
        let of = &self.connections;
        let mut open = of.open.lock().unwrap_or_else(|e| e.into_inner());
        let o = open.entry(user.clone()).or_insert_with(|| Open {
            count: 0,
            budget: Arc::new(Mutex::new(TokenBucket::new(of.rate, of.burst))),
        });
        if o.count >= of.max {
            return Err(TooManyConnections(o.count));
        }
        o.count += 1;
        let budget = o.budget.clone();
        drop(open);
        Ok(UserConnection {
            of: of.clone(),
            user: user.clone(),
            budget,
        })
    }

    /// Counts a request of `user`; a `429` to answer if over the limit.
    pub(crate) fn user(&self, user: &UserId) -> Result<(), RateLimited> {
        self.per_user.take(user).map_err(RateLimited)
    }

    /// Counts what a request of `user` that fans out costs beyond the one
    /// request counted already: one more per [`FAN_OUT_PER_REQUEST`] reads
    /// it makes, never so many that a full budget could not pay for it.
    pub(crate) fn user_fan_out(&self, user: &UserId, reads: usize) -> Result<(), RateLimited> {
        let extra = (reads / FAN_OUT_PER_REQUEST) as f64;
        let extra = extra.min(self.per_user.burst - 1.0);
        if extra < 1.0 {
            return Ok(());
        }
        self.per_user.take_n(user, extra).map_err(RateLimited)
    }

    /// Charges `user` for work a request just did, `done` reads or writes
    /// (the members a membership change told, each a stored write; a tenth
    /// of the members a page of groups listed): one more request per 10 of
    /// them (at most a burst less one), owed if the budget is spent, so
    /// that doing it over and over costs the caller in proportion.
    pub(crate) fn user_owes(&self, user: &UserId, done: usize) {
        let extra = ((done / FAN_OUT_PER_REQUEST) as f64).min(self.per_user.burst - 1.0);
        if extra >= 1.0 {
            self.per_user.charge(user, extra);
        }
    }

    /// Charges `user` for the members (or other entries) a read just
    /// listed, each read and sent: one more request per 100 of them, owed
    /// as [`Limits::user_owes`].
    pub(crate) fn user_listed(&self, user: &UserId, listed: usize) {
        self.user_owes(user, listed / FAN_OUT_PER_REQUEST);
    }
}

/// A caller over its limit, with how long to wait.
#[derive(Debug)]
pub(crate) struct RateLimited(Duration);

impl IntoResponse for RateLimited {
    fn into_response(self) -> Response {
        metrics::counter!("chat_rest_rate_limited_total").increment(1);
        too_many(self.0)
    }
}

impl From<RateLimited> for ApiError {
    fn from(_: RateLimited) -> Self {
        ApiError::new(ErrorCode::RateLimited, "too many requests; slow down")
    }
}

/// The key of a client address: an IPv6 client usually holds a whole /64,
/// so that is what counts as one address (an IPv4-mapped one is IPv4).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Middleware: counts every request against its client address before
/// anything else runs.
pub(crate) async fn by_address(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let addr = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(ip) = addr
        && let Err(wait) = app.limits.per_address.take(&address_key(ip))
    {
        metrics::counter!("chat_rest_rate_limited_total").increment(1);
        return too_many(wait);
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_that_fans_out_costs_its_reads_within_one_burst() {
        // 10 a second, bursts of 20
        let limits = Limits::new(&crate::Config {
            user_requests_per_sec: 10.0,
            ..crate::Config::default()
        });
        let (alice, bob) = (
            UserId::parse("alice").expect("id"),
            UserId::parse("bob").expect("id"),
        );
        limits.user(&alice).expect("the request itself");
        // 150 reads: 15 more
        limits.user_fan_out(&alice, 150).expect("within the budget");
        assert!(limits.user_fan_out(&alice, 150).is_err(), "4 left");
        limits.user(&alice).expect("a plain request still goes");
        limits
            .user_fan_out(&alice, 9)
            .expect("under 10 reads: free");
        // however many reads, a full budget pays for one such request
        limits.user(&bob).expect("the request itself");
        limits.user_fan_out(&bob, 100_000).expect("19 of 19");
        assert!(limits.user(&bob).is_err());
    }

    #[test]
    fn telling_a_large_group_is_owed_when_the_budget_is_spent() {
        // 10 a second, bursts of 20
        let limits = Limits::new(&crate::Config {
            user_requests_per_sec: 10.0,
            ..crate::Config::default()
        });
        let alice = UserId::parse("alice").expect("id");
        limits.user(&alice).expect("the change itself");
        // 1,000 told: 19 more (a burst less one), which leaves 0
        limits.user_owes(&alice, 1_000);
        let Err(RateLimited(wait)) = limits.user(&alice) else {
            panic!("nothing left")
        };
        assert!(wait > Duration::from_millis(50), "{wait:?}");
        // owed past zero, down to minus a burst: 20 tokens, 2 s at 10/s
        limits.user_owes(&alice, 1_000);
        limits.user_owes(&alice, 1_000);
        let Err(RateLimited(wait)) = limits.user(&alice) else {
            panic!("in debt")
        };
        assert!(wait > Duration::from_millis(1_900), "{wait:?}");
        // a small group costs nothing more
        let bob = UserId::parse("bob").expect("id");
        limits.user_owes(&bob, 9);
        for _ in 0..20 {
            limits.user(&bob).expect("the whole burst is left");
        }
    }

    #[test]
    fn a_user_has_at_most_its_cap_of_connections_and_a_closed_one_frees_a_slot() {
        let limits = Limits::new(&crate::Config {
            max_connections_per_user: 2,
            ..crate::Config::default()
        });
        let (alice, bob) = (
            UserId::parse("alice").expect("id"),
            UserId::parse("bob").expect("id"),
        );
        let first = limits.connection(&alice).expect("first");
        let _second = limits.connection(&alice).expect("second");
        assert!(matches!(
            limits.connection(&alice),
            Err(TooManyConnections(2))
        ));
        // another user is counted apart
        let _bobs = limits.connection(&bob).expect("bob's");
        drop(first);
        let _third = limits.connection(&alice).expect("a slot freed");
        assert!(limits.connection(&alice).is_err());
        drop(_bobs);
        // alice's connections share one budget, fresh for each user
        let budget = |user: &UserId, rate: f64| {
            let limits = Limits::new(&crate::Config {
                user_ws_requests_per_sec: rate,
                request_burst: 3.0,
                ..crate::Config::default()
            });
            let (a, b) = (
                limits.connection(user).expect("a"),
                limits.connection(user).expect("b"),
            );
            (0..10)
                .filter(|i| if i % 2 == 0 { a.take() } else { b.take() })
                .count()
        };
        // a burst of 3 between both (the rate refills nothing meanwhile)
        assert_eq!(budget(&alice, 1.0), 3);
        assert_eq!(budget(&alice, 0.0), 10, "0: no budget");
        let open = limits.connections.open.lock().expect("lock");
        assert!(
            !open.contains_key(&bob),
            "a user with none open is forgotten"
        );
    }

    #[test]
    fn a_bucket_allows_its_burst_then_says_when() {
        let mut b = TokenBucket::new(2.0, 3.0);
        assert!(b.take() && b.take() && b.take());
        let wait = b.try_take().expect_err("over the burst");
        assert!(
            wait <= Duration::from_millis(500) && wait > Duration::ZERO,
            "{wait:?}"
        );
    }

    #[test]
    fn an_ipv6_client_is_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("ip");
        assert_eq!(
            address_key(mapped),
            "192.0.2.1".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn keys_are_limited_apart_and_zero_is_no_limit() {
        let k = Keyed::new(1.0, 1.0);
        assert!(k.take(&"a").is_ok());
        assert!(k.take(&"a").is_err());
        assert!(k.take(&"b").is_ok());
        let off = Keyed::new(0.0, 0.0);
        for _ in 0..1000 {
            assert!(off.take(&"a").is_ok());
        }
    }
}
