//! Owner-only state: the state directory, the history database and every
//! file the agent keeps beside them are readable by the owning user only.
//! Release directories keep the modes of their files (a container may run
//! them as another uid); the `releases` directory itself is closed.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The state directory could not be made or kept owner-only.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("cannot create state directory \"{}\": {source}", path.display())]
    Create {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot restrict state directory \"{}\" to its owner: {source}", path.display())]
    Restrict {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Why a secret file (webhook secret, notify key, HTTP token) gave no secret.
#[derive(Debug)]
pub enum SecretFileError {
    Unreadable(std::io::Error),
    Empty,
}

/// The secret in the file at `path`: its bytes without trailing newlines
/// (an editor's or `echo`'s), refused when nothing is left.
pub async fn read_secret_file(path: &Path) -> Result<Vec<u8>, SecretFileError> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(SecretFileError::Unreadable)?;
    secret_of(bytes)
}

/// `read_secret_file` for blocking code (a fetch runs on its own thread).
pub fn read_secret_file_blocking(path: &Path) -> Result<Vec<u8>, SecretFileError> {
    secret_of(std::fs::read(path).map_err(SecretFileError::Unreadable)?)
}

fn secret_of(mut bytes: Vec<u8>) -> Result<Vec<u8>, SecretFileError> {
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(SecretFileError::Empty);
    }
    Ok(bytes)
}

/// Create the state directory owner-only (and tighten an existing one).
pub fn prepare_state_dir(dir: &Path) -> Result<(), StateDirError> {
    std::fs::create_dir_all(dir).map_err(|source| StateDirError::Create {
        path: dir.to_path_buf(),
        source,
    })?;
    set_mode(dir, 0o700).map_err(|source| StateDirError::Restrict {
        path: dir.to_path_buf(),
        source,
    })
}

/// Restrict `dir` (the state directory) and what the agent writes in it:
/// directories 0700, files 0600. The contents of `releases/` are left as
/// checked out; the socket keeps its own 0600.
pub fn restrict_state_dir(dir: &Path) -> std::io::Result<()> {
    set_mode(dir, 0o700)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() && entry.file_name() == "releases" {
            set_mode(&path, 0o700)?;
        } else if kind.is_dir() {
            restrict_tree(&path)?;
        } else if kind.is_file() {
            set_mode(&path, 0o600)?;
        }
    }
    Ok(())
}

fn restrict_tree(dir: &Path) -> std::io::Result<()> {
    set_mode(dir, 0o700)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            restrict_tree(&entry.path())?;
        } else if kind.is_file() {
            set_mode(&entry.path(), 0o600)?;
        }
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    let current = std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
    if current != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn state_is_closed_to_others_but_release_files_keep_their_modes() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("state");
        std::fs::create_dir_all(dir.join("history/blobs")).expect("mkdir");
        std::fs::create_dir_all(dir.join("releases/abc/bin")).expect("mkdir");
        for file in [
            "history/db",
            "history/blobs/1",
            "status.json",
            "releases/abc/bin/run",
        ] {
            std::fs::write(dir.join(file), "x").expect("write");
            std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        std::fs::set_permissions(
            dir.join("releases/abc/bin"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        restrict_state_dir(&dir).expect("restrict");
        for owner_only in ["", "history", "history/blobs", "releases"] {
            assert_eq!(mode(&dir.join(owner_only)), 0o700, "{owner_only}");
        }
        for file in ["history/db", "history/blobs/1", "status.json"] {
            assert_eq!(mode(&dir.join(file)), 0o600, "{file}");
        }
        assert_eq!(mode(&dir.join("releases/abc/bin")), 0o755);
        assert_eq!(mode(&dir.join("releases/abc/bin/run")), 0o644);
    }
}
