//! Host configuration (`~/.config/moorline/config.toml`): raw serde fragments
//! validated into [`Config`], with `file:line:col` errors.

#![allow(
    dead_code,
    unused_imports,
    reason = "consumed by the agent, plan and CLI built on other branches; drop at merge"
)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Validated host configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    pub source: SourceConfig,
    pub trigger: TriggerConfig,
    pub state: StateConfig,
    pub docker: DockerConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceUrl {
    /// A local path or `file://` URL, made absolute.
    Local(PathBuf),
    /// `https://`, `http://` or `ssh://` (and scp-like `user@host:path`).
    Remote(String),
}

#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub url: SourceUrl,
    pub branch: String,
    /// Repository-relative path of the manifest. Default `deploy/moorline.toml`.
    pub manifest: String,
    /// Default 60s.
    pub poll: Duration,
    pub allow_force_push: bool,
}

#[derive(Debug, Clone, Default)]
pub struct TriggerConfig {
    /// Default true.
    pub watch: bool,
    pub webhook: Option<WebhookConfig>,
}

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    /// `~` expanded.
    pub secret_file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct StateConfig {
    /// `~` expanded; default `~/.local/share/moorline`.
    pub dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Default `unix:///var/run/docker.sock`.
    pub host: String,
}
