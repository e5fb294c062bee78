//! `Groups`: creation, membership and ownership (seed §1), and the
//! notifications that go with them.

use std::sync::Arc;

use bytes::Bytes;
use chat_domain::{
    Applied, DomainError, Group, GroupChange, GroupId, History, Invite, UserId, now_millis,
};
use chat_protocol::{GroupChangeView, GroupEvent, GroupView, event, push_json};
use chat_rpc::pb::{self, groups_server::Groups};
use chat_store::{GroupRecord, Membership, Tombstone, Unnotified};
use tonic::{Request, Response, Status};

use crate::{State, WorkerError, messages, parse_id};

/// How often a change is retried when another change to the same group won
/// the race.
const CAS_ATTEMPTS: usize = 8;

pub(crate) struct GroupsService(pub Arc<State>);

impl GroupsService {
    async fn load(&self, id: &GroupId) -> Result<GroupRecord, WorkerError> {
        self.0.load(id).await
    }

    async fn load_as_member(
        &self,
        caller: &UserId,
        id: &GroupId,
    ) -> Result<GroupRecord, WorkerError> {
        self.0.load_as_member(caller, id).await
    }

    /// Publishes one event to each user's notification subject, all in
    /// flight at once, and waits for JetStream to store every one.
    async fn publish_to_users(
        &self,
        users: &[UserId],
        name: &str,
        group: &Group,
        change: GroupChangeView,
        dedup_prefix: &str,
    ) -> Result<(), WorkerError> {
        let payload = push_json(
            name,
            &GroupEvent {
                group: GroupView::for_event(group),
                change: Some(change),
            },
        )
        .map_err(|e| WorkerError::Domain(DomainError::Invalid(e.to_string())))?;
        let payload = Bytes::from(payload);
        let publishes = users.iter().map(|u| {
            let id = format!("{dedup_prefix}-{u}");
            let payload = payload.clone();
            async move { self.0.bus.publish_user_event(u, &id, payload).await }
        });
        for result in futures::future::join_all(publishes).await {
            result?;
        }
        Ok(())
    }

    /// Applies a membership or ownership change with compare-and-set, then
    /// tells everyone concerned. A member who leaves or is removed stops
    /// receiving the group live at the event published after the change
    /// commits.
    pub(crate) async fn change(
        &self,
        caller: &str,
        group_id: &str,
        change: GroupChange,
    ) -> Result<Group, WorkerError> {
        let caller = parse_id::<UserId>(caller)?;
        let id = parse_id::<GroupId>(group_id)?;
        let leaving = match &change {
            GroupChange::Leave => Some(caller.clone()),
            GroupChange::RemoveMember { user_id } => Some(user_id.clone()),
            _ => None,
        };
        let Some(leaving) = leaving else {
            return self.apply(&caller, &id, change, None).await;
        };
        // in a task of its own: a cancelled call must not stop it between
        // the commit and the event that ends live delivery
        let service = GroupsService(self.0.clone());
        tokio::spawn(async move { service.apply(&caller, &id, change, Some(&leaving)).await })
            .await
            .map_err(|e| {
                WorkerError::Store(chat_store::StoreError::Unavailable(format!(
                    "membership change task: {e}"
                )))
            })?
    }

    /// `leaving`: the member a leave or removal takes out. Once the change
    /// commits, its subscription is forgotten and every edge stops writing
    /// the group to its connections at the event published then, before
    /// anyone is told (a notification that cannot go out fails the call,
    /// but must not leave the removed member receiving the group).
    async fn apply(
        &self,
        caller: &UserId,
        id: &GroupId,
        change: GroupChange,
        leaving: Option<&UserId>,
    ) -> Result<Group, WorkerError> {
        for _ in 0..CAS_ATTEMPTS {
            let mut record = self.load(id).await?;
            // new members' history starts after the group's newest message
            // as of just before this attempt's write: a message with a
            // higher seq may predate the commit by one write, none at or
            // below it follows it
            let change = match &change {
                // (anyone else is refused by `apply`, at no cost)
                GroupChange::AddMembers { user_ids, .. } if &record.group.owner_id == caller => {
                    GroupChange::AddMembers {
                        user_ids: user_ids.clone(),
                        at_seq: crate::publish::newest_seq(&self.0, id).await?,
                    }
                }
                GroupChange::Join {
                    invite_id,
                    secret_hash,
                    ..
                } if !record.group.is_member(caller)
                    && record
                        .group
                        .invite_admits(invite_id, secret_hash, now_millis()) =>
                {
                    GroupChange::Join {
                        invite_id: invite_id.clone(),
                        secret_hash: *secret_hash,
                        at_seq: crate::publish::newest_seq(&self.0, id).await?,
                    }
                }
                other => other.clone(),
            };
            let applied =
                record
                    .group
                    .apply(caller, change.clone(), &self.0.config.limits, now_millis())?;
            let (audience, change) = match applied {
                // nothing stored, nobody told: repeating a change costs a
                // read, unless the last change's notification did not go
                // out (its call failed, and this is the client's retry)
                Applied::Unchanged => {
                    if let Some(notice) = record.unnotified.take() {
                        self.notify_again(&record, notice).await?;
                    }
                    return Ok(record.group);
                }
                Applied::Changed { audience, change } => (audience, change),
            };
            // only once the caller may: the new members accept being
            // added by the caller, and have room; a new owner accepts
            // the group from the caller
            match &change {
                GroupChange::AddMembers { user_ids, .. } => {
                    self.check_may_add(caller, user_ids).await?;
                }
                GroupChange::Join { .. } => {
                    // room for one more group; and an owner who blocks the
                    // joiner keeps it out (a code passed on reaches anyone)
                    self.check_may_add(caller, std::slice::from_ref(caller))
                        .await?;
                    self.check_not_blocked(
                        caller,
                        std::slice::from_ref(&record.group.owner_id),
                        "joined",
                    )
                    .await?;
                }
                GroupChange::TransferOwner { new_owner } => {
                    self.check_not_blocked(
                        caller,
                        std::slice::from_ref(new_owner),
                        "handed groups",
                    )
                    .await?;
                }
                _ => {}
            }
            // an invite made or revoked is the owner's alone: no one is
            // told, and the last change's notice (if still owed) stays
            if matches!(
                change,
                GroupChange::Invite { .. } | GroupChange::Revoke { .. }
            ) {
                if !self.0.store.groups.replace_if_rev(&record).await? {
                    continue;
                }
                return Ok(record.group);
            }
            let delta = change_view(caller, &change);
            let audience = seeing(&record.group, audience, delta.seq);
            record.unnotified = Some(Unnotified {
                kind: delta.kind.clone(),
                user_ids: delta.user_ids.clone(),
                by: delta.by.clone(),
                also: audience
                    .iter()
                    .filter(|u| !record.group.is_member(u))
                    .map(ToString::to_string)
                    .collect(),
                message_id: delta.message_id.clone(),
                seq: delta.seq,
            });
            // a member added (again) starts unmuted: what a mute that
            // raced its leaving left goes first, while it is no member, so
            // no mute it sets once added can be taken for that one
            match &change {
                GroupChange::AddMembers { user_ids, .. } => {
                    self.0.store.mutes.forget(id, user_ids).await?;
                }
                GroupChange::Join { .. } => {
                    self.0
                        .store
                        .mutes
                        .forget(id, std::slice::from_ref(caller))
                        .await?;
                }
                _ => {}
            }
            if !self.0.store.groups.replace_if_rev(&record).await? {
                continue;
            }
            record.rev += 1;
            let group = record.group;
            self.0.members_changed(&group.id).await;
            if let Some(leaving) = leaving {
                if let Err(e) = self.0.store.groups.remove_subscriber(id, leaving).await {
                    // harmless: subscriptions are read with membership
                    tracing::warn!(group = %id, user = %leaving, error = %e, "cannot forget a subscription");
                }
                if let Err(e) = self.0.store.messages.forget_member(id, leaving).await {
                    // harmless: receipts are read for members only
                    tracing::warn!(group = %id, user = %leaving, error = %e, "cannot forget a former member's receipts");
                }
                if let Err(e) = self.0.store.mutes.unmute(id, leaving).await {
                    // harmless: pushes go to members only (a member added
                    // again would find the group still muted)
                    tracing::warn!(group = %id, user = %leaving, error = %e, "cannot forget a former member's mute");
                }
                self.0.unsubscribed_live(id, leaving).await;
            }
            let prefix = format!("upd-{}-{}", group.id, record.rev);
            self.publish_to_users(&audience, event::GROUP_UPDATED, &group, delta, &prefix)
                .await?;
            self.notified(id, record.rev).await;
            return Ok(group);
        }
        Err(WorkerError::Store(chat_store::StoreError::Unavailable(
            "too many concurrent changes to this group".into(),
        )))
    }
}

