//! Latency histograms, per-second counters and the delivery checks (lost,
//! duplicated, out of order) shared by the chat load and the NATS baseline.

use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Microsecond latencies.
#[derive(Clone)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        // 3 significant figures from 1 µs to 1 hour
        Self(
            Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| {
                Histogram::new(3).unwrap_or_else(|e| panic!("histogram settings are constant: {e}"))
            }),
        )
    }
}

impl Latency {
    pub fn record_us(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    pub fn merge(&mut self, other: &Latency) {
        // both have the same bounds, so adding cannot fail
        let _ = self.0.add(&other.0);
    }

    pub fn summary(&self) -> Percentiles {
        let ms = |q: f64| self.0.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            count: self.0.len(),
            p50_ms: ms(0.5),
            p90_ms: ms(0.9),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: self.0.max() as f64 / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Events per second since the start of a run, one slot per second.
pub struct Timeline {
    slots: Vec<AtomicU64>,
    start: Instant,
}

impl Timeline {
    pub fn new(start: Instant, secs: usize) -> Self {
        Self {
            slots: (0..secs).map(|_| AtomicU64::new(0)).collect(),
            start,
        }
    }

    pub fn add(&self, n: u64) {
        let i = self.start.elapsed().as_secs() as usize;
        if let Some(s) = self.slots.get(i) {
            s.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn per_second(&self) -> Vec<u64> {
        self.slots
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect()
    }
}

/// What one receiver saw of one sequence (a group's `seq`, or a baseline
/// subject's counter): the next expected number, the holes it has seen and
/// the repeats.
#[derive(Debug, Default, Clone)]
pub struct Order {
    /// Highest number received.
    pub last: u64,
    /// Numbers below `last` not (yet) received.
    missing: BTreeSet<u64>,
    pub duplicated: u64,
    /// Received after a higher number.
    pub out_of_order: u64,
}

/// More holes than this in one sequence means the run is broken anyway;
/// the rest are only counted.
const MAX_TRACKED_HOLES: usize = 100_000;

impl Order {
    /// Records `seq`; true if it is new.
    pub fn see(&mut self, seq: u64) -> bool {
        if seq == self.last + 1 {
            self.last = seq;
            true
        } else if seq > self.last {
            for s in self.last + 1..seq {
                if self.missing.len() >= MAX_TRACKED_HOLES {
                    break;
                }
                self.missing.insert(s);
            }
            self.last = seq;
            true
        } else if self.missing.remove(&seq) {
            self.out_of_order += 1;
            true
        } else {
            self.duplicated += 1;
            false
        }
    }

    /// Every number up to this one has been received.
    pub fn contiguous(&self) -> u64 {
        self.missing
            .iter()
            .next()
            .map_or(self.last, |first| first - 1)
    }

    /// Numbers up to `last_sent` never received.
    pub fn lost(&self, last_sent: u64) -> u64 {
        last_sent.saturating_sub(self.last) + self.missing.len() as u64
    }
}

/// The delivery checks summed over receivers.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Integrity {
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
}

impl Integrity {
    pub fn add(&mut self, order: &Order, last_sent: u64) {
        self.expected += last_sent;
        self.received += last_sent.saturating_sub(order.lost(last_sent));
        self.lost += order.lost(last_sent);
        self.duplicated += order.duplicated;
        self.out_of_order += order.out_of_order;
    }

    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0
    }
}

/// Microseconds since `epoch`; what messages carry as their send time.
pub fn micros_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_counts_holes_repeats_and_late_arrivals() {
        let mut o = Order::default();
        for s in [1, 2, 4, 3, 3, 6] {
            o.see(s);
        }
        assert_eq!(o.duplicated, 1);
        assert_eq!(o.out_of_order, 1);
        // 5 never came, 7 and 8 were sent but not received
        assert_eq!(o.lost(8), 3);
        // everything up to 4 came; 5 is the first hole
        assert_eq!(o.contiguous(), 4);
        o.see(5);
        assert_eq!(o.contiguous(), 6);
        o.see(4);
        let mut i = Integrity::default();
        i.add(&o, 8);
        assert_eq!((i.expected, i.received, i.lost), (8, 6, 2));
        assert!(!i.clean());
    }

    #[test]
    fn percentiles_come_from_recorded_values() {
        let mut l = Latency::default();
        for us in 1..=1000 {
            l.record_us(us * 1000);
        }
        let p = l.summary();
        assert_eq!(p.count, 1000);
        assert!((p.p50_ms - 500.0).abs() < 1.0, "{p:?}");
        assert!((p.p99_ms - 990.0).abs() < 1.0, "{p:?}");
        assert!((p.max_ms - 1000.0).abs() < 1.0, "{p:?}");
    }
}
