//! The benchmark suite of `benches/suite`, run once at a small size for
//! correctness only: every figure completes without an error, every
//! session ends as it should, and the database adds up afterwards. Speeds
//! are printed, never asserted; a shared CI machine makes them noise. The
//! pair figure needs a PostgreSQL server and is skipped, saying so,
//! without `TOLLGATE_TEST_POSTGRES` (see tests/common/postgres.rs).

mod common;

// The CI test uses only part of the suite; the command line the rest.
#[allow(dead_code)]
#[path = "../benches/suite/mod.rs"]
mod suite;

use std::time::Duration;

use suite::figures::{mints, pair, relay, sessions, soak, upgrades};
use suite::stats;

/// The figures load the whole machine: one at a time, so that one's load
/// cannot push another's cut-offs late.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Far looser than the 0.1 s of the target: a debug build on a busy CI
/// machine must still pass, and a cut-off this late is a bug, not noise.
const CUT_OFF_SANITY: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_session_is_cut_off_with_4001_at_its_limit_and_the_ledger_adds_up() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let database = common::TestDatabase::create().await;
    let config = sessions::Config::small(database.setting());
    let report = sessions::run(&config).await.unwrap();
    println!("{report}");

    assert!(report.errors.is_empty(), "{}", report.errors);
    assert_eq!(report.opened, config.sessions);
    assert_eq!(report.open_at_peak, config.sessions);
    assert_eq!(report.server.open_at_peak, Some(config.sessions as f64));
    assert_eq!(report.closed_at_limit, config.sessions);
    assert_eq!(report.cut_off.measured, config.sessions);
    assert!(report.cut_off.max < CUT_OFF_SANITY, "a cut-off {:?} off", report.cut_off.max);
    assert!(report.messages >= 2 * config.sessions, "{} usage messages", report.messages);
    assert_server_figures(&report.server);

    let db = database.db();
    common::assert_ledger_identity(&db);
    let rows = ended_sessions(&database.db(), "usage_limit_exceeded");
    assert_eq!(rows.len() as u64, config.sessions);
    let limit = config.limit().as_millis() as i64;
    assert!(rows.iter().all(|charged| *charged == limit), "not all charged {limit} ms: {rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_upgrades_open_and_close_cleanly_as_plain_ones_do() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let database = common::TestDatabase::create().await;
    let config = upgrades::Config::small(database.setting());
    let report = upgrades::run(&config).await.unwrap();
    println!("{report}");

    for side in [&report.tollgate, &report.baseline] {
        assert!(side.errors.is_empty(), "{}", side.errors);
        let (p50, p99) = (side.latency.p50.as_secs_f64(), side.latency.p99.as_secs_f64());
        assert_positive(&[side.completed as f64, side.per_second, p50, p99]);
    }
    assert_eq!(report.rounds.len(), config.rounds);
    assert_positive(&report.rounds);
    assert_positive(&[report.rate_ratio(), report.p99_ratio()]);

    common::assert_ledger_identity(&database.db());
    let rows = ended_sessions(&database.db(), "client_closed");
    assert!(rows.len() as u64 >= report.tollgate.completed, "{} sessions", rows.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_frames_all_come_back_and_the_sessions_close_cleanly() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let database = common::TestDatabase::create().await;
    let config = relay::Config::small(database.setting());
    let report = relay::run(&config).await.unwrap();
    println!("{report}");

    for side in [&report.tollgate, &report.baseline] {
        assert!(side.errors.is_empty(), "{}", side.errors);
        assert_positive(&[side.echoes as f64, side.per_second]);
    }
    assert_eq!(report.rounds.len(), config.rounds);
    assert_positive(&report.rounds);
    assert_positive(&[report.ratio()]);

    common::assert_ledger_identity(&database.db());
    // Every round's sessions, and the warm-up's.
    let closed = ended_sessions(&database.db(), "client_closed").len();
    assert_eq!(closed, config.sessions * (config.rounds + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mint_is_answered_with_a_token_and_recorded() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let database = common::TestDatabase::create().await;
    let config = mints::Config::small(database.setting());
    let report = mints::run(&config).await.unwrap();
    println!("{report}");

    assert!(report.errors.is_empty(), "{}", report.errors);
    let (p50, p99) = (report.latency.p50.as_secs_f64(), report.latency.p99.as_secs_f64());
    assert_positive(&[report.minted as f64, report.per_second, p50, p99]);

    let db = database.db();
    common::assert_ledger_identity(&db);
    let tokens = db.query_i64("SELECT COUNT(*) FROM usage_tokens", &[]);
    assert!(tokens as u64 >= report.minted, "{tokens} tokens for {} mints", report.minted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_ends_every_session_as_it_should_and_leaves_no_file_open() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let database = common::TestDatabase::create().await;
    let config = soak::Config::small(database.setting());
    let report = soak::run(&config).await.unwrap();
    println!("{report}");

    assert!(report.ends.errors.is_empty(), "{}", report.ends.errors);
    assert!(report.ends.closed_by_client >= config.clients as u64, "{report}");
    assert!(report.ends.cut_off >= config.clients as u64, "{report}");
    // On PostgreSQL the server opens connections as it needs them, up to
    // its pools' sizes (16 and 2): those may come after the first count.
    let pool_growth = match common::database::backend() {
        common::database::Backend::Sqlite => 0,
        common::database::Backend::Postgres => 18,
    };
    assert!(report.fds_after <= report.fds_before + pool_growth, "{report}");
    assert_positive(&[report.rss_warm_kib as f64, report.rss_end_kib as f64]);

    let db = database.db();
    common::assert_ledger_identity(&db);
    let rows = common::session_rows(&db);
    let ended = |reason: &str| rows.iter().filter(|(r, _)| r.as_deref() == Some(reason)).count();
    let (warm_up, run) = (&report.warm_up, &report.ends);
    assert_eq!(ended("client_closed") as u64, warm_up.closed_by_client + run.closed_by_client);
    assert_eq!(ended("usage_limit_exceeded") as u64, warm_up.cut_off + run.cut_off);
    let sessions = warm_up.sessions() + run.sessions();
    assert_eq!(rows.len() as u64, sessions, "sessions ended otherwise: {rows:?}");
}

/// A server's memory, CPU and ticks were all measured. Its CPU is counted
/// in clock ticks of 10 ms, and an idle server at the small size can use
/// none in a window of 2 s: it need only be a share.
#[track_caller]
fn assert_server_figures(server: &sessions::ServerFigures) {
    let ticks = [server.tick_p50, server.tick_p99].map(|tick| tick.unwrap().as_secs_f64());
    assert_positive(&[server.rss_per_session_kib, ticks[0], ticks[1]]);
    let cpu = server.cpu_percent;
    assert!(cpu.is_finite() && (0.0..=200.0).contains(&cpu), "CPU {cpu} % of one core");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_postgresql_database_cut_off_every_pool_where_it_runs_dry() {
    let Some(server) = common::postgres::server("the pair figure of bench_suite") else {
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let database = common::postgres::FreshDatabase::create(&server).await;
    let config = pair::Config::small(database.url.clone());
    let report = pair::run(&config).await.unwrap();
    println!("{report}");

    assert!(report.errors.is_empty(), "{}", report.errors);
    assert_eq!(report.opened, config.sessions);
    assert_eq!(report.open_at_peak, config.sessions);
    for server in &report.servers {
        assert_eq!(server.open_at_peak, Some(server.sessions as f64));
        assert_server_figures(server);
    }
    assert_eq!(report.servers[0].sessions + report.servers[1].sessions, config.sessions);
    assert_eq!(report.closed_at_limit, config.sessions);
    for cut_off in [&report.cut_off_shared, &report.cut_off_one_server] {
        assert_eq!(cut_off.measured, config.sessions / 2);
        assert!(cut_off.max < CUT_OFF_SANITY, "a cut-off {:?} off", cut_off.max);
    }
    let (commits, rows) = (report.database.commits as f64, report.database.rows as f64);
    assert_positive(&[commits, rows]);

    let db = common::Db::Postgres(database.url.clone());
    common::assert_ledger_identity(&db);
    assert_eq!(ended_sessions(&db, "usage_limit_exceeded").len() as u64, config.sessions);
    assert_pools_drained_exactly(&db, config.limit());
    let open = "SELECT (SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL)
                     + (SELECT COUNT(*) FROM instances WHERE ended_at IS NULL)";
    assert_eq!(db.query_i64(open, &[]), 0, "a session or a server's run was left open");
}

#[test]
fn a_figure_taken_in_rounds_is_the_median_of_the_rounds() {
    // Figures a binary fraction can hold exactly.
    assert_eq!(stats::median(&[0.875]), 0.875);
    assert_eq!(stats::median(&[0.75, 1.0]), 0.875);
    assert_eq!(stats::median(&[1.0, 0.5, 0.9375, 0.75, 0.875]), 0.875);
    assert_eq!(stats::median(&[0.875, 0.5, 1.25, 0.75]), 0.8125);
    assert!(stats::median(&[]).is_nan());
}

#[test]
fn the_pair_figure_names_its_database_in_the_url_it_was_given() {
    let cases = [
        ("postgres://u@h:5432/postgres", "postgres://u@h:5432/run"),
        ("postgres://u@h", "postgres://u@h/run"),
        ("postgres://u:p/?x@h/db?sslmode=require", "postgres://u:p/?x@h/run?sslmode=require"),
        ("postgresql://h?sslmode=disable", "postgresql://h/run?sslmode=disable"),
    ];
    for (url, expected) in cases {
        assert_eq!(suite::postgres::with_database(url, "run").unwrap(), expected, "{url}");
    }
}

/// Every human's pool is at zero, charged its whole limit between its two
/// sessions and not a millisecond more.
#[track_caller]
fn assert_pools_drained_exactly(db: &common::Db, limit: Duration) {
    let pools = db.rows(
        "SELECT l.balance, (SELECT CAST(SUM(s.charged) AS BIGINT) FROM sessions s
                            WHERE s.human_id = l.human_id), h.external_id
         FROM limits l JOIN humans h ON h.id = l.human_id",
        &[],
    );
    let limit = limit.as_millis() as i64;
    let drained = |pool: &&common::database::Row| (pool.get(0), pool.get(1)) == (0i64, limit);
    let wrong: Vec<_> = pools.iter().filter(|pool| !drained(pool)).map(|pool| &pool.0).collect();
    assert!(wrong.is_empty(), "pools not drained to 0 by {limit} ms of sessions: {wrong:?}");
}

#[track_caller]
fn assert_positive(figures: &[f64]) {
    for figure in figures {
        assert!(figure.is_finite() && *figure > 0.0, "not a finite positive figure: {figures:?}");
    }
}

/// The charge of every session in the database, each of which must have
/// ended with `reason`.
#[track_caller]
fn ended_sessions(db: &common::Db, reason: &str) -> Vec<i64> {
    let rows = common::session_rows(db);
    let other = rows.iter().find(|(ended, _)| ended.as_deref() != Some(reason));
    assert!(other.is_none(), "a session that did not end with {reason}: {other:?}");
    rows.into_iter().map(|(_, charged)| charged).collect()
}
