//! NATS: subjects, the JetStream streams and consumers declared in `nats/`,
//! and the few operations edge and worker perform on them.
//!
//! Subjects:
//! - `chat.user.<userId>.event`: notifications for one user, captured by the
//!   `CHAT_USERS` stream so that offline devices get them on reconnect;
//! - `chat.group.<groupId>.msg` / `.event`: group traffic, `CHAT_GROUPS`.
//!
//! Every device of a user has its own durable pull consumer on each stream
//! (see ARCHITECTURE.md, "Delivery"), so every device receives every event
//! exactly once in normal operation, on whichever edge node it connects to.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use chat_domain::{DeviceId, GroupId, UserId};

mod defs;
mod messages;

pub use defs::Definitions;
pub use messages::{Envelope, Position, Published, SEQ_HEADER};

/// A group-message subject no group has (group ids are hex): the filter of
/// a device consumer whose user subscribed to nothing.
const NO_GROUP_SUBJECT: &str = "chat.group.-.msg";

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
}

impl BusError {
    fn nats(e: impl std::fmt::Display) -> Self {
        Self::Unavailable(e.to_string())
    }
}

/// Whether `config` filters on exactly `filters`, in any order.
fn same_subjects(config: &consumer::Config, filters: &[String]) -> bool {
    let mut have: Vec<&str> = if config.filter_subjects.is_empty() {
        vec![config.filter_subject.as_str()]
    } else {
        config.filter_subjects.iter().map(String::as_str).collect()
    };
    let mut want: Vec<&str> = filters.iter().map(String::as_str).collect();
    have.sort_unstable();
    want.sort_unstable();
    have == want
}

/// The subject carrying notifications for `user`.
pub fn user_subject(user: &UserId) -> String {
    format!("chat.user.{user}.event")
}

/// The subject carrying messages of `group`.
pub fn group_msg_subject(group: &GroupId) -> String {
    format!("chat.group.{group}.msg")
}

/// The durable consumer holding `device`'s position in its user's
/// notifications.
pub fn user_consumer_name(user: &UserId, device: &DeviceId) -> String {
    format!("u_{user}_{device}")
}

/// The durable consumer holding `device`'s position in the messages of the
/// groups its user subscribed to.
pub fn group_consumer_name(user: &UserId, device: &DeviceId) -> String {
    format!("g_{user}_{device}")
}

/// A handle on NATS and JetStream; cheap to clone.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    defs: Definitions,
    /// When the current connection came up; `None` while disconnected.
    up_since: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

