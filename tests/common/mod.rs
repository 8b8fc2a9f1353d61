//! Helpers shared by the integration tests: a real server on 127.0.0.1:0
//! with a fresh database on the backend `TOLLGATE_TEST_BACKEND` chooses
//! (see `database`), an HTTP client for its API, a WebSocket client for its
//! sessions, and direct reads of its database for the checks that only the
//! rows can answer.

#![allow(dead_code)]

pub mod binary;
pub mod database;
pub mod hostile;
pub mod llm;
pub mod lock;
pub mod postgres;
pub mod raw;
pub mod receiver;
pub mod upstream;

use std::path::PathBuf;
use std::time::Duration;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use database::{Db, TestDatabase, open_db, sqlite_only};

use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tollgate::RunningServer;
use tollgate::config::Settings;

/// The tick used by tests, short so that they run fast.
pub const TEST_TICK: Duration = Duration::from_millis(50);

/// How long a test waits for sessions to end: the slowest end a test waits
/// for is a client dropped as too slow, five seconds after it last took
/// anything, on a machine busy with the other tests.
const END_WAIT: Duration = Duration::from_secs(15);

/// A real server in this process, with its own database.
pub struct TestServer {
    pub api: Api,
    /// The `--db` value of the database: a SQLite file or a PostgreSQL URL.
    pub db_setting: PathBuf,
    server: Option<RunningServer>,
    database: TestDatabase,
}

/// The way to a server's API, in-process or a child process.
pub struct Api {
    pub base: String,
    pub ws_base: String,
    pub key: String,
    pub http: reqwest::Client,
}

impl std::ops::Deref for TestServer {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// Starts a server with the test defaults changed by `adjust`.
    pub async fn start_with(adjust: impl FnOnce(&mut Settings)) -> TestServer {
        let database = TestDatabase::create().await;
        let db_setting = database.setting();
        let mut settings = Settings::new(database.database());
        settings.listen = "127.0.0.1:0".parse().unwrap();
        settings.tick = TEST_TICK;
        adjust(&mut settings);
        let server = tollgate::start(settings).await.unwrap();
        let addr = server.local_addr();
        let key = server.first_api_key().expect("a new database gets a key").expose().to_owned();
        TestServer {
            api: Api::new(&addr.to_string(), key),
            db_setting,
            server: Some(server),
            database,
        }
    }

    /// The server's database, for reading its rows.
    pub fn db(&self) -> Db {
        self.database.db()
    }

    /// Shuts the server down cleanly. The returned database is kept until
    /// it is dropped.
    pub async fn shutdown(mut self) -> TestDatabase {
        self.server.take().unwrap().shutdown().await.unwrap();
        self.database
    }
}

