//! `notify_create_group` and `a_group_created`/`a_group_updated`: live on
//! every connection, on any edge; offline members on reconnect, once; durable
//! across edge and worker restarts.

use chat_tests::{Client, Cluster};
use serde_json::{Value, json};

fn group_id(push: &Value) -> &str {
    push["data"]["group"]["id"].as_str().unwrap_or_default()
}

/// Proves that nothing else is queued for `client`: `trigger` makes one new
/// push for it, which must be the next thing it receives.
async fn next_is(client: &mut Client, event: &str, id: &str) -> anyhow::Result<()> {
    let push = client.next_any_push().await?;
    assert_eq!(
        (push["event"].as_str(), group_id(&push)),
        (Some(event), id),
        "unexpected push {push}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_hear_of_a_new_group_live_on_every_device_and_offline_once() -> anyhow::Result<()> {
    let c = Cluster::start(2, 1).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob_phone = c.connect(1, "bob", "phone").await?;
    let mut bob_laptop = c.connect(0, "bob", "laptop").await?;
    let g = c.create_group("alice", &["bob", "carol"]).await?;
    let id = g["id"].as_str().expect("id");

    let ack = alice
        .request("notify_create_group", json!({ "groupId": id }))
        .await?;
    assert_eq!(ack["notified"], 3);
    for client in [&mut alice, &mut bob_phone, &mut bob_laptop] {
        let push = client.next_push("a_group_created").await?;
        assert_eq!(group_id(&push), id);
        assert_eq!(
            push["data"]["group"]["members"].as_array().map(Vec::len),
            Some(3)
        );
    }

    // carol was offline: she gets it on connecting, on either edge, once
    let mut carol = c.connect(1, "carol", "phone").await?;
    next_is(&mut carol, "a_group_created", id).await?;
    // delivered means in the device's place: nothing is left to come again
    carol.close().await?;
    c.place_covers_notifications("carol", "phone").await?;
    // a second notify is a no-op: nobody hears of the group twice
    alice
        .request("notify_create_group", json!({ "groupId": id }))
        .await?;
    let mut carol = c.connect(0, "carol", "phone").await?;
    // the next thing carol hears is a change made now, not the creation again
    let res = c
        .http()
        .post(format!("{}/groups/{id}/members", c.edge_url(1)))
        .bearer_auth(chat_tests::token("alice"))
        .json(&json!({ "userIds": ["dave"] }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    next_is(&mut carol, "a_group_updated", id).await?;
    for client in [&mut alice, &mut bob_phone, &mut bob_laptop] {
        next_is(client, "a_group_updated", id).await?;
    }
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_member_hears_of_the_group_after_edge_and_worker_restarts() -> anyhow::Result<()>
{
    let mut c = Cluster::start(1, 1).await?;
    // carol has connected before, then goes offline
    c.connect(0, "carol", "phone").await?.close().await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let g = c.create_group("alice", &["carol"]).await?;
    let id = g["id"].as_str().expect("id").to_owned();
    alice
        .request("notify_create_group", json!({ "groupId": id }))
        .await?;
    alice.next_push("a_group_created").await?;
    drop(alice);

    c.restart_edge(0).await?;
    c.restart_worker(0).await?;

    let mut carol = c.connect(0, "carol", "phone").await?;
    next_is(&mut carol, "a_group_created", &id).await?;
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_reach_members_and_stop_reaching_the_removed() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(0, "bob", "phone").await?;
    let g = c.create_group("alice", &["bob"]).await?;
    let id = g["id"].as_str().expect("id").to_owned();
    bob.request("subscribe_to_group", json!({ "groupId": id }))
        .await?;
    alice.send_text(&id, "m1", "before").await?;
    assert_eq!(bob.messages(1).await?[0]["seq"], 1);

    let http = c.http();
    let url = |p: &str| format!("{}/groups/{id}{p}", c.edge_url(0));
    let res = http
        .delete(url("/members/bob"))
        .bearer_auth(chat_tests::token("alice"))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    // both hear of the removal, bob included
    next_is(&mut alice, "a_group_updated", &id).await?;
    let removal = bob.next_any_push().await?;
    assert_eq!(removal["event"], "a_group_updated");
    assert!(
        !removal["data"]["group"]["members"]
            .to_string()
            .contains("\"bob\"")
    );
    // bob's delivery no longer covers the group (checked below: his next
    // push is his own group's creation, not this message)
    alice.send_text(&id, "m2", "after").await?;

    // a later change reaches alice but not bob: bob's next push is his own
    // group's creation
    let res = http
        .post(url("/members"))
        .bearer_auth(chat_tests::token("alice"))
        .json(&json!({ "userIds": ["dave"] }))
        .send()
        .await?;
    assert_eq!(res.status(), 200);
    next_is(&mut alice, "a_group_updated", &id).await?;
    let own = c.create_group("bob", &[]).await?;
    let own_id = own["id"].as_str().expect("id");
    bob.request("notify_create_group", json!({ "groupId": own_id }))
        .await?;
    next_is(&mut bob, "a_group_created", own_id).await?;

    // and bob can no longer subscribe to the old group
    assert_eq!(
        bob.request_error("subscribe_to_group", json!({ "groupId": id }))
            .await?,
        "forbidden"
    );
    c.stop().await
}
