//! The webhook outbox on PostgreSQL: events are written in the transaction
//! of the change that causes them. What a project's webhook wants is read
//! from its row in that same transaction, not kept in memory, so that every
//! server sharing the database sees a change of it at once; a pool's
//! webhook comes with the pool's locked row, so a tick pays nothing more
//! for projects without one.

use std::collections::HashMap;

use deadpool_postgres::GenericClient;

use super::query::{all, one, opt, run};
use crate::limits::LimitType;
use crate::store::hooks::{self, Hook, Notified};
use crate::store::{HumanId, StoreError, StoreResult, UnixMillis};
use crate::webhooks::events::{Event, Subject};

/// A pool's row, locked until the transaction ends, as it was before a
/// change, with its human's revocation epoch and its project's webhook.
#[derive(Clone, Debug)]
pub struct Pool {
    pub human: HumanId,
    pub limit_type: LimitType,
    pub balance: i64,
    pub limited: bool,
    pub notified: Notified,
    pub revocation_epoch: i64,
    /// `None` when the human's project has no webhook.
    pub hook: Option<Hook>,
}

/// Locks a pool's row (`FOR NO KEY UPDATE`: foreign keys that point at it
/// are not held up) and reads it; the pool must exist.
pub async fn lock_pool(
    tx: &impl GenericClient,
    human: HumanId,
    limit_type: LimitType,
) -> StoreResult<Pool> {
    let row = opt(
        tx,
        "SELECT l.balance, l.limited, l.low_notified, l.exhausted_notified,
                h.revocation_epoch, w.project_id IS NOT NULL, w.events, w.thresholds
         FROM limits l
         JOIN humans h ON h.id = l.human_id
         LEFT JOIN webhooks w ON w.project_id = h.project_id
         WHERE l.human_id = $1 AND l.limit_type = $2
         FOR NO KEY UPDATE OF l",
        &[&human.0, &limit_type.as_str()],
    )
    .await?;
    match row {
        Some(row) => Ok(pool_of(human, limit_type, &row)),
        None => Err(missing_pool(human, limit_type)),
    }
}

/// Locks several pools, as [`lock_pool`] does one, in one statement that
/// takes their locks in the order of human and limit type. Returns them in
/// the order of `keys`; every one must exist.
pub async fn lock_pools(
    tx: &impl GenericClient,
    keys: &[(HumanId, LimitType)],
) -> StoreResult<Vec<Pool>> {
    let sql = format!("{POOLS} ORDER BY l.human_id, l.limit_type FOR NO KEY UPDATE OF l");
    let pools = pools_of(tx, &sql, keys).await?;
    keys.iter()
        .map(|key| pools.get(key).cloned().ok_or_else(|| missing_pool(key.0, key.1)))
        .collect()
}

/// Reads several pools as they stand, without a lock, in the order of
/// `keys`; pools that do not exist are left out.
pub async fn read_pools(
    db: &impl GenericClient,
    keys: &[(HumanId, LimitType)],
) -> StoreResult<Vec<Pool>> {
    let mut pools = pools_of(db, POOLS, keys).await?;
    Ok(keys.iter().filter_map(|key| pools.remove(key)).collect())
}

/// The pools `keys` name, each with the columns [`pool_of`] reads.
const POOLS: &str = "SELECT l.balance, l.limited, l.low_notified, l.exhausted_notified,
                            h.revocation_epoch, w.project_id IS NOT NULL, w.events,
                            w.thresholds, l.human_id, l.limit_type
                     FROM limits l
                     JOIN humans h ON h.id = l.human_id
                     LEFT JOIN webhooks w ON w.project_id = h.project_id
                     WHERE (l.human_id, l.limit_type) IN
                           (SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[]))";

async fn pools_of(
    db: &impl GenericClient,
    sql: &str,
    keys: &[(HumanId, LimitType)],
) -> StoreResult<HashMap<(HumanId, LimitType), Pool>> {
    let humans: Vec<i64> = keys.iter().map(|(human, _)| human.0).collect();
    let types: Vec<&str> = keys.iter().map(|(_, limit_type)| limit_type.as_str()).collect();
    let rows = all(db, sql, &[&humans, &types]).await?;
    let mut found = HashMap::with_capacity(rows.len());
    for row in &rows {
        let key = (HumanId(row.get(8)), super::accounts::limit_type(row.get(9))?);
        found.insert(key, pool_of(key.0, key.1, row));
    }
    Ok(found)
}

