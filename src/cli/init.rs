//! `moorline init --url URL [--branch B] [--manifest PATH] [--ssh-key …]`: write a host
//! config for a new host, after checking that the source can be read and its
//! manifest validates at the branch head; print the plan and the commands
//! that start the agent. Nothing is written when a check fails.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::api;
use crate::config::{self, Config};
use crate::rollout::Engine;
use crate::store::Store;

/// What `init` was asked for.
pub struct Init<'a> {
    pub path: &'a Path,
    pub home: &'a Path,
    pub url: &'a str,
    pub branch: &'a str,
    pub manifest: &'a str,
    /// More `[source]` keys (`ssh_key`, `token_file`, …), as given.
    pub source: &'a [(&'a str, &'a str)],
}

/// The config `init` writes: the source, and the rest at its defaults.
pub fn config_text(url: &str, branch: &str, manifest: &str, source: &[(&str, &str)]) -> String {
    let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
    let more: String = source
        .iter()
        .map(|(key, value)| format!("{key} = {}\n", quote(value)))
        .collect();
    format!(
        "# moorline host config, written by `moorline init`; every key is in\n\
         # docs/manifest.md of the moorline repository.\n\
         [source]\n\
         url = {}\n\
         branch = {}\n\
         manifest = {}\n\
         poll = \"60s\"\n\
         {more}\
         \n\
         [trigger]\n\
         watch = true\n",
        quote(url),
        quote(branch),
        quote(manifest)
    )
}

/// 0 written, 1 the manifest at the branch head is invalid, 2 an error;
/// stdout and stderr are printed by the caller.
pub fn run(init: &Init<'_>) -> (u8, String, String) {
    if init.path.exists() {
        return (
            super::ERROR,
            String::new(),
            format!(
                "error: \"{}\" exists; moorline init does not overwrite a host config (edit it, or remove it first)\n",
                init.path.display()
            ),
        );
    }
    let text = config_text(init.url, init.branch, init.manifest, init.source);
    let label = init.path.display().to_string();
    let config = match config::parse(&label, text.as_bytes(), init.home) {
        Ok(config) => Config {
            path: init.path.to_path_buf(),
            ..config
        },
        Err(diagnostics) => return (super::ERROR, String::new(), format!("{diagnostics}\n")),
    };
    let view = match check(&config) {
        Ok(view) => view,
        Err((code, message)) => {
            return (
                code,
                String::new(),
                format!("{message}\nnothing was written\n"),
            );
        }
    };
    if let Err(e) = write_new(init.path, &text) {
        return (
            super::ERROR,
            String::new(),
            format!("error: cannot write \"{}\": {e}\n", init.path.display()),
        );
    }
    let mut out = format!("wrote {}\n", init.path.display());
    out.push_str(&super::plan::render(&view));
    out.push_str(
        "next:\n  systemctl --user daemon-reload\n  systemctl --user enable --now moorline\n  \
         sudo loginctl enable-linger \"$USER\"   # run without a login session, start at boot\n  \
         moorline status\n",
    );
    (super::OK, out, String::new())
}

/// Fetch the branch and plan its head for a host that runs nothing yet.
fn check(config: &Config) -> Result<api::PlanView, (u8, String)> {
    let error = |e: String| (super::ERROR, format!("error: {e}"));
    // The source first: a host whose source cannot be read gets no state
    // directory either (a remote one is mirrored into it, so that comes first).
    let source = crate::source::git::Source::new(&config.source, &config.state.dir);
    if source.local_path().is_none() {
        crate::privacy::prepare_state_dir(&config.state.dir).map_err(|e| error(e.to_string()))?;
    }
    let head = fetch_within(&source, config.source.fetch_timeout)
        .map_err(|e| error(format!("cannot read the source: {e}")))?;
    crate::privacy::prepare_state_dir(&config.state.dir).map_err(|e| error(e.to_string()))?;
    let store = Store::open(&config.state.dir).map_err(|e| error(e.to_string()))?;
    let engine = Engine::new(config.clone(), store);
    match engine.plan_for(&head) {
        Ok((_, plan)) => Ok(api::PlanView::from(&plan)),
        Err(crate::rollout::Error::Manifest(d)) => Err((
            super::NEGATIVE,
            format!(
                "{d}\nerror: the manifest at {} of branch \"{}\" is invalid",
                super::short(&head),
                config.source.branch
            ),
        )),
        Err(e) => Err(error(e.to_string())),
    }
}

/// `Source::fetch`, given up after `limit` (`fetch_timeout`): a remote that
/// never answers does not hang `moorline init`.
fn fetch_within(
    source: &crate::source::git::Source,
    limit: std::time::Duration,
) -> Result<String, crate::source::git::GitError> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let interrupt = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let url = source.url_text();
    let (source, flag) = (source.clone(), Arc::clone(&interrupt));
    std::thread::spawn(move || {
        let _ = tx.send(source.fetch_until(&flag));
    });
    match rx.recv_timeout(limit) {
        Ok(fetched) => fetched,
        Err(_) => {
            interrupt.store(true, Ordering::SeqCst);
            Err(crate::source::git::GitError::TimedOut { url, after: limit })
        }
    }
}

/// Create `path` (and its directory) owner-only; fails if it exists.
fn write_new(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}
