//! The command line, the settings file, and the typed settings they become.
//! Every setting can be given in a TOML file (`--config`), as a
//! `TOLLGATE_*` environment variable, or as a flag; a flag or variable wins
//! over the file. Values are checked once, here, and a bad one stops
//! start-up with a message naming it.

mod database;
mod file;
mod llm;
mod upstream;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::{HeaderValue, Uri};
use clap::{Args, Parser, Subcommand};

use crate::tls::TlsFiles;
use crate::webhooks::dispatch::DispatchSettings;
pub use database::{Database, PostgresUrl};
use file::FileSettings;
pub use llm::{API_KEY_VARIABLE as LLM_API_KEY_VARIABLE, CapField, LlmSettings, LlmUpstream};
pub use upstream::{Upstream, Upstreams};

const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_DB: &str = "./tollgate.db";
const DEFAULT_TICK_MS: u64 = 1000;
const DEFAULT_WARN_SECONDS: f64 = 10.0;
const DEFAULT_MAX_SESSION_SECONDS: f64 = 3600.0;
const DEFAULT_PING_SECS: f64 = 15.0;
const DEFAULT_MAX_TOKEN_TTL: f64 = 86_400.0;
/// Audio frames are a few kilobytes; a megabyte leaves room for anything a
/// voice protocol sends while bounding what one connection can make the
/// server hold.
const DEFAULT_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Enough for an app whose clients retry a stale token now and then, and
/// for a person mistyping a key; a guesser gets 28,800 guesses a day per
/// address against usage tokens of 258 random bits.
const DEFAULT_MAX_AUTH_FAILURES_PER_MINUTE: u32 = 20;
/// A client on a slow mobile link sends its headers in well under a
/// second; ten leave room for a stalled link while bounding how long a
/// connection that sends nothing (or a byte at a time) holds its slot.
const DEFAULT_HEADER_TIMEOUT_SECONDS: f64 = 10.0;
/// The largest cap on connections that may be set: far more than one
/// process can hold open files for.
const MAX_MAX_CONNECTIONS: u32 = 1 << 24;
/// The largest database cap accepted, 16 TiB: SQLite's own limit for a
/// database of its default 4 KiB pages, which a larger cap would never
/// reach.
const MAX_DB_MB: u64 = 16 * 1024 * 1024;

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
    Serve(Box<ServeArgs>),
    /// Manage API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage the project's webhook on a running server, as its API does.
    Webhooks(WebhooksArgs),
}

/// `tollgate webhooks`: the webhook endpoints of a running server's API,
/// called with the project's API key.
#[derive(Args, Debug)]
pub struct WebhooksArgs {
    /// The server [default: http://127.0.0.1:8080].
    #[arg(long, env = "TOLLGATE_URL", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// The project's API key.
    #[arg(long, env = "TOLLGATE_API_KEY", hide_env_values = true)]
    pub api_key: String,
    #[command(subcommand)]
    pub command: WebhooksCommand,
}

