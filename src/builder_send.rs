//! A sync builder sends the documents its chunks write, itself: the chunk's statement writes the
//! changed rows as sent and hands their documents over (`cde._stash_sent`), and once the step has
//! committed, a thread of the builder's posts them while the builder builds its next chunk; the
//! builder then says what came of it (`cde._posted`). The worker's way (write them pending, read them back, post, write each again
//! as sent) writes and reads every document twice, which a full sync cannot afford
//! (docs/benchmarks.md).
//!
//! A row of `cde.sync_posts`, committed with the chunk and on disk before the first request,
//! names the keys being posted and the builder's backend: the worker sends no newer version of
//! them until the builder is done, so none can arrive before the builder's; a builder that stops
//! first (a crash, a kill) leaves the row, and `cde._recover_posts`, finding no such backend,
//! makes the keys pending again. What the destination does not take goes to the worker, whose
//! retries, holds and backoff apply. Only a builder sends, only to an immediate feed's
//! destination that may be sent to now, and it stops sending at its first failed request.
//! docs/nothing-lost.md, "Full syncs sent by builders".

use crate::deliver::{post_slice, Pending, Posted};
use crate::destination::{Destination, Destinations};
use crate::engine::Txn;
use crate::gucs::Settings;
use crate::shmem;
use crate::transport::Transport;
use crate::worker::{guarded, Own};
use cde_protocol::{Item, ItemOutcome};
use pgrx::prelude::*;
use std::cell::RefCell;
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
    /// A request failed: this builder's chunks from now on go to the worker.
    stopped: bool,
    /// What the last chunk wrote as sent, to post once its step has committed.
    stash: Option<Stash>,
}

struct Stash {
    feed: String,
    keys: Vec<String>,
    docs: Vec<String>,
    /// Its cde.sync_posts row (`cde._stash_post`).
    post: Option<i64>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// This backend sends what its chunks write as sent (while cde.sync_builders_send is on).
pub fn enable() {
    SENDS.store(true, Ordering::Relaxed);
}

#[pg_schema]
mod cde {
    use pgrx::prelude::*;

    /// Does this backend send the documents its next chunk of `feed` writes? Only a sync
    /// builder, to an immediate feed's destination that may be sent to now.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _sends_built(feed: &str) -> bool {
        super::sends(feed)
    }

    /// Keep the documents a chunk of `feed` wrote as sent (keys and JSON texts, in the same
    /// order), for this builder to post once the step has committed; returns the keys.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _stash_sent(feed: &str, keys: Option<Vec<String>>, docs: Option<Vec<String>>) -> Option<Vec<String>> {
        let (keys, docs) = (keys.unwrap_or_default(), docs.unwrap_or_default());
        if keys.len() != docs.len() {
            error!("cde._stash_sent: {} keys and {} documents", keys.len(), docs.len());
        }
        if keys.is_empty() {
            return None;
        }
        super::STATE.with(|s| {
            s.borrow_mut().stash = Some(super::Stash { feed: feed.to_string(), keys: keys.clone(), docs, post: None })
        });
        Some(keys)
    }

    /// The cde.sync_posts row of the stashed documents.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _stash_post(post: i64) {
        super::STATE.with(|s| {
            if let Some(stash) = s.borrow_mut().stash.as_mut() {
                stash.post = Some(post);
            }
        });
    }

    /// This session sends the documents its full sync steps build, as a sync builder does: for
    /// the isolation specs, which play a builder's part and say what came of each post
    /// themselves (`cde._posted`); nothing else here posts them, and their keys stay held back
    /// until the session does or ends. Superusers only.
    #[pg_extern(volatile, parallel_unsafe)]
    fn _send_as_builder() {
        if !unsafe { pg_sys::superuser() } {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                "cde._send_as_builder: only a superuser may send as a sync builder"
            );
        }
        super::enable();
    }
}

fn sends(feed: &str) -> bool {
    if !SENDS.load(Ordering::Relaxed) {
        return false;
    }
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.stash = None;
        target(&mut s, feed).is_some()
    })
}

