//! An app's backend for the demo page in a browser: it holds the API key,
//! mints a usage token for each visitor and sells them more time. The page
//! (`examples/web/`, built into this binary) then talks to Tollgate
//! directly with the token: it opens a metered session, streams the
//! microphone and plays back what comes back.
//!
//! ```sh
//! cargo run --release -- --allowed-origins http://127.0.0.1:3000
//! TOLLGATE_API_KEY=tgk_... cargo run --release --example demo_backend
//! ```
//!
//! Then open <http://127.0.0.1:3000>. Settings, from the environment:
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `TOLLGATE_API_KEY` | required | the key Tollgate printed on its first start |
//! | `TOLLGATE_URL` | `http://127.0.0.1:8080` | Tollgate, for this server and for the page |
//! | `DEMO_LISTEN` | `127.0.0.1:3000` | address of this server |
//! | `DEMO_SECONDS` | `20` | conversational seconds a new visitor gets |
//!
//! Endpoints, besides the page:
//!
//! - `POST /api/token` with `{"visitor": "..."}`: a fresh usage token for the
//!   visitor, the Tollgate URL to use it with, and the seconds left. A
//!   visitor Tollgate has no limit for yet gets `DEMO_SECONDS`; one it knows
//!   keeps what is left, so reloading the page refills nothing.
//! - `POST /api/buy` with `{"visitor": "..."}`: adds 30 seconds
//!   (`PUT /v1/usage/token`, `mode: "add"`) and answers the seconds left.
//!
//! The API key never leaves this process: the page only ever sees usage
//! tokens.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Json, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

const DEFAULT_LISTEN: &str = "127.0.0.1:3000";
const DEFAULT_TOLLGATE_URL: &str = "http://127.0.0.1:8080";
const DEFAULT_SECONDS: f64 = 20.0;
/// What one click on "Buy" adds.
const TOP_UP_SECONDS: f64 = 30.0;
/// A page asks for a fresh token for every conversation, so tokens can be
/// short-lived.
const TOKEN_TTL_SECONDS: f64 = 900.0;
const LIMIT_TYPE: &str = "conversational_seconds";

/// The page, built in so that the binary runs from any directory.
const PAGE: &[(&str, &str, &str)] = &[
    ("/", "text/html; charset=utf-8", include_str!("web/index.html")),
    ("/app.js", "text/javascript; charset=utf-8", include_str!("web/app.js")),
    (
        "/capture-worklet.js",
        "text/javascript; charset=utf-8",
        include_str!("web/capture-worklet.js"),
    ),
    ("/style.css", "text/css; charset=utf-8", include_str!("web/style.css")),
];

struct Config {
    listen: SocketAddr,
    tollgate: String,
    key: String,
    seconds: f64,
}

impl Config {
    fn from_env() -> anyhow::Result<Config> {
        let key = std::env::var("TOLLGATE_API_KEY").map_err(|_| {
            anyhow::anyhow!(
                "TOLLGATE_API_KEY is not set: give the tgk_... key that Tollgate printed on its \
                 first start, as in TOLLGATE_API_KEY=tgk_... cargo run --example demo_backend"
            )
        })?;
        let key = key.trim().to_owned();
        if !key.starts_with("tgk_") {
            bail!("TOLLGATE_API_KEY must be an API key, tgk_...; a usage token will not do");
        }
        let listen = var("DEMO_LISTEN", DEFAULT_LISTEN);
        let listen = listen
            .parse()
            .with_context(|| format!("DEMO_LISTEN must be an address such as {DEFAULT_LISTEN}"))?;
        let tollgate = var("TOLLGATE_URL", DEFAULT_TOLLGATE_URL).trim_end_matches('/').to_owned();
        if !tollgate.starts_with("http://") {
            bail!("TOLLGATE_URL must be a plain http:// URL such as {DEFAULT_TOLLGATE_URL}");
        }
        let seconds = var("DEMO_SECONDS", &DEFAULT_SECONDS.to_string());
        let seconds: f64 = seconds
            .parse()
            .ok()
            .filter(|s: &f64| (0.0..=1e6).contains(s))
            .context("DEMO_SECONDS must be a number of seconds from 0 to 1000000")?;
        Ok(Config { listen, tollgate, key, seconds })
    }
}

