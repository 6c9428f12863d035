//! Zero-downtime scopes: the API as a blue-green scope behind `moorline
//! edge`, deployed again and again under steady load from the load
//! generator. Every test asserts that no request failed.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use crate::harness::{self, Host, free_port, wait_for};
use crate::load::{Load, Tally};

/// The edge's listen address and the two slots of a host's API.
pub struct Edge {
    pub listen: SocketAddr,
    pub slots: [SocketAddr; 2],
}

impl Edge {
    fn new() -> Edge {
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Edge {
            listen: addr(free_port()),
            slots: [addr(free_port()), addr(free_port())],
        }
    }
}

/// Make the example's API a blue-green scope behind the edge: a template
/// unit whose instances listen on their slot's port, checked by path.
fn blue_green_api(work: &Path, edge: &Edge) {
    let section = format!(
        r#"strategy = "blue-green"

[scopes.api.edge]
listen = "{}"
slots = ["{}", "{}"]
drain = "2s"

[scopes.api.native]
units = ["app-api@.service"]
unit_files = ["deploy/units/app-api@.service"]
"#,
        edge.listen, edge.slots[0], edge.slots[1]
    );
    edge_api(work, &section);
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/fixtures/slot-server.py"),
        work.join("services/api/server.py"),
    )
    .expect("copy the slot server");
    std::fs::write(
        work.join("deploy/units/app-api@.service"),
        "[Unit]\nDescription=example app: API, slot %i\n\n[Service]\nType=simple\n\
         ExecStart=/usr/bin/python3 services/api/server.py ${MOORLINE_PORT}\n",
    )
    .expect("write template unit");
}

/// The API as a blue-green scope with both forms, owned by docker: its
/// container (busybox httpd serving `ok <version>` on 8080) is
/// `<prefix>app-api-<slot>`, publishing the slot's address.
fn docker_blue_green_api(work: &Path, edge: &Edge, prefix: &str) {
    blue_green_api(work, edge);
    let path = work.join("deploy/moorline.toml");
    let text = std::fs::read_to_string(&path).expect("read manifest");
    let text = text.replacen(
        "[scopes.api]\nowner = \"native\"",
        "[scopes.api]\nowner = \"docker\"",
        1,
    );
    std::fs::write(&path, text).expect("write manifest");
    api_container(work, prefix, "");
}

/// Give the API's edge scope its docker form: `<prefix>app-api`, the busybox
/// httpd image of the example on container port 8080, with `extra` keys.
fn api_container(work: &Path, prefix: &str, extra: &str) {
    let path = work.join("deploy/moorline.toml");
    let text = std::fs::read_to_string(&path).expect("read manifest");
    let text = text.replacen(
        "[[scopes.api.health]]",
        &format!(
            "[[scopes.api.docker.containers]]\nname = \"{prefix}app-api\"\nimage = \"{prefix}app-api\"\n\
             dockerfile = \"deploy/docker/api.Dockerfile\"\nport = 8080\n{extra}\n[[scopes.api.health]]"
        ),
        1,
    );
    std::fs::write(&path, text).expect("write manifest");
}

/// The API as a canary scope with `steps` (TOML), analysed every second.
fn canary_api(work: &Path, edge: &Edge, steps: &str) {
    blue_green_api(work, edge);
    let path = work.join("deploy/moorline.toml");
    let text = std::fs::read_to_string(&path).expect("read manifest");
    let text = text.replace(
        "strategy = \"blue-green\"\n",
        &format!(
            "strategy = \"canary\"\n\n[scopes.api.canary]\nsteps = {steps}\ninterval = \"1s\"\n\
             max_error_rate = 0.05\nmin_requests = 5\nfailure_limit = 2\n"
        ),
    );
    std::fs::write(&path, text).expect("write manifest");
}

/// An API that answers 500 to every third request.
fn flaky_api(work: &Path) {
    std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write");
    let path = work.join("services/api/server.py");
    let text = std::fs::read_to_string(&path).expect("read server");
    let text = text.replace(
        "        self.send_response(200)\n",
        "        Handler.served = getattr(Handler, \"served\", 0) + 1\n\
         \x20       self.send_response(500 if Handler.served % 3 == 0 else 200)\n",
    );
    assert!(text.contains("Handler.served % 3"), "the server was edited");
    std::fs::write(&path, text).expect("write server");
}

