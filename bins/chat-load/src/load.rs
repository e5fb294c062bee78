//! The chat load: users and groups over REST, one WebSocket per online user,
//! sends at a fixed rate or as fast as acks allow, and what every member
//! receives checked for loss, repeats and order.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chat_domain::ClientMsgId;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{net::TcpStream, sync::watch, task::JoinSet};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

use crate::stats::{Integrity, Latency, Order, Percentiles, Timeline, micros_since};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Groups with online members; every member has a connection.
    pub groups: usize,
    pub members: usize,
    /// Members of each group that send (the first ones).
    pub senders_per_group: usize,
    /// Total sends per second over all senders; `None`: as fast as acks
    /// allow, `window` unacknowledged sends per sender.
    pub rate: Option<f64>,
    pub window: usize,
    /// Bytes of text per message.
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// New connections per second while connecting.
    pub connect_rate: f64,
    /// Users registered (one session each, subscribed to a group of their
    /// own) and then offline for the whole run.
    pub offline_users: usize,
    /// Senders send `typing` (`start` and `stop` in turn, each passed on)
    /// instead of messages; receivers count `a_typing`.
    pub typing: bool,
    /// Count `a_presence` and time `GET /groups/{id}/presence`.
    pub presence: bool,
    /// Senders send one message, then edit it again and again (a new text
    /// each time); receivers count `a_message_updated`.
    pub edits: bool,
}

impl Plan {
    pub fn connections(&self) -> usize {
        self.groups * self.members
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Wait,
    Send,
    Stop,
    Done,
}

/// State every connection task shares with the coordinator.
struct Shared {
    epoch: Instant,
    size: usize,
    /// Sends made in this window (send time, µs since `epoch`) count for
    /// latency.
    measure: (AtomicU64, AtomicU64),
    sent: Timeline,
    acked: Timeline,
    delivered: Timeline,
    outstanding: AtomicU64,
    /// New (not repeated) deliveries, all receivers.
    unique: AtomicU64,
    /// Highest acknowledged `seq` per group.
    group_last: Vec<AtomicU64>,
    /// Per connection: every `seq` up to this one has arrived.
    seen: Vec<AtomicU64>,
    /// Per connection: when it last sent `typing` (µs since `epoch`).
    typed_at: Vec<AtomicU64>,
    /// `typing` requests the edge passed on.
    forwarded: AtomicU64,
    /// `a_typing` frames received, all receivers.
    typing_received: AtomicU64,
    /// Edits acknowledged, and `a_message_updated` frames received by all
    /// receivers.
    edits_acked: AtomicU64,
    /// Messages with at least one edit acknowledged (each sender edits
    /// its own one message).
    messages_edited: AtomicU64,
    updates_received: AtomicU64,
    /// `a_presence` frames received once connected, and of those, in the
    /// measured window.
    presence_received: (AtomicU64, AtomicU64),
}

impl Shared {
    /// Whether every connection has every acknowledged message of its group
    /// (connection `i` is in group `i / members`).
    fn all_delivered(&self, members: usize) -> bool {
        self.seen.iter().enumerate().all(|(i, seen)| {
            let last = self
                .group_last
                .get(i / members.max(1))
                .map_or(0, |g| g.load(Ordering::Relaxed));
            seen.load(Ordering::Relaxed) >= last
        })
    }
}

/// One connection's findings.
#[derive(Default)]
struct ConnResult {
    delivery: Latency,
    ack: Latency,
    order: Order,
    sent: u64,
    acked: u64,
    skipped: u64,
    errors: BTreeMap<String, u64>,
    /// Frames this connection did not expect (should be none).
    unexpected: u64,
}

#[derive(Debug, Serialize)]
pub struct ChatResult {
    pub plan: Plan,
    pub connections: usize,
    pub connect_secs: f64,
    pub connects_per_sec: f64,
    /// Seconds spent registering the offline users.
    pub register_secs: f64,
    pub measured_secs: f64,
    pub sent: u64,
    pub acked: u64,
    /// Sends the fixed rate called for that were not made because 20 of
    /// the connection's were already waiting for their acks.
    pub skipped: u64,
    pub errors: BTreeMap<String, u64>,
    /// Sends made per second in the measured window.
    pub offered_per_sec: f64,
    /// Sends acknowledged (stored, encrypted, published) per second in the
    /// measured window.
    pub sends_per_sec: f64,
    pub deliveries_per_sec: f64,
    pub delivery: Percentiles,
    pub ack: Percentiles,
    pub integrity: Integrity,
    pub unexpected_frames: u64,
    /// Acknowledged sends per second since the start.
    pub sent_per_second: Vec<u64>,
    pub delivered_per_second: Vec<u64>,
    /// chatd's resident memory growth per connection, after connecting and
    /// before sending.
    pub chatd_kib_per_connection: f64,
    /// nats-server's growth per connection (its client connection's
    /// share and whatever a device costs it), same window.
    pub nats_kib_per_connection: f64,
    /// Edits acknowledged and `a_message_updated` frames received (the
    /// edits scenario).
    pub edits_acked: u64,
    /// Messages with at least one edit acknowledged: the stream keeps the
    /// newest edit of each (the persistence check counts them out).
    pub messages_edited: u64,
    pub updates_received: u64,
    /// Presence figures (the presence scenario).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceFigures>,
    /// The messages nats-server took in and sent out in the measured
    /// window, all nodes.
    pub nats_counts: crate::system::NatsCounts,
}

pub fn token(user: &str) -> anyhow::Result<String> {
    let id = chat_domain::UserId::parse(user)?;
    Ok(chat_auth::mint_hs256(
        crate::system::SECRET.as_bytes(),
        &id,
        None,
        86_400,
    )?)
}

fn user(i: usize) -> String {
    format!("u{i}")
}

/// Incoming frame, parsed without copying the parts we do not read.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, borrow)]
    data: Option<Data<'a>>,
}

