//! Collecting runs in SQL (`sql/collect.sql`): set-based, in the database, next to the data. This
//! is the thin Rust side that calls it.

use pgrx::prelude::*;

#[derive(Debug, Default)]
pub struct Collected {
    pub drained: i64,
    pub changed: i64,
    pub deleted: i64,
    pub failed: i64,
}

/// Take one slice of the feed's queue into the feed table, in the current transaction.
pub fn collect(feed: &str) -> Collected {
    Spi::connect_mut(|c| {
        let row = c.update("SELECT drained, changed, deleted, failed FROM cde._collect($1)", None, &[feed.into()])?.first();
        Ok::<_, pgrx::spi::SpiError>(Collected {
            drained: row.get::<i64>(1)?.unwrap_or(0),
            changed: row.get::<i64>(2)?.unwrap_or(0),
            deleted: row.get::<i64>(3)?.unwrap_or(0),
            failed: row.get::<i64>(4)?.unwrap_or(0),
        })
    })
    .unwrap_or_else(|e| error!("cde: collecting feed {feed} failed: {e}"))
}

/// Put the feed's due retries back in line; returns how many.
pub fn retry_due(feed: &str) -> i64 {
    Spi::get_one_with_args::<i64>("SELECT cde._retry_due($1)", &[feed.into()])
        .unwrap_or_else(|e| error!("cde: retrying feed {feed} failed: {e}"))
        .unwrap_or(0)
}
