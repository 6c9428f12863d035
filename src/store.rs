//! The only module that knows sled: rollout history, the host's deployed
//! state and the release registry, as typed records with a schema version.
//!
//! Every write is flushed before it returns, so what a caller has been told
//! is stored survives a crash or a kill.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::runtime::Owner;

/// Bumped whenever a stored record changes shape. Records of an older
/// version are read through `migrate`; a newer one is refused by name.
///
/// - 1: the first format.
/// - 2: rollouts carry the commit's subject and author; a scope's state
///   remembers the last healthy release on each owner (`way_back`).
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the history database at \"{path}\": {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("history database at \"{path}\" is in use by another process (is the agent running?)")]
    Locked { path: PathBuf },
    #[error("cannot write the history database at \"{path}\": {source}")]
    Write { path: PathBuf, source: sled::Error },
    #[error("cannot read the history database at \"{path}\": {source}")]
    Read { path: PathBuf, source: sled::Error },
    #[error("record {key:?} in \"{path}\" is unreadable: {source}")]
    Decode {
        path: PathBuf,
        key: String,
        source: serde_json::Error,
    },
    #[error(
        "record {key:?} in \"{path}\" has schema version {found}; this moorline reads versions 1 to {SCHEMA_VERSION}"
    )]
    Schema {
        path: PathBuf,
        key: String,
        found: u32,
    },
}

impl StoreError {
    /// A database that is busy or cannot write now (a full disk, the agent
    /// holding it) may work later; an unreadable record stays unreadable.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Open { .. }
                | StoreError::Locked { .. }
                | StoreError::Write { .. }
                | StoreError::Read { .. }
        )
    }
}

/// How a rollout ended (or that it has not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    InProgress,
    Succeeded,
    Failed,
    RolledBack,
    Interrupted,
    /// A branch commit `[source.verify]` refused: nothing was touched.
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::InProgress => "in-progress",
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::RolledBack => "rolled-back",
            Outcome::Interrupted => "interrupted",
            Outcome::Refused => "refused",
        }
    }
}

/// One rollout, as stored and as shown by `history` / `show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub schema: u32,
    pub id: u64,
    pub commit: String,
    pub previous_commit: Option<String>,
    /// What woke the agent: "poll", "watch", "webhook", "sync", "startup".
    pub trigger: String,
    /// Unix milliseconds.
    pub started_at: u64,
    pub finished_at: Option<u64>,
    pub outcome: Outcome,
    /// Who asked for it by hand (`hold`, `resume`); `None` for the agent's own.
    #[serde(default)]
    pub user: Option<String>,
    /// The commit's subject line and author (`Name <email>`); absent in
    /// records of schema 1 and when the commit could not be read.
    #[serde(default)]
    pub subject: Option<String>,
    #[serde(default)]
    pub author: Option<String>,
    pub scopes: Vec<ScopeRecord>,
    pub phases: Vec<PhaseRecord>,
    pub error: Option<String>,
    /// The last lines of build output, oldest first.
    pub build_tail: Vec<String>,
    /// Intent and result of every side effect, in order.
    pub journal: Vec<JournalEntry>,
    /// Every analysed interval of a canary, in order.
    #[serde(default)]
    pub analysis: Vec<IntervalRecord>,
}

/// One interval of a canary's analysis: the new slot's figures and what
/// they meant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntervalRecord {
    pub scope: String,
    /// 1-based step of the canary, at `weight` percent of new requests.
    pub step: usize,
    pub weight: u32,
    /// Unix milliseconds at the end of the interval.
    pub at: u64,
    pub requests: u64,
    pub errors: u64,
    pub p95_ms: Option<f64>,
    /// "pass", "inconclusive (…)", "fail: …".
    pub verdict: String,
}

