//! Reads a manifest's TOML into a validated [`Manifest`], reporting every
//! problem it can find at once, each at the offending key or value.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use toml::de::DeValue;

use super::reader::{
    At, Reader, Table, check_repo_path, duration, integer_of, read_toml, socket_addr,
};
use super::{
    Approve, CanarySpec, CanaryStep, ContainerSpec, Defaults, Diagnostics, DockerSpec, EdgeSpec,
    Manifest, NativeSpec, Owner, Scope, Strategy,
};

const TOP_KEYS: &[&str] = &["version", "defaults", "scopes"];
const DEFAULTS_KEYS: &[&str] = &[
    "health_timeout",
    "keep_releases",
    "settle",
    "build_timeout",
    "job_timeout",
];
const SCOPE_KEYS: &[&str] = &[
    "owner",
    "after",
    "paths",
    "build",
    "native",
    "docker",
    "health",
    "health_timeout",
    "settle",
    "build_timeout",
    "job_timeout",
    "hosts",
    "strategy",
    "edge",
    "canary",
    "approve",
];
const EDGE_KEYS: &[&str] = &["listen", "slots", "drain", "hold"];
const CANARY_KEYS: &[&str] = &[
    "steps",
    "interval",
    "max_error_rate",
    "max_p95",
    "min_requests",
    "failure_limit",
];
const STEP_KEYS: &[&str] = &["weight", "soak"];
const STRATEGIES: &[&str] = &["restart", "blue-green", "canary"];
const APPROVALS: &[&str] = &["cutover", "always"];
/// Scope keys that decide nothing about what runs: changing one redeploys
/// nothing (they are left out of the section's fingerprint).
const GATE_KEYS: &[&str] = &["approve"];
const NATIVE_KEYS: &[&str] = &["units", "unit_files"];
const DOCKER_KEYS: &[&str] = &["containers"];
const CONTAINER_KEYS: &[&str] = &[
    "name",
    "image",
    "dockerfile",
    "context",
    "ports",
    "env",
    "env_file",
    "volumes",
    "command",
    "restart",
    "port",
];
const UNIT_SUFFIXES: &[&str] = &[".service", ".socket", ".timer", ".target", ".path"];
const RESTART_POLICIES: &[&str] = &["no", "always", "unless-stopped", "on-failure"];

/// The manifest version this moorline reads.
const VERSION: i128 = 1;

/// Parses and validates a manifest. `file_label` names the file in messages.
pub fn parse(file_label: &str, bytes: &[u8]) -> Result<Manifest, Diagnostics> {
    read_toml(file_label, bytes, validate)
}

/// What one scope contributed, kept even when the scope itself is invalid so
/// cross-scope checks still see its names.
struct Part {
    name: String,
    after: Vec<At<String>>,
    units: Vec<At<String>>,
    containers: Vec<At<String>>,
    /// The edge addresses it listens on or sends to.
    addresses: Vec<At<String>>,
    scope: Option<Scope>,
}

fn validate(r: &mut Reader<'_>, root: Table<'_, '_>) -> Option<Manifest> {
    root.check_keys(r, TOP_KEYS);
    match root.integer(r, "version") {
        Some(At { value: VERSION, .. }) => {}
        Some(At { span, value }) => r.error(
            span.start,
            format!("unsupported manifest version {value}; this moorline reads version 1"),
        ),
        None if root.value("version").is_none() => r.error(
            0,
            "missing key \"version\" at the top level; this moorline reads version 1",
        ),
        None => {}
    }
    let defaults = read_defaults(r, &root);

    let mut parts = Vec::new();
    match root.table(r, "scopes", "[scopes]".to_owned()) {
        None if root.value("scopes").is_none() => {
            r.error(0, "manifest defines no scopes; add a [scopes.NAME] table")
        }
        None => {}
        Some(scopes) if scopes.map.is_empty() => r.error(
            scopes.span.start,
            "manifest defines no scopes; add a [scopes.NAME] table",
        ),
        Some(scopes) => {
            for (key, value) in scopes.map.iter() {
                let name = key.get_ref().as_ref();
                if !valid_scope_name(name) {
                    r.error(
                        key.span().start,
                        format!(
                            "invalid scope name {name:?}; use lowercase letters, digits, \"_\" and \"-\", starting with a letter or digit"
                        ),
                    );
                }
                let DeValue::Table(map) = value.get_ref() else {
                    r.error(
                        value.span().start,
                        format!(
                            "scope {name:?} must be a table, found {}",
                            super::reader::kind_of(value.get_ref())
                        ),
                    );
                    continue;
                };
                let table = Table {
                    label: format!("[scopes.{name}]"),
                    span: value.span(),
                    map,
                };
                parts.push(read_scope(r, name, &table, &defaults, value.get_ref()));
            }
        }
    }

    check_after(r, &mut parts);
    check_unique(r, &parts, |p| &p.units, "unit", "listed");
    check_unique(r, &parts, |p| &p.containers, "container", "defined");
    check_unique(r, &parts, |p| &p.addresses, "edge address", "used");
    let waves = order(r, &parts);

    let defaults = defaults?;
    let mut scopes = BTreeMap::new();
    for part in parts {
        let scope = part.scope?;
        scopes.insert(scope.name.clone(), scope);
    }
    Some(Manifest {
        defaults,
        scopes,
        waves,
    })
}

fn valid_scope_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

fn read_defaults(r: &mut Reader<'_>, root: &Table<'_, '_>) -> Option<Defaults> {
    let mut defaults = Defaults {
        health_timeout: Duration::from_secs(60),
        keep_releases: 5,
        settle: Duration::from_secs(3),
        build_timeout: Duration::from_secs(600),
        job_timeout: crate::runtime::systemd::DEFAULT_JOB_TIMEOUT,
    };
    let Some(table) = root.table(r, "defaults", "[defaults]".to_owned()) else {
        return root.value("defaults").is_none().then_some(defaults);
    };
    table.check_keys(r, DEFAULTS_KEYS);
    let mut ok = true;
    if let Some(keep) = table.integer(r, "keep_releases") {
        match usize::try_from(keep.value) {
            Ok(n) if n >= 1 => defaults.keep_releases = n,
            _ => {
                r.error(
                    keep.span.start,
                    format!("keep_releases must be at least 1, found {}", keep.value),
                );
                ok = false;
            }
        }
    }
    ok &= set_duration(
        r,
        &table,
        "health_timeout",
        false,
        &mut defaults.health_timeout,
    );
    ok &= set_duration(r, &table, "settle", true, &mut defaults.settle);
    ok &= set_duration(
        r,
        &table,
        "build_timeout",
        false,
        &mut defaults.build_timeout,
    );
    ok &= set_duration(r, &table, "job_timeout", false, &mut defaults.job_timeout);
    ok.then_some(defaults)
}

/// Overwrites `slot` with the table's `key` when present and valid; false
/// when the key is present but invalid.
fn set_duration(
    r: &mut Reader<'_>,
    table: &Table<'_, '_>,
    key: &str,
    zero_ok: bool,
    slot: &mut Duration,
) -> bool {
    if table.value(key).is_none() {
        return true;
    }
    let Some(d) = duration(r, table, key) else {
        return false;
    };
    if d.value.is_zero() && !zero_ok {
        r.error(d.span.start, format!("{key:?} must be longer than zero"));
        return false;
    }
    *slot = d.value;
    true
}

