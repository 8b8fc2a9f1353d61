//! Browsers: CORS for the allowed origins, and the `Origin` check on
//! WebSocket upgrades.

mod common;

use common::*;
use reqwest::Method;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tollgate::config::AllowedOrigins;

const APP: &str = "http://app.test:3000";

async fn server_allowing(origins: AllowedOrigins) -> TestServer {
    TestServer::start_with(|s| s.allowed_origins = origins).await
}

fn list(origins: &[&str]) -> AllowedOrigins {
    AllowedOrigins::List(origins.iter().map(|o| o.parse().unwrap()).collect())
}

async fn session_from(server: &TestServer, token: &str, origin: Option<&str>) -> u16 {
    let url = format!("{}/v1/realtime/session?kind=conversational&token={token}", server.ws_base);
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request.headers_mut().insert("origin", origin.parse().unwrap());
    }
    match server.connect_request(request).await {
        Ok(_) => 101,
        Err((status, body)) => {
            assert_eq!(body["type"], "forbidden", "{body}");
            status.as_u16()
        }
    }
}

#[tokio::test]
async fn a_page_of_an_allowed_origin_reads_its_limits_with_its_token() {
    let server = server_allowing(list(&[APP])).await;
    let token = server.mint_seconds("ada", 30.0).await;

    let preflight = server
        .http
        .request(Method::OPTIONS, server.url("/v1/usage/limits"))
        .header("origin", APP)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], APP);
    let allowed = headers["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(allowed.contains("authorization") && !allowed.contains("x-api-key"), "{allowed}");

    let read = server.http.get(server.url("/v1/usage/limits")).bearer_auth(&token);
    let response = read.header("origin", APP).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], APP);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body, json!([{ "type": "conversational_seconds", "value": 30.0 }]));
}

#[tokio::test]
async fn errors_carry_cors_headers_so_that_a_page_can_read_them() {
    let server = server_allowing(list(&[APP])).await;
    let read = server.http.get(server.url("/v1/usage/limits")).bearer_auth("tgu_nope");
    let response = read.header("origin", APP).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["access-control-allow-origin"], APP);
}

#[tokio::test]
async fn another_origin_gets_no_cors_and_may_not_open_a_session() {
    let server = server_allowing(list(&[APP])).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let read = server.http.get(server.url("/v1/usage/limits")).bearer_auth(&token);
    let response = read.header("origin", "http://evil.test").send().await.unwrap();
    assert!(!response.headers().contains_key("access-control-allow-origin"));

    assert_eq!(session_from(&server, &token, Some("http://evil.test")).await, 403);
    assert_eq!(session_from(&server, &token, Some(APP)).await, 101);
    assert_eq!(session_from(&server, &token, None).await, 101, "a client with no Origin");
    let rows = session_rows(&server.db());
    assert_eq!(rows.len(), 2, "the refused upgrade recorded a session");
}

#[tokio::test]
async fn by_default_there_is_no_cors_and_no_origin_check() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 30.0).await;
    let read = server.http.get(server.url("/v1/usage/limits")).bearer_auth(&token);
    let response = read.header("origin", APP).send().await.unwrap();
    assert!(!response.headers().contains_key("access-control-allow-origin"));
    assert_eq!(session_from(&server, &token, Some("http://any.test")).await, 101);
}

#[tokio::test]
async fn any_origin_can_be_allowed() {
    let server = server_allowing(AllowedOrigins::Any).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let read = server.http.get(server.url("/v1/usage/limits")).bearer_auth(&token);
    let response = read.header("origin", "http://any.test").send().await.unwrap();
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    assert_eq!(session_from(&server, &token, Some("http://any.test")).await, 101);
}

#[tokio::test]
async fn a_page_may_call_chat_completions_with_the_openai_sdks_headers_but_never_an_api_key() {
    let server = server_allowing(list(&[APP])).await;
    let asked = "authorization, content-type, x-stainless-os, x-stainless-timeout, X-Api-Key";
    let preflight = server
        .http
        .request(Method::OPTIONS, server.url("/v1/chat/completions"))
        .header("origin", APP)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", asked)
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let allowed = preflight.headers()["access-control-allow-headers"].to_str().unwrap();
    let allowed = allowed.to_lowercase();
    for name in ["authorization", "content-type", "x-stainless-os", "x-stainless-timeout"] {
        assert!(allowed.contains(name), "{name} not in {allowed}");
    }
    assert!(!allowed.contains("x-api-key"), "{allowed}");

    let unknown =
        server.http.request(Method::OPTIONS, server.url("/v1/nope")).header("origin", APP);
    let unknown = unknown.header("access-control-request-method", "GET").send().await.unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn an_upgrade_that_names_two_origins_is_refused() {
    let server = server_allowing(list(&[APP])).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let url = format!("{}/v1/realtime/session?kind=conversational&token={token}", server.ws_base);
    for origins in [[APP, "http://evil.test"], ["http://evil.test", APP], [APP, APP]] {
        let mut request = url.as_str().into_client_request().unwrap();
        for origin in origins {
            request.headers_mut().append("origin", origin.parse().unwrap());
        }
        let Err((status, body)) = server.connect_request(request).await else {
            panic!("a session was opened with the origins {origins:?}");
        };
        assert_eq!((status.as_u16(), body["type"].as_str()), (400, Some("invalid_input")));
        assert_eq!(body["message"], "origin: given more than once");
    }
    assert!(session_rows(&server.db()).is_empty(), "a refused upgrade recorded a session");
}
