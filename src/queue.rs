//! Appending to `cde.queue`: the one thing a tracked write pays for.
//!
//! The capture trigger appends one row per feed per statement (more for a statement that changed
//! over `CHUNK_KEYS` keys). Through SQL that is an INSERT:
//! executor start-up, a projection, ModifyTable, then the heap and index inserts. On a
//! single-row UPDATE the executor part cost more than the inserts themselves, so the rows go in
//! directly: `heap_form_tuple`, then `CatalogTupleInsertWithInfo` (the heap insert and its index
//! entries; what PostgreSQL uses for its own catalogs, and TimescaleDB for its catalog tables).
//! The heap insert WAL-logs, toasts a large key array and counts statistics as any INSERT does.
//!
//! That path fills every column itself and skips what the executor would have done for a
//! table it does not know: triggers, row security, CHECK constraints, defaults of other
//! columns, expression, partial or exclusion indexes, deferred uniqueness. Each append checks that `cde.queue` is still the table `sql/schema.sql`
//! made (a few name and flag comparisons); if someone altered it, appends go through the
//! prepared INSERT instead, which honours whatever was added.
//!
//! It runs as the writer (`cde._capture` is not SECURITY DEFINER: switching user and pinning
//! search_path for every statement was an eighth of the capture's cost, docs/benchmarks.md) and
//! checks no right: opening a table, taking the identity's next value without its check
//! (`nextval_internal`, as the executor does for identity columns) and inserting heap and index
//! tuples look at no privilege and resolve no name. The INSERT of the fallback path does both,
//! so it runs as the queue's owner with a fixed search_path.

use crate::collect::CHUNK_KEYS;
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;
use std::cell::{Cell, OnceCell};
use std::ffi::CStr;

unsafe extern "C-unwind" {
    // commands/sequence.h, unchanged since PostgreSQL 10; not in pgrx's bindings. Called only
    // through `next_id`, which guards it (`#[pg_guard]` on a foreign block needs pgrx-pg-sys).
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

/// The sequence's next value without a check of the caller's rights, as the executor takes it
/// for an identity column; an ERROR in it becomes a Rust panic, as in any pg_sys call.
fn next_id(sequence: pg_sys::Oid) -> i64 {
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(sequence, false)) }
}

thread_local! {
    // The queue and its schema, by oid: found by name once, then checked on each open.
    static QUEUE: Cell<(pg_sys::Oid, pg_sys::Oid)> = const { Cell::new((pg_sys::Oid::INVALID, pg_sys::Oid::INVALID)) };
    // The queue's identity sequence, by the queue's oid: looking it up scans pg_depend.
    static SEQUENCE: Cell<(pg_sys::Oid, pg_sys::Oid)> = const { Cell::new((pg_sys::Oid::INVALID, pg_sys::Oid::INVALID)) };
    // The fallback, prepared once per backend: every name qualified, parameters typed.
    static INSERT: OnceCell<OwnedPreparedStatement> = const { OnceCell::new() };
}

/// The columns of `cde.queue`, in the order `values` holds them.
const COLUMNS: [(&str, pg_sys::Oid); 5] = [
    ("id", pg_sys::INT8OID),
    ("feed", pg_sys::TEXTOID),
    ("keys", pg_sys::TEXTARRAYOID),
    ("all_keys", pg_sys::BOOLOID),
    ("queued_at", pg_sys::TIMESTAMPTZOID),
];

/// Feeds and the keys to queue for each of them: `Some`, or every key of the feed (`None`, a
/// TRUNCATE). A statement's keys of one column serve all the feeds keyed by that column.
pub type Group<'a> = (Vec<&'a str>, Option<Vec<String>>);

/// Append each group's keys for each of its feeds, in rows of at most [`CHUNK_KEYS`] keys.
pub fn append(groups: &[Group]) {
    if !unsafe { append_direct(groups) } {
        for (feeds, keys) in rows(groups) {
            append_sql(feeds, keys);
        }
    }
}

/// The queue rows of the groups, for each: its feeds and a slice of at most [`CHUNK_KEYS`] keys,
/// or `None` for every key (a TRUNCATE: one row). No allocation: this runs on every write.
fn rows<'g>(groups: &'g [Group]) -> impl Iterator<Item = (&'g [&'g str], Option<&'g [String]>)> {
    groups.iter().flat_map(|(feeds, keys)| {
        let every = keys.is_none().then_some((feeds.as_slice(), None));
        keys.iter().flat_map(|k| k.chunks(CHUNK_KEYS)).map(move |slice| (feeds.as_slice(), Some(slice))).chain(every)
    })
}

