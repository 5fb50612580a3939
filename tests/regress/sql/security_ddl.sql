-- Installing cde takes nothing away: any role keeps CREATE, ALTER and DROP on its own tables,
-- tracked ones included (an ALTER that breaks a tracking is refused, naming the feed; a DROP
-- untracks). cde's event triggers run for everyone's DDL, with cde's rights, not the caller's.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
SET cde.endpoint = '';
BEGIN;
CREATE ROLE regress_app;
GRANT CREATE ON SCHEMA public TO regress_app;

-- A role that has nothing to do with cde: its whole DDL cycle.
SET ROLE regress_app;
CREATE TABLE t (id int);
ALTER TABLE t ADD COLUMN c int;
ALTER TABLE t RENAME COLUMN c TO d;
ALTER TABLE t ALTER COLUMN d TYPE bigint;
CREATE INDEX ON t (d);
ALTER TABLE t DROP COLUMN d;
DROP TABLE t;
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric);
INSERT INTO items VALUES (1, 'one', 1), (2, 'two', 2);
RESET ROLE;

-- Its table, tracked by a superuser's feed.
SELECT cde_register_feed('items', 'SELECT id, name, price FROM items');
SELECT cde_track('items', 'items');
SELECT cde_track('items', 'items', 'id + 0');

SET ROLE regress_app;
ALTER TABLE items ADD COLUMN stock int;
ALTER TABLE items RENAME COLUMN stock TO qty;
ALTER TABLE items DROP COLUMN qty;
UPDATE items SET price = 3 WHERE id = 1;
ALTER TABLE items DROP COLUMN id CASCADE;       -- the feed's key: refused, naming the feed
ALTER TABLE items RENAME TO goods;              -- fine: triggers follow the table
DROP TABLE goods;                               -- untracked
RESET ROLE;
SELECT feed, tracked_tables FROM cde_feed_status;
SELECT count(*) AS capture_triggers_left FROM pg_trigger WHERE tgname LIKE 'cde\_capture%';
ROLLBACK;
