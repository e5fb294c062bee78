//! Starts the real services the system runs on: `nats-server` with
//! JetStream, SecantusDB (a MongoDB-wire server) and `s3s-fs` (an S3 server
//! that checks signatures), each on a free port with its own temporary data
//! folder, and stops them on drop.
//!
//! Used by the end-to-end tests, `chat-dev` and `chat-load`. NATS and
//! SecantusDB are processes of binaries from `scripts/install-deps`, found
//! through `CHAT_NATS_SERVER` and `CHAT_MONGOD` or in the default cache folder
//! that script installs to. `s3s-fs` is the same crate's server (its
//! `FileSystem` behind `s3s`' signature-checking service) run in this process
//! (`s3.rs`): built with the workspace, it shares its dependencies instead of
//! a second compile of them on a fresh machine.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use tempfile::TempDir;

mod cors;
mod s3;

pub use cors::CorsFront;
pub use s3::S3;

const NATS_VERSION: &str = "2.15.1";
const SECANTUS_VERSION: &str = "0.7.0b3";

/// How long a service may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CHAT_STACK_CACHE") {
        return dir.into();
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    base.join("chatd-stack")
}

fn binary(env: &str, default: PathBuf) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or(default);
    if !path.exists() {
        bail!(
            "{} not found (set {env}, or run scripts/install-deps first)",
            path.display()
        );
    }
    Ok(path)
}

fn venv() -> PathBuf {
    cache_dir().join(format!("py-nats{NATS_VERSION}-secantus{SECANTUS_VERSION}"))
}

