//! The services behind sessions, as the settings file describes them, and
//! the checks they pass at start-up.

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tracing::warn;

use super::file::FileUpstream;
use super::within;
use crate::limits::SessionKind;

const DEFAULT_CONNECT_TIMEOUT_SECONDS: f64 = 10.0;
const DEFAULT_HUMAN_ID_HEADER: &str = "x-human-id";
const DEFAULT_SESSION_ID_HEADER: &str = "x-session-id";

/// Headers of the WebSocket handshake itself, which a configured header
/// would break.
const HANDSHAKE_HEADERS: [&str; 7] = [
    "host",
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
];

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

/// Checks `[upstream.<kind>]` and reads the headers it takes from the
/// environment.
pub fn check(kind: &str, file: Option<FileUpstream>) -> Result<Option<Upstream>, String> {
    let Some(file) = file else {
        return Ok(None);
    };
    let key = format!("upstream.{kind}");
    check_url(&key, &file.url)?;
    let name_or = |given: &Option<String>, default: &str| {
        header_name(&key, given.as_deref().unwrap_or(default))
    };
    let human_id_header = name_or(&file.human_id_header, DEFAULT_HUMAN_ID_HEADER)?;
    let session_id_header = name_or(&file.session_id_header, DEFAULT_SESSION_ID_HEADER)?;
    if human_id_header == session_id_header {
        return Err(format!("{key}: human_id_header and session_id_header are the same"));
    }
    let headers = headers(&key, &file, [&human_id_header, &session_id_header])?;
    if file.url.starts_with("ws://") && !file.header_env.is_empty() {
        warn!(upstream = kind, "secret headers go to a ws:// upstream unencrypted");
    }
    let timeout = file.connect_timeout_seconds.unwrap_or(DEFAULT_CONNECT_TIMEOUT_SECONDS);
    let connect_timeout = within(&format!("{key}.connect_timeout_seconds"), timeout, 0.1, 300.0)?;
    Ok(Some(Upstream {
        url: file.url,
        headers,
        human_id_header,
        session_id_header,
        connect_timeout,
    }))
}

fn check_url(key: &str, url: &str) -> Result<(), String> {
    let refused = || format!("{key}.url must be a ws:// or wss:// URL with a host, not {url:?}");
    if !(url.starts_with("ws://") || url.starts_with("wss://")) {
        return Err(refused());
    }
    let request = url.into_client_request().map_err(|_| refused())?;
    match request.uri().host() {
        Some(host) if !host.is_empty() => Ok(()),
        _ => Err(refused()),
    }
}

/// The literal headers and those read from the environment, each named at
/// most once and none that the server sets itself.
fn headers(
    key: &str,
    file: &FileUpstream,
    server_sets: [&HeaderName; 2],
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
    for (name, value) in &file.headers {
        headers.push((header_name(key, name)?, header_value(key, name, value)?));
    }
    for (name, variable) in &file.header_env {
        let value = secret_from_env(&format!("{key}.header_env.{name}"), variable)?;
        let mut value = header_value(key, name, &value)?;
        value.set_sensitive(true);
        headers.push((header_name(key, name)?, value));
    }
    for (index, (name, _)) in headers.iter().enumerate() {
        if server_sets.contains(&name) || HANDSHAKE_HEADERS.contains(&name.as_str()) {
            return Err(format!("{key}: the header {name} is set by the server"));
        }
        if headers[..index].iter().any(|(earlier, _)| earlier == name) {
            return Err(format!("{key}: the header {name} is given twice"));
        }
    }
    Ok(headers)
}

/// The value of a variable named in `header_env`. An empty one is refused
/// like an unset one: the upstream would get an empty header where it
/// expects a secret.
fn secret_from_env(key: &str, variable: &str) -> Result<String, String> {
    match std::env::var(variable) {
        Ok(value) if value.is_empty() => {
            Err(format!("{key}: the environment variable {variable} is empty"))
        }
        Ok(value) => Ok(value),
        Err(_) => Err(format!("{key}: the environment variable {variable} is not set")),
    }
}

fn header_name(key: &str, name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{key}: {name:?} is not a valid header name"))
}

fn header_value(key: &str, name: &str, value: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value)
        .map_err(|_| format!("{key}: the value for {name} is not a valid header value"))
}
