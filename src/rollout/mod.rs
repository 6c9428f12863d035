//! The rollout engine: bring the host to one commit — fetch, plan, prepare
//! (checkout and build), switch, verify — and roll back what it switched when
//! verification fails. Every side effect is journaled in the store before it
//! happens, and the rollout record is complete whatever the outcome.

/// The ownership audit at start-up and after every rollout.
pub mod audit;
/// Build commands: output tail, timeout.
pub mod build;
/// The rollout's decisions: next step, outcome, host state; pure.
pub mod core;
/// Start-up recovery: half-written releases, units that disagree with the store.
pub mod recover;
/// Release directories: checkout, registry, pruning.
pub mod releases;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use self::core::{Core, Decision, Next, Target};
use crate::config::Config;
pub use crate::journal::{Journal, Stop};
use crate::manifest::{self, Manifest, Owner, Scope};
use crate::plan::{self, Action, Plan, ScopeInputs, ScopePlan};
use crate::runtime::{Act, Keep, Runtime, RuntimeError, Runtimes};
use crate::source::git::{GitError, Source};
use crate::source::short;
use crate::store::{
    Awaiting, DeployedScope, Gated, HandState, HostState, Outcome, PhaseRecord, RolloutRecord,
    SCHEMA_VERSION, ScopeRecord, ScopeState, Store, StoreError, now_ms,
};

/// What can go wrong in the engine, naming the commit, path, scope, unit or
/// container involved; `is_transient` tells a failure that may pass by
/// itself (a runtime or repository away, a store refusing writes) from one
/// the commit or the host config must change for.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error(transparent)]
    Verify(#[from] crate::source::verify::JudgeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Build(#[from] build::BuildError),
    #[error("{0}")]
    Manifest(manifest::Diagnostics),
    #[error("manifest \"{path}\" not found in commit {}", short(commit))]
    NoManifest { path: String, commit: String },
    #[error("cannot read \"{}\": {source}", path.display())]
    ReadRelease {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot list releases in \"{}\": {source}", path.display())]
    ListReleases {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("release {} has no scope \"{scope}\"", short(commit))]
    NoScopeInRelease { commit: String, scope: String },
    #[error(
        "branch \"{branch}\" was rewritten: {} does not descend from the deployed commit {}; set allow_force_push = true in \"{}\" to deploy it",
        short(head),
        short(deployed),
        config.display()
    )]
    Rewritten {
        branch: String,
        head: String,
        deployed: String,
        config: PathBuf,
    },
    #[error("scope \"{scope}\" is not in the plan or the manifest")]
    UnknownScope { scope: String },
    #[error("the {what} task failed: {detail}")]
    Task { what: &'static str, detail: String },
}

impl Error {
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Runtime(e) => e.is_transient(),
            Error::Git(e) => e.is_transient(),
            // A trust file being fixed, a history being fetched.
            Error::Verify(_) => true,
            Error::Store(e) => e.is_transient(),
            Error::Build(e) => e.is_transient(),
            Error::Task { .. } => true,
            Error::Manifest(_)
            | Error::NoManifest { .. }
            | Error::ReadRelease { .. }
            | Error::ListReleases { .. }
            | Error::NoScopeInRelease { .. }
            | Error::Rewritten { .. }
            | Error::UnknownScope { .. } => false,
        }
    }
}

/// A blocking task's join error as an engine error.
fn task(what: &'static str) -> impl FnOnce(tokio::task::JoinError) -> Error {
    move |e| Error::Task {
        what,
        detail: e.to_string(),
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
    runtimes: Runtimes,
    /// A fetch that timed out and has not ended yet.
    fetching: Option<tokio::task::JoinHandle<Result<String, GitError>>>,
}

/// Why no rollout ran for a fetched commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Idle {
    /// The host already runs the branch's commit.
    UpToDate,
    /// The branch's commit failed before and is not retried until it moves.
    FailedBefore,
    /// The branch's commit waits for `moorline approve` (an `approve` gate).
    AwaitingApproval,
}

#[derive(Debug)]
pub enum Converged {
    Idle(Idle),
    Rolled(Box<RolloutRecord>),
    /// A rollout asked for by hand ran; the branch is looked at next.
    ByHand(Box<RolloutRecord>),
}

