//! Health checks of a scope, retried at their interval until all pass or
//! time runs out. One module per kind — `http`, `tcp`, `exec` — holds its
//! manifest keys, its probe and its description; a new kind is a new
//! module and a variant of `HealthKind`.

/// `exec`: a command run in the release directory.
pub mod exec;
/// `http`: a GET with an expected status and body.
pub mod http;
/// `tcp`: an accepted connection.
pub mod tcp;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};

use crate::manifest::reader::{Reader, Table, duration};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthKind,
    /// One attempt's limit. Default 5s.
    pub timeout: Duration,
    /// Pause between attempts. Default 500ms.
    pub interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthKind {
    Http(http::Http),
    Tcp(tcp::Tcp),
    Exec(exec::Exec),
}

/// Each kind's selecting key and the keys only it takes.
const KINDS: [(&str, &[&str]); 3] = [
    (http::KEY, http::EXTRA_KEYS),
    (tcp::KEY, tcp::EXTRA_KEYS),
    (exec::KEY, exec::EXTRA_KEYS),
];
/// Keys every kind takes.
const COMMON_KEYS: [&str; 2] = ["timeout", "interval"];

/// Read one `[[scopes.NAME.health]]` table; problems go to `r`.
pub(crate) fn parse(r: &mut Reader<'_>, t: &Table<'_, '_>) -> Option<HealthCheck> {
    let mut allowed: Vec<&str> = KINDS.iter().map(|(key, _)| *key).collect();
    allowed.extend(KINDS.iter().flat_map(|(_, extra)| extra.iter().copied()));
    allowed.extend(COMMON_KEYS);
    t.check_keys(r, &allowed);
    let chosen: Vec<&str> = KINDS
        .iter()
        .map(|(key, _)| *key)
        .filter(|k| t.value(k).is_some())
        .collect();
    let [kind] = chosen[..] else {
        let names: Vec<&str> = KINDS.iter().map(|(key, _)| *key).collect();
        r.error(
            t.span.start,
            format!("{} must have exactly one of {}", t.label, names.join(", ")),
        );
        return None;
    };
    let mut ok = true;
    for (other, extra) in KINDS.iter().filter(|(key, _)| *key != kind) {
        for key in extra.iter() {
            if let Some((key_span, _)) = t.entry(key) {
                r.error(
                    key_span.start,
                    format!("{key:?} only applies to {other} checks"),
                );
                ok = false;
            }
        }
    }
    let mut timeout = Duration::from_secs(5);
    let mut interval = Duration::from_millis(500);
    for (key, slot) in [("timeout", &mut timeout), ("interval", &mut interval)] {
        if t.value(key).is_none() {
            continue;
        }
        match duration(r, t, key) {
            Some(d) if d.value.is_zero() => {
                r.error(d.span.start, format!("{key:?} must be longer than zero"));
                ok = false;
            }
            Some(d) => *slot = d.value,
            None => ok = false,
        }
    }
    let kind = match kind {
        http::KEY => HealthKind::Http(http::parse(r, t)?),
        tcp::KEY => HealthKind::Tcp(tcp::parse(r, t)?),
        _ => HealthKind::Exec(exec::parse(r, t)?),
    };
    ok.then_some(HealthCheck {
        kind,
        timeout,
        interval,
    })
}

/// How a check is named in messages: `http "http://127.0.0.1:4000/health"`.
pub fn describe(check: &HealthCheck) -> String {
    match &check.kind {
        HealthKind::Http(c) => c.describe(),
        HealthKind::Tcp(c) => c.describe(),
        HealthKind::Exec(c) => c.describe(),
    }
}

/// Where a check runs: the release (exec checks run in it) and, for an
/// edge scope, the address an `http` path is asked of.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub release: &'a Path,
    pub at: Option<SocketAddr>,
}

/// Run one attempt of `check`; `Err` says why it did not pass.
pub async fn probe(
    check: &HealthCheck,
    target: Target<'_>,
    http: &reqwest::Client,
) -> Result<(), String> {
    let release = target.release;
    let attempt = async {
        match &check.kind {
            HealthKind::Http(c) => c.probe(http, target.at).await,
            HealthKind::Tcp(c) => c.probe().await,
            HealthKind::Exec(c) => c.probe(release).await,
        }
    };
    match timeout(check.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "no answer within {}",
            humantime::format_duration(check.timeout)
        )),
    }
}

/// A check that did not pass in time, with its last error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("health check {check} did not pass within {}: {why}", humantime::format_duration(*.limit))]
pub struct HealthError {
    /// As `describe` names it.
    pub check: String,
    pub limit: Duration,
    pub why: String,
}

