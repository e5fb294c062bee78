//! Room in the message log: the group stream is the write-ahead log, and
//! MongoDB is written behind it (`persist.rs`). Past its limits nats-server
//! discards the oldest messages, so a persistence held up long enough (a
//! MongoDB outage under heavy traffic, or a flood) would see acknowledged
//! messages discarded before they reached MongoDB: lost. A worker refuses
//! new messages (`unavailable`, nothing stored) once the messages not yet
//! in MongoDB would take [`chat_bus::Backlog::FULL_AT`] of a stream limit,
//! and takes them again as persistence catches up.
//!
//! What the server says is read every [`EVERY`]; between two reads the
//! worker adds what it published itself, so one worker never runs past the
//! mark however fast it is sent to. Other workers' publishes count from
//! their next read: the 10 % left is their room.

use std::sync::{
    Mutex,
    atomic::{AtomicI64, AtomicU64, Ordering},
};

use chat_bus::{Backlog, Waiting};

use crate::{State, WorkerError, messages::unavailable};

/// How often the stream's backlog is read.
pub(crate) const EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What a message costs in the stream beyond its text: subject, headers,
/// the envelope's fields (an estimate on the large side).
const OVERHEAD_BYTES: u64 = 512;

/// The stream's backlog as last read, and what this worker published since.
#[derive(Debug, Default)]
pub(crate) struct LogRoom {
    read: Mutex<Backlog>,
    messages: AtomicU64,
    bytes: AtomicU64,
    /// The mean cost of the messages this worker published lately: the
    /// backlog's bytes are counted at it when it is above the stream's
    /// mean (a flood of large messages behind a long history of small
    /// ones would be counted far too small at the stream's).
    recent_mean: AtomicU64,
    /// Every group message the stream took before this (ms since the
    /// epoch) is in MongoDB, as last read; 0: not read yet.
    persisted_until: AtomicI64,
}

/// Weight of the newest message in [`LogRoom::recent_mean`]: 1 / this.
const MEAN_OVER: u64 = 64;

impl LogRoom {
    /// What a message of `text_bytes` takes in the stream, about: sealed
    /// and base64-encoded.
    pub(crate) fn cost(text_bytes: usize) -> u64 {
        Self::cost_sealed((text_bytes as u64).div_ceil(3) * 4)
    }

    /// What a message whose sealed content is `sealed_bytes` (as stored)
    /// takes in the stream, about.
    pub(crate) fn cost_sealed(sealed_bytes: u64) -> u64 {
        sealed_bytes + OVERHEAD_BYTES
    }

    /// Fails if one more message of `bytes` would take the backlog past
    /// the mark.
    pub(crate) fn check(&self, bytes: u64) -> Result<(), WorkerError> {
        let read = *self.read.lock().unwrap_or_else(|e| e.into_inner());
        let messages = self.messages.load(Ordering::Relaxed) + 1;
        let bytes = self.bytes.load(Ordering::Relaxed) + bytes;
        if read.full_with(messages, bytes) {
            metrics::counter!("chat_sends_refused_log_full_total").increment(1);
            return Err(unavailable(
                "the message log is full until persistence catches up",
            ));
        }
        Ok(())
    }

    /// One message of `bytes` went into the stream.
    pub(crate) fn published(&self, bytes: u64) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        // racing updates lose one another's share, which a mean can spare
        let mean = self.recent_mean.load(Ordering::Relaxed);
        let next = if mean == 0 {
            bytes
        } else {
            (mean * (MEAN_OVER - 1) + bytes) / MEAN_OVER
        };
        self.recent_mean.store(next, Ordering::Relaxed);
    }

    /// Every group message the stream took before the time returned (ms
    /// since the epoch) is in MongoDB, as of the last read (at most
    /// [`EVERY`] old, and never ahead of the truth); `None` before the
    /// first read.
    pub(crate) fn persisted_until(&self) -> Option<i64> {
        Some(self.persisted_until.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    /// The server's figures as read from `read_at` on (ms since the
    /// epoch), which include what was published before; returns whether
    /// the backlog was full, and the backlog as counted.
    fn refresh(&self, mut backlog: Backlog, read_at: i64) -> (bool, Backlog) {
        match backlog.waiting {
            // nothing waiting when read: everything taken before it began
            Waiting::Nothing => self.persisted_until.store(read_at, Ordering::Relaxed),
            Waiting::Since(at) => self.persisted_until.store(at, Ordering::Relaxed),
            // what was known stays true: persistence only moves on
            Waiting::Unknown => {}
        }
        let recent = backlog
            .messages
            .saturating_mul(self.recent_mean.load(Ordering::Relaxed));
        backlog.bytes = backlog.bytes.max(recent);
        let mut read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        let was_full = read.full_with(0, 0);
        *read = backlog;
        self.messages.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        (was_full, backlog)
    }
}

/// Reads the stream's backlog every [`EVERY`], forever.
pub(crate) async fn watch(state: std::sync::Arc<State>) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let read_at = chat_domain::now_millis();
        let backlog = match state.bus.persist_backlog().await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the message log's backlog");
                continue;
            }
        };
        let (was_full, backlog) = state.log_room.refresh(backlog, read_at);
        metrics::gauge!("chat_persist_backlog_messages").set(backlog.messages as f64);
        metrics::gauge!("chat_persist_backlog_bytes").set(backlog.bytes as f64);
        metrics::gauge!("chat_persist_backlog_ratio").set(backlog.ratio());
        match (was_full, backlog.full_with(0, 0)) {
            (false, true) => tracing::error!(
                ?backlog,
                "the message log is nearly full of messages not yet in MongoDB: new messages are refused until persistence catches up"
            ),
            (true, false) => tracing::warn!(
                ?backlog,
                "persistence caught up: new messages are taken again"
            ),
            _ => {}
        }
    }
}

