//! The edge's socket-write budget: how long a busy connection gathers
//! frames before it writes them.
//!
//! A busy connection gathers for `--ws-write-coalesce-ms` after each
//! write. That window alone cannot help once the edge is short of CPU:
//! at 100 group frames a second per connection, a 10 ms window holds one
//! frame, so each frame costs a socket write (and the client's read it
//! carries), the writes take the CPU the frames need, and the edge stays
//! at that rate (fan-out, one group of 1,000, on a slower day: 92,000
//! deliveries a second at one frame per write, where a 50 ms window
//! carried 294,000). So the writers count the live group frames they write
//! and the connections that wrote them; each period (`PERIOD`, or the
//! window if that is longer, so that every busy connection writes in it),
//! if the frames came faster than `--ws-write-budget` a second, the window
//! becomes what keeps those connections' writes near the budget
//! (connections ÷ budget), at least the configured window and at most
//! `MAX_STRETCH` times it; it goes back only once the frames are below
//! `RELEASE` of the budget, so a rate near the budget does not flip it
//! every period. Below the budget nothing changes: a lightly loaded edge
//! writes as before. The budget is a rate, not a reading of the CPU: an
//! edge with CPU to spare pays the stretched window's latency too, and its
//! operator raises the budget (or sets 0).
//!
//! The counters are read and reset while writers add to them: a writer
//! that adds across a tick is counted in one period or the next, a few
//! out of thousands, which moves the window by as little.

