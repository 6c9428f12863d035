//! Least privilege, checked on a running agent: owner-only state and
//! control socket, the socket refusing another uid, secrets kept out of
//! logs, history and status, and builds and exec checks running in the
//! release as the agent's user.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::harness::{self, Host};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Every path under `dir` outside `releases/`, with its mode.
fn modes(dir: &Path, out: &mut Vec<(String, u32, bool)>) {
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let entry = entry.expect("entry");
        let path = entry.path();
        let kind = entry.file_type().expect("type");
        out.push((path.display().to_string(), mode(&path), kind.is_dir()));
        if kind.is_dir() && entry.file_name() != "releases" {
            modes(&path, out);
        }
    }
}

/// Connect to the control socket as `uid` and ask for the status; what
/// came back (empty when the agent closed or reset the connection unanswered).
fn ask_as(uid: u32, socket: &Path) -> String {
    let script = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
data = b''
try:
    s.sendall(b'{"cmd":"status"}\n')
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
except (BrokenPipeError, ConnectionResetError):
    pass
sys.stdout.write(data.decode()[:40])
"#;
    let output = Command::new("python3")
        .args(["-c", script, socket.to_str().expect("utf-8")])
        .uid(uid)
        .gid(uid)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "client as {uid}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn state_and_control_socket_are_owner_only_and_another_uid_gets_no_answer() {
    let mut host = Host::new();
    let first = host.deployed();
    host.sync();
    let _ = host.wait_rollout(&first);

    let state = host.state_dir();
    // The snapshot is written in the background once the loop is idle.
    harness::wait_for(
        "the status snapshot",
        std::time::Duration::from_secs(20),
        || state.join("status.json").exists().then_some(()),
    );
    assert_eq!(mode(&state), 0o700);
    let socket = state.join("agent.sock");
    assert_eq!(mode(&socket), 0o600);
    let mut found = Vec::new();
    modes(&state, &mut found);
    for wanted in ["history", "status.json", "releases", "agent.sock"] {
        assert!(
            found.iter().any(|(p, _, _)| p.ends_with(wanted)),
            "{wanted} missing: {found:?}"
        );
    }
    for (path, mode, is_dir) in &found {
        let expected = if *is_dir { 0o700 } else { 0o600 };
        assert_eq!(*mode, expected, "{path} is {mode:o}");
    }

    // The agent's own user (root here) gets an answer...
    assert!(
        ask_as(0, &socket).starts_with("{\"status\":"),
        "the owner is answered"
    );
    // ...another user who can reach the socket (opened up on purpose here)
    // is closed unanswered by the peer uid check.
    let mut dir = socket.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d == Path::new("/") || d == Path::new("/tmp") {
            break;
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).expect("open dir");
        dir = d.parent().map(Path::to_path_buf);
    }
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("open socket");
    assert_eq!(ask_as(65534, &socket), "", "another uid gets no answer");
    let log = host.agent_log();
    assert!(
        log.contains("refused a control connection from another user uid=65534"),
        "{log}"
    );
}

#[test]
fn secrets_stay_out_of_logs_history_and_status_and_builds_run_in_the_release_as_the_agent() {
    const UNIT_SECRET: &str = "s3cret-unit-value-81f2";
    const WEBHOOK_SECRET: &str = "s3cret-webhook-value-77a0";
    let mut host = Host::new();
    let secret_file = host.home().join(".config/moorline/webhook.secret");
    std::fs::write(&secret_file, format!("{WEBHOOK_SECRET}\n")).expect("secret");
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let port = harness::free_port();
    let config = std::fs::read_to_string(host.config_path()).expect("config");
    let config = config.replace(
        "[trigger]\nwatch = false\n",
        &format!(
            "[trigger]\nwatch = false\nwebhook = {{ listen = \"127.0.0.1:{port}\", secret_file = \"{}\" }}\n",
            secret_file.display()
        ),
    );
    std::fs::write(host.config_path(), config).expect("config");

    let where_log = host.root.path().join("where.log");
    let commit = host.commit_and_push("a secret in the unit, builds that say where they run", |work| {
        let unit = work.join("deploy/units/app-api.service");
        let text = std::fs::read_to_string(&unit).expect("unit");
        std::fs::write(&unit, text.replace("[Service]\n", &format!("[Service]\nEnvironment=API_TOKEN={UNIT_SECRET}\n")))
            .expect("unit");
        let manifest = work.join("deploy/moorline.toml");
        let text = std::fs::read_to_string(&manifest).expect("manifest");
        let text = text.replace(
            "build = [\"./build-api.sh\"]",
            &format!("build = [\"./build-api.sh\", \"echo build $(id -u) $PWD >> {}\"]", where_log.display()),
        );
        let text = text.replacen(
            "body_contains = \"ok\"\n",
            &format!(
                "body_contains = \"ok\"\n\n[[scopes.api.health]]\nexec = [\"sh\", \"-c\", \"echo exec $(id -u) $PWD >> {}\"]\n",
                where_log.display()
            ),
            1,
        );
        std::fs::write(&manifest, text).expect("manifest");
    });
    host.start_agent();
    let rollout = host.wait_rollout(&commit);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    let environment = host.unit_property("app-api.service", "Environment");
    assert!(
        environment.contains(UNIT_SECRET),
        "the unit got its environment: {environment}"
    );

    let release = host.state_dir().join("releases").join(&commit);
    let uid = rustix_uid();
    let lines: Vec<String> = std::fs::read_to_string(&where_log)
        .expect("builds and checks ran")
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(
        lines.first().map(String::as_str),
        Some(format!("build {uid} {}", release.display()).as_str())
    );
    assert!(
        lines
            .iter()
            .skip(1)
            .all(|l| *l == format!("exec {uid} {}", release.display())),
        "{lines:?}"
    );
    assert!(lines.len() >= 2, "{lines:?}");

    let mut seen = vec![
        (
            "status",
            String::from_utf8_lossy(&host.moorline(&["status", "--json"]).stdout).into_owned(),
        ),
        (
            "status text",
            String::from_utf8_lossy(&host.moorline(&["status"]).stdout).into_owned(),
        ),
        (
            "history",
            String::from_utf8_lossy(&host.moorline(&["history", "--json"]).stdout).into_owned(),
        ),
        (
            "show",
            String::from_utf8_lossy(
                &host
                    .moorline(&["show", &rollout["id"].to_string(), "--json"])
                    .stdout,
            )
            .into_owned(),
        ),
    ];
    host.stop_agent();
    seen.push(("agent log", host.agent_log()));
    let mut files = Vec::new();
    modes(&host.state_dir(), &mut files);
    for (path, _, is_dir) in files {
        if !is_dir && !path.ends_with("agent.sock") {
            seen.push((
                "state file",
                String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned(),
            ));
        }
    }
    assert!(seen.len() > 5, "the history database files were read");
    for (what, text) in &seen {
        for secret in [UNIT_SECRET, WEBHOOK_SECRET] {
            assert!(!text.contains(secret), "{what} contains a secret:\n{text}");
        }
    }
}

