//! Closing the connections of an evicted device, on every edge.
//!
//! A device may have several connections (two tabs that share the default
//! device both receive everything), so a new connection closes nothing.
//! When a worker evicts a device (its user connected more devices than
//! allowed), it sends a notice on `chat.session.<user>.<device>` (core
//! NATS); each edge listens with one wildcard subscription and a table of
//! its own connections, and closes that device's with 4410. A notice lost
//! on the way only delays the close: the device's place is forgotten, so
//! its connections save nothing more, and a reconnect registers it again.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use chat_domain::{DeviceId, UserId};
use futures::StreamExt;
use tokio::sync::watch;

/// This edge's connections by device notice subject.
#[derive(Default)]
pub(crate) struct Devices(Mutex<HashMap<String, Watched>>);

struct Watched {
    /// Set once the device is evicted; every connection of it watches.
    evicted: Arc<watch::Sender<bool>>,
    connections: usize,
}

/// A connection's watch on its device; dropping it (the session ended)
/// withdraws it.
pub(crate) struct Watch {
    app: crate::AppState,
    subject: String,
    /// Becomes true when the device is evicted.
    pub(crate) evicted: watch::Receiver<bool>,
}

impl Devices {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Watched>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, subject: &str) -> watch::Receiver<bool> {
        let mut devices = self.lock();
        let w = devices
            .entry(subject.to_owned())
            .or_insert_with(|| Watched {
                evicted: Arc::new(watch::channel(false).0),
                connections: 0,
            });
        w.connections += 1;
        w.evicted.subscribe()
    }

    fn remove(&self, subject: &str) {
        let mut devices = self.lock();
        if let Some(w) = devices.get_mut(subject) {
            w.connections -= 1;
            if w.connections == 0 {
                devices.remove(subject);
            }
        }
    }

    /// The device under `subject` was evicted: its connections here close.
    fn evicted(&self, subject: &str) {
        if let Some(w) = self.lock().get(subject) {
            w.evicted.send_replace(true);
        }
    }

    /// Devices watched (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Watches `device` for eviction while a connection of it lives.
pub(crate) fn watch(app: &crate::AppState, user: &UserId, device: &DeviceId) -> Watch {
    let subject = chat_bus::device_notice_subject(user, device);
    let evicted = app.devices.add(&subject);
    Watch {
        app: app.clone(),
        subject,
        evicted,
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.app.devices.remove(&self.subject);
    }
}

/// Closes this edge's connections of devices a worker evicted. Runs for the
/// edge's lifetime; the client resubscribes by itself after a NATS
/// reconnect.
pub(crate) async fn listen(app: std::sync::Weak<crate::Inner>) {
    let Some(client) = app.upgrade().map(|a| a.bus.client().clone()) else {
        return;
    };
    let mut sub = match client.subscribe(chat_bus::DEVICE_NOTICES).await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for evicted devices; their connections stay open until they reconnect");
            return;
        }
    };
    while let Some(msg) = sub.next().await {
        let Some(app) = app.upgrade() else { return };
        if msg.payload.as_ref() == b"evicted" {
            app.devices.evicted(&msg.subject);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eviction_closes_every_connection_of_the_device_and_only_those() {
        let devices = Devices::default();
        let a = devices.add("chat.session.u.d");
        let b = devices.add("chat.session.u.d");
        let other = devices.add("chat.session.u.e");
        devices.evicted("chat.session.u.d");
        assert!(*a.borrow() && *b.borrow());
        assert!(!*other.borrow());
        assert_eq!(devices.len(), 2);
        devices.remove("chat.session.u.d");
        devices.remove("chat.session.u.d");
        devices.remove("chat.session.u.e");
        assert_eq!(devices.len(), 0);
    }

    #[test]
    fn a_second_connection_of_a_device_closes_nothing() {
        let devices = Devices::default();
        let first = devices.add("chat.session.u.d");
        let _second = devices.add("chat.session.u.d");
        assert!(!*first.borrow());
    }
}
