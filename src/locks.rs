//! cde's advisory locks, in one place: their keys (all in the "cde\0" range), and the SQL
//! functions that hand them to sql/. Who takes each, in which mode, against what and why:
//! docs/architecture.md, "Locks".

use pgrx::prelude::*;

/// One iteration at a time: the worker's (session lock, for the iteration), `cde_sync_now()`'s
/// and each `CALL cde_deliver()` step's (transaction lock), DROP EXTENSION's.
pub const ITERATION: i64 = 0x6364_6500;
/// Full sync steps (shared) against collects and DROP EXTENSION (exclusive).
pub const SYNC_STEP: i64 = 0x6364_6501;
/// Steps that change a run's state: one at a time.
pub const SYNC_STATE: i64 = 0x6364_6502;

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
}
