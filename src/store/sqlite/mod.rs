//! The SQLite backend: one connection owned by one writer thread, fed by
//! bounded channels of jobs, so that SQLite never blocks the async runtime
//! and every transaction is serialised without locks of our own; the
//! meter's commits have a channel of their own that the writer empties
//! first, and sessions to be admitted a channel of theirs, whose waiting
//! admissions are committed together (see `admissions`). Lookups go to
//! a second, read-only connection on a thread of its own, and the
//! write-ahead log is copied back by a third (see `checkpoint`). Pragmas
//! and the schema are applied here when the database is opened.

mod accounts;
mod admissions;
mod checkpoint;
mod completions;
mod listings;
mod outbox;
mod reports;
mod room;
mod usage;
mod webhooks;

use std::collections::HashMap;
use std::path::Path;
use std::thread;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use rusqlite::config::DbConfig;
use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};
use tokio::sync::{mpsc, oneshot};

use super::{
    Admission, ApiKeyRecord, AttemptOutcome, CompletionAdmission, CompletionEnd, Delivery,
    DeliveryStatus, DueEvent, Human, HumanId, LedgerFilter, LedgerRow, Listing, MintRequest,
    NewCompletion, NewReport, NewSession, Page, ProjectId, ReportOutcome, SessionFilter,
    SessionRow, Store, StoreError, StoreResult, UnixMillis, UsageBatch, UsageRecorded,
    UsageTokenRecord, Webhook, WebhookChange,
};
use crate::limits::{ChangeMode, Limit};
use crate::secret::SecretHash;

/// The schema this build writes and understands; recorded in the database.
pub const SCHEMA_VERSION: i64 = 4;
const SCHEMA: &str = include_str!("../../../schema.sql");

/// The script that brings a database from the version before to each
/// version after the first, in order. Each runs in one transaction with
/// the record of the version it reaches, so a crash mid-upgrade leaves the
/// database as it was.
const UPGRADES: &[(i64, &str)] = &[
    (2, include_str!("upgrades/2.sql")),
    (3, include_str!("upgrades/3.sql")),
    (4, include_str!("upgrades/4.sql")),
];

/// How many jobs may wait for each thread. Callers past this wait for room
/// (backpressure on HTTP handlers and the meter) rather than queueing
/// without bound; at tens of microseconds a job, a full queue drains in
/// well under a tick.
const JOB_QUEUE: usize = 1024;

/// How long a write waits for a lock held by another process (a backup
/// tool, an operator's `sqlite3` shell) before it fails. Failing makes the
/// meter close its sessions rather than meter blind, so the wait is short.
const BUSY_TIMEOUT_MS: u64 = 1000;

/// Work for one of the store's threads, run on its state.
type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// The writer thread's state: the connection, what the usage recorder
/// remembers between ticks, and what each project's webhook wants.
pub(crate) struct Writer {
    conn: Connection,
    cap: Option<room::Cap>,
    segments: HashMap<i64, usage::Segment>,
    hooks: outbox::Hooks,
    /// The id of the last usage batch committed. Kept in memory, since
    /// on SQLite a commit never succeeds unknown to its caller; the meter
    /// sends a batch again only within one run.
    last_batch: Option<crate::store::BatchId>,
}

/// A handle on the store's threads; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    writes_tx: mpsc::Sender<Job<Writer>>,
    /// The meter's commits, taken before any other write: behind a burst
    /// of admissions or mints a tick's commit waited hundreds of
    /// milliseconds, and what a `kill -9` loses grows by what it waits.
    meter_tx: mpsc::Sender<Job<Writer>>,
    /// Sessions to admit, taken in turns with the other writes.
    admissions_tx: mpsc::Sender<admissions::Admit>,
    /// Lookups run on a read-only connection of their own, so that a flood
    /// of them (every well-formed credential costs one) never queues ahead
    /// of the meter's writes.
    reads_tx: mpsc::Sender<Job<Connection>>,
    cap: Option<room::Cap>,
    _checkpoints: checkpoint::Running,
}

