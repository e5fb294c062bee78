//! The writer task: frames to the socket, and the device's place once
//! they are flushed.

use super::*;

/// The name of a frame's event (one of ours, or "other"): for metrics, and
/// to check what a signal carries.
pub(crate) fn event_of(frame: &str) -> &'static str {
    const NAMES: [&str; 13] = [
        event::ACK,
        event::ERROR,
        event::SESSION,
        event::GROUP_CREATED,
        event::GROUP_UPDATED,
        event::GROUP_MESSAGE,
        event::MESSAGE_STATUS,
        event::USER_TYPING,
        event::PRESENCE,
        event::MENTION,
        event::REACTION,
        event::MESSAGE_UPDATED,
        event::MESSAGE_DELETED,
    ];
    let name = frame
        .strip_prefix("{\"event\":\"")
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default();
    NAMES.into_iter().find(|n| *n == name).unwrap_or("other")
}

/// Writes frames to the socket.
///
/// Frames are fed to the socket and flushed when the queue runs dry (or
/// every `WRITE_BURST` frames); only then are the frames of the burst
/// reported as delivered and counted into the device's place.
pub(super) async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    inbox: Inbox,
    app: AppState,
    user: UserId,
    visibility: Arc<Visibility>,
    saver: Arc<Saver>,
) {
    let user_key: Arc<str> = Arc::from(user.as_str());
    let delivered = Written {
        hub: &app.delivered,
        user: &user_key,
        saver: &saver,
    };
    let mut pending = Unflushed::default();
    // a write or flush failed: nothing more counts as written
    let mut failed = false;
    // a close asked for: it goes out once what was written is flushed and
    // the device's position saved
    let mut closing = None;
    // looked up once: a registry lookup per live frame showed in profiles
    let live_out = metrics::counter!("chat_ws_events_out_total", "event" => event::GROUP_MESSAGE);
    let live_deliveries = metrics::counter!("chat_ws_deliveries_total", "feed" => "live");
    // counted here and added once per burst: an atomic add per frame on
    // the counters' shared cache lines was 2 % of the edge in fan-out
    let mut tally = Tally::default();
    let deadline = app.config.write_timeout;
    let mut burst = Burst::default();
    let mut coalesce = Coalesce::new(app.write_load.clone());
    // whether group messages came since the queue last ran dry
    let mut messages = false;
    let Inbox { mut rx, close } = inbox;
    loop {
        // while the timer is armed, frames other than replies need not wake
        // the writer: it takes them all when the timer fires
        rx.gathering(coalesce.waiting());
        // a close asked for out of band goes ahead of everything queued;
        // what is queued goes into the flush the timer makes
        let (out, _permit) = tokio::select! {
            biased;
            (code, reason) = close.asked() => (Outgoing::Close(code, reason), None),
            next = rx.recv() => match next {
                Some((out, permit)) => (out, Some(permit)),
                None => break,
            },
            () = coalesce.elapsed(), if coalesce.waiting() => {
                burst = Burst::default();
                tally.add_to(&live_deliveries, &live_out, &app.write_load);
                if !coalesce.flush(&mut pending, &mut sink, &delivered, deadline).await {
                    gave_up();
                    failed = true;
                    break;
                }
                continue;
            }
        };
        burst.took(&out);
        // only the group messages' rate makes a connection busy: a burst
        // of notifications (status pushes come one publish apart) does not
        messages |= matches!(&out, Outgoing::Live(f) if f.feed == Feed::Groups);
        let ok = match out {
            Outgoing::Frame(text) => {
                metrics::counter!("chat_ws_events_out_total", "event" => event_of(&text))
                    .increment(1);
                fed(&mut sink, Message::Text(text.into()), deadline).await
            }
            Outgoing::Signal(SignalFrame { text, about }) => {
                // about a message the member may not see: passed over (a
                // signal may be lost), and so is one whose view is unknown
                let hidden = match &about {
                    Some((group, seq)) => {
                        !matches!(visibility.hides(&app, &user, group, *seq).await, Ok(false))
                    }
                    None => false,
                };
                if hidden {
                    true
                } else {
                    metrics::counter!("chat_ws_events_out_total", "event" => event_of(&text))
                        .increment(1);
                    fed(&mut sink, Message::Text(text), deadline).await
                }
            }
            Outgoing::Live(mut f) => {
                if f.caught_up {
                    metrics::counter!("chat_ws_deliveries_total", "feed" => f.feed.label())
                        .increment(1);
                } else {
                    tally.deliveries += 1;
                }
                let hides = match std::mem::take(&mut f.restricted) {
                    Restriction::None => Some(false),
                    Restriction::Change => hidden(&app, &visibility, &user, &f.group, f.seq).await,
                    Restriction::Reply(reply) => {
                        // what it answers is left out unless the member
                        // can be seen to see that (the message goes either
                        // way)
                        if hidden(&app, &visibility, &user, &f.group, reply.0).await != Some(false)
                        {
                            f.text = reply.1.clone();
                        }
                        Some(false)
                    }
                };
                match f.feed {
                    _ if hides.is_none() => {
                        // cannot tell: not passed over (that would lose
                        // it), so the connection resumes from before it
                        closing = Some(CloseFrame {
                            code: CLOSE_TOO_SLOW,
                            reason: Utf8Bytes::from_static(
                                "cannot check your view of a group; reconnect",
                            ),
                        });
                        break;
                    }
                    Feed::Groups if hides == Some(true) => {
                        // not for this member: passed over, in its place
                        pending.through(Feed::Groups, f.place);
                        true
                    }
                    Feed::Groups => {
                        let ok = fed(&mut sink, Message::Text(f.text), deadline).await;
                        if ok {
                            tally.out += 1;
                            tally.live += u64::from(!f.caught_up);
                            pending.group_frame(&f.group, f.seq);
                            // a caught-up frame's place stops short of the
                            // frames of other groups the hub holds for the
                            // attach (the attach marker moves it past them)
                            pending.through(Feed::Groups, f.place);
                        }
                        ok
                    }
                    Feed::User => {
                        metrics::counter!("chat_ws_events_out_total", "event" => event_of(&f.text))
                            .increment(1);
                        let ok = fed(&mut sink, Message::Text(f.text), deadline).await;
                        if ok {
                            pending.through(Feed::User, f.place);
                        }
                        ok
                    }
                }
            }
            Outgoing::Through(feed, seq) => {
                pending.through(feed, seq);
                true
            }
            Outgoing::Close(code, reason) => {
                closing = Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                });
                break;
            }
        };
        if !ok {
            failed = true;
            break;
        }
        if rx.is_empty() || burst.full() {
            if std::mem::take(&mut messages) {
                coalesce.ran_dry();
            }
            if !burst.due() && coalesce.wait() {
                // more may come before it is due
                continue;
            }
            burst = Burst::default();
            tally.add_to(&live_deliveries, &live_out, &app.write_load);
            if !coalesce
                .flush(&mut pending, &mut sink, &delivered, deadline)
                .await
            {
                gave_up();
                failed = true;
                break;
            }
        }
    }
    // what was written before the end counts; the rest comes again. Not
    // after a failure: the frame that failed may have left the split sink's
    // slot, and a later flush that succeeds says nothing of it (a client's
    // close racing a delivery lost that delivery this way)
    tally.add_to(&live_deliveries, &live_out, &app.write_load);
    if !failed {
        pending.flush(&mut sink, &delivered, deadline).await;
    }
    rx.close();
    // before the server's close goes out: a client that reconnects once it
    // sees the close finds its device's position saved. (A close the
    // client started is answered by the socket on the next flush, which
    // may be the last one above: a client that reconnects at once may then
    // find the place before this save and get the last frames again.)
    // boxed: the save's NATS requests would otherwise be part of every
    // idle writer's state
    let _ = tokio::time::timeout(FINAL_SAVE, Box::pin(saver.save())).await;
    if let Some(frame) = closing {
        within(CLOSE_HANDSHAKE, sink.send(Message::Close(Some(frame)))).await;
    }
    within(CLOSE_HANDSHAKE, sink.close()).await;
}

