-- Collecting: turning queued keys into documents in the feed table.
--
-- cde._collect(feed) takes a slice of the feed's queue, rebuilds the documents of the keys in it
-- and updates the feed table, all in the caller's transaction: the queue rows are deleted by the
-- same transaction that writes their result, so a crash loses nothing and counts nothing twice.
-- A document whose hash did not change keeps its state (it is not sent again); a key the source
-- query no longer returns becomes a deletion.
--
-- If the rebuild fails (a source query that errors for some rows), cde retries key by key so
-- that the failing keys are recorded with their error and the rest of the feed keeps flowing.

CREATE FUNCTION cde._collect(
    p_feed          text,
    max_keys        int DEFAULT 10000,
    OUT drained     bigint,   -- queue rows taken
    OUT keys        bigint,   -- distinct keys rebuilt (NULL when every key was rebuilt)
    OUT changed     bigint,   -- documents new or changed, now pending
    OUT deleted     bigint,   -- keys gone from the source, now pending deletion
    OUT failed      bigint    -- keys whose document could not be built
) LANGUAGE plpgsql AS $$
DECLARE
    f        cde.feeds;
    key_set  text[];
    everything boolean;
    res      record;
    chunk    int := cde._chunk_size();
BEGIN
    failed := 0;
    SELECT * INTO f FROM cde.feeds WHERE name = p_feed;
    IF NOT FOUND THEN   -- dropped since the worker listed the feeds: nothing to do
        drained := 0; keys := 0; changed := 0; deleted := 0;
        RETURN;
    END IF;
    -- The oldest queue rows holding about max_keys keys (at least one row; rows hold at most
    -- cde._chunk_size() keys, see cde._enqueue), so that one call is a bounded amount of work
    -- and sending is never far behind collecting.
    SELECT s.drained, s.everything, s.key_set INTO drained, everything, key_set FROM cde._take_slice(f.name, max_keys) AS s;
    IF drained = 0 THEN
        keys := 0; changed := 0; deleted := 0;
        RETURN;
    END IF;
    -- A full sync step may be building the same keys: neither waits for the other. Of the two,
    -- the one that writes a row second leaves it if it cannot see who wrote it, and queues the
    -- key again (cde._rebuild, cde._unseen).
    IF everything THEN
        -- A TRUNCATE, or a new definition: every key may have changed. That is a full sync's
        -- job (chunked, resumable); if one already runs for this feed, rebuild in place.
        IF NOT cde._syncing(f.name) THEN
            PERFORM @extschema@.cde_full_sync(f.name);
            keys := 0; changed := 0; deleted := 0;
            RETURN;
        END IF;
        -- A rebuild of every key waits for the feed's steps under way (cde._rebuild). Not here:
        -- a step may wait for this transaction (cde_sync_now() collects and takes steps in one),
        -- and queued behind the wait, new steps would too. While a step holds the feed's step
        -- lock, the key set goes back in the queue, and nothing counts as taken (drained 0),
        -- so that no caller collects it again at once: a builder wakes the worker after each
        -- chunk, and the next collect tries again.
        IF NOT pg_try_advisory_xact_lock(cde._feed_step_lock(f.feed_table)) THEN
            INSERT INTO cde.queue (feed, all_keys) VALUES (f.name, true);
            drained := 0; keys := 0; changed := 0; deleted := 0;
            RETURN;
        END IF;
        key_set := NULL;     -- rebuild every key the source has, and every key the table has
    ELSIF key_set IS NULL THEN
        keys := 0; changed := 0; deleted := 0;
        RETURN;
    END IF;
    keys := cardinality(key_set);

    -- Rebuild in chunks of cde._chunk_size() keys: a bulk write's million keys never become one
    -- statement whose memory grows with the catalog. (NULL, every key, is a single pass.)
    changed := 0; deleted := 0;
    FOR i IN 1 .. coalesce(cardinality(key_set), 1) BY chunk LOOP
        SELECT * INTO res FROM cde._rebuild_chunk(f, key_set[i : i + chunk - 1]);
        changed := changed + res.r_changed;
        deleted := deleted + res.r_deleted;
        failed := failed + res.r_failed;
    END LOOP;
END $$;

-- Take (delete) the feed's oldest queue rows holding about max_keys keys, at least one row: how
-- many rows, whether one asked for every key, and their keys, distinct, in byte order (as the
-- rebuilds write rows, chunk after chunk too).
-- Along the queue's (feed, id) index, in its order, whatever the statistics say (the SET
-- clauses, for this function alone: the source queries cde._collect runs next plan as their
-- owners' settings say). A queue fills in seconds (single-row writes while the worker is paused
-- or its destination down) and autoanalyze comes a minute later; going by a queue analyzed
-- nearly empty, the planner read the whole queue, or all of the feed's rows, and sorted them
-- for each slice (docs/benchmarks.md, "Decisions and their measurements").
CREATE FUNCTION cde._take_slice(feed text, max_keys int, OUT drained bigint, OUT everything boolean, OUT key_set text[])
LANGUAGE sql SET enable_seqscan = off SET enable_bitmapscan = off SET search_path = pg_catalog, pg_temp AS $$
    WITH slice AS (
        SELECT x.id FROM (
            SELECT q.id, sum(coalesce(cardinality(q.keys), 0)) OVER (ORDER BY q.id) - coalesce(cardinality(q.keys), 0) AS before
              FROM cde.queue q WHERE q.feed = _take_slice.feed ORDER BY q.id LIMIT max_keys
        ) AS x WHERE x.before < max_keys
    ), taken AS (
        -- The slice is the feed's oldest rows, up to an id: one range of the queue's (feed, id)
        -- index, in this statement's snapshot (a row committed since is not in it, and stays).
        -- Deleting them by a join on the id alone finds no index and reads the whole queue on
        -- every call (docs/benchmarks.md, "Decisions and their measurements").
        DELETE FROM cde.queue q
         WHERE q.feed = _take_slice.feed AND q.id <= (SELECT max(slice.id) FROM slice)
        RETURNING q.keys, q.all_keys
    )
    SELECT count(*), coalesce(bool_or(all_keys), false),
           (SELECT array_agg(DISTINCT u COLLATE "C" ORDER BY u COLLATE "C") FROM taken t2, unnest(t2.keys) AS u)
      FROM taken
