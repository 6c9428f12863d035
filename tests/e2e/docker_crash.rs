//! Kill tests for the Docker runtime and for cutovers: the real agent is
//! stopped with SIGKILL at each phase of a rollout of a Docker-owned scope,
//! or of a scope changing owner, restarted without the fault, and must leave
//! a readable history, no kept `<name>.moorline-prev` container, exactly one
//! container per name, and the scope on one runtime only, healthy.

#![cfg(feature = "fault-injection")]

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::crash::{
    assert_consistent, closed_as_interrupted, kill_at, killed_then_converges_on,
    retried_after_interruption, rollouts_of,
};
use crate::docker::{Exclusivity, exiting_web, web_docker, worker_started_beside_its_container};
use crate::harness::{self, Host, docker, set_owner, wait_for};

/// Name, state and release label of every container of this host.
fn containers(host: &Host) -> Vec<String> {
    let output = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("name=^/{}", host.prefix),
        "--format",
        "{{.Names}} {{.State}} {{.Label \"moorline.commit\"}}",
    ]);
    assert!(output.status.success(), "docker ps");
    let mut found: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    found.sort();
    found
}

/// A host with web owned by docker and its first commit deployed, the agent stopped.
fn docker_host() -> (Host, String) {
    let mut host = Host::with(web_docker);
    let first = host.deployed_then_stopped();
    (host, first)
}

fn web_v2(work: &Path) {
    std::fs::write(work.join("services/web/www/index.html"), "<p>web v2</p>\n").expect("write");
}

/// Kill a rollout of web v2 at `point`, restart, and expect the interrupted
/// record with `error` (given web's container name and the commit's short
/// id), a successful retry, and web v2 in exactly one container.
fn docker_killed_then_converges(point: &str, error: impl Fn(&str, &str) -> String) {
    let (host, _first) = docker_host();
    let web = host.container("app-web");
    let (host, commit) = killed_then_converges_on(host, point, web_v2, |short| error(&web, short));
    assert_eq!(containers(&host), [format!("{web} running {commit}")]);
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v2")),
        Some(true)
    );
    assert_eq!(
        host.unit_property("app-web.service", "ActiveState"),
        "inactive"
    );
}

#[test]
fn docker_killed_during_a_build_command_the_image_is_built_on_restart() {
    docker_killed_then_converges("during-build", |_, _| {
        "the agent stopped during \"build scope web\"".into()
    });
}

#[test]
fn docker_killed_during_an_image_build_the_image_is_built_again() {
    docker_killed_then_converges("during-image-build", |web, short| {
        format!("the agent stopped during \"build image {web}:{short}\"")
    });
}

#[test]
fn docker_killed_with_the_old_container_kept_and_no_new_one_the_scope_is_started() {
    docker_killed_then_converges("after-stop", |web, _| {
        format!("the agent stopped after \"keep container {web} as {web}.moorline-prev\" (done)")
    });
}

#[test]
fn docker_killed_during_verify_the_new_container_is_verified_again() {
    docker_killed_then_converges("during-verify", |web, _| {
        format!("the agent stopped after \"start container {web}\" (done)")
    });
}

#[test]
fn docker_killed_during_a_rollback_the_failing_image_is_rolled_back_again() {
    let (mut host, first) = docker_host();
    let web = host.container("app-web");
    let broken = kill_at(&mut host, "during-rollback", "web that exits", exiting_web);
    let retried = retried_after_interruption(
        &mut host,
        &broken,
        Some(&format!(
            "the agent stopped after \"start container {web}\" (done)"
        )),
    );
    assert_eq!(retried["outcome"], "rolled-back", "{retried:#}");
    assert_consistent(&host, &first);
    assert_eq!(containers(&host), [format!("{web} running {first}")]);
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v1")),
        Some(true)
    );
    assert_eq!(host.failed_commit(), broken.as_str());
}

#[test]
fn docker_killed_while_recording_the_new_container_is_kept() {
    let (mut host, _) = docker_host();
    let web = host.container("app-web");
    let commit = kill_at(&mut host, "while-recording", "web v2", web_v2);
    host.start_agent();
    let closed = closed_as_interrupted(&host, &commit);
    assert_eq!(
        closed["error"],
        format!("the agent stopped after \"remove container {web}.moorline-prev\" (done)").as_str(),
        "{closed:#}"
    );
    let id = inspect_id(&web);
    host.sync_and_settle(&commit);
    assert_eq!(rollouts_of(&host, &commit).len(), 1, "not rolled out again");
    assert_consistent(&host, &commit);
    assert_eq!(containers(&host), [format!("{web} running {commit}")]);
    assert_eq!(inspect_id(&web), id, "the container was not replaced");
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v2")),
        Some(true)
    );
}

