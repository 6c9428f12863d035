//! Switching, verifying, stopping and restoring a scope owned by the
//! `docker` runtime. A replaced container is stopped and renamed to
//! `<name>.moorline-prev` until the new one is healthy, so a rollback brings
//! back the very container that ran before.

use std::path::Path;
use std::time::Duration;

use super::{Docker, LABEL_COMMIT, Labels};
use crate::journal::Journal;
use crate::manifest::{ContainerSpec, Scope};
use crate::runtime::RuntimeError;
use crate::source::short;

/// Suffix of a replaced container kept for rollback.
pub const PREV_SUFFIX: &str = ".moorline-prev";
/// How long a container gets to stop before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub fn prev_name(name: &str) -> String {
    format!("{name}{PREV_SUFFIX}")
}

/// The image a container runs at `release`: built images are tagged with the
/// release's commit; others are references that exist locally.
pub fn image_ref(container: &ContainerSpec, release: &str) -> String {
    if container.dockerfile.is_some() {
        format!("{}:{release}", container.image)
    } else {
        container.image.clone()
    }
}

pub fn containers(scope: &Scope) -> &[ContainerSpec] {
    scope
        .docker
        .as_ref()
        .map(|d| d.containers.as_slice())
        .unwrap_or_default()
}

pub fn names(scope: &Scope) -> Vec<String> {
    containers(scope).iter().map(|c| c.name.clone()).collect()
}

/// A scope's containers at one release: what building and creating them
/// takes.
pub struct Target<'a> {
    pub docker: &'a Docker,
    /// Put on every image and container made for the release.
    pub labels: Labels,
    pub scope: &'a Scope,
    pub release_dir: &'a Path,
    pub release: &'a str,
}

/// Make sure every image of the scope exists for its release, building the
/// missing ones from the release directory. Build output goes to `on_line`.
pub async fn ensure_images(
    target: &Target<'_>,
    journal: &mut Journal<'_>,
    on_line: &mut (dyn FnMut(&str) + Send),
) -> Result<(), RuntimeError> {
    let Target {
        docker,
        labels,
        scope,
        release_dir,
        release,
    } = target;
    for container in containers(scope) {
        let reference = image_ref(container, release);
        if docker
            .image_id(&reference)
            .await
            .map_err(RuntimeError::from)?
            .is_some()
        {
            continue;
        }
        let Some(dockerfile) = &container.dockerfile else {
            return Err(RuntimeError::MissingImage {
                image: reference,
                container: container.name.clone(),
            });
        };
        let context = release_dir.join(&container.context);
        let dockerfile = release_dir.join(dockerfile);
        let dockerfile = dockerfile.to_string_lossy().into_owned();
        // The engine is building once it sends output: a kill lands mid-build.
        let mut output = |line: &str| {
            crate::fault::point("during-image-build");
            on_line(line)
        };
        journal
            .step(
                format!("build image {}:{}", container.image, short(release)),
                docker.build_image(&context, &dockerfile, &reference, labels, &mut output),
            )
            .await
            .map_err(RuntimeError::from)?;
    }
    Ok(())
}

/// The release a container was created for, from its label.
async fn release_of(docker: &Docker, name: &str) -> Result<Option<String>, RuntimeError> {
    Ok(docker
        .inspect(name)
        .await
        .map_err(RuntimeError::from)?
        .and_then(|state| state.labels.get(LABEL_COMMIT).cloned()))
}

/// Replace the scope's containers with new ones on `release`. Existing
/// containers of the same names are stopped and kept as `<name>.moorline-prev`
/// — unless a container on `way_back` (the release a rollback returns to) is
/// already kept there and the existing one runs another release: a rollout
/// killed after it started its containers left those, and keeping them would
/// make a rollback bring back the very release that is being replaced.
pub async fn replace(
    target: &Target<'_>,
    way_back: Option<&str>,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let docker = target.docker;
    for container in containers(target.scope) {
        let name = &container.name;
        if let Some(state) = docker.inspect(name).await.map_err(RuntimeError::from)? {
            let prev = prev_name(name);
            let kept = release_of(docker, &prev).await?;
            if way_back.is_some()
                && kept.as_deref() == way_back
                && state.labels.get(LABEL_COMMIT).map(String::as_str) != way_back
            {
                stop_container(docker, name, true, journal).await?;
                continue;
            }
            stop_container(docker, name, false, journal).await?;
            remove_if_present(docker, &prev, journal).await?;
            journal
                .step(
                    format!("keep container {name} as {prev}"),
                    docker.rename(name, &prev),
                )
                .await
                .map_err(RuntimeError::from)?;
        }
    }
    // The old containers are stopped and kept; the new ones not created yet.
    crate::fault::point("after-stop");
    start_new(target, journal).await
}