/// The direct path; false (having written nothing) when `cde.queue` is not the table it knows.
unsafe fn append_direct(groups: &[Group]) -> bool {
    let rel = open_queue();
    let Some((attnums, sequence, indexes)) = plain_target(rel, (*rel).rd_id) else {
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        return false;
    };

    let queued_at = pg_sys::Datum::from(pg_sys::GetCurrentTransactionStartTimestamp());
    let desc = (*rel).rd_att;
    let natts = (*desc).natts as usize;
    for (feeds, keys) in rows(groups) {
        let keys = keys.map(|keys| {
            let mut elems: Vec<pg_sys::Datum> = keys.iter().map(|k| text(k)).collect();
            pg_sys::Datum::from(pg_sys::construct_array_builtin(elems.as_mut_ptr(), elems.len() as i32, pg_sys::TEXTOID))
        });
        // One id for the row of each feed: (feed, id) stays unique, and a statement pays for
        // one call of the sequence whatever the number of feeds.
        let id = next_id(sequence);
        for feed in feeds {
            let row: [Option<pg_sys::Datum>; 5] = [
                Some(pg_sys::Datum::from(id)),
                Some(text(feed)),
                keys,
                Some(pg_sys::Datum::from(keys.is_none())),
                Some(queued_at),
            ];
            // Dropped columns, if any, stay NULL.
            let mut values = vec![pg_sys::Datum::from(0); natts];
            let mut nulls = vec![true; natts];
            for (value, &attnum) in row.iter().zip(&attnums) {
                if let Some(v) = value {
                    values[attnum as usize - 1] = *v;
                    nulls[attnum as usize - 1] = false;
                }
            }
            let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::CatalogTupleInsertWithInfo(rel, tuple, indexes);
            pg_sys::heap_freetuple(tuple);
        }
    }
    pg_sys::CatalogCloseIndexes(indexes);
    // The lock stays to the end of the transaction, as an INSERT's would.
    pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    true
}

/// `cde.queue`, opened for insertion (RowExclusiveLock, as an INSERT takes). Its oid is kept
/// from the first lookup by name while the relation under it is still `queue` in schema `cde`
/// (the extension dropped and created again gives new oids).
unsafe fn open_queue() -> pg_sys::Relation {
    let (nsp, relid) = QUEUE.with(Cell::get);
    if relid != pg_sys::Oid::INVALID {
        let rel = pg_sys::try_relation_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        if !rel.is_null() {
            let class = &*(*rel).rd_rel;
            if class.relnamespace == nsp
                && class.relkind == pg_sys::RELKIND_RELATION as std::ffi::c_char
                && CStr::from_ptr(class.relname.data.as_ptr()).to_bytes() == b"queue"
            {
                return rel;
            }
            pg_sys::relation_close(rel, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        }
    }
    let nsp = pg_sys::get_namespace_oid(c"cde".as_ptr(), true);
    let relid = if nsp == pg_sys::Oid::INVALID { nsp } else { pg_sys::get_relname_relid(c"queue".as_ptr(), nsp) };
    if relid == pg_sys::Oid::INVALID {
        error!("cde: table cde.queue is missing; the extension is damaged (DROP and CREATE EXTENSION cde)");
    }
    QUEUE.with(|q| q.set((nsp, relid)));
    pg_sys::table_open(relid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE)
}

/// What the direct path needs of `rel`, if it is still the plain table sql/schema.sql made: the
/// attribute numbers of [`COLUMNS`], the identity's sequence, and its indexes, opened.
unsafe fn plain_target(
    rel: pg_sys::Relation,
    relid: pg_sys::Oid,
) -> Option<([pg_sys::AttrNumber; 5], pg_sys::Oid, pg_sys::CatalogIndexState)> {
    let attnums = plain_shape(rel)?;
    let sequence = identity_sequence(rel, relid, attnums[0])?;
    let indexes = pg_sys::CatalogOpenIndexes(rel);
    let (infos, rels) = match (*indexes).ri_NumIndices {
        n if n > 0 => (
            std::slice::from_raw_parts((*indexes).ri_IndexRelationInfo, n as usize),
            std::slice::from_raw_parts((*indexes).ri_IndexRelationDescs, n as usize),
        ),
        _ => (&[][..], &[][..]),
    };
    // What CatalogTupleInsertWithInfo cannot do: expressions, predicates, exclusion constraints,
    // deferred uniqueness.
    let plain_index = |(&info, &rel): (&*mut pg_sys::IndexInfo, &pg_sys::Relation)| {
        (*info).ii_Expressions.is_null()
            && (*info).ii_Predicate.is_null()
            && (*info).ii_ExclusionOps.is_null()
            && (*(*rel).rd_index).indimmediate
    };
    if !infos.iter().zip(rels).all(plain_index) {
        pg_sys::CatalogCloseIndexes(indexes);
        return None;
    }
    Some((attnums, sequence, indexes))
}

unsafe fn text(s: &str) -> pg_sys::Datum {
    pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(s.as_ptr().cast(), s.len() as i32))
}

