-- Capture records the touched keys once per statement, keys only: one queue row per statement.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
INSERT INTO products VALUES (4, 'D', 1), (5, 'E', 1), (6, 'F', 2);    -- one statement, three rows
UPDATE products SET sku = sku || '!' WHERE id IN (1, 3);
INSERT INTO prices VALUES (2, 'EUR', 10), (2, 'USD', 11);
DELETE FROM products WHERE id = 3;
UPDATE products SET sku = sku WHERE false;                           -- no row: nothing queued
SELECT * FROM queued();
ROLLBACK;