#[derive(Subcommand, Debug)]
pub enum WebhooksCommand {
    /// Set the endpoint (printing the signing secret when it is new).
    Set {
        /// The URL deliveries are POSTed to.
        #[arg(long)]
        endpoint: String,
        /// The event types wanted, comma-separated [default: all].
        #[arg(long, value_delimiter = ',')]
        events: Option<Vec<String>>,
        /// A "running low" line, as TYPE=VALUE (token_cnt=1000); repeatable.
        #[arg(long = "threshold")]
        thresholds: Vec<String>,
    },
    /// Show the webhook, without its secret.
    Show,
    /// Remove the webhook; its undelivered events are marked failed.
    Delete,
    /// Issue a new secret; the old one signs too for the grace period.
    Rotate {
        /// Seconds the old secret still signs [default: 86400].
        #[arg(long)]
        grace_seconds: Option<f64>,
    },
    /// List deliveries, oldest first.
    Deliveries {
        /// pending, failed or delivered [default: all].
        #[arg(long)]
        status: Option<String>,
    },
    /// Send a pending or failed delivery again now.
    Retry {
        /// The event's id (evt_...).
        id: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeysCommand {
    /// Create the project if needed and print a new API key for it, once.
    Create {
        /// The project's name.
        #[arg(long)]
        project: String,
        /// SQLite database file or postgres:// URL [default: ./tollgate.db, or the
        /// settings file's].
        #[arg(long, env = "TOLLGATE_DB")]
        db: Option<PathBuf>,
        /// A TOML settings file, for its `db`.
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Revoke an API key at once, on a running server too: every request
    /// with it is refused from then on.
    Revoke {
        /// The key to revoke (better given as TOLLGATE_API_KEY, which stays
        /// out of the process list and shell history).
        #[arg(long, env = "TOLLGATE_API_KEY", hide_env_values = true)]
        api_key: String,
        /// SQLite database file or postgres:// URL [default: ./tollgate.db, or the
        /// settings file's].
        #[arg(long, env = "TOLLGATE_DB")]
        db: Option<PathBuf>,
        /// A TOML settings file, for its `db`.
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// The flags of `serve`. None has a default here: what is not given falls
/// back to the settings file, then to the default named in its help.
#[derive(Args, Debug, Clone, Default)]
pub struct ServeArgs {
    /// A TOML settings file; flags and TOLLGATE_* variables override it.
    #[arg(long, env = "TOLLGATE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "TOLLGATE_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// SQLite database file, created if missing, or a PostgreSQL URL
    /// (postgres://user@host/dbname) [default: ./tollgate.db].
    #[arg(long, env = "TOLLGATE_DB")]
    pub db: Option<PathBuf>,

    /// Milliseconds between two meter ticks, 10 to 60000 [default: 1000].
    #[arg(long, env = "TOLLGATE_TICK_MS")]
    pub tick_ms: Option<u64>,

    /// Warn a session when its remaining seconds fall below this [default: 10].
    #[arg(long, env = "TOLLGATE_WARN_SECONDS")]
    pub warn_seconds: Option<f64>,

    /// Longest a single session may last, in seconds [default: 3600].
    #[arg(long, env = "TOLLGATE_MAX_SESSION_SECONDS")]
    pub max_session_seconds: Option<f64>,

    /// Most sessions one human may have open at once [default: no cap].
    #[arg(long, env = "TOLLGATE_MAX_SESSIONS_PER_HUMAN")]
    pub max_sessions_per_human: Option<u32>,

    /// Seconds between two pings; a client silent for two intervals is
    /// dropped [default: 15].
    #[arg(long, env = "TOLLGATE_PING_SECS")]
    pub ping_secs: Option<f64>,

    /// Longest lifetime a usage token may be given, in seconds [default: 86400].
    #[arg(long, env = "TOLLGATE_MAX_TOKEN_TTL")]
    pub max_token_ttl: Option<f64>,

    /// Origins whose pages may call the API and open sessions, comma-separated;
    /// `*` allows any [default: none, and no check of WebSocket origins].
    #[arg(long, env = "TOLLGATE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Option<Vec<String>>,

    /// Largest WebSocket message either side of a session may send, in bytes
    /// [default: 1048576].
    #[arg(long, env = "TOLLGATE_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,

    /// Failed authentications one client address may make in a minute;
    /// past them, its authenticated requests get 429 until the minute is
    /// over; 0 turns the limit off [default: 20].
    #[arg(long, env = "TOLLGATE_MAX_AUTH_FAILURES_PER_MINUTE")]
    pub max_auth_failures_per_minute: Option<u32>,

    /// Most TCP connections the server holds at once, sessions included;
    /// over it, a connection is answered 503 and closed [default: the
    /// open-file limit less 100, halved when there are upstreams].
    #[arg(long, env = "TOLLGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<u32>,

    /// Seconds a client has to send a request's headers, from the moment
    /// it connects or its previous answer is sent [default: 10].
    #[arg(long, env = "TOLLGATE_HEADER_TIMEOUT_SECONDS")]
    pub header_timeout_seconds: Option<f64>,
    /// Largest the database may grow, in megabytes; at the cap usage cannot
    /// be recorded, so sessions are closed and refused; SQLite only
    /// [default: no cap].
    #[arg(long, env = "TOLLGATE_MAX_DB_MB")]
    pub max_db_mb: Option<u64>,

    /// A PEM file of CA certificates trusted for upstream TLS besides the
    /// system's.
    #[arg(long, env = "TOLLGATE_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,

    /// Base URL of the OpenAI-compatible service chat completions go to,
    /// such as https://api.openai.com/v1; its key comes from
    /// TOLLGATE_LLM_API_KEY [default: none, the built-in echo model].
    #[arg(long, env = "TOLLGATE_LLM_UPSTREAM")]
    pub llm_upstream: Option<String>,

    /// Completion tokens held for a chat completion that names no cap
    /// [default: 4096].
    #[arg(long, env = "TOLLGATE_LLM_DEFAULT_MAX_TOKENS")]
    pub llm_default_max_tokens: Option<u32>,

    /// A PEM file with the server's certificate chain: serve HTTPS and WSS
    /// with it and --tls-key [default: none, plain HTTP].
    #[arg(long, env = "TOLLGATE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// A PEM file with the private key of --tls-cert.
    #[arg(long, env = "TOLLGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

/// The server's settings, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub db: Database,
    pub tick: Duration,
    pub warn: Duration,
    pub max_session: Duration,
    pub max_sessions_per_human: Option<u32>,
    pub ping: Duration,
    pub max_token_ttl: Duration,
    pub allowed_origins: AllowedOrigins,
    pub max_message_bytes: usize,
    pub auth_failures: AuthFailureLimit,
    /// The cap on connections; `None` derives it from the open-file limit
    /// when the server starts.
    pub max_connections: Option<u32>,
    pub header_timeout: Duration,
    /// The database's cap, in megabytes; `None` for none. Never set with
    /// PostgreSQL.
    pub max_db_mb: Option<u64>,
    pub upstreams: Upstreams,
    pub upstream_ca_file: Option<PathBuf>,
    pub llm: LlmSettings,
    /// Serve TLS with these files; plain HTTP without.
    pub tls: Option<TlsFiles>,
    /// How webhook deliveries are paced; not a setting of the command line
    /// or the file, only of the code (tests make retries quick).
    pub webhooks: DispatchSettings,
}

/// How many failed authentications one client address may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailureLimit {
    /// Failures allowed in one window; 0 for no limit.
    pub max: u32,
    /// A minute. Not a setting of the command line or the file, only of
    /// the code, so that tests can see a window end.
    pub window: Duration,
}

impl AuthFailureLimit {
    /// The limit of `max` failures a minute.
    pub fn per_minute(max: u32) -> AuthFailureLimit {
        AuthFailureLimit { max, window: Duration::from_secs(60) }
    }
}

/// Which browser origins may use the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// No cross-origin browser calls, and no check of WebSocket origins.
    None,
    /// Any origin.
    Any,
    /// These origins, and WebSocket upgrades only from them (or from
    /// clients that send no `Origin`, which browsers always do).
    List(Vec<HeaderValue>),
}

impl Settings {
    /// The defaults, with the given database.
    pub fn new(db: impl Into<Database>) -> Settings {
        Settings {
            listen: DEFAULT_LISTEN.parse().expect("the default address parses"),
            db: db.into(),
            tick: Duration::from_millis(DEFAULT_TICK_MS),
            warn: Duration::from_secs_f64(DEFAULT_WARN_SECONDS),
            max_session: Duration::from_secs_f64(DEFAULT_MAX_SESSION_SECONDS),
            max_sessions_per_human: None,
            ping: Duration::from_secs_f64(DEFAULT_PING_SECS),
            max_token_ttl: Duration::from_secs_f64(DEFAULT_MAX_TOKEN_TTL),
            allowed_origins: AllowedOrigins::None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            auth_failures: AuthFailureLimit::per_minute(DEFAULT_MAX_AUTH_FAILURES_PER_MINUTE),
            max_connections: None,
            header_timeout: Duration::from_secs_f64(DEFAULT_HEADER_TIMEOUT_SECONDS),
            max_db_mb: None,
            upstreams: Upstreams::default(),
            upstream_ca_file: None,
            llm: LlmSettings::default(),
            tls: None,
            webhooks: DispatchSettings::default(),
        }
    }

    /// The settings from the flags (and variables) and the settings file
    /// they name, if any.
    pub fn load(args: ServeArgs) -> Result<Settings, String> {
        let file = match &args.config {
            Some(path) => FileSettings::read(path)?,
            None => FileSettings::default(),
        };
        merge(args, file)
    }

    /// The `--db` value `keys create` and `keys revoke` work on: a SQLite
    /// path or a PostgreSQL URL, read by [`Database::parse`].
    pub fn database(db: Option<PathBuf>, config: Option<&Path>) -> Result<PathBuf, String> {
        let from_file = match config {
            Some(path) => FileSettings::read(path)?.db,
            None => None,
        };
        Ok(db.or(from_file).unwrap_or_else(|| DEFAULT_DB.into()))
    }
}

fn merge(args: ServeArgs, file: FileSettings) -> Result<Settings, String> {
    let tick_ms = args.tick_ms.or(file.tick_ms).unwrap_or(DEFAULT_TICK_MS);
    if !(10..=60_000).contains(&tick_ms) {
        return Err(format!("tick_ms (--tick-ms) must be from 10 to 60000, not {tick_ms}"));
    }
    let max_sessions_per_human = args.max_sessions_per_human.or(file.max_sessions_per_human);
    if max_sessions_per_human == Some(0) {
        return Err("max_sessions_per_human (--max-sessions-per-human) must be at least 1".into());
    }
    let max_message_bytes =
        args.max_message_bytes.or(file.max_message_bytes).unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
    if !(1024..=64 * 1024 * 1024).contains(&max_message_bytes) {
        return Err("max_message_bytes (--max-message-bytes) must be from 1 KiB to 64 MiB".into());
    }
    let max_db_mb = args.max_db_mb.or(file.max_db_mb);
    if max_db_mb.is_some_and(|mb| !(1..=MAX_DB_MB).contains(&mb)) {
        return Err(format!("max_db_mb (--max-db-mb) must be from 1 to {MAX_DB_MB}"));
    }
    let db = Database::parse(&args.db.or(file.db).unwrap_or_else(|| DEFAULT_DB.into()))?;
    if max_db_mb.is_some() && matches!(db, Database::Postgres(_)) {
        return Err("max_db_mb (--max-db-mb) caps a SQLite file: it cannot be used with a \
                    PostgreSQL database"
            .into());
    }
    let origins = args.allowed_origins.or(file.allowed_origins).unwrap_or_default();
    let max_auth_failures = args
        .max_auth_failures_per_minute
        .or(file.max_auth_failures_per_minute)
        .unwrap_or(DEFAULT_MAX_AUTH_FAILURES_PER_MINUTE);
    let max_connections = args.max_connections.or(file.max_connections);
    if max_connections.is_some_and(|cap| !(1..=MAX_MAX_CONNECTIONS).contains(&cap)) {
        return Err(format!(
            "max_connections (--max-connections) must be from 1 to {MAX_MAX_CONNECTIONS}"
        ));
    }
    Ok(Settings {
        listen: args.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().unwrap()),
        db,
        tick: Duration::from_millis(tick_ms),
        warn: seconds(
            "warn_seconds",
            args.warn_seconds.or(file.warn_seconds),
            DEFAULT_WARN_SECONDS,
            0.0,
            86_400.0,
        )?,
        max_session: seconds(
            "max_session_seconds",
            args.max_session_seconds.or(file.max_session_seconds),
            DEFAULT_MAX_SESSION_SECONDS,
            1.0,
            1e7,
        )?,
        max_sessions_per_human,
        ping: seconds(
            "ping_secs",
            args.ping_secs.or(file.ping_secs),
            DEFAULT_PING_SECS,
            0.05,
            3600.0,
        )?,
        max_token_ttl: seconds(
            "max_token_ttl",
            args.max_token_ttl.or(file.max_token_ttl),
            DEFAULT_MAX_TOKEN_TTL,
            1.0,
            1e9,
        )?,
        allowed_origins: allowed_origins(origins)?,
        max_message_bytes,
        auth_failures: AuthFailureLimit::per_minute(max_auth_failures),
        max_connections,
        header_timeout: seconds(
            "header_timeout_seconds",
            args.header_timeout_seconds.or(file.header_timeout_seconds),
            DEFAULT_HEADER_TIMEOUT_SECONDS,
            0.05,
            3600.0,
        )?,
        max_db_mb,
        upstreams: Upstreams {
            conversational: upstream::check("conversational", file.upstream.conversational)?,
            voice_synthesis: upstream::check("voice_synthesis", file.upstream.voice_synthesis)?,
        },
        upstream_ca_file: args.upstream_ca_file.or(file.upstream.ca_file),
        llm: llm::check(args.llm_upstream, args.llm_default_max_tokens, file.llm)?,
        tls: tls_files(args.tls_cert.or(file.tls_cert), args.tls_key.or(file.tls_key))?,
        webhooks: DispatchSettings::default(),
    })
}

/// TLS takes both files or neither.
fn tls_files(cert: Option<PathBuf>, key: Option<PathBuf>) -> Result<Option<TlsFiles>, String> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
        (None, None) => Ok(None),
        (Some(_), None) => Err("tls_cert (--tls-cert) needs tls_key (--tls-key) too".into()),
        (None, Some(_)) => Err("tls_key (--tls-key) needs tls_cert (--tls-cert) too".into()),
    }
}

