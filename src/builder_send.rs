//! A sync builder sends the documents it builds, inside the step that builds them: the source
//! rows that change are posted first (`cde._send_built`, called by `cde._rebuild`'s chunk
//! statement), then written, those the destination took as sent. The worker's way (write them
//! pending, read them back, post, record each as sent) writes and reads every document twice,
//! which a full sync cannot afford (docs/benchmarks.md, "Builders send").
//!
//! Only a builder sends, only to an immediate feed's destination that may be sent to now (not
//! held, failing, disabled or rate limited; not paused), and it stops at its first failed request:
//! whatever it does not send is written pending, for the worker, whose retries, holds and backoff
//! then apply. Order: the write never marks as sent a row that was pending (its older document
//! may be out with the worker), and a row written since the step's snapshot goes again
//! (`cde._requeue_unseen`); docs/nothing-lost.md, "Full syncs sent by builders".
//!
//! The counters of what was sent (the feed's and the destination's rows) are kept here and added
//! by the builder after its step commits, each in a transaction of its own: the step itself
//! locks no row that the worker's record takes in another order.

use crate::deliver::{post_slice, Pending};
use crate::destination::Destinations;
use crate::engine::Txn;
use crate::gucs::Settings;
use crate::shmem;
use crate::transport::Transport;
use cde_protocol::{Item, ItemOutcome};
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// This backend sends as a sync builder: set by `cde_builder_main`, or by a superuser's
/// `cde._send_as_builder()` (the isolation specs); by nothing else.
static SENDS: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
struct State {
    destinations: Destinations,
    transport: Option<Transport>,
    bytes: Arc<AtomicU64>,
    /// The feed `cde._sends_built` said yes for: its destination and batch size.
    target: Option<(String, String, usize)>,
    /// A request failed: the rest of this builder's documents go to the worker.
    stopped: bool,
    tally: Tally,
}

/// What was sent since the last flush: per destination, its requests (`cde._destination_answered`);
/// per (feed, destination), the documents it took.
#[derive(Default)]
pub struct Tally {
    destinations: HashMap<String, Answered>,
    feeds: HashMap<(String, String), i64>,
}

struct Answered {
    requests: i64,
    failed: i64,
    last_status: Option<i32>,
    first_error: Option<String>,
    ok: bool,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// This backend sends what its chunks build (while cde.sync_builders_send is on).
pub fn enable() {
    SENDS.store(true, Ordering::Relaxed);
}

/// The counters of what was sent, taken (a step's, once it committed; dropped when it did not).
pub fn take_tally() -> Tally {
    STATE.with(|s| std::mem::take(&mut s.borrow_mut().tally))
}

/// Add a committed step's counters to the destinations' and feeds' rows, each in a transaction
/// of its own. Counters only: one that fails is reported and lost.
pub fn flush(tally: Tally) {
    let run = |sql: &str, args: &[pgrx::datum::DatumWithOid]| {
        let done = crate::worker::guarded(|| crate::worker::Own.run(|| Spi::run_with_args(sql, args).map_err(|e| e.to_string())));
        if let Err(e) = done.and_then(|r| r) {
            warning!("cde: a sync builder could not count what it sent: {e}");
        }
    };
    for (dest, a) in tally.destinations {
        run(
            "SELECT cde._destination_answered($1, $2, $3, $4, $5, $6)",
            &[dest.as_str().into(), a.requests.into(), a.failed.into(), a.last_status.into(), a.first_error.into(), a.ok.into()],
        );
    }
    for ((feed, dest), n) in tally.feeds.into_iter().filter(|(_, n)| *n > 0) {
        run("UPDATE cde.feeds SET items_sent = items_sent + $2, last_sent_at = now() WHERE name = $1", &[feed.as_str().into(), n.into()]);
        run("UPDATE cde.destinations SET items_sent = items_sent + $2 WHERE name = $1", &[dest.as_str().into(), n.into()]);
    }
}

#[pg_schema]
mod cde {
    use pgrx::prelude::*;

    /// Does this backend send the documents its next chunk of `feed` builds? Only a sync builder,
    /// to an immediate feed's destination that may be sent to now.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _sends_built(feed: &str) -> bool {
        super::sends(feed)
    }

    /// This session sends the documents its full sync steps build, as a sync builder does: for
    /// the isolation specs, which play a builder's part. Superusers only.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _send_as_builder() {
        if !unsafe { pg_sys::superuser() } {
            ereport!(ERROR, PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE, "cde._send_as_builder: only a superuser may send as a sync builder");
        }
        super::enable();
    }

    /// Post these documents of `feed` (keys and JSON texts, in the same order) to its
    /// destination, as the worker would, and return the keys the destination took, with the id
    /// of the response that took each. Called by `cde._rebuild` after `cde._sends_built`.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _send_built(
        feed: &str,
        keys: Option<Vec<String>>,
        docs: Option<Vec<String>>,
    ) -> TableIterator<'static, (name!(key, String), name!(response_id, Option<String>))> {
        TableIterator::new(super::send(feed, keys.unwrap_or_default(), docs.unwrap_or_default()))
    }
}

