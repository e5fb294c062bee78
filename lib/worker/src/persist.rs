//! Behind the stream: every worker pulls from the shared `persist` consumer
//! and writes what it gets into MongoDB in batches (one `insert` command per
//! batch, idempotent by message id), acknowledging a batch only once it is
//! stored. A worker that dies holding a batch leaves it unacknowledged, and
//! JetStream gives it to another worker after the consumer's `ack_wait`; a
//! MongoDB outage holds the batch (kept "in progress" so that it is not
//! handed to another worker meanwhile) until it is written. So a message is
//! in MongoDB if and only if it is in the stream, once persistence has
//! caught up.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use chat_bus::{BusError, Change, Delivered, Persisted};
use chat_domain::{ClientMsgId, GroupId, MessageId, UserId, now_millis};
use chat_protocol::{MentionView, event, format_millis, push_json};
use chat_store::{Mention, Resealed, StoredMessage};

use crate::{State, WorkerError};

/// Most messages written in one command, and the most the consumer hands
/// over ahead of the loop: what waits in the client's buffer is not "in
/// progress", so it must be written within the consumer's `ack_wait` (10 s)
/// or it comes again.
const BATCH: usize = 256;
/// Attempts at a batch's push events (and at a deleted message's object)
/// before it goes on without them.
const PUSH_ATTEMPTS: usize = 5;
/// How often a batch being written is reported in progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);
/// How long a read waits for persistence to catch up before
/// `unavailable` (a dead worker's batch goes to another worker only after
/// the consumer's `ack_wait`, 10 s: reads answer `unavailable` meanwhile).
pub(crate) const CATCH_UP: Duration = Duration::from_secs(5);

