//! Property tests of the frame and body decoders: whatever a client sends,
//! decoding neither panics nor accepts what the types do not describe.

use chat_domain::{Group, GroupId, Limits, UserId};
use chat_protocol::{
    AcknowledgeMessage, AddMembersBody, ClientFrame, CreateGroupBody, GroupRef, SendMessage,
    TransferOwnerBody, UploadBody, decode_data, decode_frame,
};
use proptest::prelude::*;
use serde_json::Value;

/// Field names of the contract, so random objects reach the decoders' paths.
const KEYS: &[&str] = &[
    "event",
    "id",
    "data",
    "groupId",
    "clientMsgId",
    "type",
    "text",
    "media",
    "key",
    "mime",
    "size",
    "name",
    "description",
    "members",
    "userIds",
    "userId",
    "messageId",
    "x",
];

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            }),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_text_decodes_or_fails_cleanly(text in ".{0,256}") {
        let _ = chat_protocol::decode_frame(&text);
    }

    #[test]
    fn any_json_decodes_or_fails_cleanly(v in json()) {
        let text = v.to_string();
        if let Ok(frame) = decode_frame(&text) {
            // what decoded is what was sent
            let frame: ClientFrame = frame;
            prop_assert_eq!(Some(&Value::String(frame.event.clone())), v.get("event"));
        }
        let _ = decode_data::<GroupRef>(v.clone());
        let _ = decode_data::<AcknowledgeMessage>(v.clone());
        let _ = decode_data::<CreateGroupBody>(v.clone());
        let _ = decode_data::<AddMembersBody>(v.clone());
        let _ = decode_data::<TransferOwnerBody>(v.clone());
        let _ = decode_data::<UploadBody>(v.clone());
        if let Ok(m) = decode_data::<SendMessage>(v.clone()) {
            prop_assert_eq!(Some(&Value::String(m.group_id)), v.get("groupId"));
        }
    }

    #[test]
    fn groups_from_any_input_are_valid_or_refused(
        name in ".{0,160}",
        description in ".{0,64}",
        members in prop::collection::vec("[a-z_.]{0,8}", 0..8),
    ) {
        let limits = Limits::default();
        let members: Vec<UserId> = members.into_iter().filter_map(|m| UserId::parse(m).ok()).collect();
        let creator = UserId::parse("creator").map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Ok(g) = Group::create(GroupId::generate(), creator, &name, &description, members, &limits, 0) {
            prop_assert!(g.name.chars().count() <= limits.group_name_chars);
            prop_assert!(chat_domain::text::forbidden_in_name(&g.name).is_none());
            prop_assert!(g.members.len() <= limits.group_members);
        }
    }
}
