//! `[[notify]]`: announce rollouts (and audit findings) to HTTP targets —
//! `generic` JSON signed with HMAC-SHA256, a Slack incoming webhook, an
//! ntfy topic. Each target has its own queue and task: a message is retried
//! with back-off up to `ATTEMPTS` times, a slow or failing target delays
//! neither a rollout nor the other targets, and a full queue drops the
//! message (counted) rather than wait. What each target last did is kept
//! for `status` and counted in `/metrics`; a target's URL, which may hold
//! a secret, is never shown or logged — only its name.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{NotifyConfig, NotifyFormat};
use crate::http::metrics::Metrics;
use crate::source::short;
use crate::store::{RolloutRecord, now_ms};

/// Tries per message, and the pause before the second (doubled each time).
const ATTEMPTS: u32 = 5;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages waiting per target before new ones are dropped.
const QUEUE: usize = 64;

/// One message, as the `generic` format sends it.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    /// `succeeded`, `failed`, `rolled-back`, `interrupted`, `cutover`,
    /// `refused` or `audit`.
    pub event: String,
    pub host: String,
    pub rollout: Option<u64>,
    pub commit: Option<String>,
    /// The commit the host ran before: the range deployed is
    /// `previous_commit..commit`.
    pub previous_commit: Option<String>,
    pub trigger: Option<String>,
    pub outcome: Option<String>,
    /// Why it failed, or what the audit found.
    pub reason: Option<String>,
    pub scopes: Vec<ScopeLine>,
    /// Unix milliseconds.
    pub at: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScopeLine {
    pub scope: String,
    pub owner: String,
    pub action: String,
    pub reason: String,
    pub result: Option<String>,
}

impl Message {
    /// The messages a finished rollout calls for: its outcome, and
    /// `cutover` when it moved a scope to another owner and succeeded.
    pub fn of_rollout(record: &RolloutRecord, host: &str) -> Vec<Message> {
        let scopes: Vec<ScopeLine> = record
            .scopes
            .iter()
            .filter(|s| !matches!(s.action.as_str(), "unchanged" | "skip"))
            .map(|s| ScopeLine {
                scope: s.scope.clone(),
                owner: s.owner.to_string(),
                action: s.action.clone(),
                reason: s.reason.clone(),
                result: s.result.clone(),
            })
            .collect();
        let message = |event: &str| Message {
            event: event.to_string(),
            host: host.to_string(),
            rollout: Some(record.id),
            commit: Some(record.commit.clone()),
            previous_commit: record.previous_commit.clone(),
            trigger: Some(record.trigger.clone()),
            outcome: Some(record.outcome.as_str().to_string()),
            reason: record.error.clone(),
            scopes: scopes.clone(),
            at: record.finished_at.unwrap_or_else(now_ms),
        };
        let mut messages = vec![message(record.outcome.as_str())];
        let cut = scopes.iter().any(|s| s.action == "cutover");
        if cut && record.outcome.as_str() == "succeeded" {
            messages.push(message("cutover"));
        }
        messages
    }

    /// An audit finding about `scope`.
    pub fn of_audit(scope: &str, text: &str, host: &str) -> Message {
        Message {
            event: "audit".into(),
            host: host.to_string(),
            rollout: None,
            commit: None,
            previous_commit: None,
            trigger: None,
            outcome: None,
            reason: Some(format!("{scope}: {text}")),
            scopes: vec![],
            at: now_ms(),
        }
    }

    /// One line for people: `vps-1: rollout 12 of abc1234 rolled-back (api deploy): why`.
    pub fn summary(&self) -> String {
        let mut text = format!("{}: ", self.host);
        match (self.rollout, &self.commit) {
            (Some(id), Some(commit)) => {
                let range = match &self.previous_commit {
                    Some(p) if p != commit => format!("{}..{}", short(p), short(commit)),
                    _ => short(commit).to_string(),
                };
                text.push_str(&format!("rollout {id} of {range} {}", self.event));
            }
            _ => text.push_str(&self.event),
        }
        if !self.scopes.is_empty() {
            let scopes: Vec<String> = self
                .scopes
                .iter()
                .map(|s| format!("{} {}", s.scope, s.action))
                .collect();
            text.push_str(&format!(" ({})", scopes.join(", ")));
        }
        if let Some(reason) = &self.reason {
            text.push_str(&format!(": {reason}"));
        }
        text
    }
}

/// What a target did last, for `status`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct TargetState {
    pub name: String,
    pub delivered: u64,
    pub failed: u64,
    /// The last failure (after its retries), while no delivery followed.
    pub failing: Option<String>,
}

struct Target {
    config: NotifyConfig,
    queue: mpsc::Sender<Message>,
}

/// The targets and their states.
pub struct Notifier {
    targets: Vec<Target>,
    states: Arc<Mutex<Vec<TargetState>>>,
    metrics: Metrics,
}

