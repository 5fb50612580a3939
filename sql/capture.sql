-- Change capture: cde_track installs statement-level triggers with transition tables on a table.
--
-- Once per writing statement, for every feed tracking the table, the keys the changed rows touch
-- are appended to cde.queue, one row per feed. Nothing else happens in the writer's transaction:
-- no document is built and no lock is taken beyond that insert, so writers pay little and never
-- wait on each other; a rollback takes the queue rows with it.
--
-- Two kinds of trigger do it (cde._install_capture installs them):
--   cde_capture_ins/_upd/_del/_trn  cde._capture(feed, column, ...), in Rust (src/capture.rs), for
--                                   feeds whose keys are a column of the changed row, and for
--                                   TRUNCATE of every feed;
--   cde_capture_sql_ins/_upd/_del   a generated PL/pgSQL function cde.capture_<table oid>, for
--                                   feeds whose keys are an expression or a query over "changed".
-- Both are SECURITY DEFINER: an application role that may only write the table needs no right on
-- cde's objects. The generated function also fixes its search_path, so that the role's own cannot
-- hijack the keys' SQL; cde._capture resolves no name at all.

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

-- Does this keys definition fit this table? Runs it over no rows; raises if not.
CREATE FUNCTION cde._check_keys(f cde.feeds, source_table regclass, keys text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('WITH probe AS (SELECT * FROM %s LIMIT 0) SELECT count(*) FROM (%s) AS c',
                   source_table, cde._keys_query(f, keys, ARRAY['probe']));
END $$;

CREATE FUNCTION cde_track(feed text, source_table regclass, keys text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    f        cde.feeds := cde._feed(feed);
    relkind  "char";
BEGIN
    IF source_table IS NULL THEN
        RAISE EXCEPTION 'cde_track: source_table is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    SELECT c.relkind INTO relkind FROM pg_class c WHERE c.oid = source_table;
    IF relkind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'cde_track: % is not a table', source_table
            USING ERRCODE = 'wrong_object_type', HINT = 'Track the tables under a view, not the view.';
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

-- The Rust capture trigger runs with the rights of the extension's owner (see above).
ALTER FUNCTION cde._capture() SECURITY DEFINER;
REVOKE ALL ON FUNCTION cde._capture() FROM PUBLIC;

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

-- For the feeds of a table whose keys are not a plain column: the statement of the generated
-- trigger that queues their keys, read from the transition tables in "sources", one row per feed
-- (none for a feed whose keys are empty for the statement). NULL when there are no such feeds.
-- The keys are made distinct here: an UPDATE's old and new rows mostly give the same keys (a
-- category renamed: every product of it twice), which would double what is queued.
CREATE FUNCTION cde._queue_statement(tbl oid, sources text[]) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT format($b$
                SELECT bool_or(cde._enqueue(v.feed, v.keys) > 0 AND cde._changes_recorded()) INTO woke
                  FROM (VALUES %s) AS v(feed, keys) WHERE v.keys IS NOT NULL;$b$,
                  string_agg(format('(%L, (SELECT array_agg(DISTINCT k) FROM (%s) AS c(k) WHERE k IS NOT NULL))',
                                    t.feed, cde._keys_query(f, t.keys, sources)), ', ' ORDER BY t.feed))
      FROM cde.tracks t JOIN cde.feeds f ON f.name = t.feed
     WHERE t.source_table = tbl AND cde._key_column(f, tbl, t.keys) IS NULL
    HAVING count(*) > 0
$$;

-- (Re)generate the capture triggers of one table from all its tracks: whatever the number of
-- feeds tracking the table, one trigger per operation for the column keys (cde._capture, its
-- arguments naming each feed and column) and, when some feed's keys are an expression or a
-- query, one more per operation with a generated function for those. With no track left,
-- remove them.
CREATE FUNCTION cde._install_capture(tbl oid) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    fn      text := format('cde.%I', 'capture_' || tbl);
    exists_ boolean := EXISTS (SELECT 1 FROM pg_class WHERE oid = tbl);
    op      text;
    simple  text;      -- cde._capture's arguments: 'feed', 'column', ...
    every   text;      -- the TRUNCATE trigger's: every feed tracking the table
    upd     text;
    ins     text;
    del     text;
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
           string_agg(format('%L, %L', t.feed, ''), ', ' ORDER BY t.feed)
      INTO simple, every
      FROM cde.tracks t JOIN cde.feeds f ON f.name = t.feed
     WHERE t.source_table = tbl;

    IF simple IS NOT NULL THEN
        PERFORM cde._create_capture_triggers(tbl, 'cde_capture', format('cde._capture(%s)', simple));
    END IF;
    EXECUTE format('CREATE TRIGGER cde_capture_trn AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION cde._capture(%s)',
                   tbl::regclass, every);

    -- The other feeds, if any: one statement per operation, differing only in which transition
    -- tables the keys come from.
    upd := cde._queue_statement(tbl, ARRAY['old_rows', 'new_rows']);
    IF upd IS NULL THEN
        RETURN;
    END IF;
    ins := cde._queue_statement(tbl, ARRAY['new_rows']);
    del := cde._queue_statement(tbl, ARRAY['old_rows']);

    EXECUTE format($f$
        CREATE FUNCTION %1$s() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = %2$s AS $body$
        DECLARE
            woke boolean;   -- cde._changes_recorded() wakes the worker at commit when keys were queued
        BEGIN
            IF TG_OP = 'UPDATE' THEN %3$s
            ELSIF TG_OP = 'INSERT' THEN %4$s
            ELSE %5$s
            END IF;
            RETURN NULL;
        END $body$$f$, fn, cde._fixed_search_path(), upd, ins, del);
    EXECUTE format('REVOKE ALL ON FUNCTION %s() FROM PUBLIC', fn);

    PERFORM cde._create_capture_triggers(tbl, 'cde_capture_sql', fn || '()');
END $fn$;

CREATE FUNCTION cde._drop_capture(t cde.tracks) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM cde.tracks x WHERE x.feed = t.feed AND x.source_table = t.source_table;
    PERFORM cde._install_capture(t.source_table);
END $$;

CREATE FUNCTION cde_untrack(feed text, source_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    f cde.feeds := cde._feed(feed);
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

-- A tracked table that is dropped takes its triggers with it; forget the tracking too, so that
-- cde.tracks never names a table that is gone.
CREATE FUNCTION cde._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql AS $$
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
LANGUAGE plpgsql AS $$
BEGIN
    IF current_query() ~* '\mcde\M' THEN
        PERFORM cde._hold_iteration_lock();
        PERFORM pg_advisory_xact_lock(cde._sync_step_lock());
    END IF;
END $$;

CREATE EVENT TRIGGER cde_on_drop_extension ON ddl_command_start WHEN TAG IN ('DROP EXTENSION')
    EXECUTE FUNCTION cde._on_drop_extension();
