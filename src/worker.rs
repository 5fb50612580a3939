//! The background worker: one per cluster, connected to `cde.database`, registered when cde is in
//! `shared_preload_libraries`.
//!
//! It sleeps on its latch, woken by any commit that recorded changes (see capture.rs) or after
//! `cde.poll_interval`, then runs one iteration over all feeds (engine.rs), committing after each
//! step. It waits for the extension to be created, survives it being dropped, reloads settings on
//! SIGHUP, stops on SIGTERM, and is restarted by the postmaster if it dies or is terminated (see
//! `leave`).

use crate::builder::Builders;
use crate::deliver::Counters;
use crate::engine::{self, Txn};
use crate::gucs::{self, Settings};
use crate::shmem::{self, now_micros};
use crate::sync;
use crate::transport::Transport;
use pgrx::bgworkers::*;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Key of the advisory lock that makes one iteration at a time run (worker or cde_sync_now).
pub const ITERATION_LOCK: i64 = 0x6364_6500;

/// How long one feed may collect per iteration before it sends what it has and the worker moves
/// on to the next feed (and comes straight back): under a flood of changes, delivery keeps pace
/// and one busy feed does not starve the others.
const COLLECT_BUDGET: Duration = Duration::from_millis(300);

/// Time a feed's send pass may go on reading new slices, for the same reason.
const SEND_BUDGET: Duration = Duration::from_secs(1);

/// Shortest time between the starts of two iterations (see the loop).
const MIN_ITERATION_GAP: Duration = Duration::from_millis(20);

/// Time given to full sync steps per iteration, before the feeds' own collect and send.
const SYNC_BUDGET: Duration = Duration::from_millis(500);

/// A running full sync logs its progress at least this often.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(10);

pub fn register() {
    BackgroundWorkerBuilder::new("cde worker")
        .set_type("cde worker")
        .set_function("cde_worker_main")
        .set_library("cde")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(2)))
        .load();
}

/// A fresh transaction per step, committed at its end.
///
/// After the commit, the step's table statistics go to the cumulative statistics (at most once a
/// second; PostgreSQL keeps the rest pending): a backend does it in its main loop, a background
/// worker must do it itself. Without it the worker's updates of feed tables and its deletes from
/// the queue were never counted, so autovacuum never saw their dead rows: a feed table only
/// delivering changes was never vacuumed (found in pg_stat_user_tables: n_tup_upd = 0 for a feed
/// table after 2M updates by the worker).
pub struct Own;
impl Txn for Own {
    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let f = std::panic::AssertUnwindSafe(f);
        let r = BackgroundWorker::transaction(move || {
            let f = f;
            (f.0)()
        });
        unsafe { pg_sys::pgstat_report_stat(false) };
        r
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn cde_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = gucs::database();
    let shared = shmem::worker().expect("the cde worker runs only when cde is preloaded");
    if shared.connecting.swap(true, Ordering::Relaxed) {
        wait_for_database(shared, &database); // the last worker died connecting: no such database
    }
    BackgroundWorker::connect_worker_to_spi(Some(&database), None); // FATAL if it does not exist
    shared.connecting.store(false, Ordering::Relaxed);
    announce(shared, shmem::WAITING_FOR_EXTENSION);
    session_settings();
    log!("cde: worker started in database {database}");

    let mut settings = Settings::read();
    let mut transport = Transport::new(&settings);
    let mut counters = Counters::default();
    let mut builders = Builders::default();
    let mut announced_waiting = false;
    let mut last_progress_log = Instant::now();
    let mut more = true; // look for work at once after a (re)start
    let mut last_start = Instant::now();
    loop {
        if !more && !BackgroundWorker::wait_latch(Some(settings.poll_interval)) {
            break;
        }
        // Under a stream of commits the latch is set again before an iteration ends: leave a
        // short gap so that one iteration takes many changes at once instead of one each.
        let gap = last_start.elapsed();
        if gap < MIN_ITERATION_GAP {
            std::thread::sleep(MIN_ITERATION_GAP - gap);
        }
        last_start = Instant::now();
        if unsafe { pg_sys::ShutdownRequestPending } != 0 {
            break;
        }
        if BackgroundWorker::sighup_received() {
            unsafe {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            }
            settings = Settings::read();
            transport.refresh(&settings);
            shared.reloads.fetch_add(1, Ordering::Relaxed);
            log!("cde: settings reloaded (endpoint {})", settings.endpoint.as_deref().unwrap_or("not set"));
        }
        more = false;
        if settings.pause {
            shared.state.store(shmem::PAUSED, Ordering::Relaxed);
            continue;
        }
        // One short transaction: is the extension there, and is no cde_sync_now() iterating?
        let ready = Own.run(|| {
            Spi::get_one_with_args::<bool>(
                "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'cde') THEN pg_try_advisory_lock($1) END",
                &[ITERATION_LOCK.into()],
            )
            .ok()
            .flatten()
        });
        let Some(locked) = ready else {
            if !announced_waiting {
                log!("cde: waiting for CREATE EXTENSION cde in database {database}");
                announced_waiting = true;
            }
            shared.state.store(shmem::WAITING_FOR_EXTENSION, Ordering::Relaxed);
            continue;
        };
        if !locked {
            continue; // cde_sync_now() is running an iteration; ours would find nothing to do
        }
        announced_waiting = false;
        shared.state.store(shmem::WORKING, Ordering::Relaxed);
        more = iteration(&settings, &mut transport, &mut counters, &mut builders, &mut last_progress_log);
        shared.iterations.fetch_add(1, Ordering::Relaxed);
        shared.last_iteration_at.store(now_micros(), Ordering::Relaxed);
        shared.docs_sent.store(counters.docs_sent, Ordering::Relaxed);
        shared.requests.store(counters.requests, Ordering::Relaxed);
        shared.requests_failed.store(counters.requests_failed, Ordering::Relaxed);
        shared.bytes_sent.store(transport.bytes_sent, Ordering::Relaxed);
        shared.state.store(shmem::IDLE, Ordering::Relaxed);
    }
    leave(shared);
}

