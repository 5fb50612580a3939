//! The background worker of one database, started by the launcher (launcher.rs) when cde is in
//! `shared_preload_libraries`.
//!
//! It sleeps on its latch, woken by any commit that recorded changes (see capture.rs) or after
//! `cde.poll_interval`, then runs one iteration over all feeds (engine.rs), committing after each
//! step. It ends when the extension is not (or no longer) there, reloads settings on SIGHUP,
//! stops on SIGTERM, and is restarted by the launcher if it dies or is terminated (see `leave`).

use crate::builder::Builders;
use crate::destination::{Destinations, DEFAULT};
use crate::engine::{self, Txn};
use crate::gucs::Settings;
use crate::housekeeping;
use crate::pump::{Heard, Pump};
use crate::shmem::{self, now_micros};
use crate::sync;
use pgrx::pg_sys::panic::CaughtError;
use std::collections::HashMap;
use pgrx::bgworkers::*;
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::locks::ITERATION as ITERATION_LOCK;

/// How long one feed may collect per iteration before it sends what it has and the worker moves
/// on to the next feed (and comes straight back): under a flood of changes, delivery keeps pace
/// and one busy feed does not starve the others.
const COLLECT_BUDGET: Duration = Duration::from_millis(300);

/// Time a feed's send pass may go on reading new slices, for the same reason.
const SEND_BUDGET: Duration = Duration::from_secs(1);

/// Shortest time between the starts of two iterations (see the loop).
const MIN_ITERATION_GAP: Duration = Duration::from_millis(20);

/// Longest a feed waits for the send passes of the feeds it depends on before it goes anyway.
const MAX_DEFER: Duration = Duration::from_secs(1);

/// The same while builders run a full sync and slices are out with the destinations: the main
/// thread then serves their passes (records, reads the next slice) rather than collect after
/// every builder step, which cost a full sync a sixth of its speed on two cores. Only then, and
/// only for the builders' wakes: with it whenever a slice was out, a single change waited for the
/// gap behind the sending of others (commit-to-sink p50 47 ms, p99 104 ms at 200 changes/s), and
/// during a full sync behind the builders (docs/benchmarks.md).
const BUSY_ITERATION_GAP: Duration = Duration::from_millis(100);

/// How often the worker looks for commits of changes during that gap.
const COMMITS_CHECK: Duration = Duration::from_millis(5);

/// Time given to full sync steps per iteration, before the feeds' own collect and send.
const SYNC_BUDGET: Duration = Duration::from_millis(500);

/// An idle worker gives the memory it freed back to the system at most this often (see
/// `give_back_free_memory`).
const TRIM_EVERY: Duration = Duration::from_secs(5);

/// A running full sync logs its progress at least this often.
const PROGRESS_LOG_EVERY: Duration = Duration::from_secs(10);

