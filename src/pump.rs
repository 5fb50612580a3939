//! Sending to several destinations at once: one sender thread per destination posts the slices
//! the main thread reads, at the destination's pace; the main thread records what came back and
//! reads the next slice. A destination that hangs until its timeout, is held or is down costs the
//! others nothing: their threads go on, and the main thread never waits for one request.
//!
//! Order within a feed: a feed's slices are read in the send order (changes, then what full syncs
//! made pending, each oldest first: `deliver::read_sql`) and go to one thread, which posts them in
//! that order; at most two are out of the feed table's hands at once (one posted, one read ahead).
//! A newer version of a document never arrives before an older one. A feed's pass ends when its
//! pending rows run out, its destination fails, or its time budget is spent; the next iteration
//! begins a new pass from the start of both lanes.

use crate::deliver::{self, Counters, Pending, Posted};
use crate::destination::Destination;
use crate::engine::{FeedInfo, FeedReport, Txn};
use crate::transport::Transport;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Slices of one feed out of the feed table's hands at once: one being posted, one read ahead.
const IN_FLIGHT: usize = 2;

struct Job {
    feed: String,
    pass: u64,
    dest: Arc<Destination>,
    batch_size: usize,
    pending: Pending,
}

/// A posted slice, back from its destination's thread.
pub struct Done {
    pub feed: String,
    pass: u64,
    posted: Posted,
    payload_log: Vec<String>,
}

/// One feed's send pass.
struct Pass {
    id: u64,
    info: FeedInfo,
    dest: Arc<Destination>,
    in_flight: usize,
    limit: usize,
    cursor: deliver::Cursor,
    /// No new slice is read: the last was short, the destination failed, or the budget is spent.
    exhausted: bool,
    started: Instant,
    report: FeedReport,
}

/// What the worker hears of a finished slice.
pub struct Heard {
    pub feed: FeedInfo,
    pub destination: Arc<Destination>,
    /// The destination answered as misconfigured (401, 404, 410, TLS...): (status, reason, error).
    pub misconfigured: Option<(Option<u16>, &'static str, String)>,
    /// It answered (2xx or a 4xx about the items): a hold may end.
    pub answered: bool,
    /// The feed's pass ended with this slice: its report, for the log.
    pub ended: Option<FeedReport>,
}

pub struct Pump {
    threads: HashMap<String, Sender<Job>>,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    /// The sender threads write a byte here after each slice: the worker waits on its latch and
    /// this pipe at once (WaitLatchOrSocket), with no thread ever touching a latch.
    wake_read: OwnedFd,
    wake_write: Arc<OwnedFd>,
    passes: HashMap<String, Pass>,
    next_pass: u64,
    pub counters: Counters,
    pub bytes_sent: Arc<AtomicU64>,
    budget: Duration,
    /// Read no new slice (a session waits for the iteration lock, cde.pause): passes end once
    /// what they have out came back.
    pub stop_reading: bool,
    /// Set when the pump goes away (an ERROR in cde_sync_now(), say): its threads post no new
    /// batch, and are joined, so that no request of this call outlives it.
    cancel: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Release);
        self.threads.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

impl Pump {
    /// `budget`: how long a feed's pass may go on reading new slices before it ends, so that a
    /// pass under a stream of new rows (a full sync building) ends and another begins.
    pub fn new(budget: Duration) -> Pump {
        let mut fds = [0; 2];
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            pgrx::error!("cde: cannot create the sender threads' pipe: {}", std::io::Error::last_os_error());
        }
        let (done_tx, done_rx) = channel();
        Pump {
            threads: HashMap::new(),
            done_tx,
            done_rx,
            wake_read: unsafe { OwnedFd::from_raw_fd(fds[0]) },
            wake_write: Arc::new(unsafe { OwnedFd::from_raw_fd(fds[1]) }),
            passes: HashMap::new(),
            next_pass: 1,
            counters: Counters::default(),
            bytes_sent: Arc::new(AtomicU64::new(0)),
            budget,
            stop_reading: false,
            cancel: Arc::new(AtomicBool::new(false)),
            handles: Vec::new(),
        }
    }

