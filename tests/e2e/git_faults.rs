//! Faults of the source and the disk against the running agent: a corrupt
//! object, a 50 MB file, a rewritten branch, an unreachable repository and
//! a full disk. Each is reported, nothing half-written is left, and nothing
//! that runs is touched.

use std::process::Command;
use std::time::Duration;

use crate::harness::{self, Host, wait_for};

fn invocations(host: &Host) -> [String; 3] {
    ["app-api.service", "app-web.service", "app-worker.service"]
        .map(|u| host.unit_property(u, "InvocationID"))
}

fn no_partial_release(host: &Host, commit: &str) {
    let releases = host.state_dir().join("releases");
    assert!(!releases.join(commit).exists(), "no release of {commit}");
    assert!(
        !releases.join(format!(".partial-{commit}")).exists(),
        "no half-written release of {commit}"
    );
}

#[test]
fn corrupt_objects_fail_cleanly_huge_files_deploy_and_rewrites_need_allow_force_push() {
    let mut host = Host::new();
    let first = host.deployed();
    let before = invocations(&host);

    // A truncated loose object in the source: the checkout cannot read it.
    let corrupt = host.commit_and_push("api data", |work| {
        std::fs::write(
            work.join("services/api/data.txt"),
            "api data that will be truncated\n",
        )
        .expect("write");
    });
    let blob = harness::git(
        &host.bare(),
        &["rev-parse", &format!("{corrupt}:services/api/data.txt")],
    );
    let object = host
        .bare()
        .join("objects")
        .join(&blob[..2])
        .join(&blob[2..]);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&object)
        .expect("a loose object");
    file.set_len(5).expect("truncate");
    drop(file);
    host.sync();
    let rollout = host.wait_rollout(&corrupt);
    assert_eq!(rollout["outcome"], "failed", "{rollout:#}");
    let error = rollout["error"].as_str().expect("error");
    assert!(
        error.starts_with(&format!(
            "cannot read \"services/api/data.txt\" of commit {corrupt}: "
        )),
        "{error}"
    );
    no_partial_release(&host, &corrupt);
    assert_eq!(invocations(&host), before, "nothing restarted");

    // The next commit no longer needs the broken object and deploys; a
    // 50 MB file in it is checked out whole.
    let huge = host.commit_and_push("drop the data, add a 50 MB asset", |work| {
        std::fs::remove_file(work.join("services/api/data.txt")).expect("rm");
        let asset = std::fs::File::create(work.join("services/api/asset.bin")).expect("asset");
        asset.set_len(50 * 1024 * 1024).expect("50 MB");
    });
    host.sync();
    let rollout = host.wait_rollout(&huge);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    let asset = host
        .state_dir()
        .join("releases")
        .join(&huge)
        .join("services/api/asset.bin");
    assert_eq!(
        std::fs::metadata(&asset).expect("asset").len(),
        50 * 1024 * 1024
    );

    // A force-push that rewrites the branch is refused and shown in status.
    let work = host.work();
    harness::git(&work, &["reset", "-q", "--hard", &first]);
    std::fs::write(
        work.join("services/web/www/index.html"),
        "<p>web rewritten</p>\n",
    )
    .expect("write");
    harness::git(&work, &["commit", "-q", "-am", "rewritten history"]);
    harness::git(&work, &["push", "-q", "-f", "origin", "main"]);
    let rewritten = harness::git(&work, &["rev-parse", "HEAD"]);
    let before = invocations(&host);
    host.sync();
    let rollout = host.wait_rollout(&rewritten);
    assert_eq!(rollout["outcome"], "failed", "{rollout:#}");
    let refusal = format!(
        "branch \"main\" was rewritten: {} does not descend from the deployed commit {}; set allow_force_push = true in \"{}\" to deploy it",
        &rewritten[..7],
        &huge[..7],
        host.config_path().display()
    );
    assert_eq!(rollout["error"], refusal.as_str());
    let status = host.json(&["status", "--json"]);
    assert_eq!(status["source"]["deployed_commit"], huge.as_str());
    assert_eq!(status["source"]["failed_commit"], rewritten.as_str());
    assert_eq!(status["last_rollout"]["error"], refusal.as_str());
    let text = String::from_utf8_lossy(&host.moorline(&["status"]).stdout).into_owned();
    assert!(text.contains("was rewritten"), "{text}");
    assert_eq!(invocations(&host), before, "nothing restarted");

    // Allowed, the next commit on the rewritten branch deploys.
    host.stop_agent();
    let config = std::fs::read_to_string(host.config_path()).expect("config");
    std::fs::write(
        host.config_path(),
        config.replace(
            "poll = \"60s\"\n",
            "poll = \"60s\"\nallow_force_push = true\n",
        ),
    )
    .expect("config");
    let next = host.commit_and_push("web on the rewritten branch", |work| {
        std::fs::write(
            work.join("services/web/www/index.html"),
            "<p>web after rewrite</p>\n",
        )
        .expect("write");
    });
    host.start_agent();
    let rollout = host.wait_rollout(&next);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(
        host.web()
            .map(|(_, body)| body.contains("web after rewrite")),
        Some(true)
    );
    assert_eq!(
        host.json(&["status", "--json"])["source"]["deployed_commit"],
        next.as_str()
    );
}

