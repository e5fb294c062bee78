//! Group messages on JetStream: the envelope (content encrypted), and
//! publishing with per-group compare-and-set so that the group's `seq` is
//! gapless and in the same order as the stream.

use async_nats::jetstream::{
    context::{PublishError, PublishErrorKind},
    stream::{LastRawMessageErrorKind, Stream},
};
use bytes::Bytes;
use chat_domain::{GroupId, MessageId};
use serde::{Deserialize, Serialize};

use crate::{Bus, BusError, MSG_ID, group_msg_subject};

/// The header carrying the group sequence number of a message.
pub const SEQ_HEADER: &str = "Chat-Seq";

/// A group message as published: metadata in the clear, content sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    pub message_id: String,
    pub group_id: String,
    pub seq: u64,
    pub sender_id: String,
    /// The sender's idempotency key, which the MongoDB record keeps; absent
    /// in envelopes written before the stream became the write-ahead log.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_msg_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub created_at: i64,
    pub key_id: String,
    /// base64
    pub nonce: String,
    /// base64
    pub ciphertext: String,
    /// What the ciphertext is bound to (`chat_crypto::BINDING_V2`: id,
    /// group, sender and seq); absent in envelopes of the first version.
    #[serde(default = "binding_v1", skip_serializing_if = "is_binding_v1")]
    pub binding: u8,
    /// Members the message mentions (`@user`), checked at the send; in the
    /// clear like the sender, so that the persist loop tells them without
    /// opening the content.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<String>,
    /// Set on a change of an earlier message, which takes no `seq` of its
    /// own: the id, `seq`, sender and type are the changed message's, and
    /// an edit's new content is sealed for them (as the original was);
    /// `createdAt` is when the change was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<Change>,
    /// Who made the change (the sender, or for a delete the group's owner).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub changed_by: String,
    /// The group shows each member only what was sent after it joined
    /// (`joined` history): a change reaches a connection only once its
    /// view of the group is checked; a reply (set only on one) reaches a
    /// connection whose view starts after the message it answers without
    /// what it answers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub joined_only: bool,
}

/// What a change envelope does to the message it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    /// New text, sealed in the envelope.
    Edit,
    /// A tombstone: the content is gone.
    Delete,
}

fn binding_v1() -> u8 {
    1
}

fn is_binding_v1(b: &u8) -> bool {
    *b == 1
}

/// Where a group's newest message stands: its group seq and stream seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub seq: u64,
    pub stream_seq: u64,
}

/// The result of a compare-and-set publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored at this stream sequence (possibly earlier: a duplicate id).
    Stored { stream_seq: u64, duplicate: bool },
    /// Another message was published to the group first: read the new
    /// position and try again.
    Conflict,
}

/// The result of publishing a batch of new messages atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchPublished {
    /// All stored, the first at this stream sequence and each of the others
    /// right after the one before it.
    Stored { first_stream_seq: u64 },
    /// Another message was published to the group first: nothing stored.
    Conflict,
    /// The server did not take the batch (too many batches open, a
    /// message of it stored already, the connection down before the
    /// commit went out): nothing stored; publish the messages one by one
    /// instead.
    Refused(String),
    /// Atomic publishes are off on the stream or unknown to the server:
    /// nothing stored; they will stay so for a while.
    Unsupported(String),
}

/// The JetStream error code of a failed publish, if the server answered.
fn error_code(e: &PublishError) -> Option<async_nats::jetstream::ErrorCode> {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
        .map(|j| j.error_code())
}

/// Whether a publish failed for another one of the same subject, nothing
/// stored: the compare-and-set lost (10071), a publish of the subject or
/// the same id is still being replicated (10164, 10158).
pub(crate) fn conflicts(e: &PublishError) -> bool {
    use async_nats::jetstream::ErrorCode;
    e.kind() == PublishErrorKind::WrongLastSequence
        || matches!(
            error_code(e),
            Some(
                ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
                    | ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT
            )
        )
}

/// Most messages nats-server takes in one atomic batch by default.
pub const MAX_BATCH: usize = 1000;

