//! NATS: subjects, the JetStream streams and consumers declared in `nats/`,
//! and the few operations edge and worker perform on them.
//!
//! Subjects:
//! - `chat.user.<userId>.event`: notifications for one user, captured by the
//!   `CHAT_USERS` stream so that offline devices get them on reconnect;
//! - `chat.group.<groupId>.msg` / `.event.<userId>`: group traffic,
//!   `CHAT_GROUPS`: messages, and each member's membership events (it
//!   subscribed, left or was removed) that decide live delivery in the
//!   group's order (`live.rs`);
//!   the stream is the write-ahead log of the messages, and the shared
//!   `persist` consumer writes them into MongoDB behind it (`persist.rs`);
//! - `$KV.CHAT_SENDS.<group>.<sender>.<clientMsgId>`: the send log, one entry
//!   per send for the idempotency window (`sends.rs`);
//! - `$KV.CHAT_PLACES.<user>.<device>`: each device's place in both streams
//!   (`places.rs`);
//! - `chat.ctl.members.<groupId>` (core NATS): "this group's membership
//!   changed", between workers.
//! - `$KV.CHAT_PRESENCE.{u.<user>,at.<edge>.<user>,e.<edge>}`: who is
//!   online on which edge, the edges' heartbeats; `chat.presence.<user>`
//!   (core NATS): a user went on- or offline (`presence.rs`);
//! - `chat.push.<groupId>`: the push hook, per message the members with no
//!   connection open, for an operator's push gateway (`CHAT_PUSH`,
//!   `push.rs`);
//! - `chat.signal.<groupId>` (core NATS): ephemeral group events (typing)
//!   from the sender's edge to every edge (`signals.rs`);
//! - `chat.status.<groupId>` (core NATS, workers only): message statuses
//!   for the senders a header names, to every edge (`signals.rs`).
//!
//! Each edge reads both streams once through consumers of its own
//! (`live.rs`) and writes them to its connections; a device's place in
//! each is an entry of the `CHAT_PLACES` bucket (`places.rs`), from which
//! it catches up on reconnect, on whichever edge node it connects to,
//! through a short-lived consumer (see ARCHITECTURE.md, "Delivery").
//!
//! Every connection authenticates to NATS with its role's user (see
//! `nats/auth.conf`): edges may only read the streams through consumers of
//! their own and save device places, workers publish and manage streams,
//! buckets and consumers.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream;
use bytes::Bytes;
use chat_domain::{GroupId, UserId};

mod bucket;
mod defs;
mod live;
mod messages;
mod persist;
mod places;
mod presence;
mod push;
mod sends;
mod signals;

pub use bucket::BucketSize;
pub use defs::{Definitions, PRESENCE_FORGET_AFTER};
pub use live::{
    Batch, CatchUp, Feed, GroupTraffic, LiveMessage, LiveReader, MembershipEvent, MembershipTail,
    member_event_subject,
};
pub use messages::{BatchPublished, Change, Envelope, MAX_BATCH, Position, Published, SEQ_HEADER};
pub use persist::{
    Backlog, Delivered, PersistFeed, Persisted, Waiting, group_of_members_subject, members_subject,
};
pub use places::{
    DEVICE_NOTICES, PLACES_BUCKET, Place, Places, Saved, Stored, device_notice_subject, place_key,
};
pub use presence::{
    BEAT_EVERY, Beat, Beats, Change as PresenceChange, DEAD_AFTER, PRESENCE_BUCKET,
    PRESENCE_CHANGES, Presence, Record as PresenceRecord, Update as PresenceUpdate,
    presence_subject,
};
pub use push::{
    PUSH_RECIPIENTS_MAX, PUSH_SUBJECTS, PushDelivery, PushEvent, WEBHOOK_ATTEMPTS,
    WEBHOOK_CONSUMER, push_subject,
};
pub use sends::{Claimed, SENDS_BUCKET, SendLog, SendRecord, send_key, settle_fits};
pub use signals::{
    BadSignal, GROUP_SIGNALS, GROUP_STATUSES, SIGNAL_FROM, SIGNAL_MAX_BYTES, SIGNAL_TO,
    SIGNAL_TO_MAX, Signal, group_signal_subject, group_status_subject,
};

/// The header JetStream uses to drop duplicate publishes.
const MSG_ID: &str = "Nats-Msg-Id";

/// A bus operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// NATS or JetStream did not answer or refused: retry later.
    #[error("nats unavailable: {0}")]
    Unavailable(String),
    /// A definition in `nats/` is wrong.
    #[error("bad definition {file}: {message}")]
    Definition { file: &'static str, message: String },
    /// The connection settings contradict each other.
    #[error("{0}")]
    Config(String),
}