fn var(name: &str, default: &str) -> String {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty()).unwrap_or_else(|| default.into())
}

struct Backend {
    tollgate: String,
    key: String,
    seconds: f64,
    http: reqwest::Client,
    /// Held from reading a visitor's limits to minting, so that two tabs
    /// of a new visitor cannot both grant the first seconds.
    minting: Mutex<()>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let config = Config::from_env()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (DEMO_LISTEN)", config.listen))?;
    let origin = page_origin(listener.local_addr()?);
    let backend = Arc::new(Backend {
        tollgate: config.tollgate,
        key: config.key,
        seconds: config.seconds,
        http: reqwest::Client::new(),
        minting: Mutex::new(()),
    });
    println!("Tollgate demo backend, for Tollgate at {}", backend.tollgate);
    println!("Each new visitor gets {} conversational seconds.", backend.seconds);
    println!("Open {origin} in a browser.");
    tokio::spawn(check_tollgate(backend.clone(), origin.clone()));

    let security = security_headers(&backend.tollgate);
    let mut app = Router::new();
    for &(path, content_type, body) in PAGE {
        app = app.route(
            path,
            get(move || async move { ([(header::CONTENT_TYPE, content_type)], body) }),
        );
    }
    let app = app
        .route("/api/token", post(token))
        .route("/api/buy", post(buy))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found") })
        .layer(middleware::map_response(move |mut response: Response| {
            let security = security.clone();
            async move {
                response.headers_mut().extend(security);
                response
            }
        }))
        .with_state(backend);
    axum::serve(listener, app).await.context("the server stopped")
}

