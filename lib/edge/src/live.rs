//! Live fan-out: every group message and every notification reaches this
//! edge once and is written to every local connection that should get it.
//!
//! One task per edge and stream reads all of it in stream order
//! ([`chat_bus::LiveReader`]: one delivery per message per edge in
//! nats-server, whatever the number of members or devices) and hands it to
//! a [`LiveHub`], which knows each local connection's keys: the groups it
//! follows (group hub), or its user (notification hub). A group message is
//! opened (decrypted and serialised) once, when at least one local
//! connection follows its group, and queued on each of those connections
//! without waiting: a connection whose queue is full is closed as too slow
//! and resumes from its place on reconnect. Membership events
//! (`chat.group.<g>.event.<user>`) change who follows a group, in the group's order.
//!
//! A connection goes through three phases: it **registers** before its
//! session opens (membership events from then on are kept and replayed over
//! the groups the session returns), **holds** what arrives while its device
//! catches up from its place, and **attaches** at the stream sequence the
//! catch-up reached: what it held after that goes out, and from then on
//! everything comes live. Per connection nothing is lost, repeated or
//! reordered at the hand-over (the catch-up covers its keys up to the attach
//! point, the hub everything after it, and all of a key followed only after
//! the catch-up began).
//!
//! The hub also knows the stream sequence of the newest message of every
//! key it has seen ([`Registration::newest`]), so a reconnecting device
//! whose keys have nothing after its place attaches at once, with no call
//! to NATS.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::extract::ws::Utf8Bytes;
use chat_bus::{Feed, GroupTraffic, MembershipEvent};
use chat_domain::UserId;

/// A group message as written to a connection.
#[derive(Clone, Debug)]
pub(crate) struct LiveFrame {
    pub text: Utf8Bytes,
    /// The group (group hub) or user (notification hub).
    pub group: Arc<str>,
    /// The group's `seq` (0 for a notification).
    pub seq: u64,
    pub stream_seq: u64,
    pub feed: Feed,
    /// Read by a catch-up, not the live feed (for metrics).
    pub caught_up: bool,
    /// The device's place in its feed once this is written: the stream
    /// sequence of a live frame; for a caught-up one, short of the frames
    /// of other keys the hub holds for the attach (see
    /// [`Registration::unheld_through`]).
    pub place: u64,
    /// What the writer checks of the connection's view of the group
    /// before it goes out (a catch-up checked it already).
    pub restricted: Restriction,
}

/// What a group message from the live feed shows only to some of the
/// group's members, in a group with `joined` history (each sees only what
/// followed its addition).
#[derive(Clone, Debug, Default)]
pub(crate) enum Restriction {
    /// Nothing: it goes to every connection that follows the group.
    #[default]
    None,
    /// All of it: a change of the message at the frame's `seq` reaches
    /// only connections whose view of the group starts at or before it.
    Change,
    /// What it answers: a reply to the message at the `seq` this holds
    /// goes as the frame it holds, without what it answers, to a
    /// connection whose view of the group starts after that message
    /// (shared: a queued frame stays small).
    Reply(Arc<(u64, Utf8Bytes)>),
}

/// An ephemeral frame (typing, presence, a reaction) as queued on a
/// connection.
#[derive(Clone, Debug)]
pub(crate) struct SignalFrame {
    pub text: Utf8Bytes,
    /// The group and `seq` of the message it is about, if members whose
    /// view of the group's history starts after it must not see it: the
    /// writer checks the connection's view before it goes out.
    pub about: Option<(Arc<str>, u64)>,
}

impl From<Utf8Bytes> for SignalFrame {
    fn from(text: Utf8Bytes) -> Self {
        Self { text, about: None }
    }
}

/// Where the hub hands a connection its frames; implemented by the
/// connection's outbox.
pub(crate) trait Sink: Send + Sync {
    /// Queues `frame` without waiting; `Err(true)` if the queue is full (the
    /// connection is closed as too slow), `Err(false)` if the connection is
    /// gone.
    fn offer(&self, frame: LiveFrame) -> Result<(), bool>;

    /// Queues an ephemeral frame (a signal) if there is room; whether it
    /// was queued. A full queue drops it and closes nothing: signals expire
    /// on their own and nobody resumes them.
    fn offer_signal(&self, frame: SignalFrame) -> bool;

    /// The connection follows `group` from here (again, perhaps: what was
    /// known of its view of the group's history may be out of date).
    fn followed(&self, _group: &str) {}
}

/// Frames a catching-up connection may hold; past it, the catch-up goes on
/// from the durable consumer until it overtakes the live feed again.
const HOLD_MAX: usize = 4096;
/// Bytes of frames a catching-up connection may hold, as for `HOLD_MAX`:
/// thousands of the largest messages would otherwise stay pinned for as
/// long as a slow catch-up lasts (the frames are shared, but a user in
/// groups of its own makes them all its own).
const HOLD_MAX_BYTES: usize = 8 << 20;
/// Membership events kept for a connection whose groups are not loaded yet.
const EARLY_MAX: usize = 256;
/// Keys whose newest stream sequence the hub remembers; past it, it forgets
/// them all and knows only that none is newer than where it was then.
const TAILS_MAX: usize = 200_000;

