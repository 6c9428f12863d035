//! A private, real systemd user manager (with its own user D-Bus) for tests, started where
//! systemd is not PID 1 (`/run/systemd/system` must exist): its own runtime dir, config home and cgroup, so
//! several managers can run at once in one test process without sharing a bus or a slice.
//!
//! Included both by `#[cfg(test)]` modules in src (through `#[path]`) and by the integration
//! tests, so it uses only std and tempfile.

// Each includer uses a different subset of this harness.
#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long the manager may take to report `running` before the test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a SIGTERM'd manager may take to stop its units and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between two looks at a condition being waited for.
const POLL: Duration = Duration::from_millis(50);

static MANAGER_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A running `systemd --user` in its own cgroup; stopped (with everything it started) on drop.
pub struct UserManager {
    pub runtime_dir: TempDir,
    pub config_home: TempDir,
    child: Child,
    cgroup_dirs: Vec<PathBuf>,
    log_path: PathBuf,
    /// The (uid, gid) the manager runs as; `None` for the test's own user.
    user: Option<(u32, u32)>,
}

impl UserManager {
    /// Starts a manager and waits until it says it is running.
    ///
    /// Panics, with the manager's log, if it does not come up within 20 s.
    pub fn start() -> UserManager {
        Self::start_with(None)
    }

    /// Starts a manager for another user (the test itself runs as root): its runtime dir,
    /// config home and cgroup are given to that user, and the manager drops to it.
    pub fn start_as(uid: u32, gid: u32) -> UserManager {
        Self::start_with(Some((uid, gid)))
    }

    fn start_with(user: Option<(u32, u32)>) -> UserManager {
        fs::create_dir_all("/run/systemd/system")
            .expect("creating /run/systemd/system needs root, which the test machines give");
        let runtime_dir = tempfile::Builder::new()
            .prefix("moorline-um-run-")
            .tempdir()
            .expect("the temporary directory is writable");
        fs::set_permissions(runtime_dir.path(), fs::Permissions::from_mode(0o700))
            .expect("we own the runtime dir we just created");
        let config_home = tempfile::Builder::new()
            .prefix("moorline-um-config-")
            .tempdir()
            .expect("the temporary directory is writable");
        fs::create_dir_all(config_home.path().join("systemd/user"))
            .expect("we own the config home we just created");

        let cgroup = format!(
            "moorline-test-{}-{}",
            std::process::id(),
            MANAGER_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let cgroup_dirs: Vec<PathBuf> = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            vec![Path::new("/sys/fs/cgroup").join(&cgroup)]
        } else {
            vec![
                Path::new("/sys/fs/cgroup/systemd").join(&cgroup),
                Path::new("/sys/fs/cgroup/unified").join(&cgroup),
            ]
        };
        for dir in &cgroup_dirs {
            // A cgroup of the same name can be left by a run that was killed
            // (a reused pid): one with no process left is removed and made again.
            let made = fs::create_dir(dir).or_else(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => {
                    remove_cgroup_tree(dir).and_then(|()| fs::create_dir(dir))
                }
                _ => Err(e),
            });
            made.unwrap_or_else(|e| panic!("cannot create cgroup {dir:?}: {e}"));
        }

        if let Some((uid, gid)) = user {
            let owner = format!("{uid}:{gid}");
            let mut targets = vec![
                runtime_dir.path().to_path_buf(),
                config_home.path().to_path_buf(),
            ];
            targets.extend(cgroup_dirs.iter().cloned());
            for target in targets {
                let chown = Command::new("chown")
                    .args(["-R", &owner])
                    .arg(&target)
                    .status()
                    .expect("chown runs");
                assert!(chown.success(), "chown {owner} {target:?}");
            }
        }
        let log_path = runtime_dir.path().join("manager.log");
        let child = Self::spawn(&runtime_dir, &config_home, &cgroup_dirs, &log_path, user);

