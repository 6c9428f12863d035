//! The Docker runtime: builds images, creates/starts/stops/renames containers
//! and watches them settle, through the Engine API (bollard) and never the
//! `docker` CLI.

mod context;
/// A scope's containers: replace (kept for rollback), verify, stop, restore.
pub mod scope;
mod spec;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::errors::Error as ApiError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, HealthStatusEnum, HostConfig, PortBinding,
    RestartPolicy,
};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, RemoveContainerOptions, RemoveImageOptions,
    RenameContainerOptions, StopContainerOptions,
};
use futures_util::StreamExt;
use tokio::sync::{OnceCell, mpsc};
use tracing::{debug, info, warn};

use crate::manifest::ContainerSpec;

/// The labels moorline puts on every image and container it makes.
pub const LABEL_SOURCE: &str = "moorline.source";
pub const LABEL_SCOPE: &str = "moorline.scope";
pub const LABEL_COMMIT: &str = "moorline.commit";
pub const LABEL_RELEASE: &str = "moorline.release";

/// How often `settle` looks at a container.
const SETTLE_POLL: Duration = Duration::from_millis(100);
/// The engine's default request timeout is kept for everything but `stop`,
/// which may legitimately wait for its own timeout first.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Who a container or image belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels {
    pub source: String,
    pub scope: String,
    pub commit: String,
}

impl Labels {
    fn to_map(&self) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_SOURCE.to_string(), self.source.clone()),
            (LABEL_SCOPE.to_string(), self.scope.clone()),
            (LABEL_COMMIT.to_string(), self.commit.clone()),
        ])
    }
}

/// What the engine says about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    pub id: String,
    /// Without the engine's leading `/`.
    pub name: String,
    /// The image id (`sha256:...`).
    pub image: String,
    /// The reference the container was created from (`app-api:abc123`).
    pub image_ref: String,
    pub running: bool,
    /// `created`, `running`, `restarting`, `exited`, ...
    pub status: String,
    pub exit_code: i64,
    pub started_at: String,
    pub restart_count: i64,
    /// `starting`, `healthy` or `unhealthy`; `None` without a HEALTHCHECK.
    pub health: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// Everything that can go wrong talking to the engine. Each variant names
/// the host, image, context or container involved.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("invalid docker host {host:?}: expected \"unix:///PATH\" or \"tcp://HOST:PORT\"")]
    InvalidHost { host: String },
    #[error("cannot reach the docker engine at {host:?}: {detail}")]
    Unreachable { host: String, detail: String },
    #[error("cannot send the build context {context:?} of image {image:?}: {detail}")]
    Context {
        context: PathBuf,
        image: String,
        detail: String,
    },
    #[error("build of image {image:?} failed: {message}")]
    Build { image: String, message: String },
    #[error("cannot {action} image {image:?}: {detail}")]
    Image {
        action: &'static str,
        image: String,
        detail: String,
        transient: bool,
    },
    #[error("container {container:?} already exists")]
    AlreadyExists { container: String },
    #[error("invalid {what} {value:?} of container {container:?}: {detail}")]
    InvalidSpec {
        container: String,
        what: &'static str,
        value: String,
        detail: String,
    },
    #[error("cannot read env_file {path:?} of container {container:?}: {detail}")]
    EnvFile {
        container: String,
        path: PathBuf,
        detail: String,
    },
    #[error("cannot {action} container {container:?}: {detail}")]
    Container {
        action: &'static str,
        container: String,
        detail: String,
        transient: bool,
    },
    #[error("container {container:?} did not settle: {detail}")]
    DidNotSettle { container: String, detail: String },
}

impl DockerError {
    /// Whether trying again later may succeed without anything changing in
    /// the manifest (the engine was down, busy or slow).
    pub fn is_transient(&self) -> bool {
        match self {
            DockerError::Unreachable { .. } => true,
            DockerError::Image { transient, .. } | DockerError::Container { transient, .. } => {
                *transient
            }
            _ => false,
        }
    }
}

