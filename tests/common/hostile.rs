//! Tables of hostile HTTP requests and the one loop that sends each row,
//! under both prefixes, and checks that it is refused with its documented
//! error and leaves every row of the database as it was.

use std::fmt::Write as _;

use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tollgate::secret::{Secret, SecretKind};

use super::TestServer;
use super::database::{Cell, Db, Row};

/// Settings for a server the tables are sent to: they send many bad
/// credentials from one address, which the limit on failed
/// authentications would soon answer with 429 (tests/edge.rs tests it), so
/// it is off.
pub fn for_tables(settings: &mut tollgate::config::Settings) {
    settings.auth_failures = tollgate::config::AuthFailureLimit::per_minute(0);
}

/// Every route is served under both.
pub const PREFIXES: [&str; 2] = ["/v1", "/api/v1"];

pub type Headers = Vec<(&'static str, HeaderValue)>;

pub fn hv(text: &str) -> HeaderValue {
    HeaderValue::from_str(text).unwrap()
}

/// A header value of raw bytes, which need not be UTF-8.
pub fn raw(bytes: &[u8]) -> HeaderValue {
    HeaderValue::from_bytes(bytes).unwrap()
}

pub fn key_header(key: &str) -> Headers {
    vec![("x-api-key", hv(key))]
}

pub fn bearer_header(token: &str) -> Headers {
    vec![("authorization", hv(&format!("Bearer {token}")))]
}

pub fn key_and_human(key: &str, human: &str) -> Headers {
    vec![("x-api-key", hv(key)), ("x-human-id", hv(human))]
}

/// A well-formed secret that was never issued.
pub fn never_issued(kind: SecretKind) -> String {
    Secret::generate(kind).expose().to_owned()
}

/// Sends raw bytes with the given headers; returns the status and the body
/// as JSON (or as a JSON string when it is not JSON).
pub async fn request(
    server: &TestServer,
    method: Method,
    path: &str,
    headers: &[(&'static str, HeaderValue)],
    body: Vec<u8>,
) -> (StatusCode, Value) {
    let mut builder = server.http.request(method, server.url(path));
    for (name, value) in headers {
        builder = builder.header(*name, value.clone());
    }
    let response = builder.body(body).send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The names of an object's fields, sorted.
#[track_caller]
pub fn fields(value: &Value) -> Vec<String> {
    let object = value.as_object().unwrap_or_else(|| panic!("not an object: {value}"));
    let mut names: Vec<String> = object.keys().cloned().collect();
    names.sort();
    names
}

/// One hostile request and the refusal it must get.
pub struct Case {
    pub what: String,
    pub method: Method,
    /// The path after the prefix, with its query string.
    pub path: String,
    pub headers: Headers,
    pub body: Vec<u8>,
    pub status: u16,
    /// The error's `type`, or its `code` on the OpenAI-compatible endpoints.
    pub kind: &'static str,
    /// Text the message must contain ("" for none).
    pub mentions: &'static str,
}

/// One row of a table, one argument per column.
#[allow(clippy::too_many_arguments)]
pub fn case(
    what: &str,
    method: Method,
    path: &str,
    headers: Headers,
    body: impl Into<Vec<u8>>,
    status: u16,
    kind: &'static str,
    mentions: &'static str,
) -> Case {
    Case {
        what: what.to_owned(),
        method,
        path: path.to_owned(),
        headers,
        body: body.into(),
        status,
        kind,
        mentions,
    }
}

/// The chat completion endpoints answer errors in OpenAI's shape.
fn is_openai(path: &str) -> bool {
    path.starts_with("/chat/") || path.starts_with("/models")
}

/// What is wrong with an answer to `case`, if anything: its status, its
/// error type or code, the shape of its body, or a message that does not
/// name what it should.
fn wrong_answer(case: &Case, got: StatusCode, answer: &Value) -> Option<String> {
    let (kind, message, shape_ok) = if is_openai(&case.path) {
        let error = &answer["error"];
        let shape = answer.is_object()
            && fields(answer) == ["error"]
            && error.is_object()
            && fields(error) == ["code", "message", "param", "type"];
        (&error["code"], &error["message"], shape)
    } else {
        let shape = answer.is_object() && fields(answer) == ["message", "type"];
        (&answer["type"], &answer["message"], shape)
    };
    let message = message.as_str().unwrap_or_default();
    if got.as_u16() != case.status || *kind != case.kind {
        Some(format!("expected {} {}, got {got} {answer}", case.status, case.kind))
    } else if !shape_ok || message.is_empty() {
        Some(format!("not an error body of the endpoint's shape: {answer}"))
    } else if !message.contains(case.mentions) {
        Some(format!("the message does not name {}: {answer}", case.mentions))
    } else {
        None
    }
}

/// Sends every row under both prefixes and returns what went wrong: a
/// wrong answer, or a change to the database (after which the next row is
/// compared with the changed database, so that one change is told once).
pub async fn refusals_gone_wrong(server: &TestServer, cases: &[Case]) -> Vec<String> {
    let db = server.db();
    let mut before = snapshot(&db);
    let mut failures = Vec::new();
    for case in cases {
        for prefix in PREFIXES {
            let at = format!("{}: {} {prefix}{}", case.what, case.method, case.path);
            let path = format!("{prefix}{}", case.path);
            let (got, answer) =
                request(server, case.method.clone(), &path, &case.headers, case.body.clone()).await;
            if let Some(wrong) = wrong_answer(case, got, &answer) {
                failures.push(format!("{at}: {wrong}"));
            }
            let after = snapshot(&db);
            if after != before {
                let changed = difference(&before, &after);
                failures.push(format!("{at}: changed the database:\n{changed}"));
                before = after;
            }
        }
    }
    failures
}

/// Asserts that no row of the table went wrong.
#[track_caller]
pub fn assert_none_went_wrong(failures: &[String], cases: &[Case]) {
    assert!(
        failures.is_empty(),
        "{} of {} requests went wrong:\n{}",
        failures.len(),
        cases.len() * PREFIXES.len(),
        failures.join("\n")
    );
}

/// Every row of every table, in a deterministic order, as text.
pub fn snapshot(db: &Db) -> String {
    let tables = db.tables();
    for wanted in ["projects", "api_keys", "humans", "limits", "usage_tokens", "sessions", "ledger"]
    {
        assert!(tables.iter().any(|t| t == wanted), "no table {wanted} in {tables:?}");
    }
    // A run's row on PostgreSQL changes at every tick, its heartbeat:
    // only what says which runs there are, and whether they ended, counts.
    let select = |table: &String| match table.as_str() {
        "instances" => "SELECT id, started_at, tick_millis, ended_at, lost FROM instances".into(),
        table => format!("SELECT * FROM {table}"),
    };
    let selects: Vec<String> = tables.iter().map(select).collect();
    let mut out = String::new();
    for (table, rows) in tables.iter().zip(db.rows_of_each(&selects)) {
        write_table(table, rows, &mut out);
    }
    out
}

/// The table's rows, one line each, the lines sorted.
fn write_table(table: &str, rows: Vec<Row>, out: &mut String) {
    let mut lines: Vec<String> =
        rows.iter().map(|row| row.0.iter().map(cell).collect::<Vec<_>>().join(" | ")).collect();
    lines.sort();
    writeln!(out, "{table}:").unwrap();
    for line in lines {
        writeln!(out, "  {line}").unwrap();
    }
}

fn cell(value: &Cell) -> String {
    match value {
        Cell::Null => "NULL".to_owned(),
        Cell::Int(n) => n.to_string(),
        Cell::Real(r) => format!("{r:?}"),
        Cell::Text(text) => format!("{text:?}"),
        Cell::Bytes(bytes) => {
            bytes.iter().fold(String::from("x'"), |mut hex, byte| {
                write!(hex, "{byte:02x}").unwrap();
                hex
            }) + "'"
        }
    }
}

/// The lines one snapshot has and the other lacks.
pub fn difference(before: &str, after: &str) -> String {
    let gone = before.lines().filter(|l| !after.lines().any(|a| a == *l));
    let new = after.lines().filter(|l| !before.lines().any(|b| b == *l));
    let mut out = String::new();
    for line in gone {
        writeln!(out, "    - {line}").unwrap();
    }
    for line in new {
        writeln!(out, "    + {line}").unwrap();
    }
    out
}
