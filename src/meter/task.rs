//! The meter task itself: its state (open sessions, their pools, the cut-off
//! timers, the ends still to be recorded) and the loop that drives it.
//!
//! A pool's picture is what the store answered at the last commit that
//! charged it, less the charges of sessions that have ended since and are
//! not yet recorded. While a commit waits for the store the meter goes on
//! receiving sessions' opens and ends, cutting pools off and warning them;
//! only what needs a commit of its own (a settle, the shutdown) waits for
//! it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rustc_hash::{FxHashMap, FxHashSet};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::{Span, debug, error, info, warn};

use super::figures::{self, Told, UsageEvents};
use super::{Command, Health, MeterSettings, Registration, SessionUpdate, pool};
use crate::clock;
use crate::close::EndReason;
use crate::limits::LimitType;
use crate::store::{
    BatchId, Charge, HumanId, PoolState, SessionEnd, SessionKey, Store, StoreError, StoreResult,
    UnixMillis, UsageBatch, UsageRecorded,
};

/// How long the close of a session the meter has ended may wait for the
/// store to record the end before it is sent anyway. Long enough for a
/// commit in the normal run of things, so that a client reading its limits
/// right after the close sees them recorded; short enough to keep cut-offs
/// precise while the store is slow.
const CLOSE_WAIT: Duration = Duration::from_millis(50);

/// The furthest ahead a cut-off timer is set. A pool that lasts longer gets
/// a timer this far out, which finds time left and is set again; every tick
/// sets it anew anyway. (DelayQueue refuses deadlines beyond about two
/// years.)
const MAX_CUT_OFF_AHEAD: Duration = Duration::from_secs(24 * 3600);

/// How long an open session's usage may wait to be recorded. Each tick
/// writes only the meter's clock and the sessions last recorded this long
/// ago (or whose pool needs the store's attention), so a tick costs a few
/// rows whatever the number of open sessions: writing every session at
/// every tick cost about 4.5 µs a session, 86 ms a tick at 19,000. The
/// clock bounds what a crash can lose to one tick: the next start charges
/// each session the run left open up to it. A settle records the human's
/// sessions at once, so a change or a read of their limits sees them up
/// to the moment.
const RECORD_EVERY: Duration = Duration::from_secs(60);

type PoolKey = (HumanId, LimitType);

/// An open session as the meter sees it.
struct Metered {
    pool: PoolKey,
    /// Everything before this instant has been recorded.
    committed_to: Instant,
    used_millis: i64,
    revocation_epoch: i64,
    /// Which of its figures the client asked for.
    events: UsageEvents,
    /// What the session was last told, from which its client counts down.
    told: Option<Told>,
    updates_tx: watch::Sender<SessionUpdate>,
    span: Span,
}

/// The open sessions of one pool and what the store last said remains.
struct Pool {
    /// What the store last said remains, less what the pool's sessions on
    /// other servers had used by then and not recorded (see [`Foreign`]).
    remaining: Option<i64>,
    members: Vec<SessionKey>,
    /// The pool's open sessions on other servers sharing the store, as of
    /// `foreign_from`: each drains the pool from then on, as this server's
    /// own sessions do from their last charge.
    foreign: u32,
    foreign_from: Instant,
    deadline: Option<delay_queue::Key>,
    /// The key of the pool's warning timer, set for when the pool falls
    /// below the warning line, while it is above it.
    warning: Option<delay_queue::Key>,
    /// Time is being given back to a dead client and the store has not yet
    /// said how much (its refund floor may cap it): until it has, the pool
    /// is not cut off on the meter's own reckoning.
    refund_pending: bool,
    /// Below this remaining value the store wants the pool recorded (a
    /// webhook's "running low" line).
    low_line: Option<i64>,
}

/// A session that has ended but whose last charge and end are not yet
/// recorded.
struct Ending {
    key: SessionKey,
    charge: Option<Charge>,
    reason: EndReason,
    span: Span,
    /// For an end the meter decided: the way to tell the session to close,
    /// once the end is recorded (or has waited [`CLOSE_WAIT`] for it).
    close_tx: Option<watch::Sender<SessionUpdate>>,
}

impl Ending {
    fn close_session(&self) {
        if let Some(close_tx) = &self.close_tx {
            close_tx.send_modify(|update| update.close = Some(self.reason));
        }
    }
}

/// What one commit charged the open sessions, to be taken into account
/// once the store has accepted it.
type Charged = Vec<(SessionKey, i64)>;

