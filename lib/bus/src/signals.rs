//! Signals: ephemeral group events (typing from edges, reaction changes
//! from workers) passed to every edge over core NATS, on
//! `chat.signal.<groupId>`; and message statuses (`a_message_status`, from
//! workers only) for some members of a group, on `chat.status.<groupId>`
//! with the members named in a header ([`SIGNAL_TO`]).
//!
//! Never stored and never acknowledged: an edge that is disconnected while
//! one passes misses it, which is what an ephemeral event may do (each
//! carries its own expiry). Every edge subscribes once to all of them
//! ([`GROUP_SIGNALS`]), so one signal costs nats-server one delivery per
//! edge, whatever the size of the group. The payload is the push frame as
//! the receiving connections get it, written by the sender's edge from its
//! verified identity; the sender rides in a header ([`SIGNAL_FROM`]) so that
//! edges skip the sender's own connections without parsing the frame (a
//! signal without it reaches every connection of the group). A signal
//! about one message (a reaction) names its `seq` in a header
//! ([`SIGNAL_ABOUT`]) when the group shows members only what follows their
//! joining: an edge then passes it only to connections whose member's view
//! of the history holds that message. Only edges and workers may publish
//! signals, and only workers statuses (`nats/auth.conf`); edges drop a
//! signal that carries anything but typing or a reaction: an edge cannot
//! tell a sender that someone read its message. A status on a subject of
//! its own also keeps it from edges of a release before it, which would
//! have passed it to every member.

use async_nats::HeaderMap;
use bytes::Bytes;
use chat_domain::{GroupId, UserId};

use crate::{Bus, BusError};

/// Every group's signals.
pub const GROUP_SIGNALS: &str = "chat.signal.*";
/// Every group's message statuses.
pub const GROUP_STATUSES: &str = "chat.status.*";
/// The header naming the only users whose connections take a status
/// (comma-separated; ids never contain a comma).
pub const SIGNAL_TO: &str = "Chat-To";
/// Most users one status names ([`SIGNAL_TO`]); a worker sends more as
/// several.
pub const SIGNAL_TO_MAX: usize = 100;
/// The header naming the user a signal is from.
pub const SIGNAL_FROM: &str = "Chat-From";
/// The header naming the `seq` of the message a signal is about, for
/// connections whose view of the history starts after it to skip.
pub const SIGNAL_ABOUT: &str = "Chat-Seq";
/// The largest signal an edge passes on; larger ones are dropped.
pub const SIGNAL_MAX_BYTES: usize = 1024;

const PREFIX: &str = "chat.signal.";
const STATUS_PREFIX: &str = "chat.status.";

/// The subject of `group`'s signals (injective: ids never contain `.`).
pub fn group_signal_subject(group: &GroupId) -> String {
    format!("{PREFIX}{group}")
}

/// The subject of `group`'s message statuses.
pub fn group_status_subject(group: &GroupId) -> String {
    format!("{STATUS_PREFIX}{group}")
}

/// A signal as an edge received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signal {
    pub group: GroupId,
    /// Whose connections skip it, if anyone's.
    pub from: Option<UserId>,
    /// The `seq` of the message it is about, if members who joined after
    /// that message must not see it.
    pub about: Option<u64>,
    /// The only users whose connections take it (a status); empty: every
    /// connection that follows the group (a signal).
    pub to: Vec<UserId>,
    /// The push frame, ready to write.
    pub frame: Bytes,
}

/// Why a message on the signal subjects was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSignal {
    #[error("not a group signal subject")]
    Subject,
    #[error("no valid {SIGNAL_FROM} header")]
    From,
    #[error("no valid {SIGNAL_ABOUT} header")]
    About,
    #[error("a status without a valid {SIGNAL_TO} header of 1 to {SIGNAL_TO_MAX} users")]
    To,
    #[error("larger than {SIGNAL_MAX_BYTES} bytes or not UTF-8")]
    Payload,
}

