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

    /// The keys `cde._unseen` met since the last call (NULL: none), forgotten once returned.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _unseen_keys() -> Option<Vec<String>> {
        let keys = std::mem::take(&mut *super::UNSEEN.lock().unwrap_or_else(|e| e.into_inner()));
        (!keys.is_empty()).then_some(keys)
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

/// Keys whose row `cde._unseen` found written by a transaction the statement could not see: the
/// rebuild that met them queues them again (`cde._unseen_keys`). One backend's, one statement's.
static UNSEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// `cde._unseen(xmin xid, key text)`: whether the feed-table row version a rebuild is about to
/// overwrite was written by a transaction that the rebuilding statement's snapshot does not see.
///
/// A rebuild builds its documents from its statement's snapshot (`cde._source` runs the source
/// query in it), and a full sync step and a collect may rebuild the same key at once. Whichever
/// writes second would put the older document over the newer one if it wrote regardless; it
/// leaves the row as it is instead, and the key is queued again (`cde._unseen_keys`), so that a
/// collect rebuilds it from a snapshot that sees both. Called in the `WHERE` of the rebuild's
/// upserts and updates, where the row is the newest committed version, locked.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn cde_unseen(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        if !pg_sys::ActiveSnapshotSet() {
            error!("cde._unseen: called with no active snapshot (it belongs in a rebuild's statement)");
        }
        let xmin = pg_sys::TransactionId::from_inner(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0).value() as u32);
        // Our own writes (and bootstrap versions) are seen; otherwise the snapshot says, for a
        // writer that began before the next xid to be assigned. A row's xmin is the xid it was
        // written with, kept when it is frozen: untouched for 2^31 transactions or more, it reads
        // as a future xid, which the snapshot would call unseen, every time (the key queued again
        // for ever, its row never rewritten). Asked last: the snapshot says seen for nearly all.
        let unseen = pg_sys::TransactionIdIsNormal(xmin)
            && !pg_sys::TransactionIdIsCurrentTransactionId(xmin)
            && pg_sys::XidInMVCCSnapshot(xmin, pg_sys::GetActiveSnapshot())
            && pg_sys::TransactionIdPrecedes(xmin, next_xid());
        if unseen {
            let key = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 1).unwrap_or_default().to_string();
            UNSEEN.lock().unwrap_or_else(|e| e.into_inner()).push(key);
        }
        pg_sys::Datum::from(unseen)
    }
}

/// The next xid to be assigned, 32 bits of it.
fn next_xid() -> pg_sys::TransactionId {
    let full = unsafe { pg_sys::ReadNextFullTransactionId() };
    pg_sys::TransactionId::from_inner(full.value as u32)
}

#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_cde_unseen() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
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
