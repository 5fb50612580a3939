-- Untrack and drop remove their triggers.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
SELECT cde_register_feed('skus', 'SELECT id, sku FROM products');
SELECT cde_track('skus', 'products');
SELECT cde_untrack('products', 'categories');
SELECT tgname FROM pg_trigger WHERE tgrelid = 'categories'::regclass AND NOT tgisinternal;
SELECT cde_drop_feed('skus');
SELECT tgname FROM pg_trigger WHERE tgrelid = 'products'::regclass AND NOT tgisinternal ORDER BY tgname;
ROLLBACK;
