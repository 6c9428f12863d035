//! systemd user units over D-Bus: the native runtime. Installs unit files and the per-unit
//! drop-in that points a unit at its release, restarts units and waits for their jobs, and
//! watches a started unit long enough to know it stays up.

/// A scope's units: switch, verify, stop, retire (journaled).
pub mod scope;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tracing::{debug, info};
use zbus::proxy::CacheProperties;
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, UnitProxy};

/// Name of the drop-in the agent owns inside `<unit>.d/`.
const DROPIN_NAME: &str = "50-moorline.conf";
/// Interval between two looks at a unit that is settling.
const SETTLE_POLL: Duration = Duration::from_millis(50);
/// How long `settle` waits for a unit that is stopping to reach the state it reports.
const DEACTIVATING_GRACE: Duration = Duration::from_secs(5);
/// D-Bus error systemd answers for a unit that is not loaded.
const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";

/// Errors of the systemd adapter; each names the unit, file or bus involved.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error(
        "cannot find the user bus: neither DBUS_SESSION_BUS_ADDRESS nor XDG_RUNTIME_DIR is set"
    )]
    NoBusAddress,
    #[error("cannot find the user unit directory: neither XDG_CONFIG_HOME nor HOME is set")]
    NoUnitDir,
    #[error("cannot reach the systemd user manager at {address:?}: {source}")]
    Connect {
        address: String,
        #[source]
        source: zbus::Error,
    },
    #[error("invalid unit name {unit:?}: {reason}")]
    InvalidUnitName { unit: String, reason: &'static str },
    #[error("{action} of {unit:?} failed: {source}")]
    Call {
        action: &'static str,
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("{action} of {unit:?} failed: job result {result:?}")]
    Job {
        action: &'static str,
        unit: String,
        result: String,
    },
    #[error("{action} of {unit:?} did not finish within {}", humantime::format_duration(*.limit))]
    JobTimeout {
        action: &'static str,
        unit: String,
        limit: Duration,
    },
    #[error("{detail}")]
    DidNotSettle { unit: String, detail: String },
    #[error("daemon-reload of the systemd user manager failed: {source}")]
    Reload {
        #[source]
        source: zbus::Error,
    },
    #[error("cannot read unit file {path:?} for {unit:?}: {source}")]
    ReadUnitFile {
        unit: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path:?} for {unit:?}: {source}")]
    Write {
        unit: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the drop-in {path:?} of {unit:?}: {source}")]
    ReadDropin {
        unit: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the drop-in {path:?} of {unit:?} is not one moorline wrote: {reason}")]
    MalformedDropin {
        unit: String,
        path: PathBuf,
        reason: String,
    },
    #[error("release directory {path:?} of {unit:?} cannot be given to systemd: {reason}")]
    InvalidRelease {
        unit: String,
        path: PathBuf,
        reason: &'static str,
    },
}

impl SystemdError {
    /// True for failures of the bus or the connection, which a later attempt may not meet;
    /// false for what a unit, a file or the input did, which a retry would only repeat.
    pub fn is_transient(&self) -> bool {
        match self {
            SystemdError::Connect { .. } => true,
            SystemdError::Call { source, .. } | SystemdError::Reload { source } => {
                is_transient_bus_error(source)
            }
            // Another job replaced ours (someone else restarted the unit meanwhile).
            SystemdError::Job { result, .. } => result == "canceled",
            // The unit may finish its job later; the rollout does not wait.
            SystemdError::JobTimeout { .. } => true,
            SystemdError::NoBusAddress
            | SystemdError::NoUnitDir
            | SystemdError::InvalidUnitName { .. }
            | SystemdError::DidNotSettle { .. }
            | SystemdError::ReadUnitFile { .. }
            | SystemdError::Write { .. }
            | SystemdError::ReadDropin { .. }
            | SystemdError::MalformedDropin { .. }
            | SystemdError::InvalidRelease { .. } => false,
        }
    }
}

fn is_transient_bus_error(error: &zbus::Error) -> bool {
    match error {
        zbus::Error::InputOutput(_) | zbus::Error::Connection(..) => true,
        zbus::Error::FDO(fdo) => matches!(
            **fdo,
            zbus::fdo::Error::NoReply(_)
                | zbus::fdo::Error::Timeout(_)
                | zbus::fdo::Error::TimedOut(_)
                | zbus::fdo::Error::ServiceUnknown(_)
                | zbus::fdo::Error::NoServer(_)
                | zbus::fdo::Error::Disconnected(_)
                | zbus::fdo::Error::IOError(_)
        ),
        _ => false,
    }
}

/// What systemd says about one unit at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    /// `loaded`, `not-found`, `error`, `masked`...
    pub load_state: String,
    /// `active`, `inactive`, `failed`, `activating`...
    pub active_state: String,
    pub sub_state: String,
    /// Hex of the current invocation's id; empty if the unit never ran.
    pub invocation_id: String,
    /// Automatic restarts (services only, else 0).
    pub n_restarts: u32,
    pub main_pid: u32,
    /// Exit status (or signal number) of the main process (services only, else 0).
    pub exec_main_status: i32,
    /// Realtime µs at which the unit last became active; 0 if never.
    pub active_enter_usec: u64,
    /// Service result (`success`, `exit-code`, `signal`, `timeout`...; services only, else empty).
    pub result: String,
}

/// The jobs the agent asks the manager for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Restart,
    Start,
    Stop,
}

impl Job {
    fn action(self) -> &'static str {
        match self {
            Job::Restart => "restart",
            Job::Start => "start",
            Job::Stop => "stop",
        }
    }
}

/// A connection to one systemd user manager and the directory its user units live in.
#[derive(Clone)]
pub struct Systemd {
    connection: zbus::Connection,
    manager: ManagerProxy<'static>,
    unit_dir: Arc<PathBuf>,
    /// How long a start, stop or restart job may take before the call
    /// gives up on it (the job itself goes on in the manager).
    job_timeout: Duration,
}

/// The job limit of a handle that was not given one (systemd's own
/// default stop timeout).
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(90);

