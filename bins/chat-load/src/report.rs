//! The run's report: JSON (everything), a Markdown summary, and an SVG chart
//! of latency percentiles and throughput over time.

use std::{fmt::Write as _, path::Path};

use serde::Serialize;

use crate::{
    baseline::{CoreResult, JetStreamResult},
    load::{CatchUpResult, ChatResult, SearchResult},
    stats::Percentiles,
    system::{NatsCounts, ProcUsage},
};

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: cpuinfo
                .lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .unwrap_or("unknown")
                .trim()
                .to_owned(),
            memory_gib: mem_kib / 1024.0 / 1024.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
        }
    }
}

/// The system's figures as fractions of raw NATS in the same run.
#[derive(Debug, Default, Serialize)]
pub struct Ratios {
    /// Chat deliveries per second ÷ core NATS deliveries per second.
    pub deliveries_vs_nats_core: Option<f64>,
    /// Chat sends per second (persisted) ÷ JetStream acked publishes per
    /// second.
    pub sends_vs_jetstream: Option<f64>,
    /// Chat send→delivery p50 ÷ core NATS publish→delivery p50.
    pub delivery_p50_vs_nats_core: Option<f64>,
    /// Chat send→ack p50 ÷ JetStream publish→ack p50.
    pub ack_p50_vs_jetstream: Option<f64>,
}

/// What one acknowledged send cost the servers, against what one raw
/// JetStream publish cost nats-server in the same run: the profile behind
/// "sends ÷ JetStream acked publishes".
#[derive(Debug, Default, Serialize)]
pub struct Costs {
    /// CPU microseconds per acknowledged send, per server process (its CPU
    /// over the window of warm-up and measurement ÷ the acked rate).
    pub cpu_us_per_send: Vec<(String, f64)>,
    /// The messages nats-server took in and sent out per acknowledged send
    /// (all nodes, `/varz`).
    pub nats_msgs_per_send: Option<(f64, f64)>,
    /// nats-server's CPU microseconds per raw JetStream acked publish.
    pub nats_cpu_us_per_publish: Option<f64>,
    /// The messages it took in and sent out per raw publish.
    pub nats_msgs_per_publish: Option<(f64, f64)>,
    /// nats-server's CPU per raw publish ÷ its CPU per send, in a run at
    /// capacity (sends as fast as acks allow): the ratio of sends to raw
    /// publishes if nothing but nats-server cost anything and it had the CPU
    /// it had in the raw run. Below capacity a send's share of the idle
    /// work (timers, polls) makes it no bound.
    pub sends_vs_jetstream_bound_by_nats: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenario: String,
    pub command: String,
    pub started_at: String,
    pub machine: Machine,
    pub chat: Option<ChatResult>,
    pub catch_up: Option<CatchUpResult>,
    pub search: Option<SearchResult>,
    /// Whether MongoDB caught up with the stream, and how far behind it was.
    pub persistence: Option<crate::persistence::Persistence>,
    /// Server processes during the measured window.
    pub server: Vec<ProcUsage>,
    /// The load generator itself, which shares the machine.
    pub load_generator_cpu_percent: f64,
    pub nats_core: Option<CoreResult>,
    pub jetstream: Option<JetStreamResult>,
    pub ratios: Ratios,
    pub costs: Costs,
}