/// Whether the message at `seq` of a group with `joined` history (one a
/// change changes, or a reply answers) is hidden from this connection's
/// member (it is from before the member joined); `None` if that cannot be
/// read now.
async fn hidden(
    app: &AppState,
    visibility: &Visibility,
    user: &UserId,
    group: &str,
    seq: u64,
) -> Option<bool> {
    match visibility.hides(app, user, group, seq).await {
        Ok(hides) => Some(hides),
        Err(e) => {
            tracing::warn!(group, seq, error = %e, "cannot tell whether a message predates the member");
            None
        }
    }
}

/// What the writer took since its last flush.
#[derive(Default)]
struct Burst {
    frames: usize,
    /// A reply was among them: its client is waiting, so it goes out at
    /// once, with whatever was taken after it.
    reply: bool,
}

impl Burst {
    fn took(&mut self, out: &Outgoing) {
        self.frames += 1;
        self.reply |= matches!(out, Outgoing::Frame(_));
    }

    /// Flushed even if frames keep coming.
    fn full(&self) -> bool {
        self.frames >= WRITE_BURST
    }

    /// Flushed now, whatever the window says.
    fn due(&self) -> bool {
        self.reply || self.full()
    }
}

/// When the writer flushes: at once when the queue runs dry, unless the
/// connection is busy (its queue ran dry after group messages at least
/// once per `window` over the last `PERIOD_WINDOWS` windows, counting the
/// dry spells within `window / 10` of a counted one as part of it: a
/// sustained rate of messages, which a burst of notifications or replies
/// does not make) and it flushed less than `window` ago; then at
/// `window` after that flush, with whatever came meanwhile. A connection
/// with a frame now and then writes each at once; a busy one writes at
/// most once per `window`, several frames per write (`perf`, fan-out at
/// capacity: 1.6 frames per socket write, and the writes were most of the
/// edge's time, in the kernel). `ZERO`: a write every time the queue runs
/// dry (nothing is counted, so the connection is never busy).
///
/// `window` is the edge's (`WriteLoad`): while the edge is over its write
/// budget it is longer, so a connection is busy at a lower rate (a frame
/// per stretched window) and gathers for longer. A counting period keeps
/// the length it started with; an armed timer is brought forward when the
/// window shrinks.
struct Coalesce {
    /// The window, stretched while the edge is over its write budget.
    load: Arc<WriteLoad>,
    last: Option<tokio::time::Instant>,
    /// The period the queue's dry spells are being counted in: its start,
    /// its length, and the count so far; and whether the period before was
    /// busy.
    period: Option<(tokio::time::Instant, Duration)>,
    dry: u32,
    busy: bool,
    /// When the queue last ran dry and it was counted.
    counted: Option<tokio::time::Instant>,
    /// Armed while frames wait for their flush; boxed and made on first
    /// use, so an idle connection does not carry a timer.
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// When the armed timer fires, while frames wait for it.
    armed: Option<tokio::time::Instant>,
    /// `chat_ws_coalesced_flushes_total`.
    coalesced: metrics::Counter,
}

