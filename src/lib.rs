//! cde: keeps a SaaS service in sync with a commerce database, from inside PostgreSQL.
//!
//! The architecture, one file per concern:
//! - capture  statement-level triggers record changed keys (sql/capture.sql installs them)
//! - queue    appending those keys to cde.queue without the executor
//! - collect  queued keys become documents in feed tables (sql/collect.sql)
//! - deliver  pending rows go out in batches; outcomes are recorded (sql/deliver.sql)
//! - destination where feeds go: endpoint, credentials, signing, limits (sql/destinations.sql)
//! - pump     one sender thread per destination, so that none waits for another
//! - transport one HTTP request of protocol v1 (crates/cde-protocol holds the pure logic)
//! - sync     full sync runs in phases (sql/sync.sql)
//! - engine   one iteration over all feeds, shared by the worker and cde_sync_now()
//! - launcher one process per cluster starting a worker per database where cde is installed
//! - worker   the background worker of one database
//! - databases DROP DATABASE and the like never refused because of cde's workers
//! - builder  a second worker taking full sync steps while the worker sends
//! - builder_send  builders sending what their chunks wrote as sent, once committed
//! - api      SQL functions written in Rust
//! - trust    running what a non-superuser wrote with that role's rights (docs/security.md)
//! - locks    the advisory locks' keys
//! - gucs     settings;  shmem: the launcher's and workers' latches and counters
//! - compat   what differs between PostgreSQL 15, 16, 17 and 18

use pgrx::prelude::*;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!("../sql/rules.sql", name = "rules", requires = ["schema"]);
extension_sql_file!("../sql/feeds.sql", name = "feeds", requires = ["rules", trust::cde::_ticket, trust::cde::_redeem, trust::cde::_query_as]);
extension_sql_file!("../sql/rebuild.sql", name = "rebuild", requires = ["feeds"]);
extension_sql_file!("../sql/capture.sql", name = "capture", requires = ["feeds", capture::cde::_capture, capture::cde::_capture_keys, capture::cde::_capture_row]);
extension_sql_file!("../sql/collect.sql", name = "collect", requires = ["rebuild"]);
extension_sql_file!("../sql/deliver.sql", name = "deliver", requires = ["collect"]);
extension_sql_file!("../sql/sync.sql", name = "sync", requires = ["deliver"]);
extension_sql_file!("../sql/destinations.sql", name = "destinations", requires = ["sync", destination::cde::_check_destination_options, destination::cde::_destination_roles, destination::cde::_check_endpoint]);
extension_sql_file!("../sql/housekeeping.sql", name = "housekeeping", requires = ["destinations"]);
extension_sql_file!("../sql/check.sql", name = "check", requires = ["housekeeping"]);
extension_sql_file!("../sql/views.sql", name = "views", finalize);

mod api;
mod builder;
mod builder_send;
mod capture;
mod collect;
mod compat;
mod databases;
mod deliver;
mod destination;
mod engine;
mod gucs;
mod housekeeping;
mod launcher;
mod locks;
mod pump;
mod queue;
mod shmem;
mod sync;
mod transport;
mod trust;
mod worker;

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    capture::init();
    queue::init();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        shmem::init();
        launcher::register();
        databases::init();
    }
    // Without preloading, every SQL function works (cde_sync_now() sends); only the worker is
    // missing, and cde_worker_status / cde_feed_status say so and how to fix it.
}

#[cfg(any(test, feature = "pg_test"))]
#[path = "../pgrx-tests/mod.rs"]
mod pgrx_tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        // Preloaded, as in production; the worker serves a database the tests do not use.
        vec!["shared_preload_libraries = 'cde'", "cde.database = 'cde_pgrx_idle'"]
    }
}
