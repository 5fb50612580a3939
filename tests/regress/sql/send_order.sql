-- The send order of a feed: its changes first, then what full syncs made pending, each oldest
-- first (docs/nothing-lost.md, "Order"), so that a change made during a long full sync does not
-- wait behind the sync's documents. The worker reads each slice with cde._read_sql's statement
-- (src/deliver.rs): printed here, then run over rows of both lanes.
\i sql/fresh.inc

CREATE TABLE products (id bigint PRIMARY KEY, name text NOT NULL);
INSERT INTO products SELECT i, 'Product ' || i FROM generate_series(1, 6) i;
SELECT cde_register_feed('products', 'SELECT id, name FROM products');

-- A full sync step makes its documents pending in the full syncs' lane.
SELECT built, changed FROM cde._rebuild('products', NULL, 'chunk', NULL, 100);
SELECT key, status, full_sync FROM cde.feed_products ORDER BY key COLLATE "C";

-- A change is pending in the changes' lane, whichever lane its row was in; a new key too, and a
-- deletion. A full sync step that builds the same document again leaves it there.
UPDATE products SET name = 'changed' WHERE id = 5;
SELECT built, changed FROM cde._rebuild('products', '{5}');
INSERT INTO products VALUES (7, 'new');
SELECT built, changed FROM cde._rebuild('products', '{7}');
DELETE FROM products WHERE id = 2;
SELECT deleted FROM cde._rebuild('products', '{2}');
SELECT built, changed FROM cde._rebuild('products', NULL, 'chunk', NULL, 100);
SELECT key, deleted, status, full_sync FROM cde.feed_products ORDER BY key COLLATE "C";
-- cde_resync is a change: it moves the key to the changes' lane.
SELECT cde_resync('products', '{3}');
SELECT key, full_sync FROM cde.feed_products WHERE key = '3';

-- The statement, from the start of both lanes.
SELECT cde._read_sql('cde.feed_products', 4, false, false) AS read \gset
\echo :read
-- Four rows: the four changes, oldest first, then nothing of the full syncs' lane. The last
-- parameter is the feed: keys a sync builder is posting wait (tests/isolation, builders' posts).
PREPARE first_read(text) AS SELECT key, deleted, full_sync FROM (:read) AS r;
EXECUTE first_read('products');
-- Six rows: the changes, then the full syncs' rows, oldest first (the same transaction: by key).
SELECT cde._read_sql('cde.feed_products', 6, false, false) AS read \gset
PREPARE six(text) AS SELECT key, deleted, full_sync FROM (:read) AS r;
EXECUTE six('products');
-- After a cursor in each lane: what comes after the change to 7, then after the sync's row 1.
SELECT cde._read_sql('cde.feed_products', 6, true, true) AS read \gset
SELECT modified_at::text AS changes_at FROM cde.feed_products WHERE key = '7' \gset
SELECT modified_at::text AS sync_at FROM cde.feed_products WHERE key = '1' \gset
PREPARE after_cursors(timestamptz, text, timestamptz, text, text) AS SELECT key, deleted, full_sync FROM (:read) AS r;
EXECUTE after_cursors(:'changes_at', '7', :'sync_at', '1', 'products');

-- Each lane is an ordered scan of the pending index, however many rows are pending.
\i sql/scans.inc
SET enable_seqscan = off;   -- a 7-row table; the plan's shape is the point
SELECT scans($$EXECUTE after_cursors(now(), '7', now(), '1', 'products')$$);
RESET enable_seqscan;

-- A change whose document a full sync step wrote first (its snapshot saw the change): the collect
-- finds the document unchanged, and moves the row to the changes' lane all the same.
UPDATE products SET name = 'seen by the step' WHERE id = 6;
SELECT built, changed FROM cde._rebuild('products', NULL, 'chunk', NULL, 100);
SELECT key, full_sync FROM cde.feed_products WHERE key = '6';
SELECT built, changed FROM cde._rebuild('products', '{6}');
SELECT key, full_sync FROM cde.feed_products WHERE key = '6';
-- A row pending as a change stays one when a full sync step writes it again.
UPDATE products SET name = 'changed again' WHERE id = 6;
SELECT built, changed FROM cde._rebuild('products', NULL, 'chunk', NULL, 100);
SELECT key, doc->>'name' AS name, full_sync FROM cde.feed_products WHERE key = '6';
