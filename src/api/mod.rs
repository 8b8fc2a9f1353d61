//! The HTTP API: routes, shared state and the request span. Every route is
//! served under both `/v1` and `/api/v1`.

mod auth;
mod auth_failures;
mod completions;
pub mod error;
pub(crate) mod extract;
mod health;
mod listings;
mod realtime;
pub(crate) mod reports;
pub(crate) mod tokens;
pub(crate) mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, MatchedPath};
use axum::http::{HeaderValue, Method, Request, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use tokio_util::sync::CancellationToken;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::debug_span;

use crate::config::{AllowedOrigins, Settings};
use crate::llm::Proxy;
use crate::meter::{Health, MeterHandle};
use crate::store::Store;
use crate::upstream::UpstreamClient;
use error::ApiError;

pub use auth_failures::AuthFailures;

/// How long a client may take to send a request's body once its headers
/// are in. Bodies are at most 64 KiB; a client that stalls mid-body would
/// otherwise hold its connection, and shutdown, for as long as it likes.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a browser may reuse the answer to a CORS preflight.
const CORS_MAX_AGE: Duration = Duration::from_secs(600);

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub meter: MeterHandle,
    pub settings: Arc<Settings>,
    pub health: Arc<Health>,
    /// Cancelled when the server starts shutting down.
    pub shutdown: CancellationToken,
    /// How sessions reach their upstreams; `None` when every kind echoes.
    pub upstream_client: Option<Arc<UpstreamClient>>,
    /// The chat completions proxy.
    pub llm: Arc<Proxy>,
    /// Failed authentications by client address.
    pub auth_failures: Arc<AuthFailures>,
}

impl AppState {
    /// Fails while usage cannot be recorded (a failed commit, this server
    /// closed out by another sharing the database, the meter gone) or
    /// the server is shutting down: what would use anything is refused.
    pub fn check_recording(&self) -> Result<(), ApiError> {
        if self.health.is_recording() && self.meter.is_running() && !self.shutdown.is_cancelled() {
            return Ok(());
        }
        Err(ApiError::Unavailable("usage cannot be recorded right now; try again later"))
    }
}

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/usage/token", post(tokens::create).put(tokens::change_limits))
        .route("/usage/limits", get(tokens::limits))
        .route("/usage/token/revoke", post(tokens::revoke))
        .route("/usage/token/check", post(tokens::check))
        .route("/usage/token/update_ttl", post(tokens::update_ttl))
        .route("/usage/report", post(reports::report))
        .route("/usage/events", get(listings::events))
        .route("/webhook", put(webhooks::set).get(webhooks::get).delete(webhooks::delete))
        .route("/webhook/rotate", post(webhooks::rotate))
        .route("/webhook/deliveries", get(webhooks::deliveries))
        .route("/webhook/deliveries/{id}/retry", post(webhooks::retry))
        .route("/realtime/session", get(realtime::open))
        .route("/realtime/sessions", get(listings::sessions))
        .route("/chat/completions", post(completions::chat).fallback(completions::wrong_method))
        .route("/models", get(completions::models).fallback(completions::wrong_method))
        .method_not_allowed_fallback(method_not_allowed);
    let v1 = match cors(&state.settings.allowed_origins) {
        Some(cors) => v1.layer(cors).layer(middleware::from_fn(keep_backend_headers_out)),
        None => v1,
    };
    // The method fallback is set before the API's routes are nested, so
    // that it does not replace theirs, which CORS wraps.
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(crate::metrics::render))
        .method_not_allowed_fallback(method_not_allowed)
        .nest("/v1", v1.clone())
        .nest("/api/v1", v1)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(extract::MAX_BODY_BYTES))
        .layer(RequestBodyTimeoutLayer::new(BODY_TIMEOUT))
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .with_state(state)
}

/// CORS for the allowed origins, on the API's routes (an `OPTIONS` request
/// to one of them is answered as a preflight), so that pages can read
/// their limits and call the chat completions endpoint with a usage token.
/// The request headers a preflight asks for are allowed, because OpenAI's
/// browser SDK sends headers of its own that change between versions; all
/// but the backend's, which [`keep_backend_headers_out`] removes first.
fn cors(origins: &AllowedOrigins) -> Option<CorsLayer> {
    let allow = match origins {
        AllowedOrigins::None => return None,
        AllowedOrigins::Any => AllowOrigin::any(),
        AllowedOrigins::List(list) => AllowOrigin::list(list.clone()),
    };
    let layer = CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PUT])
        .allow_headers(AllowHeaders::mirror_request())
        .max_age(CORS_MAX_AGE);
    Some(layer)
}

/// Headers only an app's backend sends: an API key has no business in a
/// page, so a browser is never allowed to send one.
const BACKEND_HEADERS: [&str; 2] = ["x-api-key", "x-human-id"];

/// Takes the backend's headers out of the headers a preflight asks to
/// send, so that the preflight's answer does not allow them and the
/// browser refuses to send the request.
async fn keep_backend_headers_out(mut request: Request<Body>, next: Next) -> Response {
    let asked = request.headers().get(header::ACCESS_CONTROL_REQUEST_HEADERS);
    if request.method() == Method::OPTIONS
        && let Some(asked) = asked.and_then(|value| value.to_str().ok())
    {
        let kept: Vec<&str> = asked
            .split(',')
            .map(str::trim)
            .filter(|name| !BACKEND_HEADERS.iter().any(|b| name.eq_ignore_ascii_case(b)))
            .collect();
        let kept = HeaderValue::from_str(&kept.join(", ")).expect("taken from a header value");
        request.headers_mut().insert(header::ACCESS_CONTROL_REQUEST_HEADERS, kept);
    }
    next.run(request).await
}

/// A span per request with the method and the route it matched. Neither
/// the query string (which carries usage tokens for WebSockets) nor the
/// path as sent (which a confused client may fill with one) is recorded.
fn request_span<B>(request: &Request<B>) -> tracing::Span {
    let route = request.extensions().get::<MatchedPath>().map(MatchedPath::as_str);
    debug_span!("request", method = %request.method(), route = route.unwrap_or("<none>"))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
