//! Device consumers: the durable pull consumers that hold one device's
//! delivery position, one on the users stream (its user's notifications)
//! and one on the groups stream (the groups its user subscribed to).
//!
//! Names are injective: ids may contain `_`, so `u_<user>_<device>` (the
//! first scheme) gave `bob` + `smith_d` and `bob_smith` + `d` one consumer,
//! and one user received the other's messages. A name now carries the user
//! id's length, `du_<len>_<user>_<device>`, which splits only one way; and
//! every consumer records its owner in its metadata, checked before any
//! reuse, so even a consumer made by hand under a device's name is never
//! handed to that device.

use async_nats::jetstream::{
    consumer::{self, DeliverPolicy},
    context::{ConsumerInfoError, ConsumerInfoErrorKind},
    stream,
};
use chat_domain::{DeviceId, GroupId, UserId};

use crate::{Bus, BusError, group_msg_subject, user_subject};

/// A group-message subject no group has (group ids are hex): the filter of
/// a device consumer whose user subscribed to nothing.
const NO_GROUP_SUBJECT: &str = "chat.group.-.msg";
/// Consumer metadata naming the user a consumer belongs to.
const OWNER_USER: &str = "chat_user";
/// Consumer metadata naming the device a consumer belongs to.
const OWNER_DEVICE: &str = "chat_device";

/// Which of a device's two consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Notifications (`chat.user.<user>.event`): payloads are finished frames.
    User,
    /// Group messages: payloads are sealed envelopes.
    Groups,
}

impl Feed {
    fn prefix(self) -> &'static str {
        match self {
            Feed::User => "du",
            Feed::Groups => "dg",
        }
    }

    /// The label of this feed in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Feed::User => "user",
            Feed::Groups => "groups",
        }
    }
}

/// The consumer of `feed` of `device`: `<prefix>_<len(user)>_<user>_<device>`.
/// The length makes the split unambiguous; the prefixes (`du`, `dg`) never
/// start a name of the first scheme (`u_`, `g_`), so the two never meet.
fn consumer_name(feed: Feed, user: &UserId, device: &DeviceId) -> String {
    format!("{}_{}_{user}_{device}", feed.prefix(), user.as_str().len())
}

/// The durable consumer holding `device`'s position in its user's
/// notifications.
pub fn user_consumer_name(user: &UserId, device: &DeviceId) -> String {
    consumer_name(Feed::User, user, device)
}

/// The durable consumer holding `device`'s position in the messages of the
/// groups its user subscribed to.
pub fn group_consumer_name(user: &UserId, device: &DeviceId) -> String {
    consumer_name(Feed::Groups, user, device)
}

/// The first scheme's name, ambiguous: only read to carry a device's place
/// over (see [`Bus::ensure_device`]).
fn legacy_name(feed: Feed, user: &UserId, device: &DeviceId) -> String {
    let prefix = match feed {
        Feed::User => "u",
        Feed::Groups => "g",
    };
    format!("{prefix}_{user}_{device}")
}

/// The subjects a consumer filters on.
fn filters_of(config: &consumer::Config) -> Vec<String> {
    if config.filter_subjects.is_empty() {
        vec![config.filter_subject.clone()]
    } else {
        config.filter_subjects.clone()
    }
}

/// Whether `config` filters on exactly `filters`, in any order.
fn same_subjects(config: &consumer::Config, filters: &[String]) -> bool {
    let mut have = filters_of(config);
    let mut want = filters.to_vec();
    have.sort_unstable();
    want.sort_unstable();
    have == want
}

/// Whether the consumer records `user`'s `device` as its owner.
fn owned_by(config: &consumer::Config, user: &UserId, device: &DeviceId) -> bool {
    config.metadata.get(OWNER_USER).map(String::as_str) == Some(user.as_str())
        && config.metadata.get(OWNER_DEVICE).map(String::as_str) == Some(device.as_str())
}

/// A device consumer right after a rewind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewound {
    /// The delivery count: the next delivery carries this plus one.
    pub delivered: u64,
    /// Messages matching its filters after its position.
    pub pending: u64,
}

/// Where a device left off under the first naming scheme.
struct LegacyPlace {
    user_start: u64,
    groups_start: Option<u64>,
}