/// One child process with its data folder; killed and removed on drop.
#[derive(Debug)]
struct Service {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Service {
    fn spawn(name: &'static str, mut cmd: Command, dir: &Path) -> anyhow::Result<Self> {
        // one log per run, so a restart waits for its own ready line
        let mut run = 0;
        let log = loop {
            let candidate = dir.join(format!("{name}-{run}.log"));
            if !candidate.exists() {
                break candidate;
            }
            run += 1;
        };
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name,
            child: Some(child),
            log,
        })
    }

    /// Waits until the log has a line for which `find` returns a value.
    async fn wait_for<T>(&mut self, find: impl Fn(&str) -> Option<T>) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if let Some(v) = text.lines().find_map(&find) {
                return Ok(v);
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("{} exited with {status}; its log:\n{text}", self.name);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "{} not ready after {READY_TIMEOUT:?}; its log:\n{text}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts `name` again on the ports it had (the command from `cmd`),
    /// until its log has a line `find` takes. A port can be held for a
    /// moment by another test's short-lived socket (an outgoing
    /// connection's local port comes from the same range): a start that
    /// fails on it is tried again, for up to 15 s.
    async fn respawn<T>(
        name: &'static str,
        cmd: impl Fn() -> anyhow::Result<Command>,
        dir: &Path,
        find: impl Fn(&str) -> Option<T>,
    ) -> anyhow::Result<(Self, T)> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let mut service = Self::spawn(name, cmd()?, dir)?;
            match service.wait_for(&find).await {
                Ok(found) => return Ok((service, found)),
                Err(e)
                    if tokio::time::Instant::now() < deadline
                        && format!("{e:#}")
                            .to_ascii_lowercase()
                            .contains("address already in use") =>
                {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `n` lines of the log (diagnostics).
    fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A NATS user of `nats/auth.conf`, with the password this start gave it.
#[derive(Debug, Clone)]
pub struct NatsUser {
    pub user: &'static str,
    pub password: String,
}

impl NatsUser {
    fn new(user: &'static str) -> Self {
        // a leading letter: nats-server reads an all-digit value as a number
        Self {
            user,
            password: format!("p{}", uuid::Uuid::new_v4().simple()),
        }
    }

    /// The `chatd` flags that connect as this user.
    pub fn flags(&self) -> [String; 4] {
        [
            "--nats-user".into(),
            self.user.into(),
            "--nats-password".into(),
            self.password.clone(),
        ]
    }
}

/// The three users of `nats/auth.conf`, with fresh passwords, and the one
/// the nodes of a cluster route to each other as.
#[derive(Debug, Clone)]
pub struct NatsUsers {
    /// `chatd --role edge`.
    pub edge: NatsUser,
    /// `chatd --role worker` and `--role all`.
    pub worker: NatsUser,
    /// Tools, benchmarks and tests: no limits.
    pub ops: NatsUser,
    /// The routes between a cluster's nodes (`cluster.authorization` in
    /// `nats/cluster/*.conf`); no client connects as it.
    pub route: NatsUser,
}

impl NatsUsers {
    fn new() -> Self {
        Self {
            edge: NatsUser::new("chat-edge"),
            worker: NatsUser::new("chat-worker"),
            ops: NatsUser::new("chat-ops"),
            route: NatsUser::new("chat-route"),
        }
    }

    /// A route URL to `127.0.0.1:port`, with the route user's credentials.
    fn route_url(&self, port: u16) -> String {
        let route = &self.route;
        format!("nats://{}:{}@127.0.0.1:{port}", route.user, route.password)
    }

    /// The user a `chatd` of `role` (`edge`, `worker`, `all`) connects as.
    pub fn for_role(&self, role: &str) -> &NatsUser {
        if role == "edge" {
            &self.edge
        } else {
            &self.worker
        }
    }
}

/// `nats-server` with JetStream: one node, or a cluster of several on
/// loopback ports, each with its own data folder, with the shipped
/// configuration (`nats/nats-server.conf`: no anonymous clients).
#[derive(Debug)]
pub struct Nats {
    nodes: Vec<NatsNode>,
    /// The users clients connect as.
    pub users: NatsUsers,
    /// Unique per start, so that two tests' clusters on one machine can never
    /// join each other through a reused port.
    cluster_name: String,
    /// Client URLs of every node, comma-separated (what chatd takes).
    pub url: String,
    /// The first node's monitoring URL.
    pub monitor_url: String,
    /// Flags every node was started with beyond the usual ones.
    args: Vec<String>,
    _dir: TempDir,
}

#[derive(Debug)]
struct NatsNode {
    service: Service,
    name: String,
    port: u16,
    monitor: u16,
    cluster: u16,
}

/// `nats/nats-server.conf`, the local stack's configuration.
fn default_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../nats/nats-server.conf")
}

fn port_of(url: &str) -> anyhow::Result<String> {
    let rest = url.rsplit(':').next().context("no port in url")?;
    Ok(rest.split(['/', '?']).next().unwrap_or_default().to_owned())
}

/// `N` distinct free local addresses. Each is held until all are chosen:
/// a port let go at once can come back for the next call (a node's two
/// listeners once got the same port, and it could not start).
pub fn free_addrs<const N: usize>() -> anyhow::Result<[std::net::SocketAddr; N]> {
    let held = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let addrs = held
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<Vec<_>, _>>()?;
    addrs
        .try_into()
        .map_err(|_| anyhow::anyhow!("{N} addresses expected"))
}

impl Nats {
    /// One node.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_cluster(1).await
    }

    /// `size` nodes forming one JetStream cluster (`size` 1: a lone server).
    /// A cluster that elects no JetStream leader within `META_LEADER_WAIT`
    /// is started again, on fresh ports with fresh data (seen once in CI with
    /// five clustered tests on two cores).
    pub async fn start_cluster(size: usize) -> anyhow::Result<Self> {
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            let nats = Self::start_nodes_on_free_ports(size, &default_config(), &[]).await?;
            if size == 1 {
                return Ok(nats);
            }
            match wait_for_meta_leader(nats.nodes[0].monitor).await {
                Ok(()) => return Ok(nats),
                Err(e) if attempt < ATTEMPTS => {
                    eprintln!("{e}; starting the cluster again. Its nodes' last lines:");
                    for n in &nats.nodes {
                        eprintln!("--- {}\n{}", n.name, n.service.log_tail(20));
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One node with the server configuration at `config` (one of the
    /// shipped ones, say) on free loopback ports. A `cluster` block in it
    /// listens on a free port (the harness writes a copy beside `config`
    /// with its `listen` line changed, so that its own `authorization` is
    /// what an outsider meets) and routes to itself through the shipped
    /// configurations' `$CHAT_NATS_ROUTE_1` to `_3`. The configuration's
    /// own `store_dir` is used: point it at a temporary folder.
    pub async fn start_with_config(config: &Path) -> anyhow::Result<Self> {
        Self::start_nodes_on_free_ports(1, config, &[]).await
    }

    /// One node with the shipped configuration and these `nats-server`
    /// flags too (`--tls`, `--tlscert` and the like).
    pub async fn start_with_args(args: &[&str]) -> anyhow::Result<Self> {
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        Self::start_nodes_on_free_ports(1, &default_config(), &args).await
    }

    /// [`Self::start_nodes`], again on other ports if one of those it
    /// picked was taken before nats-server could bind it (another test's
    /// socket got it first: seen in CI with the monitor port).
    async fn start_nodes_on_free_ports(
        size: usize,
        config: &Path,
        args: &[String],
    ) -> anyhow::Result<Self> {
        const ATTEMPTS: usize = 4;
        let mut attempt = 1;
        loop {
            match Self::start_nodes(size, config, args).await {
                Err(e)
                    if attempt < ATTEMPTS
                        && format!("{e:#}").contains("address already in use") =>
                {
                    eprintln!("nats-server found a port taken; starting it on others");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_nodes(size: usize, config: &Path, args: &[String]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("chat-nats-").tempdir()?;
        // the folder's random name (`chat-nats-…`) is unique on the machine
        let cluster_name = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .context("temporary folder without a name")?
            .to_owned();
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let [port, monitor, cluster] = free_addrs::<3>()?.map(|a| a.port());
            std::fs::create_dir_all(dir.path().join(format!("n{i}")))?;
            nodes.push((format!("nats-{i}"), port, monitor, cluster));
        }
        let routes: Vec<u16> = nodes.iter().map(|n| n.3).collect();
        let users = NatsUsers::new();
        let mut started = Vec::with_capacity(size);
        for (i, (name, port, monitor, cluster)) in nodes.into_iter().enumerate() {
            let own_config;
            let config = if config == default_config() {
                config
            } else {
                own_config = with_cluster_listen(config, cluster)?;
                own_config.as_path()
            };
            let mut cmd = Self::command(
                config,
                &users,
                dir.path(),
                i,
                &name,
                (port, monitor, cluster),
                (size > 1).then_some((cluster_name.as_str(), routes.as_slice())),
            )?;
            cmd.args(args);
            started.push(NatsNode {
                service: Service::spawn("nats-server", cmd, &dir.path().join(format!("n{i}")))?,
                name,
                port,
                monitor,
                cluster,
            });
        }
        for node in &mut started {
            node.service
                .wait_for(|l| l.contains("Server is ready").then_some(()))
                .await?;
        }
        let url = started
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",");
        let monitor_url = format!("http://127.0.0.1:{}", started[0].monitor);
        Ok(Self {
            nodes: started,
            users,
            cluster_name,
            url,
            monitor_url,
            args: args.to_vec(),
            _dir: dir,
        })
    }

    /// `nats-server` for node `i`, listening on `(client, monitor,
    /// cluster)` ports; with `cluster` (its name and every node's cluster
    /// port), routed to the others as the route user.
    fn command(
        config: &Path,
        users: &NatsUsers,
        dir: &Path,
        i: usize,
        name: &str,
        (port, monitor, own_cluster): (u16, u16, u16),
        cluster: Option<(&str, &[u16])>,
    ) -> anyhow::Result<Command> {
        let bin = binary("CHAT_NATS_SERVER", venv().join("bin/nats-server"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(config);
        cmd.env("CHAT_NATS_EDGE_PASSWORD", &users.edge.password)
            .env("CHAT_NATS_WORKER_PASSWORD", &users.worker.password)
            .env("CHAT_NATS_OPS_PASSWORD", &users.ops.password)
            .env("CHAT_NATS_ROUTE_PASSWORD", &users.route.password);
        // the shipped cluster configurations' routes: to itself here
        for n in 1..=3 {
            cmd.env(format!("CHAT_NATS_ROUTE_{n}"), users.route_url(own_cluster));
        }
        cmd.args([
            "-a",
            "127.0.0.1",
            "-n",
            name,
            "-p",
            &port.to_string(),
            "-m",
            &monitor.to_string(),
            "-js",
        ]);
        // a configuration of its own names its own store (given twice, the
        // server refuses to start)
        if config == default_config() {
            cmd.arg("-sd").arg(dir.join(format!("n{i}")).join("js"));
        }
        if let Some((cluster_name, routes)) = cluster {
            // the listen URL's credentials are the ones routes must give
            let routes: Vec<String> = routes.iter().map(|&p| users.route_url(p)).collect();
            cmd.args([
                "--cluster_name",
                cluster_name,
                "--cluster",
                &users.route_url(own_cluster),
                "--routes",
                &routes.join(","),
            ]);
        }
        Ok(cmd)
    }

    /// Whether a server from outside, routing to node 0 with the route
    /// user's `password` (`None`: with no credentials at all), becomes one
    /// of node 0's routes (it takes the cluster's name from node 0). Waits until node 0
    /// lists it or its own log says node 0 refused it.
    pub async fn outsider_joins(&self, password: Option<&str>) -> anyhow::Result<bool> {
        let node = &self.nodes[0];
        let route = match password {
            Some(p) => format!(
                "nats://{}:{p}@127.0.0.1:{}",
                self.users.route.user, node.cluster
            ),
            None => format!("nats://127.0.0.1:{}", node.cluster),
        };
        let [port, cluster] = free_addrs::<2>()?.map(|a| a.port());
        let name = format!("outsider-{}", uuid::Uuid::new_v4().simple());
        let mut cmd = Command::new(binary("CHAT_NATS_SERVER", venv().join("bin/nats-server"))?);
        cmd.args(["-a", "127.0.0.1", "-n", &name, "-p", &port.to_string()])
            .args(["--cluster", &format!("nats://127.0.0.1:{cluster}")])
            .args(["--routes", &route]);
        let dir = tempfile::Builder::new()
            .prefix("chat-nats-outsider-")
            .tempdir()?;
        let outsider = Service::spawn("nats-server", cmd, dir.path())?;
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            // (a read that fails is tried again, until the deadline)
            let routes = monitor_json(node.monitor, "/routez").await.ok();
            let listed = routes
                .as_ref()
                .and_then(|r| r["routes"].as_array())
                .is_some_and(|r| r.iter().any(|r| r["remote_name"] == name.as_str()));
            if listed {
                return Ok(true);
            }
            if outsider
                .log_tail(usize::MAX)
                .contains("Authorization Violation")
            {
                return Ok(false);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "an outsider neither joined nor was refused in {READY_TIMEOUT:?}; its log:\n{}",
                    outsider.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills every node at once (SIGKILL).
    pub fn kill(&mut self) {
        for n in &mut self.nodes {
            n.service.kill();
        }
    }

    /// Kills node `i` at once (SIGKILL).
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].service.kill();
    }

    /// The first node's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.nodes[0].service.pid()
    }

    /// Every node's monitoring URL, node 0 first.
    pub fn monitor_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("http://127.0.0.1:{}", n.monitor))
            .collect()
    }

    /// The process ids of the running nodes, node 0 first.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.service.pid()).collect()
    }

    /// Node `i`'s JetStream store directory (copy it only while the node is
    /// stopped).
    pub fn store_dir(&self, i: usize) -> PathBuf {
        self._dir.path().join(format!("n{i}")).join("js")
    }

    /// Starts every node again on the same ports with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        for i in 0..self.nodes.len() {
            self.restart_node(i).await?;
        }
        Ok(())
    }

    /// Starts node `i` again on its ports with its data.
    pub async fn restart_node(&mut self, i: usize) -> anyhow::Result<()> {
        let size = self.nodes.len();
        let routes: Vec<u16> = self.nodes.iter().map(|n| n.cluster).collect();
        self.nodes[i].service.kill();
        let n = &self.nodes[i];
        let cmd = || {
            let mut cmd = Self::command(
                &default_config(),
                &self.users,
                self._dir.path(),
                i,
                &n.name,
                (n.port, n.monitor, n.cluster),
                (size > 1).then_some((self.cluster_name.as_str(), routes.as_slice())),
            )?;
            cmd.args(&self.args);
            Ok(cmd)
        };
        let dir = self._dir.path().join(format!("n{i}"));
        let (service, ()) = Service::respawn("nats-server", cmd, &dir, |l| {
            l.contains("Server is ready").then_some(())
        })
        .await?;
        self.nodes[i].service = service;
        Ok(())
    }
}

/// Where the `chatd` binary is: `CHATD_BIN`, else beside the running
/// program or one folder up (a test binary lives in `target/<profile>/deps`,
/// `chat-load` in `target/<profile>`). `scripts/test` and `scripts/bench`
/// build it first.
pub fn chatd_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CHATD_BIN") {
        return Ok(p.into());
    }
    workspace_binary("chatd", "chatd")
}

/// The workspace binary `name` of package `package`, found like
/// [`chatd_binary`].
pub fn workspace_binary(name: &str, package: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let here = exe.parent();
    let candidates = [here, here.and_then(Path::parent)];
    candidates
        .into_iter()
        .flatten()
        .map(|dir| dir.join(name))
        .find(|bin| bin.exists())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{name} not found near {}: run `cargo build -p {package}` first (scripts/test does)",
                exe.display()
            )
        })
}

