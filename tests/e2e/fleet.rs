//! One repository describing several hosts: each agent, by its `[host]
//! name`, deploys only the scopes whose `hosts` list it (or that list
//! none), and says which run elsewhere. Also the shell completions.

use std::process::Command;

use serde_json::Value;

use crate::harness::{self, BIN, Host};
use crate::scope;

/// Put `hosts = [...]` under the `[scopes.NAME]` line.
fn hosts(text: &str, name: &str, list: &str) -> String {
    let header = format!("[scopes.{name}]\n");
    text.replace(&header, &format!("{header}hosts = [{list}]\n"))
}

#[test]
fn two_agents_on_one_repository_deploy_only_their_own_scopes() {
    let mut a = Host::with(|work| {
        let path = work.join("deploy/moorline.toml");
        let text = std::fs::read_to_string(&path).expect("read manifest");
        let text = hosts(&text, "api", "\"vps-a\"");
        let text = hosts(&text, "web", "\"vps-b\"");
        std::fs::write(&path, text).expect("write manifest");
    });
    let first = harness::git(&a.work(), &["rev-parse", "HEAD"]);
    let mut b = Host::new();
    // The second host follows the first host's repository, as a fleet does.
    for (host, name) in [(&a, "vps-a"), (&b, "vps-b")] {
        let config = format!(
            "[source]\nurl = \"file://{}\"\nbranch = \"main\"\npoll = \"60s\"\n\n[trigger]\nwatch = false\n\n[state]\ndir = \"{}\"\n\n[host]\nname = \"{name}\"\n",
            a.bare().display(),
            host.state_dir().display()
        );
        std::fs::write(host.config_path(), config).expect("write config");
    }
    a.start_agent();
    b.start_agent();
    let on_a = a.wait_rollout(&first);
    let on_b = b.wait_rollout(&first);
    for rollout in [&on_a, &on_b] {
        assert_eq!(rollout["outcome"], "succeeded", "{rollout:#}");
        assert_eq!(scope(rollout, "workers")["action"], "deploy");
    }
    assert_eq!(scope(&on_a, "api")["action"], "deploy");
    assert_eq!(scope(&on_a, "web")["action"], "skip");
    assert_eq!(
        scope(&on_a, "web")["reason"],
        "not on this host (hosts: vps-b)"
    );
    assert_eq!(scope(&on_b, "web")["action"], "deploy");
    assert_eq!(scope(&on_b, "api")["action"], "skip");

    // Each host's user manager runs only its own scopes' units.
    let state = |host: &Host, unit: &str| host.unit_property(unit, "ActiveState");
    assert_eq!(state(&a, "app-api.service"), "active");
    assert_eq!(state(&a, "app-web.service"), "inactive");
    assert_eq!(state(&b, "app-web.service"), "active");
    assert_eq!(state(&b, "app-api.service"), "inactive");
    // The manifest's ports are the first host's: its api answers there, and
    // so does the web front end the second host runs.
    assert!(a.api().is_some_and(|(code, _)| code == 200));
    assert!(a.web().is_some_and(|(code, _)| code == 200));

    let status: Value = a.json(&["status", "--json"]);
    assert_eq!(status["host"], "vps-a");
    assert_eq!(status["not_on_this_host"], serde_json::json!(["web"]));
    let names: Vec<&str> = status["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["api", "workers"]);
    let text = String::from_utf8_lossy(&a.moorline(&["status"]).stdout).into_owned();
    assert!(text.contains("host:      vps-a\n"), "{text}");
    assert!(
        text.contains("elsewhere: web (not on this host)\n"),
        "{text}"
    );
    let plan = b.json(&["plan", &first, "--json"]);
    let api = plan["scopes"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["scope"] == "api"))
        .expect("api planned");
    assert_eq!(api["action"], "skip", "{plan:#}");
    assert_eq!(api["reason"], "not on this host (hosts: vps-a)");
}

#[test]
fn shell_completions_load_in_bash_and_name_every_command() {
    for (shell, marker) in [
        ("bash", "complete -F _moorline"),
        ("zsh", "#compdef moorline"),
        ("fish", "complete -c moorline"),
    ] {
        let output = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .expect("moorline runs");
        assert!(output.status.success(), "{shell}: {output:?}");
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains(marker), "{shell}:\n{text}");
        for command in [
            "agent", "status", "history", "show", "check", "plan", "sync",
        ] {
            assert!(text.contains(command), "{shell} names {command}");
        }
    }
    // bash loads them: `complete -p` shows the function registered.
    let script = format!("source <({BIN} completions bash) && complete -p moorline");
    let output = Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash runs");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "complete -o bashdefault -o default -o nosort -F _moorline moorline",
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bad = Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .expect("moorline runs");
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid value 'tcsh' for '<SHELL>'"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

#[test]
fn init_writes_a_config_for_a_readable_source_and_nothing_for_a_missing_one() {
    use std::os::unix::fs::PermissionsExt;
    let host = Host::new();
    let first = harness::git(&host.work(), &["rev-parse", "HEAD"]);
    let config = host
        .root
        .path()
        .join("new-home/.config/moorline/config.toml");
    let url = format!("file://{}", host.bare().display());
    // A new user's first command: no --config, so the default path.
    let init = |args: &[&str]| harness::init_in(&host.root.path().join("new-home"), args);
    let output = init(&["--url", &url]);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(
        stdout.starts_with(&format!("wrote {}\nplan for {first}\n", config.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("  api      native  deploy     first deploy; build\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("  systemctl --user enable --now moorline\n"),
        "{stdout}"
    );
    assert!(stdout.contains("sudo loginctl enable-linger"), "{stdout}");
    let mode = std::fs::metadata(&config)
        .expect("written")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let text = std::fs::read_to_string(&config).expect("read");
    assert!(
        text.contains(&format!("url = \"{url}\"\nbranch = \"main\"\n")),
        "{text}"
    );
    // The written config is one the agent reads.
    let check = Command::new(BIN)
        .args(["--config", config.to_str().expect("utf-8"), "status"])
        .output()
        .expect("moorline runs");
    assert!(
        !String::from_utf8_lossy(&check.stderr).contains(".toml:"),
        "{check:?}"
    );

    let again = init(&["--url", &url]);
    assert_eq!(again.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&again.stderr),
        format!(
            "error: \"{}\" exists; moorline init does not overwrite a host config (edit it, or remove it first)\n",
            config.display()
        )
    );

    std::fs::remove_file(&config).expect("remove");
    let missing = host.root.path().join("nowhere.git");
    let output = init(&["--url", missing.to_str().expect("utf-8")]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with(&format!(
            "error: cannot read the source: cannot open repository \"{}\": ",
            missing.display()
        )) && stderr.ends_with("\nnothing was written\n"),
        "{stderr}"
    );
    assert!(!config.exists(), "nothing was written");
}
