//! The `messages` collection (`GroupMessage`, seed §4) and `receipts`, the
//! per-member delivered/read watermarks from which `GroupMessageStatus` is
//! derived.
//!
//! The group's JetStream stream is the write-ahead log of the messages: a
//! send is acknowledged once the stream holds it, and the workers write the
//! stream into `messages` behind it in batches ([`MessageRepo::project`]),
//! idempotently. Earlier versions stored a `pending` record first; such
//! records are never shown, and are committed or removed when the message
//! they stand for is projected.

use chat_domain::{ClientMsgId, GroupId, MessageId, Millis, UserId};
use futures::TryStreamExt;
use mongodb::{
    Collection, IndexModel,
    bson::{Binary, DateTime, Document, doc, spec::BinarySubtype},
    error::ErrorKind,
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
    /// What the ciphertext is bound to (see `StoredMessage::binding`);
    /// absent in documents of the first version.
    #[serde(default = "binding_v1")]
    binding: i32,
    created_at: DateTime,
    updated_at: DateTime,
    /// The stream sequence of the last change applied (edit or delete):
    /// changes applied out of order (two workers' batches) never undo a
    /// newer one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    edited_at: Option<DateTime>,
    /// A tombstone: the sealed content is emptied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deleted_at: Option<DateTime>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deleted_by: Option<String>,
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
    /// `None` for a pending record left by an earlier version of the send
    /// path (never shown).
    pub seq: Option<u64>,
    pub stream_seq: Option<u64>,
    pub created_at: Millis,
    /// When its sender last edited it.
    pub edited_at: Option<Millis>,
    /// When it was deleted: a tombstone, with no content.
    pub deleted_at: Option<Millis>,
    /// The stream sequence of the last change applied to it (0: none).
    pub version: u64,
}

impl StoredMessage {
    pub fn is_committed(&self) -> bool {
        self.seq.is_some()
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted_at.is_some()
    }
}

/// New sealed content for a message (an edit), sealed for the same
/// binding as the original.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resealed {
    pub key_id: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub binding: u8,
}

fn binary(bytes: &[u8]) -> Binary {
    Binary {
        subtype: BinarySubtype::Generic,
        bytes: bytes.to_vec(),
    }
}

/// Whether `e` broke a unique index.
fn is_duplicate(e: &mongodb::error::Error) -> bool {
    match e.kind.as_ref() {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::InsertMany(im) => im.write_errors.iter().flatten().any(|w| w.code == 11000),
        _ => false,
    }
}

/// `m` as stored once the stream holds it.
fn committed_doc(m: &StoredMessage) -> MessageDoc {
    let created = to_bson_time(m.created_at);
    MessageDoc {
        id: m.id.to_string(),
        group_id: m.group_id.to_string(),
        sender_id: m.sender_id.to_string(),
        client_msg_id: m.client_msg_id.to_string(),
        kind: m.kind.clone(),
        key_id: m.key_id.clone(),
        nonce: binary(&m.nonce),
        ciphertext: binary(&m.ciphertext),
        state: COMMITTED.into(),
        seq: m.seq.map(|s| s as i64),
        stream_seq: m.stream_seq.map(|s| s as i64),
        binding: i32::from(m.binding),
        created_at: created,
        updated_at: DateTime::now(),
        version: None,
        edited_at: None,
        deleted_at: None,
        deleted_by: None,
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
            // a second message under a reused client id is stored with a
            // suffix no client id can have (`project`): it stands for itself
            client_msg_id: ClientMsgId::parse(self.client_msg_id.as_str())
                .or_else(|_| ClientMsgId::parse(self.id.as_str()))
                .map_err(corrupt)?,
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
            created_at: self.created_at.timestamp_millis(),
            edited_at: self.edited_at.map(|t| t.timestamp_millis()),
            deleted_at: self.deleted_at.map(|t| t.timestamp_millis()),
            version: self.version.map_or(0, |v| v.max(0) as u64),
        })
    }
}

/// Up to this many members, a read of some members' watermarks projects
/// their fields; past it, it reads the group's whole document.
const PROJECTED_MEMBERS: usize = 32;

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
    /// The member's own newest message: what it sent, it has read.
    #[serde(default)]
    s: i64,
    #[serde(default)]
    t: Option<DateTime>,
}

