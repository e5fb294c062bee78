//! REST: group creation and management, auth, limits.

use anyhow::Context;
use chat_tests::{Cluster, PROMPTLY, SECRET, token};
use mongodb::bson::doc;
use serde_json::{Value, json};

async fn post(
    c: &Cluster,
    path: &str,
    user: Option<&str>,
    body: Value,
) -> anyhow::Result<(u16, Value)> {
    c.call(reqwest::Method::POST, 0, user, path, Some(&body))
        .await
}

async fn delete(c: &Cluster, path: &str, user: &str) -> anyhow::Result<(u16, Value)> {
    c.call(reqwest::Method::DELETE, 0, Some(user), path, None)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_group_stores_every_field() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let (status, g) = post(
        &c,
        "/groups",
        Some("alice"),
        json!({"name": "Team", "description": "our room", "members": ["bob", "carol", "bob"]}),
    )
    .await?;
    assert_eq!(status, 201, "{g}");
    assert_eq!(g["name"], "Team");
    assert_eq!(g["ownerId"], "alice");
    assert_eq!(g["createdBy"], "alice");
    let members: Vec<&str> = g["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["userId"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        members,
        ["alice", "bob", "carol"],
        "creator first, duplicates folded"
    );
    assert!(
        g["members"][1]["joinedAt"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z'))
    );
    assert_eq!(g["createdAt"], g["updatedAt"]);

    let id = g["id"].as_str().expect("id");
    let stored = c
        .mongo()
        .await?
        .collection::<mongodb::bson::Document>("groups")
        .find_one(doc! { "_id": id })
        .await?
        .expect("group document stored");
    assert_eq!(stored.get_str("name")?, "Team");
    assert_eq!(stored.get_str("description")?, "our room");
    assert_eq!(stored.get_str("ownerId")?, "alice");
    assert_eq!(stored.get_str("createdBy")?, "alice");
    let stored_members = stored.get_array("members")?;
    assert_eq!(stored_members.len(), 3);
    for m in stored_members {
        let m = m.as_document().expect("member document");
        assert!(m.get_str("userId").is_ok());
        assert!(m.get_datetime("joinedAt").is_ok());
    }
    assert!(stored.get_datetime("createdAt").is_ok());
    assert!(stored.get_datetime("updatedAt").is_ok());

    // the creator sees it; a stranger cannot
    let (status, list) = c.get(0, "bob", "/groups").await?;
    assert_eq!(status, 200);
    assert_eq!(list["groups"][0]["id"], id);
    assert_eq!(c.get(0, "carol", &format!("/groups/{id}")).await?.0, 200);
    let (status, err) = c.get(0, "mallory", &format!("/groups/{id}")).await?;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, err) = c
        .get(0, "bob", "/groups/0123456789abcdef0123456789abcdef")
        .await?;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bodies_and_limits_are_refused_with_clear_errors() -> anyhow::Result<()> {
    let c = Cluster::start_with(
        1,
        1,
        &[
            "--max-group-members",
            "3",
            "--max-group-name",
            "10",
            "--max-group-description",
            "20",
        ],
    )
    .await?;
    let cases = [
        (json!({"members": []}), 400, "invalid"),
        (json!({"name": "", "members": []}), 400, "invalid"),
        (json!({"name": "x", "members": "bob"}), 400, "invalid"),
        (json!({"name": "x", "members": ["b.x"]}), 400, "invalid"),
        (
            json!({"name": "x", "members": [], "extra": 1}),
            400,
            "invalid",
        ),
        (
            json!({"name": "x".repeat(11), "members": []}),
            400,
            "too_large",
        ),
        (
            json!({"name": "x", "description": "d".repeat(21), "members": []}),
            400,
            "too_large",
        ),
        (
            json!({"name": "x", "members": ["a", "b", "c"]}),
            400,
            "too_large",
        ),
    ];
    for (body, status, code) in cases {
        let (got, err) = post(&c, "/groups", Some("alice"), body.clone()).await?;
        assert_eq!(
            (got, err["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {err}"
        );
        assert!(!err["error"]["message"].as_str().unwrap_or("").is_empty());
    }
    // exactly at the limits is fine
    let (got, _) = post(
        &c,
        "/groups",
        Some("alice"),
        json!({"name": "x".repeat(10), "members": ["a", "b"]}),
    )
    .await?;
    assert_eq!(got, 201);

    // malformed JSON and an oversized body
    let res = c
        .http()
        .post(format!("{}/groups", c.edge_url(0)))
        .bearer_auth(token("alice"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await?;
    assert_eq!(res.status(), 400);
    let res = c
        .http()
        .post(format!("{}/groups", c.edge_url(0)))
        .bearer_auth(token("alice"))
        .header("content-type", "application/json")
        .body(format!(r#"{{"name":"{}"}}"#, "x".repeat(70 * 1024)))
        .send()
        .await?;
    assert_eq!(res.status(), 413);
    let err: Value = res.json().await?;
    assert_eq!(err["error"]["code"], "too_large");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_bad_tokens_get_401() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let body = json!({"name": "x", "members": []});
    let url = format!("{}/groups", c.edge_url(0));
    let expired = chat_auth::mint_hs256(
        SECRET.as_bytes(),
        &chat_domain::UserId::parse("alice")?,
        None,
        -3600,
    )?;
    let wrong_key = chat_auth::mint_hs256(
        b"some-other-secret-some-other-secret",
        &chat_domain::UserId::parse("alice")?,
        None,
        3600,
    )?;
    // {"alg":"none"} with a valid-looking body and no signature
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMH0.";
    for auth in [
        None,
        Some(expired.as_str()),
        Some(wrong_key.as_str()),
        Some(none),
        Some("garbage"),
    ] {
        let mut req = c.http().post(&url).json(&body);
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let res = req.send().await?;
        assert_eq!(res.status(), 401, "{auth:?}");
        let err: Value = res.json().await?;
        assert_eq!(err["error"]["code"], "unauthorized");
    }
    // the WebSocket upgrade too
    let ws = format!(
        "ws://{}/ws?token={expired}",
        c.edge_url(0).trim_start_matches("http://")
    );
    match tokio_tungstenite::connect_async(ws).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("expired token got a socket: {:?}", other.map(|_| ())),
    }
    let ws = format!("ws://{}/ws", c.edge_url(0).trim_start_matches("http://"));
    match tokio_tungstenite::connect_async(ws).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("no token got a socket: {:?}", other.map(|_| ())),
    }
    // the profile is created from the claims on connect
    let ws = c.connect(0, "alice", "laptop").await?;
    let profile = c
        .mongo()
        .await?
        .collection::<mongodb::bson::Document>("users")
        .find_one(doc! { "_id": "alice" })
        .await?
        .expect("profile created");
    assert!(profile.get_datetime("createdAt").is_ok());
    assert_eq!(profile.get_array("devices")?.len(), 1);
    ws.close().await?;
    c.stop().await
}

/// The owner renames a group and changes its description; members hear of
/// it with the group as it now is; anyone else, and bad input, is refused
/// with nothing changed; a change to what it already is tells no one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_renames_a_group_and_its_members_hear_of_it() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.create_group("alice", &["bob"]).await?;
    let id = g["id"].as_str().context("id")?.to_owned();
    let path = format!("/groups/{id}");
    let patch = |user: &'static str, body: Value| {
        let path = path.clone();
        let c = &c;
        async move {
            c.call(reqwest::Method::PATCH, 0, Some(user), &path, Some(&body))
                .await
        }
    };
    let mut bob = c.connect(0, "bob", "b").await?;

    // only the owner
    for user in ["bob", "mallory"] {
        let (s, e) = patch(user, json!({"name": "mine"})).await?;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{user}"
        );
    }
    let (s, _) = c
        .call(
            reqwest::Method::PATCH,
            0,
            Some("alice"),
            "/groups/00000000000000000000000000000000",
            Some(&json!({"name": "x"})),
        )
        .await?;
    assert_eq!(s, 404);
    // bad input, each with its code
    let long = "n".repeat(129);
    for (body, code) in [
        (json!({}), "invalid"),
        (json!({"name": "   "}), "invalid"),
        (json!({"name": long}), "too_large"),
        (json!({"description": "d".repeat(2049)}), "too_large"),
        (json!({"name": "a\u{202e}b"}), "invalid"),
        (json!({"name": 7}), "invalid"),
        (json!({"title": "x"}), "invalid"),
    ] {
        let (s, e) = patch("alice", body.clone()).await?;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (400, Some(code)),
            "{body}: {e}"
        );
    }

    // the owner renames and describes it
    let (s, renamed) = patch(
        "alice",
        json!({"name": "  plans ", "description": "weekly"}),
    )
    .await?;
    assert_eq!(s, 200, "{renamed}");
    assert_eq!(
        (renamed["name"].as_str(), renamed["description"].as_str()),
        (Some("plans"), Some("weekly"))
    );
    assert_ne!(renamed["updatedAt"], g["updatedAt"]);
    let heard = bob.skip_to("a_group_updated").await?;
    assert_eq!(
        heard["data"]["change"],
        json!({"kind": "details_changed", "userIds": [], "by": "alice"})
    );
    assert_eq!(heard["data"]["group"]["name"], "plans");
    let (_, shown) = c.get(0, "bob", &path).await?;
    assert_eq!(
        (shown["name"].as_str(), shown["description"].as_str()),
        (Some("plans"), Some("weekly"))
    );

    // the same again changes nothing and tells no one: the next thing bob
    // hears is the change after it
    let (s, same) = patch("alice", json!({"name": "plans"})).await?;
    assert_eq!((s, &same["updatedAt"]), (200, &renamed["updatedAt"]));
    patch("alice", json!({"description": ""})).await?;
    let next = bob.skip_to("a_group_updated").await?;
    assert_eq!(next["data"]["group"]["description"], "", "{next}");
    assert_eq!(next["data"]["group"]["name"], "plans");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_manages_members_and_others_cannot() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.create_group("alice", &["bob", "carol"]).await?;
    let id = g["id"].as_str().expect("id").to_owned();
    let created_at = g["updatedAt"].clone();

    // non-owners get 403 for owner-only operations
    let (s, e) = post(
        &c,
        &format!("/groups/{id}/members"),
        Some("bob"),
        json!({"userIds": ["dave"]}),
    )
    .await?;
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));
    let (s, _) = post(
        &c,
        &format!("/groups/{id}/owner"),
        Some("bob"),
        json!({"userId": "bob"}),
    )
    .await?;
    assert_eq!(s, 403);
    let (s, _) = delete(&c, &format!("/groups/{id}/members/carol"), "bob").await?;
    assert_eq!(s, 403);
    // strangers too
    let (s, _) = delete(&c, &format!("/groups/{id}/members/me"), "mallory").await?;
    assert_eq!(s, 403);

    // the owner adds, removes, cannot leave, transfers, then can leave
    let (s, g) = post(
        &c,
        &format!("/groups/{id}/members"),
        Some("alice"),
        json!({"userIds": ["dave"]}),
    )
    .await?;
    assert_eq!(s, 200, "{g}");
    assert_eq!(g["members"].as_array().map(Vec::len), Some(4));
    assert_ne!(
        g["updatedAt"], created_at,
        "updatedAt moves on every change"
    );
    let (s, g) = delete(&c, &format!("/groups/{id}/members/carol"), "alice").await?;
    assert_eq!(s, 200);
    assert!(!g["members"].to_string().contains("carol"));
    let (s, e) = delete(&c, &format!("/groups/{id}/members/me"), "alice").await?;
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("invalid")),
        "{e}"
    );
    let (s, e) = post(
        &c,
        &format!("/groups/{id}/owner"),
        Some("alice"),
        json!({"userId": "carol"}),
    )
    .await?;
    assert_eq!(s, 400, "new owner must be a member: {e}");
    let (s, g) = post(
        &c,
        &format!("/groups/{id}/owner"),
        Some("alice"),
        json!({"userId": "bob"}),
    )
    .await?;
    assert_eq!((s, g["ownerId"].as_str()), (200, Some("bob")));
    let (s, g) = delete(&c, &format!("/groups/{id}/members/me"), "alice").await?;
    assert_eq!(s, 200);
    assert!(!g["members"].to_string().contains("alice"));
    // alice is gone: she can no longer read it
    assert_eq!(c.get(0, "alice", &format!("/groups/{id}")).await?.0, 403);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_are_served() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "setup").await?;
    let mut bob = c.connect(0, "bob", "setup").await?;
    alice.send_text(&g, "m1", "hi").await?;
    bob.messages(1).await?;
    assert_eq!(
        bob.request_error("no_such_event", json!({})).await?,
        "invalid"
    );

    // the operator's routes are not on the public listener
    for path in ["/metrics", "/readyz"] {
        let res = c
            .http()
            .get(format!("{}{path}", c.edge_url(0)))
            .send()
            .await?;
        assert_eq!(res.status(), 404, "{path} is public");
    }
    let res = c
        .http()
        .get(format!("{}/metrics", c.ops_url(0)))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    let text = res.text().await?;
    for name in [
        "chat_ws_connections",
        "chat_ws_requests_total{event=\"send_group_message\"}",
        "chat_ws_errors_total{code=\"invalid\"}",
        "chat_ws_deliveries_total{feed=\"live\"}",
        "chat_ws_events_out_total{event=\"a_group_message\"}",
        "chat_ws_events_out_total{event=\"ack\"}",
        "chat_ws_events_out_total{event=\"a_session\"}",
        "chat_delivery_latency_seconds_bucket",
        "chat_rpc_seconds_bucket{method=\"send\"",
        "chat_publish_seconds_bucket",
        "chat_messages_sent_total",
        "chat_live_connections",
    ] {
        assert!(text.contains(name), "no {name} in /metrics:\n{text}");
    }
    let (status, _) = c.get(0, "alice", "/healthz").await?;
    assert_eq!(status, 200);
    let res = c
        .http()
        .get(format!("{}/readyz", c.ops_url(0)))
        .send()
        .await?;
    let status = res.status().as_u16();
    let ready: serde_json::Value = res.json().await?;
    assert_eq!(
        (status, ready["nats"].as_bool(), ready["workers"].as_bool()),
        (200, Some(true), Some(true))
    );
    c.stop().await
}