enum Phase {
    /// Catching up: frames are held until the attach point is known.
    Holding(Held),
    /// Held too much: the catch-up must go on past the live feed.
    Overflowed,
    /// Everything after `skip_through` goes straight to the sink.
    Live { skip_through: u64 },
    /// Closed as too slow, or gone.
    Closed,
}

/// The frames a catching-up connection holds, and their bytes.
#[derive(Default)]
struct Held {
    frames: VecDeque<LiveFrame>,
    bytes: usize,
}

impl Held {
    /// Holds `frame` if it fits within `HOLD_MAX` and `HOLD_MAX_BYTES`.
    fn hold(&mut self, frame: &LiveFrame) -> bool {
        let bytes = self.bytes + frame.bytes();
        if self.frames.len() >= HOLD_MAX || bytes > HOLD_MAX_BYTES {
            return false;
        }
        self.bytes = bytes;
        self.frames.push_back(frame.clone());
        true
    }
}

impl LiveFrame {
    /// What its text holds in memory (a reply's second frame too).
    fn bytes(&self) -> usize {
        self.text.len() + self.restricted.bytes()
    }
}

impl Restriction {
    /// The bytes of the second frame a reply keeps.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Restriction::Reply(reply) => reply.1.len(),
            Restriction::None | Restriction::Change => 0,
        }
    }
}

struct Conn {
    user: Arc<str>,
    groups: HashSet<Arc<str>>,
    /// The groups followed when they were loaded: what a catch-up looks at.
    loaded: HashSet<Arc<str>>,
    /// The keys the catch-up read, set when it attaches: only their frames
    /// up to the attach point came from it and are skipped here.
    read: HashSet<Arc<str>>,
    /// Membership events seen before the groups were loaded, in order.
    early: Option<Vec<(Arc<str>, bool)>>,
    /// More than `EARLY_MAX` early events: the loaded groups can't be fixed.
    early_overflow: bool,
    phase: Phase,
    /// The stream sequence of the first frame holding too much let go of,
    /// until the attach: a catch-up's place stays before it.
    first_dropped: Option<u64>,
    sink: Arc<dyn Sink>,
}

#[derive(Default)]
struct Hub {
    next_id: u64,
    conns: HashMap<u64, Conn>,
    by_group: HashMap<Arc<str>, HashSet<u64>>,
    by_user: HashMap<Arc<str>, HashSet<u64>>,
    /// The newest stream sequence of each key's messages seen.
    tails: HashMap<Arc<str>, u64>,
    /// No key missing from `tails` has a message after this.
    floor: u64,
}

/// What the hub knows of a key's newest message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Newest {
    /// At this stream sequence.
    At(u64),
    /// At this stream sequence or before (the hub has not seen it since it
    /// started, or forgot it).
    AtMost(u64),
}

/// This edge's live connections and the keys they follow, for one feed.
pub(crate) struct LiveHub {
    feed: Feed,
    inner: Mutex<Hub>,
    /// The stream sequence handed on last.
    position: AtomicU64,
    /// Whether the feed reads the stream yet.
    running: AtomicBool,
}

/// Why a connection could not attach.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotYet {
    /// It held more than it may while catching up: catch up further.
    Overflowed,
    /// The live feed is not reading yet (NATS down since the edge started).
    NotRunning,
    /// The connection was closed.
    Closed,
}

/// Why the groups of a connection could not be loaded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TooManyChanges;

impl LiveHub {
    pub(crate) fn new(feed: Feed) -> Self {
        Self {
            feed,
            inner: Mutex::default(),
            position: AtomicU64::new(0),
            running: AtomicBool::new(false),
        }
    }

    /// Whether the feed reads the stream yet.
    pub(crate) fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The stream sequence handed on last.
    pub(crate) fn position(&self) -> u64 {
        self.position.load(Ordering::SeqCst)
    }

    /// Starts at `position` (the stream's tail when the feed starts).
    pub(crate) fn start(&self, position: u64) {
        let mut hub = self.lock();
        hub.floor = position;
        self.position.store(position, Ordering::SeqCst);
        self.running.store(true, Ordering::SeqCst);
    }

    /// Whether any local connection follows `group`.
    #[cfg(test)]
    pub(crate) fn wanted(&self, group: &str) -> bool {
        self.lock()
            .by_group
            .get(group)
            .is_some_and(|c| !c.is_empty())
    }

    /// Registers a connection of `user`.
    pub(crate) fn register(self: &Arc<Self>, user: &str, sink: Arc<dyn Sink>) -> Registration {
        let mut hub = self.lock();
        hub.next_id += 1;
        let id = hub.next_id;
        let user: Arc<str> = user.into();
        hub.by_user.entry(user.clone()).or_default().insert(id);
        hub.conns.insert(
            id,
            Conn {
                user,
                groups: HashSet::new(),
                loaded: HashSet::new(),
                read: HashSet::new(),
                early: Some(Vec::new()),
                early_overflow: false,
                phase: Phase::Holding(Held::default()),
                first_dropped: None,
                sink,
            },
        );
        metrics::gauge!("chat_live_connections").increment(1);
        Registration {
            hub: self.clone(),
            id,
        }
    }

