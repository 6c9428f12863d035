//! The local control channel between the CLI and the running agent: a Unix
//! socket in the state directory (mode 0600, peer uid checked), one JSON
//! request line and one JSON response line per connection. The types here
//! are the wire format and the `--json` output; stored records are converted
//! into them (times as text, outcomes as words), and sent as they are only
//! where a record has nothing but what the wire shows (a scope's step, a
//! phase).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;

use crate::store::{IntervalRecord, JournalEntry, PhaseRecord, RolloutRecord, ScopeRecord};

pub const SOCKET_NAME: &str = "agent.sock";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    History {
        scope: Option<String>,
        limit: usize,
    },
    Show {
        id: u64,
    },
    Sync,
    Plan {
        rev: Option<String>,
    },
    /// `moorline hold SCOPE --reason TEXT`. Who asked is recorded from the
    /// connection's credentials; `user` (the client's login name) is kept
    /// for older clients and not trusted.
    Hold {
        scope: String,
        reason: String,
        #[serde(default)]
        user: String,
    },
    /// `moorline resume SCOPE`.
    Resume {
        scope: String,
        #[serde(default)]
        user: String,
    },
    /// `moorline rollback SCOPE [--to ROLLOUT] --reason TEXT`.
    Rollback {
        scope: String,
        to: Option<u64>,
        reason: String,
    },
    /// `moorline restart SCOPE --reason TEXT`.
    Restart {
        scope: String,
        reason: String,
    },
    /// `moorline approve COMMIT [--scope S]`.
    Approve {
        commit: String,
        scope: Option<String>,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Status(Box<StatusReport>),
    History(Vec<RolloutView>),
    Show(Option<Box<RolloutView>>),
    Synced,
    Plan(PlanView),
    /// A hand command was carried out: what it did.
    Done(String),
    Error(String),
}

/// `moorline status --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusReport {
    pub agent: AgentView,
    /// This host's `[host] name`.
    #[serde(default)]
    pub host: String,
    pub source: SourceView,
    pub scopes: Vec<ScopeView>,
    /// Scopes of the deployed manifest that run on other hosts.
    #[serde(default)]
    pub not_on_this_host: Vec<String>,
    /// `moorline edge`, when a deployed scope is routed through it.
    #[serde(default)]
    pub edge: Option<EdgeView>,
    /// The branch's commit, when it waits for `moorline approve`.
    #[serde(default)]
    pub awaiting_approval: Option<AwaitingView>,
    /// `[[notify]]` targets: what each delivered, and why one fails.
    #[serde(default)]
    pub notify: Vec<crate::notify::TargetState>,
    pub last_rollout: Option<RolloutSummary>,
}

/// A commit that waits for `moorline approve`, and what it would do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AwaitingView {
    pub commit: String,
    pub since: String,
    /// Scope → what it would do (`cutover: owner changed from docker to native`).
    pub scopes: std::collections::BTreeMap<String, String>,
}

