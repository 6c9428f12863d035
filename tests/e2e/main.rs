//! End-to-end tests: the real `moorline` binary against real git
//! repositories and a real systemd user manager (tests/support/user_manager.rs starts one per test).

#[path = "../support/git.rs"]
mod git_cli;
#[path = "../support/load.rs"]
mod load;
#[path = "../support/user_manager.rs"]
mod user_manager;

mod bad_input;
mod core;
mod crash;
mod docker;
mod docker_crash;
mod edge;
mod edge_proxy;
mod fleet;
mod git_faults;
mod hand;
mod harness;
mod history_disk;
mod observe;
mod package;
mod privilege;
mod remotes;
mod signed;
mod triggers;

use std::time::Duration;

use harness::{Host, wait_for};
use serde_json::Value;

fn scope<'a>(rollout: &'a Value, name: &str) -> &'a Value {
    rollout["scopes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["scope"] == name))
        .unwrap_or_else(|| panic!("rollout has no scope {name}: {rollout}"))
}

fn invocations(host: &Host) -> [String; 3] {
    ["app-api.service", "app-web.service", "app-worker.service"]
        .map(|u| host.unit_property(u, "InvocationID"))
}

#[test]
fn push_deploys_changed_scopes_only_and_an_agent_restart_restarts_nothing() {
    let mut host = Host::new();
    let first = harness::git(&host.work(), &["rev-parse", "HEAD"]);
    host.start_agent();
    let rollout = host.wait_rollout(&first);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(rollout["trigger"], "startup");
    for name in ["api", "web", "workers"] {
        assert_eq!(scope(&rollout, name)["action"], "deploy");
        assert_eq!(scope(&rollout, name)["reason"], "first deploy");
        assert_eq!(scope(&rollout, name)["result"], "healthy");
    }
    assert_eq!(scope(&rollout, "api")["built"], true);
    let phases: Vec<&str> = rollout["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .filter_map(|p| p["phase"].as_str())
        .collect();
    assert_eq!(phases, ["fetch", "plan", "prepare", "switch", "verify"]);
    assert_eq!(host.builds(), std::slice::from_ref(&first));
    let short = &first[..7];
    assert_eq!(host.api(), Some((200, format!("ok v1 {short}\n"))));
    let release = host.state_dir().join("releases").join(&first);
    assert_eq!(
        host.unit_property("app-api.service", "WorkingDirectory"),
        release.display().to_string()
    );
    let environment = host.unit_property("app-api.service", "Environment");
    assert!(
        environment.contains(&format!("MOORLINE_COMMIT={first}")),
        "{environment}"
    );
    assert!(
        environment.contains(&format!("MOORLINE_RELEASE={}", release.display())),
        "{environment}"
    );
    let show = host.moorline(&["show", &rollout["id"].to_string()]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("  | api build done"),
        "show prints the build tail:\n{text}"
    );

    let status = host.json(&["status", "--json"]);
    assert_eq!(status["source"]["deployed_commit"], first.as_str());
    assert_eq!(status["source"]["desired_commit"], first.as_str());
    let healths: Vec<(&str, &str)> = status["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or(""),
                s["health"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        healths,
        [
            ("api", "healthy"),
            ("web", "healthy"),
            ("workers", "healthy")
        ]
    );
    assert_eq!(host.moorline(&["status"]).status.code(), Some(0));

    // A change under web/ restarts web only.
    let before = invocations(&host);
    let second = host.commit_and_push("web: v2", |work| {
        std::fs::write(work.join("services/web/www/index.html"), "<p>web v2</p>\n").expect("write");
    });
    host.sync();
    let rollout = host.wait_rollout(&second);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(rollout["trigger"], "sync");
    assert_eq!(
        scope(&rollout, "web")["reason"],
        "paths services/web/ changed"
    );
    assert_eq!(scope(&rollout, "api")["action"], "unchanged");
    assert_eq!(scope(&rollout, "workers")["action"], "unchanged");
    let after = invocations(&host);
    assert_eq!(after[0], before[0], "api was not restarted");
    assert_ne!(after[1], before[1], "web was restarted");
    assert_eq!(after[2], before[2], "workers were not restarted");
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v2")),
        Some(true)
    );
    assert_eq!(host.builds().len(), 1, "api was not rebuilt");

    // Restarting the agent restarts nothing and records nothing.
    let rollouts = host.history().len();
    host.stop_agent();
    let stopped = host.moorline(&["status"]);
    let text = String::from_utf8_lossy(&stopped.stdout);
    assert!(
        text.starts_with("agent:     not running (last snapshot "),
        "{text}"
    );
    assert_eq!(stopped.status.code(), Some(0));
    let offline = host.moorline(&["history", "--json"]);
    assert!(
        offline.status.success(),
        "history works with the agent stopped"
    );
    host.start_agent();
    host.sync();
    wait_for(
        "the agent to fetch after restart",
        Duration::from_secs(20),
        || {
            let status = host.json(&["status", "--json"]);
            (status["source"]["desired_commit"] == second.as_str()
                && status["agent"]["activity"] == "idle")
                .then_some(())
        },
    );
    assert_eq!(invocations(&host), after, "no unit was restarted");
    assert_eq!(host.history().len(), rollouts, "no rollout was recorded");
}

#[test]
fn a_crashing_commit_is_rolled_back_and_its_revert_redeploys_without_building() {
    let mut host = Host::new();
    let first = host.deployed();

    let crash = host.commit_and_push("api: v2 that dies after two seconds", |work| {
        std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write");
        std::fs::write(
            work.join("services/api/server.py"),
            "import sys, time\ntime.sleep(2)\nsys.exit(1)\n",
        )
        .expect("write");
    });
    host.sync();
    let rollout = host.wait_rollout(&crash);
    assert_eq!(rollout["outcome"], "rolled-back", "{rollout:#}");
    let error = rollout["error"].as_str().expect("an error is recorded");
    assert!(
        error.starts_with("scope \"api\" failed verification: "),
        "{error}"
    );
    assert_eq!(scope(&rollout, "api")["result"], "rolled-back");
    assert_eq!(host.builds(), [first.clone(), crash.clone()]);
    assert_eq!(
        host.api(),
        Some((200, format!("ok v1 {}\n", &first[..7]))),
        "api runs v1 again"
    );
    let status = host.json(&["status", "--json"]);
    assert_eq!(status["source"]["deployed_commit"], first.as_str());
    assert_eq!(status["source"]["failed_commit"], crash.as_str());
    assert_eq!(
        host.moorline(&["status"]).status.code(),
        Some(1),
        "a failed commit is a negative status"
    );

    // The same commit is not tried again.
    let rollouts = host.history().len();
    host.sync_and_settle(&crash);
    assert_eq!(host.history().len(), rollouts);

    let revert = host.commit_and_push("Revert api v2", |work| {
        harness::git(work, &["revert", "--no-commit", "HEAD"]);
    });
    host.sync();
    let rollout = host.wait_rollout(&revert);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    let api = scope(&rollout, "api");
    assert_eq!(api["built"], false, "{api}");
    assert_eq!(api["release"], first.as_str(), "the v1 release is reused");
    assert_eq!(
        host.builds(),
        [first.clone(), crash],
        "no build ran for the revert"
    );
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &first[..7]))));
    assert_eq!(host.moorline(&["status"]).status.code(), Some(0));
}

