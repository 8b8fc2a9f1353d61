//! Projects, API keys, humans, usage tokens and limits: everything the
//! backend API changes.

use rusqlite::{Connection, OptionalExtension, params};

use super::outbox::{self, Hooks};
use crate::limits::{ChangeMode, Limit, LimitType, SessionKind};
use crate::secret::SecretHash;
use crate::store::{
    ApiKeyRecord, Human, HumanId, MintRequest, ProjectId, StoreError, StoreResult, UnixMillis,
    UsageTokenRecord,
};
use crate::webhooks::events::Event;

pub fn add_api_key(conn: &mut Connection, project: &str, key: SecretHash) -> StoreResult<()> {
    let now = crate::clock::now_millis();
    let tx = super::write_transaction(conn)?;
    tx.execute(
        "INSERT INTO projects (name, created_at) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
        params![project, now],
    )?;
    let project_id: i64 =
        tx.query_row("SELECT id FROM projects WHERE name = ?1", [project], |row| row.get(0))?;
    tx.execute(
        "INSERT INTO api_keys (project_id, key_hash, created_at) VALUES (?1, ?2, ?3)",
        params![project_id, key.0.as_slice(), now],
    )?;
    tx.commit()?;
    Ok(())
}

pub fn revoke_api_key(conn: &Connection, key: SecretHash, now: i64) -> StoreResult<bool> {
    let revoked = conn.execute(
        "UPDATE api_keys SET revoked_at = ?2 WHERE key_hash = ?1 AND revoked_at IS NULL",
        params![key.0.as_slice(), now],
    )?;
    Ok(revoked == 1)
}

pub fn has_projects(conn: &Connection) -> StoreResult<bool> {
    Ok(conn.query_row("SELECT EXISTS (SELECT 1 FROM projects)", [], |row| row.get(0))?)
}

pub fn find_api_key(conn: &Connection, key: SecretHash) -> StoreResult<Option<ApiKeyRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT project_id, key_hash, revoked_at IS NOT NULL FROM api_keys WHERE key_hash = ?1",
    )?;
    let row = |row: &rusqlite::Row| {
        Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?, row.get::<_, bool>(2)?))
    };
    let found = stmt.query_row([key.0.as_slice()], row).optional()?;
    let found = found.filter(|(_, hash, _)| key.matches(hash));
    Ok(found.map(|(id, _, revoked)| ApiKeyRecord { project: ProjectId(id), revoked }))
}

pub fn find_usage_token(
    conn: &Connection,
    token: SecretHash,
) -> StoreResult<Option<UsageTokenRecord>> {
    let mut stmt = conn.prepare_cached(
        "SELECT t.id, t.token_hash, t.expires_at, t.revoked_at IS NOT NULL,
                h.id, h.project_id, h.external_id, h.revocation_epoch
         FROM usage_tokens t JOIN humans h ON h.id = t.human_id
         WHERE t.token_hash = ?1",
    )?;
    let found = stmt
        .query_row([token.0.as_slice()], |row| {
            let hash: Vec<u8> = row.get(1)?;
            let record = UsageTokenRecord {
                id: row.get(0)?,
                expires_at: row.get(2)?,
                revoked: row.get(3)?,
                human: Human {
                    id: HumanId(row.get(4)?),
                    project: ProjectId(row.get(5)?),
                    name: row.get(6)?,
                    revocation_epoch: row.get(7)?,
                },
            };
            Ok((hash, record))
        })
        .optional()?;
    Ok(found.filter(|(hash, _)| token.matches(hash)).map(|(_, record)| record))
}

pub fn find_human(conn: &Connection, project: ProjectId, name: &str) -> StoreResult<Option<Human>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, revocation_epoch FROM humans WHERE project_id = ?1 AND external_id = ?2",
    )?;
    let found = stmt
        .query_row(params![project.0, name], |row| {
            Ok(Human {
                id: HumanId(row.get(0)?),
                project,
                name: name.to_owned(),
                revocation_epoch: row.get(1)?,
            })
        })
        .optional()?;
    Ok(found)
}

pub fn find_or_create_human(
    conn: &Connection,
    project: ProjectId,
    name: &str,
    now: UnixMillis,
) -> StoreResult<Human> {
    conn.prepare_cached(
        "INSERT INTO humans (project_id, external_id, created_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (project_id, external_id) DO NOTHING",
    )?
    .execute(params![project.0, name, now])?;
    find_human(conn, project, name)?
        .ok_or_else(|| StoreError::Other("a human vanished right after it was created".into()))
}

pub fn mint_token(
    conn: &mut Connection,
    hooks: &Hooks,
    request: MintRequest,
) -> StoreResult<Vec<Limit>> {
    let tx = super::write_transaction(conn)?;
    let human = find_or_create_human(&tx, request.project, &request.human, request.now)?;
    if let Some(changes) = &request.limits {
        apply_limits(&tx, hooks, human.id, changes, ChangeMode::Set, request.now)?;
    }
    tx.prepare_cached(
        "INSERT INTO usage_tokens (human_id, token_hash, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        human.id.0,
        request.token_hash.0.as_slice(),
        request.now,
        request.expires_at
    ])?;
    let after = limits(&tx, human.id)?;
    tx.commit()?;
    Ok(after)
}

