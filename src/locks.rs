//! cde's advisory locks, in one place: their keys (all in the "cde\0" range), and the SQL
//! functions that hand them to sql/. Who takes each, in which mode, against what and why:
//! docs/architecture.md, "Locks".

use pgrx::prelude::*;

/// One iteration at a time: the worker's (session lock, for the iteration), `cde_sync_now()`'s
/// and each `CALL cde_deliver()` step's (transaction lock), DROP EXTENSION's.
pub const ITERATION: i64 = 0x6364_6500;
/// Full sync steps (shared) against DROP EXTENSION (exclusive).
pub const SYNC_STEP: i64 = 0x6364_6501;
/// Steps that change a run's state: one at a time.
pub const SYNC_STATE: i64 = 0x6364_6502;
/// A feed's full sync steps (shared), with the feed table's oid in the low 32 bits: a collect of
/// the feed asks whether one is writing ([`steps_running`]).
pub const FEED_STEP: i64 = 0x6364_6503;

#[pg_schema]
mod cde {
    use pgrx::prelude::*;

    /// [`super::ITERATION`].
    #[pg_extern(immutable, parallel_safe)]
    fn _iteration_lock() -> i64 {
        super::ITERATION
    }

    /// [`super::SYNC_STEP`].
    #[pg_extern(immutable, parallel_safe)]
    fn _sync_step_lock() -> i64 {
        super::SYNC_STEP
    }

    /// [`super::SYNC_STATE`].
    #[pg_extern(immutable, parallel_safe)]
    fn _sync_state_lock() -> i64 {
        super::SYNC_STATE
    }

    /// [`super::FEED_STEP`] of a feed table.
    #[pg_extern(immutable, parallel_safe, strict)]
    fn _feed_step_lock(feed_table: pg_sys::Oid) -> i64 {
        (super::FEED_STEP << 32) | i64::from(u32::from(feed_table))
    }

    /// Whether another session holds the advisory lock `key`, [`super::FEED_STEP`]'s: a full
    /// sync step of the feed may be writing, from a snapshot taken after it took the lock, and
    /// holds it until it commits.
    #[pg_extern(volatile, parallel_unsafe, strict)]
    fn _steps_running(key: i64) -> bool {
        super::steps_running(key)
    }
}

/// Take the lock `key` exclusively and let it go at once, if no other session holds it. A
/// session lock, so that it can be let go before the transaction ends; taken and let go in one
/// call, with nothing between the two that could raise an ERROR and leave it held (a session
/// lock outlives the transaction). Our own session's hold does not count: its writes are seen.
fn steps_running(key: i64) -> bool {
    unsafe extern "C-unwind" {
        fn pg_try_advisory_lock_int8(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
    }
    let taken = unsafe {
        pg_sys::DirectFunctionCall1Coll(Some(pg_try_advisory_lock_int8), pg_sys::InvalidOid, pg_sys::Datum::from(key))
    };
    if taken.value() != 0 {
        unlock_session(key);
    }
    taken.value() == 0
}

/// Let go of a session-level advisory lock `key`, with no SQL (no statement may be able to run).
fn unlock_session(key: i64) {
    unsafe extern "C-unwind" {
        fn pg_advisory_unlock_int8(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum;
    }
    unsafe {
        pg_sys::DirectFunctionCall1Coll(Some(pg_advisory_unlock_int8), pg_sys::InvalidOid, pg_sys::Datum::from(key));
    }
}

/// Keep DROP EXTENSION out until this transaction ends, as a full sync step does ([`SYNC_STEP`],
/// shared). For a sync builder's transactions between its steps (a post's check, what came of
/// it), which read and write cde's tables too: a DROP that took the lock before them, and then
/// some of those tables, would deadlock with them. Taken first, before any table.
pub fn keep_drop_out() {
    use pgrx::prelude::*;
    Spi::run_with_args("SELECT pg_catalog.pg_advisory_xact_lock_shared($1)", &[SYNC_STEP.into()]).unwrap_or_else(|e| error!("{e}"));
}

/// Take the iteration lock, for the transaction or (`session`) until released, telling this
/// database's worker that a session waits: it starts no new send pass and releases the lock once
/// the slices it has out came back, so the wait is bounded by the requests in flight (each by its
/// destination's timeout), however busy the database. The count is taken back however the wait
/// ends (granted, cancelled, an error).
pub fn take_iteration_lock(session: bool) {
    use pgrx::prelude::*;
    let slot = crate::shmem::worker();
    if let Some(w) = slot {
        w.lock_waiters.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        crate::shmem::wake_worker();
    }
    let q = if session { "SELECT pg_advisory_lock($1)" } else { "SELECT pg_advisory_xact_lock($1)" };
    PgTryBuilder::new(|| Spi::run_with_args(q, &[ITERATION.into()]).unwrap_or_else(|e| error!("{e}")))
        .finally(|| {
            if let Some(w) = slot {
                w.lock_waiters.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
            }
        })
        .execute();
}

/// Release the session-level iteration lock, with no SQL: it runs on the way out of an ERROR too,
/// when no statement can run, and a session lock would otherwise be kept until the session ends.
pub fn release_iteration_session_lock() {
    unlock_session(ITERATION);
}
