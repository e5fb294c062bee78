//! `blocks`: who will not be added to groups by whom. One small document
//! per pair, `{_id: "<by>:<of>", by, of, at}` (injective, since ids never
//! contain `:`), so blocking and unblocking are one write each whatever
//! the number of blocks, and the check a group creation or an addition
//! makes is one indexed read (`of`, `by`) however many members it adds.

use chat_domain::{Millis, UserId};
use futures::TryStreamExt;
use mongodb::{
    Collection, Database, IndexModel, bson::doc, error::ErrorKind, error::WriteFailure,
    options::IndexOptions,
};
use serde::{Deserialize, Serialize};

use crate::StoreError;

#[derive(Debug, Serialize, Deserialize)]
struct BlockDoc {
    #[serde(rename = "_id")]
    id: String,
    by: String,
    of: String,
    at: i64,
}

/// What blocking did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// Blocked since this time (now, or when it was first blocked).
    Since(Millis),
    /// The blocker has `most` blocks already.
    Full { most: u64 },
}

#[derive(Debug, Clone)]
pub struct BlockRepo {
    coll: Collection<BlockDoc>,
}

impl BlockRepo {
    pub(crate) fn new(db: &Database) -> Self {
        Self {
            coll: db.collection("blocks"),
        }
    }

    pub(crate) async fn ensure_indexes(&self) -> Result<(), StoreError> {
        // the check at every creation and addition: who among these blocks
        // the one adding them
        let of = IndexModel::builder()
            .keys(doc! { "of": 1, "by": 1 })
            .options(IndexOptions::builder().name("of_by".to_owned()).build())
            .build();
        // a user's own list, newest first, and its count
        let by = IndexModel::builder()
            .keys(doc! { "by": 1, "at": -1 })
            .options(IndexOptions::builder().name("by_at".to_owned()).build())
            .build();
        self.coll.create_indexes([of, by]).await?;
        Ok(())
    }

    /// `by` blocks `of` at `now`, unless `by` blocks `most` users already
    /// (a soft cap: two blocks at once may pass it by one). Blocking again
    /// keeps the first time.
    pub async fn block(
        &self,
        by: &UserId,
        of: &UserId,
        now: Millis,
        most: u64,
    ) -> Result<Blocked, StoreError> {
        let id = format!("{by}:{of}");
        if let Some(found) = self.coll.find_one(doc! { "_id": &id }).await? {
            return Ok(Blocked::Since(found.at));
        }
        let held = self
            .coll
            .count_documents(doc! { "by": by.as_str() })
            .limit(most)
            .await?;
        if held >= most {
            return Ok(Blocked::Full { most });
        }
        let doc = BlockDoc {
            id: id.clone(),
            by: by.to_string(),
            of: of.to_string(),
            at: now,
        };
        match self.coll.insert_one(&doc).await {
            Ok(_) => Ok(Blocked::Since(now)),
            // blocked at the same moment by another call: its time stands
            Err(e) if is_duplicate(&e) => Ok(self
                .coll
                .find_one(doc! { "_id": &id })
                .await?
                .map_or(Blocked::Since(now), |d| Blocked::Since(d.at))),
            Err(e) => Err(e.into()),
        }
    }

    /// `by` no longer blocks `of`; whether it did.
    pub async fn unblock(&self, by: &UserId, of: &UserId) -> Result<bool, StoreError> {
        let res = self
            .coll
            .delete_one(doc! { "_id": format!("{by}:{of}") })
            .await?;
        Ok(res.deleted_count == 1)
    }

    /// Whom `by` blocks, newest first, at most `limit`.
    pub async fn list(&self, by: &UserId, limit: i64) -> Result<Vec<(UserId, Millis)>, StoreError> {
        let docs: Vec<BlockDoc> = self
            .coll
            .find(doc! { "by": by.as_str() })
            .sort(doc! { "at": -1 })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        docs.into_iter()
            .map(|d| Ok((user_of(&d, &d.of)?, d.at)))
            .collect()
    }

    /// One of `among` who blocks `of`, if any: one indexed read (of `of`'s
    /// blockers, among these).
    pub async fn one_blocking(
        &self,
        of: &UserId,
        among: &[UserId],
    ) -> Result<Option<UserId>, StoreError> {
        if among.is_empty() {
            return Ok(None);
        }
        let among: Vec<&str> = among.iter().map(UserId::as_str).collect();
        let found = self
            .coll
            .find_one(doc! { "of": of.as_str(), "by": { "$in": among } })
            .await?;
        found.map(|d| user_of(&d, &d.by)).transpose()
    }
}

/// `id`, one of the ids of `d`, as a user id.
fn user_of(d: &BlockDoc, id: &str) -> Result<UserId, StoreError> {
    UserId::parse(id).map_err(|e| StoreError::Corrupt {
        id: d.id.clone(),
        message: e.to_string(),
    })
}

fn is_duplicate(e: &mongodb::error::Error) -> bool {
    matches!(&*e.kind, ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == 11000)
}
