-- A rollback leaves nothing behind.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
SAVEPOINT before;
UPDATE products SET sku = 'rolled back' WHERE id = 1;
ROLLBACK TO SAVEPOINT before;
SELECT count(*) AS queued_after_rollback FROM cde.queue;
ROLLBACK;
