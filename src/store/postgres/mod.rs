//! The PostgreSQL backend: a pool of connections (deadpool) on which every
//! method runs its statements, a transaction where it changes more than one
//! row, and a small pool of the meter's own, over TLS as the URL's
//! `sslmode` asks for it ([`tls`]). The schema
//! (`schema.postgres.sql`) is applied here when the store is opened, and
//! database errors become [`StoreError`]s here, in one place.
//!
//! Transactions run at PostgreSQL's default isolation, read committed, and
//! take row locks where two of them could otherwise both act on what they
//! read: a pool's row is locked (`FOR NO KEY UPDATE`) before it is charged,
//! granted or held against, and a human's row before a session of theirs
//! is admitted. Pools are locked in the order of human and limit type's
//! name, so that two transactions locking the same pools wait for each
//! other rather than deadlock. Balances change only by statements such as
//! `balance = balance - $n` that return the new value, with the amount cut
//! to what remains by the database where a cut applies.
//!
//! A connection the server drops (a restart of PostgreSQL, a terminated
//! backend) fails the calls that were using it, and any that take it from
//! the pool before the pool has seen it close, as unavailable: the meter
//! then closes its sessions with 1011, as it does when SQLite is locked.
//! Nothing retries them on a new connection yet.
//!
//! Every call is bounded on this side too ([`CALL_LIMIT`]), since a server
//! that does not run at all (stopped, or out of reach) never cancels its
//! own statements: the call fails as unavailable and its connection is
//! closed, not given back to the pool.
//!
//! Any number of servers may share one database. Each run of a server
//! joins it as an instance ([`instances`]), whose meter tells the others
//! it is alive at every tick; the others close out its sessions once it
//! falls silent.

mod accounts;
mod completions;
mod instances;
mod listings;
mod outbox;
mod query;
mod reports;
pub mod tls;
mod usage;
mod webhooks;

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use tokio_postgres::Config;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

use self::instances::Instance;
use super::{
    Admission, ApiKeyRecord, AttemptOutcome, CompletionAdmission, CompletionEnd, Delivery,
    DeliveryStatus, DueEvent, Human, HumanId, LedgerFilter, LedgerRow, Listing, MintRequest,
    NewCompletion, NewReport, NewSession, Page, ProjectId, ReportOutcome, SessionFilter,
    SessionRow, Store, StoreError, StoreResult, UnixMillis, UsageBatch, UsageRecorded,
    UsageTokenRecord, Webhook, WebhookChange,
};
use crate::limits::{ChangeMode, Limit};
use crate::secret::SecretHash;

const SCHEMA: &str = include_str!("../../../schema.postgres.sql");

/// Connections the pool keeps at most, for HTTP handlers, admissions and
/// the webhook dispatcher. Callers past this wait up to [`POOL_WAIT`] for a
/// connection.
const POOL_SIZE: usize = 16;

/// Connections the meter's own pool keeps at most. The meter commits one
/// transaction at a time; the second serves the clean-up at start-up. A
/// pool of its own means a burst of handlers never keeps the meter from a
/// connection, which would close every session after [`POOL_WAIT`] (on
/// SQLite the meter's commits have a queue of their own for the same
/// reason).
const METER_POOL_SIZE: usize = 2;

/// How long a caller waits for a free connection, or for a new one to be
/// made, before the store counts as unavailable. Failing makes the meter
/// close its sessions rather than meter blind, so the wait is short.
const POOL_WAIT: Duration = Duration::from_secs(2);

/// How long one statement may run, and wait for a lock, before PostgreSQL
/// cancels it: a stuck database fails the call (unavailable) instead of
/// holding the meter's commit for ever.
const STATEMENT_TIMEOUT_MS: u64 = 5000;

/// How long one call of the store may take, from its first statement to
/// its commit, before it fails as unavailable on this side whatever the
/// server does: a statement's own timeout and a second more. PostgreSQL's
/// statement timeout does nothing for a server that does not run at all
/// (stopped, or cut off by the network), and the meter, the admissions
/// and `/healthz` would otherwise wait on it for ever.
const CALL_LIMIT: Duration = Duration::from_millis(STATEMENT_TIMEOUT_MS + 1000);

