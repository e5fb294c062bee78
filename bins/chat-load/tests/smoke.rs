//! The load generator end to end on a small plan: it starts the system,
//! sends, checks every delivery, measures raw NATS, and writes its report.
//! Needs `chatd` built next to it (`scripts/test` builds it first).

use std::process::Command;

#[test]
fn a_small_rooms_run_reports_clean_deliveries_and_a_baseline()
-> Result<(), Box<dyn std::error::Error>> {
    let out = tempfile::tempdir()?;
    let run = Command::new(env!("CARGO_BIN_EXE_chat-load"))
        .args([
            "rooms",
            "--groups",
            "2",
            "--members",
            "3",
            "--rate",
            "30",
            "--warmup-secs",
            "1",
            "--duration-secs",
            "3",
        ])
        .arg("--out")
        .arg(out.path())
        .output()?;
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "chat-load failed:\n{log}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("rooms.json"))?)?;
    let chat = &report["chat"];
    assert_eq!(chat["connections"], 6);
    let acked = chat["acked"].as_u64().unwrap_or(0);
    assert!(acked > 30, "too few sends acknowledged: {chat}");
    // every member of a group receives every acknowledged message of it
    let integrity = &chat["integrity"];
    assert_eq!(integrity["lost"], 0, "{integrity}");
    assert_eq!(integrity["duplicated"], 0, "{integrity}");
    assert_eq!(integrity["out_of_order"], 0, "{integrity}");
    assert_eq!(
        integrity["expected"].as_u64(),
        Some(acked * 3),
        "{integrity}"
    );
    assert!(chat["delivery"]["count"].as_u64().unwrap_or(0) > 0);
    assert!(chat["delivery"]["p50_ms"].as_f64().unwrap_or(0.0) > 0.0);
    // the baseline ran on the same server, and the ratios come from it
    assert!(
        report["nats_core"]["deliveries_per_sec"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0
    );
    assert!(report["jetstream"]["acked_per_sec"].as_f64().unwrap_or(0.0) > 0.0);
    assert!(report["ratios"]["sends_vs_jetstream"].as_f64().is_some());
    for p in report["server"].as_array().into_iter().flatten() {
        assert!(p["rss_mib"].as_f64().unwrap_or(0.0) > 0.0, "{p}");
    }
    // what a send cost nats-server, read from its /varz: at least the
    // message itself in and its ack out, each send
    let counts = &chat["nats_counts"];
    let at_least = |k: &str| counts[k].as_u64().unwrap_or(0) >= acked / 2;
    assert!(at_least("in_msgs") && at_least("out_msgs"), "{counts}");
    let costs = &report["costs"];
    assert!(
        costs["nats_cpu_us_per_publish"].as_f64().unwrap_or(0.0) > 0.0,
        "{costs}"
    );
    assert!(
        costs["cpu_us_per_send"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    );
    // a fixed rate is not capacity: no bound from it
    assert!(
        costs["sends_vs_jetstream_bound_by_nats"].is_null(),
        "{costs}"
    );
    let md = std::fs::read_to_string(out.path().join("rooms.md"))?;
    assert!(md.contains("lost / duplicated / out of order"));
    assert!(md.contains("CPU per acked send"));
    let svg = std::fs::read_to_string(out.path().join("rooms.svg"))?;
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
    Ok(())
}
