//! Host configuration (`~/.config/moorline/config.toml`): the spanned TOML
//! tree validated into [`Config`], with `file:line:col` errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::manifest::reader::{At, Reader, Table, check_repo_path, duration, read_toml};
use crate::manifest::{Diagnostic, Diagnostics};

/// Validated host configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    pub source: SourceConfig,
    pub trigger: TriggerConfig,
    pub state: StateConfig,
    pub docker: DockerConfig,
    pub host: HostConfig,
    /// `[http]`: `/metrics` and the dashboard; off without the table.
    pub http: Option<HttpConfig>,
    /// `[[notify]]`: where rollouts are announced.
    pub notify: Vec<NotifyConfig>,
}

/// One `[[notify]]` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyConfig {
    /// How `status` and `/metrics` name it (the URL may hold a secret):
    /// `name`, or `notify-N` by its place in the file.
    pub name: String,
    pub url: String,
    pub format: NotifyFormat,
    /// `~` expanded; the HMAC key of `generic` (required for it).
    pub secret_file: Option<PathBuf>,
    /// The events sent: a rollout's outcome (`succeeded`, `failed`,
    /// `rolled-back`, `interrupted`), `cutover`, `refused`, `audit`.
    pub events: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyFormat {
    /// JSON, signed: `X-Moorline-Signature: sha256=HEX` (HMAC-SHA256 of the body).
    Generic,
    /// A Slack incoming webhook (`{"text": ...}`).
    Slack,
    /// An ntfy topic URL (text body, `Title`, `Priority`, `Tags`).
    Ntfy,
}

/// `[http]`: where the agent serves `/metrics` and its read-only dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// `~` expanded. Required unless `listen` is loopback: every request
    /// then carries `Authorization: Bearer <the file's first line>`.
    pub token_file: Option<PathBuf>,
}

/// `[host]`: who this machine is among the hosts one manifest describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// Matched against a scope's `hosts`. Default: the machine's hostname.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceUrl {
    /// A local path or `file://` URL, made absolute.
    Local(PathBuf),
    /// `https://`, `http://` or `ssh://` (and scp-like `user@host:path`).
    Remote(String),
}

/// How a source url is reached; each access key applies to some of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Local,
    Http,
    Https,
    /// `ssh://` and scp-like `user@host:path`.
    Ssh,
}

impl SourceUrl {
    pub fn transport(&self) -> Transport {
        match self {
            SourceUrl::Local(_) => Transport::Local,
            SourceUrl::Remote(u) if u.starts_with("https://") => Transport::Https,
            SourceUrl::Remote(u) if u.starts_with("http://") => Transport::Http,
            SourceUrl::Remote(_) => Transport::Ssh,
        }
    }
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
    /// How long one fetch of a remote may take, connecting included.
    /// Default 60s.
    pub fetch_timeout: Duration,
    /// How a private remote is reached: a deploy key and known hosts for
    /// ssh, a token and CA certificates for https.
    pub access: Access,
    /// `[source.verify]`: whose signatures a commit must carry to deploy.
    pub verify: Option<VerifyConfig>,
}

/// `[source.verify]`: the keys commits must be signed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyConfig {
    /// An `ssh-keygen -Y` allowed signers file (namespace `git`).
    pub allowed_signers: Option<PathBuf>,
    /// Armored OpenPGP public keys.
    pub openpgp_keys: Option<PathBuf>,
    pub commits: VerifyCommits,
}

/// Which commits of a new branch head must verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyCommits {
    /// Every commit since the deployed one (the head alone on a first deploy).
    All,
    /// The branch head only.
    Tip,
}

/// `ssh_key`, `known_hosts`, `token_file`, `token_user`, `ca_file`: each
/// read on every fetch, so a rotated key or token takes effect at the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The private key ssh offers (`-i`, and only it).
    pub ssh_key: Option<PathBuf>,
    /// The host keys ssh accepts, strictly: an unknown or changed one is
    /// refused. `~/.ssh/known_hosts` for an ssh source that names none;
    /// `None` for the other transports.
    pub known_hosts: Option<PathBuf>,
    /// A file holding the https token, sent as basic auth.
    pub token_file: Option<PathBuf>,
    /// The basic-auth user for `token_file`. Default `x-access-token`.
    pub token_user: String,
    /// Extra CA certificates (PEM) an https remote's certificate may chain to.
    pub ca_file: Option<PathBuf>,
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

const TOP_KEYS: &[&str] = &[
    "source", "trigger", "state", "docker", "host", "http", "notify",
];
const NOTIFY_KEYS: &[&str] = &["name", "url", "format", "secret_file", "events"];
const NOTIFY_FORMATS: &[&str] = &["generic", "slack", "ntfy"];
pub const NOTIFY_EVENTS: &[&str] = &[
    "succeeded",
    "failed",
    "rolled-back",
    "interrupted",
    "cutover",
    "refused",
    "audit",
];
const DEFAULT_EVENTS: &[&str] = &["failed", "rolled-back", "cutover", "refused", "audit"];
const HTTP_KEYS: &[&str] = &["listen", "token_file"];
const HOST_KEYS: &[&str] = &["name"];
const SOURCE_KEYS: &[&str] = &[
    "url",
    "branch",
    "manifest",
    "poll",
    "allow_force_push",
    "fetch_timeout",
    "ssh_key",
    "known_hosts",
    "token_file",
    "token_user",
    "ca_file",
    "verify",
];
const VERIFY_KEYS: &[&str] = &["allowed_signers", "openpgp_keys", "commits"];
const TRIGGER_KEYS: &[&str] = &["watch", "webhook"];
const WEBHOOK_KEYS: &[&str] = &["listen", "secret_file"];
const STATE_KEYS: &[&str] = &["dir"];
const DOCKER_KEYS: &[&str] = &["host"];