/// Make the example's API (one unit on its own port) a restart scope behind
/// the edge, whose new requests are held while it restarts.
fn held_api(work: &Path, edge: &Edge, api_port: u16) {
    let section = format!(
        r#"[scopes.api.edge]
listen = "{}"
slots = ["127.0.0.1:{api_port}"]
hold = "10s"
drain = "2s"

[scopes.api.native]
units = ["app-api.service"]
unit_files = ["deploy/units/app-api.service"]
"#,
        edge.listen
    );
    edge_api(work, &section);
}

/// Replace the example's API scope with one routed by the edge: `section`
/// is its strategy, edge and native form; it keeps its paths and build, is
/// checked by path, and has no docker form.
fn edge_api(work: &Path, section: &str) {
    edge_api_on(work, "native", section);
}

/// `edge_api` with the scope owned by `owner`.
fn edge_api_on(work: &Path, owner: &str, section: &str) {
    let path = work.join("deploy/moorline.toml");
    let text = std::fs::read_to_string(&path).expect("read manifest");
    let start = text.find("[scopes.api]").expect("an api scope");
    let end = text.find("[scopes.web]").expect("a web scope");
    let api = format!(
        r#"[scopes.api]
owner = "{owner}"
paths = ["services/api/", "packages/"]
build = ["./build-api.sh"]
settle = "1s"
{section}
[[scopes.api.health]]
http = "/health"
body_contains = "ok"

"#
    );
    let text = format!("{}{api}{}", &text[..start], &text[end..]);
    std::fs::write(&path, text).expect("write manifest");
}

fn api_version(version: &'static str) -> impl FnOnce(&Path) {
    move |work| {
        std::fs::write(work.join("services/api/VERSION"), format!("{version}\n")).expect("write")
    }
}

/// The host with the blue-green API deployed and the edge routing it.
fn edge_host() -> (Host, Edge, String) {
    let edge = Edge::new();
    let mut host = Host::with(|work| blue_green_api(work, &edge));
    let first = host.deployed();
    (host, edge, first)
}

/// The edge's status section.
fn edge_status(host: &Host) -> Value {
    host.json(&["status", "--json"])["edge"].clone()
}

/// Which slot of the API the edge sends requests to.
fn active_slot(host: &Host) -> u64 {
    let edge = edge_status(host);
    edge["routes"]["api"]["active"]
        .as_u64()
        .unwrap_or_else(|| panic!("no active slot: {edge:#}"))
}

fn assert_no_failure(tally: &Tally, at_least: usize) {
    assert!(
        tally.total() >= at_least,
        "the load ran: {} requests",
        tally.total()
    );
    assert_eq!(tally.failed(), Vec::<&crate::load::Answer>::new());
    assert_eq!(tally.not_ok(), 0, "{:?}", tally.by_status());
}

