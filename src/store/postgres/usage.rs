//! Sessions and their usage on PostgreSQL: admission, the meter's batches,
//! and the clean-up of sessions a crashed run left open.
//!
//! The ledger row a session's debits grow (its segment) is found in the
//! database, not remembered between batches: the session's latest debit
//! row, while it is under a minute old.

use deadpool_postgres::{Client, GenericClient};

use super::accounts;
use super::instances::{self, Instance};
use super::outbox::{self, Pool};
use super::query::{all, one, run};
use crate::close::EndReason;
use crate::limits::{LimitType, SessionKind};
use crate::store::{
    Admission, BatchId, Charge, Foreign, Human, HumanId, NewSession, PoolState, SessionCaller,
    SessionKey, StoreError, StoreResult, UnixMillis, UsageBatch, UsageRecorded,
};

type PoolKey = (HumanId, LimitType);
use crate::webhooks::events::{Event, UsageSource};

/// A debit row stays open for this long of wall-clock time, growing with
/// each tick; then the session's next debit starts a new row. The same as
/// SQLite's, so that both ledgers read alike.
const SEGMENT_MILLIS: i64 = 60_000;

/// Admits a session for this server's run `instance` (`None` for a store
/// with no run, whose sessions no server meters).
pub async fn open_session(
    client: &mut Client,
    session: NewSession,
    instance: Option<Instance>,
) -> StoreResult<Admission> {
    let tx = client.transaction().await?;
    instances::check_live(&tx, instance).await?;
    let (human, token) = match caller(&tx, &session.caller, session.now).await? {
        Ok(caller) => caller,
        Err(refusal) => return Ok(refusal),
    };
    // The human's row is locked next: admissions of one human then run one
    // after another, on every server, and the cap counts them all. A
    // revocation changes that row too, so the token is read again after
    // the lock: either the revocation committed before it, and the token
    // is seen revoked, or it waits for this admission and then changes the
    // epoch the meter closes the new session on.
    let sql = "SELECT revocation_epoch FROM humans WHERE id = $1 FOR NO KEY UPDATE";
    let revocation_epoch: i64 = one(&tx, sql, &[&human.id.0]).await?.get(0);
    if let Some(refusal) = check_token(&tx, token, session.now).await? {
        return Ok(refusal);
    }

    let limit_type = session.kind.limit_type();
    let (balance, limited) = accounts::ensure_pool(&tx, human.id, limit_type, session.now).await?;
    if limited && balance <= 0 {
        return Ok(Admission::LimitExhausted);
    }
    if let Some(cap) = session.max_sessions_per_human
        && open_sessions(&tx, human.id).await? >= i64::from(cap)
    {
        return Ok(Admission::TooManySessions);
    }

    let key: i64 = one(
        &tx,
        "INSERT INTO sessions (public_id, human_id, kind, token_id, started_at, instance_id)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        &[
            &session.public_id,
            &human.id.0,
            &session.kind.as_str(),
            &token,
            &session.now,
            &instance.map(|instance| instance.id),
        ],
    )
    .await?
    .get(0);
    let started = Event::SessionStarted { session: &session.public_id, kind: session.kind };
    outbox::emit(&tx, human.id, &started, session.now).await?;
    tx.commit().await?;
    let remaining = limited.then_some(balance);
    Ok(Admission::Admitted { key: SessionKey(key), human, remaining, revocation_epoch })
}

/// The human a session is for and the token it is opened with (`None` for
/// an API key), or why it may not be opened.
async fn caller(
    db: &impl GenericClient,
    caller: &SessionCaller,
    now: UnixMillis,
) -> StoreResult<Result<(Human, Option<i64>), Admission>> {
    Ok(match caller {
        SessionCaller::Human(human) => Ok((human.clone(), None)),
        SessionCaller::Token(hash) => {
            SessionCaller::with_token(accounts::find_usage_token(db, *hash).await?, now)
        }
    })
}

/// Refuses a session whose token was revoked or expired since it was
/// looked up.
async fn check_token(
    db: &impl GenericClient,
    token: Option<i64>,
    now: UnixMillis,
) -> StoreResult<Option<Admission>> {
    Ok(accounts::token_refusal(db, token, now).await?.map(|refusal| match refusal {
        accounts::TokenRefusal::Revoked => Admission::TokenRevoked,
        accounts::TokenRefusal::Expired => Admission::TokenExpired,
    }))
}

