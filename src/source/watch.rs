//! Filesystem watch of a local repository's branch ref, so a `git push` to a
//! repository on the same host wakes the agent at once instead of at the next
//! poll.
//!
//! The watch follows git's files ref backend: the loose ref file
//! `refs/heads/<branch>` (written as `<ref>.lock` and renamed into place) and
//! `packed-refs` (rewritten by `git gc` / `git pack-refs`). Events are reduced
//! to "something about our ref may have changed"; a burst of them produces one
//! immediate wake plus, at the end of each coalescing window, another wake if
//! the ref's value differs from the one seen at the last wake. That last check
//! reads the ref itself, so an event inotify never delivered (a directory made
//! and filled before its watch was added) cannot lose the final state.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc as std_mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::event::{EventKind, ModifyKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tracing::{debug, info, warn};

use super::Wake;

/// At most one wake per window while events keep coming; the first event of a
/// burst wakes immediately.
pub const COALESCE_WINDOW: Duration = Duration::from_millis(100);

/// Whether the watch is working; shown by `moorline status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchHealth {
    Active,
    /// The watch stopped working; the agent still polls. The reason is for humans.
    Failed(String),
}

/// Why a watch could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("\"{}\" is not a git repository (no .git, and no HEAD, objects/ and refs/)", path.display())]
    NotARepository { path: PathBuf },
    #[error("cannot read \"{}\": {source}", path.display())]
    ReadGitFile { path: PathBuf, source: io::Error },
    #[error("\"{}\" does not start with \"gitdir: \"", path.display())]
    BadGitFile { path: PathBuf },
    #[error("invalid branch name \"{branch}\"")]
    InvalidBranch { branch: String },
    #[error("\"{}\" keeps its refs in the reftable format, which cannot be watched; polling only", path.display())]
    Reftable { path: PathBuf },
    #[error("cannot watch \"{}\": {source}", path.display())]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("cannot start the watch thread for \"{}\": {source}", path.display())]
    Thread { path: PathBuf, source: io::Error },
}

/// A running watch. Dropping it stops the watch: no wake is sent after the
/// drop returns.
pub struct RefWatcher {
    health: Arc<Mutex<WatchHealth>>,
    /// Stops the filesystem notifications; dropped before the thread is joined.
    watcher: Option<RecommendedWatcher>,
    stop: std_mpsc::Sender<Signal>,
    coalescer: Option<JoinHandle<()>>,
}

impl RefWatcher {
    pub fn health(&self) -> WatchHealth {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for RefWatcher {
    fn drop(&mut self) {
        drop(self.watcher.take());
        // The coalescer may already have ended (receiver gone); nothing to stop then.
        let _ = self.stop.send(Signal::Stop);
        if let Some(handle) = self.coalescer.take()
            && handle.join().is_err()
        {
            warn!("the watch coalescer thread panicked");
        }
    }
}

/// Watch the local repository at `repo` for changes of branch `branch` and send
/// [`Wake::Watch`] on `tx` when it changes.
///
/// `repo` is a bare repository, a work tree with a `.git` directory, or a work
/// tree whose `.git` file says `gitdir: <path>` (linked worktrees and
/// submodules; a `commondir` file is honoured, so the shared refs are watched).
/// Branch names may be nested (`release/2026/q4`) and their directories may not
/// exist yet. Other refs are ignored. A full channel already means a wake is
/// pending, so sends never block.
pub fn watch_ref(
    repo: &Path,
    branch: &str,
    tx: mpsc::Sender<Wake>,
) -> Result<RefWatcher, WatchError> {
    validate_branch(branch)?;
    let common = resolve_common_dir(repo)?;
    if common.join("reftable").is_dir() {
        return Err(WatchError::Reftable {
            path: repo.to_path_buf(),
        });
    }
    let interest = Interest::new(&common, branch);
    let health = Arc::new(Mutex::new(WatchHealth::Active));

    let (signal_tx, signal_rx) = std_mpsc::channel::<Signal>();
    let events_tx = signal_tx.clone();
    let handler_health = Arc::clone(&health);
    let handler_interest = interest.clone();
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) => {
                if handler_interest.is_relevant(&event) {
                    // The coalescer only ends when the watch is dropped.
                    let _ = events_tx.send(Signal::Changed);
                }
            }
            Err(err) => {
                warn!(error = %err, "the ref watch failed; relying on polling");
                *handler_health
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) =
                    WatchHealth::Failed(format!("filesystem watch error: {err}"));
            }
        })
        .map_err(|source| WatchError::Watch {
            path: common.clone(),
            source,
        })?;

    let refs = common.join("refs");
    watcher
        .watch(&refs, RecursiveMode::Recursive)
        .map_err(|source| WatchError::Watch {
            path: refs.clone(),
            source,
        })?;
    watcher
        .watch(&common, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError::Watch {
            path: common.clone(),
            source,
        })?;

    let coalescer_health = Arc::clone(&health);
    let coalescer = std::thread::Builder::new()
        .name("moorline-watch".to_owned())
        .spawn(move || coalesce(&signal_rx, &interest, &tx, &coalescer_health))
        .map_err(|source| WatchError::Thread {
            path: common.clone(),
            source,
        })?;

    info!(git_dir = %common.display(), branch, "watching the branch ref");
    Ok(RefWatcher {
        health,
        watcher: Some(watcher),
        stop: signal_tx,
        coalescer: Some(coalescer),
    })
}