impl GroupsService {
    /// Deletes group `id` for everyone, as its owner `caller`. The group
    /// becomes a tombstone in one compare-and-set (no read finds it from
    /// then on, so every send, read and change is refused), then
    /// [`Self::finish_deletion`] ends live delivery, tells the members and
    /// purges the data. The owner's retry of a deletion that did not finish
    /// (a worker stopped halfway, a service down) finishes it; once done,
    /// the group is `not_found` to the owner too. Returns how many former
    /// members it told.
    async fn delete(&self, caller: &UserId, id: &GroupId) -> Result<usize, WorkerError> {
        for _ in 0..CAS_ATTEMPTS {
            let Some(record) = self.0.store.groups.get(id).await? else {
                return match self.0.store.groups.tombstone(id).await? {
                    // gone for everyone else, and for its owner once done
                    Some(tomb) if !tomb.purged && &tomb.record.group.owner_id == caller => {
                        self.finish_deletion(&tomb).await
                    }
                    _ => Err(WorkerError::NotFound("group")),
                };
            };
            if !record.group.is_member(caller) {
                return Err(
                    DomainError::Forbidden("you are not a member of this group".into()).into(),
                );
            }
            if &record.group.owner_id != caller {
                return Err(
                    DomainError::Forbidden("only the group's owner may delete it".into()).into(),
                );
            }
            let notice = Unnotified {
                kind: "deleted".into(),
                user_ids: Vec::new(),
                by: caller.to_string(),
                also: record.group.member_ids().map(ToString::to_string).collect(),
                ..Unnotified::default()
            };
            let at = now_millis();
            if !self
                .0
                .store
                .groups
                .mark_deleted(&record, &notice, at)
                .await?
            {
                continue;
            }
            let mut group = record.group;
            group.members.clear();
            group.updated_at = at;
            let tomb = Tombstone {
                record: GroupRecord {
                    group,
                    rev: record.rev + 1,
                    subscribers: Vec::new(),
                    created_notified: record.created_notified,
                    unnotified: Some(notice),
                },
                deleted_at: at,
                purged: false,
            };
            return self.finish_deletion(&tomb).await;
        }
        Err(WorkerError::Store(chat_store::StoreError::Unavailable(
            "too many concurrent changes to this group".into(),
        )))
    }

    /// What follows a group's deletion, each step idempotent: every worker
    /// forgets its members; unless its notice went out already, every edge
    /// stops writing it to the former members' connections (an event
    /// each, as for a removal) and they are told (`a_group_updated`, kind
    /// `deleted`, live or on reconnect); then its messages leave the stream
    /// and MongoDB, with all that goes with them, and the tombstone is
    /// marked done. The workers' hourly pass runs this again for each
    /// group deleted in the last day: a send that raced the deletion may
    /// have landed after the first purge. Returns how many it told.
    pub(crate) async fn finish_deletion(&self, tomb: &Tombstone) -> Result<usize, WorkerError> {
        let record = &tomb.record;
        let id = &record.group.id;
        self.0.members_changed(id).await;
        let mut told = 0;
        if let Some(notice) = &record.unnotified {
            let former: Vec<UserId> = notice
                .also
                .iter()
                .filter_map(|u| UserId::parse(u.as_str()).ok())
                .collect();
            futures::StreamExt::for_each_concurrent(futures::stream::iter(&former), 64, |u| {
                self.0.unsubscribed_live(id, u)
            })
            .await;
            let delta = delta_of(notice.clone());
            let prefix = format!("upd-{id}-{}", record.rev);
            self.publish_to_users(&former, event::GROUP_UPDATED, &record.group, delta, &prefix)
                .await?;
            // (must hold: a notice left pending would go out again at
            // every hourly pass, past JetStream's duplicate window)
            self.0.store.groups.mark_notified(id, record.rev).await?;
            told = former.len();
        }
        // the stream first: what the persist loop reads after this is gone
        let from_stream = self.0.bus.purge_group_messages(id).await?;
        let from_store = self.0.store.purge_group(id).await?;
        if self.0.store.groups.mark_purged(id).await? {
            tracing::info!(group = %id, from_stream, from_store, "deleted group purged");
        } else {
            tracing::warn!(group = %id, from_stream, from_store, "deleted group purged, but its notice is still pending: not marked done");
        }
        Ok(told)
    }

