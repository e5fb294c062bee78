//! The stream and consumer definitions in `nats/`, compiled into the binary so
//! that every node declares exactly the same thing.

use std::time::Duration;

use async_nats::jetstream::{consumer, stream};

use crate::BusError;

const USERS_STREAM: &str = include_str!("../../../nats/streams/chat_users.json");
const GROUPS_STREAM: &str = include_str!("../../../nats/streams/chat_groups.json");
const PUSH_STREAM: &str = include_str!("../../../nats/streams/chat_push.json");
const PERSIST_CONSUMER: &str = include_str!("../../../nats/consumers/persist.json");

/// Parsed definitions, with the operator's overrides applied.
#[derive(Debug, Clone)]
pub struct Definitions {
    pub users_stream: stream::Config,
    pub groups_stream: stream::Config,
    /// The push hook's events (`push.rs`).
    pub push_stream: stream::Config,
    /// The consumer every worker shares to write the group messages into
    /// MongoDB behind the stream.
    pub persist_consumer: consumer::pull::Config,
    /// How long the presence record of a user who went offline is kept
    /// (its last-seen time), [`PRESENCE_FORGET_AFTER`] unless the operator
    /// says otherwise: nats-server holds every key in memory.
    pub presence_forget_after: Duration,
}

/// How long an offline user's presence record is kept by default: 30 days.
pub const PRESENCE_FORGET_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

fn parse<T: serde::de::DeserializeOwned>(file: &'static str, text: &str) -> Result<T, BusError> {
    serde_json::from_str(text).map_err(|e| BusError::Definition {
        file,
        message: e.to_string(),
    })
}

impl Definitions {
    /// The definitions from `nats/`, with streams replicated `replicas` times.
    pub fn load(replicas: usize) -> Result<Self, BusError> {
        let mut users_stream: stream::Config = parse("nats/streams/chat_users.json", USERS_STREAM)?;
        let mut groups_stream: stream::Config =
            parse("nats/streams/chat_groups.json", GROUPS_STREAM)?;
        let mut push_stream: stream::Config = parse("nats/streams/chat_push.json", PUSH_STREAM)?;
        let persist_consumer = parse("nats/consumers/persist.json", PERSIST_CONSUMER)?;
        users_stream.num_replicas = replicas;
        groups_stream.num_replicas = replicas;
        push_stream.num_replicas = replicas;
        Ok(Self {
            users_stream,
            groups_stream,
            push_stream,
            persist_consumer,
            presence_forget_after: PRESENCE_FORGET_AFTER,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_parse_with_the_limits_we_rely_on() {
        let d = Definitions::load(3).expect("definitions parse");
        assert_eq!(d.users_stream.name, "CHAT_USERS");
        assert_eq!(d.users_stream.num_replicas, 3);
        // group commit publishes atomic batches
        assert!(d.groups_stream.allow_atomic_publish);
        // the default of 1,000 consumers per stream is too few for a
        // catch-up consumer per reconnecting device at once
        assert!(d.users_stream.max_consumers >= 100_000);
        assert!(d.groups_stream.max_consumers >= 100_000);
        assert_eq!(d.users_stream.duplicate_window.as_secs(), 120);
        // notifications are bounded per user; the stream-wide cap is the
        // workers' (`--nats-users-max-bytes`), discarding the oldest
        assert!(d.users_stream.max_messages_per_subject > 0);
        assert_eq!(d.users_stream.discard, stream::DiscardPolicy::Old);
        // a worker that does not set it (an older release) keeps this one
        assert_eq!(d.users_stream.max_bytes, 4 << 30);
        // several workers share the persist consumer: each acknowledges its
        // own messages, never everything below them
        assert_eq!(d.persist_consumer.ack_policy, consumer::AckPolicy::Explicit);
        assert_eq!(d.persist_consumer.durable_name.as_deref(), Some("persist"));
        assert_eq!(
            d.persist_consumer.filter_subject,
            crate::group_msg_subject_pattern()
        );
    }
}