impl Systemd {
    /// Connects to the user manager of this process' environment (DBUS_SESSION_BUS_ADDRESS,
    /// else `$XDG_RUNTIME_DIR/bus`); unit files go to `$XDG_CONFIG_HOME/systemd/user`
    /// (else `~/.config/systemd/user`).
    pub async fn connect() -> Result<Systemd, SystemdError> {
        let (address, unit_dir) = locate_user_manager(|name| std::env::var_os(name))?;
        Systemd::connect_to(&address, unit_dir).await
    }

    /// Connects to the user manager on the bus at `bus_address`, with unit files in `unit_dir`.
    pub async fn connect_to(bus_address: &str, unit_dir: PathBuf) -> Result<Systemd, SystemdError> {
        let connect_error = |source| SystemdError::Connect {
            address: bus_address.to_owned(),
            source,
        };
        let connection = zbus::connection::Builder::address(bus_address)
            .build()
            .await
            .map_err(connect_error)?;
        let manager = ManagerProxy::builder(&connection)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(connect_error)?;
        // Without a subscription systemd does not send us JobRemoved.
        manager.subscribe().await.map_err(connect_error)?;
        debug!(address = %bus_address, unit_dir = %unit_dir.display(), "connected to the systemd user manager");
        Ok(Systemd {
            connection,
            manager,
            unit_dir: Arc::new(unit_dir),
            job_timeout: DEFAULT_JOB_TIMEOUT,
        })
    }

    /// The same connection, with start/stop/restart jobs bounded by `limit`.
    pub fn with_job_timeout(&self, limit: Duration) -> Systemd {
        Systemd {
            job_timeout: limit,
            ..self.clone()
        }
    }

    /// Copies a unit file into the unit directory atomically; `Ok(true)` if its content changed.
    pub async fn install_unit_file(&self, src: &Path, unit: &str) -> Result<bool, SystemdError> {
        check_unit_name(unit)?;
        let content = tokio::fs::read(src)
            .await
            .map_err(|source| SystemdError::ReadUnitFile {
                unit: unit.to_owned(),
                path: src.to_owned(),
                source,
            })?;
        let changed = write_if_changed(unit, &self.unit_dir.join(unit), &content).await?;
        if changed {
            info!(unit = %unit, src = %src.display(), "installed unit file");
        }
        Ok(changed)
    }

    /// Writes the unit file `unit` with `content` (moorline's own units);
    /// `Ok(true)` if it changed.
    pub async fn install_unit_text(
        &self,
        unit: &str,
        content: &[u8],
    ) -> Result<bool, SystemdError> {
        check_unit_name(unit)?;
        let changed = write_if_changed(unit, &self.unit_dir.join(unit), content).await?;
        if changed {
            info!(unit = %unit, "installed unit file");
        }
        Ok(changed)
    }

    /// Writes `<unit>.d/50-moorline.conf`, pointing the unit at `release` and `commit`;
    /// `Ok(true)` if it changed. Units other than services get no drop-in (`Ok(false)`).
    pub async fn write_dropin(
        &self,
        unit: &str,
        release: &Path,
        commit: &str,
        env: &[(&str, String)],
    ) -> Result<bool, SystemdError> {
        check_unit_name(unit)?;
        if !unit.ends_with(".service") {
            return Ok(false);
        }
        let content = render_dropin(unit, release, commit, env)?;
        let path = self.dropin_path(unit);
        let changed = write_if_changed(unit, &path, content.as_bytes()).await?;
        if changed {
            info!(unit = %unit, release = %release.display(), commit = %commit, "wrote drop-in");
        }
        Ok(changed)
    }

