//! Signals from every edge (typing) and worker (reactions), and message
//! statuses from workers, written to this edge's connections.
//!
//! Two core NATS subscriptions per edge, on every group's signals and
//! statuses (`chat_bus::GROUP_SIGNALS`, `chat_bus::GROUP_STATUSES`); a
//! signal may carry only `a_typing` or `a_reaction` and a status only
//! `a_message_status` (anything else is dropped as malformed: NATS lets
//! edges publish signals, and a leaked edge credential must not write
//! other frames, a message or a status, to connections): a signal costs nats-server one delivery per
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
                // checked UTF-8 by `Signal::read`
                let Ok(frame) = Utf8Bytes::try_from(signal.frame.clone()) else {
                    continue;
                };
                if !carries_what_it_may(&signal, &frame) {
                    dropped.increment(1);
                    tracing::warn!(subject = %msg.subject, "a signal carrying an event it may not: dropped");
                    continue;
                }
                received.increment(1);
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

/// Whether `signal` carries an event of its kind: a status only
/// `a_message_status`, a signal only `a_typing` (from edges) or
/// `a_reaction` (from workers).
fn carries_what_it_may(signal: &Signal, frame: &str) -> bool {
    use chat_protocol::event;
    let name = crate::ws::event_of(frame);
    if signal.to.is_empty() {
        name == event::USER_TYPING || name == event::REACTION
    } else {
        name == event::MESSAGE_STATUS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn carries(to: &[&str], frame: &'static str) -> bool {
        let signal = Signal {
            group: chat_domain::GroupId::parse("g").expect("id"),
            from: None,
            about: None,
            to: to
                .iter()
                .map(|u| chat_domain::UserId::parse(*u).expect("id"))
                .collect(),
            frame: bytes::Bytes::from_static(frame.as_bytes()),
        };
        carries_what_it_may(&signal, frame)
    }

    #[test]
    fn signals_and_statuses_carry_only_their_own_events() {
        let typing = r#"{"event":"a_typing","data":{}}"#;
        let reaction = r#"{"event":"a_reaction","data":{}}"#;
        let status = r#"{"event":"a_message_status","data":{}}"#;
        let message = r#"{"event":"a_group_message","data":{}}"#;
        assert!(carries(&[], typing));
        assert!(carries(&[], reaction));
        assert!(!carries(&[], status), "a status as a signal");
        assert!(!carries(&[], message), "a message as a signal");
        assert!(carries(&["alice"], status));
        assert!(!carries(&["alice"], typing));
        assert!(!carries(&[], "not json"));
    }
}
