//! The followed repository, through gix: find the branch's commit, read files
//! and path ids from a commit's tree without a working checkout, and
//! materialise a release directory.
//!
//! A local source (a path or `file://`) is read in place; a remote one is
//! fetched into a bare mirror under the state directory. Everything here is
//! blocking; the agent calls it from `spawn_blocking`.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicBool;

use gix::bstr::ByteSlice;
use gix::objs::tree::EntryKind;

use crate::config::{SourceConfig, SourceUrl};
use crate::source::access;

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("cannot open repository \"{path}\": {source}")]
    Open { path: PathBuf, source: BoxError },
    #[error("branch \"{branch}\" not found in \"{url}\"")]
    NoBranch { url: String, branch: String },
    #[error("cannot fetch \"{url}\": {}", chain(source.as_ref()))]
    Fetch { url: String, source: BoxError },
    #[error("cannot fetch \"{url}\": {source}")]
    Access {
        url: String,
        source: crate::source::access::AccessError,
    },
    #[error("cannot fetch \"{url}\": {}", host_key_text(refusal, known_hosts.as_deref()))]
    HostKey {
        url: String,
        refusal: crate::source::access::HostKeyRefusal,
        known_hosts: Option<PathBuf>,
    },
    #[error("fetch of \"{url}\" timed out after {} (fetch_timeout)", humantime::format_duration(*.after))]
    TimedOut {
        url: String,
        after: std::time::Duration,
    },
    #[error(
        "the previous fetch of \"{url}\" timed out and has not ended yet; not starting another"
    )]
    StillFetching { url: String },
    #[error("cannot read {what} of commit {commit}: {source}")]
    Read {
        commit: String,
        what: String,
        source: BoxError,
    },
    #[error("revision \"{rev}\" not found: {source}")]
    Revision { rev: String, source: BoxError },
    #[error("symlink \"{path}\" in commit {commit} points outside the release (\"{target}\")")]
    EscapingSymlink {
        commit: String,
        path: String,
        target: String,
    },
    #[error("path \"{path}\" in commit {commit} cannot be checked out safely")]
    UnsafePath { commit: String, path: String },
    #[error("cannot write release \"{path}\": {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl GitError {
    /// A repository or remote that is away may come back; what a commit
    /// holds (an escaping link, an unsafe path, a missing branch) stays.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            GitError::Open { .. }
                | GitError::Fetch { .. }
                | GitError::Access { .. }
                | GitError::HostKey { .. }
                | GitError::Write { .. }
                | GitError::TimedOut { .. }
                | GitError::StillFetching { .. }
        )
    }
}

/// An error and its causes, `outer: inner: …`: gix's outer messages alone
/// ("Transport handshake failed") do not say what failed.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![error.to_string()];
    let mut cause = error.source();
    while let Some(e) = cause {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cause = e.source();
    }
    parts.join(": ")
}

/// Unknown: says where to add the key; changed: refuses, naming the line.
fn host_key_text(
    refusal: &crate::source::access::HostKeyRefusal,
    known_hosts: Option<&Path>,
) -> String {
    let file = known_hosts.map_or_else(
        || "the known_hosts file".to_owned(),
        |p| format!("known_hosts \"{}\"", p.display()),
    );
    match &refusal.offending {
        None => format!(
            "the host key of {} ({}) is not in {file}; add it there once you have checked that fingerprint",
            refusal.host, refusal.fingerprint
        ),
        Some(line) => format!(
            "the host key of {} has changed: the remote now shows {}, and {line} holds another; refused (replace that line once the new key is confirmed)",
            refusal.host, refusal.fingerprint
        ),
    }
}

/// The trees of one commit, each decoded once into its entries by name.
struct TreeIndex<'r> {
    repo: &'r gix::Repository,
    commit: &'r str,
    trees: std::collections::HashMap<
        gix::ObjectId,
        std::collections::HashMap<Vec<u8>, (gix::ObjectId, bool)>,
    >,
}

