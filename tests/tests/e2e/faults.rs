//! Real faults on real processes: an edge or a worker killed with SIGKILL
//! while traffic runs, an edge drained with SIGTERM. Nothing acknowledged to a
//! sender is lost; clients move to the surviving nodes and catch up in order.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use chat_tests::{Client, Cluster, PROMPTLY};
use serde_json::Value;

/// What a client shows: group messages by `seq`, a repeated `seq` dropped
/// (the at-least-once overlap after a crash; `seq` is how a client spots it).
#[derive(Default)]
struct View {
    seen: BTreeMap<u64, Value>,
    order: Vec<u64>,
    repeats: Vec<u64>,
}

impl View {
    fn add(&mut self, m: Value) {
        let seq = m["seq"].as_u64().unwrap_or(0);
        if self.seen.insert(seq, m).is_some() {
            self.repeats.push(seq);
        } else {
            self.order.push(seq);
        }
    }

    /// Reads from `client` until `more` new seqs have arrived.
    async fn read(&mut self, client: &mut Client, more: usize) -> anyhow::Result<()> {
        let want = self.seen.len() + more;
        while self.seen.len() < want {
            let m = client.messages(1).await?.remove(0);
            self.add(m);
        }
        Ok(())
    }

    /// Reads from `client` until `want` distinct seqs in all have arrived or
    /// `deadline` passed, waiting through silences: deliveries pause while
    /// JetStream elects new leaders after a NATS node died or came back,
    /// for several seconds, so one frame's `PROMPTLY` is not the bound there.
    /// A closed connection is an error; a short view is for the caller to
    /// assert on.
    async fn read_through_failover(
        &mut self,
        client: &mut Client,
        want: usize,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<()> {
        while self.seen.len() < want && tokio::time::Instant::now() < deadline {
            match client.recv(Duration::from_secs(5)).await {
                Ok(Some(frame)) if frame["event"] == "a_group_message" => {
                    self.add(frame["data"].clone());
                }
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => anyhow::bail!("connection closed after {} seqs", self.seen.len()),
            }
        }
        Ok(())
    }

    /// Reads what `client` still receives until its connection ends.
    async fn read_to_end(&mut self, client: &mut Client) -> anyhow::Result<()> {
        for frame in client.until_closed().await? {
            if frame["event"] == "a_group_message" {
                self.add(frame["data"].clone());
            }
        }
        Ok(())
    }
}

/// Reads `want` distinct seqs from a fresh view; their order and repeats.
async fn collect(client: &mut Client, want: usize) -> anyhow::Result<(Vec<u64>, usize)> {
    let mut view = View::default();
    view.read(client, want).await?;
    Ok((view.order, view.repeats.len()))
}

/// Sends `n` texts to `g` from `sender` (client ids `<prefix><i>`), each
/// retried with the same client id until acknowledged (for up to 120 s in
/// all), counting acknowledgements in `acked`: the seqs acknowledged, in
/// order.
async fn send_through_failures(
    mut sender: Client,
    g: String,
    prefix: String,
    n: usize,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> anyhow::Result<Vec<u64>> {
    let started = tokio::time::Instant::now();
    let mut seqs = Vec::new();
    for i in 0..n {
        let ack = loop {
            match sender.send_text(&g, &format!("{prefix}{i}"), "x").await {
                Ok(ack) => break ack,
                Err(_) if started.elapsed() < Duration::from_secs(120) => {
                    // a retry's pause, not a wait for a condition
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e),
            }
        };
        seqs.push(ack["seq"].as_u64().unwrap_or(0));
        acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    Ok(seqs)
}

/// Reconnects `user` to `edge`, retrying while it is not accepting yet.
async fn reconnect(c: &Cluster, edge: usize, user: &str) -> anyhow::Result<Client> {
    let deadline = tokio::time::Instant::now() + PROMPTLY;
    loop {
        match c.connect(edge, user, "setup").await {
            Ok(client) => return Ok(client),
            Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_mid_traffic_loses_nothing() -> anyhow::Result<()> {
    // two edges (one a real process), two workers, a 3-node NATS cluster
    let c = Cluster::start_clustered(3, 1, 2).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut doomed = c.spawn_process("edge").await?;
    let mut bob = c.connect_to(&doomed, "bob", "setup").await?;
    let mut alice = c.connect(0, "alice", "setup").await?;

    const N: usize = 60;
    let sender = {
        let g = g.clone();
        tokio::spawn(async move {
            for i in 0..N {
                alice
                    .send_text_until_ok(&g, &format!("m{i}"), &format!("message {i}"), PROMPTLY)
                    .await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(alice)
        })
    };
    let mut view = View::default();
    view.read(&mut bob, 15).await?;
    doomed.kill();
    let killed = tokio::time::Instant::now();
    // what the edge wrote before it died is still on its way (a client that
    // lags behind, as on a busy machine, may have all of it); a client reads
    // its socket to the end, then reconnects to the survivor
    view.read_to_end(&mut bob).await?;
    let before = view.seen.len();
    let mut bob = reconnect(&c, 0, "bob").await?;
    let reconnected = killed.elapsed();
    sender.await??;
    view.read(&mut bob, N - before).await?;
    println!(
        "edge SIGKILL: {before} of {N} messages read from the dead edge, reconnected in {reconnected:?}, all {N} after {:?}, repeated deliveries {:?}",
        killed.elapsed(),
        view.repeats
    );
    assert_eq!(
        view.order,
        (1..=N as u64).collect::<Vec<_>>(),
        "every message, in order"
    );
    // only what the dead edge wrote and had not acknowledged (its last burst)
    // comes twice: the newest messages it delivered, in order
    let newest = before as u64;
    let tail: Vec<u64> = (newest.saturating_sub(view.repeats.len() as u64) + 1..=newest).collect();
    assert_eq!(
        view.repeats, tail,
        "repeats are the dead edge's last writes"
    );
    assert_eq!(c.history("bob", &g).await?.len(), N);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_traffic_costs_senders_nothing_acknowledged() -> anyhow::Result<()> {
    // two edges, two workers (real processes), a 3-node NATS cluster
    let mut c = Cluster::start_clustered(3, 0, 0).await?;
    let mut w1 = c.spawn_process("worker").await?;
    let w2 = c.spawn_process("worker").await?;
    c.add_edge_for(&[w1.grpc, w2.grpc]).await?;
    c.add_edge_for(&[w1.grpc, w2.grpc]).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "setup").await?;
    let mut bob = c.connect(1, "bob", "setup").await?;

    let mut acked = Vec::new();
    let mut errors = Vec::new();
    for i in 0..40 {
        if i == 15 {
            w1.kill();
        }
        let id = alice
            .send("send_group_message", serde_json::json!({"groupId": g, "clientMsgId": format!("m{i}"), "type": "text", "text": "x"}))
            .await?;
        // every send is answered within its deadline
        let reply: Value =
            tokio::time::timeout(Duration::from_secs(15), alice.reply_to(&id)).await??;
        match reply["event"].as_str() {
            Some("ack") => acked.push(reply["data"]["messageId"].as_str().unwrap_or("").to_owned()),
            _ => errors.push(reply["data"]["code"].as_str().unwrap_or("").to_owned()),
        }
    }
    assert!(errors.iter().all(|e| e == "unavailable"), "{errors:?}");
    assert!(
        acked.len() >= 35,
        "only {} of 40 acknowledged: {errors:?}",
        acked.len()
    );
    // every acknowledged message is delivered and in history
    let delivered = bob.messages(acked.len()).await?;
    let delivered: Vec<String> = delivered
        .iter()
        .map(|m| m["messageId"].as_str().unwrap_or("").to_owned())
        .collect();
    for id in &acked {
        assert!(delivered.contains(id), "acknowledged {id} never delivered");
    }
    // the dead worker may have held a batch of the persist consumer:
    // another worker writes it once the consumer's ack_wait (10 s) has
    // passed, and history answers `unavailable` until then
    let history = chat_tests::eventually(Duration::from_secs(20), || async {
        Ok(c.history("bob", &g).await.ok())
    })
    .await?;
    let history: Vec<String> = history
        .iter()
        .map(|m| m["messageId"].as_str().unwrap_or("").to_owned())
        .collect();
    for id in &acked {
        assert!(history.contains(id), "acknowledged {id} not in history");
    }
    println!(
        "worker SIGKILL: {} acked, errors seen by the sender: {errors:?}",
        acked.len()
    );
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_between_the_stream_ack_and_the_mongodb_write_loses_nothing()
-> anyhow::Result<()> {
    // one edge, two workers (real processes): MongoDB is down while the
    // messages are sent, so every worker holds what it pulled from the
    // persist consumer unwritten; one of them is then killed
    let mut c = Cluster::start_with(0, 0, &[]).await?;
    let mut w1 = c.spawn_process("worker").await?;
    let w2 = c.spawn_process("worker").await?;
    c.add_edge_for(&[w1.grpc, w2.grpc]).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "setup").await?;
    // calls alternate between the workers: each one learns the membership
    const WARM: usize = 2;
    for i in 0..WARM {
        alice.send_text(&g, &format!("warm{i}"), "warm").await?;
    }
    c.mongo_settled(&g, WARM as u64).await?;
    let db = c.mongo().await?;

    c.stack.mongo.kill();
    const N: usize = 30;
    for i in 0..N {
        alice
            .send_text(&g, &format!("m{i}"), &format!("text {i}"))
            .await?;
    }
    // kill a worker that holds pulled, unwritten messages
    let holding = |p: &chat_tests::Process| p.log_text().contains("cannot persist a batch yet");
    let mut w2 = w2;
    // the first failed write alone waits out the driver's server selection
    let victim = chat_tests::eventually(3 * PROMPTLY, || {
        let found = if holding(&w1) {
            Some(1)
        } else if holding(&w2) {
            Some(2)
        } else {
            None
        };
        async move { Ok(found) }
    })
    .await?;
    if victim == 1 {
        w1.kill();
    } else {
        w2.kill();
    }
    c.stack.mongo.restart().await?;

    // the survivor writes its own batches when MongoDB is back, and the dead
    // worker's after the consumer's ack wait
    chat_tests::eventually(Duration::from_secs(45), || async {
        let n = db
            .collection::<mongodb::bson::Document>("messages")
            .count_documents(mongodb::bson::doc! { "groupId": &g, "state": "committed" })
            .await?;
        Ok((n as usize == N + WARM).then_some(()))
    })
    .await?;
    let history = c.history("bob", &g).await?;
    let seqs: Vec<u64> = history.iter().filter_map(|m| m["seq"].as_u64()).collect();
    let all = (N + WARM) as u64;
    assert_eq!(
        seqs,
        (1..=all).rev().collect::<Vec<_>>(),
        "complete, once each"
    );
    println!("killed worker {victim} holding unwritten messages");
    drop((w1, w2));
    c.stop().await
}

/// A delivery that leaves nats-server but never reaches the edge (a NATS
/// node died with it in flight, a pull ended as it came) used to be lost for
/// good: the edge acknowledged the next delivery, and with
/// `AckPolicy::All` that covered the missing one too (seen with a node
/// killed under load: `seq` 8 reached 2 of 10 members). Here a stranger's
/// pull on bob's consumer takes one delivery and never acknowledges it; the
/// edge sees the consumer's delivery count jump, rewinds, and bob still
/// gets every message once and in order.
/// Messages `2..=last` sent by `sender` in `g` while a stranger's pull of
/// one message waits on `consumer` and never acks what it takes: the seq it
/// took.
async fn sent_while_one_is_taken(
    consumer: &async_nats::jetstream::consumer::Consumer<
        async_nats::jetstream::consumer::pull::Config,
    >,
    sender: &mut Client,
    g: &str,
    last: u64,
) -> anyhow::Result<u64> {
    use futures::StreamExt;
    let mut stolen = consumer
        .fetch()
        .max_messages(1)
        .expires(Duration::from_secs(20))
        .messages()
        .await?;
    for i in 2..=last {
        sender
            .send_text(g, &format!("m{i}"), &format!("text {i}"))
            .await?;
    }
    let taken = tokio::time::timeout(PROMPTLY, stolen.next())
        .await?
        .context("the stranger's pull ended")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(taken
        .headers
        .as_ref()
        .and_then(|h| h.get(chat_bus::SEQ_HEADER))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_lost_on_the_live_path_is_given_again_in_order() -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::pull;
    use futures::TryStreamExt;
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    let mut bob = c.connect(0, "bob", "setup").await?;
    alice.send_text(&g, "m1", "one").await?;
    assert_eq!(bob.messages(1).await?[0]["seq"], 1);

    // the edge's live reader: a stranger's pull takes one of its deliveries
    let bus = c.bus().await?;
    let stream = bus.jetstream().get_stream("CHAT_GROUPS").await?;
    let names: Vec<String> = stream.consumer_names().try_collect().await?;
    let live: Vec<&String> = names.iter().filter(|n| n.starts_with("live-")).collect();
    let [name] = live.as_slice() else {
        anyhow::bail!("expected one live reader, found {names:?}");
    };
    let consumer = stream
        .get_consumer::<pull::Config>(name)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    const N: u64 = 8;
    let taken_seq = sent_while_one_is_taken(&consumer, &mut alice, &g, N).await?;
    assert!((2..=N).contains(&taken_seq), "took seq {taken_seq}");

    let got = bob.messages((N - 1) as usize).await?;
    let seqs: Vec<u64> = got.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(
        seqs,
        (2..=N).collect::<Vec<_>>(),
        "seq {taken_seq} was taken"
    );
    // and nothing comes twice
    alice.send_text(&g, "last", "last").await?;
    assert_eq!(bob.messages(1).await?[0]["seq"], N + 1);
    c.stop().await
}

/// A device that was away reads what it missed through a short-lived
/// consumer of its own; a stranger's pull that takes one of its deliveries
/// must not make the device skip it: the reader sees the delivery count
/// jump and reads again from the last message it handed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_taken_from_a_catch_up_is_read_again_in_order() -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::pull;
    use futures::StreamExt;
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "web").await?;
    const N: usize = 8;
    for i in 1..=N {
        alice
            .send_text(&g, &format!("m{i}"), &format!("text {i}"))
            .await?;
    }
    let bus = c.bus().await?;
    let filters = vec![format!("chat.group.{g}.msg")];
    // what an undisturbed catch-up reads
    let mut clean = bus.catch_up(chat_bus::Feed::Groups, filters.clone(), 0);
    let expected: Vec<u64> = clean
        .next_batch(256)
        .await?
        .messages
        .iter()
        .map(|m| m.stream_seq)
        .collect();
    assert_eq!(expected.len(), N);

    let mut reader = bus.catch_up(chat_bus::Feed::Groups, filters, 0);
    let first = reader.next_batch(1).await?;
    let mut got: Vec<u64> = first.messages.iter().map(|m| m.stream_seq).collect();
    assert_eq!(got, expected[..1]);
    let name = reader
        .consumer_name()
        .context("the reader has a consumer")?;
    let consumer = bus
        .jetstream()
        .get_stream("CHAT_GROUPS")
        .await?
        .get_consumer::<pull::Config>(&name)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let taken = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await?
        .next()
        .await
        .context("the stranger's pull got nothing")?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let taken = taken
        .info()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .stream_sequence;
    assert_eq!(taken, expected[1], "the stranger took the second message");
    let mut reads = 0;
    while got.len() < N {
        reads += 1;
        anyhow::ensure!(reads < 10, "the reader stalled at {got:?}");
        let batch = reader.next_batch(256).await?;
        got.extend(batch.messages.iter().map(|m| m.stream_seq));
    }
    assert_eq!(got, expected, "every message once, in order");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_drains_on_sigterm_and_clients_move_over() -> anyhow::Result<()> {
    // two edges (one a real process), two workers, a 3-node NATS cluster
    let c = Cluster::start_clustered(3, 1, 2).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut draining = c.spawn_process("edge").await?;
    let mut bob = c.connect_to(&draining, "bob", "setup").await?;
    let mut alice = c.connect(0, "alice", "setup").await?;
    // on a cluster a send can meet a leader election: retry, as clients do
    alice.send_text_until_ok(&g, "m1", "one", PROMPTLY).await?;
    assert_eq!(bob.messages(1).await?[0]["seq"], 1);

    let started = tokio::time::Instant::now();
    draining.terminate()?;
    assert_eq!(bob.closed_with().await?, Some(1012), "told to reconnect");
    // chatd's own grace period is 5 s; a busy machine may take longer
    // to let the process go
    let status = draining.exited_within(Duration::from_secs(15)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "did not exit cleanly within the grace period: {status:?}\n{}",
        draining.log_text()
    );
    println!("edge drained in {:?}", started.elapsed());
    assert!(
        draining.log_text().contains("open-file limit"),
        "chatd logs its open-file limit at start"
    );

    alice.send_text_until_ok(&g, "m2", "two", PROMPTLY).await?;
    let mut bob = reconnect(&c, 0, "bob").await?;
    let (seqs, repeats) = collect(&mut bob, 1).await?;
    assert_eq!((seqs, repeats), (vec![2], 0));
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_node_killed_and_restarted_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let mut c = Cluster::start_clustered(3, 2, 2).await?;
    let g = c.room(&["alice", "bob", "carol"]).await?;
    let mut alice = c.connect(0, "alice", "setup").await?;
    let mut bob = c.connect(1, "bob", "setup").await?;
    // carol is offline throughout and catches up at the end

    const N: usize = 40;
    let mut acked = Vec::new();
    let mut retried = 0;
    let started = tokio::time::Instant::now();
    for i in 0..N {
        if i == 10 {
            c.stack.nats.kill_node(0);
        }
        if i == 25 {
            c.stack.nats.restart_node(0).await?;
        }
        // a sender retries with the same client id until acknowledged
        let client_id = format!("m{i}");
        let ack = loop {
            match alice
                .send_text(&g, &client_id, &format!("message {i}"))
                .await
            {
                Ok(ack) => break ack,
                Err(_) if started.elapsed() < Duration::from_secs(90) => {
                    retried += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        acked.push(ack["seq"].as_u64().unwrap_or(0));
    }
    assert_eq!(
        acked,
        (1..=N as u64).collect::<Vec<_>>(),
        "one message per send, gapless"
    );

    // a restarted node rejoining can stall reads for a JetStream request
    // timeout or two (5 s each, seen in CI): loss is what this test is
    // about, so it waits through that
    let recovered = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut bob_view = View::default();
    bob_view
        .read_through_failover(&mut bob, N, recovered)
        .await?;
    assert_eq!(bob_view.order, acked, "bob saw every message in order");
    // a session opened while the restarted node catches up may be refused
    // (`unavailable`): clients retry, as `reconnect` does
    let mut carol = reconnect(&c, 1, "carol").await?;
    let mut carol_view = View::default();
    carol_view
        .read_through_failover(&mut carol, N, recovered)
        .await?;
    assert_eq!(carol_view.order, acked, "carol caught up in order");
    let (repeats, carol_repeats) = (bob_view.repeats.len(), carol_view.repeats.len());
    // a persist batch in flight on the killed node comes again only after
    // the persist consumer's `ack_wait` (10 s): history is complete after
    // that, not necessarily within `PROMPTLY` (seen in a full-suite run)
    let history = chat_tests::eventually(Duration::from_secs(30), || async {
        Ok(c.history("carol", &g).await.ok())
    })
    .await?;
    assert_eq!(history.len(), N);
    println!(
        "nats node SIGKILL: {retried} send retries, {repeats} + {carol_repeats} repeated deliveries"
    );
    c.stop().await
}

/// Until at least `n` sends were acknowledged (2 minutes at most).
async fn until_acked(acked: &std::sync::atomic::AtomicUsize, n: usize) -> anyhow::Result<()> {
    chat_tests::eventually(Duration::from_secs(120), || {
        let now = acked.load(std::sync::atomic::Ordering::SeqCst);
        async move { Ok((now >= n).then_some(())) }
    })
    .await
}

/// The seqs `client` receives, reconnecting through failures, until it has
/// `n` messages (150 s at most).
async fn read_through_failover(mut client: Client, n: usize) -> anyhow::Result<Vec<u64>> {
    let mut view = View::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(150);
    view.read_through_failover(&mut client, n, deadline).await?;
    Ok(view.order)
}

/// The loss seen with an independent client, played at scale: several
/// groups, every member on its own connection across two edges, senders
/// running, and NATS nodes killed (SIGKILL) one after the other while sends
/// and deliveries are in flight. Every member gets every acknowledged
/// message of its group, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_nodes_killed_under_load_lose_nothing_for_any_member() -> anyhow::Result<()> {
    use std::sync::{Arc, atomic::AtomicUsize};
    const GROUPS: usize = 3;
    const MEMBERS: usize = 5;
    const N: usize = 40;
    let mut c = Cluster::start_clustered(3, 2, 2).await?;
    let mut readers = Vec::new();
    let mut senders = Vec::new();
    let acked = Arc::new(AtomicUsize::new(0));
    for k in 0..GROUPS {
        let names: Vec<String> = (0..MEMBERS).map(|j| format!("g{k}m{j}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let g = c.room(&refs).await?;
        for (j, name) in names.iter().enumerate().skip(1) {
            let client = reconnect(&c, j % 2, name).await?;
            let name = name.clone();
            readers.push(tokio::spawn(async move {
                let order = read_through_failover(client, N)
                    .await
                    .with_context(|| format!("{name} reading"))?;
                anyhow::Ok((name, order))
            }));
        }
        let sender = reconnect(&c, k % 2, &names[0]).await?;
        senders.push(tokio::spawn(send_through_failures(
            sender,
            g,
            "m".to_owned(),
            N,
            acked.clone(),
        )));
    }
    // kill a node, bring it back, kill another: each while traffic runs
    let total = GROUPS * N;
    for (node, at) in [(0, total / 5), (1, total / 2)] {
        until_acked(&acked, at).await?;
        c.stack.nats.kill_node(node);
        until_acked(&acked, (at + total / 8).min(total)).await?;
        c.stack.nats.restart_node(node).await?;
    }
    for s in senders {
        assert_eq!(
            s.await??,
            (1..=N as u64).collect::<Vec<_>>(),
            "one message per send"
        );
    }
    for r in readers {
        let (name, order) = r.await??;
        assert_eq!(
            order,
            (1..=N as u64).collect::<Vec<_>>(),
            "{name} missed or reordered messages"
        );
    }
    c.stop().await
}

/// Group commit through a NATS node failure: eight members of one group
/// send at once through two worker processes, so that their messages go
/// out as atomic batches of the replicated stream, while a NATS node is
/// killed and brought back. Each send is one message, the group's seqs are
/// gapless, and a member receives every one in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_sends_through_a_nats_node_failure_lose_nothing() -> anyhow::Result<()> {
    use std::sync::{Arc, atomic::AtomicUsize};
    const SENDERS: usize = 8;
    const N: usize = 25;
    let total = SENDERS * N;
    let mut c = Cluster::start_clustered(3, 1, 1).await?;
    let names: Vec<String> = (0..SENDERS).map(|j| format!("s{j}")).collect();
    let mut members: Vec<&str> = names.iter().map(String::as_str).collect();
    members.push("reader");
    let g = c.room(&members).await?;
    let workers = [
        c.spawn_process("worker").await?,
        c.spawn_process("worker").await?,
    ];
    let edge = c.add_edge_for(&[workers[0].grpc, workers[1].grpc]).await?;
    let reader = reconnect(&c, edge, "reader").await?;
    let reading = tokio::spawn(read_through_failover(reader, total));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for name in &names {
        let sender = reconnect(&c, edge, name).await?;
        senders.push(tokio::spawn(send_through_failures(
            sender,
            g.clone(),
            format!("{name}-"),
            N,
            acked.clone(),
        )));
    }
    until_acked(&acked, total / 3).await?;
    c.stack.nats.kill_node(0);
    until_acked(&acked, 2 * total / 3).await?;
    c.stack.nats.restart_node(0).await?;
    let mut seqs = Vec::new();
    for s in senders {
        seqs.extend(s.await??);
    }
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=total as u64).collect::<Vec<_>>(),
        "one message per send, gapless"
    );
    assert_eq!(
        reading.await??,
        (1..=total as u64).collect::<Vec<_>>(),
        "the reader missed or reordered messages"
    );
    let mut batched = false;
    for w in &workers {
        let sum = w.metric("chat_publish_batch_messages_sum").await?;
        let count = w.metric("chat_publish_batch_messages_count").await?;
        batched |= count > 0.0 && sum > count;
    }
    assert!(batched, "no worker published a batch of more than one");
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_follows_a_message_from_edge_to_worker_logs() -> anyhow::Result<()> {
    let mut c = Cluster::start(0, 0).await?;
    let worker = c.spawn_process("worker").await?;
    c.add_edge_for(&[worker.grpc]).await?;
    let g = c.room(&["alice"]).await?;
    let mut alice = c.connect(0, "alice", "setup").await?;
    let ack = alice.send_text(&g, "traced", "hello").await?;
    let id = ack["messageId"].as_str().unwrap_or_default().to_owned();
    let line = chat_tests::eventually(PROMPTLY, || {
        let log = worker.log_text();
        let id = id.clone();
        async move {
            Ok(log
                .lines()
                .find(|l| l.contains("message sent") && l.contains(&id))
                .map(str::to_owned))
        }
    })
    .await?;
    let request_id = line
        .split("request_id=")
        .nth(1)
        .and_then(|r| r.split(|ch: char| !ch.is_ascii_hexdigit()).next())
        .unwrap_or_default();
    assert_eq!(request_id.len(), 32, "no request id on {line:?}");
    c.stop().await
}

/// Copies directory `from` to `to` (which must not exist), recursively.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Waits until bob's history of `g` has `n` messages.
async fn persisted(c: &Cluster, g: &str, n: usize) -> anyhow::Result<()> {
    chat_tests::eventually(PROMPTLY, || async move {
        Ok(c.history("bob", g)
            .await
            .ok()
            .filter(|h| h.len() == n)
            .map(drop))
    })
    .await
    .with_context(|| format!("history never had {n} messages"))
}

/// How many messages of `g` MongoDB holds.
async fn stored(c: &Cluster, g: &str) -> anyhow::Result<u64> {
    Ok(c.mongo()
        .await?
        .collection::<mongodb::bson::Document>("messages")
        .count_documents(mongodb::bson::doc! { "groupId": g })
        .await?)
}

/// Replaces directory `dir` with a copy of `backup`.
fn restore_dir(backup: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::remove_dir_all(dir)?;
    copy_dir(backup, dir)
}

/// The restore drill of OPERATIONS.md ("Backups and restore"), run for real:
/// MongoDB is backed up first, the streams after it; both are lost and
/// restored; `chatd reproject` writes what the stream holds beyond MongoDB's
/// backup; the nodes start again. Every message both backups hold is back,
/// in order, and the group goes on with no repeated `seq`. (What was sent
/// after the streams' backup is lost: that is the backup's age.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_from_backups_taken_in_order_loses_nothing_they_hold() -> anyhow::Result<()> {
    let mut c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "a").await?;
    for i in 1..=3 {
        alice
            .send_text(&g, &format!("m{i}"), &format!("m{i}"))
            .await?;
    }
    persisted(&c, &g, 3).await?;
    c.mongo_settled(&g, 3).await?;
    let backups = tempfile::tempdir()?;

    // 1. MongoDB (a cold copy here; mongodump or a volume snapshot in
    //    production)
    c.stack.mongo.kill();
    copy_dir(&c.stack.mongo.data_dir(), &backups.path().join("mongo"))?;
    c.stack.mongo.restart().await?;
    for i in 4..=6 {
        alice
            .send_text_until_ok(&g, &format!("m{i}"), &format!("m{i}"), PROMPTLY)
            .await?;
    }
    persisted(&c, &g, 6).await?;

    // 2. the streams, after MongoDB
    c.stack.nats.kill();
    copy_dir(&c.stack.nats.store_dir(0), &backups.path().join("js"))?;
    c.stack.nats.restart().await?;
    alice
        .send_text_until_ok(&g, "m7", "after both backups", PROMPTLY)
        .await?;
    persisted(&c, &g, 7).await?;

    // disaster: chatd stopped, both stores lost and restored
    c.stop_worker(0).await?;
    c.stack.nats.kill();
    c.stack.mongo.kill();
    restore_dir(&backups.path().join("mongo"), &c.stack.mongo.data_dir())?;
    restore_dir(&backups.path().join("js"), &c.stack.nats.store_dir(0))?;
    c.stack.mongo.restart().await?;
    c.stack.nats.restart().await?;
    // MongoDB holds m1..m3 while the persist consumer's place says m4..m6
    // were written: without the next step they would never be
    assert_eq!(stored(&c, &g).await?, 3);

    // 3. the step: every message the stream holds is written again
    let worker = c.stack.nats.users.worker.flags();
    let mut args = vec!["reproject", "--nats-url", &c.stack.nats.url];
    args.extend(worker.iter().map(String::as_str));
    chat_tests::chatd_command(&args).await?;
    c.start_worker(0).await?;
    c.restart_edge(0).await?;
    persisted(&c, &g, 6).await?;
    let history = c.history("bob", &g).await?;
    let seqs: Vec<u64> = history.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(seqs, [6, 5, 4, 3, 2, 1]);

    // the group goes on from 7, and bob's device catches up with all of it
    let mut alice = c.connect(0, "alice", "a").await?;
    let ack = alice
        .send_text_until_ok(&g, "m7-again", "after the restore", PROMPTLY)
        .await?;
    assert_eq!(ack["seq"], 7);
    persisted(&c, &g, 7).await?;
    assert_eq!(stored(&c, &g).await?, 7);
    c.stop().await
}
