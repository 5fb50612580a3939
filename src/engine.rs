//! One iteration over the feeds, shared by the background worker and `cde_sync_now()`.
//!
//! Feeds are taken in dependency order. Each is collected (queue -> feed table); due retries are
//! put back in line; then immediate feeds send their pending rows, and legacy feeds do so only when
//! their pass is due. The caller decides what a transaction is: the worker commits after every
//! step so that no HTTP request runs inside an open transaction; `cde_sync_now()` runs in the
//! caller's transaction.

use crate::collect;
use crate::deliver::{self, Pending};
use crate::destination::Destination;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// Runs a step "in a transaction": a fresh one for the worker, the caller's for sync_now.
pub trait Txn {
    fn run<R>(&self, f: impl FnOnce() -> R) -> R;
}

/// The caller's transaction, as it is.
pub struct Inline;
impl Txn for Inline {
    fn run<R>(&self, f: impl FnOnce() -> R) -> R {
        f()
    }
}

#[derive(Debug, Clone)]
pub struct FeedInfo {
    pub name: String,
    pub feed_table: String,
    pub legacy: bool,
    pub batch_size: Option<i32>,
    /// Where its documents go (`default`: cde.endpoint).
    pub destination: String,
    /// Its owner may use that destination (its option roles; checked every iteration, so that a
    /// role taken out of them stops sending at once).
    pub allowed: bool,
    pub owner: String,
    pub depends_on: Vec<String>,
    /// For legacy feeds: the legacy pass is due.
    pub legacy_due: bool,
    /// A full sync phase of this feed waits for its items to be sent: send now, whatever the mode.
    pub full_sync_sending: bool,
}

#[derive(Debug, Default, Clone)]
pub struct FeedReport {
    pub feed: String,
    pub collected: i64,
    pub sent: i64,
    pub failed: i64,
    pub retries_due: i64,
    pub requests: u64,
    pub elapsed_ms: u128,
    /// Collecting stopped at its time budget with more queued: call again soon.
    pub more: bool,
    /// Changes of a feed it depends on were still queued: no pass began, call again soon.
    pub deferred: bool,
    /// Documents that could not be built this iteration (CDE-101).
    pub build_failures: i64,
    /// The first delivery failure, with its code.
    pub first_error: Option<(&'static str, String)>,
}

/// The feeds to iterate over: all, or `only`; with a `caller` (cde_sync_now(), cde_deliver()), the
/// ones that role may manage.
pub fn load_feeds(only: Option<&str>, legacy_interval_ms: u128, caller: Option<pg_sys::Oid>) -> Vec<FeedInfo> {
    let q = "SELECT f.name, f.feed_table::text, f.mode = 'legacy', f.batch_size, coalesce(f.destination, 'default'),
                    cde._may_use_destination(f.owner, f.destination), f.owner::text, f.depends_on,
                    f.last_legacy_send_at IS NULL
                    OR f.last_legacy_send_at + make_interval(secs => $2::float8 / 1000) <= now(),
                    EXISTS (SELECT 1 FROM cde.sync_phases p JOIN cde.sync_runs r ON r.id = p.run_id
                             WHERE p.feed = f.name AND p.status = 'sending' AND r.status = 'executing')
               FROM cde._feeds_in_order() o JOIN cde.feeds f USING (name)
              WHERE ($1::text IS NULL OR f.name = $1) AND cde._manages(f.owner, $3::oid::regrole)
              ORDER BY o.depth, o.name";
    Spi::connect(|c| {
        let rows = c.select(q, None, &[only.into(), (legacy_interval_ms as i64).into(), caller.into()])?;
        let mut out = Vec::new();
        for r in rows {
            out.push(FeedInfo {
                name: r.get::<String>(1)?.unwrap_or_default(),
                feed_table: r.get::<String>(2)?.unwrap_or_default(),
                legacy: r.get::<bool>(3)?.unwrap_or(false),
                batch_size: r.get::<i32>(4)?,
                destination: r.get::<String>(5)?.unwrap_or_else(|| crate::destination::DEFAULT.into()),
                allowed: r.get::<bool>(6)?.unwrap_or(false),
                owner: r.get::<String>(7)?.unwrap_or_default(),
                depends_on: r.get::<Vec<String>>(8)?.unwrap_or_default(),
                legacy_due: r.get::<bool>(9)?.unwrap_or(true),
                full_sync_sending: r.get::<bool>(10)?.unwrap_or(false),
            });
        }
        Ok::<_, pgrx::spi::SpiError>(out)
    })
    .unwrap_or_else(|e| error!("cde: cannot read feeds: {e}"))
}

/// One iteration for one feed: collect what is queued, put due retries back in line, and read
/// the first pending slice when the feed sends now to `dest` (None: its destination may not be
/// sent to now, or a pass of the feed is under way; the feed still collects). `force_send` sends
/// legacy feeds regardless of their pass. The slice goes to the pump (src/pump.rs).
pub fn feed_iteration(
    tx: &impl Txn,
    feed: &FeedInfo,
    force_send: bool,
    dest: Option<&Destination>,
    collect_budget: Duration,
    defer_to: &[String],
) -> (FeedReport, Option<Pending>) {
    let started = Instant::now();
    let mut report = FeedReport { feed: feed.name.clone(), ..Default::default() };

    let send = !feed.legacy || feed.legacy_due || feed.full_sync_sending || force_send;
    let sending = dest.filter(|_| send);
    // Collect what is queued, put due retries back in line, and read the first pending slice, in
    // one transaction: for a quiet feed, that one transaction is the whole iteration.
    let first = loop {
        let last_round = started.elapsed() >= collect_budget;
        let (c, tail) = tx.run(|| {
            let c = collect::collect(&feed.name);
            let tail = (c.drained == 0 || last_round).then(|| {
                let due = collect::retry_due(&feed.name);
                // A write committed since those feeds collected, and seen by this collect, may
                // have queued both a category and the products that name it: the category goes
                // first. Asked after collecting, so that no such write can slip in between.
                let deferred = sending.is_some() && !defer_to.is_empty() && collect::queued(defer_to);
                let pending = sending
                    .filter(|_| !deferred)
                    .map(|d| deliver::read_pending(feed, deliver::read_limit(d, feed), &deliver::Cursor::default()));
                if sending.is_some() && feed.legacy && (feed.legacy_due || force_send) {
                    Spi::run_with_args("UPDATE cde.feeds SET last_legacy_send_at = now() WHERE name = $1", &[feed.name.as_str().into()])
                        .unwrap_or_else(|e| error!("cde: {e}"));
                }
                (due, pending, deferred)
            });
            (c, tail)
        });
        report.collected += c.changed + c.deleted;
        report.failed += c.failed;
        report.build_failures += c.failed;
        if let Some((due, pending, deferred)) = tail {
            report.retries_due = due;
            report.more = c.drained != 0;
            report.deferred = deferred;
            break pending;
        }
    };
    report.elapsed_ms = started.elapsed().as_millis();
    (report, first.filter(|p| !p.items.is_empty()))
}
