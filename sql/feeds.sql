-- Feeds: registration, the generated feed table and rebuild function, and dropping.
--
-- A feed is one SQL query yielding one row per entity key. From it cde generates, per feed:
--   cde.feed_<name>      the feed table: each key's last document, its hash and delivery state
-- and nothing else: its documents are built by cde._rebuild from cde._source_sql
-- (sql/rebuild.sql), which filters the source query on the key column in that column's own type
-- so that the planner uses the underlying table's index.

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

-- May the calling role (the management function's caller, from its ticket: src/trust.rs) manage
-- a feed of this owner? A superuser, the owner, or a role with the owner's privileges. NULL: cde
-- itself (the worker).
CREATE FUNCTION cde._manages(owner regrole, caller regrole) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT caller IS NULL
        OR coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.oid = caller), false)
        OR (EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = owner)
            AND pg_catalog.pg_has_role(caller::oid, owner::oid, 'USAGE'))
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
CREATE FUNCTION cde._managed_feed(feed text, caller regrole) RETURNS cde.feeds
LANGUAGE plpgsql STABLE AS $$
DECLARE
    f cde.feeds := cde._feed(feed);
BEGIN
    IF NOT cde._manages(f.owner, caller) THEN
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

-- A feed table's row counts (cde.row_counts), kept by its statement triggers: each writing
-- statement appends its net change by status and deleted flag. An update that moves no row
-- between them (a pending document changed again) appends nothing.
CREATE FUNCTION cde._count_rows() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    CASE TG_OP
    WHEN 'INSERT' THEN
        INSERT INTO cde.row_counts (feed, status, deleted, n)
        SELECT TG_ARGV[0], r.status, r.deleted, count(*) FROM new_rows r GROUP BY r.status, r.deleted;
    WHEN 'UPDATE' THEN
        INSERT INTO cde.row_counts (feed, status, deleted, n)
        SELECT TG_ARGV[0], r.status, r.deleted, sum(r.n)
          FROM (SELECT o.status, o.deleted, -1 AS n FROM old_rows o
                UNION ALL
                SELECT x.status, x.deleted, 1 FROM new_rows x) AS r
         GROUP BY r.status, r.deleted HAVING sum(r.n) <> 0;
    WHEN 'DELETE' THEN
        INSERT INTO cde.row_counts (feed, status, deleted, n)
        SELECT TG_ARGV[0], r.status, r.deleted, -count(*) FROM old_rows r GROUP BY r.status, r.deleted;
    WHEN 'TRUNCATE' THEN
        -- The negation of what is counted, not a DELETE: a fold under way keeps the sum either way.
        INSERT INTO cde.row_counts (feed, status, deleted, n)
        SELECT c.feed, c.status, c.deleted, -sum(c.n) FROM cde.row_counts c
         WHERE c.feed = TG_ARGV[0] AND c.status <> '*'
         GROUP BY c.feed, c.status, c.deleted HAVING sum(c.n) <> 0;
    END CASE;
    RETURN NULL;
END $$;

