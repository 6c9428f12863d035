//! Slotted scopes (`strategy = "blue-green"` or `"canary"`): two instances
//! of the scope's form, template units (`app-web@0`, `app-web@1`) or
//! containers (`app-web-0`, `app-web-1`), one serving through the edge while
//! the next release starts in the other. Which slot
//! serves is what the edge routes to, asked of the edge every time (not
//! what the store last recorded): after a crash between the switch and the
//! record, the slot that serves is still never the one a deploy restarts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::future::try_join_all;
use tokio::time::Instant;

use super::docker::Docker;
use super::systemd::Systemd;
use super::{RuntimeError, docker, systemd};
use crate::edge::control::{ControlError, EdgeClient};
use crate::edge::table::Route;
use crate::journal::Journal;
use crate::manifest::{EdgeSpec, Scope};

/// How the agent reaches (and starts) the edge.
#[derive(Clone)]
pub struct EdgeHandle {
    pub client: EdgeClient,
    /// For the health checks of a new slot.
    pub http: reqwest::Client,
    /// The binary and host config the edge unit runs with, if the agent
    /// writes the unit.
    exe: PathBuf,
    config: PathBuf,
    /// The user manager the edge runs under, for a runtime that is not the
    /// native one (set when a runtime is handed out).
    pub user_manager: Option<Systemd>,
}

impl EdgeHandle {
    pub fn new(state_dir: &Path, config: &Path) -> EdgeHandle {
        EdgeHandle {
            client: EdgeClient::new(state_dir),
            http: crate::health::client(),
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("moorline")),
            config: config.to_owned(),
            user_manager: None,
        }
    }
}

/// The form a scope's members take on a runtime: units or containers (for
/// a slotted scope, template instances or `<name>-<slot>` containers).
/// Everything slot-specific below asks its form; `Runtime::verify` settles
/// through it too.
#[derive(Clone, Copy)]
pub enum Form<'a> {
    Units(&'a Systemd),
    Containers { docker: &'a Docker, source: &'a str },
}

impl Form<'_> {
    fn instances(&self, scope: &Scope, slot: u8) -> Vec<String> {
        match self {
            Form::Units(_) => scope.slot_members(slot),
            Form::Containers { .. } => scope.slot_containers(slot),
        }
    }

    /// Bring slot `slot` up on `release`.
    async fn start(
        &self,
        scope: &Scope,
        slot: u8,
        release_dir: &Path,
        release: &str,
        journal: &mut Journal<'_>,
    ) -> Result<(), RuntimeError> {
        let addr = edge_of(scope).slots[usize::from(slot)];
        let env = [
            ("MOORLINE_SLOT", slot.to_string()),
            ("MOORLINE_LISTEN", addr.to_string()),
            ("MOORLINE_PORT", addr.port().to_string()),
        ];
        match self {
            Form::Units(sd) => {
                let sd = &sd.with_job_timeout(scope.job_timeout);
                let files = scope.native.as_ref().map(|n| n.unit_files.as_slice());
                let files = files.unwrap_or_default();
                systemd::scope::install_unit_files(sd, files, release_dir, release, journal)
                    .await?;
                let instances = scope.slot_members(slot);
                systemd::scope::point_and_restart(
                    sd,
                    &instances,
                    release_dir,
                    release,
                    &env,
                    journal,
                )
                .await
            }
            Form::Containers { docker, source } => {
                let target = super::Runtime::target(docker, source, scope, release_dir, release);
                docker::scope::start_slot(&target, slot, addr, &env, journal).await
            }
        }
    }

    /// Every instance stays up through the settle window.
    pub(super) async fn settle(
        &self,
        scope: &Scope,
        instances: &[String],
    ) -> Result<(), RuntimeError> {
        match self {
            Form::Units(sd) => {
                try_join_all(instances.iter().map(|u| sd.settle(u, scope.settle)))
                    .await
                    .map(drop)?;
            }
            Form::Containers { docker, .. } => {
                try_join_all(
                    instances
                        .iter()
                        .map(|c| docker.settle(c, scope.settle, scope.health_timeout)),
                )
                .await
                .map(drop)?;
            }
        }
        Ok(())
    }

    /// Stop the instances (containers are removed: a slot's container is
    /// created afresh at every deploy).
    async fn stop(
        &self,
        scope: &Scope,
        instances: &[String],
        journal: &mut Journal<'_>,
    ) -> Result<(), RuntimeError> {
        match self {
            Form::Units(sd) => {
                let sd = sd.with_job_timeout(scope.job_timeout);
                systemd::scope::stop(&sd, instances, journal).await
            }
            Form::Containers { docker, .. } => {
                docker::scope::stop(docker, instances, true, journal).await
            }
        }
    }

    /// Whether the instance runs (or is on its way up or down).
    async fn up(&self, instance: &str) -> Result<bool, RuntimeError> {
        Ok(match self {
            Form::Units(sd) => sd.unit_state(instance).await?.active_state != "inactive",
            Form::Containers { docker, .. } => docker
                .inspect(instance)
                .await?
                .is_some_and(|state| state.running),
        })
    }

    /// Whether the instance is up on `release`.
    async fn runs(&self, instance: &str, release: &str) -> Result<bool, RuntimeError> {
        Ok(match self {
            Form::Units(sd) => {
                sd.unit_state(instance).await?.active_state == "active"
                    && sd
                        .read_dropin(instance)
                        .await?
                        .is_some_and(|(_, commit)| commit == release)
            }
            Form::Containers { docker, .. } => {
                docker.inspect(instance).await?.is_some_and(|state| {
                    state.running
                        && state.labels.get(docker::LABEL_COMMIT).map(String::as_str)
                            == Some(release)
                })
            }
        })
    }

    async fn drift(
        &self,
        instances: &[String],
        release: &str,
    ) -> Result<Vec<String>, RuntimeError> {
        match self {
            Form::Units(sd) => systemd::scope::drift_of(sd, instances, release).await,
            Form::Containers { docker, .. } => {
                docker::scope::drift_of(docker, instances, release).await
            }
        }
    }
}

