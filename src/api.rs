//! SQL functions written in Rust: the ones that send over HTTP or read shared memory. Everything
//! else in the SQL API is plain SQL in `sql/`.

use crate::destination::Destinations;
use crate::engine::{self, Inline, Txn};
use crate::gucs::Settings;
use crate::pump::Pump;
use crate::shmem;
use crate::sync;
use std::collections::{HashMap, HashSet};
use pgrx::prelude::*;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Run one iteration in this session: collect, then send (legacy feeds too), for every feed in
/// dependency order or for one feed. Works without the background worker, e.g. from pg_cron.
/// SECURITY DEFINER (sql/views.sql): called by a delegated admin, it takes only the feeds that
/// role may manage.
#[pg_extern(volatile, parallel_unsafe, requires = [trust::cde::_ticket, trust::cde::_redeem])]
fn cde_sync_now(
    feed: default!(Option<&str>, "NULL"),
    ticket: default!(Option<i64>, "cde._ticket()"),
) -> TableIterator<'static, (name!(feed, String), name!(collected, i64), name!(sent, i64), name!(failed, i64))> {
    // Who calls (src/trust.rs, tickets): SECURITY DEFINER hides it.
    let caller = Spi::get_one_with_args::<pg_sys::Oid>("SELECT cde._redeem($1)", &[ticket.into()])
        .unwrap_or_else(|e| error!("{e}"))
        .unwrap_or_else(|| error!("cde: no caller"));
    if let Some(f) = feed {
        Spi::run_with_args("SELECT cde._managed_feed($1, $2::oid::regrole)", &[f.into(), caller.into()])
            .unwrap_or_else(|e| error!("{e}"));
    }
    read_committed_only("cde_sync_now", "this transaction", unsafe { pg_sys::XactIsoLevel });
    // Wait for the worker's iteration, if one runs, rather than racing it on the same rows.
    cde::_hold_iteration_lock();
    let settings = Settings::read();
    let feeds = engine::load_feeds(feed, settings.legacy_interval.as_millis(), Some(caller));
    let totals = until_done(&Inline, &settings, &feeds, Duration::MAX, Duration::MAX);
    let rows: Vec<(String, i64, i64, i64)> = feeds.iter().zip(totals).map(|(f, t)| (f.name.clone(), t.0, t.1, t.2)).collect();
    TableIterator::new(rows)
}

/// A collect and a full sync step each read in their own statement's snapshot, taken after their
/// locks (docs/nothing-lost.md); a REPEATABLE READ or SERIALIZABLE transaction's one snapshot is
/// older than the locks, and would miss what a concurrent step wrote. Refused, rather than run.
/// `level` is the transaction's (`cde_sync_now`), or the higher of it and the session's default,
/// which each of `cde_deliver`'s later steps takes; `whose` says which.
fn read_committed_only(what: &str, whose: &str, level: i32) {
    if level <= pg_sys::XACT_READ_COMMITTED as i32 {
        return;
    }
    let name = if level == pg_sys::XACT_SERIALIZABLE as i32 { "SERIALIZABLE" } else { "REPEATABLE READ" };
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_STATE,
        format!("{what}: runs only at READ COMMITTED; {whose} is {name}"),
        pgrx::function_name!(),
    )
    .set_hint(
        "Call it in a transaction of its own with default_transaction_isolation = 'read committed' (SET it first, or ALTER ROLE ... SET it for a pg_cron job's role).",
    )
    .report(PgLogLevel::ERROR);
}

