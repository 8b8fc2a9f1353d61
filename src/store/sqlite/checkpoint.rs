//! Checkpoints of the write-ahead log, on a thread and a connection of
//! their own. Left to itself, SQLite copies the log back into the database
//! inside whichever commit takes the log past 1,000 pages: on the writer
//! thread, so that commit (a tick's, as often as not) waits for the copy
//! and its fsync, and every job queued behind it waits too. The writer
//! here never checkpoints; this thread does, every [`CHECKPOINT_EVERY`],
//! passively (copying what it can without waiting for the writer or any
//! reader). When the store closes, the last of its connections to close
//! checkpoints what is left and removes the log, as SQLite always does.
//!
//! Should checkpoints keep failing (another process holding the database
//! for a long while), the log grows until they work again; it is warned of
//! in the log once each time they start failing.

use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use rusqlite::Connection;
use tracing::{info, warn};

/// How often the log is copied back. A second's writes at 19,000 open
/// sessions are a few hundred pages: small copies, done often.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Keeps the checkpoint thread running while any clone of it is alive; the
/// thread stops once the last one is dropped.
#[derive(Clone)]
pub struct Running {
    _running_tx: mpsc::Sender<()>,
}

/// Starts the thread on its own connection to the database at `path`.
pub fn spawn(path: &Path) -> anyhow::Result<(Running, thread::JoinHandle<()>)> {
    let conn = Connection::open(path).context("cannot open the database to checkpoint it")?;
    let (running_tx, running_rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name("tollgate-store-checkpoint".into())
        .spawn(move || run(&conn, &running_rx))
        .context("cannot start the checkpoint thread")?;
    Ok((Running { _running_tx: running_tx }, handle))
}

fn run(conn: &Connection, running_rx: &mpsc::Receiver<()>) {
    let mut failing = false;
    while let Err(RecvTimeoutError::Timeout) = running_rx.recv_timeout(CHECKPOINT_EVERY) {
        let result = checkpoint(conn);
        match (&result, failing) {
            (Ok(()), true) => info!("WAL checkpoints work again"),
            (Err(error), false) => warn!(%error, "cannot checkpoint the WAL; it grows meanwhile"),
            _ => {}
        }
        failing = result.is_err();
    }
}

/// Copies what it can of the log into the database. One that another
/// connection's checkpoint is in the way of reports busy in its first
/// column rather than failing: it is skipped, and the next comes soon.
fn checkpoint(conn: &Connection) -> rusqlite::Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
}