fn edge_of(scope: &Scope) -> &EdgeSpec {
    scope
        .edge
        .as_ref()
        .expect("the manifest gives every slotted scope an edge")
}

/// The route that sends every new request of `scope` to `slot`.
fn route_to(spec: &EdgeSpec, slot: u8) -> Route {
    super::canary::split(spec, slot, 100)
}

/// Start the edge if it does not run: its unit written into the user's unit
/// directory unless one is installed (a package's), then started. Returns
/// once the edge answers.
pub async fn ensure_edge(
    sd: &Systemd,
    edge: &EdgeHandle,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    if edge.client.report().await.is_ok() {
        return Ok(());
    }
    let sd = &sd.with_job_timeout(super::systemd::DEFAULT_JOB_TIMEOUT);
    let unit = crate::edge::UNIT;
    let state = sd.unit_state(unit).await?;
    if state.load_state == "not-found" {
        let text = crate::edge::unit_text(&edge.exe, &edge.config);
        journal
            .step(
                format!("install {unit}"),
                sd.install_unit_text(unit, text.as_bytes()),
            )
            .await?;
        journal
            .step("reload the user manager".to_string(), sd.daemon_reload())
            .await?;
    }
    journal
        .step(format!("start {unit}"), sd.start(unit))
        .await?;
    edge.client.report().await.map_err(RuntimeError::from)?;
    Ok(())
}

/// The scope's route as the edge serves it now; `None` before it routes
/// the scope. One report, from which the helpers below read.
async fn route(edge: &EdgeHandle, scope: &str) -> Result<Option<Route>, RuntimeError> {
    let report = edge.client.report().await?;
    Ok(report.routes.get(scope).map(|r| r.route()))
}

/// The slot that serves: the one the edge sends every new request to, or
/// in a canary's split (a rollout cut short) the one with the larger weight.
fn serving(route: Option<&Route>) -> Option<u8> {
    route?.serving().and_then(|slot| u8::try_from(slot).ok())
}

/// Whether the edge sends every new request to `slot`.
fn all_to(route: Option<&Route>, slot: u8) -> bool {
    route.and_then(Route::active) == Some(usize::from(slot))
}

/// The slot that serves the scope now (see `serving`).
pub async fn active(edge: &EdgeHandle, scope: &str) -> Result<Option<u8>, RuntimeError> {
    Ok(serving(route(edge, scope).await?.as_ref()))
}

/// Send every new request of `scope` back to `slot`, journaled.
async fn route_back(
    edge: &EdgeHandle,
    scope: &Scope,
    slot: u8,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let spec = edge_of(scope);
    journal
        .step(
            format!("route {} back to slot {slot}", spec.listen),
            edge.client.set(&scope.name, route_to(spec, slot)),
        )
        .await?;
    Ok(())
}

/// The instances of `slot` that are not stopped.
async fn up_in(form: &Form<'_>, scope: &Scope, slot: u8) -> Result<Vec<String>, RuntimeError> {
    let mut up = Vec::new();
    for instance in form.instances(scope, slot) {
        if form.up(&instance).await? {
            up.push(instance);
        }
    }
    Ok(up)
}