/// The human's limited pools, in a stable order.
pub fn limits(conn: &Connection, human: HumanId) -> StoreResult<Vec<Limit>> {
    let mut stmt = conn.prepare_cached(
        "SELECT limit_type, balance FROM limits
         WHERE human_id = ?1 AND limited = 1 ORDER BY limit_type",
    )?;
    let rows = stmt.query_map([human.0], |row| {
        let name: String = row.get(0)?;
        Ok((name, row.get::<_, i64>(1)?))
    })?;
    let mut found = Vec::new();
    for row in rows {
        let (name, value) = row?;
        let limit_type = LimitType::parse(&name)
            .ok_or_else(|| StoreError::Other(format!("unknown limit type {name:?} stored")))?;
        found.push(Limit { limit_type, value });
    }
    Ok(found)
}

/// Sets or raises each pool named in `changes`, with a grant in the ledger
/// for the difference, inside the caller's transaction.
pub fn apply_limits(
    conn: &Connection,
    hooks: &Hooks,
    human: HumanId,
    changes: &[Limit],
    mode: ChangeMode,
    now: UnixMillis,
) -> StoreResult<()> {
    for change in changes {
        let (balance, limited) = pool(conn, human, change.limit_type)?.unwrap_or((0, false));
        let target = match (mode, limited) {
            (ChangeMode::Add, true) => balance.saturating_add(change.value),
            _ => change.value,
        };
        if target > change.limit_type.max_base() {
            return Err(StoreError::LimitOverflow(change.limit_type));
        }
        let delta = target - balance;
        if delta != 0 || !limited {
            conn.prepare_cached(
                "INSERT INTO ledger (human_id, limit_type, entry, amount, created_at, updated_at)
                 VALUES (?1, ?2, 'grant', ?3, ?4, ?4)",
            )?
            .execute(params![human.0, change.limit_type.as_str(), delta, now])?;
            metrics::counter!(crate::metrics::LEDGER_ROWS).increment(1);
        }
        if !(mode == ChangeMode::Add && limited) {
            raise_refund_floors(conn, human, change.limit_type)?;
        }
        conn.prepare_cached(
            "INSERT INTO limits (human_id, limit_type, balance, limited, updated_at)
             VALUES (?1, ?2, ?3, 1, ?4)
             ON CONFLICT (human_id, limit_type)
             DO UPDATE SET balance = excluded.balance, limited = 1,
                           updated_at = excluded.updated_at",
        )?
        .execute(params![human.0, change.limit_type.as_str(), target, now])?;
        if let Some(marks) = outbox::marks(conn, human, change.limit_type)? {
            outbox::crossed(conn, hooks, marks, target, now)?;
        }
    }
    Ok(())
}

/// A pool has just been set to a value: what its open sessions were charged
/// until now is settled, and no refund may give it back. Usage the meter has
/// not recorded yet (at most a tick) is not covered.
fn raise_refund_floors(
    conn: &Connection,
    human: HumanId,
    limit_type: LimitType,
) -> StoreResult<()> {
    for kind in SessionKind::ALL.into_iter().filter(|k| k.limit_type() == limit_type) {
        conn.prepare_cached(
            "UPDATE sessions SET refund_floor =
                 (SELECT -COALESCE(SUM(amount), 0) FROM ledger WHERE session_id = sessions.id)
             WHERE human_id = ?1 AND kind = ?2 AND ended_at IS NULL",
        )?
        .execute(params![human.0, kind.as_str()])?;
    }
    Ok(())
}

/// A pool's balance and whether it is enforced, creating it unlimited (metered
/// but not enforced) if the human has none of this type yet.
pub fn ensure_pool(
    conn: &Connection,
    human: HumanId,
    limit_type: LimitType,
    now: UnixMillis,
) -> StoreResult<(i64, bool)> {
    conn.prepare_cached(
        "INSERT INTO limits (human_id, limit_type, balance, limited, updated_at)
         VALUES (?1, ?2, 0, 0, ?3) ON CONFLICT (human_id, limit_type) DO NOTHING",
    )?
    .execute(params![human.0, limit_type.as_str(), now])?;
    pool(conn, human, limit_type)?
        .ok_or_else(|| StoreError::Other("a pool vanished right after it was created".into()))
}

/// Why a usage token found earlier may no longer be used.
pub enum TokenRefusal {
    Revoked,
    Expired,
}

