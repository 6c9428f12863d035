//! `moorline hold`, `resume`, `rollback`, `restart` and `approve`: levers
//! for operating a host by hand, carried out by the running agent. A
//! rollback or a restart is a rollout: the command waits for it and exits
//! as it ended (0 succeeded, 1 otherwise).

use std::time::Duration;

use serde::Serialize;

use crate::api::{self, Request, Response, RolloutView};
use crate::config::Config;

/// `--json` of a hand command.
#[derive(Serialize)]
struct Done<'a> {
    scope: &'a str,
    result: &'a str,
    /// The rollout it ran (`rollback`, `restart`).
    #[serde(skip_serializing_if = "Option::is_none")]
    rollout: Option<Rollout<'a>>,
}

#[derive(Serialize)]
struct Rollout<'a> {
    id: u64,
    outcome: &'a str,
    error: Option<&'a str>,
}

/// How often a command that waits for its rollout asks how it goes.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// Who is asking: the login name, else the uid (older agents record it;
/// newer ones take the connection's credentials).
fn user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| rustix::process::getuid().as_raw().to_string())
}

/// Send `request`; the agent's answer text, or the exit code of a failure.
async fn send(config: &Config, request: &Request) -> Result<String, u8> {
    match api::request(&config.state.dir, request).await {
        Ok(Response::Done(result)) => Ok(result),
        Ok(Response::Error(e)) => Err(super::fail(e)),
        Ok(other) => Err(super::unexpected(&other)),
        Err(api::ApiError::Unreachable { .. }) => Err(super::fail(format!(
            "the agent is not running; start it first (its state in \"{}\" is what this command changes)",
            config.state.dir.display()
        ))),
        Err(e) => Err(super::fail(e)),
    }
}

/// Print what was done.
fn report(scope: &str, result: &str, rollout: Option<&RolloutView>, json: bool) {
    if json {
        super::print_json(&Done {
            scope,
            result,
            rollout: rollout.map(|r| Rollout {
                id: r.id,
                outcome: &r.outcome,
                error: r.error.as_deref(),
            }),
        });
        return;
    }
    super::out(&format!("{result}\n"));
    if let Some(r) = rollout {
        super::out(&outcome_line(r));
    }
}

/// `rollout N succeeded`, or `rollout N rolled-back: why`.
fn outcome_line(r: &RolloutView) -> String {
    match &r.error {
        Some(e) => format!("rollout {} {}: {e}\n", r.id, r.outcome),
        None => format!("rollout {} {}\n", r.id, r.outcome),
    }
}

async fn ask(config: &Config, scope: &str, request: Request, json: bool) -> u8 {
    match send(config, &request).await {
        Ok(result) => {
            report(scope, &result, None, json);
            super::OK
        }
        Err(code) => code,
    }
}

/// Send a request that the agent carries out as a rollout with `trigger`,
/// then wait for that rollout to end.
async fn roll(config: &Config, scope: &str, trigger: &str, request: Request, json: bool) -> u8 {
    let newest = |records: &[RolloutView]| records.first().map_or(0, |r| r.id);
    let history = Request::History {
        scope: None,
        limit: 1,
    };
    let before = match api::request(&config.state.dir, &history).await {
        Ok(Response::History(records)) => newest(&records),
        _ => 0,
    };
    let result = match send(config, &request).await {
        Ok(result) => result,
        Err(code) => return code,
    };
    if !json {
        super::out(&format!("{result}\n"));
    }
    let mine = Request::History {
        scope: Some(scope.to_string()),
        limit: 20,
    };
    loop {
        match api::request(&config.state.dir, &mine).await {
            Ok(Response::History(records)) => {
                let done = records
                    .iter()
                    .find(|r| r.id > before && r.trigger == trigger && r.finished.is_some());
                if let Some(r) = done {
                    if json {
                        report(scope, &result, Some(r), true);
                    } else {
                        super::out(&outcome_line(r));
                    }
                    return if r.outcome == "succeeded" {
                        super::OK
                    } else {
                        super::NEGATIVE
                    };
                }
            }
            Ok(Response::Error(e)) => return super::fail(e),
            Ok(other) => return super::unexpected(&other),
            Err(e) => {
                return super::fail(format!(
                    "lost the agent while waiting for the {trigger} ({e}); it is carried out when the agent runs again"
                ));
            }
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

pub async fn hold(config: &Config, scope: &str, reason: &str, json: bool) -> u8 {
    let request = Request::Hold {
        scope: scope.to_string(),
        reason: reason.to_string(),
        user: user(),
    };
    ask(config, scope, request, json).await
}

pub async fn resume(config: &Config, scope: &str, json: bool) -> u8 {
    let request = Request::Resume {
        scope: scope.to_string(),
        user: user(),
    };
    ask(config, scope, request, json).await
}

pub async fn rollback(
    config: &Config,
    scope: &str,
    to: Option<u64>,
    reason: &str,
    json: bool,
) -> u8 {
    let request = Request::Rollback {
        scope: scope.to_string(),
        to,
        reason: reason.to_string(),
    };
    roll(config, scope, "rollback", request, json).await
}

pub async fn restart(config: &Config, scope: &str, reason: &str, json: bool) -> u8 {
    let request = Request::Restart {
        scope: scope.to_string(),
        reason: reason.to_string(),
    };
    roll(config, scope, "restart", request, json).await
}

pub async fn approve(config: &Config, commit: &str, scope: Option<&str>, json: bool) -> u8 {
    let request = Request::Approve {
        commit: commit.to_string(),
        scope: scope.map(str::to_string),
    };
    ask(config, scope.unwrap_or(commit), request, json).await
}
