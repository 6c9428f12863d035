//! The rollout's decisions, with no I/O: whether a fetched commit needs a
//! rollout at all (`decide`), and, for one rollout, which step comes next,
//! what a step's result means, and what the host state and the outcome are
//! at the end (`Core`). The engine executes each `Next` through the journal
//! and reports what it returned; everything that could go wrong in between
//! is the engine's I/O, everything decided is here and table-tested below.

use crate::plan::{Action, Plan, ScopePlan};
use crate::store::{DeployedScope, HostState, Outcome, ScopeState};

/// What a fetched branch head calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The host runs the head, every scope healthy.
    UpToDate,
    /// The head failed before and nothing needs repair: wait for a newer commit.
    FailedBefore,
    /// Roll out `commit`.
    Roll { commit: String, target: Target },
}

/// What a rollout brings the host to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The branch head: success deploys it, failure quarantines it.
    Head,
    /// The deployed commit again, to bring back scopes found down while the
    /// head is quarantined; the quarantine stays as it is.
    Repair,
    /// What an operator asked for by hand (`rollback`, `restart`), at the
    /// deployed commit; the branch's commits stay as they are.
    Hand,
}

/// Whether `head` needs a rollout, given the host as recorded and whether
/// a scope was resumed since the last rollout (it must follow the branch
/// again even when the branch did not move).
pub fn decide(head: &str, host: &HostState, resumed: bool) -> Decision {
    let all_healthy = host.scopes.values().all(|s| s.healthy);
    if host.deployed_commit.as_deref() == Some(head) && all_healthy && !resumed {
        return Decision::UpToDate;
    }
    if host.failed_commit.as_deref() == Some(head) {
        return match &host.deployed_commit {
            Some(deployed) if !all_healthy => Decision::Roll {
                commit: deployed.clone(),
                target: Target::Repair,
            },
            _ => Decision::FailedBefore,
        };
    }
    // A scope found unhealthy (the audit, a failed rollback) is redeployed
    // even when the branch did not move.
    Decision::Roll {
        commit: head.to_string(),
        target: Target::Head,
    }
}

/// The host's commits once a rollout of `commit` ended with `outcome`.
pub fn record_outcome(host: &mut HostState, commit: &str, target: Target, outcome: Outcome) {
    match (outcome, target) {
        (Outcome::Succeeded, Target::Head) => {
            host.deployed_commit = Some(commit.to_string());
            host.failed_commit = None;
        }
        (_, Target::Head) => host.failed_commit = Some(commit.to_string()),
        (_, Target::Repair | Target::Hand) => {}
    }
}

/// The next thing the engine must do.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Check out the release and run the builds; nothing running is touched.
    Prepare,
    /// Take a removed scope's members out of service.
    Retire { scope: String },
    /// Bring a scope onto its planned release (a cutover stops the old
    /// owner's members first).
    Switch { scope: String },
    /// Watch the switched scope settle and pass its checks.
    Verify { scope: String },
    /// Every scope passed: store the host state, drop what was kept for a
    /// way back, retire members scopes no longer list.
    Finish,
    /// Undo a scope's switch: back to `to`, or, with no earlier healthy
    /// state, stop what was started.
    RollBack {
        scope: String,
        to: Option<DeployedScope>,
    },
    /// Nothing is left to do: read `outcome` and `host`.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Prepare,
    /// At plan step `cursor`: about to switch (or retire) it.
    Switch,
    /// At plan step `cursor`: switched, about to verify.
    Verify,
    Finish,
    /// Rolling back `switched[..remaining]`, newest first.
    RollBack {
        remaining: usize,
    },
    Done,
}

/// One rollout's state machine: `next` says what to do, `report` takes
/// what it returned (and the time, for the state it records).
#[derive(Debug, Clone)]
pub struct Core {
    plan: Plan,
    rollout: u64,
    /// The host as the rollout found it; a rollback starts again from it.
    start: HostState,
    host: HostState,
    phase: Phase,
    cursor: usize,
    /// Plan indexes of the scopes switched so far, in order.
    switched: Vec<usize>,
    failure: Option<String>,
    problems: Vec<String>,
    /// Per scope, the result to record ("switched", "healthy", ...).
    results: Vec<(String, String)>,
}