/// The store's threads. Join them after every [`SqliteStore`] handle is
/// dropped to be sure the database was closed cleanly.
pub struct StoreThreads(Vec<thread::JoinHandle<()>>);

impl StoreThreads {
    pub fn join(self) {
        for handle in self.0 {
            if handle.join().is_err() {
                tracing::error!("a thread of the store panicked");
            }
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`, applies the
    /// schema to an empty one, and starts the writer and reader threads.
    pub fn open(path: &Path) -> anyhow::Result<(SqliteStore, StoreThreads)> {
        SqliteStore::open_capped(path, None)
    }

    /// As [`SqliteStore::open`], with the database capped at `max_bytes`
    /// (see [`room`]).
    pub fn open_capped(
        path: &Path,
        max_bytes: Option<u64>,
    ) -> anyhow::Result<(SqliteStore, StoreThreads)> {
        let cannot_open = || format!("cannot open the database {}", path.display());
        let mut conn = Connection::open(path).with_context(cannot_open)?;
        configure(&conn).context("cannot configure the database")?;
        migrate(&mut conn)?;
        let reader = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(cannot_open)?;
        reader.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))?;
        keep_plans(&reader)?;
        // Both connections get the cap, the reader too, though it never
        // writes: no connection of ours can grow the file. (The checkpoint
        // thread's only copies in pages the writer's transactions made.)
        let cap = max_bytes.map(|bytes| room::Cap::apply(&conn, bytes)).transpose()?;
        max_bytes.map(|bytes| room::Cap::apply(&reader, bytes)).transpose()?;

        let hooks = outbox::Hooks::load(&conn).context("cannot read the webhooks")?;
        let writer = Writer { conn, cap, segments: HashMap::new(), hooks, last_batch: None };
        let (meter_tx, meter_rx) = mpsc::channel(JOB_QUEUE);
        let (writes_tx, writes_rx) = mpsc::channel(JOB_QUEUE);
        let (admissions_tx, admissions_rx) = mpsc::channel(JOB_QUEUE);
        let queues = WriterQueues { meter_rx, admissions_rx, writes_rx };
        let write_thread = spawn_writer(writer, queues)?;
        let (reads_tx, read_thread) = spawn_thread("tollgate-store-reader", reader)?;
        let (_checkpoints, checkpoint_thread) = checkpoint::spawn(path, meter_tx.downgrade())?;
        let threads = StoreThreads(vec![write_thread, read_thread, checkpoint_thread]);
        let store = SqliteStore { writes_tx, meter_tx, admissions_tx, reads_tx, cap, _checkpoints };
        Ok((store, threads))
    }

    /// Runs `f` on the writer thread and waits for its answer.
    async fn write<R, F>(&self, f: F) -> StoreResult<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Writer) -> StoreResult<R> + Send + 'static,
    {
        run_on(&self.writes_tx, "writer", with_room(f)).await
    }

    /// As [`SqliteStore::write`], without the check for room below the cap:
    /// for the clean-up at start-up, which closes rows a previous run left
    /// and adds their last debits, and must not keep a server near its cap
    /// from starting. A write that needs more room than is left still
    /// fails, with SQLITE_FULL.
    async fn write_in_reserve<R, F>(&self, f: F) -> StoreResult<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Writer) -> StoreResult<R> + Send + 'static,
    {
        run_on(&self.writes_tx, "writer", f).await
    }

    /// As [`SqliteStore::write`], ahead of every other write.
    async fn write_first<R, F>(&self, f: F) -> StoreResult<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Writer) -> StoreResult<R> + Send + 'static,
    {
        run_on(&self.meter_tx, "meter", with_room(f)).await
    }

    /// Runs `f` on the reader thread and waits for its answer.
    async fn read<R, F>(&self, f: F) -> StoreResult<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<R> + Send + 'static,
    {
        run_on(&self.reads_tx, "reader", move |conn: &mut Connection| f(conn)).await
    }
}

/// A thread that runs the jobs sent to it on `state`, in order, until every
/// sender is gone.
fn spawn_thread<S: Send + 'static>(
    name: &str,
    mut state: S,
) -> anyhow::Result<(mpsc::Sender<Job<S>>, thread::JoinHandle<()>)> {
    let (jobs_tx, mut jobs_rx) = mpsc::channel::<Job<S>>(JOB_QUEUE);
    let handle = thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Some(job) = jobs_rx.blocking_recv() {
                job(&mut state);
            }
        })
        .with_context(|| format!("cannot start the thread {name}"))?;
    Ok((jobs_tx, handle))
}

/// `f`, once the database is seen to have room for what it writes.
fn with_room<R, F>(f: F) -> impl FnOnce(&mut Writer) -> StoreResult<R> + Send + 'static
where
    F: FnOnce(&mut Writer) -> StoreResult<R> + Send + 'static,
{
    move |w: &mut Writer| {
        room::check(w.cap, &w.conn)?;
        f(w)
    }
}

/// What the writer thread is fed.
struct WriterQueues {
    meter_rx: mpsc::Receiver<Job<Writer>>,
    admissions_rx: mpsc::Receiver<admissions::Admit>,
    writes_rx: mpsc::Receiver<Job<Writer>>,
}

/// The writer's next piece of work, by the queue it came from.
enum WriterWork {
    Meter(Job<Writer>),
    Admissions(admissions::Admit),
    Write(Job<Writer>),
}

/// The writer thread: runs the meter's jobs as soon as one is waiting, and
/// in between, in turns, the waiting admissions (together) and the other
/// writes (one at a time), until every sender is gone.
fn spawn_writer(
    mut writer: Writer,
    mut queues: WriterQueues,
) -> anyhow::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("tollgate-store-writer".into())
        .spawn(move || {
            let mut admissions_first = true;
            loop {
                let next = next_work(&mut queues, admissions_first);
                match futures::executor::block_on(next) {
                    Some(WriterWork::Meter(job)) => job(&mut writer),
                    Some(WriterWork::Admissions(first)) => {
                        let batch = admissions::gather(first, &mut queues.admissions_rx);
                        let Writer { conn, hooks, cap, .. } = &mut writer;
                        admissions::admit_all(conn, hooks, *cap, batch);
                        admissions_first = false;
                    }
                    Some(WriterWork::Write(job)) => {
                        job(&mut writer);
                        admissions_first = true;
                    }
                    None => break,
                }
            }
        })
        .context("cannot start the thread tollgate-store-writer")
}

/// The meter's next job if one is waiting; else the next admission or
/// other write, when both are waiting the kind not served last, so that
/// neither a flood of upgrades nor one of mints shuts the other out.
async fn next_work(queues: &mut WriterQueues, admissions_first: bool) -> Option<WriterWork> {
    let WriterQueues { meter_rx, admissions_rx, writes_rx } = queues;
    if admissions_first {
        tokio::select! {
            biased;
            Some(job) = meter_rx.recv() => Some(WriterWork::Meter(job)),
            Some(admit) = admissions_rx.recv() => Some(WriterWork::Admissions(admit)),
            Some(job) = writes_rx.recv() => Some(WriterWork::Write(job)),
            else => None,
        }
    } else {
        tokio::select! {
            biased;
            Some(job) = meter_rx.recv() => Some(WriterWork::Meter(job)),
            Some(job) = writes_rx.recv() => Some(WriterWork::Write(job)),
            Some(admit) = admissions_rx.recv() => Some(WriterWork::Admissions(admit)),
            else => None,
        }
    }
}

/// Sends `f` to a thread's queue, waiting for room, then for its answer.
async fn run_on<S, R, F>(
    jobs_tx: &mpsc::Sender<Job<S>>,
    thread: &'static str,
    f: F,
) -> StoreResult<R>
where
    R: Send + 'static,
    F: FnOnce(&mut S) -> StoreResult<R> + Send + 'static,
{
    let (reply_tx, reply_rx) = oneshot::channel();
    let job: Job<S> = Box::new(move |state| {
        let _ = reply_tx.send(f(state));
    });
    jobs_tx.send(job).await.map_err(|_| StoreError::Closed)?;
    let waiting = (jobs_tx.max_capacity() - jobs_tx.capacity()) as f64;
    metrics::gauge!(crate::metrics::STORE_QUEUE, "thread" => thread).set(waiting);
    reply_rx.await.map_err(|_| StoreError::Closed)?
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // WAL lets readers of the file (backups, an operator's shell) run
    // beside the writer. synchronous = NORMAL keeps every committed
    // transaction across a process crash; a power cut may lose the last
    // few, which FULL would keep at the cost of an fsync per transaction.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Checkpoints run on a thread of their own (see `checkpoint`), never
    // inside the writer's commits, and a log grown past its limit is cut
    // back when it starts again.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "journal_size_limit", checkpoint::LOG_SIZE_LIMIT_BYTES)?;
    keep_plans(conn)?;
    conn.busy_timeout(Duration::from_millis(BUSY_TIMEOUT_MS))
}

/// Keeps a cached statement's plan when its parameters change. The bundled
/// SQLite is built with STAT4, whose planner may choose a plan by the
/// values bound; a statement it planned that way is compiled again from
/// its text each time they change, and most of ours are run with new
/// values every time. The token lookup of every upgrade (a join) was
/// compiled anew on each call: three quarters of its cost. The database
/// has no statistics for the planner to use, so nothing is lost.
fn keep_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map(|_| ())
}

/// Applies the schema to an empty database, or brings an existing one up
/// to this build's version.
fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let exists: bool = conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'schema_version')",
        [],
        |row| row.get(0),
    )?;
    if !exists {
        return apply(conn, SCHEMA, SCHEMA_VERSION).context("cannot apply schema.sql");
    }
    let version: Option<i64> = conn
        .query_row("SELECT MAX(version) FROM schema_version", [], |row| row.get(0))
        .optional()?
        .flatten();
    let Some(version) = version else {
        anyhow::bail!("the database has a schema_version table with no version in it");
    };
    if version > SCHEMA_VERSION {
        anyhow::bail!(
            "the database has schema version {version}, and this build of Tollgate only knows \
             versions up to {SCHEMA_VERSION}"
        );
    }
    for &(target, script) in UPGRADES.iter().filter(|(target, _)| *target > version) {
        apply(conn, script, target)
            .with_context(|| format!("cannot upgrade the database to schema version {target}"))?;
        tracing::info!(version = target, "database schema upgraded");
    }
    Ok(())
}

/// Runs a schema script and records the version it reaches, in one
/// transaction.
fn apply(conn: &mut Connection, script: &str, version: i64) -> anyhow::Result<()> {
    let tx = write_transaction(conn)?;
    tx.execute_batch(script)?;
    tx.execute(
        "INSERT INTO schema_version (version, applied_at) VALUES (?1, ?2)",
        params![version, crate::clock::now_millis()],
    )?;
    tx.commit()?;
    Ok(())
}

/// Starts a transaction that takes the write lock at once. A deferred one
/// that reads first and writes later cannot wait for a lock another
/// process holds (SQLite answers busy at once), so every transaction here
/// that writes begins immediate and waits up to the busy timeout instead.
fn write_transaction(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        match error.sqlite_error_code() {
            Some(
                ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
                | ErrorCode::SystemIoFailure,
            ) => StoreError::Unavailable(error.to_string()),
            Some(ErrorCode::DiskFull) => StoreError::Full,
            _ => StoreError::Other(error.to_string()),
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        let cap = self.cap;
        self.read(move |conn| {
            conn.query_row("SELECT 1", [], |_| Ok(()))?;
            room::check(cap, conn)
        })
        .await
    }

    async fn add_api_key(&self, project: &str, key: SecretHash) -> StoreResult<()> {
        let project = project.to_owned();
        self.write(move |w| accounts::add_api_key(&mut w.conn, &project, key)).await
    }

    async fn revoke_api_key(&self, key: SecretHash) -> StoreResult<bool> {
        let now = crate::clock::now_millis();
        self.write(move |w| accounts::revoke_api_key(&w.conn, key, now)).await
    }

    async fn has_projects(&self) -> StoreResult<bool> {
        self.read(accounts::has_projects).await
    }

    async fn find_api_key(&self, key: SecretHash) -> StoreResult<Option<ApiKeyRecord>> {
        self.read(move |conn| accounts::find_api_key(conn, key)).await
    }

    async fn find_usage_token(&self, token: SecretHash) -> StoreResult<Option<UsageTokenRecord>> {
        self.read(move |conn| accounts::find_usage_token(conn, token)).await
    }

    async fn find_human(&self, project: ProjectId, name: &str) -> StoreResult<Option<Human>> {
        let name = name.to_owned();
        self.read(move |conn| accounts::find_human(conn, project, &name)).await
    }

    async fn find_or_create_human(&self, project: ProjectId, name: &str) -> StoreResult<Human> {
        let name = name.to_owned();
        let now = crate::clock::now_millis();
        self.write(move |w| accounts::find_or_create_human(&w.conn, project, &name, now)).await
    }

    async fn mint_token(&self, request: MintRequest) -> StoreResult<Vec<Limit>> {
        self.write(move |w| accounts::mint_token(&mut w.conn, &w.hooks, request)).await
    }

    async fn limits(&self, human: HumanId) -> StoreResult<Vec<Limit>> {
        self.read(move |conn| accounts::limits(conn, human)).await
    }

    async fn change_limits(
        &self,
        project: ProjectId,
        human: &str,
        changes: Vec<Limit>,
        mode: ChangeMode,
        now: UnixMillis,
    ) -> StoreResult<Vec<Limit>> {
        let human = human.to_owned();
        self.write(move |w| {
            let tx = write_transaction(&mut w.conn)?;
            let found = accounts::find_or_create_human(&tx, project, &human, now)?;
            accounts::apply_limits(&tx, &w.hooks, found.id, &changes, mode, now)?;
            let after = accounts::limits(&tx, found.id)?;
            tx.commit()?;
            Ok(after)
        })
        .await
    }

    async fn revoke(
        &self,
        project: ProjectId,
        human: &str,
        now: UnixMillis,
    ) -> StoreResult<Option<u64>> {
        let human = human.to_owned();
        self.write(move |w| accounts::revoke(&mut w.conn, &w.hooks, project, &human, now)).await
    }

    async fn newest_live_token(
        &self,
        project: ProjectId,
        human: &str,
        now: UnixMillis,
    ) -> StoreResult<Option<UnixMillis>> {
        let human = human.to_owned();
        self.read(move |conn| accounts::newest_live_token(conn, project, &human, now)).await
    }

    async fn set_token_expiry(
        &self,
        project: ProjectId,
        human: &str,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<u64> {
        let human = human.to_owned();
        self.write(move |w| accounts::set_token_expiry(&w.conn, project, &human, now, expires_at))
            .await
    }

    async fn open_session(&self, session: NewSession) -> StoreResult<Admission> {
        let (reply, answer) = oneshot::channel();
        let admit = admissions::Admit { session, reply };
        self.admissions_tx.send(admit).await.map_err(|_| StoreError::Closed)?;
        let tx = &self.admissions_tx;
        let waiting = (tx.max_capacity() - tx.capacity()) as f64;
        metrics::gauge!(crate::metrics::STORE_QUEUE, "thread" => "admissions").set(waiting);
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn record_usage(&self, batch: UsageBatch, now: UnixMillis) -> StoreResult<UsageRecorded> {
        self.write_first(move |w| usage::record(w, batch, now)).await
    }

    async fn close_abandoned_sessions(&self) -> StoreResult<u64> {
        self.write_in_reserve(usage::close_abandoned).await
    }

    async fn start_completion(
        &self,
        completion: NewCompletion,
    ) -> StoreResult<CompletionAdmission> {
        self.write(move |w| completions::start(&mut w.conn, completion)).await
    }

    async fn end_completion(&self, end: CompletionEnd) -> StoreResult<Option<i64>> {
        self.write(move |w| completions::end(&mut w.conn, &w.hooks, end)).await
    }

    async fn close_abandoned_completions(&self, now: UnixMillis) -> StoreResult<u64> {
        let close = move |w: &mut Writer| completions::close_abandoned(&mut w.conn, &w.hooks, now);
        self.write_in_reserve(close).await
    }

    async fn report_usage(&self, report: NewReport) -> StoreResult<ReportOutcome> {
        self.write(move |w| reports::record(&mut w.conn, &w.hooks, report)).await
    }

    async fn set_webhook(&self, change: WebhookChange) -> StoreResult<(Webhook, bool)> {
        self.write(move |w| webhooks::set(w, change)).await
    }

    async fn webhook(&self, project: ProjectId) -> StoreResult<Option<Webhook>> {
        self.read(move |conn| webhooks::get(conn, project)).await
    }

    async fn delete_webhook(&self, project: ProjectId) -> StoreResult<bool> {
        self.write(move |w| webhooks::delete(w, project)).await
    }

    async fn rotate_webhook_secret(
        &self,
        project: ProjectId,
        secret: String,
        previous_until: UnixMillis,
        now: UnixMillis,
    ) -> StoreResult<bool> {
        self.write(move |w| webhooks::rotate(&mut w.conn, project, secret, previous_until, now))
            .await
    }

    async fn due_events(
        &self,
        now: UnixMillis,
        busy: Vec<i64>,
        per_project: u32,
        limit: u32,
    ) -> StoreResult<Vec<DueEvent>> {
        self.read(move |conn| webhooks::due(conn, now, &busy, per_project, limit)).await
    }

    async fn record_attempt(
        &self,
        seq: i64,
        outcome: AttemptOutcome,
        now: UnixMillis,
    ) -> StoreResult<()> {
        self.write(move |w| webhooks::record_attempt(&w.conn, seq, outcome, now)).await
    }

    async fn deliveries(
        &self,
        project: ProjectId,
        status: Option<DeliveryStatus>,
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<Delivery>> {
        self.read(move |conn| webhooks::list(conn, project, status, after, limit)).await
    }

    async fn retry_delivery(
        &self,
        project: ProjectId,
        id: &str,
        now: UnixMillis,
    ) -> StoreResult<Option<Delivery>> {
        let id = id.to_owned();
        self.write(move |w| webhooks::retry(&w.conn, project, &id, now)).await
    }

    async fn ledger(
        &self,
        filter: LedgerFilter,
        page: Page<i64>,
    ) -> StoreResult<Listing<LedgerRow>> {
        self.read(move |conn| listings::ledger(conn, filter, page)).await
    }

    async fn sessions(
        &self,
        filter: SessionFilter,
        page: Page<String>,
    ) -> StoreResult<Option<Listing<SessionRow>>> {
        self.read(move |conn| listings::sessions(conn, filter, page)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_join_looked_up_with_new_values_is_not_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let conn = Connection::open(dir.path().join("t.db")).unwrap();
        configure(&conn).unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let lookup = "SELECT h.id FROM usage_tokens t JOIN humans h ON h.id = t.human_id
                      WHERE t.token_hash = ?1";
        for byte in 0..10u8 {
            let mut stmt = conn.prepare_cached(lookup).unwrap();
            stmt.query_row([[byte; 32].as_slice()], |row| row.get::<_, i64>(0)).optional().unwrap();
        }
        let stmt = conn.prepare_cached(lookup).unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0);
    }

    fn version_of(path: &Path) -> i64 {
        let conn = Connection::open(path).unwrap();
        conn.query_row("SELECT MAX(version) FROM schema_version", [], |row| row.get(0)).unwrap()
    }

    #[test]
    fn a_new_database_gets_the_schema_its_version_and_wal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, threads) = SqliteStore::open(&path).unwrap();
        drop(store);
        threads.join();

        assert_eq!(version_of(&path), SCHEMA_VERSION);
        let conn = Connection::open(&path).unwrap();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0)).unwrap();
        assert_eq!(mode, "wal");

        // Opening it again keeps what is there.
        let (store, threads) = SqliteStore::open(&path).unwrap();
        drop(store);
        threads.join();
        let versions: i64 =
            conn.query_row("SELECT COUNT(*) FROM schema_version", [], |row| row.get(0)).unwrap();
        assert_eq!(versions, 1);
    }

    #[tokio::test]
    async fn the_log_is_copied_back_by_the_checkpoint_thread_and_never_by_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, threads) = SqliteStore::open(&path).unwrap();
        let pragma = |name: &'static str| {
            store.write(move |w| {
                Ok(w.conn.pragma_query_value(None, name, |r| r.get::<_, i64>(0))?)
            })
        };
        assert_eq!(pragma("wal_autocheckpoint").await.unwrap(), 0);
        let limit = pragma("journal_size_limit").await.unwrap();
        assert_eq!(limit, checkpoint::LOG_SIZE_LIMIT_BYTES, "the log's file is never cut back");

        // 200 commits of a few pages each: below the 1,000 pages of log at
        // which a commit would checkpoint were it left to, so only the
        // thread copies them back.
        let size = || std::fs::metadata(&path).unwrap().len();
        let before = size();
        for _ in 0..200 {
            let key = crate::secret::Secret::generate(crate::secret::SecretKind::ApiKey);
            store.add_api_key("acme", key.hash()).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while size() <= before {
            assert!(std::time::Instant::now() < deadline, "the log was never checkpointed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(store);
        threads.join();
    }

    #[test]
    fn a_database_from_a_newer_build_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, threads) = SqliteStore::open(&path).unwrap();
        drop(store);
        threads.join();
        let conn = Connection::open(&path).unwrap();
        conn.execute("INSERT INTO schema_version VALUES (?1, 0)", [SCHEMA_VERSION + 1]).unwrap();

        let error = SqliteStore::open(&path).err().expect("a newer schema is refused");
        let expected = format!("schema version {}", SCHEMA_VERSION + 1);
        assert!(error.to_string().contains(&expected), "{error}");
    }

    /// Every table's columns and every index, as SQLite reports them.
    fn shape_of(path: &Path) -> Vec<String> {
        let conn = Connection::open(path).unwrap();
        let mut names: Vec<(String, String)> = conn
            .prepare("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")
            .unwrap()
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        names.sort();
        let mut shape = Vec::new();
        for (kind, name) in names {
            shape.push(format!("{kind} {name}"));
            let pragma = if kind == "table" { "table_info" } else { "index_info" };
            let mut stmt = conn.prepare(&format!("SELECT * FROM pragma_{pragma}(?1)")).unwrap();
            let columns = stmt.column_count();
            let rows = stmt
                .query_map([&name], |row| {
                    let values: Vec<String> =
                        (0..columns).map(|i| format!("{:?}", row.get_ref(i).unwrap())).collect();
                    Ok(values.join(" "))
                })
                .unwrap();
            shape.extend(rows.map(Result::unwrap));
        }
        shape
    }

    #[test]
    fn a_version_1_database_is_upgraded_to_what_a_new_one_gets_keeping_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.db");
        let conn = Connection::open(&old).unwrap();
        conn.execute_batch(include_str!("upgrades/schema_1.sql")).unwrap();
        conn.execute_batch(
            "INSERT INTO schema_version VALUES (1, 0);
             INSERT INTO projects VALUES (1, 'p', 0);
             INSERT INTO humans (id, project_id, external_id, created_at) VALUES (1, 1, 'h', 0);
             INSERT INTO limits VALUES (1, 'token_cnt', 50, 1, 0);
             INSERT INTO ledger (human_id, limit_type, entry, amount, created_at, updated_at)
                 VALUES (1, 'token_cnt', 'grant', 50, 0, 0);",
        )
        .unwrap();
        drop(conn);

        let (store, threads) = SqliteStore::open(&old).unwrap();
        drop(store);
        threads.join();
        let new = dir.path().join("new.db");
        let (store, threads) = SqliteStore::open(&new).unwrap();
        drop(store);
        threads.join();

        assert_eq!(version_of(&old), SCHEMA_VERSION);
        assert_eq!(shape_of(&old), shape_of(&new));
        let conn = Connection::open(&old).unwrap();
        let balance: i64 =
            conn.query_row("SELECT balance FROM limits", [], |row| row.get(0)).unwrap();
        assert_eq!(balance, 50);
    }
}
