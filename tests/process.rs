//! The `tollgate` binary as an operator runs it: first start, `keys
//! create`, SIGTERM, `kill -9` and restart, and what ends up in the logs.

mod common;

use std::time::Duration;

use common::binary::{self, Process};
use common::upstream::TestUpstream;
use common::*;
use serde_json::json;
use tokio::time::sleep;
use tokio_tungstenite::tungstenite::Message;

const TICK_MS: u64 = 200;

fn api_of(process: &Process, key: &str) -> Api {
    Api::new(process.base.trim_start_matches("http://"), key.to_owned())
}

async fn wait_for_exit(process: Process) -> (std::process::ExitStatus, Vec<String>) {
    let limit = Duration::from_secs(20);
    tokio::task::spawn_blocking(move || process.wait(limit)).await.unwrap()
}

#[tokio::test]
async fn a_fresh_database_prints_its_api_key_once_and_only_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let first = binary::spawn(&db, &[], "info");
    let key = first.api_key();
    let api = api_of(&first, &key);
    assert_eq!(api.post("/v1/usage/token", json!({ "human": "ada" })).await.0, 200);
    first.signal("TERM");
    let (status, stderr) = wait_for_exit(first).await;
    assert!(status.success(), "{stderr:?}");
    assert!(stderr.iter().all(|line| !line.contains(&key)), "the key was logged");

    let second = binary::spawn(&db, &[], "info");
    assert_eq!(second.printed_key(), None);
    assert!(second.stdout().is_empty(), "{:?}", second.stdout());
}

#[tokio::test]
async fn a_settings_file_sets_the_upstream_with_a_secret_header_from_the_environment() {
    let upstream = TestUpstream::plain().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    let settings = format!(
        "tick_ms = 100\n\n[upstream.conversational]\nurl = \"{}\"\n\
         header_env = {{ Authorization = \"TEST_VOICE_AUTH\" }}\n",
        upstream.url
    );
    std::fs::write(&config, settings).unwrap();
    let secret = "Bearer secret-from-the-environment";
    let args = ["--config", config.to_str().unwrap()];
    let env = [("TEST_VOICE_AUTH", secret)];
    // At trace the WebSocket library would print the raw handshake.
    let process = binary::spawn_with_env(&dir.path().join("t.db"), &args, "trace", &env);
    let api = api_of(&process, &process.api_key());

    let token = api.mint_seconds("ada", 30.0).await;
    let mut client = api.connect(&token).await;
    client.next_event().await;
    client.send(Message::Text("hi".into())).await;
    loop {
        match client.next_message().await.expect("the session is open") {
            Message::Text(text) if text.starts_with("{\"type\":\"usage.") => continue,
            message => break assert_eq!(message, Message::Text("upstream: hi".into())),
        }
    }
    assert_eq!(upstream.connection(0).header("authorization"), Some(secret));
    client.close().await;
    process.signal("TERM");
    let (status, stderr) = wait_for_exit(process).await;
    assert!(status.success());
    assert!(stderr.iter().all(|line| !line.contains("secret-from")), "the secret was logged");
}

#[tokio::test]
async fn an_unknown_key_in_the_settings_file_stops_start_up_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    std::fs::write(&config, "tick_millis = 100\n").unwrap();
    let db = dir.path().join("t.db");
    let args = ["serve", "--config", config.to_str().unwrap()];
    let (status, _, stderr) = binary::run_binary(&args, &db);
    assert!(!status.success());
    assert!(stderr.contains("tick_millis"), "{stderr}");
}

