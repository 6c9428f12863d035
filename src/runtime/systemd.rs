//! TEMPORARY STUB (replaced by the systemd branch)
use std::path::{Path, PathBuf};
use std::time::Duration;
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct SystemdError;
#[derive(Clone)]
pub struct Systemd;
pub struct UnitState { pub load_state: String, pub active_state: String, pub sub_state: String }
impl Systemd {
    pub async fn connect() -> Result<Systemd, SystemdError> { Err(SystemdError) }
    pub async fn install_unit_file(&self, _src: &Path, _unit: &str) -> Result<bool, SystemdError> { Err(SystemdError) }
    pub async fn write_dropin(&self, _unit: &str, _release: &Path, _commit: &str) -> Result<bool, SystemdError> { Err(SystemdError) }
    pub async fn daemon_reload(&self) -> Result<(), SystemdError> { Err(SystemdError) }
    pub async fn restart(&self, _unit: &str) -> Result<(), SystemdError> { Err(SystemdError) }
    pub async fn stop(&self, _unit: &str) -> Result<(), SystemdError> { Err(SystemdError) }
    pub async fn unit_state(&self, _unit: &str) -> Result<UnitState, SystemdError> { Err(SystemdError) }
    pub async fn settle(&self, _unit: &str, _w: Duration) -> Result<(), SystemdError> { Err(SystemdError) }
    pub fn unit_dir(&self) -> PathBuf { PathBuf::new() }
}
