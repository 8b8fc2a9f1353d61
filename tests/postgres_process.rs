//! The `tollgate` binary on PostgreSQL, end to end: started with
//! `--db postgres://...` on a fresh database, it mints over HTTP, meters a
//! WebSocket session and debits it; `keys create` and `keys revoke` work
//! on the URL (`postgresql://` too, and a libpq key=value string is
//! refused); a second server on the same database starts beside the
//! first; a frozen database fails its calls in bounded time; a server
//! another has closed out as lost refuses sessions and chat
//! completions at once, charges nothing more, and stops. (tests/instances.rs
//! has what two servers on one database do together.)
//! Skipped, saying so, without `TOLLGATE_TEST_POSTGRES` (see
//! tests/common/postgres.rs).

mod common;

use std::path::Path;
use std::time::Duration;

use common::Api;
use common::binary::{self, Process};
use common::postgres::{self, FreshDatabase};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// Held for reading by every test here that uses the cluster, and for
/// writing by the one that freezes it, so that no other test's connection
/// waits on a stopped server meanwhile.
static CLUSTER: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn api_of(process: &Process, key: &str) -> Api {
    Api::new(process.base.trim_start_matches("http://"), key.to_owned())
}

async fn wait_for_exit(process: Process) -> (std::process::ExitStatus, Vec<String>) {
    let limit = Duration::from_secs(20);
    tokio::task::spawn_blocking(move || process.wait(limit)).await.unwrap()
}

#[tokio::test]
async fn a_server_on_postgres_meters_a_session_and_debits_it() {
    let Some(server) = postgres::server("a_server_on_postgres_meters_a_session") else {
        return;
    };
    let _cluster = CLUSTER.read().await;
    let db = FreshDatabase::create(&server).await;
    // The test server trusts local connections and ignores the password;
    // it is there to be looked for in the logs.
    let url = with_password(&db.url, PASSWORD);
    let process = binary::spawn(Path::new(&url), &["--tick-ms", "100"], "debug");
    let api = api_of(&process, &process.api_key());

    let token = api.mint_seconds("ada", 30.0).await;
    let mut client = api.connect(&token).await;
    client.send(Message::Binary(vec![0u8; 640].into())).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    client.close().await;

    // The session's last charge is written when its end is; the limits
    // then read what is left.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let remaining = loop {
        let remaining = api.remaining("ada", "conversational_seconds").await;
        let (_, sessions) =
            api.backend(reqwest::Method::GET, "/v1/realtime/sessions?state=ended", json!({})).await;
        if sessions["data"].as_array().is_some_and(|rows| rows.len() == 1) {
            break remaining;
        }
        assert!(tokio::time::Instant::now() < deadline, "the session never ended: {sessions}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(remaining <= 30.0 - 1.2 && remaining > 25.0, "{remaining} seconds left");

    process.signal("TERM");
    let (status, stderr) = wait_for_exit(process).await;
    assert!(status.success(), "{stderr:?}");
    assert!(stderr.iter().any(|line| line.contains("using PostgreSQL")), "{stderr:?}");
    assert!(stderr.iter().all(|line| !line.contains(PASSWORD)), "the password was logged");
}

const PASSWORD: &str = "not-in-the-logs";

/// `url` with `password` given to its user, if it names one without.
fn with_password(url: &str, password: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((user, host)) if !user.contains(':') => format!("{scheme}://{user}:{password}@{host}"),
        _ => url.to_owned(),
    }
}

#[tokio::test]
async fn keys_are_created_and_revoked_on_a_postgres_url_beside_two_servers() {
    let Some(server) = postgres::server("keys_are_created_and_revoked_on_a_postgres_url") else {
        return;
    };
    let _cluster = CLUSTER.read().await;
    let db = FreshDatabase::create(&server).await;
    let url = std::path::PathBuf::from(&db.url);
    let (status, stdout, stderr) =
        binary::run_binary(&["keys", "create", "--project", "acme"], &url);
    assert!(status.success(), "{stderr}");
    let key = stdout.trim().to_owned();
    assert!(key.starts_with("tgk_"), "{stdout}");

    // A database that already has a project gets no default key.
    let process = binary::spawn(&url, &[], "info");
    assert_eq!(process.printed_key(), None);
    let api = api_of(&process, &key);
    assert_eq!(api.post("/v1/usage/token", json!({ "human": "ada" })).await.0, 200);

    let second = binary::spawn(&url, &[], "info");
    let other = api_of(&second, &key);
    assert_eq!(other.post("/v1/usage/token", json!({ "human": "bob" })).await.0, 200);

    let env = [("TOLLGATE_API_KEY", key.as_str())];
    let (status, _, stderr) = binary::run_binary_with_env(&["keys", "revoke"], &url, &env);
    assert!(status.success(), "{stderr}");
    assert_eq!(api.post("/v1/usage/token", json!({ "human": "ada" })).await.0, 401);
    assert_eq!(other.post("/v1/usage/token", json!({ "human": "ada" })).await.0, 401);
    drop((process, second));
}