#[derive(Deserialize, Default)]
struct Data<'a> {
    seq: Option<u64>,
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(borrow)]
    code: Option<Cow<'a, str>>,
    #[serde(borrow, rename = "userId")]
    user_id: Option<Cow<'a, str>>,
    forwarded: Option<bool>,
    #[serde(borrow, rename = "messageId")]
    message_id: Option<Cow<'a, str>>,
}

/// Bytes a client reads from its socket at most per read. tungstenite
/// zero-fills this much of its buffer before every read: at its default
/// (128 KiB) that fill was a third of the load generator's CPU in the
/// fan-out scenario (`perf`, December 4), taken from the system it
/// measures on the same two cores. Chat frames are a few hundred bytes.
const CLIENT_READ_BUFFER: usize = 16 * 1024;

fn client_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(CLIENT_READ_BUFFER)
}

/// Opens a session and waits for `a_session`.
pub async fn connect(addr: SocketAddr, user: &str) -> anyhow::Result<Ws> {
    let url = format!("ws://{addr}/ws?token={}&device=load", token(user)?);
    let mut attempts = 0;
    let (mut ws, _) = loop {
        match tokio_tungstenite::connect_async_with_config(
            url.as_str(),
            Some(client_config()),
            true,
        )
        .await
        {
            // the server sheds load with 503 while busy: back off, as a
            // client would
            Err(tokio_tungstenite::tungstenite::Error::Http(r))
                if r.status() == 503 && attempts < 20 =>
            {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(100 * attempts)).await;
            }
            other => break other.with_context(|| format!("connect {user}"))?,
        }
    };
    let first = next_text(&mut ws, Duration::from_secs(30)).await?;
    if !first.contains("\"a_session\"") {
        bail!("first frame is not a_session: {first}");
    }
    Ok(ws)
}

async fn next_text(ws: &mut Ws, within: Duration) -> anyhow::Result<String> {
    loop {
        match tokio::time::timeout(within, ws.next()).await {
            Err(_) => bail!("nothing received in {within:?}"),
            Ok(None) => bail!("connection closed"),
            Ok(Some(m)) => match m? {
                Message::Text(t) => return Ok(t.to_string()),
                Message::Close(c) => bail!("closed: {c:?}"),
                _ => {}
            },
        }
    }
}

