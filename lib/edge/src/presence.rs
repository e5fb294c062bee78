//! Presence on this edge: which users have connections here, written to
//! the `CHAT_PRESENCE` bucket when that changes (`chat_bus::Presence`), and
//! every user's changes, announced by whichever edge or worker made them,
//! written to the local connections that share a group with the user.
//!
//! Nothing is written per message or per connected second: a user costs a
//! write when its first connection here opens, when its last one closes,
//! and when its groups change. Writes leave the session path: a table of
//! what each user's record should become is drained by one task, so a
//! user who connects and leaves before it runs costs nothing, and the
//! table is bounded by the users connected here. The edge writes a
//! heartbeat every [`chat_bus::BEAT_EVERY`]; when it stops (the edge
//! died), the workers take its users out of presence.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use axum::extract::ws::Utf8Bytes;
use chat_bus::{BEAT_EVERY, PresenceChange, PresenceUpdate};
use chat_domain::{UserId, now_millis};
use chat_protocol::{MemberPresence, event, format_millis, push_json};
use futures::StreamExt;

/// Records written at once.
const WRITERS: usize = 32;
/// Users whose newest announced revision is remembered; past it, forgotten.
const REVISIONS_MAX: usize = 100_000;
/// The least time between two writes of a user that say whether it is
/// online here. Each such write is announced to every member of every
/// group of the user (up to 1,000 groups), so a user who opens and closes
/// sockets in a loop would otherwise have its co-members told at the rate
/// of its request budget; held, a burst of changes comes down to its
/// last.
const FLIP_EVERY: Duration = Duration::from_secs(1);

/// What a user's record should become.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    Connected(Vec<String>),
    Groups(Vec<String>),
    Disconnected(i64),
}

impl Want {
    /// This want, not yet written, followed by `newer`: the newer wins, but
    /// a connection still to be written stays one (with the newer groups),
    /// since only that write indexes the user.
    fn then(self, newer: Want) -> Want {
        match (self, newer) {
            (Want::Connected(_), Want::Groups(g)) => Want::Connected(g),
            (_, newer) => newer,
        }
    }
}

/// This edge's share of presence.
pub(crate) struct EdgePresence {
    /// This edge's name in the bucket, new at every start.
    pub(crate) edge: String,
    /// Connections here per user.
    local: Mutex<HashMap<UserId, usize>>,
    /// Records to write.
    dirty: Mutex<HashMap<UserId, Want>>,
    wake: Arc<tokio::sync::Notify>,
    /// The newest revision announced of each user, to put crossed
    /// announcements back in order.
    revisions: Mutex<HashMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for EdgePresence {
    fn default() -> Self {
        Self {
            edge: uuid::Uuid::new_v4().simple().to_string(),
            local: Mutex::default(),
            dirty: Mutex::default(),
            wake: Arc::default(),
            revisions: Mutex::default(),
        }
    }
}

impl EdgePresence {
    fn want(&self, user: &UserId, want: Want) {
        let mut dirty = lock(&self.dirty);
        let merged = match dirty.remove(user) {
            Some(earlier) => earlier.then(want),
            None => want,
        };
        dirty.insert(user.clone(), merged);
        drop(dirty);
        self.wake.notify_one();
    }

    /// A connection of `user`, following `groups`, opened here.
    pub(crate) fn connected(&self, user: &UserId, groups: Vec<String>) {
        let mut local = lock(&self.local);
        let n = local.entry(user.clone()).or_default();
        *n += 1;
        if *n == 1 {
            drop(local);
            self.want(user, Want::Connected(groups));
        }
    }

    /// A connection of `user` closed here.
    pub(crate) fn disconnected(&self, user: &UserId) {
        let mut local = lock(&self.local);
        let Some(n) = local.get_mut(user) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            local.remove(user);
            drop(local);
            self.want(user, Want::Disconnected(now_millis()));
        }
    }

    /// `user`'s groups changed (a membership event reached this edge).
    pub(crate) fn groups_changed(&self, user: &str, groups: Vec<String>) {
        let Ok(user) = UserId::parse(user) else {
            return;
        };
        if lock(&self.local).contains_key(&user) {
            self.want(&user, Want::Groups(groups));
        }
    }

    /// Notes every local user as connected again, with the groups its
    /// connections follow: after heartbeats failed, the workers may have
    /// taken this edge's users out of presence.
    fn renote(&self, hub: &crate::live::LiveHub) {
        let users: Vec<UserId> = lock(&self.local).keys().cloned().collect();
        for user in users {
            let groups = hub.groups_of(user.as_str()).unwrap_or_default();
            self.want(&user, Want::Connected(groups));
        }
    }