    /// Sends the notification of the change that made `record` as it is,
    /// which did not go out when it was made, under the same ids (JetStream
    /// drops what reached it within its duplicate window).
    async fn notify_again(
        &self,
        record: &GroupRecord,
        notice: Unnotified,
    ) -> Result<(), WorkerError> {
        let group = &record.group;
        let mut audience: Vec<UserId> = group.member_ids().cloned().collect();
        audience.extend(
            notice
                .also
                .iter()
                .filter_map(|u| UserId::parse(u.as_str()).ok()),
        );
        let audience = seeing(group, audience, notice.seq);
        let delta = delta_of(notice);
        let prefix = format!("upd-{}-{}", group.id, record.rev);
        self.publish_to_users(&audience, event::GROUP_UPDATED, group, delta, &prefix)
            .await?;
        self.notified(&group.id, record.rev).await;
        Ok(())
    }

    /// The change that made revision `rev` of `group` is told: a later
    /// retry need not tell it again (if this fails, it does, harmlessly).
    async fn notified(&self, group: &GroupId, rev: i64) {
        if let Err(e) = self.0.store.groups.mark_notified(group, rev).await {
            tracing::debug!(group = %group, error = %e, "change not marked notified");
        }
    }
}

/// Attempts at subscribing before a member whose membership events keep
/// landing meanwhile is told to retry.
const FOLLOW_ATTEMPTS: usize = 16;

/// Makes every edge write `group` to `user`'s connections from here on, if
/// `read` finds `user` a member (`read` also says whether the store had
/// the subscription already): its event is published only if no event of
/// `user` in `group` landed between the read and the publish. Otherwise a
/// removal committed just after the read, and published before this
/// subscribe, would be followed by it in the stream: every edge would
/// apply the removal and then the subscribe, and the removed member would
/// go on receiving the group live. Returns the membership of the last read
/// and whether a race was lost on the way.
async fn follow_live<F, Fut>(
    bus: &chat_bus::Bus,
    group: &GroupId,
    user: &UserId,
    mut read: F,
) -> Result<(Membership, bool), WorkerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(Membership, bool), WorkerError>>,
{
    let mut raced = false;
    for _ in 0..FOLLOW_ATTEMPTS {
        let tail = bus.membership_tail(group, user).await?;
        let (membership, already) = read().await?;
        if !matches!(membership, Membership::Member { .. }) {
            return Ok((membership, raced));
        }
        // subscribed already, in the store (a removal deletes that) and in
        // the member's last event (every connection of the user's loads
        // the group or applies that event): a subscribe repeated in a loop
        // adds nothing to the stream. A removal after the tail's read
        // publishes its own event after that one. After a removal and a
        // new addition the subscription is new: published, as the first.
        if already && tail.subscribed == Some(true) {
            return Ok((membership, raced));
        }
        if bus
            .publish_membership_after(group, user, true, tail.seq)
            .await?
            .is_some()
        {
            return Ok((membership, raced));
        }
        raced = true;
    }
    Err(WorkerError::Bus(chat_bus::BusError::Unavailable(
        "membership of this group keeps changing; retry".into(),
    )))
}

/// The longest a mute with an end may last: ten years.
const MUTE_MAX_MS: i64 = 10 * 366 * 24 * 3600 * 1000;

/// The stored end of a mute asked to end at `until_ms` (0: never), at
/// `now`: in the future, and within [`MUTE_MAX_MS`].
fn mute_until(until_ms: i64, now: i64) -> Result<i64, DomainError> {
    match until_ms {
        0 => Ok(chat_store::MUTED_FOREVER),
        u if u <= now => Err(DomainError::Invalid(
            "until must be in the future (leave it out to mute until unmuted)".into(),
        )),
        u if u - now > MUTE_MAX_MS => Err(DomainError::Invalid(
            "until must be within ten years (leave it out to mute until unmuted)".into(),
        )),
        u => Ok(u),
    }
}

/// The delta `a_group_updated` carries for `change` by `caller`.
fn change_view(caller: &UserId, change: &GroupChange) -> GroupChangeView {
    let (kind, users): (&str, Vec<&UserId>) = match change {
        GroupChange::AddMembers { user_ids, .. } => ("members_added", user_ids.iter().collect()),
        GroupChange::RemoveMember { user_id } => ("member_removed", vec![user_id]),
        GroupChange::Leave => ("member_left", vec![caller]),
        GroupChange::TransferOwner { new_owner } => ("owner_changed", vec![new_owner]),
        GroupChange::Describe { .. } => ("details_changed", Vec::new()),
        GroupChange::Pin { .. } => ("message_pinned", Vec::new()),
        GroupChange::Unpin { .. } => ("message_unpinned", Vec::new()),
        GroupChange::Join { .. } => ("member_joined", vec![caller]),
        // (never told: `apply` stores these and returns)
        GroupChange::Invite { .. } | GroupChange::Revoke { .. } => ("", Vec::new()),
    };
    let (message_id, seq) = match change {
        GroupChange::Pin { message_id, seq }
        | GroupChange::Unpin {
            message_id, seq, ..
        } => (Some(message_id.to_string()), Some(*seq)),
        _ => (None, None),
    };
    GroupChangeView {
        kind: kind.into(),
        user_ids: users.into_iter().map(ToString::to_string).collect(),
        by: caller.to_string(),
        message_id,
        seq,
    }
}

