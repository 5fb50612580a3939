-- What the views count, and what they cost: rows by status come from cde.row_counts, kept by
-- the feed table's statement triggers whoever writes it, never from a count of the feed table;
-- the oldest waiting change from an index's first entry; the queue is counted exactly up to
-- 10,000 rows of a feed, and estimated beyond. Retention removes delivered deletions and old
-- full sync runs, nothing else. All in one transaction: the database's worker sees none of it.
\i sql/fresh.inc
SET cde.endpoint = '';
BEGIN;
CREATE TABLE products (id bigint PRIMARY KEY, price numeric NOT NULL);
INSERT INTO products SELECT i, i FROM generate_series(1, 1000) i;
SELECT cde_register_feed('products', 'SELECT id, jsonb_build_object(''price'', price) AS doc FROM products');
SELECT cde_track('products', 'products');

-- The view's counts against a count of the feed table.
CREATE FUNCTION counts_agree() RETURNS TABLE (items bigint, pending bigint, sent bigint, retrying bigint,
                                               rejected bigint, dead bigint, deleted bigint, agree boolean)
LANGUAGE sql AS $$
    WITH actual AS (
        SELECT count(*) AS items, count(*) FILTER (WHERE status = 'pending') AS pending,
               count(*) FILTER (WHERE status = 'sent') AS sent, count(*) FILTER (WHERE status = 'retrying') AS retrying,
               count(*) FILTER (WHERE status = 'rejected') AS rejected, count(*) FILTER (WHERE status = 'dead') AS dead,
               count(*) FILTER (WHERE deleted) AS deleted
          FROM cde.feed_products)
    SELECT a.*, (s.items, s.pending - s.queued_keys, s.sent, s.retrying, s.rejected, s.dead, s.deleted)
                = (a.items, a.pending, a.sent, a.retrying, a.rejected, a.dead, a.deleted)
      FROM actual a, cde_feed_status s WHERE s.feed = 'products'
$$;

-- Built (as a full sync does), then every kind of write by hand: the counts follow.
SELECT built, changed FROM cde._rebuild('products', NULL);
SELECT * FROM counts_agree();
UPDATE cde.feed_products SET status = 'sent', sent_at = now() WHERE key::int <= 900;
UPDATE cde.feed_products SET status = 'retrying' WHERE key::int BETWEEN 901 AND 910;
UPDATE cde.feed_products SET status = 'rejected' WHERE key::int BETWEEN 911 AND 913;
UPDATE cde.feed_products SET status = 'dead' WHERE key::int = 914;
SELECT * FROM counts_agree();
-- A changed document: pending again (an upsert, whose update moves rows between counts).
UPDATE products SET price = price + 1 WHERE id IN (1, 2, 901);
DELETE FROM products WHERE id IN (3, 4);
SELECT collected FROM cde_sync_now();
SELECT * FROM counts_agree();
-- The outcomes the worker records: the counts, and the feed's totals, which only grow.
SELECT (cde._record('products', array_agg(key), array_agg(ctid), array_agg(hash),
                    array_agg(CASE key WHEN '1' THEN 'rejected' WHEN '2' THEN 'retry' ELSE 'sent' END::cde.outcome),
                    array_agg(200), array_agg(NULL::text), NULL, array_agg('sink-1'::text), array_agg(modified_at))).*
  FROM cde.feed_products WHERE status = 'pending';
SELECT * FROM counts_agree();
SELECT sent_total, rejected_total, retried_total, dead_total, build_failures_total FROM cde_feed_status;
DELETE FROM cde.feed_products WHERE key = '1000';
SELECT * FROM counts_agree();
-- Folding leaves the sums as they were.
SELECT count(*) > 3 AS several_rows FROM cde.row_counts;
SELECT cde._fold_counts();
SELECT feed, status, deleted, n FROM cde.row_counts ORDER BY status, deleted;   -- '*': the counts are kept
SELECT * FROM counts_agree();