/// The feed's destination and batch size, if this builder may send to it now, as the worker
/// would: not stopped, not paused, the feed immediate, neither it nor its destination held,
/// failing, disabled or rate limited, and `cde._builders_may_send`. In a transaction.
fn target(s: &mut State, feed: &str) -> Option<(Arc<Destination>, usize)> {
    if s.stopped {
        return None;
    }
    let settings = Settings::read();
    if settings.pause || !crate::gucs::SYNC_BUILDERS_SEND.get() {
        return None;
    }
    let row = Spi::get_two_with_args::<String, i32>(
        "SELECT d.name, coalesce(f.batch_size, 0)
           FROM cde.feeds f JOIN cde.destinations d ON d.name = coalesce(f.destination, 'default')
          WHERE f.name = $1 AND f.mode = 'immediate' AND NOT coalesce(f.hold_until > now(), false)
            AND NOT coalesce(d.held_until > now(), false) AND d.failing_since IS NULL AND d.disabled_at IS NULL
            AND cde._builders_may_send(f.name)",
        &[feed.into()],
    );
    let Ok((Some(dest), Some(batch))) = row else { return None };
    s.destinations.refresh(&settings, false);
    let d = s.destinations.get(&dest)?;
    if !d.sendable() || d.spacing.is_some() {
        return None;
    }
    let batch = if batch > 0 { batch as usize } else { d.batch_size };
    Some((d, batch))
}

/// After a step: what the chunk before it posted is said (`cde._posted`), and what this step's
/// chunk wrote as sent, if the step committed (its cde.sync_posts row is there), starts going on
/// a thread of its own, which never calls into PostgreSQL, while this builder builds the next
/// chunk. Outside any transaction but short ones. False when a post may be left unsaid: the
/// builder then stops, so that the row, naming a backend gone, is taken over
/// (`cde._recover_posts`) rather than holding its keys back.
pub fn deliver() -> bool {
    let stash = STATE.with(|s| s.borrow_mut().stash.take());
    // The post before is said first: once it failed, this one is not sent but handed back.
    let said = finish();
    let Some(stash) = stash else { return said };
    let Some(post) = stash.post else { return said };
    // Asked now, the post before done (which may have taken a request's timeout): did the step
    // commit (its cde.sync_posts row is there), and may the feed still be sent to?
    let checked = guarded(|| {
        Own.run(|| {
            crate::locks::keep_drop_out();
            let committed =
                Spi::get_one_with_args::<bool>("SELECT EXISTS (SELECT 1 FROM cde.sync_posts WHERE id = $1)", &[post.into()]);
            committed.map(|c| (c, STATE.with(|s| target(&mut s.borrow_mut(), &stash.feed))))
        })
    });
    match checked {
        Ok(Ok((Some(false), _))) => said, // the step rolled back: nothing to post
        Ok(Ok((Some(true), target))) if said => {
            let stopping = unsafe { pg_sys::ShutdownRequestPending } != 0;
            start(post, stash, target.filter(|_| !stopping))
        }
        _ => false,
    }
}

/// A post on its way: its thread gives back the transport, what came of it and the bytes sent.
struct InFlight {
    post: i64,
    dest: String,
    thread: std::thread::JoinHandle<(Transport, Posted, u64)>,
}

thread_local! {
    static IN_FLIGHT: RefCell<Option<InFlight>> = const { RefCell::new(None) };
}

/// Send a committed chunk's documents on a thread to `target` (destination, batch size: from
/// `target()`); with none (this builder stopped sending, or is stopping), hand them to the worker
/// at once.
fn start(post: i64, stash: Stash, target: Option<(Arc<Destination>, usize)>) -> bool {
    let Stash { feed, keys, docs, .. } = stash;
    let items: Vec<Item> = keys.into_iter().zip(docs).map(|(key, doc)| Item { key, deleted: false, doc: Some(doc) }).collect();
    let Some((dest, batch)) = target else {
        return report(post, "", Posted::unsent(Pending { items, ..Pending::default() }), 0);
    };
    let (mut transport, bytes) = STATE.with(|s| {
        let mut s = s.borrow_mut();
        let bytes = Arc::clone(&s.bytes);
        let transport = s.transport.take().unwrap_or_else(|| Transport::new(dest.timeout, Arc::clone(&bytes)));
        (transport, bytes)
    });
    let dest_name = dest.name.clone();
    let thread = crate::pump::spawn_without_signals("cde builder post".into(), move || {
        let before = bytes.load(Ordering::Relaxed);
        let pending = Pending { items, ..Pending::default() };
        let posted = post_slice(&mut transport, &dest, &feed, batch, pending, &AtomicBool::new(false));
        let sent = bytes.load(Ordering::Relaxed) - before;
        (transport, posted, sent)
    });
    match thread {
        Ok(thread) => {
            IN_FLIGHT.with(|f| *f.borrow_mut() = Some(InFlight { post, dest: dest_name, thread }));
            true
        }
        Err(e) => {
            warning!("cde: a sync builder could not start a thread to post ({e}); it stops, and its keys go again");
            false
        }
    }
}

