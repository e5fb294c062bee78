//! The `uploads` collection: every upload URL issued, so that a media message
//! can be checked against what was declared, and unreferenced objects can be
//! cleaned up.
//!
//! Claims are atomic conditional updates, so sends and the cleaner (on any
//! number of workers) never disagree: a send claims `referenced` only if the
//! cleaner has not claimed `deleting`, and the other way round.

use chat_domain::{GroupId, Millis};
use futures::TryStreamExt;
use mongodb::{
    Collection, IndexModel,
    bson::{Bson, DateTime, Document, doc},
    options::IndexOptions,
};
use serde::{Deserialize, Serialize};

use crate::{StoreError, to_bson_time};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UploadDoc {
    #[serde(rename = "_id")]
    key: String,
    group_id: String,
    uploader_id: String,
    #[serde(rename = "type")]
    kind: String,
    mime: String,
    size: i64,
    created_at: DateTime,
    #[serde(default)]
    referenced: bool,
    #[serde(default)]
    deleting: bool,
    /// Where a message's copy of the object lives (set when a message
    /// claims the upload); absent for uploads claimed by the first release,
    /// whose messages name the upload's own key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_key: Option<String>,
    /// The group's newest `seq` when a message claimed the upload: the
    /// message's is above it (absent before claims, and in claims of earlier
    /// versions: 0).
    #[serde(default)]
    after_seq: i64,
    /// The object at the upload's own key is gone for good (its URL had
    /// expired when it was deleted).
    #[serde(default)]
    purged: bool,
    /// The object at the upload's own key was deleted once, after its URL
    /// expired; it is deleted again once no PUT can be under way (S3 checks
    /// a URL's expiry when a PUT starts, so a slow one may land later).
    #[serde(default)]
    purged_once: bool,
    /// Given back by its uploader: no message may use it. It is otherwise
    /// an unused upload: it counts against its uploader's open uploads and
    /// goes with the cleaner (its URL cannot be revoked, and a PUT that
    /// started before the URL expired may still land).
    #[serde(default)]
    released: bool,
    /// The message that used it was deleted: its media is served to no
    /// one, whether or not its object could be deleted.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    media_deleted: bool,
    /// Being deleted, its objects were deleted once already (a deleted
    /// group's upload, whose URL may still be good: they are deleted again
    /// once no PUT can be under way, and only then is the record removed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    swept: bool,
}

/// An issued upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub key: String,
    pub group_id: String,
    pub uploader_id: String,
    pub kind: String,
    pub mime: String,
    pub size: u64,
    pub created_at: Millis,
    /// Where a message's copy of its object lives, once a message used it.
    pub media_key: Option<String>,
}

impl From<UploadDoc> for Upload {
    fn from(d: UploadDoc) -> Self {
        Self {
            key: d.key,
            group_id: d.group_id,
            uploader_id: d.uploader_id,
            kind: d.kind,
            mime: d.mime,
            size: d.size.max(0) as u64,
            created_at: d.created_at.timestamp_millis(),
            media_key: d.media_key,
        }
    }
}

/// Uploads in MongoDB.
#[derive(Debug, Clone)]
pub struct UploadRepo {
    coll: Collection<UploadDoc>,
}

impl UploadRepo {
    pub(crate) fn new(db: &mongodb::Database) -> Self {
        Self {
            coll: db.collection("uploads"),
        }
    }

