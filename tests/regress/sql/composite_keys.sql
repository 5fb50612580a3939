-- Entities keyed by several columns (key_columns): the key's encoding, the SQL that rebuilds and
-- chunks them (filtering on the columns in their own types, so that the table's primary key
-- serves it), capture with no keys, an expression list and a SELECT, and what is refused.
\i sql/fresh.inc
BEGIN;
SET cde.endpoint = '';
CREATE TABLE stock (product_id int, store text, qty int NOT NULL, PRIMARY KEY (product_id, store));
INSERT INTO stock SELECT p, s, p % 7 FROM generate_series(1, 100000) AS p, unnest('{de,fr,a|b,x%7C}'::text[]) AS s;
ANALYZE stock;
SELECT cde_register_feed('stock', 'SELECT product_id, store, qty FROM stock', key_columns => '{product_id,store}');
SELECT key_columns, key_types FROM cde.feeds WHERE name = 'stock';

-- The key: each part's text, "%" as "%25" and "|" as "%7C", joined by "|"; cde._key_parts
-- splits it back.
SELECT cde._key_sql('{s.product_id,s.store}');
SELECT v AS store, k AS key, cde._key_parts(k) AS parts
  FROM unnest('{de,a|b,x%7C,%,|}'::text[]) AS v,
       LATERAL (SELECT '5|' || replace(replace(v, '%', '%25'), '|', '%7C') AS k) AS e;

-- A part is rendered by its type's output function, never by a cast to text that the type's
-- owner may have written (capture triggers compose keys for every writer); a NULL part makes
-- no key.
CREATE TYPE pair AS (a int, b int);
CREATE FUNCTION pair_text(pair) RETURNS text LANGUAGE sql AS $$SELECT 'the cast ran'$$;
CREATE CAST (pair AS text) WITH FUNCTION pair_text(pair);
SELECT (ROW(1, 2)::pair)::text AS cast_gives;
SELECT cde_register_feed('pairs', 'SELECT id, p, true AS on FROM (VALUES (1, ROW(1, 2)::pair), (2, NULL)) AS v(id, p)',
                         key_columns => '{id,p,on}');
SELECT key FROM cde._source('pairs', 'keys', NULL) ORDER BY key NULLS LAST;

-- What runs, per mode.
\pset format unaligned
SELECT m.mode, cde._source_sql(f, m.mode) FROM cde.feeds f, unnest('{keys,chunk}'::text[]) AS m(mode) WHERE f.name = 'stock';
\pset format aligned

-- Rebuilding 10 changed pairs of the 400,000 reads those 10 rows through the primary key: no
-- sequential scan of stock (this transaction's own counters, before and after).
CREATE TEMP TABLE scans AS SELECT seq_scan, idx_scan, idx_tup_fetch FROM pg_stat_xact_user_tables WHERE relid = 'stock'::regclass;
SELECT * FROM cde._rebuild('stock', ARRAY(SELECT p || '|de' FROM generate_series(1, 9) AS p) || '{7|a%7Cb,42|nowhere}'::text[]);
SELECT t.seq_scan - b.seq_scan AS seq_scans, t.idx_scan - b.idx_scan AS index_scans, t.idx_tup_fetch - b.idx_tup_fetch AS rows_read
  FROM pg_stat_xact_user_tables t, scans b WHERE t.relid = 'stock'::regclass;
SELECT key, doc FROM cde.feed_stock ORDER BY key;

-- Chunks go in the key columns' order, one index range each.
SELECT * FROM cde._rebuild('stock', NULL, 'chunk', NULL, 3);
SELECT * FROM cde._rebuild('stock', NULL, 'chunk', '1|x%257C', 3);
SELECT t.seq_scan - b.seq_scan AS seq_scans FROM pg_stat_xact_user_tables t, scans b WHERE t.relid = 'stock'::regclass;

-- Capture with no keys takes the key columns of the changed row; a deleted pair is a deletion.
SELECT cde_track('stock', 'stock');
UPDATE stock SET qty = qty + 1 WHERE product_id = 3 AND store IN ('a|b', 'fr');
DELETE FROM stock WHERE product_id = 4 AND store = 'de';
SELECT feed, keys FROM cde.queue ORDER BY id;
SELECT feed, collected FROM cde_sync_now();
SELECT key, deleted, status FROM cde.feed_stock WHERE key LIKE '3|%' OR key LIKE '4|%' ORDER BY key;

-- Resent on request, by key (cde_resync): the same string the sink got.
SELECT cde_resync('stock', '{3|a%7Cb}');
SELECT key, status FROM cde.feed_stock WHERE key = '3|a%7Cb';
SAVEPOINT r;
SELECT cde_resync('stock', '{3}');
ROLLBACK TO r;

-- Another table's changes: an expression list, or a SELECT over "changed", of as many columns.
CREATE TABLE stores (code text PRIMARY KEY, name text);
CREATE TABLE moves (product_id int, store text, delta int);
SELECT cde_track('stock', 'moves', 'product_id, store');
SELECT cde_track('stock', 'stores', 'SELECT s.product_id, s.store FROM stock s JOIN changed c ON c.code = s.store WHERE s.product_id <= 2');
INSERT INTO moves VALUES (8, 'de', 1);
INSERT INTO stores VALUES ('fr', 'France');
SELECT feed, keys FROM cde.queue ORDER BY id;

-- Refused: both key_column and key_columns, a column named twice or missing, keys giving
-- fewer or more values than the key has columns.
SAVEPOINT s;
SELECT cde_register_feed('x', 'SELECT 1 AS a, 2 AS b', key_column => 'a', key_columns => '{a,b}');
ROLLBACK TO s;
SELECT cde_register_feed('x', 'SELECT 1 AS a, 2 AS b', key_columns => '{a,a}');
ROLLBACK TO s;
SELECT cde_register_feed('x', 'SELECT 1 AS a, 2 AS b', key_columns => '{a,c}');
ROLLBACK TO s;
SELECT cde_register_feed('x', 'SELECT 1 AS a, 2 AS b', key_columns => '{}');
ROLLBACK TO s;
SELECT cde_track('stock', 'moves', 'product_id');
ROLLBACK TO s;
SELECT cde_track('stock', 'moves', 'product_id, store, delta');
ROLLBACK TO s;
SELECT cde_track('stock', 'stores', 'SELECT 1, code, name FROM changed');
ROLLBACK TO s;
ROLLBACK;