async fn open_sessions(db: &impl GenericClient, human: HumanId) -> StoreResult<i64> {
    let sql = "SELECT COUNT(*) FROM sessions WHERE human_id = $1 AND ended_at IS NULL";
    Ok(one(db, sql, &[&human.0]).await?.get(0))
}

/// Whether `batch` is the last one `instance` committed, sent again
/// because its commit's answer was lost; fails with
/// [`StoreError::Superseded`] if the run has ended (see
/// [`instances::last_batch`]). A store with no run recognises no repeats.
async fn is_repeat(
    db: &impl GenericClient,
    batch: Option<BatchId>,
    instance: Option<Instance>,
) -> StoreResult<bool> {
    let Some(instance) = instance else {
        return Ok(false);
    };
    let last = instances::last_batch(db, instance).await?;
    Ok(batch.is_some_and(|id| last == Some(id.0)))
}

/// Applies one batch in one transaction, its pools locked in lock order,
/// or answers a repeat of the last one committed without applying it again
/// (see [`UsageBatch::id`]). Applies nothing once `instance` has ended
/// (see [`is_repeat`]). Beside the pools it charges, it reports the ones
/// it is to watch, and of each the sessions other runs meter.
pub async fn record(
    client: &mut Client,
    batch: UsageBatch,
    now: UnixMillis,
    instance: Option<Instance>,
) -> StoreResult<UsageRecorded> {
    let tx = client.transaction().await?;
    let repeat = is_repeat(&tx, batch.id, instance).await?;
    let batch = if repeat { batch.as_repeated() } else { batch };
    let mut recorded = UsageRecorded::default();
    // Every pool is locked first, in lock order, by one statement; then the
    // pools are charged at once, their statements pipelined on the
    // connection instead of each waiting for the answer to the one before
    // (a tick of 500 sessions took a quarter of the time).
    let groups = group_by_pool(&batch.charges);
    let keys: Vec<_> =
        groups.iter().map(|charges| (charges[0].human, charges[0].limit_type)).collect();
    let locked = outbox::lock_pools(&tx, &keys).await?;
    let charging = groups.into_iter().zip(locked).map(|(c, pool)| charge_pool(&tx, pool, c, now));
    let charged = futures::future::join_all(charging).await;
    let (pools, errors): (Vec<_>, Vec<_>) = charged.into_iter().partition(Result::is_ok);
    if let Some(error) = super::first_cause(errors.into_iter().filter_map(Result::err).collect()) {
        return Err(error);
    }
    recorded.pools = pools.into_iter().filter_map(Result::ok).collect();
    // Sessions are ended in the order of their keys, as rows are locked
    // elsewhere, and reported in the batch's order, which the meter pairs
    // with its own list.
    let mut ends = batch.ends.clone();
    ends.sort_by_key(|end| end.session.0);
    let mut charged = std::collections::HashMap::with_capacity(ends.len());
    for end in &ends {
        charged.insert(end.session, end_session(&tx, end.session, end.reason, now).await?);
    }
    recorded.ended = batch.ends.iter().map(|end| (end.session, charged[&end.session])).collect();
    if let Some(instance) = instance {
        // With no other run on the database, nothing but this server's own
        // API changes a pool, and those reach its meter at once (a settle).
        if instances::others_live(&tx, instance).await? {
            let watched = batch.watch.iter().filter(|key| !keys.contains(key)).copied();
            recorded.pools.extend(watch(&tx, &watched.collect::<Vec<_>>()).await?);
            with_foreign(&tx, &mut recorded.pools, instance, now).await?;
        }
        instances::beat(&tx, instance, batch.id.map(|id| id.0), now).await?;
    }
    tx.commit().await?;
    Ok(recorded)
}

/// The state of pools the batch did not charge, read without a lock:
/// changes made through other servers (a top-up, a revocation, another's
/// charges) reach this one's meter this way.
async fn watch(db: &impl GenericClient, keys: &[PoolKey]) -> StoreResult<Vec<PoolState>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let pools = outbox::read_pools(db, keys).await?;
    Ok(pools.iter().map(|pool| pool_state(pool, pool.balance, outbox::armed_line(pool))).collect())
}

