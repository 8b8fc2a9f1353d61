//! Sessions and their usage: admission, the meter's batches, and the
//! clean-up of sessions a crashed run left open.

use rusqlite::{Connection, OptionalExtension, params};

use std::collections::HashMap;

use super::Writer;
use super::accounts;
use super::outbox::{self, Hooks, PoolMarks};
use crate::close::EndReason;
use crate::limits::{LimitType, SessionKind};
use crate::store::{
    Admission, Charge, Foreign, Human, HumanId, NewSession, PoolState, ProjectId, SessionCaller,
    SessionKey, StoreError, StoreResult, UnixMillis, UsageBatch, UsageRecorded,
};
use crate::webhooks::events::{Event, UsageSource};

/// A debit row stays open for this long of wall-clock time, growing with
/// each tick; then the session's next debit starts a new row. One row a
/// minute keeps the ledger small while still showing a long session's use
/// as it happens.
const SEGMENT_MILLIS: i64 = 60_000;

/// The ledger row a session's debits currently go to.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    ledger_id: i64,
    started_at: UnixMillis,
}

/// Checks and records one session in the caller's transaction; on a
/// refusal it has written only what the caller then rolls back (see
/// `admissions`, which commits many of these together).
pub fn admit(conn: &Connection, hooks: &Hooks, session: &NewSession) -> StoreResult<Admission> {
    let (human, token) = match caller(conn, &session.caller, session.now)? {
        Ok(caller) => caller,
        Err(refusal) => return Ok(refusal),
    };

    let limit_type = session.kind.limit_type();
    let (balance, limited) = accounts::ensure_pool(conn, human.id, limit_type, session.now)?;
    if limited && balance <= 0 {
        return Ok(Admission::LimitExhausted);
    }
    if let Some(cap) = session.max_sessions_per_human
        && open_sessions(conn, human.id)? >= u64::from(cap)
    {
        return Ok(Admission::TooManySessions);
    }

    conn.prepare_cached(
        "INSERT INTO sessions (public_id, human_id, kind, token_id, started_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        session.public_id,
        human.id.0,
        session.kind.as_str(),
        token,
        session.now
    ])?;
    let key = SessionKey(conn.last_insert_rowid());
    let revocation_epoch: i64 = conn
        .prepare_cached("SELECT revocation_epoch FROM humans WHERE id = ?1")?
        .query_row([human.id.0], |row| row.get(0))?;
    let started = Event::SessionStarted { session: &session.public_id, kind: session.kind };
    outbox::emit(conn, hooks, human.id, &started, session.now)?;
    let remaining = limited.then_some(balance);
    Ok(Admission::Admitted { key, human, remaining, revocation_epoch })
}

/// The human a session is for and the token it is opened with (`None` for
/// an API key), or why it may not be opened.
fn caller(
    conn: &Connection,
    caller: &SessionCaller,
    now: UnixMillis,
) -> StoreResult<Result<(Human, Option<i64>), Admission>> {
    Ok(match caller {
        SessionCaller::Human(human) => Ok((human.clone(), None)),
        SessionCaller::Token(hash) => {
            SessionCaller::with_token(accounts::find_usage_token(conn, *hash)?, now)
        }
    })
}

fn open_sessions(conn: &Connection, human: HumanId) -> StoreResult<u64> {
    let mut stmt = conn
        .prepare_cached("SELECT COUNT(*) FROM sessions WHERE human_id = ?1 AND ended_at IS NULL")?;
    let count: i64 = stmt.query_row([human.0], |row| row.get(0))?;
    Ok(count as u64)
}

/// Sets the meter's clock (see `meter_clock` in schema.sql) to `now`.
fn advance_clock(conn: &Connection, now: UnixMillis) -> StoreResult<()> {
    conn.prepare_cached("UPDATE meter_clock SET alive_at = MAX(alive_at, ?1) WHERE id = 1")?
        .execute([now])?;
    Ok(())
}

