//! What wakes the agent besides `moorline sync`: the filesystem watch of a
//! local repository, a signed webhook, and polling with back-off while the
//! repository is gone — each through the real binary and real git pushes.

use std::time::{Duration, SystemTime};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::harness::{self, Host, http_post, wait_for};

fn source(host: &Host) -> Value {
    host.json(&["status", "--json"])["source"].clone()
}

/// An edit of the work tree that makes the web front end say `version`.
fn web_version(version: &str) -> impl FnOnce(&std::path::Path) {
    let html = format!("<p>web {version}</p>\n");
    move |work| {
        std::fs::write(work.join("services/web/www/index.html"), html).expect("write index.html")
    }
}

fn time(text: &Value) -> SystemTime {
    let text = text
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {text}"));
    humantime::parse_rfc3339(text).unwrap_or_else(|e| panic!("not an RFC 3339 time {text:?}: {e}"))
}

fn github_signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The `[trigger]` body of a host with a webhook on `port` using `secret`.
fn webhook_trigger(watch: bool, port: u16, secret: &std::path::Path) -> String {
    format!(
        "watch = {watch}\nwebhook = {{ listen = \"127.0.0.1:{port}\", secret_file = \"{}\" }}\n",
        secret.display()
    )
}

#[test]
fn a_push_deploys_through_the_watch_and_pushes_during_a_rollout_are_coalesced() {
    let mut host = Host::new();
    host.configure("60s", "watch = true\n");
    let first = harness::git(&host.work(), &["rev-parse", "HEAD"]);
    host.start_agent();
    assert_eq!(host.wait_rollout(&first)["trigger"], "startup");
    let status = source(&host);
    assert_eq!(status["watch"], "active", "{status:#}");
    assert_eq!(status["webhook"], "off", "{status:#}");
    assert_eq!(status["queued"], Value::Null, "{status:#}");

    // No sync: the push alone deploys, well before the 60 s poll.
    let second = host.commit_and_push("web: v2", web_version("v2"));
    let rollout = host.wait_rollout(&second);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(rollout["trigger"], "watch");
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v2")),
        Some(true)
    );

    // A rollout held in its build until the test opens a gate.
    let gate = host.root.path().join("gate");
    let script = format!(
        "#!/bin/sh\nset -e\ni=0\nwhile [ ! -e '{}' ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done\n\
         echo \"$MOORLINE_COMMIT\" >> \"${{MOORLINE_BUILD_LOG:-/dev/null}}\"\n",
        gate.display()
    );
    let held = host.commit_and_push("api: a build that waits for the gate", |work| {
        std::fs::write(work.join("build-api.sh"), &script).expect("write build-api.sh");
        std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write VERSION");
    });
    wait_for("the held rollout to start", Duration::from_secs(30), || {
        host.history()
            .into_iter()
            .find(|r| r["commit"] == held.as_str() && r["outcome"] == "in-progress")
    });
    let third = host.commit_and_push("web: v3", web_version("v3"));
    let queued = wait_for("the push to be queued", Duration::from_secs(30), || {
        source(&host)["queued"].as_str().map(str::to_string)
    });
    let at = queued
        .strip_prefix("watch wake-up at ")
        .unwrap_or_else(|| panic!("queued: {queued:?}"));
    assert!(humantime::parse_rfc3339(at).is_ok(), "queued: {queued:?}");
    let fourth = host.commit_and_push("web: v4", web_version("v4"));
    // The agent goes on reading wake-ups during the rollout: the fourth push
    // is seen and folded into the one queued fetch.
    let coalesced = format!("{queued} (and 1 more, coalesced)");
    wait_for(
        "the fourth push to be coalesced",
        Duration::from_secs(30),
        || (source(&host)["queued"] == coalesced.as_str()).then_some(()),
    );
    std::fs::write(&gate, "").expect("open the gate");

    assert_eq!(host.wait_rollout(&held)["outcome"], "succeeded");
    let rollout = host.wait_rollout(&fourth);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(rollout["trigger"], "watch");
    assert_eq!(
        rollout["previous_commit"],
        held.as_str(),
        "the agent went from the held rollout straight to the newest commit"
    );
    assert!(
        host.history().iter().all(|r| r["commit"] != third.as_str()),
        "the commit pushed in between was never rolled out on its own"
    );
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v4")),
        Some(true)
    );
    wait_for("the queue to empty", Duration::from_secs(20), || {
        let status = source(&host);
        (status["queued"] == Value::Null
            && host.json(&["status", "--json"])["agent"]["activity"] == "idle")
            .then_some(())
    });
    assert_eq!(
        host.history()
            .iter()
            .filter(|r| r["commit"] == fourth.as_str())
            .count(),
        1,
        "two queued pushes made one rollout"
    );
}

