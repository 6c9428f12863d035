//! moorline: a pull-based GitOps deploy agent for systemd units and Docker
//! containers. This file parses the command line and maps outcomes to exit
//! codes; everything else lives in the modules below.

/// Commands: one file each.
mod cli;
/// Host configuration: raw TOML → validated settings.
mod config;
/// The manifest committed in the source: schema, validation, fingerprints.
mod manifest;
/// Runtimes that run a scope's members: systemd user units and Docker.
mod runtime;

use std::process::ExitCode;

// Temporary dispatch until the clap CLI lands: only `check [MANIFEST]`.
fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["check"] => cli::check::run(std::path::Path::new("deploy/moorline.toml")),
        ["check", path] => cli::check::run(std::path::Path::new(path)),
        _ => {
            eprintln!("usage: moorline check [MANIFEST]");
            ExitCode::from(2)
        }
    }
}
