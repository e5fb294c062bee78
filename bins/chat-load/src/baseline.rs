//! Raw NATS on the same server, same machine, same message size and
//! fan-out: core publish/subscribe, and JetStream publishes acknowledged by a
//! file-backed stream like `CHAT_GROUPS`. The system's figures are quoted as
//! ratios of these.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::{BufMut, Bytes, BytesMut};
use futures::{StreamExt, stream::FuturesOrdered};
use serde::Serialize;
use tokio::task::JoinSet;

use chat_stack::NatsUser;

use crate::system::{NatsCounts, Window};

use crate::stats::{Integrity, Latency, Order, Percentiles, micros_since};

#[derive(Debug, Serialize)]
pub struct CoreResult {
    pub subjects: usize,
    pub subscribers_per_subject: usize,
    pub size: usize,
    pub secs: f64,
    pub publishes_per_sec: f64,
    pub deliveries_per_sec: f64,
    pub latency: Percentiles,
    pub integrity: Integrity,
}

#[derive(Debug, Serialize)]
pub struct JetStreamResult {
    pub subjects: usize,
    pub size: usize,
    /// Publishes awaiting their ack at any time.
    pub window: usize,
    pub secs: f64,
    pub acked_per_sec: f64,
    pub latency: Percentiles,
    /// nats-server's CPU over the measured window, percent of one core
    /// (all nodes).
    pub nats_cpu_percent: f64,
    /// The messages nats-server took in and sent out in that window.
    pub nats_counts: NatsCounts,
}

fn payload(seq: u64, epoch: Instant, size: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(size.max(16));
    b.put_u64(seq);
    b.put_u64(micros_since(epoch));
    b.resize(size.max(16), b'x');
    b.freeze()
}

/// Connects as `user` (the stack's NATS refuses anonymous clients).
pub fn connect_options(user: &NatsUser) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new().user_and_password(user.user.to_owned(), user.password.clone())
}

/// Core fan-out: `subjects` publishers, each subject with `subscribers`
/// subscribers on their own connections (as each chat member has its own
/// socket). Publishers go as fast as the slowest subscriber takes: at most
/// `WINDOW` messages ahead of it, so that nothing is dropped as a slow
/// consumer; the figure is sustained delivery, as for the chat run.
pub async fn core_fanout(
    url: &str,
    user: &NatsUser,
    subjects: usize,
    subscribers: usize,
    size: usize,
    duration: Duration,
) -> anyhow::Result<CoreResult> {
    const WINDOW: u64 = 512;
    eprintln!(
        "nats core: {subjects} subjects x {subscribers} subscribers, {size} bytes, {} s",
        duration.as_secs()
    );
    let epoch = Instant::now();
    let warm = Duration::from_secs(1);
    let measure_from = Arc::new(AtomicU64::new(u64::MAX));
    let stop = Arc::new(AtomicBool::new(false));
    let published: Vec<Arc<AtomicU64>> =
        (0..subjects).map(|_| Arc::new(AtomicU64::new(0))).collect();
    // per subject, the lowest number every subscriber has reached
    let received: Vec<Vec<Arc<AtomicU64>>> = (0..subjects)
        .map(|_| {
            (0..subscribers)
                .map(|_| Arc::new(AtomicU64::new(0)))
                .collect()
        })
        .collect();
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subs = JoinSet::new();
    for (s, slots) in received.iter().enumerate() {
        for got in slots {
            let client = connect_options(user)
                .subscription_capacity(65_536)
                .connect(servers(url))
                .await?;
            let mut sub = client.subscribe(format!("bench.core.{s}")).await?;
            client.flush().await?;
            let (got, delivered, from) = (got.clone(), delivered.clone(), measure_from.clone());
            subs.spawn(async move {
                let _client = client;
                let mut order = Order::default();
                let mut lat = Latency::default();
                while let Some(m) = sub.next().await {
                    if m.payload.len() < 16 {
                        continue;
                    }
                    let seq = u64::from_be_bytes(m.payload[..8].try_into().unwrap_or_default());
                    let t = u64::from_be_bytes(m.payload[8..16].try_into().unwrap_or_default());
                    if seq == 0 {
                        break; // end marker
                    }
                    order.see(seq);
                    got.store(order.last, Ordering::Relaxed);
                    delivered.fetch_add(1, Ordering::Relaxed);
                    if t >= from.load(Ordering::Relaxed) {
                        lat.record_us(micros_since(epoch).saturating_sub(t));
                    }
                }
                (s, order, lat)
            });
        }
    }
    let mut pubs = JoinSet::new();
    for (s, published) in published.iter().enumerate() {
        let client = connect_options(user).connect(servers(url)).await?;
        let stop = stop.clone();
        let published = published.clone();
        let slowest = received[s].clone();
        pubs.spawn(async move {
            let subject = format!("bench.core.{s}");
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let floor = slowest
                    .iter()
                    .map(|r| r.load(Ordering::Relaxed))
                    .min()
                    .unwrap_or(0);
                if seq >= floor + WINDOW {
                    client.flush().await?;
                    tokio::task::yield_now().await;
                    continue;
                }
                seq += 1;
                client
                    .publish(subject.clone(), payload(seq, epoch, size))
                    .await?;
                published.store(seq, Ordering::Relaxed);
            }
            client.flush().await?;
            anyhow::Ok(client)
        });
    }
    tokio::time::sleep(warm).await;
    measure_from.store(micros_since(epoch), Ordering::Relaxed);
    let (d0, t0) = (delivered.load(Ordering::Relaxed), Instant::now());
    let p0: u64 = published.iter().map(|p| p.load(Ordering::Relaxed)).sum();
    tokio::time::sleep(duration).await;
    let (d1, secs) = (
        delivered.load(Ordering::Relaxed),
        t0.elapsed().as_secs_f64(),
    );
    let p1: u64 = published.iter().map(|p| p.load(Ordering::Relaxed)).sum();
    stop.store(true, Ordering::Relaxed);
    let mut clients = Vec::new();
    while let Some(r) = pubs.join_next().await {
        clients.push(r??);
    }
    // wait until every subscriber has everything, then end them
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && received.iter().enumerate().any(|(s, subs)| {
            let last = published[s].load(Ordering::Relaxed);
            subs.iter().any(|r| r.load(Ordering::Relaxed) < last)
        })
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (s, c) in clients.iter().enumerate() {
        c.publish(format!("bench.core.{s}"), payload(0, epoch, size))
            .await?;
        c.flush().await?;
    }
    let mut latency = Latency::default();
    let mut integrity = Integrity::default();
    while let Some(r) = tokio::time::timeout(Duration::from_secs(10), subs.join_next())
        .await
        .context("subscribers did not end")?
    {
        let (s, order, lat) = r?;
        latency.merge(&lat);
        integrity.add(&order, published[s].load(Ordering::Relaxed));
    }
    Ok(CoreResult {
        subjects,
        subscribers_per_subject: subscribers,
        size,
        secs,
        publishes_per_sec: (p1 - p0) as f64 / secs,
        deliveries_per_sec: (d1 - d0) as f64 / secs,
        latency: latency.summary(),
        integrity,
    })
}

