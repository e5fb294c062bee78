//! Group messages (seed §2 and §4).

use crate::{DomainError, Limits, UserId};

pub use crate::id::{ClientMsgId, MessageId};

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Text,
    Image,
    Video,
    Audio,
}

impl MessageKind {
    /// The kind as the protocol spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Image => "image",
            Self::Video => "video",
            Self::Audio => "audio",
        }
    }

    /// Parses the protocol's spelling.
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        match s {
            "text" => Ok(Self::Text),
            "image" => Ok(Self::Image),
            "video" => Ok(Self::Video),
            "audio" => Ok(Self::Audio),
            other => Err(DomainError::Invalid(format!(
                "unknown message type {:?}: use text, image, video or audio",
                other.chars().take(32).collect::<String>()
            ))),
        }
    }
}

/// Checks the text of a text message.
pub fn check_text(text: &str, limits: &Limits) -> Result<(), DomainError> {
    if text.trim().is_empty() {
        return Err(DomainError::Invalid("text must not be empty".into()));
    }
    if text.len() > limits.text_bytes {
        return Err(DomainError::TooLarge(format!(
            "text is {} bytes; the limit is {}",
            text.len(),
            limits.text_bytes
        )));
    }
    if let Some(c) = crate::text::forbidden_in_text(text) {
        return Err(DomainError::Invalid(format!(
            "text must not contain bidi overrides, isolates or control characters (found U+{:04X})",
            u32::from(c)
        )));
    }
    Ok(())
}

/// Longest reaction, in bytes of UTF-8.
pub const EMOJI_MAX_BYTES: usize = 32;
/// Most different reactions one message can have.
pub const REACTIONS_PER_MESSAGE_MAX: usize = 20;
/// Most reactions one user can have on one message.
pub const REACTIONS_PER_USER_MAX: usize = 10;

/// Checks a reaction: an emoji (or a short sequence of them), 1 to
/// [`EMOJI_MAX_BYTES`] bytes with no ASCII (so no letters, digits, `.`
/// or `$`), no white space, no control characters and no invisible
/// characters but the joiners and variation selectors emoji use.
pub fn check_emoji(emoji: &str) -> Result<(), DomainError> {
    let bad = || {
        DomainError::Invalid(format!(
            "a reaction is an emoji of 1 to {EMOJI_MAX_BYTES} bytes"
        ))
    };
    if emoji.is_empty() || emoji.len() > EMOJI_MAX_BYTES {
        return Err(bad());
    }
    let allowed = |c: char| {
        let format_ok = matches!(c, '\u{200D}' | '\u{FE0E}' | '\u{FE0F}')
            || ('\u{E0020}'..='\u{E007F}').contains(&c);
        !c.is_ascii()
            && !c.is_whitespace()
            && !c.is_control()
            && (!crate::text::is_format(c) || format_ok)
    };
    if emoji.chars().all(allowed) {
        Ok(())
    } else {
        Err(bad())
    }
}

/// Distinct `@user` candidates a message is looked at for.
pub const MENTION_CANDIDATES_MAX: usize = 20;

