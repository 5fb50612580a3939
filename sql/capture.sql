-- Change capture: cde_track installs statement-level triggers with transition tables on a table.
--
-- Per (feed, table) cde generates one PL/pgSQL function, cde.capture_<feed>_<table oid>, and four
-- triggers on the table (insert, update, delete, truncate). Once per writing statement the function
-- computes the feed keys that the changed rows touch and appends one row to cde.queue. It builds
-- no document and takes no lock beyond that insert, so writers pay little and never wait on each
-- other; a rollback takes the queue row with it.
--
-- The function is SECURITY DEFINER with a fixed search_path: an application role that may only
-- write the table needs no right on cde's objects, and its own search_path cannot hijack capture.

-- What "keys" means, as a query over the relation "changed" that yields one text column.
CREATE FUNCTION cde._keys_query(f cde.feeds, keys text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN keys IS NULL THEN format('SELECT (%I)::text FROM changed', f.key_column)
        WHEN keys ~* '^\s*(select|with)\s' THEN format('SELECT (k)::text FROM (%s) AS x(k)', keys)
        ELSE format('SELECT (%s)::text FROM changed', keys)
    END
$$;

CREATE FUNCTION cde_track(feed text, source_table regclass, keys text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    f        cde.feeds := cde._feed(feed);
    relkind  "char";
    keys_sql text := cde._keys_query(f, keys);
    fn       text := format('cde.%I', 'capture_' || f.name || '_' || source_table::oid);
    old      cde.tracks;
    branch   text;
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
        EXECUTE format('WITH changed AS (SELECT * FROM %s LIMIT 0) SELECT count(*) FROM (%s) AS c', source_table, keys_sql);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'cde_track: keys % do not fit table % for feed %: %',
            coalesce(quote_literal(keys), 'NULL (the key column ' || quote_ident(f.key_column) || ')'), source_table, f.name, SQLERRM
            USING ERRCODE = SQLSTATE,
                  HINT = 'keys is NULL (the feed''s key column of the changed row), an expression over the changed row, or a SELECT over the relation "changed".';
    END;

    SELECT * INTO old FROM cde.tracks t WHERE t.feed = f.name AND t.source_table = cde_track.source_table::oid;
    IF FOUND THEN
        PERFORM cde._drop_capture(old);
    END IF;

    -- One branch per operation, differing only in which transition tables make up "changed".
    branch := $b$
                INSERT INTO cde.queue (feed, keys)
                SELECT %1$L, array_agg(k) FROM (
                    WITH changed AS (%2$s)
                    SELECT DISTINCT k FROM (%3$s) AS c(k) WHERE k IS NOT NULL
                ) AS d HAVING count(*) > 0
                RETURNING cde._changes_recorded() INTO woke;$b$;
    EXECUTE format($f$
        CREATE FUNCTION %1$s() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = %2$s AS $body$
        DECLARE
            woke boolean;   -- cde._changes_recorded() wakes the worker at commit when keys were queued
        BEGIN
            IF TG_OP = 'UPDATE' THEN %3$s
            ELSIF TG_OP = 'INSERT' THEN %4$s
            ELSIF TG_OP = 'DELETE' THEN %5$s
            ELSE -- TRUNCATE: every key of the feed may have changed
                INSERT INTO cde.queue (feed, all_keys) VALUES (%6$L, true)
                RETURNING cde._changes_recorded() INTO woke;
            END IF;
            RETURN NULL;
        END $body$$f$, fn, cde._fixed_search_path(),
        format(branch, f.name, 'SELECT * FROM old_rows UNION ALL SELECT * FROM new_rows', keys_sql),
        format(branch, f.name, 'SELECT * FROM new_rows', keys_sql),
        format(branch, f.name, 'SELECT * FROM old_rows', keys_sql),
        f.name);
    EXECUTE format('REVOKE ALL ON FUNCTION %s() FROM PUBLIC', fn);

    EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   'cde_' || f.name || '_ins', source_table, fn);
    EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   'cde_' || f.name || '_upd', source_table, fn);
    EXECUTE format('CREATE TRIGGER %I AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   'cde_' || f.name || '_del', source_table, fn);
    EXECUTE format('CREATE TRIGGER %I AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION %s()',
                   'cde_' || f.name || '_trn', source_table, fn);

    INSERT INTO cde.tracks (feed, source_table, table_name, keys, trigger_fn)
    VALUES (f.name, source_table::oid, source_table::text, keys, fn);
END $fn$;

COMMENT ON FUNCTION cde_track(text, regclass, text) IS
    'Capture changes to a table as changed keys of a feed (statement-level triggers with transition tables)';

CREATE FUNCTION cde._drop_capture(t cde.tracks) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    op text;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_class WHERE oid = t.source_table) THEN
        FOREACH op IN ARRAY ARRAY['ins', 'upd', 'del', 'trn'] LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS %I ON %s', 'cde_' || t.feed || '_' || op, t.source_table::regclass);
        END LOOP;
    END IF;
    EXECUTE format('DROP FUNCTION IF EXISTS %s()', t.trigger_fn);
    DELETE FROM cde.tracks x WHERE x.feed = t.feed AND x.source_table = t.source_table;
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
        EXECUTE format('DROP FUNCTION IF EXISTS %s()', t.trigger_fn);
        DELETE FROM cde.tracks x WHERE x.feed = t.feed AND x.source_table = t.source_table;
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
            EXECUTE format('WITH changed AS (SELECT * FROM %s LIMIT 0) SELECT count(*) FROM (%s) AS c',
                           t.source_table::regclass, cde._keys_query(f, t.keys));
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'cde: this ALTER TABLE breaks the tracking of % for feed %: %', t.source_table::regclass, t.feed, SQLERRM
                USING ERRCODE = 'dependent_objects_still_exist',
                      HINT = format('Run cde_untrack(%L, %L) first, or cde_track it again with keys that fit.', t.feed, t.source_table::regclass::text);
        END;
    END LOOP;
END $$;

CREATE EVENT TRIGGER cde_on_ddl_command_end ON ddl_command_end WHEN TAG IN ('ALTER TABLE')
    EXECUTE FUNCTION cde._on_ddl_command_end();
