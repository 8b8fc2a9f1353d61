//! The database of a test server, on the backend `TOLLGATE_TEST_BACKEND`
//! chooses (SQLite unless it is `postgres`), and reads of its rows that
//! give the same plain values on either backend, for the checks only the
//! rows can answer.
//!
//! SQL is written once, in what both databases take: `?1`-style
//! placeholders (turned into `$1` for PostgreSQL), `NOT limited` rather
//! than `limited = 0`, and a `CAST(... AS BIGINT)` around a `SUM`, whose
//! PostgreSQL type (NUMERIC) is not read here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_postgres::NoTls;
use tokio_postgres::types::{ToSql, Type};

use super::postgres::{self, FreshDatabase};

/// The variable that chooses the backend of the tests' servers.
pub const BACKEND_VARIABLE: &str = "TOLLGATE_TEST_BACKEND";

/// The backends a test server may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The backend `TOLLGATE_TEST_BACKEND` chooses: `sqlite` (or nothing) or
/// `postgres`; anything else stops the test rather than test the wrong one.
pub fn backend() -> Backend {
    match std::env::var(BACKEND_VARIABLE).as_deref() {
        Err(_) | Ok("") | Ok("sqlite") => Backend::Sqlite,
        Ok("postgres") => Backend::Postgres,
        Ok(other) => panic!("{BACKEND_VARIABLE}={other}: not sqlite or postgres"),
    }
}

/// Whether this test is by nature about SQLite and so runs only there;
/// on PostgreSQL it says on standard error that it is skipped, and why.
pub fn sqlite_only(test: &str, why: &str) -> bool {
    if backend() == Backend::Sqlite {
        return true;
    }
    postgres::say(&format!("skipped {test} on PostgreSQL: {why}"));
    false
}

/// The reason a session (or the outcome a completion) a killed server left
/// open ends with, and what is logged when it does: on SQLite, at the next
/// start; on PostgreSQL, which several servers may share, once another
/// server has found the killed one silent for three ticks (see
/// `instances` in schema.postgres.sql).
pub fn left_open_reason() -> &'static str {
    match backend() {
        Backend::Sqlite => "server_restart",
        Backend::Postgres => "instance_lost",
    }
}

/// Waits, at most ten seconds, until no session or completion is left
/// open, as they are once what a killed server left is closed (see
/// [`left_open_reason`]).
#[allow(dead_code)]
pub async fn until_nothing_left_open(db: &Db) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let open = "SELECT (SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL)
                     + (SELECT COUNT(*) FROM completions WHERE ended_at IS NULL)";
    while db.query_i64(open, &[]) > 0 {
        assert!(std::time::Instant::now() < deadline, "what a killed server left stayed open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A database made for one test, on the chosen backend, removed when this
/// is dropped.
pub struct TestDatabase {
    db: Db,
    _kept: Kept,
}

/// What keeps the database alive.
enum Kept {
    Directory(tempfile::TempDir),
    Postgres(FreshDatabase),
}

impl TestDatabase {
    /// A new, empty database. On PostgreSQL it is made in the server
    /// `TOLLGATE_TEST_POSTGRES` names, which must then be set.
    pub async fn create() -> TestDatabase {
        match backend() {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let db = Db::Sqlite(dir.path().join("tollgate.db"));
                TestDatabase { db, _kept: Kept::Directory(dir) }
            }
            Backend::Postgres => {
                let server = std::env::var(postgres::SERVER_VARIABLE).unwrap_or_else(|_| {
                    panic!("{BACKEND_VARIABLE}=postgres needs {}", postgres::SERVER_VARIABLE)
                });
                let fresh = FreshDatabase::create(&server).await;
                TestDatabase { db: Db::Postgres(fresh.url.clone()), _kept: Kept::Postgres(fresh) }
            }
        }
    }

    pub fn db(&self) -> Db {
        self.db.clone()
    }

    /// The `--db` value that names it: a file's path or a URL.
    pub fn setting(&self) -> PathBuf {
        self.db.setting()
    }

    /// The database as the server's settings take it.
    pub fn database(&self) -> tollgate::config::Database {
        tollgate::config::Database::parse(&self.setting()).unwrap()
    }
}

/// Where a database is, for reading its rows; cheap to clone. Each call
/// opens a connection of its own and blocks the calling thread until it
/// has the answer, as a read of a SQLite file would.
#[derive(Clone, Debug)]
pub enum Db {
    Sqlite(PathBuf),
    Postgres(String),
}

/// One value of a row, the same on either backend: a PostgreSQL BOOLEAN
/// is an integer, as SQLite keeps it.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Bytes(Vec<u8>),
}