impl RolloutRecord {
    /// A history entry that is not a rollout of a commit (the audit, a hand
    /// command): at the deployed `commit`, started now, with no phases.
    pub fn event(
        trigger: &str,
        commit: String,
        outcome: Outcome,
        scopes: Vec<ScopeRecord>,
    ) -> Self {
        let now = now_ms();
        RolloutRecord {
            schema: SCHEMA_VERSION,
            id: 0,
            previous_commit: Some(commit.clone()),
            commit,
            trigger: trigger.to_string(),
            started_at: now,
            finished_at: (outcome != Outcome::InProgress).then_some(now),
            outcome,
            user: None,
            subject: None,
            author: None,
            scopes,
            phases: vec![],
            error: None,
            build_tail: vec![],
            journal: vec![],
            analysis: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeRecord {
    pub scope: String,
    pub owner: Owner,
    /// "deploy", "cutover", "unchanged", "remove".
    pub action: String,
    pub reason: String,
    /// Commit of the release directory the scope runs after this rollout
    /// step (may be an older commit when an identical release was reused).
    pub release: Option<String>,
    /// Whether the build commands ran for this rollout.
    pub built: bool,
    pub members: Vec<String>,
    /// "switched", "healthy", "rolled-back", "failed: ...", "skipped".
    pub result: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseRecord {
    /// "fetch", "plan", "prepare", "switch", "verify", "rollback".
    pub phase: String,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub at: u64,
    /// e.g. "restart app-api.service on 1a2b3c4".
    pub step: String,
    /// "intent", "done", "failed: ...".
    pub state: String,
}

/// What one scope runs now, as the agent last established it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeployedScope {
    pub owner: Owner,
    /// Commit whose release directory the scope runs.
    pub release: String,
    /// The host commit this state was reached at.
    pub commit: String,
    pub fingerprint: String,
    pub section_text: String,
    /// `paths` entry → git object id (or "-" when absent) at `commit`.
    pub path_ids: BTreeMap<String, String>,
    pub members: Vec<String>,
    pub rollout: u64,
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScopeState {
    pub current: DeployedScope,
    /// Whether `current` passed verification.
    pub healthy: bool,
    /// The last state that passed verification (equal to `current` when healthy).
    pub last_healthy: Option<DeployedScope>,
    /// What the last audit found wrong (a member running on the runtime
    /// that does not own the scope, a unit pointing at another release).
    #[serde(default)]
    pub problem: Option<String>,
    /// Owner → the last release that was healthy on it: the way back
    /// after a cutover, which pruning keeps.
    #[serde(default)]
    pub way_back: BTreeMap<Owner, String>,
}

impl ScopeState {
    /// The state of a scope that just passed verification on `current`,
    /// keeping what `previous` knew of the way back to other owners.
    pub fn healthy(current: DeployedScope, previous: Option<&ScopeState>) -> ScopeState {
        let mut way_back = previous.map(|p| p.way_back.clone()).unwrap_or_default();
        way_back.insert(current.owner, current.release.clone());
        ScopeState {
            current: current.clone(),
            healthy: true,
            last_healthy: Some(current),
            problem: None,
            way_back,
        }
    }
}

/// The host as the agent last left it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostState {
    pub schema: u32,
    /// The last commit the host was fully brought to.
    pub deployed_commit: Option<String>,
    /// A commit that failed and is not retried until the branch moves on.
    pub failed_commit: Option<String>,
    pub scopes: BTreeMap<String, ScopeState>,
    /// Scopes of the deployed manifest that run on other hosts (`hosts`).
    #[serde(default)]
    pub elsewhere: Vec<String>,
}

/// A scope held by hand: rollouts leave it as it runs until `resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hold {
    pub reason: String,
    /// Who held it (the control channel admits the agent's own uid only).
    pub user: String,
    pub uid: u32,
    /// Unix milliseconds.
    pub since: u64,
    /// Set by `moorline rollback`: the deployment the scope is held at. A
    /// rollout by hand brings the scope there (again after a crash); a
    /// failed one clears it, leaving the scope held as it runs.
    #[serde(default)]
    pub pin: Option<DeployedScope>,
}

impl Hold {
    /// As `plan` and `status` show it: `held (REASON, by USER since T)`,
    /// or `held at release R (…)` after a rollback.
    pub fn describe(&self) -> String {
        let at = match &self.pin {
            Some(pin) => format!(" at release {}", crate::source::short(&pin.release)),
            None => String::new(),
        };
        format!(
            "held{at} ({}, by {} since {})",
            self.reason,
            self.user,
            crate::api::time_text(self.since)
        )
    }

    /// Whether the scope runs what the hold pins (always, without a pin).
    pub fn reached(&self, state: Option<&ScopeState>) -> bool {
        match (&self.pin, state) {
            (None, _) => true,
            (Some(pin), Some(state)) => {
                pin.release == state.current.release && pin.owner == state.current.owner
            }
            // Nothing of the scope runs here any more: nothing to go back to.
            (Some(_), None) => true,
        }
    }
}

/// A request made by hand that waits for the agent's loop (`restart`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HandRequest {
    pub reason: String,
    pub user: String,
    pub uid: u32,
    pub since: u64,
}

/// A commit that waits for `moorline approve` before any of it deploys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Awaiting {
    pub commit: String,
    pub scopes: BTreeMap<String, Gated>,
    pub since: u64,
}