/// A handle on one Docker engine. Cheap to clone; the connection is made
/// (and the API version negotiated) on first use, and retried after a failure.
#[derive(Debug, Clone)]
pub struct Docker {
    host: Arc<str>,
    client: Arc<OnceCell<bollard::Docker>>,
}

impl Docker {
    /// Checks `host` ("unix:///var/run/docker.sock", "tcp://127.0.0.1:2375");
    /// does no I/O.
    pub fn connect(host: &str) -> Result<Docker, DockerError> {
        let valid = match host.split_once("://") {
            Some(("unix", path)) => path.starts_with('/'),
            Some(("tcp" | "http", addr)) => !addr.is_empty(),
            _ => false,
        };
        if !valid {
            return Err(DockerError::InvalidHost {
                host: host.to_string(),
            });
        }
        Ok(Docker {
            host: host.into(),
            client: Arc::new(OnceCell::new()),
        })
    }

    /// The connected client, negotiating the API version down to the
    /// engine's on first use.
    async fn client(&self) -> Result<&bollard::Docker, DockerError> {
        self.client
            .get_or_try_init(|| async {
                let client = bollard::Docker::connect_with_host(&self.host)
                    .map_err(|e| self.unreachable(&e))?
                    .with_timeout(REQUEST_TIMEOUT);
                let client = client
                    .negotiate_version()
                    .await
                    .map_err(|e| self.unreachable(&e))?;
                let version = client.client_version();
                debug!(host = %self.host, api = %version, "connected to the docker engine");
                Ok(client)
            })
            .await
    }

    fn unreachable(&self, e: &ApiError) -> DockerError {
        DockerError::Unreachable {
            host: self.host.to_string(),
            detail: describe(e),
        }
    }

    /// Maps an API error about a container, telling an engine that cannot be
    /// reached apart from one that said no.
    fn container_error(&self, action: &'static str, container: &str, e: ApiError) -> DockerError {
        if is_connection_error(&e) {
            return self.unreachable(&e);
        }
        DockerError::Container {
            action,
            container: container.to_string(),
            transient: is_transient_status(&e),
            detail: describe(&e),
        }
    }

    fn image_error(&self, action: &'static str, image: &str, e: ApiError) -> DockerError {
        if is_connection_error(&e) {
            return self.unreachable(&e);
        }
        DockerError::Image {
            action,
            image: image.to_string(),
            transient: is_transient_status(&e),
            detail: describe(&e),
        }
    }