/// Runs the persist loop forever, starting it again after any failure,
/// and beside it, in the same task (a panic of either ends both, visibly),
/// the raise of the sent marks it gathers in `marks`.
pub(crate) async fn persist(s: Arc<State>, marks: Arc<SentMarks>) {
    let persisting = async {
        let mut wait = Duration::from_millis(100);
        loop {
            match run(&s, &marks).await {
                Ok(()) => wait = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(error = %e, "persist loop stopped; starting it again");
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
            tokio::time::sleep(wait).await;
        }
    };
    tokio::join!(persisting, raise_sent_marks(&s, &marks));
}

async fn run(s: &State, marks: &SentMarks) -> Result<(), WorkerError> {
    let mut feed = s.bus.persist_feed(BATCH).await?;
    while let Some((batch, failed)) = feed.next().await {
        // how busy the loop is (the sum over time) and how full its batches
        let started = std::time::Instant::now();
        metrics::histogram!("chat_persist_batch_size").record(batch.len() as f64);
        store(s, batch, marks).await;
        metrics::histogram!("chat_persist_batch_seconds").record(started.elapsed());
        if let Some(e) = failed {
            return Err(e.into());
        }
    }
    Ok(())
}

/// Writes one batch, however long MongoDB takes to come back, then
/// acknowledges it.
async fn store(s: &State, batch: Vec<Delivered>, marks: &SentMarks) {
    let mut rows = Vec::with_capacity(batch.len());
    let mut stored_at = Vec::with_capacity(batch.len());
    let mut keep = Vec::with_capacity(batch.len());
    let mut mentions = Vec::new();
    let mut changes = Vec::new();
    for m in batch {
        let read = m.read();
        if let Ok(p) = &read
            && p.envelope.change.is_some()
        {
            match to_change(p) {
                Ok(c) => {
                    changes.push(c);
                    keep.push(m);
                }
                Err(e) => {
                    metrics::counter!("chat_persist_rejected_total").increment(1);
                    tracing::error!(error = %e, "not a change envelope; left out of MongoDB");
                    let _ = m.reject().await;
                }
            }
            continue;
        }
        match read.and_then(|p| Ok((to_stored(&p)?, p.stored_at_ms, p))) {
            Ok((row, at, p)) => {
                mentions.extend(mentions_of(&p, &row));
                rows.push(row);
                stored_at.push(at);
                keep.push(m);
            }
            Err(e) => {
                // never a message of ours: it would block the others forever
                metrics::counter!("chat_persist_rejected_total").increment(1);
                tracing::error!(error = %e, "not a message envelope; left out of MongoDB");
                let _ = m.reject().await;
            }
        }
    }
    // written however long MongoDB takes to come back (it is the only way
    // on for these messages)
    let write = async {
        let mut wait = Duration::from_millis(100);
        let new = loop {
            match s.store.messages.project(&rows).await {
                Ok(new) => break new,
                Err(e) => {
                    metrics::counter!("chat_persist_failures_total").increment(1);
                    tracing::warn!(error = %e, n = rows.len(), "cannot persist a batch yet; holding it");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        };
        // then the batch's edits and deletes, in stream order (their
        // messages were in MongoDB before they were published: the change
        // waited for that); each applies once, whatever comes again
        while let Err(e) = apply_changes(s, &changes).await {
            metrics::counter!("chat_persist_failures_total").increment(1);
            tracing::warn!(error = %e, n = changes.len(), "cannot apply a batch's changes yet; holding it");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
        // the batch's mentions, recorded and told, both idempotent: a batch
        // delivered again tells nobody twice within the stream's duplicate
        // window, which is far longer than the consumer's `ack_wait`
        while let Err(e) = mention(s, &mentions).await {
            metrics::counter!("chat_persist_failures_total").increment(1);
            tracing::warn!(error = %e, n = mentions.len(), "cannot record or tell a batch's mentions yet; holding it");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
        // and the push hook, once (the message id de-duplicates); a
        // notification is not worth holding every group's persistence
        // for: after a few attempts the batch goes on without it
        let pushing = s.config.push || s.config.webhook.is_some();
        let mut attempts = 0;
        while pushing && let Err(e) = crate::push::push(s, &rows, &mentions).await {
            attempts += 1;
            if attempts >= PUSH_ATTEMPTS {
                metrics::counter!("chat_push_dropped_total").increment(rows.len() as u64);
                tracing::error!(error = %e, n = rows.len(), "push events of a batch given up");
                break;
            }
            tracing::warn!(error = %e, n = rows.len(), "cannot publish a batch's push events yet");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
        new
    };
    tokio::pin!(write);
    // meanwhile the batch stays with this worker: "in progress" well within
    // the consumer's ack_wait (10 s), whether a write is slow or held
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    let new = loop {
        tokio::select! {
            new = &mut write => break new,
            _ = tick.tick() => {
                for m in &keep {
                    let _ = m.in_progress().await;
                }
            }
        }
    };
    tracing::debug!(n = rows.len(), new, "persisted a batch");
    metrics::counter!("chat_persisted_total").increment(new as u64);
    let now = now_millis();
    for at in stored_at {
        let lag = (now - at).max(0) as f64 / 1e3;
        metrics::histogram!("chat_persist_lag_seconds").record(lag);
    }
    for m in keep {
        if let Err(e) = m.ack().await {
            // delivered again after ack_wait, and stored again idempotently
            tracing::debug!(error = %e, "cannot acknowledge a persisted message");
        }
    }
    marks.add(
        rows.iter()
            .filter_map(|m| Some((&m.group_id, &m.sender_id, m.seq?))),
    );
}

/// Sending a message marks everything before it read for its sender: the
/// newest seq of each sender's own messages, by group (a sent watermark,
/// which unread counts take as read). It is kept apart from the read
/// watermark, so the sender's next acknowledgement still rises and is
/// pushed as `a_message_status`.
///
/// The persist loop adds its batches' marks here and goes on; beside it,
/// [`raise_sent_marks`] raises what gathered, every group at once (the
/// write batcher makes that one command, up to 256 statements). Raised by
/// the loop, one group after the other, each waiting for its own journal
/// flush, they took four fifths of the loop's time and persistence fell
/// ten seconds behind at 2,000 sends/s on three replicas; gathered, a
/// raise costs one statement per sender and group however many messages
/// came. A mark leaves the map only once written: a raise that failed is
/// tried again, and what a stopping worker still holds is written on its
/// way out ([`SentMarks::raise`] within `FINAL_RAISE`). Only a worker
/// killed outright loses the marks it held; the sender's next message
/// raises past them.
#[derive(Debug, Default)]
pub(crate) struct SentMarks {
    newest: std::sync::Mutex<Marks>,
    gathered: tokio::sync::Notify,
}

/// Newest seq by group and sender.
type Marks = BTreeMap<GroupId, BTreeMap<UserId, u64>>;

/// How long a stopping worker tries to write the sent marks it holds.
pub(crate) const FINAL_RAISE: Duration = Duration::from_secs(2);

impl SentMarks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.newest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gathers the marks of a persisted batch: (group, sender, seq).
    fn add<'a>(&self, sent: impl IntoIterator<Item = (&'a GroupId, &'a UserId, u64)>) {
        let mut newest = self.lock();
        let mut any = false;
        for (group, sender, seq) in sent {
            let top = match newest.get_mut(group) {
                Some(g) => g.entry(sender.clone()).or_default(),
                None => newest
                    .entry(group.clone())
                    .or_default()
                    .entry(sender.clone())
                    .or_default(),
            };
            *top = (*top).max(seq);
            any = true;
        }
        if any {
            self.gathered.notify_one();
        }
    }

    /// Writes what is gathered with `write` (one group's senders at a
    /// time, all groups at once); what was written leaves the map unless it
    /// rose meanwhile, what failed stays for the next attempt. True if
    /// everything was written.
    async fn raise_with<F, Fut>(&self, write: F) -> bool
    where
        F: Fn(GroupId, Vec<(UserId, u64)>) -> Fut,
        Fut: Future<Output = Result<(), WorkerError>>,
    {
        let gathered = self.lock().clone();
        let writes = gathered.iter().map(|(group, senders)| {
            let sent = senders.iter().map(|(u, seq)| (u.clone(), *seq)).collect();
            let done = write(group.clone(), sent);
            async move {
                let done = done.await;
                if let Err(e) = &done {
                    tracing::warn!(group = %group, error = %e, "cannot mark the senders' own messages read yet");
                }
                done.is_ok()
            }
        });
        let written = futures::future::join_all(writes).await;
        let mut newest = self.lock();
        for ((group, senders), ok) in gathered.iter().zip(&written) {
            if !ok {
                continue;
            }
            if let Some(now) = newest.get_mut(group) {
                now.retain(|user, seq| senders.get(user).is_none_or(|w| *seq > *w));
                if now.is_empty() {
                    newest.remove(group);
                }
            }
        }
        written.into_iter().all(|ok| ok)
    }

    /// Writes what is gathered into `sent_marks`.
    pub(crate) async fn raise(&self, s: &State) -> bool {
        self.raise_with(|group, sent| async move {
            Ok(s.store.messages.raise_sent(&group, &sent).await?)
        })
        .await
    }
}

/// Raises the gathered sent marks, one write at a time, for as long as the
/// persist loop runs; a failed write is tried again, backing off.
async fn raise_sent_marks(s: &State, marks: &SentMarks) {
    let mut wait = Duration::from_millis(100);
    loop {
        marks.gathered.notified().await;
        while !marks.raise(s).await {
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        wait = Duration::from_millis(100);
    }
}

/// The members `p` mentions, as the send checked them.
fn mentions_of(p: &Persisted, row: &StoredMessage) -> Vec<Mention> {
    p.envelope
        .mentions
        .iter()
        .filter_map(|u| UserId::parse(u.as_str()).ok())
        .map(|user| Mention {
            user,
            group: row.group_id.clone(),
            message: row.id.clone(),
            seq: row.seq.unwrap_or_default(),
            sender: row.sender_id.clone(),
            created_at: row.created_at,
        })
        .collect()
}

/// Records `mentions` and tells each member, live or on reconnect
/// (`a_mention` in the member's notifications); not those of a group
/// deleted since the message was sent (one read per group that has any).
async fn mention(s: &State, mentions: &[Mention]) -> Result<(), WorkerError> {
    if mentions.is_empty() {
        return Ok(());
    }
    let mut deleted = Vec::new();
    let groups: std::collections::BTreeSet<&GroupId> = mentions.iter().map(|m| &m.group).collect();
    for group in groups {
        if s.store.groups.settings(group).await?.is_none() {
            deleted.push(group);
        }
    }
    let kept: Vec<Mention> = mentions
        .iter()
        .filter(|m| !deleted.contains(&&m.group))
        .cloned()
        .collect();
    if kept.is_empty() {
        return Ok(());
    }
    let mentions = kept.as_slice();
    s.store.mentions.record(mentions).await?;
    for m in mentions {
        let view = MentionView {
            group_id: m.group.to_string(),
            message_id: m.message.to_string(),
            seq: m.seq,
            sender_id: m.sender.to_string(),
            created_at: format_millis(m.created_at),
        };
        let payload = push_json(event::MENTION, &view)
            .map_err(|e| WorkerError::Domain(chat_domain::DomainError::Invalid(e.to_string())))?;
        s.bus
            .publish_user_event(
                &m.user,
                &format!("mention-{}-{}", m.message, m.user),
                payload.into(),
            )
            .await?;
        metrics::counter!("chat_mentions_total").increment(1);
    }
    Ok(())
}

/// An edit or delete as the stream holds it.
struct ChangeRow {
    id: MessageId,
    change: Change,
    /// Its stream sequence: a newer change is never undone by an older one.
    version: u64,
    by: UserId,
    at: chat_domain::Millis,
    /// An edit's new content.
    content: Resealed,
}

/// Why a delivery of the persist consumer is no envelope of ours.
fn unreadable(p: &Persisted, what: &str, why: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("stream message {} {what}: {why}", p.stream_seq))
}

/// The sealed content an envelope carries, decoded.
fn sealed_in(p: &Persisted) -> Result<Resealed, BusError> {
    let e = &p.envelope;
    Ok(Resealed {
        key_id: e.key_id.clone(),
        nonce: B64
            .decode(&e.nonce)
            .map_err(|x| unreadable(p, "nonce", x))?,
        ciphertext: B64
            .decode(&e.ciphertext)
            .map_err(|x| unreadable(p, "ciphertext", x))?,
        binding: e.binding,
    })
}

fn to_change(p: &Persisted) -> Result<ChangeRow, BusError> {
    let e = &p.envelope;
    Ok(ChangeRow {
        id: MessageId::parse(e.message_id.as_str()).map_err(|x| unreadable(p, "id", x))?,
        change: e.change.ok_or_else(|| unreadable(p, "change", "none"))?,
        version: p.stream_seq,
        by: UserId::parse(e.changed_by.as_str()).map_err(|x| unreadable(p, "author", x))?,
        at: e.created_at,
        content: sealed_in(p)?,
    })
}

/// Applies edits and deletes to MongoDB, in order (a failure of MongoDB
/// holds the batch, as for messages). A deleted media message's object is
/// removed from the store first, so that the record that names it goes
/// last; an object store that keeps refusing (or content that cannot be
/// opened) does not hold every group's persistence: after a few attempts
/// the tombstone is written anyway and the object left, logged with its
/// key for the operator.
async fn apply_changes(s: &State, changes: &[ChangeRow]) -> Result<(), WorkerError> {
    for c in changes {
        match c.change {
            Change::Edit => apply_edit(s, c).await?,
            Change::Delete => {
                let stored = s.store.messages.get(&c.id).await?;
                if let Some(m) = &stored
                    && !m.is_deleted()
                {
                    if m.kind != chat_domain::MessageKind::Text.as_str() {
                        delete_object_of(s, m).await?;
                    }
                    // out of the stream first (again, if this batch comes
                    // again): the message and the one edit of it the
                    // stream still holds (`apply_edit`)
                    for at in [m.stream_seq.unwrap_or(0), m.version] {
                        if at > 0 {
                            s.bus.erase_group_message(at).await?;
                        }
                    }
                }
                // an edit applied since the read above: its envelope too
                if let Some(edit) = s
                    .store
                    .messages
                    .apply_delete(&c.id, c.version, &c.by, c.at)
                    .await?
                    && edit > 0
                    && stored.as_ref().is_none_or(|m| m.version != edit)
                {
                    s.bus.erase_group_message(edit).await?;
                }
            }
        }
        metrics::counter!("chat_changes_applied_total").increment(1);
    }
    Ok(())
}

/// Applies an edit so that the stream holds at most one edit of a message,
/// the newest: the one it replaces leaves the stream before it is written
/// (a device that catches up needs only the newest, and a delete then
/// erases the message and that one edit, so that no deleted text stays in
/// the stream), and an edit that comes too late to apply (a newer one, or
/// the delete, is already there) leaves the stream itself. Each erase
/// happens before what makes it due is written, so a batch delivered again
/// finds it to do again or done.
async fn apply_edit(s: &State, c: &ChangeRow) -> Result<(), WorkerError> {
    // a newer change applied between the read and the write: the next
    // round sees it (the version only rises, so two rounds decide)
    for _ in 0..3 {
        let Some(m) = s.store.messages.get(&c.id).await? else {
            // never stored: nothing to edit (the edit waited for the message)
            return Ok(());
        };
        if m.version == c.version {
            return Ok(());
        }
        if m.is_deleted() || m.version > c.version {
            return Ok(s.bus.erase_group_message(c.version).await?);
        }
        if m.version > 0 {
            s.bus.erase_group_message(m.version).await?;
        }
        if s.store
            .messages
            .apply_edit(&c.id, c.version, &c.content, c.at)
            .await?
        {
            return Ok(());
        }
    }
    Err(WorkerError::Store(chat_store::StoreError::Unavailable(
        format!("too many concurrent changes to message {}", c.id),
    )))
}

/// Serves a deleted media message's object to no one any more (a MongoDB
/// failure holds the batch), then removes it from the store, trying a few
/// times: an object that outlives its message is never given out again.
async fn delete_object_of(s: &State, m: &StoredMessage) -> Result<(), WorkerError> {
    let key = match crate::messages::open_content(s, m).map(|c| c.media) {
        Ok(Some(media)) => media.key,
        Ok(None) => return Ok(()),
        Err(e) => {
            metrics::counter!("chat_media_delete_failures_total").increment(1);
            tracing::error!(message = %m.id, error = %e, "a deleted media message cannot be opened: its object stays");
            return Ok(());
        }
    };
    s.store.uploads.media_deleted(&m.group_id, &key).await?;
    let Some(objects) = s.objects.as_ref() else {
        tracing::warn!(message = %m.id, key, "media storage is not configured: a deleted message's object stays");
        return Ok(());
    };
    let mut wait = Duration::from_millis(100);
    for attempt in 1..=PUSH_ATTEMPTS {
        match objects.delete(&key).await {
            Ok(()) => return Ok(()),
            Err(e) if attempt == PUSH_ATTEMPTS => {
                metrics::counter!("chat_media_delete_failures_total").increment(1);
                tracing::error!(message = %m.id, key, error = %e, "cannot delete a deleted message's object: it stays");
            }
            Err(e) => {
                tracing::warn!(message = %m.id, key, error = %e, "cannot delete a deleted message's object yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
    Ok(())
}

/// The MongoDB record of a message as the stream holds it.
fn to_stored(p: &Persisted) -> Result<StoredMessage, BusError> {
    let e = &p.envelope;
    let bad = |what: &str, why: String| unreadable(p, what, why);
    let id = MessageId::parse(e.message_id.as_str()).map_err(|x| bad("id", x.to_string()))?;
    // envelopes from before the send log carry no client id; their records
    // were written by the send itself and are kept as they are
    let client = if e.client_msg_id.is_empty() {
        e.message_id.as_str()
    } else {
        e.client_msg_id.as_str()
    };
    let sealed = sealed_in(p)?;
    Ok(StoredMessage {
        client_msg_id: ClientMsgId::parse(client).map_err(|x| bad("client id", x.to_string()))?,
        group_id: GroupId::parse(e.group_id.as_str()).map_err(|x| bad("group", x.to_string()))?,
        sender_id: UserId::parse(e.sender_id.as_str()).map_err(|x| bad("sender", x.to_string()))?,
        id,
        kind: e.kind.clone(),
        key_id: sealed.key_id,
        nonce: sealed.nonce,
        ciphertext: sealed.ciphertext,
        binding: sealed.binding,
        seq: Some(e.seq),
        stream_seq: Some(p.stream_seq),
        created_at: e.created_at,
        edited_at: None,
        deleted_at: None,
        version: 0,
    })
}

/// Reads with `read` until `complete` says the result holds everything the
/// stream has for it, or, failing that, until persistence is seen past
/// `group`'s newest message (then reads once more: a message persistence
/// could not store, such as a forged one, stays out). Checking the progress
/// before the second read is what makes "not there" final. `unavailable`
/// after `within`.
pub(crate) async fn read_caught_up<T, R, Fut>(
    s: &State,
    group: &GroupId,
    within: Duration,
    read: R,
    complete: impl Fn(&T) -> bool,
) -> Result<T, WorkerError>
where
    R: Fn() -> Fut,
    Fut: Future<Output = Result<T, WorkerError>>,
{
    let (read, complete) = (&read, &complete);
    caught_up_within(within, Duration::from_millis(200), || async move {
        let v = read().await?;
        if complete(&v) {
            return Ok(Some(v));
        }
        if !persisted_to_tail(s, group).await? {
            return Ok(None);
        }
        Ok(Some(read().await?))
    })
    .await
}

/// Waits until persistence has passed stream sequence `stream_seq` (an
/// edit or delete being applied: asked every 20 ms at most, since a
/// change's answer waits on it); `unavailable` after `CATCH_UP`.
pub(crate) async fn persisted_through(s: &State, stream_seq: u64) -> Result<(), WorkerError> {
    caught_up_within(CATCH_UP, Duration::from_millis(20), || async {
        Ok((s.bus.persisted_through().await? >= stream_seq).then_some(()))
    })
    .await
}

/// Whether persistence has passed `group`'s newest message in the stream.
async fn persisted_to_tail(s: &State, group: &GroupId) -> Result<bool, WorkerError> {
    Ok(match s.bus.last_group_position(group).await? {
        Some(tail) => s.bus.persisted_through().await? >= tail.stream_seq,
        None => true,
    })
}

/// Waits until `ready` says persistence has caught up far enough, for up to
/// `within`, asking at growing intervals up to `most`; `unavailable` after
/// that (MongoDB is down or far behind).
async fn caught_up_within<T, F, Fut>(
    within: Duration,
    most: Duration,
    mut ready: F,
) -> Result<T, WorkerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, WorkerError>>,
{
    let deadline = tokio::time::Instant::now() + within;
    // gentle on the database while it is behind: every poll is a query
    let mut wait = Duration::from_millis(5);
    loop {
        if let Some(v) = ready().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            metrics::counter!("chat_persist_waits_timed_out_total").increment(1);
            return Err(WorkerError::Store(chat_store::StoreError::Unavailable(
                "history is catching up with the stream; retry".into(),
            )));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(most);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (GroupId, GroupId, UserId, UserId) {
        let g = |s: &str| GroupId::parse(s).expect("group");
        let u = |s: &str| UserId::parse(s).expect("user");
        (g("g1"), g("g2"), u("alice"), u("bob"))
    }

    #[tokio::test]
    async fn sent_marks_gather_the_newest_seq_per_sender_and_group() {
        let marks = SentMarks::default();
        let (g1, g2, alice, bob) = ids();
        marks.add([(&g1, &alice, 3), (&g1, &alice, 2), (&g1, &bob, 4)]);
        marks.add([(&g2, &alice, 1), (&g1, &alice, 5)]);
        // the raiser is woken for what gathered
        tokio::time::timeout(Duration::from_secs(5), marks.gathered.notified())
            .await
            .expect("told");
        let written = std::sync::Mutex::new(Vec::new());
        let all = marks
            .raise_with(|group, sent| {
                written.lock().expect("lock").push((group, sent));
                async { Ok(()) }
            })
            .await;
        assert!(all);
        let mut written = written.into_inner().expect("lock");
        written.sort();
        assert_eq!(
            written,
            [
                (g1, vec![(alice.clone(), 5), (bob, 4)]),
                (g2, vec![(alice, 1)])
            ]
        );
        assert!(marks.lock().is_empty(), "written marks are forgotten");
        // nothing to raise: nobody is woken
        marks.add([]);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), marks.gathered.notified())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_failed_raise_keeps_its_marks_and_one_risen_meanwhile_stays() {
        let marks = SentMarks::default();
        let (g1, g2, alice, bob) = ids();
        marks.add([(&g1, &alice, 3), (&g2, &bob, 7)]);
        // g1's write fails; while g2's is under way, bob sends again there
        let all = marks
            .raise_with(|group, _| {
                let failed = group == g1;
                if !failed {
                    marks.add([(&g2, &bob, 9)]);
                }
                async move {
                    if failed {
                        Err(WorkerError::Store(chat_store::StoreError::Unavailable(
                            "mongodb is down".into(),
                        )))
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
        assert!(!all);
        let left = marks.lock().clone();
        assert_eq!(left[&g1], BTreeMap::from([(alice, 3)]), "kept to try again");
        assert_eq!(
            left[&g2],
            BTreeMap::from([(bob, 9)]),
            "the newer mark stays"
        );
    }
}