/// A batch whose commit failed, and which may have been applied all the
/// same: the answer to a COMMIT can be lost with the connection after the
/// database has committed. It is sent again, unchanged and under its id,
/// before anything else is recorded, until the store answers; a store that
/// has applied it answers without applying it twice. Meanwhile its charges
/// count as recorded for the sessions (later charges start where it ends)
/// and as unrecorded for their pools.
///
/// A batch the database keeps refusing, for a reason waiting does not mend
/// (a row it will not take), blocks every later one: the meter sends it
/// again at each commit and records nothing else, every session closed and
/// new ones refused, until the database takes it or the server restarts.
/// Each refusal is logged with the number of attempts, at most once every
/// [`RESEND_WARN_EVERY`].
struct Unsettled {
    batch: UsageBatch,
    wall: UnixMillis,
    at: BatchAt,
    ending: Vec<Ending>,
    /// How many times it has been sent again.
    resent: u64,
    /// When a refusal of it was last logged.
    warned_at: Option<Instant>,
}

/// How often, at most, a refusal of the unsettled batch is logged: every
/// commit sends it again, several a second at the shortest tick.
const RESEND_WARN_EVERY: Duration = Duration::from_secs(10);

impl Unsettled {
    fn new(batch: UsageBatch, wall: UnixMillis, at: BatchAt, ending: Vec<Ending>) -> Unsettled {
        Unsettled { batch, wall, at, ending, resent: 0, warned_at: None }
    }

    /// Counts a refused resend, and logs it unless one was logged within
    /// [`RESEND_WARN_EVERY`].
    fn refused(&mut self, err: &StoreError) {
        self.resent += 1;
        let now = Instant::now();
        if self.warned_at.is_some_and(|at| now.duration_since(at) < RESEND_WARN_EVERY) {
            return;
        }
        self.warned_at = Some(now);
        warn!(
            attempts = self.resent,
            error = %err,
            "a usage batch sent again was refused; nothing later is recorded until it is taken"
        );
    }
}

/// Pools that ran dry while a commit waited for the store, and when.
type Dry = Vec<(PoolKey, Instant)>;

/// A batch's moment, on the meter's clock: what the store answers of
/// other servers' sessions is reckoned up to it.
type BatchAt = Instant;

/// The figures of a session that asked for them at every tick
/// (`events=ticks`) are sent in one of this many turns spread evenly over
/// the tick, chosen by its key. Sent to every session at once, they were a
/// burst of work at the start of each tick (19,000 messages, a few hundred
/// milliseconds), and a cut-off that fell due in it waited behind it.
/// Other sessions are told when their figures change, not in turns
/// ([`figures`]).
const NOTIFY_TURNS: u32 = 10;

pub struct Meter {
    store: Arc<dyn Store>,
    settings: MeterSettings,
    health: Arc<Health>,
    commands_rx: mpsc::Receiver<Command>,
    /// Commands received while a commit waited for the store that need a
    /// commit of their own.
    held: VecDeque<Command>,
    /// Every handle is gone: once `held` is empty, the meter stops.
    handles_gone: bool,
    // Hashed with FxHash rather than SipHash: the keys are the store's row
    // ids, not chosen by clients, and the meter looks sessions and pools up
    // at every turn, charge and commit.
    sessions: FxHashMap<SessionKey, Metered>,
    pools: FxHashMap<PoolKey, Pool>,
    /// The open sessions whose clients asked for their figures at every
    /// tick, by the turn they are told in.
    every_tick_by_turn: Vec<FxHashSet<SessionKey>>,
    deadlines: DelayQueue<PoolKey>,
    /// When pools fall below the warning line, for their sessions to be
    /// told: nothing else changes their figures as time passes.
    warnings: DelayQueue<PoolKey>,
    ending: Vec<Ending>,
    /// The charges of ended sessions in the commit waiting for the store.
    in_flight: Vec<Charge>,
    unsettled: Option<Unsettled>,
    /// Sessions that opened a pool the meter did not know: their figures
    /// came from admission and may be stale, so the next commit charges
    /// them to bring back the store's, and tells them the store's figures
    /// as their first.
    fresh: Vec<SessionKey>,
    draining: bool,
}

impl Meter {
    pub fn new(
        store: Arc<dyn Store>,
        settings: MeterSettings,
        health: Arc<Health>,
        commands_rx: mpsc::Receiver<Command>,
    ) -> Meter {
        Meter {
            store,
            settings,
            health,
            commands_rx,
            held: VecDeque::new(),
            handles_gone: false,
            sessions: FxHashMap::default(),
            pools: FxHashMap::default(),
            every_tick_by_turn: (0..NOTIFY_TURNS).map(|_| FxHashSet::default()).collect(),
            deadlines: DelayQueue::new(),
            warnings: DelayQueue::new(),
            ending: Vec::new(),
            in_flight: Vec::new(),
            unsettled: None,
            fresh: Vec::new(),
            draining: false,
        }
    }

