//! Attacks a hostile user or a hostile neighbour on the network tried against
//! the system (issue 10), each played against real services: every test here
//! failed on the code before the fix.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::consumer;
use chat_domain::{DeviceId, UserId};
use chat_tests::{Client, Cluster, PROMPTLY, SERVICE_SECRET, eventually, token};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};

/// Long enough for a delivery that was going to happen to have happened:
/// the control member already received the same messages.
const QUIET: Duration = Duration::from_secs(1);

/// The `a_group_message` pushes of group `g` that reach `client` within
/// `within` (none expected).
async fn group_messages_within(
    client: &mut Client,
    g: &str,
    within: Duration,
) -> anyhow::Result<Vec<Value>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(push) = tokio::time::timeout_at(deadline, client.next_any_push()).await {
        let push = push?;
        if push["event"] == "a_group_message" && push["data"]["groupId"] == g {
            got.push(push);
        }
    }
    Ok(got)
}

/// The place saved for `device` of `user`.
async fn place_of(c: &Cluster, user: &str, device: &str) -> anyhow::Result<chat_bus::Stored> {
    let bus = c.bus().await?;
    Ok(bus
        .places()
        .get(&UserId::parse(user)?, &DeviceId::parse(device)?)
        .await?)
}

/// `bob` with device `smith_d` and `bob_smith` with device `d` shared one
/// durable consumer (`u_bob_smith_d`): bob received bob_smith's group
/// notification and half of its messages. Now every pair has its own place
/// (`bob.smith_d`, `bob_smith.d`: ids never contain a dot).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_that_join_to_the_same_name_never_share_a_consumer() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    // the attacker connects first, so that its consumer exists first
    let mut attacker = c.connect(0, "bob", "smith_d").await?;
    let mut victim = c.connect(0, "bob_smith", "d").await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let g = c.create_group("alice", &["bob_smith"]).await?;
    let g = g["id"].as_str().unwrap_or_default().to_owned();
    alice
        .request("notify_create_group", json!({ "groupId": g }))
        .await?;
    let created = victim.next_push("a_group_created").await?;
    assert_eq!(created["data"]["group"]["id"], g.as_str());
    victim
        .request("subscribe_to_group", json!({ "groupId": g }))
        .await?;
    for i in 0..6 {
        alice.send_text(&g, &format!("m{i}"), "private").await?;
    }
    let got = victim.messages(6).await?;
    let seqs: Vec<u64> = got.iter().map(|m| m["seq"].as_u64().unwrap_or(0)).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6], "the victim gets all, in order");
    // the attacker hears of neither the group nor its messages
    let deadline = tokio::time::Instant::now() + QUIET;
    while let Ok(push) = tokio::time::timeout_at(deadline, attacker.next_any_push()).await {
        let push = push?;
        assert!(
            !push.to_string().contains(&g),
            "the attacker received {push}"
        );
    }
    let (bob, bob_smith) = (UserId::parse("bob")?, UserId::parse("bob_smith")?);
    let (smith_d, d) = (DeviceId::parse("smith_d")?, DeviceId::parse("d")?);
    assert_ne!(
        chat_bus::place_key(&bob, &smith_d),
        chat_bus::place_key(&bob_smith, &d)
    );
    // each saves its own place when it goes, and the victim's covers the
    // group's messages while the attacker's never moved past them
    attacker.close().await?;
    victim.close().await?;
    // the final saves may land a moment after the sockets end
    let (a, v) = eventually(PROMPTLY, || async {
        let (a, v) = (
            place_of(&c, "bob", "smith_d").await?.place,
            place_of(&c, "bob_smith", "d").await?.place,
        );
        Ok(a.zip(v).filter(|(a, v)| v.groups > a.groups))
    })
    .await
    .context("the victim's place covers the group's messages, the attacker's does not")?;
    assert!(v.groups > a.groups, "victim {v:?}, attacker {a:?}");
    // and the attacker, back, gets nothing of the group
    let mut attacker = c.connect(0, "bob", "smith_d").await?;
    let leaked = group_messages_within(&mut attacker, &g, QUIET).await?;
    assert!(leaked.is_empty(), "the attacker received {leaked:?}");
    c.stop().await
}

/// A device of the previous release kept its place in two durable
/// consumers (`du_<len>_<user>_<device>`, `dg_…`, their owner recorded in
/// their metadata). On its first connection after the upgrade its place is
/// carried over: what it had acknowledged does not come again, what it
/// missed does, and the consumers are gone. A consumer under a device's
/// name that records another owner is never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_of_the_previous_release_keeps_its_place() -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "phone").await?;
    alice.send_text(&g, "m1", "one").await?;
    // bob's two devices are registered (as under the previous release)
    for device in ["setup", "phone"] {
        c.connect(0, "bob", device).await?.close().await?;
    }
    let bus = c.bus().await?;
    let js = bus.jetstream();
    let groups = js.get_stream("CHAT_GROUPS").await?;
    let users = js.get_stream("CHAT_USERS").await?;
    // ...but their places are where the previous release kept them
    js.get_stream("KV_CHAT_PLACES")
        .await?
        .purge()
        .filter("$KV.CHAT_PLACES.bob.>")
        .await?;
    let acked_up_to = groups
        .get_last_raw_message_by_subject(&format!("chat.group.{g}.msg"))
        .await?
        .sequence;
    let users_last = users.get_info().await?.state.last_sequence;
    let old = |name: &str, owner: (&str, &str), filter: String, start_sequence: u64| {
        let mut config = consumer::pull::Config {
            durable_name: Some(name.into()),
            filter_subject: filter,
            ack_policy: AckPolicy::All,
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence },
            ..Default::default()
        };
        config.metadata.insert("chat_user".into(), owner.0.into());
        config.metadata.insert("chat_device".into(), owner.1.into());
        config
    };
    let (group_subject, bob_subject) = (format!("chat.group.{g}.msg"), "chat.user.bob.event");
    groups
        .create_consumer(old(
            "dg_3_bob_setup",
            ("bob", "setup"),
            group_subject.clone(),
            acked_up_to + 1,
        ))
        .await?;
    users
        .create_consumer(old(
            "du_3_bob_setup",
            ("bob", "setup"),
            bob_subject.into(),
            users_last + 1,
        ))
        .await?;
    // under bob's phone's name, but eve's: from the very first message
    groups
        .create_consumer(old("dg_3_bob_phone", ("eve", "phone"), group_subject, 1))
        .await?;
    alice.send_text(&g, "m2", "two").await?;
    alice.send_text(&g, "m3", "three").await?;
    let mut bob_ws = c.connect(0, "bob", "setup").await?;
    let mut seqs = Vec::new();
    while seqs.len() < 2 {
        let m = bob_ws
            .next_push("a_group_message")
            .await
            .with_context(|| format!("after {seqs:?}"))?;
        seqs.push(m["data"]["seq"].as_u64().unwrap_or(0));
    }
    assert_eq!(
        seqs,
        [2, 3],
        "missed messages, in order, not the acknowledged one"
    );
    let carried = place_of(&c, "bob", "setup")
        .await?
        .place
        .context("carried over")?;
    assert!(
        carried.groups >= acked_up_to && carried.users >= users_last,
        "{carried:?}"
    );
    for (stream, old) in [(&groups, "dg_3_bob_setup"), (&users, "du_3_bob_setup")] {
        assert!(
            stream.clone().consumer_info(old).await.is_err(),
            "{old} is still there"
        );
    }
    // bob's phone: eve's consumer is not read (its place would be 0) and
    // stays as it is
    let _phone = c.connect(0, "bob", "phone").await?;
    assert_eq!(place_of(&c, "bob", "phone").await?.place, None);
    let kept = groups.clone().consumer_info("dg_3_bob_phone").await?;
    assert_eq!(
        kept.config.metadata.get("chat_user").map(String::as_str),
        Some("eve")
    );
    // (other events, such as alice's presence, may come)
    let again = group_messages_within(&mut bob_ws, &g, QUIET).await?;
    assert!(again.is_empty(), "a message came again: {again:?}");
    c.stop().await
}

/// Only the newest 32 devices were remembered, and removal rewrote only
/// their filters: a removed member kept receiving on an older device. Now
/// the registry is capped and complete: a device beyond the cap evicts the
/// least recently seen (its place forgotten, its live connection closed
/// with 4410), and after a removal no device, old or new, receives anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_receives_nothing_on_any_device() -> anyhow::Result<()> {
    let c = Cluster::start_with(1, 1, &["--max-devices-per-user", "4"]).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let mut old = c.connect(0, "bob", "old").await?;
    for i in 0..6 {
        c.connect(0, "bob", &format!("d{i}")).await?.close().await?;
    }
    assert_eq!(
        old.closed_with().await?,
        Some(4410),
        "the evicted device is told"
    );
    // its place is a delete marker, which no late save writes over
    let forgotten = place_of(&c, "bob", "old").await?;
    assert!(
        forgotten.place.is_none() && forgotten.revision > 0,
        "{forgotten:?}"
    );
    let mut newest = c.connect(0, "bob", "d5").await?;
    let mut old = c.connect(0, "bob", "old").await?;
    assert_eq!(c.remove_member(0, "alice", &g, "bob").await?, 200);
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut carol = c.connect(0, "carol", "setup").await?;
    for i in 0..3 {
        alice.send_text(&g, &format!("after{i}"), "secret").await?;
    }
    assert_eq!(carol.messages(3).await?.len(), 3);
    for bob in [&mut newest, &mut old] {
        let leaked = group_messages_within(bob, &g, QUIET).await?;
        assert!(leaked.is_empty(), "bob received {leaked:?}");
    }
    c.stop().await
}

