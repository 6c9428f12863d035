//! Planning: from a validated manifest, the inputs of each scope at a commit
//! and the host's recorded state, decide what every scope needs and why.
//! Pure: no I/O, so every decision is tested on fixtures.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::manifest::{Manifest, Owner, Scope};
use crate::store::{DeployedScope, HandState, HostState, ReleaseRecord, ScopeState};

/// The scope name `moorline approve COMMIT` without `--scope` records:
/// every gated scope of the commit.
pub const ALL_SCOPES: &str = "*";

/// What a scope's deployment depends on at one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeInputs {
    pub section_text: String,
    /// `paths` entry (or `*`) → object id, `-` when absent.
    pub path_ids: BTreeMap<String, String>,
}

impl ScopeInputs {
    /// Equal fingerprints mean equal manifest section and equal files.
    pub fn fingerprint(&self) -> String {
        let mut hasher = Sha256::new();
        hasher.update(self.section_text.as_bytes());
        for (path, id) in &self.path_ids {
            hasher.update(b"\0");
            hasher.update(path.as_bytes());
            hasher.update(b"\0");
            hasher.update(id.as_bytes());
        }
        hex::encode(hasher.finalize())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Restart the scope's members on a (new or reused) release.
    Deploy,
    /// The owner changed: stop the old runtime's members, start the new one's.
    Cutover {
        from: Owner,
    },
    Unchanged,
    /// The scope left the manifest (or this host): stop its members.
    Remove,
    /// The scope runs on other hosts (`hosts`), never here.
    Skip,
    /// Held by hand (`moorline hold`): left exactly as it runs.
    Held,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deploy => "deploy",
            Action::Cutover { .. } => "cutover",
            Action::Unchanged => "unchanged",
            Action::Remove => "remove",
            Action::Skip => "skip",
            Action::Held => "held",
        }
    }

    /// Whether carrying out the step touches anything on this host.
    pub fn touches(self) -> bool {
        !matches!(self, Action::Unchanged | Action::Skip | Action::Held)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopePlan {
    pub scope: String,
    pub owner: Owner,
    pub action: Action,
    pub reason: String,
    /// The release whose files the scope will run: an existing release
    /// with identical inputs (no build), else the planned commit.
    pub release: String,
    /// Whether the scope's build commands run.
    pub build: bool,
    pub fingerprint: String,
    pub path_ids: BTreeMap<String, String>,
    pub section_text: String,
    /// Members the scope ran on this owner that it no longer lists: stopped
    /// and removed once the rollout is healthy.
    pub retired: Vec<String>,
    /// The members the scope runs once this step is done (a removed
    /// scope: those it ran).
    pub members: Vec<String>,
    /// The scope's `approve` gate holds the commit until `moorline approve`.
    pub awaiting: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub commit: String,
    /// Every scope of the manifest in deploy order, then removed scopes.
    pub scopes: Vec<ScopePlan>,
}

impl Plan {
    /// Whether running this plan touches anything.
    pub fn changes_anything(&self) -> bool {
        self.scopes.iter().any(|s| s.action.touches())
    }

    /// The steps that wait for `moorline approve`: while there is one,
    /// nothing of the commit deploys.
    pub fn awaiting(&self) -> impl Iterator<Item = &ScopePlan> {
        self.scopes.iter().filter(|s| s.awaiting)
    }

    /// Whether the planned commit's release directory is needed.
    pub fn needs_checkout(&self) -> bool {
        self.scopes
            .iter()
            .any(|s| s.action.touches() && s.action != Action::Remove && s.release == self.commit)
    }
}

/// The repository paths whose content a scope's deployment depends on: its
/// `paths`, plus its unit files, Dockerfiles and the scripts its `build`
/// commands run from the repository, which belong to it whether listed or
/// not. No `paths` means the whole tree (empty list).
pub fn input_paths(scope: &Scope) -> Vec<String> {
    if scope.paths.is_empty() {
        return vec![];
    }
    let mut paths = scope.paths.clone();
    let unit_files = scope
        .native
        .iter()
        .flat_map(|n| n.unit_files.iter().cloned());
    let dockerfiles = scope
        .docker
        .iter()
        .flat_map(|d| d.containers.iter().filter_map(|c| c.dockerfile.clone()));
    let scripts = scope.build.iter().flat_map(|line| build_scripts(line));
    for path in unit_files.chain(dockerfiles).chain(scripts) {
        let covered = paths
            .iter()
            .any(|p| path == *p || (p.ends_with('/') && path.starts_with(p.as_str())));
        if !covered {
            paths.push(path);
        }
    }
    paths
}

/// The repository files a build command line runs: every word written as a
/// relative path (`./build-api.sh`, `sh deploy/stage.sh`, `python3
/// tools/gen.py`), normalised without `./`. A word that is not a file at
/// the commit only costs a `-` in the fingerprint.
fn build_scripts(line: &str) -> Vec<String> {
    line.split(|c: char| c.is_whitespace() || matches!(c, ';' | '&' | '|' | '(' | ')'))
        .map(|word| word.trim_matches(|c| c == '"' || c == '\''))
        .filter(|word| {
            word.contains('/')
                && !word.starts_with('/')
                && !word.starts_with('-')
                && !word.contains(['$', '=', '*', '?', '~', '`', '<', '>'])
        })
        .filter_map(|word| {
            let mut parts = Vec::new();
            for part in word.split('/') {
                match part {
                    "" | "." => {}
                    ".." => return None,
                    part => parts.push(part),
                }
            }
            (!parts.is_empty()).then(|| parts.join("/"))
        })
        .collect()
}

/// Decide what each scope needs to reach `commit`.
pub fn plan(
    commit: &str,
    manifest: &Manifest,
    inputs: &BTreeMap<String, ScopeInputs>,
    host: &HostState,
    releases: &[ReleaseRecord],
    here: &str,
    hand: &HandState,
) -> Plan {
    let holds = &hand.holds;
    let approved = hand.approvals.get(commit);
    let mut scopes = Vec::new();
    for name in manifest.waves.iter().flatten() {
        let Some(scope) = manifest.scopes.get(name) else {
            continue;
        };
        if let (Some(hold), Some(state)) = (holds.get(name), host.scopes.get(name)) {
            scopes.push(as_deployed(name, state, Action::Held, hold.describe()));
            continue;
        }
        if !scope.runs_on(here) {
            scopes.push(elsewhere(commit, scope, host.scopes.get(name)));
            continue;
        }
        let input = inputs.get(name).cloned().unwrap_or(ScopeInputs {
            section_text: scope.section_text.clone(),
            path_ids: BTreeMap::new(),
        });
        let fingerprint = input.fingerprint();
        let owner = scope.owner;
        let (action, reason) = match host.scopes.get(name) {
            None => (Action::Deploy, "first deploy".to_string()),
            Some(state) => {
                let current = &state.current;
                if current.owner != owner {
                    (
                        Action::Cutover {
                            from: current.owner,
                        },
                        format!("owner changed from {} to {owner}", current.owner),
                    )
                } else if current.section_text != input.section_text {
                    (Action::Deploy, "manifest section changed".to_string())
                } else if current.fingerprint != fingerprint {
                    (
                        Action::Deploy,
                        changed_paths(&current.path_ids, &input.path_ids),
                    )
                } else if !state.healthy {
                    (
                        Action::Deploy,
                        "last deploy was not healthy; trying again".to_string(),
                    )
                } else {
                    (Action::Unchanged, "unchanged".to_string())
                }
            }
        };
        let awaiting = scope.approve.gates(action)
            && !approved.is_some_and(|a| a.contains(name) || a.contains(ALL_SCOPES));
        let retired: Vec<String> = match (action, host.scopes.get(name)) {
            (Action::Deploy, Some(state)) => {
                let members = scope.members();
                state
                    .current
                    .members
                    .iter()
                    .filter(|m| !members.contains(m))
                    .cloned()
                    .collect()
            }
            _ => vec![],
        };
        let reason = if retired.is_empty() {
            reason
        } else {
            format!(
                "{reason}; stops {} (no longer in the scope)",
                retired.join(", ")
            )
        };
        let (release, build) = match action {
            Action::Unchanged => (
                host.scopes
                    .get(name)
                    .map(|s| s.current.release.clone())
                    .unwrap_or_else(|| commit.to_string()),
                false,
            ),
            _ => match reusable_release(releases, name, &fingerprint) {
                Some(release) => (release, false),
                None => (commit.to_string(), true),
            },
        };
        scopes.push(ScopePlan {
            scope: name.clone(),
            owner: scope.owner,
            action,
            reason,
            release,
            build,
            fingerprint,
            path_ids: input.path_ids,
            section_text: input.section_text,
            retired,
            members: scope.members(),
            awaiting,
        });
    }
    for (name, state) in host.scopes.iter().rev() {
        if manifest.scopes.contains_key(name) {
            continue;
        }
        // A held scope stays as it runs even when the manifest drops it.
        match holds.get(name) {
            Some(hold) => scopes.push(as_deployed(name, state, Action::Held, hold.describe())),
            None => {
                let reason = "scope removed from the manifest".to_string();
                scopes.push(as_deployed(name, state, Action::Remove, reason));
            }
        }
    }
    Plan {
        commit: commit.to_string(),
        scopes,
    }
}

/// What a rollout by hand brings one scope to, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct HandStep {
    pub to: DeployedScope,
    pub reason: String,
}

