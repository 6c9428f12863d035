//! The daemon: one loop that takes a closed set of events (poll tick, wake
//! from a trigger or `moorline sync`, shutdown), fetches and converges; the
//! control channel answering beside it; the status snapshot kept on disk.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::api::{
    self, AgentView, MemberView, Request, Response, RolloutSummary, ScopeView, SourceView,
    StatusReport,
};
use crate::cli::short;
use crate::config::Config;
use crate::rollout::{Converged, Engine, Idle};
use crate::runtime::{MemberState, Runtimes};
use crate::source::Wake;
use crate::source::watch::{RefWatcher, WatchHealth, watch_ref};
use crate::source::webhook::WebhookServer;
use crate::store::{Store, now_ms};

pub const SNAPSHOT_NAME: &str = "status.json";

/// How long a rollout asked to stop may take to reach its next step
/// boundary before it is dropped where it is (well inside systemd's
/// default `TimeoutStopSec` of 90 s).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// What the loop knows that the store does not.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub since: u64,
    pub activity: String,
    pub desired: Option<String>,
    pub last_fetch: Option<u64>,
    pub last_fetch_error: Option<String>,
    pub next_fetch: Option<u64>,
    /// "off", "listening on <addr>", or why the listener is not running.
    pub webhook: String,
    /// A wake-up that arrived during the running rollout.
    pub queued: Option<String>,
    /// Why the last turn could not converge (e.g. the store refuses writes).
    pub last_error: Option<String>,
}

/// The filesystem watch of a local source, as far as the agent knows it.
#[derive(Debug, Default)]
enum WatchState {
    /// `watch = false`, or the source is not a local repository.
    #[default]
    Off,
    Running(RefWatcher),
    /// `watch_ref` refused; retried before every fetch.
    SetupFailed(String),
}

/// What `status` shows for the watch: "off", "active", or
/// "failed: <reason>; polling every <poll>".
fn watch_text(state: &WatchState, poll: Duration) -> String {
    let failed = |reason: &str| format!("failed: {reason}; polling every {}", duration_text(poll));
    match state {
        WatchState::Off => "off".into(),
        WatchState::Running(watcher) => match watcher.health() {
            WatchHealth::Active => "active".into(),
            WatchHealth::Failed(reason) => failed(&reason),
        },
        WatchState::SetupFailed(reason) => failed(reason),
    }
}

/// A poll interval as a user wrote it: "60s", "1s", "250ms".
fn duration_text(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// What `status` shows for the wake-ups that arrived during a rollout: the
/// first, and how many more were folded into it.
fn queued_text(wake: &Wake, at_ms: u64, more: u32) -> String {
    let first = format!("{} wake-up at {}", wake_name(wake), api::time_text(at_ms));
    match more {
        0 => first,
        n => format!("{first} (and {n} more, coalesced)"),
    }
}

/// The closed set of things the loop reacts to.
#[derive(Debug)]
enum Event {
    Tick,
    Wake(Wake),
    Shutdown,
}

fn wake_name(wake: &Wake) -> &'static str {
    match wake {
        Wake::Watch => "watch",
        Wake::Webhook { .. } => "webhook",
        Wake::Sync => "sync",
        Wake::Poll => "poll",
    }
}

/// Create the state directory owner-only (and tighten an existing one).
pub fn prepare_state_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create state directory \"{}\"", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| {
        format!(
            "cannot restrict state directory \"{}\" to its owner",
            dir.display()
        )
    })?;
    Ok(())
}

/// The delay before the next poll: `poll` with up to ±10% jitter, doubled
/// per consecutive failure up to 15 minutes (never below `poll`).
pub fn next_delay(poll: Duration, failures: u32, seed: u64) -> Duration {
    let base = if failures == 0 {
        poll
    } else {
        let factor = 1u32 << failures.min(16);
        poll.saturating_mul(factor)
            .min(Duration::from_secs(900))
            .max(poll)
    };
    let spread = base.as_millis() as u64 / 10;
    if spread == 0 {
        return base;
    }
    let offset = seed % (2 * spread + 1);
    Duration::from_millis(base.as_millis() as u64 - spread + offset)
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 ^ d.as_secs())
        .unwrap_or(0)
}