/// A fresh transaction per step, committed at its end.
///
/// After the commit, the step's table statistics go to the cumulative statistics (at most once a
/// second; PostgreSQL keeps the rest pending): a backend does it in its main loop, a background
/// worker must do it itself. Without it the worker's updates of feed tables and its deletes from
/// the queue were never counted, so autovacuum never saw their dead rows: a feed table only
/// delivering changes was never vacuumed (docs/benchmarks.md, "Decisions and their measurements").
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
pub extern "C-unwind" fn cde_worker_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let shared = &shmem::shared().expect("the cde worker runs only when cde is preloaded").slots[arg.value()];
    let db = shared.database.load(Ordering::Acquire);
    shared.exit.store(shmem::EXIT_RESTART, Ordering::Relaxed);
    announce(shared, shmem::STARTING);
    // However this process ends (an ERROR outside the boundaries, a FATAL, a signal), the status
    // must not say it runs.
    unsafe { pg_sys::before_shmem_exit(Some(on_exit), arg) };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);
    // A statement that needs the database free of cde (DROP DATABASE...) may have begun while
    // this worker connected: it is not waited for.
    if shmem::held(db) {
        leave_for(shared, shmem::EXIT_HELD);
    }
    let database = Own.run(crate::api::current_database);
    session_settings();
    let database_settings = Own.run(database_settings);

    let mut w = Worker::new(Own.run(Settings::read), shared);
    let mut more = true; // look for work at once after a (re)start
    let mut last_start = Instant::now();
    let mut commits_seen = shared.commits.load(Ordering::Acquire);
    let mut first = true;
    let mut trimmed = Instant::now();
    loop {
        if !more && w.pump.in_flight() == 0 && trimmed.elapsed() >= TRIM_EVERY {
            give_back_free_memory();
            trimmed = Instant::now();
        }
        // Woken by a commit (the latch), the poll interval, or a sender thread with a posted slice.
        let due = match if more { Woken::Due } else { wait(w.settings.poll_interval, w.pump.wake_fd()) } {
            Woken::Stop => break,
            Woken::Due => true,
            Woken::Slices => false,
        };
        let mut heard_more = false;
        if due {
            // Under a stream of commits the latch is set again before an iteration ends: leave a
            // short gap so that one iteration takes many changes at once instead of one each.
            // The slices that come back meanwhile are recorded, and their passes go on: a sender
            // never waits for the gap.
            // While builders run, the longer gap holds for their wakes, not for a commit that
            // queued changes (counted in `commits`): one arriving during the gap ends it.
            let busy = w.pump.in_flight() > 0 && w.builders.alive();
            loop {
                let changed = shared.commits.load(Ordering::Acquire) != commits_seen;
                let gap = if busy && !changed { BUSY_ITERATION_GAP } else { MIN_ITERATION_GAP };
                let Some(left) = (last_start + gap).checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                    break;
                };
                if w.pump.in_flight() == 0 {
                    std::thread::sleep(left.min(COMMITS_CHECK));
                } else if wait_for_slices(left.min(COMMITS_CHECK), w.pump.wake_fd()) {
                    heard_more |= w.hear();
                }
            }
            last_start = Instant::now();
            commits_seen = shared.commits.load(Ordering::Acquire);
        }
        if unsafe { pg_sys::ShutdownRequestPending } != 0 {
            break;
        }
        if shmem::held(db) {
            log!("cde: a statement needs database {database} without cde's processes; the worker stops until it is done");
            leave_for(shared, shmem::EXIT_HELD);
        }
        if BackgroundWorker::sighup_received() {
            unsafe {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            }
            // A database's own settings (ALTER DATABASE ... SET cde.*) are a session's from its
            // start: when they changed, a new worker takes them.
            if guarded(|| Own.run(self::database_settings)).is_ok_and(|now| now != database_settings) {
                log!("cde: the settings of database {database} changed; a new worker takes them");
                leave_for(shared, shmem::EXIT_RELOAD);
            }
            w.reload(Own.run(Settings::read));
            shared.reloads.fetch_add(1, Ordering::Relaxed);
            log!("cde: settings reloaded (endpoint {})", w.settings.endpoint.as_deref().unwrap_or("not set"));
        }
        // Slices the destinations' threads posted: recorded, and their passes go on.
        more = heard_more | w.hear();
        if w.settings.pause {
            shared.state.store(shmem::PAUSED, Ordering::Relaxed);
            w.unlock_if_idle();
            continue;
        }
        if (!due && !more) || (w.locked && shmem::lock_wanted()) {
            w.unlock_if_idle();
            publish(shared, &w);
            continue;
        }
        // One short transaction: is the extension there, at this library's version (a database
        // still on an older schema waits for ALTER EXTENSION cde UPDATE, untouched), and is no
        // cde_sync_now() iterating? The lock is kept while slices are in flight.
        let ready = guarded(|| {
            Own.run(|| {
                Spi::get_two_with_args::<bool, String>(
                    "SELECT CASE WHEN extversion = $2 THEN $3 OR pg_try_advisory_lock($1) ELSE false END, extversion
                       FROM pg_extension WHERE extname = 'cde'",
                    &[ITERATION_LOCK.into(), env!("CARGO_PKG_VERSION").into(), w.locked.into()],
                )
                .ok()
            })
        });
        let locked = match ready {
            Ok(Some((_, Some(version)))) if version != env!("CARGO_PKG_VERSION") => {
                if shared.state.swap(shmem::WAITING_FOR_UPDATE, Ordering::Relaxed) != shmem::WAITING_FOR_UPDATE {
                    warning!(
                        "cde: database {database} has cde {version} and the library is {}: the worker waits for ALTER EXTENSION cde UPDATE",
                        env!("CARGO_PKG_VERSION")
                    );
                }
                continue;
            }
            Ok(Some((locked, Some(_)))) => locked.unwrap_or(false),
            Ok(_) => {
                // Not installed (or dropped): this database costs nothing until CREATE EXTENSION
                // cde asks the launcher for a worker again.
                if first {
                    debug1!("cde: not installed in database {database}; no worker there until CREATE EXTENSION cde");
                } else {
                    log!("cde: extension dropped in database {database}; its worker stops");
                }
                leave_for(shared, shmem::EXIT_NOT_INSTALLED);
            }
            Err(e) => {
                warning!("cde: {STEP_FAILED} the worker's check for the extension failed, taken again: {e}");
                continue;
            }
        };
        if first {
            log!("cde: worker started in database {database}");
            first = false;
        }
        w.installed();
        if !locked {
            shared.state.store(shmem::IDLE, Ordering::Relaxed);
            continue; // cde_sync_now() is running an iteration; ours would find nothing to do
        }
        w.locked = true;
        shared.state.store(shmem::WORKING, Ordering::Relaxed);
        more |= w.iteration();
        shared.iterations.fetch_add(1, Ordering::Relaxed);
        shared.last_iteration_at.store(now_micros(), Ordering::Relaxed);
        w.unlock_if_idle();
        publish(shared, &w);
    }
    if w.pump.in_flight() > 0 {
        // Asked to stop while destinations are answering: not waited for.
        log!("cde: stopping with a request in flight; its items stay pending and go again");
    }
    leave(shared);
}

