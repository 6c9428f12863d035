//! A load generator for the zero-downtime tests and the edge benchmark:
//! `workers` threads, each on its own keep-alive HTTP/1.1 connection, send
//! GET requests at a steady total `rate` and keep every answer's status (or
//! why there was none). A connection the server closes is opened again; a
//! request that gets no answer is a failure, never retried.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Status(u16, String),
    /// No answer: the connection was refused, reset or closed first.
    Failed(String),
}

/// What a run of the generator saw.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub answers: Vec<(Instant, Answer, Duration)>,
}

impl Tally {
    pub fn total(&self) -> usize {
        self.answers.len()
    }

    pub fn failed(&self) -> Vec<&Answer> {
        self.answers
            .iter()
            .map(|(_, a, _)| a)
            .filter(|a| matches!(a, Answer::Failed(_)))
            .collect()
    }

    /// Answers by status code (failures under 0).
    pub fn by_status(&self) -> BTreeMap<u16, usize> {
        let mut counts = BTreeMap::new();
        for (_, answer, _) in &self.answers {
            let code = match answer {
                Answer::Status(code, _) => *code,
                Answer::Failed(_) => 0,
            };
            *counts.entry(code).or_default() += 1;
        }
        counts
    }

    /// Answers that were not 2xx (failures included).
    pub fn not_ok(&self) -> usize {
        self.answers
            .iter()
            .filter(|(_, a, _)| !matches!(a, Answer::Status(200..=299, _)))
            .count()
    }

    /// The bodies of 2xx answers, in order of arrival.
    pub fn bodies(&self) -> Vec<&str> {
        self.answers
            .iter()
            .filter_map(|(_, a, _)| match a {
                Answer::Status(200..=299, body) => Some(body.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Latency percentile `p` (0..=100) of the answered requests.
    pub fn latency(&self, p: f64) -> Duration {
        let mut all: Vec<Duration> = self
            .answers
            .iter()
            .filter(|(_, a, _)| matches!(a, Answer::Status(..)))
            .map(|(_, _, d)| *d)
            .collect();
        all.sort_unstable();
        if all.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * (all.len() - 1) as f64).round() as usize;
        all[rank]
    }
}

/// A running generator; `finish` stops it and returns what it saw.
pub struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Send `rate` requests a second in all to `addr` `path`, from
    /// `workers` connections.
    pub fn start(addr: SocketAddr, path: &str, rate: u32, workers: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let every = Duration::from_secs_f64(f64::from(workers) / f64::from(rate));
        let threads = (0..workers)
            .map(|n| {
                let (stop, tally, path) = (stop.clone(), tally.clone(), path.to_string());
                // Spread the workers over one period.
                let offset = every.mul_f64(f64::from(n) / f64::from(workers));
                std::thread::spawn(move || worker(addr, &path, every, offset, &stop, &tally))
            })
            .collect();
        Load {
            stop,
            tally,
            threads,
        }
    }

    /// How many answers (and failures) so far.
    pub fn count(&self) -> usize {
        self.tally.lock().expect("tally").total()
    }

    pub fn finish(self) -> Tally {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("load worker");
        }
        Arc::try_unwrap(self.tally)
            .expect("workers are done")
            .into_inner()
            .expect("tally")
    }
}

fn worker(
    addr: SocketAddr,
    path: &str,
    every: Duration,
    offset: Duration,
    stop: &AtomicBool,
    tally: &Mutex<Tally>,
) {
    let mut next = Instant::now() + offset;
    let mut conn: Option<BufReader<TcpStream>> = None;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if next > now {
            // Pacing the load, not waiting for a condition.
            std::thread::sleep(next - now);
        }
        // A worker held up (a request held by the edge) goes on at the
        // rate, rather than in a burst to catch up.
        next = next.max(now) + every;
        let started = Instant::now();
        let (answer, keep) = match request(&mut conn, addr, path) {
            Ok((code, body, keep)) => (Answer::Status(code, body), keep),
            Err(why) => (Answer::Failed(why), false),
        };
        if !keep {
            conn = None;
        }
        tally
            .lock()
            .expect("tally")
            .answers
            .push((started, answer, started.elapsed()));
    }
}

/// One GET on the kept connection (opened if there is none): status, body,
/// and whether the connection may be used again.
fn request(
    conn: &mut Option<BufReader<TcpStream>>,
    addr: SocketAddr,
    path: &str,
) -> Result<(u16, String, bool), String> {
    if conn.is_none() {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        *conn = Some(BufReader::new(stream));
    }
    let reader = conn.as_mut().expect("connected above");
    let head = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: moorline-load\r\n\r\n");
    reader
        .get_mut()
        .write_all(head.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    read_response(reader)
}

/// Read one response: status line, headers, a body by Content-Length or
/// chunked.
pub fn read_response(reader: &mut impl BufRead) -> Result<(u16, String, bool), String> {
    let mut line = String::new();
    let n = reader
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("closed before an answer".to_string());
    }
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let (mut length, mut chunked, mut keep) = (None, false, !line.starts_with("HTTP/1.0"));
    loop {
        let mut header = String::new();
        reader
            .read_line(&mut header)
            .map_err(|e| format!("read: {e}"))?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap_or((header, ""));
        let (name, value) = (name.to_ascii_lowercase(), value.trim().to_ascii_lowercase());
        match name.as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.contains("chunked"),
            "connection" if value.contains("close") => keep = false,
            "connection" if value.contains("keep-alive") => keep = true,
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader
                .read_line(&mut size)
                .map_err(|e| format!("read: {e}"))?;
            let size = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
            let mut chunk = vec![0; size + 2];
            reader
                .read_exact(&mut chunk)
                .map_err(|e| format!("read: {e}"))?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(length) = length {
        body.resize(length, 0);
        reader
            .read_exact(&mut body)
            .map_err(|e| format!("read: {e}"))?;
    } else {
        reader
            .read_to_end(&mut body)
            .map_err(|e| format!("read: {e}"))?;
        keep = false;
    }
    Ok((code, String::from_utf8_lossy(&body).into_owned(), keep))
}