/// A member removed from a group hears nothing more of it, not even how
/// far the others read the messages it sent while a member: the senders a
/// read receipt is pushed to are members still.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_sender_hears_no_more_read_receipts() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob", "mallory", "zoe"]).await?;
    let mut mallory = c.connect(0, "mallory", "m").await?;
    let mut zoe = c.connect(0, "zoe", "z").await?;
    let mut bob = c.connect(0, "bob", "b").await?;
    mallory.send_text(&g, "m1", "from mallory").await?;
    let z1 = zoe.send_text(&g, "z1", "from zoe").await?;
    bob.messages(2).await?;
    // while a member, mallory hears that bob and zoe have her message
    let mut heard = std::collections::HashSet::new();
    while heard.len() < 2 {
        let s = mallory.skip_to("a_message_status").await?;
        if s["data"]["deliveredSeq"].as_u64().unwrap_or(0) >= 1 {
            heard.insert(s["data"]["userId"].as_str().unwrap_or("").to_owned());
        }
    }
    assert_eq!(c.remove_member(0, "alice", &g, "mallory").await?, 200);

    // bob reads both messages: of their senders, only zoe is told
    let ack = bob
        .request(
            "acknowledge_group_message",
            json!({ "groupId": g, "messageId": z1["messageId"] }),
        )
        .await?;
    assert_eq!(ack["readSeq"], 2);
    loop {
        let s = zoe.skip_to("a_message_status").await?;
        if s["data"]["userId"] == "bob" && s["data"]["readSeq"] == 2 {
            break;
        }
    }
    // one status names every sender told and the edge hands it to each at
    // once: had mallory been named, it would be on her socket by now (the
    // quiet period covers the rest)
    let deadline = tokio::time::Instant::now() + QUIET;
    while let Ok(push) = tokio::time::timeout_at(deadline, mallory.next_any_push()).await {
        let push = push?;
        assert!(
            push["event"] != "a_message_status"
                || push["data"]["readSeq"].as_u64().unwrap_or(0) == 0,
            "the removed sender heard of a read: {push}"
        );
    }
    c.stop().await
}

/// Live delivery is decided per edge (one read of the group stream per
/// edge, not a consumer per member): a removal is an event in the group's
/// stream that every edge applies in the group's order. Bob, live on two
/// edges while alice keeps sending, receives a gapless start of the group
/// and nothing alice sent after the removal returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_stops_every_live_connection_at_its_place_in_the_group() -> anyhow::Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let c = Cluster::start(2, 1).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let mut phone = c.connect(0, "bob", "phone").await?;
    let mut laptop = c.connect(1, "bob", "laptop").await?;
    let mut carol = c.connect(1, "carol", "setup").await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    const BEFORE: u64 = 10;
    const DURING: u64 = 40;
    for i in 1..=BEFORE {
        alice.send_text(&g, &format!("b{i}"), "before").await?;
    }
    let removed = Arc::new(AtomicBool::new(false));
    let sending = {
        let (g, removed) = (g.clone(), removed.clone());
        tokio::spawn(async move {
            // the seqs alice sent once the removal had returned
            let mut after = Vec::new();
            for i in 1..=DURING {
                let was_removed = removed.load(Ordering::SeqCst);
                let ack = alice.send_text(&g, &format!("d{i}"), "during").await?;
                if was_removed {
                    after.push(ack["seq"].as_u64().context("seq")?);
                }
            }
            anyhow::Ok(after)
        })
    };
    // bob has seen part of the traffic, live, on both connections
    phone.messages(BEFORE as usize).await?;
    laptop.messages(BEFORE as usize).await?;
    assert_eq!(c.remove_member(1, "alice", &g, "bob").await?, 200);
    removed.store(true, Ordering::SeqCst);
    let after = sending.await??;
    assert!(!after.is_empty(), "some sends came after the removal");
    // carol has everything: whatever bob was going to get has come
    assert_eq!(
        carol.messages((BEFORE + DURING) as usize).await?.len() as u64,
        BEFORE + DURING
    );
    for (name, bob) in [("phone", &mut phone), ("laptop", &mut laptop)] {
        let got = group_messages_within(bob, &g, QUIET).await?;
        let seqs: Vec<u64> = got
            .iter()
            .filter_map(|m| m["data"]["seq"].as_u64())
            .collect();
        let expected: Vec<u64> = (BEFORE + 1..BEFORE + 1 + seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "{name}: in order, nothing missing");
        let leaked: Vec<&u64> = seqs.iter().filter(|s| after.contains(s)).collect();
        assert!(
            leaked.is_empty(),
            "{name} got {leaked:?}, sent after the removal"
        );
    }
    c.stop().await
}

/// Workers answer sends from a membership cache (no database read on the
/// send path): a removal must reach every worker's cache, or a removed
/// member could go on writing into the group. Two workers both learn bob's
/// membership; after his removal (through either), every send of his is
/// refused, on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_member_can_no_longer_send_through_any_worker() -> anyhow::Result<()> {
    let c = Cluster::start(1, 2).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut bob = c.connect(0, "bob", "web").await?;
    // calls alternate between the workers: both cache the membership
    for i in 0..4 {
        bob.send_text(&g, &format!("before{i}"), "hi").await?;
    }
    assert_eq!(c.remove_member(0, "alice", &g, "bob").await?, 200);
    // the notice to the other worker is on its way as the removal returns;
    // from the first refusal on, every send through either worker is refused
    let send = |i: usize| json!({"groupId": g, "clientMsgId": format!("after{i}"), "type": "text", "text": "still here?"});
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    let mut i = 0;
    loop {
        i += 1;
        let reply = bob.request("send_group_message", send(i)).await;
        if reply.is_err() {
            assert_eq!(
                bob.request_error("send_group_message", send(i)).await?,
                "forbidden"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob could still send {i} times after his removal"
        );
    }
    for j in 100..104 {
        assert_eq!(
            bob.request_error("send_group_message", send(j)).await?,
            "forbidden",
            "send {j} after the removal"
        );
    }
    // what got through is exactly what was acknowledged (sends 1..i-1, in
    // the moment before the notice arrived), and none of the refused ones
    let history = c.history("alice", &g).await?;
    let after = history
        .iter()
        .filter(|m| m["text"] == "still here?")
        .count();
    assert_eq!(after, i - 1, "sends after the removal in history");
    c.stop().await
}

/// Subscribe, session opens and removal at the same time, over and over:
/// afterwards no connection of the removed member receives what is sent
/// after, live or when its device comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_racing_subscribe_and_session_opens_leaves_nothing_behind() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut carol = c.connect(0, "carol", "web").await?;
    for round in 0..4 {
        let g = c.room(&["alice", "bob", "carol"]).await?;
        let mut live = c.connect(0, "bob", "live").await?;
        let resubscribe = async {
            live.request("subscribe_to_group", json!({ "groupId": g }))
                .await
                .ok();
        };
        let opens = async {
            let mut opened = Vec::new();
            for k in 0..3 {
                if let Ok(ws) = c.connect(0, "bob", &format!("r{round}-{k}")).await {
                    opened.push(ws);
                }
            }
            opened
        };
        let removal = async {
            c.http()
                .delete(format!("{}/groups/{g}/members/bob", c.edge_url(0)))
                .bearer_auth(token("alice"))
                .send()
                .await
        };
        let ((), mut opened, removed) = tokio::join!(resubscribe, opens, removal);
        assert_eq!(removed?.status(), 200);
        alice.send_text(&g, &format!("x{round}"), "after").await?;
        carol.skip_to("a_group_message").await?;
        for ws in opened.iter_mut().chain([&mut live]) {
            let leaked = group_messages_within(ws, &g, Duration::from_millis(300)).await?;
            assert!(leaked.is_empty(), "round {round}: bob received {leaked:?}");
        }
        // nor does a device that comes back and catches up from its place
        drop(opened);
        let mut back = c.connect(0, "bob", &format!("r{round}-0")).await?;
        let leaked = group_messages_within(&mut back, &g, Duration::from_millis(300)).await?;
        assert!(
            leaked.is_empty(),
            "round {round}: bob caught up on {leaked:?}"
        );
    }
    c.stop().await
}