#[test]
fn blue_green_deploys_under_load_fail_no_request_and_a_crashing_commit_never_serves() {
    let (host, edge, _first) = edge_host();
    assert_eq!(
        host.unit_property("moorline-edge.service", "ActiveState"),
        "active",
        "the agent started the edge"
    );
    assert_eq!(active_slot(&host), 0);
    let load = Load::start(edge.listen, "/health", 60, 4);
    wait_for("the load to run", Duration::from_secs(10), || {
        (load.count() > 30).then_some(())
    });

    for (n, version) in ["v2", "v3", "v4"].into_iter().enumerate() {
        let commit = host.commit_and_push(&format!("api {version}"), api_version(version));
        let slot = (n as u64 + 1) % 2;
        let plan = String::from_utf8_lossy(&host.moorline(&["plan", &commit]).stdout).into_owned();
        assert!(
            plan.contains(&format!(
                "  api      native  deploy     paths services/api/ changed; build; to slot {slot}\n"
            )),
            "{plan}"
        );
        host.sync();
        let rollout = host.wait_rollout(&commit);
        assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
        assert_eq!(active_slot(&host), slot, "after {version}");
        let body = harness::http_get(edge.listen.port(), "/health").map(|(_, b)| b);
        assert!(
            body.as_deref()
                .is_some_and(|b| b.starts_with(&format!("ok {version} "))),
            "{body:?}"
        );
        // The old slot drained and stopped.
        let old = format!("app-api@{}.service", 1 - slot);
        wait_for("the old slot to stop", Duration::from_secs(20), || {
            (host.unit_property(&old, "ActiveState") == "inactive").then_some(())
        });
    }

    let crash = host.commit_and_push("api that dies", |work| {
        std::fs::write(
            work.join("services/api/server.py"),
            "import sys, time\ntime.sleep(0.5)\nsys.exit(1)\n",
        )
        .expect("write");
    });
    host.sync();
    let rollout = host.wait_rollout(&crash);
    assert_eq!(rollout["outcome"], "rolled-back", "{rollout:#}");
    assert_eq!(active_slot(&host), 1, "the serving slot never changed");
    wait_for("the failed slot to stop", Duration::from_secs(20), || {
        (host.unit_property("app-api@0.service", "ActiveState") != "active").then_some(())
    });

    let tally = load.finish();
    assert_no_failure(&tally, 200);
    let bodies = tally.bodies();
    for version in ["v1", "v2", "v3", "v4"] {
        assert!(
            bodies
                .iter()
                .any(|b| b.starts_with(&format!("ok {version} "))),
            "{version} served"
        );
    }
    assert!(
        bodies.last().is_some_and(|b| b.starts_with("ok v4 ")),
        "v4 serves after the crashing commit"
    );
}

#[test]
fn a_restart_scope_with_hold_deploys_under_load_with_requests_paused_not_failed() {
    let edge = Edge::new();
    let mut host = Host::new_with_ports(|work, api_port| held_api(work, &edge, api_port));
    host.deployed();
    let load = Load::start(edge.listen, "/health", 60, 4);
    wait_for("the load to run", Duration::from_secs(10), || {
        (load.count() > 30).then_some(())
    });
    let mut invocations = vec![host.unit_property("app-api.service", "InvocationID")];
    for version in ["v2", "v3", "v4"] {
        let commit = host.commit_and_push(&format!("api {version}"), api_version(version));
        host.sync();
        let rollout = host.wait_rollout(&commit);
        assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
        let steps = steps(&rollout);
        assert!(
            steps.iter().any(|s| s.starts_with("hold new requests to ")),
            "{steps:?}"
        );
        invocations.push(host.unit_property("app-api.service", "InvocationID"));
    }
    let tally = load.finish();
    assert_no_failure(&tally, 200);
    invocations.dedup();
    assert_eq!(
        invocations.len(),
        4,
        "the one unit restarted at each deploy"
    );
    assert!(
        tally
            .bodies()
            .last()
            .is_some_and(|b| b.starts_with("ok v4 ")),
        "v4 serves"
    );
    // Requests were held while the instance restarted: some waited.
    assert!(
        tally.latency(100.0) > Duration::from_millis(50),
        "the longest wait was {:?}",
        tally.latency(100.0)
    );
}

/// The journal steps of a rollout, each once (its intent and its result
/// are two entries).
fn steps(rollout: &Value) -> Vec<String> {
    let mut steps: Vec<String> = rollout["journal"]
        .as_array()
        .expect("a journal")
        .iter()
        .filter_map(|j| j["step"].as_str().map(str::to_string))
        .collect();
    steps.dedup();
    steps
}