    /// Runs until every handle is gone, then records what is left. Ticks
    /// and cut-offs come first, then commands; what they left to record is
    /// committed whenever nothing else is ready.
    pub async fn run(mut self) {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut turns = tokio::time::interval(self.settings.tick / NOTIFY_TURNS);
        turns.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut turn = 0;
        while !(self.handles_gone && self.held.is_empty()) {
            let idle = (self.ending.is_empty() && self.fresh.is_empty()) || !self.health.commits();
            tokio::select! {
                biased;
                _ = tick.tick() => self.tick().await,
                Some(expired) = self.deadlines.next() => self.deadline(expired.into_inner()),
                Some(expired) = self.warnings.next() => self.warning(expired.into_inner()),
                _ = turns.tick() => {
                    self.notify_turn(turn);
                    turn = (turn + 1) % self.every_tick_by_turn.len();
                }
                command = next_command(&mut self.held, &mut self.commands_rx) => match command {
                    Some(command) => self.dispatch(command).await,
                    None => self.handles_gone = true,
                },
                _ = std::future::ready(()), if !idle => self.flush().await,
            }
        }
        if self.has_unrecorded() {
            self.commit(Vec::new()).await;
        }
    }

    /// Whether ends or a batch whose fate is unknown are waiting to be
    /// recorded.
    fn has_unrecorded(&self) -> bool {
        !self.ending.is_empty() || self.unsettled.is_some()
    }

    async fn dispatch(&mut self, command: Command) {
        match self.dispatch_now(command) {
            Some(Command::Settle { human, done_tx }) => {
                let mut recorded = self.commit(self.members_of(human)).await;
                // Ends the commit decided (a revocation, a pool set to
                // zero) are recorded, and their sessions closed, before the
                // answer.
                while recorded && !self.ending.is_empty() {
                    recorded = self.commit(Vec::new()).await;
                }
                let _ = done_tx.send(recorded);
            }
            Some(Command::Shutdown(done_tx)) => self.shutdown(done_tx).await,
            _ => {}
        }
    }

    /// Handles what needs no commit and hands back what does.
    fn dispatch_now(&mut self, command: Command) -> Option<Command> {
        match command {
            Command::Open(registration) => self.open(registration),
            Command::End { key, at, reason } => self.end(key, at, reason),
            Command::Abandon { key, reason } => self.abandon(key, reason),
            command => return Some(command),
        }
        None
    }

    fn open(&mut self, r: Registration) {
        let pool_key = (r.human, r.limit_type);
        open_sessions(r.limit_type).increment(1.0);
        let session = Metered {
            pool: pool_key,
            committed_to: r.started,
            used_millis: 0,
            revocation_epoch: r.revocation_epoch,
            events: r.events,
            told: None,
            updates_tx: r.updates_tx,
            span: r.span,
        };
        if r.events == UsageEvents::EveryTick {
            self.every_tick_by_turn[turn_of(r.key)].insert(r.key);
        }
        self.sessions.insert(r.key, session);
        let fresh = !self.pools.contains_key(&pool_key);
        if fresh {
            self.fresh.push(r.key);
        }
        let pool = self.pools.entry(pool_key).or_insert_with(|| Pool {
            remaining: r.remaining,
            members: Vec::new(),
            foreign: 0,
            foreign_from: r.started,
            deadline: None,
            warning: None,
            refund_pending: false,
            low_line: None,
        });
        pool.members.push(r.key);
        if self.draining {
            self.end_and_close(r.key, r.started, EndReason::ServerShutdown);
            return;
        }
        self.schedule(pool_key);
        // A fresh session hears from the commit that follows at once; told
        // now as well, it would get its first figures twice. Otherwise the
        // pool's other sessions now drain it faster, and are told too.
        if !fresh {
            self.notify_pool(pool_key, Instant::now());
        }
    }

    /// The session ended on its own side (the client left, its time limit
    /// came): stops charging it at `at`, which may lie in the past (a dead
    /// client is charged only up to its last frame).
    fn end(&mut self, key: SessionKey, at: Instant, reason: EndReason) {
        self.stop(key, at, reason, false);
    }

    /// The meter ends a session: as [`Meter::end`], and the session is told
    /// to close once the end is recorded.
    fn end_and_close(&mut self, key: SessionKey, at: Instant, reason: EndReason) {
        self.stop(key, at, reason, true);
    }

    /// Queues a session's last charge and its end for the next commit. An
    /// end for a session already ended is ignored.
    fn stop(&mut self, key: SessionKey, at: Instant, reason: EndReason, close: bool) {
        let Some(session) = self.sessions.remove(&key) else {
            return;
        };
        self.every_tick_by_turn[turn_of(key)].remove(&key);
        open_sessions(session.pool.1).decrement(1.0);
        let amount = pool::signed_millis(at, session.committed_to);
        let (human, limit_type) = session.pool;
        let charge = Some(Charge { session: key, human, limit_type, amount });
        let close_tx = close.then_some(session.updates_tx);
        self.ending.push(Ending { key, charge, reason, span: session.span, close_tx });
        if let Some(pool) = self.pools.get_mut(&session.pool) {
            pool.refund_pending |= amount < 0;
        }
        self.leave_pool(key, session.pool);
    }