/// Create and start the scope's containers (no container of those names exists).
pub async fn start_new(target: &Target<'_>, journal: &mut Journal<'_>) -> Result<(), RuntimeError> {
    let (docker, release_dir, release) = (target.docker, target.release_dir, target.release);
    let env = [
        ("MOORLINE_COMMIT".to_string(), release.to_string()),
        (
            "MOORLINE_RELEASE".to_string(),
            release_dir.display().to_string(),
        ),
    ];
    for container in containers(target.scope) {
        let name = &container.name;
        let image = image_ref(container, release);
        journal
            .step(
                format!("create container {name} from {image}"),
                docker.create(container, &image, &target.labels, &env, release_dir),
            )
            .await
            .map_err(RuntimeError::from)?;
        journal
            .step(format!("start container {name}"), docker.start(name))
            .await
            .map_err(RuntimeError::from)?;
    }
    Ok(())
}

/// Stop the container `name` as one journaled step, and remove it when
/// `remove` (else it is kept, stopped).
async fn stop_container(
    docker: &Docker,
    name: &str,
    remove: bool,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let step = match remove {
        true => format!("remove container {name}"),
        false => format!("stop container {name}"),
    };
    journal
        .step(step, async {
            docker.stop(name, STOP_TIMEOUT).await?;
            match remove {
                true => docker.remove(name).await,
                false => Ok(()),
            }
        })
        .await
        .map_err(RuntimeError::from)
}

/// Remove the container `name` if it exists, journaled; absent is fine.
async fn remove_if_present(
    docker: &Docker,
    name: &str,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    if docker
        .inspect(name)
        .await
        .map_err(RuntimeError::from)?
        .is_some()
    {
        journal
            .step(format!("remove container {name}"), docker.remove(name))
            .await
            .map_err(RuntimeError::from)?;
    }
    Ok(())
}

/// The new containers are healthy: drop the kept ones.
pub async fn drop_previous(
    docker: &Docker,
    scope: &Scope,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    for name in names(scope) {
        remove_if_present(docker, &prev_name(&name), journal).await?;
    }
    Ok(())
}

/// Undo `replace`: remove the new containers and put the kept ones back
/// under their names, started when `start` is set. With `release`, a kept
/// container of another release is not the way back: it is removed. Returns
/// whether every container had a kept predecessor.
pub async fn restore(
    docker: &Docker,
    names: &[String],
    release: Option<&str>,
    start: bool,
    journal: &mut Journal<'_>,
) -> Result<bool, RuntimeError> {
    let mut all_restored = true;
    for name in names {
        journal
            .step(format!("remove container {name}"), docker.remove(name))
            .await
            .map_err(RuntimeError::from)?;
        let prev = prev_name(name);
        if docker
            .inspect(&prev)
            .await
            .map_err(RuntimeError::from)?
            .is_none()
        {
            all_restored = false;
            continue;
        }
        let kept = release_of(docker, &prev).await?;
        if release.is_some() && kept.as_deref() != release {
            journal
                .step(format!("remove container {prev}"), docker.remove(&prev))
                .await
                .map_err(RuntimeError::from)?;
            all_restored = false;
            continue;
        }
        journal
            .step(
                format!("restore container {name} from {prev}"),
                docker.rename(&prev, name),
            )
            .await
            .map_err(RuntimeError::from)?;
        if start {
            journal
                .step(format!("start container {name}"), docker.start(name))
                .await
                .map_err(RuntimeError::from)?;
        }
    }
    Ok(all_restored)
}

/// Remove the containers and any kept as `<name>.moorline-prev` (a cutover
/// to docker that is undone).
pub async fn remove_all(
    docker: &Docker,
    names: &[String],
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    for name in names {
        for name in [name.clone(), prev_name(name)] {
            remove_if_present(docker, &name, journal).await?;
        }
    }
    Ok(())
}

/// Stop containers, keeping them (cutovers) or removing them. Removing
/// also removes a container kept as `<name>.moorline-prev` (left by a
/// replacement that a kill interrupted): nothing of the scope stays on docker.
pub async fn stop(
    docker: &Docker,
    names: &[String],
    remove: bool,
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    for name in names {
        if remove {
            stop_container(docker, name, true, journal).await?;
            remove_if_present(docker, &prev_name(name), journal).await?;
        } else {
            stop_container(docker, name, false, journal).await?;
        }
    }
    Ok(())
}

