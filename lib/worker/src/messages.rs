//! `Messages`: send (validate, check membership from the cache, record the
//! send in the send log, encrypt, publish with per-group compare-and-set),
//! receipts, history and status (seed §2).
//!
//! The group's stream is the write-ahead log: a send is acknowledged once
//! JetStream holds it, with no MongoDB read or write on the way in the
//! normal case, and the persist loop (`persist.rs`) writes it into MongoDB
//! behind the stream. Invariant: a message is in MongoDB if and only if it is
//! in the stream, once persistence has caught up; reads that must see the
//! newest messages (history, receipts, status) wait for it.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use bytes::Bytes;
use chat_bus::{Claimed, Envelope, SendRecord, send_key};
use chat_crypto::{BINDING_V2, MessageBinding, Sealed};
use chat_domain::{
    ClientMsgId, DomainError, GroupId, MessageId, MessageKind, UserId, check_text, now_millis,
};
use chat_protocol::{MessageStatusPush, ReplyView, event, push_json, reply_preview};
use chat_rpc::pb::{self, messages_server::Messages};
use chat_store::{StoreError, StoredMessage};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::{
    State, WorkerError,
    media::{self, MediaContent, check_media},
    parse_id,
    persist::{self, CATCH_UP, read_caught_up},
    publish::{Publishing, Reservation, Taken, Unsealed, lower_bound, publish_locked, publish_new},
};

/// Largest history page.
const MAX_HISTORY_PAGE: u32 = 100;
/// Most matches one search call returns.
const MAX_SEARCH_PAGE: u32 = 50;
/// Messages a search reads from the database at a time.
const SEARCH_CHUNK: u32 = 200;
/// Most ciphertext one search call opens (256 texts of the longest kind):
/// it stops there, and its `next` goes on.
const SEARCH_BYTES: u64 = 4 << 20;
/// How long a receipt waits for the messages it covers to be persisted.
const RECEIPTS_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// The sealed part of a message.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Content {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaContent>,
    /// The message this one answers, with its preview: sealed with the
    /// content, since the preview is content.
    #[serde(default, rename = "replyTo", skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyView>,
}

pub(crate) struct MessagesService(pub Arc<State>);

fn forbidden(why: impl Into<String>) -> WorkerError {
    WorkerError::Domain(DomainError::Forbidden(why.into()))
}

pub(crate) fn unavailable(why: impl Into<String>) -> WorkerError {
    WorkerError::Store(StoreError::Unavailable(why.into()))
}

fn ack(m: &StoredMessage) -> pb::SendMessageResponse {
    pb::SendMessageResponse {
        message_id: m.id.to_string(),
        group_id: m.group_id.to_string(),
        seq: m.seq.unwrap_or_default(),
        created_at_ms: m.created_at,
    }
}

/// What `m`'s content is bound to at `seq`.
pub(crate) fn binding(m: &StoredMessage, seq: u64) -> MessageBinding<'_> {
    MessageBinding {
        message_id: m.id.as_str(),
        group_id: m.group_id.as_str(),
        sender_id: m.sender_id.as_str(),
        seq,
    }
}

/// The members other than `sender` that `text` mentions (`@user`); a
/// name that is no member is plain text. Members cached are not read
/// again; one name that is not is one membership check, more are one read
/// of the group's members, so a text of many made-up names costs one read.
async fn mentioned(
    s: &State,
    group: &GroupId,
    sender: &UserId,
    text: &str,
) -> Result<Vec<UserId>, WorkerError> {
    let generation = s.bus.generation();
    let mut candidates = chat_domain::mention_candidates(text);
    candidates.retain(|user| user != sender);
    let unknown: Vec<UserId> = candidates
        .iter()
        .filter(|user| s.members.visible_from(group, user, generation).is_none())
        .cloned()
        .collect();
    let not_members: Vec<UserId> = match unknown.as_slice() {
        [] => Vec::new(),
        [user] => match s.check_member(user, group).await {
            Ok(_) => Vec::new(),
            Err(WorkerError::Domain(DomainError::Forbidden(_))) => unknown,
            Err(e) => return Err(e),
        },
        _ => {
            let ticket = s.members.ticket(generation);
            let found = s
                .store
                .groups
                .members_among(group, &unknown)
                .await?
                .ok_or(WorkerError::NotFound("group"))?;
            for (user, visible_from) in &found {
                s.members.remember(group, user, *visible_from, ticket);
            }
            unknown
                .into_iter()
                .filter(|user| !found.iter().any(|(member, _)| member == user))
                .collect()
        }
    };
    // in the text's order
    candidates.retain(|user| !not_members.contains(user));
    Ok(candidates)
}

/// What became of an earlier attempt of a send.
enum Earlier {
    /// It landed: its ack.
    Landed(pb::SendMessageResponse),
    /// It certainly never landed: publish under its id again.
    Lost(MessageId),
}

/// A send whose client id is in the send log already: the earlier attempt's
/// ack if it landed (from MongoDB, else from the stream), `Lost` if it never
/// did and is old enough to be sure, `unavailable` while it may still be
/// under way.
async fn earlier_attempt(
    s: &State,
    group: &GroupId,
    earlier: &SendRecord,
) -> Result<Earlier, WorkerError> {
    let id = parse_id::<MessageId>(&earlier.message_id)?;
    match s.store.messages.get(&id).await {
        Ok(Some(m)) if m.is_committed() && &m.group_id == group => {
            return Ok(Earlier::Landed(ack(&m)));
        }
        Ok(_) => {}
        // the stream answers as well
        Err(e) => tracing::debug!(message = %id, error = %e, "reading the stream instead"),
    }
    // an attempt lands within the settle delay of its start or never (the
    // assumption `Lost` rests on too), so the scan stops a minute after that
    let settle = s.config.resolve_pending_after;
    let until = earlier.at + settle.as_millis() as i64 + 60_000;
    if let Some((p, env)) = s
        .bus
        .find_group_message(group, &id, earlier.after_stream_seq, Some(until))
        .await?
    {
        return Ok(Earlier::Landed(pb::SendMessageResponse {
            message_id: env.message_id,
            group_id: env.group_id,
            seq: p.seq,
            created_at_ms: env.created_at,
        }));
    }
    // a publish made during a disconnect can sit in the client's buffer and
    // go out after the reconnect: decide only once that cannot be
    let young = now_millis() - earlier.at < settle.as_millis() as i64;
    if young || s.bus.up_for().is_none_or(|up| up < settle) {
        return Err(unavailable("this message is still being sent; retry later"));
    }
    Ok(Earlier::Lost(id))
}