impl Coalesce {
    fn new(load: Arc<WriteLoad>) -> Self {
        Self {
            load,
            last: None,
            period: None,
            dry: 0,
            busy: false,
            counted: None,
            timer: None,
            armed: None,
            coalesced: metrics::counter!("chat_ws_coalesced_flushes_total"),
        }
    }

    /// The queue ran dry (or a burst is full) after group messages.
    fn ran_dry(&mut self) {
        if !self.window().is_zero() {
            self.ran_dry_at(tokio::time::Instant::now());
        }
    }

    fn ran_dry_at(&mut self, now: tokio::time::Instant) {
        let window = self.window();
        // part of the burst the last counted one began (measured from its
        // start, so a steady stream faster than this still counts)
        if self
            .counted
            .is_some_and(|t| now.saturating_duration_since(t) < window / 10)
        {
            return;
        }
        self.counted = Some(now);
        let (start, period) = *self
            .period
            .get_or_insert((now, window.saturating_mul(PERIOD_WINDOWS)));
        let gone = now.saturating_duration_since(start);
        if gone >= period {
            // busy if the period just ended was (a later one was empty)
            self.busy = gone < period.saturating_mul(2) && self.dry >= PERIOD_WINDOWS;
            self.period = Some((now, window.saturating_mul(PERIOD_WINDOWS)));
            self.dry = 0;
        }
        self.dry += 1;
    }

