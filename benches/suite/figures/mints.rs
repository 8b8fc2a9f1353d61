//! Figure 4, mints: `POST /v1/usage/token` as fast as a fixed number of
//! keep-alive HTTP/1.1 clients can, each mint for a new human with a
//! `conversational_seconds` limit, as a backend minting for users who log
//! in would.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use tokio::time::Instant;

use crate::suite::api::Api;
use crate::suite::server::{Server, ServerOptions};
use crate::suite::stats::{self, Summary, Tally, thousands};

pub struct Config {
    pub concurrency: usize,
    pub duration: Duration,
    pub db: PathBuf,
}

impl Config {
    pub fn full(db: PathBuf) -> Config {
        Config { concurrency: 64, duration: Duration::from_secs(10), db }
    }

    pub fn small(db: PathBuf) -> Config {
        Config { duration: Duration::from_secs(2), ..Config::full(db) }
    }
}

pub struct MintsReport {
    pub concurrency: usize,
    pub duration: Duration,
    pub minted: u64,
    pub per_second: f64,
    pub latency: Summary,
    pub errors: Tally,
}

pub async fn run(config: &Config) -> Result<MintsReport> {
    let options = ServerOptions { db: config.db.clone().into(), max_session_seconds: 3600 };
    let server = Server::start(&options).await?;
    let deadline = Instant::now() + config.duration;
    let clients =
        (0..config.concurrency).map(|i| tokio::spawn(client(server.api.clone(), i, deadline)));
    let (latencies, errors) = stats::gather(clients).await;
    server.stop().await?;
    Ok(MintsReport {
        concurrency: config.concurrency,
        duration: config.duration,
        minted: latencies.len() as u64,
        per_second: latencies.len() as f64 / config.duration.as_secs_f64(),
        latency: Summary::of(latencies),
        errors,
    })
}

/// Mints one token after another until the deadline; the latency of each
/// answered before it.
async fn client(api: Api, client: usize, deadline: Instant) -> (Vec<Duration>, Tally) {
    let mut latencies = Vec::new();
    let mut errors = Tally::default();
    for mint in 0.. {
        let began = Instant::now();
        if began >= deadline {
            break;
        }
        match api.mint(&format!("mint-{client}-{mint}"), 60.0).await {
            Ok(_) if Instant::now() <= deadline => latencies.push(began.elapsed()),
            Ok(_) => {}
            Err(error) => errors.add(format!("{error:#}")),
        }
    }
    (latencies, errors)
}

impl fmt::Display for MintsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "mints: {} keep-alive clients for {:?}", self.concurrency, self.duration)?;
        writeln!(
            f,
            "  tollgate  {:>9.0}/s ({} tokens), {}",
            self.per_second,
            thousands(self.minted),
            self.latency
        )?;
        write!(f, "  errors    {}", self.errors)
    }
}
