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
//! passes [`RESTART_AFTER_FRAMES`], this thread asks the writer, through
//! the queue of the meter's commits, which the writer takes before any
//! other work, for a restarting checkpoint between two of its jobs (in the
//! queue of other writes it waited behind every mint and grant, and under
//! the soak's load the log reached 209 MiB meanwhile): that copies what
//! the passive one missed, waits for readers to leave the log (for at most
//! [`RESTART_WAIT`]), and has the writer's next transaction write from the
//! log's beginning again. The writer does it, rather than this thread,
//! because it holds the write lock anyway: from here it would have to win
//! that lock from a writer that, under load, never lets go of it for long.
//!
//! Every job behind a restart waits for it, admissions included: under
//! upgrades as fast as 256 clients could go, one took about 30 ms, mostly
//! the copy of what was written since the passive one and two fsyncs. The
//! log is therefore allowed a size that makes restarts rare (a few seconds
//! apart under that load, minutes apart at 19,000 idle sessions), and its
//! file is kept rather than emptied: a truncating checkpoint took about
//! 70 ms, and the file then grew again a page at a time, each growth a
//! change to the file system's metadata. The file is cut back to
//! [`LOG_SIZE_LIMIT_BYTES`] at a restart only when it grew past that, as it
//! does while checkpoints cannot run.
//!
//! The log passes its line by what is written between this thread's look
//! at it and the restart: under the soak's load (BENCHMARKS.md) it reached
//! 138 MiB. The writer could restart it itself at the commit that takes it
//! past the line, which SQLite's `wal_hook` would tell it of; it does not
//! yet.
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

/// How many frames (pages) the log holds before it is started again from
/// its beginning: 64 MiB of 4 KiB pages, about four seconds of writes
/// under the upgrades figure and minutes of them at 19,000 idle sessions,
/// so the writer waits for a restart rarely.
const RESTART_AFTER_FRAMES: i64 = 16384;

/// The most the log's file is left holding after a restart: twice what
/// starts one, so that the writes made while a restart waits in the
/// writer's queue never make SQLite cut the file back and grow it again.
pub const LOG_SIZE_LIMIT_BYTES: i64 = 2 * RESTART_AFTER_FRAMES * (4096 + 24);

/// How long the writer waits for readers to leave the log before it gives
/// up restarting it for this turn. Ours leave within microseconds; another
/// process reading for long (a backup, say) would otherwise stall every
/// write behind the writer's usual busy timeout once a second.
const RESTART_WAIT: Duration = Duration::from_millis(10);

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
        if let Ok(log) = result
            && long.saw(log)
        {
            ask_to_restart(writer, &long.asked);
        }
    }
}

/// How many turns in a row the log may stay past its limit before that is
/// warned of: one restart that readers kept from finishing is retried a
/// second later, but a reader in another process that never lets go (a
/// long backup, a shell left in a transaction) keeps the log growing.
const LONG_LOG_TURNS: u32 = 10;

/// What the thread remembers of the log's length between turns.
#[derive(Default)]
struct LongLog {
    turns: u32,
    /// The frames the log held at the last turn.
    last_frames: i64,
    /// Set while a restart waits in the writer's queue, so that one
    /// waiting long is not joined by another each turn.
    asked: Arc<AtomicBool>,
}

impl LongLog {
    /// Takes in what this turn's checkpoint left of the log, and answers
    /// whether it needs a restart.
    fn saw(&mut self, log: Log) -> bool {
        let written = log.frames != self.last_frames;
        self.last_frames = log.frames;
        if !log.needs_restart(written) {
            if self.turns >= LONG_LOG_TURNS {
                info!("the WAL is back within its limit");
            }
            self.turns = 0;
            return false;
        }
        self.turns += 1;
        if self.turns == LONG_LOG_TURNS {
            warn!(
                frames = log.frames,
                "the WAL cannot be started again, and grows meanwhile: is another \
                 process reading the database for long?"
            );
        }
        true
    }
}

/// Queues the restarting checkpoint for the writer, unless one is already
/// waiting; if the queue is full, the next turn asks again.
fn ask_to_restart(writer: &WeakSender<Job<Writer>>, asked: &Arc<AtomicBool>) {
    let Some(writer) = writer.upgrade() else { return };
    if asked.swap(true, Ordering::AcqRel) {
        return;
    }
    let done = asked.clone();
    let job = Box::new(move |w: &mut Writer| {
        if let Err(error) = restart(&w.conn) {
            warn!(%error, "cannot start the WAL again; it grows meanwhile");
        }
        done.store(false, Ordering::Release);
    });
    if writer.try_send(job).is_err() {
        asked.store(false, Ordering::Release);
    }
}