/// The plan of a rollout asked for by hand (`rollback`, `restart`) at the
/// deployed `commit`: each scope in `steps` goes to its deployment (a
/// cutover if the owner differs), from the release it names, with no build;
/// every other scope stays as it runs.
pub fn by_hand(commit: &str, host: &HostState, steps: &BTreeMap<String, HandStep>) -> Plan {
    let scopes = host
        .scopes
        .iter()
        .map(|(name, state)| {
            let Some(step) = steps.get(name) else {
                let reason = "not part of this rollout".to_string();
                return as_deployed(name, state, Action::Unchanged, reason);
            };
            let (current, to) = (&state.current, &step.to);
            let action = if current.owner == to.owner {
                Action::Deploy
            } else {
                Action::Cutover {
                    from: current.owner,
                }
            };
            let retired = match action {
                Action::Deploy => current
                    .members
                    .iter()
                    .filter(|m| !to.members.contains(m))
                    .cloned()
                    .collect(),
                _ => vec![],
            };
            ScopePlan {
                scope: name.clone(),
                owner: to.owner,
                action,
                reason: step.reason.clone(),
                release: to.release.clone(),
                build: false,
                fingerprint: to.fingerprint.clone(),
                path_ids: to.path_ids.clone(),
                section_text: to.section_text.clone(),
                retired,
                members: to.members.clone(),
                awaiting: false,
            }
        })
        .collect();
    Plan {
        commit: commit.to_string(),
        scopes,
    }
}