    fn window(&self) -> Duration {
        self.load.window()
    }

    /// Whether frames wait for the timer.
    fn waiting(&self) -> bool {
        self.armed.is_some()
    }

    /// Decides for frames written while the queue ran dry: true if they
    /// wait (the timer is armed), false if they go now. Frames already
    /// waiting go when the window now says, if that is sooner.
    fn wait(&mut self) -> bool {
        let Some(due) = self.due_at(tokio::time::Instant::now()) else {
            return false;
        };
        if self.armed.is_some_and(|armed| armed <= due) {
            return true;
        }
        match &mut self.timer {
            Some(t) => t.as_mut().reset(due),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(due))),
        }
        self.armed = Some(due);
        true
    }

    /// When frames that find the queue dry at `now` go out, if not at once.
    fn due_at(&self, now: tokio::time::Instant) -> Option<tokio::time::Instant> {
        if !self.busy {
            return None;
        }
        let window = self.window();
        self.last
            .and_then(|t| t.checked_add(window))
            .filter(|due| *due > now)
    }

    /// Until the armed timer fires (never, if none is armed).
    async fn elapsed(&mut self) {
        match &mut self.timer {
            Some(t) => t.as_mut().await,
            None => std::future::pending().await,
        }
    }

    /// Flushes what was written (see [`Unflushed::flush`]). Counted as
    /// coalesced if frames waited for a window that has ended: the timer's
    /// flush, and the one after the writer took what gathered while it
    /// waited (the timer wakes it, and the queue goes first), which is the
    /// usual one for a connection that keeps getting frames.
    async fn flush(
        &mut self,
        pending: &mut Unflushed,
        sink: &mut futures::stream::SplitSink<WebSocket, Message>,
        to: &Written<'_>,
        deadline: Duration,
    ) -> bool {
        if self
            .armed
            .take()
            .is_some_and(|due| due <= tokio::time::Instant::now())
        {
            self.coalesced.increment(1);
        }
        let ok = pending.flush(sink, to, deadline).await;
        if !self.window().is_zero() {
            self.last = Some(tokio::time::Instant::now());
        }
        ok
    }
}

/// Windows over which a connection's rate decides whether it is busy.
const PERIOD_WINDOWS: u32 = 10;

/// Live group frames taken from the queue and written since the last add.
#[derive(Default)]
struct Tally {
    deliveries: u64,
    out: u64,
    /// Of `out`, the live ones: what the write budget counts (a catch-up
    /// writes in bursts whatever the window).
    live: u64,
    /// The write budget's period this connection last counted itself in.
    seen: u64,
}

impl Tally {
    fn add_to(&mut self, deliveries: &metrics::Counter, out: &metrics::Counter, load: &WriteLoad) {
        if self.deliveries > 0 {
            deliveries.increment(std::mem::take(&mut self.deliveries));
        }
        if self.out > 0 {
            load.wrote(std::mem::take(&mut self.live), &mut self.seen);
            out.increment(std::mem::take(&mut self.out));
        }
    }
}

/// Feeds `msg` to the socket within `deadline`.
pub(super) async fn fed(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    msg: Message,
    deadline: Duration,
) -> bool {
    let ok = within(deadline, sink.feed(msg)).await;
    if !ok {
        gave_up();
    }
    ok
}