/// Retry every check until all have passed, or fail naming the first one
/// that did not pass within `limit` and its last error.
pub async fn wait_all(
    checks: &[HealthCheck],
    target: Target<'_>,
    limit: Duration,
    http: &reqwest::Client,
) -> Result<(), HealthError> {
    let deadline = Instant::now() + limit;
    for check in checks {
        loop {
            let result = probe(check, target, http).await;
            match result {
                Ok(()) => break,
                Err(why) if Instant::now() + check.interval >= deadline => {
                    return Err(HealthError {
                        check: describe(check),
                        limit,
                        why,
                    });
                }
                Err(_) => sleep(check.interval).await,
            }
        }
    }
    Ok(())
}

/// The HTTP client used for checks: no proxy, no connection reuse surprises.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .expect("a client without TLS roots or proxies always builds")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn check(kind: HealthKind) -> HealthCheck {
        HealthCheck {
            kind,
            timeout: Duration::from_secs(2),
            interval: Duration::from_millis(50),
        }
    }

    fn in_release(release: &Path) -> Target<'_> {
        Target { release, at: None }
    }

    /// A one-route HTTP server on loopback answering with `status` and `body`.
    async fn serve(status: u16, body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let response = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        format!("http://{addr}/health")
    }

    #[tokio::test]
    async fn a_health_path_is_asked_of_the_address_given() {
        let http = client();
        let dir = tempfile::tempdir().expect("tempdir");
        let url = serve(200, "ok").await;
        let addr: SocketAddr = url
            .trim_start_matches("http://")
            .trim_end_matches("/health")
            .parse()
            .expect("an address");
        let path = check(HealthKind::Http(http::Http {
            url: "/health".into(),
            expect_status: 200,
            body_contains: Some("ok".into()),
        }));
        let at = Target {
            release: dir.path(),
            at: Some(addr),
        };
        assert_eq!(probe(&path, at, &http).await, Ok(()));
        let elsewhere = Target {
            release: dir.path(),
            at: Some("127.0.0.1:1".parse().expect("an address")),
        };
        assert_eq!(
            probe(&path, elsewhere, &http).await,
            Err("connection refused".to_string())
        );
    }

    #[tokio::test]
    async fn http_checks_compare_status_and_body() {
        let http = client();
        let dir = tempfile::tempdir().expect("tempdir");
        let url = serve(200, "version v2 ok").await;
        let ok = check(HealthKind::Http(http::Http {
            url: url.clone(),
            expect_status: 200,
            body_contains: Some("v2".into()),
        }));
        assert_eq!(probe(&ok, in_release(dir.path()), &http).await, Ok(()));
        let wrong_body = check(HealthKind::Http(http::Http {
            url: url.clone(),
            expect_status: 200,
            body_contains: Some("v3".into()),
        }));
        assert_eq!(
            probe(&wrong_body, in_release(dir.path()), &http).await,
            Err("body does not contain \"v3\"".to_string())
        );
        let failing = serve(503, "down").await;
        let wrong_status = check(HealthKind::Http(http::Http {
            url: failing,
            expect_status: 200,
            body_contains: None,
        }));
        assert_eq!(
            probe(&wrong_status, in_release(dir.path()), &http).await,
            Err("status 503 (expected 200)".to_string())
        );
    }

    #[tokio::test]
    async fn tcp_and_exec_checks_report_why_they_fail() {
        let http = client();
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = listener.local_addr().expect("addr").to_string();
        assert_eq!(
            probe(
                &check(HealthKind::Tcp(tcp::Tcp { addr: open })),
                in_release(dir.path()),
                &http
            )
            .await,
            Ok(())
        );
        drop(listener);

        std::fs::write(
            dir.path().join("check.sh"),
            "#!/bin/sh\necho not ready >&2\nexit 3\n",
        )
        .expect("write");
        std::fs::set_permissions(
            dir.path().join("check.sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let exec = check(HealthKind::Exec(exec::Exec {
            argv: vec!["./check.sh".into()],
        }));
        assert_eq!(
            probe(&exec, in_release(dir.path()), &http).await,
            Err("exited with status 3: not ready".to_string())
        );
        let pwd = check(HealthKind::Exec(exec::Exec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                format!("test \"$PWD\" = '{}'", dir.path().display()),
            ],
        }));
        assert_eq!(
            probe(&pwd, in_release(dir.path()), &http).await,
            Ok(()),
            "exec runs in the release"
        );
    }

    #[tokio::test]
    async fn waiting_gives_up_with_the_last_reason() {
        let http = client();
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let err = wait_all(
            &[check(HealthKind::Tcp(tcp::Tcp { addr: addr.clone() }))],
            in_release(dir.path()),
            Duration::from_millis(300),
            &http,
        )
        .await
        .expect_err("nothing listens");
        let err = err.to_string();
        assert!(
            err.starts_with(&format!(
                "health check tcp \"{addr}\" did not pass within 300ms: connect failed:"
            )),
            "{err}"
        );
    }
}
