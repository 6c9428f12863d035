//! The live status: what the loop knows that the store does not (`Live`),
//! and the report `moorline status` shows, with every member's state asked
//! of its runtime.

use crate::api::{
    self, AgentView, MemberView, RolloutSummary, ScopeView, SourceView, StatusReport,
};
use crate::config::Config;
use crate::runtime::MemberState;
use crate::source::Wake;
use crate::store::now_ms;

use super::Agent;

/// What the loop knows that the store does not.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub since: u64,
    pub activity: String,
    pub desired: Option<String>,
    pub last_fetch: Option<u64>,
    pub last_fetch_error: Option<String>,
    pub next_fetch: Option<u64>,
    /// A wake-up that arrived during the running rollout.
    pub queued: Option<String>,
    /// Why the last turn could not converge (e.g. the store refuses writes).
    pub last_error: Option<String>,
}

/// What `status` shows for the wake-ups that arrived during a rollout: the
/// first, and how many more were folded into it.
pub fn queued_text(wake: &Wake, at_ms: u64, more: u32) -> String {
    let first = format!("{} wake-up at {}", wake.name(), api::time_text(at_ms));
    match more {
        0 => first,
        n => format!("{first} (and {n} more, coalesced)"),
    }
}

impl Agent {
    /// The status as the agent sees it now, with live member states.
    pub(super) async fn status(&self) -> StatusReport {
        let live = self.live();
        let host = self.store.host().unwrap_or_default();
        let last = self.store.rollouts(None, 1).ok().and_then(|mut v| v.pop());
        let hand = self.store.hand().unwrap_or_default();
        let edge = self.edge_view(&host).await;
        let mut runtimes = self.runtimes.lock().await;
        let mut scopes = Vec::new();
        for (name, state) in &host.scopes {
            let mut members = Vec::new();
            let mut problems = Vec::new();
            // Members whose runtime could not be asked: neither up nor down.
            let mut unknown = Vec::new();
            let owner = state.current.owner;
            let runtime = runtimes.get(owner).await;
            // A routed scope's instances of the slot that does not serve.
            let serving = edge
                .as_ref()
                .and_then(|e| e.routes.get(name))
                .and_then(|r| r.active);
            for member in &state.current.members {
                let member_state = match &runtime {
                    Ok(runtime) => runtime.member_state(member).await,
                    Err(e) => MemberState::Unknown(format!("unknown: {e}")),
                };
                let idle = serving.is_some_and(|slot| {
                    crate::manifest::slot_of(member).is_some_and(|s| usize::from(s) != slot)
                });
                match &member_state {
                    _ if idle => {}
                    MemberState::Up(_) => {}
                    MemberState::Down(text) => problems.push(format!("{member} is {text}")),
                    MemberState::Unknown(_) => unknown.push(member.clone()),
                }
                members.push(MemberView {
                    idle,
                    name: member.clone(),
                    state: member_state.text().to_string(),
                });
            }
            if !unknown.is_empty() {
                // A broken connection is made again at the next status.
                runtimes.forget(owner);
            }
            let (health, detail) = if !state.healthy {
                (
                    "unhealthy",
                    Some("the last rollout of this scope did not pass verification".to_string()),
                )
            } else if !problems.is_empty() {
                ("unhealthy", Some(problems.join("; ")))
            } else if !unknown.is_empty() {
                (
                    "unknown",
                    Some(format!(
                        "cannot ask the runtime about {}",
                        unknown.join(", ")
                    )),
                )
            } else {
                ("healthy", None)
            };
            scopes.push(ScopeView {
                held: hand.holds.get(name).map(|h| h.describe()),
                name: name.clone(),
                owner: state.current.owner.to_string(),
                release: state.current.release.clone(),
                commit: state.current.commit.clone(),
                health: health.to_string(),
                detail,
                members,
                rollout: state.current.rollout,
                problem: state.problem.clone(),
            });
        }
        StatusReport {
            agent: AgentView {
                running: true,
                pid: Some(std::process::id()),
                since: Some(api::time_text(live.since)),
                activity: live.activity.clone(),
                reported_at: api::time_text(now_ms()),
                error: live.last_error.clone(),
            },
            host: self.config.host.name.clone(),
            source: SourceView {
                url: source_text(&self.config),
                branch: self.config.source.branch.clone(),
                manifest: self.config.source.manifest.clone(),
                desired_commit: live.desired.clone(),
                deployed_commit: host.deployed_commit.clone(),
                failed_commit: host.failed_commit.clone(),
                refused: self.refusal_of(host.failed_commit.as_deref()),
                last_fetch: live.last_fetch.map(api::time_text),
                last_fetch_error: live.last_fetch_error.clone(),
                next_fetch: live.next_fetch.map(api::time_text),
                watch: self.trigger_state("watch"),
                webhook: self.trigger_state("webhook"),
                queued: live.queued.clone(),
            },
            scopes,
            not_on_this_host: host.elsewhere.clone(),
            edge,
            awaiting_approval: hand.awaiting.as_ref().map(api::AwaitingView::from),
            notify: self.notifier.states(),
            last_rollout: last.as_ref().map(RolloutSummary::from),
        }
    }
}

impl Agent {
    /// Why the failed commit was refused, when `[source.verify]` refused it.
    fn refusal_of(&self, failed: Option<&str>) -> Option<String> {
        let failed = failed?;
        let recent = self.store.rollouts(None, 20).ok()?;
        let record = recent.iter().find(|r| r.commit == failed)?;
        (record.outcome == crate::store::Outcome::Refused)
            .then(|| record.error.clone())
            .flatten()
    }

    /// The edge as it answers, when a deployed scope is slotted or the edge
    /// runs at all.
    async fn edge_view(&self, host: &crate::store::HostState) -> Option<api::EdgeView> {
        let client = crate::edge::control::EdgeClient::new(&self.config.state.dir);
        let routed = host.scopes.values().any(|s| {
            s.current
                .members
                .iter()
                .any(|m| crate::manifest::slot_of(m).is_some())
        });
        match client.report().await {
            Ok(report) => Some(api::EdgeView {
                running: true,
                pid: Some(report.pid),
                error: None,
                routes: report
                    .routes
                    .iter()
                    .map(|(scope, route)| (scope.clone(), api::EdgeRouteView::from(route)))
                    .collect(),
            }),
            Err(e) if routed => Some(api::EdgeView {
                running: false,
                pid: None,
                error: Some(e.to_string()),
                routes: Default::default(),
            }),
            Err(_) => None,
        }
    }
}

pub fn source_text(config: &Config) -> String {
    match &config.source.url {
        crate::config::SourceUrl::Local(p) => p.display().to_string(),
        crate::config::SourceUrl::Remote(u) => u.clone(),
    }
}