/// A write that did not finish in time, or failed: the client stopped
/// reading (or went away).
pub(super) fn gave_up() {
    tracing::info!("a socket write did not finish; closing the connection");
    metrics::counter!("chat_ws_write_failures_total").increment(1);
}

/// Whether a socket operation finished, and well, within `deadline`: a
/// client that stops reading fills the socket, and the write waits for it
/// no longer than that.
pub(super) async fn within<E>(deadline: Duration, op: impl Future<Output = Result<(), E>>) -> bool {
    matches!(tokio::time::timeout(deadline, op).await, Ok(Ok(())))
}

/// Where a writer reports what it flushed: receipts, and the device's
/// place in each stream.
pub(super) struct Written<'a> {
    pub(super) hub: &'a DeliveredHub,
    pub(super) user: &'a Arc<str>,
    pub(super) saver: &'a Saver,
}

/// Most frames written before a flush.
pub(super) const WRITE_BURST: usize = 64;

/// What the writer wrote since its last flush: reported as delivered and
/// counted into the device's place only once a flush after it succeeded.
#[derive(Default)]
pub(super) struct Unflushed {
    /// Group seqs written, by group: a connection's frames between two
    /// flushes come from a few groups, so a list (found by pointer first:
    /// a group's frames share its name) costs less than hashing the name
    /// of each frame (2 % of the edge in fan-out).
    receipts: Vec<(Arc<str>, u64)>,
    /// The furthest place written, by feed.
    through: [u64; 2],
}

impl Unflushed {
    /// A group message was written.
    fn group_frame(&mut self, group: &Arc<str>, seq: u64) {
        let found = self
            .receipts
            .iter_mut()
            .find(|(g, _)| Arc::ptr_eq(g, group) || g == group);
        match found {
            Some((_, e)) => *e = (*e).max(seq),
            None => self.receipts.push((group.clone(), seq)),
        }
    }

    /// Everything of `feed` up to `stream_seq` was written.
    fn through(&mut self, feed: Feed, stream_seq: u64) {
        let slot = &mut self.through[slot(feed)];
        *slot = (*slot).max(stream_seq);
    }

    /// Flushes the socket, then reports receipts and moves the place. False
    /// if the socket failed: nothing unflushed counts, so it comes again.
    async fn flush(
        &mut self,
        sink: &mut futures::stream::SplitSink<WebSocket, Message>,
        to: &Written<'_>,
        deadline: Duration,
    ) -> bool {
        if !within(deadline, sink.flush()).await {
            return false;
        }
        to.hub.record(to.user, &mut self.receipts);
        for (feed, at) in FEEDS.into_iter().zip(self.through) {
            to.saver.position[slot(feed)].fetch_max(at, Ordering::SeqCst);
        }
        true
    }
}

/// The two feeds, in the order of [`slot`].
const FEEDS: [Feed; 2] = [Feed::Groups, Feed::User];

/// A feed's index in per-feed arrays.
pub(super) fn slot(feed: Feed) -> usize {
    match feed {
        Feed::Groups => 0,
        Feed::User => 1,
    }
}

/// Saves the device's place (`CHAT_PLACES`): every `CHECKPOINT` while it
/// moves, and by the writer once it wrote its last frame and before it
/// answers or sends the close, so a client that reconnects after the close,
/// on any edge, resumes right after what this connection wrote (after an
/// edge crash: after the last checkpoint, and `seq` shows the repeats).
pub(crate) struct Saver {
    /// Where each feed's catch-up started: a place the device had.
    pub(super) start: [AtomicU64; 2],
    /// Whether the device's place is known in both feeds (a new device's
    /// is known once its catch-ups chose where to start): nothing is saved
    /// before, since a place of 0 would mean "everything".
    pub(super) known: [std::sync::atomic::AtomicBool; 2],
    /// The furthest place written, by feed: everything of the device's
    /// keys up to it reached the socket.
    pub(super) position: [AtomicU64; 2],
    pub(super) saved: [AtomicU64; 2],
    /// A save succeeded (a new device's first place is saved even at 0:
    /// without it the device would count as new again and skip what it
    /// missed).
    pub(super) saved_once: std::sync::atomic::AtomicBool,
    /// The entry's revision as last read or written.
    pub(super) revision: AtomicU64,
    /// The device was evicted: nothing more is saved.
    pub(super) forgotten: std::sync::atomic::AtomicBool,
    /// One save at a time, so an older one never lands after a newer one.
    pub(super) turn: tokio::sync::Mutex<()>,
    pub(super) places: chat_bus::Places,
    pub(super) user: UserId,
    pub(super) device: DeviceId,
}

