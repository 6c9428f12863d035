//! Running a scope's build commands in its release directory: output streamed
//! to the log, the tail kept for the rollout record, a timeout that kills the
//! whole process group.

use std::collections::VecDeque;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tracing::info;

/// Why a build did not succeed, naming the scope and the command.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("build command \"{command}\" of scope \"{scope}\" could not start: {source}")]
    Spawn {
        scope: String,
        command: String,
        source: std::io::Error,
    },
    #[error("build command \"{command}\" of scope \"{scope}\" exited with status {code}")]
    Exit {
        scope: String,
        command: String,
        code: i32,
    },
    #[error("build command \"{command}\" of scope \"{scope}\" was killed by a signal")]
    Signal { scope: String, command: String },
    #[error("build command \"{command}\" of scope \"{scope}\" failed: {source}")]
    Wait {
        scope: String,
        command: String,
        source: std::io::Error,
    },
    #[error(
        "build of scope \"{scope}\" did not finish within {} (at \"{command}\")",
        humantime::format_duration(*.limit)
    )]
    Timeout {
        scope: String,
        command: String,
        limit: Duration,
    },
}

impl BuildError {
    /// A build that could not even start (no `/bin/sh`, no processes left)
    /// may start later; what a build command did, it would do again.
    pub fn is_transient(&self) -> bool {
        matches!(self, BuildError::Spawn { .. })
    }
}

/// How many lines of build output a rollout keeps.
pub const TAIL_LINES: usize = 40;

/// The last lines of output, bounded.
#[derive(Debug, Default)]
pub struct Tail(VecDeque<String>);

impl Tail {
    pub fn push(&mut self, line: String) {
        if self.0.len() == TAIL_LINES {
            self.0.pop_front();
        }
        self.0.push_back(line);
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}

/// Run each of `commands` with `sh -c` in `release`, in order, stopping at
/// the first failure. `Err` says which command failed and how.
pub async fn run(
    scope: &str,
    commands: &[String],
    release: &Path,
    commit: &str,
    limit: Duration,
    tail: &mut Tail,
) -> Result<(), BuildError> {
    let deadline = tokio::time::Instant::now() + limit;
    for command in commands {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        run_one(scope, command, release, commit, remaining, limit, tail).await?;
    }
    Ok(())
}

async fn run_one(
    scope: &str,
    command: &str,
    release: &Path,
    commit: &str,
    remaining: Duration,
    limit: Duration,
    tail: &mut Tail,
) -> Result<(), BuildError> {
    info!(scope, command, "build started");
    let mut child = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        // The agent's own umask is 077 (its state is private); what a build
        // makes in the release is as readable as a checkout.
        .arg(format!("umask 022\n{command}"))
        .current_dir(release)
        .env("MOORLINE_RELEASE", release)
        .env("MOORLINE_COMMIT", commit)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| BuildError::Spawn {
            scope: scope.to_string(),
            command: command.to_string(),
            source,
        })?;
    crate::fault::point("during-build");
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    if let Some(out) = child.stdout.take() {
        forward(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        forward(err, tx.clone());
    }
    drop(tx);
    // Killed as a group on a timeout, and when this future is dropped (the
    // agent stopping mid-build): no background process of a build outlives it.
    let mut group = GroupGuard(child.id());
    let collect = async {
        while let Some(line) = rx.recv().await {
            info!(scope, "build: {line}");
            tail.push(line);
        }
    };
    let waited = tokio::time::timeout(remaining, async {
        collect.await;
        child.wait().await
    })
    .await;
    if waited.is_ok() {
        group.0 = None;
    }
    match waited {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => Err(match status.code() {
            Some(code) => BuildError::Exit {
                scope: scope.to_string(),
                command: command.to_string(),
                code,
            },
            None => BuildError::Signal {
                scope: scope.to_string(),
                command: command.to_string(),
            },
        }),
        Ok(Err(source)) => Err(BuildError::Wait {
            scope: scope.to_string(),
            command: command.to_string(),
            source,
        }),
        Err(_) => {
            drop(group);
            Err(BuildError::Timeout {
                scope: scope.to_string(),
                command: command.to_string(),
                limit,
            })
        }
    }
}

/// Kills the process group led by the build's shell when dropped, unless
/// the build ended by itself (`None`).
struct GroupGuard(Option<u32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pid) = self
            .0
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

fn forward(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    tx: mpsc::UnboundedSender<String>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_tail_is_kept_and_failures_name_the_command() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tail = Tail::default();
        let commands = vec![
            "for i in $(seq 1 60); do echo line $i; done".to_string(),
            "echo oops >&2; exit 4".to_string(),
            "touch never".to_string(),
        ];
        let err = run(
            "api",
            &commands,
            dir.path(),
            "c0ffee",
            Duration::from_secs(30),
            &mut tail,
        )
        .await
        .expect_err("second command fails");
        assert_eq!(
            err.to_string(),
            "build command \"echo oops >&2; exit 4\" of scope \"api\" exited with status 4"
        );
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines.last().map(String::as_str), Some("oops"));
        assert_eq!(lines.first().map(String::as_str), Some("line 22"));
        assert!(
            !dir.path().join("never").exists(),
            "later commands do not run"
        );
    }

    /// Whether `pid` is a process that has not exited (a zombie has).
    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn builds_run_in_the_release_and_time_out_as_a_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut tail = Tail::default();
        run(
            "web",
            &["echo \"$PWD $MOORLINE_COMMIT\" > where".to_string()],
            dir.path(),
            "abc",
            Duration::from_secs(30),
            &mut tail,
        )
        .await
        .expect("build passes");
        let written =
            std::fs::read_to_string(dir.path().join("where")).expect("build wrote its file");
        assert_eq!(written.trim(), format!("{} abc", dir.path().display()));

        let command = "sleep 30 & echo $! > bg.pid; sleep 30";
        let err = run(
            "web",
            &[command.to_string()],
            dir.path(),
            "abc",
            Duration::from_millis(500),
            &mut tail,
        )
        .await
        .expect_err("times out");
        assert_eq!(
            err.to_string(),
            format!("build of scope \"web\" did not finish within 500ms (at \"{command}\")")
        );
        // The background sleep went with the group, not only the shell.
        let pid: i32 = std::fs::read_to_string(dir.path().join("bg.pid"))
            .expect("the build wrote its background pid")
            .trim()
            .parse()
            .expect("a pid");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the background process {pid} of a timed-out build is still running"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
