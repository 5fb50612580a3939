-- Keys that are a column of the changed row are captured by cde._capture; keys that are an expression or a query, by cde._capture_keys (both in Rust), its arguments naming those feeds. One table may have both kinds; TRUNCATE always goes through cde._capture. Both queue the same way.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
SELECT cde_register_feed('price_rows', 'SELECT product_id, currency FROM prices', 'product_id');
SELECT cde_track('price_rows', 'prices');
SELECT tgname, tgfoid::regproc AS function, tgnargs
  FROM pg_trigger WHERE tgrelid = 'prices'::regclass AND NOT tgisinternal ORDER BY tgname;
INSERT INTO prices VALUES (2, 'USD', 7), (2, 'GBP', 6);
UPDATE prices SET product_id = 1 WHERE product_id = 2 AND currency = 'GBP';   -- old and new keys
SELECT * FROM queued();
ROLLBACK;