enum Signal {
    /// Something about the watched ref may have changed.
    Changed,
    Stop,
}

/// The ref's resolved value as stored on disk, compared to decide whether a
/// trailing wake is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RefValue {
    Absent,
    /// The loose file's content or the packed-refs object id.
    Target(String),
    Unreadable(String),
}

/// Turns a stream of change signals into wakes: the first signal of a burst
/// wakes at once; at the end of each window, a changed ref wakes again and opens
/// a new window, an unchanged one ends the burst.
fn coalesce(
    signals: &std_mpsc::Receiver<Signal>,
    interest: &Interest,
    tx: &mpsc::Sender<Wake>,
    health: &Mutex<WatchHealth>,
) {
    let mut window_end: Option<Instant> = None;
    let mut last_woken = RefValue::Absent;
    loop {
        let signal = match window_end {
            None => signals
                .recv()
                .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected),
            Some(end) => signals.recv_timeout(end.saturating_duration_since(Instant::now())),
        };
        let woke = match signal {
            Ok(Signal::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            Ok(Signal::Changed) if window_end.is_some() => continue,
            Ok(Signal::Changed) => {
                last_woken = interest.read_value();
                send_wake(tx, "ref event")
            }
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                let now = interest.read_value();
                if now == last_woken {
                    window_end = None;
                    continue;
                }
                last_woken = now;
                send_wake(tx, "ref changed during the burst")
            }
        };
        if !woke {
            *health.lock().unwrap_or_else(PoisonError::into_inner) =
                WatchHealth::Failed("the agent stopped listening for wakes".to_owned());
            return;
        }
        window_end = Some(Instant::now() + COALESCE_WINDOW);
    }
}

/// Returns false when nobody listens any more.
fn send_wake(tx: &mpsc::Sender<Wake>, reason: &'static str) -> bool {
    match tx.try_send(Wake::Watch) {
        Ok(()) => {
            debug!(reason, "woke the agent");
            true
        }
        Err(TrySendError::Full(_)) => {
            debug!(reason, "a wake is already pending");
            true
        }
        Err(TrySendError::Closed(_)) => false,
    }
}

/// The paths whose changes concern the watched branch.
#[derive(Debug, Clone)]
struct Interest {
    full_name: String,
    loose: PathBuf,
    loose_lock: PathBuf,
    packed: PathBuf,
    packed_lock: PathBuf,
    /// `refs`, `refs/heads` and the directories of a nested branch name: their
    /// creation may hide the creation of the ref file inside them.
    ancestors: Vec<PathBuf>,
}

