//! Text messages (seed §2): ordered, gapless, delivered live and offline,
//! idempotent, encrypted at rest, rolled back on failure, with receipts.

use std::{collections::HashSet, time::Duration};

use chat_rpc::Signed;
use chat_tests::{Client, Cluster, PROMPTLY, eventually};
use mongodb::bson::{Document, doc};
use serde_json::{Value, json};
use tonic::transport::Channel;

fn seqs(messages: &[Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["seq"].as_u64().unwrap_or(0))
        .collect()
}

fn ids(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["messageId"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_are_ordered_everywhere_and_offline_members_catch_up()
-> anyhow::Result<()> {
    let c = Cluster::start(2, 2).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let alice = c.connect(0, "alice", "setup").await?;
    let bob = c.connect(1, "bob", "setup").await?;
    // carol is offline from here on

    const EACH: usize = 25;
    let send_all = |mut client: Client, who: &'static str, g: String| async move {
        for i in 0..EACH {
            client
                .send_text(&g, &format!("{who}-{i}"), &format!("{who} says {i}"))
                .await?;
        }
        anyhow::Ok(client)
    };
    let (a, b) = tokio::join!(
        send_all(alice, "alice", g.clone()),
        send_all(bob, "bob", g.clone())
    );
    let (mut alice, mut bob) = (a?, b?);

    let at_alice = alice.messages(2 * EACH).await?;
    let at_bob = bob.messages(2 * EACH).await?;
    let expected: Vec<u64> = (1..=(2 * EACH) as u64).collect();
    assert_eq!(seqs(&at_alice), expected, "gapless and in order at alice");
    assert_eq!(seqs(&at_bob), expected, "gapless and in order at bob");
    assert_eq!(ids(&at_alice), ids(&at_bob), "the same order everywhere");
    assert!(
        at_bob.iter().any(|m| m["text"] == "alice says 24")
            && at_bob.iter().any(|m| m["senderId"] == "bob")
    );

    // carol reconnects, on either edge, and gets exactly what she missed
    let mut carol = c.connect(0, "carol", "setup").await?;
    let missed = carol.messages(2 * EACH).await?;
    assert_eq!(ids(&missed), ids(&at_bob));
    // then nothing twice: the next message is the next seq
    alice.send_text(&g, "marker", "marker").await?;
    let next = carol.messages(1).await?;
    assert_eq!(
        (next[0]["seq"].as_u64(), next[0]["text"].as_str()),
        (Some(2 * EACH as u64 + 1), Some("marker"))
    );

    // history agrees, newest first, decrypted
    let history = c.history("carol", &g).await?;
    assert_eq!(history.len(), 2 * EACH + 1);
    let mut oldest_first: Vec<Value> = history.into_iter().rev().collect();
    let marker = oldest_first.pop().expect("marker");
    assert_eq!(marker["text"], "marker");
    assert_eq!(ids(&oldest_first), ids(&at_bob));
    assert_eq!(
        oldest_first, at_bob,
        "history shows exactly what was delivered"
    );
    // pages are capped at 100 however many are asked for
    for i in 0..60 {
        alice.send_text(&g, &format!("more{i}"), "more").await?;
    }
    let (_, page) = c
        .get(0, "bob", &format!("/groups/{g}/messages?limit=1000"))
        .await?;
    assert_eq!(page["messages"].as_array().map(Vec::len), Some(100));
    // paging
    let (_, page) = c
        .get(0, "bob", &format!("/groups/{g}/messages?before=10&limit=3"))
        .await?;
    assert_eq!(
        seqs(page["messages"].as_array().expect("messages")),
        [9, 8, 7]
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_of_a_user_receives_every_message() -> anyhow::Result<()> {
    let c = Cluster::start(2, 1).await?;
    // both devices exist before bob subscribes from one of them
    let mut phone = c.connect(0, "bob", "phone").await?;
    let mut laptop = c.connect(1, "bob", "laptop").await?;
    let g = c.create_group("alice", &["bob"]).await?;
    let g = g["id"].as_str().expect("id").to_owned();
    phone
        .request("subscribe_to_group", json!({ "groupId": g }))
        .await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    for i in 0..5 {
        alice
            .send_text(&g, &format!("m{i}"), &format!("hello {i}"))
            .await?;
    }
    assert_eq!(seqs(&phone.messages(5).await?), [1, 2, 3, 4, 5]);
    assert_eq!(seqs(&laptop.messages(5).await?), [1, 2, 3, 4, 5]);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_creates_one_message_even_across_edges() -> anyhow::Result<()> {
    let mut c = Cluster::start(2, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut bob = c.connect(0, "bob", "setup").await?;
    let mut a0 = c.connect(0, "alice", "one").await?;
    let mut a1 = c.connect(1, "alice", "two").await?;
    let first = a0.send_text(&g, "same-id", "once").await?;
    let again = a1.send_text(&g, "same-id", "once").await?;
    assert_eq!(first, again, "the retry gets the original ack");
    // also after the worker and an edge restart
    c.restart_worker(0).await?;
    c.restart_edge(1).await?;
    let mut a1 = c.connect(1, "alice", "two").await?;
    assert_eq!(a1.send_text(&g, "same-id", "once").await?, first);
    // another sender may use the same client id
    bob.send_text(&g, "same-id", "bob's own").await?;
    let got = bob.messages(2).await?;
    assert_eq!(seqs(&got), [1, 2]);
    assert_eq!(got[1]["senderId"], "bob");
    assert_eq!(c.history("bob", &g).await?.len(), 2);
    c.stop().await
}

/// A client id that is a UUID v7 minted `ago` before now.
fn v7_minted_ago(ago: Duration) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    let ms = now.map_or(0, |d| d.saturating_sub(ago).as_millis() as u64);
    let hex = format!("{ms:012x}");
    format!("{}-{}-7abc-8def-0123456789ab", &hex[..8], &hex[8..12])
}

/// The send log keeps the entry of a UUID v7 client id only minutes past its
/// minting (nats-server holds every entry in memory): a retry after that
/// is answered from MongoDB, with the original ack and nothing created; and
/// with MongoDB down, `unavailable` rather than a second message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_its_send_log_entry_expired_is_answered_from_history() -> anyhow::Result<()> {
    let mut c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let ops = &c.stack.nats.users.ops;
    let nats =
        async_nats::ConnectOptions::with_user_and_password(ops.user.into(), ops.password.clone())
            .connect(&c.stack.nats.url)
            .await?;
    let js = async_nats::jetstream::new(nats);
    let log = js.get_stream("KV_CHAT_SENDS").await?;
    let subject = |client: &str| format!("$KV.CHAT_SENDS.{g}.alice.{client}");
    let ttl = |client: String| {
        let (log, subject) = (log.clone(), subject(&client));
        async move {
            let entry = log.get_last_raw_message_by_subject(&subject).await?;
            anyhow::Ok(entry.headers.get("Nats-TTL").map(|v| v.as_str().to_owned()))
        }
    };

    // a freshly minted id: its entry lives the short window (15 min)
    let fresh = chat_domain::ClientMsgId::generate().into_string();
    alice.send_text(&g, &fresh, "fresh").await?;
    assert_eq!(ttl(fresh).await?.as_deref(), Some("900"));
    // an id that does not say when it was minted: the whole window
    alice.send_text(&g, "legacy-1", "legacy").await?;
    assert_eq!(ttl("legacy-1".into()).await?, None);

    // an id minted two hours ago (sent late, or a clock behind): the log
    // cannot vouch for it, so MongoDB is asked too; it is new
    let late = v7_minted_ago(Duration::from_secs(2 * 3600));
    let checks =
        |outcome: &str| format!("chat_send_log_history_checks_total{{outcome=\"{outcome}\"}}");
    // (`unavailable` until the worker has read the persist backlog once)
    let first = alice
        .send_text_until_ok(&g, &late, "late", PROMPTLY)
        .await?;
    assert_eq!(first["seq"].as_u64(), Some(3));
    assert!(
        c.metric(0, &checks("new")).await? >= 1.0,
        "MongoDB was not asked"
    );
    assert_eq!(ttl(late.clone()).await?.as_deref(), Some("900"));
    c.mongo_settled(&g, 3).await?;

    // its entry expires (as nats-server removes it when its TTL is up): the
    // retry finds the message in MongoDB and gets the original ack
    log.purge().filter(subject(&late)).await?;
    assert_eq!(alice.send_text(&g, &late, "late").await?, first);
    assert!(c.metric(0, &checks("sent")).await? >= 1.0);
    // the entry points at it again: the next retry is the log's to answer
    assert!(
        log.get_last_raw_message_by_subject(&subject(&late))
            .await
            .is_ok()
    );
    assert_eq!(alice.send_text(&g, &late, "late").await?, first);

    // an entry left naming an attempt that never went out (a late retry
    // that failed after its claim): the next retry finds that attempt lost,
    // and asks MongoDB before it would publish it
    log.purge().filter(subject(&late)).await?;
    let stale = json!({
        "messageId": chat_domain::MessageId::generate().to_string(),
        "afterStreamSeq": 0,
        "at": chat_domain::now_millis() - 120_000,
    });
    js.publish(subject(&late), stale.to_string().into())
        .await?
        .await?;
    // (`unavailable` until the worker has been connected for the settle
    // delay: a publish buffered through a disconnect could still land)
    let answered = alice
        .send_text_until_ok(&g, &late, "late", PROMPTLY)
        .await?;
    assert_eq!(answered, first);

    // with MongoDB down, an expired entry leaves the worker unable to tell:
    // `unavailable`, never a second message; the answer comes once it is back
    log.purge().filter(subject(&late)).await?;
    c.stack.mongo.kill();
    let refused = alice.send_text(&g, &late, "late").await;
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.to_string().contains("unavailable")),
        "{refused:?}"
    );
    c.stack.mongo.restart().await?;
    let after = alice
        .send_text_until_ok(&g, &late, "late", PROMPTLY)
        .await?;
    assert_eq!(after, first);
    let history = c.history("bob", &g).await?;
    assert_eq!(seqs(&history), [3, 2, 1], "one message per client id");
    c.stop().await
}

/// What the send log holds is on the workers' `/metrics`, with which sends
/// keep their entry the whole window (ids that do not say when they were
/// minted): nats-server holds every key in memory, and an operator needs
/// to see it grow before it fills a node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_send_logs_size_and_long_lived_entries_are_measured() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    // a worker of its own: its registry counts only these sends
    let worker = c.spawn_process("worker").await?;
    let channel = chat_tests::signed_channel(&format!("http://{}", worker.grpc)).await?;
    const N: usize = 3;
    for n in 0..N {
        send_to_worker(channel.clone(), "alice", g.clone(), n).await?;
    }
    // a retry adds no entry
    send_to_worker(channel.clone(), "alice", g.clone(), 0).await?;
    let window = worker
        .metric("chat_send_log_entries_total{lifetime=\"window\"}")
        .await?;
    assert_eq!(window, N as f64);
    assert_eq!(
        worker
            .metric("chat_send_log_entries_total{lifetime=\"short\"}")
            .await?,
        0.0
    );
    // read every few seconds: one key per send
    eventually(PROMPTLY, || async {
        let keys = worker
            .metric("chat_bucket_keys{bucket=\"CHAT_SENDS\"}")
            .await?;
        let bytes = worker
            .metric("chat_bucket_bytes{bucket=\"CHAT_SENDS\"}")
            .await?;
        Ok((keys == N as f64 && bytes > 0.0).then_some(()))
    })
    .await?;
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_is_never_stored_in_plaintext_and_rotated_keys_still_decrypt() -> anyhow::Result<()>
{
    let mut c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let secret = "the-plaintext-canary-4711";
    alice.send_text(&g, "c1", secret).await?;

    let db = c.mongo().await?;
    // written behind the stream: wait for it
    let docs: Vec<Document> = eventually(PROMPTLY, || async {
        use futures::TryStreamExt;
        let docs: Vec<Document> = db
            .collection::<Document>("messages")
            .find(doc! {})
            .await?
            .try_collect()
            .await?;
        Ok((!docs.is_empty()).then_some(docs))
    })
    .await?;
    assert_eq!(docs.len(), 1);
    let raw = mongodb::bson::to_vec(&docs[0])?;
    assert!(
        !raw.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "plaintext in MongoDB"
    );
    assert_eq!(docs[0].get_str("keyId")?, "t1");
    let stream_seq = docs[0].get_i64("streamSeq")? as u64;
    let payload = c.bus().await?.group_stream_message(stream_seq).await?;
    assert!(
        !payload
            .windows(secret.len())
            .any(|w| w == secret.as_bytes()),
        "plaintext in JetStream"
    );
    assert!(std::str::from_utf8(&payload)?.contains("ciphertext"));

    // rotate: a new first key; the old one stays for decryption
    let new_key = chat_crypto::KeyRing::generate_entry("t2");
    c.keys = format!("{new_key},{}", chat_tests::KEY);
    c.restart_worker(0).await?;
    c.restart_edge(0).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    alice.send_text(&g, "c2", "after rotation").await?;
    let stored = eventually(PROMPTLY, || async {
        Ok(db
            .collection::<Document>("messages")
            .find_one(doc! { "clientMsgId": "c2" })
            .await?)
    })
    .await?;
    assert_eq!(stored.get_str("keyId")?, "t2");
    let history = c.history("bob", &g).await?;
    let texts: Vec<&str> = history.iter().filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts, ["after rotation", secret]);
    // and both are delivered decrypted
    let mut bob = c.connect(0, "bob", "setup").await?;
    let got = bob.messages(2).await?;
    assert_eq!(got[0]["text"], secret);
    assert_eq!(got[1]["text"], "after rotation");
    // the operator's question before dropping t1: what does it still seal?
    let usage =
        chat_tests::chatd_command(&["key-usage", "--mongodb-uri", &c.stack.mongo.uri]).await?;
    assert_eq!(usage, "t1 1\nt2 1\n");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_gives_unavailable_and_history_and_delivery_agree_after() -> anyhow::Result<()> {
    let mut c = Cluster::start_with(1, 1, &["--rpc-timeout-ms", "8000"]).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(0, "bob", "setup").await?;
    alice.send_text(&g, "before", "before").await?;

    c.stack.nats.kill();
    let code = alice
        .request_error(
            "send_group_message",
            json!({"groupId": g, "clientMsgId": "during", "type": "text", "text": "during"}),
        )
        .await?;
    assert_eq!(code, "unavailable");
    c.stack.nats.restart().await?;

    // sends work again once the nodes have reconnected
    alice
        .send_text_until_ok(&g, "after", "after", PROMPTLY * 3)
        .await?;
    // the uncertain message is in history if and only if it is in the stream
    let history = c.history("bob", &g).await?;
    let in_history: Vec<String> = ids(&history).into_iter().rev().collect();
    let delivered = bob.messages(in_history.len()).await?;
    assert_eq!(ids(&delivered), in_history, "delivery and history agree");
    assert_eq!(
        seqs(&delivered),
        (1..=in_history.len() as u64).collect::<Vec<_>>()
    );
    // nothing more was delivered than history shows
    alice.send_text(&g, "marker", "marker").await?;
    assert_eq!(bob.messages(1).await?[0]["text"], "marker");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_down_still_acknowledges_and_delivers_and_history_catches_up() -> anyhow::Result<()>
{
    let mut c = Cluster::start_with(1, 1, &["--rpc-timeout-ms", "15000"]).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(0, "bob", "setup").await?;
    let before = alice.send_text(&g, "before", "before").await?;
    assert_eq!(bob.messages(1).await?[0]["text"], "before");
    c.mongo_settled(&g, 1).await?;

    // the stream is the write-ahead log: with MongoDB gone, sends are still
    // acknowledged (membership from the worker's cache) and delivered
    c.stack.mongo.kill();
    let during = alice.send_text(&g, "during", "during").await?;
    assert_eq!(during["seq"], 2);
    let got = bob.messages(1).await?;
    assert_eq!(
        (got[0]["text"].as_str(), got[0]["seq"].as_u64()),
        (Some("during"), Some(2))
    );
    // a retry finds its first attempt in the stream
    assert_eq!(alice.send_text(&g, "during", "during").await?, during);
    assert_eq!(alice.send_text(&g, "before", "before").await?, before);
    // what needs MongoDB says so
    let (status, body) = c.get(0, "bob", &format!("/groups/{g}/messages")).await?;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("unavailable")),
        "{body}"
    );

    c.stack.mongo.restart().await?;
    alice.send_text(&g, "after", "after").await?;
    // nothing acknowledged is missing once persistence has caught up, and
    // history reads its own writes (a read answers 503 while the worker's
    // driver finds the restarted server again)
    let texts: Vec<String> = eventually(3 * PROMPTLY, || async {
        Ok(c.history("bob", &g).await.ok())
    })
    .await?
    .iter()
    .filter_map(|m| m["text"].as_str().map(String::from))
    .collect();
    assert_eq!(texts, ["after", "during", "before"]);
    c.stop().await
}

