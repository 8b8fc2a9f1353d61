//! Checkpoints of the write-ahead log, on a thread and a connection of
//! their own. Left to itself, SQLite copies the log back into the database
//! inside whichever commit takes the log past 1,000 pages: on the writer
//! thread, so that commit (a tick's, as often as not) waits for the copy
//! and its fsync, and every job queued behind it waits too. The writer
//! here never checkpoints; this thread does, every [`CHECKPOINT_EVERY`],
//! passively (copying what it can without waiting for the writer or any
//! reader).
//!
//! A passive checkpoint never starts the log again from its beginning: the
//! writer does that at its next transaction only if every frame had been
//! copied back when it began, which under a steady stream of writes from
//! another thread is never the case, and the log then grew without end
//! (1.6 GB in six minutes of a soak of 200 clients, and the server's
//! memory with it, by the log's index that SQLite maps). So once the log
//! passes [`TRUNCATE_AFTER_FRAMES`], this thread asks the writer, through
//! the queue of the meter's commits, which the writer takes before any
//! other work, for a truncating checkpoint between two of its jobs (in the
//! queue of other writes it waited behind every mint and grant, and under
//! the soak's load the log reached 209 MiB meanwhile): that
//! copies the few frames the passive one just missed, waits for readers to
//! leave the log (for at most [`TRUNCATE_WAIT`]), and empties it; the
//! passive one having just copied nearly everything, that is short. The
//! writer does it, rather than this thread, because it holds the write
//! lock anyway: from here it would have to win that lock from a writer
//! that, under load, never lets go of it for long.
//!
//! When the store closes, the last of its connections to close
//! checkpoints what is left and removes the log, as SQLite always does.
//!
//! Should checkpoints keep failing, or the log stay past its limit for
//! [`LONG_LOG_TURNS`] turns (another process holding the database for a
//! long while), the log grows until they work again; it is warned of in
//! the log once each time it starts.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::Duration;

use anyhow::Context;
use rusqlite::Connection;
use tokio::sync::mpsc::WeakSender;
use tracing::{info, warn};

use super::{Job, Writer};

/// How often the log is copied back. A second's writes at 19,000 open
/// sessions are a few hundred pages: small copies, done often.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// How many frames (pages) the log holds before it is emptied: 16 MiB of
/// 4 KiB pages, tens of seconds of writes at 19,000 open sessions, so the
/// writer waits for it rarely.
const TRUNCATE_AFTER_FRAMES: i64 = 4096;

/// How long the writer waits for readers to leave the log before it gives
/// up emptying it for this turn. Ours leave within microseconds; another
/// process reading for long (a backup, say) would otherwise stall every
/// write behind the writer's usual busy timeout once a second.
const TRUNCATE_WAIT: Duration = Duration::from_millis(10);

/// Keeps the checkpoint thread running while any clone of it is alive; the
/// thread stops once the last one is dropped.
#[derive(Clone)]
pub struct Running {
    _running_tx: mpsc::Sender<()>,
}

