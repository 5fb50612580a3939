//! The Rust half of change capture (the SQL half, which installs the triggers, is
//! `sql/capture.sql`).
//!
//! `cde._capture()` is the statement-level trigger, with transition tables, for every feed whose
//! keys are a column of the changed row: the common case (`cde_track(feed, table)` or
//! `cde_track(feed, table, 'product_id')`). Its arguments are pairs (feed, column). Once per
//! statement it reads that column from the transition tables, turns the values into text and
//! appends one row per feed to `cde.queue` (`src/queue.rs`, without the executor). That is what
//! a generated PL/pgSQL function did before, without its interpreter, its SQL over the
//! transition tables and its `SET search_path`. Feeds whose keys are an expression or a query
//! over `changed` take `cde._capture_keys()`, below.
//!
//! Waking the worker: NOTIFY would do it but takes a global lock at commit that serialises every
//! writer. Instead a capture sets a backend-local flag; a transaction callback sets the worker's
//! latch after commit, and forgets the flag on abort.

use crate::{queue, shmem};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;
use std::sync::atomic::{AtomicBool, Ordering};

static CHANGES_IN_XACT: AtomicBool = AtomicBool::new(false);

#[pg_schema]
mod cde {
    use super::*;

    /// Mark the current transaction as having recorded changes. Costs a store; safe to call often.
    /// Returns true, so that a generated capture trigger can call it from its INSERT's RETURNING.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _changes_recorded() -> bool {
        CHANGES_IN_XACT.store(true, Ordering::Relaxed);
        true
    }

    /// The capture trigger for column keys (see the module's comment). It runs as the writer,
    /// which needs no right on cde.queue: the direct append checks none (src/queue.rs).
    #[pg_trigger]
    fn _capture<'a>(
        trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
        let args = trigger.extra_args()?;
        let td = trigger.trigger_data();
        if args.len() % 2 != 0 {
            error!("cde._capture: arguments come in (feed, column) pairs");
        }
        let pairs: Vec<(&str, &str)> = args.chunks(2).map(|p| (p[0].as_str(), p[1].as_str())).collect();
        let groups: Vec<queue::Group> = if td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK == pg_sys::TRIGGER_EVENT_TRUNCATE {
            // Every key of these feeds may have changed.
            vec![(pairs.iter().map(|p| p.0).collect(), None)]
        } else {
            // Feeds keyed by the same column share one read of the transition tables and one
            // key array (usually there is one column: every feed tracking the table by its key).
            let mut columns: Vec<&str> = pairs.iter().map(|p| p.1).collect();
            columns.sort_unstable();
            columns.dedup();
            columns
                .into_iter()
                .map(|column| {
                    (pairs.iter().filter(|p| p.1 == column).map(|p| p.0).collect(), Some(unsafe { changed_keys(td, column) }))
                })
                .filter(|(_, keys)| keys.as_ref().is_some_and(|k| !k.is_empty()))
                .collect()
        };
        if !groups.is_empty() {
            queue::append(&groups);
        }
        CHANGES_IN_XACT.store(true, Ordering::Relaxed);
        Ok(None)
    }

    /// The capture trigger for feeds whose keys are an expression over the changed row or a
    /// query over `changed`; its arguments name those feeds. SECURITY DEFINER (sql/capture.sql),
    /// with a fixed search_path. The keys' SQL was written by the role that owns the feed: it
    /// runs as that role ([`crate::trust::as_role`]), with the feed's search_path, over the
    /// statement's transition tables; the keys are queued as the extension's owner.
    #[pg_trigger]
    fn _capture_keys<'a>(
        trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
        let feeds: Vec<String> = trigger.extra_args()?;
        let td = trigger.trigger_data();
        let sources: Vec<&str> = match td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => vec!["new_rows"],
            pg_sys::TRIGGER_EVENT_UPDATE => vec!["old_rows", "new_rows"],
            _ => vec!["old_rows"],
        };
        let relid = unsafe { (*td.tg_relation).rd_id };
        queue_tracked_keys(
            Some(td),
            "SELECT DISTINCT ON (t.feed, t.keys) t.feed, format('SELECT array_agg(DISTINCT k) FROM (%s) AS c(k) WHERE k IS NOT NULL',
                                              cde._keys_query(f, t.keys, $2)),
                    f.owner::oid, f.search_path
               FROM cde.tracks t JOIN cde.feeds f ON f.name = t.feed
              WHERE t.source_table = ANY (cde._ancestry($1)) AND t.feed = ANY ($3)
              ORDER BY t.feed, t.keys",
            &[relid.into(), sources.into(), feeds.into()],
            &[],
        );
        Ok(None)
    }

    /// The capture trigger for writes applied by logical replication: row level, enabled for
    /// replica sessions only (sql/capture.sql), since the apply worker fires row triggers and no
    /// statement trigger. Its arguments name the feeds whose tracks ask for replicated writes.
    /// A row's keys come from the same SQL as a statement's (`cde._keys_query`), over a relation
    /// `cde_row` holding its images (the old and the new one of an update), run as the feed's
    /// owner with the feed's search_path; SECURITY DEFINER (sql/capture.sql) to queue them.
    #[pg_trigger]
    fn _capture_row<'a>(
        trigger: &'a pgrx::PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, pgrx::AllocatedByPostgres>>, pgrx::PgTriggerError> {
        let feeds: Vec<String> = trigger.extra_args()?;
        let td = trigger.trigger_data();
        let (relid, reltype, images) = unsafe {
            let rel = td.tg_relation;
            let tuples = match td.tg_event & pg_sys::TRIGGER_EVENT_OPMASK {
                pg_sys::TRIGGER_EVENT_UPDATE => vec![td.tg_trigtuple, td.tg_newtuple],
                _ => vec![td.tg_trigtuple],
            };
            let images: Vec<pg_sys::Datum> =
                tuples.into_iter().filter(|t| !t.is_null()).map(|t| pg_sys::heap_copy_tuple_as_datum(t, (*rel).rd_att)).collect();
            ((*rel).rd_id, (*(*rel).rd_rel).reltype, images)
        };
        let rows = (1..=images.len()).map(|i| format!("SELECT (${i}).*")).collect::<Vec<_>>().join(" UNION ALL ");
        let args: Vec<pgrx::datum::DatumWithOid> =
            images.iter().map(|d| unsafe { pgrx::datum::DatumWithOid::new(*d, reltype) }).collect();
        queue_tracked_keys(
            None,
            "SELECT DISTINCT ON (t.feed, t.keys) t.feed,
                    format('WITH cde_row AS (%s) SELECT array_agg(DISTINCT k) FROM (%s) AS c(k) WHERE k IS NOT NULL',
                           $3, cde._keys_query(f, t.keys, '{cde_row}')),
                    f.owner::oid, f.search_path
               FROM cde.tracks t JOIN cde.feeds f ON f.name = t.feed
              WHERE t.source_table = ANY (cde._ancestry($1)) AND t.feed = ANY ($2) AND t.replicated
              ORDER BY t.feed, t.keys",
            &[relid.into(), feeds.into(), rows.as_str().into()],
            &args,
        );
        Ok(None)
    }
}