/// A scope whose `approve` gate a commit waits at.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gated {
    /// The owner the step deploys to.
    pub owner: Owner,
    /// What it would do: `cutover: owner changed from docker to native`.
    pub what: String,
}

/// What operators decided by hand, kept apart from `HostState` (which a
/// rollout reads at its start and writes at its end): held scopes, and
/// scopes resumed since the last rollout, which must converge again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HandState {
    pub schema: u32,
    #[serde(default)]
    pub holds: BTreeMap<String, Hold>,
    #[serde(default)]
    pub resumed: std::collections::BTreeSet<String>,
    /// `moorline restart` requests the loop has not carried out yet.
    #[serde(default)]
    pub restarts: BTreeMap<String, HandRequest>,
    /// Commit → the gated scopes `moorline approve` let go on.
    #[serde(default)]
    pub approvals: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// The commit the agent last found waiting for approval.
    #[serde(default)]
    pub awaiting: Option<Awaiting>,
}

impl HandState {
    /// Whether a rollout by hand is due: a rollback not reached yet, or a
    /// restart asked for.
    pub fn due(&self, host: &HostState) -> bool {
        !self.restarts.is_empty()
            || self
                .holds
                .iter()
                .any(|(name, hold)| !hold.reached(host.scopes.get(name)))
    }
}

/// A checked-out release directory and what was built in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub schema: u32,
    pub commit: String,
    pub created_at: u64,
    /// scope → fingerprint of the inputs it was built from.
    pub built: BTreeMap<String, String>,
}

#[derive(Clone)]
pub struct Store {
    path: PathBuf,
    db: sled::Db,
    rollouts: sled::Tree,
    /// The ids of rollouts created and not yet finished (a superset: an
    /// entry may outlive its rollout by a crash, and is then dropped), so
    /// start-up finds an interrupted rollout without reading the history.
    unfinished: sled::Tree,
    state: sled::Tree,
    releases: sled::Tree,
}

const HOST_KEY: &[u8] = b"host";
const HAND_KEY: &[u8] = b"hand";
/// Set once `unfinished` indexes every rollout (databases made before it
/// existed are scanned once).
const INDEXED_KEY: &[u8] = b"unfinished-indexed";
/// sled's page cache. Its default (1 GiB) lets the agent's memory grow
/// with the history; records are read when asked for, never held.
const CACHE_BYTES: u64 = 8 * 1024 * 1024;