fn notify_status(text: &str) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(text)]);
}

struct Agent {
    config: Config,
    store: Store,
    live: Arc<Mutex<Live>>,
    wake: mpsc::Sender<Wake>,
    /// The status path's own runtime connections: made when first needed,
    /// dropped when they break, so a manager that comes back is seen.
    runtimes: tokio::sync::Mutex<Runtimes>,
    watch: Mutex<WatchState>,
    snapshot_turn: tokio::sync::Mutex<()>,
}

impl Agent {
    fn watch_text(&self) -> String {
        self.watch
            .lock()
            .map(|w| watch_text(&w, self.config.source.poll))
            .unwrap_or_else(|_| "unknown".into())
    }

    /// Start the ref watch when it is wanted and not working: before the
    /// first fetch (updates are compared with the ref's value at this point),
    /// and again before every fetch after it failed or was lost, so a
    /// repository that comes back is watched again.
    fn ensure_watch(&self, repo: Option<&Path>) {
        let Some(repo) = repo.filter(|_| self.config.trigger.watch) else {
            return;
        };
        let Ok(mut state) = self.watch.lock() else {
            return;
        };
        if let WatchState::Running(watcher) = &*state
            && watcher.health() == WatchHealth::Active
        {
            return;
        }
        // Stop a lost watch before starting its replacement.
        let was = std::mem::take(&mut *state);
        let previous = match &was {
            WatchState::SetupFailed(reason) => Some(reason.clone()),
            WatchState::Running(w) => match w.health() {
                WatchHealth::Failed(reason) => Some(reason),
                WatchHealth::Active => None,
            },
            WatchState::Off => None,
        };
        drop(was);
        *state = match watch_ref(repo, &self.config.source.branch, self.wake.clone()) {
            Ok(watcher) => {
                info!(repo = %repo.display(), branch = %self.config.source.branch, "watching the branch for pushes");
                WatchState::Running(watcher)
            }
            Err(e) => {
                let reason = e.to_string();
                if previous.as_deref() != Some(reason.as_str()) {
                    warn!(repo = %repo.display(), error = %reason, "cannot watch the repository; polling only");
                }
                WatchState::SetupFailed(reason)
            }
        };
    }

