//! The webhook listener: forges (GitHub, Gitea/Forgejo, GitLab, or anything
//! that signs like GitHub) notify the agent of a push so it fetches at once.
//!
//! A request only wakes the agent; what gets deployed is whatever the next
//! fetch finds, so a payload (even a validly signed one) cannot choose what
//! runs. Requests without a valid signature are refused. Neither the secret nor
//! a signature value is ever logged.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::Wake;
use crate::config::WebhookConfig;

/// Largest accepted request body (GitHub caps its payloads at 25 MB, but push
/// payloads for a deploy branch are far smaller).
pub const MAX_BODY: usize = 1024 * 1024;
/// Paths the listener answers on; everything else is 404.
pub const PATHS: [&str; 2] = ["/", "/hook"];
/// A client must send its headers within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// And its body within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long in-flight requests may take to finish after shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest delivery id kept for the wake and the logs.
const MAX_DELIVERY_LEN: usize = 128;

/// Why the listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot read the webhook secret file \"{}\": {source}", path.display())]
    SecretUnreadable { path: PathBuf, source: io::Error },
    #[error("the webhook secret file \"{}\" is empty", path.display())]
    SecretEmpty { path: PathBuf },
    #[error("cannot listen for webhooks on \"{addr}\": {source}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// The shared secret; its `Debug` output hides the value.
struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A bound listener with its secret loaded, not yet serving. Binding first
/// lets the agent report a bad secret file or a taken port before it starts,
/// and lets tests listen on port 0 and learn the address.
#[derive(Debug)]
pub struct WebhookServer {
    listener: TcpListener,
    local_addr: SocketAddr,
    secret: Secret,
}

