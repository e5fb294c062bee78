//! The WebSocket envelope: every request with an id gets exactly one reply,
//! bad frames get precise errors and the socket stays usable, abuse closes it.

use anyhow::Context;
use chat_bus::Feed;
use chat_tests::{Client, Cluster, Process, token};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_the_socket_keeps_working() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.create_group("alice", &["bob"]).await?;
    let id = g["id"].as_str().expect("id");
    let mut ws = c.connect(0, "bob", "phone").await?;

    // malformed JSON: an error without id
    ws.send_raw(Message::Text("{not json".into())).await?;
    let e = ws.recv(chat_tests::PROMPTLY).await?.expect("error frame");
    assert_eq!(
        (e["event"].as_str(), e["data"]["code"].as_str()),
        (Some("error"), Some("invalid"))
    );
    assert!(e.get("id").is_none());

    // binary frames
    ws.send_raw(Message::Binary(vec![1, 2, 3].into())).await?;
    let e = ws.recv(chat_tests::PROMPTLY).await?.expect("error frame");
    assert_eq!(e["data"]["code"], "invalid");

    // unknown event, bad data, bad id: errors that echo the id where there is one
    assert_eq!(
        ws.request_error("no_such_event", json!({})).await?,
        "invalid"
    );
    assert_eq!(
        ws.request_error("subscribe_to_group", json!({ "group": id }))
            .await?,
        "invalid"
    );
    assert_eq!(
        ws.request_error("subscribe_to_group", json!({ "groupId": "a.b" }))
            .await?,
        "invalid"
    );
    ws.send_raw(Message::Text(
        json!({"event": "subscribe_to_group", "id": {"x": 1}, "data": {}})
            .to_string()
            .into(),
    ))
    .await?;
    let e = ws.recv(chat_tests::PROMPTLY).await?.expect("error frame");
    assert_eq!(e["data"]["code"], "invalid");

    // request ids are limited to 128 characters
    ws.send_raw(Message::Text(
        json!({"event": "subscribe_to_group", "id": "i".repeat(200), "data": {"groupId": id}})
            .to_string()
            .into(),
    ))
    .await?;
    let e = ws.recv(chat_tests::PROMPTLY).await?.expect("error frame");
    assert_eq!(
        (e["data"]["code"].as_str(), e.get("id")),
        (Some("invalid"), None),
        "{e}"
    );

    // an oversized frame (over the 64 KiB default, under the 1 MiB hard limit)
    let big = json!({"event": "subscribe_to_group", "id": "big", "data": {"groupId": id, "pad": "x".repeat(70 * 1024)}});
    ws.send_raw(Message::Text(big.to_string().into())).await?;
    let e = ws.reply_to(&json!("big")).await?;
    assert_eq!(
        (e["event"].as_str(), e["data"]["code"].as_str()),
        (Some("error"), Some("too_large"))
    );

    // unknown group, then a non-member
    let unknown = "0123456789abcdef0123456789abcdef";
    assert_eq!(
        ws.request_error("subscribe_to_group", json!({ "groupId": unknown }))
            .await?,
        "not_found"
    );
    assert_eq!(
        ws.request_error("notify_create_group", json!({ "groupId": unknown }))
            .await?,
        "not_found"
    );
    let mut mallory = c.connect(0, "mallory", "x").await?;
    assert_eq!(
        mallory
            .request_error("notify_create_group", json!({ "groupId": id }))
            .await?,
        "forbidden"
    );
    assert_eq!(
        mallory
            .request_error("subscribe_to_group", json!({ "groupId": id }))
            .await?,
        "forbidden"
    );

    // after all that the socket still works
    let ack = ws
        .request("subscribe_to_group", json!({ "groupId": id }))
        .await?;
    assert_eq!(ack["groupId"], id);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_and_abuse_are_enforced() -> anyhow::Result<()> {
    let c = Cluster::start_with(1, 1, &["--requests-per-sec", "1"]).await?;
    let mut ws = c.connect(0, "bob", "phone").await?;
    // the burst allowance is 100 requests; past it, rate_limited
    let mut codes = Vec::new();
    for _ in 0..120 {
        ws.send("no_such_event", json!({})).await?;
    }
    while codes.len() < 120 {
        match ws.recv(chat_tests::PROMPTLY).await? {
            Some(frame) => codes.push(
                frame["data"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ),
            None => break,
        }
    }
    // 50 errors in a row close the connection with 1008 before 120 replies
    assert!(
        codes.len() >= 50 && codes.len() < 120,
        "{} replies",
        codes.len()
    );
    assert!(
        codes.iter().all(|c| c == "invalid" || c == "rate_limited"),
        "{codes:?}"
    );
    c.stop().await?;

    // a well-behaved client that exceeds the rate gets rate_limited and stays connected
    let c = Cluster::start_with(1, 1, &["--requests-per-sec", "0.1"]).await?;
    let g = c.create_group("bob", &[]).await?;
    let id = g["id"].as_str().expect("id");
    let mut ws = c.connect(0, "bob", "phone").await?;
    // all sent at once: the limit counts arrivals, however slow the replies
    let mut ids = Vec::new();
    for _ in 0..110 {
        ids.push(
            ws.send("subscribe_to_group", json!({ "groupId": id }))
                .await?,
        );
    }
    let mut limited = 0;
    for rid in &ids {
        let reply: Value = ws.reply_to(rid).await?;
        if reply["event"] == "error" {
            assert_eq!(reply["data"]["code"], "rate_limited");
            limited += 1;
        }
    }
    assert!(limited >= 1, "no request was rate limited");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_closes_with_a_policy_code() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let mut ws = c.connect(0, "bob", "phone").await?;
    for _ in 0..60 {
        ws.send_raw(Message::Text("nope".into())).await?;
    }
    assert_eq!(ws.closed_with().await?, Some(1008));

    // past the hard message limit the transport closes the connection
    let mut ws = c.connect(0, "bob", "tablet").await?;
    // (the write itself may already fail: the server stops reading)
    let sent = ws
        .send_raw(Message::Text("x".repeat(2 * 1024 * 1024).into()))
        .await;
    if sent.is_ok() {
        match ws.recv(chat_tests::PROMPTLY).await {
            Ok(Some(frame)) => panic!("an oversized message got an answer: {frame}"),
            Ok(None) => {}
            Err(e) => assert!(
                !e.to_string().contains("no frame in time"),
                "not closed: {e}"
            ),
        }
    }

    // a bad device id is refused before the upgrade
    let url = format!(
        "ws://{}/ws?token={}&device=a.b",
        c.edge_url(0).trim_start_matches("http://"),
        token("bob")
    );
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 400),
        other => panic!("bad device got a socket: {:?}", other.map(|_| ())),
    }
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_edge_tells_clients_to_reconnect_and_loses_nothing() -> anyhow::Result<()> {
    let mut c = Cluster::start(2, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut bob = c.connect(0, "bob", "setup").await?;
    let mut alice = c.connect(1, "alice", "setup").await?;
    alice.send_text(&g, "m1", "one").await?;
    assert_eq!(bob.messages(1).await?[0]["text"], "one");

    // edge 0 drains: bob is told to reconnect with 1012 (service restart)
    let restart = c.restart_edge(0);
    let closed = bob.closed_with();
    let (restarted, code) = tokio::join!(restart, closed);
    restarted?;
    assert_eq!(code?, Some(1012));
    // sent while bob was away, received once he is back, in order, once
    alice.send_text(&g, "m2", "two").await?;
    let mut bob = c.connect(1, "bob", "setup").await?;
    let got = bob.messages(1).await?;
    assert_eq!(
        (got[0]["seq"].as_u64(), got[0]["text"].as_str()),
        (Some(2), Some("two"))
    );
    alice.send_text(&g, "m3", "three").await?;
    assert_eq!(bob.messages(1).await?[0]["seq"], 3);
    c.stop().await
}

/// Two tabs of a web app that never heard of devices share the user's
/// default device; they used to close each other (4409). Now every
/// connection receives everything, whether or not it names a device, on
/// any edge, and the device's place is the furthest either reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_of_one_device_all_receive_everything() -> anyhow::Result<()> {
    let c = Cluster::start(2, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "setup").await?;
    // no device: the default one, twice, on two edges
    let mut tab1 = c.connect_without_device(0, "bob").await?;
    let mut tab2 = c.connect_without_device(1, "bob").await?;
    // and a named device twice on one edge
    let mut phone1 = c.connect(1, "bob", "phone").await?;
    let mut phone2 = c.connect(1, "bob", "phone").await?;
    for i in 1..=5 {
        alice.send_text(&g, &format!("m{i}"), "x").await?;
    }
    for ws in [&mut tab1, &mut tab2, &mut phone1, &mut phone2] {
        assert_eq!(seqs_through(ws, 1, 5).await?, [1, 2, 3, 4, 5]);
    }
    // a notification reaches every connection too
    let own = c.create_group("bob", &[]).await?;
    let own = own["id"].as_str().context("id")?.to_owned();
    phone1
        .request("notify_create_group", json!({ "groupId": own }))
        .await?;
    for ws in [&mut tab1, &mut tab2, &mut phone1, &mut phone2] {
        let push = ws.next_push("a_group_created").await?;
        assert_eq!(push["data"]["group"]["id"], own.as_str());
    }
    // one tab goes, the other stays: nothing closes it
    tab1.close().await?;
    alice.send_text(&g, "m6", "x").await?;
    assert_eq!(seqs_through(&mut tab2, 6, 6).await?, [6]);
    // both gone, a message missed, then back: only what was missed comes
    tab2.close().await?;
    alice.send_text(&g, "m7", "x").await?;
    let mut back = c.connect_without_device(0, "bob").await?;
    assert_eq!(seqs_through(&mut back, 7, 7).await?, [7]);
    c.stop().await
}