/// Re-checks, inside a transaction, a token the caller looked up before;
/// `None` for no token (an API key) or one still live.
pub fn token_refusal(
    conn: &Connection,
    token: Option<i64>,
    now: UnixMillis,
) -> StoreResult<Option<TokenRefusal>> {
    let Some(token) = token else {
        return Ok(None);
    };
    let (revoked, expires_at): (bool, i64) = conn
        .prepare_cached(
            "SELECT revoked_at IS NOT NULL, expires_at FROM usage_tokens WHERE id = ?1",
        )?
        .query_row([token], |row| Ok((row.get(0)?, row.get(1)?)))?;
    Ok(if revoked {
        Some(TokenRefusal::Revoked)
    } else if expires_at <= now {
        Some(TokenRefusal::Expired)
    } else {
        None
    })
}

/// What a debit outside a session is for.
#[derive(Clone, Copy)]
pub enum DebitOf {
    Completion(i64),
    Report(i64),
}

/// Takes `amount` from a pool in full, whatever it leaves, with a ledger row
/// naming what it is for; the pool must exist. Returns the balance after.
/// A pool may go below zero, but no further than the largest limit below
/// it, so that no number of debits can overflow a balance.
pub fn debit(
    conn: &Connection,
    human: HumanId,
    limit_type: LimitType,
    amount: i64,
    of: DebitOf,
    now: UnixMillis,
) -> StoreResult<i64> {
    let (balance, _) = pool(conn, human, limit_type)?
        .ok_or_else(|| StoreError::Other("a debit of a pool that does not exist".into()))?;
    let after = balance
        .checked_sub(amount)
        .filter(|after| *after >= -limit_type.max_base())
        .ok_or(StoreError::BalanceFloor(limit_type))?;
    let (completion, report) = match of {
        DebitOf::Completion(id) => (Some(id), None),
        DebitOf::Report(id) => (None, Some(id)),
    };
    conn.prepare_cached(
        "INSERT INTO ledger (human_id, limit_type, entry, amount, completion_id, report_id,
                             created_at, updated_at)
         VALUES (?1, ?2, 'debit', ?3, ?4, ?5, ?6, ?6)",
    )?
    .execute(params![human.0, limit_type.as_str(), -amount, completion, report, now])?;
    metrics::counter!(crate::metrics::LEDGER_ROWS).increment(1);
    conn.prepare_cached(
        "UPDATE limits SET balance = ?3, updated_at = ?4 WHERE human_id = ?1 AND limit_type = ?2",
    )?
    .execute(params![human.0, limit_type.as_str(), after, now])?;
    Ok(after)
}

/// A pool's balance and whether it is enforced, if the pool exists.
pub fn pool(
    conn: &Connection,
    human: HumanId,
    limit_type: LimitType,
) -> StoreResult<Option<(i64, bool)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT balance, limited FROM limits WHERE human_id = ?1 AND limit_type = ?2",
    )?;
    Ok(stmt
        .query_row(params![human.0, limit_type.as_str()], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?)
}

pub fn revoke(
    conn: &mut Connection,
    hooks: &Hooks,
    project: ProjectId,
    name: &str,
    now: UnixMillis,
) -> StoreResult<Option<u64>> {
    let tx = super::write_transaction(conn)?;
    let Some(human) = find_human(&tx, project, name)? else {
        return Ok(None);
    };
    let revoked = tx.execute(
        "UPDATE usage_tokens SET revoked_at = ?2
         WHERE human_id = ?1 AND revoked_at IS NULL AND expires_at > ?2",
        params![human.id.0, now],
    )?;
    tx.execute(
        "UPDATE humans SET revocation_epoch = revocation_epoch + 1 WHERE id = ?1",
        [human.id.0],
    )?;
    let event = Event::TokenRevoked { revoked_tokens: revoked as u64 };
    outbox::emit(&tx, hooks, human.id, &event, now)?;
    tx.commit()?;
    Ok(Some(revoked as u64))
}

pub fn newest_live_token(
    conn: &Connection,
    project: ProjectId,
    name: &str,
    now: UnixMillis,
) -> StoreResult<Option<UnixMillis>> {
    let Some(human) = find_human(conn, project, name)? else {
        return Ok(None);
    };
    let mut stmt = conn.prepare_cached(
        "SELECT expires_at FROM usage_tokens
         WHERE human_id = ?1 AND revoked_at IS NULL AND expires_at > ?2
         ORDER BY created_at DESC, id DESC LIMIT 1",
    )?;
    Ok(stmt.query_row(params![human.id.0, now], |row| row.get(0)).optional()?)
}

pub fn set_token_expiry(
    conn: &Connection,
    project: ProjectId,
    name: &str,
    now: UnixMillis,
    expires_at: UnixMillis,
) -> StoreResult<u64> {
    let Some(human) = find_human(conn, project, name)? else {
        return Ok(0);
    };
    let updated = conn.execute(
        "UPDATE usage_tokens SET expires_at = ?3
         WHERE human_id = ?1 AND revoked_at IS NULL AND expires_at > ?2",
        params![human.id.0, now, expires_at],
    )?;
    Ok(updated as u64)
}
