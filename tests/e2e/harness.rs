//! A host for end-to-end tests: a private systemd user manager, a bare git
//! repository with a work clone made from `deploy-manifests/webapp`, a host
//! config and the real `moorline` binary running as the agent.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

use crate::user_manager::UserManager;

pub const BIN: &str = env!("CARGO_BIN_EXE_moorline");

/// Wait until `probe` returns `Some`, or panic with `what` after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Spread tests over the range so two bound-then-released ports of
    // concurrent tests do not collide.
    let _ = NEXT.fetch_add(1, Ordering::SeqCst);
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// `moorline init ARGS` as a new user whose home is `home`: no --config,
/// so the default path, and nothing of the test's environment.
pub fn init_in<S: AsRef<std::ffi::OsStr>>(home: &Path, args: &[S]) -> Output {
    Command::new(BIN)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .arg("init")
        .args(args)
        .output()
        .expect("moorline runs")
}

/// GET `path` on a loopback port; `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    read_response(stream)
}

/// The status and body of the answer on `stream`, read to its end.
fn read_response(mut stream: TcpStream) -> Option<(u16, String)> {
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// POST `body` to `path` on a loopback port with extra `headers`; the status
/// and body of the answer, `None` when nothing answers.
pub fn http_post(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    read_response(stream)
}

pub use crate::git_cli::git;

fn copy_tree(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).expect("read example dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            std::fs::create_dir_all(&target).expect("mkdir");
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy example file");
        }
    }
}

pub struct Host {
    pub um: UserManager,
    pub root: TempDir,
    pub web_port: u16,
    pub api_port: u16,
    /// Prefix of this host's container and image names (Docker's names are
    /// global, unlike a private user manager's units).
    pub prefix: String,
    agent: Option<Child>,
    agent_runs: u32,
}

impl Host {
    /// A host whose example repository has one commit, not yet deployed.
    pub fn new() -> Host {
        Host::with(|_| {})
    }

    /// Like `new`, with `edit` applied to the example before its first commit.
    pub fn with(edit: impl FnOnce(&Path)) -> Host {
        Host::on(UserManager::start(), |work, _| edit(work))
    }

    /// `with`, for an edit that needs the port this host's API listens on.
    pub fn new_with_ports(edit: impl FnOnce(&Path, u16)) -> Host {
        Host::on(UserManager::start(), |work, host| edit(work, host.api_port))
    }

    /// `with`, for an edit that needs the host itself (its container names).
    pub fn with_host(edit: impl FnOnce(&Path, &Host)) -> Host {
        Host::on(UserManager::start(), edit)
    }

    /// A host whose agent, CLI and user manager run as another user (the
    /// test runs as root): its home and state belong to that user; the
    /// repositories stay root's and readable by all, as a shared bare
    /// repository would be.
    pub fn for_user(uid: u32, gid: u32) -> Host {
        let host = Host::on(UserManager::start_as(uid, gid), |_, _| {});
        let chmod = |mode: &str, path: &Path| {
            let ok = Command::new("chmod")
                .args(["-R", mode])
                .arg(path)
                .status()
                .expect("chmod runs");
            assert!(ok.success(), "chmod {mode} {path:?}");
        };
        chmod("a+rX", host.root.path());
        std::fs::write(host.build_log(), "").expect("build log");
        for path in [host.home(), host.build_log()] {
            let ok = Command::new("chown")
                .args(["-R", &format!("{uid}:{gid}")])
                .arg(&path)
                .status()
                .expect("chown runs");
            assert!(ok.success(), "chown {path:?}");
        }
        host
    }

    fn on(um: UserManager, edit: impl FnOnce(&Path, &Host)) -> Host {
        static HOSTS: AtomicU64 = AtomicU64::new(0);
        let root = tempfile::Builder::new()
            .prefix("moorline-e2e-")
            .tempdir()
            .expect("tempdir");
        let host = Host {
            um,
            root,
            web_port: free_port(),
            api_port: free_port(),
            prefix: format!(
                "mlt{}x{}-",
                std::process::id(),
                HOSTS.fetch_add(1, Ordering::SeqCst)
            ),
            agent: None,
            agent_runs: 0,
        };
        let work = host.work();
        std::fs::create_dir_all(&work).expect("mkdir work");
        copy_tree(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy-manifests/webapp"),
            &work,
        );
        host.retarget_ports();
        edit(&work, &host);
        git(
            host.root.path(),
            &["init", "-q", "--bare", "-b", "main", "app.git"],
        );
        git(&work, &["init", "-q", "-b", "main"]);
        git(
            &work,
            &[
                "remote",
                "add",
                "origin",
                host.bare().to_str().expect("utf-8 path"),
            ],
        );
        host.commit_and_push("initial import", |_| {});
        std::fs::create_dir_all(host.home().join(".config/moorline")).expect("mkdir config");
        host.configure("60s", "watch = false\n");
        host
    }

