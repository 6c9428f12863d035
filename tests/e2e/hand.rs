//! Operating a host by hand: a held scope is left exactly as it runs by
//! every rollout, across pushes and agent restarts, until `resume`, which
//! converges it to the branch at once; a rollback by hand goes back without
//! git or a build and holds the scope there; a restart restarts members on
//! their release; an `approve` gate keeps a whole commit waiting.

use std::time::Duration;

use serde_json::Value;

use crate::harness::{Host, set_owner, wait_for};
use crate::scope;

/// `name (uid N)` of the user running the tests, as the agent records it.
fn me() -> String {
    let id = |flag: &str| {
        let out = std::process::Command::new("id")
            .arg(flag)
            .output()
            .expect("id runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    format!("{} (uid {})", id("-un"), id("-u"))
}

/// The newest rollout with this trigger.
fn newest(host: &Host, trigger: &str) -> Value {
    host.history()
        .into_iter()
        .find(|r| r["trigger"] == trigger)
        .unwrap_or_else(|| panic!("a {trigger} rollout in history"))
}

/// `status --json`'s entry of scope `name`.
fn scope_status(host: &Host, name: &str) -> Value {
    let status = host.json(&["status", "--json"]);
    status["scopes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("{name} in status: {status:#}"))
}

fn api_version(version: &str) -> impl FnOnce(&std::path::Path) + '_ {
    move |work| {
        std::fs::write(work.join("services/api/VERSION"), format!("{version}\n")).expect("write")
    }
}

/// A host that deployed v1, then v2 of api: the two commits.
fn v2_after_v1(host: &mut Host) -> (String, String) {
    let v1 = host.deployed();
    let v2 = host.commit_and_push("api: v2", api_version("v2"));
    host.sync();
    assert_eq!(host.wait_rollout(&v2)["outcome"], "succeeded");
    (v1, v2)
}

#[test]
fn a_hand_rollback_stays_under_a_later_push_until_resume_converges_to_the_branch() {
    let mut host = Host::new();
    let (v1, v2) = v2_after_v1(&mut host);
    let deployed_v1 = host
        .history()
        .into_iter()
        .find(|r| r["commit"] == v1.as_str())
        .expect("the first rollout");
    assert_eq!(host.api(), Some((200, format!("ok v2 {}\n", &v2[..7]))));
    let builds = host.builds().len();

    let back = host.moorline(&["rollback", "api", "--reason", "v2 leaks memory"]);
    let stdout = String::from_utf8_lossy(&back.stdout).into_owned();
    assert_eq!(back.status.code(), Some(0), "{back:?}");
    let rollout = newest(&host, "rollback");
    assert_eq!(
        stdout,
        format!(
            "rolling back scope \"api\" to release {} (native, from rollout {}); it stays held there until `moorline resume api`\nrollout {} succeeded\n",
            &v1[..7],
            deployed_v1["id"],
            rollout["id"]
        )
    );
    // No git, no build: the v1 release as it was built.
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &v1[..7]))));
    assert_eq!(host.builds().len(), builds, "{:?}", host.builds());
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(rollout["user"], me().as_str());
    let api = scope(&rollout, "api");
    assert_eq!(api["action"], "deploy");
    assert_eq!(api["release"], v1.as_str());
    assert_eq!(api["built"], false);
    assert_eq!(
        api["reason"],
        format!("rollback by hand to release {}: v2 leaks memory", &v1[..7]).as_str()
    );
    assert_eq!(scope(&rollout, "web")["action"], "unchanged");
    let shown = host.json(&["show", &rollout["id"].to_string(), "--json"]);
    assert_eq!(shown["trigger"], "rollback");
    let held = scope_status(&host, "api");
    assert!(
        held["held"]
            .as_str()
            .is_some_and(|h| h.starts_with(&format!(
                "held at release {} (v2 leaks memory, by {} since ",
                &v1[..7],
                me()
            ))),
        "{held:#}"
    );
    assert_eq!(held["release"], v1.as_str());

    // A later push that changes api leaves the rollback in place.
    let v3 = host.commit_and_push("api: v3", api_version("v3"));
    host.sync();
    let later = host.wait_rollout(&v3);
    assert_eq!(later["outcome"], "succeeded", "{later:#}");
    assert_eq!(scope(&later, "api")["action"], "held");
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &v1[..7]))));
    let plan = host.moorline(&["plan"]);
    let plan = String::from_utf8_lossy(&plan.stdout).into_owned();
    assert!(
        plan.lines().any(|l| l.starts_with("  api ")
            && l.contains(&format!("held at release {} (v2 leaks memory", &v1[..7]))),
        "{plan}"
    );

    let resumed = host.moorline(&["resume", "api"]);
    assert_eq!(resumed.status.code(), Some(0), "{resumed:?}");
    wait_for("api to converge to v3", Duration::from_secs(60), || {
        (host.api() == Some((200, format!("ok v3 {}\n", &v3[..7])))).then_some(())
    });
    let converged = newest(&host, "resume");
    assert_eq!(converged["commit"], v3.as_str());
    assert!(scope_status(&host, "api")["held"].is_null());
}

