//! The proxy: one accept loop per route's `listen`, each request routed to a
//! slot of its scope by weight (smooth weighted round robin, so a canary's
//! share is exact over any few requests), counted in that slot's
//! `Counters`, and passed through with its body streamed both ways.
//! WebSocket (and any other) upgrades become a byte tunnel that counts as
//! in flight until it closes. A failed upstream attempt answers 502 and is
//! never retried on the other slot: a slot's errors are its own.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::control::{RouteReport, SlotReport};
use super::stats::Counters;
use super::table::{Route, Table};

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Headers that belong to one hop, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// The running edge: its routes, their listeners, the upstream client.
pub struct Edge {
    table_path: PathBuf,
    routes: RwLock<BTreeMap<String, Arc<Live>>>,
    listeners: Mutex<BTreeMap<String, Listener>>,
    client: Client<HttpConnector, Incoming>,
    /// One change of the table at a time.
    changes: tokio::sync::Mutex<()>,
}

struct Listener {
    listen: SocketAddr,
    task: JoinHandle<()>,
}

/// A route as it serves: its slots' counters and the weighted picker.
struct Live {
    route: Route,
    counters: Vec<Arc<Counters>>,
    /// Smooth weighted round robin: each slot's current weight.
    current: Mutex<Vec<i64>>,
    /// New requests wait until this instant (a restart under `hold`).
    hold: Arc<watch::Sender<Option<Instant>>>,
}

impl Live {
    /// The slot the next request goes to: the one furthest ahead once each
    /// gained its weight (nginx's smooth weighted round robin).
    fn pick(&self) -> Option<usize> {
        let total: i64 = self.route.slots.iter().map(|s| i64::from(s.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        for (c, slot) in current.iter_mut().zip(&self.route.slots) {
            *c += i64::from(slot.weight);
        }
        let best = (0..current.len())
            .filter(|i| self.route.slots[*i].weight > 0)
            .max_by_key(|i| (current[*i], std::cmp::Reverse(*i)))?;
        current[best] -= total;
        Some(best)
    }

    fn held(&self) -> bool {
        matches!(*self.hold.borrow(), Some(until) if Instant::now() < until)
    }
}

impl Edge {
    pub fn new(table_path: PathBuf) -> Edge {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(TokioTimer::new())
            .build(connector);
        Edge {
            table_path,
            routes: RwLock::new(BTreeMap::new()),
            listeners: Mutex::new(BTreeMap::new()),
            client,
            changes: tokio::sync::Mutex::new(()),
        }
    }

    fn route(&self, scope: &str) -> Option<Arc<Live>> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.get(scope).cloned()
    }

    fn table(&self) -> Table {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        Table {
            routes: routes
                .iter()
                .map(|(scope, live)| (scope.clone(), live.route.clone()))
                .collect(),
        }
    }

    /// Route `scope` as `route`: its listener bound first (an address that
    /// cannot be bound changes nothing), the table saved, then new
    /// requests follow the new weights. `persist` is off when the routes
    /// come from the table itself at start-up.
    pub async fn set(
        self: &Arc<Self>,
        scope: &str,
        route: Route,
        persist: bool,
    ) -> Result<(), String> {
        let _one = self.changes.lock().await;
        let old = self.route(scope);
        let rebind = {
            let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            listeners.get(scope).map(|l| l.listen) != Some(route.listen)
        };
        let bound = match rebind {
            true => Some(
                bind(route.listen)
                    .await
                    .map_err(|e| format!("cannot listen on {}: {e}", route.listen))?,
            ),
            false => None,
        };
        let counters = route
            .slots
            .iter()
            .map(|slot| {
                old.as_ref()
                    .and_then(|o| {
                        o.route
                            .slots
                            .iter()
                            .position(|s| s.addr == slot.addr)
                            .map(|i| o.counters[i].clone())
                    })
                    .unwrap_or_default()
            })
            .collect();
        let hold = old
            .as_ref()
            .map(|o| o.hold.clone())
            .unwrap_or_else(|| Arc::new(watch::Sender::new(None)));
        let live = Arc::new(Live {
            current: Mutex::new(vec![0; route.slots.len()]),
            route,
            counters,
            hold,
        });
        if persist {
            let mut table = self.table();
            table.routes.insert(scope.to_string(), live.route.clone());
            table.save(&self.table_path).map_err(|e| e.to_string())?;
        }
        let listen = live.route.listen;
        {
            let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
            routes.insert(scope.to_string(), live);
        }
        if let Some(listener) = bound {
            let task = tokio::spawn(accept(self.clone(), scope.to_string(), listener));
            let mut listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(old) = listeners.insert(scope.to_string(), Listener { listen, task }) {
                old.task.abort();
            }
            info!(scope, %listen, "listening");
        }
        Ok(())
    }

    /// Stop routing `scope`: its listener closes; requests in flight finish.
    pub async fn remove(&self, scope: &str) -> Result<(), String> {
        let _one = self.changes.lock().await;
        let mut table = self.table();
        if table.routes.remove(scope).is_none() {
            return Ok(());
        }
        table.save(&self.table_path).map_err(|e| e.to_string())?;
        self.routes
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(scope);
        let listener = self
            .listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(scope);
        if let Some(listener) = listener {
            listener.task.abort();
        }
        Ok(())
    }

    /// New requests for `scope` wait (up to `limit`) until `release`.
    pub fn hold(&self, scope: &str, limit: Duration) -> Result<(), String> {
        let live = self
            .route(scope)
            .ok_or_else(|| format!("no route for scope \"{scope}\""))?;
        live.hold.send_replace(Some(Instant::now() + limit));
        Ok(())
    }

    pub fn release(&self, scope: &str) -> Result<(), String> {
        let live = self
            .route(scope)
            .ok_or_else(|| format!("no route for scope \"{scope}\""))?;
        live.hold.send_replace(None);
        Ok(())
    }

    pub fn report(&self) -> BTreeMap<String, RouteReport> {
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        let listeners = self.listeners.lock().unwrap_or_else(|p| p.into_inner());
        routes
            .iter()
            .map(|(scope, live)| {
                let listening = listeners
                    .get(scope)
                    .is_some_and(|l| l.listen == live.route.listen && !l.task.is_finished());
                let slots = live
                    .route
                    .slots
                    .iter()
                    .zip(&live.counters)
                    .map(|(slot, counters)| SlotReport {
                        addr: slot.addr,
                        weight: slot.weight,
                        figures: counters.figures(),
                    })
                    .collect();
                let report = RouteReport {
                    listen: live.route.listen,
                    listening,
                    held: live.held(),
                    slots,
                };
                (scope.clone(), report)
            })
            .collect()
    }
}

async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match listen {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(listen)?;
    socket.listen(1024)
}

async fn accept(edge: Arc<Edge>, scope: String, listener: TcpListener) {
    let scope: Arc<str> = scope.into();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: wait a little, go on.
                warn!(scope = %scope, error = %e, "cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (edge, scope) = (edge.clone(), scope.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                proxy(edge.clone(), scope.clone(), peer, req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = conn.await {
                debug!(error = %e, "client connection ended");
            }
        });
    }
}

