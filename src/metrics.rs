//! Prometheus metrics: the names Tollgate records, and the one recorder all
//! servers of a process share, rendered at `GET /metrics`. The `metrics`
//! crate's macros record into it from anywhere, at the cost of an atomic
//! update each.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Open metered sessions, by `kind`.
pub const OPEN_SESSIONS: &str = "tollgate_open_sessions";
/// Session upgrades, by `outcome`: `accepted`, or the error type refusing it.
pub const UPGRADES: &str = "tollgate_upgrades_total";
/// TCP connections the listener holds, sessions included.
pub const OPEN_CONNECTIONS: &str = "tollgate_open_connections";
/// Connections turned away because the listener held its cap.
pub const CONNECTIONS_REFUSED: &str = "tollgate_connections_refused_total";
/// Authenticated requests refused, before their credential was read,
/// because their address failed to authenticate too often.
pub const AUTH_RATE_LIMITED: &str = "tollgate_auth_rate_limited_total";
/// Seconds each tick's transaction took to record.
pub const TICK_SECONDS: &str = "tollgate_tick_seconds";
/// Ledger rows written (rows of a transaction that then failed included).
pub const LEDGER_ROWS: &str = "tollgate_ledger_rows_written_total";
/// Jobs waiting for the SQLite store's threads, by queue: `meter`,
/// `admissions`, `writer` (the other writes) and `reader`. The PostgreSQL
/// store does not export it yet: how many calls wait for one of its pools'
/// connections is not measured, and a backlog there shows only as slower
/// calls.
pub const STORE_QUEUE: &str = "tollgate_store_queue_depth";
/// Sessions admitted, or refused, by each of the SQLite store's admission
/// transactions: many to one commit under a burst of upgrades, one when
/// they come one at a time. The PostgreSQL store commits each admission on
/// its own and does not export it.
pub const ADMISSIONS_PER_COMMIT: &str = "tollgate_store_admissions_per_commit";

/// From a millisecond to ten seconds: a tick's transaction should take a
/// few milliseconds, and one past a second means the store is in trouble.
const TICK_BUCKETS: [f64; 12] =
    [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Up to the store's largest batch of admissions.
const BATCH_BUCKETS: [f64; 8] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often the recorder's histograms are drained into their buckets. The
/// recorder keeps every sample until then (or until `/metrics` is read),
/// so a server nobody scrapes would otherwise hold each tick's duration for
/// good.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The process's recorder, installed on first use. Should another
/// recorder already be installed (an embedding program's own), Tollgate's
/// metrics go there, and this one renders nothing.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(TICK_SECONDS.into()), &TICK_BUCKETS)
            .and_then(|builder| {
                let batches = Matcher::Full(ADMISSIONS_PER_COMMIT.into());
                builder.set_buckets_for_metric(batches, &BATCH_BUCKETS)
            })
            .expect("the buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics shows nothing");
        }
        spawn_upkeep(handle.clone());
        handle
    })
}

/// A thread for the life of the process, draining the histograms every
/// [`UPKEEP_EVERY`]; should it fail to start, `/metrics` reads still drain
/// them.
fn spawn_upkeep(handle: PrometheusHandle) {
    let upkeep = move || loop {
        std::thread::sleep(UPKEEP_EVERY);
        handle.run_upkeep();
    };
    let started = std::thread::Builder::new().name("tollgate-metrics-upkeep".into()).spawn(upkeep);
    if let Err(error) = started {
        tracing::warn!(%error, "cannot start the metrics upkeep thread");
    }
}

/// `GET /metrics`, in Prometheus's text format.
pub async fn render() -> String {
    handle().render()
}