/// What the worker has done, for cde_worker_status: as soon as the outcomes are recorded.
fn publish_counters(shared: &shmem::WorkerShared, w: &Worker) {
    shared.docs_sent.store(w.pump.counters.docs_sent, Ordering::Relaxed);
    shared.requests.store(w.pump.counters.requests, Ordering::Relaxed);
    shared.requests_failed.store(w.pump.counters.requests_failed, Ordering::Relaxed);
    shared.bytes_sent.store(w.pump.bytes_sent.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// The counters, and the state once an iteration is over.
fn publish(shared: &shmem::WorkerShared, w: &Worker) {
    publish_counters(shared, w);
    // Requests out with a destination are work too.
    let state = if w.pump.in_flight() > 0 { shmem::WORKING } else { shmem::IDLE };
    shared.state.store(state, Ordering::Relaxed);
}

/// Give the heap's free memory back to the system, before the worker sleeps. glibc keeps what a
/// burst freed for the process to use again: after delivering a million changes the worker's
/// private memory stayed at 44 MB, against 19 MB before them, until trimmed (12 MB). A trim takes
/// a few milliseconds when tens of megabytes go back, microseconds when nothing does; only an
/// idle worker trims, at most every `TRIM_EVERY` (docs/benchmarks.md, "Decisions and their
/// measurements").
fn give_back_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        libc::malloc_trim(0);
    }
}

enum Woken {
    /// The latch (a commit, a signal) or the poll interval: an iteration is due.
    Due,
    /// Only a sender thread, with a posted slice.
    Slices,
    Stop,
}

/// Wait on the latch and the sender threads' pipe at once.
fn wait(timeout: Duration, fd: std::os::fd::RawFd) -> Woken {
    let events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_POSTMASTER_DEATH | pg_sys::WL_SOCKET_READABLE;
    let rc = unsafe {
        let rc = pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events as i32,
            fd,
            timeout.as_millis().min(i32::MAX as u128) as _,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
        pg_sys::check_for_interrupts!();
        rc
    };
    if rc & pg_sys::WL_POSTMASTER_DEATH as i32 != 0 || BackgroundWorker::sigterm_received() {
        Woken::Stop
    } else if rc & (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT) as i32 != 0 {
        Woken::Due
    } else {
        Woken::Slices
    }
}

