//! `Messages`: send (validate, encrypt, store pending, publish with per-group
//! compare-and-set, commit), receipts, history and status (seed §2).
//!
//! Invariant: a message is visible in history if and only if it is in the
//! group's JetStream subject. A pending message whose publish failed or is
//! uncertain is resolved against JetStream by [`resolve_pending`]: committed
//! if it landed, deleted (rolled back) if not.

use std::{collections::HashMap, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use bytes::Bytes;
use chat_bus::{Envelope, Position, Published as Stored};
use chat_crypto::{BINDING_V2, MessageBinding, Sealed};
use chat_domain::{
    ClientMsgId, DomainError, GroupId, MessageId, MessageKind, UserId, check_text, now_millis,
};
use chat_protocol::{event, push_json};
use chat_rpc::pb::{self, messages_server::Messages};
use chat_store::{Published, StoreError, StoredMessage};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tonic::{Request, Response, Status};

use crate::{
    State, WorkerError,
    media::{self, MediaContent, check_media},
    parse_id,
};

/// Compare-and-set attempts before a send gives up as `unavailable`.
const CAS_ATTEMPTS: usize = 64;
/// Most positions remembered; past it the cache starts over.
const POSITION_CACHE: usize = 100_000;
/// Largest history page.
const MAX_HISTORY_PAGE: u32 = 100;

/// The sealed part of a message.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Content {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaContent>,
}

/// Each group's newest known position, to publish without a lookup first,
/// behind one lock per group: a worker publishes one message of a group at
/// a time, so its own sends never race each other's compare-and-set (which
/// under load turned most publishes into conflicts and retries). Other
/// workers' publishes are still caught by the compare-and-set.
#[derive(Default)]
pub(crate) struct Positions(std::sync::Mutex<HashMap<GroupId, Slot>>);

type Slot = Arc<Mutex<Option<Position>>>;

impl Positions {
    fn slot(&self, g: &GroupId) -> Slot {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= POSITION_CACHE {
            // a slot still held elsewhere stays valid: the worst case is two
            // holders for one group, which the compare-and-set resolves
            map.clear();
        }
        map.entry(g.clone()).or_default().clone()
    }
}

pub(crate) struct MessagesService(pub Arc<State>);

fn unavailable(why: impl Into<String>) -> WorkerError {
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

/// The newest position of `group`: from the cache, else the stream, else
/// (messages aged out of the stream) the last committed message.
async fn position(s: &State, group: &GroupId) -> Result<Position, WorkerError> {
    let slot = s.positions.slot(group);
    let mut cached = slot.lock().await;
    known_position(s, group, &mut cached).await
}

async fn known_position(
    s: &State,
    group: &GroupId,
    cached: &mut Option<Position>,
) -> Result<Position, WorkerError> {
    if let Some(p) = *cached {
        return Ok(p);
    }
    let p = match s.bus.last_group_position(group).await? {
        Some(p) => p,
        None => match s.store.messages.last_committed(group).await? {
            Some((seq, _)) => Position { seq, stream_seq: 0 },
            None => Position {
                seq: 0,
                stream_seq: 0,
            },
        },
    };
    *cached = Some(p);
    Ok(p)
}

/// What `m`'s content is bound to at `seq`.
fn binding(m: &StoredMessage, seq: u64) -> MessageBinding<'_> {
    MessageBinding {
        message_id: m.id.as_str(),
        group_id: m.group_id.as_str(),
        sender_id: m.sender_id.as_str(),
        seq,
    }
}

/// `m` as the envelope published at `seq`, its content sealed for that seq.
fn envelope(s: &State, m: &StoredMessage, plaintext: &[u8], seq: u64) -> Envelope {
    let sealed = s.keys.seal(plaintext, &binding(m, seq).aad(BINDING_V2));
    Envelope {
        message_id: m.id.to_string(),
        group_id: m.group_id.to_string(),
        seq,
        sender_id: m.sender_id.to_string(),
        kind: m.kind.clone(),
        created_at: m.created_at,
        key_id: sealed.key_id,
        nonce: B64.encode(&sealed.nonce),
        ciphertext: B64.encode(&sealed.ciphertext),
        binding: BINDING_V2,
    }
}