#[test]
fn a_signed_webhook_deploys_and_a_badly_signed_one_wakes_nothing() {
    let mut host = Host::new();
    let port = harness::free_port();
    let secret_file = host.root.path().join("webhook.secret");
    std::fs::write(&secret_file, "s3cret\n").expect("write secret");
    host.configure("60s", &webhook_trigger(false, port, &secret_file));
    host.deployed();
    let status = source(&host);
    assert_eq!(
        status["webhook"],
        format!("listening on 127.0.0.1:{port}"),
        "{status:#}"
    );
    assert_eq!(status["watch"], "off", "{status:#}");
    let text = String::from_utf8_lossy(&host.moorline(&["status"]).stdout).to_string();
    assert!(
        text.contains(&format!("\nwebhook:   listening on 127.0.0.1:{port}\n")),
        "{text}"
    );

    let body = br#"{"ref":"refs/heads/main","after":"0000000000000000000000000000000000000000"}"#;
    let second = host.commit_and_push("web: v2", web_version("v2"));
    let forged = github_signature(b"not the secret", body);
    let answer = http_post(
        port,
        "/hook",
        &[("X-GitHub-Event", "push"), ("X-Hub-Signature-256", &forged)],
        body,
    );
    assert_eq!(answer, Some((401, "bad signature\n".to_string())));
    // Had the refused request woken the agent, its wake would be ahead of
    // this sync and the rollout would say "webhook".
    host.sync();
    let rollout = host.wait_rollout(&second);
    assert_eq!(rollout["trigger"], "sync", "{rollout:#}");

    let third = host.commit_and_push("web: v3", web_version("v3"));
    let signed = github_signature(b"s3cret", body);
    let answer = http_post(
        port,
        "/hook",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "d-1"),
            ("X-Hub-Signature-256", &signed),
        ],
        body,
    );
    assert_eq!(
        answer,
        Some((202, "accepted: push to \"refs/heads/main\"\n".to_string()))
    );
    let rollout = host.wait_rollout(&third);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(rollout["trigger"], "webhook");
    assert_eq!(
        host.web().map(|(_, body)| body.contains("web v3")),
        Some(true)
    );
    assert!(
        !host.agent_log().contains("s3cret"),
        "the secret is never logged"
    );

    // The listener stops with the agent.
    host.stop_agent();
    assert_eq!(http_post(port, "/hook", &[], b"{}"), None);
}

#[test]
fn a_vanished_repository_backs_polling_off_and_the_agent_recovers_when_it_returns() {
    let mut host = Host::new();
    let missing_secret = host.root.path().join("absent.secret");
    let port = harness::free_port();
    host.configure("1s", &webhook_trigger(true, port, &missing_secret));
    let first = host.deployed();
    let status = source(&host);
    assert_eq!(
        status["webhook"],
        format!(
            "failed: cannot read the webhook secret file \"{}\": No such file or directory (os error 2); polling every 1s",
            missing_secret.display()
        ),
        "{status:#}"
    );
    assert_eq!(status["watch"], "active", "{status:#}");

    let moved = host.root.path().join("app.moved");
    std::fs::rename(host.bare(), &moved).expect("move the repository away");
    let status = wait_for(
        "the fetch error and a backed-off next attempt",
        Duration::from_secs(30),
        || {
            let status = source(&host);
            let backed_off = status["last_fetch_error"].is_string()
                && status["next_fetch"].is_string()
                && time(&status["next_fetch"])
                    .duration_since(time(&status["last_fetch"]))
                    .is_ok_and(|d| d >= Duration::from_secs(3));
            backed_off.then_some(status)
        },
    );
    assert_eq!(
        status["last_fetch_error"],
        format!(
            "cannot open repository \"{0}\": \"{0}\" does not appear to be a git repository",
            host.bare().display()
        ),
        "{status:#}"
    );
    assert_eq!(
        status["watch"],
        format!(
            "failed: \"{}\" is not a git repository (no .git, and no HEAD, objects/ and refs/); polling every 1s",
            host.bare().display()
        ),
        "{status:#}"
    );
    assert_eq!(status["deployed_commit"], first.as_str());
    let text = String::from_utf8_lossy(&host.moorline(&["status"]).stdout).to_string();
    assert!(text.contains("\nfetch:     failed: "), "{text}");

    std::fs::rename(&moved, host.bare()).expect("move the repository back");
    wait_for("the agent to recover", Duration::from_secs(30), || {
        let status = source(&host);
        (status["last_fetch_error"] == Value::Null && status["watch"] == "active").then_some(())
    });
    let second = host.commit_and_push("web: v2", web_version("v2"));
    assert_eq!(host.wait_rollout(&second)["outcome"], "succeeded");
}
