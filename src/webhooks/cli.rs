//! `tollgate webhooks ...`: the webhook endpoints of a running server's
//! API, from the command line. Each command is one request with the
//! project's API key; the answer's JSON is printed as it came.

use anyhow::Context;
use axum::body::Bytes;
use axum::http::{Method, Request, header};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::config::{WebhooksArgs, WebhooksCommand};
use crate::outbound;

/// Runs the command and returns the answer's body; an error status is an
/// error, with the body's message.
pub async fn run(args: WebhooksArgs) -> anyhow::Result<String> {
    let (method, path, body) = request_of(args.command)?;
    let uri = format!("{}/v1{path}", args.server.trim_end_matches('/'));
    let request = Request::builder()
        .method(method)
        .uri(&uri)
        .header("x-api-key", &args.api_key)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.map(|b| b.to_string()).unwrap_or_default())))
        .with_context(|| format!("cannot make a request to {uri}"))?;
    let client = outbound::client(crate::upstream::tls_config(None)?);
    let response = client.request(request).await.with_context(|| format!("cannot reach {uri}"))?;
    let status = response.status();
    let answer = response.into_body().collect().await.context("the answer broke off")?;
    let answer = String::from_utf8_lossy(&answer.to_bytes()).into_owned();
    anyhow::ensure!(status.is_success(), "{status}: {answer}");
    Ok(answer)
}

fn request_of(command: WebhooksCommand) -> anyhow::Result<(Method, String, Option<Value>)> {
    Ok(match command {
        WebhooksCommand::Set { endpoint, events, thresholds } => {
            let mut body = json!({ "url": endpoint, "thresholds": thresholds_of(&thresholds)? });
            if let Some(events) = events {
                body["events"] = json!(events);
            }
            (Method::PUT, "/webhook".into(), Some(body))
        }
        WebhooksCommand::Show => (Method::GET, "/webhook".into(), None),
        WebhooksCommand::Delete => (Method::DELETE, "/webhook".into(), None),
        WebhooksCommand::Rotate { grace_seconds } => {
            let body = grace_seconds.map(|grace| json!({ "grace_seconds": grace }));
            (Method::POST, "/webhook/rotate".into(), body)
        }
        WebhooksCommand::Deliveries { status } => {
            let query = status.map(|status| format!("?status={status}")).unwrap_or_default();
            (Method::GET, format!("/webhook/deliveries{query}"), None)
        }
        WebhooksCommand::Retry { id } => {
            (Method::POST, format!("/webhook/deliveries/{id}/retry"), None)
        }
    })
}

/// `TYPE=VALUE` pairs as the API's `{"type", "value"}` limits.
fn thresholds_of(pairs: &[String]) -> anyhow::Result<Value> {
    let mut thresholds = Vec::new();
    for pair in pairs {
        let (limit_type, value) = pair
            .split_once('=')
            .with_context(|| format!("--threshold {pair:?}: must be TYPE=VALUE"))?;
        let value: f64 =
            value.parse().with_context(|| format!("--threshold {pair:?}: not a number"))?;
        thresholds.push(json!({ "type": limit_type, "value": value }));
    }
    Ok(Value::Array(thresholds))
}
