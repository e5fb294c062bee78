//! The WebSocket protocol as an AsyncAPI 3 document: every client request
//! with its ack and error, every push, the error codes and the close codes,
//! with JSON Schemas generated from the same `lib/protocol` types as the
//! OpenAPI document. Served at `/asyncapi.json` and committed as
//! `docs/asyncapi.json` (a test fails when the two differ).

use std::collections::BTreeMap;

use chat_protocol::{
    AcknowledgeAck, AcknowledgeMessage, DeleteMessage, EditMessage, ErrorBody, GroupEvent,
    GroupRef, MemberPresence, MentionView, MessageChangeAck, MessageDeletedView, MessageStatusPush,
    MessageUpdatedView, MessageView, NotifyAck, Reaction, ReactionAck, ReactionPush, SendAck,
    SendMessage, SessionInfo, SubscribeAck, Typing, TypingAck, TypingPush, event,
};
use serde_json::{Value, json};
use utoipa::{
    ToSchema,
    openapi::{RefOr, schema::Schema},
};

use crate::ws;

/// A request, the type of its `data`, and the type of its ack's `data`.
const REQUESTS: [(&str, &str, &str, &str); 9] = [
    (
        event::NOTIFY_CREATE_GROUP,
        "GroupRef",
        "NotifyAck",
        "Every member gets `a_group_created` once, live or on reconnect.",
    ),
    (
        event::SUBSCRIBE_TO_GROUP,
        "GroupRef",
        "SubscribeAck",
        "Every connection of the user receives the group's messages from here.",
    ),
    (
        event::SEND_GROUP_MESSAGE,
        "SendMessage",
        "SendAck",
        "The ack means the message is durable in the group's stream; retries with the same \
         `clientMsgId` get the original ack for 24 hours.",
    ),
    (
        event::ACKNOWLEDGE_GROUP_MESSAGE,
        "AcknowledgeMessage",
        "AcknowledgeAck",
        "The member has read everything up to this message.",
    ),
    (
        event::TYPING,
        "Typing",
        "TypingAck",
        "The group's other connected members get `a_typing`; a `start` is passed on at most once \
         per 2 s per group and holds for 6 s. Never stored.",
    ),
    (
        event::ADD_REACTION,
        "Reaction",
        "ReactionAck",
        "Adds the caller's emoji to a message it can see (idempotent); connected members get \
         `a_reaction`. At most 20 different emoji per message and 10 per member.",
    ),
    (
        event::REMOVE_REACTION,
        "Reaction",
        "ReactionAck",
        "Takes the caller's emoji back (idempotent); connected members get `a_reaction`.",
    ),
    (
        event::EDIT_GROUP_MESSAGE,
        "EditMessage",
        "MessageChangeAck",
        "The sender replaces the text of its own text message, within the server's edit window          (an hour by default); members get `a_message_updated` in the group's order, live or on          reconnect. The same text again changes nothing.",
    ),
    (
        event::DELETE_GROUP_MESSAGE,
        "DeleteMessage",
        "MessageChangeAck",
        "The sender or the group's owner deletes a message: history keeps a tombstone with no          content (a media message's object is removed); members get `a_message_deleted` in the          group's order, live or on reconnect. Idempotent.",
    ),
];

/// A push, the type of its `data`, and what it says.
const PUSHES: [(&str, &str, &str); 11] = [
    (event::SESSION, "SessionInfo", "First on every connection."),
    (
        event::GROUP_CREATED,
        "GroupEvent",
        "To every member, once, live or on reconnect.",
    ),
    (
        event::GROUP_UPDATED,
        "GroupEvent",
        "To members before and after a change.",
    ),
    (
        event::GROUP_MESSAGE,
        "MessageView",
        "Each connection receives a group's messages in `seq` order; a gap is a missed message.",
    ),
    (
        event::MESSAGE_STATUS,
        "MessageStatusPush",
        "To senders: a member's delivered and read watermarks moved.",
    ),
    (
        event::USER_TYPING,
        "TypingPush",
        "A member started (holding for `expiresInMs`) or stopped typing; only while connected.",
    ),
    (
        event::PRESENCE,
        "MemberPresence",
        "A user who shares a group with you opened a first connection or closed the last one \
         (on any edge), or the edge it was on died.",
    ),
    (
        event::MENTION,
        "MentionView",
        "A message mentions you (`@you`): live, or when your device reconnects. The content is \
         in history.",
    ),
    (
        event::REACTION,
        "ReactionPush",
        "A member added or took back an emoji on a message, which `count` members react with now; \
         only while connected (history carries every message's reactions).",
    ),
    (
        event::MESSAGE_UPDATED,
        "MessageUpdatedView",
        "The sender edited message `seq`: live or on reconnect, in the group's order.",
    ),
    (
        event::MESSAGE_DELETED,
        "MessageDeletedView",
        "Message `seq` was deleted (a tombstone now): live or on reconnect, in the group's order.",
    ),
];