/// The worker's port trusted the `caller` field: a made-up caller read
/// decrypted history. Then every call carried the secret itself, so a process
/// at a worker's address that relayed the edge's health check to a real
/// worker (which proves any nonce) received the secret and could act as
/// anyone. Now the secret never travels: each call is signed over its method,
/// time, nonce and body, and a worker takes each signature once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_only_signed_calls_each_once_and_the_secret_never_travels()
-> anyhow::Result<()> {
    use chat_rpc::{
        ServiceSecret, Signed, WorkerInstance,
        pb::{self, messages_client::MessagesClient},
    };
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    alice.send_text(&g, "m1", "secret text").await?;
    let channel = tonic::transport::Endpoint::from_shared(c.worker_url(0))?
        .connect()
        .await?;
    let history = |caller: &str| pb::HistoryRequest {
        caller: caller.into(),
        group_id: g.clone(),
        before: 0,
        limit: 10,
    };
    let code = |r: Result<tonic::Response<pb::HistoryResponse>, tonic::Status>| {
        r.map(|_| ()).map_err(|s| s.code())
    };
    // unsigned; the secret itself as the old header; signed with another
    // secret
    let unsigned = MessagesClient::new(channel.clone())
        .history(history("alice"))
        .await;
    assert_eq!(code(unsigned), Err(tonic::Code::Unauthenticated));
    let mut bearer = tonic::Request::new(history("alice"));
    bearer
        .metadata_mut()
        .insert("x-chat-service-secret", SERVICE_SECRET.parse()?);
    let bearer = MessagesClient::new(channel.clone()).history(bearer).await;
    assert_eq!(code(bearer), Err(tonic::Code::Unauthenticated));
    // the worker's instance, as a health check tells it (without a proof)
    let instance = chat_rpc::signed::ready(channel.clone(), None)
        .await?
        .context("an instance")?;
    // a health check's nonce has a limit (anyone may ask; the proof is
    // computed over it)
    let long_nonce = pb::health_client::HealthClient::new(channel.clone())
        .ready(pb::ReadyRequest { nonce: vec![7; 65] })
        .await;
    assert!(
        long_nonce
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::InvalidArgument),
        "{long_nonce:?}"
    );
    let signed_with = |secret: &str, instance| -> anyhow::Result<_> {
        Ok(Signed::new(
            channel.clone(),
            Some(ServiceSecret::new(secret)?),
            WorkerInstance::known(instance),
        ))
    };
    let other = "another-secret-of-the-right-length-0123456789";
    let wrong = MessagesClient::new(signed_with(other, instance)?)
        .history(history("alice"))
        .await;
    assert_eq!(code(wrong), Err(tonic::Code::Unauthenticated));
    // the right secret, for another worker (or this one before a restart)
    let elsewhere = MessagesClient::new(signed_with(SERVICE_SECRET, [0; 16])?)
        .history(history("alice"))
        .await;
    assert!(
        elsewhere
            .as_ref()
            .is_err_and(|s| s.code() == tonic::Code::Unauthenticated
                && s.message().contains("another worker")),
        "{elsewhere:?}"
    );

    let signed = MessagesClient::new(signed_with(SERVICE_SECRET, instance)?)
        .history(history("alice"))
        .await?
        .into_inner();
    assert_eq!(signed.messages.len(), 1, "a signed call is taken");

    // what an impostor in the edge's path sees of a call it keeps
    let kept = recorder::Kept::default();
    let impostor = Signed::new(
        kept.clone(),
        Some(ServiceSecret::new(SERVICE_SECRET)?),
        WorkerInstance::known(instance),
    );
    let never_answered = MessagesClient::new(impostor)
        .history(history("alice"))
        .await;
    assert!(never_answered.is_err());
    let (uri, headers, body) = kept.take().context("the call was kept")?;
    let secret_bytes = SERVICE_SECRET.as_bytes();
    assert!(
        !headers.values().any(|v| v
            .as_bytes()
            .windows(secret_bytes.len())
            .any(|w| w == secret_bytes)),
        "no header carries the secret"
    );
    // its signature on another caller's request (same length, so the frame
    // holds): refused, and its nonce is not spent by the refusal
    let caller_at = body
        .windows(5)
        .position(|w| w == b"alice")
        .context("the caller is in the body")?;
    let mut forged = body.to_vec();
    forged[caller_at..caller_at + 5].copy_from_slice(b"carol");
    let refused = recorder::replay(&channel, &uri, &headers, forged.into()).await?;
    assert_eq!(
        refused.as_ref().map(|s| s.code()),
        Some(tonic::Code::Unauthenticated),
        "{refused:?}"
    );
    // the call as it was: what the edge asked, taken once
    let first = recorder::replay(&channel, &uri, &headers, body.clone()).await?;
    assert!(first.is_none(), "{first:?}");
    let replayed = recorder::replay(&channel, &uri, &headers, body).await?;
    assert_eq!(
        replayed.as_ref().map(|s| s.code()),
        Some(tonic::Code::Unauthenticated),
        "{replayed:?}"
    );
    assert!(
        replayed.is_some_and(|s| s.message().contains("used before")),
        "refused as used before"
    );
    c.stop().await
}

/// A transport that keeps the calls it is given instead of passing them on
/// (an impostor at a worker's address), and replays such a call.
mod recorder {
    use std::{
        future::Future,
        pin::Pin,
        sync::{Arc, Mutex},
        task::{Context, Poll},
    };

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use tonic::{body::Body, transport::Channel};
    use tower::{Service, ServiceExt};

    type Call = (http::Uri, http::HeaderMap, Bytes);
    type BoxError = Box<dyn std::error::Error + Send + Sync>;

    #[derive(Clone, Default)]
    pub struct Kept(Arc<Mutex<Option<Call>>>);

    impl Kept {
        pub fn take(&self) -> Option<Call> {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
        }
    }

    impl Service<http::Request<Body>> for Kept {
        type Response = http::Response<Body>;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<Body>) -> Self::Future {
            let kept = self.0.clone();
            Box::pin(async move {
                let (parts, body) = req.into_parts();
                let body = body.collect().await?.to_bytes();
                *kept.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((parts.uri, parts.headers, body));
                Err("kept by the impostor".into())
            })
        }
    }

    /// Sends `body` to `uri` with `headers` as they are; the call's gRPC
    /// status if it was refused at once.
    pub async fn replay(
        channel: &Channel,
        uri: &http::Uri,
        headers: &http::HeaderMap,
        body: Bytes,
    ) -> anyhow::Result<Option<tonic::Status>> {
        let mut req = http::Request::new(Body::new(Full::new(body)));
        *req.uri_mut() = uri.clone();
        *req.method_mut() = http::Method::POST;
        *req.headers_mut() = headers.clone();
        let response = channel.clone().oneshot(req).await?;
        Ok(tonic::Status::from_header_map(response.headers()))
    }
}

/// A worker takes at most 1,024 calls in flight on one connection: what a
/// group's publish queue and its waiters can hold rests on it. It says so
/// in its HTTP/2 settings, and a call past the bound waits on the caller's
/// side until one of the calls in flight ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_at_most_1024_calls_in_flight_per_connection() -> anyhow::Result<()> {
    const BOUND: usize = 1024;
    let c = Cluster::start(1, 1).await?;
    let url = c.worker_url(0);
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let (client, connection) =
        h2::client::handshake(tokio::net::TcpStream::connect(addr).await?).await?;
    let driver = tokio::spawn(connection);
    // the health check needs no secret; a call whose request never ends
    // holds its slot while the worker waits for the rest of it
    let call = || {
        http::Request::post(format!("{url}/chat.v1.Health/Ready"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
    };
    let empty_message = bytes::Bytes::from_static(&[0, 0, 0, 0, 0]);
    let mut client = client.ready().await?;
    let (answer, mut body) = client.send_request(call()?, false)?;
    body.send_data(empty_message.clone(), true)?;
    let answer = tokio::time::timeout(Duration::from_secs(10), answer).await??;
    assert_eq!(answer.status(), 200);
    // by its answer, the worker's settings are in
    assert_eq!(client.current_max_send_streams(), BOUND);
    let mut held = Vec::with_capacity(BOUND);
    for _ in 0..BOUND {
        client = client.ready().await?;
        held.push(client.send_request(call()?, false)?);
    }
    client = client.ready().await?;
    let (mut past, mut past_body) = client.send_request(call()?, false)?;
    past_body.send_data(empty_message, true)?;
    // every slot is taken: it stays on this side, unanswered
    let waited = tokio::time::timeout(Duration::from_millis(500), &mut past).await;
    assert!(waited.is_err(), "a call past the bound was answered");
    // one call in flight ends: the waiting one goes and is answered
    let (_, mut first) = held.swap_remove(0);
    first.send_reset(h2::Reason::CANCEL);
    let answer = tokio::time::timeout(Duration::from_secs(10), past).await??;
    assert_eq!(answer.status(), 200);
    drop(held);
    driver.abort();
    c.stop().await
}

/// A worker will not listen beyond loopback without a secret, and an edge
/// never calls (and so never shows its secret to) a worker that cannot prove
/// it knows the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_need_a_secret_beyond_loopback_and_must_prove_it() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let open = c
        .start_extra_node("worker", &[("--grpc-listen", "0.0.0.0:0")])
        .await;
    assert!(open.is_ok(), "with a secret, any address is fine");
    open?.stop().await?;
    // the cluster's flags without the secret ("" drops a flag)
    let message = c
        .refused_extra_node(
            "worker",
            &[("--grpc-listen", "0.0.0.0:0"), ("--service-secret", "")],
        )
        .await?;
    assert!(message.contains("without --service-secret"), "{message}");

    let impostor = c
        .start_extra_node(
            "worker",
            &[(
                "--service-secret",
                "an-impostor-that-does-not-know-0123456789",
            )],
        )
        .await?;
    let addr = impostor
        .grpc_addr
        .ok_or_else(|| anyhow::anyhow!("no address"))?;
    let edge = c
        .start_extra_node("edge", &[("--workers", &format!("http://{addr}"))])
        .await?;
    let http = edge
        .http_addr
        .ok_or_else(|| anyhow::anyhow!("no address"))?;
    let ops = edge.ops_addr.ok_or_else(|| anyhow::anyhow!("no address"))?;
    // 503 because no worker may be called; a call that had reached the
    // impostor would have come back `unauthenticated`, a 401
    let status = chat_tests::groups_status(http, "alice").await?;
    assert_eq!(status, 503, "no worker proved the secret");
    let ready = c.http().get(format!("http://{ops}/readyz")).send().await?;
    assert_eq!(ready.status(), 503);
    edge.stop().await?;
    impostor.stop().await?;
    c.stop().await
}