impl Api {
    pub fn new(addr: &str, key: String) -> Api {
        Api {
            base: format!("http://{addr}"),
            ws_base: format!("ws://{addr}"),
            key,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a backend request with the API key and returns status and body.
    pub async fn backend(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> (StatusCode, Value) {
        let request = self.http.request(method, self.url(path)).header("x-api-key", &self.key);
        send(request.json(&body)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.backend(reqwest::Method::POST, path, body).await
    }

    pub async fn put(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.backend(reqwest::Method::PUT, path, body).await
    }

    /// Mints a token for `human` with the given limits, returning the token.
    pub async fn mint(&self, human: &str, limits: Value) -> String {
        let (status, body) =
            self.post("/v1/usage/token", json!({ "human": human, "limits": limits })).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }

    /// A token with `seconds` of conversational time.
    pub async fn mint_seconds(&self, human: &str, seconds: f64) -> String {
        self.mint(human, json!([{ "type": "conversational_seconds", "value": seconds }])).await
    }

    /// The human's limits as the backend reads them.
    pub async fn limits_of(&self, human: &str) -> Value {
        let request = self
            .http
            .get(self.url("/v1/usage/limits"))
            .header("x-api-key", &self.key)
            .header("x-human-id", human);
        let (status, body) = send(request).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// The remaining value of one limit type of the human.
    pub async fn remaining(&self, human: &str, limit_type: &str) -> f64 {
        let limits = self.limits_of(human).await;
        let limits = limits.as_array().unwrap();
        let entry = limits.iter().find(|l| l["type"] == limit_type);
        entry.unwrap_or_else(|| panic!("no {limit_type} in {limits:?}"))["value"].as_f64().unwrap()
    }

    /// Opens a conversational session with a token in the query string.
    pub async fn connect(&self, token: &str) -> Client {
        self.connect_to(&format!("/v1/realtime/session?kind=conversational&token={token}")).await
    }

    /// As [`Api::connect`], with `usage.remaining` after every tick
    /// (`events=ticks`) rather than only when the figures change.
    pub async fn connect_ticking(&self, token: &str) -> Client {
        let path = format!("/v1/realtime/session?kind=conversational&events=ticks&token={token}");
        self.connect_to(&path).await
    }

    /// Opens a session at `path_and_query`, panicking if it is refused.
    pub async fn connect_to(&self, path_and_query: &str) -> Client {
        let request = format!("{}{path_and_query}", self.ws_base).into_client_request().unwrap();
        self.connect_request(request).await.expect("the session was refused")
    }

    /// Opens a session, or returns the refusal's status and body.
    pub async fn connect_request(
        &self,
        request: tungstenite::handshake::client::Request,
    ) -> Result<Client, (StatusCode, Value)> {
        match tokio_tungstenite::connect_async(request).await {
            Ok((ws, _)) => Ok(Client { ws, opened: Instant::now() }),
            Err(tungstenite::Error::Http(response)) => {
                let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
                let body = response.body().clone().unwrap_or_default();
                Err((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
            }
            Err(other) => panic!("cannot connect: {other}"),
        }
    }

    /// Tries to open a session and returns the refusal.
    pub async fn refused(&self, path_and_query: &str) -> (StatusCode, Value) {
        let request = format!("{}{path_and_query}", self.ws_base).into_client_request().unwrap();
        match self.connect_request(request).await {
            Ok(_) => panic!("the session to {path_and_query} was admitted"),
            Err(refusal) => refusal,
        }
    }

    /// The upgrade request of a conversational session opened with the API
    /// key, for `human`.
    pub fn key_request(&self, human: &str) -> tungstenite::handshake::client::Request {
        let url = format!("{}/v1/realtime/session?kind=conversational", self.ws_base);
        let mut request = url.into_client_request().unwrap();
        request.headers_mut().insert("x-api-key", self.key.parse().unwrap());
        request.headers_mut().insert("x-human-id", human.parse().unwrap());
        request
    }
}

/// Asserts that every pool's balance is the sum of its ledger rows, and
/// that no ledger row belongs to a pool that does not exist.
pub fn assert_ledger_identity(db: &Db) {
    let broken: Vec<Vec<database::Cell>> = db
        .rows(
            "SELECT l.human_id, l.limit_type, l.balance,
                    (SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM ledger g
                     WHERE g.human_id = l.human_id AND g.limit_type = l.limit_type)
             FROM limits l",
            &[],
        )
        .into_iter()
        .filter(|row| row.get::<i64>(2) != row.get::<i64>(3))
        .map(|row| row.0)
        .collect();
    assert!(broken.is_empty(), "balance differs from the ledger: {broken:?}");
    let orphans = db.query_i64(
        "SELECT COUNT(*) FROM ledger g WHERE NOT EXISTS (SELECT 1 FROM limits l
         WHERE l.human_id = g.human_id AND l.limit_type = g.limit_type)",
        &[],
    );
    assert_eq!(orphans, 0, "ledger rows without a pool");
}

/// A session's row: (end_reason, charged milliseconds), by public id.
pub fn session_row(db: &Db, public_id: &str) -> (Option<String>, i64) {
    let row =
        db.row("SELECT end_reason, charged FROM sessions WHERE public_id = ?1", &[&public_id]);
    (row.get(0), row.get(1))
}

/// Waits until the session's end is recorded; returns reason and charge.
pub async fn wait_for_end(server: &TestServer, session_id: &str) -> (String, i64) {
    let deadline = Instant::now() + END_WAIT;
    while Instant::now() < deadline {
        if let (Some(reason), charged) = session_row(&server.db(), session_id) {
            return (reason, charged);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("session {session_id} never ended");
}

/// Sends a session's upgrade request by hand and, `after` later, drops the
/// connection without waiting for the answer: a client that gives up.
pub async fn give_up_upgrade(api: &Api, token: &str, after: Duration) {
    let addr = api.base.trim_start_matches("http://").to_owned();
    let mut tcp = TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "GET /v1/realtime/session?kind=conversational&token={token} HTTP/1.1\r\n\
         Host: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut tcp, request.as_bytes()).await.unwrap();
    tokio::time::sleep(after).await;
    drop(tcp);
}

/// Every session's row once there is one and all of them have ended. A
/// client is closed once its cut-off is recorded or 50 ms after, whichever
/// comes first, so on a busy machine it can see its close before its last
/// charge is written: a test that reads limits after a close waits here.
pub async fn rows_once_all_ended(server: &TestServer) -> Vec<(Option<String>, i64)> {
    let deadline = Instant::now() + END_WAIT;
    while Instant::now() < deadline {
        let rows = session_rows(&server.db());
        if !rows.is_empty() && rows.iter().all(|(reason, _)| reason.is_some()) {
            return rows;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("sessions never ended: {:?}", session_rows(&server.db()));
}

/// From `after` on, holds the database's write lock for `hold`, as a
/// backup tool or an operator's shell might.
pub fn hold_write_lock(
    server: &TestServer,
    after: Duration,
    hold: Duration,
) -> tokio::task::JoinHandle<()> {
    let db = server.db();
    tokio::task::spawn_blocking(move || {
        std::thread::sleep(after);
        let lock = lock::WriteLock::take(&db);
        std::thread::sleep(hold);
        lock.release();
    })
}

/// Every session's (end_reason, charged milliseconds), oldest first.
pub fn session_rows(db: &Db) -> Vec<(Option<String>, i64)> {
    let rows = db.rows("SELECT end_reason, charged FROM sessions ORDER BY id", &[]);
    rows.iter().map(|row| (row.get(0), row.get(1))).collect()
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// A WebSocket client of a session.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// When the upgrade completed, as the client saw it.
    pub opened: Instant,
}

/// How a session ended, as the client saw it.
#[derive(Debug)]
pub struct Closed {
    pub code: Option<u16>,
    pub reason: String,
    /// Seconds from the upgrade to the close frame (or the end of the
    /// connection).
    pub after: f64,
    /// The `usage.*` messages received before the close.
    pub events: Vec<Value>,
}

impl Client {
    /// The next `usage.*` message, skipping anything else.
    pub async fn next_event(&mut self) -> Value {
        loop {
            match self.next_message().await {
                Some(Message::Text(text)) => return serde_json::from_str(&text).unwrap(),
                Some(Message::Close(frame)) => {
                    panic!("closed while waiting for an event: {frame:?}")
                }
                Some(_) => continue,
                None => panic!("connection ended while waiting for an event"),
            }
        }
    }

    /// The next `usage.*` message of the given type.
    pub async fn event_of(&mut self, kind: &str) -> Value {
        loop {
            let event = self.next_event().await;
            if event["type"] == kind {
                return event;
            }
        }
    }

    pub async fn next_message(&mut self) -> Option<Message> {
        let next = tokio::time::timeout(Duration::from_secs(30), self.ws.next()).await;
        match next.expect("no message within 30 s") {
            Some(Ok(message)) => Some(message),
            Some(Err(_)) | None => None,
        }
    }

    pub async fn send(&mut self, message: Message) {
        self.ws.send(message).await.unwrap();
    }

    /// Reads until the server closes the session.
    pub async fn until_closed(&mut self) -> Closed {
        let mut events = Vec::new();
        loop {
            match self.next_message().await {
                Some(Message::Text(text)) => events.push(serde_json::from_str(&text).unwrap()),
                Some(Message::Close(frame)) => return self.closed(frame, events),
                Some(_) => continue,
                None => return self.closed(None, events),
            }
        }
    }

    fn closed(&self, frame: Option<CloseFrame>, events: Vec<Value>) -> Closed {
        Closed {
            code: frame.as_ref().map(|f| u16::from(f.code)),
            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
            after: self.opened.elapsed().as_secs_f64(),
            events,
        }
    }

    /// Sends a close frame and waits for the server's answer.
    pub async fn close(mut self) {
        self.ws.close(None).await.unwrap();
        while let Some(Ok(_)) = self.ws.next().await {}
    }
}

/// Asserts `actual` is within `tolerance` of `expected`.
#[track_caller]
pub fn assert_near(actual: f64, expected: f64, tolerance: f64) {
    assert!(
        (actual - expected).abs() <= tolerance,
        "{actual} is not within {tolerance} of {expected}"
    );
}