impl Core {
    pub fn new(plan: Plan, host: HostState, rollout: u64) -> Core {
        let mut core = Core {
            plan,
            rollout,
            start: host.clone(),
            host,
            phase: Phase::Prepare,
            cursor: 0,
            switched: Vec::new(),
            failure: None,
            problems: Vec::new(),
            results: Vec::new(),
        };
        if !core.plan.changes_anything() {
            core.phase = Phase::Done;
        }
        core
    }

    /// The plan step that is the subject of the current phase.
    fn step(&self) -> Option<&ScopePlan> {
        self.plan.scopes.get(self.cursor)
    }

    /// Move `cursor` to the next step that does something (or past the end).
    fn skip_unchanged(&mut self) {
        while self.step().is_some_and(|s| !s.action.touches()) {
            self.cursor += 1;
        }
        if self.cursor >= self.plan.scopes.len() {
            self.phase = Phase::Finish;
        }
    }

    pub fn next(&self) -> Next {
        match &self.phase {
            Phase::Prepare => Next::Prepare,
            Phase::Switch => match self.step() {
                Some(s) if s.action == Action::Remove => Next::Retire {
                    scope: s.scope.clone(),
                },
                Some(s) => Next::Switch {
                    scope: s.scope.clone(),
                },
                None => Next::Finish,
            },
            Phase::Verify => Next::Verify {
                scope: self.step().map(|s| s.scope.clone()).unwrap_or_default(),
            },
            Phase::Finish => Next::Finish,
            Phase::RollBack { remaining } => {
                let step = &self.plan.scopes[self.switched[remaining - 1]];
                Next::RollBack {
                    scope: step.scope.clone(),
                    to: self
                        .start
                        .scopes
                        .get(&step.scope)
                        .and_then(|s| s.last_healthy.clone()),
                }
            }
            Phase::Done => Next::Done,
        }
    }

    /// The result of what `next` asked for, at time `at` (ms).
    pub fn report(&mut self, result: Result<(), String>, at: u64) {
        match self.phase.clone() {
            Phase::Prepare => match result {
                Ok(()) => {
                    self.phase = Phase::Switch;
                    self.skip_unchanged();
                }
                Err(e) => {
                    self.failure = Some(e);
                    self.phase = Phase::Done;
                }
            },
            Phase::Switch => {
                let step = self.plan.scopes[self.cursor].clone();
                if step.action == Action::Remove {
                    match result {
                        Ok(()) => {
                            self.host.scopes.remove(&step.scope);
                            self.result(&step.scope, "stopped");
                            self.cursor += 1;
                            self.skip_unchanged();
                        }
                        Err(e) => {
                            self.fail(format!("removing scope \"{}\" failed: {e}", step.scope))
                        }
                    }
                    return;
                }
                // A switch that failed half-way is undone like one that passed.
                self.switched.push(self.cursor);
                match result {
                    Ok(()) => {
                        self.result(&step.scope, "switched");
                        self.phase = Phase::Verify;
                    }
                    Err(e) => self.fail(format!("switching scope \"{}\" failed: {e}", step.scope)),
                }
            }
            Phase::Verify => {
                let step = self.plan.scopes[self.cursor].clone();
                match result {
                    Ok(()) => {
                        self.result(&step.scope, "healthy");
                        let current = DeployedScope {
                            owner: step.owner,
                            release: step.release.clone(),
                            commit: self.plan.commit.clone(),
                            fingerprint: step.fingerprint.clone(),
                            section_text: step.section_text.clone(),
                            path_ids: step.path_ids.clone(),
                            members: step.members.clone(),
                            rollout: self.rollout,
                            at,
                        };
                        let state =
                            ScopeState::healthy(current, self.start.scopes.get(&step.scope));
                        self.host.scopes.insert(step.scope.clone(), state);
                        self.cursor += 1;
                        self.phase = Phase::Switch;
                        self.skip_unchanged();
                    }
                    Err(e) => {
                        self.fail(format!("scope \"{}\" failed verification: {e}", step.scope))
                    }
                }
            }
            Phase::Finish => self.phase = Phase::Done,
            Phase::RollBack { remaining } => {
                let index = self.switched[remaining - 1];
                let name = self.plan.scopes[index].scope.clone();
                let previous = self.start.scopes.get(&name).cloned();
                match previous.as_ref().and_then(|p| p.last_healthy.clone()) {
                    None => {
                        self.result(&name, "failed: stopped, no earlier healthy release");
                        self.host.scopes.remove(&name);
                        self.problems.push(format!(
                            "scope \"{name}\" has no earlier healthy release and was stopped"
                        ));
                        if let Err(e) = result {
                            self.problems.push(e);
                        }
                    }
                    Some(target) => {
                        let healthy = result.is_ok();
                        match result {
                            Ok(()) => self.result(&name, "rolled-back"),
                            Err(e) => {
                                self.result(&name, &format!("failed: rollback unhealthy: {e}"));
                                self.problems
                                    .push(format!("rolling back scope \"{name}\" failed: {e}"));
                            }
                        }
                        let way_back = previous.map(|p| p.way_back).unwrap_or_default();
                        self.host.scopes.insert(
                            name,
                            ScopeState {
                                current: target.clone(),
                                healthy,
                                last_healthy: Some(target),
                                problem: None,
                                way_back,
                            },
                        );
                    }
                }
                self.phase = if remaining > 1 {
                    Phase::RollBack {
                        remaining: remaining - 1,
                    }
                } else {
                    Phase::Done
                };
            }
            Phase::Done => {}
        }
    }