    /// Hands on a group message at `stream_seq`; `open` makes its frame
    /// (with its seq and [`Restriction`]) and runs only if some connection
    /// follows the group.
    pub(crate) fn message<E>(
        &self,
        stream_seq: u64,
        group: &str,
        open: impl FnOnce() -> Result<(Utf8Bytes, u64, Restriction), E>,
    ) -> Result<usize, E> {
        let mut hub = self.lock();
        let before = self.position.swap(stream_seq, Ordering::SeqCst);
        hub.noted(group, stream_seq, before);
        // split borrow: the followers are read while their connections
        // change, with no copy of the list per message
        let Hub {
            by_group, conns, ..
        } = &mut *hub;
        let Some(ids) = by_group.get(group).filter(|c| !c.is_empty()) else {
            return Ok(0);
        };
        let (text, seq, restricted) = open()?;
        let frame = LiveFrame {
            text,
            group: group.into(),
            seq,
            stream_seq,
            feed: self.feed,
            caught_up: false,
            place: stream_seq,
            restricted,
        };
        let mut written = 0;
        for id in ids {
            if let Some(conn) = conns.get_mut(id) {
                written += usize::from(conn.take(&frame));
            }
        }
        Ok(written)
    }

    /// Applies a membership event at `stream_seq`: `user`'s connections
    /// follow `group` from here on, or no longer.
    pub(crate) fn membership(&self, stream_seq: u64, group: &str, user: &str, subscribed: bool) {
        let mut hub = self.lock();
        self.position.store(stream_seq, Ordering::SeqCst);
        let Some(ids) = hub.by_user.get(user) else {
            return;
        };
        let ids: Vec<u64> = ids.iter().copied().collect();
        let group: Arc<str> = group.into();
        for id in ids {
            let Some(conn) = hub.conns.get_mut(&id) else {
                continue;
            };
            let loaded = match conn.early.as_mut() {
                Some(early) if early.len() >= EARLY_MAX => {
                    conn.early_overflow = true;
                    false
                }
                Some(early) => {
                    early.push((group.clone(), subscribed));
                    false
                }
                None => true,
            };
            if loaded {
                hub_follow(&mut hub, id, &group, subscribed);
            }
        }
    }

    /// Queues a signal of `group` (typing) on every local connection that
    /// follows the group, except those of `from`, whatever their phase: a
    /// signal has no place in the stream, so a catching-up connection gets
    /// it at once. Returns how many took it.
    pub(crate) fn signal(
        &self,
        group: &str,
        from: Option<&str>,
        about: Option<u64>,
        frame: &Utf8Bytes,
    ) -> usize {
        let hub = self.lock();
        let Some(ids) = hub.by_group.get(group) else {
            return 0;
        };
        let frame = SignalFrame {
            text: frame.clone(),
            about: about.map(|seq| (Arc::from(group), seq)),
        };
        let mut queued = 0;
        for id in ids {
            let Some(conn) = hub.conns.get(id) else {
                continue;
            };
            if from == Some(&*conn.user) || matches!(conn.phase, Phase::Closed) {
                continue;
            }
            queued += usize::from(conn.sink.offer_signal(frame.clone()));
        }
        queued
    }

    /// Queues a status of `group` (`a_message_status`) on the local
    /// connections of the users `to` that follow the group, whatever their
    /// phase, as a signal. Returns how many took it.
    pub(crate) fn status(&self, group: &str, to: &[UserId], frame: &Utf8Bytes) -> usize {
        let hub = self.lock();
        let Some(following) = hub.by_group.get(group) else {
            return 0;
        };
        let mut queued = 0;
        for user in to {
            let Some(ids) = hub.by_user.get(user.as_str()) else {
                continue;
            };
            for id in ids.iter().filter(|id| following.contains(id)) {
                let Some(conn) = hub.conns.get(id) else {
                    continue;
                };
                if !matches!(conn.phase, Phase::Closed) {
                    queued += usize::from(conn.sink.offer_signal(frame.clone().into()));
                }
            }
        }
        queued
    }

    /// Queues `frame` once on every local connection that follows any of
    /// `groups`, except those of `from` (presence: a member shares several
    /// groups with the user and hears of it once). Returns how many took it.
    pub(crate) fn signal_groups<'a>(
        &self,
        groups: impl IntoIterator<Item = &'a str>,
        from: &str,
        frame: &Utf8Bytes,
    ) -> usize {
        let hub = self.lock();
        let mut told = HashSet::new();
        for group in groups {
            let Some(ids) = hub.by_group.get(group) else {
                continue;
            };
            for id in ids {
                let Some(conn) = hub.conns.get(id) else {
                    continue;
                };
                if &*conn.user == from || matches!(conn.phase, Phase::Closed) || !told.insert(*id) {
                    continue;
                }
                conn.sink.offer_signal(frame.clone().into());
            }
        }
        told.len()
    }

    /// The groups `user`'s connections here follow (`None`: none here, or
    /// not loaded yet).
    pub(crate) fn groups_of(&self, user: &str) -> Option<Vec<String>> {
        let hub = self.lock();
        let conn = hub
            .by_user
            .get(user)?
            .iter()
            .filter_map(|id| hub.conns.get(id))
            .find(|c| c.early.is_none())?;
        let mut groups: Vec<String> = conn.groups.iter().map(|g| g.to_string()).collect();
        groups.sort_unstable();
        Some(groups)
    }

    /// Moves on past `stream_seq` (traffic no connection needs).
    pub(crate) fn pass(&self, stream_seq: u64) {
        let _hub = self.lock();
        self.position.store(stream_seq, Ordering::SeqCst);
    }
}

