//! Usage reports from backends: debits of any limit type, recorded once per
//! idempotency key, past zero if need be, and reaching open sessions.

mod common;

use common::{TestServer, assert_ledger_identity};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn report(human: &str, limit_type: &str, value: f64, key: &str) -> Value {
    json!({"human": human, "type": limit_type, "value": value, "idempotency_key": key})
}

/// Every row of the database's changing tables, to compare before and after.
fn snapshot(server: &TestServer) -> Vec<String> {
    let db = server.db();
    let mut rows = Vec::new();
    for table in ["humans", "limits", "ledger", "usage_reports"] {
        let found = db.rows(&format!("SELECT * FROM {table} ORDER BY 1"), &[]);
        rows.extend(found.iter().map(|row| format!("{table}: {:?}", row.0)));
    }
    rows
}

#[tokio::test]
async fn a_report_debits_in_full_even_past_zero_and_says_what_remains() {
    let server = TestServer::start().await;
    server.mint("ann", json!([{"type": "token_cnt", "value": 100}])).await;

    let (status, body) =
        server.post("/v1/usage/report", report("ann", "token_cnt", 30.0, "r1")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["remaining"], 70.0);
    assert_eq!(body["value"], 30.0);
    assert_eq!(body["type"], "token_cnt");

    let mut over = report("ann", "token_cnt", 90.0, "r2");
    over["metadata"] = json!({"model": "in-house", "request": 17});
    let (_, body) = server.post("/v1/usage/report", over).await;
    assert_eq!(body["remaining"], -20.0);
    assert_eq!(body["metadata"], json!({"model": "in-house", "request": 17}));
    assert_eq!(server.remaining("ann", "token_cnt").await, -20.0);

    // Exhausted until topped up: a completion is refused.
    let token = server.mint("ann", json!([])).await;
    let chat = json!({"model": "echo", "messages": [{"role": "user", "content": "hi"}]});
    let response = server
        .http
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&token)
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn seconds_can_be_reported_and_an_unknown_human_is_metered_unlimited() {
    let server = TestServer::start().await;
    let (status, body) = server
        .post("/v1/usage/report", report("new", "voice_synthesis_seconds", 2.5, "tts-1"))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["remaining"], Value::Null);
    assert_eq!(server.limits_of("new").await, json!([]));
    let balance = server.db().query_i64("SELECT balance FROM limits WHERE human_id = 1", &[]);
    assert_eq!(balance, -2500, "kept in milliseconds");
}