/// A rollout asked for by hand: what each scope goes to, and who asked.
#[derive(Debug, Clone)]
struct ByHand {
    steps: BTreeMap<String, plan::HandStep>,
    user: Option<String>,
}

/// What the approval check found for a branch commit.
enum Approval {
    /// A gated step waits for `moorline approve`.
    Waits,
    /// Nothing waits: the plan it made (none when the commit cannot be
    /// planned; the rollout records why).
    Free(Option<(Box<(Manifest, Plan)>, Duration)>),
}

/// Where a rollout's plan comes from.
enum Planning<'a> {
    /// The commit's plan against the host, made by the rollout.
    Branch,
    /// Made already (by the approval check), with how long it took.
    Made(Box<(Manifest, Plan)>, Duration),
    ByHand(&'a ByHand),
    /// `[source.verify]` refused the commit: recorded, nothing touched.
    Refused(String),
}

impl Engine {
    pub fn new(config: Config, store: Store) -> Engine {
        let source = Source::new(&config.source, &config.state.dir);
        let edge = crate::runtime::slots::EdgeHandle::new(&config.state.dir, &config.path);
        let runtimes = Runtimes::new(&config.docker.host, &source.url_text(), edge);
        Engine {
            store,
            source,
            http: crate::health::client(),
            stop: Arc::new(Stop::default()),
            runtimes,
            fetching: None,
            config,
        }
    }

    pub fn releases_dir(&self) -> PathBuf {
        self.config.state.dir.join("releases")
    }

    /// The runtime of `owner`, connected.
    pub(crate) async fn runtime(&mut self, owner: Owner) -> Result<Runtime, Error> {
        Ok(self.runtimes.get(owner).await?)
    }

    /// Fetch the branch, for at most `fetch_timeout`. `Err` is a fetch
    /// failure (not a rollout). A fetch that times out is told to stop and
    /// left to end on its own thread (a read blocked on a silent remote
    /// cannot be cut short); no other fetch starts until it has.
    pub async fn fetch(&mut self) -> Result<String, Error> {
        let url = self.source.url_text();
        if self.fetching.as_ref().is_some_and(|f| !f.is_finished()) {
            return Err(GitError::StillFetching { url }.into());
        }
        self.fetching = None;
        let interrupt = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (source, flag) = (self.source.clone(), Arc::clone(&interrupt));
        let mut fetch = tokio::task::spawn_blocking(move || source.fetch_until(&flag));
        let limit = self.config.source.fetch_timeout;
        match tokio::time::timeout(limit, &mut fetch).await {
            Ok(joined) => Ok(joined.map_err(task("fetch"))??),
            Err(_) => {
                interrupt.store(true, std::sync::atomic::Ordering::SeqCst);
                self.fetching = Some(fetch);
                Err(GitError::TimedOut { url, after: limit }.into())
            }
        }
    }

    /// Bring the host to `head` if it is not there yet and did not fail before.
    pub async fn converge(
        &mut self,
        head: String,
        trigger: &str,
        fetch_ms: u64,
    ) -> Result<Converged, Error> {
        let host = self.store.host()?;
        let hand = self.store.hand()?;
        if hand.due(&host) {
            return self.roll_by_hand(&hand, host).await;
        }
        let resumed = !hand.resumed.is_empty();
        let (commit, target) = match core::decide(&head, &host, resumed) {
            Decision::UpToDate => return Ok(Converged::Idle(Idle::UpToDate)),
            Decision::FailedBefore => return Ok(Converged::Idle(Idle::FailedBefore)),
            Decision::Roll { commit, target } => (commit, target),
        };
        let refused = match target {
            Target::Head => {
                self.refusal(&commit, host.deployed_commit.as_deref())
                    .await?
            }
            Target::Repair | Target::Hand => None,
        };
        let (trigger, planning) = match (target, refused) {
            (Target::Head, Some(reason)) => (trigger, Planning::Refused(reason)),
            (Target::Head, None) => match self.approval(&commit, &hand)? {
                Approval::Waits => return Ok(Converged::Idle(Idle::AwaitingApproval)),
                Approval::Free(Some((planned, took))) => (trigger, Planning::Made(planned, took)),
                Approval::Free(None) => (trigger, Planning::Branch),
            },
            (Target::Repair | Target::Hand, _) => ("repair", Planning::Branch),
        };
        let record = self
            .rollout(&commit, trigger, fetch_ms, host, target, planning)
            .await?;
        Ok(Converged::Rolled(Box::new(record)))
    }

