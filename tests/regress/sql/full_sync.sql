-- Full sync runs, advanced here by cde_sync_now() (the worker serves another database).
\i sql/fresh.inc

CREATE TABLE categories (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL, category_id int REFERENCES categories);
INSERT INTO categories SELECT i, 'Category ' || i FROM generate_series(1, 30) i;
INSERT INTO products SELECT i, 'Product ' || i, 1 + i % 30 FROM generate_series(1, 12000) i;

SELECT cde_register_feed('categories', 'SELECT id, name FROM categories');
SELECT cde_register_feed('products', 'SELECT id, name, category_id FROM products', depends_on => '{categories}');

-- A dry run builds and hashes everything, reports what would be sent, sends nothing.
SELECT cde_full_sync(dry_run => true) AS run_id \gset
SELECT run_id = :run_id AS same_run, feeds, dry_run, status FROM cde_sync_runs;
SELECT feed, collected, sent, failed FROM cde_sync_now();
SELECT status, planned, processed, sent, unchanged, deleted, failed, phases FROM cde_sync_runs WHERE run_id = :run_id;
SELECT count(*) AS feed_rows_after_dry_run FROM cde.feed_products;

-- The real run: statuses in order, one phase per feed, categories before products.
SELECT cde_full_sync() AS run_id \gset
SELECT feed, collected, sent, failed FROM cde_sync_now();
SELECT status, feed, message FROM cde.sync_events WHERE run_id = :run_id ORDER BY at;
SELECT status, current_phase, planned, processed, sent, unchanged, deleted, failed FROM cde_sync_runs WHERE run_id = :run_id;
-- A phase of two chunks or more is built in as many lanes as cde.sync_builders (2 by default),
-- by a hash of the key, so that the builders build it side by side: every key is in one lane,
-- and each lane was built to its end (here by this session alone, one after the other).
SHOW cde.sync_builders;
SELECT feed, lane, lanes, done FROM cde.sync_lanes WHERE run_id = :run_id ORDER BY feed, lane;
SELECT cde._lane(id::text, 2) AS lane, count(*) AS keys FROM products GROUP BY 1 ORDER BY 1;

-- A second run finds everything unchanged and sends nothing; a deleted entity is sent as such.
-- This one in three lanes: no key is built twice or left out.
DELETE FROM products WHERE id = 42;
SET cde.sync_builders = 3;
SELECT cde_full_sync('products') AS run_id \gset
SELECT feed, collected, sent, failed FROM cde_sync_now();
RESET cde.sync_builders;
SELECT feeds, status, planned, processed, sent, unchanged, deleted, failed FROM cde_sync_runs WHERE run_id = :run_id;
SELECT lane, lanes, done FROM cde.sync_lanes WHERE run_id = :run_id ORDER BY lane;
SELECT key, deleted, status FROM cde.feed_products WHERE key = '42';

-- A full sync sends again what failed (rejected, dead), though unchanged; a dry run counts it.
UPDATE cde.feed_products SET status = 'rejected', http_status = 422 WHERE key IN ('7', '8');
UPDATE cde.feed_products SET status = 'dead', attempts = 10 WHERE key = '9';
SELECT cde_full_sync('products', dry_run => true) AS run_id \gset
SELECT feed, collected, sent, failed FROM cde_sync_now();
SELECT dry_run, status, processed, sent, unchanged FROM cde_sync_runs WHERE run_id = :run_id;
SELECT cde_full_sync('products') AS run_id \gset
SELECT feed, collected, sent, failed FROM cde_sync_now();
SELECT dry_run, status, processed, sent, unchanged FROM cde_sync_runs WHERE run_id = :run_id;
SELECT key, status, attempts, http_status FROM cde.feed_products WHERE key IN ('7', '8', '9') ORDER BY key;

-- One run at a time per feed; cancel.
SELECT cde_full_sync('products') AS run_id \gset
SELECT cde_full_sync();
SELECT cde_full_sync('products');
SELECT cde_cancel_sync(:run_id);
SELECT status FROM cde_sync_runs WHERE run_id = :run_id;
SELECT cde_cancel_sync(:run_id);
SELECT cde_cancel_sync(-1);
SELECT cde_full_sync('nope');

-- A transient error in a step (a deadlock, a serialization failure) rolls that step back, not the
-- run: the step says 'retry' (with a WARNING and an event) and is taken again. Any other error
-- fails the run, with the error. Steps one at a time:
CREATE FUNCTION flaky(i int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    CASE current_setting('regress.flaky', true)
    WHEN 'deadlock' THEN RAISE EXCEPTION 'simulated deadlock' USING ERRCODE = 'deadlock_detected';
    WHEN 'bug' THEN RAISE EXCEPTION 'simulated bug';
    ELSE RETURN i;
    END CASE;
END $$;
SELECT cde_register_feed('flaky', 'SELECT id, flaky(id) AS v FROM categories');
SELECT cde_full_sync('flaky') AS run_id \gset
SELECT cde._sync_step() AS prepared, cde._sync_step() AS planned, cde._sync_step() AS phase_started;
SET regress.flaky = 'deadlock';
SELECT cde._sync_step();
SELECT status, current_phase, processed, error FROM cde_sync_runs WHERE run_id = :run_id;
SELECT status, feed, message FROM cde.sync_events WHERE run_id = :run_id ORDER BY at DESC LIMIT 1;
RESET regress.flaky;
SELECT cde._sync_step() AS built, cde._sync_step() AS sending_no_deletion_pass;
SELECT feed, collected, sent, failed FROM cde_sync_now('flaky');
SELECT status, processed, sent, error FROM cde_sync_runs WHERE run_id = :run_id;
SELECT cde_full_sync('flaky') AS run_id \gset
SELECT cde._sync_step() AS prepared, cde._sync_step() AS planned, cde._sync_step() AS phase_started;
SET regress.flaky = 'bug';
SELECT cde._sync_step();
RESET regress.flaky;
SELECT status, processed, error FROM cde_sync_runs WHERE run_id = :run_id;
SELECT cde_drop_feed('flaky');
DROP FUNCTION flaky(int);

-- TRUNCATE of a tracked table schedules a full sync of the feeds tracking it.
SELECT cde_track('categories', 'categories');
TRUNCATE products, categories;
SELECT feed, collected, sent, failed FROM cde_sync_now();
SELECT feeds, status, deleted FROM cde_sync_runs ORDER BY run_id DESC LIMIT 1;
SELECT count(*) FILTER (WHERE deleted) AS deleted, count(*) AS items FROM cde.feed_categories;