/// Unpins deleted message `message` of `group` if it is pinned (one small
/// read if not), in a task of its own: a call cancelled or timed out must
/// not leave a deleted message pinned. `by` deleted it; a failure is
/// logged (a retry of the delete tries again).
pub(crate) async fn unpin_deleted(
    s: &Arc<crate::State>,
    by: &UserId,
    group: &GroupId,
    message: &chat_domain::MessageId,
) {
    let (service, by, group, message) = (
        GroupsService(s.clone()),
        by.clone(),
        group.clone(),
        message.clone(),
    );
    let task = tokio::spawn(async move {
        if !service.0.store.groups.pinned(&group, &message).await? {
            return Ok(());
        }
        let unpin = GroupChange::Unpin {
            message_id: message.clone(),
            seq: 0,
            forced: true,
        };
        service
            .change(by.as_str(), group.as_str(), unpin)
            .await
            .map(drop)
    });
    match task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot unpin a deleted message; its delete's retry will")
        }
        Err(e) => tracing::warn!(error = %e, "the unpin of a deleted message stopped"),
    }
}

/// The delta a stored notice stands for (as [`change_view`] made it).
fn delta_of(notice: Unnotified) -> GroupChangeView {
    GroupChangeView {
        kind: notice.kind,
        user_ids: notice.user_ids,
        by: notice.by,
        message_id: notice.message_id,
        seq: notice.seq,
    }
}

/// Those of `audience` who see the message at `seq` (`None`: everyone):
/// a pin or unpin is told only to the members who see what it is about.
fn seeing(group: &Group, audience: Vec<UserId>, seq: Option<u64>) -> Vec<UserId> {
    let Some(seq) = seq else {
        return audience;
    };
    audience
        .into_iter()
        .filter(|u| group.visible_from(u).is_some_and(|from| seq > from))
        .collect()
}

/// `group`'s pins that `caller` sees, newest pin first.
fn pins_seen_by(group: &Group, caller: &UserId) -> pb::PinsResponse {
    let from = group.visible_from(caller).unwrap_or(u64::MAX);
    pb::PinsResponse {
        group_id: group.id.to_string(),
        pins: group
            .pins
            .iter()
            .rev()
            .filter(|p| p.seq > from)
            .map(|p| pb::PinEntry {
                message_id: p.message_id.to_string(),
                seq: p.seq,
                pinned_by: p.by.to_string(),
                pinned_at_ms: p.at,
            })
            .collect(),
        notified: 0,
    }
}

/// A page position: the last group's update time and id.
fn cursor(g: &Group) -> String {
    format!("{}-{}", g.updated_at, g.id)
}

fn parse_cursor(s: &str) -> Result<Option<(chat_domain::Millis, GroupId)>, WorkerError> {
    if s.is_empty() {
        return Ok(None);
    }
    let bad = || WorkerError::Domain(DomainError::Invalid("bad page cursor".into()));
    let (at, id) = s.split_once('-').ok_or_else(bad)?;
    let at = at.parse().map_err(|_| bad())?;
    let id = GroupId::parse(id).map_err(|_| bad())?;
    Ok(Some((at, id)))
}

impl GroupsService {
    /// Refuses `caller` a change that `what` (as in "does not accept being
    /// added to groups") to `users` if one of them blocks `caller` (one
    /// indexed read, however many they are).
    async fn check_not_blocked(
        &self,
        caller: &UserId,
        users: &[UserId],
        what: &str,
    ) -> Result<(), WorkerError> {
        let others: Vec<UserId> = users.iter().filter(|u| *u != caller).cloned().collect();
        match self.0.store.blocks.one_blocking(caller, &others).await? {
            Some(blocker) => Err(WorkerError::Domain(DomainError::Forbidden(format!(
                "{blocker} does not accept being {what} by you"
            )))),
            None => Ok(()),
        }
    }

    /// Refuses to let `caller` add `users` if one of them blocks `caller`
    /// or is already in as many groups as allowed.
    async fn check_may_add(&self, caller: &UserId, users: &[UserId]) -> Result<(), WorkerError> {
        self.check_not_blocked(caller, users, "added to groups")
            .await?;
        let max = self.0.config.max_groups_per_user;
        let repo = &self.0.store.groups;
        for chunk in users.chunks(16) {
            let counts =
                futures::future::join_all(chunk.iter().map(|u| repo.count_for_member(u))).await;
            for (user, count) in chunk.iter().zip(counts) {
                if count? >= max {
                    return Err(WorkerError::Domain(DomainError::TooLarge(format!(
                        "{user} is in {max} groups already, the most allowed"
                    ))));
                }
            }
        }
        Ok(())
    }
}

fn reply(group: &Group) -> Response<pb::Group> {
    Response::new(pb::Group::from(group))
}