    fn live(&self) -> Live {
        self.live.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The status as the agent sees it now, with live member states.
    async fn status(&self) -> StatusReport {
        let live = self.live();
        let host = self.store.host().unwrap_or_default();
        let last = self.store.rollouts(None, 1).ok().and_then(|mut v| v.pop());
        let mut runtimes = self.runtimes.lock().await;
        let mut scopes = Vec::new();
        for (name, state) in &host.scopes {
            let mut members = Vec::new();
            let mut problems = Vec::new();
            // Members whose runtime could not be asked: neither up nor down.
            let mut unknown = Vec::new();
            let owner = state.current.owner;
            let runtime = runtimes.get(owner).await;
            for member in &state.current.members {
                let member_state = match &runtime {
                    Ok(runtime) => runtime.member_state(member).await,
                    Err(e) => MemberState::Unknown(format!("unknown: {e}")),
                };
                match &member_state {
                    MemberState::Up(_) => {}
                    MemberState::Down(text) => problems.push(format!("{member} is {text}")),
                    MemberState::Unknown(_) => unknown.push(member.clone()),
                }
                members.push(MemberView {
                    name: member.clone(),
                    state: member_state.text().to_string(),
                });
            }
            if !unknown.is_empty() {
                // A broken connection is made again at the next status.
                runtimes.forget(owner);
            }
            let (health, detail) = if !state.healthy {
                (
                    "unhealthy",
                    Some("the last rollout of this scope did not pass verification".to_string()),
                )
            } else if !problems.is_empty() {
                ("unhealthy", Some(problems.join("; ")))
            } else if !unknown.is_empty() {
                (
                    "unknown",
                    Some(format!(
                        "cannot ask the runtime about {}",
                        unknown.join(", ")
                    )),
                )
            } else {
                ("healthy", None)
            };
            scopes.push(ScopeView {
                name: name.clone(),
                owner: state.current.owner.to_string(),
                release: state.current.release.clone(),
                commit: state.current.commit.clone(),
                health: health.to_string(),
                detail,
                members,
                rollout: state.current.rollout,
                problem: state.problem.clone(),
            });
        }
        StatusReport {
            agent: AgentView {
                running: true,
                pid: Some(std::process::id()),
                since: Some(api::time_text(live.since)),
                activity: live.activity.clone(),
                reported_at: api::time_text(now_ms()),
                error: live.last_error.clone(),
            },
            source: SourceView {
                url: source_text(&self.config),
                branch: self.config.source.branch.clone(),
                manifest: self.config.source.manifest.clone(),
                desired_commit: live.desired.clone(),
                deployed_commit: host.deployed_commit.clone(),
                failed_commit: host.failed_commit.clone(),
                last_fetch: live.last_fetch.map(api::time_text),
                last_fetch_error: live.last_fetch_error.clone(),
                next_fetch: live.next_fetch.map(api::time_text),
                watch: self.watch_text(),
                webhook: live.webhook.clone(),
                queued: live.queued.clone(),
            },
            scopes,
            last_rollout: last.as_ref().map(RolloutSummary::from),
        }
    }

    /// Write the status snapshot atomically, readable by the owner only.
    /// Snapshots are taken and written one at a time, so the last one written
    /// is the freshest.
    async fn snapshot(&self) {
        let _turn = self.snapshot_turn.lock().await;
        let report = self.status().await;
        let dir = self.config.state.dir.clone();
        match tokio::task::spawn_blocking(move || write_snapshot(&dir, &report)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot write the status snapshot"),
            Err(e) => warn!(error = %e, "the status snapshot task failed"),
        }
    }

    /// Write the snapshot in the background: asking the user manager for
    /// every member's state and syncing the file take a while, and a wake-up
    /// arriving meanwhile must not wait for them.
    fn spawn_snapshot(self: &Arc<Self>) {
        let agent = Arc::clone(self);
        tokio::spawn(async move { agent.snapshot().await });
    }
}

fn source_text(config: &Config) -> String {
    match &config.source.url {
        crate::config::SourceUrl::Local(p) => p.display().to_string(),
        crate::config::SourceUrl::Remote(u) => u.clone(),
    }
}

pub fn snapshot_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SNAPSHOT_NAME)
}