#[test]
fn an_unreachable_source_is_reported_backed_off_and_deploys_nothing() {
    let mut host = Host::new();
    let missing = host.root.path().join("moved-away.git");
    let config = std::fs::read_to_string(host.config_path()).expect("config");
    std::fs::write(
        host.config_path(),
        config.replace(
            &host.bare().display().to_string(),
            &missing.display().to_string(),
        ),
    )
    .expect("config");
    host.start_agent();
    let status = wait_for("the fetch error in status", Duration::from_secs(20), || {
        let status = host.json(&["status", "--json"]);
        (!status["source"]["last_fetch_error"].is_null() && status["agent"]["activity"] == "idle")
            .then_some(status)
    });
    let error = status["source"]["last_fetch_error"]
        .as_str()
        .expect("error");
    assert!(
        error.starts_with(&format!(
            "cannot open repository \"{}\": ",
            missing.display()
        )),
        "{error}"
    );
    assert!(status["source"]["deployed_commit"].is_null());
    assert_eq!(status["scopes"], serde_json::json!([]));
    host.sync();
    wait_for("a second failed fetch", Duration::from_secs(20), || {
        host.agent_log().contains("failures=2").then_some(())
    });
    assert!(host.history().is_empty(), "no rollout was recorded");
    assert_eq!(
        host.unit_property("app-api.service", "LoadState"),
        "not-found"
    );
}

/// A small tmpfs mounted over a directory of the state, unmounted on drop.
pub(crate) struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(at: &std::path::Path) -> SmallDisk {
        SmallDisk::mount_sized(at, "4m")
    }

    /// A tmpfs of `size` (as `mount -o size=` takes it) at `at`.
    pub(crate) fn mount_sized(at: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(at).expect("mount point");
        let output = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "moorline-test",
                at.to_str().expect("utf-8"),
            ])
            .output()
            .expect("mount runs");
        assert!(
            output.status.success(),
            "the disk-full test needs to mount a tmpfs (run as root): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        SmallDisk(at.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazy: units of a failed test may still have their cwd in it.
        let _ = Command::new("umount")
            .args(["-l", self.0.to_str().unwrap_or("")])
            .status();
    }
}