#[test]
fn an_invalid_manifest_changes_nothing_and_is_recorded_with_its_position() {
    let mut host = Host::new();
    let first = host.deployed();
    let before = invocations(&host);

    let bad = host.commit_and_push("typo in the manifest", |work| {
        let path = work.join("deploy/moorline.toml");
        let text = std::fs::read_to_string(&path).expect("read manifest");
        std::fs::write(
            &path,
            text.replacen("owner = \"native\"", "ownr = \"native\"", 1),
        )
        .expect("write");
    });
    host.sync();
    let rollout = host.wait_rollout(&bad);
    assert_eq!(rollout["outcome"], "failed");
    let manifest = std::fs::read_to_string(host.work().join("deploy/moorline.toml")).expect("read");
    let line = |needle: &str| {
        manifest
            .lines()
            .position(|l| l.starts_with(needle))
            .expect("line in manifest")
            + 1
    };
    let (header, key) = (line("[scopes.api]"), line("ownr"));
    let error = rollout["error"].as_str().expect("error recorded");
    assert_eq!(
        error,
        format!(
            "deploy/moorline.toml:{header}:1: missing key \"owner\" in [scopes.api]\n\
             deploy/moorline.toml:{key}:1: unknown key \"ownr\" in [scopes.api]; expected one of: owner, after, \
             paths, build, native, docker, health, health_timeout, settle, build_timeout, job_timeout, hosts, strategy, edge, canary, approve"
        )
    );
    assert_eq!(invocations(&host), before, "nothing was restarted");
    assert!(host.api().is_some(), "api still answers");
    assert_eq!(
        host.json(&["status", "--json"])["source"]["deployed_commit"],
        first.as_str()
    );
}