/// How long a new cluster may take to elect its JetStream meta leader
/// (normally 1 to 5 s; over 30 s seen on a busy machine).
const META_LEADER_WAIT: Duration = Duration::from_secs(45);

/// Waits until the JetStream cluster behind the monitor port has a meta
/// leader (`/jsz`), for up to `META_LEADER_WAIT`.
async fn wait_for_meta_leader(monitor: u16) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + META_LEADER_WAIT;
    loop {
        let leader = monitor_json(monitor, "/jsz")
            .await
            .ok()
            .and_then(|v| v["meta_cluster"]["leader"].as_str().map(str::to_owned))
            .filter(|l| !l.is_empty());
        if leader.is_some() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("the NATS cluster elected no JetStream leader in {META_LEADER_WAIT:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The JSON nats-server's monitoring port at `monitor` answers for `path`
/// (`/jsz`, `/routez`).
async fn monitor_json(monitor: u16, path: &str) -> anyhow::Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", monitor)).await?;
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await?;
    let (_, json) = out.split_once("\r\n\r\n").context("no HTTP body")?;
    Ok(serde_json::from_str(json)?)
}

/// `config` itself if it has no `cluster` block; else a copy beside it
/// whose cluster listens on `127.0.0.1:port` (the block's first `listen`
/// line changed), so that the rest of the block is what runs.
fn with_cluster_listen(config: &Path, port: u16) -> anyhow::Result<PathBuf> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let Some(block) = text.find("cluster {") else {
        return Ok(config.to_path_buf());
    };
    let listen = text[block..]
        .find("listen:")
        .map(|at| block + at)
        .with_context(|| format!("{}: a cluster block without `listen`", config.display()))?;
    let end = text[listen..]
        .find('\n')
        .map_or(text.len(), |at| listen + at);
    let text = format!(
        "{}listen: 127.0.0.1:{port}{}",
        &text[..listen],
        &text[end..]
    );
    let copy = config.with_file_name(format!("cluster-{port}.conf"));
    std::fs::write(&copy, text)?;
    Ok(copy)
}