/// Counts a request as in flight on its slot until dropped: when the
/// response body has been sent, or an upgraded tunnel closed.
struct InFlight(Arc<Counters>);

impl InFlight {
    fn new(counters: Arc<Counters>) -> InFlight {
        counters.enter();
        InFlight(counters)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.leave();
    }
}

/// A response body that keeps its request in flight until it ends.
struct Guarded {
    inner: Incoming,
    _in_flight: InFlight,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut response = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Drop hop-by-hop headers, those the `Connection` header names included;
/// an upgrade keeps `Connection: upgrade` and its `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let upgrade_to = headers.get(header::UPGRADE).cloned();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
    if let (true, Some(to)) = (upgrade, upgrade_to) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, to);
    }
}

fn forwarded_headers(headers: &mut HeaderMap, peer: SocketAddr) {
    let client = peer.ip().to_string();
    let chain = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client,
    };
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert("x-forwarded-for", value);
    }
    // Set by the public proxy in front, when there is one; kept as it is.
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
    if !headers.contains_key("x-forwarded-host")
        && let Some(host) = headers.get(header::HOST).cloned()
    {
        headers.insert("x-forwarded-host", host);
    }
}

async fn proxy(
    edge: Arc<Edge>,
    scope: Arc<str>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let Some(mut live) = edge.route(&scope) else {
        return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "no route\n"));
    };
    if live.held() {
        wait_for_release(&live).await;
        // The route may have changed while the request waited.
        live = match edge.route(&scope) {
            Some(live) => live,
            None => return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "no route\n")),
        };
    }
    let Some(slot) = live.pick() else {
        return Ok(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no slot takes requests\n",
        ));
    };
    let counters = live.counters[slot].clone();
    let addr = live.route.slots[slot].addr;
    let in_flight = InFlight::new(counters.clone());

    let upgrade = is_upgrade(req.headers());
    let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
    let path = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let uri: Uri = match format!("http://{addr}{path}").parse() {
        Ok(uri) => uri,
        Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "bad request target\n")),
    };
    *req.uri_mut() = uri;
    strip_hop_by_hop(req.headers_mut(), upgrade);
    forwarded_headers(req.headers_mut(), peer);

    let started = Instant::now();
    match edge.client.request(req).await {
        Err(e) => {
            counters.record(started.elapsed(), StatusCode::BAD_GATEWAY.as_u16());
            debug!(scope = %scope, slot, error = %e, "the slot did not answer");
            Ok(text(StatusCode::BAD_GATEWAY, "the slot did not answer\n"))
        }
        Ok(mut response) => {
            let status = response.status();
            counters.record(started.elapsed(), status.as_u16());
            let switching = status == StatusCode::SWITCHING_PROTOCOLS;
            if let (true, Some(client_side)) = (switching, client_side) {
                let upstream_side = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel(client_side, upstream_side, in_flight));
                strip_hop_by_hop(response.headers_mut(), true);
                return Ok(response.map(|_| {
                    Full::new(Bytes::new())
                        .map_err(|never| match never {})
                        .boxed()
                }));
            }
            strip_hop_by_hop(response.headers_mut(), false);
            Ok(response.map(|inner| {
                Guarded {
                    inner,
                    _in_flight: in_flight,
                }
                .boxed()
            }))
        }
    }
}

