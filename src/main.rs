//! moorline: a pull-based GitOps deploy agent for systemd units and Docker
//! containers. This file parses the command line, sets up logging and maps
//! outcomes to exit codes; everything else lives in the modules below.

/// The daemon loop, its status and the snapshot it leaves on disk.
mod agent;
/// The local control channel between the CLI and the agent, and its types.
mod api;
/// JSON lines over an owner-only Unix socket: the agent's and the edge's
/// control channels.
mod channel;
/// One file per command, human and `--json` rendering.
mod cli;
/// Host configuration: raw TOML → validated settings.
mod config;
/// `moorline edge`: the reverse proxy of zero-downtime scopes, its routing
/// table, per-slot figures and control channel.
mod edge;
/// Named kill points for crash tests (`fault-injection` feature only).
mod fault;
/// Health checks: http, tcp, exec.
mod health;
/// `[http]`: `/metrics`, the dashboard and the JSON it reads.
mod http;
/// The journal of a rollout's side effects, and the stop request it obeys.
mod journal;
/// The manifest committed in the source: schema, validation, fingerprints.
mod manifest;
/// `[[notify]]`: rollouts announced to HTTP targets, retried, signed.
mod notify;
/// (manifest, recorded state, inputs) → what each scope needs; pure.
mod plan;
/// Owner-only modes for the state directory and the history.
mod privacy;
/// The rollout engine: prepare, switch, verify, roll back, record.
mod rollout;
/// Runtimes that run a scope's members: systemd user units and Docker.
mod runtime;
/// The git source and the triggers that wake the agent.
mod source;
/// sled history and state, behind typed records.
mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "moorline",
    version,
    about = "Pull-based GitOps deploy agent for systemd units and Docker containers"
)]
struct Cli {
    /// Host configuration file [default: ~/.config/moorline/config.toml]
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent in the foreground (what the user unit runs)
    Agent,
    /// Run the edge, the proxy in front of zero-downtime scopes (what
    /// moorline-edge.service runs; the agent starts it)
    Edge,
    /// What runs, from which commit, and whether it is healthy
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Past rollouts, newest first
    History {
        /// Only rollouts that touched this scope
        #[arg(long, value_name = "SCOPE")]
        scope: Option<String>,
        #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        limit: u64,
        #[arg(long)]
        json: bool,
    },
    /// One rollout: phases with timings, actions, error, build output tail
    Show {
        #[arg(value_name = "ROLLOUT")]
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Validate a manifest offline
    Check {
        #[arg(value_name = "MANIFEST", default_value = "deploy/moorline.toml")]
        manifest: PathBuf,
        /// A host the manifest is for; warns about scopes that list none of these
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
    },
    /// What the agent would do for a commit, without doing it
    Plan {
        /// A branch, tag or commit id [default: the followed branch after a fetch]
        #[arg(value_name = "REV")]
        rev: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Ask the running agent to fetch now
    Sync,
    /// Leave a scope exactly as it runs, whatever the branch says, until `resume`
    Hold(#[command(flatten)] ByHand),
    /// Let a held scope follow the branch again (it converges at once)
    Resume {
        #[arg(value_name = "SCOPE")]
        scope: String,
        #[arg(long)]
        json: bool,
    },
    /// Roll a scope back to its previous healthy release (no git, no build)
    /// and hold it there until `resume`
    Rollback {
        #[command(flatten)]
        hand: ByHand,
        /// Go back to the release the scope ran after this rollout instead
        #[arg(long, value_name = "ROLLOUT")]
        to: Option<u64>,
    },
    /// Restart a scope's members on the release they run, verified like any rollout
    Restart(#[command(flatten)] ByHand),
    /// Let a commit that waits for approval (`approve` on a scope) deploy
    Approve {
        /// The waiting commit (at least 4 characters of its id)
        #[arg(value_name = "COMMIT")]
        commit: String,
        /// Approve only this scope's gate
        #[arg(long, value_name = "SCOPE")]
        scope: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Write a host config for a new host, after checking its source and manifest
    Init {
        /// The repository: a local path, file://, https:// or ssh://
        #[arg(long, value_name = "URL")]
        url: String,
        #[arg(long, value_name = "BRANCH", default_value = "main")]
        branch: String,
        /// The manifest's path in the repository
        #[arg(long, value_name = "PATH", default_value = "deploy/moorline.toml")]
        manifest: String,
        /// ssh sources: the deploy key's private half
        #[arg(long, value_name = "PATH")]
        ssh_key: Option<String>,
        /// ssh sources: the host keys accepted, strictly (default ~/.ssh/known_hosts)
        #[arg(long, value_name = "PATH")]
        known_hosts: Option<String>,
        /// https sources: a file holding the token, sent as basic auth
        #[arg(long, value_name = "PATH")]
        token_file: Option<String>,
        /// https sources: the basic-auth user sent with the token
        #[arg(long, value_name = "USER")]
        token_user: Option<String>,
        /// https sources: extra CA certificates (PEM)
        #[arg(long, value_name = "PATH")]
        ca_file: Option<String>,
        /// How long one fetch may take (default 60s)
        #[arg(long, value_name = "DURATION")]
        fetch_timeout: Option<String>,
    },
    /// Print the man page (roff), made from this command line's definition
    #[command(hide = true)]
    Man,
    /// Print shell completions
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

/// What `hold`, `rollback` and `restart` are told: a scope and why.
#[derive(clap::Args)]
struct ByHand {
    #[arg(value_name = "SCOPE")]
    scope: String,
    /// Why (recorded in history and shown by status and plan)
    #[arg(long, value_name = "TEXT")]
    reason: String,
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Command::Check { manifest, hosts } => return cli::check::run(manifest, hosts),
        Command::Man => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            let mut text = Vec::new();
            if let Err(e) = page.render(&mut text) {
                eprintln!("error: cannot render the man page: {e}");
                return cli::exit(cli::ERROR);
            }
            cli::out(&String::from_utf8_lossy(&text));
            return cli::exit(cli::OK);
        }
        Command::Completions { shell } => {
            let mut text = Vec::new();
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "moorline",
                &mut text,
            );
            cli::out(&String::from_utf8_lossy(&text));
            return cli::exit(cli::OK);
        }
        Command::Init {
            url,
            branch,
            manifest,
            ssh_key,
            known_hosts,
            token_file,
            token_user,
            ca_file,
            fetch_timeout,
        } => {
            let optional = [
                ("ssh_key", ssh_key),
                ("known_hosts", known_hosts),
                ("token_file", token_file),
                ("token_user", token_user),
                ("ca_file", ca_file),
                ("fetch_timeout", fetch_timeout),
            ];
            let source: Vec<(&str, &str)> = optional
                .iter()
                .filter_map(|(key, value)| Some((*key, value.as_deref()?)))
                .collect();
            let Some(home) = std::env::var_os("HOME").map(PathBuf::from) else {
                eprintln!("error: HOME is not set");
                return cli::exit(cli::ERROR);
            };
            let xdg = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from);
            let path = cli
                .config
                .clone()
                .unwrap_or_else(|| config::default_path(&home, xdg.as_deref()));
            let (code, out, err) = cli::init::run(&cli::init::Init {
                path: &path,
                home: &home,
                url,
                branch,
                manifest,
                source: &source,
            });
            cli::out(&out);
            eprint!("{err}");
            return cli::exit(code);
        }
        _ => {}
    }
    init_logging(matches!(cli.command, Command::Agent | Command::Edge));
    let config = match load_config(cli.config.as_deref()) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("{message}");
            return cli::exit(cli::ERROR);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return cli::exit(cli::ERROR);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Agent => match agent::run(config).await {
                Ok(()) => cli::OK,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    cli::ERROR
                }
            },
            Command::Edge => match edge::run(&config.state.dir).await {
                Ok(()) => cli::OK,
                Err(e) => {
                    eprintln!("error: {e}");
                    cli::ERROR
                }
            },
            Command::Status { json } => cli::status::run(&config, json).await,
            Command::History { scope, limit, json } => {
                cli::history::history(&config, scope, limit as usize, json).await
            }
            Command::Show { id, json } => cli::history::show(&config, id, json).await,
            Command::Plan { rev, json } => cli::plan::run(&config, rev, json).await,
            Command::Sync => cli::sync::run(&config).await,
            Command::Hold(h) => cli::hand::hold(&config, &h.scope, &h.reason, h.json).await,
            Command::Resume { scope, json } => cli::hand::resume(&config, &scope, json).await,
            Command::Rollback { hand: h, to } => {
                cli::hand::rollback(&config, &h.scope, to, &h.reason, h.json).await
            }
            Command::Restart(h) => cli::hand::restart(&config, &h.scope, &h.reason, h.json).await,
            Command::Approve {
                commit,
                scope,
                json,
            } => cli::hand::approve(&config, &commit, scope.as_deref(), json).await,
            Command::Check { .. }
            | Command::Completions { .. }
            | Command::Man
            | Command::Init { .. } => {
                unreachable!("handled before the runtime starts")
            }
        }
    });
    // A fetch that timed out may still block a thread on a silent remote:
    // the process does not wait for it to exit.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    cli::exit(code)
}

