//! `moorline status`: source, desired vs deployed commit, each scope's owner,
//! release, health and the last rollout — from the agent, or from its
//! snapshot when it is not running.

use crate::api::{self, Request, Response, StatusReport};
use crate::config::Config;

pub async fn run(config: &Config, json: bool) -> u8 {
    let report = match api::request(&config.state.dir, &Request::Status).await {
        Ok(Response::Status(report)) => *report,
        Ok(other) => return super::unexpected(&other),
        Err(api::ApiError::Unreachable { .. }) => {
            match crate::agent::snapshot::read(&config.state.dir) {
                Some(report) => report,
                None => {
                    return super::fail(format!(
                        "the agent is not running and has left no status snapshot in \"{}\"",
                        config.state.dir.display()
                    ));
                }
            }
        }
        Err(e) => return super::fail(e),
    };
    if json {
        super::print_json(&report);
    } else {
        super::out(&render(&report));
    }
    if is_negative(&report) {
        super::NEGATIVE
    } else {
        super::OK
    }
}

/// Something unhealthy, or the branch's commit failed to deploy.
pub fn is_negative(report: &StatusReport) -> bool {
    report.scopes.iter().any(|s| s.health != "healthy")
        || report.source.failed_commit.is_some()
        || report.agent.error.is_some()
}

pub fn render(r: &StatusReport) -> String {
    let mut out = String::new();
    let agent = if r.agent.running {
        format!(
            "running (pid {}, since {}): {}",
            r.agent.pid.unwrap_or_default(),
            r.agent.since.as_deref().unwrap_or("-"),
            r.agent.activity
        )
    } else {
        format!("not running (last snapshot {})", r.agent.reported_at)
    };
    out.push_str(&format!("agent:     {agent}\n"));
    if !r.host.is_empty() {
        out.push_str(&format!("host:      {}\n", r.host));
    }
    if let Some(error) = &r.agent.error {
        out.push_str(&format!("error:     {error}\n"));
    }
    out.push_str(&format!(
        "source:    {} branch {} (manifest {})\n",
        r.source.url, r.source.branch, r.source.manifest
    ));
    out.push_str(&format!(
        "commit:    desired {}, deployed {}\n",
        super::short_opt(&r.source.desired_commit),
        super::short_opt(&r.source.deployed_commit)
    ));
    match (&r.source.failed_commit, &r.source.refused) {
        (Some(_), Some(reason)) => out.push_str(&format!(
            "refused:   {reason}; not retried until the branch moves on\n"
        )),
        (Some(failed), None) => out.push_str(&format!(
            "failed:    {} is not retried until the branch moves on\n",
            super::short(failed)
        )),
        (None, _) => {}
    }
    let fetch = match (&r.source.last_fetch, &r.source.last_fetch_error) {
        (_, Some(e)) => format!("failed: {e}"),
        (Some(at), None) => format!("ok at {at}"),
        (None, None) => "none yet".to_string(),
    };
    out.push_str(&format!(
        "fetch:     {fetch}; next {}; watch {}\n",
        r.source.next_fetch.as_deref().unwrap_or("-"),
        r.source.watch
    ));
    if r.source.webhook != "off" && !r.source.webhook.is_empty() {
        out.push_str(&format!("webhook:   {}\n", r.source.webhook));
    }
    if let Some(queued) = &r.source.queued {
        out.push_str(&format!("queued:    {queued}\n"));
    }
    if let Some(awaiting) = &r.awaiting_approval {
        out.push_str(&format!(
            "awaiting approval: {} since {} (moorline approve {})\n",
            super::short(&awaiting.commit),
            awaiting.since,
            super::short(&awaiting.commit)
        ));
        for (scope, what) in &awaiting.scopes {
            out.push_str(&format!("  {scope}: {what}\n"));
        }
    }
    for target in &r.notify {
        let state = match &target.failing {
            Some(why) => format!("failing: {why}"),
            None => "ok".to_string(),
        };
        out.push_str(&format!(
            "notify:    {} {state} ({} delivered, {} failed)\n",
            target.name, target.delivered, target.failed
        ));
    }
    if !r.not_on_this_host.is_empty() {
        out.push_str(&format!(
            "elsewhere: {} (not on this host)\n",
            r.not_on_this_host.join(", ")
        ));
    }
    if let Some(edge) = &r.edge {
        out.push_str(&edge_lines(edge));
    }
    if let Some(last) = &r.last_rollout {
        out.push_str(&format!(
            "last:      rollout {} of {} {} ({}, {}){}\n",
            last.id,
            super::short(&last.commit),
            last.outcome,
            last.trigger,
            last.started,
            last.error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    out.push('\n');
    if r.scopes.is_empty() {
        out.push_str("no scope deployed yet\n");
        return out;
    }
    let width = r
        .scopes
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    out.push_str(&format!(
        "{:<width$}  {:<6}  {:<7}  {:<9}  MEMBERS\n",
        "SCOPE", "OWNER", "RELEASE", "HEALTH"
    ));
    for s in &r.scopes {
        let members: Vec<String> = s
            .members
            .iter()
            .map(|m| match m.idle {
                true => format!("{} idle", m.name),
                false => format!("{} {}", m.name, m.state),
            })
            .collect();
        let release = super::short(&s.release);
        out.push_str(&format!(
            "{:<width$}  {:<6}  {:<7}  {:<9}  {}\n",
            s.name,
            s.owner,
            release,
            s.health,
            members.join(", ")
        ));
        if let Some(held) = &s.held {
            out.push_str(&format!("{:<width$}  = {held}\n", ""));
        }
        if let Some(detail) = &s.detail {
            out.push_str(&format!("{:<width$}  ! {detail}\n", ""));
        }
        if let Some(problem) = &s.problem {
            out.push_str(&format!("{:<width$}  ! {problem}\n", ""));
        }
    }
    out
}

/// `edge:`, a line per route (where it listens, which slot serves, or the
/// weights of a canary's split) and a line per slot with its figures.
fn edge_lines(edge: &api::EdgeView) -> String {
    let mut out = match (edge.running, &edge.error) {
        (true, _) => format!(
            "edge:      running (pid {})\n",
            edge.pid.map_or("-".to_string(), |p| p.to_string())
        ),
        (false, Some(e)) => format!("edge:      not running: {e}\n"),
        (false, None) => "edge:      not running\n".to_string(),
    };
    for (scope, route) in &edge.routes {
        let serving = match (route.active, route.held) {
            (_, true) => "new requests held".to_string(),
            (Some(slot), false) => format!("slot {slot}"),
            (None, false) => route
                .slots
                .iter()
                .map(|s| format!("slot {} {}%", s.slot, s.weight))
                .collect::<Vec<_>>()
                .join(" / "),
        };
        let listening = if route.listening {
            ""
        } else {
            " (not listening)"
        };
        out.push_str(&format!(
            "  {scope}: {}{listening} -> {serving}\n",
            route.listen
        ));
        for s in &route.slots {
            out.push_str(&format!(
                "    slot {} {:<21} weight {:>3}  requests {}, errors {}, in flight {}\n",
                s.slot, s.addr, s.weight, s.requests, s.errors, s.inflight
            ));
        }
    }
    out
}