fn write_snapshot(state_dir: &Path, report: &StatusReport) -> std::io::Result<()> {
    use std::io::Write;
    let path = snapshot_path(state_dir);
    let tmp = state_dir.join(format!(".{SNAPSHOT_NAME}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(report).expect("status reports always serialize"))?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)
}

impl api::Handler for Agent {
    async fn handle(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status(Box::new(self.status().await)),
            Request::History { scope, limit } => match self.store.rollouts(scope.as_deref(), limit)
            {
                Ok(records) => {
                    Response::History(records.iter().map(api::RolloutView::from).collect())
                }
                Err(e) => Response::Error(e.to_string()),
            },
            Request::Show { id } => match self.store.rollout(id) {
                Ok(record) => {
                    Response::Show(record.as_ref().map(|r| Box::new(api::RolloutView::from(r))))
                }
                Err(e) => Response::Error(e.to_string()),
            },
            Request::Sync => {
                let _ = self.wake.try_send(Wake::Sync);
                Response::Synced
            }
            Request::Plan { rev } => {
                let engine = Engine::new(self.config.clone(), self.store.clone());
                match tokio::task::spawn_blocking(move || {
                    crate::cli::plan::compute(&engine, rev.as_deref())
                })
                .await
                {
                    Ok(Ok(view)) => Response::Plan(view),
                    Ok(Err(e)) => Response::Error(e),
                    Err(e) => Response::Error(e.to_string()),
                }
            }
        }
    }
}

/// Run the agent until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    // Everything the agent creates — the history database's files, whenever
    // sled makes them, snapshots, unit files — is its user's only. Release
    // contents get explicit modes, and builds run with umask 022 so their
    // outputs can go into images run as another uid.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let dir = config.state.dir.clone();
    prepare_state_dir(&dir)?;
    let store = Store::open(&dir)?;
    crate::privacy::restrict_state_dir(&dir).with_context(|| {
        format!(
            "cannot restrict state directory \"{}\" to its owner",
            dir.display()
        )
    })?;
    let mut engine = Engine::new(config.clone(), store.clone());
    for id in engine.close_interrupted().map_err(anyhow::Error::msg)? {
        warn!(
            rollout = id,
            "closed a rollout interrupted by a previous stop"
        );
    }
    engine.recover().await;
    audit(&mut engine, true).await;
    let (wake_tx, mut wake_rx) = mpsc::channel::<Wake>(1);
    let live = Arc::new(Mutex::new(Live {
        since: now_ms(),
        activity: "starting".into(),
        webhook: "off".into(),
        ..Live::default()
    }));
    let agent = Arc::new(Agent {
        config: config.clone(),
        store: store.clone(),
        live: live.clone(),
        wake: wake_tx.clone(),
        runtimes: tokio::sync::Mutex::new(Runtimes::new(
            &config.docker.host,
            &engine.source.url_text(),
        )),
        watch: Mutex::new(WatchState::Off),
        snapshot_turn: tokio::sync::Mutex::new(()),
    });
    let listener = api::bind(&dir)?;
    let server = tokio::spawn(api::serve(listener, agent.clone()));

    let set_live = |f: &dyn Fn(&mut Live)| {
        if let Ok(mut l) = live.lock() {
            f(&mut l);
        }
    };
    let (stop_webhook, webhook) = start_webhook(&config, wake_tx.clone(), &live).await;

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    info!(source = %source_text(&config), branch = %config.source.branch, "agent started");
    let local = engine.source.local_path().map(Path::to_path_buf);
    let mut trigger = "startup".to_string();
    let mut failures: u32 = 0;
    loop {
        agent.ensure_watch(local.as_deref());
        set_live(&|l| {
            l.activity = "fetching".into();
            l.queued = None;
        });
        let started = Instant::now();
        // A wake-up that arrives while this turn converges: not interleaved
        // with the rollout, but the reason to fetch again right after it.
        // Later ones are counted into it: one fetch serves them all.
        let mut queued: Option<(Wake, u64, u32)> = None;
        match engine.fetch().await {
            Ok(head) => {
                failures = 0;
                let fetch_ms = started.elapsed().as_millis() as u64;
                set_live(&|l| {
                    l.last_fetch = Some(now_ms());
                    l.last_fetch_error = None;
                    l.desired = Some(head.clone());
                    l.activity = format!("rolling out {}", short(&head));
                });
                notify_status(&format!("deploying {}", short(&head)));
                let stop = engine.stop.clone();
                let converged = {
                    let converge = engine.converge(head.clone(), &trigger, fetch_ms);
                    tokio::pin!(converge);
                    // Set once a stop was asked for: the rollout then has
                    // until here to reach a step boundary.
                    let mut stop_by: Option<tokio::time::Instant> = None;
                    loop {
                        let until_stop = async {
                            match stop_by {
                                Some(at) => tokio::time::sleep_until(at).await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            biased;
                            converged = &mut converge => break Some(converged),
                            _ = stop.parked(), if stop_by.is_some() => break None,
                            _ = until_stop => {
                                warn!("the rollout reached no step boundary in time; stopping anyway");
                                break None;
                            }
                            _ = terminate.recv(), if stop_by.is_none() => {
                                info!("stop requested during a rollout; it ends at its next step");
                                notify_status("stopping at the next step of the rollout");
                                stop.request();
                                stop_by = Some(tokio::time::Instant::now() + STOP_GRACE);
                            }
                            _ = tokio::signal::ctrl_c(), if stop_by.is_none() => {
                                info!("stop requested during a rollout; it ends at its next step");
                                stop.request();
                                stop_by = Some(tokio::time::Instant::now() + STOP_GRACE);
                            }
                            Some(wake) = wake_rx.recv() => {
                                let (first, at, more) = match queued.take() {
                                    None => (wake, now_ms(), 0),
                                    Some((first, at, more)) => (first, at, more + 1),
                                };
                                let text = queued_text(&first, at, more);
                                info!(queued = %text, "wake-up during a rollout; fetching again when it ends");
                                set_live(&|l| l.queued = Some(text.clone()));
                                queued = Some((first, at, more));
                            }
                        }
                    }
                };
                let Some(converged) = converged else {
                    // The rollout is dropped where it stood; its record says
                    // so, and the next start converges from there.
                    match engine.close_interrupted() {
                        Ok(ids) => {
                            for id in ids {
                                warn!(rollout = id, "rollout interrupted by a stop request");
                            }
                        }
                        Err(e) => warn!(error = %e, "cannot close the interrupted rollout"),
                    }
                    break;
                };
                let error = converged.as_ref().err().map(ToString::to_string);
                set_live(&|l| l.last_error = error.clone());
                match converged {
                    Ok(Converged::Rolled(record)) => {
                        audit(&mut engine, false).await;
                        // The store may have created files since the last turn.
                        if let Err(e) = crate::privacy::restrict_state_dir(&dir) {
                            warn!(error = %e, "cannot restrict the state directory to its owner");
                        }
                        notify_status(&format!(
                            "rollout {} of {}: {}",
                            record.id,
                            short(&record.commit),
                            record.outcome.as_str()
                        ));
                    }
                    Ok(Converged::Idle(why)) => {
                        let text = match why {
                            Idle::UpToDate => format!("up to date at {}", short(&head)),
                            Idle::FailedBefore => {
                                format!("{} failed; waiting for a newer commit", short(&head))
                            }
                        };
                        notify_status(&text);
                    }
                    Err(e) => {
                        warn!(error = %e, transient = e.is_transient(), "cannot converge")
                    }
                }
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, transient = e.is_transient(), failures, "fetch failed");
                notify_status(&format!("fetch failed: {e}"));
                set_live(&|l| {
                    l.last_fetch = Some(now_ms());
                    l.last_fetch_error = Some(e.to_string());
                });
            }
        }
        if let Some((wake, _, _)) = queued {
            // Straight to the newest commit: the next fetch reads the branch as it is now.
            trigger = wake_name(&wake).to_string();
            continue;
        }
        let delay = next_delay(config.source.poll, failures, seed());
        set_live(&|l| {
            l.activity = "idle".into();
            l.next_fetch = Some(now_ms() + delay.as_millis() as u64);
        });
        agent.spawn_snapshot();

        let event = tokio::select! {
            wake = wake_rx.recv() => wake.map(Event::Wake).unwrap_or(Event::Shutdown),
            _ = tokio::time::sleep(delay) => Event::Tick,
            _ = tokio::signal::ctrl_c() => Event::Shutdown,
            _ = terminate.recv() => Event::Shutdown,
        };
        trigger = match event {
            Event::Tick => wake_name(&Wake::Poll).to_string(),
            Event::Wake(wake) => wake_name(&wake).to_string(),
            Event::Shutdown => break,
        };
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    info!("agent stopping");
    set_live(&|l| l.activity = "stopping".into());
    agent.snapshot().await;
    drop(stop_webhook);
    if let Some(task) = webhook {
        match task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "the webhook listener failed"),
            Err(e) => warn!(error = %e, "the webhook listener task failed"),
        }
    }
    if let Ok(mut watch) = agent.watch.lock() {
        *watch = WatchState::Off;
    }
    server.abort();
    let _ = std::fs::remove_file(dir.join(api::SOCKET_NAME));
    Ok(())
}

