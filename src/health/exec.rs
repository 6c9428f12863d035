//! The `exec` check: a command run in the release directory must exit 0.
//! Its manifest key, probe and description live here.

use std::path::Path;
use std::process::Stdio;

use crate::manifest::reader::{Reader, Table};

pub const KEY: &str = "exec";
pub const EXTRA_KEYS: &[&str] = &[];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    /// argv run in the release directory.
    pub argv: Vec<String>,
}

pub(crate) fn parse(r: &mut Reader<'_>, t: &Table<'_, '_>) -> Option<Exec> {
    let argv = t.strings(r, KEY)?;
    if argv.value.is_empty() {
        r.error(argv.span.start, "\"exec\" must not be empty");
        return None;
    }
    Some(Exec {
        argv: argv.value.iter().map(|a| a.value.to_owned()).collect(),
    })
}

impl Exec {
    pub fn describe(&self) -> String {
        format!("exec \"{}\"", self.argv.join(" "))
    }

    pub async fn probe(&self, release: &Path) -> Result<(), String> {
        let Some((program, args)) = self.argv.split_first() else {
            return Err("empty command".to_string());
        };
        let program_path = if program.contains('/') {
            release.join(program)
        } else {
            program.into()
        };
        let output = tokio::process::Command::new(&program_path)
            .args(args)
            .current_dir(release)
            .env("MOORLINE_RELEASE", release)
            .env("MOORLINE_COMMIT", release.file_name().unwrap_or_default())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| format!("cannot run: {e}"))?;
        if output.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        match output.status.code() {
            Some(code) if last.is_empty() => Err(format!("exited with status {code}")),
            Some(code) => Err(format!("exited with status {code}: {last}")),
            None => Err("killed by a signal".to_string()),
        }
    }
}
