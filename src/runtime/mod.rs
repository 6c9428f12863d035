//! The two runtimes a scope can be owned by.

/// Docker containers and images over the Engine API (bollard).
// Nothing outside calls it until the rollout engine is wired in; remove then.
#[cfg_attr(
    not(test),
    expect(dead_code, reason = "used by the rollout engine once it lands")
)]
pub mod docker;
/// systemd user units over D-Bus (zbus).
pub mod systemd;