    /// The release directory and commit our drop-in currently gives `unit`, if it has one.
    pub async fn read_dropin(&self, unit: &str) -> Result<Option<(PathBuf, String)>, SystemdError> {
        check_unit_name(unit)?;
        let path = self.dropin_path(unit);
        let content = match tokio::fs::read_to_string(&path).await {
            Ok(content) => content,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(SystemdError::ReadDropin {
                    unit: unit.to_owned(),
                    path,
                    source,
                });
            }
        };
        parse_dropin(&content)
            .map(Some)
            .map_err(|reason| SystemdError::MalformedDropin {
                unit: unit.to_owned(),
                path,
                reason,
            })
    }

    fn dropin_path(&self, unit: &str) -> PathBuf {
        self.unit_dir.join(format!("{unit}.d")).join(DROPIN_NAME)
    }

    /// Makes the manager re-read unit files; returns once the reload is done.
    pub async fn daemon_reload(&self) -> Result<(), SystemdError> {
        // systemd answers Reload only after reloading.
        self.manager
            .reload()
            .await
            .map_err(|source| SystemdError::Reload { source })?;
        debug!("reloaded the systemd user manager");
        Ok(())
    }

    /// Restarts `unit` and waits for its job. The unit's failed state and start rate limit
    /// are reset first, so quick successive deploys are not refused.
    pub async fn restart(&self, unit: &str) -> Result<(), SystemdError> {
        self.job(Job::Restart, unit).await
    }

    /// Starts `unit` (resetting its failed state first) and waits for its job.
    pub async fn start(&self, unit: &str) -> Result<(), SystemdError> {
        self.job(Job::Start, unit).await
    }

    /// Stops `unit` and waits for its job.
    pub async fn stop(&self, unit: &str) -> Result<(), SystemdError> {
        self.job(Job::Stop, unit).await
    }

    async fn job(&self, job: Job, unit: &str) -> Result<(), SystemdError> {
        check_unit_name(unit)?;
        if job != Job::Stop {
            self.reset_failed(unit).await?;
        }
        self.run_job(job.action(), unit, move |manager, unit| async move {
            let mode = "replace".to_owned();
            match job {
                Job::Restart => manager.restart_unit(unit, mode).await,
                Job::Start => manager.start_unit(unit, mode).await,
                Job::Stop => manager.stop_unit(unit, mode).await,
            }
        })
        .await
    }

    async fn reset_failed(&self, unit: &str) -> Result<(), SystemdError> {
        match self.manager.reset_failed_unit(unit.to_owned()).await {
            Ok(()) => Ok(()),
            // Never loaded: nothing failed, nothing is rate limited.
            Err(zbus::Error::MethodError(name, ..)) if name.as_str() == NO_SUCH_UNIT => Ok(()),
            Err(source) => Err(SystemdError::Call {
                action: "reset-failed",
                unit: unit.to_owned(),
                source,
            }),
        }
    }

    /// Issues a job-creating call and waits for that job's JobRemoved signal.
    async fn run_job<F, Fut>(
        &self,
        action: &'static str,
        unit: &str,
        call: F,
    ) -> Result<(), SystemdError>
    where
        F: FnOnce(ManagerProxy<'static>, String) -> Fut,
        Fut: std::future::Future<Output = zbus::Result<zbus::OwnedObjectPath>>,
    {
        let call_error = |source| SystemdError::Call {
            action,
            unit: unit.to_owned(),
            source,
        };
        // Subscribe before the call: a fast job may end before its reply reaches us.
        let mut removed = self
            .manager
            .receive_job_removed()
            .await
            .map_err(call_error)?;
        let started = Instant::now();
        let job = call(self.manager.clone(), unit.to_owned())
            .await
            .map_err(call_error)?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let args = signal.args().map_err(call_error)?;
                if args.job.as_str() != job.as_str() {
                    continue;
                }
                let elapsed_ms = started.elapsed().as_millis() as u64;
                if args.result == "done" {
                    info!(unit = %unit, action, elapsed_ms, "job done");
                    return Ok(());
                }
                info!(unit = %unit, action, result = %args.result, elapsed_ms, "job did not succeed");
                return Err(SystemdError::Job {
                    action,
                    unit: unit.to_owned(),
                    result: args.result.clone(),
                });
            }
            Err(call_error(zbus::Error::InputOutput(Arc::new(
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the bus connection closed before the job ended",
                ),
            ))))
        };
        match tokio::time::timeout(self.job_timeout, wait).await {
            Ok(result) => result,
            Err(_) => {
                info!(unit = %unit, action, limit_ms = self.job_timeout.as_millis() as u64, "job timed out");
                Err(SystemdError::JobTimeout {
                    action,
                    unit: unit.to_owned(),
                    limit: self.job_timeout,
                })
            }
        }
    }

    /// Removes the agent's drop-in of `unit` (and its `.d` directory when
    /// that is left empty); `Ok(false)` when there was none.
    pub async fn remove_dropin(&self, unit: &str) -> Result<bool, SystemdError> {
        check_unit_name(unit)?;
        let path = self.dropin_path(unit);
        let removed = remove_if_present(unit, &path).await?;
        if let Some(dir) = path.parent() {
            // Only succeeds when empty: someone else's drop-ins stay.
            let _ = tokio::fs::remove_dir(dir).await;
        }
        Ok(removed)
    }

    /// Removes a unit file the agent installed; `Ok(false)` when absent.
    pub async fn remove_unit_file(&self, unit: &str) -> Result<bool, SystemdError> {
        check_unit_name(unit)?;
        remove_if_present(unit, &self.unit_dir.join(unit)).await
    }

    async fn unit_proxy(
        &self,
        unit: &str,
    ) -> Result<(UnitProxy<'static>, zbus::OwnedObjectPath), SystemdError> {
        let call_error = |source| SystemdError::Call {
            action: "query",
            unit: unit.to_owned(),
            source,
        };
        // LoadUnit (unlike GetUnit) answers for units that do not exist, with LoadState not-found.
        let path = self
            .manager
            .load_unit(unit.to_owned())
            .await
            .map_err(call_error)?;
        let proxy = UnitProxy::builder(&self.connection)
            .path(path.clone())
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(call_error)?;
        Ok((proxy, path))
    }

    async fn service_proxy(
        &self,
        unit: &str,
        path: zbus::OwnedObjectPath,
    ) -> Result<ServiceProxy<'static>, SystemdError> {
        let call_error = |source| SystemdError::Call {
            action: "query",
            unit: unit.to_owned(),
            source,
        };
        ServiceProxy::builder(&self.connection)
            .path(path)
            .cache_properties(CacheProperties::No)
            .build()
            .await
            .map_err(call_error)
    }

    /// The unit's proxy, and its service proxy when it is a service.
    async fn proxies(
        &self,
        unit: &str,
    ) -> Result<(UnitProxy<'static>, Option<ServiceProxy<'static>>), SystemdError> {
        check_unit_name(unit)?;
        let (proxy, path) = self.unit_proxy(unit).await?;
        let service = match unit.ends_with(".service") {
            true => Some(self.service_proxy(unit, path).await?),
            false => None,
        };
        Ok((proxy, service))
    }

    /// What systemd says about `unit` now. A unit that does not exist has load_state
    /// `not-found`; that is not an error.
    pub async fn unit_state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        let (proxy, service) = self.proxies(unit).await?;
        read_state(unit, &proxy, service.as_ref()).await
    }

    /// Watches a just (re)started unit for `window`: it must stay active, with the same
    /// invocation and no automatic restart. Fails as soon as it does not.
    pub async fn settle(&self, unit: &str, window: Duration) -> Result<(), SystemdError> {
        let (proxy, service) = self.proxies(unit).await?;
        let started = Instant::now();
        let baseline = read_state(unit, &proxy, service.as_ref()).await?;
        let mut ticker = tokio::time::interval(SETTLE_POLL);
        let mut state = baseline.clone();
        loop {
            let elapsed = started.elapsed();
            if settle_failure(unit, &baseline, &state, elapsed).is_some() {
                // Report where the unit went (failed, inactive, auto-restart), not the stop
                // in progress: its processes may take a moment to be gone.
                let deadline = Instant::now() + DEACTIVATING_GRACE;
                while state.active_state == "deactivating" && Instant::now() < deadline {
                    ticker.tick().await;
                    state = read_state(unit, &proxy, service.as_ref()).await?;
                }
            }
            if let Some(detail) = settle_failure(unit, &baseline, &state, elapsed) {
                info!(unit = %unit, %detail, "unit did not settle");
                return Err(SystemdError::DidNotSettle {
                    unit: unit.to_owned(),
                    detail,
                });
            }
            if started.elapsed() >= window {
                debug!(unit = %unit, window_ms = window.as_millis() as u64, "unit settled");
                return Ok(());
            }
            ticker.tick().await;
            state = read_state(unit, &proxy, service.as_ref()).await?;
        }
    }
}

