//! Projects' webhooks and the outbox's deliveries on PostgreSQL: what the
//! dispatcher claims and records, and what the backend reads and changes
//! over the API. Several servers may share the outbox: an event handed to
//! one server's dispatcher is claimed by it for [`DELIVERY_LEASE`], as its
//! `next_attempt_at` put off by that much, so that only one server at a
//! time attempts it, and any server attempts it again once the lease runs
//! out without an outcome.

use deadpool_postgres::{Client, GenericClient};
use tokio_postgres::Row;

use super::query::{all, opt, run};
use crate::store::hooks::{parse_thresholds, thresholds_text};
use crate::store::{
    AttemptOutcome, DELIVERY_LEASE, Delivery, DeliveryStatus, DueEvent, ProjectId, StoreError,
    StoreResult, UnixMillis, Webhook, WebhookChange,
};

pub async fn set(client: &mut Client, change: WebhookChange) -> StoreResult<(Webhook, bool)> {
    let tx = client.transaction().await?;
    let events = change.events.as_ref().map(|events| serde_json::json!(events).to_string());
    let thresholds = thresholds_text(&change.thresholds);
    let created = run(
        &tx,
        "INSERT INTO webhooks (project_id, url, events, thresholds, secret, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $6)
         ON CONFLICT (project_id) DO NOTHING",
        &[&change.project.0, &change.url, &events, &thresholds, &change.secret, &change.now],
    )
    .await?
        == 1;
    if !created {
        run(
            &tx,
            "UPDATE webhooks SET url = $2, events = $3, thresholds = $4, updated_at = $5
             WHERE project_id = $1",
            &[&change.project.0, &change.url, &events, &thresholds, &change.now],
        )
        .await?;
    }
    let webhook = get(&tx, change.project)
        .await?
        .ok_or_else(|| StoreError::Other("a webhook vanished right after it was set".into()))?;
    tx.commit().await?;
    Ok((webhook, created))
}

pub async fn get(db: &impl GenericClient, project: ProjectId) -> StoreResult<Option<Webhook>> {
    let row = opt(
        db,
        "SELECT url, events, thresholds, previous_until, created_at, updated_at
         FROM webhooks WHERE project_id = $1",
        &[&project.0],
    )
    .await?;
    Ok(row.map(|row| {
        let events: Option<&str> = row.get(1);
        Webhook {
            url: row.get(0),
            events: events.and_then(|text| serde_json::from_str(text).ok()),
            thresholds: parse_thresholds(row.get(2)),
            previous_secret_until: row.get(3),
            created_at: row.get(4),
            updated_at: row.get(5),
        }
    }))
}

pub async fn delete(client: &mut Client, project: ProjectId) -> StoreResult<bool> {
    let tx = client.transaction().await?;
    let sql = "DELETE FROM webhooks WHERE project_id = $1";
    let deleted = run(&tx, sql, &[&project.0]).await? == 1;
    // Events claimed by an attempt in flight are failed too; the outcome of
    // that attempt then finds them failed and is not recorded.
    run(
        &tx,
        "UPDATE webhook_events SET status = 'failed', next_attempt_at = NULL,
             last_error = 'the webhook was removed', delivered_at = NULL
         WHERE project_id = $1 AND status = 'pending'",
        &[&project.0],
    )
    .await?;
    tx.commit().await?;
    Ok(deleted)
}

pub async fn rotate(
    db: &impl GenericClient,
    project: ProjectId,
    secret: &str,
    previous_until: UnixMillis,
    now: UnixMillis,
) -> StoreResult<bool> {
    let rotated = run(
        db,
        "UPDATE webhooks SET previous_secret = secret, previous_until = $3, secret = $2,
             updated_at = $4
         WHERE project_id = $1",
        &[&project.0, &secret, &previous_until, &now],
    )
    .await?;
    Ok(rotated == 1)
}

/// [`DELIVERY_LEASE`] as the store's times count.
const LEASE_MILLIS: i64 = DELIVERY_LEASE.as_millis() as i64;

/// The due events the dispatcher is handed, claimed for it in one
/// statement (see [`crate::store::Store::due_events`]).
///
/// The oldest few of each project, so that one project's backlog never
/// keeps another's events out of the batch: as many as the project has
/// room for beside its events this server is attempting (`busy`, which are
/// left out, though claimed and so not due anyway). Every row returned is claimed, so none is
/// taken that would then wait for a free slot. Each project's rows are
/// locked with `SKIP LOCKED` as they are picked, so that a server claiming
/// at the same moment passes over them to the next ones rather than
/// waiting, and only the rows claimed are locked.
const CLAIM_DUE: &str = "
    WITH due_projects AS (
        SELECT DISTINCT project_id FROM webhook_events
        WHERE status = 'pending' AND next_attempt_at <= $1
    ),
    rooms AS (
        SELECT p.project_id, $3 - COUNT(b.id) AS room
        FROM due_projects p
        LEFT JOIN webhook_events b ON b.project_id = p.project_id AND b.id = ANY($4)
        GROUP BY p.project_id
    ),
    chosen AS (
        SELECT d.id, d.next_attempt_at AS was_due
        FROM rooms r
        CROSS JOIN LATERAL (
            SELECT id, next_attempt_at FROM webhook_events
            WHERE project_id = r.project_id AND status = 'pending' AND next_attempt_at <= $1
              AND id <> ALL($4)
            ORDER BY next_attempt_at, id
            LIMIT GREATEST(r.room, 0)
            FOR UPDATE SKIP LOCKED
        ) d
        ORDER BY d.next_attempt_at, d.id
        LIMIT $2
    ),
    claimed AS (
        UPDATE webhook_events e SET next_attempt_at = $5
        FROM chosen c WHERE e.id = c.id
        RETURNING e.id, e.public_id, e.project_id, e.body, e.attempts, e.created_at, c.was_due
    )
    SELECT c.id, c.public_id, c.project_id, c.body, c.attempts, c.created_at,
           w.url, w.secret, w.previous_secret, w.previous_until
    FROM claimed c
    LEFT JOIN webhooks w ON w.project_id = c.project_id
    ORDER BY c.was_due, c.id";

