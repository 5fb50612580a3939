-- What operators look at. Every column is documented in docs/operations.md.

-- Nothing here counts a feed table or the whole queue: every view answers in milliseconds at any
-- catalog size (docs/monitoring.md, "Cost"). Rows by status come from cde.row_counts, kept by
-- triggers; the oldest waiting change from the first entry of an index.

-- Per feed: the oldest row waiting to be sent (pending or retrying), from the feed table's
-- indexes (one table per feed, hence a function), and its queued changes, never read whole:
-- rows are counted exactly up to 2 x 10,000 of a feed (its oldest and newest 10,000 overlap);
-- beyond, those two samples give how densely the feed's ids run (ids are shared by all feeds)
-- over the span between them. Keys are counted in the oldest 1,000 rows (a row holds up to
-- 5,000): exact up to 1,000 rows, else as many per row. queue_exact says which.
-- Every read here goes along an index, in its order, whatever the statistics say: the queue's
-- are behind whenever it fills fast (cde._take_slice says why), and by them the planner read and
-- sorted the whole queue for each sample.
CREATE FUNCTION cde._feed_counts()
RETURNS TABLE (feed text, oldest_unsent timestamptz, queue_rows bigint, queue_keys bigint, oldest_queued timestamptz,
               queue_exact boolean)
LANGUAGE plpgsql STABLE SET enable_seqscan = off SET enable_bitmapscan = off AS $$
DECLARE
    sample constant int := 10000;
    key_sample constant int := 1000;
    f cde.feeds;
    a record;
    b record;
    k record;
BEGIN
    FOR f IN SELECT * FROM cde.feeds ORDER BY name LOOP
        feed := f.name;
        EXECUTE format($q$
            SELECT least((SELECT min(t.modified_at) FROM %1$s t WHERE t.status = 'pending' AND NOT t.full_sync),
                         (SELECT min(t.modified_at) FROM %1$s t WHERE t.status = 'pending' AND t.full_sync),
                         (SELECT min(t.modified_at) FROM %1$s t WHERE t.status = 'retrying'))$q$, f.feed_table)
           INTO oldest_unsent;
        SELECT count(*) AS n, min(q.queued_at) AS oldest, min(q.id) AS lo, max(q.id) AS hi
          INTO a
          FROM (SELECT q.id, q.queued_at FROM cde.queue q WHERE q.feed = f.name ORDER BY q.id LIMIT sample) AS q;
        IF a.n < sample THEN
            queue_rows := a.n;
        ELSE
            SELECT count(*) AS n, min(q.id) AS lo, max(q.id) AS hi INTO b
              FROM (SELECT q.id FROM cde.queue q WHERE q.feed = f.name ORDER BY q.id DESC LIMIT sample) AS q;
            IF b.lo <= a.hi THEN
                SELECT count(*) INTO queue_rows FROM cde.queue q WHERE q.feed = f.name;   -- at most 2 x sample
            ELSE
                queue_rows := a.n + b.n + round((a.n + b.n)::numeric / ((a.hi - a.lo + 1) + (b.hi - b.lo + 1)) * (b.lo - a.hi - 1));
            END IF;
        END IF;
        SELECT count(*) AS n, coalesce(sum(coalesce(cardinality(q.keys), 0)), 0) AS k INTO k
          FROM (SELECT q.keys FROM cde.queue q WHERE q.feed = f.name ORDER BY q.id LIMIT key_sample) AS q;
        queue_exact := queue_rows <= key_sample;
        queue_keys := CASE WHEN queue_exact THEN k.k ELSE round(k.k::numeric * queue_rows / k.n) END;
        oldest_queued := a.oldest;
        RETURN NEXT;
    END LOOP;
END $$;

CREATE VIEW cde_worker_status AS
SELECT w.running, w.pid, w.state, w.started_at, w.last_iteration_at, w.iterations,
       w.documents_sent, w.bytes_sent, w.requests, w.requests_failed, w.reloads,
       current_database() AS database, w.sync_builders, w.sync_builders_wanted,
       d.held_until AS destination_held_until, d.held_error AS destination_error
  FROM cde._worker_status() AS w
  LEFT JOIN cde.destinations d ON d.name = 'default';

COMMENT ON VIEW cde_worker_status IS 'The cde background worker of this database: whether it runs, what it has done';