/// The sealed content an envelope carries, as stored with the commit.
fn content_of(env: &Envelope) -> Result<Published, WorkerError> {
    let bad = |e: base64::DecodeError| unavailable(format!("envelope {}: {e}", env.message_id));
    Ok(Published {
        key_id: env.key_id.clone(),
        nonce: B64.decode(&env.nonce).map_err(bad)?,
        ciphertext: B64.decode(&env.ciphertext).map_err(bad)?,
        binding: env.binding,
    })
}

/// Publishes `m` as the group's next message, retrying on conflicts with
/// concurrent senders (each attempt sealed for its seq); returns its final
/// position and content.
async fn publish(
    s: &State,
    m: &StoredMessage,
    plaintext: &[u8],
) -> Result<(Position, Published), WorkerError> {
    let slot = s.positions.slot(&m.group_id);
    let mut cached = slot.lock().await;
    for _ in 0..CAS_ATTEMPTS {
        let last = known_position(s, &m.group_id, &mut cached).await?;
        let seq = last.seq + 1;
        let env = envelope(s, m, plaintext, seq);
        let started = std::time::Instant::now();
        let published = s.bus.publish_group_message(&env, last.stream_seq).await;
        metrics::histogram!("chat_publish_seconds").record(started.elapsed());
        let published = match published {
            Ok(p) => p,
            Err(e) => {
                // uncertain: the next send looks the position up again
                *cached = None;
                return Err(e.into());
            }
        };
        match published {
            Stored::Stored {
                stream_seq,
                duplicate: false,
            } => {
                let p = Position { seq, stream_seq };
                *cached = Some(p);
                return Ok((p, content_of(&env)?));
            }
            Stored::Stored {
                duplicate: true, ..
            } => {
                // an earlier attempt of this very message landed
                let (p, landed) = s
                    .bus
                    .find_group_message(&m.group_id, &m.id, m.after_stream_seq)
                    .await?
                    .ok_or_else(|| unavailable("duplicate publish not found in the stream"))?;
                return Ok((p, content_of(&landed)?));
            }
            Stored::Conflict => {
                metrics::counter!("chat_send_conflicts_total").increment(1);
                *cached = None;
            }
        }
    }
    *cached = None;
    Err(unavailable("the group is too busy; retry"))
}

/// Commits a message that is in the stream; if MongoDB fails, keeps trying in
/// the background (the message is delivered, history must show it).
async fn commit(s: &Arc<State>, m: &StoredMessage, p: Position, content: Published) {
    if let Err(e) = s
        .store
        .messages
        .commit(&m.id, p.seq, p.stream_seq, &content)
        .await
    {
        tracing::warn!(message = %m.id, error = %e, "commit failed; retrying in the background");
        let s = s.clone();
        let id = m.id.clone();
        tokio::spawn(async move {
            let mut wait = Duration::from_millis(200);
            loop {
                tokio::time::sleep(wait).await;
                match s
                    .store
                    .messages
                    .commit(&id, p.seq, p.stream_seq, &content)
                    .await
                {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(message = %id, error = %e, "commit retry failed"),
                }
                wait = (wait * 2).min(Duration::from_secs(10));
            }
        });
    }
}

/// Settles a pending message against JetStream: committed if it landed,
/// deleted if it did not. Returns the committed message, if any.
pub(crate) async fn resolve_pending(
    s: &State,
    mut m: StoredMessage,
) -> Result<Option<StoredMessage>, WorkerError> {
    match s
        .bus
        .find_group_message(&m.group_id, &m.id, m.after_stream_seq)
        .await?
    {
        Some((p, landed)) => {
            let content = content_of(&landed)?;
            s.store
                .messages
                .commit(&m.id, p.seq, p.stream_seq, &content)
                .await?;
            tracing::info!(message = %m.id, seq = p.seq, "pending message had landed; committed");
            m.seq = Some(p.seq);
            m.stream_seq = Some(p.stream_seq);
            m.key_id = content.key_id;
            m.nonce = content.nonce;
            m.ciphertext = content.ciphertext;
            m.binding = content.binding;
            Ok(Some(m))
        }
        None => {
            s.store.messages.delete_pending(&m.id).await?;
            tracing::info!(message = %m.id, "pending message never landed; rolled back");
            Ok(None)
        }
    }
}