/// How long the clean-up at start-up of what a crashed run left open may
/// take: one transaction over every such session or completion, which may
/// be many, and a server that cannot finish it does not start.
const CLEANUP_LIMIT: Duration = Duration::from_secs(120);

/// The advisory lock key that serialises schema changes between servers
/// starting at once: the text "tollgate" read as a number.
const SCHEMA_LOCK: i64 = 0x746f_6c6c_6761_7465;

/// The version of schema.postgres.sql, recorded in `schema_version`. The
/// first PostgreSQL schema was SQLite's version 4 (`SCHEMA_VERSION` in
/// src/store/sqlite/mod.rs); version 5 added what several servers sharing
/// a database need, and is PostgreSQL's alone.
pub const POSTGRES_SCHEMA_VERSION: i64 = 5;

/// Where the part of the schema added by version 5 starts (see
/// schema.postgres.sql's opening comment).
const ADDED_BY_5: &str = "-- Added by version 5.";

/// A handle on the pools; cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// The meter's: see [`METER_POOL_SIZE`].
    meter_pool: Pool,
    /// This server's run, once it has joined ([`PostgresStore::join`]).
    /// A store with none (a command of the command line) records sessions
    /// and completions that no run owns, and no meter's heartbeat.
    instance: Option<Instance>,
}

impl PostgresStore {
    /// Connects to the database `url` names and applies the schema to an
    /// empty one. The URL is never logged or put in an error: it may hold
    /// a password.
    pub async fn open(url: &str) -> anyhow::Result<PostgresStore> {
        let (config, tls) = connection_config(url)?;
        let pool = pool_of(config.clone(), tls.clone(), POOL_SIZE)?;
        let meter_pool = pool_of(config, tls, METER_POOL_SIZE)?;
        let store = PostgresStore { pool, meter_pool, instance: None };
        let mut client = store.pool.get().await.context("cannot connect to PostgreSQL")?;
        let migrating = tokio::time::timeout(CALL_LIMIT * 4, migrate(&mut client));
        migrating.await.context("PostgreSQL did not answer while the schema was checked")??;
        Ok(store)
    }
}

/// A pool of at most `size` connections made with `config` and `tls`.
fn pool_of(config: Config, tls: MakeRustlsConnect, size: usize) -> anyhow::Result<Pool> {
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig { recycling_method: RecyclingMethod::Fast },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(POOL_WAIT))
        .recycle_timeout(Some(POOL_WAIT))
        .build()
        .context("cannot set up the PostgreSQL connection pool")
}

/// Runs `$body` with `$client`, a connection from `$pool`, for at most
/// [`CALL_LIMIT`]. A call that runs out fails as unavailable, and its
/// connection is closed rather than given back to the pool: whatever the
/// connection was waiting for (a frozen server, a lost network) the next
/// caller would wait for too.
macro_rules! bounded {
    ($pool:expr, |$client:ident| $body:expr) => {
        bounded!($pool, CALL_LIMIT, |$client| $body)
    };
    ($pool:expr, $limit:expr, |$client:ident| $body:expr) => {{
        #[allow(unused_mut)]
        let mut $client = $pool.get().await?;
        let outcome = tokio::time::timeout($limit, async { $body }).await;
        settle($client, outcome, $limit)
    }};
}

/// What a bounded call gives its caller; see [`bounded`].
fn settle<T>(
    client: deadpool_postgres::Client,
    outcome: Result<StoreResult<T>, tokio::time::error::Elapsed>,
    limit: Duration,
) -> StoreResult<T> {
    match outcome {
        Ok(result) => result,
        Err(_) => {
            drop(deadpool_postgres::Object::take(client));
            let limit = limit.as_millis();
            Err(StoreError::Unavailable(format!("PostgreSQL did not answer within {limit} ms")))
        }
    }
}

impl PostgresStore {
    /// The same store, as a new run of a server metering every `tick`
    /// beside any others on the database (see `instances` in
    /// schema.postgres.sql).
    pub async fn join(self, tick: Duration) -> StoreResult<PostgresStore> {
        let now = crate::clock::now_millis();
        let instance = bounded!(&self.pool, |client| instances::join(&client, tick, now).await)?;
        tracing::info!(instance = instance.id, "joined the database as a new instance");
        Ok(PostgresStore { instance: Some(instance), ..self })
    }
}

