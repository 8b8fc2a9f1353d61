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
//!
//! Where other servers share the store (PostgreSQL), a pool's sessions may
//! be open on several of them, each metered by its own server. The store
//! answers each commit with the pool's sessions elsewhere and what they
//! have used beyond what was recorded, and the meter counts them among
//! the pool's sessions when it works out the instant the pool runs dry, so
//! that every server cuts its own sessions off at about the same instant.
//! Such pools are charged at every tick, so that what each server reads of
//! the others is at most a tick old, and every other pool is watched at
//! every tick (read, not charged), so that a change made through another
//! server (a top-up, a set-to-zero, a revocation, a first session
//! elsewhere) reaches this one's sessions within a tick.

mod figures;
mod pool;
mod task;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
/// one fails, set again by the next that succeeds), and no other server
/// has closed this one out of a shared store (see [`Health::supersede`]).
/// Admission refuses new sessions meanwhile.
#[derive(Debug)]
pub struct Health {
    recording: AtomicBool,
    superseded: watch::Sender<bool>,
}

impl Health {
    pub fn new() -> Arc<Health> {
        let superseded = watch::Sender::new(false);
        Arc::new(Health { recording: AtomicBool::new(true), superseded })
    }

    pub fn is_recording(&self) -> bool {
        self.commits() && !self.is_superseded()
    }

    /// Says that another server sharing the store has closed this one out
    /// as lost, and ended its sessions: this one records nothing more, and
    /// stops (see [`Health::superseded`]).
    pub fn supersede(&self) {
        self.superseded.send_replace(true);
    }

    /// Whether another server has closed this one out.
    pub fn is_superseded(&self) -> bool {
        *self.superseded.borrow()
    }

    /// Resolves once another server has closed this one out.
    pub async fn superseded(&self) {
        let _ = self.superseded.subscribe().wait_for(|superseded| *superseded).await;
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
