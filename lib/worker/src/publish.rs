//! Publishing a group's messages: each group's position (its newest `seq`
//! and stream sequence), the compare-and-set that keeps `seq` gapless and
//! in stream order across workers, and group commit.
//!
//! Group commit: a worker publishes one batch of a group at a time, under
//! the group's slot, and waits for its acknowledgement (the next batch's
//! compare-and-set needs the stream sequence it got). New messages that
//! arrive meanwhile queue in the slot; whoever takes the slot next
//! publishes everything queued as one JetStream atomic batch (ADR-50) with
//! the compare-and-set on its first message: all land, with consecutive
//! `seq`s and stream sequences, or none do. A group then takes many
//! messages per round trip instead of one, which is what held a busy
//! group's sends back. A batch the server does not take (atomic publishes
//! off, too many batches open, a retried message in it) goes out message
//! by message instead.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, atomic::Ordering},
};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use chat_bus::{BatchPublished, Envelope, Position, Published as Stored, SendLog};
use chat_crypto::BINDING_V2;
use chat_domain::{GroupId, MessageId, UserId};
use chat_store::StoredMessage;
use tokio::sync::{Mutex, oneshot};

use crate::{
    State, WorkerError, media,
    messages::{binding, unavailable},
};

/// Most plaintext bytes of one batch (its first message may be larger).
const BATCH_BYTES: usize = 1 << 20;
/// Atomic batches a worker has open at once.
const BATCHES_OPEN: usize = 16;

/// How long a message not sent may take to give back what it took before
/// its sender hears.
const GIVE_BACK: std::time::Duration = std::time::Duration::from_secs(2);

/// Compare-and-set attempts before a send gives up as `unavailable`.
const CAS_ATTEMPTS: usize = 64;
/// Most positions remembered; past it the cache starts over.
const POSITION_CACHE: usize = 100_000;

/// Each group's newest known position, to publish without a lookup first,
/// behind one lock per group: a worker has one publish of a group under
/// way at a time, so its own sends never race each other's compare-and-set
/// (which under load turned most publishes into conflicts and retries);
/// what queued meanwhile goes out together next (group commit). Other
/// workers' publishes are still caught by the compare-and-set.
pub(crate) struct Positions {
    slots: std::sync::Mutex<HashMap<GroupId, Slot>>,
    /// Atomic batches this worker may have open at once (nats-server
    /// refuses more than 50 per stream by default, across workers).
    batches: tokio::sync::Semaphore,
    /// Until when (ms since the epoch) atomic batches are taken as off
    /// (the server said so): each batch would cost a round trip for nothing.
    no_batches_until: std::sync::atomic::AtomicI64,
}

impl Default for Positions {
    fn default() -> Self {
        Self {
            slots: Default::default(),
            batches: tokio::sync::Semaphore::new(BATCHES_OPEN),
            no_batches_until: Default::default(),
        }
    }
}

/// How long atomic batches are not tried again after the server said they
/// are off.
const NO_BATCHES_FOR_MS: i64 = 60_000;

impl Positions {
    fn batches_supported(&self) -> bool {
        chat_domain::now_millis() >= self.no_batches_until.load(Ordering::Relaxed)
    }

    fn batches_unsupported(&self) {
        self.no_batches_until.store(
            chat_domain::now_millis() + NO_BATCHES_FOR_MS,
            Ordering::Relaxed,
        );
    }
}

type Slot = Arc<GroupSlot>;

pub(crate) struct GroupSlot {
    group: GroupId,
    /// The newest known position, held across a publish.
    pub(crate) position: Arc<Mutex<Option<Position>>>,
    /// New messages waiting for the next publish of the group.
    queue: std::sync::Mutex<VecDeque<Queued>>,
    /// The newest stream sequence ever known here: a lower bound of where
    /// the next message lands, readable without waiting for a publish in
    /// progress (the send log records it before the publish).
    floor: std::sync::atomic::AtomicU64,
    /// The stream sequence of the last change (edit, delete) this worker
    /// published of each message of the group (the newest few): the next
    /// change of that message is decided only once MongoDB holds it.
    changes: std::sync::Mutex<HashMap<MessageId, u64>>,
}

/// Messages per group whose last change a worker remembers.
const CHANGES_KEPT: usize = 1024;