/// With MongoDB down the stream holds everything acknowledged, and past
/// its byte limit nats-server would discard the oldest messages, the
/// unpersisted among them. Workers refuse new messages (`unavailable`,
/// nothing stored) before that: nothing acknowledged is discarded, history
/// has all of it once MongoDB is back, and sends are taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_message_log_refuses_sends_rather_than_discard_unpersisted_ones()
-> anyhow::Result<()> {
    const LOG_BYTES: i64 = 1 << 20;
    let mut c = Cluster::start_with(
        1,
        1,
        &[
            "--rpc-timeout-ms",
            "15000",
            "--nats-groups-max-bytes",
            &LOG_BYTES.to_string(),
            "--requests-per-sec",
            "100000",
        ],
    )
    .await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    alice.send_text(&g, "first", "first").await?;
    c.mongo_settled(&g, 1).await?;
    c.stack.mongo.kill();

    // 1 KiB texts until one is refused: about 500 fit below the mark
    let text = "x".repeat(1024);
    let mut acked: u64 = 1;
    let refused = loop {
        anyhow::ensure!(acked < 2_000, "the log never filled");
        match alice
            .request(
                "send_group_message",
                json!({"groupId": g, "clientMsgId": format!("m{acked}"), "type": "text", "text": text}),
            )
            .await
        {
            Ok(_) => acked += 1,
            Err(e) => break e.to_string(),
        }
    };
    assert!(refused.contains("unavailable"), "{refused}");
    assert!(acked > 100, "refused after {acked} only");
    // refused for the log's room (no other test fills a log, so the
    // process-wide counter is this test's)
    let refusals = c.metric(0, "chat_sends_refused_log_full_total").await?;
    assert!(refusals >= 1.0, "not refused for the log's room: {refused}");
    // nothing was discarded: the stream still starts at its first message
    let ops = &c.stack.nats.users.ops;
    let nats =
        async_nats::ConnectOptions::with_user_and_password(ops.user.into(), ops.password.clone())
            .connect(&c.stack.nats.url)
            .await?;
    let mut stream = async_nats::jetstream::new(nats)
        .get_stream("CHAT_GROUPS")
        .await?;
    let state = stream.info().await?.state.clone();
    assert_eq!(state.first_sequence, 1, "{state:?}");

    c.stack.mongo.restart().await?;
    // every acknowledged message reaches MongoDB
    c.mongo_settled(&g, acked).await?;
    let newest = c.history("bob", &g).await?;
    assert_eq!(newest.first().and_then(|m| m["seq"].as_u64()), Some(acked));
    // persistence caught up: sends are taken again
    let again = alice
        .send_text_until_ok(&g, "again", "again", PROMPTLY)
        .await?;
    assert_eq!(again["seq"].as_u64(), Some(acked + 1));
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_mark_delivered_and_read_and_reach_the_sender() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(0, "bob", "setup").await?;
    let sent = alice.send_text(&g, "m1", "hi").await?;
    let mid = sent["messageId"].as_str().expect("id").to_owned();
    bob.messages(1).await?;

    let status_path = format!("/groups/{g}/messages/{mid}/status");
    let member = |body: &Value, who: &str| -> (bool, bool) {
        let m = body["members"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["userId"] == who))
            .cloned()
            .unwrap_or_default();
        (
            m["delivered"].as_bool().unwrap_or(false),
            m["read"].as_bool().unwrap_or(false),
        )
    };
    // delivery to bob's connection marks it delivered (reported in batches)
    let body = eventually(PROMPTLY, || async {
        let (_, body) = c.get(0, "alice", &status_path).await?;
        Ok((member(&body, "bob") == (true, false)).then_some(body))
    })
    .await?;
    assert_eq!(member(&body, "carol"), (false, false), "carol is offline");
    assert_eq!(
        member(&body, "alice"),
        (true, true),
        "the sender has her own message"
    );

    let ack = bob
        .request(
            "acknowledge_group_message",
            json!({ "groupId": g, "messageId": mid }),
        )
        .await?;
    assert_eq!(ack["readSeq"], 1);
    let (_, body) = c.get(0, "bob", &status_path).await?;
    assert_eq!(member(&body, "bob"), (true, true));

    // alice hears of both changes as watermarks
    let mut seen = HashSet::new();
    while !seen.contains(&(1, 1)) {
        let s = alice.skip_to("a_message_status").await?;
        assert_eq!(
            (s["data"]["groupId"].as_str(), s["data"]["userId"].as_str()),
            (Some(g.as_str()), Some("bob"))
        );
        seen.insert((
            s["data"]["deliveredSeq"].as_u64().unwrap_or(0),
            s["data"]["readSeq"].as_u64().unwrap_or(0),
        ));
    }

    // non-members can do none of it
    let mut mallory = c.connect(0, "mallory", "x").await?;
    let code = mallory
        .request_error(
            "send_group_message",
            json!({"groupId": g, "clientMsgId": "x", "type": "text", "text": "hi"}),
        )
        .await?;
    assert_eq!(code, "forbidden");
    assert_eq!(
        mallory
            .request_error(
                "acknowledge_group_message",
                json!({"groupId": g, "messageId": mid})
            )
            .await?,
        "forbidden"
    );
    assert_eq!(
        c.get(0, "mallory", &format!("/groups/{g}/messages"))
            .await?
            .0,
        403
    );
    assert_eq!(c.get(0, "mallory", &status_path).await?.0, 403);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_precise_errors_and_the_socket_stays() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice"]).await?;
    let mut ws = c.connect(0, "alice", "web").await?;
    let send = |text: Value, kind: &str, client: &str| json!({"groupId": g, "clientMsgId": client, "type": kind, "text": text});
    let cases = [
        (
            send(json!("x".repeat(16 * 1024 + 1)), "text", "a"),
            "too_large",
        ),
        (send(json!(""), "text", "b"), "invalid"),
        (send(json!("  "), "text", "b2"), "invalid"),
        (send(json!("hi"), "sticker", "c"), "invalid"),
        (send(json!("hi"), "text", "bad.id"), "invalid"),
        (
            json!({"groupId": g, "type": "text", "text": "no client id"}),
            "invalid",
        ),
        (
            json!({"groupId": "0123456789abcdef0123456789abcdef", "clientMsgId": "d", "type": "text", "text": "x"}),
            "not_found",
        ),
    ];
    for (data, code) in cases {
        assert_eq!(
            ws.request_error("send_group_message", data.clone()).await?,
            code,
            "{data}"
        );
    }
    // exactly at the limit is fine, and the socket kept working throughout
    let ok = ws.send_text(&g, "e", &"é".repeat(8 * 1024)).await?;
    assert_eq!(ok["seq"], 1);
    let (status, _) = c
        .get(0, "alice", &format!("/groups/{g}/messages?limit=0"))
        .await?;
    assert_eq!(status, 400);
    let (status, _) = c
        .get(0, "alice", &format!("/groups/{g}/messages?limit=x"))
        .await?;
    assert_eq!(status, 400);
    c.stop().await
}

