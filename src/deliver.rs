//! The send pass: pending feed rows -> batches -> HTTP -> recorded outcome.
//!
//! Three steps, and only the middle one talks to the network: read a slice of pending rows (a short
//! transaction), send it with no transaction open, then record every item's outcome (another short
//! transaction). A crash between the POST and the record leaves the rows pending, so the same batch
//! content is sent again, with the same Idempotency-Key: delivery is at least once.

use crate::engine::{FeedInfo, Txn};
use crate::gucs::Settings;
use crate::transport::Transport;
use cde_protocol::{cut_batches, deliver_with_split, Item, ItemOutcome};
use pgrx::prelude::*;

/// What the worker adds to `cde_worker_status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub docs_sent: u64,
    pub requests: u64,
    pub requests_failed: u64,
}

#[derive(Debug, Default)]
pub struct Sent {
    pub sent: i64,
    pub failed: i64,
    pub requests: u64,
    /// The pass stopped at its time budget with more pending: call again soon.
    pub more: bool,
    /// The first failure of the pass, with its stable code, for the worker's WARNING line.
    pub first_error: Option<(&'static str, String)>,
    /// The destination answered as misconfigured (401, 404, TLS...): (status, reason, error).
    pub misconfigured: Option<(Option<u16>, &'static str, String)>,
}

pub struct Pending {
    items: Vec<Item>,
    hashes: Vec<Option<String>>,
    /// Where each row was read (its ctid, in text form): the record finds it there.
    tids: Vec<Option<String>>,
    held: bool,
    /// Where the next read starts: (modified_at, key) of the last row, in the pending index's order.
    last: Option<(String, String)>,
}

/// How many rows one read takes: a few requests' worth, so that the read and record transactions
/// are amortised over several requests without holding much in memory.
const READ_BATCHES: usize = 4;

/// Read up to `limit` pending rows of the feed, oldest change first (none while the feed is held),
/// after `after` in that order when given.
pub fn read_pending(feed: &FeedInfo, limit: usize, after: Option<&(String, String)>) -> Pending {
    Spi::connect(|c| {
        let held = c
            .select(
                "SELECT coalesce(hold_until > now(), false) FROM cde.feeds WHERE name = $1",
                None,
                &[feed.name.as_str().into()],
            )?
            .first()
            .get_one::<bool>()?
            .unwrap_or(true); // feed dropped meanwhile: nothing to send
        if held {
            return Ok::<_, pgrx::spi::SpiError>(Pending { items: vec![], hashes: vec![], tids: vec![], held, last: None });
        }
        // An ordered scan of the pending index from the cursor on: each read costs what it
        // returns, however many rows are pending. The documents are rendered as text outside the
        // ordered subquery: should the planner sort the pending rows rather than walk the index,
        // only the rows kept are rendered.
        let (filter, args) = match after {
            None => ("", vec![]),
            Some((m, k)) => ("AND (t.modified_at, t.key) > ($1::timestamptz, $2)", vec![m.as_str().into(), k.as_str().into()]),
        };
        let q = format!(
            "SELECT p.key, p.deleted, p.doc::text, p.hash, p.modified_at::text, p.tid::text FROM (
                 SELECT t.key, t.deleted, t.doc, t.hash, t.modified_at, t.ctid AS tid FROM {} AS t
                  WHERE t.status = 'pending' {filter}
                  ORDER BY t.modified_at, t.key LIMIT {limit}) AS p
              ORDER BY p.modified_at, p.key",
            feed.feed_table
        );
        let rows = c.select(&q, None, &args)?;
        let n = rows.len();
        let mut p = Pending {
            items: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
            tids: Vec::with_capacity(n),
            held,
            last: None,
        };
        for r in rows {
            let key = r.get::<String>(1)?.unwrap_or_default();
            let deleted = r.get::<bool>(2)?.unwrap_or(false);
            p.hashes.push(r.get::<String>(4)?);
            p.tids.push(r.get::<String>(6)?);
            p.last = Some((r.get::<String>(5)?.unwrap_or_default(), key.clone()));
            p.items.push(Item { key, deleted, doc: r.get::<String>(3)? });
        }
        Ok(p)
    })
    .unwrap_or_else(|e| error!("cde: reading pending rows of feed {} failed: {e}", feed.name))
}

fn batch_size(settings: &Settings, feed: &FeedInfo) -> usize {
    feed.batch_size.map_or(settings.batch_size, |b| b.max(1) as usize)
}

/// How many pending rows one read takes.
pub fn read_limit(settings: &Settings, feed: &FeedInfo) -> usize {
    batch_size(settings, feed) * READ_BATCHES
}

/// What came of posting one slice of pending rows.
struct Posted {
    pending: Pending,
    outcomes: Vec<Option<ItemOutcome>>,
    hold: Option<std::time::Duration>,
    requests: u64,
    failed_requests: u64,
    /// The endpoint failed (retryable, or misconfigured): nothing more goes out in this pass.
    unwell: bool,
    first_error: Option<(&'static str, String)>,
    misconfigured: Option<(Option<u16>, &'static str, String)>,
}

impl Posted {
    /// A slice nothing was done with yet: every item stays pending.
    fn unsent(pending: Pending) -> Posted {
        Posted {
            outcomes: vec![None; pending.items.len()],
            hold: None,
            requests: 0,
            failed_requests: 0,
            unwell: false,
            first_error: None,
            misconfigured: None,
            pending,
        }
    }
}

/// Post one slice, batch after batch, stopping at the first retryable failure. Pure Rust and
/// HTTP: it runs on the sender thread and must not call into PostgreSQL.
fn post_slice(
    transport: &mut Transport,
    settings: &Settings,
    endpoint: &str,
    feed: &str,
    batch_size: usize,
    pending: Pending,
) -> Posted {
    let mut p = Posted::unsent(pending);
    for b in cut_batches(&p.pending.items, batch_size, settings.max_batch_bytes) {
        let slice = &p.pending.items[b.start..b.end];
        let d = deliver_with_split(slice, &mut |items| transport.post(settings, endpoint, feed, items));
        p.requests += d.requests;
        p.failed_requests += d.failed_requests;
        p.unwell = d.outcomes.iter().any(|o| matches!(o, Some(ItemOutcome::Retry { .. }))) || d.misconfigured.is_some();
        p.misconfigured = p.misconfigured.take().or(d.misconfigured);
        p.hold = p.hold.or(d.hold);
        if p.first_error.is_none() {
            p.first_error = d.outcomes.iter().flatten().find_map(|o| Some((o.error_code()?, o.error()?.to_string())));
        }
        for (i, o) in d.outcomes.into_iter().enumerate() {
            p.outcomes[b.start + i] = o;
        }
        if p.unwell {
            break; // the endpoint failed: the rest stays pending for the next pass
        }
    }
    p
}

/// Send every pending row of the feed, slice after slice, until none is left, the endpoint fails
/// or `budget` is spent (no new slice is read after it; the ones under way finish). `first` is a
/// slice already read by the caller's transaction.
///
/// A sender thread posts while this thread, the only one that may call into PostgreSQL, reads the
/// next slice and records the previous one: the database work and the HTTP round trips (the
/// receiver's work included) overlap, on different cores. One slice is read ahead, so at most two
/// are out of the feed table's hands at once. Requests still go out one at a time, in the
/// pending order: a newer version of a document never arrives before an older one.
pub fn send_pending(
    tx: &impl Txn,
    transport: &mut Transport,
    settings: &Settings,
    feed: &FeedInfo,
    counters: &mut Counters,
    first: Option<Pending>,
    budget: std::time::Duration,
) -> Sent {
    let started = std::time::Instant::now();
    let Some(endpoint) = settings.endpoint.as_deref() else { return Sent::default() };
    let batch_size = batch_size(settings, feed);
    let limit = read_limit(settings, feed);
    let mut total = Sent::default();
    std::thread::scope(|scope| {
        let (to_sender, jobs) = std::sync::mpsc::channel::<Pending>();
        let (to_main, done) = std::sync::mpsc::channel::<Posted>();
        let name = feed.name.as_str();
        let sender = spawn_without_signals(scope, move || {
            let mut unwell = false;
            for pending in jobs {
                let posted = if unwell {
                    // After a failure the rest of the pass is not sent: it stays pending.
                    Posted { unwell, ..Posted::unsent(pending) }
                } else {
                    post_slice(transport, settings, endpoint, name, batch_size, pending)
                };
                unwell = posted.unwell;
                if to_main.send(posted).is_err() {
                    break;
                }
            }
            std::mem::take(&mut transport.payload_log)
        });

        let mut in_flight = 0;
        let mut cursor: Option<(String, String)> = None;
        let mut exhausted = false;
        let mut first = first;
        loop {
            // Keep one slice being posted and one read ahead.
            if !exhausted && started.elapsed() >= budget {
                // Rows modified since the pass began keep coming (a full sync builds while we
                // send): leave them to the next iteration, so that the others get their turn.
                exhausted = true;
                total.more = true;
            }
            if !exhausted && in_flight < 2 {
                let pending = match first.take() {
                    Some(p) => p,
                    None => tx.run(|| read_pending(feed, limit, cursor.as_ref())),
                };
                exhausted = pending.held || pending.items.len() < limit;
                if pending.held || pending.items.is_empty() {
                    continue;
                }
                cursor = pending.last.clone();
                to_sender.send(pending).expect("the sender thread is alive while the pass runs");
                in_flight += 1;
                continue;
            }
            if in_flight == 0 {
                break;
            }
            // Waiting for the endpoint with no transaction open: a worker asked to stop leaves.
            let posted = loop {
                match done.recv_timeout(std::time::Duration::from_millis(100)) {
                    Ok(posted) => break posted,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => crate::worker::stop_now_if_asked(),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the sender thread answers every slice"),
                }
            };
            in_flight -= 1;
            exhausted |= posted.unwell;
            total.requests += posted.requests;
            counters.requests += posted.requests;
            counters.requests_failed += posted.failed_requests;
            if total.first_error.is_none() {
                total.first_error = posted.first_error.clone();
            }
            if total.misconfigured.is_none() {
                total.misconfigured = posted.misconfigured.clone();
            }
            let r = tx.run(|| record(feed, &posted.pending, &posted.outcomes, posted.hold));
            total.sent += r.0;
            total.failed += r.1;
            counters.docs_sent += r.0 as u64;
        }
        drop(to_sender);
        let logs = sender.join().unwrap_or_default();
        if settings.log_payloads {
            for line in logs {
                pgrx::log!("{line}");
            }
        }
    });
    total
}

/// Spawn a scoped thread with every signal blocked: a signal is handled by any thread that does
/// not block it, and PostgreSQL's handlers (SIGHUP for a reload, SIGTERM...) set latches and
/// flags through PostgreSQL's functions, which only the main thread may call. The new thread
/// inherits the mask set around its creation, so no signal can reach it even in its first instant.
fn spawn_without_signals<'scope, 'env, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let handle = scope.spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        handle
    }
}

/// Record outcomes; returns (sent, failed).
fn record(feed: &FeedInfo, p: &Pending, outcomes: &[Option<ItemOutcome>], hold: Option<std::time::Duration>) -> (i64, i64) {
    let mut keys = Vec::new();
    let mut tids = Vec::new();
    let mut hashes = Vec::new();
    let mut kinds = Vec::new();
    let mut statuses: Vec<Option<i32>> = Vec::new();
    let mut errors: Vec<Option<String>> = Vec::new();
    for (i, o) in outcomes.iter().enumerate() {
        let Some(o) = o else { continue };
        keys.push(p.items[i].key.clone());
        tids.push(p.tids[i].clone());
        hashes.push(p.hashes[i].clone());
        let (kind, status, error) = match o {
            ItemOutcome::Sent => ("sent", None, None),
            ItemOutcome::Rejected { status, error } => ("rejected", *status, Some(error.clone())),
            ItemOutcome::Retry { status, error } => ("retry", *status, Some(error.clone())),
        };
        kinds.push(kind.to_string());
        statuses.push(status.map(i32::from));
        errors.push(error);
    }
    if keys.is_empty() {
        return (0, 0);
    }
    let hold = hold.map(|d| format!("{} milliseconds", d.as_millis()));
    Spi::connect_mut(|c| {
        let row = c
            .update(
                "SELECT sent, rejected + retrying + dead FROM cde._record($1, $2, $3::tid[], $4, $5::cde.outcome[], $6, $7, $8::interval)",
                None,
                &[
                    feed.name.as_str().into(),
                    keys.into(),
                    tids.into(),
                    hashes.into(),
                    kinds.into(),
                    statuses.into(),
                    errors.into(),
                    hold.into(),
                ],
            )?
            .first();
        Ok::<_, pgrx::spi::SpiError>((row.get::<i64>(1)?.unwrap_or(0), row.get::<i64>(2)?.unwrap_or(0)))
    })
    .unwrap_or_else(|e| error!("cde: recording deliveries of feed {} failed: {e}", feed.name))
}
