//! The Docker runtime and cutovers, against a real Docker engine and a real
//! user manager: a scope is owned by exactly one runtime at any instant.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{self, Host, docker, set_owner, wait_for};
use crate::scope;

pub(crate) fn inspect(name: &str) -> Value {
    let output = docker(&["inspect", name]);
    let list: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
    list[0].clone()
}

/// Samples both runtimes of one scope every 20 ms until stopped, through
/// their APIs (the user manager over D-Bus, the engine over its socket),
/// both asked at once in each pass. A failed query fails the test: it is
/// never read as "not running".
pub(crate) struct Exclusivity {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Samples, String>>>,
}

/// How many passes the sampler made, and each moment both runtimes ran.
type Samples = (usize, Vec<String>);

impl Exclusivity {
    pub(crate) fn watch(host: &Host, unit: &str, container: &str) -> Exclusivity {
        let stop = Arc::new(AtomicBool::new(false));
        let bus = host.um.bus_address();
        let (unit, container, flag) = (unit.to_string(), container.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(sample(&bus, &unit, &container, &flag))
        });
        Exclusivity {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop sampling; panics if both runtimes ever ran the scope, or if
    /// either could not be asked.
    pub(crate) fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        let (samples, both) = self
            .thread
            .take()
            .expect("running")
            .join()
            .expect("sampler thread")
            .unwrap_or_else(|e| panic!("the exclusivity sampler could not ask a runtime: {e}"));
        assert!(both.is_empty(), "both runtimes ran the scope: {both:#?}");
        samples
    }
}

async fn sample(
    bus: &str,
    unit: &str,
    container: &str,
    stop: &AtomicBool,
) -> Result<Samples, String> {
    use zbus::proxy::CacheProperties;
    use zbus_systemd::systemd1::{ManagerProxy, UnitProxy};
    let connection = zbus::connection::Builder::address(bus)
        .build()
        .await
        .map_err(|e| format!("user bus: {e}"))?;
    let manager = ManagerProxy::new(&connection)
        .await
        .map_err(|e| e.to_string())?;
    let path = manager
        .load_unit(unit.to_string())
        .await
        .map_err(|e| format!("load {unit}: {e}"))?;
    let unit_proxy = UnitProxy::builder(&connection)
        .path(path)
        .cache_properties(CacheProperties::No)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let engine = bollard::Docker::connect_with_socket_defaults()
        .map_err(|e| format!("docker engine: {e}"))?;
    let mut samples = 0;
    let mut both = Vec::new();
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    while !stop.load(Ordering::SeqCst) {
        ticker.tick().await;
        let (state, inspected) = tokio::join!(
            unit_proxy.active_state(),
            engine.inspect_container(
                container,
                None::<bollard::query_parameters::InspectContainerOptions>
            )
        );
        let state = state.map_err(|e| format!("ActiveState of {unit}: {e}"))?;
        let running = match inspected {
            Ok(c) => c.state.and_then(|s| s.running).unwrap_or(false),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => false,
            Err(e) => return Err(format!("inspect {container}: {e}")),
        };
        let native = matches!(
            state.as_str(),
            "active" | "activating" | "deactivating" | "reloading"
        );
        samples += 1;
        if native && running {
            both.push(format!(
                "at {:?}: {unit} is {state} and {container} runs",
                started.elapsed()
            ));
        }
    }
    Ok((samples, both))
}

/// Web on docker, and only the newest release kept beyond those in use.
pub(crate) fn web_docker(work: &std::path::Path) {
    set_owner(work, "web", "docker");
    harness::keep_one_release(work);
}

/// Web's image exits a second after it starts.
pub(crate) fn exiting_web(work: &std::path::Path) {
    let path = work.join("deploy/docker/web.Dockerfile");
    let text = std::fs::read_to_string(&path).expect("read");
    let text = text.replace(
        "CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]",
        "CMD [\"/bin/busybox\", \"sh\", \"-c\", \"sleep 1; exit 3\"]",
    );
    std::fs::write(&path, text).expect("write");
}