/// The seqs from `first` on that a connection receives until `last`. What
/// comes before `first` must be repeats (the device's earlier messages),
/// and everything arrives in order with no gap.
async fn seqs_through(
    ws: &mut chat_tests::Client,
    first: u64,
    last: u64,
) -> anyhow::Result<Vec<u64>> {
    let mut got: Vec<u64> = Vec::new();
    while got.last() != Some(&last) {
        let seq = ws.messages(1).await?[0]["seq"].as_u64().unwrap_or_default();
        if let Some(&prev) = got.last() {
            anyhow::ensure!(seq == prev + 1, "{seq} after {got:?}");
        }
        got.push(seq);
    }
    Ok(got.into_iter().filter(|s| *s >= first).collect())
}

/// A device that reconnects while its group is busy catches up from its
/// durable consumer and then goes live: across every connection it gets
/// each message once, in order, with nothing missing at any hand-over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_while_messages_flow_hands_over_with_no_gap_or_repeat() -> anyhow::Result<()> {
    let c = Cluster::start(2, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut bob = c.connect(0, "bob", "phone").await?;
    let mut alice = c.connect(1, "alice", "web").await?;
    const N: u64 = 120;
    let sending = {
        let g = g.clone();
        tokio::spawn(async move {
            for i in 1..=N {
                alice.send_text(&g, &format!("m{i}"), "flow").await?;
            }
            anyhow::Ok(())
        })
    };
    let mut seqs: Vec<u64> = Vec::new();
    let mut connections = 1;
    while (seqs.len() as u64) < N {
        // a few messages on this connection, then away and back, on the
        // other edge every other time
        let got = bob.messages(7.min(N as usize - seqs.len())).await;
        for m in got.with_context(|| format!("got {seqs:?}"))? {
            seqs.push(m["seq"].as_u64().unwrap_or(0));
        }
        if (seqs.len() as u64) < N {
            // everything written before the close is read, as a client does
            bob.send_raw(tokio_tungstenite::tungstenite::Message::Close(None))
                .await?;
            let rest = bob.until_closed().await?;
            for f in rest {
                if f["event"] == "a_group_message" {
                    seqs.push(f["data"]["seq"].as_u64().unwrap_or(0));
                }
            }
            bob = c.connect(connections % 2, "bob", "phone").await?;
            connections += 1;
        }
    }
    sending.await??;
    assert_eq!(
        seqs,
        (1..=N).collect::<Vec<_>>(),
        "over {connections} connections"
    );
    // and live from here
    let mut alice = c.connect(1, "alice", "web").await?;
    alice.send_text(&g, "last", "last").await?;
    assert_eq!(bob.messages(1).await?[0]["seq"], N + 1);
    c.stop().await
}

/// A device that leaves while it is still catching up keeps its place in
/// what it was written: its next connection goes on from there, not from
/// where the last one began. (Before, only the hand-over to the live feed
/// moved a catching-up device's place: a client that closed right after
/// its missed frames arrived got them all again, seen as a rare duplicate
/// notification in CI.) The only repeats are the last burst the edge had
/// put on the wire but not yet flushed when the client's close made its
/// next write fail: frames not counted as written, which `seq` shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_leaves_while_catching_up_resumes_after_what_it_was_written()
-> anyhow::Result<()> {
    const N: u64 = 300;
    // more than a burst (`WRITE_BURST`, 64 frames) and a few in flight:
    // starting again from the beginning repeats frames outside the tail
    const READ: usize = 100;
    const TAIL: usize = 80;
    let c = Cluster::start_with(1, 1, chat_tests::FLOOD).await?;
    let g = c.room(&["alice", "bob"]).await?;
    // bob's phone has a place, then is away while the group is busy
    c.connect(0, "bob", "phone").await?.close().await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let text = "x".repeat(59_000);
    for i in 0..N {
        alice.send_text(&g, &format!("m{i}"), &text).await?;
    }
    // back on a socket with a tiny receive buffer: the catch-up waits for
    // room, far from the hand-over, when the client leaves
    let mut phone = c.connect_slow_reader(0, "bob", "phone").await?;
    let mut first = Vec::new();
    while first.len() < READ {
        let m = phone.skip_to("a_group_message").await?;
        first.push(m["data"]["seq"].as_u64().unwrap_or(0));
    }
    // a clean close: what was written before it is read
    phone.send_raw(Message::Close(None)).await?;
    for f in phone.until_closed().await? {
        if f["event"] == "a_group_message" {
            first.push(f["data"]["seq"].as_u64().unwrap_or(0));
        }
    }
    assert!(
        (first.len() as u64) < N,
        "the catch-up finished before the close; make the flood larger"
    );
    assert!(first.windows(2).all(|w| w[0] < w[1]), "{first:?}");
    // the answer to a client's close can reach it before the edge saved
    // the place (a client that reconnects at once may get more again):
    // wait for the save of what the first connection surely counted. The
    // group's N messages are the stream's last, one after the other
    let bus = c.bus().await?;
    let newest = bus
        .newest_on(Feed::Groups, &Feed::Groups.message_subject(&g))
        .await?;
    if let Some(surely) = first.len().checked_sub(TAIL + 1).map(|i| first[i]) {
        c.place_reaches("bob", "phone", Feed::Groups, newest - N + surely)
            .await?;
    }
    let mut again = c.connect(0, "bob", "phone").await?;
    let mut rest = Vec::new();
    while !(1..=N).all(|s| first.contains(&s) || rest.contains(&s)) {
        let m = again
            .skip_to("a_group_message")
            .await
            .with_context(|| format!("after {first:?} and {rest:?}"))?;
        rest.push(m["data"]["seq"].as_u64().unwrap_or(0));
    }
    assert!(rest.windows(2).all(|w| w[0] < w[1]), "{rest:?}");
    let tail = &first[first.len().saturating_sub(TAIL)..];
    assert!(
        rest.iter().all(|s| !first.contains(s) || tail.contains(s)),
        "written to the first connection ({first:?}) and again to the second: {rest:?}"
    );
    c.stop().await
}

