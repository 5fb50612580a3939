-- Tracking: bad input, each a clear error.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
SELECT cde_track('nope', 'products');
SELECT cde_track('products', 'no_such_table');
SELECT cde_track('products', 'product_names');
SELECT cde_track('products', 'prices', 'no_such_column');
SELECT cde_track('products', 'prices', 'SELECT x FROM changed');
SELECT cde_untrack('products', 'product_names');
SELECT cde_register_feed('skus', 'SELECT id, sku FROM products');
SELECT cde_untrack('skus', 'prices');
ROLLBACK;