/// The user bus address and unit directory that `env` (the process environment) points at.
fn locate_user_manager(
    env: impl Fn(&str) -> Option<std::ffi::OsString>,
) -> Result<(String, PathBuf), SystemdError> {
    let env = |name: &str| env(name).filter(|value| !value.is_empty());
    let address = match (env("DBUS_SESSION_BUS_ADDRESS"), env("XDG_RUNTIME_DIR")) {
        (Some(address), _) => address.to_string_lossy().into_owned(),
        (None, Some(runtime)) => format!("unix:path={}/bus", Path::new(&runtime).display()),
        (None, None) => return Err(SystemdError::NoBusAddress),
    };
    let config_home = match (env("XDG_CONFIG_HOME"), env("HOME")) {
        (Some(config), _) => PathBuf::from(config),
        (None, Some(home)) => PathBuf::from(home).join(".config"),
        (None, None) => return Err(SystemdError::NoUnitDir),
    };
    Ok((address, config_home.join("systemd/user")))
}

async fn read_state(
    unit: &str,
    proxy: &UnitProxy<'_>,
    service: Option<&ServiceProxy<'_>>,
) -> Result<UnitState, SystemdError> {
    let call_error = |source| SystemdError::Call {
        action: "query",
        unit: unit.to_owned(),
        source,
    };
    let mut state = UnitState {
        load_state: proxy.load_state().await.map_err(call_error)?,
        active_state: proxy.active_state().await.map_err(call_error)?,
        sub_state: proxy.sub_state().await.map_err(call_error)?,
        invocation_id: hex::encode(proxy.invocation_id().await.map_err(call_error)?),
        n_restarts: 0,
        main_pid: 0,
        exec_main_status: 0,
        active_enter_usec: proxy.active_enter_timestamp().await.map_err(call_error)?,
        result: String::new(),
    };
    // A unit that does not exist has no Service interface to ask.
    if let Some(service) = service.filter(|_| state.load_state != "not-found") {
        state.n_restarts = service.n_restarts().await.map_err(call_error)?;
        state.main_pid = service.main_pid().await.map_err(call_error)?;
        state.exec_main_status = service.exec_main_status().await.map_err(call_error)?;
        state.result = service.result().await.map_err(call_error)?;
    }
    Ok(state)
}

/// Why `now` shows that a unit which looked like `baseline` has not stayed up, if it has not.
fn settle_failure(
    unit: &str,
    baseline: &UnitState,
    now: &UnitState,
    elapsed: Duration,
) -> Option<String> {
    let after = elapsed.as_secs_f64();
    if !matches!(now.active_state.as_str(), "active" | "reloading") {
        let why = if now.result.is_empty() {
            now.sub_state.clone()
        } else if now.sub_state == "auto-restart" {
            format!(
                "{}, status {}, systemd will restart it",
                now.result, now.exec_main_status
            )
        } else {
            format!("{}, status {}", now.result, now.exec_main_status)
        };
        return Some(format!(
            "{unit:?} left active state after {after:.1}s: {} ({why})",
            now.active_state
        ));
    }
    if now.invocation_id != baseline.invocation_id || now.n_restarts != baseline.n_restarts {
        return Some(format!(
            "{unit:?} was restarted by systemd after {after:.1}s (restart count {} -> {})",
            baseline.n_restarts, now.n_restarts
        ));
    }
    None
}

fn check_unit_name(unit: &str) -> Result<(), SystemdError> {
    let reason = if unit.is_empty() {
        "it is empty"
    } else if unit.contains('/') {
        "it contains '/'"
    } else if unit.chars().any(char::is_control) {
        "it contains a control character"
    } else if !unit.contains('.') || unit.starts_with('.') {
        "it has no unit type suffix such as \".service\""
    } else {
        return Ok(());
    };
    Err(SystemdError::InvalidUnitName {
        unit: unit.to_owned(),
        reason,
    })
}

/// Writes `content` to `path` through a temporary file and a rename, unless it is already
/// there; `Ok(true)` if it wrote.
async fn remove_if_present(unit: &str, path: &Path) -> Result<bool, SystemdError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => {
            info!(unit = %unit, path = %path.display(), "removed");
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(SystemdError::Write {
            unit: unit.to_owned(),
            path: path.to_owned(),
            source,
        }),
    }
}

async fn write_if_changed(unit: &str, path: &Path, content: &[u8]) -> Result<bool, SystemdError> {
    let write_error = |source| SystemdError::Write {
        unit: unit.to_owned(),
        path: path.to_owned(),
        source,
    };
    match tokio::fs::read(path).await {
        Ok(existing) if existing == content => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(write_error(source)),
    }
    let dir = path
        .parent()
        .expect("unit and drop-in paths are always inside the unit directory");
    tokio::fs::create_dir_all(dir).await.map_err(write_error)?;
    let file_name = path
        .file_name()
        .expect("unit and drop-in paths always end in a file name")
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.moorline-tmp"));
    let write = async {
        let mut file = tokio::fs::File::create(&tmp).await?;
        tokio::io::AsyncWriteExt::write_all(&mut file, content).await?;
        file.sync_all().await?;
        tokio::fs::rename(&tmp, path).await
    };
    if let Err(source) = write.await {
        // Best effort: the temporary file is ours and useless now.
        let _ = tokio::fs::remove_file(&tmp).await;
        return Err(write_error(source));
    }
    Ok(true)
}

/// Escapes a value for a double-quoted word of `Environment=`: C-style backslash escapes
/// for `\` and `"`, and `%%` because systemd expands `%` specifiers there.
fn quote_environment(assignment: &str) -> String {
    quote(assignment, false)
}

/// One word of an `ExecStart=` line, quoted so that systemd passes it as
/// it is (no specifier, no variable expansion, no splitting).
pub fn quote_arg(word: &str) -> String {
    quote(word, true)
}

fn quote(text: &str, exec: bool) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '\\' => quoted.push_str("\\\\"),
            '"' => quoted.push_str("\\\""),
            '%' => quoted.push_str("%%"),
            '$' if exec => quoted.push_str("$$"),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

