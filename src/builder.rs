//! The full sync builders: background workers that take full sync steps (building documents,
//! chunk after chunk) while the worker sends what was built.
//!
//! A full sync is two kinds of work: building documents (PostgreSQL executing the feed's source
//! query) and delivering them (reading, posting, recording). In one process they alternate and
//! use one core. The worker starts `cde.sync_builders` builders when a run has building to do; a
//! phase is split into as many lanes (sql/sync.sql), and each builder takes steps on a lane no
//! other holds until none is left or the run waits for the send pass (or ends), waking the worker
//! after each chunk, and exits. Chunk steps hold the step lock shared, so builders build side by
//! side; steps that change the run's state take a second lock, one at a time; the worker's
//! collects take the step lock exclusively: a step and a collect never overlap, so a step's
//! document, built from its snapshot, never overwrites a newer one collected meanwhile. A builder
//! waits for those locks (a collect is short) rather than exit.

use crate::engine::Txn;
use crate::gucs;
use crate::shmem;
use crate::sync::{self, Step};
use crate::worker::Own;
use pgrx::bgworkers::*;
use pgrx::prelude::*;

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
    pub fn start(&mut self, n: usize) -> bool {
        self.alive();
        while self.handles.len() < n {
            let launched = BackgroundWorkerBuilder::new("cde sync builder")
                .set_type("cde sync builder")
                .set_function("cde_builder_main")
                .set_library("cde")
                .enable_spi_access()
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
        !self.handles.is_empty()
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn cde_builder_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(Some(&gucs::database()), None);
    crate::worker::session_settings();
    let mut chunks = 0u64;
    loop {
        if BackgroundWorker::sigterm_received() || unsafe { pg_sys::ShutdownRequestPending } != 0 {
            break;
        }
        let step = crate::worker::guarded(|| {
            Own.run(|| {
                let installed = Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'cde')")
                    .ok()
                    .flatten()
                    .unwrap_or(false);
                installed.then(|| sync::step_waiting(true))
            })
        })
        .unwrap_or_else(|e| {
            warning!("cde: CDE-301 a sync builder's step failed and was rolled back; the worker takes it again: {e}");
            None
        });
        // Busy: every lane left is another builder's; Waiting, Idle, Retry: nothing to build now.
        match step {
            Some(Step::Progress) => {
                chunks += 1;
                shmem::wake_worker(); // something to send
            }
            _ => break,
        }
    }
    log!("cde: sync builder done after {chunks} steps");
}
