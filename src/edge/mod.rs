//! `moorline edge`: the HTTP/1.1 reverse proxy in front of zero-downtime
//! scopes. It runs as its own user unit (`moorline-edge.service`), apart
//! from the agent, so restarting, upgrading or killing the agent never drops
//! a request. It listens on every edge scope's `listen`, sends each request
//! to the scope's slot(s) by weight, counts each slot's answers, and keeps
//! its routing table in `<state>/edge/routes.json` so that a restart comes
//! back with the last routes. The agent drives it over `edge.sock`.

pub mod control;
mod proxy;
pub mod stats;
pub mod table;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{error, info};

use control::{Report, Request, Response};
use proxy::Edge;
use table::{Table, TableError};

/// The user unit the edge runs as.
pub const UNIT: &str = "moorline-edge.service";

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("edge")
}

pub fn socket_path(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("edge.sock")
}

pub fn table_path(state_dir: &Path) -> PathBuf {
    dir(state_dir).join("routes.json")
}

/// The unit file the agent installs when no package did: the edge of this
/// binary and host configuration, restarted whenever it stops.
pub fn unit_text(exe: &Path, config: &Path) -> String {
    format!(
        "[Unit]\n\
         Description=moorline edge: the HTTP proxy in front of zero-downtime scopes\n\
         \n\
         [Service]\n\
         Type=notify\n\
         ExecStart={} --config {} edge\n\
         Restart=always\n\
         RestartSec=100ms\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        crate::runtime::systemd::quote_arg(&exe.to_string_lossy()),
        crate::runtime::systemd::quote_arg(&config.to_string_lossy()),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot create the edge's directory \"{path}\": {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Channel(#[from] crate::channel::ChannelError),
}

/// Run the edge until SIGTERM or SIGINT.
pub async fn run(state_dir: &Path) -> Result<(), EdgeError> {
    let dir = dir(state_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| EdgeError::Dir {
            path: dir.clone(),
            source,
        })?;
    let path = table_path(state_dir);
    let table = match Table::load(&path) {
        Ok(table) => table,
        Err(e @ TableError::Decode { .. }) => {
            // Kept for a look; the agent sets every route again.
            let aside = path.with_extension("json.damaged");
            error!(error = %e, aside = %aside.display(), "starting with no routes");
            let _ = std::fs::rename(&path, &aside);
            Table::default()
        }
        Err(e) => {
            error!(error = %e, "starting with no routes");
            Table::default()
        }
    };
    let edge = Arc::new(Edge::new(path));
    for (scope, route) in table.routes {
        if let Err(e) = edge.set(&scope, route, false).await {
            error!(scope, error = %e, "cannot restore the route");
        }
    }
    let listener = crate::channel::bind(&socket_path(state_dir))?;
    let server = tokio::spawn(crate::channel::serve(listener, {
        let edge = edge.clone();
        move |request, _peer| {
            let edge = edge.clone();
            async move { handle(&edge, request).await }
        }
    }));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    info!(pid = std::process::id(), "edge ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a signal handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    server.abort();
    info!("edge stopped");
    Ok(())
}

async fn handle(edge: &Arc<Edge>, request: Result<Request, String>) -> Response {
    let done = |result: Result<(), String>| match result {
        Ok(()) => Response::Done,
        Err(e) => Response::Error(e),
    };
    match request {
        Err(malformed) => Response::Error(malformed),
        Ok(Request::Report) => Response::Report(Report {
            pid: std::process::id(),
            routes: edge.report(),
        }),
        Ok(Request::Set { scope, route }) => done(edge.set(&scope, route, true).await),
        Ok(Request::Remove { scope }) => done(edge.remove(&scope).await),
        Ok(Request::Hold { scope, ms }) => {
            done(edge.hold(&scope, std::time::Duration::from_millis(ms)))
        }
        Ok(Request::Release { scope }) => done(edge.release(&scope)),
    }
}
