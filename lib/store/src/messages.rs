//! The `messages` collection (`GroupMessage`, seed §4) and `receipts`, the
//! per-member delivered/read watermarks from which `GroupMessageStatus` is
//! derived.
//!
//! A message is first stored `pending` (invisible to history), then
//! published, then `committed` with its group seq. A pending message whose
//! publish failed is deleted; one whose outcome is unknown is resolved later
//! against JetStream (see `chat_worker`).

use chat_domain::{ClientMsgId, GroupId, MessageId, Millis, UserId};
use futures::TryStreamExt;
use mongodb::{
    Collection, IndexModel,
    bson::{Binary, DateTime, Document, doc, spec::BinarySubtype},
    options::IndexOptions,
};
use serde::{Deserialize, Serialize};

use crate::{StoreError, batch::Batcher, to_bson_time};

const PENDING: &str = "pending";
const COMMITTED: &str = "committed";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageDoc {
    #[serde(rename = "_id")]
    id: String,
    group_id: String,
    sender_id: String,
    client_msg_id: String,
    #[serde(rename = "type")]
    kind: String,
    key_id: String,
    nonce: Binary,
    ciphertext: Binary,
    state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream_seq: Option<i64>,
    /// While pending: the group's newest stream sequence before the first
    /// publish attempt; the message cannot have landed at or before it.
    #[serde(default)]
    after_stream_seq: i64,
    /// What the ciphertext is bound to (see `StoredMessage::binding`);
    /// absent in documents of the first version.
    #[serde(default = "binding_v1")]
    binding: i32,
    created_at: DateTime,
    updated_at: DateTime,
}

fn binding_v1() -> i32 {
    1
}

/// A stored message: the content stays sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: MessageId,
    pub group_id: GroupId,
    pub sender_id: UserId,
    pub client_msg_id: ClientMsgId,
    pub kind: String,
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    /// The version of what the ciphertext is bound to
    /// (`chat_crypto::MessageBinding`): 1, the message id; 2, id, group,
    /// sender and seq. A pending message's content is sealed again at each
    /// publish attempt (the seq is known only then) and stored with the
    /// commit.
    pub binding: u8,
    /// `None` while pending.
    pub seq: Option<u64>,
    pub stream_seq: Option<u64>,
    /// See `MessageDoc::after_stream_seq`.
    pub after_stream_seq: u64,
    pub created_at: Millis,
}

impl StoredMessage {
    pub fn is_committed(&self) -> bool {
        self.seq.is_some()
    }
}

fn binary(bytes: &[u8]) -> Binary {
    Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    }
}

impl MessageDoc {
    fn into_message(self) -> Result<StoredMessage, StoreError> {
        let corrupt = |e: chat_domain::DomainError| StoreError::Corrupt {
            id: self.id.clone(),
            message: e.to_string(),
        };
        Ok(StoredMessage {
            id: MessageId::parse(self.id.as_str()).map_err(corrupt)?,
            group_id: GroupId::parse(self.group_id.as_str()).map_err(corrupt)?,
            sender_id: UserId::parse(self.sender_id.as_str()).map_err(corrupt)?,
            client_msg_id: ClientMsgId::parse(self.client_msg_id.as_str()).map_err(corrupt)?,
            kind: self.kind.clone(),
            key_id: self.key_id.clone(),
            nonce: self.nonce.bytes.clone(),
            ciphertext: self.ciphertext.bytes.clone(),
            binding: u8::try_from(self.binding).unwrap_or(1),
            seq: if self.state == COMMITTED {
                self.seq.map(|s| s as u64)
            } else {
                None
            },
            stream_seq: self.stream_seq.map(|s| s as u64),
            after_stream_seq: self.after_stream_seq.max(0) as u64,
            created_at: self.created_at.timestamp_millis(),
        })
    }
}

/// A message's content as it was published: sealed for its seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub binding: u8,
}

/// One member's watermarks in one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Receipt {
    pub delivered_seq: u64,
    pub read_seq: u64,
    pub updated_at: Millis,
}

/// One group's watermarks: `{_id: groupId, m: {userId: {d, r, t}}}`.
#[derive(Debug, Serialize, Deserialize)]
struct ReceiptDoc {
    #[serde(rename = "_id")]
    id: String,
    #[serde(rename = "m", default)]
    members: std::collections::HashMap<String, MemberReceipt>,
}

#[derive(Debug, Serialize, Deserialize)]
struct MemberReceipt {
    #[serde(default)]
    d: i64,
    #[serde(default)]
    r: i64,
    #[serde(default)]
    t: Option<DateTime>,
}

/// Messages and receipts in MongoDB.
#[derive(Debug, Clone)]
pub struct MessageRepo {
    coll: Collection<MessageDoc>,
    receipts: Collection<ReceiptDoc>,
    /// Pending inserts and commits, batched across concurrent sends.
    batch: Batcher<MessageDoc>,
    /// Watermark raises, batched likewise.
    receipt_batch: Batcher<ReceiptDoc>,
}

