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
    /// The first failure of the pass, with its stable code, for the worker's WARNING line.
    pub first_error: Option<(&'static str, String)>,
}

pub struct Pending {
    items: Vec<Item>,
    hashes: Vec<Option<String>>,
    held: bool,
}

/// How many rows one read takes: a few requests' worth, so that the read and record transactions
/// are amortised over several requests without holding much in memory.
const READ_BATCHES: usize = 4;

/// Read up to `limit` pending rows of the feed, oldest change first (none while the feed is held).
pub fn read_pending(feed: &FeedInfo, limit: usize) -> Pending {
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
            return Ok::<_, pgrx::spi::SpiError>(Pending { items: vec![], hashes: vec![], held });
        }
        let q = format!(
            "SELECT key, deleted, doc::text, hash FROM {} WHERE status = 'pending' ORDER BY modified_at, key LIMIT {limit}",
            feed.feed_table
        );
        let rows = c.select(&q, None, &[])?;
        let mut p = Pending { items: Vec::with_capacity(rows.len()), hashes: Vec::with_capacity(rows.len()), held };
        for r in rows {
            let deleted = r.get::<bool>(2)?.unwrap_or(false);
            p.items.push(Item { key: r.get::<String>(1)?.unwrap_or_default(), deleted, doc: r.get::<String>(3)? });
            p.hashes.push(r.get::<String>(4)?);
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

/// Send every pending row of the feed, batch after batch, until none is left or the endpoint
/// fails. `first` is a slice already read by the caller's transaction.
pub fn send_pending(
    tx: &impl Txn,
    transport: &mut Transport,
    settings: &Settings,
    feed: &FeedInfo,
    counters: &mut Counters,
    mut first: Option<Pending>,
) -> Sent {
    let Some(endpoint) = settings.endpoint.as_deref() else { return Sent::default() };
    let batch_size = batch_size(settings, feed);
    let limit = read_limit(settings, feed);
    let mut total = Sent::default();
    loop {
        let pending = match first.take() {
            Some(p) => p,
            None => tx.run(|| read_pending(feed, limit)),
        };
        if pending.held || pending.items.is_empty() {
            break;
        }
        let n = pending.items.len();
        let mut outcomes: Vec<Option<ItemOutcome>> = vec![None; n];
        let mut hold = None;
        let mut unwell = false;
        for b in cut_batches(&pending.items, batch_size, settings.max_batch_bytes) {
            if unwell {
                break; // the endpoint failed: the rest stays pending for the next pass
            }
            let slice = &pending.items[b.start..b.end];
            let d = deliver_with_split(slice, &mut |items| transport.post(settings, endpoint, &feed.name, items));
            total.requests += d.requests;
            counters.requests += d.requests;
            counters.requests_failed += d.failed_requests;
            unwell = d.outcomes.iter().any(|o| matches!(o, Some(ItemOutcome::Retry { .. })));
            hold = hold.or(d.hold);
            if total.first_error.is_none() {
                total.first_error = d.outcomes.iter().flatten().find_map(|o| Some((o.error_code()?, o.error()?.to_string())));
            }
            for (i, o) in d.outcomes.into_iter().enumerate() {
                outcomes[b.start + i] = o;
            }
        }
        let r = tx.run(|| record(feed, &pending, &outcomes, hold));
        total.sent += r.0;
        total.failed += r.1;
        counters.docs_sent += r.0 as u64;
        if unwell || n < limit {
            break;
        }
    }
    total
}

/// Record outcomes; returns (sent, failed).
fn record(feed: &FeedInfo, p: &Pending, outcomes: &[Option<ItemOutcome>], hold: Option<std::time::Duration>) -> (i64, i64) {
    let mut keys = Vec::new();
    let mut hashes = Vec::new();
    let mut kinds = Vec::new();
    let mut statuses: Vec<Option<i32>> = Vec::new();
    let mut errors: Vec<Option<String>> = Vec::new();
    for (i, o) in outcomes.iter().enumerate() {
        let Some(o) = o else { continue };
        keys.push(p.items[i].key.clone());
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
                "SELECT sent, rejected + retrying + dead FROM cde._record($1, $2, $3, $4, $5, $6, $7::interval)",
                None,
                &[
                    feed.name.as_str().into(),
                    keys.into(),
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