/// Run the ownership audit; findings are logged (and stored by the engine).
async fn audit(engine: &mut Engine, drift: bool) {
    match engine.audit(drift).await {
        Ok(findings) => {
            for f in findings {
                warn!(scope = %f.scope, "audit: {}", f.text);
            }
        }
        Err(e) => warn!(error = %e, "audit failed"),
    }
}

type WebhookTask = tokio::task::JoinHandle<Result<(), crate::source::webhook::WebhookError>>;

/// Bind the webhook listener when one is configured and serve it until the
/// returned sender is dropped. A secret or bind error is logged and shown in
/// `status`; the agent goes on polling.
async fn start_webhook(
    config: &Config,
    wake: mpsc::Sender<Wake>,
    live: &Mutex<Live>,
) -> (tokio::sync::oneshot::Sender<()>, Option<WebhookTask>) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let Some(cfg) = &config.trigger.webhook else {
        return (stop_tx, None);
    };
    match WebhookServer::bind(cfg).await {
        Ok(server) => {
            let text = format!("listening on {}", server.local_addr());
            if let Ok(mut l) = live.lock() {
                l.webhook = text;
            }
            let branch = config.source.branch.clone();
            let shutdown = async move {
                // Sent or dropped: either way the agent is stopping.
                let _ = stop_rx.await;
            };
            let task = tokio::spawn(async move { server.run(&branch, wake, shutdown).await });
            (stop_tx, Some(task))
        }
        Err(e) => {
            warn!(error = %e, "cannot start the webhook listener; polling only");
            let text = format!(
                "failed: {e}; polling every {}",
                duration_text(config.source.poll)
            );
            if let Ok(mut l) = live.lock() {
                l.webhook = text;
            }
            (stop_tx, None)
        }
    }
}

