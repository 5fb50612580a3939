-- Delivery bookkeeping. The worker (src/deliver.rs) reads pending rows in one short transaction,
-- sends them with no transaction open, and records what came of each item here, in another.

-- Record the outcome of sent items. An item is only marked when the feed table still holds the
-- version that was sent (same hash, still pending): a document that changed meanwhile stays
-- pending and its newest version goes next, so an older version never overtakes a newer one.
-- Rows are found where the read found them (their ctid), not by a primary key descent: a tenth of
-- the worker's time per document. Items not found there are looked for by key, in a second pass:
-- a row that moved with its document and state unchanged (rewritten as it was by a collect during
-- a full sync, sql/rebuild.sql) is still the version that was sent, and is not sent again.
CREATE FUNCTION cde._record(
    p_feed      text,
    p_keys      text[],
    p_tids      tid[],     -- where each item's row was read
    p_hashes    text[],
    p_outcomes  cde.outcome[],
    p_http      int[],
    p_errors    text[],
    p_hold      interval,  -- Retry-After: hold the whole feed back this long
    p_response_ids text[], -- the id of the response that decided each item (x-request-id)
    p_modified  timestamptz[], -- each row's modified_at, as read
    OUT sent bigint, OUT rejected bigint, OUT retrying bigint, OUT dead bigint
) LANGUAGE plpgsql AS $$
DECLARE
    f cde.feeds;
    max_attempts int := current_setting('cde.max_attempts')::int;
    retry_interval interval := current_setting('cde.retry_interval')::interval;
    first_error text;
    -- Where each item's row is looked for: where it was read; then, for items not found
    -- there, by key, skipping rows another transaction holds. That pass never waits: it locks
    -- rows after the first pass's, out of key order (a row it skips stays pending, and goes
    -- again).
    found_at text := 't.ctid = o.tid';
    by_key   text;
    missed   text[];   -- the keys of items a pass did not record; NULL: every item
    s bigint; r bigint; rt bigint; d bigint;
BEGIN
    SELECT * INTO f FROM cde.feeds WHERE name = p_feed;
    IF NOT FOUND THEN          -- dropped while its batch was in flight
        sent := 0; rejected := 0; retrying := 0; dead := 0;
        RETURN;
    END IF;
    sent := 0; rejected := 0; retrying := 0; dead := 0;
    -- The version read is its hash and its modified_at: a rewrite as it was keeps both, a
    -- write of the same document again (A, B, A while the slice was out, and B sent after it)
    -- does not. Only rows still pending with that version are locked, not those the first pass
    -- recorded ("|| ''": by the primary key, as below, not the partial index on pending rows).
    by_key := format($q$t.ctid = (SELECT x.ctid FROM %s AS x
                                  WHERE x.key = o.key AND x.hash IS NOT DISTINCT FROM o.hash
                                    AND x.modified_at = o.modified_at AND x.status || '' = 'pending'
                                  FOR UPDATE SKIP LOCKED)$q$, f.feed_table);
    LOOP
    EXECUTE format($q$
        WITH o AS (
            -- In key order, as rebuilds write (sql/rebuild.sql): a record and a full sync step
            -- meeting on the same rows lock them in the same order, and wait rather than
            -- deadlock (the plan takes the items in this order, each row by its ctid).
            SELECT * FROM unnest($1::text[], $2::text[], $3::cde.outcome[], $4::int[], $5::text[], $9::tid[], $10::text[],
                                 $11::timestamptz[])
                       AS o(key, hash, outcome, http_status, error, tid, response_id, modified_at)
             WHERE $12::text[] IS NULL OR o.key IN (SELECT pg_catalog.unnest($12::text[]))
             ORDER BY o.key COLLATE "C"
        ), done AS (
            UPDATE %s AS t SET
                status = CASE o.outcome
                             WHEN 'sent' THEN 'sent'
                             WHEN 'rejected' THEN 'rejected'
                             ELSE cde._failed_status(t.attempts + 1)
                         END,
                attempts    = CASE WHEN o.outcome = 'sent' THEN 0 ELSE t.attempts + 1 END,
                http_status = o.http_status,
                error       = o.error,
                response_id = o.response_id,
                sent_at     = CASE WHEN o.outcome = 'sent' THEN now() ELSE t.sent_at END
              FROM o
             WHERE %2$s AND t.key = o.key AND t.hash IS NOT DISTINCT FROM o.hash
               -- Written so that the partial index on pending rows cannot serve: its row estimate
               -- is usually stale (rows were just built), and the planner would hash every
               -- pending row of the feed to find the few sent ones, instead of one fetch per item.
               AND t.status || '' = 'pending'
            RETURNING t.key, t.status
        ), retry_add AS (
            INSERT INTO cde.retries (feed, key, next_attempt_at, reason)
            SELECT $7, key, now() + $8, 'send' FROM done WHERE status = 'retrying'
            ON CONFLICT (feed, key) DO UPDATE SET next_attempt_at = excluded.next_attempt_at, reason = 'send'
        ), retry_del AS (
            DELETE FROM cde.retries r USING done
             WHERE r.feed = $7 AND r.key = done.key AND done.status <> 'retrying'
        )
        SELECT count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status = 'rejected'),
               count(*) FILTER (WHERE status = 'retrying'), count(*) FILTER (WHERE status = 'dead'),
               CASE WHEN count(*) < (SELECT count(*) FROM o) THEN ARRAY(SELECT o.key FROM o EXCEPT SELECT done.key FROM done)
                    ELSE '{}' END
          FROM done$q$, f.feed_table, found_at)
      INTO s, r, rt, d, missed
      USING p_keys, p_hashes, p_outcomes, p_http, p_errors, max_attempts, f.name, retry_interval, p_tids, p_response_ids,
            p_modified, missed;
    sent := sent + s; rejected := rejected + r; retrying := retrying + rt; dead := dead + d;
    -- All found, or looked for by key already; the second pass takes only the items the first
    -- did not record (rows whose document changed meanwhile, under a stream of changes, are
    -- a few in most slices).
    EXIT WHEN found_at = by_key OR cardinality(missed) = 0;
    found_at := by_key;
    END LOOP;

    SELECT e INTO first_error FROM unnest(p_errors) AS e WHERE e IS NOT NULL LIMIT 1;
    UPDATE cde.feeds SET
        last_sent_at  = CASE WHEN sent > 0 THEN now() ELSE last_sent_at END,
        hold_until    = CASE WHEN p_hold IS NOT NULL THEN now() + p_hold ELSE hold_until END,
        last_error    = coalesce(first_error, last_error),
        last_error_at = CASE WHEN first_error IS NOT NULL THEN now() ELSE last_error_at END,
        items_sent = items_sent + _record.sent, items_rejected = items_rejected + _record.rejected,
        items_retried = items_retried + _record.retrying, items_dead = items_dead + _record.dead
     WHERE name = f.name;
    IF sent > 0 THEN
        UPDATE cde.destinations d SET items_sent = d.items_sent + sent WHERE d.name = coalesce(f.destination, 'default');
    END IF;