async fn wait_for_release(live: &Live) {
    let mut changes = live.hold.subscribe();
    loop {
        let until = *changes.borrow_and_update();
        match until {
            Some(until) if Instant::now() < until => {
                if tokio::time::timeout_at(until, changes.changed())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            _ => return,
        }
    }
}

/// Copy bytes both ways between the upgraded client and upstream
/// connections until either closes.
async fn tunnel(
    client_side: hyper::upgrade::OnUpgrade,
    upstream_side: hyper::upgrade::OnUpgrade,
    _in_flight: InFlight,
) {
    match tokio::try_join!(client_side, upstream_side) {
        Ok((client, upstream)) => {
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                debug!(error = %e, "tunnel ended");
            }
        }
        Err(e) => debug!(error = %e, "upgrade failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edge::table::Backend;

    fn live(weights: &[u32]) -> Live {
        Live {
            route: Route {
                listen: "127.0.0.1:1".parse().expect("address"),
                slots: weights
                    .iter()
                    .enumerate()
                    .map(|(i, w)| Backend {
                        addr: format!("127.0.0.1:{}", 10 + i).parse().expect("address"),
                        weight: *w,
                    })
                    .collect(),
            },
            counters: weights.iter().map(|_| Arc::default()).collect(),
            current: Mutex::new(vec![0; weights.len()]),
            hold: Arc::new(watch::Sender::new(None)),
        }
    }

    #[test]
    fn weights_share_requests_exactly_and_evenly() {
        let canary = live(&[90, 10]);
        let picks: Vec<usize> = (0..100).filter_map(|_| canary.pick()).collect();
        assert_eq!(picks.iter().filter(|s| **s == 1).count(), 10);
        // Spread out: never two canary requests in a row.
        assert!(picks.windows(2).all(|w| w != [1, 1]), "{picks:?}");
        let half = live(&[50, 50]);
        let picks: Vec<usize> = (0..4).filter_map(|_| half.pick()).collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        assert_eq!(live(&[0, 100]).pick(), Some(1));
        assert_eq!(live(&[0, 0]).pick(), None);
    }

    #[test]
    fn hop_by_hop_headers_stay_behind_and_an_upgrade_keeps_its_own() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-trace"),
        );
        h.insert("x-trace", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["host"]);

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
    }

    #[test]
    fn the_forwarded_headers_extend_what_the_public_proxy_said() {
        let peer: SocketAddr = "127.0.0.1:5000".parse().expect("address");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        forwarded_headers(&mut h, peer);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example");

        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.7"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("public.example"),
        );
        forwarded_headers(&mut h, peer);
        assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "public.example");
    }
}
