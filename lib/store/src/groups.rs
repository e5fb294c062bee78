//! The `groups` collection: one document per group, members embedded; and
//! `subscriptions`: one small document per member who sent
//! `subscribe_to_group`, so that joining a group of 1,000 costs one insert,
//! not a rewrite of a 1,000-entry array in the group's document (as the
//! `subscribers` array of earlier versions did; it is still read).

use chat_domain::{Group, GroupId, History, Invite, Member, MessageId, Millis, Pin, UserId};
use futures::TryStreamExt;
use mongodb::{
    Collection, IndexModel,
    bson::{DateTime, doc},
    options::IndexOptions,
};
use serde::{Deserialize, Serialize};

use crate::{StoreError, to_bson_time};

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MemberDoc {
    user_id: String,
    joined_at: DateTime,
    /// Absent in documents of earlier versions: 0, the whole history.
    #[serde(default)]
    joined_seq: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PinDoc {
    message_id: String,
    seq: i64,
    by: String,
    at: DateTime,
}

/// An invite: the secret's SHA-256 in hex, never the secret.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InviteDoc {
    id: String,
    secret_hash: String,
    by: String,
    created_at: DateTime,
    expires_at: DateTime,
    max_uses: i64,
    uses: i64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupDoc {
    #[serde(rename = "_id")]
    id: String,
    name: String,
    description: String,
    owner_id: String,
    created_by: String,
    members: Vec<MemberDoc>,
    /// `shared` or `joined` (absent in documents of earlier versions:
    /// shared).
    #[serde(default)]
    history: String,
    /// Members who sent `subscribe_to_group` under earlier versions (now
    /// in `subscriptions`); kept, filtered to members, until they leave.
    #[serde(default)]
    subscribers: Vec<String>,
    created_at: DateTime,
    updated_at: DateTime,
    /// Bumped by every change: updates are compare-and-set on it, so two
    /// concurrent changes never overwrite each other.
    rev: i64,
    /// Set once `a_group_created` has been published to every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created_notified_at: Option<DateTime>,
    /// The last change, until its `a_group_updated` has gone out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unnotified: Option<Unnotified>,
    /// Set when the group was deleted: the document stays, with no
    /// members, as the tombstone every read but [`GroupRepo::tombstone`]
    /// takes for no group at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deleted_at: Option<DateTime>,
    /// Set once a deleted group's members were told and its data purged
    /// (its name and description are cleared then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    purged_at: Option<DateTime>,
    /// Its pinned messages, oldest pin first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pins: Vec<PinDoc>,
    /// Its invites, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    invites: Vec<InviteDoc>,
}

/// What stays of a deleted group: its last state (no members; its notice,
/// `unnotified`, names who were members until it went out), and whether
/// its deletion is done.
#[derive(Debug, Clone)]
pub struct Tombstone {
    pub record: GroupRecord,
    pub deleted_at: Millis,
    pub purged: bool,
}

/// A live group: no tombstone.
fn live(id: &GroupId) -> mongodb::bson::Document {
    doc! { "_id": id.as_str(), "deletedAt": { "$exists": false } }
}

/// One member's subscription: `_id` is `<group>:<user>` (ids never contain
/// `:`, so no two pairs share one).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubscriptionDoc {
    #[serde(rename = "_id")]
    id: String,
    group_id: String,
    user_id: String,
    at: DateTime,
}

/// BSON has no unsigned integers; a `seq` never reaches 2^63.
fn seq_to_bson(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn seq_from_bson(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

/// What one user is to one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    NoSuchGroup,
    NotMember,
    /// A member, who sees the messages after `seq` `visible_from` (0: all).
    Member {
        visible_from: u64,
    },
}

/// A group's `_id` and history setting, with only the one member asked for
/// (`$elemMatch` projection): what membership reads need, whatever the
/// group's size.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OneMember {
    #[serde(rename = "_id")]
    id: String,
    #[serde(default)]
    history: String,
    #[serde(default)]
    members: Vec<MemberDoc>,
}

