//! The runtimes a scope can be owned by, and `Owner`, the one type that
//! names them. Nothing outside this module (and its submodules) matches on
//! a particular runtime: the engine, the audit, the status and the plan ask
//! the runtime of an `Owner` through `Runtime`.

/// Docker containers and images over the Engine API (bollard).
/// A canary's analysis of the new slot, step by step.
pub mod canary;
pub mod docker;
/// Slotted (blue-green) scopes on the native runtime, behind the edge.
pub mod slots;
/// systemd user units over D-Bus (zbus).
pub mod systemd;

use serde::{Deserialize, Serialize};

/// The one runtime that runs a scope: what the manifest's `owner` says, as
/// recorded in the store and shown in `--json` (lowercase).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    /// systemd user units.
    Native,
    /// Docker containers.
    Docker,
}

impl Owner {
    /// Every owner, in the order the manifest documents them.
    pub const ALL: [Owner; 2] = [Owner::Native, Owner::Docker];

    /// The manifest's spelling: `"native"`, `"docker"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Owner::Native => "native",
            Owner::Docker => "docker",
        }
    }

    pub fn parse(text: &str) -> Option<Owner> {
        Owner::ALL.into_iter().find(|o| o.as_str() == text)
    }

    /// The owners that are not this one.
    pub fn others(self) -> impl Iterator<Item = Owner> {
        Owner::ALL.into_iter().filter(move |o| *o != self)
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

use std::path::Path;
use std::time::Duration;

use crate::journal::Journal;
use crate::manifest::Scope;

/// What went wrong in a runtime, naming the unit, container, image or
/// scope; `is_transient` tells a runtime that was away from one that said no.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Systemd(#[from] systemd::SystemdError),
    #[error(transparent)]
    Docker(#[from] docker::DockerError),
    #[error("scope {scope:?} has no {owner} section")]
    NoForm { scope: String, owner: Owner },
    #[error("image {image:?} of container {container:?} does not exist locally")]
    MissingImage { image: String, container: String },
    #[error(
        "building the images of scope {scope:?} did not finish within {}",
        humantime::format_duration(*.limit)
    )]
    ImagesTimedOut { scope: String, limit: Duration },
    #[error(transparent)]
    Health(#[from] crate::health::HealthError),
    #[error(transparent)]
    Edge(crate::edge::control::ControlError),
    #[error(
        "scope {scope:?} is routed by the edge, which runs under the user manager: it cannot be reached"
    )]
    NoUserManager { scope: String },
    #[error("the canary of scope {scope:?} failed at step {step} ({weight}%): {reason}")]
    Canary {
        scope: String,
        step: usize,
        weight: u32,
        reason: String,
    },
}

impl RuntimeError {
    /// Whether trying again later may succeed with nothing changed in the
    /// manifest (the user manager or the engine was away or busy).
    pub fn is_transient(&self) -> bool {
        match self {
            RuntimeError::Systemd(e) => e.is_transient(),
            RuntimeError::Docker(e) => e.is_transient(),
            // An edge that does not answer may be starting or restarting.
            RuntimeError::Edge(e) => e.is_unreachable(),
            RuntimeError::NoForm { .. }
            | RuntimeError::Canary { .. }
            | RuntimeError::NoUserManager { .. }
            | RuntimeError::MissingImage { .. }
            | RuntimeError::ImagesTimedOut { .. }
            | RuntimeError::Health(_) => false,
        }
    }
}

/// What a stop leaves of the members it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Kept, stopped, so a rollback can start them again.
    WayBack,
    /// Nothing that could run again.
    Nothing,
}

/// What the engine does to members it names, rather than to a scope's
/// release.
#[derive(Debug, Clone, Copy)]
pub enum Act<'a> {
    /// Stop them. `Keep::WayBack` keeps them for a way back; `Keep::Nothing`
    /// leaves nothing that could run again: no container (kept ones
    /// included), units stopped (their files stay for a revert).
    Stop(Keep),
    /// Take them out of service for good (a removed scope, members a scope
    /// no longer lists): stopped, and their drop-ins and the unit files the
    /// scope as it ran (`ran_as`) installed, or their containers, removed.
    Retire(Option<&'a Scope>),
    /// Start members that were stopped and kept (undoing a cutover away).
    Resume,
    /// Undo a cutover *to* this runtime: nothing of the new form stays.
    Discard,
    /// A cutover away from this runtime passed: drop what it kept stopped
    /// for the way back (containers; stopped units stay, files and all).
    FinishLeaving,
}

