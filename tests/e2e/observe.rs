//! What an operator sees from the tools they run: `/metrics` read by a real
//! OpenMetrics parser (the Python `prometheus_client` one), the dashboard
//! loaded in a real headless Chromium, and the token that guards an
//! `[http] listen` off loopback.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Host, free_port, http_get, wait_for};

/// Add `[http]` with this body to the host's config.
fn serve_http(host: &Host, body: &str) {
    let path = host.config_path();
    let mut text = std::fs::read_to_string(&path).expect("read config");
    text.push_str(&format!("\n[http]\n{body}"));
    std::fs::write(&path, text).expect("write config");
}

/// GET with extra request headers: the status and body.
fn get_with(port: u16, path: &str, headers: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{headers}\r\n"
    )
    .expect("write request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read answer");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The samples of an exposition, as the OpenMetrics parser of Python's
/// `prometheus_client` reads them (it refuses text that breaks the format):
/// `[{"name", "labels", "value"}]`.
fn parsed(text: &str) -> Vec<Value> {
    const PARSE: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
samples = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        samples.append({"family": family.name, "type": family.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(samples))
"#;
    let mut child = Command::new("python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write exposition");
    let out = child.wait_with_output().expect("parser ends");
    assert!(
        out.status.success(),
        "the parser refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("parser prints JSON") {
        Value::Array(samples) => samples,
        other => panic!("not a list: {other}"),
    }
}

/// The value of sample `name` with exactly these labels.
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples.iter().find_map(|s| {
        let same = s["name"] == name
            && s["labels"].as_object().is_some_and(|l| {
                l.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            });
        same.then(|| s["value"].as_f64().expect("a number"))
    })
}

#[test]
fn metrics_count_succeeded_rolled_back_failed_and_refused_rollouts_in_the_openmetrics_format() {
    let port = free_port();
    let mut host = Host::new();
    serve_http(&host, &format!("listen = \"127.0.0.1:{port}\"\n"));
    // Only signed heads deploy: the work tree signs every commit with a
    // trusted key, and one unsigned commit at the end is refused.
    let key = host.root.path().join("signing-key");
    crate::remotes::keygen(&key);
    let public = std::fs::read_to_string(key.with_extension("pub")).expect("public key");
    let signers = host.root.path().join("allowed_signers");
    std::fs::write(&signers, format!("dev@example.com {public}")).expect("signers");
    let mut config = std::fs::read_to_string(host.config_path()).expect("config");
    config.push_str(&format!(
        "\n[source.verify]\nallowed_signers = \"{}\"\ncommits = \"tip\"\n",
        signers.display()
    ));
    std::fs::write(host.config_path(), config).expect("config");
    let work = host.work();
    let key_text = key.to_str().expect("utf-8");
    for setting in [
        ["gpg.format", "ssh"],
        ["user.signingkey", key_text],
        ["commit.gpgsign", "true"],
    ] {
        crate::harness::git(&work, &["config", setting[0], setting[1]]);
    }
    host.commit_and_push("signed head", |_| {});
    let v1 = host.deployed();
    let crash = host.commit_and_push("api that dies", crate::core::api_that_never_answers);
    host.sync();
    assert_eq!(host.wait_rollout(&crash)["outcome"], "rolled-back");
    let bad = host.commit_and_push("a manifest of a newer version", |work| {
        let path = work.join("deploy/moorline.toml");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replace("version = 1", "version = 9")).expect("write");
    });
    host.sync();
    assert_eq!(host.wait_rollout(&bad)["outcome"], "failed");
    crate::harness::git(&work, &["config", "commit.gpgsign", "false"]);
    let unsigned = host.commit_and_push("unsigned", |work| {
        let path = work.join("deploy/moorline.toml");
        let text = std::fs::read_to_string(&path).expect("read");
        std::fs::write(&path, text.replace("version = 9", "version = 1")).expect("write");
    });
    host.sync();
    assert_eq!(host.wait_rollout(&unsigned)["outcome"], "refused");

    let samples = wait_for(
        "the refused rollout counted",
        Duration::from_secs(30),
        || {
            let (status, text) = http_get(port, "/metrics")?;
            assert_eq!(status, 200, "{text}");
            let samples = parsed(&text);
            let refused = sample(
                &samples,
                "moorline_rollouts_total",
                &[("outcome", "refused")],
            );
            (refused == Some(1.0)).then_some(samples)
        },
    );
    let count = |outcome| sample(&samples, "moorline_rollouts_total", &[("outcome", outcome)]);
    assert_eq!(count("succeeded"), Some(1.0));
    assert_eq!(count("rolled-back"), Some(1.0));
    assert_eq!(count("failed"), Some(1.0));
    assert_eq!(count("refused"), Some(1.0));
    // Every turn fetched; none failed.
    let fetches = sample(&samples, "moorline_fetches_total", &[("result", "ok")]);
    assert!(fetches.is_some_and(|n| n >= 4.0), "{fetches:?}");
    assert_eq!(
        sample(&samples, "moorline_fetches_total", &[("result", "error")]),
        None
    );
    // The rolled-back api runs v1 again, healthy.
    let api = [("scope", "api"), ("owner", "native")];
    assert_eq!(sample(&samples, "moorline_scope_healthy", &api), Some(1.0));
    let info = [
        ("scope", "api"),
        ("owner", "native"),
        ("release", v1.as_str()),
    ];
    assert_eq!(sample(&samples, "moorline_scope_info", &info), Some(1.0));
    // All four fetched; the refused one and the one with a bad manifest
    // ended before their plan; the two others verified.
    let phase = |name| {
        sample(
            &samples,
            "moorline_rollout_phase_seconds_count",
            &[("phase", name)],
        )
    };
    assert_eq!(phase("fetch"), Some(4.0));
    assert_eq!(phase("plan"), Some(2.0));
    assert_eq!(phase("verify"), Some(2.0));
    let last = sample(&samples, "moorline_last_rollout_timestamp_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        last.is_some_and(|t| t > now - 300.0 && t <= now),
        "{last:?}"
    );
    // The HTTP side changes nothing.
    let (status, body) = get_with(port, "/api/status", "");
    assert_eq!(status, 200);
    let status_json: Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(
        status_json["source"]["deployed_commit"],
        crash_parent(&host, &crash)
    );
}