/// Stop on SIGTERM, leaving in shared memory no latch to set and the state `stopped`. Never
/// returns.
///
/// The exit status is 1, not 0: to the postmaster, a background worker that exits with 0 is
/// done for good and is not started again until the server restarts, so a
/// `pg_terminate_backend()` of the worker would silently stop all delivery. With 1 it is started
/// again `bgw_restart_time` (2 s) later, as PostgreSQL's own launchers are. At a shutdown the
/// postmaster starts no worker whatever the status (the server log then says `background worker
/// "cde worker" ... exited with exit code 1`, as it does of the logical replication launcher).
/// To stop delivery on purpose there is `cde.pause`.
fn leave(shared: &shmem::WorkerShared) -> ! {
    shared.latch.store(0, Ordering::Release);
    shared.state.store(shmem::STOPPED, Ordering::Relaxed);
    log!("cde: worker stopped");
    unsafe { pg_sys::proc_exit(1) }
}

/// Asked to stop (SIGTERM: a fast shutdown, pg_terminate_backend) while waiting for the endpoint:
/// leave now rather than after up to `cde.http_timeout`. Called only where no transaction is
/// open and nothing is half-recorded; the items in flight stay pending and are sent again, with
/// the same Idempotency-Key. Other processes (a backend running cde_sync_now()) are left alone.
pub fn stop_now_if_asked() {
    let asked = unsafe { pg_sys::IsBackgroundWorker && pg_sys::ShutdownRequestPending != 0 };
    if let (true, Some(shared)) = (asked, shmem::worker()) {
        log!("cde: stopping with a request in flight; its items stay pending and go again");
        leave(shared);
    }
}

/// Settings of the worker's (and the builders') own session.
///
/// A background worker's session takes the settings of its database and role, as any session
/// does, and a database's owner may `ALTER DATABASE ... SET` many of them: a search_path putting
/// its own functions and operators before pg_catalog's, a statement_timeout, read-only
/// transactions... None of that may change what cde runs, or stop it. So the session first pins
/// its search_path (nothing below resolves a name through the database's), then sets every
/// setting that came from the database or a role back to what the server's configuration says
/// (`cde.*` excepted: those only a superuser can set), then fixes the ones cde depends on.
/// - synchronous_commit = off: their commits need not wait for the WAL flush. A commit lost in a
///   crash takes its queue drain and feed-table writes with it (collected again), or its delivery
///   record (sent again, same Idempotency-Key), or a sync chunk (built again). Writers then do
///   not share their group commits with them.
/// - jit = off: their statements are short and planned often (docs/benchmarks.md).
pub fn session_settings() {
    Own.run(|| {
        Spi::run("SET search_path = pg_catalog, pg_temp")?;
        Spi::run(RESET_DATABASE_SETTINGS)?;
        Spi::run(PINNED_SETTINGS)
    })
    .unwrap_or_else(|e| error!("cde: {e}"));
}

/// Every setting the session took from its database or role (pg_db_role_setting), back to the
/// server configuration's value (postgresql.conf, ALTER SYSTEM) or the built-in default. One that
/// cannot be set is reported and left alone.
const RESET_DATABASE_SETTINGS: &str = "DO $$
DECLARE
    s record;
    reset text[] := '{}';
BEGIN
    FOR s IN
        SELECT g.name, coalesce((SELECT f.setting FROM pg_catalog.pg_file_settings f
                                  WHERE f.name = g.name AND f.applied ORDER BY f.seqno DESC LIMIT 1),
                                g.boot_val) AS value
          FROM pg_catalog.pg_settings g
         WHERE g.source IN ('database', 'user', 'database user') AND g.name !~ '^cde[.]'
    LOOP
        BEGIN
            PERFORM pg_catalog.set_config(s.name, s.value, false);
            reset := reset || s.name;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'cde: cannot reset setting % taken from the database or role: %', s.name, SQLERRM;
        END;
    END LOOP;
    IF reset <> '{}' THEN
        RAISE LOG 'cde: the worker ignores these settings of its database or role: %', pg_catalog.array_to_string(reset, ', ');
    END IF;
