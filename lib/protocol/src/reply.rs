//! What the server answers: the `data` of every `ack`, the pushes other than
//! group events, and every REST response body. Field names are public API.
//!
//! Unlike requests, answers take unknown fields: a client built on these
//! types keeps working when a later server adds one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{GroupView, MessageView, TypingState};

/// `ack` of `notify_create_group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotifyAck {
    pub group_id: String,
    /// Members notified (each once, live or on reconnect).
    pub notified: u32,
}

/// `ack` of `subscribe_to_group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscribeAck {
    pub group_id: String,
}

/// `ack` of `send_group_message`: the message is durable in the group's
/// stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SendAck {
    pub message_id: String,
    pub group_id: String,
    pub seq: u64,
    pub created_at: String,
}

/// `ack` of `acknowledge_group_message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcknowledgeAck {
    pub group_id: String,
    pub message_id: String,
    /// The member's read watermark after this (an earlier, higher one
    /// stays).
    pub read_seq: u64,
}

/// `ack` of `typing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TypingAck {
    pub group_id: String,
    pub state: TypingState,
    /// Whether the other members were told: a `start` within 2 s of the
    /// last one told, and a `stop` with no `start` told before it, are
    /// taken but not passed on.
    pub forwarded: bool,
}

/// `ack` of `edit_group_message` (with `editedAt`) and
/// `delete_group_message` (with `deletedAt`): the change is durable in the
/// group's stream, and members hear of it in the group's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageChangeAck {
    pub group_id: String,
    pub message_id: String,
    /// The changed message's seq.
    pub seq: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
}

/// `ack` of `add_reaction` and `remove_reaction`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactionAck {
    pub group_id: String,
    pub message_id: String,
    pub emoji: String,
    /// Members reacting with it now.
    pub count: u64,
    /// Whether the caller is one of them.
    pub reacted: bool,
}

/// `a_reaction`, to the group's connected members (the reactor's other
/// connections too): `userId` added or took back `emoji` on a message,
/// which `count` members now react with. Not caught up on reconnect:
/// history carries every message's reactions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReactionPush {
    pub group_id: String,
    pub message_id: String,
    pub seq: u64,
    pub emoji: String,
    pub user_id: String,
    pub added: bool,
    pub count: u64,
}

/// How long an `a_typing` `start` holds, in milliseconds, unless a `stop`
/// or another `start` comes first.
pub const TYPING_EXPIRES_MS: u64 = 6_000;

/// `a_typing`, to the group's other connected members: `userId` started or
/// stopped typing in the group. Never stored: a connection receives it
/// only while it is open. A `start` holds for `expiresInMs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TypingPush {
    pub group_id: String,
    pub user_id: String,
    pub state: TypingState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_ms: Option<u64>,
}

/// A member's presence: `a_presence` (to the members of every group the
/// user follows, when the user's first connection opens or last one
/// closes) and each entry of `GET /groups/{id}/presence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberPresence {
    pub user_id: String,
    /// Whether the user has a connection open on some edge.
    pub online: bool,
    /// When the user's last connection closed; absent while online, for
    /// users never seen, and for users offline longer than the server
    /// keeps presence (30 days by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<String>,
}

/// `GET /groups/{id}/presence`: every member's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupPresence {
    pub group_id: String,
    pub members: Vec<MemberPresence>,
}

/// `a_mention`, to a member a message mentions (`@user`), live or when
/// its device reconnects, and each entry of `GET /mentions`. It names the
/// message; its content is in history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MentionView {
    pub group_id: String,
    pub message_id: String,
    pub seq: u64,
    pub sender_id: String,
    pub created_at: String,
}

/// A user the caller blocks: they cannot add the caller to a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockView {
    pub user_id: String,
    /// When the caller first blocked them.
    pub since: String,
}

/// `GET /blocks`: everyone the caller blocks, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BlockList {
    pub blocks: Vec<BlockView>,
}

/// `GET /mentions`: a page of the caller's mentions, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MentionPage {
    pub mentions: Vec<MentionView>,
    /// Pass as `before` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `a_message_status`, to senders: member `userId` has received everything
