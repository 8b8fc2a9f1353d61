//! The meter: one task that owns the clock of every open session, records
//! their usage in one store transaction per tick (each session once a
//! minute, and at once when its pool falls below a webhook line), tells
//! each session its figures when they change ([`figures`]), and cuts
//! sessions off at the instant their human's pool runs dry.
//!
//! Sessions of one human and limit type share a pool. Between two commits
//! a pool with `n` open sessions drains at `n` milliseconds per millisecond,
//! so the meter knows when it will reach zero and sets a timer for that
//! instant instead of waiting for the next tick. When the timer fires the
//! pool's sessions are closed at once, even while a commit is waiting for
//! the store; their last charges are recorded afterwards, and the store,
//! which never takes an enforced pool below zero, keeps the pool at zero.
//!
//! The meter's picture of a pool is what the store answered at the last
//! commit that charged it, less what its sessions used since. A tick
//! refreshes the pools it records; so does a settle, which
//! the API asks for around every change of a human's limits and every
//! revocation, so that a top-up, a set-to-zero or a revocation reaches the
//! human's open sessions as soon as it is made, and usage up to the change
//! is charged against the limit as it was.

mod figures;
mod pool;
mod task;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Span, error};

use crate::close::EndReason;
use crate::limits::LimitType;
use crate::store::{HumanId, SessionKey, Store};

pub use figures::{UsageEvents, counted_down};

/// How many commands may wait for the meter. Session tasks that find it
/// full wait their turn; a command takes about a microsecond to handle, so
/// even a burst of thousands of opens and closes drains within a tick.
const COMMAND_QUEUE: usize = 4096;

#[derive(Clone, Copy, Debug)]
pub struct MeterSettings {
    pub tick: Duration,
    /// Below this many milliseconds left, sessions are warned.
    pub warn_millis: i64,
}

/// Whether usage can be recorded: the last commit succeeded (cleared when
/// one fails, set again by the next that succeeds), the server holds the
/// database's lock (see [`Health::set_exclusive`]), and no other server has
/// taken the database over (see [`Health::supersede`]). Admission refuses
/// new sessions meanwhile.
#[derive(Debug)]
pub struct Health {
    recording: AtomicBool,
    exclusive: AtomicBool,
    /// How many times the lock was lost: a loss closes the sessions even
    /// when the lock is held again before the meter's next tick.
    losses: AtomicU64,
    superseded: watch::Sender<bool>,
}

impl Health {
    pub fn new() -> Arc<Health> {
        let (recording, exclusive) = (AtomicBool::new(true), AtomicBool::new(true));
        let superseded = watch::Sender::new(false);
        Arc::new(Health { recording, exclusive, losses: AtomicU64::new(0), superseded })
    }

    pub fn is_recording(&self) -> bool {
        self.commits() && self.is_exclusive() && !self.is_superseded()
    }

    /// Says that another server has taken the database over: this one
    /// records nothing more, and stops (see [`Health::superseded`]).
    pub fn supersede(&self) {
        self.superseded.send_replace(true);
    }

    /// Whether another server has taken the database over.
    pub fn is_superseded(&self) -> bool {
        *self.superseded.borrow()
    }

    /// Resolves once another server has taken the database over.
    pub async fn superseded(&self) {
        let _ = self.superseded.subscribe().wait_for(|superseded| *superseded).await;
    }

    /// Whether this server holds the database's lock.
    pub fn is_exclusive(&self) -> bool {
        self.exclusive.load(Ordering::Relaxed)
    }

    /// Says whether this server holds the database's lock. While it does
    /// not, another server may start on the database and close this one's
    /// sessions as left over from a crash: the meter closes every session
    /// (1011) at its next tick, and admission refuses new ones.
    pub fn set_exclusive(&self, held: bool) {
        if !held {
            self.losses.fetch_add(1, Ordering::Relaxed);
        }
        self.exclusive.store(held, Ordering::Relaxed);
    }

    /// How many times the lock was lost.
    fn losses(&self) -> u64 {
        self.losses.load(Ordering::Relaxed)
    }

