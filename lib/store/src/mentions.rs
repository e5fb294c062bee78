//! `mentions`: one small document per member a message mentions, written
//! by the persist loop behind the stream (idempotent: `_id` is
//! `<user>:<messageId>`, injective since ids never contain `:`), read in
//! pages, newest first, by the member it mentions.

use chat_domain::{GroupId, MessageId, Millis, UserId};
use futures::TryStreamExt;
use mongodb::{
    Collection, Database, IndexModel, bson::doc, error::ErrorKind, options::IndexOptions,
};
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// A member mentioned in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mention {
    pub user: UserId,
    pub group: GroupId,
    pub message: MessageId,
    pub seq: u64,
    pub sender: UserId,
    pub created_at: Millis,
}

#[derive(Debug, Serialize, Deserialize)]
struct MentionDoc {
    #[serde(rename = "_id")]
    id: String,
    user: String,
    #[serde(rename = "groupId")]
    group_id: String,
    #[serde(rename = "messageId")]
    message_id: String,
    seq: i64,
    #[serde(rename = "senderId")]
    sender_id: String,
    #[serde(rename = "createdAt")]
    created_at: i64,
}

impl MentionDoc {
    fn of(m: &Mention) -> Self {
        Self {
            id: format!("{}:{}", m.user, m.message),
            user: m.user.to_string(),
            group_id: m.group.to_string(),
            message_id: m.message.to_string(),
            seq: i64::try_from(m.seq).unwrap_or(i64::MAX),
            sender_id: m.sender.to_string(),
            created_at: m.created_at,
        }
    }

    fn into_mention(self) -> Result<Mention, StoreError> {
        let corrupt = |e: chat_domain::DomainError| StoreError::Corrupt {
            id: self.id.clone(),
            message: e.to_string(),
        };
        Ok(Mention {
            user: UserId::parse(self.user.as_str()).map_err(corrupt)?,
            group: GroupId::parse(self.group_id.as_str()).map_err(corrupt)?,
            message: MessageId::parse(self.message_id.as_str()).map_err(corrupt)?,
            seq: u64::try_from(self.seq).unwrap_or_default(),
            sender: UserId::parse(self.sender_id.as_str()).map_err(corrupt)?,
            created_at: self.created_at,
        })
    }
}

/// Where a page of mentions starts: before this mention (by time, then
/// message id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MentionCursor {
    pub created_at: Millis,
    pub message: MessageId,
}

#[derive(Debug, Clone)]
pub struct MentionRepo {
    coll: Collection<MentionDoc>,
}

impl MentionRepo {
    pub(crate) fn new(db: &Database) -> Self {
        Self {
            coll: db.collection("mentions"),
        }
    }

    pub(crate) async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let newest = IndexModel::builder()
            .keys(doc! { "user": 1, "createdAt": -1, "messageId": -1 })
            .options(IndexOptions::builder().name("newest".to_owned()).build())
            .build();
        // a deleted group's, for its purge
        self.coll
            .create_indexes([newest, crate::by_group_index()])
            .await?;
        Ok(())
    }

    /// Deletes every mention in `group` (a deleted group's).
    pub async fn purge_group(&self, group: &GroupId) -> Result<(), StoreError> {
        crate::delete_of_group(&self.coll, group).await
    }

    /// Records `mentions`; those recorded already are left as they are.
    pub async fn record(&self, mentions: &[Mention]) -> Result<(), StoreError> {
        if mentions.is_empty() {
            return Ok(());
        }
        let docs: Vec<MentionDoc> = mentions.iter().map(MentionDoc::of).collect();
        match self.coll.insert_many(&docs).ordered(false).await {
            Ok(_) => Ok(()),
            Err(e) => match e.kind.as_ref() {
                ErrorKind::InsertMany(im)
                    if im.write_concern_error.is_none()
                        && im.write_errors.iter().flatten().all(|w| w.code == 11000) =>
                {
                    Ok(())
                }
                _ => Err(e.into()),
            },
        }
    }

    /// `user`'s mentions, newest first, before `before` if given.
    pub async fn page(
        &self,
        user: &UserId,
        before: Option<&MentionCursor>,
        limit: i64,
    ) -> Result<Vec<Mention>, StoreError> {
        let mut filter = doc! { "user": user.as_str() };
        if let Some(c) = before {
            filter.insert(
                "$or",
                vec![
                    doc! { "createdAt": { "$lt": c.created_at } },
                    doc! { "createdAt": c.created_at, "messageId": { "$lt": c.message.as_str() } },
                ],
            );
        }
        let docs: Vec<MentionDoc> = self
            .coll
            .find(filter)
            .sort(doc! { "createdAt": -1, "messageId": -1 })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        docs.into_iter().map(MentionDoc::into_mention).collect()
    }
}