fn inspect_id(name: &str) -> String {
    let output = docker(&["inspect", "-f", "{{.Id}}", name]);
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// Kill the cutover of api to `to` at `point` with the exclusivity sampler
/// running through the kill, the restart and the convergence; expect the
/// interrupted record with `error` and api healthy on `to` alone.
fn cutover_killed_then_converges(
    from: &str,
    to: &str,
    point: &str,
    error: impl Fn(&str, &str) -> String,
) {
    let mut host = Host::with(|work| set_owner(work, "api", from));
    let api = host.container("app-api");
    host.deployed_then_stopped();

    let sampler = Exclusivity::watch(&host, "app-api.service", &api);
    let commit = kill_at(
        &mut host,
        point,
        &format!("api: cut over to {to}"),
        |work| set_owner(work, "api", to),
    );
    let retried = retried_after_interruption(&mut host, &commit, Some(&error(&api, &commit[..7])));
    // Sample a little longer: a late start on the wrong runtime shows too.
    wait_for("the settled host", Duration::from_secs(30), || {
        (host.json(&["status", "--json"])["agent"]["activity"] == "idle").then_some(())
    });
    assert!(sampler.finish() > 20, "the sampler ran through the cutover");
    assert_eq!(retried["outcome"], "succeeded", "{retried:#}");
    assert_eq!(crate::scope(&retried, "api")["owner"], to, "{retried:#}");
    assert_consistent(&host, &commit);
    let unit = host.unit_property("app-api.service", "ActiveState");
    if to == "docker" {
        assert_eq!(unit, "inactive");
        assert_eq!(containers(&host), [format!("{api} running {commit}")]);
    } else {
        assert_eq!(unit, "active");
        assert_eq!(
            containers(&host),
            Vec::<String>::new(),
            "old containers removed"
        );
    }
    assert!(
        host.api()
            .is_some_and(|(_, body)| body.starts_with("ok v1")),
        "{:?}",
        host.api()
    );
}

/// One test per (from, to, fault point) of a cutover, with the error the
/// interrupted record must give (from the container name and short id).
macro_rules! cutover_kill {
    ($($name:ident: $from:literal -> $to:literal at $point:literal, $error:expr;)*) => {$(
        #[test]
        fn $name() {
            cutover_killed_then_converges($from, $to, $point, $error);
        }
    )*};
}

cutover_kill! {
    cutover_to_docker_killed_with_the_unit_stopped_ends_on_docker_alone: "native" -> "docker" at "after-stop", |_, _| "the agent stopped after \"stop app-api.service\" (done)".into();
    cutover_to_docker_killed_during_verify_ends_on_docker_alone: "native" -> "docker" at "during-verify", |api, _| format!("the agent stopped after \"start container {api}\" (done)");
    cutover_to_native_killed_with_the_container_stopped_ends_on_native_alone: "docker" -> "native" at "after-stop", |_, _| "the agent stopped after \"reload the user manager\" (done)".into();
    cutover_to_native_killed_during_verify_ends_on_native_alone: "docker" -> "native" at "during-verify", |_, short| format!("the agent stopped after \"restart app-api.service on {short}\" (done)");
}

/// Killed while an image that exits was being verified: on restart the
/// retry must not keep the exiting container as the way back (dropping the
/// one that ran before), and the rollback must bring back the last healthy
/// release.
#[test]
fn docker_killed_during_verify_of_a_failing_image_the_retry_rolls_back_to_the_healthy_one() {
    let (mut host, first) = docker_host();
    let web = host.container("app-web");
    let before = inspect_id(&web);
    let broken = kill_at(&mut host, "during-verify", "web that exits", exiting_web);
    let retried = retried_after_interruption(&mut host, &broken, None);
    assert_eq!(retried["outcome"], "rolled-back", "{retried:#}");
    assert_eq!(crate::scope(&retried, "web")["result"], "rolled-back");
    assert_consistent(&host, &first);
    assert_eq!(containers(&host), [format!("{web} running {first}")]);
    assert_eq!(
        inspect_id(&web),
        before,
        "the very container that ran before is back"
    );
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v1")),
        Some(true)
    );
}