    /// Why `[source.verify]` refuses to deploy `head` over `deployed`, if
    /// it does (judged before an approval gate: an unsigned commit never
    /// waits to be approved).
    pub async fn refusal(
        &self,
        head: &str,
        deployed: Option<&str>,
    ) -> Result<Option<String>, Error> {
        let Some(verify) = self.config.source.verify.clone() else {
            return Ok(None);
        };
        let source = self.source.clone();
        let (head, deployed) = (head.to_string(), deployed.map(str::to_string));
        let judged = tokio::task::spawn_blocking(move || {
            crate::source::verify::judge(&source, &verify, &head, deployed.as_deref())
        })
        .await
        .map_err(task("verify"))??;
        Ok(match judged {
            Ok(signers) => {
                if let Some((commit, signer)) = signers.first() {
                    info!(commit = %short(commit), signer = %signer.0, commits = signers.len(), "signatures verified");
                }
                None
            }
            Err(reason) => {
                warn!(reason = %reason, "commit refused");
                Some(reason)
            }
        })
    }

    /// Whether a rollout asked for by hand waits for the loop.
    pub fn hand_due(&self) -> bool {
        match (self.store.hand(), self.store.host()) {
            (Ok(hand), Ok(host)) => hand.due(&host),
            _ => false,
        }
    }

