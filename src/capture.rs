//! The Rust half of change capture. The triggers themselves are generated PL/pgSQL (see
//! `sql/capture.sql`): statement-level, with transition tables, recording only keys. What they cannot
//! do in SQL is wake the worker when, and only when, their transaction commits: NOTIFY would do it
//! but takes a global lock at commit that serialises every writer. Instead the trigger calls
//! `cde._changes_recorded()`, which sets a backend-local flag; a transaction callback sets the
//! worker's latch after commit, and forgets the flag on abort.

use crate::shmem;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

static CHANGES_IN_XACT: AtomicBool = AtomicBool::new(false);

#[pg_schema]
mod cde {
    use super::*;

    /// Mark the current transaction as having recorded changes. Costs a store; safe to call often.
    /// Returns true, so that a capture trigger can call it from its INSERT's RETURNING clause.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _changes_recorded() -> bool {
        CHANGES_IN_XACT.store(true, Ordering::Relaxed);
        true
    }
}

pub fn init() {
    unsafe { pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut()) };
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            if CHANGES_IN_XACT.swap(false, Ordering::Relaxed) {
                shmem::wake_worker();
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            CHANGES_IN_XACT.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}
