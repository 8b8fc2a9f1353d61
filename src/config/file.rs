//! The settings file: TOML, every key optional, unknown keys refused with
//! their name. What it sets is overridden by flags and `TOLLGATE_*`
//! variables.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::llm::FileLlm;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSettings {
    pub listen: Option<SocketAddr>,
    pub db: Option<PathBuf>,
    pub tick_ms: Option<u64>,
    pub warn_seconds: Option<f64>,
    pub max_session_seconds: Option<f64>,
    pub max_sessions_per_human: Option<u32>,
    pub ping_secs: Option<f64>,
    pub max_token_ttl: Option<f64>,
    pub allowed_origins: Option<Vec<String>>,
    pub max_message_bytes: Option<usize>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_auth_failures_per_minute: Option<u32>,
    pub max_connections: Option<u32>,
    pub header_timeout_seconds: Option<f64>,
    pub max_db_mb: Option<u64>,
    #[serde(default)]
    pub upstream: FileUpstreams,
    #[serde(default)]
    pub llm: FileLlm,
}

/// `[upstream]`: one table per session kind, and what TLS to upstreams
/// trusts besides the system's roots.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreams {
    pub conversational: Option<FileUpstream>,
    pub voice_synthesis: Option<FileUpstream>,
    pub ca_file: Option<PathBuf>,
}

/// `[upstream.<kind>]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstream {
    pub url: String,
    /// Literal headers, for what is not secret.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Headers whose values are read from the named environment variables,
    /// so that a secret never sits in the file or on a command line.
    #[serde(default)]
    pub header_env: BTreeMap<String, String>,
    pub human_id_header: Option<String>,
    pub session_id_header: Option<String>,
    pub connect_timeout_seconds: Option<f64>,
}

impl FileSettings {
    pub fn read(path: &Path) -> Result<FileSettings, String> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            format!("cannot read the settings file {}: {error}", path.display())
        })?;
        toml::from_str(&text).map_err(|error| format!("{}: {error}", path.display()))
    }
}
