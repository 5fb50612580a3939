-- Dependent keys: renaming a category touches its products; moving a product between categories, both row images count.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
UPDATE categories SET name = 'Boots' WHERE id = 1;
UPDATE products SET category_id = 2 WHERE id = 2;
SELECT * FROM queued();
ROLLBACK;
