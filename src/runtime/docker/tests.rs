//! Tests of the Docker adapter against a real engine (started by `scripts/install-deps --docker`):
//! FROM-scratch busybox images, real containers, real HTTP. They fail, not
//! skip, when no engine answers.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;

const HOST: &str = "unix:///var/run/docker.sock";

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A unique name for this test process.
fn unique(what: &str) -> String {
    format!(
        "moorline-test-{}-{what}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One test's engine handle, unique source label and scratch directory;
/// removes every container and image carrying its source labels on drop.
struct Fixture {
    docker: Docker,
    sources: Vec<String>,
    volumes: Vec<String>,
    dir: tempfile::TempDir,
}

impl Fixture {
    async fn new() -> Fixture {
        let docker = Docker::connect(HOST).expect("the host string is valid");
        if let Err(e) = docker.inspect("moorline-test-probe").await {
            panic!(
                "these tests need a running docker engine at {HOST} (scripts/install-deps --docker starts one): {e}"
            );
        }
        Fixture {
            docker,
            sources: vec![unique("source")],
            volumes: Vec::new(),
            dir: tempfile::tempdir().expect("a temp dir"),
        }
    }

    fn labels(&self, scope: &str) -> Labels {
        Labels {
            source: self.sources[0].clone(),
            scope: scope.to_string(),
            commit: "0123456789abcdef0123456789abcdef01234567".to_string(),
        }
    }

    /// Create a container from `spec` on image `tag`, labelled for
    /// `scope`, and start it.
    async fn run(&self, spec: &ContainerSpec, tag: &str, scope: &str) {
        self.docker
            .create(spec, tag, &self.labels(scope), &[], Path::new("/r"))
            .await
            .expect("create");
        self.docker.start(&spec.name).await.expect("start");
    }

    /// A build context under the fixture's directory holding busybox and `files`.
    fn context(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let root = self.dir.path().join(name);
        std::fs::create_dir_all(&root).expect("mkdir context");
        std::fs::copy("/bin/busybox", root.join("busybox"))
            .expect("busybox-static is installed at /bin/busybox");
        for (path, body) in files {
            let path = root.join(path);
            std::fs::create_dir_all(path.parent().expect("files have a parent")).expect("mkdir");
            std::fs::write(path, body).expect("write context file");
        }
        root
    }

    async fn build(&self, context: &Path, tag: &str) -> (String, Vec<String>) {
        let mut lines = Vec::new();
        let id = self
            .docker
            .build_image(
                context,
                "Dockerfile",
                tag,
                &self.labels("build"),
                &mut |line| lines.push(line.to_string()),
            )
            .await
            .unwrap_or_else(|e| panic!("build of {tag} failed: {e}\n{}", lines.join("\n")));
        (id, lines)
    }

    fn spec(&self, name: &str, command: Option<&[&str]>) -> ContainerSpec {
        ContainerSpec {
            name: name.to_string(),
            image: String::new(),
            dockerfile: None,
            context: ".".to_string(),
            ports: Vec::new(),
            env: BTreeMap::new(),
            env_file: None,
            volumes: Vec::new(),
            command: command.map(|argv| argv.iter().map(|a| a.to_string()).collect()),
            restart: "no".to_string(),
            port: None,
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for source in &self.sources {
            let filter = format!("label={LABEL_SOURCE}={source}");
            for (list, remove) in [
                (["ps", "-aq"], ["rm", "-f"]),
                (["images", "-q"], ["rmi", "-f"]),
            ] {
                let Ok(out) = Command::new("docker")
                    .args(list)
                    .args(["--filter", &filter])
                    .output()
                else {
                    continue;
                };
                let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                if !ids.is_empty() {
                    let _ = Command::new("docker").args(remove).args(&ids).output();
                }
            }
        }
        // Named volumes carry no labels; they go after the containers using them.
        if !self.volumes.is_empty() {
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f"])
                .args(&self.volumes)
                .output();
        }
    }
}

/// Polls `probe` until it yields a value or `timeout` passes.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

async fn get(url: String) -> Option<(u16, String)> {
    let response = reqwest::get(&url).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

const HTTPD_DOCKERFILE: &str = "FROM scratch
COPY busybox /bin/busybox
COPY www/ /www/
CMD [\"/bin/busybox\", \"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]
";

#[tokio::test]
async fn builds_runs_serves_and_manages_a_container() {
    let mut fx = Fixture::new().await;
    let context = fx.context(
        "httpd",
        &[
            ("Dockerfile", HTTPD_DOCKERFILE),
            (
                ".dockerignore",
                "# keep secrets out\nwww/*.bin\n!www/keep.bin\nwww/secret.env\n",
            ),
            ("www/index.html", "hello"),
            ("www/keep.bin", "kept"),
            ("www/big.bin", "big"),
            ("www/secret.env", "TOKEN=hunter2"),
        ],
    );
    let tag = format!("{}:abc123", unique("httpd"));
    let (id, lines) = fx.build(&context, &tag).await;
    assert!(id.starts_with("sha256:"), "{id}");
    assert!(
        lines.iter().any(|l| l == "Step 1/7 : FROM scratch"),
        "{lines:?}"
    );
    assert_eq!(
        fx.docker.image_id(&tag).await.expect("inspect image"),
        Some(id.clone())
    );

    let env_file = fx.dir.path().join("app.env");
    std::fs::write(
        &env_file,
        "# comment\n\nFROM_FILE=yes\nAPI_PORT=from-file\n",
    )
    .expect("write env file");
    let name = unique("web");
    let port = free_port();
    let mut spec = fx.spec(&name, None);
    spec.ports = vec![format!("127.0.0.1:{port}:8080")];
    spec.env = BTreeMap::from([("API_PORT".to_string(), "from-spec".to_string())]);
    spec.env_file = Some(env_file.display().to_string());
    let host_dir = fx.dir.path().join("host-www");
    std::fs::create_dir_all(&host_dir).expect("mkdir");
    std::fs::write(host_dir.join("mounted.txt"), "from the host").expect("write");
    let volume = unique("data");
    fx.volumes.push(volume.clone());
    spec.volumes = vec![
        format!("{}:/www/host:ro", host_dir.display()),
        format!("{volume}:/data"),
    ];
    let commit = fx.labels("web").commit;
    let extra_env = [
        ("MOORLINE_COMMIT".to_string(), commit.clone()),
        (
            "MOORLINE_RELEASE".to_string(),
            "/srv/releases/abc".to_string(),
        ),
    ];
    let release = Path::new("/srv/releases/abc");
    let container_id = fx
        .docker
        .create(&spec, &tag, &fx.labels("web"), &extra_env, release)
        .await
        .expect("create");
    let again = fx
        .docker
        .create(&spec, &tag, &fx.labels("web"), &extra_env, release)
        .await
        .expect_err("the name is taken");
    assert_eq!(
        again.to_string(),
        format!("container {name:?} already exists")
    );

    fx.docker.start(&name).await.expect("start");
    fx.docker
        .settle(&name, Duration::from_millis(500), Duration::from_secs(10))
        .await
        .expect("httpd keeps running");

    let base = format!("http://127.0.0.1:{port}");
    let index = wait_for("httpd to answer", Duration::from_secs(10), || {
        get(format!("{base}/index.html"))
    })
    .await;
    assert_eq!(index, (200, "hello".to_string()));
    assert_eq!(
        get(format!("{base}/keep.bin")).await.map(|r| r.0),
        Some(200),
        "a ! exception is sent"
    );
    assert_eq!(
        get(format!("{base}/big.bin")).await.map(|r| r.0),
        Some(404),
        "*.bin is ignored"
    );
    assert_eq!(
        get(format!("{base}/secret.env")).await.map(|r| r.0),
        Some(404),
        "the secret is ignored"
    );

    let state = fx
        .docker
        .inspect(&name)
        .await
        .expect("inspect")
        .expect("it exists");
    assert_eq!(state.id, container_id);
    assert_eq!(state.name, name);
    assert_eq!(state.image, id);
    assert_eq!(state.image_ref, tag);
    assert!(state.running);
    assert_eq!(state.status, "running");
    assert_eq!(state.health, None);
    assert_eq!(state.restart_count, 0);
    let want_labels: BTreeMap<String, String> = [
        (LABEL_SOURCE, fx.sources[0].as_str()),
        (LABEL_SCOPE, "web"),
        (LABEL_COMMIT, commit.as_str()),
        (LABEL_RELEASE, "/srv/releases/abc"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(state.labels, want_labels);

    let raw = fx
        .docker
        .inspect_raw(&name)
        .await
        .expect("inspect")
        .expect("it exists");
    let env = raw.config.and_then(|c| c.env).unwrap_or_default();
    for want in [
        format!("MOORLINE_COMMIT={commit}"),
        "MOORLINE_RELEASE=/srv/releases/abc".to_string(),
        "API_PORT=from-spec".to_string(),
        "FROM_FILE=yes".to_string(),
    ] {
        assert!(env.contains(&want), "{want} missing from {env:?}");
    }
    assert!(
        !env.contains(&"API_PORT=from-file".to_string()),
        "spec.env wins: {env:?}"
    );

    let renamed = format!("{name}-old");
    fx.docker.rename(&name, &renamed).await.expect("rename");
    assert_eq!(fx.docker.inspect(&name).await.expect("inspect"), None);
    fx.docker
        .stop(&renamed, Duration::from_secs(1))
        .await
        .expect("stop");
    let stopped = fx
        .docker
        .inspect(&renamed)
        .await
        .expect("inspect")
        .expect("it exists");
    assert!(!stopped.running);
    assert_eq!(stopped.status, "exited");
    fx.docker
        .stop(&renamed, Duration::from_secs(1))
        .await
        .expect("stopping a stopped container is fine");
    fx.docker.remove(&renamed).await.expect("remove");
    assert_eq!(fx.docker.inspect(&renamed).await.expect("inspect"), None);
    fx.docker
        .remove(&renamed)
        .await
        .expect("removing an absent container is fine");
    fx.docker
        .stop(&renamed, Duration::from_secs(1))
        .await
        .expect("stopping an absent container is fine");
    let err = fx.docker.start(&renamed).await.expect_err("it is gone");
    assert_eq!(
        err.to_string(),
        format!("cannot start container {renamed:?}: No such container: {renamed}")
    );
    assert!(!err.is_transient());

    fx.docker.remove_image(&tag).await.expect("remove image");
    assert_eq!(fx.docker.image_id(&tag).await.expect("inspect image"), None);
    fx.docker
        .remove_image(&tag)
        .await
        .expect("removing an absent image is fine");
}

#[tokio::test]
async fn an_env_file_that_cannot_be_read_is_named() {
    let fx = Fixture::new().await;
    let name = unique("envfile");
    let mut spec = fx.spec(&name, None);
    let missing = fx.dir.path().join("missing.env");
    spec.env_file = Some(missing.display().to_string());
    let err = fx
        .docker
        .create(&spec, "unused:tag", &fx.labels("web"), &[], Path::new("/r"))
        .await
        .expect_err("the env file is missing");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot read env_file {missing:?} of container {name:?}: No such file or directory (os error 2)"
        )
    );
    let bad = fx.dir.path().join("bad.env");
    std::fs::write(&bad, "OK=1\nTOKEN hunter2\n").expect("write");
    spec.env_file = Some(bad.display().to_string());
    let err = fx
        .docker
        .create(&spec, "unused:tag", &fx.labels("web"), &[], Path::new("/r"))
        .await
        .expect_err("the env file is malformed");
    assert_eq!(
        err.to_string(),
        format!("cannot read env_file {bad:?} of container {name:?}: line 2: expected KEY=VALUE")
    );
    spec.env_file = None;
    spec.ports = vec!["127.0.0.1:http:80".to_string()];
    let err = fx
        .docker
        .create(&spec, "unused:tag", &fx.labels("web"), &[], Path::new("/r"))
        .await
        .expect_err("the port is malformed");
    assert_eq!(
        err.to_string(),
        format!(
            "invalid port \"127.0.0.1:http:80\" of container {name:?}: host port \"http\" is not a number from 1 to 65535"
        )
    );
}

#[tokio::test]
async fn settle_fails_when_the_container_exits() {
    let fx = Fixture::new().await;
    let context = fx.context(
        "exits",
        &[("Dockerfile", "FROM scratch\nCOPY busybox /bin/busybox\n")],
    );
    let tag = format!("{}:v1", unique("exits"));
    fx.build(&context, &tag).await;
    let crash: &[&str] = &["/bin/busybox", "sh", "-c", "/bin/busybox sleep 1; exit 3"];

    let once = unique("once");
    fx.run(&fx.spec(&once, Some(crash)), &tag, "worker").await;
    let err = fx
        .docker
        .settle(&once, Duration::from_secs(3), Duration::from_secs(10))
        .await
        .expect_err("it exits after 1 s");
    assert_eq!(
        err.to_string(),
        format!("container {once:?} did not settle: it exited with code 3")
    );
    assert!(!err.is_transient());

    let mut restarting = fx.spec(&unique("again"), Some(crash));
    restarting.restart = "on-failure".to_string();
    let again = restarting.name.clone();
    fx.run(&restarting, &tag, "worker").await;
    let err = fx
        .docker
        .settle(&again, Duration::from_secs(3), Duration::from_secs(10))
        .await
        .expect_err("it keeps crashing");
    let text = err.to_string();
    let expected = [
        format!("container {again:?} did not settle: it exited with code 3 and is being restarted"),
        format!(
            "container {again:?} did not settle: it was restarted by its restart policy (restart count 1)"
        ),
    ];
    assert!(expected.contains(&text), "{text}");

    let err = fx
        .docker
        .settle(
            "moorline-test-no-such-container",
            Duration::from_secs(1),
            Duration::from_secs(1),
        )
        .await
        .expect_err("absent");
    assert_eq!(
        err.to_string(),
        "container \"moorline-test-no-such-container\" did not settle: there is no such container"
    );
}

#[tokio::test]
async fn settle_follows_the_healthcheck() {
    let fx = Fixture::new().await;
    let dockerfile = "FROM scratch
COPY busybox /bin/busybox
HEALTHCHECK --interval=2s --timeout=2s --retries=1 \\
  CMD [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox test -f /tmp/ok || { echo booting; echo db unreachable; exit 1; }\"]
CMD [\"/bin/busybox\", \"sleep\", \"600\"]
";
    let context = fx.context("health", &[("Dockerfile", dockerfile)]);
    let tag = format!("{}:v1", unique("health"));
    fx.build(&context, &tag).await;

    let healthy = unique("healthy");
    let ok: &[&str] = &[
        "/bin/busybox",
        "sh",
        "-c",
        "/bin/busybox mkdir -p /tmp && /bin/busybox touch /tmp/ok && exec /bin/busybox sleep 600",
    ];
    fx.run(&fx.spec(&healthy, Some(ok)), &tag, "api").await;
    fx.docker
        .settle(
            &healthy,
            Duration::from_millis(500),
            Duration::from_secs(20),
        )
        .await
        .expect("the health check passes");
    let state = fx
        .docker
        .inspect(&healthy)
        .await
        .expect("inspect")
        .expect("exists");
    assert_eq!(state.health.as_deref(), Some("healthy"));

    let sick = unique("sick");
    fx.run(&fx.spec(&sick, None), &tag, "api").await;
    let err = fx
        .docker
        .settle(
            &sick,
            Duration::from_millis(200),
            Duration::from_millis(300),
        )
        .await
        .expect_err("not healthy within 300ms");
    assert_eq!(
        err.to_string(),
        format!(
            "container {sick:?} did not settle: it was not healthy within 300ms (health \"starting\")"
        )
    );
    let err = fx
        .docker
        .settle(&sick, Duration::from_millis(200), Duration::from_secs(20))
        .await
        .expect_err("the health check fails");
    assert_eq!(
        err.to_string(),
        format!(
            "container {sick:?} did not settle: its health check failed: last check exited with code 1: db unreachable"
        )
    );
}

#[tokio::test]
async fn build_failures_name_the_image_and_carry_the_builder_error() {
    let fx = Fixture::new().await;
    let context = fx.context(
        "fails",
        &[
            ("Dockerfile", "FROM scratch\nCOPY secret.env /secret.env\n"),
            (".dockerignore", "secret.env\n"),
            ("secret.env", "TOKEN=hunter2"),
        ],
    );
    let tag = format!("{}:broken", unique("fails"));
    let mut lines = Vec::new();
    let err = fx
        .docker
        .build_image(
            &context,
            "Dockerfile",
            &tag,
            &fx.labels("build"),
            &mut |l| lines.push(l.to_string()),
        )
        .await
        .expect_err("the ignored file cannot be copied");
    let message = "COPY failed: file not found in build context or excluded by .dockerignore: stat secret.env: file does not exist";
    assert_eq!(
        err.to_string(),
        format!("build of image {tag:?} failed: {message}")
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some(message),
        "the tail ends with the error"
    );

    let err = fx
        .docker
        .build_image(
            &context,
            "/elsewhere/Dockerfile",
            &tag,
            &fx.labels("build"),
            &mut |_| {},
        )
        .await
        .expect_err("outside the context");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot send the build context {context:?} of image {tag:?}: dockerfile \"/elsewhere/Dockerfile\" is outside the build context"
        )
    );
    let err = fx
        .docker
        .build_image(
            &context,
            "deploy/Missing.Dockerfile",
            &tag,
            &fx.labels("build"),
            &mut |_| {},
        )
        .await
        .expect_err("missing dockerfile");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot send the build context {context:?} of image {tag:?}: dockerfile \"deploy/Missing.Dockerfile\" does not exist"
        )
    );
    let broken = fx.context(
        "broken-ignore",
        &[
            ("Dockerfile", "FROM scratch\n"),
            (".dockerignore", "ok\na[bc\n"),
        ],
    );
    let err = fx
        .docker
        .build_image(
            &broken,
            "Dockerfile",
            &tag,
            &fx.labels("build"),
            &mut |_| {},
        )
        .await
        .expect_err("the .dockerignore is invalid");
    assert_eq!(
        err.to_string(),
        format!(
            "cannot send the build context {broken:?} of image {tag:?}: .dockerignore line 2: invalid pattern \"a[bc\": unclosed character class"
        )
    );
    let absolute = context.join("Dockerfile.bad");
    std::fs::write(&absolute, "FROM scratch\nFROBNICATE\n").expect("write");
    let err = fx
        .docker
        .build_image(
            &context,
            &absolute.display().to_string(),
            &tag,
            &fx.labels("build"),
            &mut |_| {},
        )
        .await
        .expect_err("unknown instruction");
    assert_eq!(
        err.to_string(),
        format!(
            "build of image {tag:?} failed: dockerfile parse error line 2: unknown instruction: FROBNICATE"
        )
    );
}

#[tokio::test]
async fn an_unreachable_engine_is_named_and_transient() {
    let docker = Docker::connect("unix:///nonexistent/docker.sock").expect("valid host");
    let err = docker
        .inspect("anything")
        .await
        .expect_err("nothing listens there");
    assert_eq!(
        err.to_string(),
        "cannot reach the docker engine at \"unix:///nonexistent/docker.sock\": socket \"/nonexistent/docker.sock\" does not exist"
    );
    assert!(err.is_transient());
    let err = Docker::connect("ftp://example").expect_err("not a docker host");
    assert_eq!(
        err.to_string(),
        "invalid docker host \"ftp://example\": expected \"unix:///PATH\" or \"tcp://HOST:PORT\""
    );
}
