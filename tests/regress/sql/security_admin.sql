-- A delegated admin (cde_grant_admin) manages its own feeds, and gains no right through cde:
-- its source queries and keys run with its rights, whoever runs them, and it can change none of
-- what the workers execute. Every statement below runs as that role unless RESET ROLE says not.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;   -- the endpoint is the test sink
CREATE ROLE regress_admin;
CREATE ROLE regress_other_admin;
SELECT cde_grant_admin('regress_admin');
SELECT cde_grant_admin('regress_other_admin');
-- What the grant gave: the management functions, the views, USAGE on schema cde; not pg_monitor.
SELECT pg_has_role('regress_admin', 'pg_monitor', 'MEMBER') AS in_pg_monitor,
       has_function_privilege('regress_admin', 'cde_register_feed(text, text, text, text, text[], int, name[], text, text[], bigint)', 'EXECUTE') AS may_register,
       has_table_privilege('regress_admin', 'cde_feed_status', 'SELECT') AS reads_status,
       has_schema_privilege('regress_admin', 'cde', 'CREATE') AS creates_in_cde;

CREATE TABLE orders (id int PRIMARY KEY, total numeric);
INSERT INTO orders VALUES (1, 10), (2, 20);
CREATE TABLE secrets (id int PRIMARY KEY, secret text);
GRANT SELECT, TRIGGER ON orders TO regress_admin;
CREATE SCHEMA regress_evil AUTHORIZATION regress_admin;

-- The admin's function tries to make it a superuser, which only works when a superuser runs it,
-- and notes who ran it.
SET ROLE regress_admin;
CREATE TABLE regress_evil.seen (who name, superuser_now boolean);
CREATE FUNCTION regress_evil.probe() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    BEGIN
        EXECUTE 'ALTER ROLE regress_admin SUPERUSER';
    EXCEPTION WHEN insufficient_privilege THEN
        NULL;
    END;
    INSERT INTO regress_evil.seen SELECT current_user, rolsuper FROM pg_roles WHERE rolname = 'regress_admin';
    RETURN true;
END $$;
SELECT cde_register_feed('orders', 'SELECT id, total FROM orders WHERE regress_evil.probe()',
                         search_path => '{public}');
SELECT cde_track('orders', 'orders');
SELECT cde_track('orders', 'orders', 'CASE WHEN regress_evil.probe() THEN id END');
-- A feed over a table it may not read is refused at registration.
SELECT cde_register_feed('leak', 'SELECT id, secret FROM secrets');
RESET ROLE;

-- A superuser (as the worker is) runs every path of that feed: a full sync (plan, chunks,
-- deletion pass), a collect of a captured change, a resync, a dry run.
SELECT cde_full_sync('orders');
SELECT feed, collected FROM cde_sync_now();
UPDATE orders SET total = 11 WHERE id = 1;
SELECT feed, collected FROM cde_sync_now();
SELECT cde_resync('orders', '{1,2}');
SELECT cde_full_sync('orders', dry_run => true);
SELECT feed, collected FROM cde_sync_now();
SELECT status, error FROM cde_sync_runs ORDER BY run_id;
-- Its function always ran as the admin, and the admin is not a superuser.
SELECT DISTINCT who, superuser_now FROM regress_evil.seen;
SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_admin';

-- What the workers execute or interpolate cannot be changed by the admin.
SET ROLE regress_admin;
UPDATE cde.feeds SET source_query = 'SELECT 1 AS id' WHERE name = 'orders';
UPDATE cde.feeds SET feed_table = 'regress_evil.seen'::regclass WHERE name = 'orders';
INSERT INTO cde.queue (feed, keys) VALUES ('orders', '{1}');
DELETE FROM cde.retries;
SELECT count(*) FROM cde.tracks;
\set VERBOSITY terse
CREATE TABLE cde.mine (id int);   -- terse: where the error points differs between versions
\set VERBOSITY default
CREATE FUNCTION cde.mine() RETURNS int LANGUAGE sql AS 'SELECT 1';
CREATE TRIGGER mine AFTER INSERT ON cde.feed_orders EXECUTE FUNCTION regress_evil.probe();
CREATE INDEX ON cde.feed_orders ((regress_evil.probe()));
CREATE RULE mine AS ON UPDATE TO cde.feed_orders DO ALSO SELECT 1;
ALTER TABLE cde.feed_orders ENABLE ROW LEVEL SECURITY;
INSERT INTO cde.feed_orders (key, doc) VALUES ('3', '{}');
CREATE OR REPLACE FUNCTION cde._source_sql(f cde.feeds, mode text) RETURNS text LANGUAGE sql AS 'SELECT 1';
ALTER FUNCTION cde._rebuild(text, text[], text, text, int, int, int) SECURITY DEFINER;
-- Nor call cde's internals.
SELECT cde._rebuild('orders', NULL, 'count');
SELECT cde._source('orders', 'count');
SELECT cde._query_as('postgres'::regrole, 'public', 'SELECT 1');
SELECT cde._enqueue('orders', '{1}');
SELECT cde._collect('orders');
SELECT cde._hold_iteration_lock();
-- Nor attach cde's capture trigger to a table of its own, to queue keys of any feed it names.
CREATE TABLE regress_evil.mine (id int);
CREATE TRIGGER mine AFTER UPDATE ON regress_evil.mine REFERENCING NEW TABLE AS n
    FOR EACH STATEMENT EXECUTE FUNCTION cde._capture('orders', 'id');
