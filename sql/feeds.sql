-- Feeds: registration, the generated feed table and rebuild function, and dropping.
--
-- A feed is one SQL query yielding one row per entity key. From it cde generates, per feed:
--   cde.feed_<name>      the feed table: each key's last document, its hash and delivery state
--   cde.rebuild_<name>   rebuilds the documents of a set of keys (NULL: every key), filtering the
--                        source query on the key column in that column's own type so that the
--                        planner uses the underlying table's index.

-- Feed names become parts of table and function names: keep them plain.
CREATE FUNCTION cde._check_feed_name(feed text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF feed IS NULL OR feed !~ '^[a-z][a-z0-9_]{0,47}$' THEN
        RAISE EXCEPTION 'cde: invalid feed name %', coalesce(quote_literal(feed), 'NULL')
            USING ERRCODE = 'invalid_name',
                  HINT = 'A feed name is a plain lower-case identifier: a letter, then letters, digits or _, at most 48 characters.';
    END IF;
END $$;

-- May the calling role (cde._caller(): the one that called the SECURITY DEFINER function asking)
-- manage a feed of this owner? A superuser, the owner, or a role with the owner's privileges.
CREATE FUNCTION cde._manages(owner regrole) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = cde._caller()), false)
        OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = owner)
            AND pg_catalog.pg_has_role(cde._caller(), owner::oid, 'USAGE'))
$$;

CREATE FUNCTION cde._feed(feed text) RETURNS cde.feeds
LANGUAGE plpgsql STABLE AS $$
DECLARE
    f cde.feeds;
BEGIN
    SELECT * INTO f FROM cde.feeds WHERE name = feed;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cde: unknown feed %', coalesce(quote_literal(feed), 'NULL')
            USING ERRCODE = 'undefined_object',
                  HINT = 'SELECT name FROM cde.feeds lists the registered feeds.';
    END IF;
    RETURN f;
END $$;

-- A feed the caller may manage (cde._manages), or an error that says whose it is.
CREATE FUNCTION cde._managed_feed(feed text) RETURNS cde.feeds
LANGUAGE plpgsql STABLE AS $$
DECLARE
    f cde.feeds := cde._feed(feed);
BEGIN
    IF NOT cde._manages(f.owner) THEN
        RAISE EXCEPTION 'cde: permission denied for feed %', f.name
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = format('Feed %s belongs to role %s.', f.name, f.owner),
                  HINT = 'Only the role that registered a feed, its members and superusers may manage it.';
    END IF;
    RETURN f;
END $$;

-- Feeds in dependency order: a feed comes after every feed it depends on.
CREATE FUNCTION cde._feeds_in_order() RETURNS TABLE (name text, depth int)
LANGUAGE sql STABLE AS $$
    WITH RECURSIVE walk(name, depth, path) AS (
        SELECT f.name, 0, ARRAY[f.name] FROM cde.feeds f
        UNION ALL
        SELECT f.name, w.depth + 1, w.path || f.name
          FROM walk w JOIN cde.feeds f ON w.name = ANY (f.depends_on)
         WHERE NOT f.name = ANY (w.path)
    )
    SELECT name, max(depth)::int FROM walk GROUP BY name ORDER BY max(depth), name
$$;

