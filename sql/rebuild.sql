-- Rebuilding documents: a feed's source query, run as the role that registered it, turned into
-- rows of its feed table by the extension's owner.
--
-- The two halves never mix rights (docs/security.md):
--   cde._source_sql(f, mode)  the source query in the shape a mode needs: plain text that a
--                             reader can print (tests/regress/sql/rebuild.sql does)
--   cde._source(feed, mode, ...)
--                             runs it as the feed's owner, with the feed's search_path, in a
--                             security-restricted operation (src/trust.rs), and returns its rows
--   cde._rebuild(feed, keys, mode, ...)
--                             writes them into the feed table, as the extension's owner: no text
--                             that a non-superuser wrote is part of its statements
-- Nothing is generated per feed but the feed table. The source query's text is only ever placed
-- inside "(...) AS s", on lines of its own (a trailing "--" comment ends at its line), and only in
-- statements that run as its owner.

CREATE FUNCTION cde._source(feed text, mode text, keys text[] DEFAULT NULL, after text DEFAULT NULL,
                            n int DEFAULT 0, lane int DEFAULT 0, lanes int DEFAULT 1)
RETURNS TABLE (key text, doc jsonb, o bigint)
LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'cde_source';
COMMENT ON FUNCTION cde._source(text, text, text[], text, int, int, int) IS
    'A feed''s source query (cde._source_sql) run as the feed''s owner: key, document, order';

-- Whether a feed-table row version was written by a transaction the rebuilding statement cannot
-- see (src/collect.rs says why); remembers such keys for cde._unseen_keys().
CREATE FUNCTION cde._unseen(xmin xid, key text) RETURNS boolean
LANGUAGE c STRICT VOLATILE AS 'MODULE_PATHNAME', 'cde_unseen';