impl Signal {
    /// Reads a signal off its subject, header and payload.
    pub fn read(
        subject: &str,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
    ) -> Result<Self, BadSignal> {
        let (group, status) = match subject.strip_prefix(STATUS_PREFIX) {
            Some(g) => (g, true),
            None => (
                subject.strip_prefix(PREFIX).ok_or(BadSignal::Subject)?,
                false,
            ),
        };
        let group = GroupId::parse(group).map_err(|_| BadSignal::Subject)?;
        // a status names whom it is for; a signal names no one
        let to = match (status, headers.and_then(|h| h.get(SIGNAL_TO))) {
            (true, Some(v)) => {
                let to = v
                    .as_str()
                    .split(',')
                    .map(UserId::parse)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| BadSignal::To)?;
                if to.len() > SIGNAL_TO_MAX {
                    return Err(BadSignal::To);
                }
                to
            }
            (true, None) => return Err(BadSignal::To),
            (false, _) => Vec::new(),
        };
        let from = match headers.and_then(|h| h.get(SIGNAL_FROM)) {
            None => None,
            Some(v) => Some(UserId::parse(v.as_str()).map_err(|_| BadSignal::From)?),
        };
        let about = match headers.and_then(|h| h.get(SIGNAL_ABOUT)) {
            None => None,
            Some(v) => Some(v.as_str().parse().map_err(|_| BadSignal::About)?),
        };
        if payload.len() > SIGNAL_MAX_BYTES || std::str::from_utf8(payload).is_err() {
            return Err(BadSignal::Payload);
        }
        Ok(Self {
            group,
            from,
            about,
            to,
            frame: payload.clone(),
        })
    }
}