CREATE FUNCTION cde_register_feed(
    feed         text,
    source_query text,
    key_column   text    DEFAULT 'id',
    mode         text    DEFAULT 'immediate',
    depends_on   text[]  DEFAULT '{}',
    batch_size   int     DEFAULT NULL,
    -- Where the source query's names resolve: the caller's search_path as it is now (a default
    -- is evaluated in the caller's session, before this function pins its own).
    search_path  name[]  DEFAULT pg_catalog.current_schemas(false)
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    query      text := regexp_replace(coalesce(source_query, ''), '[\s;]+$', '');
    owner      regrole := cde._caller();     -- the source query runs with this role's rights
    path       text := cde._fixed_search_path(cde_register_feed.search_path);
    key_type   regtype;
    doc_type   regtype;
    has_doc    boolean := true;
    doc_expr   text;
    src_sql    text;
    keys_sql   text;
    chunk_sql  text;
    upsert_sql text;
    gone_set   text;
    tbl        text;
    fn         text;
    old        cde.feeds;
    dep        text;
BEGIN
    PERFORM cde._check_feed_name(feed);
    SELECT * INTO old FROM cde.feeds f WHERE f.name = feed;
    IF old.name IS NOT NULL AND NOT cde._manages(old.owner) THEN
        PERFORM cde._managed_feed(feed);   -- raises: another role's feed
    END IF;
    tbl := format('cde.%I', 'feed_' || feed);
    fn := format('cde.%I', 'rebuild_' || feed);
    IF mode IS NULL OR mode NOT IN ('immediate', 'legacy') THEN
        RAISE EXCEPTION 'cde: unknown mode % for feed %', coalesce(quote_literal(mode), 'NULL'), feed
            USING ERRCODE = 'invalid_parameter_value', HINT = 'mode is ''immediate'' or ''legacy''.';
    END IF;
    IF batch_size IS NOT NULL AND batch_size < 1 THEN
        RAISE EXCEPTION 'cde: batch_size must be at least 1 (got %) for feed %', batch_size, feed
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF key_column IS NULL OR key_column = '' THEN
        RAISE EXCEPTION 'cde: key_column must name a column of the source query of feed %', feed
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF query = '' THEN
        RAISE EXCEPTION 'cde: the source query of feed % is empty', feed USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Dependencies: known feeds, and no cycle once this definition is in place.
    FOREACH dep IN ARRAY coalesce(depends_on, '{}') LOOP
        IF dep = feed THEN
            RAISE EXCEPTION 'cde: feed % cannot depend on itself', feed USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM cde.feeds f WHERE f.name = dep) THEN
            RAISE EXCEPTION 'cde: feed % depends on unknown feed %', feed, quote_literal(dep)
                USING ERRCODE = 'undefined_object', HINT = 'Register the feeds it depends on first.';
        END IF;
        IF EXISTS (
            WITH RECURSIVE up(name) AS (
                SELECT dep
                UNION
                SELECT unnest(f.depends_on) FROM cde.feeds f JOIN up ON f.name = up.name
            )
            SELECT 1 FROM up WHERE up.name = feed
        ) THEN
            RAISE EXCEPTION 'cde: dependency cycle: feed % depends on %, which depends on %', feed, dep, feed
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;

    -- The query must plan and run (with no rows), with the caller's rights, and have the key
    -- column; its type is the key's own type. pg_typeof over a null-extended row reads a column's
    -- type without a row.
    BEGIN
        key_type := cde._query_as(owner, path,
            format('SELECT pg_typeof(s.%I)::regtype::oid::text FROM (VALUES (1)) AS d(x) LEFT JOIN (SELECT * FROM (%s) AS q LIMIT 0) AS s ON true',
                   key_column, query))::oid::regtype;
    EXCEPTION
        WHEN undefined_column THEN
            IF SQLERRM LIKE '%s.' || key_column || '%' OR SQLERRM LIKE '%' || quote_ident(key_column) || '%' THEN
                RAISE EXCEPTION 'cde: the source query of feed % has no key column %', feed, quote_ident(key_column)
                    USING ERRCODE = 'undefined_column', DETAIL = SQLERRM;
            END IF;
            RAISE EXCEPTION 'cde: the source query of feed % does not run: %', feed, SQLERRM USING ERRCODE = SQLSTATE;
        WHEN OTHERS THEN
            RAISE EXCEPTION 'cde: the source query of feed % does not run: %', feed, SQLERRM USING ERRCODE = SQLSTATE;
    END;
    IF (SELECT typarray FROM pg_type WHERE oid = key_type) = 0 THEN
        RAISE EXCEPTION 'cde: key column % of feed % has type %, which has no array type', key_column, feed, key_type;
    END IF;

    BEGIN
        doc_type := cde._query_as(owner, path,
            format('SELECT pg_typeof(s.doc)::regtype::oid::text FROM (VALUES (1)) AS d(x) LEFT JOIN (SELECT * FROM (%s) AS q LIMIT 0) AS s ON true', query))::oid::regtype;
    EXCEPTION WHEN undefined_column THEN
        has_doc := false;
    END;
    IF has_doc AND doc_type NOT IN ('json'::regtype, 'jsonb'::regtype) THEN
        RAISE EXCEPTION 'cde: column doc of the source query of feed % has type %; it must be json or jsonb', feed, doc_type
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'Rename the column, or build the document with jsonb_build_object(...) AS doc.';
    END IF;
    doc_expr := CASE WHEN has_doc THEN 's.doc::jsonb' ELSE 'to_jsonb(s)' END;

    IF to_regclass(tbl) IS NULL THEN
        EXECUTE format($t$
            CREATE TABLE %s (
                key          text COLLATE "C" PRIMARY KEY,  -- "C": byte order, no strcoll on every probe
                doc          jsonb,
                hash         text,
                deleted      boolean NOT NULL DEFAULT false,
                status       text NOT NULL DEFAULT 'pending'
                             CHECK (status IN ('pending', 'sent', 'retrying', 'rejected', 'dead')),
                http_status  int,
                error        text,
                attempts     int NOT NULL DEFAULT 0,
                modified_at  timestamptz NOT NULL DEFAULT now(),
                sent_at      timestamptz
            )$t$, tbl);
        EXECUTE format('CREATE INDEX %I ON %s (modified_at, key) WHERE status = ''pending''',
                       'feed_' || feed || '_pending', tbl);
        EXECUTE format('COMMENT ON TABLE %s IS %L', tbl, 'cde feed table of feed ' || feed || ': last document, hash and delivery state per key');
    END IF;
    -- The extension's owner owns the feed table: the workers write it, and an owner may add
    -- triggers, rules, policies or expression indexes, which would run as the workers. The feed's
    -- owner may only read and write its rows, which its rebuild function does with its rights.
    EXECUTE format('ALTER TABLE %s OWNER TO %I', tbl, current_user);
    EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', tbl);
    IF old.owner IS NOT NULL AND old.owner <> owner AND EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = old.owner) THEN
        EXECUTE format('REVOKE ALL ON %s FROM %s', tbl, old.owner);
    END IF;
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON %s TO %s', tbl, owner);

    -- The rebuild function. It runs the source query with the rights of the role registering
    -- the feed and that role's search_path, fixed now: it is owned by the extension's owner (so
    -- that nobody else can change it) and runs only through cde._rebuild (src/trust.rs), which
    -- calls it as the feed's owner, in a security-restricted operation; called any other way it
    -- refuses to run.
    -- JIT is off: each call plans anew for its keys, and compiling every such plan cost more
    -- than it saved (a full sync took 19% longer with it on).
    -- EXECUTE ... USING plans each call with the keys as constants, so "= ANY(keys)" becomes
    -- an index scan for a few keys and "keys IS NULL" drops the filter for a full rebuild.
    --   mode 'apply'     rebuild the keys (NULL: all): changed documents and deletions become pending
    --   mode 'gone'      the deletion pass of a full sync: of the next n keys of the feed table after
    --                    "after" (in its own order), mark as deleted those the source no longer
    --                    returns ('gone_dry': count them); last_key is the next chunk's "after"
    --   mode 'chunk'     apply to the next n source keys after "after", in the key's own order (a
    --                    full sync's step): one range scan of the source rather than a probe per
    --                    key; failed items are sent again; last_key is the next chunk's "after"
    --   mode 'chunk_dry' the same counts, nothing written
    --   mode 'count'     how many rows the source has (a full sync's plan): "built"
    -- A chunk takes only the keys of its lane ("lane" of "lanes", see cde._in_lane): several sync
    -- builders build one feed at once, each its own lanes. One lane (lanes = 1) is every key.
    src_sql := format($q$
        SELECT (s.%1$I)::text AS key, %2$s AS doc
          FROM (%3$s) AS s
         WHERE ($1 IS NULL OR s.%1$I = ANY ($1::%4$s[]))$q$,
        key_column, doc_expr, query, format_type(key_type, NULL));
    -- Which keys of the deletion pass's chunk (below) the source still returns, without their
    -- documents: not naming the document lets the planner skip building it (a full sync spent a
    -- fifth of its time building documents only to check their keys).
    keys_sql := format($q$
        SELECT (s.%1$I)::text AS key FROM (%2$s) AS s
         WHERE s.%1$I = ANY ((SELECT array_agg(chunk.key) FROM chunk)::%3$s[])$q$,
        key_column, query, format_type(key_type, NULL));
    -- Storing the built documents of "src": a changed document (or a deleted key's return) becomes
    -- pending; an unchanged one keeps its state and is not sent again.
    upsert_sql := format($q$
                INSERT INTO %s AS f (key, doc, hash)
                SELECT key, doc, cde._doc_hash(doc) FROM src WHERE doc IS NOT NULL
                ON CONFLICT (key) DO UPDATE
                   SET doc = excluded.doc, hash = excluded.hash, deleted = false, status = 'pending',
                       http_status = NULL, error = NULL, attempts = 0, modified_at = now()
                 WHERE f.hash IS DISTINCT FROM excluded.hash OR f.deleted$q$, tbl);
    -- A key gone from the source: a pending deletion.
    gone_set := $q$doc = NULL, hash = NULL, deleted = true, status = 'pending',
                       http_status = NULL, error = NULL, attempts = 0, modified_at = now()$q$;
    -- The next n source rows of a lane after a key, in the key's own order, numbered in that
    -- order. The lane filter applies to the key alone, below the documents: the rows of other
    -- lanes are scanned, not built.
    chunk_sql := format($q$
        SELECT (s.%1$I)::text AS key, %2$s AS doc, row_number() OVER () AS o
          FROM (SELECT * FROM (%3$s) AS s
                 WHERE ($1 IS NULL OR s.%1$I > $1::%4$s)
                   AND ($4 = 1 OR cde._in_lane((s.%1$I)::text, $3, $4))
                 ORDER BY s.%1$I LIMIT $2) AS s$q$,
        key_column, doc_expr, query, format_type(key_type, NULL));
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION %1$s(keys text[], mode text DEFAULT 'apply', after text DEFAULT NULL, n int DEFAULT 0,
                                        lane int DEFAULT 0, lanes int DEFAULT 1,
                                        OUT built bigint, OUT changed bigint, OUT deleted bigint, OUT last_key text)
        LANGUAGE plpgsql SET search_path = %2$s SET jit = off AS $body$
        BEGIN
            IF NOT cde._restricted() THEN
                RAISE EXCEPTION 'cde: %1$s runs only as its feed''s owner, through cde._rebuild()'
                    USING ERRCODE = 'insufficient_privilege';
            END IF;
            CASE mode
            WHEN 'apply' THEN EXECUTE %3$L INTO built, changed, deleted USING keys;
            WHEN 'gone' THEN EXECUTE %4$L INTO deleted, last_key USING after, n, false;
            WHEN 'gone_dry' THEN EXECUTE %4$L INTO deleted, last_key USING after, n, true;
            WHEN 'chunk' THEN EXECUTE %5$L INTO built, changed, deleted, last_key USING after, n, lane, lanes;
            WHEN 'chunk_dry' THEN EXECUTE %6$L INTO built, changed, deleted, last_key USING after, n, lane, lanes;
            WHEN 'count' THEN EXECUTE %7$L INTO built;
            END CASE;
        END $body$$f$,
        fn, path,
        -- apply. "gone": the keys the source did not return with a document. Given a list of keys,
        -- they are found in the list itself (keys EXCEPT built keys), not by probing the feed table
        -- for every key: a collect is mostly changes, every key built, and those probes were 17-20
        -- ms of a 230-530 ms statement for 5,000 keys (4 ms now).
        format($q$
            WITH src AS MATERIALIZED (%1$s
            ), built AS (
                %3$s
                RETURNING 1
            ), gone AS (
                UPDATE %2$s AS f
                   SET %4$s
                 WHERE ($1 IS NULL OR f.key = ANY (ARRAY(SELECT unnest($1) EXCEPT SELECT src.key FROM src WHERE src.doc IS NOT NULL)))
                   AND NOT f.deleted
                   AND ($1 IS NOT NULL OR NOT EXISTS (SELECT 1 FROM src WHERE src.key = f.key AND src.doc IS NOT NULL))
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM src), (SELECT count(*) FROM built), (SELECT count(*) FROM gone)
        $q$, src_sql, tbl, upsert_sql, gone_set),
        -- gone / gone_dry ($3: dry). Keys the source returns with a NULL document were made
        -- deletions when their chunk was built; here only keys the source no longer has are left.
        format($q$
            WITH chunk AS MATERIALIZED (
                SELECT f.key FROM %2$s AS f WHERE NOT f.deleted AND f.key > $1 ORDER BY f.key LIMIT $2
            ), src AS MATERIALIZED (%1$s
            ), missing AS (
                SELECT chunk.key FROM chunk WHERE NOT EXISTS (SELECT 1 FROM src WHERE src.key = chunk.key)
            ), gone AS (
                UPDATE %2$s AS f
                   SET %4$s
                  FROM missing WHERE NOT $3 AND f.key = missing.key
                RETURNING 1
            )
            SELECT CASE WHEN $3 THEN (SELECT count(*) FROM missing) ELSE (SELECT count(*) FROM gone) END,
                   (SELECT max(key) FROM chunk)
        $q$, keys_sql, tbl, NULL, gone_set),
        -- chunk. Keys the source returns with a NULL document become deletions here; keys it no
        -- longer has are the deletion pass's (cde._sync_step), which walks the feed table.
        format($q$
            WITH src AS MATERIALIZED (%1$s
            ), built AS (
                %3$s
                    OR f.status IN ('retrying', 'rejected', 'dead')
                RETURNING 1
            ), gone AS (
                UPDATE %2$s AS f
                   SET %4$s
                  FROM src WHERE src.doc IS NULL AND f.key = src.key AND NOT f.deleted
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM src), (SELECT count(*) FROM built), (SELECT count(*) FROM gone),
                   (SELECT key FROM src ORDER BY o DESC LIMIT 1)
        $q$, chunk_sql, tbl, upsert_sql, gone_set),
        -- chunk_dry
        format($q$
            WITH src AS MATERIALIZED (%1$s)
            SELECT count(*),
                   count(*) FILTER (WHERE src.doc IS NOT NULL AND (f.key IS NULL OR f.deleted OR f.hash IS DISTINCT FROM cde._doc_hash(src.doc)
                                                                 OR f.status IN ('retrying', 'rejected', 'dead'))),
                   count(*) FILTER (WHERE src.doc IS NULL AND f.key IS NOT NULL AND NOT f.deleted),
                   (SELECT key FROM src ORDER BY o DESC LIMIT 1)
              FROM src LEFT JOIN %2$s AS f ON f.key = src.key
        $q$, chunk_sql, tbl),
        -- count
        format('SELECT count(*) FROM (%s) AS s', query));
    EXECUTE format('ALTER FUNCTION %s(text[], text, text, int, int, int) OWNER TO %I', fn, current_user);
    EXECUTE format('REVOKE ALL ON FUNCTION %s(text[], text, text, int, int, int) FROM PUBLIC', fn);
    IF old.owner IS NOT NULL AND old.owner <> owner AND EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = old.owner) THEN
        EXECUTE format('REVOKE ALL ON FUNCTION %s(text[], text, text, int, int, int) FROM %s', fn, old.owner);
    END IF;
    EXECUTE format('GRANT EXECUTE ON FUNCTION %s(text[], text, text, int, int, int) TO %s', fn, owner);

    INSERT INTO cde.feeds AS f (name, source_query, key_column, key_type, doc_column, mode, depends_on,
                                batch_size, owner, search_path, feed_table, rebuild_fn)
    VALUES (feed, query, key_column, key_type, has_doc, mode, coalesce(depends_on, '{}'), batch_size,
            owner, path, tbl::regclass, (fn || '(text[], text, text, int, int, int)')::regprocedure)
    ON CONFLICT (name) DO UPDATE
       SET source_query = excluded.source_query, key_column = excluded.key_column, key_type = excluded.key_type,
           doc_column = excluded.doc_column, mode = excluded.mode, depends_on = excluded.depends_on,
           batch_size = excluded.batch_size, owner = excluded.owner, search_path = excluded.search_path,
           rebuild_fn = excluded.rebuild_fn, updated_at = now();

    -- A new definition may yield other documents for every key: rebuild them all. Unchanged
    -- documents keep their hash and are not sent again.
    IF old.name IS NOT NULL AND (old.source_query, old.key_column) IS DISTINCT FROM (query, key_column) THEN
        INSERT INTO cde.queue (feed, all_keys) VALUES (feed, true);
        PERFORM cde._changes_recorded();
    END IF;