-- The source query of a feed in the shape of a mode. Parameters: $1 keys (text[]), $2 after
-- (text), $3 n (int), $4 lane (int), $5 lanes (int). Keys are compared in the key columns' own
-- types, so that the planner uses the underlying table's index: one column with "= ANY", several
-- with a semi-join on their values (cde._key_parts) and a row comparison for "after".
--   all     every key's document, in no order
--   keys    the documents of the keys $1, in no order
--   exists  which of these keys the source still has (no document built: naming none lets the
--           planner skip building it)
--   chunk   the next n keys after "after" in the key columns' order, of lane $4 of $5 (the lane
--           filter applies to the key alone, below the documents: other lanes' rows are scanned,
--           not built), numbered in that order
--   count   how many rows the source has, in "o"
--   nulls   how many rows have a NULL key (any key column NULL), in "o" (cde_check_feed)
--   duplicates  keys of more than one row, with how many, at most 100 (cde_check_feed)
CREATE FUNCTION cde._source_sql(f cde.feeds, mode text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    cols   text[] := ARRAY(SELECT format('s.%I', c) FROM unnest(f.key_columns) WITH ORDINALITY AS x(c, n) ORDER BY n);
    typs   text[] := ARRAY(SELECT format_type(t, NULL) FROM unnest(f.key_types) WITH ORDINALITY AS x(t, n) ORDER BY n);
    k      text := cde._key_sql(cols);
    doc    text := CASE WHEN f.doc_column THEN 's.doc::jsonb' ELSE 'to_jsonb(s)' END;
    src    text := E'(\n' || f.source_query || E'\n) AS s';
    wanted text;    -- the row's key is one of $1
    after  text;    -- the row's key comes after $2
BEGIN
    IF cardinality(cols) = 1 THEN
        wanted := format('%s = ANY ($1::%s[])', cols[1], typs[1]);
        after := format('%s > $2::%s', cols[1], typs[1]);
    ELSE
        wanted := format(E'(%s) IN (SELECT %s\n   FROM pg_catalog.unnest($1::text[]) AS w(k), LATERAL (SELECT cde._key_parts(w.k) AS p) AS x)',
                         array_to_string(cols, ', '),
                         (SELECT string_agg(format('(x.p[%s])::%s', n, t), ', ' ORDER BY n) FROM unnest(typs) WITH ORDINALITY AS y(t, n)));
        after := format('(%s) > (%s)', array_to_string(cols, ', '),
                        (SELECT string_agg(format('(cde._key_parts($2))[%s]::%s', n, t), ', ' ORDER BY n) FROM unnest(typs) WITH ORDINALITY AS y(t, n)));
    END IF;
    CASE mode
    WHEN 'all' THEN
        RETURN format(E'SELECT %1$s AS key, %2$s AS doc, NULL::bigint AS o\n  FROM %3$s', k, doc, src);
    WHEN 'keys' THEN
        RETURN format(E'SELECT %1$s AS key, %2$s AS doc, NULL::bigint AS o\n  FROM %3$s\n WHERE %4$s', k, doc, src, wanted);
    WHEN 'exists' THEN
        RETURN format(E'SELECT %1$s AS key, NULL::jsonb AS doc, NULL::bigint AS o\n  FROM %2$s\n WHERE %3$s', k, src, wanted);
    WHEN 'chunk' THEN
        RETURN format(E'SELECT %1$s AS key, %2$s AS doc, row_number() OVER () AS o\n  FROM (SELECT * FROM %3$s\n         WHERE ($2 IS NULL OR %4$s)\n           AND ($5 = 1 OR cde._in_lane(%1$s, $4, $5))\n         ORDER BY %5$s LIMIT $3) AS s',
                      k, doc, src, after, array_to_string(cols, ', '));
    WHEN 'count' THEN
        RETURN format(E'SELECT NULL::text AS key, NULL::jsonb AS doc, count(*) AS o\n  FROM %s', src);
    WHEN 'nulls' THEN
        RETURN format(E'SELECT NULL::text AS key, NULL::jsonb AS doc, count(*) AS o\n  FROM %s\n WHERE %s IS NULL', src, k);
    WHEN 'duplicates' THEN
        RETURN format(E'SELECT %1$s AS key, NULL::jsonb AS doc, count(*) AS o\n  FROM %2$s\n WHERE %1$s IS NOT NULL\n GROUP BY %1$s HAVING count(*) > 1\n ORDER BY count(*) DESC, %1$s LIMIT 100',
                      k, src);
    ELSE
        RAISE EXCEPTION 'cde._source_sql: unknown mode %', mode;
    END CASE;
END $$;

-- Rebuild documents of a feed, as the extension's owner, from its source rows (cde._source).
--   mode 'apply'     rebuild the keys (NULL: all): changed documents and deletions become pending
--   mode 'gone'      the deletion pass of a full sync: of the next n keys of the feed table after
--                    "after" (in its own order), mark as deleted those the source no longer
--                    returns ('gone_dry': count them); last_key is the next chunk's "after"
--   mode 'chunk'     apply to the next n source keys after "after", in the key's own order, of a
--                    lane (a full sync's step: one range scan of the source rather than a probe
--                    per key); failed items are sent again; last_key is the next chunk's "after"
--   mode 'chunk_dry' the same counts, nothing written
--   mode 'count'     how many rows the source has (a full sync's plan), in "built"
-- A changed document (or a deleted key's return) becomes pending; an unchanged one keeps its
-- state and is not sent again. A row written since the statement's snapshot (a full sync step
-- and a collect rebuilding the same key at once) is left as it is: its document may be newer
-- than the one built here. Its key is queued again, for a collect to rebuild from a snapshot
-- that sees it (cde._unseen, cde._requeue_unseen); so no lock keeps collects and steps apart.
-- JIT is off: each call plans anew for its keys, and compiling every such plan cost more than it
-- saved (docs/benchmarks.md).
CREATE FUNCTION cde._rebuild(feed text, keys text[], mode text DEFAULT 'apply', after text DEFAULT NULL,
                             n int DEFAULT 0, lane int DEFAULT 0, lanes int DEFAULT 1,
                             OUT built bigint, OUT changed bigint, OUT deleted bigint, OUT last_key text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET jit = off AS $fn$
DECLARE
    f      cde.feeds := cde._feed(feed);
    tbl    text := f.feed_table::text;
    -- Every row a rebuild writes, documents and deletions alike, in one statement and in key
    -- order: a step and a collect writing the same keys at once lock them in the same order, so
    -- that neither waits for the other while it holds a row the other waits for (a deadlock,
    -- which rolls one back). The "%%n$s":
    --   (1) the send lane (cde._create_feed_table): true, made pending by a full sync. A row
    --       pending as a change stays one whoever writes it next.
    --   (2) where the rows (key, doc) come from, a NULL doc being a deletion: written over a row
    --       that is not one already, or as a row of its own where (2) says so.
    --   (3) what else makes a document worth writing again, in the mode's own words.
    --   (4) which rows to leave out before the write (below), or nothing.
    --   (5) the status of a row written anew: 'pending', or 'sent' where a sync builder sends the
    --       documents this write commits (cde._sends_built, src/builder_send.rs). Sent is written
    --       over a row that was sent only: a pending or failed one may be out with the worker,
    --       whose older document could arrive after this one; this one then goes after it. Its
    --       sent_at is the write's clock, after the phase began (the phase counts what it sent
    --       by it, sql/sync.sql), where the transaction's start might not be.
    write  text := format($q$
        INSERT INTO %1$s AS f (key, doc, hash, deleted, full_sync, status, sent_at)
        SELECT w.key, w.doc, w.hash, w.doc IS NULL, %%1$s, w.status, CASE WHEN w.status = 'sent' THEN clock_timestamp() END
          FROM (SELECT w.key, w.doc, cde._doc_hash(w.doc) AS hash, %%5$s AS status FROM (%%2$s) AS w) AS w%%4$s
         ORDER BY w.key COLLATE "C"
        ON CONFLICT (key) DO UPDATE
           SET doc = excluded.doc, hash = excluded.hash, deleted = excluded.deleted,
               status = CASE WHEN excluded.status = 'sent' AND f.status = 'sent' THEN 'sent' ELSE 'pending' END,
               sent_at = CASE WHEN excluded.status = 'sent' AND f.status = 'sent' THEN excluded.sent_at ELSE f.sent_at END,
               response_id = CASE WHEN excluded.status = 'sent' AND f.status = 'sent' THEN NULL ELSE f.response_id END,
               http_status = NULL, error = NULL, attempts = 0, modified_at = now(),
               full_sync = excluded.full_sync AND NOT (f.status = 'pending' AND NOT f.full_sync)
         WHERE NOT cde._unseen(f.xmin, f.key)
           AND CASE WHEN excluded.deleted THEN NOT f.deleted
                    ELSE f.hash IS DISTINCT FROM excluded.hash OR f.deleted%%3$s END
        RETURNING f.key, f.deleted, f.status$q$, tbl);
    -- A full sync step leaves out the rows that would not change, as its snapshot sees them: a
    -- write that changes nothing still locks its row, so a full re-sync would lock, and log,
    -- every row of the feed table, and a change made meanwhile would wait for the lock. The
    -- write checks again on the row's latest version. A collect leaves out nothing: were a step
    -- writing an older document of the key, not yet committed, the collect's write meets it,
    -- waits, and queues the key again (cde._unseen), where the snapshot shows an unchanged row.
    skip   text := format($q$
          LEFT JOIN %s AS f ON f.key = w.key
         WHERE f.key IS NULL
            OR CASE WHEN w.doc IS NULL THEN NOT f.deleted ELSE f.hash IS DISTINCT FROM w.hash OR f.deleted%%s END$q$, tbl);
    -- Whether a feed-table row holds this key ("%%s") and is not a deletion already.
    live   text := format('EXISTS (SELECT 1 FROM %s AS t WHERE t.key = %%s AND NOT t.deleted)', tbl);
    -- A collect while a full sync step may be writing the same keys from an older snapshot:
    -- during a full sync of the feed, or while a session holds the feed's step lock (a step
    -- goes on after its run was cancelled, or failed in another lane). A step's snapshot that
    -- could miss what this collect builds came before the change that queued the key, hence
    -- before this; and the step took the lock before its snapshot: such a step holds it now.
    -- See "tomb" and "touch" below.
    syncing boolean := keys IS NOT NULL AND mode = 'apply'
                       AND (cde._syncing(f.name) OR cde._steps_running(cde._feed_step_lock(f.feed_table)));
    written text[];   -- the keys a collect wrote, while syncing
    sends   boolean;  -- a builder sends what this chunk writes (mode 'chunk')
    sent    text[];   -- the keys it writes as sent, for it to send
    post    bigint;   -- their cde.sync_posts row
BEGIN
    PERFORM cde._unseen_keys();   -- none left over from a statement that failed
    IF mode IN ('chunk', 'gone') THEN
        -- A step's write: the feed's step lock, until commit, taken before the statement's
        -- snapshot (a collect asks for it: "syncing" above).
        PERFORM pg_advisory_xact_lock_shared(cde._feed_step_lock(f.feed_table));
    ELSIF mode = 'apply' AND keys IS NULL THEN
        -- A rebuild of every key (a TRUNCATE or a new definition during a full sync) cannot
        -- leave the traces a collect of some keys leaves for steps writing from an older
        -- snapshot ("touch" and "tomb" below): it would rewrite the whole table, and it cannot
        -- name the keys the source lost that have no row yet. It waits for the feed's steps
        -- instead, and keeps new ones from starting until it commits: its snapshot, taken
        -- after, sees what they wrote, and theirs will see what it writes. cde._collect has it
        -- already, or did not wait for it (it tries).
        PERFORM pg_advisory_xact_lock(cde._feed_step_lock(f.feed_table));
    END IF;
    CASE mode
    WHEN 'apply' THEN
        -- Deletions: the keys the source did not return with a document. Given a list of keys,
        -- they are found in the list itself (keys EXCEPT built keys), not by probing the feed
        -- table for every key (docs/benchmarks.md); given none, every row the source lacks.
        -- While a step may be writing ($3, "syncing"), a gone key with no row may yet get one
        -- from a step whose snapshot still saw it, after this commits: a deletion row is written
        -- for it then, which that step's write meets and leaves (cde._unseen), or which meets
        -- the step's own uncommitted row and waits for it. Otherwise no step writes.
        EXECUTE format($q$
            WITH src AS MATERIALIZED (SELECT * FROM cde._source($1, 'keys', $2)
            ), gone AS MATERIALIZED (
                (SELECT k.key FROM pg_catalog.unnest($2) AS k(key) WHERE $2 IS NOT NULL
                 EXCEPT SELECT src.key FROM src WHERE src.doc IS NOT NULL)
                UNION ALL
                SELECT t.key FROM %2$s AS t
                 WHERE $2 IS NULL AND NOT t.deleted
                   AND NOT EXISTS (SELECT 1 FROM src WHERE src.key = t.key AND src.doc IS NOT NULL)
            ), written AS (
                %1$s
            )
            SELECT (SELECT count(*) FROM src), count(*) FILTER (WHERE NOT w.deleted), count(*) FILTER (WHERE w.deleted),
                   CASE WHEN $3 THEN coalesce(array_agg(w.key), '{}') END
              FROM written AS w$q$,
            -- Keys given: changes, and a change moves its key's row out of a full sync's lane.
            -- None: every key (a TRUNCATE or a new definition during a full sync), a sync's job.
            format(write, (keys IS NULL)::text,
                   format($w$SELECT src.key, src.doc FROM src WHERE src.doc IS NOT NULL
                   UNION ALL
                   SELECT gone.key, NULL::jsonb FROM gone WHERE $3 OR %s$w$, format(live, 'gone.key')),
                   CASE WHEN keys IS NULL THEN '' ELSE $w$ OR f.status = 'pending' AND f.full_sync$w$ END,
                   '', '''pending'''),
            tbl)
          INTO built, changed, deleted, written
          USING f.name, keys, syncing;
        -- The touch: while a step may be writing, a collect rewrites, as they are, the rows of
        -- its keys it left unchanged. A key whose document changed and changed back (A, B, A)
        -- while a step that saw B was building gives this collect A, the row's own document, to
        -- leave; and it would leave no trace that the step could not see, so the step would
        -- then write B. Rewritten, the row's version is this transaction's: the step's write
        -- meets it and leaves it (cde._unseen), and queues the key again. The write above locked
        -- every one of these rows, in key order, so no step writes between the two. Same values,
        -- no indexed column changed (heap-only where the page has room), the same state: nothing
        -- is sent again, even from a slice in flight (cde._record finds a moved row by key).
        -- A rebuild of every key (keys NULL) touches nothing: no step writes beside it (above).
        IF syncing THEN
            EXECUTE format($q$
                UPDATE %s AS t SET hash = t.hash
                 WHERE t.key IN (SELECT pg_catalog.unnest($1) EXCEPT SELECT pg_catalog.unnest($2))$q$, tbl)
              USING keys, written;
        END IF;
    WHEN 'gone', 'gone_dry' THEN
        -- Keys the source returns with a NULL document were made deletions when their chunk was
        -- built; here only keys the source no longer has are left.
        EXECUTE format($q$
            WITH chunk AS MATERIALIZED (
                SELECT f.key FROM %1$s AS f WHERE NOT f.deleted AND f.key > $2 ORDER BY f.key LIMIT $3
            ), src AS MATERIALIZED (
                SELECT * FROM cde._source($1, 'exists', (SELECT array_agg(chunk.key) FROM chunk))
            ), missing AS MATERIALIZED (
                SELECT chunk.key FROM chunk WHERE NOT EXISTS (SELECT 1 FROM src WHERE src.key = chunk.key)
            ), written AS (
                %2$s
            )
            SELECT CASE WHEN $4 THEN (SELECT count(*) FROM missing) ELSE (SELECT count(*) FROM written) END,
                   (SELECT max(key) FROM chunk)$q$,
            tbl, format(write, 'true', 'SELECT missing.key, NULL::jsonb AS doc FROM missing WHERE NOT $4', '', format(skip, ''),
                        '''pending'''))
          INTO deleted, last_key USING f.name, after, n, mode = 'gone_dry';
    WHEN 'chunk' THEN
        -- Keys the source returns with a NULL document become deletions here; keys it no longer
        -- has are the deletion pass's (mode 'gone'), which walks the feed table.
        -- A sync builder sends the documents it writes as sent itself, once this commits: they
        -- are handed to it here (cde._stash_sent), never read back nor written a second time
        -- (docs/nothing-lost.md, "Full syncs sent by builders"). Until it is done, a row of
        -- cde.sync_posts names their keys: the worker sends no newer version of them, and a
        -- builder that dies leaves them to cde._recover_posts. That row is on disk before the
        -- first request goes: this commit waits for its WAL. A key another builder is posting
        -- (a run cancelled while its builders post, and a new one) is written pending: the
        -- worker holds it back until that builder is done.
        sends := cde._sends_built(f.name);
        EXECUTE format($q$
            WITH src AS MATERIALIZED (SELECT * FROM cde._source($1, 'chunk', NULL, $2, $3, $4, $5)
            ), written AS (
                %1$s
            )
            SELECT (SELECT count(*) FROM src), count(*) FILTER (WHERE NOT w.deleted), count(*) FILTER (WHERE w.deleted),
                   (SELECT key FROM src ORDER BY o DESC LIMIT 1),
                   CASE WHEN $6 THEN (SELECT cde._stash_sent($1, array_agg(s.key), array_agg(s.doc::text))
                                        FROM written AS x JOIN src AS s ON s.key = x.key WHERE x.status = 'sent') END
              FROM written AS w$q$,
            format(write, 'true', format('SELECT src.key, src.doc FROM src WHERE src.doc IS NOT NULL OR %s', format(live, 'src.key')),
                   ' OR cde._failed(f.status)', format(skip, ' OR cde._failed(f.status)'),
                   CASE WHEN sends THEN $s$CASE WHEN w.doc IS NULL OR w.key IN (SELECT pg_catalog.unnest(p.keys) FROM cde.sync_posts AS p WHERE p.feed = $1)
                                                 THEN 'pending' ELSE 'sent' END$s$
                        ELSE '''pending''' END))
          INTO built, changed, deleted, last_key, sent USING f.name, after, n, lane, lanes, sends;
        IF sent IS NOT NULL THEN
            INSERT INTO cde.sync_posts (feed, keys, pid, backend_start)
            SELECT f.name, sent, a.pid, a.backend_start FROM pg_catalog.pg_stat_activity a WHERE a.pid = pg_catalog.pg_backend_pid()
            RETURNING id INTO post;
            IF post IS NULL THEN   -- never seen: a post must name a live backend, or it is taken over
                RAISE EXCEPTION 'cde: this backend is not in pg_stat_activity; its post could not be told from a stopped builder''s';
            END IF;
            PERFORM cde._stash_post(post);
            PERFORM set_config('synchronous_commit', 'on', true);
        END IF;
    WHEN 'chunk_dry' THEN
        EXECUTE format($q$
            WITH src AS MATERIALIZED (SELECT * FROM cde._source($1, 'chunk', NULL, $2, $3, $4, $5))
            SELECT count(*),
                   count(*) FILTER (WHERE src.doc IS NOT NULL AND (f.key IS NULL OR f.deleted OR f.hash IS DISTINCT FROM cde._doc_hash(src.doc)
                                                                 OR cde._failed(f.status))),
                   count(*) FILTER (WHERE src.doc IS NULL AND f.key IS NOT NULL AND NOT f.deleted),
                   (SELECT key FROM src ORDER BY o DESC LIMIT 1)
              FROM src LEFT JOIN %1$s AS f ON f.key = src.key$q$,
            tbl)
          INTO built, changed, deleted, last_key USING f.name, after, n, lane, lanes;
    WHEN 'count' THEN
        SELECT s.o INTO built FROM cde._source(f.name, 'count') AS s;
    ELSE
        RAISE EXCEPTION 'cde._rebuild: unknown mode %', mode;
    END CASE;
    PERFORM cde._requeue_unseen(f.name);
END $fn$;

-- Queue again the keys whose rows a rebuild left because it could not see who wrote them.
CREATE FUNCTION cde._requeue_unseen(feed text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    unseen text[] := cde._unseen_keys();
BEGIN
    IF unseen IS NOT NULL THEN
        -- A key may have been met twice (an upsert's row, then a deletion's).
        PERFORM cde._enqueue(_requeue_unseen.feed, ARRAY(SELECT DISTINCT k FROM unnest(unseen) AS k));
        PERFORM cde._changes_recorded();
    END IF;
END $$;

-- Keys a sync builder wrote as sent and did not deliver go to the worker: pending again, in the
-- full sync's lane. Only rows still sent: one changed since is pending already, with its newer
-- document. modified_at stays the chunk's, so the phase waits for them (cde._sync_step).
CREATE FUNCTION cde._hand_back(feed_table regclass, keys text[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format($q$UPDATE %s SET status = 'pending', full_sync = true WHERE key = ANY ($1) AND status = 'sent'$q$,
                   feed_table)
      USING keys;
END $$;

-- The keys of sync builders' posts whose builder stopped before it was done (no backend of its pid
-- and start is left): they were written as sent, and may not have been delivered; they go again,
-- and the worker may send their newer versions. Their modified_at stays the chunk's: a phase
-- waits for them (cde._sync_step). Run by housekeeping and before each full sync step.
CREATE FUNCTION cde._recover_posts() RETURNS int
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p cde.sync_posts;
    t regclass;
    n int := 0;
BEGIN
    -- The backends as they are now, not as this transaction first read them (cde_sync_now()
    -- takes many steps in one transaction; a builder started since would look gone). A start
    -- this role may not see (not a superuser, nor pg_read_all_stats) counts as the builder's.
    PERFORM pg_catalog.pg_stat_clear_snapshot();
    FOR p IN SELECT * FROM cde.sync_posts s
              WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity a
                                 WHERE a.pid = s.pid AND (a.backend_start = s.backend_start OR a.backend_start IS NULL))
              ORDER BY s.id FOR UPDATE SKIP LOCKED LOOP
        SELECT feed_table INTO t FROM cde.feeds WHERE name = p.feed;
        IF FOUND THEN
            PERFORM cde._hand_back(t, p.keys);
        END IF;
        DELETE FROM cde.sync_posts WHERE id = p.id;
        n := n + 1;
    END LOOP;
    IF n > 0 THEN
        RAISE LOG 'cde: % posts of sync builders that stopped before they were done go again', n;
        PERFORM cde._changes_recorded();
    END IF;
    RETURN n;
END $$;

-- A sync builder is done with a post (src/builder_send.rs): its requests count for the destination,
-- the keys the destination did not take go to the worker (pending), the others count as sent, and
-- the worker may send the keys' newer versions. The destination's row first, as the worker's
-- record takes them.
CREATE FUNCTION cde._posted(post bigint, destination text, not_taken text[], requests bigint, failed bigint,
                            last_status int, first_error text, answered boolean) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    p cde.sync_posts;
    f cde.feeds;
    n bigint;
BEGIN
    PERFORM cde._destination_answered(destination, requests, failed, last_status, first_error, answered);
    DELETE FROM cde.sync_posts WHERE id = post RETURNING * INTO p;
    SELECT * INTO f FROM cde.feeds WHERE name = p.feed;
    IF NOT FOUND THEN   -- the feed was dropped meanwhile (its posts with it)
        RETURN 0;
    END IF;
    IF cardinality(not_taken) > 0 THEN
        PERFORM cde._hand_back(f.feed_table, not_taken);
    END IF;
    n := cardinality(p.keys) - coalesce(cardinality(not_taken), 0);
    IF n > 0 THEN
        UPDATE cde.feeds SET items_sent = items_sent + n, last_sent_at = now() WHERE name = f.name;
        UPDATE cde.destinations SET items_sent = items_sent + n WHERE name = coalesce(f.destination, 'default');
    END IF;
    PERFORM cde._changes_recorded();   -- the keys' newer versions, held back, may go
    RETURN n;
END $$;

-- Whether a feed may be sent by its builders now, as the worker would send it: its owner may use
-- its destination (CDE-209 otherwise: kept, not sent), and no feed it depends on has changes
-- queued or documents pending (dependency order, docs/protocol.md). Otherwise the chunk is
-- written pending, and the worker's rules apply.
CREATE FUNCTION cde._builders_may_send(feed text) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    f cde.feeds := cde._feed(feed);
    t regclass;
    busy boolean;
BEGIN
    IF NOT cde._may_use_destination(f.owner, f.destination)
       OR EXISTS (SELECT 1 FROM cde.queue q WHERE q.feed = ANY (f.depends_on)) THEN
        RETURN false;
    END IF;
    FOR t IN SELECT x.feed_table FROM cde.feeds x WHERE x.name = ANY (f.depends_on) LOOP
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE status = ''pending'')', t) INTO busy;
        IF busy THEN
            RETURN false;
        END IF;
    END LOOP;
    RETURN true;
END $$;