/// `$XDG_CONFIG_HOME/moorline/config.toml`, or `~/.config/moorline/config.toml`
/// when XDG_CONFIG_HOME is unset or not absolute (as the XDG spec asks).
pub fn default_path(home: &Path, xdg_config_home: Option<&Path>) -> PathBuf {
    let base = match xdg_config_home {
        Some(dir) if dir.is_absolute() => dir.to_path_buf(),
        _ => home.join(".config"),
    };
    base.join("moorline").join("config.toml")
}

/// Reads and validates the config at `path`; `~` expands against `$HOME`
/// and relative paths resolve against the directory of the file.
pub fn load(path: &Path) -> Result<Config, Diagnostics> {
    let label = path.display().to_string();
    let unpositioned = |message: String| {
        Diagnostics(vec![Diagnostic {
            file: label.clone(),
            position: None,
            message,
        }])
    };
    let bytes =
        std::fs::read(path).map_err(|error| unpositioned(format!("cannot read file: {error}")))?;
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| unpositioned("cannot expand \"~\": HOME is not set".to_owned()))?;
    let home = home.as_path();
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let base = absolute.parent().unwrap_or(Path::new("/")).to_path_buf();
    parse_in(&label, &bytes, home, &base, path.to_path_buf())
}

/// Validates config text. `~` expands against `home`; relative paths resolve
/// against the directory of `file_label`. (`load` reads a file; `moorline
/// init` checks the config it is about to write; tests feed text.)
pub fn parse(file_label: &str, bytes: &[u8], home: &Path) -> Result<Config, Diagnostics> {
    let path = PathBuf::from(file_label);
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    parse_in(file_label, bytes, home, &base, path)
}

fn parse_in(
    file_label: &str,
    bytes: &[u8],
    home: &Path,
    base: &Path,
    path: PathBuf,
) -> Result<Config, Diagnostics> {
    let paths = Paths { home, base };
    read_toml(file_label, bytes, |r, root| {
        root.check_keys(r, TOP_KEYS);
        let source = match root.table(r, "source", "[source]".to_owned()) {
            Some(t) => read_source(r, &t, &paths),
            None => {
                if root.value("source").is_none() {
                    r.error(
                        0,
                        "missing [source] table; it names the repository to follow, e.g. url = \"/srv/git/app.git\"",
                    );
                }
                None
            }
        };
        let trigger = read_trigger(r, &root, &paths);
        let state = read_state(r, &root, &paths);
        let docker = read_docker(r, &root);
        let host = read_host(r, &root);
        let http = read_http(r, &root, &paths);
        let notify = read_notify(r, &root, &paths);
        Some(Config {
            path,
            source: source?,
            trigger: trigger?,
            state: state?,
            docker: docker?,
            host: host?,
            http: http?,
            notify: notify?,
        })
    })
}

/// Where `~` and relative paths point.
struct Paths<'p> {
    home: &'p Path,
    base: &'p Path,
}

impl Paths<'_> {
    /// Expands `~` and resolves relative paths; `~user` is refused.
    fn resolve(&self, r: &mut Reader<'_>, at: &At<&str>) -> Option<PathBuf> {
        let text = at.value;
        if text.is_empty() {
            r.error(at.span.start, "path must not be empty");
            return None;
        }
        if text.contains('\0') {
            r.error(at.span.start, format!("path {text:?} contains a NUL byte"));
            return None;
        }
        if text == "~" {
            return Some(self.home.to_path_buf());
        }
        if let Some(rest) = text.strip_prefix("~/") {
            return Some(self.home.join(rest));
        }
        if text.starts_with('~') {
            r.error(
                at.span.start,
                format!("path {text:?} names another user's home; use \"~/\" or an absolute path"),
            );
            return None;
        }
        Some(self.base.join(text))
    }
}