/// A row of an answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Row(pub Vec<Cell>);

impl Row {
    /// Column `i` as `T`, panicking if it is another kind of value.
    #[track_caller]
    pub fn get<T: FromCell>(&self, i: usize) -> T {
        let cell = &self.0[i];
        T::from_cell(cell).unwrap_or_else(|| panic!("column {i} is {cell:?}"))
    }
}

/// A parameter of a statement.
pub trait Param {
    fn cell(&self) -> Cell;
}

impl Param for &str {
    fn cell(&self) -> Cell {
        Cell::Text((*self).to_owned())
    }
}

impl Param for String {
    fn cell(&self) -> Cell {
        Cell::Text(self.clone())
    }
}

impl Param for i64 {
    fn cell(&self) -> Cell {
        Cell::Int(*self)
    }
}

/// A value a [`Cell`] can be read as.
pub trait FromCell: Sized {
    fn from_cell(cell: &Cell) -> Option<Self>;
}

impl FromCell for i64 {
    fn from_cell(cell: &Cell) -> Option<i64> {
        match cell {
            Cell::Int(n) => Some(*n),
            _ => None,
        }
    }
}

impl FromCell for bool {
    fn from_cell(cell: &Cell) -> Option<bool> {
        i64::from_cell(cell).map(|n| n != 0)
    }
}

impl FromCell for f64 {
    fn from_cell(cell: &Cell) -> Option<f64> {
        match cell {
            Cell::Real(r) => Some(*r),
            _ => None,
        }
    }
}

impl FromCell for String {
    fn from_cell(cell: &Cell) -> Option<String> {
        match cell {
            Cell::Text(text) => Some(text.clone()),
            _ => None,
        }
    }
}

impl FromCell for Vec<u8> {
    fn from_cell(cell: &Cell) -> Option<Vec<u8>> {
        match cell {
            Cell::Bytes(bytes) => Some(bytes.clone()),
            _ => None,
        }
    }
}

impl<T: FromCell> FromCell for Option<T> {
    fn from_cell(cell: &Cell) -> Option<Option<T>> {
        match cell {
            Cell::Null => Some(None),
            other => T::from_cell(other).map(Some),
        }
    }
}

impl Db {
    /// The `--db` value that names the database: a file's path or a URL.
    pub fn setting(&self) -> PathBuf {
        match self {
            Db::Sqlite(path) => path.clone(),
            Db::Postgres(url) => PathBuf::from(url),
        }
    }

    /// Whether nothing was ever made in the database: no SQLite file, or
    /// no table in the PostgreSQL database.
    pub fn untouched(&self) -> bool {
        match self {
            Db::Sqlite(path) => !path.exists(),
            Db::Postgres(_) => self.tables().is_empty(),
        }
    }

    /// How long the store waits for a lock another connection holds before
    /// the write fails as unavailable: SQLite's busy timeout
    /// (`BUSY_TIMEOUT_MS` in src/store/sqlite/mod.rs), PostgreSQL's lock
    /// timeout (`STATEMENT_TIMEOUT_MS` in src/store/postgres/mod.rs).
    pub fn lock_wait(&self) -> Duration {
        match self {
            Db::Sqlite(_) => Duration::from_millis(1000),
            Db::Postgres(_) => Duration::from_millis(5000),
        }
    }

