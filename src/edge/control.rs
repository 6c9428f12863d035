//! The edge's control channel: the agent sets and removes routes, holds and
//! releases a scope's new requests, and reads the edge's report (routes,
//! listeners, per-slot figures), over `<state>/edge/edge.sock` (owner-only,
//! peer uid checked; see `channel`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::stats::Figures;
use super::table::{Backend, Route};
use crate::channel::{self, ChannelError};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Report,
    Set {
        scope: String,
        route: Route,
    },
    Remove {
        scope: String,
    },
    /// New requests for the scope wait up to `ms` until `Release`.
    Hold {
        scope: String,
        ms: u64,
    },
    Release {
        scope: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Report(Report),
    Done,
    Error(String),
}

/// What the edge says of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub pid: u32,
    pub routes: BTreeMap<String, RouteReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteReport {
    pub listen: SocketAddr,
    /// Whether its listener accepts connections.
    pub listening: bool,
    /// Whether new requests wait (a restart under `hold`).
    pub held: bool,
    pub slots: Vec<SlotReport>,
}

impl RouteReport {
    /// The route as the edge serves it.
    pub fn route(&self) -> Route {
        Route {
            listen: self.listen,
            slots: self
                .slots
                .iter()
                .map(|s| Backend {
                    addr: s.addr,
                    weight: s.weight,
                })
                .collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotReport {
    pub addr: SocketAddr,
    pub weight: u32,
    pub figures: Figures,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("the edge refused: {0}")]
    Refused(String),
}

impl ControlError {
    /// The edge is not (yet) running: starting it may help.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            ControlError::Channel(ChannelError::Unreachable { .. })
        )
    }
}

/// The agent's end of the channel.
#[derive(Debug, Clone)]
pub struct EdgeClient {
    socket: PathBuf,
}

impl EdgeClient {
    pub fn new(state_dir: &Path) -> EdgeClient {
        EdgeClient {
            socket: super::socket_path(state_dir),
        }
    }

    async fn call(&self, request: &Request) -> Result<Response, ControlError> {
        let response =
            channel::call("edge", &self.socket, request, Duration::from_secs(10)).await?;
        match response {
            Response::Error(e) => Err(ControlError::Refused(e)),
            other => Ok(other),
        }
    }

    async fn done(&self, request: Request) -> Result<(), ControlError> {
        match self.call(&request).await? {
            Response::Done => Ok(()),
            other => Err(ControlError::Refused(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    pub async fn report(&self) -> Result<Report, ControlError> {
        match self.call(&Request::Report).await? {
            Response::Report(report) => Ok(report),
            other => Err(ControlError::Refused(format!(
                "unexpected answer {other:?}"
            ))),
        }
    }

    pub async fn set(&self, scope: &str, route: Route) -> Result<(), ControlError> {
        let scope = scope.to_string();
        self.done(Request::Set { scope, route }).await
    }

    pub async fn remove(&self, scope: &str) -> Result<(), ControlError> {
        let scope = scope.to_string();
        self.done(Request::Remove { scope }).await
    }

    pub async fn hold(&self, scope: &str, limit: Duration) -> Result<(), ControlError> {
        let (scope, ms) = (scope.to_string(), limit.as_millis() as u64);
        self.done(Request::Hold { scope, ms }).await
    }

    pub async fn release(&self, scope: &str) -> Result<(), ControlError> {
        let scope = scope.to_string();
        self.done(Request::Release { scope }).await
    }
}