/// Fills in, for each of `pools`, the sessions other runs than `instance`
/// have open on it and what they have used up to `now` beyond what their
/// runs recorded (each from its last recorded charge, or its start), so
/// that this run's meter reckons with them when it works out the pool's
/// end. One statement for every pool.
///
/// A run may have recorded a session past `now`: its batch, made after
/// this one, took the pool's lock first. The balance read here has that
/// charge in it, so the session's share counts negative, giving back what
/// the balance holds beyond `now`. Were it cut at zero, that charge would
/// count twice, and the servers sharing a pool would end it early.
async fn with_foreign(
    db: &impl GenericClient,
    pools: &mut [PoolState],
    instance: Instance,
    now: UnixMillis,
) -> StoreResult<()> {
    let humans: Vec<i64> = pools.iter().map(|pool| pool.human.0).collect();
    if humans.is_empty() {
        return Ok(());
    }
    let rows = all(
        db,
        "SELECT s.human_id, s.kind, COUNT(*),
                COALESCE(SUM($3 - GREATEST(s.started_at,
                    (SELECT MAX(l.updated_at) FROM ledger l WHERE l.session_id = s.id))), 0)
                    ::BIGINT
         FROM sessions s
         WHERE s.human_id = ANY($1) AND s.ended_at IS NULL
           AND s.instance_id IS DISTINCT FROM $2
         GROUP BY s.human_id, s.kind",
        &[&humans, &instance.id, &now],
    )
    .await?;
    for row in rows {
        let kind: &str = row.get(1);
        let Some(kind) = SessionKind::parse(kind) else {
            return Err(StoreError::Other(format!("unknown session kind {kind:?} stored")));
        };
        let key = (HumanId(row.get(0)), kind.limit_type());
        let foreign = Foreign {
            sessions: u32::try_from(row.get::<_, i64>(2)).unwrap_or(u32::MAX),
            unrecorded: row.get(3),
        };
        for pool in pools.iter_mut().filter(|pool| (pool.human, pool.limit_type) == key) {
            pool.foreign = foreign;
        }
    }
    Ok(())
}

/// The charges of one batch grouped by pool, the pools in the order of
/// human and limit type, each pool's charges in the batch's order.
fn group_by_pool(charges: &[Charge]) -> Vec<Vec<Charge>> {
    let mut pools: std::collections::BTreeMap<_, Vec<Charge>> = Default::default();
    for charge in charges {
        pools.entry((charge.human, charge.limit_type)).or_default().push(*charge);
    }
    pools.into_values().collect()
}

/// Charges the sessions of one pool, locked by the caller. An enforced pool
/// is never taken below zero by time: the database cuts a debit larger than
/// what remains to what remains, and the meter closes the pool's sessions
/// when it sees zero. What each charge took is the fall of the balance it
/// caused, which the pool's lock makes exact.
async fn charge_pool(
    tx: &impl GenericClient,
    pool: Pool,
    charges: Vec<Charge>,
    now: UnixMillis,
) -> StoreResult<PoolState> {
    let mut balance = pool.balance;
    for charge in charges {
        if charge.amount >= 0 {
            let after = take(tx, &charge, now).await?;
            let applied = balance - after;
            balance = after;
            debit_session(tx, &pool, &charge, applied, now).await?;
        } else {
            balance = refund(tx, &charge, now).await?.unwrap_or(balance);
        }
    }
    let low_line = outbox::crossed(tx, &pool, balance, now).await?;
    Ok(pool_state(&pool, balance, low_line))
}

/// What the meter is told of a pool whose balance is now `balance`.
fn pool_state(pool: &Pool, balance: i64, low_line: Option<i64>) -> PoolState {
    PoolState {
        human: pool.human,
        limit_type: pool.limit_type,
        remaining: pool.limited.then_some(balance),
        revocation_epoch: pool.revocation_epoch,
        low_line,
        foreign: Foreign::default(),
    }
}