#[test]
fn a_canary_that_answers_500_to_a_third_is_rolled_back_by_the_analysis() {
    let edge = Edge::new();
    let mut host = Host::with(|work| canary_api(work, &edge, "[{ weight = 20, soak = \"5s\" }]"));
    host.deployed();
    let load = Load::start(edge.listen, "/", 60, 4);
    wait_for("the load to run", Duration::from_secs(10), || {
        (load.count() > 30).then_some(())
    });
    let flaky = host.commit_and_push("api that fails a third", flaky_api);
    host.sync();
    let rollout = host.wait_rollout(&flaky);
    let tally = load.finish();
    assert_eq!(rollout["outcome"], "rolled-back", "{rollout:#}");
    let error = rollout["error"].as_str().expect("an error");
    assert!(
        error.contains("the canary of scope \"api\" failed at step 1 (20%): error rate "),
        "{error}"
    );
    let analysis = rollout["analysis"].as_array().expect("analysis");
    assert!(analysis.len() >= 2, "{analysis:?}");
    let last = &analysis[analysis.len() - 1];
    assert!(
        last["verdict"]
            .as_str()
            .is_some_and(|v| v.starts_with("fail: error rate ")),
        "{last}"
    );
    assert_eq!(active_slot(&host), 0, "back on the old slot");
    assert!(
        steps(&rollout)
            .iter()
            .any(|s| s.starts_with("route 20% of "))
    );

    // No request failed; the 500s came from the canary only, at about its
    // weight times its error rate (0.2 × 1/3) of what clients sent while it
    // took traffic.
    assert_eq!(tally.failed(), Vec::<&crate::load::Answer>::new());
    let codes: Vec<u16> = tally
        .answers
        .iter()
        .map(|(_, a, _)| match a {
            crate::load::Answer::Status(code, _) => *code,
            crate::load::Answer::Failed(_) => 0,
        })
        .collect();
    let first = codes
        .iter()
        .position(|c| *c == 500)
        .expect("the canary answered 500s");
    let last = codes.iter().rposition(|c| *c == 500).expect("500s");
    let window = &codes[first..=last];
    let share = window.iter().filter(|c| **c == 500).count() as f64 / window.len() as f64;
    assert!(
        (0.03..0.15).contains(&share),
        "share of 500s while the canary ran: {share:.3} of {}",
        window.len()
    );
    assert_eq!(
        codes.iter().filter(|c| !matches!(c, 200 | 500)).count(),
        0,
        "{:?}",
        tally.by_status()
    );
    // `show` prints every interval.
    let id = rollout["id"].to_string();
    let shown = String::from_utf8_lossy(&host.moorline(&["show", &id]).stdout).into_owned();
    assert!(shown.contains("\ncanary analysis:\n"), "{shown}");
    assert!(shown.contains(" api step 1 (20%): "), "{shown}");
}

#[test]
fn a_good_canary_is_promoted_step_by_step_to_every_request() {
    let edge = Edge::new();
    let mut host = Host::with(|work| {
        canary_api(
            work,
            &edge,
            "[{ weight = 20, soak = \"4s\" }, { weight = 60, soak = \"2s\" }]",
        )
    });
    host.deployed();
    let load = Load::start(edge.listen, "/", 60, 4);
    wait_for("the load to run", Duration::from_secs(10), || {
        (load.count() > 30).then_some(())
    });
    let good = host.commit_and_push("api v2", api_version("v2"));
    host.sync();
    // Status shows the split while the canary runs.
    let weights = wait_for("the canary's first step", Duration::from_secs(60), || {
        let route = edge_status(&host)["routes"]["api"].clone();
        let weights: Vec<u64> = route["slots"]
            .as_array()?
            .iter()
            .filter_map(|s| s["weight"].as_u64())
            .collect();
        (weights == [80, 20]).then_some(weights)
    });
    assert_eq!(weights, [80, 20]);
    let text = String::from_utf8_lossy(&host.moorline(&["status"]).stdout).into_owned();
    assert!(text.contains(" -> slot 0 80% / slot 1 20%\n"), "{text}");
    assert!(text.contains("\n    slot 1 "), "{text}");
    let rollout = host.wait_rollout(&good);
    let tally = load.finish();
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_no_failure(&tally, 200);
    assert_eq!(active_slot(&host), 1);
    let analysis = rollout["analysis"].as_array().expect("analysis");
    let passed: Vec<u64> = analysis
        .iter()
        .filter(|i| i["verdict"] == "pass")
        .filter_map(|i| i["step"].as_u64())
        .collect();
    assert!(passed.contains(&1) && passed.contains(&2), "{analysis:?}");
    let steps = steps(&rollout);
    let order: Vec<&String> = steps.iter().filter(|s| s.starts_with("route ")).collect();
    assert_eq!(order.len(), 3, "{steps:?}");
    assert!(order[0].starts_with("route 20% of "), "{order:?}");
    assert!(order[1].starts_with("route 60% of "), "{order:?}");
    assert!(order[2].contains(" to slot 1 "), "{order:?}");
    assert!(
        tally
            .bodies()
            .last()
            .is_some_and(|b| b.starts_with("ok v2 "))
    );
}