    /// Builds `tag` from `context_dir` with `dockerfile` (relative to the
    /// context, or absolute inside it), honouring the context's
    /// `.dockerignore`. Every line the builder prints goes to `on_line`.
    /// Returns the image id.
    pub async fn build_image(
        &self,
        context_dir: &Path,
        dockerfile: &str,
        tag: &str,
        labels: &Labels,
        on_line: &mut (dyn FnMut(&str) + Send),
    ) -> Result<String, DockerError> {
        let context_error = |detail: String| DockerError::Context {
            context: context_dir.to_path_buf(),
            image: tag.to_string(),
            detail,
        };
        let dockerfile_rel =
            dockerfile_in_context(context_dir, dockerfile).map_err(context_error)?;
        if !context_dir.join(&dockerfile_rel).is_file() {
            return Err(context_error(format!(
                "dockerfile {dockerfile:?} does not exist"
            )));
        }
        let client = self.client().await?;

        // The archive is written by a blocking task and streamed as it is made,
        // so a large context never sits in memory.
        let (tx, rx) = mpsc::channel::<Result<Vec<u8>, io::Error>>(8);
        let writer_context = context_dir.to_path_buf();
        let writer_dockerfile = dockerfile_rel.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let sink = ChannelWriter {
                tx: tx.clone(),
                buf: Vec::with_capacity(CHUNK),
            };
            let result = context::write_context(&writer_context, &writer_dockerfile, sink);
            if let Err(e) = &result {
                // Fail the upload too, so the engine does not build a truncated context.
                let _closed = tx.blocking_send(Err(io::Error::other(e.to_string())));
            }
            result
        });
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk.map(Into::into), rx))
        });

        let options = BuildImageOptions {
            dockerfile: dockerfile_rel.clone(),
            t: Some(tag.to_string()),
            labels: Some(labels.to_map()),
            rm: true,
            forcerm: true,
            ..Default::default()
        };
        info!(image = %tag, context = %context_dir.display(), dockerfile = %dockerfile_rel, "building image");
        let mut stream = client.build_image(options, None, Some(bollard::body_try_stream(body)));
        let mut image_id = None;
        let mut failure = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    for line in [info.stream.as_deref(), info.status.as_deref()]
                        .into_iter()
                        .flatten()
                        .flat_map(str::lines)
                        .filter(|line| !line.trim().is_empty())
                    {
                        on_line(line);
                    }
                    if let Some(id) = info.aux.and_then(|aux| aux.id) {
                        image_id = Some(id);
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        drop(stream);
        // A context the walker could not read explains any upload failure best.
        match writer.await {
            Ok(Ok(entries)) => debug!(image = %tag, entries, "sent the build context"),
            // The engine gave up before reading it all: its own error says why.
            Ok(Err(e)) if failure.is_some() && e.is_abandoned() => {}
            Ok(Err(e)) => return Err(context_error(e.to_string())),
            Err(e) => return Err(context_error(format!("the archive writer stopped: {e}"))),
        }
        if let Some(e) = failure {
            if is_connection_error(&e) {
                return Err(self.unreachable(&e));
            }
            let message = describe(&e);
            on_line(&message);
            warn!(image = %tag, error = %message, "image build failed");
            return Err(DockerError::Build {
                image: tag.to_string(),
                message,
            });
        }
        let id = match image_id {
            Some(id) => id,
            None => self
                .image_id(tag)
                .await?
                .ok_or_else(|| DockerError::Build {
                    image: tag.to_string(),
                    message: "the builder finished without producing the image".to_string(),
                })?,
        };
        info!(image = %tag, id = %id, "built image");
        Ok(id)
    }

    /// The id of a local image, or `None` if it is not there.
    pub async fn image_id(&self, reference: &str) -> Result<Option<String>, DockerError> {
        let client = self.client().await?;
        match client.inspect_image(reference).await {
            Ok(image) => Ok(image.id),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.image_error("inspect", reference, e)),
        }
    }

    /// Removes a local image (not forced: an image a container uses stays).
    /// An absent image is fine.
    pub async fn remove_image(&self, reference: &str) -> Result<(), DockerError> {
        let client = self.client().await?;
        match client
            .remove_image(reference, None::<RemoveImageOptions>, None)
            .await
        {
            Ok(_) => {
                info!(image = %reference, "removed image");
                Ok(())
            }
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.image_error("remove", reference, e)),
        }
    }

    /// Creates (does not start) the container `spec.name` from `image`.
    /// Environment: the env_file (read now), then `spec.env`, then
    /// `extra_env`, later ones winning. Fails if the name is taken.
    pub async fn create(
        &self,
        spec: &ContainerSpec,
        image: &str,
        labels: &Labels,
        extra_env: &[(String, String)],
        release: &Path,
    ) -> Result<String, DockerError> {
        let name = spec.name.as_str();
        let invalid = |what: &'static str, value: &str, detail: String| DockerError::InvalidSpec {
            container: name.to_string(),
            what,
            value: value.to_string(),
            detail,
        };

        let mut exposed = Vec::new();
        let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
        for text in &spec.ports {
            let port = spec::parse_port(text).map_err(|detail| invalid("port", text, detail))?;
            if !exposed.contains(&port.container) {
                exposed.push(port.container.clone());
            }
            bindings
                .entry(port.container)
                .or_insert_with(|| Some(Vec::new()))
                .get_or_insert_with(Vec::new)
                .push(PortBinding {
                    host_ip: port.host_ip,
                    host_port: port.host_port,
                });
        }
        for volume in &spec.volumes {
            spec::check_volume(volume).map_err(|detail| invalid("volume", volume, detail))?;
        }
        let restart = spec::restart_policy(&spec.restart).ok_or_else(|| {
            invalid(
                "restart policy",
                &spec.restart,
                "expected \"no\", \"always\", \"unless-stopped\" or \"on-failure\"".to_string(),
            )
        })?;

        let mut env = BTreeMap::new();
        if let Some(path) = &spec.env_file {
            let env_file_error = |detail: String| DockerError::EnvFile {
                container: name.to_string(),
                path: PathBuf::from(path),
                detail,
            };
            let text = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| env_file_error(e.to_string()))?;
            env = spec::parse_env_file(&text).map_err(env_file_error)?;
        }
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(extra_env.iter().cloned());

        let mut label_map = labels.to_map();
        label_map.insert(LABEL_RELEASE.to_string(), release.display().to_string());

        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: spec.command.clone(),
            env: Some(env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(label_map),
            exposed_ports: (!exposed.is_empty()).then_some(exposed),
            host_config: Some(HostConfig {
                port_bindings: (!bindings.is_empty()).then_some(bindings),
                binds: (!spec.volumes.is_empty()).then(|| spec.volumes.clone()),
                restart_policy: Some(RestartPolicy {
                    name: Some(restart),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };

        // The engine refuses a taken name (409); asking first by inspecting
        // would also match a container whose id merely starts with the name.
        let client = self.client().await?;
        let options = CreateContainerOptions {
            name: Some(name.to_string()),
            ..Default::default()
        };
        let created = match client.create_container(Some(options), body).await {
            Ok(created) => created,
            Err(e) if status_of(&e) == Some(409) => {
                return Err(DockerError::AlreadyExists {
                    container: name.to_string(),
                });
            }
            Err(e) => return Err(self.container_error("create", name, e)),
        };
        let env_keys: Vec<&str> = env.keys().map(String::as_str).collect();
        info!(container = %name, id = %created.id, image = %image, ?env_keys, "created container");
        for warning in created.warnings {
            warn!(container = %name, warning = %warning, "the engine warned while creating the container");
        }
        Ok(created.id)
    }

    pub async fn start(&self, name_or_id: &str) -> Result<(), DockerError> {
        let client = self.client().await?;
        client
            .start_container(name_or_id, None)
            .await
            .map_err(|e| self.container_error("start", name_or_id, e))?;
        info!(container = %name_or_id, "started container");
        Ok(())
    }

    /// Stops a container, killing it after `timeout`. A container that is not
    /// running, or does not exist, is fine.
    pub async fn stop(&self, name_or_id: &str, timeout: Duration) -> Result<(), DockerError> {
        let client = self.client().await?;
        // The request itself lasts up to `timeout`: give it room on top.
        let client = client.clone().with_timeout(REQUEST_TIMEOUT + timeout);
        let options = StopContainerOptions {
            t: Some(i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX)),
            signal: None,
        };
        match client.stop_container(name_or_id, Some(options)).await {
            Ok(()) => {
                info!(container = %name_or_id, "stopped container");
                Ok(())
            }
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.container_error("stop", name_or_id, e)),
        }
    }

    /// Removes a container, running or not. An absent container is fine.
    pub async fn remove(&self, name_or_id: &str) -> Result<(), DockerError> {
        let client = self.client().await?;
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match client.remove_container(name_or_id, Some(options)).await {
            Ok(()) => {
                info!(container = %name_or_id, "removed container");
                Ok(())
            }
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(self.container_error("remove", name_or_id, e)),
        }
    }

    pub async fn rename(&self, name_or_id: &str, new_name: &str) -> Result<(), DockerError> {
        let client = self.client().await?;
        let options = RenameContainerOptions {
            name: new_name.to_string(),
        };
        client
            .rename_container(name_or_id, options)
            .await
            .map_err(|e| self.container_error("rename", name_or_id, e))?;
        info!(container = %name_or_id, new_name = %new_name, "renamed container");
        Ok(())
    }

    /// The container's state, or `None` if there is no such container.
    pub async fn inspect(&self, name_or_id: &str) -> Result<Option<ContainerState>, DockerError> {
        Ok(self.inspect_raw(name_or_id).await?.map(container_state))
    }

    async fn inspect_raw(
        &self,
        name_or_id: &str,
    ) -> Result<Option<ContainerInspectResponse>, DockerError> {
        let client = self.client().await?;
        match client.inspect_container(name_or_id, None).await {
            Ok(found) => Ok(Some(found)),
            Err(e) if status_of(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.container_error("inspect", name_or_id, e)),
        }
    }

    /// Waits for a started container to prove itself: it must keep running,
    /// with the same start time and restart count, for `window`; and if its
    /// image has a HEALTHCHECK, it must become healthy within `health_timeout`.
    pub async fn settle(
        &self,
        name_or_id: &str,
        window: Duration,
        health_timeout: Duration,
    ) -> Result<(), DockerError> {
        let did_not_settle = |detail: String| DockerError::DidNotSettle {
            container: name_or_id.to_string(),
            detail,
        };
        let begin = tokio::time::Instant::now();
        let first = self
            .inspect_raw(name_or_id)
            .await?
            .ok_or_else(|| did_not_settle("there is no such container".to_string()))?;
        let first = Observation::of(&first);
        loop {
            let now = self
                .inspect_raw(name_or_id)
                .await?
                .ok_or_else(|| did_not_settle("it was removed".to_string()))?;
            let now = Observation::of(&now);
            if let Some(detail) = first.problem_since(&now) {
                warn!(container = %name_or_id, detail = %detail, "container did not settle");
                return Err(did_not_settle(detail));
            }
            let elapsed = begin.elapsed();
            let healthy = match now.health {
                None | Some(HealthStatusEnum::HEALTHY) => true,
                Some(HealthStatusEnum::UNHEALTHY) => {
                    let detail = format!("its health check failed{}", now.last_check());
                    warn!(container = %name_or_id, detail = %detail, "container did not settle");
                    return Err(did_not_settle(detail));
                }
                Some(status) if elapsed >= health_timeout => {
                    let detail = format!(
                        "it was not healthy within {} (health {:?}){}",
                        humantime::format_duration(health_timeout),
                        status.to_string(),
                        now.last_check()
                    );
                    warn!(container = %name_or_id, detail = %detail, "container did not settle");
                    return Err(did_not_settle(detail));
                }
                Some(_) => false,
            };
            if healthy && elapsed >= window {
                info!(container = %name_or_id, elapsed_ms = elapsed.as_millis() as u64, "container settled");
                return Ok(());
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }
}

/// What `settle` compares between two looks at a container.
struct Observation {
    status: String,
    running: bool,
    exit_code: i64,
    oom_killed: bool,
    error: String,
    started_at: String,
    restart_count: i64,
    health: Option<HealthStatusEnum>,
    last_check: Option<(i64, String)>,
}

impl Observation {
    fn of(c: &ContainerInspectResponse) -> Observation {
        let state = c.state.clone().unwrap_or_default();
        let health = state.health.clone();
        Observation {
            status: state.status.map(|s| s.to_string()).unwrap_or_default(),
            running: state.running.unwrap_or(false),
            exit_code: state.exit_code.unwrap_or(0),
            oom_killed: state.oom_killed.unwrap_or(false),
            error: state.error.unwrap_or_default(),
            started_at: state.started_at.unwrap_or_default(),
            restart_count: c.restart_count.unwrap_or(0),
            health: health
                .as_ref()
                .and_then(|h| h.status)
                .filter(|s| !matches!(s, HealthStatusEnum::EMPTY | HealthStatusEnum::NONE)),
            last_check: health.and_then(|h| h.log).and_then(|log| {
                log.last().map(|r| {
                    (
                        r.exit_code.unwrap_or(0),
                        r.output.clone().unwrap_or_default(),
                    )
                })
            }),
        }
    }

    /// Why `now` shows that the container did not stay up since `self`.
    fn problem_since(&self, now: &Observation) -> Option<String> {
        let exited = if now.oom_killed {
            format!(
                "it ran out of memory and was killed (exit code {})",
                now.exit_code
            )
        } else if !now.error.is_empty() {
            format!("it exited with code {}: {}", now.exit_code, now.error)
        } else {
            format!("it exited with code {}", now.exit_code)
        };
        match now.status.as_str() {
            "running" if now.running => {}
            "exited" => return Some(exited),
            "restarting" => return Some(format!("{exited} and is being restarted")),
            other => return Some(format!("it is {other:?}, not running")),
        }
        if now.restart_count != self.restart_count || now.started_at != self.started_at {
            return Some(format!(
                "it was restarted by its restart policy (restart count {})",
                now.restart_count
            ));
        }
        None
    }

    /// ": last check: ..." from the last health log entry, or nothing.
    fn last_check(&self) -> String {
        match &self.last_check {
            Some((code, output)) => match output.lines().rev().find(|l| !l.trim().is_empty()) {
                Some(line) => format!(": last check exited with code {code}: {}", line.trim()),
                None => format!(": last check exited with code {code}"),
            },
            None => String::new(),
        }
    }
}

fn container_state(c: ContainerInspectResponse) -> ContainerState {
    let state = c.state.unwrap_or_default();
    let config = c.config.unwrap_or_default();
    ContainerState {
        id: c.id.unwrap_or_default(),
        name: c
            .name
            .map(|n| n.trim_start_matches('/').to_string())
            .unwrap_or_default(),
        image: c.image.unwrap_or_default(),
        image_ref: config.image.unwrap_or_default(),
        running: state.running.unwrap_or(false),
        status: state.status.map(|s| s.to_string()).unwrap_or_default(),
        exit_code: state.exit_code.unwrap_or(0),
        started_at: state.started_at.unwrap_or_default(),
        restart_count: c.restart_count.unwrap_or(0),
        health: state
            .health
            .and_then(|h| h.status)
            .filter(|s| !matches!(s, HealthStatusEnum::EMPTY | HealthStatusEnum::NONE))
            .map(|s| s.to_string()),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
    }
}

/// The Dockerfile's path inside the context, slash-separated.
fn dockerfile_in_context(context: &Path, dockerfile: &str) -> Result<String, String> {
    let path = Path::new(dockerfile);
    let rel = if path.is_absolute() {
        path.strip_prefix(context)
            .map_err(|_| format!("dockerfile {dockerfile:?} is outside the build context"))?
    } else {
        path
    };
    let mut parts = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().to_string()),
            Component::CurDir => {}
            _ => {
                return Err(format!(
                    "dockerfile {dockerfile:?} is outside the build context"
                ));
            }
        }
    }
    if parts.is_empty() {
        return Err(format!("dockerfile {dockerfile:?} is not a file"));
    }
    Ok(parts.join("/"))
}