/// Takes a session's charge from its pool, cut to what remains of an
/// enforced one; returns the balance after.
async fn take(tx: &impl GenericClient, charge: &Charge, now: UnixMillis) -> StoreResult<i64> {
    let row = one(
        tx,
        "UPDATE limits SET updated_at = $4,
             balance = balance - CASE WHEN limited THEN LEAST($3, GREATEST(balance, 0))
                                      ELSE $3 END
         WHERE human_id = $1 AND limit_type = $2
         RETURNING balance",
        &[&charge.human.0, &charge.limit_type.as_str(), &charge.amount, &now],
    )
    .await?;
    Ok(row.get(0))
}

/// Adds `applied` to the session's current debit row, or starts a new row
/// when there is none or it is a minute old. Once a minute or more of the
/// session's use has not been announced, it is announced.
async fn debit_session(
    tx: &impl GenericClient,
    pool: &Pool,
    charge: &Charge,
    applied: i64,
    now: UnixMillis,
) -> StoreResult<()> {
    if applied == 0 {
        return Ok(());
    }
    let grown = run(
        tx,
        "UPDATE ledger SET amount = amount - $2, updated_at = $3
         WHERE id = (SELECT MAX(id) FROM ledger WHERE session_id = $1 AND entry = 'debit')
           AND created_at > $4",
        &[&charge.session.0, &applied, &now, &(now - SEGMENT_MILLIS)],
    )
    .await?;
    if grown == 0 {
        run(
            tx,
            "INSERT INTO ledger
                 (human_id, limit_type, entry, amount, session_id, created_at, updated_at)
             VALUES ($1, $2, 'debit', $3, $4, $5, $5)",
            &[&charge.human.0, &charge.limit_type.as_str(), &-applied, &charge.session.0, &now],
        )
        .await?;
        metrics::counter!(crate::metrics::LEDGER_ROWS).increment(1);
    }
    if pool.hook.is_some() {
        track_session(tx, charge.session, SEGMENT_MILLIS, now).await?;
    }
    Ok(())
}

/// Gives back up to `-charge.amount`, never more than the session was
/// debited since its pool was last set (see `refund_floor` in schema.sql).
/// Returns the pool's balance after, or `None` when nothing was given back.
async fn refund(
    tx: &impl GenericClient,
    charge: &Charge,
    now: UnixMillis,
) -> StoreResult<Option<i64>> {
    let sql = "SELECT refund_floor FROM sessions WHERE id = $1";
    let floor: i64 = one(tx, sql, &[&charge.session.0]).await?.get(0);
    let refundable = session_charged(tx, charge.session).await? - floor;
    let applied = (-charge.amount).min(refundable);
    if applied <= 0 {
        return Ok(None);
    }
    run(
        tx,
        "INSERT INTO ledger
             (human_id, limit_type, entry, amount, session_id, created_at, updated_at)
         VALUES ($1, $2, 'refund', $3, $4, $5, $5)",
        &[&charge.human.0, &charge.limit_type.as_str(), &applied, &charge.session.0, &now],
    )
    .await?;
    metrics::counter!(crate::metrics::LEDGER_ROWS).increment(1);
    let row = one(
        tx,
        "UPDATE limits SET balance = balance + $3, updated_at = $4
         WHERE human_id = $1 AND limit_type = $2 RETURNING balance",
        &[&charge.human.0, &charge.limit_type.as_str(), &applied, &now],
    )
    .await?;
    Ok(Some(row.get(0)))
}

/// What the session has been charged so far, refunds taken off.
async fn session_charged(db: &impl GenericClient, session: SessionKey) -> StoreResult<i64> {
    let sql = "SELECT -COALESCE(SUM(amount), 0)::BIGINT FROM ledger WHERE session_id = $1";
    Ok(one(db, sql, &[&session.0]).await?.get(0))
}

/// Records the end of a session; returns all it was charged.
async fn end_session(
    tx: &impl GenericClient,
    session: SessionKey,
    reason: EndReason,
    now: UnixMillis,
) -> StoreResult<i64> {
    let charged = session_charged(tx, session).await?;
    let ended = run(
        tx,
        "UPDATE sessions SET ended_at = $2, end_reason = $3, charged = $4
         WHERE id = $1 AND ended_at IS NULL",
        &[&session.0, &now, &reason.as_str(), &charged],
    )
    .await?;
    if ended == 1 {
        announce_end(tx, session, reason.as_str(), now).await?;
    }
    Ok(charged)
}

