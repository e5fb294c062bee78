//! A connection's way to its writer: bounded in frames and bytes, with a
//! close that never waits behind them.

use super::*;

/// What the writer task puts on the socket.
pub(super) enum Outgoing {
    Frame(String),
    /// A group message or notification, live or from a catch-up.
    Live(LiveFrame),
    /// An ephemeral frame (typing, presence, a reaction) shared by every
    /// connection it goes to; it moves no place.
    Signal(SignalFrame),
    /// Everything of the feed up to this stream sequence is queued before
    /// this: once written, the device's place may move there.
    Through(Feed, u64),
    Close(u16, &'static str),
}

impl Outgoing {
    /// Bytes this holds, counted against the connection's budget.
    pub(super) fn size(&self) -> usize {
        match self {
            Outgoing::Frame(text) => text.len(),
            Outgoing::Live(f) => f.text.len(),
            Outgoing::Signal(s) => s.text.len(),
            Outgoing::Through(..) => 0,
            Outgoing::Close(_, reason) => reason.len(),
        }
    }
}

/// The way into a connection's writer: frames in order, bounded in count
/// (`outbox_frames`) and in bytes (`outbox_bytes`), and a close that
/// never waits behind them, so a connection whose client stopped reading can
/// still be closed.
#[derive(Clone)]
pub(super) struct Outbox {
    pub(super) tx: Sender,
    pub(super) budget: Arc<Semaphore>,
    pub(super) budget_bytes: usize,
    pub(super) close: Closer,
    /// Where the connection's view of each group starts (shared with its
    /// catch-ups and writer), forgotten for a group it follows anew.
    pub(super) visibility: Arc<Visibility>,
}

/// The writer's end of an [`Outbox`].
pub(super) struct Inbox {
    pub(super) rx: Receiver,
    pub(super) close: Closer,
}

/// A close asked for out of band: the first one asked wins. A slot, a
/// flag and the writer's waker, about 80 bytes, where a channel of one
/// cost an idle connection about 1 KiB. One waiter only (the writer), so
/// a waker rather than a `Notify`: the writer checks for a close before
/// every frame, and a `Notify`'s wait, made or polled again each time,
/// took its waiters' lock (3–5 % of the edge in fan-out); this is an
/// atomic load.
#[derive(Clone, Default)]
pub(super) struct Closer(Arc<CloseState>);

#[derive(Default)]
struct CloseState {
    slot: std::sync::Mutex<Option<(u16, &'static str)>>,
    asked: std::sync::atomic::AtomicBool,
    writer: futures::task::AtomicWaker,
}

impl Closer {
    fn ask(&self, code: u16, reason: &'static str) {
        let mut slot = self.0.slot.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some((code, reason));
            self.0.asked.store(true, Ordering::Release);
            self.0.writer.wake();
        }
    }

