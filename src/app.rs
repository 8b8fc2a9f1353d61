//! Putting the server together: open the store, close what a previous run
//! left open, start the meter and the listener, and take it all down again
//! in order on shutdown.

use std::fs::{File, OpenOptions, TryLockError};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{self, AppState, AuthFailures};
use crate::config::{Database, LLM_API_KEY_VARIABLE, Settings};
use crate::listener;
use crate::llm::{LlmClient, Proxy};
use crate::meter::{self, Health, MeterSettings};
use crate::outbound;
use crate::secret::{Secret, SecretKind};
use crate::store::Store;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::{SqliteStore, StoreThreads};
use crate::upstream::{self, UpstreamClient};
use crate::webhooks;

/// The project an empty database starts with.
pub const DEFAULT_PROJECT: &str = "default";

/// How long shutdown waits for HTTP requests in hand, and then for sessions
/// to finish their closing handshake once their usage is recorded. A client
/// that never answers cannot hold the process up longer than this.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A server that is listening.
pub struct RunningServer {
    local_addr: SocketAddr,
    first_api_key: Option<Secret>,
    shutdown: CancellationToken,
    done: JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The key of the `default` project, when this start created it.
    pub fn first_api_key(&self) -> Option<&Secret> {
        self.first_api_key.as_ref()
    }

    /// Resolves once the server is stopping: asked to, or on its own
    /// (another server sharing the database closed it out as lost);
    /// [`RunningServer::shutdown`] then says why.
    pub async fn stopping(&self) {
        self.shutdown.cancelled().await;
    }

    /// Closes every session with 1001, records their final usage and
    /// stops. Fails if that usage could not be recorded, or if the server
    /// stopped because another one closed it out of a shared database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.done.await.context("the server task failed")?
    }
}

/// Opens the database and starts serving.
pub async fn start(settings: Settings) -> anyhow::Result<RunningServer> {
    let tls = settings.tls.as_ref().map(crate::tls::acceptor).transpose()?;
    let lock = DatabaseLock::take(&settings.db)?;
    crate::metrics::handle();
    let listener = listener::bind(settings.listen)
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let local_addr = listener.local_addr()?;
    let max_db_bytes = settings.max_db_mb.map(|mb| mb * 1024 * 1024);
    let tick = settings.tick;
    let (store, store_threads) = open_store(&settings.db, max_db_bytes, Some(tick)).await?;
    if let Database::Postgres(url) = &settings.db {
        info!(database = %url, "using PostgreSQL");
    }
    let abandoned = store.close_abandoned_sessions().await?;
    if abandoned > 0 {
        info!(sessions = abandoned, "closed sessions the previous run left open");
    }
    let abandoned = store.close_abandoned_completions(crate::clock::now_millis()).await?;
    if abandoned > 0 {
        warn!(
            completions = abandoned,
            "ended completions the previous run left running, charging their prompts"
        );
    }
    let first_api_key = create_first_project(store.as_ref()).await?;

    let upstream_client = upstream_client(&settings)?;
    let health = Health::new();
    let meter_settings = MeterSettings { tick, warn_millis: settings.warn.as_millis() as i64 };
    let (meter, meter_task) = meter::spawn(store.clone(), meter_settings, health.clone());
    let shutdown = CancellationToken::new();
    let llm = Arc::new(Proxy::new(
        settings.llm.clone(),
        llm_client(&settings)?,
        store.clone(),
        shutdown.clone(),
    ));
    let auth_failures = Arc::new(AuthFailures::new(settings.auth_failures));
    let state = AppState {
        store,
        meter: meter.clone(),
        settings: Arc::new(settings),
        health,
        shutdown: shutdown.clone(),
        upstream_client,
        llm,
        auth_failures,
    };
    let dispatcher = webhooks::dispatch::spawn(
        state.store.clone(),
        outbound::client(upstream::tls_config(state.settings.upstream_ca_file.as_deref())?),
        state.settings.webhooks,
        shutdown.clone(),
    );
    let listening = listener_settings(&state.settings, tls);
    info!(max_connections = listening.max_connections, "connections capped");
    let store = state.store.clone();
    let company =
        tokio::spawn(keep_company(store.clone(), state.health.clone(), tick, shutdown.clone()));
    let router = api::router(state);
    let http = tokio::spawn(listener::serve(listener, router, listening, shutdown.clone()));
    let parts = Parts { http, meter, meter_task, dispatcher, store, store_threads, _lock: lock };
    let done = tokio::spawn(stop_when_asked(shutdown.clone(), parts, company));
    Ok(RunningServer { local_addr, first_api_key, shutdown, done })
}

