//! The rollout engine: bring the host to one commit — fetch, plan, prepare
//! (checkout and build), switch, verify — and roll back what it switched when
//! verification fails. Every side effect is journaled in the store before it
//! happens, and the rollout record is complete whatever the outcome.

/// The ownership audit at start-up and after every rollout.
pub mod audit;
/// Build commands: output tail, timeout.
pub mod build;
/// The `docker` runtime: images, containers kept for rollback.
pub mod docker;
/// The `native` runtime: unit files, drop-ins, restarts.
pub mod native;
/// Start-up recovery: half-written releases, units that disagree with the store.
pub mod recover;
/// Release directories: checkout, registry, pruning.
pub mod releases;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::cli::short;
use crate::config::Config;
use crate::manifest::{self, Manifest, Runtime, Scope};
use crate::plan::{self, Action, Plan, ScopeInputs, ScopePlan};
use crate::runtime::docker::{Docker, Labels};
use crate::runtime::systemd::Systemd;
use crate::source::git::Source;
use crate::store::{
    DeployedScope, HostState, JournalEntry, Outcome, PhaseRecord, RolloutRecord, SCHEMA_VERSION,
    ScopeRecord, ScopeState, Store, now_ms,
};

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
    /// Set by the agent on SIGTERM; rollouts stop at their next step boundary.
    pub stop: Arc<Stop>,
    systemd: Option<Systemd>,
    docker: Option<Docker>,
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
    Idle(Idle),
    Rolled(Box<RolloutRecord>),
}

impl Engine {
    pub fn new(config: Config, store: Store) -> Engine {
        let source = Source::new(&config.source, &config.state.dir);
        Engine {
            config,
            store,
            source,
            http: crate::health::client(),
            stop: Arc::new(Stop::default()),
            systemd: None,
            docker: None,
        }
    }

    pub fn releases_dir(&self) -> PathBuf {
        self.config.state.dir.join("releases")
    }

    pub(crate) async fn systemd(&mut self) -> Result<Systemd, String> {
        if let Some(sd) = &self.systemd {
            return Ok(sd.clone());
        }
        let sd = Systemd::connect().await.map_err(|e| e.to_string())?;
        self.systemd = Some(sd.clone());
        Ok(sd)
    }

    pub(crate) fn docker(&mut self) -> Result<Docker, String> {
        if let Some(dk) = &self.docker {
            return Ok(dk.clone());
        }
        let dk = Docker::connect(&self.config.docker.host).map_err(|e| e.to_string())?;
        self.docker = Some(dk.clone());
        Ok(dk)
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
    pub async fn converge(
        &mut self,
        head: String,
        trigger: &str,
        fetch_ms: u64,
    ) -> Result<Converged, String> {
        let host = self.store.host().map_err(|e| e.to_string())?;
        // A scope found unhealthy (by the start-up audit, or a failed
        // rollback) is redeployed even when the branch did not move.
        if host.deployed_commit.as_deref() == Some(head.as_str())
            && host.scopes.values().all(|s| s.healthy)
        {
            return Ok(Converged::Idle(Idle::UpToDate));
        }
        if host.failed_commit.as_deref() == Some(head.as_str()) {
            // The head is quarantined, but a scope found down (the start-up
            // audit) is still brought back to what the store records: the
            // deployed commit, whose releases are reused as they are.
            if let Some(deployed) = host.deployed_commit.clone()
                && host.scopes.values().any(|s| !s.healthy)
            {
                let record = self
                    .rollout(&deployed, "repair", fetch_ms, host, Target::Repair)
                    .await?;
                return Ok(Converged::Rolled(Box::new(record)));
            }
            return Ok(Converged::Idle(Idle::FailedBefore));
        }
        let record = self
            .rollout(&head, trigger, fetch_ms, host, Target::Head)
            .await?;
        Ok(Converged::Rolled(Box::new(record)))
    }

    /// Read and validate the manifest at `commit`.
    pub fn manifest_at(&self, commit: &str) -> Result<Manifest, String> {
        let path = &self.config.source.manifest;
        let bytes = self
            .source
            .read_file(commit, path)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("manifest \"{path}\" not found in commit {}", short(commit)))?;
        manifest::parse(path, &bytes).map_err(|d| d.to_string())
    }