-- Queued changes: each write a row of the queue, counted exactly up to 1,000 rows of a feed.
UPDATE products SET price = price + 1 WHERE id = 10;
UPDATE products SET price = price + 1 WHERE id BETWEEN 11 AND 15;
SELECT pending, queued_keys, queued_changes, queue_exact FROM cde_feed_status;
-- Lag: the age of the oldest change not delivered, queued or built.
SELECT lag FROM cde_feed_status;
UPDATE cde.queue SET queued_at = now() - interval '1 hour' WHERE id = (SELECT min(id) FROM cde.queue);
SELECT lag FROM cde_feed_status;
UPDATE cde.feed_products SET modified_at = now() - interval '2 hours' WHERE key = '902';   -- retrying
SELECT lag FROM cde_feed_status;
-- Beyond 1,000 changes, keys are estimated (as many per change as in the oldest 1,000); changes
-- are still counted up to 20,000 (the oldest and newest 10,000 overlap)...
INSERT INTO cde.queue (feed, keys) SELECT 'products', ARRAY[i::text, (i + 1)::text] FROM generate_series(1, 12000) i;
SELECT queued_changes, queued_keys, queue_exact,
       (SELECT sum(cardinality(keys)) FROM cde.queue WHERE feed = 'products') AS actual_keys FROM cde_feed_status;
-- ...and beyond, estimated from how densely the feed's ids run in those two samples: here half as
-- densely in the newest as in the oldest, and the estimate is a tenth above the count.
INSERT INTO cde.queue (feed, keys)
SELECT CASE WHEN i % 2 = 0 THEN 'products' ELSE 'elsewhere' END, ARRAY['1'] FROM generate_series(1, 50000) i;
SELECT queued_changes, queue_exact, (SELECT count(*) FROM cde.queue WHERE feed = 'products') AS actual FROM cde_feed_status;
DELETE FROM cde.queue;

-- The statements behind the views use the feed table's indexes, never a scan of it (sql/scans.inc).
\i sql/scans.inc
SET LOCAL enable_seqscan = off;   -- a 1000-row table; the plans' shape is the point
SELECT scans($$SELECT min(t.modified_at) FROM cde.feed_products t WHERE t.status = 'pending' AND NOT t.full_sync$$);
SELECT scans($$SELECT min(t.modified_at) FROM cde.feed_products t WHERE t.status = 'pending' AND t.full_sync$$);
SELECT scans($$SELECT min(t.modified_at) FROM cde.feed_products t WHERE t.status = 'retrying'$$);
SELECT scans($$SELECT t.key FROM cde.feed_products t WHERE t.status IN ('retrying', 'rejected', 'dead') ORDER BY t.key$$);
SELECT scans($$SELECT x.key FROM cde.feed_products x WHERE x.deleted AND x.status = 'sent' AND x.sent_at < now() LIMIT 10000$$);
RESET enable_seqscan;

-- Retention: deletions delivered longer ago than cde.tombstone_retention go; unsent or failed
-- ones, and recent ones, stay.
UPDATE cde.feed_products SET deleted = true, doc = NULL,
       status = CASE WHEN key IN ('3', '5', '6') THEN 'sent' WHEN key = '7' THEN 'pending' ELSE 'dead' END,
       sent_at = CASE WHEN key = '6' THEN now() - interval '1 hour' ELSE now() - interval '8 days' END
 WHERE key IN ('3', '5', '6', '7', '8');
SELECT * FROM cde._housekeep(7 * 24 * 3600, -1);
SELECT key, deleted, status FROM cde.feed_products WHERE deleted ORDER BY key;
SELECT * FROM counts_agree();
-- -1 keeps them for ever.
SELECT * FROM cde._housekeep(-1, -1);
SELECT * FROM cde._housekeep(0, -1);
SELECT key, deleted, status FROM cde.feed_products WHERE deleted ORDER BY key;
-- None while a full sync of the feed runs: a step that still sees a deleted key would write its
-- document again where the deletion was (cde._rebuild).
UPDATE cde.feed_products SET deleted = true, doc = NULL, status = 'sent', sent_at = now() - interval '8 days'
 WHERE key = '4';