impl Notifier {
    /// Start one delivery task per target.
    pub fn start(configs: &[NotifyConfig], metrics: Metrics) -> Notifier {
        let states = Arc::new(Mutex::new(
            configs
                .iter()
                .map(|c| TargetState {
                    name: c.name.clone(),
                    ..TargetState::default()
                })
                .collect::<Vec<_>>(),
        ));
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let targets = configs
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let (queue, rx) = mpsc::channel(QUEUE);
                let task = Delivery {
                    config: config.clone(),
                    client: client.clone(),
                    states: Arc::clone(&states),
                    index: i,
                    metrics: metrics.clone(),
                };
                tokio::spawn(task.run(rx));
                Target {
                    config: config.clone(),
                    queue,
                }
            })
            .collect();
        Notifier {
            targets,
            states,
            metrics,
        }
    }

    /// Queue `message` for every target that wants its event; never waits.
    pub fn send(&self, message: &Message) {
        for (i, target) in self.targets.iter().enumerate() {
            if !target.config.events.contains(&message.event) {
                continue;
            }
            if target.queue.try_send(message.clone()).is_err() {
                warn!(target = %target.config.name, event = %message.event, "notification queue full; message dropped");
                self.metrics.notified(&target.config.name, false);
                if let Ok(mut states) = self.states.lock() {
                    states[i].failed += 1;
                    states[i].failing = Some("queue full: messages dropped".into());
                }
            }
        }
    }

    pub fn states(&self) -> Vec<TargetState> {
        self.states.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// One target's delivery loop.
struct Delivery {
    config: NotifyConfig,
    client: reqwest::Client,
    states: Arc<Mutex<Vec<TargetState>>>,
    index: usize,
    metrics: Metrics,
}

impl Delivery {
    async fn run(self, mut rx: mpsc::Receiver<Message>) {
        while let Some(message) = rx.recv().await {
            let result = self.deliver(&message).await;
            let name = &self.config.name;
            self.metrics.notified(name, result.is_ok());
            if let Ok(mut states) = self.states.lock() {
                let state = &mut states[self.index];
                match &result {
                    Ok(()) => {
                        state.delivered += 1;
                        state.failing = None;
                    }
                    Err(e) => {
                        state.failed += 1;
                        state.failing = Some(e.clone());
                    }
                }
            }
            match result {
                Ok(()) => info!(target = %name, event = %message.event, "notification delivered"),
                Err(e) => {
                    warn!(target = %name, event = %message.event, error = %e, "notification given up")
                }
            }
        }
    }

    /// Send with retries; the last error after `ATTEMPTS` tries.
    async fn deliver(&self, message: &Message) -> Result<(), String> {
        let secret = match &self.config.secret_file {
            Some(path) => Some(read_secret(path).await?),
            None => None,
        };
        let mut pause = FIRST_RETRY;
        let mut last = String::new();
        for attempt in 1..=ATTEMPTS {
            match self.attempt(message, secret.as_deref()).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = format!("{e} (after {attempt} tries)");
                    if attempt < ATTEMPTS {
                        tokio::time::sleep(pause).await;
                        pause *= 2;
                    }
                }
            }
        }
        Err(last)
    }

    async fn attempt(&self, message: &Message, secret: Option<&[u8]>) -> Result<(), String> {
        let request = self.client.post(&self.config.url);
        let request = match self.config.format {
            NotifyFormat::Generic => {
                let body = serde_json::to_vec(message).map_err(|e| e.to_string())?;
                let mut request = request
                    .header("content-type", "application/json")
                    .header("x-moorline-event", &message.event);
                if let Some(secret) = secret {
                    request = request.header("x-moorline-signature", signature(secret, &body));
                }
                request.body(body)
            }
            NotifyFormat::Slack => {
                let body = serde_json::json!({ "text": message.summary() }).to_string();
                request
                    .header("content-type", "application/json")
                    .body(body)
            }
            NotifyFormat::Ntfy => {
                let bad = matches!(message.event.as_str(), "failed" | "rolled-back" | "refused");
                request
                    .header(
                        "title",
                        format!("moorline {} on {}", message.event, message.host),
                    )
                    .header("priority", if bad { "high" } else { "default" })
                    .header("tags", if bad { "warning" } else { "white_check_mark" })
                    .body(message.summary())
            }
        };
        // The error text of reqwest names the URL, which may hold a secret.
        let response = request.send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "cannot connect"
            } else {
                "request failed"
            };
            kind.to_string()
        })?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", status.as_u16()))
        }
    }
}

/// `sha256=HEX`: the HMAC-SHA256 of `body` with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn read_secret(path: &Path) -> Result<Vec<u8>, String> {
    use crate::privacy::{SecretFileError, read_secret_file};
    read_secret_file(path).await.map_err(|e| match e {
        SecretFileError::Unreadable(e) => {
            format!("cannot read secret_file \"{}\": {e}", path.display())
        }
        SecretFileError::Empty => format!("secret_file \"{}\" is empty", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