/// The connection settings of `url`, with the timeouts above, and the TLS
/// its `sslmode` asks for (see [`tls`]).
fn connection_config(url: &str) -> anyhow::Result<(Config, MakeRustlsConnect)> {
    let (rest, tls) = tls::split(url).map_err(anyhow::Error::msg)?;
    let mut config: Config =
        rest.parse().context("the PostgreSQL URL is not a valid connection string")?;
    config.ssl_mode(tls.negotiation());
    config.connect_timeout(POOL_WAIT);
    // A connection whose peer stops answering at the TCP level (a lost
    // network, a host gone) is closed by the kernel instead of lingering.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    config.keepalives_interval(Duration::from_secs(5));
    config.keepalives_retries(3);
    config.tcp_user_timeout(CALL_LIMIT);
    config.application_name("tollgate");
    let options = with_timeouts(config.get_options());
    config.options(options);
    Ok((config, tls.connector()?))
}

/// The URL's own `options` (settings the server is to take, `-c name=value`
/// each), with the timeouts above after them. Where the URL sets one of
/// the two timeouts too, ours is the one PostgreSQL takes: [`CALL_LIMIT`]
/// is worked out from it.
fn with_timeouts(options: Option<&str>) -> String {
    let ours = format!(
        "-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={STATEMENT_TIMEOUT_MS}"
    );
    match options.map(str::trim).filter(|options| !options.is_empty()) {
        Some(theirs) => format!("{theirs} {ours}"),
        None => ours,
    }
}

/// Applies the schema to an empty database, in one transaction that holds
/// an advisory lock, so that a second server starting at the same moment
/// waits and then finds the schema there; brings a database of version 4 to
/// version 5. A database of another version is refused.
async fn migrate(client: &mut tokio_postgres::Client) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK]).await?;
    let exists: bool =
        tx.query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[]).await?.get(0);
    if !exists {
        tx.batch_execute(SCHEMA).await.context("cannot apply schema.postgres.sql")?;
        tx.execute(
            "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
            &[&POSTGRES_SCHEMA_VERSION, &crate::clock::now_millis()],
        )
        .await?;
        tx.commit().await?;
        return Ok(());
    }
    let version: Option<i64> =
        tx.query_one("SELECT MAX(version) FROM schema_version", &[]).await?.get(0);
    match version {
        Some(POSTGRES_SCHEMA_VERSION) => Ok(()),
        Some(4) => upgrade_to_5(tx).await,
        None => anyhow::bail!("the database has a schema_version table with no version in it"),
        Some(version) => anyhow::bail!(
            "the database has schema version {version}, and this build of Tollgate only \
             knows versions 4 and {POSTGRES_SCHEMA_VERSION} on PostgreSQL"
        ),
    }
}

/// Brings a database of version 4 to version 5 (the part of
/// schema.postgres.sql after [`ADDED_BY_5`]), within `tx`, which holds the
/// schema's lock. A server of an older build, which meters alone, must not
/// go on beside this one's: recording version 5 keeps it from starting
/// again, and clearing `meter_clock.owner`, which every usage commit of a
/// running one checks, stops it at its next tick.
async fn upgrade_to_5(tx: tokio_postgres::Transaction<'_>) -> anyhow::Result<()> {
    let added = SCHEMA.split_once(ADDED_BY_5).map(|(_, added)| added);
    let added = added.context("schema.postgres.sql has no part added by version 5")?;
    tx.batch_execute(added).await.context("cannot bring the schema to version 5")?;
    tx.execute("UPDATE meter_clock SET owner = NULL", &[]).await?;
    tx.execute(
        "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
        &[&POSTGRES_SCHEMA_VERSION, &crate::clock::now_millis()],
    )
    .await?;
    tx.commit().await?;
    tracing::warn!(
        "brought the PostgreSQL schema to version 5; servers of older builds on this database \
         stop at their next tick and cannot start again"
    );
    Ok(())
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> StoreError {
        let Some(code) = error.code() else {
            // No SQLSTATE: the connection failed or closed, or else this
            // side found the answer wrong (no row where one was expected, a
            // value of another type), which waiting will not mend.
            return if connection_lost(&error) {
                StoreError::Unavailable(error.to_string())
            } else {
                StoreError::Other(error.to_string())
            };
        };
        if *code == SqlState::IN_FAILED_SQL_TRANSACTION {
            return StoreError::Other(ABORTED.to_owned());
        }
        let text = match error.as_db_error() {
            Some(db) => db.message().to_owned(),
            None => error.to_string(),
        };
        if *code == SqlState::DISK_FULL {
            return StoreError::Full;
        }
        let class = &code.code()[..2];
        let transient = [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::QUERY_CANCELED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::READ_ONLY_SQL_TRANSACTION,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ];
        // 08: connection exceptions; 53: out of resources (memory,
        // connections).
        if class == "08" || class == "53" || transient.contains(code) {
            return StoreError::Unavailable(text);
        }
        StoreError::Other(text)
    }
}

