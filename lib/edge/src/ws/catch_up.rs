//! Catching a device up from its durable consumer, and the hand-over to
//! the live feed.

use super::*;

/// Most messages one pull asks for.
pub(super) const PULL_BATCH: usize = 256;
/// How long one pull stays open; also the longest a closing session takes to
/// hand back what it holds.
pub(super) const PULL_EXPIRES: Duration = Duration::from_secs(2);
/// How long a delivery may wait for room in a client's queue.
pub(super) const SLOW_CLIENT: Duration = Duration::from_secs(30);
/// A delivery from JetStream, acknowledged once written.
pub(super) struct Delivery {
    /// `None`: written to this connection before (the consumer gave it
    /// again after a rewind); acknowledged in order, not written twice.
    pub(super) text: Option<Utf8Bytes>,
    pub(super) msg: Box<JsMessage>,
    /// For group messages: the group and seq to report as delivered.
    pub(super) receipt: Option<(String, u64)>,
    /// The consumer's rewinds when this was handed on, and the counter: a
    /// delivery from before a rewind is never acknowledged (a late ack of
    /// it would move the rewound consumer's floor past what comes again).
    pub(super) rewinds: (u64, Arc<std::sync::atomic::AtomicU64>),
}

impl Delivery {
    /// Whether the consumer was rewound since this was handed on.
    pub(super) fn stale(&self) -> bool {
        self.rewinds.1.load(std::sync::atomic::Ordering::SeqCst) != self.rewinds.0
    }
}

