//! PROTOCOL.md's examples against the types: each is decoded into its type
//! (which refuses unknown fields) and encoded again, which must give back
//! exactly the example. A field renamed, added or dropped on either side
//! fails here.

use chat_protocol::*;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// `T` decodes `v` and encodes it back unchanged.
fn round_trip<T: Serialize + DeserializeOwned>(v: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back == v {
        Ok(())
    } else {
        Err(format!("encodes as {back}"))
    }
}

/// The data of a typed frame, by the type's name.
fn data_as(name: &str, data: &Value) -> Result<(), String> {
    match name {
        "NotifyAck" => round_trip::<NotifyAck>(data),
        "SubscribeAck" => round_trip::<SubscribeAck>(data),
        "SendAck" => round_trip::<SendAck>(data),
        "AcknowledgeAck" => round_trip::<AcknowledgeAck>(data),
        "TypingAck" => round_trip::<TypingAck>(data),
        "ReactionAck" => round_trip::<ReactionAck>(data),
        "MessageChangeAck" => round_trip::<MessageChangeAck>(data),
        "MessageUpdatedView" => round_trip::<MessageUpdatedView>(data),
        "MessageDeletedView" => round_trip::<MessageDeletedView>(data),
        "ReactionPush" => round_trip::<ReactionPush>(data),
        "TypingPush" => round_trip::<TypingPush>(data),
        "MemberPresence" => round_trip::<MemberPresence>(data),
        "GroupPresence" => round_trip::<GroupPresence>(data),
        "MentionView" => round_trip::<MentionView>(data),
        "MentionPage" => round_trip::<MentionPage>(data),
        "BlockList" => round_trip::<BlockList>(data),
        "SessionInfo" => round_trip::<SessionInfo>(data),
        "GroupEvent" => round_trip::<GroupEvent>(data),
        "MessageView" => round_trip::<MessageView>(data),
        "MessageStatusPush" => round_trip::<MessageStatusPush>(data),
        "CreateGroupBody" => round_trip::<CreateGroupBody>(data),
        "AddMembersBody" => round_trip::<AddMembersBody>(data),
        "TransferOwnerBody" => round_trip::<TransferOwnerBody>(data),
        "UpdateGroupBody" => round_trip::<UpdateGroupBody>(data),
        "MuteBody" => round_trip::<MuteBody>(data),
        "MuteView" => round_trip::<MuteView>(data),
        "PinList" => round_trip::<PinList>(data),
        "InviteBody" => round_trip::<InviteBody>(data),
        "InviteView" => round_trip::<InviteView>(data),
        "InviteList" => round_trip::<InviteList>(data),
        "JoinBody" => round_trip::<JoinBody>(data),
        "UploadBody" => round_trip::<UploadBody>(data),
        "GroupPage" => round_trip::<GroupPage>(data),
        "MessagePage" => round_trip::<MessagePage>(data),
        "SearchPage" => round_trip::<SearchPage>(data),
        "MessageStatus" => round_trip::<MessageStatus>(data),
        "UploadTicket" => round_trip::<UploadTicket>(data),
        "MediaLink" => round_trip::<MediaLink>(data),
        "DevTokenBody" => round_trip::<DevTokenBody>(data),
        "DevToken" => round_trip::<DevToken>(data),
        "WebConfig" => round_trip::<WebConfig>(data),
        "RestError" => round_trip::<RestError>(data),
        other => Err(format!("no type {other} in the test's list")),
    }
}

/// The push event each push type travels in.
fn push_event(name: &str) -> &'static [&'static str] {
    match name {
        "SessionInfo" => &[event::SESSION],
        "GroupEvent" => &[event::GROUP_CREATED, event::GROUP_UPDATED],
        "MessageView" => &[event::GROUP_MESSAGE],
        "MessageStatusPush" => &[event::MESSAGE_STATUS],
        "TypingPush" => &[event::USER_TYPING],
        "ReactionPush" => &[event::REACTION],
        "MemberPresence" => &[event::PRESENCE],
        "MentionView" => &[event::MENTION],
        "MessageUpdatedView" => &[event::MESSAGE_UPDATED],
        "MessageDeletedView" => &[event::MESSAGE_DELETED],
        _ => &[],
    }
}

