//! `moorline plan [REV]`: what the agent would do for a commit, without
//! doing it.

use crate::api::{self, PlanView, Request, Response};
use crate::config::Config;
use crate::rollout::Engine;
use crate::store::Store;

pub async fn run(config: &Config, rev: Option<String>, json: bool) -> u8 {
    let answer = match api::request(&config.state.dir, &Request::Plan { rev: rev.clone() }).await {
        Ok(Response::Plan(view)) => Ok(view),
        Ok(Response::Error(e)) => Err(e),
        Ok(other) => Err(format!("unexpected answer from the agent: {other:?}")),
        Err(api::ApiError::Unreachable { .. }) => offline(config, rev.as_deref()).await,
        Err(e) => Err(e.to_string()),
    };
    match answer {
        Ok(view) => {
            if json {
                super::print_json(&view);
            } else {
                super::out(&render(&view));
            }
            super::OK
        }
        Err(e) => super::fail(e),
    }
}

async fn offline(config: &Config, rev: Option<&str>) -> Result<PlanView, String> {
    crate::privacy::prepare_state_dir(&config.state.dir).map_err(|e| e.to_string())?;
    let store = Store::open(&config.state.dir).map_err(|e| e.to_string())?;
    let mut engine = Engine::new(config.clone(), store);
    // The branch after a fetch, within fetch_timeout.
    let head = match rev {
        Some(rev) => rev.to_string(),
        None => engine.fetch().await.map_err(|e| e.to_string())?,
    };
    let serving = api::serving_slots(&config.state.dir).await;
    tokio::task::spawn_blocking(move || api::plan_view(&engine, &head, &serving))
        .await
        .map_err(|e| e.to_string())?
}

pub fn render(view: &PlanView) -> String {
    let mut out = format!("plan for {}\n", view.commit);
    let width = view
        .scopes
        .iter()
        .map(|s| s.scope.len())
        .max()
        .unwrap_or(5)
        .max(5);
    for s in &view.scopes {
        let build = if s.build {
            "build".to_string()
        } else if matches!(s.action.as_str(), "unchanged" | "remove" | "skip") {
            String::new()
        } else {
            format!("reuse release {}", super::short(&s.release))
        };
        let mut slot = s.slot.map(|n| format!("; to slot {n}")).unwrap_or_default();
        if s.awaiting_approval {
            slot.push_str("; awaiting approval");
        }
        out.push_str(&format!(
            "  {:<width$}  {:<6}  {:<9}  {}{}{slot}\n",
            s.scope,
            s.owner,
            s.action,
            s.reason,
            if build.is_empty() {
                String::new()
            } else {
                format!("; {build}")
            },
        ));
    }
    if let Some(reason) = &view.refused {
        out.push_str(&format!(
            "{reason}: nothing of this commit deploys ([source.verify])\n"
        ));
    }
    if view.scopes.iter().any(|s| s.awaiting_approval) {
        out.push_str(&format!(
            "awaiting approval: nothing of this commit deploys until `moorline approve {}`\n",
            super::short(&view.commit)
        ));
    }
    out
}