/// Sends a request and waits for its reply, skipping pushes; retries
/// `unavailable` (the outcome is unknown, and every request used here is
/// idempotent) a few times with a growing pause, as clients should.
pub async fn request(ws: &mut Ws, id: u64, event: &str, data: Value) -> anyhow::Result<Value> {
    let mut pause = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let frame = json!({"event": event, "id": id, "data": data}).to_string();
        ws.send(Message::Text(frame.into())).await?;
        let reply = loop {
            let text = next_text(ws, Duration::from_secs(30)).await?;
            let v: Value = serde_json::from_str(&text)?;
            if v["id"] == id {
                break v;
            }
        };
        if reply["event"] != "error" {
            return Ok(reply["data"].clone());
        }
        if reply["data"]["code"] != "unavailable" || attempt >= 8 {
            bail!("{event} failed: {}", reply["data"]);
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
}

/// `POST /groups` as `owner`; returns the group id.
pub async fn create_group(
    http: &reqwest::Client,
    addr: SocketAddr,
    owner: &str,
    members: &[String],
) -> anyhow::Result<String> {
    let r = http
        .post(format!("http://{addr}/groups"))
        .bearer_auth(token(owner)?)
        .json(&json!({"name": format!("load {owner}"), "members": members}))
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await?;
    if status != 201 {
        bail!("create group: {status} {body}");
    }
    body["id"]
        .as_str()
        .map(str::to_owned)
        .context("group without id")
}

/// Creates `count` groups of `members` users, starting at user `first`.
async fn create_groups(
    addr: SocketAddr,
    first: usize,
    count: usize,
    members: usize,
) -> anyhow::Result<Vec<String>> {
    let http = chat_http::client();
    futures::stream::iter(0..count)
        .map(|g| {
            let http = http.clone();
            async move {
                let base = first + g * members;
                let list: Vec<String> = (base..base + members).map(user).collect();
                create_group(&http, addr, &list[0], &list).await
            }
        })
        .buffered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Runs `open` for `0..n` at most `rate` per second, printing progress;
/// returns the results in order and the seconds it took.
async fn paced<T, F, Fut>(what: &str, n: usize, rate: f64, open: F) -> anyhow::Result<(Vec<T>, f64)>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<T>> + Send + 'static,
{
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let progress = {
        let done = done.clone();
        let what = what.to_owned();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let d = done.load(Ordering::Relaxed);
                let secs = started.elapsed().as_secs_f64();
                eprint!(
                    "\r  {what}: {d}/{n} ({:.0}/s)   ",
                    d as f64 / secs.max(1e-3)
                );
            }
        })
    };
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.001)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    // bounded: a slow server backs the pacing up instead of piling up tasks
    let inflight = Arc::new(tokio::sync::Semaphore::new(256));
    let mut set = JoinSet::new();
    for i in 0..n {
        tick.tick().await;
        let permit = inflight.clone().acquire_owned().await?;
        let fut = open(i);
        let done = done.clone();
        set.spawn(async move {
            let r = fut.await;
            drop(permit);
            done.fetch_add(1, Ordering::Relaxed);
            (i, r)
        });
    }
    let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        let (i, r) = r?;
        out[i] = Some(r?);
    }
    progress.abort();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "\r  {what}: {n}/{n} in {secs:.1} s ({:.0}/s)      ",
        n as f64 / secs.max(1e-3)
    );
    Ok((out.into_iter().flatten().collect(), secs))
}

