//! What the edge counts of each slot's answers: requests, errors (5xx
//! answers and failed upstream connections), requests in flight and a
//! latency histogram. The counters only grow; the agent's canary analysis
//! takes two readings and looks at the difference (`Figures::since`), so
//! `status` can read them too without disturbing an analysis.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Latency buckets: upper bounds 50 µs × 2^(i/4), i = 0..BUCKETS-1 (up to
/// ~3.3 s), the last bucket open-ended.
pub const BUCKETS: usize = 66;

fn bucket_bound(i: usize) -> Duration {
    Duration::from_secs_f64(50e-6 * 2f64.powf(i as f64 / 4.0))
}

fn bucket_of(latency: Duration) -> usize {
    (0..BUCKETS - 1)
        .find(|i| latency <= bucket_bound(*i))
        .unwrap_or(BUCKETS - 1)
}

/// The upper bound of latency bucket `i`, in seconds (`None`: the last,
/// open-ended one).
pub fn bucket_upper_seconds(i: usize) -> Option<f64> {
    (i < BUCKETS - 1).then(|| bucket_bound(i).as_secs_f64())
}

/// The status classes answers are counted in: `1xx` … `5xx`.
pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One slot's live counters.
#[derive(Debug)]
pub struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    inflight: AtomicI64,
    buckets: [AtomicU64; BUCKETS],
    classes: [AtomicU64; 5],
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            inflight: AtomicI64::new(0),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            classes: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Counters {
    /// The slot's answer with `status` after `latency` (a slot that did not
    /// answer is the edge's 502). A 5xx is an error of the slot.
    pub fn record(&self, latency: Duration, status: u16) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.classes[class].fetch_add(1, Ordering::Relaxed);
        self.buckets[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn enter(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn leave(&self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn figures(&self) -> Figures {
        Figures {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            inflight: self.inflight.load(Ordering::Relaxed).max(0) as u64,
            buckets: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            classes: self
                .classes
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// A reading of one slot's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Figures {
    pub requests: u64,
    pub errors: u64,
    pub inflight: u64,
    /// Answers per latency bucket (see `BUCKETS`).
    pub buckets: Vec<u64>,
    /// Answers per status class (see `CLASSES`).
    #[serde(default)]
    pub classes: Vec<u64>,
}

/// What a slot did between two readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub requests: u64,
    pub errors: u64,
    /// The 95th percentile latency (a bucket's upper bound), with answers.
    pub p95_ms: Option<f64>,
}

impl Interval {
    pub fn error_rate(&self) -> f64 {
        match self.requests {
            0 => 0.0,
            n => self.errors as f64 / n as f64,
        }
    }
}

impl Figures {
    /// What happened since `earlier`, a reading of the same counters (a
    /// reading of counters that were reset counts from zero).
    pub fn since(&self, earlier: &Figures) -> Interval {
        let reset = self.requests < earlier.requests;
        let base = |now: u64, then: u64| if reset { now } else { now.saturating_sub(then) };
        let buckets: Vec<u64> = (0..self.buckets.len())
            .map(|i| {
                base(
                    self.buckets[i],
                    earlier.buckets.get(i).copied().unwrap_or(0),
                )
            })
            .collect();
        let answered: u64 = buckets.iter().sum();
        let p95_ms = (answered > 0).then(|| {
            let rank = (answered as f64 * 0.95).ceil() as u64;
            let mut seen = 0;
            let i = buckets
                .iter()
                .position(|n| {
                    seen += n;
                    seen >= rank
                })
                .unwrap_or(BUCKETS - 1);
            bucket_bound(i).as_secs_f64() * 1000.0
        });
        Interval {
            requests: base(self.requests, earlier.requests),
            errors: base(self.errors, earlier.errors),
            p95_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interval_counts_what_happened_between_two_readings() {
        let c = Counters::default();
        c.record(Duration::from_millis(1), 200);
        let before = c.figures();
        for _ in 0..94 {
            c.record(Duration::from_millis(2), 200);
        }
        for _ in 0..6 {
            c.record(Duration::from_millis(300), 503);
        }
        let i = c.figures().since(&before);
        assert_eq!((i.requests, i.errors), (100, 6));
        assert!((i.error_rate() - 0.06).abs() < 1e-9);
        // The 95th of 100 answers is one of the slow ones: 300 ms lies in
        // the bucket (289.6 ms, 344.5 ms], whose bound is reported.
        let p95 = i.p95_ms.expect("answers");
        assert!((344.0..345.0).contains(&p95), "{p95}");
        // With 96 fast answers of 100 the 95th is fast.
        let c = Counters::default();
        for n in 0..100 {
            c.record(Duration::from_millis(if n < 96 { 2 } else { 300 }), 200);
        }
        let p95 = c
            .figures()
            .since(&Figures::default())
            .p95_ms
            .expect("answers");
        // 2 ms lies in (2.0 ms, 2.26 ms].
        assert!((2.2..2.3).contains(&p95), "{p95}");
    }

    #[test]
    fn no_answers_have_no_latency_and_a_reset_counts_from_zero() {
        let c = Counters::default();
        let i = c.figures().since(&c.figures());
        assert_eq!((i.requests, i.p95_ms), (0, None));
        assert_eq!(i.error_rate(), 0.0);
        let earlier = Figures {
            requests: 50,
            errors: 5,
            inflight: 0,
            buckets: vec![50],
            classes: vec![0, 45, 0, 0, 5],
        };
        c.record(Duration::from_micros(10), 502);
        let i = c.figures().since(&earlier);
        assert_eq!((i.requests, i.errors), (1, 1));
        c.record(Duration::from_micros(10), 204);
        c.record(Duration::from_micros(10), 404);
        assert_eq!(c.figures().classes, [0, 1, 0, 1, 1]);
    }

    #[test]
    fn in_flight_requests_are_counted_up_and_down() {
        let c = Counters::default();
        c.enter();
        c.enter();
        c.leave();
        assert_eq!(c.figures().inflight, 1);
    }
}