        let mut manager = UserManager {
            runtime_dir,
            config_home,
            child,
            cgroup_dirs,
            log_path,
            user,
        };
        manager.wait_until_running();
        manager
    }

    /// Stops the manager and everything it runs, keeping its directories and cgroup for
    /// `start_again` (a manager that crashed, or a reboot).
    pub fn stop(&mut self) {
        self.stop_processes();
    }

    /// Starts the manager again on the same runtime dir, config home and cgroup.
    pub fn start_again(&mut self) {
        let log = self.log_path.with_extension("restarted.log");
        self.child = Self::spawn(
            &self.runtime_dir,
            &self.config_home,
            &self.cgroup_dirs,
            &log,
            self.user,
        );
        self.log_path = log;
        self.wait_until_running();
    }

    fn spawn(
        runtime_dir: &TempDir,
        config_home: &TempDir,
        cgroup_dirs: &[PathBuf],
        log_path: &Path,
        user: Option<(u32, u32)>,
    ) -> Child {
        let log = fs::File::create(log_path).expect("the runtime dir is writable");
        let log_err = log.try_clone().expect("a file handle can be duplicated");
        // The shell joins the cgroups and then becomes (via exec) the manager, so the pid we
        // hold is the manager's: `setsid` does not fork because the shell leads no group.
        Command::new("/bin/sh")
            .arg("-c")
            .arg(
                r#"for d in "$@"; do echo $$ >"$d/cgroup.procs" || exit 97; done
                   exec setsid $MOORLINE_TEST_AS env SYSTEMD_LOG_TARGET=console /lib/systemd/systemd --user"#,
            )
            .arg("sh")
            .args(cgroup_dirs)
            .env(
                "MOORLINE_TEST_AS",
                user.map(|(uid, gid)| {
                    format!("setpriv --reuid={uid} --regid={gid} --clear-groups")
                })
                .unwrap_or_default(),
            )
            .env("XDG_RUNTIME_DIR", runtime_dir.path())
            .env("XDG_CONFIG_HOME", config_home.path())
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .expect("/bin/sh can be spawned")
    }

    fn wait_until_running(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the systemd user manager exited early ({status}); its log:\n{}",
                    self.log()
                );
            }
            let out = self.systemctl(&["is-system-running"]);
            let last = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if last == "running" || last == "degraded" {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the systemd user manager did not come up within {START_TIMEOUT:?} \
                     (is-system-running said {last:?}, {}); its log:\n{}",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    self.log()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The (uid, gid) the manager runs as, when it is not the test's own user.
    pub fn user(&self) -> Option<(u32, u32)> {
        self.user
    }

    /// A command for `program` that runs as the manager's user.
    pub fn command_as_user(&self, program: &str) -> Command {
        match self.user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.args([
                    &format!("--reuid={uid}"),
                    &format!("--regid={gid}"),
                    "--clear-groups",
                    program,
                ]);
                c
            }
            None => Command::new(program),
        }
    }

    /// The user bus of this manager.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}/bus", self.runtime_dir.path().display())
    }

    /// Where this manager looks for user unit files.
    pub fn unit_dir(&self) -> PathBuf {
        self.config_home.path().join("systemd/user")
    }

    /// The environment a child process needs to talk to this manager.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "XDG_RUNTIME_DIR".to_owned(),
                self.runtime_dir.path().display().to_string(),
            ),
            (
                "XDG_CONFIG_HOME".to_owned(),
                self.config_home.path().display().to_string(),
            ),
            ("DBUS_SESSION_BUS_ADDRESS".to_owned(), self.bus_address()),
        ]
    }

    /// Runs `systemctl --user ARGS` against this manager, for tests to observe with
    /// (as the manager's user: systemd refuses a client of another uid).
    pub fn systemctl(&self, args: &[&str]) -> Output {
        self.command_as_user("systemctl")
            .arg("--user")
            .args(args)
            .envs(self.env())
            .stdin(Stdio::null())
            .output()
            .expect("systemctl is installed on the test machines")
    }

    /// What the manager has logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn signal(pid: u32, signal: &str) {
        // Failing to signal a process that is already gone is fine.
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stderr(Stdio::null())
            .status();
    }

    /// Every pid in the cgroup directories and their descendants.
    fn cgroup_pids(&self) -> Vec<u32> {
        fn walk(dir: &Path, pids: &mut Vec<u32>) {
            if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            if let Ok(entries) = fs::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        walk(&entry.path(), pids);
                    }
                }
            }
        }
        let mut pids = Vec::new();
        for dir in &self.cgroup_dirs {
            walk(dir, &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Removes the cgroup trees, deepest directories first.
    fn remove_cgroups(&self) {
        for dir in &self.cgroup_dirs {
            let _ = remove_cgroup_tree(dir);
        }
    }
}

/// Remove the cgroup at `dir` and the ones below it, deepest first; fails
/// while a process is still in one of them.
fn remove_cgroup_tree(dir: &Path) -> std::io::Result<()> {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = remove_cgroup_tree(&entry.path());
            }
        }
    }
    fs::remove_dir(dir)
}

impl Drop for UserManager {
    fn drop(&mut self) {
        self.stop_processes();
        self.remove_cgroups();
    }
}

impl UserManager {
    /// SIGTERM to the manager, then SIGKILL to whatever is left in its cgroups.
    fn stop_processes(&mut self) {
        let pid = self.child.id();
        Self::signal(pid, "TERM");
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(POLL),
            }
        }
        // Whatever the manager left behind (its dbus-daemon, services) dies with it.
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            let pids = self.cgroup_pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                Self::signal(pid, "KILL");
            }
            std::thread::sleep(POLL);
        }
    }
}