#[test]
fn a_rollback_with_no_way_back_an_unknown_scope_or_no_reason_is_refused() {
    let mut host = Host::new();
    let v1 = host.deployed();
    let refused = |args: &[&str], message: String| {
        let out = host.moorline(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), message, "{args:?}");
    };
    refused(
        &["rollback", "api", "--reason", "bad deploy"],
        format!(
            "error: scope \"api\" has no previous healthy release to roll back to (it runs release {})\n",
            &v1[..7]
        ),
    );
    refused(
        &["rollback", "nope", "--reason", "bad deploy"],
        "error: unknown scope \"nope\"; the deployed scopes are: api, web, workers\n".into(),
    );
    refused(
        &["rollback", "api", "--to", "99", "--reason", "bad deploy"],
        "error: rollout 99 is not in the history\n".into(),
    );
    refused(
        &["rollback", "api", "--to", "1", "--reason", "bad deploy"],
        format!(
            "error: scope \"api\" already runs release {} (rollout 1); to keep it there, use `moorline hold api`\n",
            &v1[..7]
        ),
    );
    refused(
        &["rollback", "api", "--reason", " "],
        "error: a rollback needs a reason: --reason TEXT\n".into(),
    );
    let no_reason = host.moorline(&["rollback", "api"]);
    assert_eq!(no_reason.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&no_reason.stderr)
            .contains("the following required arguments were not provided:\n  --reason <TEXT>"),
        "{no_reason:?}"
    );
    // Nothing was held, nothing rolled out.
    assert!(scope_status(&host, "api")["held"].is_null());
    assert_eq!(host.history().len(), 1);
}

#[test]
fn a_restart_restarts_the_members_on_their_release_and_verifies_them() {
    let mut host = Host::new();
    let v1 = host.deployed();
    let before = host.unit_property("app-api.service", "InvocationID");
    let web = host.unit_property("app-web.service", "InvocationID");
    let builds = host.builds().len();
    let out = host.moorline(&[
        "restart",
        "api",
        "--reason",
        "rotated the env file",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let done: Value = serde_json::from_slice(&out.stdout).expect("--json");
    assert_eq!(done["scope"], "api");
    assert_eq!(
        done["result"],
        format!("restarting scope \"api\" on release {}", &v1[..7]).as_str()
    );
    assert_eq!(done["rollout"]["outcome"], "succeeded", "{done:#}");
    assert_ne!(
        host.unit_property("app-api.service", "InvocationID"),
        before
    );
    assert_eq!(host.unit_property("app-web.service", "InvocationID"), web);
    assert_eq!(host.builds().len(), builds);
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &v1[..7]))));
    let rollout = newest(&host, "restart");
    assert_eq!(rollout["id"], done["rollout"]["id"]);
    assert_eq!(rollout["user"], me().as_str());
    let api = scope(&rollout, "api");
    assert_eq!(api["action"], "deploy");
    assert_eq!(api["reason"], "restart by hand: rotated the env file");
    assert_eq!(api["result"], "healthy");
    // A restart is not a hold: the scope follows the branch.
    assert!(scope_status(&host, "api")["held"].is_null());
}