impl OneMember {
    fn projection(user: &UserId) -> mongodb::bson::Document {
        doc! { "_id": 1, "history": 1, "members": { "$elemMatch": { "userId": user.as_str() } } }
    }

    /// `None` if the user is not a member.
    fn visible_from(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.views()?.next().map(|(_, from)| from))
    }

    /// Each member read, with the `seq` its view starts after.
    fn views(&self) -> Result<impl Iterator<Item = (&str, u64)>, StoreError> {
        let history = History::parse(&self.history).map_err(|e| corrupt(&self.id, e))?;
        Ok(self.members.iter().map(move |m| {
            let from = match history {
                History::Shared => 0,
                History::Joined => seq_from_bson(m.joined_seq),
            };
            (m.user_id.as_str(), from)
        }))
    }
}

/// A group with the storage state that goes with it.
#[derive(Debug, Clone)]
pub struct GroupRecord {
    pub group: Group,
    pub rev: i64,
    pub subscribers: Vec<UserId>,
    pub created_notified: bool,
    /// The last change, written with it, until its `a_group_updated` has
    /// gone out to everyone ([`GroupRepo::mark_notified`]): a retry of the
    /// change, which now changes nothing, sends it then.
    pub unnotified: Option<Unnotified>,
}

/// A change whose notification may not have reached everyone (stored as
/// it is: plain strings, like the notification it stands for).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Unnotified {
    /// As `a_group_updated`'s `change`: its kind, who, and by whom.
    pub kind: String,
    pub user_ids: Vec<String>,
    pub by: String,
    /// Who hears of it besides the members (one who left or was removed).
    #[serde(default)]
    pub also: Vec<String>,
    /// The message pinned or unpinned, and its `seq` (only the members
    /// who see it hear of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

fn corrupt(id: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        id: id.to_owned(),
        message: e.to_string(),
    }
}

impl GroupDoc {
    fn from_group(g: &Group, rev: i64, subscribers: &[UserId]) -> Self {
        Self {
            id: g.id.to_string(),
            name: g.name.clone(),
            description: g.description.clone(),
            owner_id: g.owner_id.to_string(),
            created_by: g.created_by.to_string(),
            members: g
                .members
                .iter()
                .map(|m| MemberDoc {
                    user_id: m.user_id.to_string(),
                    joined_at: to_bson_time(m.joined_at),
                    joined_seq: seq_to_bson(m.joined_seq),
                })
                .collect(),
            history: g.history.as_str().to_owned(),
            subscribers: subscribers.iter().map(ToString::to_string).collect(),
            created_at: to_bson_time(g.created_at),
            updated_at: to_bson_time(g.updated_at),
            rev,
            created_notified_at: None,
            unnotified: None,
            deleted_at: None,
            purged_at: None,
            pins: g
                .pins
                .iter()
                .map(|p| PinDoc {
                    message_id: p.message_id.to_string(),
                    seq: seq_to_bson(p.seq),
                    by: p.by.to_string(),
                    at: to_bson_time(p.at),
                })
                .collect(),
            invites: g
                .invites
                .iter()
                .map(|i| InviteDoc {
                    id: i.id.clone(),
                    secret_hash: hex::encode(i.secret_hash),
                    by: i.by.to_string(),
                    created_at: to_bson_time(i.created_at),
                    expires_at: to_bson_time(i.expires_at),
                    max_uses: i64::from(i.max_uses),
                    uses: i64::from(i.uses),
                })
                .collect(),
        }
    }

