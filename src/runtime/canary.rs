//! A canary's analysis: the new slot takes each step's weight of new
//! requests, and every `interval` the edge's figures of that slot since the
//! interval before are judged (`verdict`, pure). A step passes once it has
//! as many passing intervals as fit in its soak; `failure_limit` failed
//! intervals in a row roll back, and so does a step still without enough
//! passes after three times its soak (`inconclusive`). Every interval is
//! recorded in the rollout.

use std::time::Duration;

use tokio::time::Instant;

use super::RuntimeError;
use super::slots::EdgeHandle;
use crate::edge::stats::{Figures, Interval};
use crate::edge::table::{Backend, Route};
use crate::journal::Journal;
use crate::manifest::{CanarySpec, EdgeSpec, Scope};
use crate::store::{IntervalRecord, now_ms};

/// What one interval's figures mean.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    /// Too few requests to tell: never a pass, never a failure.
    Inconclusive(String),
    Fail(String),
}

impl Verdict {
    pub fn text(&self) -> String {
        match self {
            Verdict::Pass => "pass".to_string(),
            Verdict::Inconclusive(why) => format!("inconclusive ({why})"),
            Verdict::Fail(why) => format!("fail: {why}"),
        }
    }
}

/// Judge one interval of the new slot against the canary's limits.
pub fn verdict(interval: &Interval, canary: &CanarySpec) -> Verdict {
    if interval.requests < canary.min_requests {
        return Verdict::Inconclusive(format!(
            "{} requests, fewer than {}",
            interval.requests, canary.min_requests
        ));
    }
    let rate = interval.error_rate();
    if rate > canary.max_error_rate {
        return Verdict::Fail(format!(
            "error rate {rate:.3} ({} of {}) above {}",
            interval.errors, interval.requests, canary.max_error_rate
        ));
    }
    if let (Some(limit), Some(p95)) = (canary.max_p95, interval.p95_ms)
        && p95 > limit.as_secs_f64() * 1000.0
    {
        return Verdict::Fail(format!(
            "p95 {p95:.1}ms above {}",
            humantime::format_duration(limit)
        ));
    }
    Verdict::Pass
}

/// How many passing intervals a step of `soak` needs.
pub fn passes_needed(soak: Duration, interval: Duration) -> u32 {
    let n = soak.as_secs_f64() / interval.as_secs_f64();
    (n.ceil() as u32).max(1)
}

/// The route with `weight` percent of new requests to `slot`.
pub fn split(spec: &EdgeSpec, slot: u8, weight: u32) -> Route {
    Route {
        listen: spec.listen,
        slots: spec
            .slots
            .iter()
            .enumerate()
            .map(|(i, addr)| Backend {
                addr: *addr,
                weight: if i == usize::from(slot) {
                    weight
                } else {
                    100 - weight
                },
            })
            .collect(),
    }
}

/// Move the scope's traffic to `slot` step by step, analysing each step.
/// `Err` names the step and why; the caller routes everything back.
pub async fn promote(
    edge: &EdgeHandle,
    scope: &Scope,
    canary: &CanarySpec,
    slot: u8,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let spec = scope
        .edge
        .as_ref()
        .expect("the manifest gives every canary scope an edge");
    for (i, step) in canary.steps.iter().enumerate() {
        let number = i + 1;
        journal
            .step(
                format!(
                    "route {}% of {} to slot {slot} (step {number})",
                    step.weight, spec.listen
                ),
                edge.client.set(&scope.name, split(spec, slot, step.weight)),
            )
            .await?;
        let started = Instant::now();
        let needed = passes_needed(step.soak, canary.interval);
        let (mut passes, mut failures) = (0, 0);
        let mut before = figures(edge, &scope.name, slot).await?;
        loop {
            // The analysis's own pace: one interval of traffic.
            tokio::time::sleep(canary.interval).await;
            crate::fault::point("during-canary");
            let now = figures(edge, &scope.name, slot).await?;
            let interval = now.since(&before);
            before = now;
            let judged = verdict(&interval, canary);
            journal.record.analysis.push(IntervalRecord {
                scope: scope.name.clone(),
                step: number,
                weight: step.weight,
                at: now_ms(),
                requests: interval.requests,
                errors: interval.errors,
                p95_ms: interval.p95_ms,
                verdict: judged.text(),
            });
            journal.save();
            let failed = |reason: String| RuntimeError::Canary {
                scope: scope.name.clone(),
                step: number,
                weight: step.weight,
                reason,
            };
            match judged {
                Verdict::Pass => {
                    passes += 1;
                    failures = 0;
                }
                Verdict::Fail(why) => {
                    failures += 1;
                    if failures >= canary.failure_limit {
                        return Err(failed(why));
                    }
                }
                Verdict::Inconclusive(_) => {}
            }
            if passes >= needed {
                break;
            }
            if started.elapsed() >= step.soak * 3 {
                return Err(failed("inconclusive".to_string()));
            }
        }
    }
    Ok(())
}

