//! Reading back what was metered, a page at a time: the ledger's rows and
//! the sessions, oldest first.
//!
//! Pages are cut by row id. Ids are SQLite's rowids, each one more than the
//! largest before it, and one writer commits every transaction in turn, so
//! a row committed later always has a larger id than every row a reader
//! could already see; and no row of either table is ever deleted, so no id
//! is used twice. The rows after the last id a client saw are therefore
//! exactly the rows it has not seen, however many were written meanwhile.

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter};

use super::accounts;
use crate::limits::{LimitType, SessionKind};
use crate::store::{
    LedgerEntry, LedgerFilter, LedgerRow, Listing, Page, ProjectId, ReportRef, SessionFilter,
    SessionRow, SessionState, StoreError, StoreResult,
};

// `CROSS JOIN` keeps SQLite from starting at the project's humans: it
// reads the ledger (or the sessions) in id order from the cursor and stops
// once the page is full, instead of gathering every row of the project and
// sorting them for each page. A page of one human's rows is read through
// `ledger_by_pool` and sorted, which costs as many rows as the human has.
const LEDGER_SELECT: &str = "
    SELECT l.id, h.external_id, l.limit_type, l.entry, l.amount, l.created_at, l.updated_at,
           s.public_id, c.public_id, r.id, r.idempotency_key
    FROM ledger l
    CROSS JOIN humans h ON h.id = l.human_id
    LEFT JOIN sessions s ON s.id = l.session_id
    LEFT JOIN completions c ON c.id = l.completion_id
    LEFT JOIN usage_reports r ON r.id = l.report_id";

/// An open session's charge is the sum of its ledger rows so far; an ended
/// one's was written when it ended.
const SESSIONS_SELECT: &str = "
    SELECT s.public_id, h.external_id, s.kind, s.started_at, s.ended_at, s.end_reason,
           CASE WHEN s.ended_at IS NULL
                THEN (SELECT -COALESCE(SUM(g.amount), 0) FROM ledger g WHERE g.session_id = s.id)
                ELSE s.charged END
    FROM sessions s
    CROSS JOIN humans h ON h.id = s.human_id";

pub fn ledger(
    conn: &Connection,
    filter: LedgerFilter,
    page: Page<i64>,
) -> StoreResult<Listing<LedgerRow>> {
    let mut query = Query::new(filter.project, "l.id");
    query.bind("l.id > ?", page.after.unwrap_or(0));
    if let Some(name) = &filter.human {
        let Some(human) = accounts::find_human(conn, filter.project, name)? else {
            return Ok(Listing::empty());
        };
        query.bind("l.human_id = ?", human.id.0);
    }
    if let Some(limit_type) = filter.limit_type {
        query.bind("l.limit_type = ?", limit_type.as_str().to_owned());
    }
    query.run(conn, LEDGER_SELECT, page.limit, ledger_row)
}

pub fn sessions(
    conn: &Connection,
    filter: SessionFilter,
    page: Page<String>,
) -> StoreResult<Option<Listing<SessionRow>>> {
    let after = match &page.after {
        Some(public_id) => match session_key(conn, filter.project, public_id)? {
            Some(key) => key,
            None => return Ok(None),
        },
        None => 0,
    };
    let mut query = Query::new(filter.project, "s.id");
    query.bind("s.id > ?", after);
    if let Some(name) = &filter.human {
        let Some(human) = accounts::find_human(conn, filter.project, name)? else {
            return Ok(Some(Listing::empty()));
        };
        query.bind("s.human_id = ?", human.id.0);
    }
    match filter.state {
        Some(SessionState::Open) => query.and("s.ended_at IS NULL"),
        Some(SessionState::Ended) => query.and("s.ended_at IS NOT NULL"),
        None => {}
    }
    query.run(conn, SESSIONS_SELECT, page.limit, session_row).map(Some)
}

/// The key of the project's session with this public id.
fn session_key(conn: &Connection, project: ProjectId, public_id: &str) -> StoreResult<Option<i64>> {
    let mut stmt = conn.prepare_cached(
        "SELECT s.id FROM sessions s JOIN humans h ON h.id = s.human_id
         WHERE s.public_id = ?1 AND h.project_id = ?2",
    )?;
    Ok(stmt.query_row(params![public_id, project.0], |row| row.get(0)).optional()?)
}

/// The conditions of a listing and the values they take. A filter that is
/// not given is left out of the statement rather than written as
/// `(? IS NULL OR ...)`, which would keep SQLite from using an index.
struct Query {
    order_by: &'static str,
    conditions: Vec<&'static str>,
    values: Vec<Value>,
}

impl Query {
    /// The project's rows, in the order of `order_by`.
    fn new(project: ProjectId, order_by: &'static str) -> Query {
        let mut query = Query { order_by, conditions: Vec::new(), values: Vec::new() };
        query.bind("h.project_id = ?", project.0);
        query
    }