    /// The close asked for, if any.
    fn taken(&self) -> Option<(u16, &'static str)> {
        if !self.0.asked.load(Ordering::Acquire) {
            return None;
        }
        *self.0.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The close asked for, once there is one (for the writer only: it
    /// wakes one waiter).
    pub(super) fn asked(&self) -> impl Future<Output = (u16, &'static str)> + '_ {
        woken_when(&self.0.writer, || self.taken())
    }

    /// The close asked for, if any (tests).
    #[cfg(test)]
    pub(super) fn peek(&self) -> Option<(u16, &'static str)> {
        self.taken()
    }
}

/// What `ready` gives, once it gives something: checked, then again after
/// `waker` holds the task's waker, so that a wake-up between the two is not
/// missed. For the writer only (one waiter per waker).
fn woken_when<'a, T>(
    waker: &'a futures::task::AtomicWaker,
    ready: impl Fn() -> Option<T> + 'a,
) -> impl Future<Output = T> + 'a {
    std::future::poll_fn(move |cx| {
        if let Some(v) = ready() {
            return std::task::Poll::Ready(v);
        }
        waker.register(cx.waker());
        match ready() {
            Some(v) => std::task::Poll::Ready(v),
            None => std::task::Poll::Pending,
        }
    })
}

/// What a queued frame holds: the frame and its share of the byte budget.
type Queued = (Outgoing, OwnedSemaphorePermit);

/// Why a frame was not queued.
pub(super) enum TrySendError {
    /// The queue holds its bound: the writer is that far behind.
    Full,
    /// The writer is gone.
    Closed,
}

/// The frames between a connection's senders and its writer, bounded in
/// count. A list under a lock that allocates only once frames are queued:
/// a tokio channel allocates a block of 32 slots (about 3 KiB here) when
/// it is made, a sixth of an idle connection's memory.
struct Queue {
    items: std::sync::Mutex<Items>,
    bound: usize,
    wake_bytes: usize,
    /// The one receiver, woken by a frame, the last sender's drop or a close.
    writer: futures::task::AtomicWaker,
    /// Senders waiting for a slot, woken one at a time as slots free up.
    room: tokio::sync::Notify,
    senders: std::sync::atomic::AtomicUsize,
    /// Set by the writer while it gathers frames for a flush its timer
    /// will make: a frame that is not a reply then does not wake it (the
    /// timer does, and it takes them all at once) until [`WAKE_AT`] wait.
    gathering: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Items {
    list: std::collections::VecDeque<Queued>,
    /// Of the byte budget, what the queued frames hold.
    bytes: usize,
    closed: bool,
}

/// Above this many slots, an emptied queue gives its memory back.
const KEPT_SLOTS: usize = 64;

/// Frames that wake a gathering writer all the same: it feeds them to the
/// socket's buffer, so the queue (and its byte budget) does not fill up
/// behind a long window. So do queued frames holding a quarter of the
/// connection's byte budget.
const WAKE_AT: usize = 16;

/// A queue of at most `bound` frames, whose writer is woken while it
/// gathers once the frames hold `wake_bytes`.
fn queue(bound: usize, wake_bytes: usize) -> (Sender, Receiver) {
    let q = Arc::new(Queue {
        items: std::sync::Mutex::default(),
        bound,
        wake_bytes,
        writer: futures::task::AtomicWaker::new(),
        room: tokio::sync::Notify::new(),
        senders: std::sync::atomic::AtomicUsize::new(1),
        gathering: std::sync::atomic::AtomicBool::new(false),
    });
    (Sender(q.clone()), Receiver(q))
}

impl Queue {
    fn items(&self) -> std::sync::MutexGuard<'_, Items> {
        self.items.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A sending end; the writer's [`Receiver`] ends once the last is dropped.
pub(super) struct Sender(Arc<Queue>);

impl Clone for Sender {
    fn clone(&self) -> Self {
        self.0.senders.fetch_add(1, Ordering::Relaxed);
        Self(self.0.clone())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if self.0.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.writer.wake();
        }
    }
}

impl Sender {
    /// Queues `item` if there is a slot; whether one is left after it.
    fn push(&self, item: Queued) -> Result<bool, (TrySendError, Queued)> {
        // a reply's client waits for it
        let urgent = matches!(item.0, Outgoing::Frame(_) | Outgoing::Close(..));
        let (queued, bytes) = {
            let mut items = self.0.items();
            if items.closed {
                return Err((TrySendError::Closed, item));
            }
            if items.list.len() >= self.0.bound {
                return Err((TrySendError::Full, item));
            }
            items.bytes += item.1.num_permits();
            items.list.push_back(item);
            (items.list.len(), items.bytes)
        };
        // read after the push: a writer that stops gathering looks at the
        // queue after it says so, under the same lock, so one of the two
        // sees the other
        if urgent
            || queued >= WAKE_AT
            || bytes >= self.0.wake_bytes
            || !self.0.gathering.load(Ordering::SeqCst)
        {
            self.0.writer.wake();
        }
        Ok(queued < self.0.bound)
    }

    pub(super) fn try_send(&self, item: Queued) -> Result<(), TrySendError> {
        self.push(item).map(drop).map_err(|(why, _)| why)
    }

    /// Queues `item` once there is a slot; an error if the writer is gone.
    pub(super) async fn send(&self, mut item: Queued) -> Result<(), ()> {
        loop {
            let room = self.0.room.notified();
            tokio::pin!(room);
            // registered before the check: a slot freed between the check
            // and the wait still wakes it
            room.as_mut().enable();
            match self.push(item) {
                Ok(more) => {
                    if more {
                        // the wake-up that brought it may have been the
                        // only one for several free slots: pass it on
                        self.0.room.notify_one();
                    }
                    return Ok(());
                }
                Err((TrySendError::Closed, _)) => return Err(()),
                Err((TrySendError::Full, back)) => item = back,
            }
            room.await;
        }
    }

    /// Free slots.
    pub(super) fn room(&self) -> usize {
        self.0.bound.saturating_sub(self.0.items().list.len())
    }

    pub(super) fn bound(&self) -> usize {
        self.0.bound
    }
}

/// The writer's end.
pub(super) struct Receiver(Arc<Queue>);

impl Receiver {
    /// The next frame; `None` once every sender is gone and nothing is left,
    /// or after [`Receiver::close`].
    pub(super) fn recv(&mut self) -> impl Future<Output = Option<Queued>> + '_ {
        woken_when(&self.0.writer, || self.taken())
    }

