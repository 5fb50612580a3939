-- TRUNCATE: every key may have changed (the collector makes it a full sync).
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
TRUNCATE prices;
SELECT * FROM queued();
ROLLBACK;
