//! How a fetch reaches a private remote: the ssh command gix runs (a deploy
//! key, a strict known-hosts file), the token an https remote is given as
//! basic auth, the extra CA certificates its certificate may chain to, and
//! what an ssh refusal of the host key means.
//!
//! Everything is read again on every fetch, from the files the host config
//! names: a rotated key or token takes effect at the next fetch, and no
//! secret is kept where it could reach a log, the history or status.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::config::Access;

/// Why the access files gave nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("cannot read {key} \"{}\": {source}", path.display())]
    Unreadable {
        key: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{key} \"{}\" is empty", path.display())]
    Empty {
        key: &'static str,
        path: std::path::PathBuf,
    },
    #[error("ca_file \"{}\" holds no PEM certificate: {reason}", path.display())]
    BadCertificate {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error(
        "ssh_key \"{}\" can be read by other users (mode {mode:o}); ssh refuses such a key: chmod 600 it",
        path.display()
    )]
    OpenKey { path: std::path::PathBuf, mode: u32 },
}

/// `core.sshCommand` for a fetch: only the deploy key (when one is given),
/// only the known-hosts file, strictly, never a prompt, connecting within
/// `connect`. The user's `~/.ssh/config` still applies where these leave
/// something open (a `ProxyJump`, say); options on the command line win.
pub fn ssh_command(access: &Access, connect: Duration) -> Result<String, AccessError> {
    let mut words = vec!["ssh".to_owned()];
    if let Some(key) = &access.ssh_key {
        check_key(key)?;
        words.extend(["-i".into(), key.to_string_lossy().into_owned()]);
        words.extend(option("IdentitiesOnly=yes"));
        words.extend(option("IdentityAgent=none"));
    }
    words.extend(options(access, connect));
    let words: Vec<String> = words.iter().map(|w| quote(w)).collect();
    Ok(words.join(" "))
}

/// The options every ssh of a fetch gets, the host-key ones first, as
/// arguments (`ssh_command` quotes them for the shell).
fn options(access: &Access, connect: Duration) -> Vec<String> {
    let mut words = Vec::new();
    if let Some(known) = &access.known_hosts {
        // ssh splits this option's value on spaces unless it is quoted.
        let value = format!("UserKnownHostsFile=\"{}\"", known.to_string_lossy());
        words.extend(option(&value));
        words.extend(option("GlobalKnownHostsFile=/dev/null"));
    }
    for fixed in [
        "StrictHostKeyChecking=yes",
        "UpdateHostKeys=no",
        "BatchMode=yes",
        "HashKnownHosts=no",
    ] {
        words.extend(option(fixed));
    }
    words.extend(option(&format!(
        "ConnectTimeout={}",
        connect.as_secs().max(1)
    )));
    words
}

fn option(value: &str) -> [String; 2] {
    ["-o".to_owned(), value.to_owned()]
}