impl GroupSlot {
    /// Where this worker last published a change of `id`, if it remembers.
    pub(crate) fn last_change(&self, id: &MessageId) -> Option<u64> {
        let changes = lock(&self.changes);
        changes.get(id).copied()
    }

    pub(crate) fn changed(&self, id: &MessageId, stream_seq: u64) {
        let mut changes = lock(&self.changes);
        if changes.len() >= CHANGES_KEPT && !changes.contains_key(id) {
            // each was acknowledged only once applied: forgetting one
            // leaves a change in flight at most
            changes.clear();
        }
        let at = changes.entry(id.clone()).or_default();
        *at = (*at).max(stream_seq);
    }

    /// The change of `id` at `stream_seq` is applied: nothing to wait for,
    /// unless a newer one is in flight.
    pub(crate) fn applied(&self, id: &MessageId, stream_seq: u64) {
        let mut changes = lock(&self.changes);
        if changes.get(id) == Some(&stream_seq) {
            changes.remove(id);
        }
    }

    fn new(group: GroupId) -> Self {
        Self {
            group,
            position: Default::default(),
            queue: Default::default(),
            floor: Default::default(),
            changes: Default::default(),
        }
    }

    fn known(&self, cached: &mut Option<Position>, p: Position) {
        *cached = Some(p);
        self.floor.fetch_max(p.stream_seq, Ordering::Relaxed);
    }
}

impl Positions {
    pub(crate) fn slot(&self, g: &GroupId) -> Slot {
        let mut map = lock(&self.slots);
        if map.len() >= POSITION_CACHE && !map.contains_key(g) {
            // a slot still held elsewhere stays valid: the worst case is two
            // holders for one group, which the compare-and-set resolves
            map.clear();
        }
        map.entry(g.clone())
            .or_insert_with(|| Arc::new(GroupSlot::new(g.clone())))
            .clone()
    }
}

/// A stream sequence the next message of `group` cannot be at or before:
/// known without waiting for a publish of the group in progress, looked up
/// (under the group's lock) only the first time.
pub(crate) async fn lower_bound(s: &State, group: &GroupId) -> Result<u64, WorkerError> {
    let slot = s.positions.slot(group);
    let floor = slot.floor.load(Ordering::Relaxed);
    if floor > 0 {
        return Ok(floor);
    }
    let mut cached = slot.position.lock().await;
    Ok(known_position(s, &slot, &mut cached).await?.stream_seq)
}

/// The newest position of `group`: from the cache, else the stream, else
/// (messages aged out of the stream) the last committed message.
async fn known_position(
    s: &State,
    slot: &GroupSlot,
    cached: &mut Option<Position>,
) -> Result<Position, WorkerError> {
    if let Some(p) = *cached {
        return Ok(p);
    }
    let p = looked_up(s, &slot.group).await?;
    slot.known(cached, p);
    Ok(p)
}

/// The newest position of `group` now: from the stream, else (messages
/// aged out of it) the last committed message's seq, else nothing.
async fn looked_up(s: &State, group: &GroupId) -> Result<Position, WorkerError> {
    if let Some(p) = s.bus.last_group_position(group).await? {
        return Ok(p);
    }
    let seq = s
        .store
        .messages
        .last_committed(group)
        .await?
        .map_or(0, |(seq, _)| seq);
    Ok(Position { seq, stream_seq: 0 })
}

/// The newest `seq` of `group` now.
pub(crate) async fn newest_seq(s: &State, group: &GroupId) -> Result<u64, WorkerError> {
    Ok(looked_up(s, group).await?.seq)
}

/// What a new message's envelope says in the clear beside its sealed
/// content.
#[derive(Debug, Default)]
pub(crate) struct Unsealed {
    /// The members it mentions.
    pub(crate) mentions: Vec<UserId>,
    /// A reply in a group with `joined` history: a connection whose view of
    /// the group starts after the message it answers gets it without what
    /// it answers.
    pub(crate) joined_only: bool,
}