/// For a send whose send log entry proves nothing
/// ([`chat_bus::SendLog::conclusive`]: a late retry, or a client clock
/// behind; the entry is new, or names an attempt found lost): the original
/// ack if MongoDB holds the message under its client id, with the entry at
/// `revision` pointed at it; `None` if it was never sent (or the entry
/// proves that). First makes sure MongoDB holds every message an earlier
/// attempt could be (else `unavailable`: the retry is answered once it
/// does), then reads it: in that order, so a message persisted between the
/// two cannot be missed.
async fn sent_earlier(
    s: &State,
    group: &GroupId,
    sender: &UserId,
    client: &ClientMsgId,
    now: i64,
    revision: u64,
) -> Result<Option<pb::SendMessageResponse>, WorkerError> {
    if s.sends.conclusive(client, now) {
        return Ok(None);
    }
    let check = |outcome: &'static str| {
        metrics::counter!("chat_send_log_history_checks_total", "outcome" => outcome).increment(1);
    };
    // as of the last read of the backlog (every second): no JetStream call
    // per send, however many such sends come
    if s.log_room
        .persisted_until()
        .is_none_or(|t| t < s.sends.persisted_before(now))
    {
        check("behind");
        return Err(unavailable(
            "cannot tell yet whether this message was sent before; retry later",
        ));
    }
    let Some(m) = s.store.messages.sent_with(group, sender, client).await? else {
        check("new");
        return Ok(None);
    };
    check("sent");
    // best effort: without it, the entry names an attempt that never went
    // out, which the next retry finds lost and asks MongoDB about again
    let record = SendRecord {
        message_id: m.id.to_string(),
        after_stream_seq: m.stream_seq.unwrap_or(0).saturating_sub(1),
        at: m.created_at,
    };
    let key = send_key(group, sender, client);
    let ttl = s.sends.lifetime(client, now);
    if let Err(e) = s.sends.renew(&key, &record, revision, ttl).await {
        tracing::debug!(message = %m.id, error = %e, "send log entry not renewed");
    }
    Ok(Some(ack(&m)))
}

/// The senders of `group`'s messages with seq in `(lo, hi]`, once
/// persistence has caught up with them, or after a short wait what is there:
/// the watermarks themselves are stored exactly either way, but while
/// persistence is far behind, a sender may miss the push for messages not
/// written yet (the status endpoint stays exact). Waiting longer made the
/// receipts' polling compete with the writes they wait for.
async fn senders_between(
    s: &State,
    group: &GroupId,
    lo: u64,
    hi: u64,
) -> Result<Vec<(u64, UserId)>, WorkerError> {
    let all = read_caught_up(
        s,
        group,
        RECEIPTS_WAIT,
        || async { Ok(s.store.messages.senders_by_seq(group, lo, hi).await?) },
        |found| found.len() as u64 >= hi - lo,
    )
    .await;
    match all {
        Ok(found) => Ok(found),
        Err(_) => {
            tracing::warn!(group = %group, lo, hi, "receipts for messages not persisted yet");
            Ok(s.store.messages.senders_by_seq(group, lo, hi).await?)
        }
    }
}

/// Most messages whose senders one raise of watermarks reads to tell them:
/// a member's first receipt after a long absence covers everything since,
/// and only the senders of the newest this many hear of it (the status
/// endpoint stays exact for all).
const PUSHED_AT_MOST: u64 = 10_000;

/// Where the messages whose senders are told of a raise over `(lo, hi]`
/// start: at most [`PUSHED_AT_MOST`] of them, the newest.
fn pushed_from(lo: u64, hi: u64) -> u64 {
    lo.max(hi.saturating_sub(PUSHED_AT_MOST))
}

/// Raises members' watermarks, each (member, delivered, read), and
/// tells the senders concerned; returns the members' read watermarks
/// after.
pub(crate) async fn raise(
    s: &State,
    group: &GroupId,
    raises: &[(UserId, u64, u64)],
) -> Result<Vec<(UserId, u64)>, WorkerError> {
    let all = s
        .store
        .messages
        .raise_receipts(group, raises, now_millis())
        .await?;
    let reads: Vec<(UserId, u64)> = all
        .iter()
        .map(|(u, _, a)| (u.clone(), a.read_seq))
        .collect();
    let risen: Vec<_> = all.into_iter().filter(|(_, b, a)| b != a).collect();
    // every message newly covered, in one ranged read for all members
    let range = |b: &chat_store::Receipt, a: &chat_store::Receipt| {
        let lo = if a.read_seq > b.read_seq {
            b.read_seq
        } else {
            b.delivered_seq
        };
        (lo, a.delivered_seq)
    };
    let lo = risen.iter().map(|(_, b, a)| range(b, a).0).min();
    let hi = risen.iter().map(|(_, b, a)| range(b, a).1).max();
    let mut senders = match (lo, hi) {
        (Some(lo), Some(hi)) if hi > lo => {
            senders_between(s, group, pushed_from(lo, hi), hi).await?
        }
        _ => Vec::new(),
    };
    // a sender no longer a member hears nothing more of the group: not
    // even how far the others read
    let members = still_members(s, group, senders.iter().map(|(_, u)| u)).await;
    senders.retain(|(_, sender)| members.contains(sender));
    for (user, before, after) in &risen {
        let (lo, hi) = range(before, after);
        let mut to: Vec<&UserId> = senders
            .iter()
            .filter(|(seq, sender)| *seq > lo && *seq <= hi && sender != user)
            .map(|(_, sender)| sender)
            .collect();
        to.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        to.dedup();
        if to.is_empty() {
            continue;
        }
        let data = MessageStatusPush {
            group_id: group.to_string(),
            user_id: user.to_string(),
            delivered_seq: after.delivered_seq,
            read_seq: after.read_seq,
        };
        let payload = Bytes::from(
            push_json(event::MESSAGE_STATUS, &data)
                .map_err(|e| DomainError::Invalid(e.to_string()))?,
        );
        // one core NATS message per member risen (per 100 senders), not a
        // stored notification per member and sender: a status is a
        // watermark, live only (the status endpoint is the record)
        s.bus.status(group, &to, payload).await?;
    }
    Ok(reads)
}

