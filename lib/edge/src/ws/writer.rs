//! The writer task: frames to the socket, acknowledgements and the
//! device's position once they are flushed.

use super::*;

/// The name of a frame's event, for metrics (one of ours, or "other").
pub(super) fn event_of(frame: &str) -> &'static str {
    const NAMES: [&str; 7] = [
        event::ACK,
        event::ERROR,
        event::SESSION,
        event::GROUP_CREATED,
        event::GROUP_UPDATED,
        event::GROUP_MESSAGE,
        event::MESSAGE_STATUS,
    ];
    let name = frame
        .strip_prefix("{\"event\":\"")
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default();
    NAMES.into_iter().find(|n| *n == name).unwrap_or("other")
}

/// Writes frames to the socket; acknowledges deliveries once written and
/// hands back those it could not write.
///
/// Frames are fed to the socket and flushed when the queue runs dry (or
/// every `WRITE_BURST` frames); only then are the deliveries of the burst
/// acknowledged, with one ack per consumer: the consumers acknowledge
/// everything up to the acked message (`AckPolicy::All`), so a burst of 256
/// costs one ack instead of 256 (BENCHMARKS.md).
pub(super) async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut inbox: Inbox,
    app: AppState,
    user: String,
    saver: Arc<Saver>,
) {
    let delivered = Written {
        hub: &app.delivered,
        user: user.as_str(),
        position: &saver.position,
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
    let deadline = app.config.write_timeout;
    let mut burst = 0usize;
    loop {
        // a close asked for out of band goes ahead of everything queued
        let (out, _permit) = tokio::select! {
            biased;
            Some((code, reason)) = inbox.close.recv() => (Outgoing::Close(code, reason), None),
            next = inbox.rx.recv() => match next {
                Some((out, permit)) => (out, Some(permit)),
                None => break,
            },
        };
        let ok = match out {
            Outgoing::Frame(text) => {
                metrics::counter!("chat_ws_events_out_total", "event" => event_of(&text))
                    .increment(1);
                fed(&mut sink, Message::Text(text.into()), deadline).await
            }
            Outgoing::Live(f) => {
                let ok = fed(&mut sink, Message::Text(f.text), deadline).await;
                if ok {
                    live_out.increment(1);
                    live_deliveries.increment(1);
                    pending.group_frame(&f.group, f.seq, f.stream_seq);
                }
                ok
            }
            Outgoing::Through(seq) => {
                pending.through = pending.through.max(seq);
                true
            }
            Outgoing::Delivery(d) => {
                let slot = usize::from(d.receipt.is_some());
                let ok = match &d.text {
                    Some(text) => fed(&mut sink, Message::Text(text.clone()), deadline).await,
                    None => true,
                };
                if ok {
                    if let Some(text) = &d.text {
                        metrics::counter!("chat_ws_events_out_total", "event" => event_of(text))
                            .increment(1);
                        metrics::counter!("chat_ws_deliveries_total", "feed" => if slot == 1 { "groups" } else { "user" })
                            .increment(1);
                    }
                    if let Some((group, seq)) = &d.receipt {
                        let stream_seq = d.msg.info().map_or(0, |i| i.stream_sequence);
                        pending.group_frame(group, *seq, stream_seq);
                    }
                    pending.written[slot] = Some(d);
                } else {
                    let _ = d.msg.ack_with(AckKind::Nak(None)).await;
                }
                ok
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
        burst += 1;
        if inbox.rx.is_empty() || burst >= WRITE_BURST {
            burst = 0;
            if !pending.flush(&mut sink, &delivered, deadline).await {
                gave_up();
                failed = true;
                break;
            }
        }
    }
    // what was written before the end is acknowledged; the rest comes again.
    // Not after a failure: the frame that failed may have left the split
    // sink's slot, and a later flush that succeeds says nothing of it (a
    // client's close racing a delivery lost that delivery this way)
    if !failed {
        pending.flush(&mut sink, &delivered, deadline).await;
    }
    inbox.rx.close();
    while let Ok((out, _)) = inbox.rx.try_recv() {
        if let Outgoing::Delivery(d) = out {
            let _ = d.msg.ack_with(AckKind::Nak(None)).await;
        }
    }
    // before the close goes out: a client that reconnects once it sees the
    // close finds its device's position saved
    let _ = tokio::time::timeout(FINAL_SAVE, saver.save()).await;
    if let Some(frame) = closing {
        within(CLOSE_HANDSHAKE, sink.send(Message::Close(Some(frame)))).await;
    }
    within(CLOSE_HANDSHAKE, sink.close()).await;
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
/// position in the group stream.
pub(super) struct Written<'a> {
    pub(super) hub: &'a DeliveredHub,
    pub(super) user: &'a str,
    pub(super) position: &'a AtomicU64,
}

/// Most frames written before a flush (and the acks it allows).
pub(super) const WRITE_BURST: usize = 64;

/// What the writer wrote since its last flush: acknowledged, reported as
/// delivered and counted into the device's position only once a flush
/// after it succeeded.
#[derive(Default)]
pub(super) struct Unflushed {
    /// The newest written delivery of each consumer (user, groups).
    written: [Option<Delivery>; 2],
    /// Group seqs written, by group.
    receipts: HashMap<String, u64>,
    /// The newest group stream sequence written.
    through: u64,
}

impl Unflushed {
    /// A group message was written.
    fn group_frame(&mut self, group: &str, seq: u64, stream_seq: u64) {
        // no allocation per frame for a group already noted
        match self.receipts.get_mut(group) {
            Some(e) => *e = (*e).max(seq),
            None => {
                self.receipts.insert(group.to_owned(), seq);
            }
        }
        self.through = self.through.max(stream_seq);
    }

    /// Flushes the socket, then reports receipts, moves the position and
    /// acknowledges the newest written delivery of each consumer, which
    /// covers the ones before it. False if the socket failed: nothing
    /// unflushed counts, so it comes again.
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
        to.position.fetch_max(self.through, Ordering::SeqCst);
        for d in self.written.iter_mut().filter_map(Option::take) {
            if d.stale() {
                continue;
            }
            if let Err(e) = d.msg.ack().await {
                tracing::warn!(error = %e, "ack to jetstream failed; the event may come again");
            }
        }
        true
    }
}

/// Saves a live connection's position into its device's group consumer:
/// every `CHECKPOINT`, and by the writer once it wrote its last frame and
/// before it answers or sends the close, so a client that reconnects after
/// the close, on any edge, resumes right after what this connection wrote
/// (after an edge crash: after the last checkpoint, and `seq` shows the
/// repeats).
pub(crate) struct Saver {
    pub(super) live: Arc<Registration>,
    /// The newest group stream sequence written: everything of the
    /// device's groups up to it reached the socket.
    pub(super) position: AtomicU64,
    pub(super) saved: AtomicU64,
    /// One save at a time, so an older one never lands after a newer one.
    pub(super) turn: tokio::sync::Mutex<()>,
    pub(super) bus: chat_bus::Bus,
    pub(super) user: UserId,
    pub(super) device: DeviceId,
}

/// How often a live connection's position is saved.
pub(super) const CHECKPOINT: Duration = Duration::from_secs(5);
/// The longest a closing connection waits for its position to be saved.
pub(super) const FINAL_SAVE: Duration = Duration::from_secs(2);

impl Saver {
    /// The position to save, if the connection is live and it moved since
    /// the last save.
    pub(super) fn due(&self) -> Option<u64> {
        let at = self.position.load(Ordering::SeqCst);
        (self.live.attached() && at > self.saved.load(Ordering::SeqCst)).then_some(at)
    }

    pub(super) async fn save(&self) {
        let _turn = self.turn.lock().await;
        let Some(at) = self.due() else {
            return;
        };
        match self
            .bus
            .set_group_position(&self.user, &self.device, at)
            .await
        {
            Ok(()) => {
                tracing::debug!(position = at, "device position saved");
                self.saved.fetch_max(at, Ordering::SeqCst);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot save the device's position; it resumes from the last one saved")
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
}
