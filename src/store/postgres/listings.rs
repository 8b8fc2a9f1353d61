//! Reading back what was metered on PostgreSQL, a page at a time: the
//! ledger's rows and the sessions, oldest first, cut by row id.
//!
//! Ids come from identity sequences, which hand them out when a row is
//! written, not when its transaction commits. Two transactions running at
//! once can therefore commit their rows out of id order, and a client that
//! read a page between the two commits never sees the row with the smaller
//! id: a page after a cursor is exact only for rows committed before the
//! cursor's row was read. SQLite has one writer and no such gap. Nothing
//! closes it yet; a listing waiting a moment behind the newest rows would.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use super::accounts;
use super::query::{all, opt};
use crate::limits::SessionKind;
use crate::store::{
    LedgerEntry, LedgerFilter, LedgerRow, Listing, Page, ProjectId, ReportRef, SessionFilter,
    SessionRow, SessionState, StoreError, StoreResult,
};

const LEDGER_SELECT: &str = "
    SELECT l.id, h.external_id, l.limit_type, l.entry, l.amount, l.created_at, l.updated_at,
           s.public_id, c.public_id, r.id, r.idempotency_key
    FROM ledger l
    JOIN humans h ON h.id = l.human_id
    LEFT JOIN sessions s ON s.id = l.session_id
    LEFT JOIN completions c ON c.id = l.completion_id
    LEFT JOIN usage_reports r ON r.id = l.report_id";

/// An open session's charge is the sum of its ledger rows so far; an ended
/// one's was written when it ended.
const SESSIONS_SELECT: &str = "
    SELECT s.public_id, h.external_id, s.kind, s.started_at, s.ended_at, s.end_reason,
           CASE WHEN s.ended_at IS NULL
                THEN (SELECT -COALESCE(SUM(g.amount), 0)::BIGINT
                      FROM ledger g WHERE g.session_id = s.id)
                ELSE s.charged END
    FROM sessions s
    JOIN humans h ON h.id = s.human_id";

pub async fn ledger(
    db: &impl GenericClient,
    filter: LedgerFilter,
    page: Page<i64>,
) -> StoreResult<Listing<LedgerRow>> {
    let mut query = Query::new(filter.project, "l.id");
    query.bind("l.id >", page.after.unwrap_or(0));
    if let Some(name) = &filter.human {
        let Some(human) = accounts::find_human(db, filter.project, name).await? else {
            return Ok(Listing::empty());
        };
        query.bind("l.human_id =", human.id.0);
    }
    if let Some(limit_type) = filter.limit_type {
        query.bind("l.limit_type =", limit_type.as_str().to_owned());
    }
    query.run(db, LEDGER_SELECT, page.limit, ledger_row).await
}

pub async fn sessions(
    db: &impl GenericClient,
    filter: SessionFilter,
    page: Page<String>,
) -> StoreResult<Option<Listing<SessionRow>>> {
    let after = match &page.after {
        Some(public_id) => match session_key(db, filter.project, public_id).await? {
            Some(key) => key,
            None => return Ok(None),
        },
        None => 0,
    };
    let mut query = Query::new(filter.project, "s.id");
    query.bind("s.id >", after);
    if let Some(name) = &filter.human {
        let Some(human) = accounts::find_human(db, filter.project, name).await? else {
            return Ok(Some(Listing::empty()));
        };
        query.bind("s.human_id =", human.id.0);
    }
    match filter.state {
        Some(SessionState::Open) => query.and("s.ended_at IS NULL"),
        Some(SessionState::Ended) => query.and("s.ended_at IS NOT NULL"),
        None => {}
    }
    query.run(db, SESSIONS_SELECT, page.limit, session_row).await.map(Some)
}

/// The key of the project's session with this public id.
async fn session_key(
    db: &impl GenericClient,
    project: ProjectId,
    public_id: &str,
) -> StoreResult<Option<i64>> {
    let sql = "SELECT s.id FROM sessions s JOIN humans h ON h.id = s.human_id
               WHERE s.public_id = $1 AND h.project_id = $2";
    Ok(opt(db, sql, &[&public_id, &project.0]).await?.map(|row| row.get(0)))
}

/// The conditions of a listing and the values they take. A filter that is
/// not given is left out of the statement.
struct Query {
    order_by: &'static str,
    conditions: Vec<String>,
    values: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Query {
    /// The project's rows, in the order of `order_by`.
    fn new(project: ProjectId, order_by: &'static str) -> Query {
        let mut query = Query { order_by, conditions: Vec::new(), values: Vec::new() };
        query.bind("h.project_id =", project.0);
        query
    }

    fn and(&mut self, condition: &'static str) {
        self.conditions.push(condition.to_owned());
    }

    /// Adds a condition that compares with the next placeholder, and its
    /// value.
    fn bind(&mut self, compare: &'static str, value: impl ToSql + Sync + Send + 'static) {
        self.values.push(Box::new(value));
        self.conditions.push(format!("{compare} ${}", self.values.len()));
    }

    /// Reads one more row than the page holds, to tell whether there are
    /// more.
    async fn run<T>(
        mut self,
        db: &impl GenericClient,
        select: &str,
        limit: u32,
        to_row: fn(&Row) -> StoreResult<T>,
    ) -> StoreResult<Listing<T>> {
        self.values.push(Box::new(i64::from(limit) + 1));
        let sql = format!(
            "{select} WHERE {} ORDER BY {} LIMIT ${}",
            self.conditions.join(" AND "),
            self.order_by,
            self.values.len()
        );
        let params: Vec<&(dyn ToSql + Sync)> =
            self.values.iter().map(|value| value.as_ref() as &(dyn ToSql + Sync)).collect();
        let found = all(db, &sql, &params).await?;
        let mut rows = found.iter().map(to_row).collect::<StoreResult<Vec<T>>>()?;
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok(Listing { rows, has_more })
    }
}

fn ledger_row(row: &Row) -> StoreResult<LedgerRow> {
    let entry: &str = row.get(3);
    let entry = LedgerEntry::parse(entry).ok_or_else(|| unknown("ledger entry", entry))?;
    let report_id: Option<i64> = row.get(9);
    let report_key: Option<String> = row.get(10);
    Ok(LedgerRow {
        id: row.get(0),
        human: row.get(1),
        limit_type: accounts::limit_type(row.get(2))?,
        entry,
        amount: row.get(4),
        created_at: row.get(5),
        updated_at: row.get(6),
        session: row.get(7),
        completion: row.get(8),
        report: report_id
            .zip(report_key)
            .map(|(id, idempotency_key)| ReportRef { id, idempotency_key }),
    })
}

fn session_row(row: &Row) -> StoreResult<SessionRow> {
    let kind: &str = row.get(2);
    let kind = SessionKind::parse(kind).ok_or_else(|| unknown("session kind", kind))?;
    Ok(SessionRow {
        public_id: row.get(0),
        human: row.get(1),
        kind,
        started_at: row.get(3),
        ended_at: row.get(4),
        end_reason: row.get(5),
        charged: row.get(6),
    })
}

fn unknown(what: &str, stored: &str) -> StoreError {
    StoreError::Other(format!("unknown {what} {stored:?} stored"))
}
