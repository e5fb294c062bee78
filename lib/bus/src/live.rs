//! Live delivery and catching up: what an edge reads to fan out every
//! group's traffic and every user's notifications once, the membership
//! events that tell it who may receive a group, and the short-lived
//! consumers a reconnecting device catches up through.
//!
//! Each edge reads each stream (`CHAT_GROUPS`, `CHAT_USERS`) through one
//! ephemeral, unacknowledged consumer of its own over all of it: nats-server
//! delivers every message once per edge, whatever the number of members
//! or devices, and the delivery count of such a consumer rises by exactly
//! one per message, so the edge sees any loss and reads again from its
//! position (see [`LiveReader`]). A device that was away reads what it
//! missed the same way, through a consumer of its own filtered on its
//! groups (or its user) from its place on ([`CatchUp`]), which ends a few
//! seconds after the device went live.
//!
//! Membership changes that decide live delivery (a member subscribed, left
//! or was removed) are events on `chat.group.<g>.event.<user>` in the same stream,
//! so every edge applies them in the group's order: nothing published after
//! a removal's event reaches the removed member's connections, on any edge.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, AckPolicy, DeliverPolicy};
use chat_domain::{GroupId, UserId};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{Bus, BusError};

/// A consumer a catch-up stopped reading from is removed after this.
const CATCH_UP_INACTIVE: Duration = Duration::from_secs(5);
/// The longest one catch-up read may take (a pull lost with a NATS node is
/// never answered).
const CATCH_UP_READ: Duration = Duration::from_secs(5);
/// A reader that heard nothing for this long asks how far its consumer got.
const LIVE_IDLE_CHECK: Duration = Duration::from_secs(5);
/// An edge's consumer left behind (the edge died) is removed after this.
const LIVE_INACTIVE: Duration = Duration::from_secs(30);
/// Most messages the reader asks for at a time.
const LIVE_BATCH: usize = 1024;
/// Attempts at publishing a membership event before the change fails.
const EVENT_ATTEMPTS: usize = 3;

/// One of the two streams a device receives from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feed {
    /// Notifications (`chat.user.<user>.event`): payloads are finished frames.
    User,
    /// Group messages and membership events: messages are sealed envelopes.
    Groups,
}

impl Feed {
    /// The label of this feed in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Feed::User => "user",
            Feed::Groups => "groups",
        }
    }

    /// Every subject of the feed's stream.
    fn everything(self) -> &'static str {
        match self {
            Feed::User => "chat.user.>",
            Feed::Groups => "chat.group.>",
        }
    }

    /// The subject of the messages of `key` (a user for notifications, a
    /// group for group messages); `key` is a validated id.
    pub fn message_subject(self, key: &str) -> String {
        match self {
            Feed::User => format!("chat.user.{key}.event"),
            Feed::Groups => format!("chat.group.{key}.msg"),
        }
    }

    /// What a catch-up of `keys` reads: their messages and, for groups,
    /// their membership events (a removal met during a catch-up ends the
    /// group there, as it does live): one filter per key.
    pub fn catch_up_filters(self, keys: &[String]) -> Vec<String> {
        match self {
            Feed::User => keys.iter().map(|k| self.message_subject(k)).collect(),
            Feed::Groups => keys.iter().map(|k| format!("chat.group.{k}.>")).collect(),
        }
    }

    /// The key a subject of this feed's stream is about.
    pub fn key_of(self, subject: &str) -> Option<&str> {
        match self {
            Feed::Groups => match GroupTraffic::of(subject)? {
                GroupTraffic::Message(g) | GroupTraffic::Event(g) => Some(g),
            },
            Feed::User => {
                let user = subject.strip_prefix("chat.user.")?.strip_suffix(".event")?;
                (!user.is_empty() && !user.contains('.')).then_some(user)
            }
        }
    }
}