/// Runs the plan against the edge at `addr`; `chatd` and `nats` are the
/// server processes whose memory per connection is read.
pub async fn run(
    plan: &Plan,
    addr: SocketAddr,
    chatd: u32,
    nats: u32,
    server: &[(&str, u32)],
    monitors: &[String],
) -> anyhow::Result<(ChatResult, Vec<crate::system::ProcUsage>)> {
    let n = plan.connections();
    eprintln!(
        "chat: {} groups of {}, {} connections, {} registered offline",
        plan.groups, plan.members, n, plan.offline_users
    );
    let groups = create_groups(addr, 0, plan.groups, plan.members).await?;

    // offline users: one session each, subscribed, then gone
    let mut register_secs = 0.0;
    if plan.offline_users > 0 {
        let offline_groups = plan.offline_users.div_ceil(plan.members);
        let og = create_groups(addr, n, offline_groups, plan.members).await?;
        let og = Arc::new(og);
        let members = plan.members;
        let (_, secs) = paced(
            "registering offline users",
            offline_groups * members,
            plan.connect_rate,
            |i| {
                let og = og.clone();
                async move {
                    let mut ws = connect(addr, &user(n + i)).await?;
                    request(
                        &mut ws,
                        1,
                        "subscribe_to_group",
                        json!({"groupId": og[i / members]}),
                    )
                    .await?;
                    ws.close(None).await.ok();
                    Ok(())
                }
            },
        )
        .await?;
        register_secs = secs;
    }

    let mem_before = (crate::system::sample(chatd), crate::system::sample(nats));
    let groups = Arc::new(groups);
    let (conns, connect_secs) = paced("connecting", n, plan.connect_rate, |i| {
        let groups = groups.clone();
        let members = plan.members;
        async move {
            let mut ws = connect(addr, &user(i)).await?;
            request(
                &mut ws,
                1,
                "subscribe_to_group",
                json!({"groupId": groups[i / members]}),
            )
            .await?;
            Ok(ws)
        }
    })
    .await?;
    // let the server settle (consumers created, buffers shrunk) before
    // reading its memory
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mem_after = (crate::system::sample(chatd), crate::system::sample(nats));
    let per_conn = |a: u64, b: u64| (b as f64 - a as f64) / n.max(1) as f64;

    let secs = (plan.warmup + plan.duration).as_secs() as usize + 120;
    let epoch = Instant::now();
    let shared = Arc::new(Shared {
        epoch,
        size: plan.size,
        measure: (AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)),
        sent: Timeline::new(epoch, secs),
        acked: Timeline::new(epoch, secs),
        delivered: Timeline::new(epoch, secs),
        outstanding: AtomicU64::new(0),
        unique: AtomicU64::new(0),
        group_last: (0..plan.groups).map(|_| AtomicU64::new(0)).collect(),
        seen: (0..plan.connections()).map(|_| AtomicU64::new(0)).collect(),
        typed_at: (0..plan.connections()).map(|_| AtomicU64::new(0)).collect(),
        forwarded: AtomicU64::new(0),
        typing_received: AtomicU64::new(0),
        edits_acked: AtomicU64::new(0),
        messages_edited: AtomicU64::new(0),
        updates_received: AtomicU64::new(0),
        presence_received: (AtomicU64::new(0), AtomicU64::new(0)),
    });
    let (phase_tx, phase_rx) = watch::channel(Phase::Wait);
    let senders = plan.groups * plan.senders_per_group;
    let period = plan
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(senders as f64 / r));
    let mut tasks = JoinSet::new();
    for (i, ws) in conns.into_iter().enumerate() {
        let sends = i % plan.members < plan.senders_per_group;
        let job = Job {
            index: i,
            group: i / plan.members,
            group_id: groups[i / plan.members].clone(),
            sends: sends && (plan.rate.is_none() || period.is_some()),
            period,
            window: plan.window.max(1),
            typing: plan.typing,
            edits: plan.edits,
        };
        tasks.spawn(job.run(ws, shared.clone(), phase_rx.clone()));
    }

    let window = crate::system::Window::open(server);
    eprintln!(
        "  sending: {} s warm-up, {} s measured",
        plan.warmup.as_secs(),
        plan.duration.as_secs()
    );
    phase_tx.send_replace(Phase::Send);
    tokio::time::sleep(plan.warmup).await;
    let from = micros_since(epoch);
    shared.measure.0.store(from, Ordering::Relaxed);
    shared.measure.1.store(u64::MAX, Ordering::Relaxed);
    let measured_at = Instant::now();
    let counts_before = crate::system::NatsCounts::read(monitors).await?;
    tokio::time::sleep(plan.duration).await;
    let to = micros_since(epoch);
    shared.measure.1.store(to, Ordering::Relaxed);
    let nats_counts = crate::system::NatsCounts::read(monitors)
        .await?
        .since(counts_before);
    let usage = window.close();
    let measured_secs = measured_at.elapsed().as_secs_f64();
    let presence = if plan.presence {
        Some(presence_figures(addr, &groups[0], &shared).await?)
    } else {
        None
    };
    phase_tx.send_replace(Phase::Stop);

    // every send answered, then every member has everything
    wait_for("acks", Duration::from_secs(60), || {
        shared.outstanding.load(Ordering::Relaxed) == 0
    })
    .await;
    let expected: u64 = shared
        .group_last
        .iter()
        .map(|g| g.load(Ordering::Relaxed) * plan.members as u64)
        .sum();
    // each connection against its own group: a total across members was
    // met early by deliveries of messages whose acks never came, and
    // members still behind were then counted as lost
    wait_for("deliveries", Duration::from_secs(60), || {
        shared.unique.load(Ordering::Relaxed) >= expected && shared.all_delivered(plan.members)
    })
    .await;
    // every typing signal passed on reaches the group's other members
    let typing_expected =
        shared.forwarded.load(Ordering::Relaxed) * plan.members.saturating_sub(1) as u64;
    wait_for("typing", Duration::from_secs(10), || {
        shared.typing_received.load(Ordering::Relaxed) >= typing_expected
    })
    .await;
    // every acknowledged edit reaches every member's connection (the
    // editor's own too)
    let updates_expected = shared.edits_acked.load(Ordering::Relaxed) * plan.members as u64;
    wait_for("edits", Duration::from_secs(60), || {
        shared.updates_received.load(Ordering::Relaxed) >= updates_expected
    })
    .await;
    phase_tx.send_replace(Phase::Done);

    let mut delivery = Latency::default();
    let mut ack = Latency::default();
    let mut integrity = Integrity::default();
    let mut errors = BTreeMap::new();
    let (mut sent, mut acked, mut skipped, mut unexpected) = (0, 0, 0, 0);
    while let Some(r) = tasks.join_next().await {
        let (group, r) = r??;
        delivery.merge(&r.delivery);
        ack.merge(&r.ack);
        integrity.add(&r.order, shared.group_last[group].load(Ordering::Relaxed));
        for (k, v) in r.errors {
            *errors.entry(k).or_insert(0) += v;
        }
        sent += r.sent;
        acked += r.acked;
        skipped += r.skipped;
        unexpected += r.unexpected;
    }
    let typing_received = shared.typing_received.load(Ordering::Relaxed);
    // more is fine: a typer still typing when the run ends gets a stop
    // from its edge as its connection closes
    if plan.typing && typing_received < typing_expected {
        // signals are not stored: a miss is a fact to report, not a loss
        // of data, and not checked by the message integrity
        errors.insert(
            format!("typing_received_{typing_received}_of_{typing_expected}"),
            1,
        );
    }
    let updates_received = shared.updates_received.load(Ordering::Relaxed);
    if plan.edits && updates_received != updates_expected {
        errors.insert(
            format!("updates_received_{updates_received}_of_{updates_expected}"),
            1,
        );
    }
    let window_secs = |t: &Timeline| -> Vec<u64> { t.per_second() };
    let sent_ps = window_secs(&shared.sent);
    let acked_ps = window_secs(&shared.acked);
    let delivered_ps = window_secs(&shared.delivered);
    let from_s = plan.warmup.as_secs() as usize;
    let to_s = from_s + plan.duration.as_secs() as usize;
    let rate_in = |v: &[u64]| -> f64 {
        let slice = &v[from_s.min(v.len())..to_s.min(v.len())];
        slice.iter().sum::<u64>() as f64 / slice.len().max(1) as f64
    };
    let last_busy = delivered_ps
        .iter()
        .rposition(|v| *v > 0)
        .map_or(to_s, |i| i + 1)
        .max(to_s);
    let result = ChatResult {
        plan: plan.clone(),
        connections: n,
        connect_secs,
        connects_per_sec: n as f64 / connect_secs.max(1e-3),
        register_secs,
        measured_secs,
        sent,
        acked,
        skipped,
        errors,
        offered_per_sec: rate_in(&sent_ps),
        sends_per_sec: rate_in(&acked_ps),
        deliveries_per_sec: rate_in(&delivered_ps),
        delivery: delivery.summary(),
        ack: ack.summary(),
        integrity,
        unexpected_frames: unexpected,
        sent_per_second: acked_ps[..last_busy.min(acked_ps.len())].to_vec(),
        delivered_per_second: delivered_ps[..last_busy.min(delivered_ps.len())].to_vec(),
        chatd_kib_per_connection: per_conn(mem_before.0.rss_kib, mem_after.0.rss_kib),
        nats_kib_per_connection: per_conn(mem_before.1.rss_kib, mem_after.1.rss_kib),
        presence,
        edits_acked: shared.edits_acked.load(Ordering::Relaxed),
        messages_edited: shared.messages_edited.load(Ordering::Relaxed),
        updates_received,
        nats_counts,
    };
    Ok((result, usage))
}