/// Close codes a client must handle.
const CLOSE_CODES: [(u16, &str); 6] = [
    (
        ws::CLOSE_POLICY,
        "50 error replies in a row for the client's own mistakes: fix the client",
    ),
    (ws::CLOSE_TOO_LARGE, "a message over 1 MiB: fix the client"),
    (
        ws::CLOSE_RESTART,
        "the edge is shutting down: reconnect, to any edge",
    ),
    (
        ws::CLOSE_TOO_SLOW,
        "the client fell behind: read the old socket to its end, reconnect with the same device",
    ),
    (
        ws::CLOSE_EXPIRED,
        "the token the connection opened with expired: get a fresh token, reconnect with the same device",
    ),
    (
        ws::CLOSE_EVICTED,
        "the device was evicted (too many devices): reconnect to register it again",
    ),
];

fn schema_of<T: ToSchema>(into: &mut Vec<(String, RefOr<Schema>)>) {
    into.push((T::name().into_owned(), T::schema()));
    T::schemas(into);
}

/// Every type a frame carries, by name, with the types they refer to.
fn schemas() -> BTreeMap<String, Value> {
    let mut all = Vec::new();
    schema_of::<GroupRef>(&mut all);
    schema_of::<SendMessage>(&mut all);
    schema_of::<AcknowledgeMessage>(&mut all);
    schema_of::<NotifyAck>(&mut all);
    schema_of::<SubscribeAck>(&mut all);
    schema_of::<SendAck>(&mut all);
    schema_of::<AcknowledgeAck>(&mut all);
    schema_of::<ErrorBody>(&mut all);
    schema_of::<SessionInfo>(&mut all);
    schema_of::<GroupEvent>(&mut all);
    schema_of::<MessageView>(&mut all);
    schema_of::<MessageStatusPush>(&mut all);
    schema_of::<Typing>(&mut all);
    schema_of::<TypingAck>(&mut all);
    schema_of::<TypingPush>(&mut all);
    schema_of::<MemberPresence>(&mut all);
    schema_of::<MentionView>(&mut all);
    schema_of::<Reaction>(&mut all);
    schema_of::<ReactionAck>(&mut all);
    schema_of::<ReactionPush>(&mut all);
    schema_of::<EditMessage>(&mut all);
    schema_of::<DeleteMessage>(&mut all);
    schema_of::<MessageChangeAck>(&mut all);
    schema_of::<MessageUpdatedView>(&mut all);
    schema_of::<MessageDeletedView>(&mut all);
    all.into_iter()
        .map(|(name, schema)| (name, serde_json::to_value(schema).unwrap_or_default()))
        .collect()
}

/// A frame's schema: `event` fixed, `data` of type `data`, and `id` as
/// requests, acks and errors carry it (`Some(true)`: required).
fn frame(event: &str, data: &str, id: Option<bool>) -> Value {
    let mut properties = json!({
        "event": { "const": event },
        "data": { "$ref": format!("#/components/schemas/{data}") },
    });
    let mut required = vec!["event", "data"];
    if let Some(needed) = id {
        properties["id"] = json!({
            "description": "chosen by the client, echoed as sent (at most 128 characters of JSON)",
            "oneOf": [{ "type": "string" }, { "type": "number" }],
        });
        if needed {
            required.push("id");
        }
    }
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": required,
        "properties": properties,
    })
}

fn message(name: &str, title: &str, summary: &str, payload: Value) -> (String, Value) {
    (
        name.to_owned(),
        json!({ "name": name, "title": title, "summary": summary, "payload": payload }),
    )
}