/// The users `text` names with `@user`, distinct, in order of first
/// appearance, at most [`MENTION_CANDIDATES_MAX`]. A mention is `@` at the
/// start of the text or after a character that cannot be in an id (so an
/// address such as `bob@example.com` names nobody), followed by a valid
/// user id, which runs to the first character that cannot be in one. Who
/// of them is a member is for the caller to check.
pub fn mention_candidates(text: &str) -> Vec<UserId> {
    let id_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    let mut out: Vec<UserId> = Vec::new();
    let mut prev: Option<char> = None;
    for (i, c) in text.char_indices() {
        let starts = c == '@' && !prev.is_some_and(id_char);
        prev = Some(c);
        if !starts {
            continue;
        }
        let rest = &text[i + 1..];
        let end = rest.find(|c: char| !id_char(c)).unwrap_or(rest.len());
        if let Ok(user) = UserId::parse(&rest[..end])
            && !out.contains(&user)
        {
            out.push(user);
            if out.len() == MENTION_CANDIDATES_MAX {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod emoji_tests {
    use super::*;

    #[test]
    fn reactions_are_short_emoji() {
        for ok in ["👍", "❤️", "👨‍👩‍👧", "🏳️‍🌈", "🇫🇷", "😂😂"]
        {
            assert_eq!(check_emoji(ok), Ok(()), "{ok}");
        }
        let long = "😀".repeat(EMOJI_MAX_BYTES / 4 + 1);
        for bad in [
            "",
            "+1",
            "a",
            " ",
            "👍 ",
            "👍.",
            "$👍",
            "\u{202E}👍",
            "\u{200B}",
            &long,
        ] {
            assert!(check_emoji(bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod mention_tests {
    use super::*;

    fn names(text: &str) -> Vec<String> {
        mention_candidates(text)
            .into_iter()
            .map(UserId::into_string)
            .collect()
    }

    #[test]
    fn mentions_are_at_signs_before_ids() {
        assert_eq!(names("@bob hi"), ["bob"]);
        assert_eq!(names("hi @bob, @carol_1 and @bob!"), ["bob", "carol_1"]);
        assert_eq!(names("(@a-b)"), ["a-b"]);
        assert!(names("mail bob@example.com").is_empty());
        assert!(names("@ alone, @@, @.x").is_empty());
        assert_eq!(names("@@bob"), ["bob"], "the second @ follows a non-id");
        assert_eq!(names("é@bob"), ["bob"]);
    }

    #[test]
    fn overlong_names_and_too_many_candidates_are_bounded() {
        let long = format!("@{}", "x".repeat(UserId::MAX_LEN + 1));
        assert!(names(&long).is_empty());
        let many: String = (0..50).map(|i| format!("@u{i} ")).collect();
        let got = names(&many);
        assert_eq!(got.len(), MENTION_CANDIDATES_MAX);
        assert_eq!(got[0], "u0");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_limits() {
        let limits = Limits {
            text_bytes: 4,
            ..Limits::default()
        };
        assert!(check_text("abcd", &limits).is_ok());
        assert!(matches!(
            check_text("abcde", &limits),
            Err(DomainError::TooLarge(_))
        ));
        // the limit counts bytes, not characters
        assert!(matches!(
            check_text("ééé", &limits),
            Err(DomainError::TooLarge(_))
        ));
        assert!(matches!(
            check_text(" \n", &limits),
            Err(DomainError::Invalid(_))
        ));
        assert!(MessageKind::parse("sticker").is_err());
        assert_eq!(
            MessageKind::parse("audio").map(MessageKind::as_str),
            Ok("audio")
        );
    }
}

/// What media may be uploaded: MIME types and the largest size per kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPolicy {
    pub image_types: Vec<String>,
    pub video_types: Vec<String>,
    pub audio_types: Vec<String>,
    pub image_max_bytes: u64,
    pub video_max_bytes: u64,
    pub audio_max_bytes: u64,
    /// Uploads one user may hold that no message uses yet (each stays in
    /// the object store until the cleaner deletes it), and their bytes.
    pub open_uploads_per_user: u64,
    pub open_upload_bytes_per_user: u64,
}

impl Default for MediaPolicy {
    fn default() -> Self {
        let list = |s: &[&str]| s.iter().map(|t| t.to_string()).collect();
        Self {
            image_types: list(&["image/jpeg", "image/png", "image/gif", "image/webp"]),
            video_types: list(&["video/mp4", "video/webm", "video/quicktime"]),
            audio_types: list(&[
                "audio/mpeg",
                "audio/mp4",
                "audio/ogg",
                "audio/webm",
                "audio/wav",
            ]),
            image_max_bytes: 10 * 1024 * 1024,
            video_max_bytes: 100 * 1024 * 1024,
            audio_max_bytes: 20 * 1024 * 1024,
            open_uploads_per_user: 50,
            open_upload_bytes_per_user: 2 * 1024 * 1024 * 1024,
        }
    }
}

impl MediaPolicy {
    /// Checks the operator's type lists: each names plain types of its own
    /// kind (`image/…` for images and so on, no parameters), and none a
    /// browser runs scripts from when the object is opened on the bucket's
    /// origin (`image/svg+xml`).
    pub fn validate(&self) -> Result<(), DomainError> {
        for (kind, types) in [
            ("image", &self.image_types),
            ("video", &self.video_types),
            ("audio", &self.audio_types),
        ] {
            for t in types {
                let plain = t
                    .strip_prefix(kind)
                    .and_then(|rest| rest.strip_prefix('/'))
                    .is_some_and(|sub| {
                        !sub.is_empty()
                            && sub.bytes().all(|b| {
                                b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b)
                            })
                    });
                if !plain {
                    return Err(DomainError::Invalid(format!(
                        "{t:?} is not a {kind} type (`{kind}/<subtype>`, lowercase, no parameters)"
                    )));
                }
                if t == "image/svg+xml" {
                    return Err(DomainError::Invalid(
                        "image/svg+xml may carry scripts that run when the image is opened: it cannot be an image type".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks that `kind` may carry `mime` at `size` bytes.
    pub fn check(&self, kind: MessageKind, mime: &str, size: u64) -> Result<(), DomainError> {
        let (types, max) = match kind {
            MessageKind::Image => (&self.image_types, self.image_max_bytes),
            MessageKind::Video => (&self.video_types, self.video_max_bytes),
            MessageKind::Audio => (&self.audio_types, self.audio_max_bytes),
            MessageKind::Text => {
                return Err(DomainError::Invalid("text messages carry no media".into()));
            }
        };
        if !types.iter().any(|t| t == mime) {
            return Err(DomainError::Invalid(format!(
                "{} media must be one of {}",
                kind.as_str(),
                types.join(", ")
            )));
        }
        if size == 0 {
            return Err(DomainError::Invalid("size must be at least 1 byte".into()));
        }
        if size > max {
            return Err(DomainError::TooLarge(format!(
                "{} media may be at most {max} bytes; this is {size}",
                kind.as_str()
            )));
        }
        Ok(())
    }

    /// Checks that a user who holds `open` unused uploads of `open_bytes`
    /// in all may have one more of `size` bytes.
    pub fn check_open(&self, open: u64, open_bytes: u64, size: u64) -> Result<(), DomainError> {
        if open >= self.open_uploads_per_user {
            return Err(DomainError::TooLarge(format!(
                "you hold {open} uploads no message uses yet, the most allowed: send them, or wait until unused ones are deleted"
            )));
        }
        if open_bytes.saturating_add(size) > self.open_upload_bytes_per_user {
            return Err(DomainError::TooLarge(format!(
                "your uploads no message uses yet would take {} bytes, over the {} allowed: send them, or wait until unused ones are deleted",
                open_bytes.saturating_add(size),
                self.open_upload_bytes_per_user
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod media_tests {
    use super::*;

    #[test]
    fn an_operator_s_type_lists_name_plain_types_of_their_kind_and_no_svg() {
        assert!(MediaPolicy::default().validate().is_ok());
        let with_image = |t: &str| MediaPolicy {
            image_types: vec!["image/png".into(), t.into()],
            ..MediaPolicy::default()
        };
        assert!(with_image("image/avif").validate().is_ok());
        for bad in [
            "image/svg+xml",
            "text/html",
            "video/mp4",
            "image/png; charset=utf-8",
            "image/",
            "Image/PNG",
            "image",
        ] {
            assert!(with_image(bad).validate().is_err(), "{bad}");
        }
        let audio = MediaPolicy {
            audio_types: vec!["image/png".into()],
            ..MediaPolicy::default()
        };
        assert!(audio.validate().is_err(), "an image type among audio types");
    }

    #[test]
    fn media_policy_checks_type_and_size() {
        let p = MediaPolicy {
            image_max_bytes: 10,
            ..MediaPolicy::default()
        };
        assert!(p.check(MessageKind::Image, "image/png", 10).is_ok());
        assert!(matches!(
            p.check(MessageKind::Image, "image/png", 11),
            Err(DomainError::TooLarge(_))
        ));
        assert!(matches!(
            p.check(MessageKind::Image, "image/png", 0),
            Err(DomainError::Invalid(_))
        ));
        assert!(matches!(
            p.check(MessageKind::Image, "video/mp4", 5),
            Err(DomainError::Invalid(_))
        ));
        assert!(matches!(
            p.check(MessageKind::Text, "image/png", 5),
            Err(DomainError::Invalid(_))
        ));
        assert!(p.check(MessageKind::Audio, "audio/ogg", 5).is_ok());
    }

    #[test]
    fn a_user_holds_a_bounded_number_and_size_of_unused_uploads() {
        let p = MediaPolicy {
            open_uploads_per_user: 3,
            open_upload_bytes_per_user: 100,
            ..MediaPolicy::default()
        };
        assert!(p.check_open(0, 0, 100).is_ok());
        assert!(p.check_open(2, 60, 40).is_ok());
        assert!(matches!(
            p.check_open(3, 0, 1),
            Err(DomainError::TooLarge(_))
        ));
        assert!(matches!(
            p.check_open(2, 60, 41),
            Err(DomainError::TooLarge(_))
        ));
    }
}