    /// A switch, verification or removal failed: undo what was switched,
    /// from the host as the rollout found it.
    fn fail(&mut self, reason: String) {
        self.failure = Some(reason);
        self.host = self.start.clone();
        self.phase = match self.switched.len() {
            0 => Phase::Done,
            n => Phase::RollBack { remaining: n },
        };
    }

    fn result(&mut self, scope: &str, text: &str) {
        self.results.push((scope.to_string(), text.to_string()));
    }

    /// The results recorded since the last call, oldest first.
    pub fn take_results(&mut self) -> Vec<(String, String)> {
        std::mem::take(&mut self.results)
    }

    /// The plan step of `scope`.
    pub fn plan_step(&self, scope: &str) -> Option<&ScopePlan> {
        self.plan.scopes.iter().find(|s| s.scope == scope)
    }

    /// The state `scope` was in when the rollout started.
    pub fn previous(&self, scope: &str) -> Option<&ScopeState> {
        self.start.scopes.get(scope)
    }

    /// The scopes switched in this rollout, in order.
    pub fn switched(&self) -> impl Iterator<Item = &ScopePlan> {
        self.switched.iter().map(|&i| &self.plan.scopes[i])
    }

    /// The host state to store: after `Finish`, or once `Done`.
    pub fn host(&self) -> &HostState {
        &self.host
    }

