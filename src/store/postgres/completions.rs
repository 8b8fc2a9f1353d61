//! Chat completions on PostgreSQL: holding part of a human's `token_cnt`
//! while one runs, and debiting its usage when it ends.

use deadpool_postgres::{Client, GenericClient};

use super::accounts::{self, DebitOf, TokenRefusal};
use super::instances::{self, Instance};
use super::outbox;
use super::query::{all, one, run};
use crate::limits::{LimitType, completion_allowance};
use crate::store::{
    CompletionAdmission, CompletionEnd, CompletionKey, CompletionOutcome, HumanId, NewCompletion,
    StoreResult, UnixMillis, UsageSource,
};
use crate::webhooks::events::{self, Event};

const POOL: LimitType = LimitType::TokenCnt;

/// Starts a completion relayed by this server's run `instance` (`None`
/// for a store with no run).
pub async fn start(
    client: &mut Client,
    completion: NewCompletion,
    instance: Option<Instance>,
) -> StoreResult<CompletionAdmission> {
    let tx = client.transaction().await?;
    instances::check_live(&tx, instance).await?;
    match accounts::token_refusal(&tx, completion.token, completion.now).await? {
        Some(TokenRefusal::Revoked) => return Ok(CompletionAdmission::TokenRevoked),
        Some(TokenRefusal::Expired) => return Ok(CompletionAdmission::TokenExpired),
        None => {}
    }
    accounts::ensure_pool(&tx, completion.human, POOL, completion.now).await?;
    // Locked, so that two completions starting at once cannot both count
    // the same tokens as available.
    let pool = outbox::lock_pool(&tx, completion.human, POOL).await?;
    let allowance = if pool.limited {
        let available = pool.balance - held(&tx, completion.human).await?;
        let allowance = completion_allowance(
            available,
            completion.prompt_estimate,
            completion.wanted,
            completion.choices,
        );
        match allowance {
            Some(allowance) => Some(allowance),
            None => return Ok(CompletionAdmission::LimitExhausted),
        }
    } else {
        None
    };
    let reserved = allowance
        .map_or(0, |allowance| completion.prompt_estimate + allowance * completion.choices);

    let key: i64 = one(
        &tx,
        "INSERT INTO completions (public_id, human_id, token_id, model, reserved, started_at,
                                  prompt_estimate, instance_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        &[
            &completion.public_id,
            &completion.human.0,
            &completion.token,
            &completion.model,
            &reserved,
            &completion.now,
            &completion.prompt_estimate,
            &instance.map(|instance| instance.id),
        ],
    )
    .await?
    .get(0);
    tx.commit().await?;
    Ok(CompletionAdmission::Admitted { key: CompletionKey(key), allowance })
}

/// What the human's running completions hold.
async fn held(db: &impl GenericClient, human: HumanId) -> StoreResult<i64> {
    let sql = "SELECT COALESCE(SUM(reserved), 0)::BIGINT FROM completions
               WHERE human_id = $1 AND ended_at IS NULL";
    Ok(one(db, sql, &[&human.0]).await?.get(0))
}

/// Releases the hold and debits the usage; a completion already ended is
/// left as it is. Returns the remaining `token_cnt`, `None` when unlimited.
pub async fn end(client: &mut Client, end: CompletionEnd) -> StoreResult<Option<i64>> {
    let tx = client.transaction().await?;
    let remaining = end_in(&tx, end).await?;
    tx.commit().await?;
    Ok(remaining)
}