    /// Whether `commit` waits for `moorline approve`: then what it waits
    /// for is stored for `status`, and nothing of it deploys; else the plan
    /// made to tell, for the rollout to carry out. A manifest that cannot
    /// be planned is the rollout's to record, not a gate.
    fn approval(&self, commit: &str, hand: &HandState) -> Result<Approval, Error> {
        let started = Instant::now();
        let planned = self.plan_for(commit).ok();
        let took = started.elapsed();
        let waiting = match &planned {
            Some((_, plan)) => plan
                .awaiting()
                .map(|s| {
                    let what = format!("{}: {}", s.action.as_str(), s.reason);
                    (
                        s.scope.clone(),
                        Gated {
                            owner: s.owner,
                            what,
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            None => BTreeMap::new(),
        };
        let same = hand
            .awaiting
            .as_ref()
            .is_some_and(|a| a.commit == commit && a.scopes == waiting);
        if waiting.is_empty() && hand.awaiting.is_some() {
            self.store.update_hand(|h| h.awaiting = None)?;
        } else if !waiting.is_empty() && !same {
            info!(commit = %short(commit), scopes = ?waiting.keys().collect::<Vec<_>>(), "commit awaits approval");
            let awaiting = Awaiting {
                commit: commit.to_string(),
                scopes: waiting.clone(),
                since: now_ms(),
            };
            self.store
                .update_hand(|h| h.awaiting = Some(awaiting.clone()))?;
        }
        if waiting.is_empty() {
            Ok(Approval::Free(planned.map(|p| (Box::new(p), took))))
        } else {
            Ok(Approval::Waits)
        }
    }

    /// Carry out what operators asked for by hand: rollbacks not reached
    /// yet, then restarts, in one rollout at the deployed commit that
    /// touches nothing else. A rollback that fails leaves its scope held
    /// as it runs (its pin is cleared, so it is not tried again); restart
    /// requests are done once their rollout ends, whatever its outcome. An
    /// interrupted one keeps both, for the next start.
    async fn roll_by_hand(
        &mut self,
        hand: &HandState,
        host: HostState,
    ) -> Result<Converged, Error> {
        let mut steps = BTreeMap::new();
        let mut pinned = Vec::new();
        let (mut trigger, mut user) = ("restart", None);
        for (name, hold) in &hand.holds {
            if let Some(pin) = hold
                .pin
                .as_ref()
                .filter(|_| !hold.reached(host.scopes.get(name)))
            {
                let reason = format!(
                    "rollback by hand to release {}: {}",
                    short(&pin.release),
                    hold.reason
                );
                steps.insert(
                    name.clone(),
                    plan::HandStep {
                        to: pin.clone(),
                        reason,
                    },
                );
                (trigger, user) = ("rollback", Some(hold.user.clone()));
                pinned.push(name.clone());
            }
        }
        let mut restarted = Vec::new();
        for (name, request) in &hand.restarts {
            restarted.push(name.clone());
            let Some(state) = host.scopes.get(name) else {
                continue;
            };
            if !steps.contains_key(name) {
                let reason = format!("restart by hand: {}", request.reason);
                let to = state.current.clone();
                steps.insert(name.clone(), plan::HandStep { to, reason });
                user = user.or(Some(request.user.clone()));
            }
        }
        let commit = host
            .deployed_commit
            .clone()
            .or_else(|| steps.values().next().map(|s| s.to.release.clone()));
        let record = match commit {
            Some(commit) if !steps.is_empty() => {
                let by_hand = ByHand { steps, user };
                let planning = Planning::ByHand(&by_hand);
                let record = self
                    .rollout(&commit, trigger, 0, host, Target::Hand, planning)
                    .await?;
                Some(record)
            }
            _ => None,
        };
        // Interrupted (a stop request): the pin stays, and the next start
        // carries the rollback out again.
        let failed = record
            .as_ref()
            .is_some_and(|r| matches!(r.outcome, Outcome::Failed | Outcome::RolledBack));
        let ended = record
            .as_ref()
            .is_none_or(|r| !matches!(r.outcome, Outcome::Interrupted | Outcome::InProgress));
        self.store.update_hand(|h| {
            if ended {
                for name in &restarted {
                    h.restarts.remove(name);
                }
            }
            if failed {
                for name in &pinned {
                    if let Some(hold) = h.holds.get_mut(name) {
                        hold.pin = None;
                    }
                }
            }
        })?;
        match record {
            Some(record) => Ok(Converged::ByHand(Box::new(record))),
            None => Ok(Converged::Idle(Idle::UpToDate)),
        }
    }

    /// Read and validate the manifest at `commit`.
    pub fn manifest_at(&self, commit: &str) -> Result<Manifest, Error> {
        let path = &self.config.source.manifest;
        let bytes = self
            .source
            .read_file(commit, path)?
            .ok_or_else(|| Error::NoManifest {
                path: path.clone(),
                commit: commit.to_string(),
            })?;
        manifest::parse(path, &bytes).map_err(Error::Manifest)
    }

    /// The plan for `commit` against the recorded host state.
    pub fn plan_for(&self, commit: &str) -> Result<(Manifest, Plan), Error> {
        let manifest = self.manifest_at(commit)?;
        let host = self.store.host()?;
        let releases = self.store.releases()?;
        let mut ids = self.source.path_ids_of(
            commit,
            manifest
                .scopes
                .iter()
                .map(|(name, scope)| (name.as_str(), plan::input_paths(scope))),
        )?;
        let inputs: BTreeMap<String, ScopeInputs> = manifest
            .scopes
            .iter()
            .map(|(name, scope)| {
                let inputs = ScopeInputs {
                    section_text: scope.section_text.clone(),
                    path_ids: ids.remove(name).unwrap_or_default(),
                };
                (name.clone(), inputs)
            })
            .collect();
        let here = &self.config.host.name;
        let hand = self.store.hand()?;
        let plan = plan::plan(commit, &manifest, &inputs, &host, &releases, here, &hand);
        Ok((manifest, plan))
    }

    /// The plan of a rollout by hand at `commit`, with the manifest it runs
    /// by: `commit`'s, each scope going back taken from its release.
    fn plan_by_hand(
        &self,
        commit: &str,
        host: &HostState,
        by_hand: &ByHand,
    ) -> Result<(Manifest, Plan), Error> {
        let mut manifest = self.manifest_at(commit)?;
        for (name, step) in &by_hand.steps {
            let scope = self.scope_from_release(&step.to.release, name)?;
            manifest.scopes.insert(name.clone(), scope);
        }
        Ok((manifest, plan::by_hand(commit, host, &by_hand.steps)))
    }

    /// The deployment of scope `name` as release `release` describes it:
    /// what a rollback to that release brings the scope to.
    pub fn deployed_from_release(&self, release: &str, name: &str) -> Result<DeployedScope, Error> {
        let scope = self.scope_from_release(release, name)?;
        let path_ids = self.source.path_ids(release, &plan::input_paths(&scope))?;
        let inputs = ScopeInputs {
            section_text: scope.section_text.clone(),
            path_ids,
        };
        Ok(DeployedScope {
            owner: scope.owner,
            release: release.to_string(),
            commit: release.to_string(),
            fingerprint: inputs.fingerprint(),
            section_text: inputs.section_text,
            path_ids: inputs.path_ids,
            members: scope.members(),
            rollout: 0,
            at: now_ms(),
        })
    }

    async fn rollout(
        &mut self,
        head: &str,
        trigger: &str,
        fetch_ms: u64,
        host: HostState,
        target: Target,
        planning: Planning<'_>,
    ) -> Result<RolloutRecord, Error> {
        self.runtimes.check().await;
        let (subject, author) = match self.source.commit_info(head) {
            Ok((subject, author)) => (Some(subject), Some(author)),
            Err(e) => {
                warn!(commit = %short(head), error = %e, "cannot read the commit's subject and author");
                (None, None)
            }
        };
        let mut record = RolloutRecord {
            schema: SCHEMA_VERSION,
            id: 0,
            commit: head.to_string(),
            previous_commit: host.deployed_commit.clone(),
            trigger: trigger.to_string(),
            started_at: now_ms(),
            finished_at: None,
            outcome: Outcome::InProgress,
            user: match &planning {
                Planning::ByHand(by_hand) => by_hand.user.clone(),
                Planning::Branch | Planning::Made(..) | Planning::Refused(_) => None,
            },
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
            analysis: vec![],
        };
        let store = self.store.clone();
        // No side effect before the rollout is on record: a store that
        // refuses this write (disk full) fails the turn with nothing touched.
        let id = store.create_rollout(&mut record)?;
        let mut journal = Journal::new(&store, self.stop.clone(), record);
        crate::fault::point("after-fetch");
        info!(rollout = id, commit = %short(head), trigger, "rollout started");
        let (outcome, error, keep_releases) =
            match self.run(&mut journal, head, host, planning).await {
                // Pruning follows the branch's rollouts, not those by hand.
                Ok(Succeeded { keep_releases }) if target != Target::Hand => {
                    (Outcome::Succeeded, None, Some(keep_releases))
                }
                Ok(Succeeded { .. }) => (Outcome::Succeeded, None, None),
                Err((outcome, error)) => (outcome, Some(error), None),
            };
        let mut host = self.store.host()?;
        core::record_outcome(&mut host, head, target, outcome);
        if outcome == Outcome::Succeeded && target == Target::Head {
            // Resumed scopes have followed the branch again; approvals
            // were for commits up to this one.
            let done = self.store.update_hand(|hand| {
                hand.resumed.clear();
                hand.approvals.clear();
                hand.awaiting = None;
            });
            if let Err(e) = done {
                warn!(error = %e, "cannot record that resumed scopes converged");
            }
            host.elsewhere = journal
                .record
                .scopes
                .iter()
                .filter(|s| s.action == Action::Skip.as_str())
                .map(|s| s.scope.clone())
                .collect();
        }
        self.store.put_host(&host)?;
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
            let Ok(dk) = crate::runtime::docker::Docker::connect(&self.config.docker.host) else {
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
        host: HostState,
        planning: Planning<'_>,
    ) -> Result<Succeeded, (Outcome, String)> {
        let failed = |e: String| (Outcome::Failed, e);
        if let Some(deployed) = host.deployed_commit.clone()
            && !self.config.source.allow_force_push
            && matches!(planning, Planning::Branch | Planning::Made(..))
        {
            let source = self.source.clone();
            let (d, h) = (deployed.clone(), head.to_string());
            let descends = tokio::task::spawn_blocking(move || source.is_ancestor(&d, &h))
                .await
                .map_err(|e| failed(e.to_string()))?
                .map_err(|e| failed(e.to_string()))?;
            if !descends {
                let rewritten = Error::Rewritten {
                    branch: self.config.source.branch.clone(),
                    head: head.to_string(),
                    deployed,
                    config: self.config.path.clone(),
                };
                return Err(failed(rewritten.to_string()));
            }
        }

        let mut started = Instant::now();
        let planned = match planning {
            Planning::Branch => self.plan_for(head),
            Planning::Made(planned, took) => {
                started = started.checked_sub(took).unwrap_or(started);
                Ok(*planned)
            }
            Planning::ByHand(by_hand) => self.plan_by_hand(head, &host, by_hand),
            Planning::Refused(reason) => return Err((Outcome::Refused, reason)),
        };
        let (manifest, plan) = planned.map_err(|e| failed(e.to_string()))?;
        journal.record.scopes = plan
            .scopes
            .iter()
            .map(|s| ScopeRecord {
                scope: s.scope.clone(),
                owner: s.owner,
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

        // The decisions are `core`'s; this loop carries them out.
        let mut core = Core::new(plan.clone(), host, journal.record.id);
        let mut ms = BTreeMap::<&str, u64>::new();
        let mut prepared = false;
        loop {
            let next = core.next();
            let started = Instant::now();
            let (phase, result) = match &next {
                Next::Prepare => {
                    let result = self.prepare(journal, &manifest, &plan).await;
                    prepared = result.is_ok();
                    ("prepare", result)
                }
                Next::Retire { scope } => {
                    let result = match core.previous(scope).cloned() {
                        Some(p) => {
                            let limit = manifest.defaults.job_timeout;
                            self.retire(scope, &p.current, &p.current.members, limit, journal)
                                .await
                        }
                        None => Ok(()),
                    };
                    ("switch", result)
                }
                Next::Switch { scope } => {
                    let sw = switched_of(&core, &manifest, scope)?;
                    let release_dir = self.releases_dir().join(&sw.step.release);
                    let result = self
                        .switch(
                            journal,
                            &sw.step,
                            &sw.scope,
                            sw.previous.as_ref(),
                            &release_dir,
                        )
                        .await;
                    ("switch", result)
                }
                Next::Verify { scope } => {
                    journal.boundary().await;
                    crate::fault::point("during-verify");
                    let sw = switched_of(&core, &manifest, scope)?;
                    let release_dir = self.releases_dir().join(&sw.step.release);
                    ("verify", self.verify(&sw.scope, &release_dir).await)
                }
                Next::Finish => {
                    self.store
                        .put_host(core.host())
                        .map_err(|e| failed(e.to_string()))?;
                    let switched: Vec<Switched> = core
                        .switched()
                        .map(|step| switched_of(&core, &manifest, &step.scope))
                        .collect::<Result<_, _>>()?;
                    self.finish_switched(journal, &switched).await;
                    ("finish", Ok(()))
                }
                Next::RollBack { scope, to } => {
                    let sw = switched_of(&core, &manifest, scope)?;
                    let new_members = sw.scope.members();
                    let result = match to {
                        Some(target) => self.restore(journal, &sw, target, &new_members).await,
                        None => match self.runtime(sw.scope.owner).await {
                            Ok(runtime) => runtime
                                .act(
                                    Act::Stop(Keep::Nothing),
                                    &new_members,
                                    sw.scope.job_timeout,
                                    journal,
                                )
                                .await
                                .map_err(Error::from),
                            Err(e) => Err(e),
                        },
                    };
                    ("rollback", result)
                }
                Next::Done => break,
            };
            *ms.entry(phase).or_default() += started.elapsed().as_millis() as u64;
            core.report(result.map_err(|e| e.to_string()), now_ms());
            for (scope, result) in core.take_results() {
                set_result(journal, &scope, &result);
            }
        }
        let mut phases = vec!["prepare"];
        if prepared {
            phases.extend(["switch", "verify"]);
        }
        if ms.contains_key("rollback") {
            phases.push("rollback");
        }
        for phase in phases {
            journal.record.phases.push(PhaseRecord {
                phase: phase.into(),
                duration_ms: ms.get(phase).copied().unwrap_or(0),
            });
        }
        match core.outcome() {
            (Outcome::Succeeded, _) => Ok(Succeeded {
                keep_releases: manifest.defaults.keep_releases,
            }),
            (outcome, error) => {
                if prepared {
                    // The rollback's host state (nothing changed when the
                    // prepare failed).
                    self.store
                        .put_host(core.host())
                        .map_err(|e| failed(e.to_string()))?;
                }
                Err((outcome, error.unwrap_or_default()))
            }
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
    ) -> Result<(), Error> {
        // A slotted scope's old owner serves on until the edge switches.
        if let (Action::Cutover { from }, Some(previous), false) =
            (step.action, previous, scope.slotted())
        {
            let old = self.runtime(from).await?;
            if scope.edge.is_some() {
                // Strict exclusivity, without errors: requests wait while
                // the old owner stops and the new one starts.
                old.hold_requests(scope, journal).await?;
            }
            old.act(
                Act::Stop(Keep::WayBack),
                &previous.current.members,
                scope.job_timeout,
                journal,
            )
            .await?;
        }
        let way_back = previous
            .filter(|p| p.current.owner == scope.owner)
            .and_then(|p| p.last_healthy.as_ref())
            .map(|h| h.release.as_str());
        let runtime = self.runtime(scope.owner).await?;
        Ok(runtime
            .switch(scope, release_dir, &step.release, way_back, journal)
            .await?)
    }

    async fn verify(&mut self, scope: &Scope, release_dir: &Path) -> Result<(), Error> {
        let runtime = self.runtime(scope.owner).await?;
        Ok(runtime.verify(scope, release_dir, &self.http).await?)
    }

    /// Take `members` out of service for good (a removed scope, or members
    /// a scope no longer lists), so nothing keeps running from a release
    /// that pruning may delete.
    async fn retire(
        &mut self,
        scope: &str,
        deployed: &DeployedScope,
        members: &[String],
        limit: Duration,
        journal: &mut Journal<'_>,
    ) -> Result<(), Error> {
        if members.is_empty() {
            return Ok(());
        }
        let ran_as = self.scope_from_release(&deployed.release, scope).ok();
        let runtime = self.runtime(deployed.owner).await?;
        Ok(runtime
            .act(Act::Retire(ran_as.as_ref()), members, limit, journal)
            .await?)
    }

    /// Every switched scope is healthy: drop what was kept for a way back
    /// (replaced containers, the containers of a scope cut over to native).
    async fn finish_switched(&mut self, journal: &mut Journal<'_>, switched: &[Switched]) {
        for sw in switched {
            let result = self.finish_one(journal, sw).await;
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

    /// Drop what one healthy scope kept for a way back: the old owner's
    /// stopped members after a cutover, the new owner's replaced instances.
    async fn finish_one(&mut self, journal: &mut Journal<'_>, sw: &Switched) -> Result<(), Error> {
        if let (Action::Cutover { from }, Some(_), true) =
            (sw.step.action, &sw.previous, sw.scope.slotted())
        {
            // The old owner's instance, in the slot that no longer serves,
            // drains and stops.
            self.runtime(from).await?.finish(&sw.scope, journal).await?;
        } else if let (Action::Cutover { from }, Some(previous)) = (sw.step.action, &sw.previous) {
            let old = self.runtime(from).await?;
            old.act(
                Act::FinishLeaving,
                &previous.current.members,
                sw.scope.job_timeout,
                journal,
            )
            .await?;
        }
        let runtime = self.runtime(sw.scope.owner).await?;
        Ok(runtime.finish(&sw.scope, journal).await?)
    }

    /// Check out the release if a scope needs it, run the builds, and make
    /// sure every image a docker scope will run exists.
    async fn prepare(
        &mut self,
        journal: &mut Journal<'_>,
        manifest: &Manifest,
        plan: &Plan,
    ) -> Result<(), Error> {
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
                            .map_err(task("checkout"))?
                            .map_err(Error::from)
                    },
                )
                .await?;
        }
        let mut tail = build::Tail::default();
        let mut built = BTreeMap::new();
        let mut result: Result<(), Error> = Ok(());
        for step in plan.scopes.iter() {
            let Some(scope) = manifest.scopes.get(&step.scope) else {
                continue;
            };
            if !step.action.touches() || step.action == Action::Remove {
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
                    .await
                    .map_err(Error::from);
                if let Some(s) = journal.scope_mut(&step.scope) {
                    s.built = true;
                }
                if result.is_err() {
                    break;
                }
            }
            let runtime = match self.runtime(scope.owner).await {
                Ok(runtime) => runtime,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let release_dir = self.releases_dir().join(&step.release);
            let mut on_line = |line: &str| tail.push(line.to_string());
            let prepared = runtime
                .prepare(scope, &release_dir, &step.release, journal, &mut on_line)
                .await;
            if let Err(e) = prepared {
                result = Err(e.into());
                break;
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
            releases::register(&self.store, &plan.commit, built)?;
        }
        journal.save();
        Ok(())
    }

    /// Undo one scope's switch and verify what runs again.
    async fn restore(
        &mut self,
        journal: &mut Journal<'_>,
        sw: &Switched,
        target: &DeployedScope,
        new_members: &[String],
    ) -> Result<(), Error> {
        let old = self.scope_from_release(&target.release, &sw.scope.name)?;
        let release_dir = self.releases_dir().join(&target.release);
        let runtime = self.runtime(sw.scope.owner).await?;
        if let (Action::Cutover { .. }, true) = (sw.step.action, sw.scope.slotted()) {
            // The old owner's instance still serves, or is warm in the other
            // slot: the edge goes back to it first, then the new form goes.
            let previous = self.runtime(target.owner).await?;
            previous
                .restore(
                    &old,
                    &release_dir,
                    &target.release,
                    &target.members,
                    journal,
                )
                .await?;
            runtime
                .act(Act::Discard, new_members, old.job_timeout, journal)
                .await?;
        } else if let Action::Cutover { .. } = sw.step.action {
            // Back to the old owner: nothing of the new form is a way back
            // (a kept container is left by an interrupted attempt), and the
            // old owner's members were stopped, not changed.
            runtime
                .act(Act::Discard, new_members, old.job_timeout, journal)
                .await?;
            let previous = self.runtime(target.owner).await?;
            previous
                .act(Act::Resume, &target.members, old.job_timeout, journal)
                .await?;
        } else {
            runtime
                .restore(&old, &release_dir, &target.release, new_members, journal)
                .await?;
        }
        crate::fault::point("during-rollback");
        self.verify(&old, &release_dir).await
    }

    /// The scope as the manifest inside release `commit` describes it.
    fn scope_from_release(&self, commit: &str, name: &str) -> Result<Scope, Error> {
        let path = self
            .releases_dir()
            .join(commit)
            .join(&self.config.source.manifest);
        let bytes = std::fs::read(&path).map_err(|source| Error::ReadRelease {
            path: path.clone(),
            source,
        })?;
        let manifest =
            manifest::parse(&path.display().to_string(), &bytes).map_err(Error::Manifest)?;
        manifest
            .scopes
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NoScopeInRelease {
                commit: commit.to_string(),
                scope: name.to_string(),
            })
    }

    /// Close rollouts a previous agent left in progress.
    pub fn close_interrupted(&self) -> Result<Vec<u64>, Error> {
        let mut closed = Vec::new();
        for mut record in self.store.unfinished_rollouts()? {
            record.outcome = Outcome::Interrupted;
            record.finished_at = Some(now_ms());
            record.error = Some(recover::interrupted_error(&record.journal));
            self.store.put_rollout(&record)?;
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

/// The scope `name` of this rollout with what switching or undoing it
/// needs: its plan step, its manifest section, its state before.
fn switched_of(
    core: &Core,
    manifest: &Manifest,
    name: &str,
) -> Result<Switched, (Outcome, String)> {
    let missing = || {
        let error = Error::UnknownScope {
            scope: name.to_string(),
        };
        (Outcome::Failed, error.to_string())
    };
    Ok(Switched {
        step: core.plan_step(name).ok_or_else(missing)?.clone(),
        scope: manifest.scopes.get(name).ok_or_else(missing)?.clone(),
        previous: core.previous(name).cloned(),
    })
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
