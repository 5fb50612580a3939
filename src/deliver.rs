//! The send pass: pending feed rows -> batches -> HTTP -> recorded outcome.
//!
//! Three steps, and only the middle one talks to the network: read a slice of pending rows (a short
//! transaction), send it with no transaction open, then record every item's outcome (another short
//! transaction). A crash between the POST and the record leaves the rows pending, so the same batch
//! content is sent again, with the same Idempotency-Key: delivery is at least once.
//!
//! Each destination has its own sender thread (src/pump.rs): the main thread, the only one that may
//! call into PostgreSQL, reads and records; the destinations' threads post, each at its own pace,
//! so that one that hangs or is held never delays another's feeds.

use crate::destination::Destination;
use crate::engine::FeedInfo;
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

#[derive(Default)]
pub struct Pending {
    pub items: Vec<Item>,
    pub hashes: Vec<Option<String>>,
    /// Where each row was read (its ctid, in text form): the record finds it there.
    pub tids: Vec<Option<String>>,
    /// Each row's modified_at, in text form: with the hash, the version read, should the record
    /// have to look for a row that moved by its key.
    pub modified: Vec<Option<String>>,
    pub held: bool,
    /// Where the next read starts in each lane: the cursor read from, moved past this slice.
    pub cursor: Cursor,
}

/// A pass's place in the two lanes of the pending order (the feed table's pending index): rows
/// changes made pending, then rows full syncs made pending, each in (modified_at, key) order.
/// `None`: from the lane's start.
#[derive(Default, Clone, Debug)]
pub struct Cursor {
    pub changes: Option<(String, String)>,
    pub full_sync: Option<(String, String)>,
}

/// How many rows one read takes: a few requests' worth, so that the read and record transactions
/// are amortised over several requests without holding much in memory.
const READ_BATCHES: usize = 4;

/// The read of a slice: changes first, then the full syncs' rows (docs/nothing-lost.md, "Order").
/// Each lane is an ordered scan of the pending index from its cursor on, so a read costs what it
/// returns however many rows are pending; at most `limit` rows of the two together, the changes'
/// first. The documents are rendered as text outside the ordered subqueries: should the planner
/// sort the pending rows rather than walk the index, only the rows kept are rendered. Parameters:
/// the cursors that are set, in order, each as (modified_at, key); then the feed's name: keys a
/// sync builder is posting (cde.sync_posts) wait until it is done, so that no newer version of a
/// document arrives before its older one (src/builder_send.rs). In the same statement, under the
/// same snapshot as the rows: a post committed between two statements could not slip through.
fn read_sql(feed_table: &str, limit: usize, cursor: &Cursor) -> String {
    let cursors = [&cursor.changes, &cursor.full_sync].iter().filter(|c| c.is_some()).count();
    let posted = format!(
        "\n\x20            AND t.key NOT IN (SELECT pg_catalog.unnest(p.keys) FROM cde.sync_posts AS p WHERE p.feed = ${})",
        2 * cursors + 1
    );
    let mut n = 0;
    let mut lane = |full_sync: bool, at: &Option<(String, String)>| {
        let after = at.as_ref().map_or(String::new(), |_| {
            n += 2;
            format!(" AND (t.modified_at, t.key) > (${}::timestamptz, ${})", n - 1, n)
        });
        let not = if full_sync { "" } else { "NOT " };
        format!(
            "(SELECT t.key, t.deleted, t.doc, t.hash, t.modified_at, t.ctid AS tid, t.full_sync FROM {feed_table} AS t\n\
             \x20          WHERE t.status = 'pending' AND {not}t.full_sync{after}{posted}\n\
             \x20          ORDER BY t.modified_at, t.key LIMIT {limit})"
        )
    };
    let changes = lane(false, &cursor.changes);
    let full_sync = lane(true, &cursor.full_sync);
    format!(
        "SELECT p.key, p.deleted, p.doc::text, p.hash, p.modified_at::text, p.tid::text, p.full_sync\n\
         \x20 FROM (SELECT * FROM ({changes}\n\
         \x20       UNION ALL\n\
         \x20       {full_sync}) AS u\n\
         \x20       ORDER BY u.full_sync, u.modified_at, u.key LIMIT {limit}) AS p\n\
         \x20ORDER BY p.full_sync, p.modified_at, p.key"
    )
}