/// The subject of `user`'s membership events in `group`. One subject per
/// member, so that a subscribe is published only if no event of that
/// member (a removal) landed since it read the membership: see
/// [`Bus::publish_membership_after`]. Ids never hold a `.`, so the subject
/// names one member of one group.
pub fn member_event_subject(group: &GroupId, user: &UserId) -> String {
    format!("chat.group.{group}.event.{user}")
}

/// What one subject of the group stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupTraffic<'a> {
    /// A message of the group (an [`crate::Envelope`]).
    Message(&'a str),
    /// A [`MembershipEvent`] of the group.
    Event(&'a str),
}

impl<'a> GroupTraffic<'a> {
    /// The group and kind of `subject`, if it is group traffic.
    pub fn of(subject: &'a str) -> Option<Self> {
        let rest = subject.strip_prefix("chat.group.")?;
        let (group, kind) = rest.split_once('.')?;
        if group.is_empty() || group.contains('.') {
            return None;
        }
        match kind {
            "msg" => Some(Self::Message(group)),
            // `event` alone: written by versions before one subject per
            // member, still read
            "event" => Some(Self::Event(group)),
            _ => {
                let user = kind.strip_prefix("event.")?;
                (!user.is_empty() && !user.contains('.')).then_some(Self::Event(group))
            }
        }
    }
}

/// A member's newest membership event in a group, as read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MembershipTail {
    /// Its stream sequence (0: none).
    pub seq: u64,
    /// What it says, if there is one and it reads.
    pub subscribed: Option<bool>,
}

/// A member's live delivery of a group starts or stops here, in the group's
/// order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MembershipEvent {
    pub user_id: String,
    /// `true`: the member subscribed; `false`: it left or was removed.
    pub subscribed: bool,
}

/// One delivery of the live reader.
pub struct LiveMessage {
    pub stream_seq: u64,
    pub subject: async_nats::Subject,
    pub payload: bytes::Bytes,
}

/// An edge's reader of all group traffic, in stream order, with nothing
/// missing: a jump in the consumer's delivery count, an error, or an idle
/// consumer that delivered more than the reader saw all make it read again
/// from the last stream sequence it handed on.
pub struct LiveReader {
    bus: Bus,
    feed: Feed,
    cursor: Cursor,
    current: Option<Current>,
    serial: u64,
    prefix: String,
}

struct Current {
    name: String,
    consumer: consumer::Consumer<consumer::pull::Config>,
    messages: consumer::pull::Stream,
}

impl Bus {
    /// Publishes a membership event of `user` in `group` (a JetStream
    /// write: edges cannot miss it), retrying a few times. Removals go out
    /// this way, whatever came before them.
    pub async fn publish_membership(
        &self,
        group: &GroupId,
        user: &UserId,
        subscribed: bool,
    ) -> Result<u64, BusError> {
        let mut last = None;
        for _ in 0..EVENT_ATTEMPTS {
            match self.membership_event(group, user, subscribed, None).await {
                Ok(Some(seq)) => return Ok(seq),
                // no compare-and-set to lose: refused as a conflict anyway
                Ok(None) => last = Some(BusError::Unavailable("membership event refused".into())),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| BusError::Unavailable("membership event".into())))
    }

    /// `user`'s newest membership event in `group`, for
    /// [`Bus::publish_membership_after`].
    pub async fn membership_tail(
        &self,
        group: &GroupId,
        user: &UserId,
    ) -> Result<MembershipTail, BusError> {
        let newest = self
            .newest_message_on(Feed::Groups, &member_event_subject(group, user))
            .await?;
        Ok(
            newest.map_or_else(MembershipTail::default, |m| MembershipTail {
                seq: m.sequence,
                // an unreadable event says nothing: publish over it
                subscribed: serde_json::from_slice::<MembershipEvent>(&m.payload)
                    .ok()
                    .map(|e| e.subscribed),
            }),
        )
    }