fn rustix_uid() -> u32 {
    let output = Command::new("id").arg("-u").output().expect("id runs");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("a uid")
}

/// The uid and gid of a system user for tests, created once.
fn test_user() -> (u32, u32) {
    const NAME: &str = "moorline-e2e";
    let id = |flag: &str| {
        Command::new("id")
            .args([flag, NAME])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<u32>()
                    .ok()
            })
    };
    if id("-u").is_none() {
        // Another test process may create it at the same moment: judged by `id` after.
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                NAME,
            ])
            .status();
    }
    (
        id("-u").expect("the test user exists"),
        id("-g").expect("the test user has a group"),
    )
}

fn owner_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .uid()
}

/// The agent run by an unprivileged user with its own user manager, as on
/// a real host: builds, checks and units run as that user, everything the
/// agent keeps is that user's only, and root's CLI gets no answer from the
/// control socket.
#[test]
fn an_unprivileged_agent_deploys_as_its_user_and_keeps_its_state_to_itself() {
    let (uid, gid) = test_user();
    assert_ne!(uid, 0);
    let mut host = Host::for_user(uid, gid);
    let where_log = host.home().join("where.log");
    let commit = host.commit_and_push("builds and checks say who runs them", |work| {
        let manifest = work.join("deploy/moorline.toml");
        let text = std::fs::read_to_string(&manifest).expect("manifest");
        let text = text.replace(
            "build = [\"./build-api.sh\"]",
            &format!(
                "build = [\"./build-api.sh\", \"echo build $(id -u) >> {}\"]",
                where_log.display()
            ),
        );
        let text = text.replacen(
            "body_contains = \"ok\"\n",
            &format!(
                "body_contains = \"ok\"\n\n[[scopes.api.health]]\nexec = [\"sh\", \"-c\", \"echo exec $(id -u) >> {}\"]\n",
                where_log.display()
            ),
            1,
        );
        std::fs::write(&manifest, text).expect("manifest");
    });
    host.start_agent();
    let rollout = host.wait_rollout(&commit);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &commit[..7]))));

    let lines = std::fs::read_to_string(&where_log).expect("builds and checks ran");
    assert!(lines.starts_with(&format!("build {uid}\n")), "{lines}");
    assert!(
        lines.lines().skip(1).all(|l| l == format!("exec {uid}")),
        "{lines}"
    );
    // The unit's process is the user's too.
    let pid = host.unit_property("app-api.service", "MainPID");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let real_uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .expect("Uid line");
    assert_eq!(real_uid, uid.to_string());

    let state = host.state_dir();
    let mut files = Vec::new();
    modes(&state, &mut files);
    assert!(files.len() > 3, "{files:?}");
    for (path, mode, _) in &files {
        let path = Path::new(path);
        assert_eq!(
            owner_of(path),
            uid,
            "{} belongs to the agent's user",
            path.display()
        );
        assert_eq!(
            *mode & 0o077,
            0,
            "{} is {mode:o}: not owner-only",
            path.display()
        );
    }
    assert_eq!(mode(&state) & 0o777, 0o700);
    // Root's own client (not the agent's uid) is answered nothing.
    let socket = state.join("agent.sock");
    assert_eq!(ask_as(0, &socket), "", "root gets no answer either");
    let log = host.agent_log();
    assert!(
        log.contains("refused a control connection from another user uid=0"),
        "{log}"
    );
}
