//! Where each device is in its user's notifications and in the messages of
//! its user's groups: one entry per device in the `CHAT_PLACES` bucket,
//! `<user>.<device>` → `{"groups": <stream seq>, "users": <stream seq>}`.
//!
//! Everything of the device's groups (notifications of its user) up to that
//! sequence of `CHAT_GROUPS` (`CHAT_USERS`) reached the device. The edge
//! saves it while the device is connected (every few seconds while it moves,
//! and when the connection ends); on reconnect, on any edge, the device gets
//! what came after it through a short-lived consumer (`catch_up.rs`) and
//! then the live feed. A device therefore costs nats-server one small entry,
//! not two durable consumers (about 68 KiB each, and two JetStream API
//! requests per connect, which bounded session opening: BENCHMARKS.md).
//!
//! Keys are injective: ids never contain `.`. Two connections of one device
//! may both save; the entry keeps the furthest of each (a conditional write
//! on the revision last seen, merged and written again on a conflict). An
//! evicted device's entry is a delete marker, which a late save of one of
//! its connections never writes over.

use async_nats::jetstream::{
    consumer, context::ConsumerInfoErrorKind, kv, stream::ConsumerErrorKind,
};
use bytes::Bytes;
use chat_domain::{DeviceId, UserId};
use serde::{Deserialize, Serialize};

use crate::{
    Bus, BusError, Feed,
    bucket::{Bucket, Entry},
};

/// The bucket's name (its stream is `KV_CHAT_PLACES`).
pub const PLACES_BUCKET: &str = "CHAT_PLACES";
/// Attempts at a conditional save before giving up for this round.
const SAVE_ATTEMPTS: usize = 4;

/// One device's place in the two streams (0: nothing yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Place {
    /// Stream sequence of `CHAT_GROUPS`.
    pub groups: u64,
    /// Stream sequence of `CHAT_USERS`.
    pub users: u64,
}

impl Place {
    /// The furthest of both, feed by feed.
    pub fn max(self, other: Place) -> Place {
        Place {
            groups: self.groups.max(other.groups),
            users: self.users.max(other.users),
        }
    }
}

/// A device's entry as read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stored {
    /// `None`: never saved, or forgotten (evicted).
    pub place: Option<Place>,
    /// What the next conditional write expects.
    pub revision: u64,
}

/// The outcome of [`Places::save`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// Written (or already there); the entry's revision now.
    At(u64),
    /// The device was forgotten (evicted): nothing written.
    Forgotten,
}

/// Every device notice, whichever worker sent it (core NATS).
pub const DEVICE_NOTICES: &str = "chat.session.*.*";

/// The subject of notices to `device`'s connections (injective: ids never
/// contain `.`).
pub fn device_notice_subject(user: &UserId, device: &DeviceId) -> String {
    format!("chat.session.{user}.{device}")
}

/// The key of `device` of `user`.
pub fn place_key(user: &UserId, device: &DeviceId) -> String {
    format!("{user}.{device}")
}

/// Handle on the bucket; cheap to clone.
#[derive(Debug, Clone)]
pub struct Places(Bucket);

impl Bus {
    /// Creates the bucket of device places, or updates it (workers, at
    /// start-up). An entry lives twice as long as the streams keep
    /// messages after its last save, so a device away longer than the
    /// streams' retention still reads what is left after its place.
    pub async fn declare_places(&self) -> Result<Places, BusError> {
        let config = kv::Config {
            bucket: PLACES_BUCKET.into(),
            description: "Each device's place in CHAT_GROUPS and CHAT_USERS: <user>.<device> -> {groups, users}".into(),
            history: 1,
            max_age: self.defs.groups_stream.max_age * 2,
            max_value_size: 256,
            storage: async_nats::jetstream::stream::StorageType::File,
            num_replicas: self.defs.groups_stream.num_replicas,
            ..Default::default()
        };
        self.declare_bucket(PLACES_BUCKET, config).await.map(Places)
    }

    /// The bucket of device places as it is (edges).
    pub fn places(&self) -> Places {
        Places(self.bind_bucket(PLACES_BUCKET))
    }
}

impl Bus {
    /// Tells every edge that `device` was evicted: its connections close.
    pub async fn announce_eviction(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<(), BusError> {
        self.client
            .publish(
                device_notice_subject(user, device),
                Bytes::from_static(b"evicted"),
            )
            .await
            .map_err(BusError::nats)
    }
}

impl Places {
    /// Where `device` is.
    pub async fn get(&self, user: &UserId, device: &DeviceId) -> Result<Stored, BusError> {
        let key = place_key(user, device);
        Ok(match self.0.last(&key).await? {
            None => Stored::default(),
            Some(Entry { revision, value }) => Stored {
                place: value.map(|v| parse(&key, &v)).transpose()?,
                revision,
            },
        })
    }

    /// Saves `place` for `device`, keeping the furthest of it and what is
    /// stored; `revision` is the entry's revision as this caller last saw
    /// it (one write when nobody else saved meanwhile).
    pub async fn save(
        &self,
        user: &UserId,
        device: &DeviceId,
        mut place: Place,
        mut revision: u64,
    ) -> Result<Saved, BusError> {
        let key = place_key(user, device);
        for _ in 0..SAVE_ATTEMPTS {
            let value = Bytes::from(serde_json::to_vec(&place).map_err(BusError::nats)?);
            if let Some(at) = self.0.put_if_last(&key, value, revision).await? {
                return Ok(Saved::At(at));
            }
            match self.0.last(&key).await? {
                Some(Entry {
                    revision: r,
                    value: Some(v),
                }) => {
                    let stored = parse(&key, &v)?;
                    revision = r;
                    if stored.max(place) == stored {
                        return Ok(Saved::At(r));
                    }
                    place = place.max(stored);
                }
                Some(Entry { value: None, .. }) => return Ok(Saved::Forgotten),
                None => revision = 0,
            }
        }
        Err(BusError::Unavailable(format!(
            "device place {key} keeps changing"
        )))
    }

