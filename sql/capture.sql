-- Change capture: cde_track installs statement-level triggers with transition tables on a table.
--
-- Once per writing statement, for every feed tracking the table, the keys the changed rows touch
-- are appended to cde.queue, one row per feed. Nothing else happens in the writer's transaction:
-- no document is built and no lock is taken beyond that insert, so writers pay little and never
-- wait on each other; a rollback takes the queue rows with it.
--
-- Two trigger functions do it, both in Rust (src/capture.rs; cde._install_capture installs them):
--   cde_capture_ins/_upd/_del/_trn  cde._capture(feed, column, ...), for feeds whose keys are a
--                                   column of the changed row, and for TRUNCATE of every feed;
--   cde_capture_sql_ins/_upd/_del   cde._capture_keys(feed, ...), for feeds whose keys are an
--                                   expression or a query over "changed".
-- Both are SECURITY DEFINER: an application role that may only write the table needs no right on
-- cde's objects, and its search_path changes nothing (cde._capture resolves no name at all,
-- cde._capture_keys has its own). The keys' SQL was written by the feed's owner and runs as that
-- role (src/trust.rs), with the feed's search_path: never with the writer's rights, nor the
-- extension owner's.

-- What "keys" means: a query yielding one text column, the touched keys, over the transition
-- tables named in "sources". Expressions read the tables directly (a cheap UNION ALL, no
-- deduplication: the collector does that once for many statements); a SELECT sees them as the
-- relation "changed".
CREATE FUNCTION cde._keys_query(f cde.feeds, keys text, sources text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN keys ~* '^\s*(select|with)\s' THEN
            format('WITH changed AS (%s) SELECT (k)::text FROM (%s) AS x(k)',
                   (SELECT string_agg(format('SELECT * FROM %I', s), ' UNION ALL ') FROM unnest(sources) AS s), keys)
        ELSE
            (SELECT string_agg(format('SELECT (%s)::text FROM %I', coalesce(keys, quote_ident(f.key_column)), s), ' UNION ALL ')
               FROM unnest(sources) AS s)
    END
$$;

-- Does this keys definition fit this table? Runs it over no rows, as the feed's owner (the row
-- type stands for the transition tables: no right on the table itself is needed, as in the
-- trigger); raises if not.
CREATE FUNCTION cde._check_keys(f cde.feeds, source_table regclass, keys text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM cde._query_as(f.owner, f.search_path,
        format('WITH probe AS (SELECT (NULL::%s).* LIMIT 0) SELECT count(*)::text FROM (%s) AS c',
               source_table, cde._keys_query(f, keys, ARRAY['probe'])));
END $$;

CREATE FUNCTION cde_track(feed text, source_table regclass, keys text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    f        cde.feeds := cde._managed_feed(feed);
    relkind  "char";
    nsp      name;
BEGIN
    IF source_table IS NULL THEN
        RAISE EXCEPTION 'cde_track: source_table is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT c.relkind, n.nspname INTO relkind, nsp
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = source_table;
    IF relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'cde_track: % is not a table', source_table
            USING ERRCODE = 'wrong_object_type', HINT = 'Track the tables under a view, not the view.';
    END IF;
    IF nsp IN ('cde', 'pg_catalog', 'information_schema') OR nsp LIKE 'pg\_toast%' THEN
        RAISE EXCEPTION 'cde_track: % is a table of %, which cannot be tracked', source_table, nsp
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- Capture triggers are created by the extension's owner: the caller must be one who could
    -- create a trigger on the table itself.
    IF NOT pg_catalog.has_table_privilege(cde._caller(), source_table, 'TRIGGER') THEN
        RAISE EXCEPTION 'cde_track: permission denied for table %', source_table
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Tracking a table needs the TRIGGER privilege on it (or owning it).';
    END IF;

    -- The keys must make sense for this table: run them over an empty "changed".
    BEGIN
        PERFORM cde._check_keys(f, source_table, keys);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'cde_track: keys % do not fit table % for feed %: %',
            coalesce(quote_literal(keys), 'NULL (the key column ' || quote_ident(f.key_column) || ')'), source_table, f.name, SQLERRM
            USING ERRCODE = SQLSTATE,
                  HINT = 'keys is NULL (the feed''s key column of the changed row), an expression over the changed row, or a SELECT over the relation "changed".';
    END;

    INSERT INTO cde.tracks AS t (feed, source_table, table_name, keys)
    VALUES (f.name, source_table::oid, source_table::text, keys)
    ON CONFLICT ON CONSTRAINT tracks_pkey DO UPDATE SET keys = excluded.keys, table_name = excluded.table_name;
    PERFORM cde._install_capture(source_table::oid);
END $fn$;

COMMENT ON FUNCTION cde_track(text, regclass, text) IS
    'Capture changes to a table as changed keys of a feed (statement-level triggers with transition tables)';

-- The Rust capture triggers run with the rights of the extension's owner (see above).
ALTER FUNCTION cde._capture() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION cde._capture_keys() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION cde._capture(), cde._capture_keys() FROM PUBLIC;

-- The column a feed's keys are, when they are a plain column of the table whose text form is
-- its output (NULL keys: the feed's key column). Such feeds are captured by cde._capture(), in
-- Rust; any other keys by a generated PL/pgSQL function. The types listed render the same
-- through their output function as through a cast to text, which the rest of cde uses.
CREATE FUNCTION cde._key_column(f cde.feeds, tbl oid, keys text) RETURNS name
LANGUAGE sql STABLE AS $$
    SELECT a.attname FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
       AND a.attname = coalesce(btrim(keys), f.key_column)
       AND (keys IS NULL OR keys ~ '^\s*[a-z_][a-z0-9_]*\s*$')
       AND a.atttypid IN ('int2'::regtype, 'int4'::regtype, 'int8'::regtype, 'text'::regtype,
                          'varchar'::regtype, 'uuid'::regtype, 'numeric'::regtype)
$$;

-- The INSERT, UPDATE and DELETE triggers <prefix>_ins/_upd/_del of a table, statement level,
-- with the transition tables each operation has, all executing the same function call.
CREATE FUNCTION cde._create_capture_triggers(tbl oid, prefix text, call text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    op record;
BEGIN
    FOR op IN VALUES ('ins', 'INSERT', 'NEW TABLE AS new_rows'),
                     ('upd', 'UPDATE', 'OLD TABLE AS old_rows NEW TABLE AS new_rows'),
                     ('del', 'DELETE', 'OLD TABLE AS old_rows')
    LOOP
        EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s REFERENCING %s FOR EACH STATEMENT EXECUTE FUNCTION %s',
                       prefix || '_' || op.column1, op.column2, tbl::regclass, op.column3, call);
    END LOOP;
END $$;

-- (Re)generate the capture triggers of one table from all its tracks: whatever the number of
-- feeds tracking the table, one trigger per operation for the column keys (cde._capture, its
-- arguments naming each feed and column) and, when some feed's keys are an expression or a
-- query, one more per operation for those (cde._capture_keys, its arguments naming the feeds).
-- With no track left, remove them.
CREATE FUNCTION cde._install_capture(tbl oid) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    fn      text := format('cde.%I', 'capture_' || tbl);   -- 0.1.0 generated one per table
    exists_ boolean := EXISTS (SELECT 1 FROM pg_class WHERE oid = tbl);
    op      text;
    simple  text;      -- cde._capture's arguments: 'feed', 'column', ...
    every   text;      -- the TRUNCATE trigger's: every feed tracking the table
    others  text;      -- cde._capture_keys's: the feeds whose keys are not a plain column
BEGIN
    FOR op IN SELECT tgname FROM pg_trigger WHERE tgrelid = tbl AND tgname LIKE 'cde\_capture\_%' LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', op, tbl::regclass);
    END LOOP;
    IF to_regprocedure(fn || '()') IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION %s()', fn);
    END IF;
    IF NOT exists_ OR NOT EXISTS (SELECT 1 FROM cde.tracks WHERE source_table = tbl) THEN
        RETURN;
    END IF;

    SELECT string_agg(format('%L, %L', t.feed, cde._key_column(f, tbl, t.keys)), ', ' ORDER BY t.feed)
             FILTER (WHERE cde._key_column(f, tbl, t.keys) IS NOT NULL),
           string_agg(format('%L, %L', t.feed, ''), ', ' ORDER BY t.feed),
           string_agg(format('%L', t.feed), ', ' ORDER BY t.feed)
             FILTER (WHERE cde._key_column(f, tbl, t.keys) IS NULL)
      INTO simple, every, others
      FROM cde.tracks t JOIN cde.feeds f ON f.name = t.feed
     WHERE t.source_table = tbl;

    IF simple IS NOT NULL THEN
        PERFORM cde._create_capture_triggers(tbl, 'cde_capture', format('cde._capture(%s)', simple));
    END IF;
    EXECUTE format('CREATE TRIGGER cde_capture_trn AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION cde._capture(%s)',
                   tbl::regclass, every);

    IF others IS NOT NULL THEN
        PERFORM cde._create_capture_triggers(tbl, 'cde_capture_sql', format('cde._capture_keys(%s)', others));
    END IF;
END $fn$;

CREATE FUNCTION cde._drop_capture(t cde.tracks) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM cde.tracks x WHERE x.feed = t.feed AND x.source_table = t.source_table;
    PERFORM cde._install_capture(t.source_table);
END $$;

CREATE FUNCTION cde_untrack(feed text, source_table regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f cde.feeds := cde._managed_feed(feed);
    t cde.tracks;
BEGIN
    SELECT * INTO t FROM cde.tracks x WHERE x.feed = f.name AND x.source_table = cde_untrack.source_table::oid;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cde_untrack: feed % does not track %', f.name, source_table
            USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM cde._drop_capture(t);
END $$;

COMMENT ON FUNCTION cde_untrack(text, regclass) IS 'Stop capturing changes of a table for a feed';

-- The event triggers below run for every role's DDL, in that role's session: SECURITY DEFINER
-- (the role needs no right on cde's tables: installing cde takes no DDL away from anyone) with a
-- fixed search_path (the session's own, which a database owner may set, cannot reach them).

-- A tracked table that is dropped takes its triggers with it; forget the tracking too, so that
-- cde.tracks never names a table that is gone.
CREATE FUNCTION cde._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t cde.tracks;
BEGIN
    FOR t IN
        SELECT x.* FROM cde.tracks x
          JOIN pg_event_trigger_dropped_objects() d ON d.objid = x.source_table AND d.classid = 'pg_class'::regclass
         WHERE d.object_type = 'table'
    LOOP
        PERFORM cde._drop_capture(t);
        RAISE NOTICE 'cde: table % was dropped; feed % no longer tracks it', t.table_name, t.feed;
    END LOOP;
END $$;

CREATE EVENT TRIGGER cde_on_sql_drop ON sql_drop EXECUTE FUNCTION cde._on_sql_drop();

-- An ALTER TABLE that breaks a tracked table's keys (a column they use dropped, renamed or
-- retyped) is refused with a clear error: the alternative, a capture trigger failing on every
-- later write, would break the application. Renaming the table itself is fine: triggers follow it.
CREATE FUNCTION cde._on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t   cde.tracks;
    f   cde.feeds;
BEGIN
    FOR t IN
        SELECT DISTINCT x.* FROM cde.tracks x
          JOIN pg_event_trigger_ddl_commands() c ON c.objid = x.source_table AND c.classid = 'pg_class'::regclass
         WHERE c.command_tag = 'ALTER TABLE'
    LOOP
        SELECT * INTO f FROM cde.feeds WHERE name = t.feed;
        UPDATE cde.tracks SET table_name = t.source_table::regclass::text
         WHERE feed = t.feed AND source_table = t.source_table;
        BEGIN
            PERFORM cde._check_keys(f, t.source_table::regclass, t.keys);
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'cde: this ALTER TABLE breaks the tracking of % for feed %: %', t.source_table::regclass, t.feed, SQLERRM
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = format('Run cde_untrack(%L, %L) first, or cde_track it again with keys that fit.', t.feed, t.source_table::regclass::text);
        END;
    END LOOP;
END $$;

CREATE EVENT TRIGGER cde_on_ddl_command_end ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION cde._on_ddl_command_end();

-- DROP EXTENSION cde first waits for the worker's current iteration and the builder's current
-- full sync step to end, and keeps them from starting others: dropping locks cde's tables in
-- another order than they do, and they could deadlock (the DROP would then fail). Other
-- extensions' DROPs do not wait.
CREATE FUNCTION cde._on_drop_extension() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_query() ~* '\mcde\M' THEN
        PERFORM cde._hold_iteration_lock();
        PERFORM pg_advisory_xact_lock(cde._sync_step_lock());
    END IF;
END $$;

CREATE EVENT TRIGGER cde_on_drop_extension ON ddl_command_start WHEN TAG IN ('DROP EXTENSION')
    EXECUTE FUNCTION cde._on_drop_extension();
