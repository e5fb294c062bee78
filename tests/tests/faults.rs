//! Real faults on real processes: an edge or a worker killed with SIGKILL
//! while traffic runs, an edge drained with SIGTERM. Nothing acknowledged to a
//! sender is lost; clients move to the surviving nodes and catch up in order.

use std::{collections::BTreeMap, time::Duration};

use chat_tests::{Client, Cluster, PROMPTLY};
use serde_json::Value;

/// Reads `a_group_message`s until `want` distinct seqs have arrived;
/// returns them in arrival order after dropping repeats of a seq already
/// seen (what a client does with `seq`), and how many repeats there were.
async fn collect(client: &mut Client, want: usize) -> anyhow::Result<(Vec<u64>, usize)> {
    let mut seen = BTreeMap::new();
    let mut order = Vec::new();
    let mut repeats = 0;
    while seen.len() < want {
        let m = client.messages(1).await?.remove(0);
        let seq = m["seq"].as_u64().unwrap_or(0);
        if seen.insert(seq, m).is_some() {
            repeats += 1;
        } else {
            order.push(seq);
        }
    }
    Ok((order, repeats))
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
    let c = Cluster::start(1, 2).await?;
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
                    .send_text(&g, &format!("m{i}"), &format!("message {i}"))
                    .await?;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            anyhow::Ok(alice)
        })
    };
    let (before, _) = collect(&mut bob, 15).await?;
    doomed.kill();
    let killed = tokio::time::Instant::now();
    // bob's socket dies with the edge; he reconnects to the survivor
    let mut bob = reconnect(&c, 0, "bob").await?;
    let reconnected = killed.elapsed();
    let (first, _) = collect(&mut bob, 1).await?;
    let first_after = killed.elapsed();
    sender.await??;
    let (mut after, repeats) = collect(&mut bob, N - before.len() - 1).await?;
    after.insert(0, first[0]);
    println!(
        "edge SIGKILL: reconnected in {reconnected:?}, first missed message after {first_after:?}, {repeats} repeated deliveries"
    );
    let all: Vec<u64> = before.iter().chain(after.iter()).copied().collect();
    assert_eq!(
        all,
        (1..=N as u64).collect::<Vec<_>>(),
        "every message, in order (repeats seen: {repeats})"
    );
    assert_eq!(c.history("bob", &g).await?.len(), N);
    c.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_traffic_costs_senders_nothing_acknowledged() -> anyhow::Result<()> {
    let mut c = Cluster::start(0, 0).await?;
    let mut w1 = c.spawn_process("worker").await?;
    let w2 = c.spawn_process("worker").await?;
    c.add_edge_for(&[w1.grpc, w2.grpc]).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "setup").await?;
    let mut bob = c.connect(0, "bob", "setup").await?;

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
    let history: Vec<String> = c
        .history("bob", &g)
        .await?
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
async fn an_edge_drains_on_sigterm_and_clients_move_over() -> anyhow::Result<()> {
    let c = Cluster::start(1, 1).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut draining = c.spawn_process("edge").await?;
    let mut bob = c.connect_to(&draining, "bob", "setup").await?;
    let mut alice = c.connect(0, "alice", "setup").await?;
    alice.send_text(&g, "m1", "one").await?;
    assert_eq!(bob.messages(1).await?[0]["seq"], 1);

    let started = tokio::time::Instant::now();
    draining.terminate()?;
    assert_eq!(bob.closed_with().await?, Some(1012), "told to reconnect");
    let status = draining.exited_within(Duration::from_secs(8)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "did not exit cleanly within the grace period: {status:?}\n{}",
        draining.log_text()
    );
    println!("edge drained in {:?}", started.elapsed());

    alice.send_text(&g, "m2", "two").await?;
    let mut bob = reconnect(&c, 0, "bob").await?;
    let (seqs, repeats) = collect(&mut bob, 1).await?;
    assert_eq!((seqs, repeats), (vec![2], 0));
    c.stop().await
}