INSERT INTO cde.sync_runs (feeds, status) VALUES ('{products}', 'executing') RETURNING id AS syncing \gset
INSERT INTO cde.sync_phases (run_id, feed, ordinal) VALUES (:syncing, 'products', 0);
SELECT tombstones FROM cde._housekeep(0, -1);
DELETE FROM cde.sync_runs WHERE id = :syncing;
SELECT tombstones FROM cde._housekeep(0, -1);

-- History: runs that ended longer ago than cde.history_retention go, with their phases and
-- events; a run still going and the last one to end stay, however old.
INSERT INTO cde.sync_runs (feeds, status, started_at, finished_at)
VALUES ('{products}', 'finished', now() - interval '40 days', now() - interval '40 days'),
       ('{products}', 'failed', now() - interval '35 days', now() - interval '35 days'),
       ('{products}', 'executing', now() - interval '50 days', NULL),
       ('{products}', 'cancelled', now() - interval '31 days', now() - interval '31 days');
INSERT INTO cde.sync_phases (run_id, feed, ordinal) SELECT id, 'products', 0 FROM cde.sync_runs;
INSERT INTO cde.sync_events (run_id, status) SELECT id, status FROM cde.sync_runs;
SELECT * FROM cde._housekeep(-1, 30 * 24 * 3600);
SELECT status FROM cde.sync_runs ORDER BY id;
SELECT count(*) AS phases, (SELECT count(*) FROM cde.sync_events) AS events FROM cde.sync_phases;

DELETE FROM cde.sync_runs;

-- Writes with the triggers' default state off (session_replication_role = replica) are counted:
-- the count triggers are ALWAYS.
SET LOCAL session_replication_role = replica;
UPDATE cde.feed_products SET status = 'dead' WHERE key = '100';
RESET session_replication_role;
SELECT * FROM counts_agree();

-- Counts not kept (a restored copy: cde.row_counts is not dumped, and the copy's worker may write
-- its feed tables before their triggers are restored): the housekeeping pass counts the table once.
DELETE FROM cde.row_counts;
SELECT items FROM cde_feed_status;
SELECT recounted FROM cde._housekeep(-1, -1);
SELECT * FROM counts_agree();
SELECT recounted FROM cde._housekeep(-1, -1);
-- Counts gone wrong (writes with the triggers disabled): cde._recount sets them right.
ALTER TABLE cde.feed_products DISABLE TRIGGER cde_count_delete;
DELETE FROM cde.feed_products WHERE key = '200';
ALTER TABLE cde.feed_products ENABLE ALWAYS TRIGGER cde_count_delete;
SELECT agree FROM counts_agree();
SELECT cde._recount('products');
SELECT * FROM counts_agree();

-- A truncated feed table counts nothing; a dropped feed leaves no count behind.
TRUNCATE cde.feed_products;
SELECT * FROM counts_agree();
SELECT cde_drop_feed('products');
SELECT cde._fold_counts();
SELECT count(*) AS counts_left FROM cde.row_counts;
ROLLBACK;

-- Feeds whose names extend one another's: their tables' indexes are named by PostgreSQL.
BEGIN;
SELECT cde_register_feed('p', 'SELECT 1 AS id, ''{}''::jsonb AS doc');
SELECT cde_register_feed('p_failed', 'SELECT 1 AS id, ''{}''::jsonb AS doc');
SELECT cde_register_feed('p_deleted', 'SELECT 1 AS id, ''{}''::jsonb AS doc');
SELECT indexrelid::regclass FROM pg_index WHERE indrelid = 'cde.feed_p'::regclass ORDER BY 1::text;
ROLLBACK;

-- The settings, and their units.
SHOW cde.tombstone_retention;
SHOW cde.history_retention;
SET cde.tombstone_retention = '1h';
SELECT current_setting('cde.tombstone_retention') AS one_hour;
DO $$
BEGIN
    PERFORM set_config('cde.tombstone_retention', '-2', true);
EXCEPTION WHEN invalid_parameter_value THEN
    RAISE NOTICE 'refused: %', sqlerrm LIKE '-2 s is outside the valid range for parameter "cde.tombstone_retention"%';
END $$;
RESET cde.tombstone_retention;
