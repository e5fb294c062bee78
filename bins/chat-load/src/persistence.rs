//! After a run: is every message of the stream in MongoDB (the workers write
//! it there behind the stream), how long after the load did that take, and
//! how far behind the stream was MongoDB during the run
//! (`chat_persist_lag_seconds` from chatd's `/metrics`).

use std::time::{Duration, Instant};

use mongodb::bson::doc;
use serde::Serialize;

use crate::system::System;

/// How long to wait for MongoDB to hold everything the stream does.
const CATCH_UP: Duration = Duration::from_secs(120);

#[derive(Debug, Serialize)]
pub struct Persistence {
    /// Messages in `CHAT_GROUPS` at the end.
    pub in_stream: u64,
    /// Committed messages in MongoDB when the check ended.
    pub in_mongodb: u64,
    /// From the end of the load until MongoDB held all of them.
    pub caught_up_after_secs: Option<f64>,
    /// Stored in the stream to written in MongoDB, from the histogram's
    /// buckets: the upper bound of the bucket holding each quantile.
    pub lag_p50_ms: Option<f64>,
    pub lag_p99_ms: Option<f64>,
    pub lag_count: u64,
    /// Where a send's time went, as means over the run (ms): the edge's call
    /// to the worker, and the worker's stages (`chat_send_stage_seconds`).
    pub send_profile_ms: Vec<(String, f64)>,
    /// Mean messages per group publish (group commit), if any.
    pub publish_batch: Option<f64>,
    /// Notifications stored in `CHAT_USERS` by the end of the run.
    pub notifications: u64,
}

impl Persistence {
    pub fn complete(&self) -> bool {
        self.in_mongodb == self.in_stream
    }
}

