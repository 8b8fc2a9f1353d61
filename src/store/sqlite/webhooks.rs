//! Projects' webhooks and the outbox's deliveries: what the dispatcher
//! reads and records, and what the backend reads and changes over the API.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::Writer;
use crate::store::hooks::{parse_thresholds, thresholds_text};
use crate::store::{
    AttemptOutcome, Delivery, DeliveryStatus, DueEvent, ProjectId, StoreError, StoreResult,
    UnixMillis, Webhook, WebhookChange,
};

pub fn set(writer: &mut Writer, change: WebhookChange) -> StoreResult<(Webhook, bool)> {
    let tx = super::write_transaction(&mut writer.conn)?;
    let events = change.events.as_ref().map(|events| serde_json::json!(events).to_string());
    let thresholds = thresholds_text(&change.thresholds);
    let created = tx.execute(
        "INSERT INTO webhooks (project_id, url, events, thresholds, secret, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT (project_id) DO NOTHING",
        params![change.project.0, change.url, events, thresholds, change.secret, change.now],
    )? == 1;
    if !created {
        tx.execute(
            "UPDATE webhooks SET url = ?2, events = ?3, thresholds = ?4, updated_at = ?5
             WHERE project_id = ?1",
            params![change.project.0, change.url, events, thresholds, change.now],
        )?;
    }
    let webhook = get(&tx, change.project)?
        .ok_or_else(|| StoreError::Other("a webhook vanished right after it was set".into()))?;
    tx.commit()?;
    writer.hooks.reload(&writer.conn, change.project)?;
    Ok((webhook, created))
}

pub fn get(conn: &Connection, project: ProjectId) -> StoreResult<Option<Webhook>> {
    let mut stmt = conn.prepare_cached(
        "SELECT url, events, thresholds, previous_until, created_at, updated_at
         FROM webhooks WHERE project_id = ?1",
    )?;
    let found = stmt
        .query_row([project.0], |row| {
            let events: Option<String> = row.get(1)?;
            let thresholds: Option<String> = row.get(2)?;
            Ok(Webhook {
                url: row.get(0)?,
                events: events.and_then(|text| serde_json::from_str(&text).ok()),
                thresholds: parse_thresholds(thresholds.as_deref()),
                previous_secret_until: row.get(3)?,
                created_at: row.get(4)?,
                updated_at: row.get(5)?,
            })
        })
        .optional()?;
    Ok(found)
}

pub fn delete(writer: &mut Writer, project: ProjectId) -> StoreResult<bool> {
    let tx = super::write_transaction(&mut writer.conn)?;
    let deleted = tx.execute("DELETE FROM webhooks WHERE project_id = ?1", [project.0])? == 1;
    tx.execute(
        "UPDATE webhook_events SET status = 'failed', next_attempt_at = NULL,
             last_error = 'the webhook was removed', delivered_at = NULL
         WHERE project_id = ?1 AND status = 'pending'",
        [project.0],
    )?;
    tx.commit()?;
    writer.hooks.reload(&writer.conn, project)?;
    Ok(deleted)
}

pub fn rotate(
    conn: &mut Connection,
    project: ProjectId,
    secret: String,
    previous_until: UnixMillis,
    now: UnixMillis,
) -> StoreResult<bool> {
    let rotated = conn.execute(
        "UPDATE webhooks SET previous_secret = secret, previous_until = ?3, secret = ?2,
             updated_at = ?4
         WHERE project_id = ?1",
        params![project.0, secret, previous_until, now],
    )?;
    Ok(rotated == 1)
}