/// What presence cost in a run.
#[derive(Debug, Clone, Serialize)]
pub struct PresenceFigures {
    /// `a_presence` frames received by all members once connected.
    pub frames_after_connect: u64,
    /// Of those, in the measured window (everyone connected, idle).
    pub frames_while_idle: u64,
    /// `GET /groups/{id}/presence` of the whole group, 20 times.
    pub get_p50_ms: f64,
    pub get_max_ms: f64,
    pub members_listed: usize,
    pub online_listed: usize,
}

async fn presence_figures(
    addr: SocketAddr,
    group: &str,
    shared: &Shared,
) -> anyhow::Result<PresenceFigures> {
    let http = chat_http::client();
    let mut times = Vec::new();
    let mut body = Value::Null;
    for _ in 0..20 {
        let t = Instant::now();
        let r = http
            .get(format!("http://{addr}/groups/{group}/presence"))
            .bearer_auth(token(&user(0))?)
            .send()
            .await?;
        let status = r.status();
        body = r.json().await?;
        if status != 200 {
            bail!("presence: {status} {body}");
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let members = body["members"].as_array().cloned().unwrap_or_default();
    Ok(PresenceFigures {
        frames_after_connect: shared.presence_received.0.load(Ordering::Relaxed),
        frames_while_idle: shared.presence_received.1.load(Ordering::Relaxed),
        get_p50_ms: times[times.len() / 2],
        get_max_ms: times[times.len() - 1],
        members_listed: members.len(),
        online_listed: members.iter().filter(|m| m["online"] == true).count(),
    })
}

async fn wait_for(what: &str, within: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            eprintln!("  gave up waiting for {what} after {within:?}; counting the rest as lost");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One connection's part in the run.
struct Job {
    /// The connection's number, which spreads its sends over the period.
    index: usize,
    group: usize,
    group_id: String,
    sends: bool,
    period: Option<Duration>,
    window: usize,
    typing: bool,
    edits: bool,
}

/// Most unacknowledged sends one connection keeps at a fixed rate; past it
/// the sends the rate calls for are skipped (and counted), so an overloaded
/// run measures queueing, not an ever-growing backlog.
const MAX_OUTSTANDING: usize = 20;

impl Job {
    async fn run(
        self,
        mut ws: Ws,
        shared: Arc<Shared>,
        mut phase: watch::Receiver<Phase>,
    ) -> anyhow::Result<(usize, ConnResult)> {
        let mut r = ConnResult::default();
        let mut pending: BTreeMap<u64, u64> = BTreeMap::new();
        // the edits scenario: the message this connection edits, and which
        // requests in flight are edits
        let mut own: Option<String> = None;
        let mut edited = false;
        let mut edit_ids = std::collections::HashSet::new();
        let mut next_id = 10u64;
        let mut current = *phase.borrow();
        let period = self.period.unwrap_or(Duration::from_secs(3600));
        // spread the senders over the period
        let offset = period.mul_f64(rand_fraction(self.index));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let pad = "x".repeat(shared.size);
        loop {
            let paced = self.sends && self.period.is_some() && current == Phase::Send;
            let mut want_send = 0usize;
            tokio::select! {
                changed = phase.changed() => {
                    if changed.is_err() { break; }
                    current = *phase.borrow_and_update();
                    if current == Phase::Done { break; }
                    if current == Phase::Send && self.sends && self.period.is_none() {
                        want_send = self.window;
                    }
                }
                _ = tick.tick(), if paced => {
                    if pending.len() < MAX_OUTSTANDING { want_send = 1; } else { r.skipped += 1; }
                }
                msg = ws.next() => {
                    let text = match msg {
                        None => bail!("connection closed by the server"),
                        Some(Err(e)) => bail!("connection failed: {e}"),
                        Some(Ok(Message::Text(t))) => t,
                        Some(Ok(Message::Close(c))) => bail!("closed by the server: {c:?}"),
                        Some(Ok(_)) => continue,
                    };
                    let now = micros_since(shared.epoch);
                    let (from, to) = (shared.measure.0.load(Ordering::Relaxed), shared.measure.1.load(Ordering::Relaxed));
                    let Ok(frame) = serde_json::from_str::<Incoming>(&text) else {
                        r.unexpected += 1;
                        continue;
                    };
                    let data = frame.data.unwrap_or_default();
                    match frame.event.as_ref() {
                        "a_group_message" => {
                            let seq = data.seq.unwrap_or(0);
                            if r.order.see(seq) {
                                shared.unique.fetch_add(1, Ordering::Relaxed);
                                if let Some(seen) = shared.seen.get(self.index) {
                                    seen.store(r.order.contiguous(), Ordering::Relaxed);
                                }
                            }
                            shared.delivered.add(1);
                            let sent_at = data
                                .text
                                .as_deref()
                                .and_then(|t| t.split(' ').next())
                                .and_then(|t| t.parse::<u64>().ok());
                            if let Some(t) = sent_at && t >= from && t <= to {
                                r.delivery.record_us(now.saturating_sub(t));
                            }
                        }
                        "ack" | "error" => {
                            let Some(t) = frame.id.and_then(|id| pending.remove(&id)) else {
                                r.unexpected += 1;
                                continue;
                            };
                            shared.outstanding.fetch_sub(1, Ordering::Relaxed);
                            if data.forwarded == Some(true) {
                                shared.forwarded.fetch_add(1, Ordering::Relaxed);
                            }
                            let was_edit = edit_ids.remove(&frame.id.unwrap_or_default());
                            if frame.event == "ack" && was_edit {
                                shared.edits_acked.fetch_add(1, Ordering::Relaxed);
                                if !std::mem::replace(&mut edited, true) {
                                    shared.messages_edited.fetch_add(1, Ordering::Relaxed);
                                }
                            } else if frame.event == "ack" && self.edits && own.is_none() {
                                own = data.message_id.as_deref().map(str::to_owned);
                            }
                            if frame.event == "ack" {
                                r.acked += 1;
                                shared.acked.add(1);
                                if let Some(seq) = data.seq {
                                    shared.group_last[self.group].fetch_max(seq, Ordering::Relaxed);
                                }
                                if t >= from && t <= to {
                                    r.ack.record_us(now.saturating_sub(t));
                                }
                            } else {
                                let code = data.code.as_deref().unwrap_or("?").to_owned();
                                *r.errors.entry(code).or_insert(0) += 1;
                            }
                            if current == Phase::Send && self.sends && self.period.is_none() {
                                want_send = 1;
                            }
                        }
                        "a_presence" => {
                            shared.presence_received.0.fetch_add(1, Ordering::Relaxed);
                            if now >= from && now <= to {
                                shared.presence_received.1.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        "a_message_updated" => {
                            shared.updates_received.fetch_add(1, Ordering::Relaxed);
                            shared.delivered.add(1);
                            let edited_at = data
                                .text
                                .as_deref()
                                .and_then(|t| t.split(' ').next())
                                .and_then(|t| t.parse::<u64>().ok());
                            if let Some(t) = edited_at && t >= from && t <= to {
                                r.delivery.record_us(now.saturating_sub(t));
                            }
                        }
                        "a_typing" => {
                            shared.typing_received.fetch_add(1, Ordering::Relaxed);
                            shared.delivered.add(1);
                            let typer = data
                                .user_id
                                .as_deref()
                                .and_then(|u| u.strip_prefix('u'))
                                .and_then(|i| i.parse::<usize>().ok())
                                .and_then(|i| shared.typed_at.get(i))
                                .map(|t| t.load(Ordering::Relaxed));
                            if let Some(t) = typer && t >= from && t <= to {
                                r.delivery.record_us(now.saturating_sub(t));
                            }
                        }
                        // a_message_status and the like
                        _ => {}
                    }
                }
            }
            for _ in 0..want_send {
                let t = micros_since(shared.epoch);
                let mut text = format!("{t} ");
                let room = shared.size.saturating_sub(text.len()).max(1);
                text.push_str(&pad[..room.min(pad.len())]);
                let id = next_id;
                next_id += 1;
                if self.typing {
                    // start and stop in turn: each one is news, so each is
                    // passed on (a typer's period is over the edge's 2 s
                    // refresh only for starts, which stops separate)
                    let state = if r.sent % 2 == 0 { "start" } else { "stop" };
                    let frame = json!({
                        "event": "typing",
                        "id": id,
                        "data": { "groupId": self.group_id, "state": state }
                    })
                    .to_string();
                    pending.insert(id, t);
                    shared.outstanding.fetch_add(1, Ordering::Relaxed);
                    if let Some(at) = shared.typed_at.get(self.index) {
                        at.store(t, Ordering::Relaxed);
                    }
                    ws.send(Message::Text(frame.into())).await?;
                    r.sent += 1;
                    shared.sent.add(1);
                    continue;
                }
                if let Some(message) = own.as_deref().filter(|_| self.edits) {
                    let frame = json!({
                        "event": "edit_group_message",
                        "id": id,
                        "data": { "groupId": self.group_id, "messageId": message, "text": text }
                    })
                    .to_string();
                    pending.insert(id, t);
                    edit_ids.insert(id);
                    shared.outstanding.fetch_add(1, Ordering::Relaxed);
                    ws.send(Message::Text(frame.into())).await?;
                    r.sent += 1;
                    shared.sent.add(1);
                    continue;
                }
                let frame = json!({
                    "event": "send_group_message",
                    "id": id,
                    "data": {
                        "groupId": self.group_id,
                        "clientMsgId": ClientMsgId::generate().as_str(),
                        "type": "text",
                        "text": text,
                    }
                })
                .to_string();
                pending.insert(id, t);
                shared.outstanding.fetch_add(1, Ordering::Relaxed);
                ws.send(Message::Text(frame.into())).await?;
                r.sent += 1;
                shared.sent.add(1);
            }
        }
        ws.close(None).await.ok();
        Ok((self.group, r))
    }
}

/// A cheap, deterministic spread in [0, 1).
fn rand_fraction(a: usize) -> f64 {
    let mut x = (a as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    (x % 1_000_000) as f64 / 1_000_000.0
}

#[derive(Debug, Serialize)]
pub struct CatchUpResult {
    pub missed: u64,
    pub size: usize,
    /// Seconds the sender took to send them (acked, persisted).
    pub send_secs: f64,
    /// From the reconnect (before the WebSocket handshake) to the last one.
    pub catch_up_secs: f64,
    pub messages_per_sec: f64,
    pub integrity: Integrity,
}

/// A member offline for `missed` messages reconnects: how long until all
/// have arrived, in order.
pub async fn catch_up(addr: SocketAddr, missed: u64, size: usize) -> anyhow::Result<CatchUpResult> {
    let http = chat_http::client();
    let (alice, bob) = ("catchup-a".to_owned(), "catchup-b".to_owned());
    let group = create_group(&http, addr, &alice, &[alice.clone(), bob.clone()]).await?;
    let mut reader = connect(addr, &bob).await?;
    request(
        &mut reader,
        1,
        "subscribe_to_group",
        json!({"groupId": group}),
    )
    .await?;
    reader.close(None).await.ok();
    drop(reader);
    let mut sender = connect(addr, &alice).await?;
    eprintln!("catch-up: sending {missed} messages while the member is offline");
    let started = Instant::now();
    fill(&mut sender, &group, missed, size).await?;
    let send_secs = started.elapsed().as_secs_f64();
    eprintln!("  sent in {send_secs:.1} s; reconnecting");
    let started = Instant::now();
    let mut reader = connect(addr, &bob).await?;
    let mut order = Order::default();
    while order.last < missed {
        let text = next_text(&mut reader, Duration::from_secs(30)).await?;
        let Ok(frame) = serde_json::from_str::<Incoming>(&text) else {
            continue;
        };
        if frame.event == "a_group_message" {
            order.see(frame.data.and_then(|d| d.seq).unwrap_or(0));
        }
    }
    let catch_up_secs = started.elapsed().as_secs_f64();
    let mut integrity = Integrity::default();
    integrity.add(&order, missed);
    Ok(CatchUpResult {
        missed,
        size,
        send_secs,
        catch_up_secs,
        messages_per_sec: missed as f64 / catch_up_secs.max(1e-6),
        integrity,
    })
}

/// Sends `count` texts of `size` bytes to `group`, as fast as acks allow
/// with a few in flight.
async fn fill(sender: &mut Ws, group: &str, count: u64, size: usize) -> anyhow::Result<()> {
    let pad = "x".repeat(size);
    let window = 16u64;
    let mut next = 1u64;
    let mut acked = 0u64;
    let mut inflight = 0u64;
    while acked < count {
        while inflight < window && next <= count {
            let frame = json!({
                "event": "send_group_message", "id": next,
                "data": {"groupId": group, "clientMsgId": ClientMsgId::generate().as_str(), "type": "text", "text": pad}
            });
            sender.send(Message::Text(frame.to_string().into())).await?;
            next += 1;
            inflight += 1;
        }
        let text = next_text(sender, Duration::from_secs(30)).await?;
        if text.contains("\"event\":\"ack\"") {
            acked += 1;
            inflight -= 1;
        } else if text.contains("\"event\":\"error\"") {
            bail!("send failed: {text}");
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
pub struct SearchResult {
    /// Messages in the group.
    pub messages: u64,
    pub size: usize,
    /// Search calls made, one after another.
    pub calls: u64,
    /// Messages those calls opened (each reads and decrypts).
    pub opened: u64,
    pub seconds: f64,
    pub calls_per_sec: f64,
    pub opened_per_sec: f64,
    /// One call's latency, client side (HTTP to the edge, gRPC to the
    /// worker, reads of MongoDB, decryption).
    pub latency: Percentiles,
}

/// A group of `messages` texts; `calls` searches for a word none holds,
/// one after another, each going on from the last one's `next` (so each
/// opens the most a call may, `--max-search-scan`), starting over at the
/// newest once the search reached the first message.
pub async fn search(
    addr: SocketAddr,
    messages: u64,
    size: usize,
    calls: u64,
    processes: &[(&str, u32)],
) -> anyhow::Result<(SearchResult, Vec<crate::system::ProcUsage>)> {
    let http = chat_http::client();
    let owner = "search-a".to_owned();
    let group = create_group(&http, addr, &owner, std::slice::from_ref(&owner)).await?;
    let mut sender = connect(addr, &owner).await?;
    eprintln!("search: sending {messages} messages");
    fill(&mut sender, &group, messages, size).await?;
    sender.close(None).await.ok();
    let token = token(&owner)?;
    let mut latency = Latency::default();
    let mut opened = 0u64;
    let mut before: Option<u64> = None;
    let top = messages + 1;
    eprintln!("search: {calls} calls");
    // the processes' use while searching, not while sending
    let window = crate::system::Window::open(processes);
    let started = Instant::now();
    for _ in 0..calls {
        let from = before.unwrap_or(top);
        let url = format!("http://{addr}/groups/{group}/search?q=nowhere&before={from}");
        let at = Instant::now();
        let res = http.get(&url).bearer_auth(&token).send().await?;
        let status = res.status();
        let page: Value = res.json().await?;
        latency.record_us(micros_since(at));
        if !status.is_success() {
            bail!("search: {status} {page}");
        }
        let next = page["next"].as_u64();
        // from `before - 1` down to `next` (opened last), or to the first
        opened += next.map_or(from - 1, |n| from - n);
        before = next;
    }
    let seconds = started.elapsed().as_secs_f64();
    let usage = window.close();
    let result = SearchResult {
        messages,
        size,
        calls,
        opened,
        seconds,
        calls_per_sec: calls as f64 / seconds.max(1e-6),
        opened_per_sec: opened as f64 / seconds.max(1e-6),
        latency: latency.summary(),
    };
    Ok((result, usage))
}
