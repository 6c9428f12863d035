//! Behaviour of the core that hidden scenarios found wanting: repair while
//! the head is quarantined, verification that ends at the first definite
//! failure, build scripts as inputs, members dropped from a scope, a stop
//! request during a rollout, hanging jobs, unreadable history, a closed
//! stdout, a user manager that comes back.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{self, Host, wait_for};
use crate::scope;

fn edit_manifest(work: &Path, edit: impl FnOnce(String) -> String) {
    let path = work.join("deploy/moorline.toml");
    let text = std::fs::read_to_string(&path).expect("read manifest");
    std::fs::write(&path, edit(text)).expect("write manifest");
}

/// An api that exits a second after it starts and never answers.
pub(crate) fn api_that_never_answers(work: &Path) {
    std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write");
    std::fs::write(
        work.join("services/api/server.py"),
        "import sys, time\ntime.sleep(1)\nsys.exit(1)\n",
    )
    .expect("write");
}

fn phase_ms(rollout: &Value, name: &str) -> u64 {
    rollout["phases"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["phase"] == name))
        .and_then(|p| p["duration_ms"].as_u64())
        .unwrap_or_else(|| panic!("no {name} phase: {rollout:#}"))
}

fn status_scope(host: &Host, name: &str) -> Value {
    let status = host.json(&["status", "--json"]);
    status["scopes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == name))
        .cloned()
        .unwrap_or_else(|| panic!("no scope {name} in status: {status:#}"))
}

#[test]
fn history_keeps_each_commits_subject_and_author() {
    let mut host = Host::new();
    let first = harness::git(&host.work(), &["rev-parse", "HEAD"]);
    host.start_agent();
    let rollout = host.wait_rollout(&first);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(rollout["subject"], "initial import");
    assert_eq!(rollout["author"], "Test <test@example.invalid>");
    let show = host.moorline(&["show", &rollout["id"].to_string()]);
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(text.contains("subject:   initial import\n"), "{text}");
    assert!(
        text.contains("author:    Test <test@example.invalid>\n"),
        "{text}"
    );
    let list = host.moorline(&["history"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("initial import"),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
}

#[test]
fn a_scope_found_down_is_repaired_while_the_branch_head_is_quarantined() {
    let mut host = Host::new();
    let first = harness::git(&host.work(), &["rev-parse", "HEAD"]);
    host.start_agent();
    let rollout = host.wait_rollout(&first);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");

    let crash = host.commit_and_push("api that dies", api_that_never_answers);
    host.sync();
    assert_eq!(host.wait_rollout(&crash)["outcome"], "rolled-back");
    host.stop_agent();

    // While the agent is down, someone stops the web front end.
    let stopped = host.um.systemctl(&["stop", "app-web.service"]);
    assert!(stopped.status.success());
    assert_eq!(host.web(), None);
    host.start_agent();
    let repair = wait_for("a repair rollout", Duration::from_secs(90), || {
        host.history()
            .into_iter()
            .find(|r| r["trigger"] == "repair" && r["outcome"] != "in-progress")
    });
    assert_eq!(repair["outcome"], "succeeded", "{repair:#}");
    assert_eq!(
        repair["commit"],
        first.as_str(),
        "back to what the store records"
    );
    let web = scope(&repair, "web");
    assert_eq!(web["action"], "deploy", "{web}");
    assert_eq!(web["reason"], "last deploy was not healthy; trying again");
    assert_eq!(web["built"], false, "the recorded release is reused");
    assert!(host.web().is_some_and(|(_, body)| body.contains("web v1")));
    let status = host.json(&["status", "--json"]);
    assert_eq!(
        status["source"]["failed_commit"],
        crash.as_str(),
        "still quarantined"
    );
    assert_eq!(status["source"]["deployed_commit"], first.as_str());
    let crashes = host
        .history()
        .iter()
        .filter(|r| r["commit"] == crash.as_str())
        .count();
    assert_eq!(crashes, 1, "the failed head is not retried");
}

#[test]
fn a_member_that_goes_down_ends_verification_at_once() {
    let mut host = Host::with(|work| {
        edit_manifest(work, |t| {
            t.replace("health_timeout = \"30s\"", "health_timeout = \"90s\"")
        })
    });
    let first = host.deployed();
    let crash = host.commit_and_push("api that dies", api_that_never_answers);
    host.sync();
    let rollout = host.wait_rollout(&crash);
    assert_eq!(rollout["outcome"], "rolled-back", "{rollout:#}");
    let error = rollout["error"].as_str().expect("error");
    assert!(
        error.starts_with("scope \"api\" failed verification: "),
        "{error}"
    );
    // The unit failed within seconds; the health checks' 90 s are not waited out.
    let verify = phase_ms(&rollout, "verify");
    assert!(
        verify < 45_000,
        "verification took {verify} ms: {rollout:#}"
    );
    let short = &first[..7];
    assert_eq!(host.api(), Some((200, format!("ok v1 {short}\n"))));
}

#[test]
fn editing_a_build_script_outside_paths_redeploys_its_scope_only() {
    let mut host = Host::new();
    let first = host.deployed();
    let edited = host.commit_and_push("build-api: say more", |work| {
        let path = work.join("build-api.sh");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, format!("{text}echo \"api build: one more line\"\n")).expect("write");
    });
    host.sync();
    let rollout = host.wait_rollout(&edited);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    let api = scope(&rollout, "api");
    assert_eq!(api["action"], "deploy", "{api}");
    assert_eq!(api["reason"], "paths build-api.sh changed");
    assert_eq!(api["built"], true);
    for other in ["web", "workers"] {
        assert_eq!(scope(&rollout, other)["action"], "unchanged");
    }
    assert_eq!(host.builds(), [first, edited]);
}

#[test]
fn a_member_dropped_from_a_scope_is_stopped_and_its_files_removed() {
    let mut host = Host::with(|work| {
        let units = work.join("deploy/units");
        std::fs::copy(
            units.join("app-worker.service"),
            units.join("app-worker2.service"),
        )
        .expect("copy unit");
        edit_manifest(work, |t| {
            t.replace(
                "units = [\"app-worker.service\"]\nunit_files = [\"deploy/units/app-worker.service\"]",
                "units = [\"app-worker.service\", \"app-worker2.service\"]\nunit_files = [\"deploy/units/app-worker.service\", \"deploy/units/app-worker2.service\"]",
            )
        });
    });
    host.deployed();
    assert_eq!(
        host.unit_property("app-worker2.service", "ActiveState"),
        "active"
    );
    let unit_file = host.um.unit_dir().join("app-worker2.service");
    let dropin_dir = host.um.unit_dir().join("app-worker2.service.d");
    assert!(unit_file.exists() && dropin_dir.exists());

    let dropped = host.commit_and_push("workers: one unit is enough", |work| {
        edit_manifest(work, |t| {
            t.replace(
                "units = [\"app-worker.service\", \"app-worker2.service\"]\nunit_files = [\"deploy/units/app-worker.service\", \"deploy/units/app-worker2.service\"]",
                "units = [\"app-worker.service\"]\nunit_files = [\"deploy/units/app-worker.service\"]",
            )
        });
    });
    let plan = host.json(&["plan", &dropped, "--json"]);
    let planned = plan["scopes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["scope"] == "workers"))
        .expect("workers planned");
    assert_eq!(
        planned["reason"],
        "manifest section changed; stops app-worker2.service (no longer in the scope)"
    );
    host.sync();
    let rollout = host.wait_rollout(&dropped);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    let steps: Vec<String> = rollout["journal"]
        .as_array()
        .expect("journal")
        .iter()
        .filter(|j| j["state"] == "done")
        .filter_map(|j| j["step"].as_str().map(str::to_string))
        .collect();
    for step in [
        "stop app-worker2.service",
        "remove the drop-in of app-worker2.service",
        "remove the unit file app-worker2.service",
    ] {
        assert!(steps.iter().any(|s| s == step), "{step} not in {steps:#?}");
    }
    assert_eq!(
        host.unit_property("app-worker2.service", "ActiveState"),
        "inactive"
    );
    assert!(!unit_file.exists(), "the unit file is removed");
    assert!(!dropin_dir.exists(), "the drop-in is removed");
    assert_eq!(
        host.unit_property("app-worker.service", "ActiveState"),
        "active"
    );
}

#[test]
fn a_stop_request_during_a_rollout_ends_it_at_the_next_step_and_records_it() {
    let mut host = Host::new();
    let first = host.deployed();
    let slow = host.commit_and_push("api: a slow build", |work| {
        std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write");
        let path = work.join("build-api.sh");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replace("set -e\n", "set -e\nsleep 3\n")).expect("write");
    });
    host.sync();
    wait_for("the slow build to start", Duration::from_secs(30), || {
        host.history().into_iter().find(|r| {
            r["commit"] == slow.as_str()
                && r["journal"]
                    .as_array()
                    .and_then(|j| j.last())
                    .is_some_and(|j| j["step"] == "build scope api" && j["state"] == "intent")
        })
    });
    let asked = Instant::now();
    host.terminate_agent();
    let status = host.wait_agent_exit(Duration::from_secs(30));
    assert!(status.success(), "the agent stopped cleanly: {status}");
    // The build (3 s) finished; the stop came at the next step, not after
    // systemd's stop timeout.
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "{:?}",
        asked.elapsed()
    );
    let log = host.agent_log();
    assert!(
        log.contains("stop requested: the rollout ends here"),
        "{log}"
    );
    let interrupted = host
        .history()
        .into_iter()
        .find(|r| r["commit"] == slow.as_str())
        .expect("the rollout is in history");
    assert_eq!(interrupted["outcome"], "interrupted", "{interrupted:#}");
    assert_eq!(
        interrupted["error"],
        "the agent stopped after \"build scope api\" (done)"
    );
    let short = &first[..7];
    assert_eq!(
        host.api(),
        Some((200, format!("ok v1 {short}\n"))),
        "nothing switched"
    );

    host.start_agent();
    let retried = wait_for("the retry", Duration::from_secs(90), || {
        host.history()
            .into_iter()
            .find(|r| r["commit"] == slow.as_str() && r["outcome"] == "succeeded")
    });
    assert_eq!(
        scope(&retried, "api")["built"],
        false,
        "the finished build is reused"
    );
    assert_eq!(host.api(), Some((200, format!("ok v2 {}\n", &slow[..7]))));
}

#[test]
fn a_stop_job_that_hangs_is_given_up_after_job_timeout_naming_the_unit() {
    let mut host = Host::with(|work| {
        std::fs::write(
            work.join("deploy/units/app-stuck.service"),
            "[Service]\nExecStart=/bin/sleep infinity\nExecStop=/bin/sleep infinity\nTimeoutStopSec=infinity\n",
        )
        .expect("write unit");
        edit_manifest(work, |t| {
            format!(
                "{t}\n[scopes.stuck]\nowner = \"native\"\njob_timeout = \"2s\"\n[scopes.stuck.native]\nunits = [\"app-stuck.service\"]\nunit_files = [\"deploy/units/app-stuck.service\"]\n"
            )
            .replace("[defaults]\n", "[defaults]\njob_timeout = \"2s\"\n")
        });
    });
    host.deployed();
    let removed = host.commit_and_push("drop the stuck scope", |work| {
        edit_manifest(work, |t| {
            t[..t.find("\n[scopes.stuck]").expect("stuck scope")].to_string() + "\n"
        });
    });
    host.sync();
    let rollout = host.wait_rollout(&removed);
    assert_ne!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(
        rollout["error"],
        "removing scope \"stuck\" failed: stop of \"app-stuck.service\" did not finish within 2s"
    );
    let journal = rollout["journal"].as_array().expect("journal");
    assert!(
        journal.iter().any(|j| j["step"] == "stop app-stuck.service"
            && j["state"] == "failed: stop of \"app-stuck.service\" did not finish within 2s"),
        "{journal:#?}"
    );
}

#[test]
fn an_undecodable_history_record_is_skipped_with_a_warning_naming_it() {
    let mut host = Host::new();
    host.deployed_then_stopped();
    let db_path = host.state_dir().join("history");
    {
        let db = sled::open(&db_path).expect("open the agent's history");
        let rollouts = db.open_tree("rollouts").expect("rollouts tree");
        rollouts
            .insert(99u64.to_be_bytes(), &b"{\"schema\":2,\"id\":99,\"comm"[..])
            .expect("insert a cut-short record");
        db.flush().expect("flush");
    }
    let output = host.moorline(&["history", "--json"]);
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "skipped a history record: record \"rollout 99\" in \"{}\" is unreadable: EOF while parsing a string at line 1 column 25",
            db_path.display()
        )),
        "{stderr}"
    );
    let listed: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed:#}");
    // The agent starts and deploys on top of it.
    host.start_agent();
    let next = host.commit_and_push("web v2", |work| {
        std::fs::write(work.join("services/web/www/index.html"), "<p>web v2</p>\n").expect("write");
    });
    host.sync();
    assert_eq!(host.wait_rollout(&next)["outcome"], "succeeded");
}

