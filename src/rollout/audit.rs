//! The ownership audit, run when the agent starts and after every rollout:
//! a scope's members must run on its owning runtime only. Members found on
//! the other runtime are stopped and the event is recorded in history; a
//! native unit that no longer points at its recorded release, or an owned
//! member that is not running, marks the scope for redeployment.

use tracing::warn;

use std::collections::BTreeMap;

use super::{Engine, Journal, docker as dk};
use crate::cli::short;
use crate::manifest::Scope;
use crate::store::{Outcome, RolloutRecord, SCHEMA_VERSION, ScopeRecord, now_ms};

/// What the audit found for one scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub scope: String,
    /// The runtime that owns the scope.
    pub owner: String,
    pub text: String,
    /// A foreign member was stopped (recorded in history) rather than the
    /// scope merely marked for redeployment.
    pub stopped: bool,
}

fn is_up(active_state: &str) -> bool {
    matches!(
        active_state,
        "active" | "activating" | "reloading" | "deactivating"
    )
}

/// A member running on the runtime that does not own its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Foreign {
    scope: String,
    /// The runtime that owns the scope.
    owner: String,
    /// The unit or container found running.
    member: String,
}

impl Foreign {
    fn text(&self) -> String {
        let (what, other) = if self.owner == "docker" {
            ("", "docker")
        } else {
            ("container ", "native")
        };
        format!(
            "{what}{} was running although {other} owns scope \"{}\"; stopped it",
            self.member, self.scope
        )
    }
}

impl Engine {
    /// Check every deployed scope on both runtimes; `drift` also checks that
    /// owned members run the recorded release (at start-up). Foreign members
    /// are stopped inside an audit record that is on file before the first
    /// stop, each stop journaled.
    pub async fn audit(&mut self, drift: bool) -> Result<Vec<Finding>, String> {
        let mut host = self.store.host().map_err(|e| e.to_string())?;
        let mut findings = Vec::new();
        let mut foreign = Vec::new();
        let mut scopes = BTreeMap::new();
        for (name, state) in host.scopes.iter_mut() {
            let scope = match self.scope_from_release(&state.current.release, name) {
                Ok(scope) => scope,
                Err(e) => {
                    warn!(scope = %name, error = %e, "cannot audit scope");
                    continue;
                }
            };
            let found = if state.current.owner == "docker" {
                self.foreign_units(&scope).await
            } else {
                self.foreign_containers(&scope).await
            };
            let found = found.unwrap_or_else(|e| {
                warn!(scope = %name, error = %e, "cannot check the runtime that does not own the scope");
                vec![]
            });
            foreign.extend(found.into_iter().map(|member| Foreign {
                scope: name.clone(),
                owner: state.current.owner.clone(),
                member,
            }));
            let redeploy = if drift {
                self.drift(&scope, &state.current.owner, &state.current.release)
                    .await
                    .unwrap_or_else(|e| {
                        warn!(scope = %name, error = %e, "cannot check the scope's members");
                        vec![]
                    })
            } else {
                vec![]
            };
            if !redeploy.is_empty() {
                state.healthy = false;
            }
            for text in redeploy {
                findings.push(Finding {
                    scope: name.clone(),
                    owner: state.current.owner.clone(),
                    text,
                    stopped: false,
                });
            }
            scopes.insert(name.clone(), scope);
        }
        let stopped = self
            .stop_foreign(host.deployed_commit.clone(), &foreign, &scopes)
            .await?;
        findings.extend(stopped);
        let at = crate::api::time_text(now_ms());
        for (name, state) in host.scopes.iter_mut() {
            let texts: Vec<&str> = findings
                .iter()
                .filter(|f| &f.scope == name)
                .map(|f| f.text.as_str())
                .collect();
            if !texts.is_empty() {
                state.problem = Some(format!("{} (audit at {at})", texts.join("; ")));
            }
        }
        self.store.put_host(&host).map_err(|e| e.to_string())?;
        Ok(findings)
    }

