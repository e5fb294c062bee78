//! Behind the stream: the `persist` consumer that every worker shares to
//! write the group messages into MongoDB in batches, and the core-NATS
//! notices with which workers tell each other that a group's membership
//! changed (so that their membership caches stay current).

use async_nats::jetstream::{self, AckKind, consumer::pull, stream::RawMessageErrorKind};
use chat_domain::GroupId;
use futures::{StreamExt, stream::ReadyChunks};

use crate::{Bus, BusError, Envelope};

/// Where a worker announces that a group's membership changed.
pub fn members_subject(group: &GroupId) -> String {
    format!("chat.ctl.members.{group}")
}

/// Every group's membership notices.
const MEMBERS_SUBJECTS: &str = "chat.ctl.members.*";

/// The group a membership notice is about.
pub fn group_of_members_subject(subject: &str) -> Option<GroupId> {
    let id = subject.strip_prefix("chat.ctl.members.")?;
    GroupId::parse(id).ok()
}

/// A group message as the persist consumer delivered it.
#[derive(Debug)]
pub struct Persisted {
    pub envelope: Envelope,
    pub stream_seq: u64,
    /// When JetStream stored it (the send's acknowledgement), ms since the
    /// epoch by nats-server's clock.
    pub stored_at_ms: i64,
}

/// One delivery of the persist consumer.
#[derive(Debug)]
pub struct Delivered(jetstream::Message);

impl Delivered {
    /// What was delivered.
    pub fn read(&self) -> Result<Persisted, BusError> {
        read_persisted(&self.0)
    }

    /// Stored: done with it.
    pub async fn ack(&self) -> Result<(), BusError> {
        self.0.ack().await.map_err(BusError::nats)
    }

    /// Still being stored: not for another worker yet.
    pub async fn in_progress(&self) -> Result<(), BusError> {
        self.0
            .ack_with(AckKind::Progress)
            .await
            .map_err(BusError::nats)
    }

    /// Never storable (not a message envelope): never deliver it again.
    pub async fn reject(&self) -> Result<(), BusError> {
        self.0.ack_with(AckKind::Term).await.map_err(BusError::nats)
    }
}

/// The persist consumer's deliveries, in batches of what has arrived.
pub struct PersistFeed(ReadyChunks<pull::Stream>);

impl PersistFeed {
    /// The next batch (at least one delivery), and the error that ended the
    /// feed after it, if one did; `None` once the feed has ended.
    pub async fn next(&mut self) -> Option<(Vec<Delivered>, Option<BusError>)> {
        let chunk = self.0.next().await?;
        let mut failed = None;
        let mut batch = Vec::with_capacity(chunk.len());
        for m in chunk {
            match m {
                Ok(m) => batch.push(Delivered(m)),
                Err(e) => failed = Some(BusError::nats(e)),
            }
        }
        Some((batch, failed))
    }
}

/// Reads a delivery of the persist consumer.
fn read_persisted(msg: &jetstream::Message) -> Result<Persisted, BusError> {
    let info = msg.info().map_err(BusError::nats)?;
    let stream_seq = info.stream_sequence;
    let stored_at_ms = (info.published.unix_timestamp_nanos() / 1_000_000) as i64;
    let envelope = serde_json::from_slice(&msg.payload)
        .map_err(|e| BusError::Unavailable(format!("message {stream_seq} is no envelope: {e}")))?;
    Ok(Persisted {
        envelope,
        stream_seq,
        stored_at_ms,
    })
}

impl Bus {
    /// The shared persist consumer's deliveries, at most `batch` at a time
    /// (the consumer is created, or updated, as `nats/` defines it; workers
    /// only).
    pub async fn persist_feed(&self, batch: usize) -> Result<PersistFeed, BusError> {
        let config = self.defs.persist_consumer.clone();
        let consumer = self
            .js
            .get_stream_no_info(&self.defs.groups_stream.name)
            .await
            .map_err(BusError::nats)?
            // created, or updated to what `nats/` says now
            .create_consumer(config)
            .await
            .map_err(BusError::nats)?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(batch)
            .messages()
            .await
            .map_err(BusError::nats)?;
        Ok(PersistFeed(messages.ready_chunks(batch)))
    }

    /// The shared persist consumer's name (`nats/consumers/persist.json`).
    fn persist_name(&self) -> String {
        self.defs
            .persist_consumer
            .durable_name
            .clone()
            .unwrap_or_default()
    }

    /// The stream sequence up to which every group message has been
    /// written into MongoDB (or found unstorable): the persist consumer's
    /// acknowledgement floor. One JetStream API call.
    pub async fn persisted_through(&self) -> Result<u64, BusError> {
        let name = self.persist_name();
        let info = self
            .js
            .get_stream_no_info(&self.defs.groups_stream.name)
            .await
            .map_err(BusError::nats)?
            .consumer_info(&name)
            .await
            .map_err(BusError::nats)?;
        Ok(info.ack_floor.stream_sequence)
    }

