-- cde 0.1.0 -> 0.2.0, last part: what the new objects make of 0.1.0's state.

-- Feed tables: rebuilt from their fixed definition, the extension owner's, with no right for
-- anyone else. A 0.1.0 feed table belonged to the role that registered the feed, which could have
-- added triggers, rules, policies, defaults or indexes: none of it comes along. The rows do.
DO $$
DECLARE
    f record;
    i record;
BEGIN
    FOR f IN SELECT x.name FROM cde.feeds x LOOP
        EXECUTE pg_catalog.format('ALTER TABLE cde.%I RENAME TO %I', 'feed_' || f.name, 'feed_' || f.name || '_0_1_0');
        FOR i IN SELECT c.relname FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class c ON c.oid = x.indexrelid
                  WHERE x.indrelid = pg_catalog.format('cde.%I', 'feed_' || f.name || '_0_1_0')::regclass LOOP
            EXECUTE pg_catalog.format('ALTER INDEX cde.%I RENAME TO %I', i.relname, i.relname || '_0_1_0');
        END LOOP;
        FOR i IN SELECT c.conname AS relname FROM pg_catalog.pg_constraint c
                  WHERE c.conrelid = pg_catalog.format('cde.%I', 'feed_' || f.name || '_0_1_0')::regclass AND c.contype = 'c' LOOP
            EXECUTE pg_catalog.format('ALTER TABLE cde.%I RENAME CONSTRAINT %I TO %I', 'feed_' || f.name || '_0_1_0', i.relname, i.relname || '_0_1_0');
        END LOOP;
        PERFORM cde._create_feed_table(f.name);
        -- Made by this script, it would be the extension's member; a feed table is not (a dump keeps it).
        EXECUTE pg_catalog.format('ALTER EXTENSION cde DROP TABLE cde.%I', 'feed_' || f.name);
        -- As the extension's owner, a superuser: row security does not apply to it. Counted once
        -- after, not by the insert trigger (which would hold every row in a transition table).
        EXECUTE pg_catalog.format('ALTER TABLE cde.%I DISABLE TRIGGER cde_count_insert', 'feed_' || f.name);
        EXECUTE pg_catalog.format($q$INSERT INTO cde.%I (key, doc, hash, deleted, status, http_status, error, attempts, modified_at, sent_at)
                                      SELECT key, doc, hash, deleted, status, http_status, error, attempts, modified_at, sent_at FROM ONLY cde.%I$q$,
                                  'feed_' || f.name, 'feed_' || f.name || '_0_1_0');
        EXECUTE pg_catalog.format('ALTER TABLE cde.%I ENABLE ALWAYS TRIGGER cde_count_insert', 'feed_' || f.name);
        PERFORM cde._recount(f.name);
        EXECUTE pg_catalog.format('DROP TABLE cde.%I', 'feed_' || f.name || '_0_1_0');   -- a view of yours over it stops the update: drop it first
        UPDATE cde.feeds SET feed_table = pg_catalog.format('cde.%I', 'feed_' || f.name)::regclass WHERE name = f.name;
    END LOOP;
END $$;

-- Tracks: a feed's owner must (still) be allowed to track the table; a track it is not is dropped.
DO $$
DECLARE
    t record;
BEGIN
    FOR t IN SELECT x.feed, x.source_table, f.owner FROM cde.tracks x JOIN cde.feeds f ON f.name = x.feed LOOP
        IF NOT pg_catalog.has_table_privilege(t.owner::oid, t.source_table, 'TRIGGER') THEN
            DELETE FROM cde.tracks WHERE feed = t.feed AND source_table = t.source_table;
            RAISE WARNING 'cde 0.2.0: feed % no longer tracks %: its owner % has no TRIGGER right on it', t.feed, t.source_table, t.owner;
        END IF;
    END LOOP;
END $$;

-- Source queries' search_path: pg_catalog first, as 0.2.0 registers them.
UPDATE cde.feeds SET search_path = 'pg_catalog, ' || pg_catalog.array_to_string(ARRAY(
    SELECT s FROM pg_catalog.unnest(pg_catalog.string_to_array(search_path, ', ')) AS s WHERE s <> 'pg_catalog'), ', ');

-- The capture triggers, as 0.2.0 makes them (tables under tracked ones included).
SELECT cde._install_capture(t.source_table) FROM (SELECT DISTINCT source_table FROM cde.tracks) AS t;

-- Delegated admins: what 0.1.0 gave them (rights on cde's tables and functions) taken back, what
-- 0.2.0 gives them granted. Membership in pg_monitor, which 0.1.0 granted, is left as it is.
SELECT cde_revoke_admin(a.admin), cde_grant_admin(a.admin) FROM cde.upgrade_admins a;
DROP TABLE cde.upgrade_admins;

-- 0.1.0 did not capture writes that named a partition or an inheritance child: every feed that
-- tracks a table with partitions or children gets a full sync, which finds what they changed.
INSERT INTO cde.queue (feed, all_keys)
SELECT DISTINCT t.feed, true
  FROM cde.tracks t JOIN pg_catalog.pg_class c ON c.oid = t.source_table
 WHERE c.relkind = 'p' OR EXISTS (SELECT 1 FROM pg_catalog.pg_inherits i WHERE i.inhparent = t.source_table);