/// A pool from a row of the statements above.
fn pool_of(human: HumanId, limit_type: LimitType, row: &tokio_postgres::Row) -> Pool {
    let hooked: bool = row.get(5);
    let hook = hooked.then(|| Hook::from_columns(row.get(6), row.get(7)));
    Pool {
        human,
        limit_type,
        balance: row.get(0),
        limited: row.get(1),
        notified: Notified { low: row.get(2), exhausted: row.get(3) },
        revocation_epoch: row.get(4),
        hook,
    }
}

fn missing_pool(human: HumanId, limit_type: LimitType) -> StoreError {
    StoreError::Other(format!("no {} pool for human {}", limit_type.as_str(), human.0))
}

/// Writes `event` about `human` to the outbox, if the human's project has a
/// webhook that wants it.
pub async fn emit(
    tx: &impl GenericClient,
    human: HumanId,
    event: &Event<'_>,
    now: UnixMillis,
) -> StoreResult<()> {
    let row = one(
        tx,
        "SELECT h.project_id, h.external_id, p.name, w.project_id IS NOT NULL, w.events
         FROM humans h
         JOIN projects p ON p.id = h.project_id
         LEFT JOIN webhooks w ON w.project_id = h.project_id
         WHERE h.id = $1",
        &[&human.0],
    )
    .await?;
    let hooked: bool = row.get(3);
    if !hooked || !Hook::from_columns(row.get(4), None).wants(event.kind()) {
        return Ok(());
    }
    let (project, name, project_name): (i64, String, String) = (row.get(0), row.get(1), row.get(2));
    let event_id = crate::ids::public_id("evt");
    let subject = Subject { event_id: &event_id, human: &name, project: &project_name, at: now };
    let body = event.body(&subject).to_string();
    run(
        tx,
        "INSERT INTO webhook_events
             (public_id, project_id, type, body, created_at, status, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, 'pending', $5)",
        &[&event_id, &project, &event.kind(), &body, &now],
    )
    .await?;
    Ok(())
}

/// After a debit outside a session: announces its usage (`event`, a
/// `usage.tracked`) and any line the pool's new `balance` crossed.
pub async fn debited(
    tx: &impl GenericClient,
    human: HumanId,
    event: &Event<'_>,
    balance: i64,
    now: UnixMillis,
) -> StoreResult<()> {
    emit(tx, human, event, now).await?;
    let Event::UsageTracked { limit_type, .. } = event else {
        return Ok(());
    };
    let pool = lock_pool(tx, human, *limit_type).await?;
    crossed(tx, &pool, balance, now).await.map(|_| ())
}

/// After a pool's balance changed to `balance`: fires the events its
/// webhook's lines call for (see [`hooks::crossing`]) and records what
/// fired. Returns the "running low" line still armed, if any.
pub async fn crossed(
    tx: &impl GenericClient,
    pool: &Pool,
    balance: i64,
    now: UnixMillis,
) -> StoreResult<Option<i64>> {
    let Some(hook) = pool.hook.as_ref().filter(|_| pool.limited) else {
        return Ok(None);
    };
    let crossing = hooks::crossing(hook, pool.limit_type, pool.notified, balance);
    for event in &crossing.events {
        emit(tx, pool.human, event, now).await?;
    }
    if crossing.notified != pool.notified {
        run(
            tx,
            "UPDATE limits SET low_notified = $3, exhausted_notified = $4
             WHERE human_id = $1 AND limit_type = $2",
            &[
                &pool.human.0,
                &pool.limit_type.as_str(),
                &crossing.notified.low,
                &crossing.notified.exhausted,
            ],
        )
        .await?;
    }
    Ok(crossing.armed_line)
}

/// The "running low" line of a pool as it stands: the balance below which
/// the store must be told of it again, so that its event fires on time.
pub fn armed_line(pool: &Pool) -> Option<i64> {
    let hook = pool.hook.as_ref().filter(|_| pool.limited)?;
    hooks::armed_line(hook, pool.limit_type, pool.notified)
}