/// Which of `users` are members of `group`: from the membership cache,
/// and one read of the group for those it does not hold. If that read
/// fails, the ones it was for count as gone (they miss a receipt, nothing
/// more: the watermarks are stored already).
async fn still_members<'a>(
    s: &State,
    group: &GroupId,
    users: impl Iterator<Item = &'a UserId>,
) -> HashSet<UserId> {
    let generation = s.bus.generation();
    let mut members = HashSet::new();
    let mut unknown = HashSet::new();
    for user in users {
        if members.contains(user) || unknown.contains(user) {
            continue;
        }
        if s.members.visible_from(group, user, generation).is_some() {
            members.insert(user.clone());
        } else {
            unknown.insert(user.clone());
        }
    }
    if unknown.is_empty() {
        return members;
    }
    match s.load(group).await {
        Ok(record) => members.extend(unknown.into_iter().filter(|u| record.group.is_member(u))),
        Err(e) => {
            tracing::warn!(group = %group, error = %e, "cannot tell which senders are members; their receipts are not pushed");
        }
    }
    members
}

impl MessagesService {
    async fn send(
        &self,
        req: pb::SendMessageRequest,
    ) -> Result<pb::SendMessageResponse, WorkerError> {
        let s = &self.0;
        let sender = parse_id::<UserId>(&req.caller)?;
        let group = parse_id::<GroupId>(&req.group_id)?;
        let client_id = parse_id::<ClientMsgId>(&req.client_msg_id)?;
        let upload_key = req
            .media
            .as_ref()
            .map(|m| m.key.clone())
            .unwrap_or_default();
        let kind = MessageKind::parse(&req.r#type)?;
        if kind == MessageKind::Text {
            check_text(&req.text, &s.config.limits)?;
        } else if !req.text.is_empty() {
            return Err(DomainError::Invalid(format!(
                "a {} message carries media, not text",
                kind.as_str()
            ))
            .into());
        }
        let started = std::time::Instant::now();
        s.check_member(&sender, &group).await?;
        let mentions = if kind == MessageKind::Text {
            mentioned(s, &group, &sender, &req.text).await?
        } else {
            Vec::new()
        };
        let checked = started.elapsed();

        // the send log decides whether this is a retry: one JetStream write
        let key = send_key(&group, &sender, &client_id);
        let after = lower_bound(s, &group).await?;
        let now = now_millis();
        let ttl = s.sends.lifetime(&client_id, now);
        let record = SendRecord {
            message_id: MessageId::generate().to_string(),
            after_stream_seq: after,
            at: now,
        };
        let (id, after, reservation) = match s.sends.claim(&key, &record, ttl).await? {
            Claimed::New { revision } => {
                // which clients keep keys in nats-server's memory all window
                let lifetime = if ttl.is_some() { "short" } else { "window" };
                metrics::counter!("chat_send_log_entries_total", "lifetime" => lifetime)
                    .increment(1);
                let reservation = Reservation::new(s.sends.clone(), key.clone(), revision);
                // an earlier attempt's entry may have expired: MongoDB knows
                match sent_earlier(s, &group, &sender, &client_id, now, revision).await {
                    Ok(None) => {}
                    Ok(Some(done)) => {
                        reservation.keep();
                        return Ok(done);
                    }
                    Err(e) => {
                        reservation.release().await;
                        return Err(e);
                    }
                }
                (
                    parse_id::<MessageId>(&record.message_id)?,
                    after,
                    Some(reservation),
                )
            }
            Claimed::Earlier {
                record: earlier,
                revision,
            } => match earlier_attempt(s, &group, &earlier).await? {
                Earlier::Landed(done) => return Ok(done),
                Earlier::Lost(id) => {
                    // the entry may be a late retry's that never went out,
                    // left behind an expired one's that did: MongoDB knows
                    if let Some(done) =
                        sent_earlier(s, &group, &sender, &client_id, now, revision).await?
                    {
                        return Ok(done);
                    }
                    // a new revision before it goes out again: a late
                    // give-back of the lost attempt can no longer take the
                    // entry out (a retry after that would be a duplicate)
                    if s.sends
                        .renew(&key, &earlier, revision, ttl)
                        .await?
                        .is_none()
                    {
                        return Err(unavailable("this message is being sent again; retry later"));
                    }
                    (id, earlier.after_stream_seq, None)
                }
            },
        };
        // room in the log for a new message (a retry of one that landed
        // has its answer above, full or not)
        let cost = crate::backlog::LogRoom::cost(req.text.len());
        if let Err(e) = s.log_room.check(cost) {
            if let Some(r) = reservation {
                r.release().await;
            }
            return Err(e);
        }
        let logged = started.elapsed();
        // before the media is claimed: a reply to nothing claims nothing
        let (reply_to, joined_only) = if req.reply_to.is_empty() {
            (None, false)
        } else {
            let (reply, joined) = self.answered(&sender, &group, &req.reply_to).await?;
            (Some(reply), joined)
        };
        let unsealed = Unsealed {
            mentions,
            // the edge writes it without the reply for a member who joined
            // after the message it answers
            joined_only,
        };
        let content = if kind == MessageKind::Text {
            Content {
                text: Some(req.text),
                media: None,
                reply_to,
            }
        } else {
            Content {
                text: None,
                media: Some(check_media(s, &group, kind, req.media).await?),
                reply_to,
            }
        };
        // until the publish is under way, a failure gives the upload back
        // (and deletes its copy): the client may send it again
        let claim = content
            .media
            .as_ref()
            .and_then(|m| media::Claim::new(s, &upload_key, &m.key));
        let plaintext =
            serde_json::to_vec(&content).map_err(|e| DomainError::Invalid(e.to_string()))?;
        if !s.bus.is_connected() {
            // certain failure: nothing was sent, so give everything back at
            // once rather than let the client buffer a publish for later
            return Err(unavailable("nats is not connected"));
        }
        // the upload and the send log entry go with the message: kept once
        // it goes out (the outcome may be uncertain from there, and a retry
        // finds out), given back if it certainly never does
        let taken = Taken {
            entry: reservation,
            upload: claim,
        };
        let mut m = StoredMessage {
            id,
            group_id: group,
            sender_id: sender,
            client_msg_id: client_id,
            kind: kind.as_str().to_owned(),
            // sealed at each publish attempt, for its seq
            key_id: s.keys.current_id().to_owned(),
            nonce: Vec::new(),
            ciphertext: Vec::new(),
            binding: BINDING_V2,
            seq: None,
            stream_seq: None,
            created_at: now_millis(),
            edited_at: None,
            deleted_at: None,
            version: 0,
        };
        let prepared = started.elapsed();
        let p = match publish_new(s, &m, plaintext, unsealed, after, taken).await {
            Ok(p) => p,
            Err(e) => {
                // uncertain: a retry with the same client id settles it
                tracing::warn!(message = %m.id, error = %e, "publish failed or is uncertain");
                return Err(e);
            }
        };
        s.log_room.published(cost);
        let total = started.elapsed();
        // where a send's time goes (BENCHMARKS.md reads these)
        let stage = |name: &'static str, d: std::time::Duration| {
            metrics::histogram!("chat_send_stage_seconds", "stage" => name).record(d);
        };
        stage("membership", checked);
        stage("send_log", logged.saturating_sub(checked));
        stage("publish", total.saturating_sub(prepared));
        stage("total", total);
        tracing::debug!(
            checked_ms = checked.as_secs_f64() * 1e3,
            logged_ms = logged.as_secs_f64() * 1e3,
            published_ms = total.as_secs_f64() * 1e3,
            "send timings"
        );
        m.seq = Some(p.seq);
        metrics::counter!("chat_messages_sent_total").increment(1);
        tracing::debug!(message = %m.id, group = %m.group_id, seq = p.seq, "message sent");
        Ok(ack(&m))
    }