#[tokio::test]
async fn a_retried_report_changes_nothing_and_gets_the_first_answer() {
    let server = TestServer::start().await;
    server.mint("bo", json!([{"type": "token_cnt", "value": 100}])).await;
    let first = server.post("/v1/usage/report", report("bo", "token_cnt", 10.0, "same")).await;
    let before = snapshot(&server);

    let response = server
        .http
        .post(server.url("/v1/usage/report"))
        .header("x-api-key", &server.key)
        .json(&report("bo", "token_cnt", 10.0, "same"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    let again: Value = response.json().await.unwrap();
    assert_eq!(again, first.1);
    assert_eq!(snapshot(&server), before);

    // The same key for a different report is refused, and changes nothing.
    let (status, body) =
        server.post("/v1/usage/report", report("bo", "token_cnt", 11.0, "same")).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["type"], "idempotency_key_reused");
    assert_eq!(snapshot(&server), before);
    assert_eq!(server.remaining("bo", "token_cnt").await, 90.0);
}

#[tokio::test]
async fn concurrent_reports_with_one_key_are_recorded_once() {
    let server = TestServer::start().await;
    server.mint("cy", json!([{"type": "token_cnt", "value": 1000}])).await;
    for round in 0..20 {
        let key = format!("key-{round}");
        let body = report("cy", "token_cnt", 5.0, &key);
        let answers = futures::future::join_all(
            (0..4).map(|_| server.post("/v1/usage/report", body.clone())),
        )
        .await;
        let first = &answers[0].1;
        for (status, answer) in &answers {
            assert_eq!(*status, StatusCode::OK);
            assert_eq!(answer, first, "every retry gets the first answer");
        }
    }
    assert_eq!(server.remaining("cy", "token_cnt").await, 1000.0 - 20.0 * 5.0);
    let rows =
        server.db().query_i64("SELECT COUNT(*) FROM ledger WHERE report_id IS NOT NULL", &[]);
    assert_eq!(rows, 20);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn reported_seconds_reach_an_open_session_at_once() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("di", 30.0).await;
    let mut client = server.connect(&token).await;
    client.event_of("usage.session_started").await;

    let (status, body) =
        server.post("/v1/usage/report", report("di", "conversational_seconds", 30.0, "k")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let closed = client.until_closed().await;
    assert_eq!(closed.code, Some(4001));
    assert!(closed.after < 1.0, "cut off {} s after the start", closed.after);
    // The session's time until the report, and the report in full.
    let remaining = server.remaining("di", "conversational_seconds").await;
    assert!((-1.0..=0.0).contains(&remaining), "{remaining}");
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn bad_reports_are_refused_by_field_and_change_nothing() {
    let server = TestServer::start().await;
    let token = server.mint("ed", json!([{"type": "token_cnt", "value": 100}])).await;
    let before = snapshot(&server);
    let long_key = "k".repeat(256);
    let cases = [
        (json!({"human": "ed", "type": "token_cnt", "value": 0, "idempotency_key": "a"}), "value"),
        (json!({"human": "ed", "type": "token_cnt", "value": -1, "idempotency_key": "a"}), "value"),
        (
            json!({"human": "ed", "type": "token_cnt", "value": 1.5, "idempotency_key": "a"}),
            "value",
        ),
        (
            json!({"human": "ed", "type": "token_cnt", "value": "1", "idempotency_key": "a"}),
            "value",
        ),
        (
            json!({"human": "ed", "type": "token_cnt", "value": 1e13, "idempotency_key": "a"}),
            "value",
        ),
        (json!({"human": "ed", "type": "minutes", "value": 1, "idempotency_key": "a"}), "type"),
        (json!({"human": "ed", "type": "token_cnt", "value": 1}), "idempotency_key"),
        (
            json!({"human": "ed", "type": "token_cnt", "value": 1, "idempotency_key": ""}),
            "idempotency_key",
        ),
        (
            json!({"human": "ed", "type": "token_cnt", "value": 1, "idempotency_key": long_key}),
            "idempotency_key",
        ),
        (
            json!({"human": "ed", "type": "token_cnt", "value": 1, "idempotency_key": "a",
                "metadata": [1]}),
            "metadata",
        ),
        (
            json!({"human": "ed", "type": "token_cnt", "value": 1, "idempotency_key": "a",
                "extra": true}),
            "extra",
        ),
        (json!({"human": "", "type": "token_cnt", "value": 1, "idempotency_key": "a"}), "human"),
    ];
    for (body, field) in cases {
        let (status, answer) = server.post("/v1/usage/report", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        assert_eq!(answer["type"], "invalid_input");
        assert!(answer["message"].as_str().unwrap().contains(field), "{body}: {answer}");
    }

    let response = server
        .http
        .post(server.url("/v1/usage/report"))
        .bearer_auth(&token)
        .json(&report("ed", "token_cnt", 1.0, "a"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN, "a usage token cannot report");
    assert_eq!(snapshot(&server), before);
}

#[tokio::test]
async fn no_number_of_reports_takes_a_pool_below_minus_the_largest_limit() {
    let server = TestServer::start().await;
    let huge = |key: &str| report("fay", "voice_synthesis_seconds", 1e12, key);
    let (status, body) = server.post("/v1/usage/report", huge("first")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let before = snapshot(&server);

    let (status, body) = server.post("/v1/usage/report", huge("second")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["message"].as_str().unwrap().contains("below -1e12"), "{body}");
    assert_eq!(snapshot(&server), before);
}