/// Streams one durable consumer to the writer until `stop`, in pull batches
/// that end within `PULL_EXPIRES`. On connect it rewinds the consumer to its
/// ack floor, so whatever an earlier session was given and did not deliver
/// comes again first and in order; on stop it simply drops the open pull.
/// The writer's bounded queue pushes back on the consumer; a client that
/// takes nothing for `SLOW_CLIENT` is closed.
pub(super) async fn deliver(
    app: AppState,
    feed: Feed,
    (user, device): (UserId, DeviceId),
    tx: Outbox,
    mut stop: watch::Receiver<bool>,
    live: Option<Arc<Registration>>,
    visibility: Option<Arc<Visibility>>,
) {
    let consumer = match feed {
        Feed::User => chat_bus::user_consumer_name(&user, &device),
        Feed::Groups => chat_bus::group_consumer_name(&user, &device),
    };
    let mut backoff = Duration::from_millis(100);
    // the newest stream sequence handed to the writer: what the consumer
    // gives again after a rewind is acknowledged, not written twice
    let mut seen = Sequence::default();
    // rewinds after lost deliveries; the writer acknowledges nothing handed
    // on before the latest one
    let rewinds = Arc::new(std::sync::atomic::AtomicU64::new(0));
    // a rewind is owed (deliveries were lost): pull nothing until it is done
    let mut owed = false;
    'bind: loop {
        // read before the bind reads the consumer's state: with nothing
        // pending in that state, the device is caught up to here
        let feed_before_bind = live.as_ref().map(|l| l.hub_position());
        // the consumer handle and every call on it are boxed, so that an idle
        // delivery task holds only its open pull (7.2 KiB before)
        let c = match Box::pin(app.bus.bind(feed, &user, &device)).await {
            Ok(c) => Box::new(c),
            Err(e @ (BusError::NoConsumer(_) | BusError::Foreign(_))) => {
                evicted(&tx, &e);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, consumer, "cannot bind consumer");
                if !pause(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // A previous session of this device (a reconnect) may still hold an
        // open pull; wait for it to end (bounded: after a crash it simply
        // expires), then rewind to the ack floor.
        // (the bind read the consumer's state: no other call when nothing
        // waits, as on most connects)
        let deadline = tokio::time::Instant::now() + PULL_EXPIRES + Duration::from_secs(1);
        let mut waiting = c.cached_info().num_waiting > 0;
        // nothing handed out and not acknowledged, nobody pulling, nothing
        // lost: the rewind would change nothing, so it is skipped (a
        // JetStream API request per connect less; they bound session
        // opening, BENCHMARKS.md)
        let clean = !owed && !waiting && c.cached_info().num_ack_pending == 0;
        while waiting && tokio::time::Instant::now() < deadline {
            if !pause(Duration::from_millis(50), &mut stop).await {
                return;
            }
            waiting = matches!(Box::pin(c.get_info()).await, Ok(info) if info.num_waiting > 0);
        }
        // read before the rewind: with nothing pending after it, the device
        // is caught up to here (see `hand_over`)
        let feed_was_at = live.as_ref().map(|l| l.hub_position());
        // the consumer sequence the next delivery must carry: every delivery
        // counts one, so a jump means deliveries that never reached this
        // edge (a NATS node died with them in flight, a pull ended as they
        // came); acknowledging past them (`AckPolicy::All`) would lose them
        seen.rebound(None);
        let rewound = if clean {
            let info = c.cached_info();
            Ok(chat_bus::Rewound {
                delivered: info.delivered.consumer_sequence,
                pending: info.num_pending,
            })
        } else {
            Box::pin(app.bus.reset(feed, &user, &device)).await
        };
        // the state the pending count comes from was read after this
        let feed_was_at = if clean { feed_before_bind } else { feed_was_at };
        match rewound {
            Ok(rewound) => {
                seen.rebound(Some(rewound.delivered));
                owed = false;
                if let (Some(live), Some(feed_was_at), 0) = (&live, feed_was_at, rewound.pending) {
                    // nothing missed: live at once, with no further call
                    match attach(live, feed_was_at.max(seen.forwarded), &tx).await {
                        HandOver::Done => return,
                        HandOver::More | HandOver::Wait => {}
                    }
                }
            }
            Err(e) if owed => {
                // pulling now would let the next ack cover the lost ones
                tracing::warn!(error = %e, consumer, "cannot rewind consumer yet; retrying");
                if !pause(backoff, &mut stop).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue 'bind;
            }
            Err(e) => {
                tracing::warn!(error = %e, consumer, "cannot rewind consumer; redeliveries may come late");
            }
        }
        loop {
            if let Some(live) = &live {
                match Box::pin(hand_over(&c, live, seen.forwarded, &tx)).await {
                    HandOver::Done => return,
                    HandOver::More => {}
                    HandOver::Wait => {
                        if !pause(Duration::from_millis(100), &mut stop).await {
                            return;
                        }
                    }
                }
            }
            let batch = if live.is_some() {
                // catching up: what is there now, without waiting for more
                Box::pin(c.fetch().max_messages(PULL_BATCH).messages()).await
            } else {
                Box::pin(
                    c.batch()
                        .max_messages(PULL_BATCH)
                        .expires(PULL_EXPIRES)
                        .messages(),
                )
                .await
            };
            let mut batch = match batch {
                Ok(b) => Box::pin(b),
                Err(e) => {
                    tracing::warn!(error = %e, consumer, "cannot pull from consumer");
                    break;
                }
            };
            loop {
                let next = tokio::select! {
                    n = batch.next() => n,
                    _ = stop.changed() => return,
                };
                let msg = match next {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, consumer, "pull batch ended early");
                        // the consumer may be gone (an evicted device); a
                        // rebind would rewind, so only look
                        if let Err(e @ (BusError::NoConsumer(_) | BusError::Foreign(_))) =
                            Box::pin(app.bus.bind(feed, &user, &device)).await
                        {
                            evicted(&tx, &e);
                            return;
                        }
                        break;
                    }
                    None => break,
                };
                let mut repeat = false;
                // what was handed on before this delivery: restored if this
                // one is not handed on after all and must come again
                let forwarded_before = seen.forwarded;
                if let Ok(info) = msg.info() {
                    metrics::histogram!("chat_consumer_pending", "feed" => feed.label())
                        .record(info.pending as f64);
                    let (c, stream_seq) = (info.consumer_sequence, info.stream_sequence);
                    let verdict = seen.check(c, stream_seq);
                    if let Verdict::Lost { expected } = verdict {
                        metrics::counter!("chat_delivery_gaps_total", "feed" => feed.label())
                            .increment(1);
                        tracing::warn!(
                            consumer,
                            expected,
                            got = c,
                            "deliveries lost on the way; rewinding to the ack floor"
                        );
                        // nothing after the lost ones was handed on; what
                        // was is never acknowledged now (it comes again);
                        // bind again, which waits for this pull to end and
                        // rewinds
                        rewinds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        owed = true;
                        continue 'bind;
                    }
                    repeat = verdict == Verdict::Repeat;
                }
                let opened = match feed {
                    Feed::User => std::str::from_utf8(&msg.payload)
                        .map(|t| (Utf8Bytes::from(t.to_owned()), None))
                        .map_err(|e| e.to_string()),
                    Feed::Groups => {
                        open_group_message(&app, &msg).map(|o| (o.text, Some((o.group, o.seq))))
                    }
                };
                let (text, mut receipt) = match opened {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(consumer, error = %e, "undeliverable payload on the bus; dropping it");
                        let _ = msg.ack_with(AckKind::Term).await;
                        continue;
                    }
                };
                // from before the user joined a group with `joined` history:
                // acknowledged in order like a repeat, never written
                let hidden = match (&visibility, &receipt) {
                    (Some(v), Some((group, seq))) => {
                        match v.hides(&app, &user, group, *seq).await {
                            Ok(hidden) => hidden,
                            Err(e) => {
                                tracing::warn!(error = %e, consumer, group, "cannot tell whether a message predates the member; rewinding");
                                // not handed on: after the rewind it is new
                                seen.forwarded = forwarded_before;
                                rewinds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                owed = true;
                                if !pause(backoff, &mut stop).await {
                                    return;
                                }
                                backoff = (backoff * 2).min(Duration::from_secs(5));
                                continue 'bind;
                            }
                        }
                    }
                    _ => false,
                };
                if hidden {
                    receipt = None;
                }
                let out = Outgoing::Delivery(Delivery {
                    text: (!repeat && !hidden).then_some(text),
                    msg: Box::new(msg),
                    receipt,
                    rewinds: (
                        rewinds.load(std::sync::atomic::Ordering::SeqCst),
                        rewinds.clone(),
                    ),
                });
                match tokio::time::timeout(SLOW_CLIENT, tx.send(out)).await {
                    Ok(Ok(())) => {}
                    // the session is over
                    Ok(Err(())) => return,
                    Err(_) => {
                        tx.close_now(CLOSE_TOO_SLOW, "client too slow; reconnect");
                        return;
                    }
                }
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

/// Where a catch-up stands after a look at its consumer.
pub(super) enum HandOver {
    /// Attached to the live feed: the catch-up is over.
    Done,
    /// More to take from the consumer first.
    More,
    /// Try again shortly (the consumer did not answer, or the live feed is
    /// not reading yet).
    Wait,
}

/// Hands a caught-up device over to the live feed: once its consumer has
/// nothing pending, everything of its groups up to the newest stream
/// sequence handed on (`forwarded`), or up to the feed's position read
/// before the consumer was asked, is queued; the feed gives the rest.
pub(super) async fn hand_over(
    c: &async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>,
    live: &Registration,
    forwarded: u64,
    tx: &Outbox,
) -> HandOver {
    let feed_was_at = live.hub_position();
    let info = match c.get_info().await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "cannot ask the consumer how far it is");
            return HandOver::Wait;
        }
    };
    if info.num_pending > 0 {
        return HandOver::More;
    }
    tracing::debug!(
        feed_was_at,
        forwarded,
        floor = info.ack_floor.stream_sequence,
        "caught up; going live"
    );
    attach(live, feed_was_at.max(forwarded), tx).await
}