CREATE VIEW cde_feed_status AS
WITH counts AS (
    SELECT c.feed, sum(c.n) AS items,
           sum(c.n) FILTER (WHERE c.status = 'pending') AS unsent,
           sum(c.n) FILTER (WHERE c.status = 'sent') AS sent,
           sum(c.n) FILTER (WHERE c.status = 'rejected') AS rejected,
           sum(c.n) FILTER (WHERE c.status = 'retrying') AS retrying,
           sum(c.n) FILTER (WHERE c.status = 'dead') AS dead,
           sum(c.n) FILTER (WHERE c.deleted) AS deleted
      FROM cde.row_counts c GROUP BY c.feed
), tracked AS (
    SELECT t.feed, array_agg(t.table_name ORDER BY t.table_name) AS tables FROM cde.tracks t GROUP BY t.feed
)
SELECT f.name                                   AS feed,
       f.mode,
       f.depends_on,
       coalesce(tr.tables, '{}')                AS tracked_tables,
       coalesce(c.items, 0)::bigint             AS items,
       (coalesce(q.queue_keys, 0) + coalesce(c.unsent, 0))::bigint AS pending,
       coalesce(c.sent, 0)::bigint              AS sent,
       coalesce(c.rejected, 0)::bigint          AS rejected,
       coalesce(c.retrying, 0)::bigint          AS retrying,
       coalesce(c.dead, 0)::bigint              AS dead,
       coalesce(c.deleted, 0)::bigint           AS deleted,
       f.last_sent_at,
       CASE WHEN q.oldest_queued IS NULL AND q.oldest_unsent IS NULL THEN interval '0'
            ELSE greatest(now() - least(q.oldest_queued, q.oldest_unsent), interval '0') END AS lag,
       f.last_error,
       f.last_error_at,
       greatest(f.hold_until, d.held_until)     AS hold_until,
       (SELECT w.running FROM cde._worker_status() w) AS worker_running,
       coalesce(d.held_error, d.disabled_error) AS destination_error,
       coalesce(f.destination, 'default')       AS destination,
       coalesce(q.queue_keys, 0)                AS queued_keys,
       coalesce(q.queue_rows, 0)                AS queued_changes,
       coalesce(q.queue_exact, true)            AS queue_exact,
       q.oldest_queued                          AS oldest_queued_at,
       f.items_sent                             AS sent_total,
       f.items_rejected                         AS rejected_total,
       f.items_retried                          AS retried_total,
       f.items_dead                             AS dead_total,
       f.build_failures                         AS build_failures_total
  FROM cde.feeds f
  LEFT JOIN cde.destinations d ON d.name = coalesce(f.destination, 'default')
  LEFT JOIN counts c ON c.feed = f.name
  LEFT JOIN cde._feed_counts() q ON q.feed = f.name
  LEFT JOIN tracked tr ON tr.feed = f.name
 ORDER BY f.name;

COMMENT ON VIEW cde_feed_status IS 'One row per feed: items by delivery state, lag, last error, worker';

CREATE FUNCTION cde._failed_items()
RETURNS TABLE (feed text, key text, status text, http_status int, error text, attempts int, next_attempt_at timestamptz,
               response_id text)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    f cde.feeds;
BEGIN
    FOR f IN SELECT * FROM cde.feeds ORDER BY name LOOP
        RETURN QUERY EXECUTE format($q$
            SELECT %L::text, t.key, t.status, t.http_status, t.error, t.attempts, r.next_attempt_at, t.response_id
              FROM %s t LEFT JOIN cde.retries r ON r.feed = %L AND r.key = t.key
             WHERE t.status IN ('retrying', 'rejected', 'dead')   -- cde._failed's, the index's
             ORDER BY t.key$q$, f.name, f.feed_table, f.name);
    END LOOP;
END $$;

CREATE VIEW cde_failed_items AS SELECT * FROM cde._failed_items();
COMMENT ON VIEW cde_failed_items IS 'Items that are retrying, rejected or dead, with their last error';