    /// The message `id` of `group` that `caller` answers, as a reply
    /// shows it, and whether the group has `joined` history: one read of
    /// the message (waiting for persistence if it is that new). A message
    /// the caller cannot see is not found.
    async fn answered(
        &self,
        caller: &UserId,
        group: &GroupId,
        id: &str,
    ) -> Result<(ReplyView, bool), WorkerError> {
        let m = match self.committed_in(caller, group, id).await {
            Err(WorkerError::NotFound(_)) => {
                return Err(WorkerError::NotFound("message to reply to"));
            }
            Ok(m) if m.is_deleted() => return Err(WorkerError::NotFound("message to reply to")),
            other => other?,
        };
        let opened = open(&self.0, &m).map_err(|e| unavailable(e.message().to_owned()))?;
        // under `joined` history a member who joined after the answered
        // message must not read it through the reply: no preview there
        let joined = self.0.history(group).await? == chat_domain::History::Joined;
        let reply = ReplyView {
            message_id: opened.message_id,
            seq: opened.seq,
            sender_id: opened.sender_id,
            kind: opened.r#type,
            preview: Some(opened.text)
                .filter(|t| !t.is_empty() && !joined)
                .map(|t| reply_preview(&t)),
            deleted: false,
        };
        Ok((reply, joined))
    }

    /// Edits (`Some(text)`) or deletes message `id` of `group` for
    /// `caller`: checks who may, then publishes the change on the group's
    /// message subject, where it has its place in the group's order (live,
    /// catch-up, and the persist loop that applies it to MongoDB).
    /// Idempotent: deleting a deleted message, or setting the text it
    /// has, publishes nothing again.
    async fn change(
        &self,
        caller: &str,
        group: &str,
        id: &str,
        text: Option<String>,
    ) -> Result<pb::ChangeResponse, Status> {
        let caller = &parse_id::<UserId>(caller)?;
        let group = &parse_id::<GroupId>(group)?;
        Ok(self.change_as(caller, group, id, text).await?)
    }

    async fn change_as(
        &self,
        caller: &UserId,
        group: &GroupId,
        id: &str,
        text: Option<String>,
    ) -> Result<pb::ChangeResponse, WorkerError> {
        let s = &self.0;
        if let Some(text) = &text {
            check_text(text, &s.config.limits)?;
        }
        // decided on what MongoDB holds, so it must hold every earlier
        // change of the message: each change is acknowledged only once
        // applied, and under the group's slot this worker waits for its
        // own change of the message still in flight. (Two requests on two
        // workers for one message in the same few milliseconds can still
        // cross: MongoDB ends with the stream's order, and clients ignore
        // an edit of a tombstone.)
        let message_id = parse_id::<MessageId>(id)?;
        // a member before anything is kept for the group: a stranger's
        // requests naming made-up groups would fill the positions (and
        // clear them, with every group's change order) otherwise
        s.check_member(caller, group).await?;
        let slot = s.positions.slot(group);
        // waiting outside the slot, which the group's sends share
        let mut waited = 0;
        let mut cached = loop {
            let own = slot.last_change(&message_id).unwrap_or(0);
            if own > waited {
                persist::persisted_through(s, own).await?;
                waited = own;
            }
            let cached = slot.position.lock().await;
            if slot.last_change(&message_id).unwrap_or(0) <= waited {
                break cached;
            }
        };
        // a member, and a message it can see, persisted
        let m = self.committed_in(caller, group, id).await?;
        let seq = m.seq.unwrap_or_default();
        let done = |at: i64| pb::ChangeResponse {
            message_id: m.id.to_string(),
            group_id: group.to_string(),
            seq,
            changed_at_ms: at,
        };
        let (owner, history) = s.settings(group).await?;
        let now = now_millis();
        // an edit's de-duplication id names the version it changes and its
        // text, so a retry of the same edit is one change in the stream
        // (within its duplicate window; after that the text is already
        // there, below), and going back to an earlier text is another
        let (change, sealed, msg_id) = match text {
            Some(text) => {
                if m.is_deleted() {
                    return Err(WorkerError::NotFound("message"));
                }
                if &m.sender_id != caller {
                    return Err(forbidden("only its sender edits a message"));
                }
                if m.kind != MessageKind::Text.as_str() {
                    return Err(
                        DomainError::Invalid("only text messages can be edited".into()).into(),
                    );
                }
                let window = s.config.edit_window;
                if window.is_zero() || now.saturating_sub(m.created_at) > window.as_millis() as i64
                {
                    return Err(forbidden(format!(
                        "a message can be edited for {} s after it was sent",
                        window.as_secs()
                    )));
                }
                let mut content = open_content(s, &m)?;
                if content.text.as_deref() == Some(text.as_str()) {
                    return Ok(done(m.edited_at.unwrap_or(m.created_at)));
                }
                let msg_id = {
                    use sha2::Digest;
                    let digest = sha2::Sha256::digest(text.as_bytes());
                    format!("{}.edit.{}.{}", m.id, m.version, hex::encode(&digest[..12]))
                };
                content.text = Some(text);
                let plaintext = serde_json::to_vec(&content)
                    .map_err(|e| DomainError::Invalid(e.to_string()))?;
                let sealed = s.keys.seal(&plaintext, &binding(&m, seq).aad(BINDING_V2));
                (chat_bus::Change::Edit, Some(sealed), msg_id)
            }
            None => {
                if let Some(at) = m.deleted_at {
                    // a retry: it finishes what the first call may not have
                    crate::groups::unpin_deleted(s, caller, group, &m.id).await;
                    return Ok(done(at));
                }
                if &m.sender_id != caller && &owner != caller {
                    return Err(forbidden(
                        "only its sender or the group's owner deletes a message",
                    ));
                }
                (chat_bus::Change::Delete, None, format!("{}.delete", m.id))
            }
        };
        let (key_id, nonce, ciphertext) = match sealed {
            Some(sealed) => (
                sealed.key_id,
                B64.encode(&sealed.nonce),
                B64.encode(&sealed.ciphertext),
            ),
            None => Default::default(),
        };
        let envelope = Envelope {
            message_id: m.id.to_string(),
            group_id: group.to_string(),
            seq,
            sender_id: m.sender_id.to_string(),
            client_msg_id: String::new(),
            kind: m.kind.clone(),
            created_at: now,
            key_id,
            nonce,
            ciphertext,
            binding: BINDING_V2,
            mentions: Vec::new(),
            change: Some(change),
            changed_by: caller.to_string(),
            joined_only: history == chat_domain::History::Joined,
        };
        // an edit needs room in the log; a delete is let through (small,
        // and what a user asks to be gone should go)
        let cost = crate::backlog::LogRoom::cost_sealed(envelope.ciphertext.len() as u64);
        if change == chat_bus::Change::Edit {
            s.log_room.check(cost)?;
        }
        let published = publish_locked(
            s,
            &slot,
            &mut cached,
            Publishing::Change {
                envelope: &envelope,
                msg_id: &msg_id,
            },
            0,
        )
        .await?;
        s.log_room.published(cost);
        slot.changed(&m.id, published.stream_seq);
        drop(cached);
        // acknowledged once applied, so that what the caller reads next
        // (history, a download of deleted media) shows it: a change takes
        // no seq, so history cannot tell by its page that one is missing
        persist::persisted_through(s, published.stream_seq).await?;
        slot.applied(&m.id, published.stream_seq);
        metrics::counter!("chat_message_changes_total", "change" => match change {
            chat_bus::Change::Edit => "edit",
            chat_bus::Change::Delete => "delete",
        })
        .increment(1);
        tracing::debug!(message = %m.id, group = %group, ?change, "message changed");
        if change == chat_bus::Change::Delete {
            // a deleted message is pinned no more
            crate::groups::unpin_deleted(s, caller, group, &m.id).await;
        }
        Ok(done(now))
    }