fn owned(items: Vec<At<&str>>) -> Vec<At<String>> {
    items
        .into_iter()
        .map(|At { span, value }| At {
            span,
            value: value.to_owned(),
        })
        .collect()
}

fn values(items: &[At<String>]) -> Vec<String> {
    items.iter().map(|i| i.value.clone()).collect()
}

fn read_scope(
    r: &mut Reader<'_>,
    name: &str,
    table: &Table<'_, '_>,
    defaults: &Option<Defaults>,
    raw: &DeValue<'_>,
) -> Part {
    table.check_keys(r, SCOPE_KEYS);
    let mut ok = true;

    let owner = table.required_string(r, "owner");
    let owner = owner.and_then(|o| match Owner::parse(o.value) {
        Some(value) => Some(At {
            span: o.span,
            value,
        }),
        None => {
            r.error(
                o.span.start,
                format!(
                    "unknown owner {:?}; expected \"native\" or \"docker\"",
                    o.value
                ),
            );
            None
        }
    });

    let after = owned(
        table
            .strings(r, "after")
            .map(|a| a.value)
            .unwrap_or_default(),
    );
    let paths = table
        .strings(r, "paths")
        .map(|a| a.value)
        .unwrap_or_default();
    for path in &paths {
        ok &= check_repo_path(r, path);
    }
    let hosts_at = table.strings(r, "hosts");
    if let Some(list) = hosts_at.as_ref().filter(|l| l.value.is_empty()) {
        r.error(
            list.span.start,
            format!(
                "\"hosts\" of scope {name:?} is empty; leave it out to run the scope on every host"
            ),
        );
        ok = false;
    }
    let hosts = hosts_at.map(|a| a.value).unwrap_or_default();
    for host in &hosts {
        if host.value.is_empty()
            || host
                .value
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            r.error(
                host.span.start,
                format!(
                    "host name {:?} in scope {name:?} must be a non-empty name without spaces",
                    host.value
                ),
            );
            ok = false;
        }
    }
    let build = table
        .strings(r, "build")
        .map(|a| a.value)
        .unwrap_or_default();
    for line in &build {
        if line.value.trim().is_empty() {
            r.error(line.span.start, "build command must not be empty");
            ok = false;
        }
    }

    let strategy_at = table.string(r, "strategy");
    let strategy = match strategy_at.as_ref().map(|s| s.value) {
        None | Some("restart") => Strategy::Restart,
        Some("blue-green") => Strategy::BlueGreen,
        Some("canary") => Strategy::Canary,
        Some(other) => {
            let at = strategy_at.as_ref().map_or(0, |s| s.span.start);
            r.error(
                at,
                format!(
                    "unknown strategy {other:?}; expected one of: {}",
                    STRATEGIES.join(", ")
                ),
            );
            ok = false;
            Strategy::Restart
        }
    };
    ok &= table.value("strategy").is_none() || strategy_at.is_some();
    let approve_at = table.string(r, "approve");
    let approve = match approve_at.as_ref().map(|s| s.value) {
        None => Approve::Never,
        Some("cutover") => Approve::Cutover,
        Some("always") => Approve::Always,
        Some(other) => {
            let at = approve_at.as_ref().map_or(0, |s| s.span.start);
            r.error(
                at,
                format!(
                    "unknown approve {other:?}; expected one of: {}",
                    APPROVALS.join(", ")
                ),
            );
            ok = false;
            Approve::Never
        }
    };
    ok &= table.value("approve").is_none() || approve_at.is_some();
    let mut addresses = Vec::new();
    let edge = match table.value("edge") {
        None => None,
        Some(_) => {
            let edge = table
                .table(r, "edge", format!("[scopes.{name}.edge]"))
                .and_then(|t| read_edge(r, name, strategy, &t, &mut addresses));
            ok &= edge.is_some();
            edge
        }
    };
    let canary = match (table.value("canary"), strategy) {
        (None, Strategy::Canary) => {
            let at = strategy_at.as_ref().map_or(0, |s| s.span.start);
            r.error(
                at,
                format!(
                    "scope {name:?} has strategy \"canary\" but no [scopes.{name}.canary] section"
                ),
            );
            ok = false;
            None
        }
        (None, _) => None,
        (Some(v), Strategy::Canary) => {
            let canary = table
                .table(r, "canary", format!("[scopes.{name}.canary]"))
                .and_then(|t| read_canary(r, &t));
            ok &= canary.is_some();
            let _ = v;
            canary
        }
        (Some(v), other) => {
            r.error(
                v.span().start,
                format!(
                    "[scopes.{name}.canary] is for strategy \"canary\"; scope {name:?} has strategy {:?}",
                    other.as_str()
                ),
            );
            ok = false;
            None
        }
    };
    if strategy != Strategy::Restart && table.value("edge").is_none() {
        let at = strategy_at.as_ref().map_or(0, |s| s.span.start);
        r.error(
            at,
            format!(
                "scope {name:?} has strategy {:?} but no [scopes.{name}.edge] section",
                strategy.as_str()
            ),
        );
        ok = false;
    }

    let mut units = Vec::new();
    let native = table
        .table(r, "native", format!("[scopes.{name}.native]"))
        .and_then(|t| read_native(r, name, strategy, &t, &mut units));
    let mut containers = Vec::new();
    let docker = table
        .table(r, "docker", format!("[scopes.{name}.docker]"))
        .and_then(|t| read_docker(r, name, &t, &mut containers));

    let mut docker = docker;
    if let (Some(docker_at), Some(_)) = (table.value("docker"), table.value("edge")) {
        ok &= check_slot_containers(r, name, docker_at.span().start, docker.as_ref());
        // A restart scope's one container publishes its slot's address.
        if let (Strategy::Restart, Some(d), Some(e)) = (strategy, docker.as_mut(), &edge) {
            for c in &mut d.containers {
                let port = c.port.unwrap_or_default();
                c.ports = vec![format!("{}:{}:{port}", e.slots[0].ip(), e.slots[0].port())];
            }
        }
    }

    let mut health = Vec::new();
    if let Some(checks) = table.tables(r, "health", |i| {
        format!("health check {i} of scope {name:?}")
    }) {
        for check in checks {
            match crate::health::parse(r, &check) {
                Some(h) => health.push(h),
                None => ok = false,
            }
            let path = check
                .value(crate::health::http::KEY)
                .filter(|v| v.get_ref().as_str().is_some_and(|p| p.starts_with('/')));
            if let (Some(path), false) = (path, table.value("edge").is_some()) {
                r.error(
                    path.span().start,
                    format!(
                        "health path {:?} of scope {name:?} is checked on the scope's slots: it needs a [scopes.{name}.edge] section, or give a full URL",
                        path.get_ref().as_str().unwrap_or_default()
                    ),
                );
                ok = false;
            }
        }
    }

    let mut effective = defaults.clone();
    if let Some(d) = effective.as_mut() {
        ok &= set_duration(r, table, "health_timeout", false, &mut d.health_timeout);
        ok &= set_duration(r, table, "settle", true, &mut d.settle);
        ok &= set_duration(r, table, "build_timeout", false, &mut d.build_timeout);
        ok &= set_duration(r, table, "job_timeout", false, &mut d.job_timeout);
    } else {
        // Still report bad durations even though the defaults are broken.
        let mut scratch = Duration::ZERO;
        for key in ["health_timeout", "settle", "build_timeout", "job_timeout"] {
            set_duration(r, table, key, key == "settle", &mut scratch);
        }
    }

    if let Some(o) = &owner {
        let (present, section) = match o.value {
            Owner::Native => (table.value("native").is_some(), "native"),
            Owner::Docker => (table.value("docker").is_some(), "docker"),
        };
        if !present {
            r.error(
                o.span.start,
                format!(
                    "scope {name:?} is owned by {section:?} but has no [scopes.{name}.{section}] section"
                ),
            );
            ok = false;
        }
    }
    // A section that is present but invalid has already been reported.
    ok &= table.value("native").is_none() || native.is_some();
    ok &= table.value("docker").is_none() || docker.is_some();

    let scope = match (owner, effective, ok) {
        (Some(owner), Some(d), true) => {
            let mut section_text = String::new();
            canonical_without(raw, GATE_KEYS, &mut section_text);
            let _ = write!(
                section_text,
                "\nhealth_timeout={}\nsettle={}\nbuild_timeout={}",
                humantime::format_duration(d.health_timeout),
                humantime::format_duration(d.settle),
                humantime::format_duration(d.build_timeout),
            );
            Some(Scope {
                name: name.to_owned(),
                owner: owner.value,
                after: Vec::new(), // filled once every scope is known
                paths: paths.iter().map(|p| p.value.to_owned()).collect(),
                hosts: hosts.iter().map(|h| h.value.to_owned()).collect(),
                build: build.iter().map(|b| b.value.to_owned()).collect(),
                strategy,
                approve,
                edge,
                canary,
                native,
                docker,
                health,
                health_timeout: d.health_timeout,
                settle: d.settle,
                build_timeout: d.build_timeout,
                job_timeout: d.job_timeout,
                section_text,
            })
        }
        _ => None,
    };
    Part {
        name: name.to_owned(),
        after,
        units,
        containers,
        addresses,
        scope,
    }
}

