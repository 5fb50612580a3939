//! Full sync runs: the state machine is SQL (`sql/sync.sql`), one step per call. Here: calling
//! it in a loop with a time budget, the progress log line, and the lanes a phase is built in.

use pgrx::prelude::*;
use std::time::{Duration, Instant};

#[pg_schema]
mod cde {
    use pgrx::prelude::*;

    /// Is this key (in text form) in lane `lane` of `lanes`? The filter of a full sync chunk
    /// (cde_protocol::lane). A boolean function, not `lane(key) = n`: the planner estimates a
    /// third of the rows pass it, not half a percent, and keeps the ordered index scan that a
    /// chunk's LIMIT needs (with the estimate of an equality it sorted every remaining row).
    #[pg_extern(immutable, parallel_safe, strict)]
    fn _in_lane(key: &str, lane: i32, lanes: i32) -> bool {
        _lane(key, lanes) == lane
    }

    /// The lane of a key, for looking at how a phase was split.
    #[pg_extern(immutable, parallel_safe, strict)]
    fn _lane(key: &str, lanes: i32) -> i32 {
        cde_protocol::lane(key.as_bytes(), lanes.max(1) as u32) as i32
    }
}

pub enum Step {
    /// A step did work.
    Progress,
    /// The active run waits for the send pass to deliver its current phase.
    Waiting,
    /// Another session (the builder, or cde_sync_now()) is taking a step.
    Busy,
    /// A transient error (deadlock, serialization failure, lock timeout) rolled the step back:
    /// take it again later rather than at once, into the same conflict.
    Retry,
    /// No run is active.
    Idle,
    /// The active run waits for its plan; no step was taken (`step_unless_planning`).
    Planning,
}

/// One step; `wait`: wait for the step lock rather than answer Busy (the builder does).
pub fn step_waiting(wait: bool) -> Step {
    // cde.step, an enum: the SQL side cannot answer anything else.
    match Spi::get_one_with_args::<String>("SELECT cde._sync_step($1)::text", &[wait.into()]) {
        Ok(Some(s)) => match s.as_str() {
            "progress" => Step::Progress,
            "waiting" => Step::Waiting,
            "busy" => Step::Busy,
            "retry" => Step::Retry,
            other => error!("cde: full sync step answered {other}, which cde.step does not have"),
        },
        Ok(None) => Step::Idle,
        Err(e) => error!("cde: full sync step failed: {e}"),
    }
}

/// One step, unless another session is taking one.
pub fn step() -> Step {
    step_waiting(false)
}

/// Advance runs for at most `budget`, one transaction per step through `run`. True when it did
/// any work.
pub fn advance(run: &impl Fn() -> Step, budget: Duration) -> bool {
    let started = Instant::now();
    let mut progressed = false;
    while started.elapsed() < budget {
        match run() {
            Step::Progress => progressed = true,
            Step::Waiting | Step::Busy | Step::Retry | Step::Idle | Step::Planning => break,
        }
    }
    progressed
}

/// One step, unless the active run waits for its plan (each feed's source counted): then
/// `Planning`, and nothing taken. One transaction either way, as the worker asks each iteration.
pub fn step_unless_planning() -> Step {
    if planning() { Step::Planning } else { step() }
}

/// Is the active run waiting for its plan?
fn planning() -> bool {
    Spi::get_one::<bool>(
        "SELECT r.status = 'preparing' FROM cde.sync_runs r WHERE cde._active(r.status) ORDER BY r.id LIMIT 1",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// One line on the active run, for the server log.
pub fn progress_line() -> Option<String> {
    Spi::get_one::<String>(
        "SELECT format('cde: full sync run %s %s%s: phase %s, %s of %s processed, %s unchanged, %s deleted, %s sent',
                       r.id, r.status, CASE WHEN r.dry_run THEN ' (dry run)' ELSE '' END, coalesce(r.current_phase, '-'),
                       sum(p.processed), sum(p.planned), sum(p.unchanged), sum(p.deleted), sum(p.sent))
           FROM cde.sync_runs r JOIN cde.sync_phases p ON p.run_id = r.id
          WHERE cde._active(r.status)
          GROUP BY r.id ORDER BY r.id LIMIT 1",
    )
    .ok()
    .flatten()
}
