//! Fault points for crash tests: with the `fault-injection` feature, a named
//! point kills the agent with SIGKILL when `MOORLINE_FAULT` names it, so the
//! end-to-end tests can stop the real binary at an exact phase of a rollout.
//! Without the feature every point compiles to nothing.

/// The points the engine passes, in rollout order. Tests use these names.
#[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
pub const POINTS: [&str; 14] = [
    "after-fetch",
    "during-checkout",
    "during-build",
    "during-image-build",
    "after-stop",
    // A slotted scope: the new slot started, the edge not switched yet; the
    // edge switched, the old slot not drained yet.
    "after-slot-start",
    "after-route",
    // A canary's analysis, between two intervals.
    "during-canary",
    // A slotted scope's old slot draining requests still in flight.
    "during-drain",
    "during-verify",
    "during-rollback",
    "while-recording",
    "during-prune",
    "during-audit",
];

/// Kill this process at once, as `kill -9` would, when `MOORLINE_FAULT` is `name`.
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    debug_assert!(POINTS.contains(&name), "unknown fault point \"{name}\"");
    if std::env::var_os("MOORLINE_FAULT").is_some_and(|v| v == name) {
        tracing::warn!(point = name, "fault point reached: killing the agent");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        // SIGKILL cannot be caught; this is never reached.
        std::process::abort();
    }
}

/// Fault points are compiled out of normal builds.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}