/// Wait at most `timeout` for a sender thread to hand a slice back (the latch is left for the
/// main wait); true when one did.
fn wait_for_slices(timeout: Duration, fd: std::os::fd::RawFd) -> bool {
    let events = pg_sys::WL_TIMEOUT | pg_sys::WL_POSTMASTER_DEATH | pg_sys::WL_SOCKET_READABLE;
    let rc = unsafe {
        pg_sys::WaitLatchOrSocket(
            std::ptr::null_mut(),
            events as i32,
            fd,
            timeout.as_millis().clamp(1, i32::MAX as u128) as _,
            pg_sys::PG_WAIT_EXTENSION,
        )
    };
    if rc & pg_sys::WL_POSTMASTER_DEATH as i32 != 0 {
        crate::compat::proc_exit(1);
    }
    rc & pg_sys::WL_SOCKET_READABLE as i32 != 0
}

/// The database's own cde settings (ALTER DATABASE ... SET), as the worker's session took them.
fn database_settings() -> Vec<String> {
    Spi::get_one::<Vec<String>>(
        "SELECT coalesce(pg_catalog.array_agg(c ORDER BY c), '{}')
           FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) AS c
          WHERE s.setdatabase OPERATOR(pg_catalog.=) (SELECT oid FROM pg_catalog.pg_database WHERE datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
            AND s.setrole OPERATOR(pg_catalog.=) 0 AND c OPERATOR(pg_catalog.~) '^cde[.]'",
    )
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// The stable code of a worker step that raised an error (docs/operations.md, "Error codes").
const STEP_FAILED: &str = "CDE-301";

/// Run `f`, catching any ERROR it raises: the transaction it was in is rolled back (and with it
/// the user id, the settings and the SPI state it had changed), and the error comes back as its
/// message. The workers' error boundary: one failing step never ends the worker, and never stops
/// the other feeds.
pub fn guarded<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Ok(f())))
        .catch_others(|e| {
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(match &e {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r.message().to_string(),
                CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            })
        })
        .execute()
}

/// What the worker keeps from one iteration to the next.
struct Worker {
    /// This database's slot: the counters are published there as soon as outcomes are recorded.
    shared: &'static shmem::WorkerShared,
    settings: Settings,
    pump: Pump,
    destinations: Destinations,
    builders: Builders,
    /// Builders were started to plan a run: should they end with the run still unplanned (a
    /// transient error, say), the worker plans it, rather than start builders again at once.
    planning_handed: bool,
    last_progress_log: Instant,
    last_housekeeping: Option<Instant>,
    /// Destinations that answered as misconfigured (401, 404, TLS...) or gone (410): nothing is
    /// sent to them until then (a held one gets one request to see whether it was fixed). A
    /// reload releases them; so does cde_set_destination for a named one.
    held_until: HashMap<String, Instant>,
    /// Feeds whose iteration raised an error: how many times in a row, and when to try again.
    failing: HashMap<String, (u32, Instant)>,
    /// The destinations' holds were read from cde.destinations (see `installed`).
    hold_read: bool,
    /// A reload happened: release the holds in cde.destinations too, and read every destination again.
    release_pending: bool,
    /// The iteration lock is held: during an iteration, and while slices are in flight.
    locked: bool,
    /// A feed waited for a pass of a feed it depends on: look again when a pass ends.
    deferred: bool,
    /// Since when each feed waits for its dependencies' passes (at most `MAX_DEFER`).
    deferred_since: HashMap<String, Instant>,
    /// Feeds whose owner may no longer use their destination (logged once).
    refused: std::collections::HashSet<String>,
}

impl Worker {
    /// Nothing here reads schema cde: in a database where cde is not (yet) installed at this
    /// version, anyone with CREATE there could have put a `cde.destinations` of their own.
    fn new(settings: Settings, shared: &'static shmem::WorkerShared) -> Worker {
        Worker {
            shared,
            settings,
            pump: Pump::new(SEND_BUDGET),
            destinations: Destinations::default(),
            builders: Builders::default(),
            planning_handed: false,
            last_progress_log: Instant::now(),
            last_housekeeping: None,
            held_until: HashMap::new(),
            failing: HashMap::new(),
            hold_read: false,
            release_pending: false,
            locked: false,
            deferred: false,
            deferred_since: HashMap::new(),
            refused: Default::default(),
        }
    }

