//! `/metrics`: the agent's figures in the Prometheus / OpenMetrics text
//! format, through `prometheus-client`. Counters of what the agent did
//! (rollouts, phases, fetches, notifications) live in `Metrics` for the
//! agent's lifetime; what runs (scopes) and the edge's counters are read at
//! each scrape from the store and the edge, so a scrape never shows a state
//! the agent no longer has.

use std::sync::atomic::AtomicU64;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::edge::control::Report;
use crate::edge::stats::{CLASSES, bucket_upper_seconds};
use crate::store::{HostState, RolloutRecord};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabels {
    scope: String,
    owner: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    scope: String,
    owner: String,
    release: String,
}

type PhaseHistograms = Family<PhaseLabels, Histogram, fn() -> Histogram>;

/// Phase durations from 50 ms to about 28 minutes.
fn phase_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

/// What the agent counted since it started.
#[derive(Debug, Clone)]
pub struct Metrics {
    rollouts: Family<OutcomeLabels, Counter>,
    phases: PhaseHistograms,
    fetches: Family<ResultLabels, Counter>,
    notifications: Family<TargetLabels, Counter>,
    notification_failures: Family<TargetLabels, Counter>,
    last_rollout: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            rollouts: Family::default(),
            phases: Family::new_with_constructor(phase_histogram),
            fetches: Family::default(),
            notifications: Family::default(),
            notification_failures: Family::default(),
            last_rollout: Gauge::default(),
        }
    }
}

impl Metrics {
    /// A rollout ended (or the newest one on record, at start-up: only its
    /// time, the counters count from the start).
    pub fn rollout_finished(&self, record: &RolloutRecord) {
        let outcome = record.outcome.as_str().to_string();
        self.rollouts
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        for phase in &record.phases {
            let labels = PhaseLabels {
                phase: phase.phase.clone(),
            };
            let seconds = phase.duration_ms as f64 / 1000.0;
            self.phases.get_or_create(&labels).observe(seconds);
        }
        self.seen_rollout(record);
    }

    /// The time of the last rollout, without counting it.
    pub fn seen_rollout(&self, record: &RolloutRecord) {
        let at = record.finished_at.unwrap_or(record.started_at);
        self.last_rollout.set(at as f64 / 1000.0);
    }

    pub fn fetched(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" }.to_string();
        self.fetches.get_or_create(&ResultLabels { result }).inc();
    }

    /// A notification to `target` (its name, never its address) was
    /// delivered, or given up on after its retries.
    pub fn notified(&self, target: &str, delivered: bool) {
        let labels = TargetLabels {
            target: target.to_string(),
        };
        let family = if delivered {
            &self.notifications
        } else {
            &self.notification_failures
        };
        family.get_or_create(&labels).inc();
    }

    /// The exposition text: the counters, the scopes as `host` records
    /// them, and the edge's figures when it answered.
    pub fn render(&self, host: &HostState, edge: Option<Report>) -> String {
        let mut registry = Registry::default();
        registry.register(
            "moorline_rollouts",
            "Rollouts that ended since the agent started, by outcome",
            self.rollouts.clone(),
        );
        registry.register(
            "moorline_rollout_phase_seconds",
            "How long each phase of a rollout took",
            self.phases.clone(),
        );
        registry.register(
            "moorline_fetches",
            "Fetches of the followed branch since the agent started, by result (ok, error)",
            self.fetches.clone(),
        );
        registry.register(
            "moorline_last_rollout_timestamp_seconds",
            "When the last rollout ended (Unix time)",
            self.last_rollout.clone(),
        );
        registry.register(
            "moorline_notifications",
            "Notifications delivered, by target",
            self.notifications.clone(),
        );
        registry.register(
            "moorline_notification_failures",
            "Notifications given up on after their retries, by target",
            self.notification_failures.clone(),
        );
        let healthy = Family::<ScopeLabels, Gauge>::default();
        let info = Family::<InfoLabels, Gauge>::default();
        for (name, state) in &host.scopes {
            let owner = state.current.owner.to_string();
            let labels = ScopeLabels {
                scope: name.clone(),
                owner: owner.clone(),
            };
            healthy
                .get_or_create(&labels)
                .set(i64::from(state.healthy && state.problem.is_none()));
            let labels = InfoLabels {
                scope: name.clone(),
                owner,
                release: state.current.release.clone(),
            };
            info.get_or_create(&labels).set(1);
        }
        registry.register(
            "moorline_scope_healthy",
            "1 when the scope passed its last verification and the audit found nothing wrong",
            healthy,
        );
        registry.register(
            "moorline_scope_info",
            "The owner and release each scope runs (always 1)",
            info,
        );
        if let Some(report) = edge {
            registry.register_collector(Box::new(EdgeFigures(report)));
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// The edge's counters as one scrape reads them: they only grow while the
/// edge runs, and start again from zero when it restarts (a counter reset).
#[derive(Debug)]
struct EdgeFigures(Report);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotCodeLabels {
    scope: String,
    slot: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    scope: String,
    slot: String,
}

impl Collector for EdgeFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut requests = encoder.encode_descriptor(
            "moorline_edge_requests",
            "Requests the edge passed to a slot, by status class of the answer (a slot that did not answer: 5xx)",
            None,
            MetricType::Counter,
        )?;
        for (scope, route) in &self.0.routes {
            for (slot, report) in route.slots.iter().enumerate() {
                for (class, count) in CLASSES.iter().zip(&report.figures.classes) {
                    let labels = SlotCodeLabels {
                        scope: scope.clone(),
                        slot: slot.to_string(),
                        code: class.to_string(),
                    };
                    ConstCounter::new(*count).encode(requests.encode_family(&labels)?)?;
                }
            }
        }
        let mut latency = encoder.encode_descriptor(
            "moorline_edge_request_seconds",
            "How long a slot took to answer through the edge",
            None,
            MetricType::Histogram,
        )?;
        for (scope, route) in &self.0.routes {
            for (slot, report) in route.slots.iter().enumerate() {
                let labels = SlotLabels {
                    scope: scope.clone(),
                    slot: slot.to_string(),
                };
                let histogram = SlotLatency::of(&report.figures.buckets);
                histogram.encode(latency.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A slot's latency buckets as a histogram: cumulative counts per upper
/// bound, and a sum estimated from the bucket bounds (the edge counts no
/// exact sum).
#[derive(Debug)]
struct SlotLatency {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl SlotLatency {
    fn of(counts: &[u64]) -> SlotLatency {
        let mut buckets = Vec::new();
        let (mut sum, mut count) = (0.0, 0);
        for (i, n) in counts.iter().enumerate() {
            count += n;
            let upper = bucket_upper_seconds(i);
            sum += *n as f64 * upper.unwrap_or_else(|| bucket_upper_seconds(i - 1).unwrap_or(0.0));
            if let Some(upper) = upper {
                buckets.push((upper, *n));
            }
        }
        // The encoder makes the counts cumulative and adds +Inf.
        let open = counts.last().copied().unwrap_or(0);
        buckets.push((f64::MAX, open));
        SlotLatency {
            sum,
            count,
            buckets,
        }
    }
}

impl EncodeMetric for SlotLatency {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}