    fn into_record(self) -> Result<GroupRecord, StoreError> {
        let id = self.id.clone();
        let user = |s: String| UserId::parse(s).map_err(|e| corrupt(&id, e));
        let group = Group {
            id: GroupId::parse(self.id.clone()).map_err(|e| corrupt(&id, e))?,
            name: self.name,
            description: self.description,
            owner_id: user(self.owner_id)?,
            created_by: user(self.created_by)?,
            members: self
                .members
                .into_iter()
                .map(|m| {
                    Ok(Member {
                        user_id: user(m.user_id)?,
                        joined_at: m.joined_at.timestamp_millis(),
                        joined_seq: seq_from_bson(m.joined_seq),
                    })
                })
                .collect::<Result<_, StoreError>>()?,
            history: History::parse(&self.history).map_err(|e| corrupt(&id, e))?,
            created_at: self.created_at.timestamp_millis(),
            updated_at: self.updated_at.timestamp_millis(),
            pins: self
                .pins
                .into_iter()
                .map(|p| {
                    Ok(Pin {
                        message_id: MessageId::parse(p.message_id.as_str())
                            .map_err(|e| corrupt(&id, e))?,
                        seq: seq_from_bson(p.seq),
                        by: user(p.by)?,
                        at: p.at.timestamp_millis(),
                    })
                })
                .collect::<Result<_, StoreError>>()?,
            invites: self
                .invites
                .into_iter()
                .map(|i| {
                    let mut secret_hash = [0u8; 32];
                    hex::decode_to_slice(&i.secret_hash, &mut secret_hash)
                        .map_err(|e| corrupt(&id, e))?;
                    let count = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
                    Ok(Invite {
                        id: i.id,
                        secret_hash,
                        by: user(i.by)?,
                        created_at: i.created_at.timestamp_millis(),
                        expires_at: i.expires_at.timestamp_millis(),
                        max_uses: count(i.max_uses),
                        uses: count(i.uses),
                    })
                })
                .collect::<Result<_, StoreError>>()?,
        };
        Ok(GroupRecord {
            group,
            rev: self.rev,
            subscribers: self
                .subscribers
                .into_iter()
                .map(user)
                .collect::<Result<_, _>>()?,
            created_notified: self.created_notified_at.is_some(),
            unnotified: self.unnotified,
        })
    }
}

/// Groups in MongoDB.
#[derive(Debug, Clone)]
pub struct GroupRepo {
    coll: Collection<GroupDoc>,
    subscriptions: Collection<SubscriptionDoc>,
}

impl GroupRepo {
    pub(crate) fn new(db: &mongodb::Database) -> Self {
        Self {
            coll: db.collection("groups"),
            subscriptions: db.collection("subscriptions"),
        }
    }

