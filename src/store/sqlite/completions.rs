//! Chat completions: holding part of a human's `token_cnt` while one runs,
//! and debiting its usage when it ends.

use rusqlite::{Connection, params};

use super::accounts::{self, DebitOf, TokenRefusal};
use super::outbox::{self, Hooks};
use crate::limits::{LimitType, completion_allowance};
use crate::store::{
    CompletionAdmission, CompletionEnd, CompletionKey, CompletionOutcome, HumanId, NewCompletion,
    StoreResult, UnixMillis, UsageSource,
};
use crate::webhooks::events::{self, Event};

const POOL: LimitType = LimitType::TokenCnt;

pub fn start(conn: &mut Connection, completion: NewCompletion) -> StoreResult<CompletionAdmission> {
    let tx = super::write_transaction(conn)?;
    match accounts::token_refusal(&tx, completion.token, completion.now)? {
        Some(TokenRefusal::Revoked) => return Ok(CompletionAdmission::TokenRevoked),
        Some(TokenRefusal::Expired) => return Ok(CompletionAdmission::TokenExpired),
        None => {}
    }
    let (balance, limited) = accounts::ensure_pool(&tx, completion.human, POOL, completion.now)?;
    let allowance = if limited {
        let available = balance - held(&tx, completion.human)?;
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

    tx.prepare_cached(
        "INSERT INTO completions
             (public_id, human_id, token_id, model, reserved, started_at, prompt_estimate)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        completion.public_id,
        completion.human.0,
        completion.token,
        completion.model,
        reserved,
        completion.now,
        completion.prompt_estimate
    ])?;
    let key = CompletionKey(tx.last_insert_rowid());
    tx.commit()?;
    Ok(CompletionAdmission::Admitted { key, allowance })
}

/// What the human's running completions hold.
fn held(conn: &Connection, human: HumanId) -> StoreResult<i64> {
    let mut stmt = conn.prepare_cached(
        "SELECT COALESCE(SUM(reserved), 0) FROM completions
         WHERE human_id = ?1 AND ended_at IS NULL",
    )?;
    Ok(stmt.query_row([human.0], |row| row.get(0))?)
}

/// Releases the hold and debits the usage; a completion already ended is
/// left as it is. Returns the remaining `token_cnt`, `None` when unlimited.
pub fn end(conn: &mut Connection, hooks: &Hooks, end: CompletionEnd) -> StoreResult<Option<i64>> {
    let tx = super::write_transaction(conn)?;
    let ended = tx
        .prepare_cached(
            "UPDATE completions SET ended_at = ?2, end_reason = ?3, reserved = 0,
                 prompt_tokens = ?4, completion_tokens = ?5, usage_source = ?6
             WHERE id = ?1 AND ended_at IS NULL",
        )?
        .execute(params![
            end.key.0,
            end.now,
            end.outcome.as_str(),
            end.prompt_tokens,
            end.completion_tokens,
            end.source.as_str()
        ])?;
    let total = end.prompt_tokens + end.completion_tokens;
    if ended == 1 && total > 0 {
        let balance =
            accounts::debit(&tx, end.human, POOL, total, DebitOf::Completion(end.key.0), end.now)?;
        announce(&tx, hooks, &end, total, balance)?;
    }
    let (balance, limited) = accounts::ensure_pool(&tx, end.human, POOL, end.now)?;
    tx.commit()?;
    Ok(limited.then_some(balance))
}

/// The events of a completion's debit: its usage, and any line its
/// human's pool crossed.
fn announce(
    conn: &Connection,
    hooks: &Hooks,
    end: &CompletionEnd,
    total: i64,
    balance: i64,
) -> StoreResult<()> {
    if hooks.is_empty() {
        return Ok(());
    }
    let (public_id, model): (String, String) = conn
        .prepare_cached("SELECT public_id, model FROM completions WHERE id = ?1")?
        .query_row([end.key.0], |row| Ok((row.get(0)?, row.get(1)?)))?;
    let source = events::UsageSource::Completion {
        completion: &public_id,
        model: &model,
        prompt_tokens: end.prompt_tokens,
        completion_tokens: end.completion_tokens,
    };
    let event = Event::UsageTracked { limit_type: POOL, amount: total, source };
    outbox::debited(conn, hooks, end.human, &event, balance, end.now)
}

/// Ends the completions a stopped server left running, each charged its
/// prompt's estimate: the upstream had the prompt, and may have billed for
/// it; what it answered was never seen.
pub fn close_abandoned(conn: &mut Connection, hooks: &Hooks, now: UnixMillis) -> StoreResult<u64> {
    let open: Vec<(i64, i64, i64)> = conn
        .prepare("SELECT id, human_id, prompt_estimate FROM completions WHERE ended_at IS NULL")?
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for &(id, human, estimate) in &open {
        let left = CompletionEnd {
            key: CompletionKey(id),
            human: HumanId(human),
            prompt_tokens: estimate,
            completion_tokens: 0,
            source: UsageSource::Counted,
            outcome: CompletionOutcome::ServerRestart,
            now,
        };
        end(conn, hooks, left)?;
    }
    Ok(open.len() as u64)
}