impl Bus {
    fn stream_of(&self, feed: Feed) -> &str {
        match feed {
            Feed::User => &self.defs.users_stream.name,
            Feed::Groups => &self.defs.groups_stream.name,
        }
    }

    async fn stream(&self, feed: Feed) -> Result<stream::Stream<()>, BusError> {
        self.js
            .get_stream_no_info(self.stream_of(feed))
            .await
            .map_err(BusError::nats)
    }

    fn device_consumer(
        &self,
        user: &UserId,
        device: &DeviceId,
        feed: Feed,
        filters: Vec<String>,
        start: DeliverPolicy,
    ) -> consumer::pull::Config {
        let mut config = self.defs.device_consumer.clone();
        config.durable_name = Some(consumer_name(feed, user, device));
        config.deliver_policy = start;
        config
            .metadata
            .insert(OWNER_USER.to_owned(), user.to_string());
        config
            .metadata
            .insert(OWNER_DEVICE.to_owned(), device.to_string());
        if let [one] = filters.as_slice() {
            config.filter_subject = one.clone();
        } else {
            config.filter_subjects = filters;
        }
        config
    }

    /// The consumer of `feed` of `device`, if it exists; an error if it
    /// exists and records another owner.
    async fn device_info(
        &self,
        stream: &stream::Stream<()>,
        feed: Feed,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Option<consumer::Info>, BusError> {
        let name = consumer_name(feed, user, device);
        match stream.consumer_info(&name).await {
            Ok(info) if owned_by(&info.config, user, device) => Ok(Some(info)),
            Ok(_) => {
                tracing::error!(consumer = %name, "a consumer under this device's name records another owner; refusing it");
                Err(BusError::Foreign(name))
            }
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => Ok(None),
            Err(e) => Err(BusError::Unavailable(format!("consumer {name}: {e}"))),
        }
    }

    /// Makes sure both consumers of `device` exist, the group consumer
    /// filtering on `groups`, and returns the name of the user consumer.
    ///
    /// A new device starts at the oldest stored notification (a user who was
    /// offline since before the device existed still hears of everything)
    /// and at new group messages (older ones are history). A device that
    /// had consumers under the first naming scheme keeps its place: if the
    /// old user consumer filters on this user's subject (so it is this
    /// user's, whichever of the colliding pairs its name also fits), the
    /// new consumers start right after the old ones' ack floors and the old
    /// ones are deleted.
    pub async fn ensure_device(
        &self,
        user: &UserId,
        device: &DeviceId,
        groups: &[GroupId],
    ) -> Result<String, BusError> {
        let users = self.stream(Feed::User).await?;
        let name = user_consumer_name(user, device);
        let mut legacy = None;
        if self
            .device_info(&users, Feed::User, user, device)
            .await?
            .is_none()
        {
            legacy = self.legacy_place(user, device).await?;
            let start = match &legacy {
                Some(place) => DeliverPolicy::ByStartSequence {
                    start_sequence: place.user_start,
                },
                None => DeliverPolicy::All,
            };
            let config =
                self.device_consumer(user, device, Feed::User, vec![user_subject(user)], start);
            users
                .create_consumer(config)
                .await
                .map_err(|e| BusError::Unavailable(format!("consumer {name}: {e}")))?;
        }
        let groups_start = legacy.as_ref().and_then(|l| l.groups_start);
        self.put_group_consumer(user, device, groups, groups_start)
            .await?;
        if legacy.is_some() {
            for feed in [Feed::User, Feed::Groups] {
                let old = legacy_name(feed, user, device);
                match self.stream(feed).await?.delete_consumer(&old).await {
                    Ok(_) => {
                        tracing::info!(consumer = %old, new = %consumer_name(feed, user, device), "device consumer renamed, keeping its place")
                    }
                    Err(e) => {
                        tracing::warn!(consumer = %old, error = %e, "cannot delete a renamed device consumer; it expires when idle")
                    }
                }
            }
        }
        Ok(name)
    }

    /// The place of `device` under the first naming scheme, if its old user
    /// consumer is provably this user's (it filters on this user's subject
    /// and records no owner of ours: a consumer of the current scheme under
    /// a name that happens to fit is never taken).
    async fn legacy_place(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Option<LegacyPlace>, BusError> {
        let users = self.stream(Feed::User).await?;
        let old = match users
            .consumer_info(legacy_name(Feed::User, user, device))
            .await
        {
            Ok(info) => info,
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BusError::nats(e)),
        };
        // (nats-server adds metadata of its own, `_nats.*`: look for ours)
        let legacy = |c: &consumer::Config| !c.metadata.contains_key(OWNER_USER);
        if !legacy(&old.config) || filters_of(&old.config) != [user_subject(user)] {
            return Ok(None);
        }
        let groups = self.stream(Feed::Groups).await?;
        let groups_start = match groups
            .consumer_info(legacy_name(Feed::Groups, user, device))
            .await
        {
            Ok(info) if legacy(&info.config) => Some(info.ack_floor.stream_sequence + 1),
            Ok(_) => None,
            Err(e) if e.kind() == ConsumerInfoErrorKind::NotFound => None,
            Err(e) => return Err(BusError::nats(e)),
        };
        Ok(Some(LegacyPlace {
            user_start: old.ack_floor.stream_sequence + 1,
            groups_start,
        }))
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
        self.put_group_consumer(user, device, groups, None).await
    }

    async fn put_group_consumer(
        &self,
        user: &UserId,
        device: &DeviceId,
        groups: &[GroupId],
        start_if_new: Option<u64>,
    ) -> Result<(), BusError> {
        let stream = self.stream(Feed::Groups).await?;
        let name = group_consumer_name(user, device);
        let filters: Vec<String> = if groups.is_empty() {
            vec![NO_GROUP_SUBJECT.to_owned()]
        } else {
            groups.iter().map(group_msg_subject).collect()
        };
        let start = match self
            .device_info(&stream, Feed::Groups, user, device)
            .await?
        {
            // already filtering on exactly these groups (the common case of
            // a reconnect): nothing to change
            Some(info) if same_subjects(&info.config, &filters) => return Ok(()),
            // an update must keep the start the consumer was created with
            Some(info) => info.config.deliver_policy,
            // "new messages only", spelled as a start sequence, because only
            // consumers with an explicit start can be reset (see `reset`)
            None => {
                let start_sequence = match start_if_new {
                    Some(seq) => seq,
                    None => {
                        self.js
                            .get_stream(self.stream_of(Feed::Groups))
                            .await
                            .map_err(BusError::nats)?
                            .cached_info()
                            .state
                            .last_sequence
                            + 1
                    }
                };
                DeliverPolicy::ByStartSequence { start_sequence }
            }
        };
        let config = self.device_consumer(user, device, Feed::Groups, filters, start);
        stream
            .create_consumer(config)
            .await
            .map_err(|e| BusError::Unavailable(format!("consumer {name}: {e}")))?;
        Ok(())
    }

    /// Deletes both consumers of `device` (an evicted device): its position
    /// is gone, and nothing it could still pull follows its user's groups.
    pub async fn delete_device(&self, user: &UserId, device: &DeviceId) -> Result<(), BusError> {
        for feed in [Feed::User, Feed::Groups] {
            let stream = self.stream(feed).await?;
            let name = consumer_name(feed, user, device);
            if self
                .device_info(&stream, feed, user, device)
                .await?
                .is_some()
            {
                stream
                    .delete_consumer(&name)
                    .await
                    .map_err(|e| BusError::Unavailable(format!("consumer {name}: {e}")))?;
            }
        }
        Ok(())
    }

    /// The filters of `device`'s group consumer, or none if it has none.
    pub async fn group_filters(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Vec<String>, BusError> {
        let stream = self.stream(Feed::Groups).await?;
        let Some(info) = self
            .device_info(&stream, Feed::Groups, user, device)
            .await?
        else {
            return Ok(Vec::new());
        };
        let mut filters = filters_of(&info.config);
        filters.retain(|f| f != NO_GROUP_SUBJECT && !f.is_empty());
        Ok(filters)
    }

    /// Rewinds `device`'s consumer of `feed` to its ack floor: whatever was
    /// delivered and not acknowledged (a previous connection's share) comes
    /// again, in stream order, instead of after the ack timeout and out of
    /// order.
    /// Returns the consumer's delivery count after the rewind (the next
    /// delivery carries that plus one) and what it holds for delivery.
    pub async fn reset(
        &self,
        feed: Feed,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Rewound, BusError> {
        self.reset_to(feed, user, device, None).await
    }

    /// Resets `device`'s consumer of `feed` so that its next delivery is at
    /// stream sequence `next` or later (`None`: its ack floor); returns the
    /// delivery count after it.
    pub(crate) async fn reset_to(
        &self,
        feed: Feed,
        user: &UserId,
        device: &DeviceId,
        next: Option<u64>,
    ) -> Result<Rewound, BusError> {
        let reset = self
            .stream(feed)
            .await?
            .reset_consumer(&consumer_name(feed, user, device), next)
            .await
            .map_err(BusError::nats)?;
        Ok(Rewound {
            delivered: reset.info.delivered.consumer_sequence,
            pending: reset.info.num_pending,
        })
    }

    /// Binds to `device`'s consumer of `feed` for delivery, after checking
    /// that it is this device's.
    pub async fn bind(
        &self,
        feed: Feed,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<consumer::Consumer<consumer::pull::Config>, BusError> {
        let stream = self.stream(feed).await?;
        let name = consumer_name(feed, user, device);
        match stream.get_consumer::<consumer::pull::Config>(&name).await {
            Ok(c) if owned_by(&c.cached_info().config, user, device) => Ok(c),
            Ok(_) => {
                tracing::error!(consumer = %name, "a consumer under this device's name records another owner; refusing it");
                Err(BusError::Foreign(name))
            }
            Err(e) => match e.downcast_ref::<ConsumerInfoError>() {
                Some(info) if info.kind() == ConsumerInfoErrorKind::NotFound => {
                    Err(BusError::NoConsumer(name))
                }
                _ => Err(BusError::nats(e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(user: &str, device: &str) -> (UserId, DeviceId) {
        (
            UserId::parse(user).expect("user"),
            DeviceId::parse(device).expect("device"),
        )
    }

    #[test]
    fn names_of_colliding_pairs_differ() {
        // both were `u_bob_smith_d` in the first scheme
        let (a_user, a_device) = ids("bob", "smith_d");
        let (b_user, b_device) = ids("bob_smith", "d");
        assert_eq!(
            legacy_name(Feed::User, &a_user, &a_device),
            legacy_name(Feed::User, &b_user, &b_device)
        );
        assert_ne!(
            user_consumer_name(&a_user, &a_device),
            user_consumer_name(&b_user, &b_device)
        );
        assert_ne!(
            group_consumer_name(&a_user, &a_device),
            group_consumer_name(&b_user, &b_device)
        );
    }

    /// Splits a name back into (feed prefix, user, device): possible for
    /// every name, so no two pairs share one.
    fn split(name: &str) -> (String, String, String) {
        let (prefix, rest) = name.split_once('_').expect("prefix");
        let (len, rest) = rest.split_once('_').expect("length");
        let len: usize = len.parse().expect("length is a number");
        let (user, device) = rest.split_at(len);
        let device = device.strip_prefix('_').expect("separator");
        (prefix.to_owned(), user.to_owned(), device.to_owned())
    }

    #[test]
    fn names_split_back_into_their_ids() {
        let alphabet = ["a", "_", "-", "1", "a_", "_a", "__", "1_2"];
        let mut seen = std::collections::HashMap::new();
        for u1 in alphabet {
            for u2 in alphabet {
                for d in alphabet {
                    let user = format!("{u1}{u2}");
                    let (user_id, device_id) = ids(&user, d);
                    for feed in [Feed::User, Feed::Groups] {
                        let name = consumer_name(feed, &user_id, &device_id);
                        assert_eq!(
                            split(&name),
                            (feed.prefix().to_owned(), user.clone(), d.to_owned())
                        );
                        if let Some(other) = seen.insert(name.clone(), (user.clone(), d)) {
                            assert_eq!(other, (user.clone(), d), "{name} named two devices");
                        }
                        // never a name of the first scheme
                        assert!(!name.starts_with("u_") && !name.starts_with("g_"));
                    }
                }
            }
        }
    }

    #[test]
    fn longest_names_stay_within_nats_limits() {
        let (user, device) = ids(&"u".repeat(UserId::MAX_LEN), &"d".repeat(DeviceId::MAX_LEN));
        // nats-server keeps a consumer in a folder of its name: 255 bytes at most
        assert!(group_consumer_name(&user, &device).len() < 255);
    }
}
