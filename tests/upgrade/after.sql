-- Nothing in flight is lost by the upgrade: the queued keys, pending and retrying items and the
-- running full sync all go out, from the upgraded database, to the test sink.
\set ON_ERROR_STOP on
CALL cde_deliver();   -- the retrying item's retry is due already (state.sql)
DO $$
DECLARE
    n bigint;
BEGIN
    SELECT count(*) INTO n FROM cde.queue;
    IF n <> 0 THEN RAISE EXCEPTION 'upgrade: % queue rows left', n; END IF;
    SELECT count(*) INTO n FROM cde.feed_up_items WHERE status NOT IN ('sent', 'dead');
    IF n <> 0 THEN RAISE EXCEPTION 'upgrade: % up_items not delivered', n; END IF;
    SELECT count(*) INTO n FROM cde.feed_up_items WHERE status = 'dead';
    IF n <> 1 THEN RAISE EXCEPTION 'upgrade: % dead items, 1 expected', n; END IF;
    SELECT count(*) INTO n FROM cde.feed_up_ledger WHERE key = '1' AND status = 'sent' AND (doc->>'amount')::numeric = 100;
    IF n <> 1 THEN RAISE EXCEPTION 'upgrade: the queued partition write was not delivered'; END IF;
    SELECT count(*) INTO n FROM cde.sync_runs WHERE status <> 'finished';
    IF n <> 0 THEN RAISE EXCEPTION 'upgrade: % full sync runs not finished', n; END IF;
    -- The views' counts (cde.row_counts, filled as the feed tables were rebuilt) agree with the rows.
    SELECT count(*) INTO n FROM cde_feed_status s
     WHERE (s.items, s.sent, s.dead) IS DISTINCT FROM
           (SELECT (count(*), count(*) FILTER (WHERE status = 'sent'), count(*) FILTER (WHERE status = 'dead'))
              FROM cde.feed_up_items WHERE s.feed = 'up_items')
       AND s.feed = 'up_items';
    IF n <> 0 THEN RAISE EXCEPTION 'upgrade: cde_feed_status does not count up_items as its feed table holds them'; END IF;
    RAISE NOTICE 'upgrade: everything in flight was delivered';
END $$;