/// The servers of a NATS URL (comma-separated for a cluster).
pub fn servers(url: &str) -> Vec<&str> {
    url.split(',').map(str::trim).collect()
}

/// JetStream publishes to a file-backed stream (as `CHAT_GROUPS`, with as
/// many `replicas`), each awaited for its ack, `window` in flight,
/// round-robin over `subjects`; `nats` are the server's processes and
/// `monitors` their monitoring URLs, for what the publishes cost it.
#[allow(clippy::too_many_arguments)]
pub async fn jetstream(
    url: &str,
    user: &NatsUser,
    nats: &[(&str, u32)],
    monitors: &[String],
    replicas: usize,
    subjects: usize,
    size: usize,
    window: usize,
    duration: Duration,
) -> anyhow::Result<JetStreamResult> {
    eprintln!(
        "nats jetstream: acked publishes, {size} bytes, {window} in flight, {} s",
        duration.as_secs()
    );
    let client = connect_options(user).connect(servers(url)).await?;
    let js = async_nats::jetstream::new(client);
    let name = "BENCH_JS";
    let _ = js.delete_stream(name).await;
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec!["bench.js.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await?;
    let epoch = Instant::now();
    let mut lat = Latency::default();
    let mut inflight = FuturesOrdered::new();
    let subjects_v: Vec<String> = (0..subjects.max(1))
        .map(|s| format!("bench.js.{s}"))
        .collect();
    let warm_until = Instant::now() + Duration::from_secs(1);
    let mut started: Option<(Instant, u64)> = None;
    let mut server: Option<(Window, NatsCounts)> = None;
    let mut acked = 0u64;
    let mut i = 0usize;
    let end = warm_until + duration;
    loop {
        let now = Instant::now();
        if started.is_none() && now >= warm_until {
            started = Some((now, acked));
            server = Some((Window::open(nats), NatsCounts::read(monitors).await?));
        }
        if now >= end {
            break;
        }
        while inflight.len() < window {
            let t = Instant::now();
            let ack = js
                .publish(
                    subjects_v[i % subjects_v.len()].clone(),
                    payload(i as u64 + 1, epoch, size),
                )
                .await?;
            i += 1;
            inflight.push_back(async move { (ack.await, t) });
        }
        if let Some((r, t)) = inflight.next().await {
            r?;
            acked += 1;
            if started.is_some() {
                lat.record_us(t.elapsed().as_micros() as u64);
            }
        }
    }
    let (t0, a0) = started.unwrap_or((warm_until, 0));
    let secs = t0.elapsed().as_secs_f64();
    let (nats_cpu_percent, nats_counts) = match &server {
        Some((window, before)) => (
            window.close().iter().map(|u| u.cpu_percent).sum(),
            NatsCounts::read(monitors).await?.since(*before),
        ),
        None => (0.0, NatsCounts::default()),
    };
    let result = JetStreamResult {
        subjects,
        size,
        window,
        secs,
        acked_per_sec: (acked - a0) as f64 / secs,
        latency: lat.summary(),
        nats_cpu_percent,
        nats_counts,
    };
    while let Some((r, _)) = inflight.next().await {
        r?;
    }
    js.delete_stream(name).await?;
    Ok(result)
}
