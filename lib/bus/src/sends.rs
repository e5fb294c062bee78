//! The send log: one JetStream key-value entry per send, kept for the
//! idempotency window (24 hours by default), so that a retry with the same
//! `clientMsgId` finds its first attempt without a database read on the
//! normal path, across edges, workers and restarts.
//!
//! Why not the stream's own de-duplication: its window is held in
//! nats-server's memory for every message of the stream and is two minutes
//! here; a key per send in a bucket of its own costs a file-backed entry
//! instead, and ages out.
//!
//! But nats-server holds every key of a stream in memory too: about 430
//! bytes per key of this shape, measured (BENCHMARKS.md, "The send log's
//! memory"), so 24 hours of keys at 100 sends/s would take 3.7 GB on every
//! node. So an entry lives only as long as it must:
//! - an id that says when it was minted (a UUID v7, what this workspace's
//!   clients send) keeps its entry until `minted + short` (at least `short`
//!   from its write, at most the whole window), `short` being
//!   [`SHORT_WINDOW`], 15 minutes. A
//!   send whose id was minted longer ago than that (a late retry, or a
//!   client whose clock is behind) cannot trust a missing entry
//!   ([`SendLog::conclusive`]), and the worker asks MongoDB, once it holds
//!   every message such an attempt could be, whether it was sent;
//! - any other id keeps its entry for the whole window, as before.
//!
//! The rule holds whatever the client's clock says: an entry lives at least
//! until `minted + short` by the server's clock, and a missing entry is
//! trusted only before then (less a minute for the servers' clocks).
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

/// How far apart the servers' clocks may be (worker and nats-server):
/// a missing entry is trusted only this long before it could have expired.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(60);

/// How long past its minting the entry of a time-stamped id lives. One
/// figure for every worker, not a setting: a worker trusts a missing entry
/// by the lifetime it would have given it, so two workers with different
/// figures could each publish one attempt.
pub const SHORT_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Handle on the bucket; cheap to clone.
#[derive(Debug, Clone)]
pub struct SendLog {
    bucket: Bucket,
    /// The idempotency window: how long any entry may live.
    window: Duration,
    /// Whether entries of time-stamped ids live [`SHORT_WINDOW`] past
    /// their minting (the window is longer than that).
    short: bool,
    /// How long after its write an attempt lands or never does.
    settle: Duration,
}

impl Bus {
    /// Creates the send log, or updates it to keep entries for `window`
    /// (workers only, at start-up, like the streams); entries of ids that
    /// say when they were minted live [`SHORT_WINDOW`] past that (module
    /// docs), unless `window` is no longer. An attempt lands within
    /// `settle` of its write or never, which must leave the rule room:
    /// [`settle_fits`].
    pub async fn send_log(&self, window: Duration, settle: Duration) -> Result<SendLog, BusError> {
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
        let bucket = self.declare_bucket_with_ttls(SENDS_BUCKET, config).await?;
        Ok(SendLog {
            bucket,
            window,
            short: SHORT_WINDOW < window,
            settle,
        })
    }
}

/// Whether an attempt that lands within `settle` of its write or never
/// leaves the rule room: more than a minute of [`SHORT_WINDOW`] once the
/// settle delay and the clocks' margins are taken off it
/// ([`SendLog::persisted_before`]). Workers refuse to start otherwise.
pub fn settle_fits(settle: Duration) -> bool {
    SHORT_WINDOW > settle + CLOCK_MARGIN * 3
}

/// How long the entry of an id minted at `minted` (client's clock, ms since
/// the epoch; `None`: the id does not say) and written at `now` lives:
/// `None` for the whole window.
fn lifetime(minted: Option<i64>, now: i64, short: Duration, window: Duration) -> Option<Duration> {
    let minted = minted?;
    let (short_ms, window_ms) = (millis(short), millis(window));
    let until = minted.saturating_add(short_ms).saturating_sub(now);
    let ms = until.clamp(short_ms, window_ms);
    // whole seconds, rounded up: nats-server counts TTLs in seconds
    (ms < window_ms).then(|| Duration::from_secs((ms as u64).div_ceil(1000)))
}