/// `m` as the envelope published at `seq`, its content sealed for that seq.
fn envelope(
    s: &State,
    m: &StoredMessage,
    plaintext: &[u8],
    seq: u64,
    unsealed: &Unsealed,
) -> Envelope {
    let sealed = s.keys.seal(plaintext, &binding(m, seq).aad(BINDING_V2));
    Envelope {
        message_id: m.id.to_string(),
        group_id: m.group_id.to_string(),
        seq,
        sender_id: m.sender_id.to_string(),
        client_msg_id: m.client_msg_id.to_string(),
        kind: m.kind.clone(),
        created_at: m.created_at,
        key_id: sealed.key_id,
        nonce: B64.encode(&sealed.nonce),
        ciphertext: B64.encode(&sealed.ciphertext),
        binding: BINDING_V2,
        mentions: unsealed.mentions.iter().map(UserId::to_string).collect(),
        change: None,
        changed_by: String::new(),
        joined_only: unsealed.joined_only,
    }
}

/// What goes on a group's message subject.
pub(crate) enum Publishing<'a> {
    /// A new message, sealed at each attempt for the seq it would get.
    Message {
        m: &'a StoredMessage,
        plaintext: &'a [u8],
        unsealed: &'a Unsealed,
    },
    /// A change of an earlier message, under its own de-duplication id:
    /// it takes no seq.
    Change {
        envelope: &'a Envelope,
        msg_id: &'a str,
    },
}

/// Publishes `what` on `group`'s message subject, with the group's slot
/// held, retrying on conflicts with other workers; returns where it landed.
/// `after` is a stream sequence a message cannot be at or before (to find
/// it if an earlier attempt landed).
pub(crate) async fn publish_locked(
    s: &State,
    slot: &GroupSlot,
    cached: &mut Option<Position>,
    what: Publishing<'_>,
    after: u64,
) -> Result<Position, WorkerError> {
    for _ in 0..CAS_ATTEMPTS {
        let last = known_position(s, slot, cached).await?;
        let started = std::time::Instant::now();
        let (seq, published) = match &what {
            Publishing::Message {
                m,
                plaintext,
                unsealed,
            } => {
                let seq = last.seq + 1;
                let env = envelope(s, m, plaintext, seq, unsealed);
                (
                    seq,
                    s.bus.publish_group_message(&env, last.stream_seq).await,
                )
            }
            Publishing::Change { envelope, msg_id } => (
                last.seq,
                s.bus
                    .publish_group_change(envelope, msg_id, last.seq, last.stream_seq)
                    .await,
            ),
        };
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
                slot.known(cached, p);
                return Ok(p);
            }
            Stored::Stored {
                duplicate: true,
                stream_seq,
            } => {
                // an earlier attempt of this very message (or change) landed
                let Publishing::Message { m, .. } = &what else {
                    return Ok(Position { seq, stream_seq });
                };
                let (p, _) = s
                    .bus
                    .find_group_message(&slot.group, &m.id, after, None)
                    .await?
                    .ok_or_else(|| unavailable("duplicate publish not found in the stream"))?;
                return Ok(p);
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

/// A send recorded in the send log and not published yet: dropped without
/// [`Reservation::keep`] (the send failed before publishing), it takes the
/// entry out again, in a task of its own, so that a retry starts afresh.
pub(crate) struct Reservation {
    log: SendLog,
    key: String,
    /// The entry's revision: an entry made since is another attempt's.
    revision: u64,
    armed: bool,
}

impl Reservation {
    pub(crate) fn new(log: SendLog, key: String, revision: u64) -> Self {
        Self {
            log,
            key,
            revision,
            armed: true,
        }
    }

    pub(crate) fn keep(mut self) {
        self.armed = false;
    }

    /// Takes the entry out now.
    pub(crate) async fn release(mut self) {
        self.armed = false;
        release(&self.log, &self.key, self.revision).await;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (log, key) = (self.log.clone(), std::mem::take(&mut self.key));
        let revision = self.revision;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { release(&log, &key, revision).await });
        }
    }
}

async fn release(log: &SendLog, key: &str, revision: u64) {
    if let Err(e) = log.release(key, revision).await {
        // the retry then waits for the settle delay
        tracing::warn!(key = %key, error = %e, "cannot take a failed send out of the send log");
    }
}

