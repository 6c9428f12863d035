//! The daemon: one loop that takes a closed set of events (poll tick, wake
//! from a trigger or `moorline sync`, shutdown), fetches and converges; the
//! control channel answering beside it. The live status and the snapshot
//! on disk are the submodules.

/// `hold`, `resume`, `rollback`, `restart`, `approve`, answered on the
/// control channel.
mod hand;
/// The status snapshot on disk.
pub mod snapshot;
/// `Live` and the status report.
mod status;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;
use tracing::{info, warn};

use self::status::{Live, queued_text, source_text};
use crate::api::{self, Request, Response};
use crate::config::Config;
use crate::notify::Message;
use crate::rollout::{Converged, Engine, Idle};
use crate::runtime::Runtimes;
use crate::source::watch::WatchTrigger;
use crate::source::webhook::WebhookTrigger;
use crate::source::{Trigger, Wake, short};
use crate::store::{Store, now_ms};

/// How long a rollout asked to stop may take to reach its next step
/// boundary before it is dropped where it is (well inside systemd's
/// default `TimeoutStopSec` of 90 s).
const STOP_GRACE: Duration = Duration::from_secs(10);

/// systemd's watchdog (`WatchdogSec=` in the unit): the loop pings it from
/// each place it waits — the fetch, a rollout, the idle wait — twice per
/// interval, so a loop that stops turning (a deadlock, a wedged runtime) is
/// restarted by systemd. Without `WATCHDOG_USEC` it never fires.
struct Watchdog {
    ticks: Option<tokio::time::Interval>,
}

