//! The client contract, version 1 (see DESIGN.md): WebSocket frames, event
//! names, error codes and the JSON shapes shared by REST and WebSocket.
//!
//! Event names and field names here are public API: extend, never rename.

use serde::{Deserialize, Serialize};

mod reply;
mod view;

pub use reply::{
    AcknowledgeAck, BlockList, BlockView, DevToken, GroupPage, GroupPresence, GroupSummary, Health,
    InviteList, InviteView, MediaLink, MemberPresence, MemberStatus, MentionPage, MentionView,
    MessageChangeAck, MessagePage, MessageStatus, MessageStatusPush, MuteView, NotifyAck, PinList,
    PinView, ReactionAck, ReactionPush, Readiness, SearchPage, SendAck, SubscribeAck,
    TYPING_EXPIRES_MS, TypingAck, TypingPush, UploadTicket, WebConfig,
};
pub use view::{
    EVENT_MEMBERS_MAX, GroupChangeView, GroupView, MemberView, MessageDeletedView,
    MessageUpdatedView, MessageView, REPLY_PREVIEW_CHARS, ReactionView, ReplyView, format_millis,
    parse_millis, reply_preview,
};

/// Event names, exactly as the seed and DESIGN.md spell them.
pub mod event {
    // client to server
    pub const NOTIFY_CREATE_GROUP: &str = "notify_create_group";
    pub const SUBSCRIBE_TO_GROUP: &str = "subscribe_to_group";
    pub const SEND_GROUP_MESSAGE: &str = "send_group_message";
    pub const ACKNOWLEDGE_GROUP_MESSAGE: &str = "acknowledge_group_message";
    pub const TYPING: &str = "typing";
    pub const ADD_REACTION: &str = "add_reaction";
    pub const REMOVE_REACTION: &str = "remove_reaction";
    pub const EDIT_GROUP_MESSAGE: &str = "edit_group_message";
    pub const DELETE_GROUP_MESSAGE: &str = "delete_group_message";
    // server to client
    pub const ACK: &str = "ack";
    pub const ERROR: &str = "error";
    pub const SESSION: &str = "a_session";
    pub const GROUP_CREATED: &str = "a_group_created";
    pub const GROUP_UPDATED: &str = "a_group_updated";
    pub const GROUP_MESSAGE: &str = "a_group_message";
    pub const MESSAGE_STATUS: &str = "a_message_status";
    pub const USER_TYPING: &str = "a_typing";
    pub const PRESENCE: &str = "a_presence";
    pub const MENTION: &str = "a_mention";
    pub const REACTION: &str = "a_reaction";
    pub const MESSAGE_UPDATED: &str = "a_message_updated";
    pub const MESSAGE_DELETED: &str = "a_message_deleted";
}

/// Stable, machine-readable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Unauthorized,
    Forbidden,
    NotFound,
    Invalid,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Invalid => "invalid",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// The longest request id a client may choose, in bytes of its JSON form.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A frame from a client: `{"event": NAME, "id": REQUEST_ID?, "data": {...}}`.
///
/// `id` is echoed as sent (a string or a number), so it stays a JSON value.
#[derive(Debug, Deserialize)]
pub struct ClientFrame {
    pub event: String,
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// A frame to a client.
#[derive(Debug, Serialize, Deserialize)]
pub struct ServerFrame<T> {
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub id: Option<serde_json::Value>,
    pub data: T,
}

/// The `data` of an `error` frame and the body of a REST error.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// REST error responses: `{"error": {"code", "message"}}`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RestError {
    pub error: ErrorBody,
}

/// `data` of requests that name just a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupRef {
    pub group_id: String,
}

/// `data` of `send_group_message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SendMessage {
    pub group_id: String,
    pub client_msg_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media: Option<MediaRef>,
    /// The id of an earlier message of the group this one answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
}

/// `media` of a message: an uploaded object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MediaRef {
    pub key: String,
    pub mime: String,
    pub size: u64,
}

/// `POST /groups/{id}/uploads` body.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadBody {
    #[serde(rename = "type")]
    pub kind: String,
    pub mime: String,
    pub size: u64,
}

/// `data` of `acknowledge_group_message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AcknowledgeMessage {
    pub group_id: String,
    pub message_id: String,
}

