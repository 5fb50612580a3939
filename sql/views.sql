-- What operators look at. Every column is documented in docs/operations.md.

-- Per-feed counts from the feed tables (one table per feed, hence a function).
CREATE FUNCTION cde._feed_counts()
RETURNS TABLE (feed text, items bigint, unsent bigint, sent bigint, rejected bigint, retrying bigint,
               dead bigint, deleted bigint, oldest_unsent timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    f cde.feeds;
BEGIN
    FOR f IN SELECT * FROM cde.feeds ORDER BY name LOOP
        RETURN QUERY EXECUTE format($q$
            SELECT %L::text,
                   count(*),
                   count(*) FILTER (WHERE status = 'pending'),
                   count(*) FILTER (WHERE status = 'sent'),
                   count(*) FILTER (WHERE status = 'rejected'),
                   count(*) FILTER (WHERE status = 'retrying'),
                   count(*) FILTER (WHERE status = 'dead'),
                   count(*) FILTER (WHERE deleted),
                   min(modified_at) FILTER (WHERE status IN ('pending', 'retrying'))
              FROM %s$q$, f.name, f.feed_table);
    END LOOP;
END $$;

CREATE VIEW cde_worker_status AS
SELECT w.running, w.pid, w.state, w.started_at, w.last_iteration_at, w.iterations,
       w.documents_sent, w.bytes_sent, w.requests, w.requests_failed, w.reloads,
       current_setting('cde.database') AS database
  FROM cde._worker_status() AS w;

COMMENT ON VIEW cde_worker_status IS 'The cde background worker: whether it runs, what it has done';

CREATE VIEW cde_feed_status AS
WITH queued AS (
    SELECT q.feed, sum(coalesce(cardinality(q.keys), 0)) AS keys, count(*) FILTER (WHERE q.all_keys) AS full_rebuilds,
           min(q.queued_at) AS oldest
      FROM cde.queue q GROUP BY q.feed
), tracked AS (
    SELECT t.feed, array_agg(t.table_name ORDER BY t.table_name) AS tables FROM cde.tracks t GROUP BY t.feed
)
SELECT f.name                                   AS feed,
       f.mode,
       f.depends_on,
       coalesce(tr.tables, '{}')                AS tracked_tables,
       coalesce(c.items, 0)                     AS items,
       coalesce(q.keys, 0) + coalesce(c.unsent, 0) AS pending,
       coalesce(c.sent, 0)                      AS sent,
       coalesce(c.rejected, 0)                  AS rejected,
       coalesce(c.retrying, 0)                  AS retrying,
       coalesce(c.dead, 0)                      AS dead,
       coalesce(c.deleted, 0)                   AS deleted,
       f.last_sent_at,
       CASE WHEN q.oldest IS NULL AND c.oldest_unsent IS NULL THEN interval '0'
            ELSE now() - least(q.oldest, c.oldest_unsent) END AS lag,
       f.last_error,
       f.last_error_at,
       f.hold_until,
       (SELECT w.running FROM cde._worker_status() w) AS worker_running
  FROM cde.feeds f
  LEFT JOIN cde._feed_counts() c ON c.feed = f.name
  LEFT JOIN queued q ON q.feed = f.name
  LEFT JOIN tracked tr ON tr.feed = f.name
 ORDER BY f.name;

COMMENT ON VIEW cde_feed_status IS 'One row per feed: items by delivery state, lag, last error, worker';

CREATE FUNCTION cde._failed_items()
RETURNS TABLE (feed text, key text, status text, http_status int, error text, attempts int, next_attempt_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    f cde.feeds;
BEGIN
    FOR f IN SELECT * FROM cde.feeds ORDER BY name LOOP
        RETURN QUERY EXECUTE format($q$
            SELECT %L::text, t.key, t.status, t.http_status, t.error, t.attempts, r.next_attempt_at
              FROM %s t LEFT JOIN cde.retries r ON r.feed = %L AND r.key = t.key
             WHERE t.status IN ('retrying', 'rejected', 'dead')
             ORDER BY t.key$q$, f.name, f.feed_table, f.name);
    END LOOP;
END $$;

CREATE VIEW cde_failed_items AS SELECT * FROM cde._failed_items();
COMMENT ON VIEW cde_failed_items IS 'Items that are retrying, rejected or dead, with their last error';

-- Privileges. Management is for superusers and the roles they grant it to (docs/operations.md,
-- "Privileges"); the views are for pg_monitor. The view helpers run as the extension owner, with
-- a fixed search_path, because the views' readers have no right on schema cde.
DO $$
DECLARE
    fn text;
BEGIN
    FOREACH fn IN ARRAY ARRAY[
        'cde_register_feed(text, text, text, text, text[], int)', 'cde_drop_feed(text)',
        'cde_track(text, regclass, text)', 'cde_untrack(text, regclass)',
        'cde_sync_now(text)', 'cde_retry_failed(text)', 'cde_resync(text, text[])',
        'cde_full_sync(text, boolean)', 'cde_cancel_sync(bigint)'
    ] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
    END LOOP;
    FOREACH fn IN ARRAY ARRAY['cde._feed_counts()', 'cde._failed_items()', 'cde._worker_status()'] LOOP
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', fn);
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', fn);
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO pg_monitor', fn);
    END LOOP;
END $$;

REVOKE ALL ON cde_feed_status, cde_failed_items, cde_sync_runs, cde_worker_status FROM PUBLIC;
GRANT SELECT ON cde_feed_status, cde_failed_items, cde_sync_runs, cde_worker_status TO pg_monitor;

-- Delegating management to a role that is not a superuser. Such a role registers feeds on the
-- tables it may read (the source query then runs with its rights, through the generated
-- function it owns), tracks tables on which it has the TRIGGER privilege, and runs syncs.
CREATE FUNCTION cde_grant_admin(admin regrole) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    fn text;
BEGIN
    EXECUTE format('GRANT USAGE, CREATE ON SCHEMA cde TO %s', admin);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA cde TO %s', admin);
    EXECUTE format('GRANT pg_monitor TO %s', admin);
    FOR fn IN
        SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid AND d.classid = 'pg_proc'::regclass
         WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'cde') AND d.deptype = 'e'
    LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', fn, admin);
    END LOOP;
END $$;

REVOKE ALL ON FUNCTION cde_grant_admin(regrole) FROM PUBLIC;
COMMENT ON FUNCTION cde_grant_admin(regrole) IS 'Let a role that is not a superuser manage cde (docs/operations.md, Privileges)';
