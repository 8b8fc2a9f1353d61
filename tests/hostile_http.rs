//! Hostile HTTP input to every endpoint the usage-token table of
//! `tests/api.rs` leaves out: usage reports, the ledger and session
//! listings, the webhook and its deliveries, the chat completion endpoints
//! and the realtime upgrade. Each row must be refused with its documented
//! error and change nothing in the database. Bodies too large are refused
//! before they are all sent, and heads too long by hyper with 431.

mod common;

use std::time::Duration;

use common::hostile::*;
use common::receiver::Receiver;
use common::*;
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tollgate::secret::SecretKind;
use tollgate::webhooks::dispatch::DispatchSettings;

const INVALID: &str = "invalid_input";

/// A body far past every limit on bodies, the chat endpoint's 4 MiB too.
const TEN_MB: usize = 10 * 1024 * 1024;

/// A header value well past anything legitimate but within the head's
/// limit, so that it reaches the handlers.
const LONG_HEADER: usize = 40 * 1024;

/// What the rows refer to: credentials and ids of two projects.
struct World {
    server: TestServer,
    receiver: Receiver,
    /// The default project's `ada`, with 60 seconds and 100 tokens.
    token: String,
    /// A token of `gone`, revoked.
    revoked: String,
    /// A token of `broke`, whose limits are 0.
    broke: String,
    other_key: String,
    other_token: String,
    /// A session of the other project.
    other_session: String,
    /// A delivered webhook event of the other project.
    other_delivery: String,
    /// The key of a project without a webhook.
    bare_key: String,
}

/// A server whose webhook deliveries go out at once.
async fn server() -> TestServer {
    TestServer::start_with(|settings| {
        hostile::for_tables(settings);
        settings.webhooks =
            DispatchSettings { poll: Duration::from_millis(20), ..DispatchSettings::default() };
    })
    .await
}

async fn world() -> World {
    let server = server().await;
    let limits = json!([
        { "type": "conversational_seconds", "value": 60 },
        { "type": "token_cnt", "value": 100 },
    ]);
    let token = server.mint("ada", limits).await;
    let zero = json!([
        { "type": "conversational_seconds", "value": 0 },
        { "type": "token_cnt", "value": 0 },
    ]);
    let broke = server.mint("broke", zero).await;
    let revoked = server.mint("gone", json!([])).await;
    assert_eq!(server.post("/v1/usage/token/revoke", json!({ "human": "gone" })).await.0, 200);
    report(&server.api, "ada", "job-1").await;

    let other =
        Api::new(server.base.trim_start_matches("http://"), new_key(&server, "other").await);
    let other_token = other.mint("ada", json!([])).await;
    let other_session = one_session(&server, &other, &other_token).await;
    let receiver = Receiver::start().await;
    hook(&server.api, &receiver.url).await;
    hook(&other, &receiver.url).await;
    report(&other, "bob", "job-1").await;
    let other_delivery = delivered(&other).await;
    let bare_key = new_key(&server, "bare").await;
    World {
        server,
        receiver,
        token,
        revoked,
        broke,
        other_key: other.key,
        other_token,
        other_session,
        other_delivery,
        bare_key,
    }
}

async fn new_key(server: &TestServer, project: &str) -> String {
    tollgate::create_api_key(&server.db_setting, project).await.unwrap().expose().to_owned()
}

