//! The runs of the servers sharing the database (`instances` in
//! schema.postgres.sql): a run joining, the check that keeps a run another
//! has closed out from recording anything, the heartbeat each meter commit
//! writes, and the close-out of runs that have gone silent.
//!
//! Liveness is read on the database's clock, never a server's own, so that
//! servers whose clocks disagree still agree on who is silent. The usage a
//! closed-out run's sessions are charged up to is its meter's own clock
//! (`alive_at`), the one their charges were reckoned on.

use std::time::Duration;

use deadpool_postgres::{Client, GenericClient};

use super::query::{all, one, opt, run};
use super::{completions, usage};
use crate::store::{StoreError, StoreResult, UnixMillis};

/// The database's clock in Unix milliseconds, as SQL. `clock_timestamp()`,
/// not `now()`, which stands still for a whole transaction.
const DB_NOW: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// A run is closed out once it has been silent for this many of its own
/// ticks while the run closing it out was up.
const SILENT_TICKS: i64 = 3;

/// This server's run on the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: i64,
    pub tick_millis: i64,
}

/// Records a new run, with a random id, metering every `tick`.
pub async fn join(
    db: &impl GenericClient,
    tick: Duration,
    now: UnixMillis,
) -> StoreResult<Instance> {
    let instance = Instance {
        id: rand::random(),
        tick_millis: i64::try_from(tick.as_millis()).unwrap_or(i64::MAX).max(1),
    };
    let sql = format!(
        "INSERT INTO instances (id, started_at, tick_millis, alive_at, seen_at, up_since)
         VALUES ($1, $2, $3, 0, {DB_NOW}, {DB_NOW})"
    );
    run(db, &sql, &[&instance.id, &now, &instance.tick_millis]).await?;
    Ok(instance)
}

/// Fails with [`StoreError::Superseded`] if the run has ended, closed out
/// by another as lost; otherwise holds a share of its row's lock until the
/// transaction ends, so that a close-out that would miss what the
/// transaction adds (a session, a completion) waits for it, or rather
/// skips the run for now (see [`close_out_lost`]). A store with no run (a
/// command of the command line) is not checked.
pub async fn check_live(db: &impl GenericClient, instance: Option<Instance>) -> StoreResult<()> {
    let Some(instance) = instance else {
        return Ok(());
    };
    let sql = "SELECT ended_at IS NULL FROM instances WHERE id = $1 FOR KEY SHARE";
    match opt(db, sql, &[&instance.id]).await? {
        Some(row) if row.get::<_, bool>(0) => Ok(()),
        _ => Err(StoreError::Superseded),
    }
}

/// The id of the run's last usage batch, its row locked until the
/// transaction ends, before any pool (the meter's batches are the only
/// writers that lock it this way); fails with [`StoreError::Superseded`]
/// if the run has ended. A first attempt of the batch whose connection
/// this side has given up on may still be running on the server: it is
/// waited for, and its id read once it has committed or rolled back,
/// rather than both attempts applying the batch. A close-out skips a run
/// whose batch is in progress.
pub async fn last_batch(db: &impl GenericClient, instance: Instance) -> StoreResult<Option<i64>> {
    let sql = "SELECT last_batch, ended_at IS NULL FROM instances
               WHERE id = $1 FOR NO KEY UPDATE";
    match opt(db, sql, &[&instance.id]).await? {
        Some(row) if row.get::<_, bool>(1) => Ok(row.get(0)),
        _ => Err(StoreError::Superseded),
    }
}

/// The run's heartbeat, the last statement of each of its usage batches:
/// its meter's clock set to `now`, the database's clock read, and the
/// batch's id recorded. A run silent for a tick and a half or more is up
/// again only from now (`up_since`): a healthy run commits every tick,
/// and one silent longer may have been cut off with the others, whom it
/// must then not close out as silent (see [`close_out_lost`]).
pub async fn beat(
    db: &impl GenericClient,
    instance: Instance,
    batch: Option<i64>,
    now: UnixMillis,
) -> StoreResult<()> {
    let sql = format!(
        "UPDATE instances SET
             alive_at = GREATEST(alive_at, $2),
             up_since = CASE WHEN 2 * ({DB_NOW} - seen_at) >= 3 * tick_millis THEN {DB_NOW}
                             ELSE up_since END,
             seen_at = {DB_NOW},
             last_batch = COALESCE($3, last_batch)
         WHERE id = $1"
    );
    run(db, &sql, &[&instance.id, &now, &batch]).await?;
    Ok(())
}