/// Message statuses are core NATS messages that edges pass on to the
/// senders they name: only workers may publish them, so an edge's user
/// cannot tell a sender that anyone read its message, neither as a status
/// (NATS refuses it) nor as a signal of the group, which edges may publish
/// but which may carry only typing and reactions (every edge drops it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_workers_may_tell_a_sender_its_message_was_read() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "phone").await?;
    let group = chat_domain::GroupId::parse(&g)?;
    let frame = |reader: &str| {
        json!({"event": "a_message_status", "data": {
            "groupId": g, "userId": reader, "deliveredSeq": 7, "readSeq": 7}})
        .to_string()
    };
    let alice_id = UserId::parse("alice")?;
    let edge = c.bus_as(&c.stack.nats.users.edge).await?;
    // nats-server drops it for the permission; the client does not know
    edge.status(&group, &[&alice_id], frame("forged").into())
        .await?;
    // allowed on the signal subject, and dropped by the edge
    edge.signal(&group, None, None, frame("forged as a signal").into())
        .await?;
    let worker = c.bus_as(&c.stack.nats.users.worker).await?;
    worker
        .status(&group, &[&alice_id], frame("bob").into())
        .await?;
    // sent after the forged one on another connection: wait for the
    // worker's, then for anything more
    let first = alice.skip_to("a_message_status").await?;
    assert_eq!(first["data"]["userId"], "bob", "{first}");
    let deadline = tokio::time::Instant::now() + QUIET;
    while let Ok(push) = tokio::time::timeout_at(deadline, alice.next_any_push()).await {
        let push = push?;
        assert_ne!(push["event"], "a_message_status", "{push}");
    }
    c.stop().await
}

/// NATS had no authorisation: an anonymous client closed a user's socket
/// through `chat.session.<user>.<device>` and injected a forged
/// `a_group_created`. Now anonymous clients are refused, and an edge's user
/// can publish neither notifications nor messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_refuses_anonymous_clients_and_limits_each_role() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let url = c.stack.nats.url.clone();
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(url.as_str())
        .await;
    assert!(anonymous.is_err(), "an anonymous client connected");
    let wrong = async_nats::ConnectOptions::with_user_and_password(
        "chat-edge".into(),
        "not-the-password".into(),
    )
    .connection_timeout(Duration::from_secs(2))
    .connect(url.as_str())
    .await;
    assert!(wrong.is_err(), "a wrong password connected");

    let mut bob = c.connect(0, "bob", "phone").await?;
    let edge = &c.stack.nats.users.edge;
    // replies on the edge user's own inbox, as chatd takes them: with the
    // default inbox no request is ever answered, and every refusal below
    // would hold whatever the permissions said
    let client =
        async_nats::ConnectOptions::with_user_and_password(edge.user.into(), edge.password.clone())
            .custom_inbox_prefix(format!("_INBOX.{}", edge.user))
            .connect(url.as_str())
            .await?;
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(Duration::from_secs(1));
    let forged = json!({"event": "a_group_created", "data": {"group": {"id": "forged"}}});
    let stored = async {
        js.publish("chat.user.bob.event", forged.to_string().into())
            .await?
            .await
    }
    .await;
    assert!(stored.is_err(), "an edge's user stored a notification");
    let message = async {
        js.publish(format!("chat.group.{}.msg", "0".repeat(32)), "x".into())
            .await?
            .await
    }
    .await;
    assert!(message.is_err(), "an edge's user stored a group message");
    // membership events decide every edge's live delivery: a forged one
    // would subscribe anyone to any group (in either subject form)
    for subject in [
        format!("chat.group.{}.event.mallory", "0".repeat(32)),
        format!("chat.group.{}.event", "0".repeat(32)),
    ] {
        let event = async {
            js.publish(
                subject.clone(),
                json!({"userId": "mallory", "subscribed": true})
                    .to_string()
                    .into(),
            )
            .await?
            .await
        }
        .await;
        assert!(event.is_err(), "an edge's user stored {subject}");
    }
    // an edge may make its live reader, but never one named `persist`
    let persist_again = js
        .get_stream("CHAT_GROUPS")
        .await?
        .create_consumer(consumer::pull::Config {
            name: Some("persist".into()),
            filter_subject: "chat.group.>".into(),
            ..Default::default()
        })
        .await;
    // refused by the permission (no answer), not by JetStream finding
    // the workers' consumer already there: before the workers start, an
    // edge could otherwise make `persist` its own way
    match persist_again {
        Err(e) => assert!(
            !matches!(
                e.kind(),
                async_nats::jetstream::stream::ConsumerErrorKind::JetStream(_)
            ),
            "JetStream answered, so the edge's user may ask: {e}"
        ),
        Ok(_) => panic!("an edge's user made a consumer named persist"),
    }
    assert!(
        js.delete_stream("CHAT_GROUPS").await.is_err(),
        "an edge's user deleted a stream"
    );
    let pushes = group_or_created_within(&mut bob, QUIET).await?;
    assert!(pushes.is_empty(), "bob received {pushes:?}");
    // nor take messages from the workers' persist consumer (pulling and
    // acking there would keep them out of MongoDB)
    let pulled = async {
        let consumer = js
            .get_stream("CHAT_GROUPS")
            .await?
            .get_consumer::<consumer::pull::Config>("persist")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_millis(500))
            .messages()
            .await?;
        anyhow::Ok(
            batch
                .next()
                .await
                .transpose()
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )
    }
    .await;
    assert!(
        !matches!(pulled, Ok(Some(_))),
        "an edge's user pulled from the persist consumer"
    );
    // nor remake it through the unnamed create subject its catch-ups use:
    // the subject carries no name to deny, so JetStream must refuse it
    let body = json!({
        "stream_name": "CHAT_GROUPS",
        "config": {"name": "persist", "filter_subject": "chat.group.>",
                   "ack_policy": "none", "deliver_policy": "new"},
        "action": "create",
    });
    let answer = client
        .request(
            "$JS.API.CONSUMER.CREATE.CHAT_GROUPS",
            body.to_string().into(),
        )
        .await?;
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload)?;
    assert!(answer.get("error").is_some(), "{answer}");
    let persist = c
        .bus()
        .await?
        .jetstream()
        .get_stream("CHAT_GROUPS")
        .await?
        .consumer_info("persist")
        .await?;
    assert_eq!(persist.config.filter_subject, "chat.group.*.msg");
    assert_eq!(persist.config.ack_policy, consumer::AckPolicy::Explicit);
    // (an edge may not rewind any consumer)
    js.get_stream("CHAT_GROUPS")
        .await
        .context("an edge's user reads stream info")?;
    let rewound = async {
        js.get_stream("CHAT_GROUPS")
            .await?
            .reset_consumer("persist", None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
    .await;
    assert!(
        rewound.is_err(),
        "an edge's user rewound the persist consumer"
    );
    // and an edge's user cannot read the replies a worker gets
    let mut snoop = client.subscribe("_INBOX.>").await?;
    let bus = c.bus_as(&c.stack.nats.users.worker).await?;
    bus.jetstream().get_stream("CHAT_GROUPS").await?;
    let snooped = tokio::time::timeout(QUIET, snoop.next()).await;
    assert!(
        !matches!(snooped, Ok(Some(_))),
        "an edge's user read a worker's reply"
    );
    c.stop().await
}

/// Any push that names the forged group.
async fn group_or_created_within(
    client: &mut Client,
    within: Duration,
) -> anyhow::Result<Vec<Value>> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(push) = tokio::time::timeout_at(deadline, client.next_any_push()).await {
        let push = push?;
        if push.to_string().contains("forged") {
            got.push(push);
        }
    }
    Ok(got)
}