-- Nor track cde's own tables, or a table on which it has no TRIGGER right.
SELECT cde_track('orders', 'cde.queue');
SELECT cde_track('orders', 'secrets');
RESET ROLE;

-- Nothing is generated for the feed but its table, which the extension's owner owns and on
-- which the admin has no right; its source query runs as the admin even for a superuser.
SELECT count(*) AS generated_functions FROM pg_proc WHERE pronamespace = 'cde'::regnamespace AND proname LIKE '%orders%';
SELECT relowner::regrole = (SELECT extowner::regrole FROM pg_extension WHERE extname = 'cde') AS feed_table_owned_by_extension_owner,
       (SELECT array_agg(DISTINCT a.grantee::regrole::text) FROM aclexplode(relacl) a) AS grantees   -- the owner alone
  FROM pg_class WHERE oid = 'cde.feed_orders'::regclass;
TRUNCATE regress_evil.seen;
SELECT o AS rows FROM cde._source('orders', 'count');
SELECT DISTINCT who FROM regress_evil.seen;

-- The admin's code cannot act as someone else through cde: a source query calling cde's
-- management functions (run by a superuser, it would otherwise register a feed as that
-- superuser), a forged ticket, a trigger of its own fired by a superuser's write.
SET ROLE regress_admin;
CREATE FUNCTION regress_evil.register() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    PERFORM cde_register_feed('pwn', 'SELECT 1 AS id', search_path => '{public}');
    RETURN true;
END $$;
SELECT cde_register_feed('sneaky', 'SELECT id FROM orders WHERE regress_evil.register()', search_path => '{public}');
SELECT cde_register_feed('forged', 'SELECT 1 AS id', ticket => 42);
CREATE TABLE regress_evil.box (id int);
CREATE FUNCTION regress_evil.on_box() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM cde_register_feed('boxed', 'SELECT 1 AS id', search_path => '{public}');
    RETURN NULL;
END $$;
CREATE TRIGGER on_box AFTER INSERT ON regress_evil.box FOR EACH STATEMENT EXECUTE FUNCTION regress_evil.on_box();
-- A view with a trigger named like cde's, to be read by cde as the extension's owner.
CREATE TABLE regress_evil.calls (who name);
CREATE FUNCTION regress_evil.spy() RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN INSERT INTO regress_evil.calls VALUES (current_user); RETURN false; END $$;
CREATE VIEW regress_evil.lure AS SELECT 1 AS id WHERE regress_evil.spy();
CREATE FUNCTION regress_evil.noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$;
CREATE TRIGGER cde_capture_trn INSTEAD OF INSERT ON regress_evil.lure FOR EACH ROW EXECUTE FUNCTION regress_evil.noop();
CREATE TABLE regress_evil.parent (id int);
CREATE TABLE regress_evil.child (id int);
ALTER TABLE regress_evil.child INHERIT regress_evil.parent;
RESET ROLE;
SELECT cde_full_sync('sneaky') > 0 AS started;
SELECT feed, collected, failed FROM cde_sync_now('sneaky');
SELECT status, error FROM cde_sync_runs WHERE feeds = '{sneaky}';
INSERT INTO regress_evil.box VALUES (1);              -- a superuser's write fires the admin's trigger
SELECT name, owner FROM cde.feeds WHERE name IN ('pwn', 'boxed', 'forged') ORDER BY name;
SELECT count(*) AS spied FROM regress_evil.calls;
SELECT cde_drop_feed('boxed');

-- One admin's feed is not another's: it may not redefine, drop, track, sync or resend it.
SET ROLE regress_other_admin;
SELECT cde_register_feed('orders', 'SELECT 1 AS id');
SELECT cde_drop_feed('orders');
SELECT cde_track('orders', 'orders');
SELECT cde_untrack('orders', 'orders');
SELECT cde_full_sync('orders');
SELECT cde_resync('orders', '{1}');
SELECT cde_retry_failed('orders');
SELECT cde_full_sync();
SELECT count(*) FROM cde_sync_now();
SELECT cde_cancel_sync(1);
SELECT feed FROM cde_feed_status;   -- the views show every feed to every admin
RESET ROLE;

-- Revoked later: the feed keeps its owner's rights, even run by a superuser.
REVOKE SELECT ON orders FROM regress_admin;
UPDATE orders SET total = 12 WHERE id = 1;
SELECT feed, collected, failed FROM cde_sync_now('orders');
SELECT key, status, error FROM cde.feed_orders WHERE status <> 'sent' ORDER BY key;

-- cde_revoke_admin takes it all back.
SELECT cde_revoke_admin('regress_other_admin');
SELECT has_function_privilege('regress_other_admin', 'cde_full_sync(text, boolean, bigint)', 'EXECUTE') AS may_sync,
       has_schema_privilege('regress_other_admin', 'cde', 'USAGE') AS uses_cde;
ROLLBACK;