    /// The next frame if there is one (`Some(None)`: there will be none).
    fn taken(&self) -> Option<Option<Queued>> {
        let mut items = self.0.items();
        if items.closed {
            return Some(None);
        }
        let was_full = items.list.len() >= self.0.bound;
        match items.list.pop_front() {
            Some(next) => {
                items.bytes = items.bytes.saturating_sub(next.1.num_permits());
                if items.list.is_empty() && items.list.capacity() > KEPT_SLOTS {
                    items.list.shrink_to(KEPT_SLOTS);
                }
                drop(items);
                if was_full {
                    self.0.room.notify_one();
                }
                Some(Some(next))
            }
            None if self.0.senders.load(Ordering::Acquire) == 0 => Some(None),
            None => None,
        }
    }

    /// The next frame if one is queued now.
    #[cfg(test)]
    pub(super) fn try_recv(&mut self) -> Option<Queued> {
        self.taken().flatten()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.items().list.is_empty()
    }

    /// Whether the writer gathers frames for a flush its armed timer will
    /// make (only then may frames not wake it).
    pub(super) fn gathering(&self, on: bool) {
        // read first: the writer asks before every frame, and a store is
        // a locked instruction where a load is not
        if self.0.gathering.load(Ordering::Relaxed) != on {
            self.0.gathering.store(on, Ordering::SeqCst);
        }
    }

    /// No frame is queued from now on; what was queued is dropped (its
    /// budget freed) and waiting senders are told.
    pub(super) fn close(&mut self) {
        let dropped = {
            let mut items = self.0.items();
            items.closed = true;
            items.bytes = 0;
            std::mem::take(&mut items.list)
        };
        drop(dropped);
        self.0.room.notify_waiters();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.close();
    }
}

impl Outbox {
    pub(super) fn new(frames: usize, bytes: usize) -> (Self, Inbox) {
        let bytes = bytes.clamp(1, Semaphore::MAX_PERMITS);
        let (tx, rx) = queue(frames.max(1), (bytes / 4).max(1));
        let close = Closer::default();
        (
            Self {
                tx,
                budget: Arc::new(Semaphore::new(bytes)),
                budget_bytes: bytes,
                close: close.clone(),
                visibility: Arc::default(),
            },
            Inbox { rx, close },
        )
    }

    /// Queues `out` once there is room; an error if the writer is gone.
    pub(super) async fn send(&self, out: Outgoing) -> Result<(), ()> {
        // a frame larger than the whole budget takes all of it
        let n = out.size().clamp(1, self.budget_bytes);
        let permit = self
            .budget
            .clone()
            .acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
            .await
            .map_err(|_| ())?;
        self.tx.send((out, permit)).await
    }
}

impl Outbox {
    /// Asks the writer to close the connection now, ahead of what is queued.
    pub(super) fn close_now(&self, code: u16, reason: &'static str) {
        self.close.ask(code, reason);
    }
}

impl Sink for Outbox {
    /// A member removed and added again may see the group from a later
    /// `seq` now (`joined` history): what was known of its view goes.
    fn followed(&self, group: &str) {
        self.visibility.forget(group);
    }

    /// Queues a live frame without waiting: a connection whose queue is full
    /// fell too far behind and is closed (it resumes from its position).
    fn offer(&self, frame: LiveFrame) -> Result<(), bool> {
        use tokio::sync::TryAcquireError;
        let out = Outgoing::Live(frame);
        let n = out.size().clamp(1, self.budget_bytes);
        let permit = match self
            .budget
            .clone()
            .try_acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
        {
            Ok(p) => p,
            Err(TryAcquireError::NoPermits) => {
                self.close_now(CLOSE_TOO_SLOW, "client too slow; reconnect");
                return Err(true);
            }
            Err(TryAcquireError::Closed) => return Err(false),
        };
        match self.tx.try_send((out, permit)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full) => {
                self.close_now(CLOSE_TOO_SLOW, "client too slow; reconnect");
                Err(true)
            }
            Err(TrySendError::Closed) => Err(false),
        }
    }

