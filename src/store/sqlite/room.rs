//! The database's cap (`--max-db-mb`): SQLite's `max_page_count` on every
//! connection, and the check that refuses a write when the database is too
//! near the cap. Without the check a full database would fail only the
//! writes that happen to need a new page, and the meter's ticks, which
//! mostly rewrite rows in place, could go on for a minute before the first
//! of them failed. Without a cap, the default, there is no check, and a
//! full disk is noticed only by the writes that need new space.

use rusqlite::Connection;

use crate::store::{StoreError, StoreResult};

/// Pages kept free below the cap: a write that starts with fewer is
/// refused. A tick that records a few thousand sessions writes about this
/// many new pages; a write that needs more than is left fails with
/// SQLITE_FULL, which the store treats the same.
const RESERVE_PAGES: i64 = 64;

/// The cap, in pages.
#[derive(Clone, Copy, Debug)]
pub struct Cap {
    max_pages: i64,
}

impl Cap {
    /// Caps the database `conn` is open on at `max_bytes`. SQLite keeps a
    /// database already larger than that at its size; the check below
    /// refuses writes to it until pages are freed.
    pub fn apply(conn: &Connection, max_bytes: u64) -> rusqlite::Result<Cap> {
        let page_size: i64 = conn.pragma_query_value(None, "page_size", |row| row.get(0))?;
        let max_pages = (max_bytes as i64 / page_size).max(1);
        conn.pragma_update(None, "max_page_count", max_pages)?;
        Ok(Cap { max_pages })
    }

    /// Fails with [`StoreError::Full`] when fewer than [`RESERVE_PAGES`]
    /// pages can be written: free pages inside the file, and those the file
    /// may still grow by.
    pub fn check(&self, conn: &Connection) -> StoreResult<()> {
        let pages: i64 = conn.pragma_query_value(None, "page_count", |row| row.get(0))?;
        let free: i64 = conn.pragma_query_value(None, "freelist_count", |row| row.get(0))?;
        if self.max_pages - pages + free < RESERVE_PAGES {
            return Err(StoreError::Full);
        }
        Ok(())
    }
}

/// Checks `cap`, if there is one.
pub fn check(cap: Option<Cap>, conn: &Connection) -> StoreResult<()> {
    cap.map_or(Ok(()), |cap| cap.check(conn))
}
