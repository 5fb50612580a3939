-- A feed's tracks, and the triggers they give each table.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
SELECT feed, table_name, keys FROM cde.tracks ORDER BY table_name;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'products'::regclass AND NOT tgisinternal ORDER BY tgname;
ROLLBACK;