pub fn due(
    conn: &Connection,
    now: UnixMillis,
    busy: &[i64],
    per_project: u32,
    limit: u32,
) -> StoreResult<Vec<DueEvent>> {
    // The oldest few of each project, so that one project's backlog never
    // keeps another's events out of the batch. The events being attempted
    // are still pending, so each project gets room for them and as many
    // again.
    let mut stmt = conn.prepare_cached(
        "SELECT e.id, e.public_id, e.project_id, e.body, e.attempts, e.created_at,
                w.url, w.secret, w.previous_secret, w.previous_until
         FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY project_id
                                             ORDER BY next_attempt_at, id) AS place
               FROM webhook_events
               WHERE status = 'pending' AND next_attempt_at <= ?1) r
         JOIN webhook_events e ON e.id = r.id
         LEFT JOIN webhooks w ON w.project_id = e.project_id
         WHERE r.place <= ?3
         ORDER BY e.next_attempt_at, e.id LIMIT ?2",
    )?;
    let per_project = 2 * per_project;
    let rows = stmt.query_map(params![now, limit + busy.len() as u32, per_project], |row| {
        let mut secrets: Vec<String> = row.get::<_, Option<String>>(7)?.into_iter().collect();
        let previous: Option<String> = row.get(8)?;
        let until: Option<i64> = row.get(9)?;
        if let (Some(previous), Some(until)) = (previous, until)
            && until > now
        {
            secrets.push(previous);
        }
        Ok(DueEvent {
            seq: row.get(0)?,
            id: row.get(1)?,
            project: ProjectId(row.get(2)?),
            body: row.get(3)?,
            attempts: row.get(4)?,
            created_at: row.get(5)?,
            url: row.get(6)?,
            secrets,
        })
    })?;
    let mut due = Vec::new();
    for row in rows {
        let event = row?;
        if !busy.contains(&event.seq) && due.len() < limit as usize {
            due.push(event);
        }
    }
    Ok(due)
}

pub fn record_attempt(
    conn: &Connection,
    seq: i64,
    outcome: AttemptOutcome,
    now: UnixMillis,
) -> StoreResult<()> {
    match outcome {
        AttemptOutcome::Delivered => conn.execute(
            "UPDATE webhook_events SET status = 'delivered', attempts = attempts + 1,
                 delivered_at = ?2, next_attempt_at = NULL, last_error = NULL
             WHERE id = ?1 AND status = 'pending'",
            params![seq, now],
        )?,
        AttemptOutcome::Failed { error, retry_at } => conn.execute(
            "UPDATE webhook_events SET attempts = attempts + 1, last_error = ?2,
                 next_attempt_at = ?3,
                 status = CASE WHEN ?3 IS NULL THEN 'failed' ELSE 'pending' END
             WHERE id = ?1 AND status = 'pending'",
            params![seq, error, retry_at],
        )?,
    };
    Ok(())
}

pub fn list(
    conn: &Connection,
    project: ProjectId,
    status: Option<DeliveryStatus>,
    after: Option<i64>,
    limit: u32,
) -> StoreResult<Vec<Delivery>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, public_id, type, status, attempts, last_error, created_at, next_attempt_at,
                delivered_at
         FROM webhook_events
         WHERE project_id = ?1 AND (?2 IS NULL OR status = ?2) AND id > ?3
         ORDER BY id LIMIT ?4",
    )?;
    let rows = stmt.query_map(
        params![project.0, status.map(DeliveryStatus::as_str), after.unwrap_or(0), limit],
        delivery,
    )?;
    rows.map(|row| row.map_err(StoreError::from).and_then(|delivery| delivery)).collect()
}

fn delivery(row: &Row) -> rusqlite::Result<StoreResult<Delivery>> {
    let status: String = row.get(3)?;
    let Some(status) = DeliveryStatus::parse(&status) else {
        return Ok(Err(StoreError::Other(format!("unknown delivery status {status:?} stored"))));
    };
    Ok(Ok(Delivery {
        seq: row.get(0)?,
        id: row.get(1)?,
        kind: row.get(2)?,
        status,
        attempts: row.get(4)?,
        last_error: row.get(5)?,
        created_at: row.get(6)?,
        next_attempt_at: row.get(7)?,
        delivered_at: row.get(8)?,
    }))
}

pub fn retry(
    conn: &Connection,
    project: ProjectId,
    id: &str,
    now: UnixMillis,
) -> StoreResult<Option<Delivery>> {
    conn.execute(
        "UPDATE webhook_events SET status = 'pending', next_attempt_at = ?3
         WHERE project_id = ?1 AND public_id = ?2 AND status != 'delivered'",
        params![project.0, id, now],
    )?;
    let mut stmt = conn.prepare_cached(
        "SELECT id, public_id, type, status, attempts, last_error, created_at, next_attempt_at,
                delivered_at
         FROM webhook_events WHERE project_id = ?1 AND public_id = ?2",
    )?;
    stmt.query_row(params![project.0, id], delivery).optional()?.transpose()
}