/// The caller's entry for group `g` in `GET /groups`.
async fn listed(c: &Cluster, user: &str, g: &str) -> anyhow::Result<Value> {
    let (status, page) = c.get(0, user, "/groups").await?;
    assert_eq!(status, 200, "{page}");
    let groups = page["groups"].as_array().cloned().unwrap_or_default();
    groups
        .into_iter()
        .find(|x| x["id"] == g)
        .ok_or_else(|| anyhow::anyhow!("{g} not listed for {user}: {page}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_list_counts_unread_from_the_read_watermark() -> anyhow::Result<()> {
    use chat_tests::eventually;
    use std::time::Duration;
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let empty = listed(&c, "bob", &g).await?;
    assert_eq!(empty["unreadCount"], 0);
    assert!(empty.get("lastMessage").is_none(), "{empty}");

    let mut alice = c.connect(0, "alice", "phone").await?;
    let mut last = Value::Null;
    for i in 1..=3 {
        last = alice
            .send_text(&g, &format!("m{i}"), &format!("hello {i}"))
            .await?;
    }
    // bob has three unread; alice none: her own messages count as read
    let wait = Duration::from_secs(10);
    let bob_view = eventually(wait, || async {
        let v = listed(&c, "bob", &g).await?;
        Ok((v["unreadCount"] == 3).then_some(v))
    })
    .await?;
    assert_eq!(bob_view["lastMessage"]["text"], "hello 3");
    assert_eq!(bob_view["lastMessage"]["seq"], last["seq"]);
    eventually(wait, || async {
        Ok((listed(&c, "alice", &g).await?["unreadCount"] == 0).then_some(()))
    })
    .await
    .context("sending marks the sender's own messages read")?;

    // bob reads up to the second: one left
    let mut bob = c.connect(0, "bob", "laptop").await?;
    let seen = c.history("bob", &g).await?; // newest first
    bob.request(
        "acknowledge_group_message",
        json!({"groupId": g, "messageId": seen[1]["messageId"]}),
    )
    .await?;
    assert_eq!(listed(&c, "bob", &g).await?["unreadCount"], 1);
    // a reply marks everything before it read, for its sender
    bob.send_text(&g, "r1", "thanks").await?;
    eventually(wait, || async {
        let v = listed(&c, "bob", &g).await?;
        Ok((v["unreadCount"] == 0 && v["lastMessage"]["text"] == "thanks").then_some(()))
    })
    .await?;
    assert_eq!(listed(&c, "alice", &g).await?["unreadCount"], 1);
    c.stop().await
}

/// Sent watermarks have a collection of their own (`sent_marks`); the
/// ones earlier versions kept in the group's receipts document
/// (`m.<user>.s`) still count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_take_sent_marks_from_both_places() -> anyhow::Result<()> {
    use chat_tests::eventually;
    use std::time::Duration;
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "phone").await?;
    for i in 1..=3 {
        alice
            .send_text(&g, &format!("m{i}"), &format!("hello {i}"))
            .await?;
    }
    let wait = Duration::from_secs(10);
    let unread = |user: &'static str, n: u64| {
        let (c, g) = (&c, &g);
        async move {
            eventually(wait, || async {
                Ok((listed(c, user, g).await?["unreadCount"] == n).then_some(()))
            })
            .await
            .with_context(|| format!("{user} has {n} unread"))
        }
    };
    unread("bob", 3).await?;
    unread("alice", 0).await?;
    let db = c.mongo().await?;
    let alice_sent = db
        .collection::<mongodb::bson::Document>("sent_marks")
        .find_one(doc! { "_id": format!("{g}:alice") })
        .await?
        .context("alice's sent watermark")?;
    assert_eq!(alice_sent.get_i64("s")?, 3, "{alice_sent}");
    // an earlier version's sent watermark of bob's, in the receipts
    // document: his count starts after it
    db.collection::<mongodb::bson::Document>("group_receipts")
        .update_one(doc! { "_id": &g }, doc! { "$max": { "m.bob.s": 2_i64 } })
        .upsert(true)
        .await?;
    unread("bob", 1).await?;
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_respect_joined_history() -> anyhow::Result<()> {
    use chat_tests::eventually;
    use std::time::Duration;
    let c = Cluster::start(1, 1).await?;
    let (status, g) = post(
        &c,
        "/groups",
        Some("alice"),
        json!({"name": "private", "members": ["bob"], "history": "joined"}),
    )
    .await?;
    assert_eq!(status, 201, "{g}");
    let g = g["id"].as_str().unwrap_or_default().to_owned();
    let mut alice = c.connect(0, "alice", "phone").await?;
    alice
        .request("subscribe_to_group", json!({"groupId": g}))
        .await?;
    let mut early = Vec::new();
    for i in 1..=4 {
        let ack = alice
            .send_text(&g, &format!("early{i}"), "before carol")
            .await?;
        early.push(ack["messageId"].as_str().unwrap_or_default().to_owned());
    }
    let wait = Duration::from_secs(10);
    eventually(wait, || async {
        Ok((listed(&c, "bob", &g).await?["unreadCount"] == 4).then_some(()))
    })
    .await?;
    let (status, _) = post(
        &c,
        &format!("/groups/{g}/members"),
        Some("alice"),
        json!({"userIds": ["carol"]}),
    )
    .await?;
    assert_eq!(status, 200);
    // carol sees nothing from before her addition: no unread, no last message
    let carol = listed(&c, "carol", &g).await?;
    assert_eq!(carol["unreadCount"], 0, "{carol}");
    assert!(carol.get("lastMessage").is_none(), "{carol}");
    alice.send_text(&g, "late", "after carol").await?;
    let carol = eventually(wait, || async {
        let v = listed(&c, "carol", &g).await?;
        Ok((v["unreadCount"] == 1).then_some(v))
    })
    .await?;
    assert_eq!(carol["lastMessage"]["text"], "after carol");
    // carol reads it: her watermarks rise past the messages she cannot
    // see, which still show her as having neither received nor read them
    let late = carol["lastMessage"]["messageId"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut carol_ws = c.connect(0, "carol", "phone").await?;
    carol_ws
        .request(
            "acknowledge_group_message",
            json!({ "groupId": g, "messageId": late }),
        )
        .await?;
    let carol_in = |body: &Value| {
        body["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["userId"] == "carol"))
            .map(|m| (m["delivered"].clone(), m["read"].clone()))
    };
    let status_of = |id: &str| {
        let (c, path) = (&c, format!("/groups/{g}/messages/{id}/status"));
        async move {
            let (status, body) = c.get(0, "alice", &path).await?;
            anyhow::ensure!(status == 200, "{status} {body}");
            Ok::<_, anyhow::Error>(body)
        }
    };
    let body = status_of(&late).await?;
    assert_eq!(carol_in(&body), Some((json!(true), json!(true))), "{body}");
    let body = status_of(&early[3]).await?;
    assert_eq!(
        carol_in(&body),
        Some((json!(false), json!(false))),
        "{body}"
    );
    c.stop().await
}

/// A member's receipts go with its membership: a removal forgets its entry
/// of the group's receipts document and its sent watermark (the document
/// holds members, not everyone who ever was one); unread counts start at
/// a member's addition, so one added again starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_members_receipts_are_forgotten() -> anyhow::Result<()> {
    use chat_tests::eventually;
    use mongodb::bson::Document;
    use std::time::Duration;
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let mut alice = c.connect(0, "alice", "phone").await?;
    let mut bob = c.connect(0, "bob", "phone").await?;
    let mut carol = c.connect(0, "carol", "phone").await?;
    let sent = alice.send_text(&g, "a1", "hello").await?;
    let mid = sent["messageId"].as_str().unwrap_or_default().to_owned();
    for ws in [&mut bob, &mut carol] {
        ws.request(
            "acknowledge_group_message",
            json!({ "groupId": g, "messageId": mid }),
        )
        .await?;
    }
    let own = bob.send_text(&g, "b1", "hi").await?["seq"]
        .as_i64()
        .context("seq")?;
    let db = c.mongo().await?;
    let receipts = db.collection::<Document>("group_receipts");
    let marks = db.collection::<Document>("sent_marks");
    let wait = Duration::from_secs(10);
    // both readers' entries, bob's sent watermark once his message is
    // persisted, and the delivery of his own message to his phone (the
    // edge reports deliveries each second: one reported after the removal
    // would write his entry again)
    eventually(wait, || async {
        let doc = receipts.find_one(doc! { "_id": &g }).await?;
        let m = doc.as_ref().and_then(|d| d.get_document("m").ok());
        let delivered = |m: &Document| {
            m.get_document("bob")
                .ok()
                .and_then(|b| b.get("d"))
                .and_then(|d| d.as_i64().or_else(|| d.as_i32().map(i64::from)))
                .is_some_and(|d| d >= own)
        };
        let read = m.is_some_and(|m| delivered(m) && m.contains_key("carol"));
        let mark = marks
            .find_one(doc! { "_id": format!("{g}:bob") })
            .await?
            .is_some();
        Ok((read && mark).then_some(()))
    })
    .await
    .context("bob's and carol's watermarks")?;

    assert_eq!(c.remove_member(0, "alice", &g, "bob").await?, 200);
    let doc = receipts
        .find_one(doc! { "_id": &g })
        .await?
        .context("the group's receipts")?;
    let m = doc.get_document("m")?;
    assert!(!m.contains_key("bob"), "bob's entry is forgotten: {doc}");
    assert!(m.contains_key("carol"), "carol's stays: {doc}");
    assert!(
        marks
            .find_one(doc! { "_id": format!("{g}:bob") })
            .await?
            .is_none(),
        "bob's sent watermark is forgotten"
    );
    // carol's read of the message still shows; bob is no member to show
    let (status, body) = c
        .get(0, "alice", &format!("/groups/{g}/messages/{mid}/status"))
        .await?;
    assert_eq!(status, 200, "{body}");
    let members = body["members"].as_array().cloned().unwrap_or_default();
    let of = |u: &str| members.iter().find(|m| m["userId"] == u).cloned();
    assert_eq!(
        of("carol").map(|m| m["read"].clone()),
        Some(json!(true)),
        "{body}"
    );
    assert!(of("bob").is_none(), "{body}");

    // added again, bob starts at his addition, as dave, new to the group,
    // does: the history is theirs to read (shared), but none of it is
    // unread; a new message is
    assert_eq!(c.add_members("alice", &g, &["bob", "dave"]).await?, 200);
    for user in ["bob", "dave"] {
        let entry = listed(&c, user, &g).await?;
        assert_eq!(entry["unreadCount"], 0, "{user}: {entry}");
        assert_eq!(entry["lastMessage"]["text"], "hi", "{user}: {entry}");
    }
    alice.send_text(&g, "a2", "welcome back").await?;
    for user in ["bob", "dave"] {
        eventually(wait, || async {
            Ok((listed(&c, user, &g).await?["unreadCount"] == 1).then_some(()))
        })
        .await
        .with_context(|| format!("{user} has one unread"))?;
    }
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_client_and_dev_tokens_are_served_only_as_configured() -> anyhow::Result<()> {
    // a production-like edge: the client, no token minting
    let c = Cluster::start(1, 1).await?;
    let http = c.http();
    let base = c.edge_url(0);
    let page = http.get(format!("{base}/app/")).send().await?;
    assert_eq!(page.status(), 200);
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(page.text().await?.contains("app.js"));
    let config: Value = http
        .get(format!("{base}/app/config.json"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(config, json!({"devTokens": false}));
    assert_eq!(
        http.get(format!("{base}/app/nope.js"))
            .send()
            .await?
            .status(),
        404
    );
    let (status, body) = post(&c, "/dev/token", None, json!({"userId": "bob"})).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &json!("not_found")),
        "{body}"
    );
    // any name may address a production edge (its load balancer's, say)
    assert_eq!(status_for_host(&base, "chat.example.com").await?, 200);
    c.stop().await?;

    // a development stack mints tokens that work; bad names are refused
    let c = Cluster::start_with(1, 1, &["--dev-tokens", "--no-web-app"]).await?;
    let base = c.edge_url(0);
    let (status, body) = post(
        &c,
        "/dev/token",
        None,
        json!({"userId": "bob", "name": "Bob"}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let minted = body["token"].as_str().unwrap_or_default().to_owned();
    let res = c
        .http()
        .get(format!("{base}/groups"))
        .bearer_auth(&minted)
        .send()
        .await?;
    assert_eq!(res.status(), 200, "a minted token is accepted");
    for bad in [
        json!({"userId": "not a user!"}),
        json!({"userId": "x".repeat(65)}),
        json!({"user": "bob"}),
    ] {
        let (status, body) = post(&c, "/dev/token", None, bad.clone()).await?;
        assert_eq!(
            (status, &body["error"]["code"]),
            (400, &json!("invalid")),
            "{bad}: {body}"
        );
    }
    // the client is off here
    assert_eq!(
        c.http().get(format!("{base}/app/")).send().await?.status(),
        404
    );
    // a page that pointed a name of its own at the stack (DNS rebinding)
    // reaches nothing; localhost and IP addresses do
    for (host, want) in [
        ("evil.example:8080", 421),
        ("localhost.evil.example", 421),
        ("localhost:8080", 200),
        ("127.0.0.1", 200),
    ] {
        assert_eq!(status_for_host(&base, host).await?, want, "{host}");
    }
    c.stop().await
}

/// The status of `GET /healthz` on the edge at `base` with `Host: host`.
async fn status_for_host(base: &str, host: &str) -> anyhow::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(PROMPTLY, tcp.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {answer}"))
}

/// Members pin messages they see, within the group's limit, and the member
/// who pinned one or the owner unpins it; the members who see a pinned
/// message hear of each change, and a member added later under `joined`
/// history neither lists nor hears of a pin of a message from before it
/// joined, nor may pin one; a deleted message is unpinned and cannot be
/// pinned; strangers and unknown messages are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_pin_messages_and_only_those_who_see_them_hear_of_it() -> anyhow::Result<()> {
    use reqwest::Method;
    let c = Cluster::start_with(1, 1, &["--max-group-pins", "2"]).await?;
    let g = c.group_with_history("alice", &["bob"], "joined").await?;
    let pins = format!("/groups/{g}/pins");
    let mut alice = c.connect(0, "alice", "w").await?;
    let m1 = alice.send_text(&g, "p1", "before dave").await?["messageId"]
        .as_str()
        .context("id")?
        .to_owned();
    assert_eq!(c.add_members("alice", &g, &["dave"]).await?, 200);
    let mut bob = c.connect(0, "bob", "w").await?;
    let mut dave = c.connect(0, "dave", "w").await?;
    let added = dave.skip_to("a_group_updated").await?;
    assert_eq!(added["data"]["change"]["kind"], "members_added");
    let m2 = alice.send_text(&g, "p2", "after dave").await?["messageId"]
        .as_str()
        .context("id")?
        .to_owned();
    let pin = |user: &'static str, m: &str| {
        let path = format!("{pins}/{m}");
        let c = &c;
        async move { c.call(Method::PUT, 0, Some(user), &path, None).await }
    };
    let unpin = |user: &'static str, m: &str| {
        let path = format!("{pins}/{m}");
        let c = &c;
        async move { c.call(Method::DELETE, 0, Some(user), &path, None).await }
    };
    let listed = |list: &Value| -> Vec<String> {
        list["pins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["messageId"].as_str().map(str::to_owned))
            .collect()
    };

    // alice pins the message from before dave joined: bob hears of it
    let (_, before) = c.get(0, "dave", &format!("/groups/{g}")).await?;
    let (status, list) = pin("alice", &m1).await?;
    assert_eq!(status, 200, "{list}");
    assert_eq!(listed(&list), [m1.as_str()]);
    assert_eq!(list["pins"][0]["pinnedBy"], "alice");
    let mut heard = bob.skip_to("a_group_updated").await?;
    if heard["data"]["change"]["kind"] == "members_added" {
        heard = bob.skip_to("a_group_updated").await?;
    }
    assert_eq!(
        heard["data"]["change"],
        json!({"kind": "message_pinned", "userIds": [], "by": "alice", "messageId": m1, "seq": 1})
    );
    // dave sees nothing of it (not even the group's updatedAt move), may
    // not pin it, and unpinning it is, to him, unpinning nothing
    let (_, seen) = c.get(0, "dave", &pins).await?;
    assert_eq!(listed(&seen), Vec::<String>::new(), "{seen}");
    let (_, after) = c.get(0, "dave", &format!("/groups/{g}")).await?;
    assert_eq!(after["updatedAt"], before["updatedAt"]);
    assert_eq!(pin("dave", &m1).await?.0, 404);
    assert_eq!(unpin("dave", &m1).await?.0, 204);
    let (_, still) = c.get(0, "alice", &pins).await?;
    assert_eq!(listed(&still), [m1.as_str()], "{still}");
    // dave pins the message after he joined: the next change he hears of
    let (status, list) = pin("dave", &m2).await?;
    assert_eq!((status, listed(&list)), (200, vec![m2.clone()]));
    let heard = dave.skip_to("a_group_updated").await?;
    assert_eq!(heard["data"]["change"]["messageId"], m2.as_str(), "{heard}");
    let (_, all) = c.get(0, "alice", &pins).await?;
    assert_eq!(listed(&all), [m2.clone(), m1.clone()], "newest pin first");
    // pinning again changes nothing; a third pin is past the limit
    assert_eq!(pin("bob", &m2).await?.0, 200);
    let m3 = alice.send_text(&g, "p3", "third").await?["messageId"]
        .as_str()
        .context("id")?
        .to_owned();
    let (status, e) = pin("bob", &m3).await?;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("too_large"))
    );

    // bob may not unpin dave's pin; the owner may; unpinning twice is fine
    let (status, _) = unpin("bob", &m2).await?;
    assert_eq!(status, 403);
    assert_eq!(unpin("alice", &m2).await?.0, 204);
    assert_eq!(unpin("alice", &m2).await?.0, 204);
    let heard = dave.skip_to("a_group_updated").await?;
    assert_eq!(heard["data"]["change"]["kind"], "message_unpinned");

    // a deleted message is unpinned, and cannot be pinned again
    assert_eq!(pin("bob", &m3).await?.0, 200);
    alice
        .request(
            "delete_group_message",
            json!({"groupId": g, "messageId": m3}),
        )
        .await?;
    let (_, after) = c.get(0, "alice", &pins).await?;
    assert_eq!(listed(&after), [m1.as_str()], "{after}");
    assert_eq!(pin("bob", &m3).await?.0, 404);

    // strangers and made-up messages
    assert_eq!(c.get(0, "mallory", &pins).await?.0, 403);
    assert_eq!(pin("mallory", &m1).await?.0, 403);
    assert_eq!(pin("bob", "0192f3a45b6c7d8e9f0123456789abcd").await?.0, 404);
    assert_eq!(pin("bob", "not an id").await?.0, 400);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_search_the_messages_they_see_a_bounded_scan_at_a_time() -> anyhow::Result<()> {
    // each call opens at most three messages
    let c = Cluster::start_with(1, 1, &["--max-search-scan", "3"]).await?;
    let g = c.group_with_history("alice", &["bob"], "joined").await?;
    let mut alice = c.connect(0, "alice", "w").await?;
    alice
        .send_text(&g, "s1", "Deploy notes, from before dave")
        .await?;
    assert_eq!(c.add_members("alice", &g, &["dave"]).await?, 200);
    alice.send_text(&g, "s2", "deployed on Friday").await?;
    alice.send_text(&g, "s3", "nothing to see").await?;
    let gone = alice.send_text(&g, "s4", "DEPLOY is done").await?;
    alice
        .request(
            "delete_group_message",
            json!({"groupId": g, "messageId": gone["messageId"]}),
        )
        .await?;
    alice.send_text(&g, "s5", "lunch?").await?;
    let edited = alice.send_text(&g, "s6", "a draft").await?;
    alice
        .request(
            "edit_group_message",
            json!({"groupId": g, "messageId": edited["messageId"], "text": "the deploy went well"}),
        )
        .await?;
    let search = |user: &'static str, query: String| {
        let c = &c;
        let path = format!("/groups/{g}/search?{query}");
        async move { c.get(0, user, &path).await }
    };
    let seqs = |page: &Value| -> Vec<u64> {
        page["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["seq"].as_u64())
            .collect()
    };

    // newest first, ignoring case, the edited text, not the deleted
    // message; three messages opened per call, `next` goes on
    let (status, page) = search("alice", "q=Deploy".into()).await?;
    assert_eq!((status, seqs(&page)), (200, vec![6]), "{page}");
    assert_eq!(page["messages"][0]["text"], "the deploy went well");
    assert!(page["messages"][0]["editedAt"].is_string(), "{page}");
    assert_eq!(page["next"], 4, "{page}");
    let (_, page) = search("alice", "q=Deploy&before=4".into()).await?;
    assert_eq!((seqs(&page), &page["next"]), (vec![2, 1], &json!(1)));
    let (_, page) = search("alice", "q=Deploy&before=1".into()).await?;
    assert_eq!(seqs(&page), Vec::<u64>::new());
    assert!(page.get("next").is_none(), "the first message: {page}");
    // a page ends at `limit` matches
    let (_, page) = search("alice", "q=deploy&limit=1&before=4".into()).await?;
    assert_eq!((seqs(&page), &page["next"]), (vec![2], &json!(2)));
    // every word, in any order
    let (_, page) = search("bob", "q=friday%20DEPLOYED&before=4".into()).await?;
    assert_eq!(seqs(&page), vec![2], "{page}");
    // dave joined after the first message: his search ends before it
    let (_, page) = search("dave", "q=deploy&before=4".into()).await?;
    assert_eq!(seqs(&page), vec![2], "{page}");
    assert!(page.get("next").is_none(), "{page}");

    // only members, of a group that exists; bad queries say why
    let (status, e) = search("carol", "q=deploy".into()).await?;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (403, Some("forbidden"))
    );
    let (status, _) = c
        .get(0, "alice", "/groups/no-such-group/search?q=deploy")
        .await?;
    assert_eq!(status, 404);
    for (query, code) in [
        ("", "invalid"),
        ("q=", "invalid"),
        ("q=%20%20", "invalid"),
        ("q=a%00b", "invalid"),
        ("q=deploy&limit=0", "invalid"),
        ("q=deploy&after=3", "invalid"),
    ] {
        let (status, e) = search("alice", query.into()).await?;
        assert_eq!(
            (status, e["error"]["code"].as_str()),
            (400, Some(code)),
            "{query}: {e}"
        );
    }
    let longest = "x".repeat(chat_domain::SEARCH_QUERY_MAX_CHARS);
    assert_eq!(search("alice", format!("q={longest}")).await?.0, 200);
    let (status, e) = search("alice", format!("q={longest}x")).await?;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("too_large")),
        "{e}"
    );
    let words = ["w"; chat_domain::SEARCH_QUERY_MAX_WORDS + 1].join("%20");
    let (status, _) = search("alice", format!("q={words}")).await?;
    assert_eq!(status, 200, "a repeated word counts once");
    let words: Vec<String> = (0..=chat_domain::SEARCH_QUERY_MAX_WORDS)
        .map(|i| format!("w{i}"))
        .collect();
    let (status, e) = search("alice", format!("q={}", words.join("%20"))).await?;
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("too_large")),
        "{e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_invites_by_code_and_holders_join_until_it_runs_out() -> anyhow::Result<()> {
    let c = Cluster::start_with(1, 1, &["--max-group-invites", "2"]).await?;
    let g = c.group_with_history("alice", &["bob"], "joined").await?;
    let mut alice = c.connect(0, "alice", "w").await?;
    let mut bob = c.connect(0, "bob", "w").await?;
    alice.send_text(&g, "before", "before carol").await?;
    let invites = format!("/groups/{g}/invites");
    let code_of = |status: u16, e: &Value| (status, e["error"]["code"].as_str().map(str::to_owned));
    let code = |s: &str| Some(s.to_owned());

    // only the owner makes, lists and revokes invites; bounds say why
    let (status, e) = post(&c, &invites, Some("bob"), json!({})).await?;
    assert_eq!(code_of(status, &e), (403, code("forbidden")));
    assert_eq!(c.get(0, "bob", &invites).await?.0, 403);
    assert_eq!(
        delete(&c, &format!("{invites}/0123456789abcdef"), "bob")
            .await?
            .0,
        403
    );
    for body in [
        json!({"expiresInSecs": 0}),
        json!({"expiresInSecs": 59}),
        json!({"expiresInSecs": 30 * 24 * 3600 + 1}),
        json!({"maxUses": 1001}),
        json!({"uses": 0}),
    ] {
        let (status, e) = post(&c, &invites, Some("alice"), body.clone()).await?;
        assert_eq!(code_of(status, &e), (400, code("invalid")), "{body}: {e}");
    }
    let (status, one) = post(
        &c,
        &invites,
        Some("alice"),
        json!({"maxUses": 1, "expiresInSecs": 3600}),
    )
    .await?;
    assert_eq!(status, 201, "{one}");
    assert_eq!(
        (
            &one["uses"],
            &one["maxUses"],
            &one["createdBy"],
            &one["groupId"]
        ),
        (&json!(0), &json!(1), &json!("alice"), &json!(g))
    );
    let secret_code = one["code"].as_str().context("a code")?.to_owned();
    // a listing never gives a code out again
    let (_, listed) = c.get(0, "alice", &invites).await?;
    assert_eq!(
        listed["invites"][0]["inviteId"], one["inviteId"],
        "{listed}"
    );
    assert!(listed["invites"][0].get("code").is_none(), "{listed}");

    // a wrong secret, invite or group: one answer for all
    let other = c.create_group("alice", &[]).await?;
    let other = other["id"].as_str().context("id")?;
    let parts: Vec<&str> = secret_code.split('.').collect();
    let flipped = if parts[2].starts_with('A') { "B" } else { "A" };
    for wrong in [
        format!("{}.{}.{flipped}{}", parts[0], parts[1], &parts[2][1..]),
        format!("{}.fedcba9876543210.{}", parts[0], parts[2]),
        format!("{other}.{}.{}", parts[1], parts[2]),
    ] {
        let (status, e) =
            post(&c, "/invites/join", Some("mallory"), json!({"code": wrong})).await?;
        assert_eq!(
            code_of(status, &e),
            (404, code("not_found")),
            "{wrong}: {e}"
        );
    }
    for bad in ["", "not-a-code", &"x".repeat(257)] {
        let (status, e) = post(&c, "/invites/join", Some("mallory"), json!({"code": bad})).await?;
        assert_eq!(code_of(status, &e), (400, code("invalid")), "{bad}: {e}");
    }

    // carol joins: everyone hears of it; she sees what follows her join,
    // live once she subscribes
    let (status, joined) = post(
        &c,
        "/invites/join",
        Some("carol"),
        json!({"code": secret_code}),
    )
    .await?;
    assert_eq!(status, 200, "{joined}");
    assert_eq!(joined["memberCount"], 3, "{joined}");
    let heard = bob.skip_to("a_group_updated").await?;
    assert_eq!(
        heard["data"]["change"],
        json!({"kind": "member_joined", "userIds": ["carol"], "by": "carol"})
    );
    assert!(c.history("carol", &g).await?.is_empty(), "joined history");
    let mut carol = c.connect(0, "carol", "w").await?;
    carol
        .request("subscribe_to_group", json!({"groupId": g}))
        .await?;
    alice.send_text(&g, "after", "welcome carol").await?;
    let got = carol.skip_to("a_group_message").await?;
    assert_eq!(got["data"]["text"], "welcome carol");
    // its one use is spent: dave cannot; carol again changes nothing
    let (status, _) = post(
        &c,
        "/invites/join",
        Some("dave"),
        json!({"code": secret_code}),
    )
    .await?;
    assert_eq!(status, 404);
    let (status, again) = post(
        &c,
        "/invites/join",
        Some("carol"),
        json!({"code": secret_code}),
    )
    .await?;
    assert_eq!((status, &again["memberCount"]), (200, &json!(3)));
    let (_, listed) = c.get(0, "alice", &invites).await?;
    assert_eq!(listed["invites"], json!([]), "used up");

    // someone the owner blocks is kept out, the invite unused
    assert_eq!(
        c.call(
            reqwest::Method::PUT,
            0,
            Some("alice"),
            "/blocks/grace",
            None
        )
        .await?
        .0,
        200
    );
    let (_, open) = post(&c, &invites, Some("alice"), json!({"maxUses": 1})).await?;
    let (status, _) = post(
        &c,
        "/invites/join",
        Some("grace"),
        json!({"code": open["code"]}),
    )
    .await?;
    assert_eq!(status, 404);
    let (_, listed) = c.get(0, "alice", &invites).await?;
    assert_eq!(listed["invites"][0]["uses"], 0, "{listed}");
    assert_eq!(
        delete(
            &c,
            &format!(
                "{invites}/{}",
                open["inviteId"].as_str().unwrap_or_default()
            ),
            "alice"
        )
        .await?
        .0,
        204
    );

    // two at once on a single use: one gets in
    let (_, single) = post(&c, &invites, Some("alice"), json!({"maxUses": 1})).await?;
    let body = json!({"code": single["code"]});
    let (h, i) = tokio::join!(
        post(&c, "/invites/join", Some("henry"), body.clone()),
        post(&c, "/invites/join", Some("ivy"), body.clone()),
    );
    let mut statuses = [h?.0, i?.0];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 404]);

    // at most two valid invites; a revoked one lets no one in
    let mut made = Vec::new();
    for _ in 0..2 {
        let (status, i) = post(&c, &invites, Some("alice"), json!({})).await?;
        assert_eq!(status, 201, "{i}");
        assert!(i.get("maxUses").is_none(), "{i}");
        made.push(i);
    }
    let (status, e) = post(&c, &invites, Some("alice"), json!({})).await?;
    assert_eq!(code_of(status, &e), (400, code("too_large")), "{e}");
    let revoke = format!(
        "{invites}/{}",
        made[0]["inviteId"].as_str().unwrap_or_default()
    );
    assert_eq!(delete(&c, &revoke, "alice").await?.0, 204);
    assert_eq!(
        delete(&c, &revoke, "alice").await?.0,
        204,
        "again: nothing to do"
    );
    let (status, _) = post(
        &c,
        "/invites/join",
        Some("dave"),
        json!({"code": made[0]["code"]}),
    )
    .await?;
    assert_eq!(status, 404);
    // a deleted group's invites let no one in
    assert_eq!(delete(&c, &format!("/groups/{g}"), "alice").await?.0, 204);
    let (status, _) = post(
        &c,
        "/invites/join",
        Some("dave"),
        json!({"code": made[1]["code"]}),
    )
    .await?;
    assert_eq!(status, 404);
    Ok(())
}