/// `edited`: messages edited during the run. The messages' subjects carry
/// their edits too, as changes of messages, not messages; the stream keeps
/// the newest edit of each (the persist loop erases the one an edit
/// replaces), so once persistence has caught up it holds one change per
/// edited message.
pub async fn check(system: &System, edited: u64) -> anyhow::Result<Persistence> {
    let nats = crate::baseline::connect_options(&system.stack.nats.users.ops)
        .connect(crate::baseline::servers(&system.stack.nats.url))
        .await?;
    let js = async_nats::jetstream::new(nats);
    let groups = js.get_stream("CHAT_GROUPS").await?;
    // the group stream also carries membership events, which MongoDB does
    // not hold: count the messages' subjects only; counted again at each
    // look, as edits being persisted still erase the ones they replace
    let in_stream = || async {
        let mut n = 0u64;
        let mut subjects = groups.info_with_subjects("chat.group.*.msg").await?;
        while let Some(subject) = futures::StreamExt::next(&mut subjects).await {
            n += subject?.1 as u64;
        }
        Ok::<_, anyhow::Error>(n.saturating_sub(edited))
    };
    // what the run stored in the users' notification stream (statuses,
    // mentions, group events): the bucket of per-member costs
    let notifications = js
        .get_stream("CHAT_USERS")
        .await?
        .info()
        .await?
        .state
        .messages;
    let messages = mongodb::Client::with_uri_str(&system.stack.mongo.uri)
        .await?
        .database("chat")
        .collection::<mongodb::bson::Document>("messages");
    let started = Instant::now();
    let (in_stream, in_mongodb, caught_up_after_secs) = loop {
        let n = messages
            .count_documents(doc! { "state": "committed" })
            .await?;
        let stream = in_stream().await?;
        if n >= stream {
            break (stream, n, Some(started.elapsed().as_secs_f64()));
        }
        if started.elapsed() > CATCH_UP {
            break (stream, n, None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let metrics = chat_http::client()
        .get(format!("http://{}/metrics", system.ops))
        .send()
        .await?
        .text()
        .await?;
    let buckets = buckets(&metrics, "chat_persist_lag_seconds");
    let count = buckets.last().map_or(0, |(_, n)| *n);
    Ok(Persistence {
        in_stream,
        in_mongodb,
        caught_up_after_secs,
        lag_p50_ms: quantile(&buckets, 0.5).map(|s| s * 1e3),
        lag_p99_ms: quantile(&buckets, 0.99).map(|s| s * 1e3),
        lag_count: count,
        send_profile_ms: profile(&metrics),
        publish_batch: mean(&metrics, "chat_publish_batch_messages"),
        notifications,
    })
}

/// The mean of the histogram `series` (a name, with its labels if it has
/// any) in `text`, from its sum and count.
fn mean(text: &str, series: &str) -> Option<f64> {
    let value = |suffix: &str| {
        let key = match series.split_once('{') {
            Some((name, labels)) => format!("{name}{suffix}{{{labels}"),
            None => format!("{series}{suffix} "),
        };
        text.lines()
            .find(|l| l.starts_with(&key))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    let (sum, count) = (value("_sum")?, value("_count")?);
    (count > 0.0).then(|| sum / count)
}

/// Mean milliseconds of the send's stages, from the histograms' sums and
/// counts.
fn profile(text: &str) -> Vec<(String, f64)> {
    let mean = |series: &str| mean(text, series).map(|s| s * 1e3);
    [
        ("edge → worker call", "chat_rpc_seconds{method=\"send\"}"),
        (
            "worker: membership",
            "chat_send_stage_seconds{stage=\"membership\"}",
        ),
        (
            "worker: send log",
            "chat_send_stage_seconds{stage=\"send_log\"}",
        ),
        (
            "worker: publish (group lock and JetStream ack)",
            "chat_send_stage_seconds{stage=\"publish\"}",
        ),
        ("worker: total", "chat_send_stage_seconds{stage=\"total\"}"),
    ]
    .into_iter()
    .filter_map(|(name, series)| Some((name.to_owned(), mean(series)?)))
    .collect()
}

/// A Prometheus histogram's cumulative buckets: (upper bound, count).
fn buckets(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(f64, u64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let n = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((le, n))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The upper bound of the bucket in which quantile `q` falls.
fn quantile(buckets: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil() as u64;
    buckets.iter().find(|(_, n)| *n >= want).map(|(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_cumulative_buckets() {
        let text = "# TYPE chat_persist_lag_seconds histogram\n\
            chat_persist_lag_seconds_bucket{le=\"0.001\"} 10\n\
            chat_persist_lag_seconds_bucket{le=\"0.01\"} 90\n\
            chat_persist_lag_seconds_bucket{le=\"0.1\"} 100\n\
            chat_persist_lag_seconds_bucket{le=\"+Inf\"} 100\n\
            chat_persist_lag_seconds_sum 1.5\n";
        let b = buckets(text, "chat_persist_lag_seconds");
        assert_eq!(b.len(), 4);
        assert_eq!(quantile(&b, 0.5), Some(0.01));
        assert_eq!(quantile(&b, 0.99), Some(0.1));
        assert_eq!(quantile(&b, 0.05), Some(0.001));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn the_send_profile_reads_sums_and_counts() {
        let text = "chat_rpc_seconds_sum{method=\"send\"} 2\n\
            chat_rpc_seconds_count{method=\"send\"} 1000\n\
            chat_send_stage_seconds_sum{stage=\"total\"} 1\n\
            chat_send_stage_seconds_count{stage=\"total\"} 1000\n";
        let p = profile(text);
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].0, "edge → worker call");
        assert!((p[0].1 - 2.0).abs() < 1e-9);
        assert!((p[1].1 - 1.0).abs() < 1e-9);
    }

    #[test]
    fn means_of_unlabelled_histograms() {
        let text = "chat_publish_batch_messages_sum 30\n\
            chat_publish_batch_messages_count 10\n\
            chat_publish_batch_messages_more_sum 7\n\
            chat_empty_count 0\n\
            chat_empty_sum 0\n";
        let m = mean(text, "chat_publish_batch_messages").expect("a mean");
        assert!((m - 3.0).abs() < 1e-9);
        assert_eq!(mean(text, "chat_empty"), None, "no observations");
        assert_eq!(mean(text, "chat_missing"), None);
    }
}