/// At this backend's exit (a FATAL, the postmaster gone), registered after it connected: a post
/// on its way ends before the backend leaves pg_stat_activity, after which `cde._recover_posts`
/// would hand its keys to the worker while the request is still out.
#[pg_guard]
pub unsafe extern "C-unwind" fn end_post_at_exit(_code: i32, _arg: pg_sys::Datum) {
    if let Ok(Some(f)) = IN_FLIGHT.try_with(|f| f.borrow_mut().take()) {
        let _ = f.thread.join();
    }
}

/// Wait for the post on its way, if any, and say what came of it. False as `deliver`.
pub fn finish() -> bool {
    let Some(f) = IN_FLIGHT.with(|f| f.borrow_mut().take()) else { return true };
    let Ok((mut transport, posted, bytes)) = f.thread.join() else {
        warning!("cde: a sync builder's post {} failed on its thread; the builder stops, and its keys go again", f.post);
        return false;
    };
    for line in transport.payload_log.drain(..) {
        log!("{line}");
    }
    STATE.with(|s| {
        let mut s = s.borrow_mut();
        s.transport = Some(transport);
        if !posted.answered() || posted.hold.is_some() {
            s.stopped = true;
            log!(
                "cde: a sync builder stops sending to destination {} ({}); the worker sends the rest of the full sync",
                f.dest,
                posted.first_error.as_ref().map(|e| e.1.as_str()).unwrap_or("it asked to wait")
            );
        }
    });
    report(f.post, &f.dest, posted, bytes)
}

/// Say what came of a post: the keys the destination did not take (all, if nothing was sent) go
/// to the worker, and the requests count for the destination.
fn report(post: i64, dest_name: &str, posted: Posted, bytes: u64) -> bool {
    let not_taken: Vec<String> = posted
        .outcomes
        .iter()
        .zip(&posted.pending.items)
        .filter(|(o, _)| !matches!(o, Some(ItemOutcome::Sent)))
        .map(|(_, i)| i.key.clone())
        .collect();
    let error = posted.error_text();
    let sent = (posted.pending.items.len() - not_taken.len()) as u64;
    // False: cde was dropped while the request was out (and maybe created again): the post's
    // keys, feed table and row of cde.sync_posts went with it, and nothing is left to record.
    let reported = guarded(|| {
        Own.run(|| {
            crate::locks::keep_drop_out();
            if !crate::builder::installed() {
                return Ok(false);
            }
            Spi::run_with_args(
                "SELECT cde._posted($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    post.into(),
                    dest_name.into(),
                    not_taken.clone().into(),
                    (posted.requests as i64).into(),
                    (posted.failed_requests as i64).into(),
                    posted.last_status.map(i32::from).into(),
                    error.clone().into(),
                    posted.answered().into(),
                ],
            )
            .map(|()| true)
        })
    });
    if let Some(w) = shmem::worker() {
        w.builders_docs_sent.fetch_add(sent, Ordering::Relaxed);
        w.builders_bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        w.builders_requests.fetch_add(posted.requests, Ordering::Relaxed);
        w.builders_requests_failed.fetch_add(posted.failed_requests, Ordering::Relaxed);
    }
    let failed = match reported {
        Ok(Ok(true)) => return true,
        Ok(Ok(false)) => {
            log!("cde: a sync builder's post {post} came back after cde was dropped from this database; it stops, with nothing left to record");
            return false;
        }
        Ok(Err(e)) => e.to_string(),
        Err(e) => e,
    };
    warning!("cde: a sync builder could not say what came of its post {post}; it stops, and its keys go again: {failed}");
    false
}