/// The attribute numbers of [`COLUMNS`] if `rel` is still the plain table sql/schema.sql made:
/// those columns and no other, and nothing the executor would have to apply on insert.
unsafe fn plain_shape(rel: pg_sys::Relation) -> Option<[pg_sys::AttrNumber; 5]> {
    let class = &*(*rel).rd_rel;
    if class.relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char
        || class.relhastriggers
        || class.relhasrules
        || class.relrowsecurity
    {
        return None;
    }
    let desc = (*rel).rd_att;
    let constr = (*desc).constr;
    if !constr.is_null() && (*constr).num_check > 0 {
        return None;
    }
    let mut attnums = [0 as pg_sys::AttrNumber; 5];
    let mut found = 0;
    for a in crate::compat::tupdesc_attrs(desc).iter().filter(|a| !a.attisdropped) {
        let name = CStr::from_ptr(a.attname.data.as_ptr()).to_bytes();
        let i = COLUMNS.iter().position(|(n, t)| n.as_bytes() == name && *t == a.atttypid)?;
        attnums[i] = a.attnum;
        found += 1;
    }
    (found == COLUMNS.len()).then_some(attnums)
}

/// The sequence of the queue's identity column, if it still has one. Cached by the queue's oid
/// (looking it up scans pg_depend) until the queue's relcache entry is invalidated (an ALTER
/// TABLE of it, its identity dropped or made again: see [`init`]); a new queue (the extension
/// created again) has a new oid.
unsafe fn identity_sequence(rel: pg_sys::Relation, relid: pg_sys::Oid, attnum: pg_sys::AttrNumber) -> Option<pg_sys::Oid> {
    SEQUENCE.with(|cached| {
        let (cached_relid, seq) = cached.get();
        if cached_relid == relid {
            return Some(seq);
        }
        let seq = crate::compat::identity_sequence(rel, attnum);
        if seq == pg_sys::Oid::INVALID {
            return None;
        }
        cached.set((relid, seq));
        Some(seq)
    })
}

/// The INSERT the direct path stands for, as the queue's owner (see the module's comment).
fn append_sql(feeds: &[&str], keys: Option<&[String]>) {
    let owner = unsafe {
        let rel = open_queue();
        let owner = (*(*rel).rd_rel).relowner;
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        owner
    };
    crate::trust::as_role(owner, Some("pg_catalog, pg_temp"), || {
        Spi::connect_mut(|c| {
            INSERT.with(|cell| {
                if cell.get().is_none() {
                    let sql = "INSERT INTO cde.queue (feed, keys, all_keys) \
                               SELECT f, $2, $2 IS NULL FROM pg_catalog.unnest($1::pg_catalog.text[]) AS f";
                    let text_array = PgOid::BuiltIn(PgBuiltInOids::TEXTARRAYOID);
                    let _ = cell.set(c.prepare_mut(sql, &[text_array, text_array])?.keep());
                }
                let plan = cell.get().expect("prepared above");
                c.update(plan, None, &[feeds.to_vec().into(), keys.map(<[String]>::to_vec).into()]).map(|_| ())
            })
        })
    })
    .unwrap_or_else(|e| error!("cde: capture could not queue keys of feeds {feeds:?}: {e}"));
}

/// Forget the queue's oid and sequence when its relcache entry is invalidated (or all are), so
/// that the next append looks them up again rather than use a sequence since dropped.
pub fn init() {
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget_queue), pg_sys::Datum::from(0)) };
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_queue(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let (_, queue) = QUEUE.with(Cell::get);
    if relid == pg_sys::Oid::INVALID || relid == queue {
        QUEUE.with(|q| q.set((pg_sys::Oid::INVALID, pg_sys::Oid::INVALID)));
        SEQUENCE.with(|s| s.set((pg_sys::Oid::INVALID, pg_sys::Oid::INVALID)));
    }
}