$$;

-- Rebuild one set of keys (NULL: all). If that fails (a source query that errors for some rows),
-- find out which keys, one at a time: they are recorded with their error, the others go on.
CREATE FUNCTION cde._rebuild_chunk(f cde.feeds, key_set text[],
                                   OUT r_changed bigint, OUT r_deleted bigint, OUT r_failed bigint)
LANGUAGE plpgsql AS $$
DECLARE
    res record;
    k   text;
BEGIN
    r_changed := 0; r_deleted := 0; r_failed := 0;
    BEGIN
        SELECT * INTO res FROM cde._rebuild(f.name, key_set);
        r_changed := res.changed;
        r_deleted := res.deleted;
    EXCEPTION WHEN OTHERS THEN
        IF key_set IS NULL THEN
            -- No list to walk: the error is recorded on the feed, and the full rebuild queued again.
            UPDATE cde.feeds SET last_error = 'rebuild of all keys failed: ' || SQLERRM, last_error_at = now(),
                                 build_failures = build_failures + 1
             WHERE name = f.name;
            r_failed := 1;
            INSERT INTO cde.queue (feed, all_keys) VALUES (f.name, true);
            RETURN;
        END IF;
        FOREACH k IN ARRAY key_set LOOP
            BEGIN
                SELECT * INTO res FROM cde._rebuild(f.name, ARRAY[k]);
                r_changed := r_changed + res.changed;
                r_deleted := r_deleted + res.deleted;
            EXCEPTION WHEN OTHERS THEN
                PERFORM cde._build_failed(f, k, SQLERRM);
                r_failed := r_failed + 1;
            END;
        END LOOP;
    END;
END $$;

-- A key whose document cannot be built: recorded in the feed table with the error, and in the
-- retry table so that it is rebuilt after cde.retry_interval (or dead after cde.max_attempts).
CREATE FUNCTION cde._build_failed(f cde.feeds, k text, err text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    max_attempts int := current_setting('cde.max_attempts')::int;
    new_status text;
BEGIN
    EXECUTE format($q$
        INSERT INTO %s AS t (key, doc, hash, status, error, attempts)
        VALUES ($1, NULL, NULL, 'retrying', $2, 1)
        ON CONFLICT (key) DO UPDATE
           SET hash = NULL, error = $2, attempts = t.attempts + 1, http_status = NULL,
               status = cde._failed_status(t.attempts + 1)
        RETURNING status$q$, f.feed_table)
      INTO new_status USING k, 'build failed: ' || err, max_attempts;
    IF new_status = 'retrying' THEN
        INSERT INTO cde.retries (feed, key, next_attempt_at, reason)
        VALUES (f.name, k, now() + current_setting('cde.retry_interval')::interval, 'build')
        ON CONFLICT (feed, key) DO UPDATE SET next_attempt_at = excluded.next_attempt_at, reason = 'build';
    ELSE
        DELETE FROM cde.retries WHERE feed = f.name AND key = k;
    END IF;
    UPDATE cde.feeds SET last_error = 'key ' || k || ': build failed: ' || err, last_error_at = now(),
                         build_failures = build_failures + 1
     WHERE name = f.name;
END $$;

-- Put failed items back in line, the one way both a due retry (cde._retry_due) and
-- cde_retry_failed() do it: the keys with a document go pending again (the next send pass takes
-- them, with their newest document), those whose document could not be built are queued to be
-- rebuilt. Returns how many.
CREATE FUNCTION cde._resend(f cde.feeds, send_keys text[], build_keys text[], reset_attempts boolean) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint := 0;
BEGIN
    IF cardinality(send_keys) > 0 THEN
        EXECUTE format($q$UPDATE %s SET status = 'pending', attempts = CASE WHEN $2 THEN 0 ELSE attempts END
                           WHERE key = ANY ($1) AND cde._failed(status)$q$, f.feed_table)
           USING send_keys, reset_attempts;
        GET DIAGNOSTICS n = ROW_COUNT;
    END IF;
    IF cardinality(build_keys) > 0 THEN
        n := n + cde._enqueue(f.name, build_keys);
    END IF;
    RETURN n;
END $$;

-- Retries that are due (cde.retry_interval after the failure) go back in line.
CREATE FUNCTION cde._retry_due(p_feed text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    f     cde.feeds;
    send  text[];
    build text[];
BEGIN
    SELECT * INTO f FROM cde.feeds WHERE name = p_feed;
    IF NOT FOUND THEN   -- dropped meanwhile
        RETURN 0;
    END IF;
    WITH due AS (
        DELETE FROM cde.retries r WHERE r.feed = p_feed AND r.next_attempt_at <= now()
        RETURNING r.key, r.reason
    )
    SELECT array_agg(key) FILTER (WHERE reason = 'send'), array_agg(key) FILTER (WHERE reason = 'build')
      INTO send, build FROM due;
    IF send IS NULL AND build IS NULL THEN
        RETURN 0;
    END IF;
    RETURN cde._resend(f, coalesce(send, '{}'), coalesce(build, '{}'), false);
END $$;