/// Group commit: sends to one group that arrive while a publish of it is
/// under way go out together, as one JetStream atomic batch. Two worker
/// processes batch at once for one group: every send is acknowledged once,
/// the seqs are 1..=N with no gap or repeat, the stream holds the messages
/// in seq order, and each opens to the text that was sent (sealed for the
/// seq it got in its batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_queued_for_a_group_commit_together_gapless_across_two_workers() -> anyhow::Result<()>
{
    use futures::TryStreamExt;
    // batches on a one-replica stream too (by default only replicated ones)
    let c = Cluster::start_with(1, 1, &["--publish-batch-max", "64"]).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let workers = [
        c.spawn_process("worker").await?,
        c.spawn_process("worker").await?,
    ];
    let mut channels = Vec::new();
    for w in &workers {
        let url = format!("http://{}", w.grpc);
        channels.push(chat_tests::signed_channel(&url).await?);
    }
    let send = |channel: Signed<Channel>, who: &'static str, n: usize| {
        send_to_worker(channel, who, g.clone(), n)
    };
    const BURST: usize = 40;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut acks = Vec::new();
    loop {
        let from = acks.len();
        let burst = (from..from + BURST).flat_map(|n| {
            [
                send(channels[0].clone(), "alice", n),
                send(channels[1].clone(), "bob", n),
            ]
        });
        for sent in futures::future::join_all(burst).await {
            acks.push(sent?);
        }
        if batched(&workers[0]).await? && batched(&workers[1]).await? {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no batch of more than one message in 60 s"
        );
    }
    for w in &workers {
        let refused = w.metric("chat_publish_batches_refused_total").await?;
        assert_eq!(refused, 0.0, "every batch went out as one");
    }
    let n = acks.len() as u64;
    let mut seqs: Vec<u64> = acks.iter().map(|(a, _)| a.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "gapless, none twice");
    let ids: HashSet<&str> = acks.iter().map(|(a, _)| a.message_id.as_str()).collect();
    assert_eq!(ids.len() as u64, n, "one message per send");

    // the stream (and MongoDB behind it) in seq order
    c.mongo_settled(&g, n).await?;
    let docs: Vec<Document> = c
        .mongo()
        .await?
        .collection::<Document>("messages")
        .find(doc! { "groupId": &g })
        .sort(doc! { "seq": 1 })
        .await?
        .try_collect()
        .await?;
    let stream_seqs: Vec<i64> = docs
        .iter()
        .map(|d| d.get_i64("streamSeq"))
        .collect::<Result<_, _>>()?;
    assert!(
        stream_seqs.windows(2).all(|w| w[0] < w[1]),
        "stream order is seq order: {stream_seqs:?}"
    );
    // each opens to what was sent
    let sent: std::collections::HashMap<&str, &str> = acks
        .iter()
        .map(|(a, text)| (a.message_id.as_str(), text.as_str()))
        .collect();
    let history = c.history("alice", &g).await?;
    assert_eq!(history.len() as u64, n.min(100));
    for m in &history {
        let id = m["messageId"].as_str().unwrap_or_default();
        assert_eq!(sent.get(id).copied(), m["text"].as_str(), "message {id}");
    }
    c.stop().await
}