/// The restarting checkpoint, waiting at most [`RESTART_WAIT`] for
/// readers to leave the log, the writer's usual patience restored after.
fn restart(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(RESTART_WAIT)?;
    let result = run_checkpoint(conn, "RESTART");
    conn.busy_timeout(Duration::from_millis(super::BUSY_TIMEOUT_MS))?;
    result.map(drop)
}

/// The log as a checkpoint leaves it.
#[derive(Clone, Copy, Debug)]
struct Log {
    /// The frames it holds (-1 if the database is not in WAL mode).
    frames: i64,
    /// How many of them are copied back into the database.
    copied: i64,
}

impl Log {
    /// Whether the log, past its line, needs a restart; `written` says
    /// whether it changed since the last turn. A restart leaves the frame
    /// count as it was until the next write starts the log from its
    /// beginning, so a server that stops writing right after one still
    /// sees a long log, but every frame of it copied back and none written
    /// since: its next write, which begins with nothing left to copy, will
    /// start the log again itself. A log copied back whole that is still
    /// being written needs the restart all the same: a writer that writes
    /// without pause has begun its next transaction before the copy ends,
    /// and goes on appending.
    fn needs_restart(self, written: bool) -> bool {
        self.frames >= RESTART_AFTER_FRAMES && (written || self.copied < self.frames)
    }
}

/// Runs a checkpoint in `mode` and answers what it left of the log. One
/// that another connection's checkpoint or a reader is in the way of
/// reports busy in its first column rather than failing: it has done what
/// it could, and the next comes soon.
fn run_checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<Log> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
        Ok(Log { frames: row.get(1)?, copied: row.get(2)? })
    })
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::SqliteStore;
    use super::*;
    use crate::secret::{Secret, SecretKind};
    use crate::store::Store;

    #[tokio::test]
    async fn a_log_written_without_pause_starts_again_once_it_passes_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let (store, threads) = SqliteStore::open(&path).unwrap();

        // Writes one after the other, so that every frame is never copied
        // back at once: without the restarting checkpoint, the log holds
        // every frame written. The log may pass its limit by a turn's
        // writes before the thread sees it, so it is written four times
        // over, and for at least three of the thread's turns.
        let (mut written, mut longest, mut restarts, mut last) = (0, 0, 0, 0);
        let started = Instant::now();
        while written <= 4 * RESTART_AFTER_FRAMES || started.elapsed() < 3 * CHECKPOINT_EVERY {
            assert!(started.elapsed() < WRITING_AT_MOST, "only {written} frames were written");
            let key = Secret::generate(SecretKind::ApiKey);
            store.add_api_key("acme", key.hash()).await.unwrap();
            let frames = log_frames(&path);
            if frames < last {
                restarts += 1;
                written += frames;
            } else {
                written += frames - last;
            }
            (last, longest) = (frames, longest.max(frames));
        }
        drop(store);
        threads.join();

        assert!(restarts > 0, "the log never started again; it reached {longest} frames");
        assert!(longest < written / 2, "the log reached {longest} of {written} frames");
    }

    #[test]
    fn a_long_log_copied_back_and_no_longer_written_needs_no_restart() {
        let long = RESTART_AFTER_FRAMES + 9;
        let mut turns = LongLog::default();
        assert!(turns.saw(Log { frames: long, copied: long }), "written since the start");
        assert!(!turns.saw(Log { frames: long, copied: long }), "idle, all copied back");
        assert!(turns.saw(Log { frames: long, copied: 0 }), "a reader kept it from the copy");
        assert!(!turns.saw(Log { frames: 9, copied: 0 }), "short");
        assert!(!turns.saw(Log { frames: -1, copied: -1 }), "not in WAL mode");
        for _ in 0..LONG_LOG_TURNS + 1 {
            turns.saw(Log { frames: long, copied: long });
        }
        assert_eq!(turns.turns, 0, "an idle log was counted as one that cannot restart");
    }

    /// How long the test may take to write four times the frames that start
    /// the log again, in an unoptimised build on a busy machine.
    const WRITING_AT_MOST: Duration = Duration::from_secs(120);

    /// How many frames the log beside `path` holds now: `mxFrame` of the
    /// header of its index, the `-shm` file, which SQLite keeps in the
    /// machine's byte order (the file's length says nothing once the log
    /// starts again, since the file is kept).
    fn log_frames(path: &Path) -> i64 {
        let index = std::fs::read(path.with_extension("db-shm")).unwrap();
        let max_frame: [u8; 4] = index[16..20].try_into().unwrap();
        i64::from(u32::from_ne_bytes(max_frame))
    }
}
