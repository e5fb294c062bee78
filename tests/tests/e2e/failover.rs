//! Several workers: the edge balances across them and routes around one that
//! is down, and takes it back when it returns.

use chat_tests::{Cluster, PROMPTLY};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_keep_working_while_a_worker_is_down_and_it_rejoins() -> anyhow::Result<()> {
    let mut c = Cluster::start(1, 2).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(0, "alice", "setup").await?;
    let mut bob = c.connect(0, "bob", "setup").await?;
    for i in 0..10 {
        alice.send_text(&g, &format!("a{i}"), "both up").await?;
    }
    c.stop_worker(0).await?;
    for i in 0..20 {
        alice.send_text(&g, &format!("b{i}"), "one down").await?;
    }
    c.start_worker(0).await?;
    c.stop_worker(1).await?;
    // a call in flight on the worker that stops may answer `unavailable`
    // (before the edge's next health check has seen the restarted one):
    // clients retry those with the same id, as PROTOCOL.md says
    for i in 0..20 {
        alice
            .send_text_until_ok(&g, &format!("c{i}"), "the other down", PROMPTLY)
            .await?;
    }
    let got = bob.messages(50).await?;
    let seqs: Vec<u64> = got.iter().filter_map(|m| m["seq"].as_u64()).collect();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    c.stop().await
}

/// A `--workers` URL may name a host: the edge looks it up and calls the
/// addresses it has (here `localhost`, which also has `::1`, where nothing
/// listens: that address fails its health checks and is never used).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_finds_its_workers_by_host_name() -> anyhow::Result<()> {
    let mut c = Cluster::start(1, 1).await?;
    let by_name = c.worker_url(0).replace("127.0.0.1", "localhost");
    let edge = c.add_edge_with(&by_name).await?;
    let g = c.room(&["alice", "bob"]).await?;
    let mut alice = c.connect(edge, "alice", "a").await?;
    let mut bob = c.connect(0, "bob", "b").await?;
    alice.send_text(&g, "m1", "hello").await?;
    assert_eq!(bob.messages(1).await?[0]["text"], "hello");
    c.stop().await
}