/// A step that leaves the scope's deployment as it is recorded (held), or
/// takes all of it away (removed).
fn as_deployed(name: &str, state: &ScopeState, action: Action, reason: String) -> ScopePlan {
    let current = &state.current;
    ScopePlan {
        scope: name.to_string(),
        owner: current.owner,
        action,
        reason,
        release: current.release.clone(),
        build: false,
        fingerprint: current.fingerprint.clone(),
        path_ids: current.path_ids.clone(),
        section_text: current.section_text.clone(),
        retired: vec![],
        members: current.members.clone(),
        awaiting: false,
    }
}

/// The step of a scope that `hosts` keeps off this host: nothing, or, when
/// it ran here before, its removal.
fn elsewhere(commit: &str, scope: &Scope, state: Option<&ScopeState>) -> ScopePlan {
    let reason = format!("not on this host (hosts: {})", scope.hosts.join(", "));
    match state {
        Some(state) => as_deployed(&scope.name, state, Action::Remove, reason),
        None => ScopePlan {
            scope: scope.name.clone(),
            owner: scope.owner,
            action: Action::Skip,
            reason,
            release: commit.to_string(),
            build: false,
            fingerprint: String::new(),
            path_ids: BTreeMap::new(),
            section_text: scope.section_text.clone(),
            retired: vec![],
            members: vec![],
            awaiting: false,
        },
    }
}

/// The newest release in which this scope was built from identical inputs.
fn reusable_release(releases: &[ReleaseRecord], scope: &str, fingerprint: &str) -> Option<String> {
    releases
        .iter()
        .rev()
        .find(|r| r.built.get(scope).is_some_and(|f| f == fingerprint))
        .map(|r| r.commit.clone())
}

