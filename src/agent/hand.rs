//! Levers for operating a host by hand, answered on the control channel:
//! `hold`, `resume`, `rollback`, `restart` and `approve`. Each is stored
//! (in the hand state, its own record, so a rollout in progress cannot
//! overwrite it) and recorded in history with its reason and the user,
//! `name (uid N)` from the control connection's credentials. A rollback or
//! a restart is a rollout the agent's loop carries out next (after the one
//! in progress, if any): the request here only checks and stores it.

use crate::api::Response;
use crate::channel::Peer;
use crate::plan::ALL_SCOPES;
use crate::rollout::Engine;
use crate::source::Wake;
use crate::source::short;
use crate::store::{HandRequest, Hold, Outcome, RolloutRecord, ScopeRecord, now_ms};

use super::Agent;

impl Agent {
    /// Hold `scope`: rollouts leave it exactly as it runs.
    pub(super) fn hold(&self, scope: &str, reason: &str, peer: Peer) -> Response {
        let user = &peer.describe();
        let owner = match self.deployed_scope(scope) {
            Ok(owner) => owner,
            Err(message) => return Response::Error(message),
        };
        if reason.trim().is_empty() {
            return Response::Error("a hold needs a reason: --reason TEXT".into());
        }
        let hold = Hold {
            reason: reason.to_string(),
            user: user.to_string(),
            uid: peer.uid,
            since: now_ms(),
            pin: None,
        };
        let text = hold.describe();
        let stored = self.store.update_hand(|hand| {
            hand.holds.insert(scope.to_string(), hold.clone());
            hand.resumed.remove(scope);
        });
        if let Err(e) = stored {
            return Response::Error(e.to_string());
        }
        self.record_hand("hold", scope, owner, reason, user);
        Response::Done(format!("scope \"{scope}\" {text}"))
    }

    /// Resume `scope`: it follows the branch again, at once.
    pub(super) fn resume(&self, scope: &str, peer: Peer) -> Response {
        let user = &peer.describe();
        let held = self.store.hand().map(|h| h.holds.contains_key(scope));
        match held {
            Ok(true) => {}
            Ok(false) => return Response::Error(format!("scope \"{scope}\" is not held")),
            Err(e) => return Response::Error(e.to_string()),
        }
        let owner = self
            .store
            .host()
            .ok()
            .and_then(|h| h.scopes.get(scope).map(|s| s.current.owner));
        let stored = self.store.update_hand(|hand| {
            hand.holds.remove(scope);
            hand.resumed.insert(scope.to_string());
        });
        if let Err(e) = stored {
            return Response::Error(e.to_string());
        }
        if let Some(owner) = owner {
            self.record_hand("resume", scope, owner, "resumed", user);
        }
        let _ = self.wake.try_send(Wake::Hand("resume"));
        Response::Done(format!(
            "scope \"{scope}\" follows the branch again; converging now"
        ))
    }

    /// Roll `scope` back to its previous healthy release (or the one it
    /// ran after rollout `to`), without git and without a build, and hold
    /// it there until `resume`.
    pub(super) async fn rollback(
        &self,
        scope: &str,
        to: Option<u64>,
        reason: &str,
        peer: Peer,
    ) -> Response {
        if reason.trim().is_empty() {
            return Response::Error("a rollback needs a reason: --reason TEXT".into());
        }
        if let Err(message) = self.deployed_scope(scope) {
            return Response::Error(message);
        }
        let (release, rollout) = match self.way_back(scope, to) {
            Ok(found) => found,
            Err(message) => return Response::Error(message),
        };
        let dir = self.config.state.dir.join("releases").join(&release);
        if !dir.is_dir() {
            return Response::Error(format!(
                "release {} of scope \"{scope}\" (rollout {rollout}) was pruned; pick a newer one with --to ROLLOUT (moorline history --scope {scope})",
                short(&release)
            ));
        }
        let engine = Engine::new(self.config.clone(), self.store.clone());
        let (name, at) = (scope.to_string(), release.clone());
        let pin =
            match tokio::task::spawn_blocking(move || engine.deployed_from_release(&at, &name))
                .await
            {
                Ok(Ok(pin)) => pin,
                Ok(Err(e)) => {
                    return Response::Error(format!(
                        "cannot roll back to release {}: {e}",
                        short(&release)
                    ));
                }
                Err(e) => return Response::Error(e.to_string()),
            };
        let owner = pin.owner;
        let hold = Hold {
            reason: reason.to_string(),
            user: peer.describe(),
            uid: peer.uid,
            since: now_ms(),
            pin: Some(pin),
        };
        let stored = self.store.update_hand(|hand| {
            hand.holds.insert(scope.to_string(), hold.clone());
            hand.resumed.remove(scope);
        });
        if let Err(e) = stored {
            return Response::Error(e.to_string());
        }
        let _ = self.wake.try_send(Wake::Hand("rollback"));
        Response::Done(format!(
            "rolling back scope \"{scope}\" to release {} ({owner}, from rollout {rollout}); it stays held there until `moorline resume {scope}`",
            short(&release)
        ))
    }

