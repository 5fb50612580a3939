//! The launcher: one process per cluster, connected to no database, that starts a worker for
//! every database where cde is installed (TimescaleDB's launcher is the model).
//!
//! It reads pg_database (a shared catalog) every `RESCAN` and whenever its latch is set: by a
//! commit that installed cde (`shmem::request_worker`), by a statement releasing its hold on a
//! database (databases.rs), or by the postmaster when one of its workers ends. A database it has
//! not seen yet gets a worker, which looks for the extension and, not finding it, ends at once
//! saying so (`EXIT_NOT_INSTALLED`): from then on that database costs nothing until cde is
//! installed there. Templates, databases that allow no connections and those `cde.database` does
//! not name get no worker at all. Workers are dynamic background workers the postmaster never
//! restarts by itself: the launcher decides, from why the last one ended.

use crate::gucs;
use crate::shmem::{self, Shared};
use pgrx::bgworkers::*;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How often pg_database is read when nothing woke the launcher (a database created from a
/// template that has cde is found this way).
const RESCAN: Duration = Duration::from_secs(5);

/// How often a worker that found no background worker slot is tried again.
const SLOT_RETRY: Duration = Duration::from_millis(250);

/// How long a new launcher waits for a worker its predecessor registered to start.
const ADOPT_GRACE: Duration = Duration::from_secs(10);

/// How long after a worker ended on an error or a signal the next one starts.
const RESTART_DELAY: Duration = Duration::from_secs(2);

pub fn register() {
    BackgroundWorkerBuilder::new("cde launcher")
        .set_type("cde launcher")
        .set_function("cde_launcher_main")
        .set_library("cde")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(2)))
        .load();
}

struct Database {
    oid: u32,
    name: String,
    /// Not a template, allows connections, not left invalid by an interrupted DROP DATABASE.
    connectable: bool,
}

/// What the launcher knows of one database it serves (or looked at).
struct Entry {
    name: String,
    slot: Option<usize>,
    handle: Option<DynamicBackgroundWorker>,
    /// Its worker found no cde there: nothing starts until cde is installed.
    not_installed: bool,
    /// cde was installed there since its worker started (which may have looked before that).
    requested: bool,
    not_before: Instant,
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn cde_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    let shared = shmem::shared().expect("the cde launcher runs only when cde is preloaded");
    shared.launcher_pid.store(unsafe { pg_sys::MyProcPid }, Ordering::Relaxed);
    shared.launcher_latch.store(unsafe { pg_sys::MyLatch } as u64, Ordering::Release);
    unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(0usize)) };
    log!("cde: launcher started");
    let mut entries = adopt(shared);
    loop {
        if BackgroundWorker::sighup_received() {
            unsafe {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            }
            // A reload also looks again at every database found without cde (one installed by a
            // transaction that was prepared, say, whose COMMIT PREPARED posts no request).
            entries.values_mut().for_each(|e| e.not_installed = false);
        }
        match crate::worker::guarded(|| BackgroundWorker::transaction(databases)) {
            Ok(dbs) => pass(shared, &mut entries, &dbs),
            Err(e) => warning!("cde: CDE-301 the launcher could not read pg_database, tried again: {e}"),
        }
        // Until the next rescan, or the next restart due.
        let now = Instant::now();
        let mut next = entries.values().map(|e| e.not_before).filter(|t| *t > now).min().map_or(RESCAN, |t| (t - now).min(RESCAN));
        if shmem::workers_wait_for_slots() {
            next = next.min(SLOT_RETRY); // builders give theirs up after their step
        }
        if !BackgroundWorker::wait_latch(Some(next)) {
            break;
        }
    }
    // The workers go on: they are the postmaster's, and a new launcher adopts them.
    log!("cde: launcher stopped");
    crate::compat::proc_exit(1)
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, _arg: pg_sys::Datum) {
    if let Some(s) = shmem::shared() {
        s.launcher_latch.store(0, Ordering::Release);
        s.launcher_pid.store(0, Ordering::Relaxed);
    }
}

/// A launcher that starts again (terminated, or after an error) finds the workers of the last
/// one still running: it takes over their slots instead of starting second workers.
fn adopt(shared: &Shared) -> HashMap<u32, Entry> {
    let mut entries = HashMap::new();
    for (i, slot) in shared.slots.iter().enumerate() {
        let db = slot.database.load(Ordering::Acquire);
        if db != 0 {
            // A worker the last launcher registered may not have started yet (no pid): give it
            // time to show up before starting another in its place.
            let not_before = Instant::now() + if slot.pid.load(Ordering::Acquire) == 0 { ADOPT_GRACE } else { Duration::ZERO };
            let entry = Entry { name: String::new(), slot: Some(i), handle: None, not_installed: false, requested: false, not_before };
            entries.insert(db, entry);
        }
    }
    entries
}

/// pg_database, read without a database connection (it is a shared catalog).
fn databases() -> Vec<Database> {
    let mut out = Vec::new();
    unsafe {
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, lock);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let d = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            out.push(Database {
                oid: d.oid.to_u32(),
                name: CStr::from_ptr(d.datname.data.as_ptr()).to_string_lossy().into_owned(),
                // -2: DATCONNLIMIT_INVALID_DB, what an interrupted DROP DATABASE leaves.
                connectable: d.datallowconn && !d.datistemplate && d.datconnlimit != -2,
            });
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, lock);
    }
    out
}

/// Is the entry's worker starting or running?
fn running(entry: &Entry, shared: &Shared) -> bool {
    match &entry.handle {
        Some(h) => matches!(h.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)),
        // Adopted from the last launcher: its pid, until its exit clears it.
        None => entry.slot.is_some_and(|i| shmem::alive(shared.slots[i].pid.load(Ordering::Acquire))),
    }
}

