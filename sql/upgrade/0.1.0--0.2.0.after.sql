-- cde 0.1.0 -> 0.2.0, last part: what the new objects make of 0.1.0's state.

-- Feed tables: the extension owner's, and no right for the role that registered the feed (a
-- 0.1.0 feed table was that role's, with its rebuild function).
DO $$
DECLARE
    f record;
    owner name := (SELECT r.rolname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_roles r ON r.oid = e.extowner WHERE e.extname = 'cde');
BEGIN
    FOR f IN SELECT x.feed_table, x.owner FROM cde.feeds x LOOP
        EXECUTE pg_catalog.format('ALTER TABLE %s OWNER TO %I', f.feed_table, owner);
        EXECUTE pg_catalog.format('REVOKE ALL ON %s FROM PUBLIC', f.feed_table);
        IF f.owner::text <> owner AND EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid = f.owner) THEN
            EXECUTE pg_catalog.format('REVOKE ALL ON %s FROM %s', f.feed_table, f.owner);
        END IF;
    END LOOP;
END $$;

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
