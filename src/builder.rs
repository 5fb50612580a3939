//! The full sync builders: background workers that take full sync steps (building documents,
//! chunk after chunk) while the worker sends what was built.
//!
//! A full sync is two kinds of work: building documents (PostgreSQL executing the feed's source
//! query) and delivering them (reading, posting, recording). In one process they alternate and
//! use one core. The worker starts `cde.sync_builders` builders when a run has building to do; a
//! phase is split into as many lanes (sql/sync.sql), and each builder takes steps on a lane no
//! other holds until none is left or the run waits for the send pass (or ends), waking the worker
//! after each chunk, and exits. Chunk steps hold the step lock shared, so builders build side by
//! side; steps that change the run's state take a second lock, one at a time. The worker's
//! collects go on meanwhile: neither a step nor a collect overwrites a row written since its
//! snapshot (cde._rebuild). A builder waits for those locks rather than exit.

use crate::engine::Txn;
use crate::shmem;
use crate::sync::{self, Step};
use crate::worker::Own;
use pgrx::bgworkers::*;
use pgrx::prelude::*;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a builder finding every lane left taken waits for one before it exits, and how often
/// it asks again meanwhile.
const BUSY_WAIT: Duration = Duration::from_secs(1);
const BUSY_RETRY: Duration = Duration::from_millis(5);

/// The worker's handles on its builders.
#[derive(Default)]
pub struct Builders {
    handles: Vec<DynamicBackgroundWorker>,
}

impl Builders {
    /// Is any builder starting or running? Forgets those that are gone.
    pub fn alive(&mut self) -> bool {
        self.handles.retain(|h| matches!(h.pid(), Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)));
        !self.handles.is_empty()
    }

    /// Start builders until `n` run; false when none runs (`n` is 0, or no free background worker
    /// slot: max_worker_processes), and the worker takes the steps itself.
    ///
    /// While the launcher waits for a slot for some database's worker, none starts
    /// (`shmem::workers_wait_for_slots`).
    pub fn start(&mut self, n: usize) -> bool {
        self.alive();
        let shared = shmem::worker();
        let starved = shmem::workers_wait_for_slots();
        if starved && self.handles.is_empty() && n > 0 {
            log!("cde: no sync builder starts while a database waits for a background worker slot; the worker builds");
        }
        while !starved && self.handles.len() < n {
            let launched = BackgroundWorkerBuilder::new("cde sync builder")
                .set_type("cde sync builder")
                .set_function("cde_builder_main")
                .set_library("cde")
                .enable_spi_access()
                .set_argument(Some(pg_sys::Datum::from(unsafe { pg_sys::MyDatabaseId }.to_u32() as usize)))
                .set_notify_pid(unsafe { pg_sys::MyProcPid })
                .load_dynamic();
            match launched {
                Ok(h) => self.handles.push(h),
                Err(_) => {
                    log!(
                        "cde: no background worker slot for a sync builder (max_worker_processes): {} of {n} run{}",
                        self.handles.len(),
                        if self.handles.is_empty() { "; the worker builds" } else { "" }
                    );
                    break;
                }
            }
        }
        if let Some(w) = shared {
            w.builders_wanted.store(n as u32, Ordering::Relaxed);
        }
        !self.handles.is_empty()
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn cde_builder_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = arg.value() as u32;
    // Known to the slot before connecting, so that a statement holding the database (DROP
    // DATABASE...) finds and stops this builder too.
    let Some(entry) = register(db) else { return };
    unsafe { pg_sys::before_shmem_exit(Some(on_exit), pg_sys::Datum::from(entry as *const AtomicI32 as usize)) };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);
    unsafe { pg_sys::before_shmem_exit(Some(crate::builder_send::end_post_at_exit), pg_sys::Datum::from(0usize)) };
    crate::worker::session_settings();
    crate::builder_send::enable();
    let mut chunks = 0u64;
    let mut busy_since: Option<Instant> = None;
    loop {
        if BackgroundWorker::sigterm_received() || unsafe { pg_sys::ShutdownRequestPending } != 0 {
            break;
        }
        // cde.pause, cde.sync_builders_send, a destination's settings: read again.
        if BackgroundWorker::sighup_received() {
            unsafe {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            }
        }
        // A held database, or a database elsewhere waiting for a worker slot: give this one up.
        if shmem::held(db) || shmem::workers_wait_for_slots() {
            break;
        }
        let step = crate::worker::guarded(|| {
            Own.run(|| {
                installed().then(|| sync::step_waiting(true))
            })
        })
        .unwrap_or_else(|e| {
            warning!("cde: CDE-301 a sync builder's step failed and was rolled back; the worker takes it again: {e}");
            None
        });
        // What the step's chunk wrote as sent goes now that the step has committed, while the
        // next step builds; the chunk before it is said.
        if !crate::builder_send::deliver() {
            break;
        }
        // Busy: every lane left is another builder's chunk now. Those chunks commit in a moment,
        // and free their lanes: this one takes the lane's next chunk then, rather than leave the
        // rest of the phase to one builder. Waiting, Idle, Retry: nothing to build now.
        match step {
            Some(Step::Progress) => {
                chunks += 1;
                busy_since = None;
                shmem::wake_worker(); // something to send
            }
            Some(Step::Busy) if busy_since.get_or_insert_with(Instant::now).elapsed() < BUSY_WAIT => {
                BackgroundWorker::wait_latch(Some(BUSY_RETRY));
            }
            _ => break,
        }
    }
    // The last chunk's post, on its way: said before this builder goes.
    crate::builder_send::finish();
    log!("cde: sync builder done after {chunks} steps");
}

/// The cde this builder serves: the oid of its pg_extension row, as the builder first found it.
/// A DROP EXTENSION between two of its steps, and a CREATE EXTENSION after it, make another cde,
/// which is not this builder's: nothing of the first one's (a post out, a step) belongs in it.
static SERVES: AtomicU32 = AtomicU32::new(0);

/// Whether the cde this builder serves is still installed, in a transaction; the first call
/// says which one that is.
pub fn installed() -> bool {
    let now = Spi::get_one::<pg_sys::Oid>("SELECT oid FROM pg_catalog.pg_extension WHERE extname = 'cde'")
        .unwrap_or_else(|e| error!("cde: {e}"))
        .map_or(0, u32::from);
    let serves = match SERVES.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => now,
        Err(first) => first,
    };
    now != 0 && now == serves
}

/// This builder's pid in its database's slot; `None` when the database has no slot (its worker
/// is gone) or every entry is taken.
fn register(db: u32) -> Option<&'static AtomicI32> {
    let slot = shmem::slot_of(pg_sys::Oid::from(db))?;
    let pid = unsafe { pg_sys::MyProcPid };
    slot.builders.iter().find(|b| b.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed).is_ok())
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, arg: pg_sys::Datum) {
    let entry = unsafe { &*(arg.value() as *const AtomicI32) };
    entry.store(0, Ordering::Release);
}
