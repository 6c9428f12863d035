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

/// The releases pruning must keep whatever their age: what each scope runs,
/// its last healthy release, and the last healthy release it had on every
/// owner (the way back of a cutover, with the images built for it).
pub fn protected(host: &HostState) -> BTreeSet<String> {
    let mut keep = BTreeSet::new();
    for state in host.scopes.values() {
        keep.insert(state.current.release.clone());
        if let Some(h) = &state.last_healthy {
            keep.insert(h.release.clone());
        }
        keep.extend(state.way_back.values().cloned());
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
        .map(|c| crate::runtime::docker::scope::image_ref(c, commit))
        .collect()
}

/// Remove one release: forgotten by the registry first (a release on disk
/// but not registered is merely wasted space, removed at start-up; the
/// other way round it would be reused), then deleted. Returns the images
/// built for it, which go with it.
pub fn prune_one(
    store: &Store,
    path: &Path,
    manifest: &str,
    commit: &str,
) -> Result<Vec<String>, StoreError> {
    let images = built_images(path, manifest, commit);
    store.remove_release(commit)?;
    crate::fault::point("during-prune");
    if path.exists() {
        discard(path);
    }
    info!(release = %commit, "pruned release");
    Ok(images)
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
    fn the_way_back_to_every_owner_is_protected() {
        use crate::runtime::Owner;
        use crate::store::{DeployedScope, ScopeState};
        let deployed = |owner: Owner, release: &str| DeployedScope {
            owner,
            release: release.into(),
            commit: release.into(),
            fingerprint: String::new(),
            section_text: String::new(),
            path_ids: BTreeMap::new(),
            members: vec![],
            rollout: 1,
            at: 0,
        };
        // Docker ran "d", then a cutover to native ran "n1" and "n2".
        let mut state = ScopeState::healthy(deployed(Owner::Docker, "d"), None);
        state = ScopeState::healthy(deployed(Owner::Native, "n1"), Some(&state));
        state = ScopeState::healthy(deployed(Owner::Native, "n2"), Some(&state));
        let host = HostState {
            scopes: BTreeMap::from([("api".to_string(), state)]),
            ..HostState::default()
        };
        let keep = protected(&host);
        assert_eq!(
            keep,
            BTreeSet::from(["d".to_string(), "n2".to_string()]),
            "the docker release is the way back; n1 is not kept"
        );
        let releases: Vec<_> = ["d", "n1", "x", "n2"].into_iter().map(release).collect();
        assert_eq!(to_prune(&releases, 1, &keep), ["n1", "x"]);
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