/// Bring `release` up in the idle slot and switch the edge to it: the idle
/// slot's instances are pointed at the release (with `MOORLINE_SLOT`,
/// `MOORLINE_LISTEN`, `MOORLINE_PORT`), restarted, watched through the settle
/// window and checked on the slot itself; only then does the edge send new
/// requests there. A failure before the switch stops the new instances and
/// leaves the serving slot as it was.
pub async fn switch(
    form: &Form<'_>,
    edge: &EdgeHandle,
    scope: &Scope,
    release_dir: &Path,
    release: &str,
    http: &reqwest::Client,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let spec = edge_of(scope);
    let current = route(edge, &scope.name).await?;
    let serving = serving(current.as_ref());
    let slot = match serving {
        Some(serving) => 1 - serving,
        None => 0,
    };
    if let Some(serving) = serving {
        if !all_to(current.as_ref(), serving) {
            // A canary cut short: the slot about to restart still takes some.
            route_back(edge, scope, serving, journal).await?;
        }
        // A slot still running (a canary or a drain cut short) keeps what
        // it has in flight until that ends, up to `drain`, before it restarts.
        if !up_in(form, scope, slot).await?.is_empty() {
            drain_slot(edge, scope, slot, journal).await?;
        }
    }
    form.start(scope, slot, release_dir, release, journal)
        .await?;
    let addr = spec.slots[usize::from(slot)];
    let instances = form.instances(scope, slot);
    crate::fault::point("after-slot-start");
    let mut checked = check_slot(form, scope, release_dir, addr, &instances, http).await;
    if let (Ok(()), Some(canary), Some(serving)) = (&checked, &scope.canary, serving) {
        checked = super::canary::promote(edge, scope, canary, slot, journal).await;
        if checked.is_err() {
            route_back(edge, scope, serving, journal).await?;
        }
    }
    if let Err(e) = checked {
        form.stop(scope, &instances, journal).await?;
        return Err(e);
    }
    journal
        .step(
            format!("route {} to slot {slot} ({addr})", spec.listen),
            edge.client.set(&scope.name, route_to(spec, slot)),
        )
        .await?;
    crate::fault::point("after-route");
    Ok(())
}

/// The new slot's instances stay up through the settle window and its
/// checks pass, asked of the slot's address.
async fn check_slot(
    form: &Form<'_>,
    scope: &Scope,
    release_dir: &Path,
    addr: std::net::SocketAddr,
    instances: &[String],
    http: &reqwest::Client,
) -> Result<(), RuntimeError> {
    let target = crate::health::Target {
        release: release_dir,
        at: Some(addr),
    };
    let health = async {
        crate::health::wait_all(&scope.health, target, scope.health_timeout, http)
            .await
            .map_err(RuntimeError::from)
    };
    tokio::try_join!(form.settle(scope, instances), health).map(drop)
}

/// Undo `switch`: the edge goes back to the slot that runs `target` if it
/// still does (warm during the drain), else `target` is started in the idle
/// slot as a switch would; then the other slot's instances stop.
pub async fn restore(
    form: &Form<'_>,
    edge: &EdgeHandle,
    old: &Scope,
    release_dir: &Path,
    target: &str,
    http: &reqwest::Client,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let mut warm = None;
    for slot in 0..2u8 {
        if runs(form, old, slot, target).await? {
            warm = Some(slot);
        }
    }
    match warm {
        Some(slot) if !all_to(route(edge, &old.name).await?.as_ref(), slot) => {
            route_back(edge, old, slot, journal).await?;
        }
        Some(_) => {}
        None => switch(form, edge, old, release_dir, target, http, journal).await?,
    }
    let other = idle(form, edge, old).await?;
    form.stop(old, &other, journal).await
}

