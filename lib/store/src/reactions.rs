//! `reactions`: one document per message that has any, `{_id: messageId,
//! groupId, v, r: {emoji: [userId, ...]}}`. A reaction is one conditional
//! write of that document (on its version `v`), whatever the size of the
//! group; counts are the lengths of the lists. Emoji contain no ASCII
//! (`chat_domain::check_emoji`), so never `.` or `$`, and are safe as keys.

use std::collections::BTreeMap;

use chat_domain::{GroupId, MessageId, REACTIONS_PER_MESSAGE_MAX, REACTIONS_PER_USER_MAX, UserId};
use futures::TryStreamExt;
use mongodb::{Collection, Database, bson::doc, error::ErrorKind};
use serde::{Deserialize, Serialize};

use crate::StoreError;

/// Attempts of one change against concurrent ones.
const ATTEMPTS: usize = 16;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ReactionsDoc {
    #[serde(rename = "_id")]
    id: String,
    #[serde(rename = "groupId")]
    group_id: String,
    v: i64,
    r: BTreeMap<String, Vec<String>>,
}

/// The reactions of one message: each emoji with who reacted with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reactions(pub BTreeMap<String, Vec<String>>);

impl Reactions {
    /// Each emoji with its count and whether `user` is among them.
    pub fn seen_by(&self, user: &UserId) -> Vec<(String, u64, bool)> {
        self.0
            .iter()
            .map(|(e, users)| {
                (
                    e.clone(),
                    users.len() as u64,
                    users.iter().any(|u| u == user.as_str()),
                )
            })
            .collect()
    }
}

/// Why a reaction was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReactionLimit {
    /// The message has [`REACTIONS_PER_MESSAGE_MAX`] different reactions.
    Message,
    /// The user has [`REACTIONS_PER_USER_MAX`] reactions on it.
    User,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reacted {
    /// Done: the emoji's count now.
    Count(u64),
    /// Already so: nothing changed; the emoji's count.
    Unchanged(u64),
    /// Refused: a limit.
    Limit(ReactionLimit),
}

#[derive(Debug, Clone)]
pub struct ReactionRepo {
    coll: Collection<ReactionsDoc>,
}

impl ReactionRepo {
    pub(crate) fn new(db: &Database) -> Self {
        Self {
            coll: db.collection("reactions"),
        }
    }

    pub(crate) async fn ensure_indexes(&self) -> Result<(), StoreError> {
        // a deleted group's, for its purge
        self.coll.create_index(crate::by_group_index()).await?;
        Ok(())
    }

    /// Deletes every reaction in `group` (a deleted group's).
    pub async fn purge_group(&self, group: &GroupId) -> Result<(), StoreError> {
        crate::delete_of_group(&self.coll, group).await
    }

    /// Adds (`on`) or takes back `user`'s `emoji` on message `message` of
    /// `group`. Idempotent: adding twice or taking back what is not there
    /// changes nothing and answers the count.
    pub async fn set(
        &self,
        group: &GroupId,
        message: &MessageId,
        user: &UserId,
        emoji: &str,
        on: bool,
    ) -> Result<Reacted, StoreError> {
        for _ in 0..ATTEMPTS {
            let current = self.coll.find_one(doc! { "_id": message.as_str() }).await?;
            let exists = current.is_some();
            let mut d = current.unwrap_or_else(|| ReactionsDoc {
                id: message.to_string(),
                group_id: group.to_string(),
                v: 0,
                r: BTreeMap::new(),
            });
            let has =
                d.r.get(emoji)
                    .is_some_and(|u| u.iter().any(|x| x == user.as_str()));
            if has == on {
                return Ok(Reacted::Unchanged(
                    d.r.get(emoji).map_or(0, |u| u.len() as u64),
                ));
            }
            if on {
                if !d.r.contains_key(emoji) && d.r.len() >= REACTIONS_PER_MESSAGE_MAX {
                    return Ok(Reacted::Limit(ReactionLimit::Message));
                }
                let mine =
                    d.r.values()
                        .filter(|u| u.iter().any(|x| x == user.as_str()))
                        .count();
                if mine >= REACTIONS_PER_USER_MAX {
                    return Ok(Reacted::Limit(ReactionLimit::User));
                }
                d.r.entry(emoji.to_owned())
                    .or_default()
                    .push(user.to_string());
            } else if let Some(users) = d.r.get_mut(emoji) {
                users.retain(|x| x != user.as_str());
                if users.is_empty() {
                    d.r.remove(emoji);
                }
            }
            let count = d.r.get(emoji).map_or(0, |u| u.len() as u64);
            let old = d.v;
            d.v += 1;
            let written = if exists {
                self.coll
                    .replace_one(doc! { "_id": message.as_str(), "v": old }, &d)
                    .await?
                    .matched_count
                    == 1
            } else {
                match self.coll.insert_one(&d).await {
                    Ok(_) => true,
                    Err(e) if matches!(e.kind.as_ref(), ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) if w.code == 11000) => {
                        false
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            if written {
                return Ok(Reacted::Count(count));
            }
        }
        Err(StoreError::Unavailable(
            "the message's reactions keep changing; retry".into(),
        ))
    }

    /// The reactions of `messages`, by message id (messages without any are
    /// left out).
    pub async fn of(
        &self,
        messages: &[&MessageId],
    ) -> Result<BTreeMap<String, Reactions>, StoreError> {
        if messages.is_empty() {
            return Ok(BTreeMap::new());
        }
        let ids: Vec<&str> = messages.iter().map(|m| m.as_str()).collect();
        let docs: Vec<ReactionsDoc> = self
            .coll
            .find(doc! { "_id": { "$in": ids } })
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .filter(|d| !d.r.is_empty())
            .map(|d| (d.id, Reactions(d.r)))
            .collect())
    }
}
