//! Logging: tracing to standard error, filtered by `RUST_LOG` (default
//! `info`). Standard output is kept for what the operator must copy, such
//! as a new API key.

use std::io::IsTerminal;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;
use tracing_subscriber::{EnvFilter, fmt};

/// Libraries that log what must never reach a log. The WebSocket library
/// logs, at trace, the raw bytes of every handshake (an upstream's secret
/// headers with them) and of every frame (people's audio and text); the
/// PostgreSQL client logs, at debug, every statement's parameters (webhook
/// signing secrets among them). Whatever `RUST_LOG` says, they are heard at
/// most at info.
const INDISCREET_LIBRARIES: [&str; 3] = ["tungstenite", "tokio_tungstenite", "tokio_postgres"];

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let cap = INDISCREET_LIBRARIES
        .iter()
        .fold(Targets::new().with_default(LevelFilter::TRACE), |cap, target| {
            cap.with_target(*target, LevelFilter::INFO)
        });
    let layer =
        fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry().with(layer.with_filter(filter).with_filter(cap)).init();
}