use std::{
    sync::{
        Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// How often the window is decided again.
pub(crate) const PERIOD: Duration = Duration::from_millis(100);
/// The longest window, in configured windows.
pub(crate) const MAX_STRETCH: u32 = 5;
/// A stretched window goes back once frames come slower than this share
/// of the budget.
const RELEASE: f64 = 0.8;

/// Shared by the edge's writers; see the module's comment.
#[derive(Debug)]
pub(crate) struct WriteLoad {
    base: Duration,
    /// Socket writes per second the edge aims to stay near (0: the window
    /// never stretches).
    budget: u64,
    /// Counts the periods, so that a writer counts itself once in each.
    period: AtomicU64,
    frames: AtomicU64,
    writers: AtomicU64,
    window_ns: AtomicU64,
}

impl WriteLoad {
    pub(crate) fn new(base: Duration, budget: u64) -> Self {
        Self {
            base,
            budget,
            period: AtomicU64::new(1),
            frames: AtomicU64::new(0),
            writers: AtomicU64::new(0),
            window_ns: AtomicU64::new(nanos(base)),
        }
    }

    /// The window a busy connection gathers for now.
    pub(crate) fn window(&self) -> Duration {
        Duration::from_nanos(self.window_ns.load(Ordering::Relaxed))
    }

    /// A writer wrote `frames` group frames; `seen` is the period it last
    /// counted itself in (0 at first).
    pub(crate) fn wrote(&self, frames: u64, seen: &mut u64) {
        if frames == 0 || self.budget == 0 {
            return;
        }
        self.frames.fetch_add(frames, Ordering::Relaxed);
        let now = self.period.load(Ordering::Relaxed);
        if *seen != now {
            *seen = now;
            self.writers.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends a period that lasted `elapsed`: the window for the next one.
    pub(crate) fn tick(&self, elapsed: Duration) -> Duration {
        self.period.fetch_add(1, Ordering::Relaxed);
        let frames = self.frames.swap(0, Ordering::Relaxed);
        let writers = self.writers.swap(0, Ordering::Relaxed);
        let stretched = self.window() > self.base;
        let window = window_for(self.base, self.budget, frames, writers, elapsed, stretched);
        self.window_ns.store(nanos(window), Ordering::Relaxed);
        window
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The window after a period of `elapsed` in which `writers` connections
/// wrote `frames` group frames (`stretched`: the window was above `base`).
fn window_for(
    base: Duration,
    budget: u64,
    frames: u64,
    writers: u64,
    elapsed: Duration,
    stretched: bool,
) -> Duration {
    if budget == 0 || base.is_zero() || elapsed.is_zero() {
        return base;
    }
    let rate = frames as f64 / elapsed.as_secs_f64();
    let over = if stretched {
        rate > budget as f64 * RELEASE
    } else {
        rate > budget as f64
    };
    if !over {
        return base;
    }
    // each connection writing once per window: writers ÷ window writes a second
    let wanted = Duration::from_nanos(writers.saturating_mul(1_000_000_000) / budget);
    wanted.clamp(base, base.saturating_mul(MAX_STRETCH))
}

/// Decides the window every period while the edge runs (`PERIOD`, or the
/// window if longer: a busy connection then writes in every period, so
/// each is counted); nothing to decide without a budget or a window.
pub(crate) async fn pace(inner: Weak<crate::Inner>) {
    let gauge = metrics::gauge!("chat_ws_write_window_seconds");
    let Some(load) = inner.upgrade().map(|app| app.write_load.clone()) else {
        return;
    };
    gauge.set(load.window().as_secs_f64());
    if load.budget == 0 || load.base.is_zero() {
        return;
    }
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(PERIOD.max(load.window())).await;
        if inner.strong_count() == 0 {
            return;
        }
        let now = tokio::time::Instant::now();
        let window = load.tick(now.saturating_duration_since(last));
        gauge.set(window.as_secs_f64());
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn the_window_for_each_load() {
        // (window, budget, frames, writers, elapsed, stretched before) -> window
        let cases = [
            // below the budget: the configured window
            ((10 * MS, 20_000, 19_000, 1_000, SEC, false), 10 * MS),
            ((10 * MS, 20_000, 20_000, 1_000, SEC, false), 10 * MS),
            // the same frames in a tenth of the time are over it
            ((10 * MS, 20_000, 19_000, 1_000, SEC / 10, false), 50 * MS),
            // over it, the writers share it: 1,000 connections at 20,000
            // writes a second write once per 50 ms each
            ((10 * MS, 20_000, 100_000, 1_000, SEC, false), 50 * MS),
            ((10 * MS, 40_000, 100_000, 1_000, SEC, false), 25 * MS),
            // few connections: what they write is not the edge's load
            ((10 * MS, 20_000, 60_000, 100, SEC, false), 10 * MS),
            // many: no more than five windows
            ((10 * MS, 20_000, 900_000, 10_000, SEC, false), 50 * MS),
            // 18,000 a second: not enough to stretch, enough to stay
            ((10 * MS, 20_000, 18_000, 1_000, SEC, false), 10 * MS),
            ((10 * MS, 20_000, 18_000, 1_000, SEC, true), 50 * MS),
            ((10 * MS, 20_000, 16_000, 1_000, SEC, true), 10 * MS),
            // no budget, no window, or no time: never stretched
            ((10 * MS, 0, 1_000_000, 1_000, SEC, true), 10 * MS),
            (
                (Duration::ZERO, 20_000, 1_000_000, 1_000, SEC, true),
                Duration::ZERO,
            ),
            (
                (10 * MS, 20_000, 1_000_000, 1_000, Duration::ZERO, true),
                10 * MS,
            ),
            // the longest window saturates rather than overflows
            (
                (Duration::MAX / 2, 1, u64::MAX, u64::MAX, SEC, false),
                Duration::MAX / 2,
            ),
        ];
        for ((base, budget, frames, writers, elapsed, stretched), want) in cases {
            assert_eq!(
                window_for(base, budget, frames, writers, elapsed, stretched),
                want,
                "{base:?} {budget} {frames} {writers} {elapsed:?} {stretched}"
            );
        }
    }

    #[test]
    fn writers_count_once_per_period_and_the_window_follows_the_load() {
        let load = WriteLoad::new(10 * MS, 20_000);
        let mut seen = vec![0u64; 1_000];
        for _ in 0..10 {
            for s in &mut seen {
                load.wrote(10, s);
            }
        }
        // 100,000 frames from 1,000 writers in a second
        assert_eq!(load.tick(SEC), 50 * MS);
        assert_eq!(load.window(), 50 * MS);
        // 18,000 a second holds it (a rate near the budget does not flip it)
        for s in &mut seen {
            load.wrote(18, s);
        }
        assert_eq!(load.tick(SEC), 50 * MS);
        // the next period is quiet: back to the configured window
        for s in &mut seen[..10] {
            load.wrote(1, s);
        }
        assert_eq!(load.tick(SEC), 10 * MS);
        assert_eq!(load.window(), 10 * MS);
    }

    #[test]
    fn without_a_budget_nothing_is_counted() {
        let load = WriteLoad::new(10 * MS, 0);
        let mut seen = 0;
        load.wrote(1_000_000, &mut seen);
        assert_eq!(seen, 0);
        assert_eq!(load.tick(MS), 10 * MS);
    }
}
