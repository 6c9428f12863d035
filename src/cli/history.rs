//! `moorline history` and `moorline show`: past rollouts from the agent, or
//! straight from the store when the agent is not running.

use crate::api::{self, Request, Response, RolloutView};
use crate::config::Config;
use crate::store::Store;

async fn ask(config: &Config, request: Request) -> Result<Response, String> {
    match api::request(&config.state.dir, &request).await {
        Ok(Response::Error(e)) => Err(e),
        Ok(response) => Ok(response),
        Err(api::ApiError::Unreachable { .. }) => offline(config, request),
        Err(e) => Err(e.to_string()),
    }
}

/// Answer from the store directly: the agent is not holding it.
fn offline(config: &Config, request: Request) -> Result<Response, String> {
    if !config.state.dir.join("history").exists() {
        return Err(format!(
            "no history in \"{}\": the agent has never run",
            config.state.dir.display()
        ));
    }
    let store = Store::open(&config.state.dir).map_err(|e| e.to_string())?;
    match request {
        Request::History { scope, limit } => {
            let records = store
                .rollouts(scope.as_deref(), limit)
                .map_err(|e| e.to_string())?;
            Ok(Response::History(
                records.iter().map(RolloutView::from).collect(),
            ))
        }
        Request::Show { id } => {
            let record = store.rollout(id).map_err(|e| e.to_string())?;
            Ok(Response::Show(
                record.as_ref().map(|r| Box::new(RolloutView::from(r))),
            ))
        }
        _ => Err("not a history request".into()),
    }
}

pub async fn history(config: &Config, scope: Option<String>, limit: usize, json: bool) -> u8 {
    match ask(config, Request::History { scope, limit }).await {
        Ok(Response::History(views)) => {
            if json {
                super::print_json(&views);
            } else {
                super::out(&render_list(&views));
            }
            super::OK
        }
        Ok(other) => super::unexpected(&other),
        Err(e) => super::fail(e),
    }
}

pub async fn show(config: &Config, id: u64, json: bool) -> u8 {
    match ask(config, Request::Show { id }).await {
        Ok(Response::Show(Some(view))) => {
            if json {
                super::print_json(&view);
            } else {
                super::out(&render_one(&view));
            }
            super::OK
        }
        Ok(Response::Show(None)) => super::fail(format!("no rollout {id}")),
        Ok(other) => super::unexpected(&other),
        Err(e) => super::fail(e),
    }
}

pub fn render_list(views: &[RolloutView]) -> String {
    if views.is_empty() {
        return "no rollouts yet\n".to_string();
    }
    let mut out = format!(
        "{:>4}  {:<20}  {:<7}  {:<8}  {:<11}  {:<30}  SUBJECT\n",
        "ID", "STARTED", "COMMIT", "TRIGGER", "OUTCOME", "SCOPES"
    );
    for v in views {
        out.push_str(&format!(
            "{:>4}  {:<20}  {:<7}  {:<8}  {:<11}  {:<30}  {}\n",
            v.id,
            v.started,
            super::short(&v.commit),
            v.trigger,
            v.outcome,
            changed_scopes(v),
            v.subject.as_deref().unwrap_or("-")
        ));
    }
    out
}

/// The scopes a rollout did something to, with what: `web deploy, api cutover`.
fn changed_scopes(v: &RolloutView) -> String {
    let changed: Vec<String> = v
        .scopes
        .iter()
        .filter(|s| s.action != "unchanged" && s.action != "skip")
        .map(|s| format!("{} {}", s.scope, s.action))
        .collect();
    match changed.is_empty() {
        true => "-".to_string(),
        false => changed.join(", "),
    }
}

pub fn render_one(v: &RolloutView) -> String {
    let mut out = format!("rollout {}: {}\n", v.id, v.outcome);
    out.push_str(&format!("commit:    {}\n", v.commit));
    if let Some(subject) = &v.subject {
        out.push_str(&format!("subject:   {subject}\n"));
    }
    if let Some(author) = &v.author {
        out.push_str(&format!("author:    {author}\n"));
    }
    out.push_str(&format!(
        "previous:  {}\n",
        v.previous_commit.as_deref().unwrap_or("-")
    ));
    out.push_str(&format!("trigger:   {}\n", v.trigger));
    if let Some(user) = &v.user {
        out.push_str(&format!("by:        {user}\n"));
    }
    out.push_str(&format!(
        "started:   {}{}\n",
        v.started,
        v.duration_ms
            .map(|d| format!(" (took {d} ms)"))
            .unwrap_or_default()
    ));
    if let Some(e) = &v.error {
        out.push_str(&format!("error:     {e}\n"));
    }
    out.push_str("\nphases:\n");
    for p in &v.phases {
        out.push_str(&format!("  {:<9} {:>7} ms\n", p.phase, p.duration_ms));
    }
    out.push_str("\nscopes:\n");
    for s in &v.scopes {
        out.push_str(&format!(
            "  {} ({}): {} — {}{}{}\n",
            s.scope,
            s.owner,
            s.action,
            s.reason,
            s.release
                .as_deref()
                .map(|r| format!("; release {}", super::short(r)))
                .unwrap_or_default(),
            if s.built { "; built" } else { "" },
        ));
        if let Some(result) = &s.result {
            out.push_str(&format!("      result: {result}\n"));
        }
    }
    if !v.analysis.is_empty() {
        out.push_str("\ncanary analysis:\n");
        for i in &v.analysis {
            let rate = match i.requests {
                0 => 0.0,
                n => i.errors as f64 / n as f64,
            };
            out.push_str(&format!(
                "  {} {} step {} ({}%): {} req, {} err ({rate:.3}), p95 {}: {}\n",
                api::time_text(i.at),
                i.scope,
                i.step,
                i.weight,
                i.requests,
                i.errors,
                i.p95_ms.map_or("-".to_string(), |p| format!("{p:.1}ms")),
                i.verdict
            ));
        }
    }
    if !v.journal.is_empty() {
        out.push_str("\njournal:\n");
        for j in &v.journal {
            out.push_str(&format!("  {}  {:<8} {}\n", j.at, j.state, j.step));
        }
    }
    if !v.build_tail.is_empty() {
        out.push_str("\nbuild output (tail):\n");
        for line in &v.build_tail {
            out.push_str(&format!("  | {line}\n"));
        }
    }
    out
}