/// The commit before `commit` (the deployed one after it rolled back).
fn crash_parent(host: &Host, commit: &str) -> String {
    crate::harness::git(&host.work(), &["rev-parse", &format!("{commit}^")])
}

#[test]
fn an_http_listen_off_loopback_needs_a_token_and_refuses_requests_without_it() {
    let port = free_port();
    let mut host = Host::new();
    serve_http(&host, &format!("listen = \"0.0.0.0:{port}\"\n"));
    let refused = host.moorline(&["status"]);
    assert_eq!(refused.status.code(), Some(2));
    let config = host.config_path().display().to_string();
    let text = std::fs::read_to_string(host.config_path()).expect("config");
    let line = text
        .lines()
        .position(|l| l.starts_with("listen = \"0.0.0.0"))
        .expect("line")
        + 1;
    assert_eq!(
        String::from_utf8_lossy(&refused.stderr),
        format!(
            "{config}:{line}:10: [http] listen 0.0.0.0:{port} is not a loopback address: set token_file, whose token every request must then carry (Authorization: Bearer TOKEN)\n"
        )
    );

    let token_file = host.home().join(".config/moorline/http.token");
    std::fs::write(&token_file, "s3cret-token\n").expect("token");
    std::fs::write(
        host.config_path(),
        text.replace(
            &format!("listen = \"0.0.0.0:{port}\"\n"),
            &format!(
                "listen = \"0.0.0.0:{port}\"\ntoken_file = \"{}\"\n",
                token_file.display()
            ),
        ),
    )
    .expect("config");
    host.deployed();
    for path in ["/metrics", "/", "/api/status"] {
        let (status, body) = get_with(port, path, "");
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(
            body,
            "this moorline needs its token: Authorization: Bearer TOKEN\n"
        );
        let (status, _) = get_with(port, path, "Authorization: Bearer wrong-token!\r\n");
        assert_eq!(status, 401, "{path}");
        let (status, body) = get_with(port, path, "Authorization: Bearer s3cret-token\r\n");
        assert_eq!(status, 200, "{path}: {body}");
    }
    let (status, _) = get_with(port, "/api/status?token=s3cret-token", "");
    assert_eq!(status, 200);
    // Read-only: nothing but GET.
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(
        stream,
        "POST /api/status HTTP/1.0\r\nAuthorization: Bearer s3cret-token\r\nContent-Length: 0\r\n\r\n"
    )
    .expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.0 405"), "{answer}");
    // The token is in no log line.
    assert!(!host.agent_log().contains("s3cret-token"));
}

