//! The end-to-end test harness: a [`Cluster`] of real services (NATS with
//! JetStream, SecantusDB, s3s-fs) plus in-process `chatd` edge and worker
//! nodes started through the same flags an operator uses, and a WebSocket
//! [`Client`] that speaks the client contract.
//!
//! Nothing here sleeps to synchronise: every wait is for a condition, with a
//! deadline.

use std::{collections::VecDeque, net::SocketAddr, time::Duration};

use anyhow::{Context, bail};
use chat_domain::UserId;
use clap::Parser;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

mod audit;
pub mod pki;

/// Where the query audit is reported (`CHAT_QUERY_AUDIT`), if it runs:
/// see `audit.rs` and `scripts/audit-queries`.
fn query_audit() -> Option<std::path::PathBuf> {
    std::env::var_os("CHAT_QUERY_AUDIT").map(Into::into)
}

pub use chat_stack::Stack;

/// The HS256 secret every test node uses.
pub const SECRET: &str = "end-to-end-test-secret-0123456789abcdef";

/// The secret every test node's edges and workers share.
pub const SERVICE_SECRET: &str = "end-to-end-service-secret-0123456789abcdef";

/// The encryption key every test node starts with (32 zero bytes is fine
/// for tests; production keys come from `chatd keygen`).
pub const KEY: &str = "t1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";

/// A channel to the worker at `url` whose calls are signed with
/// [`SERVICE_SECRET`], as an edge's are.
pub async fn signed_channel(
    url: &str,
) -> anyhow::Result<chat_rpc::Signed<tonic::transport::Channel>> {
    signed_channel_with(url, None).await
}

/// As [`signed_channel`], over TLS with `tls` (an `https://` URL).
pub async fn signed_channel_with(
    url: &str,
    tls: Option<&chat_rpc::ClientTls>,
) -> anyhow::Result<chat_rpc::Signed<tonic::transport::Channel>> {
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.config(None))?;
    }
    let channel = endpoint.connect().await?;
    let secret = chat_rpc::ServiceSecret::new(SERVICE_SECRET)?;
    Ok(chat_rpc::Signed::to_worker(channel, secret).await?)
}

/// The status of `GET /groups` as `user` at the edge listening at `http`
/// (an extra node's): 200 when it can call a worker, 503 when none.
pub async fn groups_status(http: SocketAddr, user: &str) -> anyhow::Result<u16> {
    Ok(chat_http::client()
        .get(format!("http://{http}/groups"))
        .bearer_auth(token(user))
        .send()
        .await?
        .status()
        .as_u16())
}

/// How long a test waits for something that should happen promptly.
pub const PROMPTLY: Duration = Duration::from_secs(10);

/// Flags for a flood of large messages that a slow reader cannot keep up
/// with: a small outbox (256 KiB), texts up to 60,000 bytes, and a request
/// budget the flood stays within.
pub const FLOOD: &[&str] = &[
    "--ws-outbox-bytes",
    "262144",
    "--max-text-bytes",
    "60000",
    "--requests-per-sec",
    "1000",
];

/// Real services plus chatd nodes.
pub struct Cluster {
    pub stack: Stack,
    workers: Vec<(Option<chatd::Node>, SocketAddr)>,
    edges: Vec<Option<chatd::Node>>,
    edge_addrs: Vec<SocketAddr>,
    edge_ops: Vec<SocketAddr>,
    extra_flags: Vec<String>,
    /// `--encryption-keys` of every node started from now on.
    pub keys: String,
}

impl Cluster {
    /// Starts the services, `workers` workers and `edges` edges.
    pub async fn start(edges: usize, workers: usize) -> anyhow::Result<Self> {
        Self::start_with(edges, workers, &[]).await
    }

    /// As [`Cluster::start`], with extra `chatd` flags for every node.
    pub async fn start_with(edges: usize, workers: usize, flags: &[&str]) -> anyhow::Result<Self> {
        Self::start_on(Stack::start().await?, edges, workers, flags).await
    }

    /// As [`Cluster::start`], on a NATS cluster of `nats_nodes` with streams
    /// replicated on every node.
    pub async fn start_clustered(
        nats_nodes: usize,
        edges: usize,
        workers: usize,
    ) -> anyhow::Result<Self> {
        let replicas = nats_nodes.to_string();
        Self::start_on(
            Stack::start_with_nats(nats_nodes).await?,
            edges,
            workers,
            &["--nats-replicas", &replicas],
        )
        .await
    }