/// The worker's job in this session, through `tx`, until nothing is left: collect, due retries,
/// send (legacy feeds too), and advance full sync runs (a collect may also start one, after a
/// TRUNCATE); again while any of it made progress. Each destination is sent to by its own thread,
/// as in the worker. A misconfigured destination (401, 404, TLS...) gets nothing more for the rest
/// of the call. Returns (collected, sent, failed) per feed.
fn until_done(
    tx: &impl Txn,
    settings: &Settings,
    feeds: &[engine::FeedInfo],
    collect_budget: Duration,
    send_budget: Duration,
) -> Vec<(i64, i64, i64)> {
    let mut pump = Pump::new(send_budget);
    let mut destinations = Destinations::default();
    for (name, problem) in tx.run(|| destinations.refresh(settings, true)).problems {
        if feeds.iter().any(|f| f.destination == name) {
            pgrx::warning!("cde: CDE-206 destination {name}: {problem}; nothing is sent to it");
        }
    }
    let index: HashMap<&str, usize> = feeds.iter().enumerate().map(|(i, f)| (f.name.as_str(), i)).collect();
    let mut totals = vec![(0, 0, 0); feeds.len()];
    let mut held: HashSet<String> = HashSet::new();
    let mut waited: HashSet<String> = HashSet::new();
    let advance = || sync::advance(&|| tx.run(sync::step), Duration::from_secs(24 * 3600));
    advance();
    loop {
        let mut more = false;
        let mut add = |r: &engine::FeedReport, more: &mut bool| {
            let t = &mut totals[index[r.feed.as_str()]];
            *t = (t.0 + r.collected, t.1 + r.sent, t.2 + r.failed);
            *more |= r.more || r.deferred;
        };
        for f in feeds {
            // As the worker decides (src/worker.rs, sends_to): a feed whose dependency has a pass
            // under way goes in the next round.
            let deferred = f.depends_on.iter().any(|d| pump.busy(d));
            more |= deferred;
            if !f.allowed {
                pgrx::warning!("cde: CDE-209 feed {}: destination {} does not let role {} use it (option roles)", f.name, f.destination, f.owner);
            }
            let dest = destinations
                .get(&f.destination)
                .filter(|d| d.sendable() && !held.contains(&d.name) && f.allowed && !deferred && !pump.busy(&f.name));
            // A feed whose dependencies of this call still have changes queued (a commit landed
            // between their step and this one) waits for the next round, once: the call must end
            // under a stream of writes, and a dependency outside the call is not collected here.
            let defer_to: Vec<String> = if waited.contains(&f.name) {
                Vec::new()
            } else {
                f.depends_on.iter().filter(|d| index.contains_key(d.as_str())).cloned().collect()
            };
            let (r, first) = engine::feed_iteration(tx, f, true, dest.as_deref(), collect_budget, &defer_to);
            if r.deferred {
                waited.insert(f.name.clone());
            }
            match (first, dest) {
                (Some(first), Some(dest)) => pump.start(tx, f, dest, first, r),
                _ => add(&r, &mut more),
            }
        }
        while pump.in_flight() > 0 {
            // Waiting for the endpoints with no transaction open: a worker asked to stop leaves.
            let Some(done) = pump.next(Duration::from_millis(100)) else {
                crate::worker::stop_now_if_asked();
                continue;
            };
            let Some(heard) = pump.finish(tx, done) else { continue };
            if let Some((_, _, error)) = &heard.misconfigured {
                if held.insert(heard.destination.name.clone()) {
                    pgrx::warning!(
                        "cde: {} destination {}: the endpoint is misconfigured: {error}",
                        cde_protocol::ItemOutcome::MISCONFIGURED_CODE,
                        heard.destination.name
                    );
                }
            }
            if let Some(r) = &heard.ended {
                add(r, &mut more);
            }
        }
        if !advance() && !more {
            break totals;
        }
    }
}

#[pg_schema]
mod cde {
    use super::*;

    /// Wait for the worker's current iteration to end, and keep it from starting another until
    /// this transaction ends. cde_sync_now() uses it; so does DROP EXTENSION (an event trigger in
    /// sql/capture.sql), which would otherwise lock cde's tables in another order than a running
    /// iteration and may deadlock with it.
    #[pg_extern(volatile, parallel_unsafe)]
    pub(super) fn _hold_iteration_lock() {
        crate::locks::take_iteration_lock(false);
    }