/// The edge's figures of the scope's `slot`.
async fn figures(edge: &EdgeHandle, scope: &str, slot: u8) -> Result<Figures, RuntimeError> {
    let report = edge.client.report().await?;
    Ok(report
        .routes
        .get(scope)
        .and_then(|r| r.slots.get(usize::from(slot)))
        .map(|s| s.figures.clone())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canary() -> CanarySpec {
        CanarySpec {
            steps: vec![],
            interval: Duration::from_secs(10),
            max_error_rate: 0.01,
            max_p95: Some(Duration::from_millis(800)),
            min_requests: 20,
            failure_limit: 2,
        }
    }

    fn interval(requests: u64, errors: u64, p95_ms: Option<f64>) -> Interval {
        Interval {
            requests,
            errors,
            p95_ms,
        }
    }

    #[test]
    fn an_interval_passes_fails_or_is_inconclusive() {
        let c = canary();
        let cases = [
            (
                "enough requests, no errors, fast",
                interval(100, 0, Some(12.0)),
                "pass",
            ),
            (
                "1 error in 100 is the limit",
                interval(100, 1, Some(12.0)),
                "pass",
            ),
            (
                "too few requests",
                interval(19, 19, Some(12.0)),
                "inconclusive (19 requests, fewer than 20)",
            ),
            (
                "a third answered 500",
                interval(60, 20, Some(12.0)),
                "fail: error rate 0.333 (20 of 60) above 0.01",
            ),
            (
                "slow",
                interval(100, 0, Some(900.0)),
                "fail: p95 900.0ms above 800ms",
            ),
        ];
        for (situation, figures, want) in cases {
            assert_eq!(verdict(&figures, &c).text(), want, "{situation}");
        }
        let unbounded = CanarySpec {
            max_p95: None,
            ..canary()
        };
        assert_eq!(
            verdict(&interval(100, 0, Some(5000.0)), &unbounded),
            Verdict::Pass
        );
    }

    #[test]
    fn a_step_needs_as_many_passes_as_fit_in_its_soak() {
        let s = Duration::from_secs;
        assert_eq!(passes_needed(s(120), s(10)), 12);
        assert_eq!(passes_needed(s(25), s(10)), 3);
        assert_eq!(passes_needed(s(1), s(10)), 1);
    }

    #[test]
    fn a_split_sends_the_weight_to_the_new_slot_and_the_rest_to_the_old() {
        let spec = EdgeSpec {
            listen: "127.0.0.1:3000".parse().expect("address"),
            slots: vec![
                "127.0.0.1:3101".parse().expect("address"),
                "127.0.0.1:3102".parse().expect("address"),
            ],
            drain: Duration::from_secs(30),
            hold: Duration::from_secs(10),
        };
        let weights: Vec<u32> = split(&spec, 1, 10).slots.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [90, 10]);
        let weights: Vec<u32> = split(&spec, 0, 50).slots.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [50, 50]);
    }
}
