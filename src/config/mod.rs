//! The command line, the settings file, and the typed settings they become.
//! Every setting can be given in a TOML file (`--config`), as a
//! `TOLLGATE_*` environment variable, or as a flag; a flag or variable wins
//! over the file. Values are checked once, here, and a bad one stops
//! start-up with a message naming it.

mod file;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use clap::{Args, Parser, Subcommand};

use crate::limits::SessionKind;
use file::{FileSettings, FileUpstream};

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
const DEFAULT_CONNECT_TIMEOUT_SECONDS: f64 = 10.0;
const DEFAULT_HUMAN_ID_HEADER: &str = "x-human-id";
const DEFAULT_SESSION_ID_HEADER: &str = "x-session-id";

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
        /// SQLite database file [default: ./tollgate.db, or the settings file's].
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

    /// SQLite database file, created if missing [default: ./tollgate.db].
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

    /// A PEM file of CA certificates trusted for upstream TLS besides the
    /// system's.
    #[arg(long, env = "TOLLGATE_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
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
    pub allowed_origins: AllowedOrigins,
    pub max_message_bytes: usize,
    pub upstreams: Upstreams,
    pub upstream_ca_file: Option<PathBuf>,
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

/// The service behind each kind of session; a kind with none echoes.
#[derive(Debug, Clone, Default)]
pub struct Upstreams {
    pub conversational: Option<Upstream>,
    pub voice_synthesis: Option<Upstream>,
}

impl Upstreams {
    pub fn for_kind(&self, kind: SessionKind) -> Option<&Upstream> {
        match kind {
            SessionKind::Conversational => self.conversational.as_ref(),
            SessionKind::VoiceSynthesis => self.voice_synthesis.as_ref(),
        }
    }
}

/// A WebSocket service a session is relayed to.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `ws://` or `wss://`.
    pub url: String,
    /// Sent on every connection; values read from the environment are
    /// marked sensitive, so that they never print.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub human_id_header: HeaderName,
    pub session_id_header: HeaderName,
    pub connect_timeout: Duration,
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
            allowed_origins: AllowedOrigins::None,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            upstreams: Upstreams::default(),
            upstream_ca_file: None,
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

    /// The database `keys create` works on.
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
    let origins = args.allowed_origins.or(file.allowed_origins).unwrap_or_default();
    Ok(Settings {
        listen: args.listen.or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.parse().unwrap()),
        db: args.db.or(file.db).unwrap_or_else(|| DEFAULT_DB.into()),
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
        upstreams: Upstreams {
            conversational: upstream("conversational", file.upstream.conversational)?,
            voice_synthesis: upstream("voice_synthesis", file.upstream.voice_synthesis)?,
        },
        upstream_ca_file: args.upstream_ca_file.or(file.upstream.ca_file),
    })
}

/// A number of seconds within bounds, named by its file key and flag.
fn seconds(
    key: &str,
    value: Option<f64>,
    default: f64,
    min: f64,
    max: f64,
) -> Result<Duration, String> {
    let value = value.unwrap_or(default);
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(Duration::from_secs_f64(value))
    } else {
        let flag = key.replace('_', "-");
        Err(format!("{key} (--{flag}) must be between {min} and {max} seconds, not {value}"))
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
    let mut list = Vec::with_capacity(origins.len());
    for origin in origins {
        let scheme_ok = origin.starts_with("http://") || origin.starts_with("https://");
        let value =
            HeaderValue::from_str(&origin).ok().filter(|_| scheme_ok && !origin.ends_with('/'));
        list.push(value.ok_or_else(|| {
            format!("allowed_origins: {origin:?} is not an origin such as https://app.example.com")
        })?);
    }
    Ok(AllowedOrigins::List(list))
}

/// Checks `[upstream.<kind>]` and reads the headers it takes from the
/// environment.
fn upstream(kind: &str, file: Option<FileUpstream>) -> Result<Option<Upstream>, String> {
    let Some(file) = file else {
        return Ok(None);
    };
    let key = format!("upstream.{kind}");
    if !(file.url.starts_with("ws://") || file.url.starts_with("wss://")) {
        return Err(format!("{key}.url must start with ws:// or wss://, not {:?}", file.url));
    }
    let mut headers = Vec::new();
    for (name, value) in &file.headers {
        headers.push((header_name(&key, name)?, header_value(&key, name, value)?));
    }
    for (name, variable) in &file.header_env {
        let value = std::env::var(variable).map_err(|_| {
            format!("{key}.header_env.{name}: the environment variable {variable} is not set")
        })?;
        let mut value = header_value(&key, name, &value)?;
        value.set_sensitive(true);
        headers.push((header_name(&key, name)?, value));
    }
    let name_or = |given: &Option<String>, default: &str| {
        header_name(&key, given.as_deref().unwrap_or(default))
    };
    let timeout = file.connect_timeout_seconds;
    Ok(Some(Upstream {
        url: file.url,
        headers,
        human_id_header: name_or(&file.human_id_header, DEFAULT_HUMAN_ID_HEADER)?,
        session_id_header: name_or(&file.session_id_header, DEFAULT_SESSION_ID_HEADER)?,
        connect_timeout: seconds(
            "connect_timeout_seconds",
            timeout,
            DEFAULT_CONNECT_TIMEOUT_SECONDS,
            0.1,
            300.0,
        )
        .map_err(|error| format!("{key}.{error}"))?,
    }))
}

fn header_name(key: &str, name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{key}: {name:?} is not a valid header name"))
}

fn header_value(key: &str, name: &str, value: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value)
        .map_err(|_| format!("{key}: the value for {name} is not a valid header value"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let defaults = Settings::new(DEFAULT_DB.into());
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
    fn keys_create_takes_a_project() {
        let cli = Cli::try_parse_from(["tollgate", "keys", "create", "--project", "acme"]).unwrap();
        assert!(matches!(
            cli.command,
            Some(Command::Keys(KeysCommand::Create { ref project, .. })) if project == "acme"
        ));
    }
}