impl Watchdog {
    fn from_env() -> Watchdog {
        let ticks = sd_notify::watchdog_enabled().map(|every| {
            let mut ticks = tokio::time::interval(every / 2);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        Watchdog { ticks }
    }

    /// The next ping is due (never, without a watchdog).
    async fn tick(&mut self) {
        match &mut self.ticks {
            Some(ticks) => {
                ticks.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    fn ping(&self) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
    }

    /// Await `work`, pinging meanwhile.
    async fn through<T>(&mut self, work: impl Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = self.tick() => self.ping(),
            }
        }
    }
}

/// The closed set of things the loop reacts to.
#[derive(Debug)]
enum Event {
    Tick,
    Wake(Wake),
    Shutdown,
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
    /// The triggers besides the poll timer and `moorline sync`.
    triggers: Mutex<Vec<Box<dyn Trigger>>>,
    snapshot_turn: tokio::sync::Mutex<()>,
    /// What `/metrics` counts.
    metrics: crate::http::metrics::Metrics,
    /// `[[notify]]` targets.
    notifier: crate::notify::Notifier,
}

impl crate::http::Backend for Agent {
    async fn metrics(&self) -> String {
        let host = self.store.host().unwrap_or_default();
        let edge = crate::edge::control::EdgeClient::new(&self.config.state.dir)
            .report()
            .await
            .ok();
        self.metrics.render(&host, edge)
    }

    async fn answer(&self, request: Request) -> Response {
        match request {
            Request::Status | Request::History { .. } | Request::Show { .. } => {
                let me = crate::channel::Peer {
                    uid: rustix::process::getuid().as_raw(),
                };
                api::Handler::handle(self, request, me).await
            }
            _ => Response::Error("the HTTP side is read-only".into()),
        }
    }
}

impl Agent {
    /// What `status` shows for the trigger called `name` ("off" if none).
    fn trigger_state(&self, name: &str) -> String {
        self.triggers
            .lock()
            .ok()
            .and_then(|t| t.iter().find(|t| t.name() == name).map(|t| t.state()))
            .unwrap_or_else(|| "off".into())
    }

    fn live(&self) -> Live {
        self.live.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Write the status snapshot atomically, readable by the owner only.
    /// Snapshots are taken and written one at a time, so the last one written
    /// is the freshest.
    async fn snapshot(&self) {
        let _turn = self.snapshot_turn.lock().await;
        let report = self.status().await;
        let dir = self.config.state.dir.clone();
        match tokio::task::spawn_blocking(move || snapshot::write(&dir, &report)).await {
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

impl api::Handler for Agent {
    async fn handle(&self, request: Request, peer: crate::channel::Peer) -> Response {
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
                let mut engine = Engine::new(self.config.clone(), self.store.clone());
                // The branch after a fetch, within fetch_timeout.
                let rev = match rev {
                    Some(rev) => rev,
                    None => match engine.fetch().await {
                        Ok(head) => head,
                        Err(e) => return Response::Error(e.to_string()),
                    },
                };
                let serving = api::serving_slots(&self.config.state.dir).await;
                match tokio::task::spawn_blocking(move || api::plan_view(&engine, &rev, &serving))
                    .await
                {
                    Ok(Ok(view)) => Response::Plan(view),
                    Ok(Err(e)) => Response::Error(e),
                    Err(e) => Response::Error(e.to_string()),
                }
            }
            Request::Hold { scope, reason, .. } => self.hold(&scope, &reason, peer),
            Request::Resume { scope, .. } => self.resume(&scope, peer),
            Request::Rollback { scope, to, reason } => {
                self.rollback(&scope, to, &reason, peer).await
            }
            Request::Restart { scope, reason } => self.restart(&scope, &reason, peer),
            Request::Approve { commit, scope } => self.approve(&commit, scope.as_deref(), peer),
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
    crate::privacy::prepare_state_dir(&dir)?;
    let store = Store::open(&dir)?;
    crate::privacy::restrict_state_dir(&dir).with_context(|| {
        format!(
            "cannot restrict state directory \"{}\" to its owner",
            dir.display()
        )
    })?;
    let mut engine = Engine::new(config.clone(), store.clone());
    let metrics = crate::http::metrics::Metrics::default();
    for id in engine.close_interrupted().map_err(anyhow::Error::msg)? {
        warn!(
            rollout = id,
            "closed a rollout interrupted by a previous stop"
        );
    }
    engine.recover().await;
    let start_findings = findings(&mut engine, true).await;
    let (wake_tx, mut wake_rx) = mpsc::channel::<Wake>(1);
    let live = Arc::new(Mutex::new(Live {
        since: now_ms(),
        activity: "starting".into(),
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
            crate::runtime::slots::EdgeHandle::new(&config.state.dir, &config.path),
        )),
        triggers: Mutex::new(Vec::new()),
        snapshot_turn: tokio::sync::Mutex::new(()),
        metrics: metrics.clone(),
        notifier: crate::notify::Notifier::start(&config.notify, metrics),
    });
    if let Ok(Some(last)) = store.rollouts(None, 1).map(|r| r.into_iter().next()) {
        agent.metrics.seen_rollout(&last);
    }
    for f in &start_findings {
        agent
            .notifier
            .send(&Message::of_audit(&f.scope, &f.text, &config.host.name));
    }
    let listener = api::bind(&dir)?;
    let server = tokio::spawn(api::serve(listener, agent.clone()));
    let http = match &config.http {
        Some(http) => {
            let bound = crate::http::HttpServer::bind(http).await?;
            Some(tokio::spawn(bound.run(agent.clone())))
        }
        None => None,
    };

    let set_live = |f: &dyn Fn(&mut Live)| {
        if let Ok(mut l) = live.lock() {
            f(&mut l);
        }
    };
    let local = engine.source.local_path().map(Path::to_path_buf);
    let watch = WatchTrigger::new(
        local.as_deref(),
        config.trigger.watch,
        &config.source.branch,
        config.source.poll,
        wake_tx.clone(),
    );
    let webhook = WebhookTrigger::start(
        config.trigger.webhook.as_ref(),
        &config.source.branch,
        config.source.poll,
        wake_tx.clone(),
    )
    .await;
    if let Ok(mut triggers) = agent.triggers.lock() {
        *triggers = vec![Box::new(watch), Box::new(webhook)];
    }

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut watchdog = Watchdog::from_env();
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    info!(source = %source_text(&config), branch = %config.source.branch, "agent started");
    let mut trigger = "startup".to_string();
    let mut failures: u32 = 0;
    loop {
        if let Ok(mut triggers) = agent.triggers.lock() {
            for trigger in triggers.iter_mut() {
                trigger.before_fetch();
            }
        }
        set_live(&|l| {
            l.activity = "fetching".into();
            l.queued = None;
        });
        let started = Instant::now();
        // A wake-up that arrives while this turn converges: not interleaved
        // with the rollout, but the reason to fetch again right after it.
        // Later ones are counted into it: one fetch serves them all.
        let mut queued: Option<(Wake, u64, u32)> = None;
        let fetched = watchdog.through(engine.fetch()).await;
        agent.metrics.fetched(fetched.is_ok());
        let fetched = match fetched {
            // What was asked by hand needs no remote: it goes on while the
            // remote is away (the failed fetch is shown all the same).
            Err(e) if engine.hand_due() => {
                warn!(error = %e, "fetch failed; carrying out what was asked by hand");
                set_live(&|l| l.last_fetch_error = Some(e.to_string()));
                Ok(None)
            }
            other => other.map(Some),
        };
        match fetched {
            Ok(fetched) => {
                let head = fetched.clone().unwrap_or_default();
                let fetch_ms = started.elapsed().as_millis() as u64;
                if fetched.is_some() {
                    failures = 0;
                    set_live(&|l| {
                        l.last_fetch = Some(now_ms());
                        l.last_fetch_error = None;
                        l.desired = Some(head.clone());
                    });
                }
                set_live(&|l| l.activity = format!("rolling out {}", short(&head)));
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
                            _ = watchdog.tick() => watchdog.ping(),
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
                if let Ok(Converged::ByHand(_)) = &converged {
                    // What was asked by hand is done; the branch is next.
                    queued.get_or_insert((Wake::Sync, now_ms(), 0));
                }
                match converged {
                    Ok(Converged::Rolled(record) | Converged::ByHand(record)) => {
                        agent.metrics.rollout_finished(&record);
                        for message in Message::of_rollout(&record, &config.host.name) {
                            agent.notifier.send(&message);
                        }
                        agent.audit(&mut engine, false).await;
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
                            Idle::AwaitingApproval => {
                                format!("{} awaits approval (moorline approve)", short(&head))
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
        if engine.stop.is_requested() {
            // The stop came after the rollout's last step boundary: the
            // rollout ended whole, and the agent stops now.
            break;
        }
        if let Some((wake, _, _)) = queued {
            // Straight to the newest commit: the next fetch reads the branch as it is now.
            trigger = wake.name().to_string();
            continue;
        }
        let delay = next_delay(config.source.poll, failures, seed());
        set_live(&|l| {
            l.activity = "idle".into();
            l.next_fetch = Some(now_ms() + delay.as_millis() as u64);
        });
        agent.spawn_snapshot();

        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        let event = loop {
            tokio::select! {
                wake = wake_rx.recv() => break wake.map(Event::Wake).unwrap_or(Event::Shutdown),
                _ = &mut sleep => break Event::Tick,
                _ = tokio::signal::ctrl_c() => break Event::Shutdown,
                _ = terminate.recv() => break Event::Shutdown,
                _ = watchdog.tick() => watchdog.ping(),
            }
        };
        trigger = match event {
            Event::Tick => Wake::Poll.name().to_string(),
            Event::Wake(wake) => wake.name().to_string(),
            Event::Shutdown => break,
        };
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    info!("agent stopping");
    set_live(&|l| l.activity = "stopping".into());
    agent.snapshot().await;
    if let Ok(mut triggers) = agent.triggers.lock() {
        // Dropped: the watch stops, the webhook listener shuts down.
        triggers.clear();
    }
    server.abort();
    if let Some(http) = http {
        http.abort();
    }
    let _ = std::fs::remove_file(dir.join(api::SOCKET_NAME));
    Ok(())
}

/// Run the ownership audit; findings are logged (and stored by the engine).
async fn findings(engine: &mut Engine, drift: bool) -> Vec<crate::rollout::audit::Finding> {
    match engine.audit(drift).await {
        Ok(findings) => {
            for f in &findings {
                warn!(scope = %f.scope, "audit: {}", f.text);
            }
            findings
        }
        Err(e) => {
            warn!(error = %e, "audit failed");
            vec![]
        }
    }
}

impl Agent {
    /// The audit after a rollout; what it finds is announced too.
    async fn audit(&self, engine: &mut Engine, drift: bool) {
        for f in findings(engine, drift).await {
            let message = Message::of_audit(&f.scope, &f.text, &self.config.host.name);
            self.notifier.send(&message);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_states_read_as_status_shows_them() {
        use crate::source::duration_text;
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