impl Hub {
    /// A message of `key` at `stream_seq`; the hub was at `before`.
    fn noted(&mut self, key: &str, stream_seq: u64, before: u64) {
        if let Some(at) = self.tails.get_mut(key) {
            *at = stream_seq;
            return;
        }
        if self.tails.len() >= TAILS_MAX {
            // everything forgotten was at or before where the hub was
            self.tails.clear();
            self.floor = before;
        }
        self.tails.insert(key.into(), stream_seq);
    }
}

/// Makes connection `id` follow `group` or stop following it.
fn hub_follow(hub: &mut Hub, id: u64, group: &Arc<str>, follow: bool) {
    let Some(conn) = hub.conns.get_mut(&id) else {
        return;
    };
    if follow {
        if conn.groups.insert(group.clone()) {
            conn.sink.followed(group);
            hub.by_group.entry(group.clone()).or_default().insert(id);
        }
    } else if conn.groups.remove(group)
        && let Some(ids) = hub.by_group.get_mut(group)
    {
        // what it held of the group was published before the event: it
        // stays, in order
        ids.remove(&id);
        if ids.is_empty() {
            hub.by_group.remove(group);
        }
    }
}

impl Conn {
    /// Takes one frame of a group it follows; whether it went out now.
    fn take(&mut self, frame: &LiveFrame) -> bool {
        let read = self.read.contains(&frame.group);
        match &mut self.phase {
            Phase::Holding(held) => {
                if !held.hold(frame) {
                    // (a later overflow lets go of later frames)
                    let first = held
                        .frames
                        .front()
                        .map_or(frame.stream_seq, |f| f.stream_seq);
                    self.first_dropped.get_or_insert(first);
                    self.phase = Phase::Overflowed;
                }
                false
            }
            Phase::Overflowed | Phase::Closed => false,
            Phase::Live { skip_through } => {
                if read && frame.stream_seq <= *skip_through {
                    return false;
                }
                self.offer(frame.clone())
            }
        }
    }

    fn offer(&mut self, frame: LiveFrame) -> bool {
        match self.sink.offer(frame) {
            Ok(()) => true,
            Err(full) => {
                if full {
                    metrics::counter!("chat_live_too_slow_total").increment(1);
                }
                self.phase = Phase::Closed;
                false
            }
        }
    }
}

/// A connection's place in the hub; it leaves the hub when dropped.
pub(crate) struct Registration {
    hub: Arc<LiveHub>,
    id: u64,
}

impl Registration {
    /// The connection's number on this edge (for logs).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The hub's position now (read before a catch-up's last check).
    pub(crate) fn hub_position(&self) -> u64 {
        self.hub.position()
    }

    /// Sets the groups the connection follows, as the session read them,
    /// then replays the membership events seen since it registered.
    pub(crate) fn load(&self, groups: &[String]) -> Result<(), TooManyChanges> {
        let mut hub = self.hub.lock();
        let Some(conn) = hub.conns.get_mut(&self.id) else {
            return Ok(());
        };
        if conn.early_overflow {
            return Err(TooManyChanges);
        }
        let early = conn.early.take().unwrap_or_default();
        for g in groups {
            hub_follow(&mut hub, self.id, &Arc::from(g.as_str()), true);
        }
        for (g, subscribed) in early {
            hub_follow(&mut hub, self.id, &g, subscribed);
        }
        if let Some(conn) = hub.conns.get_mut(&self.id) {
            conn.loaded = conn.groups.clone();
        }
        Ok(())
    }

    /// The keys the connection followed when they were loaded, sorted:
    /// what its catch-up looks at.
    pub(crate) fn loaded(&self) -> Vec<String> {
        self.keys(|c| &c.loaded)
    }

    /// Whether the connection follows `key` now.
    pub(crate) fn follows(&self, key: &str) -> bool {
        let hub = self.hub.lock();
        hub.conns
            .get(&self.id)
            .is_some_and(|c| c.groups.contains(key))
    }

    /// The keys the connection follows now, sorted.
    pub(crate) fn following(&self) -> Vec<String> {
        self.keys(|c| &c.groups)
    }

    fn keys(&self, which: impl Fn(&Conn) -> &HashSet<Arc<str>>) -> Vec<String> {
        let hub = self.hub.lock();
        let mut keys: Vec<String> = hub
            .conns
            .get(&self.id)
            .map(|c| which(c).iter().map(|k| k.to_string()).collect())
            .unwrap_or_default();
        keys.sort_unstable();
        keys
    }

    /// What the hub knows of `key`'s newest message; `None` while the feed
    /// is not reading.
    pub(crate) fn newest(&self, key: &str) -> Option<Newest> {
        if !self.hub.running() {
            return None;
        }
        let hub = self.hub.lock();
        Some(match hub.tails.get(key) {
            Some(at) => Newest::At(*at),
            None => Newest::AtMost(hub.floor),
        })
    }

    /// Whether the feed reads the stream.
    pub(crate) fn running(&self) -> bool {
        self.hub.running()
    }

