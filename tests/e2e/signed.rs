//! `[source.verify]` against commits signed by the real git: SSH signatures
//! (`gpg.format = ssh`, made by ssh-keygen) and OpenPGP ones (made by gpg),
//! checked by the agent with the ssh-key and pgp crates.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::{Host, git, wait_for};
use crate::remotes::{fingerprint, keygen};

/// An ed25519 key pair at `path`; its public line.
fn ssh_key(path: &Path) -> String {
    keygen(path);
    std::fs::read_to_string(path.with_extension("pub")).expect("public key")
}

/// Commit everything in the work tree with `signing` (git `-c` settings;
/// none: unsigned) and push it (`force`: over a rewritten branch).
fn commit(
    host: &Host,
    message: &str,
    signing: &[String],
    force: bool,
    edit: impl FnOnce(&Path),
) -> String {
    let work = host.work();
    edit(&work);
    git(&work, &["add", "-A"]);
    let mut args: Vec<&str> = Vec::new();
    for setting in signing {
        args.extend(["-c", setting.as_str()]);
    }
    args.extend(["commit", "-q", "--allow-empty", "-m", message]);
    if !signing.is_empty() {
        args.push("-S");
    }
    git(&work, &args);
    let push: &[&str] = if force {
        &["push", "-q", "-f", "origin", "main"]
    } else {
        &["push", "-q", "origin", "main"]
    };
    git(&work, push);
    git(&work, &["rev-parse", "HEAD"])
}

fn ssh_signing(key: &Path) -> Vec<String> {
    vec![
        "gpg.format=ssh".into(),
        format!("user.signingkey={}", key.display()),
    ]
}

fn append_verify(host: &Host, table: &str) {
    let mut config = std::fs::read_to_string(host.config_path()).expect("config");
    config.push_str(&format!("\n[source.verify]\n{table}"));
    std::fs::write(host.config_path(), config).expect("config");
}

fn edit_api(text: &'static str) -> impl FnOnce(&Path) {
    move |work| std::fs::write(work.join("services/api/VERSION"), text).expect("edit")
}

/// The refusal `status` shows, once it is `want`.
fn wait_refused(host: &Host, want: &str) {
    wait_for(
        &format!("the refusal {want:?}"),
        Duration::from_secs(30),
        || {
            let status = host.json(&["status", "--json"]);
            (status["source"]["refused"] == want).then_some(())
        },
    );
}

fn rollouts_of(host: &Host, commit: &str) -> Vec<serde_json::Value> {
    host.history()
        .into_iter()
        .filter(|r| r["commit"] == commit)
        .collect()
}