    /// Write the host config with this poll interval and `[trigger]` table
    /// body. The source is named by a `file://` URL (the demo and the
    /// benchmark use a plain path).
    pub fn configure(&self, poll: &str, trigger: &str) {
        let config = format!(
            "[source]\nurl = \"file://{}\"\nbranch = \"main\"\npoll = \"{poll}\"\n\n[trigger]\n{trigger}\n[state]\ndir = \"{}\"\n",
            self.bare().display(),
            self.state_dir().display()
        );
        std::fs::write(self.config_path(), config).expect("write config");
    }

    pub fn home(&self) -> PathBuf {
        self.root.path().join("home")
    }
    pub fn work(&self) -> PathBuf {
        self.root.path().join("work")
    }
    pub fn bare(&self) -> PathBuf {
        self.root.path().join("app.git")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.home().join(".local/share/moorline")
    }
    pub fn config_path(&self) -> PathBuf {
        self.home().join(".config/moorline/config.toml")
    }
    pub fn build_log(&self) -> PathBuf {
        self.root.path().join("builds.log")
    }

    /// Rewrite the example's fixed ports to this host's own.
    fn retarget_ports(&self) {
        let work = self.work();
        for file in [
            "deploy/moorline.toml",
            "deploy/units/app-api.service",
            "deploy/units/app-web.service",
        ] {
            let path = work.join(file);
            let text = std::fs::read_to_string(&path).expect("read example file");
            let text = text
                .replace("14000", &self.api_port.to_string())
                .replace("18080", &self.web_port.to_string())
                .replace("name = \"app-", &format!("name = \"{}app-", self.prefix))
                .replace("image = \"app-", &format!("image = \"{}app-", self.prefix));
            std::fs::write(&path, text).expect("write example file");
        }
    }