#[test]
fn the_dashboard_renders_in_headless_chromium_without_console_errors() {
    let port = free_port();
    let mut host = Host::new();
    serve_http(&host, &format!("listen = \"127.0.0.1:{port}\"\n"));
    let v1 = host.deployed();
    let latest = host.history()[0]["id"].as_u64().expect("an id");
    let profile = tempfile::tempdir().expect("profile dir");
    let artifacts = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&artifacts).expect("artifact dir");
    let screenshot = artifacts.join("dashboard.png");
    let url = format!("http://127.0.0.1:{port}/");
    let chromium = |extra: &[&str]| {
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--v=0",
                "--window-size=1280,900",
                "--virtual-time-budget=8000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("chromium runs (apt-get install chromium)");
        assert!(out.status.success(), "{out:?}");
        out
    };
    let dom = chromium(&["--dump-dom"]);
    let html = String::from_utf8_lossy(&dom.stdout).into_owned();
    let console = String::from_utf8_lossy(&dom.stderr).into_owned();
    let errors: Vec<&str> = console
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught"))
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    for scope in ["api", "web", "workers"] {
        assert!(
            html.contains(&format!("<tr data-scope=\"{scope}\">")),
            "{scope}: {html}"
        );
    }
    assert!(
        html.contains(&format!("<tr data-rollout=\"{latest}\"")),
        "{html}"
    );
    assert!(html.contains(&v1[..7]), "{html}");
    assert!(html.contains("Rollout ".to_string().as_str()) && html.contains("succeeded"));
    chromium(&[&format!("--screenshot={}", screenshot.display())]);
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 10_000, "an empty page is smaller");
}

