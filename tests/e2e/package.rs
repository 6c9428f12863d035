//! The Debian package: built with cargo-deb by `scripts/package-deb` (from
//! the debug binary here), it holds what SPEC.md lists, and its user unit
//! runs the packaged binary as an agent under a real user manager.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{Host, wait_for};

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_holds_the_binary_units_man_page_completions_and_docs_and_its_unit_runs_the_agent() {
    let deb = run("scripts/package-deb", &["--dev"]);
    let deb = Path::new(env!("CARGO_MANIFEST_DIR")).join(deb.trim());
    let name = deb.file_name().and_then(|n| n.to_str()).expect("a name");
    assert!(
        name.starts_with("moorline_0.1.0-1_") && name.ends_with(".deb"),
        "{name}"
    );
    let listing = run("dpkg-deb", &["-c", deb.to_str().expect("utf-8")]);
    for path in [
        "./usr/bin/moorline",
        "./usr/lib/systemd/user/moorline.service",
        "./usr/lib/systemd/user/moorline-edge.service",
        "./usr/share/man/man1/moorline.1.gz",
        "./usr/share/bash-completion/completions/moorline",
        "./usr/share/zsh/vendor-completions/_moorline",
        "./usr/share/fish/vendor_completions.d/moorline.fish",
        "./usr/share/doc/moorline/README.md",
        "./usr/share/doc/moorline/examples/webapp/deploy/moorline.toml",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "{path} missing:\n{listing}"
        );
    }
    let fields = run(
        "dpkg-deb",
        &["-f", deb.to_str().expect("utf-8"), "Package", "Depends"],
    );
    assert!(fields.starts_with("Package: moorline\n"), "{fields}");
    assert!(fields.contains("systemd"), "{fields}");

    let root = tempfile::tempdir().expect("dir");
    run(
        "dpkg-deb",
        &[
            "-x",
            deb.to_str().expect("utf-8"),
            root.path().to_str().expect("utf-8"),
        ],
    );
    let usr = root.path().join("usr");
    let version = run(
        usr.join("bin/moorline").to_str().expect("utf-8"),
        &["--version"],
    );
    assert_eq!(version, "moorline 0.1.0\n");
    let man = run(
        "sh",
        &[
            "-c",
            &format!(
                "gzip -dc {}",
                usr.join("share/man/man1/moorline.1.gz").display()
            ),
        ],
    );
    assert!(
        man.contains(".TH moorline 1") && man.contains("rollback"),
        "{man}"
    );
    let unit =
        std::fs::read_to_string(usr.join("lib/systemd/user/moorline.service")).expect("unit");
    assert!(
        !unit.contains("After=default.target"),
        "an ordering cycle with WantedBy=default.target"
    );
    assert!(unit.contains("Documentation=man:moorline(1)"));
    assert!(unit.contains("WatchdogSec="));
    assert!(unit.contains("ExecStart=/usr/bin/moorline agent"));

    // The packaged unit, enabled as a user would, runs the packaged agent
    // (pointed at the extracted binary and this test's home by a drop-in).
    let host = Host::new();
    let units = host.um.unit_dir();
    std::fs::copy(
        usr.join("lib/systemd/user/moorline.service"),
        units.join("moorline.service"),
    )
    .expect("install unit");
    let dropin = units.join("moorline.service.d");
    std::fs::create_dir_all(&dropin).expect("drop-in dir");
    std::fs::write(
        dropin.join("test.conf"),
        format!(
            "[Service]\nExecStart=\nExecStart={} agent\nEnvironment=HOME={}\n",
            usr.join("bin/moorline").display(),
            host.home().display()
        ),
    )
    .expect("drop-in");
    // The agent reads the config where this manager's XDG_CONFIG_HOME says.
    let xdg = units
        .parent()
        .and_then(Path::parent)
        .expect("XDG_CONFIG_HOME");
    std::fs::create_dir_all(xdg.join("moorline")).expect("config dir");
    std::fs::copy(host.config_path(), xdg.join("moorline/config.toml")).expect("config");
    assert!(host.um.systemctl(&["daemon-reload"]).status.success());
    let enabled = host.um.systemctl(&["enable", "--now", "moorline.service"]);
    assert!(enabled.status.success(), "{enabled:?}");
    let head = crate::harness::git(&host.work(), &["rev-parse", "HEAD"]);
    let rollout = host.wait_rollout(&head);
    assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
    wait_for("the unit active", Duration::from_secs(10), || {
        (host.unit_property("moorline.service", "ActiveState") == "active").then_some(())
    });
    assert!(
        host.um
            .systemctl(&["disable", "--now", "moorline.service"])
            .status
            .success()
    );
}