/// `caller`'s unread count (the messages since the later of its read
/// watermark and its addition) and newest visible message in each of `groups`:
/// one read of its watermarks for the page, and one indexed read of the
/// newest message per group (what MongoDB holds, so a message acknowledged
/// a moment ago may count a moment later). No per-message counters.
async fn activity(
    s: &State,
    caller: &UserId,
    groups: &[&Group],
) -> Result<Vec<pb::GroupActivity>, Status> {
    let ids: Vec<GroupId> = groups.iter().map(|g| g.id.clone()).collect();
    // the caller's read marks and mutes of the page: two reads at once
    let (reads, mutes) = tokio::try_join!(
        s.store.messages.read_marks(caller, &ids),
        s.store.mutes.of_user(caller, &ids, now_millis()),
    )
    .map_err(WorkerError::from)?;
    let newest = futures::future::try_join_all(groups.iter().map(|g| async move {
        let from = g.visible_from(caller).unwrap_or_default();
        let last = s.store.messages.history(&g.id, from, None, 1).await?;
        Ok::<_, chat_store::StoreError>((from, last.into_iter().next()))
    }))
    .await
    .map_err(WorkerError::from)?;
    let mut unread = Vec::with_capacity(groups.len());
    let mut last_messages = Vec::with_capacity(groups.len());
    for (g, (from, last)) in groups.iter().zip(newest) {
        // unread starts at the caller's addition, whatever it sees of the
        // history before it (and a member added again starts afresh: its
        // watermarks went with its removal)
        let joined = g.joined_seq(caller).unwrap_or_default();
        let read = reads.get(&g.id).copied().unwrap_or_default().max(joined);
        let newest = last.as_ref().and_then(|m| m.seq).unwrap_or_default();
        unread.push(newest.saturating_sub(read));
        let mut opened = last.as_ref().map(|m| messages::open(s, m)).transpose()?;
        // what a reply answers from before the caller's history: not shown
        if let Some(m) = opened.as_mut()
            && m.reply_to.as_ref().is_some_and(|r| r.seq <= from)
        {
            m.reply_to = None;
        }
        last_messages.push(opened.unwrap_or_default());
    }
    // replies show what they answer as it is now (deleted: no preview),
    // one read for the page
    messages::answered_now(s, &mut last_messages).await?;
    Ok(unread
        .into_iter()
        .zip(last_messages)
        .zip(&ids)
        .map(|((unread, m), id)| {
            let muted = mutes.get(id).copied();
            pb::GroupActivity {
                unread,
                last_message: (!m.message_id.is_empty()).then_some(m),
                muted: muted.is_some(),
                muted_until_ms: muted
                    .filter(|u| *u != chat_store::MUTED_FOREVER)
                    .unwrap_or_default(),
            }
        })
        .collect())
}

