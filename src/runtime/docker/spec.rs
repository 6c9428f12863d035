//! Pure translation of a manifest `ContainerSpec`'s strings (ports, volumes,
//! restart policy, env files) into what the Engine API expects, kept apart
//! from the I/O so each rule is tested on its own.

use std::collections::BTreeMap;

/// One published port: `[host_ip:][host_port:]container_port[/proto]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// `"4000/tcp"`: the key of `ExposedPorts` and `PortBindings`.
    pub container: String,
    pub host_ip: Option<String>,
    pub host_port: Option<String>,
}

/// Parses a port as the manifest writes it; the error says what is wrong.
pub fn parse_port(text: &str) -> Result<PortSpec, String> {
    let (addr, proto) = match text.rsplit_once('/') {
        Some((addr, proto @ ("tcp" | "udp" | "sctp"))) => (addr, proto),
        Some((_, proto)) => {
            return Err(format!(
                "unknown protocol {proto:?}, expected \"tcp\", \"udp\" or \"sctp\""
            ));
        }
        None => (text, "tcp"),
    };
    // An IPv6 host address is bracketed: "[::1]:4000:4000".
    let (host_ip, rest) = match addr.strip_prefix('[') {
        Some(bracketed) => {
            let (ip, rest) = bracketed
                .split_once("]:")
                .ok_or_else(|| "a bracketed address must be followed by \":\"".to_string())?;
            (Some(ip.to_string()), rest)
        }
        None => (None, addr),
    };
    let parts: Vec<&str> = rest.split(':').collect();
    let (host_ip, host_port, container) = match (host_ip, parts.as_slice()) {
        (None, [container]) => (None, None, *container),
        (None, [host, container]) => (None, Some(*host), *container),
        (None, [ip, host, container]) => (Some(ip.to_string()), Some(*host), *container),
        (Some(ip), [host, container]) => (Some(ip), Some(*host), *container),
        _ => {
            return Err("expected \"[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]\"".to_string());
        }
    };
    check_port_number(container, "container port")?;
    let host_port = match host_port {
        Some("") | None => None,
        Some(port) => {
            check_port_number(port, "host port")?;
            Some(port.to_string())
        }
    };
    Ok(PortSpec {
        container: format!("{container}/{proto}"),
        host_ip: host_ip.filter(|ip| !ip.is_empty()),
        host_port,
    })
}

fn check_port_number(text: &str, what: &str) -> Result<(), String> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(()),
        _ => Err(format!("{what} {text:?} is not a number from 1 to 65535")),
    }
}

/// Checks a volume: `/host/path:/container/path[:options]` (a bind) or
/// `name:/container/path[:options]` (a named volume). The engine takes both
/// as the same `Binds` string.
pub fn check_volume(text: &str) -> Result<(), String> {
    let parts: Vec<&str> = text.split(':').collect();
    let (source, target) = match parts.as_slice() {
        [source, target] | [source, target, _] => (*source, *target),
        _ => return Err("expected \"SOURCE:/CONTAINER/PATH[:ro]\"".to_string()),
    };
    if source.is_empty() {
        return Err("the source is empty".to_string());
    }
    if !source.starts_with('/')
        && !source
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "source {source:?} is neither an absolute host path nor a volume name"
        ));
    }
    if !target.starts_with('/') {
        return Err(format!("container path {target:?} is not absolute"));
    }
    if let [_, _, options] = parts.as_slice() {
        for option in options.split(',') {
            if !matches!(
                option,
                "ro" | "rw"
                    | "z"
                    | "Z"
                    | "shared"
                    | "rshared"
                    | "slave"
                    | "rslave"
                    | "private"
                    | "rprivate"
                    | "nocopy"
            ) {
                return Err(format!("unknown option {option:?}"));
            }
        }
    }
    Ok(())
}

/// The restart policies the manifest allows.
pub fn restart_policy(text: &str) -> Option<bollard::models::RestartPolicyNameEnum> {
    use bollard::models::RestartPolicyNameEnum as P;
    match text {
        "no" => Some(P::NO),
        "always" => Some(P::ALWAYS),
        "unless-stopped" => Some(P::UNLESS_STOPPED),
        "on-failure" => Some(P::ON_FAILURE),
        _ => None,
    }
}

