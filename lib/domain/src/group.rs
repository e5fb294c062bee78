//! Groups and the rules for changing them (seed §1 and §4).

use crate::{DomainError, GroupId, Limits, MessageId, Millis, UserId};

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub user_id: UserId,
    pub joined_at: Millis,
    /// The group's newest `seq` when the member was added (0 for the
    /// members a group is created with): under [`History::Joined`] the
    /// member sees only messages after it.
    pub joined_seq: u64,
}

/// What a member sees of the messages sent before it joined, chosen when the
/// group is created (Matrix calls this history visibility).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum History {
    /// The whole history, whenever one joined (Slack, Matrix's `shared`).
    #[default]
    Shared,
    /// Only messages sent after one was added (Matrix's `joined`).
    Joined,
}

impl History {
    pub fn as_str(self) -> &'static str {
        match self {
            History::Shared => "shared",
            History::Joined => "joined",
        }
    }

    /// Parses the name used on the wire and in storage; empty is the default.
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        match s {
            "" | "shared" => Ok(History::Shared),
            "joined" => Ok(History::Joined),
            other => Err(DomainError::Invalid(format!(
                "history must be \"shared\" or \"joined\", not {:?}",
                other.chars().take(32).collect::<String>()
            ))),
        }
    }
}

/// A pinned message of a group: which, who pinned it and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub message_id: MessageId,
    pub seq: u64,
    pub by: UserId,
    pub at: Millis,
}

/// An invite to join a group: whoever holds its code (the group, the
/// invite's id and a secret) may join, until it expires or is used up.
/// Only a hash of the secret is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    /// 16 lowercase hex digits, unique in the group.
    pub id: String,
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
    pub by: UserId,
    pub created_at: Millis,
    pub expires_at: Millis,
    /// How many may join with it (0: no limit but the group's size).
    pub max_uses: u32,
    pub uses: u32,
}

/// Shortest and longest life of an invite, in seconds.
pub const INVITE_TTL_SECS: std::ops::RangeInclusive<u64> = 60..=30 * 24 * 3600;

impl Invite {
    /// The life asked of a new invite, in milliseconds, if within
    /// [`INVITE_TTL_SECS`].
    pub fn life(secs: u64) -> Result<Millis, DomainError> {
        if !INVITE_TTL_SECS.contains(&secs) {
            return Err(DomainError::Invalid(format!(
                "an invite lasts from {} seconds to {} days (expiresInSecs {secs})",
                INVITE_TTL_SECS.start(),
                INVITE_TTL_SECS.end() / (24 * 3600)
            )));
        }
        Ok(secs as Millis * 1000)
    }

    /// Whether it still lets someone join at `now`.
    pub fn is_valid(&self, now: Millis) -> bool {
        self.expires_at > now && (self.max_uses == 0 || self.uses < self.max_uses)
    }
}

/// Equal in time independent of where two hashes differ.
fn same_hash(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// A chat group. `members` always contains `owner_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub id: GroupId,
    pub name: String,
    pub description: String,
    pub owner_id: UserId,
    pub created_by: UserId,
    pub members: Vec<Member>,
    pub history: History,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// Its pinned messages, oldest pin first (at most `Limits::group_pins`).
    pub pins: Vec<Pin>,
    /// Its invites, oldest first (at most `Limits::group_invites` valid).
    pub invites: Vec<Invite>,
}

/// A change to a group's ownership or membership, as asked by `caller`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChange {
    TransferOwner {
        new_owner: UserId,
    },
    /// `at_seq`: the group's newest `seq` as the change is made, which the
    /// new members' history starts after under [`History::Joined`].
    AddMembers {
        user_ids: Vec<UserId>,
        at_seq: u64,
    },
    RemoveMember {
        user_id: UserId,
    },
    Leave,
    /// New name or description, or both (owner only).
    Describe {
        name: Option<String>,
        description: Option<String>,
    },
    /// Pins message `message_id` (at `seq`, which the caller must see):
    /// any member.
    Pin {
        message_id: MessageId,
        seq: u64,
    },
    /// Unpins message `message_id`: the member who pinned it or the owner;
    /// anyone with `forced` (the message was deleted). The `seq` is the
    /// pin's, filled in when applied.
    Unpin {
        message_id: MessageId,
        seq: u64,
        forced: bool,
    },
    /// A new invite (owner only): `invite.uses` 0, a life of at most
    /// [`INVITE_TTL_SECS`] (see [`Invite::life`]), `max_uses` at most the
    /// group's member limit.
    /// Tells no one.
    Invite {
        invite: Invite,
    },
    /// Revokes an invite (owner only); revoking one that is gone changes
    /// nothing. Tells no one.
    Revoke {
        invite_id: String,
    },
    /// The caller, not a member, joins with a valid invite whose secret
    /// hashes to `secret_hash`; `at_seq` as for [`GroupChange::AddMembers`].
    /// A member joining again changes nothing.
    Join {
        invite_id: String,
        secret_hash: [u8; 32],
        at_seq: u64,
    },
}