/// The cap on connections (derived from the open-file limit unless set),
/// the header timeout, and TLS if the server has a certificate.
fn listener_settings(settings: &Settings, tls: Option<TlsAcceptor>) -> listener::ListenerSettings {
    let upstreams = &settings.upstreams;
    let with_upstreams = upstreams.conversational.is_some()
        || upstreams.voice_synthesis.is_some()
        || settings.llm.upstream.is_some();
    let max_connections = settings
        .max_connections
        .unwrap_or_else(|| listener::default_max_connections(with_upstreams));
    listener::ListenerSettings { max_connections, header_timeout: settings.header_timeout, tls }
}

/// The TLS set-up for upstreams, when any session kind has one.
fn upstream_client(settings: &Settings) -> anyhow::Result<Option<Arc<UpstreamClient>>> {
    let upstreams = &settings.upstreams;
    if upstreams.conversational.is_none() && upstreams.voice_synthesis.is_none() {
        return Ok(None);
    }
    let client = UpstreamClient::new(settings.upstream_ca_file.as_deref())?;
    Ok(Some(Arc::new(client)))
}

/// The client of the chat completions upstream, when one is configured.
fn llm_client(settings: &Settings) -> anyhow::Result<Option<LlmClient>> {
    let Some(upstream) = &settings.llm.upstream else {
        return Ok(None);
    };
    if upstream.authorization.is_none() {
        warn!("no {LLM_API_KEY_VARIABLE} is set; chat completions go upstream without a key");
    }
    let tls = upstream::tls_config(settings.upstream_ca_file.as_deref())?;
    Ok(Some(LlmClient::new(upstream.clone(), tls, settings.llm.idle_timeout)))
}

/// What a running server is made of, taken down in order by
/// [`stop_when_asked`].
struct Parts {
    http: JoinHandle<()>,
    meter: meter::MeterHandle,
    meter_task: JoinHandle<()>,
    /// Stops at the shutdown signal; what it was sending is sent again at
    /// the next start.
    dispatcher: JoinHandle<()>,
    store: Arc<dyn Store>,
    /// SQLite's threads; PostgreSQL has none.
    store_threads: Option<StoreThreads>,
    /// Dropped once everything else has stopped.
    _lock: DatabaseLock,
}

/// Waits for the shutdown signal, then stops in order (see
/// [`stop_in_order`]). If the server stops because another sharing the
/// database closed it out (see [`keep_company`]), that is the error to
/// report.
async fn stop_when_asked(
    shutdown: CancellationToken,
    parts: Parts,
    company: JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    shutdown.cancelled().await;
    // It ends at the signal, and lets go of its handle on the store, which
    // must all be gone before SQLite's threads can stop.
    let company = company.await.context("the task watching the other servers failed")?;
    let stopped = stop_in_order(parts).await;
    company?;
    stopped
}

