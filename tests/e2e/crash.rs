//! Kill tests: the real agent is stopped with SIGKILL by its own fault point
//! at each phase of a rollout, restarted without the fault, and must leave
//! a complete, readable history and every scope healthy on the desired
//! commit (or on its last healthy release when the desired one fails).

// Without the feature only the test that says so is compiled in.
#![cfg_attr(not(feature = "fault-injection"), allow(dead_code, unused_imports))]

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{self, Host, wait_for};

/// The build of this binary must contain the fault points.
#[cfg(not(feature = "fault-injection"))]
#[test]
fn kill_tests_need_the_fault_injection_feature() {
    panic!(
        "the kill tests need fault points: run `cargo test --features fault-injection` (scripts/test does)"
    );
}

/// A host whose first commit is deployed, with the agent stopped.
pub(crate) fn deployed_host() -> (Host, String) {
    let mut host = Host::new();
    let first = host.deployed_then_stopped();
    (host, first)
}

/// Start the agent with `MOORLINE_FAULT=point`, push `edit`, and wait until
/// the agent killed itself. Returns the pushed commit.
pub(crate) fn kill_at(
    host: &mut Host,
    point: &str,
    message: &str,
    edit: impl FnOnce(&std::path::Path),
) -> String {
    host.start_agent_with(&[("MOORLINE_FAULT", point)]);
    let commit = host.commit_and_push(message, edit);
    host.sync();
    let status = host.wait_agent_exit(Duration::from_secs(90));
    assert_eq!(
        status.signal(),
        Some(9),
        "the agent died by SIGKILL at {point}: {status}"
    );
    let log = host.agent_log();
    assert!(
        log.contains("fault point reached: killing the agent"),
        "{log}"
    );
    // With the agent dead, history is still readable and shows the rollout open.
    let open = host
        .history()
        .into_iter()
        .find(|r| r["commit"] == commit.as_str())
        .unwrap_or_else(|| panic!("the killed rollout of {commit} is in history"));
    assert_eq!(open["outcome"], "in-progress", "{open:#}");
    commit
}

pub(crate) fn rollouts_of(host: &Host, commit: &str) -> Vec<Value> {
    let mut found: Vec<Value> = host
        .history()
        .into_iter()
        .filter(|r| r["commit"] == commit)
        .collect();
    found.reverse();
    found
}

/// Start the agent again after a kill during the rollout of `commit` and
/// wait for it to retry: the first rollout was closed as interrupted with
/// `error` (when given); the retry is returned.
pub(crate) fn retried_after_interruption(
    host: &mut Host,
    commit: &str,
    error: Option<&str>,
) -> Value {
    host.start_agent();
    let host = &*host;
    let [interrupted, retried] = wait_for(
        "the interrupted rollout and its retry",
        Duration::from_secs(120),
        || {
            let found = rollouts_of(host, commit);
            (found.len() == 2 && found[1]["outcome"] != "in-progress")
                .then(|| [found[0].clone(), found[1].clone()])
        },
    );
    assert_eq!(interrupted["outcome"], "interrupted", "{interrupted:#}");
    if let Some(error) = error {
        assert_eq!(interrupted["error"], error, "{interrupted:#}");
    }
    retried
}

/// The one rollout of `commit`, once start-up has closed it as interrupted.
pub(crate) fn closed_as_interrupted(host: &Host, commit: &str) -> Value {
    wait_for(
        "the interrupted rollout to be closed",
        Duration::from_secs(30),
        || {
            let found = rollouts_of(host, commit);
            (found.len() == 1 && found[0]["outcome"] == "interrupted").then(|| found[0].clone())
        },
    )
}