#[tonic::async_trait]
impl Groups for GroupsService {
    async fn create_group(
        &self,
        req: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let limits = &self.0.config.limits;
        // refuse huge lists before parsing them
        if req.member_ids.len() > limits.group_members {
            return Err(WorkerError::Domain(DomainError::TooLarge(format!(
                "a group may have at most {} members",
                limits.group_members
            )))
            .into());
        }
        let members = req
            .member_ids
            .iter()
            .map(|m| {
                UserId::parse_new(m.as_str())
                    .map_err(|e| DomainError::Invalid(format!("member {m:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(WorkerError::from)?;
        let history = History::parse(&req.history).map_err(WorkerError::from)?;
        let group = Group::create(
            GroupId::generate(),
            caller,
            &req.name,
            &req.description,
            members,
            limits,
            now_millis(),
        )
        .map_err(WorkerError::from)?
        .with_history(history);
        let everyone: Vec<UserId> = group.member_ids().cloned().collect();
        self.check_may_add(&group.owner_id, &everyone).await?;
        self.0
            .store
            .groups
            .insert(&group)
            .await
            .map_err(WorkerError::from)?;
        tracing::info!(group = %group.id, members = group.members.len(), "group created");
        Ok(reply(&group))
    }

    async fn get_group(
        &self,
        req: Request<pb::GroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        Ok(reply(&self.load_as_member(&caller, &id).await?.group))
    }

    async fn list_groups(
        &self,
        req: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let config = &self.0.config;
        let limit = i64::from(req.limit).clamp(1, config.max_listed_groups);
        let after = parse_cursor(&req.after)?;
        let groups = self
            .0
            .store
            .groups
            .list_for_member(
                &caller,
                limit,
                after.as_ref().map(|(t, g)| (*t, g)),
                config.max_listed_members,
            )
            .await
            .map_err(WorkerError::from)?;
        // a full page has more after it; so does one cut short by size
        let mut next = (groups.len() as i64 == limit)
            .then(|| groups.last().map(cursor))
            .flatten();
        let mut page = Vec::with_capacity(groups.len());
        let mut members = 0;
        for g in &groups {
            members += g.members.len();
            if members > config.max_listed_members && !page.is_empty() {
                next = page.last().map(|p: &&Group| cursor(p));
                break;
            }
            page.push(g);
        }
        let activity = activity(&self.0, &caller, &page).await?;
        Ok(Response::new(pb::ListGroupsResponse {
            groups: page.into_iter().map(pb::Group::from).collect(),
            next: next.unwrap_or_default(),
            activity,
        }))
    }

    async fn transfer_owner(
        &self,
        req: Request<pb::TransferOwnerRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = req.into_inner();
        let new_owner = UserId::parse_new(req.new_owner_id.as_str()).map_err(WorkerError::from)?;
        let group = self
            .change(
                &req.caller,
                &req.group_id,
                GroupChange::TransferOwner { new_owner },
            )
            .await?;
        Ok(reply(&group))
    }

    async fn pin(
        &self,
        req: Request<pb::PinRequest>,
    ) -> Result<Response<pb::PinsResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        let message_id = parse_id::<chat_domain::MessageId>(&req.message_id)?;
        let change = if req.pin {
            // a message the caller sees (persisted: waits while the
            // persist loop is behind), and not deleted
            let m = messages::MessagesService(self.0.clone())
                .committed_in(&caller, &id, &req.message_id)
                .await?;
            if m.is_deleted() {
                return Err(WorkerError::NotFound("message").into());
            }
            GroupChange::Pin {
                message_id: message_id.clone(),
                seq: m.seq.unwrap_or_default(),
            }
        } else {
            GroupChange::Unpin {
                message_id: message_id.clone(),
                seq: 0,
                forced: false,
            }
        };
        let group = self.change(&req.caller, &req.group_id, change).await?;
        if req.pin {
            // a delete that ran meanwhile found nothing to unpin: each side
            // writes before it looks at the other, so one of them sees it
            let deleted = self
                .0
                .store
                .messages
                .get(&message_id)
                .await
                .map_err(WorkerError::from)?;
            if deleted.is_some_and(|m| m.is_deleted()) {
                unpin_deleted(&self.0, &caller, &id, &message_id).await;
            }
        }
        let mut pins = pins_seen_by(&group, &caller);
        pins.notified = u32::try_from(group.members.len()).unwrap_or(u32::MAX);
        Ok(Response::new(pins))
    }

    async fn list_pins(
        &self,
        req: Request<pb::GroupRequest>,
    ) -> Result<Response<pb::PinsResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        let record = self.load_as_member(&caller, &id).await?;
        Ok(Response::new(pins_seen_by(&record.group, &caller)))
    }

    async fn create_invite(
        &self,
        req: Request<pb::CreateInviteRequest>,
    ) -> Result<Response<pb::InviteEntry>, Status> {
        use sha2::Digest;
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let secs = req.expires_in_secs.unwrap_or(DEFAULT_INVITE_SECS);
        let life = Invite::life(secs).map_err(WorkerError::from)?;
        let secret: [u8; 32] = rand::random();
        let now = now_millis();
        let invite = Invite {
            id: hex::encode(rand::random::<[u8; 8]>()),
            secret_hash: sha2::Sha256::digest(secret).into(),
            by: caller,
            created_at: now,
            expires_at: now + life,
            max_uses: req.max_uses,
            uses: 0,
        };
        let change = GroupChange::Invite {
            invite: invite.clone(),
        };
        let group = self.change(&req.caller, &req.group_id, change).await?;
        let code = InviteCode {
            group: group.id.clone(),
            invite: invite.id.clone(),
            secret,
        };
        Ok(Response::new(invite_entry(
            &group.id,
            &invite,
            code.to_string(),
        )))
    }

    async fn list_invites(
        &self,
        req: Request<pb::GroupRequest>,
    ) -> Result<Response<pb::InvitesResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        let group = self.load_as_member(&caller, &id).await?.group;
        group.check_owner(&caller).map_err(WorkerError::from)?;
        let now = now_millis();
        let invites = group
            .invites
            .iter()
            .rev()
            .filter(|i| i.is_valid(now))
            .map(|i| invite_entry(&group.id, i, String::new()))
            .collect();
        Ok(Response::new(pb::InvitesResponse { invites }))
    }

    async fn revoke_invite(
        &self,
        req: Request<pb::RevokeInviteRequest>,
    ) -> Result<Response<pb::RevokeInviteResponse>, Status> {
        let req = req.into_inner();
        let change = GroupChange::Revoke {
            invite_id: req.invite_id,
        };
        self.change(&req.caller, &req.group_id, change).await?;
        Ok(Response::new(pb::RevokeInviteResponse {}))
    }

    async fn join_group(
        &self,
        req: Request<pb::JoinGroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        use sha2::Digest;
        let req = req.into_inner();
        let code: InviteCode = req.code.parse()?;
        let change = GroupChange::Join {
            invite_id: code.invite,
            secret_hash: sha2::Sha256::digest(code.secret).into(),
            at_seq: 0,
        };
        // no group, a deleted one, a wrong secret, an expired or used-up
        // invite: one answer, which tells nothing of which
        match self.change(&req.caller, code.group.as_str(), change).await {
            Ok(group) => Ok(reply(&group)),
            Err(WorkerError::NotFound(_) | WorkerError::Domain(DomainError::Forbidden(_))) => Err(
                Status::not_found("no such invite: it may have expired, been revoked or used up"),
            ),
            Err(e) => Err(e.into()),
        }
    }

    async fn delete_group(
        &self,
        req: Request<pb::GroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        // in a task of its own: a cancelled call must not stop it between
        // the tombstone and the events that end live delivery
        let service = GroupsService(self.0.clone());
        let group_id = id.to_string();
        let notified = tokio::spawn(async move { service.delete(&caller, &id).await })
            .await
            .map_err(|e| {
                WorkerError::Store(chat_store::StoreError::Unavailable(format!(
                    "deletion task: {e}"
                )))
            })??;
        Ok(Response::new(pb::DeleteGroupResponse {
            group_id,
            notified: u32::try_from(notified).unwrap_or(u32::MAX),
        }))
    }

    async fn update_group(
        &self,
        req: Request<pb::UpdateGroupRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = req.into_inner();
        let group = self
            .change(
                &req.caller,
                &req.group_id,
                GroupChange::Describe {
                    name: req.name,
                    description: req.description,
                },
            )
            .await?;
        Ok(reply(&group))
    }

    async fn mute(
        &self,
        req: Request<pb::MuteRequest>,
    ) -> Result<Response<pb::MuteResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        self.0.check_member(&caller, &id).await?;
        let store = &self.0.store;
        if !req.muted {
            store
                .mutes
                .unmute(&id, &caller)
                .await
                .map_err(WorkerError::from)?;
            return Ok(Response::new(pb::MuteResponse {
                group_id: id.into_string(),
                muted: false,
                until_ms: 0,
            }));
        }
        let until = mute_until(req.until_ms, now_millis()).map_err(WorkerError::from)?;
        store
            .mutes
            .mute(&id, &caller, until)
            .await
            .map_err(WorkerError::from)?;
        Ok(Response::new(pb::MuteResponse {
            group_id: id.into_string(),
            muted: true,
            until_ms: req.until_ms,
        }))
    }

    async fn add_members(
        &self,
        req: Request<pb::AddMembersRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = req.into_inner();
        if req.user_ids.len() > self.0.config.limits.group_members {
            return Err(WorkerError::Domain(DomainError::TooLarge(format!(
                "a group may have at most {} members",
                self.0.config.limits.group_members
            )))
            .into());
        }
        let user_ids = req
            .user_ids
            .iter()
            .map(|u| UserId::parse_new(u.as_str()).map_err(WorkerError::from))
            .collect::<Result<Vec<_>, _>>()?;
        // `at_seq` is read by `apply`, right before each attempt's write,
        // and the new members' room is checked there, once the caller is
        // known to be the owner: a soft cap (two adds at once may pass it
        // by one)
        let group = self
            .change(
                &req.caller,
                &req.group_id,
                GroupChange::AddMembers {
                    user_ids,
                    at_seq: 0,
                },
            )
            .await?;
        Ok(reply(&group))
    }

    async fn remove_member(
        &self,
        req: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::Group>, Status> {
        let req = req.into_inner();
        let change = if req.user_id == req.caller {
            GroupChange::Leave
        } else {
            GroupChange::RemoveMember {
                user_id: parse_id::<UserId>(&req.user_id)?,
            }
        };
        let group = self.change(&req.caller, &req.group_id, change).await?;
        Ok(reply(&group))
    }

    async fn notify_group_created(
        &self,
        req: Request<pb::GroupRequest>,
    ) -> Result<Response<pb::NotifyResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        let record = self.load_as_member(&caller, &id).await?;
        let members: Vec<UserId> = record.group.member_ids().cloned().collect();
        if !record.created_notified {
            // publish first, then mark: a crash in between means a retry
            // publishes again, and JetStream drops the duplicates by id
            let prefix = format!("created-{id}");
            let created = GroupChangeView {
                kind: "created".into(),
                user_ids: Vec::new(),
                by: record.group.created_by.to_string(),
                ..GroupChangeView::default()
            };
            self.publish_to_users(
                &members,
                event::GROUP_CREATED,
                &record.group,
                created,
                &prefix,
            )
            .await?;
            self.0
                .store
                .groups
                .mark_created_notified(&id)
                .await
                .map_err(WorkerError::from)?;
        }
        Ok(Response::new(pb::NotifyResponse {
            notified: members.len() as u32,
        }))
    }

    async fn subscribe_to_group(
        &self,
        req: Request<pb::GroupRequest>,
    ) -> Result<Response<pb::SubscribeResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        // one read of the membership and the write each time: no cache in
        // front of it, since a subscription must never outlive a removal
        // it missed
        let store = &self.0.store.groups;
        let (membership, raced) = follow_live(&self.0.bus, &id, &caller, || async {
            Ok(store.add_subscriber(&id, &caller).await?)
        })
        .await?;
        if raced && !matches!(membership, Membership::Member { .. }) {
            // the subscription a read before the removal wrote
            if let Err(e) = store.remove_subscriber(&id, &caller).await {
                tracing::warn!(group = %id, user = %caller, error = %e, "cannot forget a subscription");
            }
        }
        crate::member_or_refused(membership)?;
        Ok(Response::new(pb::SubscribeResponse {
            group_id: id.into_string(),
        }))
    }

