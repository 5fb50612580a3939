-- cde 0.1.0 -> 0.2.0, first part: what changes in place (tables), and what goes to be created
-- anew. scripts/upgrade-script assembles sql/cde--0.1.0--0.2.0.sql from this file, every object of
-- the 0.2.0 install script but its tables (sql/schema.sql), and the .after.sql part. The upgrade
-- test (scripts/upgrade-test) compares the result with a fresh 0.2.0 install, object by object.

-- The delegated admins of 0.1.0 (EXECUTE on cde_register_feed): their grants are redone after.
CREATE TABLE cde.upgrade_admins AS
SELECT DISTINCT a.grantee::regrole AS admin
  FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
 WHERE p.oid = 'cde_register_feed(text, text, text, text, text[], int)'::regprocedure
   AND a.grantee <> 0 AND a.grantee <> p.proowner
   AND NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = a.grantee);

-- 0.1.0 let delegated admins write cde's tables, create objects in schema cde, and own their feed
-- tables: nothing of that is trusted. A feed belongs to the role that owned its 0.1.0 feed table
-- (cde_register_feed created it as the registering role, and only a superuser could give it to
-- another); its table is cde.feed_<name>, rebuilt below from its fixed definition.
DO $$
DECLARE
    f record;
    strays text;
BEGIN
    FOR f IN SELECT x.name, c.oid AS tbl, c.relkind, c.relowner::regrole AS relowner, x.owner
               FROM cde.feeds x LEFT JOIN pg_catalog.pg_class c
                 ON c.relnamespace = 'cde'::regnamespace AND c.relname = 'feed_' || x.name LOOP
        IF f.tbl IS NULL OR f.relkind <> 'r' THEN
            RAISE EXCEPTION 'cde 0.2.0: feed %''s table cde.feed_% is missing or no longer a table', f.name, f.name
                USING HINT = 'Drop the feed with 0.1.0 (cde_drop_feed) or restore its table, then update.';
        END IF;
        -- Exactly 0.1.0's columns, in their built-in types: the rows are copied as they are.
        IF (SELECT pg_catalog.string_agg(a.attname || ' ' || a.atttypid::regtype::text, ', ' ORDER BY a.attnum)
              FROM pg_catalog.pg_attribute a WHERE a.attrelid = f.tbl AND a.attnum > 0 AND NOT a.attisdropped)
           IS DISTINCT FROM 'key text, doc jsonb, hash text, deleted boolean, status text, http_status integer, error text, attempts integer, modified_at timestamp with time zone, sent_at timestamp with time zone' THEN
            RAISE EXCEPTION 'cde 0.2.0: feed %''s table cde.feed_% has other columns than 0.1.0 made', f.name, f.name
                USING HINT = 'Drop the feed with 0.1.0 (cde_drop_feed) and register it again, then update.';
        END IF;
        -- The definition as registered: 0.1.0 ran the query baked into its generated function
        -- (owned by the registering role), not what cde.feeds says, which admins could write.
        IF NOT EXISTS (SELECT 1 FROM cde.feeds x JOIN pg_catalog.pg_proc p ON p.oid = x.rebuild_fn
                        WHERE x.name = f.name AND p.proowner = f.relowner
                          AND pg_catalog.strpos(p.prosrc, pg_catalog.replace(x.source_query, '''', '''''')) > 0   -- inside its literals
                          AND pg_catalog.strpos(p.prosrc, pg_catalog.format('::%s[]', pg_catalog.format_type(x.key_type, NULL))) > 0
                          AND ('search_path=' || x.search_path) = ANY (p.proconfig)) THEN
            RAISE EXCEPTION 'cde 0.2.0: feed % is not as it was registered (its row in cde.feeds was changed)', f.name
                USING HINT = 'Register it again with 0.1.0 (cde_register_feed), then update.';
        END IF;
        UPDATE cde.feeds SET feed_table = f.tbl::regclass, owner = f.relowner WHERE name = f.name;
        IF f.owner <> f.relowner THEN
            RAISE WARNING 'cde 0.2.0: feed % said it belonged to %, its table to %: it belongs to % now', f.name, f.owner, f.relowner, f.relowner;
        END IF;
    END LOOP;
    -- Anything else in schema cde that is not the extension's or a feed table's (an admin's).
    SELECT pg_catalog.string_agg(pg_catalog.pg_describe_object(o.classid, o.objid, 0), ', ') INTO strays
      FROM (SELECT 'pg_class'::regclass AS classid, c.oid AS objid FROM pg_catalog.pg_class c
             WHERE c.relnamespace = 'cde'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S')
               AND NOT EXISTS (SELECT 1 FROM cde.feeds x WHERE x.feed_table = c.oid)
               AND NOT (c.relkind = 'S' AND EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i')))
            UNION ALL
            SELECT 'pg_proc'::regclass, p.oid FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'cde'::regnamespace AND p.proname NOT LIKE 'capture\_%' AND p.proname NOT LIKE 'rebuild\_%') AS o
     WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                        WHERE d.classid = o.classid AND d.objid = o.objid AND d.deptype = 'e');
    IF strays IS NOT NULL THEN
        RAISE EXCEPTION 'cde 0.2.0: schema cde holds objects that are not cde''s: %', strays
            USING HINT = 'Schema cde is cde''s alone from 0.2.0 on: move or drop them, then update.';
    END IF;
END $$;

-- Tracks as installed: keys that are not a plain column were baked into the table's generated
-- function cde.capture_<oid>, column keys into cde._capture's trigger arguments.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT x.* FROM cde.tracks x LOOP
        IF NOT (EXISTS (SELECT 1 FROM pg_catalog.pg_proc p
                         WHERE p.pronamespace = 'cde'::regnamespace AND p.proname = 'capture_' || t.source_table::oid
                           AND pg_catalog.strpos(p.prosrc, pg_catalog.quote_literal(t.feed)) > 0
                           AND (t.keys IS NULL OR pg_catalog.strpos(p.prosrc, t.keys) > 0))
                OR EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                            WHERE g.tgrelid = t.source_table::oid AND g.tgname = 'cde_capture_upd'
                              AND pg_catalog.strpos(pg_catalog.encode(g.tgargs, 'escape'),
                                                    t.feed || '\000' || coalesce(pg_catalog.btrim(t.keys), (SELECT f.key_column FROM cde.feeds f WHERE f.name = t.feed)) || '\000') > 0)) THEN
            RAISE EXCEPTION 'cde 0.2.0: feed %''s track of % is not as it was installed (its row in cde.tracks was changed)', t.feed, t.table_name
                USING HINT = 'cde_track it again with 0.1.0, then update.';
        END IF;
    END LOOP;
END $$;

-- Every right 0.1.0 handed out on cde's schema, tables and sequences is taken back (the admins'
-- 0.2.0 grants are given again after): a role once an admin keeps none of it.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.oid::regclass AS obj, CASE WHEN c.relkind = 'S' THEN 'SEQUENCE' ELSE 'TABLE' END AS kind, a.grantee
               FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
              WHERE c.relnamespace = 'cde'::regnamespace AND a.grantee <> c.relowner LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON %s %s FROM %s', r.kind, r.obj,
                                  CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE r.grantee::regrole::text END);
    END LOOP;
    FOR r IN SELECT a.grantee FROM pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
              WHERE n.nspname = 'cde' AND a.grantee <> n.nspowner LOOP
        EXECUTE pg_catalog.format('REVOKE ALL ON SCHEMA cde FROM %s', CASE WHEN r.grantee = 0 THEN 'PUBLIC' ELSE r.grantee::regrole::text END);
    END LOOP;
END $$;

-- Capture triggers (0.1.0's call generated functions cde.capture_<oid>()) and the generated
-- functions (cde.rebuild_<feed>, cde.capture_<oid>): all recreated, or no longer needed.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT t.tgname, t.tgrelid::regclass AS tbl FROM pg_catalog.pg_trigger t WHERE t.tgname LIKE 'cde\_capture\_%' LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER %I ON %s', r.tgname, r.tbl);
    END LOOP;
    FOR r IN SELECT p.oid::regprocedure AS fn FROM pg_catalog.pg_proc p
              WHERE p.pronamespace = 'cde'::regnamespace AND (p.proname LIKE 'capture\_%' OR p.proname LIKE 'rebuild\_%')
                AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e') LOOP
        EXECUTE pg_catalog.format('DROP FUNCTION %s', r.fn);
    END LOOP;
END $$;

-- Every object of the extension but its schema and tables: event triggers, views, functions. No
-- CASCADE: an object of yours that depends on one of them (a view over cde_feed_status, say)
-- stops the upgrade with PostgreSQL's error naming it; drop it, upgrade, create it again.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT d.classid, d.objid,
               CASE d.classid WHEN 'pg_event_trigger'::regclass THEN 1 WHEN 'pg_class'::regclass THEN 2 ELSE 3 END AS ord
          FROM pg_catalog.pg_depend d
         WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
           AND d.refobjid = (SELECT e.oid FROM pg_catalog.pg_extension e WHERE e.extname = 'cde')
           AND (d.classid IN ('pg_event_trigger'::regclass, 'pg_proc'::regclass)
                OR (d.classid = 'pg_class'::regclass AND (SELECT c.relkind FROM pg_catalog.pg_class c WHERE c.oid = d.objid) = 'v'))
         ORDER BY 3
    LOOP
        CASE r.classid
        WHEN 'pg_event_trigger'::regclass THEN
            EXECUTE pg_catalog.format('DROP EVENT TRIGGER %I', (SELECT e.evtname FROM pg_catalog.pg_event_trigger e WHERE e.oid = r.objid));
        WHEN 'pg_class'::regclass THEN
            EXECUTE pg_catalog.format('DROP VIEW %s', r.objid::regclass);
        ELSE
            EXECUTE pg_catalog.format('DROP %s %s',
                CASE (SELECT p.prokind FROM pg_catalog.pg_proc p WHERE p.oid = r.objid) WHEN 'p' THEN 'PROCEDURE' ELSE 'FUNCTION' END,
                r.objid::regprocedure);
        END CASE;
    END LOOP;
END $$;

-- Tables.
ALTER TABLE cde.feeds DROP COLUMN rebuild_fn;   -- nothing is generated per feed but its table
-- Tracks name their tables (a dump keeps names, not OIDs), with their schema.
ALTER TABLE cde.tracks ALTER COLUMN source_table TYPE regclass USING source_table::regclass;
UPDATE cde.tracks t SET table_name = pg_catalog.format('%I.%I', n.nspname, c.relname)
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.oid = t.source_table;
ALTER TABLE cde.sync_phases ADD COLUMN built_at timestamptz;
CREATE TABLE cde.destinations (
    name         text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_]{0,47}$'),
    held_until   timestamptz,
    held_status  int,                      -- the HTTP status that held it (NULL: TLS, DNS)
    held_error   text,                     -- e.g. 'unauthorized (HTTP 401): ...'
    held_since   timestamptz,
    endpoint     text,                     -- NULL for default (cde.endpoint)
    options      jsonb NOT NULL DEFAULT '{}',   -- checked by cde._check_destination_options
    roles        regrole[] NOT NULL DEFAULT '{}',   -- options' roles, resolved when set
    disabled_at  timestamptz,              -- 410 Gone
    disabled_error text,
    last_status  int,                      -- of the last response
    last_error   text,
    last_error_at timestamptz,
    failing_since timestamptz,             -- requests fail (or a secret file cannot be read) since
    last_success_at timestamptz,
    requests     bigint NOT NULL DEFAULT 0,
    requests_failed bigint NOT NULL DEFAULT 0,
    items_sent   bigint NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
INSERT INTO cde.destinations (name) VALUES ('default');
COMMENT ON TABLE cde.destinations IS 'Where feeds are sent (cde_set_destination), and whether a failure holds or a 410 disabled them';
ALTER TABLE cde.feeds ADD COLUMN destination text REFERENCES cde.destinations;   -- NULL: default (cde.endpoint)
ALTER TABLE cde.feeds ADD COLUMN items_sent bigint NOT NULL DEFAULT 0,
                      ADD COLUMN items_rejected bigint NOT NULL DEFAULT 0,
                      ADD COLUMN items_retried bigint NOT NULL DEFAULT 0,
                      ADD COLUMN items_dead bigint NOT NULL DEFAULT 0,
                      ADD COLUMN build_failures bigint NOT NULL DEFAULT 0;
-- Tracks that capture writes applied by logical replication (cde_track(..., replicated)).
ALTER TABLE cde.tracks ADD COLUMN replicated boolean NOT NULL DEFAULT false;
-- Keys of several columns: a feed's key column becomes a list of one.
ALTER TABLE cde.feeds ADD COLUMN key_columns text[] CHECK (cardinality(key_columns) >= 1),
                      ADD COLUMN key_types regtype[] CHECK (cardinality(key_types) = cardinality(key_columns));
UPDATE cde.feeds SET key_columns = ARRAY[key_column], key_types = ARRAY[key_type];
ALTER TABLE cde.feeds ALTER COLUMN key_columns SET NOT NULL, ALTER COLUMN key_types SET NOT NULL,
                      DROP COLUMN key_column, DROP COLUMN key_type;
-- Filled as the feed tables are rebuilt (.after.sql): their rows are inserted anew.
CREATE TABLE cde.row_counts (
    feed    text NOT NULL,
    status  text NOT NULL,
    deleted boolean NOT NULL,
    n       bigint NOT NULL
);
COMMENT ON TABLE cde.row_counts IS 'Rows of each feed table by status and deleted flag (sum of n), kept by triggers';
-- What a sync builder wrote as sent and is posting now, after its chunk committed
-- (src/builder_send.rs): the worker sends no newer version of these keys until the builder is
-- done and deletes the row. A builder that stopped first (no backend of that pid and start is
-- left) leaves it, and the keys go again (cde._recover_posts).
CREATE TABLE cde.sync_posts (
    id            bigserial PRIMARY KEY,
    feed          text NOT NULL,
    keys          text[] NOT NULL,
    pid           int NOT NULL,
    backend_start timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('cde.feeds', '');
SELECT pg_catalog.pg_extension_config_dump('cde.tracks', '');
SELECT pg_catalog.pg_extension_config_dump('cde.queue', '');
SELECT pg_catalog.pg_extension_config_dump('cde.queue_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cde.retries', '');
SELECT pg_catalog.pg_extension_config_dump('cde.destinations', $$WHERE name <> 'default'$$);
SELECT pg_catalog.pg_extension_config_dump('cde.sync_runs', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_runs_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_phases', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_lanes', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_events', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_posts', '');
SELECT pg_catalog.pg_extension_config_dump('cde.sync_posts_id_seq', '');

-- The 0.2.0 objects follow.
