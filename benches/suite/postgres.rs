//! PostgreSQL for the pair figure: a database made for the run in the
//! server given and dropped at its end, and what the server says of the
//! run's database: its commits and the rows written (`pg_stat_database`),
//! and the CPU time of the server's processes, read from `/proc` when the
//! server runs on this machine. Connections take the URL as Tollgate does,
//! its `sslmode` and `sslrootcert` included.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::time::Instant;
use tokio_postgres::Client;
use tollgate::store::postgres::tls;

use crate::suite::procfs;

/// A database made for one run, dropped (with any connection still open
/// to it) when this is dropped, whichever way the run ended.
pub struct FreshDatabase {
    server: String,
    name: String,
    /// The URL of the new database, for `--db`.
    pub url: String,
}

impl FreshDatabase {
    /// Makes a database with a name of its own in the server `server`
    /// names (any database of it; the URL's own is left alone).
    pub async fn create(server: &str) -> Result<FreshDatabase> {
        let name = format!("tollgate_bench_{}_{}", std::process::id(), rand::random::<u32>());
        let admin = connect(server).await?;
        let created = admin.batch_execute(&format!("CREATE DATABASE {name}")).await;
        created.context("cannot create the run's database")?;
        let url = with_database(server, &name)?;
        Ok(FreshDatabase { server: server.to_owned(), name, url })
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let (server, sql) =
            (self.server.clone(), format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        // Drop may run inside the suite's runtime, which cannot block on a
        // future of its own: the drop gets a thread and a runtime.
        let dropped = std::thread::spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async { Ok(connect(&server).await?.batch_execute(&sql).await?) })
        });
        if !matches!(dropped.join(), Ok(Ok(()))) {
            eprintln!("error: could not drop the run's database {}", self.name);
        }
    }
}

/// A connection to `url`, driven by a task of its own until the client is
/// dropped. Errors never show the URL, which may hold a password.
async fn connect(url: &str) -> Result<Client> {
    let (rest, tls) = tls::split(url).map_err(anyhow::Error::msg)?;
    let mut config: tokio_postgres::Config = rest.parse().context("not a PostgreSQL URL")?;
    config.ssl_mode(tls.negotiation());
    let connecting = config.connect(tls.connector()?).await;
    let (client, connection) = connecting.context("cannot connect to PostgreSQL")?;
    tokio::spawn(connection);
    Ok(client)
}

/// `url` with its database replaced by `name`, its query kept.
pub fn with_database(url: &str, name: &str) -> Result<String> {
    let Some(scheme_end) = url.find("://").map(|at| at + 3) else {
        bail!("the PostgreSQL server is to be given as a URL, postgres://user@host:port/db");
    };
    // The user's part, which may hold a '/' or a '?' in its password,
    // ends at the first '@'.
    let host_start = url[scheme_end..].find('@').map_or(scheme_end, |at| scheme_end + at);
    let rest = &url[host_start..];
    let host_end = rest.find(['/', '?']).map_or(url.len(), |at| host_start + at);
    let query = url[host_end..].find('?').map_or("", |at| &url[host_end + at..]);
    Ok(format!("{}/{name}{query}", &url[..host_end]))
}

/// Reads the run's database's counters, on a connection of its own.
pub struct Monitor {
    client: Client,
    /// The server's first process, whose children are all of its others;
    /// or why its CPU time cannot be read.
    postmaster: Result<u32, String>,
}

/// What the database had done by an instant.
pub struct Counters {
    pub at: Instant,
    /// Transactions committed in the run's database.
    pub commits: i64,
    /// Rows inserted, updated and deleted in it.
    pub rows: i64,
    /// The CPU time of every process of the server, for every database.
    pub cpu: Result<Duration, String>,
}

impl Monitor {
    pub async fn connect(url: &str) -> Result<Monitor> {
        let client = connect(url).await?;
        let backend: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
        let postmaster = postmaster_of(backend as u32);
        Ok(Monitor { client, postmaster })
    }

    /// The counters now. The server's processes report their counts at
    /// the end of a transaction, but at most once a second, so what the
    /// servers did in the last second may not show yet.
    pub async fn read(&self) -> Result<Counters> {
        let sql = "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted
                   FROM pg_stat_database WHERE datname = current_database()";
        let row = self.client.query_one(sql, &[]).await?;
        let cpu = self.postmaster.clone().and_then(|pid| server_cpu(pid).map_err(message));
        Ok(Counters { at: Instant::now(), commits: row.get(0), rows: row.get(1), cpu })
    }
}

/// The server's first process: the parent of the one serving `backend`,
/// if both are PostgreSQL's processes on this machine. A server elsewhere
/// has pids of its own, which here are another process's or none.
fn postmaster_of(backend: u32) -> Result<u32, String> {
    let elsewhere = "the PostgreSQL server does not run on this machine";
    let is_postgres = |pid| procfs::command(pid).is_ok_and(|name| name == "postgres");
    if !is_postgres(backend) {
        return Err(elsewhere.into());
    }
    let postmaster = procfs::parent(backend).map_err(message)?;
    if !is_postgres(postmaster) {
        return Err(elsewhere.into());
    }
    Ok(postmaster)
}

/// The CPU time of the server's first process and of its children, those
/// that have ended included. A child that ends between being listed and
/// being read is counted by its parent at the next reading.
fn server_cpu(postmaster: u32) -> Result<Duration> {
    let mut cpu = procfs::cpu_time_with_reaped(postmaster)?;
    for child in procfs::children(postmaster)? {
        cpu += procfs::cpu_time(child).unwrap_or_default();
    }
    Ok(cpu)
}

fn message(error: anyhow::Error) -> String {
    format!("{error:#}")
}
