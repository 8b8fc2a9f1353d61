//! The meter task itself: its state (open sessions, their pools, the cut-off
//! timers, the ends still to be recorded) and the loop that drives it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::time::{DelayQueue, delay_queue};
use tracing::{Span, debug, error, info};

use super::{Command, Health, MeterSettings, Registration, SessionUpdate, pool};
use crate::clock;
use crate::close::EndReason;
use crate::limits::LimitType;
use crate::store::{
    Charge, HumanId, PoolState, SessionEnd, SessionKey, Store, StoreError, StoreResult, UsageBatch,
    UsageRecorded,
};

/// The furthest ahead a cut-off timer is set. A pool that lasts longer gets
/// a timer this far out, which finds time left and is set again; every tick
/// sets it anew anyway. (DelayQueue refuses deadlines beyond about two
/// years.)
const MAX_CUT_OFF_AHEAD: Duration = Duration::from_secs(24 * 3600);

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

/// What one commit charged the open sessions, to be taken into account
/// once the store has accepted it.
type Charged = Vec<(SessionKey, i64)>;

pub struct Meter {
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
    pub fn new(store: Arc<dyn Store>, settings: MeterSettings, health: Arc<Health>) -> Meter {
        Meter {
            store,
            settings,
            health,
            sessions: HashMap::new(),
            pools: HashMap::new(),
            deadlines: DelayQueue::new(),
            ending: Vec::new(),
            draining: false,
        }
    }