/// Killed while a cutover to a docker form that never gets healthy was
/// being verified: on restart the retry fails again and the scope returns
/// to native, and no container of the failed form is left, stopped or kept.
#[test]
fn cutover_to_a_failing_docker_form_killed_during_verify_returns_to_native_and_leaves_no_container()
{
    let mut host = Host::new();
    let api = host.container("app-api");
    let first = host.deployed_then_stopped();

    let sampler = Exclusivity::watch(&host, "app-api.service", &api);
    // Published on a port of its own, so the health check never answers.
    let (port, wrong) = (host.api_port, harness::free_port());
    let bad = kill_at(
        &mut host,
        "during-verify",
        "api: cut over to a docker form on the wrong port",
        |work| {
            set_owner(work, "api", "docker");
            let path = work.join("deploy/moorline.toml");
            let text = std::fs::read_to_string(&path).expect("read");
            std::fs::write(
                &path,
                text.replacen(
                    &format!("127.0.0.1:{port}:8080"),
                    &format!("127.0.0.1:{wrong}:8080"),
                    1,
                ),
            )
            .expect("write");
        },
    );
    let retried = retried_after_interruption(&mut host, &bad, None);
    assert!(sampler.finish() > 20, "the sampler ran through the cutover");
    assert_eq!(retried["outcome"], "rolled-back", "{retried:#}");
    assert_eq!(crate::scope(&retried, "api")["result"], "rolled-back");
    assert_consistent(&host, &first);
    assert_eq!(
        host.unit_property("app-api.service", "ActiveState"),
        "active"
    );
    assert_eq!(
        containers(&host),
        Vec::<String>::new(),
        "no container of the failed form is left"
    );
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &first[..7]))));
    assert_eq!(host.failed_commit(), bad.as_str());
}

/// Killed with web's old container kept as `.moorline-prev` and no new one,
/// then web is cut over to native before the agent comes back: the kept
/// container must not outlive the cutover.
#[test]
fn docker_killed_after_stop_then_cut_over_to_native_leaves_no_kept_container() {
    let (mut host, first) = docker_host();
    let web = host.container("app-web");
    kill_at(&mut host, "after-stop", "web v2", web_v2);
    assert_eq!(
        containers(&host),
        [format!("{web}.moorline-prev exited {first}")],
        "killed with the old container kept and no new one"
    );
    let native = host.commit_and_push("web: back to native", |work| {
        set_owner(work, "web", "native")
    });
    host.start_agent();
    let rollout = host.wait_rollout(&native);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(crate::scope(&rollout, "web")["action"], "cutover");
    assert_consistent(&host, &native);
    assert_eq!(containers(&host), Vec::<String>::new());
    assert_eq!(
        host.unit_property("app-web.service", "ActiveState"),
        "active"
    );
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v2")),
        Some(true)
    );
}

/// The audit writes its record before it stops a foreign member: a kill
/// there is closed as interrupted, and the next start stops the member.
#[cfg(feature = "fault-injection")]
#[test]
fn killed_during_the_audit_the_foreign_member_is_stopped_on_restart() {
    let mut host = worker_started_beside_its_container();
    host.launch_agent_with(&[("MOORLINE_FAULT", "during-audit")]);
    let status = host.wait_agent_exit(Duration::from_secs(60));
    assert_eq!(
        status.signal(),
        Some(9),
        "killed during the audit: {status}"
    );
    let open = host
        .history()
        .into_iter()
        .find(|r| r["trigger"] == "audit")
        .expect("the audit is on record before its first stop");
    assert_eq!(open["outcome"], "in-progress", "{open:#}");
    assert_eq!(
        host.unit_property("app-worker.service", "ActiveState"),
        "active"
    );

    host.start_agent();
    wait_for(
        "the audit to stop app-worker.service",
        Duration::from_secs(30),
        || (host.unit_property("app-worker.service", "ActiveState") == "inactive").then_some(()),
    );
    let audits = wait_for("both audits in history", Duration::from_secs(10), || {
        let found: Vec<Value> = host
            .history()
            .into_iter()
            .filter(|r| r["trigger"] == "audit")
            .collect();
        (found.len() == 2 && found[0]["outcome"] != "in-progress").then_some(found)
    });
    // Newest first: the audit that stopped it, then the interrupted one.
    assert_eq!(audits[0]["outcome"], "succeeded", "{:#}", audits[0]);
    assert_eq!(
        audits[0]["journal"]
            .as_array()
            .and_then(|j| j.last())
            .map(|j| (j["step"].clone(), j["state"].clone())),
        Some(("stop app-worker.service".into(), "done".into()))
    );
    assert_eq!(audits[1]["outcome"], "interrupted", "{:#}", audits[1]);
    assert_eq!(
        audits[1]["error"],
        "the agent stopped before any change was made"
    );
}
