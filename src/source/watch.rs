//! Filesystem watch of a local repository's branch ref, so a `git push` to a
//! repository on the same host wakes the agent at once instead of at the next
//! poll.
//!
//! The watch follows git's files ref backend: the loose ref file
//! `refs/heads/<branch>` (written as `<ref>.lock` and renamed into place) and
//! `packed-refs` (rewritten by `git gc` / `git pack-refs`). Events only tell
//! "something about our ref may have changed"; the coalescer then reads the
//! ref's value itself and wakes when it differs from the value at the last
//! wake: at once for the first update of a burst, then at most once per
//! [`COALESCE_WINDOW`], with a final read when the burst ends so its last state
//! is never lost. Reading the value also covers events inotify never delivered
//! (a directory made and filled before its watch was added), and keeps
//! `git gc` from waking the agent for a ref whose value did not change.

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
pub const COALESCE_WINDOW: Duration = Duration::from_millis(200);

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

impl std::fmt::Debug for RefWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefWatcher")
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
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
///
/// Updates are compared with the value the ref has when the watch starts, so
/// start the watch before the agent's first fetch.
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
                if let Some(gone) = handler_interest.root_gone(&event) {
                    warn!(path = %gone.display(), "the watched repository went away; relying on polling");
                    *handler_health
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = WatchHealth::Failed(format!(
                        "\"{}\" was removed or moved",
                        gone.display()
                    ));
                }
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

    // Read once the watch is in place: any later update is then either in this
    // value or announced by an event.
    let initial = interest.read_value();
    let coalescer_health = Arc::clone(&health);
    let coalescer = std::thread::Builder::new()
        .name("moorline-watch".to_owned())
        .spawn(move || coalesce(&signal_rx, &interest, &tx, &coalescer_health, initial))
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