/// The `a_typing` pushes among `frames`, as `(userId, state)`.
fn typing_of(frames: &[Value]) -> Vec<(String, String)> {
    frames
        .iter()
        .filter(|f| f["event"] == "a_typing")
        .map(|f| {
            let d = &f["data"];
            (
                d["userId"].as_str().unwrap_or_default().to_owned(),
                d["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_the_group_s_other_members_on_every_edge_and_nobody_else()
-> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let c = Cluster::start(2, 2).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let other = c.room(&["dave", "alice"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    // alice's own second tab, on the other edge: it hears nothing of her
    let mut alice_tab = c.connect(1, "alice", "tab").await?;
    let mut bob = c.connect(1, "bob", "phone").await?;
    let mut carol = c.connect(1, "carol", "web").await?;
    let mut dave = c.connect(0, "dave", "web").await?;
    let mut mallory = c.connect(0, "mallory", "web").await?;

    let started = Instant::now();
    let ack = alice
        .request("typing", json!({"groupId": g, "state": "start"}))
        .await?;
    assert_eq!(
        ack,
        json!({"groupId": g, "state": "start", "forwarded": true})
    );
    for member in [&mut bob, &mut carol] {
        let push = member.skip_to("a_typing").await?;
        assert_eq!(
            push["data"],
            json!({"groupId": g, "userId": "alice", "state": "start", "expiresInMs": 6000})
        );
    }
    // a start per keystroke: passed on at most once per 2 s
    for _ in 0..3 {
        let ack = alice
            .request("typing", json!({"groupId": g, "state": "start"}))
            .await?;
        if started.elapsed() < Duration::from_millis(1500) {
            assert_eq!(ack["forwarded"], false, "{ack}");
        }
    }
    let ack = alice
        .request("typing", json!({"groupId": g, "state": "stop"}))
        .await?;
    assert_eq!(ack["forwarded"], true);
    let stop = bob.skip_to("a_typing").await?;
    assert_eq!(stop["data"]["state"], "stop");
    assert_eq!(stop["data"].get("expiresInMs"), None);
    // a stop with no start before it is news to nobody
    let ack = alice
        .request("typing", json!({"groupId": g, "state": "stop"}))
        .await?;
    assert_eq!(ack["forwarded"], false);

    // bob types back; alice's tab (on bob's edge, which handed bob every
    // signal of alice's in the same pass) hears bob, never alice
    bob.request("typing", json!({"groupId": g, "state": "start"}))
        .await?;
    let heard = alice_tab.skip_to("a_typing").await?;
    assert_eq!(heard["data"]["userId"], "bob");
    let heard = alice.skip_to("a_typing").await?;
    assert_eq!(heard["data"]["userId"], "bob");
    // nobody outside the group hears either
    alice
        .request("typing", json!({"groupId": other, "state": "start"}))
        .await?;
    let heard = dave.skip_to("a_typing").await?;
    assert_eq!(heard["data"]["groupId"], other.as_str());

    // outsiders may not type in the group, nor in anything malformed; and
    // mallory, on dave's edge, heard nothing of what it handed dave
    for (data, code) in [
        (json!({"groupId": g, "state": "start"}), "forbidden"),
        (
            json!({"groupId": "no-such-group", "state": "start"}),
            "forbidden",
        ),
        (json!({"groupId": g, "state": "shouting"}), "invalid"),
        (json!({"groupId": "a.b", "state": "start"}), "invalid"),
        (
            json!({"groupId": g, "state": "start", "extra": 1}),
            "invalid",
        ),
    ] {
        assert_eq!(
            mallory.request_error("typing", data.clone()).await?,
            code,
            "{data}"
        );
    }
    assert!(typing_of(&mallory.take_kept()).is_empty());

    // a removed member stops hearing the group and may not type in it
    assert_eq!(c.remove_member(0, "alice", &g, "carol").await?, 200);
    // the removal reaches carol's edge with the group's traffic: until then
    // a stop (which passes nothing on) is still taken
    let deadline = Instant::now() + chat_tests::PROMPTLY;
    loop {
        let id = carol
            .send("typing", json!({"groupId": g, "state": "stop"}))
            .await?;
        let reply = carol.reply_to(&id).await?;
        if reply["event"] == "error" {
            assert_eq!(reply["data"]["code"], "forbidden", "{reply}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "carol still follows the group");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    carol.take_kept();
    // alice's last start in g was told less than 2 s ago, perhaps: the
    // next one is told once that has passed
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ack = alice
            .request("typing", json!({"groupId": g, "state": "start"}))
            .await?;
        if ack["forwarded"] == true {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no start told: {ack}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // bob and carol share an edge, which hands on a signal in one pass
    let heard = bob.skip_to("a_typing").await?;
    assert_eq!(heard["data"]["userId"], "alice");
    // what carol's edge queued for her before this reply would come first
    assert_eq!(
        carol
            .request_error("typing", json!({"groupId": g, "state": "stop"}))
            .await?,
        "forbidden"
    );
    assert!(
        typing_of(&carol.take_kept()).is_empty(),
        "a removed member heard typing"
    );

    // a start left open when the connection ends is stopped by the edge
    alice.close().await?;
    let stop = bob.skip_to("a_typing").await?;
    assert_eq!(stop["data"]["userId"], "alice");
    assert_eq!(stop["data"]["state"], "stop");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_that_is_not_renewed_runs_out_with_a_stop() -> anyhow::Result<()> {
    use std::time::{Duration, Instant};
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(0, "bob", "web").await?;
    // from before the start was asked for: bob may hear of it late
    let at = Instant::now();
    alice
        .request("typing", json!({"groupId": g, "state": "start"}))
        .await?;
    let start = bob.skip_to("a_typing").await?;
    assert_eq!(start["data"]["state"], "start");
    // the edge looks every 5 s: the stop comes between 6 and 11 s later
    let stop = loop {
        let frame = bob.recv(Duration::from_secs(15)).await?.context("closed")?;
        if frame["event"] == "a_typing" {
            break frame;
        }
    };
    assert_eq!(stop["data"]["state"], "stop");
    assert!(at.elapsed() >= Duration::from_secs(5), "{:?}", at.elapsed());
    // the connection that typed is still open and fine
    alice.send_text(&g, "m1", "sent").await?;
    c.stop().await
}

/// `user`'s entry in `GET /groups/{group}/presence`, asked as `asker`.
async fn presence_of(c: &Cluster, asker: &str, group: &str, user: &str) -> anyhow::Result<Value> {
    let (status, body) = c
        .get(0, asker, &format!("/groups/{group}/presence"))
        .await?;
    anyhow::ensure!(status == 200, "presence: {status} {body}");
    body["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["userId"] == user))
        .cloned()
        .context("no such member")
}

/// The next `a_presence` of `user` that says `online`, skipping the rest.
async fn next_presence(
    client: &mut chat_tests::Client,
    user: &str,
    online: bool,
) -> anyhow::Result<Value> {
    loop {
        let p = client.skip_to("a_presence").await?;
        if p["data"]["userId"] == user && p["data"]["online"] == online {
            return Ok(p["data"].clone());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_follows_every_connection_of_a_user_on_every_edge() -> anyhow::Result<()> {
    use std::time::Duration;
    let c = Cluster::start(2, 2).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    // the room's setup connections came and went
    for user in ["alice", "carol"] {
        chat_tests::eventually(chat_tests::PROMPTLY, || async {
            let p = presence_of(&c, "bob", &g, user).await?;
            Ok((p["online"] == false && p["lastSeen"].is_string()).then_some(()))
        })
        .await?;
    }
    let mut bob = c.connect(1, "bob", "phone").await?;
    chat_tests::eventually(chat_tests::PROMPTLY, || async {
        let p = presence_of(&c, "carol", &g, "bob").await?;
        Ok((p == json!({"userId": "bob", "online": true})).then_some(()))
    })
    .await?;

    // alice's first connection: bob hears she is online
    let web = c.connect(0, "alice", "web").await?;
    let on = next_presence(&mut bob, "alice", true).await?;
    assert_eq!(on, json!({"userId": "alice", "online": true}));
    // a second one on the other edge, then the first closes: still online
    let tab = c.connect(1, "alice", "tab").await?;
    let bus = c.bus().await?.presence();
    let alice = chat_domain::UserId::parse("alice")?;
    chat_tests::eventually(chat_tests::PROMPTLY, || async {
        Ok((bus.get(&alice).await?.edges.len() == 2).then_some(()))
    })
    .await?;
    web.close().await?;
    chat_tests::eventually(chat_tests::PROMPTLY, || async {
        Ok((bus.get(&alice).await?.edges.len() == 1).then_some(()))
    })
    .await?;
    assert_eq!(presence_of(&c, "bob", &g, "alice").await?["online"], true);
    // carol comes (announced by the edge alice is still on): the next
    // presence bob hears is carol's, nothing of alice
    let _carol = c.connect(1, "carol", "web").await?;
    let next = bob.skip_to("a_presence").await?;
    assert_eq!(next["data"], json!({"userId": "carol", "online": true}));
    // alice's last connection closes: offline, with when
    tab.close().await?;
    let off = next_presence(&mut bob, "alice", false).await?;
    let seen = off["lastSeen"].as_str().context("lastSeen")?.to_owned();
    let entry = presence_of(&c, "bob", &g, "alice").await?;
    assert_eq!(
        entry,
        json!({"userId": "alice", "online": false, "lastSeen": seen})
    );

    // only members see a group's presence
    let (status, _) = c
        .get(0, "mallory", &format!("/groups/{g}/presence"))
        .await?;
    assert_eq!(status, 403);

    // an edge that dies: its users go offline once the workers notice it
    // stopped beating (15 s, swept every 5 s)
    let mut doomed = c.spawn_process("edge").await?;
    let _alice = c.connect_to(&doomed, "alice", "laptop").await?;
    next_presence(&mut bob, "alice", true).await?;
    let killed = std::time::Instant::now();
    doomed.kill();
    let mut within = Duration::from_secs(40);
    let off = loop {
        let frame = bob.recv(within).await?.context("bob's connection closed")?;
        if frame["event"] == "a_presence"
            && frame["data"]["userId"] == "alice"
            && frame["data"]["online"] == false
        {
            break frame["data"].clone();
        }
        within = Duration::from_secs(40).saturating_sub(killed.elapsed());
    };
    // within 40 s of the kill (the loop's deadline): 20 s at most by the
    // design, and as much again for a loaded machine
    assert!(off["lastSeen"].is_string(), "{off}");
    c.stop().await
}

/// nats-server holds every key of the presence bucket in memory, and an
/// edge takes a new name at every start, so keys that stayed for ever grew
/// with every user and every deployment: a user who went offline is
/// forgotten after `--presence-forget-after-secs` (reads as never seen
/// then), the delete markers of an edge's index go with their keys, and a
/// user still online is kept however long.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_forgets_offline_users_in_time_and_keeps_no_markers() -> anyhow::Result<()> {
    use std::time::Duration;
    let c = Cluster::start_with(1, 1, &["--presence-forget-after-secs", "3"]).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let bus = c.bus().await?;
    let presence = bus.presence();
    let (alice, bob) = (
        chat_domain::UserId::parse("alice")?,
        chat_domain::UserId::parse("bob")?,
    );
    let _bob = c.connect(0, "bob", "phone").await?;
    let web = c.connect(0, "alice", "web").await?;
    chat_tests::eventually(chat_tests::PROMPTLY, || async {
        let both = presence.get(&alice).await?.online() && presence.get(&bob).await?.online();
        Ok(both.then_some(()))
    })
    .await?;
    web.close().await?;
    let seen = chat_tests::eventually(chat_tests::PROMPTLY, || async {
        let p = presence_of(&c, "bob", &g, "alice").await?;
        Ok((p["online"] == false).then(|| p["lastSeen"].clone()))
    })
    .await?;
    assert!(seen.is_string(), "offline, with when: {seen}");

    // then forgotten, and the markers gone: left are bob's record, his
    // entry in the edge's index and the edge's heartbeat
    let left = chat_tests::eventually(Duration::from_secs(60), || async {
        let p = presence_of(&c, "bob", &g, "alice").await?;
        let keys = bus.bucket_size(chat_bus::PRESENCE_BUCKET).await?.keys;
        let forgotten = p == json!({"userId": "alice", "online": false});
        Ok((forgotten && keys == 3).then_some(keys))
    })
    .await;
    let keys = bus.bucket_size(chat_bus::PRESENCE_BUCKET).await?.keys;
    left.with_context(|| format!("{keys} keys in the presence bucket"))?;
    // bob has been online longer than alice's record lived
    assert_eq!(presence_of(&c, "alice", &g, "bob").await?["online"], true);
    assert!(presence.get(&bob).await?.online());
    c.stop().await
}

/// An edge that died between indexing a user and naming itself in the
/// user's record (or whose index removal failed) left an index entry the
/// record does not back: the sweep took the user "out" (nothing to
/// change), kept the entry, and so swept the dead edge every 5 s for ever,
/// its heartbeat never deleted. Now the entry goes all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_edge_s_orphaned_index_entries_are_swept_with_it() -> anyhow::Result<()> {
    use std::time::Duration;
    let c = Cluster::start(1, 1).await?;
    let bus = c.bus().await?;
    let presence = bus.presence();
    // a dead edge "ghost": a heartbeat that will never move, and an index
    // entry for alice, whose record never named it
    assert!(
        !presence
            .beat("ghost", chat_domain::now_millis(), true)
            .await?
    );
    let js = async_nats::jetstream::new(
        async_nats::ConnectOptions::with_user_and_password(
            c.stack.nats.users.ops.user.into(),
            c.stack.nats.users.ops.password.clone(),
        )
        .connect(c.stack.nats.url.as_str())
        .await?,
    );
    js.publish("$KV.CHAT_PRESENCE.at.ghost.alice", "".into())
        .await?
        .await?;
    let stream = js.get_stream("KV_CHAT_PRESENCE").await?;
    let gone = |subject: &'static str| {
        let stream = stream.clone();
        async move {
            match stream.get_last_raw_message_by_subject(subject).await {
                Ok(m) => Ok(m.headers.get("KV-Operation").is_some()),
                Err(e)
                    if e.kind()
                        == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
                {
                    Ok(true)
                }
                Err(e) => Err(anyhow::Error::from(e)),
            }
        }
    };
    // swept once its heartbeat stood still for 15 s (sweeps every 5 s)
    chat_tests::eventually(Duration::from_secs(60), || async {
        let both = gone("$KV.CHAT_PRESENCE.at.ghost.alice").await?
            && gone("$KV.CHAT_PRESENCE.e.ghost").await?;
        Ok(both.then_some(()))
    })
    .await
    .context("the dead edge's index entry and heartbeat are gone")?;
    assert!(
        !presence
            .get(&chat_domain::UserId::parse("alice")?)
            .await?
            .online()
    );
    c.stop().await
}

/// A group's presence is one read per member: a member asking for it in a
/// loop made a thousand reads a call. The call costs the caller's request
/// budget one more request per ten members, as does creating a group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_group_s_presence_costs_its_reads_from_the_caller_s_budget() -> anyhow::Result<()> {
    // 10 calls a second, bursts of 20
    let c = Cluster::start_with(1, 1, &["--user-requests-per-sec", "10"]).await?;
    let many: Vec<String> = (0..149).map(|i| format!("m{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let big = c.create_group("owner", &many).await?;
    let big = big["id"].as_str().context("id")?;
    let presence = || {
        c.http()
            .get(format!("{}/groups/{big}/presence", c.edge_url(0)))
            .bearer_auth(token("m0"))
            .send()
    };
    // 150 members: the call and 15 more; two at once (their costs are
    // taken within a few milliseconds of each other): 20 cannot pay for 32
    let (first, second) = tokio::join!(presence(), presence());
    let mut statuses = [first?.status().as_u16(), second?.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 429], "4 left of 20 after the first");
    // what is left still pays for a plain call
    let (status, _) = c.get(0, "m0", &format!("/groups/{big}")).await?;
    assert_eq!(status, 200);
    // so does creating a group, whose members' room the worker checks one
    // by one: 199 members cost a whole burst, so of two at once one at
    // least is refused
    let more: Vec<String> = (0..199).map(|i| format!("n{i}")).collect();
    let create = || {
        c.http()
            .post(format!("{}/groups", c.edge_url(0)))
            .bearer_auth(token("creator"))
            .json(&json!({"name": "many", "members": more}))
            .send()
    };
    let (first, second) = tokio::join!(create(), create());
    let (first, second) = (first?, second?);
    let refused: Vec<_> = [&first, &second]
        .into_iter()
        .filter(|r| r.status() == 429)
        .collect();
    assert!(
        !refused.is_empty(),
        "{} {}",
        first.status(),
        second.status()
    );
    assert!(
        refused
            .iter()
            .all(|r| r.headers().get("retry-after").is_some())
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mentions_reach_the_members_named_live_on_reconnect_and_in_their_list() -> anyhow::Result<()>
{
    let c = Cluster::start(2, 2).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(1, "bob", "phone").await?;
    let ack = alice
        .send_text(
            &g,
            "m1",
            "hi @bob and @carol, not @mallory nor bob@example.com, and not me: @alice",
        )
        .await?;
    // live
    let live = bob.skip_to("a_mention").await?;
    assert_eq!(
        live["data"],
        json!({"groupId": g, "messageId": ack["messageId"], "seq": ack["seq"],
               "senderId": "alice", "createdAt": ack["createdAt"]})
    );
    // carol was away: her device hears of it when it comes back
    let mut carol = c.connect(0, "carol", "setup").await?;
    let caught = carol.skip_to("a_mention").await?;
    assert_eq!(caught["data"], live["data"]);
    // and it is in their lists, not in anyone else's
    let list = |user: &'static str, query: &'static str| {
        let c = &c;
        async move {
            let (status, body) = c.get(0, user, &format!("/mentions{query}")).await?;
            anyhow::ensure!(status == 200, "{user}: {status} {body}");
            anyhow::Ok(body)
        }
    };
    assert_eq!(list("carol", "").await?["mentions"], json!([live["data"]]));
    for nobody in ["alice", "mallory"] {
        assert_eq!(list(nobody, "").await?, json!({"mentions": []}), "{nobody}");
    }

    // pages, newest first; names no worker holds as members (made up) are
    // checked together, in one read, with any that it does not hold yet
    for i in 2..=4 {
        alice
            .send_text(
                &g,
                &format!("m{i}"),
                &format!("@bob number {i}, not @made-up{i} nor @eve{i}"),
            )
            .await?;
        bob.skip_to("a_mention").await?;
    }
    let first = list("bob", "?limit=2").await?;
    let seqs = |page: &Value| -> Vec<u64> {
        page["mentions"]
            .as_array()
            .map(|m| m.iter().filter_map(|m| m["seq"].as_u64()).collect())
            .unwrap_or_default()
    };
    let top = ack["seq"].as_u64().context("seq")?;
    assert_eq!(seqs(&first), [top + 3, top + 2]);
    let next = first["next"].as_str().context("a next page")?;
    let (status, second) = c
        .get(0, "bob", &format!("/mentions?limit=2&before={next}"))
        .await?;
    assert_eq!(status, 200);
    assert_eq!(seqs(&second), [top + 1, top]);
    let too_long = format!("?before={}", "1".repeat(129));
    for bad in [
        "?before=x",
        "?before=12-not%20an%20id",
        "?limit=0",
        "?other=1",
        &too_long,
    ] {
        let (status, body) = c.get(0, "bob", &format!("/mentions{bad}")).await?;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(body["error"]["code"], "invalid");
    }
    let (_, body) = c.get(0, "bob", &format!("/mentions{too_long}")).await?;
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("longer than a cursor")),
        "refused by the edge: {body}"
    );

    // a member removed is no longer mentioned
    assert_eq!(c.remove_member(0, "alice", &g, "carol").await?, 200);
    // every worker has heard of it once carol's own sends are refused
    // through both, several times over
    let deadline = std::time::Instant::now() + chat_tests::PROMPTLY;
    let mut refused = 0;
    let mut n = 0;
    while refused < 4 {
        n += 1;
        let code = carol
            .request_error(
                "send_group_message",
                json!({"groupId": g, "clientMsgId": format!("c{n}"), "type": "text", "text": "x"}),
            )
            .await
            .unwrap_or_default();
        refused = if code == "forbidden" { refused + 1 } else { 0 };
        anyhow::ensure!(std::time::Instant::now() < deadline, "carol can still send");
    }
    alice
        .send_text_until_ok(&g, "m5", "@carol @bob", chat_tests::PROMPTLY)
        .await?;
    // bob's mention of the same message is told after the batch is written
    let newest = bob.skip_to("a_mention").await?;
    // and her list no longer shows the group she left
    assert_eq!(list("carol", "").await?["mentions"], json!([]));

    // a deleted message's mention is gone from the list
    let (status, before) = c.get(0, "bob", "/mentions?limit=2").await?;
    assert_eq!(status, 200);
    assert_eq!(before["mentions"][0], newest["data"]);
    alice
        .request(
            "delete_group_message",
            json!({"groupId": g, "messageId": newest["data"]["messageId"]}),
        )
        .await?;
    assert_eq!(seqs(&list("bob", "?limit=2").await?), [top + 3]);
    c.stop().await
}

/// A webhook receiver on a free port: answers 503 to the first post, 200
/// to the rest, and hands over each post's headers and body.
async fn webhook_receiver() -> anyhow::Result<(
    String,
    tokio::sync::mpsc::Receiver<(std::collections::HashMap<String, String>, Vec<u8>)>,
)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut posts = 0;
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // headers, then as much body as content-length says
            let (head, body) = loop {
                let Ok(n) = sock.read(&mut chunk).await else {
                    break (None, vec![]);
                };
                if n == 0 {
                    break (None, vec![]);
                }
                buf.extend_from_slice(&chunk[..n]);
                let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                    continue;
                };
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let headers: std::collections::HashMap<String, String> = head
                    .lines()
                    .skip(1)
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
                    .collect();
                let len: usize = headers
                    .get("content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0);
                while buf.len() < end + 4 + len {
                    match sock.read(&mut chunk).await {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => break,
                    }
                }
                break (Some(headers), buf[end + 4..].to_vec());
            };
            let Some(headers) = head else { continue };
            posts += 1;
            let status = if posts == 1 {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            let _ = sock
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
            if posts > 1 && tx.send((headers, body)).await.is_err() {
                return;
            }
        }
    });
    Ok((url, rx))
}

/// Waits until group `g`'s presence, as its owner `alice` reads it,
/// shows each user online or not as `wanted` says.
async fn presence_shows(c: &Cluster, g: &str, wanted: &[(&str, bool)]) -> anyhow::Result<()> {
    for (user, online) in wanted {
        chat_tests::eventually(chat_tests::PROMPTLY, || async {
            let p = presence_of(c, "alice", g, user).await?;
            Ok((p["online"] == *online).then_some(()))
        })
        .await
        .with_context(|| format!("{user} online: {online}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_with_no_connection_are_pushed_ids_only_through_nats_and_a_signed_webhook()
-> anyhow::Result<()> {
    use futures::StreamExt;
    use std::time::Duration;
    const SECRET: &str = "push-webhook-secret-0123456789abcdef";
    let (url, mut posts) = webhook_receiver().await?;
    let c = Cluster::start_with(
        2,
        2,
        &["--push-webhook-url", &url, "--push-webhook-secret", SECRET],
    )
    .await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let bus = c.bus().await?;
    let mut pushes = bus.client().subscribe("chat.push.*").await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let _bob = c.connect(1, "bob", "phone").await?;
    // the workers know who is online once presence says so (and carol,
    // whose setup connection closed, offline: a user's presence changes
    // at most once a second)
    presence_shows(&c, &g, &[("alice", true), ("bob", true), ("carol", false)]).await?;
    // carol, who has no connection, is pushed; alice and bob are not
    let secret_text = "a secret for @carol";
    let deadline = std::time::Instant::now() + chat_tests::PROMPTLY;
    let mut attempt = 0;
    let (ack, event) = loop {
        // a new message each time (the same id would be the first's retry)
        attempt += 1;
        let ack = alice
            .send_text(&g, &format!("p{attempt}"), secret_text)
            .await?;
        let msg = tokio::time::timeout(Duration::from_secs(10), pushes.next())
            .await?
            .context("no push event")?;
        let event: Value = serde_json::from_slice(&msg.payload)?;
        if event["recipients"] == json!(["carol"]) {
            break (ack, event);
        }
        // a worker that had not yet heard bob or alice come online
        anyhow::ensure!(std::time::Instant::now() < deadline, "{event}");
    };
    assert_eq!(
        event,
        json!({"kind": "message", "groupId": g, "messageId": ack["messageId"], "seq": ack["seq"],
               "senderId": "alice", "type": "text", "createdAt": ack["createdAt"],
               "recipients": ["carol"], "mentioned": ["carol"]})
    );
    assert!(
        !String::from_utf8_lossy(&serde_json::to_vec(&event)?).contains("secret"),
        "no content in a push event"
    );
    // the webhook got it too (after a 503: retried), signed
    let (headers, body) = loop {
        let (headers, body) = tokio::time::timeout(Duration::from_secs(30), posts.recv())
            .await?
            .context("receiver gone")?;
        let posted: Value = serde_json::from_slice(&body)?;
        if posted["messageId"] == ack["messageId"] {
            break (headers, body);
        }
    };
    let ts: i64 = headers
        .get("x-chat-timestamp")
        .context("timestamp")?
        .parse()?;
    assert_eq!(
        headers.get("x-chat-signature"),
        Some(&chat_worker::signature(SECRET, ts, &body))
    );
    assert_eq!(serde_json::from_slice::<Value>(&body)?, event);
    c.stop().await
}

/// A member who mutes a group is not pushed its messages, except those
/// that mention it, until it unmutes; `GET /groups` shows the mute; only
/// members may mute, and a bad end is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_muted_group_pushes_only_mentions_until_unmuted() -> anyhow::Result<()> {
    use futures::StreamExt;
    use std::time::Duration;
    let c = Cluster::start_with(1, 1, &["--push"]).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let bus = c.bus().await?;
    let mut pushes = bus.client().subscribe(format!("chat.push.{g}")).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    // bob and carol, whose setup connections closed, offline
    presence_shows(&c, &g, &[("alice", true), ("bob", false), ("carol", false)]).await?;
    let path = format!("/groups/{g}/mute");
    let put = |user: &'static str, body: Value| {
        let path = path.clone();
        let c = &c;
        async move {
            c.call(reqwest::Method::PUT, 0, Some(user), &path, Some(&body))
                .await
        }
    };

    // members only; a bad end is refused
    let (s, e) = put("mallory", json!({})).await?;
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));
    let (s, _) = c
        .call(
            reqwest::Method::PUT,
            0,
            Some("carol"),
            "/groups/00000000000000000000000000000000/mute",
            Some(&json!({})),
        )
        .await?;
    assert_eq!(s, 404);
    let in_20_years =
        chat_protocol::format_millis(chat_domain::now_millis() + 20 * 365 * 24 * 3600 * 1000);
    for body in [
        json!({"until": "2000-01-01T00:00:00Z"}),
        json!({"until": "tomorrow"}),
        json!({"until": in_20_years}),
        json!({"for": 60}),
    ] {
        let (s, e) = put("carol", body.clone()).await?;
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (400, Some("invalid")),
            "{body}: {e}"
        );
    }

    // a body must be JSON, an empty one is none
    let bare = |ct: Option<&'static str>, body: &'static str| {
        let mut req = c
            .http()
            .put(format!("{}{path}", c.edge_url(0)))
            .bearer_auth(token("bob"))
            .body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        async move { anyhow::Ok(req.send().await?.status().as_u16()) }
    };
    assert_eq!(bare(None, "until=never").await?, 400);
    assert_eq!(bare(Some("application/json"), "").await?, 200);
    let (s, _) = c
        .call(reqwest::Method::DELETE, 0, Some("bob"), &path, None)
        .await?;
    assert_eq!(s, 204);
    // carol mutes the group for good (no body: until unmuted)
    let (s, v) = c
        .call(reqwest::Method::PUT, 0, Some("carol"), &path, None)
        .await?;
    assert_eq!((s, &v), (200, &json!({"groupId": g, "muted": true})));
    let listed = |user: &'static str| {
        let c = &c;
        let g = g.clone();
        async move {
            let (_, page) = c.get(0, user, "/groups").await?;
            page["groups"]
                .as_array()
                .and_then(|gs| gs.iter().find(|x| x["id"] == g.as_str()).cloned())
                .context("the group listed")
        }
    };
    let entry = listed("carol").await?;
    assert_eq!(
        (&entry["muted"], entry.get("mutedUntil")),
        (&json!(true), None)
    );
    assert_eq!(listed("bob").await?["muted"], false);

    // the push of a new message of alice's
    async fn next_push(
        alice: &mut Client,
        pushes: &mut async_nats::Subscriber,
        g: &str,
        id: &str,
        text: &str,
    ) -> anyhow::Result<Value> {
        let ack = alice.send_text(g, id, text).await?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), pushes.next())
                .await?
                .context("no push event")?;
            let event: Value = serde_json::from_slice(&msg.payload)?;
            if event["messageId"] == ack["messageId"] {
                return Ok(event);
            }
        }
    }
    // new messages with `text` until one's push names `expected` (a worker
    // may not yet have heard who came and went: then again), `never` named
    // in none of them; ids from `first` on
    async fn push_until(
        alice: &mut Client,
        pushes: &mut async_nats::Subscriber,
        g: &str,
        first: usize,
        text: &str,
        expected: Value,
        never: Option<&str>,
    ) -> anyhow::Result<Value> {
        let deadline = std::time::Instant::now() + chat_tests::PROMPTLY;
        for n in first.. {
            let event = next_push(alice, pushes, g, &format!("p{n}"), text).await?;
            if let Some(never) = never {
                let to = event["recipients"].to_string();
                anyhow::ensure!(!to.contains(never), "{never} was pushed: {event}");
            }
            if event["recipients"] == expected {
                return Ok(event);
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "{event}");
        }
        unreachable!("an endless range")
    }
    // a plain message: bob only
    let (a, p) = (&mut alice, &mut pushes);
    push_until(
        a,
        p,
        &g,
        100,
        "plans for today",
        json!(["bob"]),
        Some("carol"),
    )
    .await?;
    // one that mentions carol reaches her all the same
    let both = json!(["bob", "carol"]);
    let event = push_until(a, p, &g, 200, "@carol are you in?", both.clone(), None).await?;
    assert_eq!(event["mentioned"], json!(["carol"]));
    // unmuted: everything again
    let (s, _) = c
        .call(reqwest::Method::DELETE, 0, Some("carol"), &path, None)
        .await?;
    assert_eq!(s, 204);
    push_until(a, p, &g, 300, "and again", both, None).await?;
    assert_eq!(listed("carol").await?["muted"], false);

    // a mute with an end says when
    let until = chat_protocol::format_millis(chat_domain::now_millis() + 3_600_000);
    let (s, v) = put("bob", json!({ "until": until })).await?;
    assert_eq!((s, &v["mutedUntil"]), (200, &json!(until)));
    assert_eq!(listed("bob").await?["mutedUntil"], json!(until));
    // removed and added again, bob starts unmuted
    let (s, _) = c
        .call(
            reqwest::Method::DELETE,
            0,
            Some("alice"),
            &format!("/groups/{g}/members/bob"),
            None,
        )
        .await?;
    assert_eq!(s, 200);
    // a mute that raced his leaving, written after it
    let store = chat_store::Store::connect(&c.stack.mongo.uri, "chat").await?;
    let gid = chat_domain::GroupId::parse(&g)?;
    let bob = chat_domain::UserId::parse("bob")?;
    store
        .mutes
        .mute(&gid, &bob, chat_store::MUTED_FOREVER)
        .await?;
    let (s, _) = c
        .call(
            reqwest::Method::POST,
            0,
            Some("alice"),
            &format!("/groups/{g}/members"),
            Some(&json!({"userIds": ["bob"]})),
        )
        .await?;
    assert_eq!(s, 200);
    assert_eq!(listed("bob").await?["muted"], false);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_carries_a_preview_of_the_message_it_answers_everywhere() -> anyhow::Result<()> {
    let c = Cluster::start(2, 2).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let other = c.room(&["alice", "carol"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(1, "bob", "phone").await?;
    let long = format!("{} and then some", "word ".repeat(30));
    let first = alice.send_text(&g, "q1", &long).await?;
    bob.messages(1).await?;
    let reply = bob
        .request(
            "send_group_message",
            json!({"groupId": g, "clientMsgId": "a1", "type": "text", "text": "agreed",
                   "replyTo": first["messageId"]}),
        )
        .await?;
    let preview: String = long.chars().take(100).collect::<String>() + "…";
    let expected = json!({"messageId": first["messageId"], "seq": first["seq"],
                          "senderId": "alice", "type": "text", "preview": preview});
    // live, on the other edge (after alice's own first message)
    let live = alice.messages(2).await?;
    assert_eq!(live[1]["messageId"], reply["messageId"]);
    assert_eq!(live[1]["replyTo"], expected);
    // in history
    let history = c.history("alice", &g).await?;
    let stored = history
        .iter()
        .find(|m| m["messageId"] == reply["messageId"])
        .context("the reply in history")?;
    assert_eq!(stored["replyTo"], expected);
    assert!(
        history
            .iter()
            .find(|m| m["messageId"] == first["messageId"])
            .is_some_and(|m| m.get("replyTo").is_none()),
        "a message that answers nothing has no replyTo"
    );
    // the preview is content: not in the clear in the stream
    let bus = c.bus().await?;
    let mut read = 0;
    for seq in 1..=40 {
        if let Ok(raw) = bus.group_stream_message(seq).await {
            read += 1;
            assert!(
                !String::from_utf8_lossy(&raw).contains("word word"),
                "{seq}"
            );
        }
    }
    assert!(read >= 2, "the stream holds both messages");
    let docs = c
        .mongo()
        .await?
        .collection::<mongodb::bson::Document>("messages");
    let all: Vec<mongodb::bson::Document> =
        futures::TryStreamExt::try_collect(docs.find(mongodb::bson::doc! {}).await?).await?;
    assert!(
        !format!("{all:?}").contains("word word"),
        "plaintext at rest"
    );

    // answers only to messages of the group the sender can see
    let elsewhere = alice.send_text(&other, "o1", "elsewhere").await?;
    for (i, target) in [
        json!(elsewhere["messageId"]),
        json!("0192f3a45b6c7d8e9f0123456789abcd"),
    ]
    .into_iter()
    .enumerate()
    {
        let code = bob
            .request_error(
                "send_group_message",
                json!({"groupId": g, "clientMsgId": format!("bad{i}"),
                       "type": "text", "text": "?", "replyTo": target}),
            )
            .await?;
        assert_eq!(code, "not_found", "{target}");
    }
    let code = bob
        .request_error(
            "send_group_message",
            json!({"groupId": g, "clientMsgId": "bad-id", "type": "text", "text": "?",
                   "replyTo": "not an id"}),
        )
        .await?;
    assert_eq!(code, "invalid");

    // `joined` history: no preview, and a member who joined after the
    // answered message does not see what it answers
    let j = c.group_with_history("alice", &["bob"], "joined").await?;
    for (user, edge) in [("alice", 0), ("bob", 1)] {
        let mut ws = c.connect(edge, user, "sub").await?;
        ws.request("subscribe_to_group", json!({"groupId": j}))
            .await?;
        ws.close().await?;
    }
    let old = alice.send_text(&j, "j1", "before carol").await?;
    assert_eq!(c.add_members("alice", &j, &["carol"]).await?, 200);
    // carol follows it on a device away during the answer (it catches up
    // on it) and on one online; bob too, online
    let mut away = c.connect(1, "carol", "away").await?;
    away.request("subscribe_to_group", json!({"groupId": j}))
        .await?;
    away.close().await?;
    let mut carol_online = c.connect(0, "carol", "online").await?;
    let mut bob_online = c.connect(1, "bob", "online").await?;
    let answer = bob
        .request(
            "send_group_message",
            json!({"groupId": j, "clientMsgId": "j2", "type": "text", "text": "late answer",
                   "replyTo": old["messageId"]}),
        )
        .await?;
    let ids_only = json!({"messageId": old["messageId"], "seq": old["seq"], "senderId": "alice", "type": "text"});
    let live = bob_online.message_with(&answer["messageId"]).await?;
    assert_eq!(live["replyTo"], ids_only, "bob saw the answered message");
    let mut away = c.connect(1, "carol", "away").await?;
    for (how, ws) in [("live", &mut carol_online), ("on reconnect", &mut away)] {
        let m = ws.message_with(&answer["messageId"]).await?;
        assert_eq!(m["text"], "late answer", "{how}: {m}");
        assert_eq!(
            m.get("replyTo"),
            None,
            "{how}: carol learns what it answers"
        );
    }
    let for_bob = c.history("bob", &j).await?;
    let reply = for_bob
        .iter()
        .find(|m| m["messageId"] == answer["messageId"])
        .context("reply in bob's history")?;
    assert_eq!(reply["replyTo"], ids_only, "ids only under joined history");
    let for_carol = c.history("carol", &j).await?;
    let reply = for_carol
        .iter()
        .find(|m| m["messageId"] == answer["messageId"])
        .context("reply in carol's history")?;
    assert_eq!(
        reply.get("replyTo"),
        None,
        "carol cannot see what it answers"
    );
    assert!(for_carol.iter().all(|m| m["messageId"] != old["messageId"]));
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reactions_are_counted_per_emoji_live_and_in_history_within_limits() -> anyhow::Result<()> {
    let c = Cluster::start(2, 2).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(1, "bob", "phone").await?;
    let mut carol = c.connect(1, "carol", "web").await?;
    let mut mallory = c.connect(0, "mallory", "web").await?;
    let m = alice.send_text(&g, "m1", "react to me").await?;
    let id = m["messageId"].clone();
    let react = |emoji: &str| json!({"groupId": g, "messageId": id, "emoji": emoji});

    let ack = bob.request("add_reaction", react("👍")).await?;
    assert_eq!(
        ack,
        json!({"groupId": g, "messageId": id, "emoji": "👍", "count": 1, "reacted": true})
    );
    // every connected member hears it, on both edges
    let heard = alice.skip_to("a_reaction").await?;
    assert_eq!(
        heard["data"],
        json!({"groupId": g, "messageId": id, "seq": m["seq"], "emoji": "👍",
               "userId": "bob", "added": true, "count": 1})
    );
    assert_eq!(carol.skip_to("a_reaction").await?["data"], heard["data"]);
    assert_eq!(
        alice.request("add_reaction", react("👍")).await?["count"],
        2
    );
    // again: nothing changes
    assert_eq!(bob.request("add_reaction", react("👍")).await?["count"], 2);

    let reactions_of = |user: &'static str| {
        let (c, g, id) = (&c, g.clone(), id.clone());
        async move {
            let page = c.history(user, &g).await?;
            let m = page
                .into_iter()
                .find(|m| m["messageId"] == id)
                .context("in history")?;
            anyhow::Ok(m["reactions"].clone())
        }
    };
    assert_eq!(
        reactions_of("bob").await?,
        json!([{"emoji": "👍", "count": 2, "reacted": true}])
    );
    assert_eq!(
        reactions_of("carol").await?,
        json!([{"emoji": "👍", "count": 2, "reacted": false}])
    );
    let ack = bob.request("remove_reaction", react("👍")).await?;
    assert_eq!(
        (ack["count"].clone(), ack["reacted"].clone()),
        (json!(1), json!(false))
    );
    assert_eq!(
        reactions_of("bob").await?,
        json!([{"emoji": "👍", "count": 1, "reacted": false}])
    );

    // limits: 10 per member, 20 different per message
    let emoji: Vec<String> = (0..21u32)
        .map(|i| {
            char::from_u32(0x1F600 + i)
                .map(String::from)
                .unwrap_or_default()
        })
        .collect();
    for e in &emoji[..10] {
        bob.request("add_reaction", react(e)).await?;
    }
    assert_eq!(
        bob.request_error("add_reaction", react(&emoji[10])).await?,
        "too_large"
    );
    // alice has 👍; nine more of hers make 20 different on the message
    for e in &emoji[10..19] {
        alice.request("add_reaction", react(e)).await?;
    }
    assert_eq!(
        carol
            .request_error("add_reaction", react(&emoji[20]))
            .await?,
        "too_large"
    );
    // an emoji already there still takes one more member
    assert_eq!(
        carol.request("add_reaction", react("👍")).await?["count"],
        2
    );

    // bad input and outsiders
    for bad in ["+1", "", " ", "👍👍👍👍👍👍👍👍👍"] {
        assert_eq!(
            bob.request_error("add_reaction", react(bad)).await?,
            "invalid",
            "{bad:?}"
        );
    }
    let unknown =
        json!({"groupId": g, "messageId": "0192f3a45b6c7d8e9f0123456789abcd", "emoji": "👍"});
    assert_eq!(
        bob.request_error("add_reaction", unknown).await?,
        "not_found"
    );
    assert_eq!(
        mallory.request_error("add_reaction", react("👍")).await?,
        "forbidden"
    );
    c.stop().await
}

/// A cluster with `flags` (and no request rate limit), a group of alice and
/// bob, and both connected to an edge process of its own (its metrics count
/// their connections only).
async fn alice_and_bob_on_an_edge(
    flags: &[&str],
) -> anyhow::Result<(Cluster, String, Process, Client, Client)> {
    let flags: Vec<&str> = flags
        .iter()
        .copied()
        .chain(["--requests-per-sec", "100000"])
        .collect();
    let c = Cluster::start_with(1, 1, &flags).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let edge = c.spawn_process("edge").await?;
    let bob = c.connect_to(&edge, "bob", "laptop").await?;
    let alice = c.connect_to(&edge, "alice", "phone").await?;
    Ok((c, g, edge, alice, bob))
}

/// Sends message number `acked.len()` (`m<i>`) and records its seq.
async fn send_next(alice: &mut Client, g: &str, acked: &mut Vec<Value>) -> anyhow::Result<()> {
    let i = acked.len();
    let ack = alice
        .send_text(g, &format!("c{i}"), &format!("m{i}"))
        .await?;
    acked.push(ack["seq"].clone());
    Ok(())
}

/// What `bob` receives for `acked`: each once, in order.
async fn got_in_order(bob: &mut Client, acked: &[Value]) -> anyhow::Result<Vec<Value>> {
    let got = bob.messages(acked.len()).await?;
    let seqs: Vec<Value> = got.iter().map(|m| m["seq"].clone()).collect();
    assert_eq!(seqs, acked, "every message once, in order");
    Ok(got)
}

/// Over its write budget an edge stretches the window its busy
/// connections gather frames in (here to the most, five windows, since two
/// connections over a budget of one write a second want two seconds): a
/// message every 30 ms, too slow to make a connection busy with the
/// configured 10 ms window, makes it busy with the stretched 50 ms one, so
/// writes wait for it; every message still arrives once, in order, and
/// with the load gone the window is the configured one again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_write_budget_the_window_stretches_and_nothing_is_lost() -> anyhow::Result<()> {
    let (c, g, edge, mut alice, mut bob) =
        alice_and_bob_on_an_edge(&["--ws-write-coalesce-ms", "10", "--ws-write-budget", "1"])
            .await?;
    let mut acked = Vec::new();
    // the pace of the load, not a wait for anything
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(30));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if acked.len() % 10 == 0
            && edge.metric("chat_ws_write_window_seconds").await? >= 0.050
            && edge.metric("chat_ws_coalesced_flushes_total").await? > 0.0
        {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no write waited for a stretched window after {} messages",
            acked.len()
        );
        pace.tick().await;
        send_next(&mut alice, &g, &mut acked).await?;
    }
    got_in_order(&mut bob, &acked).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while (edge.metric("chat_ws_write_window_seconds").await? - 0.010).abs() > 1e-9 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the window stayed stretched with nothing sent"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    c.stop().await
}

/// A busy connection's frames gather for up to `--ws-write-coalesce-ms`
/// and go out in one write: alice sends until bob's connection is busy and
/// a write of his waited for its window, then every message has arrived,
/// in order, the last ones without waiting for more to come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_gets_everything_in_order_with_coalesced_writes() -> anyhow::Result<()> {
    const BATCH: usize = 50;
    let (c, g, edge, mut alice, mut bob) =
        alice_and_bob_on_an_edge(&["--ws-write-coalesce-ms", "50"]).await?;
    let mut acked = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while edge.metric("chat_ws_coalesced_flushes_total").await? == 0.0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no write waited for its window after {} messages",
            acked.len()
        );
        for _ in 0..BATCH {
            send_next(&mut alice, &g, &mut acked).await?;
        }
    }
    // the last frames go out when the window ends, not with a later frame
    let got = got_in_order(&mut bob, &acked).await?;
    let n = acked.len();
    assert_eq!(got[n - 1]["text"], format!("m{}", n - 1));
    c.stop().await
}
