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

async fn read_secret(path: &Path) -> Result<Secret, WebhookError> {
    use crate::privacy::{SecretFileError, read_secret_file};
    let path_buf = path.to_path_buf();
    match read_secret_file(path).await {
        Ok(bytes) => Ok(Secret(bytes)),
        Err(SecretFileError::Unreadable(source)) => Err(WebhookError::SecretUnreadable {
            path: path_buf,
            source,
        }),
        Err(SecretFileError::Empty) => Err(WebhookError::SecretEmpty { path: path_buf }),
    }
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

/// The webhook as the agent runs it: bound when configured and served
/// until the trigger is dropped; a secret or bind error is logged and shown
/// in `status`, and the agent goes on polling.
pub struct WebhookTrigger {
    text: String,
    /// Dropping it stops the listener.
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl WebhookTrigger {
    pub async fn start(
        config: Option<&WebhookConfig>,
        branch: &str,
        poll: std::time::Duration,
        wake: mpsc::Sender<Wake>,
    ) -> WebhookTrigger {
        let Some(cfg) = config else {
            return WebhookTrigger {
                text: "off".into(),
                _stop: None,
            };
        };
        match WebhookServer::bind(cfg).await {
            Ok(server) => {
                let text = format!("listening on {}", server.local_addr());
                let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
                let branch = branch.to_string();
                let shutdown = async move {
                    // Sent or dropped: either way the agent is stopping.
                    let _ = stop_rx.await;
                };
                tokio::spawn(async move {
                    if let Err(e) = server.run(&branch, wake, shutdown).await {
                        warn!(error = %e, "the webhook listener failed");
                    }
                });
                WebhookTrigger {
                    text,
                    _stop: Some(stop_tx),
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot start the webhook listener; polling only");
                WebhookTrigger {
                    text: format!("failed: {e}; polling every {}", super::duration_text(poll)),
                    _stop: None,
                }
            }
        }
    }
}

impl super::Trigger for WebhookTrigger {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn state(&self) -> String {
        self.text.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc::error::TryRecvError;
    use tokio::sync::oneshot;

    const SECRET: &str = "s3cr3t-for-moorline-tests";

    /// A listener on 127.0.0.1:<port 0> with its secret in a temporary file.
    struct Server {
        addr: SocketAddr,
        rx: mpsc::Receiver<Wake>,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<Result<(), WebhookError>>,
        client: reqwest::Client,
        _dir: tempfile::TempDir,
    }

    impl Server {
        async fn start(capacity: usize) -> Self {
            let dir = tempfile::tempdir().expect("a temporary directory can be made");
            let secret_file = dir.path().join("webhook.secret");
            std::fs::write(&secret_file, format!("{SECRET}\n"))
                .expect("the secret file can be written");
            let cfg = WebhookConfig {
                listen: "127.0.0.1:0".parse().expect("a valid address"),
                secret_file,
            };
            let server = WebhookServer::bind(&cfg).await.expect("the listener binds");
            let addr = server.local_addr();
            let (tx, rx) = mpsc::channel(capacity);
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(server.run("main", tx, async move {
                let _ = stopped.await;
            }));
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("the HTTP client builds");
            Server {
                addr,
                rx,
                stop,
                task,
                client,
                _dir: dir,
            }
        }

        fn post(&self, path: &str, body: impl Into<Vec<u8>>) -> reqwest::RequestBuilder {
            self.client
                .post(format!("http://{}{path}", self.addr))
                .header("content-type", "application/json")
                .body(body.into())
        }

        /// No wake is waiting: every response is sent after its wake, if any.
        fn assert_no_wake(&mut self) {
            assert_eq!(self.rx.try_recv(), Err(TryRecvError::Empty));
        }
    }

    /// Status and body text of a response.
    async fn answer(request: reqwest::RequestBuilder) -> (u16, String) {
        let response = request.send().await.expect("the request gets an answer");
        let status = response.status().as_u16();
        (
            status,
            response.text().await.expect("the answer has a text body"),
        )
    }

    fn sign(body: &str) -> String {
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(SECRET.as_bytes()).expect("any key length");
        mac.update(body.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    const PUSH_MAIN: &str =
        r#"{"ref":"refs/heads/main","after":"0123456789abcdef0123456789abcdef01234567"}"#;

    fn webhook(provider: &'static str, delivery: &str) -> Option<Wake> {
        Some(Wake::Webhook {
            provider,
            delivery: Some(delivery.to_owned()),
        })
    }

    #[tokio::test]
    async fn each_provider_with_a_valid_signature_wakes() {
        let mut server = Server::start(8).await;
        let accepted = (202, "accepted: push to \"refs/heads/main\"\n".to_owned());

        let github = server
            .post("/", PUSH_MAIN)
            .header("X-GitHub-Event", "push")
            .header("X-GitHub-Delivery", "gh-1")
            .header("X-Hub-Signature-256", format!("sha256={}", sign(PUSH_MAIN)));
        assert_eq!(answer(github).await, accepted);
        assert_eq!(server.rx.try_recv().ok(), webhook("github", "gh-1"));

        let gitea = server
            .post("/hook", PUSH_MAIN)
            .header("X-Gitea-Event", "push")
            .header("X-Gitea-Delivery", "gt-1")
            .header("X-Gitea-Signature", sign(PUSH_MAIN));
        assert_eq!(answer(gitea).await, accepted);
        assert_eq!(server.rx.try_recv().ok(), webhook("gitea", "gt-1"));

        // Forgejo sends its own headers and Gitea's.
        let forgejo = server
            .post("/hook", PUSH_MAIN)
            .header("X-Forgejo-Event", "push")
            .header("X-Gitea-Event", "push")
            .header("X-Forgejo-Delivery", "fj-1")
            .header("X-Forgejo-Signature", sign(PUSH_MAIN))
            .header("X-Gitea-Signature", sign(PUSH_MAIN));
        assert_eq!(answer(forgejo).await, accepted);
        assert_eq!(server.rx.try_recv().ok(), webhook("forgejo", "fj-1"));

        let gitlab = server
            .post("/", PUSH_MAIN)
            .header("X-Gitlab-Event", "Push Hook")
            .header("X-Gitlab-Event-UUID", "gl-1")
            .header("X-Gitlab-Token", SECRET);
        assert_eq!(answer(gitlab).await, accepted);
        assert_eq!(server.rx.try_recv().ok(), webhook("gitlab", "gl-1"));

        let generic = server.post("/hook", PUSH_MAIN).header(
            "X-Moorline-Signature",
            format!("sha256={}", sign(PUSH_MAIN)),
        );
        assert_eq!(answer(generic).await, accepted);
        assert_eq!(
            server.rx.try_recv().ok(),
            Some(Wake::Webhook {
                provider: "moorline",
                delivery: None
            })
        );
        server.assert_no_wake();
    }

    #[tokio::test]
    async fn a_full_channel_means_a_wake_is_pending() {
        let mut server = Server::start(1).await;
        for delivery in ["first", "second"] {
            let request = server
                .post("/", PUSH_MAIN)
                .header("X-GitHub-Event", "push")
                .header("X-GitHub-Delivery", delivery)
                .header("X-Hub-Signature-256", format!("sha256={}", sign(PUSH_MAIN)));
            assert_eq!(answer(request).await.0, 202);
        }
        assert_eq!(server.rx.try_recv().ok(), webhook("github", "first"));
        server.assert_no_wake();
    }

    #[tokio::test]
    async fn bad_or_missing_signatures_are_refused() {
        let mut server = Server::start(8).await;
        let refused = |reason: &str| (401, format!("{reason}\n"));

        let wrong = server
            .post("/", PUSH_MAIN)
            .header("X-GitHub-Event", "push")
            .header(
                "X-Hub-Signature-256",
                format!("sha256={}", sign("another body")),
            );
        assert_eq!(answer(wrong).await, refused("bad signature"));

        let not_hex = server
            .post("/", PUSH_MAIN)
            .header("X-Gitea-Signature", "zz-not-hex");
        assert_eq!(answer(not_hex).await, refused("bad signature"));

        let truncated = server.post("/", PUSH_MAIN).header(
            "X-Moorline-Signature",
            format!("sha256={}", &sign(PUSH_MAIN)[..32]),
        );
        assert_eq!(answer(truncated).await, refused("bad signature"));

        let sha1_only = server
            .post("/", PUSH_MAIN)
            .header("X-Hub-Signature-256", format!("sha1={}", sign(PUSH_MAIN)));
        assert_eq!(answer(sha1_only).await, refused("bad signature"));

        let wrong_token = server
            .post("/", PUSH_MAIN)
            .header("X-Gitlab-Event", "Push Hook")
            .header("X-Gitlab-Token", "s3cr3t-for-moorline-test");
        assert_eq!(answer(wrong_token).await, refused("bad signature"));

        let missing = server.post("/", PUSH_MAIN).header("X-GitHub-Event", "push");
        assert_eq!(answer(missing).await, refused("missing signature"));
        server.assert_no_wake();
    }

    #[tokio::test]
    async fn bodies_over_one_mebibyte_are_refused() {
        let mut server = Server::start(8).await;
        // Valid JSON with a valid signature: only the size is wrong.
        let big = format!(
            r#"{{"ref":"refs/heads/main","pad":"{}"}}"#,
            "x".repeat(MAX_BODY)
        );
        let declared = server
            .post("/", big.clone())
            .header("X-GitHub-Event", "push")
            .header("X-Hub-Signature-256", format!("sha256={}", sign(&big)));
        assert_eq!(
            answer(declared).await,
            (413, "body larger than 1048576 bytes\n".to_owned())
        );

        // Without a Content-Length the limit is enforced while reading.
        let mut stream = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("the listener accepts");
        let head = format!(
            "POST /hook HTTP/1.1\r\nHost: {}\r\nTransfer-Encoding: chunked\r\n\
             X-Moorline-Signature: sha256={}\r\nConnection: close\r\n\r\n",
            server.addr,
            sign(&big)
        );
        stream
            .write_all(head.as_bytes())
            .await
            .expect("the head is sent");
        for chunk in big.as_bytes().chunks(64 * 1024) {
            stream
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await
                .expect("a chunk size is sent");
            stream.write_all(chunk).await.expect("a chunk is sent");
            stream
                .write_all(b"\r\n")
                .await
                .expect("a chunk end is sent");
        }
        // The server may answer and close before reading this.
        let _ = stream.write_all(b"0\r\n\r\n").await;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .await
            .expect("the answer can be read");
        assert!(
            response.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
            "unexpected answer: {response}"
        );
        assert!(
            response.ends_with("\r\n\r\nbody larger than 1048576 bytes\n"),
            "unexpected answer: {response}"
        );
        server.assert_no_wake();
    }

    #[tokio::test]
    async fn bad_payloads_are_refused() {
        let mut server = Server::start(8).await;
        let body = "{not json";
        let malformed = server
            .post("/", body)
            .header("X-GitHub-Event", "push")
            .header("X-Hub-Signature-256", format!("sha256={}", sign(body)));
        assert_eq!(
            answer(malformed).await,
            (
                400,
                "malformed JSON (key must be a string at line 1 column 2); send the payload as application/json\n"
                    .to_owned()
            )
        );

        let body = r#"{"after":"0123"}"#;
        let no_ref = server
            .post("/", body)
            .header("X-Gitea-Event", "push")
            .header("X-Gitea-Signature", sign(body));
        assert_eq!(
            answer(no_ref).await,
            (400, "the push payload has no \"ref\" field\n".to_owned())
        );
        server.assert_no_wake();
    }

    #[tokio::test]
    async fn other_branches_and_other_events_are_ignored() {
        let mut server = Server::start(8).await;
        let body = r#"{"ref":"refs/heads/mainline"}"#;
        let other_branch = server
            .post("/", body)
            .header("X-GitHub-Event", "push")
            .header("X-Hub-Signature-256", format!("sha256={}", sign(body)));
        assert_eq!(
            answer(other_branch).await,
            (
                200,
                "ignored: push to \"refs/heads/mainline\", following \"refs/heads/main\"\n"
                    .to_owned()
            )
        );

        let body = r#"{"ref":"refs/tags/main"}"#;
        let tag = server
            .post("/", body)
            .header("X-Gitlab-Event", "Tag Push Hook")
            .header("X-Gitlab-Token", SECRET);
        assert_eq!(
            answer(tag).await,
            (
                200,
                "ignored: \"Tag Push Hook\" is not a push event\n".to_owned()
            )
        );

        let body = r#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
        let ping = server
            .post("/", body)
            .header("X-GitHub-Event", "ping")
            .header("X-Hub-Signature-256", format!("sha256={}", sign(body)));
        assert_eq!(
            answer(ping).await,
            (200, "ignored: \"ping\" is not a push event\n".to_owned())
        );
        server.assert_no_wake();
    }

    #[tokio::test]
    async fn only_post_on_the_hook_paths_is_served() {
        let mut server = Server::start(8).await;
        let get = server.client.get(format!("http://{}/hook", server.addr));
        let response = get.send().await.expect("the request gets an answer");
        assert_eq!(response.status().as_u16(), 405);
        assert_eq!(
            response.headers().get("allow").map(|v| v.as_bytes()),
            Some(&b"POST"[..])
        );
        assert_eq!(
            response.text().await.expect("a text body"),
            "method \"GET\" not allowed; use POST\n"
        );

        let elsewhere = server
            .post("/hooks", PUSH_MAIN)
            .header("X-Hub-Signature-256", format!("sha256={}", sign(PUSH_MAIN)));
        assert_eq!(
            answer(elsewhere).await,
            (404, "not found; webhooks go to / or /hook\n".to_owned())
        );
        server.assert_no_wake();
    }

    #[tokio::test]
    async fn shutdown_stops_the_listener() {
        let Server {
            addr,
            stop,
            task,
            _dir,
            ..
        } = Server::start(8).await;
        stop.send(()).expect("the listener is running");
        task.await
            .expect("the listener task does not panic")
            .expect("the listener stops cleanly");
        let err = tokio::net::TcpStream::connect(addr)
            .await
            .expect_err("nothing listens after shutdown");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    }

    /// Collects everything logged while the test runs.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn refusals_are_logged_without_the_secret_or_signatures() {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .finish();
        // The test runtime is single-threaded: the listener's tasks log here too.
        let _guard = tracing::subscriber::set_default(subscriber);

        let mut server = Server::start(8).await;
        let wrong_signature = sign("forged");
        let requests = [
            server
                .post("/", PUSH_MAIN)
                .header("X-Hub-Signature-256", format!("sha256={wrong_signature}")),
            server
                .post("/", PUSH_MAIN)
                .header("X-Gitlab-Token", format!("{SECRET}x")),
            server
                .post("/", PUSH_MAIN)
                .header("X-Gitlab-Event", "Push Hook")
                .header("X-Gitlab-Token", SECRET),
            server
                .post("/", PUSH_MAIN)
                .header("X-GitHub-Event", "push")
                .header("X-Hub-Signature-256", format!("sha256={}", sign(PUSH_MAIN))),
        ];
        let mut statuses = Vec::new();
        for request in requests {
            statuses.push(answer(request).await.0);
        }
        assert_eq!(statuses, [401, 401, 202, 202]);
        assert_eq!(
            server.rx.try_recv().ok(),
            Some(Wake::Webhook {
                provider: "gitlab",
                delivery: None
            })
        );

        let text = String::from_utf8(
            logs.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone(),
        )
        .expect("logs are UTF-8");
        assert!(
            text.contains(
                r#"refused a webhook request provider="github" status=401 reason="bad signature""#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"refused a webhook request provider="gitlab" status=401 reason="bad signature""#
            ),
            "{text}"
        );
        assert!(!text.contains(SECRET), "the secret was logged: {text}");
        assert!(
            !text.contains(&wrong_signature),
            "a signature was logged: {text}"
        );
        assert!(
            !text.contains(&sign(PUSH_MAIN)),
            "a signature was logged: {text}"
        );
    }

    #[test]
    fn the_github_documented_example_verifies() {
        // From GitHub's "Validating webhook deliveries".
        let (tx, _rx) = mpsc::channel(1);
        let handler = Handler {
            secret: Secret(b"It's a Secret to Everybody".to_vec()),
            branch_ref: "refs/heads/main".to_owned(),
            tx,
        };
        let tag = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(handler.verify(&Proof::Hmac(tag), b"Hello, World!"));
        assert!(!handler.verify(&Proof::Hmac(tag), b"Hello, World?"));
        assert!(!handler.verify(&Proof::Hmac(""), b"Hello, World!"));
        assert!(handler.verify(&Proof::Token(b"It's a Secret to Everybody"), b""));
        assert!(!handler.verify(&Proof::Token(b"It's a Secret to Everybod"), b""));
    }

    #[tokio::test]
    async fn setup_errors_name_the_file_and_address() {
        let dir = tempfile::tempdir().expect("a temporary directory can be made");
        let missing = dir.path().join("missing.secret");
        let cfg = |secret_file: &Path, listen: &str| WebhookConfig {
            listen: listen.parse().expect("a valid address"),
            secret_file: secret_file.to_path_buf(),
        };
        let err = WebhookServer::bind(&cfg(&missing, "127.0.0.1:0"))
            .await
            .expect_err("no secret file");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot read the webhook secret file \"{}\": No such file or directory (os error 2)",
                missing.display()
            )
        );

        let empty = dir.path().join("empty.secret");
        std::fs::write(&empty, "\n").expect("the secret file can be written");
        let err = WebhookServer::bind(&cfg(&empty, "127.0.0.1:0"))
            .await
            .expect_err("an empty secret");
        assert_eq!(
            err.to_string(),
            format!("the webhook secret file \"{}\" is empty", empty.display())
        );

        let good = dir.path().join("good.secret");
        std::fs::write(&good, "secret\r\n").expect("the secret file can be written");
        let first = WebhookServer::bind(&cfg(&good, "127.0.0.1:0"))
            .await
            .expect("the listener binds");
        let taken = first.local_addr().to_string();
        let err = WebhookServer::bind(&cfg(&good, &taken))
            .await
            .expect_err("the port is taken");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot listen for webhooks on \"{taken}\": Address already in use (os error 98)"
            )
        );
        assert_eq!(first.secret.0, b"secret");
    }
}