/// One shell word (gix runs `core.sshCommand` through `sh -c`).
fn quote(text: &str) -> String {
    if !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
    {
        return text.to_owned();
    }
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// ssh ignores a key others can read, with a warning nobody sees: say it.
fn check_key(path: &Path) -> Result<(), AccessError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| AccessError::Unreadable {
        key: "ssh_key",
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AccessError::OpenKey {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// The token of `token_file`, without the newline an editor leaves.
pub fn token(path: &Path) -> Result<String, AccessError> {
    use crate::privacy::{SecretFileError, read_secret_file_blocking};
    let unreadable = |source| AccessError::Unreadable {
        key: "token_file",
        path: path.to_path_buf(),
        source,
    };
    let bytes = read_secret_file_blocking(path).map_err(|e| match e {
        SecretFileError::Unreadable(source) => unreadable(source),
        SecretFileError::Empty => AccessError::Empty {
            key: "token_file",
            path: path.to_path_buf(),
        },
    })?;
    String::from_utf8(bytes).map_err(|e| {
        unreadable(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e.utf8_error(),
        ))
    })
}

/// The certificates of `ca_file`, added to the system's for https remotes.
pub fn certificates(path: &Path) -> Result<Vec<reqwest::Certificate>, AccessError> {
    let pem = std::fs::read(path).map_err(|source| AccessError::Unreadable {
        key: "ca_file",
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| AccessError::BadCertificate {
        path: path.to_path_buf(),
        reason,
    };
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no BEGIN CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// What ssh said of the remote's host key when it refused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKeyRefusal {
    /// The host as known-hosts files name it: `host`, or `[host]:port`.
    pub host: String,
    /// `ED25519 SHA256:…`: the key the remote showed.
    pub fingerprint: String,
    /// The line of the known-hosts file that holds another key, when the
    /// key changed; `None` when the host is unknown.
    pub offending: Option<String>,
}

/// Ask ssh, verbosely, whether it accepts the host key of `host`:`port`,
/// with the fetch's own options, authenticating with nothing (it stops at
/// the key or right after). `None` when the key is not what failed.
pub fn diagnose_host_key(
    access: &Access,
    user: Option<&str>,
    host: &str,
    port: Option<u16>,
    connect: Duration,
) -> Option<HostKeyRefusal> {
    let mut cmd = Command::new("ssh");
    cmd.arg("-v")
        .args(["-o", "PreferredAuthentications=hostbased"])
        .args(["-o", "HostbasedAuthentication=no"])
        .args(["-o", "IdentityAgent=none"])
        .args(["-o", "IdentitiesOnly=yes"]);
    cmd.args(options(access, connect));
    if let Some(port) = port {
        cmd.args(["-p", &port.to_string()]);
    }
    let target = match user {
        Some(user) => format!("{user}@{host}"),
        None => host.to_owned(),
    };
    cmd.args(["--", &target, "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let out = cmd.output().ok()?;
    let label = match port {
        Some(port) if port != 22 => format!("[{host}]:{port}"),
        _ => host.to_owned(),
    };
    parse_refusal(&String::from_utf8_lossy(&out.stderr), &label)
}

/// The refusal in ssh's `-v` output, if the host key was refused.
fn parse_refusal(stderr: &str, host: &str) -> Option<HostKeyRefusal> {
    if !stderr.contains("Host key verification failed") {
        return None;
    }
    let fingerprint = stderr.lines().find_map(|line| {
        let rest = line.split_once("Server host key: ")?.1;
        let (kind, hash) = rest.split_once(' ')?;
        let kind = kind
            .strip_prefix("ssh-")
            .or_else(|| kind.strip_prefix("ecdsa-sha2-").map(|_| "ecdsa"))
            .unwrap_or(kind);
        Some(format!("{} {}", kind.to_uppercase(), hash.trim()))
    })?;
    let offending = stderr.lines().find_map(|line| {
        let rest = line.split_once("Offending ")?.1;
        Some(rest.split_once(" key in ")?.1.trim().to_owned())
    });
    Some(HostKeyRefusal {
        host: host.to_owned(),
        fingerprint,
        offending,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ssh_command_offers_only_the_key_and_checks_hosts_strictly() {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = dir.path().join("deploy key");
        std::fs::write(&key, "k").expect("key");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let access = Access {
            ssh_key: Some(key.clone()),
            known_hosts: Some("/home/ops/.config/moorline/known hosts".into()),
            ..Access::default()
        };
        let cmd = ssh_command(&access, Duration::from_secs(30)).expect("a command");
        assert_eq!(
            cmd,
            format!(
                "ssh -i '{}' -o IdentitiesOnly=yes -o IdentityAgent=none \
                 -o 'UserKnownHostsFile=\"/home/ops/.config/moorline/known hosts\"' \
                 -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=yes \
                 -o UpdateHostKeys=no -o BatchMode=yes -o HashKnownHosts=no -o ConnectTimeout=30",
                key.display()
            )
        );
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = ssh_command(&access, Duration::from_secs(30)).expect_err("an open key");
        assert_eq!(
            err.to_string(),
            format!(
                "ssh_key \"{}\" can be read by other users (mode 644); ssh refuses such a key: chmod 600 it",
                key.display()
            )
        );
    }

    #[test]
    fn a_token_file_gives_its_token_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("token");
        std::fs::write(&file, "ghp_abc\n").expect("token");
        assert_eq!(token(&file).expect("a token"), "ghp_abc");
        std::fs::write(&file, "\n").expect("token");
        assert_eq!(
            token(&file).expect_err("empty").to_string(),
            format!("token_file \"{}\" is empty", file.display())
        );
        std::fs::write(&file, "not a pem").expect("pem");
        assert_eq!(
            certificates(&file).expect_err("no certificate").to_string(),
            format!(
                "ca_file \"{}\" holds no PEM certificate: no BEGIN CERTIFICATE block",
                file.display()
            )
        );
    }

    #[test]
    fn ssh_refusals_are_read_for_the_host_and_the_fingerprint() {
        let unknown = "debug1: Connecting to 127.0.0.1 [127.0.0.1] port 2222.\n\
            debug1: Server host key: ssh-ed25519 SHA256:q5V1wGx0l1zR8mY3\n\
            No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\n\
            Host key verification failed.\n";
        assert_eq!(
            parse_refusal(unknown, "[127.0.0.1]:2222"),
            Some(HostKeyRefusal {
                host: "[127.0.0.1]:2222".into(),
                fingerprint: "ED25519 SHA256:q5V1wGx0l1zR8mY3".into(),
                offending: None,
            })
        );
        let changed = "debug1: Server host key: ecdsa-sha2-nistp256 SHA256:Zz9\n\
            @    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n\
            Offending ECDSA key in /home/ops/.ssh/known_hosts:3\n\
            Host key verification failed.\n";
        assert_eq!(
            parse_refusal(changed, "git.example.com"),
            Some(HostKeyRefusal {
                host: "git.example.com".into(),
                fingerprint: "ECDSA SHA256:Zz9".into(),
                offending: Some("/home/ops/.ssh/known_hosts:3".into()),
            })
        );
        let denied = "debug1: Server host key: ssh-ed25519 SHA256:q5V\n\
            git@127.0.0.1: Permission denied (publickey).\n";
        assert_eq!(parse_refusal(denied, "h"), None);
    }
}
