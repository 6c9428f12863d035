//! `moorline hold SCOPE --reason TEXT` and `moorline resume SCOPE`: levers
//! for operating a host by hand, carried out by the running agent.

use serde::Serialize;

use crate::api::{self, Request, Response};
use crate::config::Config;

/// `--json` of a hand command.
#[derive(Serialize)]
struct Done<'a> {
    scope: &'a str,
    result: &'a str,
}

/// Who is asking: the login name, else the uid.
fn user() -> String {
    std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| rustix::process::getuid().as_raw().to_string())
}

async fn ask(config: &Config, scope: &str, request: Request, json: bool) -> u8 {
    match api::request(&config.state.dir, &request).await {
        Ok(Response::Done(result)) => {
            if json {
                super::print_json(&Done {
                    scope,
                    result: &result,
                });
            } else {
                super::out(&format!("{result}\n"));
            }
            super::OK
        }
        Ok(Response::Error(e)) => super::fail(e),
        Ok(other) => super::unexpected(&other),
        Err(api::ApiError::Unreachable { .. }) => super::fail(format!(
            "the agent is not running; start it first (its state in \"{}\" is what a hold changes)",
            config.state.dir.display()
        )),
        Err(e) => super::fail(e),
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