    /// This database's worker, from shared memory; one row, all NULL but `running` and `state`
    /// when no worker serves this database (`state` says why).
    #[pg_extern(volatile, parallel_safe)]
    fn _worker_status() -> TableIterator<
        'static,
        (
            name!(running, bool),
            name!(pid, Option<i32>),
            name!(state, String),
            name!(started_at, Option<TimestampWithTimeZone>),
            name!(last_iteration_at, Option<TimestampWithTimeZone>),
            name!(iterations, i64),
            name!(documents_sent, i64),
            name!(bytes_sent, i64),
            name!(requests, i64),
            name!(requests_failed, i64),
            name!(reloads, i64),
            name!(sync_builders, i32),
            name!(sync_builders_wanted, i32),
        ),
    > {
        let idle = |state: String| (false, None, state, None, None, 0, 0, 0, 0, 0, 0, 0, 0);
        let shared = shmem::shared();
        // A standby in recovery writes nothing: no worker runs there until it is promoted.
        let row = if shared.is_some() && unsafe { pg_sys::RecoveryInProgress() } {
            idle("standby: this server is a replica in recovery; the primary's worker delivers, this one starts at promotion".into())
        } else if let Some(w) = shmem::worker() {
            let state = w.state.load(Ordering::Relaxed);
            let pid = w.pid.load(Ordering::Relaxed);
            let running = state != shmem::STOPPED && pid != 0 && w.latch.load(Ordering::Relaxed) != 0;
            let builders = w.builders.iter().filter(|b| b.load(Ordering::Relaxed) != 0).count() as i32;
            (
                running,
                (pid != 0).then_some(pid),
                shmem::state_name(state).to_string(),
                ts(w.started_at.load(Ordering::Relaxed)),
                ts(w.last_iteration_at.load(Ordering::Relaxed)),
                w.iterations.load(Ordering::Relaxed) as i64,
                (w.docs_sent.load(Ordering::Relaxed) + w.builders_docs_sent.load(Ordering::Relaxed)) as i64,
                (w.bytes_sent.load(Ordering::Relaxed) + w.builders_bytes_sent.load(Ordering::Relaxed)) as i64,
                (w.requests.load(Ordering::Relaxed) + w.builders_requests.load(Ordering::Relaxed)) as i64,
                (w.requests_failed.load(Ordering::Relaxed) + w.builders_requests_failed.load(Ordering::Relaxed)) as i64,
                w.reloads.load(Ordering::Relaxed) as i64,
                builders,
                w.builders_wanted.load(Ordering::Relaxed) as i32,
            )
        } else {
            idle(match shared {
                None => "not running: add cde to shared_preload_libraries and restart".into(),
                Some(s) if s.launcher_pid.load(Ordering::Relaxed) == 0 => "not running: the cde launcher is not running (see the server log)".into(),
                Some(_) => match crate::gucs::databases() {
                    Some(names) if !names.iter().any(|n| *n == current_database()) => format!(
                        "not served: cde.database ({}) does not name this database; empty, it serves every database where cde is installed",
                        names.join(", ")
                    ),
                    _ => "starting: the launcher starts this database's worker".into(),
                },
            })
        };
        TableIterator::once(row)
    }

    /// Called by the install script: at commit, the launcher starts this database's worker.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _serve() {
        crate::capture::serve_at_commit();
    }
}

/// This session's database's name (in a transaction: it reads the catalog).
pub fn current_database() -> String {
    unsafe { std::ffi::CStr::from_ptr(pg_sys::get_database_name(pg_sys::MyDatabaseId)) }.to_string_lossy().into_owned()
}

fn ts(micros: i64) -> Option<TimestampWithTimeZone> {
    if micros == 0 {
        return None;
    }
    // PostgreSQL timestamps count from 2000-01-01.
    const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
    TimestampWithTimeZone::try_from(micros - PG_EPOCH_OFFSET_MICROS).ok()
}