    fn abandon(&mut self, key: SessionKey, reason: EndReason) {
        debug!(session = key.0, reason = reason.as_str(), "session never started");
        self.ending.push(Ending { key, charge: None, reason, span: Span::none(), close_tx: None });
    }

    async fn shutdown(&mut self, done_tx: oneshot::Sender<bool>) {
        self.draining = true;
        let now = Instant::now();
        for key in self.open_keys() {
            self.end_and_close(key, now, EndReason::ServerShutdown);
        }
        let mut recorded = true;
        while recorded && self.has_unrecorded() {
            recorded = self.commit(Vec::new()).await;
        }
        let _ = done_tx.send(recorded);
    }

    fn open_keys(&self) -> Vec<SessionKey> {
        self.sessions.keys().copied().collect()
    }

    /// The open sessions of every pool of the human.
    fn members_of(&self, human: HumanId) -> Vec<SessionKey> {
        LimitType::ALL
            .iter()
            .filter_map(|limit_type| self.pools.get(&(human, *limit_type)))
            .flat_map(|pool| pool.members.iter().copied())
            .collect()
    }

    fn leave_pool(&mut self, key: SessionKey, pool_key: PoolKey) {
        if let Some(pool) = self.pools.get_mut(&pool_key) {
            pool.members.retain(|member| *member != key);
        }
        self.schedule(pool_key);
        // The others now drain the pool more slowly: told at once, not at
        // their turn, so that their clients count down at the new rate.
        self.notify_pool(pool_key, Instant::now());
    }

    /// Tells every open session of a pool its figures, those whose clients
    /// are to hear them: the pool's sessions changed.
    fn notify_pool(&mut self, pool_key: PoolKey, now: Instant) {
        let members = self.pools.get(&pool_key).map(|pool| pool.members.clone());
        for key in members.unwrap_or_default() {
            self.notify(key, now);
        }
    }

    /// What ended sessions of the pool have used that the store has not
    /// recorded yet.
    fn unrecorded(&self, pool_key: PoolKey) -> i64 {
        self.queued_charges()
            .filter(|charge| (charge.human, charge.limit_type) == pool_key && charge.amount > 0)
            .map(|charge| charge.amount)
            .sum()
    }

    /// The charges the store has not answered for: of ended sessions, and
    /// of the unsettled batch.
    fn queued_charges(&self) -> impl Iterator<Item = &Charge> {
        let queued = self.ending.iter().filter_map(|end| end.charge.as_ref());
        let unsettled = self.unsettled.iter().flat_map(|unsettled| &unsettled.batch.charges);
        queued.chain(&self.in_flight).chain(unsettled)
    }

    /// When the pool runs dry, from what remains and its open sessions.
    /// `None` for an unlimited or unknown pool.
    fn dry_at(&self, pool_key: PoolKey) -> Option<Instant> {
        self.falls_to(pool_key, 0)
    }

    /// When what remains of the pool falls to `level`, from what remains
    /// now and its open sessions: now or earlier if it is there already.
    /// `None` for an unlimited or unknown pool.
    fn falls_to(&self, pool_key: PoolKey, level: i64) -> Option<Instant> {
        let pool = self.pools.get(&pool_key)?;
        let remaining = pool.remaining? - self.unrecorded(pool_key) - level;
        let own = pool.members.iter().map(|key| self.sessions[key].committed_to);
        let foreign = std::iter::repeat_n(pool.foreign_from, pool.foreign as usize);
        let committed: Vec<Instant> = own.chain(foreign).collect();
        (!pool.members.is_empty()).then(|| pool::exhaustion(remaining, &committed))
    }

    /// Sets the pool's cut-off and warning timers, or drops the pool when
    /// none of its sessions is left open.
    fn schedule(&mut self, pool_key: PoolKey) {
        let dry_at = self.dry_at(pool_key);
        let low_at = self.low_at(pool_key);
        let Some(pool) = self.pools.get_mut(&pool_key) else {
            return;
        };
        if let Some(deadline) = pool.deadline.take() {
            self.deadlines.remove(&deadline);
        }
        if let Some(warning) = pool.warning.take() {
            self.warnings.remove(&warning);
        }
        if pool.members.is_empty() {
            self.pools.remove(&pool_key);
            return;
        }
        let furthest = Instant::now() + MAX_CUT_OFF_AHEAD;
        if let Some(at) = dry_at {
            pool.deadline = Some(self.deadlines.insert_at(pool_key, at.min(furthest)));
        }
        if let Some(at) = low_at {
            pool.warning = Some(self.warnings.insert_at(pool_key, at.min(furthest)));
        }
    }