fn sends(feed: &str) -> bool {
    if !SENDS.load(Ordering::Relaxed) {
        return false;
    }
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.target = None;
        if s.stopped {
            return false;
        }
        let settings = Settings::read();
        if settings.pause || !crate::gucs::SYNC_BUILDERS_SEND.get() {
            return false;
        }
        // The feed's destination, as the worker would send to it: not held (the feed or the
        // destination), failing or disabled.
        let row = Spi::get_two_with_args::<String, i32>(
            "SELECT d.name, coalesce(f.batch_size, 0)
               FROM cde.feeds f JOIN cde.destinations d ON d.name = coalesce(f.destination, 'default')
              WHERE f.name = $1 AND f.mode = 'immediate' AND NOT coalesce(f.hold_until > now(), false)
                AND NOT coalesce(d.held_until > now(), false) AND d.failing_since IS NULL AND d.disabled_at IS NULL",
            &[feed.into()],
        );
        let Ok((Some(dest), Some(batch))) = row else { return false };
        s.destinations.refresh(&settings, false);
        let Some(d) = s.destinations.get(&dest) else { return false };
        if !d.sendable() || d.spacing.is_some() {
            return false;
        }
        let batch = if batch > 0 { batch as usize } else { d.batch_size };
        s.target = Some((feed.to_string(), dest, batch));
        true
    })
}

fn send(feed: &str, keys: Vec<String>, docs: Vec<String>) -> Vec<(String, Option<String>)> {
    STATE.with(|s| {
        let mut guard = s.borrow_mut();
        let s = &mut *guard;
        let Some((_, dest_name, batch)) = s.target.clone().filter(|t| t.0 == feed) else { return Vec::new() };
        let Some(dest) = s.destinations.get(&dest_name) else { return Vec::new() };
        if keys.is_empty() {
            return Vec::new();
        }
        if keys.len() != docs.len() {
            error!("cde._send_built: {} keys and {} documents", keys.len(), docs.len());
        }
        let items = keys.into_iter().zip(docs).map(|(key, doc)| Item { key, deleted: false, doc: Some(doc) }).collect();
        let pending = Pending { items, ..Pending::default() };
        let bytes = Arc::clone(&s.bytes);
        let transport = s.transport.get_or_insert_with(|| Transport::new(dest.timeout, bytes));
        let before = s.bytes.load(Ordering::Relaxed);
        let posted = post_slice(transport, &dest, feed, batch, pending, &AtomicBool::new(false));
        for line in transport.payload_log.drain(..) {
            log!("{line}");
        }
        let mut sent = Vec::new();
        for (i, o) in posted.outcomes.iter().enumerate() {
            if matches!(o, Some(ItemOutcome::Sent)) {
                sent.push((posted.pending.items[i].key.clone(), posted.response_ids[i].clone()));
            }
        }
        if !posted.answered() || posted.hold.is_some() {
            s.stopped = true;
            log!(
                "cde: a sync builder stops sending to destination {dest_name} ({}); the worker sends the rest of the full sync",
                posted.first_error.as_ref().map(|e| e.1.as_str()).unwrap_or("it asked to wait")
            );
        }
        if let Some(w) = shmem::worker() {
            w.builders_docs_sent.fetch_add(sent.len() as u64, Ordering::Relaxed);
            w.builders_bytes_sent.fetch_add(s.bytes.load(Ordering::Relaxed) - before, Ordering::Relaxed);
            w.builders_requests.fetch_add(posted.requests, Ordering::Relaxed);
            w.builders_requests_failed.fetch_add(posted.failed_requests, Ordering::Relaxed);
        }
        let a = s.tally.destinations.entry(dest_name.clone()).or_insert(Answered {
            requests: 0,
            failed: 0,
            last_status: None,
            first_error: None,
            ok: true,
        });
        a.requests += posted.requests as i64;
        a.failed += posted.failed_requests as i64;
        a.last_status = posted.last_status.map(i32::from).or(a.last_status);
        if a.first_error.is_none() {
            a.first_error = posted.first_error.as_ref().map(|e| e.1.clone()).or(posted.misconfigured.as_ref().map(|m| m.2.clone()));
        }
        a.ok = posted.answered();
        *s.tally.feeds.entry((feed.to_string(), dest_name)).or_insert(0) += sent.len() as i64;
        sent
    })
}
