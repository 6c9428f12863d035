//! Private remotes, as a user has them: a real sshd on loopback that takes
//! one deploy key, and git's own http-backend behind TLS with a private CA
//! and a token. The agent is configured only through its host config
//! (`ssh_key`, `known_hosts`, `token_file`, `ca_file`): no `~/.ssh/config`,
//! no `GIT_SSH_COMMAND`, no `SSL_CERT_FILE`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::{Host, free_port, git, wait_for};

pub(crate) fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn keygen(path: &Path) {
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "moorline-test",
            "-f",
            path.to_str().expect("utf-8"),
        ],
    );
}

/// `ED25519 SHA256:…` of a public key file, as ssh shows it.
pub(crate) fn fingerprint(public: &Path) -> String {
    let line = run("ssh-keygen", &["-l", "-f", public.to_str().expect("utf-8")]);
    let words: Vec<&str> = line.split_whitespace().collect();
    let kind = words.last().expect("a kind").trim_matches(['(', ')']);
    format!("{kind} {}", words[1])
}

/// The host config, its `url = …` line replaced with `lines`.
fn set_source(host: &Host, lines: &str) {
    host.configure("60s", "watch = false\n");
    let config = std::fs::read_to_string(host.config_path()).expect("config");
    let config: Vec<String> = config
        .lines()
        .map(|l| {
            if l.starts_with("url = ") {
                lines.to_owned()
            } else {
                l.to_owned()
            }
        })
        .collect();
    std::fs::write(host.config_path(), config.join("\n") + "\n").expect("config");
}

fn wait_fetch_error(host: &Host, want: &str) -> serde_json::Value {
    wait_for(
        &format!("the fetch error {want:?}"),
        Duration::from_secs(30),
        || {
            let status = host.json(&["status", "--json"]);
            (status["source"]["last_fetch_error"] == want).then_some(status)
        },
    )
}

/// Nothing of `secret` in the agent's log, status, history or any file of
/// its state directory (the history database and the snapshot included).
fn nowhere(host: &Host, secret: &str) {
    assert!(!host.agent_log().contains(secret), "{}", host.agent_log());
    let status = host.moorline(&["status", "--json"]);
    assert!(!String::from_utf8_lossy(&status.stdout).contains(secret));
    let history = host.moorline(&["history", "--json"]);
    assert!(!String::from_utf8_lossy(&history.stdout).contains(secret));
    let mut stack = vec![host.state_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("state dir").flatten() {
            let path = entry.path();
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_default();
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                    "{secret:?} found in {path:?}"
                );
            }
        }
    }
}