/// A number of seconds within bounds, named by its file key and flag.
fn seconds(
    key: &str,
    value: Option<f64>,
    default: f64,
    min: f64,
    max: f64,
) -> Result<Duration, String> {
    let flag = key.replace('_', "-");
    within(&format!("{key} (--{flag})"), value.unwrap_or(default), min, max)
}

/// A number of seconds within bounds, or an error naming the setting.
fn within(name: &str, value: f64, min: f64, max: f64) -> Result<Duration, String> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(format!("{name} must be between {min} and {max} seconds, not {value}"))
    }
}

fn allowed_origins(origins: Vec<String>) -> Result<AllowedOrigins, String> {
    let origins: Vec<String> =
        origins.into_iter().map(|o| o.trim().to_owned()).filter(|o| !o.is_empty()).collect();
    if origins.is_empty() {
        return Ok(AllowedOrigins::None);
    }
    if origins.iter().any(|origin| origin == "*") {
        return Ok(AllowedOrigins::Any);
    }
    origins
        .iter()
        .map(|origin| origin_value(origin))
        .collect::<Result<_, _>>()
        .map(AllowedOrigins::List)
}

/// An origin as browsers send it: scheme and host (and port), lowercase,
/// with no path.
fn origin_value(origin: &str) -> Result<HeaderValue, String> {
    let refused =
        || format!("allowed_origins: {origin:?} is not an origin such as https://app.example.com");
    let uri: Uri = origin.parse().map_err(|_| refused())?;
    let scheme = uri.scheme_str().filter(|scheme| *scheme == "http" || *scheme == "https");
    let (Some(scheme), Some(authority)) = (scheme, uri.authority()) else {
        return Err(refused());
    };
    let bare = !origin.trim_end_matches('/').contains(['?', '#']) && matches!(uri.path(), "" | "/");
    if !bare || authority.as_str().contains('@') {
        return Err(refused());
    }
    let value = format!("{scheme}://{}", authority.as_str().to_ascii_lowercase());
    HeaderValue::from_str(&value).map_err(|_| refused())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::SessionKind;

    fn load(args: &[&str], file: &str) -> Result<Settings, String> {
        let cli = Cli::try_parse_from(std::iter::once("tollgate").chain(args.iter().copied()))
            .map_err(|error| error.to_string())?;
        merge(cli.serve, toml::from_str(file).map_err(|error| error.to_string())?)
    }

    #[test]
    fn no_command_means_serve_with_the_defaults() {
        let cli = Cli::try_parse_from(["tollgate"]).unwrap();
        assert!(cli.command.is_none());
        let settings = load(&[], "").unwrap();
        let defaults = Settings::new(PathBuf::from(DEFAULT_DB));
        assert_eq!(settings.listen, defaults.listen);
        assert_eq!(settings.tick, defaults.tick);
        assert_eq!(settings.ping, defaults.ping);
        assert_eq!(settings.allowed_origins, AllowedOrigins::None);
        assert!(settings.upstreams.conversational.is_none());
    }

    #[test]
    fn out_of_range_values_are_refused_with_the_setting_named() {
        let error = load(&["--ping-secs", "0"], "").unwrap_err();
        assert!(error.contains("--ping-secs"), "{error}");
        let error = load(&[], "tick_ms = 5").unwrap_err();
        assert!(error.contains("tick_ms"), "{error}");
        let error = load(&["--max-sessions-per-human", "0"], "").unwrap_err();
        assert!(error.contains("max_sessions_per_human"), "{error}");
        let error = load(&["--max-connections", "0"], "").unwrap_err();
        assert!(error.contains("--max-connections"), "{error}");
        let error = load(&[], "header_timeout_seconds = 0").unwrap_err();
        assert!(error.contains("header_timeout_seconds"), "{error}");
        let error = load(&["--max-db-mb", "0"], "").unwrap_err();
        assert!(error.contains("--max-db-mb"), "{error}");
    }

    #[test]
    fn the_edge_settings_have_defaults_and_come_from_flags_or_the_file() {
        let settings = load(&[], "").unwrap();
        assert_eq!(settings.auth_failures, AuthFailureLimit::per_minute(20));
        assert_eq!(settings.max_connections, None);
        assert_eq!(settings.header_timeout, Duration::from_secs(10));
        let file = "max_auth_failures_per_minute = 5\nmax_connections = 500\n\
                    header_timeout_seconds = 2.5";
        let settings = load(&["--max-auth-failures-per-minute", "0"], file).unwrap();
        assert_eq!(settings.auth_failures.max, 0);
        assert_eq!(settings.max_connections, Some(500));
        assert_eq!(settings.header_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn the_database_has_no_cap_unless_one_is_given() {
        assert_eq!(load(&[], "").unwrap().max_db_mb, None);
        assert_eq!(load(&[], "max_db_mb = 512").unwrap().max_db_mb, Some(512));
        assert_eq!(load(&["--max-db-mb", "64"], "max_db_mb = 512").unwrap().max_db_mb, Some(64));
    }

    #[test]
    fn a_postgres_url_selects_postgres_and_refuses_a_cap() {
        let url = "postgres://ada@127.0.0.1/tollgate";
        let settings = load(&["--db", url], "").unwrap();
        assert!(matches!(settings.db, Database::Postgres(u) if u.expose() == url));
        let error = load(&["--db", url], "max_db_mb = 64").unwrap_err();
        assert!(error.contains("--max-db-mb") && error.contains("PostgreSQL"), "{error}");
    }

    #[test]
    fn a_flag_wins_over_the_file_and_the_file_over_the_default() {
        let file = "tick_ms = 250\nping_secs = 3\nlisten = \"127.0.0.1:9000\"";
        let settings = load(&["--tick-ms", "100"], file).unwrap();
        assert_eq!(settings.tick, Duration::from_millis(100));
        assert_eq!(settings.ping, Duration::from_secs(3));
        assert_eq!(settings.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(settings.max_session, Duration::from_secs(3600));
    }

    #[test]
    fn unknown_keys_in_the_file_are_refused_by_name() {
        let error = load(&[], "tick_millis = 100").unwrap_err();
        assert!(error.contains("tick_millis"), "{error}");
        let error =
            load(&[], "[upstream.conversational]\nurl = \"ws://x\"\nheader = {}").unwrap_err();
        assert!(error.contains("header"), "{error}");
    }

    #[test]
    fn an_upstream_takes_literal_headers_and_secret_ones_from_the_environment() {
        // SAFETY: no other test reads or writes this variable.
        unsafe { std::env::set_var("TOLLGATE_TEST_UPSTREAM_AUTH", "Bearer sk-secret") };
        let file = r#"
            [upstream.conversational]
            url = "wss://voice.example.com/agent"
            headers = { "X-Region" = "eu" }
            header_env = { Authorization = "TOLLGATE_TEST_UPSTREAM_AUTH" }
            human_id_header = "x-user"
        "#;
        let settings = load(&[], file).unwrap();
        let upstream = settings.upstreams.for_kind(SessionKind::Conversational).unwrap();
        assert!(settings.upstreams.for_kind(SessionKind::VoiceSynthesis).is_none());
        assert_eq!(upstream.human_id_header, "x-user");
        assert_eq!(upstream.session_id_header, "x-session-id");
        let (name, value) = &upstream.headers[1];
        assert_eq!((name.as_str(), value.to_str().unwrap()), ("authorization", "Bearer sk-secret"));
        assert!(!format!("{settings:?}").contains("sk-secret"), "the secret header printed");
    }

    #[test]
    fn an_upstream_with_a_missing_variable_or_a_bad_url_is_refused() {
        let file = r#"
            [upstream.voice_synthesis]
            url = "ws://x"
            header_env = { A = "TOLLGATE_UNSET_VARIABLE" }
        "#;
        let error = load(&[], file).unwrap_err();
        assert!(error.contains("TOLLGATE_UNSET_VARIABLE"), "{error}");
        let error = load(&[], "[upstream.conversational]\nurl = \"http://x\"").unwrap_err();
        assert!(error.contains("upstream.conversational.url"), "{error}");
    }

    #[test]
    fn an_upstream_may_not_set_the_servers_headers_or_name_one_twice() {
        let with = |extra: &str| {
            load(&[], &format!("[upstream.conversational]\nurl = \"ws://up.test/a\"\n{extra}"))
        };
        for (extra, expected) in [
            (r#"headers = { "X-Human-Id" = "x" }"#, "set by the server"),
            (r#"headers = { "Sec-WebSocket-Key" = "x" }"#, "set by the server"),
            (r#"headers = { "A" = "1", "a" = "2" }"#, "given twice"),
            (r#"session_id_header = "x-human-id""#, "the same"),
            ("connect_timeout_seconds = 0", "connect_timeout_seconds"),
        ] {
            let error = with(extra).unwrap_err();
            assert!(error.contains(expected), "{extra}: {error}");
            assert!(!error.contains("--connect"), "names a flag that does not exist: {error}");
        }
        for url in ["ws://", "ws:///path", "wss://"] {
            let error =
                load(&[], &format!("[upstream.conversational]\nurl = \"{url}\"")).unwrap_err();
            assert!(error.contains("upstream.conversational.url"), "{url}: {error}");
        }
    }

    #[test]
    fn origins_are_kept_as_browsers_send_them() {
        let settings =
            load(&[], r#"allowed_origins = ["https://App.Example.com", "http://l:3000/"]"#);
        let AllowedOrigins::List(list) = settings.unwrap().allowed_origins else { panic!() };
        assert_eq!(list, ["https://app.example.com", "http://l:3000"]);
        for bad in [
            "https://a.example/page",
            "https://a.example,https://b.example",
            "a.example",
            "ftp://a",
        ] {
            let file = format!("allowed_origins = [{bad:?}]");
            assert!(load(&[], &file).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn allowed_origins_are_a_list_or_any() {
        let settings =
            load(&["--allowed-origins", "http://localhost:3000,https://app.example.com"], "")
                .unwrap();
        let AllowedOrigins::List(list) = settings.allowed_origins else { panic!("not a list") };
        assert_eq!(list, ["http://localhost:3000", "https://app.example.com"]);
        assert_eq!(
            load(&[], "allowed_origins = [\"*\"]").unwrap().allowed_origins,
            AllowedOrigins::Any
        );
        assert!(load(&["--allowed-origins", "localhost:3000"], "").is_err());
    }

    #[test]
    fn tls_takes_a_certificate_and_a_key_or_neither() {
        let settings = load(&["--tls-cert", "c.pem"], "tls_key = \"k.pem\"").unwrap();
        let files = TlsFiles { cert: "c.pem".into(), key: "k.pem".into() };
        assert_eq!(settings.tls, Some(files));
        assert_eq!(load(&[], "").unwrap().tls, None);
        let error = load(&["--tls-cert", "c.pem"], "").unwrap_err();
        assert!(error.contains("--tls-key"), "{error}");
        let error = load(&[], "tls_key = \"k.pem\"").unwrap_err();
        assert!(error.contains("--tls-cert"), "{error}");
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