-- Is a key set for the default destination? (Its settings are a superuser's to read.)
CREATE FUNCTION cde._default_bearer_key() RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT current_setting('cde.api_key') <> '' OR current_setting('cde.api_key_file') <> ''
$$;

-- Destinations, their state and the limits in force: no secret (options name files; the headers'
-- values are shown to nobody here).
CREATE VIEW cde_destinations AS
SELECT d.name,
       CASE WHEN d.name = 'default' THEN nullif(current_setting('cde.endpoint'), '') ELSE d.endpoint END AS endpoint,
       CASE WHEN d.disabled_at IS NOT NULL THEN 'disabled'
            WHEN d.held_until > now() THEN 'holding'
            WHEN d.failing_since IS NOT NULL THEN 'failing'
            WHEN d.name = 'default' AND current_setting('cde.endpoint') = '' THEN 'no endpoint'
            ELSE 'ok' END                                         AS state,
       d.held_until,
       coalesce(d.disabled_error, d.held_error)                    AS held_error,
       d.last_status,
       d.last_error,
       d.last_error_at,
       d.last_success_at,
       d.requests,
       d.requests_failed,
       d.items_sent,
       coalesce((SELECT array_agg(f.name ORDER BY f.name) FROM cde.feeds f
                  WHERE coalesce(f.destination, 'default') = d.name), '{}') AS feeds,
       (d.options ->> 'max_requests_per_second')::float8         AS max_requests_per_second,
       coalesce((d.options ->> 'batch_size')::int, current_setting('cde.batch_size')::int) AS batch_size,
       coalesce((d.options ->> 'max_batch_bytes')::int, pg_size_bytes(current_setting('cde.max_batch_bytes'))::int) AS max_batch_bytes,
       coalesce(d.options ->> 'timeout', current_setting('cde.http_timeout'))  AS timeout,
       coalesce((d.options ->> 'compression')::boolean, current_setting('cde.compression')::boolean) AS compression,
       d.options ? 'signing_secret_file'                            AS signed,
       CASE WHEN d.name = 'default' THEN cde._default_bearer_key() ELSE d.options ? 'api_key_file' END AS bearer_key,
       ARRAY(SELECT jsonb_object_keys(coalesce(d.options -> 'headers', '{}'))) AS headers,
       d.roles::text[]                                              AS roles,
       d.disabled_at,
       d.updated_at
  FROM cde.destinations d
 ORDER BY d.name = 'default' DESC, d.name;

COMMENT ON VIEW cde_destinations IS 'Where feeds are sent: state, counters and the limits in force (no secret)';

-- Privileges (docs/security.md). Management is for superusers and the roles they delegate it to
-- (cde_grant_admin); the views are for pg_monitor. Everything in schema cde is internal: no
-- function there is executable by PUBLIC but pure ones (a source query runs cde._in_lane and
-- cde._key_parts as its feed's owner). The management functions and the view helpers run as the
-- extension's owner with a fixed search_path; they act for the role that called them (its
-- ticket, src/trust.rs) and check what it may do.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA cde FROM PUBLIC;
GRANT EXECUTE ON FUNCTION cde._doc_hash(anyelement), cde._in_lane(text, int, int), cde._lane(text, int),
                          cde._chunk_size(), cde._key_parts(text) TO PUBLIC;
-- The management functions' last argument defaults to a ticket (src/trust.rs): taking one only
-- ever binds a role's own identity, and grants nothing.
GRANT EXECUTE ON FUNCTION cde._ticket() TO PUBLIC;

-- The management functions, for cde_grant_admin and the checks of docs/security.md.
CREATE FUNCTION cde._management_functions() RETURNS regprocedure[]
LANGUAGE sql STABLE AS $$
    SELECT ARRAY['@extschema@.cde_register_feed(text, text, text, text, text[], int, name[], text, text[], bigint)',
                 '@extschema@.cde_drop_feed(text, bigint)',
                 '@extschema@.cde_track(text, regclass, text, boolean, bigint)', '@extschema@.cde_untrack(text, regclass, bigint)',
                 '@extschema@.cde_sync_now(text, bigint)', '@extschema@.cde_retry_failed(text, bigint)',
                 '@extschema@.cde_resync(text, text[], bigint)', '@extschema@.cde_full_sync(text, boolean, bigint)',
                 '@extschema@.cde_cancel_sync(bigint, bigint)', '@extschema@.cde_deliver(text)',
                 '@extschema@.cde_check_feed(text, int, bigint)']::regprocedure[]
$$;
REVOKE ALL ON FUNCTION cde._management_functions() FROM PUBLIC;

ALTER FUNCTION cde_sync_now(text, bigint) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- CALL cde_deliver(): the worker's job in this session, committing after every step (src/api.rs).
CREATE PROCEDURE cde_deliver(feed text DEFAULT NULL) LANGUAGE c AS 'MODULE_PATHNAME', 'cde_deliver';
COMMENT ON PROCEDURE cde_deliver(text) IS
    'Collect, send and advance full syncs in this session until nothing is left, committing after every step';

DO $$
DECLARE
    fn regprocedure;
BEGIN
    FOREACH fn IN ARRAY cde._management_functions() LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM PUBLIC', fn);
    END LOOP;
    FOREACH fn IN ARRAY ARRAY['cde._feed_counts()', 'cde._failed_items()', 'cde._worker_status()', 'cde._default_bearer_key()']::regprocedure[] LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', fn);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO pg_monitor', fn);
    END LOOP;