#[test]
fn a_closed_stdout_ends_every_command_quietly() {
    let mut host = Host::new();
    host.deployed();
    let manifest = host.work().join("deploy/moorline.toml");
    let manifest = manifest.to_str().expect("utf-8 path");
    for running in [true, false] {
        if !running {
            host.stop_agent();
        }
        for args in [
            &["status", "--json"][..],
            &["status"],
            &["history", "--json"],
            &["history"],
            &["show", "1", "--json"],
            &["plan", "--json"],
            &["check", manifest],
        ] {
            // A pipe whose reader is gone: the first write fails with EPIPE.
            let (reader, writer) = std::io::pipe().expect("pipe");
            drop(reader);
            let output = host
                .command(args)
                .stdout(writer)
                .output()
                .expect("moorline runs");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
            assert_eq!(output.status.code(), Some(0), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn status_sees_a_user_manager_that_comes_back() {
    let mut host = Host::new();
    host.deployed();
    assert_eq!(status_scope(&host, "api")["health"], "healthy");
    // The manager goes away: status cannot ask it, and says so.
    host.um.stop();
    let away = wait_for(
        "status to lose the manager",
        Duration::from_secs(20),
        || {
            let api = status_scope(&host, "api");
            (api["health"] == "unknown").then_some(api)
        },
    );
    let member = away["members"][0]["state"].as_str().expect("state");
    assert!(member.starts_with("unknown: "), "{away:#}");
    // It comes back (with nothing started): status asks the new one.
    host.um.start_again();
    let back = wait_for(
        "status to see the manager again",
        Duration::from_secs(20),
        || {
            let api = status_scope(&host, "api");
            (api["members"][0]["state"] == "inactive (dead)").then_some(api)
        },
    );
    assert_eq!(back["health"], "unhealthy", "{back:#}");
}