    /// As [`Cluster::start_with`], on services the test started itself (a
    /// NATS server with TLS, say).
    pub async fn start_on(
        stack: Stack,
        edges: usize,
        workers: usize,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        // node logs go to the test's output, shown when a test fails
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_test_writer()
            .try_init();
        if let Some(report) = query_audit() {
            audit::start(&stack.mongo.uri)
                .await
                .with_context(|| format!("query audit to {}", report.display()))?;
        }
        let mut cluster = Self {
            stack,
            workers: Vec::new(),
            edges: Vec::new(),
            edge_addrs: Vec::new(),
            edge_ops: Vec::new(),
            extra_flags: flags.iter().map(|s| s.to_string()).collect(),
            keys: KEY.to_owned(),
        };
        for _ in 0..workers {
            let node = cluster
                .start_node("worker", "127.0.0.1:0", "127.0.0.1:0")
                .await?;
            let addr = node.grpc_addr.context("worker has no grpc address")?;
            cluster.workers.push((Some(node), addr));
        }
        for _ in 0..edges {
            let node = cluster
                .start_node("edge", "127.0.0.1:0", "127.0.0.1:0")
                .await?;
            cluster
                .edge_addrs
                .push(node.http_addr.context("edge has no http address")?);
            cluster
                .edge_ops
                .push(node.ops_addr.context("edge has no ops address")?);
            cluster.edges.push(Some(node));
        }
        Ok(cluster)
    }