    /// Stop every foreign member inside one audit record (trigger `audit`).
    async fn stop_foreign(
        &mut self,
        commit: Option<String>,
        foreign: &[Foreign],
        scopes: &BTreeMap<String, Scope>,
    ) -> Result<Vec<Finding>, String> {
        if foreign.is_empty() {
            return Ok(vec![]);
        }
        let commit = commit.unwrap_or_default();
        let now = now_ms();
        let record = RolloutRecord {
            schema: SCHEMA_VERSION,
            id: self.store.next_rollout_id().map_err(|e| e.to_string())?,
            previous_commit: Some(commit.clone()),
            commit,
            trigger: "audit".into(),
            started_at: now,
            finished_at: None,
            outcome: Outcome::InProgress,
            subject: None,
            author: None,
            scopes: foreign
                .iter()
                .map(|f| ScopeRecord {
                    scope: f.scope.clone(),
                    owner: f.owner.clone(),
                    action: "audit".into(),
                    reason: f.text(),
                    release: None,
                    built: false,
                    members: vec![f.member.clone()],
                    result: None,
                })
                .collect(),
            phases: vec![],
            error: None,
            build_tail: vec![],
            journal: vec![],
        };
        // On file before the first stop: a kill leaves it to be closed as interrupted.
        self.store.put_rollout(&record).map_err(|e| e.to_string())?;
        let store = self.store.clone();
        let mut journal = Journal::new(&store, self.stop.clone(), record);
        let mut findings = Vec::new();
        let mut errors = Vec::new();
        for (i, f) in foreign.iter().enumerate() {
            crate::fault::point("during-audit");
            let limit = scopes
                .get(&f.scope)
                .map(|s| s.job_timeout)
                .unwrap_or(crate::runtime::systemd::DEFAULT_JOB_TIMEOUT);
            let stopped = if f.owner == "docker" {
                self.stop_members(
                    "native",
                    std::slice::from_ref(&f.member),
                    false,
                    limit,
                    &mut journal,
                )
                .await
            } else {
                self.stop_members(
                    "docker",
                    std::slice::from_ref(&f.member),
                    false,
                    limit,
                    &mut journal,
                )
                .await
            };
            let result = match &stopped {
                Ok(()) => "stopped".to_string(),
                Err(e) => format!("failed: {e}"),
            };
            journal.record.scopes[i].result = Some(result);
            match stopped {
                Ok(()) => findings.push(Finding {
                    scope: f.scope.clone(),
                    owner: f.owner.clone(),
                    text: f.text(),
                    stopped: true,
                }),
                Err(e) => errors.push(e),
            }
        }
        journal.record.finished_at = Some(now_ms());
        if errors.is_empty() {
            journal.record.outcome = Outcome::Succeeded;
        } else {
            journal.record.outcome = Outcome::Failed;
            journal.record.error = Some(errors.join("; "));
        }
        journal.save();
        Ok(findings)
    }

    /// Units of a docker-owned scope that are up.
    async fn foreign_units(&mut self, scope: &Scope) -> Result<Vec<String>, String> {
        let Some(native) = &scope.native else {
            return Ok(vec![]);
        };
        let sd = self.systemd().await?;
        let mut found = Vec::new();
        for unit in &native.units {
            let state = sd.unit_state(unit).await.map_err(|e| e.to_string())?;
            if is_up(&state.active_state) {
                found.push(unit.clone());
            }
        }
        Ok(found)
    }

    /// Containers (and kept `.moorline-prev` ones) of a native-owned scope
    /// that are running.
    async fn foreign_containers(&mut self, scope: &Scope) -> Result<Vec<String>, String> {
        let Some(docker) = &scope.docker else {
            return Ok(vec![]);
        };
        if docker.containers.is_empty() {
            return Ok(vec![]);
        }
        let client = self.docker()?;
        let mut found = Vec::new();
        for container in &docker.containers {
            for name in [container.name.clone(), dk::prev_name(&container.name)] {
                let Some(state) = client.inspect(&name).await.map_err(|e| e.to_string())? else {
                    continue;
                };
                if state.running {
                    found.push(name);
                }
            }
        }
        Ok(found)
    }
    /// Owned members that are down or run another release than recorded.
    async fn drift(
        &mut self,
        scope: &Scope,
        owner: &str,
        release: &str,
    ) -> Result<Vec<String>, String> {
        let mut found = Vec::new();
        if owner == "native" {
            let Some(native) = &scope.native else {
                return Ok(found);
            };
            let sd = self.systemd().await?;
            for unit in &native.units {
                let state = sd.unit_state(unit).await.map_err(|e| e.to_string())?;
                if !is_up(&state.active_state) {
                    found.push(format!(
                        "{unit} is {} ({})",
                        state.active_state, state.sub_state
                    ));
                    continue;
                }
                if let Ok(Some((_, commit))) = sd.read_dropin(unit).await
                    && commit != release
                {
                    found.push(format!(
                        "{unit} runs release {} but {} was recorded",
                        short(&commit),
                        short(release)
                    ));
                }
            }
        } else {
            let client = self.docker()?;
            for container in dk::containers(scope) {
                match client
                    .inspect(&container.name)
                    .await
                    .map_err(|e| e.to_string())?
                {
                    None => found.push(format!("container {} is missing", container.name)),
                    Some(state) if !state.running => {
                        found.push(format!("container {} is {}", container.name, state.status))
                    }
                    Some(state) => {
                        let commit = state.labels.get(crate::runtime::docker::LABEL_COMMIT);
                        if commit.is_some_and(|c| c != release) {
                            found.push(format!(
                                "container {} runs release {} but {} was recorded",
                                container.name,
                                short(commit.map(String::as_str).unwrap_or("")),
                                short(release)
                            ));
                        }
                    }
                }
            }
        }
        Ok(found)
    }
}
