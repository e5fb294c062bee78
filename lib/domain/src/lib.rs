//! The chat domain: ids, groups and their members, limits and validation.
//!
//! Plain types only: no serde, no I/O. Every layer above converts to and from
//! these by hand at its own boundary (wire JSON, gRPC, BSON).

mod group;
mod id;
mod limits;
mod search;
pub mod text;

pub use group::{Applied, Group, GroupChange, History, INVITE_TTL_SECS, Invite, Member, Pin};
pub use id::{DeviceId, GroupId, UserId};
pub use limits::Limits;
pub use search::{SEARCH_QUERY_MAX_CHARS, SEARCH_QUERY_MAX_WORDS, SearchQuery};

/// Why a domain rule refused an input or an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    /// The input is malformed (bad id, empty name, ...).
    #[error("{0}")]
    Invalid(String),
    /// The input is well-formed but over a configured limit.
    #[error("{0}")]
    TooLarge(String),
    /// The caller is not allowed to do this.
    #[error("{0}")]
    Forbidden(String),
    /// The operation conflicts with the current state (for example the owner
    /// leaving without transferring ownership first).
    #[error("{0}")]
    Conflict(String),
}

/// Milliseconds since the Unix epoch: the one time representation the domain
/// uses, so that gRPC, JSON and BSON agree to the millisecond.
pub type Millis = i64;

/// The current time in [`Millis`].
pub fn now_millis() -> Millis {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

mod message;

pub use message::{
    ClientMsgId, EMOJI_MAX_BYTES, MENTION_CANDIDATES_MAX, MediaPolicy, MessageId, MessageKind,
    REACTIONS_PER_MESSAGE_MAX, REACTIONS_PER_USER_MAX, check_emoji, check_text, mention_candidates,
};