    /// Edit the work tree with `edit`, commit everything, push; the new
    /// commit's id.
    pub fn commit_and_push(&self, message: &str, edit: impl FnOnce(&Path)) -> String {
        let work = self.work();
        edit(&work);
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "--allow-empty", "-m", message]);
        git(&work, &["push", "-q", "origin", "main"]);
        git(&work, &["rev-parse", "HEAD"])
    }

    /// This host's name for an example container (`app-web` → `mlt..-app-web`).
    pub fn container(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = self.um.command_as_user(BIN);
        cmd.args(["--config", self.config_path().to_str().expect("utf-8 path")])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home())
            .env("MOORLINE_BUILD_LOG", self.build_log())
            .env("MOORLINE_LOG", "info");
        for (key, value) in self.um.env() {
            cmd.env(key, value);
        }
        cmd
    }

    /// Run a CLI command to completion.
    pub fn moorline(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("moorline runs")
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let output = self.moorline(args);
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "moorline {args:?} printed no JSON ({e}): stdout {} stderr {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        })
    }

    pub fn agent_log_path(&self, run: u32) -> PathBuf {
        self.root.path().join(format!("agent-{run}.log"))
    }

    pub fn agent_log(&self) -> String {
        (1..=self.agent_runs)
            .map(|run| std::fs::read_to_string(self.agent_log_path(run)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n--- agent restarted ---\n")
    }

    /// Start `moorline agent` and wait until its control socket answers.
    pub fn start_agent(&mut self) {
        self.start_agent_with(&[]);
    }

    /// Start the agent with extra environment (e.g. `MOORLINE_FAULT`).
    pub fn start_agent_with(&mut self, env: &[(&str, &str)]) {
        self.launch_agent_with(env);
        wait_for(
            "the agent's control socket",
            Duration::from_secs(20),
            || {
                if let Some(status) = self
                    .agent
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                {
                    panic!("the agent exited with {status}:\n{}", self.agent_log());
                }
                self.status_running().then_some(())
            },
        );
    }

    /// Spawn the agent without waiting for its control socket (for a fault
    /// point it reaches before it answers).
    pub fn launch_agent_with(&mut self, env: &[(&str, &str)]) {
        self.agent_runs += 1;
        let log = std::fs::File::create(self.agent_log_path(self.agent_runs)).expect("agent log");
        let child = self
            .command(&["agent"])
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("agent starts");
        self.agent = Some(child);
    }

    fn status_running(&self) -> bool {
        let output = self.moorline(&["status", "--json"]);
        serde_json::from_slice::<Value>(&output.stdout)
            .map(|v| v["agent"]["running"] == Value::Bool(true))
            .unwrap_or(false)
    }

    /// Stop the agent with SIGTERM (as systemd would) and wait for it.
    pub fn stop_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Send SIGTERM (as `systemctl --user stop` would) without waiting.
    pub fn terminate_agent(&self) {
        if let Some(child) = &self.agent {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
    }

    /// Wait until the agent exits by itself; how it ended.
    pub fn wait_agent_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let status = wait_for("the agent to exit", limit, || {
            self.agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
        });
        self.agent = None;
        status
    }

    /// Kill the agent with SIGKILL.
    #[allow(dead_code, reason = "used by the crash tests")]
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The pid of the running agent.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    pub fn sync(&self) {
        let output = self.moorline(&["sync"]);
        assert!(
            output.status.success(),
            "sync failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Deploy the branch head with the agent, then stop it: the host as a
    /// test of what happens next starts from. Returns the head commit.
    pub fn deployed_then_stopped(&mut self) -> String {
        let first = self.deployed();
        self.stop_agent();
        first
    }

    /// Start the agent and wait until it has deployed the branch head.
    /// Returns the head commit.
    pub fn deployed(&mut self) -> String {
        let first = git(&self.work(), &["rev-parse", "HEAD"]);
        self.start_agent();
        assert_eq!(self.wait_rollout(&first)["outcome"], "succeeded");
        first
    }

    /// The commit `status` says failed on this host (null for none).
    pub fn failed_commit(&self) -> Value {
        self.json(&["status", "--json"])["source"]["failed_commit"].clone()
    }

    /// Ask the agent to look again and wait until it has seen `commit` at
    /// the branch head and is idle.
    pub fn sync_and_settle(&self, commit: &str) {
        self.sync();
        self.wait_idle_at(commit);
    }

    /// Wait until the agent has seen `commit` at the branch head and is
    /// idle: a finished rollout's pruning, which comes after its record is
    /// closed, is done too.
    pub fn wait_idle_at(&self, commit: &str) {
        wait_for("the agent to be idle", Duration::from_secs(30), || {
            let status = self.json(&["status", "--json"]);
            (status["agent"]["activity"] == "idle" && status["source"]["desired_commit"] == commit)
                .then_some(())
        });
    }

    pub fn history(&self) -> Vec<Value> {
        match self.json(&["history", "--json", "--limit", "1000"]) {
            Value::Array(items) => items,
            other => panic!("history is not a list: {other}"),
        }
    }

    /// Wait until a finished rollout of `commit` is in history; return it.
    pub fn wait_rollout(&self, commit: &str) -> Value {
        wait_for(
            &format!("a finished rollout of {commit}"),
            Duration::from_secs(90),
            || {
                self.history()
                    .into_iter()
                    .find(|r| r["commit"] == commit && r["outcome"] != "in-progress")
            },
        )
    }

    pub fn unit_property(&self, unit: &str, property: &str) -> String {
        let output = self
            .um
            .systemctl(&["show", "-p", property, "--value", unit]);
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    pub fn builds(&self) -> Vec<String> {
        std::fs::read_to_string(self.build_log())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    pub fn api(&self) -> Option<(u16, String)> {
        http_get(self.api_port, "/health")
    }

    pub fn web(&self) -> Option<(u16, String)> {
        http_get(self.web_port, "/")
    }
}

/// Keep only the newest release beyond those in use (`keep_releases = 1`).
pub fn keep_one_release(work: &Path) {
    let path = work.join("deploy/moorline.toml");
    let text = std::fs::read_to_string(&path).expect("read manifest");
    std::fs::write(
        &path,
        text.replace("keep_releases = 5", "keep_releases = 1"),
    )
    .expect("write manifest");
}

/// Set `owner` of `scope` in the manifest of the work tree at `work`.
pub fn set_owner(work: &Path, scope: &str, owner: &str) {
    let path = work.join("deploy/moorline.toml");
    let text = std::fs::read_to_string(&path).expect("read manifest");
    let header = format!("[scopes.{scope}]\nowner = \"");
    let start = text.find(&header).expect("scope header followed by owner") + header.len();
    let end = start + text[start..].find('"').expect("closing quote");
    let edited = format!("{}{owner}{}", &text[..start], &text[end..]);
    std::fs::write(&path, edited).expect("write manifest");
}

/// `docker` CLI, for tests to observe and clean up.
pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI runs")
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop_agent();
        let source = format!("label=moorline.source={}", self.bare().display());
        let quiet = |args: &[&str]| {
            Command::new("docker")
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default()
        };
        for id in quiet(&["ps", "-aq", "--filter", &source]).split_whitespace() {
            quiet(&["rm", "-f", id]);
        }
        let reference = format!("reference={}*", self.prefix);
        for id in quiet(&["images", "-q", "--filter", &reference]).split_whitespace() {
            quiet(&["rmi", "-f", id]);
        }
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.agent_log());
        }
    }
}
