//! The little shared memory cde uses: the launcher's latch and the requests it takes, and one slot
//! per served database (its worker's latch, so that a commit that recorded changes can wake it,
//! its builders' pids, its counters for `cde_worker_status`). It exists only when cde is in
//! `shared_preload_libraries`; without it every accessor answers `None`.
//!
//! Who writes what: the launcher alone takes and frees slots (`database`); a database's worker
//! writes its slot's state and counters; builders their own entry of `builders`; any backend may
//! post a request or a hold (claimed by compare-and-swap).

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Databases served at once. A cluster with more databases where cde is installed serves the
/// first ones and says so in the log and in `cde_worker_status` of the others.
pub const MAX_DATABASES: usize = 128;

/// Builders a slot tracks (cde.sync_builders' maximum).
pub const MAX_BUILDERS: usize = 64;

/// Pending "cde was just installed here" requests (see `request_worker`).
const MAX_REQUESTS: usize = 32;

/// Statements holding a database free of cde's processes at once (see databases.rs).
const MAX_HOLDS: usize = 128;

pub struct WorkerShared {
    /// The database served through this slot, or 0 when the slot is free.
    pub database: AtomicU32,
    pub pid: AtomicI32,
    /// Address of the worker's `MyLatch` (PGPROC latches live in shared memory, at the same address
    /// in every backend), or 0 while no worker runs.
    pub latch: AtomicU64,
    /// One of the states below.
    pub state: AtomicI32,
    /// Why the last worker of this slot ended (`EXIT_*`), for the launcher.
    pub exit: AtomicI32,
    pub started_at: AtomicI64,
    pub last_iteration_at: AtomicI64,
    pub iterations: AtomicU64,
    pub docs_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub requests: AtomicU64,
    pub requests_failed: AtomicU64,
    /// The same four, of what sync builders sent themselves (src/builder_send.rs): added to the
    /// worker's in cde_worker_status.
    pub builders_docs_sent: AtomicU64,
    pub builders_bytes_sent: AtomicU64,
    pub builders_requests: AtomicU64,
    pub builders_requests_failed: AtomicU64,
    /// Settings reloads (SIGHUP) the worker has processed: lets a test wait for one.
    pub reloads: AtomicU64,
    /// Commits that queued changes (counted before they wake the worker). While builders run a
    /// full sync the worker takes its time between iterations, except for these.
    pub commits: AtomicU64,
    /// Sessions waiting for the iteration lock (cde_sync_now(), CALL cde_deliver(), DROP
    /// EXTENSION): the worker starts no new send pass and releases the lock once what it has out
    /// came back (see `locks::take_iteration_lock`).
    pub lock_waiters: AtomicU32,
    /// Sync builders the worker wanted at its last start of builders (how many run: `builders`).
    pub builders_wanted: AtomicU32,
    /// The pids of this database's running builders (0: free entry).
    pub builders: [AtomicI32; MAX_BUILDERS],
}

impl Default for WorkerShared {
    fn default() -> WorkerShared {
        WorkerShared {
            database: AtomicU32::new(0),
            pid: AtomicI32::new(0),
            latch: AtomicU64::new(0),
            state: AtomicI32::new(STOPPED),
            exit: AtomicI32::new(EXIT_RESTART),
            started_at: AtomicI64::new(0),
            last_iteration_at: AtomicI64::new(0),
            iterations: AtomicU64::new(0),
            docs_sent: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            requests_failed: AtomicU64::new(0),
            builders_docs_sent: AtomicU64::new(0),
            builders_bytes_sent: AtomicU64::new(0),
            builders_requests: AtomicU64::new(0),
            builders_requests_failed: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            lock_waiters: AtomicU32::new(0),
            builders_wanted: AtomicU32::new(0),
            builders: std::array::from_fn(|_| AtomicI32::new(0)),
        }
    }
}

