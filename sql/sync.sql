-- Full sync in phases, after Ergonode's synchronisation: a run is preparing (documents counted),
-- planned (the plan is recorded: feeds, items each), executing (one phase per feed, in dependency
-- order), then finished, failed or cancelled.
--
-- A phase rebuilds every entity of its feed from the source query in key-ordered chunks, each in
-- its own short transaction (no snapshot or lock is held for the run; writers keep writing), then
-- marks as deleted the keys the source no longer returns (unless the feed table was empty when the
-- phase began: a first sync has nothing stale), then waits until the send pass has
-- delivered what it made pending. The resume point is committed with each chunk, so a run
-- interrupted by a crash continues where it stopped.
--
-- The worker advances runs (cde._sync_step, one step per call, one transaction per step);
-- cde_sync_now() advances them when no worker runs.



CREATE FUNCTION cde_full_sync(feed text DEFAULT NULL, dry_run boolean DEFAULT false,
                              ticket bigint DEFAULT cde._ticket()) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    caller regrole := cde._redeem(ticket);
    run_id bigint;
    names text[];
    busy record;
BEGIN
    IF feed IS NOT NULL THEN
        PERFORM cde._managed_feed(feed, caller);
        names := ARRAY[feed];
    ELSE
        -- Every feed the caller may manage (a superuser: every feed).
        SELECT array_agg(o.name ORDER BY o.depth, o.name) INTO names
          FROM cde._feeds_in_order() o JOIN cde.feeds f USING (name) WHERE cde._manages(f.owner, caller);
        IF names IS NULL THEN
            RAISE EXCEPTION 'cde_full_sync: no feed is registered that you may manage' USING HINT = 'cde_register_feed(...) first.';
        END IF;
    END IF;
    IF dry_run IS NULL THEN
        RAISE EXCEPTION 'cde_full_sync: dry_run is NULL';
    END IF;

    -- One run at a time per feed: serialise the check against concurrent callers.
    LOCK TABLE cde.sync_runs IN SHARE ROW EXCLUSIVE MODE;
    SELECT r.id, r.status, p.feed INTO busy
      FROM cde.sync_runs r JOIN cde.sync_phases p ON p.run_id = r.id
     WHERE cde._active(r.status) AND p.feed = ANY (names)
     ORDER BY r.id LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'cde_full_sync: feed % is already in full sync run % (%)', busy.feed, busy.id, busy.status
            USING ERRCODE = 'object_in_use',
                  HINT = format('Wait for it (SELECT * FROM cde_sync_runs WHERE run_id = %s) or cde_cancel_sync(%s).', busy.id, busy.id);
    END IF;

    INSERT INTO cde.sync_runs (feeds, dry_run) VALUES (names, dry_run) RETURNING id INTO run_id;
    INSERT INTO cde.sync_phases (run_id, feed, ordinal)
    SELECT run_id, n, o FROM unnest(names) WITH ORDINALITY AS t(n, o);
    INSERT INTO cde.sync_events (run_id, status, message)
    VALUES (run_id, 'preparing', format('full sync of %s%s', array_to_string(names, ', '), CASE WHEN dry_run THEN ' (dry run)' ELSE '' END));
    PERFORM cde._changes_recorded();   -- wake the worker at commit
    RETURN run_id;
END $$;

COMMENT ON FUNCTION cde_full_sync(text, boolean, bigint) IS
    'Start a full (re)sync of one feed or all feeds, in dependency order; returns the run id (see cde_sync_runs)';

CREATE FUNCTION cde_cancel_sync(run_id bigint, ticket bigint DEFAULT cde._ticket()) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    caller regrole := cde._redeem(ticket);
    r cde.sync_runs;
    n text;
BEGIN
    SELECT * INTO r FROM cde.sync_runs x WHERE x.id = cde_cancel_sync.run_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cde_cancel_sync: no sync run %', run_id USING ERRCODE = 'undefined_object';
    END IF;
    FOREACH n IN ARRAY r.feeds LOOP
        IF EXISTS (SELECT 1 FROM cde.feeds f WHERE f.name = n) THEN
            PERFORM cde._managed_feed(n, caller);   -- a run of feeds the caller may not manage is not its to cancel
        END IF;
    END LOOP;
    IF NOT cde._active(r.status) THEN
        RAISE EXCEPTION 'cde_cancel_sync: run % has already ended (%)', run_id, r.status
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE cde.sync_runs SET status = 'cancelled', finished_at = now(), current_phase = NULL WHERE id = r.id;
    UPDATE cde.sync_phases SET status = 'cancelled', finished_at = now()
     WHERE sync_phases.run_id = r.id AND status NOT IN ('finished', 'failed');
    INSERT INTO cde.sync_events (run_id, status, message) VALUES (r.id, 'cancelled', 'cancelled by ' || current_user);
