//! The edge's benchmark (issue 10), run by `scripts/bench-edge`: in one run,
//! side by side, a backend reached directly and through `moorline edge`:
//!
//! - latency p50 / p99 at a fixed rate (default 1 000 requests/s) from the
//!   load generator the zero-downtime tests use, and what the edge adds;
//! - throughput: as many requests as `connections` keep-alive connections
//!   complete in `seconds`;
//! - the edge's resident memory (VmRSS, and its peak VmHWM) after the load.
//!
//! The backend is a small hyper server on loopback answering `ok`.
//! Usage: edge_bench MOORLINE_BINARY [RATE] [SECONDS] [CONNECTIONS]

// Shared with the end-to-end tests, which use other parts of it.
#[allow(dead_code)]
#[path = "../tests/support/load.rs"]
mod load;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use load::Load;

fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    listener.local_addr().expect("an address")
}

/// A keep-alive HTTP/1.1 backend answering `ok\n` to everything, on its own
/// two-thread runtime.
fn backend(addr: SocketAddr) {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok\n")),
                        ))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    });
}

/// Start `moorline edge` on a state directory of its own.
fn start_edge(binary: &Path, dir: &Path) -> Child {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\n\n[state]\ndir = \"{}\"\n",
            dir.join("absent.git").display(),
            dir.join("state").display()
        ),
    )
    .expect("write config");
    Command::new(binary)
        .arg("--config")
        .arg(&config)
        .arg("edge")
        .env("MOORLINE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("moorline edge starts")
}

/// One request on the edge's control socket.
fn control(dir: &Path, request: &str) -> String {
    let socket = dir.join("state/edge/edge.sock");
    let started = Instant::now();
    let mut stream = loop {
        match UnixStream::connect(&socket) {
            Ok(stream) => break stream,
            Err(_) if started.elapsed() < Duration::from_secs(10) => {
                // Waiting for the edge's socket to appear.
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("the edge does not answer on {}: {e}", socket.display()),
        }
    };
    writeln!(stream, "{request}").expect("send");
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .expect("an answer");
    answer
}

/// Requests `connections` closed-loop keep-alive connections complete in
/// `seconds`, per second.
fn throughput(addr: SocketAddr, connections: u32, seconds: u64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..connections)
        .map(|_| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).expect("connect");
                let _ = stream.set_nodelay(true);
                let mut reader = BufReader::new(stream);
                let head = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
                while !stop.load(Ordering::Relaxed) {
                    reader.get_mut().write_all(head.as_bytes()).expect("send");
                    let (code, _, _) = load::read_response(&mut reader).expect("an answer");
                    assert_eq!(code, 200);
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    for t in threads {
        t.join().expect("worker");
    }
    done.load(Ordering::Relaxed) as f64 / elapsed
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let binary = Path::new(
        args.get(1)
            .expect("usage: edge_bench MOORLINE_BINARY [RATE] [SECONDS] [CONNECTIONS]"),
    );
    let rate: u32 = args.get(2).map_or(1000, |a| a.parse().expect("a rate"));
    let seconds: u64 = args.get(3).map_or(10, |a| a.parse().expect("seconds"));
    let connections: u32 = args.get(4).map_or(16, |a| a.parse().expect("connections"));

    let dir = tempfile::tempdir().expect("tempdir");
    let (direct, listen) = (free_addr(), free_addr());
    backend(direct);
    let mut edge = start_edge(binary, dir.path());
    let route = format!(
        r#"{{"cmd":"set","scope":"bench","route":{{"listen":"{listen}","slots":[{{"addr":"{direct}","weight":100}}]}}}}"#
    );
    let answer = control(dir.path(), &route);
    assert!(answer.contains("done"), "the edge took the route: {answer}");

    // Warm both paths, then measure each at the same rate.
    for addr in [direct, listen] {
        Load::start(addr, "/", 200, 4).finish();
    }
    let workers = (rate / 50).clamp(4, 64);
    let mut rows = Vec::new();
    for (name, addr) in [("direct", direct), ("edge", listen)] {
        let load = Load::start(addr, "/", rate, workers);
        std::thread::sleep(Duration::from_secs(seconds));
        let tally = load.finish();
        assert_eq!(tally.not_ok(), 0, "{name}: {:?}", tally.by_status());
        let achieved = tally.total() as f64 / seconds as f64;
        rows.push((name, tally.latency(50.0), tally.latency(99.0), achieved));
    }
    let max_direct = throughput(direct, connections, seconds.min(5));
    let max_edge = throughput(listen, connections, seconds.min(5));
    let pid = edge.id();
    let (rss, peak) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    let _ = edge.kill();
    let _ = edge.wait();

    println!(
        "| path | p50 (ms) | p99 (ms) | rate sent (req/s) | max throughput (req/s, {connections} conns) |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for ((name, p50, p99, achieved), max) in rows.iter().zip([max_direct, max_edge]) {
        println!(
            "| {name} | {:.3} | {:.3} | {achieved:.0} | {max:.0} |",
            ms(*p50),
            ms(*p99)
        );
    }
    let (_, d50, d99, _) = rows[0];
    let (_, e50, e99, _) = rows[1];
    println!();
    println!(
        "added by the edge: p50 {:.3} ms, p99 {:.3} ms; throughput {:.1} % of direct; edge RSS {:.1} MiB (peak {:.1} MiB)",
        ms(e50.saturating_sub(d50)),
        ms(e99.saturating_sub(d99)),
        100.0 * max_edge / max_direct,
        rss as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}