    /// Whether the last commit succeeded.
    fn commits(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    fn set_recording(&self, ok: bool) {
        self.recording.store(ok, Ordering::Relaxed);
    }
}

/// What the meter tells a session: its figures, or that it is to close.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SessionUpdate {
    /// The pool's remaining milliseconds, `None` when unlimited.
    pub remaining_millis: Option<i64>,
    /// Milliseconds this session has been charged.
    pub used_millis: i64,
    /// The pool's open sessions, each of which drains it.
    pub sessions: u32,
    /// The pool is below the warning threshold.
    pub low: bool,
    /// The meter has ended the session; close it with this reason.
    pub close: Option<EndReason>,
    /// When the figures were worked out; `None` before the first.
    pub at: Option<Instant>,
}

/// A session whose upgrade has completed, handed to the meter.
pub struct Registration {
    pub key: SessionKey,
    pub human: HumanId,
    pub limit_type: LimitType,
    /// When charging starts: the completed upgrade.
    pub started: Instant,
    /// The remaining value seen at admission, `None` when unlimited.
    pub remaining: Option<i64>,
    pub revocation_epoch: i64,
    /// Which of the session's figures its client is sent.
    pub events: UsageEvents,
    pub updates_tx: watch::Sender<SessionUpdate>,
    pub span: Span,
}

enum Command {
    Open(Registration),
    End {
        key: SessionKey,
        at: Instant,
        reason: EndReason,
    },
    Abandon {
        key: SessionKey,
        reason: EndReason,
    },
    /// Answered once the human's open sessions are charged up to now and
    /// the store's answer about their pools is acted on: `true`, or `false`
    /// if the store could not record it.
    Settle {
        human: HumanId,
        done_tx: oneshot::Sender<bool>,
    },
    /// Answered once the ended sessions' usage is recorded (`true`) or could
    /// not be (`false`).
    Shutdown(oneshot::Sender<bool>),
}

/// The way to the meter; cheap to clone. The meter task ends once every
/// handle is gone and its last usage is recorded.
#[derive(Clone)]
pub struct MeterHandle {
    commands_tx: mpsc::Sender<Command>,
}

impl MeterHandle {
    /// Whether the meter task is still there to charge sessions. It only
    /// stops on its own once every handle is gone, so `false` means it
    /// failed.
    pub fn is_running(&self) -> bool {
        !self.commands_tx.is_closed()
    }

    /// Starts charging a session. Should the meter be gone, the
    /// registration's update channel is dropped with it, which closes the
    /// session with 1011.
    pub async fn open(&self, registration: Registration) {
        self.send(Command::Open(registration)).await;
    }

    /// Stops charging a session at `at`, which may lie in the past (a dead
    /// client is charged only up to its last frame).
    pub async fn end(&self, key: SessionKey, at: Instant, reason: EndReason) {
        self.send(Command::End { key, at, reason }).await;
    }

    /// Records the end of a session that never started, for `reason`.
    /// Usable where one cannot wait, such as `Drop`.
    pub fn abandon(&self, key: SessionKey, reason: EndReason) {
        let commands_tx = self.commands_tx.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Only when the runtime itself is gone; the next start closes
            // the session's row as `server_restart`, with nothing charged.
            return;
        };
        runtime.spawn(async move { commands_tx.send(Command::Abandon { key, reason }).await });
    }

    /// Charges the human's open sessions up to now and acts on what the
    /// store then says of their pools. Called before a change of the
    /// human's limits, so that usage until then counts against the limit as
    /// it was, and after it, so that the change reaches the sessions at once
    /// (a set-to-zero or a revocation closes them before this returns).
    /// Returns whether the store recorded it.
    pub async fn settle(&self, human: HumanId) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        self.send(Command::Settle { human, done_tx }).await;
        done_rx.await.unwrap_or(false)
    }

    /// Ends every session with `server_shutdown` and records their usage;
    /// sessions opened afterwards are ended at once. Returns whether all of
    /// it was recorded.
    pub async fn shutdown(&self) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        self.send(Command::Shutdown(done_tx)).await;
        done_rx.await.unwrap_or(false)
    }

    async fn send(&self, command: Command) {
        if self.commands_tx.send(command).await.is_err() {
            error!("the meter has stopped; a session command was lost");
        }
    }
}

/// Starts the meter task.
pub fn spawn(
    store: Arc<dyn Store>,
    settings: MeterSettings,
    health: Arc<Health>,
) -> (MeterHandle, JoinHandle<()>) {
    let (commands_tx, commands_rx) = mpsc::channel(COMMAND_QUEUE);
    let task = tokio::spawn(task::Meter::new(store, settings, health, commands_rx).run());
    (MeterHandle { commands_tx }, task)
}
