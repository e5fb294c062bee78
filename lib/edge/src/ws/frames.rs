//! Group messages opened (decrypted, serialised) once per edge.

use super::*;

/// A group message opened for delivery: the frame every device gets.
#[derive(Clone)]
pub(super) struct Opened {
    pub(super) payload: bytes::Bytes,
    pub(super) text: Utf8Bytes,
    pub(super) seq: u64,
    pub(super) created_at: i64,
    /// What only some members may see, in a group with `joined` history:
    /// each connection's view of the group is checked before it goes out.
    pub(super) restriction: Restriction,
    /// A reply with a preview of what it answers: its view, for a
    /// catch-up to show that as it is now (see `answers.rs`).
    pub(super) answers: Option<Arc<MessageView>>,
}

/// Group messages this edge has opened recently, by stream sequence: the
/// live feed and every catch-up on this edge that meets one of them share
/// one decryption and serialisation (in a group of 1,000 members catching
/// up after an outage, that was 1,000 AES-GCM opens and JSON encodings per
/// message).
pub(crate) struct OpenedFrames(Recent<u64, Opened>);

/// Messages kept opened; a few seconds of traffic at the rates measured.
const OPENED_FRAMES: usize = 4096;
/// Their bytes at most: a user who sends the largest replies could
/// otherwise have every edge keep ~100 KiB for each of them (the sealed
/// envelope, the frame and a reply's second frame), 400 MiB in all.
const OPENED_BYTES: usize = 32 << 20;

impl Default for OpenedFrames {
    fn default() -> Self {
        Self(Recent::new(OPENED_FRAMES, OPENED_BYTES, Opened::bytes))
    }
}

impl Opened {
    /// What it holds in memory.
    fn bytes(&self) -> usize {
        // a reply's view (its text and its preview of what it answers)
        let answers = self.answers.as_deref().map_or(0, |v| {
            v.text.as_ref().map_or(0, String::len)
                + v.reply_to
                    .as_ref()
                    .and_then(|r| r.preview.as_ref())
                    .map_or(0, String::len)
        });
        self.payload.len() + self.text.len() + self.restriction.bytes() + answers
    }
}

impl OpenedFrames {
    pub(super) fn get(&self, stream_seq: u64, payload: &[u8]) -> Option<Opened> {
        // the payload check guards against a stream recreated under the edge
        self.0.get(&stream_seq, |o| o.payload == payload)
    }

    pub(super) fn put(&self, stream_seq: u64, opened: Opened) {
        self.0.put(stream_seq, opened);
    }
}

/// The frame, group seq and restriction (see [`Opened`]) of a group
/// message the live feed read.
pub(crate) fn open_live(
    app: &AppState,
    stream_seq: u64,
    payload: &bytes::Bytes,
) -> Result<(Utf8Bytes, u64, Restriction), String> {
    let opened = opened_at(app, stream_seq, payload)?;
    // live only: a catch-up hands on messages as old as the device's absence
    let age_ms = chat_domain::now_millis()
        .saturating_sub(opened.created_at)
        .max(0);
    metrics::histogram!("chat_delivery_latency_seconds").record(age_ms as f64 / 1000.0);
    Ok((opened.text, opened.seq, opened.restriction))
}

/// The message at `stream_seq`, opened once per edge whichever path reads
/// it first (the live feed, or a catch-up) and kept for the others.
pub(super) fn opened_at(
    app: &AppState,
    stream_seq: u64,
    payload: &bytes::Bytes,
) -> Result<Opened, String> {
    let opened = match app.opened.get(stream_seq, payload) {
        Some(o) => o,
        None => {
            let o = open_envelope(app, payload)?;
            app.opened.put(stream_seq, o.clone());
            o
        }
    };
    Ok(opened)
}