-- Set a feed's counts to what its table holds, and mark them kept ('*'). Under a SHARE lock no
-- writer of the table is in flight and every count they appended is committed: the difference
-- between the table's rows and what is counted is exact. Appended, never deleted, so that a fold
-- under way keeps the sum. Run when a feed table is created, by the housekeeping pass for a
-- restored copy, and by a superuser after writes made with the triggers disabled.
CREATE FUNCTION cde._recount(feed text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    tbl regclass := format('cde.%I', 'feed_' || feed)::regclass;
BEGIN
    EXECUTE format('LOCK TABLE %s IN SHARE MODE', tbl);
    EXECUTE format($q$
        INSERT INTO cde.row_counts (feed, status, deleted, n)
        SELECT $1, coalesce(a.status, c.status), coalesce(a.deleted, c.deleted), coalesce(a.n, 0) - coalesce(c.n, 0)
          FROM (SELECT t.status, t.deleted, count(*) AS n FROM %s t GROUP BY t.status, t.deleted) AS a
          FULL JOIN (SELECT r.status, r.deleted, sum(r.n) AS n FROM cde.row_counts r
                      WHERE r.feed = $1 AND r.status <> '*' GROUP BY r.status, r.deleted) AS c
            ON c.status = a.status AND c.deleted = a.deleted
         WHERE coalesce(a.n, 0) <> coalesce(c.n, 0)
        UNION ALL
        SELECT $1, '*', false, 0 WHERE NOT EXISTS (SELECT 1 FROM cde.row_counts r WHERE r.feed = $1 AND r.status = '*')$q$, tbl)
      USING feed;
END $$;

-- A feed's table, from its one definition (registration, and the upgrade from 0.1.0, which
-- rebuilds every feed table): the extension owner's, with no right for anyone else.
CREATE FUNCTION cde._create_feed_table(feed text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
    SET default_tablespace = '' SET default_table_access_method = heap AS $$   -- not the caller's
DECLARE
    tbl text := format('cde.%I', 'feed_' || feed);
BEGIN
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
            sent_at      timestamptz,
            response_id  text,         -- x-request-id of the response that delivered or rejected it
            full_sync    boolean NOT NULL DEFAULT false  -- made pending by a full sync: sent after changes
        )$t$, tbl);
    -- The send order: changes first, then what full syncs made pending, each oldest first. A
    -- change made during a full sync does not wait behind the sync's documents, however slow the
    -- destination (docs/nothing-lost.md, "Order").
    EXECUTE format('CREATE INDEX %I ON %s (full_sync, modified_at, key) WHERE status = ''pending''', 'feed_' || feed || '_pending', tbl);
    -- Failed items (cde_failed_items, the oldest retrying one's age), and deletions (their count,
    -- and the sent ones past cde.tombstone_retention): few rows each, found without a scan. The
    -- statuses are cde._failed's, spelled out: an index may not depend on a function that an
    -- upgrade recreates.
    -- Named by PostgreSQL: a name of ours could be another feed's table (feed x's "feed_x_failed"
    -- is feed x_failed's).
    EXECUTE format('CREATE INDEX ON %s (status, modified_at) WHERE status IN (''retrying'', ''rejected'', ''dead'')', tbl);
    EXECUTE format('CREATE INDEX ON %s (status, sent_at) WHERE deleted', tbl);
    -- Its row counts (a transition table may serve one event only, hence a trigger per event).
    -- ALWAYS: a session with session_replication_role = replica is counted too.
    EXECUTE format('CREATE TRIGGER cde_count_insert AFTER INSERT ON %s REFERENCING NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION cde._count_rows(%L)', tbl, feed);
    EXECUTE format('CREATE TRIGGER cde_count_update AFTER UPDATE ON %s REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION cde._count_rows(%L)', tbl, feed);
    EXECUTE format('CREATE TRIGGER cde_count_delete AFTER DELETE ON %s REFERENCING OLD TABLE AS old_rows
                    FOR EACH STATEMENT EXECUTE FUNCTION cde._count_rows(%L)', tbl, feed);
    EXECUTE format('CREATE TRIGGER cde_count_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION cde._count_rows(%L)',
                   tbl, feed);
    EXECUTE format('ALTER TABLE %1$s ENABLE ALWAYS TRIGGER cde_count_insert, ENABLE ALWAYS TRIGGER cde_count_update,
                    ENABLE ALWAYS TRIGGER cde_count_delete, ENABLE ALWAYS TRIGGER cde_count_truncate', tbl);
    PERFORM cde._recount(feed);   -- zero (counts of a feed of that name dropped before), and kept
    EXECUTE format('COMMENT ON TABLE %s IS %L', tbl, 'cde feed table of feed ' || feed || ': last document, hash and delivery state per key');
    EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', tbl);
END $$;

CREATE FUNCTION cde_register_feed(
    feed         text,
    source_query text,
    key_column   text    DEFAULT NULL,           -- NULL: 'id', unless key_columns
    mode         text    DEFAULT 'immediate',
    depends_on   text[]  DEFAULT '{}',
    batch_size   int     DEFAULT NULL,
    -- Where the source query's names resolve: the caller's search_path as it is now (a default
    -- is evaluated in the caller's session, before this function pins its own).
    search_path  name[]  DEFAULT pg_catalog.current_schemas(false),
    destination  text    DEFAULT NULL,           -- NULL: the default one (cde.endpoint)
    key_columns  text[]  DEFAULT NULL,           -- a key of several columns
    ticket       bigint  DEFAULT cde._ticket()   -- who calls (src/trust.rs): never pass it
) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    caller     regrole := cde._redeem(ticket);
    query      text := regexp_replace(coalesce(source_query, ''), '[\s;]+$', '');
    owner      regrole := caller;     -- the source query runs with this role's rights
    path       text := cde._fixed_search_path(cde_register_feed.search_path);
    keys       text[];
    key_types  regtype[] := '{}';
    key_type   regtype;
    col        text;
    doc_type   regtype;
    has_doc    boolean := true;
    tbl        text;
    old        cde.feeds;
    dep        text;
BEGIN
    PERFORM cde._check_feed_name(feed);
    SELECT * INTO old FROM cde.feeds f WHERE f.name = feed;
    IF old.name IS NOT NULL AND NOT cde._manages(old.owner, caller) THEN
        PERFORM cde._managed_feed(feed, caller);   -- raises: another role's feed
    END IF;
    tbl := format('cde.%I', 'feed_' || feed);
    IF mode IS NULL OR mode NOT IN ('immediate', 'legacy') THEN
        RAISE EXCEPTION 'cde: unknown mode % for feed %', coalesce(quote_literal(mode), 'NULL'), feed
            USING ERRCODE = 'invalid_parameter_value', HINT = 'mode is ''immediate'' or ''legacy''.';
    END IF;
    IF batch_size IS NOT NULL AND batch_size < 1 THEN
        RAISE EXCEPTION 'cde: batch_size must be at least 1 (got %) for feed %', batch_size, feed
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF key_column IS NOT NULL AND key_columns IS NOT NULL THEN
        RAISE EXCEPTION 'cde: feed % is given both key_column and key_columns', feed
            USING ERRCODE = 'invalid_parameter_value', HINT = 'key_columns => ''{a,b}'' alone names a key of several columns.';
    END IF;
    keys := coalesce(key_columns, ARRAY[coalesce(key_column, 'id')]);
    IF cardinality(keys) IS NULL OR cardinality(keys) = 0 OR EXISTS (SELECT 1 FROM unnest(keys) AS c WHERE c IS NULL OR c = '') THEN
        RAISE EXCEPTION 'cde: the key columns of feed % must name columns of its source query (got %)', feed, coalesce(keys::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (SELECT count(DISTINCT c) FROM unnest(keys) AS c) <> cardinality(keys) THEN
        RAISE EXCEPTION 'cde: the key columns of feed % name a column twice: %', feed, keys
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF query = '' THEN
        RAISE EXCEPTION 'cde: the source query of feed % is empty', feed USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM cde._usable_destination(destination, caller);

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
    -- columns; their types are the key's own types. pg_typeof over a null-extended row reads a
    -- column's type without a row.
    FOREACH col IN ARRAY keys LOOP
        BEGIN
            key_type := cde._query_as(owner, path,
                format('SELECT pg_typeof(s.%I)::regtype::oid::text FROM (VALUES (1)) AS d(x) LEFT JOIN (SELECT * FROM (
%s
) AS q LIMIT 0) AS s ON true',
                       col, query))::oid::regtype;
        EXCEPTION
            WHEN undefined_column THEN
                IF SQLERRM LIKE '%s.' || col || '%' OR SQLERRM LIKE '%' || quote_ident(col) || '%' THEN
                    RAISE EXCEPTION 'cde: the source query of feed % has no key column %', feed, quote_ident(col)
                        USING ERRCODE = 'undefined_column', DETAIL = SQLERRM;
                END IF;
                RAISE EXCEPTION 'cde: the source query of feed % does not run: %', feed, SQLERRM USING ERRCODE = SQLSTATE;
            WHEN feature_not_supported THEN   -- "SELECT FOR UPDATE is not allowed in a non-volatile function"
                RAISE EXCEPTION 'cde: the source query of feed % does not only read: %', feed, SQLERRM USING ERRCODE = SQLSTATE,
                    HINT = 'A source query runs read-only, in the snapshot of the statement that builds the documents: no FOR UPDATE or FOR SHARE, no data-modifying WITH.';
            WHEN OTHERS THEN
                RAISE EXCEPTION 'cde: the source query of feed % does not run: %', feed, SQLERRM USING ERRCODE = SQLSTATE;
        END;
        IF key_type IS NULL OR (SELECT typarray FROM pg_type WHERE oid = key_type) = 0 THEN
            RAISE EXCEPTION 'cde: key column % of feed % has type %, which has no array type', col, feed, key_type;
        END IF;
        key_types := key_types || key_type;
    END LOOP;

    BEGIN
        doc_type := cde._query_as(owner, path,
            format('SELECT pg_typeof(s.doc)::regtype::oid::text FROM (VALUES (1)) AS d(x) LEFT JOIN (SELECT * FROM (
%s
) AS q LIMIT 0) AS s ON true', query))::oid::regtype;
    EXCEPTION WHEN undefined_column THEN
        has_doc := false;
    END;
    IF has_doc AND doc_type NOT IN ('json'::regtype, 'jsonb'::regtype) THEN
        RAISE EXCEPTION 'cde: column doc of the source query of feed % has type %; it must be json or jsonb', feed, doc_type
            USING ERRCODE = 'datatype_mismatch',
                  HINT = 'Rename the column, or build the document with jsonb_build_object(...) AS doc.';
    END IF;

    IF to_regclass(tbl) IS NULL THEN
        PERFORM cde._create_feed_table(feed);
    ELSIF old.name IS NULL THEN
        RAISE EXCEPTION 'cde: a table % exists that is no feed''s', tbl
            USING ERRCODE = 'duplicate_table', HINT = 'A superuser drops or renames it; schema cde is cde''s alone.';
    END IF;
    -- The extension's owner owns the feed table, and nobody else has any right on it: the workers
    -- write it, and an owner could add triggers, rules, policies or expression indexes, which
    -- would run as the workers. (A 0.1.0 feed table belonged to the role that registered it.)
    EXECUTE format('ALTER TABLE %s OWNER TO %I', tbl, current_user);
    EXECUTE format('REVOKE ALL ON %s FROM PUBLIC', tbl);
    IF old.owner IS NOT NULL AND EXISTS (SELECT 1 FROM pg_roles r WHERE r.oid = old.owner) THEN
        EXECUTE format('REVOKE ALL ON %s FROM %s', tbl, old.owner);
    END IF;

    -- 0.1.0 generated a rebuild function per feed; its documents are now built by cde._rebuild
    -- (sql/rebuild.sql).
    IF to_regprocedure(format('cde.%I(text[], text, text, int, int, int)', 'rebuild_' || feed)) IS NOT NULL THEN
        EXECUTE format('DROP FUNCTION cde.%I(text[], text, text, int, int, int)', 'rebuild_' || feed);
    END IF;

    INSERT INTO cde.feeds AS f (name, source_query, key_columns, key_types, doc_column, mode, depends_on,
                                batch_size, owner, search_path, feed_table, destination)
    VALUES (feed, query, keys, key_types, has_doc, mode, coalesce(depends_on, '{}'), batch_size,
            owner, path, tbl::regclass, nullif(cde_register_feed.destination, 'default'))
    ON CONFLICT (name) DO UPDATE
       SET source_query = excluded.source_query, key_columns = excluded.key_columns, key_types = excluded.key_types,
           doc_column = excluded.doc_column, mode = excluded.mode, depends_on = excluded.depends_on,
           batch_size = excluded.batch_size, owner = excluded.owner, search_path = excluded.search_path,
           destination = excluded.destination, updated_at = now();

    -- A new definition may yield other documents for every key: rebuild them all. Unchanged
    -- documents keep their hash and are not sent again; with other key columns, every key is
    -- another one (the old ones are sent as deleted).
    IF old.name IS NOT NULL AND (old.source_query, old.key_columns) IS DISTINCT FROM (query, keys) THEN
        INSERT INTO cde.queue (feed, all_keys) VALUES (feed, true);
        PERFORM cde._changes_recorded();
    END IF;
END $fn$;

COMMENT ON FUNCTION cde_register_feed(text, text, text, text, text[], int, name[], text, text[], bigint) IS
    'Register (or redefine) a feed: one source query yielding one JSON document per entity key';

-- A search_path of these schemas (the registering session's, resolved), with pg_catalog first
-- (nothing of the registrant's may stand for the types, casts and operators cde's own SQL around
-- the query uses) and pg_temp last (temporary objects never shadow anything).
CREATE FUNCTION cde._fixed_search_path(schemas name[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT 'pg_catalog, ' || coalesce(string_agg(quote_ident(s), ', ' ORDER BY o) || ', ', '') || 'pg_temp'
      FROM unnest(schemas) WITH ORDINALITY AS t(s, o)
     WHERE s NOT LIKE 'pg\_temp%' AND s <> 'pg_catalog'
$$;

CREATE FUNCTION cde_drop_feed(feed text, ticket bigint DEFAULT cde._ticket()) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    caller regrole := cde._redeem(ticket);
    f cde.feeds := cde._managed_feed(feed, caller);
    t cde.tracks;
    dependents text;
BEGIN
    SELECT string_agg(x.name, ', ') INTO dependents FROM cde.feeds x WHERE f.name = ANY (x.depends_on);
    IF dependents IS NOT NULL THEN
        RAISE EXCEPTION 'cde: feed % cannot be dropped: feeds % depend on it', f.name, dependents
            USING ERRCODE = 'dependent_objects_still_exist';
    END IF;
    IF cde._syncing(f.name) THEN
        RAISE EXCEPTION 'cde: feed % cannot be dropped while a full sync of it runs', f.name
            USING HINT = 'cde_cancel_sync(run_id) first; see cde_sync_runs.';
    END IF;
    -- The worker's requests of this feed still out come back first: a feed registered again
    -- under this name starts with an empty table, and its builders would write as sent, and
    -- post, keys whose older documents were still on their way (docs/nothing-lost.md).
    PERFORM cde._hold_iteration_lock();
    FOR t IN SELECT * FROM cde.tracks WHERE tracks.feed = f.name LOOP
        PERFORM cde._drop_capture(t);
    END LOOP;
    DELETE FROM cde.queue q WHERE q.feed = f.name;
    DELETE FROM cde.sync_posts p WHERE p.feed = f.name;   -- a builder still posting counts nothing
    DELETE FROM cde.feeds x WHERE x.name = f.name;   -- cascades to tracks and retries
    EXECUTE format('DROP TABLE IF EXISTS %s', f.feed_table);   -- its counts go at the next fold
END $$;

COMMENT ON FUNCTION cde_drop_feed(text, bigint) IS 'Drop a feed: its capture triggers, feed table, queue and retries';