fn read_source(r: &mut Reader<'_>, t: &Table<'_, '_>, paths: &Paths<'_>) -> Option<SourceConfig> {
    t.check_keys(r, SOURCE_KEYS);
    let url = t
        .required_string(r, "url")
        .and_then(|u| source_url(r, &u, paths));
    let branch = match t.string(r, "branch") {
        Some(b) if valid_branch(b.value) => Some(b.value.to_owned()),
        Some(b) => {
            r.error(b.span.start, format!("invalid branch name {:?}", b.value));
            None
        }
        None => Some("main".to_owned()),
    };
    let manifest = match t.string(r, "manifest") {
        Some(m) => check_repo_path(r, &m).then(|| m.value.to_owned()),
        None => Some("deploy/moorline.toml".to_owned()),
    };
    let poll = match t.value("poll") {
        None => Some(Duration::from_secs(60)),
        Some(_) => duration(r, t, "poll").and_then(|p| {
            if p.value < Duration::from_secs(1) {
                r.error(
                    p.span.start,
                    format!(
                        "poll interval {:?} is shorter than 1s",
                        t.value("poll")
                            .and_then(|v| v.get_ref().as_str())
                            .unwrap_or("")
                    ),
                );
                return None;
            }
            Some(p.value)
        }),
    };
    let allow_force_push = match t.value("allow_force_push") {
        None => Some(false),
        Some(_) => t.boolean(r, "allow_force_push").map(|b| b.value),
    };
    let fetch_timeout = match t.value("fetch_timeout") {
        None => Some(Duration::from_secs(60)),
        Some(_) => duration(r, t, "fetch_timeout").and_then(|d| {
            if d.value < Duration::from_secs(1) {
                r.error(d.span.start, "fetch_timeout must be at least 1s");
                return None;
            }
            Some(d.value)
        }),
    };
    let access = url.as_ref().and_then(|u| read_access(r, t, paths, u));
    let verify = match t.value("verify") {
        None => Some(None),
        Some(_) => t
            .table(r, "verify", "[source.verify]".to_owned())
            .and_then(|v| read_verify(r, &v, paths))
            .map(Some),
    };
    Some(SourceConfig {
        url: url?,
        branch: branch?,
        manifest: manifest?,
        poll: poll?,
        allow_force_push: allow_force_push?,
        fetch_timeout: fetch_timeout?,
        access: access?,
        verify: verify?,
    })
}

fn read_verify(r: &mut Reader<'_>, t: &Table<'_, '_>, paths: &Paths<'_>) -> Option<VerifyConfig> {
    t.check_keys(r, VERIFY_KEYS);
    let mut ok = true;
    let mut path = |r: &mut Reader<'_>, key: &str| {
        let at = t.string(r, key);
        ok &= t.value(key).is_none() || at.is_some();
        let resolved = at.and_then(|at| paths.resolve(r, &at));
        ok &= t.value(key).is_none() || resolved.is_some();
        resolved
    };
    let allowed_signers = path(r, "allowed_signers");
    let openpgp_keys = path(r, "openpgp_keys");
    let commits = match t.value("commits") {
        None => Some(VerifyCommits::All),
        Some(_) => t.string(r, "commits").and_then(|c| match c.value {
            "all" => Some(VerifyCommits::All),
            "tip" => Some(VerifyCommits::Tip),
            other => {
                r.error(
                    c.span.start,
                    format!("commits must be \"all\" or \"tip\", found {other:?}"),
                );
                None
            }
        }),
    };
    if ok && allowed_signers.is_none() && openpgp_keys.is_none() {
        r.error(
            t.span.start,
            "[source.verify] needs allowed_signers, openpgp_keys or both: the keys commits must be signed with",
        );
        return None;
    }
    ok.then_some(VerifyConfig {
        allowed_signers,
        openpgp_keys,
        commits: commits?,
    })
}

/// The access keys of `[source]`, each refused where the url's transport
/// cannot use it (a deploy key on an https source would be silently unused).
fn read_access(
    r: &mut Reader<'_>,
    t: &Table<'_, '_>,
    paths: &Paths<'_>,
    url: &SourceUrl,
) -> Option<Access> {
    let transport = url.transport();
    let named = match transport {
        Transport::Local => "local",
        Transport::Http => "http",
        Transport::Https => "https",
        Transport::Ssh => "ssh",
    };
    let mut ok = true;
    let mut path = |r: &mut Reader<'_>, key: &str, wants: Transport, needs: &str| {
        let at = t.string(r, key);
        if t.value(key).is_some() && at.is_none() {
            ok = false;
        }
        let at = at?;
        if wants != transport {
            let hint = if transport == Transport::Http && key == "token_file" {
                "; over http:// it would travel in the clear"
            } else {
                ""
            };
            r.error(
                at.span.start,
                format!("{key} applies to {needs} sources only, and url is {named}{hint}"),
            );
            ok = false;
            return None;
        }
        let resolved = paths.resolve(r, &at);
        ok &= resolved.is_some();
        resolved
    };
    let ssh = "ssh:// and user@host:path";
    let ssh_key = path(r, "ssh_key", Transport::Ssh, ssh);
    let known_hosts = path(r, "known_hosts", Transport::Ssh, ssh)
        .or_else(|| (transport == Transport::Ssh).then(|| paths.home.join(".ssh/known_hosts")));
    let token_file = path(r, "token_file", Transport::Https, "https://");
    let ca_file = path(r, "ca_file", Transport::Https, "https://");
    let token_user = match t.value("token_user") {
        None => Some("x-access-token".to_owned()),
        Some(_) => t.string(r, "token_user").and_then(|u| {
            if token_file.is_none() {
                r.error(
                    u.span.start,
                    "token_user is the user of token_file, which is not set",
                );
                return None;
            }
            if u.value.is_empty() || u.value.contains(':') || u.value.chars().any(char::is_control)
            {
                r.error(
                    u.span.start,
                    "token_user must be a non-empty basic-auth user name without ':'",
                );
                return None;
            }
            Some(u.value.to_owned())
        }),
    };
    ok.then_some(Access {
        ssh_key,
        known_hosts,
        token_file,
        token_user: token_user?,
        ca_file,
    })
}