/// A WebSocket client, just enough for the echo of the slot server.
struct WebSocket(TcpStream);

impl WebSocket {
    fn open(addr: SocketAddr) -> WebSocket {
        let mut stream = TcpStream::connect(addr).expect("connect to the edge");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            stream,
            "GET /chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .expect("handshake");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).expect("handshake answer");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert!(
            head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "the server's accept key came through: {head}"
        );
        WebSocket(stream)
    }

    /// Send `text` and read the echo; `None` once the connection closed.
    fn echo(&mut self, text: &str) -> Option<String> {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | text.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.0.write_all(&frame).ok()?;
        let mut head = [0u8; 2];
        self.0.read_exact(&mut head).ok()?;
        let mut data = vec![0u8; usize::from(head[1] & 0x7f)];
        self.0.read_exact(&mut data).ok()?;
        Some(String::from_utf8_lossy(&data).into_owned())
    }
}

#[test]
fn a_websocket_stays_open_across_a_deploy_until_the_drain_ends() {
    let (host, edge, _first) = edge_host();
    let load = Load::start(edge.listen, "/", 60, 4);
    let mut socket = WebSocket::open(edge.listen);
    assert_eq!(socket.echo("hello").as_deref(), Some("v1: hello"));
    let v2 = host.commit_and_push("api v2", api_version("v2"));
    host.sync();
    wait_for("the switch to slot 1", Duration::from_secs(60), || {
        (edge_status(&host)["routes"]["api"]["active"] == 1).then_some(())
    });
    let switched = Instant::now();
    // New requests go to v2; the socket opened before stays on v1.
    let body = harness::http_get(edge.listen.port(), "/").map(|(_, b)| b);
    assert!(
        body.as_deref().is_some_and(|b| b.starts_with("ok v2 ")),
        "{body:?}"
    );
    assert_eq!(
        socket.echo("still there").as_deref(),
        Some("v1: still there")
    );
    let rollout = host.wait_rollout(&v2);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert!(
        steps(&rollout)
            .iter()
            .any(|s| s.starts_with("drain slot 0 ")),
        "{rollout:#}"
    );
    // The drain lasted its 2 s for the open socket, then slot 0 stopped.
    assert!(
        switched.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        switched.elapsed()
    );
    assert_eq!(
        socket.echo("gone?"),
        None,
        "closed when the old slot stopped"
    );
    assert_eq!(
        host.unit_property("app-api@0.service", "ActiveState"),
        "inactive"
    );
    let fresh = WebSocket::open(edge.listen).echo("hi");
    assert_eq!(fresh.as_deref(), Some("v2: hi"));
    assert_no_failure(&load.finish(), 100);
}

#[test]
fn the_edge_killed_comes_back_with_its_routes() {
    let (host, edge, _first) = edge_host();
    let before = edge_status(&host)["pid"].as_u64().expect("the edge's pid");
    let table = host.state_dir().join("edge/routes.json");
    let mode = std::fs::metadata(&table).expect("the table is on disk");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    host.um
        .systemctl(&["kill", "--signal=KILL", "moorline-edge.service"]);
    let after = wait_for(
        "systemd to start the edge again",
        Duration::from_secs(20),
        || {
            let pid = edge_status(&host)["pid"].as_u64()?;
            (pid != before).then_some(pid)
        },
    );
    assert_ne!(after, before);
    let body = wait_for("the route back", Duration::from_secs(10), || {
        harness::http_get(edge.listen.port(), "/").map(|(_, b)| b)
    });
    assert!(body.starts_with("ok v1 "), "{body}");
    assert_eq!(active_slot(&host), 0);
}