/// Attaches a connection caught up to stream sequence `through`.
pub(super) async fn attach(live: &Registration, through: u64, tx: &Outbox) -> HandOver {
    match live.attach(through) {
        Ok(()) => {
            let _ = tx.send(Outgoing::Through(through)).await;
            HandOver::Done
        }
        Err(NotYet::Overflowed) => HandOver::More,
        Err(NotYet::NotRunning) => HandOver::Wait,
        Err(NotYet::Closed) => HandOver::Done,
    }
}

/// What the delivery task knows of one consumer's deliveries: the delivery
/// count the next one must carry, and the newest stream sequence handed on.
#[derive(Debug, Default)]
pub(super) struct Sequence {
    /// `None` until a delivery or a rewind sets it.
    pub(super) expected: Option<u64>,
    pub(super) forwarded: u64,
}

/// What to do with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// New: write it.
    Deliver,
    /// Handed on before (it came again after a rewind): acknowledge it in
    /// order, do not write it twice.
    Repeat,
    /// Deliveries from `expected` on never arrived: hand on nothing more and
    /// rewind, or the next acknowledgement (`AckPolicy::All`) covers them.
    Lost { expected: u64 },
}

impl Sequence {
    /// Bound again: `delivered` is the consumer's delivery count after a
    /// rewind, if one was made (otherwise the next delivery sets the count).
    pub(super) fn rebound(&mut self, delivered: Option<u64>) {
        self.expected = delivered.map(|d| d + 1);
    }

