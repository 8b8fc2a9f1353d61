//! An OpenAI-compatible chat completions service written for the tests,
//! standing in for the model behind Tollgate's `POST /v1/chat/completions`:
//! plain, or TLS with a certificate from a CA made on the spot. It speaks
//! the real protocol over real sockets (a JSON answer, or server-sent events
//! when asked to stream), records every request, and counts the streamed
//! chunks that left it, so that a test can tell what the client was sent and
//! whether it went away before the end.
//!
//! It answers:
//!
//! - `POST /v1/chat/completions`: the [`Behaviour`]'s pieces, as one
//!   `chat.completion` or as `chat.completion.chunk` events;
//! - `GET /v1/models`: one model, `test-model`;
//! - anything else: 404 with an OpenAI error.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures::Stream;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Where the service reports the tokens it used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageMode {
    /// Non-streaming: a `usage` object in the body. Streaming: a final chunk with
    /// `"choices": []` and `usage`, sent only when the request has
    /// `stream_options.include_usage == true` (as OpenAI does).
    Reported,
    /// Streaming: the usage is on the last content chunk, whose `choices` is not empty
    /// (some OpenAI-compatible services do this), only when include_usage is asked.
    /// Non-streaming: as `Reported`.
    OnLastChoiceChunk,
    /// No usage anywhere (neither body nor chunks).
    Absent,
}

/// How the service answers.
#[derive(Clone, Debug)]
pub struct Behaviour {
    pub usage: UsageMode,
    /// prompt_tokens reported in usage.
    pub prompt_tokens: u64,
    /// The answer's pieces; each piece counts as one completion token and is sent as one
    /// streaming chunk. The answer is cut to `max_tokens` (or `max_completion_tokens`) pieces
    /// when the request gives one, with finish_reason "length"; otherwise "stop".
    pub pieces: Vec<String>,
    /// Delay before each streamed chunk (to let tests disconnect mid-stream).
    pub chunk_delay: Duration,
    /// When set, every request is answered with this status and body (an OpenAI error).
    pub fail: Option<(u16, Value)>,
}

impl Default for Behaviour {
    fn default() -> Behaviour {
        let pieces = [" one", " two", " three", " four", " five"];
        Behaviour {
            usage: UsageMode::Reported,
            prompt_tokens: 7,
            pieces: pieces.map(String::from).to_vec(),
            chunk_delay: Duration::ZERO,
            fail: None,
        }
    }
}

/// One request as the service received it.
#[derive(Clone, Debug)]
pub struct Received {
    /// Every header, names lowercase.
    pub headers: Vec<(String, String)>,
    /// The body as JSON: `null` when empty, a string when it is not JSON.
    pub body: Value,
    /// The request's path, without the query.
    pub path: String,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, value)| value.as_str())
    }
}

/// What the handlers share with the test.
struct Shared {
    behaviour: Mutex<Behaviour>,
    requests: Mutex<Vec<Received>>,
    chunks_sent: AtomicUsize,
    saw_disconnect: AtomicBool,
}

/// A running service. It stops accepting connections when dropped.
pub struct TestLlm {
    base_url: String,
    shared: Arc<Shared>,
    accepting: JoinHandle<()>,
    ca_file: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

impl TestLlm {
    /// A plain `http://` service on 127.0.0.1.
    pub async fn start(behaviour: Behaviour) -> TestLlm {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
        TestLlm::accept(listener, base_url, behaviour, None)
    }

    /// An `https://` service on 127.0.0.1, with a certificate for
    /// `localhost` and `127.0.0.1` signed by a CA whose certificate is in
    /// [`TestLlm::ca_file`].
    pub async fn start_tls(behaviour: Behaviour) -> TestLlm {
        let (acceptor, ca_pem) = tls_acceptor();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let base_url = format!("https://localhost:{port}/v1");
        let mut llm = TestLlm::accept(listener, base_url, behaviour, Some(acceptor));
        llm.ca_file = Some(ca_file);
        llm._dir = Some(dir);
        llm
    }