/// Queue the keys that tracks give: `plans` selects, per track, its feed, the query of its keys
/// (cde._keys_query), the feed's owner and search_path; each query runs as that owner with
/// `args`, over the statement's transition tables when `td` is given.
fn queue_tracked_keys(
    td: Option<&pg_sys::TriggerData>,
    plans: &str,
    plan_args: &[pgrx::datum::DatumWithOid],
    args: &[pgrx::datum::DatumWithOid],
) {
    let queued: Vec<(String, Vec<String>)> = Spi::connect(|c| {
        if let Some(td) = td {
            // The transition tables, by the names of the trigger's REFERENCING clause.
            unsafe { pg_sys::SPI_register_trigger_data(td as *const _ as *mut _) };
        }
        let mut found = Vec::new();
        for r in c.select(plans, None, plan_args)? {
            found.push((
                r.get::<String>(1)?.unwrap_or_default(),
                r.get::<String>(2)?.unwrap_or_default(),
                r.get::<pg_sys::Oid>(3)?.unwrap_or(pg_sys::Oid::INVALID),
                r.get::<String>(4)?.unwrap_or_default(),
            ));
        }
        let mut out = Vec::new();
        for (feed, query, owner, path) in found {
            let keys = crate::trust::as_role(owner, Some(&path), || c.select(&query, Some(1), args)?.first().get::<Vec<String>>(1))?;
            if let Some(keys) = keys.filter(|k| !k.is_empty()) {
                out.push((feed, keys));
            }
        }
        Ok::<_, pgrx::spi::SpiError>(out)
    })
    .unwrap_or_else(|e| error!("cde: capture: {e}"));
    let groups: Vec<queue::Group> = queued.iter().map(|(feed, keys)| (vec![feed.as_str()], Some(keys.clone()))).collect();
    if !groups.is_empty() {
        queue::append(&groups);
    }
    CHANGES_IN_XACT.store(true, Ordering::Relaxed);
}