/// What a runtime says of one member, for `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberState {
    /// Running as it should; the text says how.
    Up(String),
    /// Down, missing, or in a state that is not running.
    Down(String),
    /// The runtime could not be asked (its bus or engine is away).
    Unknown(String),
}

impl MemberState {
    pub fn text(&self) -> &str {
        match self {
            MemberState::Up(t) | MemberState::Down(t) | MemberState::Unknown(t) => t,
        }
    }
}

/// One connected runtime: everything the engine, the audit and the status
/// ask of the runtime that owns (or must not run) a scope. Each variant's
/// work lives in its module's `scope.rs`.
#[derive(Clone)]
pub enum Runtime {
    /// The user manager, and the edge its slotted scopes are routed by.
    Native(systemd::Systemd, slots::EdgeHandle),
    Docker {
        docker: docker::Docker,
        /// The `moorline.source` label of what it creates.
        source: String,
        /// The edge its slotted scopes are routed by.
        edge: slots::EdgeHandle,
    },
}

impl Runtime {
    /// The form a slotted scope's instances take on this runtime.
    fn form(&self) -> slots::Form<'_> {
        match self {
            Runtime::Native(sd, _) => slots::Form::Units(sd),
            Runtime::Docker { docker, source, .. } => slots::Form::Containers { docker, source },
        }
    }

    fn edge(&self) -> &slots::EdgeHandle {
        match self {
            Runtime::Native(_, edge) | Runtime::Docker { edge, .. } => edge,
        }
    }

    pub(super) fn target<'a>(
        docker: &'a docker::Docker,
        source: &str,
        scope: &'a Scope,
        release_dir: &'a Path,
        release: &'a str,
    ) -> docker::scope::Target<'a> {
        let labels = docker::Labels {
            source: source.to_string(),
            scope: scope.name.clone(),
            commit: release.to_string(),
        };
        docker::scope::Target {
            docker,
            labels,
            scope,
            release_dir,
            release,
        }
    }

    /// Make sure everything the scope's members run exists for `release`
    /// (images built from the release), build output to `on_line`.
    pub async fn prepare(
        &self,
        scope: &Scope,
        release_dir: &Path,
        release: &str,
        journal: &mut Journal<'_>,
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> Result<(), RuntimeError> {
        match self {
            Runtime::Native(..) => {}
            Runtime::Docker { docker, source, .. } => {
                let target = Self::target(docker, source, scope, release_dir, release);
                let images = docker::scope::ensure_images(&target, journal, on_line);
                tokio::time::timeout(scope.build_timeout, images)
                    .await
                    .unwrap_or_else(|_| {
                        Err(RuntimeError::ImagesTimedOut {
                            scope: scope.name.clone(),
                            limit: scope.build_timeout,
                        })
                    })?;
            }
        }
        let user_manager = match self {
            Runtime::Native(sd, _) => Some(sd),
            Runtime::Docker { edge, .. } => edge.user_manager.as_ref(),
        };
        match (&scope.edge, user_manager) {
            (None, _) => Ok(()),
            (Some(_), Some(sd)) => slots::ensure_edge(sd, self.edge(), journal).await,
            (Some(_), None) => Err(RuntimeError::NoUserManager {
                scope: scope.name.clone(),
            }),
        }
    }

    /// Bring the scope's members onto `release`. `way_back` is the release
    /// a rollback would return to on this runtime.
    pub async fn switch(
        &self,
        scope: &Scope,
        release_dir: &Path,
        release: &str,
        way_back: Option<&str>,
        journal: &mut Journal<'_>,
    ) -> Result<(), RuntimeError> {
        if scope.slotted() {
            let (form, edge) = (self.form(), self.edge());
            let http = &edge.http;
            return slots::switch(&form, edge, scope, release_dir, release, http, journal).await;
        }
        // A restart scope behind the edge restarts with its requests held.
        if scope.edge.is_some() {
            slots::hold_requests(self.edge(), scope, journal).await?;
        }
        let switched = match self {
            Runtime::Native(sd, _) => {
                systemd::scope::switch(sd, scope, release_dir, release, journal).await
            }
            Runtime::Docker { docker, source, .. } => {
                let target = Self::target(docker, source, scope, release_dir, release);
                docker::scope::replace(&target, way_back, journal).await
            }
        };
        match scope.edge {
            Some(_) => {
                slots::release_requests(self.edge(), scope, release_dir, switched, journal).await
            }
            None => switched,
        }
    }

    /// Every member stays up through the settle window (a container's
    /// image HEALTHCHECK passes too) and every health check passes, watched
    /// at once: the first definite failure (a member that went down) ends
    /// the wait.
    pub async fn verify(
        &self,
        scope: &Scope,
        release_dir: &Path,
        http: &reqwest::Client,
    ) -> Result<(), RuntimeError> {
        // A slotted scope's new slot settled before the edge switched to it.
        let members = match scope.slotted() {
            true => vec![],
            false => scope.members_on(scope.owner),
        };
        let form = self.form();
        let settle = form.settle(scope, &members);
        let health = async {
            // Once switched, an edge scope's checks go through the edge.
            let target = crate::health::Target {
                release: release_dir,
                at: scope.edge.as_ref().map(|e| e.listen),
            };
            crate::health::wait_all(&scope.health, target, scope.health_timeout, http)
                .await
                .map_err(RuntimeError::from)
        };
        tokio::try_join!(settle, health).map(drop)
    }

    /// Do `act` to the named `members`, each job bounded by `limit`.
    pub async fn act(
        &self,
        act: Act<'_>,
        members: &[String],
        limit: Duration,
        journal: &mut Journal<'_>,
    ) -> Result<(), RuntimeError> {
        match (self, act) {
            (Runtime::Native(sd, _), Act::Stop(_) | Act::Discard) => {
                systemd::scope::stop(&sd.with_job_timeout(limit), members, journal).await
            }
            (Runtime::Native(sd, edge), Act::Retire(ran_as)) => {
                let sd = sd.with_job_timeout(limit);
                systemd::scope::retire(&sd, ran_as, members, journal).await?;
                // The whole of a slotted scope: the edge stops routing it.
                match ran_as
                    .filter(|s| s.slotted() && s.members().iter().all(|m| members.contains(m)))
                {
                    Some(scope) => slots::unroute(edge, &scope.name, journal).await,
                    None => Ok(()),
                }
            }
            (Runtime::Native(sd, _), Act::Resume) => {
                systemd::scope::start(&sd.with_job_timeout(limit), members, journal).await
            }
            (Runtime::Native(..), Act::FinishLeaving) => Ok(()),
            (Runtime::Docker { docker, .. }, Act::Stop(keep)) => {
                docker::scope::stop(docker, members, keep == Keep::Nothing, journal).await
            }
            (Runtime::Docker { docker, edge, .. }, Act::Retire(ran_as)) => {
                docker::scope::stop(docker, members, true, journal).await?;
                match ran_as
                    .filter(|s| s.slotted() && s.members().iter().all(|m| members.contains(m)))
                {
                    Some(scope) => slots::unroute(edge, &scope.name, journal).await,
                    None => Ok(()),
                }
            }
            (Runtime::Docker { docker, .. }, Act::FinishLeaving) => {
                docker::scope::stop(docker, members, true, journal).await
            }
            (Runtime::Docker { docker, .. }, Act::Resume) => {
                docker::scope::start(docker, members, journal).await
            }
            (Runtime::Docker { docker, .. }, Act::Discard) => {
                docker::scope::remove_all(docker, members, journal).await
            }
        }
    }

    /// Undo `switch` on this runtime: back to `old` (the scope as release
    /// `target` describes it), bringing back the kept instances when they
    /// are of that release, else starting it afresh.
    pub async fn restore(
        &self,
        old: &Scope,
        release_dir: &Path,
        target: &str,
        new_members: &[String],
        journal: &mut Journal<'_>,
    ) -> Result<(), RuntimeError> {
        if old.slotted() {
            let (form, edge) = (self.form(), self.edge());
            let http = &edge.http;
            return slots::restore(&form, edge, old, release_dir, target, http, journal).await;
        }
        match self {
            // The units point at the old release again and restart.
            Runtime::Native(..) => self.switch(old, release_dir, target, None, journal).await,
            Runtime::Docker { docker, source, .. } => {
                let restored =
                    docker::scope::restore(docker, new_members, Some(target), true, journal)
                        .await?;
                if !restored {
                    // Nothing kept (an interrupted earlier attempt): recreate.
                    docker::scope::stop(docker, new_members, true, journal).await?;
                    let target = Self::target(docker, source, old, release_dir, target);
                    docker::scope::start_new(&target, journal).await?;
                }
                Ok(())
            }
        }
    }

    /// The scope's switch on this runtime passed: drop what was kept for a
    /// way back (replaced containers).
    pub async fn finish(
        &self,
        scope: &Scope,
        journal: &mut Journal<'_>,
    ) -> Result<(), RuntimeError> {
        if scope.slotted() {
            return slots::finish(&self.form(), self.edge(), scope, journal).await;
        }
        match self {
            Runtime::Native(..) => Ok(()),
            Runtime::Docker { docker, .. } => {
                docker::scope::drop_previous(docker, scope, journal).await
            }
        }
    }

    /// Members of the scope's form on this runtime that run now.
    pub async fn running(&self, scope: &Scope) -> Result<Vec<String>, RuntimeError> {
        match self {
            Runtime::Native(sd, _) => systemd::scope::running(sd, scope).await,
            Runtime::Docker { docker, .. } => docker::scope::running(docker, scope).await,
        }
    }

    /// Members (of the owning runtime) that are down or run another release
    /// than `release`.
    pub async fn drift(&self, scope: &Scope, release: &str) -> Result<Vec<String>, RuntimeError> {
        // An edge scope whose edge is down (after a reboot) is down too: its
        // redeployment starts the edge again.
        if scope.edge.is_some()
            && let Err(e) = self.edge().client.report().await
            && e.is_unreachable()
        {
            return Ok(vec![format!("the edge is not running ({e})")]);
        }
        if scope.slotted() {
            return slots::drift(&self.form(), self.edge(), scope, release).await;
        }
        match self {
            Runtime::Native(sd, _) => systemd::scope::drift(sd, scope, release).await,
            Runtime::Docker { docker, .. } => docker::scope::drift(docker, scope, release).await,
        }
    }

    /// Hold the new requests of a restart scope behind the edge (a cutover
    /// stops its old owner first).
    pub async fn hold_requests(
        &self,
        scope: &Scope,
        journal: &mut Journal<'_>,
    ) -> Result<(), RuntimeError> {
        slots::hold_requests(self.edge(), scope, journal).await
    }

    /// Members of a slotted scope's slot that the edge does not serve and
    /// that still run (a drain cut short).
    pub async fn idle(&self, scope: &Scope) -> Result<Vec<String>, RuntimeError> {
        match scope.slotted() {
            true => slots::idle(&self.form(), self.edge(), scope).await,
            false => Ok(vec![]),
        }
    }

    pub async fn member_state(&self, member: &str) -> MemberState {
        match self {
            Runtime::Native(sd, _) => systemd::scope::member_state(sd, member).await,
            Runtime::Docker { docker, .. } => docker::scope::member_state(docker, member).await,
        }
    }
}