    pub(crate) async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let stale = IndexModel::builder()
            .keys(doc! { "referenced": 1, "createdAt": 1 })
            .options(
                IndexOptions::builder()
                    .name("unreferenced".to_owned())
                    .build(),
            )
            .build();
        let media = IndexModel::builder()
            .keys(doc! { "mediaKey": 1 })
            .options(IndexOptions::builder().name("media_key".to_owned()).build())
            .build();
        let uploader = IndexModel::builder()
            .keys(doc! { "uploaderId": 1, "referenced": 1 })
            .options(IndexOptions::builder().name("uploader".to_owned()).build())
            .build();
        // the cleaner's reads, every minute on every worker: bounded by what
        // is left to do (uploads used in the last day or so, and deletions
        // under way), not by every upload ever used
        let unpurged = IndexModel::builder()
            .keys(doc! { "referenced": 1, "purged": 1, "createdAt": 1 })
            .options(IndexOptions::builder().name("unpurged".to_owned()).build())
            .build();
        let deleting = IndexModel::builder()
            .keys(doc! { "deleting": 1 })
            .options(IndexOptions::builder().name("deleting".to_owned()).build())
            .build();
        // a deleted group's, for its purge
        self.coll
            .create_indexes([
                stale,
                media,
                uploader,
                unpurged,
                deleting,
                crate::by_group_index(),
            ])
            .await?;
        Ok(())
    }

    /// How many uploads `uploader` holds that no message uses and the
    /// cleaner has not taken, and their declared bytes, counting at most
    /// `limit` of them (one indexed read).
    pub async fn open_of(&self, uploader: &str, limit: i64) -> Result<(u64, u64), StoreError> {
        #[derive(Deserialize)]
        struct Size {
            size: i64,
        }
        let sizes: Vec<Size> = self
            .coll
            .clone_with_type::<Size>()
            .find(doc! { "uploaderId": uploader, "referenced": false, "deleting": false })
            .projection(doc! { "_id": 0, "size": 1 })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        let bytes = sizes.iter().map(|s| s.size.max(0) as u64).sum();
        Ok((sizes.len() as u64, bytes))
    }

    /// Records an issued upload.
    pub async fn insert(&self, u: &Upload) -> Result<(), StoreError> {
        self.coll
            .insert_one(UploadDoc {
                key: u.key.clone(),
                group_id: u.group_id.clone(),
                uploader_id: u.uploader_id.clone(),
                kind: u.kind.clone(),
                mime: u.mime.clone(),
                size: u.size as i64,
                created_at: to_bson_time(u.created_at),
                referenced: false,
                deleting: false,
                media_key: None,
                after_seq: 0,
                purged: false,
                purged_once: false,
                released: false,
                media_deleted: false,
                swept: false,
            })
            .await?;
        Ok(())
    }

    /// The upload `key` of `group`, unless the cleaner is deleting it.
    pub async fn get(&self, group: &GroupId, key: &str) -> Result<Option<Upload>, StoreError> {
        Ok(self
            .coll
            .find_one(doc! { "_id": key, "groupId": group.as_str(), "deleting": false })
            .await?
            .map(Upload::from))
    }

    /// Marks the upload as referenced by a message whose copy of the object
    /// is `media_key`, unless the cleaner got there first or another message
    /// claimed it; returns whether this call claimed it.
    pub async fn claim(
        &self,
        key: &str,
        media_key: &str,
        after_seq: u64,
    ) -> Result<bool, StoreError> {
        let after_seq = i64::try_from(after_seq).unwrap_or(i64::MAX);
        let res = self
            .coll
            .update_one(
                doc! {
                    "_id": key, "deleting": false, "referenced": false,
                    "released": { "$ne": true },
                },
                doc! { "$set": {
                    "referenced": true, "mediaKey": media_key, "afterSeq": after_seq,
                } },
            )
            .await?;
        Ok(res.matched_count == 1)
    }

    /// Gives back `uploader`'s upload `key` of `group` that no message
    /// uses; false if there is no such upload (someone else's, used, being
    /// deleted, or given back already).
    pub async fn release(
        &self,
        group: &GroupId,
        key: &str,
        uploader: &str,
    ) -> Result<bool, StoreError> {
        let res = self
            .coll
            .update_one(
                doc! {
                    "_id": key, "groupId": group.as_str(), "uploaderId": uploader,
                    "referenced": false, "deleting": false, "released": { "$ne": true },
                },
                doc! { "$set": { "released": true } },
            )
            .await?;
        Ok(res.modified_count == 1)
    }

    /// Gives back a claim whose copy failed.
    pub async fn unclaim(&self, key: &str) -> Result<(), StoreError> {
        self.coll
            .update_one(
                doc! { "_id": key },
                doc! { "$set": { "referenced": false }, "$unset": { "mediaKey": "" } },
            )
            .await?;
        Ok(())
    }

    /// If `key` names media a message of `group` uses (a message's copy, or
    /// (first release) an upload a message claimed): a `seq` the message's
    /// is above (0 for claims of earlier versions).
    /// Not once that message was deleted ([`Self::media_deleted`]).
    pub async fn media_after(&self, group: &GroupId, key: &str) -> Result<Option<u64>, StoreError> {
        let found = self.coll.find_one(used_as_media(group, key)).await?;
        Ok(found
            .filter(|d| !d.media_deleted)
            .map(|d| u64::try_from(d.after_seq).unwrap_or(0)))
    }

    /// Records that the message of `group` whose media is `key` was
    /// deleted: [`Self::media_after`] finds it no more, even if its object
    /// outlives the delete (an object store that refused it).
    pub async fn media_deleted(&self, group: &GroupId, key: &str) -> Result<(), StoreError> {
        self.coll
            .update_many(
                used_as_media(group, key),
                doc! { "$set": { "mediaDeleted": true } },
            )
            .await?;
        Ok(())
    }

    /// Claimed uploads whose own object may still be there: those issued
    /// before `expired` (their URLs have expired) not purged yet, and those
    /// issued before `settled` (no PUT can be under way) purged once. Each
    /// with whether its purge is the last.
    pub async fn expired_claimed(
        &self,
        expired: Millis,
        settled: Millis,
        limit: i64,
    ) -> Result<Vec<(Upload, bool)>, StoreError> {
        let docs: Vec<UploadDoc> = self
            .coll
            .find(doc! {
                // an equality (false, or absent in documents of releases
                // before the field), so that the `unpurged` index bounds
                // the read; `$ne: true` would read every purged one too
                "referenced": true, "purged": { "$in": [false, Bson::Null] },
                "mediaKey": { "$exists": true },
                "$or": [
                    { "purgedOnce": { "$ne": true }, "createdAt": { "$lt": to_bson_time(expired) } },
                    { "purgedOnce": true, "createdAt": { "$lt": to_bson_time(settled) } },
                ],
            })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .map(|d| {
                let last = d.purged_once;
                (Upload::from(d), last)
            })
            .collect())
    }

    /// Records that the upload's own object was deleted: once (`last`
    /// false), or for good.
    pub async fn mark_purged(&self, key: &str, last: bool) -> Result<(), StoreError> {
        let field = if last { "purged" } else { "purgedOnce" };
        self.coll
            .update_one(doc! { "_id": key }, doc! { "$set": { field: true } })
            .await?;
        Ok(())
    }

    /// Claims up to `limit` unreferenced uploads issued before `before` for
    /// deletion.
    pub async fn claim_stale(&self, before: Millis, limit: i64) -> Result<Vec<Upload>, StoreError> {
        let candidates: Vec<UploadDoc> = self
            .coll
            .find(doc! { "referenced": false, "deleting": false, "createdAt": { "$lt": to_bson_time(before) } })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        let mut claimed = Vec::new();
        for c in candidates {
            let res = self
                .coll
                .update_one(
                    doc! { "_id": &c.key, "referenced": false, "deleting": false },
                    doc! { "$set": { "deleting": true } },
                )
                .await?;
            if res.modified_count == 1 {
                claimed.push(Upload::from(c));
            }
        }
        Ok(claimed)
    }

    /// Hands every upload of `group` (a deleted group's) to the cleaner,
    /// which deletes its objects (a message's copy too) and then the
    /// upload.
    pub async fn purge_group(&self, group: &GroupId) -> Result<(), StoreError> {
        self.coll
            .update_many(
                doc! { "groupId": group.as_str(), "deleting": { "$ne": true } },
                doc! { "$set": { "deleting": true } },
            )
            .await?;
        Ok(())
    }

    /// Uploads being deleted, issued before `settled` (no PUT with their
    /// URL can be under way): their objects go, then their records.
    pub async fn deleting(&self, settled: Millis, limit: i64) -> Result<Vec<Upload>, StoreError> {
        let docs: Vec<UploadDoc> = self
            .coll
            .find(doc! { "deleting": true, "createdAt": { "$lt": to_bson_time(settled) } })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs.into_iter().map(Upload::from).collect())
    }

    /// Uploads being deleted whose objects were not deleted yet (a deleted
    /// group's, which may be younger than their URL): their objects go at
    /// once, and again with [`Self::deleting`].
    pub async fn to_sweep(&self, limit: i64) -> Result<Vec<Upload>, StoreError> {
        let docs: Vec<UploadDoc> = self
            .coll
            .find(doc! { "deleting": true, "swept": { "$ne": true } })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        Ok(docs.into_iter().map(Upload::from).collect())
    }

    /// Records that the objects of upload `key` were deleted once.
    pub async fn mark_swept(&self, key: &str) -> Result<(), StoreError> {
        self.coll
            .update_one(doc! { "_id": key }, doc! { "$set": { "swept": true } })
            .await?;
        Ok(())
    }

    /// Forgets an upload once its object is gone.
    pub async fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.coll.delete_one(doc! { "_id": key }).await?;
        Ok(())
    }
}

/// The upload whose object a message of `group` uses as `key`: a
/// message's copy, or (first release) an upload a message claimed.
fn used_as_media(group: &GroupId, key: &str) -> Document {
    doc! { "groupId": group.as_str(), "$or": [
        { "mediaKey": key },
        { "_id": key, "referenced": true, "mediaKey": { "$exists": false } },
    ] }
}