/// Whether a missing entry for an id minted at `minted` proves that no
/// attempt of it was made at `now` or up to the window before: every entry
/// of it lives until `minted + short` at least.
fn conclusive(minted: Option<i64>, now: i64, short: Duration) -> bool {
    minted
        .is_none_or(|m| m.saturating_add(millis(short)) > now.saturating_add(millis(CLOCK_MARGIN)))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SendLog {
    /// How long the entry of `client`'s send written at `now` (ms since the
    /// epoch) lives; `None`: the whole window.
    pub fn lifetime(&self, client: &ClientMsgId, now: i64) -> Option<Duration> {
        if !self.short {
            return None;
        }
        lifetime(client.minted_at(), now, SHORT_WINDOW, self.window)
    }

    /// Whether no entry for `client` at `now` proves it was never sent in
    /// the window; if not, MongoDB answers (module docs).
    /// The same rule on every worker, whatever its own window: an entry
    /// another worker wrote may have the short lifetime.
    pub fn conclusive(&self, client: &ClientMsgId, now: i64) -> bool {
        conclusive(client.minted_at(), now, SHORT_WINDOW)
    }

    /// What a send that finds no entry, and cannot trust that
    /// ([`SendLog::conclusive`]), must know is in MongoDB before it trusts
    /// MongoDB's answer: every group message the stream took before `now`
    /// (ms since the epoch) less this. An earlier attempt whose entry is
    /// gone was written at least the short window ago and lands within
    /// `settle` of its write or never; a clock margin each for the worker
    /// that wrote it and for nats-server (more than a minute is left:
    /// [`Bus::send_log`]).
    pub fn persisted_before(&self, now: i64) -> i64 {
        let ago = SHORT_WINDOW.saturating_sub(self.settle + CLOCK_MARGIN * 2);
        now.saturating_sub(millis(ago))
    }

    /// Records a send unless one with the same key exists: one JetStream
    /// write on the normal path, plus a read when the key is taken. The
    /// entry lives `ttl` ([`SendLog::lifetime`]).
    pub async fn claim(
        &self,
        key: &str,
        record: &SendRecord,
        ttl: Option<Duration>,
    ) -> Result<Claimed, BusError> {
        let value = Bytes::from(serde_json::to_vec(record).map_err(BusError::nats)?);
        // at most: created, taken (read it), deleted (create over the marker)
        let mut expected = 0;
        for _ in 0..3 {
            if let Some(revision) = self
                .bucket
                .put_if_last_for(key, value.clone(), expected, ttl)
                .await?
            {
                return Ok(Claimed::New { revision });
            }
            match self.bucket.last(key).await? {
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
        ttl: Option<Duration>,
    ) -> Result<Option<u64>, BusError> {
        let value = Bytes::from(serde_json::to_vec(record).map_err(BusError::nats)?);
        self.bucket.put_if_last_for(key, value, revision, ttl).await
    }

    /// Forgets a send that certainly never went out, so that a retry with
    /// the same client id starts afresh (a delete marker, as the key-value
    /// client writes), if its entry is still the one made at `revision`
    /// (whether it was): an entry made since belongs to another attempt.
    /// The marker lives the short while only: without it a retry goes ahead
    /// just as well.
    pub async fn release(&self, key: &str, revision: u64) -> Result<bool, BusError> {
        self.bucket
            .delete_if_last(key, revision, self.short.then_some(SHORT_WINDOW))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn an_entry_lives_until_its_id_is_short_old_and_no_longer_than_the_window() {
        let (short, window) = (Duration::from_secs(15 * 60), Duration::from_secs(24 * 3600));
        let now = 1_796_342_400_000;
        let at = |minted: Option<i64>| lifetime(minted, now, short, window);
        // an id that does not say when it was minted: the whole window
        assert_eq!(at(None), None);
        // minted just now: the short while
        assert_eq!(at(Some(now)), Some(short));
        // minted long ago (or a clock far behind): still the short while
        assert_eq!(at(Some(now - 600 * MIN)), Some(short));
        // a clock 30 min ahead: until minted + short by the server's clock
        assert_eq!(at(Some(now + 30 * MIN)), Some(Duration::from_secs(45 * 60)));
        // rounded up to whole seconds
        assert_eq!(
            at(Some(now + 30 * MIN + 1)),
            Some(Duration::from_secs(45 * 60 + 1))
        );
        // a stamp past the window: the whole window, like an id without one
        assert_eq!(at(Some(now + 24 * 60 * MIN)), None);
    }

    #[test]
    fn a_settle_delay_must_leave_the_rule_room() {
        let secs = Duration::from_secs;
        assert!(settle_fits(secs(30)));
        assert!(settle_fits(secs(11 * 60)));
        assert!(!settle_fits(secs(12 * 60)), "no room left");
        assert!(!settle_fits(secs(3600)));
    }

    #[test]
    fn a_missing_entry_is_trusted_only_while_every_entry_of_its_id_must_live() {
        let short = Duration::from_secs(15 * 60);
        let now = 1_796_342_400_000;
        let trusted = |minted: Option<i64>| conclusive(minted, now, short);
        assert!(trusted(None));
        assert!(trusted(Some(now)));
        assert!(trusted(Some(now + 600 * MIN)), "a clock ahead");
        assert!(trusted(Some(now - 13 * MIN)));
        // within the servers' clock margin of expiring, or past it
        assert!(!trusted(Some(now - 14 * MIN)));
        assert!(!trusted(Some(now - 15 * MIN)));
        assert!(
            !trusted(Some(now - 600 * MIN)),
            "a late retry, or a clock behind"
        );
        // whatever the clock: an entry written at any time up to now lives
        // until minted + short at least, so a trusted miss is never one
        // whose entry expired
        for minted in [now - 14 * MIN + 1, now - 5 * MIN, now + 90 * MIN] {
            for written in [now - 24 * 60 * MIN, now - 20 * MIN, now - MIN, now] {
                let ttl = lifetime(Some(minted), written, short, Duration::from_secs(24 * 3600))
                    .map_or(i64::MAX, |d| d.as_millis() as i64);
                assert!(
                    !trusted(Some(minted))
                        || written.saturating_add(ttl) > now + CLOCK_MARGIN.as_millis() as i64,
                    "minted {minted}, written {written}"
                );
            }
        }
    }

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
