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
    let cap = cap(&filter);
    let layer =
        fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry().with(layer.with_filter(filter).with_filter(cap)).init();
}

/// The indiscreet libraries held at info, and everything else at the most
/// `filter` lets through. The most any filter lets through is also the
/// level below which `log` records (the WebSocket libraries write theirs
/// with `log`) and `tracing` events are dropped before any filter is asked:
/// with everything else at trace, each of the libraries' many trace records
/// was built and then refused one at a time, about 2 % of the server's CPU
/// during the upgrades figure.
fn cap(filter: &EnvFilter) -> Targets {
    let most = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    INDISCREET_LIBRARIES.iter().fold(Targets::new().with_default(most), |cap, target| {
        cap.with_target(*target, LevelFilter::INFO.min(most))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_lets_nothing_through_that_the_filter_would_not() {
        let plain = cap(&EnvFilter::new("info"));
        assert_eq!(plain.default_level(), Some(LevelFilter::INFO));
        let debug = cap(&EnvFilter::new("warn,tollgate=debug"));
        assert_eq!(debug.default_level(), Some(LevelFilter::DEBUG));
        assert!(debug.would_enable("tungstenite::protocol", &tracing::Level::INFO));
        assert!(!debug.would_enable("tungstenite::protocol", &tracing::Level::DEBUG));
        let quiet = cap(&EnvFilter::new("error"));
        assert!(!quiet.would_enable("tungstenite::protocol", &tracing::Level::INFO));
    }
}