fn read_edge(
    r: &mut Reader<'_>,
    scope: &str,
    strategy: Strategy,
    table: &Table<'_, '_>,
    addresses: &mut Vec<At<String>>,
) -> Option<EdgeSpec> {
    table.check_keys(r, EDGE_KEYS);
    let mut ok = true;
    let listen = table.required_string(r, "listen");
    let listen_addr = listen.as_ref().and_then(|l| socket_addr(r, l));
    ok &= listen.is_none() || listen_addr.is_some();
    let slots_at = table.strings(r, "slots");
    let mut slots = Vec::new();
    for slot in slots_at.iter().flat_map(|s| &s.value) {
        match socket_addr(r, slot) {
            Some(addr) => slots.push(addr),
            None => ok = false,
        }
    }
    let wanted = match strategy {
        Strategy::Restart => 1,
        Strategy::BlueGreen | Strategy::Canary => 2,
    };
    match &slots_at {
        Some(list) if list.value.len() != wanted => {
            r.error(
                list.span.start,
                format!(
                    "{} slots lists {} {}; a scope with strategy {:?} has {wanted}",
                    table.label,
                    list.value.len(),
                    if list.value.len() == 1 {
                        "address"
                    } else {
                        "addresses"
                    },
                    strategy.as_str()
                ),
            );
            ok = false;
        }
        Some(_) => {}
        None if table.value("slots").is_none() => {
            r.error(
                table.span.start,
                format!("missing key \"slots\" in {}", table.label),
            );
            ok = false;
        }
        None => ok = false,
    }
    for at in listen.iter().chain(slots_at.iter().flat_map(|s| &s.value)) {
        addresses.push(At {
            span: at.span.clone(),
            value: at.value.to_owned(),
        });
    }
    let mut drain = Duration::from_secs(30);
    let mut hold = Duration::from_secs(10);
    ok &= set_duration(r, table, "drain", true, &mut drain);
    ok &= set_duration(r, table, "hold", false, &mut hold);
    if strategy != Strategy::Restart
        && let Some(h) = table.value("hold")
    {
        r.error(
            h.span().start,
            format!(
                "\"hold\" is for restart scopes; scope {scope:?} has strategy {:?} and never stops serving",
                strategy.as_str()
            ),
        );
        ok = false;
    }
    match (ok, listen_addr) {
        (true, Some(listen)) => Some(EdgeSpec {
            listen,
            slots,
            drain,
            hold,
        }),
        _ => None,
    }
}

fn read_native(
    r: &mut Reader<'_>,
    scope: &str,
    strategy: Strategy,
    table: &Table<'_, '_>,
    units_seen: &mut Vec<At<String>>,
) -> Option<NativeSpec> {
    table.check_keys(r, NATIVE_KEYS);
    let mut ok = true;
    let units = table.strings(r, "units");
    match &units {
        Some(u) if !u.value.is_empty() => {}
        Some(u) => {
            r.error(u.span.start, format!("{} lists no units", table.label));
            ok = false;
        }
        None if table.value("units").is_none() => {
            r.error(table.span.start, format!("{} lists no units", table.label));
            ok = false;
        }
        None => ok = false,
    }
    let units = owned(units.map(|u| u.value).unwrap_or_default());
    for unit in &units {
        let problem = match strategy {
            Strategy::Restart => unit_name_problem(&unit.value),
            _ => template_problem(scope, strategy, &unit.value),
        };
        match problem {
            Some(problem) => {
                r.error(unit.span.start, problem);
                ok = false;
            }
            None => units_seen.push(unit.clone()),
        }
    }
    let unit_files = table
        .strings(r, "unit_files")
        .map(|u| u.value)
        .unwrap_or_default();
    for file in &unit_files {
        ok &= check_repo_path(r, file);
    }
    ok.then(|| NativeSpec {
        units: values(&units),
        unit_files: unit_files.iter().map(|f| f.value.to_owned()).collect(),
    })
}

fn unit_name_problem(unit: &str) -> Option<String> {
    let Some(suffix) = UNIT_SUFFIXES.iter().find(|s| unit.ends_with(*s)) else {
        return Some(format!(
            "unit {unit:?} has no known suffix; expected one of: {}",
            UNIT_SUFFIXES.join(", ")
        ));
    };
    let stem = &unit[..unit.len() - suffix.len()];
    let valid_chars = stem
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '-' | '\\' | '@'));
    if stem.is_empty() || !valid_chars || unit.len() > 255 || stem.matches('@').count() > 1 {
        return Some(format!("invalid unit name {unit:?}"));
    }
    if stem.ends_with('@') {
        return Some(format!(
            "unit {unit:?} is a template; name an instance such as \"{stem}1{suffix}\""
        ));
    }
    None
}

