-- What keeps cde's tables from growing without bound, run by the worker every few seconds
-- (src/housekeeping.rs) and by CALL cde_deliver(). docs/monitoring.md, "Retention".

-- Fold the feed tables' row counts (cde.row_counts) into one row per feed, status and flag, where
-- there are several; rows of feeds dropped go. Rows appended meanwhile are not in this
-- statement's snapshot: they stay, and the sum holds.
CREATE FUNCTION cde._fold_counts() RETURNS void
LANGUAGE sql AS $$
    WITH folded AS (
        DELETE FROM cde.row_counts c
         WHERE NOT EXISTS (SELECT 1 FROM cde.feeds f WHERE f.name = c.feed)
            OR (c.feed, c.status, c.deleted) IN (SELECT x.feed, x.status, x.deleted FROM cde.row_counts x
                                                  GROUP BY x.feed, x.status, x.deleted HAVING count(*) > 1)
        RETURNING c.*)
    INSERT INTO cde.row_counts (feed, status, deleted, n)
    SELECT f.feed, f.status, f.deleted, sum(f.n) FROM folded f
     WHERE EXISTS (SELECT 1 FROM cde.feeds x WHERE x.name = f.feed)
     GROUP BY f.feed, f.status, f.deleted HAVING sum(f.n) <> 0 OR f.status = '*'
$$;

-- Fold the counts; make the keys of sync builders' posts left unfinished pending again
-- (cde._recover_posts); count the feeds whose counts are not kept yet (a restored copy, once its
-- feed table's triggers are there); remove deletions delivered more than tombstone_retention seconds
-- ago (never one that is unsent or failed, nor while a full sync of the feed runs), at most
-- "batch" per feed; remove full sync runs (their phases, lanes and events) that ended more than
-- history_retention seconds ago, but the last one to end. -1 keeps them for ever. The caller
-- passes cde.tombstone_retention and cde.history_retention. Each part on its own: a feed that
-- fails (a lock not had within a second, its table gone) is taken again at the next pass, and
-- holds nothing else back.
CREATE FUNCTION cde._housekeep(tombstone_retention int, history_retention int, batch int DEFAULT 10000,
                               OUT tombstones bigint, OUT runs bigint, OUT recounted int)
LANGUAGE plpgsql AS $$
DECLARE
    f cde.feeds;
    n bigint;
BEGIN
    tombstones := 0;
    runs := 0;
    recounted := 0;
    PERFORM set_config('lock_timeout', '1s', true);
    BEGIN
        PERFORM cde._fold_counts();
    EXCEPTION WHEN lock_not_available THEN
        NULL;   -- another fold holds them: next pass
    END;
    BEGIN
        PERFORM cde._recover_posts();   -- of sync builders that stopped before they were done
    EXCEPTION WHEN lock_not_available THEN
        NULL;
    END;
    FOR f IN SELECT * FROM cde.feeds ORDER BY name LOOP
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM cde.row_counts c WHERE c.feed = f.name AND c.status = '*')
               AND (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = f.feed_table AND t.tgname LIKE 'cde\_count\_%') = 4 THEN
                PERFORM cde._recount(f.name);
                recounted := recounted + 1;
            END IF;
            -- Not while a full sync of the feed runs: a step whose snapshot still sees a deleted
            -- key would write its document again where the deletion was (cde._rebuild, "tomb").
            IF tombstone_retention >= 0 AND NOT cde._syncing(f.name) THEN
                -- The conditions again on the row deleted: a deletion sent again meanwhile
                -- (pending) or a key back in the source is no longer one to remove.
                EXECUTE format($q$
                    DELETE FROM %1$s t
                     WHERE t.ctid = ANY (ARRAY(SELECT x.ctid FROM %1$s x
                                                WHERE x.deleted AND x.status = 'sent' AND x.sent_at < $1 LIMIT $2))
                       AND t.deleted AND t.status = 'sent' AND t.sent_at < $1$q$, f.feed_table)
                  USING now() - make_interval(secs => tombstone_retention), batch;
                GET DIAGNOSTICS n = ROW_COUNT;
                tombstones := tombstones + n;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'cde: housekeeping of feed % failed, taken again at the next pass: %', f.name, SQLERRM;
        END;
    END LOOP;
    IF history_retention >= 0 THEN
        BEGIN
            DELETE FROM cde.sync_runs r
             WHERE r.finished_at < now() - make_interval(secs => history_retention)
               AND r.id <> (SELECT x.id FROM cde.sync_runs x WHERE x.finished_at IS NOT NULL
                             ORDER BY x.finished_at DESC, x.id DESC LIMIT 1);
            GET DIAGNOSTICS runs = ROW_COUNT;
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END IF;
END $$;