/// Applies one batch in one transaction, or answers a repeat of the last
/// one committed without applying it again (see [`UsageBatch::id`]).
/// Segments started by the batch are remembered only once it has
/// committed, so a failed batch leaves nothing pointing at rows that were
/// rolled back.
pub fn record(
    writer: &mut Writer,
    batch: UsageBatch,
    now: UnixMillis,
) -> StoreResult<UsageRecorded> {
    let repeated = batch.id.is_some() && batch.id == writer.last_batch;
    let batch = if repeated { batch.as_repeated() } else { batch };
    let tx = super::write_transaction(&mut writer.conn)?;
    let mut started = Vec::new();
    let mut recorded = UsageRecorded::default();
    let segments = Segments { current: &writer.segments, started: &mut started };
    let mut charging = Charging { conn: &tx, hooks: &writer.hooks, segments, now };
    for pool in group_by_pool(&batch.charges) {
        recorded.pools.push(charging.charge_pool(pool)?);
    }
    for end in &batch.ends {
        let charged = end_session(&tx, &writer.hooks, end.session, end.reason, now)?;
        recorded.ended.push((end.session, charged));
    }
    advance_clock(&tx, now)?;
    tx.commit()?;

    writer.last_batch = batch.id.or(writer.last_batch);
    writer.segments.extend(started);
    for end in &batch.ends {
        writer.segments.remove(&end.session.0);
    }
    Ok(recorded)
}

/// The charges of one batch grouped by pool, keeping the batch's order.
fn group_by_pool(charges: &[Charge]) -> Vec<Vec<Charge>> {
    let mut pools: Vec<Vec<Charge>> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for charge in charges {
        let slot = *index.entry((charge.human, charge.limit_type)).or_insert_with(|| {
            pools.push(Vec::new());
            pools.len() - 1
        });
        pools[slot].push(*charge);
    }
    pools
}

/// The segments of open sessions: those remembered from earlier batches,
/// and those this batch starts (remembered once it commits).
struct Segments<'a> {
    current: &'a HashMap<i64, Segment>,
    started: &'a mut Vec<(i64, Segment)>,
}

/// One batch's charging, inside its transaction.
struct Charging<'a> {
    conn: &'a Connection,
    hooks: &'a Hooks,
    segments: Segments<'a>,
    now: UnixMillis,
}

impl Charging<'_> {
    /// Charges the sessions of one pool. An enforced pool is never taken
    /// below zero by time: a debit larger than what remains is cut to what
    /// remains, and the meter closes the pool's sessions when it sees zero.
    fn charge_pool(&mut self, charges: Vec<Charge>) -> StoreResult<PoolState> {
        let (human, limit_type) = (charges[0].human, charges[0].limit_type);
        let (mut balance, revocation_epoch, marks) = pool_for_update(self.conn, human, limit_type)?;
        let limited = marks.limited;
        for charge in charges {
            if charge.amount >= 0 {
                let applied =
                    if limited { charge.amount.min(balance.max(0)) } else { charge.amount };
                self.debit_session(&charge, applied)?;
                balance -= applied;
            } else {
                balance += refund(self.conn, &charge, self.now)?;
            }
        }
        self.conn
            .prepare_cached(
                "UPDATE limits SET balance = ?3, updated_at = ?4
                 WHERE human_id = ?1 AND limit_type = ?2",
            )?
            .execute(params![human.0, limit_type.as_str(), balance, self.now])?;
        let low_line = outbox::crossed(self.conn, self.hooks, marks, balance, self.now)?;
        let remaining = limited.then_some(balance);
        let foreign = Foreign::default();
        Ok(PoolState { human, limit_type, remaining, revocation_epoch, low_line, foreign })
    }

    /// Debits a session's current segment, or a new one when it is a
    /// minute old. Once a minute or more of the session's use has not been
    /// announced, it is announced.
    fn debit_session(&mut self, charge: &Charge, applied: i64) -> StoreResult<()> {
        let segment = self.segments.current.get(&charge.session.0).copied();
        if let Some(new) = debit(self.conn, charge, applied, segment, self.now)? {
            self.segments.started.push((charge.session.0, new));
        }
        if applied > 0 && !self.hooks.is_empty() {
            track_session(self.conn, self.hooks, charge.session, SEGMENT_MILLIS, self.now)?;
        }
        Ok(())
    }
}