    fn offer_signal(&self, frame: SignalFrame) -> bool {
        // signals take at most half the queue: they never fill it for the
        // messages, whose next one would find it full and close the
        // connection as too slow
        if self.tx.room() * 2 < self.tx.bound()
            || self.budget.available_permits() * 2 < self.budget_bytes
        {
            return false;
        }
        let out = Outgoing::Signal(frame);
        let n = out.size().clamp(1, self.budget_bytes);
        let Ok(permit) = self
            .budget
            .clone()
            .try_acquire_many_owned(u32::try_from(n).unwrap_or(u32::MAX))
        else {
            return false;
        };
        self.tx.try_send((out, permit)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_waiting_writer_is_woken_by_the_first_close_asked() {
        let close = Closer::default();
        let waiting = tokio::spawn({
            let close = close.clone();
            async move { close.asked().await }
        });
        tokio::task::yield_now().await;
        close.ask(CLOSE_TOO_SLOW, "too slow");
        close.ask(CLOSE_RESTART, "restart");
        let asked = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("ran");
        assert_eq!(asked, (CLOSE_TOO_SLOW, "too slow"));
        // asked again later, it is still the first
        assert_eq!(close.asked().await, (CLOSE_TOO_SLOW, "too slow"));
    }

    fn frame(bytes: usize, seq: u64) -> LiveFrame {
        LiveFrame {
            text: Utf8Bytes::from("x".repeat(bytes)),
            group: "g".into(),
            seq,
            stream_seq: seq,
            feed: Feed::Groups,
            caught_up: false,
            place: seq,
            restricted: Restriction::None,
        }
    }

    fn live(bytes: usize, seq: u64) -> Queued {
        let budget = Arc::new(Semaphore::new(bytes));
        let n = u32::try_from(bytes).expect("small");
        let permit = budget.try_acquire_many_owned(n).expect("its bytes");
        (Outgoing::Live(frame(bytes, seq)), permit)
    }

    fn seq_of((out, _): Queued) -> u64 {
        match out {
            Outgoing::Live(f) => f.seq,
            _ => 0,
        }
    }

    #[test]
    fn an_idle_queue_holds_no_slots_and_an_emptied_one_gives_them_back() {
        let (tx, mut rx) = queue(1024, usize::MAX);
        assert_eq!(rx.0.items().list.capacity(), 0);
        for seq in 0..500 {
            assert!(tx.try_send(live(10, seq)).is_ok());
        }
        assert!(rx.0.items().list.capacity() >= 500);
        let seqs: Vec<u64> = std::iter::from_fn(|| rx.try_recv()).map(seq_of).collect();
        assert_eq!(seqs, (0..500).collect::<Vec<_>>());
        assert!(rx.0.items().list.capacity() <= KEPT_SLOTS);
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_gathering_writer_is_woken_by_replies_and_a_full_handful_only() {
        let (tx, mut rx) = queue(1024, 1000);
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let mut sleep = |rx: &mut Receiver| {
            let mut next = std::pin::pin!(rx.recv());
            assert!(next.as_mut().poll(&mut cx).is_pending(), "nothing queued");
        };
        let woken = || wakes.0.load(Ordering::SeqCst);
        sleep(&mut rx);
        rx.gathering(true);
        for seq in 0..WAKE_AT as u64 - 1 {
            assert!(tx.try_send(live(10, seq)).is_ok());
        }
        assert_eq!(woken(), 0, "frames the timer takes wake nobody");
        assert!(tx.try_send(live(10, 99)).is_ok());
        assert_eq!(woken(), 1, "a full handful wakes the writer");
        std::iter::from_fn(|| rx.try_recv()).for_each(drop);
        sleep(&mut rx);
        let reply = Arc::new(Semaphore::new(10))
            .try_acquire_many_owned(1)
            .expect("permit");
        assert!(
            tx.try_send((Outgoing::Frame("reply".into()), reply))
                .is_ok()
        );
        assert_eq!(woken(), 2, "a reply wakes it at once");
        std::iter::from_fn(|| rx.try_recv()).for_each(drop);
        sleep(&mut rx);
        // frames holding a quarter of the byte budget wake it too
        assert!(tx.try_send(live(10, 100)).is_ok());
        assert_eq!(woken(), 2);
        assert!(tx.try_send(live(990, 101)).is_ok());
        assert_eq!(woken(), 3, "the queued frames hold 1,000 bytes");
        std::iter::from_fn(|| rx.try_recv()).for_each(drop);
        sleep(&mut rx);
        rx.gathering(false);
        assert!(tx.try_send(live(10, 102)).is_ok());
        assert_eq!(woken(), 4, "not gathering, every frame wakes it");
    }

    #[tokio::test]
    async fn senders_waiting_for_slots_all_get_through_in_turn() {
        let (tx, mut rx) = queue(2, usize::MAX);
        assert!(tx.try_send(live(1, 0)).is_ok());
        assert!(tx.try_send(live(1, 1)).is_ok());
        assert!(matches!(tx.try_send(live(1, 9)), Err(TrySendError::Full)));
        let waiting: Vec<_> = (2..6)
            .map(|seq| {
                let tx = tx.clone();
                tokio::spawn(async move { tx.send(live(1, seq)).await })
            })
            .collect();
        drop(tx);
        // the writer takes frames several at a time: every waiter gets a
        // slot, none waits for a wake-up that went to another
        let mut got = Vec::new();
        while let Some(next) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no sender is stuck")
        {
            got.push(seq_of(next));
            if let Some(next) = rx.try_recv() {
                got.push(seq_of(next));
            }
        }
        for w in waiting {
            assert_eq!(w.await.expect("ran"), Ok(()));
        }
        got.sort_unstable();
        assert_eq!(got, [0, 1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn the_writer_ends_once_the_last_sender_is_gone_and_its_frames_are_taken() {
        let (tx, mut rx) = queue(4, usize::MAX);
        let other = tx.clone();
        assert!(tx.try_send(live(1, 1)).is_ok());
        drop(tx);
        let ended = tokio::spawn(async move {
            let mut seqs = Vec::new();
            while let Some(next) = rx.recv().await {
                seqs.push(seq_of(next));
            }
            seqs
        });
        tokio::task::yield_now().await;
        assert!(other.try_send(live(1, 2)).is_ok());
        drop(other);
        let seqs = tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("ended")
            .expect("ran");
        assert_eq!(seqs, [1, 2]);
    }

    #[tokio::test]
    async fn a_sender_waiting_for_a_slot_is_told_when_the_writer_closes() {
        let (tx, mut rx) = queue(1, usize::MAX);
        assert!(tx.try_send(live(1, 1)).is_ok());
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(live(1, 2)).await }
        });
        tokio::task::yield_now().await;
        rx.close();
        let sent = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .expect("ran");
        assert_eq!(sent, Err(()));
        assert!(matches!(tx.try_send(live(1, 3)), Err(TrySendError::Closed)));
    }

    #[test]
    fn a_full_queue_refuses_a_live_frame_and_asks_for_a_close() {
        let (tx, mut inbox) = Outbox::new(2, 1024);
        assert_eq!(tx.offer(frame(10, 1)), Ok(()));
        assert_eq!(tx.offer(frame(10, 2)), Ok(()));
        assert_eq!(tx.offer(frame(10, 3)), Err(true));
        assert_eq!(
            inbox.close.peek(),
            Some((CLOSE_TOO_SLOW, "client too slow; reconnect"))
        );
        // what was queued stays, in order
        let seqs: Vec<u64> = std::iter::from_fn(|| inbox.rx.try_recv())
            .filter_map(|(out, _)| match out {
                Outgoing::Live(f) => Some(f.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [1, 2]);
    }

    #[test]
    fn the_byte_budget_bounds_the_queue_too() {
        let (tx, _inbox) = Outbox::new(100, 25);
        assert_eq!(tx.offer(frame(10, 1)), Ok(()));
        assert_eq!(tx.offer(frame(10, 2)), Ok(()));
        assert_eq!(tx.offer(frame(10, 3)), Err(true));
    }

    #[test]
    fn a_signal_that_finds_no_room_is_dropped_and_closes_nothing() {
        let (tx, mut inbox) = Outbox::new(1, 1024);
        assert_eq!(tx.offer(frame(10, 1)), Ok(()));
        assert!(!tx.offer_signal(Utf8Bytes::from("typing").into()));
        assert_eq!(inbox.close.peek(), None);
        let _ = inbox.rx.try_recv();
        assert!(tx.offer_signal(Utf8Bytes::from("typing").into()));
    }

    #[test]
    fn signals_leave_half_the_queue_to_messages() {
        let (tx, _inbox) = Outbox::new(4, 1024);
        assert!(tx.offer_signal(Utf8Bytes::from("s1").into()));
        assert!(tx.offer_signal(Utf8Bytes::from("s2").into()));
        assert!(
            tx.offer_signal(Utf8Bytes::from("s3").into()),
            "half free before it"
        );
        assert!(!tx.offer_signal(Utf8Bytes::from("s4").into()));
        // a message still finds room
        assert_eq!(tx.offer(frame(10, 1)), Ok(()));
    }

    #[test]
    fn a_writer_that_is_gone_is_not_a_slow_client() {
        let (tx, inbox) = Outbox::new(2, 1024);
        drop(inbox);
        assert_eq!(tx.offer(frame(10, 1)), Err(false));
    }
}