impl From<&crate::store::Awaiting> for AwaitingView {
    fn from(a: &crate::store::Awaiting) -> AwaitingView {
        AwaitingView {
            commit: a.commit.clone(),
            since: time_text(a.since),
            scopes: a
                .scopes
                .iter()
                .map(|(name, gated)| (name.clone(), gated.what.clone()))
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EdgeView {
    pub running: bool,
    pub pid: Option<u32>,
    /// Why it could not be asked, when it was not.
    pub error: Option<String>,
    /// By scope.
    pub routes: std::collections::BTreeMap<String, EdgeRouteView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EdgeRouteView {
    pub listen: String,
    pub listening: bool,
    /// New requests wait while the scope's one instance restarts.
    pub held: bool,
    /// The slot that takes every new request, if one does.
    pub active: Option<usize>,
    pub slots: Vec<EdgeSlotView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EdgeSlotView {
    pub slot: usize,
    pub addr: String,
    pub weight: u32,
    /// Since the edge started.
    pub requests: u64,
    pub errors: u64,
    pub inflight: u64,
}

impl From<&crate::edge::control::RouteReport> for EdgeRouteView {
    fn from(r: &crate::edge::control::RouteReport) -> EdgeRouteView {
        EdgeRouteView {
            listen: r.listen.to_string(),
            listening: r.listening,
            held: r.held,
            active: r.route().active(),
            slots: r
                .slots
                .iter()
                .enumerate()
                .map(|(slot, s)| EdgeSlotView {
                    slot,
                    addr: s.addr.to_string(),
                    weight: s.weight,
                    requests: s.figures.requests,
                    errors: s.figures.errors,
                    inflight: s.figures.inflight,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentView {
    pub running: bool,
    pub pid: Option<u32>,
    pub since: Option<String>,
    /// "idle", "fetching", "rolling out 1a2b3c4 (rollout 7)", "not running".
    pub activity: String,
    /// When the report was taken (for a snapshot read while the agent is down).
    pub reported_at: String,
    /// Why the last rollout could not start or be recorded (the history
    /// database cannot be written, ...); cleared by the next that can.
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceView {
    pub url: String,
    pub branch: String,
    pub manifest: String,
    /// The branch's commit at the last fetch.
    pub desired_commit: Option<String>,
    pub deployed_commit: Option<String>,
    /// A commit that failed and is not retried until the branch moves.
    pub failed_commit: Option<String>,
    /// Why `[source.verify]` refused the failed commit, when it did.
    #[serde(default)]
    pub refused: Option<String>,
    pub last_fetch: Option<String>,
    pub last_fetch_error: Option<String>,
    pub next_fetch: Option<String>,
    /// "active", "off", or why the watch is not working.
    pub watch: String,
    /// "off", "listening on <addr>", or why the webhook listener is not running.
    #[serde(default)]
    pub webhook: String,
    /// A wake-up that arrived during the running rollout.
    pub queued: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScopeView {
    /// `held (REASON, by USER since T)` while a hold is on.
    #[serde(default)]
    pub held: Option<String>,
    pub name: String,
    pub owner: String,
    /// Commit of the release directory the scope runs.
    pub release: String,
    /// Host commit at which the scope was last deployed.
    pub commit: String,
    /// "healthy" or "unhealthy".
    pub health: String,
    pub detail: Option<String>,
    pub members: Vec<MemberView>,
    pub rollout: u64,
    /// What the last ownership audit found and did, if anything.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemberView {
    pub name: String,
    /// A slotted scope's instance that does not serve now.
    #[serde(default)]
    pub idle: bool,
    /// e.g. "active (running)", "failed (failed)", "not-found".
    pub state: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutSummary {
    pub id: u64,
    pub commit: String,
    pub outcome: String,
    pub trigger: String,
    pub started: String,
    pub error: Option<String>,
}

/// `moorline history --json` entries and `moorline show --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RolloutView {
    pub id: u64,
    pub commit: String,
    pub previous_commit: Option<String>,
    pub trigger: String,
    pub started: String,
    /// `started` in milliseconds since the epoch (for latency measurements).
    #[serde(default)]
    pub started_ms: u64,
    pub finished: Option<String>,
    pub duration_ms: Option<u64>,
    pub outcome: String,
    /// Who asked for it by hand (`hold`, `resume`).
    pub user: Option<String>,
    /// The commit's subject line and author (`Name <email>`), when known.
    pub subject: Option<String>,
    pub author: Option<String>,
    pub error: Option<String>,
    /// Stored as they are shown: a record of one scope's step and of a
    /// phase's duration have no field that is not for the wire.
    pub scopes: Vec<ScopeRecord>,
    pub phases: Vec<PhaseRecord>,
    pub build_tail: Vec<String>,
    pub journal: Vec<JournalView>,
    /// A canary's analysed intervals, as stored.
    #[serde(default)]
    pub analysis: Vec<IntervalRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JournalView {
    pub at: String,
    pub step: String,
    pub state: String,
}

/// `moorline plan --json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlanView {
    pub commit: String,
    pub scopes: Vec<PlannedScopeView>,
    /// Why `[source.verify]` would refuse the commit: then none of it deploys.
    #[serde(default)]
    pub refused: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlannedScopeView {
    pub scope: String,
    pub owner: String,
    pub action: String,
    pub reason: String,
    pub release: String,
    pub build: bool,
    /// A blue-green or canary scope: the slot the new release goes to.
    #[serde(default)]
    pub slot: Option<u8>,
    /// The scope's `approve` gate keeps the whole commit waiting for
    /// `moorline approve`.
    #[serde(default)]
    pub awaiting_approval: bool,
}

pub fn time_text(ms: u64) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(at).to_string()
}

impl From<&RolloutRecord> for RolloutView {
    fn from(r: &RolloutRecord) -> RolloutView {
        RolloutView {
            id: r.id,
            commit: r.commit.clone(),
            previous_commit: r.previous_commit.clone(),
            trigger: r.trigger.clone(),
            started: time_text(r.started_at),
            started_ms: r.started_at,
            finished: r.finished_at.map(time_text),
            duration_ms: r.finished_at.map(|f| f.saturating_sub(r.started_at)),
            outcome: r.outcome.as_str().to_string(),
            user: r.user.clone(),
            subject: r.subject.clone(),
            author: r.author.clone(),
            error: r.error.clone(),
            scopes: r.scopes.clone(),
            phases: r.phases.clone(),
            build_tail: r.build_tail.clone(),
            journal: r.journal.iter().map(JournalView::from).collect(),
            analysis: r.analysis.clone(),
        }
    }
}

impl From<&JournalEntry> for JournalView {
    fn from(j: &JournalEntry) -> JournalView {
        JournalView {
            at: time_text(j.at),
            step: j.step.clone(),
            state: j.state.clone(),
        }
    }
}

impl From<&RolloutRecord> for RolloutSummary {
    fn from(r: &RolloutRecord) -> RolloutSummary {
        RolloutSummary {
            id: r.id,
            commit: r.commit.clone(),
            outcome: r.outcome.as_str().to_string(),
            trigger: r.trigger.clone(),
            started: time_text(r.started_at),
            error: r.error.clone(),
        }
    }
}

pub use crate::channel::ChannelError as ApiError;

/// Send one request to the agent whose state directory is `state_dir`.
pub async fn request(state_dir: &Path, request: &Request) -> Result<Response, ApiError> {
    let path = state_dir.join(SOCKET_NAME);
    crate::channel::call("agent", &path, request, Duration::from_secs(120)).await
}

/// Answers requests; implemented by the agent.
pub trait Handler: Send + Sync + 'static {
    /// Answer `request`, sent by `peer` (the agent's own uid: no other is
    /// let in).
    fn handle(
        &self,
        request: Request,
        peer: crate::channel::Peer,
    ) -> impl std::future::Future<Output = Response> + Send;
}

/// Bind the control socket: replaces a stale socket file, mode 0600.
pub fn bind(state_dir: &Path) -> Result<UnixListener, ApiError> {
    crate::channel::bind(&state_dir.join(SOCKET_NAME))
}

/// Serve until the task is dropped. Connections from another uid are closed
/// unanswered.
pub async fn serve<H: Handler>(listener: UnixListener, handler: Arc<H>) {
    crate::channel::serve(listener, move |request: Result<Request, String>, peer| {
        let handler = handler.clone();
        async move {
            match request {
                Ok(request) => handler.handle(request, peer).await,
                Err(malformed) => Response::Error(malformed),
            }
        }
    })
    .await
}

/// The plan for `rev` (default: the branch's commit after a fetch).
/// `serving` is the slot the edge serves of each slotted scope: a deploy of
/// one goes to the other.
/// The plan for `rev` (the caller fetched the branch when none was named).
pub fn plan_view(
    engine: &crate::rollout::Engine,
    rev: &str,
    serving: &std::collections::BTreeMap<String, u8>,
) -> Result<PlanView, String> {
    let commit = engine.source.resolve(rev).map_err(|e| e.to_string())?;
    let (manifest, plan) = engine.plan_for(&commit).map_err(|e| e.to_string())?;
    let mut view = PlanView::from(&plan);
    if let Some(verify) = &engine.config.source.verify {
        let deployed = engine
            .store
            .host()
            .map_err(|e| e.to_string())?
            .deployed_commit;
        view.refused =
            crate::source::verify::judge(&engine.source, verify, &commit, deployed.as_deref())
                .map_err(|e| e.to_string())?
                .err();
    }
    for (planned, step) in view.scopes.iter_mut().zip(&plan.scopes) {
        let slotted = manifest
            .scopes
            .get(&step.scope)
            .is_some_and(|s| s.slotted());
        if slotted && step.action.touches() {
            planned.slot = Some(serving.get(&step.scope).map_or(0, |s| 1 - s));
        }
    }
    Ok(view)
}

/// The slot the edge serves of each scope it routes (none when the edge is
/// not running).
pub async fn serving_slots(state_dir: &Path) -> std::collections::BTreeMap<String, u8> {
    let client = crate::edge::control::EdgeClient::new(state_dir);
    let Ok(report) = client.report().await else {
        return Default::default();
    };
    report
        .routes
        .iter()
        .filter_map(|(scope, route)| {
            let slot = u8::try_from(route.route().serving()?).ok()?;
            Some((scope.clone(), slot))
        })
        .collect()
}

impl From<&crate::plan::Plan> for PlanView {
    fn from(plan: &crate::plan::Plan) -> PlanView {
        PlanView {
            commit: plan.commit.clone(),
            scopes: plan
                .scopes
                .iter()
                .map(|s| PlannedScopeView {
                    scope: s.scope.clone(),
                    owner: s.owner.to_string(),
                    action: s.action.as_str().to_string(),
                    reason: s.reason.clone(),
                    release: s.release.clone(),
                    build: s.build,
                    slot: None,
                    awaiting_approval: s.awaiting,
                })
                .collect(),
            refused: None,
        }
    }
}
