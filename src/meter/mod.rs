//! The meter: one task that owns the clock of every open session, charges
//! them all in one store transaction per tick, and cuts sessions off at the
//! instant their human's pool runs dry.
//!
//! Sessions of one human and limit type share a pool. Between two commits
//! a pool with `n` open sessions drains at `n` milliseconds per millisecond,
//! so the meter knows when it will reach zero and sets a timer for that
//! instant instead of waiting for the next tick. When the timer fires it
//! charges that pool's sessions up to the moment, and the store, which never
//! takes an enforced pool below zero, answers with what is left: zero means
//! close them, anything else (a top-up arrived) means carry on.
//!
//! Every commit answers with each charged pool's remaining value and its
//! human's revocation epoch, which is how a top-up, a set-to-zero or a
//! revocation made through the API reaches open sessions within one tick.

mod pool;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::{Span, debug, error, info};

use crate::clock;
use crate::close::EndReason;
use crate::limits::LimitType;
use crate::store::{
    Charge, HumanId, PoolState, SessionEnd, SessionKey, Store, StoreError, UsageBatch,
    UsageRecorded,
};

/// How many commands may wait for the meter. Session tasks that find it
/// full wait their turn; a command takes about a microsecond to handle, so
/// even a burst of thousands of opens and closes drains within a tick.
const COMMAND_QUEUE: usize = 4096;

/// The furthest ahead a cut-off timer is set. A pool that lasts longer gets
/// a timer this far out, which finds time left and is set again; every tick
/// sets it anew anyway.
const MAX_CUT_OFF_AHEAD: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Copy, Debug)]
pub struct MeterSettings {
    pub tick: Duration,
    /// Below this many milliseconds left, sessions are warned.
    pub warn_millis: i64,
}

/// Whether usage can be recorded. Cleared when a commit fails, set again by
/// the next one that succeeds; admission refuses new sessions meanwhile.
#[derive(Debug)]
pub struct Health {
    recording: AtomicBool,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health {
            recording: AtomicBool::new(true),
        })
    }

    pub fn is_recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    fn set_recording(&self, ok: bool) {
        self.recording.store(ok, Ordering::Relaxed);
    }
}

/// What the meter tells a session after each commit that concerns it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SessionUpdate {
    /// The pool's remaining milliseconds, `None` when unlimited.
    pub remaining_millis: Option<i64>,
    /// Milliseconds this session has been charged.
    pub used_millis: i64,
    /// The pool is below the warning threshold.
    pub low: bool,
    /// The meter has ended the session; close it with this reason.
    pub close: Option<EndReason>,
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

    /// Records the end of a session whose upgrade never completed. Usable
    /// where one cannot wait, such as `Drop`.
    pub fn abandon(&self, key: SessionKey) {
        let commands_tx = self.commands_tx.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // Only when the runtime itself is gone; the next start closes
            // the session's row as `server_restart`, with nothing charged.
            return;
        };
        runtime.spawn(async move { commands_tx.send(Command::Abandon { key }).await });
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
    let meter = Meter {
        store,
        settings,
        health,
        sessions: HashMap::new(),
        pools: HashMap::new(),
        deadlines: DelayQueue::new(),
        ending: Vec::new(),
        draining: false,
    };
    let task = tokio::spawn(meter.run(commands_rx));
    (MeterHandle { commands_tx }, task)
}

type PoolKey = (HumanId, LimitType);

/// An open session as the meter sees it.
struct Metered {
    pool: PoolKey,
    /// Everything before this instant has been recorded.
    committed_to: Instant,
    used_millis: i64,
    revocation_epoch: i64,
    updates_tx: watch::Sender<SessionUpdate>,
    span: Span,
}

/// The open sessions of one pool and what the store last said remains.
struct Pool {
    remaining: Option<i64>,
    members: Vec<SessionKey>,
    deadline: Option<delay_queue::Key>,
}

/// A session that has ended but whose last charge and end are not yet
/// recorded.
struct Ending {
    key: SessionKey,
    charge: Option<Charge>,
    reason: EndReason,
    span: Span,
}

struct Meter {
    store: Arc<dyn Store>,
    settings: MeterSettings,
    health: Arc<Health>,
    sessions: HashMap<SessionKey, Metered>,
    pools: HashMap<PoolKey, Pool>,
    deadlines: DelayQueue<PoolKey>,
    ending: Vec<Ending>,
    draining: bool,
}