    async fn block_user(
        &self,
        req: Request<pb::BlockRequest>,
    ) -> Result<Response<pb::Block>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let user = parse_id::<UserId>(&req.user_id)?;
        if user == caller {
            return Err(WorkerError::Domain(DomainError::Invalid(
                "you cannot block yourself".into(),
            ))
            .into());
        }
        let most = self.0.config.max_blocks_per_user;
        match self
            .0
            .store
            .blocks
            .block(&caller, &user, now_millis(), most)
            .await
            .map_err(WorkerError::from)?
        {
            chat_store::Blocked::Since(since_ms) => {
                tracing::info!(user = %caller, blocked = %user, "user blocked");
                Ok(Response::new(pb::Block {
                    user_id: user.to_string(),
                    since_ms,
                }))
            }
            chat_store::Blocked::Full { most } => Err(WorkerError::Domain(DomainError::TooLarge(
                format!("you block {most} users already, the most allowed: unblock one first"),
            ))
            .into()),
        }
    }

    async fn unblock_user(
        &self,
        req: Request<pb::BlockRequest>,
    ) -> Result<Response<pb::UnblockResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let user = parse_id::<UserId>(&req.user_id)?;
        let was_blocked = self
            .0
            .store
            .blocks
            .unblock(&caller, &user)
            .await
            .map_err(WorkerError::from)?;
        Ok(Response::new(pb::UnblockResponse { was_blocked }))
    }

    async fn list_blocks(
        &self,
        req: Request<pb::ListBlocksRequest>,
    ) -> Result<Response<pb::ListBlocksResponse>, Status> {
        let caller = parse_id::<UserId>(&req.into_inner().caller)?;
        let most = i64::try_from(self.0.config.max_blocks_per_user).unwrap_or(i64::MAX);
        let blocks = self
            .0
            .store
            .blocks
            .list(&caller, most)
            .await
            .map_err(WorkerError::from)?;
        Ok(Response::new(pb::ListBlocksResponse {
            blocks: blocks
                .into_iter()
                .map(|(user, since_ms)| pb::Block {
                    user_id: user.to_string(),
                    since_ms,
                })
                .collect(),
        }))
    }

    async fn visible_from(
        &self,
        req: Request<pb::GroupRequest>,
    ) -> Result<Response<pb::VisibleFromResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let id = parse_id::<GroupId>(&req.group_id)?;
        let seq = self.0.check_member(&caller, &id).await?;
        Ok(Response::new(pb::VisibleFromResponse { seq }))
    }
}

/// How long an invite lasts unless its maker says otherwise: a week.
const DEFAULT_INVITE_SECS: u64 = 7 * 24 * 3600;

/// What an invite's holder presents: `<group>.<invite>.<secret>`, the
/// secret in unpadded base64url. Ids never contain `.`, so the parts split
/// one way only.
struct InviteCode {
    group: GroupId,
    invite: String,
    secret: [u8; 32],
}

impl std::fmt::Display for InviteCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use base64::Engine;
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(self.secret);
        write!(f, "{}.{}.{secret}", self.group, self.invite)
    }
}

impl std::str::FromStr for InviteCode {
    type Err = WorkerError;