/// Kill the agent at `point` of a deploy of v2 under load: traffic flows
/// on while it is dead, and once it is back the deploy converges with
/// nothing lost.
#[cfg(feature = "fault-injection")]
fn killed_mid_deploy_drops_nothing(point: &str, canary: bool) {
    let edge = Edge::new();
    let mut host = Host::with(|work| match canary {
        true => canary_api(work, &edge, "[{ weight = 30, soak = \"2s\" }]"),
        false => blue_green_api(work, &edge),
    });
    host.deployed_then_stopped();
    let load = Load::start(edge.listen, "/", 60, 4);
    wait_for("the load to run", Duration::from_secs(10), || {
        (load.count() > 30).then_some(())
    });
    let v2 = crate::crash::kill_at(&mut host, point, "api v2", api_version("v2"));
    let dead = load.count();
    wait_for(
        "traffic while the agent is dead",
        Duration::from_secs(10),
        || (load.count() > dead + 60).then_some(()),
    );
    let retried = crate::crash::retried_after_interruption(&mut host, &v2, None);
    assert_eq!(retried["outcome"], "succeeded", "{retried:#}");
    let serving = active_slot(&host);
    let idle = format!("app-api@{}.service", 1 - serving);
    wait_for("the idle slot to stop", Duration::from_secs(30), || {
        (host.unit_property(&idle, "ActiveState") == "inactive").then_some(())
    });
    let tally = load.finish();
    assert_no_failure(&tally, 150);
    assert!(
        tally
            .bodies()
            .last()
            .is_some_and(|b| b.starts_with("ok v2 ")),
        "v2 serves"
    );
    let rollouts = crate::crash::rollouts_of(&host, &v2);
    let outcomes: Vec<&str> = rollouts
        .iter()
        .filter_map(|r| r["outcome"].as_str())
        .collect();
    assert_eq!(outcomes, ["interrupted", "succeeded"]);
}

#[cfg(feature = "fault-injection")]
#[test]
fn the_agent_killed_with_the_new_slot_started_drops_no_request() {
    killed_mid_deploy_drops_nothing("after-slot-start", false);
}

#[cfg(feature = "fault-injection")]
#[test]
fn the_agent_killed_right_after_the_switch_drops_no_request() {
    killed_mid_deploy_drops_nothing("after-route", false);
}

#[cfg(feature = "fault-injection")]
#[test]
fn the_agent_killed_during_a_canary_drops_no_request() {
    killed_mid_deploy_drops_nothing("during-canary", true);
}

#[cfg(feature = "fault-injection")]
#[test]
fn the_agent_killed_with_the_new_slot_pointed_at_its_release_drops_no_request() {
    killed_mid_deploy_drops_nothing("after-stop", false);
}

#[cfg(feature = "fault-injection")]
#[test]
fn the_agent_killed_while_verifying_through_the_edge_drops_no_request() {
    killed_mid_deploy_drops_nothing("during-verify", false);
}

/// Killed while the old slot drains an open WebSocket: at start-up the
/// audit finishes the drain and stops the old slot, recorded in history.
#[cfg(feature = "fault-injection")]
#[test]
fn the_agent_killed_during_the_drain_leaves_the_old_slot_to_the_audit() {
    let (mut host, edge, _first) = edge_host();
    host.stop_agent();
    let mut socket = WebSocket::open(edge.listen);
    assert_eq!(socket.echo("hello").as_deref(), Some("v1: hello"));
    let v2 = crate::crash::kill_at(&mut host, "during-drain", "api v2", api_version("v2"));
    assert_eq!(socket.echo("after").as_deref(), Some("v1: after"));
    assert_eq!(
        host.unit_property("app-api@0.service", "ActiveState"),
        "active"
    );
    host.start_agent();
    let audit = wait_for("the audit of the old slot", Duration::from_secs(30), || {
        host.history()
            .into_iter()
            .find(|r| r["trigger"] == "audit" && r["outcome"] == "succeeded")
    });
    let reason = crate::scope(&audit, "api")["reason"].clone();
    assert_eq!(
        reason,
        "app-api@0.service was running in the slot the edge does not serve; drained and stopped it"
    );
    assert_eq!(
        host.unit_property("app-api@0.service", "ActiveState"),
        "inactive"
    );
    assert_eq!(socket.echo("gone?"), None);
    let body = harness::http_get(edge.listen.port(), "/").map(|(_, b)| b);
    assert!(
        body.as_deref().is_some_and(|b| b.starts_with("ok v2 ")),
        "{body:?}"
    );
    // The killed rollout had recorded the scopes as switched: the next one
    // only records the commit as deployed, touching nothing.
    let rollouts = crate::crash::rollouts_of(&host, &v2);
    let outcomes: Vec<&Value> = rollouts.iter().map(|r| &r["outcome"]).collect();
    assert_eq!(outcomes, ["interrupted", "succeeded"]);
    assert_eq!(crate::scope(&rollouts[1], "api")["action"], "unchanged");
    assert_eq!(steps(&rollouts[1]), Vec::<String>::new());
}

