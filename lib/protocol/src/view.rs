//! JSON views of domain types, shared by REST bodies and WebSocket events.

use chat_domain::{Group, Millis};
use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Formats milliseconds since the epoch as RFC 3339 UTC with milliseconds.
pub fn format_millis(ms: Millis) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// Parses an RFC 3339 time (as `format_millis` writes it) into milliseconds
/// since the epoch; `None` if it is not one.
pub fn parse_millis(s: &str) -> Option<Millis> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    Millis::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// A member as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberView {
    pub user_id: String,
    pub joined_at: String,
}

/// A group as clients see it.
///
/// In REST replies `members` is always there. In `a_group_created` and
/// `a_group_updated` it is left out for groups of more than
/// [`EVENT_MEMBERS_MAX`] members (`memberCount` says how many, and
/// `GET /groups/{id}` lists them): sending a 1,000-member list to 1,000
/// members on every change was 110 MiB a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupView {
    pub id: String,
    pub name: String,
    pub description: String,
    pub owner_id: String,
    pub created_by: String,
    /// `shared` (members see the whole history) or `joined` (only what was
    /// sent after they were added).
    #[serde(default)]
    pub history: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberView>,
    #[serde(default)]
    pub member_count: usize,
    pub created_at: String,
    pub updated_at: String,
}

/// Groups larger than this have no member list in their events.
pub const EVENT_MEMBERS_MAX: usize = 100;

impl GroupView {
    /// The view events carry: without the member list past
    /// [`EVENT_MEMBERS_MAX`].
    pub fn for_event(g: &Group) -> Self {
        let mut view = Self::from(g);
        if view.members.len() > EVENT_MEMBERS_MAX {
            view.members = Vec::new();
        }
        view
    }
}

/// What changed, in `a_group_created` and `a_group_updated`: a delta a
/// client can apply without the member list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupChangeView {
    /// `created`, `members_added`, `member_joined` (with an invite),
    /// `member_removed`, `member_left`, `owner_changed`, `details_changed`
    /// (name or description),
    /// `message_pinned`, `message_unpinned` or `deleted` (the owner
    /// deleted the group for everyone).
    pub kind: String,
    /// Who was added, joined, was removed, left, or became owner (none for
    /// the others).
    pub user_ids: Vec<String>,
    /// Who made the change.
    pub by: String,
    /// The message pinned or unpinned, and its `seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl From<&Group> for GroupView {
    fn from(g: &Group) -> Self {
        Self {
            id: g.id.to_string(),
            name: g.name.clone(),
            description: g.description.clone(),
            owner_id: g.owner_id.to_string(),
            created_by: g.created_by.to_string(),
            history: g.history.as_str().to_owned(),
            members: g
                .members
                .iter()
                .map(|m| MemberView {
                    user_id: m.user_id.to_string(),
                    joined_at: format_millis(m.joined_at),
                })
                .collect(),
            member_count: g.members.len(),
            created_at: format_millis(g.created_at),
            updated_at: format_millis(g.updated_at),
        }
    }
}

/// A group message as clients see it (`a_group_message`, history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageView {
    pub message_id: String,
    pub group_id: String,
    pub seq: u64,
    pub sender_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<crate::MediaRef>,
    pub created_at: String,
    /// The earlier message this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyView>,
    /// Its reactions (history only; live, `a_reaction` tells of changes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<ReactionView>,
    /// When its sender last edited it (history; live, `a_message_updated`
    /// tells of an edit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<String>,
    /// A tombstone (history): the message was deleted, and neither its
    /// text, media nor reply is kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
}

/// `a_message_updated`, to the group's members live and on catch-up, in the
/// group's order: the sender edited message `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageUpdatedView {
    pub group_id: String,
    pub message_id: String,
    pub seq: u64,
    pub sender_id: String,
    /// The new text.
    pub text: String,
    pub edited_at: String,
}

/// `a_message_deleted`, to the group's members live and on catch-up, in the
/// group's order: message `seq` is a tombstone now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageDeletedView {
    pub group_id: String,
    pub message_id: String,
    pub seq: u64,
    /// Its sender, or the group's owner.
    pub deleted_by: String,
    pub deleted_at: String,
}

/// One emoji on a message: how many members react with it, and whether the
/// caller does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactionView {
    pub emoji: String,
    pub count: u64,
    pub reacted: bool,
}

/// The message a message answers: who wrote it, and the start of its text
/// (live, as it was when the answer was sent; in history, as it is now,
/// edited or deleted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplyView {
    pub message_id: String,
    pub seq: u64,
    pub sender_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Its first 100 characters (with `…` if there was more); absent for
    /// media.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// The answered message was deleted since (history): no preview.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// Characters of the answered message's text a reply carries.
pub const REPLY_PREVIEW_CHARS: usize = 100;

/// The preview a reply carries of `text`.
pub fn reply_preview(text: &str) -> String {
    let mut chars = text.char_indices();
    match chars.nth(REPLY_PREVIEW_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reply_previews_are_cut_at_a_character_boundary() {
        assert_eq!(super::reply_preview("short"), "short");
        let exact = "é".repeat(super::REPLY_PREVIEW_CHARS);
        assert_eq!(super::reply_preview(&exact), exact);
        let long = "é".repeat(super::REPLY_PREVIEW_CHARS + 1);
        assert_eq!(
            super::reply_preview(&long),
            format!("{}…", "é".repeat(super::REPLY_PREVIEW_CHARS))
        );
    }

    #[test]
    fn millis_format_as_rfc3339() {
        assert_eq!(
            super::format_millis(1_700_000_000_123),
            "2023-11-14T22:13:20.123Z"
        );
        assert_eq!(
            super::parse_millis("2023-11-14T22:13:20.123Z"),
            Some(1_700_000_000_123)
        );
        assert_eq!(super::parse_millis("yesterday"), None);
    }
}