#[tokio::test]
async fn a_postgresql_url_is_taken_and_a_key_value_string_refused_with_no_file_made() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["keys", "create", "--project", "acme", "--db", "host=127.0.0.1 dbname=x"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("postgres://"), "{stderr}");
    assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "a file was made");

    let Some(server) = postgres::server("a_postgresql_url_is_taken") else {
        return;
    };
    let _cluster = CLUSTER.read().await;
    let db = FreshDatabase::create(&server).await;
    let url = std::path::PathBuf::from(db.url.replacen("postgres://", "postgresql://", 1));
    let (status, stdout, stderr) =
        binary::run_binary(&["keys", "create", "--project", "acme"], &url);
    assert!(status.success() && stdout.starts_with("tgk_"), "{stderr}");
}

#[tokio::test]
async fn sslrootcert_system_alone_checks_the_name_as_verify_full_does() {
    let Some(server) = postgres::server("sslrootcert_system_alone") else {
        return;
    };
    let Some(ca) = postgres::ca_file() else {
        postgres::say("skipped sslrootcert_system_alone: the server has no CA of the tests'");
        return;
    };
    let _cluster = CLUSTER.read().await;
    let db = FreshDatabase::create(&server).await;

    // The system's roots are the tests' CA here, whose certificate names
    // localhost only: verify-full takes localhost and refuses 127.0.0.1.
    let system_roots = [("SSL_CERT_FILE", ca.as_str()), ("SSL_CERT_DIR", "")];
    let keys_create = ["keys", "create", "--project", "acme"];
    for (host, taken) in [("localhost", true), ("127.0.0.1", false)] {
        let url = format!("{}?sslrootcert=system", db.url.replacen("127.0.0.1", host, 1));
        let url = std::path::PathBuf::from(url);
        let (status, _, stderr) = binary::run_binary_with_env(&keys_create, &url, &system_roots);
        assert_eq!(status.success(), taken, "{host}: {stderr}");
        assert!(taken || stderr.contains("certificate"), "{host}: {stderr}");
    }
}

#[tokio::test]
async fn tls_settings_libpq_would_refuse_stop_the_server_at_start_up_saying_why() {
    let refused = [
        ("sslmode=require&sslrootcert=system", "use sslmode=verify-full"),
        ("sslmode=verify-ca", "sslrootcert=/path/to/ca.pem"),
        ("sslmode=verify-full", "sslrootcert=/path/to/ca.pem"),
    ];
    for (query, said) in refused {
        let url = std::path::PathBuf::from(format!("postgres://nobody@127.0.0.1:1/none?{query}"));
        let (status, _, stderr) = binary::run_binary(&["serve"], &url);
        assert!(!status.success(), "{query}: {stderr}");
        assert!(stderr.contains("db (--db): sslmode=") && stderr.contains(said), "{stderr}");
    }
}

#[tokio::test]
async fn a_cap_on_the_database_is_refused_with_postgres() {
    let url = std::path::PathBuf::from("postgres://nobody@127.0.0.1:1/none");
    let (status, _, stderr) = binary::run_binary(&["serve", "--max-db-mb", "64"], &url);
    assert!(!status.success());
    assert!(stderr.contains("--max-db-mb") && stderr.contains("PostgreSQL"), "{stderr}");
}

#[tokio::test]
async fn a_password_holding_a_slash_or_a_question_mark_is_never_printed() {
    for password in ["s3/cr3t", "s3?cr3t", "s3#cr3t", "s3:cr3t"] {
        let url = format!("postgres://ada:{password}@127.0.0.1:1/x");
        let url = std::path::PathBuf::from(url);
        for args in [&["keys", "create", "--project", "acme"][..], &["serve"][..]] {
            let (status, stdout, stderr) = binary::run_binary(args, &url);
            assert!(!status.success(), "{args:?}: {stderr}");
            assert!(stderr.contains("ada@127.0.0.1:1/x"), "{args:?}: {stderr}");
            assert!(!(stdout + &stderr).contains("cr3t"), "{password} printed: {stderr}");
        }
    }
}