/// SecantusDB, a MongoDB-wire server.
#[derive(Debug)]
pub struct Mongo {
    service: Service,
    pub uri: String,
    /// Commits synced to disk (`--sync-on-commit`).
    durable: bool,
    _dir: TempDir,
}

impl Mongo {
    pub fn pid(&self) -> Option<u32> {
        self.service.pid()
    }

    fn command(dir: &Path, port: &str, durable: bool) -> anyhow::Result<Command> {
        let bin = binary("CHAT_MONGOD", venv().join("bin/secantusd-py"))?;
        let mut cmd = Command::new(bin);
        cmd.args(["--host", "127.0.0.1", "--port", port]);
        // journaled commits, as mongod gives with j:true: a killed server
        // keeps every acknowledged write
        if durable {
            cmd.arg("--sync-on-commit");
        }
        cmd.arg("--storage-path")
            .arg(dir.join("data"))
            .current_dir(dir);
        Ok(cmd)
    }

    async fn wait_ready(service: &mut Service) -> anyhow::Result<String> {
        service.wait_for(listening_on).await
    }

    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(true).await
    }

    /// `durable: false` skips syncing each commit to disk: only for
    /// measuring what that costs (`chat-load --no-sync-on-commit`).
    pub async fn start_with(durable: bool) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("chat-mongo-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("data"))?;
        let cmd = Self::command(dir.path(), "0", durable)?;
        let mut service = Service::spawn("secantusd", cmd, dir.path())?;
        let addr = Self::wait_ready(&mut service).await?;
        Ok(Self {
            service,
            uri: format!("mongodb://{addr}/?directConnection=true"),
            durable,
            _dir: dir,
        })
    }

    /// Kills the server at once (SIGKILL).
    pub fn kill(&mut self) {
        self.service.kill();
    }

    /// The server's data directory (copy it only while the server is
    /// stopped).
    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// Starts the server again on the same port with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let port = port_of(&self.uri)?;
        let cmd = || Self::command(self._dir.path(), &port, self.durable);
        let (service, _) =
            Service::respawn("secantusd", cmd, self._dir.path(), listening_on).await?;
        self.service = service;
        Ok(())
    }
}

/// The address in SecantusDB's "listening on <addr>" line.
fn listening_on(line: &str) -> Option<String> {
    let rest = line.split("listening on ").nth(1)?;
    Some(rest.split_whitespace().next()?.to_owned())
}

/// All three services.
#[derive(Debug)]
pub struct Stack {
    pub nats: Nats,
    pub mongo: Mongo,
    pub s3: S3,
}

impl Stack {
    /// Starts all three at once, with a single NATS server.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with_nats(1).await
    }

    /// Starts all three at once, with a NATS cluster of `nats_nodes`.
    pub async fn start_with_nats(nats_nodes: usize) -> anyhow::Result<Self> {
        Self::start_with(nats_nodes, true).await
    }

    /// A NATS cluster of `nats_nodes`, and MongoDB with or without synced
    /// commits (see [`Mongo::start_with`]).
    pub async fn start_with(nats_nodes: usize, durable_mongo: bool) -> anyhow::Result<Self> {
        let (nats, mongo, s3) = tokio::try_join!(
            Nats::start_cluster(nats_nodes),
            Mongo::start_with(durable_mongo),
            S3::start()
        )?;
        Ok(Self { nats, mongo, s3 })
    }
}
