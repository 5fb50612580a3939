-- cde's objects in this database, one line each, as names and definitions (no OID): what an
-- upgraded database and a fresh install must both print the same.
SET search_path = pg_catalog, pg_temp;
WITH ext AS (SELECT oid, extnamespace FROM pg_extension WHERE extname = 'cde')
SELECT * FROM (
    SELECT 'column' AS kind, c.relname || '.' || a.attname AS name,
           format_type(a.atttypid, a.atttypmod) || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
           || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '') || coalesce(' collate ' || co.collname, '')
           || ' #' || (SELECT count(*) FROM pg_attribute b WHERE b.attrelid = a.attrelid AND b.attnum > 0 AND NOT b.attisdropped AND b.attnum <= a.attnum) AS def
      FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
      LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 0 AND co.collname <> 'default'
     WHERE c.relnamespace = 'cde'::regnamespace AND c.relkind IN ('r', 'p', 'v')
    UNION ALL
    SELECT 'index', i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
      FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid WHERE c.relnamespace = 'cde'::regnamespace
    UNION ALL
    SELECT 'constraint', conrelid::regclass::text || '.' || conname, pg_get_constraintdef(oid)
      FROM pg_constraint WHERE connamespace = 'cde'::regnamespace
    UNION ALL
    SELECT 'relation', c.oid::regclass::text,
           c.relkind::text || ' owner ' || c.relowner::regrole || ' acl ' || coalesce(c.relacl, acldefault(CASE c.relkind WHEN 'S' THEN 's' ELSE 'r' END::"char", c.relowner))::text
           || ' comment ' || coalesce(obj_description(c.oid, 'pg_class'), '-')
      FROM pg_class c WHERE c.relnamespace = 'cde'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'S')
    UNION ALL
    SELECT 'view', c.oid::regclass::text, pg_get_viewdef(c.oid) || ' acl ' || coalesce(c.relacl, acldefault('r', c.relowner))::text
      FROM pg_class c, ext WHERE c.relnamespace = ext.extnamespace AND c.relkind = 'v'
    UNION ALL
    SELECT 'function', p.oid::regprocedure::text,
           pg_get_functiondef(p.oid) || ' acl ' || coalesce(p.proacl, acldefault('f', p.proowner))::text || ' comment ' || coalesce(obj_description(p.oid, 'pg_proc'), '-')
      FROM pg_proc p, ext WHERE p.pronamespace IN ('cde'::regnamespace, ext.extnamespace) AND p.prokind <> 'a'
    UNION ALL
    SELECT 'type', t.typname, string_agg(e.enumlabel, ', ' ORDER BY e.enumsortorder)
      FROM pg_type t JOIN pg_enum e ON e.enumtypid = t.oid WHERE t.typnamespace = 'cde'::regnamespace GROUP BY t.typname
    UNION ALL
    SELECT 'event trigger', evtname, evtevent || ' ' || coalesce(evttags::text, '-') || ' ' || evtfoid::regproc
      FROM pg_event_trigger
    UNION ALL
    SELECT 'member', pg_describe_object(d.classid, d.objid, 0), ''
      FROM pg_depend d, ext WHERE d.refobjid = ext.oid AND d.deptype = 'e'
    UNION ALL
    SELECT 'config dump', x.cfg::regclass::text, coalesce(x.cond, '')
      FROM pg_extension e, unnest(e.extconfig, e.extcondition) AS x(cfg, cond) WHERE e.extname = 'cde'
    UNION ALL
    SELECT 'schema', 'cde', 'acl ' || coalesce(nspacl, acldefault('n', nspowner))::text FROM pg_namespace WHERE nspname = 'cde'
    UNION ALL
    SELECT 'trigger', tgrelid::regclass::text || '.' || tgname, pg_get_triggerdef(oid)
      FROM pg_trigger WHERE tgname LIKE 'cde\_capture%'
    UNION ALL
    SELECT 'feed', name, concat_ws(' | ', source_query, key_columns, key_types, doc_column, mode, depends_on, batch_size, owner, search_path, feed_table)
      FROM cde.feeds
    UNION ALL
    SELECT 'track', feed || ' ' || table_name, concat_ws(' | ', source_table, keys) FROM cde.tracks
) AS o
ORDER BY kind, name, def;