    /// When the pool's figures fall below the warning line, if they are not
    /// below it now. The figures count each session's use in whole
    /// milliseconds, up to a millisecond short of its time, so the timer is
    /// set for when the pool's exact remainder reaches the line less a
    /// millisecond a session and one more. A line closer to empty than that
    /// cannot be told before the pool is dry: such a pool is not warned,
    /// only cut off.
    fn low_at(&self, pool_key: PoolKey) -> Option<Instant> {
        let warn = self.settings.warn_millis;
        if warn <= 0 || self.live_remaining(pool_key, Instant::now())? < warn {
            return None;
        }
        let pool = &self.pools[&pool_key];
        let sessions = pool.members.len() as i64 + i64::from(pool.foreign);
        let level = warn - sessions - 1;
        if level <= 0 {
            return None;
        }
        self.falls_to(pool_key, level)
    }

    /// A warning timer went off: the pool's sessions are told, their
    /// figures now below the line; the timer is set again if they are not
    /// yet (it was capped). The cut-off timer is left as it is.
    fn warning(&mut self, pool_key: PoolKey) {
        let Some(pool) = self.pools.get_mut(&pool_key) else {
            return;
        };
        pool.warning = None;
        let now = Instant::now();
        if self.live_remaining(pool_key, now).is_some_and(|left| left < self.settings.warn_millis) {
            self.notify_pool(pool_key, now);
        }
        if let Some(at) = self.low_at(pool_key) {
            let key = self.warnings.insert_at(pool_key, at.min(now + MAX_CUT_OFF_AHEAD));
            self.pools.get_mut(&pool_key).expect("the pool is open").warning = Some(key);
        }
    }

    /// A cut-off timer went off: if the pool has run dry, close its
    /// sessions now; if not (the timer was capped), set it again.
    fn deadline(&mut self, pool_key: PoolKey) {
        if let Some(dry_at) = self.timer_went_off(pool_key) {
            self.cut_off(pool_key, dry_at);
        }
    }

    /// Takes note of an expired timer and tells the pool's sessions to close
    /// if it has run dry, returning the instant it did. A pool waiting for a
    /// refund's answer is left to the commit that brings it.
    fn timer_went_off(&mut self, pool_key: PoolKey) -> Option<Instant> {
        let pool = self.pools.get_mut(&pool_key)?;
        pool.deadline = None;
        if pool.refund_pending {
            return None;
        }
        let dry_at = self.dry_at(pool_key)?;
        if dry_at > Instant::now() + Duration::from_millis(1) {
            self.schedule(pool_key);
            return None;
        }
        for key in &self.pools[&pool_key].members {
            let reason = Some(EndReason::UsageLimitExceeded);
            self.sessions[key].updates_tx.send_modify(|update| update.close = reason);
        }
        Some(dry_at)
    }

    /// Ends a pool's sessions at the instant it ran dry, each charged up to
    /// then, rounded up to the millisecond: the store cuts the last charge
    /// to what is left, so the pool ends at exactly zero.
    fn cut_off(&mut self, pool_key: PoolKey, dry_at: Instant) {
        let Some(pool) = self.pools.get(&pool_key) else {
            return;
        };
        for key in pool.members.clone() {
            let committed_to = self.sessions[&key].committed_to;
            let millis = pool::millis_up_to(dry_at, committed_to);
            let at = committed_to + Duration::from_millis(millis as u64);
            self.end_and_close(key, at, EndReason::UsageLimitExceeded);
        }
    }

    /// Records the sessions that are due and the meter's clock. On a store
    /// other servers share, it does so even with no session open, which
    /// tells them this server is alive, and watches every pool it has open
    /// for what the others changed.
    async fn tick(&mut self) {
        let mut fresh = std::mem::take(&mut self.fresh);
        let shared = self.store.is_shared();
        if self.sessions.is_empty() && !self.has_unrecorded() && !shared {
            return;
        }
        let started = std::time::Instant::now();
        // The fresh sessions go with it: they hear their first figures from
        // the commit that charges them, and nothing else would tell them.
        let mut due = self.due(Instant::now());
        due.append(&mut fresh);
        due.retain(|key| self.sessions.contains_key(key));
        due.sort_unstable_by_key(|key| key.0);
        due.dedup();
        let watch = if shared { self.pools.keys().copied().collect() } else { Vec::new() };
        self.commit_with(due, watch, true).await;
        metrics::histogram!(crate::metrics::TICK_SECONDS).record(started.elapsed().as_secs_f64());
    }