/// What a statement fails with when an earlier one of its transaction
/// failed (SQLSTATE 25P02): of statements pipelined together, the error to
/// report is another one (see [`first_cause`]).
const ABORTED: &str = "an earlier statement of the transaction failed";

/// Of the errors of statements pipelined in one transaction, the one that
/// caused the others, rather than one that only says the transaction had
/// already failed.
pub(super) fn first_cause(errors: Vec<StoreError>) -> Option<StoreError> {
    let aborted = |error: &StoreError| matches!(error, StoreError::Other(text) if text == ABORTED);
    let (mut aborted, mut causes): (Vec<_>, Vec<_>) = errors.into_iter().partition(aborted);
    (!causes.is_empty()).then(|| causes.remove(0)).or_else(|| aborted.pop())
}

/// Whether `error` is the connection's: closed, or an I/O error on it.
fn connection_lost(error: &tokio_postgres::Error) -> bool {
    let io = std::error::Error::source(error).is_some_and(|cause| cause.is::<std::io::Error>());
    error.is_closed() || io
}

/// Answers when the database the connection is on takes writes: not when
/// every transaction there is read-only (a hot standby, or
/// `default_transaction_read_only`), where each write of the meter would
/// fail. As SQLite's ping fails on a read-only file.
async fn writable(client: &deadpool_postgres::Client) -> StoreResult<()> {
    let sql = "SELECT current_setting('transaction_read_only') = 'on'";
    let read_only: bool = client.query_one(sql, &[]).await?.get(0);
    if read_only {
        return Err(StoreError::Unavailable("the database is read-only".into()));
    }
    Ok(())
}