    /// Publishes a membership event of `user` in `group` only if `user`'s
    /// newest one is still at stream sequence `tail` (from
    /// [`Bus::membership_tail`]): `None` if another one landed meanwhile
    /// (a removal that the membership read before this publish may have
    /// missed), nothing published.
    pub async fn publish_membership_after(
        &self,
        group: &GroupId,
        user: &UserId,
        subscribed: bool,
        tail: u64,
    ) -> Result<Option<u64>, BusError> {
        self.membership_event(group, user, subscribed, Some(tail))
            .await
    }

    async fn membership_event(
        &self,
        group: &GroupId,
        user: &UserId,
        subscribed: bool,
        tail: Option<u64>,
    ) -> Result<Option<u64>, BusError> {
        let body = serde_json::to_vec(&MembershipEvent {
            user_id: user.to_string(),
            subscribed,
        })
        .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let mut headers = async_nats::HeaderMap::new();
        if let Some(tail) = tail {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                tail.to_string().as_str(),
            );
        }
        let subject = member_event_subject(group, user);
        let body = bytes::Bytes::from(body);
        let mut declared = false;
        loop {
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers.clone(), body.clone())
                .await
                .map_err(BusError::nats)?
                .await;
            match sent {
                Ok(ack) => return Ok(Some(ack.sequence)),
                Err(e) if crate::messages::conflicts(&e) => return Ok(None),
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::context::PublishErrorKind::StreamNotFound
                        && !declared =>
                {
                    // a worker of the previous release started since and
                    // declared the stream without the member subjects: put
                    // them back (workers only publish these)
                    tracing::warn!(
                        subject,
                        "the group stream lacks member subjects; declaring it again"
                    );
                    self.ensure_streams().await?;
                    declared = true;
                }
                Err(e) => return Err(BusError::nats(e)),
            }
        }
    }

    pub(crate) fn stream_name(&self, feed: Feed) -> &str {
        match feed {
            Feed::User => &self.defs.users_stream.name,
            Feed::Groups => &self.defs.groups_stream.name,
        }
    }

    /// The newest stream sequence of `feed`'s stream.
    pub async fn stream_tail(&self, feed: Feed) -> Result<u64, BusError> {
        let mut stream = self
            .js
            .get_stream(self.stream_name(feed))
            .await
            .map_err(BusError::nats)?;
        Ok(stream
            .info()
            .await
            .map_err(BusError::nats)?
            .state
            .last_sequence)
    }

    /// The stream sequence of the newest message on `subject` of `feed`'s
    /// stream (0: none): one read from the stream's leader.
    pub async fn newest_on(&self, feed: Feed, subject: &str) -> Result<u64, BusError> {
        let newest = self.newest_message_on(feed, subject).await?;
        Ok(newest.map_or(0, |m| m.sequence))
    }

    /// The newest message on `subject` in `feed`'s stream, if any.
    async fn newest_message_on(
        &self,
        feed: Feed,
        subject: &str,
    ) -> Result<Option<async_nats::jetstream::message::StreamMessage>, BusError> {
        use async_nats::jetstream::stream::LastRawMessageErrorKind;
        let stream = self
            .js
            .get_stream_no_info(self.stream_name(feed))
            .await
            .map_err(BusError::nats)?;
        match stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(BusError::nats(e)),
        }
    }

    /// A reader of all of `feed`'s traffic after stream sequence
    /// `position`; it connects on its first [`LiveReader::next`].
    pub fn live_reader(&self, feed: Feed, position: u64) -> LiveReader {
        LiveReader {
            bus: self.clone(),
            feed,
            cursor: Cursor { position, count: 0 },
            current: None,
            serial: 0,
            prefix: format!("live-{}-{}", feed.label(), uuid::Uuid::new_v4().simple()),
        }
    }

    /// A catch-up of `feed` on `filters` after stream sequence `after`; it
    /// makes its consumer on its first [`CatchUp::next_batch`].
    pub fn catch_up(&self, feed: Feed, filters: Vec<String>, after: u64) -> CatchUp {
        CatchUp {
            bus: self.clone(),
            feed,
            filters,
            cursor: Cursor {
                position: after,
                count: 0,
            },
            consumer: None,
        }
    }

    /// An ephemeral, unacknowledged consumer of `feed` on `filters` from
    /// stream sequence `start`.
    async fn reader_consumer(
        &self,
        feed: Feed,
        name: Option<String>,
        filters: &[String],
        start: u64,
        inactive: Duration,
    ) -> Result<consumer::Consumer<consumer::pull::Config>, BusError> {
        let stream = self
            .js
            .get_stream_no_info(self.stream_name(feed))
            .await
            .map_err(BusError::nats)?;
        let mut config = consumer::pull::Config {
            name,
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ack_policy: AckPolicy::None,
            inactive_threshold: inactive,
            memory_storage: true,
            num_replicas: 1,
            ..Default::default()
        };
        match filters {
            [one] => config.filter_subject = one.clone(),
            many => config.filter_subjects = many.to_vec(),
        }
        stream.create_consumer(config).await.map_err(BusError::nats)
    }
}

