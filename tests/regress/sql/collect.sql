-- Collecting and sending: queued keys become documents in the feed table, then go to the sink.
-- The test cluster's cde.endpoint points at the project's sink; cde_sync_now() runs one
-- iteration in this session.
\i sql/fresh.inc

CREATE TABLE products (id bigint PRIMARY KEY, sku text NOT NULL, price numeric NOT NULL, visible boolean NOT NULL DEFAULT true);
INSERT INTO products SELECT i, 'SKU-' || i, i * 1.5 FROM generate_series(1, 20000) i;
ANALYZE products;

-- Invisible products have no document: for the feed, they do not exist.
SELECT cde_register_feed('products',
    $$SELECT id, CASE WHEN visible THEN jsonb_build_object('sku', sku, 'price', price) END AS doc FROM products$$);
SELECT cde_track('products', 'products');

CREATE FUNCTION feed() RETURNS TABLE (key text, doc jsonb, deleted boolean, status text, attempts int)
LANGUAGE sql AS $$ SELECT key, doc, deleted, status, attempts FROM cde.feed_products ORDER BY key::bigint $$;

-- Collect only (no endpoint): documents are built and wait, pending.
SET cde.endpoint = '';
UPDATE products SET price = price + 1 WHERE id IN (1, 2, 3);
SELECT * FROM cde_sync_now();
SELECT * FROM feed();

-- Rebuilding a few keys of a large table uses its index, never a scan of the table.
-- (pg_stat_xact_user_tables counts scans not yet reported: compare before and after.)
BEGIN;
UPDATE products SET price = price + 1 WHERE id IN (10, 20, 30, 40, 50);
SELECT seq_scan AS seq_before, idx_scan AS idx_before FROM pg_stat_xact_user_tables WHERE relname = 'products' \gset
SELECT collected FROM cde_sync_now();
SELECT seq_scan - :seq_before AS seq_scans, idx_scan > :idx_before AS used_index
  FROM pg_stat_xact_user_tables WHERE relname = 'products';
COMMIT;

-- Now with the sink: everything pending is sent.
RESET cde.endpoint;
SELECT * FROM cde_sync_now();
SELECT status, count(*) FROM cde.feed_products GROUP BY status;

-- An update that does not change the document is not sent again.
UPDATE products SET sku = sku WHERE id = 1;
SELECT * FROM cde_sync_now();
SELECT key, status FROM feed() WHERE key = '1';

-- A change is sent once, in its newest version.
UPDATE products SET price = 100 WHERE id = 1;
UPDATE products SET price = 200 WHERE id = 1;
SELECT * FROM cde_sync_now();
SELECT key, doc, status FROM feed() WHERE key = '1';

-- A key the source no longer returns is a deletion, sent once.
DELETE FROM products WHERE id = 2;
UPDATE products SET visible = false WHERE id = 3;
SELECT * FROM cde_sync_now();
SELECT * FROM feed() WHERE key IN ('2', '3');
SELECT * FROM cde_sync_now();
-- ...and it comes back when the entity does.
UPDATE products SET visible = true WHERE id = 3;
SELECT * FROM cde_sync_now();
SELECT * FROM feed() WHERE key = '3';

-- Several statements in one transaction, several rows in one statement: one document each.
BEGIN;
UPDATE products SET price = price * 2 WHERE id BETWEEN 100 AND 109;
UPDATE products SET price = price * 2 WHERE id BETWEEN 105 AND 114;
INSERT INTO products VALUES (30001, 'NEW', 1);
COMMIT;
SELECT * FROM cde_sync_now();

-- Re-registering with another query rebuilds every document; those that did not change are
-- not sent again (here: a new field, so all change). It runs as a full sync.
SELECT cde_register_feed('products',
    $$SELECT id, CASE WHEN visible THEN jsonb_build_object('sku', sku, 'price', price, 'v', 2) END AS doc FROM products$$);
SELECT feed, collected, sent, failed FROM cde_sync_now();
SELECT status, count(*) FROM cde.feed_products GROUP BY status ORDER BY status;

-- cde_resync sends keys again even though unchanged; cde_retry_failed has nothing to do.
SELECT cde_resync('products', ARRAY['1', '4', '999999']);
SELECT key, status FROM feed() WHERE key IN ('1', '4');
SELECT * FROM cde_sync_now();
SELECT cde_retry_failed();
SELECT cde_retry_failed('products');

-- Bad input.
SELECT * FROM cde_sync_now('nope');
SELECT cde_resync('nope', ARRAY['1']);
SELECT cde_resync('products', NULL);
SELECT cde_retry_failed('nope');

-- The source query starts failing for some keys: those keys fail with the error recorded, the
-- rest of the feed keeps flowing.
SELECT cde_register_feed('fragile',
    $$SELECT id, jsonb_build_object('inverse', 1 / (id % 7)) AS doc FROM products WHERE id <= 20$$);
SELECT cde_track('fragile', 'products');
UPDATE products SET price = price + 1 WHERE id BETWEEN 5 AND 9;
SELECT * FROM cde_sync_now('fragile');
SELECT key, status, error, attempts FROM cde.feed_fragile ORDER BY key::int;
SELECT feed, key, status, error FROM cde_failed_items;
SELECT feed, key, reason FROM cde.retries;

-- cde_sync_now() reads in each statement's snapshot: a transaction's one snapshot is refused.
BEGIN ISOLATION LEVEL REPEATABLE READ;
SELECT * FROM cde_sync_now();
ROLLBACK;
BEGIN ISOLATION LEVEL SERIALIZABLE;
SELECT * FROM cde_sync_now();
ROLLBACK;
SET default_transaction_isolation = 'repeatable read';
SELECT * FROM cde_sync_now();
CALL cde_deliver();   -- its steps' transactions would take the session's default
BEGIN ISOLATION LEVEL READ COMMITTED;   -- this one's own level is what counts
SELECT count(*) FROM cde_sync_now();
ROLLBACK;
RESET default_transaction_isolation;