impl Interest {
    fn new(common: &Path, branch: &str) -> Self {
        let full_name = format!("refs/heads/{branch}");
        let loose = common.join(&full_name);
        let mut ancestors = Vec::new();
        let mut dir = loose.parent();
        while let Some(d) = dir {
            if d == common {
                break;
            }
            ancestors.push(d.to_path_buf());
            dir = d.parent();
        }
        Interest {
            loose_lock: common.join(format!("{full_name}.lock")),
            loose,
            packed: common.join("packed-refs"),
            packed_lock: common.join("packed-refs.lock"),
            ancestors,
            full_name,
        }
    }

    fn is_relevant(&self, event: &notify::Event) -> bool {
        match event.kind {
            // Opening and closing files, ours included, changes nothing.
            EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_)) => false,
            _ if event.need_rescan() => true,
            _ => event.paths.iter().any(|p| {
                *p == self.loose
                    || *p == self.loose_lock
                    || *p == self.packed
                    || *p == self.packed_lock
                    || self.ancestors.contains(p)
            }),
        }
    }

    /// The ref's value: the loose file wins over packed-refs, as in git.
    fn read_value(&self) -> RefValue {
        match std::fs::read_to_string(&self.loose) {
            Ok(content) => return RefValue::Target(content.trim().to_owned()),
            // A directory in its place (a nested name being created) counts as absent.
            Err(err) if err.kind() == io::ErrorKind::NotFound || self.loose.is_dir() => {}
            Err(err) => return RefValue::Unreadable(err.to_string()),
        }
        match std::fs::read_to_string(&self.packed) {
            Ok(packed) => parse_packed(&packed, &self.full_name)
                .map_or(RefValue::Absent, |id| RefValue::Target(id.to_owned())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => RefValue::Absent,
            Err(err) => RefValue::Unreadable(err.to_string()),
        }
    }
}

/// The object id `packed-refs` records for `full_name`.
fn parse_packed<'a>(packed: &'a str, full_name: &str) -> Option<&'a str> {
    packed
        .lines()
        .filter(|line| !line.starts_with('#') && !line.starts_with('^'))
        .find_map(|line| {
            let (id, name) = line.split_once(' ')?;
            (name == full_name).then_some(id)
        })
}

/// Names git itself would refuse, or that would point outside `refs/heads`.
fn validate_branch(branch: &str) -> Result<(), WatchError> {
    let bad = branch.is_empty()
        || branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("//")
        || branch.contains(['\\', ' ', '~', '^', ':', '?', '*', '[', '\0'])
        || branch.split('/').any(|c| c.starts_with('.'));
    if bad {
        return Err(WatchError::InvalidBranch {
            branch: branch.to_owned(),
        });
    }
    Ok(())
}

/// The directory holding `refs/` and `packed-refs` for `repo`, canonical so it
/// matches the paths notify reports.
fn resolve_common_dir(repo: &Path) -> Result<PathBuf, WatchError> {
    let not_a_repo = || WatchError::NotARepository {
        path: repo.to_path_buf(),
    };
    let dot_git = repo.join(".git");
    let git_dir = if dot_git.is_dir() {
        dot_git
    } else if dot_git.is_file() {
        let content = read_git_file(&dot_git)?;
        let target = content
            .strip_prefix("gitdir:")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| WatchError::BadGitFile {
                path: dot_git.clone(),
            })?;
        repo.join(target)
    } else {
        repo.to_path_buf()
    };
    if !git_dir.join("HEAD").is_file() {
        return Err(not_a_repo());
    }
    let commondir = git_dir.join("commondir");
    let common = if commondir.is_file() {
        git_dir.join(read_git_file(&commondir)?.trim())
    } else {
        git_dir
    };
    if !common.join("refs").is_dir() || !common.join("objects").is_dir() {
        return Err(not_a_repo());
    }
    common.canonicalize().map_err(|_| not_a_repo())
}

fn read_git_file(path: &Path) -> Result<String, WatchError> {
    std::fs::read_to_string(path).map_err(|source| WatchError::ReadGitFile {
        path: path.to_path_buf(),
        source,
    })
}