/// On a store other servers share: closes out at every `tick` the servers
/// gone silent (see `instances` in schema.postgres.sql), and stops this one
/// (the shutdown is cancelled, and the error returned is what the process
/// exits with) if another has closed it out, having found it silent: its
/// sessions are ended and charged already, and it records nothing more.
/// Waits for the shutdown on any other store.
async fn keep_company(
    store: Arc<dyn Store>,
    health: Arc<Health>,
    tick: Duration,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !store.is_shared() {
        shutdown.cancelled().await;
        return Ok(());
    }
    let mut every = tokio::time::interval(tick);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = health.superseded() => {
                shutdown.cancel();
                anyhow::bail!(
                    "another tollgate server sharing the database found this one silent and \
                     closed it out; this one recorded nothing more and stopped"
                );
            }
            _ = every.tick() => {}
        }
        close_out_all(store.as_ref(), &shutdown, &mut failing).await;
    }
}

/// Closes out what servers gone silent left, step after step while there
/// is something to close out, each bounded, the shutdown looked at between
/// them; a failure is logged once, until a step succeeds again.
async fn close_out_all(store: &dyn Store, shutdown: &CancellationToken, failing: &mut bool) {
    let (mut sessions, mut completions) = (0, 0);
    while !shutdown.is_cancelled() {
        match store.close_out_lost().await {
            Ok(ended) => {
                *failing = false;
                (sessions, completions) = (sessions + ended.0, completions + ended.1);
                if ended == (0, 0) {
                    break;
                }
            }
            Err(error) => {
                if !*failing {
                    warn!(%error, "cannot look for servers gone silent; trying every tick");
                }
                *failing = true;
                break;
            }
        }
    }
    if sessions > 0 || completions > 0 {
        warn!(sessions, completions, "closed out what servers gone silent left open");
    }
}

/// Stops in order: the meter ends and records every session, the listener
/// drains, the sessions finish their close, and the store's threads close
/// the database.
async fn stop_in_order(parts: Parts) -> anyhow::Result<()> {
    info!("shutting down");
    let recorded = parts.meter.shutdown().await;
    drop(parts.meter);
    match tokio::time::timeout(SHUTDOWN_GRACE, parts.http).await {
        Ok(joined) => joined.context("the listener task failed")?,
        Err(_) => warn!("some HTTP connections did not finish their request in time"),
    }
    if parts.dispatcher.await.is_err() {
        warn!("the webhook dispatcher failed");
    }
    let meter_done = tokio::time::timeout(SHUTDOWN_GRACE, parts.meter_task).await.is_ok();
    // Once the meter has made its last commit, and only then: a commit
    // after it would find this run ended.
    if recorded
        && meter_done
        && let Err(error) = parts.store.leave().await
    {
        warn!(%error, "cannot tell the servers sharing the database that this one stopped");
    }
    // SQLite's threads stop once every handle on the store is gone.
    drop(parts.store);
    if !meter_done {
        warn!("some sessions did not finish closing in time; their usage is recorded");
        return finish(recorded);
    }
    if let Some(store_threads) = parts.store_threads {
        tokio::task::spawn_blocking(move || store_threads.join()).await?;
    }
    finish(recorded)
}

/// A lock that only one server at a time can hold for a SQLite database
/// (`<db>.lock`, beside the file): a second server started on the same
/// file would otherwise close the first one's live sessions as left over
/// from a crash. PostgreSQL needs none: the servers sharing it each know
/// their own sessions (see `instances` in schema.postgres.sql).
struct DatabaseLock {
    _file: Option<File>,
}

impl DatabaseLock {
    fn take(db: &Database) -> anyhow::Result<DatabaseLock> {
        Ok(match db {
            Database::Sqlite(path) => DatabaseLock { _file: Some(lock_database(path)?) },
            Database::Postgres(_) => DatabaseLock { _file: None },
        })
    }
}