#[tokio::test]
async fn sessions_are_closed_and_refused_while_postgres_refuses_connections() {
    let Some(server) = postgres::server("sessions_are_closed_and_refused_while_postgres") else {
        return;
    };
    let _cluster = CLUSTER.read().await;
    let db = FreshDatabase::create(&server).await;
    let process = binary::spawn(Path::new(&db.url), &["--tick-ms", "100"], "info");
    let api = api_of(&process, &process.api_key());
    let token = api.mint_seconds("ada", 30.0).await;
    let mut client = api.connect(&token).await;

    let (admin, connection) =
        tokio_postgres::connect(&server, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let allow = |allowed: bool| format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {allowed}");
    admin.batch_execute(&allow(false)).await.unwrap();
    let terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1";
    admin.execute(terminate, &[&name]).await.unwrap();

    let closed = client.until_closed().await;
    assert_eq!(closed.code, Some(1011), "{closed:?}");
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    assert_eq!(api.refused(&path).await.0, 503);

    admin.batch_execute(&allow(true)).await.unwrap();
    admitted_again(&api, &path, Duration::from_secs(10)).await;
    drop(process);
}

/// Processes stopped with SIGSTOP, continued when this is dropped, even
/// after a failed assertion, so that no test leaves the cluster stopped.
struct Frozen(Vec<i32>);

impl Frozen {
    /// Stops `pids`, or returns `None` if they cannot be signalled (the
    /// tests do not run as root or as the cluster's owner).
    fn freeze(pids: Vec<i32>) -> Option<Frozen> {
        let frozen = Frozen(pids);
        frozen.signal("STOP").then_some(frozen)
    }

    fn signal(&self, name: &str) -> bool {
        let pids: Vec<String> = self.0.iter().map(i32::to_string).collect();
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .args(&pids)
            .stderr(std::process::Stdio::null())
            .status();
        status.is_ok_and(|status| status.success())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.signal("CONT");
    }
}

/// The PostgreSQL server's postmaster and the backends of database `name`.
async fn postmaster_and_backends(admin: &tokio_postgres::Client, name: &str) -> Vec<i32> {
    let data: String = admin.query_one("SHOW data_directory", &[]).await.unwrap().get(0);
    let pid_file = std::fs::read_to_string(Path::new(&data).join("postmaster.pid")).unwrap();
    let mut pids = vec![pid_file.lines().next().unwrap().trim().parse::<i32>().unwrap()];
    let sql = "SELECT pid FROM pg_stat_activity WHERE datname = $1";
    let rows = admin.query(sql, &[&name]).await.unwrap();
    pids.extend(rows.iter().map(|row| row.get::<_, i32>(0)));
    pids
}

async fn healthz(api: &Api) -> u16 {
    let request = reqwest::Client::new().get(api.url("/healthz")).timeout(Duration::from_secs(30));
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn a_frozen_postgres_closes_sessions_and_fails_healthz_in_bounded_time() {
    let Some(server) = postgres::server("a_frozen_postgres_closes_sessions") else {
        return;
    };
    let _cluster = CLUSTER.write().await;
    let db = FreshDatabase::create(&server).await;
    let process = binary::spawn(Path::new(&db.url), &["--tick-ms", "100"], "info");
    let api = api_of(&process, &process.api_key());
    let token = api.mint_seconds("ada", 60.0).await;
    let mut client = api.connect(&token).await;
    assert_eq!(healthz(&api).await, 200);

    let (admin, connection) =
        tokio_postgres::connect(&server, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let pids = postmaster_and_backends(&admin, &name).await;
    let Some(frozen) = Frozen::freeze(pids) else {
        postgres::say("skipped a_frozen_postgres_closes_sessions: cannot stop PostgreSQL");
        return;
    };

    // The meter's call in flight when PostgreSQL stops fails at the limit
    // of a call (six seconds: the statement timeout and one more), and the
    // session closes at the next tick (0.1 s); /healthz, asked only then,
    // waits on a call of its own, up to six seconds more. That is twelve
    // seconds and a tick at most; the other eight are slack for a loaded
    // machine (process start-up, TLS handshakes), and a server that hangs
    // still fails the bound.
    let bound = Duration::from_secs(20);
    let started = std::time::Instant::now();
    let second_url = std::path::PathBuf::from(&db.url);
    let second = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let (status, _, stderr) =
            binary::run_binary(&["serve", "--listen", "127.0.0.1:0"], &second_url);
        (status, stderr, started.elapsed())
    });
    let closed = tokio::time::timeout(bound, client.until_closed()).await;
    let closed = closed.expect("the session stayed open while PostgreSQL was stopped");
    assert_eq!(closed.code, Some(1011), "{closed:?}");
    let status = tokio::time::timeout(bound, healthz(&api)).await;
    assert_eq!(status.expect("/healthz did not answer"), 503);
    assert!(started.elapsed() < bound, "took {:?}", started.elapsed());
    let (status, stderr, took) = second.await.unwrap();
    assert!(!status.success() && took < bound, "a server starting took {took:?}: {stderr}");
    assert!(stderr.contains("cannot connect to PostgreSQL"), "{stderr}");
    drop(frozen);

    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    admitted_again(&api, &path, Duration::from_secs(20)).await;
    assert_eq!(healthz(&api).await, 200);
    drop(process);
}

/// Waits, at most `within`, until a session at `path` is admitted again.
async fn admitted_again(api: &Api, path: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let request = format!("{}{path}", api.ws_base);
        let request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(request)
                .unwrap();
        if api.connect_request(request).await.is_ok() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "sessions were never admitted again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn admin_of(db: &FreshDatabase) -> tokio_postgres::Client {
    let (admin, connection) =
        tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    admin
}

/// Marks every run of the server on the database as closed out, as another
/// server does with one it finds silent (see `instances` in
/// schema.postgres.sql).
async fn close_out(admin: &tokio_postgres::Client) {
    // Ended now: a run ended a week ago would have its row removed.
    let sql = "UPDATE instances SET lost = TRUE,
                   ended_at = (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT
               WHERE ended_at IS NULL";
    assert_eq!(admin.execute(sql, &[]).await.unwrap(), 1);
}

#[tokio::test]
async fn a_server_another_has_closed_out_refuses_sessions_and_chat_completions_at_once() {
    let Some(server) = postgres::server("a_server_another_has_closed_out_refuses") else {
        return;
    };
    let _cluster = CLUSTER.read().await;
    let db = FreshDatabase::create(&server).await;
    // A long tick, so that the meter does not find out before the requests.
    let process = binary::spawn(Path::new(&db.url), &["--tick-ms", "10000"], "info");
    let api = api_of(&process, &process.api_key());
    let token = api.mint_seconds("ada", 30.0).await;
    assert_eq!(chat(&api, &token).await.0, 200);

    let admin = admin_of(&db).await;
    close_out(&admin).await;
    let (status, body) = chat(&api, &token).await;
    assert_eq!((status.as_u16(), body["error"]["code"].as_str()), (503, Some("unavailable")));
    let path = format!("/v1/realtime/session?kind=conversational&token={token}");
    assert_eq!(api.refused(&path).await.0, 503);
    let sql = "SELECT (SELECT COUNT(*) FROM completions) + (SELECT COUNT(*) FROM sessions)";
    assert_eq!(admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0), 1, "{body}");
    drop(process);
}

/// Asks the echo model for a chat completion with `token`.
async fn chat(api: &Api, token: &str) -> (reqwest::StatusCode, serde_json::Value) {
    let body = json!({ "model": "echo", "messages": [{ "role": "user", "content": "hi" }] });
    let request = api.http.post(api.url("/v1/chat/completions")).bearer_auth(token).json(&body);
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn a_server_another_has_closed_out_charges_nothing_more_and_stops() {
    let Some(server) = postgres::server("a_server_another_has_closed_out_charges") else {
        return;
    };
    let _cluster = CLUSTER.read().await;
    let db = FreshDatabase::create(&server).await;
    let process = binary::spawn(Path::new(&db.url), &["--tick-ms", "100"], "info");
    let api = api_of(&process, &process.api_key());
    let token = api.mint_seconds("ada", 30.0).await;
    let mut client = api.connect(&token).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // What the server had committed by then is all it may.
    let admin = admin_of(&db).await;
    close_out(&admin).await;
    let written = what_was_written(&admin).await;

    let closed = tokio::time::timeout(Duration::from_secs(10), client.until_closed()).await;
    assert_eq!(closed.expect("the session stayed open").code, Some(1011));
    let (status, stderr) = wait_for_exit(process).await;
    assert!(!status.success(), "{stderr:?}");
    let said = stderr.iter().any(|line| line.contains("found this one silent and closed it out"));
    assert!(said, "{stderr:?}");
    assert_eq!(what_was_written(&admin).await, written, "{stderr:?}");
}

/// The ledger's rows and sum, the run's last batch, and the sessions still
/// open.
async fn what_was_written(admin: &tokio_postgres::Client) -> (i64, i64, Option<i64>, i64) {
    let sql = "SELECT (SELECT COUNT(*) FROM ledger),
                      (SELECT COALESCE(SUM(amount), 0)::BIGINT FROM ledger),
                      (SELECT last_batch FROM instances),
                      (SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL)";
    let row = admin.query_one(sql, &[]).await.unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}
