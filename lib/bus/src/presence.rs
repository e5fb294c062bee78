//! Presence: which users have a connection open on some edge, and when
//! each was last seen, in the `CHAT_PRESENCE` bucket; changes announced on
//! `chat.presence.<user>` (core NATS) to every edge.
//!
//! Keys (ids never contain `.`, so they are injective):
//! - `u.<user>` → [`Record`]: the edges the user has connections on, when
//!   the last one closed, and the groups whose members see the user;
//! - `at.<edge>.<user>`: an index of the users an edge has, so that the
//!   users of an edge that died can be found;
//! - `e.<edge>` → [`Beat`]: the edge's heartbeat, written every
//!   [`BEAT_EVERY`].
//!
//! An edge writes only on a user's first connection and last disconnection
//! on it (and when the user's groups change): nothing per message and
//! nothing per user while connected. The workers sweep edges whose
//! heartbeat is older than [`DEAD_AFTER`]: they take the edge out of its
//! users' records, and a user left with no edge goes offline then (last
//! seen: the dead edge's last heartbeat). Every change of the record is a
//! compare-and-set, so edges and sweepers never lose each other's writes,
//! and only the write that turned a user on- or offline announces it.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use bytes::Bytes;
use chat_domain::{Millis, UserId};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{Bus, BusError, bucket::Bucket};

/// The bucket's name.
pub const PRESENCE_BUCKET: &str = "CHAT_PRESENCE";
/// Every user's presence changes.
pub const PRESENCE_CHANGES: &str = "chat.presence.*";
/// How often an edge writes its heartbeat.
pub const BEAT_EVERY: Duration = Duration::from_secs(5);
/// An edge whose heartbeat is older than this is dead: its users are taken
/// out of presence (so a crashed edge's users go offline within about
/// `DEAD_AFTER` + one sweep, [`BEAT_EVERY`]).
pub const DEAD_AFTER: Duration = Duration::from_secs(15);
/// Most groups a record names (a user in more groups is shown to the
/// members of the first ones only).
pub const RECORD_GROUPS_MAX: usize = 10_000;
/// Compare-and-set attempts on one record.
const CAS_ATTEMPTS: usize = 32;
/// How long a delete marker of the bucket lives: nothing reads one as
/// anything but a missing key.
pub const MARKER_TTL: Duration = Duration::from_secs(15);

/// A user's presence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// Edges with at least one connection of the user.
    #[serde(default)]
    pub edges: Vec<String>,
    /// When the user's last connection closed (ms since the epoch); 0:
    /// never seen offline.
    #[serde(default)]
    pub last_seen: Millis,
    /// The groups the user follows, whose members see the user's presence.
    #[serde(default)]
    pub groups: Vec<String>,
}

impl Record {
    /// Whether the user has a connection somewhere.
    pub fn online(&self) -> bool {
        !self.edges.is_empty()
    }
}

/// What a sweeper has seen of each edge's heartbeat: its revision, and
/// since when (by the sweeper's own clock) it has stood still.
#[derive(Debug, Default)]
pub struct Beats(std::collections::HashMap<String, (u64, std::time::Instant)>);

/// An edge's heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    pub at: Millis,
}

/// A presence change, as announced to every edge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    pub user_id: String,
    pub online: bool,
    #[serde(default)]
    pub last_seen: Millis,
    /// Whose members are told.
    pub groups: Vec<String>,
    /// The record's revision: changes of one user that cross on the way
    /// are put back in order by it.
    pub rev: u64,
}

/// What a user's record becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The user has a connection on `edge` now, following `groups`.
    Connected { edge: String, groups: Vec<String> },
    /// The user's groups changed (still connected on `edge`).
    Groups { edge: String, groups: Vec<String> },
    /// The user's last connection on `edge` closed at `at`.
    Disconnected { edge: String, at: Millis },
}

impl Update {
    /// `record` after this update; `None` if it changes nothing.
    pub fn apply(&self, record: &Record) -> Option<Record> {
        let mut next = record.clone();
        match self {
            Update::Connected { edge, groups } | Update::Groups { edge, groups } => {
                if !next.edges.contains(edge) {
                    next.edges.push(edge.clone());
                    next.edges.sort();
                }
                next.groups = groups.iter().take(RECORD_GROUPS_MAX).cloned().collect();
            }
            Update::Disconnected { edge, at } => {
                next.edges.retain(|e| e != edge);
                if next.edges.is_empty() && record.online() {
                    next.last_seen = next.last_seen.max(*at);
                }
            }
        }
        (next != *record).then_some(next)
    }
}