/// Whether a nats-server of `version` (`major.minor.patch`) stores an
/// atomic batch as one: earlier ones ignore the batch headers and would
/// store each message on its own, the compare-and-set on the first only.
fn atomic_batches_in(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| {
        p.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u64>()
            .unwrap_or(0)
    });
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (2, 12)
}

/// What publishing `envelope` on its group's message subject sends: the
/// subject, the headers (de-duplication id `msg_id`, `Chat-Seq` `chat_seq`,
/// and the compare-and-set on the group's last stream sequence, if
/// `expected_last`), and the payload.
fn on_group(
    envelope: &Envelope,
    msg_id: &str,
    chat_seq: u64,
    expected_last: Option<u64>,
) -> Result<(String, async_nats::HeaderMap, Bytes), BusError> {
    let group = GroupId::parse(envelope.group_id.as_str())
        .map_err(|e| BusError::Unavailable(e.to_string()))?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(MSG_ID, msg_id);
    headers.insert(SEQ_HEADER, chat_seq.to_string().as_str());
    if let Some(expected) = expected_last {
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
    }
    let payload = Bytes::from(
        serde_json::to_vec(envelope).map_err(|e| BusError::Unavailable(e.to_string()))?,
    );
    Ok((group_msg_subject(&group), headers, payload))
}

fn seq_of(msg: &async_nats::jetstream::message::StreamMessage) -> Result<u64, BusError> {
    msg.headers
        .get(SEQ_HEADER)
        .and_then(|v| v.as_str().parse().ok())
        .ok_or_else(|| {
            BusError::Unavailable(format!(
                "message {} has no {SEQ_HEADER} header",
                msg.sequence
            ))
        })
}

impl Bus {
    async fn groups_stream(&self) -> Result<Stream<()>, BusError> {
        self.js
            .get_stream_no_info(&self.defs.groups_stream.name)
            .await
            .map_err(BusError::nats)
    }

    /// Purges every message of `group` (each change of one too) from the
    /// stream: a deleted group's. Its membership events stay (they carry
    /// no content, and an edge that has not read them yet still must).
    /// Returns how many it purged.
    pub async fn purge_group_messages(&self, group: &GroupId) -> Result<u64, BusError> {
        let stream = self.groups_stream().await?;
        let done = stream
            .purge()
            .filter(group_msg_subject(group))
            .await
            .map_err(BusError::nats)?;
        Ok(done.purged)
    }

    /// The newest message of `group` still in the stream, if any.
    pub async fn last_group_position(&self, group: &GroupId) -> Result<Option<Position>, BusError> {
        let stream = self.groups_stream().await?;
        match stream
            .get_last_raw_message_by_subject(&group_msg_subject(group))
            .await
        {
            Ok(msg) => Ok(Some(Position {
                seq: seq_of(&msg)?,
                stream_seq: msg.sequence,
            })),
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(BusError::nats(e)),
        }
    }

    /// Publishes `envelope` only if the group's newest message is still at
    /// stream sequence `expected_last` (0: none), with the message id as
    /// JetStream's de-duplication id.
    pub async fn publish_group_message(
        &self,
        envelope: &Envelope,
        expected_last: u64,
    ) -> Result<Published, BusError> {
        self.publish_on_group(envelope, &envelope.message_id, envelope.seq, expected_last)
            .await
    }

    /// Publishes a change of an earlier message (`envelope.change`) on the
    /// group's message subject, so that it has its place in the group's
    /// order for live delivery, catch-up and persistence alike, under
    /// `msg_id` (de-duplication) and with the group's current seq as
    /// `Chat-Seq` (a change takes no seq: the next message still gets
    /// `current_seq + 1`); compare-and-set as for messages.
    pub async fn publish_group_change(
        &self,
        envelope: &Envelope,
        msg_id: &str,
        current_seq: u64,
        expected_last: u64,
    ) -> Result<Published, BusError> {
        self.publish_on_group(envelope, msg_id, current_seq, expected_last)
            .await
    }