END $$;

COMMENT ON FUNCTION cde_cancel_sync(bigint, bigint) IS 'Cancel a full sync run; what it already made pending is still delivered';

-- The advisory locks (their keys: cde._sync_step_lock(), cde._sync_state_lock(), src/locks.rs).
-- Full sync steps take the step lock shared: the sync builders (src/builder.rs), the worker and
-- cde_sync_now() build lanes side by side, and DROP EXTENSION takes it exclusively to wait for
-- them (sql/capture.sql). Collects take no lock against steps: a rebuild never overwrites a row
-- its snapshot cannot see (cde._rebuild). Steps that change a run's state (count the plan, start
-- or close a phase, the deletion pass) also take the state lock: one such step at a time, beside
-- the lanes' chunks. A step's write also takes its feed's step lock shared (cde._rebuild), for
-- collects to see that a step of the feed may be writing. docs/architecture.md, "Locks", has
-- them all.

-- What a step did. NULL: no run is active.
CREATE TYPE cde.step AS ENUM (
    'progress',   -- it did work
    'waiting',    -- the active run waits for the send pass to deliver its current phase
    'busy',       -- others hold what the step needs (every lane left is being built; a lock)
    'retry'       -- a transient error rolled the step back: take it again later
);

-- One step of the oldest active run (cde.step says what came of it). With "wait", it waits for
-- the locks rather than answer 'busy', as a builder does.
CREATE FUNCTION cde._sync_step(wait boolean DEFAULT false) RETURNS cde.step
LANGUAGE plpgsql AS $$
DECLARE
    r     cde.sync_runs;
    ph    cde.sync_phases;
    f     cde.feeds;
    ln    cde.sync_lanes;
    res   record;
    n     bigint;
    lanes int;
    chunk int := cde._chunk_size();