/// Handle on the bucket; cheap to clone.
#[derive(Debug, Clone)]
pub struct Presence {
    bucket: Bucket,
    client: async_nats::Client,
    js: jetstream::Context,
    /// How long a record written offline lives.
    forget_after: Duration,
}

fn user_key(user: &UserId) -> String {
    format!("u.{user}")
}

fn index_key(edge: &str, user: &UserId) -> String {
    format!("at.{edge}.{user}")
}

fn beat_key(edge: &str) -> String {
    format!("e.{edge}")
}

/// The subject of `user`'s presence changes.
pub fn presence_subject(user: &str) -> String {
    format!("chat.presence.{user}")
}

impl Bus {
    /// Creates the presence bucket, or updates it (workers, at start-up).
    pub async fn declare_presence(&self) -> Result<Presence, BusError> {
        let config = kv::Config {
            bucket: PRESENCE_BUCKET.into(),
            description: "Presence: u.<user> -> edges, last seen, groups; at.<edge>.<user>; e.<edge> -> heartbeat".into(),
            history: 1,
            max_value_size: 1 << 20,
            storage: jetstream::stream::StorageType::File,
            num_replicas: self.defs.groups_stream.num_replicas,
            ..Default::default()
        };
        self.declare_bucket_with_ttls(PRESENCE_BUCKET, config)
            .await?;
        Ok(self.presence())
    }

    /// The presence bucket as it is (edges).
    pub fn presence(&self) -> Presence {
        Presence {
            bucket: self.bind_bucket(PRESENCE_BUCKET),
            client: self.client.clone(),
            js: self.js.clone(),
            forget_after: self.defs.presence_forget_after,
        }
    }

    /// Every presence change, for an edge's lifetime.
    pub async fn presence_changes(&self) -> Result<async_nats::Subscriber, BusError> {
        self.client
            .subscribe(PRESENCE_CHANGES)
            .await
            .map_err(BusError::nats)
    }
}

impl Presence {
    /// `user`'s record (default: never seen).
    pub async fn get(&self, user: &UserId) -> Result<Record, BusError> {
        Ok(self
            .bucket
            .last(&user_key(user))
            .await?
            .and_then(|e| e.value)
            .map(|v| parse(&v))
            .transpose()?
            .unwrap_or_default())
    }

    /// Applies `update` to `user`'s record (compare-and-set, retried);
    /// announces the change if it turned the user on- or offline. Returns
    /// the record as written.
    pub async fn update(&self, user: &UserId, update: &Update) -> Result<Record, BusError> {
        let key = user_key(user);
        // indexed before the record names the edge, and unindexed after it
        // no longer does: a sweep always finds every user a dead edge has
        if let Update::Connected { edge, .. } = update {
            self.bucket
                .put(&index_key(edge, user), Bytes::new())
                .await?;
        }
        for _ in 0..CAS_ATTEMPTS {
            let (record, revision) = match self.bucket.last(&key).await? {
                Some(e) => (
                    e.value.map(|v| parse(&v)).transpose()?.unwrap_or_default(),
                    e.revision,
                ),
                None => (Record::default(), 0),
            };
            let Some(next) = update.apply(&record) else {
                // the record may no longer name the edge (a write of it
                // failed half-way, or the edge died between indexing the
                // user and writing the record): its index entry goes all
                // the same, or the edge's sweep would never end
                self.unindex(user, update).await?;
                return Ok(record);
            };
            let value = Bytes::from(serde_json::to_vec(&next).map_err(BusError::nats)?);
            // offline, it is forgotten in time; online, it lives
            let ttl = (!next.online()).then_some(self.forget_after);
            let Some(rev) = self
                .bucket
                .put_if_last_for(&key, value, revision, ttl)
                .await?
            else {
                continue;
            };
            self.unindex(user, update).await?;
            if record.online() != next.online() {
                self.announce(user, &next, &next.groups, rev).await?;
            } else if next.online() {
                // the members of groups followed since hear the user is on
                let joined: Vec<String> = next
                    .groups
                    .iter()
                    .filter(|g| !record.groups.contains(g))
                    .cloned()
                    .collect();
                if !joined.is_empty() {
                    self.announce(user, &next, &joined, rev).await?;
                }
            }
            return Ok(next);
        }
        Err(BusError::Unavailable(format!(
            "presence of {user} keeps changing"
        )))
    }