#[test]
fn ssh_signed_commits_deploy_and_unsigned_unknown_or_expired_ones_are_refused_and_not_retried() {
    let mut host = Host::new();
    let keys = host.root.path().join("keys");
    std::fs::create_dir_all(&keys).expect("mkdir");
    let (dev, stranger, retired) = (
        keys.join("dev"),
        keys.join("stranger"),
        keys.join("retired"),
    );
    let dev_public = ssh_key(&dev);
    ssh_key(&stranger);
    let retired_public = ssh_key(&retired);
    let signers = host.home().join(".config/moorline/allowed_signers");
    std::fs::write(
        &signers,
        format!(
            "dev@example.com namespaces=\"git\" {dev_public}old@example.com valid-before=\"20200101\" {retired_public}"
        ),
    )
    .expect("allowed_signers");
    append_verify(
        &host,
        "allowed_signers = \"~/.config/moorline/allowed_signers\"\ncommits = \"all\"\n",
    );

    // The example's first commit is unsigned: refused, recorded, nothing runs.
    let unsigned = git(&host.work(), &["rev-parse", "HEAD"]);
    host.start_agent();
    let refused = host.wait_rollout(&unsigned);
    assert_eq!(refused["outcome"], "refused");
    let reason = format!("refused commit {}: unsigned", &unsigned[..7]);
    assert_eq!(refused["error"], reason.as_str());
    wait_refused(&host, &reason);
    assert_eq!(host.api(), None, "nothing was started");
    let text = host.moorline(&["status"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains(&format!(
            "refused:   {reason}; not retried until the branch moves on\n"
        )),
        "{text:?}"
    );
    // Not retried while the branch stays.
    host.sync();
    host.wait_idle_at(&unsigned);
    assert_eq!(rollouts_of(&host, &unsigned).len(), 1);

    // Signed by a trusted key, it deploys (a first deploy judges the head).
    let signed = commit(
        &host,
        "signed by dev",
        &ssh_signing(&dev),
        false,
        edit_api("v2\n"),
    );
    host.sync();
    assert_eq!(host.wait_rollout(&signed)["outcome"], "succeeded");
    let plan = host.moorline(&["plan"]);
    assert!(
        !String::from_utf8_lossy(&plan.stdout).contains("refused"),
        "{plan:?}"
    );

    // commits = "all": an unsigned commit under a signed head is refused,
    // by name, and `plan` says so too.
    let middle = commit(
        &host,
        "unsigned in the middle",
        &[],
        false,
        edit_api("v3\n"),
    );
    let top = commit(
        &host,
        "signed on top",
        &ssh_signing(&dev),
        false,
        edit_api("v4\n"),
    );
    host.sync();
    assert_eq!(host.wait_rollout(&top)["outcome"], "refused");
    let reason = format!(
        "refused commit {}: unsigned (one of the 2 new commits up to the branch head {}; commits = \"all\" judges each)",
        &middle[..7],
        &top[..7]
    );
    wait_refused(&host, &reason);
    let plan = host.moorline(&["plan"]);
    assert_eq!(
        String::from_utf8_lossy(&plan.stdout).lines().last(),
        Some(format!("{reason}: nothing of this commit deploys ([source.verify])").as_str()),
        "{plan:?}"
    );
    assert_eq!(
        host.json(&["status", "--json"])["source"]["deployed_commit"],
        signed.as_str()
    );

    // A rewrite (allowed) is judged on every commit of the new history:
    // one by an unknown key, then one by a key past its valid-before.
    let config = std::fs::read_to_string(host.config_path()).expect("config");
    std::fs::write(
        host.config_path(),
        config.replacen(
            "branch = \"main\"",
            "branch = \"main\"\nallow_force_push = true",
            1,
        ),
    )
    .expect("config");
    host.stop_agent();
    host.start_agent();
    git(&host.work(), &["reset", "-q", "--hard", &unsigned]);
    let strange = commit(
        &host,
        "signed by a stranger",
        &ssh_signing(&stranger),
        true,
        edit_api("v5\n"),
    );
    host.sync();
    assert_eq!(host.wait_rollout(&strange)["outcome"], "refused");
    wait_refused(
        &host,
        &format!(
            "refused commit {}: signed by an unknown key, {}",
            &strange[..7],
            fingerprint(&stranger.with_extension("pub"))
        ),
    );
    git(&host.work(), &["reset", "-q", "--hard", &unsigned]);
    let old = commit(
        &host,
        "signed by a retired key",
        &ssh_signing(&retired),
        true,
        edit_api("v6\n"),
    );
    let head = commit(
        &host,
        "signed by dev after it",
        &ssh_signing(&dev),
        false,
        edit_api("v7\n"),
    );
    host.sync();
    assert_eq!(host.wait_rollout(&head)["outcome"], "refused");
    wait_refused(
        &host,
        &format!(
            "refused commit {}: key {} of old@example.com expired on 2020-01-01 00:00:00 UTC ({}:2); the commit is of 2026-01-01 00:00:00 UTC (one of the 2 new commits up to the branch head {}; commits = \"all\" judges each)",
            &old[..7],
            fingerprint(&retired.with_extension("pub")),
            signers.display(),
            &head[..7]
        ),
    );
    // Nothing of the refused commits ever ran: the signed release serves.
    assert_eq!(
        host.json(&["status", "--json"])["source"]["deployed_commit"],
        signed.as_str()
    );
    assert_eq!(
        host.api().map(|(code, _)| code),
        Some(200),
        "the deployed api still answers"
    );
}

/// A gpg home of its own with one key, and a `gpg.program` that uses it
/// (at `faked` time, when given: how a key that has expired since signed).
struct Gpg {
    home: PathBuf,
    program: PathBuf,
    fingerprint: String,
}

impl Gpg {
    fn new(dir: &Path, name: &str, expire: &str, faked: Option<&str>) -> Gpg {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).expect("mkdir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let faked_args: Vec<String> = faked
            .map(|t| vec!["--faked-system-time".to_owned(), t.to_owned()])
            .unwrap_or_default();
        let gpg = |args: &[&str]| {
            let out = Command::new("gpg")
                .arg("--homedir")
                .arg(&home)
                .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
                .args(&faked_args)
                .args(args)
                .output()
                .expect("gpg runs");
            assert!(out.status.success(), "gpg {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        gpg(&[
            "--quick-gen-key",
            &format!("{name} <{name}@example.com>"),
            "ed25519",
            "sign",
            expire,
        ]);
        let listing = gpg(&["--with-colons", "--list-keys"]);
        let fingerprint = listing
            .lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .and_then(|l| l.split(':').find(|f| !f.is_empty()))
            .expect("a fingerprint")
            .to_owned();
        let program = dir.join(format!("{name}-gpg"));
        std::fs::write(
            &program,
            format!(
                "#!/bin/sh\nexec gpg --homedir '{}' --batch --pinentry-mode loopback --passphrase '' {} \"$@\"\n",
                home.display(),
                faked_args.join(" ")
            ),
        )
        .expect("gpg program");
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Gpg {
            home,
            program,
            fingerprint,
        }
    }

    fn armored_public(&self) -> String {
        let out = Command::new("gpg")
            .arg("--homedir")
            .arg(&self.home)
            .args(["--batch", "--armor", "--export", &self.fingerprint])
            .output()
            .expect("gpg runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn signing(&self) -> Vec<String> {
        vec![
            "gpg.format=openpgp".into(),
            format!("gpg.program={}", self.program.display()),
            format!("user.signingkey={}", self.fingerprint),
        ]
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&self.home)
            .args(["--kill", "gpg-agent"])
            .status();
    }
}

#[test]
fn openpgp_signed_heads_deploy_and_unknown_tampered_or_expired_signatures_are_refused() {
    let mut host = Host::new();
    let dir = tempfile::Builder::new()
        .prefix("mlgpg")
        .tempdir_in("/tmp")
        .expect("gpg dir");
    let dev = Gpg::new(dir.path(), "dev", "never", None);
    let stranger = Gpg::new(dir.path(), "stranger", "never", None);
    // Made three days ago to expire after one: it has expired since.
    let three_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        - 3 * 86_400;
    let lapsed = Gpg::new(
        dir.path(),
        "lapsed",
        "1d",
        Some(&three_days_ago.to_string()),
    );
    let keys = host.home().join(".config/moorline/trusted.asc");
    std::fs::write(&keys, dev.armored_public() + &lapsed.armored_public()).expect("keys");
    append_verify(
        &host,
        "openpgp_keys = \"~/.config/moorline/trusted.asc\"\ncommits = \"tip\"\n",
    );

    // commits = "tip": an unsigned history under a signed head deploys.
    let signed = commit(
        &host,
        "signed by dev",
        &dev.signing(),
        false,
        edit_api("v2\n"),
    );
    host.start_agent();
    assert_eq!(host.wait_rollout(&signed)["outcome"], "succeeded");

    let strange = commit(
        &host,
        "signed by a stranger",
        &stranger.signing(),
        false,
        edit_api("v3\n"),
    );
    host.sync();
    assert_eq!(host.wait_rollout(&strange)["outcome"], "refused");
    let error = host.json(&["status", "--json"])["source"]["refused"].clone();
    let key_id = &stranger.fingerprint[stranger.fingerprint.len() - 16..];
    assert_eq!(
        error,
        format!(
            "refused commit {}: signed by an unknown key, OpenPGP key {key_id}",
            &strange[..7]
        )
        .as_str()
    );

    // A signed commit whose message was changed afterwards.
    let good = commit(
        &host,
        "signed by dev again",
        &dev.signing(),
        false,
        edit_api("v4\n"),
    );
    let raw = git(&host.work(), &["cat-file", "commit", &good]);
    let forged_text = raw.replace("signed by dev again", "signed by dev, honestly") + "\n";
    let forged_path = host.root.path().join("forged");
    std::fs::write(&forged_path, forged_text).expect("forged");
    let forged = git(
        &host.work(),
        &[
            "hash-object",
            "-t",
            "commit",
            "-w",
            forged_path.to_str().expect("utf-8"),
        ],
    );
    git(
        &host.work(),
        &[
            "push",
            "-q",
            "-f",
            "origin",
            &format!("{forged}:refs/heads/main"),
        ],
    );
    host.sync();
    assert_eq!(host.wait_rollout(&forged)["outcome"], "refused");
    assert_eq!(
        host.json(&["status", "--json"])["source"]["refused"],
        format!(
            "refused commit {}: bad signature: OpenPGP key {} (dev <dev@example.com>) did not sign this commit",
            &forged[..7],
            dev.fingerprint
        )
        .as_str()
    );

    // A good signature by a key that has expired since.
    git(&host.work(), &["reset", "-q", "--hard", &good]);
    let late = commit(
        &host,
        "signed by a lapsed key",
        &lapsed.signing(),
        true,
        edit_api("v5\n"),
    );
    host.sync();
    assert_eq!(host.wait_rollout(&late)["outcome"], "refused");
    let error = host.json(&["status", "--json"])["source"]["refused"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        error.starts_with(&format!(
            "refused commit {}: OpenPGP key {} (lapsed <lapsed@example.com>) expired on ",
            &late[..7],
            lapsed.fingerprint
        )),
        "{error}"
    );
    assert_eq!(
        host.json(&["status", "--json"])["source"]["deployed_commit"],
        signed.as_str()
    );
}