/// History and search read each page as a seq range below the stream's
/// newest message of the group; a group whose messages all aged out of the
/// stream (kept 30 days) has none there, and must still read MongoDB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_search_read_what_the_stream_no_longer_holds() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "w").await?;
    for (i, text) in ["first words", "second words", "third"].iter().enumerate() {
        alice.send_text(&g, &format!("m{i}"), text).await?;
    }
    // acknowledged means in history
    assert_eq!(c.history("bob", &g).await?.len(), 3);
    let purged = c
        .bus()
        .await?
        .purge_group_messages(&chat_domain::GroupId::parse(g.as_str())?)
        .await?;
    assert_eq!(purged, 3);
    let texts: Vec<Value> = c
        .history("bob", &g)
        .await?
        .into_iter()
        .map(|m| m["text"].clone())
        .collect();
    assert_eq!(
        texts,
        [json!("third"), json!("second words"), json!("first words")]
    );
    let (_, older) = c
        .get(0, "bob", &format!("/groups/{g}/messages?before=3&limit=1"))
        .await?;
    assert_eq!(older["messages"][0]["seq"], 2, "{older}");
    let (_, found) = c
        .get(0, "bob", &format!("/groups/{g}/search?q=words"))
        .await?;
    let seqs: Vec<&Value> = found["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| &m["seq"])
        .collect();
    assert_eq!(seqs, [&json!(2), &json!(1)], "{found}");
    Ok(())
}
