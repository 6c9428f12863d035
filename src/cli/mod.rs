//! One file per command: each reaches the agent over the control channel
//! (or the store and snapshot when it is not running) and renders the
//! answer for people or as `--json`.

pub mod check;
pub mod history;
pub mod plan;
pub mod status;
pub mod sync;

use std::process::ExitCode;

/// Exit codes of SPEC.md: 0 success, 1 a negative answer, 2 an error.
pub const OK: u8 = 0;
pub const NEGATIVE: u8 = 1;
pub const ERROR: u8 = 2;

pub fn exit(code: u8) -> ExitCode {
    ExitCode::from(code)
}

/// Print a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) {
    println!("{}", serde_json::to_string_pretty(value).expect("views always serialize"));
}

pub fn short(commit: &str) -> &str {
    commit.get(..7).unwrap_or(commit)
}

pub fn short_opt(commit: &Option<String>) -> String {
    commit.as_deref().map(short).unwrap_or("-").to_string()
}