/// No connection could be had: the pool's wait ran out, or a new
/// connection failed, whatever the server answered (refused, unknown
/// database, not accepting connections, bad credentials). Each of these may
/// pass, and none lets anything be written meanwhile.
impl From<PoolError> for StoreError {
    fn from(error: PoolError) -> StoreError {
        match error {
            PoolError::Backend(error) => match error.as_db_error() {
                Some(db) => StoreError::Unavailable(db.message().to_owned()),
                None => StoreError::Unavailable(error.to_string()),
            },
            other => StoreError::Unavailable(other.to_string()),
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn ping(&self) -> StoreResult<()> {
        bounded!(&self.pool, |client| writable(&client).await)
    }

    fn is_shared(&self) -> bool {
        self.instance.is_some()
    }

    async fn close_out_lost(&self) -> StoreResult<(u64, u64)> {
        let Some(instance) = self.instance else {
            return Ok((0, 0));
        };
        let now = crate::clock::now_millis();
        // On the shared pool, not the meter's: a close-out may take a while
        // and nothing waits on it.
        bounded!(&self.pool, CLEANUP_LIMIT, |client| {
            instances::close_out_lost(&mut client, instance, now).await
        })
    }

    async fn leave(&self) -> StoreResult<()> {
        let Some(instance) = self.instance else {
            return Ok(());
        };
        bounded!(&self.pool, |client| instances::leave(&mut client, instance).await)
    }

    async fn add_api_key(&self, project: &str, key: SecretHash) -> StoreResult<()> {
        bounded!(&self.pool, |client| accounts::add_api_key(&mut client, project, key).await)
    }

    async fn revoke_api_key(&self, key: SecretHash) -> StoreResult<bool> {
        let now = crate::clock::now_millis();
        bounded!(&self.pool, |client| accounts::revoke_api_key(&client, key, now).await)
    }

    async fn has_projects(&self) -> StoreResult<bool> {
        bounded!(&self.pool, |client| accounts::has_projects(&client).await)
    }

    async fn find_api_key(&self, key: SecretHash) -> StoreResult<Option<ApiKeyRecord>> {
        bounded!(&self.pool, |client| accounts::find_api_key(&client, key).await)
    }

    async fn find_usage_token(&self, token: SecretHash) -> StoreResult<Option<UsageTokenRecord>> {
        bounded!(&self.pool, |client| accounts::find_usage_token(&client, token).await)
    }

    async fn find_human(&self, project: ProjectId, name: &str) -> StoreResult<Option<Human>> {
        bounded!(&self.pool, |client| accounts::find_human(&client, project, name).await)
    }

    async fn find_or_create_human(&self, project: ProjectId, name: &str) -> StoreResult<Human> {
        let now = crate::clock::now_millis();
        bounded!(&self.pool, |client| accounts::find_or_create_human(&client, project, name, now)
            .await)
    }

    async fn mint_token(&self, request: MintRequest) -> StoreResult<Vec<Limit>> {
        bounded!(&self.pool, |client| accounts::mint_token(&mut client, request).await)
    }

    async fn limits(&self, human: HumanId) -> StoreResult<Vec<Limit>> {
        bounded!(&self.pool, |client| accounts::limits(&client, human).await)
    }

    async fn change_limits(
        &self,
        project: ProjectId,
        human: &str,
        changes: Vec<Limit>,
        mode: ChangeMode,
        now: UnixMillis,
    ) -> StoreResult<Vec<Limit>> {
        bounded!(&self.pool, |client| {
            let tx = client.transaction().await?;
            let found = accounts::find_or_create_human(&tx, project, human, now).await?;
            accounts::apply_limits(&tx, found.id, &changes, mode, now).await?;
            let after = accounts::limits(&tx, found.id).await?;
            tx.commit().await?;
            Ok(after)
        })
    }

    async fn revoke(
        &self,
        project: ProjectId,
        human: &str,
        now: UnixMillis,
    ) -> StoreResult<Option<u64>> {
        bounded!(&self.pool, |client| accounts::revoke(&mut client, project, human, now).await)
    }

    async fn newest_live_token(
        &self,
        project: ProjectId,
        human: &str,
        now: UnixMillis,
    ) -> StoreResult<Option<UnixMillis>> {
        bounded!(&self.pool, |client| accounts::newest_live_token(&client, project, human, now)
            .await)
    }

    async fn set_token_expiry(
        &self,
        project: ProjectId,
        human: &str,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> StoreResult<u64> {
        bounded!(&self.pool, |client| {
            accounts::set_token_expiry(&client, project, human, now, expires_at).await
        })
    }

    async fn open_session(&self, session: NewSession) -> StoreResult<Admission> {
        let instance = self.instance;
        bounded!(&self.pool, |client| usage::open_session(&mut client, session, instance).await)
    }

    async fn record_usage(&self, batch: UsageBatch, now: UnixMillis) -> StoreResult<UsageRecorded> {
        let instance = self.instance;
        bounded!(&self.meter_pool, |client| usage::record(&mut client, batch, now, instance).await)
    }

    async fn close_abandoned_sessions(&self) -> StoreResult<u64> {
        bounded!(&self.meter_pool, CLEANUP_LIMIT, |client| usage::close_abandoned(&mut client)
            .await)
    }

    async fn start_completion(
        &self,
        completion: NewCompletion,
    ) -> StoreResult<CompletionAdmission> {
        let instance = self.instance;
        bounded!(&self.pool, |client| completions::start(&mut client, completion, instance).await)
    }

    async fn end_completion(&self, end: CompletionEnd) -> StoreResult<Option<i64>> {
        bounded!(&self.pool, |client| completions::end(&mut client, end).await)
    }

    async fn close_abandoned_completions(&self, now: UnixMillis) -> StoreResult<u64> {
        bounded!(&self.meter_pool, CLEANUP_LIMIT, |client| completions::close_abandoned(
            &mut client,
            now
        )
        .await)
    }

    async fn report_usage(&self, report: NewReport) -> StoreResult<ReportOutcome> {
        bounded!(&self.pool, |client| reports::record(&mut client, report).await)
    }

    async fn set_webhook(&self, change: WebhookChange) -> StoreResult<(Webhook, bool)> {
        bounded!(&self.pool, |client| webhooks::set(&mut client, change).await)
    }

    async fn webhook(&self, project: ProjectId) -> StoreResult<Option<Webhook>> {
        bounded!(&self.pool, |client| webhooks::get(&client, project).await)
    }

    async fn delete_webhook(&self, project: ProjectId) -> StoreResult<bool> {
        bounded!(&self.pool, |client| webhooks::delete(&mut client, project).await)
    }

    async fn rotate_webhook_secret(
        &self,
        project: ProjectId,
        secret: String,
        previous_until: UnixMillis,
        now: UnixMillis,
    ) -> StoreResult<bool> {
        bounded!(&self.pool, |client| {
            webhooks::rotate(&client, project, &secret, previous_until, now).await
        })
    }

    async fn due_events(
        &self,
        now: UnixMillis,
        busy: Vec<i64>,
        per_project: u32,
        limit: u32,
    ) -> StoreResult<Vec<DueEvent>> {
        bounded!(&self.pool, |client| webhooks::due(&client, now, &busy, per_project, limit).await)
    }

    async fn record_attempt(
        &self,
        seq: i64,
        outcome: AttemptOutcome,
        now: UnixMillis,
    ) -> StoreResult<()> {
        bounded!(&self.pool, |client| webhooks::record_attempt(&client, seq, outcome, now).await)
    }

    async fn deliveries(
        &self,
        project: ProjectId,
        status: Option<DeliveryStatus>,
        after: Option<i64>,
        limit: u32,
    ) -> StoreResult<Vec<Delivery>> {
        bounded!(&self.pool, |client| webhooks::list(&client, project, status, after, limit).await)
    }

    async fn retry_delivery(
        &self,
        project: ProjectId,
        id: &str,
        now: UnixMillis,
    ) -> StoreResult<Option<Delivery>> {
        bounded!(&self.pool, |client| webhooks::retry(&client, project, id, now).await)
    }

    async fn ledger(
        &self,
        filter: LedgerFilter,
        page: Page<i64>,
    ) -> StoreResult<Listing<LedgerRow>> {
        bounded!(&self.pool, |client| listings::ledger(&client, filter, page).await)
    }

    async fn sessions(
        &self,
        filter: SessionFilter,
        page: Page<String>,
    ) -> StoreResult<Option<Listing<SessionRow>>> {
        bounded!(&self.pool, |client| listings::sessions(&client, filter, page).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_urls_own_options_are_kept_beside_the_timeouts() {
        let url = "postgres://ada@db/tollgate?options=-c%20search_path%3Dmetering";
        let (config, _) = connection_config(url).unwrap();
        let options = config.get_options().unwrap();
        let expected = format!(
            "-c search_path=metering -c statement_timeout={STATEMENT_TIMEOUT_MS} \
             -c lock_timeout={STATEMENT_TIMEOUT_MS}"
        );
        assert_eq!(options, expected);
        let (plain, _) = connection_config("postgres://ada@db/tollgate").unwrap();
        assert!(plain.get_options().unwrap().starts_with("-c statement_timeout="));
    }

    #[test]
    fn of_pipelined_errors_the_cause_is_reported_not_an_aborted_transaction() {
        let aborted = || StoreError::Other(ABORTED.to_owned());
        let errors = vec![aborted(), StoreError::Unavailable("gone".into()), aborted()];
        let cause = first_cause(errors);
        assert!(matches!(&cause, Some(StoreError::Unavailable(text)) if text == "gone"));
        let only_aborted = first_cause(vec![aborted(), aborted()]);
        assert!(matches!(&only_aborted, Some(StoreError::Other(text)) if text == ABORTED));
        assert!(first_cause(Vec::new()).is_none());
    }
}
