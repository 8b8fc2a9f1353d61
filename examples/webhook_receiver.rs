//! An app's webhook endpoint: it checks each delivery's signature with
//! `tollgate::verify` and prints the event it carries.
//!
//! ```sh
//! TOLLGATE_WEBHOOK_SECRET=whsec_... cargo run --example webhook_receiver
//! ```
//!
//! It listens on `127.0.0.1:9090` (`--listen` or `WEBHOOK_LISTEN` to
//! change) and takes a POST at any path. A delivery whose signature checks
//! out is answered 200 and printed; any other is answered 400, and why is
//! printed to standard error.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use clap::Parser;
use serde_json::Value;
use tollgate::webhooks::signature::WebhookSecret;

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "WEBHOOK_LISTEN", default_value = "127.0.0.1:9090")]
    listen: SocketAddr,
}

#[tokio::main]
async fn main() -> ExitCode {
    run(Args::parse()).await.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        ExitCode::FAILURE
    })
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    // From the environment only, so that the secret never shows in `ps`.
    let secret = std::env::var("TOLLGATE_WEBHOOK_SECRET")
        .context("TOLLGATE_WEBHOOK_SECRET is not set: give the whsec_... secret")?;
    WebhookSecret::parse(&secret).context("TOLLGATE_WEBHOOK_SECRET is not a whsec_ secret")?;

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("Receiving webhooks on http://{}", listener.local_addr()?);

    let app = Router::new().fallback(post(receive)).with_state(Arc::<str>::from(secret));
    axum::serve(listener, app).await.context("the server stopped")?;
    Ok(ExitCode::SUCCESS)
}

async fn receive(State(secret): State<Arc<str>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let now = chrono::Utc::now().timestamp();
    if let Err(error) = tollgate::verify(&secret, &headers, &body, now) {
        eprintln!("refused a delivery: {error}");
        return StatusCode::BAD_REQUEST;
    }

    // Only a verified body is worth parsing.
    let Ok(event) = serde_json::from_slice::<Value>(&body) else {
        eprintln!("refused a signed delivery whose body is not JSON");
        return StatusCode::BAD_REQUEST;
    };
    let event_type = event["type"].as_str().unwrap_or("(no type)");
    println!("{event_type}: {}", event.get("payload").unwrap_or(&event));
    StatusCode::OK
}
