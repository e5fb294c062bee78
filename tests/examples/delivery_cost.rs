//! Measures the delivery design on real services and prints the numbers
//! (ARCHITECTURE.md, "Delivery", and the text-message issue):
//!
//! 1. the cost of one device per user for N users: time to open their
//!    sessions (profile write plus two durable consumers each) and the
//!    nats-server memory they take;
//! 2. send-to-delivery latency between two online members;
//! 3. catch-up: a member offline for M messages reconnects; time until all
//!    have arrived.
//!
//! `cargo run --release -p chat-tests --example delivery_cost -- [USERS] [MISSED]`
//! (defaults 10000 and 1000). Nothing here asserts: it is a measurement.

use std::time::{Duration, Instant};

use chat_rpc::pb::{self, sessions_client::SessionsClient};
use chat_tests::Cluster;
use futures::StreamExt;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let users: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let missed: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1_000);
    let c = Cluster::start_with(1, 1, &["--requests-per-sec", "100000"]).await?;
    let nats_pid = c.stack.nats.pid().unwrap_or(0);
    let g = c.room(&["alice", "bob"]).await?;

    // 1. many users, one device each
    let rss_before = rss_kib(nats_pid);
    let worker = c.worker_url(0);
    let client = SessionsClient::connect(worker).await?;
    let started = Instant::now();
    futures::stream::iter(0..users)
        .map(|i| {
            let mut client = client.clone();
            async move {
                client
                    .open_session(pb::OpenSessionRequest {
                        user_id: format!("user{i}"),
                        device_id: "phone".into(),
                        display_name: String::new(),
                    })
                    .await
            }
        })
        .buffer_unordered(32)
        .for_each(|r| async move {
            if let Err(e) = r {
                eprintln!("open_session failed: {e}");
            }
        })
        .await;
    let took = started.elapsed();
    let rss_after = rss_kib(nats_pid);
    println!("users with one device (2 durable consumers each): {users}");
    println!(
        "  time to open their sessions: {took:.2?} ({:.0}/s)",
        users as f64 / took.as_secs_f64()
    );
    println!(
        "  nats-server RSS: {} MiB -> {} MiB, {:.1} KiB per user",
        rss_before / 1024,
        rss_after / 1024,
        (rss_after.saturating_sub(rss_before)) as f64 / users.max(1) as f64
    );

    // 2. latency between two online members, one message at a time
    let mut alice = c.connect(0, "alice", "setup").await?;
    let mut bob = c.connect(0, "bob", "setup").await?;
    let mut latencies = Vec::new();
    for i in 0..300 {
        let t = Instant::now();
        alice.send_text(&g, &format!("lat{i}"), "ping").await?;
        let ack = t.elapsed();
        bob.messages(1).await?;
        latencies.push((ack, t.elapsed()));
    }
    let mut acks: Vec<Duration> = latencies.iter().map(|l| l.0).collect();
    let mut deliveries: Vec<Duration> = latencies.iter().map(|l| l.1).collect();
    acks.sort();
    deliveries.sort();
    println!(
        "send -> ack, 300 sequential sends: p50 {:.2?}, p99 {:.2?}",
        percentile(&acks, 0.5),
        percentile(&acks, 0.99)
    );
    println!(
        "send -> delivery at another member: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        percentile(&deliveries, 0.5),
        percentile(&deliveries, 0.99),
        deliveries.last().copied().unwrap_or_default()
    );

    // 3. catch-up after being offline
    bob.close().await?;
    let t = Instant::now();
    for i in 0..missed {
        alice
            .send_text(&g, &format!("miss{i}"), "while you were away")
            .await?;
    }
    let send_took = t.elapsed();
    println!(
        "sent {missed} messages one at a time in {send_took:.2?} ({:.0}/s)",
        missed as f64 / send_took.as_secs_f64()
    );
    let t = Instant::now();
    let mut bob = c.connect(0, "bob", "setup").await?;
    let got = bob.messages(missed).await?;
    let took = t.elapsed();
    let in_order = got
        .windows(2)
        .all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64());
    println!(
        "catch-up of {missed} missed messages after reconnect: {took:.2?} (in order: {in_order})"
    );
    c.stop().await
}