    /// Before attaching: the furthest place a catch-up that handed on
    /// everything of the keys it `read` (sorted) may claim. Every frame the
    /// hub handed on up to here was held: the place stays before the first
    /// held of any other key (only the attach writes it; held frames of the
    /// keys read repeat what the catch-up writes in order) and before the
    /// first frame the hold let go of. `None` once the connection left.
    pub(crate) fn unheld_through(&self, read: &[String]) -> Option<u64> {
        debug_assert!(read.is_sorted(), "binary searched");
        let hub = self.hub.lock();
        // under the lock: the position moves with the frames it holds
        let mut at = self.hub.position();
        let conn = hub.conns.get(&self.id)?;
        if let Some(first) = conn.first_dropped {
            at = at.min(first.saturating_sub(1));
        }
        if let Phase::Holding(held) = &conn.phase
            && let Some(first) = held
                .frames
                .iter()
                .find(|f| read.binary_search_by(|k| k.as_str().cmp(&f.group)).is_err())
        {
            at = at.min(first.stream_seq.saturating_sub(1));
        }
        Some(at)
    }

    /// Attaches once the catch-up has written everything of the keys it
    /// `read` up to stream sequence `through`: what was held of them after
    /// it, and everything held of other keys, goes out in order, and from
    /// then on everything comes live. Returns where the hub was: everything
    /// of every key up to there is now queued.
    pub(crate) fn attach(&self, through: u64, read: &[String]) -> Result<u64, NotYet> {
        if !self.hub.running.load(Ordering::SeqCst) {
            return Err(NotYet::NotRunning);
        }
        let mut hub = self.hub.lock();
        let Some(conn) = hub.conns.get_mut(&self.id) else {
            return Err(NotYet::Closed);
        };
        let held = match std::mem::replace(
            &mut conn.phase,
            Phase::Live {
                skip_through: through,
            },
        ) {
            Phase::Holding(held) => held.frames,
            Phase::Overflowed => {
                conn.phase = Phase::Holding(Held::default());
                return Err(NotYet::Overflowed);
            }
            Phase::Closed => {
                conn.phase = Phase::Closed;
                return Err(NotYet::Closed);
            }
            live @ Phase::Live { .. } => {
                conn.phase = live;
                return Ok(self.hub.position());
            }
        };
        conn.read = read.iter().map(|k| Arc::from(k.as_str())).collect();
        conn.first_dropped = None;
        for frame in held {
            let skip = frame.stream_seq <= through && conn.read.contains(&frame.group);
            if !skip && !conn.offer(frame) {
                return Err(NotYet::Closed);
            }
        }
        Ok(self.hub.position())
    }
}