/// [`end`], in the transaction `tx`.
async fn end_in(tx: &impl GenericClient, end: CompletionEnd) -> StoreResult<Option<i64>> {
    let ended = run(
        tx,
        "UPDATE completions SET ended_at = $2, end_reason = $3, reserved = 0,
             prompt_tokens = $4, completion_tokens = $5, usage_source = $6
         WHERE id = $1 AND ended_at IS NULL",
        &[
            &end.key.0,
            &end.now,
            &end.outcome.as_str(),
            &end.prompt_tokens,
            &end.completion_tokens,
            &end.source.as_str(),
        ],
    )
    .await?;
    let total = end.prompt_tokens + end.completion_tokens;
    if ended == 1 && total > 0 {
        let of = DebitOf::Completion(end.key.0);
        let balance = accounts::debit(tx, end.human, POOL, total, of, end.now).await?;
        announce(tx, &end, total, balance).await?;
    }
    let (balance, limited) = accounts::ensure_pool(tx, end.human, POOL, end.now).await?;
    Ok(limited.then_some(balance))
}

/// The events of a completion's debit: its usage, and any line its
/// human's pool crossed.
async fn announce(
    tx: &impl GenericClient,
    end: &CompletionEnd,
    total: i64,
    balance: i64,
) -> StoreResult<()> {
    let sql = "SELECT public_id, model FROM completions WHERE id = $1";
    let row = one(tx, sql, &[&end.key.0]).await?;
    let (public_id, model): (String, String) = (row.get(0), row.get(1));
    let source = events::UsageSource::Completion {
        completion: &public_id,
        model: &model,
        prompt_tokens: end.prompt_tokens,
        completion_tokens: end.completion_tokens,
    };
    let event = Event::UsageTracked { limit_type: POOL, amount: total, source };
    outbox::debited(tx, end.human, &event, balance, end.now).await
}

/// Ends the completions a server without a run left running
/// (`server_restart`). Those of runs are ended as their runs are found
/// lost (see [`super::instances::close_out_lost`]).
pub async fn close_abandoned(client: &mut Client, now: UnixMillis) -> StoreResult<u64> {
    let tx = client.transaction().await?;
    let closed = close_running(&tx, now).await?;
    tx.commit().await?;
    Ok(closed)
}

/// Ends, in the transaction `tx`, one completion a run other than `me` that
/// has ended left running (`instance_lost`), charged its prompt's estimate,
/// if there is one another close-out is not ending. Returns whether there
/// was. One a transaction, so that the pool it debits is the transaction's
/// only lock of a pool.
pub async fn close_out_one(tx: &impl GenericClient, me: i64, now: UnixMillis) -> StoreResult<bool> {
    let sql = "SELECT c.id, c.human_id, c.prompt_estimate
               FROM completions c JOIN instances i ON i.id = c.instance_id
               WHERE c.ended_at IS NULL AND i.ended_at IS NOT NULL AND i.id <> $1
               ORDER BY c.id LIMIT 1 FOR UPDATE OF c SKIP LOCKED";
    let Some(row) = super::query::opt(tx, sql, &[&me]).await? else {
        return Ok(false);
    };
    end_in(tx, left_running(&row, CompletionOutcome::InstanceLost, now)).await?;
    Ok(true)
}

/// Ends the completions of no run (`server_restart`), each charged its
/// prompt's estimate: the upstream had the prompt, and may have billed for
/// it; what it answered was never seen.
async fn close_running(tx: &impl GenericClient, now: UnixMillis) -> StoreResult<u64> {
    let sql = "SELECT id, human_id, prompt_estimate FROM completions
               WHERE ended_at IS NULL AND instance_id IS NULL ORDER BY id";
    let open = all(tx, sql, &[]).await?;
    for row in &open {
        end_in(tx, left_running(row, CompletionOutcome::ServerRestart, now)).await?;
    }
    Ok(open.len() as u64)
}

/// The end of a completion left running, from its id, human and prompt
/// estimate: what the upstream answered was never seen.
fn left_running(
    row: &tokio_postgres::Row,
    outcome: CompletionOutcome,
    now: UnixMillis,
) -> CompletionEnd {
    CompletionEnd {
        key: CompletionKey(row.get(0)),
        human: HumanId(row.get(1)),
        prompt_tokens: row.get(2),
        completion_tokens: 0,
        source: UsageSource::Counted,
        outcome,
        now,
    }
}