/// The document as a JSON value.
pub fn document() -> Value {
    let mut messages = BTreeMap::new();
    let mut operations = BTreeMap::new();
    let channel_message = |name: &str| json!({ "$ref": format!("#/channels/ws/messages/{name}") });
    for (name, data, ack, summary) in REQUESTS {
        let (n, m) = message(name, name, summary, frame(name, data, Some(false)));
        messages.insert(n, m);
        let ack_name = format!("{name}.ack");
        let (n, m) = message(
            &ack_name,
            "ack",
            &format!("The answer to `{name}`."),
            frame(event::ACK, ack, Some(true)),
        );
        messages.insert(n, m);
        operations.insert(
            name.to_owned(),
            json!({
                "action": "receive",
                "channel": { "$ref": "#/channels/ws" },
                "summary": summary,
                "messages": [channel_message(name)],
                "reply": {
                    "channel": { "$ref": "#/channels/ws" },
                    "messages": [channel_message(&ack_name), channel_message(event::ERROR)],
                },
            }),
        );
    }
    let (n, m) = message(
        event::ERROR,
        "error",
        "A request failed (echoing its id), or a frame could not be handled (no id).",
        frame(event::ERROR, "ErrorBody", Some(false)),
    );
    messages.insert(n, m);
    for (name, data, summary) in PUSHES {
        let (n, m) = message(name, name, summary, frame(name, data, None));
        messages.insert(n, m);
        operations.insert(
            name.to_owned(),
            json!({
                "action": "send",
                "channel": { "$ref": "#/channels/ws" },
                "summary": summary,
                "messages": [channel_message(name)],
            }),
        );
    }
    let channel_messages: BTreeMap<&String, Value> = messages
        .keys()
        .map(|name| {
            (
                name,
                json!({ "$ref": format!("#/components/messages/{name}") }),
            )
        })
        .collect();
    let close_codes: BTreeMap<String, &str> = CLOSE_CODES
        .iter()
        .map(|(code, why)| (code.to_string(), *why))
        .collect();
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "chat",
            "version": "1",
            "description": "WebSocket half of the group chat client contract (PROTOCOL.md); \
                the REST half is docs/openapi.json. Frames are JSON text: requests \
                `{event, id?, data}`, each answered by one `ack` or `error` with the same id; \
                pushes `{event, data}`.",
            "license": { "name": "Apache-2.0" },
        },
        "servers": {
            "edge": {
                "host": "localhost:8080",
                "protocol": "ws",
                "description": "an edge, or the load balancer in front of the edges (wss in production)",
                "security": [{ "$ref": "#/components/securitySchemes/bearer" }],
            },
        },
        "channels": {
            "ws": {
                "address": "/ws",
                "title": "a client's connection",
                "description": "One connection of one device of one user.",
                "messages": channel_messages,
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "query": {
                            "type": "object",
                            "properties": {
                                "device": {
                                    "type": "string",
                                    "maxLength": 32,
                                    "pattern": "^[A-Za-z0-9_-]+$",
                                    "description": "the device (default `default`): each keeps its own delivery position",
                                },
                                "token": {
                                    "type": "string",
                                    "description": "the JWT, if not sent as `Authorization` or as the subprotocol `bearer.<jwt>` beside `chat.v1`",
                                },
                            },
                        },
                    },
                },
                "x-close-codes": close_codes,
            },
        },
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "`Authorization: Bearer`, the subprotocol `bearer.<jwt>`, or `?token=`",
                },
            },
        },
    })
}

/// `v` with every object's keys in order, whether or not serde_json keeps
/// insertion order in this build (its `preserve_order` feature is on in
/// some dependency graphs): the text is the same in every build.
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let entries: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sorted(v))).collect();
            Value::Object(entries.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// The document, pretty-printed as committed.
pub fn json() -> String {
    let mut text = serde_json::to_string_pretty(&sorted(document())).unwrap_or_default();
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    /// `docs/asyncapi.json` is what the code generates.
    #[test]
    fn the_committed_asyncapi_document_is_current() {
        crate::assert_committed("asyncapi.json", &super::json());
    }

    #[test]
    fn every_event_of_the_contract_is_described() {
        let doc = super::document();
        let messages = doc["components"]["messages"].as_object().expect("messages");
        for e in chat_protocol::Request::EVENTS {
            assert!(messages.contains_key(e), "{e}");
            assert!(messages.contains_key(&format!("{e}.ack")), "{e} ack");
        }
        for e in [
            chat_protocol::event::ERROR,
            chat_protocol::event::SESSION,
            chat_protocol::event::GROUP_CREATED,
            chat_protocol::event::GROUP_UPDATED,
            chat_protocol::event::GROUP_MESSAGE,
            chat_protocol::event::MESSAGE_STATUS,
            chat_protocol::event::USER_TYPING,
            chat_protocol::event::PRESENCE,
            chat_protocol::event::MENTION,
            chat_protocol::event::REACTION,
        ] {
            assert!(messages.contains_key(e), "{e}");
        }
        let codes = doc["components"]["schemas"]["ErrorCode"]["enum"]
            .as_array()
            .expect("error codes");
        assert_eq!(codes.len(), 8, "{codes:?}");
    }
}
