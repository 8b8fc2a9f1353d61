//! A backend minting a usage token for one of its humans.
//!
//! The backend holds the project's API key (`tgk_...`) and calls
//! `POST /v1/usage/token` with it; the answer carries the usage token
//! (`tgu_...`) to hand to the human's client, and the human's limits.
//!
//! Run it against a server:
//!
//! ```sh
//! TOLLGATE_API_KEY=tgk_... cargo run --example mint_token -- alice 120
//! ```
//!
//! `TOLLGATE_URL` defaults to `http://127.0.0.1:8080`. The arguments are the
//! human (default `demo-user`) and their conversational seconds (default
//! 60). A refusal is printed to standard error and exits with 1.

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// The app's own identifier for the human.
    #[arg(default_value = "demo-user")]
    human: String,
    /// Seconds of conversational time to give the human.
    #[arg(default_value_t = 60.0)]
    seconds: f64,
}

#[tokio::main]
async fn main() -> ExitCode {
    run(Args::parse()).await.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        ExitCode::FAILURE
    })
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let base = std::env::var("TOLLGATE_URL").unwrap_or("http://127.0.0.1:8080".into());
    let key = std::env::var("TOLLGATE_API_KEY")
        .context("TOLLGATE_API_KEY is not set; it is the tgk_ key the server printed")?;

    let body = json!({
        "human": args.human,
        "limits": [{ "type": "conversational_seconds", "value": args.seconds }],
    });
    let response = reqwest::Client::new()
        .post(format!("{base}/v1/usage/token"))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;

    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        eprintln!("{status}: {text}");
        return Ok(ExitCode::FAILURE);
    }
    let answer: Value = serde_json::from_str(&text)?;
    println!("{}", serde_json::to_string_pretty(&answer)?);
    Ok(ExitCode::SUCCESS)
}
