//! The command line and the typed settings it becomes. Every flag can also
//! be given as a `TOLLGATE_*` environment variable; values are checked once,
//! here, and a bad one stops start-up with a message naming it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_DB: &str = "./tollgate.db";
const DEFAULT_TICK_MS: u64 = 1000;
const DEFAULT_WARN_SECONDS: f64 = 10.0;
const DEFAULT_MAX_SESSION_SECONDS: f64 = 3600.0;
const DEFAULT_PING_SECS: f64 = 15.0;
const DEFAULT_MAX_TOKEN_TTL: f64 = 86_400.0;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate",
    version,
    about = "A metering gateway for realtime voice sessions and LLM usage.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (what `tollgate` does with no command).
    Serve(ServeArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create the project if needed and print a new API key for it, once.
    Create {
        /// The project's name.
        #[arg(long)]
        project: String,
        #[arg(long, env = "TOLLGATE_DB", default_value = DEFAULT_DB)]
        db: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TOLLGATE_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// SQLite database file, created if missing.
    #[arg(long, env = "TOLLGATE_DB", default_value = DEFAULT_DB)]
    pub db: PathBuf,

    /// Milliseconds between two meter ticks (10 to 60000).
    #[arg(long, env = "TOLLGATE_TICK_MS", default_value_t = DEFAULT_TICK_MS,
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub tick_ms: u64,

    /// Warn a session when its remaining seconds fall below this.
    #[arg(long, env = "TOLLGATE_WARN_SECONDS", default_value_t = DEFAULT_WARN_SECONDS)]
    pub warn_seconds: f64,

    /// Longest a single session may last, in seconds.
    #[arg(long, env = "TOLLGATE_MAX_SESSION_SECONDS",
          default_value_t = DEFAULT_MAX_SESSION_SECONDS)]
    pub max_session_seconds: f64,

    /// Most sessions one human may have open at once (default: no cap).
    #[arg(long, env = "TOLLGATE_MAX_SESSIONS_PER_HUMAN",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions_per_human: Option<u32>,

    /// Seconds between two pings; a client silent for two intervals is dropped.
    #[arg(long, env = "TOLLGATE_PING_SECS", default_value_t = DEFAULT_PING_SECS)]
    pub ping_secs: f64,

    /// Longest lifetime a usage token may be given, in seconds.
    #[arg(long, env = "TOLLGATE_MAX_TOKEN_TTL", default_value_t = DEFAULT_MAX_TOKEN_TTL)]
    pub max_token_ttl: f64,
}

/// The server's settings, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub db: PathBuf,
    pub tick: Duration,
    pub warn: Duration,
    pub max_session: Duration,
    pub max_sessions_per_human: Option<u32>,
    pub ping: Duration,
    pub max_token_ttl: Duration,
}

impl Settings {
    /// The defaults, with the given database.
    pub fn new(db: PathBuf) -> Settings {
        Settings {
            listen: DEFAULT_LISTEN.parse().expect("the default address parses"),
            db,
            tick: Duration::from_millis(DEFAULT_TICK_MS),
            warn: Duration::from_secs_f64(DEFAULT_WARN_SECONDS),
            max_session: Duration::from_secs_f64(DEFAULT_MAX_SESSION_SECONDS),
            max_sessions_per_human: None,
            ping: Duration::from_secs_f64(DEFAULT_PING_SECS),
            max_token_ttl: Duration::from_secs_f64(DEFAULT_MAX_TOKEN_TTL),
        }
    }
}

impl TryFrom<ServeArgs> for Settings {
    type Error = String;

    fn try_from(args: ServeArgs) -> Result<Settings, String> {
        Ok(Settings {
            listen: args.listen,
            db: args.db,
            tick: Duration::from_millis(args.tick_ms),
            warn: seconds("--warn-seconds", args.warn_seconds, 0.0, 86_400.0)?,
            max_session: seconds("--max-session-seconds", args.max_session_seconds, 1.0, 1e7)?,
            max_sessions_per_human: args.max_sessions_per_human,
            ping: seconds("--ping-secs", args.ping_secs, 0.05, 3600.0)?,
            max_token_ttl: seconds("--max-token-ttl", args.max_token_ttl, 1.0, 1e9)?,
        })
    }
}

fn seconds(flag: &str, value: f64, min: f64, max: f64) -> Result<Duration, String> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(format!("{flag} must be between {min} and {max} seconds, not {value}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_command_means_serve_with_the_defaults() {
        let cli = Cli::try_parse_from(["tollgate"]).unwrap();
        assert!(cli.command.is_none());
        let settings = Settings::try_from(cli.serve).unwrap();
        let defaults = Settings::new(DEFAULT_DB.into());
        assert_eq!(settings.listen, defaults.listen);
        assert_eq!(settings.tick, defaults.tick);
        assert_eq!(settings.ping, defaults.ping);
    }

    #[test]
    fn out_of_range_values_are_refused_with_the_flag_named() {
        let cli = Cli::try_parse_from(["tollgate", "--ping-secs", "0"]).unwrap();
        let error = Settings::try_from(cli.serve).unwrap_err();
        assert!(error.contains("--ping-secs"), "{error}");
        assert!(Cli::try_parse_from(["tollgate", "--tick-ms", "5"]).is_err());
    }

    #[test]
    fn keys_create_takes_a_project() {
        let cli = Cli::try_parse_from(["tollgate", "keys", "create", "--project", "acme"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Keys(KeysCommand::Create { ref project, .. })) if project == "acme"
        ));
    }
}
