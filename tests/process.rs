//! The `tollgate` binary as an operator runs it: first start, `keys
//! create`, SIGTERM, `kill -9` and restart, and what ends up in the logs.

mod common;

use std::time::Duration;

use common::binary::{self, Process};
use common::llm::{Behaviour, TestLlm};
use common::receiver::Receiver;
use common::upstream::TestUpstream;
use common::*;
use reqwest::Method;
use serde_json::json;
use tokio::time::sleep;
use tokio_tungstenite::tungstenite::Message;
use tollgate::secret::{Secret, SecretKind};

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
    let database = TestDatabase::create().await;
    let db = database.setting();
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
    let database = TestDatabase::create().await;
    let process = binary::spawn_with_env(&database.setting(), &args, "trace", &env);
    let api = api_of(&process, &process.api_key());

    let token = api.mint_seconds("ada", 30.0).await;
    talk_through_the_upstream(&api, &token, &upstream, secret).await;
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
    let database = TestDatabase::create().await;
    let db = database.setting();
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
    let database = TestDatabase::create().await;
    let db = database.setting();
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

    // A mistyped database is not created.
    let dir = tempfile::tempdir().unwrap();
    let typo = dir.path().join("typo.db");
    let env = [("TOLLGATE_API_KEY", other.trim())];
    let (status, _, stderr) = binary::run_binary_with_env(&["keys", "revoke"], &typo, &env);
    assert!(!status.success() && stderr.contains("no database"), "{stderr}");
    assert!(!typo.exists(), "keys revoke created a database");
}

#[tokio::test]
async fn bad_settings_stop_start_up_with_a_message_naming_them() {
    let database = TestDatabase::create().await;
    let db = database.setting();
    let (status, _, stderr) = binary::run_binary(&["serve", "--ping-secs=-1"], &db);
    assert!(!status.success());
    assert!(stderr.contains("--ping-secs"), "{stderr}");
    assert!(database.db().untouched(), "a refused start created the database");
}

#[tokio::test]
async fn an_empty_variable_for_an_upstream_header_stops_start_up_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    let settings = "[upstream.conversational]\nurl = \"wss://voice.test/agent\"\n\
                    header_env = { Authorization = \"TEST_EMPTY_VOICE_AUTH\" }\n";
    std::fs::write(&config, settings).unwrap();
    let database = TestDatabase::create().await;
    let db = database.setting();
    let args = ["serve", "--listen", "127.0.0.1:0", "--config", config.to_str().unwrap()];
    let env = [("TEST_EMPTY_VOICE_AUTH", "")];
    let (status, _, stderr) = binary::run_binary_with_env(&args, &db, &env);
    assert!(!status.success(), "started with an empty secret header");
    assert!(stderr.contains("TEST_EMPTY_VOICE_AUTH is empty"), "{stderr}");
    assert!(database.db().untouched(), "a refused start created the database");
}

#[tokio::test]
async fn a_second_server_on_the_same_database_is_refused_and_disturbs_nothing() {
    let why = "several servers share a PostgreSQL database (tests/instances.rs)";
    if !common::database::sqlite_only("a_second_server_on_the_same_database", why) {
        return;
    }
    let database = TestDatabase::create().await;
    let db = database.setting();
    let first = binary::spawn(&db, &[], "info");
    let api = api_of(&first, &first.api_key());
    let token = api.mint_seconds("ada", 30.0).await;
    let mut client = api.connect(&token).await;
    client.next_event().await;

    let (status, _, stderr) = binary::run_binary(&["serve", "--listen", "127.0.0.1:0"], &db);
    assert!(!status.success());
    assert!(stderr.contains("another tollgate server is already using"), "{stderr}");
    let rows = session_rows(&database.db());
    assert_eq!(rows, vec![(None, 0)], "the first server's session was touched");
    client.send(tokio_tungstenite::tungstenite::Message::Text("still here".into())).await;
    assert_eq!(client.event_of("usage.remaining").await["type"], "usage.remaining");
}

#[tokio::test]
async fn sigterm_closes_every_session_with_1001_records_it_and_exits_0() {
    let database = TestDatabase::create().await;
    let db = database.setting();
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

    let db = database.db();
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
    let database = TestDatabase::create().await;
    let db = database.setting();
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
    let db = database.db();
    common::database::until_nothing_left_open(&db).await;
    let logged = restarted.logged("left open sessions=4", Duration::from_secs(5));
    assert!(logged.is_ok(), "{logged:?}");

    assert_ledger_identity(&db);
    let rows = session_rows(&db);
    assert_eq!(rows.len(), 4);
    let tick = TICK_MS as f64 / 1000.0;
    for ((reason, charged), used) in rows.iter().zip(&used) {
        assert_eq!(reason.as_deref(), Some(common::database::left_open_reason()));
        let charged = *charged as f64 / 1000.0;
        assert!(charged <= used + 0.02, "charged {charged} s for {used} s");
        assert!(charged >= used - tick - 0.05, "lost more than a tick: {charged} of {used} s");
    }
    drop(clients);
}

