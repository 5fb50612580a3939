-- An application role that may only write the tracked table needs nothing of cde's, and its search_path does not reach capture.
\i sql/fresh.inc
\set ON_ERROR_ROLLBACK on
BEGIN;
\i sql/capture_setup.inc
CREATE ROLE regress_cde_writer;
GRANT SELECT, INSERT, UPDATE, DELETE ON products TO regress_cde_writer;
-- Functions named like those capture could call, first in the writer's search_path.
CREATE SCHEMA regress_shadow;
GRANT USAGE ON SCHEMA regress_shadow TO PUBLIC;
CREATE FUNCTION regress_shadow.unnest(anyarray) RETURNS SETOF anyelement
LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'shadowing unnest ran as %', current_user; END $$;
SET ROLE regress_cde_writer;
SET search_path = regress_shadow, pg_catalog, pg_temp, public;
UPDATE products SET sku = 'by app' WHERE id = 2;
SELECT count(*) FROM cde.queue;      -- and it cannot read cde's tables
RESET ROLE;
-- cde.queue altered (here a trigger of its owner's): appends take the INSERT path instead of the
-- direct one, as the queue's owner, and the writer's search_path still reaches nothing.
CREATE FUNCTION regress_shadow.who() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE NOTICE 'a queue row inserted by the queue''s owner: %, with search_path %',
        current_user = (SELECT relowner::regrole::text FROM pg_class WHERE oid = 'cde.queue'::regclass),
        current_setting('search_path');
    RETURN NEW;
END $$;
CREATE TRIGGER regress_who BEFORE INSERT ON cde.queue FOR EACH ROW EXECUTE FUNCTION regress_shadow.who();
SET ROLE regress_cde_writer;
UPDATE products SET sku = 'by app, again' WHERE id = 3;
RESET ROLE;
RESET search_path;
SELECT * FROM queued();
ROLLBACK;
