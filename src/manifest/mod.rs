//! The deploy manifest committed in the source: schema, validation with
//! `file:line:col` errors, and the per-scope fingerprint used to tell which
//! scopes a commit changes.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The bad-input corpus under tests/bad-inputs.
#[cfg(test)]
mod corpus;
/// Manifest schema walk and cross-scope checks.
mod parse;
/// Property tests: no panics, every rejection positioned.
#[cfg(test)]
mod proptests;
/// TOML reading, positions and typed table access shared with the host config.
pub(crate) mod reader;

pub use parse::parse;

/// Where a problem is: the file as the user named it, 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub file: String,
    pub line: usize,
    pub col: usize,
}

/// One problem found in a manifest or host config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file as the user named it (also in `position` when there is one).
    pub file: String,
    /// `None` only when the file could not be read at all.
    pub position: Option<Position>,
    pub message: String,
}

/// Every problem found in one file, in file order. Display prints one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.position {
            Some(p) => write!(f, "{}:{}:{}: {}", p.file, p.line, p.col, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostics {}

pub use crate::health::HealthCheck;
pub use crate::runtime::Owner;

/// A validated manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub defaults: Defaults,
    /// Scopes by name.
    pub scopes: BTreeMap<String, Scope>,
    /// Deploy order: waves of scope names; a scope comes after every scope in
    /// its `after` list. Scopes in one wave are independent of each other.
    pub waves: Vec<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Defaults {
    /// Default 60s.
    pub health_timeout: Duration,
    /// Default 5.
    pub keep_releases: usize,
    /// How long every started unit/container must stay up. Default 3s.
    pub settle: Duration,
    /// How long all build commands of one scope may take. Default 10m.
    pub build_timeout: Duration,
    /// How long one start, stop or restart of a member may take. Default 90s.
    pub job_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Scope {
    pub name: String,
    pub owner: Owner,
    pub after: Vec<String>,
    /// Repository-relative prefixes; empty means "any change".
    pub paths: Vec<String>,
    /// Shell command lines run with `sh -c` in the release directory.
    pub build: Vec<String>,
    /// The hosts (`[host] name`) that run this scope; empty: every host.
    pub hosts: Vec<String>,
    /// How a new release replaces the running one.
    pub strategy: Strategy,
    /// Which commits wait for `moorline approve` before any of them deploys.
    pub approve: Approve,
    /// The scope's route through `moorline edge`, when it has one.
    pub edge: Option<EdgeSpec>,
    /// `strategy = "canary"`: its steps and their analysis.
    pub canary: Option<CanarySpec>,
    pub native: Option<NativeSpec>,
    pub docker: Option<DockerSpec>,
    pub health: Vec<HealthCheck>,
    /// The scope's own `health_timeout`, or the default.
    pub health_timeout: Duration,
    pub settle: Duration,
    pub build_timeout: Duration,
    pub job_timeout: Duration,
    /// Canonical text of the scope's section and the defaults it inherits:
    /// equal text means an unchanged section.
    pub section_text: String,
}

impl Scope {
    /// Whether the host called `host` runs this scope.
    pub fn runs_on(&self, host: &str) -> bool {
        self.hosts.is_empty() || self.hosts.iter().any(|h| h == host)
    }

    /// Whether the scope runs in two slots behind the edge.
    pub fn slotted(&self) -> bool {
        self.strategy != Strategy::Restart
    }

    /// The unit or container names of the owning runtime's form.
    pub fn members(&self) -> Vec<String> {
        self.members_on(self.owner)
    }

    /// The unit or container names of the scope's form on `owner` (empty
    /// when it has none).
    pub fn members_on(&self, owner: Owner) -> Vec<String> {
        match owner {
            // A slotted scope's members are both slots' instances.
            Owner::Native if self.slotted() => {
                (0..2).flat_map(|slot| self.slot_members(slot)).collect()
            }
            Owner::Native => self
                .native
                .as_ref()
                .map(|n| n.units.clone())
                .unwrap_or_default(),
            Owner::Docker if self.slotted() => {
                (0..2).flat_map(|slot| self.slot_containers(slot)).collect()
            }
            Owner::Docker => self
                .docker
                .as_ref()
                .map(|d| d.containers.iter().map(|c| c.name.clone()).collect())
                .unwrap_or_default(),
        }
    }
}

impl Scope {
    /// The native instances of slot `slot` (0 or 1) of a slotted scope:
    /// `app-web@.service` → `app-web@1.service`.
    pub fn slot_members(&self, slot: u8) -> Vec<String> {
        self.native
            .as_ref()
            .map(|n| n.units.iter().map(|t| slot_instance(t, slot)).collect())
            .unwrap_or_default()
    }
}

/// The slot of a slotted scope's instance: `app-web@1.service` (a unit) or
/// `app-web-1` (a container) → 1.
pub fn slot_of(instance: &str) -> Option<u8> {
    let slot = match instance.rsplit_once('@') {
        Some((_, rest)) => rest.split_once('.')?.0,
        None => instance.rsplit_once('-')?.1,
    };
    match slot {
        "0" => Some(0),
        "1" => Some(1),
        _ => None,
    }
}

impl Scope {
    /// The containers of slot `slot` of a slotted scope: `app-web` →
    /// `app-web-1`.
    pub fn slot_containers(&self, slot: u8) -> Vec<String> {
        self.docker
            .as_ref()
            .map(|d| {
                d.containers
                    .iter()
                    .map(|c| format!("{}-{slot}", c.name))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The instance of template unit `template` for `slot`.
pub fn slot_instance(template: &str, slot: u8) -> String {
    match template.split_once("@.") {
        Some((stem, suffix)) => format!("{stem}@{slot}.{suffix}"),
        None => template.to_string(),
    }
}

/// `approve`: which changes of a scope wait for `moorline approve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Approve {
    /// Nothing waits (no `approve` key).
    #[default]
    Never,
    /// A commit that cuts the scope over to another owner.
    Cutover,
    /// Any commit that changes what the scope runs.
    Always,
}

impl Approve {
    /// Whether a step of `action` waits for approval.
    pub fn gates(self, action: crate::plan::Action) -> bool {
        use crate::plan::Action;
        match self {
            Approve::Never => false,
            Approve::Cutover => matches!(action, Action::Cutover { .. }),
            Approve::Always => matches!(action, Action::Deploy | Action::Cutover { .. }),
        }
    }
}

/// How a new release replaces the running one (`strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Stop (or restart) the running instance, start the new one.
    Restart,
    /// Start the new release in the idle slot, check it there, switch the
    /// edge to it, drain the old slot, stop it.
    BlueGreen,
    /// Like blue-green, but traffic moves to the new slot in steps, each
    /// analysed by the edge's figures of the new slot.
    Canary,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Restart => "restart",
            Strategy::BlueGreen => "blue-green",
            Strategy::Canary => "canary",
        }
    }
}

/// `[scopes.NAME.edge]`: where the edge listens for the scope and where its
/// slots' instances listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeSpec {
    pub listen: std::net::SocketAddr,
    /// Two for blue-green, one for a restart scope.
    pub slots: Vec<std::net::SocketAddr>,
    /// How long requests and WebSockets in flight keep the old slot.
    pub drain: Duration,
    /// Restart scopes: how long new requests wait while the instance restarts.
    pub hold: Duration,
}

/// `[scopes.NAME.canary]`.
#[derive(Debug, Clone, PartialEq)]
pub struct CanarySpec {
    /// Weights (1..=99) of the new slot and how long each must hold;
    /// 100 follows the last.
    pub steps: Vec<CanaryStep>,
    /// How long one analysed interval lasts. Default 10s.
    pub interval: Duration,
    /// 5xx answers and failed connections of the new slot, per interval.
    /// Default 0.01.
    pub max_error_rate: f64,
    /// The new slot's 95th percentile latency per interval, if bounded.
    pub max_p95: Option<Duration>,
    /// An interval with fewer requests is inconclusive. Default 20.
    pub min_requests: u64,
    /// Consecutive failed intervals that roll back. Default 2.
    pub failure_limit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CanaryStep {
    pub weight: u32,
    pub soak: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeSpec {
    pub units: Vec<String>,
    /// Repository-relative paths of unit files installed from the release.
    pub unit_files: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerSpec {
    pub containers: Vec<ContainerSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// Repository-relative; when set, `image` is built at each commit.
    pub dockerfile: Option<String>,
    /// Repository-relative build context, default ".".
    pub context: String,
    pub ports: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// A host path (not in the release).
    pub env_file: Option<String>,
    pub volumes: Vec<String>,
    pub command: Option<Vec<String>>,
    /// "no", "always", "unless-stopped", "on-failure"; default "unless-stopped".
    pub restart: String,
    /// An edge scope's container: the port its slot's address is published to.
    pub port: Option<u16>,
}
