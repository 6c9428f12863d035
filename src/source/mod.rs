//! Where commits come from: the git repository (gix) and what wakes the
//! agent to look at it.

/// The followed repository through gix.
pub mod git;

/// Why the agent is asked to fetch now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wake {
    Watch,
    Webhook {
        provider: &'static str,
        delivery: Option<String>,
    },
    Sync,
    Poll,
}