/// A pool's balance, its human's revocation epoch, and its marks: the tick
/// does this for every pool it charges. Two lookups by primary key rather
/// than a join: SQLite prepares that join anew on every run (its plan
/// depends on the bound values), which cost a tick most of its time.
fn pool_for_update(
    conn: &Connection,
    human: HumanId,
    limit_type: LimitType,
) -> StoreResult<(i64, i64, PoolMarks)> {
    let mut pool = conn.prepare_cached(
        "SELECT balance, limited, low_notified, exhausted_notified
         FROM limits WHERE human_id = ?1 AND limit_type = ?2",
    )?;
    let found = pool
        .query_row(params![human.0, limit_type.as_str()], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    let Some((balance, limited, low_notified, exhausted_notified)) = found else {
        let missing = format!("no {} pool for human {}", limit_type.as_str(), human.0);
        return Err(StoreError::Other(missing));
    };
    let mut owner =
        conn.prepare_cached("SELECT revocation_epoch, project_id FROM humans WHERE id = ?1")?;
    let (epoch, project) = owner.query_row([human.0], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let marks = PoolMarks {
        human,
        project: ProjectId(project),
        limit_type,
        limited,
        low_notified,
        exhausted_notified,
    };
    Ok((balance, epoch, marks))
}

/// Adds `applied` to the session's current debit row, or starts a new row
/// (returned, to be remembered after commit) when there is none, it is a
/// minute old, or it has gone.
fn debit(
    conn: &Connection,
    charge: &Charge,
    applied: i64,
    segment: Option<Segment>,
    now: UnixMillis,
) -> StoreResult<Option<Segment>> {
    if applied == 0 {
        return Ok(None);
    }
    if let Some(segment) = segment.filter(|s| now - s.started_at < SEGMENT_MILLIS) {
        let grown = conn
            .prepare_cached(
                "UPDATE ledger SET amount = amount - ?2, updated_at = ?3
                 WHERE id = ?1 AND entry = 'debit'",
            )?
            .execute(params![segment.ledger_id, applied, now])?;
        if grown == 1 {
            return Ok(None);
        }
    }
    conn.prepare_cached(
        "INSERT INTO ledger
             (human_id, limit_type, entry, amount, session_id, created_at, updated_at)
         VALUES (?1, ?2, 'debit', ?3, ?4, ?5, ?5)",
    )?
    .execute(params![
        charge.human.0,
        charge.limit_type.as_str(),
        -applied,
        charge.session.0,
        now
    ])?;
    metrics::counter!(crate::metrics::LEDGER_ROWS).increment(1);
    Ok(Some(Segment { ledger_id: conn.last_insert_rowid(), started_at: now }))
}

/// Gives back up to `-charge.amount`, never more than the session was
/// debited since its pool was last set (see `refund_floor` in schema.sql).
/// Returns what was given back.
fn refund(conn: &Connection, charge: &Charge, now: UnixMillis) -> StoreResult<i64> {
    let floor: i64 = conn
        .prepare_cached("SELECT refund_floor FROM sessions WHERE id = ?1")?
        .query_row([charge.session.0], |row| row.get(0))?;
    let refundable = session_charged(conn, charge.session)? - floor;
    let applied = (-charge.amount).min(refundable);
    if applied > 0 {
        conn.prepare_cached(
            "INSERT INTO ledger
                 (human_id, limit_type, entry, amount, session_id, created_at, updated_at)
             VALUES (?1, ?2, 'refund', ?3, ?4, ?5, ?5)",
        )?
        .execute(params![
            charge.human.0,
            charge.limit_type.as_str(),
            applied,
            charge.session.0,
            now
        ])?;
        metrics::counter!(crate::metrics::LEDGER_ROWS).increment(1);
    }
    Ok(applied.max(0))
}

/// What the session has been charged so far, refunds taken off.
fn session_charged(conn: &Connection, session: SessionKey) -> StoreResult<i64> {
    let mut stmt =
        conn.prepare_cached("SELECT -COALESCE(SUM(amount), 0) FROM ledger WHERE session_id = ?1")?;
    Ok(stmt.query_row([session.0], |row| row.get(0))?)
}

/// Records the end of a session; returns all it was charged.
fn end_session(
    conn: &Connection,
    hooks: &Hooks,
    session: SessionKey,
    reason: EndReason,
    now: UnixMillis,
) -> StoreResult<i64> {
    let charged = session_charged(conn, session)?;
    let ended = conn
        .prepare_cached(
            "UPDATE sessions SET ended_at = ?2, end_reason = ?3, charged = ?4
             WHERE id = ?1 AND ended_at IS NULL",
        )?
        .execute(params![session.0, now, reason.as_str(), charged])?;
    if ended == 1 {
        announce_end(conn, hooks, session, reason.as_str(), now)?;
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
}

fn session_facts(conn: &Connection, session: SessionKey) -> StoreResult<SessionFacts> {
    let mut stmt = conn.prepare_cached(
        "SELECT human_id, public_id, kind, tracked,
                (SELECT -COALESCE(SUM(amount), 0) FROM ledger WHERE session_id = sessions.id)
         FROM sessions WHERE id = ?1",
    )?;
    let (human, public_id, kind, tracked, charged): (i64, String, String, i64, i64) = stmt
        .query_row([session.0], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
        })?;
    let kind = SessionKind::parse(&kind)
        .ok_or_else(|| StoreError::Other(format!("unknown session kind {kind:?} stored")))?;
    Ok(SessionFacts { human: HumanId(human), public_id, kind, charged, tracked })
}

/// Announces what a session used since its last `usage.tracked`, if that
/// is at least `at_least` (and not nothing).
fn track_session(
    conn: &Connection,
    hooks: &Hooks,
    session: SessionKey,
    at_least: i64,
    now: UnixMillis,
) -> StoreResult<SessionFacts> {
    let facts = session_facts(conn, session)?;
    let untracked = facts.charged - facts.tracked;
    if hooks.is_empty() || untracked == 0 || untracked < at_least {
        return Ok(facts);
    }
    let source = UsageSource::Session { session: &facts.public_id, kind: facts.kind };
    let event =
        Event::UsageTracked { limit_type: facts.kind.limit_type(), amount: untracked, source };
    outbox::emit(conn, hooks, facts.human, &event, now)?;
    conn.prepare_cached("UPDATE sessions SET tracked = ?2 WHERE id = ?1")?
        .execute(params![session.0, facts.charged])?;
    Ok(facts)
}

/// The events of a session's end: the rest of its usage, and its end.
fn announce_end(
    conn: &Connection,
    hooks: &Hooks,
    session: SessionKey,
    reason: &str,
    now: UnixMillis,
) -> StoreResult<()> {
    if hooks.is_empty() {
        return Ok(());
    }
    let facts = track_session(conn, hooks, session, 0, now)?;
    let event = Event::SessionEnded {
        session: &facts.public_id,
        kind: facts.kind,
        charged: facts.charged,
        reason,
    };
    outbox::emit(conn, hooks, facts.human, &event, now)
}

/// Ends every session still open in the database. Each is first charged
/// from its last recorded usage up to the meter's clock, the last moment
/// the run that left it open is known to have metered, and that is taken
/// as its end.
pub fn close_abandoned(writer: &mut Writer) -> StoreResult<u64> {
    let tx = super::write_transaction(&mut writer.conn)?;
    let alive_at: UnixMillis =
        tx.query_row("SELECT alive_at FROM meter_clock WHERE id = 1", [], |row| row.get(0))?;
    let open = abandoned_sessions(&tx)?;
    let mut started = Vec::new();
    let segments = Segments { current: &writer.segments, started: &mut started };
    let mut charging = Charging { conn: &tx, hooks: &writer.hooks, segments, now: alive_at };
    for session in &open {
        let owed = alive_at - session.recorded_to;
        if owed > 0 {
            charging.charge_pool(vec![Charge { amount: owed, ..session.charge }])?;
        }
    }
    let reason = EndReason::ServerRestart.as_str();
    for session in &open {
        let id = session.charge.session.0;
        tx.execute(
            "UPDATE sessions SET
                 end_reason = ?2,
                 charged = (SELECT -COALESCE(SUM(amount), 0) FROM ledger
                            WHERE ledger.session_id = sessions.id),
                 ended_at = MAX(started_at, COALESCE((SELECT MAX(updated_at) FROM ledger
                                                      WHERE ledger.session_id = sessions.id),
                                                     started_at))
             WHERE id = ?1",
            params![id, reason],
        )?;
        let ended_at: i64 =
            tx.query_row("SELECT ended_at FROM sessions WHERE id = ?1", [id], |row| row.get(0))?;
        announce_end(&tx, &writer.hooks, SessionKey(id), reason, ended_at)?;
    }
    tx.commit()?;
    Ok(open.len() as u64)
}

/// A session a previous run left open, and when its usage was last
/// recorded (its start, if it never was).
struct Abandoned {
    charge: Charge,
    recorded_to: UnixMillis,
}

fn abandoned_sessions(conn: &Connection) -> StoreResult<Vec<Abandoned>> {
    let mut stmt = conn.prepare(
        "SELECT id, human_id, kind,
                MAX(started_at, COALESCE((SELECT MAX(updated_at) FROM ledger
                                          WHERE ledger.session_id = sessions.id), started_at))
         FROM sessions WHERE ended_at IS NULL",
    )?;
    let rows = stmt.query_map([], |row| {
        let kind: String = row.get(2)?;
        Ok((row.get(0)?, row.get(1)?, kind, row.get(3)?))
    })?;
    let mut open = Vec::new();
    for row in rows {
        let (id, human, kind, recorded_to): (i64, i64, String, i64) = row?;
        let kind = SessionKind::parse(&kind)
            .ok_or_else(|| StoreError::Other(format!("unknown session kind {kind:?} stored")))?;
        let charge = Charge {
            session: SessionKey(id),
            human: HumanId(human),
            limit_type: kind.limit_type(),
            amount: 0,
        };
        open.push(Abandoned { charge, recorded_to });
    }
    Ok(open)
}