    async fn publish_on_group(
        &self,
        envelope: &Envelope,
        msg_id: &str,
        chat_seq: u64,
        expected_last: u64,
    ) -> Result<Published, BusError> {
        let (subject, headers, payload) =
            on_group(envelope, msg_id, chat_seq, Some(expected_last))?;
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await;
        let ack = match ack {
            Ok(future) => future.await,
            Err(e) => return Err(BusError::nats(e)),
        };
        match ack {
            Ok(ack) => Ok(Published::Stored {
                stream_seq: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(e) if conflicts(&e) => Ok(Published::Conflict),
            Err(e) => Err(BusError::nats(e)),
        }
    }

    /// Publishes `envelopes` (new messages of one group, with consecutive
    /// `seq`s) as one atomic batch, only if the group's newest message is
    /// still at stream sequence `expected_last`: all are stored, one after
    /// the other, or none. Each keeps its message id as de-duplication id
    /// (a batch holding one stored already is refused whole). One
    /// acknowledgement for the batch: the messages before the last go out
    /// without a reply subject.
    pub async fn publish_group_batch(
        &self,
        envelopes: &[Envelope],
        expected_last: u64,
    ) -> Result<BatchPublished, BusError> {
        use async_nats::header::{NATS_BATCH_COMMIT, NATS_BATCH_ID, NATS_BATCH_SEQUENCE};
        use async_nats::jetstream::ErrorCode;
        let (Some(first), n) = (envelopes.first(), envelopes.len()) else {
            return Err(BusError::Unavailable("an empty batch".to_owned()));
        };
        if n > MAX_BATCH {
            return Ok(BatchPublished::Refused(format!(
                "{n} messages in one batch, above {MAX_BATCH}"
            )));
        }
        let version = self.client.server_info().version;
        if !atomic_batches_in(&version) {
            return Ok(BatchPublished::Unsupported(format!(
                "nats-server {version} has no atomic batches"
            )));
        }
        // unique among open batches: the first message's fresh id
        let batch_id = first.message_id.as_str();
        let mut ack = None;
        for (i, envelope) in envelopes.iter().enumerate() {
            if envelope.group_id != first.group_id {
                return Err(BusError::Unavailable(
                    "a batch of messages of more than one group".to_owned(),
                ));
            }
            // the compare-and-set on the first message only
            let expected = (i == 0).then_some(expected_last);
            let (subject, mut headers, payload) =
                on_group(envelope, &envelope.message_id, envelope.seq, expected)?;
            headers.insert(NATS_BATCH_ID, batch_id);
            headers.insert(NATS_BATCH_SEQUENCE, (i + 1).to_string().as_str());
            // until the commit has gone out, nothing can be stored
            let unsent =
                |e: &dyn std::fmt::Display| Ok(BatchPublished::Refused(format!("not sent: {e}")));
            if i + 1 < n {
                if let Err(e) = self
                    .client
                    .publish_with_headers(subject, headers, payload)
                    .await
                {
                    return unsent(&e);
                }
            } else {
                headers.insert(NATS_BATCH_COMMIT, "1");
                let future = match self
                    .js
                    .publish_with_headers(subject, headers, payload)
                    .await
                {
                    Ok(future) => future,
                    Err(e) => return unsent(&e),
                };
                ack = Some(future.await);
            }
        }
        let Some(ack) = ack else {
            return Err(BusError::Unavailable("a batch without a commit".to_owned()));
        };
        let refused_codes = [
            ErrorCode::ATOMIC_PUBLISH_INCOMPLETE_BATCH,
            ErrorCode::ATOMIC_PUBLISH_UNSUPPORTED_HEADER,
            ErrorCode::ATOMIC_PUBLISH_TOO_LARGE_BATCH,
            ErrorCode::ATOMIC_PUBLISH_CONTAINS_DUPLICATE_MESSAGE,
            ErrorCode::ATOMIC_PUBLISH_TOO_MANY_INFLIGHT,
        ];
        match ack {
            Ok(ack) => {
                let stored = ack.batch_size.unwrap_or(0);
                if stored != n as u64 || ack.duplicate {
                    // what was stored cannot be told apart: a retry settles it
                    return Err(BusError::Unavailable(format!(
                        "a batch of {n} acknowledged as {stored} stored (duplicate: {})",
                        ack.duplicate
                    )));
                }
                let first_stream_seq = ack.sequence.checked_sub(n as u64 - 1).ok_or_else(|| {
                    BusError::Unavailable(format!(
                        "a batch of {n} acknowledged at stream sequence {}",
                        ack.sequence
                    ))
                })?;
                Ok(BatchPublished::Stored { first_stream_seq })
            }
            Err(e) if conflicts(&e) => Ok(BatchPublished::Conflict),
            Err(e) => match error_code(&e) {
                Some(ErrorCode::ATOMIC_PUBLISH_DISABLED) => {
                    Ok(BatchPublished::Unsupported(e.to_string()))
                }
                Some(code) if refused_codes.contains(&code) => {
                    Ok(BatchPublished::Refused(e.to_string()))
                }
                _ => Err(BusError::nats(e)),
            },
        }
    }

    /// Looks for message `id` among `group`'s messages after stream sequence
    /// `after`, stored no later than `until_ms` if given (ms since the epoch,
    /// nats-server's clock): did an uncertain publish land? If so, where, and
    /// as what. The bound keeps a retry long after its first attempt from
    /// reading hours of a busy group one message at a time.
    pub async fn find_group_message(
        &self,
        group: &GroupId,
        id: &MessageId,
        after: u64,
        until_ms: Option<i64>,
    ) -> Result<Option<(Position, Envelope)>, BusError> {
        let stream = self.groups_stream().await?;
        let subject = group_msg_subject(group);
        let mut next = after + 1;
        loop {
            let msg = stream
                .raw_message_builder()
                .sequence(next)
                .next_by_subject(subject.clone())
                .send()
                .await;
            let msg = match msg {
                Ok(m) => m,
                Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => return Ok(None),
                Err(e) => return Err(BusError::nats(e)),
            };
            let stored_ms = (msg.time.unix_timestamp_nanos() / 1_000_000) as i64;
            if until_ms.is_some_and(|until| stored_ms > until) {
                return Ok(None);
            }
            if msg.headers.get(MSG_ID).map(|v| v.as_str()) == Some(id.as_str()) {
                let envelope: Envelope = serde_json::from_slice(&msg.payload).map_err(|e| {
                    BusError::Unavailable(format!("message {} is no envelope: {e}", msg.sequence))
                })?;
                let position = Position {
                    seq: seq_of(&msg)?,
                    stream_seq: msg.sequence,
                };
                return Ok(Some((position, envelope)));
            }
            next = msg.sequence + 1;
        }
    }

    /// Erases the group message at `stream_seq` from the stream (its bytes
    /// overwritten, not only its index entry: nats-server's default): a
    /// deleted message's sealed content leaves JetStream too, and a device
    /// that catches up later never receives it. Erased already: fine.
    pub async fn erase_group_message(&self, stream_seq: u64) -> Result<(), BusError> {
        let stream = self.groups_stream().await?;
        match stream.delete_message(stream_seq).await {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(e.kind(), async_nats::jetstream::stream::DeleteMessageErrorKind::JetStream(j)
                    if j.error_code() == async_nats::jetstream::ErrorCode::NO_MESSAGE_FOUND) =>
            {
                Ok(())
            }
            Err(e) => Err(BusError::nats(e)),
        }
    }

    /// The raw stored message at `stream_seq` (tests and tools).
    pub async fn group_stream_message(&self, stream_seq: u64) -> Result<Bytes, BusError> {
        let stream = self.groups_stream().await?;
        let msg = stream
            .get_raw_message(stream_seq)
            .await
            .map_err(BusError::nats)?;
        Ok(msg.payload)
    }
}

#[cfg(test)]
mod tests {
    use super::atomic_batches_in;

    #[test]
    fn atomic_batches_from_nats_server_2_12() {
        for v in ["2.12.0", "2.15.1", "2.14.0-RC.1", "3.0.0"] {
            assert!(atomic_batches_in(v), "{v}");
        }
        for v in ["2.11.9", "2.10.22", "1.4.1", "", "garbage"] {
            assert!(!atomic_batches_in(v), "{v}");
        }
    }
}