END $$;

-- Send again, now, the items that failed: retrying, rejected and dead ones. Items whose document
-- could not be built are rebuilt first. Returns how many items were scheduled.
CREATE FUNCTION cde_retry_failed(feed text DEFAULT NULL, ticket bigint DEFAULT cde._ticket()) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    caller regrole := cde._redeem(ticket);
    f     cde.feeds;
    send  text[];
    build text[];
    total bigint := 0;
BEGIN
    IF feed IS NOT NULL THEN
        PERFORM cde._managed_feed(feed, caller);
    END IF;
    FOR f IN SELECT * FROM cde.feeds x
              WHERE (cde_retry_failed.feed IS NULL OR x.name = cde_retry_failed.feed) AND cde._manages(x.owner, caller) LOOP
        -- Every failed item: those whose document could not be built are rebuilt first.
        EXECUTE format($q$SELECT array_agg(key) FILTER (WHERE NOT (hash IS NULL AND NOT deleted)),
                                 array_agg(key) FILTER (WHERE hash IS NULL AND NOT deleted)
                            FROM %s WHERE cde._failed(status)$q$, f.feed_table)
           INTO send, build;
        DELETE FROM cde.retries r WHERE r.feed = f.name;
        total := total + cde._resend(f, coalesce(send, '{}'), coalesce(build, '{}'), true);
    END LOOP;
    IF total > 0 THEN
        PERFORM cde._changes_recorded();
    END IF;
    RETURN total;
END $$;

COMMENT ON FUNCTION cde_retry_failed(text, bigint) IS 'Schedule failed, rejected and dead items to be sent again now';

-- Rebuild these keys now and send them again, even when their document did not change.
CREATE FUNCTION cde_resync(feed text, keys text[], ticket bigint DEFAULT cde._ticket()) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    caller regrole := cde._redeem(ticket);
    f cde.feeds := cde._managed_feed(feed, caller);
    n bigint;
    bad text;
BEGIN
    IF keys IS NULL THEN
        RAISE EXCEPTION 'cde_resync: keys is NULL' USING HINT = 'Pass the keys to resend, or run cde_full_sync(feed).';
    END IF;
    -- A key of several columns names each of them (docs/protocol.md, "Keys").
    SELECT k INTO bad FROM unnest(keys) AS k
     WHERE cardinality(f.key_columns) > 1 AND coalesce(cardinality(cde._key_parts(k)), 0) <> cardinality(f.key_columns) LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'cde_resync: key % of feed % does not have its % key columns (%)', quote_literal(bad), f.name,
            cardinality(f.key_columns), array_to_string(f.key_columns, ', ')
            USING ERRCODE = 'invalid_parameter_value', HINT = 'A key of several columns is their values joined by |, each with % written %25 and | written %7C.';
    END IF;
    -- Forget the hashes, so that the rebuild counts every document as changed; deleted keys
    -- are simply marked to be sent again.
    EXECUTE format('UPDATE %s SET hash = NULL WHERE key = ANY ($1) AND NOT deleted', f.feed_table) USING keys;
    PERFORM cde._rebuild(f.name, keys);
    EXECUTE format($q$UPDATE %s SET status = 'pending', attempts = 0, modified_at = now(), full_sync = false
                       WHERE key = ANY ($1) AND (status <> 'pending' OR full_sync)$q$, f.feed_table) USING keys;
    DELETE FROM cde.retries r WHERE r.feed = f.name AND r.key = ANY (cde_resync.keys);
    EXECUTE format('SELECT count(*) FROM %s WHERE key = ANY ($1) AND status = ''pending''', f.feed_table)
       INTO n USING keys;
    PERFORM cde._changes_recorded();
    RETURN n;
END $$;

COMMENT ON FUNCTION cde_resync(text, text[], bigint) IS 'Rebuild and resend these keys of a feed, even if unchanged';