/// The text of `column` in the statement's changed rows: the new images, then the old ones that
/// differ from the new image at the same position (an UPDATE stores its old and new images in
/// step, so an unchanged key is not queued twice; were they ever not in step, a key would only
/// be queued twice, which the collector absorbs). NULLs are skipped.
unsafe fn changed_keys(td: &pg_sys::TriggerData, column: &str) -> Vec<String> {
    let desc = (*td.tg_relation).rd_att;
    let attrs = crate::compat::tupdesc_attrs(desc);
    let Some(idx) =
        attrs.iter().position(|a| !a.attisdropped && CStr::from_ptr(a.attname.data.as_ptr()).to_bytes() == column.as_bytes())
    else {
        error!("cde: capture: column {column} of {} is gone; cde_track the table again", name_of(td))
    };
    let mut out_fn = pg_sys::Oid::INVALID;
    let mut varlena = false;
    pg_sys::getTypeOutputInfo(attrs[idx].atttypid, &mut out_fn, &mut varlena);
    let mut flinfo = pg_sys::FmgrInfo::default();
    pg_sys::fmgr_info(out_fn, &mut flinfo);

    let mut read = |store: *mut pg_sys::Tuplestorestate, each: &mut dyn FnMut(usize, String)| {
        if store.is_null() {
            return;
        }
        // A read pointer of our own, as a scan of a transition table in SQL takes one: other
        // triggers of the statement read the same tuplestore.
        let ptr = pg_sys::tuplestore_alloc_read_pointer(store, pg_sys::EXEC_FLAG_REWIND as i32);
        pg_sys::tuplestore_select_read_pointer(store, ptr);
        pg_sys::tuplestore_rescan(store);
        let slot = pg_sys::MakeSingleTupleTableSlot(desc, &pg_sys::TTSOpsMinimalTuple);
        let mut i = 0;
        while pg_sys::tuplestore_gettupleslot(store, true, false, slot) {
            let mut isnull = false;
            let d = pg_sys::slot_getattr(slot, idx as i32 + 1, &mut isnull);
            if !isnull {
                let c = pg_sys::OutputFunctionCall(&mut flinfo, d);
                each(i, CStr::from_ptr(c).to_string_lossy().into_owned());
                pg_sys::pfree(c.cast());
            }
            i += 1;
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
    };

    let mut new_keys: Vec<Option<String>> = Vec::new();
    read(td.tg_newtable, &mut |i, k| {
        new_keys.resize(i, None);
        new_keys.push(Some(k));
    });
    let mut keys: Vec<String> = Vec::with_capacity(new_keys.len());
    let mut old_keys = Vec::new();
    read(td.tg_oldtable, &mut |i, k| {
        if new_keys.get(i).and_then(|n| n.as_deref()) != Some(k.as_str()) {
            old_keys.push(k);
        }
    });
    keys.extend(new_keys.into_iter().flatten());
    keys.extend(old_keys);
    keys
}

unsafe fn name_of(td: &pg_sys::TriggerData) -> String {
    CStr::from_ptr((*(*td.tg_relation).rd_rel).relname.data.as_ptr()).to_string_lossy().into_owned()
}

/// cde was installed in this transaction: at commit, ask the launcher for a worker.
static SERVE_AT_COMMIT: AtomicBool = AtomicBool::new(false);

pub fn serve_at_commit() {
    SERVE_AT_COMMIT.store(true, Ordering::Relaxed);
}

pub fn init() {
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            if CHANGES_IN_XACT.swap(false, Ordering::Relaxed) {
                shmem::changes_committed();
            }
            if SERVE_AT_COMMIT.swap(false, Ordering::Relaxed) {
                shmem::request_worker();
            }
            crate::trust::forget_tickets();
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            CHANGES_IN_XACT.store(false, Ordering::Relaxed);
            SERVE_AT_COMMIT.store(false, Ordering::Relaxed);
            crate::trust::forget_tickets();
        }
        pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            // COMMIT PREPARED runs elsewhere and posts nothing: a reload serves such a database.
            SERVE_AT_COMMIT.store(false, Ordering::Relaxed);
            crate::trust::forget_tickets()
        }
        _ => {}
    }
}
