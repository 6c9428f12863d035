//! `moorline check [MANIFEST]`: validates a manifest offline, for CI on
//! manifest pull requests, printing every problem as `file:line:col: message`.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use crate::manifest::{self, Diagnostics, Manifest};

/// Checks the manifest at `path`: 0 when valid, 1 when invalid, 2 when the
/// file cannot be read.
pub fn run(path: &Path) -> ExitCode {
    let (code, out, err) = check(path);
    super::out(&out);
    // Nothing useful can be done when stderr is closed.
    let _ = std::io::stderr().write_all(err.as_bytes());
    ExitCode::from(code)
}

/// The exit code, stdout and stderr of a check, without printing them.
fn check(path: &Path) -> (u8, String, String) {
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
            String::new(),
        ),
        Err(diagnostics) => (1, String::new(), render(&diagnostics)),
    }
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
            check(&good),
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
            check(&bad),
            (
                1,
                String::new(),
                format!(
                    "{label}:1:11: unsupported manifest version 2; this moorline reads version 1\n\
                     {label}:2:1: missing key \"owner\" in [scopes.api]\n\
                     {label}:3:1: unknown key \"ownr\" in [scopes.api]; expected one of: owner, after, paths, build, native, docker, health, health_timeout, settle, build_timeout, job_timeout\n"
                )
            )
        );

        let missing = dir.path().join("missing.toml");
        assert_eq!(
            check(&missing),
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
