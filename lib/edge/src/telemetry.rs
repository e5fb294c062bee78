//! Prometheus metrics: the process-wide recorder, and the `/metrics` route
//! (on the edge's port, and on `--metrics-listen` for worker-only processes).
//!
//! Metric names (all prefixed `chat_`): `ws_connections` (gauge),
//! `ws_requests_total{event}`, `ws_errors_total{code}`,
//! `ws_events_out_total{event}`, `ws_deliveries_total{feed}`, `delivery_latency_seconds` (message created
//! to written on a socket), `consumer_pending{feed}` (messages waiting in a
//! device's consumer when one was delivered), `rpc_seconds{method}` (edge to
//! worker), `publish_seconds` and `send_conflicts_total` (worker to
//! JetStream), `messages_sent_total`, `send_stage_seconds{stage}` (the
//! worker's share of a send: `membership`, `send_log`, `publish`, `total`),
//! `persist_lag_seconds` (stored in the stream to written in MongoDB),
//! `persist_batch_seconds` and `persist_batch_size` (one persist loop's
//! batches: their sum over time is how busy the loop is),
//! `persisted_total`, `persist_failures_total`, `persist_rejected_total`,
//! `persist_waits_timed_out_total`.

use std::sync::OnceLock;

use axum::{Router, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Latency buckets, in seconds: 0.5 ms to 10 s.
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// The process's recorder, installed on first use. Several nodes in one
/// process (tests, `--role all`) share it.
pub fn prometheus() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("chat_consumer_pending".into()),
                        &[0.0, 1.0, 10.0, 100.0, 1000.0, 10000.0],
                    )
                })
                .and_then(|b| {
                    // messages per persist batch (at most 256)
                    b.set_buckets_for_metric(
                        Matcher::Full("chat_persist_batch_size".into()),
                        &[1.0, 16.0, 64.0, 128.0, 192.0, 255.0, 256.0],
                    )
                })
                .map(PrometheusBuilder::build_recorder);
            match recorder {
                Ok(recorder) => {
                    let handle = recorder.handle();
                    if metrics::set_global_recorder(recorder).is_err() {
                        tracing::warn!(
                            "a metrics recorder was already installed; /metrics will be empty"
                        );
                    }
                    handle
                }
                Err(e) => {
                    tracing::warn!(error = %e, "bad metric buckets; using defaults");
                    let recorder = PrometheusBuilder::new().build_recorder();
                    let handle = recorder.handle();
                    let _ = metrics::set_global_recorder(recorder);
                    handle
                }
            }
        })
        .clone()
}

/// A router serving `GET /metrics` in the Prometheus text format, for any
/// router state.
pub fn metrics_router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let handle = prometheus();
    Router::new().route("/metrics", get(move || std::future::ready(handle.render())))
}
