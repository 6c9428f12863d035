//! The edge's routing table: for each edge scope, the address it listens on
//! and its slots with their weights. Kept on disk, owner-only and written
//! atomically (a temporary file, fsync, rename, fsync of the directory), so
//! an edge that restarts comes back with the last routes.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What the edge routes: scope name → route.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Table {
    pub routes: BTreeMap<String, Route>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Where the public proxy sends this scope's requests.
    pub listen: SocketAddr,
    /// The scope's slots, in slot order (slot 0 first).
    pub slots: Vec<Backend>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Share of new requests, relative to the other slots' weights; 0 takes
    /// none (requests in flight finish).
    pub weight: u32,
}

impl Route {
    /// The slot that serves: the one with the larger weight (a canary's
    /// split leaves the old slot serving), `None` when no slot takes any.
    pub fn serving(&self) -> Option<usize> {
        (0..self.slots.len())
            .filter(|i| self.slots[*i].weight > 0)
            .max_by_key(|i| (self.slots[*i].weight, std::cmp::Reverse(*i)))
    }

    /// The slot that takes every new request, if one does.
    pub fn active(&self) -> Option<usize> {
        let live: Vec<usize> = (0..self.slots.len())
            .filter(|i| self.slots[*i].weight > 0)
            .collect();
        match live.as_slice() {
            [only] => Some(*only),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("cannot read the routing table \"{path}\": {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the routing table \"{path}\" is unreadable: {detail}")]
    Decode { path: PathBuf, detail: String },
    #[error("cannot write the routing table \"{path}\": {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Table {
    /// The table at `path`; an absent file is an empty table.
    pub fn load(path: &Path) -> Result<Table, TableError> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Table::default()),
            Err(source) => {
                return Err(TableError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes).map_err(|e| TableError::Decode {
            path: path.to_owned(),
            detail: e.to_string(),
        })
    }

    /// Replace the table at `path` as one step: whole or not at all.
    pub fn save(&self, path: &Path) -> Result<(), TableError> {
        let write_err = |source| TableError::Write {
            path: path.to_owned(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(self).expect("a table always serializes");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(write_err)?;
        file.write_all(&bytes).map_err(write_err)?;
        file.sync_all().map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(write_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn route(weights: [u32; 2]) -> Route {
        Route {
            listen: "127.0.0.1:3000".parse().expect("address"),
            slots: vec![
                Backend {
                    addr: "127.0.0.1:3101".parse().expect("address"),
                    weight: weights[0],
                },
                Backend {
                    addr: "127.0.0.1:3102".parse().expect("address"),
                    weight: weights[1],
                },
            ],
        }
    }

    #[test]
    fn a_saved_table_is_read_back_owner_only_and_an_absent_one_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routes.json");
        assert_eq!(Table::load(&path).expect("absent"), Table::default());
        let table = Table {
            routes: BTreeMap::from([("web".to_string(), route([0, 100]))]),
        };
        table.save(&path).expect("save");
        assert_eq!(Table::load(&path).expect("load"), table);
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[test]
    fn a_damaged_table_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("routes.json");
        std::fs::write(&path, b"{\"routes\": {").expect("write");
        assert_eq!(
            Table::load(&path).expect_err("damaged").to_string(),
            format!(
                "the routing table \"{}\" is unreadable: EOF while parsing an object at line 1 column 12",
                path.display()
            )
        );
    }

    #[test]
    fn the_active_slot_is_the_only_one_with_weight() {
        assert_eq!(route([100, 0]).active(), Some(0));
        assert_eq!(route([0, 100]).active(), Some(1));
        assert_eq!(route([90, 10]).active(), None, "a canary step");
        assert_eq!(route([0, 0]).active(), None);
        assert_eq!(route([90, 10]).serving(), Some(0));
        assert_eq!(route([10, 90]).serving(), Some(1));
        assert_eq!(route([50, 50]).serving(), Some(0));
        assert_eq!(route([0, 0]).serving(), None);
    }
}
