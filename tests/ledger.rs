//! Reading the ledger and the sessions back over HTTP: `GET /v1/usage/events`
//! and `GET /v1/realtime/sessions`, their rows, filters and pages, what
//! another project sees, and paging while rows are being written.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Api, TestServer, assert_ledger_identity, rows_once_all_ended, wait_for_end};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::sleep;

const CONVERSATIONAL: &str = "conversational_seconds";

/// The fields of every listed ledger row.
const EVENT_FIELDS: [&str; 10] = [
    "completion",
    "created_at",
    "entry",
    "human",
    "id",
    "report",
    "session",
    "type",
    "updated_at",
    "value",
];

/// A tick slow enough that none comes while a test reads what the last
/// settle of the meter recorded.
const SLOW_TICK: Duration = Duration::from_secs(60);

/// A GET with an API key; the status and the body.
async fn get(api: &Api, key: &str, path_and_query: &str) -> (StatusCode, Value) {
    let request = api.http.get(api.url(path_and_query)).header("x-api-key", key);
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A page the server's own key reads, which must be answered.
async fn page(api: &Api, path_and_query: &str) -> Value {
    let (status, body) = get(api, &api.key, path_and_query).await;
    assert_eq!(status, StatusCode::OK, "{path_and_query}: {body}");
    body
}

/// The rows of a page that must hold every matching row.
async fn all(api: &Api, path_and_query: &str) -> Vec<Value> {
    let body = page(api, path_and_query).await;
    assert_eq!(body["has_more"], false, "{path_and_query}: {body}");
    body["data"].as_array().unwrap().clone()
}

fn report(human: &str, limit_type: &str, value: f64, key: &str) -> Value {
    json!({"human": human, "type": limit_type, "value": value, "idempotency_key": key})
}

async fn post_report(api: &Api, key: &str, body: Value) -> Value {
    let request = api.http.post(api.url("/v1/usage/report")).header("x-api-key", key);
    let response = request.json(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.unwrap()
}

/// Charges the human's open sessions up to now, as every change of limits
/// does, with a top-up of nothing.
async fn settle(api: &Api, human: &str) {
    let nothing = json!({"human": human, "mode": "add",
                         "limits": [{"type": CONVERSATIONAL, "value": 0}]});
    let (status, body) = api.put("/v1/usage/token", nothing).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Asserts a time is RFC 3339 in UTC with milliseconds, within a minute of
/// now.
#[track_caller]
fn assert_recent(time: &Value) {
    let text = time.as_str().unwrap_or_else(|| panic!("not a time: {time}"));
    let parsed = chrono::DateTime::parse_from_rfc3339(text).unwrap();
    assert!(text.ends_with('Z') && text.len() == 24, "{text}");
    let age = chrono::Utc::now().signed_duration_since(parsed);
    assert!(age.num_seconds().abs() < 60, "{text} is not recent");
}

fn ids(rows: &[Value]) -> Vec<i64> {
    rows.iter().map(|row| row["id"].as_i64().unwrap()).collect()
}

fn count(server: &TestServer, sql: &str) -> i64 {
    server.db().query_i64(sql, &[])
}

#[tokio::test]
async fn grants_session_and_completion_debits_and_reports_are_listed_with_their_sources() {
    let server = TestServer::start().await;
    let limits =
        json!([{"type": CONVERSATIONAL, "value": 30}, {"type": "token_cnt", "value": 1000}]);
    let token = server.mint("ada", limits).await;

    let mut client = server.connect_ticking(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    while client.event_of("usage.remaining").await["used"].as_f64().unwrap() < 0.1 {}
    client.close().await;
    let (reason, charged) = wait_for_end(&server, &session_id).await;
    assert_eq!(reason, "client_closed");

    let chat = json!({"model": "echo", "messages": [{"role": "user", "content": "Hello"}]});
    let request = server.http.post(server.url("/v1/chat/completions")).bearer_auth(&token);
    let answer: Value = request.json(&chat).send().await.unwrap().json().await.unwrap();
    let tokens = answer["usage"]["total_tokens"].as_f64().unwrap();
    let reported =
        post_report(&server, &server.key, report("ada", "token_cnt", 7.0, "job-1")).await;

    let body = page(&server, "/v1/usage/events").await;
    let rows = body["data"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "{body}");
    for row in rows {
        let fields: Vec<&str> = row.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(fields, EVENT_FIELDS, "{row}");
        assert_eq!(row["human"], "ada");
        assert_recent(&row["created_at"]);
        assert_recent(&row["updated_at"]);
        assert!(row["updated_at"].as_str() >= row["created_at"].as_str(), "{row}");
    }
    let sources = |row: &Value| (row["session"].clone(), row["completion"].clone());
    let pick = |row: &Value| (row["entry"].clone(), row["type"].clone(), row["value"].clone());
    let none = (Value::Null, Value::Null);

    assert_eq!(pick(&rows[0]), (json!("grant"), json!(CONVERSATIONAL), json!(30.0)));
    assert_eq!((sources(&rows[0]), &rows[0]["report"]), (none.clone(), &Value::Null));
    assert_eq!(pick(&rows[1]), (json!("grant"), json!("token_cnt"), json!(1000.0)));

    let used = -(charged as f64) / 1000.0;
    assert_eq!(pick(&rows[2]), (json!("debit"), json!(CONVERSATIONAL), json!(used)));
    assert_eq!(sources(&rows[2]), (json!(session_id), Value::Null));

    assert_eq!(pick(&rows[3]), (json!("debit"), json!("token_cnt"), json!(-tokens)));
    assert_eq!(sources(&rows[3]), (Value::Null, answer["id"].clone()));
    assert!(answer["id"].as_str().unwrap().starts_with("cmpl_"), "{answer}");

    assert_eq!(pick(&rows[4]), (json!("debit"), json!("token_cnt"), json!(-7.0)));
    assert_eq!(sources(&rows[4]), none);
    assert_eq!(rows[4]["report"], json!({"id": reported["id"], "idempotency_key": "job-1"}));

    assert_eq!(ids(rows), db_ledger_ids(&server, "SELECT id FROM ledger ORDER BY id"));
    assert_eq!((&body["has_more"], &body["next_after"]), (&json!(false), &rows[4]["id"]));
    assert_eq!(server.remaining("ada", CONVERSATIONAL).await, 30.0 + used);
    assert_ledger_identity(&server.db());
}

fn db_ledger_ids(server: &TestServer, sql: &str) -> Vec<i64> {
    server.db().rows(sql, &[]).iter().map(|row| row.get(0)).collect()
}

#[tokio::test]
async fn an_ended_session_is_listed_with_what_it_was_charged_and_why_it_ended() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect_ticking(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    while client.event_of("usage.remaining").await["used"].as_f64().unwrap() < 0.1 {}
    client.close().await;
    let (_, charged) = wait_for_end(&server, &session_id).await;

    let body = page(&server, "/v1/realtime/sessions").await;
    let rows = body["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{body}");
    let row = &rows[0];
    let fields: Vec<&str> = row.as_object().unwrap().keys().map(String::as_str).collect();
    let expected = ["end_reason", "ended_at", "human", "id", "kind", "seconds_used", "started_at"];
    assert_eq!(fields, expected, "{row}");
    assert_eq!(row["id"], session_id.as_str());
    assert_eq!((&row["human"], &row["kind"]), (&json!("ada"), &json!("conversational")));
    assert_eq!(row["seconds_used"], charged as f64 / 1000.0);
    assert_eq!(row["end_reason"], "client_closed");
    assert_recent(&row["started_at"]);
    assert_recent(&row["ended_at"]);
    assert!(row["ended_at"].as_str() >= row["started_at"].as_str(), "{row}");
    assert_eq!((&body["has_more"], &body["next_after"]), (&json!(false), &row["id"]));
}

#[tokio::test]
async fn an_open_session_shows_its_use_so_far_and_its_debit_row_grows_in_place() {
    let server = TestServer::start_with(|s| s.tick = SLOW_TICK).await;
    let token = server.mint_seconds("ada", 30.0).await;
    let mut client = server.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    sleep(Duration::from_millis(300)).await;
    settle(&server, "ada").await;

    let open = all(&server, "/v1/realtime/sessions?state=open").await;
    assert_eq!(open.len(), 1);
    assert_eq!((&open[0]["ended_at"], &open[0]["end_reason"]), (&Value::Null, &Value::Null));
    let first = all(&server, "/v1/usage/events?type=conversational_seconds").await;
    let debit = first.last().unwrap().clone();
    assert_eq!((&debit["entry"], &debit["session"]), (&json!("debit"), &json!(session_id)));
    let used = open[0]["seconds_used"].as_f64().unwrap();
    assert!(used >= 0.3, "{used}");
    assert_eq!(debit["value"].as_f64().unwrap(), -used);

    // A later read finds the same row, grown, not a new one.
    sleep(Duration::from_millis(200)).await;
    settle(&server, "ada").await;
    let second = all(&server, "/v1/usage/events?type=conversational_seconds").await;
    assert_eq!(ids(&second), ids(&first));
    let grown = second.last().unwrap();
    assert!(grown["value"].as_f64().unwrap() <= -used - 0.2, "{grown} after {debit}");
    assert_eq!(grown["created_at"], debit["created_at"]);
    assert!(grown["updated_at"].as_str() > debit["updated_at"].as_str(), "{grown}");
    assert_eq!(all(&server, "/v1/realtime/sessions?state=ended").await, Vec::<Value>::new());

    client.close().await;
    let (_, charged) = wait_for_end(&server, &session_id).await;
    let ended = all(&server, "/v1/realtime/sessions?state=ended").await;
    assert_eq!(ended[0]["seconds_used"], charged as f64 / 1000.0);
    assert_eq!(all(&server, "/v1/realtime/sessions?state=open").await, Vec::<Value>::new());
}

#[tokio::test]
async fn time_given_back_to_a_dead_client_is_a_refund_row_of_its_session() {
    let server = TestServer::start_with(|s| s.ping = Duration::from_millis(200)).await;
    let token = server.mint_seconds("ada", 10.0).await;
    let mut client = server.connect(&token).await;
    let session_id = client.next_event().await["session_id"].as_str().unwrap().to_owned();
    // From here the client neither reads nor sends: it answers no pings.
    // A read of the limits while it is silent records its time past its
    // last frame, which its end then gives back.
    sleep(Duration::from_millis(250)).await;
    settle(&server, "ada").await;
    let (reason, charged) = wait_for_end(&server, &session_id).await;
    assert_eq!(reason, "client_timeout");

    let rows = all(&server, &format!("/v1/usage/events?type={CONVERSATIONAL}")).await;
    let refund = rows.iter().find(|row| row["entry"] == "refund").expect("a refund row");
    assert_eq!(refund["session"], session_id.as_str());
    assert!(refund["value"].as_f64().unwrap() > 0.0, "{refund}");
    let of_session: f64 = rows
        .iter()
        .filter(|row| row["session"] == session_id.as_str())
        .map(|row| row["value"].as_f64().unwrap())
        .sum();
    assert!((of_session + charged as f64 / 1000.0).abs() < 1e-9, "{of_session} vs {charged}");
    drop(client);
}

#[tokio::test]
async fn filters_pick_a_humans_rows_or_a_types_and_an_unknown_human_lists_nothing() {
    let server = TestServer::start().await;
    let ada = server.mint("ada", json!([{"type": CONVERSATIONAL, "value": 10}])).await;
    let bob = server.mint("bob", json!([{"type": "token_cnt", "value": 50}])).await;
    post_report(&server, &server.key, report("bob", "token_cnt", 5.0, "b1")).await;
    post_report(&server, &server.key, report("ada", "token_cnt", 2.0, "a1")).await;
    let humans = count(&server, "SELECT COUNT(*) FROM humans");

    for prefix in ["/v1", "/api/v1"] {
        let rows = all(&server, &format!("{prefix}/usage/events?human=ada")).await;
        let seen: Vec<(&Value, &Value)> = rows.iter().map(|r| (&r["human"], &r["type"])).collect();
        let ada_rows =
            [(&json!("ada"), &json!(CONVERSATIONAL)), (&json!("ada"), &json!("token_cnt"))];
        assert_eq!(seen, ada_rows);

        let rows = all(&server, &format!("{prefix}/usage/events?type=token_cnt")).await;
        let humans_of: Vec<&Value> = rows.iter().map(|row| &row["human"]).collect();
        assert_eq!(humans_of, [&json!("bob"), &json!("bob"), &json!("ada")]);

        let rows = all(&server, &format!("{prefix}/usage/events?human=bob&type=token_cnt")).await;
        let values: Vec<&Value> = rows.iter().map(|row| &row["value"]).collect();
        assert_eq!(values, [&json!(50.0), &json!(-5.0)]);

        let nobody = page(&server, &format!("{prefix}/usage/events?human=nobody")).await;
        assert_eq!(nobody, json!({"data": [], "has_more": false, "next_after": null}));
        let nobody = page(&server, &format!("{prefix}/realtime/sessions?human=nobody")).await;
        assert_eq!(nobody, json!({"data": [], "has_more": false, "next_after": null}));
    }
    assert_eq!(count(&server, "SELECT COUNT(*) FROM humans"), humans, "a human was created");

    // Ada's session ends, Bob's stays open.
    server.connect(&ada).await.close().await;
    rows_once_all_ended(&server).await;
    let mut bobs = server.connect(&bob).await;
    bobs.next_event().await;
    let humans_in = |rows: Vec<Value>| -> Vec<String> {
        rows.iter().map(|row| row["human"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(humans_in(all(&server, "/v1/realtime/sessions").await), ["ada", "bob"]);
    assert_eq!(humans_in(all(&server, "/v1/realtime/sessions?state=open").await), ["bob"]);
    assert_eq!(humans_in(all(&server, "/v1/realtime/sessions?state=ended").await), ["ada"]);
    assert_eq!(humans_in(all(&server, "/v1/realtime/sessions?human=bob").await), ["bob"]);
    let none = all(&server, "/v1/realtime/sessions?human=ada&state=open").await;
    assert_eq!(none, Vec::<Value>::new());
    bobs.close().await;
}

#[tokio::test]
async fn sessions_are_paged_in_the_order_they_were_opened_by_their_public_ids() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 60.0).await;
    for _ in 0..5 {
        server.connect(&token).await.close().await;
    }
    rows_once_all_ended(&server).await;
    let opened: Vec<String> = {
        let rows = server.db().rows("SELECT public_id FROM sessions ORDER BY id", &[]);
        rows.iter().map(|row| row.get(0)).collect()
    };

    let mut seen = Vec::new();
    let mut path = "/v1/realtime/sessions?limit=2".to_owned();
    for expected_more in [true, true, false] {
        let body = page(&server, &path).await;
        let rows = body["data"].as_array().unwrap();
        seen.extend(rows.iter().map(|row| row["id"].as_str().unwrap().to_owned()));
        assert_eq!(body["has_more"], expected_more, "{body}");
        assert_eq!(body["next_after"], seen.last().unwrap().as_str());
        path = format!("/v1/realtime/sessions?limit=2&after={}", seen.last().unwrap());
    }
    assert_eq!(seen, opened);
    // Past the last one, the page is empty and the cursor stays.
    let body = page(&server, &path).await;
    assert_eq!(body, json!({"data": [], "has_more": false, "next_after": opened[4]}));
}

#[tokio::test]
async fn another_projects_rows_and_sessions_are_never_visible() {
    let server = TestServer::start().await;
    let other = tollgate::create_api_key(&server.db_setting, "other").await.unwrap();
    let other = other.expose();
    let token = server.mint_seconds("ada", 60.0).await;
    post_report(&server, &server.key, report("ada", "token_cnt", 3.0, "same-key")).await;
    server.connect(&token).await.close().await;
    rows_once_all_ended(&server).await;
    // The other project's own ada, with a report under the same key.
    post_report(&server, other, report("ada", "token_cnt", 4.0, "same-key")).await;

    let (status, theirs) = get(&server, other, "/v1/usage/events?human=ada").await;
    assert_eq!(status, StatusCode::OK, "{theirs}");
    let theirs = theirs["data"].as_array().unwrap().clone();
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    assert_eq!((&theirs[0]["value"], &theirs[0]["human"]), (&json!(-4.0), &json!("ada")));
    let ours = all(&server, "/v1/usage/events").await;
    let other_ids = db_ledger_ids(
        &server,
        "SELECT g.id FROM ledger g JOIN humans h ON h.id = g.human_id
         WHERE h.project_id <> 1 ORDER BY g.id",
    );
    assert_eq!(ids(&theirs), other_ids);
    assert!(ids(&ours).iter().all(|id| !other_ids.contains(id)), "{ours:?}");
    assert_eq!(ours.len() as i64 + 1, count(&server, "SELECT COUNT(*) FROM ledger"));

    let (status, sessions) = get(&server, other, "/v1/realtime/sessions").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sessions, json!({"data": [], "has_more": false, "next_after": null}));
    // Our session's id is no cursor for them.
    let ours = all(&server, "/v1/realtime/sessions").await;
    let path = format!("/v1/realtime/sessions?after={}", ours[0]["id"].as_str().unwrap());
    let (status, body) = get(&server, other, &path).await;
    assert_eq!((status, &body["type"]), (StatusCode::BAD_REQUEST, &json!("invalid_input")));
    assert!(body["message"].as_str().unwrap().starts_with("after: "), "{body}");
}

#[tokio::test]
async fn bad_parameters_are_refused_naming_the_parameter_and_change_nothing() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 60.0).await;
    let unknown_session = format!("after=ses_{}", "0".repeat(32));
    let events = [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=-1", "limit"),
        ("limit=", "limit"),
        ("after=-1", "after"),
        ("after=1.5", "after"),
        ("type=minutes", "type"),
        ("human=", "human"),
        ("human=%20ada", "human"),
        ("human=a%0Ab", "human"),
        ("state=open", "state"),
        ("human_id=ada", "human_id"),
        ("limit=1&limit=2", "limit"),
        ("human=ada&human=bob", "human"),
    ];
    let sessions = [
        ("state=closed", "state"),
        ("after=12", "after"),
        (unknown_session.as_str(), "after"),
        ("type=token_cnt", "type"),
        ("limit=5000", "limit"),
        ("human=", "human"),
    ];
    let humans = count(&server, "SELECT COUNT(*) FROM humans");
    let cases =
        events.iter().map(|(query, param)| (format!("/v1/usage/events?{query}"), *param)).chain(
            sessions
                .iter()
                .map(|(query, param)| (format!("/api/v1/realtime/sessions?{query}"), *param)),
        );
    for (path, param) in cases {
        let (status, body) = get(&server, &server.key, &path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["type"], "invalid_input", "{path}");
        let message = body["message"].as_str().unwrap();
        assert!(message.starts_with(&format!("{param}: ")), "{path}: {message}");
    }
    assert_eq!(count(&server, "SELECT COUNT(*) FROM humans"), humans);

    // The key is checked before the query: no key is 401 even with a bad
    // query, and a usage token is 403.
    for path in ["/v1/usage/events?limit=0", "/v1/realtime/sessions?state=x"] {
        let response = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{path}");
        let response = server.http.get(server.url(path)).bearer_auth(&token).send().await;
        assert_eq!(response.unwrap().status(), StatusCode::FORBIDDEN, "{path}");
    }
    let (status, _) = get(&server, &token, "/v1/usage/events").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a usage token in x-api-key");
}

/// The pages the paging test reads hold this many rows.
const PAGE: usize = 3;

/// Rows of the default project before paging starts: a grant and reports.
const BACKLOG: usize = 10;

/// Rounds of writing, one during each of the first pages the test reads.
/// Each writes more rows of the default project than a page holds (and
/// one of another project), so that the test is further behind with every
/// round and must follow `has_more` through many pages once they are done.
const ROUNDS: usize = 20;
const ROWS_PER_ROUND: usize = 4;

/// Writes a round each time it is told to start one, and says when it is
/// done: a report and a top-up for pat and for sam, and a report for the
/// other project's own pat, which the test must never see.
async fn write_rounds(
    api: Api,
    other_key: String,
    mut start_rx: mpsc::Receiver<usize>,
    done_tx: mpsc::Sender<()>,
) {
    while let Some(round) = start_rx.recv().await {
        for human in ["pat", "sam"] {
            let key = format!("{human}-{round}");
            post_report(&api, &api.key, report(human, "token_cnt", 1.0, &key)).await;
            let top_up = json!({"human": human, "mode": "add",
                                "limits": [{"type": "token_cnt", "value": 1}]});
            let (status, body) = api.put("/v1/usage/token", top_up).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        let key = format!("other-{round}");
        post_report(&api, &other_key, report("pat", "token_cnt", 1.0, &key)).await;
        done_tx.send(()).await.unwrap();
    }
}

/// Reads the page after `after` and checks what it says of itself; returns
/// its rows and whether more follow.
async fn next_page(api: &Api, after: Option<i64>) -> (Vec<Value>, bool) {
    let path = match after {
        Some(after) => format!("/v1/usage/events?limit={PAGE}&after={after}"),
        None => format!("/v1/usage/events?limit={PAGE}"),
    };
    let body = page(api, &path).await;
    let rows = body["data"].as_array().unwrap().clone();
    let has_more = body["has_more"].as_bool().unwrap();
    assert!(rows.len() <= PAGE && (!has_more || rows.len() == PAGE), "{body}");
    let last = rows.last().map(|row| row["id"].clone());
    assert_eq!(body["next_after"], last.unwrap_or(json!(after)), "{body}");
    (rows, has_more)
}

#[tokio::test]
async fn paging_while_rows_are_added_returns_every_row_once_in_order() {
    let server = TestServer::start().await;
    let other = tollgate::create_api_key(&server.db_setting, "other").await.unwrap();
    let other = other.expose().to_owned();
    server.mint("pat", json!([{"type": "token_cnt", "value": 1e9}])).await;
    for i in 1..BACKLOG {
        post_report(&server, &server.key, report("pat", "token_cnt", 1.0, &format!("b{i}"))).await;
    }
    let writer_api = Api::new(server.base.trim_start_matches("http://"), server.key.clone());
    let (start_tx, start_rx) = mpsc::channel(1);
    let (done_tx, mut done_rx) = mpsc::channel(1);
    let writer = tokio::spawn(write_rounds(writer_api, other, start_rx, done_tx));

    // Each of the first pages is read while a round is being written; then
    // the rest, until a page says there is no more.
    let mut seen: Vec<Value> = Vec::new();
    let after = |seen: &[Value]| seen.last().map(|row| row["id"].as_i64().unwrap());
    for round in 0..ROUNDS {
        start_tx.send(round).await.unwrap();
        let ((rows, _), done) = tokio::join!(next_page(&server, after(&seen)), done_rx.recv());
        done.expect("the writer stopped");
        seen.extend(rows);
    }
    drop(start_tx);
    writer.await.unwrap();
    let behind = BACKLOG + ROWS_PER_ROUND * ROUNDS - seen.len();
    assert!(behind > PAGE, "only {behind} rows left to page through");
    loop {
        let (rows, has_more) = next_page(&server, after(&seen)).await;
        seen.extend(rows);
        if !has_more {
            break;
        }
    }

    let seen_ids = ids(&seen);
    assert!(seen_ids.windows(2).all(|pair| pair[0] < pair[1]), "not once each, in order");
    assert_eq!(seen.len(), BACKLOG + ROWS_PER_ROUND * ROUNDS, "rows were lost or added");
    let everything = all(&server, "/v1/usage/events?limit=1000").await;
    assert_eq!(seen, everything, "the pages differ from one read of every row");
    let ours = db_ledger_ids(
        &server,
        "SELECT g.id FROM ledger g JOIN humans h ON h.id = g.human_id
         WHERE h.project_id = 1 ORDER BY g.id",
    );
    assert_eq!(seen_ids, ours);
    let theirs = count(&server, "SELECT COUNT(*) FROM ledger") as usize - ours.len();
    assert_eq!(theirs, ROUNDS, "the other project's rows were not written meanwhile");
    let humans: BTreeSet<&str> = seen.iter().map(|row| row["human"].as_str().unwrap()).collect();
    assert_eq!(humans, BTreeSet::from(["pat", "sam"]));
}