    /// Tells the sessions of one of the [`NOTIFY_TURNS`] turns that asked
    /// for their figures at every tick those figures as of now.
    fn notify_turn(&mut self, turn: usize) {
        let now = Instant::now();
        let keys: Vec<SessionKey> = self.every_tick_by_turn[turn].iter().copied().collect();
        for key in keys {
            self.notify(key, now);
        }
    }

    /// The open sessions whose usage is to be recorded at this tick: those
    /// last recorded [`RECORD_EVERY`] ago, those of pools that have fallen
    /// below their low line, and those of pools that sessions on other
    /// servers draw on too, whose figures every server then reckons with.
    fn due(&self, now: Instant) -> Vec<SessionKey> {
        let below_line = |pool_key: PoolKey, pool: &Pool| {
            pool.low_line.is_some_and(|line| {
                self.live_remaining(pool_key, now).is_some_and(|left| left < line)
            })
        };
        let every_tick: FxHashSet<PoolKey> = self
            .pools
            .iter()
            .filter(|(pool_key, pool)| pool.foreign > 0 || below_line(**pool_key, pool))
            .map(|(pool_key, _)| *pool_key)
            .collect();
        let is_due = |session: &Metered| {
            now.saturating_duration_since(session.committed_to) >= RECORD_EVERY
                || every_tick.contains(&session.pool)
        };
        self.sessions.iter().filter(|(_, session)| is_due(session)).map(|(key, _)| *key).collect()
    }

    /// Records the ends and the fresh sessions left by what just happened.
    async fn flush(&mut self) {
        let fresh = std::mem::take(&mut self.fresh);
        let open: Vec<SessionKey> =
            fresh.into_iter().filter(|key| self.sessions.contains_key(key)).collect();
        self.commit(open).await;
    }

    /// Records, in one transaction, the open sessions `keys` up to now and
    /// every pending ending, then acts on what the store says remains.
    /// Returns whether the store took it.
    async fn commit(&mut self, keys: Vec<SessionKey>) -> bool {
        self.commit_with(keys, Vec::new(), false).await
    }

    /// As [`Meter::commit`], with the pools `watch` reported on too (see
    /// [`UsageBatch::watch`]); with `always`, the transaction goes to the
    /// store even with nothing in it but the meter's clock.
    async fn commit_with(
        &mut self,
        keys: Vec<SessionKey>,
        watch: Vec<PoolKey>,
        always: bool,
    ) -> bool {
        if self.health.is_superseded() {
            self.drop_unrecorded();
            return false;
        }
        if !self.resend_unsettled().await {
            return false;
        }
        // The wall-clock time the store records with the charges is read
        // with the instant they run to, so that the two say the same moment
        // (what a crash leaves is charged from the one to the other).
        let (now, wall) = (Instant::now(), clock::now_millis());
        let (mut batch, charged) = self.batch(keys, now);
        batch.watch = watch;
        let ending = std::mem::take(&mut self.ending);
        let batch = with_endings(batch, &ending);
        if batch.charges.is_empty() && batch.ends.is_empty() && !always {
            return true;
        }
        self.in_flight = ending.iter().filter_map(|end| end.charge).collect();
        let (result, dry) = self.record(batch.clone(), wall, &ending).await;
        self.in_flight.clear();
        ending.iter().for_each(Ending::close_session);
        match result {
            Ok(recorded) => {
                self.committed(charged, ending, recorded, dry, now);
                true
            }
            Err(StoreError::Superseded) => {
                self.superseded();
                false
            }
            Err(err) => {
                for (key, amount) in charged {
                    self.recorded_charge(key, amount);
                }
                self.unsettled = Some(Unsettled::new(batch, wall, now, ending));
                self.cut_off_all(dry);
                self.fail_closed(err);
                false
            }
        }
    }

    /// Sends the unsettled batch again, if there is one, and acts on the
    /// store's answer as on a commit's. Returns whether the store took it.
    async fn resend_unsettled(&mut self) -> bool {
        let Some(mut unsettled) = self.unsettled.take() else {
            return true;
        };
        self.in_flight = unsettled.batch.charges.clone();
        let resent = self.record(unsettled.batch.clone(), unsettled.wall, &unsettled.ending);
        let (result, dry) = resent.await;
        self.in_flight.clear();
        match result {
            Ok(recorded) => {
                self.committed(Vec::new(), unsettled.ending, recorded, dry, unsettled.at);
                true
            }
            Err(StoreError::Superseded) => {
                self.superseded();
                false
            }
            Err(err) => {
                unsettled.refused(&err);
                self.unsettled = Some(unsettled);
                self.cut_off_all(dry);
                self.fail_closed(err);
                false
            }
        }
    }

