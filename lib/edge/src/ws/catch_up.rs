//! Catching a device up from its place, and the hand-over to the live feed.
//!
//! On connect each feed (the user's notifications, the user's groups) asks
//! the hub first: if no key the connection covers has a message after the
//! device's place, it attaches at once, with no call to NATS (the common
//! case of a reconnect, and of a new device). Otherwise it reads what came
//! after the place through a short-lived consumer filtered on those keys
//! (`chat_bus::CatchUp`) and, once that has nothing more, attaches at the
//! furthest of what it read and where the hub was before the last read: the
//! catch-up covers its keys up to there, the hub holds everything after.

use std::collections::HashSet;

use chat_bus::{CatchUp, GroupTraffic, MembershipEvent};

use super::*;
use crate::live::Newest;

/// Most messages one read asks for.
pub(super) const PULL_BATCH: usize = 256;
/// How long a delivery may wait for room in a client's queue.
pub(super) const SLOW_CLIENT: Duration = Duration::from_secs(30);

/// One feed's catch-up of one connection.
pub(super) struct CatchUpTask {
    pub(super) app: AppState,
    pub(super) feed: Feed,
    pub(super) user: UserId,
    /// The connection's place in this feed's hub.
    pub(super) reg: Arc<Registration>,
    /// The device's saved place in this feed; `None`: it has none.
    pub(super) place: Option<u64>,
    /// Where the hub was when the connection registered (a new device
    /// starts there); `None` if it was not reading yet.
    pub(super) joined_at: Option<u64>,
    pub(super) tx: Outbox,
    pub(super) stop: watch::Receiver<bool>,
    pub(super) visibility: Arc<Visibility>,
    pub(super) saver: Arc<Saver>,
}

impl CatchUpTask {
    pub(super) async fn run(mut self) {
        // the hub must be reading: its position and its newest marks
        while !self.reg.running() {
            if !pause(Duration::from_millis(100), &mut self.stop).await {
                return;
            }
        }
        let start = match (self.place, self.feed) {
            (Some(place), _) => place,
            // a new device hears of every notification still stored (its
            // user may have been offline since before it existed)...
            (None, Feed::User) => 0,
            // ...and of group messages from when it connected (older ones
            // are history)
            (None, Feed::Groups) => self
                .joined_at
                .filter(|at| *at > 0)
                .unwrap_or_else(|| self.reg.hub_position()),
        };
        self.saver.starts_at(self.feed, start);
        let feed_was_at = self.reg.hub_position();
        // boxed: the task's cell is as large as its future and outlives
        // it (its handle waits for the session's end), so what runs only
        // while catching up is allocated only then
        let needed = Box::pin(self.missed(start)).await;
        if needed.is_empty() {
            match Box::pin(self.attach(start.max(feed_was_at), &[])).await {
                Some(HandOver::Done) | None => return,
                // held too much meanwhile: read it after all
                Some(_) => {}
            }
        }
        let keys = if needed.is_empty() {
            self.reg.following()
        } else {
            needed
        };
        Box::pin(self.read(keys, start)).await;
    }

    /// The keys this connection covers that have a message after `start`.
    async fn missed(&self, start: u64) -> Vec<String> {
        self.newer(self.reg.loaded(), start, u64::MAX).await
    }

    /// Of `keys`, those whose newest message is after `after` and at or
    /// before `upto`. Keys the hub cannot vouch for are looked up in the
    /// stream, all at once.
    async fn newer(&self, keys: Vec<String>, after: u64, upto: u64) -> Vec<String> {
        let mut needed = Vec::new();
        let mut unknown = Vec::new();
        for key in keys {
            match self.reg.newest(&key) {
                Some(Newest::At(at) | Newest::AtMost(at)) if at <= after => {}
                Some(Newest::At(at)) if at <= upto => needed.push(key),
                Some(Newest::At(_)) => {}
                // the hub has not seen it since it started
                _ => unknown.push(key),
            }
        }
        let bus = &self.app.bus;
        let subjects: Vec<String> = unknown
            .iter()
            .map(|k| self.feed.message_subject(k))
            .collect();
        let newest = futures::future::join_all(
            subjects
                .iter()
                .map(|subject| bus.newest_on(self.feed, subject)),
        )
        .await;
        for (key, newest) in unknown.into_iter().zip(newest) {
            match newest {
                Ok(at) if at <= after || at > upto => {}
                Ok(_) => needed.push(key),
                Err(e) => {
                    tracing::debug!(error = %e, key, "cannot tell what a key has after the device's place; reading it");
                    needed.push(key);
                }
            }
        }
        needed.sort_unstable();
        needed
    }