    /// Called once cde is known to be installed here at this version: a destination's hold
    /// outlives a restart (still at most one request per retry interval), and a reload releases
    /// the holds; the destinations are read (again).
    fn installed(&mut self) {
        if !self.hold_read {
            self.hold_read = true;
            let holds = guarded(|| {
                Own.run(|| {
                    Spi::connect(|c| {
                        let rows = c.select(
                            "SELECT name, extract(epoch FROM held_until - now())::float8 FROM cde.destinations WHERE held_until > now()",
                            None,
                            &[],
                        )?;
                        let mut out = Vec::new();
                        for r in rows {
                            out.push((r.get::<String>(1)?.unwrap_or_default(), r.get::<f64>(2)?.unwrap_or(0.0)));
                        }
                        Ok::<_, pgrx::spi::SpiError>(out)
                    })
                })
            });
            for (name, secs) in holds.ok().and_then(Result::ok).unwrap_or_default() {
                self.held_until.insert(name, Instant::now() + Duration::from_secs_f64(secs.max(0.0)));
            }
        }
        let reread = std::mem::take(&mut self.release_pending);
        if reread {
            let _ = guarded(|| Own.run(|| Spi::run("SELECT cde._release_destinations()")));
        }
        let settings = &self.settings;
        let destinations = &mut self.destinations;
        match guarded(|| Own.run(|| destinations.refresh(settings, reread))) {
            Ok(r) => {
                for name in r.set_again {
                    self.held_until.remove(&name);
                }
                for (name, problem) in r.problems {
                    warning!("cde: CDE-206 destination {name}: {problem}; nothing is sent to it until that is fixed (cde_set_destination, or a reload)");
                }
            }
            Err(e) => warning!("cde: {STEP_FAILED} reading the destinations failed, taken again: {e}"),
        }
    }

    /// New settings: a held destination may have been fixed (a new key, a new URL, a secret file
    /// replaced), so every destination is read again, its holds released (in the table once cde is
    /// known to be there), and the next iteration sends again.
    fn reload(&mut self, settings: Settings) {
        self.settings = settings;
        if !self.held_until.is_empty() {
            log!("cde: settings reloaded: held destinations are tried again");
        }
        self.held_until.clear();
        self.release_pending = true;
    }

    /// The iteration lock, released once no slice is in flight (cde_sync_now() and DROP
    /// EXTENSION wait for it).
    fn unlock_if_idle(&mut self) {
        if self.locked && self.pump.in_flight() == 0 {
            let _ = guarded(|| Own.run(|| Spi::run_with_args("SELECT pg_advisory_unlock($1)", &[ITERATION_LOCK.into()])));
            self.locked = false;
        }
    }

    /// Record every slice the destinations' threads have posted, without waiting; true when a
    /// pass ended with more to send.
    fn hear(&mut self) -> bool {
        // A session waits for the iteration lock, or a pause began: nothing new is read, what is
        // out comes back and is recorded, then the lock goes.
        self.pump.stop_reading = self.settings.pause || shmem::lock_wanted();
        self.pump.drain_wakes();
        let mut more = false;
        while let Some(done) = self.pump.next(Duration::ZERO) {
            let feed = done.feed.clone();
            let pump = &mut self.pump;
            match guarded(|| pump.finish(&Own, done)) {
                Ok(Some(heard)) => more |= self.heard(heard),
                Ok(None) => {}
                Err(e) => self.feed_failed(&feed, &e),
            }
        }
        publish_counters(self.shared, self);
        more
    }

    fn heard(&mut self, heard: Heard) -> bool {
        self.destination_answered(&heard);
        let Some(r) = &heard.ended else { return false };
        report(&heard.feed, r);
        r.more || self.deferred
    }

