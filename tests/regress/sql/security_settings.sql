-- A session's settings (a database owner's ALTER DATABASE ... SET, a role's own) change nothing
-- in what cde runs: every SECURITY DEFINER function and event trigger pins its search_path, and
-- the keys of a tracking resolve in the feed's own. Here a search_path puts functions that would
-- make their owner a superuser before pg_catalog's, and every cde path is taken under it.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;   -- the endpoint is the test sink
CREATE ROLE regress_dbowner;
CREATE SCHEMA regress_shadow AUTHORIZATION regress_dbowner;
SET ROLE regress_dbowner;
CREATE TABLE regress_shadow.calls (fn text, who name);
GRANT INSERT ON regress_shadow.calls TO PUBLIC;
CREATE FUNCTION regress_shadow.grab(fn text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO regress_shadow.calls VALUES (fn, current_user);
    BEGIN
        EXECUTE 'ALTER ROLE regress_dbowner SUPERUSER';
    EXCEPTION WHEN insufficient_privilege THEN NULL;
    END;
END $$;
CREATE FUNCTION regress_shadow.now() RETURNS timestamptz LANGUAGE plpgsql AS
    $$BEGIN PERFORM regress_shadow.grab('now'); RETURN pg_catalog.now(); END$$;
CREATE FUNCTION regress_shadow.cardinality(anyarray) RETURNS int LANGUAGE plpgsql AS
    $$BEGIN PERFORM regress_shadow.grab('cardinality'); RETURN pg_catalog.cardinality($1); END$$;
CREATE FUNCTION regress_shadow.array_length(anyarray, int) RETURNS int LANGUAGE plpgsql AS
    $$BEGIN PERFORM regress_shadow.grab('array_length'); RETURN pg_catalog.array_length($1, $2); END$$;
CREATE FUNCTION regress_shadow."left"(text, int) RETURNS text LANGUAGE plpgsql AS
    $$BEGIN PERFORM regress_shadow.grab('left'); RETURN pg_catalog."left"($1, $2); END$$;
CREATE FUNCTION regress_shadow.format(text, VARIADIC "any") RETURNS text LANGUAGE plpgsql AS
    $$BEGIN PERFORM regress_shadow.grab('format'); RETURN NULL; END$$;
CREATE FUNCTION regress_shadow.texteq_shadow(text, text) RETURNS boolean LANGUAGE plpgsql AS
    $$BEGIN PERFORM regress_shadow.grab('='); RETURN pg_catalog.texteq($1, $2); END$$;
CREATE OPERATOR regress_shadow.= (LEFTARG = text, RIGHTARG = text, FUNCTION = regress_shadow.texteq_shadow);
RESET ROLE;

CREATE TABLE categories (id int PRIMARY KEY, name text);
CREATE TABLE products (id int PRIMARY KEY, category_id int, name text);
INSERT INTO categories VALUES (1, 'one');
INSERT INTO products VALUES (1, 1, 'p1'), (2, 1, 'p2');
-- The superuser's session takes the hostile search_path (as it would from ALTER DATABASE).
SET search_path = regress_shadow, pg_catalog, public;
SELECT cde_register_feed('products', 'SELECT p.id, p.name, c.name AS category FROM products p JOIN categories c ON c.id = p.category_id',
                         search_path => '{public}');
SELECT cde_track('products', 'products');
SELECT cde_track('products', 'categories', 'SELECT p.id FROM products p JOIN changed c ON p.category_id = c.id');
SELECT cde_full_sync();
SELECT feed, collected FROM cde_sync_now();
UPDATE categories SET name = 'uno';
UPDATE products SET name = 'p2b' WHERE id = 2;
SELECT feed, collected FROM cde_sync_now();
SELECT cde_resync('products', '{1}');
SELECT cde_retry_failed();
ALTER TABLE products ADD COLUMN note text;
SELECT feed, items, pending FROM cde_feed_status;
SELECT count(*) FROM cde_failed_items;
SELECT status FROM cde_sync_runs;
SELECT cde_untrack('products', 'categories');
DROP TABLE categories CASCADE;
SELECT cde_drop_feed('products');
RESET search_path;
-- None of the shadowing functions ran, and their owner is no superuser.
SELECT fn, who FROM regress_shadow.calls;
SELECT rolsuper FROM pg_roles WHERE rolname = 'regress_dbowner';

-- What the catalog says: every SECURITY DEFINER function of cde and every function its event
-- triggers call pins search_path; nothing in schema cde is executable by PUBLIC but what the
-- generated code calls (pure functions).
SELECT p.oid::regprocedure AS definer_without_pinned_search_path
  FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
 WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'cde')
   AND p.prosecdef AND NOT coalesce('search_path=pg_catalog, pg_temp' = ANY (p.proconfig), false);
SELECT e.evtname, p.prosecdef, p.proconfig
  FROM pg_event_trigger e JOIN pg_proc p ON p.oid = e.evtfoid ORDER BY e.evtname;
SELECT p.oid::regprocedure AS public_may_execute
  FROM pg_proc p WHERE p.pronamespace = 'cde'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE')
 ORDER BY p.oid::regprocedure::text;
SELECT p.oid::regprocedure AS definer
  FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass AND d.deptype = 'e'
 WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'cde') AND p.prosecdef
 ORDER BY p.oid::regprocedure::text;
ROLLBACK;