    /// Runs until every handle is gone, then records what is left.
    pub async fn run(mut self, mut commands_rx: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands_rx.recv() => match command {
                    Some(command) => self.dispatch(command).await,
                    None => break,
                },
                _ = tick.tick() => self.tick().await,
                Some(expired) = self.deadlines.next() => self.deadline(expired.into_inner()),
            }
            while let Ok(command) = commands_rx.try_recv() {
                self.dispatch(command).await;
            }
            // While the store is failing, endings are retried by the tick
            // rather than on every command.
            if !self.ending.is_empty() && self.health.is_recording() {
                self.commit(Vec::new()).await;
            }
        }
        if !self.ending.is_empty() {
            self.commit(Vec::new()).await;
        }
    }

    async fn dispatch(&mut self, command: Command) {
        match command {
            Command::Open(registration) => self.open(registration),
            Command::End { key, at, reason } => self.end(key, at, reason),
            Command::Abandon { key } => self.abandon(key),
            Command::Settle { human, done_tx } => {
                self.commit(self.members_of(human)).await;
                let _ = done_tx.send(());
            }
            Command::Shutdown(done_tx) => self.shutdown(done_tx).await,
        }
    }

    fn open(&mut self, r: Registration) {
        let pool_key = (r.human, r.limit_type);
        let session = Metered {
            pool: pool_key,
            committed_to: r.started,
            used_millis: 0,
            revocation_epoch: r.revocation_epoch,
            updates_tx: r.updates_tx,
            span: r.span,
        };
        self.sessions.insert(r.key, session);
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
        let charge = Charge { session: key, human, limit_type, amount };
        let span = session.span.clone();
        self.ending.push(Ending { key, charge: Some(charge), reason, span });
        self.leave_pool(key, session.pool);
        if reason.close_code().is_some() {
            session.updates_tx.send_modify(|update| update.close = Some(reason));
        }
    }

    fn abandon(&mut self, key: SessionKey) {
        debug!(session = key.0, "upgrade did not complete; nothing was charged");
        let reason = EndReason::UpgradeFailed;
        self.ending.push(Ending { key, charge: None, reason, span: Span::none() });
    }

    async fn shutdown(&mut self, done_tx: oneshot::Sender<bool>) {
        self.draining = true;
        let now = Instant::now();
        for key in self.open_keys() {
            self.end(key, now, EndReason::ServerShutdown);
        }
        self.commit(Vec::new()).await;
        let _ = done_tx.send(self.ending.is_empty());
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
    }

    /// When the pool runs dry, from what remains and its open sessions.
    /// `None` for an unlimited or unknown pool.
    fn dry_at(&self, pool_key: PoolKey) -> Option<Instant> {
        let pool = self.pools.get(&pool_key)?;
        let remaining = pool.remaining?;
        let committed: Vec<Instant> =
            pool.members.iter().map(|key| self.sessions[key].committed_to).collect();
        (!committed.is_empty()).then(|| pool::exhaustion(remaining, &committed))
    }

    /// Sets the pool's cut-off timer, or drops the pool when none of its
    /// sessions is left open.
    fn schedule(&mut self, pool_key: PoolKey) {
        let dry_at = self.dry_at(pool_key);
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
        if let Some(at) = dry_at {
            let at = at.min(Instant::now() + MAX_CUT_OFF_AHEAD);
            pool.deadline = Some(self.deadlines.insert_at(pool_key, at));
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
    /// if it has run dry, returning the instant it did.
    fn timer_went_off(&mut self, pool_key: PoolKey) -> Option<Instant> {
        if let Some(pool) = self.pools.get_mut(&pool_key) {
            pool.deadline = None;
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
            self.end(key, at, EndReason::UsageLimitExceeded);
        }
    }

    async fn tick(&mut self) {
        self.commit(self.open_keys()).await;
    }

    /// Records, in one transaction, the open sessions `keys` up to now and
    /// every pending ending, then acts on what the store says remains.
    async fn commit(&mut self, keys: Vec<SessionKey>) {
        let now = Instant::now();
        let (batch, charged) = self.batch(keys, now);
        let ending = std::mem::take(&mut self.ending);
        let batch = self.with_endings(batch, &ending);
        if batch.charges.is_empty() && batch.ends.is_empty() {
            return;
        }
        let (result, dry) = self.record(batch).await;
        match result {
            Ok(recorded) => self.committed(charged, ending, recorded, dry),
            Err(err) => {
                self.ending.splice(0..0, ending);
                self.cut_off_all(dry);
                self.fail_closed(err);
            }
        }
    }

    /// Charges for the open sessions `keys` from their last commit to `now`.
    fn batch(&self, keys: Vec<SessionKey>, now: Instant) -> (UsageBatch, Charged) {
        let mut batch = UsageBatch::default();
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

    fn with_endings(&self, mut batch: UsageBatch, ending: &[Ending]) -> UsageBatch {
        for end in ending {
            batch.charges.extend(end.charge);
            batch.ends.push(SessionEnd { session: end.key, reason: end.reason });
        }
        batch
    }

    /// Hands the batch to the store. Cut-offs that fall due meanwhile do not
    /// wait for it: their sessions are told to close at once, and the pools
    /// and instants are returned, to be ended once the store has answered.
    async fn record(
        &mut self,
        batch: UsageBatch,
    ) -> (StoreResult<UsageRecorded>, Vec<(PoolKey, Instant)>) {
        let store = self.store.clone();
        let recording = store.record_usage(batch, clock::now_millis());
        tokio::pin!(recording);
        let mut dry = Vec::new();
        loop {
            tokio::select! {
                result = &mut recording => return (result, dry),
                Some(expired) = self.deadlines.next() => {
                    let pool_key = expired.into_inner();
                    if let Some(at) = self.timer_went_off(pool_key) {
                        dry.push((pool_key, at));
                    }
                }
            }
        }
    }

    fn cut_off_all(&mut self, dry: Vec<(PoolKey, Instant)>) {
        for (pool_key, at) in dry {
            self.cut_off(pool_key, at);
        }
    }

    fn committed(
        &mut self,
        charged: Charged,
        ending: Vec<Ending>,
        recorded: UsageRecorded,
        dry: Vec<(PoolKey, Instant)>,
    ) {
        if !self.health.is_recording() {
            info!("usage is being recorded again");
            self.health.set_recording(true);
        }
        for (key, amount) in charged {
            let session = self.sessions.get_mut(&key).expect("charged sessions stay open");
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
        self.cut_off_all(dry);
        for state in recorded.pools {
            self.apply(state);
        }
    }

    /// Acts on a pool's state after a commit: closes what was revoked or has
    /// run dry, reschedules the cut-off, and tells the sessions.
    fn apply(&mut self, state: PoolState) {
        let pool_key = (state.human, state.limit_type);
        let Some(pool) = self.pools.get_mut(&pool_key) else {
            return;
        };
        pool.remaining = state.remaining;
        let now = Instant::now();
        for key in pool.members.clone() {
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
    /// let them run unmetered, charged up to this moment. Their unrecorded
    /// time stays in `ending` and is retried every tick until the store
    /// takes it.
    fn fail_closed(&mut self, err: StoreError) {
        if self.health.is_recording() {
            error!(error = %err, "cannot record usage; closing every session until it works again");
            self.health.set_recording(false);
        }
        let now = Instant::now();
        for key in self.open_keys() {
            self.end(key, now, EndReason::Internal);
        }
    }
}
