-- What runs when documents are built: a feed's source query in the shape of each mode
-- (cde._source_sql), as cde._source runs it, as the feed's owner. Nothing is generated per feed
-- but its table; the query text only ever sits inside "(...) AS s", on lines of its own.
\i sql/fresh.inc
BEGIN;
CREATE TABLE products (id bigint PRIMARY KEY, name text, price numeric);
INSERT INTO products VALUES (1, 'one', 10), (2, 'two', 20), (3, 'three', 30);
SELECT cde_register_feed('products', $$SELECT id, jsonb_build_object('name', name, 'price', price) AS doc
                                         FROM products -- a trailing comment$$);
\pset format unaligned
SELECT m.mode, cde._source_sql(f, m.mode) FROM cde.feeds f, unnest('{all,keys,exists,chunk,count}'::text[]) AS m(mode);
\pset format aligned
-- A query without a "doc" column: the whole row is the document.
SELECT cde_register_feed('names', 'SELECT id, name FROM products');
SELECT cde._source_sql(f, 'keys') FROM cde.feeds f WHERE name = 'names';
-- Each shape, run.
SELECT * FROM cde._source('products', 'keys', '{2,3}') ORDER BY key;
SELECT key FROM cde._source('products', 'exists', '{1,4}');
SELECT * FROM cde._source('products', 'chunk', NULL, '1', 5);
SELECT o FROM cde._source('products', 'count');
-- What capture runs: the triggers cde_track installed (no function is generated for them).
SELECT cde_track('products', 'products');
SELECT cde_track('names', 'products', 'SELECT id FROM changed WHERE name IS NOT NULL');
SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = 'products'::regclass AND NOT tgisinternal ORDER BY tgname;
-- And written: cde._rebuild as the extension's owner.
SELECT * FROM cde._rebuild('products', '{1,2,3,4}');
SELECT key, doc, status FROM cde.feed_products ORDER BY key;
-- A full sync step leaves unchanged documents alone: no row is written, nor even locked (a full
-- re-sync writes nothing to the feed table, and a change made meanwhile waits for no lock).
SELECT built, changed, deleted FROM cde._rebuild('products', NULL, 'chunk', NULL, 100);
SELECT count(*) FILTER (WHERE xmax::text <> '0') AS locked FROM cde.feed_products;
-- A collect writes none either, but locks each row (sql/rebuild.sql says why).
UPDATE cde.feed_products SET status = 'sent', full_sync = false;   -- delivered
CREATE TEMP TABLE versions AS SELECT key, ctid::text AS tid, status FROM cde.feed_products;
SELECT built, changed, deleted FROM cde._rebuild('products', '{1,2,3,4}');
SELECT count(*) FILTER (WHERE xmax::text <> '0') AS locked FROM cde.feed_products;
SELECT f.key, f.ctid::text <> v.tid AS rewritten FROM cde.feed_products f JOIN versions v USING (key) ORDER BY key;
-- During a full sync of the feed, a collect rewrites the rows it leaves unchanged as they are: a
-- row version a step with an older snapshot will leave (sql/rebuild.sql, "touch"), with the
-- same document and state, so nothing is sent again.
SELECT cde_full_sync('products') > 0 AS syncing;
SELECT built, changed, deleted FROM cde._rebuild('products', '{1,2,3,4}');
SELECT f.key, f.ctid::text <> v.tid AS rewritten, f.status, f.status = v.status AS same_status
  FROM cde.feed_products f JOIN versions v USING (key) ORDER BY key;
ROLLBACK;