/// Read the snapshot a (stopped) agent left, marked as not running.
pub fn read_snapshot(state_dir: &Path) -> Option<StatusReport> {
    let bytes = std::fs::read(snapshot_path(state_dir)).ok()?;
    let mut report: StatusReport = serde_json::from_slice(&bytes).ok()?;
    report.agent.running = false;
    report.agent.pid = None;
    report.agent.activity = "not running".into();
    Some(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_states_read_as_status_shows_them() {
        let poll = Duration::from_secs(60);
        assert_eq!(watch_text(&WatchState::Off, poll), "off");
        assert_eq!(
            watch_text(
                &WatchState::SetupFailed("\"/srv/app.git\" was removed or moved".into()),
                poll
            ),
            "failed: \"/srv/app.git\" was removed or moved; polling every 60s"
        );
        assert_eq!(duration_text(Duration::from_secs(1)), "1s");
        assert_eq!(duration_text(Duration::from_millis(250)), "250ms");
        assert_eq!(duration_text(Duration::from_millis(1500)), "1500ms");
        assert_eq!(
            queued_text(&Wake::Watch, 0, 0),
            "watch wake-up at 1970-01-01T00:00:00Z"
        );
        assert_eq!(
            queued_text(&Wake::Sync, 0, 2),
            "sync wake-up at 1970-01-01T00:00:00Z (and 2 more, coalesced)"
        );
        let hook = Wake::Webhook {
            provider: "github",
            delivery: None,
        };
        assert_eq!(
            queued_text(&hook, 1_000, 0),
            "webhook wake-up at 1970-01-01T00:00:01Z"
        );
    }

    #[test]
    fn polling_jitters_and_backs_off_with_a_cap() {
        let poll = Duration::from_secs(60);
        assert_eq!(next_delay(poll, 0, 0), Duration::from_secs(54));
        assert_eq!(next_delay(poll, 0, 12_000), Duration::from_secs(66));
        assert_eq!(next_delay(poll, 1, 12_000), Duration::from_secs(120));
        assert_eq!(next_delay(poll, 3, 48_000), Duration::from_secs(480));
        assert_eq!(next_delay(poll, 10, 90_000), Duration::from_secs(900));
        assert_eq!(
            next_delay(Duration::from_secs(3600), 5, 360_000),
            Duration::from_secs(3600)
        );
    }
}