fn read_canary(r: &mut Reader<'_>, table: &Table<'_, '_>) -> Option<CanarySpec> {
    table.check_keys(r, CANARY_KEYS);
    let mut ok = true;
    let mut steps = Vec::new();
    match table.tables(r, "steps", |i| format!("step {i} of {}", table.label)) {
        Some(list) if list.is_empty() => {
            let at = table
                .value("steps")
                .map_or(table.span.start, |v| v.span().start);
            r.error(at, format!("{} lists no steps", table.label));
            ok = false;
        }
        Some(list) => {
            let mut last = 0;
            for step in &list {
                step.check_keys(r, STEP_KEYS);
                let weight = match step.integer(r, "weight") {
                    Some(w) if (1..=99).contains(&w.value) && w.value as u32 > last => {
                        last = w.value as u32;
                        Some(last)
                    }
                    Some(w) => {
                        r.error(
                            w.span.start,
                            format!(
                                "weight {} in {} must be 1 to 99 and above the step before (100 follows the last step)",
                                w.value, step.label
                            ),
                        );
                        None
                    }
                    None if step.value("weight").is_none() => {
                        r.error(
                            step.span.start,
                            format!("missing key \"weight\" in {}", step.label),
                        );
                        None
                    }
                    None => None,
                };
                let mut soak = Duration::ZERO;
                if step.value("soak").is_none() {
                    r.error(
                        step.span.start,
                        format!("missing key \"soak\" in {}", step.label),
                    );
                    ok = false;
                }
                ok &= set_duration(r, step, "soak", false, &mut soak);
                match weight {
                    Some(weight) => steps.push(CanaryStep { weight, soak }),
                    None => ok = false,
                }
            }
        }
        None if table.value("steps").is_none() => {
            r.error(
                table.span.start,
                format!("missing key \"steps\" in {}", table.label),
            );
            ok = false;
        }
        None => ok = false,
    }
    let mut interval = Duration::from_secs(10);
    ok &= set_duration(r, table, "interval", false, &mut interval);
    let mut max_p95 = None;
    if table.value("max_p95").is_some() {
        let mut p95 = Duration::ZERO;
        ok &= set_duration(r, table, "max_p95", false, &mut p95);
        max_p95 = Some(p95);
    }
    let max_error_rate = match table.float(r, "max_error_rate") {
        Some(rate) if (0.0..=1.0).contains(&rate.value) => rate.value,
        Some(rate) => {
            r.error(
                rate.span.start,
                format!("max_error_rate {} must be between 0 and 1", rate.value),
            );
            ok = false;
            0.0
        }
        None => {
            ok &= table.value("max_error_rate").is_none();
            0.01
        }
    };
    let mut positive = |key: &str, default: i128| match table.integer(r, key) {
        Some(n) if n.value >= 1 && n.value <= i128::from(u32::MAX) => n.value,
        Some(n) => {
            r.error(
                n.span.start,
                format!("{key} {} must be at least 1", n.value),
            );
            ok = false;
            default
        }
        None => {
            ok &= table.value(key).is_none();
            default
        }
    };
    let min_requests = positive("min_requests", 20) as u64;
    let failure_limit = positive("failure_limit", 2) as u32;
    ok.then_some(CanarySpec {
        steps,
        interval,
        max_error_rate,
        max_p95,
        min_requests,
        failure_limit,
    })
}

/// A slotted scope's units are templates whose instances 0 and 1 are its
/// slots.
fn template_problem(scope: &str, strategy: Strategy, unit: &str) -> Option<String> {
    match unit.split_once("@.") {
        Some((stem, suffix)) if !stem.is_empty() && suffix == "service" => {
            unit_name_problem(&super::slot_instance(unit, 0))
        }
        _ => {
            let stem = unit.strip_suffix(".service").unwrap_or(unit);
            Some(format!(
                "unit {unit:?} of scope {scope:?} (strategy {:?}) must be a service template such as \"{stem}@.service\": its instances @0 and @1 are the two slots",
                strategy.as_str()
            ))
        }
    }
}

fn read_docker(
    r: &mut Reader<'_>,
    scope: &str,
    table: &Table<'_, '_>,
    names_seen: &mut Vec<At<String>>,
) -> Option<DockerSpec> {
    table.check_keys(r, DOCKER_KEYS);
    let tables = table.tables(r, "containers", |i| {
        format!("container {i} of scope {scope:?}")
    });
    let Some(tables) = tables else {
        if table.value("containers").is_none() {
            r.error(
                table.span.start,
                format!("{} lists no containers", table.label),
            );
        }
        return None;
    };
    if tables.is_empty() {
        let at = table
            .value("containers")
            .map_or(table.span.start, |v| v.span().start);
        r.error(at, format!("{} lists no containers", table.label));
        return None;
    }
    let mut containers = Vec::new();
    let mut ok = true;
    for t in &tables {
        match read_container(r, t, names_seen) {
            Some(c) => containers.push(c),
            None => ok = false,
        }
    }
    ok.then_some(DockerSpec { containers })
}

/// A slotted scope's docker form: one container, whose slot address is
/// published to its `port` (so it lists no `ports` of its own).
fn check_slot_containers(
    r: &mut Reader<'_>,
    scope: &str,
    at: usize,
    docker: Option<&DockerSpec>,
) -> bool {
    let Some(docker) = docker else {
        return true; // reported where it is invalid
    };
    let problem = match docker.containers.as_slice() {
        [one] if one.port.is_none() => Some(format!(
            "container {:?} of scope {scope:?} needs \"port\": the container port its slot's address is published to",
            one.name
        )),
        [one] if !one.ports.is_empty() => Some(format!(
            "container {:?} of scope {scope:?} must not list \"ports\": each slot's address is published to its \"port\"",
            one.name
        )),
        [_] => None,
        _ => Some(format!(
            "the docker form of scope {scope:?}, behind the edge, has one container"
        )),
    };
    if let Some(problem) = &problem {
        r.error(at, problem.clone());
    }
    problem.is_none()
}

fn valid_container_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn read_container(
    r: &mut Reader<'_>,
    t: &Table<'_, '_>,
    names_seen: &mut Vec<At<String>>,
) -> Option<ContainerSpec> {
    t.check_keys(r, CONTAINER_KEYS);
    let mut ok = true;
    let name = t.required_string(r, "name");
    if let Some(n) = &name {
        if valid_container_name(n.value) {
            names_seen.push(At {
                span: n.span.clone(),
                value: n.value.to_owned(),
            });
        } else {
            r.error(
                n.span.start,
                format!(
                    "invalid container name {:?}; use letters, digits, \"_\", \".\" and \"-\", starting with a letter or digit",
                    n.value
                ),
            );
            ok = false;
        }
    }
    let image = t.required_string(r, "image");
    if let Some(i) = &image
        && i.value.trim().is_empty()
    {
        r.error(i.span.start, "image must not be empty");
        ok = false;
    }
    let dockerfile = t.string(r, "dockerfile");
    if let Some(d) = &dockerfile {
        ok &= check_repo_path(r, d);
    }
    let context = t.string(r, "context");
    if let Some(c) = &context {
        ok &= check_repo_path(r, c);
    }
    let ports = t.strings(r, "ports").map(|p| p.value).unwrap_or_default();
    let port = match t.integer(r, "port") {
        Some(p) if (1..=65535).contains(&p.value) => Some(p.value as u16),
        Some(p) => {
            r.error(
                p.span.start,
                format!("port {} is not a port number (1 to 65535)", p.value),
            );
            ok = false;
            None
        }
        None => {
            ok &= t.value("port").is_none();
            None
        }
    };
    let volumes = t.strings(r, "volumes").map(|v| v.value).unwrap_or_default();
    let mut env = BTreeMap::new();
    if let Some(table) = t.table(r, "env", format!("env of {}", t.label)) {
        for (key, value) in table.map.iter() {
            match value.get_ref() {
                DeValue::String(s) => {
                    env.insert(key.get_ref().to_string(), s.to_string());
                }
                other => {
                    r.error(
                        value.span().start,
                        format!(
                            "env value {:?} must be a string, found {}",
                            key.get_ref(),
                            super::reader::kind_of(other)
                        ),
                    );
                    ok = false;
                }
            }
        }
    }
    let env_file = t.string(r, "env_file");
    if let Some(e) = &env_file
        && !e.value.starts_with('/')
    {
        r.error(
            e.span.start,
            format!("env_file {:?} must be an absolute host path", e.value),
        );
        ok = false;
    }
    let command = t.strings(r, "command");
    if let Some(c) = &command
        && c.value.is_empty()
    {
        r.error(c.span.start, "\"command\" must not be empty");
        ok = false;
    }
    let restart = t.string(r, "restart");
    if let Some(p) = &restart
        && !RESTART_POLICIES.contains(&p.value)
    {
        r.error(
            p.span.start,
            format!(
                "restart policy {:?} is not one of: {}",
                p.value,
                RESTART_POLICIES.join(", ")
            ),
        );
        ok = false;
    }
    for key in ["ports", "volumes", "command"] {
        ok &= t
            .value(key)
            .is_none_or(|v| matches!(v.get_ref(), DeValue::Array(_)));
    }
    let strings = |items: Vec<At<&str>>| items.into_iter().map(|i| i.value.to_owned()).collect();
    Some(ContainerSpec {
        name: name?.value.to_owned(),
        image: image?.value.to_owned(),
        dockerfile: dockerfile.map(|d| d.value.to_owned()),
        context: context.map_or_else(|| ".".to_owned(), |c| c.value.to_owned()),
        ports: strings(ports),
        env,
        env_file: env_file.map(|e| e.value.to_owned()),
        volumes: strings(volumes),
        command: command.map(|c| strings(c.value)),
        restart: restart.map_or_else(|| "unless-stopped".to_owned(), |p| p.value.to_owned()),
        port,
    })
    .filter(|_| ok)
}