// ---------------------------------------------------------------------------
// Secrets never logged
// ---------------------------------------------------------------------------

/// Every secret that reached or left the server, by what it is, with the
/// part of its text that is its own (no `tgk_` or `Bearer ` before it).
#[derive(Default)]
struct Secrets(Vec<(&'static str, String)>);

impl Secrets {
    fn add(&mut self, what: &'static str, text: &str) {
        let own = ["tgk_", "tgu_", "whsec_", "Bearer "]
            .iter()
            .find_map(|prefix| text.strip_prefix(prefix))
            .unwrap_or(text);
        assert!(own.len() >= 16, "too short to tell in a log: {what} {text}");
        self.0.push((what, own.to_owned()));
    }

    /// The log lines that hold a secret, with the secret they hold.
    fn leaks<'a>(&self, lines: &'a [String]) -> Vec<(&'static str, &'a String)> {
        let each = self.0.iter().flat_map(|(what, own)| {
            lines.iter().filter(|line| line.contains(own.as_str())).map(|line| (*what, line))
        });
        each.collect()
    }
}

/// The services the server talks to, and the directory of its database
/// and settings file.
struct Doubles {
    llm: TestLlm,
    upstream: TestUpstream,
    receiver: Receiver,
    dir: tempfile::TempDir,
    database: TestDatabase,
}

const UPSTREAM_SECRET: &str = "Bearer upstream-secret-7c1d9e0a4b";
const LLM_KEY: &str = "sk-llm-key-secret-5f2e8a1b93";

/// Starts the server at trace level with an LLM service whose key, and a
/// conversational upstream whose `Authorization`, it reads from the
/// environment.
async fn serve_with_secrets(secrets: &mut Secrets) -> (Process, Doubles) {
    let doubles = Doubles {
        llm: TestLlm::start(Behaviour::default()).await,
        upstream: TestUpstream::plain().await,
        receiver: Receiver::start().await,
        dir: tempfile::tempdir().unwrap(),
        database: TestDatabase::create().await,
    };
    let config = doubles.dir.path().join("tollgate.toml");
    let settings = format!(
        "tick_ms = 50\n\n[upstream.conversational]\nurl = \"{}\"\n\
         header_env = {{ Authorization = \"TEST_VOICE_AUTH\" }}\n",
        doubles.upstream.url
    );
    std::fs::write(&config, settings).unwrap();
    let llm = doubles.llm.base_url();
    let args = ["--config", config.to_str().unwrap(), "--llm-upstream", &llm];
    let env = [("TEST_VOICE_AUTH", UPSTREAM_SECRET), ("TOLLGATE_LLM_API_KEY", LLM_KEY)];
    let process = binary::spawn_with_env(&doubles.database.setting(), &args, "trace", &env);
    secrets.add("the upstream's header", UPSTREAM_SECRET);
    secrets.add("the LLM service's key", LLM_KEY);
    secrets.add("the API key", &process.api_key());
    (process, doubles)
}

/// Mints a token and sends it, and the key, to every usage-token endpoint.
async fn use_the_usage_endpoints(api: &Api, secrets: &mut Secrets) -> String {
    let limits = json!([{ "type": "token_cnt", "value": 1000 }]);
    let token = api.mint("ada", limits).await;
    secrets.add("the usage token", &token);
    let bearer = api.http.get(api.url("/v1/usage/limits")).bearer_auth(&token);
    assert_eq!(bearer.send().await.unwrap().status(), 200);
    api.limits_of("ada").await;
    let seconds = json!([{ "type": "conversational_seconds", "value": 30 }]);
    let calls = [
        (Method::PUT, "/v1/usage/token", json!({ "human": "ada", "limits": seconds })),
        (Method::POST, "/v1/usage/token/check", json!({ "human": "ada" })),
        (Method::POST, "/v1/usage/token/update_ttl", json!({ "human": "ada", "ttl_seconds": 600 })),
        (
            Method::POST,
            "/v1/usage/report",
            json!({ "human": "ada", "type": "token_cnt",
                                                   "value": 3, "idempotency_key": "job-1" }),
        ),
    ];
    for (method, path, body) in calls {
        let (status, answer) = api.backend(method, path, body).await;
        assert_eq!(status, 200, "{path}: {answer}");
    }
    token
}

/// A chat completion, which the server answers with the LLM service's key.
async fn ask_the_llm(api: &Api, token: &str, llm: &TestLlm) {
    let body = json!({ "model": "test-model", "messages": [{ "role": "user", "content": "hi" }] });
    let request = api.http.post(api.url("/v1/chat/completions")).bearer_auth(token);
    let response = request.json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let sent = llm.requests()[0].header("authorization").map(str::to_owned);
    assert_eq!(sent.as_deref(), Some(format!("Bearer {LLM_KEY}").as_str()));
}

/// Sets the webhook and rotates its secret, then has an event delivered
/// signed with both.
async fn use_the_webhook(api: &Api, receiver: &Receiver, secrets: &mut Secrets) {
    let (status, set) = api.put("/v1/webhook", json!({ "url": receiver.url })).await;
    assert_eq!(status, 201, "{set}");
    secrets.add("the webhook's first secret", set["secret"].as_str().unwrap());
    let (status, rotated) = api.post("/v1/webhook/rotate", json!({})).await;
    assert_eq!(status, 200, "{rotated}");
    secrets.add("the webhook's second secret", rotated["secret"].as_str().unwrap());

    let report =
        json!({ "human": "ada", "type": "token_cnt", "value": 1, "idempotency_key": "job-2" });
    assert_eq!(api.post("/v1/usage/report", report).await.0, 200);
    receiver.until(|events| !events.is_empty()).await;
    let signed = &receiver.got()[0];
    assert_eq!(signed.header("webhook-signature").split(' ').count(), 2, "not signed twice");
}

/// A session through the upstream, which must be sent `secret` as its
/// `Authorization` header.
async fn talk_through_the_upstream(api: &Api, token: &str, upstream: &TestUpstream, secret: &str) {
    let mut client = api.connect(token).await;
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
}

/// Credentials that are refused: never issued, revoked, or lost in a path.
async fn be_refused(api: &Api, token: &str, secrets: &mut Secrets) {
    let stranger = Secret::generate(SecretKind::UsageToken).expose().to_owned();
    let unknown_key = Secret::generate(SecretKind::ApiKey).expose().to_owned();
    secrets.add("a never-issued usage token", &stranger);
    secrets.add("a never-issued API key", &unknown_key);
    let path = format!("/v1/realtime/session?kind=conversational&token={stranger}");
    assert_eq!(api.refused(&path).await.0, 401);
    let bearer = api.http.get(api.url("/v1/usage/limits")).bearer_auth(&stranger);
    assert_eq!(bearer.send().await.unwrap().status(), 401);
    let keyed = api.http.post(api.url("/v1/usage/token")).header("x-api-key", &unknown_key);
    assert_eq!(keyed.json(&json!({ "human": "ada" })).send().await.unwrap().status(), 401);
    let as_backend = api.http.post(api.url("/v1/usage/token")).header("x-api-key", token);
    assert_eq!(as_backend.json(&json!({ "human": "ada" })).send().await.unwrap().status(), 403);

    assert_eq!(api.post("/v1/usage/token/revoke", json!({ "human": "ada" })).await.0, 200);
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    assert_eq!(api.refused(&path).await.0, 401);
    let chat = api.http.post(api.url("/v1/chat/completions")).bearer_auth(token);
    assert_eq!(chat.json(&json!({})).send().await.unwrap().status(), 401);
    let lost = api.http.get(api.url(&format!("/v1/{token}"))).send().await.unwrap();
    assert_eq!(lost.status(), 404);
}

/// The log has lines of everything done above, so that finding no secret
/// in it means something.
#[track_caller]
fn assert_the_log_covers_it_all(lines: &[String]) {
    let done = [
        "route=\"/v1/usage/token/update_ttl\"",
        "route=\"/v1/usage/report\"",
        "route=\"/v1/webhook/rotate\"",
        "tollgate::llm: completion ended",
        "hyper_util::client::legacy::connect::http: connected to",
        "session closed",
        "status=401",
        "status=403",
        "status=404",
    ];
    for text in done {
        assert!(lines.iter().any(|line| line.contains(text)), "nothing logged of {text}");
    }
}

#[tokio::test]
async fn no_log_line_holds_any_secret_that_reached_or_left_the_server() {
    let mut secrets = Secrets::default();
    let (process, doubles) = serve_with_secrets(&mut secrets).await;
    let api = api_of(&process, &process.api_key());
    let token = use_the_usage_endpoints(&api, &mut secrets).await;
    ask_the_llm(&api, &token, &doubles.llm).await;
    use_the_webhook(&api, &doubles.receiver, &mut secrets).await;
    talk_through_the_upstream(&api, &token, &doubles.upstream, UPSTREAM_SECRET).await;
    be_refused(&api, &token, &mut secrets).await;

    process.signal("TERM");
    let (status, stderr) = wait_for_exit(process).await;
    assert!(status.success(), "{stderr:?}");
    // Trace level logs every frame and connection: far more than this.
    assert_the_log_covers_it_all(&stderr);
    let leaks = secrets.leaks(&stderr);
    assert!(leaks.is_empty(), "secrets were logged: {leaks:#?}");
}