    /// One iteration over all feeds, holding the iteration lock; true when there is more to do
    /// right away. Each step runs inside the error boundary. Sending goes on after it returns.
    fn iteration(&mut self) -> bool {
        // Full sync first. While builders run, they take the steps (and wake us after each) and
        // this iteration only sends. Otherwise one step; if there is building to do, builders
        // take over, or without any this worker builds for a bounded time, so that partial sync
        // keeps flowing meanwhile.
        let mut more = false;
        if !self.builders.alive() {
            // A run about to be planned: counting its sources takes a while (a third of a
            // second per million rows), during which this worker would collect nothing. Builders
            // plan it, as they take any step, and wake the worker when they made progress. If
            // none can start, or they ended with the run still unplanned, this worker plans it.
            let handed = std::mem::take(&mut self.planning_handed);
            let mut taken = guarded(|| Own.run(if handed { sync::step } else { sync::step_unless_planning }));
            if let Ok(sync::Step::Planning) = taken {
                self.planning_handed = self.builders.start(self.settings.sync_builders);
                if !self.planning_handed {
                    taken = guarded(|| Own.run(sync::step));
                }
            }
            match taken {
                Ok(sync::Step::Progress) => {
                    more = true;
                    if !self.builders.start(self.settings.sync_builders) {
                        let budget_step = || guarded(|| Own.run(sync::step)).unwrap_or(sync::Step::Retry);
                        sync::advance(&budget_step, SYNC_BUDGET);
                    }
                }
                Ok(_) => {}
                Err(e) => warning!("cde: {STEP_FAILED} a full sync step failed and was rolled back, taken again later: {e}"),
            }
        }
        if self.last_progress_log.elapsed() >= PROGRESS_LOG_EVERY {
            if let Ok(Some(line)) = guarded(|| Own.run(sync::progress_line)) {
                log!("{line}");
            }
            self.last_progress_log = Instant::now();
        }
        if self.last_housekeeping.is_none_or(|at| at.elapsed() >= housekeeping::EVERY) {
            if let Err(e) = guarded(|| Own.run(housekeeping::run)) {
                warning!("cde: {STEP_FAILED} housekeeping failed and was rolled back, taken again later: {e}");
            }
            self.last_housekeeping = Some(Instant::now());
        }
        let feeds = match guarded(|| Own.run(|| engine::load_feeds(None, self.settings.legacy_interval.as_millis(), None))) {
            Ok(feeds) => feeds,
            Err(e) => {
                warning!("cde: {STEP_FAILED} reading the feeds failed, taken again: {e}");
                Vec::new()
            }
        };
        self.deferred = false;
        for feed in &feeds {
            more |= self.hear();
            if self.failing.get(&feed.name).is_some_and(|(_, again)| Instant::now() < *again) {
                continue; // backing off alone
            }
            let dest = self.sends_to(feed);
            // Waits for the changes still queued for the feeds it depends on, as for their passes
            // (sends_to), and as long; not for one backing off after a failure, which collects
            // nothing meanwhile (its failure must not slow this feed down).
            let waits = self.deferred_since.get(&feed.name).is_none_or(|since| since.elapsed() < MAX_DEFER);
            let defer_to: Vec<String> = if waits {
                feed.depends_on.iter().filter(|d| !self.failing.contains_key(*d)).cloned().collect()
            } else {
                Vec::new()
            };
            let r = guarded(|| engine::feed_iteration(&Own, feed, false, dest.as_deref(), COLLECT_BUDGET, &defer_to));
            match r {
                Ok((r, first)) => {
                    self.failing.remove(&feed.name);
                    more |= r.more;
                    if r.deferred {
                        self.deferred_since.entry(feed.name.clone()).or_insert_with(Instant::now);
                        self.deferred = true;
                    } else if !feed.depends_on.iter().any(|d| self.pump.busy(d)) {
                        self.deferred_since.remove(&feed.name);
                    }
                    match (first, dest) {
                        (Some(first), Some(dest)) => {
                            let pump = &mut self.pump;
                            if let Err(e) = guarded(|| pump.start(&Own, feed, dest, first, r)) {
                                self.feed_failed(&feed.name, &e);
                            }
                        }
                        _ => report(feed, &r),
                    }
                }
                Err(e) => self.feed_failed(&feed.name, &e),
            }
        }
        more | self.hear()
    }