fn load_config(explicit: Option<&std::path::Path>) -> Result<config::Config, String> {
    let path = match explicit {
        Some(path) => path.to_path_buf(),
        None => {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .ok_or_else(|| "error: HOME is not set; pass --config".to_string())?;
            let xdg = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from);
            config::default_path(&home, xdg.as_deref())
        }
    };
    config::load(&path).map_err(|d| d.to_string())
}

/// Logs go to stderr; under systemd (JOURNAL_STREAM set) straight to the
/// journal, with each event's fields as journal fields prefixed `MOORLINE_`
/// (`MOORLINE_SCOPE`, `MOORLINE_COMMIT`, `MOORLINE_ROLLOUT`, …), so
/// `journalctl --user -u moorline MOORLINE_SCOPE=api` finds one scope's
/// lines. If the journal's socket cannot be reached, stderr it is.
fn init_logging(agent: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let default = if agent { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MOORLINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let unreachable = match std::env::var_os("JOURNAL_STREAM").map(|_| tracing_journald::layer()) {
        Some(Ok(journal)) => {
            // The agent's info lines are its routine: journal "info" (6), not
            // "notice" (5), so `journalctl -p notice` shows warnings and errors.
            let priorities = tracing_journald::PriorityMappings {
                info: tracing_journald::Priority::Informational,
                debug: tracing_journald::Priority::Debug,
                ..tracing_journald::PriorityMappings::new()
            };
            let journal = journal
                .with_field_prefix(Some("MOORLINE".into()))
                .with_priority_mappings(priorities);
            tracing_subscriber::registry()
                .with(filter)
                .with(journal)
                .init();
            return;
        }
        Some(Err(e)) => Some(e),
        None => None,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    if let Some(e) = unreachable {
        tracing::warn!(error = %e, "the journal's socket cannot be reached; logging to stderr");
    }
}
