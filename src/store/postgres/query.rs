//! Running one statement: prepared once per connection (deadpool keeps the
//! prepared statements of each), then bound and run.

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::store::StoreResult;

/// The parameters of a statement, in the order of `$1`, `$2`, ...
pub type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// The statement's only row; an error if it returns none.
pub async fn one(db: &impl GenericClient, sql: &str, params: Params<'_>) -> StoreResult<Row> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.query_one(&statement, params).await?)
}

/// The statement's row, if it returns one.
pub async fn opt(
    db: &impl GenericClient,
    sql: &str,
    params: Params<'_>,
) -> StoreResult<Option<Row>> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.query_opt(&statement, params).await?)
}

/// Every row the statement returns.
pub async fn all(db: &impl GenericClient, sql: &str, params: Params<'_>) -> StoreResult<Vec<Row>> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.query(&statement, params).await?)
}

/// Runs the statement; returns how many rows it changed.
pub async fn run(db: &impl GenericClient, sql: &str, params: Params<'_>) -> StoreResult<u64> {
    let statement = db.prepare_cached(sql).await?;
    Ok(db.execute(&statement, params).await?)
}