/// A real sshd on 127.0.0.1 that accepts one key, serving the host's bare
/// repository; stopped on drop.
struct Sshd {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Sshd {
    fn start(dir: &Path, port: u16, host_key: &Path, authorized: &Path) -> Sshd {
        // sshd's privilege separation directory (Debian's package makes it
        // at boot, which a test machine may not have had).
        let _ = std::fs::create_dir_all("/run/sshd");
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
                 StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin prohibit-password\nUsePAM no\n\
                 PidFile none\nLogLevel ERROR\n",
                host_key.display(),
                authorized.display()
            ),
        )
        .expect("sshd config");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("sshd.log")).expect("sshd log"))
            .spawn()
            .expect("sshd starts");
        let mut sshd = Sshd {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        wait_for("sshd to listen", Duration::from_secs(10), || {
            if let Ok(Some(status)) = sshd.child.try_wait() {
                panic!(
                    "sshd exited with {status}: {}",
                    std::fs::read_to_string(sshd.dir.join("sshd.log")).unwrap_or_default()
                );
            }
            std::net::TcpStream::connect(("127.0.0.1", sshd.port)).ok()
        });
        sshd
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_ssh_source_deploys_with_its_deploy_key_and_refuses_unknown_and_changed_host_keys() {
    let mut host = Host::new();
    let keys = host.root.path().join("ssh");
    std::fs::create_dir_all(&keys).expect("mkdir");
    let (host_key, other_host_key, deploy_key) = (
        keys.join("host_ed25519"),
        keys.join("other_host_ed25519"),
        keys.join("deploy_key"),
    );
    for key in [&host_key, &other_host_key, &deploy_key] {
        keygen(key);
    }
    let authorized = keys.join("authorized_keys");
    std::fs::copy(deploy_key.with_extension("pub"), &authorized).expect("authorized_keys");
    let port = free_port();
    let sshd = Sshd::start(&keys, port, &host_key, &authorized);

    let user = run("id", &["-un"]).trim().to_owned();
    let url = format!("ssh://{user}@127.0.0.1:{port}{}", host.bare().display());
    let known_hosts = host.home().join(".config/moorline/known_hosts");
    std::fs::write(&known_hosts, "").expect("known_hosts");
    set_source(
        &host,
        &format!(
            "url = \"{url}\"\nssh_key = \"{}\"\nknown_hosts = \"~/.config/moorline/known_hosts\"\nfetch_timeout = \"10s\"",
            deploy_key.display()
        ),
    );

    // A host key nobody has vouched for is refused, by host and fingerprint.
    host.start_agent();
    let status = wait_fetch_error(
        &host,
        &format!(
            "cannot fetch \"{url}\": the host key of [127.0.0.1]:{port} ({}) is not in known_hosts \"{}\"; add it there once you have checked that fingerprint",
            fingerprint(&host_key.with_extension("pub")),
            known_hosts.display()
        ),
    );
    assert!(status["source"]["desired_commit"].is_null(), "{status:#}");
    assert!(host.history().is_empty());

    // Vouched for, it deploys; and so does every later fetch (a second
    // push), not only the first.
    let public = std::fs::read_to_string(host_key.with_extension("pub")).expect("host key");
    let key_fields: Vec<&str> = public.split_whitespace().take(2).collect();
    std::fs::write(
        &known_hosts,
        format!("[127.0.0.1]:{port} {}\n", key_fields.join(" ")),
    )
    .expect("known_hosts");
    host.sync();
    let first = git(&host.work(), &["rev-parse", "HEAD"]);
    assert_eq!(host.wait_rollout(&first)["outcome"], "succeeded");
    let second = host.commit_and_push("second over ssh", |work| {
        std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("edit");
    });
    host.sync();
    assert_eq!(host.wait_rollout(&second)["outcome"], "succeeded");
    assert!(host.json(&["status", "--json"])["source"]["last_fetch_error"].is_null());

    // The server's key changes (a new machine, or someone in between):
    // refused, naming the line that holds the old one; nothing deploys.
    drop(sshd);
    let _sshd = Sshd::start(&keys, port, &other_host_key, &authorized);
    let third = host.commit_and_push("third over ssh", |work| {
        std::fs::write(work.join("services/api/VERSION"), "v3\n").expect("edit");
    });
    host.sync();
    wait_fetch_error(
        &host,
        &format!(
            "cannot fetch \"{url}\": the host key of [127.0.0.1]:{port} has changed: the remote now shows {}, and {}:1 holds another; refused (replace that line once the new key is confirmed)",
            fingerprint(&other_host_key.with_extension("pub")),
            known_hosts.display()
        ),
    );
    assert!(host.history().iter().all(|r| r["commit"] != third.as_str()));
    assert_eq!(
        host.json(&["status", "--json"])["source"]["desired_commit"],
        second.as_str()
    );

    // The deploy key's secret half never left its file.
    let private = std::fs::read_to_string(&deploy_key).expect("deploy key");
    let secret_line = private.lines().nth(2).expect("a body line");
    nowhere(&host, secret_line);
}

/// git's http-backend behind TLS and basic auth (fixtures/git-https.py).
struct GitHttps {
    child: Child,
    log: PathBuf,
}

impl GitHttps {
    fn start(dir: &Path, port: u16, root: &Path, user: &str, token: &str) -> GitHttps {
        let log = dir.join("requests.log");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/fixtures/git-https.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(dir.join("server.pem"))
            .arg(dir.join("server.key"))
            .arg(root)
            .args([user, token])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("server.err")).expect("log"))
            .spawn()
            .expect("the git https server starts");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("the server's first line");
        assert_eq!(
            line.trim(),
            "listening",
            "{}",
            std::fs::read_to_string(dir.join("server.err")).unwrap_or_default()
        );
        GitHttps { child, log }
    }

    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for GitHttps {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A CA of the test's own and a certificate it signed for 127.0.0.1.
fn private_ca(dir: &Path) -> PathBuf {
    let p = |name: &str| dir.join(name).to_str().expect("utf-8").to_owned();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(
        "openssl",
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                &p("ca.key"),
                "-out",
                &p("ca.pem"),
                "-days",
                "2",
                "-subj",
                "/CN=moorline test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    );
    run(
        "openssl",
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                &p("server.key"),
                "-out",
                &p("server.csr"),
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    run(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            &p("server.csr"),
            "-CA",
            &p("ca.pem"),
            "-CAkey",
            &p("ca.key"),
            "-CAcreateserial",
            "-out",
            &p("server.pem"),
            "-days",
            "2",
            "-extfile",
            &p("server.ext"),
        ],
    );
    dir.join("ca.pem")
}

#[test]
fn an_https_source_with_a_private_ca_and_a_token_deploys_and_the_token_stays_secret() {
    let mut host = Host::new();
    let tls = host.root.path().join("tls");
    std::fs::create_dir_all(&tls).expect("mkdir");
    let ca = private_ca(&tls);
    let token = "ghp_t0ken-that-must-never-show";
    let port = free_port();
    let server = GitHttps::start(&tls, port, host.root.path(), "deploy", token);
    let url = format!("https://127.0.0.1:{port}/app.git");
    let token_file = host.home().join(".config/moorline/git-token");
    std::fs::write(&token_file, format!("{token}\n")).expect("token");

    // The private CA alone is not enough: the remote wants credentials,
    // and without token_file the agent says which key gives them.
    set_source(
        &host,
        &format!(
            "url = \"{url}\"\nca_file = \"{}\"\nfetch_timeout = \"10s\"",
            ca.display()
        ),
    );
    host.start_agent();
    wait_fetch_error(
        &host,
        &format!(
            "cannot fetch \"{url}\": Failed to obtain credentials: the remote asks for credentials; give them with token_file (and token_user)"
        ),
    );
    assert!(
        server
            .requests()
            .iter()
            .any(|r| r.contains(" unauthorized "))
    );
    host.stop_agent();

    // With the token (and its user), it deploys.
    set_source(
        &host,
        &format!(
            "url = \"{url}\"\nca_file = \"{}\"\ntoken_file = \"~/.config/moorline/git-token\"\ntoken_user = \"deploy\"\nfetch_timeout = \"10s\"",
            ca.display()
        ),
    );
    host.start_agent();
    let first = git(&host.work(), &["rev-parse", "HEAD"]);
    assert_eq!(host.wait_rollout(&first)["outcome"], "succeeded");
    host.wait_idle_at(&first);

    // A poll that finds the branch where it was lists the refs and asks
    // for no objects.
    let before = server.requests().len();
    let fetched_at = host.json(&["status", "--json"])["source"]["last_fetch"].clone();
    host.sync();
    wait_for("the no-op poll", Duration::from_secs(30), || {
        let status = host.json(&["status", "--json"]);
        (status["source"]["last_fetch"] != fetched_at && status["agent"]["activity"] == "idle")
            .then_some(())
    });
    let poll: Vec<String> = server.requests()[before..].to_vec();
    assert!(poll.iter().any(|r| r.ends_with(" ls-refs")), "{poll:#?}");
    assert!(
        !poll
            .iter()
            .any(|r| r.ends_with(" fetch") || r.ends_with(" want")),
        "a no-op poll downloaded: {poll:#?}"
    );

    // A push is fetched (objects asked for) and deployed.
    let before = server.requests().len();
    let second = host.commit_and_push("second over https", |work| {
        std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("edit");
    });
    host.sync();
    assert_eq!(host.wait_rollout(&second)["outcome"], "succeeded");
    let fetch: Vec<String> = server.requests()[before..].to_vec();
    assert!(fetch.iter().any(|r| r.ends_with(" fetch")), "{fetch:#?}");

    nowhere(&host, token);

    // A new host is set up for the same remote in one command.
    let home = host.root.path().join("new-home");
    let init = crate::harness::init_in(
        &home,
        &[
            "--url".as_ref(),
            url.as_ref(),
            "--token-user".as_ref(),
            "deploy".as_ref(),
            "--token-file".as_ref(),
            token_file.as_os_str(),
            "--ca-file".as_ref(),
            ca.as_os_str(),
        ],
    );
    assert_eq!(init.status.code(), Some(0), "{init:?}");
    let written =
        std::fs::read_to_string(home.join(".config/moorline/config.toml")).expect("written");
    assert!(
        written.contains(&format!(
            "token_file = \"{}\"\ntoken_user = \"deploy\"\nca_file = \"{}\"\n",
            token_file.display(),
            ca.display()
        )),
        "{written}"
    );
    assert!(!String::from_utf8_lossy(&init.stdout).contains(token));

    // A token the remote no longer takes (revoked, rotated elsewhere): the
    // fetch fails and says so, read again from the file at this fetch.
    std::fs::write(&token_file, "ghp_revoked\n").expect("token");
    let third = host.commit_and_push("third over https", |work| {
        std::fs::write(work.join("services/api/VERSION"), "v3\n").expect("edit");
    });
    host.sync();
    wait_fetch_error(
        &host,
        &format!(
            "cannot fetch \"{url}\": Credentials provided for \"{url}\" were not accepted by the remote: Received HTTP status 401: Unauthenticated"
        ),
    );
    nowhere(&host, "ghp_revoked");
    assert!(host.history().iter().all(|r| r["commit"] != third.as_str()));
}

#[test]
fn an_https_remote_whose_certificate_no_trusted_ca_signed_is_refused() {
    let mut host = Host::new();
    let tls = host.root.path().join("tls");
    std::fs::create_dir_all(&tls).expect("mkdir");
    private_ca(&tls);
    let port = free_port();
    let server = GitHttps::start(&tls, port, host.root.path(), "deploy", "t");
    let url = format!("https://127.0.0.1:{port}/app.git");
    set_source(&host, &format!("url = \"{url}\"\nfetch_timeout = \"10s\""));
    host.start_agent();
    let error = wait_for("the certificate refusal", Duration::from_secs(30), || {
        host.json(&["status", "--json"])["source"]["last_fetch_error"]
            .as_str()
            .map(str::to_owned)
    });
    assert!(
        error.starts_with(&format!("cannot fetch \"{url}\": ")),
        "{error}"
    );
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    // Not a request got through the TLS handshake.
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    assert!(host.history().is_empty());
}