/// The origin a browser sees the page at; Tollgate must allow it.
fn page_origin(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".parse().unwrap(),
        ip if ip.is_unspecified() => "::1".parse().unwrap(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Headers for every answer. The policy lets the page reach its own origin
/// and Tollgate, nothing else.
fn security_headers(tollgate: &str) -> axum::http::HeaderMap {
    let ws = tollgate.replacen("http://", "ws://", 1);
    let policy = format!(
        "default-src 'self'; connect-src 'self' {tollgate} {ws}; img-src 'self' data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    let mut headers = axum::http::HeaderMap::new();
    let policy = HeaderValue::from_str(&policy).expect("TOLLGATE_URL is a valid header value");
    headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers
}

/// Warns, once at start, when Tollgate cannot be reached or does not allow
/// the page's origin; the page would then fail in ways a browser explains
/// poorly.
async fn check_tollgate(backend: Arc<Backend>, origin: String) {
    let request = backend.http.get(format!("{}/healthz", backend.tollgate));
    let answer = match request.header(header::ORIGIN, &origin).send().await {
        Ok(answer) => answer,
        Err(_) => {
            eprintln!("warning: Tollgate does not answer at {} (TOLLGATE_URL)", backend.tollgate);
            return;
        }
    };
    let allowed = answer.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN);
    if !allowed.is_some_and(|value| value == origin.as_str() || value == "*") {
        eprintln!(
            "warning: Tollgate does not allow pages from {origin}; \
             start it with --allowed-origins {origin}"
        );
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VisitorRequest {
    /// A random id the page keeps in its local storage.
    visitor: String,
}

/// `POST /api/token`: a usage token for the visitor.
async fn token(
    State(backend): State<Arc<Backend>>,
    request: Result<Json<VisitorRequest>, JsonRejection>,
) -> Result<Json<Value>, DemoError> {
    let human = human_of(request)?;
    let _minting = backend.minting.lock().await;
    let limits = backend.tollgate_call(Method::GET, "/v1/usage/limits", Some(&human), None).await?;
    let new_visitor = remaining_in(&limits).is_none();
    let mut body = json!({ "human": human, "ttl_seconds": TOKEN_TTL_SECONDS });
    if new_visitor {
        body["limits"] = json!([{ "type": LIMIT_TYPE, "value": backend.seconds }]);
    }
    let minted = backend.tollgate_call(Method::POST, "/v1/usage/token", None, Some(body)).await?;
    let token = minted["token"].as_str().ok_or(DemoError::Tollgate("no token in the answer"))?;
    Ok(Json(json!({
        "token": token,
        "tollgate_url": backend.tollgate,
        "expires_at": minted["expires_at"],
        "remaining": remaining_in(&minted["limits"]),
        "new_visitor": new_visitor,
    })))
}

/// `POST /api/buy`: 30 more seconds for the visitor.
async fn buy(
    State(backend): State<Arc<Backend>>,
    request: Result<Json<VisitorRequest>, JsonRejection>,
) -> Result<Json<Value>, DemoError> {
    let human = human_of(request)?;
    let body = json!({
        "human": human,
        "mode": "add",
        "limits": [{ "type": LIMIT_TYPE, "value": TOP_UP_SECONDS }],
    });
    let changed = backend.tollgate_call(Method::PUT, "/v1/usage/token", None, Some(body)).await?;
    Ok(Json(json!({ "added": TOP_UP_SECONDS, "remaining": remaining_in(&changed["limits"]) })))
}

/// The Tollgate human for a visitor id.
fn human_of(request: Result<Json<VisitorRequest>, JsonRejection>) -> Result<String, DemoError> {
    let Json(request) =
        request.map_err(|rejection| DemoError::BadRequest(rejection.body_text()))?;
    let visitor = request.visitor;
    let valid = (8..=64).contains(&visitor.len())
        && visitor.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !valid {
        return Err(DemoError::BadRequest("visitor: 8 to 64 letters, digits, - or _".into()));
    }
    Ok(format!("demo-{visitor}"))
}

/// The conversational seconds in a list of limits; `None` when there is no
/// such limit.
fn remaining_in(limits: &Value) -> Option<f64> {
    let limits = limits.as_array()?;
    limits.iter().find(|limit| limit["type"] == LIMIT_TYPE)?["value"].as_f64()
}

impl Backend {
    /// Calls Tollgate with the API key (and `x-human-id` when reading a
    /// human's limits) and returns its JSON answer.
    async fn tollgate_call(
        &self,
        method: Method,
        path: &str,
        human: Option<&str>,
        body: Option<Value>,
    ) -> Result<Value, DemoError> {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.tollgate))
            .header("x-api-key", &self.key);
        if let Some(human) = human {
            request = request.header("x-human-id", human);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer = request.send().await.map_err(|error| {
            eprintln!("error: Tollgate at {} does not answer: {error}", self.tollgate);
            DemoError::Tollgate("Tollgate does not answer")
        })?;
        let status = answer.status();
        let text = answer.text().await.unwrap_or_default();
        if !status.is_success() {
            eprintln!("error: Tollgate answered {path} with {status}: {text}");
            return Err(DemoError::Tollgate("Tollgate refused the request"));
        }
        serde_json::from_str(&text)
            .map_err(|_| DemoError::Tollgate("Tollgate's answer is not JSON"))
    }
}

/// An error as the page sees it: `{"error": "..."}`. What Tollgate said
/// goes to this server's log, not to the page.
enum DemoError {
    BadRequest(String),
    Tollgate(&'static str),
}

impl IntoResponse for DemoError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            DemoError::BadRequest(message) => (StatusCode::BAD_REQUEST, message),
            DemoError::Tollgate(message) => (StatusCode::BAD_GATEWAY, message.to_owned()),
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}