/// The bytes of the build context travel in chunks of this size.
const CHUNK: usize = 64 * 1024;

/// A blocking `Write` that hands chunks to the async request body.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Vec<u8>, io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx.blocking_send(Ok(chunk)).map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the engine stopped reading the build context",
            )
        })
    }
}

impl io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.send()?;
        }
        Ok(())
    }
}

fn status_of(e: &ApiError) -> Option<u16> {
    match e {
        ApiError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// Errors that mean the engine was not reached (or stopped answering).
fn is_connection_error(e: &ApiError) -> bool {
    matches!(
        e,
        ApiError::HyperLegacyError { .. }
            | ApiError::SocketNotFoundError(_)
            | ApiError::RequestTimeoutError
            | ApiError::IOError { .. }
    )
}

fn is_transient_status(e: &ApiError) -> bool {
    matches!(status_of(e), Some(502..=504)) || matches!(e, ApiError::HyperResponseError { .. })
}

/// A one-line description: the engine's own message when it sent one,
/// otherwise the error and its causes.
fn describe(e: &ApiError) -> String {
    match e {
        ApiError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        ApiError::DockerStreamError { error } => error.trim().to_string(),
        ApiError::SocketNotFoundError(path) => format!("socket {path:?} does not exist"),
        other => {
            let mut text = other.to_string();
            let mut source = std::error::Error::source(other);
            while let Some(cause) = source {
                let cause_text = cause.to_string();
                if !text.contains(&cause_text) {
                    text.push_str(": ");
                    text.push_str(&cause_text);
                }
                source = cause.source();
            }
            text
        }
    }
}

#[cfg(test)]
mod tests;