    /// Reads `keys` after `start` until caught up, then attaches.
    async fn read(mut self, mut keys: Vec<String>, start: u64) {
        let mut reader: CatchUp =
            self.app
                .bus
                .catch_up(self.feed, self.feed.catch_up_filters(&keys), start);
        // after widening to more keys: what was already handed on of the
        // keys read before, which the new reader gives again
        let mut sent: Option<(HashSet<String>, u64)> = None;
        // groups the user left or was removed from, as met in the stream
        let mut left: HashSet<String> = HashSet::new();
        let mut backoff = Duration::from_millis(100);
        // short reads that ended before a message the hub has seen
        let mut lagging = 0u32;
        loop {
            // read before the stream answers: with nothing more after the
            // read, the device has everything of its keys up to here
            let feed_was_at = self.reg.hub_position();
            let batch = match reader.next_batch(PULL_BATCH).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, feed = self.feed.label(), "cannot read what the device missed; retrying");
                    if !pause(backoff, &mut self.stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // taken before the batch's frames are queued, so each carries a
            // place of its own: a session that ends before the attach (a
            // client that closes once it has what it missed) keeps what it
            // was written. Frames the hub holds later are all after this.
            let unheld = self.reg.unheld_through(&keys).unwrap_or(0);
            let mut rewound = false;
            let mut handed = None;
            for msg in batch.messages {
                if let Some((before, through)) = &sent
                    && msg.stream_seq <= *through
                    && self
                        .feed
                        .key_of(&msg.subject)
                        .is_some_and(|k| before.contains(k))
                {
                    handed = Some(msg.stream_seq);
                    continue;
                }
                let frame = match self.frame(&msg, &mut left, unheld).await {
                    Ok(Some(frame)) => frame,
                    Ok(None) => {
                        handed = Some(msg.stream_seq);
                        continue;
                    }
                    Err(()) => {
                        // not handed on: read again from before it
                        let before = handed.unwrap_or(msg.stream_seq - 1);
                        reader.rewind(before);
                        rewound = true;
                        if !pause(backoff, &mut self.stop).await {
                            return;
                        }
                        break;
                    }
                };
                let sent = tokio::select! {
                    sent = tokio::time::timeout(SLOW_CLIENT, self.tx.send(Outgoing::Live(frame))) => sent,
                    _ = self.stop.changed() => return,
                };
                match sent {
                    Ok(Ok(())) => {}
                    // the session is over
                    Ok(Err(())) => return,
                    Err(_) => {
                        self.tx
                            .close_now(CLOSE_TOO_SLOW, "client too slow; reconnect");
                        return;
                    }
                }
                handed = Some(msg.stream_seq);
            }
            if batch.caught_up && !rewound {
                // a short read says "nothing more" as the consumer's own
                // replica sees the stream: on a NATS node that came back
                // and is still catching up, that is short of the stream.
                // A key whose newest message (as the hub saw it live, or
                // the stream's leader says) lies between the read and the
                // hub's position would be skipped by the attach: read on
                // (seen in a fault test: 30 messages lost to a device)
                let through = reader.position();
                if through < feed_was_at
                    && !Box::pin(self.newer(keys.clone(), through, feed_was_at))
                        .await
                        .is_empty()
                {
                    lagging += 1;
                    metrics::counter!("chat_catch_up_lagging_reads_total").increment(1);
                    tracing::warn!(
                        through,
                        feed_was_at,
                        lagging,
                        feed = self.feed.label(),
                        "a catch-up read ended before the stream's end; reading on"
                    );
                    if lagging.is_multiple_of(5) {
                        // another consumer, perhaps on an up-to-date replica
                        reader.rewind(through);
                    }
                    if !pause(backoff, &mut self.stop).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
                lagging = 0;
                match self.attach(reader.position().max(feed_was_at), &keys).await {
                    Some(HandOver::Done) | None => return,
                    Some(HandOver::More) => {
                        // the hub let go of what it held, of every key: a
                        // key this reader does not read (followed since it
                        // began) must be read from the start too
                        let now = self.reg.following();
                        if !now.iter().all(|k| keys.contains(k)) {
                            let before: HashSet<String> = keys.iter().cloned().collect();
                            sent = Some((before, reader.position()));
                            keys.extend(now);
                            keys.sort_unstable();
                            keys.dedup();
                            // (`left` stays: what it holds was met up to
                            // the old reader's place, which the new one
                            // skips for those keys)
                            reader = self.app.bus.catch_up(
                                self.feed,
                                self.feed.catch_up_filters(&keys),
                                start,
                            );
                        }
                    }
                    Some(HandOver::Wait) => {}
                }
            }
        }
    }

    /// The frame of a message the catch-up read, whose place stops at
    /// `unheld`; `Ok(None)`: nothing to write (an event, a group the user
    /// left, a message from before it joined); `Err`: it cannot be told yet
    /// whether the user may see it.
    async fn frame(
        &self,
        msg: &chat_bus::LiveMessage,
        left: &mut HashSet<String>,
        unheld: u64,
    ) -> Result<Option<LiveFrame>, ()> {
        let stream_seq = msg.stream_seq;
        if self.feed == Feed::User {
            return Ok(match std::str::from_utf8(&msg.payload) {
                Ok(text) => Some(LiveFrame {
                    text: Utf8Bytes::from(text),
                    group: Arc::from(self.user.as_str()),
                    seq: 0,
                    stream_seq,
                    feed: Feed::User,
                    caught_up: true,
                    place: stream_seq.min(unheld),
                    restricted: Restriction::None,
                }),
                Err(e) => {
                    tracing::error!(stream_seq, error = %e, "undeliverable notification on the bus; skipping it");
                    None
                }
            });
        }
        let group = match GroupTraffic::of(&msg.subject) {
            Some(GroupTraffic::Message(group)) => group,
            Some(GroupTraffic::Event(group)) => {
                if let Ok(e) = serde_json::from_slice::<MembershipEvent>(&msg.payload)
                    && e.user_id == self.user.as_str()
                {
                    if e.subscribed {
                        left.remove(group);
                    } else {
                        left.insert(group.to_owned());
                    }
                }
                return Ok(None);
            }
            None => return Ok(None),
        };
        if left.contains(group) {
            return Ok(None);
        }
        let opened = match opened_at(&self.app, stream_seq, &msg.payload) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(group, stream_seq, error = %e, "undeliverable group message on the bus; skipping it");
                return Ok(None);
            }
        };
        // from before the user joined a group with `joined` history
        let hides = |seq| self.visibility.hides(&self.app, &self.user, group, seq);
        match hides(opened.seq).await {
            Ok(true) => return Ok(None),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, group, "cannot tell whether a message predates the member; reading it again");
                return Err(());
            }
        }
        // a reply to a message from before then goes without it
        let text = match opened.restriction {
            Restriction::Reply(reply) => match hides(reply.0).await {
                Ok(false) => opened.text,
                Ok(true) => reply.1.clone(),
                Err(e) => {
                    tracing::warn!(error = %e, group, "cannot tell whether an answered message predates the member; reading it again");
                    return Err(());
                }
            },
            Restriction::None | Restriction::Change => opened.text,
        };
        // and one sent before what it answers changed shows that as it is
        let text = match &opened.answers {
            Some(view) => answered_now(&self.app, &self.user, group, view, text).await,
            None => text,
        };
        Ok(Some(LiveFrame {
            text,
            group: Arc::from(group),
            seq: opened.seq,
            stream_seq,
            feed: Feed::Groups,
            caught_up: true,
            place: stream_seq.min(unheld),
            // checked above
            restricted: Restriction::None,
        }))
    }

    /// Attaches at `through`, having read `read`; `None` once the session
    /// stopped.
    async fn attach(&mut self, through: u64, read: &[String]) -> Option<HandOver> {
        loop {
            match attach(&self.reg, self.feed, (through, read), &self.tx).await {
                HandOver::Wait => {
                    if !pause(Duration::from_millis(100), &mut self.stop).await {
                        return None;
                    }
                }
                other => return Some(other),
            }
        }
    }
}

