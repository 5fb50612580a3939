//! Collecting runs in SQL (`sql/collect.sql`): set-based, in the database, next to the data. This
//! is the thin Rust side that calls it, and the document hash the rebuild functions store.

use pgrx::prelude::*;

/// How many keys one rebuild statement takes (collect and full sync alike): large enough to
/// amortise planning, small enough that memory and transactions stay small. A queue row holds
/// at most this many keys (src/queue.rs, cde._enqueue), so that a bulk write's million keys are
/// collected a slice at a time, with deliveries in between, not in one long transaction.
pub const CHUNK_KEYS: usize = 5000;

#[pg_schema]
mod cde {
    use pgrx::prelude::*;

    /// [`super::CHUNK_KEYS`], for the SQL side.
    #[pg_extern(immutable, parallel_safe)]
    fn _chunk_size() -> i32 {
        super::CHUNK_KEYS as i32
    }

    /// The hash of a document, over its binary form (see cde_protocol::document_hash): no text is
    /// rendered, unlike md5(doc::text), which a full sync paid for on every document
    /// (docs/benchmarks.md, "Decisions and their measurements").
    /// Takes anyelement only to receive the jsonb datum as it is; anything else is refused.
    #[pg_extern(immutable, parallel_safe, strict)]
    fn _doc_hash(doc: pgrx::AnyElement) -> String {
        if doc.oid() != pg_sys::JSONBOID {
            error!("cde._doc_hash: expected a jsonb document, got type oid {}", doc.oid().to_u32());
        }
        unsafe {
            let raw = pg_sys::pg_detoast_datum_packed(doc.datum().cast_mut_ptr());
            let bytes = std::slice::from_raw_parts(pgrx::vardata_any(raw).cast::<u8>(), pgrx::varsize_any_exhdr(raw));
            cde_protocol::document_hash(bytes)
        }
    }
}

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

/// Whether any of `feeds` has changes queued, not yet collected.
pub fn queued(feeds: &[String]) -> bool {
    Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT FROM cde.queue WHERE feed = ANY ($1))", &[feeds.to_vec().into()])
        .unwrap_or_else(|e| error!("cde: reading the queue failed: {e}"))
        .unwrap_or(false)
}

/// Put the feed's due retries back in line; returns how many.
pub fn retry_due(feed: &str) -> i64 {
    Spi::get_one_with_args::<i64>("SELECT cde._retry_due($1)", &[feed.into()])
        .unwrap_or_else(|e| error!("cde: retrying feed {feed} failed: {e}"))
        .unwrap_or(0)
}
