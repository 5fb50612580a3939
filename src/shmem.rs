//! The little shared memory cde uses: where the worker's latch is (so that a commit that recorded
//! changes can wake it) and the worker's counters for `cde_worker_status`. It exists only when cde
//! is in `shared_preload_libraries`; without it every accessor answers `None`.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};

#[derive(Default)]
pub struct WorkerShared {
    pub pid: AtomicI32,
    /// Address of the worker's `MyLatch` (PGPROC latches live in shared memory, at the same address
    /// in every backend), or 0 while no worker runs.
    pub latch: AtomicU64,
    /// 0 stopped, 1 waiting for the extension, 2 idle, 3 working, 4 paused, 5 waiting for the
    /// database, 6 waiting for ALTER EXTENSION cde UPDATE.
    pub state: AtomicI32,
    pub started_at: AtomicI64,
    pub last_iteration_at: AtomicI64,
    pub iterations: AtomicU64,
    pub docs_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub requests: AtomicU64,
    pub requests_failed: AtomicU64,
    /// Settings reloads (SIGHUP) the worker has processed: lets a test wait for one.
    pub reloads: AtomicU64,
    /// The worker is connecting to cde.database. Still set when a worker starts: the last one
    /// died connecting (the database does not exist), so this one waits for it instead.
    pub connecting: AtomicBool,
}

unsafe impl PGRXSharedMemory for WorkerShared {}

static WORKER: PgAtomic<WorkerShared> = unsafe { PgAtomic::new(c"cde_worker") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub const STOPPED: i32 = 0;
pub const WAITING_FOR_EXTENSION: i32 = 1;
pub const IDLE: i32 = 2;
pub const WORKING: i32 = 3;
pub const PAUSED: i32 = 4;
pub const WAITING_FOR_DATABASE: i32 = 5;
pub const WAITING_FOR_UPDATE: i32 = 6;

/// Called from `_PG_init` while shared_preload_libraries is processed.
pub fn init() {
    pg_shmem_init!(WORKER);
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn worker() -> Option<&'static WorkerShared> {
    PRELOADED.load(Ordering::Relaxed).then(|| WORKER.get())
}

pub fn state_name(state: i32) -> &'static str {
    match state {
        WAITING_FOR_EXTENSION => "waiting for extension",
        IDLE => "idle",
        WORKING => "working",
        PAUSED => "paused (cde.pause)",
        WAITING_FOR_DATABASE => "waiting for database (cde.database does not exist)",
        WAITING_FOR_UPDATE => "waiting for ALTER EXTENSION cde UPDATE (the database has an older version than the library)",
        _ => "stopped",
    }
}

/// Set the worker's latch, if a worker runs.
pub fn wake_worker() {
    if let Some(w) = worker() {
        let latch = w.latch.load(Ordering::Acquire);
        if latch != 0 {
            unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
        }
    }
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}