fn render_dropin(
    unit: &str,
    release: &Path,
    commit: &str,
    env: &[(&str, String)],
) -> Result<String, SystemdError> {
    let invalid = |reason| SystemdError::InvalidRelease {
        unit: unit.to_owned(),
        path: release.to_owned(),
        reason,
    };
    let release_str = release
        .to_str()
        .ok_or_else(|| invalid("it is not valid UTF-8"))?;
    if !release.is_absolute() {
        return Err(invalid("it is not absolute"));
    }
    if release_str.chars().any(char::is_control) {
        return Err(invalid("it contains a control character"));
    }
    if release_str.ends_with(char::is_whitespace) || release_str.ends_with('\\') {
        // systemd strips trailing blanks and treats a trailing backslash as a continuation.
        return Err(invalid("it ends with a blank or a backslash"));
    }
    // WorkingDirectory= takes the rest of the line literally, except for `%` specifiers.
    let working_directory = release_str.replace('%', "%%");
    Ok(format!(
        "# Written by moorline at every rollout; edits are overwritten.\n\
         [Service]\n\
         WorkingDirectory={working_directory}\n\
         Environment={} {}{}\n",
        quote_environment(&format!("MOORLINE_RELEASE={release_str}")),
        quote_environment(&format!("MOORLINE_COMMIT={commit}")),
        env.iter()
            .map(|(k, v)| format!(" {}", quote_environment(&format!("{k}={v}"))))
            .collect::<String>(),
    ))
}

/// Reads back what [`render_dropin`] wrote: (release, commit).
fn parse_dropin(content: &str) -> Result<(PathBuf, String), String> {
    let line = content
        .lines()
        .find_map(|line| line.strip_prefix("Environment="))
        .ok_or_else(|| "it has no Environment= line".to_owned())?;
    let mut release = None;
    let mut commit = None;
    for word in unquote_words(line)? {
        if let Some(value) = word.strip_prefix("MOORLINE_RELEASE=") {
            release = Some(PathBuf::from(value));
        } else if let Some(value) = word.strip_prefix("MOORLINE_COMMIT=") {
            commit = Some(value.to_owned());
        }
    }
    match (release, commit) {
        (Some(release), Some(commit)) => Ok((release, commit)),
        _ => Err("it does not set both MOORLINE_RELEASE and MOORLINE_COMMIT".to_owned()),
    }
}

/// Splits an `Environment=` value written by [`quote_environment`] into its words.
fn unquote_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.next() {
            None => return Ok(words),
            Some('"') => {}
            Some(c) => return Err(format!("unexpected {c:?} outside quotes")),
        }
        let mut word = String::new();
        loop {
            match chars.next() {
                None => return Err("unterminated quote".to_owned()),
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some(c @ ('\\' | '"')) => word.push(c),
                    _ => return Err("unknown escape".to_owned()),
                },
                Some('%') => match chars.next() {
                    Some('%') => word.push('%'),
                    _ => return Err("unknown specifier".to_owned()),
                },
                Some(c) => word.push(c),
            }
        }
        words.push(word);
    }
}

#[cfg(test)]
#[path = "../../tests/support/user_manager.rs"]
mod user_manager;

#[cfg(test)]
mod tests {
    use super::user_manager::UserManager;
    use super::*;

    /// A connection to `manager` with `unit` installed: a service that sleeps forever.
    async fn sleeper(manager: &UserManager, unit: &str) -> Systemd {
        connect_with_units(
            manager,
            &[(unit, "[Service]\nExecStart=/bin/sleep infinity\n")],
        )
        .await
    }

    /// A connection to `manager` with `units` (name, unit file text) installed and loaded.
    async fn active_state(systemd: &Systemd, unit: &str) -> String {
        systemd
            .unit_state(unit)
            .await
            .expect("queries")
            .active_state
    }

    /// A user manager of its own with one unit installed, and a connection.
    async fn with_unit(unit: &str, text: &str) -> (UserManager, Systemd) {
        let manager = UserManager::start();
        let systemd = connect_with_units(&manager, &[(unit, text)]).await;
        (manager, systemd)
    }

    async fn connect_with_units(manager: &UserManager, units: &[(&str, &str)]) -> Systemd {
        let systemd = Systemd::connect_to(&manager.bus_address(), manager.unit_dir())
            .await
            .expect("the test manager is running");
        let sources = tempfile::tempdir().expect("the temporary directory is writable");
        for (unit, text) in units {
            let src = sources.path().join(unit);
            std::fs::write(&src, text).expect("the temporary directory is writable");
            assert!(
                systemd
                    .install_unit_file(&src, unit)
                    .await
                    .expect("installs")
            );
        }
        systemd.daemon_reload().await.expect("reloads");
        systemd
    }

