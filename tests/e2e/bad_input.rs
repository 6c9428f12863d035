//! Bad input against the running product: manifests from the corpus in
//! tests/bad-inputs pushed to the followed branch, a symlink that leaves the
//! release, a bad host config and bad command lines. Each gets its exact
//! message, is recorded where it applies, and changes nothing that runs.

use std::path::Path;

use crate::harness::{self, Host};

/// Corpus cases spanning the kinds: syntax, unknown keys, wrong types,
/// duplicates, cycles, escaping and absolute paths, non-UTF-8, durations,
/// an owner without its section, empty unit lists, several errors at once.
const MANIFEST_CASES: [&str; 14] = [
    "syntax-unclosed-array",
    "duplicate-scope",
    "unknown-scope-key-typo",
    "wrong-type-owner-bool",
    "after-cycle-two",
    "paths-dotdot-escape",
    "paths-absolute",
    "not-utf8-in-comment",
    "duration-no-unit",
    "owner-native-without-section",
    "units-empty",
    "unit-in-two-scopes",
    "version-unsupported",
    "many-errors-at-once",
];

fn corpus(kind: &str, case: &str) -> (Vec<u8>, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/bad-inputs")
        .join(kind);
    let bytes = std::fs::read(dir.join(format!("{case}.toml"))).expect("corpus case");
    let expected =
        std::fs::read_to_string(dir.join(format!("{case}.expected"))).expect("corpus expectation");
    (bytes, expected.trim_end_matches('\n').to_string())
}

fn invocations(host: &Host) -> [String; 3] {
    ["app-api.service", "app-web.service", "app-worker.service"]
        .map(|u| host.unit_property(u, "InvocationID"))
}

#[test]
fn bad_manifests_and_an_escaping_symlink_are_recorded_as_failed_and_touch_nothing() {
    let mut host = Host::new();
    let first = host.deployed();
    let before = invocations(&host);
    let good_manifest = std::fs::read(host.work().join("deploy/moorline.toml")).expect("manifest");

    for case in MANIFEST_CASES {
        let (bytes, expected) = corpus("manifest", case);
        // The corpus labels diagnostics with the case's file name; pushed,
        // the file is the source's manifest path.
        let expected = expected.replace(&format!("{case}.toml"), "deploy/moorline.toml");
        let commit = host.commit_and_push(case, |work| {
            std::fs::write(work.join("deploy/moorline.toml"), &bytes).expect("write manifest");
        });
        host.sync();
        let rollout = host.wait_rollout(&commit);
        assert_eq!(rollout["outcome"], "failed", "{case}: {rollout:#}");
        assert_eq!(rollout["error"], expected.as_str(), "{case}");
        assert_eq!(
            rollout["journal"],
            serde_json::json!([]),
            "{case}: no side effect was started"
        );
    }

    // A valid manifest, but the commit carries a symlink out of the release.
    let escape = host.commit_and_push("api v2 with a symlink out of the release", |work| {
        std::fs::write(work.join("deploy/moorline.toml"), &good_manifest).expect("write manifest");
        std::fs::write(work.join("services/api/VERSION"), "v2\n").expect("write");
        std::os::unix::fs::symlink("../../../../etc/passwd", work.join("services/api/passwd"))
            .expect("symlink");
    });
    host.sync();
    let rollout = host.wait_rollout(&escape);
    assert_eq!(rollout["outcome"], "failed", "{rollout:#}");
    assert_eq!(
        rollout["error"],
        format!(
            "symlink \"services/api/passwd\" in commit {escape} points outside the release (\"../../../../etc/passwd\")"
        )
        .as_str()
    );
    let releases = host.state_dir().join("releases");
    assert!(
        !releases.join(&escape).exists(),
        "no release was left for the refused commit"
    );
    assert!(!releases.join(format!(".partial-{escape}")).exists());

    assert_eq!(invocations(&host), before, "no unit was restarted");
    assert_eq!(host.api(), Some((200, format!("ok v1 {}\n", &first[..7]))));
    let status = host.json(&["status", "--json"]);
    assert_eq!(status["source"]["deployed_commit"], first.as_str());
    assert_eq!(status["source"]["failed_commit"], escape.as_str());
    assert_eq!(host.history().len(), MANIFEST_CASES.len() + 2);
}

#[test]
fn a_bad_config_stops_the_agent_with_exit_2_and_touches_nothing() {
    let host = Host::new();
    for case in [
        "unknown-source-key",
        "poll-too-short",
        "syntax-unclosed-string",
    ] {
        let (bytes, expected) = corpus("config", case);
        let path = host.root.path().join(format!("{case}.toml"));
        std::fs::write(&path, bytes).expect("write config");
        let output = std::process::Command::new(harness::BIN)
            .args(["--config", path.to_str().expect("utf-8"), "agent"])
            .env_clear()
            .env("HOME", host.home())
            .output()
            .expect("runs");
        assert_eq!(output.status.code(), Some(2), "{case}");
        let label = path.display().to_string();
        assert_eq!(
            String::from_utf8_lossy(&output.stderr),
            format!("{}\n", expected.replace(&format!("{case}.toml"), &label)),
            "{case}"
        );
    }
    assert!(!host.state_dir().exists(), "no state directory was created");
}

/// Bad command lines get clap's message and exit 2; an unknown rollout is
/// an error whether or not the agent runs.
#[test]
fn bad_command_lines_and_unknown_rollouts_exit_2() {
    let mut host = Host::new();
    let cases: [(&[&str], &str); 3] = [
        (
            &["history", "--limit", "0"],
            "error: invalid value '0' for '--limit <N>': 0 is not in 1..=100000\n\nFor more information, try '--help'.\n",
        ),
        (
            &["frobnicate"],
            "error: unrecognized subcommand 'frobnicate'\n\nUsage: moorline [OPTIONS] <COMMAND>\n\nFor more information, try '--help'.\n",
        ),
        (
            &["show", "abc"],
            "error: invalid value 'abc' for '<ROLLOUT>': invalid digit found in string\n\nFor more information, try '--help'.\n",
        ),
    ];
    for (args, message) in cases {
        let output = host.moorline(args);
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&output.stderr), message, "{args:?}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
    host.deployed();
    for running in [true, false] {
        let output = host.moorline(&["show", "999"]);
        assert_eq!(output.status.code(), Some(2), "agent running: {running}");
        assert_eq!(
            String::from_utf8_lossy(&output.stderr),
            "error: no rollout 999\n",
            "agent running: {running}"
        );
        host.stop_agent();
    }
}
