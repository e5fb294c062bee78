//! The send log: one JetStream key-value entry per send, kept for the
//! idempotency window (24 hours by default), so that a retry with the same
//! `clientMsgId` finds its first attempt without a database read on the
//! normal path, across edges, workers and restarts.
//!
//! Why not the stream's own de-duplication: its window is held in
//! nats-server's memory for every message of the stream and is two minutes
//! here; a key per send in a bucket of its own costs a small file-backed
//! entry instead, and ages out with the bucket's `max_age`.
//!
//! A key is `<group>.<sender>.<clientMsgId>`: ids never contain `.`, so no two
//! sends share one.

use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use chat_domain::{ClientMsgId, GroupId, UserId};
use serde::{Deserialize, Serialize};

use crate::{
    Bus, BusError,
    bucket::{Bucket, Entry},
};

/// The bucket's name (its stream is `KV_CHAT_SENDS`).
pub const SENDS_BUCKET: &str = "CHAT_SENDS";

/// What the log keeps of a send: enough to find where it landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SendRecord {
    /// The id the message is (or will be) published under.
    pub message_id: String,
    /// The group's newest stream sequence before the first attempt: the
    /// message cannot have landed at or before it.
    pub after_stream_seq: u64,
    /// When the first attempt started (ms since the epoch).
    pub at: i64,
}

/// The outcome of [`SendLog::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// No earlier send with this client id: this one goes ahead, its
    /// entry at `revision`.
    New { revision: u64 },
    /// An earlier attempt of this send, as recorded, its entry at
    /// `revision`.
    Earlier { record: SendRecord, revision: u64 },
}

/// The key of one send.
pub fn send_key(group: &GroupId, sender: &UserId, client: &ClientMsgId) -> String {
    format!("{group}.{sender}.{client}")
}

/// Handle on the bucket; cheap to clone.
#[derive(Debug, Clone)]
pub struct SendLog(Bucket);

impl Bus {
    /// Creates the send log, or updates it to keep entries for `window`
    /// (workers only, at start-up, like the streams).
    pub async fn send_log(&self, window: Duration) -> Result<SendLog, BusError> {
        let config = kv::Config {
            bucket: SENDS_BUCKET.into(),
            description: "One entry per send for the idempotency window: <group>.<sender>.<clientMsgId> -> message id".into(),
            history: 1,
            max_age: window,
            max_value_size: 1024,
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: self.defs.groups_stream.num_replicas,
            ..Default::default()
        };
        self.declare_bucket(SENDS_BUCKET, config).await.map(SendLog)
    }
}

impl SendLog {
    /// Records a send unless one with the same key exists: one JetStream
    /// write on the normal path, plus a read when the key is taken.
    pub async fn claim(&self, key: &str, record: &SendRecord) -> Result<Claimed, BusError> {
        let value = Bytes::from(serde_json::to_vec(record).map_err(BusError::nats)?);
        // at most: created, taken (read it), deleted (create over the marker)
        let mut expected = 0;
        for _ in 0..3 {
            if let Some(revision) = self.0.put_if_last(key, value.clone(), expected).await? {
                return Ok(Claimed::New { revision });
            }
            match self.0.last(key).await? {
                Some(Entry {
                    value: Some(earlier),
                    revision,
                }) => {
                    let record = serde_json::from_slice(&earlier).map_err(|e| {
                        BusError::Unavailable(format!("send log entry {key} is unreadable: {e}"))
                    })?;
                    return Ok(Claimed::Earlier { record, revision });
                }
                // a delete marker (a send that never went out): take its place
                Some(Entry { revision, .. }) => expected = revision,
                // gone between the two calls (aged out): create it again
                None => expected = 0,
            }
        }
        Err(BusError::Unavailable(format!(
            "send log entry {key} keeps changing"
        )))
    }

    /// Writes `record` again under `key` if its entry is still at
    /// `revision`: its new revision, or `None` if another attempt changed
    /// it. A send that publishes a lost attempt again renews its entry
    /// first, so that a late give-back of that attempt (which expects the
    /// old revision) cannot take it out.
    pub async fn renew(
        &self,
        key: &str,
        record: &SendRecord,
        revision: u64,
    ) -> Result<Option<u64>, BusError> {
        let value = Bytes::from(serde_json::to_vec(record).map_err(BusError::nats)?);
        self.0.put_if_last(key, value, revision).await
    }

    /// Forgets a send that certainly never went out, so that a retry with
    /// the same client id starts afresh (a delete marker, as the key-value
    /// client writes), if its entry is still the one made at `revision`
    /// (whether it was): an entry made since belongs to another attempt.
    pub async fn release(&self, key: &str, revision: u64) -> Result<bool, BusError> {
        self.0.delete_if_last(key, revision).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_keys_are_injective_since_ids_have_no_dots() {
        let k = |g: &str, u: &str, c: &str| -> String {
            send_key(
                &GroupId::parse(g).expect("group"),
                &UserId::parse(u).expect("user"),
                &ClientMsgId::parse(c).expect("client id"),
            )
        };
        assert_eq!(k("g", "a_b", "c"), "g.a_b.c");
        assert_ne!(k("g", "a_b", "c"), k("g", "a", "b_c"));
        assert_ne!(k("g_a", "b", "c"), k("g", "a_b", "c"));
        // a key splits back into its three ids
        let key = k("g-1", "u_2", "c-3_x");
        let parts: Vec<&str> = key.split('.').collect();
        assert_eq!(parts, ["g-1", "u_2", "c-3_x"]);
        assert!(GroupId::parse("a.b").is_err(), "ids never contain a dot");
    }
}
