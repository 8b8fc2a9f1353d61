//! A human's client on a realtime session: it streams audio and prints what
//! the server says about its usage until the session closes.
//!
//! It opens `GET /v1/realtime/session?kind=...&token=...` with a usage token
//! and sends 20 ms frames of 16 kHz mono 16-bit PCM (640 bytes, a 440 Hz
//! tone) in real time. The server echoes each frame back; the client counts
//! them and prints every `usage.*` message. Ctrl-C closes the session.
//!
//! ```sh
//! TOLLGATE_TOKEN=tgu_... cargo run --example voice_client
//! cargo run --example voice_client -- --kind voice_synthesis tgu_...
//! ```
//!
//! `TOLLGATE_URL` defaults to `http://127.0.0.1:8080`. The exit code tells
//! how the session ended: 0 normal close (1000) or Ctrl-C, 2 usage limit
//! exceeded (4001), 3 token revoked (4002), 4 session time limit (4004),
//! 5 server going away (1001), 1 anything else, a refused upgrade included.

use std::f64::consts::TAU;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures::{SinkExt, StreamExt};
use reqwest::Url;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// 20 ms of 16 kHz mono audio: 320 samples of 2 bytes.
const SAMPLES_PER_FRAME: usize = 320;
const SAMPLE_RATE: f64 = 16_000.0;

#[derive(Parser)]
struct Args {
    /// The usage token (tgu_...); defaults to $TOLLGATE_TOKEN.
    token: Option<String>,
    /// The session's kind, which decides the limit it draws on.
    #[arg(long, default_value = "conversational",
          value_parser = ["conversational", "voice_synthesis"])]
    kind: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    run(Args::parse()).await.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        ExitCode::FAILURE
    })
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let token = match args.token {
        Some(token) => token,
        None => std::env::var("TOLLGATE_TOKEN")
            .context("give a usage token as the argument or in TOLLGATE_TOKEN")?,
    };
    let base = std::env::var("TOLLGATE_URL").unwrap_or("http://127.0.0.1:8080".into());
    let url = session_url(&base, &args.kind, &token)?;
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Ok((socket, _)) => stream(socket).await,
        Err(tungstenite::Error::Http(refusal)) => {
            let body = refusal.body().clone().unwrap_or_default();
            eprintln!("refused: {}: {}", refusal.status(), String::from_utf8_lossy(&body));
            Ok(ExitCode::FAILURE)
        }
        Err(error) => Err(error).with_context(|| format!("cannot connect to {base}")),
    }
}

/// The session URL, with the token URL-encoded in the query string.
fn session_url(base: &str, kind: &str, token: &str) -> anyhow::Result<Url> {
    let mut url = Url::parse(base).with_context(|| format!("TOLLGATE_URL {base:?}"))?;
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme).ok().context("TOLLGATE_URL must be http or https")?;
    url.set_path("/v1/realtime/session");
    url.query_pairs_mut().append_pair("kind", kind).append_pair("token", token);
    Ok(url)
}

/// Sends a frame every 20 ms and reads the server until the session ends.
async fn stream(mut socket: Socket) -> anyhow::Result<ExitCode> {
    let mut clock = tokio::time::interval(Duration::from_millis(20));
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let (mut sample, mut echoed) = (0, 0);
    loop {
        tokio::select! {
            _ = clock.tick() => socket.send(Message::Binary(tone(&mut sample).into())).await?,
            message = socket.next() => match message.context("ended without a close frame")?? {
                Message::Text(text) => println!("[{echoed:>4} echoed] {text}"),
                Message::Binary(_) => echoed += 1,
                Message::Close(frame) => {
                    finish(socket).await;
                    return Ok(closed(frame, echoed));
                }
                _ => {}
            },
            _ = &mut ctrl_c => return stop(socket, echoed).await,
        }
    }
}

/// The next 20 ms of a 440 Hz tone as little-endian 16-bit samples.
fn tone(sample: &mut u64) -> Vec<u8> {
    let mut frame = Vec::with_capacity(SAMPLES_PER_FRAME * 2);
    for _ in 0..SAMPLES_PER_FRAME {
        let phase = TAU * 440.0 * *sample as f64 / SAMPLE_RATE;
        frame.extend_from_slice(&((phase.sin() * 8000.0) as i16).to_le_bytes());
        *sample += 1;
    }
    frame
}

/// Reports the server's close frame and turns its code into the exit code.
fn closed(frame: Option<CloseFrame>, echoed: u64) -> ExitCode {
    let Some(frame) = frame else {
        println!("closed by the server without a code ({echoed} frames echoed)");
        return ExitCode::FAILURE;
    };
    let code = u16::from(frame.code);
    println!("closed by the server: {code} {} ({echoed} frames echoed)", frame.reason);
    ExitCode::from(match code {
        1000 => 0,
        4001 => 2,
        4002 => 3,
        4004 => 4,
        1001 => 5,
        _ => 1,
    })
}

/// Ctrl-C: sends a normal close (1000) and waits for the server's answer.
async fn stop(mut socket: Socket, echoed: u64) -> anyhow::Result<ExitCode> {
    let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
    socket.close(Some(frame)).await?;
    finish(socket).await;
    println!("closed by you ({echoed} frames echoed)");
    Ok(ExitCode::SUCCESS)
}

/// Completes the closing handshake: reads until the server has seen our
/// close frame (or answered it) and the connection ends.
async fn finish(mut socket: Socket) {
    let drain = async { while let Some(Ok(_)) = socket.next().await {} };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}
