//! Health checks of a scope: HTTP, TCP and a command run in the release
//! directory, retried at their interval until all pass or time runs out.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::time::{Instant, sleep, timeout};

use crate::manifest::{HealthCheck, HealthKind};

/// How a check is named in messages: `http "http://127.0.0.1:4000/health"`.
pub fn describe(check: &HealthCheck) -> String {
    match &check.kind {
        HealthKind::Http { url, .. } => format!("http \"{url}\""),
        HealthKind::Tcp { addr } => format!("tcp \"{addr}\""),
        HealthKind::Exec { argv } => format!("exec \"{}\"", argv.join(" ")),
    }
}

/// Run one attempt of `check`; `Err` says why it did not pass.
pub async fn probe(check: &HealthCheck, release: &Path, http: &reqwest::Client) -> Result<(), String> {
    let attempt = async {
        match &check.kind {
            HealthKind::Http {
                url,
                expect_status,
                body_contains,
            } => {
                let response = http.get(url).send().await.map_err(|e| http_error(&e))?;
                let status = response.status().as_u16();
                if status != *expect_status {
                    return Err(format!("status {status} (expected {expect_status})"));
                }
                if let Some(needle) = body_contains {
                    let body = response.text().await.map_err(|e| http_error(&e))?;
                    if !body.contains(needle.as_str()) {
                        return Err(format!("body does not contain \"{needle}\""));
                    }
                }
                Ok(())
            }
            HealthKind::Tcp { addr } => tokio::net::TcpStream::connect(addr.as_str())
                .await
                .map(drop)
                .map_err(|e| format!("connect failed: {e}")),
            HealthKind::Exec { argv } => run_exec(argv, release).await,
        }
    };
    match timeout(check.timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {}", humantime::format_duration(check.timeout))),
    }
}

fn http_error(error: &reqwest::Error) -> String {
    if error.is_connect() {
        "connection refused".to_string()
    } else if error.is_timeout() {
        "timed out".to_string()
    } else {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(inner) = source {
            text = format!("{text}: {inner}");
            source = inner.source();
        }
        text
    }
}

async fn run_exec(argv: &[String], release: &Path) -> Result<(), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("empty command".to_string());
    };
    let program_path = if program.contains('/') {
        release.join(program)
    } else {
        program.into()
    };
    let output = tokio::process::Command::new(&program_path)
        .args(args)
        .current_dir(release)
        .env("MOORLINE_RELEASE", release)
        .env("MOORLINE_COMMIT", release.file_name().unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    match output.status.code() {
        Some(code) if last.is_empty() => Err(format!("exited with status {code}")),
        Some(code) => Err(format!("exited with status {code}: {last}")),
        None => Err("killed by a signal".to_string()),
    }
}

/// Retry every check until all have passed, or fail naming the first one
/// that did not pass within `limit` and its last error.
pub async fn wait_all(checks: &[HealthCheck], release: &Path, limit: Duration, http: &reqwest::Client) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    for check in checks {
        loop {
            let result = probe(check, release, http).await;
            match result {
                Ok(()) => break,
                Err(why) if Instant::now() + check.interval >= deadline => {
                    return Err(format!(
                        "health check {} did not pass within {}: {why}",
                        describe(check),
                        humantime::format_duration(limit)
                    ));
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

    /// A one-route HTTP server on loopback answering with `status` and `body`.
    async fn serve(status: u16, body: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
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
    async fn http_checks_compare_status_and_body() {
        let http = client();
        let dir = tempfile::tempdir().expect("tempdir");
        let url = serve(200, "version v2 ok").await;
        let ok = check(HealthKind::Http {
            url: url.clone(),
            expect_status: 200,
            body_contains: Some("v2".into()),
        });
        assert_eq!(probe(&ok, dir.path(), &http).await, Ok(()));
        let wrong_body = check(HealthKind::Http {
            url: url.clone(),
            expect_status: 200,
            body_contains: Some("v3".into()),
        });
        assert_eq!(
            probe(&wrong_body, dir.path(), &http).await,
            Err("body does not contain \"v3\"".to_string())
        );
        let failing = serve(503, "down").await;
        let wrong_status = check(HealthKind::Http {
            url: failing,
            expect_status: 200,
            body_contains: None,
        });
        assert_eq!(
            probe(&wrong_status, dir.path(), &http).await,
            Err("status 503 (expected 200)".to_string())
        );
    }

    #[tokio::test]
    async fn tcp_and_exec_checks_report_why_they_fail() {
        let http = client();
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let open = listener.local_addr().expect("addr").to_string();
        assert_eq!(probe(&check(HealthKind::Tcp { addr: open }), dir.path(), &http).await, Ok(()));
        drop(listener);

        std::fs::write(dir.path().join("check.sh"), "#!/bin/sh\necho not ready >&2\nexit 3\n").expect("write");
        std::fs::set_permissions(
            dir.path().join("check.sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let exec = check(HealthKind::Exec {
            argv: vec!["./check.sh".into()],
        });
        assert_eq!(
            probe(&exec, dir.path(), &http).await,
            Err("exited with status 3: not ready".to_string())
        );
        let pwd = check(HealthKind::Exec {
            argv: vec!["sh".into(), "-c".into(), format!("test \"$PWD\" = '{}'", dir.path().display())],
        });
        assert_eq!(probe(&pwd, dir.path(), &http).await, Ok(()), "exec runs in the release");
    }

    #[tokio::test]
    async fn waiting_gives_up_with_the_last_reason() {
        let http = client();
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let err = wait_all(
            &[check(HealthKind::Tcp { addr: addr.clone() })],
            dir.path(),
            Duration::from_millis(300),
            &http,
        )
        .await
        .expect_err("nothing listens");
        assert!(
            err.starts_with(&format!("health check tcp \"{addr}\" did not pass within 300ms: connect failed:")),
            "{err}"
        );
    }
}