impl Registration {
    /// Leaves the hub: nothing more is queued for the connection (and the
    /// hub lets go of its queue, so its writer can end).
    pub(crate) fn leave(&self) {
        let mut hub = self.hub.lock();
        let Some(conn) = hub.conns.remove(&self.id) else {
            return;
        };
        for g in &conn.groups {
            if let Some(ids) = hub.by_group.get_mut(g) {
                ids.remove(&self.id);
                if ids.is_empty() {
                    hub.by_group.remove(g);
                }
            }
        }
        if let Some(ids) = hub.by_user.get_mut(&conn.user) {
            ids.remove(&self.id);
            if ids.is_empty() {
                hub.by_user.remove(&conn.user);
            }
        }
        metrics::gauge!("chat_live_connections").decrement(1);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Reads all of `feed`'s stream for this edge, from its tail when it
/// starts, and hands it to that feed's hub; ends with the edge.
pub(crate) async fn feed(app: Weak<crate::Inner>, feed: Feed) {
    let Some(bus) = app.upgrade().map(|a| a.bus.clone()) else {
        return;
    };
    let mut backoff = Duration::from_millis(50);
    let tail = loop {
        match bus.stream_tail(feed).await {
            Ok(tail) => break tail,
            Err(e) => {
                tracing::warn!(feed = feed.label(), error = %e, "cannot find the stream's tail yet; live delivery waits");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                if app.strong_count() == 0 {
                    return;
                }
            }
        }
    };
    let Some(hub) = app.upgrade().map(|a| a.hub(feed).clone()) else {
        return;
    };
    hub.start(tail);
    let mut reader = bus.live_reader(feed, tail);
    drop(bus);
    loop {
        let msg = reader.next().await;
        let Some(inner) = app.upgrade() else {
            return;
        };
        let app = crate::AppState(inner);
        let seq = msg.stream_seq;
        match feed {
            Feed::User => match feed.key_of(&msg.subject) {
                Some(user) => {
                    let text = std::str::from_utf8(&msg.payload).map(Utf8Bytes::from);
                    if let Err(e) =
                        hub.message(seq, user, || text.map(|t| (t, 0, Restriction::None)))
                    {
                        tracing::error!(user, stream_seq = seq, error = %e, "undeliverable notification on the bus; skipping it");
                    }
                }
                None => hub.pass(seq),
            },
            Feed::Groups => match GroupTraffic::of(&msg.subject) {
                Some(GroupTraffic::Message(group)) => {
                    let handed =
                        hub.message(seq, group, || crate::ws::open_live(&app, seq, &msg.payload));
                    if let Err(e) = handed {
                        tracing::error!(group, stream_seq = seq, error = %e, "undeliverable group message on the bus; skipping it");
                    }
                }
                Some(GroupTraffic::Event(group)) => {
                    match serde_json::from_slice::<MembershipEvent>(&msg.payload) {
                        Ok(e) => {
                            hub.membership(seq, group, &e.user_id, e.subscribed);
                            // whose members see the user changed
                            if let Some(groups) = hub.groups_of(&e.user_id) {
                                app.presence.groups_changed(&e.user_id, groups);
                            }
                        }
                        Err(e) => {
                            tracing::error!(group, stream_seq = seq, error = %e, "unreadable membership event; skipping it");
                            hub.pass(seq);
                        }
                    }
                }
                None => hub.pass(seq),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_remembers_a_bounded_number_of_keys_tails() {
        let mut hub = Hub::default();
        for k in 0..TAILS_MAX as u64 {
            hub.noted(&format!("k{k}"), k + 1, k);
        }
        assert_eq!(hub.tails.len(), TAILS_MAX);
        hub.noted("k0", 900_000, 800_000);
        assert_eq!(hub.tails.len(), TAILS_MAX, "a known key takes no room");
        hub.noted("new", 900_001, 900_000);
        assert_eq!(hub.tails.len(), 1, "forgotten, then the new one");
        assert_eq!(hub.floor, 900_000, "none forgotten is newer than that");
    }

    /// A sink that keeps what it is given, up to `room`.
    #[derive(Default)]
    struct Kept {
        frames: Mutex<Vec<LiveFrame>>,
        signals: Mutex<Vec<Utf8Bytes>>,
        room: Option<usize>,
        followed: Mutex<Vec<String>>,
    }

    impl Kept {
        fn seqs(&self) -> Vec<u64> {
            let frames = self.frames.lock().expect("lock");
            frames.iter().map(|f| f.stream_seq).collect()
        }
    }

    impl Sink for Kept {
        fn offer(&self, frame: LiveFrame) -> Result<(), bool> {
            let mut frames = self.frames.lock().expect("lock");
            if self.room.is_some_and(|r| frames.len() >= r) {
                return Err(true);
            }
            frames.push(frame);
            Ok(())
        }

        fn offer_signal(&self, frame: SignalFrame) -> bool {
            self.signals.lock().expect("lock").push(frame.text);
            true
        }

        fn followed(&self, group: &str) {
            self.followed.lock().expect("lock").push(group.to_owned());
        }
    }

    fn read(keys: &[&str]) -> Vec<String> {
        keys.iter().map(|k| k.to_string()).collect()
    }

    fn hub() -> Arc<LiveHub> {
        let hub = Arc::new(LiveHub::new(Feed::Groups));
        hub.start(0);
        hub
    }

    fn send(hub: &LiveHub, stream_seq: u64, group: &str) {
        hub.message::<()>(stream_seq, group, || {
            Ok((Utf8Bytes::from("m"), stream_seq, Restriction::None))
        })
        .expect("open");
    }

    /// A connection of `user` whose groups are loaded, still catching up.
    fn catching_up(hub: &Arc<LiveHub>, user: &str, groups: &[&str]) -> (Registration, Arc<Kept>) {
        let sink = Arc::new(Kept::default());
        let reg = hub.register(user, sink.clone());
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        reg.load(&groups).expect("load");
        (reg, sink)
    }

    /// A connection of `user` that receives live.
    fn live(hub: &Arc<LiveHub>, user: &str, groups: &[&str]) -> (Registration, Arc<Kept>) {
        let (reg, sink) = catching_up(hub, user, groups);
        reg.attach(hub.position(), &[]).expect("attach");
        (reg, sink)
    }

    #[test]
    fn a_message_reaches_every_connection_that_follows_its_group_once() {
        let hub = hub();
        let (_a, a) = live(&hub, "ann", &["g1"]);
        let (_b, b) = live(&hub, "ann", &["g1", "g2"]);
        let (_c, c) = live(&hub, "bob", &["g2"]);
        let mut opened = 0;
        hub.message::<()>(1, "g1", || {
            opened += 1;
            Ok((Utf8Bytes::from("m"), 1, Restriction::None))
        })
        .expect("open");
        send(&hub, 2, "g2");
        send(&hub, 3, "g3");
        assert_eq!(opened, 1, "opened once for every connection");
        assert_eq!(a.seqs(), [1]);
        assert_eq!(b.seqs(), [1, 2]);
        assert_eq!(c.seqs(), [2]);
        assert_eq!(hub.position(), 3);
    }

    #[test]
    fn a_signal_reaches_the_group_s_other_members_whatever_their_phase() {
        let hub = hub();
        let (_a, a) = live(&hub, "ann", &["g"]);
        let (b_reg, b) = catching_up(&hub, "bob", &["g"]);
        let (_c, c) = live(&hub, "cy", &["other"]);
        let frame = Utf8Bytes::from("typing");
        assert_eq!(hub.signal("g", Some("ann"), None, &frame), 1);
        assert!(
            a.signals.lock().expect("lock").is_empty(),
            "not to the sender"
        );
        assert_eq!(
            b.signals.lock().expect("lock").len(),
            1,
            "while catching up too"
        );
        assert!(c.signals.lock().expect("lock").is_empty());
        assert!(b_reg.follows("g") && !b_reg.follows("other"));
        // a removed member no longer hears the group
        hub.membership(1, "g", "bob", false);
        assert_eq!(hub.signal("g", Some("ann"), None, &frame), 0);
        assert_eq!(
            hub.signal("g", None, None, &frame),
            1,
            "to everyone, the sender too"
        );
        assert!(!b_reg.follows("g"));
        // and signals move no position
        assert_eq!(hub.position(), 1);
        assert!(a.seqs().is_empty());
    }

    #[test]
    fn a_status_reaches_only_the_named_users_connections_that_follow_the_group() {
        let hub = hub();
        let (_a, a) = live(&hub, "ann", &["g"]);
        let (_a2, a2) = catching_up(&hub, "ann", &["g"]);
        let (_b, b) = live(&hub, "bob", &["g"]);
        let (_c, c) = live(&hub, "cy", &["other"]);
        let frame = Utf8Bytes::from("status");
        let user = |u: &str| UserId::parse(u).expect("id");
        assert_eq!(hub.status("g", &[user("ann"), user("cy")], &frame), 2);
        assert_eq!(a.signals.lock().expect("lock").len(), 1);
        assert_eq!(
            a2.signals.lock().expect("lock").len(),
            1,
            "while catching up too"
        );
        assert!(b.signals.lock().expect("lock").is_empty(), "not named");
        assert!(
            c.signals.lock().expect("lock").is_empty(),
            "not following the group"
        );
        // a removed member no longer hears the group
        hub.membership(1, "g", "ann", false);
        assert_eq!(hub.status("g", &[user("ann")], &frame), 0);
        assert_eq!(hub.status("nothing", &[user("bob")], &frame), 0);
        assert_eq!(hub.position(), 1);
    }

    #[test]
    fn presence_reaches_each_member_once_whatever_it_shares() {
        let hub = hub();
        let (_a, a) = live(&hub, "ann", &["g1", "g2"]);
        let (_b, b) = live(&hub, "bob", &["g1", "g2", "g3"]);
        let (_c, c) = live(&hub, "cy", &["g3"]);
        let frame = Utf8Bytes::from("presence");
        assert_eq!(hub.signal_groups(["g1", "g2"], "ann", &frame), 1);
        assert!(a.signals.lock().expect("lock").is_empty());
        assert_eq!(b.signals.lock().expect("lock").len(), 1);
        assert!(c.signals.lock().expect("lock").is_empty());
        assert_eq!(
            hub.groups_of("bob").as_deref(),
            Some(&["g1".to_owned(), "g2".into(), "g3".into()][..])
        );
        assert_eq!(hub.groups_of("nobody"), None);
    }

    #[test]
    fn a_group_nobody_follows_is_not_opened() {
        let hub = hub();
        let (_a, _) = live(&hub, "ann", &["g1"]);
        let opened = hub
            .message::<&str>(1, "g2", || Err("must not open"))
            .expect("skipped");
        assert_eq!(opened, 0);
        assert!(!hub.wanted("g2"));
        assert!(hub.wanted("g1"));
    }

    #[test]
    fn a_removal_stops_every_connection_of_the_user_from_its_event_on() {
        let hub = hub();
        let (_a, a) = live(&hub, "ann", &["g"]);
        let (_b, b) = live(&hub, "ann", &["g"]);
        let (_c, c) = live(&hub, "bob", &["g"]);
        send(&hub, 1, "g");
        hub.membership(2, "g", "ann", false);
        send(&hub, 3, "g");
        assert_eq!(a.seqs(), [1]);
        assert_eq!(b.seqs(), [1]);
        assert_eq!(c.seqs(), [1, 3]);
        hub.membership(4, "g", "ann", true);
        send(&hub, 5, "g");
        assert_eq!(a.seqs(), [1, 5]);
        // followed on load and again after the addition (its view of the
        // group's history is asked again), never for what it already follows
        assert_eq!(*a.followed.lock().expect("lock"), ["g", "g"]);
        hub.membership(6, "g", "ann", true);
        assert_eq!(a.followed.lock().expect("lock").len(), 2);
        assert_eq!(*c.followed.lock().expect("lock"), ["g"]);
    }

    #[test]
    fn events_before_the_groups_load_are_replayed_over_them() {
        let hub = hub();
        let sink = Arc::new(Kept::default());
        let reg = hub.register("ann", sink.clone());
        // read before the removal committed, so still listing g1
        hub.membership(1, "g1", "ann", false);
        hub.membership(2, "g2", "ann", true);
        reg.load(&["g1".to_owned()]).expect("load");
        reg.attach(2, &read(&["g1", "g2"])).expect("attach");
        send(&hub, 3, "g1");
        send(&hub, 4, "g2");
        assert_eq!(sink.seqs(), [4]);
    }

    #[test]
    fn too_many_early_events_make_the_load_fail() {
        let hub = hub();
        let reg = hub.register("ann", Arc::new(Kept::default()));
        for i in 0..=EARLY_MAX as u64 {
            hub.membership(i + 1, "g", "ann", i % 2 == 0);
        }
        assert_eq!(reg.load(&[]), Err(TooManyChanges));
    }

    #[test]
    fn the_hand_over_skips_what_the_catch_up_wrote_and_keeps_the_rest_in_order() {
        let hub = hub();
        let (reg, sink) = catching_up(&hub, "ann", &["g"]);
        for s in 1..=5 {
            send(&hub, s, "g");
        }
        assert!(sink.seqs().is_empty(), "held while catching up");
        // the catch-up wrote up to 3
        reg.attach(3, &read(&["g"])).expect("attach");
        send(&hub, 6, "g");
        assert_eq!(sink.seqs(), [4, 5, 6]);
    }

    #[test]
    fn held_frames_of_keys_the_catch_up_did_not_read_all_go_out() {
        let hub = hub();
        let (reg, sink) = catching_up(&hub, "ann", &["a", "h"]);
        send(&hub, 4, "a");
        send(&hub, 5, "h");
        send(&hub, 6, "a");
        // the catch-up read only `a`, up to 10
        let at = reg.attach(10, &read(&["a"])).expect("attach");
        assert_eq!(at, 6, "where the hub was");
        assert_eq!(sink.seqs(), [5], "h's frame came from the hub only");
        // later frames of `h` at or below the attach point are not skipped
        send(&hub, 7, "h");
        send(&hub, 8, "a");
        send(&hub, 11, "a");
        assert_eq!(sink.seqs(), [5, 7, 11]);
    }

    #[test]
    fn a_catch_up_ahead_of_the_feed_is_not_repeated_live() {
        let hub = hub();
        let (reg, sink) = catching_up(&hub, "ann", &["g"]);
        send(&hub, 1, "g");
        // the durable consumer already gave 1..=3 before the feed read them
        reg.attach(3, &read(&["g"])).expect("attach");
        send(&hub, 2, "g");
        send(&hub, 3, "g");
        send(&hub, 4, "g");
        assert_eq!(sink.seqs(), [4]);
    }

    #[test]
    fn holding_too_much_sends_the_catch_up_on_and_then_attaches() {
        let hub = hub();
        let (reg, sink) = catching_up(&hub, "ann", &["g"]);
        for s in 1..=(HOLD_MAX as u64 + 1) {
            send(&hub, s, "g");
        }
        assert_eq!(reg.attach(10, &read(&["g"])), Err(NotYet::Overflowed));
        let next = HOLD_MAX as u64 + 2;
        send(&hub, next, "g");
        // the catch-up went on up to the feed's position before the send
        reg.attach(next - 1, &read(&["g"])).expect("attach");
        assert_eq!(sink.seqs(), [next]);
    }

    #[test]
    fn holding_too_many_bytes_overflows_too() {
        let hub = hub();
        let (reg, sink) = catching_up(&hub, "ann", &["g"]);
        let big = Utf8Bytes::from("x".repeat(64 * 1024));
        let fits = (HOLD_MAX_BYTES / big.len()) as u64;
        assert!(fits < HOLD_MAX as u64, "the bytes bind first");
        let send_big = |s: u64| {
            hub.message::<()>(s, "g", || Ok((big.clone(), s, Restriction::None)))
                .expect("open");
        };
        for s in 1..=fits {
            send_big(s);
        }
        // as many as fit are held, and go out at the attach
        let (reg2, sink2) = catching_up(&hub, "bob", &["g"]);
        reg.attach(0, &read(&["g"]))
            .expect("attach within the budget");
        assert_eq!(sink.seqs().len() as u64, fits);
        // one more than fits: the catch-up must go on past the live feed
        for s in fits + 1..=2 * fits + 1 {
            send_big(s);
        }
        assert_eq!(reg2.attach(0, &read(&["g"])), Err(NotYet::Overflowed));
        assert!(sink2.seqs().is_empty());
    }

    #[test]
    fn a_catch_up_s_place_stops_before_what_the_hub_holds_of_other_keys() {
        let hub = hub();
        let (reg, _sink) = catching_up(&hub, "ann", &["g", "h"]);
        let g = read(&["g"]);
        // traffic the connection does not follow moves the hub on
        send(&hub, 4, "other");
        assert_eq!(reg.unheld_through(&g), Some(4));
        // held for the attach: frames of the keys read repeat the catch-up,
        // a frame of another key may not be claimed
        send(&hub, 5, "g");
        assert_eq!(reg.unheld_through(&g), Some(5));
        send(&hub, 6, "h");
        send(&hub, 9, "other");
        assert_eq!(reg.unheld_through(&g), Some(5));
        assert_eq!(reg.unheld_through(&read(&["g", "h"])), Some(9));
        // an overflow lets go of the held frames, not of where they began
        for s in 10..=(HOLD_MAX as u64 + 10) {
            send(&hub, s, "g");
        }
        assert_eq!(reg.attach(6, &g), Err(NotYet::Overflowed));
        assert_eq!(reg.unheld_through(&read(&["g", "h"])), Some(4));
        reg.leave();
        assert_eq!(reg.unheld_through(&g), None);
    }

    #[test]
    fn a_connection_that_cannot_keep_up_is_closed_and_gets_nothing_more() {
        let hub = hub();
        let sink = Arc::new(Kept {
            room: Some(2),
            ..Kept::default()
        });
        let reg = hub.register("ann", sink.clone());
        reg.load(&["g".to_owned()]).expect("load");
        reg.attach(0, &[]).expect("attach");
        for s in 1..=4 {
            send(&hub, s, "g");
        }
        assert_eq!(sink.seqs(), [1, 2]);
        drop(reg);
        assert!(!hub.wanted("g"), "a dropped registration leaves the hub");
    }

    #[test]
    fn attaching_waits_for_the_feed_to_run() {
        let hub = Arc::new(LiveHub::new(Feed::Groups));
        let reg = hub.register("ann", Arc::new(Kept::default()));
        assert_eq!(reg.attach(0, &[]), Err(NotYet::NotRunning));
    }
}