impl TreeIndex<'_> {
    /// The id at each of `paths` under `root`, `-` for none; `*` for the
    /// root itself when `paths` is empty (see `Source::path_ids`).
    fn ids(
        &mut self,
        root: gix::ObjectId,
        paths: &[String],
    ) -> Result<BTreeMap<String, String>, GitError> {
        let mut out = BTreeMap::new();
        if paths.is_empty() {
            out.insert("*".to_string(), root.to_string());
            return Ok(out);
        }
        for path in paths {
            let trimmed = path.trim_end_matches('/');
            let id = if trimmed.is_empty() || trimmed == "." {
                Some(root)
            } else {
                self.lookup(root, trimmed, path)?
            };
            out.insert(
                path.clone(),
                id.map_or_else(|| "-".to_string(), |id| id.to_string()),
            );
        }
        Ok(out)
    }

    fn lookup(
        &mut self,
        root: gix::ObjectId,
        path: &str,
        shown: &str,
    ) -> Result<Option<gix::ObjectId>, GitError> {
        let mut at = (root, true);
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !at.1 {
                return Ok(None);
            }
            let entries = self.entries(at.0, shown)?;
            match entries.get(part.as_bytes()) {
                Some(entry) => at = *entry,
                None => return Ok(None),
            }
        }
        Ok(Some(at.0))
    }

    fn entries(
        &mut self,
        tree: gix::ObjectId,
        shown: &str,
    ) -> Result<&std::collections::HashMap<Vec<u8>, (gix::ObjectId, bool)>, GitError> {
        if !self.trees.contains_key(&tree) {
            let read_err = |e: BoxError| GitError::Read {
                commit: self.commit.to_string(),
                what: format!("\"{shown}\""),
                source: e,
            };
            let object = self
                .repo
                .find_tree(tree)
                .map_err(|e| read_err(Box::new(e)))?;
            let decoded = object.decode().map_err(|e| read_err(Box::new(e)))?;
            let entries = decoded
                .entries
                .iter()
                .map(|e| (e.filename.to_vec(), (e.oid.to_owned(), e.mode.is_tree())))
                .collect();
            self.trees.insert(tree, entries);
        }
        Ok(&self.trees[&tree])
    }
}

/// The followed branch of one repository.
#[derive(Debug, Clone)]
pub struct Source {
    url: SourceUrl,
    branch: String,
    /// The repository objects are read from: the source itself when local,
    /// else the mirror.
    repo_path: PathBuf,
    access: crate::config::Access,
    /// ssh's connect timeout: the whole fetch has `fetch_timeout` (the engine).
    connect_timeout: std::time::Duration,
}

impl Source {
    pub fn new(cfg: &SourceConfig, state_dir: &Path) -> Source {
        let repo_path = match &cfg.url {
            SourceUrl::Local(path) => path.clone(),
            SourceUrl::Remote(_) => state_dir.join("mirror.git"),
        };
        Source {
            url: cfg.url.clone(),
            branch: cfg.branch.clone(),
            repo_path,
            access: cfg.access.clone(),
            connect_timeout: cfg.fetch_timeout,
        }
    }

    pub fn url_text(&self) -> String {
        match &self.url {
            SourceUrl::Local(path) => path.display().to_string(),
            SourceUrl::Remote(url) => url.clone(),
        }
    }

    /// The local repository, when the source is one (watched for pushes).
    pub fn local_path(&self) -> Option<&Path> {
        match &self.url {
            SourceUrl::Local(path) => Some(path),
            SourceUrl::Remote(_) => None,
        }
    }

    fn open(&self) -> Result<gix::Repository, GitError> {
        gix::open_opts(&self.repo_path, gix::open::Options::isolated()).map_err(|e| {
            GitError::Open {
                path: self.repo_path.clone(),
                source: Box::new(e),
            }
        })
    }

    /// Bring the branch up to date (a fetch for remote sources) and return
    /// the full id of its commit.
    #[cfg(test)]
    pub fn fetch(&self) -> Result<String, GitError> {
        self.fetch_until(&AtomicBool::new(false))
    }

    /// `fetch`, given up at its next check of `interrupt` once that is set
    /// (the agent's `fetch_timeout`).
    pub fn fetch_until(&self, interrupt: &AtomicBool) -> Result<String, GitError> {
        if let SourceUrl::Remote(url) = &self.url {
            self.fetch_into_mirror(url, interrupt)?;
        }
        let repo = self.open()?;
        let name = format!("refs/heads/{}", self.branch);
        let no_branch = || GitError::NoBranch {
            url: self.url_text(),
            branch: self.branch.clone(),
        };
        let mut reference = repo
            .try_find_reference(name.as_str())
            .map_err(|e| GitError::Open {
                path: self.repo_path.clone(),
                source: Box::new(e),
            })?
            .ok_or_else(no_branch)?;
        let commit = reference.peel_to_commit().map_err(|_| no_branch())?;
        Ok(commit.id.to_string())
    }