async fn report(api: &Api, human: &str, key: &str) {
    let body = json!({ "human": human, "type": "token_cnt", "value": 1, "idempotency_key": key });
    let (status, answer) = api.post("/v1/usage/report", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

async fn hook(api: &Api, url: &str) {
    let body = json!({ "url": url, "thresholds": [{ "type": "token_cnt", "value": 10 }] });
    let (status, answer) = api.put("/v1/webhook", body).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
}

/// Opens and closes a session; its id once its end is recorded.
async fn one_session(server: &TestServer, api: &Api, token: &str) -> String {
    let mut client = api.connect(token).await;
    let id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    client.close().await;
    wait_for_end(server, &id).await;
    id
}

/// The id of the project's one event, once it has been delivered.
async fn delivered(api: &Api) -> String {
    let deadline = tokio::time::Instant::now() + ANSWER_WAIT;
    while tokio::time::Instant::now() < deadline {
        let path = "/v1/webhook/deliveries?status=delivered";
        let (status, page) = api.backend(Method::GET, path, Value::Null).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        if let Some(id) = page["data"][0]["id"].as_str() {
            return id.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the event was never delivered");
}

// ---------------------------------------------------------------------------
// Rows shared by several endpoints
// ---------------------------------------------------------------------------

/// A body that is JSON of no kind, cut short, empty, or not an object.
fn bad_bodies(method: &Method, path: &str, headers: &Headers, truncated: &str) -> Vec<Case> {
    let row = |what: &str, body: &str| {
        case(what, method.clone(), path, headers.clone(), body, 400, INVALID, "")
    };
    let huge = vec![b' '; TEN_MB];
    vec![
        row("bad JSON", "not json at all"),
        row("truncated JSON", truncated),
        row("an empty body", ""),
        row("a JSON array", "[]"),
        row("a JSON string", r#""{}""#),
        row("bytes after the JSON", "{} {}"),
        case("a 10 MB body", method.clone(), path, headers.clone(), huge, 400, INVALID, ""),
    ]
}

/// The same body with a field set to each bare word JSON does not have,
/// and to numbers no field takes.
fn bad_numbers(method: &Method, path: &str, headers: &Headers, body: &str) -> Vec<Case> {
    let words = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e13", "-1"];
    words
        .into_iter()
        .map(|word| {
            let what = format!("{word} as a number");
            let body = body.replace("NUMBER", word);
            case(&what, method.clone(), path, headers.clone(), body, 400, INVALID, "")
        })
        .collect()
}

/// Credentials that may not call a backend endpoint.
fn backend_credentials(w: &World, method: &Method, path: &str, body: &str) -> Vec<Case> {
    let key = &w.server.key;
    let row = |what: &str, headers: Headers, status: u16, kind: &'static str| {
        case(what, method.clone(), path, headers, body, status, kind, "")
    };
    let named = |what: &str, headers: Headers, header: &'static str| {
        case(what, method.clone(), path, headers, body, 400, INVALID, header)
    };
    let bytes = raw(b"tgk_\xff\xfe");
    let long_key = "k".repeat(LONG_HEADER);
    vec![
        row("a usage token as Bearer", bearer_header(&w.token), 403, "forbidden"),
        row("a usage token in x-api-key", key_header(&w.token), 403, "forbidden"),
        row(
            "another project's key with this project's usage token",
            [key_header(&w.other_key), bearer_header(&w.token)].concat(),
            403,
            "forbidden",
        ),
        row(
            "another project's usage token beside the key",
            [key_header(key), bearer_header(&w.other_token)].concat(),
            403,
            "forbidden",
        ),
        row("a revoked usage token", bearer_header(&w.revoked), 403, "forbidden"),
        row("no credential", Vec::new(), 401, "unauthorized"),
        row(
            "a never-issued API key",
            key_header(&never_issued(SecretKind::ApiKey)),
            401,
            "unauthorized",
        ),
        row("the API key as Bearer", bearer_header(key), 401, "unauthorized"),
        row("a 40 KB x-api-key", key_header(&long_key), 401, "unauthorized"),
        named("a non-UTF-8 x-api-key", vec![("x-api-key", bytes)], "x-api-key"),
        named(
            "a non-UTF-8 Authorization beside the key",
            [key_header(key), vec![("authorization", raw(b"Bearer tgu_\xe9"))]].concat(),
            "authorization",
        ),
        named("x-api-key twice", [key_header(key), key_header(key)].concat(), "x-api-key"),
    ]
}

/// Credentials that may not call an endpoint a human may call, added to
/// `extra` headers (a WebSocket upgrade's, say).
fn human_credentials(
    w: &World,
    method: &Method,
    path: &str,
    body: &str,
    extra: &Headers,
) -> Vec<Case> {
    let key = &w.server.key;
    let row = |what: &str, headers: Headers, status: u16, kind: &'static str, mentions| {
        let headers = [extra.clone(), headers].concat();
        case(what, method.clone(), path, headers, body, status, kind, mentions)
    };
    let human = |value: HeaderValue| vec![("x-api-key", hv(key)), ("x-human-id", value)];
    let long = "h".repeat(LONG_HEADER);
    vec![
        row("no credential", Vec::new(), 401, "unauthorized", ""),
        row(
            "a never-issued token",
            bearer_header(&never_issued(SecretKind::UsageToken)),
            401,
            "unauthorized",
            "",
        ),
        row("a garbage token", bearer_header("tgu_garbage"), 401, "unauthorized", ""),
        row("a revoked token", bearer_header(&w.revoked), 401, "token_revoked", ""),
        row("the API key as Bearer", bearer_header(key), 401, "unauthorized", ""),
        row("a usage token in x-api-key", key_header(&w.token), 401, "unauthorized", ""),
        row(
            "a usage token in x-api-key with x-human-id",
            key_and_human(&w.token, "ada"),
            401,
            "unauthorized",
            "",
        ),
        row("a key without x-human-id", key_header(key), 400, INVALID, "x-human-id"),
        row(
            "another project's key with this project's token",
            [key_header(&w.other_key), bearer_header(&w.token)].concat(),
            400,
            INVALID,
            "x-human-id",
        ),
        row(
            "a non-UTF-8 Authorization",
            vec![("authorization", raw(b"Bearer tgu_\xff"))],
            400,
            INVALID,
            "authorization",
        ),
        row(
            "a non-UTF-8 x-api-key",
            vec![("x-api-key", raw(b"\x80tgk"))],
            400,
            INVALID,
            "x-api-key",
        ),
        row("a non-UTF-8 x-human-id", human(raw(b"ada\xc0")), 400, INVALID, "x-human-id"),
        row("an empty x-human-id", human(hv("")), 400, INVALID, "x-human-id"),
        row("a 40 KB x-human-id", human(hv(&long)), 400, INVALID, "x-human-id"),
        row(
            "x-human-id twice",
            [human(hv("ada")), vec![("x-human-id", hv("bob"))]].concat(),
            400,
            INVALID,
            "x-human-id",
        ),
        row("a 40 KB Bearer token", bearer_header(&format!("tgu_{long}")), 401, "unauthorized", ""),
    ]
}

// ---------------------------------------------------------------------------
// The tables, one per endpoint
// ---------------------------------------------------------------------------

/// `POST /usage/report`.
fn report_cases(w: &World) -> Vec<Case> {
    let (post, path, k) = (Method::POST, "/usage/report", key_header(&w.server.key));
    let good = r#"{"human": "ada", "type": "token_cnt", "value": 2, "idempotency_key": "job-2"}"#;
    let with = |field: &str, value: &str| {
        let mut body: Value = serde_json::from_str(good).unwrap();
        body[field] = serde_json::from_str(value).unwrap();
        body.to_string()
    };
    let bad = |what: &str, body: String, mentions: &'static str| {
        case(what, post.clone(), path, k.clone(), body, 400, INVALID, mentions)
    };
    let numbers = r#"{"human": "ada", "type": "conversational_seconds", "value": NUMBER,
                      "idempotency_key": "job-2"}"#;
    let mut cases = vec![
        bad("a value as a string", with("value", r#""2""#), "value"),
        bad("a value of 0", with("value", "0"), "value"),
        bad("a negative value", with("value", "-2"), "value"),
        bad("1.5 tokens", with("value", "1.5"), "value"),
        bad("a value of 1e13", with("value", "1e13"), "value"),
        bad("an unknown limit type", with("type", r#""video_seconds""#), "type"),
        bad("a type as a number", with("type", "3"), "type"),
        bad("a human as a number", with("human", "7"), "human"),
        bad("a human with a newline", with("human", r#""a\nb""#), "human"),
        bad("an empty idempotency key", with("idempotency_key", r#""""#), "idempotency_key"),
        bad(
            "a 256-byte idempotency key",
            with("idempotency_key", &format!("{:?}", "k".repeat(256))),
            "idempotency_key",
        ),
        bad(
            "an idempotency key with a tab",
            with("idempotency_key", r#""a\tb""#),
            "idempotency_key",
        ),
        bad("metadata as a string", with("metadata", r#""note""#), "metadata"),
        bad("metadata as a list", with("metadata", "[1]"), "metadata"),
        bad(
            "metadata over 16 KiB",
            with("metadata", &json!({ "x": "m".repeat(17_000) }).to_string()),
            "metadata",
        ),
        bad("an unknown field", with("colour", r#""red""#), "colour"),
        bad("both human and human_id", with("human_id", r#""ada""#), "human"),
        bad(
            "no idempotency key",
            good.replace(r#", "idempotency_key": "job-2""#, ""),
            "idempotency_key",
        ),
        case(
            "a key used before for another report",
            post.clone(),
            path,
            k.clone(),
            with("idempotency_key", r#""job-1""#),
            409,
            "idempotency_key_reused",
            "idempotency_key",
        ),
        wrong_method(Method::GET, path, k.clone()),
    ];
    cases.extend(bad_bodies(&post, path, &k, r#"{"human": "ada", "type": "token_cnt""#));
    cases.extend(bad_numbers(&post, path, &k, numbers));
    cases.extend(backend_credentials(w, &post, path, good));
    cases
}

/// A GET with a bad query, for the listings.
fn bad_queries(path: &str, k: &Headers, queries: &[(&str, &str, &'static str)]) -> Vec<Case> {
    queries
        .iter()
        .map(|(what, query, mentions)| {
            let path = format!("{path}?{query}");
            case(what, Method::GET, &path, k.clone(), "", 400, INVALID, mentions)
        })
        .collect()
}

/// Queries that no page of a listing takes.
const BAD_PAGES: [(&str, &str, &str); 9] = [
    ("an unknown parameter", "colour=red", "colour"),
    ("a parameter given twice", "limit=1&limit=2", "limit"),
    ("a limit of 0", "limit=0", "limit"),
    ("a limit of 1001", "limit=1001", "limit"),
    ("a negative limit", "limit=-1", "limit"),
    ("a limit of 1e400", "limit=1e400", "limit"),
    ("a limit of NaN", "limit=NaN", "limit"),
    ("a limit of Infinity", "limit=Infinity", "limit"),
    ("a limit past u64", "limit=99999999999999999999999", "limit"),
];

/// `GET /usage/events`.
fn events_cases(w: &World) -> Vec<Case> {
    let (path, k) = ("/usage/events", key_header(&w.server.key));
    let mut cases = bad_queries(path, &k, &BAD_PAGES);
    let queries = [
        ("an unknown type", "type=video_seconds", "type"),
        ("an empty human", "human=", "human"),
        ("a human with a newline", "human=a%0Ab", "human"),
        ("an after of -1", "after=-1", "after"),
        ("an after that is not a number", "after=ses_1", "after"),
        ("an after of 1e13", "after=1e13", "after"),
        ("an after of NaN", "after=NaN", "after"),
        ("an after past i64", "after=9223372036854775808", "after"),
    ];
    cases.extend(bad_queries(path, &k, &queries));
    cases.push(wrong_method(Method::POST, path, k));
    cases.extend(backend_credentials(w, &Method::GET, path, ""));
    cases
}

/// The endpoint asked with a method it does not take: 405, whatever else
/// the request holds.
fn wrong_method(method: Method, path: &str, headers: Headers) -> Case {
    let body = if method == Method::GET { "" } else { "{}" };
    let what = format!("{method} of {path}");
    case(&what, method, path, headers, body, 405, "method_not_allowed", "")
}

/// `GET /realtime/sessions`.
fn sessions_cases(w: &World) -> Vec<Case> {
    let (path, k) = ("/realtime/sessions", key_header(&w.server.key));
    let mut cases = bad_queries(path, &k, &BAD_PAGES);
    let unknown = format!("after=ses_{}", "0".repeat(32));
    let others = format!("after={}", w.other_session);
    let long_human = format!("human={}", "h".repeat(257));
    let queries = [
        ("an unknown state", "state=closed", "state"),
        ("an after that is not a session id", "after=17", "after"),
        ("an after of a session that never was", unknown.as_str(), "after"),
        ("an after of another project's session", others.as_str(), "after"),
        ("a human of 257 bytes", long_human.as_str(), "human"),
    ];
    cases.extend(bad_queries(path, &k, &queries));
    cases.push(wrong_method(Method::POST, path, k));
    cases.extend(backend_credentials(w, &Method::GET, path, ""));
    cases
}

/// `PUT`, `GET` and `DELETE /webhook`.
fn webhook_cases(w: &World) -> Vec<Case> {
    let (put, path, k) = (Method::PUT, "/webhook", key_header(&w.server.key));
    let bad = |what: &str, body: &str, mentions: &'static str| {
        case(what, put.clone(), path, k.clone(), body, 400, INVALID, mentions)
    };
    let url = |url: &str| json!({ "url": url }).to_string();
    let threshold =
        |limit: &str| format!(r#"{{"url": "http://a.test/", "thresholds": [{limit}]}}"#);
    let long_url = format!("http://a.test/{}", "p".repeat(2048));
    let numbers = r#"{"url": "http://a.test/",
                      "thresholds": [{"type": "token_cnt", "value": NUMBER}]}"#;
    let mut cases = vec![
        bad("no url", "{}", "url"),
        bad("a url as a number", r#"{"url": 80}"#, "url"),
        bad("an ftp url", &url("ftp://a.test/"), "url"),
        bad("a url without a host", &url("http:///x"), "url"),
        bad("a url with credentials", &url("http://user:pw@a.test/"), "url"),
        bad("a url with a fragment", &url("http://a.test/#x"), "url"),
        bad("a url with a bad port", &url("http://a.test:99999/"), "url"),
        bad("a url of 2063 bytes", &url(&long_url), "url"),
        bad("not a url", &url("hook me"), "url"),
        bad("no events", r#"{"url": "http://a.test/", "events": []}"#, "events"),
        bad("an unknown event", r#"{"url": "http://a.test/", "events": ["usage.x"]}"#, "events[0]"),
        bad(
            "events as a string",
            r#"{"url": "http://a.test/", "events": "usage.tracked"}"#,
            "events",
        ),
        bad(
            "a threshold of 0",
            &threshold(r#"{"type": "token_cnt", "value": 0}"#),
            "thresholds[0].value",
        ),
        bad(
            "a threshold of 1.5 tokens",
            &threshold(r#"{"type": "token_cnt", "value": 1.5}"#),
            "thresholds[0].value",
        ),
        bad(
            "a threshold of an unknown type",
            &threshold(r#"{"type": "video", "value": 1}"#),
            "thresholds[0].type",
        ),
        bad("a threshold without a value", &threshold(r#"{"type": "token_cnt"}"#), "thresholds[0]"),
        bad(
            "a type named twice",
            &threshold(r#"{"type": "token_cnt", "value": 1}, {"type": "token_cnt", "value": 2}"#),
            "thresholds[1].type",
        ),
        bad("an unknown field", r#"{"url": "http://a.test/", "secret": "mine"}"#, "secret"),
    ];
    cases.extend(bad_bodies(&put, path, &k, r#"{"url": "http://a.test/""#));
    cases.extend(bad_numbers(&put, path, &k, numbers));
    cases.extend(backend_credentials(w, &put, path, &url("http://a.test/")));
    for method in [Method::GET, Method::DELETE] {
        let none = case(
            "a project without a webhook",
            method.clone(),
            path,
            key_header(&w.bare_key),
            "",
            404,
            "not_found",
            "",
        );
        cases.push(none);
        cases.extend(backend_credentials(w, &method, path, ""));
    }
    cases.push(wrong_method(Method::POST, path, k));
    cases
}

/// `POST /webhook/rotate`.
fn rotate_cases(w: &World) -> Vec<Case> {
    let (post, path, k) = (Method::POST, "/webhook/rotate", key_header(&w.server.key));
    let bad = |what: &str, body: &str, mentions: &'static str| {
        case(what, post.clone(), path, k.clone(), body, 400, INVALID, mentions)
    };
    let mut cases = vec![
        bad("a grace as a string", r#"{"grace_seconds": "60"}"#, "grace_seconds"),
        bad("a grace past a week", r#"{"grace_seconds": 604801}"#, "grace_seconds"),
        bad("an unknown field", r#"{"grace": 60}"#, "grace"),
        bad("white space only", "   ", "request body"),
        case(
            "a project without a webhook",
            post.clone(),
            path,
            key_header(&w.bare_key),
            "",
            404,
            "not_found",
            "",
        ),
        wrong_method(Method::GET, path, k.clone()),
    ];
    // An empty body is a rotation with the default grace, so it is no row.
    let bodies = bad_bodies(&post, path, &k, r#"{"grace_seconds": 6"#);
    cases.extend(bodies.into_iter().filter(|case| !case.body.is_empty()));
    cases.extend(bad_numbers(&post, path, &k, r#"{"grace_seconds": NUMBER}"#));
    cases.extend(backend_credentials(w, &post, path, "{}"));
    cases
}

/// `GET /webhook/deliveries` and `POST /webhook/deliveries/{id}/retry`.
fn deliveries_cases(w: &World) -> Vec<Case> {
    let (path, k) = ("/webhook/deliveries", key_header(&w.server.key));
    let mut cases = bad_queries(path, &k, &BAD_PAGES);
    let queries = [
        ("an unknown status", "status=lost", "status"),
        ("an after that is not a number", "after=evt_1", "after"),
        ("an after of 1e400", "after=1e400", "after"),
        ("an after of NaN", "after=NaN", "after"),
    ];
    cases.extend(bad_queries(path, &k, &queries));
    cases.extend(backend_credentials(w, &Method::GET, path, ""));

    let theirs = format!("/webhook/deliveries/{}/retry", w.other_delivery);
    let post = Method::POST;
    let not_found = |what: &str, path: &str| {
        case(what, post.clone(), path, k.clone(), "", 404, "not_found", "")
    };
    cases.extend([
        not_found("a retry of another project's delivery", &theirs),
        not_found(
            "a retry of a delivery that never was",
            &format!("/webhook/deliveries/evt_{}/retry", "0".repeat(32)),
        ),
        not_found("a retry of a garbage id", "/webhook/deliveries/%00%ff/retry"),
        not_found("a retry of an empty id", "/webhook/deliveries//retry"),
        case("GET of a retry", Method::GET, &theirs, k.clone(), "", 405, "method_not_allowed", ""),
    ]);
    cases.extend(backend_credentials(w, &post, &theirs, ""));
    cases
}

/// `POST /chat/completions` and `GET /models`, with the echo model.
fn completions_cases(w: &World) -> Vec<Case> {
    let (post, path, t) = (Method::POST, "/chat/completions", bearer_header(&w.token));
    let good = r#"{"model": "echo", "messages": [{"role": "user", "content": "hi"}]}"#;
    let with = |field: &str, value: &str| {
        let mut body: Value = serde_json::from_str(good).unwrap();
        body[field] = serde_json::from_str(value).unwrap();
        body.to_string()
    };
    let bad = |what: &str, body: String, mentions: &'static str| {
        case(what, post.clone(), path, t.clone(), body, 400, INVALID, mentions)
    };
    let numbers = r#"{"model": "echo", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": NUMBER}"#;
    let mut cases = vec![
        bad("no model", r#"{"messages": [{"role": "user", "content": "hi"}]}"#.into(), "model"),
        bad("a model as a number", with("model", "4"), "model"),
        bad("an empty model", with("model", r#""""#), "model"),
        bad("no messages", r#"{"model": "echo"}"#.into(), "messages"),
        bad("no message", with("messages", "[]"), "messages"),
        bad("messages as a string", with("messages", r#""hi""#), "messages"),
        bad("a message as a number", with("messages", "[1]"), "messages[0]"),
        bad("stream as a string", with("stream", r#""yes""#), "stream"),
        bad("stream_options as a list", with("stream_options", "[]"), "stream_options"),
        bad("n of 0", with("n", "0"), "n"),
        bad("n of 129", with("n", "129"), "n"),
        bad("n as a string", with("n", r#""2""#), "n"),
        bad("max_tokens of 1.5", with("max_tokens", "1.5"), "max_tokens"),
        bad(
            "max_completion_tokens of 0",
            with("max_completion_tokens", "0"),
            "max_completion_tokens",
        ),
        case(
            "a model echo does not serve",
            post.clone(),
            path,
            t.clone(),
            with("model", r#""gpt-4o""#),
            404,
            "model_not_found",
            "gpt-4o",
        ),
        case(
            "a human whose tokens are spent",
            post.clone(),
            path,
            bearer_header(&w.broke),
            good,
            429,
            "usage_limit_exceeded",
            "",
        ),
        wrong_method(Method::GET, path, t.clone()),
    ];
    cases.extend(bad_bodies(&post, path, &t, r#"{"model": "echo", "messages": [{"role""#));
    cases.extend(bad_numbers(&post, path, &t, numbers));
    cases.extend(human_credentials(w, &post, path, good, &Vec::new()));
    cases.extend(human_credentials(w, &Method::GET, "/models", "", &Vec::new()));
    cases.push(wrong_method(Method::POST, "/models", t));
    cases
}

/// The headers of a WebSocket upgrade, so that a row reaches the checks
/// made after the upgrade is known to be one.
fn upgrade() -> Headers {
    vec![
        ("connection", hv("Upgrade")),
        ("upgrade", hv("websocket")),
        ("sec-websocket-version", hv("13")),
        ("sec-websocket-key", hv("dGhlIHNhbXBsZSBub25jZQ==")),
    ]
}

/// `GET /realtime/session`: its query, then its credentials.
fn realtime_cases(w: &World) -> Vec<Case> {
    let refused = |what: &str, query: &str, status: u16, kind: &'static str, mentions| {
        let path = format!("/realtime/session?{query}");
        case(what, Method::GET, &path, upgrade(), "", status, kind, mentions)
    };
    let token = &w.token;
    let key = &w.server.key;
    let mut cases = vec![
        refused("no kind", &format!("token={token}"), 400, INVALID, "kind"),
        refused("an empty kind", &format!("kind=&token={token}"), 400, INVALID, "kind"),
        refused("an unknown kind", &format!("kind=video&token={token}"), 400, INVALID, "kind"),
        refused(
            "a kind in capitals",
            &format!("kind=CONVERSATIONAL&token={token}"),
            400,
            INVALID,
            "kind",
        ),
        refused(
            "a kind given twice",
            &format!("kind=conversational&kind=voice_synthesis&token={token}"),
            400,
            INVALID,
            "query string",
        ),
        refused(
            "a token given twice",
            &format!("kind=conversational&token={token}&token={token}"),
            400,
            INVALID,
            "query string",
        ),
        refused(
            "unknown events",
            &format!("kind=conversational&events=some&token={token}"),
            400,
            INVALID,
            "events",
        ),
        refused(
            "a never-issued token",
            &format!("kind=conversational&token={}", never_issued(SecretKind::UsageToken)),
            401,
            "unauthorized",
            "",
        ),
        refused("an empty token", "kind=conversational&token=", 401, "unauthorized", ""),
        refused(
            "the API key as the token",
            &format!("kind=conversational&token={key}"),
            401,
            "unauthorized",
            "",
        ),
        refused(
            "a revoked token",
            &format!("kind=conversational&token={}", w.revoked),
            401,
            "token_revoked",
            "",
        ),
        refused(
            "a human whose seconds are spent",
            &format!("kind=conversational&token={}", w.broke),
            429,
            "usage_limit_exceeded",
            "",
        ),
        refused(
            "a token cut short",
            &format!("kind=conversational&token={}", &token[..20]),
            401,
            "unauthorized",
            "",
        ),
        refused(
            "a token with a byte past ASCII",
            &format!("kind=conversational&token={token}%C3%A9"),
            401,
            "unauthorized",
            "",
        ),
    ];
    let path = "/realtime/session?kind=conversational";
    cases.extend(human_credentials(w, &Method::GET, path, "", &upgrade()));
    cases
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[tokio::test]
async fn hostile_requests_to_every_other_endpoint_are_refused_and_change_nothing() {
    let w = world().await;
    let tables = [
        report_cases(&w),
        events_cases(&w),
        sessions_cases(&w),
        webhook_cases(&w),
        rotate_cases(&w),
        deliveries_cases(&w),
        completions_cases(&w),
        realtime_cases(&w),
    ];
    let cases: Vec<Case> = tables.into_iter().flatten().collect();
    let failures = refusals_gone_wrong(&w.server, &cases).await;
    assert_none_went_wrong(&failures, &cases);

    // The credentials and the webhook the rows tried are as they were.
    assert_eq!(w.server.remaining("ada", "token_cnt").await, 99.0);
    let (status, webhook) = w.server.backend(Method::GET, "/v1/webhook", Value::Null).await;
    assert_eq!(status, StatusCode::OK, "{webhook}");
    assert_eq!(webhook["url"], w.receiver.url, "{webhook}");
    assert_ledger_identity(&w.server.db());
}

// ---------------------------------------------------------------------------
// What hyper and the body limits refuse, over a plain socket
// ---------------------------------------------------------------------------

/// How long a test waits for an answer the server should give at once.
const ANSWER_WAIT: Duration = Duration::from_secs(30);

/// Sends `head` and then `sent` bytes of its body while reading the answer,
/// and returns all the server sent before it closed the connection.
async fn exchange(api: &Api, head: String, sent: usize) -> String {
    let addr = api.base.trim_start_matches("http://");
    let (mut read, mut write) = tokio::net::TcpStream::connect(addr).await.unwrap().into_split();
    let reader = tokio::spawn(async move {
        let mut answer = Vec::new();
        // A reset after the answer is how a refused upload can end.
        let _ = read.read_to_end(&mut answer).await;
        answer
    });
    let body = vec![b' '; sent];
    // The server may close before it has all of it.
    if write.write_all(head.as_bytes()).await.is_ok() {
        let _ = write.write_all(&body).await;
    }
    let answer = tokio::time::timeout(ANSWER_WAIT, reader).await;
    let answer = answer.expect("the server waited for the rest of the request").unwrap();
    drop(write);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The head of a request to `path` with these header lines.
fn head(method: &str, path: &str, headers: &[String], length: usize) -> String {
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: tollgate.test\r\n");
    for header in headers {
        head.push_str(header);
        head.push_str("\r\n");
    }
    head + &format!("content-length: {length}\r\n\r\n")
}

/// The status and the JSON body of an answer read off the socket.
#[track_caller]
fn parse_answer(answer: &str) -> (u16, Value) {
    let status = answer.get(9..12).and_then(|code| code.parse().ok());
    let status = status.unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_body_over_its_limit_is_refused_before_it_is_all_sent_and_the_connection_closed() {
    let w = world().await;
    let key = format!("x-api-key: {}", w.server.key);
    let bearer = format!("authorization: Bearer {}", w.token);
    let before = snapshot(&w.server.db());
    // The JSON endpoints stop at 64 KiB, chat completions at 4 MiB.
    let uploads = [
        ("POST", "/v1/usage/token", &key, 1 << 20),
        ("PUT", "/v1/usage/token", &key, 1 << 20),
        ("POST", "/api/v1/usage/report", &key, 1 << 20),
        ("PUT", "/v1/webhook", &key, 1 << 20),
        ("POST", "/v1/webhook/rotate", &key, 1 << 20),
        ("POST", "/v1/chat/completions", &bearer, 5 << 20),
    ];
    for (method, path, credential, sent) in uploads {
        let request = head(method, path, std::slice::from_ref(credential), TEN_MB);
        let answer = exchange(&w.server.api, request, sent).await;
        let (status, body) = parse_answer(&answer);
        assert_eq!(status, 400, "{method} {path}: {answer}");
        let kind = if path.contains("chat") { &body["error"]["code"] } else { &body["type"] };
        assert_eq!(kind, INVALID, "{method} {path}: {answer}");
    }
    assert_eq!(difference(&before, &snapshot(&w.server.db())), "");
    let (status, _) = request(&w.server, Method::GET, "/healthz", &[], Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_head_over_64_kib_is_refused_with_431_and_no_body_and_changes_nothing() {
    let w = world().await;
    let key = format!("x-api-key: {}", w.server.key);
    let padding = "p".repeat(100 * 1024);
    let before = snapshot(&w.server.db());
    let heads = [
        head("POST", "/v1/usage/token", &[key.clone(), format!("x-pad: {padding}")], 2),
        head("GET", "/v1/usage/limits", &[key.clone(), format!("x-human-id: {padding}")], 0),
        head("POST", "/v1/usage/token", &[format!("x-api-key: {padding}")], 2),
        head("GET", "/v1/usage/limits", &[format!("authorization: Bearer tgu_{padding}")], 0),
        head("GET", &format!("/v1/realtime/session?kind=conversational&token={padding}"), &[], 0),
    ];
    for request in heads {
        let answer = exchange(&w.server.api, request, 2).await;
        let (status, body) = parse_answer(&answer);
        assert_eq!(status, 431, "{answer}");
        assert_eq!(body, Value::Null, "{answer}");
        assert!(answer.to_ascii_lowercase().contains("content-length: 0\r\n"), "{answer}");
    }
    assert_eq!(difference(&before, &snapshot(&w.server.db())), "");
    let (status, _) = request(&w.server, Method::GET, "/healthz", &[], Vec::new()).await;
    assert_eq!(status, StatusCode::OK);
}
