//! Where a connection's view of each group's history starts: under a
//! group's `joined` history a member sees only messages sent after it was
//! added, and a device that was offline before it joined must not have the
//! earlier ones handed on by its catch-up.
//!
//! A catch-up asks a worker once per group it meets (the worker answers from
//! its membership cache), so whatever the device's consumer carries, whether
//! the group was subscribed before the session opened or during its
//! catch-up, from this or another connection of the user, is checked the
//! same way; connections that miss nothing ask nothing.

use std::{sync::Mutex, time::Instant};

use super::*;

/// Most groups remembered per connection: past it a group is asked again
/// each time (a user is in at most `--max-groups-per-user` groups anyway).
const MAX_KNOWN: usize = 4096;

/// Hides everything: the caller is not (or no longer) a member.
const HIDE_ALL: u64 = u64::MAX;

/// How long an answer is trusted: a removal and a new addition during a long
/// catch-up move where the member's view starts.
const TRUSTED_FOR: Duration = Duration::from_secs(10);

/// The `seq` after which each group met so far is visible, and when that
/// was asked.
#[derive(Default)]
pub(super) struct Visibility {
    known: Mutex<HashMap<String, (u64, Instant)>>,
}

impl Visibility {
    /// Forgets where `group`'s view starts: asked again when next needed.
    pub(super) fn forget(&self, group: &str) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(group);
    }

    /// Keeps where `group`'s view starts, if there is room ("not a member"
    /// is not kept: an addition may follow).
    fn remember(&self, group: &str, from: u64) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if from != HIDE_ALL && (known.len() < MAX_KNOWN || known.contains_key(group)) {
            known.insert(group.to_owned(), (from, Instant::now()));
        }
    }

    fn lookup(&self, group: &str) -> Option<u64> {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(group)
            .filter(|(_, at)| at.elapsed() < TRUSTED_FOR)
            .map(|(from, _)| *from)
    }

    /// Whether the message at `seq` of `group` is hidden from `user`.
    pub(super) async fn hides(
        &self,
        app: &AppState,
        user: &UserId,
        group: &str,
        seq: u64,
    ) -> Result<bool, tonic::Status> {
        let from = match self.lookup(group) {
            Some(from) => from,
            None => {
                let asked = rpc!(
                    app,
                    GroupsClient,
                    visible_from,
                    pb::GroupRequest {
                        caller: user.to_string(),
                        group_id: group.to_owned(),
                    }
                );
                let from = match asked {
                    Ok(r) => r.into_inner().seq,
                    Err(e)
                        if matches!(
                            e.code(),
                            tonic::Code::PermissionDenied | tonic::Code::NotFound
                        ) =>
                    {
                        HIDE_ALL
                    }
                    Err(e) => return Err(e),
                };
                self.remember(group, from);
                from
            }
        };
        Ok(seq <= from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_remembers_a_bounded_number_of_groups() {
        let v = Visibility::default();
        for g in 0..MAX_KNOWN {
            v.remember(&format!("g{g}"), 3);
        }
        v.remember("one-more", 3);
        assert_eq!(v.lookup("one-more"), None, "no room: asked each time");
        v.remember("g0", 9);
        assert_eq!(v.lookup("g0"), Some(9), "a known group is updated");
        v.forget("g1");
        v.remember("one-more", 3);
        assert_eq!(v.lookup("one-more"), Some(3));
        v.remember("hidden", HIDE_ALL);
        assert_eq!(v.lookup("hidden"), None, "not a member: never kept");
    }
}