/// up to `deliveredSeq` and read everything up to `readSeq`. Live only, to
/// the sender's connections that follow the group; not caught up on
/// reconnect (the status endpoint is the record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageStatusPush {
    pub group_id: String,
    pub user_id: String,
    pub delivered_seq: u64,
    pub read_seq: u64,
}

/// `GET /groups`: a page of the caller's groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupPage {
    pub groups: Vec<GroupSummary>,
    /// Pass as `after` for the next page; absent on the last.
    #[serde(default)]
    pub next: Option<String>,
}

/// One group of `GET /groups`: the group and what the caller has not read
/// in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupSummary {
    #[serde(flatten)]
    pub group: GroupView,
    /// Messages after the caller's read watermark (its last
    /// `acknowledge_group_message`, or its own last message), and only
    /// those after its addition (whatever it sees of the history).
    pub unread_count: u64,
    /// The newest message the caller may see; absent when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message: Option<MessageView>,
    /// Whether the caller mutes the group now (`PUT /groups/{id}/mute`).
    #[serde(default)]
    pub muted: bool,
    /// Until when, if the mute has an end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub muted_until: Option<String>,
}

/// A pinned message, as `GET /groups/{id}/pins` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PinView {
    pub message_id: String,
    pub seq: u64,
    pub pinned_by: String,
    pub pinned_at: String,
}

/// `GET /groups/{id}/pins` and `PUT /groups/{id}/pins/{messageId}`: the
/// group's pinned messages the caller sees, newest pin first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PinList {
    pub group_id: String,
    pub pins: Vec<PinView>,
}

/// An invite to join a group (owner only): `POST /groups/{id}/invites`
/// answers it with its `code`, the one time the code is given out (only a
/// hash of its secret is kept); `GET /groups/{id}/invites` lists them
/// without.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InviteView {
    pub invite_id: String,
    pub group_id: String,
    /// What a joiner presents to `POST /invites/join`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    pub created_by: String,
    pub created_at: String,
    pub expires_at: String,
    /// How many may join with it; absent: no limit but the group's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    /// How many have joined with it.
    pub uses: u32,
}

/// `GET /groups/{id}/invites`: the group's valid invites, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct InviteList {
    pub invites: Vec<InviteView>,
}

/// `PUT /groups/{id}/mute`: the caller's mute of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MuteView {
    pub group_id: String,
    pub muted: bool,
    /// Until when, if the mute has an end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub muted_until: Option<String>,
}

/// `GET /groups/{id}/messages`: newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessagePage {
    pub messages: Vec<MessageView>,
}

/// `GET /groups/{id}/search`: the messages the caller sees whose text holds
/// every word of the query, newest first. One call opens a bounded number
/// of messages, so a page may hold fewer than `limit` (even none) and
/// still have a `next`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SearchPage {
    pub messages: Vec<MessageView>,
    /// Pass as `before` to search older messages; absent once the search
    /// reached the first message the caller sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<u64>,
}

/// One member's receipt of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    pub user_id: String,
    pub delivered: bool,
    pub read: bool,
    /// When the member's receipt last moved; absent if it never did.
    #[serde(default)]
    pub updated_at: Option<String>,
}

/// `GET /groups/{id}/messages/{messageId}/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MessageStatus {
    pub message_id: String,
    pub seq: u64,
    pub members: Vec<MemberStatus>,
}

/// `POST /groups/{id}/uploads`: where and how to PUT the bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UploadTicket {
    /// Name it in the message's `media.key`.
    pub key: String,
    pub upload_url: String,
    /// Always `PUT`.
    pub method: String,
    /// Headers the PUT must carry, exactly.
    pub headers: BTreeMap<String, String>,
    pub expires_at: String,
}

/// `GET /groups/{id}/media/{objectId}` (with a 302 to `url`) and
/// `GET /groups/{id}/media/{objectId}/url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MediaLink {
    pub url: String,
    pub expires_at: String,
}

/// `POST /dev/token` (development stacks only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DevToken {
    pub token: String,
}

/// `GET /app/config.json`: what the web client may offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebConfig {
    /// Whether `POST /dev/token` is on.
    pub dev_tokens: bool,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
}

/// `GET /readyz` (operator's listener).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Readiness {
    pub nats: bool,
    pub workers: bool,
}
