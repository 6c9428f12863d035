//! moorline: a pull-based GitOps deploy agent for systemd units and Docker
//! containers. This file parses the command line and maps outcomes to exit
//! codes; everything else lives in the modules below.

/// Host configuration: raw TOML → validated settings.
mod config;
/// The manifest committed in the source: schema, validation, fingerprints.
mod manifest;
/// Runtimes that run a scope's members: systemd user units and Docker.
mod runtime;
/// Triggers that wake the agent: filesystem watch and webhook.
mod source;

fn main() {}
