//! `[http]`: the agent's read-only HTTP side. `/metrics` (Prometheus /
//! OpenMetrics text), `/` (the dashboard, its assets compiled into the
//! binary) and the JSON the dashboard reads (`/api/status`, `/api/history`,
//! `/api/rollouts/N`, the same views as `--json`). Nothing here changes
//! anything: only the read-only requests of the control channel are
//! reachable. On loopback by default; any other address needs a token,
//! which every request must carry (`Authorization: Bearer TOKEN`).

/// The dashboard page and its assets.
mod dashboard;
/// `/metrics`.
pub mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::api;
use crate::config::HttpConfig;

const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} ([http] listen): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the [http] token file \"{}\": {source}", path.display())]
    TokenUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the [http] token file \"{}\" is empty", path.display())]
    TokenEmpty { path: PathBuf },
}

/// What the HTTP side reads from the agent.
pub trait Backend: Send + Sync + 'static {
    /// The `/metrics` text.
    fn metrics(&self) -> impl Future<Output = String> + Send;
    /// The answer to a read-only control request (status, history, show).
    fn answer(&self, request: api::Request) -> impl Future<Output = api::Response> + Send;
}

/// A token, kept out of `Debug` output and logs.
struct Token(Vec<u8>);

/// The bound listener and its token, not serving yet: a taken port or a
/// bad token file is reported before the agent goes on.
pub struct HttpServer {
    listener: TcpListener,
    token: Option<Token>,
}

impl HttpServer {
    pub async fn bind(config: &HttpConfig) -> Result<HttpServer, HttpError> {
        let token = match &config.token_file {
            Some(path) => Some(read_token(path).await?),
            None => None,
        };
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| HttpError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(HttpServer { listener, token })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serve until the task is dropped.
    pub async fn run<B: Backend>(self, backend: Arc<B>) {
        if let Some(addr) = self.local_addr() {
            info!(listen = %addr, "serving /metrics and the dashboard");
        }
        let shared = Arc::new((self.token, backend));
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Usually out of file descriptors: pause, do not spin.
                    warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let shared = Arc::clone(&shared);
                    async move {
                        let (token, backend) = &*shared;
                        Ok::<_, Infallible>(handle(req, token.as_ref(), &**backend).await)
                    }
                });
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                let served = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                if let Err(e) = served {
                    debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
            });
        }
    }
}

async fn read_token(path: &Path) -> Result<Token, HttpError> {
    use crate::privacy::{SecretFileError, read_secret_file};
    let empty = || HttpError::TokenEmpty {
        path: path.to_path_buf(),
    };
    let text = read_secret_file(path).await.map_err(|e| match e {
        SecretFileError::Unreadable(source) => HttpError::TokenUnreadable {
            path: path.to_path_buf(),
            source,
        },
        SecretFileError::Empty => empty(),
    })?;
    // The token is the file's first line.
    let first = text.split(|b| *b == b'\n').next().unwrap_or_default();
    let token = first.strip_suffix(b"\r").unwrap_or(first).trim_ascii();
    if token.is_empty() {
        return Err(empty());
    }
    Ok(Token(token.to_vec()))
}

type Answer = Response<Full<Bytes>>;

fn answer(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Answer {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    if let Ok(value) = content_type.parse() {
        headers.insert(hyper::header::CONTENT_TYPE, value);
    }
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        "x-content-type-options",
        hyper::header::HeaderValue::from_static("nosniff"),
    );
    response
}

fn text(status: StatusCode, body: &str) -> Answer {
    answer(status, "text/plain; charset=utf-8", body.to_string())
}

fn json<T: serde::Serialize>(value: &T) -> Answer {
    match serde_json::to_vec(value) {
        Ok(body) => answer(StatusCode::OK, "application/json", body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}

/// Whether `req` carries the token (always, without one).
fn authorized(req: &Request<Incoming>, token: Option<&Token>) -> bool {
    let Some(Token(expected)) = token else {
        return true;
    };
    // A browser cannot send a header when it opens the page: it may give
    // the token as `?token=` instead, which the page passes on.
    let in_query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("token="))
            .map(str::as_bytes)
    });
    let given = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .or(in_query)
        .unwrap_or_default();
    use subtle::ConstantTimeEq;
    given.len() == expected.len() && bool::from(given.ct_eq(expected))
}

async fn handle<B: Backend>(req: Request<Incoming>, token: Option<&Token>, backend: &B) -> Answer {
    if !authorized(&req, token) {
        let mut refused = text(
            StatusCode::UNAUTHORIZED,
            "this moorline needs its token: Authorization: Bearer TOKEN\n",
        );
        refused.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer realm=\"moorline\""),
        );
        return refused;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "read-only: only GET is served\n",
        );
    }
    let path = req.uri().path();
    match path {
        "/metrics" => answer(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            backend.metrics().await,
        ),
        "/api/status" => match backend.answer(api::Request::Status).await {
            api::Response::Status(report) => json(&report),
            other => failed(other),
        },
        "/api/history" => {
            let limit = query_number(req.uri().query(), "limit")
                .unwrap_or(50)
                .min(1000) as usize;
            let request = api::Request::History { scope: None, limit };
            match backend.answer(request).await {
                api::Response::History(records) => json(&records),
                other => failed(other),
            }
        }
        _ => {
            if let Some(id) = path.strip_prefix("/api/rollouts/") {
                let Ok(id) = id.parse::<u64>() else {
                    return text(StatusCode::BAD_REQUEST, "a rollout id is a number\n");
                };
                return match backend.answer(api::Request::Show { id }).await {
                    api::Response::Show(Some(view)) => json(&view),
                    api::Response::Show(None) => text(
                        StatusCode::NOT_FOUND,
                        &format!("rollout {id} is not in the history\n"),
                    ),
                    other => failed(other),
                };
            }
            match dashboard::asset(path) {
                Some((content_type, body)) => answer(StatusCode::OK, content_type, body),
                None => text(StatusCode::NOT_FOUND, "not found\n"),
            }
        }
    }
}

fn failed(response: api::Response) -> Answer {
    let message = match response {
        api::Response::Error(e) => e,
        other => format!("unexpected answer: {other:?}"),
    };
    text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{message}\n"))
}

/// `name=N` in a query string.
fn query_number(query: Option<&str>, name: &str) -> Option<u64> {
    query?
        .split('&')
        .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}