/// How often the buckets' sizes are read.
const BUCKETS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads what each key-value bucket holds every [`BUCKETS_EVERY`], forever,
/// into `chat_bucket_keys{bucket}` and `chat_bucket_bytes{bucket}`:
/// nats-server holds every key in memory on every node, and the send log's
/// keys are bounded only by the idempotency window for clients whose ids
/// do not say when they were minted (OPERATIONS.md).
pub(crate) async fn watch_buckets(bus: chat_bus::Bus) {
    const BUCKETS: [&str; 3] = [
        chat_bus::SENDS_BUCKET,
        chat_bus::PLACES_BUCKET,
        chat_bus::PRESENCE_BUCKET,
    ];
    let mut tick = tokio::time::interval(BUCKETS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        for bucket in BUCKETS {
            match bus.bucket_size(bucket).await {
                Ok(size) => {
                    metrics::gauge!("chat_bucket_keys", "bucket" => bucket).set(size.keys as f64);
                    metrics::gauge!("chat_bucket_bytes", "bucket" => bucket).set(size.bytes as f64);
                }
                Err(e) => tracing::debug!(bucket, error = %e, "cannot read the bucket's size"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_refuses_past_the_mark_counting_its_own_publishes_between_reads() {
        let room = LogRoom::default();
        // no limit known yet: nothing refused
        assert!(room.check(1 << 30).is_ok());
        room.refresh(
            Backlog {
                messages: 0,
                bytes: 0,
                max_messages: None,
                max_bytes: Some(10_000),
                ..Backlog::default()
            },
            0,
        );
        for _ in 0..8 {
            room.check(1_000).expect("room left");
            room.published(1_000);
        }
        // 9,000 of 10,000 is the mark
        assert!(room.check(1_000).is_err());
        // the next read says persistence caught up
        room.refresh(
            Backlog {
                messages: 0,
                bytes: 500,
                max_messages: None,
                max_bytes: Some(10_000),
                ..Backlog::default()
            },
            0,
        );
        assert!(room.check(1_000).is_ok());
        // large messages lately, behind a stream of small ones: the
        // backlog counts at their size, not the stream's mean
        let room = LogRoom::default();
        for _ in 0..10 {
            room.published(2_000);
        }
        let (_, counted) = room.refresh(
            Backlog {
                messages: 5,
                bytes: 500,
                max_messages: None,
                max_bytes: Some(10_000),
                ..Backlog::default()
            },
            0,
        );
        assert_eq!(counted.bytes, 10_000);
        assert!(room.check(1).is_err());
        // a message limit counts too
        room.refresh(
            Backlog {
                messages: 89,
                bytes: 0,
                max_messages: Some(100),
                max_bytes: None,
                ..Backlog::default()
            },
            0,
        );
        assert!(room.check(1).is_err());
        assert_eq!(LogRoom::cost(3), 4 + OVERHEAD_BYTES);
    }

    #[test]
    fn persistence_is_known_up_to_the_oldest_message_waiting_or_the_read() {
        let room = LogRoom::default();
        assert_eq!(room.persisted_until(), None, "not read yet");
        room.refresh(
            Backlog {
                messages: 3,
                waiting: Waiting::Since(1_000),
                ..Backlog::default()
            },
            5_000,
        );
        assert_eq!(room.persisted_until(), Some(1_000));
        room.refresh(Backlog::default(), 6_000);
        assert_eq!(room.persisted_until(), Some(6_000), "nothing waiting");
        let unknown = Backlog {
            waiting: Waiting::Unknown,
            ..Backlog::default()
        };
        room.refresh(unknown, 7_000);
        assert_eq!(room.persisted_until(), Some(6_000), "what was known");
    }

    /// The oldest message waiting is the persist consumer's to take: a
    /// membership event past the floor is not waited for (else a stream
    /// ending in one would look behind for good), a group message is.
    #[tokio::test]
    async fn only_group_messages_are_waited_for() {
        let nats = chat_stack::Nats::start().await.expect("nats-server");
        let bus = crate::test_bus(&nats).await;
        drop(bus.persist_feed(1).await.expect("the persist consumer"));
        let group = chat_domain::GroupId::parse("g1").expect("group");
        let alice = chat_domain::UserId::parse("alice").expect("user");
        bus.publish_membership(&group, &alice, true)
            .await
            .expect("membership event");
        let backlog = bus.persist_backlog().await.expect("backlog");
        assert!(backlog.messages >= 1, "{backlog:?}");
        assert_eq!(backlog.waiting, Waiting::Nothing);

        let before = chat_domain::now_millis();
        let envelope = chat_bus::Envelope {
            message_id: "m1".into(),
            group_id: group.to_string(),
            seq: 1,
            sender_id: alice.to_string(),
            client_msg_id: "c1".into(),
            kind: "text".into(),
            created_at: before,
            key_id: "k".into(),
            nonce: String::new(),
            ciphertext: String::new(),
            binding: chat_crypto::BINDING_V2,
            mentions: Vec::new(),
            change: None,
            changed_by: String::new(),
            joined_only: false,
        };
        bus.publish_group_message(&envelope, 0)
            .await
            .expect("group message");
        let backlog = bus.persist_backlog().await.expect("backlog");
        let Waiting::Since(at) = backlog.waiting else {
            panic!("the group message is not waited for: {backlog:?}");
        };
        let after = chat_domain::now_millis();
        // nats-server's clock, here the same machine's
        assert!(
            before - 1_000 <= at && at <= after + 1_000,
            "{before} {at} {after}"
        );
    }
}
