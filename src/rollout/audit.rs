//! The ownership audit, run when the agent starts and after every rollout:
//! a scope's members must run on its owning runtime only. Members found on
//! the other runtime are stopped and the event is recorded in history; a
//! native unit that no longer points at its recorded release, or an owned
//! member that is not running, marks the scope for redeployment.

use tracing::warn;

use super::{Engine, docker as dk, native::short};
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

impl Engine {
    /// Check every deployed scope on both runtimes; `drift` also checks that
    /// owned members run the recorded release (at start-up).
    pub async fn audit(&mut self, drift: bool) -> Result<Vec<Finding>, String> {
        let mut host = self.store.host().map_err(|e| e.to_string())?;
        let mut findings = Vec::new();
        for (name, state) in host.scopes.iter_mut() {
            let scope = match self.scope_from_release(&state.current.release, name) {
                Ok(scope) => scope,
                Err(e) => {
                    warn!(scope = %name, error = %e, "cannot audit scope");
                    continue;
                }
            };
            let foreign = if state.current.owner == "docker" {
                self.stop_foreign_units(&scope).await
            } else {
                self.stop_foreign_containers(&scope).await
            };
            let found = foreign.unwrap_or_else(|e| {
                warn!(scope = %name, error = %e, "cannot check the runtime that does not own the scope");
                vec![]
            });
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
            for text in &found {
                findings.push(Finding {
                    scope: name.clone(),
                    owner: state.current.owner.clone(),
                    text: text.clone(),
                    stopped: true,
                });
            }
            for text in &redeploy {
                findings.push(Finding {
                    scope: name.clone(),
                    owner: state.current.owner.clone(),
                    text: text.clone(),
                    stopped: false,
                });
            }
            if !redeploy.is_empty() {
                state.healthy = false;
            }
            if !found.is_empty() || !redeploy.is_empty() {
                let mut all = found;
                all.extend(redeploy.iter().cloned());
                state.problem = Some(format!(
                    "{} (audit at {})",
                    all.join("; "),
                    crate::api::time_text(now_ms())
                ));
            }
        }
        self.store.put_host(&host).map_err(|e| e.to_string())?;
        let stopped: Vec<&Finding> = findings.iter().filter(|f| f.stopped).collect();
        if !stopped.is_empty() {
            self.record_audit(host.deployed_commit.clone().unwrap_or_default(), &stopped)?;
        }
        Ok(findings)
    }

    async fn stop_foreign_units(&mut self, scope: &Scope) -> Result<Vec<String>, String> {
        let Some(native) = &scope.native else {
            return Ok(vec![]);
        };
        let sd = self.systemd().await?;
        let mut found = Vec::new();
        for unit in &native.units {
            let state = sd.unit_state(unit).await.map_err(|e| e.to_string())?;
            if is_up(&state.active_state) {
                sd.stop(unit).await.map_err(|e| e.to_string())?;
                found.push(format!(
                    "{unit} was running although docker owns scope \"{}\"; stopped it",
                    scope.name
                ));
            }
        }
        Ok(found)
    }

    async fn stop_foreign_containers(&mut self, scope: &Scope) -> Result<Vec<String>, String> {
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
                    client
                        .stop(&name, dk::STOP_TIMEOUT)
                        .await
                        .map_err(|e| e.to_string())?;
                    found.push(format!(
                        "container {name} was running although native owns scope \"{}\"; stopped it",
                        scope.name
                    ));
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

    fn record_audit(&self, commit: String, stopped: &[&Finding]) -> Result<(), String> {
        let now = now_ms();
        let record = RolloutRecord {
            schema: SCHEMA_VERSION,
            id: self.store.next_rollout_id().map_err(|e| e.to_string())?,
            previous_commit: Some(commit.clone()),
            commit,
            trigger: "audit".into(),
            started_at: now,
            finished_at: Some(now),
            outcome: Outcome::Succeeded,
            scopes: stopped
                .iter()
                .map(|f| ScopeRecord {
                    scope: f.scope.clone(),
                    owner: f.owner.clone(),
                    action: "audit".into(),
                    reason: f.text.clone(),
                    release: None,
                    built: false,
                    members: vec![],
                    result: Some("stopped".into()),
                })
                .collect(),
            phases: vec![],
            error: None,
            build_tail: vec![],
            journal: vec![],
        };
        self.store.put_rollout(&record).map_err(|e| e.to_string())
    }
}
