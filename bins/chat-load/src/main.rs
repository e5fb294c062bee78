//! `chat-load`: the load generator and benchmark (BENCHMARKS.md).
//!
//! Starts the whole system on real services (NATS, SecantusDB, s3s-fs and a
//! `chatd --role all` process), drives it over REST and WebSocket as
//! clients would, then measures raw NATS on the same server with the same
//! message size and fan-out, and writes `<out>/<scenario>.{json,md,svg}`.
//!
//! `scripts/bench <scenario> [flags]` builds both binaries in release mode
//! and runs this.

mod baseline;
mod load;
mod persistence;
mod report;
mod stats;
mod system;

use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Scenario {
    /// 100 connections, 10 groups of 10, every member sending at a fixed
    /// rate (2,000 sends/s in all), 64-byte texts.
    Rooms,
    /// 1,000 connections, 100 groups of 10, 1 KiB messages at a fixed rate.
    Steady,
    /// One group of 1,000 members, one sender as fast as acks allow.
    Fanout,
    /// 10,000 registered users (9,000 offline, each with a place), 1,000 of them online.
    ManyUsers,
    /// A member offline for 10,000 messages reconnects.
    CatchUp,
    /// 5,000 connections opened at a fixed rate, then idle: memory per
    /// connection.
    Storm,
    /// One group of 1,000 members, 20 of them typing (`start` and `stop` in
    /// turn, 40 signals/s in all): the fan-out of an ephemeral event.
    Typing,
    /// One group of 1,000 members connecting, then idle: what presence
    /// costs (`a_presence` frames, `GET /groups/{id}/presence`).
    Presence,
    /// One group of 1,000 members, 20 of them editing a message of their
    /// own (40 edits/s in all): the fan-out of `a_message_updated`.
    Edits,
    /// One group of 10,000 messages searched for a word none holds, call
    /// after call: what a search costs (each opens `--max-search-scan`).
    Search,
}

/// Load generator and benchmark for the chat system.
#[derive(Debug, Parser)]
struct Args {
    scenario: Scenario,
    /// Groups with online members (each member one connection).
    #[arg(long)]
    groups: Option<usize>,
    #[arg(long)]
    members: Option<usize>,
    /// Members per group that send.
    #[arg(long)]
    senders: Option<usize>,
    /// Total sends per second, or `acks` for as fast as acks allow.
    #[arg(long)]
    rate: Option<String>,
    /// Unacknowledged sends per sender when the rate is `acks`.
    #[arg(long)]
    window: Option<usize>,
    /// Bytes of text per message.
    #[arg(long)]
    size: Option<usize>,
    #[arg(long)]
    warmup_secs: Option<u64>,
    #[arg(long)]
    duration_secs: Option<u64>,
    /// New connections per second.
    #[arg(long)]
    connect_rate: Option<f64>,
    #[arg(long)]
    offline_users: Option<usize>,
    /// catch-up: messages missed.
    #[arg(long, default_value_t = 10_000)]
    missed: u64,
    /// search: messages in the group.
    #[arg(long, default_value_t = 10_000)]
    search_messages: u64,
    /// search: calls, one after another.
    #[arg(long, default_value_t = 300)]
    searches: u64,
    /// Run SecantusDB without `--sync-on-commit` (commits not synced to
    /// disk): shows what the stand-in's per-commit sync costs. Not a
    /// configuration to quote.
    #[arg(long)]
    no_sync_on_commit: bool,
    /// Skip the raw NATS runs.
    #[arg(long)]
    no_baseline: bool,
    /// Where the report goes.
    #[arg(long, default_value = "bench-results")]
    out: std::path::PathBuf,
    /// NATS nodes: more than one makes a cluster with the streams
    /// replicated on every node (`chatd --nats-replicas`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
    nats_nodes: u64,
    /// Extra flags for chatd (repeatable), e.g. `--chatd-arg=--requests-per-sec=100`.
    #[arg(long = "chatd-arg", allow_hyphen_values = true)]
    chatd_args: Vec<String>,
}