/// `name` trimmed, if it is a group name: not empty, within the limit, and
/// without control or invisible format characters.
fn group_name(name: &str, limits: &Limits) -> Result<String, DomainError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(DomainError::Invalid("name must not be empty".into()));
    }
    check_text("name", name, limits.group_name_chars)?;
    Ok(name.to_owned())
}

fn check_text(what: &str, text: &str, max_chars: usize) -> Result<(), DomainError> {
    let n = text.chars().count();
    if n > max_chars {
        return Err(DomainError::TooLarge(format!(
            "{what} is {n} characters long; the limit is {max_chars}"
        )));
    }
    if let Some(c) = crate::text::forbidden_in_name(text) {
        return Err(DomainError::Invalid(format!(
            "{what} must not contain control or invisible format characters (found U+{:04X})",
            u32::from(c)
        )));
    }
    Ok(())
}

impl Group {
    /// Builds a new group created by `creator`, who becomes owner and member.
    /// Duplicate member ids are folded; the creator need not be listed.
    pub fn create(
        id: GroupId,
        creator: UserId,
        name: &str,
        description: &str,
        member_ids: Vec<UserId>,
        limits: &Limits,
        now: Millis,
    ) -> Result<Self, DomainError> {
        let name = group_name(name, limits)?;
        check_text("description", description, limits.group_description_chars)?;
        let mut group = Group {
            id,
            name,
            description: description.to_owned(),
            owner_id: creator.clone(),
            created_by: creator.clone(),
            members: vec![Member {
                user_id: creator,
                joined_at: now,
                joined_seq: 0,
            }],
            history: History::default(),
            created_at: now,
            updated_at: now,
            pins: Vec::new(),
            invites: Vec::new(),
        };
        group.add(member_ids, 0, limits, now)?;
        Ok(group)
    }

    /// The group with `history` chosen (at creation: the members it is
    /// created with see everything either way).
    pub fn with_history(mut self, history: History) -> Self {
        self.history = history;
        self
    }

    /// Whether the group's invite `invite_id`, whose secret hashes to
    /// `secret_hash`, lets someone join at `now`.
    pub fn invite_admits(&self, invite_id: &str, secret_hash: &[u8; 32], now: Millis) -> bool {
        self.invites
            .iter()
            .any(|i| i.id == invite_id && same_hash(&i.secret_hash, secret_hash) && i.is_valid(now))
    }

    /// `forbidden` unless `caller` owns the group.
    pub fn check_owner(&self, caller: &UserId) -> Result<(), DomainError> {
        if &self.owner_id != caller {
            return Err(DomainError::Forbidden(
                "only the group's owner may do this".into(),
            ));
        }
        Ok(())
    }

    /// Whether `user` is a member.
    pub fn is_member(&self, user: &UserId) -> bool {
        self.members.iter().any(|m| &m.user_id == user)
    }

    /// The `seq` after which `user` sees the group's messages (0: all of
    /// them), or `None` if it is not a member.
    pub fn visible_from(&self, user: &UserId) -> Option<u64> {
        let m = self.members.iter().find(|m| &m.user_id == user)?;
        Some(self.view_of(m))
    }

    /// The `seq` after which member `m` sees the group's messages (0: all
    /// of them): for a walk over the members, with no search for each.
    pub fn view_of(&self, m: &Member) -> u64 {
        match self.history {
            History::Shared => 0,
            History::Joined => m.joined_seq,
        }
    }

    /// The group's newest `seq` when `user` was added (0 for the members
    /// it was created with), or `None` if it is not a member: its unread
    /// count starts there, whatever it sees of the history.
    pub fn joined_seq(&self, user: &UserId) -> Option<u64> {
        self.members
            .iter()
            .find(|m| &m.user_id == user)
            .map(|m| m.joined_seq)
    }

