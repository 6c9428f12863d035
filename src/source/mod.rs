//! Where new commits come from: the git repository (gix) and the triggers
//! that wake the agent to fetch it.

/// How a fetch reaches a private remote: deploy key, known hosts, token, CA.
pub mod access;
/// The followed repository through gix.
pub mod git;
/// The git CLI for test fixtures (shared with the integration tests).
#[cfg(test)]
#[path = "../../tests/support/git.rs"]
mod git_cli;

/// `[source.verify]`: signatures a commit must carry (SSH and OpenPGP).
pub mod verify;
/// Filesystem watch of a local repository's branch ref.
pub mod watch;
/// The webhook listener for forge push notifications.
pub mod webhook;

use std::time::Duration;

/// A trigger: a task that wakes the agent (sends a `Wake`) and says how it
/// is doing. A new trigger is one module with a type implementing this,
/// started by the agent beside the others; the poll timer and `moorline
/// sync` are the agent's own.
pub trait Trigger: Send {
    /// Its name in `status` (`watch`, `webhook`).
    fn name(&self) -> &'static str;
    /// What `status` shows: `active`, `listening on ...`, or why it is not
    /// working and that the agent polls meanwhile.
    fn state(&self) -> String;
    /// Called before every fetch: a trigger that failed may set itself up
    /// again here.
    fn before_fetch(&mut self) {}
}

/// A poll interval as a user wrote it: "60s", "1s", "250ms".
pub fn duration_text(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The first seven characters of a commit id, as people read them.
pub fn short(commit: &str) -> &str {
    commit.get(..7).unwrap_or(commit)
}

/// Why the agent was woken to fetch. A trigger only wakes the agent: what gets
/// deployed is always what the following fetch finds, so a forged wake cannot
/// choose what runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    /// The watched ref of a local repository changed.
    Watch,
    /// A signed push notification for the followed branch arrived.
    Webhook {
        /// `github`, `gitea`, `forgejo`, `gitlab` or `moorline`.
        provider: &'static str,
        /// The provider's delivery id, when it sent one.
        delivery: Option<String>,
    },
    /// `moorline sync` asked for a fetch.
    Sync,
    /// The polling interval elapsed.
    Poll,
    /// An operator asked for something by hand: `rollback`, `restart`,
    /// `approve`, `resume`.
    Hand(&'static str),
}

impl Wake {
    /// How history and `status` name it: the rollout's trigger.
    pub fn name(&self) -> &'static str {
        match self {
            Wake::Watch => "watch",
            Wake::Webhook { .. } => "webhook",
            Wake::Sync => "sync",
            Wake::Poll => "poll",
            Wake::Hand(name) => name,
        }
    }
}