    #[tokio::test]
    async fn dropin_points_the_unit_at_its_release_and_commit() {
        let manager = UserManager::start();
        let unit = "moorline-test-dropin.service";
        let unit_text =
            "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'pwd >pwd.out; env >env.out'\n";
        let systemd = connect_with_units(&manager, &[(unit, unit_text)]).await;
        let releases = tempfile::tempdir().expect("the temporary directory is writable");
        // Blanks, quotes, backslashes and `%` must all reach the service unchanged.
        let release = releases.path().join(r#"rel 1 %n "q" \x"#);
        std::fs::create_dir(&release).expect("the temporary directory is writable");
        let commit = "0123456789abcdef0123456789abcdef01234567";
        // Whether writing the drop-in for `commit` changed it; what it says.
        let written = |systemd: &Systemd, commit: &'static str| {
            let (systemd, release) = (systemd.clone(), release.clone());
            async move {
                systemd
                    .write_dropin(unit, &release, commit, &[])
                    .await
                    .expect("writes")
            }
        };
        let dropin = |systemd: &Systemd| {
            let systemd = systemd.clone();
            async move { systemd.read_dropin(unit).await.expect("reads") }
        };

        let src = manager.unit_dir().join(unit);
        assert!(
            !systemd
                .install_unit_file(&src, unit)
                .await
                .expect("unchanged file installs")
        );
        assert_eq!(dropin(&systemd).await, None);
        assert!(written(&systemd, commit).await);
        assert!(!written(&systemd, commit).await);
        assert_eq!(
            dropin(&systemd).await,
            Some((release.clone(), commit.to_owned()))
        );
        systemd.daemon_reload().await.expect("reloads");
        systemd.restart(unit).await.expect("the oneshot runs");

        let pwd = std::fs::read_to_string(release.join("pwd.out")).expect("the unit wrote pwd.out");
        assert_eq!(pwd.trim_end_matches('\n'), release.to_str().expect("utf-8"));
        let env = std::fs::read_to_string(release.join("env.out")).expect("the unit wrote env.out");
        let env: Vec<&str> = env.lines().collect();
        let release_line = format!("MOORLINE_RELEASE={}", release.display());
        assert!(env.contains(&release_line.as_str()), "{env:?}");
        assert!(
            env.contains(&format!("MOORLINE_COMMIT={commit}").as_str()),
            "{env:?}"
        );

        // The next rollout rewrites the drop-in in place.
        let next = "89abcdef0123456789abcdef0123456789abcdef";
        assert!(written(&systemd, next).await);
        assert_eq!(
            dropin(&systemd).await,
            Some((release.clone(), next.to_owned()))
        );

        let missing = releases.path().join("missing.service");
        let error = systemd
            .install_unit_file(&missing, unit)
            .await
            .expect_err("there is no such file");
        assert_eq!(
            error.to_string(),
            format!(
                "cannot read unit file {missing:?} for \"moorline-test-dropin.service\": \
                 No such file or directory (os error 2)"
            )
        );
    }

    #[tokio::test]
    async fn a_job_that_hangs_is_given_up_after_the_limit_naming_the_unit() {
        let unit = "moorline-test-hangs-on-stop.service";
        let text = "[Service]\nExecStart=/bin/sleep infinity\nExecStop=/bin/sleep infinity\nTimeoutStopSec=infinity\n";
        let (manager, systemd) = with_unit(unit, text).await;
        systemd.start(unit).await.expect("starts");
        let bounded = systemd.with_job_timeout(Duration::from_millis(1500));
        let started = Instant::now();
        let error = bounded.stop(unit).await.expect_err("ExecStop never ends");
        assert_eq!(
            error.to_string(),
            "stop of \"moorline-test-hangs-on-stop.service\" did not finish within 1s 500ms"
        );
        // Given up at the limit, not at systemd's (infinite) stop timeout.
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(active_state(&systemd, unit).await, "deactivating");
        // Unbounded handles are not touched by the bounded one.
        assert_eq!(systemd.job_timeout, DEFAULT_JOB_TIMEOUT);
        manager.systemctl(&["kill", "--signal=KILL", unit]);
    }

    #[tokio::test]
    async fn removing_a_dropin_and_unit_file_leaves_nothing_of_moorline() {
        let manager = UserManager::start();
        let unit = "moorline-test-retired.service";
        let systemd = sleeper(&manager, unit).await;
        systemd
            .write_dropin(unit, Path::new("/srv/release"), &"a".repeat(40), &[])
            .await
            .expect("writes");
        assert!(systemd.remove_dropin(unit).await.expect("removes"));
        assert!(!manager.unit_dir().join(format!("{unit}.d")).exists());
        assert!(systemd.remove_unit_file(unit).await.expect("removes"));
        assert!(!manager.unit_dir().join(unit).exists());
        assert!(!systemd.remove_dropin(unit).await.expect("absent is fine"));
        assert!(
            !systemd
                .remove_unit_file(unit)
                .await
                .expect("absent is fine")
        );
    }

    #[tokio::test]
    async fn dropin_is_only_for_services() {
        let manager = UserManager::start();
        let systemd = connect_with_units(&manager, &[]).await;
        let wrote = systemd
            .write_dropin("moorline-test.timer", Path::new("/srv/release"), "abc", &[])
            .await
            .expect("nothing to write");
        assert!(!wrote);
        assert!(!manager.unit_dir().join("moorline-test.timer.d").exists());
    }

    #[tokio::test]
    async fn restart_makes_a_new_invocation_and_stop_deactivates() {
        let manager = UserManager::start();
        let unit = "moorline-test-sleeper.service";
        let systemd = sleeper(&manager, unit).await;

        systemd.restart(unit).await.expect("restarts");
        let first = systemd.unit_state(unit).await.expect("queries");
        assert_eq!(
            (first.load_state.as_str(), first.active_state.as_str()),
            ("loaded", "active")
        );
        assert_eq!(first.invocation_id.len(), 32, "{first:?}");
        assert_ne!(first.main_pid, 0);
        assert_ne!(first.active_enter_usec, 0);

        systemd.restart(unit).await.expect("restarts");
        let second = systemd.unit_state(unit).await.expect("queries");
        assert_eq!(second.active_state, "active");
        assert_ne!(second.invocation_id, first.invocation_id);
        assert_ne!(second.main_pid, first.main_pid);

        systemd.stop(unit).await.expect("stops");
        let stopped = systemd.unit_state(unit).await.expect("queries");
        assert_eq!(stopped.active_state, "inactive");
        assert_eq!(stopped.main_pid, 0);
        let shown = manager.systemctl(&["is-active", unit]);
        assert_eq!(String::from_utf8_lossy(&shown.stdout).trim(), "inactive");

        systemd.start(unit).await.expect("starts");
        assert_eq!(active_state(&systemd, unit).await, "active");
    }

    #[tokio::test]
    async fn restart_of_a_notify_service_waits_until_it_is_ready() {
        let manager = UserManager::start();
        let unit = "moorline-test-notify.service";
        // Ready only after 1 s; the job (and so `restart`) must last that long.
        let unit_text = "[Service]\nType=notify\nExecStart=/usr/bin/python3 -c \"\
            import os, socket, time; time.sleep(1); \
            a = os.environ['NOTIFY_SOCKET']; \
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); \
            s.connect(chr(0) + a[1:] if a[0] == '@' else a); \
            s.send(b'READY=1'); time.sleep(1000)\"\n";
        let systemd = connect_with_units(&manager, &[(unit, unit_text)]).await;
        let started = Instant::now();
        systemd
            .restart(unit)
            .await
            .expect("the service becomes ready");
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let state = systemd.unit_state(unit).await.expect("queries");
        assert_eq!(
            (state.active_state.as_str(), state.sub_state.as_str()),
            ("active", "running")
        );
    }