/// One member's sent watermark in one group: the seq of its own newest
/// message there. `{_id: "<group>:<user>", g, s}`: a document of its
/// own, so a persisted batch raises it at O(1) cost, where a field of the
/// group's receipts document made every batch rewrite (and diff) an entry
/// per member (earlier versions kept it there as `m.<user>.s`, still read).
#[derive(Debug, Serialize, Deserialize)]
struct SentDoc {
    /// The group, as in the key.
    g: String,
    #[serde(default)]
    s: i64,
}

/// Messages and receipts in MongoDB.
#[derive(Debug, Clone)]
pub struct MessageRepo {
    coll: Collection<MessageDoc>,
    receipts: Collection<ReceiptDoc>,
    /// Watermark raises, batched across concurrent calls.
    receipt_batch: Batcher,
    /// The sent watermarks (`SentDoc`).
    sent: Collection<SentDoc>,
    sent_batch: Batcher,
}

impl MessageRepo {
    /// Needs a Tokio runtime: starts the write batcher.
    pub(crate) fn new(db: &mongodb::Database) -> Self {
        let coll = db.collection("messages");
        // one document per group (`ReceiptDoc`); the per-member documents
        // of earlier versions lived in `receipts`
        let receipts = db.collection("group_receipts");
        let sent = db.collection("sent_marks");
        Self {
            receipt_batch: Batcher::start(db, &receipts),
            sent_batch: Batcher::start(db, &sent),
            coll,
            receipts,
            sent,
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
        self.coll.create_indexes([idempotency, history]).await?;
        // the watermarks' collections exist before the first raise (a
        // database stopped while creating one on the fly is one failure
        // mode less); `_id` is their only index
        let db = self.sent.client().database(&self.sent.namespace().db);
        for name in [self.receipts.name(), self.sent.name()] {
            match db.create_collection(name).await {
                Ok(()) => {}
                // NamespaceExists: created before
                Err(e) if matches!(&*e.kind, ErrorKind::Command(c) if c.code == 48) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Writes messages as the stream holds them (committed, with their seq
    /// and sealed content), in one command. Idempotent: a message already
    /// stored is left as it is, so a batch delivered twice (a worker died
    /// before acknowledging it) changes nothing. Returns how many were new.
    pub async fn project(&self, msgs: &[StoredMessage]) -> Result<usize, StoreError> {
        if msgs.is_empty() {
            return Ok(0);
        }
        let docs: Vec<MessageDoc> = msgs.iter().map(committed_doc).collect();
        let err = match self.coll.insert_many(&docs).ordered(false).await {
            Ok(_) => return Ok(docs.len()),
            Err(e) => e,
        };
        // which documents failed, and whether only as duplicates
        let duplicates: Vec<usize> = match err.kind.as_ref() {
            ErrorKind::InsertMany(im)
                if im.write_concern_error.is_none()
                    && im.write_errors.iter().flatten().all(|w| w.code == 11000) =>
            {
                im.write_errors.iter().flatten().map(|w| w.index).collect()
            }
            _ => return Err(err.into()),
        };
        // the common duplicate is a batch delivered again: one read finds
        // every message stored already, and only the rest is looked at one by one
        let ids: Vec<&str> = duplicates
            .iter()
            .filter_map(|&i| docs.get(i))
            .map(|d| d.id.as_str())
            .collect();
        #[derive(Deserialize)]
        struct Stored {
            #[serde(rename = "_id")]
            id: String,
            state: String,
        }
        let stored: std::collections::HashSet<String> = self
            .coll
            .clone_with_type::<Stored>()
            .find(doc! { "_id": { "$in": &ids }, "state": COMMITTED })
            .projection(doc! { "_id": 1, "state": 1 })
            .await?
            .try_collect::<Vec<Stored>>()
            .await?
            .into_iter()
            .filter(|s| s.state == COMMITTED)
            .map(|s| s.id)
            .collect();
        for &i in &duplicates {
            if let Some(doc) = docs.get(i)
                && !stored.contains(&doc.id)
            {
                self.settle_duplicate(doc).await?;
            }
        }
        Ok(docs.len() - duplicates.len())
    }

    /// A projected message broke a unique index: stored already (nothing to
    /// do), a pending record of an earlier version of the send path
    /// (committed now with what the stream holds), or an earlier version's
    /// attempt under the same client id that never landed (removed).
    async fn settle_duplicate(&self, doc: &MessageDoc) -> Result<(), StoreError> {
        if let Some(existing) = self.coll.find_one(doc! { "_id": &doc.id }).await? {
            if existing.state != COMMITTED {
                // the earlier record keeps its client id
                self.coll
                    .update_one(
                        doc! { "_id": &doc.id },
                        doc! { "$set": {
                            "state": COMMITTED, "seq": doc.seq, "streamSeq": doc.stream_seq,
                            "keyId": &doc.key_id, "nonce": doc.nonce.clone(),
                            "ciphertext": doc.ciphertext.clone(), "binding": doc.binding,
                            "updatedAt": DateTime::now(),
                        } },
                    )
                    .await?;
            }
            return Ok(());
        }
        self.coll
            .delete_many(doc! {
                "groupId": &doc.group_id, "senderId": &doc.sender_id,
                "clientMsgId": &doc.client_msg_id, "state": PENDING,
            })
            .await?;
        match self.coll.insert_one(doc).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate(&e) => {
                // two messages of the stream share a client id: a client that
                // reused one after the send log's window (or a retry of a send
                // from before the send log). Both are in the stream, so both
                // go into history: this one under a client id no client can
                // send (`~` is not allowed in one), read back as its own id
                tracing::warn!(message = %doc.id, group = %doc.group_id, "a second message with the same client id");
                let mut renamed = doc.clone();
                renamed.client_msg_id = format!("{}~{}", doc.client_msg_id, doc.id);
                match self.coll.insert_one(&renamed).await {
                    Ok(_) => Ok(()),
                    Err(e) if is_duplicate(&e) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Applies an edit stored at stream sequence `version`: the new sealed
    /// content and its time, unless the message is deleted or a newer
    /// change is applied already. Idempotent; whether it changed anything.
    pub async fn apply_edit(
        &self,
        id: &MessageId,
        version: u64,
        content: &Resealed,
        edited_at: Millis,
    ) -> Result<bool, StoreError> {
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        let r = self
            .coll
            .update_one(
                doc! {
                    "_id": id.as_str(),
                    "deletedAt": { "$exists": false },
                    "$or": [ { "version": { "$exists": false } }, { "version": { "$lt": version } } ],
                },
                doc! { "$set": {
                    "keyId": &content.key_id, "nonce": binary(&content.nonce),
                    "ciphertext": binary(&content.ciphertext), "binding": i32::from(content.binding),
                    "version": version, "editedAt": to_bson_time(edited_at),
                    "updatedAt": DateTime::now(),
                } },
            )
            .await?;
        Ok(r.modified_count > 0)
    }

    /// Applies a delete stored at stream sequence `version`: the message
    /// becomes a tombstone (its sealed content emptied), whatever edits
    /// come before or after it. Idempotent: `Some` of the version it had
    /// (the stream sequence of its last edit, 0 if none) if it made the
    /// tombstone, `None` if there was nothing to delete.
    pub async fn apply_delete(
        &self,
        id: &MessageId,
        version: u64,
        by: &UserId,
        deleted_at: Millis,
    ) -> Result<Option<u64>, StoreError> {
        let version = i64::try_from(version).unwrap_or(i64::MAX);
        let before = self
            .coll
            .clone_with_type::<Document>()
            .find_one_and_update(
                doc! { "_id": id.as_str(), "deletedAt": { "$exists": false } },
                doc! { "$set": {
                    "nonce": binary(&[]), "ciphertext": binary(&[]),
                    "version": version, "deletedAt": to_bson_time(deleted_at),
                    "deletedBy": by.as_str(), "updatedAt": DateTime::now(),
                } },
            )
            .projection(doc! { "version": 1 })
            .return_document(mongodb::options::ReturnDocument::Before)
            .await?;
        Ok(before.map(|d| {
            d.get_i64("version")
                .ok()
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(0)
        }))
    }

    /// The messages `ids` that are stored (one read).
    pub async fn get_many(&self, ids: &[&MessageId]) -> Result<Vec<StoredMessage>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = ids.iter().map(|id| id.as_str()).collect();
        let docs: Vec<MessageDoc> = self
            .coll
            .find(doc! { "_id": { "$in": ids } })
            .await?
            .try_collect()
            .await?;
        docs.into_iter().map(MessageDoc::into_message).collect()
    }

    /// The message `id`, pending or committed.
    pub async fn get(&self, id: &MessageId) -> Result<Option<StoredMessage>, StoreError> {
        self.coll
            .find_one(doc! { "_id": id.as_str() })
            .await?
            .map(MessageDoc::into_message)
            .transpose()
    }

    /// The message `sender` sent to `group` under client id `client`, if it
    /// is in history (the `idempotency` index): for a send the send log
    /// cannot vouch for (chat_bus::sends).
    pub async fn sent_with(
        &self,
        group: &GroupId,
        sender: &UserId,
        client: &ClientMsgId,
    ) -> Result<Option<StoredMessage>, StoreError> {
        self.coll
            .find_one(doc! {
                "groupId": group.as_str(), "senderId": sender.as_str(),
                "clientMsgId": client.as_str(), "state": COMMITTED,
            })
            .await?
            .map(MessageDoc::into_message)
            .transpose()
    }

    /// Each encryption key id with the number of stored messages it seals
    /// (an operator's question, answered with a scan).
    pub async fn key_usage(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let ids = self.coll.distinct("keyId", doc! {}).await?;
        let mut usage = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(id) = id.as_str().map(str::to_owned) else {
                continue;
            };
            let n = self.coll.count_documents(doc! { "keyId": &id }).await?;
            usage.push((id, n));
        }
        usage.sort();
        Ok(usage)
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

    /// Committed messages of `group` with seq above `after` and below
    /// `before`, newest first.
    pub async fn history(
        &self,
        group: &GroupId,
        after: u64,
        before: Option<u64>,
        limit: i64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut filter = doc! { "groupId": group.as_str(), "state": COMMITTED };
        let mut seq = doc! {};
        if after > 0 {
            seq.insert("$gt", i64::try_from(after).unwrap_or(i64::MAX));
        }
        if let Some(before) = before {
            seq.insert("$lt", i64::try_from(before).unwrap_or(i64::MAX));
        }
        if !seq.is_empty() {
            filter.insert("seq", seq);
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

    /// Committed messages of `group` with seq in `(after, upto]`, newest
    /// first. A read bounded on both sides of the history index and nothing
    /// else: a condition the index cannot answer (`state`) makes
    /// SecantusDB examine each document for it, 10 to 20 times slower
    /// (BENCHMARKS.md "Search"), so the pending records of earlier
    /// versions in the range are dropped here instead. Seqs are gapless,
    /// so the range holds about `upto - after` documents.
    pub async fn window(
        &self,
        group: &GroupId,
        after: u64,
        upto: u64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        if upto <= after {
            return Ok(Vec::new());
        }
        let bound = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        // (a few more than the seqs, for such records)
        let most = bound(upto - after).saturating_mul(2).saturating_add(16);
        let docs: Vec<MessageDoc> = self
            .coll
            .find(doc! {
                "groupId": group.as_str(),
                "seq": { "$gt": bound(after), "$lte": bound(upto) },
            })
            .sort(doc! { "seq": -1 })
            .limit(most)
            .await?
            .try_collect()
            .await?;
        let mut page = Vec::with_capacity(docs.len());
        for d in docs {
            let m = d.into_message()?;
            if m.is_committed() {
                page.push(m);
            }
        }
        Ok(page)
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
            // only what rose: a field that did not is already at least
            // this high, and every path costs the server (the stand-in
            // checks an update's paths against each other, quadratic in
            // their number: a group of 1,000 raising delivered once a
            // second was a third of its CPU with all three per member)
            // user ids are letters, digits, `-` and `_`: safe as field names
            if after.delivered_seq > b.delivered_seq {
                max.insert(format!("m.{user}.d"), delivered as i64);
            }
            if after.read_seq > b.read_seq {
                max.insert(format!("m.{user}.r"), *read as i64);
            }
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

    /// `user`'s read watermark in each of `groups` (absent: nothing read),
    /// raised to its own newest message there, in one read of only that
    /// member's entries.
    pub async fn read_marks(
        &self,
        user: &UserId,
        groups: &[GroupId],
    ) -> Result<std::collections::HashMap<GroupId, u64>, StoreError> {
        if groups.is_empty() {
            return Ok(Default::default());
        }
        let ids: Vec<&str> = groups.iter().map(GroupId::as_str).collect();
        let keys: Vec<String> = groups.iter().map(|g| crate::member_key(g, user)).collect();
        // user ids are letters, digits, `-` and `_`: safe as field names
        let reads = async {
            self.receipts
                .find(doc! { "_id": { "$in": &ids } })
                .projection(doc! { format!("m.{user}.r"): 1, format!("m.{user}.s"): 1 })
                .await?
                .try_collect::<Vec<ReceiptDoc>>()
                .await
        };
        let sent = async {
            self.sent
                .find(doc! { "_id": { "$in": keys } })
                .await?
                .try_collect::<Vec<SentDoc>>()
                .await
        };
        let (reads, sent) = futures::try_join!(reads, sent)?;
        let mut marks = std::collections::HashMap::new();
        let mut raise = |group: String, seq: i64| {
            if let Ok(group) = GroupId::parse(group) {
                let mark = marks.entry(group).or_insert(0);
                *mark = (*mark).max(seq.max(0) as u64);
            }
        };
        for d in reads {
            if let Some(m) = d.members.get(user.as_str()) {
                raise(d.id, m.r.max(m.s));
            }
        }
        for d in sent {
            raise(d.g, d.s);
        }
        Ok(marks)
    }

    /// Raises the sent watermark of each of `senders` (member, newest seq
    /// it sent) in `group`: a batched `$max` on the member's own document
    /// (`SentDoc`), apart from the read watermark, so a later
    /// acknowledgement still raises that and is pushed to the senders it
    /// concerns.
    pub async fn raise_sent(
        &self,
        group: &GroupId,
        senders: &[(UserId, u64)],
    ) -> Result<(), StoreError> {
        futures::future::try_join_all(senders.iter().map(|(user, seq)| {
            self.sent_batch.update(doc! {
                "q": { "_id": crate::member_key(group, user) },
                "u": {
                    "$max": { "s": i64::try_from(*seq).unwrap_or(i64::MAX) },
                    "$setOnInsert": { "g": group.as_str() },
                },
                "upsert": true,
            })
        }))
        .await?;
        Ok(())
    }

    /// Forgets `user`'s watermarks in `group` (its entry of the group's
    /// receipts document and its sent watermark): after a leave or
    /// removal, so that the group's document holds its members' entries,
    /// not everyone's who ever was one. A member added again starts
    /// afresh, as its history does (unread counts start at its join
    /// either way). Idempotent.
    pub async fn forget_member(&self, group: &GroupId, user: &UserId) -> Result<(), StoreError> {
        // user ids are letters, digits, `-` and `_`: safe as field names
        let unset = self.receipts.update_one(
            doc! { "_id": group.as_str() },
            doc! { "$unset": { format!("m.{user}"): "" } },
        );
        let sent = self
            .sent
            .delete_one(doc! { "_id": crate::member_key(group, user) });
        futures::try_join!(unset.into_future(), sent.into_future())?;
        Ok(())
    }

    /// Deletes every message of `group`, its receipts and its sent marks
    /// (a deleted group's). Idempotent.
    pub async fn purge_group(&self, group: &GroupId) -> Result<u64, StoreError> {
        let messages = self.coll.delete_many(doc! { "groupId": group.as_str() });
        let receipts = self.receipts.delete_one(doc! { "_id": group.as_str() });
        let sent = self.sent.delete_many(crate::member_keys_of(group));
        let (messages, _, _) = futures::try_join!(
            messages.into_future(),
            receipts.into_future(),
            sent.into_future()
        )?;
        Ok(messages.deleted_count)
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
        // a projection of many fields costs more than it saves (the
        // stand-in checks its paths against each other): past a few
        // members the whole document is read and filtered here
        let wanted: Option<std::collections::HashSet<&str>> = users
            .filter(|u| u.len() > PROJECTED_MEMBERS)
            .map(|u| u.iter().map(|u| u.as_str()).collect());
        if let Some(users) = users.filter(|u| u.len() <= PROJECTED_MEMBERS) {
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
            .filter(|(user, _)| wanted.as_ref().is_none_or(|w| w.contains(user.as_str())))
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
