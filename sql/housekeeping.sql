-- What keeps cde's tables from growing without bound, run by the worker every few seconds
-- (src/housekeeping.rs) and by CALL cde_deliver(). docs/monitoring.md, "Retention".

-- Fold the feed tables' row counts (cde.row_counts) into one row per feed, status and flag.
-- Rows appended meanwhile are not in this statement's snapshot: they stay, and the sum holds.
CREATE FUNCTION cde._fold_counts() RETURNS void
LANGUAGE sql AS $$
    WITH folded AS (DELETE FROM cde.row_counts RETURNING *)
    INSERT INTO cde.row_counts (feed, status, deleted, n)
    SELECT f.feed, f.status, f.deleted, sum(f.n) FROM folded f
     GROUP BY f.feed, f.status, f.deleted HAVING sum(f.n) <> 0
$$;

-- Fold the counts; remove deletions delivered more than tombstone_retention seconds ago (never
-- one that is unsent or failed), at most "batch" per feed; remove full sync runs (their phases,
-- lanes and events) that ended more than history_retention seconds ago, but the last one to end.
-- -1 keeps them for ever. The caller passes cde.tombstone_retention and cde.history_retention.
CREATE FUNCTION cde._housekeep(tombstone_retention int, history_retention int, batch int DEFAULT 10000,
                               OUT tombstones bigint, OUT runs bigint)
LANGUAGE plpgsql AS $$
DECLARE
    f cde.feeds;
    n bigint;
BEGIN
    tombstones := 0;
    runs := 0;
    PERFORM cde._fold_counts();
    IF tombstone_retention >= 0 THEN
        FOR f IN SELECT * FROM cde.feeds ORDER BY name LOOP
            -- The conditions again on the row deleted: a deletion sent again meanwhile (pending)
            -- or a key back in the source is no longer one to remove.
            EXECUTE format($q$
                DELETE FROM %1$s t
                 WHERE t.key IN (SELECT x.key FROM %1$s x WHERE x.deleted AND x.status = 'sent' AND x.sent_at < $1 LIMIT $2)
                   AND t.deleted AND t.status = 'sent' AND t.sent_at < $1$q$, f.feed_table)
              USING now() - make_interval(secs => tombstone_retention), batch;
            GET DIAGNOSTICS n = ROW_COUNT;
            tombstones := tombstones + n;
        END LOOP;
    END IF;
    IF history_retention >= 0 THEN
        DELETE FROM cde.sync_runs r
         WHERE r.finished_at < now() - make_interval(secs => history_retention)
           AND r.id <> (SELECT max(x.id) FROM cde.sync_runs x WHERE x.finished_at IS NOT NULL);
        GET DIAGNOSTICS runs = ROW_COUNT;
    END IF;
END $$;