/// Docker's blue-green containers, then cutovers to native and back, all
/// under load: the new owner's instance starts in the idle slot and the
/// edge switches to it before the old owner's drains and stops.
#[test]
fn a_docker_blue_green_scope_deploys_and_cuts_over_both_ways_under_load() {
    let edge = Edge::new();
    let mut host =
        Host::with_host(|work, host| docker_blue_green_api(work, &edge, &host.container("")));
    let first = host.deployed();
    let (c0, c1) = (host.container("app-api-0"), host.container("app-api-1"));
    let running = |name: &str| {
        harness::docker(&["inspect", "-f", "{{.State.Running}}", name])
            .stdout
            .starts_with(b"true")
    };
    assert!(running(&c0), "slot 0 runs the container");
    assert_eq!(active_slot(&host), 0);
    let load = Load::start(edge.listen, "/health", 60, 4);
    wait_for("the load to run", Duration::from_secs(10), || {
        (load.count() > 30).then_some(())
    });

    let v2 = host.commit_and_push("api v2", api_version("v2"));
    host.sync();
    assert_eq!(host.wait_rollout(&v2)["outcome"], "succeeded");
    assert_eq!(active_slot(&host), 1);
    assert!(running(&c1));
    wait_for("slot 0's container to go", Duration::from_secs(30), || {
        (!running(&c0)).then_some(())
    });

    let to_native = host.commit_and_push("api: native", |work| {
        crate::harness::set_owner(work, "api", "native")
    });
    host.sync();
    let rollout = host.wait_rollout(&to_native);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(crate::scope(&rollout, "api")["action"], "cutover");
    assert_eq!(active_slot(&host), 0, "native took the idle slot");
    assert_eq!(
        host.unit_property("app-api@0.service", "ActiveState"),
        "active"
    );
    wait_for("docker's container to go", Duration::from_secs(30), || {
        (!running(&c1)).then_some(())
    });

    let to_docker = host.commit_and_push("api: docker again", |work| {
        crate::harness::set_owner(work, "api", "docker")
    });
    host.sync();
    let rollout = host.wait_rollout(&to_docker);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    assert_eq!(active_slot(&host), 1);
    assert!(running(&c1));
    wait_for("the native slot to stop", Duration::from_secs(30), || {
        (host.unit_property("app-api@0.service", "ActiveState") == "inactive").then_some(())
    });

    let tally = load.finish();
    assert_no_failure(&tally, 300);
    let bodies = tally.bodies();
    assert!(
        bodies.iter().any(|b| b.contains(" slot 0")),
        "native served"
    );
    assert!(
        bodies.last().is_some_and(|b| b.starts_with("ok v2")),
        "{:?}",
        bodies.last()
    );
    let _ = first;
}