pub async fn due(
    db: &impl GenericClient,
    now: UnixMillis,
    busy: &[i64],
    per_project: u32,
    limit: u32,
) -> StoreResult<Vec<DueEvent>> {
    let leased_until = now + LEASE_MILLIS;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&now, &i64::from(limit), &i64::from(per_project), &busy, &leased_until];
    let rows = all(db, CLAIM_DUE, &params).await?;
    Ok(rows.iter().map(|row| due_event(row, now)).collect())
}

fn due_event(row: &Row, now: UnixMillis) -> DueEvent {
    let mut secrets: Vec<String> = row.get::<_, Option<String>>(7).into_iter().collect();
    let previous: Option<String> = row.get(8);
    let until: Option<i64> = row.get(9);
    if let (Some(previous), Some(until)) = (previous, until)
        && until > now
    {
        secrets.push(previous);
    }
    DueEvent {
        seq: row.get(0),
        id: row.get(1),
        project: ProjectId(row.get(2)),
        body: row.get(3),
        attempts: row.get(4),
        created_at: row.get(5),
        url: row.get(6),
        secrets,
    }
}

/// Records an outcome while the event is still pending. Nothing tells this
/// attempt's claim from a later one, so an outcome that comes after the
/// lease ran out is written all the same: see
/// [`crate::store::Store::record_attempt`] for what that does.
pub async fn record_attempt(
    db: &impl GenericClient,
    seq: i64,
    outcome: AttemptOutcome,
    now: UnixMillis,
) -> StoreResult<()> {
    match outcome {
        AttemptOutcome::Delivered => {
            run(
                db,
                "UPDATE webhook_events SET status = 'delivered', attempts = attempts + 1,
                     delivered_at = $2, next_attempt_at = NULL, last_error = NULL
                 WHERE id = $1 AND status = 'pending'",
                &[&seq, &now],
            )
            .await?
        }
        AttemptOutcome::Failed { error, retry_at } => {
            run(
                db,
                "UPDATE webhook_events SET attempts = attempts + 1, last_error = $2,
                     next_attempt_at = $3,
                     status = CASE WHEN $3::BIGINT IS NULL THEN 'failed' ELSE 'pending' END
                 WHERE id = $1 AND status = 'pending'",
                &[&seq, &error, &retry_at],
            )
            .await?
        }
    };
    Ok(())
}

const DELIVERY_COLUMNS: &str = "id, public_id, type, status, attempts, last_error, created_at,
                                next_attempt_at, delivered_at";

pub async fn list(
    db: &impl GenericClient,
    project: ProjectId,
    status: Option<DeliveryStatus>,
    after: Option<i64>,
    limit: u32,
) -> StoreResult<Vec<Delivery>> {
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_events
         WHERE project_id = $1 AND ($2::TEXT IS NULL OR status = $2) AND id > $3
         ORDER BY id LIMIT $4"
    );
    let status = status.map(DeliveryStatus::as_str);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
        [&project.0, &status, &after.unwrap_or(0), &i64::from(limit)];
    let rows = all(db, &sql, &params).await?;
    rows.iter().map(delivery).collect()
}

fn delivery(row: &Row) -> StoreResult<Delivery> {
    let status: &str = row.get(3);
    let Some(status) = DeliveryStatus::parse(status) else {
        return Err(StoreError::Other(format!("unknown delivery status {status:?} stored")));
    };
    Ok(Delivery {
        seq: row.get(0),
        id: row.get(1),
        kind: row.get(2),
        status,
        attempts: row.get(4),
        last_error: row.get(5),
        created_at: row.get(6),
        next_attempt_at: row.get(7),
        delivered_at: row.get(8),
    })
}

pub async fn retry(
    db: &impl GenericClient,
    project: ProjectId,
    id: &str,
    now: UnixMillis,
) -> StoreResult<Option<Delivery>> {
    // A pending event due within a lease from now may be claimed, with an
    // attempt in flight: it is left to that attempt, and is due soon if not.
    run(
        db,
        "UPDATE webhook_events SET status = 'pending', next_attempt_at = $3
         WHERE project_id = $1 AND public_id = $2
           AND (status = 'failed' OR (status = 'pending' AND next_attempt_at > $4))",
        &[&project.0, &id, &now, &(now + LEASE_MILLIS)],
    )
    .await?;
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_events WHERE project_id = $1 AND public_id = $2"
    );
    let row = opt(db, &sql, &[&project.0, &id]).await?;
    row.as_ref().map(delivery).transpose()
}
