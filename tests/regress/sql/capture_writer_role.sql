-- An application role that may only write the tracked table needs nothing of cde's, and its search_path does not reach capture.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
CREATE ROLE regress_cde_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON products TO regress_cde_writer;
SET ROLE regress_cde_writer;
SET search_path = pg_temp, public;
UPDATE products SET sku = 'by app' WHERE id = 2;
SELECT count(*) FROM cde.queue;      -- and it cannot read cde's tables
RESET ROLE;
RESET search_path;
SELECT * FROM queued();
ROLLBACK;