/// Ciphertext bound only its message id: a stored or streamed ciphertext
/// could be replayed under another group or sender. Now group, sender and
/// seq are bound too; messages sealed the old way still read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ciphertext_replayed_under_another_group_or_sender_does_not_open() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let a = c.room(&["alice", "bob"]).await?;
    let b = c.room(&["mallory", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(0, "bob", "setup").await?;
    alice.send_text(&a, "m1", "for group a").await?;
    bob.skip_to("a_group_message").await?;
    let bus = c.bus().await?;
    let stream = bus.jetstream().get_stream("CHAT_GROUPS").await?;
    let original = stream
        .get_last_raw_message_by_subject(&format!("chat.group.{a}.msg"))
        .await?;
    // the same envelope, replayed in group b by someone with NATS access
    // (each as its group's next seq, so the worker's sequencing goes on)
    for (group, sender, seq) in [(b.as_str(), "alice", 1), (a.as_str(), "mallory", 2)] {
        let mut env: Value = serde_json::from_slice(&original.payload)?;
        env["groupId"] = json!(group);
        env["senderId"] = json!(sender);
        env["seq"] = json!(seq);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(chat_bus::SEQ_HEADER, seq.to_string().as_str());
        bus.jetstream()
            .publish_with_headers(
                format!("chat.group.{group}.msg"),
                headers,
                env.to_string().into(),
            )
            .await?
            .await?;
    }
    // a genuine message after the replays: bob gets it and nothing else
    alice.send_text(&a, "m2", "genuine").await?;
    let next = bob.skip_to("a_group_message").await?;
    assert_eq!(
        next["data"]["text"], "genuine",
        "a replay was opened: {next}"
    );
    let leaked = group_messages_within(&mut bob, &b, QUIET).await?;
    assert!(leaked.is_empty(), "{leaked:?}");

    // a message stored the first way (the id alone bound) still reads
    let db = c.mongo().await?;
    let keys = chat_crypto::KeyRing::parse(&[chat_tests::KEY])?;
    let id = chat_domain::MessageId::generate();
    let sealed = keys.seal(br#"{"text":"from before"}"#, id.as_str().as_bytes());
    let bin = |b: Vec<u8>| mongodb::bson::Binary {
        subtype: mongodb::bson::spec::BinarySubtype::Generic,
        bytes: b,
    };
    let now = mongodb::bson::DateTime::now();
    db.collection::<mongodb::bson::Document>("messages")
        .insert_one(mongodb::bson::doc! {
            "_id": id.as_str(), "groupId": &b, "senderId": "mallory", "clientMsgId": "old1",
            "type": "text", "keyId": sealed.key_id, "nonce": bin(sealed.nonce),
            "ciphertext": bin(sealed.ciphertext), "state": "committed", "seq": 100_i64,
            "streamSeq": 0_i64, "afterStreamSeq": 0_i64, "createdAt": now, "updatedAt": now,
        })
        .await?;
    let history = c.history("bob", &b).await?;
    assert_eq!(history[0]["text"], "from before", "{history:?}");
    c.stop().await
}

/// A client that never reads while its group is busy was kept as a zombie
/// (about 27 MiB held, duplicates every 30 s, nothing after it read again).
/// Now the write gives up after the write timeout, the connection closes,
/// and the device resumes from its position: nothing is lost, and the only
/// repeats are frames the edge had put on the wire but not yet counted as
/// delivered (the last burst), which `seq` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_resumes_losing_nothing() -> anyhow::Result<()> {
    const N: u64 = 160;
    let flags = [&["--ws-write-timeout-ms", "1000"], chat_tests::FLOOD].concat();
    let c = Cluster::start_with(1, 1, &flags).await?;
    let g = c.room(&["alice", "bob"]).await?;
    // bob's device, with a tiny receive buffer, never reads
    let mut old = c.connect_slow_reader(0, "bob", "setup").await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let text = "x".repeat(59_000);
    for i in 0..N {
        alice.send_text(&g, &format!("flood{i}"), &text).await?;
    }
    // the edge closes it: reading it to the end finishes (a zombie would
    // keep it open with nothing more to read)
    let frames = old.until_closed().await?;
    let first: Vec<u64> = frames
        .iter()
        .filter(|f| f["event"] == "a_group_message")
        .map(|f| f["data"]["seq"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        (first.len() as u64) < N,
        "the flood fit in the buffers; make it larger"
    );
    let mut again = c.connect(0, "bob", "setup").await?;
    let mut seen: Vec<u64> = first.clone();
    let mut rest = Vec::new();
    while !(1..=N).all(|s| seen.contains(&s)) {
        let m = again
            .skip_to("a_group_message")
            .await
            .with_context(|| format!("after {} of {N}", seen.len()))?;
        let seq = m["data"]["seq"].as_u64().unwrap_or(0);
        rest.push(seq);
        seen.push(seq);
    }
    // in order after the reconnect, and repeats only from the old socket's tail
    assert!(rest.windows(2).all(|w| w[0] < w[1]), "{rest:?}");
    let tail: Vec<u64> = first.iter().rev().take(64).copied().collect();
    for seq in &rest {
        assert!(
            !first.contains(seq) || tail.contains(seq),
            "{seq} came twice"
        );
    }
    c.stop().await
}

/// Frames past the hard limit close the connection with 1009, as
/// PROTOCOL.md says (it was 1005); every frame, oversized or malformed,
/// counts against the rate limit before it is parsed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_close_with_1009_and_every_frame_is_rate_limited() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    let c = Cluster::start_with(1, 1, &["--requests-per-sec", "5"]).await?;
    let g = c.create_group("alice", &[]).await?;
    let valid = json!({"event": "notify_create_group", "data": {"groupId": g["id"]}});
    let mut ws = c.connect(0, "alice", "web").await?;
    // soft limit (64 KiB): refused before parsing, and counted like the
    // valid frames between them; past the burst (100): rate limited
    for _ in 0..110 {
        ws.send_raw(Message::Text("y".repeat(70_000).into()))
            .await?;
        ws.send_raw(Message::Text(valid.to_string().into())).await?;
    }
    let mut codes = std::collections::BTreeSet::new();
    while codes.len() < 2 {
        let Some(reply) = ws.recv(PROMPTLY).await? else {
            anyhow::bail!("closed having seen only {codes:?}");
        };
        if reply["event"] == "error" {
            codes.insert(
                reply["data"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
    }
    assert_eq!(
        codes.into_iter().collect::<Vec<_>>(),
        ["rate_limited", "too_large"]
    );
    // past the hard limit: the edge stops reading and closes while the
    // client is still writing, so (as a browser does) read while writing;
    // the write itself may end with a reset
    let url = format!(
        "{}/ws?token={}&device=web2",
        c.edge_url(0).replacen("http", "ws", 1),
        token("alice")
    );
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    let (mut sink, mut stream) = ws.split();
    let writer = tokio::spawn(async move {
        sink.send(Message::Text("z".repeat(2 * 1024 * 1024).into()))
            .await
    });
    let code = tokio::time::timeout(PROMPTLY, async {
        while let Some(Ok(msg)) = stream.next().await {
            if let Message::Close(frame) = msg {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await?;
    assert_eq!(code, Some(1009));
    let _ = writer.await;
    c.stop().await
}

/// Every new device id costs a key of `CHAT_PLACES` in nats-server's memory
/// and each eviction it causes a delete marker, both for 60 days: a user
/// churning through ids grew the bucket without bound. Past
/// `--max-new-devices-per-hour` a new device's upgrade gets `429`
/// (`rate_limited`, saying when to retry); devices seen before still
/// connect, and another user is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_registers_at_most_its_budget_of_new_devices_an_hour() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let c = Cluster::start_with(1, 1, &["--max-new-devices-per-hour", "3"]).await?;
    let url = |user: &str, device: &str| {
        format!(
            "ws://{}/ws?token={}&device={device}",
            c.edge_url(0).trim_start_matches("http://"),
            token(user)
        )
    };
    for device in ["d1", "d2", "d3"] {
        c.connect(0, "mallory", device).await?.close().await?;
    }
    match tokio_tungstenite::connect_async(url("mallory", "d4")).await {
        Err(WsError::Http(res)) => {
            let body = String::from_utf8_lossy(res.body().as_deref().unwrap_or_default());
            assert_eq!(res.status(), 429, "{body}");
            assert!(
                body.contains("rate_limited") && body.contains("new devices"),
                "{body}"
            );
        }
        Ok(_) => panic!("a fourth new device within the hour connected"),
        Err(e) => return Err(e.into()),
    }
    // known devices come back; others are not touched
    c.connect(0, "mallory", "d2").await?.close().await?;
    c.connect(0, "zoe", "d4").await?.close().await?;
    c.stop().await
}

/// A token was checked once, when the WebSocket opened: a stolen or
/// short-lived one kept its connection sending and receiving forever. Now
/// the connection closes with 4401 when the token expires, and the device
/// loses nothing by reconnecting with a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_when_its_token_expires() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let bob_id = UserId::parse("bob")?;
    let short = chat_auth::mint_hs256(chat_tests::SECRET.as_bytes(), &bob_id, None, 5)?;
    let mut bob = c.connect_with(0, &short, "web").await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    alice.send_text(&g, "before", "while valid").await?;
    assert_eq!(bob.messages(1).await?[0]["text"], "while valid");
    let started = std::time::Instant::now();
    assert_eq!(bob.closed_with().await?, Some(4401), "closed at expiry");
    assert!(started.elapsed() < Duration::from_secs(6));
    alice.send_text(&g, "after", "after expiry").await?;
    // a token past its `exp`, though within the clock-skew leeway that a
    // REST call allows, opens no connection
    let stale = chat_auth::mint_hs256(chat_tests::SECRET.as_bytes(), &bob_id, None, -5)?;
    let refused = c.connect_with(0, &stale, "web").await.map(|_| ());
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| format!("{e:#}").contains("401")),
        "{refused:?}"
    );
    let mut again = c.connect(0, "bob", "web").await?;
    assert_eq!(again.messages(1).await?[0]["text"], "after expiry");
    c.stop().await
}

/// One account cannot take an edge's connection slots from everyone else:
/// past `--max-connections-per-user` open on the edge, an upgrade gets
/// `429` (before any session opens); another user is not affected, and a
/// closed connection frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_opens_at_most_its_cap_of_connections_on_an_edge() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let c = Cluster::start(1, 1).await?;
    let edge = c
        .start_extra_node("edge", &[("--max-connections-per-user", "2")])
        .await?;
    let http = edge
        .http_addr
        .ok_or_else(|| anyhow::anyhow!("no address"))?;
    let upgrade = |user: &'static str, device: &'static str| async move {
        let url = format!("ws://{http}/ws?token={}&device={device}", token(user));
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => Ok(Ok(ws)),
            Err(WsError::Http(res)) => {
                let body = String::from_utf8_lossy(res.body().as_deref().unwrap_or_default());
                // the cap's answer, not the per-user request limit's
                anyhow::ensure!(body.contains("connections open"), "{body}");
                Ok(Err(res.status().as_u16()))
            }
            Err(e) => Err(anyhow::Error::from(e)),
        }
    };
    let first = Client::connect(&http, &token("mallory"), "a").await?;
    let _second = Client::connect(&http, &token("mallory"), "b").await?;
    assert_eq!(upgrade("mallory", "c").await?.err(), Some(429));
    let _bob = Client::connect(&http, &token("bob"), "a").await?;
    first.close().await?;
    // the slot is free once the session has ended
    eventually(PROMPTLY, || async {
        match upgrade("mallory", "c").await? {
            Ok(_) => Ok(Some(())),
            Err(429) => Ok(None),
            Err(status) => anyhow::bail!("upgrade answered {status}"),
        }
    })
    .await?;
    c.stop().await
}

/// A user's connections on an edge share one request budget: opening more
/// connections does not multiply what one account may send. Each of two
/// connections stays well within its own budget; together they pass the
/// user's, and get `rate_limited`; another user is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_connections_share_one_request_budget() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    let c = Cluster::start_with(
        1,
        1,
        &[
            "--requests-per-sec",
            "100",
            "--user-ws-requests-per-sec",
            "1",
        ],
    )
    .await?;
    let g = c.create_group("mallory", &["bob"]).await?;
    let frame = |i: usize| {
        json!({"event": "subscribe_to_group", "id": format!("r{i}"), "data": {"groupId": g["id"]}})
            .to_string()
    };
    let mut one = c.connect(0, "mallory", "a").await?;
    let mut two = c.connect(0, "mallory", "b").await?;
    // 70 each, at once: under a connection's burst of 100, over the
    // user's (a connection's burst too, plus 1/s); even if one connection
    // were handled first, the other's errors in a row stay under the 50
    // that close a connection
    for i in 0..70 {
        one.send_raw(Message::Text(frame(i).into())).await?;
        two.send_raw(Message::Text(frame(i).into())).await?;
    }
    let mut limited = 0;
    for ws in [&mut one, &mut two] {
        let mut replies = 0;
        while replies < 70 {
            let Some(reply) = ws.recv(PROMPTLY).await? else {
                anyhow::bail!("closed after {replies} replies");
            };
            if reply["id"].is_string() {
                replies += 1;
                if reply["event"] == "error" && reply["data"]["code"] == "rate_limited" {
                    limited += 1;
                }
            }
        }
    }
    // alone, neither connection would see one (each is under its own
    // burst); together at most the user's burst of 100 (plus 1/s while
    // they are handled) gets through
    assert!(
        (10..=40).contains(&limited),
        "{limited} of 140 limited: the user's budget is 100 at once plus 1/s"
    );
    // bob has his own budget
    let mut bob = c.connect(0, "bob", "a").await?;
    bob.request("subscribe_to_group", json!({"groupId": g["id"]}))
        .await?;
    c.stop().await
}

