//! Defences at the network edge, against the real server over real
//! sockets: the limit on failed authentications per client address.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::TestServer;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tollgate::config::AuthFailureLimit;
use tollgate::secret::{Secret, SecretKind};

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
    let rows: i64 = server
        .db()
        .query_row("SELECT COUNT(*) FROM humans WHERE external_id = 'bob'", [], |row| row.get(0))
        .unwrap();
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