/// A session's row as the events about it need it.
struct SessionFacts {
    human: HumanId,
    public_id: String,
    kind: SessionKind,
    charged: i64,
    tracked: i64,
    /// Whether the human's project has a webhook.
    hooked: bool,
}

async fn session_facts(db: &impl GenericClient, session: SessionKey) -> StoreResult<SessionFacts> {
    let row = one(
        db,
        "SELECT s.human_id, s.public_id, s.kind, s.tracked,
                (SELECT -COALESCE(SUM(amount), 0)::BIGINT FROM ledger WHERE session_id = s.id),
                EXISTS (SELECT 1 FROM webhooks w WHERE w.project_id = h.project_id)
         FROM sessions s JOIN humans h ON h.id = s.human_id WHERE s.id = $1",
        &[&session.0],
    )
    .await?;
    let kind: &str = row.get(2);
    let kind = SessionKind::parse(kind)
        .ok_or_else(|| StoreError::Other(format!("unknown session kind {kind:?} stored")))?;
    Ok(SessionFacts {
        human: HumanId(row.get(0)),
        public_id: row.get(1),
        kind,
        tracked: row.get(3),
        charged: row.get(4),
        hooked: row.get(5),
    })
}

/// Announces what a session used since its last `usage.tracked`, if that
/// is at least `at_least` (and not nothing) and its project has a webhook.
async fn track_session(
    tx: &impl GenericClient,
    session: SessionKey,
    at_least: i64,
    now: UnixMillis,
) -> StoreResult<SessionFacts> {
    let facts = session_facts(tx, session).await?;
    let untracked = facts.charged - facts.tracked;
    if !facts.hooked || untracked == 0 || untracked < at_least {
        return Ok(facts);
    }
    let source = UsageSource::Session { session: &facts.public_id, kind: facts.kind };
    let event =
        Event::UsageTracked { limit_type: facts.kind.limit_type(), amount: untracked, source };
    outbox::emit(tx, facts.human, &event, now).await?;
    let sql = "UPDATE sessions SET tracked = $2 WHERE id = $1";
    run(tx, sql, &[&session.0, &facts.charged]).await?;
    Ok(facts)
}

/// The events of a session's end: the rest of its usage, and its end.
async fn announce_end(
    tx: &impl GenericClient,
    session: SessionKey,
    reason: &str,
    now: UnixMillis,
) -> StoreResult<()> {
    let facts = track_session(tx, session, 0, now).await?;
    if !facts.hooked {
        return Ok(());
    }
    let event = Event::SessionEnded {
        session: &facts.public_id,
        kind: facts.kind,
        charged: facts.charged,
        reason,
    };
    outbox::emit(tx, facts.human, &event, now).await
}

/// Ends the sessions no run meters (`server_restart`): those a server of
/// an older build left open, charged up to its meter's last clock in the
/// `meter_clock` of a database made by it, and those of a store opened with
/// no run, charged up to their last recorded usage. The sessions of runs
/// are closed out once their runs have ended (see [`close_out_chunk`]).
pub async fn close_abandoned(client: &mut Client) -> StoreResult<u64> {
    let tx = client.transaction().await?;
    let sql = "SELECT to_regclass('meter_clock') IS NOT NULL";
    let alive_at: UnixMillis = if one(&tx, sql, &[]).await?.get::<_, bool>(0) {
        one(&tx, "SELECT alive_at FROM meter_clock WHERE id = 1", &[]).await?.get(0)
    } else {
        0
    };
    let rows = all(
        &tx,
        &format!("{ABANDONED}, $1::BIGINT FROM sessions s WHERE {OPEN} AND s.instance_id IS NULL"),
        &[&alive_at],
    )
    .await?;
    let closed = close_sessions(&tx, abandoned(rows)?, EndReason::ServerRestart).await?;
    tx.commit().await?;
    Ok(closed)
}

