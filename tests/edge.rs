//! Defences at the network edge, against the real server over real
//! sockets: the limit on failed authentications per client address, the
//! cap on connections, and the timeout for a request's headers.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::TestServer;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tollgate::config::AuthFailureLimit;
use tollgate::secret::{Secret, SecretKind};

/// How long a test waits for the server to do what it should at once.
const PATIENCE: Duration = Duration::from_secs(10);

/// A client whose connections come from `source`, one of the loopback
/// addresses (Linux answers on the whole of 127.0.0.0/8).
fn client_from(source: &str) -> reqwest::Client {
    let source: IpAddr = source.parse().unwrap();
    reqwest::Client::builder().local_address(source).build().unwrap()
}

/// A usage token that was never issued, with a valid checksum.
fn unknown_token() -> String {
    Secret::generate(SecretKind::UsageToken).expose().to_owned()
}

/// `GET /v1/usage/limits` with `token`: status, `Retry-After`, body.
async fn limits_with(
    server: &TestServer,
    http: &reqwest::Client,
    token: &str,
) -> (StatusCode, Option<u64>, Value) {
    let response =
        http.get(server.url("/v1/usage/limits")).bearer_auth(token).send().await.unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().parse().expect("Retry-After is whole seconds"));
    (status, retry_after, response.json().await.unwrap())
}