fn check(kind: &str, v: &Value) -> Result<(), String> {
    let mut words = kind.split_whitespace();
    let what = words.next().unwrap_or_default();
    let name = words.next().unwrap_or_default();
    let frame_keys = |allowed: &[&str]| -> Result<(), String> {
        match v.as_object() {
            Some(o) if o.keys().all(|k| allowed.contains(&k.as_str())) => Ok(()),
            _ => Err(format!("a frame has only {allowed:?}")),
        }
    };
    match what {
        "request" => {
            frame_keys(&["event", "id", "data"])?;
            let frame = decode_frame(&v.to_string())?;
            let request =
                Request::parse(&frame.event, frame.data.clone()).map_err(|e| e.to_string())?;
            let back = match &request {
                Request::NotifyCreateGroup(r) | Request::SubscribeToGroup(r) => {
                    serde_json::to_value(r)
                }
                Request::SendGroupMessage(m) => serde_json::to_value(m),
                Request::AcknowledgeGroupMessage(m) => serde_json::to_value(m),
                Request::Typing(t) => serde_json::to_value(t),
                Request::AddReaction(r) | Request::RemoveReaction(r) => serde_json::to_value(r),
                Request::EditGroupMessage(e) => serde_json::to_value(e),
                Request::DeleteGroupMessage(d) => serde_json::to_value(d),
            }
            .map_err(|e| e.to_string())?;
            if back != frame.data {
                return Err(format!("data encodes as {back}"));
            }
            Ok(())
        }
        "ack" => {
            frame_keys(&["event", "id", "data"])?;
            if v["event"] != event::ACK || v.get("id").is_none() {
                return Err("an ack has event \"ack\" and the request's id".into());
            }
            data_as(name, &v["data"])
        }
        "error" => {
            frame_keys(&["event", "id", "data"])?;
            if v["event"] != event::ERROR {
                return Err("an error frame has event \"error\"".into());
            }
            round_trip::<ErrorBody>(&v["data"])
        }
        "push" => {
            frame_keys(&["event", "data"])?;
            let ev = v["event"].as_str().unwrap_or_default();
            if !push_event(name).contains(&ev) {
                return Err(format!("{name} does not travel in {ev:?}"));
            }
            data_as(name, &v["data"])
        }
        "rest" => data_as(name, v),
        other => Err(format!("unknown example kind {other:?}")),
    }
}

#[test]
fn examples_in_protocol_md_match_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../PROTOCOL.md");
    let doc = std::fs::read_to_string(path).expect("PROTOCOL.md");
    let mut lines = doc.lines();
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    while let Some(line) = lines.next() {
        let Some(kind) = line
            .trim()
            .strip_prefix("<!-- example:")
            .and_then(|r| r.strip_suffix("-->"))
        else {
            continue;
        };
        let kind = kind.trim().to_owned();
        assert_eq!(lines.next().map(str::trim), Some("```json"), "{kind}");
        let body: String = lines
            .by_ref()
            .take_while(|l| l.trim() != "```")
            .collect::<Vec<_>>()
            .join("\n");
        match serde_json::from_str::<Value>(&body) {
            Ok(v) => {
                if let Err(e) = check(&kind, &v) {
                    failures.push(format!("{kind}: {e}\n  {body}"));
                }
            }
            Err(e) => failures.push(format!("{kind}: not JSON: {e}")),
        }
        checked.push(kind);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // every request event, and every type a client meets, has an example
    let requests = checked.iter().filter(|k| *k == "request").count();
    assert!(
        requests >= Request::EVENTS.len(),
        "{requests} request examples"
    );
    for name in [
        "NotifyAck",
        "SubscribeAck",
        "SendAck",
        "AcknowledgeAck",
        "SessionInfo",
        "GroupEvent",
        "MessageView",
        "MessageStatusPush",
        "CreateGroupBody",
        "AddMembersBody",
        "TransferOwnerBody",
        "UpdateGroupBody",
        "MuteBody",
        "MuteView",
        "PinList",
        "InviteBody",
        "InviteView",
        "InviteList",
        "JoinBody",
        "UploadBody",
        "GroupPage",
        "MessagePage",
        "SearchPage",
        "MessageStatus",
        "UploadTicket",
        "MediaLink",
        "RestError",
    ] {
        assert!(
            checked.iter().any(|k| k.ends_with(name)),
            "PROTOCOL.md has no example of {name}"
        );
    }
    assert!(checked.iter().any(|k| k == "error"), "no error example");
}
