//! Levers for operating a host by hand, answered on the control channel:
//! `hold` and `resume`. Each is stored (holds live in their own record, so a
//! rollout in progress cannot overwrite them) and recorded in history with
//! its reason and the user, `name (uid N)` from the control connection's
//! credentials.

use crate::api::Response;
use crate::channel::Peer;
use crate::source::Wake;
use crate::store::{Hold, Outcome, RolloutRecord, ScopeRecord, now_ms};

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
        let _ = self.wake.try_send(Wake::Sync);
        Response::Done(format!(
            "scope \"{scope}\" follows the branch again; converging now"
        ))
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
