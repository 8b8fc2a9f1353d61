//! Projects, API keys, humans, usage tokens and limits on PostgreSQL:
//! everything the backend API changes, and the pools' grants and debits.

use deadpool_postgres::{Client, GenericClient};

use super::outbox;
use super::query::{all, one, opt, run};
use crate::limits::{ChangeMode, Limit, LimitType, SessionKind};
use crate::secret::SecretHash;
use crate::store::{
    ApiKeyRecord, Human, HumanId, MintRequest, ProjectId, StoreError, StoreResult, UnixMillis,
    UsageTokenRecord,
};
use crate::webhooks::events::Event;

pub async fn add_api_key(client: &mut Client, project: &str, key: SecretHash) -> StoreResult<()> {
    let now = crate::clock::now_millis();
    let hash: &[u8] = &key.0;
    let tx = client.transaction().await?;
    run(
        &tx,
        "INSERT INTO projects (name, created_at) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        &[&project, &now],
    )
    .await?;
    let project_id: i64 =
        one(&tx, "SELECT id FROM projects WHERE name = $1", &[&project]).await?.get(0);
    run(
        &tx,
        "INSERT INTO api_keys (project_id, key_hash, created_at) VALUES ($1, $2, $3)",
        &[&project_id, &hash, &now],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

pub async fn revoke_api_key(
    db: &impl GenericClient,
    key: SecretHash,
    now: UnixMillis,
) -> StoreResult<bool> {
    let hash: &[u8] = &key.0;
    let sql = "UPDATE api_keys SET revoked_at = $2 WHERE key_hash = $1 AND revoked_at IS NULL";
    Ok(run(db, sql, &[&hash, &now]).await? == 1)
}

pub async fn has_projects(db: &impl GenericClient) -> StoreResult<bool> {
    Ok(one(db, "SELECT EXISTS (SELECT 1 FROM projects)", &[]).await?.get(0))
}

pub async fn find_api_key(
    db: &impl GenericClient,
    key: SecretHash,
) -> StoreResult<Option<ApiKeyRecord>> {
    let hash: &[u8] = &key.0;
    let sql =
        "SELECT project_id, key_hash, revoked_at IS NOT NULL FROM api_keys WHERE key_hash = $1";
    let Some(row) = opt(db, sql, &[&hash]).await? else {
        return Ok(None);
    };
    let stored: Vec<u8> = row.get(1);
    let record = ApiKeyRecord { project: ProjectId(row.get(0)), revoked: row.get(2) };
    Ok(key.matches(&stored).then_some(record))
}

pub async fn find_usage_token(
    db: &impl GenericClient,
    token: SecretHash,
) -> StoreResult<Option<UsageTokenRecord>> {
    let hash: &[u8] = &token.0;
    let sql = "SELECT t.id, t.token_hash, t.expires_at, t.revoked_at IS NOT NULL,
                      h.id, h.project_id, h.external_id, h.revocation_epoch
               FROM usage_tokens t JOIN humans h ON h.id = t.human_id
               WHERE t.token_hash = $1";
    let Some(row) = opt(db, sql, &[&hash]).await? else {
        return Ok(None);
    };
    let stored: Vec<u8> = row.get(1);
    let record = UsageTokenRecord {
        id: row.get(0),
        expires_at: row.get(2),
        revoked: row.get(3),
        human: Human {
            id: HumanId(row.get(4)),
            project: ProjectId(row.get(5)),
            name: row.get(6),
            revocation_epoch: row.get(7),
        },
    };
    Ok(token.matches(&stored).then_some(record))
}

pub async fn find_human(
    db: &impl GenericClient,
    project: ProjectId,
    name: &str,
) -> StoreResult<Option<Human>> {
    let sql = "SELECT id, revocation_epoch FROM humans WHERE project_id = $1 AND external_id = $2";
    let found = opt(db, sql, &[&project.0, &name]).await?;
    Ok(found.map(|row| Human {
        id: HumanId(row.get(0)),
        project,
        name: name.to_owned(),
        revocation_epoch: row.get(1),
    }))
}

pub async fn find_or_create_human(
    db: &impl GenericClient,
    project: ProjectId,
    name: &str,
    now: UnixMillis,
) -> StoreResult<Human> {
    run(
        db,
        "INSERT INTO humans (project_id, external_id, created_at) VALUES ($1, $2, $3)
         ON CONFLICT (project_id, external_id) DO NOTHING",
        &[&project.0, &name, &now],
    )
    .await?;
    find_human(db, project, name)
        .await?
        .ok_or_else(|| StoreError::Other("a human vanished right after it was created".into()))
}

pub async fn mint_token(client: &mut Client, request: MintRequest) -> StoreResult<Vec<Limit>> {
    let tx = client.transaction().await?;
    let human = find_or_create_human(&tx, request.project, &request.human, request.now).await?;
    if let Some(changes) = &request.limits {
        apply_limits(&tx, human.id, changes, ChangeMode::Set, request.now).await?;
    }
    let hash: &[u8] = &request.token_hash.0;
    run(
        &tx,
        "INSERT INTO usage_tokens (human_id, token_hash, created_at, expires_at)
         VALUES ($1, $2, $3, $4)",
        &[&human.id.0, &hash, &request.now, &request.expires_at],
    )
    .await?;
    let after = limits(&tx, human.id).await?;
    tx.commit().await?;
    Ok(after)
}

/// The human's limited pools, in a stable order.
pub async fn limits(db: &impl GenericClient, human: HumanId) -> StoreResult<Vec<Limit>> {
    let sql = "SELECT limit_type, balance FROM limits
               WHERE human_id = $1 AND limited ORDER BY limit_type";
    let rows = all(db, sql, &[&human.0]).await?;
    rows.iter()
        .map(|row| Ok(Limit { limit_type: limit_type(row.get(0))?, value: row.get(1) }))
        .collect()
}

pub fn limit_type(name: &str) -> StoreResult<LimitType> {
    LimitType::parse(name)
        .ok_or_else(|| StoreError::Other(format!("unknown limit type {name:?} stored")))
}

/// Sets or raises each pool named in `changes`, with a grant in the ledger
/// for the difference, inside the caller's transaction. Pools are locked
/// in the order of their type's name, as a batch of usage locks them.
pub async fn apply_limits(
    tx: &impl GenericClient,
    human: HumanId,
    changes: &[Limit],
    mode: ChangeMode,
    now: UnixMillis,
) -> StoreResult<()> {
    let mut changes = changes.to_vec();
    changes.sort_by_key(|change| change.limit_type.as_str());
    for change in changes {
        apply_limit(tx, human, change, mode, now).await?;
    }
    Ok(())
}

async fn apply_limit(
    tx: &impl GenericClient,
    human: HumanId,
    change: Limit,
    mode: ChangeMode,
    now: UnixMillis,
) -> StoreResult<()> {
    let limit_type = change.limit_type;
    ensure_pool(tx, human, limit_type, now).await?;
    let pool = outbox::lock_pool(tx, human, limit_type).await?;
    let add = mode == ChangeMode::Add;
    // The new balance is worked out by the database from the locked row;
    // no row comes back when it would pass the largest limit. The check is
    // made in NUMERIC, so that a change too large for a BIGINT is refused
    // as too large, not failed as out of range.
    let changed = opt(
        tx,
        "UPDATE limits SET limited = TRUE, updated_at = $5,
             balance = CASE WHEN $3 AND limited THEN balance + $4 ELSE $4 END
         WHERE human_id = $1 AND limit_type = $2
           AND CASE WHEN $3 AND limited THEN balance::NUMERIC + $4::BIGINT ELSE $4 END
               <= $6::BIGINT
         RETURNING balance",
        &[&human.0, &limit_type.as_str(), &add, &change.value, &now, &limit_type.max_base()],
    )
    .await?;
    let Some(changed) = changed else {
        return Err(StoreError::LimitOverflow(limit_type));
    };
    let target: i64 = changed.get(0);
    let delta = target - pool.balance;
    if delta != 0 || !pool.limited {
        run(
            tx,
            "INSERT INTO ledger (human_id, limit_type, entry, amount, created_at, updated_at)
             VALUES ($1, $2, 'grant', $3, $4, $4)",
            &[&human.0, &limit_type.as_str(), &delta, &now],
        )
        .await?;
        metrics::counter!(crate::metrics::LEDGER_ROWS).increment(1);
    }
    if !(add && pool.limited) {
        raise_refund_floors(tx, human, limit_type).await?;
    }
    let pool = outbox::Pool { limited: true, ..pool };
    outbox::crossed(tx, &pool, target, now).await?;
    Ok(())
}

/// A pool has just been set to a value: what its open sessions were charged
/// until now is settled, and no refund may give it back. Usage the meter has
/// not recorded yet (at most a tick) is not covered.
async fn raise_refund_floors(
    tx: &impl GenericClient,
    human: HumanId,
    limit_type: LimitType,
) -> StoreResult<()> {
    for kind in SessionKind::ALL.into_iter().filter(|k| k.limit_type() == limit_type) {
        run(
            tx,
            "UPDATE sessions SET refund_floor = (SELECT -COALESCE(SUM(amount), 0)::BIGINT
                                                 FROM ledger WHERE session_id = sessions.id)
             WHERE human_id = $1 AND kind = $2 AND ended_at IS NULL",
            &[&human.0, &kind.as_str()],
        )
        .await?;
    }
    Ok(())
}

/// A pool's balance and whether it is enforced, creating it unlimited (metered
/// but not enforced) if the human has none of this type yet.
pub async fn ensure_pool(
    db: &impl GenericClient,
    human: HumanId,
    limit_type: LimitType,
    now: UnixMillis,
) -> StoreResult<(i64, bool)> {
    run(
        db,
        "INSERT INTO limits (human_id, limit_type, balance, limited, updated_at)
         VALUES ($1, $2, 0, FALSE, $3) ON CONFLICT (human_id, limit_type) DO NOTHING",
        &[&human.0, &limit_type.as_str(), &now],
    )
    .await?;
    let sql = "SELECT balance, limited FROM limits WHERE human_id = $1 AND limit_type = $2";
    let row = opt(db, sql, &[&human.0, &limit_type.as_str()]).await?;
    let row =
        row.ok_or_else(|| StoreError::Other("a pool vanished right after it was created".into()))?;
    Ok((row.get(0), row.get(1)))
}

/// Why a usage token found earlier may no longer be used.
pub enum TokenRefusal {
    Revoked,
    Expired,
}

/// Re-checks, inside a transaction, a token the caller looked up before;
/// `None` for no token (an API key) or one still live.
pub async fn token_refusal(
    db: &impl GenericClient,
    token: Option<i64>,
    now: UnixMillis,
) -> StoreResult<Option<TokenRefusal>> {
    let Some(token) = token else {
        return Ok(None);
    };
    let sql = "SELECT revoked_at IS NOT NULL, expires_at FROM usage_tokens WHERE id = $1";
    let row = one(db, sql, &[&token]).await?;
    let (revoked, expires_at): (bool, i64) = (row.get(0), row.get(1));
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
pub async fn debit(
    tx: &impl GenericClient,
    human: HumanId,
    limit_type: LimitType,
    amount: i64,
    of: DebitOf,
    now: UnixMillis,
) -> StoreResult<i64> {
    let floor = -limit_type.max_base();
    // Checked in NUMERIC: a debit too large for a BIGINT is refused at the
    // floor, not failed as out of range.
    let debited = opt(
        tx,
        "UPDATE limits SET balance = balance - $3, updated_at = $4
         WHERE human_id = $1 AND limit_type = $2
           AND balance::NUMERIC - $3::BIGINT >= $5::BIGINT
         RETURNING balance",
        &[&human.0, &limit_type.as_str(), &amount, &now, &floor],
    )
    .await?;
    let Some(debited) = debited else {
        let sql = "SELECT 1 FROM limits WHERE human_id = $1 AND limit_type = $2";
        return Err(match opt(tx, sql, &[&human.0, &limit_type.as_str()]).await? {
            Some(_) => StoreError::BalanceFloor(limit_type),
            None => StoreError::Other("a debit of a pool that does not exist".into()),
        });
    };
    let (completion, report) = match of {
        DebitOf::Completion(id) => (Some(id), None),
        DebitOf::Report(id) => (None, Some(id)),
    };
    run(
        tx,
        "INSERT INTO ledger (human_id, limit_type, entry, amount, completion_id, report_id,
                             created_at, updated_at)
         VALUES ($1, $2, 'debit', $3, $4, $5, $6, $6)",
        &[&human.0, &limit_type.as_str(), &-amount, &completion, &report, &now],
    )
    .await?;
    metrics::counter!(crate::metrics::LEDGER_ROWS).increment(1);
    Ok(debited.get(0))
}

pub async fn revoke(
    client: &mut Client,
    project: ProjectId,
    name: &str,
    now: UnixMillis,
) -> StoreResult<Option<u64>> {
    let tx = client.transaction().await?;
    let Some(human) = find_human(&tx, project, name).await? else {
        return Ok(None);
    };
    let revoked = run(
        &tx,
        "UPDATE usage_tokens SET revoked_at = $2
         WHERE human_id = $1 AND revoked_at IS NULL AND expires_at > $2",
        &[&human.id.0, &now],
    )
    .await?;
    let sql = "UPDATE humans SET revocation_epoch = revocation_epoch + 1 WHERE id = $1";
    run(&tx, sql, &[&human.id.0]).await?;
    outbox::emit(&tx, human.id, &Event::TokenRevoked { revoked_tokens: revoked }, now).await?;
    tx.commit().await?;
    Ok(Some(revoked))
}

pub async fn newest_live_token(
    db: &impl GenericClient,
    project: ProjectId,
    name: &str,
    now: UnixMillis,
) -> StoreResult<Option<UnixMillis>> {
    let Some(human) = find_human(db, project, name).await? else {
        return Ok(None);
    };
    let sql = "SELECT expires_at FROM usage_tokens
               WHERE human_id = $1 AND revoked_at IS NULL AND expires_at > $2
               ORDER BY created_at DESC, id DESC LIMIT 1";
    Ok(opt(db, sql, &[&human.id.0, &now]).await?.map(|row| row.get(0)))
}

pub async fn set_token_expiry(
    db: &impl GenericClient,
    project: ProjectId,
    name: &str,
    now: UnixMillis,
    expires_at: UnixMillis,
) -> StoreResult<u64> {
    let Some(human) = find_human(db, project, name).await? else {
        return Ok(0);
    };
    let sql = "UPDATE usage_tokens SET expires_at = $3
               WHERE human_id = $1 AND revoked_at IS NULL AND expires_at > $2";
    run(db, sql, &[&human.id.0, &now, &expires_at]).await
}
