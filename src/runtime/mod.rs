//! The two runtimes a scope can be owned by.

/// Docker containers and images over the Engine API (bollard).
pub mod docker;
/// systemd user units over D-Bus (zbus).
pub mod systemd;