/// What a new message took before its publish, its send log entry and its
/// upload: kept once it goes out (the outcome may be uncertain from there,
/// and a retry finds out), given back if it certainly never does, so that
/// a retry starts afresh at once instead of waiting out the settle delay.
#[derive(Default)]
pub(crate) struct Taken {
    pub(crate) entry: Option<Reservation>,
    pub(crate) upload: Option<media::Claim>,
}

impl Taken {
    /// It goes out: it stays taken whatever happens.
    fn keep(&mut self) {
        if let Some(entry) = self.entry.take() {
            entry.keep();
        }
        if let Some(upload) = self.upload.take() {
            upload.keep();
        }
    }

    /// Gives everything back; done when this returns.
    async fn give_back(&mut self) {
        if let Some(entry) = self.entry.take() {
            entry.release().await;
        }
        if let Some(upload) = self.upload.take() {
            upload.give_back().await;
        }
    }

    fn is_empty(&self) -> bool {
        self.entry.is_none() && self.upload.is_none()
    }
}

/// A new message waiting in its group's queue.
struct Queued {
    m: StoredMessage,
    plaintext: Vec<u8>,
    unsealed: Unsealed,
    /// A stream sequence it cannot be at or before.
    after: u64,
    /// When its send queued it.
    queued_at: std::time::Instant,
    taken: Taken,
    done: oneshot::Sender<Result<Position, WorkerError>>,
}

impl Queued {
    /// Whether it must not be published any more: its sender went away, or
    /// it waited longer than `limit` (a retry takes an attempt as lost once
    /// `--resolve-pending-after-ms` passed, so one must land well within
    /// that or never). Settles it with an error if its sender still waits.
    fn expired(&self, limit: std::time::Duration) -> bool {
        self.done.is_closed() || self.queued_at.elapsed() > limit
    }

    fn settle(self, result: Result<Position, WorkerError>) {
        // a sender that went away learns nothing: its retry will
        let _ = self.done.send(result);
    }

    /// Settles it with the error `why`, once what it still holds is given
    /// back (only a message never handed to NATS holds anything): a retry
    /// that follows the answer starts afresh.
    fn fail(mut self, why: String) {
        if self.taken.is_empty() {
            self.settle(Err(unavailable(why)));
            return;
        }
        tokio::spawn(async move {
            // not for long: its sender waits (a retry then waits for the
            // settle delay, as before)
            let _ = tokio::time::timeout(GIVE_BACK, self.taken.give_back()).await;
            self.settle(Err(unavailable(why)));
        });
    }
}