/// Fails to authenticate `times` times from `http`'s address.
async fn fail(server: &TestServer, http: &reqwest::Client, times: u32) {
    for _ in 0..times {
        let (status, _, body) = limits_with(server, http, &unknown_token()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
}

#[tokio::test]
async fn an_address_past_its_20_failures_is_refused_even_with_a_valid_credential() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 30.0).await;
    let blocked = client_from("127.0.0.1");
    fail(&server, &blocked, 20).await;

    let (status, retry_after, body) = limits_with(&server, &blocked, &token).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["type"], "rate_limited", "{body}");
    assert!(body["message"].as_str().unwrap().contains("failed authentications"), "{body}");
    let retry_after = retry_after.expect("a Retry-After header");
    assert!((1..=60).contains(&retry_after), "Retry-After: {retry_after}");

    // The backend's key from the same address is refused too.
    let response = blocked
        .post(server.url("/v1/usage/token"))
        .header("x-api-key", &server.key)
        .json(&json!({ "human": "bob" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    let rows = server.db().query_i64("SELECT COUNT(*) FROM humans WHERE external_id = 'bob'", &[]);
    assert_eq!(rows, 0, "a refused request changed something");

    // Another address is not affected.
    let (status, _, body) = limits_with(&server, &client_from("127.0.0.2"), &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn the_session_upgrade_and_chat_completions_are_refused_to_a_blocked_address() {
    let server =
        TestServer::start_with(|s| s.auth_failures = AuthFailureLimit::per_minute(2)).await;
    let token = server.mint_seconds("ada", 30.0).await;
    for _ in 0..2 {
        let path = format!("/v1/realtime/session?kind=conversational&token={}", unknown_token());
        let (status, body) = server.refused(&path).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }

    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = server.refused(&path).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["type"], "rate_limited", "{body}");

    let response = server
        .http
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&json!({ "model": "echo", "messages": [{ "role": "user", "content": "hi" }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited", "{body}");
    assert_eq!(body["error"]["type"], "requests", "{body}");

    let text = server.http.get(server.url("/metrics")).send().await.unwrap();
    let text = text.text().await.unwrap();
    assert!(text.contains(r#"tollgate_upgrades_total{outcome="rate_limited"}"#), "{text}");
    assert!(text.contains("tollgate_auth_rate_limited_total"), "{text}");
}

#[tokio::test]
async fn an_address_is_let_in_again_once_its_window_has_passed() {
    let limit = AuthFailureLimit { max: 2, window: Duration::from_secs(1) };
    let server = TestServer::start_with(|s| s.auth_failures = limit).await;
    let token = server.mint_seconds("ada", 30.0).await;
    fail(&server, &server.http, 2).await;
    let (status, retry_after, _) = limits_with(&server, &server.http, &token).await;
    assert_eq!((status, retry_after), (StatusCode::TOO_MANY_REQUESTS, Some(1)));

    // Retry-After is rounded up, so waiting it out reaches the window's end.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, _, body) = limits_with(&server, &server.http, &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn no_credential_and_stale_tokens_are_not_counted_as_failures() {
    let server =
        TestServer::start_with(|s| s.auth_failures = AuthFailureLimit::per_minute(2)).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let (status, _) = server.post("/v1/usage/token/revoke", json!({ "human": "ada" })).await;
    assert_eq!(status, StatusCode::OK);
    for _ in 0..4 {
        let response = server.http.get(server.url("/v1/usage/limits")).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let (status, _, body) = limits_with(&server, &server.http, &token).await;
        assert_eq!((status, &body["type"]), (StatusCode::UNAUTHORIZED, &json!("token_revoked")));
        // An empty credential is none, wherever it is sent.
        let limits = server.url("/v1/usage/limits");
        let empty_key = server.http.get(&limits).header("x-api-key", " ").header("x-human-id", "a");
        let empty_bearer = server.http.get(&limits).header("authorization", "Bearer ");
        let backend = server.http.post(server.url("/v1/usage/token")).header("x-api-key", "");
        for request in [empty_key, empty_bearer, backend.json(&json!({ "human": "bob" }))] {
            assert_eq!(request.send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
        }
        let (status, body) =
            server.refused("/v1/realtime/session?kind=conversational&token=").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    }
    let fresh = server.mint_seconds("ada", 30.0).await;
    let (status, _, body) = limits_with(&server, &server.http, &fresh).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn a_limit_of_zero_counts_nothing() {
    let server =
        TestServer::start_with(|s| s.auth_failures = AuthFailureLimit::per_minute(0)).await;
    let token = server.mint_seconds("ada", 30.0).await;
    fail(&server, &server.http, 25).await;
    let (status, _, body) = limits_with(&server, &server.http, &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Reads what the server sends until it closes the connection; panics if
/// it does not within [`PATIENCE`].
async fn read_to_close(tcp: &mut TcpStream) -> String {
    let mut read = Vec::new();
    let ended = tokio::time::timeout(PATIENCE, async {
        let mut chunk = [0u8; 4096];
        loop {
            match tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(count) => read.extend(&chunk[..count]),
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&read).into_owned()
}

/// A client that has made one request and keeps its connection open.
async fn held_connection(server: &TestServer) -> reqwest::Client {
    let client = reqwest::Client::new();
    let response = client.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.bytes().await.unwrap();
    client
}

#[tokio::test]
async fn a_connection_over_the_cap_is_answered_503_and_closed() {
    let server = TestServer::start_with(|s| {
        s.max_connections = Some(3);
        s.header_timeout = Duration::from_secs(60);
    })
    .await;
    // The test server's own client keeps the connection it minted with.
    let token = server.mint_seconds("ada", 30.0).await;
    let _second = held_connection(&server).await;
    let session = server.connect(&token).await;

    let addr = server.base.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let answer = read_to_close(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{answer}");
    let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["type"], "too_many_connections", "{body}");
    assert!(body["message"].is_string(), "{body}");

    let response = reqwest::Client::new().get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "too_many_connections", "{body}");

    // A session holds its slot: closing it lets a new connection in.
    session.close().await;
    let text = until_admitted(&server, "/metrics").await;
    assert!(text.contains("tollgate_connections_refused_total"), "{text}");
}

/// Requests `path` on new connections until one is admitted, and returns
/// its answer: the server frees a slot just after the client sees the
/// connection that held it close.
async fn until_admitted(server: &TestServer, path: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let response = reqwest::Client::new().get(server.url(path)).send().await.unwrap();
        if response.status() == StatusCode::OK {
            return response.text().await.unwrap();
        }
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(Instant::now() < deadline, "no slot was freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The header timeout the tests of it set.
const HEADER_TIMEOUT: Duration = Duration::from_millis(300);

async fn with_short_header_timeout() -> TestServer {
    TestServer::start_with(|s| s.header_timeout = HEADER_TIMEOUT).await
}

async fn connect(server: &TestServer) -> TcpStream {
    TcpStream::connect(server.base.trim_start_matches("http://")).await.unwrap()
}

/// Sends `head` and then a byte of a header every 50 ms, until the server
/// closes the connection, without an answer; returns how long it took.
async fn trickle_until_closed(server: &TestServer, head: &str) -> Duration {
    let started = Instant::now();
    let (mut read, mut write) = connect(server).await.into_split();
    write.write_all(head.as_bytes()).await.unwrap();
    let trickle = async move {
        write.write_all(b"X-Slow: ").await.unwrap();
        while write.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let closed = async {
        let mut chunk = [0u8; 1024];
        if let Ok(count) = read.read(&mut chunk).await {
            let answer = String::from_utf8_lossy(&chunk[..count]);
            assert_eq!(count, 0, "the server answered: {answer}");
        }
    };
    let ended = tokio::time::timeout(PATIENCE, async {
        tokio::select! {
            _ = closed => {}
            _ = trickle => {}
        }
    });
    assert!(ended.await.is_ok(), "the server kept the trickling connection open");
    started.elapsed()
}

#[tokio::test]
async fn a_client_that_trickles_its_headers_is_disconnected_after_the_timeout() {
    let server = with_short_header_timeout().await;
    let took = trickle_until_closed(&server, "GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
    assert!(took >= HEADER_TIMEOUT, "closed after {took:?}");
}

#[tokio::test]
async fn a_session_upgrade_that_trickles_its_headers_is_disconnected_after_the_timeout() {
    let server = with_short_header_timeout().await;
    let token = server.mint_seconds("ada", 30.0).await;
    let head = format!(
        "GET /v1/realtime/session?kind=conversational&token={token} HTTP/1.1\r\nHost: x\r\n\
         Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    );
    let took = trickle_until_closed(&server, &head).await;
    assert!(took >= HEADER_TIMEOUT, "closed after {took:?}");
    let rows = server.db().query_i64("SELECT COUNT(*) FROM sessions", &[]);
    assert_eq!(rows, 0, "a session was opened");
}

#[tokio::test]
async fn a_connection_that_never_sends_a_byte_is_closed_after_the_timeout() {
    let server = with_short_header_timeout().await;
    let started = Instant::now();
    let mut tcp = connect(&server).await;
    let answer = read_to_close(&mut tcp).await;
    assert!(started.elapsed() >= HEADER_TIMEOUT, "closed after {:?}", started.elapsed());
    assert_eq!(answer, "", "the server answered");
}

#[tokio::test]
async fn a_kept_alive_connection_idle_after_its_answer_is_closed_after_the_timeout() {
    let server = with_short_header_timeout().await;
    let mut tcp = connect(&server).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let answered = Instant::now();
    let answer = read_to_close(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answered.elapsed() >= HEADER_TIMEOUT, "closed after {:?}", answered.elapsed());
}

#[tokio::test]
async fn a_revoked_api_key_is_refused_without_counting_against_its_address() {
    let server = TestServer::start().await;
    let new_key = tollgate::create_api_key(&server.db_setting, "default").await.unwrap();
    tollgate::revoke_api_key(&server.db_setting, &server.key).await.unwrap();
    let backend = client_from("127.0.0.1");
    let mint = |key: &str| {
        let request = backend.post(server.url("/v1/usage/token")).header("x-api-key", key);
        request.json(&json!({ "human": "ada" })).send()
    };

    // A backend still sending the old key, many more times than the limit.
    for _ in 0..30 {
        let response = mint(&server.key).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(mint(new_key.expose()).await.unwrap().status(), StatusCode::OK);
}
