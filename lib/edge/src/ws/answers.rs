//! What replies a device catches up on answer, as it is now.
//!
//! A reply carries a preview of the message it answers, sealed with it
//! when it was sent. Live, that is what the answered message says. A device
//! catching up later reads the reply from the stream as it was sent, while
//! the answered message may have been edited or deleted since: it must not
//! hand on text its sender changed or took back. So the catch-up asks a
//! worker (`Messages/Answered`) what became of the answered message and
//! writes the reply as history would show it now. Only replies with a
//! preview ask (a group with `joined` history has none), and answers are
//! shared by every catch-up on this edge for a moment.

use std::time::Instant;

use super::*;

/// How long an answer is shared: catch-ups after an outage meet the same
/// replies by the hundred within it. A change made meanwhile still reaches
/// the device, as its `a_message_updated` or `a_message_deleted` later in
/// the stream.
const SHARED_FOR: Duration = Duration::from_secs(2);

/// Most answers kept; past it the oldest go.
const MAX_ANSWERS: usize = 4096;

/// What became of an answered message.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Now {
    Unchanged,
    Edited(String),
    Deleted,
}

/// Answers recently given, by group and answered message, with when.
pub(crate) struct Answers(Recent<(String, String), (Instant, Now)>);

/// The bytes of edited texts the answers hold at most: a client picks
/// them (up to 16 KiB each).
const MAX_ANSWER_BYTES: usize = 8 << 20;

impl Default for Answers {
    fn default() -> Self {
        Self(Recent::new(
            MAX_ANSWERS,
            MAX_ANSWER_BYTES,
            |(_, now)| match now {
                Now::Edited(text) => text.len(),
                Now::Unchanged | Now::Deleted => 0,
            },
        ))
    }
}

impl Answers {
    fn get(&self, key: &(String, String)) -> Option<Now> {
        self.0
            .get(key, |(at, _)| at.elapsed() < SHARED_FOR)
            .map(|(_, now)| now)
    }

    fn put(&self, key: (String, String), now: Now) {
        self.0.put(key, (Instant::now(), now));
    }
}

/// The frame of `view`, a reply in `group` that `user`'s device catches up
/// on, showing what it answers as it is now; `text` (its frame as sent)
/// if that did not change. If that cannot be told now, the reply goes
/// without a preview: never a text that may have been taken back, and
/// never held up (the catch-up of a group without `joined` history needs
/// no worker otherwise).
pub(super) async fn answered_now(
    app: &AppState,
    user: &UserId,
    group: &str,
    view: &MessageView,
    text: Utf8Bytes,
) -> Utf8Bytes {
    let Some(reply) = &view.reply_to else {
        return text;
    };
    let key = (group.to_owned(), reply.message_id.clone());
    let now = match app.answers.get(&key) {
        Some(now) => Some(now),
        None => {
            let asked = rpc!(
                app,
                MessagesClient,
                answered,
                pb::AnsweredRequest {
                    caller: user.to_string(),
                    group_id: group.to_owned(),
                    message_ids: vec![reply.message_id.clone()],
                }
            );
            match asked {
                Ok(r) => {
                    let now = match r.into_inner().changed.into_iter().next() {
                        None => Now::Unchanged,
                        Some(c) if c.deleted => Now::Deleted,
                        Some(c) => Now::Edited(c.preview),
                    };
                    app.answers.put(key, now.clone());
                    Some(now)
                }
                Err(e) => {
                    tracing::warn!(group, answered = %reply.message_id, error = %e, "cannot tell what became of an answered message; the reply goes without its preview");
                    None
                }
            }
        }
    };
    let mut reply = reply.clone();
    match now {
        Some(Now::Unchanged) => return text,
        Some(Now::Edited(preview)) => reply.preview = Some(preview),
        Some(Now::Deleted) => {
            reply.preview = None;
            reply.deleted = true;
        }
        None => reply.preview = None,
    }
    let mut view = view.clone();
    view.reply_to = Some(reply);
    to_json(&ServerFrame {
        event: event::GROUP_MESSAGE.into(),
        id: None,
        data: view,
    })
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_bounded_and_keyed_by_group() {
        let answers = Answers::default();
        let key = |g: &str, m: usize| (g.to_owned(), format!("m{m}"));
        answers.put(key("g", 0), Now::Deleted);
        assert_eq!(answers.get(&key("g", 0)), Some(Now::Deleted));
        assert_eq!(answers.get(&key("h", 0)), None, "another group's");
        for m in 1..=MAX_ANSWERS {
            answers.put(key("g", m), Now::Unchanged);
        }
        assert_eq!(answers.get(&key("g", 0)), None, "the oldest went");
        assert_eq!(answers.get(&key("g", MAX_ANSWERS)), Some(Now::Unchanged));
        assert_eq!(answers.0.len(), MAX_ANSWERS);
    }

    #[test]
    fn edited_texts_are_kept_within_their_bytes() {
        let answers = Answers::default();
        let text = "x".repeat(16 * 1024);
        let fit = MAX_ANSWER_BYTES / text.len();
        for m in 0..=fit {
            answers.put(("g".to_owned(), format!("m{m}")), Now::Edited(text.clone()));
        }
        assert_eq!(answers.0.len(), fit, "one more than fits: the oldest went");
        assert_eq!(answers.get(&("g".to_owned(), "m0".to_owned())), None);
    }
}
