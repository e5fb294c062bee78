//! The system under test: real NATS, SecantusDB and s3s-fs from `chat-stack`
//! and one `chatd --role all` process, so that the server's CPU and memory
//! can be read from `/proc` apart from the load generator's own.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use chat_stack::Stack;
use serde::Serialize;

/// HS256 secret shared by `chatd` and the load generator's tokens.
pub const SECRET: &str = "chat-load-secret-at-least-32-bytes-long";

pub struct System {
    pub stack: Stack,
    chatd: Child,
    /// Where clients connect (REST and WebSocket).
    pub http: SocketAddr,
    /// chatd's operator port (`/metrics`, `/readyz`).
    pub ops: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl System {
    /// Starts the services (`nats_nodes` NATS nodes) and `chatd` (the
    /// binary next to this one, or `CHATD_BIN`), and waits until `/readyz`
    /// answers.
    pub async fn start(
        extra: &[String],
        durable_mongo: bool,
        nats_nodes: usize,
    ) -> anyhow::Result<Self> {
        let stack = Stack::start_with(nats_nodes, durable_mongo).await?;
        let [http, grpc, ops] = chat_stack::free_addrs::<3>()?;
        let dir = tempfile::Builder::new().prefix("chat-load-").tempdir()?;
        let log = dir.path().join("chatd.log");
        let out = std::fs::File::create(&log)?;
        let key = chat_crypto::KeyRing::generate_entry("bench");
        let chatd = Command::new(chat_stack::chatd_binary()?)
            .args(["--role", "all", "--listen"])
            .arg(http.to_string())
            .arg("--grpc-listen")
            .arg(grpc.to_string())
            .arg("--metrics-listen")
            .arg(ops.to_string())
            // the load comes from one address and a few users at high rates:
            // what is measured is throughput, not the limits
            .args([
                "--address-requests-per-sec",
                "0",
                "--user-requests-per-sec",
                "0",
            ])
            .args(["--nats-url", &stack.nats.url])
            .args(stack.nats.users.worker.flags())
            // SecantusDB keeps a registry of retryable writes that it prunes
            // with a scan on every write (8 % of its CPU in the rooms run);
            // the application is idempotent without them (BENCHMARKS.md)
            .args(["--mongodb-uri", &no_retryable_writes(&stack.mongo.uri)])
            .args(["--jwt-secret", SECRET, "--encryption-keys", &key])
            // as in production, where a worker on a non-loopback address
            // needs one: every call between the roles is signed
            .args([
                "--service-secret",
                &chat_crypto::KeyRing::generate_entry("service"),
            ])
            .args(["--s3-endpoint", &stack.s3.endpoint])
            .args(["--s3-bucket", &stack.s3.bucket])
            .args(["--s3-access-key", &stack.s3.access_key])
            .args(["--s3-secret-key", &stack.s3.secret_key])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("CHAT_LOAD_CHATD_LOG")
                    .unwrap_or_else(|_| "warn,async_nats=error".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("cannot start chatd")?;
        let mut system = Self {
            stack,
            chatd,
            http,
            ops,
            log,
            _dir: dir,
        };
        let ready = format!("http://{ops}/readyz");
        let http_client = chat_http::client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = system.chatd.try_wait()? {
                bail!("chatd exited with {status}:\n{}", system.log_text());
            }
            if let Ok(r) = http_client.get(&ready).send().await
                && r.status().is_success()
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("chatd not ready after 60 s:\n{}", system.log_text());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(system)
    }

    pub fn log_path(&self) -> &std::path::Path {
        &self.log
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server processes, by name.
    pub fn processes(&self) -> Vec<(&'static str, u32)> {
        let mut out = vec![("chatd", self.chatd.id())];
        const NATS: [&str; 5] = [
            "nats-server",
            "nats-server 2",
            "nats-server 3",
            "nats-server 4",
            "nats-server 5",
        ];
        out.extend(NATS.into_iter().zip(self.stack.nats.pids()));
        out.extend(self.stack.mongo.pid().map(|p| ("secantusdb", p)));
        out
    }

    pub fn chatd_pid(&self) -> u32 {
        self.chatd.id()
    }
}

impl Drop for System {
    fn drop(&mut self) {
        let _ = self.chatd.kill();
        let _ = self.chatd.wait();
    }
}

fn no_retryable_writes(uri: &str) -> String {
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}retryWrites=false")
}

/// One reading of a process from `/proc`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// User plus system CPU time, in clock ticks.
    ticks: u64,
    pub rss_kib: u64,
    pub peak_rss_kib: u64,
}

/// Linux's clock tick (`getconf CLK_TCK`), 100 on every mainstream kernel.
const TICKS_PER_SEC: f64 = 100.0;

pub fn sample(pid: u32) -> ProcSample {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // fields after the command name, which may hold spaces: state is the
    // first, utime the 12th and stime the 13th
    let ticks = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            n(11) + n(12)
        })
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    };
    ProcSample {
        ticks,
        rss_kib: field("VmRSS:"),
        peak_rss_kib: field("VmHWM:"),
    }
}

/// CPU and memory of one process over a measured window.
#[derive(Debug, Clone, Serialize)]
pub struct ProcUsage {
    pub name: String,
    /// Percent of one core (200 = both cores of this machine).
    pub cpu_percent: f64,
    pub rss_mib: f64,
    pub peak_rss_mib: f64,
}

/// Samples of several processes at the start of a window.
pub struct Window {
    started: Instant,
    before: Vec<(String, u32, ProcSample)>,
}

impl Window {
    pub fn open(processes: &[(&str, u32)]) -> Self {
        Self {
            started: Instant::now(),
            before: processes
                .iter()
                .map(|(n, p)| ((*n).to_owned(), *p, sample(*p)))
                .collect(),
        }
    }

    pub fn close(&self) -> Vec<ProcUsage> {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        self.before
            .iter()
            .map(|(name, pid, before)| {
                let now = sample(*pid);
                ProcUsage {
                    name: name.clone(),
                    cpu_percent: (now.ticks.saturating_sub(before.ticks)) as f64
                        / TICKS_PER_SEC
                        / secs
                        * 100.0,
                    rss_mib: now.rss_kib as f64 / 1024.0,
                    peak_rss_mib: now.peak_rss_kib as f64 / 1024.0,
                }
            })
            .collect()
    }
}

/// nats-server's own counts of the messages it took in and sent out
/// (`/varz`: client connections, routes and its internal JetStream clients
/// alike), summed over the nodes.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct NatsCounts {
    pub in_msgs: u64,
    pub out_msgs: u64,
}

impl NatsCounts {
    /// Reads every node's `/varz` (`monitors`: their monitoring URLs).
    pub async fn read(monitors: &[String]) -> anyhow::Result<Self> {
        let http = chat_http::client();
        let mut sum = Self::default();
        for m in monitors {
            let varz: serde_json::Value = http
                .get(format!("{m}/varz"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await
                .with_context(|| format!("{m}/varz"))?;
            let n = |k: &str| varz.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            sum.in_msgs += n("in_msgs");
            sum.out_msgs += n("out_msgs");
        }
        Ok(sum)
    }

    /// What was counted after `before`.
    pub fn since(self, before: Self) -> Self {
        Self {
            in_msgs: self.in_msgs.saturating_sub(before.in_msgs),
            out_msgs: self.out_msgs.saturating_sub(before.out_msgs),
        }
    }
}