END $$";

/// What cde's own SQL relies on, whatever any configuration says.
const PINNED_SETTINGS: &str = "SET statement_timeout = 0; SET lock_timeout = 0;
    SET idle_in_transaction_session_timeout = 0; SET idle_session_timeout = 0;
    SET default_transaction_isolation = 'read committed'; SET default_transaction_read_only = off;
    SET default_transaction_deferrable = off; SET session_replication_role = origin;
    SET row_security = on; SET standard_conforming_strings = on; SET array_nulls = on;
    SET check_function_bodies = on; SET temp_tablespaces = '';
    SET synchronous_commit = off; SET jit = off";

fn announce(shared: &shmem::WorkerShared, state: i32) {
    shared.pid.store(unsafe { pg_sys::MyProcPid }, Ordering::Relaxed);
    shared.started_at.store(now_micros(), Ordering::Relaxed);
    shared.latch.store(unsafe { pg_sys::MyLatch } as u64, Ordering::Release);
    shared.state.store(state, Ordering::Relaxed);
}

/// cde.database does not exist. Rather than die connecting every 2 seconds, connect to no
/// database (the shared catalogs only), say so once, and look for it every poll interval; once
/// it exists, exit so that the postmaster starts a worker that connects to it. Never returns.
fn wait_for_database(shared: &shmem::WorkerShared, database: &str) -> ! {
    BackgroundWorker::connect_worker_to_spi(None, None);
    announce(shared, shmem::WAITING_FOR_DATABASE);
    warning!("cde: database \"{database}\" does not exist (cde.database); the worker waits for it to be created");
    let name = std::ffi::CString::new(database).unwrap_or_default();
    loop {
        let exists = Own.run(|| unsafe { pg_sys::get_database_oid(name.as_ptr(), true) } != pg_sys::Oid::INVALID);
        if exists {
            log!("cde: database \"{database}\" exists now; the worker restarts to connect to it");
            shared.connecting.store(false, Ordering::Relaxed);
            shared.latch.store(0, Ordering::Release);
            unsafe { pg_sys::proc_exit(1) }; // 1: the postmaster restarts the worker
        }
        if !BackgroundWorker::wait_latch(Some(Settings::read().poll_interval)) {
            leave(shared);
        }
    }
}

/// One iteration over all feeds, holding the iteration lock (released at the end); true when
/// there is more to do right away.
fn iteration(
    settings: &Settings,
    transport: &mut Transport,
    counters: &mut Counters,
    builders: &mut Builders,
    last_progress_log: &mut Instant,
) -> bool {
    // Full sync first. While builders run, they take the steps (and wake us after each) and this
    // iteration only sends. Otherwise one step; if there is building to do, builders take over,
    // or without any this worker builds for a bounded time, so that partial sync keeps flowing
    // meanwhile.
    let mut more = false;
    if !builders.alive() && matches!(Own.run(sync::step), sync::Step::Progress) {
        more = true;
        if !builders.start(settings.sync_builders) {
            sync::advance(&|| Own.run(sync::step), SYNC_BUDGET);
        }
    }
    if last_progress_log.elapsed() >= PROGRESS_LOG_EVERY {
        if let Some(line) = Own.run(sync::progress_line) {
            log!("{line}");
        }
        *last_progress_log = Instant::now();
    }
    let feeds = Own.run(|| engine::load_feeds(None, settings.legacy_interval.as_millis()));
    for feed in &feeds {
        let r = engine::feed_iteration(&Own, transport, settings, feed, false, counters, COLLECT_BUDGET, SEND_BUDGET);
        more |= r.more;
        if r.collected + r.sent + r.failed + r.retries_due > 0 || r.requests > 0 {
            let op = if feed.full_sync_sending {
                "full sync"
            } else if feed.legacy && feed.legacy_due {
                "legacy send"
            } else if r.retries_due > 0 {
                "retry"
            } else {
                "partial sync"
            };
            log!(
                "cde: feed {} {op}: collected={} sent={} failed={} retries_due={} requests={} elapsed_ms={}",
                r.feed,
                r.collected,
                r.sent,
                r.failed,
                r.retries_due,
                r.requests,
                r.elapsed_ms
            );
        }
        if r.build_failures > 0 {
            warning!("cde: CDE-101 feed {}: {} documents could not be built; see cde_failed_items", r.feed, r.build_failures);
        }
        if let Some((code, error)) = &r.first_error {
            warning!("cde: {code} feed {}: {} items not delivered; first: {error}", r.feed, r.failed - r.build_failures);
        }
    }
    Own.run(|| Spi::run_with_args("SELECT pg_advisory_unlock($1)", &[ITERATION_LOCK.into()])).ok();
    more
}