/// Ends, in the transaction `tx`, up to `limit` open sessions of one run
/// that has ended (closed out as lost, or, rarely, stopped with a session
/// still open) other than `me`, for `instance_lost`, each charged up to the
/// run's last clock. Sessions another close-out is ending are skipped.
/// Returns how many.
pub async fn close_out_chunk(tx: &impl GenericClient, me: i64, limit: i64) -> StoreResult<u64> {
    let sql = format!(
        "{ABANDONED}, i.alive_at FROM sessions s JOIN instances i ON i.id = s.instance_id
         WHERE {OPEN} AND s.instance_id =
               (SELECT o.instance_id FROM sessions o JOIN instances r ON r.id = o.instance_id
                WHERE o.ended_at IS NULL AND r.ended_at IS NOT NULL AND r.id <> $2 LIMIT 1)
         ORDER BY s.id LIMIT $1 FOR UPDATE OF s SKIP LOCKED"
    );
    let rows = all(tx, &sql, &[&limit, &me]).await?;
    close_sessions(tx, abandoned(rows)?, EndReason::InstanceLost).await
}

/// The columns of a session left open that [`abandoned`] reads, but the
/// last: when its usage was last recorded (its start, if it never was).
const ABANDONED: &str = "SELECT s.id, s.human_id, s.kind,
                                GREATEST(s.started_at, (SELECT MAX(l.updated_at) FROM ledger l
                                                        WHERE l.session_id = s.id))";

const OPEN: &str = "s.ended_at IS NULL";

/// Ends `open`, sessions of one run, for `reason`, each first charged from
/// its last recorded usage up to `alive_at`, the last moment the run is
/// known to have metered, which is taken as its end. Their pools are locked first, all
/// at once in lock order, as a meter's batch locks them: locked one by one
/// in the sessions' order, they deadlocked with the meters charging them.
async fn close_sessions(
    tx: &impl GenericClient,
    open: Vec<Abandoned>,
    reason: EndReason,
) -> StoreResult<u64> {
    let owed: Vec<Charge> = open
        .iter()
        .filter(|session| session.alive_at > session.recorded_to)
        .map(|session| Charge { amount: session.alive_at - session.recorded_to, ..session.charge })
        .collect();
    let groups = group_by_pool(&owed);
    let keys: Vec<_> =
        groups.iter().map(|charges| (charges[0].human, charges[0].limit_type)).collect();
    let locked = outbox::lock_pools(tx, &keys).await?;
    let alive_at = open.first().map_or(0, |session| session.alive_at);
    for (charges, pool) in groups.into_iter().zip(locked) {
        charge_pool(tx, pool, charges, alive_at).await?;
    }
    let reason = reason.as_str();
    for session in &open {
        let id = session.charge.session.0;
        let ended_at: i64 = one(
            tx,
            "UPDATE sessions SET
                 end_reason = $2,
                 charged = (SELECT -COALESCE(SUM(amount), 0)::BIGINT FROM ledger
                            WHERE ledger.session_id = sessions.id),
                 ended_at = GREATEST(started_at, (SELECT MAX(updated_at) FROM ledger
                                                  WHERE ledger.session_id = sessions.id))
             WHERE id = $1 RETURNING ended_at",
            &[&id, &reason],
        )
        .await?
        .get(0);
        announce_end(tx, SessionKey(id), reason, ended_at).await?;
    }
    Ok(open.len() as u64)
}

/// A session a run left open: when its usage was last recorded (its start,
/// if it never was), and the last moment its run is known to have metered.
struct Abandoned {
    charge: Charge,
    recorded_to: UnixMillis,
    alive_at: UnixMillis,
}

/// The sessions of rows of [`ABANDONED`] followed by their run's clock.
fn abandoned(rows: Vec<tokio_postgres::Row>) -> StoreResult<Vec<Abandoned>> {
    let mut open = Vec::new();
    for row in rows {
        let kind: &str = row.get(2);
        let kind = SessionKind::parse(kind)
            .ok_or_else(|| StoreError::Other(format!("unknown session kind {kind:?} stored")))?;
        let charge = Charge {
            session: SessionKey(row.get(0)),
            human: HumanId(row.get(1)),
            limit_type: kind.limit_type(),
            amount: 0,
        };
        open.push(Abandoned { charge, recorded_to: row.get(3), alive_at: row.get(4) });
    }
    Ok(open)
}