/// Read up to `limit` pending rows of the feed after `cursor`, in the send order (none while the
/// feed is held).
pub fn read_pending(feed: &FeedInfo, limit: usize, cursor: &Cursor) -> Pending {
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
            return Ok::<_, pgrx::spi::SpiError>(Pending { held, cursor: cursor.clone(), ..Pending::default() });
        }
        let mut args: Vec<pgrx::datum::DatumWithOid> = [&cursor.changes, &cursor.full_sync]
            .into_iter()
            .flatten()
            .flat_map(|(m, k)| [m.as_str().into(), k.as_str().into()])
            .collect();
        args.push(feed.name.as_str().into());
        let rows = c.select(&read_sql(&feed.feed_table, limit, cursor), None, &args)?;
        let n = rows.len();
        let mut p = Pending {
            items: Vec::with_capacity(n),
            hashes: Vec::with_capacity(n),
            tids: Vec::with_capacity(n),
            modified: Vec::with_capacity(n),
            held,
            cursor: cursor.clone(),
        };
        for r in rows {
            let key = r.get::<String>(1)?.unwrap_or_default();
            let deleted = r.get::<bool>(2)?.unwrap_or(false);
            p.hashes.push(r.get::<String>(4)?);
            p.tids.push(r.get::<String>(6)?);
            let modified = r.get::<String>(5)?;
            p.modified.push(modified.clone());
            let at = Some((modified.unwrap_or_default(), key.clone()));
            if r.get::<bool>(7)?.unwrap_or(false) {
                p.cursor.full_sync = at;
            } else {
                p.cursor.changes = at;
            }
            p.items.push(Item { key, deleted, doc: r.get::<String>(3)? });
        }
        Ok(p)
    })
    .unwrap_or_else(|e| error!("cde: reading pending rows of feed {} failed: {e}", feed.name))
}

/// A feed's own batch_size wins over its destination's.
pub fn batch_size(dest: &Destination, feed: &FeedInfo) -> usize {
    feed.batch_size.map_or(dest.batch_size, |b| b.max(1) as usize)
}

/// How many pending rows one read takes.
pub fn read_limit(dest: &Destination, feed: &FeedInfo) -> usize {
    batch_size(dest, feed) * READ_BATCHES
}

