//! Usage reports from backends, each recorded once under its idempotency
//! key.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::accounts::{self, DebitOf};
use super::outbox::{self, Hooks};
use crate::limits::LimitType;
use crate::store::{HumanId, NewReport, Report, ReportOutcome, StoreError, StoreResult};
use crate::webhooks::events::{Event, UsageSource};

pub fn record(
    conn: &mut Connection,
    hooks: &Hooks,
    report: NewReport,
) -> StoreResult<ReportOutcome> {
    let tx = super::write_transaction(conn)?;
    if let Some(earlier) = find(&tx, &report)? {
        let same = earlier.human == report.human
            && earlier.limit_type == report.limit_type
            && earlier.amount == report.amount
            && earlier.metadata == report.metadata;
        return Ok(if same {
            ReportOutcome::Repeated(earlier)
        } else {
            ReportOutcome::KeyReused(earlier)
        });
    }

    let human = accounts::find_or_create_human(&tx, report.project, &report.human, report.now)?;
    let limited = accounts::ensure_pool(&tx, human.id, report.limit_type, report.now)?.1;
    tx.prepare_cached(
        "INSERT INTO usage_reports
             (project_id, idempotency_key, human_id, limit_type, amount, metadata, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        report.project.0,
        report.idempotency_key,
        human.id.0,
        report.limit_type.as_str(),
        report.amount,
        report.metadata,
        report.now
    ])?;
    let id = tx.last_insert_rowid();
    let balance = accounts::debit(
        &tx,
        human.id,
        report.limit_type,
        report.amount,
        DebitOf::Report(id),
        report.now,
    )?;
    let remaining = limited.then_some(balance);
    tx.execute("UPDATE usage_reports SET remaining = ?2 WHERE id = ?1", params![id, remaining])?;
    announce(&tx, hooks, human.id, id, &report, balance)?;
    tx.commit()?;
    Ok(ReportOutcome::Recorded(Report {
        id,
        human: report.human,
        limit_type: report.limit_type,
        amount: report.amount,
        idempotency_key: report.idempotency_key,
        metadata: report.metadata,
        remaining,
        created_at: report.now,
    }))
}

fn find(conn: &Connection, report: &NewReport) -> StoreResult<Option<Report>> {
    let mut stmt = conn.prepare_cached(
        "SELECT r.id, h.external_id, r.limit_type, r.amount, r.idempotency_key, r.metadata,
                r.remaining, r.created_at
         FROM usage_reports r JOIN humans h ON h.id = r.human_id
         WHERE r.project_id = ?1 AND r.idempotency_key = ?2",
    )?;
    let found = stmt
        .query_row(params![report.project.0, report.idempotency_key], row_to_report)
        .optional()?;
    found.transpose()
}

fn row_to_report(row: &Row) -> rusqlite::Result<StoreResult<Report>> {
    let name: String = row.get(2)?;
    let Some(limit_type) = LimitType::parse(&name) else {
        return Ok(Err(StoreError::Other(format!("unknown limit type {name:?} stored"))));
    };
    Ok(Ok(Report {
        id: row.get(0)?,
        human: row.get(1)?,
        limit_type,
        amount: row.get(3)?,
        idempotency_key: row.get(4)?,
        metadata: row.get(5)?,
        remaining: row.get(6)?,
        created_at: row.get(7)?,
    }))
}

/// The events of a report's debit: its usage, and any line its human's pool
/// crossed.
fn announce(
    conn: &Connection,
    hooks: &Hooks,
    human: HumanId,
    id: i64,
    report: &NewReport,
    balance: i64,
) -> StoreResult<()> {
    if hooks.is_empty() {
        return Ok(());
    }
    let metadata = report.metadata.as_deref().and_then(|text| serde_json::from_str(text).ok());
    let source =
        UsageSource::Report { report: id, idempotency_key: &report.idempotency_key, metadata };
    let event =
        Event::UsageTracked { limit_type: report.limit_type, amount: report.amount, source };
    outbox::debited(conn, hooks, human, &event, balance, report.now)
}