/// Every rollout is readable with `show`, none is left open, no half
/// release is on disk, and every scope is healthy at `deployed`.
pub(crate) fn assert_consistent(host: &Host, deployed: &str) {
    let history = host.history();
    for rollout in &history {
        assert_ne!(rollout["outcome"], "in-progress", "{rollout:#}");
        let id = rollout["id"].to_string();
        let show = host.moorline(&["show", &id, "--json"]);
        assert!(
            show.status.success(),
            "show {id}: {}",
            String::from_utf8_lossy(&show.stderr)
        );
    }
    let status = host.json(&["status", "--json"]);
    assert_eq!(status["source"]["deployed_commit"], deployed, "{status:#}");
    let healths: Vec<(String, String)> = status["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap_or("").to_string(),
                s["health"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let healthy = ["api", "web", "workers"].map(|n| (n.to_string(), "healthy".to_string()));
    assert_eq!(healths, healthy, "{status:#}");
    let releases = host.state_dir().join("releases");
    for entry in std::fs::read_dir(&releases).expect("releases dir") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        assert!(
            !name.starts_with(".partial-"),
            "a half-written release is left: {name}"
        );
    }
}

fn api_v2(work: &std::path::Path) {
    std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write");
}

fn web_v2(work: &std::path::Path) {
    std::fs::write(work.join("services/web/www/index.html"), "<p>web v2</p>\n").expect("write");
}

fn crashing_api(work: &std::path::Path) {
    std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write");
    std::fs::write(
        work.join("services/api/server.py"),
        "import sys, time\ntime.sleep(2)\nsys.exit(1)\n",
    )
    .expect("write");
}

/// Kill at `point` during a rollout of `edit`, restart, and expect the
/// interrupted record with `error`, then a successful retry.
fn killed_then_converges(
    point: &str,
    edit: fn(&std::path::Path),
    error: impl Fn(&str) -> String,
) -> (Host, String) {
    let (host, _first) = deployed_host();
    killed_then_converges_on(host, point, edit, error)
}

/// `killed_then_converges` on a deployed `host` of the caller's making;
/// `error` is given the commit's short id.
pub fn killed_then_converges_on(
    mut host: Host,
    point: &str,
    edit: fn(&std::path::Path),
    error: impl Fn(&str) -> String,
) -> (Host, String) {
    let commit = kill_at(&mut host, point, point, edit);
    let retried = retried_after_interruption(&mut host, &commit, Some(&error(&commit[..7])));
    assert_eq!(retried["outcome"], "succeeded", "{retried:#}");
    assert_consistent(&host, &commit);
    (host, commit)
}

#[cfg(feature = "fault-injection")]
#[test]
fn killed_after_fetch_the_rollout_is_closed_and_retried() {
    let (host, _) = killed_then_converges("after-fetch", web_v2, |_| {
        "the agent stopped before any change was made".into()
    });
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v2")),
        Some(true)
    );
}

#[cfg(feature = "fault-injection")]
#[test]
fn killed_during_a_build_the_release_is_rebuilt_from_scratch() {
    let (host, commit) = killed_then_converges("during-build", api_v2, |_| {
        "the agent stopped during \"build scope api\"".into()
    });
    assert_eq!(host.api(), Some((200, format!("ok v2 {}\n", &commit[..7]))));
}

#[cfg(feature = "fault-injection")]
#[test]
fn killed_after_the_unit_was_repointed_before_restart_the_scope_is_restarted() {
    let (host, commit) = killed_then_converges("after-stop", api_v2, |_| {
        "the agent stopped after \"reload the user manager\" (done)".into()
    });
    assert_eq!(host.api(), Some((200, format!("ok v2 {}\n", &commit[..7]))));
}

#[cfg(feature = "fault-injection")]
#[test]
fn killed_during_verify_the_new_release_is_verified_again() {
    let (host, commit) = killed_then_converges("during-verify", api_v2, |short| {
        format!("the agent stopped after \"restart app-api.service on {short}\" (done)")
    });
    assert_eq!(host.api(), Some((200, format!("ok v2 {}\n", &commit[..7]))));
}

#[cfg(feature = "fault-injection")]
#[test]
fn killed_during_a_rollback_the_failing_commit_is_rolled_back_again() {
    let (mut host, first) = deployed_host();
    let crash = kill_at(&mut host, "during-rollback", "api that dies", crashing_api);
    let retried = retried_after_interruption(
        &mut host,
        &crash,
        Some(&format!(
            "the agent stopped after \"restart app-api.service on {}\" (done)",
            &first[..7]
        )),
    );
    assert_eq!(retried["outcome"], "rolled-back", "{retried:#}");
    assert_consistent(&host, &first);
    assert_eq!(
        host.api(),
        Some((200, format!("ok v1 {}\n", &first[..7]))),
        "api runs v1 again"
    );
    assert_eq!(host.failed_commit(), crash.as_str());
}

#[cfg(feature = "fault-injection")]
#[test]
fn killed_while_recording_the_deployed_commit_is_kept_and_not_redeployed() {
    let (mut host, _) = deployed_host();
    let commit = kill_at(&mut host, "while-recording", "web v2", web_v2);
    host.start_agent();
    let closed = closed_as_interrupted(&host, &commit);
    let error = closed["error"].as_str().expect("error");
    assert!(
        error.starts_with("the agent stopped after \"restart app-web.service on "),
        "{error}"
    );
    host.sync_and_settle(&commit);
    assert_eq!(
        rollouts_of(&host, &commit).len(),
        1,
        "the deployed commit is not rolled out again"
    );
    assert_consistent(&host, &commit);
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v2")),
        Some(true)
    );
}

