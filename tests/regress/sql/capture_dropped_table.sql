-- A tracked table that is dropped is forgotten.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
DROP TABLE prices;
SELECT feed, table_name FROM cde.tracks ORDER BY table_name;
ROLLBACK;