    fn fetch_into_mirror(&self, url: &str, interrupt: &AtomicBool) -> Result<(), GitError> {
        let fetch_err = |e: BoxError| GitError::Fetch {
            url: url.to_string(),
            source: e,
        };
        let access_err = |source| GitError::Access {
            url: url.to_string(),
            source,
        };
        let mut repo = if self.repo_path.join("HEAD").exists() {
            self.open()?
        } else {
            gix::init_bare(&self.repo_path).map_err(|e| fetch_err(Box::new(e)))?
        };
        let ssh = self.url.transport() == crate::config::Transport::Ssh;
        if ssh {
            // Set on every fetch, never taken from the environment: the
            // mirror is opened isolated, so `GIT_SSH_COMMAND` would hold
            // for no fetch at all (it used to hold for the first only).
            let command =
                access::ssh_command(&self.access, self.connect_timeout).map_err(access_err)?;
            let mut config = repo.config_snapshot_mut();
            config
                .set_value(&gix::config::tree::Core::SSH_COMMAND, command.as_str())
                .and_then(|_| config.set_value(&gix::config::tree::Ssh::VARIANT, "ssh"))
                .map_err(|e| fetch_err(Box::new(e)))?;
            config.commit().map_err(|e| fetch_err(Box::new(e)))?;
        }
        let spec = format!("+refs/heads/{0}:refs/heads/{0}", self.branch);
        let remote = repo
            .remote_at(url)
            .map_err(|e| fetch_err(Box::new(e)))?
            .with_refspecs(Some(spec.as_str()), gix::remote::Direction::Fetch)
            .map_err(|e| fetch_err(Box::new(e)))?;
        let mut connection = remote
            .connect(gix::remote::Direction::Fetch)
            .map_err(|e| fetch_err(Box::new(e)))?;
        if !ssh {
            // No credential helper, no prompt: the token of token_file, or
            // a clear refusal when the remote asks and none is configured.
            let token = match &self.access.token_file {
                Some(file) => Some(access::token(file).map_err(access_err)?),
                None => None,
            };
            let user = self.access.token_user.clone();
            connection.set_credentials(move |action| match (action, &token) {
                (gix::credentials::helper::Action::Get(ctx), Some(token)) => {
                    Ok(Some(gix::credentials::protocol::Outcome {
                        identity: gix::sec::identity::Account {
                            username: user.clone(),
                            password: token.clone(),
                            oauth_refresh_token: None,
                        },
                        next: ctx.into(),
                    }))
                }
                (gix::credentials::helper::Action::Get(_), None) => Err(gix::error::ErrorExt::raise(gix::error::message(
                    "the remote asks for credentials; give them with token_file (and token_user)",
                ))),
                _ => Ok(None),
            });
            if let Some(ca) = &self.access.ca_file {
                let options =
                    self.http_options(&repo, url, access::certificates(ca).map_err(access_err)?)?;
                connection.set_transport_options(options);
            }
        }
        let fetched = connection
            .prepare_fetch(gix::progress::Discard, Default::default())
            .map_err(|e| fetch_err(Box::new(e)))
            .and_then(|prepared| {
                prepared
                    .receive(gix::progress::Discard, interrupt)
                    .map_err(|e| fetch_err(Box::new(e)))
            });
        match fetched {
            Ok(_) => Ok(()),
            Err(e) if ssh && !interrupt.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(self.host_key_refusal(url).unwrap_or(e))
            }
            Err(e) => Err(e),
        }
    }

    /// gix's http options for `url`, with the client also trusting `certs`.
    fn http_options(
        &self,
        repo: &gix::Repository,
        url: &str,
        certs: Vec<reqwest::Certificate>,
    ) -> Result<Box<dyn std::any::Any>, GitError> {
        use gix::protocol::transport::client::blocking_io::http;
        let fetch_err = |e: BoxError| GitError::Fetch {
            url: url.to_string(),
            source: e,
        };
        let mut options = repo
            .transport_options(url, None)
            .map_err(|e| fetch_err(Box::new(e)))?
            .unwrap_or_else(|| Box::new(http::Options::default()));
        let Some(http_options) = options.downcast_mut::<http::Options>() else {
            return Ok(options);
        };
        let backend = http::reqwest::Options {
            configure_client: Some(Box::new(move |builder| {
                Ok(certs
                    .iter()
                    .cloned()
                    .fold(builder, |b, cert| b.add_root_certificate(cert)))
            })),
            configure_request: None,
        };
        http_options.backend = Some(std::sync::Arc::new(std::sync::Mutex::new(backend)));
        Ok(options)
    }

    /// When ssh refused the remote's host key, that refusal, with the host
    /// and the fingerprint the remote showed (gix only sees a closed pipe).
    fn host_key_refusal(&self, url: &str) -> Option<GitError> {
        let parsed = gix::url::parse(gix::bstr::BStr::new(url)).ok()?;
        let host = parsed.host()?;
        let refusal = access::diagnose_host_key(
            &self.access,
            parsed.user(),
            host,
            parsed.port,
            self.connect_timeout,
        )?;
        Some(GitError::HostKey {
            url: url.to_string(),
            refusal,
            known_hosts: self.access.known_hosts.clone(),
        })
    }

    /// Resolve a revision (`main`, a tag, a full or short id) to a commit id.
    pub fn resolve(&self, rev: &str) -> Result<String, GitError> {
        let repo = self.open()?;
        let revision_err = |e: BoxError| GitError::Revision {
            rev: rev.to_string(),
            source: e,
        };
        let id = repo
            .rev_parse_single(rev)
            .map_err(|e| revision_err(Box::new(e)))?;
        let commit = id
            .object()
            .map_err(|e| revision_err(Box::new(e)))?
            .peel_to_commit()
            .map_err(|e| revision_err(Box::new(e)))?;
        Ok(commit.id.to_string())
    }

    fn tree<'r>(&self, repo: &'r gix::Repository, commit: &str) -> Result<gix::Tree<'r>, GitError> {
        let read_err = |e: BoxError| GitError::Read {
            commit: commit.to_string(),
            what: "the tree".into(),
            source: e,
        };
        let id = gix::ObjectId::from_hex(commit.as_bytes()).map_err(|e| read_err(Box::new(e)))?;
        repo.find_commit(id)
            .map_err(|e| read_err(Box::new(e)))?
            .tree()
            .map_err(|e| read_err(Box::new(e)))
    }

    /// The subject line and the author (`Name <email>`) of `commit`.
    pub fn commit_info(&self, commit: &str) -> Result<(String, String), GitError> {
        let repo = self.open()?;
        let read_err = |e: BoxError| GitError::Read {
            commit: commit.to_string(),
            what: "the commit message".into(),
            source: e,
        };
        let id = gix::ObjectId::from_hex(commit.as_bytes()).map_err(|e| read_err(Box::new(e)))?;
        let object = repo.find_commit(id).map_err(|e| read_err(Box::new(e)))?;
        let subject = object
            .message()
            .map_err(|e| read_err(Box::new(e)))?
            .summary()
            .to_str_lossy()
            .into_owned();
        let author = object.author().map_err(|e| read_err(Box::new(e)))?;
        let author = format!(
            "{} <{}>",
            author.name.to_str_lossy(),
            author.email.to_str_lossy()
        );
        Ok((subject, author))
    }

    /// The contents of `path` at `commit`, or `None` when there is no such file.
    pub fn read_file(&self, commit: &str, path: &str) -> Result<Option<Vec<u8>>, GitError> {
        let repo = self.open()?;
        let tree = self.tree(&repo, commit)?;
        let read_err = |e: BoxError| GitError::Read {
            commit: commit.to_string(),
            what: format!("\"{path}\""),
            source: e,
        };
        let Some(entry) = tree
            .lookup_entry_by_path(path)
            .map_err(|e| read_err(Box::new(e)))?
        else {
            return Ok(None);
        };
        if !entry.mode().is_blob() {
            return Ok(None);
        }
        let object = entry.object().map_err(|e| read_err(Box::new(e)))?;
        Ok(Some(object.detach().data))
    }

    /// The object id at each of `paths` (trailing `/` allowed), `-` when a
    /// path does not exist. An empty list means the whole tree, keyed `*`.
    pub fn path_ids(
        &self,
        commit: &str,
        paths: &[String],
    ) -> Result<BTreeMap<String, String>, GitError> {
        let repo = self.open()?;
        let tree = self.tree(&repo, commit)?;
        Self::ids_in(&tree, commit, paths)
    }

    /// `path_ids` of many path lists (one per scope) at one commit, with
    /// the repository opened, the commit's tree found and each tree on the
    /// way decoded once: a plan costs its lookups, not a repository open
    /// and a walk from the root per scope.
    pub fn path_ids_of<'k>(
        &self,
        commit: &str,
        lists: impl IntoIterator<Item = (&'k str, Vec<String>)>,
    ) -> Result<BTreeMap<String, BTreeMap<String, String>>, GitError> {
        let repo = self.open()?;
        let tree = self.tree(&repo, commit)?;
        let mut index = TreeIndex {
            repo: &repo,
            commit,
            trees: std::collections::HashMap::new(),
        };
        lists
            .into_iter()
            .map(|(key, paths)| Ok((key.to_string(), index.ids(tree.id, &paths)?)))
            .collect()
    }

    fn ids_in(
        tree: &gix::Tree<'_>,
        commit: &str,
        paths: &[String],
    ) -> Result<BTreeMap<String, String>, GitError> {
        let mut index = TreeIndex {
            repo: tree.repo,
            commit,
            trees: std::collections::HashMap::new(),
        };
        index.ids(tree.id, paths)
    }

    /// The commits of `head` that `deployed` does not have, newest first:
    /// what a branch that moved from `deployed` brings (all of them after a
    /// rewrite, up to where the histories meet). Without `deployed`, `head`.
    pub fn new_commits(&self, head: &str, deployed: Option<&str>) -> Result<Vec<String>, GitError> {
        let Some(deployed) = deployed else {
            return Ok(vec![head.to_string()]);
        };
        let repo = self.open()?;
        let read_err = |e: BoxError| GitError::Read {
            commit: head.to_string(),
            what: "the history".into(),
            source: e,
        };
        let start = gix::ObjectId::from_hex(head.as_bytes()).map_err(|e| read_err(Box::new(e)))?;
        let mut hidden = Vec::new();
        if let Ok(id) = gix::ObjectId::from_hex(deployed.as_bytes())
            && repo.find_commit(id).is_ok()
        {
            hidden.push(id);
        }
        let walk = repo
            .rev_walk([start])
            .with_hidden(hidden)
            .all()
            .map_err(|e| read_err(Box::new(e)))?;
        let mut out = Vec::new();
        for info in walk {
            out.push(info.map_err(|e| read_err(Box::new(e)))?.id.to_string());
        }
        Ok(out)
    }

    /// The signature of `commit` (its `gpgsig` header), the bytes it signs
    /// (the commit without that header) and the committer's time.
    pub fn signature_of(&self, commit: &str) -> Result<(Option<String>, Vec<u8>, i64), GitError> {
        let repo = self.open()?;
        let read_err = |e: BoxError| GitError::Read {
            commit: commit.to_string(),
            what: "the signature".into(),
            source: e,
        };
        let id = gix::ObjectId::from_hex(commit.as_bytes()).map_err(|e| read_err(Box::new(e)))?;
        let object = repo.find_commit(id).map_err(|e| read_err(Box::new(e)))?;
        let time = object
            .committer()
            .map_err(|e| read_err(Box::new(e)))?
            .seconds();
        match object.signature().map_err(|e| read_err(Box::new(e)))? {
            Some((signature, signed)) => Ok((
                Some(signature.to_str_lossy().into_owned()),
                signed.to_bstring().into(),
                time,
            )),
            None => Ok((None, object.data.clone(), time)),
        }
    }

    /// Whether `ancestor` is `descendant` or one of its ancestors.
    pub fn is_ancestor(&self, ancestor: &str, descendant: &str) -> Result<bool, GitError> {
        if ancestor == descendant {
            return Ok(true);
        }
        let repo = self.open()?;
        let read_err = |e: BoxError| GitError::Read {
            commit: descendant.to_string(),
            what: "the history".into(),
            source: e,
        };
        let (Ok(start), Ok(wanted)) = (
            gix::ObjectId::from_hex(descendant.as_bytes()),
            gix::ObjectId::from_hex(ancestor.as_bytes()),
        ) else {
            return Ok(false);
        };
        let walk = repo
            .rev_walk([start])
            .all()
            .map_err(|e| read_err(Box::new(e)))?;
        for info in walk {
            let info = info.map_err(|e| read_err(Box::new(e)))?;
            if info.id == wanted {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Write the tree of `commit` to `dest`, which must not exist yet. Files
    /// are written to a sibling temporary directory renamed into place at the
    /// end, so `dest` is either complete or absent.
    pub fn checkout(&self, commit: &str, dest: &Path) -> Result<(), GitError> {
        let repo = self.open()?;
        let tree = self.tree(&repo, commit)?;
        let mut recorder = gix::traverse::tree::Recorder::default();
        tree.traverse()
            .breadthfirst(&mut recorder)
            .map_err(|e| GitError::Read {
                commit: commit.to_string(),
                what: "the tree".into(),
                source: Box::new(e),
            })?;
        let parent = dest.parent().unwrap_or(Path::new("."));
        let write_err = |path: &Path, source: std::io::Error| GitError::Write {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(parent).map_err(|e| write_err(parent, e))?;
        let staging = parent.join(format!(".partial-{commit}"));
        if staging.exists() {
            std::fs::remove_dir_all(&staging).map_err(|e| write_err(&staging, e))?;
        }
        std::fs::create_dir(&staging).map_err(|e| write_err(&staging, e))?;
        let result = self
            .check_links(&repo, commit, &recorder.records)
            .and_then(|()| self.write_entries(&repo, commit, &recorder.records, &staging));
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        std::fs::rename(&staging, dest).map_err(|e| write_err(dest, e))?;
        Ok(())
    }

    /// Every symlink of the tree, resolved through the others against the
    /// release root, must end inside it: a chain of links that each look
    /// harmless can still climb out (`a/b/c/d -> ../../..` and
    /// `x -> a/b/c/d/../../..`).
    fn check_links(
        &self,
        repo: &gix::Repository,
        commit: &str,
        entries: &[gix::traverse::tree::recorder::Entry],
    ) -> Result<(), GitError> {
        let mut links = BTreeMap::new();
        for entry in entries.iter().filter(|e| e.mode.kind() == EntryKind::Link) {
            let rel = entry.filepath.to_str_lossy().into_owned();
            let target = repo
                .find_blob(entry.oid)
                .map_err(|e| GitError::Read {
                    commit: commit.to_string(),
                    what: format!("\"{rel}\""),
                    source: Box::new(e),
                })?
                .data
                .to_str_lossy()
                .into_owned();
            links.insert(PathBuf::from(rel), target);
        }
        for (link, target) in &links {
            if !link_stays_inside(&links, link) {
                return Err(GitError::EscapingSymlink {
                    commit: commit.to_string(),
                    path: link.display().to_string(),
                    target: target.clone(),
                });
            }
        }
        Ok(())
    }

    fn write_entries(
        &self,
        repo: &gix::Repository,
        commit: &str,
        entries: &[gix::traverse::tree::recorder::Entry],
        root: &Path,
    ) -> Result<(), GitError> {
        let write_err = |path: &Path, source: std::io::Error| GitError::Write {
            path: path.to_path_buf(),
            source,
        };
        for (n, entry) in entries.iter().enumerate() {
            if n == entries.len() / 2 {
                // Half the files are written: a kill here leaves `.partial-`.
                crate::fault::point("during-checkout");
            }
            let rel = entry.filepath.to_str_lossy().into_owned();
            let rel_path = safe_relative(&rel).ok_or_else(|| GitError::UnsafePath {
                commit: commit.to_string(),
                path: rel.clone(),
            })?;
            let path = root.join(&rel_path);
            let blob = |id: gix::ObjectId| -> Result<Vec<u8>, GitError> {
                Ok(repo
                    .find_blob(id)
                    .map_err(|e| GitError::Read {
                        commit: commit.to_string(),
                        what: format!("\"{rel}\""),
                        source: Box::new(e),
                    })?
                    .detach()
                    .data)
            };
            match entry.mode.kind() {
                EntryKind::Tree | EntryKind::Commit => {
                    std::fs::create_dir_all(&path).map_err(|e| write_err(&path, e))?;
                    // Independent of the agent's umask: an image built from
                    // the release may run as another uid.
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                        .map_err(|e| write_err(&path, e))?;
                }
                kind @ (EntryKind::Blob | EntryKind::BlobExecutable) => {
                    let data = blob(entry.oid)?;
                    let mut file = std::fs::File::create(&path).map_err(|e| write_err(&path, e))?;
                    file.write_all(&data).map_err(|e| write_err(&path, e))?;
                    let mode = if kind == EntryKind::BlobExecutable {
                        0o755
                    } else {
                        0o644
                    };
                    file.set_permissions(std::fs::Permissions::from_mode(mode))
                        .map_err(|e| write_err(&path, e))?;
                }
                EntryKind::Link => {
                    // Judged by `check_links` before anything was written.
                    let target = String::from_utf8_lossy(&blob(entry.oid)?).into_owned();
                    symlink(&target, &path).map_err(|e| write_err(&path, e))?;
                }
            }
        }
        Ok(())
    }
}

/// `rel` as a path of normal components only.
fn safe_relative(rel: &str) -> Option<PathBuf> {
    let path = Path::new(rel);
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) if part != ".git" => out.push(part),
            _ => return None,
        }
    }
    (!out.as_os_str().is_empty()).then_some(out)
}