impl LiveReader {
    /// The stream sequence last handed on.
    pub fn position(&self) -> u64 {
        self.cursor.position
    }

    /// The next group message or event, in stream order; waits across
    /// outages (trying again with a growing pause) and never skips one.
    pub async fn next(&mut self) -> LiveMessage {
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.current.is_none() {
                match self.connect().await {
                    Ok(c) => {
                        self.current = Some(c);
                        backoff = Duration::from_millis(50);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the group stream live; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
            let Some(current) = self.current.as_mut() else {
                continue;
            };
            let next = tokio::time::timeout(LIVE_IDLE_CHECK, current.messages.next()).await;
            let msg = match next {
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "live read ended; reading again from the position");
                    self.current = None;
                    continue;
                }
                Ok(None) => {
                    self.current = None;
                    continue;
                }
                Err(_) => {
                    // idle: a delivery lost at the tail shows only here
                    if !self.idle_check().await {
                        self.current = None;
                    }
                    continue;
                }
            };
            match self.cursor.step(msg) {
                Step::New(msg) => return msg,
                Step::Seen => {}
                Step::Lost { expected, got } => {
                    metrics::counter!("chat_live_gaps_total").increment(1);
                    tracing::warn!(
                        feed = self.feed.label(),
                        expected,
                        got,
                        position = self.cursor.position,
                        "live deliveries lost on the way; reading again from the position"
                    );
                    self.current = None;
                }
            }
        }
    }

    /// Whether the consumer delivered no more than was handed on.
    async fn idle_check(&mut self) -> bool {
        let Some(current) = self.current.as_mut() else {
            return false;
        };
        match current.consumer.info().await {
            Ok(info) => info.delivered.consumer_sequence <= self.cursor.count,
            Err(e) => {
                tracing::debug!(error = %e, consumer = %current.name, "live consumer gone");
                false
            }
        }
    }

    async fn connect(&mut self) -> Result<Current, BusError> {
        self.serial += 1;
        let name = format!("{}-{}", self.prefix, self.serial);
        let consumer = self
            .bus
            .reader_consumer(
                self.feed,
                Some(name.clone()),
                &[self.feed.everything().to_owned()],
                self.cursor.position + 1,
                LIVE_INACTIVE,
            )
            .await?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(LIVE_BATCH)
            .heartbeat(Duration::from_secs(2))
            .expires(Duration::from_secs(10))
            .messages()
            .await
            .map_err(BusError::nats)?;
        self.cursor.count = 0;
        Ok(Current {
            name,
            consumer,
            messages,
        })
    }
}

/// What a device missed on one feed, read in stream order through an
/// ephemeral consumer of its own, with nothing missing: a jump in the
/// delivery count (a delivery lost on the way, a stranger's pull) makes it
/// read again from the last stream sequence it handed on.
pub struct CatchUp {
    bus: Bus,
    feed: Feed,
    filters: Vec<String>,
    cursor: Cursor,
    consumer: Option<consumer::Consumer<consumer::pull::Config>>,
}