    /// The plan for `commit` against the recorded host state.
    pub fn plan_for(&self, commit: &str) -> Result<(Manifest, Plan), String> {
        let manifest = self.manifest_at(commit)?;
        let host = self.store.host().map_err(|e| e.to_string())?;
        let releases = self.store.releases().map_err(|e| e.to_string())?;
        let mut inputs = BTreeMap::new();
        for (name, scope) in &manifest.scopes {
            let paths = plan::input_paths(scope);
            let path_ids = self
                .source
                .path_ids(commit, &paths)
                .map_err(|e| e.to_string())?;
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

    /// Drop a cached bus connection that no longer works (the user manager
    /// restarted), so the rollout connects afresh.
    async fn check_runtimes(&mut self) {
        if let Some(sd) = &self.systemd
            && let Err(e) = sd.unit_state("-.slice").await
            && e.is_transient()
        {
            warn!(error = %e, "the user manager connection broke; reconnecting");
            self.systemd = None;
        }
    }

    async fn rollout(
        &mut self,
        head: &str,
        trigger: &str,
        fetch_ms: u64,
        host: HostState,
        target: Target,
    ) -> Result<RolloutRecord, String> {
        self.check_runtimes().await;
        let id = self.store.next_rollout_id().map_err(|e| e.to_string())?;
        let (subject, author) = match self.source.commit_info(head) {
            Ok((subject, author)) => (Some(subject), Some(author)),
            Err(e) => {
                warn!(commit = %short(head), error = %e, "cannot read the commit's subject and author");
                (None, None)
            }
        };
        let record = RolloutRecord {
            schema: SCHEMA_VERSION,
            id,
            commit: head.to_string(),
            previous_commit: host.deployed_commit.clone(),
            trigger: trigger.to_string(),
            started_at: now_ms(),
            finished_at: None,
            outcome: Outcome::InProgress,
            subject,
            author,
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
        // No side effect before the rollout is on record: a store that
        // refuses this write (disk full) fails the turn with nothing touched.
        store.put_rollout(&record).map_err(|e| e.to_string())?;
        let mut journal = Journal::new(&store, self.stop.clone(), record);
        crate::fault::point("after-fetch");
        info!(rollout = id, commit = %short(head), trigger, "rollout started");
        let (outcome, error, keep_releases) = match self.run(&mut journal, head, host).await {
            Ok(Succeeded { keep_releases }) => (Outcome::Succeeded, None, Some(keep_releases)),
            Err((outcome, error)) => (outcome, Some(error), None),
        };
        let mut host = self.store.host().map_err(|e| e.to_string())?;
        match (outcome, target) {
            (Outcome::Succeeded, Target::Head) => {
                host.deployed_commit = Some(head.to_string());
                host.failed_commit = None;
            }
            (_, Target::Head) => host.failed_commit = Some(head.to_string()),
            // A repair leaves the quarantined head quarantined.
            (_, Target::Repair) => {}
        }
        self.store.put_host(&host).map_err(|e| e.to_string())?;
        crate::fault::point("while-recording");
        journal.record.outcome = outcome;
        journal.record.error = error;
        journal.record.finished_at = Some(now_ms());
        journal.save();
        match &journal.record.error {
            None => info!(rollout = id, outcome = outcome.as_str(), "rollout finished"),
            Some(e) => {
                warn!(rollout = id, outcome = outcome.as_str(), error = %e, "rollout finished")
            }
        }
        if let Some(keep) = keep_releases {
            self.prune(&mut journal, &host, keep).await;
        }
        Ok(journal.record)
    }

    /// Remove old releases and the images built for them, each journaled in
    /// the (already decided) rollout record. A kill in between leaves a
    /// release that is registered and whole, or forgotten and removed by
    /// start-up recovery.
    async fn prune(&mut self, journal: &mut Journal<'_>, host: &HostState, keep: usize) {
        let commits = match self.store.releases() {
            Ok(all) => releases::to_prune(&all, keep, &releases::protected(host)),
            Err(e) => {
                warn!(error = %e, "cannot prune releases");
                return;
            }
        };
        let dir = self.releases_dir();
        for commit in commits {
            let (store, manifest) = (self.store.clone(), self.config.source.manifest.clone());
            let path = dir.join(&commit);
            let pruned = journal
                .step(format!("prune release {}", short(&commit)), async move {
                    releases::prune_one(&store, &path, &manifest, &commit)
                })
                .await;
            let images = match pruned {
                Ok(images) => images,
                Err(e) => {
                    warn!(error = %e, "cannot prune releases");
                    return;
                }
            };
            if images.is_empty() {
                continue;
            }
            let Ok(dk) = self.docker() else {
                continue;
            };
            for image in images {
                let removed = journal
                    .step(format!("remove image {image}"), dk.remove_image(&image))
                    .await;
                if let Err(e) = removed {
                    warn!(image = %image, error = %e, "cannot remove the image of a pruned release");
                }
            }
        }
    }

    /// The rollout proper. `Err` carries the outcome to record and why.
    async fn run(
        &mut self,
        journal: &mut Journal<'_>,
        head: &str,
        mut host: HostState,
    ) -> Result<Succeeded, (Outcome, String)> {
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
                    short(head),
                    short(&deployed),
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
                members: manifest
                    .scopes
                    .get(&s.scope)
                    .map(Scope::members)
                    .unwrap_or_default(),
                result: None,
            })
            .collect();
        journal.phase("plan", started);
        journal.save();
        if !plan.changes_anything() {
            return Ok(Succeeded {
                keep_releases: manifest.defaults.keep_releases,
            });
        }

        let started = Instant::now();
        let prepared = self.prepare(journal, &manifest, &plan).await;
        journal.phase("prepare", started);
        prepared.map_err(failed)?;

        let mut switched: Vec<Switched> = Vec::new();
        let mut failure = None;
        let (mut switch_ms, mut verify_ms) = (0u64, 0u64);
        for step in plan.scopes.iter().filter(|s| s.action != Action::Unchanged) {
            let previous = host.scopes.get(&step.scope).cloned();
            if step.action == Action::Remove {
                let started = Instant::now();
                let result = match &previous {
                    Some(p) => {
                        let limit = manifest.defaults.job_timeout;
                        self.retire(&step.scope, &p.current, &p.current.members, limit, journal)
                            .await
                    }
                    None => Ok(()),
                };
                switch_ms += started.elapsed().as_millis() as u64;
                if let Err(e) = result {
                    failure = Some(format!("removing scope \"{}\" failed: {e}", step.scope));
                    break;
                }
                host.scopes.remove(&step.scope);
                set_result(journal, &step.scope, "stopped");
                continue;
            }
            let Some(scope) = manifest.scopes.get(&step.scope) else {
                continue;
            };
            let release_dir = self.releases_dir().join(&step.release);
            switched.push(Switched {
                step: step.clone(),
                scope: scope.clone(),
                previous: previous.clone(),
            });
            let started = Instant::now();
            let result = self
                .switch(journal, step, scope, previous.as_ref(), &release_dir)
                .await;
            switch_ms += started.elapsed().as_millis() as u64;
            if let Err(e) = result {
                failure = Some(format!("switching scope \"{}\" failed: {e}", scope.name));
                break;
            }
            set_result(journal, &step.scope, "switched");
            journal.boundary().await;
            let started = Instant::now();
            crate::fault::point("during-verify");
            let verified = self.verify(scope, &release_dir).await;
            verify_ms += started.elapsed().as_millis() as u64;
            if let Err(e) = verified {
                failure = Some(format!("scope \"{}\" failed verification: {e}", scope.name));
                break;
            }
            set_result(journal, &step.scope, "healthy");
            let current = DeployedScope {
                owner: plan::runtime_name(scope.owner).to_string(),
                release: step.release.clone(),
                commit: head.to_string(),
                fingerprint: step.fingerprint.clone(),
                section_text: step.section_text.clone(),
                path_ids: step.path_ids.clone(),
                members: scope.members(),
                rollout: journal.record.id,
                at: now_ms(),
            };
            let state = ScopeState::healthy(current, previous.as_ref());
            host.scopes.insert(step.scope.clone(), state);
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
            self.store
                .put_host(&host)
                .map_err(|e| failed(e.to_string()))?;
            self.finish_switched(journal, &switched).await;
            return Ok(Succeeded {
                keep_releases: manifest.defaults.keep_releases,
            });
        };

        let started = Instant::now();
        let restored = self.roll_back(journal, switched).await;
        journal.phase("rollback", started);
        match restored {
            Ok(()) => Err((Outcome::RolledBack, reason)),
            Err(e) => Err((Outcome::Failed, format!("{reason}; {e}"))),
        }
    }

    fn labels(&self, scope: &str, release: &str) -> Labels {
        Labels {
            source: self.source.url_text(),
            scope: scope.to_string(),
            commit: release.to_string(),
        }
    }

    /// Bring one scope onto `release`. For a cutover every member of the old
    /// owner is stopped before the first member of the new one starts.
    async fn switch(
        &mut self,
        journal: &mut Journal<'_>,
        step: &ScopePlan,
        scope: &Scope,
        previous: Option<&ScopeState>,
        release_dir: &Path,
    ) -> Result<(), String> {
        if let (Action::Cutover { .. }, Some(previous)) = (step.action, previous) {
            self.stop_members(
                &previous.current.owner,
                &previous.current.members,
                false,
                scope.job_timeout,
                journal,
            )
            .await?;
        }
        match scope.owner {
            Runtime::Native => {
                let sd = self.systemd().await?;
                native::switch(&sd, scope, release_dir, &step.release, journal).await
            }
            Runtime::Docker => {
                let dk = self.docker()?;
                let labels = self.labels(&scope.name, &step.release);
                let way_back = previous
                    .filter(|p| p.current.owner == "docker")
                    .and_then(|p| p.last_healthy.as_ref())
                    .map(|h| h.release.as_str());
                docker::replace(
                    &dk,
                    &labels,
                    scope,
                    release_dir,
                    &step.release,
                    way_back,
                    journal,
                )
                .await
            }
        }
    }

    async fn verify(&mut self, scope: &Scope, release_dir: &Path) -> Result<(), String> {
        match scope.owner {
            Runtime::Native => {
                let sd = self.systemd().await?;
                native::verify(&sd, scope, release_dir, &self.http).await
            }
            Runtime::Docker => {
                let dk = self.docker()?;
                docker::verify(&dk, scope, release_dir, &self.http).await
            }
        }
    }

    /// Stop a scope's members on `owner` ("native" or "docker"), each job
    /// bounded by `limit`; containers are removed when `remove`, else kept
    /// for a way back.
    async fn stop_members(
        &mut self,
        owner: &str,
        members: &[String],
        remove: bool,
        limit: Duration,
        journal: &mut Journal<'_>,
    ) -> Result<(), String> {
        if owner == "docker" {
            let dk = self.docker()?;
            docker::stop(&dk, members, remove, journal).await
        } else {
            let sd = self.systemd().await?.with_job_timeout(limit);
            native::stop(&sd, members, journal).await
        }
    }

    /// Take `members` out of service for good (a removed scope, or members
    /// a scope no longer lists): stopped, and their drop-ins and the unit
    /// files the scope installed (native) or containers (docker) removed,
    /// so nothing keeps running from a release that pruning may delete.
    async fn retire(
        &mut self,
        scope: &str,
        deployed: &DeployedScope,
        members: &[String],
        limit: Duration,
        journal: &mut Journal<'_>,
    ) -> Result<(), String> {
        if members.is_empty() {
            return Ok(());
        }
        if deployed.owner == "docker" {
            return self
                .stop_members("docker", members, true, limit, journal)
                .await;
        }
        // The unit files this scope installed, by unit name.
        let installed: Vec<String> = self
            .scope_from_release(&deployed.release, scope)
            .ok()
            .and_then(|s| s.native)
            .map(|n| {
                n.unit_files
                    .iter()
                    .filter_map(|f| Path::new(f).file_name())
                    .map(|f| f.to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let sd = self.systemd().await?.with_job_timeout(limit);
        native::stop(&sd, members, journal).await?;
        for unit in members {
            journal
                .step(
                    format!("remove the drop-in of {unit}"),
                    sd.remove_dropin(unit),
                )
                .await
                .map_err(|e| e.to_string())?;
            if installed.contains(unit) {
                journal
                    .step(
                        format!("remove the unit file {unit}"),
                        sd.remove_unit_file(unit),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        journal
            .step("reload the user manager".to_string(), sd.daemon_reload())
            .await
            .map_err(|e| e.to_string())
    }

    /// Every switched scope is healthy: drop what was kept for a way back
    /// (replaced containers, the containers of a scope cut over to native).
    async fn finish_switched(&mut self, journal: &mut Journal<'_>, switched: &[Switched]) {
        for sw in switched {
            let result = match (sw.step.action, sw.scope.owner, &sw.previous) {
                (
                    Action::Cutover {
                        from: Runtime::Docker,
                    },
                    _,
                    Some(previous),
                ) => {
                    let limit = sw.scope.job_timeout;
                    self.stop_members("docker", &previous.current.members, true, limit, journal)
                        .await
                }
                (_, Runtime::Docker, _) => match self.docker() {
                    Ok(dk) => docker::drop_previous(&dk, &sw.scope, journal).await,
                    Err(e) => Err(e),
                },
                _ => Ok(()),
            };
            if let Err(e) = result {
                warn!(scope = %sw.scope.name, error = %e, "cannot clean up after the switch");
            }
            if let Some(previous) = &sw.previous
                && !sw.step.retired.is_empty()
            {
                let retired = self
                    .retire(
                        &sw.scope.name,
                        &previous.current,
                        &sw.step.retired,
                        sw.scope.job_timeout,
                        journal,
                    )
                    .await;
                if let Err(e) = retired {
                    warn!(scope = %sw.scope.name, error = %e, "cannot retire members dropped from the scope");
                }
            }
        }
    }

    /// Check out the release if a scope needs it, run the builds, and make
    /// sure every image a docker scope will run exists.
    async fn prepare(
        &mut self,
        journal: &mut Journal<'_>,
        manifest: &Manifest,
        plan: &Plan,
    ) -> Result<(), String> {
        let dir = self.releases_dir().join(&plan.commit);
        let fresh = plan.needs_checkout() && !dir.exists();
        if fresh {
            let source = self.source.clone();
            let (commit, dest) = (plan.commit.clone(), dir.clone());
            journal
                .step(
                    format!("check out release {}", short(&plan.commit)),
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
        let mut result = Ok(());
        for step in plan.scopes.iter() {
            let Some(scope) = manifest.scopes.get(&step.scope) else {
                continue;
            };
            if matches!(step.action, Action::Unchanged | Action::Remove) {
                continue;
            }
            if step.build && !scope.build.is_empty() {
                result = journal
                    .step(
                        format!("build scope {}", scope.name),
                        build::run(
                            &scope.name,
                            &scope.build,
                            &dir,
                            &plan.commit,
                            scope.build_timeout,
                            &mut tail,
                        ),
                    )
                    .await;
                if let Some(s) = journal.scope_mut(&step.scope) {
                    s.built = true;
                }
                if result.is_err() {
                    break;
                }
            }
            if scope.owner == Runtime::Docker {
                let dk = match self.docker() {
                    Ok(dk) => dk,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                };
                let labels = self.labels(&scope.name, &step.release);
                let release_dir = self.releases_dir().join(&step.release);
                let mut on_line = |line: &str| tail.push(line.to_string());
                let images = docker::ensure_images(
                    &dk,
                    &labels,
                    scope,
                    &release_dir,
                    &step.release,
                    journal,
                    &mut on_line,
                );
                let images = tokio::time::timeout(scope.build_timeout, images)
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "building the images of scope \"{}\" did not finish within {}",
                            scope.name,
                            humantime::format_duration(scope.build_timeout)
                        ))
                    });
                if let Err(e) = images {
                    result = Err(e);
                    break;
                }
            }
            if step.build {
                built.insert(step.scope.clone(), step.fingerprint.clone());
            }
        }
        journal.record.build_tail = tail.lines();
        if let Err(e) = result {
            journal.save();
            if fresh {
                releases::discard(&dir);
            }
            return Err(e);
        }
        if plan.needs_checkout() {
            releases::register(&self.store, &plan.commit, built).map_err(|e| e.to_string())?;
        }
        journal.save();
        Ok(())
    }

    /// Return every switched scope, newest first, to how it ran before:
    /// native scopes to their last healthy release, docker scopes to the
    /// containers kept for that, cutovers to the old owner. Scopes that had
    /// no earlier healthy state are stopped.
    async fn roll_back(
        &mut self,
        journal: &mut Journal<'_>,
        switched: Vec<Switched>,
    ) -> Result<(), String> {
        let mut host = self.store.host().map_err(|e| e.to_string())?;
        let mut problems = Vec::new();
        for sw in switched.into_iter().rev() {
            let name = sw.scope.name.clone();
            let new_members = sw.scope.members();
            let new_owner = plan::runtime_name(sw.scope.owner);
            let Some(target) = sw.previous.as_ref().and_then(|p| p.last_healthy.clone()) else {
                let stopped = self
                    .stop_members(new_owner, &new_members, true, sw.scope.job_timeout, journal)
                    .await;
                set_result(
                    journal,
                    &name,
                    "failed: stopped, no earlier healthy release",
                );
                host.scopes.remove(&name);
                problems.push(format!(
                    "scope \"{name}\" has no earlier healthy release and was stopped"
                ));
                if let Err(e) = stopped {
                    problems.push(e);
                }
                continue;
            };
            let restored = self.restore(journal, &sw, &target, &new_members).await;
            let healthy = restored.is_ok();
            match restored {
                Ok(()) => set_result(journal, &name, "rolled-back"),
                Err(e) => {
                    set_result(journal, &name, &format!("failed: rollback unhealthy: {e}"));
                    problems.push(format!("rolling back scope \"{name}\" failed: {e}"));
                }
            }
            let way_back = sw
                .previous
                .as_ref()
                .map(|p| p.way_back.clone())
                .unwrap_or_default();
            host.scopes.insert(
                name,
                ScopeState {
                    current: target.clone(),
                    healthy,
                    last_healthy: Some(target),
                    problem: None,
                    way_back,
                },
            );
        }
        self.store.put_host(&host).map_err(|e| e.to_string())?;
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Undo one scope's switch and verify what runs again.
    async fn restore(
        &mut self,
        journal: &mut Journal<'_>,
        sw: &Switched,
        target: &DeployedScope,
        new_members: &[String],
    ) -> Result<(), String> {
        let old = self.scope_from_release(&target.release, &sw.scope.name)?;
        let release_dir = self.releases_dir().join(&target.release);
        match (sw.step.action, sw.scope.owner) {
            (Action::Cutover { .. }, Runtime::Docker) => {
                // Back from docker to native: the units still point at their
                // release. Nothing of the docker form is a way back (a kept
                // container is left by an interrupted attempt): remove it all.
                let dk = self.docker()?;
                docker::remove_all(&dk, new_members, journal).await?;
                let sd = self.systemd().await?.with_job_timeout(old.job_timeout);
                for unit in &target.members {
                    journal
                        .step(format!("start {unit}"), sd.start(unit))
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            (Action::Cutover { .. }, Runtime::Native) => {
                self.stop_members("native", new_members, false, old.job_timeout, journal)
                    .await?;
                let dk = self.docker()?;
                docker::start(&dk, &target.members, journal).await?;
            }
            (_, Runtime::Docker) => {
                let dk = self.docker()?;
                if !docker::restore(&dk, new_members, Some(&target.release), true, journal).await? {
                    // Nothing kept (an interrupted earlier attempt): recreate.
                    docker::stop(&dk, new_members, true, journal).await?;
                    let labels = self.labels(&old.name, &target.release);
                    docker::start_new(&dk, &labels, &old, &release_dir, &target.release, journal)
                        .await?;
                }
            }
            (_, Runtime::Native) => {
                let sd = self.systemd().await?;
                native::switch(&sd, &old, &release_dir, &target.release, journal).await?;
            }
        }
        crate::fault::point("during-rollback");
        self.verify(&old, &release_dir).await
    }

    /// The scope as the manifest inside release `commit` describes it.
    fn scope_from_release(&self, commit: &str, name: &str) -> Result<Scope, String> {
        let path = self
            .releases_dir()
            .join(commit)
            .join(&self.config.source.manifest);
        let bytes =
            std::fs::read(&path).map_err(|e| format!("cannot read \"{}\": {e}", path.display()))?;
        let manifest =
            manifest::parse(&path.display().to_string(), &bytes).map_err(|d| d.to_string())?;
        manifest
            .scopes
            .get(name)
            .cloned()
            .ok_or_else(|| format!("release {} has no scope \"{name}\"", short(commit)))
    }

    /// Close rollouts a previous agent left in progress.
    pub fn close_interrupted(&self) -> Result<Vec<u64>, String> {
        let mut closed = Vec::new();
        for mut record in self
            .store
            .unfinished_rollouts()
            .map_err(|e| e.to_string())?
        {
            record.outcome = Outcome::Interrupted;
            record.finished_at = Some(now_ms());
            record.error = Some(recover::interrupted_error(&record.journal));
            self.store.put_rollout(&record).map_err(|e| e.to_string())?;
            closed.push(record.id);
        }
        Ok(closed)
    }
}

fn set_result(journal: &mut Journal<'_>, scope: &str, result: &str) {
    if let Some(s) = journal.scope_mut(scope) {
        s.result = Some(result.to_string());
    }
    journal.save();
}

/// What a rollout brings the host to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The branch head: success deploys it, failure quarantines it.
    Head,
    /// The deployed commit again, to bring back scopes found down while the
    /// head is quarantined; the quarantine stays as it is.
    Repair,
}

/// A scope this rollout switched, with what undoing it needs.
struct Switched {
    step: ScopePlan,
    scope: Scope,
    previous: Option<ScopeState>,
}

/// A rollout that reached its commit, with what pruning needs from the
/// manifest it already read (so it is not read from git again).
struct Succeeded {
    keep_releases: usize,
}