#[tokio::test]
async fn keys_create_prints_a_working_key_for_a_new_project() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let (status, stdout, stderr) =
        binary::run_binary(&["keys", "create", "--project", "acme"], &db);
    assert!(status.success(), "{stderr}");
    let key = stdout.trim().to_owned();
    assert!(key.starts_with("tgk_") && !stdout.trim().contains('\n'), "{stdout}");

    let server = binary::spawn(&db, &[], "info");
    assert_eq!(server.printed_key(), None, "a database with a project gets no default key");
    let api = api_of(&server, &key);
    let (status, body) = api.post("/v1/usage/token", json!({ "human": "ada" })).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn keys_revoke_shuts_a_key_out_of_a_running_server_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let server = binary::spawn(&db, &[], "info");
    let key = server.api_key();
    let api = api_of(&server, &key);
    assert_eq!(api.post("/v1/usage/token", json!({ "human": "ada" })).await.0, 200);

    let revoke = |key: &str| {
        binary::run_binary_with_env(&["keys", "revoke"], &db, &[("TOLLGATE_API_KEY", key)])
    };
    let (status, stdout, stderr) = revoke(&key);
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), "revoked");
    let (status, body) = api.post("/v1/usage/token", json!({ "human": "ada" })).await;
    assert_eq!((status.as_u16(), body["type"].as_str()), (401, Some("unauthorized")), "{body}");

    // A second revocation and a mistyped key change nothing and say why;
    // the project's other keys go on working.
    let mut mistyped = key.clone();
    mistyped.pop();
    let other = binary::run_binary(&["keys", "create", "--project", "acme"], &db).1;
    for (text, expected) in [(key.as_str(), "no live key"), (&mistyped, "not an API key")] {
        let (status, _, stderr) = revoke(text);
        assert!(!status.success() && stderr.contains(expected), "{text}: {stderr}");
    }
    let other_api = api_of(&server, other.trim());
    assert_eq!(other_api.post("/v1/usage/token", json!({ "human": "ada" })).await.0, 200);
}

#[tokio::test]
async fn bad_settings_stop_start_up_with_a_message_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let (status, _, stderr) = binary::run_binary(&["serve", "--ping-secs=-1"], &db);
    assert!(!status.success());
    assert!(stderr.contains("--ping-secs"), "{stderr}");
    assert!(!db.exists(), "a refused start created the database");
}

#[tokio::test]
async fn an_empty_variable_for_an_upstream_header_stops_start_up_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    let settings = "[upstream.conversational]\nurl = \"wss://voice.test/agent\"\n\
                    header_env = { Authorization = \"TEST_EMPTY_VOICE_AUTH\" }\n";
    std::fs::write(&config, settings).unwrap();
    let db = dir.path().join("t.db");
    let args = ["serve", "--listen", "127.0.0.1:0", "--config", config.to_str().unwrap()];
    let env = [("TEST_EMPTY_VOICE_AUTH", "")];
    let (status, _, stderr) = binary::run_binary_with_env(&args, &db, &env);
    assert!(!status.success(), "started with an empty secret header");
    assert!(stderr.contains("TEST_EMPTY_VOICE_AUTH is empty"), "{stderr}");
    assert!(!db.exists(), "a refused start created the database");
}

#[tokio::test]
async fn a_second_server_on_the_same_database_is_refused_and_disturbs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let first = binary::spawn(&db, &[], "info");
    let api = api_of(&first, &first.api_key());
    let token = api.mint_seconds("ada", 30.0).await;
    let mut client = api.connect(&token).await;
    client.next_event().await;

    let (status, _, stderr) = binary::run_binary(&["serve", "--listen", "127.0.0.1:0"], &db);
    assert!(!status.success());
    assert!(stderr.contains("another tollgate server is already using"), "{stderr}");
    let rows = session_rows(&open_db(&db));
    assert_eq!(rows, vec![(None, 0)], "the first server's session was touched");
    client.send(tokio_tungstenite::tungstenite::Message::Text("still here".into())).await;
    assert_eq!(client.event_of("usage.remaining").await["type"], "usage.remaining");
}