impl Store {
    /// Open (creating) the database at `dir/history`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("history");
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|source| {
                if is_lock_error(&source) {
                    StoreError::Locked { path: path.clone() }
                } else {
                    StoreError::Open {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
        let open_tree = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })
        };
        let store = Store {
            rollouts: open_tree("rollouts")?,
            unfinished: open_tree("unfinished")?,
            state: open_tree("state")?,
            releases: open_tree("releases")?,
            path,
            db,
        };
        store.index_unfinished()?;
        Ok(store)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| self.write_err(e))?;
        Ok(())
    }

    fn put<T: Serialize>(
        &self,
        tree: &sled::Tree,
        key: &[u8],
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).expect("records always serialize");
        tree.insert(key, bytes).map_err(|e| self.write_err(e))?;
        self.flush()
    }

    fn decode<T: for<'de> Deserialize<'de>>(
        &self,
        key: &[u8],
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        let key_text = key_name(key);
        let decode_err = |source| StoreError::Decode {
            path: self.path.clone(),
            key: key_text.clone(),
            source,
        };
        let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(decode_err)?;
        let found = value
            .get("schema")
            .and_then(serde_json::Value::as_u64)
            .and_then(|v| u32::try_from(v).ok());
        match found {
            Some(found) if found > SCHEMA_VERSION || found == 0 => {
                return Err(StoreError::Schema {
                    path: self.path.clone(),
                    key: key_text,
                    found,
                });
            }
            Some(found) => migrate(&mut value, found),
            None => {}
        }
        serde_json::from_value(value).map_err(decode_err)
    }

    fn write_err(&self, source: sled::Error) -> StoreError {
        StoreError::Write {
            path: self.path.clone(),
            source,
        }
    }

    fn read_err(&self, source: sled::Error) -> StoreError {
        StoreError::Read {
            path: self.path.clone(),
            source,
        }
    }

    /// Build the `unfinished` index of a database made before it existed:
    /// one scan, once.
    fn index_unfinished(&self) -> Result<(), StoreError> {
        if self
            .state
            .contains_key(INDEXED_KEY)
            .map_err(|e| self.read_err(e))?
        {
            return Ok(());
        }
        let (records, skipped) = self.scan(usize::MAX, |r| r.outcome == Outcome::InProgress)?;
        warn_skipped(&skipped);
        for record in records {
            self.unfinished
                .insert(record.id.to_be_bytes(), &[])
                .map_err(|e| self.write_err(e))?;
        }
        self.state
            .insert(INDEXED_KEY, &[])
            .map_err(|e| self.write_err(e))?;
        self.flush()
    }

    /// Store `record` as a new rollout with the next free id (one more than
    /// the newest stored), set in `record.id`. Two writers at once (the loop
    /// and a command on the control channel) never get the same id: the
    /// insert only succeeds where no record is, and the loser takes the next.
    /// A write that fails takes no id, so ids have no gaps.
    pub fn create_rollout(&self, record: &mut RolloutRecord) -> Result<u64, StoreError> {
        loop {
            let last = self.rollouts.last().map_err(|e| self.read_err(e))?;
            record.id = match last {
                Some((key, _)) => id_from_key(&key) + 1,
                None => 1,
            };
            let bytes = serde_json::to_vec(&*record).expect("records always serialize");
            // Indexed before it exists: a crash between the two writes
            // leaves an entry without a record (dropped when read), never
            // an unfinished record nobody finds. A writer that loses the
            // race leaves its entry for the winner, who shares the id.
            if record.outcome == Outcome::InProgress {
                self.unfinished
                    .insert(record.id.to_be_bytes(), &[])
                    .map_err(|e| self.write_err(e))?;
            }
            let swapped = self
                .rollouts
                .compare_and_swap(record.id.to_be_bytes(), None as Option<&[u8]>, Some(bytes))
                .map_err(|e| self.write_err(e))?;
            if swapped.is_ok() {
                self.flush()?;
                return Ok(record.id);
            }
        }
    }

    pub fn put_rollout(&self, record: &RolloutRecord) -> Result<(), StoreError> {
        let key = record.id.to_be_bytes();
        if record.outcome == Outcome::InProgress {
            self.unfinished
                .insert(key, &[])
                .map_err(|e| self.write_err(e))?;
        }
        self.put(&self.rollouts, &key, record)?;
        if record.outcome != Outcome::InProgress {
            // After the record: a crash in between leaves a stale entry.
            self.unfinished.remove(key).map_err(|e| self.write_err(e))?;
        }
        Ok(())
    }

    pub fn rollout(&self, id: u64) -> Result<Option<RolloutRecord>, StoreError> {
        let key = id.to_be_bytes();
        match self.rollouts.get(key).map_err(|e| self.read_err(e))? {
            Some(bytes) => self.decode(&key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Newest first; `scope` keeps only rollouts that touched that scope.
    /// A record that cannot be read is skipped with a warning naming it.
    pub fn rollouts(
        &self,
        scope: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RolloutRecord>, StoreError> {
        let touches = |record: &RolloutRecord, s: &str| {
            record.scopes.iter().any(|r| {
                r.scope == s && !matches!(r.action.as_str(), "unchanged" | "skip" | "held")
            })
        };
        let (records, skipped) =
            self.scan(limit, |record| scope.is_none_or(|s| touches(record, s)))?;
        warn_skipped(&skipped);
        Ok(records)
    }

    /// Rollouts still marked in progress: a previous agent died during them.
    /// Read from the `unfinished` index, so start-up does not grow with the
    /// history; entries whose rollout finished or never came are dropped.
    pub fn unfinished_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        for item in self.unfinished.iter().rev() {
            let (key, _) = item.map_err(|e| self.read_err(e))?;
            let record = match self.rollouts.get(&key).map_err(|e| self.read_err(e))? {
                Some(bytes) => match self.decode::<RolloutRecord>(&key, &bytes) {
                    Ok(record) => Some(record),
                    Err(e) => {
                        skipped.push(e);
                        continue;
                    }
                },
                None => None,
            };
            match record {
                Some(record) if record.outcome == Outcome::InProgress => out.push(record),
                _ => {
                    self.unfinished
                        .remove(&key)
                        .map_err(|e| self.write_err(e))?;
                }
            }
        }
        warn_skipped(&skipped);
        Ok(out)
    }

    /// Up to `limit` readable rollouts that `keep` accepts, newest first, and
    /// the records that could not be decoded (a partial write, a newer schema).
    fn scan(
        &self,
        limit: usize,
        keep: impl Fn(&RolloutRecord) -> bool,
    ) -> Result<(Vec<RolloutRecord>, Vec<StoreError>), StoreError> {
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        for item in self.rollouts.iter().rev() {
            if out.len() >= limit {
                break;
            }
            let (key, bytes) = item.map_err(|e| self.read_err(e))?;
            match self.decode::<RolloutRecord>(&key, &bytes) {
                Ok(record) if keep(&record) => out.push(record),
                Ok(_) => {}
                Err(e) => skipped.push(e),
            }
        }
        Ok((out, skipped))
    }

    pub fn host(&self) -> Result<HostState, StoreError> {
        match self.state.get(HOST_KEY).map_err(|e| self.read_err(e))? {
            Some(bytes) => self.decode(HOST_KEY, &bytes),
            None => Ok(HostState {
                schema: SCHEMA_VERSION,
                ..HostState::default()
            }),
        }
    }

    pub fn put_host(&self, host: &HostState) -> Result<(), StoreError> {
        self.put(&self.state, HOST_KEY, host)
    }

    pub fn hand(&self) -> Result<HandState, StoreError> {
        let bytes = self.state.get(HAND_KEY).map_err(|e| self.read_err(e))?;
        self.hand_of(bytes.as_deref())
    }

    /// The hand state stored as `bytes`; none stored is none held.
    fn hand_of(&self, bytes: Option<&[u8]>) -> Result<HandState, StoreError> {
        match bytes {
            Some(bytes) => self.decode(HAND_KEY, bytes),
            None => Ok(HandState {
                schema: SCHEMA_VERSION,
                ..HandState::default()
            }),
        }
    }

    /// Change the hand state with `edit`, read and written as one step
    /// (retried if another writer came in between).
    pub fn update_hand(&self, edit: impl Fn(&mut HandState)) -> Result<HandState, StoreError> {
        loop {
            let old = self.state.get(HAND_KEY).map_err(|e| self.read_err(e))?;
            let mut hand = self.hand_of(old.as_deref())?;
            edit(&mut hand);
            let bytes = serde_json::to_vec(&hand).expect("records always serialize");
            let swapped = self
                .state
                .compare_and_swap(HAND_KEY, old, Some(bytes))
                .map_err(|e| self.write_err(e))?;
            if swapped.is_ok() {
                self.flush()?;
                return Ok(hand);
            }
        }
    }

    pub fn releases(&self) -> Result<Vec<ReleaseRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.releases.iter() {
            let (key, bytes) = item.map_err(|e| self.read_err(e))?;
            out.push(self.decode(&key, &bytes)?);
        }
        out.sort_by_key(|r: &ReleaseRecord| r.created_at);
        Ok(out)
    }

    pub fn put_release(&self, release: &ReleaseRecord) -> Result<(), StoreError> {
        self.put(&self.releases, release.commit.as_bytes(), release)
    }

    pub fn remove_release(&self, commit: &str) -> Result<(), StoreError> {
        self.releases
            .remove(commit.as_bytes())
            .map_err(|e| self.write_err(e))?;
        self.flush()
    }
}

/// Bring a record of schema `from` (older than `SCHEMA_VERSION`) to the
/// current shape. Fields added since are filled in by serde defaults; what
/// can be derived from the old record is derived here.
fn migrate(value: &mut serde_json::Value, from: u32) {
    if from < 2 {
        // A host state of schema 1: the way back is the last healthy release.
        if let Some(scopes) = value
            .get_mut("scopes")
            .and_then(serde_json::Value::as_object_mut)
        {
            for state in scopes.values_mut() {
                let way_back = state
                    .get("last_healthy")
                    .and_then(|h| Some((h.get("owner")?.as_str()?, h.get("release")?.as_str()?)))
                    .map(|(owner, release)| serde_json::json!({ owner: release }));
                if let (Some(way_back), Some(state)) = (way_back, state.as_object_mut()) {
                    state.entry("way_back").or_insert(way_back);
                }
            }
        }
    }
    if let Some(object) = value.as_object_mut() {
        object.insert("schema".into(), SCHEMA_VERSION.into());
    }
}

fn warn_skipped(skipped: &[StoreError]) {
    for e in skipped {
        tracing::warn!("skipped a history record: {e}");
    }
}

fn id_from_key(key: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = key.len().min(8);
    bytes[8 - n..].copy_from_slice(&key[..n]);
    u64::from_be_bytes(bytes)
}

fn key_name(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) if text.chars().all(|c| !c.is_control()) => text.to_string(),
        _ => format!("rollout {}", id_from_key(key)),
    }
}