/// `CALL cde_deliver(feed text DEFAULT NULL)` (sql/views.sql): what the worker does, in the
/// calling session, until nothing is left to do, committing after every step (a collect, a read, a
/// record, a full sync step). No transaction spans two steps: what was delivered stays recorded
/// whatever fails later, and every other session sees the progress as it is made. For pg_cron and
/// setups without the worker. A procedure that commits may not be SECURITY DEFINER: each step runs
/// as the extension's owner ([`crate::trust::as_extension_owner`]), for the feeds the caller may
/// manage.
#[unsafe(no_mangle)]
pub extern "C" fn pg_finfo_cde_deliver() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn cde_deliver(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    unsafe {
        let ctx = (*fcinfo).context;
        let nonatomic = !ctx.is_null()
            && (*ctx).type_ == pg_sys::NodeTag::T_CallContext
            && !(*(ctx as *mut pg_sys::CallContext)).atomic;
        if !nonatomic {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INVALID_TRANSACTION_TERMINATION,
                "cde_deliver() commits after every step: CALL it on its own, not inside a transaction block or a function",
                "In a transaction, SELECT * FROM cde_sync_now() does one iteration inside it."
            );
        }
        // Each step's transaction after the first takes the session's default.
        read_committed_only(
            "cde_deliver",
            "this transaction or default_transaction_isolation (each later step's)",
            pg_sys::XactIsoLevel.max(pg_sys::DefaultXactIsoLevel),
        );
        let feed: Option<String> = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 0).map(String::from);
        if pg_sys::InSecurityRestrictedOperation() {
            error!("cde: cde_deliver() cannot be called from a security-restricted operation");
        }
        // A procedure is not SECURITY DEFINER: the current user is the caller.
        let caller = pg_sys::GetUserId();
        if pg_sys::SPI_connect_ext(pg_sys::SPI_OPT_NONATOMIC as i32) != pg_sys::SPI_OK_CONNECT as i32 {
            error!("cde_deliver: SPI_connect failed");
        }
        let owner = Spi::get_one::<pg_sys::Oid>(
            "SELECT extowner FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'cde'::pg_catalog.name",
        )
            .ok()
            .flatten()
            .unwrap_or_else(|| error!("cde_deliver: the extension is not installed in this database"));
        let tx = Committing { owner };
        // The iteration lock for the whole call, not only each step: rows this call has out for
        // delivery between two steps are no other sender's to read (the worker waits, and
        // resumes when the call ends). A session lock outlives an ERROR: released in any case.
        tx.run(|| crate::locks::take_iteration_lock(true));
        PgTryBuilder::new(|| {
            // In the extension owner's step (pinned search_path): the key's source is asked in SQL.
            let settings = tx.run(Settings::read);
            let feeds = tx.run(|| {
                if let Some(f) = &feed {
                    Spi::run_with_args("SELECT cde._managed_feed($1, $2::oid::regrole)", &[f.as_str().into(), caller.into()])
                        .unwrap_or_else(|e| error!("{e}"));
                }
                engine::load_feeds(feed.as_deref(), settings.legacy_interval.as_millis(), Some(caller))
            });
            let totals = until_done(&tx, &settings, &feeds, Duration::from_millis(300), Duration::from_secs(1));
            tx.run(crate::housekeeping::run);
            for (f, t) in feeds.iter().zip(totals) {
                pgrx::notice!("cde: feed {}: collected={} sent={} failed={}", f.name, t.0, t.1, t.2);
            }
        })
        .finally(|| {
            crate::locks::release_iteration_session_lock();
        })
        .execute();
        pg_sys::SPI_finish();
        pg_sys::Datum::from(0usize)
    }
}

/// A step in its own transaction, committed at its end, as the extension's owner, holding the
/// iteration lock for its duration (the worker and this procedure then take turns by step).
struct Committing {
    owner: pg_sys::Oid,
}

impl engine::Txn for Committing {
    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        let r = crate::trust::as_extension_owner(self.owner, || {
            crate::locks::take_iteration_lock(false);
            f()
        });
        unsafe { pg_sys::SPI_commit() };
        r
    }
}