impl WebhookServer {
    /// Read the secret from `cfg.secret_file` (trailing newline trimmed) and
    /// bind `cfg.listen`.
    pub async fn bind(cfg: &WebhookConfig) -> Result<Self, WebhookError> {
        let secret = read_secret(&cfg.secret_file).await?;
        let bind_err = |source| WebhookError::Bind {
            addr: cfg.listen,
            source,
        };
        let listener = TcpListener::bind(cfg.listen).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        Ok(WebhookServer {
            listener,
            local_addr,
            secret,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serve POST requests on `/` and `/hook` until `shutdown` resolves, then
    /// let in-flight requests finish (for at most a few seconds).
    pub async fn run(
        self,
        branch: &str,
        tx: mpsc::Sender<Wake>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), WebhookError> {
        let handler = Arc::new(Handler {
            secret: self.secret,
            branch_ref: format!("refs/heads/{branch}"),
            tx,
        });
        info!(listen = %self.local_addr, branch, "listening for webhooks");
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        connections.spawn(serve_connection(stream, peer, Arc::clone(&handler), stop_rx.clone()));
                    }
                    Err(err) => {
                        // Usually out of file descriptors: transient, so pause instead of spinning.
                        warn!(error = %err, "cannot accept a webhook connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        // Receivers are in the connection tasks; none left is fine.
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while connections.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                left = connections.len(),
                "webhook connections still open at shutdown; dropping them"
            );
        }
        info!(listen = %self.local_addr, "webhook listener stopped");
        Ok(())
    }
}

/// Read the secret, bind `cfg.listen` and serve until `shutdown` resolves. See
/// [`WebhookServer`] to learn the bound address first.
pub async fn serve(
    cfg: &WebhookConfig,
    branch: &str,
    tx: mpsc::Sender<Wake>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WebhookError> {
    WebhookServer::bind(cfg)
        .await?
        .run(branch, tx, shutdown)
        .await
}

async fn read_secret(path: &Path) -> Result<Secret, WebhookError> {
    let mut bytes =
        tokio::fs::read(path)
            .await
            .map_err(|source| WebhookError::SecretUnreadable {
                path: path.to_path_buf(),
                source,
            })?;
    while matches!(bytes.last(), Some(b'\n' | b'\r')) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(WebhookError::SecretEmpty {
            path: path.to_path_buf(),
        });
    }
    Ok(Secret(bytes))
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    handler: Arc<Handler>,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |req| {
        let handler = Arc::clone(&handler);
        async move { Ok::<_, Infallible>(handler.handle(req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        // The only change ever sent is the stop; a dropped sender means stop too.
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        debug!(%peer, error = %err, "webhook connection ended with an error");
    }
}

/// Who sent a request and how it proves it knows the secret.
struct Credential<'a> {
    provider: &'static str,
    proof: Proof<'a>,
}

enum Proof<'a> {
    /// Hex HMAC-SHA256 of the body (any `sha256=` prefix already removed).
    Hmac(&'a str),
    /// The secret itself (GitLab).
    Token(&'a [u8]),
}

/// What a request turned out to be.
struct Outcome {
    status: StatusCode,
    provider: &'static str,
    reason: String,
}

impl Outcome {
    fn new(status: StatusCode, provider: &'static str, reason: impl Into<String>) -> Self {
        Outcome {
            status,
            provider,
            reason: reason.into(),
        }
    }
}

struct Handler {
    secret: Secret,
    branch_ref: String,
    tx: mpsc::Sender<Wake>,
}

impl Handler {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let outcome = self.decide(req).await;
        let status = outcome.status.as_u16();
        let provider = outcome.provider;
        let reason = outcome.reason.as_str();
        if outcome.status.is_client_error() || outcome.status.is_server_error() {
            warn!(provider, status, reason, "refused a webhook request");
        } else {
            info!(provider, status, reason, "webhook request");
        }
        let mut response = Response::new(Full::new(Bytes::from(format!("{reason}\n"))));
        *response.status_mut() = outcome.status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if outcome.status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        }
        response
    }

    async fn decide(&self, req: Request<Incoming>) -> Outcome {
        let (parts, body) = req.into_parts();
        let headers = &parts.headers;
        let provider_hint = guess_provider(headers);
        if !PATHS.contains(&parts.uri.path()) {
            return Outcome::new(
                StatusCode::NOT_FOUND,
                provider_hint,
                "not found; webhooks go to / or /hook",
            );
        }
        if parts.method != Method::POST {
            return Outcome::new(
                StatusCode::METHOD_NOT_ALLOWED,
                provider_hint,
                format!("method \"{}\" not allowed; use POST", parts.method),
            );
        }
        if content_length(headers).is_some_and(|len| len > MAX_BODY as u64) {
            return Outcome::new(StatusCode::PAYLOAD_TOO_LARGE, provider_hint, too_large());
        }
        let Some(credential) = credential(headers) else {
            return Outcome::new(StatusCode::UNAUTHORIZED, provider_hint, "missing signature");
        };
        let provider = credential.provider;
        let body = match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_BODY).collect())
            .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(err)) if err.downcast_ref::<LengthLimitError>().is_some() => {
                return Outcome::new(StatusCode::PAYLOAD_TOO_LARGE, provider, too_large());
            }
            Ok(Err(err)) => {
                return Outcome::new(
                    StatusCode::BAD_REQUEST,
                    provider,
                    format!("cannot read the body: {err}"),
                );
            }
            Err(_) => {
                return Outcome::new(
                    StatusCode::REQUEST_TIMEOUT,
                    provider,
                    "the body took too long",
                );
            }
        };
        if !self.verify(&credential.proof, &body) {
            return Outcome::new(StatusCode::UNAUTHORIZED, provider, "bad signature");
        }
        self.after_verification(provider, headers, &body)
    }

    fn verify(&self, proof: &Proof<'_>, body: &[u8]) -> bool {
        match proof {
            Proof::Hmac(hex_tag) => {
                let Ok(tag) = hex::decode(hex_tag) else {
                    return false;
                };
                let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret.0)
                    .expect("HMAC accepts keys of any length");
                mac.update(body);
                mac.verify_slice(&tag).is_ok()
            }
            Proof::Token(token) => bool::from(self.secret.0.as_slice().ct_eq(token)),
        }
    }

    /// The request is authentic: decide between wake, ignore and bad payload.
    fn after_verification(
        &self,
        provider: &'static str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Outcome {
        if let Some(event) = event_name(provider, headers)
            && !is_push_event(provider, event)
        {
            return Outcome::new(
                StatusCode::OK,
                provider,
                format!("ignored: \"{event}\" is not a push event"),
            );
        }
        let payload: serde_json::Value = match serde_json::from_slice(body) {
            Ok(value) => value,
            Err(err) => {
                return Outcome::new(
                    StatusCode::BAD_REQUEST,
                    provider,
                    format!("malformed JSON ({err}); send the payload as application/json"),
                );
            }
        };
        let Some(pushed) = payload.get("ref").and_then(serde_json::Value::as_str) else {
            return Outcome::new(
                StatusCode::BAD_REQUEST,
                provider,
                "the push payload has no \"ref\" field",
            );
        };
        if pushed != self.branch_ref {
            return Outcome::new(
                StatusCode::OK,
                provider,
                format!(
                    "ignored: push to \"{pushed}\", following \"{}\"",
                    self.branch_ref
                ),
            );
        }
        let delivery = delivery_id(headers);
        let wake = Wake::Webhook {
            provider,
            delivery: delivery.clone(),
        };
        match self.tx.try_send(wake) {
            // A full channel means a wake is already pending: the push is covered.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {
                info!(
                    provider,
                    delivery = delivery.as_deref().unwrap_or("-"),
                    "webhook push; waking the agent"
                );
                Outcome::new(
                    StatusCode::ACCEPTED,
                    provider,
                    format!("accepted: push to \"{pushed}\""),
                )
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Outcome::new(
                StatusCode::SERVICE_UNAVAILABLE,
                provider,
                "the agent is shutting down",
            ),
        }
    }
}