pub struct Shared {
    pub launcher_pid: AtomicI32,
    pub launcher_latch: AtomicU64,
    /// Databases the launcher wants to serve but could not start a worker for (no background
    /// worker slot): while not 0, no database starts sync builders, and running ones stop after
    /// their step, so that the slots go to workers first.
    pub waiting_for_slot: AtomicU32,
    /// Databases where cde was just installed (oid, 0 free); `requests_lost` when the list was full.
    requests: [AtomicU32; MAX_REQUESTS],
    requests_lost: AtomicBool,
    /// Statements that need a database without cde's processes: database oid << 32 | backend
    /// pid, 0 when free; one word, so that taking and clearing an entry are single CAS.
    holds: [AtomicU64; MAX_HOLDS],
    pub slots: [WorkerShared; MAX_DATABASES],
}

impl Default for Shared {
    fn default() -> Shared {
        Shared {
            launcher_pid: AtomicI32::new(0),
            launcher_latch: AtomicU64::new(0),
            waiting_for_slot: AtomicU32::new(0),
            requests: std::array::from_fn(|_| AtomicU32::new(0)),
            requests_lost: AtomicBool::new(false),
            holds: std::array::from_fn(|_| AtomicU64::new(0)),
            slots: std::array::from_fn(|_| WorkerShared::default()),
        }
    }
}

unsafe impl PGRXSharedMemory for Shared {}

static SHARED: PgAtomic<Shared> = unsafe { PgAtomic::new(c"cde_shared") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

pub const STOPPED: i32 = 0;
pub const WAITING_FOR_EXTENSION: i32 = 1;
pub const IDLE: i32 = 2;
pub const WORKING: i32 = 3;
pub const PAUSED: i32 = 4;
pub const WAITING_FOR_SLOT: i32 = 5;
pub const WAITING_FOR_UPDATE: i32 = 6;
pub const STARTING: i32 = 7;

/// The worker ended on a signal or an error: start another.
pub const EXIT_RESTART: i32 = 0;
/// cde is not installed in the database: start none until it is.
pub const EXIT_NOT_INSTALLED: i32 = 1;
/// A statement holds the database (DROP DATABASE...): start another once it is done.
pub const EXIT_HELD: i32 = 2;
/// The database's settings changed: start another at once, which takes them.
pub const EXIT_RELOAD: i32 = 3;

/// Called from `_PG_init` while shared_preload_libraries is processed.
pub fn init() {
    pg_shmem_init!(SHARED);
    PRELOADED.store(true, Ordering::Relaxed);
}

pub fn shared() -> Option<&'static Shared> {
    PRELOADED.load(Ordering::Relaxed).then(|| SHARED.get())
}

/// The slot of this session's database, if it is served. A session stays in one database, so
/// the index found is kept and only checked afterwards.
pub fn worker() -> Option<&'static WorkerShared> {
    static CACHED: AtomicUsize = AtomicUsize::new(usize::MAX);
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let slots = &shared()?.slots;
    let i = CACHED.load(Ordering::Relaxed);
    if i < MAX_DATABASES && slots[i].database.load(Ordering::Acquire) == db {
        return Some(&slots[i]);
    }
    let i = slots.iter().position(|s| db != 0 && s.database.load(Ordering::Acquire) == db)?;
    CACHED.store(i, Ordering::Relaxed);
    Some(&slots[i])
}

/// Does some database wait for a background worker slot for its worker? Then sync builders give
/// theirs up (builders only speed a full sync up; a worker is what delivers a database at all).
pub fn workers_wait_for_slots() -> bool {
    shared().is_some_and(|s| s.waiting_for_slot.load(Ordering::Acquire) > 0)
}

/// The slot serving `database`, if any.
pub fn slot_of(database: pg_sys::Oid) -> Option<&'static WorkerShared> {
    shared()?.slots.iter().find(|s| s.database.load(Ordering::Acquire) == database.to_u32())
}

pub fn state_name(state: i32) -> &'static str {
    match state {
        WAITING_FOR_EXTENSION => "waiting for extension",
        IDLE => "idle",
        WORKING => "working",
        PAUSED => "paused (cde.pause)",
        WAITING_FOR_SLOT => "waiting for a background worker slot (max_worker_processes)",
        WAITING_FOR_UPDATE => "waiting for ALTER EXTENSION cde UPDATE (the database has an older version than the library)",
        STARTING => "starting",
        _ => "stopped",
    }
}