#[test]
fn a_full_disk_fails_the_rollout_cleanly_and_freeing_space_lets_the_next_deploy() {
    let mut host = Host::new();
    let disk = SmallDisk::mount(&host.state_dir().join("releases"));
    let first = host.deployed();
    let before = invocations(&host);

    let full = host.commit_and_push("api with an asset bigger than the disk", |work| {
        std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write");
        let asset = std::fs::File::create(work.join("services/api/asset.bin")).expect("asset");
        asset.set_len(6 * 1024 * 1024).expect("6 MB");
    });
    host.sync();
    let rollout = host.wait_rollout(&full);
    assert_eq!(rollout["outcome"], "failed", "{rollout:#}");
    let error = rollout["error"].as_str().expect("error");
    let partial = host
        .state_dir()
        .join("releases")
        .join(format!(".partial-{full}"));
    assert_eq!(
        error,
        format!(
            "cannot write release \"{}\": No space left on device (os error 28)",
            partial.join("services/api/asset.bin").display()
        )
    );
    no_partial_release(&host, &full);
    assert_eq!(invocations(&host), before, "nothing restarted");
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &first[..7]))));
    let shown = host.moorline(&["show", &rollout["id"].to_string()]);
    assert!(shown.status.success(), "the store stays readable");

    let fits = host.commit_and_push("api v2 without the asset", |work| {
        std::fs::remove_file(work.join("services/api/asset.bin")).expect("rm");
    });
    host.sync();
    let rollout = host.wait_rollout(&fits);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(host.api(), Some((200, format!("ok v2 {}\n", &fits[..7]))));
    drop(host);
    drop(disk);
}

#[test]
fn a_remote_that_never_answers_times_out_within_fetch_timeout_while_status_answers() {
    // A remote that accepts connections and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = silent.local_addr().expect("addr").port();
    let (accepted_tx, accepted) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            let _ = accepted_tx.send(());
            held.push(stream);
        }
    });
    let mut host = Host::new();
    let url = format!("http://127.0.0.1:{port}/app.git");
    let config = std::fs::read_to_string(host.config_path()).expect("config");
    let config = config
        .lines()
        .map(|l| {
            if l.starts_with("url = ") {
                format!("url = \"{url}\"\nfetch_timeout = \"2s\"")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(host.config_path(), config).expect("config");
    host.start_agent();
    accepted
        .recv_timeout(Duration::from_secs(20))
        .expect("the agent connected to the remote");
    // While the fetch hangs, status answers, and says so.
    wait_for(
        "status during the hung fetch",
        Duration::from_secs(10),
        || {
            let status = host.json(&["status", "--json"]);
            (status["agent"]["activity"] == "fetching").then_some(())
        },
    );
    let status = wait_for("the timeout in status", Duration::from_secs(20), || {
        let status = host.json(&["status", "--json"]);
        (!status["source"]["last_fetch_error"].is_null()).then_some(status)
    });
    assert_eq!(
        status["source"]["last_fetch_error"],
        format!("fetch of \"{url}\" timed out after 2s (fetch_timeout)").as_str()
    );
    // It backs off like any failed fetch, and nothing was rolled out.
    assert_eq!(status["agent"]["activity"], "idle", "{status:#}");
    assert!(!status["source"]["next_fetch"].is_null());
    assert!(host.history().is_empty());
    assert!(
        host.agent_log().contains("fetch failed"),
        "{}",
        host.agent_log()
    );
    // `moorline plan` fetches too, within the same limit.
    let plan = host.moorline(&["plan"]);
    assert_eq!(plan.status.code(), Some(2), "{plan:?}");
    assert_eq!(
        String::from_utf8_lossy(&plan.stderr),
        format!("error: fetch of \"{url}\" timed out after 2s (fetch_timeout)\n")
    );
    // `moorline init` gives up as soon, and writes nothing.
    let home = host.root.path().join("new-home");
    let init = harness::init_in(&home, &["--url", &url, "--fetch-timeout", "2s"]);
    assert_eq!(init.status.code(), Some(2), "{init:?}");
    assert_eq!(
        String::from_utf8_lossy(&init.stderr),
        format!(
            "error: cannot read the source: fetch of \"{url}\" timed out after 2s (fetch_timeout)\nnothing was written\n"
        )
    );
    assert!(!home.join(".config/moorline/config.toml").exists());
}