    /// Checks a delivery with delivery count `consumer_seq` of the message at
    /// `stream_seq`. Every delivery, repeats included, counts one; a count
    /// lower than expected (a new consumer leader that knew less) is taken
    /// as the new baseline.
    pub(super) fn check(&mut self, consumer_seq: u64, stream_seq: u64) -> Verdict {
        if let Some(expected) = self.expected
            && consumer_seq > expected
        {
            return Verdict::Lost { expected };
        }
        self.expected = Some(consumer_seq + 1);
        if stream_seq <= self.forwarded {
            return Verdict::Repeat;
        }
        self.forwarded = stream_seq;
        Verdict::Deliver
    }
}

/// Closes a connection whose device has no consumer to deliver from, ever:
/// evicted (another device of the user took its place), or not this
/// device's.
pub(super) fn evicted(tx: &Outbox, e: &BusError) {
    tracing::info!(error = %e, "device has no consumer; closing");
    tx.close_now(CLOSE_EVICTED, "device evicted; reconnect");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_deliveries_are_delivered() {
        let mut s = Sequence::default();
        // the first one sets the count when no rewind did
        assert_eq!(s.check(7, 100), Verdict::Deliver);
        assert_eq!(s.check(8, 105), Verdict::Deliver);
        assert_eq!(s.check(9, 106), Verdict::Deliver);
    }

    #[test]
    fn a_jump_in_the_delivery_count_is_a_loss_and_hands_nothing_on() {
        let mut s = Sequence::default();
        s.rebound(Some(0));
        assert_eq!(s.check(1, 10), Verdict::Deliver);
        // delivery 2 went astray; 3 must not be written (its ack would cover 2)
        assert_eq!(s.check(3, 12), Verdict::Lost { expected: 2 });
        // nothing changed: the rewind decides what comes next
        assert_eq!(s.forwarded, 10);
    }

    #[test]
    fn after_a_rewind_what_was_handed_on_is_a_repeat_and_the_rest_is_new() {
        let mut s = Sequence::default();
        s.rebound(Some(0));
        for (c, stream) in [(1, 10), (2, 11), (3, 12)] {
            assert_eq!(s.check(c, stream), Verdict::Deliver);
        }
        // a delivery went astray; the reset reports a count of 0 again
        assert_eq!(s.check(5, 14), Verdict::Lost { expected: 4 });
        s.rebound(Some(0));
        assert_eq!(s.check(1, 11), Verdict::Repeat);
        assert_eq!(s.check(2, 12), Verdict::Repeat);
        assert_eq!(s.check(3, 13), Verdict::Deliver, "the lost one");
        assert_eq!(s.check(4, 14), Verdict::Deliver);
        // and the first delivery after a rewind is checked too: a stale pull
        // of the old session took 1 and 2
        s.rebound(Some(0));
        assert_eq!(s.check(3, 15), Verdict::Lost { expected: 1 });
    }

    #[test]
    fn a_lower_count_is_a_new_baseline_not_a_loss() {
        let mut s = Sequence::default();
        assert_eq!(s.check(50, 100), Verdict::Deliver);
        // a new consumer leader that knew of fewer deliveries gives 100 again
        assert_eq!(s.check(40, 100), Verdict::Repeat);
        assert_eq!(s.check(41, 101), Verdict::Deliver);
    }
}
