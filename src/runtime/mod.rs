//! The two runtimes a scope can be owned by.

/// systemd user units over D-Bus (zbus).
pub mod systemd;