#[test]
fn a_docker_scope_deploys_updates_and_rolls_back_a_failing_image() {
    let mut host = Host::with(web_docker);
    let web = host.container("app-web");
    let first = harness::git(&host.work(), &["rev-parse", "HEAD"]);
    host.start_agent();
    let rollout = host.wait_rollout(&first);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(scope(&rollout, "web")["owner"], "docker");
    assert!(host.web().is_some_and(|(_, body)| body.contains("web v1")));
    let container = inspect(&web);
    assert_eq!(container["Config"]["Image"], format!("{web}:{first}"));
    assert_eq!(container["Config"]["Labels"]["moorline.scope"], "web");
    assert_eq!(
        container["Config"]["Labels"]["moorline.commit"],
        first.as_str()
    );
    let env = container["Config"]["Env"].to_string();
    assert!(env.contains(&format!("MOORLINE_COMMIT={first}")), "{env}");
    assert_eq!(
        host.unit_property("app-web.service", "ActiveState"),
        "inactive"
    );
    let status = host.json(&["status", "--json"]);
    let web_status = status["scopes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "web"))
        .expect("web in status")
        .clone();
    assert_eq!(web_status["owner"], "docker");
    let member = web_status["members"][0]["state"]
        .as_str()
        .expect("member state");
    assert!(
        member.starts_with(&format!("running (image {web}:{first}, id ")),
        "{member}"
    );

    let second = host.commit_and_push("web: v2", |work| {
        std::fs::write(work.join("services/web/www/index.html"), "<p>web v2</p>\n").expect("write");
    });
    host.sync();
    let rollout = host.wait_rollout(&second);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert!(host.web().is_some_and(|(_, body)| body.contains("web v2")));
    let v2 = inspect(&web);
    assert_eq!(v2["Config"]["Image"], format!("{web}:{second}"));
    assert_ne!(v2["Id"], container["Id"], "the container was replaced");
    assert_eq!(
        docker(&["image", "inspect", &format!("{web}:{first}")])
            .status
            .code(),
        Some(0),
        "v1 image kept"
    );

    let broken = host.commit_and_push("web: an image that exits", exiting_web);
    host.sync();
    let rollout = host.wait_rollout(&broken);
    assert_eq!(rollout["outcome"], "rolled-back", "{rollout:#}");
    let error = rollout["error"].as_str().expect("error");
    assert!(
        error.starts_with("scope \"web\" failed verification: "),
        "{error}"
    );
    assert_eq!(scope(&rollout, "web")["result"], "rolled-back");
    let restored = inspect(&web);
    assert_eq!(
        restored["Id"], v2["Id"],
        "the very container that ran before is back"
    );
    assert_eq!(restored["State"]["Running"], true);
    assert!(host.web().is_some_and(|(_, body)| body.contains("web v2")));
    let prev = format!("{web}.moorline-prev");
    assert_ne!(
        docker(&["inspect", &prev]).status.code(),
        Some(0),
        "no kept container is left"
    );

    // Pruning: with keep_releases = 1, the v2 release and its image go once
    // v3 runs; the first release stays (api and workers run it).
    let third = host.commit_and_push("web: v3", |work| {
        let path = work.join("deploy/docker/web.Dockerfile");
        let text = std::fs::read_to_string(&path).expect("read");
        let text = text.replace(
            "CMD [\"/bin/busybox\", \"sh\", \"-c\", \"sleep 1; exit 3\"]",
            "CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]",
        );
        std::fs::write(&path, text).expect("write");
        std::fs::write(work.join("services/web/www/index.html"), "<p>web v3</p>\n").expect("write");
    });
    host.sync();
    assert_eq!(host.wait_rollout(&third)["outcome"], "succeeded");
    host.wait_idle_at(&third);
    assert!(host.web().is_some_and(|(_, body)| body.contains("web v3")));
    let releases = host.state_dir().join("releases");
    assert!(
        !releases.join(&second).exists(),
        "the v2 release was pruned"
    );
    assert!(releases.join(&first).exists() && releases.join(&third).exists());
    let image = |commit: &str| {
        docker(&["image", "inspect", &format!("{web}:{commit}")])
            .status
            .code()
    };
    assert_ne!(
        image(&second),
        Some(0),
        "the v2 image was removed with its release"
    );
    assert_eq!(image(&third), Some(0));
}

#[test]
fn cutover_goes_both_ways_without_both_runtimes_ever_running_the_scope() {
    let mut host = Host::new();
    let api = host.container("app-api");
    host.deployed();
    assert_eq!(
        host.unit_property("app-api.service", "ActiveState"),
        "active"
    );

    let to_docker = host.commit_and_push("api: cut over to docker", |work| {
        set_owner(work, "api", "docker")
    });
    let plan = host.json(&["plan", &to_docker, "--json"]);
    let planned = plan["scopes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["scope"] == "api"))
        .expect("api planned")
        .clone();
    assert_eq!(planned["action"], "cutover");
    assert_eq!(planned["reason"], "owner changed from native to docker");
    let plan_text =
        String::from_utf8_lossy(&host.moorline(&["plan", &to_docker]).stdout).to_string();
    assert!(
        plan_text
            .contains("  api      docker  cutover    owner changed from native to docker; build\n"),
        "{plan_text}"
    );

    let sampler = Exclusivity::watch(&host, "app-api.service", &api);
    host.sync();
    let rollout = host.wait_rollout(&to_docker);
    assert!(sampler.finish() > 20, "the sampler ran through the cutover");
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(scope(&rollout, "api")["action"], "cutover");
    assert_eq!(
        host.unit_property("app-api.service", "ActiveState"),
        "inactive"
    );
    assert_eq!(inspect(&api)["State"]["Running"], true);
    assert_eq!(
        host.api(),
        Some((200, "ok v1\n".to_string())),
        "the docker form answers"
    );

    let to_native = host.commit_and_push("api: back to native", |work| {
        set_owner(work, "api", "native")
    });
    let sampler = Exclusivity::watch(&host, "app-api.service", &api);
    host.sync();
    let rollout = host.wait_rollout(&to_native);
    assert!(sampler.finish() > 20);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(
        scope(&rollout, "api")["reason"],
        "owner changed from docker to native"
    );
    assert_eq!(
        host.unit_property("app-api.service", "ActiveState"),
        "active"
    );
    assert_ne!(
        docker(&["inspect", &api]).status.code(),
        Some(0),
        "the old containers are removed"
    );
    assert!(
        host.api()
            .is_some_and(|(_, body)| body.starts_with("ok v1 ")),
        "the native form answers"
    );
}

#[test]
fn a_cutover_whose_new_owner_fails_returns_to_the_old_owner() {
    let mut host = Host::new();
    let api = host.container("app-api");
    host.deployed();
    let before = host.unit_property("app-api.service", "InvocationID");

    let bad = host.commit_and_push("api: cut over to a docker form on the wrong port", |work| {
        set_owner(work, "api", "docker");
        let path = work.join("deploy/moorline.toml");
        let text = std::fs::read_to_string(&path).expect("read");
        let port = host_port(&text);
        std::fs::write(
            &path,
            text.replacen(&format!("127.0.0.1:{port}:8080"), "127.0.0.1:1:8080", 1),
        )
        .expect("write");
    });
    let sampler = Exclusivity::watch(&host, "app-api.service", &api);
    host.sync();
    let rollout = host.wait_rollout(&bad);
    assert!(sampler.finish() > 20);
    assert_eq!(rollout["outcome"], "rolled-back", "{rollout:#}");
    assert_eq!(scope(&rollout, "api")["result"], "rolled-back");
    assert_eq!(
        host.unit_property("app-api.service", "ActiveState"),
        "active"
    );
    assert_ne!(
        host.unit_property("app-api.service", "InvocationID"),
        before,
        "the unit was started again"
    );
    assert_ne!(
        docker(&["inspect", &api]).status.code(),
        Some(0),
        "the failed containers are removed"
    );
    assert!(
        host.api()
            .is_some_and(|(_, body)| body.starts_with("ok v1 "))
    );
    assert_eq!(host.failed_commit(), bad.as_str());
}

/// The host port the api's docker form publishes, from the manifest text.
fn host_port(manifest: &str) -> String {
    let start =
        manifest.find("ports = [\"127.0.0.1:").expect("api ports") + "ports = [\"127.0.0.1:".len();
    manifest[start..]
        .split(':')
        .next()
        .expect("port")
        .to_string()
}

/// Workers cut over to docker, the agent stopped, and the native worker
/// started by hand beside its container: both would consume the same
/// queues. (A worker listens on no port, so the unit really runs.)
pub(crate) fn worker_started_beside_its_container() -> Host {
    let mut host = Host::new();
    host.deployed();
    let to_docker = host.commit_and_push("workers: cut over to docker", |work| {
        set_owner(work, "workers", "docker")
    });
    host.sync();
    assert_eq!(host.wait_rollout(&to_docker)["outcome"], "succeeded");
    host.stop_agent();
    let started = host.um.systemctl(&["start", "app-worker.service"]);
    assert!(started.status.success());
    host
}

#[test]
fn the_start_up_audit_stops_a_member_running_on_the_runtime_that_does_not_own_it() {
    let mut host = worker_started_beside_its_container();
    wait_for(
        "app-worker.service to be active",
        Duration::from_secs(10),
        || (host.unit_property("app-worker.service", "ActiveState") == "active").then_some(()),
    );
    host.start_agent();
    wait_for(
        "the audit to stop app-worker.service",
        Duration::from_secs(30),
        || (host.unit_property("app-worker.service", "ActiveState") == "inactive").then_some(()),
    );
    let audit = wait_for("the audit in history", Duration::from_secs(10), || {
        host.history().into_iter().find(|r| r["trigger"] == "audit")
    });
    let recorded = scope(&audit, "workers");
    assert_eq!(
        recorded["reason"],
        "app-worker.service was running although docker owns scope \"workers\"; stopped it"
    );
    assert_eq!(recorded["owner"], "docker");
    let status = host.json(&["status", "--json"]);
    let workers = status["scopes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "workers"))
        .expect("workers in status")
        .clone();
    assert_eq!(workers["owner"], "docker");
    let problem = workers["problem"].as_str().expect("the violation is shown");
    assert!(
        problem.starts_with(
            "app-worker.service was running although docker owns scope \"workers\"; stopped it (audit at "
        ),
        "{problem}"
    );
    assert_eq!(
        inspect(&host.container("app-worker"))["State"]["Running"],
        true,
        "the owner keeps running"
    );
}

/// The last healthy release of each owner is the way back of a cutover:
/// pruning keeps it (and the image built for it) however many commits come
/// after, so reverting the cutover reuses it without a build.
#[test]
fn the_release_docker_last_ran_survives_pruning_for_the_way_back() {
    let mut host = Host::with(web_docker);
    let web = host.container("app-web");
    let first = host.deployed();
    let to_native = host.commit_and_push("web: back to native", |work| {
        set_owner(work, "web", "native")
    });
    host.sync();
    assert_eq!(host.wait_rollout(&to_native)["outcome"], "succeeded");
    // Two commits that move api and workers (packages/ is theirs) off the
    // first release: only web's way back to docker still needs it.
    for n in 1..=2 {
        let commit = host.commit_and_push(&format!("packages: change {n}"), |work| {
            std::fs::write(work.join("packages/shared/README"), format!("change {n}\n"))
                .expect("write");
        });
        host.sync();
        let rollout = host.wait_rollout(&commit);
        assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
        assert_eq!(scope(&rollout, "web")["action"], "unchanged");
        // Pruning comes after the record is closed.
        host.wait_idle_at(&commit);
    }
    let releases = host.state_dir().join("releases");
    assert!(releases.join(&first).is_dir(), "the way back was pruned");
    let image = format!("{web}:{first}");
    assert!(
        docker(&["image", "inspect", &image]).status.success(),
        "{image} was removed"
    );

    let revert = host.commit_and_push("Revert \"web: back to native\"", |work| {
        harness::git(work, &["revert", "--no-commit", &to_native]);
    });
    host.sync();
    let rollout = host.wait_rollout(&revert);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    let back = scope(&rollout, "web");
    assert_eq!(back["action"], "cutover", "{back}");
    assert_eq!(back["release"], first.as_str(), "{back}");
    assert_eq!(back["built"], false, "{back}");
    assert_eq!(inspect(&web)["Config"]["Image"], image.as_str());
    assert!(host.web().is_some_and(|(_, body)| body.contains("web v1")));
}