/// REST had no rate limit: now per user (after the token) and per address
/// (before it), with `429` and `Retry-After`; and a client that sends half a
/// request's headers, or half its body, is cut off instead of holding the
/// connection (and the body's buffer) forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_is_rate_limited_and_half_sent_headers_time_out() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Cluster::start(1, 1).await?;
    let edge = c
        .start_extra_node(
            "edge",
            &[
                ("--user-requests-per-sec", "2"),
                ("--address-requests-per-sec", "10"),
                ("--header-read-timeout-ms", "500"),
                ("--body-read-timeout-ms", "500"),
            ],
        )
        .await?;
    let http = edge
        .http_addr
        .ok_or_else(|| anyhow::anyhow!("no address"))?;
    let get = |user: &'static str| {
        let client = c.http();
        async move {
            client
                .get(format!("http://{http}/groups"))
                .bearer_auth(token(user))
                .send()
                .await
        }
    };
    // per user: a burst of 4, then 429 with Retry-After; others unaffected
    // (all at once, so that a slow machine cannot refill the bucket between)
    let mut limited = None;
    for res in futures::future::join_all((0..10).map(|_| get("alice"))).await {
        let res = res?;
        match res.status().as_u16() {
            429 => limited = Some(res),
            status => assert_eq!(status, 200),
        }
    }
    let res = limited.context("alice was never limited")?;
    let retry: u64 = res
        .headers()
        .get("retry-after")
        .context("no Retry-After")?
        .to_str()?
        .parse()?;
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    let body: Value = res.json().await?;
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(get("bob").await?.status(), 200);
    // per address, before the token is looked at: bad tokens cost little
    // (all at once, so that a slow machine cannot refill the bucket between)
    let bad = (0..60).map(|_| {
        c.http()
            .get(format!("http://{http}/groups"))
            .bearer_auth("not-a-token")
            .send()
    });
    let mut statuses = Vec::new();
    for res in futures::future::join_all(bad).await {
        statuses.push(res?.status().as_u16());
    }
    assert!(
        statuses.contains(&401) && statuses.contains(&429),
        "{statuses:?}"
    );
    // liveness stays outside the limits
    let health = c
        .http()
        .get(format!("http://{http}/healthz"))
        .send()
        .await?;
    assert_eq!(health.status(), 200);

    // half a request, then silence; or nothing at all; or the start of an
    // HTTP/2 preface: closed after the header timeout
    for first in [
        &b"GET /groups HTTP/1.1\r\nHost: x\r\n"[..],
        b"",
        b"PRI * HTTP/2",
    ] {
        let mut tcp = tokio::net::TcpStream::connect(http).await?;
        tcp.write_all(first).await?;
        let mut buf = [0u8; 512];
        let read = tokio::time::timeout(PROMPTLY, tcp.read(&mut buf)).await;
        assert!(read.is_ok(), "still open after {first:?}");
    }
    // whole headers with a valid token, then part of the body, then
    // silence (for each body extractor): 408, and the connection closes
    for (method, path) in [
        ("POST", "/groups"),
        ("PUT", "/groups/6f1c9b2e4d8a4f0b9e3a7c5d1b2e4f6a/mute"),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(http).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"name\": ",
            token("carol")
        );
        tcp.write_all(head.as_bytes()).await?;
        let mut answer = Vec::new();
        tokio::time::timeout(PROMPTLY, tcp.read_to_end(&mut answer))
            .await
            .with_context(|| format!("{method} {path}: still open with half a body"))??;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 408"),
            "{method} {path}: {answer}"
        );
        assert!(answer.contains("did not arrive within 500 ms"), "{answer}");
    }
    edge.stop().await?;
    c.stop().await
}

/// Anyone could add anyone to any number of large groups, until the
/// victim's `GET /groups` outgrew the gRPC limit and failed for good. Now a
/// user's groups are capped, and `GET /groups` is paged, each page bounded
/// by its groups' members too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_per_user_are_capped_and_listed_in_bounded_pages() -> anyhow::Result<()> {
    let c = Cluster::start_with(
        1,
        1,
        &["--max-groups-per-user", "3", "--max-listed-members", "5"],
    )
    .await?;
    for _ in 0..3 {
        c.create_group("mallory", &["victim", "x"]).await?;
    }
    let refused = c
        .http()
        .post(format!("{}/groups", c.edge_url(0)))
        .bearer_auth(token("eve"))
        .json(&json!({ "name": "one more", "members": ["victim"] }))
        .send()
        .await?;
    assert_eq!(refused.status(), 400);
    let body: Value = refused.json().await?;
    assert_eq!(body["error"]["code"], "too_large", "{body}");
    // pages: 3 members a group, 5 at most a page, so one group a page
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let path = format!("/groups?limit=10{after}");
        let (status, page) = c.get(0, "victim", &path).await?;
        assert_eq!(status, 200, "{page}");
        let groups = page["groups"].as_array().cloned().unwrap_or_default();
        assert_eq!(groups.len(), 1, "{page}");
        seen.extend(groups.iter().map(|g| g["id"].clone()));
        match page["next"].as_str() {
            Some(next) => after = format!("&after={next}"),
            None => break,
        }
    }
    seen.dedup();
    assert_eq!(seen.len(), 3, "every group once: {seen:?}");
    for bad in [
        "/groups?limit=0",
        "/groups?limit=101",
        "/groups?after=nonsense",
    ] {
        let (status, _) = c.get(0, "victim", bad).await?;
        assert_eq!(status, 400, "{bad}");
    }
    // a cursor longer than any the server gives is refused by the edge
    let long = format!("/groups?after={}", "1".repeat(129));
    let (status, body) = c.get(0, "victim", &long).await?;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("longer than a cursor (128 characters)")),
        "{body}"
    );
    c.stop().await
}

/// A page of 100 groups cost its caller one request, however many groups
/// and members it read. Now it costs one more per 10 groups it may read
/// (taken before) and per 100 members it lists (owed after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_page_of_groups_costs_its_caller_in_proportion() -> anyhow::Result<()> {
    // 1 a second, bursts of 2
    let c = Cluster::start_with(1, 1, &["--user-requests-per-sec", "1"]).await?;
    c.create_group("owner", &["victim", "other"]).await?;
    let (first, _) = c.get(0, "other", "/groups?limit=1").await?;
    let (second, _) = c.get(0, "other", "/groups?limit=1").await?;
    assert_eq!((first, second), (200, 200), "a small page costs one");
    // a page of 20 may read 20 groups: the whole burst
    let at = std::time::Instant::now();
    let (large, _) = c.get(0, "victim", "/groups?limit=20").await?;
    let (after, _) = c.get(0, "victim", "/groups?limit=1").await?;
    assert_eq!(large, 200);
    if at.elapsed() < Duration::from_millis(900) {
        assert_eq!(after, 429, "the large page took the whole burst");
    }
    c.stop().await
}