/// How many links one resolution may follow before it is taken for a loop.
const MAX_LINK_HOPS: usize = 40;

/// Whether the symlink at `link` (relative to the release root), resolved
/// the way the kernel would — every component, through every other link
/// in `links` — ends inside the release. A dangling target is judged by
/// where it points; a loop or a climb above the root is outside.
pub fn link_stays_inside(links: &BTreeMap<PathBuf, String>, link: &Path) -> bool {
    let Some(target) = links.get(link) else {
        return true;
    };
    let mut at: Vec<std::ffi::OsString> = link
        .parent()
        .map(|p| p.iter().map(|c| c.to_os_string()).collect())
        .unwrap_or_default();
    let mut hops = 0;
    resolve(links, &mut at, Path::new(target), &mut hops)
}

/// Walk `target` from the directory `at` (components below the root),
/// following links; false as soon as the walk leaves the root.
fn resolve(
    links: &BTreeMap<PathBuf, String>,
    at: &mut Vec<std::ffi::OsString>,
    target: &Path,
    hops: &mut usize,
) -> bool {
    for component in target.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if at.pop().is_none() {
                    return false;
                }
            }
            Component::Normal(name) => {
                at.push(name.to_os_string());
                let here: PathBuf = at.iter().collect();
                if let Some(next) = links.get(&here) {
                    *hops += 1;
                    if *hops > MAX_LINK_HOPS {
                        return false;
                    }
                    at.pop();
                    if !resolve(links, at, Path::new(next), hops) {
                        return false;
                    }
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::git_cli::git;
    use std::time::Duration;

    fn source(url: SourceUrl, state: &Path) -> Source {
        Source::new(
            &SourceConfig {
                url,
                branch: "main".into(),
                manifest: "deploy/moorline.toml".into(),
                poll: Duration::from_secs(60),
                allow_force_push: false,
                fetch_timeout: Duration::from_secs(60),
                access: Default::default(),
                verify: None,
            },
            state,
        )
    }

    /// A bare repository with two commits pushed from a work clone.
    fn fixture(dir: &Path) -> (PathBuf, String, String) {
        let work = dir.join("work");
        std::fs::create_dir_all(work.join("services/api")).expect("mkdir");
        git(dir, &["init", "-q", "--bare", "-b", "main", "app.git"]);
        git(&work, &["init", "-q", "-b", "main"]);
        std::fs::write(work.join("services/api/app.py"), "print(1)\n").expect("write");
        std::fs::write(work.join("run.sh"), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(work.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        symlink("services/api/app.py", work.join("app-link")).expect("symlink");
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "one"]);
        let first = git(&work, &["rev-parse", "HEAD"]);
        std::fs::write(work.join("README"), "readme\n").expect("write");
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "two"]);
        let second = git(&work, &["rev-parse", "HEAD"]);
        let bare = dir.join("app.git");
        git(
            &work,
            &["push", "-q", bare.to_str().expect("utf-8"), "main"],
        );
        (bare, first, second)
    }

    #[test]
    fn a_local_repository_is_read_without_a_checkout_and_checked_out_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (bare, first, second) = fixture(dir.path());
        let src = source(SourceUrl::Local(bare), dir.path());
        assert_eq!(src.fetch().expect("fetch"), second);
        assert_eq!(src.resolve(&first[..8]).expect("short id"), first);
        assert_eq!(src.resolve("main").expect("branch"), second);
        assert_eq!(
            src.read_file(&first, "services/api/app.py").expect("read"),
            Some(b"print(1)\n".to_vec())
        );
        assert_eq!(src.read_file(&first, "README").expect("read"), None);

        let paths = vec!["services/api/".to_string(), "docs/".to_string()];
        let one = src.path_ids(&first, &paths).expect("ids");
        let two = src.path_ids(&second, &paths).expect("ids");
        assert_eq!(one, two, "README is outside both paths");
        assert_eq!(one["docs/"], "-");
        assert_ne!(
            src.path_ids(&first, &[]).expect("ids"),
            src.path_ids(&second, &[]).expect("ids")
        );
        // Many scopes' lists in one walk: git's own ids, `-` for a path
        // that is not there or goes through a file.
        let lists = [
            ("api", paths.clone()),
            (
                "file",
                vec![
                    "services/api/app.py".to_string(),
                    "services/api/app.py/x".to_string(),
                ],
            ),
            ("all", vec![]),
        ];
        let many = src
            .path_ids_of(&first, lists.iter().map(|(k, p)| (*k, p.clone())))
            .expect("ids");
        assert_eq!(many["api"], one);
        let repo = dir.path().join("app.git");
        let rev = |spec: &str| git(&repo, &["rev-parse", spec]);
        assert_eq!(
            many["api"]["services/api/"],
            rev(&format!("{first}:services/api"))
        );
        assert_eq!(
            many["file"]["services/api/app.py"],
            rev(&format!("{first}:services/api/app.py"))
        );
        assert_eq!(many["file"]["services/api/app.py/x"], "-");
        assert_eq!(many["all"]["*"], rev(&format!("{first}^{{tree}}")));

        assert!(src.is_ancestor(&first, &second).expect("walk"));
        assert!(!src.is_ancestor(&second, &first).expect("walk"));

        let dest = dir.path().join("releases").join(&first);
        src.checkout(&first, &dest).expect("checkout");
        assert_eq!(
            std::fs::read_to_string(dest.join("services/api/app.py")).expect("file"),
            "print(1)\n"
        );
        let mode = std::fs::metadata(dest.join("run.sh"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(
            std::fs::read_link(dest.join("app-link")).expect("link"),
            Path::new("services/api/app.py")
        );
        assert!(
            !dir.path()
                .join("releases")
                .join(format!(".partial-{first}"))
                .exists()
        );
    }

    #[test]
    fn a_symlink_leaving_the_release_fails_the_checkout_and_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (bare, _, _) = fixture(dir.path());
        let work = dir.path().join("work");
        symlink("../../etc/passwd", work.join("escape")).expect("symlink");
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "-q", "-m", "escape"]);
        git(
            &work,
            &["push", "-q", bare.to_str().expect("utf-8"), "main"],
        );
        let src = source(SourceUrl::Local(bare), dir.path());
        let head = src.fetch().expect("fetch");
        let dest = dir.path().join("releases").join(&head);
        let err = src.checkout(&head, &dest).expect_err("escaping symlink");
        assert_eq!(
            err.to_string(),
            format!(
                "symlink \"escape\" in commit {head} points outside the release (\"../../etc/passwd\")"
            )
        );
        assert!(!dest.exists());
        assert!(
            !dir.path()
                .join("releases")
                .join(format!(".partial-{head}"))
                .exists()
        );
    }

    #[test]
    fn a_missing_branch_or_repository_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (bare, _, _) = fixture(dir.path());
        let mut src = source(SourceUrl::Local(bare.clone()), dir.path());
        src.branch = "release/9".into();
        assert_eq!(
            src.fetch().expect_err("no branch").to_string(),
            format!("branch \"release/9\" not found in \"{}\"", bare.display())
        );
        let nowhere = dir.path().join("nowhere.git");
        let err = source(SourceUrl::Local(nowhere.clone()), dir.path())
            .fetch()
            .expect_err("no repo");
        assert!(
            err.to_string().starts_with(&format!(
                "cannot open repository \"{}\": ",
                nowhere.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn symlinks_are_judged_by_where_they_lead() {
        let cases = [
            ("a", "b", true),
            ("dir/a", "../b", true),
            ("dir/a", "../../b", false),
            ("a", "../b", false),
            ("a", "/etc/passwd", false),
            ("dir/sub/a", "../../x/./y", true),
            ("dir/a", "x/../../..", false),
        ];
        for (link, target, inside) in cases {
            let links = BTreeMap::from([(PathBuf::from(link), target.to_string())]);
            assert_eq!(
                link_stays_inside(&links, Path::new(link)),
                inside,
                "{link} -> {target}"
            );
        }
    }

    #[test]
    fn a_chain_of_links_is_resolved_through_every_link() {
        let links = |pairs: &[(&str, &str)]| -> BTreeMap<PathBuf, String> {
            pairs
                .iter()
                .map(|(l, t)| (PathBuf::from(l), t.to_string()))
                .collect()
        };
        // Each passes a lexical check; resolved through d, x climbs out.
        let chain = links(&[("a/b/c/d", "../../.."), ("x", "a/b/c/d/../../..")]);
        assert!(link_stays_inside(&chain, Path::new("a/b/c/d")));
        assert!(!link_stays_inside(&chain, Path::new("x")));
        // Through a link to a directory: up = "a/b", so up/../../.. leaves.
        let through = links(&[("up", "a/b"), ("y", "up/../../..")]);
        assert!(!link_stays_inside(&through, Path::new("y")));
        let fine = links(&[("up", "a/b"), ("y", "up/../c")]);
        assert!(link_stays_inside(&fine, Path::new("y")));
        // A loop never resolves.
        let ring = links(&[("p", "q"), ("q", "p")]);
        assert!(!link_stays_inside(&ring, Path::new("p")));
    }

    #[test]
    fn only_plain_relative_paths_are_checked_out() {
        assert_eq!(safe_relative("a/b"), Some(PathBuf::from("a/b")));
        assert_eq!(safe_relative("../a"), None);
        assert_eq!(safe_relative("/a"), None);
        assert_eq!(safe_relative("a/.git/config"), None);
        assert_eq!(safe_relative(""), None);
    }
}