    /// Forgets `device` (evicted): its place is a delete marker.
    pub async fn forget(&self, user: &UserId, device: &DeviceId) -> Result<(), BusError> {
        self.0.delete(&place_key(user, device)).await
    }
}

fn parse(key: &str, value: &[u8]) -> Result<Place, BusError> {
    serde_json::from_slice(value)
        .map_err(|e| BusError::Unavailable(format!("device place {key} is unreadable: {e}")))
}

/// The durable consumers of the previous release, one per device and stream
/// (`du_<len(user)>_<user>_<device>`, `dg_…`), whose owner was recorded in
/// their metadata: read once to carry a device's place over, then deleted.
fn previous_consumer(prefix: &str, user: &UserId, device: &DeviceId) -> String {
    format!("{prefix}_{}_{user}_{device}", user.as_str().len())
}

impl Bus {
    /// The place of `device` under the previous release (its two durable
    /// consumers' ack floors), if it had one; the consumers are deleted once
    /// the place is saved by the caller (see [`Bus::drop_previous_consumers`]).
    /// A consumer that records another owner is never read.
    pub async fn previous_place(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Option<Place>, BusError> {
        let mut place = Place::default();
        let mut found = 0;
        for (feed, name, stream) in self.previous_consumers(user, device).await? {
            let info = match stream.consumer_info(&name).await {
                Ok(info) => info,
                Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => continue,
                Err(e) => return Err(BusError::nats(e)),
            };
            if !recorded_owner(&info.config, user, device) {
                tracing::error!(consumer = %name, "a consumer under this device's name records another owner; ignoring it");
                continue;
            }
            found += 1;
            let floor = info.ack_floor.stream_sequence;
            match feed {
                Feed::User => place.users = floor,
                Feed::Groups => place.groups = floor,
            }
        }
        // both or nothing: a place of 0 in one stream would mean "all of it"
        Ok((found == 2).then_some(place))
    }

    /// Deletes `device`'s consumers of the previous release, if any.
    pub async fn drop_previous_consumers(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<(), BusError> {
        for (_, name, stream) in self.previous_consumers(user, device).await? {
            match stream.delete_consumer(&name).await {
                Ok(_) => {
                    tracing::info!(consumer = %name, "consumer of the previous release deleted; the device's place is in CHAT_PLACES")
                }
                Err(e) if matches!(e.kind(), ConsumerErrorKind::JetStream(js) if js.error_code() == async_nats::jetstream::ErrorCode::CONSUMER_NOT_FOUND) =>
                    {}
                Err(e) => return Err(BusError::nats(e)),
            }
        }
        Ok(())
    }

    /// `device`'s consumer of the previous release on each stream, by name,
    /// with the stream.
    async fn previous_consumers(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Vec<(Feed, String, async_nats::jetstream::stream::Stream<()>)>, BusError> {
        let mut found = Vec::with_capacity(2);
        for (feed, prefix) in [(Feed::User, "du"), (Feed::Groups, "dg")] {
            let stream = self
                .js
                .get_stream_no_info(self.stream_name(feed))
                .await
                .map_err(BusError::nats)?;
            found.push((feed, previous_consumer(prefix, user, device), stream));
        }
        Ok(found)
    }
}

/// Whether a previous release's consumer records `user`'s `device`.
fn recorded_owner(config: &consumer::Config, user: &UserId, device: &DeviceId) -> bool {
    config.metadata.get("chat_user").map(String::as_str) == Some(user.as_str())
        && config.metadata.get("chat_device").map(String::as_str) == Some(device.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: &str, device: &str) -> String {
        place_key(
            &UserId::parse(user).expect("user"),
            &DeviceId::parse(device).expect("device"),
        )
    }

    #[test]
    fn keys_split_back_into_their_ids() {
        let alphabet = ["a", "_", "-", "1", "a_", "_a", "__", "1_2"];
        let mut seen = std::collections::HashMap::new();
        for u1 in alphabet {
            for u2 in alphabet {
                for d in alphabet {
                    let user = format!("{u1}{u2}");
                    let k = key(&user, d);
                    let (u, dev) = k.split_once('.').expect("one dot");
                    assert_eq!((u, dev), (user.as_str(), d));
                    if let Some(other) = seen.insert(k.clone(), (user.clone(), d)) {
                        assert_eq!(other, (user.clone(), d), "{k} named two devices");
                    }
                }
            }
        }
        // the pair that once shared a consumer
        assert_ne!(key("bob", "smith_d"), key("bob_smith", "d"));
    }

    #[test]
    fn places_merge_feed_by_feed() {
        let a = Place {
            groups: 10,
            users: 3,
        };
        let b = Place {
            groups: 7,
            users: 5,
        };
        assert_eq!(
            a.max(b),
            Place {
                groups: 10,
                users: 5
            }
        );
        let json = serde_json::to_string(&a).expect("json");
        assert_eq!(json, r#"{"groups":10,"users":3}"#);
    }

    #[test]
    fn previous_names_are_those_of_the_previous_release() {
        let (u, d) = (
            UserId::parse("bob_smith").expect("user"),
            DeviceId::parse("d").expect("device"),
        );
        assert_eq!(previous_consumer("dg", &u, &d), "dg_9_bob_smith_d");
    }
}