/// The runtimes of one agent, connected on first use and reconnected when
/// a connection broke.
pub struct Runtimes {
    edge: slots::EdgeHandle,
    docker_host: String,
    source: String,
    systemd: Option<systemd::Systemd>,
    docker: Option<docker::Docker>,
}

impl Runtimes {
    pub fn new(docker_host: &str, source: &str, edge: slots::EdgeHandle) -> Runtimes {
        Runtimes {
            edge,
            docker_host: docker_host.to_string(),
            source: source.to_string(),
            systemd: None,
            docker: None,
        }
    }

    /// The runtime of `owner`, connecting to it if needed.
    pub async fn get(&mut self, owner: Owner) -> Result<Runtime, RuntimeError> {
        match owner {
            Owner::Native => {
                if self.systemd.is_none() {
                    let sd = systemd::Systemd::connect().await?;
                    self.systemd = Some(sd);
                }
                let sd = self.systemd.clone().expect("connected just above");
                Ok(Runtime::Native(sd, self.edge.clone()))
            }
            Owner::Docker => {
                if self.docker.is_none() {
                    let dk = docker::Docker::connect(&self.docker_host)?;
                    self.docker = Some(dk);
                }
                let docker = self.docker.clone().expect("connected just above");
                // The edge of the docker form's slotted scopes is a user unit.
                if self.systemd.is_none() {
                    self.systemd = systemd::Systemd::connect().await.ok();
                }
                let mut edge = self.edge.clone();
                edge.user_manager = self.systemd.clone();
                Ok(Runtime::Docker {
                    docker,
                    source: self.source.clone(),
                    edge,
                })
            }
        }
    }

    /// Drop a connection that no longer works (the user manager restarted),
    /// so the next use connects afresh.
    pub async fn check(&mut self) {
        if let Some(sd) = &self.systemd
            && let Err(e) = sd.unit_state("-.slice").await
            && e.is_transient()
        {
            tracing::warn!(error = %e, "the user manager connection broke; reconnecting");
            self.systemd = None;
        }
    }

    /// Forget a connection after a transient failure (used by `status`).
    pub fn forget(&mut self, owner: Owner) {
        match owner {
            Owner::Native => self.systemd = None,
            Owner::Docker => self.docker = None,
        }
    }
}