    /// Another server sharing the store has closed this one out as lost
    /// (see [`Health::supersede`]): it has charged this one's open sessions
    /// up to the meter's last clock and ended them, so nothing of theirs is
    /// recorded here any more. Every session is closed and what was waiting
    /// to be recorded is dropped.
    fn superseded(&mut self) {
        if !self.health.is_superseded() {
            error!("another server closed this one out as lost; recording nothing more");
            self.health.supersede();
        }
        self.drop_unrecorded();
    }

    /// Closes every session and forgets what was to be recorded.
    fn drop_unrecorded(&mut self) {
        let now = Instant::now();
        for key in self.open_keys() {
            self.end_and_close(key, now, EndReason::Internal);
        }
        self.ending.iter().for_each(Ending::close_session);
        self.ending.clear();
        self.unsettled = None;
    }

    /// Charges for the open sessions `keys` from their last commit to `now`.
    fn batch(&self, keys: Vec<SessionKey>, now: Instant) -> (UsageBatch, Charged) {
        let mut batch = UsageBatch { id: Some(BatchId::random()), ..UsageBatch::default() };
        let mut charged = Vec::with_capacity(keys.len());
        for key in keys {
            let session = &self.sessions[&key];
            let amount = pool::signed_millis(now, session.committed_to).max(0);
            let (human, limit_type) = session.pool;
            batch.charges.push(Charge { session: key, human, limit_type, amount });
            charged.push((key, amount));
        }
        (batch, charged)
    }

    /// Hands the batch to the store. Meanwhile the meter goes on: opens and
    /// ends are taken in, settles and the shutdown are held for later, and
    /// cut-offs that fall due do not wait either: their sessions are told to
    /// close at once, and the pools and instants are returned, to be ended
    /// once the store has answered. Sessions whose end is in the batch are
    /// told to close if the store takes longer than [`CLOSE_WAIT`].
    async fn record(
        &mut self,
        batch: UsageBatch,
        wall: UnixMillis,
        ending: &[Ending],
    ) -> (StoreResult<UsageRecorded>, Dry) {
        let store = self.store.clone();
        let recording = store.record_usage(batch, wall);
        tokio::pin!(recording);
        let close_anyway = tokio::time::sleep(CLOSE_WAIT);
        tokio::pin!(close_anyway);
        let mut waited = false;
        let mut dry = Vec::new();
        loop {
            tokio::select! {
                result = &mut recording => return (result, dry),
                _ = &mut close_anyway, if !waited => {
                    waited = true;
                    ending.iter().for_each(Ending::close_session);
                }
                Some(expired) = self.deadlines.next() => {
                    let pool_key = expired.into_inner();
                    if let Some(at) = self.timer_went_off(pool_key) {
                        dry.push((pool_key, at));
                    }
                }
                Some(expired) = self.warnings.next() => self.warning(expired.into_inner()),
                command = self.commands_rx.recv(), if !self.handles_gone => match command {
                    Some(command) => {
                        if let Some(command) = self.dispatch_now(command) {
                            self.held.push_back(command);
                        }
                    }
                    None => self.handles_gone = true,
                },
            }
        }
    }

    fn cut_off_all(&mut self, dry: Dry) {
        for (pool_key, at) in dry {
            self.cut_off(pool_key, at);
        }
    }

    fn committed(
        &mut self,
        charged: Charged,
        ending: Vec<Ending>,
        recorded: UsageRecorded,
        dry: Dry,
        at: BatchAt,
    ) {
        if !self.health.commits() {
            info!("usage is being recorded again");
            self.health.set_recording(true);
        }
        for (key, amount) in charged {
            self.recorded_charge(key, amount);
        }
        // The store ends sessions in the order of the batch, which is the
        // order of `ending`.
        for (end, (_, charged)) in ending.iter().zip(&recorded.ended) {
            let seconds_used = *charged as f64 / 1000.0;
            end.span
                .in_scope(|| info!(reason = end.reason.as_str(), seconds_used, "session closed"));
        }
        self.cut_off_all(dry);
        for state in recorded.pools {
            self.apply(state, at);
        }
    }

    /// The store recorded `amount` for a session. If it ended while the
    /// store worked, its last charge, reckoned from before, no longer needs
    /// that part.
    fn recorded_charge(&mut self, key: SessionKey, amount: i64) {
        if let Some(session) = self.sessions.get_mut(&key) {
            session.committed_to += Duration::from_millis(amount as u64);
            session.used_millis += amount;
        } else if let Some(charge) =
            self.ending.iter_mut().find(|end| end.key == key).and_then(|end| end.charge.as_mut())
        {
            charge.amount -= amount;
        }
    }