/// Turns a sealed envelope into its frame: `a_group_message`, or for a
/// change `a_message_updated` or `a_message_deleted`.
pub(super) fn open_envelope(app: &AppState, payload: &bytes::Bytes) -> Result<Opened, String> {
    let env: Envelope =
        serde_json::from_slice(payload).map_err(|e| format!("bad envelope: {e}"))?;
    let (created_at, seq, joined_only) = (env.created_at, env.seq, env.joined_only);
    let (text, restriction, answers) = match env.change {
        None => message_frame(app, env)?,
        Some(change) => {
            let restriction = if joined_only {
                Restriction::Change
            } else {
                Restriction::None
            };
            (change_frame(app, env, change)?, restriction, None)
        }
    };
    Ok(Opened {
        payload: payload.clone(),
        text: text.into(),
        seq,
        created_at,
        restriction,
        answers,
    })
}

/// The `a_message_updated` or `a_message_deleted` frame of a change's
/// envelope.
fn change_frame(app: &AppState, env: Envelope, change: Change) -> Result<String, String> {
    Ok(match change {
        Change::Edit => {
            let content = open_content(app, &env)?;
            to_json(&ServerFrame {
                event: event::MESSAGE_UPDATED.into(),
                id: None,
                data: MessageUpdatedView {
                    group_id: env.group_id,
                    message_id: env.message_id,
                    seq: env.seq,
                    sender_id: env.sender_id,
                    text: content["text"].as_str().unwrap_or_default().to_owned(),
                    edited_at: format_millis(env.created_at),
                },
            })
        }
        Change::Delete => to_json(&ServerFrame {
            event: event::MESSAGE_DELETED.into(),
            id: None,
            data: MessageDeletedView {
                group_id: env.group_id,
                message_id: env.message_id,
                seq: env.seq,
                deleted_by: env.changed_by,
                deleted_at: format_millis(env.created_at),
            },
        }),
    })
}

/// The sealed content of an envelope, opened.
fn open_content(app: &AppState, env: &Envelope) -> Result<Value, String> {
    let sealed = Sealed {
        key_id: env.key_id.clone(),
        nonce: B64.decode(&env.nonce).map_err(|e| e.to_string())?,
        ciphertext: B64.decode(&env.ciphertext).map_err(|e| e.to_string())?,
    };
    let binding = MessageBinding {
        message_id: &env.message_id,
        group_id: &env.group_id,
        sender_id: &env.sender_id,
        seq: env.seq,
    };
    let plain = app
        .keys
        .open(&sealed, &binding.aad(env.binding))
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&plain).map_err(|e| e.to_string())
}

/// The `a_group_message` frame of a message's envelope; if it is a reply,
/// the frame without what it answers for those who may not see that (what
/// restricts it, if the envelope says it is restricted), and if it shows a
/// preview of what it answers, its view.
fn message_frame(
    app: &AppState,
    env: Envelope,
) -> Result<(String, Restriction, Option<Arc<MessageView>>), String> {
    let content = open_content(app, &env)?;
    let view = MessageView {
        message_id: env.message_id,
        group_id: env.group_id,
        seq: env.seq,
        sender_id: env.sender_id,
        kind: env.kind,
        text: content["text"].as_str().map(str::to_owned),
        media: serde_json::from_value(content["media"].clone()).ok(),
        created_at: format_millis(env.created_at),
        reply_to: serde_json::from_value(content["replyTo"].clone()).ok(),
        reactions: Vec::new(),
        edited_at: None,
        deleted: false,
        deleted_at: None,
    };
    let answers = view.reply_to.as_ref().map(|r| r.seq);
    let previews = view
        .reply_to
        .as_ref()
        .is_some_and(|r| r.preview.is_some())
        .then(|| Arc::new(view.clone()));
    let mut frame = ServerFrame {
        event: event::GROUP_MESSAGE.into(),
        id: None,
        data: view,
    };
    let text = to_json(&frame);
    let restriction = match answers {
        Some(seq) if env.joined_only => {
            frame.data.reply_to = None;
            Restriction::Reply(Arc::new((seq, to_json(&frame).into())))
        }
        _ => Restriction::None,
    };
    Ok((text, restriction, previews))
}
