//! The ownership audit, run when the agent starts and after every rollout:
//! a scope's members must run on its owning runtime only. Members found on
//! the other runtime are stopped and the event is recorded in history; a
//! native unit that no longer points at its recorded release, or an owned
//! member that is not running, marks the scope for redeployment.

use tracing::warn;

use std::collections::BTreeMap;

use super::{Engine, Error, Journal};
use crate::manifest::Scope;
use crate::runtime::{Act, Keep, Owner};
use crate::store::{Outcome, RolloutRecord, ScopeRecord, now_ms};

/// What the audit found for one scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub scope: String,
    /// The runtime that owns the scope.
    pub owner: Owner,
    pub text: String,
    /// A foreign member was stopped (recorded in history) rather than the
    /// scope merely marked for redeployment.
    pub stopped: bool,
}

/// A member running on a runtime that does not own its scope.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Foreign {
    scope: String,
    /// The runtime that owns the scope.
    owner: Owner,
    /// The runtime the member was found running on.
    found_on: Owner,
    /// The unit or container found running.
    member: String,
    /// An instance of a slotted scope's slot that the edge does not serve,
    /// left running by a rollout cut short during its drain.
    idle: bool,
}

impl Foreign {
    fn text(&self) -> String {
        if self.idle {
            return format!(
                "{} was running in the slot the edge does not serve; drained and stopped it",
                self.member
            );
        }
        let what = match self.found_on {
            Owner::Docker => "container ",
            Owner::Native => "",
        };
        format!(
            "{what}{} was running although {} owns scope \"{}\"; stopped it",
            self.member, self.owner, self.scope
        )
    }
}

impl Engine {
    /// Check every deployed scope on both runtimes; `drift` also checks that
    /// owned members run the recorded release (at start-up). Foreign members
    /// are stopped inside an audit record that is on file before the first
    /// stop, each stop journaled.
    pub async fn audit(&mut self, drift: bool) -> Result<Vec<Finding>, Error> {
        let mut host = self.store.host()?;
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
            let owner = state.current.owner;
            for other in owner.others() {
                if scope.members_on(other).is_empty() {
                    continue;
                }
                let found = match self.runtime(other).await {
                    Ok(runtime) => runtime.running(&scope).await.map_err(Error::from),
                    Err(e) => Err(e),
                };
                let found = found.unwrap_or_else(|e| {
                    warn!(scope = %name, error = %e, "cannot check the runtime that does not own the scope");
                    vec![]
                });
                foreign.extend(found.into_iter().map(|member| Foreign {
                    scope: name.clone(),
                    owner,
                    found_on: other,
                    member,
                    idle: false,
                }));
            }
            if drift && scope.slotted() {
                let idle = match self.runtime(owner).await {
                    Ok(runtime) => runtime.idle(&scope).await.map_err(Error::from),
                    Err(e) => Err(e),
                };
                let idle = idle.unwrap_or_else(|e| {
                    warn!(scope = %name, error = %e, "cannot check the slot the edge does not serve");
                    vec![]
                });
                foreign.extend(idle.into_iter().map(|member| Foreign {
                    scope: name.clone(),
                    owner,
                    found_on: owner,
                    member,
                    idle: true,
                }));
            }
            let redeploy = if drift {
                let found = match self.runtime(owner).await {
                    Ok(runtime) => runtime
                        .drift(&scope, &state.current.release)
                        .await
                        .map_err(Error::from),
                    Err(e) => Err(e),
                };
                found.unwrap_or_else(|e| {
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
                    owner,
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
        self.store.put_host(&host)?;
        Ok(findings)
    }

    /// Stop every foreign member inside one audit record (trigger `audit`).
    async fn stop_foreign(
        &mut self,
        commit: Option<String>,
        foreign: &[Foreign],
        scopes: &BTreeMap<String, Scope>,
    ) -> Result<Vec<Finding>, Error> {
        if foreign.is_empty() {
            return Ok(vec![]);
        }
        let commit = commit.unwrap_or_default();
        let records = foreign
            .iter()
            .map(|f| ScopeRecord {
                scope: f.scope.clone(),
                owner: f.owner,
                action: "audit".into(),
                reason: f.text(),
                release: None,
                built: false,
                members: vec![f.member.clone()],
                result: None,
            })
            .collect();
        let mut record = RolloutRecord::event("audit", commit, Outcome::InProgress, records);
        // On file before the first stop: a kill leaves it to be closed as interrupted.
        self.store.create_rollout(&mut record)?;
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
            let stopped = match (self.runtime(f.found_on).await, scopes.get(&f.scope)) {
                (Ok(runtime), Some(scope)) if f.idle => runtime
                    .finish(scope, &mut journal)
                    .await
                    .map_err(Error::from),
                (Ok(runtime), _) => runtime
                    .act(
                        Act::Stop(Keep::WayBack),
                        std::slice::from_ref(&f.member),
                        limit,
                        &mut journal,
                    )
                    .await
                    .map_err(Error::from),
                (Err(e), _) => Err(e),
            };
            let result = match &stopped {
                Ok(()) => "stopped".to_string(),
                Err(e) => format!("failed: {e}"),
            };
            journal.record.scopes[i].result = Some(result);
            match stopped {
                Ok(()) => findings.push(Finding {
                    scope: f.scope.clone(),
                    owner: f.owner,
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
            let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
            journal.record.error = Some(errors.join("; "));
        }
        journal.save();
        Ok(findings)
    }
}
