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
    fn worker_status_has_one_row_and_says_why_this_database_is_not_served() {
        // Preloaded in the test cluster, cde serves only the database cde.database names.
        let n = Spi::get_one::<i64>("SELECT count(*) FROM cde_worker_status").unwrap().unwrap();
        assert_eq!(n, 1);
        let (db, running, state) = Spi::get_three::<String, bool, String>(
            "SELECT database::text, running, state FROM cde_worker_status",
        )
        .unwrap();
        assert_eq!(db, Spi::get_one::<String>("SELECT current_database()::text").unwrap());
        assert_eq!(running, Some(false));
        assert!(state.as_deref().unwrap_or("").starts_with("not served: cde.database (cde_pgrx_idle)"), "{state:?}");
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

    /// The send pass records each item on the row version it read: found where the read found
    /// it (the ctid), or, if the row moved since with the same version (hash and modified_at: a
    /// collect rewrites rows as they are during a full sync), by its key. A row written again
    /// since, even with the same document, is left pending, to go again, never marked by mistake.
    #[pg_test]
    fn a_record_marks_the_version_read_and_leaves_newer_ones_pending() {
        setup_feed();
        Spi::run("SET cde.endpoint = ''").unwrap();
        Spi::run("UPDATE items SET name = name || '!' WHERE id <= 3").unwrap();
        Spi::run("SELECT * FROM cde_sync_now('items')").unwrap();
        let record = "SELECT sent FROM cde._record('items', $1, $2::tid[], $3, ARRAY['sent']::cde.outcome[], ARRAY[NULL::int], \
                      ARRAY[NULL::text], NULL, ARRAY[NULL::text], $4::timestamptz[])";
        let read = |key: &str| {
            Spi::connect(|c| {
                let row = c
                    .select("SELECT ctid::text, hash, modified_at::text FROM cde.feed_items WHERE key = $1", None, &[key.into()])
                    .unwrap()
                    .first();
                (
                    row.get::<String>(1).unwrap().unwrap(),
                    row.get::<String>(2).unwrap().unwrap(),
                    row.get::<String>(3).unwrap().unwrap(),
                )
            })
        };
        let status = |key: &str| {
            Spi::get_one_with_args::<String>("SELECT status FROM cde.feed_items WHERE key = $1", &[key.into()]).unwrap().unwrap()
        };
        let call = |key: &str, (tid, hash, modified): &(String, String, String)| {
            Spi::get_one_with_args::<i64>(
                record,
                &[vec![key.to_string()].into(), vec![tid.clone()].into(), vec![hash.clone()].into(), vec![modified.clone()].into()],
            )
            .unwrap()
            .unwrap()
        };
        // Key 1: recorded where it was read.
        let read1 = read("1");
        assert_eq!(call("1", &read1), 1);
        assert_eq!(status("1"), "sent");
        // Key 2: read, then its row rewritten as it was, elsewhere in the table: found by key.
        let read2 = read("2");
        Spi::run("UPDATE cde.feed_items SET hash = hash WHERE key = '2'").unwrap();
        assert_ne!(read("2").0, read2.0);
        assert_eq!(call("2", &read2), 1);
        assert_eq!(status("2"), "sent");
        // Key 3: read, then written again with the same document (a newer version): left pending.
        let read3 = read("3");
        Spi::run("UPDATE cde.feed_items SET modified_at = modified_at + interval '1 second' WHERE key = '3'").unwrap();
        assert_eq!(call("3", &read3), 0);
        assert_eq!(status("3"), "pending");
    }

    #[pg_test]
    fn changes_recorded_flag_is_harmless_without_a_worker_latch() {
        // Called by every capture trigger; must never fail, in or out of a transaction.
        Spi::run("SELECT cde._changes_recorded()").unwrap();
        Spi::run("SELECT cde._changes_recorded()").unwrap();
    }

    #[pg_test]
    fn internals_are_not_public() {
        setup_feed();
        // The feed table: the extension owner's, and nobody else may touch it.
        let public_select =
            Spi::get_one::<bool>("SELECT has_table_privilege('public', 'cde.feed_items', 'SELECT')").unwrap().unwrap();
        assert!(!public_select);
        // The source query runner and the writer: superusers only.
        for f in ["cde._source(text, text, text[], text, int, int, int)", "cde._rebuild(text, text[], text, text, int, int, int)"] {
            let public_exec =
                Spi::get_one::<bool>(&format!("SELECT has_function_privilege('public', '{f}', 'EXECUTE')")).unwrap().unwrap();
            assert!(!public_exec, "{f}");
        }
        // The capture trigger for column keys runs as the writer (it checks no right and resolves
        // no name: src/queue.rs); the one for keys that are SQL as the extension's owner. Nobody
        // else may call either.
        for (f, definer) in [("cde._capture()", false), ("cde._capture_keys()", true)] {
            let capture = Spi::get_two::<bool, bool>(&format!(
                "SELECT prosecdef, has_function_privilege('public', oid, 'EXECUTE') FROM pg_proc WHERE oid = '{f}'::regprocedure"
            ))
            .unwrap();
            assert_eq!(capture, (Some(definer), Some(false)), "{f}");
        }
    }

    /// What the capture trigger appended to cde.queue for feed items, read through `index` only
    /// (so that a row missing from that index would be missed).
    fn queued_through(index: &str, predicate: &str) -> Vec<(Option<Vec<String>>, bool)> {
        Spi::run("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off").unwrap();
        let plan = Spi::get_one::<String>(&format!("EXPLAIN (COSTS OFF) SELECT keys, all_keys FROM cde.queue WHERE {predicate}"))
            .unwrap()
            .unwrap();
        assert!(plan.contains(index), "expected a scan of {index}: {plan}");
        Spi::connect(|c| {
            c.select(&format!("SELECT keys, all_keys FROM cde.queue WHERE {predicate} ORDER BY id"), None, &[])?
                .map(|r| Ok((r.get::<Vec<String>>(1)?, r.get::<bool>(2)?.unwrap())))
                .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
        })
        .unwrap()
    }

    #[pg_test]
    fn capture_appends_rows_that_the_queue_index_finds() {
        setup_feed();
        Spi::run("DELETE FROM cde.queue").unwrap();
        Spi::run("UPDATE items SET name = 'x' WHERE id IN (2, 3); TRUNCATE items").unwrap();
        let rows = queued_through("queue_feed_id", "feed = 'items'");
        assert_eq!(rows, vec![(Some(vec!["2".into(), "3".into()]), false), (None, true)]);
        // Ids come from the identity sequence; queued_at is the transaction's start, as now().
        let (ids_ok, times_ok) = Spi::get_two::<bool, bool>(
            "SELECT max(id) = currval(pg_get_serial_sequence('cde.queue', 'id')), bool_and(queued_at = now()) FROM cde.queue",
        )
        .unwrap();
        assert_eq!((ids_ok, times_ok), (Some(true), Some(true)));
    }

    #[pg_test]
    fn capture_honours_what_was_added_to_an_altered_queue() {
        // Rows no longer go in directly (see src/queue.rs) but through INSERT: the added
        // column's default, its CHECK and an expression index all apply.
        setup_feed();
        Spi::run(
            "DELETE FROM cde.queue;
             ALTER TABLE cde.queue ADD COLUMN source text DEFAULT 'app' CHECK (source <> '');
             CREATE INDEX queue_upper_feed ON cde.queue (upper(feed));",
        )
        .unwrap();
        Spi::run("UPDATE items SET name = 'x' WHERE id = 4").unwrap();
        assert_eq!(queued_through("queue_upper_feed", "upper(feed) = 'ITEMS'"), vec![(Some(vec!["4".into()]), false)]);
        assert_eq!(Spi::get_one::<String>("SELECT source FROM cde.queue").unwrap().as_deref(), Some("app"));
    }

    #[pg_test]
    fn document_hashes_see_values_not_their_spelling_or_storage() {
        let same = Spi::get_one::<bool>(
            r#"CREATE TEMP TABLE stored (doc jsonb);
               INSERT INTO stored SELECT jsonb_build_object('b', repeat('xy', 50000), 'a', 1);  -- compressed when stored
               SELECT cde._doc_hash(doc) = cde._doc_hash(jsonb_build_object('a', 1, 'b', repeat('xy', 50000))) FROM stored"#,
        )
        .unwrap();
        assert_eq!(same, Some(true));
        let differ = Spi::get_one::<bool>(
            r#"SELECT cde._doc_hash('{"a": [[1], [2]]}'::jsonb) <> cde._doc_hash('{"a": [[1, 2]]}'::jsonb)"#,
        )
        .unwrap();
        assert_eq!(differ, Some(true));
    }

    #[pg_test(error = "cde._doc_hash: expected a jsonb document, got type oid 25")]
    fn document_hashes_are_of_jsonb_only() {
        Spi::run("SELECT cde._doc_hash('{}'::text)").unwrap();
    }
}