    /// After a disconnection from an edge: the edge's index no longer
    /// lists the user (indexed before the record names the edge, and
    /// unindexed after it no longer does).
    async fn unindex(&self, user: &UserId, update: &Update) -> Result<(), BusError> {
        if let Update::Disconnected { edge, .. } = update {
            self.bucket
                .delete_for(&index_key(edge, user), MARKER_TTL)
                .await?;
        }
        Ok(())
    }

    async fn announce(
        &self,
        user: &UserId,
        record: &Record,
        groups: &[String],
        rev: u64,
    ) -> Result<(), BusError> {
        let change = Change {
            user_id: user.to_string(),
            online: record.online(),
            last_seen: record.last_seen,
            groups: groups.to_vec(),
            rev,
        };
        let payload = Bytes::from(serde_json::to_vec(&change).map_err(BusError::nats)?);
        self.client
            .publish(presence_subject(user.as_str()), payload)
            .await
            .map_err(BusError::nats)
    }

    /// Writes `edge`'s heartbeat.
    /// Writes `edge`'s heartbeat; `true` if its previous one was swept
    /// meanwhile (the workers took the edge for dead: its users must be
    /// written again). `first`: the edge has not beaten before.
    pub async fn beat(&self, edge: &str, at: Millis, first: bool) -> Result<bool, BusError> {
        let key = beat_key(edge);
        let swept = !first
            && self
                .bucket
                .last(&key)
                .await?
                .and_then(|e| e.value)
                .is_none();
        let value = Bytes::from(serde_json::to_vec(&Beat { at }).map_err(BusError::nats)?);
        self.bucket.put(&key, value).await?;
        Ok(swept)
    }

    /// Takes out of presence the edges whose heartbeat `seen` has watched
    /// stand still for [`DEAD_AFTER`] (workers; every clock compared is
    /// the worker's own, so no skew between machines counts). Returns how
    /// many users went offline.
    pub async fn sweep(&self, seen: &mut Beats) -> Result<usize, BusError> {
        let mut offline = 0;
        let beats = self.entries("e.*").await?;
        seen.0.retain(|edge, _| {
            beats
                .iter()
                .any(|(k, ..)| k.strip_prefix("e.") == Some(edge.as_str()))
        });
        for (key, value, rev) in beats {
            let Some(edge) = key.strip_prefix("e.") else {
                continue;
            };
            let Ok(beat) = serde_json::from_slice::<Beat>(&value) else {
                continue;
            };
            let since = seen
                .0
                .entry(edge.to_owned())
                .or_insert((rev, std::time::Instant::now()));
            if since.0 != rev {
                *since = (rev, std::time::Instant::now());
            }
            if since.1.elapsed() < DEAD_AFTER {
                continue;
            }
            tracing::info!(
                edge,
                "edge stopped beating; taking its users out of presence"
            );
            for (key, _, _) in self.entries(&format!("at.{edge}.*")).await? {
                let Some(user) = key.rsplit('.').next().and_then(|u| UserId::parse(u).ok()) else {
                    continue;
                };
                let update = Update::Disconnected {
                    edge: edge.to_owned(),
                    at: beat.at,
                };
                if !self.update(&user, &update).await?.online() {
                    offline += 1;
                }
            }
            // forgotten only once none of its users is left: a sweep that
            // failed half-way is made again
            if self.entries(&format!("at.{edge}.*")).await?.is_empty() {
                self.bucket.delete_for(&beat_key(edge), MARKER_TTL).await?;
                seen.0.remove(edge);
            }
        }
        Ok(offline)
    }

    /// Every user online now, with its record's revision (what an
    /// announcement about it must pass to count).
    pub async fn online_users(&self) -> Result<Vec<(String, u64)>, BusError> {
        let mut out = Vec::new();
        for (key, value, rev) in self.entries("u.*").await? {
            let Some(user) = key.strip_prefix("u.") else {
                continue;
            };
            if parse(&value).is_ok_and(|r| r.online()) {
                out.push((user.to_owned(), rev));
            }
        }
        Ok(out)
    }