/// A notification receiver on loopback: answers 500 to the first `fail`
/// requests, then 200; keeps every request it got (headers, body).
struct Receiver {
    port: u16,
    got: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl Receiver {
    fn start(fail: usize) -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&got);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                let (head, body) = loop {
                    let n = stream.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break (String::new(), String::new());
                    }
                    data.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&data).into_owned();
                    let Some((head, body)) = text.split_once("\r\n\r\n") else {
                        continue;
                    };
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if body.len() >= length {
                        break (head.to_string(), body.to_string());
                    }
                };
                let mut all = seen.lock().expect("lock");
                all.push((head, body));
                let status = if all.len() <= fail {
                    "500 Internal Server Error"
                } else {
                    "200 OK"
                };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Receiver { port, got }
    }

    fn requests(&self) -> Vec<(String, String)> {
        self.got.lock().expect("lock").clone()
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn notifications_are_signed_retried_and_a_failing_target_is_shown() {
    use hmac::{KeyInit, Mac};
    let receiver = Receiver::start(2);
    let closed = free_port();
    let mut host = Host::new();
    let secret_file = host.home().join(".config/moorline/notify.secret");
    std::fs::write(&secret_file, "hmac-key-for-tests\n").expect("secret");
    let mut config = std::fs::read_to_string(host.config_path()).expect("config");
    config.push_str(&format!(
        "\n[[notify]]\nname = \"receiver\"\nurl = \"http://127.0.0.1:{}/hook\"\nsecret_file = \"{}\"\nevents = [\"succeeded\", \"rolled-back\"]\n\n[[notify]]\nurl = \"http://127.0.0.1:{closed}/path-with-SECRETPATH\"\nformat = \"slack\"\nevents = [\"succeeded\"]\n",
        receiver.port,
        secret_file.display()
    ));
    std::fs::write(host.config_path(), config).expect("config");
    let v1 = host.deployed();

    // The first message: refused twice, delivered on the third try.
    let requests = wait_for(
        "the succeeded message delivered",
        Duration::from_secs(30),
        || {
            let got = receiver.requests();
            (got.len() == 3).then_some(got)
        },
    );
    let verify = |head: &str, body: &str| {
        let mut mac =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hmac-key-for-tests").expect("key");
        mac.update(body.as_bytes());
        let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(
            header(head, "x-moorline-signature"),
            Some(want.as_str()),
            "{head}"
        );
    };
    for (head, body) in &requests {
        verify(head, body);
        assert_eq!(body, &requests[0].1, "a retry sends the same message");
    }
    let message: Value = serde_json::from_str(&requests[2].1).expect("JSON");
    assert_eq!(message["event"], "succeeded");
    assert_eq!(message["commit"], v1.as_str());
    assert_eq!(message["outcome"], "succeeded");
    assert_eq!(message["trigger"], "startup");
    assert!(message["host"].as_str().is_some_and(|h| !h.is_empty()));
    let scopes: Vec<&str> = message["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .map(|s| s["scope"].as_str().expect("name"))
        .collect();
    assert_eq!(scopes, ["api", "web", "workers"]);

    let crash = host.commit_and_push("api that dies", crate::core::api_that_never_answers);
    host.sync();
    assert_eq!(host.wait_rollout(&crash)["outcome"], "rolled-back");
    let (head, body) = wait_for("the rolled-back message", Duration::from_secs(30), || {
        receiver.requests().get(3).cloned()
    });
    verify(&head, &body);
    let message: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(message["event"], "rolled-back");
    assert_eq!(message["previous_commit"], v1.as_str());
    assert_eq!(message["commit"], crash.as_str());
    assert!(
        message["reason"]
            .as_str()
            .is_some_and(|r| r.contains("scope \"api\" failed verification")),
        "{message:#}"
    );

    // The slack target never answers: after its retries, status says so.
    let failing = wait_for(
        "the failing target in status",
        Duration::from_secs(60),
        || {
            let status = host.json(&["status", "--json"]);
            let target = status["notify"]
                .as_array()?
                .iter()
                .find(|t| t["name"] == "notify-2")?
                .clone();
            (!target["failing"].is_null()).then_some(target)
        },
    );
    assert_eq!(failing["failing"], "cannot connect (after 5 tries)");
    assert_eq!(failing["failed"], 1);
    let text = String::from_utf8_lossy(&host.moorline(&["status"]).stdout).into_owned();
    assert!(
        text.contains("notify:    receiver ok (2 delivered, 0 failed)\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "notify:    notify-2 failing: cannot connect (after 5 tries) (0 delivered, 1 failed)\n"
        ),
        "{text}"
    );
    // A target's address may be a secret: it is in no log or status.
    assert!(!host.agent_log().contains("SECRETPATH"));
    assert!(!text.contains("SECRETPATH"));
    assert!(!host.agent_log().contains("hmac-key-for-tests"));
    assert_eq!(
        receiver.requests().len(),
        4,
        "no message the target did not ask for"
    );
}

#[test]
fn under_its_unit_the_agent_pings_the_watchdog_from_its_loop() {
    let host = Host::new();
    let unit = "moorline-under-test.service";
    let text = format!(
        "[Service]\nType=notify\nExecStart={} --config {} agent\nEnvironment=HOME={}\nWatchdogSec=2\nRestart=no\n",
        crate::harness::BIN,
        host.config_path().display(),
        host.home().display()
    );
    std::fs::write(host.um.unit_dir().join(unit), text).expect("unit file");
    assert!(host.um.systemctl(&["daemon-reload"]).status.success());
    let started = host.um.systemctl(&["start", unit]);
    assert!(started.status.success(), "{started:?}");
    let stamp = || host.unit_property(unit, "WatchdogTimestampMonotonic");
    // Three pings seen, each later than the last: the loop keeps pinging
    // while it deploys and while it is idle.
    let mut seen = Vec::new();
    wait_for("three watchdog pings", Duration::from_secs(30), || {
        let now = stamp();
        if now != "0" && seen.last() != Some(&now) {
            seen.push(now);
        }
        (seen.len() >= 3).then_some(())
    });
    assert_eq!(host.unit_property(unit, "ActiveState"), "active");
    assert_eq!(host.unit_property(unit, "NRestarts"), "0");
    let status = host.json(&["status", "--json"]);
    assert_eq!(status["agent"]["running"], true);
    assert!(host.um.systemctl(&["stop", unit]).status.success());
}

#[test]
fn under_systemd_the_agent_logs_to_the_journal_with_its_fields() {
    let socket = std::os::unix::net::UnixDatagram::unbound().expect("a datagram socket");
    if let Err(e) = socket.send_to(&[], "/run/systemd/journal/socket") {
        panic!(
            "no journald listens on /run/systemd/journal/socket ({e}): scripts/install-deps --tests starts one"
        );
    }
    let mut host = Host::new();
    host.start_agent_with(&[("JOURNAL_STREAM", "8:1")]);
    let first = crate::harness::git(&host.work(), &["rev-parse", "HEAD"]);
    assert_eq!(host.wait_rollout(&first)["outcome"], "succeeded");
    let pid = host.agent_pid().expect("the agent runs").to_string();
    // The agent's journal entries that have `field`.
    let journal = |field: &str| -> Vec<Value> {
        let out = Command::new("journalctl")
            .args(["--no-pager", "-o", "json", &format!("_PID={pid}"), field])
            .output()
            .expect("journalctl runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let entries = wait_for(
        "the rollout's entries in the journal",
        Duration::from_secs(20),
        || {
            let entries = journal("MOORLINE_ROLLOUT=1");
            entries
                .iter()
                .any(|e| e["MESSAGE"] == "rollout finished")
                .then_some(entries)
        },
    );
    let started = entries
        .iter()
        .find(|e| e["MESSAGE"] == "rollout started")
        .expect("the start is logged");
    assert_eq!(started["MOORLINE_COMMIT"], &first[..7]);
    assert_eq!(started["MOORLINE_TRIGGER"], "startup");
    assert_eq!(started["PRIORITY"], "6", "info");
    // A scope's lines carry its name.
    let api = journal("MOORLINE_SCOPE=api");
    assert!(
        api.iter().any(|e| e["MESSAGE"] == "build started"),
        "{api:#?}"
    );
    // Nothing went to stderr but what the journal could not take.
    assert!(
        !host.agent_log().contains("rollout started"),
        "{}",
        host.agent_log()
    );
}