fn set_latch(latch: &AtomicU64) {
    let latch = latch.load(Ordering::Acquire);
    if latch != 0 {
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// Does a session of this database wait for the iteration lock?
pub fn lock_wanted() -> bool {
    worker().is_some_and(|w| w.lock_waiters.load(Ordering::Acquire) > 0)
}

/// Set the latch of this database's worker, if one runs.
pub fn wake_worker() {
    if let Some(w) = worker() {
        set_latch(&w.latch);
    }
}

/// A commit queued changes: count it, and wake this database's worker.
pub fn changes_committed() {
    if let Some(w) = worker() {
        w.commits.fetch_add(1, Ordering::Release);
        set_latch(&w.latch);
    }
}

pub fn wake_launcher() {
    if let Some(s) = shared() {
        set_latch(&s.launcher_latch);
    }
}

/// cde was installed in this session's database (called at commit): ask the launcher to serve it.
pub fn request_worker() {
    let Some(s) = shared() else { return };
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let posted = s.requests.iter().any(|r| r.load(Ordering::Relaxed) == db)
        || s.requests.iter().any(|r| r.compare_exchange(0, db, Ordering::AcqRel, Ordering::Relaxed).is_ok());
    if !posted {
        s.requests_lost.store(true, Ordering::Release);
    }
    wake_launcher();
}

/// The requests posted since the last call; `None` when some were lost (the list was full), and
/// every database not served must be looked at again.
pub fn take_requests(s: &Shared) -> Option<Vec<u32>> {
    let taken: Vec<u32> = s.requests.iter().map(|r| r.swap(0, Ordering::AcqRel)).filter(|&db| db != 0).collect();
    (!s.requests_lost.swap(false, Ordering::AcqRel)).then_some(taken)
}

/// Hold `database` free of cde's processes until the returned guard is dropped; `None` when every
/// hold entry is taken. A backend that ends without dropping it (a FATAL) releases it at exit.
pub fn hold(database: pg_sys::Oid) -> Option<Hold> {
    static RELEASE_AT_EXIT: AtomicBool = AtomicBool::new(false);
    let s = shared()?;
    let pid = unsafe { pg_sys::MyProcPid };
    if !RELEASE_AT_EXIT.swap(true, Ordering::Relaxed) {
        unsafe { pg_sys::before_shmem_exit(Some(release_holds_at_exit), pg_sys::Datum::from(0usize)) };
    }
    let word = (database.to_u32() as u64) << 32 | pid as u32 as u64;
    let i = s.holds.iter().position(|h| h.compare_exchange(0, word, Ordering::AcqRel, Ordering::Relaxed).is_ok())?;
    Some(Hold(i, word))
}

pub struct Hold(usize, u64);

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(s) = shared() {
            let _ = s.holds[self.0].compare_exchange(self.1, 0, Ordering::AcqRel, Ordering::Relaxed);
            set_latch(&s.launcher_latch);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn release_holds_at_exit(_code: i32, _arg: pg_sys::Datum) {
    if let Some(s) = shared() {
        let pid = unsafe { pg_sys::MyProcPid } as u32 as u64;
        for h in &s.holds {
            let word = h.load(Ordering::Acquire);
            if word != 0 && word & 0xffff_ffff == pid {
                let _ = h.compare_exchange(word, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
        set_latch(&s.launcher_latch);
    }
}

/// Is a statement holding `database`? A hold left by a backend that died is cleared here (by
/// CAS: only the entry as it was read).
pub fn held(database: u32) -> bool {
    let Some(s) = shared() else { return false };
    s.holds.iter().any(|h| {
        let word = h.load(Ordering::Acquire);
        if word == 0 || (word >> 32) as u32 != database {
            return false;
        }
        if alive((word & 0xffff_ffff) as u32 as i32) {
            return true;
        }
        let _ = h.compare_exchange(word, 0, Ordering::AcqRel, Ordering::Relaxed);
        false
    })
}

/// Does process `pid` exist? (The postmaster's children all run as the same OS user.)
pub fn alive(pid: i32) -> bool {
    pid > 0 && (unsafe { libc::kill(pid, 0) } == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH))
}

pub fn now_micros() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}