/// An atomic batch lands whole or not at all: a stale compare-and-set
/// stores none of it, a message id stored already refuses the whole batch
/// (the worker then publishes one by one, where the duplicate is found),
/// and a stored batch takes consecutive stream sequences in its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_messages_lands_whole_or_not_at_all() -> anyhow::Result<()> {
    use chat_bus::{BatchPublished, Envelope, Position};
    use chat_domain::{GroupId, MessageId};
    let c = Cluster::start(1, 1).await?;
    let bus = c.bus().await?;
    let g = GroupId::generate();
    let envelope = |seq: u64, id: &str| Envelope {
        message_id: id.to_owned(),
        group_id: g.to_string(),
        seq,
        sender_id: "alice".into(),
        client_msg_id: format!("c{seq}"),
        kind: "text".into(),
        created_at: 1,
        key_id: "t1".into(),
        nonce: "AAAAAAAAAAAAAAAA".into(),
        ciphertext: "AAAA".into(),
        binding: 2,
        mentions: Vec::new(),
        change: None,
        changed_by: String::new(),
        joined_only: false,
    };
    let fresh = || MessageId::generate().to_string();
    let first: Vec<Envelope> = (1..=3).map(|s| envelope(s, &fresh())).collect();
    let BatchPublished::Stored { first_stream_seq } = bus.publish_group_batch(&first, 0).await?
    else {
        anyhow::bail!("a fresh batch was not stored");
    };
    for (i, sent) in (0..).zip(&first) {
        let stored = bus.group_stream_message(first_stream_seq + i).await?;
        assert_eq!(&serde_json::from_slice::<Envelope>(&stored)?, sent);
    }
    let newest = Position {
        seq: 3,
        stream_seq: first_stream_seq + 2,
    };
    assert_eq!(bus.last_group_position(&g).await?, Some(newest));

    // a stale compare-and-set: nothing of the batch
    let next: Vec<Envelope> = (4..=5).map(|s| envelope(s, &fresh())).collect();
    assert_eq!(
        bus.publish_group_batch(&next, first_stream_seq).await?,
        BatchPublished::Conflict
    );
    assert_eq!(bus.last_group_position(&g).await?, Some(newest));
    // a message stored already: the whole batch refused
    let with_old = [envelope(4, &fresh()), envelope(5, &first[0].message_id)];
    let refused = bus
        .publish_group_batch(&with_old, newest.stream_seq)
        .await?;
    assert!(matches!(refused, BatchPublished::Refused(_)), "{refused:?}");
    assert_eq!(bus.last_group_position(&g).await?, Some(newest));
    // the right position: stored after the first batch
    let BatchPublished::Stored {
        first_stream_seq: at,
    } = bus.publish_group_batch(&next, newest.stream_seq).await?
    else {
        anyhow::bail!("the second batch was not stored");
    };
    assert!(at > newest.stream_seq);
    assert_eq!(
        bus.last_group_position(&g).await?,
        Some(Position {
            seq: 5,
            stream_seq: at + 1
        })
    );
    c.stop().await
}

