//! Release directories under `<state>/releases/<commit>`: registering what
//! was built in them and pruning old ones without ever removing a release a
//! scope runs or would roll back to.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tracing::{info, warn};

use crate::store::{HostState, ReleaseRecord, SCHEMA_VERSION, Store, StoreError, now_ms};

/// Record that `commit`'s release holds builds of these scopes.
pub fn register(
    store: &Store,
    commit: &str,
    built: BTreeMap<String, String>,
) -> Result<(), StoreError> {
    let existing = store.releases()?.into_iter().find(|r| r.commit == commit);
    let mut record = existing.unwrap_or(ReleaseRecord {
        schema: SCHEMA_VERSION,
        commit: commit.to_string(),
        created_at: now_ms(),
        built: BTreeMap::new(),
    });
    record.built.extend(built);
    store.put_release(&record)
}

/// Remove a release directory that never became usable.
pub fn discard(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir) {
        warn!(path = %dir.display(), error = %e, "cannot remove release");
    }
}

/// The releases `prune` must keep whatever their age.
pub fn protected(host: &HostState) -> BTreeSet<String> {
    let mut keep = BTreeSet::new();
    for state in host.scopes.values() {
        keep.insert(state.current.release.clone());
        if let Some(h) = &state.last_healthy {
            keep.insert(h.release.clone());
        }
    }
    keep
}

/// Which releases to delete: all but the newest `keep` and the protected.
/// `releases` is oldest first.
pub fn to_prune(
    releases: &[ReleaseRecord],
    keep: usize,
    protected: &BTreeSet<String>,
) -> Vec<String> {
    let cut = releases.len().saturating_sub(keep);
    releases[..cut]
        .iter()
        .filter(|r| !protected.contains(&r.commit))
        .map(|r| r.commit.clone())
        .collect()
}

/// A release removed by `prune`, with the images built for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pruned {
    pub commit: String,
    /// `<image>:<commit>` of every container built from a Dockerfile.
    pub images: Vec<String>,
}

/// Images built for release `commit`, from the manifest inside it.
pub fn built_images(release_dir: &Path, manifest: &str, commit: &str) -> Vec<String> {
    let path = release_dir.join(manifest);
    let Ok(bytes) = std::fs::read(&path) else {
        return vec![];
    };
    let Ok(manifest) = crate::manifest::parse(&path.display().to_string(), &bytes) else {
        return vec![];
    };
    manifest
        .scopes
        .values()
        .flat_map(|s| s.docker.iter().flat_map(|d| d.containers.iter()))
        .filter(|c| c.dockerfile.is_some())
        .map(|c| super::docker::image_ref(c, commit))
        .collect()
}

/// Delete all but the newest `keep` releases, never one a scope runs or
/// would roll back to.
pub fn prune(
    store: &Store,
    dir: &Path,
    manifest: &str,
    host: &HostState,
    keep: usize,
) -> Result<Vec<Pruned>, StoreError> {
    let releases = store.releases()?;
    let mut pruned = Vec::new();
    for commit in to_prune(&releases, keep, &protected(host)) {
        // Forget it first: a release on disk but not in the registry is
        // merely wasted space; the other way round would be reused.
        store.remove_release(&commit)?;
        let path = dir.join(&commit);
        let images = built_images(&path, manifest, &commit);
        if path.exists() {
            discard(&path);
        }
        info!(release = %commit, "pruned release");
        pruned.push(Pruned { commit, images });
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(commit: &str) -> ReleaseRecord {
        ReleaseRecord {
            schema: SCHEMA_VERSION,
            commit: commit.into(),
            created_at: 0,
            built: BTreeMap::new(),
        }
    }

    #[test]
    fn pruning_keeps_the_newest_and_every_protected_release() {
        let releases: Vec<_> = ["a", "b", "c", "d", "e"].into_iter().map(release).collect();
        let none = BTreeSet::new();
        assert_eq!(to_prune(&releases, 2, &none), ["a", "b", "c"]);
        let running: BTreeSet<String> = ["a".to_string(), "c".to_string()].into();
        assert_eq!(to_prune(&releases, 2, &running), ["b"]);
        assert!(to_prune(&releases, 10, &none).is_empty());
    }
}