    pub fn wake_fd(&self) -> RawFd {
        self.wake_read.as_raw_fd()
    }

    /// Empty the wake pipe (the slices themselves come through the channel).
    pub fn drain_wakes(&self) {
        let mut buf = [0u8; 256];
        while unsafe { libc::read(self.wake_read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }

    /// Is a pass of this feed under way (its rows are out: no new pass may read them)?
    pub fn busy(&self, feed: &str) -> bool {
        self.passes.get(feed).is_some_and(|p| p.in_flight > 0)
    }

    pub fn in_flight(&self) -> usize {
        self.passes.values().map(|p| p.in_flight).sum()
    }

    /// Begin a feed's send pass with the slice the iteration read, and read one ahead.
    pub fn start(&mut self, tx: &impl Txn, info: &FeedInfo, dest: Arc<Destination>, first: Pending, report: FeedReport) {
        let limit = deliver::read_limit(&dest, info);
        let id = self.next_pass;
        self.next_pass += 1;
        let pass = Pass {
            id,
            info: info.clone(),
            dest,
            in_flight: 0,
            limit,
            cursor: deliver::Cursor::default(),
            exhausted: false,
            started: Instant::now(),
            report,
        };
        self.passes.insert(info.name.clone(), pass);
        self.submit(&info.name, first);
        self.refill(tx, &info.name);
    }

    /// Hand a slice to its destination's thread (started on first use).
    fn submit(&mut self, feed: &str, pending: Pending) {
        let Some(pass) = self.passes.get_mut(feed) else { return };
        pass.exhausted |= pending.held || pending.items.len() < pass.limit;
        if pending.items.is_empty() {
            return;
        }
        pass.cursor = pending.cursor.clone();
        pass.in_flight += 1;
        let job = Job {
            feed: feed.to_string(),
            pass: pass.id,
            dest: Arc::clone(&pass.dest),
            batch_size: deliver::batch_size(&pass.dest, &pass.info),
            pending,
        };
        let name = pass.dest.name.clone();
        let job = match self.threads.get(&name) {
            Some(t) => match t.send(job) {
                Ok(()) => return,
                Err(e) => e.0, // the thread is gone: a new one takes the slice
            },
            None => job,
        };
        let (sender, handle) = spawn_sender(
            &name,
            self.done_tx.clone(),
            Arc::clone(&self.wake_write),
            Arc::clone(&self.bytes_sent),
            Arc::clone(&self.cancel),
        );
        sender.send(job).expect("a new sender thread takes its first job");
        self.threads.insert(name, sender);
        self.handles.push(handle);
    }

    /// Keep the pass's slices in flight: read the next after the cursor while there is room.
    fn refill(&mut self, tx: &impl Txn, feed: &str) {
        loop {
            let Some(pass) = self.passes.get_mut(feed) else { return };
            if pass.started.elapsed() >= self.budget {
                pass.exhausted = true;
                pass.report.more = true;
            }
            pass.exhausted |= self.stop_reading;
            if pass.exhausted || pass.in_flight >= IN_FLIGHT {
                return;
            }
            let (info, limit, cursor) = (pass.info.clone(), pass.limit, pass.cursor.clone());
            let pending = tx.run(|| deliver::read_pending(&info, limit, &cursor));
            self.submit(feed, pending);
        }
    }

    /// The next finished slice, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Done> {
        match self.done_rx.recv_timeout(timeout) {
            Ok(done) => Some(done),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => unreachable!("the pump holds a sender"),
        }
    }

    /// Record a finished slice (in `tx`), read the pass's next one, and say what it showed of the
    /// destination. The pass's bookkeeping is done first: should the record fail (an ERROR,
    /// caught by the caller), the rows stay pending and a later pass takes them.
    pub fn finish(&mut self, tx: &impl Txn, done: Done) -> Option<Heard> {
        for line in &done.payload_log {
            pgrx::log!("{line}");
        }
        let pass = self.passes.get_mut(&done.feed).filter(|p| p.id == done.pass)?;
        pass.in_flight -= 1;
        pass.exhausted |= done.posted.unwell;
        let (info, dest) = (pass.info.clone(), Arc::clone(&pass.dest));
        let posted = done.posted;
        let (sent, failed) = tx.run(|| deliver::record(&info, &posted));
        self.counters.requests += posted.requests;
        self.counters.requests_failed += posted.failed_requests;
        self.counters.docs_sent += sent as u64;
        let pass = self.passes.get_mut(&done.feed)?;
        let r = &mut pass.report;
        r.sent += sent;
        r.failed += failed;
        r.requests += posted.requests;
        if r.first_error.is_none() {
            r.first_error = posted.first_error.clone();
        }
        self.refill(tx, &done.feed);
        let pass = self.passes.get_mut(&done.feed)?;
        let ended = (pass.in_flight == 0).then(|| {
            pass.report.elapsed_ms = pass.started.elapsed().as_millis();
            std::mem::take(&mut pass.report)
        });
        if ended.is_some() {
            self.passes.remove(&done.feed);
        }
        Some(Heard {
            feed: info,
            destination: dest,
            answered: posted.answered(),
            misconfigured: posted.misconfigured,
            ended,
        })
    }
}

/// A destination's sender thread: posts the slices it is given, in order, and hands each back.
/// After a failure, the rest of that pass's slices come back unsent: they stay pending. A panic
/// while posting is caught and comes back as a failed slice: the feed's pass ends, nothing waits
/// for a slice that never returns.
fn spawn_sender(
    name: &str,
    done: Sender<Done>,
    wake: Arc<OwnedFd>,
    bytes_sent: Arc<AtomicU64>,
    cancel: Arc<AtomicBool>,
) -> (Sender<Job>, std::thread::JoinHandle<()>) {
    let (jobs_tx, jobs) = channel::<Job>();
    let handle = spawn_without_signals(format!("cde sender {name}"), move || {
        let mut transport: Option<Transport> = None;
        let mut failed_pass: HashMap<String, u64> = HashMap::new();
        for job in jobs {
            let t = transport.get_or_insert_with(|| Transport::new(job.dest.timeout, Arc::clone(&bytes_sent)));
            let posted = if failed_pass.get(&job.feed) == Some(&job.pass) || cancel.load(Ordering::Acquire) {
                Posted { unwell: true, ..Posted::unsent(job.pending) }
            } else {
                let (dest, feed, batch_size) = (Arc::clone(&job.dest), job.feed.clone(), job.batch_size);
                let pending = job.pending;
                let cancel = Arc::clone(&cancel);
                let t = std::panic::AssertUnwindSafe(&mut *t);
                match std::panic::catch_unwind(move || {
                    let t = t;
                    deliver::post_slice(t.0, &dest, &feed, batch_size, pending, &cancel)
                }) {
                    Ok(posted) => posted,
                    Err(_) => {
                        // The slice is lost to this thread: its rows stay pending, read again
                        // by the next pass.
                        let mut p = Posted { unwell: true, ..Posted::unsent(deliver::Pending::default()) };
                        p.first_error = Some(("CDE-205", "the sender thread panicked while posting".into()));
                        transport = None;
                        p
                    }
                }
            };
            if posted.unwell {
                failed_pass.insert(job.feed.clone(), job.pass);
            }
            let payload_log = transport.as_mut().map(|t| std::mem::take(&mut t.payload_log)).unwrap_or_default();
            if done.send(Done { feed: job.feed, pass: job.pass, posted, payload_log }).is_err() {
                break;
            }
            unsafe { libc::write(wake.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        }
    })
    .unwrap_or_else(|e| pgrx::error!("cde: cannot start a sender thread: {e}"));
    (jobs_tx, handle)
}

/// Spawn a thread with every signal blocked: a signal is handled by any thread that does not
/// block it, and PostgreSQL's handlers (SIGHUP for a reload, SIGTERM...) set latches and flags
/// through PostgreSQL's functions, which only the main thread may call. The new thread inherits
/// the mask set around its creation, so no signal can reach it even in its first instant.
pub fn spawn_without_signals<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let spawned = std::thread::Builder::new().name(name).spawn(f);
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        spawned
    }
}