    pub(crate) async fn committed_in(
        &self,
        caller: &UserId,
        group: &GroupId,
        id: &str,
    ) -> Result<StoredMessage, WorkerError> {
        let id = parse_id::<MessageId>(id)?;
        let s = &self.0;
        let from = s.check_member(caller, group).await?;
        // a message delivered a moment ago may not be in MongoDB yet: wait
        // while persistence is behind the stream for this group
        let found = read_caught_up(
            s,
            group,
            CATCH_UP,
            || async {
                Ok(s.store
                    .messages
                    .get(&id)
                    .await?
                    .filter(|m| &m.group_id == group && m.is_committed()))
            },
            Option::is_some,
        )
        .await?;
        // a message from before the caller joined does not exist for it
        found
            .filter(|m| m.seq.is_some_and(|seq| seq > from))
            .ok_or(WorkerError::NotFound("message"))
    }
}

/// Replies in a page show what they answer as it is now: a preview of the
/// edited text, or none for a deleted message (one read, for pages with
/// replies; history and `GET /groups`' last messages).
pub(crate) async fn answered_now(
    s: &State,
    page: &mut [pb::ChatMessage],
) -> Result<(), WorkerError> {
    let ids: Vec<MessageId> = page
        .iter()
        .filter_map(|m| m.reply_to.as_ref())
        .filter_map(|r| MessageId::parse(r.message_id.as_str()).ok())
        .collect();
    let changed: HashMap<String, (StoredMessage, Option<String>)> = changed_answers(s, &ids)
        .await?
        .into_iter()
        .map(|c| (c.0.id.to_string(), c))
        .collect();
    for m in page.iter_mut() {
        let Some(r) = m.reply_to.as_mut() else {
            continue;
        };
        match changed.get(&r.message_id) {
            // (replies answer messages of their own group)
            Some((t, _)) if t.group_id.as_str() != m.group_id => {}
            Some((_, None)) => {
                r.preview = String::new();
                r.deleted = true;
            }
            // (a reply under `joined` history carries no preview at all)
            Some((_, Some(preview))) if !r.preview.is_empty() => r.preview = preview.clone(),
            Some(_) | None => {}
        }
    }
    Ok(())
}

/// The messages among `ids` edited or deleted since they were sent, each
/// with the preview a reply shows of it now (`None`: deleted). One read;
/// none for no ids.
async fn changed_answers(
    s: &State,
    ids: &[MessageId],
) -> Result<Vec<(StoredMessage, Option<String>)>, WorkerError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let refs: Vec<&MessageId> = ids.iter().collect();
    let mut changed = Vec::new();
    for t in s.store.messages.get_many(&refs).await? {
        let now = if t.is_deleted() {
            None
        } else if t.edited_at.is_some() {
            Some(reply_preview(
                &open_content(s, &t)?.text.unwrap_or_default(),
            ))
        } else {
            continue;
        };
        changed.push((t, now));
    }
    Ok(changed)
}

/// The sealed content of a stored message, opened.
pub(crate) fn open_content(s: &State, m: &StoredMessage) -> Result<Content, WorkerError> {
    let sealed = Sealed {
        key_id: m.key_id.clone(),
        nonce: m.nonce.clone(),
        ciphertext: m.ciphertext.clone(),
    };
    let aad = binding(m, m.seq.unwrap_or_default()).aad(m.binding);
    match s
        .keys
        .open(&sealed, &aad)
        .map(|p| serde_json::from_slice(&p))
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(DomainError::Invalid(format!("message {} content: {e}", m.id)).into()),
        Err(e) => {
            tracing::error!(message = %m.id, error = %e, "cannot decrypt a stored message");
            Err(WorkerError::Store(StoreError::Corrupt {
                id: m.id.to_string(),
                message: "cannot be decrypted".into(),
            }))
        }
    }
}

