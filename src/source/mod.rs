//! Where new commits come from: the git repository (gix) and the triggers
//! that wake the agent to fetch it.

/// The followed repository through gix.
pub mod git;

/// Filesystem watch of a local repository's branch ref.
pub mod watch;
/// The webhook listener for forge push notifications.
pub mod webhook;

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
}