fn plan(a: &Args) -> anyhow::Result<load::Plan> {
    use Scenario::*;
    // (groups, members, senders, rate, window, size, duration, connect rate, offline)
    let (groups, members, senders, rate, window, size, duration, connect_rate, offline) =
        match a.scenario {
            Rooms => (10, 10, 10, Some(2000.0), 1, 64, 60, 200.0, 0),
            Steady => (100, 10, 10, Some(1000.0), 1, 1024, 60, 200.0, 0),
            Fanout => (1, 1000, 1, None, 4, 64, 30, 200.0, 0),
            ManyUsers => (100, 10, 10, Some(500.0), 1, 256, 30, 200.0, 9_000),
            CatchUp => (1, 2, 1, None, 1, 256, 0, 10.0, 0),
            Storm => (500, 10, 0, Some(0.0), 1, 64, 5, 500.0, 0),
            Typing => (1, 1000, 20, Some(40.0), 1, 64, 30, 200.0, 0),
            Presence => (1, 1000, 0, Some(0.0), 1, 64, 10, 200.0, 0),
            Edits => (1, 1000, 20, Some(40.0), 1, 64, 30, 200.0, 0),
            Search => (1, 1, 1, None, 1, 64, 0, 10.0, 0),
        };
    let rate = match a.rate.as_deref() {
        None => rate,
        Some("acks") => None,
        Some(r) => Some(r.parse::<f64>()?),
    };
    Ok(load::Plan {
        groups: a.groups.unwrap_or(groups),
        members: a.members.unwrap_or(members),
        senders_per_group: a.senders.unwrap_or(senders),
        rate,
        window: a.window.unwrap_or(window),
        size: a.size.unwrap_or(size).max(24),
        warmup: Duration::from_secs(a.warmup_secs.unwrap_or(if duration > 5 { 5 } else { 0 })),
        duration: Duration::from_secs(a.duration_secs.unwrap_or(duration)),
        connect_rate: a.connect_rate.unwrap_or(connect_rate),
        offline_users: a.offline_users.unwrap_or(offline),
        typing: a.scenario == Typing,
        presence: a.scenario == Presence,
        edits: a.scenario == Edits,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = plan(&args)?;
    let name = args
        .scenario
        .to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_default();
    let command = std::env::args().skip(1).collect::<Vec<_>>().join(" ");
    let started_at = chat_protocol::format_millis(chat_domain::now_millis());
    // clients of a benchmark send faster than the default 50 requests/s
    // per connection; everything else is chatd's defaults
    let mut chatd_args = vec!["--requests-per-sec=100000".to_owned()];
    if args.nats_nodes > 1 {
        chatd_args.push(format!("--nats-replicas={}", args.nats_nodes));
    }
    chatd_args.extend(args.chatd_args.iter().cloned());
    eprintln!("starting nats-server, SecantusDB, s3s-fs and chatd");
    let system = system::System::start(
        &chatd_args,
        !args.no_sync_on_commit,
        args.nats_nodes as usize,
    )
    .await?;
    let processes = system.processes();
    let nats_processes: Vec<(&str, u32)> = processes
        .iter()
        .filter(|(name, _)| name.starts_with("nats-server"))
        .copied()
        .collect();
    let nats_pid = system.stack.nats.pid().unwrap_or(0);
    let me = std::process::id();
    let own = system::Window::open(&[("chat-load", me)]);

    let mut report = report::Report {
        scenario: name,
        command: format!("scripts/bench {command}"),
        started_at,
        machine: report::Machine::read(),
        chat: None,
        catch_up: None,
        search: None,
        persistence: None,
        server: vec![],
        load_generator_cpu_percent: 0.0,
        nats_core: None,
        jetstream: None,
        ratios: report::Ratios::default(),
        costs: report::Costs::default(),
    };
    if args.scenario == Scenario::CatchUp {
        let w = system::Window::open(&processes);
        report.catch_up = Some(load::catch_up(system.http, args.missed, plan.size).await?);
        report.server = w.close();
    } else if args.scenario == Scenario::Search {
        let (result, usage) = load::search(
            system.http,
            args.search_messages,
            plan.size,
            args.searches,
            &processes,
        )
        .await?;
        report.search = Some(result);
        report.server = usage;
    } else {
        let monitors = system.stack.nats.monitor_urls();
        let (chat, usage) = load::run(
            &plan,
            system.http,
            system.chatd_pid(),
            nats_pid,
            &processes,
            &monitors,
        )
        .await?;
        report.chat = Some(chat);
        report.server = usage;
    }
    if report.chat.as_ref().is_some_and(|c| c.acked > 0) {
        eprintln!("checking that MongoDB caught up with the stream");
        // edits are on the messages' subjects too, but are no messages
        let changes = report.chat.as_ref().map_or(0, |c| c.messages_edited);
        report.persistence = Some(persistence::check(&system, changes).await?);
    }
    report.load_generator_cpu_percent = own.close().first().map_or(0.0, |u| u.cpu_percent);
    let sends = report.chat.as_ref().is_some_and(|c| c.sent > 0);
    if !args.no_baseline && sends {
        let secs = Duration::from_secs(plan.duration.as_secs().clamp(5, 20));
        report.nats_core = Some(
            baseline::core_fanout(
                &system.stack.nats.url,
                &system.stack.nats.users.ops,
                plan.groups,
                plan.members,
                plan.size,
                secs,
            )
            .await?,
        );
        report.jetstream = Some(
            baseline::jetstream(
                &system.stack.nats.url,
                &system.stack.nats.users.ops,
                &nats_processes,
                &system.stack.nats.monitor_urls(),
                args.nats_nodes as usize,
                plan.groups,
                plan.size,
                256,
                secs,
            )
            .await?,
        );
    }
    report.compute_ratios();
    report.write(&args.out)?;
    println!("{}", report.markdown());
    println!(
        "wrote {}/{}.{{json,md,svg}}",
        args.out.display(),
        report.scenario
    );
    if std::env::var_os("CHAT_LOAD_CHATD_LOG").is_some() {
        let keep = args.out.join(format!("{}-chatd.log", report.scenario));
        std::fs::copy(system.log_path(), &keep)?;
        println!("chatd's log: {}", keep.display());
    }
    drop(system);
    let clean = report
        .chat
        .as_ref()
        .map(|c| c.integrity.clean())
        .unwrap_or(true)
        && report
            .catch_up
            .as_ref()
            .map(|c| c.integrity.clean())
            .unwrap_or(true);
    if !clean {
        anyhow::bail!("deliveries were lost, repeated or out of order: see the report");
    }
    if report.persistence.as_ref().is_some_and(|p| !p.complete()) {
        anyhow::bail!("MongoDB does not hold every message of the stream: see the report");
    }
    Ok(())
}