    fn and(&mut self, condition: &'static str) {
        self.conditions.push(condition);
    }

    /// Adds a condition with one placeholder, and its value.
    fn bind(&mut self, condition: &'static str, value: impl Into<Value>) {
        self.conditions.push(condition);
        self.values.push(value.into());
    }

    /// Reads one more row than the page holds, to tell whether there are
    /// more.
    fn run<T>(
        mut self,
        conn: &Connection,
        select: &str,
        limit: u32,
        to_row: fn(&Row) -> rusqlite::Result<StoreResult<T>>,
    ) -> StoreResult<Listing<T>> {
        let sql = format!(
            "{select} WHERE {} ORDER BY {} LIMIT ?",
            self.conditions.join(" AND "),
            self.order_by
        );
        self.values.push((i64::from(limit) + 1).into());
        let mut stmt = conn.prepare_cached(&sql)?;
        let mut rows = stmt
            .query_map(params_from_iter(self.values), to_row)?
            .map(|row| row?)
            .collect::<StoreResult<Vec<T>>>()?;
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Ok(Listing { rows, has_more })
    }
}

fn ledger_row(row: &Row) -> rusqlite::Result<StoreResult<LedgerRow>> {
    let (limit_type, entry): (String, String) = (row.get(2)?, row.get(3)?);
    let Some(limit_type) = LimitType::parse(&limit_type) else {
        return Ok(Err(unknown("limit type", &limit_type)));
    };
    let Some(entry) = LedgerEntry::parse(&entry) else {
        return Ok(Err(unknown("ledger entry", &entry)));
    };
    let report_id: Option<i64> = row.get(9)?;
    let report_key: Option<String> = row.get(10)?;
    Ok(Ok(LedgerRow {
        id: row.get(0)?,
        human: row.get(1)?,
        limit_type,
        entry,
        amount: row.get(4)?,
        created_at: row.get(5)?,
        updated_at: row.get(6)?,
        session: row.get(7)?,
        completion: row.get(8)?,
        report: report_id
            .zip(report_key)
            .map(|(id, idempotency_key)| ReportRef { id, idempotency_key }),
    }))
}

fn session_row(row: &Row) -> rusqlite::Result<StoreResult<SessionRow>> {
    let kind: String = row.get(2)?;
    let Some(kind) = SessionKind::parse(&kind) else {
        return Ok(Err(unknown("session kind", &kind)));
    };
    Ok(Ok(SessionRow {
        public_id: row.get(0)?,
        human: row.get(1)?,
        kind,
        started_at: row.get(3)?,
        ended_at: row.get(4)?,
        end_reason: row.get(5)?,
        charged: row.get(6)?,
    }))
}

fn unknown(what: &str, stored: &str) -> StoreError {
    StoreError::Other(format!("unknown {what} {stored:?} stored"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two projects' humans with three grants each, interleaved.
    fn ledger_of_two_projects() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(super::super::SCHEMA).unwrap();
        conn.execute_batch(
            "INSERT INTO projects VALUES (1, 'a', 0), (2, 'b', 0);
             INSERT INTO humans (id, project_id, external_id, created_at)
                 VALUES (1, 1, 'ada', 0), (2, 2, 'ada', 0);
             INSERT INTO ledger (human_id, limit_type, entry, amount, created_at, updated_at)
                 VALUES (1, 'token_cnt', 'grant', 1, 0, 0), (2, 'token_cnt', 'grant', 2, 0, 0),
                        (1, 'token_cnt', 'grant', 3, 0, 0), (2, 'token_cnt', 'grant', 4, 0, 0),
                        (1, 'token_cnt', 'grant', 5, 0, 0), (2, 'token_cnt', 'grant', 6, 0, 0);",
        )
        .unwrap();
        conn
    }

    fn ids(conn: &Connection, project: i64, after: Option<i64>, limit: u32) -> (Vec<i64>, bool) {
        let filter = LedgerFilter { project: ProjectId(project), human: None, limit_type: None };
        let listing = ledger(conn, filter, Page { after, limit }).unwrap();
        (listing.rows.iter().map(|row| row.id).collect(), listing.has_more)
    }

    #[test]
    fn a_page_holds_the_projects_rows_after_the_cursor_and_says_whether_more_follow() {
        let conn = ledger_of_two_projects();
        assert_eq!(ids(&conn, 1, None, 2), (vec![1, 3], true));
        assert_eq!(ids(&conn, 1, Some(3), 2), (vec![5], false));
        assert_eq!(ids(&conn, 1, Some(1), 2), (vec![3, 5], false));
        assert_eq!(ids(&conn, 2, Some(2), 1), (vec![4], true));
        assert_eq!(ids(&conn, 2, Some(6), 5), (vec![], false));
    }
}
