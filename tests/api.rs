//! The HTTP API against the real server over real sockets: every endpoint
//! under `/v1` and `/api/v1`, every error type, hostile input that must
//! change nothing, isolation between projects, token expiry and
//! revocation, the 500 path, and how secrets are stored.

mod common;

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, FixedOffset, TimeDelta, Utc};
use common::hostile::*;
use common::*;
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tollgate::secret::{self, SecretKind};

/// The default and largest token lifetime of a server with default settings.
const DAY: f64 = 86_400.0;

/// A JSON request with the given API key.
async fn with_key(
    server: &TestServer,
    key: &str,
    method: Method,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    let bytes = serde_json::to_vec(&body).unwrap();
    request(server, method, path, &key_header(key), bytes).await
}

/// `GET {prefix}/usage/limits` with a usage token.
async fn limits_by_token(server: &TestServer, prefix: &str, token: &str) -> (StatusCode, Value) {
    let path = format!("{prefix}/usage/limits");
    request(server, Method::GET, &path, &bearer_header(token), Vec::new()).await
}

/// `GET {prefix}/usage/limits` with an API key and `x-human-id`.
async fn limits_by_key(
    server: &TestServer,
    prefix: &str,
    key: &str,
    human: &str,
) -> (StatusCode, Value) {
    let path = format!("{prefix}/usage/limits");
    request(server, Method::GET, &path, &key_and_human(key, human), Vec::new()).await
}