/// One read of a [`CatchUp`].
pub struct Batch {
    /// New messages, in stream order.
    pub messages: Vec<LiveMessage>,
    /// Nothing more matched the filters when the stream answered.
    pub caught_up: bool,
}

impl CatchUp {
    /// The stream sequence last handed on.
    pub fn position(&self) -> u64 {
        self.cursor.position
    }

    /// The name of the consumer it reads through, if it has one now.
    pub fn consumer_name(&self) -> Option<String> {
        self.consumer.as_ref().map(|c| c.cached_info().name.clone())
    }

    /// Reads again after stream sequence `to` (something handed on could
    /// not be used yet).
    pub fn rewind(&mut self, to: u64) {
        self.cursor.position = to;
        self.consumer = None;
    }

    /// Up to `max` messages of what is there now; a read that takes longer
    /// than a few seconds is given up and made again.
    pub async fn next_batch(&mut self, max: usize) -> Result<Batch, BusError> {
        match tokio::time::timeout(CATCH_UP_READ, self.read(max)).await {
            Ok(read) => read,
            Err(_) => {
                self.consumer = None;
                Err(BusError::Unavailable(
                    "a catch-up read took too long".into(),
                ))
            }
        }
    }

    async fn read(&mut self, max: usize) -> Result<Batch, BusError> {
        let consumer = match &mut self.consumer {
            Some(c) => c,
            None => {
                let c = self
                    .bus
                    .reader_consumer(
                        self.feed,
                        None,
                        &self.filters,
                        self.cursor.position + 1,
                        CATCH_UP_INACTIVE,
                    )
                    .await?;
                self.cursor.count = 0;
                let nothing = c.cached_info().num_pending == 0;
                // a fresh consumer's count of what matches: none means the
                // device has it all, with no pull at all
                let c = self.consumer.insert(c);
                if nothing {
                    return Ok(Batch {
                        messages: Vec::new(),
                        caught_up: true,
                    });
                }
                c
            }
        };
        let mut fetched = match consumer.fetch().max_messages(max).messages().await {
            Ok(f) => f,
            Err(e) => {
                self.consumer = None;
                return Err(BusError::nats(e));
            }
        };
        let mut messages = Vec::new();
        let mut received = 0;
        while let Some(next) = fetched.next().await {
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, feed = self.feed.label(), "catch-up read ended early; reading again from its place");
                    self.consumer = None;
                    return Ok(Batch {
                        messages,
                        caught_up: false,
                    });
                }
            };
            received += 1;
            if let Ok(info) = msg.info() {
                metrics::histogram!("chat_consumer_pending", "feed" => self.feed.label())
                    .record(info.pending as f64);
            }
            match self.cursor.step(msg) {
                Step::New(msg) => messages.push(msg),
                Step::Seen => {}
                Step::Lost { expected, got } => {
                    metrics::counter!("chat_delivery_gaps_total", "feed" => self.feed.label())
                        .increment(1);
                    tracing::warn!(
                        feed = self.feed.label(),
                        expected,
                        got,
                        position = self.cursor.position,
                        "catch-up deliveries lost on the way; reading again from its place"
                    );
                    self.consumer = None;
                    return Ok(Batch {
                        messages,
                        caught_up: false,
                    });
                }
            }
        }
        Ok(Batch {
            messages,
            caught_up: received < max,
        })
    }
}

/// Where a reader of an unacknowledged consumer is: the stream sequence it
/// handed on last, and the deliveries of its current consumer. Such a
/// consumer's delivery count rises by exactly one per delivery, so a jump
/// means deliveries that never arrived.
struct Cursor {
    position: u64,
    count: u64,
}

/// What a delivery is to a [`Cursor`].
enum Step {
    /// New: hand it on.
    New(LiveMessage),
    /// Handed on before (a new consumer gave it again), or unreadable.
    Seen,
    /// Deliveries from `expected` on never arrived (`got` did): read again
    /// from the position with a new consumer.
    Lost { expected: u64, got: u64 },
}

