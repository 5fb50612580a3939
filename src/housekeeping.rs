//! Housekeeping (sql/housekeeping.sql): the feed tables' row counts folded, delivered deletions
//! past cde.tombstone_retention and full sync runs past cde.history_retention removed. The worker
//! runs it every `EVERY`, CALL cde_deliver() once per call, each in a step of its own.

use crate::gucs;
use pgrx::prelude::*;
use std::time::Duration;

/// Often enough that the counts stay a few rows per feed under a full sync's writes, and that a
/// bulk deletion past its retention goes at 10,000 rows per feed per run.
pub const EVERY: Duration = Duration::from_secs(10);

/// One pass. Logs what it removed.
pub fn run() {
    let removed = Spi::get_three_with_args::<i64, i64, i32>(
        "SELECT tombstones, runs, recounted FROM cde._housekeep($1, $2)",
        &[gucs::TOMBSTONE_RETENTION_S.get().into(), gucs::HISTORY_RETENTION_S.get().into()],
    )
    .unwrap_or_else(|e| error!("cde: housekeeping: {e}"));
    if let (Some(t), Some(r), Some(c)) = removed {
        if t > 0 || r > 0 {
            log!("cde: housekeeping removed {t} delivered deletions past cde.tombstone_retention, {r} full sync runs past cde.history_retention");
        }
        if c > 0 {
            log!("cde: housekeeping counted the rows of {c} feed tables (a restored copy's, or counts not kept yet)");
        }
    }
}
