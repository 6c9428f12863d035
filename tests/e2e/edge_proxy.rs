//! `moorline edge` alone, as a proxy: the real binary in front of a small
//! HTTP/1.1 backend that reports what reached it. Chunked bodies both ways,
//! keep-alive, the forwarded headers, hop-by-hop headers left behind, a
//! slot that does not answer, and the control socket's owner-only mode.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{free_port, wait_for};

/// A backend that answers each request, chunked, with the request line, its
/// headers (lowercase) and its body (de-chunked), on keep-alive connections.
fn echo_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                while let Some(report) = read_request(&mut reader) {
                    let out = reader.get_mut();
                    let mut answer =
                        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_string();
                    for part in report.as_bytes().chunks(7) {
                        answer.push_str(&format!("{:x}\r\n", part.len()));
                        answer.push_str(&String::from_utf8_lossy(part));
                        answer.push_str("\r\n");
                    }
                    answer.push_str("0\r\n\r\n");
                    if out.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<String> {
    let mut report = String::new();
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    report.push_str(line.trim_end());
    report.push('\n');
    let (mut length, mut chunked) = (0usize, false);
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).ok()?;
        let header = header.trim_end().to_ascii_lowercase();
        if header.is_empty() {
            break;
        }
        if let Some(v) = header.strip_prefix("content-length: ") {
            length = v.parse().unwrap_or(0);
        }
        chunked |= header == "transfer-encoding: chunked";
        report.push_str(&header);
        report.push('\n');
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).ok()?;
            let size = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    } else {
        body.resize(length, 0);
        reader.read_exact(&mut body).ok()?;
    }
    report.push_str("body: ");
    report.push_str(&String::from_utf8_lossy(&body));
    Some(report)
}

struct EdgeProcess {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for EdgeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl EdgeProcess {
    fn start() -> EdgeProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[source]\nurl = \"{}\"\n\n[state]\ndir = \"{}\"\n",
                dir.path().join("absent.git").display(),
                dir.path().join("state").display()
            ),
        )
        .expect("config");
        let child = Command::new(env!("CARGO_BIN_EXE_moorline"))
            .arg("--config")
            .arg(&config)
            .arg("edge")
            .env("HOME", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moorline edge starts");
        let edge = EdgeProcess { child, dir };
        wait_for("the edge's control socket", Duration::from_secs(10), || {
            UnixStream::connect(edge.socket()).ok()
        });
        edge
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("state/edge/edge.sock")
    }

    fn control(&self, request: &str) -> String {
        let mut stream = UnixStream::connect(self.socket()).expect("connect");
        writeln!(stream, "{request}").expect("send");
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .expect("answer");
        answer
    }

    fn route(&self, listen: SocketAddr, slots: &[(SocketAddr, u32)]) -> String {
        let slots: Vec<String> = slots
            .iter()
            .map(|(addr, weight)| format!(r#"{{"addr":"{addr}","weight":{weight}}}"#))
            .collect();
        self.control(&format!(
            r#"{{"cmd":"set","scope":"web","route":{{"listen":"{listen}","slots":[{}]}}}}"#,
            slots.join(",")
        ))
    }
}

/// Send `head` (and `body`) on `reader`'s connection; the answer.
fn exchange(reader: &mut BufReader<TcpStream>, head: &str, body: &[u8]) -> (u16, String) {
    let stream = reader.get_mut();
    stream.write_all(head.as_bytes()).expect("send head");
    stream.write_all(body).expect("send body");
    let (code, body, _) = crate::load::read_response(reader).expect("an answer");
    (code, body)
}

#[test]
fn the_edge_passes_chunked_bodies_and_forwarded_headers_on_kept_connections() {
    let backend = echo_backend();
    let edge = EdgeProcess::start();
    let mode = std::fs::metadata(edge.socket())
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the control socket is the owner's");
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    assert!(edge.route(listen, &[(backend, 100)]).contains("done"));

    let stream = TcpStream::connect(listen).expect("connect to the edge");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(stream);
    let (code, seen) = exchange(
        &mut reader,
        "POST /upload?x=1 HTTP/1.1\r\nHost: front.example\r\nTransfer-Encoding: chunked\r\n\
         Connection: keep-alive, x-secret-hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
         X-Forwarded-Proto: https\r\n\r\n",
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    );
    assert_eq!(code, 200);
    assert!(seen.starts_with("POST /upload?x=1 HTTP/1.1\n"), "{seen}");
    assert!(seen.ends_with("\nbody: hello world"), "{seen}");
    for header in [
        "host: front.example",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: https",
        "x-forwarded-host: front.example",
    ] {
        assert!(seen.contains(&format!("\n{header}\n")), "{header}: {seen}");
    }
    for hop in ["x-secret-hop", "keep-alive:"] {
        assert!(!seen.contains(hop), "{hop} stayed behind: {seen}");
    }
    // The same client connection again.
    let (code, seen) = exchange(
        &mut reader,
        "GET /again HTTP/1.1\r\nHost: front.example\r\n\r\n",
        b"",
    );
    assert_eq!(code, 200);
    assert!(seen.starts_with("GET /again HTTP/1.1\n"), "{seen}");

    // A slot that does not answer is a 502, counted as its error.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    assert!(edge.route(listen, &[(dead, 100)]).contains("done"));
    let (code, body) = exchange(
        &mut reader,
        "GET / HTTP/1.1\r\nHost: front.example\r\n\r\n",
        b"",
    );
    assert_eq!((code, body.as_str()), (502, "the slot did not answer\n"));
    let report = edge.control(r#"{"cmd":"report"}"#);
    assert!(report.contains(r#""errors":1"#), "{report}");

    // A listen address already taken is refused, and changes nothing.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_addr = taken.local_addr().expect("address");
    let refused = edge.route(taken_addr, &[(backend, 100)]);
    assert!(
        refused.contains(&format!(
            "cannot listen on {taken_addr}: Address already in use (os error 98)"
        )),
        "{refused}"
    );
    assert!(Path::new(&edge.dir.path().join("state/edge/routes.json")).is_file());
    let table =
        std::fs::read_to_string(edge.dir.path().join("state/edge/routes.json")).expect("table");
    assert!(
        table.contains(&dead.to_string()) && !table.contains(&taken_addr.to_string()),
        "{table}"
    );
}
