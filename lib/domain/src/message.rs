//! Group messages (seed §2 and §4).

use crate::{DomainError, Limits};

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
    Ok(())
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