    /// Where this iteration sends the feed, if it sends it: its destination, unless that may not
    /// be sent to now (no endpoint, a secret file unreadable, disabled, held), a pass of the feed
    /// is under way, a feed it depends on has a pass under way (dependency order, across
    /// destinations too: it goes once that pass is back), or its owner may no longer use it.
    fn sends_to(&mut self, feed: &engine::FeedInfo) -> Option<std::sync::Arc<crate::destination::Destination>> {
        if self.pump.busy(&feed.name) {
            return None;
        }
        if feed.depends_on.iter().any(|d| self.pump.busy(d)) {
            // Waits for them, but not for ever: under a stream of writes to a feed it depends on,
            // there is always a pass of that feed under way.
            let since = *self.deferred_since.entry(feed.name.clone()).or_insert_with(Instant::now);
            if since.elapsed() < MAX_DEFER {
                self.deferred = true;
                return None;
            }
        }
        if !feed.allowed {
            let why = format!("destination {} does not let role {} use it (option roles)", feed.destination, feed.owner);
            if self.refused.insert(feed.name.clone()) {
                warning!("cde: CDE-209 feed {}: {why}; its documents are kept, not sent", feed.name);
                let _ = guarded(|| {
                    Own.run(|| {
                        Spi::run_with_args(
                            "UPDATE cde.feeds SET last_error = $2, last_error_at = now() WHERE name = $1",
                            &[feed.name.as_str().into(), why.as_str().into()],
                        )
                    })
                });
            }
            return None;
        }
        self.refused.remove(&feed.name);
        let d = self.destinations.get(&feed.destination).filter(|d| d.sendable())?;
        match self.held_until.get(&d.name) {
            Some(until) if Instant::now() < *until => None,
            Some(_) => {
                // The hold is over: this feed's pass is the one request that looks whether the
                // destination was fixed; the others wait for its answer.
                self.held_until.insert(d.name.clone(), Instant::now() + self.settings.retry_interval);
                Some(d)
            }
            None => Some(d),
        }
    }

    /// What a posted slice says of its destination: misconfigured (hold it, logged once per
    /// reason), gone (410: disable it), or taking requests again after a hold (release it).
    fn destination_answered(&mut self, heard: &Heard) {
        let name = heard.destination.name.as_str();
        if let Some((status, _, error)) = &heard.misconfigured {
            let interval = self.settings.retry_interval;
            if *status == Some(410) {
                // Gone for good: no request at all until it is set again (a reload for default).
                self.held_until.insert(name.to_string(), Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600));
                let fresh = guarded(|| {
                    Own.run(|| Spi::get_one_with_args::<bool>("SELECT cde._disable_destination($1, $2)", &[name.into(), error.as_str().into()]))
                });
                if matches!(fresh, Ok(Ok(Some(true))) | Err(_)) {
                    let how = if name == DEFAULT { "a reload of the settings" } else { "cde_set_destination" };
                    warning!("cde: {GONE} destination {name} is gone: {error}; it is disabled, nothing more is sent to it until {how}");
                }
                return;
            }
            self.held_until.insert(name.to_string(), Instant::now() + interval);
            let fresh = guarded(|| {
                Own.run(|| {
                    Spi::get_one_with_args::<bool>(
                        "SELECT cde._hold_destination($1, $2, $3, make_interval(secs => $4))",
                        &[name.into(), status.map(i32::from).into(), error.as_str().into(), interval.as_secs_f64().into()],
                    )
                })
            });
            if matches!(fresh, Ok(Ok(Some(true))) | Err(_)) {
                warning!(
                    "cde: {} the endpoint is misconfigured: {error}; nothing is rejected, delivery to destination {name} is held and tried again every cde.retry_interval ({}s) or at the next reload",
                    cde_protocol::ItemOutcome::MISCONFIGURED_CODE,
                    interval.as_secs()
                );
            }
        } else if heard.answered && self.held_until.remove(name).is_some() {
            let _ = guarded(|| Own.run(|| Spi::run_with_args("SELECT cde._release_destination($1)", &[name.into()])));
            log!("cde: destination {name} takes requests again; delivery resumes");
        }
    }

    /// A feed's iteration raised an error, rolled back: recorded on the feed and logged, and the
    /// feed backs off alone (1 s, doubling, at most cde.retry_interval) while the others go on.
    fn feed_failed(&mut self, feed: &str, error: &str) {
        let failures = self.failing.get(feed).map_or(0, |f| f.0) + 1;
        let backoff = Duration::from_secs(1u64 << (failures - 1).min(16)).min(self.settings.retry_interval.max(Duration::from_secs(1)));
        self.failing.insert(feed.to_string(), (failures, Instant::now() + backoff));
        warning!("cde: {STEP_FAILED} feed {feed}: a step failed and was rolled back ({failures} in a row), tried again in {}s: {error}", backoff.as_secs());
        let _ = guarded(|| {
            Own.run(|| {
                Spi::run_with_args(
                    "UPDATE cde.feeds SET last_error = $2, last_error_at = now() WHERE name = $1",
                    &[feed.into(), format!("step failed: {error}").into()],
                )
            })
        });
    }
}