#[test]
fn check_validates_a_manifest_offline_with_exit_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy-manifests/webapp/deploy/moorline.toml"
    );
    let output = std::process::Command::new(harness::BIN)
        .args(["check", good])
        .output()
        .expect("runs");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        format!("{good}: ok (3 scopes: api, web, workers)\n")
    );

    let bad = dir.path().join("moorline.toml");
    std::fs::write(&bad, "version = 1\n[scopes.api]\nowner = \"native\"\nafter = [\"db\"]\n[scopes.api.native]\nunits = [\"a.service\"]\n")
        .expect("write");
    let output = std::process::Command::new(harness::BIN)
        .args(["check", bad.to_str().expect("utf-8")])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        format!(
            "{}:4:10: scope \"api\" comes after unknown scope \"db\"\n",
            bad.display()
        )
    );

    let missing = dir.path().join("absent.toml");
    let output = std::process::Command::new(harness::BIN)
        .args(["check", missing.to_str().expect("utf-8")])
        .output()
        .expect("runs");
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn a_failure_in_a_later_scope_rolls_back_the_whole_rollout() {
    let mut host = Host::new();
    let first = host.deployed();

    // api v2 is fine; web (after api) gets a unit that dies after a second.
    let mixed = host.commit_and_push("api v2 and a broken web unit", |work| {
        std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write");
        let unit = work.join("deploy/units/app-web.service");
        let text = std::fs::read_to_string(&unit).expect("read unit");
        let start = text.find("ExecStart=").expect("ExecStart line");
        let end = start + text[start..].find('\n').expect("line end");
        let broken = format!(
            "{}ExecStart=/bin/sh -c 'sleep 1; exit 1'{}",
            &text[..start],
            &text[end..]
        );
        std::fs::write(&unit, broken).expect("write unit");
    });
    host.sync();
    let rollout = host.wait_rollout(&mixed);
    assert_eq!(rollout["outcome"], "rolled-back", "{rollout:#}");
    assert_eq!(
        scope(&rollout, "web")["reason"],
        "paths deploy/units/app-web.service changed"
    );
    assert_eq!(
        scope(&rollout, "api")["result"],
        "rolled-back",
        "api passed but goes back too"
    );
    assert_eq!(scope(&rollout, "web")["result"], "rolled-back");
    let error = rollout["error"].as_str().expect("error");
    assert!(
        error.starts_with("scope \"web\" failed verification: "),
        "{error}"
    );
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &first[..7]))));
    assert!(host.web().is_some_and(|(_, body)| body.contains("web v1")));
    let status = host.json(&["status", "--json"]);
    assert_eq!(status["source"]["deployed_commit"], first.as_str());
    for s in status["scopes"].as_array().expect("scopes") {
        assert_eq!(s["release"], first.as_str(), "{s}");
        assert_eq!(s["health"], "healthy", "{s}");
    }
}