/// What came of posting one slice of pending rows.
pub struct Posted {
    pub pending: Pending,
    pub outcomes: Vec<Option<ItemOutcome>>,
    pub response_ids: Vec<Option<String>>,
    pub hold: Option<std::time::Duration>,
    pub requests: u64,
    pub failed_requests: u64,
    pub last_status: Option<u16>,
    /// The endpoint failed (retryable, or misconfigured): nothing more goes out in this pass.
    pub unwell: bool,
    pub first_error: Option<(&'static str, String)>,
    pub misconfigured: Option<(Option<u16>, &'static str, String)>,
}

impl Posted {
    /// The destination answered (2xx, or a 4xx about the items: the destination works, the items
    /// were the problem): a hold ends, and it is not failing.
    pub fn answered(&self) -> bool {
        self.requests > 0 && !self.unwell
    }

    /// What the destination's record says went wrong: the first error, else the misconfiguration.
    pub fn error_text(&self) -> Option<String> {
        self.first_error.as_ref().map(|e| e.1.clone()).or(self.misconfigured.as_ref().map(|m| m.2.clone()))
    }

    /// A slice nothing was done with yet: every item stays pending.
    pub fn unsent(pending: Pending) -> Posted {
        Posted {
            outcomes: vec![None; pending.items.len()],
            response_ids: vec![None; pending.items.len()],
            hold: None,
            requests: 0,
            failed_requests: 0,
            last_status: None,
            unwell: false,
            first_error: None,
            misconfigured: None,
            pending,
        }
    }
}

/// Post one slice, batch after batch, stopping at the first retryable failure. Pure Rust and
/// HTTP: it runs on a sender thread and must not call into PostgreSQL.
pub fn post_slice(
    transport: &mut Transport,
    dest: &Destination,
    feed: &str,
    batch_size: usize,
    pending: Pending,
    cancel: &std::sync::atomic::AtomicBool,
) -> Posted {
    let mut p = Posted::unsent(pending);
    for b in cut_batches(&p.pending.items, batch_size, dest.max_batch_bytes) {
        if cancel.load(std::sync::atomic::Ordering::Acquire) {
            p.unwell = true; // the caller went away: the rest stays pending
            break;
        }
        let slice = &p.pending.items[b.start..b.end];
        let d = deliver_with_split(slice, &mut |items| transport.post(dest, feed, items));
        p.requests += d.requests;
        p.failed_requests += d.failed_requests;
        p.last_status = d.last_status.or(p.last_status);
        p.unwell = d.outcomes.iter().any(|o| matches!(o, Some(ItemOutcome::Retry { .. }))) || d.misconfigured.is_some();
        p.misconfigured = p.misconfigured.take().or(d.misconfigured);
        p.hold = p.hold.or(d.hold);
        if p.first_error.is_none() {
            p.first_error = d.outcomes.iter().flatten().find_map(|o| Some((o.error_code()?, o.error()?.to_string())));
        }
        for (i, (o, r)) in d.outcomes.into_iter().zip(d.response_ids).enumerate() {
            p.outcomes[b.start + i] = o;
            p.response_ids[b.start + i] = r;
        }
        if p.unwell {
            break; // the endpoint failed: the rest stays pending for the next pass
        }
    }
    p
}

/// Record a posted slice's outcomes, and what it says of its destination; returns (sent, failed).
pub fn record(feed: &FeedInfo, posted: &Posted) -> (i64, i64) {
    let (p, outcomes, hold) = (&posted.pending, &posted.outcomes, posted.hold);
    let mut response_ids: Vec<Option<String>> = Vec::new();
    let mut keys = Vec::new();
    let mut tids = Vec::new();
    let mut modified = Vec::new();
    let mut hashes = Vec::new();
    let mut kinds = Vec::new();
    let mut statuses: Vec<Option<i32>> = Vec::new();
    let mut errors: Vec<Option<String>> = Vec::new();
    for (i, o) in outcomes.iter().enumerate() {
        let Some(o) = o else { continue };
        keys.push(p.items[i].key.clone());
        response_ids.push(posted.response_ids[i].clone());
        tids.push(p.tids[i].clone());
        modified.push(p.modified[i].clone());
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
    let first_error = posted.error_text();
    let ok = posted.answered();
    let hold = hold.map(|d| format!("{} milliseconds", d.as_millis()));
    Spi::connect_mut(|c| {
        c.update(
            "SELECT cde._destination_answered($1, $2, $3, $4, $5, $6)",
            None,
            &[
                feed.destination.as_str().into(),
                (posted.requests as i64).into(),
                (posted.failed_requests as i64).into(),
                posted.last_status.map(i32::from).into(),
                first_error.into(),
                ok.into(),
            ],
        )?;
        if keys.is_empty() {
            return Ok((0, 0));
        }
        let row = c
            .update(
                "SELECT sent, rejected + retrying + dead FROM cde._record($1, $2, $3::tid[], $4, $5::cde.outcome[], $6, $7, $8::interval, $9, $10::timestamptz[])",
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
                    response_ids.into(),
                    modified.into(),
                ],
            )?
            .first();
        Ok::<_, pgrx::spi::SpiError>((row.get::<i64>(1)?.unwrap_or(0), row.get::<i64>(2)?.unwrap_or(0)))
    })
    .unwrap_or_else(|e| error!("cde: recording deliveries of feed {} failed: {e}", feed.name))
}

#[pg_schema]
mod cde {
    use pgrx::prelude::*;

    /// The statement that reads a slice ([`super::read_sql`]) for a feed table, `lim` rows, from
    /// the start of each lane or after a cursor ($1, $2 for the changes' lane, then the full
    /// syncs'), then the feed's name: for a reader, and for tests/regress/sql/send_order.sql,
    /// which prints and runs it.
    #[pg_extern(immutable, parallel_safe, strict)]
    fn _read_sql(feed_table: &str, lim: i32, changes_after: bool, full_sync_after: bool) -> String {
        let at = |set: bool| set.then(|| (String::new(), String::new()));
        let cursor = super::Cursor { changes: at(changes_after), full_sync: at(full_sync_after) };
        super::read_sql(feed_table, lim.max(1) as usize, &cursor)
    }
}
