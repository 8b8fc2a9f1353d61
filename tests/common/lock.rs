//! Another connection holding a test database's write lock, as a backup
//! tool or an operator's shell might: the server's writes wait for it (and
//! fail once they have waited longer than the store allows), its reads go
//! on.

use std::sync::mpsc;
use std::thread::JoinHandle;

use tokio_postgres::NoTls;

use super::database::Db;

/// The lock, held until [`WriteLock::release`] or a drop.
pub enum WriteLock {
    /// A transaction that has taken SQLite's one write lock.
    Sqlite(rusqlite::Connection),
    /// A transaction that holds every table in EXCLUSIVE mode, which lets
    /// only plain reads by: the closest PostgreSQL has to SQLite's lock.
    Postgres { release_tx: tokio::sync::oneshot::Sender<()>, thread: JoinHandle<()> },
}

impl WriteLock {
    /// Takes the lock, returning once it is held. The calling thread is
    /// blocked meanwhile: a test server on the same thread (a
    /// current-thread runtime) cannot finish a transaction the lock waits
    /// for, so tests that take it run on a multi-thread runtime.
    pub fn take(db: &Db) -> WriteLock {
        match db {
            Db::Sqlite(path) => {
                let conn = rusqlite::Connection::open(path).unwrap();
                conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                WriteLock::Sqlite(conn)
            }
            Db::Postgres(url) => {
                // Not the runs' own rows (`instances`), which every tick of
                // the meter writes, sessions or none: `take` blocks the
                // calling thread, often the one the test server's runtime
                // runs on, until every table is locked, and would wait for
                // a tick that runtime cannot then finish. The meter's
                // writes to the other tables wait all the same.
                let tables: Vec<String> =
                    db.tables().into_iter().filter(|table| table != "instances").collect();
                let tables = tables.join(", ");
                let sql = format!("BEGIN; LOCK TABLE {tables} IN EXCLUSIVE MODE");
                hold_on_postgres(url.clone(), sql)
            }
        }
    }

    pub fn release(self) {
        match self {
            WriteLock::Sqlite(conn) => conn.execute_batch("ROLLBACK").unwrap(),
            WriteLock::Postgres { release_tx, thread } => {
                let _ = release_tx.send(());
                thread.join().unwrap();
            }
        }
    }
}

/// Runs `sql` on a connection of a thread of its own, which keeps the
/// connection, and the transaction `sql` began, until told to let go.
fn hold_on_postgres(url: String, sql: String) -> WriteLock {
    let (locked_tx, locked_rx) = mpsc::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
            let driver = tokio::spawn(connection);
            // Locking table after table may deadlock with a transaction of
            // the server's (PostgreSQL then aborts one of the two): the
            // lock is tried again until it is held.
            while let Err(error) = client.batch_execute(&sql).await {
                assert_eq!(
                    error.code(),
                    Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED)
                );
                client.batch_execute("ROLLBACK").await.unwrap();
            }
            locked_tx.send(()).unwrap();
            let _ = release_rx.await;
            client.batch_execute("ROLLBACK").await.unwrap();
            drop(client);
            let _ = driver.await;
        })
    });
    locked_rx.recv().expect("the lock was taken");
    WriteLock::Postgres { release_tx, thread }
}