fn source_url(r: &mut Reader<'_>, url: &At<&str>, paths: &Paths<'_>) -> Option<SourceUrl> {
    let text = url.value;
    if let Some(rest) = text.strip_prefix("file://") {
        return paths
            .resolve(
                r,
                &At {
                    span: url.span.clone(),
                    value: rest,
                },
            )
            .map(SourceUrl::Local);
    }
    for scheme in ["http://", "https://", "ssh://"] {
        if let Some(rest) = text.strip_prefix(scheme) {
            if rest.is_empty() || rest.starts_with('/') {
                r.error(url.span.start, format!("source url {text:?} names no host"));
                return None;
            }
            // The url is shown in status and logs: a secret never rides in
            // it. (An ssh user name is no secret; a password after it is.)
            let authority = rest.split('/').next().unwrap_or(rest);
            if let Some((userinfo, _)) = authority.rsplit_once('@')
                && (scheme != "ssh://" || userinfo.contains(':'))
            {
                r.error(
                    url.span.start,
                    "source url must not hold credentials: put the token in a file named by token_file (and the user in token_user)",
                );
                return None;
            }
            return Some(SourceUrl::Remote(text.to_owned()));
        }
    }
    let unsupported = || {
        format!(
            "unsupported source url {text:?}; use a local path, file://, http://, https://, ssh:// or user@host:path"
        )
    };
    if text.contains("://") {
        r.error(url.span.start, unsupported());
        return None;
    }
    // scp-like `user@host:path`: a colon before any slash, after a user.
    if let Some((before, after)) = text.split_once(':')
        && !before.contains('/')
    {
        let scp = before
            .split_once('@')
            .is_some_and(|(user, host)| !user.is_empty() && !host.is_empty())
            && !after.is_empty();
        if scp {
            return Some(SourceUrl::Remote(text.to_owned()));
        }
        r.error(url.span.start, unsupported());
        return None;
    }
    paths.resolve(r, url).map(SourceUrl::Local)
}

/// git's rules for a branch name (`git check-ref-format --branch`).
fn valid_branch(name: &str) -> bool {
    !name.is_empty()
        && name != "@"
        && !name.starts_with('-')
        && !name.starts_with('/')
        && !name.ends_with('/')
        && !name.ends_with('.')
        && !name.contains("..")
        && !name.contains("//")
        && !name.contains("@{")
        && !name
            .chars()
            .any(|c| c.is_ascii_control() || " ~^:?*[\\".contains(c))
        && name
            .split('/')
            .all(|part| !part.starts_with('.') && !part.ends_with(".lock"))
}

fn read_trigger(
    r: &mut Reader<'_>,
    root: &Table<'_, '_>,
    paths: &Paths<'_>,
) -> Option<TriggerConfig> {
    let mut trigger = TriggerConfig {
        watch: true,
        webhook: None,
    };
    let Some(t) = root.table(r, "trigger", "[trigger]".to_owned()) else {
        return root.value("trigger").is_none().then_some(trigger);
    };
    t.check_keys(r, TRIGGER_KEYS);
    let mut ok = true;
    if t.value("watch").is_some() {
        match t.boolean(r, "watch") {
            Some(w) => trigger.watch = w.value,
            None => ok = false,
        }
    }
    if t.value("webhook").is_some() {
        let webhook = t
            .table(r, "webhook", "[trigger.webhook]".to_owned())
            .and_then(|w| read_webhook(r, &w, paths));
        ok &= webhook.is_some();
        trigger.webhook = webhook;
    }
    ok.then_some(trigger)
}

fn read_webhook(r: &mut Reader<'_>, t: &Table<'_, '_>, paths: &Paths<'_>) -> Option<WebhookConfig> {
    t.check_keys(r, WEBHOOK_KEYS);
    let listen = t
        .required_string(r, "listen")
        .and_then(|l| crate::manifest::reader::socket_addr(r, &l));
    let secret_file = t
        .required_string(r, "secret_file")
        .and_then(|s| paths.resolve(r, &s));
    Some(WebhookConfig {
        listen: listen?,
        secret_file: secret_file?,
    })
}