/// How often a live connection's position is saved.
pub(super) const CHECKPOINT: Duration = Duration::from_secs(5);
/// The longest a closing connection waits for its position to be saved.
pub(super) const FINAL_SAVE: Duration = Duration::from_secs(2);

impl Saver {
    pub(super) fn new(
        places: chat_bus::Places,
        (user, device): (UserId, DeviceId),
        stored: chat_bus::Stored,
    ) -> Self {
        let place = stored.place.unwrap_or_default();
        let known = stored.place.is_some();
        Self {
            start: [AtomicU64::new(place.groups), AtomicU64::new(place.users)],
            known: [known.into(), known.into()],
            position: Default::default(),
            saved: [AtomicU64::new(place.groups), AtomicU64::new(place.users)],
            saved_once: known.into(),
            revision: AtomicU64::new(stored.revision),
            forgotten: Default::default(),
            turn: tokio::sync::Mutex::new(()),
            places,
            user,
            device,
        }
    }

    /// `feed`'s catch-up starts at `place`.
    pub(super) fn starts_at(&self, feed: Feed, place: u64) {
        self.start[slot(feed)].fetch_max(place, Ordering::SeqCst);
        self.known[slot(feed)].store(true, Ordering::SeqCst);
    }

    /// The place to save in `feed`: where its catch-up started, or further
    /// once frames or markers were written. Before the attach only the
    /// catch-up's frames move `position` (the hub hands no frame on yet),
    /// and their places stop short of what the hub holds of other keys.
    fn place_of(&self, feed: Feed) -> u64 {
        let i = slot(feed);
        self.start[i]
            .load(Ordering::SeqCst)
            .max(self.position[i].load(Ordering::SeqCst))
    }

    /// The place to save, if it moved since the last save.
    pub(super) fn due(&self) -> Option<chat_bus::Place> {
        if self.forgotten.load(Ordering::SeqCst)
            || !self.known.iter().all(|k| k.load(Ordering::SeqCst))
        {
            return None;
        }
        let place = chat_bus::Place {
            groups: self.place_of(Feed::Groups),
            users: self.place_of(Feed::User),
        };
        let moved = FEEDS
            .into_iter()
            .zip([place.groups, place.users])
            .any(|(f, at)| at > self.saved[slot(f)].load(Ordering::SeqCst));
        (moved || !self.saved_once.load(Ordering::SeqCst)).then_some(place)
    }