/// The stable code of a destination disabled by 410 Gone.
const GONE: &str = "CDE-208";

/// The log lines of one feed's iteration.
fn report(feed: &engine::FeedInfo, r: &engine::FeedReport) {
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

/// Stop on SIGTERM (a shutdown, pg_terminate_backend): the launcher starts another worker a
/// moment later unless the server is shutting down. To stop delivery on purpose there is
/// `cde.pause`. Never returns.
fn leave(shared: &shmem::WorkerShared) -> ! {
    log!("cde: worker stopped");
    // Stopped for a statement that needs the database (databases.rs): back once it is done.
    let held = shmem::held(shared.database.load(Ordering::Acquire));
    leave_for(shared, if held { shmem::EXIT_HELD } else { shmem::EXIT_RESTART })
}

/// End, telling the launcher why (`shmem::EXIT_*`), with no latch left to set and the state
/// `stopped`. The postmaster never restarts a dynamic worker: the launcher decides.
fn leave_for(shared: &shmem::WorkerShared, why: i32) -> ! {
    shared.exit.store(why, Ordering::Release);
    shared.latch.store(0, Ordering::Release);
    shared.state.store(shmem::STOPPED, Ordering::Relaxed);
    crate::compat::proc_exit(0)
}

/// Asked to stop (SIGTERM: a fast shutdown, pg_terminate_backend) while waiting for the endpoint:
/// leave now rather than after up to `cde.http_timeout`. Called only where no transaction is
/// open and nothing is half-recorded; the items in flight stay pending and are sent again, with
/// the same Idempotency-Key. Other processes (a backend running cde_sync_now()) are left alone.
pub fn stop_now_if_asked() {
    let asked = unsafe { crate::compat::is_background_worker() && pg_sys::ShutdownRequestPending != 0 };
    let mine = shmem::worker().filter(|w| w.pid.load(Ordering::Relaxed) == unsafe { pg_sys::MyProcPid });
    if let (true, Some(shared)) = (asked, mine) {
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
        // A database's (or role's) "role" setting would make the session another role: none.
        Spi::run("SET ROLE NONE")?;
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

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: i32, arg: pg_sys::Datum) {
    if let Some(s) = shmem::shared() {
        let shared = &s.slots[arg.value()];
        if shared.pid.load(Ordering::Relaxed) == unsafe { pg_sys::MyProcPid } {
            shared.latch.store(0, Ordering::Release);
            shared.state.store(shmem::STOPPED, Ordering::Relaxed);
            shared.pid.store(0, Ordering::Release);
        }
    }
}

fn announce(shared: &shmem::WorkerShared, state: i32) {
    shared.pid.store(unsafe { pg_sys::MyProcPid }, Ordering::Relaxed);
    shared.started_at.store(now_micros(), Ordering::Relaxed);
    shared.latch.store(unsafe { pg_sys::MyLatch } as u64, Ordering::Release);
    shared.state.store(state, Ordering::Relaxed);
}
