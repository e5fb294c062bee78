//! Typing notices of one connection: checked and rate-limited here, passed
//! to every edge as a signal (`chat_bus::Signal`), written there to the
//! group's other members' connections (`crate::signals`). Never stored.
//!
//! A connection may type only in a group it follows (its user subscribed
//! and is still a member: the group hub knows, no worker is asked). A
//! `start` is passed on at most once per [`REFRESH`] per group (clients send
//! one per keystroke); each holds for [`TYPING_EXPIRES_MS`] at the
//! receivers. A `stop` is passed on only after a `start` was. A start not
//! renewed within that time, and every start still open when the
//! connection ends, is followed by a `stop` from the edge itself, so a
//! receiver that ignores the expiry still sees the member stop.

use std::{collections::HashMap, time::Instant};

use chat_domain::GroupId;
use chat_protocol::{TYPING_EXPIRES_MS, TypingPush, TypingState, push_json};

use super::*;

/// The shortest time between two `start`s of one group passed on.
pub(super) const REFRESH: Duration = Duration::from_secs(2);
/// Groups a connection may be typing in at once.
pub(super) const GROUPS_MAX: usize = 16;

fn expiry() -> Duration {
    Duration::from_millis(TYPING_EXPIRES_MS)
}

/// A connection typing in more groups at once than [`GROUPS_MAX`].
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TooManyGroups;

/// The groups a connection is typing in, and when each `start` was last
/// passed on (kept after a `stop` too, so that `stop`, `start`, `stop`…
/// passes on no more than one `start` per [`REFRESH`]).
#[derive(Default)]
pub(super) struct Typing {
    started: HashMap<GroupId, Instant>,
    last_start: HashMap<GroupId, Instant>,
}

impl Typing {
    /// A `start` (or `stop`) in `group` at `now`: whether to pass it on.
    pub(super) fn on(
        &mut self,
        group: &GroupId,
        state: TypingState,
        now: Instant,
    ) -> Result<bool, TooManyGroups> {
        match state {
            TypingState::Stop => Ok(self.started.remove(group).is_some()),
            TypingState::Start => {
                if !self.started.contains_key(group) && self.started.len() >= GROUPS_MAX {
                    return Err(TooManyGroups);
                }
                let recent = self
                    .last_start
                    .get(group)
                    .is_some_and(|at| now.duration_since(*at) < REFRESH);
                if recent {
                    // typing again, but a start was told within REFRESH
                    // (a stop may have gone out since): the next start
                    // after REFRESH is told
                    return Ok(false);
                }
                if self.last_start.len() >= GROUPS_MAX * 4 {
                    self.last_start
                        .retain(|_, at| now.duration_since(*at) < REFRESH);
                }
                self.started.insert(group.clone(), now);
                self.last_start.insert(group.clone(), now);
                Ok(true)
            }
        }
    }

    /// The groups whose `start` ran out by `now` (forgotten here): each
    /// gets a `stop`.
    pub(super) fn expired(&mut self, now: Instant) -> Vec<GroupId> {
        let mut out = Vec::new();
        self.started.retain(|g, at| {
            let live = now.duration_since(*at) < expiry();
            if !live {
                out.push(g.clone());
            }
            live
        });
        out
    }

    /// Every group still typed in (the connection ends): each gets a `stop`.
    pub(super) fn drain(&mut self) -> Vec<GroupId> {
        self.started.drain().map(|(g, _)| g).collect()
    }
}

/// Passes `user`'s typing `state` in `group` to every edge.
pub(super) async fn publish(
    app: &AppState,
    user: &UserId,
    group: &GroupId,
    state: TypingState,
) -> Result<(), ApiError> {
    let push = TypingPush {
        group_id: group.to_string(),
        user_id: user.to_string(),
        state,
        expires_in_ms: (state == TypingState::Start).then_some(TYPING_EXPIRES_MS),
    };
    let frame = push_json(event::USER_TYPING, &push)
        .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
    app.bus
        .signal(group, Some(user), None, frame.into())
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, group = %group, "typing not passed on");
            ApiError::new(
                ErrorCode::Unavailable,
                "typing could not be passed on; try again",
            )
        })
}

/// Sends the `stop`s that `groups` owe, in the background.
pub(super) fn stop_all(app: &AppState, user: &UserId, groups: Vec<GroupId>) {
    if groups.is_empty() {
        return;
    }
    let (app, user) = (app.clone(), user.clone());
    tokio::spawn(async move {
        for g in groups {
            let _ = publish(&app, &user, &g, TypingState::Stop).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(id: &str) -> GroupId {
        GroupId::parse(id).expect("id")
    }

    #[test]
    fn starts_are_passed_on_at_most_once_per_refresh() {
        let mut t = Typing::default();
        let t0 = Instant::now();
        assert_eq!(t.on(&g("a"), TypingState::Start, t0), Ok(true));
        assert_eq!(
            t.on(&g("a"), TypingState::Start, t0 + REFRESH / 2),
            Ok(false)
        );
        assert_eq!(
            t.on(&g("b"), TypingState::Start, t0 + REFRESH / 2),
            Ok(true)
        );
        assert_eq!(t.on(&g("a"), TypingState::Start, t0 + REFRESH), Ok(true));
    }

    #[test]
    fn a_stop_is_passed_on_only_after_a_start() {
        let mut t = Typing::default();
        let t0 = Instant::now();
        assert_eq!(t.on(&g("a"), TypingState::Stop, t0), Ok(false));
        assert_eq!(t.on(&g("a"), TypingState::Start, t0), Ok(true));
        assert_eq!(t.on(&g("a"), TypingState::Stop, t0), Ok(true));
        assert_eq!(t.on(&g("a"), TypingState::Stop, t0), Ok(false));
        // stop, start, stop… passes on one start per REFRESH, not more
        assert_eq!(t.on(&g("a"), TypingState::Start, t0), Ok(false));
        assert_eq!(
            t.on(&g("a"), TypingState::Stop, t0),
            Ok(false),
            "its start was not told"
        );
        assert_eq!(t.on(&g("a"), TypingState::Start, t0 + REFRESH), Ok(true));
    }

    #[test]
    fn a_connection_types_in_a_bounded_number_of_groups() {
        let mut t = Typing::default();
        let t0 = Instant::now();
        for i in 0..GROUPS_MAX {
            assert_eq!(t.on(&g(&format!("g{i}")), TypingState::Start, t0), Ok(true));
        }
        assert_eq!(
            t.on(&g("one-more"), TypingState::Start, t0),
            Err(TooManyGroups)
        );
        // a stop makes room
        assert_eq!(t.on(&g("g0"), TypingState::Stop, t0), Ok(true));
        assert_eq!(t.on(&g("one-more"), TypingState::Start, t0), Ok(true));
    }

    #[test]
    fn a_start_not_renewed_expires_and_owes_a_stop() {
        let mut t = Typing::default();
        let t0 = Instant::now();
        t.on(&g("a"), TypingState::Start, t0).expect("start");
        t.on(&g("b"), TypingState::Start, t0 + expiry() / 2)
            .expect("start");
        assert!(t.expired(t0 + expiry() / 2).is_empty());
        assert_eq!(t.expired(t0 + expiry()), [g("a")]);
        // forgotten: a stop now is not passed on again
        assert_eq!(t.on(&g("a"), TypingState::Stop, t0 + expiry()), Ok(false));
        assert_eq!(t.drain(), [g("b")]);
        assert!(t.drain().is_empty());
    }
}
