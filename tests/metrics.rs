//! `GET /metrics`: the figures a Prometheus scraper reads.

mod common;

use common::TestServer;

/// The value of the sample named exactly `sample` (name and labels).
fn value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
}

async fn scrape(server: &TestServer) -> String {
    let response = server.http.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// The SQLite store's queues and admission batches; the PostgreSQL store
/// exports neither yet (see `STORE_QUEUE` in src/metrics.rs).
#[track_caller]
fn assert_store_queues(text: &str) {
    assert!(text.contains(r#"tollgate_store_queue_depth{thread="writer"}"#), "{text}");
    assert!(text.contains(r#"tollgate_store_queue_depth{thread="admissions"}"#), "{text}");
    let batches = "tollgate_store_admissions_per_commit";
    assert!(value(text, &format!("{batches}_count")) >= Some(1.0), "{text}");
    assert!(text.contains(&format!(r#"{batches}_bucket{{le="128"}}"#)), "{text}");
}

#[tokio::test]
async fn sessions_upgrades_ticks_ledger_rows_and_the_store_queue_are_exported() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    client.event_of("usage.session_started").await;
    server.refused("/v1/realtime/session?kind=conversational&token=tgu_nope").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    // Reading the limits records the session's usage so far.
    server.remaining("ada", "conversational_seconds").await;

    let text = scrape(&server).await;
    let open = r#"tollgate_open_sessions{kind="conversational"}"#;
    assert_eq!(value(&text, open), Some(1.0), "{text}");
    assert!(value(&text, r#"tollgate_upgrades_total{outcome="accepted"}"#) >= Some(1.0));
    assert!(value(&text, r#"tollgate_upgrades_total{outcome="unauthorized"}"#) >= Some(1.0));
    assert!(value(&text, "tollgate_tick_seconds_count") >= Some(2.0), "{text}");
    assert!(text.contains(r#"tollgate_tick_seconds_bucket{le="0.025"}"#), "{text}");
    assert!(value(&text, "tollgate_ledger_rows_written_total") >= Some(1.0), "{text}");
    if common::sqlite_only("the store's queue figures", "its store has no queues it measures") {
        assert_store_queues(&text);
    }

    client.close().await;
    common::rows_once_all_ended(&server).await;
    let text = scrape(&server).await;
    assert_eq!(value(&text, open), Some(0.0), "{text}");
}