impl Cursor {
    fn step(&mut self, msg: async_nats::jetstream::Message) -> Step {
        let Ok(info) = msg.info() else {
            return Step::Seen;
        };
        let (count, stream_seq) = (info.consumer_sequence, info.stream_sequence);
        if count != self.count + 1 {
            return Step::Lost {
                expected: self.count + 1,
                got: count,
            };
        }
        self.count = count;
        if stream_seq <= self.position {
            return Step::Seen;
        }
        self.position = stream_seq;
        let msg = msg.split().0;
        Step::New(LiveMessage {
            stream_seq,
            subject: msg.subject,
            payload: msg.payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_subjects_say_what_they_carry() {
        assert_eq!(
            GroupTraffic::of("chat.group.g_1-x.msg"),
            Some(GroupTraffic::Message("g_1-x"))
        );
        assert_eq!(
            GroupTraffic::of("chat.group.g.event"),
            Some(GroupTraffic::Event("g"))
        );
        assert_eq!(
            GroupTraffic::of("chat.group.g.event.u_1"),
            Some(GroupTraffic::Event("g"))
        );
        assert_eq!(GroupTraffic::of("chat.group.g.other"), None);
        assert_eq!(GroupTraffic::of("chat.group..msg"), None);
        assert_eq!(GroupTraffic::of("chat.group.g.event."), None);
        assert_eq!(GroupTraffic::of("chat.group.g.event.u.v"), None);
        assert_eq!(GroupTraffic::of("chat.user.u.event"), None);
        let g = GroupId::parse("abc").expect("group");
        let u = UserId::parse("u_1").expect("user");
        assert_eq!(
            GroupTraffic::of(&member_event_subject(&g, &u)),
            Some(GroupTraffic::Event("abc"))
        );
    }

    #[test]
    fn member_event_subjects_are_injective() {
        let pairs = [("a", "b_c"), ("a_b", "c"), ("a-b", "c"), ("a", "b-c")];
        let subjects: std::collections::HashSet<String> = pairs
            .iter()
            .map(|(g, u)| {
                let g = GroupId::parse(*g).expect("group");
                let u = UserId::parse(*u).expect("user");
                member_event_subject(&g, &u)
            })
            .collect();
        assert_eq!(subjects.len(), pairs.len());
        for (g, u) in pairs {
            let subject = member_event_subject(
                &GroupId::parse(g).expect("group"),
                &UserId::parse(u).expect("user"),
            );
            assert_eq!(GroupTraffic::of(&subject), Some(GroupTraffic::Event(g)));
            assert!(subject.ends_with(&format!(".event.{u}")));
        }
    }

    #[test]
    fn feed_subjects_split_back_into_their_keys() {
        for (feed, key) in [(Feed::User, "u_1"), (Feed::Groups, "g-2")] {
            assert_eq!(feed.key_of(&feed.message_subject(key)), Some(key));
        }
        let filters = Feed::Groups.catch_up_filters(&["a".into(), "b".into()]);
        assert_eq!(filters, ["chat.group.a.>", "chat.group.b.>"]);
        assert_eq!(
            Feed::User.catch_up_filters(&["u".into()]),
            ["chat.user.u.event"]
        );
        assert_eq!(Feed::User.key_of("chat.user.a.b.event"), None);
        assert_eq!(Feed::User.key_of("chat.group.a.msg"), None);
        let u = UserId::parse("u_1").expect("user");
        assert_eq!(Feed::User.message_subject("u_1"), crate::user_subject(&u));
    }

    #[test]
    fn membership_events_round_trip() {
        let e = MembershipEvent {
            user_id: "u_1".into(),
            subscribed: false,
        };
        let json = serde_json::to_string(&e).expect("json");
        assert_eq!(json, r#"{"userId":"u_1","subscribed":false}"#);
        assert_eq!(
            serde_json::from_str::<MembershipEvent>(&json).expect("parse"),
            e
        );
    }
}