/// Whether worker process `p` committed a batch of more than one message:
/// its mean batch holds more than one.
async fn batched(p: &chat_tests::Process) -> anyhow::Result<bool> {
    let sum = p.metric("chat_publish_batch_messages_sum").await?;
    let count = p.metric("chat_publish_batch_messages_count").await?;
    Ok(count > 0.0 && sum > count)
}

/// Sends text number `n` of `who` to group `g` straight to a worker (as an
/// edge would): its acknowledgement and the text.
async fn send_to_worker(
    channel: Signed<Channel>,
    who: &'static str,
    g: String,
    n: usize,
) -> anyhow::Result<(chat_rpc::pb::SendMessageResponse, String)> {
    use chat_rpc::pb::{self, messages_client::MessagesClient};
    let text = format!("{who} says {n}");
    let req = tonic::Request::new(pb::SendMessageRequest {
        caller: who.into(),
        group_id: g,
        client_msg_id: format!("{who}-{n}"),
        r#type: "text".into(),
        text: text.clone(),
        media: None,
        reply_to: String::new(),
    });
    let ack = MessagesClient::new(channel).send(req).await?.into_inner();
    Ok((ack, text))
}

/// A stream with atomic publishes off (an operator's own definition, or a
/// server that refuses them): the worker's batches are refused, it
/// publishes the messages one by one instead, and the group stays gapless.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_atomic_publishes_off_sends_go_one_by_one_and_stay_gapless() -> anyhow::Result<()> {
    let c = Cluster::start_with(1, 1, &["--publish-batch-max", "64"]).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let worker = c.spawn_process("worker").await?;
    // off after the workers declared the stream (they turn it on)
    let bus = c.bus().await?;
    let mut stream = bus.jetstream().get_stream("CHAT_GROUPS").await?;
    let mut config = stream.info().await?.config.clone();
    config.allow_atomic_publish = false;
    bus.jetstream().update_stream(config).await?;
    let channel = chat_tests::signed_channel(&format!("http://{}", worker.grpc)).await?;
    const N: usize = 60;
    let sends = (0..N).map(|n| send_to_worker(channel.clone(), "alice", g.clone(), n));
    let mut seqs = Vec::new();
    for sent in futures::future::join_all(sends).await {
        seqs.push(sent?.0.seq);
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=N as u64).collect::<Vec<_>>(),
        "gapless, none twice"
    );
    let refused = worker.metric("chat_publish_batches_refused_total").await?;
    assert!(refused >= 1.0, "no batch was tried and refused");
    c.stop().await
}