/// Whether a member started or stopped typing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TypingState {
    Start,
    Stop,
}

/// `data` of `typing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Typing {
    pub group_id: String,
    pub state: TypingState,
}

/// `data` of `add_reaction` and `remove_reaction`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Reaction {
    pub group_id: String,
    pub message_id: String,
    pub emoji: String,
}

/// `data` of `edit_group_message`: the caller's own text message gets new
/// text (within the server's edit window).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EditMessage {
    pub group_id: String,
    pub message_id: String,
    pub text: String,
}

/// `data` of `delete_group_message` (the message's sender, or the group's
/// owner).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteMessage {
    pub group_id: String,
    pub message_id: String,
}

/// `data` of `a_group_created` and `a_group_updated`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupEvent {
    /// The group after the change (see [`GroupView::for_event`]).
    pub group: GroupView,
    /// What changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<GroupChangeView>,
}

/// `data` of `a_session`, the first frame of every connection.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub user_id: String,
    pub device_id: String,
}

/// `POST /groups` body.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateGroupBody {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub members: Vec<String>,
    /// `shared` (the default) or `joined`.
    #[serde(default)]
    pub history: Option<String>,
}

/// `POST /dev/token` body (development stacks only).
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DevTokenBody {
    pub user_id: String,
    /// The display name the token carries.
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /groups/{id}/owner` body.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TransferOwnerBody {
    pub user_id: String,
}

/// `PATCH /groups/{id}` body: a new name or description, or both; a field
/// left out stays as it is.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateGroupBody {
    /// Trimmed; 1 to 128 characters by default, without control or
    /// invisible format characters.
    #[serde(default)]
    pub name: Option<String>,
    /// Up to 2,048 characters by default, without control or invisible
    /// format characters; `""` clears it.
    #[serde(default)]
    pub description: Option<String>,
}

/// `PUT /groups/{id}/mute` body: until when (RFC 3339, in the future and
/// within ten years); left out, until `DELETE /groups/{id}/mute`.
#[derive(Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MuteBody {
    #[serde(default)]
    pub until: Option<String>,
}

/// `POST /groups/{id}/invites` body: how long the invite lasts (60 s to
/// 30 days; a week if left out) and how many may join with it (no limit
/// but the group's size if left out or 0).
#[derive(Debug, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InviteBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
}

/// `POST /invites/join` body: an invite's code (in the body, not the
/// path, so no access log keeps it).
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JoinBody {
    pub code: String,
}

/// `POST /groups/{id}/members` body.
#[derive(Debug, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AddMembersBody {
    pub user_ids: Vec<String>,
}

/// A client request: the frame's `event` with its `data`, typed.
#[derive(Debug)]
pub enum Request {
    NotifyCreateGroup(GroupRef),
    SubscribeToGroup(GroupRef),
    SendGroupMessage(SendMessage),
    AcknowledgeGroupMessage(AcknowledgeMessage),
    Typing(Typing),
    AddReaction(Reaction),
    RemoveReaction(Reaction),
    EditGroupMessage(EditMessage),
    DeleteGroupMessage(DeleteMessage),
}

/// Why a frame is not a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// No request has this event name (shown cut to 64 characters).
    UnknownEvent(String),
    /// The event is known; its `data` is not what it takes.
    BadData(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::UnknownEvent(name) => write!(f, "unknown event {name:?}"),
            Self::BadData(e) => write!(f, "bad data: {e}"),
        }
    }
}

impl Request {
    /// Every request's event name.
    pub const EVENTS: [&'static str; 9] = [
        event::NOTIFY_CREATE_GROUP,
        event::SUBSCRIBE_TO_GROUP,
        event::SEND_GROUP_MESSAGE,
        event::ACKNOWLEDGE_GROUP_MESSAGE,
        event::TYPING,
        event::ADD_REACTION,
        event::REMOVE_REACTION,
        event::EDIT_GROUP_MESSAGE,
        event::DELETE_GROUP_MESSAGE,
    ];

    /// The request `event` names, with its `data` decoded.
    pub fn parse(event: &str, data: serde_json::Value) -> Result<Self, RequestError> {
        let bad = RequestError::BadData;
        Ok(match event {
            event::NOTIFY_CREATE_GROUP => Self::NotifyCreateGroup(decode_data(data).map_err(bad)?),
            event::SUBSCRIBE_TO_GROUP => Self::SubscribeToGroup(decode_data(data).map_err(bad)?),
            event::SEND_GROUP_MESSAGE => Self::SendGroupMessage(decode_data(data).map_err(bad)?),
            event::ACKNOWLEDGE_GROUP_MESSAGE => {
                Self::AcknowledgeGroupMessage(decode_data(data).map_err(bad)?)
            }
            event::TYPING => Self::Typing(decode_data(data).map_err(bad)?),
            event::ADD_REACTION => Self::AddReaction(decode_data(data).map_err(bad)?),
            event::REMOVE_REACTION => Self::RemoveReaction(decode_data(data).map_err(bad)?),
            event::EDIT_GROUP_MESSAGE => Self::EditGroupMessage(decode_data(data).map_err(bad)?),
            event::DELETE_GROUP_MESSAGE => {
                Self::DeleteGroupMessage(decode_data(data).map_err(bad)?)
            }
            other => {
                let mut shown: String = other.chars().take(64).collect();
                if shown.len() < other.len() {
                    shown.push('…');
                }
                return Err(RequestError::UnknownEvent(shown));
            }
        })
    }

    /// The event name, for metrics and logs.
    pub fn event(&self) -> &'static str {
        match self {
            Self::NotifyCreateGroup(_) => event::NOTIFY_CREATE_GROUP,
            Self::SubscribeToGroup(_) => event::SUBSCRIBE_TO_GROUP,
            Self::SendGroupMessage(_) => event::SEND_GROUP_MESSAGE,
            Self::AcknowledgeGroupMessage(_) => event::ACKNOWLEDGE_GROUP_MESSAGE,
            Self::Typing(_) => event::TYPING,
            Self::AddReaction(_) => event::ADD_REACTION,
            Self::RemoveReaction(_) => event::REMOVE_REACTION,
            Self::EditGroupMessage(_) => event::EDIT_GROUP_MESSAGE,
            Self::DeleteGroupMessage(_) => event::DELETE_GROUP_MESSAGE,
        }
    }
}

/// Decodes a client frame. Frames are JSON objects; serde would also take
/// an array for a struct (`["send_group_message", 1, {...}]`), which the
/// contract does not describe, so anything but an object is refused.
pub fn decode_frame(text: &str) -> Result<ClientFrame, String> {
    if !text.trim_start().starts_with('{') {
        return Err("a frame is a JSON object".into());
    }
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// Decodes a request's `data` (or a REST body): a JSON object, as for
/// frames.
pub fn decode_data<T: serde::de::DeserializeOwned>(data: serde_json::Value) -> Result<T, String> {
    if !data.is_object() {
        return Err("data must be a JSON object".into());
    }
    serde_json::from_value(data).map_err(|e| e.to_string())
}

/// Serialises a server push (no request id) to its JSON text.
pub fn push_json<T: Serialize>(event: &str, data: &T) -> serde_json::Result<String> {
    serde_json::to_string(&ServerFrame {
        event: event.to_owned(),
        id: None,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_the_documented_shape() {
        let f: ClientFrame =
            serde_json::from_str(r#"{"event":"subscribe_to_group","id":7,"data":{"groupId":"g"}}"#)
                .expect("parses");
        assert_eq!(f.event, event::SUBSCRIBE_TO_GROUP);
        assert_eq!(f.id, Some(serde_json::json!(7)));
        let r: GroupRef = serde_json::from_value(f.data).expect("group ref");
        assert_eq!(r.group_id, "g");

        let err = ServerFrame {
            event: event::ERROR.into(),
            id: Some(serde_json::json!("a")),
            data: ErrorBody {
                code: ErrorCode::NotFound,
                message: "no such group".into(),
            },
        };
        assert_eq!(
            serde_json::to_value(&err).expect("serialises"),
            serde_json::json!({"event":"error","id":"a","data":{"code":"not_found","message":"no such group"}})
        );
        assert_eq!(
            push_json(event::SESSION, &serde_json::json!({})).expect("serialises"),
            r#"{"event":"a_session","data":{}}"#
        );
    }
}
