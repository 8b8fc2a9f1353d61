//! The chat completions proxy's settings: the OpenAI-compatible service it
//! forwards to (none means the built-in `echo` model), the key it forwards
//! with, and the caps it puts on a request.

use std::time::Duration;

use axum::http::{HeaderValue, Uri};
use serde::Deserialize;

use super::within;

/// The variable the upstream's API key is read from. Only the environment
/// can give it, so that it never sits in a file or on a command line.
pub const API_KEY_VARIABLE: &str = "TOLLGATE_LLM_API_KEY";

/// A request that gives no cap of its own may still write a long answer;
/// this is what its human's tokens are held for while it runs.
const DEFAULT_MAX_TOKENS: u32 = 4096;
/// Long conversations, with images as data URLs, run to megabytes.
const DEFAULT_MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// An upstream that sends nothing for this long is given up on. Reasoning
/// models can think for minutes before their first byte.
const DEFAULT_IDLE_TIMEOUT_SECONDS: f64 = 600.0;

/// Which request field carries the cap on an answer's length. OpenAI's
/// newer models take only `max_completion_tokens`; many compatible
/// services take only `max_tokens`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapField {
    #[default]
    MaxTokens,
    MaxCompletionTokens,
}

impl CapField {
    pub fn as_str(self) -> &'static str {
        match self {
            CapField::MaxTokens => "max_tokens",
            CapField::MaxCompletionTokens => "max_completion_tokens",
        }
    }
}

/// `[llm]` in the settings file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLlm {
    pub upstream: Option<String>,
    pub default_max_tokens: Option<u32>,
    pub cap_field: Option<CapField>,
    pub max_request_bytes: Option<usize>,
    pub idle_timeout_seconds: Option<f64>,
}

/// The proxy's settings, checked.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// `None`: the built-in `echo` model answers.
    pub upstream: Option<LlmUpstream>,
    /// The completion tokens held for a request that names no cap.
    pub default_max_tokens: u32,
    pub cap_field: CapField,
    pub max_request_bytes: usize,
    pub idle_timeout: Duration,
}

impl Default for LlmSettings {
    fn default() -> LlmSettings {
        LlmSettings {
            upstream: None,
            default_max_tokens: DEFAULT_MAX_TOKENS,
            cap_field: CapField::default(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            idle_timeout: Duration::from_secs_f64(DEFAULT_IDLE_TIMEOUT_SECONDS),
        }
    }
}

/// An OpenAI-compatible service.
#[derive(Debug, Clone)]
pub struct LlmUpstream {
    /// The base URL an OpenAI SDK would be given, such as
    /// `https://api.openai.com/v1`, without a trailing slash.
    pub base_url: String,
    /// `Bearer <key>`, marked sensitive so that it never prints.
    pub authorization: Option<HeaderValue>,
}

impl LlmUpstream {
    /// The URL of an endpoint under the base, such as `chat/completions`.
    pub fn endpoint(&self, path: &str) -> Uri {
        format!("{}/{path}", self.base_url).parse().expect("a checked base URL and a fixed path")
    }
}

/// Checks the proxy's settings; `flag_upstream` wins over the file's.
pub fn check(
    flag_upstream: Option<String>,
    flag_max_tokens: Option<u32>,
    file: FileLlm,
) -> Result<LlmSettings, String> {
    let defaults = LlmSettings::default();
    let upstream = match flag_upstream.or(file.upstream) {
        Some(url) => Some(upstream(&url)?),
        None => None,
    };
    let default_max_tokens =
        flag_max_tokens.or(file.default_max_tokens).unwrap_or(DEFAULT_MAX_TOKENS);
    if default_max_tokens == 0 {
        return Err("llm.default_max_tokens (--llm-default-max-tokens) must be at least 1".into());
    }
    let max_request_bytes = file.max_request_bytes.unwrap_or(defaults.max_request_bytes);
    if !(64 * 1024..=256 * 1024 * 1024).contains(&max_request_bytes) {
        return Err("llm.max_request_bytes must be from 64 KiB to 256 MiB".into());
    }
    let idle = file.idle_timeout_seconds.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECONDS);
    Ok(LlmSettings {
        upstream,
        default_max_tokens,
        cap_field: file.cap_field.unwrap_or_default(),
        max_request_bytes,
        idle_timeout: within("llm.idle_timeout_seconds", idle, 1.0, 86_400.0)?,
    })
}

fn upstream(url: &str) -> Result<LlmUpstream, String> {
    let refused = || {
        format!(
            "llm.upstream (--llm-upstream) must be an http:// or https:// base URL such as \
             https://api.openai.com/v1, not {url:?}"
        )
    };
    let uri: Uri = url.parse().map_err(|_| refused())?;
    let http = matches!(uri.scheme_str(), Some("http" | "https"));
    let host = uri.authority().filter(|a| !a.host().is_empty() && !a.as_str().contains('@'));
    if !http || host.is_none() || uri.query().is_some() || url.contains('#') {
        return Err(refused());
    }
    let base_url = url.trim_end_matches('/').to_owned();
    let authorization = match std::env::var(API_KEY_VARIABLE) {
        Ok(key) if !key.is_empty() => Some(bearer(&key)?),
        _ => None,
    };
    Ok(LlmUpstream { base_url, authorization })
}

fn bearer(key: &str) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
        .map_err(|_| format!("{API_KEY_VARIABLE} cannot be sent as a header value"))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_url(url: &str) -> Result<LlmSettings, String> {
        check(Some(url.into()), None, FileLlm::default())
    }

    #[test]
    fn endpoints_go_under_the_base_url_with_or_without_its_slash() {
        for base in ["https://api.example.com/v1", "https://api.example.com/v1/"] {
            let upstream = with_url(base).unwrap().upstream.unwrap();
            let url = upstream.endpoint("chat/completions");
            assert_eq!(url.to_string(), "https://api.example.com/v1/chat/completions");
        }
        let upstream = with_url("http://127.0.0.1:9000").unwrap().upstream.unwrap();
        assert_eq!(upstream.endpoint("models").to_string(), "http://127.0.0.1:9000/models");
    }

    #[test]
    fn a_base_url_that_is_not_plain_http_is_refused() {
        for bad in
            ["ftp://x/v1", "https://x/v1?key=1", "https://u:pw@x/v1", "x/v1", "", "https://x/v1#a"]
        {
            let error = with_url(bad).unwrap_err();
            assert!(error.contains("--llm-upstream"), "{bad}: {error}");
        }
    }

    #[test]
    fn caps_and_sizes_are_checked() {
        assert!(check(None, Some(0), FileLlm::default()).is_err());
        let file = FileLlm { max_request_bytes: Some(10), ..FileLlm::default() };
        assert!(check(None, None, file).unwrap_err().contains("max_request_bytes"));
        let settings = check(None, None, FileLlm::default()).unwrap();
        assert!(settings.upstream.is_none());
        assert_eq!(settings.default_max_tokens, DEFAULT_MAX_TOKENS);
    }
}