    /// How the rollout ended, once `Done`: the outcome and why.
    pub fn outcome(&self) -> (Outcome, Option<String>) {
        match (
            &self.failure,
            self.problems.is_empty(),
            self.switched.is_empty(),
        ) {
            (None, _, _) => (Outcome::Succeeded, None),
            // Nothing was switched: a prepare or removal failure.
            (Some(reason), _, true) => (Outcome::Failed, Some(reason.clone())),
            (Some(reason), true, false) => (Outcome::RolledBack, Some(reason.clone())),
            (Some(reason), false, false) => (
                Outcome::Failed,
                Some(format!("{reason}; {}", self.problems.join("; "))),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::runtime::Owner;
    use crate::store::SCHEMA_VERSION;

    fn step(scope: &str, owner: Owner, action: Action, release: &str) -> ScopePlan {
        ScopePlan {
            scope: scope.into(),
            owner,
            action,
            reason: String::new(),
            release: release.into(),
            build: false,
            fingerprint: format!("fp-{scope}-{release}"),
            path_ids: BTreeMap::new(),
            section_text: String::new(),
            retired: vec![],
            members: vec![format!("{scope}.{}", owner)],
            awaiting: false,
        }
    }

    fn deployed(scope: &str, owner: Owner, release: &str) -> ScopeState {
        let current = DeployedScope {
            owner,
            release: release.into(),
            commit: release.into(),
            fingerprint: format!("fp-{scope}-{release}"),
            section_text: String::new(),
            path_ids: BTreeMap::new(),
            members: vec![format!("{scope}.{owner}")],
            rollout: 1,
            at: 0,
        };
        ScopeState::healthy(current, None)
    }

    fn host(scopes: &[(&str, Owner, &str)], deployed_commit: Option<&str>) -> HostState {
        HostState {
            schema: SCHEMA_VERSION,
            deployed_commit: deployed_commit.map(str::to_string),
            failed_commit: None,
            scopes: scopes
                .iter()
                .map(|(s, o, r)| (s.to_string(), deployed(s, *o, r)))
                .collect(),
            elsewhere: vec![],
        }
    }

    /// How the table names a step.
    fn describe(next: &Next) -> String {
        match next {
            Next::Prepare => "prepare".to_string(),
            Next::Retire { scope } => format!("retire {scope}"),
            Next::Switch { scope } => format!("switch {scope}"),
            Next::Verify { scope } => format!("verify {scope}"),
            Next::Finish => "finish".to_string(),
            Next::RollBack { scope, to: Some(t) } => {
                format!("roll back {scope} to {} on {}", t.release, t.owner)
            }
            Next::RollBack { scope, to: None } => format!("stop {scope}"),
            Next::Done => "done".to_string(),
        }
    }

    /// Run `core` to the end, answering each step from `answer`; the steps
    /// taken, as the table names them.
    fn drive(core: &mut Core, answer: impl Fn(&Next) -> Result<(), String>) -> Vec<String> {
        let mut taken = Vec::new();
        for _ in 0..100 {
            let next = core.next();
            if next == Next::Done {
                break;
            }
            taken.push(describe(&next));
            core.report(answer(&next), 7);
        }
        taken
    }

    fn releases(h: &HostState) -> Vec<String> {
        h.scopes
            .iter()
            .map(|(n, s)| {
                format!(
                    "{n}={}@{}{}",
                    s.current.release,
                    s.current.owner,
                    if s.healthy { "" } else { " unhealthy" }
                )
            })
            .collect()
    }

    fn plan(commit: &str, steps: Vec<ScopePlan>) -> Plan {
        Plan {
            commit: commit.into(),
            scopes: steps,
        }
    }

    const N: Owner = Owner::Native;
    const D: Owner = Owner::Docker;

    #[test]
    fn decisions_for_a_fetched_head() {
        let mut h = host(&[("api", N, "A")], Some("A"));
        // (situation, head, how the host differs, decision)
        type Tweak = Box<dyn Fn(&mut HostState)>;
        let cases: Vec<(&str, &str, Tweak, Decision)> = vec![
            ("up to date", "A", Box::new(|_| {}), Decision::UpToDate),
            (
                "a new commit",
                "B",
                Box::new(|_| {}),
                Decision::Roll {
                    commit: "B".into(),
                    target: Target::Head,
                },
            ),
            (
                "drift repair at the deployed head",
                "A",
                Box::new(|h| h.scopes.get_mut("api").expect("api").healthy = false),
                Decision::Roll {
                    commit: "A".into(),
                    target: Target::Head,
                },
            ),
            (
                "a quarantined head",
                "B",
                Box::new(|h| h.failed_commit = Some("B".into())),
                Decision::FailedBefore,
            ),
            (
                "a quarantined head with a scope found down: repair",
                "B",
                Box::new(|h| {
                    h.failed_commit = Some("B".into());
                    h.scopes.get_mut("api").expect("api").healthy = false;
                }),
                Decision::Roll {
                    commit: "A".into(),
                    target: Target::Repair,
                },
            ),
            (
                "an interrupted rollout (nothing recorded): rolled out again",
                "B",
                Box::new(|_| {}),
                Decision::Roll {
                    commit: "B".into(),
                    target: Target::Head,
                },
            ),
        ];
        for (situation, head, tweak, want) in cases {
            let mut h2 = h.clone();
            tweak(&mut h2);
            assert_eq!(decide(head, &h2, false), want, "{situation}");
        }
        // A first deploy that failed leaves nothing to repair.
        h = HostState {
            failed_commit: Some("A".into()),
            ..HostState::default()
        };
        assert_eq!(
            decide("A", &h, false),
            Decision::FailedBefore,
            "failed first deploy"
        );
        // A scope resumed since the last rollout: the deployed head again.
        let up = host(&[("api", N, "A")], Some("A"));
        assert_eq!(
            decide("A", &up, true),
            Decision::Roll {
                commit: "A".into(),
                target: Target::Head,
            },
            "resumed"
        );
    }

    #[test]
    fn outcomes_move_the_host_commits() {
        use Outcome::{Failed, RolledBack, Succeeded};
        use Target::{Hand, Head, Repair};
        // (situation, rollout of B, outcome, deployed and failed commits after;
        // "-" for none). Before: A deployed, Q failed (none for a head rollout).
        let cases = [
            ("success", Head, Succeeded, "B", "-"),
            ("rolled back", Head, RolledBack, "A", "B"),
            ("failed", Head, Failed, "A", "B"),
            ("repair passed", Repair, Succeeded, "A", "Q"),
            ("repair failed", Repair, Failed, "A", "Q"),
            ("rollback by hand passed", Hand, Succeeded, "A", "Q"),
            ("rollback by hand rolled back", Hand, RolledBack, "A", "Q"),
        ];
        let commit = |c: &'static str| (c != "-").then_some(c);
        for (situation, target, outcome, deployed, failed) in cases {
            let mut h = HostState {
                deployed_commit: Some("A".into()),
                failed_commit: (target != Head).then(|| "Q".into()),
                ..HostState::default()
            };
            record_outcome(&mut h, "B", target, outcome);
            assert_eq!(
                (h.deployed_commit.as_deref(), h.failed_commit.as_deref()),
                (commit(deployed), commit(failed)),
                "{situation}"
            );
        }
    }

    /// One rollout per block: the situation it covers, the host before
    /// (`scope=release@owner`, `unhealthy` after one that is), the plan
    /// (`scope owner action release`; actions `deploy`, `unchanged`,
    /// `remove`, `cutover-from-OWNER`), the steps that fail, and what must
    /// follow: the steps taken, the outcome and error, the host after. No
    /// `fails` or `error` line: none.
    const ROLLOUTS: &str = r#"
first deploy: every scope switched and verified in order
    host:    -
    plan A:  api native deploy A, web native deploy A
    steps:   prepare, switch api, verify api, switch web, verify web, finish
    outcome: succeeded
    after:   api=A@native, web=A@native

partial deploy: an unchanged scope is not touched
    host:    api=A@native, web=A@native
    plan B:  api native unchanged A, web native deploy B
    steps:   prepare, switch web, verify web, finish
    outcome: succeeded
    after:   api=A@native, web=B@native

nothing changed: no step at all
    host:    api=A@native, web=A@native
    plan B:  api native unchanged A, web native unchanged A
    steps:   -
    outcome: succeeded
    after:   api=A@native, web=A@native

build failure: nothing running is touched
    host:    api=A@native, web=A@native
    plan B:  web native deploy B
    fails:   prepare
    steps:   prepare
    outcome: failed
    error:   prepare failed
    after:   api=A@native, web=A@native

verification fails on the first scope of a wave
    host:    api=A@native, web=A@native
    plan B:  api native deploy B, web native deploy B
    fails:   verify api
    steps:   prepare, switch api, verify api, roll back api to A on native
    outcome: rolled-back
    error:   scope "api" failed verification: verify api failed
    after:   api=A@native, web=A@native

verification fails on a later scope: every switched scope goes back, newest first
    host:    api=A@native, web=A@native
    plan B:  api native deploy B, web native deploy B
    fails:   verify web
    steps:   prepare, switch api, verify api, switch web, verify web, roll back web to A on native, roll back api to A on native
    outcome: rolled-back
    error:   scope "web" failed verification: verify web failed
    after:   api=A@native, web=A@native

a switch that fails half-way is undone too
    host:    api=A@native, web=A@native
    plan B:  web native deploy B
    fails:   switch web
    steps:   prepare, switch web, roll back web to A on native
    outcome: rolled-back
    error:   switching scope "web" failed: switch web failed
    after:   api=A@native, web=A@native

a failed first deploy stops what it started
    host:    -
    plan A:  api native deploy A
    fails:   verify api
    steps:   prepare, switch api, verify api, stop api
    outcome: failed
    error:   scope "api" failed verification: verify api failed; scope "api" has no earlier healthy release and was stopped
    after:   -

cutover native to docker
    host:    api=A@native, web=A@native
    plan B:  api docker cutover-from-native B
    steps:   prepare, switch api, verify api, finish
    outcome: succeeded
    after:   api=B@docker, web=A@native

cutover docker to native
    host:    api=A@docker
    plan B:  api native cutover-from-docker A
    steps:   prepare, switch api, verify api, finish
    outcome: succeeded
    after:   api=A@native

a failed cutover goes back to the old owner
    host:    api=A@native, web=A@native
    plan B:  api docker cutover-from-native B
    fails:   verify api
    steps:   prepare, switch api, verify api, roll back api to A on native
    outcome: rolled-back
    error:   scope "api" failed verification: verify api failed
    after:   api=A@native, web=A@native

a rollback that fails leaves the scope unhealthy and the rollout failed
    host:    api=A@native, web=A@native
    plan B:  web native deploy B
    fails:   verify web, roll back web to A on native
    steps:   prepare, switch web, verify web, roll back web to A on native
    outcome: failed
    error:   scope "web" failed verification: verify web failed; rolling back scope "web" failed: roll back web to A on native failed
    after:   api=A@native, web=A@native unhealthy

drift repair: the unhealthy scope is deployed again on its release
    host:    api=A@native, web=A@native unhealthy
    plan A:  api native unchanged A, web native deploy A
    steps:   prepare, switch web, verify web, finish
    outcome: succeeded
    after:   api=A@native, web=A@native

a removed scope is retired; a failed removal switches nothing back
    host:    api=A@native, web=A@native
    plan B:  web native remove A
    fails:   retire web
    steps:   prepare, retire web
    outcome: failed
    error:   removing scope "web" failed: retire web failed
    after:   api=A@native, web=A@native

a removed scope leaves the host state
    host:    api=A@native, web=A@native
    plan B:  web native remove A
    steps:   prepare, retire web, finish
    outcome: succeeded
    after:   api=A@native

a scope that runs on other hosts is never touched
    host:    api=A@native
    plan B:  api native deploy B, web native skip B
    steps:   prepare, switch api, verify api, finish
    outcome: succeeded
    after:   api=B@native
"#;

    /// The items of a table line; `-` is none.
    fn items(text: &str) -> Vec<&str> {
        match text.trim() {
            "-" => vec![],
            text => text.split(", ").collect(),
        }
    }

    fn owner(text: &str) -> Owner {
        Owner::parse(text).unwrap_or_else(|| panic!("owner {text:?}"))
    }

    /// A host from `scope=release@owner[ unhealthy]` items.
    fn host_of(text: &str) -> HostState {
        let mut host = HostState::default();
        for item in items(text) {
            let (scope, rest) = item.split_once('=').expect("scope=release@owner");
            let (rest, unhealthy) = match rest.strip_suffix(" unhealthy") {
                Some(rest) => (rest, true),
                None => (rest, false),
            };
            let (release, on) = rest.split_once('@').expect("release@owner");
            let mut state = deployed(scope, owner(on), release);
            state.healthy = !unhealthy;
            host.scopes.insert(scope.to_string(), state);
        }
        host
    }

    /// A plan from `scope owner action release` items.
    fn plan_of(commit: &str, text: &str) -> Plan {
        let steps = items(text)
            .into_iter()
            .map(|item| {
                let [scope, on, action, release] = item.split(' ').collect::<Vec<_>>()[..] else {
                    panic!("plan item {item:?}");
                };
                let action = match action {
                    "deploy" => Action::Deploy,
                    "unchanged" => Action::Unchanged,
                    "remove" => Action::Remove,
                    "skip" => Action::Skip,
                    other => Action::Cutover {
                        from: owner(other.strip_prefix("cutover-from-").expect("an action")),
                    },
                };
                step(scope, owner(on), action, release)
            })
            .collect();
        plan(commit, steps)
    }

    #[test]
    fn rollouts_step_by_step() {
        let blocks: Vec<&str> = ROLLOUTS.trim().split("\n\n").collect();
        assert_eq!(blocks.len(), 16, "every situation is read");
        for block in blocks {
            let mut lines = block.lines();
            let situation = lines.next().expect("a situation");
            let fields: Vec<(&str, &str)> = lines
                .map(|line| {
                    let (key, value) = line.trim().split_once(':').expect("key: value");
                    (key, value.trim())
                })
                .collect();
            // A field's key and value; `fails` and `error` may be left out
            // for none.
            let field = |name: &str| -> (String, String) {
                let found = fields.iter().find(|(key, _)| key.starts_with(name));
                match (found, name) {
                    (Some((key, value)), _) => (key.to_string(), value.to_string()),
                    (None, "fails" | "error") => (name.to_string(), "-".to_string()),
                    (None, _) => panic!("{situation}: no {name}"),
                }
            };
            let host = host_of(&field("host").1);
            let (plan_key, plan_text) = field("plan");
            let commit = plan_key.trim_start_matches("plan").trim();
            let fails = field("fails").1;
            let steps = field("steps").1;
            let outcome = field("outcome").1;
            let error = field("error").1;
            let after = field("after").1;

            let mut core = Core::new(plan_of(commit, &plan_text), host, 2);
            let fails = items(&fails);
            let taken = drive(&mut core, |next| {
                let text = describe(next);
                if fails.contains(&text.as_str()) {
                    Err(format!("{text} failed"))
                } else {
                    Ok(())
                }
            });
            assert_eq!(taken, items(&steps), "{situation}");
            let (got, got_error) = core.outcome();
            assert_eq!(got.as_str(), outcome, "{situation}");
            assert_eq!(got_error.as_deref().unwrap_or("-"), error, "{situation}");
            assert_eq!(releases(core.host()), items(&after), "{situation}");
        }
    }

    #[test]
    fn a_verified_scope_keeps_its_way_back_and_records_its_results() {
        let start = host(&[("api", D, "A")], Some("A"));
        let mut core = Core::new(
            plan("B", vec![step("api", N, Action::Cutover { from: D }, "B")]),
            start,
            9,
        );
        drive(&mut core, |_| Ok(()));
        let api = &core.host().scopes["api"];
        assert_eq!(api.current.rollout, 9);
        assert_eq!(api.current.at, 7);
        assert_eq!(api.current.members, ["api.native"]);
        assert_eq!(
            api.way_back,
            BTreeMap::from([(D, "A".to_string()), (N, "B".to_string())]),
            "the docker release stays the way back after the cutover"
        );
        assert_eq!(
            core.take_results(),
            [
                ("api".to_string(), "switched".to_string()),
                ("api".to_string(), "healthy".to_string())
            ]
        );
        assert!(core.take_results().is_empty());
    }
}