/// The start-up audit: killed while a crashing api was being verified, then
/// the crash is reverted before the agent comes back. The revert's inputs
/// equal the recorded (healthy) state, so without comparing the unit's
/// drop-in with the store the agent would call api unchanged and leave the
/// crashing release running.
#[cfg(feature = "fault-injection")]
#[test]
fn a_unit_left_on_an_unrecorded_release_is_put_back_after_a_kill() {
    let (mut host, first) = deployed_host();
    let crash = kill_at(&mut host, "during-verify", "api that dies", crashing_api);
    let revert = host.commit_and_push("Revert the crashing api", |work| {
        harness::git(work, &["revert", "--no-commit", "HEAD"]);
    });
    host.start_agent();
    let rollout = host.wait_rollout(&revert);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    let api = rollout["scopes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["scope"] == "api"))
        .expect("api in the rollout");
    assert_eq!(api["action"], "deploy", "{api}");
    assert_eq!(
        api["reason"], "last deploy was not healthy; trying again",
        "{api}"
    );
    assert_eq!(api["release"], first.as_str(), "the v1 release is reused");
    assert_eq!(rollouts_of(&host, &crash)[0]["outcome"], "interrupted");
    assert_consistent(&host, &revert);
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &first[..7]))));
    assert!(
        host.agent_log().contains(&format!(
            "audit: app-api.service runs release {} but {} was recorded",
            &crash[..7],
            &first[..7]
        )),
        "{}",
        host.agent_log()
    );
}

/// A kill half-way through writing a release leaves only its staging
/// directory, which start-up removes before the release is written again.
#[cfg(feature = "fault-injection")]
#[test]
fn killed_during_checkout_the_partial_release_is_removed_and_written_again() {
    let (mut host, _first) = deployed_host();
    let commit = kill_at(&mut host, "during-checkout", "web v2", web_v2);
    let releases = host.state_dir().join("releases");
    let partial = releases.join(format!(".partial-{commit}"));
    assert!(
        partial.is_dir(),
        "the kill came in the middle of the checkout"
    );
    assert!(!releases.join(&commit).exists(), "no release is half there");
    let retried = retried_after_interruption(
        &mut host,
        &commit,
        Some(&format!(
            "the agent stopped during \"check out release {}\"",
            &commit[..7]
        )),
    );
    assert_eq!(retried["outcome"], "succeeded", "{retried:#}");
    assert_consistent(&host, &commit);
    assert!(
        releases
            .join(&commit)
            .join("services/web/www/index.html")
            .is_file()
    );
}

/// Pruning is journaled in the rollout that decided it; a kill in the
/// middle leaves a release the registry forgot, removed at start-up.
#[cfg(feature = "fault-injection")]
#[test]
fn killed_while_pruning_the_forgotten_release_is_removed_at_start_up() {
    let mut host = Host::with(harness::keep_one_release);
    let first = host.deployed();
    let second = host.commit_and_push("web v2", web_v2);
    host.sync();
    assert_eq!(host.wait_rollout(&second)["outcome"], "succeeded");
    host.stop_agent();

    // Web moves on to a third release: the second is no longer used by
    // any scope, and is pruned when the third is healthy.
    host.start_agent_with(&[("MOORLINE_FAULT", "during-prune")]);
    let third = host.commit_and_push("web v3", |work| {
        std::fs::write(work.join("services/web/www/index.html"), "<p>web v3</p>\n").expect("write");
    });
    host.sync();
    let status = host.wait_agent_exit(Duration::from_secs(90));
    assert_eq!(status.signal(), Some(9), "killed at during-prune: {status}");
    let rollout = rollouts_of(&host, &third).pop().expect("third in history");
    assert_eq!(
        rollout["outcome"], "succeeded",
        "decided before pruning: {rollout:#}"
    );
    let last = rollout["journal"]
        .as_array()
        .and_then(|j| j.last())
        .cloned()
        .expect("journal");
    assert_eq!(
        last["step"],
        format!("prune release {}", &second[..7]).as_str()
    );
    assert_eq!(last["state"], "intent");
    let releases = host.state_dir().join("releases");
    assert!(releases.join(&second).exists(), "killed before the delete");

    host.start_agent();
    wait_for(
        "start-up to remove the forgotten release",
        Duration::from_secs(30),
        || (!releases.join(&second).exists()).then_some(()),
    );
    assert!(
        releases.join(&first).exists(),
        "api and workers run the first"
    );
    assert!(releases.join(&third).exists());
    assert_consistent(&host, &third);
}