/// Reports `after` entries that name an unknown scope or the scope itself,
/// drops them, dedupes the rest and copies them into the scopes.
fn check_after(r: &mut Reader<'_>, parts: &mut [Part]) {
    let known: BTreeSet<String> = parts.iter().map(|p| p.name.clone()).collect();
    for part in parts.iter_mut() {
        let mut kept: Vec<At<String>> = Vec::new();
        for target in std::mem::take(&mut part.after) {
            if target.value == part.name {
                r.error(
                    target.span.start,
                    format!("scope {:?} comes after itself", part.name),
                );
            } else if !known.contains(&target.value) {
                r.error(
                    target.span.start,
                    format!(
                        "scope {:?} comes after unknown scope {:?}",
                        part.name, target.value
                    ),
                );
            } else if !kept.iter().any(|k| k.value == target.value) {
                kept.push(target);
            }
        }
        if let Some(scope) = part.scope.as_mut() {
            scope.after = values(&kept);
        }
        part.after = kept;
    }
}

/// Reports each later occurrence of a unit or container name already used
/// (in file order), naming the scope of the first one.
fn check_unique(
    r: &mut Reader<'_>,
    parts: &[Part],
    names: impl Fn(&Part) -> &Vec<At<String>>,
    what: &str,
    verb: &str,
) {
    let mut all: Vec<(&At<String>, &str)> = parts
        .iter()
        .flat_map(|p| names(p).iter().map(move |n| (n, p.name.as_str())))
        .collect();
    all.sort_by_key(|(n, _)| n.span.start);
    let mut first: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, scope) in all {
        if let Some(owner) = first.get(name.value.as_str()) {
            r.error(
                name.span.start,
                format!(
                    "{what} {:?} is already {verb} in scope {owner:?}",
                    name.value
                ),
            );
        } else {
            first.insert(&name.value, scope);
        }
    }
}

/// The scopes of `remaining` that wait on none of `remaining`.
fn ready<'a>(
    remaining: &BTreeSet<&'a str>,
    deps: &BTreeMap<&str, &Vec<At<String>>>,
) -> Vec<&'a str> {
    remaining
        .iter()
        .copied()
        .filter(|n| {
            deps[n]
                .iter()
                .all(|d| !remaining.contains(d.value.as_str()))
        })
        .collect()
}

/// Layers scopes into waves by `after`; reports each cycle once, at the
/// `after` entry of its alphabetically first scope.
fn order(r: &mut Reader<'_>, parts: &[Part]) -> Vec<Vec<String>> {
    let deps: BTreeMap<&str, &Vec<At<String>>> =
        parts.iter().map(|p| (p.name.as_str(), &p.after)).collect();
    let mut remaining: BTreeSet<&str> = deps.keys().copied().collect();
    let mut waves = Vec::new();
    loop {
        let wave = ready(&remaining, &deps);
        if wave.is_empty() {
            break;
        }
        for n in &wave {
            remaining.remove(n);
        }
        waves.push(wave.into_iter().map(str::to_owned).collect());
    }
    // Every scope left depends on a scope left: walk to find a cycle.
    while let Some(&start) = remaining.first() {
        let mut path: Vec<&str> = Vec::new();
        let mut current = start;
        let cycle = loop {
            if let Some(i) = path.iter().position(|p| *p == current) {
                break path.split_off(i);
            }
            path.push(current);
            let next = deps[current]
                .iter()
                .map(|d| d.value.as_str())
                .filter(|d| remaining.contains(d))
                .min();
            match next {
                Some(next) => current = next,
                None => break Vec::new(),
            }
        };
        if cycle.is_empty() {
            remaining.remove(start);
            continue;
        }
        let min = (0..cycle.len())
            .min_by_key(|&i| cycle[i])
            .expect("a cycle has at least one scope");
        let mut rotated: Vec<&str> = cycle[min..].iter().chain(&cycle[..min]).copied().collect();
        let at = deps[rotated[0]]
            .iter()
            .find(|d| d.value == rotated[1])
            .map_or(0, |d| d.span.start);
        rotated.push(rotated[0]);
        r.error(
            at,
            format!("scopes form a cycle in \"after\": {}", rotated.join(" -> ")),
        );
        for n in &cycle {
            remaining.remove(n);
        }
        // Drop scopes that only waited on the cycle.
        loop {
            let free = ready(&remaining, &deps);
            if free.is_empty() {
                break;
            }
            for n in free {
                remaining.remove(n);
            }
        }
    }
    waves
}

/// A canonical rendering of a TOML value: keys sorted, one fixed spelling
/// per value, so formatting and key order do not change it.
/// `canonical` of a table without the top-level keys in `skip`.
fn canonical_without(value: &DeValue<'_>, skip: &[&str], out: &mut String) {
    match value {
        DeValue::Table(map) => {
            let mut entries: Vec<_> = map
                .iter()
                .filter(|(k, _)| !skip.contains(&k.get_ref().as_ref()))
                .collect();
            entries.sort_by(|a, b| a.0.get_ref().cmp(b.0.get_ref()));
            canonical_entries(
                entries.into_iter().map(|(k, v)| (k.get_ref(), v.get_ref())),
                out,
            );
        }
        other => canonical(other, out),
    }
}

/// `{"k"=v,…}` of entries already in key order.
fn canonical_entries<'a, 'de: 'a>(
    entries: impl Iterator<Item = (&'a std::borrow::Cow<'de, str>, &'a DeValue<'de>)>,
    out: &mut String,
) {
    out.push('{');
    for (i, (k, v)) in entries.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{:?}=", k.as_ref());
        canonical(v, out);
    }
    out.push('}');
}