/// Waits `d`; false if the session stopped meanwhile.
async fn pause(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.changed() => false,
    }
}

/// Where a catch-up stands after trying to attach.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HandOver {
    /// Attached to the live feed: the catch-up is over.
    Done,
    /// More to read first (the hub held too much meanwhile).
    More,
    /// Try again shortly (the live feed is not reading yet).
    Wait,
}

/// Attaches a connection caught up to stream sequence `through` in the
/// keys it `read`. Once written, the device's place may move to where
/// everything of every key is queued: `through`, or where the hub was if
/// that is earlier (frames of keys the catch-up did not read, up to
/// `through`, may still come from the hub).
pub(super) async fn attach(
    live: &Registration,
    feed: Feed,
    (through, read): (u64, &[String]),
    tx: &Outbox,
) -> HandOver {
    match live.attach(through, read) {
        Ok(hub_was_at) => {
            let _ = tx
                .send(Outgoing::Through(feed, through.min(hub_was_at)))
                .await;
            HandOver::Done
        }
        Err(NotYet::Overflowed) => HandOver::More,
        Err(NotYet::NotRunning) => HandOver::Wait,
        Err(NotYet::Closed) => HandOver::Done,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::LiveHub;

    /// What the writer would get, in order: frames by stream sequence, and
    /// place markers.
    fn queued(inbox: &mut Inbox) -> Vec<String> {
        std::iter::from_fn(|| inbox.rx.try_recv())
            .map(|(out, _)| match out {
                Outgoing::Live(f) => format!("{}@{}", f.group, f.stream_seq),
                Outgoing::Through(feed, at) => format!("through {} {at}", feed.label()),
                Outgoing::Frame(_) | Outgoing::Signal(_) => "frame".into(),
                Outgoing::Close(code, _) => format!("close {code}"),
            })
            .collect()
    }

    #[tokio::test]
    async fn the_place_marker_stops_where_the_hub_was_when_the_catch_up_is_ahead() {
        let hub = Arc::new(LiveHub::new(Feed::Groups));
        hub.start(0);
        let (tx, mut inbox) = Outbox::new(16, 1 << 20);
        let reg = hub.register("ann", Arc::new(tx.clone()));
        reg.load(&["a".to_owned(), "h".to_owned()]).expect("load");
        let send = |at: u64, group: &str| {
            hub.message::<()>(at, group, || {
                Ok((Utf8Bytes::from("m"), at, Restriction::None))
            })
            .expect("open");
        };
        send(2, "a");
        send(3, "h");
        // the catch-up read `a` up to 10, ahead of the hub (at 3): `h`'s
        // frame up to 10 may still come from the hub, so the place may move
        // to 3 only
        let read = ["a".to_owned()];
        assert_eq!(
            attach(&reg, Feed::Groups, (10, &read), &tx).await,
            HandOver::Done
        );
        send(7, "h");
        send(8, "a");
        send(11, "a");
        assert_eq!(
            queued(&mut inbox),
            ["h@3", "through groups 3", "h@7", "a@11"],
            "a@2 and a@8 came from the catch-up"
        );
    }

    #[tokio::test]
    async fn attaching_before_the_feed_reads_waits_and_a_full_hold_reads_on() {
        let hub = Arc::new(LiveHub::new(Feed::User));
        let (tx, _inbox) = Outbox::new(16, 1 << 20);
        let reg = hub.register("ann", Arc::new(tx.clone()));
        reg.load(&["ann".to_owned()]).expect("load");
        assert_eq!(
            attach(&reg, Feed::User, (0, &[]), &tx).await,
            HandOver::Wait
        );
        hub.start(0);
        for at in 1..=5000 {
            hub.message::<()>(at, "ann", || {
                Ok((Utf8Bytes::from("n"), 0, Restriction::None))
            })
            .expect("open");
        }
        assert_eq!(
            attach(&reg, Feed::User, (0, &[]), &tx).await,
            HandOver::More
        );
    }
}