/// Turns a stream of change signals into wakes.
///
/// Every signal re-reads the ref; a value different from the one at the last
/// wake wakes at once (so the first completed update of a burst wakes with no
/// delay, while `<ref>.lock` being created does not) and starts a window in
/// which further signals are only noted. When a window ends, the ref is read
/// again: changed, it wakes and starts another window; unchanged, the burst is
/// over. A signal that did not change the value also opens a window, so an
/// update whose own events were missed is still found when it ends.
fn coalesce(
    signals: &std_mpsc::Receiver<Signal>,
    interest: &Interest,
    tx: &mpsc::Sender<Wake>,
    health: &Mutex<WatchHealth>,
    mut last_woken: RefValue,
) {
    let mut window_end: Option<Instant> = None;
    // Whether a wake was sent in the current window.
    let mut cooling = false;
    loop {
        let signal = match window_end {
            None => signals
                .recv()
                .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected),
            Some(end) => signals.recv_timeout(end.saturating_duration_since(Instant::now())),
        };
        let window_over = match signal {
            Ok(Signal::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            Ok(Signal::Changed) if cooling => continue,
            Ok(Signal::Changed) => false,
            Err(std_mpsc::RecvTimeoutError::Timeout) => true,
        };
        let now = interest.read_value();
        if now == last_woken {
            if window_over {
                window_end = None;
                cooling = false;
            } else if window_end.is_none() {
                window_end = Some(Instant::now() + COALESCE_WINDOW);
            }
            continue;
        }
        let reason = if window_over {
            "ref changed during the burst"
        } else {
            "ref changed"
        };
        if !send_wake(tx, reason) {
            *health.lock().unwrap_or_else(PoisonError::into_inner) =
                WatchHealth::Failed("the agent stopped listening for wakes".to_owned());
            return;
        }
        last_woken = now;
        cooling = true;
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
    /// The watched directories: the git (common) dir and its `refs`.
    roots: [PathBuf; 2],
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
            roots: [common.to_path_buf(), common.join("refs")],
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

    /// The watched directory this event says was removed or moved away, after
    /// which no further events come.
    fn root_gone<'e>(&self, event: &'e notify::Event) -> Option<&'e Path> {
        let gone = matches!(
            event.kind,
            EventKind::Remove(_)
                | EventKind::Modify(ModifyKind::Name(notify::event::RenameMode::From))
        );
        if !gone {
            return None;
        }
        event
            .paths
            .iter()
            .find(|p| self.roots.contains(p))
            .map(PathBuf::as_path)
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

/// The watch as the agent runs it: `watch = false` or a remote source
/// leave it off; a watch that could not be set up or was lost is tried
/// again before every fetch, so a repository that comes back is watched.
pub struct WatchTrigger {
    /// The local repository, when watching is wanted.
    repo: Option<PathBuf>,
    branch: String,
    poll: Duration,
    wake: mpsc::Sender<Wake>,
    state: WatchState,
}

/// The filesystem watch, as far as the agent knows it.
#[derive(Debug, Default)]
enum WatchState {
    /// `watch = false`, or the source is not a local repository.
    #[default]
    Off,
    Running(RefWatcher),
    /// `watch_ref` refused; retried before every fetch.
    SetupFailed(String),
}

impl WatchTrigger {
    pub fn new(
        repo: Option<&Path>,
        wanted: bool,
        branch: &str,
        poll: Duration,
        wake: mpsc::Sender<Wake>,
    ) -> WatchTrigger {
        WatchTrigger {
            repo: repo.filter(|_| wanted).map(Path::to_path_buf),
            branch: branch.to_string(),
            poll,
            wake,
            state: WatchState::Off,
        }
    }
}

impl super::Trigger for WatchTrigger {
    fn name(&self) -> &'static str {
        "watch"
    }

    /// "off", "active", or "failed: <reason>; polling every <poll>".
    fn state(&self) -> String {
        watch_text(&self.state, self.poll)
    }

    /// Start the watch when it is wanted and not working: before the first
    /// fetch (updates are compared with the ref's value at this point), and
    /// again before every fetch after it failed or was lost.
    fn before_fetch(&mut self) {
        let Some(repo) = self.repo.clone() else {
            return;
        };
        if let WatchState::Running(watcher) = &self.state
            && watcher.health() == WatchHealth::Active
        {
            return;
        }
        // Stop a lost watch before starting its replacement.
        let was = std::mem::take(&mut self.state);
        let previous = match &was {
            WatchState::SetupFailed(reason) => Some(reason.clone()),
            WatchState::Running(w) => match w.health() {
                WatchHealth::Failed(reason) => Some(reason),
                WatchHealth::Active => None,
            },
            WatchState::Off => None,
        };
        drop(was);
        self.state = match watch_ref(&repo, &self.branch, self.wake.clone()) {
            Ok(watcher) => {
                tracing::info!(repo = %repo.display(), branch = %self.branch, "watching the branch for pushes");
                WatchState::Running(watcher)
            }
            Err(e) => {
                let reason = e.to_string();
                if previous.as_deref() != Some(reason.as_str()) {
                    tracing::warn!(repo = %repo.display(), error = %reason, "cannot watch the repository; polling only");
                }
                WatchState::SetupFailed(reason)
            }
        };
    }
}