fn canonical(value: &DeValue<'_>, out: &mut String) {
    match value {
        DeValue::String(s) => {
            let _ = write!(out, "{:?}", s.as_ref());
        }
        DeValue::Integer(i) => match integer_of(value) {
            Some(n) => {
                let _ = write!(out, "{n}");
            }
            None => out.push_str(i.as_str()),
        },
        DeValue::Float(f) => match f.as_str().replace('_', "").parse::<f64>() {
            Ok(x) => {
                let _ = write!(out, "{x:?}");
            }
            Err(_) => out.push_str(f.as_str()),
        },
        DeValue::Boolean(b) => {
            let _ = write!(out, "{b}");
        }
        DeValue::Datetime(d) => {
            let _ = write!(out, "{d}");
        }
        DeValue::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item.get_ref(), out);
            }
            out.push(']');
        }
        DeValue::Table(_) => canonical_without(value, &[], out),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::health::{HealthCheck, HealthKind};

    const FILE: &str = "deploy/moorline.toml";

    /// A manifest that exercises every section; used for the happy path and
    /// as the base that error cases and the property tests edit.
    pub(crate) const EXAMPLE: &str = r#"version = 1

[defaults]
health_timeout = "90s"
keep_releases = 3

[scopes.infra]
owner = "docker"

[scopes.infra.docker]
[[scopes.infra.docker.containers]]
name = "nats"
image = "nats:2.10"
ports = ["127.0.0.1:4222:4222"]

[scopes.api]
owner = "native"
after = ["infra"]
paths = ["services/api/", "packages/"]
build = ["./build-api.sh"]
settle = "1s"

[scopes.api.native]
units = ["app-api.service", "app-api.socket"]
unit_files = ["deploy/units/app-api.service"]

[scopes.api.docker]
[[scopes.api.docker.containers]]
name = "app-api"
image = "app-api"
dockerfile = "deploy/api.Dockerfile"
env = { API_PORT = "4000" }
command = ["/bin/api"]
restart = "always"

[[scopes.api.health]]
http = "http://127.0.0.1:4000/health"
body_contains = "ok"

[[scopes.api.health]]
tcp = "127.0.0.1:4000"
timeout = "2s"

[scopes.web]
owner = "native"
after = ["api"]
[scopes.web.native]
units = ["app-web.service"]
[[scopes.web.health]]
exec = ["./check.sh", "web"]
interval = "1s"

