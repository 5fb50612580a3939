-- Rules that several parts of cde share, each in one place.

-- Is a run with this status still going (its workers may take steps of it)? The one place that
-- says which statuses are active.
CREATE FUNCTION cde._active(status text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT status IN ('preparing', 'planned', 'executing') $$;

-- Does a full sync of this feed run (its steps may be building its documents)?
CREATE FUNCTION cde._syncing(feed text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM cde.sync_runs r JOIN cde.sync_phases p ON p.run_id = r.id
                    WHERE p.feed = _syncing.feed AND cde._active(r.status))
$$;

-- Has an item failed (retrying, rejected or dead)? The one place that says which statuses are
-- failures; a feed table's status column has these and 'pending', 'sent' (sql/feeds.sql).
CREATE FUNCTION cde._failed(status text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT status IN ('retrying', 'rejected', 'dead') $$;

-- What a failed attempt makes of an item that has now failed "attempts" times: dead once
-- cde.max_attempts (when set) is reached, else retrying. The one place of that rule.
CREATE FUNCTION cde._failed_status(attempts int) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN current_setting('cde.max_attempts')::int > 0 AND attempts >= current_setting('cde.max_attempts')::int
                THEN 'dead' ELSE 'retrying' END
$$;

-- What the endpoint made of an item, as the worker records it (cde._record).
CREATE TYPE cde.outcome AS ENUM ('sent', 'rejected', 'retry');

-- Queue keys for a feed, in rows of at most cde._chunk_size() keys (src/collect.rs): however
-- many keys one write or one retry pass queues, one collect call takes a bounded slice of them.
-- The capture trigger for column keys splits its rows the same way (src/queue.rs). Returns how
-- many keys were queued.
CREATE FUNCTION cde._enqueue(p_feed text, p_keys text[]) RETURNS bigint
LANGUAGE sql AS $$
    WITH queued AS (
        INSERT INTO cde.queue (feed, keys)
        SELECT p_feed, p_keys[i : i + cde._chunk_size() - 1]
          FROM generate_series(1, cardinality(p_keys), cde._chunk_size()) AS i
        RETURNING cardinality(keys) AS n)
    SELECT coalesce(sum(n), 0)::bigint FROM queued
$$;

-- A feed's key, on the wire and in its feed table (docs/protocol.md, "Keys"). One key column: its
-- text form, as it is. Several: their text forms, each with "%" written "%25" and "|" written
-- "%7C", joined by "|", so that splitting on "|" and then decoding each part gives the values
-- back. NULL when any part is NULL. This is the SQL expression over the given expressions, placed
-- in source queries and captures (never a call per row); cde._key_parts is its inverse.
-- The parts are rendered by their types' output functions (format's %s), not by a cast to text:
-- a cast may be a function that the owner of a type wrote, and keys are composed in capture
-- triggers that any writer fires (a bool part is "t", an inet part has no /32).
CREATE FUNCTION cde._key_sql(exprs text[]) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN cardinality(exprs) = 1 THEN format('(%s)::text', exprs[1])
           ELSE format('CASE WHEN pg_catalog.num_nulls(%s) = 0 THEN %s END',
                       string_agg(format('(%s)', e), ', ' ORDER BY n),
                       string_agg(format($f$pg_catalog.replace(pg_catalog.replace(pg_catalog.format('%%s', %s), '%%', '%%25'), '|', '%%7C')$f$, e),
                                  $s$ || '|' || $s$ ORDER BY n))
           END
      FROM unnest(exprs) WITH ORDINALITY AS x(e, n)
$$;

-- The parts of a composite key (cde._key_sql), as text. "%7C" is decoded before "%25": the other
-- way round, "%257C" (a literal "%7C") would come back as "|".
CREATE FUNCTION cde._key_parts(key text) RETURNS text[]
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT pg_catalog.array_agg(pg_catalog.replace(pg_catalog.replace(x.p, '%7C', '|'), '%25', '%') ORDER BY x.n)
      FROM pg_catalog.unnest(pg_catalog.string_to_array(key, '|')) WITH ORDINALITY AS x(p, n)
$$;
