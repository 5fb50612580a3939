-- cde_check_feed(feed): what would make a feed misbehave, found before it does. It runs the
-- feed's source query (as the feed's owner, through cde._source) and reports, one row per
-- problem:
--   - rows whose key is NULL, and keys that more than one row returns (the whole source is read
--     for these, without building documents);
--   - documents that differ between two builds with no change in between: built as a full sync
--     builds them (a range of keys) and as changes are collected (the keys themselves,
--     cde._chunk_size() at a time). An aggregate without ORDER BY whose order follows the plan,
--     random(), clock_timestamp(): every rebuild would send such a document again;
--   - documents that differ from the ones in the feed table although no change to them is
--     queued: they depend on the time (now()) or on a table that is not tracked;
--   - documents larger than a batch to the feed's destination may be (max_batch_bytes);
--   - a rebuild of a few keys that reads a table of some size sequentially (its plan, as the
--     feed's owner): every collect of a few changed keys would read it whole;
--   - a source query that calls a function of the time or of chance.
-- Documents are built for every key when the feed has at most "sample" of them, else for its
-- first "sample" keys in key order. A sound feed gives no rows.
CREATE FUNCTION cde_check_feed(feed text, sample int DEFAULT 10000, ticket bigint DEFAULT cde._ticket())
RETURNS TABLE (key text, problem text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    caller  regrole := cde._redeem(ticket);
    f       cde.feeds := cde._managed_feed(feed, caller);
    dest    text := coalesce(f.destination, 'default');
    n       bigint;
    limit_  bigint;
    all_queued boolean;
    probe   text[];
    plan    jsonb;
    r       record;
BEGIN
    IF sample IS NULL OR sample < 1 THEN
        RAISE EXCEPTION 'cde_check_feed: sample must be at least 1 (got %)', coalesce(sample::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;

    -- Keys.
    SELECT s.o INTO n FROM cde._source(f.name, 'nulls') AS s;
    IF n > 0 THEN
        key := NULL;
        problem := format('%s rows of the source query have a NULL key (%s): they are never sent', n, array_to_string(f.key_columns, ', '));
        RETURN NEXT;
    END IF;
    FOR r IN SELECT s.key, s.o FROM cde._source(f.name, 'duplicates') AS s LOOP
        key := r.key;
        problem := format('the source query returns %s rows for this key: one key must be one entity (its documents cannot be built)', r.o);
        RETURN NEXT;
    END LOOP;

    -- Documents, built twice.
    SELECT d.max_batch_bytes INTO limit_ FROM @extschema@.cde_destinations d WHERE d.name = dest;
    SELECT bool_or(q.all_keys) INTO all_queued FROM cde.queue q WHERE q.feed = f.name;
    FOR r IN EXECUTE format($q$
        WITH built AS MATERIALIZED (
            SELECT s.key, cde._doc_hash(s.doc) AS hash, octet_length(s.doc::text) AS bytes, s.o
              FROM cde._source($1, 'chunk', NULL, NULL, $2) AS s WHERE s.key IS NOT NULL
        ), a AS (   -- keys of one row each: the others are reported above
            SELECT x.key, min(x.hash) AS hash, min(x.bytes) AS bytes, min(x.o) AS o FROM built x GROUP BY x.key HAVING count(*) = 1
        ), groups AS (
            SELECT array_agg(a.key) AS keys FROM a GROUP BY (a.o - 1) / cde._chunk_size()
        ), b AS MATERIALIZED (
            SELECT s.key, cde._doc_hash(s.doc) AS hash FROM groups g, LATERAL cde._source($1, 'keys', g.keys) AS s
        ), twice AS (
            SELECT a.key, a.hash, b.hash AS again FROM a JOIN b USING (key)
        ), queued AS (
            SELECT DISTINCT u AS key FROM cde.queue q, unnest(q.keys) AS u WHERE q.feed = $1
            UNION SELECT x.key FROM cde.retries x WHERE x.feed = $1
        )
        SELECT w.key, 'unstable' AS kind, NULL::bigint AS bytes, NULL::bigint AS age
          FROM twice w WHERE w.hash IS DISTINCT FROM w.again
        UNION ALL
        SELECT w.key, 'stale', NULL, round(extract(epoch FROM now() - t.modified_at))::bigint
          FROM twice w JOIN %s AS t ON t.key = w.key
         WHERE w.hash IS NOT DISTINCT FROM w.again AND t.hash IS DISTINCT FROM w.hash AND NOT t.deleted
           AND NOT $3 AND NOT EXISTS (SELECT 1 FROM queued WHERE queued.key = w.key)
        UNION ALL
        SELECT a.key, 'large', a.bytes, NULL FROM a WHERE a.bytes > $4
        ORDER BY 2, 1$q$, f.feed_table)
      USING f.name, sample, coalesce(all_queued, false), limit_
    LOOP
        key := r.key;
        problem := CASE r.kind
            WHEN 'unstable' THEN 'built twice with no change in between, the document differed: it is not deterministic (an aggregate without ORDER BY, random(), clock_timestamp()...) and every rebuild would send it again'
            WHEN 'stale' THEN format('the document differs from the one built %s s ago, and no change to it was captured since: it depends on the time (now()) or on a table that is not tracked (cde_track)', r.age)
            ELSE format('the document is %s bytes, more than a batch to destination %s may hold (max_batch_bytes %s): it cannot be sent', r.bytes, dest, limit_)
        END;
        RETURN NEXT;
    END LOOP;

    -- The plan of a rebuild of a few keys, as the feed's owner: no sequential scan of a table of
    -- some size (more than 10 pages: a small table is read whole faster than through an index).
    EXECUTE format('SELECT array_agg(t.key) FROM (SELECT key FROM %s ORDER BY key LIMIT 3) AS t', f.feed_table) INTO probe;
    IF probe IS NULL THEN
        SELECT array_agg(s.key) INTO probe FROM cde._source(f.name, 'chunk', NULL, NULL, 3) AS s;
    END IF;
    IF probe IS NOT NULL THEN
        BEGIN
            plan := cde._explain_as(f.owner, f.search_path, 'EXPLAIN (FORMAT JSON, VERBOSE) ' || cde._source_sql(f, 'keys'), probe)::jsonb;
        EXCEPTION WHEN OTHERS THEN
            key := NULL;
            problem := format('the plan of a rebuild of a few keys could not be read: %s', SQLERRM);
            RETURN NEXT;
        END;
        FOR r IN
            SELECT DISTINCT c.oid::regclass AS tbl, pg_relation_size(c.oid) AS bytes
              FROM jsonb_path_query(plan, 'lax $.**') AS x(node)
              JOIN pg_namespace ns ON ns.nspname = x.node ->> 'Schema'
              JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = x.node ->> 'Relation Name'
             WHERE jsonb_typeof(x.node) = 'object' AND x.node ->> 'Node Type' IN ('Seq Scan', 'Parallel Seq Scan')
               AND pg_relation_size(c.oid) > 10 * current_setting('block_size')::int
             ORDER BY 1
        LOOP
            key := NULL;
            problem := format('rebuilding a few keys reads table %s (%s) sequentially: every collect of a few changes would read it whole; let the key columns (%s) reach an index of it, and filter nothing the planner cannot push down',
                              r.tbl, pg_size_pretty(r.bytes), array_to_string(f.key_columns, ', '));
            RETURN NEXT;
        END LOOP;
    END IF;

    -- Functions of the time or of chance, wherever they are in the query.
    FOR r IN SELECT DISTINCT lower(coalesce(m[1] || '()', m[2])) AS fn
               FROM regexp_matches(f.source_query,
                        '\m(now|clock_timestamp|statement_timestamp|transaction_timestamp|timeofday|random|gen_random_uuid)\s*\(|\m(current_timestamp|localtimestamp|current_date|current_time)\M',
                        'gi') AS m
              ORDER BY 1 LOOP
        key := NULL;
        problem := format('the source query calls %s: a document that shows it changes at every rebuild and is sent again, and a filter on it changes documents with no change captured', r.fn);
        RETURN NEXT;
    END LOOP;
END $fn$;

COMMENT ON FUNCTION cde_check_feed(text, int, bigint) IS
    'What would make a feed misbehave: NULL or duplicate keys, documents that differ between builds or are too large, rebuilds that scan a table';
