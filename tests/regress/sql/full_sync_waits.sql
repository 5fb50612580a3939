-- A full sync phase ends when what it built is delivered: rows that writers changed after it
-- built do not keep it going. With no endpoint, the run says that it waits for one.
\i sql/fresh.inc
BEGIN;
CREATE TABLE items (id int PRIMARY KEY, name text);
INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 50) g;
SELECT cde_register_feed('items', 'SELECT id, name FROM items');
SELECT cde_track('items', 'items');
SET cde.endpoint = '';
SELECT cde_full_sync('items');
SELECT feed, collected, sent FROM cde_sync_now();
SELECT status, current_phase, waiting_for FROM cde_sync_runs;
SELECT message FROM cde.sync_events WHERE message LIKE 'waiting%';
SELECT feed, collected, sent FROM cde_sync_now();      -- said once
SELECT count(*) FROM cde.sync_events WHERE message LIKE 'waiting%';
-- With the endpoint back (the test sink): delivered, and the run ends.
RESET cde.endpoint;
SELECT feed, collected, sent FROM cde_sync_now();
SELECT status, waiting_for, phases->'items'->>'sent' AS sent FROM cde_sync_runs;
ROLLBACK;