    /// The command line of a node, as an operator would write it.
    fn node_argv(&self, role: &str, listen: &str, grpc: &str) -> Vec<String> {
        let workers: Vec<String> = self
            .workers
            .iter()
            .map(|(_, a)| format!("{}://{a}", self.worker_scheme()))
            .collect();
        let mut argv: Vec<String> = [
            "chatd",
            "--role",
            role,
            "--listen",
            listen,
            "--grpc-listen",
            grpc,
            "--metrics-listen",
            "127.0.0.1:0",
            "--nats-url",
            &self.stack.nats.url,
            "--mongodb-uri",
            &self.stack.mongo.uri,
            "--jwt-secret",
            SECRET,
            "--shutdown-grace-secs",
            "5",
            "--encryption-keys",
            &self.keys,
            "--resolve-pending-after-ms",
            "1000",
            "--service-secret",
            SERVICE_SECRET,
            // every test client comes from 127.0.0.1: the per-address limit
            // has a test of its own
            "--address-requests-per-sec",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(self.stack.nats.users.for_role(role).flags());
        let s3 = &self.stack.s3;
        argv.extend(
            [
                "--s3-endpoint",
                &s3.endpoint,
                "--s3-bucket",
                &s3.bucket,
                "--s3-access-key",
                &s3.access_key,
                "--s3-secret-key",
                &s3.secret_key,
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        if !workers.is_empty() {
            argv.push("--workers".into());
            argv.push(workers.join(","));
        }
        argv.extend(self.extra_flags.iter().cloned());
        argv
    }

    /// Starts one more node of `role` outside the cluster's lists, with
    /// the cluster's flags except those in `set` (flag, value), which
    /// replace or add to them (an empty value drops the flag): a worker
    /// with another secret, an edge with other workers.
    pub async fn start_extra_node(
        &self,
        role: &str,
        set: &[(&str, &str)],
    ) -> anyhow::Result<chatd::Node> {
        let mut argv = self.node_argv(role, "127.0.0.1:0", "127.0.0.1:0");
        for (flag, value) in set {
            match (argv.iter().position(|a| a == flag), value.is_empty()) {
                (Some(i), true) => drop(argv.drain(i..i + 2)),
                (Some(i), false) => argv[i + 1] = (*value).to_owned(),
                (None, true) => {}
                (None, false) => argv.extend([(*flag).to_owned(), (*value).to_owned()]),
            }
        }
        let cli = chatd::Cli::try_parse_from(argv)?;
        chatd::Node::start(cli.serve).await
    }

    /// As [`Cluster::start_extra_node`], for a node that must refuse to
    /// start: the error it gave, in full; an error if it started.
    pub async fn refused_extra_node(
        &self,
        role: &str,
        set: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        match self.start_extra_node(role, set).await {
            Ok(node) => {
                node.stop().await?;
                bail!("a {role} started with {set:?}, which it should refuse")
            }
            Err(e) => Ok(format!("{e:#}")),
        }
    }

    async fn start_node(
        &self,
        role: &str,
        listen: &str,
        grpc: &str,
    ) -> anyhow::Result<chatd::Node> {
        let argv = self.node_argv(role, listen, grpc);
        // a node started again on its old address can find it held for a
        // moment by another test's short-lived socket (an outgoing
        // connection's local port comes from the same range): that passes
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let cli = chatd::Cli::try_parse_from(argv.clone())?;
            match chatd::Node::start(cli.serve).await {
                Err(e)
                    if tokio::time::Instant::now() < deadline
                        && e.chain().any(|c| {
                            c.downcast_ref::<std::io::Error>()
                                .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
                        }) =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    /// `http` or, for a cluster whose flags give edges a CA for the
    /// workers (`--worker-ca`), `https`.
    fn worker_scheme(&self) -> &'static str {
        if self.extra_flags.iter().any(|f| f == "--worker-ca") {
            "https"
        } else {
            "http"
        }
    }

    /// `http://host:port` (`https` with TLS) of worker `i`'s gRPC endpoint.
    pub fn worker_url(&self, i: usize) -> String {
        format!("{}://{}", self.worker_scheme(), self.workers[i].1)
    }

    /// `http://host:port` of edge `i`'s operator routes (`/metrics`,
    /// `/readyz`).
    pub fn ops_url(&self, i: usize) -> String {
        format!("http://{}", self.edge_ops[i])
    }

    /// The value of metric series `series` (with its labels, as
    /// `/metrics` prints them) on edge `i`'s operator routes, 0 if it is
    /// not there yet: the registry every node in the test process shares.
    pub async fn metric(&self, i: usize, series: &str) -> anyhow::Result<f64> {
        metric_at(&self.ops_url(i), series).await
    }

    /// How many edges run.
    pub fn edge_count(&self) -> usize {
        self.edge_addrs.len()
    }

    /// `http://host:port` of edge `i`.
    pub fn edge_url(&self, i: usize) -> String {
        format!("http://{}", self.edge_addrs[i])
    }

    /// Stops edge `i` and starts it again on the same address.
    pub async fn restart_edge(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(node) = self.edges[i].take() {
            node.stop().await?;
        }
        let addr = self.edge_addrs[i].to_string();
        let node = self.start_node("edge", &addr, "127.0.0.1:0").await?;
        self.edges[i] = Some(node);
        Ok(())
    }

    /// Stops worker `i` (it stays down until [`Cluster::start_worker`]).
    pub async fn stop_worker(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(node) = self.workers[i].0.take() {
            node.stop().await?;
        }
        Ok(())
    }

    /// Starts worker `i` again on its address.
    pub async fn start_worker(&mut self, i: usize) -> anyhow::Result<()> {
        let addr = self.workers[i].1.to_string();
        let node = self.start_node("worker", "127.0.0.1:0", &addr).await?;
        self.workers[i].0 = Some(node);
        Ok(())
    }

    /// Stops worker `i` and starts it again on the same address.
    pub async fn restart_worker(&mut self, i: usize) -> anyhow::Result<()> {
        self.stop_worker(i).await?;
        self.start_worker(i).await
    }

    /// An HTTP client for REST calls.
    pub fn http(&self) -> reqwest::Client {
        chat_http::client()
    }

    /// Connects `user` on `device` to edge `edge`.
    pub async fn connect(&self, edge: usize, user: &str, device: &str) -> anyhow::Result<Client> {
        self.connect_with(edge, &token(user), device).await
    }

    /// Connects with `token` on `device` to edge `edge`.
    pub async fn connect_with(
        &self,
        edge: usize,
        token: &str,
        device: &str,
    ) -> anyhow::Result<Client> {
        Client::connect(&self.edge_addrs[edge], token, device).await
    }

    /// Connects `user` on `device` to edge `edge` over a socket with a tiny
    /// receive buffer (4 KiB): a client that reads slowly, or not at all.
    /// Reads nothing until asked, not even `a_session`.
    pub async fn connect_slow_reader(
        &self,
        edge: usize,
        user: &str,
        device: &str,
    ) -> anyhow::Result<Client> {
        let addr = self.edge_addrs[edge];
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let tcp = MaybeTlsStream::Plain(socket.connect(addr).await?);
        let url = format!("ws://{addr}/ws?token={}&device={device}", token(user));
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await?;
        Ok(Client::from_stream(ws))
    }

    /// A WebSocket client of `user` on edge `edge` that names no device (it
    /// gets the user's default one), as a client of the seed's flow.
    pub async fn connect_without_device(&self, edge: usize, user: &str) -> anyhow::Result<Client> {
        Client::connect_as(&self.edge_addrs[edge], &token(user), None).await
    }

    /// Creates a group over REST on edge 0 as `owner`; returns its JSON.
    pub async fn create_group(&self, owner: &str, members: &[&str]) -> anyhow::Result<Value> {
        let res = self
            .http()
            .post(format!("{}/groups", self.edge_url(0)))
            .bearer_auth(token(owner))
            .json(&json!({ "name": "team", "members": members }))
            .send()
            .await?;
        if res.status() != 201 {
            bail!("create group: {} {}", res.status(), res.text().await?);
        }
        Ok(res.json().await?)
    }

    /// Creates a group over REST on edge 0 as `owner`, with `members` and
    /// `history` (`shared` or `joined`); returns its id.
    pub async fn group_with_history(
        &self,
        owner: &str,
        members: &[&str],
        history: &str,
    ) -> anyhow::Result<String> {
        let body = json!({ "name": "team", "members": members, "history": history });
        let (status, g) = self
            .call(
                reqwest::Method::POST,
                0,
                Some(owner),
                "/groups",
                Some(&body),
            )
            .await?;
        if status != 201 {
            bail!("create group: {status} {g}");
        }
        Ok(g["id"].as_str().context("group without id")?.to_owned())
    }

    /// `owner` adds `users` to `group` over REST on edge 0: the status.
    pub async fn add_members(
        &self,
        owner: &str,
        group: &str,
        users: &[&str],
    ) -> anyhow::Result<u16> {
        let path = format!("/groups/{group}/members");
        let body = json!({ "userIds": users });
        let (status, _) = self
            .call(reqwest::Method::POST, 0, Some(owner), &path, Some(&body))
            .await?;
        Ok(status)
    }

    /// Creates a group of `members` (the first is the owner) and subscribes
    /// every member from device `setup`, connecting on the edges in turn.
    pub async fn room(&self, members: &[&str]) -> anyhow::Result<String> {
        let g = self.create_group(members[0], &members[1..]).await?;
        let id = g["id"].as_str().context("group without id")?.to_owned();
        for (i, m) in members.iter().enumerate() {
            let mut ws = self.connect(i % self.edge_count(), m, "setup").await?;
            // on a NATS cluster a request can meet a leader election: retry
            let deadline = tokio::time::Instant::now() + PROMPTLY;
            while let Err(e) = ws
                .request("subscribe_to_group", json!({ "groupId": id }))
                .await
            {
                if tokio::time::Instant::now() > deadline {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ws.close().await?;
        }
        Ok(id)
    }

    /// A MongoDB handle on the database the nodes use.
    pub async fn mongo(&self) -> anyhow::Result<mongodb::Database> {
        Ok(mongodb::Client::with_uri_str(&self.stack.mongo.uri)
            .await?
            .database("chat"))
    }

    /// Waits until MongoDB holds `messages` committed messages of `group`
    /// and its senders' sent watermarks: what a test waits for before it
    /// kills the stand-in, which killed while creating a collection once
    /// could not open its data again (its own crash recovery, not what
    /// these tests are about).
    pub async fn mongo_settled(&self, group: &str, messages: u64) -> anyhow::Result<()> {
        let db = self.mongo().await?;
        eventually(PROMPTLY, || async {
            let stored = db
                .collection::<mongodb::bson::Document>("messages")
                .count_documents(mongodb::bson::doc! { "groupId": group, "state": "committed" })
                .await?;
            // raised behind the persist loop: every sender's mark at its
            // newest message
            let mut newest = std::collections::HashMap::<String, i64>::new();
            let mut rows = db
                .collection::<mongodb::bson::Document>("messages")
                .find(mongodb::bson::doc! { "groupId": group, "state": "committed" })
                .await?;
            while let Some(m) = futures::TryStreamExt::try_next(&mut rows).await? {
                let top = newest.entry(m.get_str("senderId")?.to_owned()).or_default();
                *top = (*top).max(m.get_i64("seq")?);
            }
            let mut marked = 0;
            for (sender, seq) in &newest {
                let mark = db
                    .collection::<mongodb::bson::Document>("sent_marks")
                    .find_one(mongodb::bson::doc! { "_id": format!("{group}:{sender}") })
                    .await?;
                marked += usize::from(mark.is_some_and(|m| m.get_i64("s").ok() == Some(*seq)));
            }
            Ok((stored == messages && marked == newest.len()).then_some(()))
        })
        .await
    }

    /// A bus handle on the cluster's NATS, as the operators' user.
    pub async fn bus(&self) -> anyhow::Result<chat_bus::Bus> {
        self.bus_as(&self.stack.nats.users.ops).await
    }

    /// A bus handle on the cluster's NATS as `user`.
    pub async fn bus_as(&self, user: &chat_stack::NatsUser) -> anyhow::Result<chat_bus::Bus> {
        Ok(chat_bus::Bus::connect(
            &self.stack.nats.url,
            "test",
            Some(chat_bus::Credentials {
                user: user.user.to_owned(),
                password: user.password.clone(),
            }),
            chat_bus::Definitions::load(1)?,
        )
        .await?)
    }

    /// Waits until the saved place of `device` of `user` covers every
    /// notification of the user: nothing would come again on reconnect.
    pub async fn place_covers_notifications(&self, user: &str, device: &str) -> anyhow::Result<()> {
        let bus = self.bus().await?;
        let newest = bus
            .newest_on(
                chat_bus::Feed::User,
                &chat_bus::user_subject(&UserId::parse(user)?),
            )
            .await?;
        self.place_reaches(user, device, chat_bus::Feed::User, newest)
            .await
    }

    /// Waits until the saved place of `user`'s `device` in `feed` is at
    /// stream sequence `at` or past it.
    pub async fn place_reaches(
        &self,
        user: &str,
        device: &str,
        feed: chat_bus::Feed,
        at: u64,
    ) -> anyhow::Result<()> {
        let bus = self.bus().await?;
        let (user_id, device_id) = (UserId::parse(user)?, chat_domain::DeviceId::parse(device)?);
        let places = bus.places();
        eventually(PROMPTLY, || {
            let (places, user_id, device_id) = (places.clone(), user_id.clone(), device_id.clone());
            async move {
                let stored = places.get(&user_id, &device_id).await?;
                let place = stored.place.map(|p| match feed {
                    chat_bus::Feed::User => p.users,
                    chat_bus::Feed::Groups => p.groups,
                });
                Ok(place.filter(|p| *p >= at).map(drop))
            }
        })
        .await
        .with_context(|| format!("the place of {user}'s {device} never reached {at}"))
    }

    /// A REST call on edge `edge`, as `user` if given (else without a
    /// token), with a JSON `body` if given: the status and the JSON body.
    pub async fn call(
        &self,
        method: reqwest::Method,
        edge: usize,
        user: Option<&str>,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut req = self
            .http()
            .request(method, format!("{}{path}", self.edge_url(edge)));
        if let Some(u) = user {
            req = req.bearer_auth(token(u));
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await?;
        Ok((
            res.status().as_u16(),
            res.json().await.unwrap_or(Value::Null),
        ))
    }

    /// `owner` removes `member` from `group` through edge `edge`: the status.
    pub async fn remove_member(
        &self,
        edge: usize,
        owner: &str,
        group: &str,
        member: &str,
    ) -> anyhow::Result<u16> {
        let path = format!("/groups/{group}/members/{member}");
        let (status, _) = self
            .call(reqwest::Method::DELETE, edge, Some(owner), &path, None)
            .await?;
        Ok(status)
    }

    /// `GET` on edge `edge` as `user`; the status and the JSON body.
    pub async fn get(&self, edge: usize, user: &str, path: &str) -> anyhow::Result<(u16, Value)> {
        self.call(reqwest::Method::GET, edge, Some(user), path, None)
            .await
    }

    /// The group's history as `user` (newest first), up to 100 messages.
    pub async fn history(&self, user: &str, group: &str) -> anyhow::Result<Vec<Value>> {
        let (status, body) = self
            .get(0, user, &format!("/groups/{group}/messages?limit=100"))
            .await?;
        if status != 200 {
            bail!("history: {status} {body}");
        }
        Ok(body["messages"].as_array().cloned().unwrap_or_default())
    }

    /// Runs a node as a separate `chatd` process (so that it can be killed
    /// for real) on free ports; waits until it serves. A port taken by
    /// another test between its pick and chatd's bind is picked again.
    pub async fn spawn_process(&self, role: &str) -> anyhow::Result<Process> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.spawn_process_once(role).await {
                Err((e, log)) if attempts < 3 && log.contains("address already in use") => {
                    eprintln!("chatd {role}: a port was taken; again on new ones ({e:#})");
                }
                Err((e, log)) => {
                    return Err(e.context(format!("chatd {role} did not start; log:\n{log}")));
                }
                Ok(p) => return Ok(p),
            }
        }
    }

    async fn spawn_process_once(&self, role: &str) -> Result<Process, (anyhow::Error, String)> {
        let no_log = |e: anyhow::Error| (e, String::new());
        let [http, grpc, metrics] = chat_stack::free_addrs::<3>().map_err(no_log)?;
        let mut argv = self.node_argv(role, &http.to_string(), &grpc.to_string());
        argv.retain(|a| a != "127.0.0.1:0");
        if let Some(i) = argv.iter().position(|a| a == "--metrics-listen") {
            argv.remove(i);
        }
        argv.push(format!("--metrics-listen={metrics}"));
        let bin = chat_stack::chatd_binary().map_err(no_log)?;
        let dir = tempfile::tempdir().map_err(|e| no_log(e.into()))?;
        let log = dir.path().join("chatd.log");
        let spawn = || -> anyhow::Result<std::process::Child> {
            let out = std::fs::File::create(&log)?;
            Ok(std::process::Command::new(bin)
                .args(&argv[1..])
                .env("NO_COLOR", "1")
                .env("RUST_LOG", "info,chat_worker=debug,async_nats=warn")
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()?)
        };
        let child = spawn().map_err(no_log)?;
        let mut p = Process {
            child,
            http,
            grpc,
            metrics,
            log,
            _dir: dir,
        };
        let probe = if role == "worker" { grpc } else { http };
        // its own line, not only an open port (which another program may hold)
        let listening = if role == "worker" {
            "worker listening"
        } else {
            "edge listening"
        };
        let started = eventually(Duration::from_secs(30), || {
            let exited = p.child.try_wait().ok().flatten();
            let logged = p.log_text().contains(listening);
            async move {
                if let Some(status) = exited {
                    bail!("chatd exited with {status}");
                }
                if !logged {
                    return Ok(None);
                }
                Ok(tokio::net::TcpStream::connect(probe).await.ok().map(drop))
            }
        })
        .await;
        match started {
            Ok(()) => Ok(p),
            Err(e) => Err((e, p.log_text())),
        }
    }

    /// Starts one more in-process edge using exactly these workers.
    pub async fn add_edge_for(&mut self, workers: &[SocketAddr]) -> anyhow::Result<usize> {
        let scheme = self.worker_scheme();
        let urls: Vec<String> = workers.iter().map(|a| format!("{scheme}://{a}")).collect();
        self.add_edge_with(&urls.join(",")).await
    }

    /// Starts one more in-process edge with `--workers` `workers`.
    pub async fn add_edge_with(&mut self, workers: &str) -> anyhow::Result<usize> {
        let mut argv = self.node_argv("edge", "127.0.0.1:0", "127.0.0.1:0");
        if let Some(i) = argv.iter().position(|a| a == "--workers") {
            argv.drain(i..i + 2);
        }
        argv.push("--workers".into());
        argv.push(workers.to_owned());
        let node = chatd::Node::start(chatd::Cli::try_parse_from(argv)?.serve).await?;
        self.edge_addrs
            .push(node.http_addr.context("edge has no http address")?);
        self.edge_ops
            .push(node.ops_addr.context("edge has no ops address")?);
        self.edges.push(Some(node));
        Ok(self.edges.len() - 1)
    }

    /// Connects `user` on `device` to a process edge.
    pub async fn connect_to(
        &self,
        edge: &Process,
        user: &str,
        device: &str,
    ) -> anyhow::Result<Client> {
        Client::connect(&edge.http, &token(user), device).await
    }

    /// Stops every node, then the services (first reporting the nodes'
    /// queries that scan a whole collection, under `CHAT_QUERY_AUDIT`).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(report) = query_audit() {
            audit::report(&self.mongo().await?, &report).await?;
        }
        for node in self.edges.drain(..).flatten() {
            node.stop().await?;
        }
        for (node, _) in self.workers.drain(..) {
            if let Some(node) = node {
                node.stop().await?;
            }
        }
        Ok(())
    }
}

/// A `chatd` process; killed on drop.
pub struct Process {
    child: std::process::Child,
    /// Edge: where clients connect.
    pub http: SocketAddr,
    /// Worker: where edges connect.
    pub grpc: SocketAddr,
    /// Its operator routes (`/metrics`, `/readyz`).
    pub metrics: SocketAddr,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Process {
    /// The value of metric `name` (a series without labels) on this
    /// process's `/metrics`, 0 if it is not there yet. (The nodes a
    /// `Cluster` runs in the test process share one metrics registry with
    /// every other test's: only a process of its own counts alone.)
    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        metric_at(&format!("http://{}", self.metrics), name).await
    }

    /// SIGKILL: the process dies at once, mid-whatever.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: asks the process to drain and exit.
    pub fn terminate(&self) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        anyhow::ensure!(status.success(), "kill -TERM failed");
        Ok(())
    }

    /// Waits for the process to exit; its exit status, or `None` on timeout.
    pub async fn exited_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What the process logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of metric series `series` on the `/metrics` of `base`
/// (`http://host:port`), 0 if it is not there yet.
async fn metric_at(base: &str, series: &str) -> anyhow::Result<f64> {
    let text = chat_http::client()
        .get(format!("{base}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_default())
}

/// Runs `chatd <args>` (an operator's command) to success; its stdout.
pub async fn chatd_command(args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(chat_stack::chatd_binary()?)
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "chatd {}: {}",
        args.first().unwrap_or(&""),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// A valid token for `user`.
pub fn token(user: &str) -> String {
    let user = UserId::parse(user).unwrap_or_else(|e| panic!("bad test user {user:?}: {e}"));
    chat_auth::mint_hs256(SECRET.as_bytes(), &user, None, 3600)
        .unwrap_or_else(|e| panic!("mint: {e}"))
}

/// A WebSocket client speaking the client contract.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>,
    /// Pushes received while waiting for something else.
    pushes: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    /// A client over a WebSocket opened elsewhere (with socket options of
    /// the test's own); reads nothing until asked.
    pub fn from_stream(ws: WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>) -> Self {
        Self {
            ws,
            pushes: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Connects with `token` as `device`, and waits for `a_session`.
    pub async fn connect(addr: &SocketAddr, token: &str, device: &str) -> anyhow::Result<Self> {
        Self::connect_as(addr, token, Some(device)).await
    }

    /// Connects as `device`, or without naming one (the user's default).
    pub async fn connect_as(
        addr: &SocketAddr,
        token: &str,
        device: Option<&str>,
    ) -> anyhow::Result<Self> {
        let url = match device {
            Some(device) => format!("ws://{addr}/ws?token={token}&device={device}"),
            None => format!("ws://{addr}/ws?token={token}"),
        };
        let device = device.unwrap_or("default");
        // a 503 (a backing service busy or failing over) is worth a retry,
        // as a client would
        let mut attempts = 0;
        let (ws, _) = loop {
            match tokio_tungstenite::connect_async_with_config(url.as_str(), None, true).await {
                Err(tokio_tungstenite::tungstenite::Error::Http(res))
                    if res.status() == 503 && attempts < 5 =>
                {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other?,
            }
        };
        let mut client = Self {
            ws,
            pushes: VecDeque::new(),
            next_id: 0,
        };
        let hello = client.next_push("a_session").await?;
        if hello["data"]["deviceId"] != device {
            bail!("a_session names the wrong device: {hello}");
        }
        Ok(client)
    }

    /// Sends a raw WebSocket message.
    pub async fn send_raw(&mut self, msg: Message) -> anyhow::Result<()> {
        self.ws.send(msg).await?;
        Ok(())
    }

    /// Receives the next frame as JSON, or `None` when the server closed.
    pub async fn recv(&mut self, within: Duration) -> anyhow::Result<Option<Value>> {
        loop {
            let msg = tokio::time::timeout(within, self.ws.next())
                .await
                .context("no frame in time")?;
            match msg {
                None | Some(Ok(Message::Close(_))) => return Ok(None),
                Some(Ok(Message::Text(t))) => return Ok(Some(serde_json::from_str(&t)?)),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }

    /// Receives until the server closes; returns the close frame's code.
    pub async fn closed_with(&mut self) -> anyhow::Result<Option<u16>> {
        loop {
            let msg = tokio::time::timeout(PROMPTLY, self.ws.next())
                .await
                .context("not closed in time")?;
            match msg {
                Some(Ok(Message::Close(frame))) => return Ok(frame.map(|f| f.code.into())),
                None => return Ok(None),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("connection failed instead of closing: {e}"),
            }
        }
    }

    /// Every frame still to come until the connection ends, closed or
    /// broken: what a client reads of a dead server's socket before it
    /// notices and reconnects. Frames kept aside by earlier calls come first.
    pub async fn until_closed(&mut self) -> anyhow::Result<Vec<Value>> {
        let mut frames: Vec<Value> = self.pushes.drain(..).collect();
        loop {
            match self.recv(PROMPTLY).await {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => return Ok(frames),
                // reset: the connection is gone as well
                Err(e) if e.is::<tokio_tungstenite::tungstenite::Error>() => return Ok(frames),
                // neither ended nor sent anything in time, or sent garbage
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a request with a fresh id; returns the id.
    pub async fn send(&mut self, event: &str, data: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = json!(format!("r{}", self.next_id));
        let frame = json!({ "event": event, "id": id, "data": data });
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await?;
        Ok(id)
    }

    /// Waits for the `ack` or `error` answering `id`, keeping pushes aside.
    pub async fn reply_to(&mut self, id: &Value) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + PROMPTLY;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self
                .recv(left)
                .await?
                .context("closed while waiting for a reply")?;
            if &frame["id"] == id {
                return Ok(frame);
            }
            if frame["event"].as_str().is_some_and(|e| e.starts_with("a_")) {
                self.pushes.push_back(frame);
            } else {
                bail!("unexpected frame while waiting for {id}: {frame}");
            }
        }
    }

    /// Sends a request and returns the `ack`'s data; an `error` is an `Err`.
    pub async fn request(&mut self, event: &str, data: Value) -> anyhow::Result<Value> {
        let id = self.send(event, data).await?;
        let reply = self.reply_to(&id).await?;
        match reply["event"].as_str() {
            Some("ack") => Ok(reply["data"].clone()),
            _ => bail!("{event} failed: {reply}"),
        }
    }

    /// Sends a request that must fail; returns the error code.
    pub async fn request_error(&mut self, event: &str, data: Value) -> anyhow::Result<String> {
        let id = self.send(event, data).await?;
        let reply = self.reply_to(&id).await?;
        if reply["event"] != "error" {
            bail!("{event} should have failed: {reply}");
        }
        Ok(reply["data"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// The next push, whatever its name.
    pub async fn next_any_push(&mut self) -> anyhow::Result<Value> {
        if let Some(p) = self.pushes.pop_front() {
            return Ok(p);
        }
        let frame = self
            .recv(PROMPTLY)
            .await?
            .context("closed while waiting for a push")?;
        Ok(frame)
    }

    /// The next push, which must be `event`.
    pub async fn next_push(&mut self, event: &str) -> anyhow::Result<Value> {
        let push = self.next_any_push().await?;
        if push["event"] != event {
            bail!("expected {event}, got {push}");
        }
        Ok(push)
    }

    /// The next `n` `a_group_message` pushes, skipping other pushes (such
    /// as receipts).
    pub async fn messages(&mut self, n: usize) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let push = self
                .next_any_push()
                .await
                .with_context(|| format!("after {} of {n} messages", out.len()))?;
            if push["event"] == "a_group_message" {
                out.push(push["data"].clone());
            }
        }
        Ok(out)
    }

    /// The `a_group_message` push of message `id`, skipping other pushes
    /// and messages.
    pub async fn message_with(&mut self, id: &Value) -> anyhow::Result<Value> {
        loop {
            let m = self.messages(1).await?.remove(0);
            if &m["messageId"] == id {
                return Ok(m);
            }
        }
    }

    /// The next push of `event`, skipping others.
    pub async fn skip_to(&mut self, event: &str) -> anyhow::Result<Value> {
        loop {
            let push = self.next_any_push().await?;
            if push["event"] == event {
                return Ok(push);
            }
        }
    }

    /// Sends a text message and returns the ack's data.
    pub async fn send_text(
        &mut self,
        group: &str,
        client_id: &str,
        text: &str,
    ) -> anyhow::Result<Value> {
        self.request(
            "send_group_message",
            json!({ "groupId": group, "clientMsgId": client_id, "type": "text", "text": text }),
        )
        .await
    }

    /// Sends a text message, retrying on errors (a backing service coming
    /// back) until it is acknowledged or `within` has passed.
    pub async fn send_text_until_ok(
        &mut self,
        group: &str,
        client_id: &str,
        text: &str,
        within: Duration,
    ) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match self.send_text(group, client_id, text).await {
                Ok(ack) => return Ok(ack),
                Err(e) if tokio::time::Instant::now() > deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The pushes kept aside while waiting for replies, taken.
    pub fn take_kept(&mut self) -> Vec<Value> {
        self.pushes.drain(..).collect()
    }

    /// Closes the connection.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.ws.close(None).await?;
        // wait for the server's close so its acks are done
        while let Ok(Some(Ok(_))) = tokio::time::timeout(PROMPTLY, self.ws.next()).await {}
        Ok(())
    }
}

/// Polls `check` until it returns `Some`, or fails after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("condition not met within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
