//! The whole Tollgate flow in one program, against a running server.
//!
//! 1. The backend mints a token with 5 conversational seconds for a fresh
//!    human (`POST /v1/usage/token`, with the API key).
//! 2. The client opens a session with that token and streams 20 ms audio
//!    frames, printing the remaining seconds as the server reports them.
//! 3. After about 5 s the server cuts the session off with close code 4001
//!    (`usage_limit_exceeded`); the demo prints when.
//! 4. The client reads its limits (`GET /v1/usage/limits`): 0 seconds left.
//! 5. The backend tops the human up (`PUT /v1/usage/token`, mode `add`) and
//!    the demo shows the new remaining value.
//!
//! ```sh
//! TOLLGATE_API_KEY=tgk_... cargo run --example demo
//! ```
//!
//! `TOLLGATE_URL` defaults to `http://127.0.0.1:8080`. Exits with 0 only if
//! the session was cut off with 4001.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures::{SinkExt, StreamExt};
use reqwest::{RequestBuilder, Url};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECONDS: f64 = 5.0;
const TOP_UP: f64 = 30.0;

struct Demo {
    base: String,
    key: String,
    http: reqwest::Client,
}

#[tokio::main]
async fn main() -> ExitCode {
    run().await.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        ExitCode::FAILURE
    })
}

async fn run() -> anyhow::Result<ExitCode> {
    let demo = Demo {
        base: std::env::var("TOLLGATE_URL").unwrap_or("http://127.0.0.1:8080".into()),
        key: std::env::var("TOLLGATE_API_KEY").context("TOLLGATE_API_KEY is not set")?,
        http: reqwest::Client::new(),
    };
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH)?;
    let human = format!("demo-{}", since_epoch.as_millis());

    let token = demo.mint(&human).await?;
    let code = demo.stream_until_closed(&token).await?;
    let limits = call(demo.get("/v1/usage/limits").bearer_auth(&token)).await?;
    println!("4. GET /v1/usage/limits: {} s left", conversational(&limits)?);
    demo.top_up(&human).await?;

    Ok(if code == Some(4001) {
        ExitCode::SUCCESS
    } else {
        eprintln!("expected the session to be cut off with 4001, got {code:?}");
        ExitCode::FAILURE
    })
}

impl Demo {
    fn get(&self, path: &str) -> RequestBuilder {
        self.http.get(format!("{}{path}", self.base))
    }

    /// Step 1: the backend mints a token with `SECONDS` of conversation.
    async fn mint(&self, human: &str) -> anyhow::Result<String> {
        let body = json!({
            "human": human,
            "ttl_seconds": 600,
            "limits": [{ "type": "conversational_seconds", "value": SECONDS }],
        });
        let request = self.http.post(format!("{}/v1/usage/token", self.base));
        let answer = call(request.header("x-api-key", &self.key).json(&body)).await?;
        println!("1. minted a token for {human} with {} s", conversational(&answer["limits"])?);
        Ok(answer["token"].as_str().context("no token in the answer")?.to_owned())
    }

    /// Steps 2 and 3: streams audio until the server closes the session, and
    /// returns its close code.
    async fn stream_until_closed(&self, token: &str) -> anyhow::Result<Option<u16>> {
        let url = session_url(&self.base, token)?;
        let (mut socket, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
        let opened = Instant::now();
        println!("2. session open, streaming 20 ms audio frames");
        let mut clock = tokio::time::interval(Duration::from_millis(20));
        let frame = vec![0u8; 640]; // 20 ms of 16 kHz 16-bit mono silence
        loop {
            tokio::select! {
                _ = clock.tick() => socket.send(Message::Binary(frame.clone().into())).await?,
                message = socket.next() => match message.context("no close frame")?? {
                    Message::Text(text) => print_event(&serde_json::from_str(&text)?),
                    Message::Close(frame) => {
                        let after = opened.elapsed().as_secs_f64();
                        let code = frame.as_ref().map(|f| u16::from(f.code));
                        let shown = frame.map_or("without a code".into(), |f| f.to_string());
                        println!("3. cut off after {after:.2} s: close {shown}");
                        while let Some(Ok(_)) = socket.next().await {} // finish the close
                        return Ok(code);
                    }
                    _ => {}
                },
            }
        }
    }

    /// Step 5: the backend adds `TOP_UP` seconds to what the human has left.
    async fn top_up(&self, human: &str) -> anyhow::Result<()> {
        let body = json!({
            "human": human,
            "mode": "add",
            "limits": [{ "type": "conversational_seconds", "value": TOP_UP }],
        });
        let request = self.http.put(format!("{}/v1/usage/token", self.base));
        let answer = call(request.header("x-api-key", &self.key).json(&body)).await?;
        println!("5. topped up by {TOP_UP} s: {} s left", conversational(&answer["limits"])?);
        Ok(())
    }
}

/// The session URL, with the token URL-encoded in the query string.
fn session_url(base: &str, token: &str) -> anyhow::Result<Url> {
    let mut url = Url::parse(base)?;
    url.set_scheme("ws").ok().context("TOLLGATE_URL must be http://")?;
    url.set_path("/v1/realtime/session");
    url.query_pairs_mut().append_pair("kind", "conversational").append_pair("token", token);
    Ok(url)
}

/// Prints the remaining seconds of a `usage.*` message.
fn print_event(event: &Value) {
    match event["type"].as_str() {
        Some("usage.session_started") => println!("   started: {} s left", event["remaining"]),
        Some("usage.remaining") => println!("   remaining: {} s", event["remaining"]),
        Some("usage.warning") => println!("   warning: only {} s left", event["remaining"]),
        _ => {}
    }
}

/// The conversational seconds in a list of limits.
fn conversational(limits: &Value) -> anyhow::Result<f64> {
    let limits = limits.as_array().context("limits are not a list")?;
    let entry = limits.iter().find(|l| l["type"] == "conversational_seconds");
    entry.and_then(|l| l["value"].as_f64()).context("no conversational_seconds limit")
}

/// Sends a request and returns its JSON answer, or fails with the error body.
async fn call(request: RequestBuilder) -> anyhow::Result<Value> {
    let response = request.send().await?;
    let status = response.status();
    let text = response.text().await?;
    anyhow::ensure!(status.is_success(), "{status}: {text}");
    Ok(serde_json::from_str(&text)?)
}
