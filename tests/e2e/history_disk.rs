//! Disk full on the history database: the whole state directory (sled
//! database, releases, status snapshot, control socket) sits on a small
//! tmpfs that is filled to the last byte while the agent runs. A rollout
//! then must not touch anything running, the store must stay readable, and
//! after space is freed and the agent restarted no record is lost and the
//! next commit deploys.

use std::io::Write;
use std::time::Duration;

use serde_json::Value;

use crate::git_faults::SmallDisk;
use crate::harness::{Host, wait_for};

fn invocations(host: &Host) -> [String; 3] {
    ["app-api.service", "app-web.service", "app-worker.service"]
        .map(|u| host.unit_property(u, "InvocationID"))
}

/// Write zeros to `path` until the disk refuses; the file is left in place.
fn fill(path: &std::path::Path) {
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    loop {
        if let Err(e) = file.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(28), "filled up: {e}");
            break;
        }
    }
    // Single bytes into whatever is left of the last page.
    while file.write_all(&[0]).is_ok() {}
    let _ = file.sync_all();
}

fn ids(history: &[Value]) -> Vec<u64> {
    history.iter().filter_map(|r| r["id"].as_u64()).collect()
}

/// The agent's report once it is idle with `commit` as the branch's head.
fn idle_at(host: &Host, commit: &str) -> Value {
    wait_for("the agent to be idle", Duration::from_secs(60), || {
        let status = host.json(&["status", "--json"]);
        (status["agent"]["activity"] == "idle" && status["source"]["desired_commit"] == commit)
            .then_some(status)
    })
}

#[test]
fn a_full_disk_under_the_history_database_touches_nothing_and_loses_no_record() {
    let mut host = Host::new();
    let disk = SmallDisk::mount_sized(&host.state_dir(), "32m");
    let first = host.deployed();
    let docs = host.commit_and_push("docs only", |work| {
        std::fs::write(work.join("NOTES.md"), "notes\n").expect("write");
    });
    host.sync();
    assert_eq!(host.wait_rollout(&docs)["outcome"], "succeeded");
    let before = invocations(&host);
    let recorded = host.history();

    // Nothing left on the device: the release cannot be written and the
    // history database runs out of room while recording that.
    let filler = host.state_dir().join("filler");
    fill(&filler);
    let full = host.commit_and_push("api v2 on a full disk", |work| {
        std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write");
    });
    host.sync();
    let status = idle_at(&host, &full);
    let store_error = format!(
        "cannot write the history database at \"{}\": IO error: Os {{ code: 28, kind: StorageFull, message: \"No space left on device\" }}",
        host.state_dir().join("history").display()
    );
    assert_eq!(status["agent"]["error"], store_error.as_str(), "{status:#}");
    assert_eq!(status["source"]["deployed_commit"], docs.as_str());
    // The rollout was put on record before its first side effect (sled
    // still had room in its log) or refused before it; it never finished.
    let of_full: Vec<Value> = host
        .history()
        .into_iter()
        .filter(|r| r["commit"] == full.as_str())
        .collect();
    assert!(
        of_full.iter().all(|r| r["outcome"] == "in-progress"),
        "{of_full:#?}"
    );

    // The store keeps refusing: the next commit is not started at all.
    let later = host.commit_and_push("api v3", |work| {
        std::fs::write(work.join("services/api/VERSION"), "v3\n").expect("write");
    });
    host.sync();
    let status = idle_at(&host, &later);
    assert_eq!(status["agent"]["error"], store_error.as_str(), "{status:#}");
    assert!(
        host.history().iter().all(|r| r["commit"] != later.as_str()),
        "no rollout of {later} was started"
    );
    let text = String::from_utf8_lossy(&host.moorline(&["status"]).stdout).into_owned();
    assert!(
        text.contains(&format!("\nerror:     {store_error}\n")),
        "{text}"
    );
    assert_eq!(invocations(&host), before, "nothing restarted");
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &first[..7]))));

    // Space freed, agent down: the database opens and reads offline.
    host.stop_agent();
    std::fs::remove_file(&filler).expect("free the disk");
    let offline = host.history();
    assert_eq!(&offline[offline.len() - recorded.len()..], &recorded[..]);

    // Restarted: every record is there, the open one closed, and the
    // branch's commit deploys.
    host.start_agent();
    let rollout = host.wait_rollout(&later);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(host.api(), Some((200, format!("ok v3 {}\n", &later[..7]))));
    let history = host.history();
    assert_eq!(&history[history.len() - recorded.len()..], &recorded[..]);
    if !of_full.is_empty() {
        let closed = history
            .iter()
            .find(|r| r["commit"] == full.as_str())
            .expect("the open rollout is kept");
        assert_eq!(closed["outcome"], "interrupted", "{closed:#}");
        // Whether the checkout's intent reached the full disk is up to
        // sled's buffers; the error says what the journal holds.
        let journaled = closed["journal"].as_array().is_some_and(|j| !j.is_empty());
        let error = match journaled {
            true => format!(
                "the agent stopped during \"check out release {}\"",
                &full[..7]
            ),
            false => "the agent stopped before any change was made".to_string(),
        };
        assert_eq!(closed["error"], error.as_str(), "{closed:#}");
    }
    let mut numbers = ids(&history);
    numbers.reverse();
    assert_eq!(
        numbers,
        (1..=numbers.len() as u64).collect::<Vec<_>>(),
        "ids have no gaps"
    );
    for id in &numbers {
        let show = host.moorline(&["show", &id.to_string(), "--json"]);
        assert!(show.status.success(), "show {id}");
    }
    let status = host.json(&["status", "--json"]);
    assert!(status["agent"]["error"].is_null(), "{status:#}");
    assert!(status["source"]["failed_commit"].is_null(), "{status:#}");
    assert!(
        !host
            .state_dir()
            .join("releases")
            .join(format!(".partial-{full}"))
            .exists(),
        "no half-written release"
    );
    drop(host);
    drop(disk);
}
