//! Signals from every edge (typing) and worker (reactions), and message
//! statuses from workers, written to this edge's connections.
//!
//! One core NATS subscription per edge on every group's signals
//! (`chat_bus::GROUP_SIGNALS`): a signal costs nats-server one delivery per
//! edge, and this edge one hash lookup plus one queue push per local
//! connection that follows the group (the group hub's table, so a removed
//! member's connections hear nothing more from the group at once). A full
//! queue drops the signal and closes nothing.

use std::sync::Weak;

use axum::extract::ws::Utf8Bytes;
use chat_bus::Signal;
use futures::StreamExt;

/// Writes signals to this edge's connections for the edge's lifetime; the
/// client subscribes again by itself after a NATS reconnect.
pub(crate) async fn listen(app: Weak<crate::Inner>) {
    let Some(bus) = app.upgrade().map(|a| a.bus.clone()) else {
        return;
    };
    let mut sub = match bus.signals().await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for signals; this edge's connections will not see who is typing, reactions or message statuses");
            return;
        }
    };
    let received = metrics::counter!("chat_signals_total", "outcome" => "received");
    let dropped = metrics::counter!("chat_signals_total", "outcome" => "malformed");
    let written = metrics::counter!("chat_signal_frames_total");
    while let Some(msg) = sub.next().await {
        let Some(app) = app.upgrade() else { return };
        match Signal::read(&msg.subject, msg.headers.as_ref(), &msg.payload) {
            Ok(signal) => {
                received.increment(1);
                // checked UTF-8 by `Signal::read`
                let Ok(frame) = Utf8Bytes::try_from(signal.frame) else {
                    continue;
                };
                let n = if signal.to.is_empty() {
                    app.live.signal(
                        signal.group.as_str(),
                        signal.from.as_ref().map(|u| u.as_str()),
                        signal.about,
                        &frame,
                    )
                } else {
                    app.live.status(signal.group.as_str(), &signal.to, &frame)
                };
                written.increment(n as u64);
            }
            Err(e) => {
                dropped.increment(1);
                tracing::debug!(error = %e, subject = %msg.subject, "signal dropped");
            }
        }
    }
}
