//! The real git CLI for test fixtures: pinned author, committer and dates
//! and no system or global config, so fixtures are the same on every
//! machine. Included by `#[cfg(test)]` modules in src (through `#[path]`)
//! and by the integration tests.

// Each includer uses a different subset of this helper.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Run `git ARGS` in `dir` with `HOME` there and commits dated `date`;
/// the trimmed stdout. Panics with git's stderr when it fails.
pub fn git_at(dir: &Path, home: &Path, date: &str, args: &[&str]) -> String {
    let output = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .env("GIT_AUTHOR_DATE", date)
        .env("GIT_COMMITTER_DATE", date)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", home)
        .output()
        .expect("git runs");
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// `git_at` in `dir`, which is also `HOME`, at 2026-01-01.
pub fn git(dir: &Path, args: &[&str]) -> String {
    git_at(dir, dir, "2026-01-01T00:00:00Z", args)
}