fn watch_text(state: &WatchState, poll: Duration) -> String {
    let failed = |reason: &str| {
        format!(
            "failed: {reason}; polling every {}",
            super::duration_text(poll)
        )
    };
    match state {
        WatchState::Off => "off".into(),
        WatchState::Running(watcher) => match watcher.health() {
            WatchHealth::Active => "active".into(),
            WatchHealth::Failed(reason) => failed(&reason),
        },
        WatchState::SetupFailed(reason) => failed(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_state_reads_as_status_shows_it() {
        let poll = Duration::from_secs(60);
        assert_eq!(watch_text(&WatchState::Off, poll), "off");
        assert_eq!(
            watch_text(
                &WatchState::SetupFailed("\"/srv/app.git\" was removed or moved".into()),
                poll
            ),
            "failed: \"/srv/app.git\" was removed or moved; polling every 60s"
        );
    }
    use tokio::sync::mpsc::error::TryRecvError;

    /// Long enough for any wake that is coming to arrive, however loaded the
    /// machine; only ever waited in full when nothing is expected.
    const PATIENCE: Duration = Duration::from_secs(10);
    /// Five coalescing windows without a wake: the watcher is quiet.
    const QUIET: Duration = Duration::from_secs(1);

    /// A bare repository `origin.git` and a clone `work` of it, made by real git
    /// with pinned dates and no user or system configuration.
    struct Fixture {
        dir: tempfile::TempDir,
        commits: u32,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("a temporary directory can be made");
            let mut fixture = Fixture { dir, commits: 0 };
            fixture.git(
                ".",
                &["init", "--quiet", "--bare", "-b", "main", "origin.git"],
            );
            fixture.git(".", &["clone", "--quiet", "origin.git", "work"]);
            fixture.git("work", &["checkout", "--quiet", "-b", "main"]);
            fixture.commit();
            fixture.git("work", &["push", "--quiet", "origin", "main"]);
            fixture
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        fn bare(&self) -> PathBuf {
            self.path("origin.git")
        }

        fn git(&self, rel: &str, args: &[&str]) -> String {
            let date = format!("2026-01-01T00:{:02}:00Z", self.commits % 60);
            crate::source::git_cli::git_at(&self.path(rel), self.dir.path(), &date, args)
        }

        /// A new commit in `work` on whatever is checked out; returns its id.
        fn commit(&mut self) -> String {
            self.commits += 1;
            let n = self.commits;
            std::fs::write(self.path("work/file.txt"), format!("change {n}\n"))
                .expect("the work tree is writable");
            self.git("work", &["add", "file.txt"]);
            self.git("work", &["commit", "--quiet", "-m", &format!("change {n}")]);
            self.git("work", &["rev-parse", "HEAD"])
        }

        fn push(&self, refspec: &str) {
            self.git("work", &["push", "--quiet", "--force", "origin", refspec]);
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a test runtime starts")
    }

    fn recv_within(rx: &mut mpsc::Receiver<Wake>, limit: Duration) -> Option<Wake> {
        rt().block_on(async { tokio::time::timeout(limit, rx.recv()).await.ok().flatten() })
    }

    /// Waits for one wake (or fails), then for the burst it belongs to to end.
    fn expect_wake(rx: &mut mpsc::Receiver<Wake>, what: &str) {
        assert_eq!(
            recv_within(rx, PATIENCE),
            Some(Wake::Watch),
            "no wake after {what}"
        );
        drain_until_quiet(rx);
    }

    /// Receives wakes until none came for [`QUIET`]; returns how many came.
    fn drain_until_quiet(rx: &mut mpsc::Receiver<Wake>) -> usize {
        let mut n = 0;
        while recv_within(rx, QUIET).is_some() {
            n += 1;
        }
        n
    }

    fn expect_no_wake(rx: &mut mpsc::Receiver<Wake>, what: &str) {
        assert_eq!(recv_within(rx, QUIET), None, "woken by {what}");
    }

    fn watch(repo: &Path, branch: &str) -> (RefWatcher, mpsc::Receiver<Wake>) {
        let (tx, rx) = mpsc::channel(64);
        let watcher = watch_ref(repo, branch, tx).expect("the watch starts");
        assert_eq!(watcher.health(), WatchHealth::Active);
        (watcher, rx)
    }

    #[test]
    fn push_to_the_branch_wakes_and_other_branches_do_not() {
        let mut fx = Fixture::new();
        let (watcher, mut rx) = watch(&fx.bare(), "main");

        fx.git("work", &["checkout", "--quiet", "-b", "feature"]);
        fx.commit();
        fx.push("feature");
        expect_no_wake(&mut rx, "a push to another branch");
        fx.git("work", &["tag", "v1"]);
        fx.push("v1");
        expect_no_wake(&mut rx, "a pushed tag");

        fx.git("work", &["checkout", "--quiet", "main"]);
        fx.commit();
        fx.push("main");
        expect_wake(&mut rx, "a push to main");
        assert_eq!(watcher.health(), WatchHealth::Active);
    }

    #[test]
    fn a_nested_branch_created_after_the_watch_started_wakes() {
        let mut fx = Fixture::new();
        let (_watcher, mut rx) = watch(&fx.bare(), "release/2026/q4");
        assert!(!fx.bare().join("refs/heads/release").exists());

        fx.git("work", &["checkout", "--quiet", "-b", "release/2026/q4"]);
        let first = fx.commit();
        fx.push("release/2026/q4");
        expect_wake(&mut rx, "creating release/2026/q4");
        assert_eq!(
            fx.git("origin.git", &["rev-parse", "release/2026/q4"]),
            first
        );

        fx.commit();
        fx.push("release/2026/q4");
        expect_wake(&mut rx, "a second push to release/2026/q4");

        // A sibling in the same directory is another branch.
        fx.git("work", &["checkout", "--quiet", "-b", "release/2026/q3"]);
        fx.commit();
        fx.push("release/2026/q3");
        expect_no_wake(&mut rx, "a push to release/2026/q3");
    }

    #[test]
    fn pushes_still_wake_after_the_refs_are_packed() {
        let mut fx = Fixture::new();
        let (watcher, mut rx) = watch(&fx.bare(), "main");
        let loose = fx.bare().join("refs/heads/main");

        fx.git("origin.git", &["pack-refs", "--all"]);
        assert!(!loose.exists(), "pack-refs left the loose ref");
        // Packing moved the ref without changing its value: no wake.
        expect_no_wake(&mut rx, "pack-refs");
        fx.commit();
        fx.push("main");
        expect_wake(&mut rx, "a push after pack-refs");

        fx.git("origin.git", &["gc", "--quiet"]);
        assert!(!loose.exists(), "gc left the loose ref");
        expect_no_wake(&mut rx, "gc");
        fx.commit();
        fx.push("main");
        expect_wake(&mut rx, "a push after gc");
        assert_eq!(watcher.health(), WatchHealth::Active);
    }

    #[test]
    fn update_ref_wakes() {
        let mut fx = Fixture::new();
        let older = fx.git("origin.git", &["rev-parse", "main"]);
        fx.commit();
        fx.push("main");
        let (_watcher, mut rx) = watch(&fx.bare(), "main");

        fx.git("origin.git", &["update-ref", "refs/heads/main", &older]);
        expect_wake(&mut rx, "git update-ref");
        fx.git("origin.git", &["update-ref", "refs/heads/other", &older]);
        expect_no_wake(&mut rx, "git update-ref of another branch");
        fx.git("origin.git", &["update-ref", "-d", "refs/heads/main"]);
        expect_wake(&mut rx, "deleting the branch");
    }

    #[test]
    fn a_burst_of_pushes_is_coalesced_and_its_end_is_seen() {
        let mut fx = Fixture::new();
        let (_watcher, mut rx) = watch(&fx.bare(), "main");
        let loose = fx.bare().join("refs/heads/main");

        // A consumer that reads the ref at every wake, as the agent's fetch would.
        let (seen_tx, seen_rx) = std::sync::mpsc::channel::<String>();
        let consumer = std::thread::spawn({
            let loose = loose.clone();
            move || {
                rt().block_on(async {
                    let mut wakes = 0_usize;
                    while let Ok(Some(_)) = tokio::time::timeout(PATIENCE, rx.recv()).await {
                        wakes += 1;
                        let value = std::fs::read_to_string(&loose).unwrap_or_default();
                        if seen_tx.send(value.trim().to_owned()).is_err() {
                            break;
                        }
                    }
                    wakes
                })
            }
        });

        let started = Instant::now();
        let mut last = String::new();
        for _ in 0..20 {
            last = fx.commit();
            fx.push("main");
        }
        let burst = started.elapsed();

        // The final state is seen by a wake: some wake reads the last commit.
        let mut seen_last = false;
        while let Ok(value) = seen_rx.recv_timeout(PATIENCE) {
            if value == last {
                seen_last = true;
                break;
            }
        }
        assert!(seen_last, "no wake saw the last push {last}");
        drop(seen_rx);
        // The consumer stops at its next wake (its sender fails) or after PATIENCE.
        let wakes = consumer.join().expect("the consumer does not panic");

        // At most one wake per window while the burst lasts, plus the trailing one.
        let windows = (burst.as_millis() / COALESCE_WINDOW.as_millis()) as usize + 2;
        // A wake needs a new value, so never more wakes than pushes.
        assert!(
            wakes <= windows.min(20),
            "{wakes} wakes for 20 pushes over {burst:?} ({windows} windows)"
        );
    }

    #[test]
    fn a_work_tree_repository_wakes_on_commit_and_on_push() {
        let mut fx = Fixture::new();
        // Watch the clone: committing in it moves its refs/heads/main.
        let (_watcher, mut rx) = watch(&fx.path("work"), "main");
        fx.commit();
        expect_wake(&mut rx, "a commit in the work tree");

        // A non-bare repository that receives pushes.
        fx.git(".", &["init", "--quiet", "-b", "main", "target"]);
        fx.git(
            "target",
            &["config", "receive.denyCurrentBranch", "updateInstead"],
        );
        let (_target_watcher, mut target_rx) = watch(&fx.path("target"), "main");
        fx.git("work", &["push", "--quiet", "../target", "main"]);
        expect_wake(&mut target_rx, "a push into a work tree");
    }

    #[test]
    fn a_linked_worktree_watches_the_shared_refs() {
        let mut fx = Fixture::new();
        fx.git(
            "work",
            &["worktree", "add", "--quiet", "-b", "side", "../linked"],
        );
        assert!(fx.path("linked/.git").is_file());
        let (_watcher, mut rx) = watch(&fx.path("linked"), "main");
        fx.commit();
        expect_wake(&mut rx, "a commit to main in the main work tree");
    }

    #[test]
    fn removing_the_repository_fails_the_health() {
        let fx = Fixture::new();
        let (watcher, _rx) = watch(&fx.bare(), "main");
        std::fs::remove_dir_all(fx.bare()).expect("the repository can be removed");
        let deadline = Instant::now() + PATIENCE;
        while watcher.health() == WatchHealth::Active && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let canonical = fx
            .dir
            .path()
            .canonicalize()
            .expect("the fixture directory exists");
        let health = watcher.health();
        // Which of the two watched directories is reported first depends on event order.
        let refs = format!(
            "\"{}\" was removed or moved",
            canonical.join("origin.git/refs").display()
        );
        let root = format!(
            "\"{}\" was removed or moved",
            canonical.join("origin.git").display()
        );
        assert!(
            health == WatchHealth::Failed(refs) || health == WatchHealth::Failed(root),
            "{health:?}"
        );
    }

    #[test]
    fn dropping_the_watcher_stops_wakes() {
        let mut fx = Fixture::new();
        let (watcher, mut rx) = watch(&fx.bare(), "main");
        drop(watcher);
        fx.commit();
        fx.push("main");
        // The sender went away with the watcher: the channel is closed, not empty.
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[test]
    fn setup_errors_name_the_path() {
        let dir = tempfile::tempdir().expect("a temporary directory can be made");
        let (tx, _rx) = mpsc::channel(1);
        let plain = dir.path().join("plain");
        std::fs::create_dir(&plain).expect("a directory can be made");
        let err = watch_ref(&plain, "main", tx.clone()).expect_err("a plain directory is refused");
        assert_eq!(
            err.to_string(),
            format!(
                "\"{}\" is not a git repository (no .git, and no HEAD, objects/ and refs/)",
                plain.display()
            )
        );

        let missing = dir.path().join("missing");
        let err = watch_ref(&missing, "main", tx.clone()).expect_err("a missing path is refused");
        assert_eq!(
            err.to_string(),
            format!(
                "\"{}\" is not a git repository (no .git, and no HEAD, objects/ and refs/)",
                missing.display()
            )
        );

        std::fs::write(plain.join(".git"), "not a pointer\n").expect("a file can be written");
        let err = watch_ref(&plain, "main", tx.clone()).expect_err("a bad .git file is refused");
        assert_eq!(
            err.to_string(),
            format!(
                "\"{}\" does not start with \"gitdir: \"",
                plain.join(".git").display()
            )
        );

        let fx = Fixture::new();
        fx.git(
            ".",
            &[
                "init",
                "--quiet",
                "--bare",
                "--ref-format=reftable",
                "table.git",
            ],
        );
        let err = watch_ref(&fx.path("table.git"), "main", tx.clone())
            .expect_err("a reftable repository is refused");
        assert_eq!(
            err.to_string(),
            format!(
                "\"{}\" keeps its refs in the reftable format, which cannot be watched; polling only",
                fx.path("table.git").display()
            )
        );

        for bad in [
            "",
            "../main",
            "a//b",
            "main.lock",
            ".hidden",
            "a b",
            "/main",
        ] {
            let err = watch_ref(&fx.bare(), bad, tx.clone()).expect_err("a bad branch is refused");
            assert_eq!(err.to_string(), format!("invalid branch name \"{bad}\""));
        }
    }

    #[test]
    fn packed_refs_lookup() {
        let packed = "# pack-refs with: peeled fully-peeled sorted \n\
                      1111111111111111111111111111111111111111 refs/heads/main\n\
                      2222222222222222222222222222222222222222 refs/heads/main2\n\
                      3333333333333333333333333333333333333333 refs/tags/v1\n\
                      ^4444444444444444444444444444444444444444\n";
        assert_eq!(
            parse_packed(packed, "refs/heads/main"),
            Some("1111111111111111111111111111111111111111")
        );
        assert_eq!(
            parse_packed(packed, "refs/heads/main2"),
            Some("2222222222222222222222222222222222222222")
        );
        assert_eq!(parse_packed(packed, "refs/heads/mai"), None);
        assert_eq!(parse_packed(packed, "refs/heads/v1"), None);
    }
}