#[test]
fn approve_cutover_keeps_a_cutover_commit_waiting_until_approved() {
    let mut host = Host::with(|work| {
        let path = work.join("deploy/moorline.toml");
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let gated = text.replace(
            "[scopes.api]\nowner = \"native\"\n",
            "[scopes.api]\nowner = \"native\"\napprove = \"cutover\"\n",
        );
        std::fs::write(&path, gated).expect("write manifest");
    });
    let v1 = host.deployed();
    let api = host.unit_property("app-api.service", "InvocationID");
    let web = host.unit_property("app-web.service", "InvocationID");
    // A commit that cuts api over and changes web: none of it deploys.
    let cut = host.commit_and_push("api to docker, web v2", |work| {
        set_owner(work, "api", "docker");
        std::fs::write(work.join("services/web/www/index.html"), "<p>web v2</p>\n").expect("write");
    });
    host.sync();
    let awaiting = wait_for(
        "the commit to await approval",
        Duration::from_secs(60),
        || {
            let status = host.json(&["status", "--json"]);
            let waiting = status["awaiting_approval"].clone();
            (!waiting.is_null() && status["agent"]["activity"] == "idle").then_some(waiting)
        },
    );
    assert_eq!(awaiting["commit"], cut.as_str());
    assert_eq!(
        awaiting["scopes"]["api"],
        "cutover: owner changed from native to docker"
    );
    assert!(awaiting["scopes"]["web"].is_null(), "{awaiting:#}");
    let text = String::from_utf8_lossy(&host.moorline(&["status"]).stdout).into_owned();
    assert!(
        text.contains(&format!("awaiting approval: {} since ", &cut[..7]))
            && text.contains("  api: cutover: owner changed from native to docker\n"),
        "{text}"
    );
    let plan = host.json(&["plan", "--json"]);
    let planned = |name: &str| {
        plan["scopes"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["scope"] == name))
            .cloned()
            .expect("scope in plan")
    };
    assert_eq!(planned("api")["action"], "cutover");
    assert_eq!(planned("api")["awaiting_approval"], true);
    assert_eq!(planned("web")["action"], "deploy");
    assert_eq!(planned("web")["awaiting_approval"], false);
    assert!(host.history().iter().all(|r| r["commit"] != cut.as_str()));
    assert_eq!(host.unit_property("app-api.service", "InvocationID"), api);
    assert_eq!(host.unit_property("app-web.service", "InvocationID"), web);
    assert_eq!(
        host.json(&["status", "--json"])["source"]["deployed_commit"],
        v1.as_str()
    );

    let wrong = host.moorline(&["approve", "0000000"]);
    assert_eq!(wrong.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&wrong.stderr),
        format!(
            "error: commit 0000000 is not awaiting approval; {} is\n",
            &cut[..7]
        )
    );
    let other = host.moorline(&["approve", &cut[..7], "--scope", "web"]);
    assert_eq!(other.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&other.stderr),
        format!(
            "error: scope \"web\" of commit {} does not wait for approval; these do: api\n",
            &cut[..7]
        )
    );

    let approved = host.moorline(&["approve", &cut[..7]]);
    assert_eq!(approved.status.code(), Some(0), "{approved:?}");
    assert_eq!(
        String::from_utf8_lossy(&approved.stdout),
        format!("approved commit {}; deploying it now\n", &cut[..7])
    );
    // The approval is an event of one scope; the rollout it lets go has all.
    let rollout = wait_for("the approved rollout", Duration::from_secs(90), || {
        host.history().into_iter().find(|r| {
            r["commit"] == cut.as_str()
                && r["scopes"].as_array().is_some_and(|s| s.len() > 1)
                && r["outcome"] != "in-progress"
        })
    });
    assert_eq!(rollout["trigger"], "approve");
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(scope(&rollout, "api")["action"], "cutover");
    assert_eq!(scope(&rollout, "web")["action"], "deploy");
    let event = host
        .history()
        .into_iter()
        .find(|r| r["trigger"] == "approve" && r["scopes"].as_array().is_some_and(|s| s.len() == 1))
        .expect("the approval is in history");
    assert_eq!(event["user"], me().as_str());
    assert_eq!(scope(&event, "api")["action"], "approve");
    assert!(host.json(&["status", "--json"])["awaiting_approval"].is_null());
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v2")),
        Some(true)
    );
}

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
    assert_eq!(hold_record["user"], me().as_str(), "{hold_record:#}");

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
        .filter(|r| r["commit"] == v2.as_str() && scope(r, "api")["action"] != "resume")
        .count();
    assert_eq!(
        deploys, 2,
        "the held rollout and the one after resume (the hold was recorded at v1)"
    );
    // The resume is an event; the rollout it started (newer) is named after it.
    let [converging, event]: [Value; 2] = host
        .history()
        .into_iter()
        .filter(|r| r["trigger"] == "resume")
        .collect::<Vec<_>>()
        .try_into()
        .expect("the resume and its rollout");
    assert_eq!(scope(&event, "api")["action"], "resume");
    assert_eq!(scope(&converging, "api")["action"], "deploy");
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

#[cfg(feature = "fault-injection")]
#[test]
fn a_hand_rollback_killed_during_verification_is_interrupted_then_converges_to_the_held_release() {
    use std::os::unix::process::ExitStatusExt;
    let mut host = Host::new();
    let (v1, _) = v2_after_v1(&mut host);
    host.stop_agent();
    host.start_agent_with(&[("MOORLINE_FAULT", "during-verify")]);
    let out = host.moorline(&["rollback", "api", "--reason", "kill test"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("lost the agent while waiting for the rollback"),
        "{stderr}"
    );
    let status = host.wait_agent_exit(Duration::from_secs(90));
    assert_eq!(status.signal(), Some(9), "{status}");
    assert_eq!(newest(&host, "rollback")["outcome"], "in-progress");

    host.start_agent();
    let [interrupted, retried] = wait_for(
        "the interrupted rollback and its retry",
        Duration::from_secs(120),
        || {
            let mut found: Vec<Value> = host
                .history()
                .into_iter()
                .filter(|r| r["trigger"] == "rollback")
                .collect();
            found.reverse();
            (found.len() == 2 && found[1]["outcome"] != "in-progress")
                .then(|| [found[0].clone(), found[1].clone()])
        },
    );
    assert_eq!(interrupted["outcome"], "interrupted", "{interrupted:#}");
    assert_eq!(retried["outcome"], "succeeded", "{retried:#}");
    assert_eq!(scope(&retried, "api")["release"], v1.as_str());
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &v1[..7]))));
    let held = scope_status(&host, "api");
    assert_eq!(held["release"], v1.as_str());
    assert!(
        held["held"]
            .as_str()
            .is_some_and(|h| h.starts_with(&format!("held at release {} (kill test", &v1[..7]))),
        "{held:#}"
    );
}