impl Bus {
    /// Connects to NATS at `url` (comma-separated for a cluster). Fails fast
    /// when no server answers, then reconnects by itself forever.
    pub async fn connect(url: &str, name: &str, defs: Definitions) -> Result<Self, BusError> {
        let up_since = Arc::new(Mutex::new(None::<Instant>));
        let events = up_since.clone();
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .event_callback(move |event| {
                let events = events.clone();
                async move {
                    let mut up = events.lock().unwrap_or_else(|p| p.into_inner());
                    match event {
                        async_nats::Event::Connected => *up = Some(Instant::now()),
                        async_nats::Event::Disconnected | async_nats::Event::Closed => *up = None,
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
                return Err(BusError::Unavailable(format!(
                    "no nats server answered at {url}"
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
        })
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
    pub async fn ensure_streams(&self) -> Result<(), BusError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for config in [
            self.defs.users_stream.clone(),
            self.defs.groups_stream.clone(),
        ] {
            let name = config.name.clone();
            loop {
                match self.js.create_or_update_stream(config.clone()).await {
                    Ok(_) => break,
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!(stream = %name, error = %e, "jetstream not ready yet");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    Err(e) => return Err(BusError::Unavailable(format!("stream {name}: {e}"))),
                }
            }
        }
        Ok(())
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

    fn device_consumer(
        &self,
        name: String,
        filters: Vec<String>,
        start: consumer::DeliverPolicy,
    ) -> consumer::pull::Config {
        let mut config = self.defs.device_consumer.clone();
        config.durable_name = Some(name);
        config.deliver_policy = start;
        if let [one] = filters.as_slice() {
            config.filter_subject = one.clone();
        } else {
            config.filter_subjects = filters;
        }
        config
    }

    async fn stream(&self, name: &str) -> Result<stream::Stream<()>, BusError> {
        self.js
            .get_stream_no_info(name)
            .await
            .map_err(BusError::nats)
    }

    /// Makes sure `device` has its durable consumer on the users stream. A new
    /// device starts at the oldest stored notification, so a user who was
    /// offline since before the device existed still hears of everything.
    pub async fn ensure_user_consumer(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<String, BusError> {
        let name = user_consumer_name(user, device);
        let stream = self.stream(&self.defs.users_stream.name).await?;
        if let Ok(info) = stream.consumer_info(&name).await {
            self.migrate(&stream, info).await?;
            return Ok(name);
        }
        let config = self.device_consumer(
            name.clone(),
            vec![user_subject(user)],
            consumer::DeliverPolicy::All,
        );
        stream
            .create_consumer(config)
            .await
            .map_err(|e| BusError::Unavailable(format!("consumer {name}: {e}")))?;
        Ok(name)
    }

    /// Sets the groups `device`'s group consumer filters on. A consumer that
    /// does not exist yet starts with new messages (older ones come from
    /// history). With no groups the consumer filters on a subject no group
    /// can have, since a consumer without filters would match every group;
    /// so it always exists and an edge can bind to it at connect time, and
    /// filter changes apply to the live pull at once.
    pub async fn set_group_filters(
        &self,
        user: &UserId,
        device: &DeviceId,
        groups: &[GroupId],
    ) -> Result<(), BusError> {
        let name = group_consumer_name(user, device);
        let stream = self.stream(&self.defs.groups_stream.name).await?;
        let filters: Vec<String> = if groups.is_empty() {
            vec![NO_GROUP_SUBJECT.to_owned()]
        } else {
            groups.iter().map(group_msg_subject).collect()
        };
        let info = match stream.consumer_info(&name).await {
            Ok(info) => Some(self.migrate(&stream, info).await?),
            Err(_) => None,
        };
        let start = match info {
            // already filtering on exactly these groups (the common case of
            // a reconnect): nothing to change
            Some(info) if same_subjects(&info.config, &filters) => return Ok(()),
            // an update must keep the start the consumer was created with
            Some(info) => info.config.deliver_policy,
            // "new messages only", spelled as a start sequence, because only
            // consumers with an explicit start can be reset (see `reset`)
            None => {
                let last = self
                    .js
                    .get_stream(&self.defs.groups_stream.name)
                    .await
                    .map_err(BusError::nats)?
                    .cached_info()
                    .state
                    .last_sequence;
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: last + 1,
                }
            }
        };
        let config = self.device_consumer(name.clone(), filters, start);
        stream
            .create_consumer(config)
            .await
            .map_err(|e| BusError::Unavailable(format!("consumer {name}: {e}")))?;
        Ok(())
    }

    /// Brings a device consumer made from an older template (one whose
    /// fixed settings, such as the ack policy, differ) to the current one:
    /// recreated with the same filters, starting right after its ack floor,
    /// so the device's position is kept. Returns the consumer as it now is.
    async fn migrate(
        &self,
        stream: &stream::Stream<()>,
        info: consumer::Info,
    ) -> Result<consumer::Info, BusError> {
        let template = &self.defs.device_consumer;
        if info.config.ack_policy == template.ack_policy {
            return Ok(info);
        }
        let name = info.name.clone();
        let start = info.ack_floor.stream_sequence + 1;
        tracing::info!(consumer = %name, start, "recreating device consumer with the current template");
        let filters = if info.config.filter_subjects.is_empty() {
            vec![info.config.filter_subject.clone()]
        } else {
            info.config.filter_subjects.clone()
        };
        stream
            .delete_consumer(&name)
            .await
            .map_err(|e| BusError::Unavailable(format!("consumer {name}: {e}")))?;
        let config = self.device_consumer(
            name.clone(),
            filters,
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
        );
        let created = stream
            .create_consumer(config)
            .await
            .map_err(|e| BusError::Unavailable(format!("consumer {name}: {e}")))?;
        Ok(created.cached_info().clone())
    }

    /// The filters of `device`'s group consumer, or none if it has none.
    pub async fn group_filters(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Vec<String>, BusError> {
        let stream = self.stream(&self.defs.groups_stream.name).await?;
        match stream
            .consumer_info(group_consumer_name(user, device))
            .await
        {
            Ok(info) => {
                let c = info.config;
                let mut filters = if c.filter_subjects.is_empty() && !c.filter_subject.is_empty() {
                    vec![c.filter_subject]
                } else {
                    c.filter_subjects
                };
                filters.retain(|f| f != NO_GROUP_SUBJECT);
                Ok(filters)
            }
            Err(e) if e.to_string().contains("not found") => Ok(Vec::new()),
            Err(e) => Err(BusError::nats(e)),
        }
    }

    /// Rewinds a consumer to its ack floor: whatever was delivered and not
    /// acknowledged (a previous connection's share) comes again, in stream
    /// order, instead of after the ack timeout and out of order.
    pub async fn reset(&self, stream: &str, name: &str) -> Result<(), BusError> {
        self.stream(stream)
            .await?
            .reset_consumer(name, None)
            .await
            .map_err(BusError::nats)?;
        Ok(())
    }

    /// Binds to an existing durable consumer on `stream` for delivery.
    pub async fn bind(
        &self,
        stream: &str,
        name: &str,
    ) -> Result<consumer::Consumer<consumer::pull::Config>, BusError> {
        self.stream(stream)
            .await?
            .get_consumer(name)
            .await
            .map_err(BusError::nats)
    }
}
