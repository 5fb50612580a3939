-- A tracked table may be renamed: its triggers follow it. An ALTER TABLE that breaks the keys of a tracking is refused, rather than every later write failing.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
CREATE TABLE stock (sku text PRIMARY KEY, product_id bigint, qty int);
SELECT cde_track('products', 'stock', 'product_id');
ALTER TABLE stock RENAME TO inventory;
INSERT INTO inventory VALUES ('A', 1, 5);
SELECT * FROM queued();
SELECT feed, table_name, keys FROM cde.tracks WHERE keys = 'product_id';
ALTER TABLE inventory DROP COLUMN product_id;
ALTER TABLE inventory RENAME COLUMN product_id TO pid;
ALTER TABLE inventory ADD COLUMN note text;                    -- harmless changes pass
SELECT cde_untrack('products', 'inventory');
ALTER TABLE inventory DROP COLUMN product_id;
ROLLBACK;