    /// The release `scope` goes back to and the rollout that deployed it:
    /// that of rollout `to`, else the newest healthy one it does not run.
    fn way_back(&self, scope: &str, to: Option<u64>) -> Result<(String, u64), String> {
        let host = self.store.host().map_err(|e| e.to_string())?;
        let current = &host
            .scopes
            .get(scope)
            .ok_or_else(|| format!("scope \"{scope}\" is not deployed on this host"))?
            .current;
        let entry = |record: &RolloutRecord| {
            record
                .scopes
                .iter()
                .find(|s| s.scope == scope)
                .and_then(|s| Some((s.release.clone()?, s.owner, s.action.clone())))
        };
        let ran = |action: &str| matches!(action, "deploy" | "cutover" | "unchanged");
        match to {
            Some(id) => {
                let record = self
                    .store
                    .rollout(id)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("rollout {id} is not in the history"))?;
                if record.outcome != Outcome::Succeeded {
                    return Err(format!(
                        "rollout {id} did not succeed ({}); only a healthy release is a way back",
                        record.outcome.as_str()
                    ));
                }
                let (release, owner, _) = entry(&record)
                    .filter(|(_, _, action)| ran(action))
                    .ok_or_else(|| format!("rollout {id} did not deploy scope \"{scope}\""))?;
                if release == current.release && owner == current.owner {
                    return Err(format!(
                        "scope \"{scope}\" already runs release {} (rollout {id}); to keep it there, use `moorline hold {scope}`",
                        short(&release)
                    ));
                }
                Ok((release, id))
            }
            None => {
                let records = self
                    .store
                    .rollouts(Some(scope), 10_000)
                    .map_err(|e| e.to_string())?;
                records
                    .iter()
                    .filter(|r| r.outcome == Outcome::Succeeded)
                    .find_map(|r| {
                        let (release, owner, action) = entry(r)?;
                        let other = release != current.release || owner != current.owner;
                        (ran(&action) && other).then_some((release, r.id))
                    })
                    .ok_or_else(|| {
                        format!(
                            "scope \"{scope}\" has no previous healthy release to roll back to (it runs release {})",
                            short(&current.release)
                        )
                    })
            }
        }
    }

    /// Restart `scope`'s members on the release they run, verified (and
    /// rolled back) like any rollout.
    pub(super) fn restart(&self, scope: &str, reason: &str, peer: Peer) -> Response {
        if reason.trim().is_empty() {
            return Response::Error("a restart needs a reason: --reason TEXT".into());
        }
        if let Err(message) = self.deployed_scope(scope) {
            return Response::Error(message);
        }
        let request = HandRequest {
            reason: reason.to_string(),
            user: peer.describe(),
            uid: peer.uid,
            since: now_ms(),
        };
        let stored = self.store.update_hand(|hand| {
            hand.restarts.insert(scope.to_string(), request.clone());
        });
        if let Err(e) = stored {
            return Response::Error(e.to_string());
        }
        let _ = self.wake.try_send(Wake::Hand("restart"));
        let release = self
            .store
            .host()
            .ok()
            .and_then(|h| h.scopes.get(scope).map(|s| s.current.release.clone()))
            .unwrap_or_default();
        Response::Done(format!(
            "restarting scope \"{scope}\" on release {}",
            short(&release)
        ))
    }

    /// Let the commit that waits for approval go on: all its gated scopes,
    /// or only `scope`.
    pub(super) fn approve(&self, commit: &str, scope: Option<&str>, peer: Peer) -> Response {
        let user = &peer.describe();
        let hand = match self.store.hand() {
            Ok(hand) => hand,
            Err(e) => return Response::Error(e.to_string()),
        };
        let Some(awaiting) = hand.awaiting else {
            return Response::Error(format!(
                "commit {commit} is not awaiting approval: no commit is"
            ));
        };
        let matches =
            commit.len() >= 4 && awaiting.commit.starts_with(&commit.to_ascii_lowercase());
        if !matches {
            return Response::Error(format!(
                "commit {commit} is not awaiting approval; {} is",
                short(&awaiting.commit)
            ));
        }
        let gated: Vec<&str> = awaiting.scopes.keys().map(String::as_str).collect();
        if let Some(scope) = scope
            && !awaiting.scopes.contains_key(scope)
        {
            return Response::Error(format!(
                "scope \"{scope}\" of commit {} does not wait for approval; these do: {}",
                short(&awaiting.commit),
                gated.join(", ")
            ));
        }
        let approved = scope.unwrap_or(ALL_SCOPES).to_string();
        let stored = self.store.update_hand(|hand| {
            hand.approvals
                .entry(awaiting.commit.clone())
                .or_default()
                .insert(approved.clone());
        });
        let still: Vec<&str> = match &stored {
            Ok(hand) => {
                let done = &hand.approvals[&awaiting.commit];
                gated
                    .iter()
                    .copied()
                    .filter(|s| !done.contains(*s) && !done.contains(ALL_SCOPES))
                    .collect()
            }
            Err(e) => return Response::Error(e.to_string()),
        };
        let scopes = awaiting
            .scopes
            .iter()
            .filter(|(name, _)| scope.is_none_or(|s| s == name.as_str()))
            .map(|(name, gated)| ScopeRecord {
                scope: name.clone(),
                owner: gated.owner,
                action: "approve".to_string(),
                reason: gated.what.clone(),
                release: None,
                built: false,
                members: vec![],
                result: None,
            })
            .collect();
        let mut record = RolloutRecord::event(
            "approve",
            awaiting.commit.clone(),
            Outcome::Succeeded,
            scopes,
        );
        record.user = Some(user.to_string());
        if let Err(e) = self.store.create_rollout(&mut record) {
            tracing::warn!(error = %e, "cannot record an approval");
        }
        if still.is_empty() {
            let _ = self.wake.try_send(Wake::Hand("approve"));
            Response::Done(format!(
                "approved commit {}; deploying it now",
                short(&awaiting.commit)
            ))
        } else {
            Response::Done(format!(
                "approved scope \"{}\" of commit {}; still awaiting approval: {}",
                approved,
                short(&awaiting.commit),
                still.join(", ")
            ))
        }
    }

    /// The owner of a deployed scope, or why it cannot be held.
    fn deployed_scope(&self, scope: &str) -> Result<crate::runtime::Owner, String> {
        let host = self.store.host().map_err(|e| e.to_string())?;
        match host.scopes.get(scope) {
            Some(state) => Ok(state.current.owner),
            None => {
                let known: Vec<&str> = host.scopes.keys().map(String::as_str).collect();
                Err(format!(
                    "unknown scope \"{scope}\"; the deployed scopes are: {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            }
        }
    }

    /// A history entry for a hand command (trigger `hold`, `resume`).
    fn record_hand(
        &self,
        action: &str,
        scope: &str,
        owner: crate::runtime::Owner,
        reason: &str,
        user: &str,
    ) {
        let host = self.store.host().unwrap_or_default();
        let commit = host.deployed_commit.clone().unwrap_or_default();
        let scopes = vec![ScopeRecord {
            scope: scope.to_string(),
            owner,
            action: action.to_string(),
            reason: reason.to_string(),
            release: host.scopes.get(scope).map(|s| s.current.release.clone()),
            built: false,
            members: vec![],
            result: None,
        }];
        let mut record = RolloutRecord::event(action, commit, Outcome::Succeeded, scopes);
        record.user = Some(user.to_string());
        if let Err(e) = self.store.create_rollout(&mut record) {
            tracing::warn!(error = %e, scope, action, "cannot record a hand command");
        }
    }
}