    pub(super) async fn save(&self) {
        let _turn = self.turn.lock().await;
        let Some(place) = self.due() else {
            return;
        };
        let revision = self.revision.load(Ordering::SeqCst);
        match self
            .places
            .save(&self.user, &self.device, place, revision)
            .await
        {
            Ok(chat_bus::Saved::At(revision)) => {
                tracing::debug!(
                    groups = place.groups,
                    users = place.users,
                    "device place saved"
                );
                self.revision.store(revision, Ordering::SeqCst);
                self.saved[0].fetch_max(place.groups, Ordering::SeqCst);
                self.saved[1].fetch_max(place.users, Ordering::SeqCst);
                self.saved_once.store(true, Ordering::SeqCst);
            }
            Ok(chat_bus::Saved::Forgotten) => {
                tracing::info!("the device was evicted; its place is no longer saved");
                self.forgotten.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot save the device's place; it resumes from the last one saved")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_counted_by_their_event_and_unknown_ones_as_other() {
        assert_eq!(event_of(r#"{"event":"ack","id":1}"#), event::ACK);
        assert_eq!(
            event_of(r#"{"event":"a_group_message","data":{}}"#),
            event::GROUP_MESSAGE
        );
        assert_eq!(event_of(r#"{"event":"made_up"}"#), "other");
        assert_eq!(event_of("not json"), "other");
    }

    /// A writer whose window never stretches.
    fn fixed(window: Duration) -> Coalesce {
        Coalesce::new(Arc::new(WriteLoad::new(window, 0)))
    }

    /// `ran_dry` and a flush at the given milliseconds after `t0`.
    fn at(t0: tokio::time::Instant, ms: u64) -> tokio::time::Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn a_connection_with_a_frame_now_and_then_writes_each_at_once() {
        let t0 = tokio::time::Instant::now();
        let mut c = fixed(Duration::from_millis(10));
        assert_eq!(c.due_at(t0), None);
        // frames 30 ms apart (300 sends/s over 10 groups), and once a
        // second a burst of ten status notifications
        for i in 1..200 {
            c.ran_dry_at(at(t0, 30 * i));
            if i % 33 == 0 {
                for j in 0..10 {
                    c.ran_dry_at(at(t0, 30 * i + j / 5));
                }
            }
            c.last = Some(at(t0, 30 * i + 2));
            assert_eq!(c.due_at(at(t0, 30 * i + 3)), None, "frame {i}");
        }
    }

    #[test]
    fn a_busy_connection_writes_at_most_once_per_window() {
        let t0 = tokio::time::Instant::now();
        let mut c = fixed(Duration::from_millis(10));
        // frames 2 ms apart: busy once a whole period shows it
        let mut ms = 0;
        while ms <= 200 {
            ms += 2;
            c.ran_dry_at(at(t0, ms));
        }
        c.last = Some(at(t0, ms));
        // the next frame waits for the rest of the window after that flush
        assert_eq!(c.due_at(at(t0, ms + 2)), Some(at(t0, ms + 10)));
        // once the window is over, it goes at once
        assert_eq!(c.due_at(at(t0, ms + 10)), None);
        // after a quiet spell it writes at once again
        c.ran_dry_at(at(t0, ms + 500));
        c.last = Some(at(t0, ms + 500));
        assert_eq!(c.due_at(at(t0, ms + 501)), None);
    }

    #[test]
    fn a_rate_just_below_one_per_window_is_not_busy() {
        let t0 = tokio::time::Instant::now();
        let mut c = fixed(Duration::from_millis(10));
        // one every 12 ms: 9 in each period of 100 ms
        for i in 1..=100 {
            c.ran_dry_at(at(t0, 12 * i));
        }
        c.last = Some(at(t0, 1200));
        assert_eq!(c.due_at(at(t0, 1201)), None);
    }

    #[test]
    fn a_reply_goes_at_once_even_with_frames_taken_after_it() {
        let live = || {
            Outgoing::Live(LiveFrame {
                text: Utf8Bytes::from_static("m"),
                group: "g".into(),
                seq: 1,
                stream_seq: 1,
                feed: Feed::Groups,
                caught_up: false,
                place: 1,
                restricted: Restriction::None,
            })
        };
        let mut burst = Burst::default();
        burst.took(&live());
        assert!(!burst.due(), "group messages may wait for the window");
        burst.took(&Outgoing::Frame("reply".into()));
        burst.took(&live());
        assert!(burst.due(), "the reply taken before still goes now");
        let mut burst = Burst::default();
        for _ in 0..WRITE_BURST {
            assert!(!burst.full());
            burst.took(&live());
        }
        assert!(burst.full() && burst.due(), "a full burst goes too");
    }

    #[test]
    fn bursts_count_once() {
        let t0 = tokio::time::Instant::now();
        let mut c = fixed(Duration::from_millis(10));
        // every 20 ms, ten dry spells 0.1 ms apart: one each
        for i in 1..=50 {
            for j in 0..10 {
                c.ran_dry_at(at(t0, 20 * i) + Duration::from_micros(100 * j));
            }
        }
        c.last = Some(at(t0, 1001));
        assert_eq!(c.due_at(at(t0, 1002)), None);
    }

    #[test]
    fn a_steady_stream_faster_than_a_burst_is_busy() {
        let t0 = tokio::time::Instant::now();
        let mut c = fixed(Duration::from_millis(10));
        // a dry spell every 0.5 ms for 250 ms: one counted per ms
        for i in 1..=500 {
            c.ran_dry_at(t0 + Duration::from_micros(500 * i));
        }
        c.last = Some(at(t0, 250));
        assert_eq!(c.due_at(at(t0, 251)), Some(at(t0, 260)));
    }

    #[test]
    fn a_zero_window_never_waits() {
        let t0 = tokio::time::Instant::now();
        let mut c = fixed(Duration::ZERO);
        c.ran_dry();
        c.last = Some(t0);
        assert_eq!(c.due_at(at(t0, 0)), None);
    }

    #[test]
    fn over_the_write_budget_a_slower_connection_is_busy_and_waits_longer() {
        let t0 = tokio::time::Instant::now();
        let load = Arc::new(WriteLoad::new(Duration::from_millis(10), 20_000));
        let mut c = Coalesce::new(load.clone());
        // a frame every 12 ms: below one per 10 ms window, written at once
        for i in 1..=100 {
            c.ran_dry_at(at(t0, 12 * i));
        }
        c.last = Some(at(t0, 1200));
        assert_eq!(c.due_at(at(t0, 1201)), None);
        // the edge's 1,000 writers go over 20,000 frames a second: the
        // window stretches to 50 ms, and the same rate is busy
        let mut seen = vec![0; 1_000];
        for s in &mut seen {
            load.wrote(100, s);
        }
        assert_eq!(load.tick(Duration::from_secs(1)), Duration::from_millis(50));
        for i in 101..=200 {
            c.ran_dry_at(at(t0, 12 * i));
        }
        c.last = Some(at(t0, 2400));
        assert_eq!(c.due_at(at(t0, 2401)), Some(at(t0, 2450)));
        // the load goes: the window is 10 ms again
        assert_eq!(load.tick(Duration::from_secs(1)), Duration::from_millis(10));
        assert_eq!(c.due_at(at(t0, 2401)), Some(at(t0, 2410)));
    }

    #[tokio::test]
    async fn frames_waiting_for_a_window_that_shrinks_go_when_it_now_ends() {
        let load = Arc::new(WriteLoad::new(Duration::from_millis(10), 20_000));
        let mut seen = vec![0; 1_000];
        for s in &mut seen {
            load.wrote(100, s);
        }
        assert_eq!(load.tick(Duration::from_secs(1)), Duration::from_millis(50));
        let mut c = Coalesce::new(load.clone());
        c.busy = true;
        // a last write ahead of the clock, so that no window has ended by
        // the time it is checked, however slowly this runs
        let last = tokio::time::Instant::now() + Duration::from_secs(3600);
        c.last = Some(last);
        assert!(c.wait());
        assert_eq!(c.armed, Some(last + Duration::from_millis(50)));
        // the load goes: what waits goes 10 ms after the last write
        assert_eq!(load.tick(Duration::from_secs(1)), Duration::from_millis(10));
        assert!(c.wait());
        assert_eq!(c.armed, Some(last + Duration::from_millis(10)));
        // a longer window again does not hold it back further
        for s in &mut seen {
            load.wrote(100, s);
        }
        load.tick(Duration::from_secs(1));
        assert!(c.wait());
        assert_eq!(c.armed, Some(last + Duration::from_millis(10)));
    }

    #[test]
    fn written_group_frames_keep_the_newest_seq_of_each_group() {
        let mut u = Unflushed::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        u.group_frame(&a, 3);
        // the same group under another allocation of its name
        u.group_frame(&Arc::from("a"), 5);
        u.group_frame(&b, 1);
        u.group_frame(&a, 4);
        assert_eq!(u.receipts, [(a, 5), (b, 1)]);
    }
}