fn is_lock_error(error: &sled::Error) -> bool {
    match error {
        sled::Error::Io(io) => {
            io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("lock")
        }
        _ => false,
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64, scope: &str, outcome: Outcome) -> RolloutRecord {
        RolloutRecord {
            schema: SCHEMA_VERSION,
            id,
            commit: format!("{id:040x}"),
            previous_commit: None,
            trigger: "poll".into(),
            started_at: id,
            finished_at: None,
            outcome,
            user: None,
            subject: Some("a change".into()),
            author: Some("Test <test@example.invalid>".into()),
            scopes: vec![ScopeRecord {
                scope: scope.into(),
                owner: Owner::Native,
                action: "deploy".into(),
                reason: "first deploy".into(),
                release: None,
                built: true,
                members: vec![],
                result: None,
            }],
            phases: vec![],
            error: None,
            build_tail: vec![],
            journal: vec![],
            analysis: vec![],
        }
    }

    #[test]
    fn concurrent_writers_never_share_a_rollout_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let writers: Vec<_> = (0..4)
            .map(|w| {
                let store = store.clone();
                std::thread::spawn(move || {
                    (0..25)
                        .map(|_| {
                            let mut r = record(0, &format!("w{w}"), Outcome::Succeeded);
                            store.create_rollout(&mut r).expect("create")
                        })
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let mut ids: Vec<u64> = writers
            .into_iter()
            .flat_map(|w| w.join().expect("writer"))
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, (1..=100).collect::<Vec<u64>>(), "distinct, no gaps");
        // Each key holds a record that carries that id, 25 from each writer.
        let stored = store.rollouts(None, 1000).expect("list");
        let stored_ids: Vec<u64> = stored.iter().map(|r| r.id).collect();
        assert_eq!(stored_ids, (1..=100).rev().collect::<Vec<u64>>());
        for w in 0..4 {
            let scope = format!("w{w}");
            let mine = stored.iter().filter(|r| r.scopes[0].scope == scope).count();
            assert_eq!(mine, 25, "{scope}");
        }
    }

    /// A store in `dir` holding web's rollouts of these ids and outcomes.
    fn store_with(dir: &Path, rollouts: &[(u64, Outcome)]) -> Store {
        let store = Store::open(dir).expect("open");
        for (id, outcome) in rollouts {
            store
                .put_rollout(&record(*id, "web", *outcome))
                .expect("put");
        }
        store
    }

    fn ids(records: Result<Vec<RolloutRecord>, StoreError>) -> Vec<u64> {
        records.expect("read").iter().map(|r| r.id).collect()
    }

    #[test]
    fn rollouts_are_listed_newest_first_and_filtered_by_scope() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        for (id, scope) in [(1, "web"), (2, "api"), (3, "web")] {
            let mut r = record(0, scope, Outcome::Succeeded);
            assert_eq!(store.create_rollout(&mut r).expect("create"), id);
        }
        let all: Vec<u64> = ids(store.rollouts(None, 10));
        assert_eq!(all, vec![3, 2, 1]);
        let web: Vec<u64> = ids(store.rollouts(Some("web"), 10));
        assert_eq!(web, vec![3, 1]);
        let limited: Vec<u64> = ids(store.rollouts(None, 1));
        assert_eq!(limited, vec![3]);
    }

    #[test]
    fn records_survive_reopening_and_unfinished_ones_are_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(store_with(
            dir.path(),
            &[(1, Outcome::Succeeded), (2, Outcome::InProgress)],
        ));
        let store = Store::open(dir.path()).expect("reopen");
        let unfinished: Vec<u64> = ids(store.unfinished_rollouts());
        assert_eq!(unfinished, vec![2]);
        assert_eq!(
            store.rollout(1).expect("get"),
            Some(record(1, "web", Outcome::Succeeded))
        );
    }

    #[test]
    fn unfinished_rollouts_come_from_their_index_and_an_older_database_is_indexed_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store_with(
            dir.path(),
            &[
                (1, Outcome::InProgress),
                (2, Outcome::Succeeded),
                (3, Outcome::InProgress),
            ],
        );
        // Finishing a rollout takes it out of the index.
        store
            .put_rollout(&record(1, "web", Outcome::Interrupted))
            .expect("put");
        assert_eq!(ids(store.unfinished_rollouts()), vec![3]);
        assert_eq!(store.unfinished.len(), 1);
        // Entries a crash can leave (a finished record, no record at all)
        // are dropped when read.
        for stale in [2u64, 9] {
            store
                .unfinished
                .insert(stale.to_be_bytes(), &[])
                .expect("insert");
        }
        assert_eq!(ids(store.unfinished_rollouts()), vec![3]);
        assert_eq!(store.unfinished.len(), 1);
        // A database from before the index: found by one scan at open.
        store.unfinished.clear().expect("clear");
        store.state.remove(INDEXED_KEY).expect("remove");
        store.flush().expect("flush");
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(ids(store.unfinished_rollouts()), vec![3]);
        assert!(store.state.contains_key(INDEXED_KEY).expect("read"));
    }

    #[test]
    fn a_record_from_another_schema_version_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut r = record(7, "web", Outcome::Failed);
        r.schema = 99;
        store.put_rollout(&r).expect("put");
        let err = store.rollout(7).expect_err("schema 99 must be refused");
        assert_eq!(
            err.to_string(),
            format!(
                "record \"rollout 7\" in \"{}\" has schema version 99; this moorline reads versions 1 to 2",
                dir.path().join("history").display()
            )
        );
    }

    /// A rollout and a host state as moorline 0.1 (schema 1) stored them.
    const ROLLOUT_V1: &str = r#"{"schema":1,"id":3,"commit":"1111111111111111111111111111111111111111","previous_commit":null,"trigger":"poll","started_at":10,"finished_at":20,"outcome":"succeeded","scopes":[{"scope":"api","owner":"native","action":"deploy","reason":"first deploy","release":"1111111111111111111111111111111111111111","built":true,"members":["app-api.service"],"result":"healthy"}],"phases":[{"phase":"fetch","duration_ms":4}],"error":null,"build_tail":[],"journal":[{"at":11,"step":"restart app-api.service on 1111111","state":"done"}]}"#;
    const HOST_V1: &str = r#"{"schema":1,"deployed_commit":"1111111111111111111111111111111111111111","failed_commit":null,"scopes":{"api":{"current":{"owner":"docker","release":"2222222222222222222222222222222222222222","commit":"1111111111111111111111111111111111111111","fingerprint":"f","section_text":"s","path_ids":{},"members":["app-api"],"rollout":3,"at":20},"healthy":true,"last_healthy":{"owner":"docker","release":"2222222222222222222222222222222222222222","commit":"1111111111111111111111111111111111111111","fingerprint":"f","section_text":"s","path_ids":{},"members":["app-api"],"rollout":3,"at":20}}}}"#;

    #[test]
    fn records_of_schema_1_are_read_as_the_current_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store
            .rollouts
            .insert(3u64.to_be_bytes(), ROLLOUT_V1.as_bytes())
            .expect("raw insert");
        store
            .state
            .insert(HOST_KEY, HOST_V1.as_bytes())
            .expect("raw insert");
        let record = store.rollout(3).expect("read v1").expect("present");
        assert_eq!(record.schema, SCHEMA_VERSION);
        assert_eq!((record.subject, record.author), (None, None));
        assert_eq!(record.scopes[0].members, ["app-api.service"]);
        assert_eq!(record.journal.len(), 1);
        let host = store.host().expect("read v1 host");
        let api = &host.scopes["api"];
        // The way back of a schema-1 state is its last healthy release.
        assert_eq!(
            api.way_back,
            BTreeMap::from([(Owner::Docker, "2".repeat(40))])
        );
        assert_eq!(api.problem, None);
    }

    #[test]
    fn an_undecodable_record_is_skipped_and_the_rest_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store_with(dir.path(), &[(1, Outcome::Succeeded)]);
        // A write cut short, then a record of a newer moorline.
        store
            .rollouts
            .insert(2u64.to_be_bytes(), &br#"{"schema":2,"id":2,"comm"#[..])
            .expect("raw insert");
        let mut newer = record(3, "web", Outcome::InProgress);
        newer.schema = 9;
        store.put_rollout(&newer).expect("put");
        store
            .put_rollout(&record(4, "web", Outcome::InProgress))
            .expect("put");
        let (records, skipped) = store.scan(10, |_| true).expect("scan");
        assert_eq!(records.iter().map(|r| r.id).collect::<Vec<_>>(), [4, 1]);
        let db = dir.path().join("history");
        let skipped: Vec<String> = skipped.iter().map(ToString::to_string).collect();
        assert_eq!(
            skipped,
            [
                format!(
                    "record \"rollout 3\" in \"{}\" has schema version 9; this moorline reads versions 1 to 2",
                    db.display()
                ),
                format!(
                    "record \"rollout 2\" in \"{}\" is unreadable: EOF while parsing a string at line 1 column 24",
                    db.display()
                ),
            ]
        );
        assert_eq!(ids(store.rollouts(None, 10)), [4, 1]);
        assert_eq!(ids(store.unfinished_rollouts()), [4]);
    }
}