    /// The member ids, in join order.
    pub fn member_ids(&self) -> impl Iterator<Item = &UserId> {
        self.members.iter().map(|m| &m.user_id)
    }

    /// Adds those of `user_ids` who are not members yet, once each, and
    /// returns them.
    fn add(
        &mut self,
        user_ids: Vec<UserId>,
        at_seq: u64,
        limits: &Limits,
        now: Millis,
    ) -> Result<Vec<UserId>, DomainError> {
        let mut added = Vec::new();
        for user_id in user_ids {
            if !self.is_member(&user_id) {
                added.push(user_id.clone());
                self.members.push(Member {
                    user_id,
                    joined_at: now,
                    joined_seq: at_seq,
                });
            }
        }
        if self.members.len() > limits.group_members {
            return Err(DomainError::TooLarge(format!(
                "a group may have at most {} members, this one would have {}",
                limits.group_members,
                self.members.len()
            )));
        }
        Ok(added)
    }

    /// Applies `change` asked by `caller`, checking who may do it. A change
    /// that changes nothing (adding only members, making the owner owner)
    /// leaves the group as it was: [`Applied::Unchanged`], nothing to store
    /// or tell anyone.
    pub fn apply(
        &mut self,
        caller: &UserId,
        change: GroupChange,
        limits: &Limits,
        now: Millis,
    ) -> Result<Applied, DomainError> {
        // (a forced unpin follows a message's deletion, whoever deleted it;
        // a join is a non-member's)
        let forced = matches!(change, GroupChange::Unpin { forced: true, .. });
        let joining = matches!(change, GroupChange::Join { .. });
        if !forced && !joining && !self.is_member(caller) {
            return Err(DomainError::Forbidden(
                "you are not a member of this group".into(),
            ));
        }
        // a pin changes nothing a member who does not see its message
        // may see: not even when the group changed; invites are the
        // owner's alone
        let touches = !matches!(
            change,
            GroupChange::Pin { .. }
                | GroupChange::Unpin { .. }
                | GroupChange::Invite { .. }
                | GroupChange::Revoke { .. }
        );
        let owner_only = || self.check_owner(caller);
        let mut audience: Vec<UserId> = self.member_ids().cloned().collect();
        let change = match change {
            GroupChange::TransferOwner { new_owner } => {
                owner_only()?;
                if !self.is_member(&new_owner) {
                    return Err(DomainError::Invalid(
                        "the new owner must be a member of the group".into(),
                    ));
                }
                if new_owner == self.owner_id {
                    return Ok(Applied::Unchanged);
                }
                self.owner_id = new_owner.clone();
                GroupChange::TransferOwner { new_owner }
            }
            GroupChange::AddMembers { user_ids, at_seq } => {
                owner_only()?;
                if user_ids.is_empty() {
                    return Err(DomainError::Invalid("userIds must not be empty".into()));
                }
                let added = self.add(user_ids, at_seq, limits, now)?;
                if added.is_empty() {
                    return Ok(Applied::Unchanged);
                }
                audience.extend(added.iter().cloned());
                GroupChange::AddMembers {
                    user_ids: added,
                    at_seq,
                }
            }
            GroupChange::RemoveMember { user_id } => {
                owner_only()?;
                if user_id == self.owner_id {
                    return Err(DomainError::Conflict(
                        "the owner cannot be removed; transfer ownership first".into(),
                    ));
                }
                if !self.is_member(&user_id) {
                    return Err(DomainError::Invalid(format!("{user_id} is not a member")));
                }
                self.members.retain(|m| m.user_id != user_id);
                GroupChange::RemoveMember { user_id }
            }
            GroupChange::Leave => {
                if &self.owner_id == caller {
                    return Err(DomainError::Conflict(
                        "the owner cannot leave; transfer ownership first".into(),
                    ));
                }
                self.members.retain(|m| &m.user_id != caller);
                GroupChange::Leave
            }
            GroupChange::Describe { name, description } => {
                owner_only()?;
                if name.is_none() && description.is_none() {
                    return Err(DomainError::Invalid(
                        "give a name, a description or both".into(),
                    ));
                }
                let name = name.map(|n| group_name(&n, limits)).transpose()?;
                if let Some(d) = &description {
                    check_text("description", d, limits.group_description_chars)?;
                }
                // only what differs is changed, and told
                let name = name.filter(|n| *n != self.name);
                let description = description.filter(|d| *d != self.description);
                if name.is_none() && description.is_none() {
                    return Ok(Applied::Unchanged);
                }
                if let Some(n) = &name {
                    self.name.clone_from(n);
                }
                if let Some(d) = &description {
                    self.description.clone_from(d);
                }
                GroupChange::Describe { name, description }
            }
            GroupChange::Pin { message_id, seq } => {
                if self.pins.iter().any(|p| p.message_id == message_id) {
                    return Ok(Applied::Unchanged);
                }
                if self.pins.len() >= limits.group_pins {
                    return Err(DomainError::TooLarge(format!(
                        "a group has at most {} pinned messages: unpin one first",
                        limits.group_pins
                    )));
                }
                self.pins.push(Pin {
                    message_id: message_id.clone(),
                    seq,
                    by: caller.clone(),
                    at: now,
                });
                GroupChange::Pin { message_id, seq }
            }
            GroupChange::Unpin {
                message_id, forced, ..
            } => {
                // a pin of a message the caller does not see is, to it, no
                // pin at all (and no answer may tell it apart)
                let sees_from = self.visible_from(caller).unwrap_or(u64::MAX);
                let Some(at) = self
                    .pins
                    .iter()
                    .position(|p| p.message_id == message_id && (forced || p.seq > sees_from))
                else {
                    return Ok(Applied::Unchanged);
                };
                let pin = &self.pins[at];
                if !forced && &pin.by != caller && &self.owner_id != caller {
                    return Err(DomainError::Forbidden(
                        "only the member who pinned a message or the group's owner may unpin it"
                            .into(),
                    ));
                }
                let seq = pin.seq;
                self.pins.remove(at);
                GroupChange::Unpin {
                    message_id,
                    seq,
                    forced,
                }
            }
            GroupChange::Invite { invite } => {
                owner_only()?;
                let longest = *INVITE_TTL_SECS.end() as Millis * 1000;
                if invite.expires_at <= now || invite.expires_at - now > longest || invite.uses != 0
                {
                    return Err(DomainError::Invalid(format!(
                        "an invite lasts at most {} days",
                        INVITE_TTL_SECS.end() / (24 * 3600)
                    )));
                }
                if invite.max_uses as usize > limits.group_members {
                    return Err(DomainError::Invalid(format!(
                        "maxUses is at most the group's member limit, {}",
                        limits.group_members
                    )));
                }
                if self.invites.iter().any(|i| i.id == invite.id) {
                    return Err(DomainError::Conflict("that invite id is taken".into()));
                }
                // those that can no longer be used go first
                self.invites.retain(|i| i.is_valid(now));
                if self.invites.len() >= limits.group_invites {
                    return Err(DomainError::TooLarge(format!(
                        "a group has at most {} valid invites: revoke one first",
                        limits.group_invites
                    )));
                }
                self.invites.push(invite.clone());
                audience.clear();
                GroupChange::Invite { invite }
            }
            GroupChange::Revoke { invite_id } => {
                owner_only()?;
                if !self
                    .invites
                    .iter()
                    .any(|i| i.id == invite_id && i.is_valid(now))
                {
                    return Ok(Applied::Unchanged);
                }
                self.invites
                    .retain(|i| i.id != invite_id && i.is_valid(now));
                audience.clear();
                GroupChange::Revoke { invite_id }
            }
            GroupChange::Join {
                invite_id,
                secret_hash,
                at_seq,
            } => {
                if self.is_member(caller) {
                    return Ok(Applied::Unchanged);
                }
                let Some(at) = self.invites.iter().position(|i| {
                    i.id == invite_id && same_hash(&i.secret_hash, &secret_hash) && i.is_valid(now)
                }) else {
                    return Err(DomainError::Forbidden(
                        "no such invite: it may have expired, been revoked or used up".into(),
                    ));
                };
                if self.members.len() >= limits.group_members {
                    return Err(DomainError::TooLarge(format!(
                        "the group has {} members, the most it may have",
                        limits.group_members
                    )));
                }
                self.invites[at].uses += 1;
                self.add(vec![caller.clone()], at_seq, limits, now)?;
                self.invites.retain(|i| i.is_valid(now));
                audience.push(caller.clone());
                GroupChange::Join {
                    invite_id,
                    secret_hash,
                    at_seq,
                }
            }
        };
        if touches {
            self.updated_at = now.max(self.updated_at);
        }
        Ok(Applied::Changed { audience, change })
    }
}

