//! The full sync builder: a second background worker that takes full sync steps (building
//! documents, chunk after chunk) while the worker sends what was built.
//!
//! A full sync is two kinds of work: building documents (PostgreSQL executing the feed's source
//! query) and delivering them (reading, posting, recording). In one process they alternate and
//! use one core. The worker starts the builder when a run has building to do; the builder takes
//! steps until the run waits for the send pass (or ends), wakes the worker after each chunk, and
//! exits. Steps serialise on an advisory lock inside `cde._sync_step()`, so the worker and the
//! builder never take the same step twice; the worker leaves steps to the builder while it runs.
//! The worker's collects take that lock too: a step and a collect never overlap, so a step's
//! document, built from its snapshot, never overwrites a newer one collected meanwhile. The
//! builder waits for the lock (a collect is short) rather than exit.

use crate::engine::Txn;
use crate::gucs;
use crate::shmem;
use crate::sync::{self, Step};
use crate::worker::Own;
use pgrx::bgworkers::*;
use pgrx::prelude::*;

/// The worker's handle on its builder.
#[derive(Default)]
pub struct Builder {
    handle: Option<DynamicBackgroundWorker>,
}

impl Builder {
    /// Is a builder starting or running?
    pub fn alive(&mut self) -> bool {
        let alive = match &self.handle {
            None => false,
            Some(h) => match h.pid() {
                Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted) => true,
                Err(_) => false,
            },
        };
        if !alive {
            self.handle = None;
        }
        alive
    }

    /// Start a builder unless one runs; false when none could start (no free background worker
    /// slot: max_worker_processes), and the worker takes the steps itself.
    pub fn start(&mut self) -> bool {
        if self.alive() {
            return true;
        }
        let launched = BackgroundWorkerBuilder::new("cde sync builder")
            .set_type("cde sync builder")
            .set_function("cde_builder_main")
            .set_library("cde")
            .enable_spi_access()
            .set_notify_pid(unsafe { pg_sys::MyProcPid })
            .load_dynamic();
        match launched {
            Ok(h) => {
                self.handle = Some(h);
                true
            }
            Err(_) => {
                log!("cde: no background worker slot for the sync builder (max_worker_processes); the worker builds");
                false
            }
        }
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
        let step = Own.run(|| {
            let installed = Spi::get_one::<bool>("SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'cde')")
                .ok()
                .flatten()
                .unwrap_or(false);
            installed.then(|| sync::step_waiting(true))
        });
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
