//! One connection per device, across every edge.
//!
//! A new connection announces itself on `chat.session.<user>.<device>` (core
//! NATS); any older connection of that device, on any edge, is told to close
//! (4409), since two connections sharing a durable consumer would split its
//! messages. Each edge listens with one wildcard subscription and a table of
//! its own connections, instead of a subscription and a task per connection
//! (which an idle connection paid for in memory).

use std::{collections::HashMap, sync::Mutex};

use chat_domain::{DeviceId, UserId};
use futures::StreamExt;
use tokio::sync::oneshot;

/// Every announcement, whichever edge made it.
const ANNOUNCEMENTS: &str = "chat.session.*.*";

fn subject(user: &UserId, device: &DeviceId) -> String {
    format!("chat.session.{user}.{device}")
}

/// This edge's connections by announcement subject.
#[derive(Default)]
pub(crate) struct DeviceClaims(Mutex<HashMap<String, Entry>>);

struct Entry {
    /// The connection's id, as announced.
    id: u128,
    /// Tells the connection to close.
    tell: oneshot::Sender<()>,
    /// Earlier connections of the device on this edge that this one
    /// replaced: their announcements may still be on the way back and must
    /// not close it.
    replaced: Vec<u128>,
}

/// Earlier ids remembered per device (reconnects in quick succession).
const REPLACED_KEPT: usize = 8;

/// A connection's claim on its device; dropping it (the session ended)
/// withdraws it.
pub(crate) struct Claim {
    app: crate::AppState,
    subject: String,
    id: u128,
    /// Fires when a newer connection of the device announced itself.
    pub(crate) replaced: oneshot::Receiver<()>,
}

impl DeviceClaims {
    /// Closes the connection under `subject` if `id` announces a newer one
    /// (not itself, nor one it replaced).
    fn announced(&self, subject: &str, id: u128) {
        let mut claims = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if claims
            .get(subject)
            .is_some_and(|e| e.id != id && !e.replaced.contains(&id))
            && let Some(e) = claims.remove(subject)
        {
            let _ = e.tell.send(());
        }
    }

    /// Registers connection `id` under `subject`, closing an older one on
    /// this edge at once.
    fn register(&self, subject: String, id: u128, tell: oneshot::Sender<()>) {
        let mut claims = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut replaced = Vec::new();
        if let Some(older) = claims.remove(&subject) {
            let _ = older.tell.send(());
            replaced = older.replaced;
            replaced.push(older.id);
            if replaced.len() > REPLACED_KEPT {
                replaced.remove(0);
            }
        }
        claims.insert(subject, Entry { id, tell, replaced });
    }

    fn withdraw(&self, subject: &str, id: u128) {
        let mut claims = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if claims.get(subject).is_some_and(|e| e.id == id) {
            claims.remove(subject);
        }
    }

    /// Connections registered (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Registers a new connection of `device` and announces it to every edge.
/// Without NATS the announcement is skipped (logged); the consumer reset
/// still keeps deliveries in order.
pub(crate) async fn claim(app: &crate::AppState, user: &UserId, device: &DeviceId) -> Claim {
    let subject = subject(user, device);
    let id = uuid::Uuid::new_v4().as_u128();
    let (tell, replaced) = oneshot::channel();
    app.claims.register(subject.clone(), id, tell);
    if let Err(e) = app
        .bus
        .client()
        .publish(subject.clone(), id.to_string().into())
        .await
    {
        tracing::debug!(error = %e, "cannot announce the connection");
    }
    Claim {
        app: app.clone(),
        subject,
        id,
        replaced,
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.app.claims.withdraw(&self.subject, self.id);
    }
}

/// Closes this edge's connections that a newer connection of the same
/// device (announced by any edge) replaces. Runs for the edge's lifetime;
/// the client resubscribes by itself after a NATS reconnect.
pub(crate) async fn watch(app: std::sync::Weak<crate::Inner>) {
    let Some(client) = app.upgrade().map(|a| a.bus.client().clone()) else {
        return;
    };
    let mut sub = match client.subscribe(ANNOUNCEMENTS).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch device announcements; a device may keep two connections");
            return;
        }
    };
    while let Some(msg) = sub.next().await {
        let Some(app) = app.upgrade() else { return };
        let Some(id) = std::str::from_utf8(&msg.payload)
            .ok()
            .and_then(|s| s.parse::<u128>().ok())
        else {
            tracing::debug!(subject = %msg.subject, "malformed device announcement");
            continue;
        };
        app.claims.announced(&msg.subject, id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect(claims: &DeviceClaims, id: u128) -> oneshot::Receiver<()> {
        let (tell, told) = oneshot::channel();
        claims.register("chat.session.u.d".into(), id, tell);
        told
    }

    #[test]
    fn a_newer_connection_closes_the_older_and_late_echoes_close_nothing() {
        let claims = DeviceClaims::default();
        let mut first = connect(&claims, 1);
        let mut second = connect(&claims, 2);
        // the same edge replaced the first at once
        assert!(first.try_recv().is_ok());
        // the first's and the second's own announcements come back late
        claims.announced("chat.session.u.d", 1);
        claims.announced("chat.session.u.d", 2);
        assert!(second.try_recv().is_err(), "still open");
        // another edge's newer connection closes it
        claims.announced("chat.session.u.d", 3);
        assert!(second.try_recv().is_ok());
        assert_eq!(claims.len(), 0);
    }

    #[test]
    fn a_closed_connection_withdraws_only_its_own_claim() {
        let claims = DeviceClaims::default();
        let _first = connect(&claims, 1);
        let mut second = connect(&claims, 2);
        claims.withdraw("chat.session.u.d", 1);
        assert_eq!(claims.len(), 1, "the newer claim stays");
        claims.withdraw("chat.session.u.d", 2);
        assert_eq!(claims.len(), 0);
        assert!(second.try_recv().is_err(), "withdrawing is not replacing");
    }
}