    /// How much of the group stream's room the messages not yet in MongoDB
    /// take, and since when: three JetStream API calls (the stream's state
    /// and limits, the persist consumer's acknowledgement floor, the first
    /// group message past it). Their bytes are an estimate at the stream's
    /// mean message size.
    pub async fn persist_backlog(&self) -> Result<Backlog, BusError> {
        let stream = self
            .js
            .get_stream(&self.defs.groups_stream.name)
            .await
            .map_err(BusError::nats)?;
        let info = stream.cached_info().clone();
        let floor = stream
            .consumer_info(self.persist_name())
            .await
            .map_err(BusError::nats)?
            .ack_floor
            .stream_sequence;
        let state = &info.state;
        // everything past the floor (membership events among them: an
        // estimate on the safe side), at the stream's mean message size
        let behind = state
            .last_sequence
            .saturating_sub(floor.max(state.first_sequence.saturating_sub(1)))
            .min(state.messages);
        let bytes = if state.messages == 0 {
            0
        } else {
            (state.bytes as u128 * behind as u128 / state.messages as u128) as u64
        };
        // the oldest group message past the floor (the persist consumer's
        // subjects only: membership events and erased messages are not
        // waited for); not known if that read fails, while the counts above
        // still are
        let waiting = if behind == 0 {
            Waiting::Nothing
        } else {
            let filter = self.defs.persist_consumer.filter_subject.clone();
            match stream
                .raw_message_builder()
                .sequence(floor.saturating_add(1))
                .next_by_subject(filter)
                .send()
                .await
            {
                Ok(m) => Waiting::Since(
                    i64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0),
                ),
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Waiting::Nothing,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the oldest message not yet in MongoDB");
                    Waiting::Unknown
                }
            }
        };
        let limit = |v: i64| u64::try_from(v).ok().filter(|&v| v > 0);
        Ok(Backlog {
            messages: behind,
            bytes,
            max_messages: limit(info.config.max_messages),
            max_bytes: limit(info.config.max_bytes),
            waiting,
        })
    }

    /// Makes the persist consumer deliver again from stream sequence `from`
    /// (`None`: the oldest message the stream holds), so that MongoDB gets
    /// every message from there once more: after MongoDB was restored from a
    /// backup older than the stream's (writes are idempotent by message id,
    /// so what it has already is left as it is). Returns where it starts.
    pub async fn reproject(&self, from: Option<u64>) -> Result<u64, BusError> {
        let name = self.persist_name();
        let mut stream = self
            .js
            .get_stream(&self.defs.groups_stream.name)
            .await
            .map_err(BusError::nats)?;
        let first = stream
            .info()
            .await
            .map_err(BusError::nats)?
            .state
            .first_sequence;
        let from = from.unwrap_or(first).max(first).max(1);
        stream
            .reset_consumer(&name, Some(from))
            .await
            .map_err(BusError::nats)?;
        Ok(from)
    }

    /// Tells every worker that `group`'s membership changed (core NATS: a
    /// lost notice is covered by the caches' expiry and by the reset that
    /// follows every reconnect, see [`Bus::generation`]).
    pub async fn announce_members_changed(&self, group: &GroupId) -> Result<(), BusError> {
        self.client
            .publish(members_subject(group), bytes::Bytes::new())
            .await
            .map_err(BusError::nats)?;
        self.client.flush().await.map_err(BusError::nats)
    }

    /// Every membership notice, from every worker.
    pub async fn member_changes(&self) -> Result<async_nats::Subscriber, BusError> {
        self.client
            .subscribe(MEMBERS_SUBJECTS)
            .await
            .map_err(BusError::nats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backlog_is_full_at_nine_tenths_of_either_limit() {
        let b = Backlog {
            messages: 80,
            bytes: 800,
            max_messages: Some(100),
            max_bytes: Some(1_000),
            ..Backlog::default()
        };
        assert!(!b.full_with(0, 0));
        assert!(b.full_with(10, 0) && b.full_with(0, 100));
        assert!(!b.full_with(9, 99));
        assert!((b.ratio() - 0.8).abs() < 1e-9);
        let unlimited = Backlog {
            messages: u64::MAX / 2,
            bytes: u64::MAX / 2,
            ..Backlog::default()
        };
        assert!(!unlimited.full_with(1, 1));
    }

    #[test]
    fn membership_subjects_carry_their_group() {
        let g = GroupId::parse("g_1-x").expect("group");
        assert_eq!(group_of_members_subject(&members_subject(&g)), Some(g));
        assert_eq!(group_of_members_subject("chat.ctl.members.a.b"), None);
        assert_eq!(group_of_members_subject("chat.group.g.msg"), None);
    }
}

/// The group stream's messages not yet written into MongoDB, against the
/// stream's limits: past a limit nats-server discards the oldest messages,
/// and an unpersisted one discarded would be lost. Workers refuse new
/// messages before that (`Backlog::full`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub messages: u64,
    pub bytes: u64,
    pub max_messages: Option<u64>,
    pub max_bytes: Option<u64>,
    /// Since when group messages wait for MongoDB.
    pub waiting: Waiting,
}

/// Since when the group messages not yet in MongoDB wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Waiting {
    /// None waits: every one the stream took before the read is in MongoDB.
    #[default]
    Nothing,
    /// The oldest was taken then (ms since the epoch, nats-server's clock).
    Since(i64),
    /// The read of the oldest failed.
    Unknown,
}

impl Backlog {
    /// The share of a limit past which new messages are refused: the rest
    /// is room for what other workers publish before they see it too.
    pub const FULL_AT: f64 = 0.9;

    /// The share of the nearer limit the backlog takes (0 with none).
    pub fn ratio(&self) -> f64 {
        let of = |n: u64, max: Option<u64>| max.map_or(0.0, |max| n as f64 / max as f64);
        of(self.messages, self.max_messages).max(of(self.bytes, self.max_bytes))
    }

    /// Whether `messages` and `bytes` more would take the backlog past
    /// [`Backlog::FULL_AT`] of a limit.
    pub fn full_with(&self, messages: u64, bytes: u64) -> bool {
        let past = |n: u64, max: Option<u64>| {
            max.is_some_and(|max| n as f64 >= max as f64 * Self::FULL_AT)
        };
        past(self.messages + messages, self.max_messages)
            || past(self.bytes + bytes, self.max_bytes)
    }
}