/// One look at every database: start the workers that should run, stop those that should not,
/// free the slots of those that ended for good.
fn pass(shared: &Shared, entries: &mut HashMap<u32, Entry>, dbs: &[Database]) {
    match shmem::take_requests(shared) {
        Some(requested) => {
            for db in requested {
                if let Some(e) = entries.get_mut(&db) {
                    e.not_installed = false;
                    e.requested = true;
                }
            }
        }
        None => entries.values_mut().for_each(|e| {
            e.not_installed = false;
            e.requested = true;
        }),
    }
    let only = gucs::databases();
    let served = |d: &Database| d.connectable && only.as_ref().is_none_or(|names| names.iter().any(|n| *n == d.name));

    // Databases gone, or no longer to be served: stop their workers, and forget them once ended.
    entries.retain(|oid, e| {
        let keep = dbs.iter().any(|d| d.oid == *oid && served(d));
        if keep {
            return true;
        }
        if running(e, shared) {
            terminate(e, shared);
            return true; // its end sets our latch; the slot is freed then
        }
        free(e, shared);
        false
    });

    let mut waiting = 0;
    for d in dbs.iter().filter(|d| served(d)) {
        let e = entries.entry(d.oid).or_insert_with(|| Entry {
            name: d.name.clone(),
            slot: None,
            handle: None,
            not_installed: false,
            requested: false,
            not_before: Instant::now(),
        });
        e.name.clone_from(&d.name);
        if running(e, shared) {
            continue;
        }
        e.handle = None;
        if let Some(i) = e.slot {
            let slot = &shared.slots[i];
            let state = slot.state.load(Ordering::Relaxed);
            if state != shmem::WAITING_FOR_SLOT && state != shmem::STARTING {
                match slot.exit.swap(shmem::EXIT_RESTART, Ordering::AcqRel) {
                    // Installed again since that worker looked (DROP then CREATE EXTENSION): look again.
                    shmem::EXIT_NOT_INSTALLED if e.requested => {}
                    shmem::EXIT_NOT_INSTALLED => {
                        e.not_installed = true;
                        free(e, shared);
                    }
                    shmem::EXIT_HELD | shmem::EXIT_RELOAD => {}
                    _ => e.not_before = Instant::now() + RESTART_DELAY,
                }
                if e.slot.is_some() {
                    slot.state.store(shmem::STARTING, Ordering::Relaxed);
                }
            }
        }
        if e.not_installed || Instant::now() < e.not_before || shmem::held(d.oid) {
            continue;
        }
        if !start(shared, d, e) {
            waiting += 1;
        }
    }
    let before = shared.waiting_for_slot.swap(waiting, Ordering::AcqRel);
    if waiting > 0 && before == 0 {
        warning!(
            "cde: {waiting} database(s) wait for a background worker slot: raise max_worker_processes (docs/operations.md, \"Several databases\"); sync builders give theirs up meanwhile"
        );
    }
}

/// Start the worker of database `d` in its slot (taking one if it has none); false when there is
/// no slot to be had.
fn start(shared: &Shared, d: &Database, e: &mut Entry) -> bool {
    let slot = match e.slot {
        Some(i) => i,
        None => {
            let Some(i) = shared.slots.iter().position(|s| s.database.compare_exchange(0, d.oid, Ordering::AcqRel, Ordering::Relaxed).is_ok()) else {
                warning!("cde: database {} is not served: cde serves at most {} databases per cluster", d.name, shmem::MAX_DATABASES);
                return true; // not a background worker slot: nothing to give up for it
            };
            let slot = &shared.slots[i];
            for counter in [&slot.iterations, &slot.docs_sent, &slot.bytes_sent, &slot.requests, &slot.requests_failed, &slot.reloads,
                            &slot.builders_docs_sent, &slot.builders_bytes_sent, &slot.builders_requests, &slot.builders_requests_failed] {
                counter.store(0, Ordering::Relaxed);
            }
            slot.started_at.store(0, Ordering::Relaxed);
            slot.last_iteration_at.store(0, Ordering::Relaxed);
            e.slot = Some(i);
            i
        }
    };
    let launched = BackgroundWorkerBuilder::new(&format!("cde worker for database {}", d.name))
        .set_type("cde worker")
        .set_function("cde_worker_main")
        .set_library("cde")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        .set_argument(Some(pg_sys::Datum::from(slot)))
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic();
    let state = &shared.slots[slot].state;
    match launched {
        Ok(h) => {
            state.store(shmem::STARTING, Ordering::Relaxed);
            e.handle = Some(h);
            e.requested = false;
            true
        }
        Err(_) => {
            if state.swap(shmem::WAITING_FOR_SLOT, Ordering::Relaxed) != shmem::WAITING_FOR_SLOT {
                warning!("cde: no background worker slot for the worker of database {} (max_worker_processes); tried again", d.name);
            }
            false
        }
    }
}

fn terminate(e: &mut Entry, shared: &Shared) {
    match e.handle.take() {
        Some(h) => drop(h.terminate()),
        None => {
            if let Some(i) = e.slot {
                let pid = shared.slots[i].pid.load(Ordering::Acquire);
                if shmem::alive(pid) {
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
        }
    }
    log!("cde: database {} is no longer served; its worker stops", e.name);
}

fn free(e: &mut Entry, shared: &Shared) {
    if let Some(i) = e.slot.take() {
        let slot = &shared.slots[i];
        slot.state.store(shmem::STOPPED, Ordering::Relaxed);
        slot.exit.store(shmem::EXIT_RESTART, Ordering::Relaxed);
        slot.database.store(0, Ordering::Release);
    }
}