    #[tokio::test]
    async fn a_failing_unit_names_the_unit_and_the_job_result() {
        let unit = "moorline-test-fails.service";
        let text = "[Service]\nType=oneshot\nExecStart=/bin/false\n";
        let (_manager, systemd) = with_unit(unit, text).await;
        let error = systemd.restart(unit).await.expect_err("/bin/false fails");
        assert_eq!(
            error.to_string(),
            r#"restart of "moorline-test-fails.service" failed: job result "failed""#
        );
        assert!(!error.is_transient());
        let state = systemd.unit_state(unit).await.expect("queries");
        assert_eq!(
            (
                state.active_state.as_str(),
                state.result.as_str(),
                state.exec_main_status
            ),
            ("failed", "exit-code", 1)
        );
        // The failed state does not stop the next attempt.
        let error = systemd.start(unit).await.expect_err("/bin/false fails");
        assert_eq!(
            error.to_string(),
            r#"start of "moorline-test-fails.service" failed: job result "failed""#
        );
    }

    #[tokio::test]
    async fn settle_catches_a_service_that_exits_after_starting() {
        let manager = UserManager::start();
        let late = "moorline-test-late-exit.service";
        let early = "moorline-test-early-exit.service";
        let flapping = "moorline-test-flapping.service";
        let steady = "moorline-test-steady.service";
        let systemd = connect_with_units(
            &manager,
            &[
                (
                    late,
                    "[Service]\nExecStart=/bin/sh -c 'sleep 1.5; exit 1'\n",
                ),
                (early, "[Service]\nExecStart=/bin/true\n"),
                (
                    flapping,
                    "[Service]\nExecStart=/bin/sleep 0.3\nRestart=always\nRestartSec=10ms\n",
                ),
                (steady, "[Service]\nExecStart=/bin/sleep infinity\n"),
            ],
        )
        .await;

        // Restart `unit`, then watch it through a settle window of `window`.
        let restart_and_settle = |unit: &'static str, window: Duration| {
            let systemd = &systemd;
            async move {
                systemd
                    .restart(unit)
                    .await
                    .expect("a simple service starts");
                systemd.settle(unit, window).await
            }
        };
        let unsettled = |unit: &'static str, why: &'static str| async move {
            restart_and_settle(unit, Duration::from_secs(10))
                .await
                .expect_err(why)
        };
        let started = Instant::now();
        let error = unsettled(late, "the service exits after 1.5 s").await;
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            started.elapsed()
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let text = error.to_string();
        let after = text
            .strip_prefix(r#""moorline-test-late-exit.service" left active state after "#)
            .and_then(|rest| rest.strip_suffix("s: failed (exit-code, status 1)"))
            .unwrap_or_else(|| panic!("unexpected error text {text:?}"));
        let after: f64 = after.parse().expect("a number of seconds");
        assert!((1.3..5.0).contains(&after), "{text}");
        assert!(!error.is_transient());

        // The start job is done as soon as the process runs, however
        // short-lived. The unit is seen gone, or (when the first reading
        // caught it between the job and its exit, on a busy machine) with
        // another invocation than at the start.
        let error = unsettled(early, "the service exits at once").await;
        let text = error.to_string();
        let gone = text
            .starts_with(r#""moorline-test-early-exit.service" left active state after "#)
            && text.ends_with("s: inactive (success, status 0)");
        let replaced = text
            .starts_with(r#""moorline-test-early-exit.service" was restarted by systemd after "#);
        assert!(gone || replaced, "{text}");

        let error = unsettled(flapping, "systemd restarts the service every 0.3 s").await;
        assert!(matches!(error, SystemdError::DidNotSettle { ref unit, .. } if unit == flapping));

        restart_and_settle(steady, Duration::from_secs(2))
            .await
            .expect("the service stays up");
    }

    #[tokio::test]
    async fn restarting_ten_times_in_a_row_is_not_rate_limited() {
        let manager = UserManager::start();
        let unit = "moorline-test-busy.service";
        let systemd = sleeper(&manager, unit).await;
        let mut invocations = Vec::new();
        for attempt in 0..10 {
            systemd
                .restart(unit)
                .await
                .unwrap_or_else(|e| panic!("restart {attempt} failed: {e}"));
            let state = systemd.unit_state(unit).await.expect("queries");
            assert_eq!(state.active_state, "active", "after restart {attempt}");
            invocations.push(state.invocation_id);
        }
        invocations.dedup();
        assert_eq!(invocations.len(), 10);
    }

    #[tokio::test]
    async fn a_missing_unit_is_not_found_rather_than_an_error() {
        let manager = UserManager::start();
        let systemd = connect_with_units(&manager, &[]).await;
        let state = systemd
            .unit_state("moorline-test-missing.service")
            .await
            .expect("queries");
        assert_eq!(
            (
                state.load_state.as_str(),
                state.active_state.as_str(),
                state.invocation_id.as_str()
            ),
            ("not-found", "inactive", "")
        );
        let error = systemd
            .restart("moorline-test-missing.service")
            .await
            .expect_err("there is no such unit");
        assert_eq!(
            error.to_string(),
            "restart of \"moorline-test-missing.service\" failed: \
             org.freedesktop.systemd1.NoSuchUnit: Unit moorline-test-missing.service not found."
        );
        assert!(!error.is_transient());
    }

    #[tokio::test]
    async fn an_unreachable_bus_is_a_transient_error() {
        let dir = tempfile::tempdir().expect("the temporary directory is writable");
        let address = format!("unix:path={}/bus", dir.path().display());
        let error = Systemd::connect_to(&address, dir.path().to_owned())
            .await
            .err()
            .expect("nothing listens there");
        let text = error.to_string();
        let prefix = format!("cannot reach the systemd user manager at {address:?}: ");
        assert!(text.starts_with(&prefix), "{text}");
        assert!(error.is_transient());
    }

    #[test]
    fn dropin_text_quotes_for_systemd_and_reads_back() {
        let release = Path::new(r#"/srv/rel 1/%i "x" \y"#);
        let text = render_dropin("a.service", release, "c0ffee", &[]).expect("renders");
        assert_eq!(
            text,
            "# Written by moorline at every rollout; edits are overwritten.\n\
             [Service]\n\
             WorkingDirectory=/srv/rel 1/%%i \"x\" \\y\n\
             Environment=\"MOORLINE_RELEASE=/srv/rel 1/%%i \\\"x\\\" \\\\y\" \"MOORLINE_COMMIT=c0ffee\"\n"
        );
        assert_eq!(
            parse_dropin(&text),
            Ok((release.to_owned(), "c0ffee".to_owned()))
        );
    }

    #[test]
    fn releases_systemd_cannot_express_are_refused() {
        let cases = [
            ("rel", "it is not absolute"),
            ("/srv/a\nb", "it contains a control character"),
            ("/srv/a ", "it ends with a blank or a backslash"),
        ];
        for (path, reason) in cases {
            let error = render_dropin("a.service", Path::new(path), "c", &[]).expect_err(path);
            assert_eq!(
                error.to_string(),
                format!(
                    "release directory {path:?} of \"a.service\" cannot be given to systemd: {reason}"
                )
            );
        }
    }

    #[test]
    fn foreign_dropins_are_reported() {
        assert_eq!(
            parse_dropin("[Service]\nWorkingDirectory=/x\n"),
            Err("it has no Environment= line".to_owned())
        );
        assert_eq!(
            parse_dropin("[Service]\nEnvironment=\"A=b\"\n"),
            Err("it does not set both MOORLINE_RELEASE and MOORLINE_COMMIT".to_owned())
        );
        assert_eq!(
            parse_dropin("Environment=A=b\n"),
            Err("unexpected 'A' outside quotes".to_owned())
        );
    }

    #[test]
    fn settle_failures_say_where_the_unit_went() {
        let up = UnitState {
            load_state: "loaded".to_owned(),
            active_state: "active".to_owned(),
            sub_state: "running".to_owned(),
            invocation_id: "aa".to_owned(),
            n_restarts: 0,
            main_pid: 42,
            exec_main_status: 0,
            active_enter_usec: 1,
            result: "success".to_owned(),
        };
        let with = |f: &dyn Fn(&mut UnitState)| {
            let mut state = up.clone();
            f(&mut state);
            state
        };
        let cases = [
            (up.clone(), None),
            (with(&|s| s.active_state = "reloading".to_owned()), None),
            (
                with(&|s| {
                    s.active_state = "failed".to_owned();
                    s.sub_state = "failed".to_owned();
                    s.result = "exit-code".to_owned();
                    s.exec_main_status = 1;
                }),
                Some(r#""a.service" left active state after 1.9s: failed (exit-code, status 1)"#),
            ),
            (
                with(&|s| {
                    s.active_state = "activating".to_owned();
                    s.sub_state = "auto-restart".to_owned();
                    s.result = "signal".to_owned();
                    s.exec_main_status = 9;
                }),
                Some(
                    r#""a.service" left active state after 1.9s: activating (signal, status 9, systemd will restart it)"#,
                ),
            ),
            (
                with(&|s| {
                    s.active_state = "inactive".to_owned();
                    s.sub_state = "dead".to_owned();
                    s.result = String::new();
                }),
                Some(r#""a.service" left active state after 1.9s: inactive (dead)"#),
            ),
            (
                with(&|s| {
                    s.invocation_id = "bb".to_owned();
                    s.n_restarts = 1;
                }),
                Some(r#""a.service" was restarted by systemd after 1.9s (restart count 0 -> 1)"#),
            ),
        ];
        for (now, expected) in cases {
            assert_eq!(
                settle_failure("a.service", &up, &now, Duration::from_millis(1930)).as_deref(),
                expected,
                "{now:?}"
            );
        }
    }

    #[test]
    fn the_user_manager_is_found_from_the_environment() {
        type Vars = &'static [(&'static str, &'static str)];
        type Found = Result<(&'static str, &'static str), &'static str>;
        let cases: &[(Vars, Found)] = &[
            (
                &[
                    ("DBUS_SESSION_BUS_ADDRESS", "unix:path=/b"),
                    ("XDG_RUNTIME_DIR", "/run/user/7"),
                    ("XDG_CONFIG_HOME", "/c"),
                    ("HOME", "/h"),
                ],
                Ok(("unix:path=/b", "/c/systemd/user")),
            ),
            (
                &[("XDG_RUNTIME_DIR", "/run/user/7"), ("HOME", "/h")],
                Ok(("unix:path=/run/user/7/bus", "/h/.config/systemd/user")),
            ),
            (
                &[("DBUS_SESSION_BUS_ADDRESS", ""), ("HOME", "/h")],
                Err(
                    "cannot find the user bus: neither DBUS_SESSION_BUS_ADDRESS nor XDG_RUNTIME_DIR is set",
                ),
            ),
            (
                &[("XDG_RUNTIME_DIR", "/r")],
                Err("cannot find the user unit directory: neither XDG_CONFIG_HOME nor HOME is set"),
            ),
        ];
        for (vars, expected) in cases {
            let found = locate_user_manager(|name| {
                vars.iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| value.into())
            });
            let found = found
                .as_ref()
                .map(|(address, dir)| (address.as_str(), dir.to_str().expect("utf-8")))
                .map_err(|e| e.to_string());
            assert_eq!(found, expected.map_err(str::to_owned), "{vars:?}");
        }
    }

    #[test]
    fn unit_names_are_checked() {
        for (unit, reason) in [
            ("", "it is empty"),
            ("../x.service", "it contains '/'"),
            ("app", "it has no unit type suffix such as \".service\""),
        ] {
            assert_eq!(
                check_unit_name(unit).expect_err(unit).to_string(),
                format!("invalid unit name {unit:?}: {reason}")
            );
        }
        assert!(check_unit_name("app-api.service").is_ok());
    }
}