/// Whether any run but `instance` has not ended: one that is up, or one
/// gone silent and not yet closed out, whose sessions still count.
pub async fn others_live(db: &impl GenericClient, instance: Instance) -> StoreResult<bool> {
    let sql = "SELECT EXISTS (SELECT 1 FROM instances WHERE ended_at IS NULL AND id <> $1)";
    Ok(one(db, sql, &[&instance.id]).await?.get(0))
}

/// Records that the run stopped cleanly, every session's usage recorded.
/// The row is locked first, against admissions too (see [`check_live`]),
/// so that none still in flight records a session under the ended run; a
/// session that slipped in all the same would be closed out as a lost
/// run's is.
pub async fn leave(client: &mut Client, instance: Instance) -> StoreResult<()> {
    let tx = client.transaction().await?;
    run(&tx, "SELECT 1 FROM instances WHERE id = $1 FOR UPDATE", &[&instance.id]).await?;
    let sql = format!("UPDATE instances SET ended_at = {DB_NOW} WHERE id = $1");
    run(&tx, &sql, &[&instance.id]).await?;
    tx.commit().await?;
    Ok(())
}

/// How many of a run's sessions one close-out transaction ends, and how
/// many completions one step of it ends (each in a transaction of its
/// own). The pools of the sessions stay locked until the transaction
/// commits, and the meters of the servers charging them wait meanwhile: a
/// close-out of thousands in one transaction held them past their
/// statement timeout.
const CLOSE_OUT_CHUNK: i64 = 100;

/// One step of closing out what runs gone silent left: marks lost every
/// other run silent for [`SILENT_TICKS`] of its ticks while `instance` was
/// up, so that it records nothing more should it come back; ends up to
/// [`CLOSE_OUT_CHUNK`] open sessions of one ended run (`instance_lost`,
/// charged up to its meter's last clock) and as many of the completions
/// ended runs left running (charged their prompts); and removes the rows of
/// runs ended a week ago. Nothing is marked while `instance` itself is not
/// up (its last commit a tick and a half old or more): an outage of the
/// database silences every run alike. What `instance` left open is never
/// ended here, though another may have closed it out: a run closed out
/// records nothing more, and the others end its sessions. A run whose row
/// is locked (a batch of its own, an admission) is alive, and skipped.
/// Returns the sessions and completions ended: the caller repeats the step
/// while it ends any.
pub async fn close_out_lost(
    client: &mut Client,
    instance: Instance,
    now: UnixMillis,
) -> StoreResult<(u64, u64)> {
    let tx = client.transaction().await?;
    mark_lost(&tx, instance).await?;
    tx.commit().await?;
    let tx = client.transaction().await?;
    let sessions = usage::close_out_chunk(&tx, instance.id, CLOSE_OUT_CHUNK).await?;
    tx.commit().await?;
    let mut completions = 0;
    while completions < CLOSE_OUT_CHUNK as u64 {
        let tx = client.transaction().await?;
        let ended = completions::close_out_one(&tx, instance.id, now).await?;
        tx.commit().await?;
        if !ended {
            break;
        }
        completions += 1;
    }
    Ok((sessions, completions))
}

/// Marks lost, in `tx`, the runs found silent (see [`close_out_lost`]).
async fn mark_lost(tx: &impl GenericClient, instance: Instance) -> StoreResult<()> {
    let sql = format!(
        "SELECT o.id FROM instances o, instances me
         WHERE me.id = $1 AND me.ended_at IS NULL
           AND 2 * ({DB_NOW} - me.seen_at) < 3 * me.tick_millis
           AND o.id <> me.id AND o.ended_at IS NULL
           AND {DB_NOW} - GREATEST(o.seen_at, me.up_since) > $2 * o.tick_millis
         FOR UPDATE OF o SKIP LOCKED"
    );
    for row in all(tx, &sql, &[&instance.id, &SILENT_TICKS]).await? {
        let id: i64 = row.get(0);
        let sql = format!("UPDATE instances SET ended_at = {DB_NOW}, lost = TRUE WHERE id = $1");
        run(tx, &sql, &[&id]).await?;
        tracing::warn!(instance = id, "a server sharing the database went silent; closing it out");
    }
    let sql = format!("DELETE FROM instances WHERE ended_at < {DB_NOW} - $1");
    run(tx, &sql, &[&KEEP_ENDED_MILLIS]).await?;
    Ok(())
}

/// How long the row of a run that has ended is kept, for an operator
/// looking into what happened: every start adds one.
const KEEP_ENDED_MILLIS: i64 = 7 * 24 * 3600 * 1000;