BEGIN
    IF wait THEN
        PERFORM pg_advisory_xact_lock_shared(cde._sync_step_lock());
    ELSIF NOT pg_try_advisory_xact_lock_shared(cde._sync_step_lock()) THEN
        RETURN 'busy';
    END IF;

    -- Posts of builders that stopped before they were done go again first (their lanes are
    -- taken up again from their last committed chunk, which those posts were).
    IF EXISTS (SELECT 1 FROM cde.sync_posts) THEN
        PERFORM cde._recover_posts();
    END IF;

    -- The oldest active run (runs go one after the other). If its phase is building: the next
    -- chunk of a lane no other step is building.
    SELECT * INTO r FROM cde.sync_runs WHERE cde._active(status) ORDER BY id LIMIT 1;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT l.* INTO ln
      FROM cde.sync_lanes l JOIN cde.sync_phases p USING (run_id, feed)
     WHERE l.run_id = r.id AND NOT l.done AND p.status = 'building' AND p.deletions_cursor IS NULL
     ORDER BY l.lane LIMIT 1
       FOR UPDATE OF l SKIP LOCKED;
    IF FOUND THEN
        SELECT * INTO f FROM cde.feeds WHERE name = ln.feed;
        IF NOT FOUND THEN
            PERFORM cde._sync_fail(r, ln.feed, 'feed ' || ln.feed || ' was dropped');
            RETURN 'progress';
        END IF;
        BEGIN
            -- The lane's next chunk of source keys, in the key's own order (a dry run counts
            -- what it would change). Fewer rows than asked: the lane is done.
            SELECT * INTO res FROM cde._rebuild(f.name, NULL, CASE WHEN r.dry_run THEN 'chunk_dry' ELSE 'chunk' END,
                                                ln.cursor_key, chunk, ln.lane, ln.lanes);
            UPDATE cde.sync_lanes
               SET cursor_key = coalesce(res.last_key, cursor_key), done = res.built < chunk
             WHERE run_id = r.id AND feed = ln.feed AND lane = ln.lane;
            UPDATE cde.sync_phases
               SET processed = processed + res.built,
                   unchanged = unchanged + res.built - res.changed,
                   sent = CASE WHEN r.dry_run THEN sent + res.changed ELSE sent END,
                   deleted = deleted + res.deleted
             WHERE run_id = r.id AND feed = ln.feed;
        EXCEPTION WHEN OTHERS THEN
            RETURN cde._sync_step_failed(r, ln.feed, SQLSTATE, SQLERRM);   -- the step's work is rolled back
        END;
        RETURN 'progress';
    END IF;
    IF EXISTS (SELECT 1 FROM cde.sync_lanes l JOIN cde.sync_phases p USING (run_id, feed)
                WHERE l.run_id = r.id AND NOT l.done AND p.status = 'building' AND p.deletions_cursor IS NULL) THEN
        RETURN 'busy';   -- the lanes left are being built by other steps
    END IF;

    -- Everything else changes the run's state: one step at a time.
    IF wait THEN
        PERFORM pg_advisory_xact_lock(cde._sync_state_lock());
    ELSIF NOT pg_try_advisory_xact_lock(cde._sync_state_lock()) THEN
        RETURN 'busy';
    END IF;
    SELECT * INTO r FROM cde.sync_runs WHERE cde._active(status)
     ORDER BY id LIMIT 1 FOR UPDATE;   -- again: another step may have changed it meanwhile
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;

    IF r.status = 'preparing' THEN
        -- The plan: how many entities each feed's source has now.
        FOR ph IN SELECT * FROM cde.sync_phases WHERE run_id = r.id ORDER BY ordinal LOOP
            SELECT * INTO f FROM cde.feeds WHERE name = ph.feed;
            IF NOT FOUND THEN
                PERFORM cde._sync_fail(r, ph.feed, 'feed ' || ph.feed || ' was dropped');
                RETURN 'progress';
            END IF;
            BEGIN
                SELECT built INTO n FROM cde._rebuild(f.name, NULL, 'count');   -- as the feed's owner
            EXCEPTION WHEN OTHERS THEN
                RETURN cde._sync_step_failed(r, ph.feed, SQLSTATE, SQLERRM);   -- the source query fails: so does the run
            END;
            UPDATE cde.sync_phases SET planned = n WHERE run_id = r.id AND feed = ph.feed;
        END LOOP;
        UPDATE cde.sync_runs SET status = 'planned' WHERE id = r.id;
        INSERT INTO cde.sync_events (run_id, status, message)
        SELECT r.id, 'planned', string_agg(feed || ': ' || planned, ', ' ORDER BY ordinal)
          FROM cde.sync_phases WHERE run_id = r.id;
        RETURN 'progress';
    END IF;

    IF r.status = 'planned' THEN
        UPDATE cde.sync_runs SET status = 'executing' WHERE id = r.id;
        INSERT INTO cde.sync_events (run_id, status) VALUES (r.id, 'executing');
        RETURN 'progress';
    END IF;

    -- executing: the first phase that has not ended. Phases are ordered by dependency, so every
    -- phase before it has finished.
    SELECT * INTO ph FROM cde.sync_phases
     WHERE run_id = r.id AND status NOT IN ('finished', 'failed', 'cancelled')
     ORDER BY ordinal LIMIT 1;
    IF NOT FOUND THEN
        UPDATE cde.sync_runs SET status = 'finished', finished_at = now(), current_phase = NULL WHERE id = r.id;
        INSERT INTO cde.sync_events (run_id, status, message)
        SELECT r.id, 'finished', string_agg(format('%s: %s processed, %s sent, %s unchanged, %s deleted, %s failed',
                                                   feed, processed, sent, unchanged, deleted, failed), '; ' ORDER BY ordinal)
          FROM cde.sync_phases WHERE run_id = r.id;
        RETURN 'progress';
    END IF;
    SELECT * INTO f FROM cde.feeds WHERE name = ph.feed;
    IF NOT FOUND THEN
        PERFORM cde._sync_fail(r, ph.feed, 'feed ' || ph.feed || ' was dropped');
        RETURN 'progress';
    END IF;

    IF ph.status = 'waiting' THEN
        -- Lanes: as many as builders may run (cde.sync_builders), one for a source of less than
        -- two chunks (nothing to share) or when no builder runs.
        lanes := CASE WHEN ph.planned < 2 * chunk THEN 1
                      ELSE greatest(1, current_setting('cde.sync_builders', true)::int) END;   -- NULL: 1
        INSERT INTO cde.sync_lanes (run_id, feed, lane, lanes)
        SELECT r.id, ph.feed, g, lanes FROM generate_series(0, lanes - 1) AS g;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s WHERE NOT deleted)', f.feed_table) INTO res;
        UPDATE cde.sync_phases SET status = 'building', started_at = now(), check_deletions = res.exists
         WHERE run_id = r.id AND feed = ph.feed;
        UPDATE cde.sync_runs SET current_phase = ph.feed WHERE id = r.id;
        INSERT INTO cde.sync_events (run_id, status, feed, message)
        VALUES (r.id, 'executing', ph.feed, 'phase started' || CASE WHEN lanes > 1 THEN format(', built in %s lanes', lanes) ELSE '' END);
        RETURN 'progress';
    END IF;

    IF ph.status = 'building' THEN
        IF ph.deletions_cursor IS NULL AND EXISTS (SELECT 1 FROM cde.sync_lanes l
                                                    WHERE l.run_id = r.id AND l.feed = ph.feed AND NOT l.done) THEN
            RETURN 'progress';   -- a lane became free since this step looked: take it next
        END IF;
        BEGIN
            IF ph.deletions_cursor IS NULL THEN
                -- Every lane built. Then the keys the feed table has and the source no longer
                -- returns, unless the feed table had nothing to check.
                IF ph.check_deletions THEN
                    UPDATE cde.sync_phases SET deletions_cursor = '' WHERE run_id = r.id AND feed = ph.feed;
                    RETURN 'progress';
                END IF;
            ELSE
                -- The deletion pass: the next chunk of the feed table's keys.
                SELECT * INTO res FROM cde._rebuild(f.name, NULL, CASE WHEN r.dry_run THEN 'gone_dry' ELSE 'gone' END,
                                                    ph.deletions_cursor, chunk);
                IF res.last_key IS NOT NULL THEN
                    UPDATE cde.sync_phases
                       SET deletions_cursor = res.last_key, deleted = deleted + res.deleted,
                           sent = CASE WHEN r.dry_run THEN sent + res.deleted ELSE sent END
                     WHERE run_id = r.id AND feed = ph.feed;
                    RETURN 'progress';
                END IF;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RETURN cde._sync_step_failed(r, ph.feed, SQLSTATE, SQLERRM);
        END;
        IF r.dry_run THEN
            UPDATE cde.sync_phases SET status = 'finished', finished_at = now() WHERE run_id = r.id AND feed = ph.feed;
            INSERT INTO cde.sync_events (run_id, status, feed, message) VALUES (r.id, 'executing', ph.feed, 'phase finished (dry run)');
        ELSE
            UPDATE cde.sync_phases SET status = 'sending', built_at = now() WHERE run_id = r.id AND feed = ph.feed;
            INSERT INTO cde.sync_events (run_id, status, feed, message) VALUES (r.id, 'executing', ph.feed, 'built; sending');
        END IF;
        RETURN 'progress';
    END IF;

    -- sending: done when what the phase built has been delivered: no row is pending that was
    -- made pending before the building ended (in either lane of the pending index, each in its
    -- own order), and no builder is still posting what it wrote as sent (what the destination
    -- does not take becomes pending). Rows changed since are the partial sync's: under a stream
    -- of writes the phase still ends.
    EXECUTE format($q$SELECT EXISTS (SELECT 1 FROM %1$s WHERE status = 'pending' AND full_sync AND modified_at <= $1)
                          OR EXISTS (SELECT 1 FROM %1$s WHERE status = 'pending' AND NOT full_sync AND modified_at <= $1)
                          OR EXISTS (SELECT 1 FROM cde.sync_posts p WHERE p.feed = $2) AS "exists"$q$,
                   f.feed_table)
       INTO res USING coalesce(ph.built_at, now()), f.name;
    IF res.exists THEN
        IF coalesce(current_setting('cde.endpoint', true), '') = ''
           AND NOT EXISTS (SELECT 1 FROM cde.sync_events e WHERE e.run_id = r.id AND e.feed = ph.feed AND e.message LIKE 'waiting for an endpoint%') THEN
            INSERT INTO cde.sync_events (run_id, status, feed, message)
            VALUES (r.id, 'executing', ph.feed, 'waiting for an endpoint: cde.endpoint is empty, nothing is sent');
        END IF;
        RETURN 'waiting';
    END IF;
    EXECUTE format($q$SELECT count(*) FILTER (WHERE status = 'sent' AND sent_at >= $1) AS sent_n,
                             count(*) FILTER (WHERE cde._failed(status)) AS failed_n
                        FROM %s$q$, f.feed_table)
       INTO res USING ph.started_at;
    UPDATE cde.sync_phases SET status = 'finished', finished_at = now(), sent = res.sent_n, failed = res.failed_n
     WHERE run_id = r.id AND feed = ph.feed;
    INSERT INTO cde.sync_events (run_id, status, feed, message)
    VALUES (r.id, 'executing', ph.feed, format('phase finished: %s sent, %s failed', res.sent_n, res.failed_n));
    RETURN 'progress';
