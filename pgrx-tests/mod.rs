//! In-database tests (`cargo pgrx test`): what is best checked from inside one backend — settings
//! and their validation, the worker status without a worker in this database, the generated
//! objects. Delivery is tested end to end in tests/e2e; SQL behaviour in tests/regress.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn setup_feed() {
        Spi::run(
            "CREATE TABLE items (id int PRIMARY KEY, name text);
             INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, 10) i;
             SELECT cde_register_feed('items', 'SELECT id, name FROM items');
             SELECT cde_track('items', 'items');",
        )
        .unwrap();
    }

    #[pg_test]
    fn settings_have_their_documented_defaults() {
        let get = |name: &str| Spi::get_one::<String>(&format!("SELECT current_setting('{name}')")).unwrap().unwrap();
        assert_eq!(get("cde.batch_size"), "500");
        assert_eq!(get("cde.max_batch_bytes"), "4MB");
        assert_eq!(get("cde.poll_interval"), "1s");
        assert_eq!(get("cde.legacy_interval"), "1min");
        assert_eq!(get("cde.retry_interval"), "5min");
        assert_eq!(get("cde.max_attempts"), "0");
        assert_eq!(get("cde.http_timeout"), "30s");
        assert_eq!(get("cde.compression"), "on");
        assert_eq!(get("cde.log_payloads"), "off");
    }

    #[pg_test(error = "invalid value for parameter \"cde.endpoint\": \"ftp://example.com\"")]
    fn endpoint_must_be_http_or_https() {
        Spi::run("SET cde.endpoint = 'ftp://example.com'").unwrap();
    }

    #[pg_test(error = "invalid value for parameter \"cde.endpoint\": \"http://\"")]
    fn endpoint_needs_a_host() {
        Spi::run("SET cde.endpoint = 'http://'").unwrap();
    }

    #[pg_test]
    fn good_endpoints_are_accepted() {
        Spi::run("SET cde.endpoint = 'https://api.example.com/v1/ingest'").unwrap();
        Spi::run("SET cde.endpoint = 'http://127.0.0.1:8787'").unwrap();
        Spi::run("SET cde.endpoint = ''").unwrap();
    }

    #[pg_test(error = "-1 is outside the valid range for parameter \"cde.batch_size\" (1 .. 100000)")]
    fn negative_batch_size_is_refused() {
        Spi::run("SET cde.batch_size = -1").unwrap();
    }

    #[pg_test(error = "0 ms is outside the valid range for parameter \"cde.http_timeout\" (100 .. 3600000)")]
    fn zero_timeout_is_refused() {
        Spi::run("SET cde.http_timeout = 0").unwrap();
    }

    #[pg_test]
    fn durations_take_units() {
        Spi::run("SET cde.retry_interval = '90s'").unwrap();
        assert_eq!(Spi::get_one::<String>("SELECT current_setting('cde.retry_interval')").unwrap().unwrap(), "90s");
    }

    #[pg_test]
    fn worker_status_has_one_row() {
        // Preloaded in the test cluster, the worker serves another database (cde.database).
        let n = Spi::get_one::<i64>("SELECT count(*) FROM cde_worker_status").unwrap().unwrap();
        assert_eq!(n, 1);
        let db = Spi::get_one::<String>("SELECT database FROM cde_worker_status").unwrap().unwrap();
        assert_eq!(db, "cde_pgrx_idle");
    }

    #[pg_test]
    fn worker_waits_for_a_database_that_does_not_exist() {
        // cde.database names a database that does not exist here: after one failed start the
        // worker waits for it (connected to no database) instead of dying every 2 seconds.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let state = || Spi::get_one::<String>("SELECT CASE WHEN running THEN state END FROM cde_worker_status").unwrap();
        while state().as_deref() != Some("waiting for database (cde.database does not exist)") {
            assert!(std::time::Instant::now() < deadline, "worker state: {:?}", state());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    #[pg_test]
    fn collect_without_endpoint_leaves_documents_pending() {
        setup_feed();
        Spi::run("SET cde.endpoint = ''").unwrap();
        Spi::run("UPDATE items SET name = name || '!' WHERE id <= 3").unwrap();
        let collected = Spi::get_one::<i64>("SELECT collected FROM cde_sync_now('items')").unwrap().unwrap();
        assert_eq!(collected, 3);
        let pending = Spi::get_one::<i64>("SELECT pending FROM cde_feed_status WHERE feed = 'items'").unwrap().unwrap();
        assert_eq!(pending, 3);
        let doc = Spi::get_one::<pgrx::JsonB>("SELECT doc FROM cde.feed_items WHERE key = '2'").unwrap().unwrap();
        assert_eq!(doc.0, serde_json::json!({"id": 2, "name": "item 2!"}));
    }

    #[pg_test]
    fn changes_recorded_flag_is_harmless_without_a_worker_latch() {
        // Called by every capture trigger; must never fail, in or out of a transaction.
        Spi::run("SELECT cde._changes_recorded()").unwrap();
        Spi::run("SELECT cde._changes_recorded()").unwrap();
    }

    #[pg_test]
    fn generated_objects_are_not_public() {
        setup_feed();
        let public_exec = Spi::get_one::<bool>(
            "SELECT has_function_privilege('public', 'cde.rebuild_items(text[], text, text, int)', 'EXECUTE')",
        )
        .unwrap()
        .unwrap();
        assert!(!public_exec);
        // The capture trigger runs as the extension's owner, and nobody else may call it.
        let capture = Spi::get_two::<bool, bool>(
            "SELECT prosecdef, has_function_privilege('public', oid, 'EXECUTE') FROM pg_proc WHERE oid = 'cde._capture()'::regprocedure",
        )
        .unwrap();
        assert_eq!(capture, (Some(true), Some(false)));
    }
}