    /// The SQLite file, for the tests that are about SQLite only.
    pub fn sqlite_path(&self) -> &Path {
        match self {
            Db::Sqlite(path) => path,
            Db::Postgres(_) => panic!("a SQLite test ran on PostgreSQL"),
        }
    }

    /// Every row `sql` answers.
    pub fn rows(&self, sql: &str, params: &[&dyn Param]) -> Vec<Row> {
        let params: Vec<Cell> = params.iter().map(|param| param.cell()).collect();
        match self {
            Db::Sqlite(path) => sqlite_rows(path, sql, &params),
            Db::Postgres(url) => {
                let sql = numbered_placeholders(sql);
                on_postgres(url, move |client| async move {
                    postgres_rows(&client, &sql, &params).await
                })
            }
        }
    }

    /// Every row each statement of `sqls` answers, read on one connection:
    /// a connection each costs PostgreSQL a new backend process.
    pub fn rows_of_each(&self, sqls: &[String]) -> Vec<Vec<Row>> {
        match self {
            Db::Sqlite(path) => {
                let conn = open_db(path);
                sqls.iter().map(|sql| sqlite_rows_on(&conn, sql, &[])).collect()
            }
            Db::Postgres(url) => {
                let sqls = sqls.to_vec();
                on_postgres(url, move |client| async move {
                    let mut answers = Vec::with_capacity(sqls.len());
                    for sql in &sqls {
                        answers.push(postgres_rows(&client, sql, &[]).await);
                    }
                    answers
                })
            }
        }
    }

    /// The one row `sql` answers, panicking on none or more.
    #[track_caller]
    pub fn row(&self, sql: &str, params: &[&dyn Param]) -> Row {
        let mut rows = self.rows(sql, params);
        assert_eq!(rows.len(), 1, "{sql}: {rows:?}");
        rows.remove(0)
    }

    /// The one integer `sql` answers, such as a count.
    #[track_caller]
    pub fn query_i64(&self, sql: &str, params: &[&dyn Param]) -> i64 {
        self.row(sql, params).get(0)
    }

    /// Runs statements that change the database, on a connection that may
    /// write.
    pub fn execute(&self, sql: &str) {
        match self {
            Db::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.busy_timeout(Duration::from_secs(5)).unwrap();
                conn.execute_batch(sql).unwrap();
            }
            Db::Postgres(url) => {
                let sql = sql.to_owned();
                on_postgres(url, |client| async move { client.batch_execute(&sql).await.unwrap() })
            }
        }
    }

    /// The names of the database's tables, in order.
    pub fn tables(&self) -> Vec<String> {
        let sql = match self {
            Db::Sqlite(_) => "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
            Db::Postgres(_) => {
                "SELECT CAST(tablename AS TEXT) FROM pg_tables WHERE schemaname = 'public'
                 ORDER BY tablename"
            }
        };
        self.rows(sql, &[]).iter().map(|row| row.get(0)).collect()
    }
}

/// A read-only connection to a SQLite file.
pub fn open_db(path: &Path) -> rusqlite::Connection {
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY;
    let conn = rusqlite::Connection::open_with_flags(path, flags).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    conn
}

fn sqlite_rows(path: &Path, sql: &str, params: &[Cell]) -> Vec<Row> {
    sqlite_rows_on(&open_db(path), sql, params)
}

fn sqlite_rows_on(conn: &rusqlite::Connection, sql: &str, params: &[Cell]) -> Vec<Row> {
    let mut stmt = conn.prepare(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    let columns = stmt.column_count();
    let params = rusqlite::params_from_iter(params.iter().map(sqlite_value));
    let mut rows = stmt.query(params).unwrap();
    let mut answer = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        answer.push(Row((0..columns).map(|i| sqlite_cell(row.get_ref(i).unwrap())).collect()));
    }
    answer
}

