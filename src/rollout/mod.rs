//! The rollout engine: bring the host to one commit — fetch, plan, prepare
//! (checkout and build), switch, verify — and roll back what it switched when
//! verification fails. Every side effect is journaled in the store before it
//! happens, and the rollout record is complete whatever the outcome.

/// Build commands: output tail, timeout.
pub mod build;
/// The `native` runtime: unit files, drop-ins, restarts.
pub mod native;
/// Release directories: checkout, registry, pruning.
pub mod releases;
/// Start-up recovery: half-written releases, units that disagree with the store.
pub mod recover;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tracing::{info, warn};

use crate::config::Config;
use crate::manifest::{self, Manifest, Runtime, Scope};
use crate::plan::{self, Action, Plan, ScopeInputs, ScopePlan};
use crate::runtime::systemd::Systemd;
use crate::source::git::Source;
use crate::store::{
    DeployedScope, HostState, JournalEntry, Outcome, PhaseRecord, RolloutRecord, SCHEMA_VERSION, ScopeRecord,
    ScopeState, Store, now_ms,
};

/// Appends intent and result of side effects to the rollout record, writing
/// it to the store before and after each one.
pub struct Journal<'a> {
    store: &'a Store,
    pub record: RolloutRecord,
}

impl<'a> Journal<'a> {
    pub fn new(store: &'a Store, record: RolloutRecord) -> Journal<'a> {
        Journal { store, record }
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

    fn phase(&mut self, phase: &str, started: Instant) {
        self.record.phases.push(PhaseRecord {
            phase: phase.to_string(),
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }

    fn scope_mut(&mut self, scope: &str) -> Option<&mut ScopeRecord> {
        self.record.scopes.iter_mut().find(|s| s.scope == scope)
    }
}

/// What the engine needs from its surroundings.
pub struct Engine {
    pub config: Config,
    pub store: Store,
    pub source: Source,
    pub http: reqwest::Client,
    systemd: Option<Systemd>,
}

/// Why no rollout ran for a fetched commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idle {
    /// The host already runs the branch's commit.
    UpToDate,
    /// The branch's commit failed before and is not retried until it moves.
    FailedBefore,
}

#[derive(Debug)]
pub enum Converged {
    Idle { head: String, why: Idle },
    Rolled { head: String, record: Box<RolloutRecord> },
}

impl Engine {
    pub fn new(config: Config, store: Store) -> Engine {
        let source = Source::new(&config.source, &config.state.dir);
        Engine {
            config,
            store,
            source,
            http: crate::health::client(),
            systemd: None,
        }
    }

    pub fn releases_dir(&self) -> PathBuf {
        self.config.state.dir.join("releases")
    }

    async fn systemd(&mut self) -> Result<Systemd, String> {
        if let Some(sd) = &self.systemd {
            return Ok(sd.clone());
        }
        let sd = Systemd::connect().await.map_err(|e| e.to_string())?;
        self.systemd = Some(sd.clone());
        Ok(sd)
    }

    /// Fetch the branch. `Err` is a fetch failure (not a rollout).
    pub async fn fetch(&self) -> Result<String, String> {
        let source = self.source.clone();
        tokio::task::spawn_blocking(move || source.fetch())
            .await
            .map_err(|e| format!("fetch task failed: {e}"))?
            .map_err(|e| e.to_string())
    }

    /// Bring the host to `head` if it is not there yet and did not fail before.
    pub async fn converge(&mut self, head: String, trigger: &str, fetch_ms: u64) -> Result<Converged, String> {
        let host = self.store.host().map_err(|e| e.to_string())?;
        // A scope found unhealthy (by the start-up audit, or a failed
        // rollback) is redeployed even when the branch did not move.
        if host.deployed_commit.as_deref() == Some(head.as_str()) && host.scopes.values().all(|s| s.healthy) {
            return Ok(Converged::Idle {
                head,
                why: Idle::UpToDate,
            });
        }
        if host.failed_commit.as_deref() == Some(head.as_str()) {
            return Ok(Converged::Idle {
                head,
                why: Idle::FailedBefore,
            });
        }
        let record = self.rollout(&head, trigger, fetch_ms, host).await?;
        Ok(Converged::Rolled {
            head,
            record: Box::new(record),
        })
    }

    /// Read and validate the manifest at `commit`.
    pub fn manifest_at(&self, commit: &str) -> Result<Manifest, String> {
        let path = &self.config.source.manifest;
        let bytes = self
            .source
            .read_file(commit, path)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("manifest \"{path}\" not found in commit {}", native::short(commit)))?;
        manifest::parse(path, &bytes).map_err(|d| d.to_string())
    }

    /// The plan for `commit` against the recorded host state.
    pub fn plan_for(&self, commit: &str) -> Result<(Manifest, Plan), String> {
        let manifest = self.manifest_at(commit)?;
        let host = self.store.host().map_err(|e| e.to_string())?;
        let releases = self.store.releases().map_err(|e| e.to_string())?;
        let mut inputs = BTreeMap::new();
        for (name, scope) in &manifest.scopes {
            let path_ids = self.source.path_ids(commit, &scope.paths).map_err(|e| e.to_string())?;
            inputs.insert(
                name.clone(),
                ScopeInputs {
                    section_text: scope.section_text.clone(),
                    path_ids,
                },
            );
        }
        let plan = plan::plan(commit, &manifest, &inputs, &host, &releases);
        Ok((manifest, plan))
    }

    async fn rollout(&mut self, head: &str, trigger: &str, fetch_ms: u64, host: HostState) -> Result<RolloutRecord, String> {
        let id = self.store.next_rollout_id().map_err(|e| e.to_string())?;
        let record = RolloutRecord {
            schema: SCHEMA_VERSION,
            id,
            commit: head.to_string(),
            previous_commit: host.deployed_commit.clone(),
            trigger: trigger.to_string(),
            started_at: now_ms(),
            finished_at: None,
            outcome: Outcome::InProgress,
            scopes: vec![],
            phases: vec![PhaseRecord {
                phase: "fetch".into(),
                duration_ms: fetch_ms,
            }],
            error: None,
            build_tail: vec![],
            journal: vec![],
        };
        let store = self.store.clone();
        let mut journal = Journal::new(&store, record);
        journal.save();
        crate::fault::point("after-fetch");
        info!(rollout = id, commit = %native::short(head), trigger, "rollout started");
        let (outcome, error) = match self.run(&mut journal, head, host).await {
            Ok(outcome) => (outcome, None),
            Err((outcome, error)) => (outcome, Some(error)),
        };
        let mut host = self.store.host().map_err(|e| e.to_string())?;
        match outcome {
            Outcome::Succeeded => {
                host.deployed_commit = Some(head.to_string());
                host.failed_commit = None;
            }
            _ => host.failed_commit = Some(head.to_string()),
        }
        self.store.put_host(&host).map_err(|e| e.to_string())?;
        crate::fault::point("while-recording");
        journal.record.outcome = outcome;
        journal.record.error = error;
        journal.record.finished_at = Some(now_ms());
        journal.save();
        match &journal.record.error {
            None => info!(rollout = id, outcome = outcome.as_str(), "rollout finished"),
            Some(e) => warn!(rollout = id, outcome = outcome.as_str(), error = %e, "rollout finished"),
        }
        if outcome == Outcome::Succeeded
            && let Err(e) = releases::prune(&self.store, &self.releases_dir(), &host, journal_keep(&self.manifest_at(head)))
        {
            warn!(error = %e, "cannot prune releases");
        }
        Ok(journal.record)
    }

    /// The rollout proper. `Err` carries the outcome to record and why.
    async fn run(&mut self, journal: &mut Journal<'_>, head: &str, mut host: HostState) -> Result<Outcome, (Outcome, String)> {
        let failed = |e: String| (Outcome::Failed, e);
        if let Some(deployed) = host.deployed_commit.clone()
            && !self.config.source.allow_force_push
        {
            let source = self.source.clone();
            let (d, h) = (deployed.clone(), head.to_string());
            let descends = tokio::task::spawn_blocking(move || source.is_ancestor(&d, &h))
                .await
                .map_err(|e| failed(e.to_string()))?
                .map_err(|e| failed(e.to_string()))?;
            if !descends {
                return Err(failed(format!(
                    "branch \"{}\" was rewritten: {} does not descend from the deployed commit {}; set allow_force_push = true in \"{}\" to deploy it",
                    self.config.source.branch,
                    native::short(head),
                    native::short(&deployed),
                    self.config.path.display()
                )));
            }
        }

        let started = Instant::now();
        let (manifest, plan) = self.plan_for(head).map_err(failed)?;
        journal.record.scopes = plan
            .scopes
            .iter()
            .map(|s| ScopeRecord {
                scope: s.scope.clone(),
                owner: plan::runtime_name(s.owner).to_string(),
                action: s.action.as_str().to_string(),
                reason: s.reason.clone(),
                release: Some(s.release.clone()),
                built: false,
                members: members(manifest.scopes.get(&s.scope)),
                result: None,
            })
            .collect();
        journal.phase("plan", started);
        journal.save();
        if !plan.changes_anything() {
            return Ok(Outcome::Succeeded);
        }

        let started = Instant::now();
        let prepared = self.prepare(journal, &manifest, &plan).await;
        journal.phase("prepare", started);
        prepared.map_err(failed)?;

        let sd = self.systemd().await.map_err(failed)?;
        let mut switched: Vec<(ScopePlan, Option<ScopeState>)> = Vec::new();
        let mut failure = None;
        let mut switch_ms = 0;
        let mut verify_ms = 0;
        for step in plan.scopes.iter().filter(|s| s.action != Action::Unchanged) {
            let previous = host.scopes.get(&step.scope).cloned();
            let release_dir = self.releases_dir().join(&step.release);
            if step.action == Action::Remove {
                let units = previous.as_ref().map(|p| p.current.members.clone()).unwrap_or_default();
                let started = Instant::now();
                let result = native::stop(&sd, &units, journal).await;
                switch_ms += started.elapsed().as_millis() as u64;
                if let Err(e) = result {
                    failure = Some(e);
                    break;
                }
                host.scopes.remove(&step.scope);
                self.set_result(journal, &step.scope, "stopped");
                continue;
            }
            let Some(scope) = manifest.scopes.get(&step.scope) else {
                continue;
            };
            if scope.owner == Runtime::Docker {
                failure = Some(format!(
                    "scope \"{}\" is owned by \"docker\", which this build of moorline cannot run yet",
                    scope.name
                ));
                break;
            }
            switched.push((step.clone(), previous.clone()));
            let started = Instant::now();
            let result = native::switch(&sd, scope, &release_dir, &step.release, journal).await;
            switch_ms += started.elapsed().as_millis() as u64;
            if let Err(e) = result {
                failure = Some(format!("switching scope \"{}\" failed: {e}", scope.name));
                break;
            }
            self.set_result(journal, &step.scope, "switched");
            let started = Instant::now();
            crate::fault::point("during-verify");
            let verified = native::verify(&sd, scope, &release_dir, &self.http).await;
            verify_ms += started.elapsed().as_millis() as u64;
            if let Err(e) = verified {
                failure = Some(format!("scope \"{}\" failed verification: {e}", scope.name));
                break;
            }
            self.set_result(journal, &step.scope, "healthy");
            let current = DeployedScope {
                owner: plan::runtime_name(scope.owner).to_string(),
                release: step.release.clone(),
                commit: head.to_string(),
                fingerprint: step.fingerprint.clone(),
                section_text: step.section_text.clone(),
                path_ids: step.path_ids.clone(),
                members: members(Some(scope)),
                rollout: journal.record.id,
                at: now_ms(),
            };
            host.scopes.insert(
                step.scope.clone(),
                ScopeState {
                    current: current.clone(),
                    healthy: true,
                    last_healthy: Some(current),
                },
            );
        }
        journal.record.phases.push(PhaseRecord {
            phase: "switch".into(),
            duration_ms: switch_ms,
        });
        journal.record.phases.push(PhaseRecord {
            phase: "verify".into(),
            duration_ms: verify_ms,
        });
        let Some(reason) = failure else {
            self.store.put_host(&host).map_err(|e| failed(e.to_string()))?;
            return Ok(Outcome::Succeeded);
        };

        let started = Instant::now();
        let restored = self.roll_back(journal, &sd, switched).await;
        journal.phase("rollback", started);
        match restored {
            Ok(()) => Err((Outcome::RolledBack, reason)),
            Err(e) => Err((Outcome::Failed, format!("{reason}; {e}"))),
        }
    }

    fn set_result(&self, journal: &mut Journal<'_>, scope: &str, result: &str) {
        if let Some(s) = journal.scope_mut(scope) {
            s.result = Some(result.to_string());
        }
        journal.save();
    }

    /// Check out the release if a scope needs it and run the builds.
    async fn prepare(&self, journal: &mut Journal<'_>, manifest: &Manifest, plan: &Plan) -> Result<(), String> {
        let dir = self.releases_dir().join(&plan.commit);
        let fresh = plan.needs_checkout() && !dir.exists();
        if fresh {
            let source = self.source.clone();
            let (commit, dest) = (plan.commit.clone(), dir.clone());
            journal
                .step(
                    format!("check out release {}", native::short(&plan.commit)),
                    async move {
                        tokio::task::spawn_blocking(move || source.checkout(&commit, &dest))
                            .await
                            .map_err(|e| e.to_string())?
                            .map_err(|e| e.to_string())
                    },
                )
                .await?;
        }
        let mut tail = build::Tail::default();
        let mut built = BTreeMap::new();
        for step in plan.scopes.iter().filter(|s| s.build) {
            let Some(scope) = manifest.scopes.get(&step.scope) else {
                continue;
            };
            let result = if scope.build.is_empty() {
                Ok(())
            } else {
                journal
                    .step(
                        format!("build scope {}", scope.name),
                        build::run(&scope.name, &scope.build, &dir, &plan.commit, scope.build_timeout, &mut tail),
                    )
                    .await
            };
            journal.record.build_tail = tail.lines();
            if let Some(s) = journal.scope_mut(&step.scope) {
                s.built = !scope.build.is_empty();
            }
            if let Err(e) = result {
                journal.save();
                if fresh {
                    releases::discard(&dir);
                }
                return Err(e);
            }
            built.insert(step.scope.clone(), step.fingerprint.clone());
        }
        if plan.needs_checkout() {
            releases::register(&self.store, &plan.commit, built).map_err(|e| e.to_string())?;
        }
        journal.save();
        Ok(())
    }

    /// Return every switched scope, newest first, to its last healthy
    /// release; scopes that had none are stopped.
    async fn roll_back(
        &mut self,
        journal: &mut Journal<'_>,
        sd: &Systemd,
        switched: Vec<(ScopePlan, Option<ScopeState>)>,
    ) -> Result<(), String> {
        let mut host = self.store.host().map_err(|e| e.to_string())?;
        let mut problems = Vec::new();
        for (step, previous) in switched.into_iter().rev() {
            let target = previous.as_ref().and_then(|p| p.last_healthy.clone());
            let Some(target) = target else {
                let units = members(self.manifest_at(&journal.record.commit).ok().as_ref().and_then(|m| m.scopes.get(&step.scope)));
                let stopped = native::stop(sd, &units, journal).await;
                self.set_result(journal, &step.scope, "failed: stopped, no earlier healthy release");
                host.scopes.remove(&step.scope);
                problems.push(format!("scope \"{}\" has no earlier healthy release and was stopped", step.scope));
                if let Err(e) = stopped {
                    problems.push(e);
                }
                continue;
            };
            let release_dir = self.releases_dir().join(&target.release);
            let restored = match self.scope_from_release(&target.release, &step.scope) {
                Ok(scope) => {
                    let switched = native::switch(sd, &scope, &release_dir, &target.release, journal).await;
                    crate::fault::point("during-rollback");
                    match switched {
                        Ok(()) => native::verify(sd, &scope, &release_dir, &self.http).await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            let healthy = restored.is_ok();
            match restored {
                Ok(()) => self.set_result(journal, &step.scope, "rolled-back"),
                Err(e) => {
                    self.set_result(journal, &step.scope, &format!("failed: rollback unhealthy: {e}"));
                    problems.push(format!("rolling back scope \"{}\" failed: {e}", step.scope));
                }
            }
            host.scopes.insert(
                step.scope.clone(),
                ScopeState {
                    current: target.clone(),
                    healthy,
                    last_healthy: Some(target),
                },
            );
        }
        self.store.put_host(&host).map_err(|e| e.to_string())?;
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }

    /// The scope as the manifest inside release `commit` describes it.
    fn scope_from_release(&self, commit: &str, name: &str) -> Result<Scope, String> {
        let path = self.releases_dir().join(commit).join(&self.config.source.manifest);
        let bytes = std::fs::read(&path).map_err(|e| format!("cannot read \"{}\": {e}", path.display()))?;
        let manifest = manifest::parse(&path.display().to_string(), &bytes).map_err(|d| d.to_string())?;
        manifest
            .scopes
            .get(name)
            .cloned()
            .ok_or_else(|| format!("release {} has no scope \"{name}\"", native::short(commit)))
    }

    /// Close rollouts a previous agent left in progress.
    pub fn close_interrupted(&self) -> Result<Vec<u64>, String> {
        let mut closed = Vec::new();
        for mut record in self.store.unfinished_rollouts().map_err(|e| e.to_string())? {
            record.outcome = Outcome::Interrupted;
            record.finished_at = Some(now_ms());
            record.error = Some(recover::interrupted_error(&record.journal));
            self.store.put_rollout(&record).map_err(|e| e.to_string())?;
            closed.push(record.id);
        }
        Ok(closed)
    }
}

fn journal_keep(manifest: &Result<Manifest, String>) -> usize {
    manifest.as_ref().map(|m| m.defaults.keep_releases).unwrap_or(5)
}

/// The unit or container names of a scope's owning runtime.
pub fn members(scope: Option<&Scope>) -> Vec<String> {
    let Some(scope) = scope else {
        return vec![];
    };
    match scope.owner {
        Runtime::Native => scope.native.as_ref().map(|n| n.units.clone()).unwrap_or_default(),
        Runtime::Docker => scope
            .docker
            .as_ref()
            .map(|d| d.containers.iter().map(|c| c.name.clone()).collect())
            .unwrap_or_default(),
    }
}

/// Whether `path` is a release directory (used by status to show it exists).
pub fn release_exists(releases: &Path, commit: &str) -> bool {
    releases.join(commit).is_dir()
}
