//! Start-up recovery after the agent was killed: close what the journal left
//! open, remove release directories that were never completed, and find
//! units whose drop-in names another release than the store records, so the
//! next rollout puts them back instead of trusting a stale record.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::releases;
use super::{Engine, Error};
use crate::store::{HostState, JournalEntry, Store};

/// Why an unfinished rollout stopped, from the last journal entry.
pub fn interrupted_error(journal: &[JournalEntry]) -> String {
    match journal.last() {
        None => "the agent stopped before any change was made".to_string(),
        Some(last) if last.state == "intent" => {
            format!("the agent stopped during \"{}\"", last.step)
        }
        Some(last) => format!("the agent stopped after \"{}\" ({})", last.step, last.state),
    }
}

/// Whether `name` is what a release directory is called: a full commit id.
fn is_commit_name(name: &str) -> bool {
    name.len() == 40 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The entries of `releases_dir` to delete: staging directories a killed
/// checkout left, and release directories nothing registered or protects
/// (a checkout or build that never finished, a prune cut short).
pub fn stale_releases(names: &[String], registered: &[String], host: &HostState) -> Vec<String> {
    let protected = releases::protected(host);
    names
        .iter()
        .filter(|name| {
            name.starts_with(".partial-")
                || (is_commit_name(name)
                    && !registered.contains(name)
                    && !protected.contains(*name))
        })
        .cloned()
        .collect()
}

/// Remove stale release directories; returns what was removed.
pub fn clean_releases(store: &Store, releases_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = match std::fs::read_dir(releases_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(source) => {
            return Err(Error::ListReleases {
                path: releases_dir.to_path_buf(),
                source,
            });
        }
    };
    let names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let registered: Vec<String> = store.releases()?.into_iter().map(|r| r.commit).collect();
    let host = store.host()?;
    let mut removed = Vec::new();
    for name in stale_releases(&names, &registered, &host) {
        let path = releases_dir.join(&name);
        releases::discard(&path);
        info!(path = %path.display(), "removed an unfinished release");
        removed.push(path);
    }
    Ok(removed)
}

impl Engine {
    /// Run after `close_interrupted` when the agent starts: remove release
    /// directories no record knows (a kill during checkout or build). The
    /// ownership audit that follows finds units left on another release.
    pub async fn recover(&mut self) {
        if let Err(e) = clean_releases(&self.store, &self.releases_dir()) {
            warn!(error = %e, "cannot clean up releases");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeployedScope, ScopeState};

    fn entry(step: &str, state: &str) -> JournalEntry {
        JournalEntry {
            at: 0,
            step: step.into(),
            state: state.into(),
        }
    }

    #[test]
    fn the_interruption_names_the_step_it_stopped_in_or_after() {
        assert_eq!(
            interrupted_error(&[]),
            "the agent stopped before any change was made"
        );
        let journal = [entry("build scope api", "intent")];
        assert_eq!(
            interrupted_error(&journal),
            "the agent stopped during \"build scope api\""
        );
        let journal = [
            entry("restart a.service on 1234567", "intent"),
            entry("restart a.service on 1234567", "done"),
        ];
        assert_eq!(
            interrupted_error(&journal),
            "the agent stopped after \"restart a.service on 1234567\" (done)"
        );
    }

    #[test]
    fn only_unfinished_and_unknown_releases_are_stale() {
        let a = "a".repeat(40);
        let b = "b".repeat(40);
        let c = "c".repeat(40);
        let d = "d".repeat(40);
        let mut host = HostState::default();
        let deployed = DeployedScope {
            owner: crate::runtime::Owner::Native,
            release: c.clone(),
            commit: c.clone(),
            fingerprint: String::new(),
            section_text: String::new(),
            path_ids: Default::default(),
            members: vec![],
            rollout: 1,
            at: 0,
        };
        host.scopes.insert(
            "api".into(),
            ScopeState {
                current: deployed.clone(),
                healthy: true,
                last_healthy: Some(deployed),
                problem: None,
                way_back: Default::default(),
            },
        );
        let names = vec![
            a.clone(),
            b.clone(),
            c.clone(),
            format!(".partial-{d}"),
            "notes".to_string(),
        ];
        let stale = stale_releases(&names, std::slice::from_ref(&a), &host);
        assert_eq!(stale, vec![b, format!(".partial-{d}")]);
    }
}