impl Costs {
    /// `sends_per_sec` acked over `secs` (`at_capacity`: as fast as acks
    /// allowed), with `counts` of nats-server's messages in those seconds
    /// and `server` the processes' usage.
    fn of(
        at_capacity: bool,
        sends_per_sec: f64,
        secs: f64,
        counts: &NatsCounts,
        server: &[ProcUsage],
        js: Option<&JetStreamResult>,
    ) -> Self {
        let div = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        let per_send = |cpu_percent: f64| div(cpu_percent * 1e4, sends_per_sec);
        let cpu_us_per_send = server
            .iter()
            .filter_map(|p| Some((p.name.clone(), per_send(p.cpu_percent)?)))
            .collect();
        let nats_cpu: f64 = server
            .iter()
            .filter(|p| p.name.starts_with("nats-server"))
            .map(|p| p.cpu_percent)
            .sum();
        let msgs =
            |c: &NatsCounts, n: f64| Some((div(c.in_msgs as f64, n)?, div(c.out_msgs as f64, n)?));
        let nats_per_send = per_send(nats_cpu);
        let nats_cpu_us_per_publish =
            js.and_then(|j| div(j.nats_cpu_percent * 1e4, j.acked_per_sec));
        Self {
            cpu_us_per_send,
            nats_msgs_per_send: msgs(counts, sends_per_sec * secs),
            nats_cpu_us_per_publish,
            nats_msgs_per_publish: js.and_then(|j| msgs(&j.nats_counts, j.acked_per_sec * j.secs)),
            sends_vs_jetstream_bound_by_nats: nats_cpu_us_per_publish
                .zip(nats_per_send)
                .filter(|_| at_capacity)
                .and_then(|(p, s)| div(p, s)),
        }
    }
}