[scopes.workers]
owner = "native"
after = ["infra"]
health_timeout = "5m"
build_timeout = "1h"
[scopes.workers.native]
units = ["app-worker@1.service", "app-worker@2.service"]
"#;

    fn errors(src: &str) -> String {
        match parse(FILE, src.as_bytes()) {
            Ok(_) => "parsed".to_owned(),
            Err(d) => d.to_string(),
        }
    }

    #[test]
    fn example_parses_into_scopes_and_waves() {
        let m = parse(FILE, EXAMPLE.as_bytes()).expect("the example is valid");

        assert_eq!(m.defaults.keep_releases, 3);
        assert_eq!(m.defaults.health_timeout, Duration::from_secs(90));
        assert_eq!(
            m.waves,
            vec![vec!["infra"], vec!["api", "workers"], vec!["web"]]
        );
        let api = &m.scopes["api"];
        assert_eq!(api.owner, Owner::Native);
        assert_eq!(api.after, vec!["infra"]);
        assert_eq!(api.paths, vec!["services/api/", "packages/"]);
        assert_eq!(api.build, vec!["./build-api.sh"]);
        assert_eq!(
            (api.health_timeout, api.settle, api.build_timeout),
            (
                Duration::from_secs(90),
                Duration::from_secs(1),
                Duration::from_secs(600)
            )
        );
        assert_eq!(
            api.native,
            Some(NativeSpec {
                units: vec!["app-api.service".into(), "app-api.socket".into()],
                unit_files: vec!["deploy/units/app-api.service".into()],
            })
        );
        assert_eq!(
            api.docker,
            Some(DockerSpec {
                containers: vec![ContainerSpec {
                    name: "app-api".into(),
                    image: "app-api".into(),
                    dockerfile: Some("deploy/api.Dockerfile".into()),
                    context: ".".into(),
                    ports: vec![],
                    env: BTreeMap::from([("API_PORT".into(), "4000".into())]),
                    env_file: None,
                    volumes: vec![],
                    command: Some(vec!["/bin/api".into()]),
                    restart: "always".into(),
                    port: None,
                }]
            })
        );
        assert_eq!(
            api.health,
            vec![
                HealthCheck {
                    kind: HealthKind::Http(crate::health::http::Http {
                        url: "http://127.0.0.1:4000/health".into(),
                        expect_status: 200,
                        body_contains: Some("ok".into()),
                    }),
                    timeout: Duration::from_secs(5),
                    interval: Duration::from_millis(500),
                },
                HealthCheck {
                    kind: HealthKind::Tcp(crate::health::tcp::Tcp {
                        addr: "127.0.0.1:4000".into()
                    }),
                    timeout: Duration::from_secs(2),
                    interval: Duration::from_millis(500),
                },
            ]
        );
        let web = &m.scopes["web"];
        assert_eq!(
            web.health,
            vec![HealthCheck {
                kind: HealthKind::Exec(crate::health::exec::Exec {
                    argv: vec!["./check.sh".into(), "web".into()]
                }),
                timeout: Duration::from_secs(5),
                interval: Duration::from_secs(1),
            }]
        );
        let infra = &m.scopes["infra"];
        assert_eq!(infra.owner, Owner::Docker);
        let nats = &infra.docker.as_ref().expect("infra has docker").containers[0];
        assert_eq!(nats.restart, "unless-stopped");
        assert_eq!(nats.ports, vec!["127.0.0.1:4222:4222"]);
        let workers = &m.scopes["workers"];
        assert_eq!(
            (
                workers.health_timeout,
                workers.settle,
                workers.build_timeout
            ),
            (
                Duration::from_secs(300),
                Duration::from_secs(3),
                Duration::from_secs(3600)
            )
        );
    }

    #[test]
    fn defaults_apply_without_a_defaults_table() {
        let m = parse(
            FILE,
            b"version = 1\n[scopes.a]\nowner = \"native\"\n[scopes.a.native]\nunits = [\"a.service\"]\n",
        )
        .expect("minimal manifest is valid");
        assert_eq!(m.defaults.keep_releases, 5);
        let a = &m.scopes["a"];
        assert_eq!(
            (a.health_timeout, a.settle, a.build_timeout),
            (
                Duration::from_secs(60),
                Duration::from_secs(3),
                Duration::from_secs(600)
            )
        );
        assert_eq!(m.waves, vec![vec!["a"]]);
    }

    /// The scope `api` of a manifest whose only scope is `body`.
    fn section_text(body: &str) -> String {
        let src = format!("version = 1\n{body}");
        let m = parse(FILE, src.as_bytes()).expect("section test manifest is valid");
        m.scopes["api"].section_text.clone()
    }

    #[test]
    fn section_text_ignores_formatting_but_not_values() {
        let base = section_text(
            "[scopes.api]\nowner = \"native\"\npaths = [\"a/\", \"b/\"]\n[scopes.api.native]\nunits = [\"api.service\"]\n",
        );
        let reformatted = section_text(
            "# the api\n[scopes.api.native]\nunits=[ 'api.service', ]  # units\n\n[scopes.api]\npaths = [\n  \"a/\",\n  \"b/\",\n]\nowner   =   \"native\"\n",
        );
        assert_eq!(base, reformatted);
        let dotted = section_text(
            "[scopes.api]\nnative.units = [\"api.service\"]\nowner = \"native\"\npaths = [\"a/\", \"b/\"]\n",
        );
        assert_eq!(base, dotted);
        let changed = [
            "[scopes.api]\nowner = \"native\"\npaths = [\"b/\", \"a/\"]\n[scopes.api.native]\nunits = [\"api.service\"]\n",
            "[scopes.api]\nowner = \"native\"\npaths = [\"a/\", \"b/\"]\n[scopes.api.native]\nunits = [\"api2.service\"]\n",
            "[scopes.api]\nowner = \"native\"\npaths = [\"a/\", \"b/\"]\nsettle = \"3s\"\n[scopes.api.native]\nunits = [\"api.service\"]\n",
            "[defaults]\nsettle = \"4s\"\n[scopes.api]\nowner = \"native\"\npaths = [\"a/\", \"b/\"]\n[scopes.api.native]\nunits = [\"api.service\"]\n",
            "[defaults]\nhealth_timeout = \"61s\"\n[scopes.api]\nowner = \"native\"\npaths = [\"a/\", \"b/\"]\n[scopes.api.native]\nunits = [\"api.service\"]\n",
            "[defaults]\nbuild_timeout = \"11m\"\n[scopes.api]\nowner = \"native\"\npaths = [\"a/\", \"b/\"]\n[scopes.api.native]\nunits = [\"api.service\"]\n",
        ];
        for body in changed {
            assert_ne!(base, section_text(body), "{body}");
        }
        // keep_releases is not part of any scope.
        let keep = section_text(
            "[defaults]\nkeep_releases = 9\n[scopes.api]\nowner = \"native\"\npaths = [\"a/\", \"b/\"]\n[scopes.api.native]\nunits = [\"api.service\"]\n",
        );
        assert_eq!(base, keep);
        // An explicit value equal to the default is the same deployment.
        let explicit = section_text(
            "[scopes.api]\nowner = \"native\"\npaths = [\"a/\", \"b/\"]\n[scopes.api.native]\nunits = [\"api.service\"]\n",
        );
        assert_eq!(base, explicit);
    }

    /// A valid scope `ok` appended so single-scope errors stand alone.
    const OK_SCOPE: &str =
        "[scopes.ok]\nowner = \"native\"\n[scopes.ok.native]\nunits = [\"ok.service\"]\n";

    #[test]
    fn error_messages() {
        let v = "version = 1\n";
        let cases: Vec<(String, &str)> = vec![
            (
                format!("{v}[scopes.api]\nownr = \"native\"\n"),
                "deploy/moorline.toml:2:1: missing key \"owner\" in [scopes.api]\n\
                 deploy/moorline.toml:3:1: unknown key \"ownr\" in [scopes.api]; expected one of: owner, after, paths, build, native, docker, health, health_timeout, settle, build_timeout, job_timeout, hosts, strategy, edge, canary, approve",
            ),
            (
                format!("{v}[defaults]\nkeep_releases = \"5\"\n{OK_SCOPE}"),
                "deploy/moorline.toml:3:17: \"keep_releases\" must be an integer, found a string",
            ),
            (
                format!("{v}[defaults]\nkeep_releases = 0\n{OK_SCOPE}"),
                "deploy/moorline.toml:3:17: keep_releases must be at least 1, found 0",
            ),
            (
                format!("version = 2\n{OK_SCOPE}"),
                "deploy/moorline.toml:1:11: unsupported manifest version 2; this moorline reads version 1",
            ),
            (
                OK_SCOPE.to_owned(),
                "deploy/moorline.toml:1:1: missing key \"version\" at the top level; this moorline reads version 1",
            ),
            (
                v.to_owned(),
                "deploy/moorline.toml:1:1: manifest defines no scopes; add a [scopes.NAME] table",
            ),
            (
                format!("{v}scopes = {{}}\n"),
                "deploy/moorline.toml:2:10: manifest defines no scopes; add a [scopes.NAME] table",
            ),
            (
                format!(
                    "{v}[scopes.Api]\nowner = \"native\"\n[scopes.Api.native]\nunits = [\"a.service\"]\n"
                ),
                "deploy/moorline.toml:2:9: invalid scope name \"Api\"; use lowercase letters, digits, \"_\" and \"-\", starting with a letter or digit",
            ),
            (
                format!("{v}[scopes]\napi = 3\n"),
                "deploy/moorline.toml:3:7: scope \"api\" must be a table, found an integer",
            ),
            (
                format!("{v}[scopes.api]\nowner = \"podman\"\n"),
                "deploy/moorline.toml:3:9: unknown owner \"podman\"; expected \"native\" or \"docker\"",
            ),
            (
                format!("{v}[scopes.api]\nowner = \"native\"\n"),
                "deploy/moorline.toml:3:9: scope \"api\" is owned by \"native\" but has no [scopes.api.native] section",
            ),
            (
                format!(
                    "{v}[scopes.api]\nowner = \"docker\"\n[scopes.api.native]\nunits = [\"a.service\"]\n"
                ),
                "deploy/moorline.toml:3:9: scope \"api\" is owned by \"docker\" but has no [scopes.api.docker] section",
            ),
            (
                format!(
                    "{v}[scopes.ok]\nafter = [\"apx\"]\nowner = \"native\"\n[scopes.ok.native]\nunits = [\"ok.service\"]\n"
                ),
                "deploy/moorline.toml:3:10: scope \"ok\" comes after unknown scope \"apx\"",
            ),
            (
                format!(
                    "{v}[scopes.ok]\nowner = \"native\"\nafter = [\"ok\"]\n[scopes.ok.native]\nunits = [\"ok.service\"]\n"
                ),
                "deploy/moorline.toml:4:10: scope \"ok\" comes after itself",
            ),
            (
                format!(
                    "{v}[scopes.web]\nowner = \"native\"\nafter = [\"api\"]\n[scopes.web.native]\nunits = [\"w.service\"]\n\
                     [scopes.api]\nowner = \"native\"\nafter = [\"web\"]\n[scopes.api.native]\nunits = [\"a.service\"]\n"
                ),
                "deploy/moorline.toml:9:10: scopes form a cycle in \"after\": api -> web -> api",
            ),
            (
                format!(
                    "{v}[scopes.api]\nowner = \"native\"\npaths = [\"../etc/passwd\", \"/etc/passwd\", \"a/../..\"]\n[scopes.api.native]\nunits = [\"a.service\"]\n"
                ),
                "deploy/moorline.toml:4:10: path \"../etc/passwd\" leaves the repository\n\
                 deploy/moorline.toml:4:27: path \"/etc/passwd\" must be relative to the repository\n\
                 deploy/moorline.toml:4:42: path \"a/../..\" leaves the repository",
            ),
            (
                format!("{v}[scopes.api]\nowner = \"native\"\n[scopes.api.native]\nunits = []\n"),
                "deploy/moorline.toml:5:9: [scopes.api.native] lists no units",
            ),
            (
                format!("{v}[scopes.api]\nowner = \"native\"\n[scopes.api.native]\n"),
                "deploy/moorline.toml:4:1: [scopes.api.native] lists no units",
            ),
            (
                format!(
                    "{v}[scopes.api]\nowner = \"native\"\n[scopes.api.native]\nunits = [\"api\", \"a b.service\", \"t@.timer\"]\nunit_files = [\"/x\"]\n"
                ),
                "deploy/moorline.toml:5:10: unit \"api\" has no known suffix; expected one of: .service, .socket, .timer, .target, .path\n\
                 deploy/moorline.toml:5:17: invalid unit name \"a b.service\"\n\
                 deploy/moorline.toml:5:32: unit \"t@.timer\" is a template; name an instance such as \"t@1.timer\"\n\
                 deploy/moorline.toml:6:15: path \"/x\" must be relative to the repository",
            ),
            (
                format!(
                    "{v}{OK_SCOPE}[scopes.two]\nowner = \"native\"\n[scopes.two.native]\nunits = [\"ok.service\"]\n"
                ),
                "deploy/moorline.toml:9:10: unit \"ok.service\" is already listed in scope \"ok\"",
            ),
            (
                format!(
                    "{v}[scopes.api]\nowner = \"docker\"\n[scopes.api.docker]\ncontainers = []\n"
                ),
                "deploy/moorline.toml:5:14: [scopes.api.docker] lists no containers",
            ),
            (
                format!("{v}[scopes.api]\nowner = \"docker\"\n[scopes.api.docker]\n"),
                "deploy/moorline.toml:4:1: [scopes.api.docker] lists no containers",
            ),
            (
                format!(
                    "{v}[scopes.api]\nowner = \"docker\"\n[[scopes.api.docker.containers]]\nname = \"-x\"\nimge = \"a\"\n\
                     restart = \"sometimes\"\nenv = {{ A = 1 }}\nenv_file = \"x.env\"\ncommand = []\ncontext = \"..\"\n"
                ),
                "deploy/moorline.toml:4:1: missing key \"image\" in container 1 of scope \"api\"\n\
                 deploy/moorline.toml:5:8: invalid container name \"-x\"; use letters, digits, \"_\", \".\" and \"-\", starting with a letter or digit\n\
                 deploy/moorline.toml:6:1: unknown key \"imge\" in container 1 of scope \"api\"; expected one of: name, image, dockerfile, context, ports, env, env_file, volumes, command, restart, port\n\
                 deploy/moorline.toml:7:11: restart policy \"sometimes\" is not one of: no, always, unless-stopped, on-failure\n\
                 deploy/moorline.toml:8:13: env value \"A\" must be a string, found an integer\n\
                 deploy/moorline.toml:9:12: env_file \"x.env\" must be an absolute host path\n\
                 deploy/moorline.toml:10:11: \"command\" must not be empty\n\
                 deploy/moorline.toml:11:11: path \"..\" leaves the repository",
            ),
            (
                format!(
                    "{v}[scopes.api]\nowner = \"docker\"\n[[scopes.api.docker.containers]]\nname = \"c\"\nimage = \"i\"\n\
                     [[scopes.api.docker.containers]]\nname = \"c\"\nimage = \"i\"\n"
                ),
                "deploy/moorline.toml:8:8: container \"c\" is already defined in scope \"api\"",
            ),
            (
                format!(
                    "{v}{OK_SCOPE}[[scopes.ok.health]]\nhttp = \"http://x\"\ntcp = \"x:1\"\n[[scopes.ok.health]]\n"
                ),
                "deploy/moorline.toml:6:1: health check 1 of scope \"ok\" must have exactly one of http, tcp, exec\n\
                 deploy/moorline.toml:9:1: health check 2 of scope \"ok\" must have exactly one of http, tcp, exec",
            ),
            (
                format!(
                    "{v}{OK_SCOPE}[[scopes.ok.health]]\nhttp = \"ftp://x\"\nexpect_status = 600\n\
                     [[scopes.ok.health]]\ntcp = \"localhost\"\nbody_contains = \"x\"\n[[scopes.ok.health]]\nexec = []\n\
                     [[scopes.ok.health]]\nexec = [\"true\"]\ntimeout = \"0s\"\ninterval = \"5 minutes\"\n"
                ),
                "deploy/moorline.toml:7:8: health url \"ftp://x\" must start with http:// or https://\n\
                 deploy/moorline.toml:8:17: expect_status 600 is not an HTTP status code (100 to 599)\n\
                 deploy/moorline.toml:10:7: tcp address \"localhost\" must be \"host:port\", e.g. \"127.0.0.1:4000\"\n\
                 deploy/moorline.toml:11:1: \"body_contains\" only applies to http checks\n\
                 deploy/moorline.toml:13:8: \"exec\" must not be empty\n\
                 deploy/moorline.toml:16:11: \"timeout\" must be longer than zero\n\
                 deploy/moorline.toml:17:12: duration \"5 minutes\" does not parse; use e.g. \"500ms\", \"30s\", \"5m\"",
            ),
            (
                format!(
                    "{v}[defaults]\nsettle = \"3 s\"\nbuild_timeout = 5\n[scopes.ok]\nowner = \"native\"\nhealth_timeout = \"1d\"\n[scopes.ok.native]\nunits = [\"ok.service\"]\n"
                ),
                "deploy/moorline.toml:3:10: duration \"3 s\" does not parse; use e.g. \"500ms\", \"30s\", \"5m\"\n\
                 deploy/moorline.toml:4:17: \"build_timeout\" must be a string, found an integer\n\
                 deploy/moorline.toml:7:18: duration \"1d\" does not parse; use e.g. \"500ms\", \"30s\", \"5m\"",
            ),
            (
                format!(
                    "{v}[scopes.ok]\npaths = \"a/\"\nbuild = [\"make\", 3]\nowner = \"native\"\n[scopes.ok.native]\nunits = [\"ok.service\"]\n"
                ),
                "deploy/moorline.toml:3:9: \"paths\" must be an array of strings, found a string\n\
                 deploy/moorline.toml:4:18: elements of \"build\" must be strings, found an integer",
            ),
            (
                format!("{v}verison = 1\n{OK_SCOPE}"),
                "deploy/moorline.toml:2:1: unknown key \"verison\" at the top level; expected one of: version, defaults, scopes",
            ),
            (
                format!("{v}{OK_SCOPE}[scopes.ok]\n"),
                "deploy/moorline.toml:6:9: invalid TOML: duplicate key \"ok\"",
            ),
            (
                format!("{v}version = 1\n{OK_SCOPE}"),
                "deploy/moorline.toml:2:1: invalid TOML: duplicate key \"version\"",
            ),
            (
                "version = 1\n[scopes.api\n".to_owned(),
                "deploy/moorline.toml:2:12: invalid TOML: unclosed table, expected `]`",
            ),
            (
                "version 1\n".to_owned(),
                "deploy/moorline.toml:1:9: invalid TOML: key with no value, expected `=`",
            ),
        ];
        let failures: Vec<String> = cases
            .iter()
            .filter(|(src, want)| errors(src) != *want)
            .map(|(src, want)| format!("input:\n{src}\nwant:\n{want}\ngot:\n{}\n", errors(src)))
            .collect();
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn non_utf8_points_at_the_first_bad_byte() {
        let mut src = b"version = 1\n# caf\xc3\xa9 ".to_vec();
        src.extend_from_slice(b"\xff\xfe\n");
        assert_eq!(
            parse(FILE, &src).map(|_| ()).map_err(|d| d.to_string()),
            Err("deploy/moorline.toml:2:8: file is not valid UTF-8".to_owned())
        );
    }

    #[test]
    fn huge_file_is_refused() {
        let mut src = b"version = 1\n".to_vec();
        src.resize(1024 * 1024 + 1, b'\n');
        assert_eq!(
            parse(FILE, &src).map(|_| ()).map_err(|d| d.to_string()),
            Err("deploy/moorline.toml:1:1: file is larger than 1 MiB".to_owned())
        );
        src.truncate(1024 * 1024);
        assert!(matches!(parse(FILE, &src), Err(d) if d.to_string().contains("no scopes")));
    }
}