impl MessageRepo {
    /// Needs a Tokio runtime: starts the write batcher.
    pub(crate) fn new(db: &mongodb::Database) -> Self {
        let coll = db.collection("messages");
        // one document per group (`ReceiptDoc`); the per-member documents
        // of earlier versions lived in `receipts`
        let receipts = db.collection("group_receipts");
        Self {
            batch: Batcher::start(db, &coll),
            receipt_batch: Batcher::start(db, &receipts),
            coll,
            receipts,
        }
    }

    pub(crate) async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let idempotency = IndexModel::builder()
            .keys(doc! { "groupId": 1, "senderId": 1, "clientMsgId": 1 })
            .options(
                IndexOptions::builder()
                    .name("idempotency".to_owned())
                    .unique(true)
                    .build(),
            )
            .build();
        let history = IndexModel::builder()
            .keys(doc! { "groupId": 1, "seq": -1 })
            .options(IndexOptions::builder().name("history".to_owned()).build())
            .build();
        let pending = IndexModel::builder()
            .keys(doc! { "state": 1, "createdAt": 1 })
            .options(IndexOptions::builder().name("pending".to_owned()).build())
            .build();
        self.coll
            .create_indexes([idempotency, history, pending])
            .await?;
        Ok(())
    }

    /// Stores `m` as pending. Returns `false` if the sender already sent a
    /// message with the same client id to this group.
    pub async fn insert_pending(&self, m: &StoredMessage) -> Result<bool, StoreError> {
        let now = to_bson_time(m.created_at);
        let doc = MessageDoc {
            id: m.id.to_string(),
            group_id: m.group_id.to_string(),
            sender_id: m.sender_id.to_string(),
            client_msg_id: m.client_msg_id.to_string(),
            kind: m.kind.clone(),
            key_id: m.key_id.clone(),
            nonce: binary(&m.nonce),
            ciphertext: binary(&m.ciphertext),
            state: PENDING.into(),
            seq: None,
            stream_seq: None,
            after_stream_seq: m.after_stream_seq as i64,
            binding: i32::from(m.binding),
            created_at: now,
            updated_at: now,
        };
        self.batch.insert(doc).await
    }

    /// Makes a pending message visible with its group seq and the content
    /// as published (sealed for that seq).
    pub async fn commit(
        &self,
        id: &MessageId,
        seq: u64,
        stream_seq: u64,
        content: &Published,
    ) -> Result<(), StoreError> {
        self.batch
            .update(doc! {
                "q": { "_id": id.as_str() },
                "u": { "$set": {
                    "state": COMMITTED, "seq": seq as i64, "streamSeq": stream_seq as i64,
                    "keyId": content.key_id.as_str(),
                    "nonce": binary(&content.nonce),
                    "ciphertext": binary(&content.ciphertext),
                    "binding": i32::from(content.binding),
                    "updatedAt": DateTime::now(),
                } },
            })
            .await
    }

    /// Rolls back a pending message (never a committed one).
    pub async fn delete_pending(&self, id: &MessageId) -> Result<(), StoreError> {
        self.coll
            .delete_one(doc! { "_id": id.as_str(), "state": PENDING })
            .await?;
        Ok(())
    }

    /// The message `sender` sent to `group` with `client_id`, if any.
    pub async fn find_by_client_id(
        &self,
        group: &GroupId,
        sender: &UserId,
        client_id: &ClientMsgId,
    ) -> Result<Option<StoredMessage>, StoreError> {
        self.coll
            .find_one(doc! { "groupId": group.as_str(), "senderId": sender.as_str(), "clientMsgId": client_id.as_str() })
            .await?
            .map(MessageDoc::into_message)
            .transpose()
    }

    /// The message `id`, pending or committed.
    pub async fn get(&self, id: &MessageId) -> Result<Option<StoredMessage>, StoreError> {
        self.coll
            .find_one(doc! { "_id": id.as_str() })
            .await?
            .map(MessageDoc::into_message)
            .transpose()
    }

    /// The newest committed message of `group`: its seq and stream seq.
    pub async fn last_committed(&self, group: &GroupId) -> Result<Option<(u64, u64)>, StoreError> {
        let last = self
            .coll
            .find_one(doc! { "groupId": group.as_str(), "state": COMMITTED })
            .sort(doc! { "seq": -1 })
            .await?;
        Ok(last.and_then(|d| Some((d.seq? as u64, d.stream_seq? as u64))))
    }

    /// Committed messages of `group` with seq below `before`, newest first.
    pub async fn history(
        &self,
        group: &GroupId,
        before: Option<u64>,
        limit: i64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut filter = doc! { "groupId": group.as_str(), "state": COMMITTED };
        if let Some(before) = before {
            filter.insert("seq", doc! { "$lt": before as i64 });
        }
        let docs: Vec<MessageDoc> = self
            .coll
            .find(filter)
            .sort(doc! { "seq": -1 })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        docs.into_iter().map(MessageDoc::into_message).collect()
    }

    /// Pending messages created before `older_than`, oldest first.
    pub async fn stale_pending(
        &self,
        older_than: Millis,
        limit: i64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let docs: Vec<MessageDoc> = self
            .coll
            .find(doc! { "state": PENDING, "createdAt": { "$lt": to_bson_time(older_than) } })
            .sort(doc! { "createdAt": 1 })
            .limit(limit)
            .await?
            .try_collect()
            .await?;
        docs.into_iter().map(MessageDoc::into_message).collect()
    }

    /// The seq and sender of `group`'s committed messages with seq in
    /// `(after, upto]`.
    pub async fn senders_by_seq(
        &self,
        group: &GroupId,
        after: u64,
        upto: u64,
    ) -> Result<Vec<(u64, UserId)>, StoreError> {
        // a ranged find on the history index, not `distinct`: SecantusDB
        // answers `distinct` with a collection scan (27 ms at 10,000
        // messages, growing with the collection), the find stays under 1 ms
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Sender {
            seq: i64,
            sender_id: String,
        }
        let docs: Vec<Sender> = self
            .coll
            .clone_with_type::<Sender>()
            .find(doc! { "groupId": group.as_str(), "seq": { "$gt": after as i64, "$lte": upto as i64 } })
            .projection(doc! { "_id": 0, "seq": 1, "senderId": 1 })
            .await?
            .try_collect()
            .await?;
        Ok(docs
            .into_iter()
            .filter_map(|d| Some((d.seq.max(0) as u64, UserId::parse(d.sender_id).ok()?)))
            .collect())
    }

    /// Raises members' watermarks in `group` (never lowers them): each of
    /// `raises` is (member, delivered, read). Returns each member's receipt
    /// before and after (the same if nothing rose).
    ///
    /// All of a group's watermarks live in one document, so a flush of the
    /// deliveries of every member of a group is one read and one (batched)
    /// `$max` update, not one write per member: with 1,000 members online
    /// the per-member documents were 1,000 writes a second.
    pub async fn raise_receipts(
        &self,
        group: &GroupId,
        raises: &[(UserId, u64, u64)],
        now: Millis,
    ) -> Result<Vec<(UserId, Receipt, Receipt)>, StoreError> {
        // the read only decides which senders hear of a change; the stored
        // watermarks are exact whatever interleaves (`$max`)
        let users: Vec<&UserId> = raises.iter().map(|(u, _, _)| u).collect();
        let before: std::collections::HashMap<UserId, Receipt> = self
            .receipts_of(group, Some(&users))
            .await?
            .into_iter()
            .collect();
        let mut max = Document::new();
        let mut set = Document::new();
        let mut risen = Vec::new();
        for (user, delivered, read) in raises {
            let delivered = (*delivered).max(*read);
            let b = before.get(user).copied().unwrap_or_default();
            let after = Receipt {
                delivered_seq: b.delivered_seq.max(delivered),
                read_seq: b.read_seq.max(*read),
                updated_at: now,
            };
            if after.delivered_seq == b.delivered_seq && after.read_seq == b.read_seq {
                risen.push((user.clone(), b, b));
                continue;
            }
            // user ids are letters, digits, `-` and `_`: safe as field names
            max.insert(format!("m.{user}.d"), delivered as i64);
            max.insert(format!("m.{user}.r"), *read as i64);
            set.insert(format!("m.{user}.t"), to_bson_time(now));
            risen.push((user.clone(), b, after));
        }
        if max.is_empty() {
            return Ok(risen);
        }
        self.receipt_batch
            .update(doc! {
                "q": { "_id": group.as_str() },
                "u": { "$max": max, "$set": set },
                "upsert": true,
            })
            .await?;
        Ok(risen)
    }

    /// Every member's watermarks in `group`.
    pub async fn receipts(&self, group: &GroupId) -> Result<Vec<(UserId, Receipt)>, StoreError> {
        self.receipts_of(group, None).await
    }

    /// The watermarks of `users` in `group` (all members if `None`): only
    /// their fields are read, so one member's read receipt in a group of
    /// 1,000 moves one entry, not the whole document (about 60 KB).
    async fn receipts_of(
        &self,
        group: &GroupId,
        users: Option<&[&UserId]>,
    ) -> Result<Vec<(UserId, Receipt)>, StoreError> {
        let mut find = self.receipts.find_one(doc! { "_id": group.as_str() });
        if let Some(users) = users {
            let mut fields = Document::new();
            for u in users {
                // user ids are letters, digits, `-` and `_`: safe as field names
                fields.insert(format!("m.{u}"), 1);
            }
            find = find.projection(fields);
        }
        let Some(doc) = find.await? else {
            return Ok(Vec::new());
        };
        Ok(doc
            .members
            .into_iter()
            .filter_map(|(user, r)| {
                Some((
                    UserId::parse(user.as_str()).ok()?,
                    Receipt {
                        delivered_seq: r.d.max(0) as u64,
                        read_seq: r.r.max(0) as u64,
                        updated_at: r.t.map_or(0, |t| t.timestamp_millis()),
                    },
                ))
            })
            .collect())
    }
}