END $$;

REVOKE ALL ON cde_feed_status, cde_failed_items, cde_sync_runs, cde_worker_status, cde_destinations FROM PUBLIC;
GRANT SELECT ON cde_feed_status, cde_failed_items, cde_sync_runs, cde_worker_status, cde_destinations TO pg_monitor;

-- Delegating management to a role that is not a superuser. Such a role registers feeds over
-- what it may read (their source queries then run with its rights), tracks the tables on which it
-- has the TRIGGER privilege, and manages its own feeds; it reads the views. It gets no right on
-- cde's tables, and none of pg_monitor's: USAGE on schema cde only lets its source queries, which
-- run as it, call cde._in_lane.
CREATE FUNCTION cde_grant_admin(admin regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    fn regprocedure;
BEGIN
    IF admin IS NULL THEN
        RAISE EXCEPTION 'cde_grant_admin: admin is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA cde TO %s', admin);
    FOREACH fn IN ARRAY cde._management_functions() LOOP
        EXECUTE format('GRANT EXECUTE ON ROUTINE %s TO %s', fn, admin);
    END LOOP;
    EXECUTE format('GRANT EXECUTE ON FUNCTION cde._feed_counts(), cde._failed_items(), cde._worker_status(), cde._default_bearer_key() TO %s', admin);
    EXECUTE format('GRANT SELECT ON @extschema@.cde_feed_status, @extschema@.cde_failed_items, @extschema@.cde_sync_runs, @extschema@.cde_worker_status, @extschema@.cde_destinations TO %s', admin);
END $$;

REVOKE ALL ON FUNCTION cde_grant_admin(regrole) FROM PUBLIC;
COMMENT ON FUNCTION cde_grant_admin(regrole) IS 'Let a role that is not a superuser manage cde (docs/security.md)';

-- Take it back: what cde_grant_admin gave (and what 0.1.0's gave: rights on cde's tables and
-- functions, pg_monitor). The role's feeds stay, with their owner; a superuser may drop them.
CREATE FUNCTION cde_revoke_admin(admin regrole) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    fn regprocedure;
BEGIN
    IF admin IS NULL THEN
        RAISE EXCEPTION 'cde_revoke_admin: admin is NULL' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    FOREACH fn IN ARRAY cde._management_functions() LOOP
        EXECUTE format('REVOKE ALL ON ROUTINE %s FROM %s', fn, admin);
    END LOOP;
    EXECUTE format('REVOKE ALL ON ALL FUNCTIONS IN SCHEMA cde FROM %s', admin);
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA cde FROM %s', admin);
    EXECUTE format('REVOKE ALL ON @extschema@.cde_feed_status, @extschema@.cde_failed_items, @extschema@.cde_sync_runs, @extschema@.cde_worker_status, @extschema@.cde_destinations FROM %s', admin);
    EXECUTE format('REVOKE ALL ON SCHEMA cde FROM %s', admin);
END $$;

REVOKE ALL ON FUNCTION cde_revoke_admin(regrole) FROM PUBLIC;
COMMENT ON FUNCTION cde_revoke_admin(regrole) IS 'Take back what cde_grant_admin gave a role';

-- This database is served from the commit on: the launcher starts its worker (when cde is
-- preloaded; otherwise this does nothing).
SELECT cde._serve();