    /// The entries (not deleted) whose keys match `filter` (NATS
    /// wildcards), with their revisions.
    async fn entries(&self, filter: &str) -> Result<Vec<(String, Bytes, u64)>, BusError> {
        let prefix = format!("$KV.{PRESENCE_BUCKET}.");
        let stream = self
            .js
            .get_stream_no_info(format!("KV_{PRESENCE_BUCKET}"))
            .await
            .map_err(BusError::nats)?;
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: format!("{prefix}{filter}"),
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(10),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(BusError::nats)?;
        let mut pending = consumer.cached_info().num_pending;
        let mut out = Vec::new();
        while pending > 0 {
            let mut batch = consumer
                .fetch()
                .max_messages(pending.min(256) as usize)
                .expires(Duration::from_secs(2))
                .messages()
                .await
                .map_err(BusError::nats)?;
            let mut got = 0;
            while let Some(msg) = batch.next().await {
                let msg = msg.map_err(BusError::nats)?;
                got += 1;
                let (left, rev) = msg
                    .info()
                    .map(|i| (i.pending, i.stream_sequence))
                    .unwrap_or((0, 0));
                pending = left;
                let deleted = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation"))
                    .is_some();
                if let Some(key) = msg.subject.strip_prefix(prefix.as_str())
                    && !deleted
                {
                    out.push((key.to_owned(), msg.payload.clone(), rev));
                }
            }
            if got == 0 {
                // a short read is no listing: the caller would act on part
                return Err(BusError::Unavailable(format!(
                    "presence listing of {filter} stopped with {pending} left"
                )));
            }
        }
        Ok(out)
    }
}

fn parse(value: &[u8]) -> Result<Record, BusError> {
    serde_json::from_slice(value)
        .map_err(|e| BusError::Unavailable(format!("presence record is unreadable: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups(g: &[&str]) -> Vec<String> {
        g.iter().map(|g| g.to_string()).collect()
    }

    #[test]
    fn a_record_names_at_most_its_cap_of_groups() {
        let many: Vec<String> = (0..=RECORD_GROUPS_MAX).map(|i| format!("g{i}")).collect();
        let r = Update::Connected {
            edge: "e1".into(),
            groups: many.clone(),
        }
        .apply(&Record::default())
        .expect("changed");
        assert_eq!(r.groups.len(), RECORD_GROUPS_MAX);
        assert_eq!(r.groups[..], many[..RECORD_GROUPS_MAX]);
    }

    #[test]
    fn a_user_is_online_while_any_edge_has_a_connection() {
        let r = Record::default();
        let r = Update::Connected {
            edge: "e1".into(),
            groups: groups(&["g"]),
        }
        .apply(&r)
        .expect("changed");
        assert!(r.online());
        let r = Update::Connected {
            edge: "e2".into(),
            groups: groups(&["g"]),
        }
        .apply(&r)
        .expect("changed");
        assert_eq!(r.edges, ["e1", "e2"]);
        let r = Update::Disconnected {
            edge: "e1".into(),
            at: 10,
        }
        .apply(&r)
        .expect("changed");
        assert!(r.online(), "still on e2");
        assert_eq!(r.last_seen, 0);
        let r = Update::Disconnected {
            edge: "e2".into(),
            at: 20,
        }
        .apply(&r)
        .expect("changed");
        assert!(!r.online());
        assert_eq!(r.last_seen, 20);
        assert_eq!(r.groups, ["g"], "kept for the offline announcement");
    }

    #[test]
    fn repeated_updates_change_nothing() {
        let connected = Update::Connected {
            edge: "e1".into(),
            groups: groups(&["g"]),
        };
        let r = connected.apply(&Record::default()).expect("changed");
        assert_eq!(connected.apply(&r), None);
        let gone = Update::Disconnected {
            edge: "e1".into(),
            at: 5,
        };
        let off = gone.apply(&r).expect("changed");
        assert_eq!(gone.apply(&off), None, "a sweep after the edge's own write");
        // a late disconnection of an edge that is not there moves no time
        let late = Update::Disconnected {
            edge: "e9".into(),
            at: 50,
        };
        assert_eq!(late.apply(&off), None);
    }

    #[test]
    fn group_changes_keep_the_user_online() {
        let r = Update::Connected {
            edge: "e1".into(),
            groups: groups(&["a"]),
        }
        .apply(&Record::default())
        .expect("changed");
        let r = Update::Groups {
            edge: "e1".into(),
            groups: groups(&["a", "b"]),
        }
        .apply(&r)
        .expect("changed");
        assert!(r.online());
        assert_eq!(r.groups, ["a", "b"]);
    }

    #[test]
    fn keys_are_injective() {
        let u = UserId::parse("a_b").expect("id");
        assert_eq!(user_key(&u), "u.a_b");
        assert_eq!(index_key("e-1", &u), "at.e-1.a_b");
        assert_eq!(beat_key("e-1"), "e.e-1");
        assert_eq!(presence_subject("a_b"), "chat.presence.a_b");
    }
}
