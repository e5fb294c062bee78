//! `mutes`: the groups a member asked not to be pushed about. One small
//! document per member who muted a group, `{_id: "<group>:<user>", groupId,
//! userId, until}` (`until` in unix milliseconds; [`FOREVER`] for a mute with
//! no end), so muting is one write, the push of a batch reads the mutes of
//! one group at once (index `groupId`, `until`), and a page of
//! `GET /groups` reads the caller's mutes of that page by id. Ended mutes
//! are purged every hour (index `until`).

use std::collections::HashMap;

use chat_domain::{GroupId, Millis, UserId};
use futures::TryStreamExt;
use mongodb::{Collection, Database, IndexModel, bson::doc, options::IndexOptions};
use serde::{Deserialize, Serialize};

use crate::{StoreError, member_key};

/// The `until` of a mute with no end.
pub const FOREVER: Millis = i64::MAX;

#[derive(Debug, Serialize, Deserialize)]
struct MuteDoc {
    #[serde(rename = "_id")]
    id: String,
    #[serde(rename = "groupId")]
    group_id: String,
    #[serde(rename = "userId")]
    user_id: String,
    until: i64,
}

#[derive(Debug, Clone)]
pub struct MuteRepo {
    coll: Collection<MuteDoc>,
}

impl MuteRepo {
    pub(crate) fn new(db: &Database) -> Self {
        Self {
            coll: db.collection("mutes"),
        }
    }

    /// Deletes every mute of `group` (a deleted group's).
    pub async fn purge_group(&self, group: &GroupId) -> Result<(), StoreError> {
        crate::delete_of_group(&self.coll, group).await
    }

    pub(crate) async fn ensure_indexes(&self) -> Result<(), StoreError> {
        // who in a group is muted now, at each push
        let group = IndexModel::builder()
            .keys(doc! { "groupId": 1, "until": 1 })
            .options(
                IndexOptions::builder()
                    .name("group_until".to_owned())
                    .build(),
            )
            .build();
        // the ended ones, for their hourly purge
        let ended = IndexModel::builder()
            .keys(doc! { "until": 1 })
            .options(IndexOptions::builder().name("until".to_owned()).build())
            .build();
        self.coll.create_indexes([group, ended]).await?;
        Ok(())
    }

    /// `user` mutes `group` until `until` ([`FOREVER`]: until it unmutes),
    /// replacing any earlier mute of it.
    pub async fn mute(
        &self,
        group: &GroupId,
        user: &UserId,
        until: Millis,
    ) -> Result<(), StoreError> {
        let id = member_key(group, user);
        let doc = MuteDoc {
            id: id.clone(),
            group_id: group.to_string(),
            user_id: user.to_string(),
            until,
        };
        self.coll
            .replace_one(doc! { "_id": &id }, &doc)
            .upsert(true)
            .await?;
        Ok(())
    }

    /// `user` no longer mutes `group` (also when it leaves or is removed);
    /// whether it did.
    pub async fn unmute(&self, group: &GroupId, user: &UserId) -> Result<bool, StoreError> {
        let res = self
            .coll
            .delete_one(doc! { "_id": member_key(group, user) })
            .await?;
        Ok(res.deleted_count == 1)
    }

    /// Forgets the mutes of `users` in `group` (members added again start
    /// unmuted, whatever a mute that raced their leaving left): one write.
    pub async fn forget(&self, group: &GroupId, users: &[UserId]) -> Result<(), StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = users.iter().map(|u| member_key(group, u)).collect();
        self.coll
            .delete_many(doc! { "_id": { "$in": ids } })
            .await?;
        Ok(())
    }

    /// Deletes the mutes that ended before `now` (reads skip them anyway):
    /// one indexed write; how many went.
    pub async fn purge_ended(&self, now: Millis) -> Result<u64, StoreError> {
        let res = self
            .coll
            .delete_many(doc! { "until": { "$lt": now } })
            .await?;
        Ok(res.deleted_count)
    }

    /// The users whose mute of `group` lasts past `now`: one indexed read.
    pub async fn muted_in(&self, group: &GroupId, now: Millis) -> Result<Vec<String>, StoreError> {
        let docs: Vec<MuteDoc> = self
            .coll
            .find(doc! { "groupId": group.as_str(), "until": { "$gt": now } })
            .await?
            .try_collect()
            .await?;
        Ok(docs.into_iter().map(|d| d.user_id).collect())
    }

    /// Until when `user` mutes each of `groups` that it mutes past `now`:
    /// one read by id.
    pub async fn of_user(
        &self,
        user: &UserId,
        groups: &[GroupId],
        now: Millis,
    ) -> Result<HashMap<GroupId, Millis>, StoreError> {
        if groups.is_empty() {
            return Ok(HashMap::new());
        }
        let ids: Vec<String> = groups.iter().map(|g| member_key(g, user)).collect();
        let docs: Vec<MuteDoc> = self
            .coll
            .find(doc! { "_id": { "$in": ids }, "until": { "$gt": now } })
            .await?
            .try_collect()
            .await?;
        docs.into_iter()
            .map(|d| {
                let group = GroupId::parse(&d.group_id).map_err(|e| StoreError::Corrupt {
                    id: d.id.clone(),
                    message: e.to_string(),
                })?;
                Ok((group, d.until))
            })
            .collect()
    }
}