fn changed_paths(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> String {
    if new.contains_key("*") {
        return "files changed".to_string();
    }
    let changed: Vec<&str> = new
        .iter()
        .filter(|(path, id)| old.get(*path) != Some(id))
        .map(|(path, _)| path.as_str())
        .collect();
    if changed.is_empty() {
        "paths changed".to_string()
    } else {
        format!("paths {} changed", changed.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeployedScope, SCHEMA_VERSION, ScopeState};

    /// The plan as a host named "test-host" makes it.
    fn plan(
        commit: &str,
        manifest: &Manifest,
        inputs: &BTreeMap<String, ScopeInputs>,
        host: &HostState,
        releases: &[ReleaseRecord],
    ) -> Plan {
        super::plan(
            commit,
            manifest,
            inputs,
            host,
            releases,
            "test-host",
            &HandState::default(),
        )
    }

    const MANIFEST: &str = r#"
version = 1
[scopes.infra]
owner = "native"
[scopes.infra.native]
units = ["infra.service"]
[scopes.api]
owner = "native"
after = ["infra"]
paths = ["services/api/", "packages/"]
[scopes.api.native]
units = ["api.service"]
[scopes.api.docker]
[[scopes.api.docker.containers]]
name = "api"
image = "api"
[scopes.web]
owner = "native"
after = ["api"]
paths = ["web/"]
[scopes.web.native]
units = ["web.service"]
"#;

    fn manifest(text: &str) -> Manifest {
        crate::manifest::parse("deploy/moorline.toml", text.as_bytes())
            .expect("fixture manifest is valid")
    }

    fn ids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn inputs(
        m: &Manifest,
        api: &str,
        packages: &str,
        web: &str,
        root: &str,
    ) -> BTreeMap<String, ScopeInputs> {
        let mut out = BTreeMap::new();
        for (name, path_ids) in [
            ("infra", ids(&[("*", root)])),
            (
                "api",
                ids(&[("services/api/", api), ("packages/", packages)]),
            ),
            ("web", ids(&[("web/", web)])),
        ] {
            if let Some(scope) = m.scopes.get(name) {
                out.insert(
                    name.to_string(),
                    ScopeInputs {
                        section_text: scope.section_text.clone(),
                        path_ids,
                    },
                );
            }
        }
        out
    }

    /// The plan of the fixture's first deploy, at commit "A".
    fn first_deploy(m: &Manifest) -> Plan {
        plan(
            "A",
            m,
            &inputs(m, "a1", "p1", "w1", "r1"),
            &HostState::default(),
            &[],
        )
    }

    /// The plan of commit "B" with the first deploy's files, over `host`.
    fn replan(m: &Manifest, host: &HostState, first: &Plan) -> Plan {
        plan(
            "B",
            m,
            &inputs(m, "a1", "p1", "w1", "r1"),
            host,
            &[built("A", first)],
        )
    }

    /// The members a fixture scope runs: its unit, named after it.
    fn m_members(s: &ScopePlan) -> Vec<String> {
        vec![format!("{}.service", s.scope)]
    }

    /// The host state after `plan` was carried out and found healthy.
    fn deployed(plan: &Plan, owners: &[(&str, &str)]) -> HostState {
        let mut host = HostState {
            schema: SCHEMA_VERSION,
            deployed_commit: Some(plan.commit.clone()),
            ..HostState::default()
        };
        for s in &plan.scopes {
            let owner = owners
                .iter()
                .find(|(n, _)| *n == s.scope)
                .and_then(|(_, o)| Owner::parse(o))
                .unwrap_or(s.owner);
            let current = DeployedScope {
                owner,
                release: s.release.clone(),
                commit: plan.commit.clone(),
                fingerprint: s.fingerprint.clone(),
                section_text: s.section_text.clone(),
                path_ids: s.path_ids.clone(),
                members: m_members(s),
                rollout: 1,
                at: 0,
            };
            host.scopes
                .insert(s.scope.clone(), ScopeState::healthy(current, None));
        }
        host
    }

    fn built(commit: &str, plan: &Plan) -> ReleaseRecord {
        ReleaseRecord {
            schema: SCHEMA_VERSION,
            commit: commit.to_string(),
            created_at: 0,
            built: plan
                .scopes
                .iter()
                .filter(|s| s.build)
                .map(|s| (s.scope.clone(), s.fingerprint.clone()))
                .collect(),
        }
    }

    fn summary(plan: &Plan) -> Vec<String> {
        plan.scopes
            .iter()
            .map(|s| {
                format!(
                    "{} {} release={} build={} ({})",
                    s.scope,
                    s.action.as_str(),
                    s.release,
                    s.build,
                    s.reason
                )
            })
            .collect()
    }

    #[test]
    fn planning_follows_paths_sections_owners_and_reuses_identical_releases() {
        let m = manifest(MANIFEST);
        let first = first_deploy(&m);
        assert_eq!(
            summary(&first),
            [
                "infra deploy release=A build=true (first deploy)",
                "api deploy release=A build=true (first deploy)",
                "web deploy release=A build=true (first deploy)",
            ]
        );
        let host = deployed(&first, &[]);
        let releases = vec![built("A", &first)];

        // Only web/ changed: infra has no paths, so any change is its change.
        let second = plan(
            "B",
            &m,
            &inputs(&m, "a1", "p1", "w2", "r2"),
            &host,
            &releases,
        );
        assert_eq!(
            summary(&second),
            [
                "infra deploy release=B build=true (files changed)",
                "api unchanged release=A build=false (unchanged)",
                "web deploy release=B build=true (paths web/ changed)",
            ]
        );

        // A revert to A's files reuses release A without a build.
        let host_b = deployed(&second, &[]);
        let releases_b = vec![built("A", &first), built("B", &second)];
        let revert = plan(
            "C",
            &m,
            &inputs(&m, "a1", "p1", "w1", "r1"),
            &host_b,
            &releases_b,
        );
        assert_eq!(
            summary(&revert),
            [
                "infra deploy release=A build=false (files changed)",
                "api unchanged release=A build=false (unchanged)",
                "web deploy release=A build=false (paths web/ changed)",
            ]
        );

        // A shared path changes api only.
        let shared = plan(
            "D",
            &m,
            &inputs(&m, "a1", "p2", "w1", "r1"),
            &host,
            &releases,
        );
        assert_eq!(shared.scopes[1].reason, "paths packages/ changed");
        assert_eq!(shared.scopes[2].action, Action::Unchanged);
    }

    #[test]
    fn an_approve_gate_marks_its_steps_until_the_commit_is_approved() {
        let gated = MANIFEST.replace(
            "[scopes.api]\nowner = \"native\"\n",
            "[scopes.api]\nowner = \"native\"\napprove = \"cutover\"\n",
        );
        let m = manifest(&gated);
        // The gate is no input: adding it redeploys nothing.
        assert_eq!(
            m.scopes["api"].section_text,
            manifest(MANIFEST).scopes["api"].section_text
        );
        let first = first_deploy(&m);
        assert!(
            first.awaiting().next().is_none(),
            "a first deploy is no cutover"
        );
        let host = deployed(&first, &[("api", "docker")]);
        let files = inputs(&m, "a1", "p1", "w2", "r1");
        let mut hand = HandState::default();
        let run = |hand: &HandState| super::plan("B", &m, &files, &host, &[], "test-host", hand);
        let waiting: Vec<_> = run(&hand).awaiting().map(|s| s.scope.clone()).collect();
        assert_eq!(waiting, ["api"]);
        // Approving another commit, or another scope, lets nothing go.
        hand.approvals
            .entry("C".into())
            .or_default()
            .insert(ALL_SCOPES.into());
        hand.approvals
            .entry("B".into())
            .or_default()
            .insert("web".into());
        assert_eq!(run(&hand).awaiting().count(), 1);
        hand.approvals
            .entry("B".into())
            .or_default()
            .insert("api".into());
        assert_eq!(run(&hand).awaiting().count(), 0);
        hand.approvals.clear();
        hand.approvals
            .entry("B".into())
            .or_default()
            .insert(ALL_SCOPES.into());
        assert_eq!(run(&hand).awaiting().count(), 0);

        // "always" gates any change, never an unchanged scope.
        let always = manifest(&MANIFEST.replace(
            "[scopes.web]\nowner = \"native\"\n",
            "[scopes.web]\nowner = \"native\"\napprove = \"always\"\n",
        ));
        let host = deployed(&first_deploy(&always), &[]);
        let plan_of = |web: &str| {
            let files = inputs(&always, "a1", "p1", web, "r1");
            super::plan(
                "B",
                &always,
                &files,
                &host,
                &[],
                "test-host",
                &HandState::default(),
            )
        };
        assert_eq!(plan_of("w1").awaiting().count(), 0);
        let changed: Vec<_> = plan_of("w2").awaiting().map(|s| s.scope.clone()).collect();
        assert_eq!(changed, ["web"]);
    }

    #[test]
    fn a_held_scope_is_left_as_it_runs_even_when_the_manifest_drops_it() {
        let m = manifest(MANIFEST);
        let host = deployed(&first_deploy(&m), &[]);
        let without_web =
            manifest(&MANIFEST[..MANIFEST.find("[scopes.web]").expect("fixture has web")]);
        let mut hand = HandState::default();
        hand.holds.insert(
            "web".into(),
            crate::store::Hold {
                reason: "keep it".into(),
                user: "alice (uid 1000)".into(),
                uid: 1000,
                since: 0,
                pin: None,
            },
        );
        let files = inputs(&without_web, "a1", "p1", "w1", "r1");
        let next = super::plan("B", &without_web, &files, &host, &[], "test-host", &hand);
        let web = next.scopes.iter().find(|s| s.scope == "web").expect("web");
        assert_eq!(web.action, Action::Held);
        assert_eq!(
            web.reason,
            "held (keep it, by alice (uid 1000) since 1970-01-01T00:00:00Z)"
        );
        assert!(!next.changes_anything());
    }

    #[test]
    fn a_plan_by_hand_moves_only_its_scopes_without_a_build() {
        let m = manifest(MANIFEST);
        let first = first_deploy(&m);
        let mut host = deployed(&first, &[]);
        let api = host.scopes["api"].current.clone();
        host.scopes.get_mut("api").expect("api").current.release = "B".into();
        let mut to = api.clone();
        to.owner = Owner::Docker;
        to.members = vec!["api".into()];
        let steps = BTreeMap::from([(
            "api".to_string(),
            HandStep {
                to: to.clone(),
                reason: "rollback by hand to release A: slow".into(),
            },
        )]);
        let plan = by_hand("B", &host, &steps);
        assert_eq!(plan.commit, "B");
        let api_step = plan.scopes.iter().find(|s| s.scope == "api").expect("api");
        assert_eq!(
            api_step.action,
            Action::Cutover {
                from: Owner::Native
            }
        );
        assert_eq!((api_step.release.as_str(), api_step.build), ("A", false));
        assert_eq!(api_step.fingerprint, to.fingerprint);
        assert_eq!(api_step.members, ["api"]);
        assert!(api_step.retired.is_empty(), "a cutover retires nothing");
        for other in plan.scopes.iter().filter(|s| s.scope != "api") {
            assert_eq!(other.action, Action::Unchanged, "{other:?}");
            assert_eq!(other.reason, "not part of this rollout");
        }
        // The same owner: a deploy, which retires members the release lacks.
        let mut same = api.clone();
        same.members = vec![];
        let steps = BTreeMap::from([(
            "api".to_string(),
            HandStep {
                to: same,
                reason: "restart by hand: env".into(),
            },
        )]);
        let plan = by_hand("B", &host, &steps);
        let api_step = plan.scopes.iter().find(|s| s.scope == "api").expect("api");
        assert_eq!(api_step.action, Action::Deploy);
        assert_eq!(api_step.retired, ["api.service"]);
    }

    #[test]
    fn owner_and_section_changes_and_removed_scopes_are_named() {
        let m = manifest(MANIFEST);
        let first = first_deploy(&m);
        let host = deployed(&first, &[("api", "docker")]);
        let next = replan(&m, &host, &first);
        assert_eq!(
            next.scopes[1].action,
            Action::Cutover {
                from: Owner::Docker
            }
        );
        assert_eq!(next.scopes[1].reason, "owner changed from docker to native");

        let edited =
            manifest(&MANIFEST.replace("units = [\"web.service\"]", "units = [\"web2.service\"]"));
        let host = deployed(&first, &[]);
        let next = replan(&edited, &host, &first);
        assert_eq!(
            summary(&next)[2],
            "web deploy release=B build=true (manifest section changed; stops web.service (no longer in the scope))"
        );

        let without_web =
            manifest(&MANIFEST[..MANIFEST.find("[scopes.web]").expect("fixture has web")]);
        let next = plan(
            "B",
            &without_web,
            &inputs(&without_web, "a1", "p1", "w1", "r1"),
            &host,
            &[],
        );
        let last = next.scopes.last().expect("a removed scope is planned");
        assert_eq!((last.scope.as_str(), last.action), ("web", Action::Remove));
        assert_eq!(last.reason, "scope removed from the manifest");
    }

    /// Scopes whose inputs come from more than `paths`.
    const INPUTS: &str = r#"
version = 1
[scopes.web]
owner = "native"
paths = ["services/web/", "deploy/units/"]
[scopes.web.native]
units = ["web.service"]
unit_files = ["deploy/units/web.service"]
[[scopes.web.docker.containers]]
name = "web"
image = "web"
dockerfile = "deploy/docker/web.Dockerfile"
[scopes.all]
owner = "native"
[scopes.all.native]
units = ["all.service"]
unit_files = ["deploy/units/all.service"]
[scopes.api]
owner = "native"
paths = ["services/api/", "tools/"]
build = ["./build-api.sh", "sh deploy/stage.sh && python3 tools/gen.py --out=x", "make -C /opt/x", "./../up.sh"]
[scopes.api.native]
units = ["api.service"]
"#;

    #[test]
    fn unit_files_and_dockerfiles_are_inputs_whether_listed_or_not() {
        let m = manifest(INPUTS);
        assert_eq!(
            input_paths(&m.scopes["web"]),
            [
                "services/web/",
                "deploy/units/",
                "deploy/docker/web.Dockerfile"
            ]
        );
        assert!(
            input_paths(&m.scopes["all"]).is_empty(),
            "no paths: the whole tree"
        );
    }

    #[test]
    fn members_dropped_from_a_scope_are_named_in_the_plan() {
        let m = manifest(MANIFEST);
        let first = first_deploy(&m);
        let mut host = deployed(&first, &[]);
        host.scopes
            .get_mut("api")
            .expect("api deployed")
            .current
            .members
            .push("api-extra.service".into());
        // The manifest lists only api.service now.
        let mut m2 = manifest(MANIFEST);
        m2.scopes.get_mut("api").expect("api").section_text += "\n# edited";
        let next = replan(&m2, &host, &first);
        let api = &next.scopes[1];
        assert_eq!(api.retired, ["api-extra.service"]);
        assert_eq!(
            api.reason,
            "manifest section changed; stops api-extra.service (no longer in the scope)"
        );
        assert!(next.scopes[2].retired.is_empty());
    }

    #[test]
    fn scopes_for_other_hosts_are_skipped_or_removed_from_this_one() {
        let text = MANIFEST.replace(
            "[scopes.web]\nowner = \"native\"",
            "[scopes.web]\nowner = \"native\"\nhosts = [\"vps-2\", \"vps-3\"]",
        );
        let m = manifest(&text);
        let first = first_deploy(&m);
        assert_eq!(
            summary(&first)[2],
            "web skip release=A build=false (not on this host (hosts: vps-2, vps-3))"
        );
        assert!(!first.scopes[2].action.touches());
        // Web ran here before its hosts moved it away: it is removed.
        let everywhere = manifest(MANIFEST);
        let host = deployed(&first_deploy(&everywhere), &[]);
        let moved = plan("B", &m, &inputs(&m, "a1", "p1", "w1", "r1"), &host, &[]);
        assert_eq!(moved.scopes[2].action, Action::Remove);
        assert_eq!(moved.scopes[2].members, ["web.service"]);
        assert_eq!(
            moved.scopes[2].reason,
            "not on this host (hosts: vps-2, vps-3)"
        );
        let here = super::plan(
            "B",
            &m,
            &inputs(&m, "a1", "p1", "w1", "r1"),
            &host,
            &[],
            "vps-2",
            &HandState::default(),
        );
        // On a host it lists, web is an ordinary scope (its section changed).
        assert_eq!(here.scopes[2].action, Action::Deploy);
        assert_eq!(here.scopes[2].reason, "manifest section changed");
    }

    #[test]
    fn scripts_a_build_runs_from_the_repository_are_inputs() {
        let m = manifest(INPUTS);
        assert_eq!(
            input_paths(&m.scopes["api"]),
            ["services/api/", "tools/", "build-api.sh", "deploy/stage.sh"]
        );
        assert_eq!(build_scripts("./build-api.sh"), ["build-api.sh"]);
        assert_eq!(
            build_scripts("cp -r x/ \"$OUT\"/y; ./deploy/./s.sh"),
            ["x", "deploy/s.sh"]
        );
    }

    #[test]
    fn an_unhealthy_scope_is_retried_on_the_next_commit() {
        let m = manifest(MANIFEST);
        let first = first_deploy(&m);
        let mut host = deployed(&first, &[]);
        host.scopes.get_mut("web").expect("web deployed").healthy = false;
        let next = replan(&m, &host, &first);
        assert_eq!(
            next.scopes[2].reason,
            "last deploy was not healthy; trying again"
        );
        assert_eq!(next.scopes[2].release, "A");
    }
}