/// Parses an env file: `KEY=VALUE` per line; blank lines and lines starting
/// with `#` are skipped; the value is everything after the first `=`, kept
/// verbatim. Errors name the 1-based line (never its value: it may be a secret).
pub fn parse_env_file(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(format!("line {}: expected KEY=VALUE", index + 1));
        };
        let key = key.trim_end();
        if key.is_empty() || key.chars().any(char::is_whitespace) {
            return Err(format!("line {}: invalid variable name {key:?}", index + 1));
        }
        env.insert(key.to_string(), value.to_string());
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(container: &str, ip: Option<&str>, host: Option<&str>) -> PortSpec {
        PortSpec {
            container: container.to_string(),
            host_ip: ip.map(str::to_string),
            host_port: host.map(str::to_string),
        }
    }

    #[test]
    fn ports() {
        let ok = [
            ("4000", port("4000/tcp", None, None)),
            ("4000/udp", port("4000/udp", None, None)),
            ("8080:4000", port("4000/tcp", None, Some("8080"))),
            (
                "127.0.0.1:4000:4000",
                port("4000/tcp", Some("127.0.0.1"), Some("4000")),
            ),
            ("127.0.0.1::4000", port("4000/tcp", Some("127.0.0.1"), None)),
            (
                "[::1]:4000:4000/tcp",
                port("4000/tcp", Some("::1"), Some("4000")),
            ),
        ];
        for (text, want) in ok {
            assert_eq!(parse_port(text), Ok(want), "{text:?}");
        }
        let bad = [
            (
                "4000/icmp",
                "unknown protocol \"icmp\", expected \"tcp\", \"udp\" or \"sctp\"",
            ),
            (
                "http",
                "container port \"http\" is not a number from 1 to 65535",
            ),
            ("0", "container port \"0\" is not a number from 1 to 65535"),
            (
                "99999:80",
                "host port \"99999\" is not a number from 1 to 65535",
            ),
            (
                "a:b:c:d",
                "expected \"[HOST_IP:][HOST_PORT:]CONTAINER_PORT[/PROTOCOL]\"",
            ),
            ("[::1]4000", "a bracketed address must be followed by \":\""),
        ];
        for (text, want) in bad {
            assert_eq!(parse_port(text), Err(want.to_string()), "{text:?}");
        }
    }

    #[test]
    fn volumes() {
        for ok in [
            "/srv/data:/data",
            "/srv/data:/data:ro",
            "pgdata:/var/lib/pg",
            "cache:/c:rw,z",
        ] {
            assert_eq!(check_volume(ok), Ok(()), "{ok:?}");
        }
        let bad = [
            ("/data", "expected \"SOURCE:/CONTAINER/PATH[:ro]\""),
            (":/data", "the source is empty"),
            (
                "./rel:/data",
                "source \"./rel\" is neither an absolute host path nor a volume name",
            ),
            ("/srv:data", "container path \"data\" is not absolute"),
            ("/srv:/data:rx", "unknown option \"rx\""),
        ];
        for (text, want) in bad {
            assert_eq!(check_volume(text), Err(want.to_string()), "{text:?}");
        }
    }

    #[test]
    fn env_files() {
        let env =
            parse_env_file("# comment\n\nA=1\n  B = two=2\nEMPTY=\n").expect("valid env file");
        let want: BTreeMap<String, String> = [("A", "1"), ("B", " two=2"), ("EMPTY", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(env, want);
        assert_eq!(
            parse_env_file("A=1\nSECRET\n"),
            Err("line 2: expected KEY=VALUE".to_string())
        );
        assert_eq!(
            parse_env_file("MY KEY=1\n"),
            Err("line 1: invalid variable name \"MY KEY\"".to_string())
        );
    }

    #[test]
    fn restart_policies() {
        assert!(restart_policy("unless-stopped").is_some());
        assert!(restart_policy("on-failure").is_some());
        assert!(restart_policy("sometimes").is_none());
    }
}
