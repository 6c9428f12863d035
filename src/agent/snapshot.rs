//! The status snapshot the agent keeps on disk (owner-only, written
//! atomically), so `moorline status` can answer while the agent is down.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::api::StatusReport;

pub const SNAPSHOT_NAME: &str = "status.json";

pub fn snapshot_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SNAPSHOT_NAME)
}

pub fn write(state_dir: &Path, report: &StatusReport) -> std::io::Result<()> {
    use std::io::Write;
    let path = snapshot_path(state_dir);
    let tmp = state_dir.join(format!(".{SNAPSHOT_NAME}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(report).expect("status reports always serialize"))?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// Read the snapshot a (stopped) agent left, marked as not running.
pub fn read(state_dir: &Path) -> Option<StatusReport> {
    let bytes = std::fs::read(snapshot_path(state_dir)).ok()?;
    let mut report: StatusReport = serde_json::from_slice(&bytes).ok()?;
    report.agent.running = false;
    report.agent.pid = None;
    report.agent.activity = "not running".into();
    Some(report)
}
