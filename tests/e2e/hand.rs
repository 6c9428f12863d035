//! Operating a host by hand: a held scope is left exactly as it runs by
//! every rollout, across pushes and agent restarts, until `resume`, which
//! converges it to the branch at once.

use std::time::Duration;

use crate::harness::{Host, wait_for};
use crate::scope;

#[test]
fn a_hold_survives_pushes_and_restarts_until_resume_converges_the_scope() {
    let mut host = Host::new();
    let first = host.deployed();
    let short = &first[..7];

    let held = host.moorline(&["hold", "api", "--reason", "investigating the queue"]);
    let stdout = String::from_utf8_lossy(&held.stdout).into_owned();
    assert_eq!(held.status.code(), Some(0), "{held:?}");
    assert!(
        stdout.starts_with("scope \"api\" held (investigating the queue, by ")
            && stdout.contains(" since "),
        "{stdout}"
    );
    let invocation = host.unit_property("app-api.service", "InvocationID");

    let v2 = host.commit_and_push("api: v2", |work| {
        std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write");
    });
    host.sync();
    let rollout = host.wait_rollout(&v2);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    let api = scope(&rollout, "api");
    assert_eq!(api["action"], "held", "{api}");
    assert!(
        api["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("held (investigating the queue, by ")),
        "{api}"
    );
    assert_eq!(api["built"], false);
    assert_eq!(host.api(), Some((200, format!("ok v1 {short}\n"))));
    assert_eq!(
        host.unit_property("app-api.service", "InvocationID"),
        invocation,
        "the held unit was not restarted"
    );

    // Through a restart of the agent the hold stays, and nothing redeploys api.
    host.stop_agent();
    host.start_agent();
    let status = host.json(&["status", "--json"]);
    let api_status = status["scopes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "api"))
        .expect("api in status");
    assert!(
        api_status["held"]
            .as_str()
            .is_some_and(|h| h.starts_with("held (investigating the queue")),
        "{status:#}"
    );
    assert_eq!(host.api(), Some((200, format!("ok v1 {short}\n"))));
    let hold_record = host
        .history()
        .into_iter()
        .find(|r| r["trigger"] == "hold")
        .expect("the hold is in history");
    assert_eq!(
        scope(&hold_record, "api")["reason"],
        "investigating the queue"
    );
    // Who held it comes from the control connection's credentials.
    let id = |flag: &str| {
        let out = std::process::Command::new("id")
            .arg(flag)
            .output()
            .expect("id runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(
        hold_record["user"],
        format!("{} (uid {})", id("-un"), id("-u")).as_str(),
        "{hold_record:#}"
    );

    let resumed = host.moorline(&["resume", "api"]);
    assert_eq!(resumed.status.code(), Some(0), "{resumed:?}");
    assert_eq!(
        String::from_utf8_lossy(&resumed.stdout),
        "scope \"api\" follows the branch again; converging now\n"
    );
    let converged = wait_for("api to converge to v2", Duration::from_secs(60), || {
        host.history().into_iter().find(|r| {
            r["commit"] == v2.as_str()
                && r["outcome"] == "succeeded"
                && r["scopes"].as_array().is_some_and(|s| {
                    s.iter()
                        .any(|s| s["scope"] == "api" && s["action"] == "deploy")
                })
        })
    });
    assert_eq!(scope(&converged, "api")["built"], true);
    assert_eq!(host.api(), Some((200, format!("ok v2 {}\n", &v2[..7]))));
    // Converged: the next fetch finds nothing to do.
    host.sync();
    wait_for("the agent to be idle", Duration::from_secs(20), || {
        (host.json(&["status", "--json"])["agent"]["activity"] == "idle").then_some(())
    });
    let deploys = host
        .history()
        .iter()
        .filter(|r| r["commit"] == v2.as_str() && r["trigger"] != "resume")
        .count();
    assert_eq!(
        deploys, 2,
        "the held rollout and the one after resume (the hold was recorded at v1)"
    );
    let resume_record = host
        .history()
        .into_iter()
        .find(|r| r["trigger"] == "resume")
        .expect("the resume is in history");
    assert_eq!(scope(&resume_record, "api")["action"], "resume");
}

#[test]
fn holding_an_unknown_scope_or_without_a_reason_is_refused() {
    let mut host = Host::new();
    host.deployed();
    let unknown = host.moorline(&["hold", "nope", "--reason", "x"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&unknown.stderr),
        "error: unknown scope \"nope\"; the deployed scopes are: api, web, workers\n"
    );
    let no_reason = host.moorline(&["hold", "api"]);
    assert_eq!(no_reason.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&no_reason.stderr)
            .contains("the following required arguments were not provided:\n  --reason <TEXT>"),
        "{}",
        String::from_utf8_lossy(&no_reason.stderr)
    );
    let not_held = host.moorline(&["resume", "api"]);
    assert_eq!(not_held.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&not_held.stderr),
        "error: scope \"api\" is not held\n"
    );
}