END $$;

-- What a step that raised an error (its work rolled back) answers. A transient error (a
-- deadlock with a writer that takes feed-table rows in another order than cde's key order; a
-- serialization failure; a lock timeout) leaves the run going, and the caller takes the step
-- again later (the worker: at its next iteration): 'retry'. Any other fails the run.
CREATE FUNCTION cde._sync_step_failed(r cde.sync_runs, feed text, state text, err text) RETURNS cde.step
LANGUAGE plpgsql AS $$
BEGIN
    IF state IN ('40P01', '40001', '55P03') THEN   -- deadlock_detected, serialization_failure, lock_not_available
        RAISE WARNING 'cde: full sync run %, feed %: step rolled back after a transient error, taken again: %', r.id, feed, err;
        INSERT INTO cde.sync_events (run_id, status, feed, message)
        VALUES (r.id, 'executing', feed, 'step rolled back, taken again: ' || err);
        RETURN 'retry';
    END IF;
    PERFORM cde._sync_fail(r, feed, err);
    RETURN 'progress';
END $$;

CREATE FUNCTION cde._sync_fail(r cde.sync_runs, feed text, err text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE cde.sync_phases SET status = 'failed', finished_at = now() WHERE run_id = r.id AND sync_phases.feed = _sync_fail.feed;
    UPDATE cde.sync_phases SET status = 'cancelled', finished_at = now()
     WHERE run_id = r.id AND status IN ('waiting', 'building', 'sending');
    UPDATE cde.sync_runs SET status = 'failed', finished_at = now(), error = feed || ': ' || err WHERE id = r.id;
    INSERT INTO cde.sync_events (run_id, status, feed, message) VALUES (r.id, 'failed', feed, err);
END $$;

CREATE VIEW cde_sync_runs AS
SELECT r.id AS run_id, r.feeds, r.dry_run, r.status, r.current_phase,
       sum(p.planned)::bigint AS planned, sum(p.processed)::bigint AS processed, sum(p.sent)::bigint AS sent,
       sum(p.unchanged)::bigint AS unchanged, sum(p.deleted)::bigint AS deleted, sum(p.failed)::bigint AS failed,
       jsonb_object_agg(p.feed, jsonb_build_object(
           'status', p.status, 'ordinal', p.ordinal, 'planned', p.planned, 'processed', p.processed, 'sent', p.sent,
           'unchanged', p.unchanged, 'deleted', p.deleted, 'failed', p.failed)) AS phases,
       r.started_at, r.finished_at, r.error,
       -- what an executing run is waiting for, when it waits for its current phase's delivery
       CASE WHEN r.status = 'executing' AND bool_or(p.status = 'sending') THEN
            CASE WHEN coalesce(current_setting('cde.endpoint', true), '') = '' THEN 'an endpoint: cde.endpoint is empty'
                 ELSE 'the delivery of what it built' END
       END AS waiting_for
  FROM cde.sync_runs r JOIN cde.sync_phases p ON p.run_id = r.id
 GROUP BY r.id
 ORDER BY r.id;

COMMENT ON VIEW cde_sync_runs IS 'Full sync runs: status, current phase, per-feed counts (phases)';