    /// Serves every connection of `listener`, through TLS when given an
    /// acceptor.
    fn accept(
        listener: TcpListener,
        base_url: String,
        behaviour: Behaviour,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> TestLlm {
        let shared = Arc::new(Shared {
            behaviour: Mutex::new(behaviour),
            requests: Mutex::default(),
            chunks_sent: AtomicUsize::new(0),
            saw_disconnect: AtomicBool::new(false),
        });
        let router = Router::new().fallback(answer).with_state(shared.clone());
        let accepting = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (router, tls) = (router.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        None => serve(stream, router).await,
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                serve(stream, router).await;
                            }
                        }
                    }
                });
            }
        });
        TestLlm { base_url, shared, accepting, ca_file: None, _dir: None }
    }

    /// Base URL as an OpenAI SDK would take it: "http://127.0.0.1:PORT/v1"
    /// (https://localhost:PORT/v1 for TLS).
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// For TLS: path of a PEM file holding the CA certificate (kept alive with the TestLlm).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.ca_file.clone()
    }

    /// Every request so far, to any path, oldest first.
    pub fn requests(&self) -> Vec<Received> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// How many streamed content chunks were written to the socket successfully so far,
    /// across all requests.
    pub fn chunks_sent(&self) -> usize {
        self.shared.chunks_sent.load(Ordering::SeqCst)
    }

    /// Set once a streaming response's connection was dropped by the client before the
    /// stream ended.
    pub fn saw_disconnect(&self) -> bool {
        self.shared.saw_disconnect.load(Ordering::SeqCst)
    }

    /// Replaces the behaviour for later requests.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.shared.behaviour.lock().unwrap() = behaviour;
    }
}

impl Drop for TestLlm {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// Serves one connection with HTTP/1.1, as most OpenAI-compatible services
/// behind a load balancer are seen by their clients.
async fn serve<S>(stream: S, router: Router)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let service = TowerToHyperService::new(router);
    let connection = hyper::server::conn::http1::Builder::new();
    // An error is the client going away mid-answer, which tests do on purpose.
    let _ = connection.serve_connection(TokioIo::new(stream), service).await;
}

/// Every request comes here, so that each is recorded and a failing
/// behaviour fails them all, whatever the path.
async fn answer(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body = parse(&body);
    shared.requests.lock().unwrap().push(Received {
        headers: headers
            .iter()
            .map(|(name, value)| {
                (name.as_str().to_owned(), value.to_str().unwrap_or("").to_owned())
            })
            .collect(),
        body: body.clone(),
        path: uri.path().to_owned(),
    });
    // A snapshot, so that `set_behaviour` during a stream changes only
    // later requests.
    let behaviour = shared.behaviour.lock().unwrap().clone();
    if let Some((status, error)) = behaviour.fail {
        return (StatusCode::from_u16(status).unwrap(), Json(error)).into_response();
    }
    match (method, uri.path()) {
        (Method::POST, "/v1/chat/completions") => complete(shared, &behaviour, &body),
        (Method::GET, "/v1/models") => Json(models()).into_response(),
        _ => error(StatusCode::NOT_FOUND, "invalid_request_error", "Unknown request URL"),
    }
}

fn parse(body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

fn models() -> Value {
    json!({
        "object": "list",
        "data": [{ "id": "test-model", "object": "model", "created": 0, "owned_by": "tests" }],
    })
}

/// An error as OpenAI shapes them.
fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let body =
        json!({ "error": { "message": message, "type": kind, "param": null, "code": null } });
    (status, Json(body)).into_response()
}

/// What one request is answered with, streamed or not.
struct Answer {
    model: Value,
    created: u64,
    pieces: Vec<String>,
    finish_reason: &'static str,
    usage: Value,
}

impl Answer {
    /// The behaviour's pieces, cut to the request's token limit.
    fn to(request: &Value, behaviour: &Behaviour) -> Answer {
        let limit = request["max_completion_tokens"].as_u64().or(request["max_tokens"].as_u64());
        let limit = limit.map_or(usize::MAX, |limit| limit as usize);
        let pieces: Vec<String> = behaviour.pieces.iter().take(limit).cloned().collect();
        let cut = pieces.len() < behaviour.pieces.len();
        let (prompt, completion) = (behaviour.prompt_tokens, pieces.len() as u64);
        Answer {
            model: request.get("model").cloned().unwrap_or_else(|| json!("test-model")),
            created: SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs(),
            pieces,
            finish_reason: if cut { "length" } else { "stop" },
            usage: json!({
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }),
        }
    }