    pub(crate) async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let by_member = IndexModel::builder()
            .keys(doc! { "members.userId": 1, "updatedAt": -1 })
            .options(IndexOptions::builder().name("by_member".to_owned()).build())
            .build();
        let by_subscriber = IndexModel::builder()
            .keys(doc! { "subscribers": 1 })
            .options(
                IndexOptions::builder()
                    .name("by_subscriber".to_owned())
                    .build(),
            )
            .build();
        // the deleted groups, for their purge's second pass: only
        // tombstones have the field
        let deleted = IndexModel::builder()
            .keys(doc! { "deletedAt": 1 })
            .options(
                IndexOptions::builder()
                    .name("deleted".to_owned())
                    .sparse(true)
                    .build(),
            )
            .build();
        self.coll
            .create_indexes([by_member, by_subscriber, deleted])
            .await?;
        let by_user = IndexModel::builder()
            .keys(doc! { "userId": 1 })
            .options(IndexOptions::builder().name("by_user".to_owned()).build())
            .build();
        self.subscriptions.create_indexes([by_user]).await?;
        Ok(())
    }

    /// Stores a new group.
    pub async fn insert(&self, group: &Group) -> Result<(), StoreError> {
        self.coll
            .insert_one(GroupDoc::from_group(group, 1, &[]))
            .await?;
        Ok(())
    }

    /// The group `id`, if it exists (and was not deleted).
    pub async fn get(&self, id: &GroupId) -> Result<Option<GroupRecord>, StoreError> {
        self.coll
            .find_one(live(id))
            .await?
            .map(GroupDoc::into_record)
            .transpose()
    }

    /// Group `id`'s owner and history setting, without its member list
    /// (an edit or delete in a group of 1,000 needs no more).
    pub async fn settings(&self, id: &GroupId) -> Result<Option<(UserId, History)>, StoreError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Settings {
            #[serde(rename = "_id")]
            id: String,
            owner_id: String,
            #[serde(default)]
            history: String,
        }
        let found = self
            .coll
            .clone_with_type::<Settings>()
            .find_one(live(id))
            .projection(doc! { "_id": 1, "ownerId": 1, "history": 1 })
            .await?;
        found
            .map(|g| {
                let owner = UserId::parse(g.owner_id.as_str()).map_err(|e| corrupt(&g.id, e))?;
                let history = History::parse(&g.history).map_err(|e| corrupt(&g.id, e))?;
                Ok((owner, history))
            })
            .transpose()
    }

    /// What `user` is to group `id`, without loading the group: one read
    /// that carries only that member, so a send to a group of 1,000 members
    /// does not move its whole document for one membership check.
    pub async fn membership(&self, id: &GroupId, user: &UserId) -> Result<Membership, StoreError> {
        let found = self
            .coll
            .clone_with_type::<OneMember>()
            .find_one(live(id))
            .projection(OneMember::projection(user))
            .await?;
        Ok(match found {
            None => Membership::NoSuchGroup,
            Some(g) => match g.visible_from()? {
                None => Membership::NotMember,
                Some(visible_from) => Membership::Member { visible_from },
            },
        })
    }

    /// Those of `users` who are members of group `id`, each with the `seq`
    /// its view of the history starts after: one read of the group's
    /// members, for a check of several users at once (a message's
    /// mentions). `None` if there is no such group.
    pub async fn members_among(
        &self,
        id: &GroupId,
        users: &[UserId],
    ) -> Result<Option<Vec<(UserId, u64)>>, StoreError> {
        let found = self
            .coll
            .clone_with_type::<OneMember>()
            .find_one(live(id))
            .projection(doc! { "_id": 1, "history": 1, "members": 1 })
            .await?;
        let Some(group) = found else {
            return Ok(None);
        };
        Ok(Some(
            group
                .views()?
                .filter_map(|(member, from)| {
                    let user = users.iter().find(|u| u.as_str() == member)?;
                    Some((user.clone(), from))
                })
                .collect(),
        ))
    }

    /// The groups `user` is a member of, most recently updated first (ties
    /// by id), starting after `after` (a group's `(updatedAt, id)`): at
    /// most `limit`, and none after the one that takes their members past
    /// `max_members` (which tells the caller there is more; when that is
    /// the first, one more), so a page of large groups reads a few of them,
    /// not `limit`.
    pub async fn list_for_member(
        &self,
        user: &UserId,
        limit: i64,
        after: Option<(Millis, &GroupId)>,
        max_members: usize,
    ) -> Result<Vec<Group>, StoreError> {
        /// Groups read from MongoDB at a time.
        const BATCH: u32 = 8;
        let mut filter = doc! { "members.userId": user.as_str() };
        if let Some((at, id)) = after {
            let at = to_bson_time(at);
            filter.insert(
                "$or",
                vec![
                    doc! { "updatedAt": { "$lt": at } },
                    doc! { "updatedAt": at, "_id": { "$lt": id.as_str() } },
                ],
            );
        }
        let mut cursor = self
            .coll
            .find(filter)
            .sort(doc! { "updatedAt": -1, "_id": -1 })
            .limit(limit)
            .batch_size(BATCH)
            .await?;
        let mut groups = Vec::new();
        let mut members = 0;
        while let Some(d) = cursor.try_next().await? {
            let group = d.into_record()?.group;
            members += group.members.len();
            groups.push(group);
            // the one past the cap ends the read, unless it is the first
            // (listed alone): then one more tells there is more
            if members > max_members && groups.len() > 1 {
                break;
            }
        }
        Ok(groups)
    }

    /// How many groups `user` is a member of.
    pub async fn count_for_member(&self, user: &UserId) -> Result<u64, StoreError> {
        Ok(self
            .coll
            .count_documents(doc! { "members.userId": user.as_str() })
            .await?)
    }

    /// Replaces the group if it is still at `rev`; returns whether it was.
    /// Subscribers who are no longer members are dropped.
    pub async fn replace_if_rev(&self, record: &GroupRecord) -> Result<bool, StoreError> {
        let subscribers: Vec<UserId> = record
            .subscribers
            .iter()
            .filter(|s| record.group.is_member(s))
            .cloned()
            .collect();
        let mut doc = GroupDoc::from_group(&record.group, record.rev + 1, &subscribers);
        if record.created_notified {
            doc.created_notified_at = Some(DateTime::now());
        }
        doc.unnotified.clone_from(&record.unnotified);
        let res = self
            .coll
            .replace_one(
                doc! { "_id": record.group.id.as_str(), "rev": record.rev },
                doc,
            )
            .await?;
        Ok(res.matched_count == 1)
    }

    /// Records that `user` subscribed to `group`, if `user` is a member:
    /// a membership read and one small upsert, whatever the group's size.
    /// Returns the membership it read, and whether the subscription was
    /// there already. A removal racing it may leave a subscription of a
    /// former member behind; every read of subscriptions checks membership,
    /// and the removal deletes it.
    pub async fn add_subscriber(
        &self,
        group: &GroupId,
        user: &UserId,
    ) -> Result<(Membership, bool), StoreError> {
        let membership = self.membership(group, user).await?;
        if !matches!(membership, Membership::Member { .. }) {
            return Ok((membership, false));
        }
        let res = self
            .subscriptions
            .update_one(
                doc! { "_id": crate::member_key(group, user) },
                doc! { "$setOnInsert": {
                    "groupId": group.as_str(), "userId": user.as_str(), "at": DateTime::now(),
                } },
            )
            .upsert(true)
            .await?;
        Ok((membership, res.upserted_id.is_none()))
    }

    /// Forgets `user`'s subscription to `group` (after a leave or removal).
    pub async fn remove_subscriber(
        &self,
        group: &GroupId,
        user: &UserId,
    ) -> Result<(), StoreError> {
        self.subscriptions
            .delete_one(doc! { "_id": crate::member_key(group, user) })
            .await?;
        Ok(())
    }

    /// The groups `user` subscribed to (and is still a member of).
    pub async fn subscribed_groups(&self, user: &UserId) -> Result<Vec<GroupId>, StoreError> {
        // finds on indexes, not `distinct`, which the SecantusDB stand-in
        // answers with a collection scan
        #[derive(serde::Deserialize)]
        struct Id {
            #[serde(rename = "_id")]
            id: String,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Sub {
            group_id: String,
        }
        let subscribed: Vec<String> = self
            .subscriptions
            .clone_with_type::<Sub>()
            .find(doc! { "userId": user.as_str() })
            .projection(doc! { "_id": 0, "groupId": 1 })
            .await?
            .try_collect::<Vec<Sub>>()
            .await?
            .into_iter()
            .map(|s| s.group_id)
            .collect();
        let ids = self.coll.clone_with_type::<Id>();
        let member = user.as_str();
        let mut found: Vec<Id> = if subscribed.is_empty() {
            Vec::new()
        } else {
            ids.find(doc! { "_id": { "$in": &subscribed }, "members.userId": member })
                .projection(doc! { "_id": 1 })
                .await?
                .try_collect()
                .await?
        };
        // subscriptions recorded by earlier versions
        let legacy: Vec<Id> = ids
            .find(doc! { "subscribers": member, "members.userId": member })
            .projection(doc! { "_id": 1 })
            .await?
            .try_collect()
            .await?;
        found.extend(legacy);
        let mut groups = found
            .into_iter()
            .map(|d| GroupId::parse(d.id.clone()).map_err(|e| corrupt(&d.id, e)))
            .collect::<Result<Vec<_>, _>>()?;
        groups.sort_unstable();
        groups.dedup();
        Ok(groups)
    }

    /// Deletes the group of `record` if it is still at its `rev`: it keeps
    /// no members (so no read finds it, and no member's list names it),
    /// only what [`Self::tombstone`] reads, with `notice` to send (whose
    /// `also` names the members). Returns whether it was still at that
    /// revision.
    pub async fn mark_deleted(
        &self,
        record: &GroupRecord,
        notice: &Unnotified,
        at: Millis,
    ) -> Result<bool, StoreError> {
        let notice = mongodb::bson::to_bson(notice)
            .map_err(|e| StoreError::Unavailable(format!("encoding a notice: {e}")))?;
        let res = self
            .coll
            .update_one(
                doc! { "_id": record.group.id.as_str(), "rev": record.rev },
                doc! { "$set": {
                    "members": [], "subscribers": [], "pins": [], "invites": [],
                    "deletedAt": to_bson_time(at), "updatedAt": to_bson_time(at),
                    "rev": record.rev + 1, "unnotified": notice,
                } },
            )
            .await?;
        Ok(res.matched_count == 1)
    }

    /// Marks deleted group `id` as done, once its notice went out: its
    /// name and description go (its members know them; nothing else
    /// needs them). Whether it was marked.
    pub async fn mark_purged(&self, id: &GroupId) -> Result<bool, StoreError> {
        let res = self
            .coll
            .update_one(
                doc! {
                    "_id": id.as_str(), "deletedAt": { "$exists": true },
                    "unnotified": { "$exists": false },
                },
                doc! { "$set": { "purgedAt": DateTime::now(), "name": "", "description": "" } },
            )
            .await?;
        Ok(res.matched_count == 1)
    }

    /// Whether message `message` is pinned in group `id` (a read of that
    /// alone, whatever the group's size).
    pub async fn pinned(&self, id: &GroupId, message: &MessageId) -> Result<bool, StoreError> {
        let mut filter = live(id);
        filter.insert("pins.messageId", message.as_str());
        Ok(self
            .coll
            .clone_with_type::<mongodb::bson::Document>()
            .find_one(filter)
            .projection(doc! { "_id": 1 })
            .await?
            .is_some())
    }

    /// The group `id` if it was deleted.
    pub async fn tombstone(&self, id: &GroupId) -> Result<Option<Tombstone>, StoreError> {
        let Some(d) = self
            .coll
            .find_one(doc! { "_id": id.as_str(), "deletedAt": { "$exists": true } })
            .await?
        else {
            return Ok(None);
        };
        let deleted_at = d.deleted_at.map_or(0, |t| t.timestamp_millis());
        let purged = d.purged_at.is_some();
        Ok(Some(Tombstone {
            record: d.into_record()?,
            deleted_at,
            purged,
        }))
    }

    /// The groups deleted at or after `since` (ms), newest first, at most
    /// `limit`.
    pub async fn deleted_since(
        &self,
        since: Millis,
        limit: i64,
    ) -> Result<Vec<GroupId>, StoreError> {
        #[derive(Deserialize)]
        struct Id {
            #[serde(rename = "_id")]
            id: String,
        }
        let found: Vec<Id> = self
            .coll
            .clone_with_type::<Id>()
            .find(doc! { "deletedAt": { "$gte": to_bson_time(since) } })
            .sort(doc! { "deletedAt": -1 })
            .projection(doc! { "_id": 1 })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        found
            .into_iter()
            .map(|d| GroupId::parse(d.id.clone()).map_err(|e| corrupt(&d.id, e)))
            .collect()
    }

    /// Forgets every subscription to `group` (a deleted group's).
    pub async fn forget_subscriptions(&self, group: &GroupId) -> Result<(), StoreError> {
        self.subscriptions
            .delete_many(crate::member_keys_of(group))
            .await?;
        Ok(())
    }

    /// Marks the notification of the change that made revision `rev` as
    /// sent (nothing if another change came since: it carries its own).
    pub async fn mark_notified(&self, group: &GroupId, rev: i64) -> Result<(), StoreError> {
        self.coll
            .update_one(
                doc! { "_id": group.as_str(), "rev": rev },
                doc! { "$unset": { "unnotified": "" } },
            )
            .await?;
        Ok(())
    }

    /// Marks the creation notification as sent; returns whether this call
    /// was the one that marked it.
    pub async fn mark_created_notified(&self, group: &GroupId) -> Result<bool, StoreError> {
        let res = self
            .coll
            .update_one(
                doc! { "_id": group.as_str(), "createdNotifiedAt": { "$exists": false } },
                doc! { "$set": { "createdNotifiedAt": DateTime::now() } },
            )
            .await?;
        Ok(res.modified_count == 1)
    }
}
