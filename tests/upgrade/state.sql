-- A database's state that an upgrade must carry: feeds (one a delegated admin's), tracks (a
-- column, an expression, a query over "changed", a partitioned table), queued keys, pending,
-- retrying and dead items, a full sync running. Uses only the 0.1.0 API: run on 0.1.0 before
-- the upgrade, and on a fresh 0.2.0 to compare with.
\set ON_ERROR_STOP on
SET client_min_messages = warning;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'cde_upgrade_admin') THEN CREATE ROLE cde_upgrade_admin; END IF;
END $$;
CREATE TABLE up_categories (id int PRIMARY KEY, name text);
CREATE TABLE up_items (id int PRIMARY KEY, category_id int, name text);
CREATE TABLE up_ledger (id int, part int, amount numeric, PRIMARY KEY (id, part)) PARTITION BY LIST (part);
CREATE TABLE up_ledger_0 PARTITION OF up_ledger FOR VALUES IN (0);
CREATE TABLE up_ledger_1 PARTITION OF up_ledger FOR VALUES IN (1);
INSERT INTO up_categories SELECT g, 'category ' || g FROM generate_series(1, 3) g;
INSERT INTO up_items SELECT g, 1 + g % 3, 'item ' || g FROM generate_series(1, 20) g;
INSERT INTO up_ledger SELECT g, g % 2, g FROM generate_series(1, 10) g;
SET cde.endpoint = '';
SELECT cde_register_feed('up_categories', 'SELECT id, name FROM up_categories');
SELECT cde_register_feed('up_items', $$SELECT i.id, jsonb_build_object('name', i.name, 'category', c.name) AS doc
                                         FROM up_items i JOIN up_categories c ON c.id = i.category_id$$,
                         depends_on => '{up_categories}');
SELECT cde_register_feed('up_ledger', 'SELECT id, part, amount FROM up_ledger');
SELECT cde_track('up_categories', 'up_categories');
SELECT cde_track('up_items', 'up_items');
SELECT cde_track('up_items', 'up_categories', 'SELECT i.id FROM up_items i JOIN changed c ON c.id = i.category_id');
SELECT cde_track('up_ledger', 'up_ledger', 'id * 1');
SELECT cde_grant_admin('cde_upgrade_admin');
CREATE TABLE up_notes (id int PRIMARY KEY, note text);
INSERT INTO up_notes VALUES (1, 'one'), (2, 'two');
ALTER TABLE up_notes OWNER TO cde_upgrade_admin;
SET ROLE cde_upgrade_admin;
SELECT cde_register_feed('up_notes', 'SELECT id, note FROM up_notes');
SELECT cde_track('up_notes', 'up_notes');
RESET ROLE;
-- Documents built, not sent (no endpoint in this session): pending. Every row touched, so
-- that capture queues every key.
UPDATE up_categories SET name = name;
UPDATE up_items SET name = name;
UPDATE up_ledger SET amount = amount;
UPDATE up_notes SET note = note;
SELECT count(*) FROM cde.feeds f, LATERAL cde._collect(f.name) c;   -- SQL only: on 0.1.0 the new library's Rust would need 0.2.0's objects
-- One item retrying, one dead, as the worker would have recorded them.
UPDATE cde.feed_up_items SET status = 'retrying', attempts = 1, http_status = 503, error = 'HTTP 503: down' WHERE key = '1';
INSERT INTO cde.retries (feed, key, next_attempt_at, reason) VALUES ('up_items', '1', now(), 'send');
UPDATE cde.feed_up_items SET status = 'dead', attempts = 5, http_status = 500, error = 'HTTP 500: boom' WHERE key = '2';
-- Keys queued and not collected.
UPDATE up_items SET name = name || ' (queued)' WHERE id IN (3, 4);
UPDATE up_ledger_1 SET amount = 100 WHERE id = 1;
-- A full sync running.
SELECT cde_full_sync('up_categories') > 0 AS run_started;
RESET cde.endpoint;