/// Starts the thread on its own connection to the database at `path`;
/// `writer` is the writer's first queue, held weakly so that the writer
/// still stops once every handle on the store is gone.
pub fn spawn(
    path: &Path,
    writer: WeakSender<Job<Writer>>,
) -> anyhow::Result<(Running, thread::JoinHandle<()>)> {
    let conn = Connection::open(path).context("cannot open the database to checkpoint it")?;
    let (running_tx, running_rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name("tollgate-store-checkpoint".into())
        .spawn(move || run(&conn, &running_rx, &writer))
        .context("cannot start the checkpoint thread")?;
    Ok((Running { _running_tx: running_tx }, handle))
}

fn run(conn: &Connection, running_rx: &mpsc::Receiver<()>, writer: &WeakSender<Job<Writer>>) {
    let mut failing = false;
    let mut long = LongLog::default();
    while let Err(RecvTimeoutError::Timeout) = running_rx.recv_timeout(CHECKPOINT_EVERY) {
        let result = run_checkpoint(conn, "PASSIVE");
        match (&result, failing) {
            (Ok(_), true) => info!("WAL checkpoints work again"),
            (Err(error), false) => warn!(%error, "cannot checkpoint the WAL; it grows meanwhile"),
            _ => {}
        }
        failing = result.is_err();
        if let Ok(frames) = result {
            long.saw(frames);
            if frames >= TRUNCATE_AFTER_FRAMES {
                ask_to_truncate(writer, &long.asked);
            }
        }
    }
}

/// How many turns in a row the log may stay past its limit before that is
/// warned of: one truncation that readers kept from finishing is retried a
/// second later, but a reader in another process that never lets go (a
/// long backup, a shell left in a transaction) keeps the log growing.
const LONG_LOG_TURNS: u32 = 10;

/// What the thread remembers of the log's length between turns.
#[derive(Default)]
struct LongLog {
    turns: u32,
    /// Set while a truncation waits in the writer's queue, so that one
    /// waiting long is not joined by another each turn.
    asked: Arc<AtomicBool>,
}

impl LongLog {
    fn saw(&mut self, frames: i64) {
        if frames < TRUNCATE_AFTER_FRAMES {
            if self.turns >= LONG_LOG_TURNS {
                info!("the WAL is emptied again");
            }
            self.turns = 0;
            return;
        }
        self.turns += 1;
        if self.turns == LONG_LOG_TURNS {
            warn!(
                frames,
                "the WAL cannot be emptied, and grows meanwhile: is another process \
                 reading the database for long?"
            );
        }
    }
}

/// Queues the truncating checkpoint for the writer, unless one is already
/// waiting; if the queue is full, the next turn asks again.
fn ask_to_truncate(writer: &WeakSender<Job<Writer>>, asked: &Arc<AtomicBool>) {
    let Some(writer) = writer.upgrade() else { return };
    if asked.swap(true, Ordering::AcqRel) {
        return;
    }
    let done = asked.clone();
    let job = Box::new(move |w: &mut Writer| {
        if let Err(error) = truncate(&w.conn) {
            warn!(%error, "cannot empty the WAL; it grows meanwhile");
        }
        done.store(false, Ordering::Release);
    });
    if writer.try_send(job).is_err() {
        asked.store(false, Ordering::Release);
    }
}

/// The truncating checkpoint, waiting at most [`TRUNCATE_WAIT`] for
/// readers to leave the log, the writer's usual patience restored after.
fn truncate(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(TRUNCATE_WAIT)?;
    let result = run_checkpoint(conn, "TRUNCATE");
    conn.busy_timeout(Duration::from_millis(super::BUSY_TIMEOUT_MS))?;
    result.map(drop)
}

/// Runs a checkpoint in `mode` and answers how many frames the log held
/// (-1 if the database is not in WAL mode). One that another connection's
/// checkpoint or a reader is in the way of reports busy in its first column
/// rather than failing: it has done what it could, and the next comes soon.
fn run_checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<i64> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| row.get(1))
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::SqliteStore;
    use super::*;
    use crate::secret::{Secret, SecretKind};
    use crate::store::Store;

    #[tokio::test]
    async fn a_log_written_without_pause_is_emptied_once_it_passes_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, threads) = SqliteStore::open(&path).unwrap();

        // Writes one after the other for three of the thread's turns, so
        // that every frame is never copied back at once: without the
        // truncating checkpoint, the log holds every frame written.
        let (mut written, mut longest, mut emptied, mut last) = (0, 0, 0, 0);
        let started = Instant::now();
        while started.elapsed() < 3 * CHECKPOINT_EVERY + CHECKPOINT_EVERY / 2 {
            let key = Secret::generate(SecretKind::ApiKey);
            store.add_api_key("acme", key.hash()).await.unwrap();
            let frames = wal_frames(&path);
            if frames < last {
                emptied += 1;
            } else {
                written += frames - last;
            }
            (last, longest) = (frames, longest.max(frames));
        }
        drop(store);
        threads.join();

        assert!(written > 2 * TRUNCATE_AFTER_FRAMES, "only {written} frames were written");
        assert!(emptied > 0, "the log was never emptied; it reached {longest} frames");
        assert!(longest < written / 2, "the log reached {longest} of {written} frames");
    }

    /// How many frames of 4 KiB pages the log file beside `path` holds.
    fn wal_frames(path: &Path) -> i64 {
        let wal = path.with_extension("db-wal");
        let bytes = std::fs::metadata(wal).map_or(0, |m| m.len()) as i64;
        bytes / (4096 + 24)
    }
}