    /// Whether an announcement at `rev` of `user` is newer than the last
    /// one seen.
    fn newer(&self, user: &str, rev: u64) -> bool {
        let mut revisions = lock(&self.revisions);
        if revisions.len() >= REVISIONS_MAX && !revisions.contains_key(user) {
            revisions.clear();
        }
        let last = revisions.entry(user.to_owned()).or_default();
        if rev <= *last {
            return false;
        }
        *last = rev;
        true
    }
}

/// A connection counted in presence while it lives.
pub(crate) struct Online {
    app: crate::AppState,
    user: UserId,
}

impl Online {
    pub(crate) fn new(app: &crate::AppState, user: &UserId, groups: Vec<String>) -> Self {
        app.presence.connected(user, groups);
        Self {
            app: app.clone(),
            user: user.clone(),
        }
    }
}

impl Drop for Online {
    fn drop(&mut self) {
        self.app.presence.disconnected(&self.user);
    }
}

/// Writes the records this edge owes, for the edge's lifetime.
pub(crate) async fn write(app: Weak<crate::Inner>) {
    let Some((bus, wake)) = app
        .upgrade()
        .map(|a| (a.bus.presence(), a.presence.wake.clone()))
    else {
        return;
    };
    // the edge beats before it names itself in any record, so that the
    // sweep finds its users should it die at once
    let mut beaten = false;
    // the wants held back by FLIP_EVERY, the writer's alone (never
    // scanned under the lock the sessions take)
    let mut pace = Pace::default();
    loop {
        if !beaten {
            let Some(edge) = app.upgrade().map(|a| a.presence.edge.clone()) else {
                return;
            };
            beaten = bus.beat(&edge, now_millis(), true).await.is_ok();
            if !beaten {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        let Some(inner) = app.upgrade() else { return };
        let now = tokio::time::Instant::now();
        let fresh: Vec<(UserId, Want)> = lock(&inner.presence.dirty).drain().collect();
        let batch = pace.take(fresh, now);
        if batch.is_empty() {
            drop(inner);
            // a want noted meanwhile left a permit; the timeout notices an
            // edge that is gone, or a held write coming due
            let wait = pace.next_due().map_or(Duration::from_secs(1), |due| {
                due.saturating_duration_since(now)
            });
            let _ = tokio::time::timeout(wait, wake.notified()).await;
            continue;
        }
        let edge = inner.presence.edge.clone();
        drop(inner);
        let failed: Vec<(UserId, Want)> = futures::stream::iter(batch)
            .map(|(user, want)| {
                let (bus, edge) = (bus.clone(), edge.clone());
                async move {
                    let update = match &want {
                        Want::Connected(groups) => PresenceUpdate::Connected {
                            edge,
                            groups: groups.clone(),
                        },
                        Want::Groups(groups) => PresenceUpdate::Groups {
                            edge,
                            groups: groups.clone(),
                        },
                        Want::Disconnected(at) => PresenceUpdate::Disconnected { edge, at: *at },
                    };
                    match bus.update(&user, &update).await {
                        Ok(_) => None,
                        Err(e) => {
                            tracing::warn!(user = %user, error = %e, "presence not written yet; retrying");
                            Some((user, want))
                        }
                    }
                }
            })
            .buffer_unordered(WRITERS)
            .filter_map(|f| async move { f })
            .collect()
            .await;
        if !failed.is_empty() {
            let Some(inner) = app.upgrade() else { return };
            {
                // a newer want of the same user follows the failed one
                let mut dirty = lock(&inner.presence.dirty);
                for (user, failed) in failed {
                    let merged = match dirty.remove(&user) {
                        Some(newer) => failed.then(newer),
                        None => failed,
                    };
                    dirty.insert(user, merged);
                }
            }
            drop(inner);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// What [`FLIP_EVERY`] holds back: each user's last online-or-not write,
/// for a second, and the wants waiting for it to pass, with when.
#[derive(Default)]
struct Pace {
    flipped: HashMap<UserId, tokio::time::Instant>,
    held: HashMap<UserId, Want>,
    due: std::collections::BinaryHeap<std::cmp::Reverse<(tokio::time::Instant, UserId)>>,
}

impl Pace {
    /// The wants to write now: of `fresh` (taken from the sessions' table)
    /// those that do not change whether a user is online within a second
    /// of its last such write, and the held ones come due. The others wait,
    /// merged as the table merges them ([`Want::then`]).
    fn take(
        &mut self,
        fresh: Vec<(UserId, Want)>,
        now: tokio::time::Instant,
    ) -> Vec<(UserId, Want)> {
        self.flipped.retain(|_, at| now < *at + FLIP_EVERY);
        let mut batch = Vec::new();
        for (user, want) in fresh {
            if let Some(held) = self.held.remove(&user) {
                self.held.insert(user, held.then(want));
                continue;
            }
            if matches!(want, Want::Groups(_)) {
                batch.push((user, want));
                continue;
            }
            match self.flipped.get(&user) {
                Some(at) => {
                    self.due
                        .push(std::cmp::Reverse((*at + FLIP_EVERY, user.clone())));
                    self.held.insert(user, want);
                }
                None => {
                    self.flipped.insert(user.clone(), now);
                    batch.push((user, want));
                }
            }
        }
        while let Some(std::cmp::Reverse((at, _))) = self.due.peek() {
            if *at > now {
                break;
            }
            let Some(std::cmp::Reverse((_, user))) = self.due.pop() else {
                break;
            };
            if let Some(want) = self.held.remove(&user) {
                self.flipped.insert(user.clone(), now);
                batch.push((user, want));
            }
        }
        batch
    }

    /// When the first held want comes due.
    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.due.peek().map(|std::cmp::Reverse((at, _))| *at)
    }
}

/// Writes this edge's heartbeat every [`BEAT_EVERY`]; after beats failed
/// (NATS out of reach, perhaps long enough for the workers to take this
/// edge's users offline), writes its users' presence again.
pub(crate) async fn beat(app: Weak<crate::Inner>) {
    let mut tick = tokio::time::interval(BEAT_EVERY);
    let mut failed = false;
    let mut first = true;
    loop {
        tick.tick().await;
        let Some(inner) = app.upgrade() else { return };
        let (bus, edge) = (inner.bus.presence(), inner.presence.edge.clone());
        drop(inner);
        match bus.beat(&edge, now_millis(), first).await {
            // beats failed, or the workers took this edge for dead (a
            // stall): its users are written again
            Ok(swept) if failed || swept => {
                failed = false;
                first = false;
                let Some(inner) = app.upgrade() else { return };
                inner.presence.renote(&inner.live);
            }
            Ok(_) => first = false,
            Err(e) => {
                failed = true;
                tracing::warn!(error = %e, "presence heartbeat not written");
            }
        }
    }
}

/// The `a_presence` frame of `change`.
fn frame(change: &PresenceChange) -> Option<Utf8Bytes> {
    let data = view(change.user_id.clone(), change.online, change.last_seen);
    push_json(event::PRESENCE, &data).ok().map(Utf8Bytes::from)
}

/// A user's presence as clients see it: when it was last seen only while
/// it is offline (and was ever seen).
pub(crate) fn view(user_id: String, online: bool, last_seen: i64) -> MemberPresence {
    MemberPresence {
        user_id,
        online,
        last_seen: (!online && last_seen > 0).then(|| format_millis(last_seen)),
    }
}

/// Writes every presence change to the local connections that share a
/// group with the user, for the edge's lifetime.
pub(crate) async fn listen(app: Weak<crate::Inner>) {
    let Some(bus) = app.upgrade().map(|a| a.bus.clone()) else {
        return;
    };
    let mut sub = match bus.presence_changes().await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for presence changes; this edge's connections will not see who comes and goes");
            return;
        }
    };
    drop(bus);
    let written = metrics::counter!("chat_presence_frames_total");
    while let Some(msg) = sub.next().await {
        let Some(app) = app.upgrade() else { return };
        let Ok(change) = serde_json::from_slice::<PresenceChange>(&msg.payload) else {
            tracing::debug!(subject = %msg.subject, "unreadable presence change dropped");
            continue;
        };
        if !app.presence.newer(&change.user_id, change.rev) {
            continue;
        }
        let Some(text) = frame(&change) else { continue };
        // the hub knows only valid group ids: any other name finds nothing
        let n = app.live.signal_groups(
            change.groups.iter().map(String::as_str),
            &change.user_id,
            &text,
        );
        written.increment(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(id: &str) -> UserId {
        UserId::parse(id).expect("id")
    }

    #[test]
    fn only_a_user_s_first_and_last_connection_are_written() {
        let p = EdgePresence::default();
        p.connected(&u("ann"), vec!["g".into()]);
        p.connected(&u("ann"), vec!["g".into()]);
        assert_eq!(lock(&p.dirty).len(), 1);
        lock(&p.dirty).clear();
        p.disconnected(&u("ann"));
        assert!(lock(&p.dirty).is_empty(), "one connection is still open");
        p.disconnected(&u("ann"));
        assert!(matches!(
            lock(&p.dirty).get(&u("ann")),
            Some(Want::Disconnected(_))
        ));
        // more closes than opens change nothing
        p.disconnected(&u("ann"));
        assert!(lock(&p.local).is_empty());
    }

    /// A user who opens and closes sockets in a loop has at most one
    /// online-or-not write a second, the last of its burst; group changes
    /// and other users are not held.
    #[test]
    fn online_changes_of_a_user_are_written_at_most_once_a_second() {
        let p = EdgePresence::default();
        let mut pace = Pace::default();
        let take = |p: &EdgePresence| lock(&p.dirty).drain().collect::<Vec<_>>();
        let t0 = tokio::time::Instant::now();
        p.connected(&u("mallory"), vec!["g".into()]);
        assert_eq!(pace.take(take(&p), t0).len(), 1);
        assert_eq!(pace.next_due(), None);
        // closed, opened and closed again at once: held, merged to the last
        p.disconnected(&u("mallory"));
        let held = pace.take(take(&p), t0);
        assert!(held.is_empty(), "{held:?}");
        p.connected(&u("mallory"), vec!["g".into()]);
        p.disconnected(&u("mallory"));
        p.connected(&u("ann"), vec!["g".into()]);
        let batch = pace.take(take(&p), t0);
        let users: Vec<&str> = batch.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(users, ["ann"], "only the other user: {batch:?}");
        assert_eq!(pace.next_due(), Some(t0 + FLIP_EVERY));
        // not yet due: nothing
        assert!(pace.take(Vec::new(), t0 + FLIP_EVERY / 2).is_empty());
        // a second on, the last of the burst goes out, once
        let batch = pace.take(Vec::new(), t0 + FLIP_EVERY);
        assert!(
            matches!(batch.as_slice(), [(u, Want::Disconnected(_))] if u.as_str() == "mallory"),
            "{batch:?}"
        );
        assert_eq!(pace.next_due(), None);
        assert!(pace.take(Vec::new(), t0 + FLIP_EVERY * 3).is_empty());
        // a held connection takes the groups that change meanwhile
        let t1 = t0 + FLIP_EVERY * 3;
        p.connected(&u("bo"), vec!["a".into()]);
        assert_eq!(pace.take(take(&p), t1).len(), 1);
        p.disconnected(&u("bo"));
        p.connected(&u("bo"), vec!["a".into()]);
        assert!(pace.take(take(&p), t1).is_empty());
        p.groups_changed("bo", vec!["a".into(), "b".into()]);
        assert!(
            pace.take(take(&p), t1).is_empty(),
            "merged into the held one"
        );
        assert_eq!(
            pace.take(Vec::new(), t1 + FLIP_EVERY),
            [(u("bo"), Want::Connected(vec!["a".into(), "b".into()]))]
        );
    }

    #[test]
    fn wants_not_yet_written_are_merged() {
        let p = EdgePresence::default();
        p.connected(&u("ann"), vec!["a".into()]);
        p.groups_changed("ann", vec!["a".into(), "b".into()]);
        assert_eq!(
            lock(&p.dirty).get(&u("ann")),
            Some(&Want::Connected(vec!["a".into(), "b".into()]))
        );
        // groups of a user with no connection here are not ours to write
        p.groups_changed("bob", vec!["a".into()]);
        assert!(!lock(&p.dirty).contains_key(&u("bob")));
        p.disconnected(&u("ann"));
        assert!(matches!(
            lock(&p.dirty).get(&u("ann")),
            Some(Want::Disconnected(_))
        ));
    }

    #[test]
    fn announcements_that_crossed_are_put_back_in_order() {
        let p = EdgePresence::default();
        assert!(p.newer("ann", 5));
        assert!(!p.newer("ann", 4));
        assert!(!p.newer("ann", 5));
        assert!(p.newer("ann", 6));
        assert!(p.newer("bob", 1));
    }

    #[test]
    fn the_frame_carries_last_seen_only_when_offline() {
        let change = |online| PresenceChange {
            user_id: "ann".into(),
            online,
            last_seen: 1_700_000_000_123,
            groups: vec![],
            rev: 1,
        };
        let on = frame(&change(true)).expect("frame");
        assert_eq!(
            on.as_str(),
            r#"{"event":"a_presence","data":{"userId":"ann","online":true}}"#
        );
        let off = frame(&change(false)).expect("frame");
        assert!(
            off.as_str()
                .contains(r#""lastSeen":"2023-11-14T22:13:20.123Z""#),
            "{}",
            off.as_str()
        );
    }
}