/// Mints a token with the default key and returns the whole answer.
async fn mint_answer(server: &TestServer, prefix: &str, body: Value) -> Value {
    let (status, answer) = server.post(&format!("{prefix}/usage/token"), body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

/// Asserts a limits list is exactly these `(type, value)` pairs, each entry
/// exactly `{"type", "value"}`, in any order.
#[track_caller]
fn assert_limits(limits: &Value, expected: &[(&str, f64)]) {
    let entries = limits.as_array().unwrap_or_else(|| panic!("not a list: {limits}"));
    let mut actual: Vec<(String, f64)> = entries
        .iter()
        .map(|entry| {
            assert_eq!(fields(entry), ["type", "value"], "{entry}");
            let kind = entry["type"].as_str().unwrap_or_else(|| panic!("{entry}"));
            let value = entry["value"].as_f64().unwrap_or_else(|| panic!("{entry}"));
            (kind.to_owned(), value)
        })
        .collect();
    actual.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected: Vec<(String, f64)> =
        expected.iter().map(|(kind, value)| (kind.to_string(), *value)).collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(actual, expected, "limits were {limits}");
}

/// Asserts an error answer: the status, and a body of exactly `{"type",
/// "message"}` with this type and a message.
#[track_caller]
fn assert_error(status: StatusCode, body: &Value, expected: u16, kind: &str) {
    assert_eq!(status.as_u16(), expected, "{body}");
    assert_eq!(fields(body), ["message", "type"], "{body}");
    assert_eq!(body["type"], kind, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(!message.is_empty(), "an error without a message: {body}");
}

/// Asserts `expires_at` is RFC 3339 in UTC with milliseconds
/// (`2026-12-03T11:22:33.456Z`) and `ttl_seconds` from now, within 5 s.
#[track_caller]
fn assert_expires_in(expires_at: &Value, ttl_seconds: f64) -> DateTime<FixedOffset> {
    let text = expires_at.as_str().unwrap_or_else(|| panic!("not a string: {expires_at}"));
    assert_eq!(text.len(), 24, "not YYYY-MM-DDTHH:MM:SS.mmmZ: {text}");
    assert!(text.ends_with('Z'), "not UTC: {text}");
    assert_eq!(&text[19..20], ".", "no milliseconds: {text}");
    assert!(text[20..23].bytes().all(|b| b.is_ascii_digit()), "{text}");
    let parsed = DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("{text}: {e}"));
    let expected = Utc::now() + TimeDelta::milliseconds((ttl_seconds * 1000.0) as i64);
    let off = (parsed.with_timezone(&Utc) - expected).num_milliseconds().abs();
    assert!(off <= 5_000, "{text} is {off} ms away from now + {ttl_seconds} s");
    parsed
}

fn count(db: &Db, sql: &str, params: &[&dyn database::Param]) -> i64 {
    db.query_i64(sql, params)
}

fn wal_path(db: &std::path::Path) -> PathBuf {
    let mut wal = OsString::from(db.as_os_str());
    wal.push("-wal");
    PathBuf::from(wal)
}

/// Everything the database holds, as bytes to search. Of a SQLite file,
/// the file and its write-ahead log, free pages and indexes included. Of
/// PostgreSQL, whose files are not the test's to read, every value of
/// every table: a secret written to its files some other way (in its log,
/// say) would not be found.
fn stored_bytes(db: &Db) -> Vec<u8> {
    let Db::Postgres(_) = db else {
        let path = db.sqlite_path();
        let mut bytes = std::fs::read(path).unwrap();
        let wal = wal_path(path);
        if wal.exists() {
            bytes.extend(std::fs::read(&wal).unwrap());
        }
        return bytes;
    };
    let mut bytes = Vec::new();
    for table in db.tables() {
        for row in db.rows(&format!("SELECT * FROM {table}"), &[]) {
            for cell in row.0 {
                bytes.extend(cell_bytes(cell));
                bytes.push(0);
            }
        }
    }
    bytes
}

fn cell_bytes(cell: database::Cell) -> Vec<u8> {
    match cell {
        database::Cell::Null => Vec::new(),
        database::Cell::Int(n) => n.to_string().into_bytes(),
        database::Cell::Real(r) => r.to_string().into_bytes(),
        database::Cell::Text(text) => text.into_bytes(),
        database::Cell::Bytes(bytes) => bytes,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

// ---------------------------------------------------------------------------
// Happy paths
// ---------------------------------------------------------------------------

#[tokio::test]
async fn healthz_answers_ok() {
    let server = TestServer::start().await;
    let response = server.http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({ "status": "ok" }));
}

#[tokio::test]
async fn minting_answers_the_token_the_human_its_expiry_its_ttl_and_the_limits() {
    let server = TestServer::start().await;
    for prefix in PREFIXES {
        let human = format!("ada{prefix}");
        let limits = json!([
            { "type": "conversational_seconds", "value": 60 },
            { "type": "token_cnt", "value": 1000 },
        ]);
        let answer =
            mint_answer(&server, prefix, json!({ "human": human, "limits": limits })).await;
        assert_eq!(
            fields(&answer),
            ["expires_at", "human", "limits", "token", "ttl_seconds"],
            "{answer}"
        );
        let token = answer["token"].as_str().unwrap();
        assert!(token.starts_with("tgu_"), "{token}");
        assert_eq!(token.len(), 51, "{token}");
        assert!(secret::parse(token, SecretKind::UsageToken).is_some(), "{token}");
        assert_eq!(answer["human"], human.as_str());
        assert_eq!(answer["ttl_seconds"].as_f64(), Some(DAY), "{answer}");
        assert_expires_in(&answer["expires_at"], DAY);
        assert_limits(
            &answer["limits"],
            &[("conversational_seconds", 60.0), ("token_cnt", 1000.0)],
        );

        let db = server.db();
        let row = db.row(
            "SELECT t.expires_at - t.created_at, t.revoked_at FROM usage_tokens t
             JOIN humans h ON h.id = t.human_id WHERE h.external_id = ?1",
            &[&human],
        );
        let (lifetime, revoked): (i64, Option<i64>) = (row.get(0), row.get(1));
        assert_eq!(lifetime, 86_400_000);
        assert_eq!(revoked, None);
    }
}

#[tokio::test]
async fn a_token_minted_by_human_id_with_a_ttl_lasts_that_long() {
    let server = TestServer::start().await;
    for prefix in PREFIXES {
        let human = format!("grace{prefix}");
        let body = json!({ "human_id": human, "ttl_seconds": 90.5 });
        let answer = mint_answer(&server, prefix, body).await;
        assert_eq!(answer["human"], human.as_str());
        assert_eq!(answer["ttl_seconds"].as_f64(), Some(90.5), "{answer}");
        assert_expires_in(&answer["expires_at"], 90.5);
        assert_limits(&answer["limits"], &[]);
        let token = answer["token"].as_str().unwrap();
        let (status, limits) = limits_by_token(&server, prefix, token).await;
        assert_eq!(status, StatusCode::OK, "{limits}");
        assert_limits(&limits, &[]);

        // Lifetimes are kept to the millisecond, like seconds limits.
        let body = json!({ "human": human, "ttl_seconds": 1.2345 });
        let answer = mint_answer(&server, prefix, body).await;
        assert_eq!(answer["ttl_seconds"].as_f64(), Some(1.235), "{answer}");
        let path = format!("{prefix}/usage/token/update_ttl");
        let body = json!({ "human": human, "ttl_seconds": 2.0004 });
        let (status, answer) = server.post(&path, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["ttl_seconds"].as_f64(), Some(2.0), "{answer}");
    }
}

#[tokio::test]
async fn a_ttl_defaults_to_and_is_capped_by_the_servers_maximum() {
    let server =
        TestServer::start_with(|settings| settings.max_token_ttl = Duration::from_secs(3600)).await;
    let answer = mint_answer(&server, "/v1", json!({ "human": "ada" })).await;
    assert_eq!(answer["ttl_seconds"].as_f64(), Some(3600.0), "{answer}");
    assert_expires_in(&answer["expires_at"], 3600.0);
    let answer = mint_answer(&server, "/v1", json!({ "human": "ada", "ttl_seconds": 3600 })).await;
    assert_eq!(answer["ttl_seconds"].as_f64(), Some(3600.0), "{answer}");

    let (status, body) =
        server.post("/v1/usage/token", json!({ "human": "ada", "ttl_seconds": 3601 })).await;
    assert_error(status, &body, 400, "invalid_input");
    let body = json!({ "human": "ada", "ttl_seconds": 3601 });
    let (status, body) = server.post("/v1/usage/token/update_ttl", body).await;
    assert_error(status, &body, 400, "invalid_input");
    assert_eq!(count(&server.db(), "SELECT COUNT(*) FROM usage_tokens", &[]), 2);
}

#[tokio::test]
async fn limits_are_read_with_the_token_or_with_the_key_and_the_human_id() {
    let server = TestServer::start().await;
    for prefix in PREFIXES {
        let human = format!("ada{prefix}");
        let limits = json!([
            { "type": "voice_synthesis_seconds", "value": 12.5 },
            { "type": "token_cnt", "value": 7 },
        ]);
        let token = server.mint(&human, limits).await;
        let expected = [("voice_synthesis_seconds", 12.5), ("token_cnt", 7.0)];

        let (status, body) = limits_by_token(&server, prefix, &token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_limits(&body, &expected);

        let (status, body) = limits_by_key(&server, prefix, &server.key, &human).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_limits(&body, &expected);

        let (status, body) = limits_by_key(&server, prefix, &server.key, "nobody").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, json!([]));

        let unlimited = server.mint(&format!("free{prefix}"), json!([])).await;
        let (status, body) = limits_by_token(&server, prefix, &unlimited).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, json!([]));
    }
    // Reading a human by key does not create it.
    let db = server.db();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM humans WHERE external_id = 'nobody'", &[]), 0);
}

#[tokio::test]
async fn seconds_are_kept_to_the_millisecond_and_token_counts_are_whole() {
    let server = TestServer::start().await;
    let limits = json!([
        { "type": "conversational_seconds", "value": 1.2345 },
        { "type": "voice_synthesis_seconds", "value": 0.0004 },
        { "type": "token_cnt", "value": 42.0 },
    ]);
    let answer = mint_answer(&server, "/v1", json!({ "human": "ada", "limits": limits })).await;
    let expected =
        [("conversational_seconds", 1.235), ("voice_synthesis_seconds", 0.0), ("token_cnt", 42.0)];
    assert_limits(&answer["limits"], &expected);
    assert_limits(&server.limits_of("ada").await, &expected);

    let db = server.db();
    let balances: Vec<(String, i64)> = db
        .rows("SELECT limit_type, balance FROM limits ORDER BY limit_type", &[])
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let balances: Vec<(&str, i64)> = balances.iter().map(|(t, b)| (t.as_str(), *b)).collect();
    assert_eq!(
        balances,
        [("conversational_seconds", 1235), ("token_cnt", 42), ("voice_synthesis_seconds", 0)]
    );
    assert_ledger_identity(&db);
}

#[tokio::test]
async fn a_limit_may_be_1e12_and_no_more() {
    let server = TestServer::start().await;
    let body = json!({
        "human": "ada",
        "limits": [
            { "type": "token_cnt", "value": 1e12 },
            { "type": "conversational_seconds", "value": 1e12 },
        ],
    });
    let (status, answer) = server.put("/v1/usage/token", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let expected = [("conversational_seconds", 1e12), ("token_cnt", 1e12)];
    assert_limits(&answer["limits"], &expected);

    for limit_type in ["token_cnt", "conversational_seconds"] {
        let body = json!({
            "human": "ada",
            "mode": "add",
            "limits": [{ "type": limit_type, "value": 1 }],
        });
        let (status, answer) = server.put("/v1/usage/token", body).await;
        assert_error(status, &answer, 400, "invalid_input");
    }
    assert_limits(&server.limits_of("ada").await, &expected);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn a_human_id_may_be_256_bytes_long() {
    let server = TestServer::start().await;
    for human in ["h".repeat(256), "é".repeat(128)] {
        let limits = json!([{ "type": "token_cnt", "value": 3 }]);
        let answer = mint_answer(&server, "/v1", json!({ "human": human, "limits": limits })).await;
        assert_eq!(answer["human"], human.as_str());
        let (status, body) = limits_by_key(&server, "/api/v1", &server.key, &human).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_limits(&body, &[("token_cnt", 3.0)]);
    }
}

#[tokio::test]
async fn the_limits_list_only_the_types_the_human_is_limited_on() {
    let server = TestServer::start().await;
    let token = server.mint("ada", json!([{ "type": "token_cnt", "value": 5 }])).await;
    // An unlimited session meters conversational time in a pool that is
    // not a limit.
    let client = server.connect(&token).await;
    client.close().await;
    let db = server.db();
    let pools = count(&db, "SELECT COUNT(*) FROM limits WHERE NOT limited", &[]);
    assert_eq!(pools, 1, "the session made no unlimited pool");

    let (status, body) = limits_by_token(&server, "/v1", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_limits(&body, &[("token_cnt", 5.0)]);
    let answer = mint_answer(&server, "/v1", json!({ "human": "ada" })).await;
    assert_limits(&answer["limits"], &[("token_cnt", 5.0)]);
}

#[tokio::test]
async fn put_sets_the_named_limits_by_default_and_leaves_the_others() {
    let server = TestServer::start().await;
    for prefix in PREFIXES {
        let human = format!("ada{prefix}");
        let path = format!("{prefix}/usage/token");
        let limits = json!([
            { "type": "conversational_seconds", "value": 60 },
            { "type": "token_cnt", "value": 100 },
        ]);
        server.mint(&human, limits).await;

        let body = json!({ "human": human, "limits": [{ "type": "token_cnt", "value": 5 }] });
        let (status, answer) = server.put(&path, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(fields(&answer), ["human", "limits"], "{answer}");
        assert_eq!(answer["human"], human.as_str());
        assert_limits(&answer["limits"], &[("conversational_seconds", 60.0), ("token_cnt", 5.0)]);

        let body = json!({
            "human": human,
            "mode": "set",
            "limits": [
                { "type": "voice_synthesis_seconds", "value": 10 },
                { "type": "conversational_seconds", "value": 0 },
            ],
        });
        let (status, answer) = server.put(&path, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let expected = [
            ("conversational_seconds", 0.0),
            ("token_cnt", 5.0),
            ("voice_synthesis_seconds", 10.0),
        ];
        assert_limits(&answer["limits"], &expected);
        assert_limits(&server.limits_of(&human).await, &expected);
    }
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn put_add_tops_up_a_limit_and_starts_one_the_human_lacks() {
    let server = TestServer::start().await;
    for prefix in PREFIXES {
        let human = format!("ada{prefix}");
        let path = format!("{prefix}/usage/token");
        server.mint_seconds(&human, 60.0).await;

        let body = json!({
            "human": human,
            "mode": "add",
            "limits": [
                { "type": "conversational_seconds", "value": 30.5 },
                { "type": "token_cnt", "value": 7 },
            ],
        });
        let (status, answer) = server.put(&path, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["human"], human.as_str());
        let expected = [("conversational_seconds", 90.5), ("token_cnt", 7.0)];
        assert_limits(&answer["limits"], &expected);
        assert_limits(&server.limits_of(&human).await, &expected);

        // A human the server has never seen is created with the limit.
        let newcomer = format!("newcomer{prefix}");
        let body = json!({
            "human_id": newcomer,
            "mode": "add",
            "limits": [{ "type": "voice_synthesis_seconds", "value": 10 }],
        });
        let (status, answer) = server.put(&path, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["human"], newcomer.as_str());
        assert_limits(&answer["limits"], &[("voice_synthesis_seconds", 10.0)]);
        assert_limits(&server.limits_of(&newcomer).await, &[("voice_synthesis_seconds", 10.0)]);
    }
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn revoking_revokes_every_live_token_of_the_human() {
    let server = TestServer::start().await;
    for prefix in PREFIXES {
        let human = format!("ada{prefix}");
        let path = format!("{prefix}/usage/token/revoke");
        let first = server.mint_seconds(&human, 60.0).await;
        let second = server.mint(&human, json!([])).await;

        let (status, answer) = server.post(&path, json!({ "human": human })).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer, json!({ "human": human, "revoked_tokens": 2 }));
        for token in [&first, &second] {
            let (status, body) = limits_by_token(&server, prefix, token).await;
            assert_error(status, &body, 401, "token_revoked");
        }

        // Nothing is left to revoke, but the human is known.
        let (status, answer) = server.post(&path, json!({ "human_id": human })).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer, json!({ "human": human, "revoked_tokens": 0 }));

        // A token minted afterwards works, and the limits were kept.
        let third = server.mint(&human, json!([])).await;
        let (status, body) = limits_by_token(&server, prefix, &third).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_limits(&body, &[("conversational_seconds", 60.0)]);
    }
}

#[tokio::test]
async fn check_answers_the_expiry_of_the_newest_live_token() {
    let server = TestServer::start().await;
    for prefix in PREFIXES {
        let human = format!("ada{prefix}");
        mint_answer(&server, prefix, json!({ "human": human, "ttl_seconds": 200 })).await;
        let newest =
            mint_answer(&server, prefix, json!({ "human": human, "ttl_seconds": 100 })).await;

        let path = format!("{prefix}/usage/token/check");
        let (status, answer) = server.post(&path, json!({ "human": human })).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(fields(&answer), ["expires_at", "human", "ttl_seconds"], "{answer}");
        assert_eq!(answer["human"], human.as_str());
        assert_eq!(answer["expires_at"], newest["expires_at"], "not the newest token");
        let ttl = answer["ttl_seconds"].as_f64().unwrap();
        assert!(ttl > 95.0 && ttl <= 100.0, "{answer}");
        assert_expires_in(&answer["expires_at"], 100.0);
    }
}

#[tokio::test]
async fn update_ttl_moves_the_expiry_of_every_live_token() {
    let server = TestServer::start().await;
    for prefix in PREFIXES {
        let human = format!("ada{prefix}");
        let revoked = server.mint(&human, json!([])).await;
        let (status, answer) =
            server.post("/v1/usage/token/revoke", json!({ "human": human })).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        let first = server.mint(&human, json!([])).await;
        let second = server.mint(&human, json!([])).await;

        let path = format!("{prefix}/usage/token/update_ttl");
        let body = json!({ "human": human, "ttl_seconds": 300 });
        let (status, answer) = server.post(&path, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(
            fields(&answer),
            ["expires_at", "human", "ttl_seconds", "updated_tokens"],
            "{answer}"
        );
        assert_eq!(answer["human"], human.as_str());
        assert_eq!(answer["ttl_seconds"].as_f64(), Some(300.0), "{answer}");
        assert_eq!(answer["updated_tokens"], 2, "the revoked token is not live: {answer}");
        let moved_to = assert_expires_in(&answer["expires_at"], 300.0);

        let db = server.db();
        let expiries: Vec<(i64, bool)> = db
            .rows(
                "SELECT t.expires_at, t.revoked_at IS NOT NULL FROM usage_tokens t
                 JOIN humans h ON h.id = t.human_id WHERE h.external_id = ?1 ORDER BY t.id",
                &[&human],
            )
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        let millis = moved_to.timestamp_millis();
        assert_eq!(expiries.len(), 3);
        assert!(expiries[0].1 && expiries[0].0 != millis, "the revoked token moved");
        assert_eq!(&expiries[1..], [(millis, false), (millis, false)]);

        let check = format!("{prefix}/usage/token/check");
        let (status, checked) = server.post(&check, json!({ "human": human })).await;
        assert_eq!(status, StatusCode::OK, "{checked}");
        assert_eq!(checked["expires_at"], answer["expires_at"]);

        for token in [&first, &second] {
            let (status, body) = limits_by_token(&server, prefix, token).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        let (status, body) = limits_by_token(&server, prefix, &revoked).await;
        assert_error(status, &body, 401, "token_revoked");
    }
}

#[tokio::test]
async fn check_revoke_and_update_ttl_find_no_unknown_or_tokenless_human() {
    let server = TestServer::start().await;
    // A human with limits but no token.
    let body = json!({ "human": "tokenless", "limits": [{ "type": "token_cnt", "value": 1 }] });
    let (status, answer) = server.put("/v1/usage/token", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    for prefix in PREFIXES {
        for human in ["nobody", "tokenless"] {
            let path = format!("{prefix}/usage/token/check");
            let (status, body) = server.post(&path, json!({ "human": human })).await;
            assert_error(status, &body, 404, "not_found");
            let path = format!("{prefix}/usage/token/update_ttl");
            let (status, body) =
                server.post(&path, json!({ "human": human, "ttl_seconds": 60 })).await;
            assert_error(status, &body, 404, "not_found");
        }
        let path = format!("{prefix}/usage/token/revoke");
        let (status, body) = server.post(&path, json!({ "human": "nobody" })).await;
        assert_error(status, &body, 404, "not_found");
    }
    let db = server.db();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM humans", &[]), 1);
}

#[tokio::test]
async fn an_unknown_path_is_not_found_and_a_wrong_method_is_not_allowed() {
    let server = TestServer::start().await;
    let headers = key_header(&server.key);
    let not_found = [
        (Method::GET, "/"),
        (Method::GET, "/nope"),
        (Method::POST, "/v1/usage/tokens"),
        (Method::POST, "/api/v1/usage/token/nope"),
        (Method::POST, "/v2/usage/token"),
        (Method::GET, "/v1/healthz"),
    ];
    for (method, path) in not_found {
        let (status, body) = request(&server, method.clone(), path, &headers, Vec::new()).await;
        assert_eq!(status.as_u16(), 404, "{method} {path}: {body}");
        assert_error(status, &body, 404, "not_found");
    }
    let not_allowed = [
        (Method::GET, "/v1/usage/token"),
        (Method::DELETE, "/api/v1/usage/token"),
        (Method::PATCH, "/v1/usage/token"),
        (Method::GET, "/v1/usage/token/revoke"),
        (Method::PUT, "/api/v1/usage/token/check"),
        (Method::GET, "/v1/usage/token/update_ttl"),
        (Method::POST, "/api/v1/usage/limits"),
        (Method::POST, "/v1/realtime/session"),
        (Method::POST, "/healthz"),
    ];
    for (method, path) in not_allowed {
        let (status, body) = request(&server, method.clone(), path, &headers, Vec::new()).await;
        assert_eq!(status.as_u16(), 405, "{method} {path}: {body}");
        assert_error(status, &body, 405, "method_not_allowed");
    }
}

// ---------------------------------------------------------------------------
// Hostile input
// ---------------------------------------------------------------------------

fn hostile_cases(key: &str, token: &str) -> Vec<Case> {
    use Method as M;
    const INVALID: &str = "invalid_input";
    const CONV5: &str = r#"{"type": "conversational_seconds", "value": 5}"#;
    const TOKEN1: &str = r#"{"type": "token_cnt", "value": 1}"#;
    const TOKEN_1E12: &str = r#"{"type": "token_cnt", "value": 1e12}"#;
    let k = || key_header(key);
    let no_headers = Vec::new;
    let unknown_key = never_issued(SecretKind::ApiKey);
    let unknown_token = never_issued(SecretKind::UsageToken);
    let mut bad_checksum = key.to_owned();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'A' { 'B' } else { 'A' });
    let long_human = "h".repeat(257);
    let padding = " ".repeat(70 * 1024);
    let oversized = format!(
        r#"{{"human": "newbie",{padding}"limits": [{{"type": "token_cnt", "value": 5}}]}}"#
    );
    let limit = |limit: &str| format!(r#"{{"human": "ada", "limits": [{limit}]}}"#);
    let ada_ttl = |ttl: &str| format!(r#"{{"human": "ada", "ttl_seconds": {ttl}}}"#);
    let new_ttl = |ttl: &str| format!(r#"{{"human": "newbie", "ttl_seconds": {ttl}}}"#);
    // Requests with the default key refused as invalid input.
    let bad_create = |what: &str, body: &str, mentions: &'static str| {
        case(what, M::POST, "/usage/token", k(), body, 400, INVALID, mentions)
    };
    let bad_put = |what: &str, body: &str, mentions: &'static str| {
        case(what, M::PUT, "/usage/token", k(), body, 400, INVALID, mentions)
    };

    let mut cases = vec![
        // Bodies of POST /usage/token that are not a valid request.
        bad_create("bad JSON", "not json at all", ""),
        bad_create("JSON with a bare word", r#"{"human": ada}"#, ""),
        bad_create(
            "truncated JSON",
            r#"{"human": "newbie", "limits": [{"type": "token_cnt", "value": 5}"#,
            "",
        ),
        bad_create("an empty body", "", ""),
        bad_create("bytes after the JSON", r#"{"human": "newbie"} {}"#, ""),
        bad_create("a JSON array", r#"["newbie"]"#, ""),
        bad_create("no human", r#"{"ttl_seconds": 60}"#, "human"),
        bad_create("a number as human", r#"{"human": 7}"#, "human"),
        bad_create("a null human", r#"{"human": null}"#, "human"),
        bad_create("ttl_seconds as a string", &new_ttl(r#""60""#), "ttl_seconds"),
        bad_create(
            "limits as an object",
            r#"{"human": "newbie", "limits": {"type": "token_cnt", "value": 5}}"#,
            "limits",
        ),
        bad_create(
            "a limit value as a string",
            &limit(r#"{"type": "token_cnt", "value": "5"}"#),
            "limits[0].value",
        ),
        bad_create("a limit without a value", &limit(r#"{"type": "token_cnt"}"#), "limits[0]"),
        bad_create(
            "a limit type as a number",
            &limit(r#"{"type": 3, "value": 5}"#),
            "limits[0].type",
        ),
        bad_create("an unknown field", r#"{"human": "newbie", "colour": "red"}"#, "colour"),
        bad_create(
            "human under both its names",
            r#"{"human": "newbie", "human_id": "newbie"}"#,
            "human: given more than once",
        ),
        bad_create(
            "an unknown field in a limit",
            &limit(r#"{"type": "token_cnt", "value": 5, "unit": "k"}"#),
            "unit",
        ),
        bad_create(
            "an array of the fields in order",
            r#"["newbie", 60, [{"type": "token_cnt", "value": 5}]]"#,
            "request body",
        ),
        bad_create(
            "a limit as an array",
            r#"{"human": "newbie", "limits": [["token_cnt", 5]]}"#,
            "limits[0]",
        ),
        bad_create(
            "a limit naming its type twice",
            &limit(r#"{"type": "token_cnt", "type": "token_cnt", "value": 5}"#),
            "limits[0]",
        ),
        bad_create(
            "a human with a newline",
            r#"{"human": "evil\n2026-01-01 INFO forged line"}"#,
            "human",
        ),
        bad_create("a human with an escape character", r#"{"human": "\u001b[31mred"}"#, "human"),
        bad_create("a human with white space at its end", r#"{"human": "spacey "}"#, "human"),
        bad_create(
            "both human and human_id",
            r#"{"human": "newbie", "human_id": "newbie"}"#,
            "human",
        ),
        bad_create(
            "an unknown limit type",
            &limit(r#"{"type": "video_seconds", "value": 5}"#),
            "limits[0].type",
        ),
        bad_create(
            "a negative limit",
            &limit(r#"{"type": "conversational_seconds", "value": -1}"#),
            "limits[0].value",
        ),
        bad_create(
            "a limit of 1e13",
            &limit(r#"{"type": "conversational_seconds", "value": 1e13}"#),
            "limits[0].value",
        ),
        bad_create(
            "a limit of 1e400",
            &limit(r#"{"type": "token_cnt", "value": 1e400}"#),
            "limits[0].value",
        ),
        bad_create(
            "1.5 tokens",
            &limit(r#"{"type": "token_cnt", "value": 1.5}"#),
            "limits[0].value",
        ),
        bad_create(
            "a limit type named twice",
            &limit(r#"{"type": "token_cnt", "value": 1}, {"type": "token_cnt", "value": 2}"#),
            "limits[1].type",
        ),
        bad_create(
            "a bad limit after a good one",
            &limit(&format!(r#"{CONV5}, {{"type": "token_cnt", "value": -3}}"#)),
            "limits[1].value",
        ),
        bad_create("a 70 KB body", &oversized, "request body"),
        bad_create("a 257-byte human", &format!(r#"{{"human": "{long_human}"}}"#), "human"),
        bad_create("a 257-byte human_id", &format!(r#"{{"human_id": "{long_human}"}}"#), "human"),
        bad_create("an empty human", r#"{"human": ""}"#, "human"),
        bad_create(
            "a human of 129 two-byte characters",
            &format!(r#"{{"human": "{}"}}"#, "é".repeat(129)),
            "human",
        ),
        case(
            "an x-human-id of 129 two-byte characters",
            M::GET,
            "/usage/limits",
            vec![
                ("x-api-key", hv(key)),
                ("x-human-id", HeaderValue::from_bytes("é".repeat(129).as_bytes()).unwrap()),
            ],
            "",
            400,
            INVALID,
            "x-human-id",
        ),
        bad_create("ttl_seconds 0", &new_ttl("0"), "ttl_seconds"),
        bad_create("ttl_seconds under a millisecond", &new_ttl("0.0004"), "ttl_seconds"),
        bad_create("ttl_seconds -1", &new_ttl("-1"), "ttl_seconds"),
        bad_create("ttl_seconds above the maximum", &new_ttl("86401"), "ttl_seconds"),
        bad_create("ttl_seconds 1e400", &new_ttl("1e400"), "ttl_seconds"),
        // Credentials on POST /usage/token.
        case(
            "a usage token in x-api-key",
            M::POST,
            "/usage/token",
            key_header(token),
            r#"{"human": "newbie"}"#,
            403,
            "forbidden",
            "",
        ),
        case(
            "a usage token as Bearer",
            M::POST,
            "/usage/token",
            bearer_header(token),
            r#"{"human": "newbie"}"#,
            403,
            "forbidden",
            "",
        ),
        case(
            "a usage token as Bearer beside the API key",
            M::POST,
            "/usage/token",
            [k(), bearer_header(token)].concat(),
            r#"{"human": "newbie"}"#,
            403,
            "forbidden",
            "",
        ),
        case(
            "a never-issued API key",
            M::POST,
            "/usage/token",
            key_header(&unknown_key),
            r#"{"human": "newbie"}"#,
            401,
            "unauthorized",
            "",
        ),
        case(
            "a garbage API key",
            M::POST,
            "/usage/token",
            key_header("not-a-key"),
            r#"{"human": "newbie"}"#,
            401,
            "unauthorized",
            "",
        ),
        case(
            "an API key with a wrong checksum",
            M::POST,
            "/usage/token",
            key_header(&bad_checksum),
            r#"{"human": "newbie"}"#,
            401,
            "unauthorized",
            "",
        ),
        case(
            "the API key as Bearer",
            M::POST,
            "/usage/token",
            bearer_header(key),
            r#"{"human": "newbie"}"#,
            401,
            "unauthorized",
            "",
        ),
        case(
            "no credential",
            M::POST,
            "/usage/token",
            no_headers(),
            r#"{"human": "newbie"}"#,
            401,
            "unauthorized",
            "",
        ),
        case(
            "a non-UTF-8 x-api-key",
            M::POST,
            "/usage/token",
            vec![("x-api-key", HeaderValue::from_bytes(b"tgk_\xff\xfe").unwrap())],
            r#"{"human": "newbie"}"#,
            400,
            INVALID,
            "x-api-key",
        ),
        // GET /usage/limits.
        case("no credential", M::GET, "/usage/limits", no_headers(), "", 401, "unauthorized", ""),
        case(
            "x-api-key without x-human-id",
            M::GET,
            "/usage/limits",
            k(),
            "",
            400,
            INVALID,
            "x-human-id",
        ),
        case(
            "a non-UTF-8 x-human-id",
            M::GET,
            "/usage/limits",
            vec![
                ("x-api-key", hv(key)),
                ("x-human-id", HeaderValue::from_bytes(b"ada\xff").unwrap()),
            ],
            "",
            400,
            INVALID,
            "x-human-id",
        ),
        case(
            "x-human-id given twice",
            M::GET,
            "/usage/limits",
            vec![("x-api-key", hv(key)), ("x-human-id", hv("ada")), ("x-human-id", hv("bob"))],
            "",
            400,
            INVALID,
            "x-human-id",
        ),
        case(
            "x-api-key given twice",
            M::POST,
            "/usage/token",
            vec![("x-api-key", hv(key)), ("x-api-key", hv(key))],
            r#"{"human": "newbie"}"#,
            400,
            INVALID,
            "x-api-key",
        ),
        case(
            "a 300-byte x-human-id",
            M::GET,
            "/usage/limits",
            key_and_human(key, &"h".repeat(300)),
            "",
            400,
            INVALID,
            "x-human-id",
        ),
        case(
            "an empty x-human-id",
            M::GET,
            "/usage/limits",
            key_and_human(key, ""),
            "",
            400,
            INVALID,
            "x-human-id",
        ),
        case(
            "a never-issued API key with x-human-id",
            M::GET,
            "/usage/limits",
            key_and_human(&unknown_key, "ada"),
            "",
            401,
            "unauthorized",
            "",
        ),
        case(
            "a never-issued usage token",
            M::GET,
            "/usage/limits",
            bearer_header(&unknown_token),
            "",
            401,
            "unauthorized",
            "",
        ),
        case(
            "a garbage Bearer token",
            M::GET,
            "/usage/limits",
            bearer_header("tgu_garbage"),
            "",
            401,
            "unauthorized",
            "",
        ),
        case(
            "a Basic Authorization",
            M::GET,
            "/usage/limits",
            vec![("authorization", hv("Basic YWRhOnNlY3JldA=="))],
            "",
            401,
            "unauthorized",
            "",
        ),
        // PUT /usage/token.
        bad_put("PUT with an empty limits list", r#"{"human": "ada", "limits": []}"#, "limits"),
        bad_put("PUT without limits", r#"{"human": "ada"}"#, "limits"),
        bad_put(
            "PUT with an unknown mode",
            &format!(r#"{{"human": "ada", "mode": "multiply", "limits": [{TOKEN1}]}}"#),
            "mode",
        ),
        bad_put(
            "PUT add past 1e12 after a good change",
            &format!(r#"{{"human": "ada", "mode": "add", "limits": [{CONV5}, {TOKEN_1E12}]}}"#),
            "limits",
        ),
        bad_put(
            "PUT of 1e13",
            r#"{"human": "ada", "limits": [{"type": "token_cnt", "value": 1e13}]}"#,
            "limits[0].value",
        ),
        bad_put(
            "PUT of half a token",
            r#"{"human": "ada", "limits": [{"type": "token_cnt", "value": 0.5}]}"#,
            "limits[0].value",
        ),
        bad_put(
            "PUT with a 257-byte human",
            &format!(
                r#"{{"human": "{long_human}", "limits": [{{"type": "token_cnt", "value": 1}}]}}"#
            ),
            "human",
        ),
        bad_put(
            "PUT with an unknown field",
            r#"{"human": "newbie", "limits": [{"type": "token_cnt", "value": 1}], "x": 1}"#,
            "x",
        ),
        case(
            "PUT with a usage token",
            M::PUT,
            "/usage/token",
            bearer_header(token),
            r#"{"human": "ada", "limits": [{"type": "token_cnt", "value": 1}]}"#,
            403,
            "forbidden",
            "",
        ),
        case(
            "PUT with a never-issued API key",
            M::PUT,
            "/usage/token",
            key_header(&unknown_key),
            r#"{"human": "ada", "limits": [{"type": "token_cnt", "value": 1}]}"#,
            401,
            "unauthorized",
            "",
        ),
        // POST /usage/token/revoke.
        case(
            "revoke of an unknown human",
            M::POST,
            "/usage/token/revoke",
            k(),
            r#"{"human": "nobody"}"#,
            404,
            "not_found",
            "",
        ),
        case(
            "revoke without a human",
            M::POST,
            "/usage/token/revoke",
            k(),
            "{}",
            400,
            INVALID,
            "human",
        ),
        case(
            "revoke of an empty human",
            M::POST,
            "/usage/token/revoke",
            k(),
            r#"{"human": ""}"#,
            400,
            INVALID,
            "human",
        ),
        case(
            "revoke with an unknown field",
            M::POST,
            "/usage/token/revoke",
            k(),
            r#"{"human": "ada", "all": true}"#,
            400,
            INVALID,
            "all",
        ),
        case(
            "revoke with a usage token in x-api-key",
            M::POST,
            "/usage/token/revoke",
            key_header(token),
            r#"{"human": "ada"}"#,
            403,
            "forbidden",
            "",
        ),
        case(
            "revoke with a usage token as Bearer",
            M::POST,
            "/usage/token/revoke",
            bearer_header(token),
            r#"{"human": "ada"}"#,
            403,
            "forbidden",
            "",
        ),
        case(
            "revoke with no credential",
            M::POST,
            "/usage/token/revoke",
            no_headers(),
            r#"{"human": "ada"}"#,
            401,
            "unauthorized",
            "",
        ),
        // POST /usage/token/check.
        case(
            "check of an unknown human",
            M::POST,
            "/usage/token/check",
            k(),
            r#"{"human": "nobody"}"#,
            404,
            "not_found",
            "",
        ),
        case(
            "check of a human without a token",
            M::POST,
            "/usage/token/check",
            k(),
            r#"{"human": "tokenless"}"#,
            404,
            "not_found",
            "",
        ),
        case(
            "check of a 257-byte human",
            M::POST,
            "/usage/token/check",
            k(),
            format!(r#"{{"human": "{long_human}"}}"#),
            400,
            INVALID,
            "human",
        ),
        case(
            "check with truncated JSON",
            M::POST,
            "/usage/token/check",
            k(),
            r#"{"human": "ad"#,
            400,
            INVALID,
            "",
        ),
        case(
            "check with a usage token",
            M::POST,
            "/usage/token/check",
            bearer_header(token),
            r#"{"human": "ada"}"#,
            403,
            "forbidden",
            "",
        ),
        case(
            "check with a never-issued API key",
            M::POST,
            "/usage/token/check",
            key_header(&unknown_key),
            r#"{"human": "ada"}"#,
            401,
            "unauthorized",
            "",
        ),
        // POST /usage/token/update_ttl.
        case(
            "update_ttl of an unknown human",
            M::POST,
            "/usage/token/update_ttl",
            k(),
            r#"{"human": "nobody", "ttl_seconds": 60}"#,
            404,
            "not_found",
            "",
        ),
        case(
            "update_ttl of a human without a token",
            M::POST,
            "/usage/token/update_ttl",
            k(),
            r#"{"human": "tokenless", "ttl_seconds": 60}"#,
            404,
            "not_found",
            "",
        ),
        case(
            "update_ttl to 0",
            M::POST,
            "/usage/token/update_ttl",
            k(),
            ada_ttl("0"),
            400,
            INVALID,
            "ttl_seconds",
        ),
        case(
            "update_ttl to -1",
            M::POST,
            "/usage/token/update_ttl",
            k(),
            ada_ttl("-1"),
            400,
            INVALID,
            "ttl_seconds",
        ),
        case(
            "update_ttl above the maximum",
            M::POST,
            "/usage/token/update_ttl",
            k(),
            ada_ttl("86401"),
            400,
            INVALID,
            "ttl_seconds",
        ),
        case(
            "update_ttl to 1e400",
            M::POST,
            "/usage/token/update_ttl",
            k(),
            ada_ttl("1e400"),
            400,
            INVALID,
            "ttl_seconds",
        ),
        case(
            "update_ttl with a string ttl",
            M::POST,
            "/usage/token/update_ttl",
            k(),
            ada_ttl(r#""60""#),
            400,
            INVALID,
            "ttl_seconds",
        ),
        case(
            "update_ttl without a ttl",
            M::POST,
            "/usage/token/update_ttl",
            k(),
            r#"{"human": "ada"}"#,
            400,
            INVALID,
            "ttl_seconds",
        ),
        case(
            "update_ttl with a usage token",
            M::POST,
            "/usage/token/update_ttl",
            key_header(token),
            ada_ttl("60"),
            403,
            "forbidden",
            "",
        ),
        case(
            "update_ttl with no credential",
            M::POST,
            "/usage/token/update_ttl",
            no_headers(),
            ada_ttl("60"),
            401,
            "unauthorized",
            "",
        ),
        // The realtime endpoint refuses before the upgrade.
        case(
            "a session without a kind",
            M::GET,
            &format!("/realtime/session?token={token}"),
            no_headers(),
            "",
            400,
            INVALID,
            "kind",
        ),
        case(
            "a session of an unknown kind",
            M::GET,
            &format!("/realtime/session?kind=video&token={token}"),
            no_headers(),
            "",
            400,
            INVALID,
            "kind",
        ),
        case(
            "a session without the upgrade",
            M::GET,
            &format!("/realtime/session?kind=conversational&token={token}"),
            no_headers(),
            "",
            400,
            INVALID,
            "",
        ),
        // Paths and methods.
        case(
            "an unknown path",
            M::POST,
            "/usage/tokens",
            k(),
            r#"{"human": "newbie"}"#,
            404,
            "not_found",
            "",
        ),
        case(
            "GET of the token endpoint",
            M::GET,
            "/usage/token",
            k(),
            "",
            405,
            "method_not_allowed",
            "",
        ),
        case(
            "DELETE of the token endpoint",
            M::DELETE,
            "/usage/token",
            k(),
            r#"{"human": "ada"}"#,
            405,
            "method_not_allowed",
            "",
        ),
        case(
            "POST of the limits endpoint",
            M::POST,
            "/usage/limits",
            k(),
            r#"{"human": "ada"}"#,
            405,
            "method_not_allowed",
            "",
        ),
    ];
    // Credentials are checked before the body is read: bad JSON sent with a
    // usage token is forbidden, not invalid.
    cases.push(case(
        "bad JSON with a usage token",
        M::POST,
        "/usage/token",
        key_header(token),
        "{",
        403,
        "forbidden",
        "",
    ));
    cases
}

#[tokio::test]
async fn hostile_requests_are_refused_with_their_error_and_change_nothing() {
    let server = TestServer::start_with(hostile::for_tables).await;
    let limits = json!([
        { "type": "conversational_seconds", "value": 60 },
        { "type": "token_cnt", "value": 100 },
    ]);
    let token = server.mint("ada", limits).await;
    let body = json!({ "human": "tokenless", "limits": [{ "type": "token_cnt", "value": 5 }] });
    let (status, answer) = server.put("/v1/usage/token", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    let db = server.db();
    let before = snapshot(&db);
    assert!(before.contains("\"ada\"") && before.contains("\"tokenless\""), "{before}");
    let cases = hostile_cases(&server.key, &token);
    let failures = refusals_gone_wrong(&server, &cases).await;
    assert_none_went_wrong(&failures, &cases);
    // The token still works and the limits are what they were.
    let (status, body) = limits_by_token(&server, "/v1", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_limits(&body, &[("conversational_seconds", 60.0), ("token_cnt", 100.0)]);
    assert_ledger_identity(&db);
}

// ---------------------------------------------------------------------------
// Projects
// ---------------------------------------------------------------------------

#[tokio::test]
async fn another_project_can_neither_read_nor_revoke_check_or_extend_a_human() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 60.0).await;
    let other = tollgate::create_api_key(&server.db_setting, "other").await.unwrap();
    let other = other.expose();

    for prefix in PREFIXES {
        let (status, body) = limits_by_key(&server, prefix, other, "ada").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, json!([]), "another project sees the human's limits");

        let revoke = format!("{prefix}/usage/token/revoke");
        let (status, body) =
            with_key(&server, other, Method::POST, &revoke, json!({ "human": "ada" })).await;
        assert_error(status, &body, 404, "not_found");

        let check = format!("{prefix}/usage/token/check");
        let (status, body) =
            with_key(&server, other, Method::POST, &check, json!({ "human": "ada" })).await;
        assert_error(status, &body, 404, "not_found");

        let update = format!("{prefix}/usage/token/update_ttl");
        let body = json!({ "human": "ada", "ttl_seconds": 60 });
        let (status, body) = with_key(&server, other, Method::POST, &update, body).await;
        assert_error(status, &body, 404, "not_found");
    }

    // The default project's human and token are as they were.
    let (status, body) = limits_by_token(&server, "/v1", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_limits(&body, &[("conversational_seconds", 60.0)]);
    let (status, checked) = server.post("/v1/usage/token/check", json!({ "human": "ada" })).await;
    assert_eq!(status, StatusCode::OK, "{checked}");
    assert_expires_in(&checked["expires_at"], DAY);
    let db = server.db();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM humans", &[]), 1, "a human was created");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM usage_tokens WHERE revoked_at IS NULL", &[]), 1);
}

#[tokio::test]
async fn a_put_by_another_project_for_the_same_name_leaves_the_first_projects_human_alone() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 60.0).await;
    let other = tollgate::create_api_key(&server.db_setting, "other").await.unwrap();
    let other = other.expose();

    for (prefix, mode) in PREFIXES.into_iter().zip(["set", "add"]) {
        let path = format!("{prefix}/usage/token");
        let body = json!({
            "human": "ada",
            "mode": mode,
            "limits": [{ "type": "conversational_seconds", "value": 10 }],
        });
        let (status, answer) = with_key(&server, other, Method::PUT, &path, body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        // "add" tops up other's own ada (10 + 10), never the default's 60.
        let expected = if mode == "set" { 10.0 } else { 20.0 };
        assert_limits(&answer["limits"], &[("conversational_seconds", expected)]);
        assert_limits(&server.limits_of("ada").await, &[("conversational_seconds", 60.0)]);
    }

    // Other's own token for its ada reads its own limits only.
    let path = "/v1/usage/token";
    let body = json!({ "human": "ada" });
    let (status, minted) = with_key(&server, other, Method::POST, path, body).await;
    assert_eq!(status, StatusCode::OK, "{minted}");
    assert_limits(&minted["limits"], &[("conversational_seconds", 20.0)]);
    let other_token = minted["token"].as_str().unwrap();
    let (status, body) = limits_by_token(&server, "/v1", other_token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_limits(&body, &[("conversational_seconds", 20.0)]);

    // Revoking other's ada revokes other's token only.
    let revoke = "/api/v1/usage/token/revoke";
    let (status, body) =
        with_key(&server, other, Method::POST, revoke, json!({ "human": "ada" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revoked_tokens"], 1, "{body}");
    let (status, body) = limits_by_token(&server, "/v1", &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_limits(&body, &[("conversational_seconds", 60.0)]);

    let db = server.db();
    let projects =
        count(&db, "SELECT COUNT(DISTINCT project_id) FROM humans WHERE external_id = 'ada'", &[]);
    assert_eq!(projects, 2);
    assert_ledger_identity(&db);
}

// ---------------------------------------------------------------------------
// Limits across creates and changes
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_create_without_limits_leaves_the_humans_limits_as_they_are() {
    let server = TestServer::start().await;
    let limits = json!([
        { "type": "conversational_seconds", "value": 60 },
        { "type": "token_cnt", "value": 100 },
    ]);
    server.mint("ada", limits).await;
    let expected = [("conversational_seconds", 60.0), ("token_cnt", 100.0)];

    for prefix in PREFIXES {
        let answer = mint_answer(&server, prefix, json!({ "human": "ada" })).await;
        assert_limits(&answer["limits"], &expected);
        let token = answer["token"].as_str().unwrap();
        let (status, body) = limits_by_token(&server, prefix, token).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_limits(&body, &expected);
    }
    let db = server.db();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM ledger", &[]), 2, "a create without limits wrote");
    assert_ledger_identity(&db);
}

#[tokio::test]
async fn a_create_with_limits_sets_those_types_and_keeps_the_others() {
    let server = TestServer::start().await;
    let limits = json!([
        { "type": "conversational_seconds", "value": 60 },
        { "type": "token_cnt", "value": 100 },
    ]);
    server.mint("ada", limits).await;
    assert_ledger_identity(&server.db());

    let limits = json!([
        { "type": "token_cnt", "value": 10 },
        { "type": "voice_synthesis_seconds", "value": 30 },
    ]);
    let answer = mint_answer(&server, "/api/v1", json!({ "human": "ada", "limits": limits })).await;
    let expected =
        [("conversational_seconds", 60.0), ("token_cnt", 10.0), ("voice_synthesis_seconds", 30.0)];
    assert_limits(&answer["limits"], &expected);
    assert_limits(&server.limits_of("ada").await, &expected);
    assert_ledger_identity(&server.db());
}

#[tokio::test]
async fn put_add_on_a_limited_type_adds_and_the_ledger_adds_up() {
    let server = TestServer::start().await;
    let limits = json!([{ "type": "token_cnt", "value": 100 }]);
    server.mint("ada", limits).await;
    let limits = json!([{ "type": "token_cnt", "value": 10 }]);
    server.mint("ada", limits).await; // a set: 100 -> 10
    server.mint("ada", json!([])).await;

    let body = json!({
        "human": "ada",
        "mode": "add",
        "limits": [{ "type": "token_cnt", "value": 50 }],
    });
    let (status, answer) = server.put("/v1/usage/token", body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_limits(&answer["limits"], &[("token_cnt", 60.0)]);
    assert_limits(&server.limits_of("ada").await, &[("token_cnt", 60.0)]);

    let db = server.db();
    let grants: Vec<i64> = db
        .rows("SELECT amount FROM ledger WHERE entry = 'grant' ORDER BY id", &[])
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(grants, [100, -90, 50]);
    assert_ledger_identity(&db);
}

// ---------------------------------------------------------------------------
// Expiry and revocation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_expired_token_is_refused_as_expired() {
    let server = TestServer::start().await;
    let limits = json!([{ "type": "conversational_seconds", "value": 60 }]);
    let body = json!({ "human": "ada", "ttl_seconds": 0.2, "limits": limits });
    let answer = mint_answer(&server, "/v1", body).await;
    assert_eq!(answer["ttl_seconds"].as_f64(), Some(0.2), "{answer}");
    let token = answer["token"].as_str().unwrap().to_owned();

    tokio::time::sleep(Duration::from_millis(400)).await;
    for prefix in PREFIXES {
        let (status, body) = limits_by_token(&server, prefix, &token).await;
        assert_error(status, &body, 401, "token_expired");
    }
    let (status, body) = server.post("/v1/usage/token/check", json!({ "human": "ada" })).await;
    assert_error(status, &body, 404, "not_found");
    let body = json!({ "human": "ada", "ttl_seconds": 60 });
    let (status, body) = server.post("/v1/usage/token/update_ttl", body).await;
    assert_error(status, &body, 404, "not_found");
    let (status, body) = server.post("/v1/usage/token/revoke", json!({ "human": "ada" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["revoked_tokens"], 0, "an expired token was revoked: {body}");
    let session = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = server.refused(&session).await;
    assert_error(status, &body, 401, "token_expired");
}

#[tokio::test]
async fn a_revoked_token_is_refused_as_revoked_and_check_finds_nothing() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 60.0).await;
    let (status, body) = server.post("/v1/usage/token/revoke", json!({ "human": "ada" })).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({ "human": "ada", "revoked_tokens": 1 }));

    for prefix in PREFIXES {
        let (status, body) = limits_by_token(&server, prefix, &token).await;
        assert_error(status, &body, 401, "token_revoked");
        let path = format!("{prefix}/usage/token/check");
        let (status, body) = server.post(&path, json!({ "human": "ada" })).await;
        assert_error(status, &body, 404, "not_found");
        let path = format!("{prefix}/usage/token/update_ttl");
        let (status, body) = server.post(&path, json!({ "human": "ada", "ttl_seconds": 60 })).await;
        assert_error(status, &body, 404, "not_found");
    }
    let session = format!("/v1/realtime/session?kind=conversational&token={token}");
    let (status, body) = server.refused(&session).await;
    assert_error(status, &body, 401, "token_revoked");
    let db = server.db();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM usage_tokens WHERE revoked_at IS NULL", &[]), 0);
}

#[tokio::test]
async fn a_session_over_its_limit_is_refused_with_429() {
    let server = TestServer::start().await;
    let token = server.mint_seconds("ada", 0.0).await;
    for prefix in PREFIXES {
        let session = format!("{prefix}/realtime/session?kind=conversational&token={token}");
        let (status, body) = server.refused(&session).await;
        assert_error(status, &body, 429, "usage_limit_exceeded");
    }
    let db = server.db();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM sessions", &[]), 0);
}

// ---------------------------------------------------------------------------
// Failures of the store
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_store_failure_answers_500_with_no_internal_detail() {
    let server = TestServer::start().await;
    let token = server.mint("ada", json!([])).await;
    server.db().execute("ALTER TABLE usage_tokens RENAME TO usage_tokens_gone");
    let exactly = json!({ "type": "internal", "message": "internal error" });

    let key = key_header(&server.key);
    let bob = br#"{"human": "bob"}"#.to_vec();
    let ada = br#"{"human": "ada"}"#.to_vec();
    let requests = [
        (Method::POST, "/v1/usage/token", key.clone(), bob),
        (Method::POST, "/api/v1/usage/token/check", key, ada),
        (Method::GET, "/v1/usage/limits", bearer_header(&token), Vec::new()),
    ];
    for (method, path, headers, body) in requests {
        let mut builder = server.http.request(method.clone(), server.url(path));
        for (name, value) in headers {
            builder = builder.header(name, value);
        }
        let response = builder.body(body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR, "{method} {path}");
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert_eq!(content_type, "application/json", "{method} {path}");
        let text = response.text().await.unwrap();
        let answer: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(answer, exactly, "{method} {path}: {text}");
        for leak in ["usage_tokens", "table", "SQL", "sqlite", "relation", "postgres"] {
            assert!(!text.contains(leak), "{method} {path} leaked {leak}: {text}");
        }
    }
    // The failed create left no human behind.
    let db = server.db();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM humans WHERE external_id = 'bob'", &[]), 0);
}

// On more than one thread: taking the lock blocks the test's thread until
// it is held, and on PostgreSQL may wait for a transaction of the server's
// own, which must go on running meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_answers_503_and_keeps_nothing_of_the_request() {
    let server = TestServer::start().await;
    let lock = lock::WriteLock::take(&server.db());
    let (status, body) = server.post("/v1/usage/token", json!({ "human": "ada" })).await;
    lock.release();
    assert_error(status, &body, 503, "unavailable");
    let message = body["message"].as_str().unwrap();
    assert!(!message.contains("locked") && !message.contains("database"), "{body}");

    let db = server.db();
    assert_eq!(count(&db, "SELECT COUNT(*) FROM humans", &[]), 0);
    server.mint("ada", json!([])).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM humans", &[]), 1);
}

// ---------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------

#[tokio::test]
async fn secrets_are_stored_only_as_hashes() {
    let server = TestServer::start().await;
    let other = tollgate::create_api_key(&server.db_setting, "other").await.unwrap();
    let token = server.mint_seconds("ada", 60.0).await;
    let body = json!({ "human": "ada" });
    let (status, minted) =
        with_key(&server, other.expose(), Method::POST, "/v1/usage/token", body).await;
    assert_eq!(status, StatusCode::OK, "{minted}");
    let other_token = minted["token"].as_str().unwrap().to_owned();

    let bytes = stored_bytes(&server.db());
    let secrets = [
        (server.key.as_str(), SecretKind::ApiKey),
        (other.expose(), SecretKind::ApiKey),
        (token.as_str(), SecretKind::UsageToken),
        (other_token.as_str(), SecretKind::UsageToken),
    ];
    for (text, kind) in secrets {
        assert!(!contains(&bytes, text.as_bytes()), "{kind:?} stored in the clear");
        assert!(!contains(&bytes, &text.as_bytes()[4..]), "{kind:?} body stored in the clear");
        // What is stored is the hash, which shows the right bytes were read.
        let hash = secret::parse(text, kind).unwrap();
        assert!(contains(&bytes, &hash.0), "the hash of a {kind:?} is not in the database");
    }
}