    /// Acts on a pool's state after the commit of the batch of moment `at`:
    /// closes what was revoked or has run dry, reschedules the cut-off, and
    /// tells the sessions.
    fn apply(&mut self, state: PoolState, at: BatchAt) {
        let pool_key = (state.human, state.limit_type);
        let refunds = |c: &Charge| (c.human, c.limit_type) == pool_key && c.amount < 0;
        let refund_pending = self.queued_charges().any(refunds);
        let Some(pool) = self.pools.get_mut(&pool_key) else {
            return;
        };
        pool.remaining = state.remaining.map(|left| left - state.foreign.unrecorded);
        pool.foreign = state.foreign.sessions;
        pool.foreign_from = at;
        pool.low_line = state.low_line;
        pool.refund_pending = refund_pending;
        let now = Instant::now();
        let dry = pool.remaining.is_some_and(|remaining| remaining <= 0);
        for key in pool.members.clone() {
            if self.sessions[&key].revocation_epoch < state.revocation_epoch {
                self.end_and_close(key, now, EndReason::TokenRevoked);
            } else if dry {
                self.end_and_close(key, now, EndReason::UsageLimitExceeded);
            } else {
                self.notify(key, now);
            }
        }
        self.schedule(pool_key);
    }

    /// Sends a session its figures and its pool's as of `now`, if its
    /// client is to hear them.
    fn notify(&mut self, key: SessionKey, now: Instant) {
        if self.sessions[&key].events == UsageEvents::Off {
            return;
        }
        let update = self.figures_of(key, now);
        let session = self.sessions.get_mut(&key).expect("only open sessions are told");
        if !figures::worth_sending(session.events, session.told.as_ref(), &update, now) {
            return;
        }
        session.told = Some(Told { at: now, update });
        session.updates_tx.send_replace(update);
    }

    /// A session's figures and its pool's as of `now`.
    fn figures_of(&self, key: SessionKey, now: Instant) -> SessionUpdate {
        let session = &self.sessions[&key];
        let remaining = self.live_remaining(session.pool, now);
        let running = pool::signed_millis(now, session.committed_to).max(0);
        let pool = self.pools.get(&session.pool);
        let sessions = pool.map_or(0, |pool| pool.members.len() + pool.foreign as usize);
        SessionUpdate {
            remaining_millis: remaining,
            used_millis: session.used_millis + running,
            sessions: u32::try_from(sessions).unwrap_or(u32::MAX),
            low: remaining.is_some_and(|left| left < self.settings.warn_millis),
            close: None,
            at: Some(now),
        }
    }

    /// What remains of a pool at `now`: what the store last said, less what
    /// has been used since and not yet recorded. `None` for an unlimited or
    /// unknown pool.
    fn live_remaining(&self, pool_key: PoolKey, now: Instant) -> Option<i64> {
        let pool = self.pools.get(&pool_key)?;
        let running: i64 = pool
            .members
            .iter()
            .map(|key| pool::signed_millis(now, self.sessions[key].committed_to).max(0))
            .sum();
        let foreign = i64::from(pool.foreign) * pool::signed_millis(now, pool.foreign_from).max(0);
        Some((pool.remaining? - self.unrecorded(pool_key) - running - foreign).max(0))
    }

    /// The store could not record usage: close every session rather than
    /// let them run unmetered, charged up to this moment. Their unrecorded
    /// time stays in `ending`, and the failed batch in `unsettled`, both
    /// tried again every tick until the store takes them.
    fn fail_closed(&mut self, err: StoreError) {
        if self.health.commits() {
            error!(error = %err, "cannot record usage; closing every session until it works again");
            self.health.set_recording(false);
        }
        let now = Instant::now();
        for key in self.open_keys() {
            self.end_and_close(key, now, EndReason::Internal);
        }
        self.ending.iter().for_each(Ending::close_session);
    }
}

/// The next command: one held back during a commit, or a new one.
async fn next_command(
    held: &mut VecDeque<Command>,
    commands_rx: &mut mpsc::Receiver<Command>,
) -> Option<Command> {
    match held.pop_front() {
        Some(command) => Some(command),
        None => commands_rx.recv().await,
    }
}

fn with_endings(mut batch: UsageBatch, ending: &[Ending]) -> UsageBatch {
    for end in ending {
        batch.charges.extend(end.charge);
        batch.ends.push(SessionEnd { session: end.key, reason: end.reason });
    }
    batch
}

/// The turn a session is told its figures in, of the [`NOTIFY_TURNS`].
fn turn_of(key: SessionKey) -> usize {
    key.0.rem_euclid(i64::from(NOTIFY_TURNS)) as usize
}

/// The gauge of open sessions of the kind that draws on `limit_type`.
fn open_sessions(limit_type: LimitType) -> metrics::Gauge {
    let kind = match limit_type {
        LimitType::VoiceSynthesisSeconds => "voice_synthesis",
        _ => "conversational",
    };
    metrics::gauge!(crate::metrics::OPEN_SESSIONS, "kind" => kind)
}