/// A stored message as clients see it, decrypted (a deleted one as its
/// tombstone).
pub(crate) fn open(s: &State, m: &StoredMessage) -> Result<pb::ChatMessage, Status> {
    let content = if m.is_deleted() {
        Content {
            text: None,
            media: None,
            reply_to: None,
        }
    } else {
        open_content(s, m).map_err(status)?
    };
    Ok(pb::ChatMessage {
        message_id: m.id.to_string(),
        group_id: m.group_id.to_string(),
        seq: m.seq.unwrap_or_default(),
        sender_id: m.sender_id.to_string(),
        r#type: m.kind.clone(),
        text: content.text.unwrap_or_default(),
        created_at_ms: m.created_at,
        media: content.media.map(|m| pb::MediaRef {
            key: m.key,
            mime: m.mime,
            size: m.size,
        }),
        reply_to: content.reply_to.map(|r| pb::ReplyRef {
            message_id: r.message_id,
            seq: r.seq,
            sender_id: r.sender_id,
            r#type: r.kind,
            preview: r.preview.unwrap_or_default(),
            deleted: r.deleted,
        }),
        // filled in by history, per caller
        reactions: Vec::new(),
        edited_at_ms: m.edited_at.unwrap_or_default(),
        deleted: m.is_deleted(),
        deleted_at_ms: m.deleted_at.unwrap_or_default(),
    })
}

fn status(e: WorkerError) -> Status {
    e.into()
}

#[tonic::async_trait]
impl Messages for MessagesService {
    async fn send(
        &self,
        req: Request<pb::SendMessageRequest>,
    ) -> Result<Response<pb::SendMessageResponse>, Status> {
        Ok(Response::new(
            MessagesService::send(self, req.into_inner()).await?,
        ))
    }

