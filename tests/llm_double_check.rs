mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use common::llm::{Behaviour, TestLlm, UsageMode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn post(llm: &TestLlm, body: Value) -> (u16, String, String) {
    let r = reqwest::Client::new()
        .post(format!("{}/chat/completions", llm.base_url()))
        .header("authorization", "Bearer sk-x")
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct =
        r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (status, ct, r.text().await.unwrap())
}

#[tokio::test]
async fn plain() {
    let llm = TestLlm::start(Behaviour::default()).await;
    assert!(llm.base_url().starts_with("http://127.0.0.1:"));
    assert!(llm.ca_file().is_none());
    let (s, ct, body) = post(&llm, json!({"model":"m1","messages":[]})).await;
    println!("{s} {ct} {body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["usage"]["total_tokens"], 12);
    assert_eq!(v["choices"][0]["message"]["content"], " one two three four five");
    assert_eq!(v["model"], "m1");
    let (_, ct, body) = post(&llm, json!({"model":"m1","messages":[],"stream":true,"stream_options":{"include_usage":true},"max_tokens":3})).await;
    println!("{ct}\n{body}");
    assert_eq!(ct, "text/event-stream");
    assert!(body.ends_with("data: [DONE]\n\n"));
    assert!(body.contains("\"choices\":[],"));
    assert!(body.contains("\"length\""));
    assert_eq!(llm.chunks_sent(), 3);
    let (_, _, body) = post(&llm, json!({"model":"m1","messages":[],"stream":true})).await;
    println!("{body}");
    assert!(!body.contains("usage"));
    llm.set_behaviour(Behaviour { usage: UsageMode::OnLastChoiceChunk, ..Behaviour::default() });
    let (_, _, body) = post(
        &llm,
        json!({"model":"m1","messages":[],"stream":true,"stream_options":{"include_usage":true}}),
    )
    .await;
    println!("{body}");
    assert!(
        body.contains("\"finish_reason\":\"stop\"},\"usage\"")
            || body.contains("\"usage\":{\"completion")
    );
    llm.set_behaviour(Behaviour { usage: UsageMode::Absent, ..Behaviour::default() });
    let (_, _, body) = post(
        &llm,
        json!({"model":"m1","messages":[],"stream":true,"stream_options":{"include_usage":true}}),
    )
    .await;
    assert!(!body.contains("usage"));
    let (_, _, body) = post(&llm, json!({"model":"m1","messages":[]})).await;
    assert!(!body.contains("usage"));
    llm.set_behaviour(Behaviour {
        fail: Some((429, json!({"error":{"message":"slow down","type":"rate_limit"}}))),
        ..Behaviour::default()
    });
    let (s, _, body) = post(&llm, json!({"model":"m1","messages":[]})).await;
    assert_eq!(s, 429, "{body}");
    llm.set_behaviour(Behaviour::default());
    let models: Value =
        reqwest::get(format!("{}/models", llm.base_url())).await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "test-model");
    let reqs = llm.requests();
    assert_eq!(reqs.len(), 8);
    assert_eq!(reqs[0].path, "/v1/chat/completions");
    assert_eq!(reqs[0].header("authorization"), Some("Bearer sk-x"));
    assert_eq!(reqs[7].path, "/v1/models");
    assert!(!llm.saw_disconnect());
}

#[tokio::test]
async fn disconnect() {
    let llm = TestLlm::start(Behaviour {
        chunk_delay: Duration::from_millis(100),
        ..Behaviour::default()
    })
    .await;
    let mut r = reqwest::Client::new()
        .post(format!("{}/chat/completions", llm.base_url()))
        .json(&json!({"model":"m","messages":[],"stream":true}))
        .send()
        .await
        .unwrap();
    let mut got = String::new();
    while !got.contains(" two") {
        got.push_str(&String::from_utf8_lossy(&r.chunk().await.unwrap().unwrap()));
    }
    drop(r);
    tokio::time::sleep(Duration::from_millis(500)).await;
    println!("sent {} disconnect {}", llm.chunks_sent(), llm.saw_disconnect());
    assert!(llm.saw_disconnect());
    assert_eq!(llm.chunks_sent(), 2);
}

#[tokio::test]
async fn tls() {
    use tokio_rustls::rustls;
    let llm = TestLlm::start_tls(Behaviour::default()).await;
    let url = llm.base_url();
    assert!(url.starts_with("https://localhost:"), "{url}");
    let port: u16 =
        url.trim_start_matches("https://localhost:").trim_end_matches("/v1").parse().unwrap();
    let pem = std::fs::read_to_string(llm.ca_file().unwrap()).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from(der)).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    for name in ["localhost", "127.0.0.1"] {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap();
        let mut tls = connector.connect(server_name, tcp).await.unwrap();
        let body =
            r#"{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#;
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        tls.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        let out = String::from_utf8_lossy(&out);
        println!("{out}");
        assert!(out.contains("[DONE]"));
    }
}
