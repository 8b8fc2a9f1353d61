//! The webhook outbox: events are written in the transaction of the change
//! that causes them, so that across crashes no change is without its event
//! and no event without its change. What each project's webhook wants is
//! kept in memory on the writer thread, loaded at start and refreshed by
//! every change of a webhook (which runs on the same thread), so that the
//! meter's ticks pay nothing for projects without one.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};

use crate::limits::LimitType;
use crate::store::hooks::{self, Hook, Notified};
use crate::store::{HumanId, ProjectId, StoreResult, UnixMillis};
use crate::webhooks::events::{Event, Subject};

/// Every project's webhook, by project.
#[derive(Debug, Default)]
pub struct Hooks(HashMap<i64, Hook>);

impl Hooks {
    pub fn load(conn: &Connection) -> StoreResult<Hooks> {
        let mut stmt = conn.prepare("SELECT project_id FROM webhooks")?;
        let projects: Vec<i64> = stmt.query_map([], |row| row.get(0))?.collect::<Result<_, _>>()?;
        let mut hooks = Hooks::default();
        for project in projects {
            hooks.reload(conn, ProjectId(project))?;
        }
        Ok(hooks)
    }

    /// Reads one project's webhook again, after it changed.
    pub fn reload(&mut self, conn: &Connection, project: ProjectId) -> StoreResult<()> {
        let found: Option<(Option<String>, Option<String>)> = conn
            .query_row(
                "SELECT events, thresholds FROM webhooks WHERE project_id = ?1",
                [project.0],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()?;
        match found {
            None => {
                self.0.remove(&project.0);
            }
            Some((events, thresholds)) => {
                let hook = Hook::from_columns(events.as_deref(), thresholds.as_deref());
                self.0.insert(project.0, hook);
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn wants(&self, project: i64, kind: &str) -> bool {
        self.0.get(&project).is_some_and(|hook| hook.wants(kind))
    }
}

/// Writes `event` about `human` to the outbox, if the human's project has a
/// webhook that wants it.
pub fn emit(
    conn: &Connection,
    hooks: &Hooks,
    human: HumanId,
    event: &Event,
    now: UnixMillis,
) -> StoreResult<()> {
    if hooks.is_empty() {
        return Ok(());
    }
    let (project, name, project_name): (i64, String, String) = conn
        .prepare_cached(
            "SELECT h.project_id, h.external_id, p.name
             FROM humans h JOIN projects p ON p.id = h.project_id WHERE h.id = ?1",
        )?
        .query_row([human.0], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
    if !hooks.wants(project, event.kind()) {
        return Ok(());
    }
    let event_id = crate::ids::public_id("evt");
    let subject = Subject { event_id: &event_id, human: &name, project: &project_name, at: now };
    conn.prepare_cached(
        "INSERT INTO webhook_events
             (public_id, project_id, type, body, created_at, status, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?5)",
    )?
    .execute(params![
        event_id,
        project,
        event.kind(),
        event.body(&subject).to_string(),
        now
    ])?;
    Ok(())
}

/// After a debit outside a session: announces its usage (`event`, a
/// `usage.tracked`) and any line the pool's new `balance` crossed.
pub fn debited(
    conn: &Connection,
    hooks: &Hooks,
    human: HumanId,
    event: &Event,
    balance: i64,
    now: UnixMillis,
) -> StoreResult<()> {
    emit(conn, hooks, human, event, now)?;
    let Event::UsageTracked { limit_type, .. } = event else {
        return Ok(());
    };
    match marks(conn, human, *limit_type)? {
        Some(marks) => crossed(conn, hooks, marks, balance, now).map(|_| ()),
        None => Ok(()),
    }
}

/// A pool as it was before a change, with what has fired for it.
#[derive(Clone, Copy, Debug)]
pub struct PoolMarks {
    pub human: HumanId,
    pub project: ProjectId,
    pub limit_type: LimitType,
    pub limited: bool,
    pub low_notified: bool,
    pub exhausted_notified: bool,
}

/// Reads a pool's marks, if the pool exists.
pub fn marks(
    conn: &Connection,
    human: HumanId,
    limit_type: LimitType,
) -> StoreResult<Option<PoolMarks>> {
    let mut stmt = conn.prepare_cached(
        "SELECT (SELECT project_id FROM humans WHERE id = ?1),
                limited, low_notified, exhausted_notified
         FROM limits WHERE human_id = ?1 AND limit_type = ?2",
    )?;
    let found = stmt
        .query_row(params![human.0, limit_type.as_str()], |row| {
            Ok(PoolMarks {
                human,
                project: ProjectId(row.get(0)?),
                limit_type,
                limited: row.get(1)?,
                low_notified: row.get(2)?,
                exhausted_notified: row.get(3)?,
            })
        })
        .optional()?;
    Ok(found)
}

/// After a pool's balance changed to `balance`: fires "running low" when it
/// is first below the project's threshold and "exhausted" when it first
/// reaches zero, once per crossing, and re-arms each once the balance is
/// back above its line. Returns the "running low" line still armed, if
/// any: the balance below which the store must be told of the pool again.
pub fn crossed(
    conn: &Connection,
    hooks: &Hooks,
    pool: PoolMarks,
    balance: i64,
    now: UnixMillis,
) -> StoreResult<Option<i64>> {
    let Some(hook) = hooks.0.get(&pool.project.0).filter(|_| pool.limited) else {
        return Ok(None);
    };
    let was = Notified { low: pool.low_notified, exhausted: pool.exhausted_notified };
    let crossing = hooks::crossing(hook, pool.limit_type, was, balance);
    for event in &crossing.events {
        emit(conn, hooks, pool.human, event, now)?;
    }
    let Notified { low, exhausted } = crossing.notified;
    if crossing.notified != was {
        conn.prepare_cached(
            "UPDATE limits SET low_notified = ?3, exhausted_notified = ?4
             WHERE human_id = ?1 AND limit_type = ?2",
        )?
        .execute(params![pool.human.0, pool.limit_type.as_str(), low, exhausted])?;
    }
    Ok(crossing.armed_line)
}