/// A restart scope behind the edge cut over to docker and back under load:
/// strict exclusivity (sampled through both runtimes' APIs) and, with new
/// requests held while one owner stops and the other starts, no failure.
/// (The container stops at SIGTERM: a PID 1 that ignores it takes docker's
/// 10 s stop timeout, as long as the hold.)
#[test]
fn a_held_restart_scope_cuts_over_both_ways_running_once_and_failing_nothing() {
    let edge = Edge::new();
    let mut host = Host::with_host(|work, host| {
        held_api(work, &edge, host.api_port);
        api_container(
            work,
            &host.container(""),
            "command = [\"/bin/busybox\", \"sh\", \"-c\", \"trap 'exit 0' TERM; /bin/busybox httpd -f -p 8080 -h /www & wait\"]\n",
        );
    });
    host.deployed();
    let api = host.container("app-api");
    let load = Load::start(edge.listen, "/health", 60, 4);
    wait_for("the load to run", Duration::from_secs(10), || {
        (load.count() > 30).then_some(())
    });
    let sampler = crate::docker::Exclusivity::watch(&host, "app-api.service", &api);
    for owner in ["docker", "native"] {
        let commit = host.commit_and_push(&format!("api: {owner}"), |work| {
            crate::harness::set_owner(work, "api", owner)
        });
        host.sync();
        let rollout = host.wait_rollout(&commit);
        assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
        assert_eq!(crate::scope(&rollout, "api")["action"], "cutover");
        let steps = steps(&rollout);
        let hold = steps
            .iter()
            .position(|s| s.starts_with("hold new requests to "));
        let stop = steps
            .iter()
            .position(|s| s == "stop app-api.service" || s == &format!("stop container {api}"));
        assert!(
            hold.is_some() && hold < stop,
            "held before the old owner stopped: {steps:?}"
        );
    }
    assert!(
        sampler.finish() > 20,
        "the sampler ran through both cutovers"
    );
    let tally = load.finish();
    assert_no_failure(&tally, 200);
}

/// The edge stopped while the agent was down (a reboot: nothing enabled
/// it): the start-up audit finds the scope down and its repair starts the
/// edge again, with its routes.
#[test]
fn an_edge_that_is_down_at_start_up_is_started_again() {
    let (mut host, edge, first) = edge_host();
    host.stop_agent();
    let before = crate::crash::rollouts_of(&host, &first).len();
    host.um.systemctl(&["stop", "moorline-edge.service"]);
    assert_eq!(harness::http_get(edge.listen.port(), "/"), None);
    host.start_agent();
    let body = wait_for("the edge to serve again", Duration::from_secs(60), || {
        harness::http_get(edge.listen.port(), "/").map(|(_, b)| b)
    });
    assert!(body.starts_with("ok v1 "), "{body}");
    let repair = wait_for("the repair", Duration::from_secs(60), || {
        let rollouts = crate::crash::rollouts_of(&host, &first);
        rollouts
            .get(before)
            .filter(|r| r["outcome"] != "in-progress")
            .cloned()
    });
    assert_eq!(repair["outcome"], "succeeded", "{repair:#}");
    assert_eq!(
        host.unit_property("moorline-edge.service", "ActiveState"),
        "active"
    );
}

/// A canary that never gets enough requests to judge (min_requests far
/// above what its weight brings) is never passed: after three times its
/// soak it rolls back as `inconclusive`, and the old slot served on.
#[test]
fn a_canary_that_stays_inconclusive_rolls_back_after_three_soaks() {
    let edge = Edge::new();
    let mut host = Host::with(|work| {
        canary_api(work, &edge, "[{ weight = 10, soak = \"1s\" }]");
        let path = work.join("deploy/moorline.toml");
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let text = text.replace("min_requests = 5\n", "min_requests = 1000\n");
        std::fs::write(&path, text).expect("write manifest");
    });
    host.deployed();
    let load = Load::start(edge.listen, "/", 60, 4);
    let v2 = host.commit_and_push("api v2", api_version("v2"));
    host.sync();
    let rollout = host.wait_rollout(&v2);
    let tally = load.finish();
    assert_eq!(rollout["outcome"], "rolled-back", "{rollout:#}");
    assert_eq!(
        rollout["error"],
        "switching scope \"api\" failed: the canary of scope \"api\" failed at step 1 (10%): inconclusive"
    );
    let analysis = rollout["analysis"].as_array().expect("analysis");
    assert!(
        analysis.len() >= 3,
        "three soaks of 1 s at 1 s intervals: {analysis:?}"
    );
    assert!(
        analysis.iter().all(|i| i["verdict"]
            .as_str()
            .is_some_and(|v| v.starts_with("inconclusive ("))),
        "{analysis:?}"
    );
    assert_eq!(active_slot(&host), 0);
    assert_no_failure(&tally, 100);
}