/// A send whose client id was used before: the earlier attempt's ack if it
/// was committed (or had landed), `None` if it never landed and is now rolled
/// back, `unavailable` while it is too young to settle.
async fn earlier_attempt(
    s: &State,
    m: &StoredMessage,
) -> Result<Option<pb::SendMessageResponse>, WorkerError> {
    let Some(existing) = s
        .store
        .messages
        .find_by_client_id(&m.group_id, &m.sender_id, &m.client_msg_id)
        .await?
    else {
        // rolled back between the insert and this read
        return Ok(None);
    };
    if existing.is_committed() {
        return Ok(Some(ack(&existing)));
    }
    let after = s.config.resolve_pending_after;
    let young = now_millis() - existing.created_at < after.as_millis() as i64;
    if young || s.bus.up_for().is_none_or(|up| up < after) {
        return Err(unavailable("this message is still being sent; retry later"));
    }
    Ok(resolve_pending(s, existing).await?.as_ref().map(ack))
}

/// Resolves pending messages older than the configured threshold, forever.
/// Safe on several workers at once: both reach the same verdict from
/// JetStream, commit is idempotent and delete touches only pending messages.
pub(crate) async fn sweep_pending(s: Arc<State>) {
    let after = s.config.resolve_pending_after;
    let mut tick = tokio::time::interval((after / 2).max(Duration::from_millis(100)));
    loop {
        tick.tick().await;
        let older_than = now_millis() - after.as_millis() as i64;
        let stale = match s.store.messages.stale_pending(older_than, 100).await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list pending messages");
                continue;
            }
        };
        // a publish buffered during a disconnect goes out after the
        // reconnect: settle nothing until the connection has been up a while
        if s.bus.up_for().is_none_or(|up| up < after) {
            continue;
        }
        for m in stale {
            if let Err(e) = resolve_pending(&s, m).await {
                tracing::debug!(error = %e, "cannot resolve a pending message yet");
                break;
            }
        }
    }
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
        let checked = started.elapsed();

        let id = MessageId::generate();
        let content = if kind == MessageKind::Text {
            Content {
                text: Some(req.text),
                media: None,
            }
        } else {
            // a media send claims its upload: a retry must find its first
            // attempt before that, or it would be refused as "used already"
            if let Some(first) = s
                .store
                .messages
                .find_by_client_id(&group, &sender, &client_id)
                .await?
                && let Some(done) = earlier_attempt(s, &first).await?
            {
                return Ok(done);
            }
            Content {
                text: None,
                media: Some(check_media(s, &group, kind, req.media).await?),
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
        let after = position(s, &group).await?;
        let mut m = StoredMessage {
            id,
            group_id: group,
            sender_id: sender,
            client_msg_id: client_id,
            kind: kind.as_str().to_owned(),
            // sealed at each publish attempt, for its seq; stored with the
            // commit (a pending message is never shown)
            key_id: s.keys.current_id().to_owned(),
            nonce: Vec::new(),
            ciphertext: Vec::new(),
            binding: BINDING_V2,
            seq: None,
            stream_seq: None,
            after_stream_seq: after.stream_seq,
            created_at: now_millis(),
        };
        // idempotency rides on the unique (group, sender, client id) index:
        // no read on the normal path, a look at the earlier attempt on a retry
        if !s.store.messages.insert_pending(&m).await? {
            if let Some(done) = earlier_attempt(s, &m).await? {
                return Ok(done);
            }
            // the earlier attempt was rolled back: this one takes its place
            if !s.store.messages.insert_pending(&m).await? {
                return Err(unavailable("this message is still being sent; retry later"));
            }
        }
        if !s.bus.is_connected() {
            // certain failure: nothing was sent, so roll back at once rather
            // than let the client buffer a publish for later
            s.store.messages.delete_pending(&m.id).await?;
            return Err(unavailable("nats is not connected"));
        }
        let stored = started.elapsed();
        // from here the outcome may be uncertain: the claim stays with the
        // message, whatever the sweeper decides
        if let Some(claim) = claim {
            claim.keep();
        }
        let (p, content) = match publish(s, &m, &plaintext).await {
            Ok(p) => p,
            Err(e) => {
                // uncertain: the sweeper settles it against JetStream
                tracing::warn!(message = %m.id, error = %e, "publish failed; left pending");
                return Err(e);
            }
        };
        let published = started.elapsed();
        commit(s, &m, p, content).await;
        tracing::debug!(
            checked_ms = checked.as_secs_f64() * 1e3,
            stored_ms = stored.as_secs_f64() * 1e3,
            published_ms = published.as_secs_f64() * 1e3,
            committed_ms = started.elapsed().as_secs_f64() * 1e3,
            "send timings"
        );
        m.seq = Some(p.seq);
        metrics::counter!("chat_messages_sent_total").increment(1);
        tracing::debug!(message = %m.id, group = %m.group_id, seq = p.seq, "message sent");
        Ok(ack(&m))
    }

    /// Raises members' watermarks, each (member, delivered, read), and
    /// tells the senders concerned; returns the members' read watermarks
    /// after.
    async fn raise(
        &self,
        group: &GroupId,
        raises: &[(UserId, u64, u64)],
    ) -> Result<Vec<(UserId, u64)>, WorkerError> {
        let s = &self.0;
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
        let senders = match (lo, hi) {
            (Some(lo), Some(hi)) if hi > lo => {
                s.store.messages.senders_by_seq(group, lo, hi).await?
            }
            _ => Vec::new(),
        };
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
            let data = serde_json::json!({
                "groupId": group.as_str(),
                "userId": user.as_str(),
                "deliveredSeq": after.delivered_seq,
                "readSeq": after.read_seq,
            });
            let payload = Bytes::from(
                push_json(event::MESSAGE_STATUS, &data)
                    .map_err(|e| DomainError::Invalid(e.to_string()))?,
            );
            for sender in to {
                let dedup = format!(
                    "st-{group}-{user}-{}-{}-{sender}",
                    after.delivered_seq, after.read_seq
                );
                s.bus
                    .publish_user_event(sender, &dedup, payload.clone())
                    .await?;
            }
        }
        Ok(reads)
    }

    async fn committed_in(
        &self,
        caller: &UserId,
        group: &GroupId,
        id: &str,
    ) -> Result<StoredMessage, WorkerError> {
        let id = parse_id::<MessageId>(id)?;
        self.0.check_member(caller, group).await?;
        match self.0.store.messages.get(&id).await? {
            Some(m) if &m.group_id == group && m.is_committed() => Ok(m),
            _ => Err(WorkerError::NotFound("message")),
        }
    }
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
        let read_seq = self
            .raise(&group, &[(caller.clone(), seq, seq)])
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
        self.raise(&group, &raises).await?;
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
        s.check_member(&caller, &group).await?;
        let limit = req.limit.clamp(1, MAX_HISTORY_PAGE);
        let before = (req.before > 0).then_some(req.before);
        let stored = s
            .store
            .messages
            .history(&group, before, i64::from(limit))
            .await
            .map_err(WorkerError::from)?;
        let mut messages = Vec::with_capacity(stored.len());
        for m in stored {
            let sealed = Sealed {
                key_id: m.key_id.clone(),
                nonce: m.nonce.clone(),
                ciphertext: m.ciphertext.clone(),
            };
            let aad = binding(&m, m.seq.unwrap_or_default()).aad(m.binding);
            let content: Content = match s
                .keys
                .open(&sealed, &aad)
                .map(|p| serde_json::from_slice(&p))
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return Err(status(
                        DomainError::Invalid(format!("message {} content: {e}", m.id)).into(),
                    ));
                }
                Err(e) => {
                    tracing::error!(message = %m.id, error = %e, "cannot decrypt a stored message");
                    return Err(Status::internal("internal error"));
                }
            };
            messages.push(pb::ChatMessage {
                message_id: m.id.to_string(),
                group_id: m.group_id.to_string(),
                seq: m.seq.unwrap_or_default(),
                sender_id: m.sender_id.to_string(),
                r#type: m.kind,
                text: content.text.unwrap_or_default(),
                created_at_ms: m.created_at,
                media: content.media.map(|m| pb::MediaRef {
                    key: m.key,
                    mime: m.mime,
                    size: m.size,
                }),
            });
        }
        Ok(Response::new(pb::HistoryResponse { messages }))
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
        let members = record
            .group
            .member_ids()
            .map(|u| {
                let r = receipts.get(u).copied().unwrap_or_default();
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
}