/// Publishes the new message `m` (content `plaintext`, sealed for the seq
/// it gets) with whatever else queued for its group meanwhile; returns
/// where it landed. `after` is a stream sequence it cannot be at or before;
/// `taken` (its send log entry, its upload) is kept once it goes out and
/// given back if it certainly never does.
///
/// The publish runs in a task of its own, so a sender that goes away (its
/// call cancelled) abandons neither its own message once taken nor the
/// others of its batch; a message still queued when its sender went away
/// leaves the queue at once and gives back what it took, never published
/// late.
pub(crate) async fn publish_new(
    s: &Arc<State>,
    m: &StoredMessage,
    plaintext: Vec<u8>,
    unsealed: Unsealed,
    after: u64,
    taken: Taken,
) -> Result<Position, WorkerError> {
    let slot = s.positions.slot(&m.group_id);
    let (done, mut outcome) = oneshot::channel();
    lock(&slot.queue).push_back(Queued {
        m: m.clone(),
        plaintext,
        unsealed,
        after,
        queued_at: std::time::Instant::now(),
        taken,
        done,
    });
    let mut withdraw = Withdraw {
        slot: &slot,
        id: &m.id,
        armed: true,
    };
    let settled = |result: Result<_, oneshot::error::RecvError>| {
        result.unwrap_or_else(|_| Err(unavailable("the publish was interrupted; retry")))
    };
    let result = async {
        loop {
            // published by another sender's turn, or this one's turn comes
            let held = tokio::select! {
                biased;
                result = &mut outcome => return settled(result),
                held = slot.position.clone().lock_owned() => held,
            };
            match outcome.try_recv() {
                Ok(result) => return result,
                Err(oneshot::error::TryRecvError::Closed) => {
                    return Err(unavailable("the publish was interrupted; retry"));
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
            }
            // lead: everything queued before this message, and it, goes now
            let batch = take_batch(&slot, s.config.publish_batch_max.max(1), queued_limit(s));
            if batch.is_empty() {
                // this message is out of the queue, so whoever took it settles
                // it (a message not sent is given back first): no turn to take
                drop(held);
                return settled(outcome.await);
            }
            let (s, slot) = (s.clone(), slot.clone());
            let publishing = tokio::spawn(async move {
                let mut held = held;
                publish_queued(&s, &slot, &mut held, batch).await;
            });
            // its end (with the slot free again), or this message's outcome
            tokio::select! {
                biased;
                result = &mut outcome => return settled(result),
                _ = publishing => {}
            }
        }
    }
    .await;
    withdraw.armed = false;
    result
}

/// Takes a message out of its group's queue if its sender goes away while
/// it still waits there (the send's call was cancelled): never published,
/// it gives back what it took at once, instead of at the group's next
/// publish on this worker, which in a quiet group may be hours away.
struct Withdraw<'a> {
    slot: &'a GroupSlot,
    id: &'a MessageId,
    armed: bool,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let withdrawn = {
            let mut queue = lock(&self.slot.queue);
            queue
                .iter()
                .position(|q| &q.m.id == self.id)
                .and_then(|i| queue.remove(i))
        };
        // outside the lock: what it took is given back in a task of its own
        drop(withdrawn);
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a message may wait for its publish to start.
fn queued_limit(s: &State) -> std::time::Duration {
    s.config.resolve_pending_after / 2
}

/// Settles `q` with "not sent", if its sender still waits.
fn not_sent(q: Queued) {
    q.fail("the message waited too long to be sent and was not; retry".to_owned());
}

/// The next batch from `slot`'s queue: up to `most` messages and
/// [`BATCH_BYTES`] of content (at least one message). A message whose
/// sender went away, or that waited longer than `limit`, is taken out and
/// not sent (its retry finds it never landed).
fn take_batch(slot: &GroupSlot, most: usize, limit: std::time::Duration) -> Vec<Queued> {
    let mut queue = lock(&slot.queue);
    let mut batch = Vec::new();
    let mut bytes = 0;
    while let Some(next) = queue.front() {
        if next.expired(limit) {
            if let Some(q) = queue.pop_front() {
                not_sent(q);
            }
            continue;
        }
        let full = batch.len() >= most
            || (!batch.is_empty() && bytes + next.plaintext.len() > BATCH_BYTES);
        if full {
            break;
        }
        bytes += next.plaintext.len();
        batch.extend(queue.pop_front());
    }
    batch
}

/// Publishes `batch` (new messages of `group`, oldest first) with the
/// group's slot held, and settles each with where it landed.
async fn publish_queued(
    s: &State,
    slot: &GroupSlot,
    cached: &mut Option<Position>,
    mut batch: Vec<Queued>,
) {
    metrics::histogram!("chat_publish_batch_messages").record(batch.len() as f64);
    if batch.len() > 1 && s.positions.batches_supported() {
        let permit = s.positions.batches.acquire().await;
        let refused = match permit {
            Ok(_permit) => match publish_batch(s, slot, cached, &mut batch).await {
                Ok(positions) => {
                    for (q, p) in batch.into_iter().zip(positions) {
                        q.settle(Ok(p));
                    }
                    return;
                }
                Err(BatchFailed::Refused(why)) => why,
                Err(BatchFailed::Unsupported(why)) => {
                    s.positions.batches_unsupported();
                    tracing::warn!(reason = %why, "atomic batches unsupported; publishing one by one for a minute");
                    why
                }
                Err(BatchFailed::Error(why)) => {
                    tracing::warn!(group = %slot.group, messages = batch.len(), error = %why, "batch publish failed or is uncertain");
                    for q in batch {
                        q.fail(why.clone());
                    }
                    return;
                }
            },
            Err(_) => "no batches".to_owned(),
        };
        metrics::counter!("chat_publish_batches_refused_total").increment(1);
        tracing::debug!(group = %slot.group, reason = %refused, "batch refused; publishing its messages one by one");
    }
    let mut failed: Option<String> = None;
    for mut q in batch {
        if q.expired(queued_limit(s)) {
            not_sent(q);
            continue;
        }
        if let Some(why) = &failed {
            // the service just failed: the rest fail with it at once
            // rather than hold the group for a timeout each (never sent)
            q.fail(why.clone());
            continue;
        }
        q.taken.keep();
        let outgoing = Publishing::Message {
            m: &q.m,
            plaintext: &q.plaintext,
            unsealed: &q.unsealed,
        };
        let result = publish_locked(s, slot, cached, outgoing, q.after).await;
        if let Err(e) = &result {
            failed = Some(e.to_string());
        }
        q.settle(result);
    }
}

/// Why a batch did not land.
enum BatchFailed {
    /// Not taken, nothing stored: publish one by one.
    Refused(String),
    /// Atomic batches are off or unknown: nothing stored; one by one, and
    /// no batch for a while.
    Unsupported(String),
    /// Failed or uncertain: each sender retries.
    Error(String),
}

/// Publishes `batch` as one atomic batch at the group's next seqs,
/// retrying on conflicts with other workers; where each landed.
async fn publish_batch(
    s: &State,
    slot: &GroupSlot,
    cached: &mut Option<Position>,
    batch: &mut [Queued],
) -> Result<Vec<Position>, BatchFailed> {
    let error = |e: WorkerError| BatchFailed::Error(e.to_string());
    for _ in 0..CAS_ATTEMPTS {
        let last = known_position(s, slot, cached).await.map_err(error)?;
        let envelopes: Vec<Envelope> = (1..)
            .zip(batch.iter())
            .map(|(i, q)| envelope(s, &q.m, &q.plaintext, last.seq + i, &q.unsealed))
            .collect();
        for q in batch.iter_mut() {
            q.taken.keep();
        }
        let started = std::time::Instant::now();
        let published = s.bus.publish_group_batch(&envelopes, last.stream_seq).await;
        metrics::histogram!("chat_publish_seconds").record(started.elapsed());
        match published {
            Ok(BatchPublished::Stored { first_stream_seq }) => {
                let positions: Vec<Position> = (0..)
                    .zip(&envelopes)
                    .map(|(i, e)| Position {
                        seq: e.seq,
                        stream_seq: first_stream_seq + i,
                    })
                    .collect();
                if let Some(newest) = positions.last() {
                    slot.known(cached, *newest);
                }
                return Ok(positions);
            }
            Ok(BatchPublished::Conflict) => {
                metrics::counter!("chat_send_conflicts_total").increment(1);
                *cached = None;
            }
            Ok(BatchPublished::Refused(why)) => return Err(BatchFailed::Refused(why)),
            Ok(BatchPublished::Unsupported(why)) => return Err(BatchFailed::Unsupported(why)),
            Err(e) => {
                // uncertain: the next send looks the position up again
                *cached = None;
                return Err(BatchFailed::Error(e.to_string()));
            }
        }
    }
    *cached = None;
    Err(BatchFailed::Error(
        "the group is too busy; retry".to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_remembers_a_bounded_number_of_groups_and_changes() {
        let positions = Positions::default();
        let first = GroupId::generate();
        let slot = positions.slot(&first);
        for _ in 1..POSITION_CACHE {
            positions.slot(&GroupId::generate());
        }
        assert_eq!(lock(&positions.slots).len(), POSITION_CACHE);
        assert!(Arc::ptr_eq(&slot, &positions.slot(&first)), "still kept");
        positions.slot(&GroupId::generate());
        assert_eq!(lock(&positions.slots).len(), 1, "cleared, then the new one");

        let ids: Vec<MessageId> = (0..=CHANGES_KEPT).map(|_| MessageId::generate()).collect();
        for (n, id) in ids[..CHANGES_KEPT].iter().enumerate() {
            slot.changed(id, n as u64 + 1);
        }
        slot.changed(&ids[0], 5_000);
        assert_eq!(
            slot.last_change(&ids[0]),
            Some(5_000),
            "a kept one moves on"
        );
        assert_eq!(lock(&slot.changes).len(), CHANGES_KEPT);
        slot.changed(&ids[CHANGES_KEPT], 6_000);
        assert_eq!(lock(&slot.changes).len(), 1, "cleared, then the new one");
        assert_eq!(slot.last_change(&ids[0]), None);
    }
    use chat_domain::ClientMsgId;

    fn queued(bytes: usize) -> (Queued, oneshot::Receiver<Result<Position, WorkerError>>) {
        let m = StoredMessage {
            id: MessageId::generate(),
            group_id: GroupId::generate(),
            sender_id: UserId::parse("alice").expect("id"),
            client_msg_id: ClientMsgId::parse("c1").expect("id"),
            kind: "text".into(),
            key_id: "k".into(),
            nonce: Vec::new(),
            ciphertext: Vec::new(),
            binding: BINDING_V2,
            seq: None,
            stream_seq: None,
            created_at: 0,
            edited_at: None,
            deleted_at: None,
            version: 0,
        };
        let (done, outcome) = oneshot::channel();
        let q = Queued {
            m,
            plaintext: vec![b'x'; bytes],
            unsealed: Unsealed::default(),
            after: 0,
            queued_at: std::time::Instant::now(),
            taken: Taken::default(),
            done,
        };
        (q, outcome)
    }

    type Waiting = Vec<oneshot::Receiver<Result<Position, WorkerError>>>;

    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

    /// A slot with messages of these sizes queued, and their senders.
    fn slot_with(sizes: &[usize]) -> (GroupSlot, Waiting) {
        let slot = GroupSlot::new(GroupId::generate());
        let mut waiting = Vec::new();
        for &b in sizes {
            let (q, outcome) = queued(b);
            lock(&slot.queue).push_back(q);
            waiting.push(outcome);
        }
        (slot, waiting)
    }

    fn sizes(batch: &[Queued]) -> Vec<usize> {
        batch.iter().map(|q| q.plaintext.len()).collect()
    }

    #[test]
    fn a_batch_takes_the_oldest_up_to_the_most_messages() {
        let (slot, _waiting) = slot_with(&[1, 2, 3, 4, 5]);
        assert_eq!(sizes(&take_batch(&slot, 2, HOUR)), [1, 2]);
        assert_eq!(sizes(&take_batch(&slot, 64, HOUR)), [3, 4, 5]);
        assert!(take_batch(&slot, 64, HOUR).is_empty());
        // one at a time when batches are off
        let (slot, _waiting) = slot_with(&[1, 2]);
        assert_eq!(sizes(&take_batch(&slot, 1, HOUR)), [1]);
    }

    #[test]
    fn a_batch_stops_before_a_mebibyte_but_always_takes_one() {
        let (slot, _waiting) = slot_with(&[BATCH_BYTES + 1, 10, BATCH_BYTES - 10, 1, 1]);
        assert_eq!(sizes(&take_batch(&slot, 64, HOUR)), [BATCH_BYTES + 1]);
        assert_eq!(sizes(&take_batch(&slot, 64, HOUR)), [10, BATCH_BYTES - 10]);
        assert_eq!(sizes(&take_batch(&slot, 64, HOUR)), [1, 1]);
    }

    #[test]
    fn a_message_whose_sender_went_away_before_its_turn_is_never_sent() {
        let (slot, mut waiting) = slot_with(&[1, 2, 3, 4]);
        // the senders of the second and fourth went away
        drop(waiting.remove(3));
        drop(waiting.remove(1));
        assert_eq!(sizes(&take_batch(&slot, 64, HOUR)), [1, 3]);
        assert!(lock(&slot.queue).is_empty(), "dropped, not left behind");
    }

    /// A message certainly never sent gives its send log entry back before
    /// its sender hears so: the retry that follows starts afresh at once
    /// (it waited out the settle delay before). One that went out keeps it.
    #[tokio::test]
    async fn a_message_never_sent_gives_its_send_log_entry_back_before_its_sender_hears() {
        use chat_bus::{Claimed, SendRecord};
        let nats = chat_stack::Nats::start().await.expect("nats-server");
        let bus = crate::test_bus(&nats).await;
        let log = bus
            .send_log(
                std::time::Duration::from_secs(60),
                std::time::Duration::from_secs(30),
            )
            .await
            .expect("send log");
        let record = SendRecord {
            message_id: MessageId::generate().to_string(),
            after_stream_seq: 0,
            at: 0,
        };
        let claim = |key: &'static str| {
            let (log, record) = (log.clone(), record.clone());
            async move { log.claim(key, &record, None).await.expect("claimed") }
        };
        let reserved = |key: &'static str, revision| {
            Some(Reservation::new(log.clone(), key.to_owned(), revision))
        };

        let Claimed::New { revision } = claim("g.alice.c1").await else {
            panic!("a new key");
        };
        let (slot, mut waiting) = slot_with(&[1]);
        {
            let mut queue = lock(&slot.queue);
            queue[0].taken.entry = reserved("g.alice.c1", revision);
            queue[0].queued_at = std::time::Instant::now()
                .checked_sub(std::time::Duration::from_secs(20))
                .expect("the clock is past 20 s");
        }
        let limit = std::time::Duration::from_secs(15);
        assert!(take_batch(&slot, 64, limit).is_empty());
        let told = tokio::time::timeout(std::time::Duration::from_secs(10), waiting.remove(0))
            .await
            .expect("told in time")
            .expect("settled");
        assert!(told.is_err(), "not sent: {told:?}");
        assert!(
            matches!(claim("g.alice.c1").await, Claimed::New { .. }),
            "the retry finds no earlier attempt"
        );

        // one that went out keeps its entry, whatever happens after
        let Claimed::New { revision } = claim("g.alice.c2").await else {
            panic!("a new key");
        };
        let mut taken = Taken {
            entry: reserved("g.alice.c2", revision),
            upload: None,
        };
        taken.keep();
        drop(taken);
        assert!(matches!(claim("g.alice.c2").await, Claimed::Earlier { .. }));

        // a release of an entry that another attempt made since leaves it
        let Claimed::New { revision: first } = claim("g.alice.c3").await else {
            panic!("a new key");
        };
        assert!(log.release("g.alice.c3", first).await.expect("released"));
        assert!(matches!(claim("g.alice.c3").await, Claimed::New { .. }));
        assert!(!log.release("g.alice.c3", first).await.expect("answered"));
        assert!(matches!(claim("g.alice.c3").await, Claimed::Earlier { .. }));

        // an attempt published again as lost renews its entry first: the
        // lost attempt's give-back, however late, leaves it
        let Claimed::New { revision: lost } = claim("g.alice.c4").await else {
            panic!("a new key");
        };
        let Claimed::Earlier { revision, .. } = claim("g.alice.c4").await else {
            panic!("the earlier attempt");
        };
        assert_eq!(revision, lost);
        let renewed = log.renew("g.alice.c4", &record, revision, None).await;
        assert!(matches!(renewed, Ok(Some(r)) if r > lost), "{renewed:?}");
        let late = Reservation::new(log.clone(), "g.alice.c4".into(), lost);
        late.release().await;
        assert!(matches!(claim("g.alice.c4").await, Claimed::Earlier { .. }));
    }

    #[test]
    fn a_message_whose_sender_went_away_leaves_the_queue_at_once() {
        let (slot, _waiting) = slot_with(&[1, 2, 3]);
        let id = lock(&slot.queue)[1].m.id.clone();
        drop(Withdraw {
            slot: &slot,
            id: &id,
            armed: true,
        });
        assert_eq!(
            sizes(&lock(&slot.queue).drain(..).collect::<Vec<_>>()),
            [1, 3]
        );
        // a sender that got its answer withdraws nothing
        let (slot, _waiting) = slot_with(&[1]);
        let id = lock(&slot.queue)[0].m.id.clone();
        drop(Withdraw {
            slot: &slot,
            id: &id,
            armed: false,
        });
        assert_eq!(lock(&slot.queue).len(), 1);
    }

    #[test]
    fn a_message_that_waited_too_long_is_not_sent_and_its_sender_told() {
        let (slot, mut waiting) = slot_with(&[1, 2]);
        let long_ago = std::time::Instant::now()
            .checked_sub(std::time::Duration::from_secs(20))
            .expect("the clock is past 20 s");
        lock(&slot.queue)[0].queued_at = long_ago;
        let limit = std::time::Duration::from_secs(15);
        assert_eq!(sizes(&take_batch(&slot, 64, limit)), [2]);
        let told = waiting.remove(0).try_recv().expect("settled");
        assert!(told.is_err(), "not sent: {told:?}");
    }
}
