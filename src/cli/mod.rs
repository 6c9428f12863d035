//! One file per command: each reaches the agent over the control channel
//! (or the store and snapshot when it is not running) and renders the
//! answer for people or as `--json`.

pub mod check;
pub mod hand;
pub mod history;
pub mod init;
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

/// Say what went wrong on stderr; the error exit code.
pub fn fail(message: impl std::fmt::Display) -> u8 {
    eprintln!("error: {message}");
    ERROR
}

/// The agent answered with something this command did not ask for.
pub fn unexpected(answer: &crate::api::Response) -> u8 {
    fail(format!("unexpected answer from the agent: {answer:?}"))
}

/// Write `text` to stdout. A closed pipe (`moorline status --json | grep
/// -q ...`) ends the command quietly with exit 0, as ripgrep does: the
/// reader has what it wanted. Any other write error is exit 2.
pub fn out(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(OK.into());
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(ERROR.into());
    }
}

/// Print a value as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) {
    let mut text = serde_json::to_string_pretty(value).expect("views always serialize");
    text.push('\n');
    out(&text);
}

pub use crate::source::short;

pub fn short_opt(commit: &Option<String>) -> String {
    commit.as_deref().map(short).unwrap_or("-").to_string()
}
