-- Several feeds may track one table; tracking again for the same feed replaces the definition.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
SELECT cde_register_feed('skus', 'SELECT id, sku FROM products');
SELECT cde_track('skus', 'products');
SELECT cde_track('products', 'prices', 'SELECT product_id FROM changed');
SELECT feed, table_name, keys FROM cde.tracks ORDER BY feed, table_name;
INSERT INTO prices VALUES (1, 'EUR', 5);
UPDATE products SET sku = 'A2' WHERE id = 1;
SELECT * FROM queued();
ROLLBACK;