/// Opens the store on the database: SQLite, capped at `max_db_bytes` if
/// given, with the threads to join once it is dropped; or PostgreSQL, on
/// which a server metering every `tick` joins as a new instance (a command
/// of the command line passes none).
async fn open_store(
    db: &Database,
    max_db_bytes: Option<u64>,
    tick: Option<Duration>,
) -> anyhow::Result<(Arc<dyn Store>, Option<StoreThreads>)> {
    match db {
        Database::Sqlite(path) => {
            let (store, threads) = SqliteStore::open_capped(path, max_db_bytes)?;
            Ok((Arc::new(store), Some(threads)))
        }
        Database::Postgres(url) => {
            let mut store = PostgresStore::open(url.expose())
                .await
                .with_context(|| format!("cannot open the database {url}"))?;
            if let Some(tick) = tick {
                store = store.join(tick).await.context("cannot join the PostgreSQL database")?;
            }
            Ok((Arc::new(store), None))
        }
    }
}

/// The lock file of a SQLite database at `db`.
fn lock_database(db: &Path) -> anyhow::Result<File> {
    let mut path = db.as_os_str().to_owned();
    path.push(".lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", Path::new(&path).display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => {
            anyhow::bail!("another tollgate server is already using {}", db.display())
        }
        Err(TryLockError::Error(error)) => Err(error).context("cannot lock the database"),
    }
}

fn finish(recorded: bool) -> anyhow::Result<()> {
    anyhow::ensure!(recorded, "the final usage of the open sessions could not be recorded");
    info!("stopped");
    Ok(())
}

/// On an empty database, creates the `default` project with one API key.
async fn create_first_project(store: &dyn Store) -> anyhow::Result<Option<Secret>> {
    if store.has_projects().await? {
        return Ok(None);
    }
    let key = Secret::generate(SecretKind::ApiKey);
    store.add_api_key(DEFAULT_PROJECT, key.hash()).await?;
    Ok(Some(key))
}

/// Creates the project if needed and a new API key for it, in the database
/// `db` names (a `--db` value: a SQLite path or a PostgreSQL URL), for
/// `tollgate keys create`.
pub async fn create_api_key(db: &Path, project: &str) -> anyhow::Result<Secret> {
    anyhow::ensure!(
        !project.is_empty() && project.len() <= 100,
        "--project must be 1 to 100 bytes long"
    );
    anyhow::ensure!(
        !project.chars().any(char::is_control) && project.trim() == project,
        "--project must not contain control characters or start or end with white space"
    );
    let (store, store_threads) = open_for_command(db).await?;
    let key = Secret::generate(SecretKind::ApiKey);
    let added = store.add_api_key(project, key.hash()).await;
    close_for_command(store, store_threads).await?;
    added?;
    Ok(key)
}

/// Revokes a live API key. Fails, changing nothing, for a text that is not
/// an API key or a key that is unknown or already revoked.
pub async fn revoke_api_key(db: &Path, key: &str) -> anyhow::Result<()> {
    let Some(hash) = crate::secret::parse(key.trim(), SecretKind::ApiKey) else {
        anyhow::bail!("--api-key: not an API key (tgk_ and 47 characters, checksum included)");
    };
    // Opening the store would create a SQLite database that is not there.
    if let Database::Sqlite(path) = Database::parse(db).map_err(anyhow::Error::msg)? {
        anyhow::ensure!(path.exists(), "--db: there is no database at {}", path.display());
    }
    let (store, store_threads) = open_for_command(db).await?;
    let revoked = store.revoke_api_key(hash).await;
    close_for_command(store, store_threads).await?;
    anyhow::ensure!(revoked?, "--api-key: no live key of this database matches it");
    Ok(())
}

/// The store a command of the command line works on, beside a server that
/// may be running on it.
async fn open_for_command(db: &Path) -> anyhow::Result<(Arc<dyn Store>, Option<StoreThreads>)> {
    open_store(&Database::parse(db).map_err(anyhow::Error::msg)?, None, None).await
}

/// Closes what [`open_for_command`] opened, waiting for SQLite's threads.
async fn close_for_command(
    store: Arc<dyn Store>,
    store_threads: Option<StoreThreads>,
) -> anyhow::Result<()> {
    drop(store);
    if let Some(threads) = store_threads {
        tokio::task::spawn_blocking(move || threads.join()).await?;
    }
    Ok(())
}