    async fn acknowledge(
        &self,
        req: Request<pb::AcknowledgeRequest>,
    ) -> Result<Response<pb::AcknowledgeResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let group = parse_id::<GroupId>(&req.group_id)?;
        let m = self.committed_in(&caller, &group, &req.message_id).await?;
        let seq = m.seq.unwrap_or_default();
        // the watermark after, which an earlier, higher ack may have set
        let read_seq = raise(&self.0, &group, &[(caller.clone(), seq, seq)])
            .await?
            .first()
            .map_or(seq, |(_, r)| *r);
        Ok(Response::new(pb::AcknowledgeResponse { read_seq }))
    }

    async fn mark_delivered(
        &self,
        req: Request<pb::MarkDeliveredRequest>,
    ) -> Result<Response<pb::MarkDeliveredResponse>, Status> {
        let req = req.into_inner();
        let group = parse_id::<GroupId>(&req.group_id)?;
        let raises: Vec<(UserId, u64, u64)> = if req.members.is_empty() {
            vec![(parse_id::<UserId>(&req.caller)?, req.seq, 0)]
        } else {
            req.members
                .iter()
                .map(|m| Ok((parse_id::<UserId>(&m.user_id)?, m.seq, 0)))
                .collect::<Result<_, WorkerError>>()?
        };
        // a former member may still flush what reached it before removal
        raise(&self.0, &group, &raises).await?;
        Ok(Response::new(pb::MarkDeliveredResponse {}))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        let req = req.into_inner();
        let s = &self.0;
        let caller = parse_id::<UserId>(&req.caller)?;
        let group = parse_id::<GroupId>(&req.group_id)?;
        // under `joined` history the page stops at the caller's join
        let from = s.check_member(&caller, &group).await?;
        let limit = req.limit.clamp(1, MAX_HISTORY_PAGE);
        let before = (req.before > 0).then_some(req.before);
        let tail_seq = tail_seq(s, &group).await?;
        let stored = caught_up_page(s, &group, from, before, limit, tail_seq, CATCH_UP).await?;
        let mut messages = stored
            .iter()
            .map(|m| open(s, m))
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<&MessageId> = stored.iter().map(|m| &m.id).collect();
        dress(s, &caller, from, &ids, &mut messages).await?;
        Ok(Response::new(pb::HistoryResponse { messages }))
    }

    async fn search(
        &self,
        req: Request<pb::SearchRequest>,
    ) -> Result<Response<pb::SearchResponse>, Status> {
        let req = req.into_inner();
        let s = &self.0;
        let caller = parse_id::<UserId>(&req.caller)?;
        let group = parse_id::<GroupId>(&req.group_id)?;
        let query = chat_domain::SearchQuery::parse(&req.query).map_err(WorkerError::from)?;
        // under `joined` history the search stops at the caller's join
        let from = s.check_member(&caller, &group).await?;
        let limit = req.limit.clamp(1, MAX_SEARCH_PAGE) as usize;
        let tail_seq = tail_seq(s, &group).await?;
        // one wait for persistence for the whole call, not one per read
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        let mut before = (req.before > 0).then_some(req.before);
        let mut left = s.config.max_search_scan.max(1);
        let (mut opened, mut opened_bytes) = (0u32, 0u64);
        let mut found: Vec<(MessageId, pb::ChatMessage)> = Vec::new();
        let next = 'scan: loop {
            let chunk = left.min(SEARCH_CHUNK);
            let within = deadline.saturating_duration_since(tokio::time::Instant::now());
            let page = caught_up_page(s, &group, from, before, chunk, tail_seq, within).await?;
            for m in &page {
                left -= 1;
                let seq = m.seq.unwrap_or_default();
                before = Some(seq);
                if m.is_deleted() {
                    continue;
                }
                opened += 1;
                opened_bytes += m.ciphertext.len() as u64;
                match open(s, m) {
                    Ok(o) if query.matches(&o.text) => {
                        found.push((m.id.clone(), o));
                        if found.len() == limit {
                            break 'scan seq;
                        }
                    }
                    Ok(_) => {}
                    // one message that cannot be opened must not end every
                    // search over it (history shows the error)
                    Err(e) => {
                        tracing::warn!(group = %group, message = %m.id, error = %e, "search skips a message it cannot open");
                    }
                }
                if opened_bytes >= SEARCH_BYTES {
                    break 'scan seq;
                }
            }
            if page.len() < chunk as usize {
                // nothing older that the caller sees
                break 0;
            }
            if left == 0 {
                break before.unwrap_or_default();
            }
        };
        let (ids, mut messages): (Vec<MessageId>, Vec<pb::ChatMessage>) = found.into_iter().unzip();
        dress(
            s,
            &caller,
            from,
            &ids.iter().collect::<Vec<_>>(),
            &mut messages,
        )
        .await?;
        metrics::counter!("chat_search_opened_total").increment(u64::from(opened));
        Ok(Response::new(pb::SearchResponse {
            messages,
            next,
            opened,
            opened_bytes,
        }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let group = parse_id::<GroupId>(&req.group_id)?;
        let m = self.committed_in(&caller, &group, &req.message_id).await?;
        let seq = m.seq.unwrap_or_default();
        let record = self.0.load_as_member(&caller, &group).await?;
        let receipts: HashMap<UserId, chat_store::Receipt> = self
            .0
            .store
            .messages
            .receipts(&group)
            .await
            .map_err(WorkerError::from)?
            .into_iter()
            .collect();
        let g = &record.group;
        let members = g
            .members
            .iter()
            .map(|member| {
                let u = &member.user_id;
                // a member that cannot see the message (added after it,
                // under `joined` history) has neither received nor read
                // it, however far its watermarks rose since
                let r = if g.view_of(member) < seq {
                    receipts.get(u).copied().unwrap_or_default()
                } else {
                    chat_store::Receipt::default()
                };
                let own = u == &m.sender_id;
                pb::MemberStatus {
                    user_id: u.to_string(),
                    delivered: own || r.delivered_seq >= seq,
                    read: own || r.read_seq >= seq,
                    updated_at_ms: if own { m.created_at } else { r.updated_at },
                }
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            message_id: m.id.to_string(),
            seq,
            members,
        }))
    }

    async fn react(
        &self,
        req: Request<pb::ReactRequest>,
    ) -> Result<Response<pb::ReactResponse>, Status> {
        let req = req.into_inner();
        let s = &self.0;
        let caller = parse_id::<UserId>(&req.caller)?;
        let group = parse_id::<GroupId>(&req.group_id)?;
        chat_domain::check_emoji(&req.emoji).map_err(WorkerError::from)?;
        // a member, and a message it can see (not a tombstone)
        let m = self.committed_in(&caller, &group, &req.message_id).await?;
        if m.is_deleted() {
            return Err(WorkerError::NotFound("message").into());
        }
        let (count, changed) = match s
            .store
            .reactions
            .set(&group, &m.id, &caller, &req.emoji, req.on)
            .await
            .map_err(WorkerError::from)?
        {
            chat_store::Reacted::Count(n) => (n, true),
            // a repeat tells nobody anything
            chat_store::Reacted::Unchanged(n) => (n, false),
            chat_store::Reacted::Limit(chat_store::ReactionLimit::Message) => {
                return Err(WorkerError::from(DomainError::TooLarge(format!(
                    "a message has at most {} different reactions",
                    chat_domain::REACTIONS_PER_MESSAGE_MAX
                )))
                .into());
            }
            chat_store::Reacted::Limit(chat_store::ReactionLimit::User) => {
                return Err(WorkerError::from(DomainError::TooLarge(format!(
                    "you have at most {} reactions on a message",
                    chat_domain::REACTIONS_PER_USER_MAX
                )))
                .into());
            }
        };
        // every connected member hears of it (the reactor's other
        // connections too); a signal lost on the way is made good by the
        // next one (counts are absolute) or by history
        let push = chat_protocol::ReactionPush {
            group_id: group.to_string(),
            message_id: m.id.to_string(),
            seq: m.seq.unwrap_or_default(),
            emoji: req.emoji.clone(),
            user_id: caller.to_string(),
            added: req.on,
            count,
        };
        match push_json(event::REACTION, &push) {
            Ok(_) if !changed => {}
            // members who joined after the message must not learn of it
            Ok(frame) => match s.history(&group).await {
                // (a committed message always has its seq)
                Ok(chat_domain::History::Joined) if m.seq.is_none() => {}
                Ok(history) => {
                    let about = m.seq.filter(|_| history == chat_domain::History::Joined);
                    if let Err(e) = s.bus.signal(&group, None, about, frame.into()).await {
                        tracing::warn!(group = %group, error = %e, "reaction not announced");
                    }
                }
                Err(e) => tracing::warn!(group = %group, error = %e, "reaction not announced"),
            },
            Err(e) => tracing::error!(error = %e, "reaction push not serialised"),
        }
        metrics::counter!("chat_reactions_total", "on" => if req.on { "add" } else { "remove" })
            .increment(1);
        Ok(Response::new(pb::ReactResponse { count }))
    }

    async fn edit(
        &self,
        req: Request<pb::EditRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let req = req.into_inner();
        let done = self
            .change(&req.caller, &req.group_id, &req.message_id, Some(req.text))
            .await?;
        Ok(Response::new(done))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::ChangeResponse>, Status> {
        let req = req.into_inner();
        let done = self
            .change(&req.caller, &req.group_id, &req.message_id, None)
            .await?;
        Ok(Response::new(done))
    }

    async fn answered(
        &self,
        req: Request<pb::AnsweredRequest>,
    ) -> Result<Response<pb::AnsweredResponse>, Status> {
        let req = req.into_inner();
        let s = &self.0;
        let caller = parse_id::<UserId>(&req.caller)?;
        let group = parse_id::<GroupId>(&req.group_id)?;
        if req.message_ids.len() > MAX_HISTORY_PAGE as usize {
            return Err(status(
                DomainError::Invalid(format!(
                    "at most {MAX_HISTORY_PAGE} answered messages at once"
                ))
                .into(),
            ));
        }
        let from = s.check_member(&caller, &group).await.map_err(status)?;
        let ids = req
            .message_ids
            .iter()
            .map(|id| parse_id::<MessageId>(id))
            .collect::<Result<Vec<_>, _>>()?;
        let changed = changed_answers(s, &ids)
            .await
            .map_err(status)?
            .into_iter()
            // what the caller can see of its group; nothing of another
            .filter(|(m, _)| m.group_id == group && m.seq.is_some_and(|seq| seq > from))
            .map(|(m, now)| pb::ReplyRef {
                message_id: m.id.to_string(),
                seq: m.seq.unwrap_or_default(),
                sender_id: m.sender_id.to_string(),
                r#type: m.kind,
                deleted: now.is_none(),
                preview: now.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::AnsweredResponse { changed }))
    }

    async fn mentions(
        &self,
        req: Request<pb::MentionsRequest>,
    ) -> Result<Response<pb::MentionsResponse>, Status> {
        let req = req.into_inner();
        let caller = parse_id::<UserId>(&req.caller)?;
        let before = if req.before.is_empty() {
            None
        } else {
            Some(parse_mention_cursor(&req.before)?)
        };
        let limit = req.limit.clamp(1, MAX_HISTORY_PAGE);
        let page = self
            .0
            .store
            .mentions
            .page(&caller, before.as_ref(), i64::from(limit))
            .await
            .map_err(WorkerError::from)?;
        let next = match page.last() {
            Some(m) if page.len() == limit as usize => {
                format!("{}-{}", m.created_at, m.message)
            }
            _ => String::new(),
        };
        let page = still_seen(&self.0, &caller, page).await?;
        let mentions = page
            .into_iter()
            .map(|m| pb::Mention {
                group_id: m.group.into_string(),
                message_id: m.message.into_string(),
                seq: m.seq,
                sender_id: m.sender.into_string(),
                created_at_ms: m.created_at,
            })
            .collect();
        Ok(Response::new(pb::MentionsResponse { mentions, next }))
    }
}