/// A group's members, or a message's status per member, read and listed
/// for one request: a large group's cost one request more per 100.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_group_s_members_and_statuses_cost_their_reader() -> anyhow::Result<()> {
    // 1 a second, bursts of 2
    let c = Cluster::start_with(1, 1, &["--user-requests-per-sec", "1"]).await?;
    // readers enough for a few tries each: a try whose two requests are
    // further apart than 0.9 s (a loaded machine) has had its bucket refilled
    let readers: Vec<String> = (0..10).map(|i| format!("reader{i}")).collect();
    let mut members: Vec<String> = (0..190).map(|i| format!("m{i}")).collect();
    members.extend(readers.iter().cloned());
    let names: Vec<&str> = members.iter().map(String::as_str).collect();
    // (the owner's whole burst; a member with its own sends)
    let g = c.create_group("owner", &names).await?;
    let id = g["id"].as_str().context("group id")?.to_owned();
    let mut sender = c.connect(0, "m0", "web").await?;
    let ack = sender.send_text(&id, "s1", "hello all").await?;
    let status = format!(
        "/groups/{id}/messages/{}/status",
        ack["messageId"].as_str().unwrap_or_default()
    );
    let mut readers = readers.iter();
    for path in [format!("/groups/{id}"), status] {
        let mut told = false;
        for reader in readers.by_ref().take(5) {
            let at = std::time::Instant::now();
            let (first, _) = c.get(0, reader, &path).await?;
            let (then, _) = c.get(0, reader, &path).await?;
            assert_eq!(first, 200, "{path}");
            if at.elapsed() < Duration::from_millis(900) {
                assert_eq!(then, 429, "{path}: 200 members took the whole burst");
                told = true;
                break;
            }
        }
        anyhow::ensure!(told, "{path}: no two requests within 0.9 s in five tries");
    }
    c.stop().await
}

/// A search reads and decrypts up to `--max-search-scan` messages for one
/// request: it costs one request more per 100 it opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_costs_its_caller_in_proportion_to_what_it_opened() -> anyhow::Result<()> {
    // 1 a second, bursts of 2
    let c = Cluster::start_with(1, 1, &["--user-requests-per-sec", "1"]).await?;
    let readers: Vec<String> = (0..5).map(|i| format!("reader{i}")).collect();
    let mut members = vec!["sender"];
    members.extend(readers.iter().map(String::as_str));
    let g = c.create_group("owner", &members).await?;
    let id = g["id"].as_str().context("group id")?.to_owned();
    let mut sender = c.connect(0, "sender", "web").await?;
    for i in 0..100 {
        sender
            .send_text(&id, &format!("s{i}"), &format!("text {i}"))
            .await?;
    }
    let path = format!("/groups/{id}/search?q=nowhere");
    let mut told = false;
    for reader in &readers {
        let at = std::time::Instant::now();
        let (first, page) = c.get(0, reader, &path).await?;
        let (then, _) = c.get(0, reader, &path).await?;
        assert_eq!((first, &page["messages"]), (200, &json!([])), "{page}");
        if at.elapsed() < Duration::from_millis(900) {
            assert_eq!(then, 429, "100 messages opened took the whole burst");
            told = true;
            break;
        }
    }
    anyhow::ensure!(told, "no two requests within 0.9 s in five tries");
    c.stop().await
}

/// Anyone could add anyone to groups, as often as they liked, up to the
/// victim's allowance of groups (after which no real group could add the
/// victim). Now a user blocks whoever does that: the blocked user can
/// neither create a group with them nor add them to one, while everyone
/// else still can; blocks are listed, capped, and lifted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_user_can_neither_add_the_blocker_to_a_group_nor_hand_them_one()
-> anyhow::Result<()> {
    use reqwest::Method;
    let c = Cluster::start_with(1, 1, &["--max-blocks-per-user", "2"]).await?;
    let block = |user: &'static str, who: &'static str| {
        let path = format!("/blocks/{who}");
        let c = &c;
        async move { c.call(Method::PUT, 0, Some(user), &path, None).await }
    };
    let (status, first) = block("victim", "mallory").await?;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["userId"], "mallory");
    assert!(first["since"].is_string(), "{first}");
    // blocking again changes nothing
    let (status, again) = block("victim", "mallory").await?;
    assert_eq!((status, &again), (200, &first));

    // mallory can create no group with the victim in it, alone or not
    let create = json!({ "name": "spam", "members": ["x", "victim"] });
    let (status, refused) = c
        .call(Method::POST, 0, Some("mallory"), "/groups", Some(&create))
        .await?;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "forbidden");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("victim")),
        "{refused}"
    );
    let (_, theirs) = c.get(0, "x", "/groups").await?;
    assert_eq!(theirs["groups"], json!([]), "nothing was created");
    // nor add the victim to a group of theirs
    let g = c.create_group("mallory", &["x"]).await?;
    let id = g["id"].as_str().context("group id")?;
    let add = json!({ "userIds": ["victim"] });
    let members = format!("/groups/{id}/members");
    let (status, refused) = c
        .call(Method::POST, 0, Some("mallory"), &members, Some(&add))
        .await?;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "forbidden");
    let (_, group) = c.get(0, "mallory", &format!("/groups/{id}")).await?;
    assert_eq!(
        group["members"].as_array().map(Vec::len),
        Some(2),
        "{group}"
    );
    // others still can
    c.create_group("eve", &["victim"]).await?;

    // listed; capped at two; never oneself or a malformed id
    let (_, b) = block("victim", "x").await?;
    let (status, list) = c.get(0, "victim", "/blocks").await?;
    assert_eq!(status, 200);
    assert_eq!(list, json!({ "blocks": [b, first] }), "newest first");
    let (status, full) = block("victim", "y").await?;
    assert_eq!((status, &full["error"]["code"]), (400, &json!("too_large")));
    let (status, own) = block("victim", "victim").await?;
    assert_eq!((status, &own["error"]["code"]), (400, &json!("invalid")));
    let (status, bad) = block("victim", "a:b").await?;
    assert_eq!((status, &bad["error"]["code"]), (400, &json!("invalid")));
    let (status, _) = c.call(Method::PUT, 0, None, "/blocks/x", None).await?;
    assert_eq!(status, 401);

    // lifted: mallory may add the victim again; lifting twice is no error
    for _ in 0..2 {
        let (status, _) = c
            .call(Method::DELETE, 0, Some("victim"), "/blocks/mallory", None)
            .await?;
        assert_eq!(status, 204);
    }
    let (_, list) = c.get(0, "victim", "/blocks").await?;
    assert_eq!(list, json!({ "blocks": [b] }));
    let (status, added) = c
        .call(Method::POST, 0, Some("mallory"), &members, Some(&add))
        .await?;
    assert_eq!(status, 200, "{added}");

    // a member who blocks the owner is not handed the group either
    let (status, _) = block("victim", "mallory").await?;
    assert_eq!(status, 200);
    let owner = format!("/groups/{id}/owner");
    let to_victim = json!({ "userId": "victim" });
    let (status, refused) = c
        .call(Method::POST, 0, Some("mallory"), &owner, Some(&to_victim))
        .await?;
    assert_eq!(status, 403, "{refused}");
    assert_eq!(refused["error"]["code"], "forbidden");
    let (_, group) = c.get(0, "mallory", &format!("/groups/{id}")).await?;
    assert_eq!(group["ownerId"], "mallory", "{group}");
    // to someone else, as before
    let to_x = json!({ "userId": "x" });
    let (status, handed) = c
        .call(Method::POST, 0, Some("mallory"), &owner, Some(&to_x))
        .await?;
    assert_eq!((status, &handed["ownerId"]), (200, &json!("x")), "{handed}");
    c.stop().await
}

/// Each membership change tells every member (a stored notification
/// each), and an owner could make 50 a second: 50,000 stored writes a
/// second from one user with a group of 1,000. Now a change is charged to
/// its caller's budget like a read of each member it tells (one request
/// per 10, at most a burst less one), owed when the budget is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_a_large_group_costs_its_owner_in_proportion() -> anyhow::Result<()> {
    use reqwest::Method;
    // 1 request a second, bursts of 2, per user and edge: the charge is a
    // burst less one, 1
    let c = Cluster::start_with(2, 1, &["--user-requests-per-sec", "1"]).await?;
    let members: Vec<String> = (0..99).map(|i| format!("m{i}")).collect();
    // created through the other edge, whose budget this spends
    let body = json!({ "name": "big", "members": members });
    let (status, g) = c
        .call(Method::POST, 1, Some("owner"), "/groups", Some(&body))
        .await?;
    assert_eq!(status, 201, "{g}");
    let id = g["id"].as_str().context("group id")?;
    // a full budget on edge 0: the removal is 1, telling 99 more members
    // 1 more (at most a burst less one); a second a second comes back
    let started = std::time::Instant::now();
    let (status, _) = c
        .call(
            Method::DELETE,
            0,
            Some("owner"),
            &format!("/groups/{id}/members/m0"),
            None,
        )
        .await?;
    assert_eq!(status, 200);
    let res = c
        .http()
        .delete(format!("{}/groups/{id}/members/m1", c.edge_url(0)))
        .bearer_auth(token("owner"))
        .send()
        .await?;
    // without the charge one request is left whatever the time; with it,
    // none until a second has passed (a machine too busy for that proves
    // nothing either way)
    if started.elapsed() < Duration::from_millis(900) {
        assert_eq!(res.status(), 429);
        assert!(res.headers().contains_key("retry-after"));
    } else {
        println!("too slow to tell: {:?}", started.elapsed());
    }
    // another user's budget is untouched
    let (status, _) = c.get(0, "m2", &format!("/groups/{id}")).await?;
    assert_eq!(status, 200);
    c.stop().await
}