fn too_large() -> String {
    format!("body larger than {MAX_BODY} bytes")
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

/// The signature or token header, in order of precedence. Forgejo also sends
/// `X-Gitea-Signature`, so it is looked for first.
fn credential(headers: &HeaderMap) -> Option<Credential<'_>> {
    let hmac = |name: &str, prefix: Option<&str>, provider: &'static str| {
        let value = header_str(headers, name)?;
        let hex = match prefix {
            Some(prefix) => value.strip_prefix(prefix).unwrap_or(""),
            None => value,
        };
        Some(Credential {
            provider,
            proof: Proof::Hmac(hex.trim()),
        })
    };
    hmac("x-hub-signature-256", Some("sha256="), "github")
        .or_else(|| hmac("x-forgejo-signature", None, "forgejo"))
        .or_else(|| hmac("x-gitea-signature", None, "gitea"))
        .or_else(|| hmac("x-moorline-signature", Some("sha256="), "moorline"))
        .or_else(|| {
            let token = headers.get("x-gitlab-token")?;
            Some(Credential {
                provider: "gitlab",
                proof: Proof::Token(token.as_bytes()),
            })
        })
}

/// Who seems to have sent an unsigned or unusable request, for the logs only.
fn guess_provider(headers: &HeaderMap) -> &'static str {
    if let Some(credential) = credential(headers) {
        return credential.provider;
    }
    [
        ("x-github-event", "github"),
        ("x-forgejo-event", "forgejo"),
        ("x-gitea-event", "gitea"),
        ("x-gitlab-event", "gitlab"),
        ("x-moorline-event", "moorline"),
    ]
    .into_iter()
    .find(|(name, _)| headers.contains_key(*name))
    .map_or("unknown", |(_, provider)| provider)
}

fn event_name<'a>(provider: &str, headers: &'a HeaderMap) -> Option<&'a str> {
    let name = match provider {
        "github" => "x-github-event",
        "forgejo" => "x-forgejo-event",
        "gitea" => "x-gitea-event",
        "gitlab" => "x-gitlab-event",
        _ => "x-moorline-event",
    };
    header_str(headers, name).or_else(|| match provider {
        "forgejo" => header_str(headers, "x-gitea-event"),
        _ => None,
    })
}

fn is_push_event(provider: &str, event: &str) -> bool {
    match provider {
        "gitlab" => event == "Push Hook",
        _ => event == "push",
    }
}

/// The provider's id for this delivery, when it is short and printable.
fn delivery_id(headers: &HeaderMap) -> Option<String> {
    [
        "x-github-delivery",
        "x-forgejo-delivery",
        "x-gitea-delivery",
        "x-gitlab-event-uuid",
        "x-moorline-delivery",
    ]
    .into_iter()
    .find_map(|name| header_str(headers, name))
    .filter(|id| {
        !id.is_empty() && id.len() <= MAX_DELIVERY_LEN && id.chars().all(|c| c.is_ascii_graphic())
    })
    .map(str::to_owned)
}