END $fn$;

COMMENT ON FUNCTION cde_register_feed(text, text, text, text, text[], int, name[]) IS
    'Register (or redefine) a feed: one source query yielding one JSON document per entity key';

-- A search_path of these schemas (the registering session's, resolved), with pg_temp last so
-- that temporary objects can never shadow what generated code refers to.
CREATE FUNCTION cde._fixed_search_path(schemas name[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(string_agg(quote_ident(s), ', ' ORDER BY o) || ', ', '') || 'pg_temp'
      FROM unnest(schemas) WITH ORDINALITY AS t(s, o)
     WHERE s NOT LIKE 'pg\_temp%'
$$;

CREATE FUNCTION cde_drop_feed(feed text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f cde.feeds := cde._managed_feed(feed);
    t cde.tracks;
    dependents text;
BEGIN
    SELECT string_agg(x.name, ', ') INTO dependents FROM cde.feeds x WHERE f.name = ANY (x.depends_on);
    IF dependents IS NOT NULL THEN
        RAISE EXCEPTION 'cde: feed % cannot be dropped: feeds % depend on it', f.name, dependents
            USING ERRCODE = 'dependent_objects_still_exist';
    END IF;
    IF EXISTS (SELECT 1 FROM cde.sync_phases p JOIN cde.sync_runs r ON r.id = p.run_id
                WHERE p.feed = f.name AND r.status IN ('preparing', 'planned', 'executing')) THEN
        RAISE EXCEPTION 'cde: feed % cannot be dropped while a full sync of it runs', f.name
            USING HINT = 'cde_cancel_sync(run_id) first; see cde_sync_runs.';
    END IF;
    FOR t IN SELECT * FROM cde.tracks WHERE tracks.feed = f.name LOOP
        PERFORM cde._drop_capture(t);
    END LOOP;
    DELETE FROM cde.queue q WHERE q.feed = f.name;
    DELETE FROM cde.feeds x WHERE x.name = f.name;   -- cascades to tracks and retries
    EXECUTE format('DROP FUNCTION IF EXISTS %s', f.rebuild_fn);
    EXECUTE format('DROP TABLE IF EXISTS %s', f.feed_table);
END $$;

COMMENT ON FUNCTION cde_drop_feed(text) IS 'Drop a feed: its capture triggers, feed table, queue and retries';