/// Start stopped containers again (undoing a cutover away from docker).
pub async fn start(
    docker: &Docker,
    names: &[String],
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    journal
        .each(
            names,
            |n| format!("start container {n}"),
            |n| docker.start(n),
        )
        .await
        .map_err(RuntimeError::from)
}

/// The scope's containers (and kept `.moorline-prev` ones) that run (the
/// audit's foreign members when native owns the scope).
pub async fn running(docker: &Docker, scope: &Scope) -> Result<Vec<String>, RuntimeError> {
    let mut found = Vec::new();
    for member in scope.members_on(crate::runtime::Owner::Docker) {
        for name in [prev_name(&member), member] {
            let Some(state) = docker.inspect(&name).await.map_err(RuntimeError::from)? else {
                continue;
            };
            if state.running {
                found.push(name);
            }
        }
    }
    Ok(found)
}

/// Containers that are missing, stopped, or labelled with another release
/// than `release`.
pub async fn drift(
    docker: &Docker,
    scope: &Scope,
    release: &str,
) -> Result<Vec<String>, RuntimeError> {
    drift_of(docker, &names(scope), release).await
}

/// Of the containers `names`, those missing, stopped, or labelled with
/// another release than `release`.
pub async fn drift_of(
    docker: &Docker,
    names: &[String],
    release: &str,
) -> Result<Vec<String>, RuntimeError> {
    let mut found = Vec::new();
    for name in names {
        match docker.inspect(name).await.map_err(RuntimeError::from)? {
            None => found.push(format!("container {name} is missing")),
            Some(state) if !state.running => {
                found.push(format!("container {name} is {}", state.status))
            }
            Some(state) => {
                let commit = state.labels.get(LABEL_COMMIT);
                if commit.is_some_and(|c| c != release) {
                    found.push(format!(
                        "container {name} runs release {} but {} was recorded",
                        short(commit.map(String::as_str).unwrap_or("")),
                        short(release)
                    ));
                }
            }
        }
    }
    Ok(found)
}

/// Create and start slot `slot`'s container of a slotted scope on its
/// release: named `<name>-<slot>`, publishing the slot's address to the
/// container's `port`, with `env` (`MOORLINE_SLOT`, ...) besides the
/// release and commit. A container of that name left from before is
/// removed first.
pub async fn start_slot(
    target: &Target<'_>,
    slot: u8,
    addr: std::net::SocketAddr,
    env: &[(&str, String)],
    journal: &mut Journal<'_>,
) -> Result<(), RuntimeError> {
    let docker = target.docker;
    for container in containers(target.scope) {
        let mut spec = container.clone();
        spec.name = format!("{}-{slot}", container.name);
        let port = container.port.unwrap_or(addr.port());
        spec.ports = vec![format!("{}:{}:{port}", addr.ip(), addr.port())];
        remove_if_present(docker, &spec.name, journal).await?;
        let mut all_env = vec![
            ("MOORLINE_COMMIT".to_string(), target.release.to_string()),
            (
                "MOORLINE_RELEASE".to_string(),
                target.release_dir.display().to_string(),
            ),
        ];
        all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.clone())));
        let image = image_ref(container, target.release);
        let name = spec.name.clone();
        journal
            .step(
                format!("create container {name} from {image}"),
                docker.create(&spec, &image, &target.labels, &all_env, target.release_dir),
            )
            .await
            .map_err(RuntimeError::from)?;
        journal
            .step(format!("start container {name}"), docker.start(&name))
            .await
            .map_err(RuntimeError::from)?;
    }
    Ok(())
}

/// What `status` shows for one container.
pub async fn member_state(docker: &Docker, name: &str) -> crate::runtime::MemberState {
    use crate::runtime::MemberState;
    match docker.inspect(name).await {
        Ok(Some(c)) if c.running => MemberState::Up(format!(
            "running (image {}, id {})",
            c.image_ref,
            c.id.get(..12).unwrap_or(&c.id)
        )),
        Ok(Some(c)) => MemberState::Down(format!("{} (exit code {})", c.status, c.exit_code)),
        Ok(None) => MemberState::Down("missing".to_string()),
        Err(e) if e.is_transient() => MemberState::Unknown(format!("unknown: {e}")),
        Err(e) => MemberState::Down(format!("unknown: {e}")),
    }
}