fn sqlite_value(cell: &Cell) -> rusqlite::types::Value {
    use rusqlite::types::Value;
    match cell {
        Cell::Null => Value::Null,
        Cell::Int(n) => Value::Integer(*n),
        Cell::Real(r) => Value::Real(*r),
        Cell::Text(text) => Value::Text(text.clone()),
        Cell::Bytes(bytes) => Value::Blob(bytes.clone()),
    }
}

fn sqlite_cell(value: rusqlite::types::ValueRef<'_>) -> Cell {
    use rusqlite::types::ValueRef;
    match value {
        ValueRef::Null => Cell::Null,
        ValueRef::Integer(n) => Cell::Int(n),
        ValueRef::Real(r) => Cell::Real(r),
        ValueRef::Text(text) => Cell::Text(String::from_utf8_lossy(text).into_owned()),
        ValueRef::Blob(bytes) => Cell::Bytes(bytes.to_vec()),
    }
}

/// Runs `work` with a new connection to `url`, on a thread and runtime of
/// its own: the caller may be a test's runtime, which cannot block on a
/// future of its own.
fn on_postgres<T, F, W>(url: &str, work: W) -> T
where
    T: Send + 'static,
    F: std::future::Future<Output = T>,
    W: FnOnce(tokio_postgres::Client) -> F + Send + 'static,
{
    let url = url.to_owned();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            let driver = tokio::spawn(connection);
            let answer = work(client).await;
            let _ = driver.await;
            answer
        })
    });
    thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

async fn postgres_rows(client: &tokio_postgres::Client, sql: &str, params: &[Cell]) -> Vec<Row> {
    let values: Vec<Box<dyn ToSql + Sync + Send>> = params.iter().map(postgres_value).collect();
    let values: Vec<&(dyn ToSql + Sync)> =
        values.iter().map(|v| v.as_ref() as &(dyn ToSql + Sync)).collect();
    let rows = client.query(sql, &values).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter().map(postgres_row).collect()
}

/// `sql` with each `?N` written `$N`, as PostgreSQL numbers parameters.
fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        let numbered = c == '?' && chars.peek().is_some_and(char::is_ascii_digit);
        out.push(if numbered { '$' } else { c });
    }
    out
}

fn postgres_value(cell: &Cell) -> Box<dyn ToSql + Sync + Send> {
    match cell {
        Cell::Null => Box::new(None::<i64>),
        Cell::Int(n) => Box::new(*n),
        Cell::Real(r) => Box::new(*r),
        Cell::Text(text) => Box::new(text.clone()),
        Cell::Bytes(bytes) => Box::new(bytes.clone()),
    }
}

fn postgres_row(row: &tokio_postgres::Row) -> Row {
    Row((0..row.len()).map(|i| postgres_cell(row, i)).collect())
}

/// Column `i` of `row` as a cell. A type not read here (NUMERIC, say, the
/// type of a SUM) panics, naming it: the query should cast it.
fn postgres_cell(row: &tokio_postgres::Row, i: usize) -> Cell {
    fn or_null<T>(value: Option<T>, cell: impl FnOnce(T) -> Cell) -> Cell {
        value.map_or(Cell::Null, cell)
    }
    let column = &row.columns()[i];
    match *column.type_() {
        Type::INT8 => or_null(row.get::<_, Option<i64>>(i), Cell::Int),
        Type::INT4 => or_null(row.get::<_, Option<i32>>(i), |n| Cell::Int(n.into())),
        Type::INT2 => or_null(row.get::<_, Option<i16>>(i), |n| Cell::Int(n.into())),
        Type::BOOL => or_null(row.get::<_, Option<bool>>(i), |b| Cell::Int(b.into())),
        Type::FLOAT8 => or_null(row.get::<_, Option<f64>>(i), Cell::Real),
        Type::TEXT | Type::VARCHAR | Type::NAME => {
            or_null(row.get::<_, Option<String>>(i), Cell::Text)
        }
        Type::BYTEA => or_null(row.get::<_, Option<Vec<u8>>>(i), Cell::Bytes),
        ref other => panic!("column {} is {other}: cast it to BIGINT or TEXT", column.name()),
    }
}