/// What [`Group::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Nothing: the group is as it was.
    Unchanged,
    Changed {
        /// The users who were members before or after: everyone who must
        /// hear of it.
        audience: Vec<UserId>,
        /// What changed: for an addition, only the users who were not
        /// members yet, once each.
        change: GroupChange,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uid(s: &str) -> UserId {
        UserId::parse(s).expect("valid id")
    }

    fn group(members: &[&str]) -> Group {
        Group::create(
            GroupId::generate(),
            uid("owner"),
            " team ",
            "",
            members.iter().map(|m| uid(m)).collect(),
            &Limits::default(),
            10,
        )
        .expect("valid group")
    }

    fn invite(id: &str, secret: u8, now: Millis, max_uses: u32) -> Invite {
        Invite {
            id: id.into(),
            secret_hash: [secret; 32],
            by: uid("owner"),
            created_at: now,
            expires_at: now + 3_600_000,
            max_uses,
            uses: 0,
        }
    }

    #[test]
    fn invites_let_non_members_join_while_valid_and_tell_no_one_of_themselves() {
        let limits = Limits {
            group_invites: 2,
            group_members: 4,
            ..Limits::default()
        };
        let mut g = group(&["a"]).with_history(History::Joined);
        let create = |i: Invite| GroupChange::Invite { invite: i };
        // only the owner invites, within the bounds
        assert!(matches!(
            g.apply(&uid("a"), create(invite("i1", 1, 10, 0)), &limits, 10),
            Err(DomainError::Forbidden(_))
        ));
        assert!(Invite::life(59).is_err() && Invite::life(30 * 24 * 3600 + 1).is_err());
        assert_eq!(Invite::life(60), Ok(60_000));
        let mut long = invite("i1", 1, 10, 0);
        long.expires_at = 10 + Invite::life(30 * 24 * 3600).expect("the longest") + 1;
        assert!(matches!(
            g.apply(&uid("owner"), create(long), &limits, 10),
            Err(DomainError::Invalid(_))
        ));
        assert!(matches!(
            g.apply(&uid("owner"), create(invite("i1", 1, 10, 5)), &limits, 10),
            Err(DomainError::Invalid(_))
        ));
        let updated = g.updated_at;
        let Ok(Applied::Changed { audience, .. }) =
            g.apply(&uid("owner"), create(invite("i1", 1, 10, 1)), &limits, 20)
        else {
            panic!("the owner invites");
        };
        assert!(audience.is_empty(), "no one hears of an invite");
        assert_eq!(g.updated_at, updated, "members see nothing change");
        assert!(matches!(
            g.apply(&uid("owner"), create(invite("i1", 2, 20, 0)), &limits, 20),
            Err(DomainError::Conflict(_))
        ));
        g.apply(&uid("owner"), create(invite("i2", 2, 20, 0)), &limits, 20)
            .expect("a second");
        assert!(matches!(
            g.apply(&uid("owner"), create(invite("i3", 3, 20, 0)), &limits, 20),
            Err(DomainError::TooLarge(_))
        ));

        let join = |id: &str, secret: u8| GroupChange::Join {
            invite_id: id.into(),
            secret_hash: [secret; 32],
            at_seq: 7,
        };
        // a wrong secret, or another invite's, is no invite
        for (id, secret) in [("i1", 2), ("i2", 1), ("nope", 1)] {
            assert!(matches!(
                g.apply(&uid("b"), join(id, secret), &limits, 30),
                Err(DomainError::Forbidden(_))
            ));
        }
        // b joins with the single-use invite, which is then gone; everyone
        // hears, b included; b's history starts at the join
        let Ok(Applied::Changed { audience, .. }) = g.apply(&uid("b"), join("i1", 1), &limits, 30)
        else {
            panic!("b joins");
        };
        assert_eq!(audience, [uid("owner"), uid("a"), uid("b")]);
        assert_eq!(g.visible_from(&uid("b")), Some(7));
        assert_eq!(g.invites.len(), 1);
        assert!(matches!(
            g.apply(&uid("c"), join("i1", 1), &limits, 31),
            Err(DomainError::Forbidden(_))
        ));
        // joining again changes nothing, nor uses the invite
        assert_eq!(
            g.apply(&uid("b"), join("i2", 2), &limits, 31),
            Ok(Applied::Unchanged)
        );
        assert_eq!(g.invites[0].uses, 0);
        // the group's size still holds
        g.apply(&uid("c"), join("i2", 2), &limits, 32)
            .expect("c joins");
        assert!(matches!(
            g.apply(&uid("d"), join("i2", 2), &limits, 33),
            Err(DomainError::TooLarge(_))
        ));
        assert_eq!((g.members.len(), g.invites[0].uses), (4, 1), "as it was");
        // an expired invite lets no one in, and revoking it changes nothing
        let late = 20 + 3_600_000;
        assert!(matches!(
            g.apply(&uid("e"), join("i2", 2), &limits, late),
            Err(DomainError::Forbidden(_))
        ));
        let revoke = |id: &str| GroupChange::Revoke {
            invite_id: id.into(),
        };
        assert_eq!(
            g.apply(&uid("owner"), revoke("i2"), &limits, late),
            Ok(Applied::Unchanged)
        );
        // revoking a valid one removes it; only the owner may
        g.apply(
            &uid("owner"),
            create(invite("i4", 4, late, 0)),
            &limits,
            late,
        )
        .expect("invites");
        assert!(matches!(
            g.apply(&uid("a"), revoke("i4"), &limits, late),
            Err(DomainError::Forbidden(_))
        ));
        assert!(matches!(
            g.apply(&uid("owner"), revoke("i4"), &limits, late),
            Ok(Applied::Changed { .. })
        ));
        assert!(g.invites.is_empty());
        assert!(matches!(
            g.apply(&uid("f"), join("i4", 4), &limits, late),
            Err(DomainError::Forbidden(_))
        ));
    }

    #[test]
    fn a_pin_a_member_does_not_see_is_no_pin_to_it() {
        let limits = Limits::default();
        let mut g = group(&["a"]).with_history(History::Joined);
        let m = MessageId::generate();
        g.apply(
            &uid("a"),
            GroupChange::Pin {
                message_id: m.clone(),
                seq: 3,
            },
            &limits,
            20,
        )
        .expect("pins");
        let add = GroupChange::AddMembers {
            user_ids: vec![uid("late")],
            at_seq: 5,
        };
        g.apply(&uid("owner"), add, &limits, 21).expect("adds");
        let unpin = |forced| GroupChange::Unpin {
            message_id: m.clone(),
            seq: 0,
            forced,
        };
        assert_eq!(
            g.apply(&uid("late"), unpin(false), &limits, 22),
            Ok(Applied::Unchanged),
            "not a 403 that would tell it is pinned"
        );
        assert_eq!(g.pins.len(), 1);
        assert!(matches!(
            g.apply(&uid("late"), unpin(true), &limits, 23),
            Ok(Applied::Changed { .. })
        ));
    }

    #[test]
    fn members_pin_within_the_limit_and_the_pinner_or_owner_unpins() {
        let mut g = group(&["a", "b"]);
        let created = g.updated_at;
        let limits = Limits {
            group_pins: 2,
            ..Limits::default()
        };
        let (m1, m2, m3) = (
            MessageId::generate(),
            MessageId::generate(),
            MessageId::generate(),
        );
        let pin = |m: &MessageId, seq| GroupChange::Pin {
            message_id: m.clone(),
            seq,
        };
        let unpin = |m: &MessageId, forced| GroupChange::Unpin {
            message_id: m.clone(),
            seq: 0,
            forced,
        };
        assert!(matches!(
            g.apply(&uid("a"), pin(&m1, 1), &limits, 20),
            Ok(Applied::Changed { .. })
        ));
        assert_eq!(
            g.apply(&uid("b"), pin(&m1, 1), &limits, 21),
            Ok(Applied::Unchanged),
            "pinned already"
        );
        g.apply(&uid("b"), pin(&m2, 2), &limits, 22).expect("pins");
        assert!(matches!(
            g.apply(&uid("a"), pin(&m3, 3), &limits, 23),
            Err(DomainError::TooLarge(_))
        ));
        assert!(matches!(
            g.apply(&uid("stranger"), pin(&m3, 3), &limits, 23),
            Err(DomainError::Forbidden(_))
        ));
        let pins: Vec<(u64, &str)> = g.pins.iter().map(|p| (p.seq, p.by.as_str())).collect();
        assert_eq!(pins, [(1, "a"), (2, "b")]);
        // b may not unpin a's pin; a, the owner and a forced unpin may
        assert!(matches!(
            g.apply(&uid("b"), unpin(&m1, false), &limits, 24),
            Err(DomainError::Forbidden(_))
        ));
        let Ok(Applied::Changed { change, .. }) =
            g.apply(&uid("a"), unpin(&m1, false), &limits, 25)
        else {
            panic!("a unpins its own pin")
        };
        assert_eq!(
            change,
            GroupChange::Unpin {
                message_id: m1.clone(),
                seq: 1,
                forced: false
            },
            "the pin's seq is filled in"
        );
        assert_eq!(
            g.apply(&uid("a"), unpin(&m1, false), &limits, 26),
            Ok(Applied::Unchanged),
            "not pinned"
        );
        g.apply(&uid("owner"), unpin(&m2, false), &limits, 27)
            .expect("the owner unpins any");
        g.apply(&uid("a"), pin(&m3, 3), &limits, 28)
            .expect("room again");
        g.apply(&uid("stranger"), unpin(&m3, true), &limits, 29)
            .expect("a forced unpin, whoever deleted the message");
        assert!(g.pins.is_empty());
        assert_eq!(
            g.updated_at, created,
            "pins do not move the group (a member who does not see them would see that)"
        );
    }

    #[test]
    fn the_owner_alone_renames_and_describes_within_the_limits() {
        let mut g = group(&["a"]);
        let limits = Limits::default();
        let describe = |name: Option<&str>, description: Option<&str>| GroupChange::Describe {
            name: name.map(str::to_owned),
            description: description.map(str::to_owned),
        };
        // a member who is not the owner may not
        let e = g
            .apply(&uid("a"), describe(Some("x"), None), &limits, 20)
            .expect_err("not the owner");
        assert!(matches!(e, DomainError::Forbidden(_)), "{e}");
        // the name is trimmed; only what differs is the change
        let applied = g
            .apply(
                &uid("owner"),
                describe(Some("  plans "), Some("")),
                &limits,
                20,
            )
            .expect("renamed");
        let Applied::Changed { audience, change } = applied else {
            panic!("unchanged")
        };
        assert_eq!(g.name, "plans");
        assert_eq!(g.updated_at, 20);
        assert_eq!(audience, [uid("owner"), uid("a")]);
        assert_eq!(change, describe(Some("plans"), None));
        assert_eq!(
            g.apply(&uid("owner"), describe(Some("plans"), None), &limits, 30),
            Ok(Applied::Unchanged)
        );
        g.apply(&uid("owner"), describe(None, Some("weekly")), &limits, 30)
            .expect("described");
        assert_eq!(
            (g.name.as_str(), g.description.as_str()),
            ("plans", "weekly")
        );
        // bad input changes nothing
        let long = "n".repeat(limits.group_name_chars + 1);
        let too_long = "d".repeat(limits.group_description_chars + 1);
        for (change, bad) in [
            (describe(None, None), "nothing asked"),
            (describe(Some("   "), None), "empty name"),
            (describe(Some(&long), None), "long name"),
            (describe(None, Some(&too_long)), "long description"),
            (describe(Some("a\u{202e}b"), None), "invisible character"),
        ] {
            assert!(
                g.apply(&uid("owner"), change, &limits, 40).is_err(),
                "{bad}"
            );
        }
        assert_eq!(
            (g.name.as_str(), g.description.as_str()),
            ("plans", "weekly")
        );
        assert_eq!(g.updated_at, 30);
    }

    #[test]
    fn creator_is_owner_and_member_and_duplicates_fold() {
        let g = group(&["a", "a", "owner", "b"]);
        assert_eq!(g.name, "team");
        assert_eq!(g.owner_id, uid("owner"));
        let ids: Vec<_> = g.member_ids().map(|u| u.as_str()).collect();
        assert_eq!(ids, ["owner", "a", "b"]);
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            group_members: 2,
            group_name_chars: 3,
            ..Limits::default()
        };
        let make = |name: &str, members: &[&str]| {
            Group::create(
                GroupId::generate(),
                uid("o"),
                name,
                "",
                members.iter().map(|m| uid(m)).collect(),
                &limits,
                0,
            )
        };
        assert!(make("abc", &["x"]).is_ok());
        assert!(matches!(make("abcd", &[]), Err(DomainError::TooLarge(_))));
        assert!(matches!(
            make("a", &["x", "y"]),
            Err(DomainError::TooLarge(_))
        ));
        assert!(matches!(make("  ", &[]), Err(DomainError::Invalid(_))));
    }

    #[test]
    fn only_the_owner_manages_and_the_owner_cannot_leave() {
        let limits = Limits::default();
        let mut g = group(&["a", "b"]);
        let err = g.apply(
            &uid("a"),
            GroupChange::RemoveMember { user_id: uid("b") },
            &limits,
            11,
        );
        assert!(matches!(err, Err(DomainError::Forbidden(_))));
        let err = g.apply(&uid("owner"), GroupChange::Leave, &limits, 11);
        assert!(matches!(err, Err(DomainError::Conflict(_))));
        let err = g.apply(&uid("zed"), GroupChange::Leave, &limits, 11);
        assert!(matches!(err, Err(DomainError::Forbidden(_))));

        g.apply(
            &uid("owner"),
            GroupChange::TransferOwner {
                new_owner: uid("a"),
            },
            &limits,
            12,
        )
        .expect("transfer");
        assert_eq!(g.owner_id, uid("a"));
        assert_eq!(g.updated_at, 12);
        let Applied::Changed { audience, .. } = g
            .apply(&uid("owner"), GroupChange::Leave, &limits, 13)
            .expect("leave")
        else {
            panic!("the owner left");
        };
        assert!(audience.contains(&uid("owner")), "the leaver hears of it");
        assert!(!g.is_member(&uid("owner")));
    }

    /// Changes that change nothing are told apart, so that nothing is
    /// stored or published for them (a loop of them would otherwise notify
    /// every member each time); an addition names only who was new.
    #[test]
    fn changes_that_change_nothing_are_unchanged_and_additions_name_only_the_new() {
        let limits = Limits::default();
        let mut g = group(&["a", "b"]);
        let before = g.clone();
        let again = GroupChange::AddMembers {
            user_ids: vec![uid("a"), uid("b"), uid("owner"), uid("a")],
            at_seq: 3,
        };
        assert_eq!(
            g.apply(&uid("owner"), again, &limits, 20),
            Ok(Applied::Unchanged)
        );
        let to_self = GroupChange::TransferOwner {
            new_owner: uid("owner"),
        };
        assert_eq!(
            g.apply(&uid("owner"), to_self, &limits, 20),
            Ok(Applied::Unchanged)
        );
        assert_eq!(g, before, "untouched, updatedAt too");

        let some_new = GroupChange::AddMembers {
            user_ids: vec![uid("a"), uid("c"), uid("c"), uid("d")],
            at_seq: 3,
        };
        let Applied::Changed { audience, change } = g
            .apply(&uid("owner"), some_new, &limits, 21)
            .expect("added")
        else {
            panic!("c and d are new");
        };
        assert_eq!(
            change,
            GroupChange::AddMembers {
                user_ids: vec![uid("c"), uid("d")],
                at_seq: 3
            }
        );
        let mut audience: Vec<&str> = audience.iter().map(UserId::as_str).collect();
        audience.sort_unstable();
        assert_eq!(audience, ["a", "b", "c", "d", "owner"]);
    }

    #[test]
    fn under_joined_history_a_member_added_later_sees_only_what_follows() {
        let limits = Limits::default();
        for (history, from) in [(History::Shared, 0), (History::Joined, 41)] {
            let mut g = Group::create(
                GroupId::generate(),
                uid("owner"),
                "team",
                "",
                vec![uid("a")],
                &limits,
                10,
            )
            .expect("valid group")
            .with_history(history);
            let add = GroupChange::AddMembers {
                user_ids: vec![uid("late"), uid("a")],
                at_seq: 41,
            };
            g.apply(&uid("owner"), add, &limits, 11).expect("add");
            assert_eq!(g.visible_from(&uid("owner")), Some(0));
            assert_eq!(
                g.visible_from(&uid("a")),
                Some(0),
                "re-adding changes nothing"
            );
            assert_eq!(g.visible_from(&uid("late")), Some(from), "{history:?}");
            assert_eq!(g.visible_from(&uid("stranger")), None);
        }
        assert_eq!(History::parse(""), Ok(History::Shared));
        assert_eq!(History::parse("joined"), Ok(History::Joined));
        assert!(matches!(
            History::parse("all"),
            Err(DomainError::Invalid(_))
        ));
    }
}
