//! `moorline check [MANIFEST]`: validates a manifest offline, for CI on
//! manifest pull requests, printing every problem as `file:line:col: message`.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use crate::manifest::{self, Diagnostics, Manifest};

/// Checks the manifest at `path`: 0 when valid, 1 when invalid, 2 when the
/// file cannot be read. With `hosts`, a scope that lists `hosts` but none of
/// these is warned about (a typo would keep it off every host checked).
pub fn run(path: &Path, hosts: &[String]) -> ExitCode {
    let (code, out, err) = check(path, hosts);
    super::out(&out);
    // Nothing useful can be done when stderr is closed.
    let _ = std::io::stderr().write_all(err.as_bytes());
    ExitCode::from(code)
}

/// The exit code, stdout and stderr of a check, without printing them.
fn check(path: &Path, hosts: &[String]) -> (u8, String, String) {
    let label = path.display().to_string();
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) => {
            return (
                2,
                String::new(),
                format!("error: cannot read {label}: {error}\n"),
            );
        }
    };
    match manifest::parse(&label, &bytes) {
        Ok(manifest) => (
            0,
            format!("{label}: ok ({})\n", summary(&manifest)),
            host_warnings(&label, &manifest, hosts),
        ),
        Err(diagnostics) => (1, String::new(), render(&diagnostics)),
    }
}

/// A warning for each scope whose `hosts` names none of `hosts`.
fn host_warnings(label: &str, manifest: &Manifest, hosts: &[String]) -> String {
    if hosts.is_empty() {
        return String::new();
    }
    manifest
        .scopes
        .values()
        .filter(|s| !s.hosts.is_empty() && !hosts.iter().any(|h| s.runs_on(h)))
        .map(|s| {
            format!(
                "warning: {label}: scope \"{}\" lists no host known to this check (hosts: {}; checked for: {})\n",
                s.name,
                s.hosts.join(", "),
                hosts.join(", ")
            )
        })
        .collect()
}

fn summary(manifest: &Manifest) -> String {
    let names: Vec<&str> = manifest.scopes.keys().map(String::as_str).collect();
    let noun = if names.len() == 1 { "scope" } else { "scopes" };
    format!("{} {noun}: {}", names.len(), names.join(", "))
}

fn render(diagnostics: &Diagnostics) -> String {
    format!("{diagnostics}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_invalid_and_unreadable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let good = dir.path().join("good.toml");
        std::fs::write(
            &good,
            "version = 1\n[scopes.web]\nowner = \"native\"\n[scopes.web.native]\nunits = [\"web.service\"]\n\
             [scopes.api]\nowner = \"native\"\n[scopes.api.native]\nunits = [\"api.service\"]\n",
        )
        .expect("write good manifest");
        assert_eq!(
            check(&good, &[]),
            (
                0,
                format!("{}: ok (2 scopes: api, web)\n", good.display()),
                String::new()
            )
        );

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "version = 2\n[scopes.api]\nownr = 1\n").expect("write bad manifest");
        let label = bad.display();
        assert_eq!(
            check(&bad, &[]),
            (
                1,
                String::new(),
                format!(
                    "{label}:1:11: unsupported manifest version 2; this moorline reads version 1\n\
                     {label}:2:1: missing key \"owner\" in [scopes.api]\n\
                     {label}:3:1: unknown key \"ownr\" in [scopes.api]; expected one of: owner, after, paths, build, native, docker, health, health_timeout, settle, build_timeout, job_timeout, hosts, strategy, edge, canary, approve\n"
                )
            )
        );

        let fleet = dir.path().join("fleet.toml");
        std::fs::write(
            &fleet,
            "version = 1\n[scopes.web]\nowner = \"native\"\nhosts = [\"vps-1\"]\n[scopes.web.native]\nunits = [\"web.service\"]\n\
             [scopes.db]\nowner = \"native\"\nhosts = [\"vps-9\"]\n[scopes.db.native]\nunits = [\"db.service\"]\n",
        )
        .expect("write fleet manifest");
        let hosts = ["vps-1".to_string(), "vps-2".to_string()];
        assert_eq!(
            check(&fleet, &hosts),
            (
                0,
                format!("{}: ok (2 scopes: db, web)\n", fleet.display()),
                format!(
                    "warning: {}: scope \"db\" lists no host known to this check (hosts: vps-9; checked for: vps-1, vps-2)\n",
                    fleet.display()
                )
            )
        );
        assert_eq!(check(&fleet, &[]).2, "", "no warning without --host");

        let missing = dir.path().join("missing.toml");
        assert_eq!(
            check(&missing, &[]),
            (
                2,
                String::new(),
                format!(
                    "error: cannot read {}: No such file or directory (os error 2)\n",
                    missing.display()
                )
            )
        );
    }
}