/// The seq of `group`'s newest message in the stream (0: none).
async fn tail_seq(s: &State, group: &GroupId) -> Result<u64, WorkerError> {
    Ok(s.bus.last_group_position(group).await?.map_or(0, |p| p.seq))
}

/// `group`'s committed messages with seq in `(from, before)`, newest
/// first, at most `limit`. Read-your-writes: the page holds every message
/// the stream has in its range (up to `tail_seq`, the stream's newest), so
/// it waits up to `within` for persistence to catch up with them (an edit
/// or delete is acknowledged only once applied: see `change`).
///
/// A group's seqs are gapless, so once caught up the page is exactly the
/// seqs `(lo, top]`: read as one range bounded on both sides, which reads
/// no more than it returns however long the history below it. The read
/// that does not rely on that (bounded by `from` and `before` alone) is
/// kept for when it does not hold: the stream holds nothing of the group
/// (its messages aged out), or the range is short of a seq (persistence
/// passed one it never stored, such as a forged one).
async fn caught_up_page(
    s: &State,
    group: &GroupId,
    from: u64,
    before: Option<u64>,
    limit: u32,
    tail_seq: u64,
    within: std::time::Duration,
) -> Result<Vec<StoredMessage>, WorkerError> {
    let unbounded = || async {
        Ok::<_, WorkerError>(
            s.store
                .messages
                .history(group, from, before, i64::from(limit))
                .await?,
        )
    };
    if tail_seq == 0 {
        return unbounded().await;
    }
    let top = before.map_or(tail_seq, |b| tail_seq.min(b.saturating_sub(1)));
    let lo = from.max(top.saturating_sub(u64::from(limit)));
    let want = top.saturating_sub(lo);
    let page = read_caught_up(
        s,
        group,
        within,
        || async { Ok(s.store.messages.window(group, lo, top).await?) },
        |page| {
            let seqs: HashSet<u64> = page.iter().filter_map(|m| m.seq).collect();
            (0..want).all(|i| seqs.contains(&(top - i)))
        },
    )
    .await?;
    if page.len() as u64 >= want {
        return Ok(page);
    }
    unbounded().await
}

/// Readies opened messages (`ids` are theirs, in order) for `caller`, as
/// history shows them: what a reply answers from before the caller's
/// history (`from`) is not shown, answered messages as they are now, and
/// the messages' reactions as the caller sees them (one read).
async fn dress(
    s: &State,
    caller: &UserId,
    from: u64,
    ids: &[&MessageId],
    messages: &mut [pb::ChatMessage],
) -> Result<(), Status> {
    for m in messages.iter_mut() {
        if m.reply_to.as_ref().is_some_and(|r| r.seq <= from) {
            m.reply_to = None;
        }
    }
    answered_now(s, messages).await?;
    let reactions = s.store.reactions.of(ids).await.map_err(WorkerError::from)?;
    for m in messages.iter_mut() {
        if let Some(r) = reactions.get(&m.message_id) {
            m.reactions = r
                .seen_by(caller)
                .into_iter()
                .map(|(emoji, count, reacted)| pb::ReactionCount {
                    emoji,
                    count,
                    reacted,
                })
                .collect();
        }
    }
    Ok(())
}

/// The mentions of `page` that `caller` may still see: in groups it is
/// still in, within its view of their history (a member removed and added
/// under `joined` history sees only what followed), of messages not
/// deleted. A membership read per group of the page (cached; all at once)
/// and one read
/// of the page's messages; the page may come out shorter than asked, its
/// cursor unchanged.
async fn still_seen(
    s: &State,
    caller: &UserId,
    page: Vec<chat_store::Mention>,
) -> Result<Vec<chat_store::Mention>, WorkerError> {
    let groups: HashSet<&GroupId> = page.iter().map(|m| &m.group).collect();
    let views = futures::future::join_all(groups.into_iter().map(|g| async move {
        match s.check_member(caller, g).await {
            Ok(from) => Ok((g.clone(), Some(from))),
            Err(WorkerError::Domain(DomainError::Forbidden(_)) | WorkerError::NotFound(_)) => {
                Ok((g.clone(), None))
            }
            Err(e) => Err(e),
        }
    }))
    .await
    .into_iter()
    .collect::<Result<HashMap<GroupId, Option<u64>>, WorkerError>>()?;
    let ids: Vec<&MessageId> = page.iter().map(|m| &m.message).collect();
    let deleted: HashSet<MessageId> = s
        .store
        .messages
        .get_many(&ids)
        .await?
        .into_iter()
        .filter(StoredMessage::is_deleted)
        .map(|m| m.id)
        .collect();
    Ok(page
        .into_iter()
        .filter(|m| {
            views
                .get(&m.group)
                .copied()
                .flatten()
                .is_some_and(|from| m.seq > from)
                && !deleted.contains(&m.message)
        })
        .collect())
}

/// A page cursor of `GET /mentions`: `<createdAt ms>-<messageId>`.
fn parse_mention_cursor(s: &str) -> Result<chat_store::MentionCursor, WorkerError> {
    let bad = || DomainError::Invalid("before is not a cursor this server gave".into());
    let (at, id) = s.split_once('-').ok_or_else(bad)?;
    Ok(chat_store::MentionCursor {
        created_at: at.parse().map_err(|_| bad())?,
        message: MessageId::parse(id).map_err(|_| bad())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raise_reads_the_senders_of_at_most_the_newest_ten_thousand_messages() {
        assert_eq!(pushed_from(5, 20), 5);
        assert_eq!(pushed_from(0, PUSHED_AT_MOST), 0);
        // a member back after a million messages
        assert_eq!(pushed_from(0, 1_000_000), 1_000_000 - PUSHED_AT_MOST);
        assert_eq!(pushed_from(999_000, 1_000_000), 999_000);
    }
}