/// Every membership change sent the whole member list to every member
/// (110 MiB a change in a group of 1,000). Now events carry the change, and
/// the list only for groups of up to 100 members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_events_carry_the_change_not_a_large_member_list() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let many: Vec<String> = (0..120).map(|i| format!("m{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let big = c.create_group("alice", &many).await?;
    let small = c.create_group("alice", &["m0"]).await?;
    let mut m0 = c.connect(0, "m0", "web").await?;
    for g in [&big, &small] {
        let res = c
            .http()
            .post(format!(
                "{}/groups/{}/members",
                c.edge_url(0),
                g["id"].as_str().unwrap_or_default()
            ))
            .bearer_auth(token("alice"))
            .json(&json!({ "userIds": ["newcomer"] }))
            .send()
            .await?;
        assert_eq!(res.status(), 200);
        let update = m0.skip_to("a_group_updated").await?;
        let data = &update["data"];
        assert_eq!(data["group"]["id"], g["id"]);
        assert_eq!(
            data["change"],
            json!({"kind": "members_added", "userIds": ["newcomer"], "by": "alice"})
        );
        let count = data["group"]["memberCount"].as_u64().unwrap_or(0);
        if g["id"] == big["id"] {
            assert_eq!(count, 122);
            assert!(data["group"].get("members").is_none(), "{update}");
            assert!(
                update.to_string().len() < 1024,
                "{} bytes",
                update.to_string().len()
            );
        } else {
            assert_eq!(count, 3);
            assert_eq!(data["group"]["members"].as_array().map(Vec::len), Some(3));
        }
    }
    c.stop().await
}

/// A change that changes nothing was stored and told to every member again
/// (and `subscribe_to_group` in a loop grew the group stream): one owner's
/// loop of "add the members already in" fanned out to the whole group each
/// time. Now nothing is stored or published for them; an addition names
/// only who was new; and the notification stream has a stream-wide cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_that_change_nothing_notify_no_one_and_repeated_subscribes_publish_nothing()
-> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut bob = c.connect(0, "bob", "web").await?;
    let add = |ids: Value| {
        c.http()
            .post(format!("{}/groups/{g}/members", c.edge_url(0)))
            .bearer_auth(token("alice"))
            .json(&json!({ "userIds": ids }))
            .send()
    };
    let transfer = |to: &str| {
        c.http()
            .post(format!("{}/groups/{g}/owner", c.edge_url(0)))
            .bearer_auth(token("alice"))
            .json(&json!({ "userId": to }))
            .send()
    };
    let before = c.get(0, "alice", &format!("/groups/{g}")).await?.1;
    for _ in 0..3 {
        let res = add(json!(["bob", "alice", "bob"])).await?;
        assert_eq!(res.status(), 200);
        assert_eq!(res.json::<Value>().await?, before, "the group as it was");
        assert_eq!(transfer("alice").await?.status(), 200);
    }
    // the first update bob hears of is the one that changed something, and
    // it names only who was new
    assert_eq!(add(json!(["bob", "carol", "carol"])).await?.status(), 200);
    let update = bob.skip_to("a_group_updated").await?;
    assert_eq!(
        update["data"]["change"],
        json!({"kind": "members_added", "userIds": ["carol"], "by": "alice"})
    );

    // subscribing again and again publishes nothing more
    let bus = c.bus().await?;
    let (group, user) = (chat_domain::GroupId::parse(&g)?, UserId::parse("bob")?);
    let tail = bus.membership_tail(&group, &user).await?;
    assert_eq!(tail.subscribed, Some(true));
    for _ in 0..5 {
        bob.request("subscribe_to_group", json!({ "groupId": g }))
            .await?;
    }
    assert_eq!(bus.membership_tail(&group, &user).await?, tail);

    // the notification stream is capped as a whole (`--nats-users-max-bytes`)
    let users = bus.jetstream().get_stream("CHAT_USERS").await?;
    assert_eq!(users.cached_info().config.max_bytes, 4 << 30);
    c.stop().await
}

/// A change that committed but whose notification did not go out (NATS
/// failed between the two: the call failed) is told when the client
/// retries, though the retry itself changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_change_tells_what_its_first_attempt_could_not() -> anyhow::Result<()> {
    use mongodb::bson::{DateTime, doc};
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut bob = c.connect(0, "bob", "web").await?;
    // as the first attempt left it: carol added, the change noted as not
    // told yet, and no event published
    let groups = c
        .mongo()
        .await?
        .collection::<mongodb::bson::Document>("groups");
    groups
        .update_one(
            doc! { "_id": &g },
            doc! {
                "$push": { "members": { "userId": "carol", "joinedAt": DateTime::now(), "joinedSeq": 0_i64 } },
                "$inc": { "rev": 1 },
                "$set": { "unnotified": { "kind": "members_added", "userIds": ["carol"], "by": "alice", "also": [] } },
            },
        )
        .await?;
    // the retry
    assert_eq!(c.add_members("alice", &g, &["carol"]).await?, 200);
    let update = bob.skip_to("a_group_updated").await?;
    assert_eq!(
        update["data"]["change"],
        json!({"kind": "members_added", "userIds": ["carol"], "by": "alice"})
    );
    let doc = groups
        .find_one(doc! { "_id": &g })
        .await?
        .context("the group")?;
    assert!(!doc.contains_key("unnotified"), "told: {doc}");
    // a retry after that tells nothing more: the next update bob hears of
    // is the next change
    assert_eq!(c.add_members("alice", &g, &["carol"]).await?, 200);
    assert_eq!(c.add_members("alice", &g, &["dave"]).await?, 200);
    let next = bob.skip_to("a_group_updated").await?;
    assert_eq!(next["data"]["change"]["userIds"], json!(["dave"]));
    c.stop().await
}

/// `me` names the caller in a path (`DELETE /groups/{id}/members/me` is a
/// leave), so a member whose id was `me` could never be removed by the
/// owner: no token, new member or new owner may have it, and the alias
/// still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_user_is_called_me() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let (status, body) = c.get(0, "me", "/groups").await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (401, &json!("unauthorized")),
        "{body}"
    );
    let post = |path: &str, body: Value| {
        let (c, path) = (&c, path.to_owned());
        async move {
            c.call(reqwest::Method::POST, 0, Some("alice"), &path, Some(&body))
                .await
        }
    };
    let (status, body) = post("/groups", json!({"name": "team", "members": ["me"]})).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid")),
        "{body}"
    );
    let g = c.room(&["alice", "bob"]).await?;
    let (status, body) = post(&format!("/groups/{g}/members"), json!({"userIds": ["me"]})).await?;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &json!("invalid")),
        "{body}"
    );
    let (status, body) = post(&format!("/groups/{g}/owner"), json!({"userId": "me"})).await?;
    assert_eq!(status, 400, "{body}");
    // bob leaves with the alias
    assert_eq!(c.remove_member(0, "bob", &g, "me").await?, 200);
    let (status, body) = c.get(0, "alice", &format!("/groups/{g}")).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["memberCount"], 1, "{body}");
    c.stop().await
}

/// A WebSocket token in the URL (`?token=`) ends up in proxies' logs: an
/// edge with `--no-ws-query-token` refuses it with a 401 that says what to
/// send instead, and takes the same token as `Authorization: Bearer` or
/// as the `bearer.` subprotocol; by default it is taken (the contract).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_may_refuse_tokens_in_the_url() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::{Error, client::IntoClientRequest};
    let c = Cluster::start_with(1, 1, &["--no-ws-query-token"]).await?;
    let addr = c.edge_url(0).trim_start_matches("http://").to_owned();
    let refused =
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={}", token("alice"))).await;
    match refused {
        Err(Error::Http(res)) => {
            assert_eq!(res.status(), 401);
            let body = String::from_utf8_lossy(res.body().as_deref().unwrap_or_default());
            assert!(body.contains("takes no token in the URL"), "{body}");
        }
        other => anyhow::bail!("a token in the URL was not refused: {:?}", other.map(drop)),
    }
    let mut by_header = format!("ws://{addr}/ws?device=web").into_client_request()?;
    by_header.headers_mut().insert(
        "authorization",
        format!("Bearer {}", token("alice")).parse()?,
    );
    let mut by_protocol = format!("ws://{addr}/ws?device=web").into_client_request()?;
    by_protocol.headers_mut().insert(
        "sec-websocket-protocol",
        format!("chat.v1, bearer.{}", token("alice")).parse()?,
    );
    for request in [by_header, by_protocol] {
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        let mut client = chat_tests::Client::from_stream(ws);
        let hello = client.next_push("a_session").await?;
        assert_eq!(hello["data"]["userId"], "alice");
    }
    c.stop().await?;
    // by default, the URL's token is taken
    let c = Cluster::start(1, 1).await?;
    c.connect(0, "alice", "web").await?;
    c.stop().await
}