impl Meter {
    async fn run(mut self, mut commands_rx: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands_rx.recv() => match command {
                    Some(command) => self.dispatch(command).await,
                    None => break,
                },
                _ = tick.tick() => self.tick().await,
                Some(expired) = self.deadlines.next() => self.cut_off(expired.into_inner()).await,
            }
            while let Ok(command) = commands_rx.try_recv() {
                self.dispatch(command).await;
            }
            // While the store is failing, endings are retried by the tick
            // rather than on every command.
            if !self.ending.is_empty() && self.health.is_recording() {
                self.commit(Vec::new(), Instant::now()).await;
            }
        }
        if !self.ending.is_empty() {
            self.commit(Vec::new(), Instant::now()).await;
        }
    }

    async fn dispatch(&mut self, command: Command) {
        match command {
            Command::Open(registration) => self.open(registration),
            Command::End { key, at, reason } => self.end(key, at, reason),
            Command::Abandon { key } => self.abandon(key),
            Command::Shutdown(done_tx) => self.shutdown(done_tx).await,
        }
    }

    fn open(&mut self, r: Registration) {
        let pool_key = (r.human, r.limit_type);
        self.sessions.insert(
            r.key,
            Metered {
                pool: pool_key,
                committed_to: r.started,
                used_millis: 0,
                revocation_epoch: r.revocation_epoch,
                updates_tx: r.updates_tx,
                span: r.span,
            },
        );
        let pool = self.pools.entry(pool_key).or_insert_with(|| Pool {
            remaining: r.remaining,
            members: Vec::new(),
            deadline: None,
        });
        pool.members.push(r.key);
        if self.draining {
            self.end(r.key, r.started, EndReason::ServerShutdown);
            return;
        }
        self.schedule(pool_key);
        self.notify(r.key);
    }

    /// Stops charging a session at `at` and queues its last charge and its
    /// end for the next commit. Both the session's own ends (the client left,
    /// its time limit came) and the meter's decisions come here, and the
    /// session is told to close; an end for a session already ended is
    /// ignored.
    fn end(&mut self, key: SessionKey, at: Instant, reason: EndReason) {
        let Some(session) = self.sessions.remove(&key) else {
            return;
        };
        let amount = pool::signed_millis(at, session.committed_to);
        let (human, limit_type) = session.pool;
        self.ending.push(Ending {
            key,
            charge: Some(Charge {
                session: key,
                human,
                limit_type,
                amount,
            }),
            reason,
            span: session.span.clone(),
        });
        self.leave_pool(key, session.pool);
        if reason.close_code().is_some() {
            session
                .updates_tx
                .send_modify(|update| update.close = Some(reason));
        }
    }

    fn abandon(&mut self, key: SessionKey) {
        debug!(
            session = key.0,
            "upgrade did not complete; nothing was charged"
        );
        self.ending.push(Ending {
            key,
            charge: None,
            reason: EndReason::UpgradeFailed,
            span: Span::none(),
        });
    }

    async fn shutdown(&mut self, done_tx: oneshot::Sender<bool>) {
        self.draining = true;
        let now = Instant::now();
        let keys: Vec<SessionKey> = self.sessions.keys().copied().collect();
        for key in keys {
            self.end(key, now, EndReason::ServerShutdown);
        }
        self.commit(Vec::new(), now).await;
        let _ = done_tx.send(self.ending.is_empty());
    }

    fn leave_pool(&mut self, key: SessionKey, pool_key: PoolKey) {
        if let Some(pool) = self.pools.get_mut(&pool_key) {
            pool.members.retain(|member| *member != key);
        }
        self.schedule(pool_key);
    }

    /// Sets the pool's cut-off timer from what remains and its open
    /// sessions, or drops the pool when none is left open.
    fn schedule(&mut self, pool_key: PoolKey) {
        let Some(pool) = self.pools.get_mut(&pool_key) else {
            return;
        };
        if let Some(deadline) = pool.deadline.take() {
            self.deadlines.remove(&deadline);
        }
        if pool.members.is_empty() {
            self.pools.remove(&pool_key);
            return;
        }
        let Some(remaining) = pool.remaining else {
            return;
        };
        let committed: Vec<Instant> = pool
            .members
            .iter()
            .map(|key| self.sessions[key].committed_to)
            .collect();
        // DelayQueue takes deadlines up to about two years ahead and panics
        // beyond; a pool with that much left is simply looked at again.
        let at = pool::exhaustion(remaining, &committed).min(Instant::now() + MAX_CUT_OFF_AHEAD);
        pool.deadline = Some(self.deadlines.insert_at(pool_key, at));
    }

    async fn tick(&mut self) {
        let keys: Vec<SessionKey> = self.sessions.keys().copied().collect();
        self.commit(keys, Instant::now()).await;
    }

    async fn cut_off(&mut self, pool_key: PoolKey) {
        let Some(pool) = self.pools.get_mut(&pool_key) else {
            return;
        };
        pool.deadline = None;
        let members = pool.members.clone();
        self.commit(members, Instant::now()).await;
    }

    /// Records, in one transaction, the open sessions `keys` up to `now`
    /// and every pending ending, then acts on what the store says remains.
    async fn commit(&mut self, keys: Vec<SessionKey>, now: Instant) {
        let mut batch = UsageBatch::default();
        let mut charged = Vec::with_capacity(keys.len());
        for key in keys {
            let session = &self.sessions[&key];
            let amount = pool::signed_millis(now, session.committed_to).max(0);
            let (human, limit_type) = session.pool;
            batch.charges.push(Charge {
                session: key,
                human,
                limit_type,
                amount,
            });
            charged.push((key, amount));
        }
        let ending = std::mem::take(&mut self.ending);
        for end in &ending {
            batch.charges.extend(end.charge);
            batch.ends.push(SessionEnd {
                session: end.key,
                reason: end.reason,
            });
        }
        if batch.charges.is_empty() && batch.ends.is_empty() {
            return;
        }

        match self.store.record_usage(batch, clock::now_millis()).await {
            Ok(recorded) => self.committed(charged, ending, recorded, now),
            Err(err) => {
                self.ending = ending;
                self.fail_closed(err, now);
            }
        }
    }

    fn committed(
        &mut self,
        charged: Vec<(SessionKey, i64)>,
        ending: Vec<Ending>,
        recorded: UsageRecorded,
        now: Instant,
    ) {
        if !self.health.is_recording() {
            info!("usage is being recorded again");
            self.health.set_recording(true);
        }
        for (key, amount) in charged {
            let session = self
                .sessions
                .get_mut(&key)
                .expect("charged sessions stay open");
            session.committed_to += Duration::from_millis(amount as u64);
            session.used_millis += amount;
        }
        // The store ends sessions in the order of the batch, which is the
        // order of `ending`.
        for (end, (_, charged)) in ending.iter().zip(&recorded.ended) {
            let seconds_used = *charged as f64 / 1000.0;
            end.span
                .in_scope(|| info!(reason = end.reason.as_str(), seconds_used, "session closed"));
        }
        for state in recorded.pools {
            self.apply(state, now);
        }
    }

    /// Acts on a pool's state after a commit: closes what was revoked or has
    /// run dry, reschedules the cut-off, and tells the sessions.
    fn apply(&mut self, state: PoolState, now: Instant) {
        let pool_key = (state.human, state.limit_type);
        let Some(pool) = self.pools.get_mut(&pool_key) else {
            return;
        };
        pool.remaining = state.remaining;
        let members = pool.members.clone();
        for key in members {
            if self.sessions[&key].revocation_epoch < state.revocation_epoch {
                self.end(key, now, EndReason::TokenRevoked);
            } else if state.remaining.is_some_and(|remaining| remaining <= 0) {
                self.end(key, now, EndReason::UsageLimitExceeded);
            } else {
                self.notify(key);
            }
        }
        self.schedule(pool_key);
    }

    /// Sends a session the latest figures of its pool.
    fn notify(&self, key: SessionKey) {
        let session = &self.sessions[&key];
        let remaining = self.pools[&session.pool].remaining;
        session.updates_tx.send_replace(SessionUpdate {
            remaining_millis: remaining,
            used_millis: session.used_millis,
            low: remaining.is_some_and(|left| left < self.settings.warn_millis),
            close: None,
        });
    }

    /// The store could not record usage: close every session rather than
    /// let them run unmetered. Their unrecorded time stays in `ending` and
    /// is retried every tick until the store takes it.
    fn fail_closed(&mut self, err: StoreError, now: Instant) {
        if self.health.is_recording() {
            error!(error = %err, "cannot record usage; closing every session until it works again");
            self.health.set_recording(false);
        }
        let keys: Vec<SessionKey> = self.sessions.keys().copied().collect();
        for key in keys {
            self.end(key, now, EndReason::Internal);
        }
    }
}