impl Bus {
    /// Publishes `frame` to every edge as a signal of `group`, skipping
    /// `from`'s connections if given, and those whose view of the history
    /// starts after `about` if given. Core NATS: it is buffered and sent,
    /// never confirmed.
    pub async fn signal(
        &self,
        group: &GroupId,
        from: Option<&UserId>,
        about: Option<u64>,
        frame: Bytes,
    ) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        if let Some(from) = from {
            headers.insert(SIGNAL_FROM, from.as_str());
        }
        if let Some(seq) = about {
            headers.insert(SIGNAL_ABOUT, seq.to_string().as_str());
        }
        self.client
            .publish_with_headers(group_signal_subject(group), headers, frame)
            .await
            .map_err(BusError::nats)
    }

    /// Publishes the status `frame` of `group` to the connections of `to`
    /// that follow the group (workers), as many statuses as it takes to
    /// name at most [`SIGNAL_TO_MAX`] users in each. Core NATS, like a
    /// signal: buffered and sent, never confirmed, never stored.
    pub async fn status(
        &self,
        group: &GroupId,
        to: &[&UserId],
        frame: Bytes,
    ) -> Result<(), BusError> {
        for some in to.chunks(SIGNAL_TO_MAX) {
            let names: Vec<&str> = some.iter().map(|u| u.as_str()).collect();
            let mut headers = HeaderMap::new();
            headers.insert(SIGNAL_TO, names.join(",").as_str());
            self.client
                .publish_with_headers(group_status_subject(group), headers, frame.clone())
                .await
                .map_err(BusError::nats)?;
        }
        Ok(())
    }

    /// Every group's signals and statuses, for an edge's lifetime (the
    /// client subscribes again by itself after a reconnect).
    pub async fn signals(
        &self,
    ) -> Result<impl futures::Stream<Item = async_nats::Message> + Unpin + use<>, BusError> {
        let signals = self
            .client
            .subscribe(GROUP_SIGNALS)
            .await
            .map_err(BusError::nats)?;
        let statuses = self
            .client
            .subscribe(GROUP_STATUSES)
            .await
            .map_err(BusError::nats)?;
        Ok(futures::stream::select(signals, statuses))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(user: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(SIGNAL_FROM, user);
        h
    }

    #[test]
    fn a_signal_is_read_back_from_its_subject_and_header() {
        let g = GroupId::parse("g-1").expect("id");
        let subject = group_signal_subject(&g);
        let frame = Bytes::from_static(br#"{"event":"a_typing","data":{}}"#);
        let s = Signal::read(&subject, Some(&from("alice")), &frame).expect("reads");
        assert_eq!(s.group, g);
        assert_eq!(s.from.as_ref().map(UserId::as_str), Some("alice"));
        let to_all = Signal::read(&subject, None, &frame).expect("reads");
        assert_eq!(to_all.from, None);
        assert_eq!(s.frame, frame);
        assert_eq!(s.about, None);
        let mut h = HeaderMap::new();
        h.insert(SIGNAL_ABOUT, "42");
        let about = Signal::read(&subject, Some(&h), &frame).expect("reads");
        assert_eq!((about.from, about.about), (None, Some(42)));
        // a signal names no one, whatever its headers say
        let mut h = from("alice");
        h.insert(SIGNAL_TO, "bob");
        assert!(
            Signal::read(&subject, Some(&h), &frame)
                .expect("reads")
                .to
                .is_empty()
        );
    }

    #[test]
    fn a_status_is_for_the_users_it_names_only() {
        let g = GroupId::parse("g-1").expect("id");
        let subject = group_status_subject(&g);
        assert_eq!(subject, "chat.status.g-1");
        let frame = Bytes::from_static(br#"{"event":"a_message_status","data":{}}"#);
        let to = |names: &str| {
            let mut h = HeaderMap::new();
            h.insert(SIGNAL_TO, names);
            Signal::read(&subject, Some(&h), &frame)
        };
        let s = to("alice,bob_2").expect("reads");
        assert_eq!(s.group, g);
        let names: Vec<&str> = s.to.iter().map(UserId::as_str).collect();
        assert_eq!(names, ["alice", "bob_2"]);
        assert_eq!(s.from, None);
        // for no one, or anyone: refused
        assert_eq!(Signal::read(&subject, None, &frame), Err(BadSignal::To));
        assert_eq!(to(""), Err(BadSignal::To));
        assert_eq!(to("alice,"), Err(BadSignal::To));
        assert_eq!(to("alice,b.c"), Err(BadSignal::To));
        let most: Vec<String> = (0..SIGNAL_TO_MAX).map(|i| format!("u{i}")).collect();
        assert_eq!(
            to(&most.join(",")).expect("the most").to.len(),
            SIGNAL_TO_MAX
        );
        let over = format!("{},extra", most.join(","));
        assert_eq!(to(&over), Err(BadSignal::To));
        assert_eq!(
            Signal::read("chat.status.a.b", Some(&from("x")), &frame),
            Err(BadSignal::Subject)
        );
    }

    #[test]
    fn malformed_signals_are_refused() {
        let ok = Bytes::from_static(b"{}");
        let h = from("alice");
        assert_eq!(
            Signal::read("chat.signal.a.b", Some(&h), &ok),
            Err(BadSignal::Subject)
        );
        assert_eq!(
            Signal::read("chat.other.g", Some(&h), &ok),
            Err(BadSignal::Subject)
        );
        assert_eq!(
            Signal::read("chat.signal.g", Some(&from("a.b")), &ok),
            Err(BadSignal::From)
        );
        let mut bad_seq = from("alice");
        bad_seq.insert(SIGNAL_ABOUT, "-1");
        assert_eq!(
            Signal::read("chat.signal.g", Some(&bad_seq), &ok),
            Err(BadSignal::About)
        );
        let big = Bytes::from(vec![b'x'; SIGNAL_MAX_BYTES + 1]);
        assert_eq!(
            Signal::read("chat.signal.g", Some(&h), &big),
            Err(BadSignal::Payload)
        );
        let binary = Bytes::from_static(&[0xff, 0xfe]);
        assert_eq!(
            Signal::read("chat.signal.g", Some(&h), &binary),
            Err(BadSignal::Payload)
        );
    }
}