    fn from_str(code: &str) -> Result<Self, WorkerError> {
        use base64::Engine;
        let bad = || WorkerError::Domain(DomainError::Invalid("that is not an invite code".into()));
        let mut parts = code.split('.');
        let (Some(group), Some(invite), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let group = GroupId::parse(group).map_err(|_| bad())?;
        let hex_id = invite.len() == 16
            && invite
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_id || secret.len() != 43 {
            return Err(bad());
        }
        let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(secret)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or_else(bad)?;
        Ok(Self {
            group,
            invite: invite.to_owned(),
            secret,
        })
    }
}

/// An invite as the owner sees it; `code` only when it was just made.
fn invite_entry(group: &GroupId, i: &Invite, code: String) -> pb::InviteEntry {
    pb::InviteEntry {
        invite_id: i.id.clone(),
        group_id: group.to_string(),
        code,
        created_by: i.by.to_string(),
        created_at_ms: i.created_at,
        expires_at_ms: i.expires_at,
        max_uses: i.max_uses,
        uses: i.uses,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_invite_code_reads_back_as_made_and_nothing_else_reads() {
        let code = super::InviteCode {
            group: GroupId::parse("g-1_a").expect("id"),
            invite: "0123456789abcdef".into(),
            secret: [7; 32],
        };
        let text = code.to_string();
        let back: super::InviteCode = text.parse().expect("reads");
        assert_eq!(
            (back.group, back.invite, back.secret),
            (code.group, code.invite, code.secret)
        );
        let secret = text.rsplit('.').next().expect("secret").to_owned();
        for bad in [
            String::new(),
            "g.0123456789abcdef".into(),
            format!("g.0123456789abcdef.{secret}.x"),
            format!("g.0123456789ABCDEF.{secret}"),
            format!("g.0123456789abcde.{secret}"),
            format!("g.0123456789abcdef.{}", &secret[1..]),
            format!("g!.0123456789abcdef.{secret}"),
            format!("g.0123456789abcdef.{}=", &secret[..42]),
        ] {
            assert!(bad.parse::<super::InviteCode>().is_err(), "{bad}");
        }
    }

    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use super::*;

    /// A mute ends in the future, within ten years, or never (0).
    #[test]
    fn a_mute_ends_in_the_future_within_ten_years_or_never() {
        let now = 1_000_000;
        assert_eq!(mute_until(0, now), Ok(chat_store::MUTED_FOREVER));
        assert_eq!(mute_until(now + 1, now), Ok(now + 1));
        assert_eq!(mute_until(now + MUTE_MAX_MS, now), Ok(now + MUTE_MAX_MS));
        for bad in [now, now - 1, -5, now + MUTE_MAX_MS + 1, i64::MAX] {
            assert!(
                matches!(mute_until(bad, now), Err(DomainError::Invalid(_))),
                "{bad}"
            );
        }
    }

    /// A subscribe that read the membership just before a removal committed,
    /// and whose publish would land after the removal's event, is not
    /// published: it reads again, finds the user removed, and the removal
    /// stays the member's last event (which every edge applies last).
    #[tokio::test]
    async fn a_subscribe_that_read_membership_before_a_removal_is_not_published_after_it() {
        let nats = chat_stack::Nats::start().await.expect("nats-server");
        let bus = crate::test_bus(&nats).await;
        let group = GroupId::parse("g1").expect("group");
        let user = UserId::parse("mallory").expect("user");
        let member = || Membership::Member { visible_from: 0 };

        // no race: one read, one event
        let reads = AtomicUsize::new(0);
        let (membership, raced) = follow_live(&bus, &group, &user, || async {
            reads.fetch_add(1, Ordering::SeqCst);
            Ok((member(), false))
        })
        .await
        .expect("followed");
        assert!(matches!(membership, Membership::Member { .. }) && !raced);
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        let subscribed = bus.membership_tail(&group, &user).await.expect("tail");
        assert!(subscribed.seq > 0, "published");
        assert_eq!(subscribed.subscribed, Some(true));

        // subscribed already: a subscribe repeated (in a loop, say) adds
        // nothing to the stream
        for _ in 0..3 {
            let (membership, raced) =
                follow_live(&bus, &group, &user, || async { Ok((member(), true)) })
                    .await
                    .expect("followed");
            assert!(matches!(membership, Membership::Member { .. }) && !raced);
        }
        assert_eq!(
            bus.membership_tail(&group, &user).await.expect("tail"),
            subscribed,
            "nothing published again"
        );
        // but a subscription new in the store (the member was removed and
        // added again, its removal's event not landed yet) is published
        let (_, raced) = follow_live(&bus, &group, &user, || async { Ok((member(), false)) })
            .await
            .expect("followed");
        assert!(!raced);
        let again = bus.membership_tail(&group, &user).await.expect("tail");
        assert!(again.seq > subscribed.seq, "published");

        // subscribed already, and the removal is published during the read
        // (which still found the member): nothing goes out after it
        let removal = AtomicU64::new(0);
        follow_live(&bus, &group, &user, || async {
            let seq = bus
                .publish_membership(&group, &user, false)
                .await
                .expect("removal published");
            removal.store(seq, Ordering::SeqCst);
            Ok((member(), true))
        })
        .await
        .expect("answered");
        assert_eq!(
            bus.membership_tail(&group, &user).await.expect("tail"),
            chat_bus::MembershipTail {
                seq: removal.load(Ordering::SeqCst),
                subscribed: Some(false)
            },
            "the removal stays the member's last event"
        );

        // not subscribed (the member was removed), and a second removal
        // commits and is published between the read and the publish of
        // the subscribe
        let reads = AtomicUsize::new(0);
        let removed = AtomicU64::new(0);
        let (membership, raced) = follow_live(&bus, &group, &user, || async {
            if reads.fetch_add(1, Ordering::SeqCst) == 0 {
                let seq = bus
                    .publish_membership(&group, &user, false)
                    .await
                    .expect("removal published");
                removed.store(seq, Ordering::SeqCst);
                Ok((member(), false))
            } else {
                Ok((Membership::NotMember, false))
            }
        })
        .await
        .expect("answered");
        assert!(matches!(membership, Membership::NotMember), "read again");
        assert!(raced);
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        assert_eq!(
            bus.membership_tail(&group, &user).await.expect("tail").seq,
            removed.load(Ordering::SeqCst),
            "the removal is the member's last event"
        );

        // another member's events are no race
        let other = UserId::parse("bob").expect("user");
        let reads = AtomicUsize::new(0);
        let bobs = AtomicU64::new(0);
        let (_, raced) = follow_live(&bus, &group, &user, || async {
            if reads.fetch_add(1, Ordering::SeqCst) == 0 {
                let seq = bus
                    .publish_membership(&group, &other, true)
                    .await
                    .expect("published");
                bobs.store(seq, Ordering::SeqCst);
            }
            Ok((member(), false))
        })
        .await
        .expect("followed");
        assert!(!raced, "bob's subscribe does not hold up mallory's");
        assert!(
            bus.membership_tail(&group, &user).await.expect("tail").seq
                > bobs.load(Ordering::SeqCst),
            "published after bob's"
        );
    }
}