    fn completion(&self, mode: UsageMode) -> Value {
        let mut body = json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": self.pieces.concat() },
                "finish_reason": self.finish_reason,
            }],
        });
        if mode != UsageMode::Absent {
            body["usage"] = self.usage.clone();
        }
        body
    }

    /// The events of the stream, in order.
    fn events(&self, mode: UsageMode, include_usage: bool) -> Vec<Event> {
        // With include_usage, OpenAI puts `"usage": null` on every chunk but
        // the one that carries it; a client must tell the two apart.
        let usage = include_usage && mode != UsageMode::Absent;
        let null = if usage { Some(Value::Null) } else { None };
        let mut events = vec![Event::Chunk(self.chunk(
            json!([choice(json!({ "role": "assistant", "content": "" }), Value::Null)]),
            null.clone(),
        ))];
        for piece in &self.pieces {
            let choices = json!([choice(json!({ "content": piece }), Value::Null)]);
            events.push(Event::Content(self.chunk(choices, null.clone())));
        }
        let last = json!([choice(json!({}), json!(self.finish_reason))]);
        match mode {
            UsageMode::OnLastChoiceChunk if usage => {
                events.push(Event::Chunk(self.chunk(last, Some(self.usage.clone()))));
            }
            UsageMode::Reported if usage => {
                events.push(Event::Chunk(self.chunk(last, null)));
                events.push(Event::Chunk(self.chunk(json!([]), Some(self.usage.clone()))));
            }
            _ => events.push(Event::Chunk(self.chunk(last, null))),
        }
        events.push(Event::Done);
        events
    }

    fn chunk(&self, choices: Value, usage: Option<Value>) -> Value {
        let mut chunk = json!({
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            chunk["usage"] = usage;
        }
        chunk
    }
}

fn choice(delta: Value, finish_reason: Value) -> Value {
    json!({ "index": 0, "delta": delta, "finish_reason": finish_reason })
}

/// One server-sent event of a stream.
enum Event {
    Chunk(Value),
    /// A chunk with a piece of the answer, the ones `chunks_sent` counts.
    Content(Value),
    /// `data: [DONE]`, the end of the stream.
    Done,
}

fn complete(shared: Arc<Shared>, behaviour: &Behaviour, request: &Value) -> Response {
    if !request.is_object() {
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", "The body is not JSON");
    }
    let answer = Answer::to(request, behaviour);
    if request["stream"] != true {
        return Json(answer.completion(behaviour.usage)).into_response();
    }
    let include_usage = request["stream_options"]["include_usage"] == true;
    let events = answer.events(behaviour.usage, include_usage);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream(shared, events, behaviour.chunk_delay)))
        .unwrap()
}

/// Notes a disconnect when a stream is dropped before its end: hyper drops
/// the body once the client has closed the connection.
struct Watch {
    shared: Arc<Shared>,
    ended: bool,
}

impl Drop for Watch {
    fn drop(&mut self) {
        if !self.ended {
            self.shared.saw_disconnect.store(true, Ordering::SeqCst);
        }
    }
}

/// The events, one at a time and each after `delay`, so that the client can
/// go away between two of them.
fn stream(
    shared: Arc<Shared>,
    events: Vec<Event>,
    delay: Duration,
) -> impl Stream<Item = Result<String, Infallible>> {
    let watch = Watch { shared, ended: false };
    futures::stream::unfold(
        (events.into_iter(), watch),
        move |(mut events, mut watch)| async move {
            let event = events.next()?;
            if !matches!(event, Event::Done) {
                tokio::time::sleep(delay).await;
            }
            let data = match event {
                Event::Chunk(chunk) => chunk.to_string(),
                Event::Content(chunk) => {
                    watch.shared.chunks_sent.fetch_add(1, Ordering::SeqCst);
                    chunk.to_string()
                }
                Event::Done => {
                    watch.ended = true;
                    "[DONE]".to_owned()
                }
            };
            Some((Ok(format!("data: {data}\n\n")), (events, watch)))
        },
    )
}

/// A TLS acceptor for `localhost` and 127.0.0.1 with a certificate signed
/// by a new CA, and the CA's certificate as PEM.
fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use tokio_rustls::rustls;

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let leaf = CertificateParams::new(names).unwrap().signed_by(&leaf_key, &ca).unwrap();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], key)
        .unwrap();
    // Only HTTP/1.1 is served; saying so keeps a client from trying h2.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem())
}