/// `[[notify]]`: every target, or `None` when one is wrong.
fn read_notify(
    r: &mut Reader<'_>,
    root: &Table<'_, '_>,
    paths: &Paths<'_>,
) -> Option<Vec<NotifyConfig>> {
    if root.value("notify").is_none() {
        return Some(vec![]);
    }
    let tables = root.tables(r, "notify", |i| format!("[[notify]] {i}"))?;
    let mut targets = Vec::new();
    let mut ok = true;
    for (i, t) in tables.iter().enumerate() {
        t.check_keys(r, NOTIFY_KEYS);
        let name = match t.value("name") {
            None => Some(format!("notify-{}", i + 1)),
            Some(_) => t.string(r, "name").map(|n| n.value.to_string()),
        };
        let url = t.required_string(r, "url").and_then(|u| {
            let good = (u.value.starts_with("https://") || u.value.starts_with("http://"))
                && reqwest::Url::parse(u.value).is_ok();
            if !good {
                // The URL may hold a secret (a Slack hook): not repeated.
                r.error(
                    u.span.start,
                    "notify url must be an http:// or https:// URL",
                );
            }
            good.then(|| u.value.to_string())
        });
        let format = match t.value("format") {
            None => Some(NotifyFormat::Generic),
            Some(_) => t.string(r, "format").and_then(|f| match f.value {
                "generic" => Some(NotifyFormat::Generic),
                "slack" => Some(NotifyFormat::Slack),
                "ntfy" => Some(NotifyFormat::Ntfy),
                other => {
                    r.error(
                        f.span.start,
                        format!(
                            "unknown notify format {other:?}; expected one of: {}",
                            NOTIFY_FORMATS.join(", ")
                        ),
                    );
                    None
                }
            }),
        };
        let secret_file = match t.value("secret_file") {
            None => Some(None),
            Some(_) => t
                .string(r, "secret_file")
                .and_then(|s| paths.resolve(r, &s))
                .map(Some),
        };
        if format == Some(NotifyFormat::Generic) && t.value("secret_file").is_none() {
            let at = t.value("url").map_or(t.span.start, |u| u.span().start);
            r.error(
                at,
                format!(
                    "{} has format \"generic\" but no secret_file: its receiver checks X-Moorline-Signature with it",
                    t.label
                ),
            );
            ok = false;
        }
        let events = match t.value("events") {
            None => Some(DEFAULT_EVENTS.iter().map(|e| e.to_string()).collect()),
            Some(_) => t.strings(r, "events").and_then(|list| {
                let mut good = true;
                for e in &list.value {
                    if !NOTIFY_EVENTS.contains(&e.value) {
                        r.error(
                            e.span.start,
                            format!(
                                "unknown notify event {:?}; expected one of: {}",
                                e.value,
                                NOTIFY_EVENTS.join(", ")
                            ),
                        );
                        good = false;
                    }
                }
                good.then(|| list.value.iter().map(|e| e.value.to_string()).collect())
            }),
        };
        match (name, url, format, secret_file, events) {
            (Some(name), Some(url), Some(format), Some(secret_file), Some(events)) => {
                targets.push(NotifyConfig {
                    name,
                    url,
                    format,
                    secret_file,
                    events,
                })
            }
            _ => ok = false,
        }
    }
    ok.then_some(targets)
}

/// `[http]`; `Some(None)` without the table.
fn read_http(
    r: &mut Reader<'_>,
    root: &Table<'_, '_>,
    paths: &Paths<'_>,
) -> Option<Option<HttpConfig>> {
    let Some(t) = root.table(r, "http", "[http]".to_owned()) else {
        return root.value("http").is_none().then_some(None);
    };
    t.check_keys(r, HTTP_KEYS);
    let listen_at = t.required_string(r, "listen");
    let listen = listen_at
        .as_ref()
        .and_then(|l| crate::manifest::reader::socket_addr(r, l))?;
    let token_file = match t.value("token_file") {
        None => None,
        Some(_) => Some(
            t.string(r, "token_file")
                .and_then(|s| paths.resolve(r, &s))?,
        ),
    };
    if token_file.is_none() && !listen.ip().is_loopback() {
        let at = listen_at.map_or(0, |l| l.span.start);
        r.error(
            at,
            format!(
                "[http] listen {listen} is not a loopback address: set token_file, whose token every request must then carry (Authorization: Bearer TOKEN)"
            ),
        );
        return None;
    }
    Some(Some(HttpConfig { listen, token_file }))
}

fn read_state(r: &mut Reader<'_>, root: &Table<'_, '_>, paths: &Paths<'_>) -> Option<StateConfig> {
    let default = || StateConfig {
        dir: paths.home.join(".local/share/moorline"),
    };
    let Some(t) = root.table(r, "state", "[state]".to_owned()) else {
        return root.value("state").is_none().then(default);
    };
    t.check_keys(r, STATE_KEYS);
    match t.value("dir") {
        None => Some(default()),
        Some(_) => {
            let dir = t.string(r, "dir")?;
            paths.resolve(r, &dir).map(|dir| StateConfig { dir })
        }
    }
}

fn read_host(r: &mut Reader<'_>, root: &Table<'_, '_>) -> Option<HostConfig> {
    let default = || HostConfig {
        name: machine_hostname(),
    };
    let Some(t) = root.table(r, "host", "[host]".to_owned()) else {
        return root.value("host").is_none().then(default);
    };
    t.check_keys(r, HOST_KEYS);
    if t.value("name").is_none() {
        return Some(default());
    }
    let name = t.string(r, "name")?;
    if name.value.is_empty()
        || name
            .value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        r.error(
            name.span.start,
            format!(
                "host name {:?} must be a non-empty name without spaces",
                name.value
            ),
        );
        return None;
    }
    Some(HostConfig {
        name: name.value.to_owned(),
    })
}

