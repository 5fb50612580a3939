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
-- An application role that may only write the table needs no right on cde's objects, and its
-- search_path changes nothing. cde._capture runs as the writer: it resolves no name and its
-- inserts into cde.queue check no right (src/queue.rs; its fallback INSERT runs as the queue's
-- owner with a fixed search_path), so it needs no SECURITY DEFINER, whose switch of user and of
-- search_path on every statement cost an eighth of the capture. cde._capture_keys (and
-- cde._capture_row) are SECURITY DEFINER with their own search_path. The keys' SQL was written
-- by the feed's owner and runs as that role (src/trust.rs), with the feed's search_path: never
-- with the writer's rights, nor the extension owner's.

-- What "keys" means: a query yielding one text column, the touched keys, over the transition
-- tables named in "sources". Expressions read the tables directly (a cheap UNION ALL, no
-- deduplication: the collector does that once for many statements); a SELECT sees them as the
-- relation "changed". NULL keys: the feed's key columns of the changed row. For a feed keyed by
-- several columns, an expression is a list of as many ("product_id, store_id") and a SELECT
-- returns as many columns, in the order of the feed's key columns; the key is made of them as the
-- source query's is (cde._key_sql).
-- Are these keys a query over "changed" (rather than NULL or an expression over the row)?
CREATE FUNCTION cde._keys_are_query(keys text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$ SELECT keys ~* '^\s*(select|with)\s' $$;

CREATE FUNCTION cde._keys_query(f cde.feeds, keys text, sources text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN cardinality(f.key_columns) = 1 AND cde._keys_are_query(keys) THEN
            format('WITH changed AS (%s) SELECT (k)::text FROM (%s) AS x(k)', changed, keys)
        WHEN cardinality(f.key_columns) = 1 THEN
            (SELECT string_agg(format('SELECT (%s)::text FROM %I', coalesce(keys, quote_ident(f.key_columns[1])), s), ' UNION ALL ')
               FROM unnest(sources) AS s)
        WHEN cde._keys_are_query(keys) THEN
            format('WITH changed AS (%s) SELECT %s FROM (%s) AS x(%s)', changed, composed, keys, aliases)
        ELSE
            (SELECT string_agg(format('SELECT %s FROM (SELECT %s FROM %I) AS x(%s)', composed,
                                      coalesce(keys, (SELECT string_agg(quote_ident(c), ', ') FROM unnest(f.key_columns) AS c)), s, aliases),
                               ' UNION ALL ')
               FROM unnest(sources) AS s)
    END
      FROM (SELECT (SELECT string_agg(format('SELECT * FROM %I', s), ' UNION ALL ') FROM unnest(sources) AS s) AS changed,
                   (SELECT string_agg('k' || n, ', ' ORDER BY n) FROM generate_series(1, cardinality(f.key_columns)) AS n) AS aliases,
                   cde._key_sql(ARRAY(SELECT 'x.k' || n FROM generate_series(1, cardinality(f.key_columns)) AS n)) AS composed) AS p
$$;

-- Does this keys definition fit this table? Runs it over no rows, as the feed's owner (the row
-- type stands for the transition tables: no right on the table itself is needed, as in the
-- trigger); raises if not. Keys of several columns must give exactly as many values: a column
-- alias list may name fewer columns than there are, so they are run with as many aliases as the
-- key has columns (which fails when they give fewer) and with one more (which must fail).
CREATE FUNCTION cde._check_keys(f cde.feeds, source_table regclass, keys text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    n     int := cardinality(f.key_columns);
    probe text;
    fits  boolean;
BEGIN
    IF n > 1 AND keys IS NOT NULL THEN
        probe := format('WITH changed AS (SELECT (NULL::%s).* LIMIT 0) SELECT count(*)::text FROM (%s) AS x',
                        source_table, CASE WHEN cde._keys_are_query(keys) THEN keys ELSE format('SELECT %s FROM changed', keys) END);
        FOREACH fits IN ARRAY ARRAY[true, false] LOOP
            BEGIN
                PERFORM cde._query_as(f.owner, f.search_path,
                    format('%s(%s)', probe, (SELECT string_agg('k' || i, ', ') FROM generate_series(1, n + (NOT fits)::int) AS i)));
                IF NOT fits THEN
                    RAISE EXCEPTION 'they give more values than the feed has key columns (%)', array_to_string(f.key_columns, ', ')
                        USING ERRCODE = 'invalid_parameter_value';
                END IF;
            EXCEPTION WHEN invalid_column_reference THEN   -- "x has k columns available but m specified"
                IF fits THEN
                    RAISE EXCEPTION 'they give fewer values than the feed has key columns (%)', array_to_string(f.key_columns, ', ')
                        USING ERRCODE = 'invalid_parameter_value';
                END IF;
            END;
        END LOOP;
    END IF;
    PERFORM cde._query_as(f.owner, f.search_path,
        format('WITH probe AS (SELECT (NULL::%s).* LIMIT 0) SELECT count(*)::text FROM (%s) AS c',
               source_table, cde._keys_query(f, keys, ARRAY['probe'])));
END $$;

CREATE FUNCTION cde_track(feed text, source_table regclass, keys text DEFAULT NULL,
                          replicated boolean DEFAULT false,   -- capture writes applied by logical replication too
                          ticket bigint DEFAULT cde._ticket()) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    caller   regrole := cde._redeem(ticket);
    f        cde.feeds := cde._managed_feed(feed, caller);
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
    IF NOT pg_catalog.has_table_privilege(caller::oid, source_table, 'TRIGGER') THEN
        RAISE EXCEPTION 'cde_track: permission denied for table %', source_table
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Tracking a table needs the TRIGGER privilege on it (or owning it).';
    END IF;

    -- The keys must make sense for this table: run them over an empty "changed".
    BEGIN
        PERFORM cde._check_keys(f, source_table, keys);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'cde_track: keys % do not fit table % for feed %: %',
            coalesce(quote_literal(keys), 'NULL (the key columns ' || array_to_string(f.key_columns, ', ') || ')'), source_table, f.name, SQLERRM
            USING ERRCODE = SQLSTATE,
                  HINT = 'keys is NULL (the feed''s key columns of the changed row), an expression over the changed row, or a SELECT over the relation "changed", giving as many values as the feed has key columns.';
    END;

    IF replicated IS NULL THEN
        RAISE EXCEPTION 'cde_track: replicated is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    -- Triggers that fire in replica sessions see what logical replication applies, which ordinary
    -- triggers never do, and one that fails stops the subscription: PostgreSQL lets only the
    -- table's owner enable them (ENABLE REPLICA TRIGGER), and so does cde.
    IF replicated AND NOT pg_catalog.pg_has_role(caller::oid, (SELECT c.relowner FROM pg_class c WHERE c.oid = source_table), 'USAGE') THEN
        RAISE EXCEPTION 'cde_track: tracking replicated writes to % needs its owner''s rights', source_table
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Capturing what logical replication applies is for the table''s owner (or a member of it), as ENABLE REPLICA TRIGGER is.';
    END IF;
    INSERT INTO cde.tracks AS t (feed, source_table, table_name, keys, replicated)
    VALUES (f.name, source_table, source_table::text, keys, replicated)
    ON CONFLICT ON CONSTRAINT tracks_pkey DO UPDATE
       SET keys = excluded.keys, table_name = excluded.table_name, replicated = excluded.replicated;
    PERFORM cde._install_capture(source_table::oid);
END $fn$;

COMMENT ON FUNCTION cde_track(text, regclass, text, boolean, bigint) IS
    'Capture changes to a table as changed keys of a feed (statement-level triggers with transition tables)';

-- cde._capture runs as the writer; the other two with the rights of the extension's owner (see
-- above). None may be called by anyone else: creating a trigger needs EXECUTE on its function.
ALTER FUNCTION cde._capture_keys() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION cde._capture_row() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE ALL ON FUNCTION cde._capture(), cde._capture_keys(), cde._capture_row() FROM PUBLIC;

-- The column a feed's keys are, when they are a plain column of the table whose text form is
-- its output (NULL keys: the feed's key column, if it has one). Such feeds are captured by cde._capture(), in
-- Rust; any other keys by a generated PL/pgSQL function. The types listed render the same
-- through their output function as through a cast to text, which the rest of cde uses.
CREATE FUNCTION cde._key_column(f cde.feeds, tbl oid, keys text) RETURNS name
LANGUAGE sql STABLE AS $$
    SELECT a.attname FROM pg_attribute a
     WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped
       AND cardinality(f.key_columns) = 1
       AND a.attname = coalesce(btrim(keys), f.key_columns[1])
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

-- Partitions and inheritance children. A statement-level trigger fires only for the table a
-- statement names: a write naming a partition (as ORMs and partition-aware jobs do) fires the
-- partition's triggers, not its parent's, while a write naming the parent fires the parent's,
-- whose transition tables hold the rows of every partition it touched. So every table under a
-- tracked one (partitions, sub-partitions, inheritance children, recursively, those created or
-- attached later too) gets the capture triggers of every tracked table above it, and each write
-- is captured once, by the table it names.

-- A table and every table above it: its partitions' parents, inheritance parents, recursively.
CREATE FUNCTION cde._ancestry(tbl oid) RETURNS oid[]
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE up(relid) AS (
        SELECT tbl
        UNION
        SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.relid)
    SELECT array_agg(relid) FROM up
$$;

-- A table and every table under it.
CREATE FUNCTION cde._subtree(tbl oid) RETURNS oid[]
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE down(relid) AS (
        SELECT tbl
        UNION
        SELECT i.inhrelid FROM pg_inherits i JOIN down ON i.inhparent = down.relid)
    SELECT array_agg(relid) FROM down
$$;

-- The capture triggers a table should have, from the tracks of the table and of every table
-- above it: whatever the number of feeds, one trigger per operation for the column keys
-- (cde._capture, its arguments naming each feed and column), one for TRUNCATE (every feed), and
-- when some feed's keys are an expression or a query, one more per operation for those
-- (cde._capture_keys, its arguments naming the feeds). "call" is the trigger's function call.
-- These fire for the writes of ordinary sessions only. Logical replication applies its writes
-- with session_replication_role = replica and fires row triggers only: for the feeds whose
-- tracks ask for them (replicated), row triggers cde_capture_replica_ins/upd/del
-- (cde._capture_row) and a TRUNCATE trigger cde_capture_replica_trn, enabled for replica
-- sessions only (ENABLE REPLICA), so that no write is captured twice.
CREATE FUNCTION cde._wanted_triggers(tbl oid, OUT tgname text, OUT call text, OUT feeds text[])
RETURNS SETOF record
LANGUAGE plpgsql STABLE AS $$
DECLARE
    simple text;      -- cde._capture's arguments: 'feed', 'column', ...
    every  text;      -- the TRUNCATE trigger's: every feed tracking the table
    others text;      -- cde._capture_keys's: the feeds whose keys are not a plain column
    replicas text[];  -- the feeds that capture replicated writes too
    names  text[];
    op     text;
    partitioned boolean := (SELECT c.relkind = 'p' FROM pg_class c WHERE c.oid = tbl);
BEGIN
    WITH t AS (
        SELECT DISTINCT t.feed, cde._key_column(f, tbl, t.keys) AS col
          FROM cde.tracks t JOIN cde.feeds f ON f.name = t.feed
         WHERE t.source_table = ANY (cde._ancestry(tbl)))
    SELECT string_agg(format('%L, %L', t.feed, t.col), ', ' ORDER BY t.feed, t.col) FILTER (WHERE t.col IS NOT NULL),
           (SELECT string_agg(format('%L, %L', x.feed, ''), ', ' ORDER BY x.feed) FROM (SELECT DISTINCT feed FROM t) x),
           (SELECT string_agg(format('%L', x.feed), ', ' ORDER BY x.feed) FROM (SELECT DISTINCT feed FROM t WHERE col IS NULL) x),
           (SELECT array_agg(DISTINCT feed ORDER BY feed) FROM t)
      INTO simple, every, others, names
      FROM t;
    SELECT array_agg(DISTINCT t.feed ORDER BY t.feed) INTO replicas
      FROM cde.tracks t WHERE t.source_table = ANY (cde._ancestry(tbl)) AND t.replicated;
    IF names IS NULL THEN
        RETURN;
    END IF;
    feeds := names;
    FOREACH op IN ARRAY ARRAY['ins', 'upd', 'del'] LOOP
        IF simple IS NOT NULL THEN
            tgname := 'cde_capture_' || op; call := format('cde._capture(%s)', simple); RETURN NEXT;
        END IF;
        IF others IS NOT NULL THEN
            tgname := 'cde_capture_sql_' || op; call := format('cde._capture_keys(%s)', others); RETURN NEXT;
        END IF;
        -- Not on a partitioned table: PostgreSQL would copy a row trigger to its partitions, which
        -- have their own, and replication writes to the partitions anyway.
        IF replicas IS NOT NULL AND NOT partitioned THEN
            tgname := 'cde_capture_replica_' || op;
            call := format('cde._capture_row(%s)', (SELECT string_agg(format('%L', r), ', ' ORDER BY r) FROM unnest(replicas) AS r));
            RETURN NEXT;
        END IF;
    END LOOP;
    tgname := 'cde_capture_trn'; call := format('cde._capture(%s)', every); RETURN NEXT;
    IF replicas IS NOT NULL THEN
        tgname := 'cde_capture_replica_trn';
        call := format('cde._capture(%s)', (SELECT string_agg(format('%L, %L', r, ''), ', ' ORDER BY r) FROM unnest(replicas) AS r));
        RETURN NEXT;
    END IF;
END $$;

-- The capture triggers a table has: name and function call, as cde._wanted_triggers spells them.
CREATE FUNCTION cde._current_triggers(tbl oid, OUT tgname text, OUT call text)
RETURNS SETOF record
LANGUAGE sql STABLE AS $$
    SELECT t.tgname::text,
           format('%s(%s)', t.tgfoid::regproc,
                  (SELECT string_agg(format('%L', a), ', ' ORDER BY n)
                     FROM unnest((string_to_array(encode(t.tgargs, 'escape'), '\000'))[1:t.tgnargs]) WITH ORDINALITY AS x(a, n)))
      FROM pg_trigger t
     WHERE t.tgrelid = tbl AND t.tgname LIKE 'cde\_capture\_%'
       AND t.tgfoid IN ('cde._capture()'::regprocedure, 'cde._capture_keys()'::regprocedure, 'cde._capture_row()'::regprocedure)
$$;

-- Give one table the capture triggers it should have (none when no tracked table is at or
-- above it), touching nothing when it has them already. Returns the feeds it captures for from
-- now on that it did not before (gained), and those it no longer does (lost).
CREATE FUNCTION cde._install_capture_on(tbl oid, OUT gained text[], OUT lost text[])
LANGUAGE plpgsql AS $fn$
DECLARE
    fn      text := format('cde.%I', 'capture_' || tbl);   -- 0.1.0 generated one per table
    before  text[];
    after   text[];
    w       record;
    op      record;
BEGIN
    IF to_regprocedure(fn || '()') IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION %s() CASCADE', fn);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = tbl) THEN
        RETURN;
    END IF;
    SELECT coalesce(array_agg(DISTINCT a ORDER BY a), '{}') INTO before
      FROM pg_trigger t, unnest((string_to_array(encode(t.tgargs, 'escape'), '\000'))[1:t.tgnargs]) WITH ORDINALITY AS x(a, n)
     WHERE t.tgrelid = tbl AND t.tgname = 'cde_capture_trn' AND t.tgfoid = 'cde._capture()'::regprocedure AND n % 2 = 1;
    SELECT coalesce((SELECT feeds FROM cde._wanted_triggers(tbl) LIMIT 1), '{}') INTO after;
    gained := ARRAY(SELECT unnest(after) EXCEPT SELECT unnest(before));
    lost := ARRAY(SELECT unnest(before) EXCEPT SELECT unnest(after));
    IF NOT EXISTS ((SELECT wt.tgname, wt.call FROM cde._wanted_triggers(tbl) wt EXCEPT SELECT * FROM cde._current_triggers(tbl))
                   UNION ALL
                   (SELECT * FROM cde._current_triggers(tbl) EXCEPT SELECT wt.tgname, wt.call FROM cde._wanted_triggers(tbl) wt)) THEN
        RETURN;   -- already as it should be
    END IF;
    IF after <> '{}' AND (SELECT relkind FROM pg_class WHERE oid = tbl) = 'f' THEN
        RAISE EXCEPTION 'cde: % is a foreign table under a table that feeds % track: cde cannot capture its writes', tbl::regclass, array_to_string(after, ', ')
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Keep foreign tables out of tracked tables'' partitions or inheritance children, or cde_untrack the table above it.';
    END IF;
    FOR op IN SELECT c.tgname FROM cde._current_triggers(tbl) c LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', op.tgname, tbl::regclass);
    END LOOP;
    FOR w IN SELECT *, substring(x.tgname from '[^_]+$') AS op, x.tgname LIKE 'cde\_capture\_replica\_%' AS replica
               FROM cde._wanted_triggers(tbl) AS x LOOP
        EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH %s EXECUTE FUNCTION %s',
                       w.tgname,
                       CASE w.op WHEN 'ins' THEN 'INSERT' WHEN 'upd' THEN 'UPDATE' WHEN 'del' THEN 'DELETE' ELSE 'TRUNCATE' END,
                       tbl::regclass,
                       CASE WHEN w.replica THEN ''
                            WHEN w.op = 'ins' THEN 'REFERENCING NEW TABLE AS new_rows'
                            WHEN w.op = 'upd' THEN 'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'
                            WHEN w.op = 'del' THEN 'REFERENCING OLD TABLE AS old_rows' ELSE '' END,
                       CASE WHEN w.replica AND w.op <> 'trn' THEN 'ROW' ELSE 'STATEMENT' END,
                       w.call);
        IF w.replica THEN
            EXECUTE format('ALTER TABLE %s ENABLE REPLICA TRIGGER %I', tbl::regclass, w.tgname);
        END IF;
    END LOOP;
END $fn$;

-- (Re)generate the capture triggers of a table and of every table under it.
CREATE FUNCTION cde._install_capture(tbl oid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r oid;
BEGIN
    FOREACH r IN ARRAY coalesce(cde._subtree(tbl), ARRAY[tbl]) LOOP
        PERFORM cde._install_capture_on(r);
    END LOOP;
END $$;

-- After DDL that may have moved tables into or out of a tracked tree (CREATE TABLE ... PARTITION
-- OF / INHERITS, ATTACH / DETACH PARTITION, INHERIT / NO INHERIT): bring every table of the trees
-- around "tbl", and every table left with capture triggers outside any tracked tree, to what it
-- should have. Rows that came into a tree (an attached partition that has rows) or left it (a
-- detached one) changed no row by DML: the feeds concerned get a full sync.
CREATE FUNCTION cde._reconcile_capture(tbl oid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r        oid;
    roots    oid[];
    c        record;
    has_rows boolean;
    f        text;
BEGIN
    SELECT array_agg(DISTINCT a) INTO roots FROM unnest(cde._ancestry(tbl)) AS a
     WHERE NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = a);
    FOR r IN
        SELECT s FROM unnest(roots) AS root, unnest(cde._subtree(root)) AS s
        UNION
        -- Only cde's own triggers (nobody else may create one calling cde._capture).
        SELECT t.tgrelid FROM pg_trigger t WHERE t.tgname = 'cde_capture_trn' AND t.tgfoid = 'cde._capture()'::regprocedure
    LOOP
        SELECT * INTO c FROM cde._install_capture_on(r);
        IF (c.gained <> '{}' OR c.lost <> '{}') AND (SELECT relkind FROM pg_class WHERE oid = r) = 'r' THEN
            -- Whether it has rows, asked as the table's owner (restricted): reading a table of
            -- another role as the extension's owner could run its code (row security policies).
            has_rows := cde._query_as((SELECT relowner FROM pg_class WHERE oid = r), 'pg_catalog, pg_temp',
                                      format('SELECT EXISTS (SELECT 1 FROM ONLY %s)::text', r::regclass))::boolean;
            IF has_rows THEN
                FOREACH f IN ARRAY c.gained || c.lost LOOP
                    INSERT INTO cde.queue (feed, all_keys) VALUES (f, true);
                    RAISE NOTICE 'cde: the rows of % % feed %: it gets a full sync', r::regclass,
                        CASE WHEN f = ANY (c.gained) THEN 'came into a table tracked by' ELSE 'left a table tracked by' END, f;
                END LOOP;
                PERFORM cde._changes_recorded();
            END IF;
        END IF;
    END LOOP;
END $$;

CREATE FUNCTION cde._drop_capture(t cde.tracks) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM cde.tracks x WHERE x.feed = t.feed AND x.source_table = t.source_table;
    PERFORM cde._install_capture(t.source_table);
END $$;

CREATE FUNCTION cde_untrack(feed text, source_table regclass, ticket bigint DEFAULT cde._ticket()) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    caller regrole := cde._redeem(ticket);
    f cde.feeds := cde._managed_feed(feed, caller);
    t cde.tracks;
BEGIN
    SELECT * INTO t FROM cde.tracks x WHERE x.feed = f.name AND x.source_table = cde_untrack.source_table;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cde_untrack: feed % does not track %', f.name, source_table
            USING ERRCODE = 'undefined_object';
    END IF;
    PERFORM cde._drop_capture(t);
END $$;

COMMENT ON FUNCTION cde_untrack(text, regclass, bigint) IS 'Stop capturing changes of a table for a feed';

-- The event triggers below run for every role's DDL, in that role's session: SECURITY DEFINER
-- (the role needs no right on cde's tables: installing cde takes no DDL away from anyone) with a
-- fixed search_path (the session's own, which a database owner may set, cannot reach them).

-- A tracked table that is dropped takes its triggers with it; forget the tracking too, so that
-- cde.tracks never names a table that is gone.
CREATE FUNCTION cde._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t cde.tracks;
    f text;
BEGIN
    FOR t IN
        SELECT x.* FROM cde.tracks x
          JOIN pg_event_trigger_dropped_objects() d ON d.objid = x.source_table AND d.classid = 'pg_class'::regclass
         WHERE d.object_type = 'table'
    LOOP
        PERFORM cde._drop_capture(t);
        RAISE NOTICE 'cde: table % was dropped; feed % no longer tracks it', t.table_name, t.feed;
    END LOOP;
    -- A dropped partition or inheritance child of a tracked table took its rows with it, by no
    -- DML. Which table it was under is gone from the catalog by now: every feed tracking a table
    -- that still has partitions or children gets a full sync.
    IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() d
                 JOIN pg_event_trigger_dropped_objects() g
                   ON g.object_type = 'trigger' AND g.object_identity = 'cde_capture_trn on ' || d.object_identity
                WHERE d.object_type = 'table' AND d.classid = 'pg_class'::regclass
                  AND NOT EXISTS (SELECT 1 FROM cde.tracks x WHERE x.source_table = d.objid)) THEN
        FOR f IN SELECT DISTINCT x.feed FROM cde.tracks x JOIN pg_class c ON c.oid = x.source_table
                  WHERE c.relkind = 'p' OR EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhparent = x.source_table) LOOP
            INSERT INTO cde.queue (feed, all_keys) VALUES (f, true);
            RAISE NOTICE 'cde: a table under one that feed % tracks was dropped with its rows: it gets a full sync', f;
        END LOOP;
        PERFORM cde._changes_recorded();
    END IF;
END $$;

CREATE EVENT TRIGGER cde_on_sql_drop ON sql_drop EXECUTE FUNCTION cde._on_sql_drop();

-- Tables that come under a tracked table or leave it get their capture triggers or lose them
-- (cde._reconcile_capture). An ALTER TABLE that breaks a tracked table's keys (a column they use
-- dropped, renamed or retyped) is refused with a clear error: the alternative, a capture trigger failing on every
-- later write, would break the application. Renaming the table itself is fine: triggers follow it.
CREATE FUNCTION cde._on_ddl_command_end() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    t   cde.tracks;
    f   cde.feeds;
    rel oid;
BEGIN
    -- A table created under a tracked one, attached, detached, inheriting or not: capture follows.
    -- Only for the commands that move tables between trees (event triggers do not see ALTER
    -- TABLE's subcommands, the statement's text does): restoring a dump adds constraints to
    -- tracked tables before it recreates their triggers, and must not find them made already.
    FOR rel IN
        SELECT DISTINCT c.objid FROM pg_event_trigger_ddl_commands() c
         WHERE c.classid = 'pg_class'::regclass AND c.object_type IN ('table', 'foreign table')
           AND current_query() ~* '\m(attach|detach)\s+partition\M|\mpartition\s+of\M|\minherits?\M'
    LOOP
        IF EXISTS (SELECT 1 FROM cde.tracks x WHERE x.source_table = ANY (cde._ancestry(rel) || cde._subtree(rel)))
           OR EXISTS (SELECT 1 FROM pg_trigger g WHERE g.tgrelid = rel AND g.tgname LIKE 'cde\_capture\_%') THEN
            PERFORM cde._reconcile_capture(rel);
        END IF;
    END LOOP;
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

CREATE EVENT TRIGGER cde_on_ddl_command_end ON ddl_command_end WHEN TAG IN ('ALTER TABLE', 'CREATE TABLE', 'CREATE FOREIGN TABLE', 'ALTER FOREIGN TABLE')
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
