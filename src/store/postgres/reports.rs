//! Usage reports from backends on PostgreSQL, each recorded once under its
//! idempotency key.

use deadpool_postgres::{Client, GenericClient};
use tokio_postgres::Row;

use super::accounts::{self, DebitOf};
use super::outbox;
use super::query::{opt, run};
use crate::store::{HumanId, NewReport, Report, ReportOutcome, StoreError, StoreResult};
use crate::webhooks::events::{Event, UsageSource};

pub async fn record(client: &mut Client, report: NewReport) -> StoreResult<ReportOutcome> {
    let tx = client.transaction().await?;
    if let Some(earlier) = find(&tx, &report).await? {
        return Ok(repeated(earlier, &report));
    }

    let human =
        accounts::find_or_create_human(&tx, report.project, &report.human, report.now).await?;
    let limited = accounts::ensure_pool(&tx, human.id, report.limit_type, report.now).await?.1;
    // Two reports under one key at once: the second waits for the first,
    // inserts nothing, and is answered with what the first recorded.
    let inserted = opt(
        &tx,
        "INSERT INTO usage_reports
             (project_id, idempotency_key, human_id, limit_type, amount, metadata, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (project_id, idempotency_key) DO NOTHING
         RETURNING id",
        &[
            &report.project.0,
            &report.idempotency_key,
            &human.id.0,
            &report.limit_type.as_str(),
            &report.amount,
            &report.metadata,
            &report.now,
        ],
    )
    .await?;
    let Some(inserted) = inserted else {
        let earlier = find(&tx, &report).await?;
        let earlier = earlier.ok_or_else(|| StoreError::Other("a report vanished".into()))?;
        return Ok(repeated(earlier, &report));
    };
    let id: i64 = inserted.get(0);
    let of = DebitOf::Report(id);
    let balance =
        accounts::debit(&tx, human.id, report.limit_type, report.amount, of, report.now).await?;
    let remaining = limited.then_some(balance);
    let sql = "UPDATE usage_reports SET remaining = $2 WHERE id = $1";
    run(&tx, sql, &[&id, &remaining]).await?;
    announce(&tx, human.id, id, &report, balance).await?;
    tx.commit().await?;
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

/// The answer to a report whose key was used before.
fn repeated(earlier: Report, report: &NewReport) -> ReportOutcome {
    let same = earlier.human == report.human
        && earlier.limit_type == report.limit_type
        && earlier.amount == report.amount
        && earlier.metadata == report.metadata;
    if same { ReportOutcome::Repeated(earlier) } else { ReportOutcome::KeyReused(earlier) }
}

async fn find(db: &impl GenericClient, report: &NewReport) -> StoreResult<Option<Report>> {
    let row = opt(
        db,
        "SELECT r.id, h.external_id, r.limit_type, r.amount, r.idempotency_key, r.metadata,
                r.remaining, r.created_at
         FROM usage_reports r JOIN humans h ON h.id = r.human_id
         WHERE r.project_id = $1 AND r.idempotency_key = $2",
        &[&report.project.0, &report.idempotency_key],
    )
    .await?;
    row.as_ref().map(row_to_report).transpose()
}

fn row_to_report(row: &Row) -> StoreResult<Report> {
    Ok(Report {
        id: row.get(0),
        human: row.get(1),
        limit_type: accounts::limit_type(row.get(2))?,
        amount: row.get(3),
        idempotency_key: row.get(4),
        metadata: row.get(5),
        remaining: row.get(6),
        created_at: row.get(7),
    })
}

/// The events of a report's debit: its usage, and any line its human's pool
/// crossed.
async fn announce(
    tx: &impl GenericClient,
    human: HumanId,
    id: i64,
    report: &NewReport,
    balance: i64,
) -> StoreResult<()> {
    let metadata = report.metadata.as_deref().and_then(|text| serde_json::from_str(text).ok());
    let source =
        UsageSource::Report { report: id, idempotency_key: &report.idempotency_key, metadata };
    let event =
        Event::UsageTracked { limit_type: report.limit_type, amount: report.amount, source };
    outbox::debited(tx, human, &event, balance, report.now).await
}
