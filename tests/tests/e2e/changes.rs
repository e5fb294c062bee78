//! Edits and deletes (issue 15, item 1) across two edges and two workers:
//! who may make them, what members receive live and on reconnect, in the
//! group's order, and what history keeps.

use anyhow::Context;
use chat_tests::{Client, Cluster, PROMPTLY, eventually};
use serde_json::{Value, json};

/// The `(event, seq)` of every message and change push until `n` of them
/// have arrived, skipping other pushes.
async fn changes_and_messages(client: &mut Client, n: usize) -> anyhow::Result<Vec<(String, u64)>> {
    let mut got = Vec::new();
    while got.len() < n {
        let push = client
            .next_any_push()
            .await
            .with_context(|| format!("after {got:?}"))?;
        let event = push["event"].as_str().unwrap_or_default();
        if matches!(
            event,
            "a_group_message" | "a_message_updated" | "a_message_deleted"
        ) {
            got.push((event.to_owned(), push["data"]["seq"].as_u64().unwrap_or(0)));
        }
    }
    Ok(got)
}

fn pairs(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(e, s)| (e.to_string(), *s)).collect()
}

/// The message `seq` in `user`'s history once `ready` holds for it.
async fn in_history(
    c: &Cluster,
    user: &str,
    g: &str,
    seq: u64,
    ready: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    eventually(PROMPTLY, || async {
        let page = c.history(user, g).await?;
        Ok(page.into_iter().find(|m| m["seq"] == seq && ready(m)))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_deletes_reach_every_member_live_and_on_reconnect_in_order() -> anyhow::Result<()>
{
    let c = Cluster::start(2, 2).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    // carol's device has a place before anything is sent, then goes away
    c.connect(1, "carol", "phone").await?.close().await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(1, "bob", "web").await?;

    let m1 = alice.send_text(&g, "m1", "hello").await?;
    let m2 = bob.send_text(&g, "m2", "second").await?;
    let edit = json!({"groupId": g, "messageId": m1["messageId"], "text": "hello, all"});
    let ack = alice.request("edit_group_message", edit.clone()).await?;
    assert_eq!(
        (&ack["groupId"], &ack["messageId"], &ack["seq"]),
        (&json!(g), &m1["messageId"], &json!(1))
    );
    assert!(ack["editedAt"].is_string(), "{ack}");
    // the owner deletes someone else's message
    let delete = json!({"groupId": g, "messageId": m2["messageId"]});
    let deleted = alice
        .request("delete_group_message", delete.clone())
        .await?;
    assert_eq!(deleted["seq"], 2);
    // a change takes no seq: the next message is 3
    assert_eq!(alice.send_text(&g, "m3", "third").await?["seq"], 3);

    // live, on the other edge
    assert_eq!(
        changes_and_messages(&mut bob, 5).await?,
        pairs(&[
            ("a_group_message", 1),
            ("a_group_message", 2),
            ("a_message_updated", 1),
            ("a_message_deleted", 2),
            ("a_group_message", 3),
        ])
    );
    // and on reconnect, in the same order, without the deleted message:
    // it was erased from the stream once deleted (history has its
    // tombstone, where the gap in `seq` sends a client)
    let mut carol = c.connect(0, "carol", "phone").await?;
    assert_eq!(
        changes_and_messages(&mut carol, 4).await?,
        pairs(&[
            ("a_group_message", 1),
            ("a_message_updated", 1),
            ("a_message_deleted", 2),
            ("a_group_message", 3),
        ])
    );
    let doc = c
        .mongo()
        .await?
        .collection::<mongodb::bson::Document>("messages")
        .find_one(mongodb::bson::doc! { "_id": m2["messageId"].as_str().unwrap_or_default() })
        .await?
        .context("the tombstone")?;
    let at = doc.get_i64("streamSeq")? as u64;
    assert!(
        c.bus().await?.group_stream_message(at).await.is_err(),
        "the deleted message is still in the stream at {at}"
    );

    // retries change nothing and tell nobody again
    assert_eq!(alice.request("edit_group_message", edit).await?["seq"], 1);
    assert_eq!(
        alice.request("delete_group_message", delete).await?["seq"],
        2
    );
    alice.send_text(&g, "m4", "fourth").await?;
    assert_eq!(
        changes_and_messages(&mut bob, 1).await?,
        pairs(&[("a_group_message", 4)])
    );

    // what history keeps
    let edited = in_history(&c, "carol", &g, 1, |m| m["editedAt"].is_string()).await?;
    assert_eq!(edited["text"], "hello, all");
    let tombstone = in_history(&c, "carol", &g, 2, |m| m["deleted"] == true).await?;
    assert!(tombstone["deletedAt"].is_string(), "{tombstone}");
    assert_eq!(tombstone.get("text"), None, "no content kept: {tombstone}");
    assert_eq!(tombstone["senderId"], "bob");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_pushes_carry_the_new_text_and_who_deleted() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(0, "bob", "web").await?;
    let m = bob.send_text(&g, "m1", "typo").await?;
    bob.request(
        "edit_group_message",
        json!({"groupId": g, "messageId": m["messageId"], "text": "fixed"}),
    )
    .await?;
    let updated = alice.skip_to("a_message_updated").await?["data"].clone();
    assert_eq!(
        (
            &updated["messageId"],
            &updated["seq"],
            &updated["senderId"],
            &updated["text"]
        ),
        (&m["messageId"], &json!(1), &json!("bob"), &json!("fixed"))
    );
    assert!(updated["editedAt"].is_string(), "{updated}");
    // the sender deletes its own message
    bob.request(
        "delete_group_message",
        json!({"groupId": g, "messageId": m["messageId"]}),
    )
    .await?;
    let deleted = alice.skip_to("a_message_deleted").await?["data"].clone();
    assert_eq!(
        (
            &deleted["messageId"],
            &deleted["seq"],
            &deleted["deletedBy"]
        ),
        (&m["messageId"], &json!(1), &json!("bob"))
    );
    // the sender's own connection hears it too
    assert_eq!(bob.skip_to("a_message_deleted").await?["data"], deleted);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_sender_edits_and_only_the_sender_or_owner_deletes() -> anyhow::Result<()> {
    let c = Cluster::start(2, 2).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(1, "bob", "web").await?;
    let mut mallory = c.connect(0, "mallory", "web").await?;
    let m = alice.send_text(&g, "m1", "mine").await?;
    let id = m["messageId"].clone();
    let edit = |text: &str| json!({"groupId": g, "messageId": id, "text": text});
    let delete = json!({"groupId": g, "messageId": id});

    assert_eq!(
        bob.request_error("edit_group_message", edit("theirs"))
            .await?,
        "forbidden"
    );
    assert_eq!(
        bob.request_error("delete_group_message", delete.clone())
            .await?,
        "forbidden",
        "neither sender nor owner"
    );
    for event in ["edit_group_message", "delete_group_message"] {
        let mut data = edit("x");
        if event == "delete_group_message" {
            data = delete.clone();
        }
        assert_eq!(mallory.request_error(event, data).await?, "forbidden");
    }
    // bad input
    let too_long = "x".repeat(16 * 1024 + 1);
    assert_eq!(
        alice
            .request_error("edit_group_message", edit(&too_long))
            .await?,
        "too_large"
    );
    assert_eq!(
        alice
            .request_error("edit_group_message", edit(" \n"))
            .await?,
        "invalid"
    );
    assert_eq!(
        alice
            .request_error("edit_group_message", edit("\u{202E}evil"))
            .await?,
        "invalid"
    );
    let unknown = json!({"groupId": g, "messageId": "0192f3a45b6c7d8e9f0123456789abcd"});
    assert_eq!(
        alice.request_error("delete_group_message", unknown).await?,
        "not_found"
    );
    let bad_id = json!({"groupId": g, "messageId": "not an id"});
    assert_eq!(
        alice.request_error("delete_group_message", bad_id).await?,
        "invalid"
    );
    let extra = json!({"groupId": g, "messageId": id, "text": "x", "seq": 1});
    assert_eq!(
        alice.request_error("edit_group_message", extra).await?,
        "invalid"
    );

    // a removed member can change nothing of its own
    let b = bob.send_text(&g, "b1", "bob's").await?;
    assert_eq!(c.remove_member(0, "alice", &g, "bob").await?, 200);
    // the other worker hears of the removal a moment after it returns:
    // once two sends in a row (one through each worker) are refused, both
    // know
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    let (mut refused, mut i) = (0, 0);
    while refused < 2 {
        i += 1;
        let probe =
            json!({"groupId": g, "clientMsgId": format!("probe{i}"), "type": "text", "text": "?"});
        match bob.request("send_group_message", probe).await {
            Ok(_) => refused = 0,
            Err(_) => refused += 1,
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the removal never reached both workers"
        );
    }
    let bobs = json!({"groupId": g, "messageId": b["messageId"]});
    assert_eq!(
        bob.request_error("delete_group_message", bobs.clone())
            .await?,
        "forbidden"
    );

    // once deleted: no edit, no reaction, no reply
    alice
        .request("delete_group_message", delete.clone())
        .await?;
    assert_eq!(
        alice
            .request_error("edit_group_message", edit("back"))
            .await?,
        "not_found"
    );
    let mut carol = c.connect(1, "carol", "web").await?;
    assert_eq!(
        carol
            .request_error(
                "add_reaction",
                json!({"groupId": g, "messageId": id, "emoji": "👍"})
            )
            .await?,
        "not_found"
    );
    assert_eq!(
        carol
            .request_error(
                "send_group_message",
                json!({"groupId": g, "clientMsgId": "r1", "type": "text", "text": "?", "replyTo": id})
            )
            .await?,
        "not_found"
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_end_with_the_window_and_replies_show_the_answered_message_as_it_is_now()
-> anyhow::Result<()> {
    // no edit window at all: nothing can be edited, everything deleted
    let c = Cluster::start_with(1, 1, &["--edit-window-secs=0"]).await?;
    let g = c.room(&["alice", "bob"]).await?;
    // bob's phone is away from before the reply until after the delete
    c.connect(0, "bob", "phone").await?.close().await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(0, "bob", "web").await?;
    let m = alice.send_text(&g, "m1", "first").await?;
    assert_eq!(
        alice
            .request_error(
                "edit_group_message",
                json!({"groupId": g, "messageId": m["messageId"], "text": "again"})
            )
            .await?,
        "forbidden"
    );
    let reply = bob
        .request(
            "send_group_message",
            json!({"groupId": g, "clientMsgId": "r1", "type": "text", "text": "what?",
                   "replyTo": m["messageId"]}),
        )
        .await?;
    alice
        .request(
            "delete_group_message",
            json!({"groupId": g, "messageId": m["messageId"]}),
        )
        .await?;
    let shown = in_history(&c, "bob", &g, reply["seq"].as_u64().unwrap_or(0), |r| {
        r["replyTo"]["deleted"] == true
    })
    .await?;
    assert_eq!(shown["replyTo"].get("preview"), None, "{shown}");
    // catching up, the phone gets the reply as history shows it: the text
    // taken back is not in it
    let mut phone = c.connect(0, "bob", "phone").await?;
    let caught = phone.message_with(&reply["messageId"]).await?;
    assert_eq!(
        caught["replyTo"],
        json!({"messageId": m["messageId"], "seq": m["seq"], "senderId": "alice",
               "type": "text", "deleted": true}),
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_message_s_replies_preview_the_new_text_in_history() -> anyhow::Result<()> {
    let c = Cluster::start(1, 2).await?;
    let g = c.room(&["alice", "bob"]).await?;
    c.connect(0, "bob", "phone").await?.close().await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(0, "bob", "web").await?;
    let m = alice.send_text(&g, "m1", "lunch at 12?").await?;
    let reply = bob
        .request(
            "send_group_message",
            json!({"groupId": g, "clientMsgId": "r1", "type": "text", "text": "yes",
                   "replyTo": m["messageId"]}),
        )
        .await?;
    alice
        .request(
            "edit_group_message",
            json!({"groupId": g, "messageId": m["messageId"], "text": "lunch at 1?"}),
        )
        .await?;
    let shown = in_history(&c, "bob", &g, reply["seq"].as_u64().unwrap_or(0), |r| {
        r["replyTo"]["preview"] == "lunch at 1?"
    })
    .await?;
    assert_eq!(shown["replyTo"].get("deleted"), None, "{shown}");
    // and so does a device catching up on the reply
    let mut phone = c.connect(0, "bob", "phone").await?;
    let caught = phone.message_with(&reply["messageId"]).await?;
    assert_eq!(caught["replyTo"]["preview"], "lunch at 1?", "{caught}");
    assert_eq!(caught["text"], "yes");
    // the group list's last message is that reply: it shows the same
    let last = |user: &'static str| {
        let c = &c;
        async move {
            let (status, page) = c.get(0, user, "/groups").await?;
            anyhow::ensure!(status == 200, "{page}");
            anyhow::Ok(page["groups"][0]["lastMessage"]["replyTo"].clone())
        }
    };
    assert_eq!(last("alice").await?["preview"], "lunch at 1?");

    // back to an earlier text, then the same again: each is a change
    for text in ["lunch at 12?", "lunch at 1?", "lunch at 12?"] {
        alice
            .request(
                "edit_group_message",
                json!({"groupId": g, "messageId": m["messageId"], "text": text}),
            )
            .await?;
    }
    let mut texts = Vec::new();
    while texts.len() < 4 {
        texts.push(bob.skip_to("a_message_updated").await?["data"]["text"].clone());
    }
    assert_eq!(
        texts,
        [
            json!("lunch at 1?"),
            json!("lunch at 12?"),
            json!("lunch at 1?"),
            json!("lunch at 12?")
        ]
    );
    // acknowledged once applied: history shows it at once
    let now = c.history("bob", &g).await?;
    let first = now.iter().find(|x| x["seq"] == 1).context("in history")?;
    assert_eq!(first["text"], "lunch at 12?");

    // deleted: no preview anywhere, the group list included
    alice
        .request(
            "delete_group_message",
            json!({"groupId": g, "messageId": m["messageId"]}),
        )
        .await?;
    let gone = last("bob").await?;
    assert_eq!(
        (gone["deleted"].clone(), gone.get("preview")),
        (json!(true), None),
        "{gone}"
    );
    c.stop().await
}

/// A group with `joined` history where bob (on edge 1) was a member before
/// alice's message `m1` and dave (on edge 1) was added after it; both
/// subscribed. Returns the group, alice's, bob's and dave's connections and
/// `m1`'s ack.
async fn joined_late(c: &Cluster) -> anyhow::Result<(String, Client, Client, Client, Value)> {
    let g = c.group_with_history("alice", &["bob"], "joined").await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(1, "bob", "web").await?;
    bob.request("subscribe_to_group", json!({"groupId": g}))
        .await?;
    let early = alice.send_text(&g, "m1", "before dave").await?;
    assert_eq!(c.add_members("alice", &g, &["dave"]).await?, 200);
    let mut dave = c.connect(1, "dave", "web").await?;
    dave.request("subscribe_to_group", json!({"groupId": g}))
        .await?;
    Ok((g, alice, bob, dave, early))
}

/// Under `joined` history a member who joined after a message hears of no
/// change to it: an edit would hand it the text of a message it cannot see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_joined_history_a_late_member_hears_no_change_of_what_it_cannot_see()
-> anyhow::Result<()> {
    let c = Cluster::start(2, 2).await?;
    let (g, mut alice, mut bob, mut dave, early) = joined_late(&c).await?;
    alice
        .request(
            "edit_group_message",
            json!({"groupId": g, "messageId": early["messageId"], "text": "secret"}),
        )
        .await?;
    alice.send_text(&g, "m2", "after dave").await?;
    assert_eq!(
        changes_and_messages(&mut bob, 3).await?,
        pairs(&[
            ("a_group_message", 1),
            ("a_message_updated", 1),
            ("a_group_message", 2)
        ])
    );
    // dave: only what was sent after it joined, and no edit before it
    assert_eq!(
        changes_and_messages(&mut dave, 1).await?,
        pairs(&[("a_group_message", 2)])
    );
    // nor on reconnect through a catch-up
    c.connect(0, "dave", "phone").await?.close().await?;
    alice
        .request(
            "delete_group_message",
            json!({"groupId": g, "messageId": early["messageId"]}),
        )
        .await?;
    alice.send_text(&g, "m3", "later").await?;
    let mut back = c.connect(0, "dave", "phone").await?;
    assert_eq!(
        changes_and_messages(&mut back, 1).await?,
        pairs(&[("a_group_message", 3)])
    );
    c.stop().await
}

/// Under `joined` history a member who joined after a message hears of no
/// reaction to it either: the signal would tell it the message's id, seq and
/// who reacted. Members who can see it, and later messages, are told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_joined_history_a_late_member_hears_no_reaction_to_what_it_cannot_see()
-> anyhow::Result<()> {
    let c = Cluster::start(2, 2).await?;
    let (g, mut alice, mut bob, mut dave, early) = joined_late(&c).await?;
    // dave's connection follows the group (its edge applied the subscribe)
    let late = alice.send_text(&g, "m2", "after dave").await?;
    assert_eq!(
        dave.skip_to("a_group_message").await?["data"]["seq"],
        late["seq"]
    );
    let react = |m: &Value| json!({"groupId": g, "messageId": m["messageId"], "emoji": "👍"});
    alice.request("add_reaction", react(&early)).await?;
    // bob, a member since before it, is told
    assert_eq!(
        bob.skip_to("a_reaction").await?["data"]["seq"],
        early["seq"]
    );
    alice.request("add_reaction", react(&late)).await?;
    // the first reaction dave hears of is the one to what it can see
    let heard = dave.skip_to("a_reaction").await?;
    assert_eq!(heard["data"]["messageId"], late["messageId"], "{heard}");
    c.stop().await
}

/// Under `joined` history a member removed and added again sees the group
/// from its new addition on: a connection that knew where its view started
/// before asks again, and hears no edit of what was sent while it was out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_added_again_hears_no_change_of_what_was_sent_while_it_was_out()
-> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.group_with_history("alice", &["dave"], "joined").await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut dave = c.connect(0, "dave", "web").await?;
    dave.request("subscribe_to_group", json!({"groupId": g}))
        .await?;
    let first = alice.send_text(&g, "m1", "one").await?;
    let edit =
        |m: &Value, text: &str| json!({"groupId": g, "messageId": m["messageId"], "text": text});
    // dave's connection learns where its view starts (0: from the start)
    alice
        .request("edit_group_message", edit(&first, "one!"))
        .await?;
    assert_eq!(
        changes_and_messages(&mut dave, 2).await?,
        pairs(&[("a_group_message", 1), ("a_message_updated", 1)])
    );
    assert_eq!(c.remove_member(0, "alice", &g, "dave").await?, 200);
    let second = alice.send_text(&g, "m2", "while dave is out").await?;
    assert_eq!(c.add_members("alice", &g, &["dave"]).await?, 200);
    dave.request("subscribe_to_group", json!({"groupId": g}))
        .await?;
    alice
        .request("edit_group_message", edit(&second, "secret"))
        .await?;
    alice.send_text(&g, "m3", "back").await?;
    assert_eq!(
        changes_and_messages(&mut dave, 1).await?,
        pairs(&[("a_group_message", 3)])
    );
    c.stop().await
}

/// The stream keeps only a message's newest edit, and a delete erases it
/// with the message: a device that catches up after the delete receives
/// none of the deleted text, from the message or from any of its edits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_message_leaves_no_edit_of_it_in_the_stream() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    // devices with a place before anything is sent, then away
    c.connect(0, "bob", "tablet").await?.close().await?;
    c.connect(0, "carol", "phone").await?.close().await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let m1 = alice.send_text(&g, "m1", "hello").await?;
    for text in ["secret one", "secret two"] {
        let edit = json!({"groupId": g, "messageId": m1["messageId"], "text": text});
        alice.request("edit_group_message", edit).await?;
    }
    in_history(&c, "alice", &g, 1, |m| m["text"] == "secret two").await?;
    // bob's tablet catches up on the message and its newest edit only
    let mut tablet = c.connect(0, "bob", "tablet").await?;
    let mut got = Vec::new();
    while got.len() < 2 {
        let push = tablet
            .next_any_push()
            .await
            .with_context(|| format!("{got:?}"))?;
        if matches!(
            push["event"].as_str(),
            Some("a_group_message" | "a_message_updated")
        ) {
            got.push((push["event"].clone(), push["data"]["text"].clone()));
        }
    }
    assert_eq!(
        got,
        vec![
            (json!("a_group_message"), json!("hello")),
            (json!("a_message_updated"), json!("secret two")),
        ]
    );
    tablet.close().await?;

    let delete = json!({"groupId": g, "messageId": m1["messageId"]});
    alice.request("delete_group_message", delete).await?;
    alice.send_text(&g, "m2", "after").await?;
    in_history(&c, "alice", &g, 1, |m| m["deleted"] == true).await?;
    // carol's phone: the delete and the next message, no text of m1
    let mut carol = c.connect(0, "carol", "phone").await?;
    let mut seen = Vec::new();
    loop {
        let push = carol
            .next_any_push()
            .await
            .with_context(|| format!("{seen:?}"))?;
        let text = push.to_string();
        assert!(
            !text.contains("secret") && !text.contains("hello"),
            "{text}"
        );
        let event = push["event"].as_str().unwrap_or_default().to_owned();
        if event == "a_group_message" && push["data"]["seq"] == 2 {
            break;
        }
        if event.starts_with("a_message") || event == "a_group_message" {
            seen.push(event);
        }
    }
    assert_eq!(seen, vec!["a_message_deleted".to_owned()]);
    c.stop().await
}

/// What replies answer, as a catch-up asks a worker: only for a member,
/// only of its group, at most 100 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_tells_what_became_of_answered_messages_only_to_members() -> anyhow::Result<()> {
    use chat_rpc::pb::{self, messages_client::MessagesClient};
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let other = c.room(&["alice", "carol"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let kept = alice.send_text(&g, "m1", "kept").await?;
    let edited = alice.send_text(&g, "m2", "before").await?;
    let gone = alice.send_text(&g, "m3", "taken back").await?;
    let elsewhere = alice.send_text(&other, "m4", "elsewhere").await?;
    alice
        .request(
            "edit_group_message",
            json!({"groupId": g, "messageId": edited["messageId"], "text": "after"}),
        )
        .await?;
    for m in [&gone, &elsewhere] {
        alice
            .request(
                "delete_group_message",
                json!({"groupId": m["groupId"], "messageId": m["messageId"]}),
            )
            .await?;
    }
    let channel = chat_tests::signed_channel(&c.worker_url(0)).await?;
    let ask = |caller: &str, ids: Vec<String>| {
        let req = tonic::Request::new(pb::AnsweredRequest {
            caller: caller.into(),
            group_id: g.clone(),
            message_ids: ids,
        });
        let mut client = MessagesClient::new(channel.clone());
        async move { client.answered(req).await }
    };
    let id = |m: &Value| m["messageId"].as_str().unwrap_or_default().to_owned();
    let all: Vec<String> = [&kept, &edited, &gone, &elsewhere].map(id).into();
    let mut changed = ask("bob", all.clone()).await?.into_inner().changed;
    changed.sort_by_key(|r| r.seq);
    let changed: Vec<(String, String, bool)> = changed
        .into_iter()
        .map(|r| (r.message_id, r.preview, r.deleted))
        .collect();
    assert_eq!(
        changed,
        [
            (id(&edited), "after".to_owned(), false),
            (id(&gone), String::new(), true),
        ],
        "the unchanged one and the other group's are not told"
    );
    let refused = ask("carol", all).await.map(|_| ()).map_err(|s| s.code());
    assert_eq!(refused, Err(tonic::Code::PermissionDenied), "not a member");
    let too_many = ask("bob", vec![id(&kept); 101])
        .await
        .map(|_| ())
        .map_err(|s| s.code());
    assert_eq!(too_many, Err(tonic::Code::InvalidArgument));
    let bad = ask("bob", vec!["not an id".into()])
        .await
        .map(|_| ())
        .map_err(|s| s.code());
    assert_eq!(bad, Err(tonic::Code::InvalidArgument));
    c.stop().await
}
