//! One JSON request line and one JSON response line per connection, over a
//! Unix socket only its owner can use (mode 0600, and the peer's uid checked
//! on every connection). The agent's control channel (`api`) and the edge's
//! (`edge::control`) are both this.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::warn;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("the {peer} is not running (no answer on \"{path}\")")]
    Unreachable { peer: &'static str, path: PathBuf },
    #[error("the {peer} at \"{path}\" did not answer properly: {detail}")]
    Protocol {
        peer: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("cannot listen on \"{path}\": {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Who is on the other end of a connection, from its socket's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
}

impl Peer {
    /// `name (uid N)` from the password database, or `uid N`.
    pub fn describe(&self) -> String {
        let name = std::fs::read_to_string("/etc/passwd")
            .ok()
            .and_then(|text| {
                text.lines().find_map(|line| {
                    let mut fields = line.split(':');
                    let name = fields.next()?;
                    let uid = fields.nth(1)?;
                    (uid == self.uid.to_string()).then(|| name.to_string())
                })
            });
        match name {
            Some(name) => format!("{name} (uid {})", self.uid),
            None => format!("uid {}", self.uid),
        }
    }
}

/// Bind the socket at `path`: a stale socket file is replaced; mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ChannelError> {
    let listen_err = |source| ChannelError::Listen {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        std::fs::remove_file(path).map_err(listen_err)?;
    }
    let listener = UnixListener::bind(path).map_err(listen_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(listen_err)?;
    Ok(listener)
}

/// Serve until the task is dropped: each request line, decoded (or the
/// reason it could not be), is answered with what `handle` returns, told
/// who sent it. Connections from another uid are closed unanswered.
pub async fn serve<Req, Resp, H, Fut>(listener: UnixListener, handle: H)
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Fn(Result<Req, String>, Peer) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let own_uid = rustix::process::getuid().as_raw();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let peer = match stream.peer_cred() {
            Ok(cred) if cred.uid() == own_uid => Peer { uid: cred.uid() },
            Ok(cred) => {
                warn!(
                    uid = cred.uid(),
                    "refused a control connection from another user"
                );
                continue;
            }
            Err(e) => {
                warn!(error = %e, "cannot check the control connection's peer");
                continue;
            }
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut reader = BufReader::new(read);
            let mut line = String::new();
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let request =
                serde_json::from_str::<Req>(&line).map_err(|e| format!("malformed request: {e}"));
            let response = handle(request, peer).await;
            let mut bytes = serde_json::to_vec(&response).expect("responses always serialize");
            bytes.push(b'\n');
            let _ = write.write_all(&bytes).await;
        });
    }
}

/// Send one request to the `peer` ("agent", "edge") listening on `path` and
/// wait up to `limit` for its answer.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    peer: &'static str,
    path: &Path,
    request: &Req,
    limit: Duration,
) -> Result<Resp, ChannelError> {
    let protocol = |detail: String| ChannelError::Protocol {
        peer,
        path: path.to_owned(),
        detail,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|_| ChannelError::Unreachable {
            peer,
            path: path.to_owned(),
        })?;
    let mut line = serde_json::to_vec(request).expect("requests always serialize");
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| protocol(e.to_string()))?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    tokio::time::timeout(limit, reader.read_line(&mut answer))
        .await
        .map_err(|_| protocol(format!("no answer within {}s", limit.as_secs())))?
        .map_err(|e| protocol(e.to_string()))?;
    serde_json::from_str(&answer).map_err(|e| protocol(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::Peer;

    #[test]
    fn a_peer_is_named_from_the_password_database() {
        assert_eq!(Peer { uid: 0 }.describe(), "root (uid 0)");
        assert_eq!(Peer { uid: 4_000_123 }.describe(), "uid 4000123");
    }
}