/// The NATS user a node connects as (`nats/auth.conf` defines one per role).
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// TLS to NATS: the CA that signs the servers' certificates, and this
/// client's certificate and key if the servers ask for one (`verify`).
#[derive(Clone, Debug)]
pub struct Tls {
    pub ca: std::path::PathBuf,
    pub client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// How a node proves itself to NATS and protects the connection.
#[derive(Clone, Debug, Default)]
pub struct Access {
    pub credentials: Option<Credentials>,
    pub tls: Option<Tls>,
}

impl Tls {
    /// Refuses a server URL the client would reach in the clear whatever
    /// TLS it is given: async-nats speaks plain WebSocket on `ws://`, and
    /// its `wss://` does not take this CA. Bare `host:port`, `nats://` and
    /// `tls://` are upgraded and checked against the CA.
    pub fn check_urls(url: &str) -> Result<(), BusError> {
        for u in url.split(',').map(str::trim) {
            let scheme = u
                .split_once("://")
                .map(|(s, _)| s.to_ascii_lowercase())
                .unwrap_or_default();
            if !matches!(scheme.as_str(), "" | "nats" | "tls") {
                return Err(BusError::Config(format!(
                    "{u}: with a CA for NATS only nats:// and tls:// URLs are used (a {scheme}:// \
                     connection would not be checked against it)"
                )));
            }
        }
        Ok(())
    }
}

impl From<Option<Credentials>> for Access {
    fn from(credentials: Option<Credentials>) -> Self {
        Self {
            credentials,
            tls: None,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // the password is never printed
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl BusError {
    fn nats(e: impl std::fmt::Display) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// The subject carrying notifications for `user`.
pub fn user_subject(user: &UserId) -> String {
    format!("chat.user.{user}.event")
}

/// The subject carrying messages of `group`.
pub fn group_msg_subject(group: &GroupId) -> String {
    format!("chat.group.{group}.msg")
}

/// The messages of every group.
pub fn group_msg_subject_pattern() -> String {
    "chat.group.*.msg".to_owned()
}

/// A handle on NATS and JetStream; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    defs: Definitions,
    /// When the current connection came up; `None` while disconnected.
    up_since: Arc<Mutex<Option<Instant>>>,
    /// Rises whenever core NATS messages may have been missed (connection
    /// lost or regained, a subscription too slow): see [`Bus::generation`].
    generation: Arc<AtomicU64>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

impl Bus {
    /// Connects to NATS at `url` (comma-separated for a cluster) as
    /// `credentials` (none: anonymous, which every shipped server config
    /// refuses). Fails fast when no server answers, then reconnects by itself
    /// forever.
    pub async fn connect(
        url: &str,
        name: &str,
        access: impl Into<Access>,
        defs: Definitions,
    ) -> Result<Self, BusError> {
        let Access { credentials, tls } = access.into();
        let up_since = Arc::new(Mutex::new(None::<Instant>));
        let generation = Arc::new(AtomicU64::new(0));
        let events = up_since.clone();
        let missed = generation.clone();
        let mut options = async_nats::ConnectOptions::new();
        if let Some(c) = credentials {
            // replies come to an inbox of the user's own (`nats/auth.conf`
            // lets each user subscribe to its own only), so no role reads
            // another's replies
            options = options
                .custom_inbox_prefix(format!("_INBOX.{}", c.user))
                .user_and_password(c.user, c.password);
        }
        if let Some(tls) = &tls {
            Tls::check_urls(url)?;
            // the CA's certificates alone are trusted, and the connection
            // never goes on in the clear, whatever the server offers
            options = options
                .add_root_certificates(tls.ca.clone())
                .require_tls(true);
            if let Some((cert, key)) = &tls.client {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
        }
        let client = options
            .name(name)
            .event_callback(move |event| {
                let events = events.clone();
                let missed = missed.clone();
                async move {
                    let mut up = events.lock().unwrap_or_else(|p| p.into_inner());
                    match event {
                        async_nats::Event::Connected => {
                            *up = Some(Instant::now());
                            missed.fetch_add(1, Ordering::SeqCst);
                        }
                        async_nats::Event::Disconnected | async_nats::Event::Closed => {
                            *up = None;
                            missed.fetch_add(1, Ordering::SeqCst);
                        }
                        async_nats::Event::SlowConsumer(_) => {
                            missed.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => {}
                    }
                }
            })
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .connect(url.split(',').map(str::trim).collect::<Vec<_>>())
            .await
            .map_err(BusError::nats)?;
        // retry_on_initial_connect returns at once; wait for the first connection
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                let hint = if tls.is_some() {
                    " over TLS (check that its certificate is signed by the CA given, and that \
                     it takes this client's certificate)"
                } else {
                    ""
                };
                return Err(BusError::Unavailable(format!(
                    "no nats server answered at {url}{hint}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut js = jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(5));
        // the first connection may have come before the callback was set
        up_since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(Instant::now);
        Ok(Self {
            client,
            js,
            defs,
            up_since,
            generation,
        })
    }

    /// A number that rises whenever this connection may have missed core
    /// NATS messages (it was down, came back, or a subscription fell
    /// behind). Caches kept current by core NATS notices note it when they
    /// fill and drop what was noted under an older one.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The underlying NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The definitions in use.
    pub fn definitions(&self) -> &Definitions {
        &self.defs
    }

    /// Creates the streams, or updates them to match `nats/`. Idempotent:
    /// every node runs it at start-up.
    /// A cluster that has just started may not have elected its JetStream
    /// leader yet (on a busy machine that took over 30 s): keep trying for
    /// up to 60 s.
    ///
    /// Some fields cannot change on a stream that exists (its storage type,
    /// for one, and `max_consumers` on older servers): nats-server refuses
    /// the whole update. That is logged at warn and the stream is used as it
    /// is, so a definition an operator changed never stops every node at
    /// start-up (OPERATIONS.md, "Changing a stream's fixed fields").
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        for config in [
            &self.defs.users_stream,
            &self.defs.groups_stream,
            &self.defs.push_stream,
        ] {
            self.until_streams_answer(&config.name, || async {
                match self.js.create_or_update_stream(config.clone()).await {
                    Err(e) if fixed_field(&e) => {
                        // only if it exists: a refused creation is an error
                        self.js.get_stream_no_info(&config.name).await?;
                        tracing::warn!(stream = %config.name, error = %e, "the stream differs from its definition in a field nats-server cannot change; using it as it is");
                        Ok(())
                    }
                    other => other.map(drop).map_err(async_nats::Error::from),
                }
            })
            .await?;
        }
        Ok(())
    }
}

/// Whether nats-server refused a stream update because it would change a
/// field that is fixed once the stream exists.
fn fixed_field(e: &async_nats::jetstream::context::CreateStreamError) -> bool {
    use async_nats::jetstream::{ErrorCode, context::CreateStreamErrorKind};
    matches!(e.kind(), CreateStreamErrorKind::JetStream(js)
        if js.error_code() == ErrorCode::STREAM_INVALID_CONFIG
            && js.to_string().contains("can not change"))
}

impl Bus {
    /// Waits (up to 60 s) until the streams exist, without changing them:
    /// what an edge does at start-up, since only workers may declare
    /// streams.
    pub async fn wait_for_streams(&self) -> Result<(), BusError> {
        for name in [&self.defs.users_stream.name, &self.defs.groups_stream.name] {
            self.until_streams_answer(name, || self.js.get_stream(name))
                .await?;
        }
        Ok(())
    }

    /// Runs `op` on stream `name` until it succeeds, for up to 60 s (a
    /// cluster that has just started may not have its JetStream leader yet).
    async fn until_streams_answer<T, E: std::fmt::Display, F>(
        &self,
        name: &str,
        op: impl Fn() -> F,
    ) -> Result<(), BusError>
    where
        F: Future<Output = Result<T, E>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match op().await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(stream = %name, error = %e, "jetstream not ready yet");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(BusError::Unavailable(format!("stream {name}: {e}"))),
            }
        }
    }

    /// How long the connection to NATS has been up, if it is. Publishes made
    /// while disconnected may sit in the client's buffer and go out after a
    /// reconnect; once the connection has been up a while, they have.
    pub fn up_for(&self) -> Option<Duration> {
        let up = *self.up_since.lock().unwrap_or_else(|p| p.into_inner());
        up.filter(|_| self.is_connected()).map(|t| t.elapsed())
    }

    /// Whether the connection to NATS is up.
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes `payload` to `user`'s notification subject and waits until
    /// JetStream has stored it. `dedup_id` makes a retried publish a no-op
    /// within the stream's duplicate window.
    pub async fn publish_user_event(
        &self,
        user: &UserId,
        dedup_id: &str,
        payload: Bytes,
    ) -> Result<(), BusError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(MSG_ID, dedup_id);
        self.js
            .publish_with_headers(user_subject(user), headers, payload)
            .await
            .map_err(BusError::nats)?
            .await
            .map_err(BusError::nats)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With a CA for NATS, no URL may lead to a connection that skips it.
    #[test]
    fn with_tls_only_urls_that_upgrade_are_taken() {
        for ok in [
            "nats://n1:4222",
            "tls://n1:4222",
            "n1:4222",
            "NATS://n1:4222, tls://n2:4222",
        ] {
            assert!(Tls::check_urls(ok).is_ok(), "{ok}");
        }
        for refused in ["ws://n1:8080", "nats://n1:4222,wss://n2:443", "WS://n1:1"] {
            let e = Tls::check_urls(refused).expect_err(refused);
            assert!(matches!(e, BusError::Config(_)), "{e}");
        }
    }
}