/// This machine's hostname (`uname -n`).
pub fn machine_hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn read_docker(r: &mut Reader<'_>, root: &Table<'_, '_>) -> Option<DockerConfig> {
    let default = || DockerConfig {
        host: "unix:///var/run/docker.sock".to_owned(),
    };
    let Some(t) = root.table(r, "docker", "[docker]".to_owned()) else {
        return root.value("docker").is_none().then(default);
    };
    t.check_keys(r, DOCKER_KEYS);
    match t.value("host") {
        None => Some(default()),
        Some(_) => {
            let host = t.string(r, "host")?;
            // What the Docker client will accept, checked now rather than
            // at the first rollout.
            let known = ["unix://", "tcp://", "http://"]
                .iter()
                .any(|scheme| host.value.len() > scheme.len() && host.value.starts_with(scheme));
            if host.value.starts_with("https://") {
                r.error(
                    host.span.start,
                    format!(
                        "docker host {:?} is not supported: moorline talks to the engine without TLS; use unix://, tcp:// or http:// (an SSH or TLS tunnel to a local socket)",
                        host.value
                    ),
                );
                return None;
            }
            if !known || crate::runtime::docker::Docker::connect(host.value).is_err() {
                r.error(
                    host.span.start,
                    format!(
                        "docker host {:?} must be unix:///PATH, tcp://HOST:PORT or http://HOST:PORT",
                        host.value
                    ),
                );
                return None;
            }
            Some(DockerConfig {
                host: host.value.to_owned(),
            })
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const FILE: &str = "/etc/moorline/config.toml";
    const HOME: &str = "/home/ops";

    fn config(src: &str) -> Result<Config, String> {
        parse(FILE, src.as_bytes(), Path::new(HOME)).map_err(|d| d.to_string())
    }

    #[test]
    fn defaults_fill_everything_but_the_url() {
        let c = config("[source]\nurl = \"/srv/git/app.git\"\n").expect("minimal config is valid");
        assert_eq!(c.path, PathBuf::from(FILE));
        assert_eq!(
            c.source.url,
            SourceUrl::Local(PathBuf::from("/srv/git/app.git"))
        );
        assert_eq!(c.source.branch, "main");
        assert_eq!(c.source.manifest, "deploy/moorline.toml");
        assert_eq!(c.source.poll, Duration::from_secs(60));
        assert!(!c.source.allow_force_push);
        assert!(c.trigger.watch);
        assert!(c.trigger.webhook.is_none());
        assert_eq!(
            c.state.dir,
            PathBuf::from("/home/ops/.local/share/moorline")
        );
        assert_eq!(c.docker.host, "unix:///var/run/docker.sock");
    }

    /// A config that sets every key; also the base the property tests edit.
    pub(crate) const FULL: &str = r#"[source]
url = "https://git.example.com/app.git"
branch = "release/v2"
manifest = "ops/moorline.toml"
poll = "1m30s"
allow_force_push = true

[trigger]
watch = false
webhook = { listen = "127.0.0.1:9821", secret_file = "~/.config/moorline/webhook.secret" }

[state]
dir = "state"

[docker]
host = "tcp://127.0.0.1:2375"
"#;

    #[test]
    fn full_config() {
        let c = config(FULL).expect("full config is valid");
        assert_eq!(
            c.source.url,
            SourceUrl::Remote("https://git.example.com/app.git".to_owned())
        );
        assert_eq!(c.source.branch, "release/v2");
        assert_eq!(c.source.manifest, "ops/moorline.toml");
        assert_eq!(c.source.poll, Duration::from_secs(90));
        assert!(c.source.allow_force_push);
        assert!(!c.trigger.watch);
        let webhook = c.trigger.webhook.expect("webhook is configured");
        assert_eq!(
            webhook.listen,
            "127.0.0.1:9821".parse().expect("literal address")
        );
        assert_eq!(
            webhook.secret_file,
            PathBuf::from("/home/ops/.config/moorline/webhook.secret")
        );
        assert_eq!(c.state.dir, PathBuf::from("/etc/moorline/state"));
        assert_eq!(c.docker.host, "tcp://127.0.0.1:2375");
    }

    #[test]
    fn source_urls() {
        let cases: &[(&str, SourceUrl)] = &[
            (
                "/srv/git/app.git",
                SourceUrl::Local("/srv/git/app.git".into()),
            ),
            (
                "repo.git",
                SourceUrl::Local("/etc/moorline/repo.git".into()),
            ),
            (
                "../git/app",
                SourceUrl::Local("/etc/moorline/../git/app".into()),
            ),
            ("~/git/app", SourceUrl::Local("/home/ops/git/app".into())),
            (
                "file:///srv/git/app.git",
                SourceUrl::Local("/srv/git/app.git".into()),
            ),
            (
                "http://h/app.git",
                SourceUrl::Remote("http://h/app.git".into()),
            ),
            (
                "ssh://git@h/app.git",
                SourceUrl::Remote("ssh://git@h/app.git".into()),
            ),
            (
                "git@github.com:org/app.git",
                SourceUrl::Remote("git@github.com:org/app.git".into()),
            ),
        ];
        for (url, want) in cases {
            let c = config(&format!("[source]\nurl = {url:?}\n"))
                .unwrap_or_else(|e| panic!("{url:?} is valid but got: {e}"));
            assert_eq!(&c.source.url, want, "{url:?}");
        }
    }

    #[test]
    fn private_remote_access_is_read_and_checked_against_the_url() {
        let c = config(
            "[source]\nurl = \"ssh://git@h:2222/app.git\"\nssh_key = \"~/.config/moorline/deploy_key\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.source.access,
            Access {
                ssh_key: Some("/home/ops/.config/moorline/deploy_key".into()),
                known_hosts: Some("/home/ops/.ssh/known_hosts".into()),
                token_file: None,
                token_user: "x-access-token".into(),
                ca_file: None,
            }
        );
        let c = config(
            "[source]\nurl = \"https://git.example.com/app.git\"\ntoken_file = \"token\"\ntoken_user = \"deploy\"\nca_file = \"/etc/ssl/ca.pem\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.source.access,
            Access {
                ssh_key: None,
                known_hosts: None,
                token_file: Some("/etc/moorline/token".into()),
                token_user: "deploy".into(),
                ca_file: Some("/etc/ssl/ca.pem".into()),
            }
        );
        let refused: &[(&str, &str)] = &[
            (
                "[source]\nurl = \"https://x-access-token:ghp_s3cret@h/app.git\"\n",
                "/etc/moorline/config.toml:2:7: source url must not hold credentials: put the token in a file named by token_file (and the user in token_user)",
            ),
            (
                "[source]\nurl = \"https://ghp_s3cret@h/app.git\"\n",
                "/etc/moorline/config.toml:2:7: source url must not hold credentials: put the token in a file named by token_file (and the user in token_user)",
            ),
            (
                "[source]\nurl = \"ssh://git:hunter2@h/app.git\"\n",
                "/etc/moorline/config.toml:2:7: source url must not hold credentials: put the token in a file named by token_file (and the user in token_user)",
            ),
            (
                "[source]\nurl = \"https://h/app.git\"\nssh_key = \"k\"\n",
                "/etc/moorline/config.toml:3:11: ssh_key applies to ssh:// and user@host:path sources only, and url is https",
            ),
            (
                "[source]\nurl = \"http://h/app.git\"\ntoken_file = \"t\"\n",
                "/etc/moorline/config.toml:3:14: token_file applies to https:// sources only, and url is http; over http:// it would travel in the clear",
            ),
            (
                "[source]\nurl = \"/srv/app.git\"\nca_file = \"ca.pem\"\n",
                "/etc/moorline/config.toml:3:11: ca_file applies to https:// sources only, and url is local",
            ),
            (
                "[source]\nurl = \"https://h/app.git\"\ntoken_user = \"deploy\"\n",
                "/etc/moorline/config.toml:3:14: token_user is the user of token_file, which is not set",
            ),
            (
                "[source]\nurl = \"git@h:app.git\"\nknown_hosts = 7\n",
                "/etc/moorline/config.toml:3:15: \"known_hosts\" must be a string, found an integer",
            ),
        ];
        for (text, want) in refused {
            let got = config(text).expect_err(text).to_string();
            assert_eq!(&got, want, "{text}");
            assert!(!got.contains("s3cret") && !got.contains("hunter2"), "{got}");
        }
    }

    #[test]
    fn source_verify_names_its_keys_and_which_commits() {
        let c = config(
            "[source]\nurl = \"/srv/app.git\"\n[source.verify]\nallowed_signers = \"~/.config/moorline/allowed_signers\"\n",
        )
        .expect("valid");
        assert_eq!(
            c.source.verify,
            Some(VerifyConfig {
                allowed_signers: Some("/home/ops/.config/moorline/allowed_signers".into()),
                openpgp_keys: None,
                commits: VerifyCommits::All,
            })
        );
        let c = config(
            "[source]\nurl = \"/srv/app.git\"\n[source.verify]\nopenpgp_keys = \"/etc/moorline/trusted.asc\"\ncommits = \"tip\"\n",
        )
        .expect("valid");
        assert_eq!(c.source.verify.map(|v| v.commits), Some(VerifyCommits::Tip));
        let refused: &[(&str, &str)] = &[
            (
                "[source]\nurl = \"/srv/app.git\"\n[source.verify]\ncommits = \"tip\"\n",
                "/etc/moorline/config.toml:3:1: [source.verify] needs allowed_signers, openpgp_keys or both: the keys commits must be signed with",
            ),
            (
                "[source]\nurl = \"/srv/app.git\"\n[source.verify]\nopenpgp_keys = \"k.asc\"\ncommits = \"head\"\n",
                "/etc/moorline/config.toml:5:11: commits must be \"all\" or \"tip\", found \"head\"",
            ),
            (
                "[source]\nurl = \"/srv/app.git\"\n[source.verify]\nopenpgp_key = \"k.asc\"\n",
                "/etc/moorline/config.toml:3:1: [source.verify] needs allowed_signers, openpgp_keys or both: the keys commits must be signed with\n\
                 /etc/moorline/config.toml:4:1: unknown key \"openpgp_key\" in [source.verify]; expected one of: allowed_signers, openpgp_keys, commits",
            ),
        ];
        for (text, want) in refused {
            assert_eq!(&config(text).expect_err(text).to_string(), want, "{text}");
        }
    }

    #[test]
    fn default_path_follows_xdg() {
        let home = Path::new("/home/ops");
        assert_eq!(
            default_path(home, None),
            PathBuf::from("/home/ops/.config/moorline/config.toml")
        );
        assert_eq!(
            default_path(home, Some(Path::new("/x/cfg"))),
            PathBuf::from("/x/cfg/moorline/config.toml")
        );
        assert_eq!(
            default_path(home, Some(Path::new("rel"))),
            PathBuf::from("/home/ops/.config/moorline/config.toml")
        );
    }

    #[test]
    fn load_reads_the_file_and_resolves_against_its_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "[source]\nurl = \"app.git\"\n").expect("write config");
        let c = load(&path).expect("config is valid");
        assert_eq!(c.source.url, SourceUrl::Local(dir.path().join("app.git")));
        assert_eq!(c.path, path);
        let missing = dir.path().join("missing.toml");
        assert_eq!(
            load(&missing).map(|_| ()).map_err(|d| d.to_string()),
            Err(format!(
                "{}: cannot read file: No such file or directory (os error 2)",
                missing.display()
            ))
        );
    }

    #[test]
    fn error_messages() {
        let s = "[source]\nurl = \"/srv/app.git\"\n";
        let cases: Vec<(String, &str)> = vec![
            (
                String::new(),
                "/etc/moorline/config.toml:1:1: missing [source] table; it names the repository to follow, e.g. url = \"/srv/git/app.git\"",
            ),
            (
                "[source]\nbranch = \"main\"\n".to_owned(),
                "/etc/moorline/config.toml:1:1: missing key \"url\" in [source]",
            ),
            (
                "[source]\nurl = \"ftp://h/app\"\n".to_owned(),
                "/etc/moorline/config.toml:2:7: unsupported source url \"ftp://h/app\"; use a local path, file://, http://, https://, ssh:// or user@host:path",
            ),
            (
                "[source]\nurl = \"https://\"\n".to_owned(),
                "/etc/moorline/config.toml:2:7: source url \"https://\" names no host",
            ),
            (
                "[source]\nurl = \"host:app\"\n".to_owned(),
                "/etc/moorline/config.toml:2:7: unsupported source url \"host:app\"; use a local path, file://, http://, https://, ssh:// or user@host:path",
            ),
            (
                format!(
                    "{s}branch = \"a..b\"\nmanifest = \"../m.toml\"\npoll = \"500ms\"\nallow_force_push = \"yes\"\n"
                ),
                "/etc/moorline/config.toml:3:10: invalid branch name \"a..b\"\n\
                 /etc/moorline/config.toml:4:12: path \"../m.toml\" leaves the repository\n\
                 /etc/moorline/config.toml:5:8: poll interval \"500ms\" is shorter than 1s\n\
                 /etc/moorline/config.toml:6:20: \"allow_force_push\" must be a boolean, found a string",
            ),
            (
                format!("{s}poll = \"1 minute\"\nurll = 1\n"),
                "/etc/moorline/config.toml:3:8: duration \"1 minute\" does not parse; use e.g. \"500ms\", \"30s\", \"5m\"\n\
                 /etc/moorline/config.toml:4:1: unknown key \"urll\" in [source]; expected one of: url, branch, manifest, poll, allow_force_push, fetch_timeout, ssh_key, known_hosts, token_file, token_user, ca_file, verify",
            ),
            (
                format!("{s}[trigger]\nwatch = 1\nwebhook = {{ listen = \"localhost:99\" }}\n"),
                "/etc/moorline/config.toml:4:9: \"watch\" must be a boolean, found an integer\n\
                 /etc/moorline/config.toml:5:11: missing key \"secret_file\" in [trigger.webhook]\n\
                 /etc/moorline/config.toml:5:22: invalid listen address \"localhost:99\"; expected an IP address and port such as \"127.0.0.1:9821\"",
            ),
            (
                format!(
                    "{s}[trigger.webhook]\nlisten = \"127.0.0.1:1\"\nsecret_file = \"~ops/s\"\nsecret = \"x\"\n"
                ),
                "/etc/moorline/config.toml:5:15: path \"~ops/s\" names another user's home; use \"~/\" or an absolute path\n\
                 /etc/moorline/config.toml:6:1: unknown key \"secret\" in [trigger.webhook]; expected one of: listen, secret_file",
            ),
            (
                format!("{s}[state]\ndir = \"\"\n[docker]\nhost = \"/var/run/docker.sock\"\n"),
                "/etc/moorline/config.toml:4:7: path must not be empty\n\
                 /etc/moorline/config.toml:6:8: docker host \"/var/run/docker.sock\" must be unix:///PATH, tcp://HOST:PORT or http://HOST:PORT",
            ),
            (
                format!("state = \"/x\"\n{s}[agent]\nx = 1\n"),
                "/etc/moorline/config.toml:1:9: \"state\" must be a table, found a string\n\
                 /etc/moorline/config.toml:4:2: unknown key \"agent\" at the top level; expected one of: source, trigger, state, docker, host, http, notify",
            ),
            (
                format!("{s}[source]\n"),
                "/etc/moorline/config.toml:3:2: invalid TOML: duplicate key \"source\"",
            ),
        ];
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|(src, want)| {
                let got = match config(src) {
                    Ok(_) => "parsed".to_owned(),
                    Err(e) => e,
                };
                (got != *want).then(|| format!("input:\n{src}\nwant:\n{want}\ngot:\n{got}\n"))
            })
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