#[tokio::test]
async fn sigterm_closes_every_session_with_1001_records_it_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let process = binary::spawn(&db, &["--tick-ms", &TICK_MS.to_string()], "info");
    let api = api_of(&process, &process.api_key());
    let token = api.mint_seconds("ada", 30.0).await;
    let mut clients = vec![api.connect(&token).await, api.connect(&token).await];
    sleep(Duration::from_millis(700)).await;

    process.signal("TERM");
    let used = clients[0].opened.elapsed().as_secs_f64();
    for client in &mut clients {
        let closed = client.until_closed().await;
        assert_eq!((closed.code, closed.reason.as_str()), (Some(1001), "server_shutdown"));
    }
    let (status, stderr) = wait_for_exit(process).await;
    assert!(status.success(), "exit {status}: {stderr:?}");

    let db = open_db(&db);
    assert_ledger_identity(&db);
    let rows = session_rows(&db);
    assert_eq!(rows.len(), 2);
    for (reason, charged) in &rows {
        assert_eq!(reason.as_deref(), Some("server_shutdown"));
        assert_near(*charged as f64 / 1000.0, used, 0.1);
    }

    // The log says what the database recorded.
    let mut logged: Vec<f64> = stderr
        .iter()
        .filter(|line| line.contains("session closed"))
        .filter_map(|line| line.split("seconds_used=").nth(1)?.parse().ok())
        .collect();
    let mut recorded: Vec<f64> = rows.iter().map(|(_, ms)| *ms as f64 / 1000.0).collect();
    logged.sort_by(f64::total_cmp);
    recorded.sort_by(f64::total_cmp);
    assert_eq!(logged, recorded, "{stderr:?}");
}

#[tokio::test]
async fn kill_9_loses_at_most_one_tick_and_the_next_start_closes_what_was_left_open() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let tick = ["--tick-ms", &TICK_MS.to_string()];
    let process = binary::spawn(&db, &tick, "info");
    let api = api_of(&process, &process.api_key());
    let mut clients = Vec::new();
    for human in ["ada", "bob", "cy"] {
        let token = api.mint_seconds(human, 30.0).await;
        clients.push(api.connect(&token).await);
    }
    let unlimited = api.mint("dee", json!([])).await;
    clients.push(api.connect(&unlimited).await);
    sleep(Duration::from_millis(1100)).await;

    let used: Vec<f64> = clients.iter().map(|c| c.opened.elapsed().as_secs_f64()).collect();
    process.kill();
    let restarted = binary::spawn(&db, &tick, "info");
    let logged = restarted.stderr().join("\n");
    assert!(logged.contains("left open sessions=4"), "{logged}");

    let db = open_db(&db);
    assert_ledger_identity(&db);
    let rows = session_rows(&db);
    assert_eq!(rows.len(), 4);
    let tick = TICK_MS as f64 / 1000.0;
    for ((reason, charged), used) in rows.iter().zip(&used) {
        assert_eq!(reason.as_deref(), Some("server_restart"));
        let charged = *charged as f64 / 1000.0;
        assert!(charged <= used + 0.02, "charged {charged} s for {used} s");
        assert!(charged >= used - tick - 0.05, "lost more than a tick: {charged} of {used} s");
    }
    drop(clients);
}

#[tokio::test]
async fn no_log_line_contains_a_token_or_an_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let process = binary::spawn(&db, &["--tick-ms", "50"], "trace");
    let key = process.api_key();
    let api = api_of(&process, &key);
    let token = api.mint_seconds("ada", 0.5).await;

    // Every way a secret can reach the server: query string, Bearer
    // header, x-api-key, and bad or revoked ones that are refused.
    api.connect(&token).await.until_closed().await;
    let bearer = api.http.get(api.url("/v1/usage/limits")).bearer_auth(&token);
    assert_eq!(bearer.send().await.unwrap().status(), 200);
    let (status, _) = api.refused("/v1/realtime/session?kind=conversational&token=tgu_bad").await;
    assert_eq!(status, 401);
    let revoke = json!({ "human": "ada" });
    assert_eq!(api.post("/v1/usage/token/revoke", revoke).await.0, 200);
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    assert_eq!(api.refused(&path).await.0, 401);
    let lost = api.http.get(api.url(&format!("/v1/{token}"))).send().await.unwrap();
    assert_eq!(lost.status(), 404);

    process.signal("TERM");
    let (status, stderr) = wait_for_exit(process).await;
    assert!(status.success());
    assert!(stderr.len() > 10, "too few log lines to mean anything: {stderr:?}");
    for secret in [&token, &key] {
        let body = &secret[4..];
        let leaks: Vec<&String> = stderr.iter().filter(|l| l.contains(body)).collect();
        assert!(leaks.is_empty(), "a secret was logged: {leaks:?}");
    }
}
