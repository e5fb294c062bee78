//! Who is a member of which group, cached, so that a send reads no database
//! in the normal case.
//!
//! Only memberships are cached (never "not a member" or "no such group"), so
//! someone just added is never refused by a stale entry. Removal is what
//! must reach every worker: the worker that commits a membership change
//! forgets the group at once and announces it on `chat.ctl.members.<g>`
//! (core NATS), and every worker forgets the group when the notice arrives.
//! Core NATS can drop a notice, so entries also carry the bus's
//! [`generation`](chat_bus::Bus::generation) (which rises on every
//! disconnect, reconnect and slow subscription, exactly when notices can be
//! missed) and expire after a fixed time anyway. An entry filled from a read
//! that started before a change was announced is not kept: fills note a
//! counter of forgets when they start.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use chat_domain::{GroupId, History, UserId};

/// How long a membership is trusted without hearing of its group.
pub(crate) const TTL: Duration = Duration::from_secs(30);
/// Most memberships remembered; past it the cache starts over (entries are
/// never pruned one by one: they expire, and a full cache is cleared).
const MAX_ENTRIES: usize = 1_000_000;

/// When a fill started: compare with the cache's state when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    forgets: u64,
    generation: u64,
}

/// A membership remembered: when, under which bus generation, and where the
/// member's view of the history starts.
#[derive(Clone, Copy)]
struct Entry {
    at: Instant,
    generation: u64,
    visible_from: u64,
}

#[derive(Default)]
struct Inner {
    groups: HashMap<GroupId, HashMap<UserId, Entry>>,
    /// Memberships held, over all groups.
    entries: usize,
    /// Rises with every forget.
    forgets: u64,
}

/// The membership cache of one worker.
#[derive(Default)]
pub(crate) struct Members(Mutex<Inner>);

impl Members {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// If `user` is known to be a member of `group` as of the bus's
    /// `generation` now: the `seq` its view of the history starts after.
    pub(crate) fn visible_from(
        &self,
        group: &GroupId,
        user: &UserId,
        generation: u64,
    ) -> Option<u64> {
        self.inner()
            .groups
            .get(group)
            .and_then(|users| users.get(user))
            .filter(|e| e.generation == generation && e.at.elapsed() < TTL)
            .map(|e| e.visible_from)
    }

    /// Taken before reading the membership from the database.
    pub(crate) fn ticket(&self, generation: u64) -> Ticket {
        Ticket {
            forgets: self.inner().forgets,
            generation,
        }
    }

    /// Remembers a membership read under `ticket`, unless anything was
    /// forgotten since the read started (the read may predate the change).
    pub(crate) fn remember(
        &self,
        group: &GroupId,
        user: &UserId,
        visible_from: u64,
        ticket: Ticket,
    ) {
        let mut inner = self.inner();
        if inner.forgets != ticket.forgets {
            return;
        }
        if inner.entries >= MAX_ENTRIES {
            inner.groups.clear();
            inner.entries = 0;
        }
        let added = inner
            .groups
            .entry(group.clone())
            .or_default()
            .insert(
                user.clone(),
                Entry {
                    at: Instant::now(),
                    generation: ticket.generation,
                    visible_from,
                },
            )
            .is_none();
        inner.entries += usize::from(added);
    }

    /// Forgets every membership of `group`.
    pub(crate) fn forget(&self, group: &GroupId) {
        let mut inner = self.inner();
        inner.forgets += 1;
        if let Some(users) = inner.groups.remove(group) {
            inner.entries = inner.entries.saturating_sub(users.len());
        }
    }
}

/// Most groups whose history setting is remembered; past it the map starts
/// over.
const MAX_HISTORIES: usize = 100_000;

/// Each group's history setting, which is fixed when the group is created
/// (a deleted group's entry is never asked for again: every call about it
/// reads the group, which is gone, first), so an entry is never stale: a reaction
/// or a reply under `joined` history reads no database for it.
#[derive(Default)]
pub(crate) struct Histories(Mutex<HashMap<GroupId, History>>);

impl Histories {
    fn inner(&self) -> std::sync::MutexGuard<'_, HashMap<GroupId, History>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self, group: &GroupId) -> Option<History> {
        self.inner().get(group).copied()
    }

    pub(crate) fn remember(&self, group: &GroupId, history: History) {
        let mut inner = self.inner();
        if inner.len() >= MAX_HISTORIES {
            inner.clear();
        }
        inner.insert(group.clone(), history);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (GroupId, UserId) {
        (
            GroupId::parse("g").expect("group"),
            UserId::parse("u").expect("user"),
        )
    }

    #[test]
    fn a_full_cache_starts_over() {
        let m = Members::default();
        let g = GroupId::parse("g").expect("group");
        let users: Vec<UserId> = (0..=MAX_ENTRIES)
            .map(|i| UserId::parse(format!("u{i}")).expect("user"))
            .collect();
        for u in &users[..MAX_ENTRIES] {
            m.remember(&g, u, 1, m.ticket(1));
        }
        assert_eq!(m.inner().entries, MAX_ENTRIES);
        assert_eq!(m.visible_from(&g, &users[0], 1), Some(1));
        m.remember(&g, &users[MAX_ENTRIES], 1, m.ticket(1));
        assert_eq!(m.inner().entries, 1, "cleared, then the new one");
        assert_eq!(m.visible_from(&g, &users[0], 1), None);
        assert_eq!(m.visible_from(&g, &users[MAX_ENTRIES], 1), Some(1));
    }

    #[test]
    fn a_membership_is_kept_until_its_group_is_forgotten() {
        let m = Members::default();
        let (g, u) = ids();
        assert_eq!(m.visible_from(&g, &u, 1), None);
        let t = m.ticket(1);
        m.remember(&g, &u, 7, t);
        assert_eq!(m.visible_from(&g, &u, 1), Some(7));
        m.forget(&g);
        assert_eq!(m.visible_from(&g, &u, 1), None);
    }

    #[test]
    fn a_read_that_started_before_a_forget_is_not_kept() {
        let m = Members::default();
        let (g, u) = ids();
        let t = m.ticket(1);
        // the removal is announced while the read is under way
        m.forget(&g);
        m.remember(&g, &u, 0, t);
        assert_eq!(m.visible_from(&g, &u, 1), None);
    }

    #[test]
    fn entries_of_an_older_generation_are_not_trusted() {
        let m = Members::default();
        let (g, u) = ids();
        let t = m.ticket(1);
        m.remember(&g, &u, 0, t);
        // the bus reconnected: notices may have been missed
        assert_eq!(m.visible_from(&g, &u, 2), None);
    }

    #[test]
    fn histories_are_remembered_within_a_bound() {
        let h = Histories::default();
        let (g, _) = ids();
        assert_eq!(h.get(&g), None);
        h.remember(&g, History::Joined);
        assert_eq!(h.get(&g), Some(History::Joined));
        for i in 1..MAX_HISTORIES {
            h.remember(
                &GroupId::parse(format!("g{i}")).expect("id"),
                History::Shared,
            );
        }
        // full: it starts over, and holds what it was told last
        let last = GroupId::parse("last").expect("id");
        h.remember(&last, History::Shared);
        assert_eq!(h.inner().len(), 1);
        assert_eq!((h.get(&g), h.get(&last)), (None, Some(History::Shared)));
    }
}
