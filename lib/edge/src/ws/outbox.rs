//! A connection's way to its writer: bounded in frames and bytes, with a
//! close that never waits behind them.

use super::*;

/// What the writer task puts on the socket.
pub(super) enum Outgoing {
    Frame(String),
    /// A group message or notification, live or from a catch-up.
    Live(LiveFrame),
    /// An ephemeral frame (typing) shared by every connection it goes to;
    /// it moves no place.
    Signal(Utf8Bytes),
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
            Outgoing::Signal(text) => text.len(),
            Outgoing::Through(..) => 0,
            Outgoing::Close(_, reason) => reason.len(),
        }
    }
}

/// The way into a connection's writer: frames in order, bounded in count
/// (`outbox_frames`) and in bytes (`outbox_bytes`), and a close channel that
/// never waits behind them, so a connection whose client stopped reading can
/// still be closed.
#[derive(Clone)]
pub(super) struct Outbox {
    pub(super) tx: mpsc::Sender<(Outgoing, OwnedSemaphorePermit)>,
    pub(super) budget: Arc<Semaphore>,
    pub(super) budget_bytes: usize,
    pub(super) close: Closer,
    /// Where the connection's view of each group starts (shared with its
    /// catch-ups and writer), forgotten for a group it follows anew.
    pub(super) visibility: Arc<Visibility>,
}

/// The writer's end of an [`Outbox`].
pub(super) struct Inbox {
    pub(super) rx: mpsc::Receiver<(Outgoing, OwnedSemaphorePermit)>,
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
        std::future::poll_fn(|cx| {
            if let Some(close) = self.taken() {
                return std::task::Poll::Ready(close);
            }
            self.0.writer.register(cx.waker());
            match self.taken() {
                Some(close) => std::task::Poll::Ready(close),
                None => std::task::Poll::Pending,
            }
        })
    }

    /// The close asked for, if any (tests).
    #[cfg(test)]
    pub(super) fn peek(&self) -> Option<(u16, &'static str)> {
        self.taken()
    }
}

impl Outbox {
    pub(super) fn new(frames: usize, bytes: usize) -> (Self, Inbox) {
        let (tx, rx) = mpsc::channel(frames.max(1));
        let close = Closer::default();
        let bytes = bytes.clamp(1, Semaphore::MAX_PERMITS);
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
        self.tx.send((out, permit)).await.map_err(|_| ())
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
        use tokio::sync::{TryAcquireError, mpsc::error::TrySendError};
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
            Err(TrySendError::Full(_)) => {
                self.close_now(CLOSE_TOO_SLOW, "client too slow; reconnect");
                Err(true)
            }
            Err(TrySendError::Closed(_)) => Err(false),
        }
    }

    fn offer_signal(&self, frame: Utf8Bytes) -> bool {
        // signals take at most half the queue: they never fill it for the
        // messages, whose next one would find it full and close the
        // connection as too slow
        if self.tx.capacity() * 2 < self.tx.max_capacity()
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
            restricted: false,
        }
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
        let seqs: Vec<u64> = std::iter::from_fn(|| inbox.rx.try_recv().ok())
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
        assert!(!tx.offer_signal(Utf8Bytes::from("typing")));
        assert_eq!(inbox.close.peek(), None);
        let _ = inbox.rx.try_recv();
        assert!(tx.offer_signal(Utf8Bytes::from("typing")));
    }

    #[test]
    fn signals_leave_half_the_queue_to_messages() {
        let (tx, _inbox) = Outbox::new(4, 1024);
        assert!(tx.offer_signal(Utf8Bytes::from("s1")));
        assert!(tx.offer_signal(Utf8Bytes::from("s2")));
        assert!(
            tx.offer_signal(Utf8Bytes::from("s3")),
            "half free before it"
        );
        assert!(!tx.offer_signal(Utf8Bytes::from("s4")));
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
