//! The journal of a rollout: every side effect is written to the store as
//! intent before it happens and as its result after, so a kill at any point
//! leaves a record that says where it stopped. Also the stop request a
//! rollout obeys at its step boundaries.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tracing::{info, warn};

use crate::store::{JournalEntry, PhaseRecord, RolloutRecord, ScopeRecord, Store, now_ms};

/// A request to stop the agent (SIGTERM from `systemctl --user stop`): a
/// rollout acts on it at its next step boundary, where nothing is half
/// done, and parks there so the agent can record it as interrupted.
#[derive(Debug, Default)]
pub struct Stop {
    requested: AtomicBool,
    parked: tokio::sync::Notify,
}

impl Stop {
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Resolves once a rollout has parked at a step boundary.
    pub async fn parked(&self) {
        self.parked.notified().await;
    }

    /// Never returns: the agent drops the parked rollout.
    async fn park(&self) -> std::convert::Infallible {
        // A stored permit: the agent may start waiting only after this.
        self.parked.notify_one();
        std::future::pending().await
    }
}

/// Appends intent and result of side effects to the rollout record, writing
/// it to the store before and after each one.
pub struct Journal<'a> {
    store: &'a Store,
    stop: Arc<Stop>,
    pub record: RolloutRecord,
}

impl<'a> Journal<'a> {
    pub fn new(store: &'a Store, stop: Arc<Stop>, record: RolloutRecord) -> Journal<'a> {
        Journal {
            store,
            stop,
            record,
        }
    }

    /// A step boundary: when the agent is asked to stop, the rollout goes no
    /// further than here (the record stays `in-progress` until the agent
    /// closes it as interrupted).
    pub async fn boundary(&mut self) {
        if self.stop.is_requested() {
            info!(
                rollout = self.record.id,
                "stop requested: the rollout ends here"
            );
            self.save();
            match self.stop.park().await {}
        }
    }

    /// Persist the record as it is now. A failure to write history is
    /// logged; the rollout goes on so that the host is not left half-done.
    pub fn save(&self) {
        if let Err(e) = self.store.put_rollout(&self.record) {
            warn!(error = %e, rollout = self.record.id, "cannot write history");
        }
    }

    /// Record the intent `step`, run `action`, record its result.
    pub async fn step<T, E: std::fmt::Display>(
        &mut self,
        step: String,
        action: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        self.boundary().await;
        info!(rollout = self.record.id, "{step}");
        self.record.journal.push(JournalEntry {
            at: now_ms(),
            step: step.clone(),
            state: "intent".into(),
        });
        self.save();
        let result = action.await;
        let state = match &result {
            Ok(_) => "done".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        self.record.journal.push(JournalEntry {
            at: now_ms(),
            step,
            state,
        });
        self.save();
        result
    }

    /// `step` for each of `items` in order, named by `name`, stopping at
    /// the first failure.
    pub async fn each<'i, T, E, Fut>(
        &mut self,
        items: &'i [String],
        name: impl Fn(&str) -> String,
        action: impl Fn(&'i str) -> Fut,
    ) -> Result<(), E>
    where
        E: std::fmt::Display,
        Fut: Future<Output = Result<T, E>>,
    {
        for item in items {
            self.step(name(item), action(item)).await?;
        }
        Ok(())
    }

    pub fn phase(&mut self, phase: &str, started: Instant) {
        self.record.phases.push(PhaseRecord {
            phase: phase.to_string(),
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }

    pub fn scope_mut(&mut self, scope: &str) -> Option<&mut ScopeRecord> {
        self.record.scopes.iter_mut().find(|s| s.scope == scope)
    }
}