impl Report {
    pub fn compute_ratios(&mut self) {
        let div = |a: f64, b: f64| (b > 0.0).then(|| a / b);
        if let Some(chat) = &self.chat {
            if let Some(core) = &self.nats_core {
                self.ratios.deliveries_vs_nats_core =
                    div(chat.deliveries_per_sec, core.deliveries_per_sec);
                self.ratios.delivery_p50_vs_nats_core =
                    div(chat.delivery.p50_ms, core.latency.p50_ms);
            }
            if let Some(js) = &self.jetstream {
                self.ratios.sends_vs_jetstream = div(chat.sends_per_sec, js.acked_per_sec);
                self.ratios.ack_p50_vs_jetstream = div(chat.ack.p50_ms, js.latency.p50_ms);
            }
            self.costs = Costs::of(
                chat.plan.rate.is_none(),
                chat.sends_per_sec,
                chat.measured_secs,
                &chat.nats_counts,
                &self.server,
                self.jetstream.as_ref(),
            );
        }
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let base = dir.join(&self.scenario);
        std::fs::write(
            base.with_extension("json"),
            serde_json::to_string_pretty(self)?,
        )?;
        std::fs::write(base.with_extension("md"), self.markdown())?;
        std::fs::write(base.with_extension("svg"), self.svg())?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## {} ({})\n", self.scenario, self.started_at);
        let _ = writeln!(
            s,
            "`{}` on {} × {}, {:.0} GiB, Linux {}\n",
            self.command,
            self.machine.cpus,
            self.machine.cpu_model,
            self.machine.memory_gib,
            self.machine.kernel
        );
        let _ = writeln!(s, "| measure | value |\n|---|---|");
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "| {k} | {v} |");
        };
        let pct = |p: &Percentiles| {
            format!(
                "{:.1} / {:.1} / {:.1} / {:.1} / {:.1} ms (n = {})",
                p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms, p.count
            )
        };
        if let Some(c) = &self.chat {
            row(
                "connections",
                format!(
                    "{} ({} groups of {}), opened in {:.1} s ({:.0}/s)",
                    c.connections,
                    c.plan.groups,
                    c.plan.members,
                    c.connect_secs,
                    c.connects_per_sec
                ),
            );
            if c.plan.offline_users > 0 {
                row(
                    "registered offline users",
                    format!(
                        "{} (registered in {:.1} s)",
                        c.plan.offline_users, c.register_secs
                    ),
                );
            }
            row(
                "message size / offered rate",
                format!(
                    "{} B / {}",
                    c.plan.size,
                    match c.plan.rate {
                        Some(r) => format!("{r:.0} sends/s"),
                        None => format!(
                            "as fast as acks allow ({} in flight per sender)",
                            c.plan.window
                        ),
                    }
                ),
            );
            row(
                "acked sends/s (in the stream, encrypted) over the measured window",
                format!(
                    "{:.0} of {:.0} offered ({:.0} s after {} s warm-up)",
                    c.sends_per_sec,
                    c.offered_per_sec,
                    c.measured_secs,
                    c.plan.warmup.as_secs()
                ),
            );
            row("deliveries/s", format!("{:.0}", c.deliveries_per_sec));
            row(
                "send → delivery p50 / p90 / p99 / p99.9 / max",
                pct(&c.delivery),
            );
            row("send → ack p50 / p90 / p99 / p99.9 / max", pct(&c.ack));
            row(
                "lost / duplicated / out of order",
                format!(
                    "{} / {} / {} of {} expected deliveries",
                    c.integrity.lost,
                    c.integrity.duplicated,
                    c.integrity.out_of_order,
                    c.integrity.expected
                ),
            );
            row(
                "sent / acked / errors / skipped",
                format!("{} / {} / {:?} / {}", c.sent, c.acked, c.errors, c.skipped),
            );
            if c.edits_acked > 0 {
                row(
                    "edits acknowledged / a_message_updated frames received",
                    format!("{} / {}", c.edits_acked, c.updates_received),
                );
            }
            if let Some(p) = &c.presence {
                row(
                    "a_presence frames once connected / while idle",
                    format!(
                        "{} / {} (all members)",
                        p.frames_after_connect, p.frames_while_idle
                    ),
                );
                row(
                    "GET /groups/{id}/presence p50 / max",
                    format!(
                        "{:.1} / {:.1} ms ({} members listed, {} online)",
                        p.get_p50_ms, p.get_max_ms, p.members_listed, p.online_listed
                    ),
                );
            }
            row(
                "memory per idle connection",
                format!(
                    "chatd {:.1} KiB, nats-server {:.1} KiB",
                    c.chatd_kib_per_connection, c.nats_kib_per_connection
                ),
            );
        }
        if let Some(p) = &self.persistence {
            let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("≤ {v:.1} ms"));
            row(
                "persisted to MongoDB (behind the stream)",
                format!(
                    "{} of {} stream messages, {}; lag stream → MongoDB p50 {} / p99 {} (n = {})",
                    p.in_mongodb,
                    p.in_stream,
                    p.caught_up_after_secs
                        .map_or("not caught up".to_owned(), |s| {
                            format!("all there {s:.1} s after the load")
                        }),
                    ms(p.lag_p50_ms),
                    ms(p.lag_p99_ms),
                    p.lag_count
                ),
            );
            if !p.send_profile_ms.is_empty() {
                row(
                    "where a send's time goes (means)",
                    p.send_profile_ms
                        .iter()
                        .map(|(k, v)| format!("{k} {v:.2} ms"))
                        .collect::<Vec<_>>()
                        .join("; "),
                );
            }
            row(
                "notifications stored (CHAT_USERS, whole run)",
                p.notifications.to_string(),
            );
            if let Some(n) = p.publish_batch {
                row(
                    "messages per group publish (mean; group commit)",
                    format!("{n:.1}"),
                );
            }
        }
        if let Some(c) = &self.catch_up {
            row(
                "catch-up",
                format!(
                    "{} missed messages of {} B received in {:.2} s ({:.0}/s); lost {}, duplicated {}, out of order {}",
                    c.missed,
                    c.size,
                    c.catch_up_secs,
                    c.messages_per_sec,
                    c.integrity.lost,
                    c.integrity.duplicated,
                    c.integrity.out_of_order
                ),
            );
        }
        if let Some(r) = &self.search {
            row(
                "search",
                format!(
                    "{} calls over {} messages of {} B: {:.0} calls/s, {:.0} messages opened/s ({:.0} per call)",
                    r.calls,
                    r.messages,
                    r.size,
                    r.calls_per_sec,
                    r.opened_per_sec,
                    r.opened as f64 / r.calls.max(1) as f64
                ),
            );
            row(
                "search call p50 / p90 / p99 / max",
                format!(
                    "{:.2} / {:.2} / {:.2} / {:.2} ms",
                    r.latency.p50_ms, r.latency.p90_ms, r.latency.p99_ms, r.latency.max_ms
                ),
            );
        }
        for p in &self.server {
            row(
                &format!("{} CPU / RSS (peak)", p.name),
                format!(
                    "{:.0} % / {:.0} MiB ({:.0} MiB)",
                    p.cpu_percent, p.rss_mib, p.peak_rss_mib
                ),
            );
        }
        row(
            "load generator CPU",
            format!("{:.0} %", self.load_generator_cpu_percent),
        );
        if let Some(n) = &self.nats_core {
            row(
                "raw NATS core fan-out",
                format!(
                    "{} subjects × {} subscribers: {:.0} publishes/s, {:.0} deliveries/s; p50 / p99 {:.2} / {:.2} ms; lost {}",
                    n.subjects,
                    n.subscribers_per_subject,
                    n.publishes_per_sec,
                    n.deliveries_per_sec,
                    n.latency.p50_ms,
                    n.latency.p99_ms,
                    n.integrity.lost
                ),
            );
        }
        if let Some(j) = &self.jetstream {
            row(
                "raw JetStream acked publishes",
                format!(
                    "{:.0}/s ({} in flight); p50 / p99 {:.2} / {:.2} ms",
                    j.acked_per_sec, j.window, j.latency.p50_ms, j.latency.p99_ms
                ),
            );
        }
        let r = &self.ratios;
        let ratio = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{:.1} %", v * 100.0));
        if r.deliveries_vs_nats_core.is_some() || r.sends_vs_jetstream.is_some() {
            row(
                "**deliveries/s ÷ NATS core**",
                ratio(r.deliveries_vs_nats_core),
            );
            row(
                "**sends/s ÷ JetStream acked publishes**",
                ratio(r.sends_vs_jetstream),
            );
            row(
                "delivery p50 ÷ NATS core p50",
                r.delivery_p50_vs_nats_core
                    .map_or("–".into(), |v| format!("{v:.1}×")),
            );
            row(
                "ack p50 ÷ JetStream ack p50",
                r.ack_p50_vs_jetstream
                    .map_or("–".into(), |v| format!("{v:.1}×")),
            );
        }
        let c = &self.costs;
        if !c.cpu_us_per_send.is_empty() {
            let cpu = c
                .cpu_us_per_send
                .iter()
                .map(|(name, us)| format!("{name} {us:.0} µs"))
                .collect::<Vec<_>>()
                .join(", ");
            let msgs = c.nats_msgs_per_send.map_or(String::new(), |(i, o)| {
                format!("; nats-server messages in / out {i:.1} / {o:.1}")
            });
            row("CPU per acked send", format!("{cpu}{msgs}"));
        }
        if let Some(us) = c.nats_cpu_us_per_publish {
            let msgs = c.nats_msgs_per_publish.map_or(String::new(), |(i, o)| {
                format!("; messages in / out {i:.1} / {o:.1}")
            });
            row(
                "nats-server CPU per raw JetStream publish",
                format!("{us:.1} µs{msgs}"),
            );
        }
        if let Some(b) = c.sends_vs_jetstream_bound_by_nats {
            row(
                "sends ÷ JetStream, bound by nats-server's CPU alone (at capacity)",
                format!("{:.1} %", b * 100.0),
            );
        }
        s
    }

    /// Two panels: latency percentiles (log scale) of the chat and the raw
    /// NATS runs, and sends and deliveries per second over time.
    pub fn svg(&self) -> String {
        let (w, h) = (1000.0, 420.0);
        let mut s = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="20" y="22" font-size="15">{} — latency percentiles (ms, log scale) and throughput</text>"#,
            self.scenario
        );
        // left: percentiles
        let mut series: Vec<(&str, Percentiles, &str)> = Vec::new();
        if let Some(c) = &self.chat {
            series.push(("chat send→delivery", c.delivery, "#d62728"));
            series.push(("chat send→ack", c.ack, "#ff7f0e"));
        }
        if let Some(n) = &self.nats_core {
            series.push(("NATS core", n.latency, "#1f77b4"));
        }
        if let Some(j) = &self.jetstream {
            series.push(("JetStream ack", j.latency, "#2ca02c"));
        }
        let (x0, y0, pw, ph) = (60.0, 50.0, 400.0, 300.0);
        let max = series
            .iter()
            .map(|(_, p, _)| p.max_ms)
            .fold(1.0f64, f64::max);
        let (lo, hi) = (0.01f64.log10(), (max * 1.5).log10());
        let y = |v: f64| y0 + ph - (v.max(0.01).log10() - lo) / (hi - lo) * ph;
        let _ = write!(
            s,
            r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##
        );
        let mut tick = 0.01f64;
        while tick <= max * 1.5 {
            let _ = write!(
                s,
                r##"<line x1="{x0}" x2="{}" y1="{yy:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{tick}</text>"##,
                x0 + pw,
                x0 - 4.0,
                y(tick) + 4.0,
                yy = y(tick)
            );
            tick *= 10.0;
        }
        let labels = ["p50", "p90", "p99", "p99.9", "max"];
        let group_w = pw / labels.len() as f64;
        let bar_w = (group_w - 10.0) / series.len().max(1) as f64;
        for (li, label) in labels.iter().enumerate() {
            let gx = x0 + li as f64 * group_w + 5.0;
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{label}</text>"#,
                gx + group_w / 2.0 - 5.0,
                y0 + ph + 16.0
            );
            for (si, (_, p, color)) in series.iter().enumerate() {
                let v = [p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms][li];
                let top = y(v);
                let _ = write!(
                    s,
                    r#"<rect x="{:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{color}"><title>{v:.3} ms</title></rect>"#,
                    gx + si as f64 * bar_w,
                    bar_w - 1.0,
                    (y0 + ph - top).max(0.0)
                );
            }
        }
        for (si, (name, _, color)) in series.iter().enumerate() {
            let ly = y0 + ph + 34.0 + (si / 2) as f64 * 16.0;
            let lx = x0 + (si % 2) as f64 * 200.0;
            let _ = write!(
                s,
                r#"<rect x="{lx}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{}" y="{ly:.1}">{name}</text>"#,
                ly - 9.0,
                lx + 14.0
            );
        }
        // right: throughput per second
        if let Some(c) = &self.chat {
            let (x0, pw) = (540.0, 420.0);
            let n = c.delivered_per_second.len().max(2);
            let top = c
                .delivered_per_second
                .iter()
                .chain(&c.sent_per_second)
                .copied()
                .max()
                .unwrap_or(1)
                .max(1) as f64
                * 1.1;
            let px = |i: usize| x0 + i as f64 / (n - 1) as f64 * pw;
            let py = |v: u64| y0 + ph - v as f64 / top * ph;
            let _ = write!(
                s,
                r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#999"/><text x="{x0}" y="{}" >0</text><text x="{}" y="{}" text-anchor="end">{} s</text><text x="{}" y="{}" text-anchor="end">{top:.0}/s</text>"##,
                y0 + ph + 16.0,
                x0 + pw,
                y0 + ph + 16.0,
                n - 1,
                x0 - 4.0,
                y0 + 10.0
            );
            let warm = c.plan.warmup.as_secs() as usize;
            let _ = write!(
                s,
                r##"<line x1="{x:.1}" x2="{x:.1}" y1="{y0}" y2="{}" stroke="#aaa" stroke-dasharray="4"/><text x="{:.1}" y="{}">measured from here</text>"##,
                y0 + ph,
                px(warm) + 4.0,
                y0 + 14.0,
                x = px(warm)
            );
            for (vals, color, name, row) in [
                (&c.sent_per_second, "#ff7f0e", "sends/s", 0.0),
                (&c.delivered_per_second, "#d62728", "deliveries/s", 1.0),
            ] {
                let points: Vec<String> = vals
                    .iter()
                    .enumerate()
                    .map(|(i, v)| format!("{:.1},{:.1}", px(i), py(*v)))
                    .collect();
                let _ = write!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/><rect x="{x0}" y="{:.1}" width="10" height="10" fill="{color}"/><text x="{}" y="{:.1}">{name}</text>"#,
                    points.join(" "),
                    y0 + ph + 25.0 + row * 16.0,
                    x0 + 14.0,
                    y0 + ph + 34.0 + row * 16.0
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_divide_chat_by_nats() {
        let p = Percentiles {
            count: 1,
            p50_ms: 2.0,
            ..Default::default()
        };
        let mut r = Report {
            scenario: "t".into(),
            command: String::new(),
            started_at: String::new(),
            machine: Machine::read(),
            chat: None,
            catch_up: None,
            search: None,
            persistence: None,
            server: vec![],
            load_generator_cpu_percent: 0.0,
            nats_core: Some(CoreResult {
                subjects: 1,
                subscribers_per_subject: 1,
                size: 1,
                secs: 1.0,
                publishes_per_sec: 1.0,
                deliveries_per_sec: 400.0,
                latency: Percentiles { p50_ms: 0.5, ..p },
                integrity: Default::default(),
            }),
            jetstream: None,
            ratios: Ratios::default(),
            costs: Costs::default(),
        };
        r.compute_ratios();
        assert!(
            r.ratios.deliveries_vs_nats_core.is_none(),
            "no chat run, no ratio"
        );
        assert!(r.svg().starts_with("<svg"));
        assert!(r.markdown().contains("raw NATS core fan-out"));
    }

    #[test]
    fn a_send_s_cost_is_its_process_s_cpu_over_the_acked_rate() {
        let usage = |name: &str, cpu_percent: f64| ProcUsage {
            name: name.into(),
            cpu_percent,
            rss_mib: 0.0,
            peak_rss_mib: 0.0,
        };
        let js = JetStreamResult {
            subjects: 1,
            size: 64,
            window: 256,
            secs: 10.0,
            acked_per_sec: 100_000.0,
            latency: Percentiles::default(),
            // 5 µs a publish
            nats_cpu_percent: 50.0,
            nats_counts: NatsCounts {
                in_msgs: 1_000_000,
                out_msgs: 2_000_000,
            },
        };
        let server = [
            usage("chatd", 80.0),
            usage("nats-server", 30.0),
            usage("nats-server 2", 10.0),
        ];
        let counts = NatsCounts {
            in_msgs: 60_000,
            out_msgs: 150_000,
        };
        // 4,000 sends/s for 5 s
        let c = Costs::of(true, 4_000.0, 5.0, &counts, &server, Some(&js));
        assert_eq!(
            c.cpu_us_per_send,
            vec![
                ("chatd".to_owned(), 200.0),
                ("nats-server".to_owned(), 75.0),
                ("nats-server 2".to_owned(), 25.0)
            ]
        );
        assert_eq!(c.nats_msgs_per_send, Some((3.0, 7.5)));
        assert_eq!(c.nats_cpu_us_per_publish, Some(5.0));
        assert_eq!(c.nats_msgs_per_publish, Some((1.0, 2.0)));
        // 5 µs a publish against 100 µs of every node's CPU a send
        assert_eq!(c.sends_vs_jetstream_bound_by_nats, Some(0.05));
        let below = Costs::of(false, 4_000.0, 5.0, &counts, &server, Some(&js));
        assert_eq!(below.cpu_us_per_send, c.cpu_us_per_send);
        assert!(
            below.sends_vs_jetstream_bound_by_nats.is_none(),
            "below capacity there is no bound"
        );
        let none = Costs::of(true, 0.0, 5.0, &counts, &server, None);
        assert!(none.cpu_us_per_send.is_empty() && none.nats_msgs_per_send.is_none());
        assert!(none.sends_vs_jetstream_bound_by_nats.is_none());
    }
}