/// Whether every instance of `slot` is up on `release`.
async fn runs(
    form: &Form<'_>,
    scope: &Scope,
    slot: u8,
    release: &str,
) -> Result<bool, RuntimeError> {
    for instance in form.instances(scope, slot) {
        if !form.runs(&instance, release).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The instances of the slot the edge sends no request to that are not
/// stopped; none while the route is split (a canary cut short: the next
/// deploy routes it back first).
pub async fn idle(
    form: &Form<'_>,
    edge: &EdgeHandle,
    scope: &Scope,
) -> Result<Vec<String>, RuntimeError> {
    let current = route(edge, &scope.name).await?;
    match serving(current.as_ref()) {
        Some(slot) if all_to(current.as_ref(), slot) => up_in(form, scope, 1 - slot).await,
        _ => Ok(vec![]),
    }
}

/// The switch passed: requests and WebSockets in flight on the slot that no
/// longer serves finish (up to `drain`), then its instances stop.
pub async fn finish(
    form: &Form<'_>,
    edge: &EdgeHandle,
    scope: &Scope,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let current = route(edge, &scope.name).await?;
    let Some(serving) = serving(current.as_ref()).filter(|s| all_to(current.as_ref(), *s)) else {
        return Ok(());
    };
    let up = up_in(form, scope, 1 - serving).await?;
    if up.is_empty() {
        return Ok(());
    }
    drain_slot(edge, scope, 1 - serving, journal).await?;
    form.stop(scope, &up, journal).await
}

/// Let the requests in flight on `slot` finish (up to `drain`), journaled.
async fn drain_slot(
    edge: &EdgeHandle,
    scope: &Scope,
    slot: u8,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let spec = edge_of(scope);
    let addr = spec.slots[usize::from(slot)];
    journal
        .step(
            format!(
                "drain slot {slot} ({addr}) for up to {}",
                humantime::format_duration(spec.drain)
            ),
            drain(edge, &scope.name, usize::from(slot), spec.drain),
        )
        .await?;
    Ok(())
}

/// Wait until the slot has no request in flight, or `limit` passed.
async fn drain(
    edge: &EdgeHandle,
    scope: &str,
    slot: usize,
    limit: Duration,
) -> Result<(), ControlError> {
    let deadline = Instant::now() + limit;
    loop {
        let report = edge.client.report().await?;
        let inflight = report
            .routes
            .get(scope)
            .and_then(|r| r.slots.get(slot))
            .map_or(0, |s| s.figures.inflight);
        if inflight == 0 || Instant::now() >= deadline {
            return Ok(());
        }
        crate::fault::point("during-drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The serving slot's instances that are down or run another release than
/// `release`; with no route at all, every instance of slot 0.
pub async fn drift(
    form: &Form<'_>,
    edge: &EdgeHandle,
    scope: &Scope,
    release: &str,
) -> Result<Vec<String>, RuntimeError> {
    let Some(serving) = active(edge, &scope.name).await? else {
        return Ok(vec![format!(
            "the edge has no route for scope {:?}",
            scope.name
        )]);
    };
    form.drift(&form.instances(scope, serving), release).await
}

/// A restart scope behind the edge, before its one instance restarts (or
/// its old owner stops, in a cutover): new requests are held (up to `hold`)
/// and those in flight finish (up to `drain`). Clients see a pause, not an
/// error, and the scope never runs twice.
pub async fn hold_requests(
    edge: &EdgeHandle,
    scope: &Scope,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let spec = edge_of(scope);
    if !edge.client.report().await?.routes.contains_key(&scope.name) {
        return Ok(()); // the first deploy: nothing to hold yet
    }
    journal
        .step(
            format!(
                "hold new requests to {} for up to {}",
                spec.listen,
                humantime::format_duration(spec.hold)
            ),
            edge.client.hold(&scope.name, spec.hold),
        )
        .await?;
    journal
        .step(
            format!(
                "drain {} for up to {}",
                spec.slots[0],
                humantime::format_duration(spec.drain)
            ),
            drain(edge, &scope.name, 0, spec.drain),
        )
        .await?;
    Ok(())
}

/// After a held restart (`switched` says how it went): requests go on as
/// soon as the instance answers its first health check on its slot, or
/// once `hold` is over in any case.
pub async fn release_requests(
    edge: &EdgeHandle,
    scope: &Scope,
    release_dir: &Path,
    switched: Result<(), RuntimeError>,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let spec = edge_of(scope);
    let target = crate::health::Target {
        release: release_dir,
        at: Some(spec.slots[0]),
    };
    let answered = match &switched {
        Ok(()) => crate::health::wait_all(&scope.health, target, spec.hold, &edge.http)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(why) = &answered {
        tracing::warn!(scope = %scope.name, why = %why, "releasing held requests to an instance that did not answer");
    }
    journal
        .step(
            format!("route {} to {}", spec.listen, spec.slots[0]),
            edge.client.set(&scope.name, route_to(spec, 0)),
        )
        .await?;
    journal
        .step(
            format!("release the requests held for {}", spec.listen),
            edge.client.release(&scope.name),
        )
        .await?;
    switched
}

/// A slotted scope taken out of service: the edge stops routing it.
pub async fn unroute(
    edge: &EdgeHandle,
    scope: &str,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    journal
        .step(
            format!("remove the edge route of {scope}"),
            edge.client.remove(scope),
        )
        .await?;
    Ok(())
}

impl From<ControlError> for RuntimeError {
    fn from(e: ControlError) -> RuntimeError {
        RuntimeError::Edge(e)
    }
}
